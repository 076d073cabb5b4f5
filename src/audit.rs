//! The audit log: one JSON line per decision and per outcome of every tag-bearing request.
//!
//! Records are written by one writer thread of their own, fed by a bounded queue, so that a slow
//! or stalled sink (a log shipper that falls behind, a pipe nobody reads, a full disk) never
//! blocks a connection thread, and traffic that changes no tags never waits for the audit at all.
//! A tag change waits for its `decision` record to be written (and flushed, or fsynced with
//! `fsync = true`) before it is forwarded or answered, at most `stall_timeout_ms`: past that, or
//! with the queue full, the record is not known to be written, and with `fail_closed` the request
//! is refused (503): a tag change that cannot be audited does not happen. An `outcome` record is
//! queued without waiting. The writer writes what is queued in batches (one write, one flush or
//! fsync each), in order, and every record accepted into the queue is written before the proxy
//! exits, within the shutdown grace period.
//!
//! Every line is at most [`MAX_RECORD_BYTES`] (a larger record is written as a summary of it), and
//! U+2028, U+2029 and U+0085, which some line readers take for line ends, are escaped. What the
//! records say is `crate::record`'s.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::oneshot;
use tracing::{error, info};

use crate::config::{AuditConfig, AuditPath};
use crate::metrics::Metrics;
use crate::text::bounded;

/// The largest record the log holds; a larger one is written as a summary.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// How many queued records one write takes at most.
const MAX_BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {path}: {source}; check that the directory exists and is writable")]
    Open { path: String, source: io::Error },
    #[error("cannot write the audit log: {0}")]
    Write(String),
    #[error("the audit log did not take the record within {0} ms ([audit].stall_timeout_ms): its sink is stalled or its queue is full")]
    Stalled(u128),
    #[error("the audit log is closed (the proxy is shutting down)")]
    Closed,
}

/// What a record waiting in the queue is.
enum Job {
    /// A line, and who waits for it to be written.
    Record(Vec<u8>, Option<oneshot::Sender<Result<(), String>>>),
    /// Open the file again (SIGHUP, for log rotation).
    Reopen(oneshot::Sender<Result<(), String>>),
    /// Write what came before, then stop.
    Stop,
}

/// What the writer thread and the request paths share.
struct State {
    /// Set when a request path found the sink stalled (queue full, or a record not written in
    /// time); cleared by the writer's next successful write. Logged once per stall.
    stalled: AtomicBool,
    /// Set while writes fail; cleared by the next success. Logged once per failing spell.
    failing: AtomicBool,
    /// Records accepted into the queue and not yet written.
    queued: AtomicUsize,
    /// When the write in progress began (ms since `epoch`), or 0.
    writing_since_ms: AtomicU64,
    epoch: Instant,
}

pub struct AuditLog {
    queue: SyncSender<Job>,
    state: Arc<State>,
    pub fail_closed: bool,
    stall_timeout: Duration,
    metrics: Arc<Metrics>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

enum Sink {
    Stdout,
    File(File),
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("fail_closed", &self.fail_closed)
            .finish()
    }
}

