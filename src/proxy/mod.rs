//! The proxy: listener, connections, and the request pipeline behind them.

mod accept;
mod bodies;
mod body;
mod budget;
mod connect;
mod connection;
mod connector;
mod framing;
mod general;
mod h1;
mod headers;
mod lane;
mod rewind;
mod state;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::info;

pub use crate::answer::ProxyError;

use crate::admin::{self, AdminState};
use crate::audit::{AuditError, AuditLog};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::mtls::ListenerTls;
use crate::reload::{Live, Reloader};
use crate::tls::LeafMinter;
pub use body::ProxyBody;
use connector::OwnAddresses;
use state::{Lifecycle, Shared, Tunnels};
use upstream::{Upstream, UpstreamSetupError};

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
    #[error(transparent)]
    Tls(crate::tls::TlsError),
    #[error("cannot start the connection threads: {0}; the process may be out of threads or memory (check ulimit -u and the container's limits)")]
    Threads(std::io::Error),
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

/// Everything `start` reads and checks before it listens: the listener's certificate and key
/// and the client CA bundle,
/// the interception CA (its checks, the key's permissions), the upstream's CA file, the audit
/// file's directory, the audit signing key. `kms-tag-guard check` runs this and stops, so that
/// it refuses exactly what `serve` would refuse to start with.
pub struct Prepared {
    tls: Option<Arc<ListenerTls>>,
    minter: Option<Arc<LeafMinter>>,
    metrics: Arc<Metrics>,
    upstream: Upstream,
    own_addresses: OwnAddresses,
}

/// Reads and checks every file the configuration names, as `start` does (see [`Prepared`]). Call
/// it inside a Tokio runtime.
pub fn prepare(config: &Config) -> Result<Prepared, StartError> {
    let tls = match &config.listener.tls {
        Some(files) => Some(Arc::new(
            ListenerTls::load(files, config.listener.client_auth.as_ref())
                .map_err(StartError::Tls)?,
        )),
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    let minter = match &config.intercept.ca {
        Some(files) => Some(Arc::new(
            LeafMinter::load(files, config.intercept.ca_key_group_readable)
                .map_err(StartError::Tls)?
                .with_capacity(config.intercept.leaf_cache_size)
                .with_metrics(Arc::clone(&metrics)),
        )),
        None => None,
    };
    let own_addresses = OwnAddresses::default();
    let upstream = Upstream::new(
        &config.upstream,
        Arc::clone(&metrics),
        own_addresses.clone(),
    )?;
    crate::audit::check_path(&config.audit.path)?;
    if let Some(key) = &config.audit.signing_key {
        crate::integrity::keys::load_signing_key(key).map_err(AuditError::from)?;
    }
    Ok(Prepared {
        tls,
        minter,
        metrics,
        upstream,
        own_addresses,
    })
}

impl StartError {
    /// Whether the configuration (or a file it names) is at fault, rather than the machine
    /// (a port in use, no threads): `serve` and `check` exit with 78 (EX_CONFIG) for these.
    pub fn is_config(&self) -> bool {
        !matches!(self, StartError::Bind { .. } | StartError::Threads(_))
    }
}

/// Checks the configuration's files ([`prepare`]), opens the audit log, binds the listeners and
/// starts serving.
pub async fn start(config: Config) -> Result<RunningProxy, StartError> {
    let Prepared {
        tls,
        minter,
        metrics,
        upstream,
        own_addresses,
    } = prepare(&config)?;
    metrics.policy_in_force(&config.sha256);
    let budget = Arc::new(budget::Budget::new(
        connection_limit(config.limits.max_connections),
        config.limits.header_read_timeout,
        Arc::clone(&metrics),
    ));
    let shared = Arc::new(Shared {
        policy: Arc::new(ArcSwap::new(Arc::clone(&config.policy))),
        audit: Arc::new(AuditLog::open(&config.audit, Arc::clone(&metrics))?),
        upstream,
        limits: config.limits.clone(),
        bodies: bodies::BodyBudget::new(
            config.limits.max_buffered_body_bytes,
            Arc::clone(&metrics),
        ),
        budget,
        metrics: Arc::clone(&metrics),
        server: connection::http_server(&config),
        lifecycle: Lifecycle::new(),
        serve_tunnel: connection::serve_tunnel,
        tunnels: Tunnels::new(&config, minter.clone(), own_addresses.clone())
            .map_err(|e| StartError::Upstream(UpstreamSetupError::Resolver(e)))?,
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
    info!(%local_addr, admin = %admin_text, config = %config.source, rules = config.policy.rule_count(), "kms-tag-guard listening");

    let (stop, stopped) = watch::channel(false);
    let control = Arc::new(Control {
        stop,
        reload: Arc::new(Notify::new()),
        admin: Arc::clone(&admin_state),
    });
    let reloader = Reloader::new(
        Live {
            policy: Arc::clone(&shared.policy),
            audit: Arc::clone(&shared.audit),
            metrics: Arc::clone(&shared.metrics),
        },
        &config,
        tls.clone(),
        minter,
    );
    let threads = accept::ConnectionThreads::start(&shared, tls).map_err(StartError::Threads)?;
    // Nothing is spawned until nothing else can fail.
    let admin_task = admin.map(|(listener, _)| tokio::spawn(admin::serve(listener, admin_state)));
    tokio::spawn(reloader.run(Arc::clone(&control.reload), stopped.clone()));
    let task = tokio::spawn(async move {
        accept::serve(listener, threads, shared, config, stopped).await;
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

/// `[limits].max_connections`, lowered to what the file descriptor limit can hold (two per
/// connection, and a reserve), so that the limit is met before `accept` fails for lack of them.
fn connection_limit(configured: usize) -> usize {
    let Ok((soft, _)) = crate::fds::nofile() else {
        return configured;
    };
    let fits = usize::try_from(crate::fds::connections_within(soft)).unwrap_or(usize::MAX);
    if configured <= fits {
        return configured;
    }
    let lowered = fits.max(1);
    tracing::warn!(
        max_connections = configured,
        lowered_to = lowered,
        nofile_soft_limit = soft,
        "[limits].max_connections does not fit the file descriptor limit (two per connection and a reserve); raise the hard RLIMIT_NOFILE (ulimit -Hn, LimitNOFILE=, the container runtime's nofile) or lower max_connections"
    );
    lowered
}

/// How many connections may wait to be accepted: bursts of new connections from many pods
/// overflow the usual 128 and stall in the kernel's retransmit back-off.
const LISTEN_BACKLOG: u32 = 1024;

async fn bind(address: SocketAddr) -> Result<TcpListener, StartError> {
    let bound = || -> std::io::Result<TcpListener> {
        let socket = match address {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(address)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bound().map_err(|source| StartError::Bind { address, source })
}
