//! The audit log: one JSON line per decision and per outcome of every tag-bearing request.
//!
//! Records are written by one writer thread of their own, fed by a queue bounded in records
//! (`queue_capacity`) and in bytes (`queue_max_bytes`), or, when nothing waits, by the thread that
//! makes them with a write that cannot wait (below), so that a slow, stalled or failed sink (a
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
//!
//! **Written on the calling thread when nothing waits.** A record that finds the writer idle
//! (nothing queued, nothing being written, the sink not failing) is written by the thread that
//! makes it, under the writer's lock, which request paths only ever try (`try_lock`): no hand-off
//! to the writer thread, no wake-up back. It is a write that cannot wait: on sinks that support
//! it, `pwritev2` with `RWF_NOWAIT` (Linux 6.18 refuses it on pipes and on ext4 and tmpfs files), and what the sink does not take at once is left to the writer thread; on a
//! regular file of a local file system that cannot say so (ext4), a plain append to the page
//! cache, and one that takes longer than [`SLOW_DIRECT`] sends every record through the writer
//! thread for [`DIRECT_PAUSE`]. With `fsync = true`, on network file systems, FUSE, terminals and
//! devices, every record goes through the writer thread. Whoever writes, a line joins the batch at
//! one place ([`Writer::append`]) under the lock, so the order of the file is the order lines are
//! appended in.
//!
//! **An outcome record costs no write of its own.** Nobody waits for it, so when the writer is
//! idle it is sealed into the batch and left there ([`Core::append_lazy`]): the next write
//! carries it ahead of its own line, whoever makes it (usually the next decision record), and
//! when none comes the writer thread writes it [`OUTCOME_WRITE_WITHIN`] later. The writer thread
//! watches for such records with a timer while they come, so no request path wakes it for one;
//! after [`LAZY_QUIET`] without any it sleeps without a timer, and the next one wakes it. One that
//! finds the lock taken (another thread writing) waits on a list for the next line appended
//! ([`Core::defer`]), within twice that time. Held in memory, such a record is lost if the
//! process is killed meanwhile, like a record in the queue.
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
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::oneshot;
use tracing::{debug, error, info};

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
/// A write on the calling thread to a sink that cannot refuse to wait (a regular file of a local
/// file system without `RWF_NOWAIT`) that takes longer than this ...
pub const SLOW_DIRECT: Duration = Duration::from_millis(1);
/// ... sends every record through the writer thread for this long.
pub const DIRECT_PAUSE: Duration = Duration::from_secs(1);
/// An outcome record joins the batch without a write of its own ([`Core::append_lazy`]): the
/// next write carries it, whoever makes it, and when none comes the writer thread writes it this
/// long after it was appended (plus the time the thread takes to wake).
pub const OUTCOME_WRITE_WITHIN: Duration = Duration::from_millis(2);
/// The writer thread watches for such records with a timer (no request path wakes it) until none
/// came for this long; then it sleeps without one, and the next such record wakes it.
const LAZY_QUIET: Duration = Duration::from_millis(50);

/// How records may be written on the calling thread, for the sink open now.
const DIRECT_UNKNOWN: u8 = 0;
/// `pwritev2` with `RWF_NOWAIT`: the sink says when it would wait.
const DIRECT_NOWAIT: u8 = 1;
/// A plain append: a regular file of a local file system that does not take `RWF_NOWAIT`.
const DIRECT_APPEND: u8 = 2;
/// Never: every record goes through the writer thread.
const DIRECT_NEVER: u8 = 3;

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
    /// A record written on a request path left part of the batch for the writer thread.
    Kick,
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
    /// When the write in progress began (ms since `epoch`), or 0. Only the stall log line reads
    /// it: relaxed, so that marking every write costs no fence.
    writing_since_ms: AtomicU64,
    epoch: Instant,
    metrics: Arc<Metrics>,
    /// The sink and the batch: the writer thread locks it to write; a request path only tries
    /// to, and queues its record when it cannot have it at once.
    writer: Mutex<Writer>,
    /// How a request path may write to the sink open now (`DIRECT_*`).
    direct: AtomicU8,
    /// Until when (ms since `epoch`) no record is written on a request path: the last such
    /// write was slow.
    direct_paused_until_ms: AtomicU64,
    /// Reopens asked for and not yet done: records go through the queue meanwhile, after them.
    reopens: AtomicUsize,
    /// Set (under the lock) while the writer thread sleeps without a timer: a request path that
    /// leaves an outcome record in the batch wakes it (`Job::Kick`). Otherwise no request path
    /// wakes it for such a record: it looks at least every [`OUTCOME_WRITE_WITHIN`].
    writer_asleep: AtomicBool,
    /// Outcome records appended without a write, ever: the writer thread keeps its timer while
    /// this moves.
    lazy_appends: AtomicU64,
    /// Outcome records that found the writer's lock taken ([`Core::defer`]): the next line
    /// appended, whoever appends it, is appended after them. `deferred_count` says how many,
    /// without the lock.
    deferred: Mutex<Deferred>,
    deferred_count: AtomicUsize,
}

/// Outcome records waiting to join the batch, and when the first of them came.
#[derive(Default)]
struct Deferred {
    lines: Vec<(Vec<u8>, usize)>,
    since: Option<Instant>,
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