impl AuditLog {
    /// Opens the sink and starts the writer thread.
    pub fn open(config: &AuditConfig, metrics: Arc<Metrics>) -> Result<AuditLog, AuditError> {
        let sink = open_sink(&config.path)?;
        let (queue, jobs) = mpsc::sync_channel(config.queue_capacity);
        let state = Arc::new(State {
            stalled: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            writing_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let writer = Writer {
            sink,
            path: config.path.clone(),
            fsync: config.fsync,
            state: Arc::clone(&state),
            metrics: Arc::clone(&metrics),
        };
        let thread = std::thread::Builder::new()
            .name("ktg-audit".into())
            .spawn(move || writer.run(jobs))
            .map_err(|e| AuditError::Write(format!("cannot start the audit writer thread: {e}")))?;
        Ok(AuditLog {
            queue,
            state,
            fail_closed: config.fail_closed,
            stall_timeout: config.stall_timeout,
            metrics,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Writes one record and waits until it is written (and flushed or fsynced), at most
    /// `stall_timeout_ms`. `Err(Stalled)` after the record was queued means it may still be
    /// written later.
    pub async fn write(&self, record: &impl Serialize) -> Result<(), AuditError> {
        let (done, written) = oneshot::channel();
        if let Err(error) = self.enqueue(encode(record), Some(done)) {
            self.metrics.audit_write_failure();
            return Err(error);
        }
        match tokio::time::timeout(self.stall_timeout, written).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(message))) => Err(AuditError::Write(message)),
            Ok(Err(_)) => Err(AuditError::Closed),
            Err(_) => {
                self.note_stall("a record was not written within stall_timeout_ms");
                Err(AuditError::Stalled(self.stall_timeout.as_millis()))
            }
        }
    }

    /// Queues one record without waiting for it (an outcome record). Never blocks; a record the
    /// full queue cannot take is counted as a write failure and logged.
    pub fn write_detached(&self, record: &impl Serialize) -> Result<(), AuditError> {
        let result = self.enqueue(encode(record), None);
        if result.is_err() {
            self.metrics.audit_write_failure();
        }
        result
    }

    fn enqueue(
        &self,
        line: Vec<u8>,
        done: Option<oneshot::Sender<Result<(), String>>>,
    ) -> Result<(), AuditError> {
        self.state.queued.fetch_add(1, Ordering::SeqCst);
        match self.queue.try_send(Job::Record(line, done)) {
            Ok(()) => {
                self.metrics.audit_queued(1);
                Ok(())
            }
            Err(TrySendError::Full(_)) => {
                self.state.queued.fetch_sub(1, Ordering::SeqCst);
                self.note_stall("the audit queue is full");
                Err(AuditError::Stalled(self.stall_timeout.as_millis()))
            }
            Err(TrySendError::Disconnected(_)) => {
                self.state.queued.fetch_sub(1, Ordering::SeqCst);
                Err(AuditError::Closed)
            }
        }
    }

    /// Marks the sink stalled, logging it once per stall.
    fn note_stall(&self, why: &str) {
        if !self.state.stalled.swap(true, Ordering::SeqCst) {
            let writing_for = self.writing_for();
            error!(
                why,
                queued = self.state.queued.load(Ordering::SeqCst),
                writing_for_ms = writing_for.map(|d| d.as_millis() as u64),
                "the audit log is stalled: tag changes are refused (503) until it writes again; traffic that changes no tags is not affected"
            );
            self.metrics.audit_stalled(true);
        }
    }

    /// How long the write in progress has been going on, if one is.
    fn writing_for(&self) -> Option<Duration> {
        match self.state.writing_since_ms.load(Ordering::SeqCst) {
            0 => None,
            since => Some(
                self.state
                    .epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(since)),
            ),
        }
    }

    /// Opens the audit file again, for log rotation (`mv` then SIGHUP): records queued after
    /// this go to a file at the configured path. If it cannot be opened, the old file stays in
    /// use. Waits at most `stall_timeout_ms` for the writer to get to it.
    pub async fn reopen(&self) -> Result<(), AuditError> {
        let (done, reopened) = oneshot::channel();
        match self.queue.try_send(Job::Reopen(done)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(AuditError::Stalled(self.stall_timeout.as_millis()))
            }
            Err(TrySendError::Disconnected(_)) => return Err(AuditError::Closed),
        }
        match tokio::time::timeout(self.stall_timeout, reopened).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(message))) => Err(AuditError::Write(message)),
            Ok(Err(_)) => Err(AuditError::Closed),
            Err(_) => Err(AuditError::Stalled(self.stall_timeout.as_millis())),
        }
    }

    /// Writes everything queued, then stops the writer; waits at most `within`. Returns how
    /// many records were still not written then (0 unless the sink is stalled).
    pub async fn close(&self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        let mut sent = false;
        loop {
            if !sent {
                sent = match self.queue.try_send(Job::Stop) {
                    Ok(()) | Err(TrySendError::Disconnected(_)) => true,
                    Err(TrySendError::Full(_)) => false,
                };
            }
            let finished = self
                .thread
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_none_or(JoinHandle::is_finished);
            if sent && finished {
                if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = thread.join();
                }
                // Records queued after the writer ended (none, unless a connection outlived
                // the grace period) are not written.
                return self.state.queued.load(Ordering::SeqCst);
            }
            if tokio::time::Instant::now() >= deadline {
                let left = self.state.queued.load(Ordering::SeqCst);
                error!(
                    records = left,
                    "the audit log did not take every queued record before the shutdown grace period ended"
                );
                return left;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The writer thread: owns the sink, writes what is queued in order.
struct Writer {
    sink: Sink,
    path: AuditPath,
    fsync: bool,
    state: Arc<State>,
    metrics: Arc<Metrics>,
}

impl Writer {
    fn run(mut self, jobs: Receiver<Job>) {
        let mut lines = Vec::with_capacity(16 * 1024);
        let mut waiting = Vec::new();
        let mut stopping = false;
        // After `Stop`, what is still in the queue (a request that finished meanwhile) is
        // written too; the writer ends once the queue is empty.
        while let Some(first) = if stopping {
            jobs.try_recv().ok()
        } else {
            jobs.recv().ok()
        } {
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(job) = next.take() {
                taken += 1;
                match job {
                    Job::Record(line, done) => {
                        lines.extend_from_slice(&line);
                        waiting.push(done);
                    }
                    Job::Reopen(done) => {
                        self.flush(&mut lines, &mut waiting);
                        let reopened = open_sink(&self.path).map(|sink| self.sink = sink);
                        let _ = done.send(reopened.map_err(|e| e.to_string()));
                    }
                    Job::Stop => stopping = true,
                }
                if taken < MAX_BATCH {
                    next = jobs.try_recv().ok();
                }
            }
            self.flush(&mut lines, &mut waiting);
        }
    }

    /// Writes the batch in one write, flushes or fsyncs it, and tells whoever waits (one entry
    /// of `waiting` per record).
    fn flush(
        &mut self,
        lines: &mut Vec<u8>,
        waiting: &mut Vec<Option<oneshot::Sender<Result<(), String>>>>,
    ) {
        let count = waiting.len();
        if count == 0 {
            return;
        }
        let since = self.state.epoch.elapsed().as_millis().max(1) as u64;
        self.state.writing_since_ms.store(since, Ordering::SeqCst);
        let result =
            match &mut self.sink {
                Sink::Stdout => {
                    let mut out = io::stdout().lock();
                    out.write_all(lines).and_then(|()| out.flush())
                }
                Sink::File(file) => file.write_all(lines).and_then(|()| {
                    if self.fsync {
                        file.sync_data()
                    } else {
                        Ok(())
                    }
                }),
            };
        self.state.writing_since_ms.store(0, Ordering::SeqCst);
        self.state.queued.fetch_sub(count, Ordering::SeqCst);
        self.metrics.audit_queued(-(count as i64));
        match &result {
            Ok(()) => {
                if self.state.stalled.swap(false, Ordering::SeqCst) {
                    info!("the audit log writes again; tag changes are forwarded again");
                    self.metrics.audit_stalled(false);
                }
                if self.state.failing.swap(false, Ordering::SeqCst) {
                    info!("audit records are written again");
                }
            }
            Err(e) => {
                for _ in 0..count {
                    self.metrics.audit_write_failure();
                }
                if !self.state.failing.swap(true, Ordering::SeqCst) {
                    error!(error = %e, records = count, "audit records could not be written; tag changes are refused (503) while this lasts (with fail_closed)");
                }
            }
        }
        let result = result.map_err(|e| e.to_string());
        for done in waiting.drain(..).flatten() {
            let _ = done.send(result.clone());
        }
        lines.clear();
    }
}

/// Whether the audit file could be opened for appending, without creating or changing it: an
/// existing file is opened for appending (and closed); for a new one, its directory must exist and
/// be writable. `start` checks this before it listens; `kms-tag-guard check` does too.
pub fn check_path(path: &AuditPath) -> Result<(), AuditError> {
    let AuditPath::File(file) = path else {
        return Ok(());
    };
    let failed = |source: io::Error| AuditError::Open {
        path: file.display().to_string(),
        source,
    };
    if std::fs::symlink_metadata(file).is_ok() {
        return OpenOptions::new()
            .append(true)
            .open(file)
            .map(drop)
            .map_err(failed);
    }
    let dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(failed(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", dir.display()),
            )))
        }
        Err(e) => {
            return Err(failed(io::Error::new(
                e.kind(),
                format!("its directory {} does not exist ({e})", dir.display()),
            )))
        }
    }
    let c_dir = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
        .map_err(|e| failed(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: a NUL-terminated path; access(2) reads it and nothing else.
    if unsafe { libc::access(c_dir.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(failed(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "cannot create a file in {}: {}",
                dir.display(),
                io::Error::last_os_error()
            ),
        )));
    }
    Ok(())
}

