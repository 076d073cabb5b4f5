//! Accepting connections and serving HTTP on them: plain, behind the listener's TLS, or inside an
//! intercepted CONNECT tunnel. Every request on any of them goes through the same pipeline.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::pipeline::{self, Shared};
use super::workers::ConnectionThreads;
use crate::config::Config;

/// Where a request came from: the client's address, and for a request inside an intercepted
/// tunnel, the host the client asked to CONNECT to.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub peer: SocketAddr,
    pub tunnel_host: Option<Arc<str>>,
}

// The read buffer of an HTTP/1 connection, which bounds a request head: the same bound on the
// fast path and in hyper.
use super::h1::MAX_HEAD_BYTES;

/// The HTTP/1.1 + h2 server settings every connection uses.
pub(crate) fn http_server(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // The general server takes one HTTP/1.1 request per connection handed to it: every later
        // head on the connection would be read by hyper alone, and a head it refuses would get a
        // bare status instead of the fast path's KMS-shaped, audited refusal.
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(config.limits.header_read_timeout)
        // KMS request heads are a few KiB; hyper's default buffer (~400 KiB) would let a client
        // park that much per connection. Larger heads get 431.
        .max_buf_size(MAX_HEAD_BYTES);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// When a connection last finished a request, and how many it has in flight.
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` that the last request finished; `u64::MAX` before any.
    last_done_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_done_ms: AtomicU64::new(u64::MAX),
        }
    }

    /// When the connection counts as idle: `idle` after its last request finished, or after it
    /// opened when it has had none (HTTP/2 preface, TLS and first head included). `None` while
    /// a request is in flight.
    fn idle_at(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since_start = match self.last_done_ms.load(Ordering::SeqCst) {
            u64::MAX => Duration::ZERO,
            ms => Duration::from_millis(ms),
        };
        Some(self.started + since_start + idle)
    }
}

/// Serves HTTP on one connection until it closes, it has been idle for `idle`, or `closing`
/// fires (then it finishes its in-flight requests first).
///
/// hyper's own header timeout covers HTTP/1 only, and only once it is reading a head; the idle
/// deadline here also covers an HTTP/2 preface that stalls and HTTP/2 connections with no
/// streams.
pub(crate) async fn serve_connection<I>(io: I, shared: Arc<Shared>, origin: Origin)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Held while the connection lives, so that shutdown waits for it.
    let _open = shared.lifecycle.connections.subscribe();
    let io = match super::h1::serve(io, &shared, &origin).await {
        super::h1::Ended::Closed => return,
        super::h1::Ended::HandOver(io) => io,
    };
    let mut closing = shared.lifecycle.closing.subscribe();
    let idle = shared.limits.header_read_timeout;
    let peer = origin.peer;
    let activity = Arc::new(Activity::new());
    let service_shared = Arc::clone(&shared);
    let service_activity = Arc::clone(&activity);
    let service = service_fn(move |request| {
        let shared = Arc::clone(&service_shared);
        let origin = origin.clone();
        let activity = Arc::clone(&service_activity);
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        async move {
            let response = pipeline::handle(shared, request, origin).await;
            let done = activity.started.elapsed().as_millis() as u64;
            activity.last_done_ms.store(done, Ordering::SeqCst);
            activity.in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, Infallible>(response)
        }
    });
    let connection = shared
        .server
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut shutting_down = false;
    loop {
        let idle_at = activity
            .idle_at(idle)
            .unwrap_or_else(|| Instant::now() + idle);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    debug!(%peer, %error, "connection ended with an error");
                }
                return;
            }
            _ = closing.wait_for(|closed| *closed), if !shutting_down => {
                connection.as_mut().graceful_shutdown();
                shutting_down = true;
            }
            _ = tokio::time::sleep_until(idle_at.into()) => {
                if activity.idle_at(idle).is_some_and(|at| at <= Instant::now()) {
                    if shutting_down {
                        // Asked to close politely a whole idle period ago: drop it.
                        return;
                    }
                    debug!(%peer, "closing an idle connection");
                    connection.as_mut().graceful_shutdown();
                    shutting_down = true;
                }
            }
        }
    }
}

/// Telling connections to wind down, and knowing when they have.
pub(crate) struct Lifecycle {
    /// Set when the listener closes, after the drain delay: connections finish what is in
    /// flight and close.
    pub closing: watch::Sender<bool>,
    /// Every open connection holds a receiver; shutdown waits until none is left.
    pub connections: watch::Sender<()>,
}

impl Lifecycle {
    pub(crate) fn new() -> Lifecycle {
        Lifecycle {
            closing: watch::channel(false).0,
            connections: watch::channel(()).0,
        }
    }
}

/// Accepts connections until `stopped`, keeps accepting for the drain delay, then waits up to
/// the grace period for in-flight requests.
pub(crate) async fn serve(
    listener: TcpListener,
    mut threads: ConnectionThreads,
    shared: Arc<Shared>,
    config: Config,
    mut stopped: watch::Receiver<bool>,
) {
    let drain = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drain);
    let mut draining = false;
    loop {
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
                let _ = stream.set_nodelay(true);
                let origin = Origin { peer, tunnel_host: None };
                threads.hand(stream, origin, shared.lifecycle.connections.subscribe());
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
        warn!("grace period over; closing the remaining connections");
    }
    // Ends the connection threads, and with them whatever the grace period did not finish.
    drop(threads);
    // Every record accepted into the audit queue is written before the process exits (unless
    // its sink is stalled for a whole grace period more).
    let unwritten = shared.audit.close(config.shutdown.grace).await;
    info!(unwritten_audit_records = unwritten, "stopped");
}

/// One accepted TCP connection: wait for its first byte, then TLS if configured, then HTTP.
/// `_open` is held while it lives, so that shutdown waits for it.
pub(crate) async fn serve_accepted(
    stream: TcpStream,
    origin: Origin,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    _open: watch::Receiver<()>,
) {
    let mut closing = shared.lifecycle.closing.subscribe();
    let idle = shared.limits.header_read_timeout;
    // Waiting for the first byte costs little; hyper's connection state is only built once the
    // client speaks. A client that never does is dropped after the idle timeout, or at shutdown.
    let mut first = [0u8; 1];
    tokio::select! {
        peeked = tokio::time::timeout(idle, stream.peek(&mut first)) => {
            if !matches!(peeked, Ok(Ok(n)) if n > 0) {
                return;
            }
        }
        _ = closing.wait_for(|closed| *closed) => return,
    }
    let peer = origin.peer;
    let Some(acceptor) = tls else {
        return serve_connection(stream, shared, origin).await;
    };
    match tokio::time::timeout(idle, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => serve_connection(stream, shared, origin).await,
        Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => debug!(%peer, "TLS handshake timed out"),
    }
}