    /// Writes an admitted line on the calling thread when the writer is idle: nothing queued,
    /// nothing being written, the sink not failing, no reopen pending (module docs). `None` when
    /// it is not: queue it. `Some(Ok(Queued))`: written, or left in the batch for the writer
    /// thread (which tells the waiter when `wait`), or failed (the writer thread retries it).
    fn write_direct(
        &self,
        queue: &Sender<Job>,
        line: &[u8],
        charge: usize,
        wait: bool,
    ) -> Option<Result<Queued, AuditError>> {
        let mode = self.direct.load(Ordering::Relaxed);
        if mode == DIRECT_NEVER
            || self.failing.load(Ordering::SeqCst)
            || self.reopens.load(Ordering::SeqCst) != 0
        {
            return None;
        }
        if mode == DIRECT_APPEND {
            let paused = self.direct_paused_until_ms.load(Ordering::Relaxed);
            if paused != 0 && (self.epoch.elapsed().as_millis() as u64) < paused {
                return None;
            }
        }
        let (mut writer, arm) = self.append_if_idle(line, charge)?;
        match writer.write_batch(self, true) {
            Written::Whole => {
                drop(writer);
                if arm {
                    let _ = queue.send(Job::Kick);
                }
                Some(Ok(Queued(Wait::Written)))
            }
            Written::Failed => {
                drop(writer);
                // The writer thread retries it, with its back-off.
                let _ = queue.send(Job::Kick);
                Some(Ok(Queued(Wait::Failing)))
            }
            Written::Partly => {
                let waiting = wait.then(|| {
                    let (done, written) = oneshot::channel();
                    writer.waiting.push(done);
                    written
                });
                drop(writer);
                if queue.send(Job::Kick).is_err() {
                    return Some(Err(AuditError::Closed));
                }
                Some(Ok(Queued(match waiting {
                    Some(written) => Wait::Waiting(written),
                    None => Wait::Written,
                })))
            }
        }
    }
}

impl Core {
    /// Appends an admitted line to the batch when its lock is free and the writer idle
    /// ([`Core::idle`]): the lock, and whether the writer thread's checkpoint timer is to be
    /// armed. `None`: queue the line. The lock is never waited for: another request path
    /// writing, or the writer thread, has it. (Spinning for another request path's write was
    /// tried: on this 2-CPU machine, shared with the load generator, the holder was often not
    /// running, and 3 times as many records went through the writer thread;
    /// docs/performance.md.)
    fn append_if_idle(&self, line: &[u8], charge: usize) -> Option<(MutexGuard<'_, Writer>, bool)> {
        let mut writer = self.writer.try_lock().ok()?;
        // Under the lock: nothing queued (a record queued meanwhile goes first) and nothing being
        // written, but outcome records left in the batch ([`Core::append_lazy`], [`Core::defer`]),
        // which the next write carries ahead of this line.
        writer.take_deferred(self);
        if !self.idle(&writer) {
            return None;
        }
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.metrics.audit_queued(1);
        // The first line no checkpoint signs yet arms the writer thread's checkpoint timer: it
        // sleeps on the queue, so it is told (once per checkpoint, not once per record).
        let armed = writer.seal.checkpoint_due_in().is_some();
        writer.append(self, line, charge, None, false);
        let arm = !armed && writer.seal.checkpoint_due_in().is_some();
        Some((writer, arm))
    }

    /// Whether a request path may add to the batch (under the lock): every record in it is an
    /// outcome left there without a write, none is in the queue, the sink is open and not
    /// failing, and no reopen waits.
    fn idle(&self, writer: &Writer) -> bool {
        writer.records == writer.lazy
            && writer.written == 0
            && self.queued.load(Ordering::SeqCst) == writer.lazy
            && !matches!(writer.sink, Sink::Closed)
            && !self.failing.load(Ordering::SeqCst)
            && self.reopens.load(Ordering::SeqCst) == 0
    }

    /// Leaves an admitted outcome record whose decision is written for the next line appended,
    /// when the writer's lock is taken (another thread writing): no hand-off to the writer
    /// thread, no wake-up, unless it sleeps without a timer. `false` when the sink fails or a
    /// reopen waits: queue it.
    fn defer(&self, queue: &Sender<Job>, line: Vec<u8>, charge: usize) -> Result<(), Vec<u8>> {
        if self.failing.load(Ordering::SeqCst) || self.reopens.load(Ordering::SeqCst) != 0 {
            return Err(line);
        }
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.metrics.audit_queued(1);
        {
            let mut deferred = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
            deferred.lines.push((line, charge));
            deferred.since.get_or_insert_with(Instant::now);
            self.deferred_count.fetch_add(1, Ordering::SeqCst);
        }
        // The writer thread sets `writer_asleep`, then looks at `deferred_count`: either it sees
        // this record, or this sees it asleep.
        if self.writer_asleep.load(Ordering::SeqCst) {
            let _ = queue.send(Job::Kick);
        }
        Ok(())
    }

    /// Appends an admitted outcome record to the batch without writing it: the next write
    /// carries it, whoever makes it (the next decision record, which is written before its
    /// request goes on anyway), or the writer thread [`OUTCOME_WRITE_WITHIN`] later. `false`
    /// when the writer is not idle ([`Core::idle`], or its lock is taken): queue it.
    fn append_lazy(&self, queue: &Sender<Job>, line: &[u8], charge: usize) -> bool {
        if self.failing.load(Ordering::SeqCst) || self.reopens.load(Ordering::SeqCst) != 0 {
            return false;
        }
        let Some((mut writer, arm)) = self.append_if_idle(line, charge) else {
            return false;
        };
        writer.lazy += 1;
        writer.lazy_since.get_or_insert_with(Instant::now);
        self.lazy_appends.fetch_add(1, Ordering::Relaxed);
        // Read under the lock, which the writer thread holds when it decides to sleep without a
        // timer: either it sees this record, or this sees it asleep.
        let kick = self.writer_asleep.load(Ordering::SeqCst) || arm;
        drop(writer);
        if kick {
            let _ = queue.send(Job::Kick);
        }
        true
    }
}

/// What one try at writing the batch did.
#[derive(Debug, PartialEq, Eq)]
enum Written {
    /// The whole batch, flushed or fsynced; whoever waited is told.
    Whole,
    /// A write on a request path that would have waited: the rest is the writer thread's.
    Partly,
    /// The sink failed: the batch is rolled back where it can be and kept; whoever waited is told.
    Failed,
}

/// The place an outcome record holds in the queue, from its decision on: [`OutcomeSlot::write`]
/// never finds the queue full. Dropped unused, the place is given back.
pub struct OutcomeSlot {
    core: Arc<Core>,
    queue: Sender<Job>,
    held: bool,
    /// Its decision record is written ([`OutcomeSlot::decision_written`]): the outcome may be
    /// deferred, as nothing of its request waits unwritten before it.
    after_written: bool,
}

impl std::fmt::Debug for OutcomeSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutcomeSlot")
            .field("held", &self.held)
            .finish()
    }
}

