//! `kms-tag-guard replay`: past tag and alias changes from CloudTrail, judged by a policy.
//!
//! The inputs are walked into a list of files ([`input::files`]); one thread per CPU takes the
//! next file from the list until none is left, streams its events ([`input::read_file`]: a
//! record that cannot change tags or aliases is never read further than its `eventName` and
//! `eventSource`), turns each tag or alias change back into its request and judges it with the
//! same [`crate::decide`] as live traffic ([`events`]). What each file gave is merged in file
//! order and the would-be denials sorted by event time, then file and record, so the report
//! does not depend on which thread read what. [`report`] writes it as text or JSON.

mod events;
mod input;
mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::config::Config;
use crate::decide::Rules;
use crate::policy::Violation;

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

/// One change the policy would have denied.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Denial {
    pub time: Option<String>,
    pub principal: String,
    pub operation: &'static str,
    pub key: Option<String>,
    pub alias: Option<String>,
    pub event_id: Option<String>,
    /// The input file (its index in [`Replay::files`]) and the record's place in it.
    #[serde(skip)]
    pub file: usize,
    #[serde(skip)]
    pub at: Position,
    pub violations: Vec<Violation>,
    pub violations_omitted: usize,
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
    /// Sorted by event time, then file and record.
    pub denials: Vec<Denial>,
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
    let mut results: Vec<(usize, FileResult)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(path) = files.get(i) else { break };
                        let mut sink = FileSink::new(&rules, &events_read);
                        let outcome = input::read_file(path, &bytes_read, &mut sink);
                        events_read.fetch_add(sink.unreported, Ordering::Relaxed);
                        let mut result = sink.result;
                        if let Err(error) = outcome {
                            result.problems.push((None, error.to_string()));
                        }
                        done.push((i, result));
                    }
                    done
                })
            })
            .collect();
        if let Some(bar) = &bar {
            while !workers.iter().all(|w| w.is_finished()) {
                bar.set_position(bytes_read.load(Ordering::Relaxed));
                bar.set_message(format!("{} events", events_read.load(Ordering::Relaxed)));
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        }
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
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
    for (i, result) in results {
        replay.merge(i, result);
    }
    replay
        .denials
        .sort_by(|a, b| (&a.time, a.file, a.at).cmp(&(&b.time, b.file, b.at)));
    replay.files = files;
    replay
}

impl Replay {
    fn merge(&mut self, file: usize, result: FileResult) {
        self.events += result.events;
        self.judged += result.judged;
        self.failed_in_kms += result.failed_in_kms;
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
        self.denials
            .extend(result.denials.into_iter().map(|d| Denial { file, ..d }));
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
    denied: u64,
    unreadable: u64,
    by_operation: BTreeMap<&'static str, Count>,
    by_rule: BTreeMap<String, u64>,
    dry_run_by_rule: BTreeMap<String, u64>,
    by_principal: BTreeMap<String, Count>,
    denials: Vec<Denial>,
    problems: Vec<(Option<Position>, String)>,
    problems_omitted: u64,
}

/// Judges one file's events as they are read.
struct FileSink<'a> {
    rules: &'a Rules<'a>,
    /// The progress bar's count of events, added to every so often.
    events_read: &'a AtomicU64,
    unreported: u64,
    result: FileResult,
}

impl<'a> FileSink<'a> {
    fn new(rules: &'a Rules<'a>, events_read: &'a AtomicU64) -> Self {
        FileSink {
            rules,
            events_read,
            unreported: 0,
            result: FileResult::default(),
        }
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
        r.denials.push(Denial {
            time: event.time,
            principal,
            operation: operation.name(),
            key: judged.key,
            alias: judged.alias,
            event_id: event.id,
            file: 0,
            at,
            violations: judged.decision.violations,
            violations_omitted: judged.decision.violations_omitted,
        });
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
