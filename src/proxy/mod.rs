//! The proxy: listener, connections, and the request pipeline behind them.

mod connector;
mod error;
mod headers;
mod pipeline;
pub mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub use error::ProxyError;

use crate::admin::{self, AdminState};
use crate::audit::{AuditError, AuditLog};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::reload::Reloader;
use connector::OwnAddresses;
pub(crate) use pipeline::Shared;
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
    admin_addr: Option<SocketAddr>,
    control: Arc<Control>,
    task: JoinHandle<()>,
}

/// How the outside steers a running proxy.
struct Control {
    stop: watch::Sender<bool>,
    reload: Arc<Notify>,
    admin: Arc<AdminState>,
}

impl RunningProxy {
    /// The address the listener is bound to (the real port when the config said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin port's address, unless it is disabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Starts a graceful shutdown: `/readyz` fails at once, new connections are still accepted for
    /// `[shutdown].drain_delay_ms` (while load balancers notice), then the listener closes and
    /// in-flight requests get `[shutdown].grace_ms` to finish.
    pub fn shutdown(&self) {
        self.control.admin.draining.store(true, Ordering::SeqCst);
        let _ = self.control.stop.send(true);
    }

    /// Reopens the audit file and reloads the policy from the config file now (what SIGHUP does).
    pub fn reload(&self) {
        self.control.reload.notify_one();
    }

    /// Waits until the proxy has stopped.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Opens the audit log, sets up the upstream client, binds the listeners and starts serving.
pub async fn start(config: Config) -> Result<RunningProxy, StartError> {
    if config.listener.tls.is_some() {
        return Err(StartError::Unsupported("[listener] tls_cert/tls_key"));
    }
    if config.intercept.ca.is_some() {
        return Err(StartError::Unsupported("[intercept] ca_cert/ca_key"));
    }
    let own_addresses = OwnAddresses::default();
    let metrics = Arc::new(Metrics::new());
    metrics.policy_in_force(&config.sha256);
    let shared = Arc::new(Shared {
        policy: ArcSwap::new(Arc::clone(&config.policy)),
        audit: Arc::new(AuditLog::open(&config.audit, Arc::clone(&metrics))?),
        upstream: Upstream::new(
            &config.upstream,
            Arc::clone(&metrics),
            own_addresses.clone(),
        )?,
        limits: config.limits.clone(),
        metrics: Arc::clone(&metrics),
    });
    let listener = bind(config.listener.address).await?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
        address: config.listener.address,
        source,
    })?;
    own_addresses.add(local_addr);
    let admin_state = Arc::new(AdminState {
        metrics,
        draining: AtomicBool::new(false),
    });
    let admin = match config.admin.address {
        Some(address) => {
            let listener = bind(address).await?;
            let address = listener
                .local_addr()
                .map_err(|source| StartError::Bind { address, source })?;
            own_addresses.add(address);
            Some((listener, address))
        }
        None => None,
    };
    let admin_addr = admin.as_ref().map(|(_, address)| *address);
    let admin_text = admin_addr.map_or_else(|| "disabled".to_owned(), |a| a.to_string());
    info!(%local_addr, admin = %admin_text, config = %config.source, rules = config.policy.rules.len(), "kms-tag-guard listening");

    let (stop, stopped) = watch::channel(false);
    let control = Arc::new(Control {
        stop,
        reload: Arc::new(Notify::new()),
        admin: Arc::clone(&admin_state),
    });
    let admin_task = admin.map(|(listener, _)| tokio::spawn(admin::serve(listener, admin_state)));
    let reloader = Reloader::new(Arc::clone(&shared), &config);
    tokio::spawn(reloader.run(Arc::clone(&control.reload), stopped.clone()));
    let task = tokio::spawn(async move {
        serve(listener, shared, config, stopped).await;
        if let Some(admin_task) = admin_task {
            admin_task.abort();
        }
    });
    Ok(RunningProxy {
        local_addr,
        admin_addr,
        control,
        task,
    })
}

async fn bind(address: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Bind { address, source })
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
    // Set when the listener closes, after the drain delay.
    let (closing, closing_rx) = watch::channel(false);
    let first_byte_timeout = config.limits.header_read_timeout;

    // After the stop signal, accepting goes on until the drain delay is over.
    let drain = tokio::time::sleep(std::time::Duration::MAX);
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
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let shared = Arc::clone(&shared);
                let (builder, watcher) = (builder.clone(), graceful.watcher());
                let mut closing = closing_rx.clone();
                tokio::spawn(async move {
                    // hyper's header timeout runs only once it reads a request; before that, the
                    // HTTP/1-or-h2 detection waits for the first bytes with no limit. A client
                    // that connects and says nothing is dropped after the same timeout, or at
                    // shutdown.
                    let mut first = [0u8; 1];
                    tokio::select! {
                        peeked = tokio::time::timeout(first_byte_timeout, stream.peek(&mut first)) => {
                            if !matches!(peeked, Ok(Ok(n)) if n > 0) {
                                return;
                            }
                        }
                        _ = closing.wait_for(|closed| *closed) => return,
                    }
                    let service = service_fn(move |request| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(pipeline::handle(shared, request, peer).await) }
                    });
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    if let Err(error) = watcher.watch(connection.into_owned()).await {
                        debug!(%peer, %error, "connection ended with an error");
                    }
                });
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
