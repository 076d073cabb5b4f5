//! CONNECT (HTTPS_PROXY clients): intercept KMS, tunnel the listed hosts blind, refuse the rest.
//!
//! What is KMS is decided by the built-in endpoint shapes (`crate::endpoints`: every partition,
//! FIPS, dual-stack, VPC endpoint names) as well as by `[upstream].allowed_hosts`, so a KMS name
//! is never spliced blind, whatever `tunnel_hosts` says. A CONNECT to a KMS name that
//! `allowed_hosts` matches is answered 200 and its TLS is terminated with a leaf minted for that
//! name, so every request inside goes through the same pipeline as any other; leaves are minted
//! only for regional KMS endpoint names and for names `allowed_hosts` lists exactly. A CONNECT to
//! `[intercept].tunnel_hosts` (STS, S3, ...) is spliced blind. Anything else, and any port but
//! exactly `443`, gets 403 and no outbound connection: the proxy is never an open proxy.

use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioIo;
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::LazyConfigAcceptor;
use tower_service::Service;
use tracing::{debug, info};

use super::body::ProxyBody;
use super::budget::{Conn, Registration};
use super::state::{Origin, Shared, TunnelHold, Tunnels};
use crate::answer::ProxyError;
use crate::endpoints::{self, KmsName};
use crate::metrics::Outcome;
use crate::tls::{server_config, LeafMinter};

/// The only port CONNECT may name: KMS and the AWS endpoints worth tunnelling speak HTTPS on 443.
const TUNNEL_PORT: u16 = 443;

/// The answer to a CONNECT and, for the metrics, what became of it.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    origin: &Origin,
    request_id: &str,
) -> (Response<ProxyBody>, Outcome) {
    let refuse = |error: ProxyError| {
        let response = error.clone().into_response(request_id).map(Either::Right);
        (response, error.outcome())
    };
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
    let host = match connect_target(&authority) {
        Ok(host) => host,
        Err(message) => return refuse(ProxyError::ConnectRefused(message)),
    };
    let tunnels = &shared.tunnels;
    match tunnels.route(&host) {
        Route::Intercept => {
            let Some(minter) = tunnels.minter.clone() else {
                return refuse(ProxyError::ConnectRefused(format!(
                    "{host} is a KMS host, and KMS traffic is only tunnelled when it can be inspected ([intercept] ca_cert/ca_key)"
                )));
            };
            let conn = match tunnel_conn(&shared, &request, origin) {
                Ok(conn) => conn,
                Err(error) => return refuse(error),
            };
            intercept(shared, request, origin, host, minter, conn);
            info!(%request_id, peer = %origin.peer, %authority, "CONNECT intercepted");
            return (established(request_id), Outcome::pass);
        }
        Route::Refuse(message) => return refuse(ProxyError::ConnectRefused(message)),
        Route::Blind => {}
    }
    // Its place in the budget first, then the connection: before answering 200, so a failure
    // is a clear 502 rather than a dead tunnel.
    let tunnel = match tunnel_conn(&shared, &request, origin) {
        Ok(tunnel) => tunnel,
        Err(error) => return refuse(error),
    };
    let target = match connect_tcp(tunnels, &host, TUNNEL_PORT).await {
        Ok(target) => target,
        Err(message) => return refuse(ProxyError::TunnelConnect(message)),
    };
    let peer = origin.peer;
    tokio::spawn(blind(shared, request, peer, target, tunnel));
    info!(%request_id, %peer, %authority, "CONNECT tunnelled blind");
    (established(request_id), Outcome::pass)
}

/// How long a blind tunnel is kept at shutdown after its last byte: an exchange in progress
/// (a request sent, its answer on the way) completes; within the grace period at most.
const DRAIN_QUIET: Duration = Duration::from_secs(1);

