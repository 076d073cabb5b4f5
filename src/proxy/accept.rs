//! Accepting connections: the listener admits each one into the connection budget and hands it
//! to one of a few connection threads, which serves it for its whole life on a single-threaded
//! runtime with its own epoll.
//!
//! This is the worker model of nginx and HAProxy. Unlike tokio's work-stealing runtime, it never
//! wakes one worker to steal what another just received; on the same connections that gave
//! inspected requests more throughput at less CPU, and pass-through requests a lower p99
//! (docs/performance.md).
//! Connections are dealt round-robin; a connection never moves, so a thread with a few very busy
//! connections cannot shed them (the same trade nginx makes).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::budget::Registration;
use super::connection::serve_accepted;
use super::state::{Origin, Shared};
use crate::config::Config;
use crate::mtls::ListenerTls;

/// Accepts connections until `stopped`, keeps accepting for the drain delay, then waits up to
/// the grace period for in-flight requests. Each accepted connection takes its place in the
/// budget, or is closed at once when there is none.
pub(crate) async fn serve(
    listener: TcpListener,
    mut threads: ConnectionThreads,
    shared: Arc<Shared>,
    config: Config,
    mut stopped: watch::Receiver<bool>,
) {
    let budget = Arc::clone(&shared.budget);
    let drain = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drain);
    let mut draining = false;
    loop {
        budget.room().await;
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(registration) = budget.admit(stream.as_raw_fd()) else {
                    debug!(%peer, "connection refused: every connection has a request in flight ([limits].max_connections)");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let origin = Origin {
                    peer,
                    tunnel_host: None,
                    caller: None,
                    caller_until: None,
                    conn: Arc::clone(registration.conn()),
                };
                threads.hand(stream, origin, registration, shared.lifecycle.connections.subscribe());
            }
            _ = stopped.changed(), if !draining => {
                draining = true;
                info!(drain_delay_ms = config.shutdown.drain_delay.as_millis() as u64, "draining: /readyz now fails");
                drain.as_mut().reset(tokio::time::Instant::now() + config.shutdown.drain_delay);
            }
            _ = &mut drain, if draining => break,
        }
    }
    drop(listener);
    let lifecycle = &shared.lifecycle;
    let _ = lifecycle.closing.send(true);
    info!(
        grace_ms = config.shutdown.grace.as_millis() as u64,
        "listener closed; waiting for in-flight requests"
    );
    if tokio::time::timeout(config.shutdown.grace, lifecycle.connections.closed())
        .await
        .is_err()
    {
        warn!("grace period over; answering the tag changes still waiting for KMS (504) and closing the remaining connections");
        // The last word: a tag change still waiting for KMS answers its client and records its
        // outcome as unknown; a moment for those answers to be written.
        let _ = lifecycle.grace_over.send(true);
        let _ = tokio::time::timeout(LAST_WORD, lifecycle.connections.closed()).await;
    }
    // Ends the connection threads, and with them whatever the grace period did not finish: a
    // forwarded tag change that is dropped records its outcome as unknown as it goes, so the
    // threads are waited for before the audit log is closed.
    threads.stop(THREADS_STOP).await;
    // Every record accepted into the audit queue is written before the process exits (unless
    // its sink is stalled for a whole grace period more).
    let unwritten = shared.audit.close(config.shutdown.grace).await;
    info!(unwritten_audit_records = unwritten, "stopped");
}

/// An accepted connection on its way to a connection thread.
struct Handed {
    /// Declared before `stream`: dropped first, so the budget forgets the descriptor before the
    /// socket is closed.
    registration: Registration,
    stream: std::net::TcpStream,
    origin: Origin,
    /// Taken at accept, so that shutdown waits for a connection still in a thread's queue.
    open: watch::Receiver<()>,
}

/// How long connections get, after the grace period, to send the answers of the tag changes
/// cut short.
const LAST_WORD: Duration = Duration::from_millis(500);
/// How long shutdown waits for the connection threads to end their connections.
const THREADS_STOP: Duration = Duration::from_secs(2);
/// How long a connection thread waits for its runtime's blocking work (a leaf being minted).
const BLOCKING_STOP: Duration = Duration::from_millis(200);