impl OutcomeSlot {
    /// Queues the outcome record in its place (never waits, never finds the queue full): left in
    /// the batch for the next write when the writer is idle ([`Core::append_lazy`]), else queued.
    pub fn write(mut self, record: &impl Record) -> Result<(), AuditError> {
        self.held = false;
        let line = encode(record);
        // The place becomes the record: its bytes as they are.
        let len = line.len();
        // One update of the shared count (`crate::record` bounds an outcome to fit its place;
        // one that did not would still be counted right).
        match OUTCOME_RESERVE_BYTES.checked_sub(len) {
            Some(spare) => self.core.held_bytes.fetch_sub(spare, Ordering::SeqCst),
            None => self
                .core
                .held_bytes
                .fetch_add(len - OUTCOME_RESERVE_BYTES, Ordering::SeqCst),
        };
        self.core
            .metrics
            .audit_queue_bytes(len as i64 - OUTCOME_RESERVE_BYTES as i64);
        if self.core.append_lazy(&self.queue, &line, len) {
            return Ok(());
        }
        let line = if self.after_written {
            match self.core.defer(&self.queue, line, len) {
                Ok(()) => return Ok(()),
                Err(line) => line,
            }
        } else {
            line
        };
        self.core.send(&self.queue, line, len, None)
    }
}

impl OutcomeSlot {
    /// Its decision record is written: the outcome record may wait for the next line appended
    /// when the writer's lock is taken ([`Core::defer`]); before, it goes through the queue,
    /// behind its decision.
    pub fn decision_written(&mut self) {
        self.after_written = true;
    }
}

impl Drop for OutcomeSlot {
    fn drop(&mut self) {
        if self.held {
            self.core.release(1, OUTCOME_RESERVE_BYTES);
        }
    }
}

/// A record in the queue, to wait for with [`AuditLog::written`].
pub struct Queued(Wait);

enum Wait {
    /// Already written (on the calling thread).
    Written,
    /// Written when the writer thread says so.
    Waiting(oneshot::Receiver<Result<(), String>>),
    /// The sink was failing as it was queued, or failed as the calling thread wrote it: nobody
    /// waits, it is written when the sink recovers.
    Failing,
}

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
    /// The writer thread has ended: the file is closed (a reader of a FIFO sees its end), and
    /// nothing is written any more.
    Closed,
}

impl Sink {
    /// The file, where the chain reads where it goes on (not standard output).
    fn file(&self) -> Option<&File> {
        match self {
            Sink::Stdout(_) | Sink::Closed => None,
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
        let writer = Writer {
            sink,
            path: config.path.clone(),
            fsync: config.fsync,
            batch,
            seal,
            written: 0,
            records: 0,
            lazy: 0,
            lazy_since: None,
            charged: 0,
            uncounted: 0,
            waiting: Vec::new(),
            retry: RETRY_FIRST,
        };
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
            writer: Mutex::new(writer),
            direct: AtomicU8::new(if config.fsync {
                DIRECT_NEVER
            } else {
                DIRECT_UNKNOWN
            }),
            direct_paused_until_ms: AtomicU64::new(0),
            reopens: AtomicUsize::new(0),
            writer_asleep: AtomicBool::new(false),
            lazy_appends: AtomicU64::new(0),
            deferred: Mutex::default(),
            deferred_count: AtomicUsize::new(0),
        });
        let thread = std::thread::Builder::new()
            .name("ktg-audit".into())
            .spawn({
                let core = Arc::clone(&core);
                move || run(&core, jobs)
            })
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
    pub async fn write(&self, record: &impl Record) -> Result<(), AuditError> {
        self.write_holding(record, false).await.0
    }