/// Splices a blind tunnel until either side closes, no byte has moved either way for
/// `[intercept].tunnel_idle_timeout_ms` (at shutdown: for [`DRAIN_QUIET`]), or the connection
/// budget needs its place while it is quiet.
async fn blind(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    peer: SocketAddr,
    target: TcpStream,
    tunnel: TunnelConn,
) {
    let conn = Arc::clone(&tunnel.conn);
    let upgraded = tokio::select! {
        upgraded = hyper::upgrade::on(request) => match upgraded {
            Ok(upgraded) => upgraded,
            Err(error) => return debug!(%peer, %error, "CONNECT upgrade failed"),
        },
        () = conn.setup_expired() => return,
    };
    conn.setup_done();
    conn.tunnel();
    let mut client = Touching {
        io: TokioIo::new(upgraded),
        conn: &conn,
    };
    let mut target = Touching {
        io: target,
        conn: &conn,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut target);
    tokio::pin!(copy);
    let mut closing = shared.lifecycle.closing.subscribe();
    let mut quiet = shared.tunnels.idle_timeout;
    let mut draining = false;
    loop {
        let idle_at = conn.idle_instant().unwrap_or_else(Instant::now) + quiet;
        tokio::select! {
            ended = copy.as_mut() => {
                if let Err(error) = ended {
                    debug!(%peer, %error, "blind tunnel ended with an error");
                }
                break;
            }
            () = tokio::time::sleep_until(idle_at.into()) => {
                if conn.idle_instant().is_some_and(|at| at + quiet <= Instant::now()) {
                    debug!(%peer, quiet_ms = quiet.as_millis() as u64, "closing a quiet blind tunnel");
                    break;
                }
            }
            _ = closing.wait_for(|closed| *closed), if !draining => {
                draining = true;
                quiet = quiet.min(DRAIN_QUIET);
            }
            () = conn.close_requested() => {
                debug!(%peer, "closing a quiet blind tunnel to make room ([limits].max_connections)");
                break;
            }
        }
    }
    drop(tunnel);
}

/// A side of a blind tunnel; each read that moves bytes marks the tunnel active.
struct Touching<'c, IO> {
    io: IO,
    conn: &'c Conn,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Touching<'_, IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn.touched();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Touching<'_, IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What a CONNECT to a host becomes.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Intercept,
    Blind,
    Refuse(String),
}

impl Tunnels {
    /// A KMS name (built in, or matched by `allowed_hosts`) is intercepted or refused, never
    /// tunnelled blind; a leaf is only minted for a built-in KMS endpoint name that
    /// `allowed_hosts` matches, or for a name `allowed_hosts` lists exactly, so the names a client
    /// can have minted are well-formed, not whatever a glob's `*` admits.
    fn route(&self, host: &str) -> Route {
        let kms = endpoints::kms_name(host);
        let allowed = self.kms_hosts.iter().find(|g| g.matches(host));
        let listed_exactly = self
            .kms_hosts
            .iter()
            .any(|g| g.is_literal() && g.matches(host));
        match (kms, allowed) {
            (None, None) if self.tunnel_hosts.iter().any(|g| g.matches(host)) => Route::Blind,
            (None, None) => Route::Refuse(format!(
                "{host} is neither a KMS host nor in [intercept].tunnel_hosts; add it to tunnel_hosts to let clients reach it through this proxy"
            )),
            (Some(_), None) => Route::Refuse(format!(
                "{host} is a KMS endpoint that [upstream].allowed_hosts does not list; KMS names are never tunnelled blind, so add it to allowed_hosts to have it intercepted"
            )),
            (Some(KmsName::Regional), Some(_)) => Route::Intercept,
            _ if listed_exactly => Route::Intercept,
            (_, Some(glob)) => Route::Refuse(format!(
                "{host} matches the allowed_hosts glob {:?} but is not a regional KMS endpoint name; list it exactly in [upstream].allowed_hosts to have it intercepted",
                glob.as_str()
            )),
        }
    }
}

/// The host of a CONNECT target, lowercase without a trailing dot; the port must be exactly
/// `443`, spelled so (`:+443`, `:0443`, `:65979` or a missing port are not 443).
fn connect_target(authority: &http::uri::Authority) -> Result<String, String> {
    if authority.as_str().contains('@') {
        // Not echoed: user information is credentials.
        return Err(format!(
            "a CONNECT target may not carry user information (not shown here); send host:{TUNNEL_PORT}"
        ));
    }
    match authority.port() {
        Some(port) if port.as_str() == "443" => {}
        Some(port) => {
            return Err(format!(
                "{authority}: only port {TUNNEL_PORT} may be tunnelled, not {:?}",
                port.as_str()
            ))
        }
        None => {
            return Err(format!(
                "{authority}: a CONNECT target needs a port, and only {TUNNEL_PORT} may be tunnelled; send {authority}:{TUNNEL_PORT}"
            ))
        }
    }
    let host = authority.host().to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    if host.is_empty() {
        return Err(format!("{authority}: the CONNECT target has no host"));
    }
    Ok(host.to_owned())
}

fn established(request_id: &str) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::default()));
    *response.status_mut() = StatusCode::OK;
    if let Ok(id) = http::HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-amzn-requestid", id);
    }
    response
}

/// What a tunnel is, as the connection budget and the set-up deadline see it: over HTTP/1.1,
/// the client connection itself (the deadline set at accept goes on through the handshake inside
/// and the first request head); over HTTP/2, one stream of it with a place of its own in the
/// budget (it may hold a connection of its own: a blind tunnel's, or KMS's), and so a deadline
/// of its own from now, while the outer connection counts as busy through the [`TunnelHold`] on
/// the request.
struct TunnelConn {
    conn: Arc<Conn>,
    /// Keeps an HTTP/2 tunnel's outer connection busy while the tunnel lives.
    _hold: Option<TunnelHold>,
    /// An HTTP/2 tunnel's place in the budget, held while the tunnel lives.
    _place: Option<Registration>,
    /// Held while the tunnel lives, so that shutdown waits for it.
    _open: watch::Receiver<()>,
}

