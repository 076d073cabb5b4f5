//! CONNECT (HTTPS_PROXY clients): intercept KMS, tunnel the listed hosts blind, refuse the rest.
//!
//! A CONNECT to a KMS name (`[upstream].allowed_hosts`) is answered 200 and its TLS is terminated
//! with a leaf minted for that name, so every request inside goes through the same pipeline as
//! any other. A CONNECT to `[intercept].tunnel_hosts` (STS, S3, ...) is spliced blind. Anything
//! else gets 403 and no outbound connection: the proxy is never an open proxy. A KMS name is
//! never tunnelled blind, whatever `tunnel_hosts` says.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;
use tracing::{debug, info};

use super::connector::{OwnAddresses, UpstreamResolver};
use super::error::ProxyError;
use super::serve::{serve_connection, Origin};
use super::Shared;
use crate::config::{Config, Resolver};
use crate::glob::HostGlob;
use crate::metrics::Outcome;
use crate::tls::{server_config, LeafMinter, TunnelCert};

/// The only port CONNECT may name: KMS and the AWS endpoints worth tunnelling speak HTTPS on 443.
const TUNNEL_PORT: u16 = 443;

/// What CONNECT needs to know.
pub(crate) struct Tunnels {
    minter: Option<Arc<LeafMinter>>,
    kms_hosts: Vec<HostGlob>,
    tunnel_hosts: Vec<HostGlob>,
    resolver: UpstreamResolver,
    own: OwnAddresses,
    connect_timeout: Duration,
    handshake_timeout: Duration,
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
            handshake_timeout: config.limits.header_read_timeout,
        })
    }
}

/// The answer to a CONNECT and, for the metrics, what became of it.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    origin: &Origin,
    request_id: &str,
) -> (Response<super::ProxyBody>, Outcome) {
    let refuse = |error: ProxyError| (error.clone().into_response(request_id), error.outcome());
    if origin.tunnel_host.is_some() {
        return refuse(ProxyError::ConnectRefused(
            "a CONNECT inside a tunnel".into(),
        ));
    }
    let Some(authority) = request.uri().authority().cloned() else {
        return refuse(ProxyError::Unreadable(
            "CONNECT needs a host:port target".into(),
        ));
    };
    let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
    let port = authority.port_u16().unwrap_or(TUNNEL_PORT);
    let tunnels = &shared.tunnels;
    let is_kms = tunnels.kms_hosts.iter().any(|g| g.matches(&host));
    if port != TUNNEL_PORT {
        return refuse(ProxyError::ConnectRefused(format!(
            "{authority}: only port {TUNNEL_PORT} may be tunnelled"
        )));
    }
    if is_kms {
        let Some(minter) = tunnels.minter.clone() else {
            return refuse(ProxyError::ConnectRefused(format!(
                "{host} is a KMS host, and KMS traffic is only tunnelled when it can be inspected ([intercept] ca_cert/ca_key)"
            )));
        };
        intercept(shared, request, origin.peer, host, minter);
        info!(%request_id, peer = %origin.peer, %authority, "CONNECT intercepted");
        return (established(request_id), Outcome::pass);
    }
    if !tunnels.tunnel_hosts.iter().any(|g| g.matches(&host)) {
        return refuse(ProxyError::ConnectRefused(format!(
            "{host} is neither a KMS host nor in [intercept].tunnel_hosts"
        )));
    }
    // Connect before answering 200, so a failure is a clear 502 rather than a dead tunnel.
    let target = match connect_tcp(tunnels, &host, port).await {
        Ok(target) => target,
        Err(message) => return refuse(ProxyError::UpstreamConnect(message)),
    };
    let peer = origin.peer;
    tokio::spawn(async move {
        match hyper::upgrade::on(request).await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                let mut target = target;
                if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut target).await {
                    debug!(%peer, %error, "blind tunnel ended with an error");
                }
            }
            Err(error) => debug!(%peer, %error, "CONNECT upgrade failed"),
        }
    });
    info!(%request_id, %peer, %authority, "CONNECT tunnelled blind");
    (established(request_id), Outcome::pass)
}

fn established(request_id: &str) -> Response<super::ProxyBody> {
    let mut response = Response::new(Either::Right(Full::default()));
    *response.status_mut() = StatusCode::OK;
    if let Ok(id) = http::HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-amzn-requestid", id);
    }
    response
}

/// Terminates the tunnel's TLS with a leaf for `host` and serves the requests inside.
fn intercept(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    peer: SocketAddr,
    host: String,
    minter: Arc<LeafMinter>,
) {
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(request).await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                debug!(%peer, %error, "CONNECT upgrade failed");
                return;
            }
        };
        let resolver = Arc::new(TunnelCert {
            host: host.clone(),
            minter,
        });
        let config = match server_config(resolver) {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(%error, "cannot set up TLS for an intercepted tunnel");
                return;
            }
        };
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let timeout = shared.tunnels.handshake_timeout;
        let stream =
            match tokio::time::timeout(timeout, acceptor.accept(TokioIo::new(upgraded))).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    info!(%peer, %host, %error, "TLS handshake inside the tunnel failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, %host, "TLS handshake inside the tunnel timed out");
                    return;
                }
            };
        let origin = Origin {
            peer,
            tunnel_host: Some(host.into()),
        };
        serve_connection(stream, shared, origin).await;
    });
}

/// Opens a TCP connection for a blind tunnel, through the configured resolver and the loop guard.
async fn connect_tcp(tunnels: &Tunnels, host: &str, port: u16) -> Result<TcpStream, String> {
    let addresses: Vec<SocketAddr> = match host.parse() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            let name = Name::from_str(host).map_err(|e| format!("{host}: {e}"))?;
            let mut resolver = tunnels.resolver.clone();
            resolver
                .call(name)
                .await
                .map_err(|e| format!("cannot resolve {host}: {e}"))?
                .map(|a| SocketAddr::new(a.ip(), port))
                .collect()
        }
    };
    let mut last_error = format!("{host} resolves to no address");
    for address in addresses {
        match tokio::time::timeout(tunnels.connect_timeout, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => {
                let local = stream.local_addr().map_err(|e| e.to_string())?;
                if tunnels.own.is_own(local, address) {
                    return Err(format!(
                        "refusing to tunnel to {address}: that is kms-tag-guard's own listener (a forwarding loop)"
                    ));
                }
                return Ok(stream);
            }
            Ok(Err(error)) => last_error = format!("cannot connect to {address}: {error}"),
            Err(_) => last_error = format!("connecting to {address} timed out"),
        }
    }
    Err(last_error)
}
