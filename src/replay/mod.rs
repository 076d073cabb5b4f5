//! `kms-tag-guard replay`: past tag and alias changes from CloudTrail, judged by a policy.
//!
//! The inputs are walked into a list of files ([`input::files`]); one thread per CPU takes the
//! next file from the list until none is left, streams its events ([`input::read_file`]: a
//! record that cannot change tags or aliases is never read further than its `eventName` and
//! `eventSource`), turns each tag or alias change back into its request and judges it with the
//! same [`crate::decide`] as live traffic ([`events`]), once per `eventID` ([`seen`]: the
//! same event in two inputs is counted once). What each file gave is merged in file
//! order and the would-be denials sorted by event time, then file and record, so the report
//! does not depend on which thread read what (but for an event given in two files, whose
//! denial names the place of whichever copy was read first). [`report`] writes it as text or JSON.

mod denials;
mod events;
mod input;
mod report;
mod seen;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use crate::config::Config;
use crate::decide::Rules;
use crate::policy::Violation;

pub use denials::{Denial, Denials, Finding};
pub use input::{read_events, Position, MAX_VALUE};
pub use report::Format;

/// At most this many unreadable records are described per file; the rest are counted.
const PROBLEMS_PER_FILE: usize = 20;
/// At most this many threads read files at once (each holds a read buffer).
const MAX_THREADS: usize = 16;

/// Counts of one operation or one principal.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Count {
    /// Tag and alias changes judged (those KMS carried out).
    pub judged: u64,
    /// Of those, the ones the policy would have denied.
    pub denied: u64,
    /// Tag and alias changes KMS itself refused (`errorCode`): not judged.
    pub failed_in_kms: u64,
}

impl Count {
    fn add(&mut self, other: &Count) {
        self.judged += other.judged;
        self.denied += other.denied;
        self.failed_in_kms += other.failed_in_kms;
    }
}

/// Something in the inputs that could not be read.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The file (index in [`Replay::files`]), or `None` for an input path that is not one.
    pub file: Option<usize>,
    /// The record, when the problem is one record (the rest of the file was read).
    pub at: Option<Position>,
    pub message: String,
}

/// What a replay found.
#[derive(Debug, Default)]
pub struct Replay {
    pub files: Vec<PathBuf>,
    /// Every record read.
    pub events: u64,
    /// Tag and alias changes judged (KMS events of the seven operations without `errorCode`).
    pub judged: u64,
    /// Tag and alias changes KMS refused (with `errorCode`): counted apart, not judged.
    pub failed_in_kms: u64,
    /// Tag and alias changes skipped because an event with their `eventID` came before
    /// ([`seen`]): counted once, as the first.
    pub duplicates: u64,
    /// Tag and alias changes whose `eventID` could not be remembered (more than
    /// [`seen::MAX_REMEMBERED`] IDs): judged, but a later copy of them would be judged again.
    pub not_deduplicated: u64,
    /// Judged changes the policy would have denied.
    pub denied: u64,
    /// Records that could not be read as events (described in `problems`).
    pub unreadable: u64,
    pub by_operation: BTreeMap<&'static str, Count>,
    /// Denied changes per enforced rule they broke.
    pub by_rule: BTreeMap<String, u64>,
    /// Changes per dry-run rule they broke (recorded, not denied).
    pub dry_run_by_rule: BTreeMap<String, u64>,
    pub by_principal: BTreeMap<String, Count>,
    /// In the report's order: by event time, then file and record.
    pub denials: Denials,
    pub problems: Vec<Problem>,
    /// Unreadable records counted but not described.
    pub problems_omitted: u64,
}

impl Replay {
    /// True when nothing would have been denied and every input was read whole.
    pub fn clean(&self) -> bool {
        self.denied == 0 && self.unreadable == 0 && self.problems.is_empty()
    }
}