/// `Err` when an HTTP/2 tunnel finds no place in the budget (every connection busy).
fn tunnel_conn(
    shared: &Shared,
    request: &Request<Incoming>,
    origin: &Origin,
) -> Result<TunnelConn, ProxyError> {
    let hold = request.extensions().get::<TunnelHold>().cloned();
    let (conn, place) = match hold {
        None => (Arc::clone(&origin.conn), None),
        Some(_) => {
            // No descriptor of its own to shut down: asked to close, it ends its stream.
            let place = shared.budget.admit(-1).ok_or_else(|| {
                ProxyError::TunnelConnect(
                    "the connection limit ([limits].max_connections) is reached and every connection has a request in flight".into(),
                )
            })?;
            (Arc::clone(place.conn()), Some(place))
        }
    };
    Ok(TunnelConn {
        conn,
        _hold: hold,
        _place: place,
        _open: shared.lifecycle.connections.subscribe(),
    })
}

/// Terminates the tunnel's TLS with a leaf for `host` and serves the requests inside; the
/// handshake and the first request head must come before the set-up deadline.
fn intercept(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    origin: &Origin,
    host: String,
    minter: Arc<LeafMinter>,
    tunnel: TunnelConn,
) {
    let peer = origin.peer;
    let from = (peer, origin.caller.clone(), origin.caller_until);
    tokio::spawn(async move {
        let conn = Arc::clone(&tunnel.conn);
        let metrics = Arc::clone(&shared.metrics);
        let serving = serve_intercepted(shared, request, from, host, minter, Arc::clone(&conn));
        tokio::select! {
            () = serving => {}
            () = conn.setup_expired() => {
                metrics.setup_timeout();
                debug!(%peer, "tunnel closed: its set-up (handshake inside, first request head) outlasted header_read_timeout_ms");
            }
            () = conn.close_requested() => {
                debug!(%peer, "intercepted tunnel closed, idle: to make room ([limits].max_connections), or its caller's certificate ended");
            }
        }
        drop(tunnel);
    });
}

/// `from`: the client's address, and the caller of the connection that sent the CONNECT (and
/// when its certificate ends), which the tunnel inherits.
async fn serve_intercepted(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    from: (SocketAddr, Option<Arc<str>>, Option<Instant>),
    host: String,
    minter: Arc<LeafMinter>,
    conn: Arc<Conn>,
) {
    let (peer, caller, caller_until) = from;
    // The handshake inside has `header_read_timeout_ms` of its own: the connection's set-up
    // deadline is over when the CONNECT follows another request.
    let handshake = async {
        let upgraded = match hyper::upgrade::on(request).await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                debug!(%peer, %error, "CONNECT upgrade failed");
                return None;
            }
        };
        match tunnel_handshake(TokioIo::new(upgraded), &host, &minter).await {
            Ok(stream) => Some(stream),
            Err(error) => {
                info!(%peer, %host, %error, "TLS handshake inside the tunnel failed");
                None
            }
        }
    };
    let stream = match tokio::time::timeout(shared.limits.header_read_timeout, handshake).await {
        Ok(Some(stream)) => stream,
        Ok(None) => return,
        Err(_) => {
            shared.metrics.setup_timeout();
            debug!(%peer, "tunnel closed: the TLS handshake inside outlasted header_read_timeout_ms");
            return;
        }
    };
    let origin = Origin {
        peer,
        tunnel_host: Some(host.into()),
        caller,
        caller_until,
        conn,
    };
    let serve = shared.serve_tunnel;
    serve(stream, shared, origin).await;
}

/// The TLS handshake inside an intercepted tunnel: the ClientHello is read first, and a leaf is
/// looked up (or minted off this thread) only when its SNI names the tunnel's host.
async fn tunnel_handshake<IO>(
    io: IO,
    host: &str,
    minter: &Arc<LeafMinter>,
) -> Result<tokio_rustls::server::TlsStream<IO>, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let start = LazyConfigAcceptor::new(Acceptor::default(), io)
        .await
        .map_err(|e| e.to_string())?;
    match start.client_hello().server_name() {
        Some(sni) if sni.eq_ignore_ascii_case(host) => {}
        Some(sni) => {
            return Err(format!(
                "the SNI {sni:?} differs from the CONNECT host; refused"
            ))
        }
        None => return Err("the ClientHello names no server (SNI); refused".into()),
    }
    let leaf = minter.leaf(host).await.map_err(|e| {
        tracing::error!(%host, error = %e, "cannot mint a certificate");
        e.to_string()
    })?;
    // The SNI was checked above, on this very ClientHello: the leaf is the only answer.
    let config = server_config(Arc::new(rustls::sign::SingleCertAndKey::from(leaf)))
        .map_err(|e| e.to_string())?;
    start
        .into_stream(Arc::new(config))
        .await
        .map_err(|e| e.to_string())
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

