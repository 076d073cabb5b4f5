//! How the proxy opens TCP connections to KMS: name resolution, and a guard against connecting
//! to itself.
//!
//! In a sidecar (deployment mode A) the pod's `/etc/hosts` maps the KMS name to 127.0.0.1 so that
//! the application reaches the proxy; the proxy must then resolve that name by DNS alone
//! (`resolver = "dns"`), or it would send every request back to itself. Whatever the resolver, a
//! connection that lands on one of the proxy's own listeners is dropped and answered 502.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Resolves upstream names: the system resolver (getaddrinfo, `/etc/hosts` included) or DNS only.
#[derive(Clone)]
pub enum UpstreamResolver {
    System(GaiResolver),
    Dns(Arc<hickory_resolver::TokioResolver>),
}

impl UpstreamResolver {
    /// A resolver for `[upstream].resolver`.
    pub fn new(dns_only: bool) -> Result<UpstreamResolver, String> {
        if !dns_only {
            return Ok(UpstreamResolver::System(GaiResolver::new()));
        }
        let mut builder = hickory_resolver::TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?;
        // The point of this resolver: /etc/hosts may map the KMS name to this proxy.
        builder.options_mut().use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
        let resolver = builder
            .build()
            .map_err(|e| format!("cannot build the DNS resolver: {e}"))?;
        Ok(UpstreamResolver::Dns(Arc::new(resolver)))
    }
}

impl Service<Name> for UpstreamResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        match self {
            UpstreamResolver::System(gai) => {
                let lookup = gai.call(name);
                Box::pin(async move {
                    let addrs: Vec<SocketAddr> = lookup.await?.collect();
                    Ok(addrs.into_iter())
                })
            }
            UpstreamResolver::Dns(resolver) => {
                let resolver = Arc::clone(resolver);
                Box::pin(async move {
                    let ips = resolver.lookup_ip(name.as_str()).await?;
                    let addrs: Vec<SocketAddr> =
                        ips.iter().map(|ip| SocketAddr::new(ip, 0)).collect();
                    Ok(addrs.into_iter())
                })
            }
        }
    }
}

/// The addresses the proxy itself listens on, filled in once the listeners are bound.
#[derive(Debug, Default, Clone)]
pub struct OwnAddresses(Arc<RwLock<Vec<SocketAddr>>>);

impl OwnAddresses {
    pub fn add(&self, address: SocketAddr) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(address);
    }

    /// Whether a connection from `local` to `peer` reached one of the proxy's listeners.
    pub fn is_own(&self, local: SocketAddr, peer: SocketAddr) -> bool {
        let own = self.0.read().unwrap_or_else(|e| e.into_inner());
        own.iter().any(|listener| {
            listener.port() == peer.port()
                && (listener.ip() == peer.ip()
                    || (listener.ip().is_unspecified()
                        && (peer.ip().is_loopback() || peer.ip() == local.ip())))
        })
    }
}

/// An [`HttpConnector`] that refuses connections to the proxy's own listeners.
#[derive(Clone)]
pub struct GuardedConnector {
    inner: HttpConnector<UpstreamResolver>,
    own: OwnAddresses,
}

impl GuardedConnector {
    pub fn new(inner: HttpConnector<UpstreamResolver>, own: OwnAddresses) -> GuardedConnector {
        GuardedConnector { inner, own }
    }
}

/// The message of a refused loop; the proxy's 502 answer carries it.
#[derive(Debug, thiserror::Error)]
#[error("refusing to connect to {peer}: that is kms-tag-guard's own listener (a forwarding loop); the upstream name resolves to this proxy, so set [upstream] resolver = \"dns\" or an endpoint that is not this proxy")]
pub struct LoopError {
    pub peer: SocketAddr,
}

impl Service<Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let own = self.own.clone();
        Box::pin(async move {
            let io = connecting.await?;
            let stream = io.inner();
            let (local, peer) = (stream.local_addr()?, stream.peer_addr()?);
            if own.is_own(local, peer) {
                return Err(Box::new(LoopError { peer }) as BoxError);
            }
            Ok(io)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_its_own_listeners() {
        let own = OwnAddresses::default();
        own.add("127.0.0.1:8080".parse().unwrap());
        own.add("0.0.0.0:8443".parse().unwrap());
        let local = "127.0.0.1:50000".parse().unwrap();
        assert!(own.is_own(local, "127.0.0.1:8080".parse().unwrap()));
        assert!(!own.is_own(local, "127.0.0.1:8081".parse().unwrap()));
        assert!(!own.is_own(local, "127.0.0.2:8080".parse().unwrap()));
        assert!(own.is_own(local, "127.0.0.1:8443".parse().unwrap()));
        let lan: SocketAddr = "10.0.0.5:50000".parse().unwrap();
        assert!(own.is_own(lan, "10.0.0.5:8443".parse().unwrap()));
        assert!(!own.is_own(lan, "10.0.0.6:8443".parse().unwrap()));
    }
}

#[cfg(test)]
mod loop_tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_to_an_own_listener_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let own = OwnAddresses::default();
        own.add(address);
        let mut http = HttpConnector::new_with_resolver(UpstreamResolver::new(false).unwrap());
        http.enforce_http(false);
        let mut connector = GuardedConnector::new(http, own);
        let uri: Uri = format!("http://{address}/").parse().unwrap();
        let Err(error) = connector.call(uri).await else {
            panic!("a connection to the proxy's own listener was allowed");
        };
        assert!(error.to_string().contains("forwarding loop"), "{error}");
        let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/", other.local_addr().unwrap())
            .parse()
            .unwrap();
        assert!(connector.call(uri).await.is_ok());
    }
}
