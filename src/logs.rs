//! Log lines never block a thread that serves traffic.
//!
//! Every formatted line goes into a queue bounded in bytes ([`QUEUE_BYTES`]); one thread of its
//! own drains it to standard error. When the reader of standard error is slower than the proxy
//! logs (a full pipe, a stalled log collector), the queue fills and further lines are dropped,
//! never waited for: each dropped line counts in `kms_tag_guard_log_lines_dropped_total`, and the
//! drain thread logs "N log lines dropped in the last Ns" once the reader takes lines again.
//!
//! At exit, [`LogGuard`] gives the drain thread [`FLUSH_AT_EXIT`] to write what is queued.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

use crate::metrics;

/// The most bytes of log lines waiting for the reader of standard error.
pub const QUEUE_BYTES: usize = 1024 * 1024;
/// What a queued line costs beyond its bytes (its allocation and place in the queue).
const LINE_OVERHEAD: usize = 64;
/// How often the drain thread reports lines dropped since its last report.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
/// How long the process waits at exit for queued lines to be written.
pub const FLUSH_AT_EXIT: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a line is queued or the queue is closed.
    queued: Condvar,
    /// Signalled when the drain thread has written everything queued after close.
    done: Mutex<bool>,
    finished: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves a queue that is still consistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `line` if it fits, else drops and counts it. Never waits for the reader.
    fn submit(&self, line: Vec<u8>) {
        if line.is_empty() {
            return;
        }
        let cost = line.len() + LINE_OVERHEAD;
        let mut queue = self.lock();
        if queue.closed || queue.bytes + cost > QUEUE_BYTES {
            drop(queue);
            metrics::log_line_dropped();
            return;
        }
        queue.bytes += cost;
        queue.lines.push_back(line);
        drop(queue);
        self.queued.notify_one();
    }
}

/// The writer the log formatter writes to: a handle on the queue.
#[derive(Clone)]
pub struct NonBlocking {
    shared: Arc<Shared>,
}

/// Keeps the drain thread; on drop, closes the queue and waits (at most [`FLUSH_AT_EXIT`]) for
/// what is queued to be written.
pub struct LogGuard {
    shared: Arc<Shared>,
}

/// Starts the drain thread writing to `sink`; returns the writer for the formatter and the guard
/// that flushes at exit.
pub fn non_blocking<W: Write + Send + 'static>(
    sink: W,
) -> std::io::Result<(NonBlocking, LogGuard)> {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        queued: Condvar::new(),
        done: Mutex::new(false),
        finished: Condvar::new(),
    });
    let drain = Arc::clone(&shared);
    std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || run(&drain, sink))?;
    Ok((
        NonBlocking {
            shared: Arc::clone(&shared),
        },
        LogGuard { shared },
    ))
}

/// The drain thread: writes what is queued, in order; reports dropped lines every
/// [`SUMMARY_INTERVAL`] (through the log, so in the chosen format).
fn run<W: Write>(shared: &Shared, mut sink: W) {
    let mut reported = metrics::log_lines_dropped_total();
    let mut since = Instant::now();
    loop {
        let (lines, closed) = {
            let mut queue = shared.lock();
            while queue.lines.is_empty() && !queue.closed {
                let left = SUMMARY_INTERVAL.saturating_sub(since.elapsed());
                if left.is_zero() {
                    break;
                }
                queue = shared
                    .queued
                    .wait_timeout(queue, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            queue.bytes = 0;
            (std::mem::take(&mut queue.lines), queue.closed)
        };
        for line in &lines {
            // A closed or broken standard error loses the line: count it like a dropped one.
            if sink.write_all(line).is_err() {
                metrics::log_line_dropped();
            }
        }
        let _ = sink.flush();
        if closed {
            *shared.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
            shared.finished.notify_all();
            return;
        }
        if since.elapsed() >= SUMMARY_INTERVAL {
            let total = metrics::log_lines_dropped_total();
            let dropped = total - reported;
            if dropped > 0 {
                let seconds = since.elapsed().as_secs();
                tracing::warn!(
                    dropped,
                    seconds,
                    "{dropped} log lines dropped in the last {seconds}s: the reader of standard error is slower than the proxy logs (kms_tag_guard_log_lines_dropped_total)"
                );
            }
            reported = total;
            since = Instant::now();
        }
    }
}

impl LogGuard {
    /// What a task that ends the process without unwinding (`std::process::exit`) calls first.
    pub fn finisher(&self) -> LogFinisher {
        LogFinisher {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        finish(&self.shared);
    }
}

/// Closes the queue and waits (at most [`FLUSH_AT_EXIT`]) for what is queued to be written.
#[derive(Clone)]
pub struct LogFinisher {
    shared: Arc<Shared>,
}

impl LogFinisher {
    pub fn finish(&self) {
        finish(&self.shared);
    }
}

fn finish(shared: &Shared) {
    shared.lock().closed = true;
    shared.queued.notify_all();
    let done = shared.done.lock().unwrap_or_else(|e| e.into_inner());
    // The reader may never read again: wait a bounded time, then exit regardless.
    let _ = shared
        .finished
        .wait_timeout_while(done, FLUSH_AT_EXIT, |done| !*done);
}

/// One log line being formatted; queued whole when the formatter is done with it.
pub struct LineWriter {
    line: Vec<u8>,
    shared: Arc<Shared>,
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        self.shared.submit(std::mem::take(&mut self.line));
    }
}

impl<'a> MakeWriter<'a> for NonBlocking {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            line: Vec::new(),
            shared: Arc::clone(&self.shared),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that blocks every write until `open` is set.
    struct Gate {
        open: Arc<(Mutex<bool>, Condvar)>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, cvar) = &*self.open;
            let _open = cvar
                .wait_while(lock.lock().unwrap(), |open| !*open)
                .unwrap();
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_reader_drops_and_counts_lines_and_never_blocks_the_writer() {
        let open = Arc::new((Mutex::new(false), Condvar::new()));
        let written = Arc::new(Mutex::new(Vec::new()));
        let (writer, guard) = non_blocking(Gate {
            open: Arc::clone(&open),
            written: Arc::clone(&written),
        })
        .unwrap();
        let before = metrics::log_lines_dropped_total();
        let line = vec![b'x'; 999];
        let lines = 3 * QUEUE_BYTES / line.len();
        // All of these return although the sink takes nothing: the queue holds what fits.
        for _ in 0..lines {
            let mut w = writer.make_writer();
            w.write_all(&line).unwrap();
        }
        let dropped = metrics::log_lines_dropped_total() - before;
        // Held at most: what the drain thread took from the queue before the gate stopped it
        // (the queue's worth at most, however late it woke), and a full queue behind it.
        let fit = QUEUE_BYTES / (line.len() + LINE_OVERHEAD);
        assert!(
            dropped as usize >= lines - 2 * fit - 1,
            "{dropped} of {lines} dropped, {fit} fit in the queue"
        );
        *open.0.lock().unwrap() = true;
        open.1.notify_all();
        drop(guard);
        let kept = written.lock().unwrap().len() / line.len();
        assert!(kept > 0 && kept + dropped as usize <= lines + 1);
    }
}