fn open_sink(path: &AuditPath) -> Result<Sink, AuditError> {
    match path {
        AuditPath::Stdout => Ok(Sink::Stdout),
        AuditPath::File(path) => OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(Sink::File)
            .map_err(|source| AuditError::Open {
                path: path.display().to_string(),
                source,
            }),
    }
}

/// A record as one line: JSON, with U+2028, U+2029 and U+0085 escaped (serde_json writes them
/// raw, and some line readers split lines there), ending in `\n`. A record over
/// [`MAX_RECORD_BYTES`] is replaced by a summary of it.
fn encode(record: &impl Serialize) -> Vec<u8> {
    let mut line = Vec::with_capacity(1024);
    serde_json::to_writer(&mut line, record).expect("audit records serialise");
    if line.len() >= MAX_RECORD_BYTES {
        let value = serde_json::to_value(record).expect("audit records serialise");
        line.clear();
        serde_json::to_writer(&mut line, &summary(value)).expect("a summary serialises");
    }
    let mut line = escape_line_separators(line);
    line.push(b'\n');
    line
}

/// The record without its lists, which are counted instead; `"summarised": true`.
fn summary(mut value: serde_json::Value) -> serde_json::Value {
    if let Some(object) = value.as_object_mut() {
        for list in ["set", "remove", "violations", "dry_run_violations"] {
            if let Some(items) = object.get(list).and_then(|v| v.as_array()) {
                let count = items.len();
                let first: Vec<serde_json::Value> = items
                    .iter()
                    .take(3)
                    .map(|v| {
                        let text = v.to_string();
                        serde_json::Value::String(bounded(&text, 1024).into_owned())
                    })
                    .collect();
                object.insert(list.into(), serde_json::Value::Array(first));
                object.insert(format!("{list}_listed_in_summary"), count.into());
            }
        }
        object.insert("summarised".into(), true.into());
    }
    value
}