/// The threads that serve connections; dropping this (or [`ConnectionThreads::stop`]) lets each
/// thread finish once its queue is empty, which ends the connections it still serves.
pub(crate) struct ConnectionThreads {
    queues: Vec<mpsc::UnboundedSender<Handed>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next: usize,
}

impl ConnectionThreads {
    /// Starts one thread per CPU the process may use, or `TOKIO_WORKER_THREADS` of them.
    pub(crate) fn start(
        shared: &Arc<Shared>,
        tls: Option<Arc<ListenerTls>>,
    ) -> io::Result<ConnectionThreads> {
        let count = thread_count();
        let mut queues = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let (queue, handed) = mpsc::unbounded_channel();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let shared = Arc::clone(shared);
            let tls = tls.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ktg-connections-{index}"))
                .spawn(move || {
                    runtime.block_on(serve_handed(handed, shared, tls));
                    // Drops every task still running (their connections close, and a forwarded
                    // tag change records its outcome), then waits a little for blocking work.
                    runtime.shutdown_timeout(BLOCKING_STOP);
                })?;
            queues.push(queue);
            threads.push(thread);
        }
        Ok(ConnectionThreads {
            queues,
            threads,
            next: 0,
        })
    }

    /// Ends the threads, and with them every connection they still serve; waits at most
    /// `within` for them to be gone.
    pub(crate) async fn stop(self, within: Duration) {
        let ConnectionThreads {
            queues, threads, ..
        } = self;
        drop(queues);
        let deadline = tokio::time::Instant::now() + within;
        while !threads.iter().all(std::thread::JoinHandle::is_finished) {
            if tokio::time::Instant::now() >= deadline {
                warn!("a connection thread did not end in time");
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Gives an accepted connection to the next thread in turn.
    pub(crate) fn hand(
        &mut self,
        stream: TcpStream,
        origin: Origin,
        registration: Registration,
        open: watch::Receiver<()>,
    ) {
        let peer = origin.peer;
        // Leaves the listener's epoll; the connection thread registers it with its own.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => return warn!(%peer, %error, "cannot hand over an accepted connection"),
        };
        self.next = (self.next + 1) % self.queues.len();
        let handed = Handed {
            registration,
            stream,
            origin,
            open,
        };
        if self.queues[self.next].send(handed).is_err() {
            warn!(%peer, "a connection thread has stopped; connection dropped");
        }
    }
}

/// A connection thread's life: serve each connection handed to it until the listener is gone.
async fn serve_handed(
    mut handed: mpsc::UnboundedReceiver<Handed>,
    shared: Arc<Shared>,
    tls: Option<Arc<ListenerTls>>,
) {
    while let Some(Handed {
        registration,
        stream,
        origin,
        open,
    }) = handed.recv().await
    {
        // The socket is closed if the conversion fails: the budget must not hold its number.
        registration.forget_fd();
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(error) => {
                warn!(peer = %origin.peer, %error, "cannot serve an accepted connection");
                continue;
            }
        };
        registration.set_fd(stream.as_raw_fd());
        tokio::spawn(serve_accepted(
            stream,
            origin,
            registration,
            Arc::clone(&shared),
            tls.clone(),
            open,
        ));
    }
}

/// `TOKIO_WORKER_THREADS` when it is a positive number (what tokio itself honours), else the
/// CPUs this process may use (cgroup quotas included).
fn thread_count() -> usize {
    count_from(
        std::env::var("TOKIO_WORKER_THREADS").ok().as_deref(),
        std::thread::available_parallelism().ok().map(|n| n.get()),
    )
}

fn count_from(configured: Option<&str>, cpus: Option<usize>) -> usize {
    configured
        .and_then(|n| n.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .or(cpus)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::count_from;

    #[test]
    fn a_positive_setting_wins_else_the_cpus_else_one() {
        assert_eq!(count_from(Some("3"), Some(2)), 3);
        assert_eq!(count_from(Some(" 4 "), None), 4);
        assert_eq!(count_from(Some("0"), Some(2)), 2);
        assert_eq!(count_from(Some("many"), Some(2)), 2);
        assert_eq!(count_from(None, Some(8)), 8);
        assert_eq!(count_from(None, None), 1);
    }
}
