//! What every connection shares, and where a request came from: types only, so that every module
//! of the proxy can name them without importing one another.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::sync::watch;

use super::bodies::BodyBudget;
use super::budget::{Budget, Conn, InFlight};
use super::connector::{OwnAddresses, UpstreamResolver};
use super::upstream::Upstream;
use crate::audit::AuditLog;
use crate::config::{Config, LimitsConfig, Resolver};
use crate::decide::Rules;
use crate::glob::HostGlob;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::tls::LeafMinter;

/// What every connection's requests share.
pub(crate) struct Shared {
    /// The policy in force; reloads swap it, and a request loads it once.
    pub policy: Arc<ArcSwap<Policy>>,
    pub audit: Arc<AuditLog>,
    pub upstream: Upstream,
    pub limits: LimitsConfig,
    /// The bytes of tag-bearing bodies held, all connections together
    /// (`[limits].max_buffered_body_bytes`).
    pub bodies: Arc<BodyBudget>,
    /// The open connections (and HTTP/2 CONNECT tunnels) and `[limits].max_connections`.
    pub budget: Arc<Budget>,
    pub metrics: Arc<Metrics>,
    /// HTTP/1.1 + h2 settings of the general server, for every connection handed to it.
    pub server: auto::Builder<TokioExecutor>,
    pub tunnels: Tunnels,
    pub lifecycle: Lifecycle,
    /// Serves the connection inside an intercepted tunnel as any other connection is served.
    /// Held here so that CONNECT reaches the connection layer without importing it.
    pub serve_tunnel: ServeTunnel,
}

impl Shared {
    /// The rules a decision is made against, with `policy` (loaded once per request).
    pub(crate) fn rules<'a>(&'a self, policy: &'a Policy) -> Rules<'a> {
        Rules {
            policy,
            upstream: self.upstream.config(),
            max_body_bytes: self.limits.max_body_bytes,
        }
    }
}

/// The stream of an intercepted tunnel, once its TLS is terminated.
pub(crate) type InterceptedStream =
    tokio_rustls::server::TlsStream<TokioIo<hyper::upgrade::Upgraded>>;

/// How an intercepted tunnel's connection is served (`connection::serve_tunnel`).
pub(crate) type ServeTunnel =
    fn(InterceptedStream, Arc<Shared>, Origin) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where a request came from: the client's address, for a request inside an intercepted tunnel
/// the host the client asked to CONNECT to, the caller's identity, and the connection as the
/// budget sees it.
#[derive(Clone)]
pub(crate) struct Origin {
    pub peer: SocketAddr,
    pub tunnel_host: Option<Arc<str>>,
    /// The caller the TLS listener's verified client certificate names (`crate::identity`): set
    /// after the handshake; inside an intercepted tunnel, the caller of the connection that
    /// sent the CONNECT (the TLS inside is the proxy's own, with no client certificate).
    pub caller: Option<Arc<str>>,
    /// When the certificate that names the caller ends: the connection (a tunnel's, too) is
    /// closed at its first idle moment after.
    pub caller_until: Option<Instant>,
    pub conn: Arc<Conn>,
}

/// Put on an HTTP/2 CONNECT request: the stream's tunnel holds it, so the connection counts as
/// busy (not idle, never closed for room) while any of its tunnels lives.
#[derive(Clone)]
pub(crate) struct TunnelHold(#[allow(dead_code)] pub Arc<InFlight>);

/// Telling connections to wind down, and knowing when they have.
pub(crate) struct Lifecycle {
    /// Set when the listener closes, after the drain delay: connections finish what is in
    /// flight and close.
    pub closing: watch::Sender<bool>,
    /// Every open connection holds a receiver; shutdown waits until none is left.
    pub connections: watch::Sender<()>,
    /// Set when the shutdown grace period is over: a tag change still waiting for KMS answers its
    /// client (504) and records its outcome as `applied: "unknown"` before its connection ends.
    pub grace_over: watch::Sender<bool>,
}

impl Lifecycle {
    /// Resolves when the shutdown grace period is over (never, until then).
    pub(crate) fn grace_over(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut over = self.grace_over.subscribe();
        async move {
            let _ = over.wait_for(|over| *over).await;
        }
    }

    pub(crate) fn new() -> Lifecycle {
        Lifecycle {
            closing: watch::channel(false).0,
            connections: watch::channel(()).0,
            grace_over: watch::channel(false).0,
        }
    }
}

/// What CONNECT needs to know.
pub(crate) struct Tunnels {
    pub minter: Option<Arc<LeafMinter>>,
    pub kms_hosts: Vec<HostGlob>,
    pub tunnel_hosts: Vec<HostGlob>,
    pub resolver: UpstreamResolver,
    pub own: OwnAddresses,
    pub connect_timeout: Duration,
    /// `[intercept].tunnel_idle_timeout_ms`.
    pub idle_timeout: Duration,
}

impl Tunnels {
    pub(crate) fn new(
        config: &Config,
        minter: Option<Arc<LeafMinter>>,
        own: OwnAddresses,
    ) -> Result<Tunnels, String> {
        Ok(Tunnels {
            minter,
            kms_hosts: config.upstream.allowed_hosts.clone(),
            tunnel_hosts: config.intercept.tunnel_hosts.clone(),
            resolver: UpstreamResolver::new(config.upstream.resolver == Resolver::Dns)?,
            own,
            connect_timeout: config.upstream.connect_timeout,
            idle_timeout: config.intercept.tunnel_idle_timeout,
        })
    }
}
