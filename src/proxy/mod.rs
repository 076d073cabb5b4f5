//! The proxy: listener, connections, and the request pipeline behind them.

mod error;
mod headers;
mod pipeline;
pub mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub use error::ProxyError;

use crate::audit::{AuditError, AuditLog};
use crate::config::{Config, Resolver};
use pipeline::Shared;
use upstream::{Upstream, UpstreamSetupError};

/// A body the proxy streams from a peer, or one it holds whole.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {address}: {source}; is another process using the port?")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Upstream(#[from] UpstreamSetupError),
    #[error(
        "{0} is not supported by this version of kms-tag-guard; remove it from the configuration"
    )]
    Unsupported(&'static str),
}

/// A proxy serving on its listener.
pub struct RunningProxy {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningProxy {
    /// The address the listener is bound to (the real port when the config said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and lets in-flight requests finish within `[shutdown].grace_ms`.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until the proxy has stopped.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Opens the audit log, sets up the upstream client, binds the listener and starts serving.
pub async fn start(config: Config) -> Result<RunningProxy, StartError> {
    if config.listener.tls.is_some() {
        return Err(StartError::Unsupported("[listener] tls_cert/tls_key"));
    }
    if config.intercept.ca.is_some() {
        return Err(StartError::Unsupported("[intercept] ca_cert/ca_key"));
    }
    if config.upstream.resolver == Resolver::Dns {
        return Err(StartError::Unsupported("[upstream] resolver = \"dns\""));
    }
    if config.admin.address.is_some() {
        return Err(StartError::Unsupported(
            "the admin port; set [admin] address = \"\"",
        ));
    }
    let shared = Arc::new(Shared {
        policy: ArcSwap::new(Arc::clone(&config.policy)),
        audit: Arc::new(AuditLog::open(&config.audit)?),
        upstream: Upstream::new(&config.upstream)?,
        limits: config.limits.clone(),
    });
    let address = config.listener.address;
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Bind { address, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| StartError::Bind { address, source })?;
    info!(%local_addr, config = %config.source, rules = config.policy.rules.len(), "kms-tag-guard listening");

    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(serve(listener, shared, config, stopped));
    Ok(RunningProxy {
        local_addr,
        stop,
        task,
    })
}

async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    config: Config,
    mut stopped: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(%error, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let shared = Arc::clone(&shared);
                let service = service_fn(move |request| {
                    let shared = Arc::clone(&shared);
                    async move { Ok::<_, Infallible>(pipeline::handle(shared, request, peer).await) }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        debug!(%peer, %error, "connection ended with an error");
                    }
                });
            }
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    info!(
        grace_ms = config.shutdown.grace.as_millis() as u64,
        "draining connections"
    );
    if tokio::time::timeout(config.shutdown.grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("grace period over; closing the remaining connections");
    }
}