/// Replaces the UTF-8 of U+2028, U+2029 and U+0085 with JSON escapes. They only occur inside
/// JSON strings, where an escape means the same character.
fn escape_line_separators(line: Vec<u8>) -> Vec<u8> {
    if memchr::memchr2(0xE2, 0xC2, &line).is_none() {
        return line;
    }
    let mut out = Vec::with_capacity(line.len() + 16);
    let mut i = 0;
    while i < line.len() {
        match &line[i..] {
            [0xE2, 0x80, 0xA8, ..] => {
                out.extend_from_slice(b"\\u2028");
                i += 3;
            }
            [0xE2, 0x80, 0xA9, ..] => {
                out.extend_from_slice(b"\\u2029");
                i += 3;
            }
            [0xC2, 0x85, ..] => {
                out.extend_from_slice(b"\\u0085");
                i += 2;
            }
            [b, ..] => {
                out.push(*b);
                i += 1;
            }
            [] => unreachable!(),
        }
    }
    out
}

/// The time as the audit log writes it: RFC 3339, UTC, milliseconds.
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuditConfig;

    fn config(path: AuditPath, fsync: bool) -> AuditConfig {
        AuditConfig {
            path,
            fsync,
            fail_closed: true,
            stall_timeout: Duration::from_millis(500),
            queue_capacity: 16,
        }
    }

    #[tokio::test]
    async fn writes_whole_lines_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log =
            AuditLog::open(&config(AuditPath::File(path.clone()), true), Arc::default()).unwrap();
        log.write(&serde_json::json!({"a": 1})).await.unwrap();
        log.write(&serde_json::json!({"b": "x\ny"})).await.unwrap();
        log.write_detached(&serde_json::json!({"c": "\u{2028}\u{2029}\u{85}é"}))
            .unwrap();
        assert_eq!(log.close(Duration::from_secs(5)).await, 0);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "{\"a\":1}\n{\"b\":\"x\\ny\"}\n{\"c\":\"\\u2028\\u2029\\u0085é\"}\n"
        );
        for line in text.lines() {
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }

        let full = AuditLog::open(
            &config(AuditPath::File("/dev/full".into()), false),
            Arc::default(),
        )
        .unwrap();
        assert!(matches!(
            full.write(&serde_json::json!({})).await,
            Err(AuditError::Write(_))
        ));
        assert!(AuditLog::open(
            &config(
                AuditPath::File(dir.path().join("missing/dir/audit.log")),
                false
            ),
            Arc::default()
        )
        .is_err());
    }

    #[test]
    fn oversized_records_become_summaries() {
        let big: Vec<String> = (0..2000)
            .map(|i| format!("key-{i}-{}", "x".repeat(64)))
            .collect();
        let line = encode(&serde_json::json!({"event": "decision", "remove": big}));
        assert!(line.len() < MAX_RECORD_BYTES, "{}", line.len());
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["summarised"], true);
        assert_eq!(value["remove_listed_in_summary"], 2000);
    }

    #[test]
    fn timestamps_are_rfc3339_millis_utc() {
        let ts = timestamp();
        assert_eq!(ts.len(), "2026-11-28T15:00:00.123Z".len(), "{ts}");
        assert!(ts.ends_with('Z'));
    }
}
