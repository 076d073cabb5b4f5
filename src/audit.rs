//! The audit log: one JSON line per decision and per outcome of every tag-bearing request.
//!
//! Records are written by one writer thread of their own, fed by a queue bounded in records
//! (`queue_capacity`) and in bytes (`queue_max_bytes`), so that a slow, stalled or failed sink (a
//! log shipper that falls behind, a pipe nobody reads, a full disk) never blocks a connection
//! thread, and traffic that changes no tags never waits for the audit at all. A tag change waits
//! for its `decision` record to be written (and flushed, or fsynced with `fsync = true`) before
//! it is forwarded or answered, at most `stall_timeout_ms`: past that, or with the queue full, or
//! with the sink failing, the record is not known to be written, and with `fail_closed` the
//! request is refused (503): a tag change that cannot be audited does not happen.
//!
//! A decision admitted into the queue for a change that may be forwarded holds a place in the
//! queue for its `outcome` record ([`OutcomeSlot`]), so that no outcome is ever refused for room.
//! The writer writes what is queued in batches (one write, one flush or fsync each), in order.
//! A batch is written whole or not at all: when a write or fsync fails (a full disk), a file is
//! truncated back to where the batch began, and on any other sink the rest of the batch is
//! written later, completing the line that was cut; the batch is retried with a back-off (a file
//! is reopened first) until the sink takes it, so the log recovers by itself when the sink does.
//! Meanwhile `kms_tag_guard_audit_failed` is 1, and tag changes are refused at once. Every record
//! accepted into the queue is written before the proxy exits, within the shutdown grace period.
//!
//! Every line is at most [`MAX_RECORD_BYTES`] (a larger record is written as a summary of it, and
//! a summary that is still too large as its first fields), and U+2028, U+2029 and U+0085, which
//! some line readers take for line ends, are escaped. What the records say is `crate::record`'s.
//!
//! The writer seals every line into the audit chain as it appends it to its batch, and adds the
//! signed checkpoints (`crate::integrity`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::oneshot;
use tracing::{error, info};

use crate::config::{AuditConfig, AuditPath};
use crate::integrity::Sealer;
use crate::metrics::Metrics;
use crate::text::bounded;

/// The largest record the log holds; a larger one is written as a summary.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// The place an outcome record holds in the queue from its decision on: `crate::record` bounds
/// every string of an outcome so that it fits.
pub const OUTCOME_RESERVE_BYTES: usize = 8 * 1024;
/// How many queued records one write takes at most.
const MAX_BATCH: usize = 64;
/// The first and the longest wait before a failed batch is written again.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// The writer's batch buffer is given back when a batch made it larger than this.
const KEPT_BUFFER: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {path}: {source}; check that the directory exists and is writable")]
    Open { path: String, source: io::Error },
    #[error("cannot write the audit log: {0}")]
    Write(String),
    #[error("the audit log cannot be written (its sink fails: see kms_tag_guard_audit_failed and the log); the record is written when the sink takes writes again")]
    Failing,
    #[error("the audit log did not take the record within {0} ms ([audit].stall_timeout_ms): its sink is stalled or its queue is full")]
    Stalled(u128),
    #[error("the audit log is closed (the proxy is shutting down)")]
    Closed,
    #[error(transparent)]
    SigningKey(#[from] crate::integrity::KeyError),
}

type Done = oneshot::Sender<Result<(), String>>;

/// What a record waiting in the queue is.
enum Job {
    /// A line, the bytes it is counted for in the queue, who waits for it to be written, and
    /// whether it is already counted as a write failure (queued while the sink fails).
    Record(Vec<u8>, usize, Option<Done>, bool),
    /// Open the file again (SIGHUP, for log rotation).
    Reopen(oneshot::Sender<Result<(), String>>),
    /// Write what came before, then stop.
    Stop,
}

