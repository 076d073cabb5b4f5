//! Serving HTTP on one connection: plain, behind the listener's TLS, or inside an intercepted
//! CONNECT tunnel. HTTP/1.1 heads go to the fast path ([`super::h1`]) first; what it hands over,
//! HTTP/2 and CONNECT go to hyper's server and [`super::general`]. Every request on any of them is
//! decided by [`crate::decide`] and recorded by [`crate::record`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use super::budget::{Conn, Registration, Socket, Tracked, EVICTION_GRACE};
use super::general;
use super::lane::Lane;
use super::state::{InterceptedStream, Origin, Shared, TunnelHold};
use crate::config::Config;
use crate::identity::IdentityError;
use crate::metrics::ClientCertRefusal;
use crate::mtls::{client_cert_refusal, ListenerTls};

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
    // What one HTTP/2 connection may make the proxy hold is a known figure (docs/security.md,
    // "Bounded memory"): its streams, the request bytes received and not yet read (the
    // connection window bounds them all), the answer bytes queued per stream, a head's size.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.limits.max_concurrent_streams)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_frame_size(H2_MAX_FRAME)
        .max_send_buf_size(H2_SEND_BUFFER)
        .max_header_list_size(H2_MAX_HEADER_LIST);
    builder
}

/// The request bytes a client may send on one HTTP/2 stream before the proxy reads them (the
/// protocol's default); a tag change's body is read as it arrives, a streamed one as KMS takes it.
const H2_STREAM_WINDOW: u32 = 64 * 1024;
/// The request bytes a client may send on one HTTP/2 connection, all streams together, before
/// the proxy reads them: the bound of what the connection buffers of its requests.
const H2_CONNECTION_WINDOW: u32 = 64 * 1024;
/// The largest HTTP/2 frame the proxy accepts (the protocol's default).
const H2_MAX_FRAME: u32 = 16 * 1024;
/// The answer bytes queued for one HTTP/2 stream before the proxy stops reading them from KMS
/// (hyper's default is 400 KiB): a client that stops reading holds no more than this per stream.
/// KMS answers are a few KiB.
const H2_SEND_BUFFER: usize = 16 * 1024;
/// The largest HTTP/2 request head, decoded (hyper's default, kept): KMS heads are 1 to 2 KiB.
/// An HTTP/1.1 head may take up to [`MAX_HEAD_BYTES`], one per connection; HTTP/2 has one per
/// stream.
const H2_MAX_HEADER_LIST: u32 = 16 * 1024;

/// The instant a time in seconds since the Unix epoch (a certificate's notAfter) comes: its
/// second's end.
fn instant_of(unix: i64) -> Instant {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let left = u64::try_from(unix.saturating_add(1))
        .map_or(Duration::ZERO, Duration::from_secs)
        .saturating_sub(now);
    // Far ends (a CA-issued certificate valid for years) are capped; the connection ends long
    // before.
    Instant::now() + left.min(Duration::from_secs(100 * 365 * 86_400))
}

/// Closes the connection at its first idle moment once its caller's certificate has ended
/// (`until`): its requests finish; the next ones need a new connection, with a current
/// certificate. Never resolves before.
async fn close_when_certificate_ends(until: Instant, conn: Arc<Conn>) {
    tokio::time::sleep_until(until.into()).await;
    while conn.idle_instant().is_none() {
        tokio::time::sleep(CLOSE_RECHECK).await;
    }
    debug!("closing a connection: its client certificate has ended");
    conn.close_idle();
}

/// Serves HTTP on one connection until it closes, it has been idle for `idle`, or it is asked
/// to close (by shutdown, by the connection budget, or when its caller's certificate ends: then
/// it finishes its in-flight requests first).
///
/// hyper's own header timeout covers HTTP/1 only, and only once it is reading a head; the idle
/// deadline here also covers an HTTP/2 preface that stalls and HTTP/2 connections with no
/// streams.
pub(crate) async fn serve_connection<I>(io: I, shared: Arc<Shared>, origin: Origin)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(until) = origin.caller_until else {
        return serve(io, shared, origin).await;
    };
    let conn = Arc::clone(&origin.conn);
    let serving = serve(io, shared, origin);
    tokio::pin!(serving);
    tokio::select! {
        () = &mut serving => {}
        () = close_when_certificate_ends(until, conn) => serving.await,
    }
}