/// Reads every input and judges its tag and alias changes by `config`'s policy. With
/// `progress`, a progress bar is drawn on standard error.
pub fn run(config: &Config, inputs: &[PathBuf], progress: bool) -> Replay {
    let (files, walk_problems) = input::files(inputs);
    let rules = Rules::of(config);
    let seen = seen::Seen::default();
    let next = AtomicUsize::new(0);
    let bytes_read = AtomicU64::new(0);
    let events_read = AtomicU64::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len())
        .clamp(1, MAX_THREADS);
    let bar = progress.then(|| {
        let total = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(total),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {bytes}/{total_bytes} {msg} (eta {eta})",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    });
    let mut replay = Replay {
        problems: walk_problems
            .into_iter()
            .map(|message| Problem {
                file: None,
                at: None,
                message,
            })
            .collect(),
        ..Replay::default()
    };
    let (sender, results) = mpsc::sync_channel::<Message>(threads * 4);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let sender = sender.clone();
            let (next, files, rules, seen) = (&next, &files, &rules, &seen);
            let (bytes_read, events_read) = (&bytes_read, &events_read);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(path) = files.get(i) else { break };
                let mut sink = FileSink::new(i, rules, seen, events_read, &sender);
                let outcome = input::read_file(path, bytes_read, &mut sink);
                let mut result = sink.finish();
                if let Err(error) = outcome {
                    result.problems.push((None, error.to_string()));
                }
                if sender.send(Message::Done(i, result)).is_err() {
                    break;
                }
            });
        }
        drop(sender);
        loop {
            match results.recv_timeout(Duration::from_millis(100)) {
                Ok(Message::Denials(denials)) => {
                    for denial in denials {
                        replay.denials.push(denial);
                    }
                }
                Ok(Message::Done(i, result)) => replay.merge(i, result),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if let Some(bar) = &bar {
                bar.set_position(bytes_read.load(Ordering::Relaxed));
                bar.set_message(format!("{} events", events_read.load(Ordering::Relaxed)));
            }
        }
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
    });
    // Files finish in any order: their problems are listed in file order.
    replay
        .problems
        .sort_by_key(|p| (p.file.map_or(0, |f| f + 1), p.at));
    replay.files = files;
    replay
}

/// What a worker thread tells the thread that merges.
enum Message {
    /// Denials found so far in a file (sent in batches, so no file holds many).
    Denials(Vec<Denial>),
    /// A file read to its end (or to the error that stopped it).
    Done(usize, FileResult),
}

/// How many denials a worker collects before handing them on.
const BATCH: usize = 256;

impl Replay {
    fn merge(&mut self, file: usize, result: FileResult) {
        self.events += result.events;
        self.judged += result.judged;
        self.failed_in_kms += result.failed_in_kms;
        self.duplicates += result.duplicates;
        self.not_deduplicated += result.not_deduplicated;
        self.denied += result.denied;
        self.unreadable += result.unreadable;
        for (op, count) in result.by_operation {
            self.by_operation.entry(op).or_default().add(&count);
        }
        for (rule, n) in result.by_rule {
            *self.by_rule.entry(rule).or_default() += n;
        }
        for (rule, n) in result.dry_run_by_rule {
            *self.dry_run_by_rule.entry(rule).or_default() += n;
        }
        for (principal, count) in result.by_principal {
            self.by_principal.entry(principal).or_default().add(&count);
        }
        self.problems
            .extend(result.problems.into_iter().map(|(at, message)| Problem {
                file: Some(file),
                at,
                message,
            }));
        self.problems_omitted += result.problems_omitted;
    }
}

/// What one file gave.
#[derive(Debug, Default)]
struct FileResult {
    events: u64,
    judged: u64,
    failed_in_kms: u64,
    duplicates: u64,
    not_deduplicated: u64,
    denied: u64,
    unreadable: u64,
    by_operation: BTreeMap<&'static str, Count>,
    by_rule: BTreeMap<String, u64>,
    dry_run_by_rule: BTreeMap<String, u64>,
    by_principal: BTreeMap<String, Count>,
    problems: Vec<(Option<Position>, String)>,
    problems_omitted: u64,
}

/// Judges one file's events as they are read.
struct FileSink<'a> {
    file: usize,
    rules: &'a Rules<'a>,
    seen: &'a seen::Seen,
    sender: &'a mpsc::SyncSender<Message>,
    denials: Vec<Denial>,
    /// The progress bar's count of events, added to every so often.
    events_read: &'a AtomicU64,
    unreported: u64,
    result: FileResult,
}