    /// [`AuditLog::write`], and when `outcome` is set and the record was admitted into the queue
    /// (whether or not it was written in time), the place held for the outcome record to come.
    /// A record that is admitted is written, sooner or later: its outcome must follow it.
    pub async fn write_holding(
        &self,
        record: &impl Record,
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
        record: &impl Record,
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
            after_written: false,
        });
        if self.core.failing.load(Ordering::SeqCst) {
            // The writer retries the sink on its own; nobody waits for it meanwhile.
            self.core.send(&self.queue, line, len, None)?;
            return Ok((Queued(Wait::Failing), slot));
        }
        if let Some(written) = self.core.write_direct(&self.queue, &line, len, true) {
            return Ok((written?, slot));
        }
        let (done, written) = oneshot::channel();
        self.core.send(&self.queue, line, len, Some(done))?;
        Ok((Queued(Wait::Waiting(written)), slot))
    }

    /// Waits until a queued record is written (and flushed or fsynced), at most
    /// `stall_timeout_ms`. `Err(Stalled)` or `Err(Failing)` mean it is written later.
    pub async fn written(&self, queued: Queued) -> Result<(), AuditError> {
        let written = match queued.0 {
            Wait::Written => return Ok(()),
            Wait::Failing => return Err(AuditError::Failing),
            Wait::Waiting(written) => written,
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
    pub fn write_detached(&self, record: &impl Record) -> Result<(), AuditError> {
        let line = encode(record);
        let len = line.len();
        if !self.core.admit(1, len) {
            self.core.metrics.audit_write_failure();
            self.note_stall("the audit queue is full");
            return Err(AuditError::Stalled(self.stall_timeout.as_millis()));
        }
        if let Some(written) = self.core.write_direct(&self.queue, &line, len, false) {
            return written.map(drop);
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
        match self.core.writing_since_ms.load(Ordering::Relaxed) {
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
        // Records made from now on go through the queue, after the reopen, to the new file.
        self.core.reopens.fetch_add(1, Ordering::SeqCst);
        if self.queue.send(Job::Reopen(done)).is_err() {
            self.core.reopens.fetch_sub(1, Ordering::SeqCst);
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

/// The sink and the batch being written, under [`Core::writer`]: the writer thread writes what
/// is queued, a batch at a time, in order; a request path writes its own record when it finds
/// the writer idle ([`Core::write_direct`]).
struct Writer {
    sink: Sink,
    path: AuditPath,
    fsync: bool,
    /// The batch being written: whole lines, sealed.
    batch: Vec<u8>,
    /// The hash chain through every line written, and its signed checkpoints.
    seal: Sealer,
    /// How many bytes of `batch` the sink has taken (between 0 and the batch's length while a
    /// sink that cannot be rolled back fails, or after a write on a request path that would have
    /// waited).
    written: usize,
    /// Records in `batch`, and the bytes they are counted for in the queue.
    records: usize,
    charged: usize,
    /// How many of `records` are outcome records left for the next write
    /// ([`Core::append_lazy`]), with no write tried since, and when the first of them came.
    lazy: usize,
    lazy_since: Option<Instant>,
    /// Records in `batch` not yet counted as write failures.
    uncounted: usize,
    /// Who waits for the records of `batch` (told at the first failure or at success).
    waiting: Vec<Done>,
    /// The wait before the next retry after a failure.
    retry: Duration,
}

/// The writer thread: waits for the queue, and writes what is in it, in order, a batch at a time;
/// closes the sink when it ends.
fn run(core: &Core, jobs: Receiver<Job>) {
    serve(core, jobs);
    core.writer.lock().unwrap_or_else(|e| e.into_inner()).sink = Sink::Closed;
}

fn serve(core: &Core, jobs: Receiver<Job>) {
    let mut stopping = false;
    // A batch that failed is retried until the sink takes it.
    let mut retrying = false;
    // Outcome records left in the batch (`Core::append_lazy`): how many had come when the writer
    // last looked, and when that number last moved.
    let mut seen = core.lazy_appends.load(Ordering::Relaxed);
    let mut active = Instant::now();
    loop {
        if core.abandon.load(Ordering::SeqCst) {
            return;
        }
        let mut writer = core.writer.lock().unwrap_or_else(|e| e.into_inner());
        writer.take_deferred(core);
        // Written now: records from the queue, outcome records left in the batch for long
        // enough, a checkpoint that came due, a batch that failed.
        let mut force = false;
        if !retrying && writer.records == writer.lazy && !writer.lazy_due(Instant::now()) {
            // After `Stop`, what is still in the queue (a request that finished meanwhile, an
            // outcome written as the connections closed) is written too; the writer ends once
            // the queue is empty.
            let next = if stopping {
                jobs.try_recv()
                    .map_err(|_| mpsc::RecvTimeoutError::Disconnected)
            } else {
                let now = Instant::now();
                let appended = core.lazy_appends.load(Ordering::Relaxed);
                if appended != seen {
                    seen = appended;
                    active = now;
                }
                // Outcome records in the batch: wake when they come due. Recently some: look
                // again within the bound, so that no request path has to wake this thread.
                let lazy = writer
                    .lazy_since
                    .map(|since| (since + OUTCOME_WRITE_WITHIN).saturating_duration_since(now));
                let watch =
                    (now.duration_since(active) < LAZY_QUIET).then_some(OUTCOME_WRITE_WITHIN);
                // Records no checkpoint signs yet (written here or on a request path): wake to
                // sign them in time.
                let wait = [lazy.or(watch), writer.seal.checkpoint_due_in()]
                    .into_iter()
                    .flatten()
                    .min();
                core.writer_asleep.store(wait.is_none(), Ordering::SeqCst);
                if wait.is_none() && core.deferred_count.load(Ordering::SeqCst) != 0 {
                    // Deferred as it decided to sleep: take it first.
                    core.writer_asleep.store(false, Ordering::SeqCst);
                    continue;
                }
                // Not held while waiting: a request path may write meanwhile.
                drop(writer);
                let next = match wait {
                    Some(wait) => jobs.recv_timeout(wait),
                    None => jobs
                        .recv()
                        .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                };
                core.writer_asleep.store(false, Ordering::SeqCst);
                writer = core.writer.lock().unwrap_or_else(|e| e.into_inner());
                next
            };
            match next {
                Ok(job) => {
                    writer.take(core, job, &mut stopping);
                    if writer.records == writer.lazy && !writer.lazy_due(Instant::now()) {
                        // A kick, a reopen, `Stop`: nothing to write yet.
                        continue;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Retried like a batch of records until the sink takes it.
                    let due = writer.seal.checkpoint_due_in().is_some_and(|d| d.is_zero());
                    force = due && writer.checkpoint();
                    if !force && !writer.lazy_due(Instant::now()) {
                        continue;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // The last lines are signed as the writer stops, and the outcome records
                    // left in the batch written.
                    writer.take_deferred(core);
                    if writer.checkpoint() || writer.records > 0 {
                        writer.write_batch(core, false);
                    }
                    return;
                }
            }
        }
        while writer.records > 0 && writer.records < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => writer.take(core, job, &mut stopping),
                Err(_) => break,
            }
        }
        if force || retrying || writer.records > 0 {
            retrying = writer.write_batch(core, false) != Written::Whole;
            if retrying {
                if core.orphaned.load(Ordering::SeqCst) {
                    return;
                }
                // Held while waiting: request paths queue their records behind the batch.
                writer.wait_to_retry(core);
            }
        }
    }
}

impl Writer {
    fn take(&mut self, core: &Core, job: Job, stopping: &mut bool) {
        match job {
            Job::Record(line, charge, done, counted) => {
                self.append(core, &line, charge, done, counted);
            }
            Job::Reopen(done) => {
                // What came before goes to the old file (one try: a failing batch follows the
                // path to the new file, whole).
                self.take_deferred(core);
                if self.records > 0 {
                    self.write_batch(core, false);
                }
                let reopened = open_sink(&self.path, false).map(|sink| self.set_sink(core, sink));
                if reopened.is_ok() {
                    // The chain goes on in the new file (a chain_start names a last line the
                    // proxy did not write).
                    self.seal.begin(self.sink.file(), &mut self.batch);
                }
                core.reopens.fetch_sub(1, Ordering::SeqCst);
                let _ = done.send(reopened.map_err(|e| e.to_string()));
            }
            Job::Kick => {}
            Job::Stop => *stopping = true,
        }
    }

    /// The one place a serialised record line joins the batch, whoever writes it (the writer
    /// thread or a request path), under the lock: the file's order is the order of these calls.
    /// Adds a signed checkpoint to the batch when records since the last one wait for one.
    fn checkpoint(&mut self) -> bool {
        self.seal.checkpoint(&mut self.batch)
    }

    fn append(
        &mut self,
        core: &Core,
        line: &[u8],
        charge: usize,
        done: Option<Done>,
        counted: bool,
    ) {
        // Outcome records deferred before this line was made go before it.
        self.take_deferred(core);
        self.seal_line(line, charge, done, counted);
    }

    /// Appends the deferred outcome records ([`Core::defer`]), left for the next write like
    /// those [`Core::append_lazy`] appends, their wait counted from when the first came.
    fn take_deferred(&mut self, core: &Core) {
        if core.deferred_count.load(Ordering::SeqCst) == 0 {
            return;
        }
        let deferred = {
            let mut deferred = core.deferred.lock().unwrap_or_else(|e| e.into_inner());
            core.deferred_count.store(0, Ordering::SeqCst);
            std::mem::take(&mut *deferred)
        };
        for (line, charge) in &deferred.lines {
            self.seal_line(line, *charge, None, false);
        }
        // A write under way (a batch partly written or failing) takes them with it; otherwise
        // they wait for the next write like the outcomes appended without one.
        if self.records == self.lazy + deferred.lines.len() {
            self.lazy += deferred.lines.len();
            if let Some(since) = deferred.since {
                self.lazy_since = Some(self.lazy_since.map_or(since, |s| s.min(since)));
            }
        }
        core.lazy_appends
            .fetch_add(deferred.lines.len() as u64, Ordering::Relaxed);
    }

    fn seal_line(&mut self, line: &[u8], charge: usize, done: Option<Done>, counted: bool) {
        // Sealed into the chain here, whoever writes: the order of the chain is the order of
        // the file (crate::integrity).
        self.seal.seal(line, &mut self.batch);
        self.records += 1;
        self.uncounted += usize::from(!counted);
        self.charged += charge;
        self.waiting.extend(done);
    }

    /// Whether outcome records left in the batch have waited [`OUTCOME_WRITE_WITHIN`].
    fn lazy_due(&self, now: Instant) -> bool {
        self.lazy_since
            .is_some_and(|since| now >= since + OUTCOME_WRITE_WITHIN)
    }

    /// A new sink: how a request path may write to it is found out again.
    fn set_sink(&mut self, core: &Core, sink: Sink) {
        self.sink = sink;
        if !self.fsync {
            core.direct.store(DIRECT_UNKNOWN, Ordering::Relaxed);
        }
    }

    /// Writes the rest of the batch, flushes or fsyncs it, and tells whoever waits. `direct`: on
    /// a request path, with a write that cannot wait (module docs). Unless [`Written::Whole`],
    /// the batch is kept: rolled back (a file) or with `written` saying how much of it is out.
    fn write_batch(&mut self, core: &Core, direct: bool) -> Written {
        // Whatever becomes of this write, its outcome records are no longer left for the next.
        self.lazy = 0;
        self.lazy_since = None;
        let started = core.epoch.elapsed();
        let since = started.as_millis().max(1) as u64;
        core.writing_since_ms.store(since, Ordering::Relaxed);
        let result = if direct {
            self.write_out_direct(core)
        } else {
            self.write_out()
        };
        core.writing_since_ms.store(0, Ordering::Relaxed);
        match result {
            Ok(()) => {
                if direct && core.direct.load(Ordering::Relaxed) == DIRECT_APPEND {
                    let took = core.epoch.elapsed().saturating_sub(started);
                    if took > SLOW_DIRECT {
                        let until = (core.epoch.elapsed() + DIRECT_PAUSE).as_millis() as u64;
                        core.direct_paused_until_ms.store(until, Ordering::Relaxed);
                        debug!(
                            took_us = took.as_micros() as u64,
                            "a write of the audit log on a request path was slow: records go through the writer thread for a while"
                        );
                    }
                }
                self.done(core);
                Written::Whole
            }
            Err(error) if direct && error.kind() == io::ErrorKind::WouldBlock => Written::Partly,
            Err(error) => {
                self.failed(core, &error);
                Written::Failed
            }
        }
    }

    fn write_out(&mut self) -> io::Result<()> {
        let file: &mut File = match &mut self.sink {
            Sink::Stdout(out) => out,
            Sink::File(file) => file,
            Sink::Closed => return Err(io::Error::other("the audit log is closed")),
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

    /// [`Writer::write_out`] on a request path: `pwritev2(RWF_NOWAIT)`, or a plain append to a
    /// regular file of a local file system that does not take it. `WouldBlock` when the sink
    /// would have made it wait (what is written stays written: `written` says how much).
    fn write_out_direct(&mut self, core: &Core) -> io::Result<()> {
        let fd = match &self.sink {
            Sink::Stdout(out) => out.as_raw_fd(),
            Sink::File(file) => file.as_raw_fd(),
            Sink::Closed => return Err(io::ErrorKind::WouldBlock.into()),
        };
        while self.written < self.batch.len() {
            let rest = &self.batch[self.written..];
            let mode = core.direct.load(Ordering::Relaxed);
            let result = match mode {
                DIRECT_UNKNOWN | DIRECT_NOWAIT => write_nowait(fd, rest),
                DIRECT_APPEND => self.write_out().map(|()| 0),
                _ => return Err(io::ErrorKind::WouldBlock.into()),
            };
            match result {
                Ok(0) if mode == DIRECT_APPEND => return Ok(()),
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    if mode == DIRECT_UNKNOWN {
                        core.direct.store(DIRECT_NOWAIT, Ordering::Relaxed);
                    }
                    self.written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) && mode == DIRECT_UNKNOWN => {
                    let next = if appends_without_waiting(fd) {
                        DIRECT_APPEND
                    } else {
                        DIRECT_NEVER
                    };
                    core.direct.store(next, Ordering::Relaxed);
                }
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    return Err(io::ErrorKind::WouldBlock.into())
                }
                Err(e) => return Err(e),
            }
        }
        // fsync is never done here (`DIRECT_NEVER` with `fsync = true`).
        Ok(())
    }

    /// The batch is written: the queue gives back its room, and whoever waits is told.
    fn done(&mut self, core: &Core) {
        let records = std::mem::take(&mut self.records);
        core.queued.fetch_sub(records, Ordering::SeqCst);
        core.release(records, std::mem::take(&mut self.charged));
        core.metrics.audit_queued(-(records as i64));
        self.batch.clear();
        if self.batch.capacity() > KEPT_BUFFER {
            self.batch = Vec::with_capacity(16 * 1024);
        }
        self.written = 0;
        self.uncounted = 0;
        self.retry = RETRY_FIRST;
        // Read first: a swap on every batch would write these shared flags each time.
        if core.failing.load(Ordering::SeqCst) && core.failing.swap(false, Ordering::SeqCst) {
            info!("the audit log takes writes again: every record held meanwhile is written; tag changes are forwarded again");
            core.metrics.audit_failed(false);
        }
        if core.stalled.load(Ordering::SeqCst) && core.stalled.swap(false, Ordering::SeqCst) {
            info!("the audit log writes again; tag changes are forwarded again");
            core.metrics.audit_stalled(false);
        }
        for done in self.waiting.drain(..) {
            let _ = done.send(Ok(()));
        }
    }

    /// The sink failed: the batch is rolled back where it can be, kept for the next try, and
    /// whoever waits is told now.
    fn failed(&mut self, core: &Core, error: &io::Error) {
        if let Sink::File(file) = &self.sink {
            // Opened for append and written under the lock only: the batch's bytes are the last
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
            core.metrics.audit_write_failure();
        }
        if !core.failing.swap(true, Ordering::SeqCst) {
            error!(
                %error,
                records = self.records,
                "audit records could not be written: tag changes are refused (503, with fail_closed) until the sink takes writes again; the records are kept and written then (retrying)"
            );
            core.metrics.audit_failed(true);
        }
        for done in self.waiting.drain(..) {
            let _ = done.send(Err(error.to_string()));
        }
    }

    /// Waits before the next try (less if the grace period ends meanwhile), then reopens a
    /// file whose batch was rolled back, so that a file removed, rotated or remounted is
    /// written again at its path.
    fn wait_to_retry(&mut self, core: &Core) {
        let until = Instant::now() + self.retry;
        while Instant::now() < until && !core.abandon.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10).min(self.retry));
        }
        self.retry = (self.retry * 2).min(RETRY_MAX);
        if self.written == 0 && matches!(self.path, AuditPath::File(_)) {
            if let Ok(sink) = open_sink(&self.path, true) {
                self.set_sink(core, sink);
            }
        }
    }
}

/// One `pwritev2` at the descriptor's position (an appending file: its end) that fails with
/// `EAGAIN` rather than wait, or with `EOPNOTSUPP` when the file cannot say so.
fn write_nowait(fd: std::os::fd::RawFd, bytes: &[u8]) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: one iovec over a live slice, read by the kernel during the call only.
    let n = unsafe { libc::pwritev2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Whether a request path may append to this descriptor with a plain write: a regular file of a
/// local file system (ext2/3/4, XFS, Btrfs, F2FS, tmpfs, overlayfs, ZFS), where an append goes to
/// the page cache. Network file systems and FUSE, where a write can wait on a server, are not.
fn appends_without_waiting(fd: std::os::fd::RawFd) -> bool {
    const LOCAL: [i64; 7] = [
        0xEF53,      // ext2, ext3, ext4
        0x5846_5342, // XFS
        0x9123_683E, // Btrfs
        0xF2F5_2010, // F2FS
        0x0102_1994, // tmpfs
        0x794C_7630, // overlayfs
        0x2FC1_2FC1, // ZFS
    ];
    // SAFETY: fstat and fstatfs fill the structs they are given for a descriptor we hold.
    unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut stat) != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return false;
        }
        let mut fs: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(fd, &mut fs) != 0 {
            return false;
        }
        LOCAL.contains(&(fs.f_type as i64))
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
pub(crate) fn encode(record: &impl Record) -> Vec<u8> {
    let mut line = Vec::with_capacity(1024);
    record.write_json(&mut line);
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

/// What the audit log writes: a record serialised as compact JSON.
pub trait Record: Serialize {
    /// Appends the record as compact JSON, byte for byte what `serde_json::to_writer` writes.
    /// The records written per request write themselves (`crate::record`): serde_json spends
    /// most of an inspected request's encoding in escaping member names and short strings.
    fn write_json(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(out, self).expect("audit records serialise");
    }
}

impl Record for serde_json::Value {}

/// Appends `"name":`; the name needs no escaping (a member name of a record type).
pub fn json_name(out: &mut Vec<u8>, name: &str) {
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// Appends `text` as a JSON string, escaped exactly as serde_json escapes it: `"` and `\\`, the
/// control characters (`\b \f \n \r \t` short, the rest as `\u00xx`); everything else as it is.
/// Runs that need no escape are found eight bytes at a time and copied whole.
pub fn json_str(out: &mut Vec<u8>, text: &str) {
    out.reserve(text.len() + 2);
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(word) = bytes.get(i..i + 8) {
            let word = u64::from_le_bytes(word.try_into().expect("eight bytes"));
            if !needs_escape(word) {
                i += 8;
                continue;
            }
        }
        let end = (i + 8).min(bytes.len());
        while i < end {
            let byte = bytes[i];
            i += 1;
            if byte >= 0x20 && byte != b'"' && byte != b'\\' {
                continue;
            }
            out.extend_from_slice(&bytes[start..i - 1]);
            start = i;
            match byte {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0C => out.extend_from_slice(b"\\f"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                _ => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(byte >> 4)]);
                    out.push(HEX[usize::from(byte & 0xF)]);
                }
            }
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Whether any of eight bytes is a control character, `"` or `\\` (exact: the classic "has a
/// byte less than" and "has a zero byte" tests, true only when one is).
fn needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    let quote = word ^ (ONES * u64::from(b'"'));
    let quote = quote.wrapping_sub(ONES) & !quote & HIGH;
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let backslash = backslash.wrapping_sub(ONES) & !backslash & HIGH;
    (control | quote | backslash) != 0
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
    timestamp_at(SystemTime::now())
}

/// [`timestamp`] of `time`: each thread keeps the date and time to the second it formatted
/// last, and for a time in the same second only writes the milliseconds (formatting the whole
/// time cost about 670 instructions, two records per tag change).
fn timestamp_at(time: SystemTime) -> String {
    use std::cell::RefCell;
    thread_local! {
        /// The second last formatted on this thread, and `YYYY-MM-DDTHH:MM:SS` for it.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let Ok(since) = time.duration_since(SystemTime::UNIX_EPOCH) else {
        return humantime::format_rfc3339_millis(time).to_string();
    };
    let (secs, millis) = (since.as_secs(), since.subsec_millis());
    SECOND.with_borrow_mut(|(second, prefix)| {
        if *second != secs {
            let whole = humantime::format_rfc3339_millis(time).to_string();
            // `YYYY-MM-DDTHH:MM:SS.mmmZ`: humantime writes four-digit years only (up to 9999).
            if whole.len() != 24 {
                return whole;
            }
            *second = secs;
            *prefix = whole[..19].to_owned();
        }
        let mut out = String::with_capacity(24);
        out.push_str(prefix);
        out.push('.');
        out.push(char::from(b'0' + (millis / 100) as u8));
        out.push(char::from(b'0' + (millis / 10 % 10) as u8));
        out.push(char::from(b'0' + (millis % 10) as u8));
        out.push('Z');
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuditConfig;

    /// A log to `audit.log` in a new temporary directory (kept alive by the first element),
    /// without fsync.
    fn file_log() -> (tempfile::TempDir, std::path::PathBuf, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(
            &config(AuditPath::File(path.clone()), false),
            Arc::default(),
        )
        .unwrap();
        (dir, path, log)
    }

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

    /// A record that finds the writer idle is written by the thread that makes it: in the file
    /// when `queue_holding` returns, with nothing to wait for.
    #[tokio::test]
    async fn an_idle_writer_lets_the_caller_write_its_record() {
        let (dir, path, log) = file_log();
        for n in 0..3 {
            let (queued, slot) = log
                .queue_holding(&serde_json::json!({ "n": n }), true)
                .unwrap();
            assert!(
                matches!(queued.0, Wait::Written),
                "record {n} was handed off"
            );
            let text = std::fs::read_to_string(&path).unwrap();
            // Sealed into the chain: `{"seq":…,"prev":"…",` before the record's own members.
            assert!(text.ends_with(&format!(",\"n\":{n}}}\n")), "{text:?}");
            slot.unwrap()
                .write(&serde_json::json!({ "outcome": n }))
                .unwrap();
            log.written(queued).await.unwrap();
        }
        // A regular file of a local file system: an append, or a write that cannot wait.
        let mode = log.core.direct.load(Ordering::SeqCst);
        assert!(mode == DIRECT_APPEND || mode == DIRECT_NOWAIT, "{mode}");
        // The last outcome may still wait for the next write (OUTCOME_WRITE_WITHIN): closing
        // writes it.
        assert_eq!(log.close(Duration::from_secs(5)).await, 0);
        assert_eq!(log.core.held_records.load(Ordering::SeqCst), 0);
        assert_eq!(log.core.held_bytes.load(Ordering::SeqCst), 0);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 6);

        // With fsync: always the writer thread.
        let synced = AuditLog::open(
            &config(AuditPath::File(dir.path().join("s.log")), true),
            Arc::default(),
        )
        .unwrap();
        let (queued, _) = synced.queue_holding(&serde_json::json!({}), false).unwrap();
        assert!(matches!(queued.0, Wait::Waiting(_)));
        synced.written(queued).await.unwrap();
        // A device that cannot say whether it would wait (nor take the write).
        let full = AuditLog::open(
            &config(AuditPath::File("/dev/full".into()), false),
            Arc::default(),
        )
        .unwrap();
        assert!(matches!(
            full.write(&serde_json::json!({})).await,
            Err(AuditError::Failing)
        ));
        assert_eq!(full.core.direct.load(Ordering::SeqCst), DIRECT_NEVER);
    }

    /// An outcome record costs no write of its own: it is left in the batch, the next record's
    /// write carries it ahead of that record, and with nothing after it the writer thread
    /// writes it on its own.
    #[tokio::test]
    async fn an_outcome_rides_with_the_next_write() {
        let (_dir, path, log) = file_log();
        let lines = || std::fs::read_to_string(&path).unwrap().lines().count();
        // How often an outcome was not yet in the file when its `write` returned: the writer
        // thread writes it on its own only after OUTCOME_WRITE_WITHIN.
        let mut left = 0;
        for n in 0..20 {
            let (queued, slot) = log
                .queue_holding(&serde_json::json!({ "n": n }), true)
                .unwrap();
            log.written(queued).await.unwrap();
            // The decision's write carried the outcome before it.
            assert_eq!(lines(), 2 * n + 1);
            slot.unwrap()
                .write(&serde_json::json!({ "outcome": n }))
                .unwrap();
            left += usize::from(lines() == 2 * n + 1);
        }
        assert!(left > 0, "every outcome was written at once");
        let deadline = Instant::now() + Duration::from_secs(5);
        while lines() < 40 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(lines(), 40, "the last outcome was not written");
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, line) in text.lines().enumerate() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            let key = if i % 2 == 0 { "n" } else { "outcome" };
            assert_eq!(value[key], i / 2, "{line}");
        }
        assert_eq!(log.close(Duration::from_secs(5)).await, 0);
        assert_eq!(log.core.held_records.load(Ordering::SeqCst), 0);
        assert_eq!(log.core.held_bytes.load(Ordering::SeqCst), 0);
    }

    /// An outcome record that finds the writer's lock taken (another thread writing) waits for
    /// the next line appended, whoever appends it, instead of going through the writer thread;
    /// with nothing after it the writer thread writes it. Before its decision is written, it
    /// goes through the queue, behind its decision.
    #[tokio::test]
    async fn an_outcome_that_finds_the_lock_taken_waits_for_the_next_line() {
        let (_dir, path, log) = file_log();
        for n in 0..3 {
            let (queued, slot) = log
                .queue_holding(&serde_json::json!({ "n": n }), true)
                .unwrap();
            log.written(queued).await.unwrap();
            let mut slot = slot.unwrap();
            let held = log.core.writer.lock().unwrap();
            if n < 2 {
                slot.decision_written();
                slot.write(&serde_json::json!({ "outcome": n })).unwrap();
                assert_eq!(log.core.deferred_count.load(Ordering::SeqCst), 1);
            } else {
                slot.write(&serde_json::json!({ "outcome": n })).unwrap();
                assert_eq!(log.core.deferred_count.load(Ordering::SeqCst), 0);
            }
            drop(held);
        }
        let lines = || std::fs::read_to_string(&path).unwrap().lines().count();
        let deadline = Instant::now() + Duration::from_secs(5);
        while lines() < 6 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let order: Vec<String> = text
            .lines()
            .map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).unwrap();
                match (value.get("n"), value.get("outcome")) {
                    (Some(n), _) => format!("d{n}"),
                    (_, Some(n)) => format!("o{n}"),
                    _ => line.to_owned(),
                }
            })
            .collect();
        assert_eq!(order, ["d0", "o0", "d1", "o1", "d2", "o2"]);
        assert_eq!(log.close(Duration::from_secs(5)).await, 0);
        assert_eq!(log.core.held_records.load(Ordering::SeqCst), 0);
        assert_eq!(log.core.held_bytes.load(Ordering::SeqCst), 0);
    }

    /// Threads writing at once, on their own (when the writer is idle) or through the queue
    /// (when it is not, or the pipe is full): every record is in the log once, whole, and each
    /// thread's records in the order it made them, as the hash chain needs.
    #[test]
    fn records_written_by_callers_and_the_writer_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("audit.fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let reader = std::thread::spawn({
            let fifo = fifo.clone();
            move || {
                let mut file = File::open(&fifo).unwrap();
                let mut text = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match io::Read::read(&mut file, &mut chunk).unwrap() {
                        0 => return String::from_utf8(text).unwrap(),
                        n => text.extend_from_slice(&chunk[..n]),
                    }
                    // A slow reader: the pipe fills, and writes that cannot wait are refused.
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        records_keep_their_order(fifo, || reader.join().unwrap());
    }

    /// The same on a regular file, where request paths write their own records, and outcome
    /// records that find the lock taken wait for the next line appended (`Core::defer`).
    #[test]
    fn records_written_by_callers_deferred_and_the_writer_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        records_keep_their_order(path.clone(), || std::fs::read_to_string(&path).unwrap());
    }

    /// Four threads write 300 records each (waited for, detached, with an outcome after them);
    /// `read` gives the log once the writer has stopped.
    fn records_keep_their_order(path: std::path::PathBuf, read: impl FnOnce() -> String) {
        let mut settings = config(AuditPath::File(path), false);
        settings.queue_capacity = 100_000;
        settings.stall_timeout = Duration::from_secs(30);
        let log = Arc::new(AuditLog::open(&settings, Arc::default()).unwrap());
        const THREADS: usize = 4;
        const RECORDS: usize = 300;
        let writers: Vec<_> = (0..THREADS)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    let pad = "p".repeat(600);
                    for n in 0..RECORDS {
                        let record = serde_json::json!({ "t": t, "n": n, "pad": pad });
                        match n % 3 {
                            0 => runtime.block_on(log.write(&record)).unwrap(),
                            1 => log.write_detached(&record).unwrap(),
                            _ => {
                                let (queued, slot) = log.queue_holding(&record, true).unwrap();
                                runtime.block_on(log.written(queued)).unwrap();
                                let mut slot = slot.unwrap();
                                // As `record::decision` does: the outcome may be deferred.
                                slot.decision_written();
                                slot.write(&serde_json::json!({ "t": t, "n": n, "outcome": true }))
                                    .unwrap();
                            }
                        }
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert_eq!(runtime.block_on(log.close(Duration::from_secs(30))), 0);
        drop(log);
        let text = read();
        let mut next = [0usize; THREADS];
        let mut outcomes = 0;
        for line in text.lines() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            let t = value["t"].as_u64().unwrap() as usize;
            let n = value["n"].as_u64().unwrap() as usize;
            if value.get("outcome").is_some() {
                // The outcome follows its decision, before the thread's next record.
                assert_eq!(n + 1, next[t], "{line}");
                outcomes += 1;
                continue;
            }
            assert_eq!(n, next[t], "thread {t} out of order: {line}");
            next[t] += 1;
        }
        assert_eq!(next, [RECORDS; THREADS]);
        assert_eq!(outcomes, THREADS * RECORDS / 3);
    }

    /// `json_str` escapes as serde_json does, each ASCII character at every place of the
    /// eight-byte words it scans, beside other characters and alone.
    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut texts = vec![String::new(), "é😀\u{2028}\u{7f}".to_owned()];
        for c in (0u8..0x80).map(char::from) {
            for at in 0..17 {
                let mut text: String = "abcdefghijklmnopq".chars().take(at).collect();
                text.push(c);
                text.push_str("xyz0123456789");
                texts.push(text);
            }
            texts.push(c.to_string());
        }
        for text in texts {
            let mut out = Vec::new();
            json_str(&mut out, &text);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&text).unwrap()
            );
        }
        let mut out = Vec::new();
        for n in [0, 7, 10, 65_535, u64::MAX] {
            out.clear();
            crate::text::push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
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

    proptest::proptest! {
        /// The per-thread second cache writes what humantime writes, for times in any order:
        /// the same second again, the next one, one far away, before the epoch.
        #[test]
        fn cached_timestamps_are_humantimes(
            times in proptest::collection::vec((-100i64..4_000_000_000i64, 0u32..1_000_000_000u32, 0u8..4), 1..64)
        ) {
            let mut last = SystemTime::UNIX_EPOCH;
            for (secs, nanos, how) in times {
                let time = match how {
                    // The same second as the last time, another sub-second part.
                    0 => {
                        let whole = last.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                        SystemTime::UNIX_EPOCH + Duration::new(whole, nanos)
                    }
                    // The next second.
                    1 => last + Duration::from_secs(1),
                    _ if secs < 0 => SystemTime::UNIX_EPOCH - Duration::new(secs.unsigned_abs(), nanos),
                    _ => SystemTime::UNIX_EPOCH + Duration::new(secs as u64, nanos),
                };
                proptest::prop_assert_eq!(
                    timestamp_at(time),
                    humantime::format_rfc3339_millis(time).to_string()
                );
                last = time;
            }
        }
    }
}