/// What the writer thread, the request paths and the places held for outcomes share. (The
/// queue's sending end is not in it: the writer holds this, and must see the queue close when the
/// log is dropped.)
struct Core {
    /// Set when a request path found the sink stalled (queue full, or a record not written in
    /// time); cleared by the writer's next successful write. Logged once per stall.
    stalled: AtomicBool,
    /// Set while the sink fails (a write or fsync returned an error); cleared by the next
    /// success. Logged once per failing spell.
    failing: AtomicBool,
    /// Set by `close` when the grace period is over: the writer gives up retrying.
    abandon: AtomicBool,
    /// Set when the log is dropped without `close`: a failing writer stops retrying.
    orphaned: AtomicBool,
    /// Records accepted into the queue and not yet written.
    queued: AtomicUsize,
    /// Records counted against `capacity`: those queued and the places held for outcomes.
    held_records: AtomicUsize,
    /// Bytes counted against `max_bytes`: those of the records queued (until written) and of the
    /// places held for outcomes.
    held_bytes: AtomicUsize,
    capacity: usize,
    max_bytes: usize,
    /// When the write in progress began (ms since `epoch`), or 0.
    writing_since_ms: AtomicU64,
    epoch: Instant,
    metrics: Arc<Metrics>,
}

impl Core {
    /// Counts `records` and `bytes` into the queue's bounds, if they fit.
    fn admit(&self, records: usize, bytes: usize) -> bool {
        let before = self.held_records.fetch_add(records, Ordering::SeqCst);
        if before + records > self.capacity {
            self.held_records.fetch_sub(records, Ordering::SeqCst);
            return false;
        }
        let before = self.held_bytes.fetch_add(bytes, Ordering::SeqCst);
        if before + bytes > self.max_bytes {
            self.held_bytes.fetch_sub(bytes, Ordering::SeqCst);
            self.held_records.fetch_sub(records, Ordering::SeqCst);
            return false;
        }
        self.metrics.audit_queue_bytes(bytes as i64);
        true
    }

    fn release(&self, records: usize, bytes: usize) {
        self.held_records.fetch_sub(records, Ordering::SeqCst);
        self.held_bytes.fetch_sub(bytes, Ordering::SeqCst);
        self.metrics.audit_queue_bytes(-(bytes as i64));
    }

    /// Queues an admitted line (counted as `charge` bytes). A line queued while the sink fails is
    /// counted as a write failure now (once: the writer does not count it again).
    fn send(
        &self,
        queue: &Sender<Job>,
        line: Vec<u8>,
        charge: usize,
        done: Option<Done>,
    ) -> Result<(), AuditError> {
        self.queued.fetch_add(1, Ordering::SeqCst);
        let failing = self.failing.load(Ordering::SeqCst);
        if failing {
            self.metrics.audit_write_failure();
        }
        match queue.send(Job::Record(line, charge, done, failing)) {
            Ok(()) => {
                self.metrics.audit_queued(1);
                Ok(())
            }
            Err(_) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                self.release(1, charge);
                Err(AuditError::Closed)
            }
        }
    }
}

/// The place an outcome record holds in the queue, from its decision on: [`OutcomeSlot::write`]
/// never finds the queue full. Dropped unused, the place is given back.
pub struct OutcomeSlot {
    core: Arc<Core>,
    queue: Sender<Job>,
    held: bool,
}

impl std::fmt::Debug for OutcomeSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutcomeSlot")
            .field("held", &self.held)
            .finish()
    }
}

impl OutcomeSlot {
    /// Queues the outcome record in its place (never waits, never finds the queue full).
    pub fn write(mut self, record: &impl Serialize) -> Result<(), AuditError> {
        self.held = false;
        let line = encode(record);
        // The place becomes the record: its bytes as they are.
        let len = line.len();
        self.core.held_bytes.fetch_add(len, Ordering::SeqCst);
        self.core
            .held_bytes
            .fetch_sub(OUTCOME_RESERVE_BYTES, Ordering::SeqCst);
        self.core
            .metrics
            .audit_queue_bytes(len as i64 - OUTCOME_RESERVE_BYTES as i64);
        self.core.send(&self.queue, line, len, None)
    }
}

impl Drop for OutcomeSlot {
    fn drop(&mut self) {
        if self.held {
            self.core.release(1, OUTCOME_RESERVE_BYTES);
        }
    }
}

/// A record in the queue, to wait for with [`AuditLog::written`]; `None` when the sink was
/// failing as it was queued (nobody waits: it is written when the sink recovers).
pub struct Queued(Option<oneshot::Receiver<Result<(), String>>>);