impl<'a> FileSink<'a> {
    fn new(
        file: usize,
        rules: &'a Rules<'a>,
        seen: &'a seen::Seen,
        events_read: &'a AtomicU64,
        sender: &'a mpsc::SyncSender<Message>,
    ) -> Self {
        FileSink {
            file,
            rules,
            seen,
            sender,
            denials: Vec::new(),
            events_read,
            unreported: 0,
            result: FileResult::default(),
        }
    }

    /// Hands on the denials collected.
    fn send_denials(&mut self) {
        if !self.denials.is_empty() {
            let batch = std::mem::take(&mut self.denials);
            // The receiver only goes away when the scope ends, after every worker.
            let _ = self.sender.send(Message::Denials(batch));
        }
    }

    /// The file's counts, its denials handed on.
    fn finish(mut self) -> FileResult {
        self.send_denials();
        self.events_read
            .fetch_add(self.unreported, Ordering::Relaxed);
        self.result
    }
}

/// Each rule a list of violations names, once.
fn rule_ids(violations: &[Violation]) -> Vec<&str> {
    let mut ids: Vec<&str> = violations.iter().map(|v| &*v.rule).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

impl input::Sink for FileSink<'_> {
    fn record(&mut self, peek: &input::Peek, bytes: &[u8], at: Position) {
        let r = &mut self.result;
        r.events += 1;
        self.unreported += 1;
        if self.unreported == 4096 {
            self.events_read.fetch_add(4096, Ordering::Relaxed);
            self.unreported = 0;
        }
        let Some(operation) = peek.operation() else {
            return;
        };
        let event: events::Event = match serde_json::from_slice(bytes) {
            Ok(event) => event,
            Err(error) => {
                r.events -= 1;
                return self.unreadable(
                    format!(
                        "a {operation} event whose members cannot be read: {}",
                        input::without_place(&error)
                    ),
                    at,
                );
            }
        };
        // An event given twice (overlapping inputs) is counted once. Without an ID (not a record
        // CloudTrail wrote), it cannot be matched, and is counted each time.
        if let Some(id) = &event.id {
            match self.seen.first(id) {
                seen::Claim::First => {}
                seen::Claim::Again => {
                    r.duplicates += 1;
                    return;
                }
                seen::Claim::Unremembered => r.not_deduplicated += 1,
            }
        }
        let principal = event.principal();
        let op_count = r.by_operation.entry(operation.name()).or_default();
        let principal_count = r.by_principal.entry(principal.clone()).or_default();
        if event.error_code.is_some() {
            r.failed_in_kms += 1;
            op_count.failed_in_kms += 1;
            principal_count.failed_in_kms += 1;
            return;
        }
        r.judged += 1;
        op_count.judged += 1;
        principal_count.judged += 1;
        let judged = event.judge(operation, self.rules);
        for rule in rule_ids(&judged.decision.dry_run_violations) {
            *r.dry_run_by_rule.entry(rule.to_owned()).or_default() += 1;
        }
        if judged.decision.allowed() {
            return;
        }
        r.denied += 1;
        op_count.denied += 1;
        principal_count.denied += 1;
        for rule in rule_ids(&judged.decision.violations) {
            *r.by_rule.entry(rule.to_owned()).or_default() += 1;
        }
        self.denials.push(Denial {
            time: event.time,
            principal,
            operation: operation.name().to_owned(),
            key: judged.key,
            alias: judged.alias,
            event_id: event.id,
            file: self.file,
            at,
            violations: judged
                .decision
                .violations
                .into_iter()
                .map(|v| Finding {
                    rule: v.rule.to_string(),
                    key: v.key,
                    message: v.message,
                })
                .collect(),
            violations_omitted: judged.decision.violations_omitted,
        });
        if self.denials.len() >= BATCH {
            self.send_denials();
        }
    }

    fn unreadable(&mut self, message: String, at: Position) {
        let r = &mut self.result;
        r.events += 1;
        r.unreadable += 1;
        if r.problems.len() < PROBLEMS_PER_FILE {
            r.problems.push((Some(at), message));
        } else {
            r.problems_omitted += 1;
        }
    }
}

#[cfg(test)]
mod tests;
