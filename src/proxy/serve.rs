//! Accepting connections and serving HTTP on them: plain, behind the listener's TLS, or inside an
//! intercepted CONNECT tunnel. Every request on any of them goes through the same pipeline.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::pipeline::{self, Shared};
use crate::config::Config;

/// Where a request came from: the client's address, and for a request inside an intercepted
/// tunnel, the host the client asked to CONNECT to.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub peer: SocketAddr,
    pub tunnel_host: Option<Arc<str>>,
}

/// The read buffer of an HTTP/1 connection, which bounds a request head.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The HTTP/1.1 + h2 server settings every connection uses.
pub(crate) fn http_server(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.limits.header_read_timeout)
        // KMS request heads are a few KiB; hyper's default buffer (~400 KiB) would let a client
        // park that much per connection. Larger heads get 431.
        .max_buf_size(MAX_HEAD_BYTES);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Serves HTTP on one connection until it closes.
pub(crate) async fn serve_connection<I>(
    io: I,
    shared: Arc<Shared>,
    origin: Origin,
    watcher: Option<Watcher>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = origin.peer;
    let service_shared = Arc::clone(&shared);
    let service = service_fn(move |request| {
        let shared = Arc::clone(&service_shared);
        let origin = origin.clone();
        async move { Ok::<_, Infallible>(pipeline::handle(shared, request, origin).await) }
    });
    let connection = shared
        .server
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    let result = match watcher {
        Some(watcher) => watcher.watch(connection.into_owned()).await,
        None => connection.await,
    };
    if let Err(error) = result {
        debug!(%peer, %error, "connection ended with an error");
    }
}

/// Accepts connections until `stopped`, keeps accepting for the drain delay, then waits up to
/// the grace period for in-flight requests.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    config: Config,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    // Set when the listener closes, after the drain delay.
    let (closing, closing_rx) = watch::channel(false);
    let first_byte_timeout = config.limits.header_read_timeout;

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
                let connection = Accepted {
                    stream,
                    origin: Origin { peer, tunnel_host: None },
                    shared: Arc::clone(&shared),
                    tls: tls.clone(),
                    watcher: graceful.watcher(),
                    closing: closing_rx.clone(),
                    first_byte_timeout,
                };
                tokio::spawn(connection.serve());
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
    let _ = closing.send(true);
    info!(
        grace_ms = config.shutdown.grace.as_millis() as u64,
        "listener closed; waiting for in-flight requests"
    );
    if tokio::time::timeout(config.shutdown.grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("grace period over; closing the remaining connections");
    }
    info!("stopped");
}

/// One accepted TCP connection, before its first byte.
struct Accepted {
    stream: TcpStream,
    origin: Origin,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    watcher: Watcher,
    closing: watch::Receiver<bool>,
    first_byte_timeout: Duration,
}

impl Accepted {
    async fn serve(mut self) {
        // hyper's header timeout runs only once it reads a request; before that, the TLS
        // handshake and the HTTP/1-or-h2 detection wait for bytes with no limit. A client that
        // connects and says nothing is dropped after the same timeout, or at shutdown.
        let mut first = [0u8; 1];
        tokio::select! {
            peeked = tokio::time::timeout(self.first_byte_timeout, self.stream.peek(&mut first)) => {
                if !matches!(peeked, Ok(Ok(n)) if n > 0) {
                    return;
                }
            }
            _ = self.closing.wait_for(|closed| *closed) => return,
        }
        let peer = self.origin.peer;
        match self.tls {
            None => {
                serve_connection(self.stream, self.shared, self.origin, Some(self.watcher)).await
            }
            Some(acceptor) => {
                match tokio::time::timeout(self.first_byte_timeout, acceptor.accept(self.stream))
                    .await
                {
                    Ok(Ok(stream)) => {
                        serve_connection(stream, self.shared, self.origin, Some(self.watcher)).await
                    }
                    Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            }
        }
    }
}