async fn serve<I>(io: I, shared: Arc<Shared>, origin: Origin)
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
    // This connection's own connections to KMS: no other client shares them.
    let lane = Arc::new(Lane::new(Arc::clone(&shared)));
    let service_lane = Arc::clone(&lane);
    let service_shared = Arc::clone(&shared);
    let service = service_fn(move |mut request: Request<Incoming>| {
        let shared = Arc::clone(&service_shared);
        let lane = Arc::clone(&service_lane);
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
            let response = general::handle(shared, request, origin, lane).await;
            drop(in_flight);
            Ok::<_, Infallible>(response)
        }
    });
    let connection = shared
        .server
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut shutting_down = false;
    // Once asked to close (for room, or at shutdown): an idle connection whose client has not
    // closed it (one that never answers the PING after GOAWAY) is dropped this long after.
    let mut drop_idle_at: Option<Instant> = None;
    loop {
        let idle_at = conn
            .idle_instant()
            .map_or_else(|| Instant::now() + idle, |since| since + idle);
        let wake_at = match drop_idle_at {
            // Busy past the moment: looked at again shortly, until its requests are done.
            Some(at) => idle_at.min(match conn.idle_instant() {
                Some(_) => at,
                None => at.max(Instant::now() + CLOSE_RECHECK),
            }),
            None => idle_at,
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    debug!(%peer, %error, "connection ended with an error");
                }
                break;
            }
            _ = closing.wait_for(|closed| *closed), if !shutting_down => {
                connection.as_mut().graceful_shutdown();
                shutting_down = true;
                drop_idle_at = Some(Instant::now() + EVICTION_GRACE);
            }
            _ = conn.close_requested(), if !shutting_down => {
                debug!(%peer, "closing an idle connection to make room ([limits].max_connections)");
                connection.as_mut().graceful_shutdown();
                shutting_down = true;
                drop_idle_at = Some(Instant::now() + EVICTION_GRACE);
            }
            _ = tokio::time::sleep_until(wake_at.into()) => {
                let now = Instant::now();
                let idle_since = conn.idle_instant();
                if shutting_down
                    && drop_idle_at.is_some_and(|at| at <= now)
                    && idle_since.is_some()
                {
                    // Asked to close, idle, and the client has not closed it: drop it.
                    return;
                }
                if idle_since.is_some_and(|since| since + idle <= now) {
                    if shutting_down {
                        // Asked to close politely a whole idle period ago: drop it.
                        break;
                    }
                    debug!(%peer, "closing an idle connection");
                    connection.as_mut().graceful_shutdown();
                    shutting_down = true;
                    drop_idle_at = Some(now + EVICTION_GRACE);
                }
            }
        }
    }
    // Tag changes forwarded for this connection finish (and get their outcome records) while
    // its place in the budget, which covers its connections to KMS, is still held.
    lane.close_and_drain().await;
}

/// How often a connection asked to close, but with requests in flight, is looked at again.
const CLOSE_RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// One accepted TCP connection: its first byte, then TLS if configured, then HTTP; the first
/// byte, the handshake and the first request head (through a CONNECT tunnel's own handshake)
/// all within one set-up deadline, `header_read_timeout_ms` from accept. `_open` is held while
/// it lives, so that shutdown waits for it.
pub(crate) async fn serve_accepted(
    stream: TcpStream,
    origin: Origin,
    registration: Registration,
    shared: Arc<Shared>,
    tls: Option<Arc<ListenerTls>>,
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
        let Some(tls) = tls else {
            return serve_connection(socket, shared, origin).await;
        };
        let stream = match TlsAcceptor::from(tls.config()).accept(socket).await {
            Ok(stream) => stream,
            Err(error) => {
                return match client_cert_refusal(&error) {
                    Some(reason) => {
                        shared.metrics.client_cert_refused(reason);
                        info!(%peer, %error, "connection refused: its client certificate failed verification ([listener] client_ca)")
                    }
                    None => debug!(%peer, %error, "TLS handshake failed"),
                }
            }
        };
        // Who is calling, from the verified client certificate: for every request on this
        // connection, and in the tunnels it opens.
        let (caller, caller_until) = match tls.caller(stream.get_ref().1) {
            Ok(Some((caller, not_after))) => (Some(caller), Some(instant_of(not_after))),
            Ok(None) => (None, None),
            Err(error) => {
                shared.metrics.client_cert_refused(match error {
                    IdentityError::Expired(_) => ClientCertRefusal::expired_session,
                    _ => ClientCertRefusal::identity,
                });
                return info!(%peer, %error, "connection refused: its client certificate names no usable caller");
            }
        };
        if let Some(caller) = &caller {
            debug!(%peer, %caller, "TLS client certificate verified");
        }
        let origin = Origin {
            caller,
            caller_until,
            ..origin
        };
        serve_connection(stream, shared, origin).await;
    };
    tokio::select! {
        () = serving => {}
        () = conn.setup_expired() => {
            metrics.setup_timeout();
            debug!(%peer, "connection closed: its set-up (first byte, TLS, CONNECT, first request head) outlasted header_read_timeout_ms");
        }
    }
}

/// Serves the connection inside an intercepted tunnel (the [`Shared::serve_tunnel`] hook).
pub(crate) fn serve_tunnel(
    io: InterceptedStream,
    shared: Arc<Shared>,
    origin: Origin,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(serve_connection(io, shared, origin))
}