#[cfg(test)]
mod tests {
    use super::super::connector::OwnAddresses;
    use super::*;
    use crate::config::{Config, ConfigSource};
    use crate::glob::HostGlob;

    fn tunnels(upstream: &str, intercept: &str) -> Tunnels {
        let text = format!("[upstream]\n{upstream}\n[intercept]\n{intercept}\n");
        let config = Config::parse(&text, ConfigSource::BuiltIn).unwrap();
        Tunnels::new(&config, None, OwnAddresses::default()).unwrap()
    }

    #[test]
    fn kms_names_are_intercepted_or_refused_never_tunnelled() {
        // The case: a region not in allowed_hosts, a tunnel glob over its names' parent
        // (which `check` now refuses; built here by hand to show CONNECT holds on its own).
        let mut t = tunnels("allowed_hosts = [\"kms.us-east-1.amazonaws.com\"]", "");
        t.tunnel_hosts = vec![HostGlob::new("*.us-west-2.amazonaws.com").unwrap()];
        assert!(
            matches!(t.route("kms.us-west-2.amazonaws.com"), Route::Refuse(m) if m.contains("allowed_hosts does not list"))
        );
        assert!(matches!(
            t.route("kms-fips.us-west-2.amazonaws.com"),
            Route::Refuse(_)
        ));
        assert!(matches!(
            t.route("vpce-0a1b.kms.us-west-2.vpce.amazonaws.com"),
            Route::Refuse(_)
        ));
        assert_eq!(t.route("sts.us-west-2.amazonaws.com"), Route::Blind);
        assert_eq!(t.route("kms.us-east-1.amazonaws.com"), Route::Intercept);
        assert!(matches!(t.route("example.com"), Route::Refuse(_)));
    }

    #[test]
    fn only_well_formed_kms_names_or_exact_entries_are_intercepted() {
        let t = tunnels(
            "allowed_hosts = [\"kms.*.amazonaws.com\", \"localhost\", \"kms.*.example.internal\", \"*.kms.us-east-1.vpce.amazonaws.com\", \"vpce-1.kms.us-east-1.vpce.amazonaws.com\"]",
            "",
        );
        assert_eq!(t.route("kms.eu-west-1.amazonaws.com"), Route::Intercept);
        assert_eq!(t.route("localhost"), Route::Intercept);
        assert_eq!(
            t.route("vpce-1.kms.us-east-1.vpce.amazonaws.com"),
            Route::Intercept
        );
        // What a glob's `*` admits but is not a KMS endpoint name: no leaf is minted for it.
        for host in [
            "kms.not-a-region.amazonaws.com",
            "kms.x.amazonaws.com",
            "kms.eu-west-1.example.internal",
            "vpce-2.kms.us-east-1.vpce.amazonaws.com",
        ] {
            assert!(
                matches!(t.route(host), Route::Refuse(ref m) if m.contains("list it exactly")),
                "{host}: {:?}",
                t.route(host)
            );
        }
    }

    #[test]
    fn the_port_must_be_exactly_443() {
        let target = |a: &str| connect_target(&a.parse().unwrap());
        assert_eq!(
            target("KMS.us-east-1.amazonaws.com.:443").unwrap(),
            "kms.us-east-1.amazonaws.com"
        );
        for refused in [
            "kms.us-east-1.amazonaws.com",
            "kms.us-east-1.amazonaws.com:",
            "kms.us-east-1.amazonaws.com:+443",
            "kms.us-east-1.amazonaws.com:0443",
            "kms.us-east-1.amazonaws.com:65979",
            "kms.us-east-1.amazonaws.com:65536",
            "kms.us-east-1.amazonaws.com:444",
            "user@kms.us-east-1.amazonaws.com:443",
        ] {
            if let Ok(authority) = refused.parse::<http::uri::Authority>() {
                assert!(connect_target(&authority).is_err(), "{refused}");
            }
        }
        // User information is credentials: the refusal does not repeat it.
        let authority = "AKIDLEAK:secret@kms.us-east-1.amazonaws.com:443"
            .parse()
            .unwrap();
        let message = connect_target(&authority).unwrap_err();
        assert!(
            !message.contains("secret") && !message.contains("AKIDLEAK"),
            "{message}"
        );
    }
}
