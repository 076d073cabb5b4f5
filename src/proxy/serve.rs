//! Accepting connections and serving HTTP on them: plain, behind the listener's TLS, or inside an
//! intercepted CONNECT tunnel. Every request on any of them goes through the same pipeline.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::budget::{Budget, Conn, InFlight, Registration, Socket, Tracked};
use super::pipeline::{self, Shared};
use super::workers::ConnectionThreads;
use crate::config::Config;

/// Where a request came from: the client's address, for a request inside an intercepted tunnel
/// the host the client asked to CONNECT to, and the connection as the budget sees it.
#[derive(Clone)]
pub(crate) struct Origin {
    pub peer: SocketAddr,
    pub tunnel_host: Option<Arc<str>>,
    pub conn: Arc<Conn>,
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

/// Serves HTTP on one connection until it closes, it has been idle for `idle`, or it is asked
/// to close (by shutdown or by the connection budget: then it finishes its in-flight requests
/// first).
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
    let conn = Arc::clone(&origin.conn);
    conn.fast_path();
    let io = Tracked::new(io, Arc::clone(&conn));
    let io = match super::h1::serve(io, &shared, &origin).await {
        super::h1::Ended::Closed => return,
        super::h1::Ended::HandOver(io) => io,
    };
    conn.server();
    let mut closing = shared.lifecycle.closing.subscribe();
    // An HTTP/2 connection may wait this long with no stream (its set-up, preface included, is
    // bounded by the set-up deadline; an HTTP/1.1 one carries one request, within hyper's header
    // read timeout).
    let idle = shared.limits.idle_timeout;
    let peer = origin.peer;
    let service_shared = Arc::clone(&shared);
    let service = service_fn(move |mut request: Request<Incoming>| {
        let shared = Arc::clone(&service_shared);
        let origin = origin.clone();
        let in_flight = origin.conn.begin_request();
        if request.method() == Method::CONNECT && request.version() == Version::HTTP_2 {
            // The tunnel is a stream of this connection: it stays busy while the tunnel lives.
            let tunnel = TunnelHold(Arc::new(origin.conn.begin_request()));
            request.extensions_mut().insert(tunnel);
        } else if request.method() != Method::CONNECT {
            origin.conn.setup_done();
        }
        async move {
            let response = pipeline::handle(shared, request, origin).await;
            drop(in_flight);
            Ok::<_, Infallible>(response)
        }
    });
    let connection = shared
        .server
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut shutting_down = false;
    loop {
        let idle_at = conn
            .idle_instant()
            .map_or_else(|| Instant::now() + idle, |since| since + idle);
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
            _ = conn.close_requested(), if !shutting_down => {
                debug!(%peer, "closing an idle connection to make room ([limits].max_connections)");
                connection.as_mut().graceful_shutdown();
                shutting_down = true;
            }
            _ = tokio::time::sleep_until(idle_at.into()) => {
                if conn.idle_instant().is_some_and(|since| since + idle <= Instant::now()) {
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

/// Put on an HTTP/2 CONNECT request: the stream's tunnel holds it, so the connection counts as
/// busy (not idle, never closed for room) while any of its tunnels lives.
#[derive(Clone)]
pub(crate) struct TunnelHold(#[allow(dead_code)] Arc<InFlight>);

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
/// the grace period for in-flight requests. Each accepted connection takes its place in the
/// budget, or is closed at once when there is none.
pub(crate) async fn serve(
    listener: TcpListener,
    mut threads: ConnectionThreads,
    shared: Arc<Shared>,
    config: Config,
    budget: Arc<Budget>,
    mut stopped: watch::Receiver<bool>,
) {
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
        warn!("grace period over; closing the remaining connections");
    }
    // Ends the connection threads, and with them whatever the grace period did not finish.
    drop(threads);
    // Every record accepted into the audit queue is written before the process exits (unless
    // its sink is stalled for a whole grace period more).
    let unwritten = shared.audit.close(config.shutdown.grace).await;
    info!(unwritten_audit_records = unwritten, "stopped");
}

/// One accepted TCP connection: its first byte, then TLS if configured, then HTTP; the first
/// byte, the handshake and the first request head (through a CONNECT tunnel's own handshake)
/// all within one set-up deadline, `header_read_timeout_ms` from accept. `_open` is held while
/// it lives, so that shutdown waits for it.
pub(crate) async fn serve_accepted(
    stream: TcpStream,
    origin: Origin,
    registration: Registration,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    _open: watch::Receiver<()>,
) {
    let conn = Arc::clone(&origin.conn);
    let peer = origin.peer;
    let metrics = Arc::clone(&shared.metrics);
    let serving = async move {
        let mut closing = shared.lifecycle.closing.subscribe();
        // Waiting for the first byte costs little; hyper's connection state is only built once
        // the client speaks. A client that never does is dropped at the set-up deadline, when
        // the budget needs its place, or at shutdown.
        let mut first = [0u8; 1];
        tokio::select! {
            peeked = stream.peek(&mut first) => {
                if !matches!(peeked, Ok(n) if n > 0) {
                    return;
                }
            }
            _ = closing.wait_for(|closed| *closed) => return,
            _ = origin.conn.close_requested() => return,
        }
        let socket = Socket::new(registration, stream);
        let Some(acceptor) = tls else {
            return serve_connection(socket, shared, origin).await;
        };
        match acceptor.accept(socket).await {
            Ok(stream) => serve_connection(stream, shared, origin).await,
            Err(error) => debug!(%peer, %error, "TLS handshake failed"),
        }
    };
    tokio::select! {
        () = serving => {}
        () = conn.setup_expired() => {
            metrics.setup_timeout();
            debug!(%peer, "connection closed: its set-up (first byte, TLS, CONNECT, first request head) outlasted header_read_timeout_ms");
        }
    }
}