pub struct AuditLog {
    queue: Sender<Job>,
    core: Arc<Core>,
    pub fail_closed: bool,
    stall_timeout: Duration,
    thread: Mutex<Option<JoinHandle<()>>>,
}

enum Sink {
    /// Standard output, written through its descriptor (never buffered, never closed).
    Stdout(ManuallyDrop<File>),
    File(File),
}

impl Sink {
    /// The file, where the chain reads where it goes on (not standard output).
    fn file(&self) -> Option<&File> {
        match self {
            Sink::Stdout(_) => None,
            Sink::File(file) => Some(file),
        }
    }
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
        let sink = open_sink(&config.path, false)?;
        // The chain goes on from the file's last line, or starts (crate::integrity::chain).
        let mut batch = Vec::with_capacity(16 * 1024);
        let mut seal = Sealer::new(config)?;
        seal.begin(sink.file(), &mut batch);
        let (queue, jobs) = mpsc::channel();
        let core = Arc::new(Core {
            stalled: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            orphaned: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            held_records: AtomicUsize::new(0),
            held_bytes: AtomicUsize::new(0),
            capacity: config.queue_capacity,
            max_bytes: config.queue_max_bytes,
            writing_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics,
        });
        let writer = Writer {
            sink,
            path: config.path.clone(),
            fsync: config.fsync,
            core: Arc::clone(&core),
            batch,
            seal,
            written: 0,
            records: 0,
            charged: 0,
            uncounted: 0,
            waiting: Vec::new(),
            retry: RETRY_FIRST,
        };
        let thread = std::thread::Builder::new()
            .name("ktg-audit".into())
            .spawn(move || writer.run(jobs))
            .map_err(|e| AuditError::Write(format!("cannot start the audit writer thread: {e}")))?;
        Ok(AuditLog {
            queue,
            core,
            fail_closed: config.fail_closed,
            stall_timeout: config.stall_timeout,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Writes one record and waits until it is written (and flushed or fsynced), at most
    /// `stall_timeout_ms`. `Err(Stalled)` or `Err(Failing)` after the record was queued means it
    /// is written later.
    pub async fn write(&self, record: &impl Serialize) -> Result<(), AuditError> {
        self.write_holding(record, false).await.0
    }

    /// [`AuditLog::write`], and when `outcome` is set and the record was admitted into the queue
    /// (whether or not it was written in time), the place held for the outcome record to come.
    /// A record that is admitted is written, sooner or later: its outcome must follow it.
    pub async fn write_holding(
        &self,
        record: &impl Serialize,
        outcome: bool,
    ) -> (Result<(), AuditError>, Option<OutcomeSlot>) {
        match self.queue_holding(record, outcome) {
            Ok((queued, slot)) => (self.written(queued).await, slot),
            Err(error) => (Err(error), None),
        }
    }

    /// Queues one record, holding the place of the outcome record to come when `outcome` is set;
    /// [`AuditLog::written`] waits for it. `Err` when the record is not in the queue (full, or
    /// closed).
    pub fn queue_holding(
        &self,
        record: &impl Serialize,
        outcome: bool,
    ) -> Result<(Queued, Option<OutcomeSlot>), AuditError> {
        let line = encode(record);
        let len = line.len();
        let (records, bytes) = if outcome {
            (2, len + OUTCOME_RESERVE_BYTES)
        } else {
            (1, len)
        };
        if !self.core.admit(records, bytes) {
            self.core.metrics.audit_write_failure();
            self.note_stall("the audit queue is full");
            return Err(AuditError::Stalled(self.stall_timeout.as_millis()));
        }
        let slot = outcome.then(|| OutcomeSlot {
            core: Arc::clone(&self.core),
            queue: self.queue.clone(),
            held: true,
        });
        if self.core.failing.load(Ordering::SeqCst) {
            // The writer retries the sink on its own; nobody waits for it meanwhile.
            self.core.send(&self.queue, line, len, None)?;
            return Ok((Queued(None), slot));
        }
        let (done, written) = oneshot::channel();
        self.core.send(&self.queue, line, len, Some(done))?;
        Ok((Queued(Some(written)), slot))
    }

    /// Waits until a queued record is written (and flushed or fsynced), at most
    /// `stall_timeout_ms`. `Err(Stalled)` or `Err(Failing)` mean it is written later.
    pub async fn written(&self, queued: Queued) -> Result<(), AuditError> {
        let Some(written) = queued.0 else {
            return Err(AuditError::Failing);
        };
        match tokio::time::timeout(self.stall_timeout, written).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(_))) => Err(AuditError::Failing),
            Ok(Err(_)) => Err(AuditError::Closed),
            Err(_) => {
                self.note_stall("a record was not written within stall_timeout_ms");
                Err(AuditError::Stalled(self.stall_timeout.as_millis()))
            }
        }
    }

    /// Queues one record without waiting for it. Never blocks; a record the full queue cannot
    /// take is counted as a write failure.
    pub fn write_detached(&self, record: &impl Serialize) -> Result<(), AuditError> {
        let line = encode(record);
        let len = line.len();
        if !self.core.admit(1, len) {
            self.core.metrics.audit_write_failure();
            self.note_stall("the audit queue is full");
            return Err(AuditError::Stalled(self.stall_timeout.as_millis()));
        }
        self.core.send(&self.queue, line, len, None)
    }

    /// Whether the sink is failing now (its last write failed).
    pub fn failing(&self) -> bool {
        self.core.failing.load(Ordering::SeqCst)
    }

    /// Marks the sink stalled, logging it once per stall.
    fn note_stall(&self, why: &str) {
        if !self.core.stalled.swap(true, Ordering::SeqCst) {
            let writing_for = self.writing_for();
            error!(
                why,
                queued = self.core.queued.load(Ordering::SeqCst),
                queued_bytes = self.core.held_bytes.load(Ordering::SeqCst),
                writing_for_ms = writing_for.map(|d| d.as_millis() as u64),
                "the audit log is stalled: tag changes are refused (503) until it writes again; traffic that changes no tags is not affected"
            );
            self.core.metrics.audit_stalled(true);
        }
    }

    /// How long the write in progress has been going on, if one is.
    fn writing_for(&self) -> Option<Duration> {
        match self.core.writing_since_ms.load(Ordering::SeqCst) {
            0 => None,
            since => Some(
                self.core
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
        if self.queue.send(Job::Reopen(done)).is_err() {
            return Err(AuditError::Closed);
        }
        match tokio::time::timeout(self.stall_timeout, reopened).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(message))) => Err(AuditError::Write(message)),
            Ok(Err(_)) => Err(AuditError::Closed),
            Err(_) => Err(AuditError::Stalled(self.stall_timeout.as_millis())),
        }
    }

    /// Writes everything queued, then stops the writer; waits at most `within`. Returns how
    /// many records were still not written then (0 unless the sink is stalled or failing).
    pub async fn close(&self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        let _ = self.queue.send(Job::Stop);
        loop {
            let finished = self
                .thread
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_none_or(JoinHandle::is_finished);
            if finished {
                if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = thread.join();
                }
                // Records queued after the writer ended (none, unless a connection outlived
                // the grace period) are not written.
                return self.core.queued.load(Ordering::SeqCst);
            }
            if tokio::time::Instant::now() >= deadline {
                // A failing sink is given up on; a write blocked in the kernel cannot be.
                self.core.abandon.store(true, Ordering::SeqCst);
                let left = self.core.queued.load(Ordering::SeqCst);
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

impl Drop for AuditLog {
    fn drop(&mut self) {
        // The queue closes with it: the writer writes what is queued and ends, or, failing,
        // gives up.
        self.core.orphaned.store(true, Ordering::SeqCst);
    }
}

/// The writer thread: owns the sink, writes what is queued in order, a batch at a time.
struct Writer {
    sink: Sink,
    path: AuditPath,
    fsync: bool,
    core: Arc<Core>,
    /// The batch being written: whole lines, sealed.
    batch: Vec<u8>,
    /// The hash chain through every line written, and its signed checkpoints.
    seal: Sealer,
    /// How many bytes of `batch` the sink has taken (only ever between 0 and the batch's length
    /// while a sink that cannot be rolled back fails).
    written: usize,
    /// Records in `batch`, and the bytes they are counted for in the queue.
    records: usize,
    charged: usize,
    /// Records in `batch` not yet counted as write failures.
    uncounted: usize,
    /// Who waits for the records of `batch` (told at the first failure or at success).
    waiting: Vec<Done>,
    /// The wait before the next retry after a failure.
    retry: Duration,
}

impl Writer {
    fn run(mut self, jobs: Receiver<Job>) {
        let mut stopping = false;
        loop {
            if self.core.abandon.load(Ordering::SeqCst) {
                return;
            }
            if self.records == 0 {
                // After `Stop`, what is still in the queue (a request that finished meanwhile,
                // an outcome written as the connections closed) is written too; the writer ends
                // once the queue is empty.
                let next = if stopping {
                    jobs.try_recv().ok()
                } else if let Some(due) = self.seal.checkpoint_due_in() {
                    // Idle with records no checkpoint signs yet: wake to sign them.
                    match jobs.recv_timeout(due) {
                        Ok(job) => Some(job),
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            // Retried like a batch of records until the sink takes it.
                            if self.seal.checkpoint(&mut self.batch) {
                                while !self.write_batch() {
                                    if self.core.orphaned.load(Ordering::SeqCst)
                                        || self.core.abandon.load(Ordering::SeqCst)
                                    {
                                        return;
                                    }
                                    self.wait_to_retry();
                                }
                            }
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => None,
                    }
                } else {
                    jobs.recv().ok()
                };
                let Some(job) = next else {
                    // The last lines are signed as the writer stops.
                    if self.seal.checkpoint(&mut self.batch) {
                        self.write_batch();
                    }
                    return;
                };
                self.take(job, &mut stopping);
            }
            while self.records > 0 && self.records < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => self.take(job, &mut stopping),
                    Err(_) => break,
                }
            }
            if self.records > 0 && !self.write_batch() {
                if self.core.orphaned.load(Ordering::SeqCst) {
                    return;
                }
                self.wait_to_retry();
            }
        }
    }

    fn take(&mut self, job: Job, stopping: &mut bool) {
        match job {
            Job::Record(line, charge, done, counted) => {
                self.seal.seal(&line, &mut self.batch);
                self.records += 1;
                self.uncounted += usize::from(!counted);
                self.charged += charge;
                self.waiting.extend(done);
            }
            Job::Reopen(done) => {
                // What came before goes to the old file (one try: a failing batch follows the
                // path to the new file, whole).
                if self.records > 0 {
                    self.write_batch();
                }
                let reopened = open_sink(&self.path, false).map(|sink| self.sink = sink);
                if reopened.is_ok() {
                    // The chain goes on in the new file (a chain_start names a last line the
                    // proxy did not write).
                    self.seal.begin(self.sink.file(), &mut self.batch);
                }
                let _ = done.send(reopened.map_err(|e| e.to_string()));
            }
            Job::Stop => *stopping = true,
        }
    }

    /// Writes the rest of the batch, flushes or fsyncs it, and tells whoever waits. `false`
    /// when the sink failed: the batch is kept, rolled back (a file) or with `written` saying
    /// how much of it is out.
    fn write_batch(&mut self) -> bool {
        let since = self.core.epoch.elapsed().as_millis().max(1) as u64;
        self.core.writing_since_ms.store(since, Ordering::SeqCst);
        let result = self.write_out();
        self.core.writing_since_ms.store(0, Ordering::SeqCst);
        match result {
            Ok(()) => {
                self.done();
                true
            }
            Err(error) => {
                self.failed(&error);
                false
            }
        }
    }

    fn write_out(&mut self) -> io::Result<()> {
        let file: &mut File = match &mut self.sink {
            Sink::Stdout(out) => out,
            Sink::File(file) => file,
        };
        while self.written < self.batch.len() {
            match file.write(&self.batch[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.fsync {
            if let Sink::File(file) = &self.sink {
                file.sync_data()?;
            }
        }
        Ok(())
    }

    /// The batch is written: the queue gives back its room, and whoever waits is told.
    fn done(&mut self) {
        let records = std::mem::take(&mut self.records);
        self.core.queued.fetch_sub(records, Ordering::SeqCst);
        self.core
            .release(records, std::mem::take(&mut self.charged));
        self.core.metrics.audit_queued(-(records as i64));
        self.batch.clear();
        if self.batch.capacity() > KEPT_BUFFER {
            self.batch = Vec::with_capacity(16 * 1024);
        }
        self.written = 0;
        self.uncounted = 0;
        self.retry = RETRY_FIRST;
        if self.core.failing.swap(false, Ordering::SeqCst) {
            info!("the audit log takes writes again: every record held meanwhile is written; tag changes are forwarded again");
            self.core.metrics.audit_failed(false);
        }
        if self.core.stalled.swap(false, Ordering::SeqCst) {
            info!("the audit log writes again; tag changes are forwarded again");
            self.core.metrics.audit_stalled(false);
        }
        for done in self.waiting.drain(..) {
            let _ = done.send(Ok(()));
        }
    }

    /// The sink failed: the batch is rolled back where it can be, kept for the next try, and
    /// whoever waits is told now.
    fn failed(&mut self, error: &io::Error) {
        if let Sink::File(file) = &self.sink {
            // Opened for append and written by this thread only: the batch's bytes are the last
            // `written` of the file. A file that cannot be cut back keeps the partial line, which
            // the next try completes.
            let cut = file.metadata().ok().filter(|m| m.is_file()).and_then(|m| {
                let to = m.len().checked_sub(self.written as u64)?;
                file.set_len(to).ok()
            });
            if cut.is_some() {
                self.written = 0;
            }
        }
        for _ in 0..std::mem::take(&mut self.uncounted) {
            self.core.metrics.audit_write_failure();
        }
        if !self.core.failing.swap(true, Ordering::SeqCst) {
            error!(
                %error,
                records = self.records,
                "audit records could not be written: tag changes are refused (503, with fail_closed) until the sink takes writes again; the records are kept and written then (retrying)"
            );
            self.core.metrics.audit_failed(true);
        }
        for done in self.waiting.drain(..) {
            let _ = done.send(Err(error.to_string()));
        }
    }

    /// Waits before the next try (less if the grace period ends meanwhile), then reopens a
    /// file whose batch was rolled back, so that a file removed, rotated or remounted is
    /// written again at its path.
    fn wait_to_retry(&mut self) {
        let until = Instant::now() + self.retry;
        while Instant::now() < until && !self.core.abandon.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10).min(self.retry));
        }
        self.retry = (self.retry * 2).min(RETRY_MAX);
        if self.written == 0 && matches!(self.path, AuditPath::File(_)) {
            if let Ok(sink) = open_sink(&self.path, true) {
                self.sink = sink;
            }
        }
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
    if let Ok(meta) = std::fs::metadata(file) {
        // A FIFO or a device (a log shipper's pipe, /dev/stdout) is opened when serving starts;
        // opening one here could wait for a reader.
        if !meta.is_file() {
            return if meta.is_dir() {
                Err(failed(io::Error::new(
                    io::ErrorKind::IsADirectory,
                    format!("{} is a directory; name a file in it", file.display()),
                )))
            } else {
                Ok(())
            };
        }
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

/// Opens the sink. `nonblocking_open`: a FIFO without a reader is an error rather than a wait
/// (the writer's retries must not hang in `open`); writes stay blocking.
fn open_sink(path: &AuditPath, nonblocking_open: bool) -> Result<Sink, AuditError> {
    match path {
        AuditPath::Stdout => {
            // SAFETY: descriptor 1 is open for the life of the process; ManuallyDrop never
            // closes it.
            Ok(Sink::Stdout(ManuallyDrop::new(unsafe {
                File::from_raw_fd(1)
            })))
        }
        AuditPath::File(path) => {
            let mut options = OpenOptions::new();
            options.create(true).append(true);
            if nonblocking_open {
                options.custom_flags(libc::O_NONBLOCK);
            }
            let file = options.open(path).map_err(|source| AuditError::Open {
                path: path.display().to_string(),
                source,
            })?;
            if nonblocking_open {
                clear_nonblocking(&file);
            }
            Ok(Sink::File(file))
        }
    }
}

fn clear_nonblocking(file: &File) {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function's caller owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
}

/// How many characters of each listed item a summary shows.
const SUMMARY_ITEM_CHARS: usize = 256;
/// What the last resort keeps: this many members, their names and strings cut to these lengths.
const LAST_RESORT_MEMBERS: usize = 32;
const LAST_RESORT_NAME_CHARS: usize = 64;
const LAST_RESORT_STRING_CHARS: usize = 128;

/// A record as one line: JSON, with U+2028, U+2029 and U+0085 escaped (serde_json writes them
/// raw, and some line readers split lines there), ending in `\n`, at most [`MAX_RECORD_BYTES`]
/// with its `\n` whatever the record holds.
///
/// A record over the bound is replaced by a summary of it (its lists cut to three items of at
/// most 256 characters each, and counted), and a summary still over it by the last resort (its
/// first 32 members, strings cut to 128 characters, lists counted, objects left out). A character
/// takes at most 6 bytes in a line (`\u0085` for the 2 bytes of U+0085, `\u0001` for a control
/// character), so the last resort is at most 32 × (64 + 128 + 40) × 6 bytes, under 45 KiB, for
/// any record; with the bounds `crate::record` puts on every string, a summary is under 30 KiB.
pub(crate) fn encode(record: &impl Serialize) -> Vec<u8> {
    let mut line = Vec::with_capacity(1024);
    serde_json::to_writer(&mut line, record).expect("audit records serialise");
    let mut line = escape_line_separators(line);
    // Room for the chain's seq and prev (crate::integrity), spliced in by the writer.
    let max = MAX_RECORD_BYTES - crate::integrity::SEAL_MAX_BYTES;
    if line.len() >= max {
        let value = serde_json::to_value(record).expect("audit records serialise");
        line = to_line(&summary(value.clone()));
        if line.len() >= max {
            line = to_line(&last_resort(value));
        }
    }
    line.push(b'\n');
    line
}

/// A JSON value as a line without its `\n`, line separators escaped.
fn to_line(value: &serde_json::Value) -> Vec<u8> {
    let mut line = Vec::with_capacity(4096);
    serde_json::to_writer(&mut line, value).expect("a JSON value serialises");
    escape_line_separators(line)
}

/// The record with its lists cut to their first three items, each as its JSON text cut to
/// [`SUMMARY_ITEM_CHARS`] characters; `"<list>_listed_in_summary"` counts them, and
/// `"summarised": true`.
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
                        serde_json::Value::String(bounded(&text, SUMMARY_ITEM_CHARS).into_owned())
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

/// The record's first [`LAST_RESORT_MEMBERS`] members: names and strings cut, lists counted
/// (`"<list>_listed_in_summary"`), objects left out; `"summarised": true`.
fn last_resort(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let mut out = serde_json::Map::new();
    if let Value::Object(object) = value {
        for (name, member) in object.into_iter().take(LAST_RESORT_MEMBERS) {
            let name = bounded(&name, LAST_RESORT_NAME_CHARS).into_owned();
            match member {
                Value::String(text) => {
                    let text = bounded(&text, LAST_RESORT_STRING_CHARS).into_owned();
                    out.insert(name, Value::String(text));
                }
                Value::Array(items) => {
                    out.insert(format!("{name}_listed_in_summary"), items.len().into());
                }
                Value::Object(_) => {}
                scalar => {
                    out.insert(name, scalar);
                }
            }
        }
    }
    out.insert("summarised".into(), true.into());
    Value::Object(out)
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
            queue_max_bytes: crate::config::DEFAULT_AUDIT_QUEUE_MAX_BYTES,
            signing_key: None,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(60),
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
        // Each line sealed (crate::integrity::chain): its seq and the hash of the line before,
        // then the record as it was serialised.
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let mut prev = crate::integrity::GENESIS;
        for (seq, line) in lines.iter().enumerate() {
            let (s, p) = crate::integrity::chain::parse_seal(line.as_bytes()).unwrap();
            assert_eq!((s, p), (seq as u64, prev), "{line}");
            prev = crate::integrity::line_hash(line.as_bytes());
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
        let seal = |line: &str| line.find("\",\"").unwrap() + 2;
        assert_eq!(
            lines.iter().map(|l| &l[seal(l)..]).collect::<String>(),
            "\"a\":1}\n\"b\":\"x\\ny\"}\n\"c\":\"\\u2028\\u2029\\u0085é\"}\n"
        );

        let full = AuditLog::open(
            &config(AuditPath::File("/dev/full".into()), false),
            Arc::default(),
        )
        .unwrap();
        assert!(matches!(
            full.write(&serde_json::json!({})).await,
            Err(AuditError::Failing)
        ));
        assert!(full.failing());
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
