//! Reaching KMS: where a request goes, the connectors (rustls, the resolver, the guard against
//! connecting to itself), and opening a connection within `connect_timeout_ms`: DNS, TCP, TLS
//! and, for HTTP/2, the server's first SETTINGS frame. Which connections a client connection
//! holds is [`super::lane`]'s (the general server) and the fast path's own.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use hyper::client::conn::{http1, http2};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tower_service::Service;

use super::body::ProxyBody;
use super::connector::{GuardedConnector, OwnAddresses, UpstreamResolver};
use crate::answer::ProxyError;
use crate::config::{Resolver, UpstreamConfig};
use crate::metrics::{Metrics, UpstreamErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("cannot read the extra CA file {path}: {detail}; give a PEM file of CA certificates")]
    CaFile { path: String, detail: String },
    #[error("no trusted root certificates: the system store is empty and no [upstream].ca_file is set; install ca-certificates or set ca_file")]
    NoRoots,
    #[error("cannot set up TLS to KMS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}; use [upstream] resolver = \"system\" or fix /etc/resolv.conf")]
    Resolver(String),
}

/// A connection of its own to KMS, which the fast HTTP/1.1 path speaks over directly.
pub(crate) type DirectStream = TokioIo<MaybeHttpsStream<TokioIo<TcpStream>>>;

/// The sending ends of hyper's clients over a connection to KMS.
pub(crate) type H1Sender = http1::SendRequest<ProxyBody>;
pub(crate) type H2Sender = http2::SendRequest<ProxyBody>;

pub struct Upstream {
    /// HTTP/1.1 only (ALPN): a request goes to KMS in the version whose headers carry what it
    /// signed.
    direct: HttpsConnector<GuardedConnector>,
    /// ALPN `h2` and `http/1.1`, for requests signed over `:authority`; only a connection that
    /// agreed to `h2` is used.
    h2: HttpsConnector<GuardedConnector>,
    metrics: Arc<Metrics>,
    /// `<endpoint>/`, the target of every KMS request when an endpoint is set.
    endpoint_root: Option<Uri>,
    config: UpstreamConfig,
}

impl Upstream {
    /// The settings it was built from.
    pub(crate) fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    pub fn new(
        config: &UpstreamConfig,
        metrics: Arc<Metrics>,
        own: OwnAddresses,
    ) -> Result<Upstream, UpstreamSetupError> {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(config)?)
        .with_no_client_auth();

        let resolver = UpstreamResolver::new(config.resolver == Resolver::Dns)
            .map_err(UpstreamSetupError::Resolver)?;
        let mut http = HttpConnector::new_with_resolver(resolver);
        http.enforce_http(false);
        http.set_nodelay(true);
        // The whole connect (DNS, TCP, TLS, the HTTP/2 preface) is bounded by
        // `connect_timeout_ms` around it; this bounds each address tried.
        http.set_connect_timeout(Some(config.connect_timeout));
        // HTTP/1.1 only, for the fast path's own connections and the general server's: hyper
        // would take an HTTP/2 :authority from the URI it dials (the endpoint, with its port),
        // not from the Host the client signed, and an h2 server may judge the request by
        // :authority. HTTP/1.1 sends the signed Host as it is.
        let direct = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(GuardedConnector::new(http.clone(), own.clone()));
        // Offers http/1.1 too, so that a server without h2 picks it (instead of failing the
        // handshake) and the proxy can say what the matter is.
        let h2 = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(GuardedConnector::new(http, own));
        // Validated: an endpoint has a scheme and a host.
        let endpoint_root = config.endpoint.as_ref().map(|uri| {
            let mut parts = uri.clone().into_parts();
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
            Uri::from_parts(parts).expect("a validated endpoint makes a URI")
        });
        Ok(Upstream {
            direct,
            h2,
            metrics,
            endpoint_root,
            config: config.clone(),
        })
    }

    /// The upstream URI for a request `decide` let through to `host` (a host `allowed_hosts`
    /// admits: the check is `decide`'s, made once): the fixed endpoint, or `https://<host>:443/`.
    /// The path is always `/`, the only one `classify` lets through.
    pub fn target(&self, host: &str) -> Result<Uri, ProxyError> {
        if let Some(root) = &self.endpoint_root {
            return Ok(root.clone());
        }
        let name = crate::glob::host_name(host);
        let authority = Authority::try_from(format!("{name}:443"))
            .map_err(|_| ProxyError::HostNotAllowed(host.to_owned()))?;
        Uri::builder()
            .scheme(Scheme::HTTPS)
            .authority(authority)
            .path_and_query("/")
            .build()
            .map_err(|e| ProxyError::Unreadable(format!("request target: {e}")))
    }

    /// `connect_timeout_ms` passed while connecting: nothing was sent.
    fn connect_timed_out(&self) -> ProxyError {
        self.metrics.upstream_error(UpstreamErrorKind::timeout);
        ProxyError::UpstreamConnect(format!(
            "connecting to KMS (name lookup, TCP, TLS and the HTTP/2 preface) took longer than {} ms ([upstream].connect_timeout_ms)",
            self.config.connect_timeout.as_millis()
        ))
    }

    fn connect_failed(&self, message: String) -> ProxyError {
        self.metrics.upstream_error(UpstreamErrorKind::connect);
        ProxyError::UpstreamConnect(message)
    }

    /// Opens a connection of its own to the target's scheme and authority (TLS with ALPN
    /// `http/1.1` for https) within `connect_timeout_ms`: name lookup, TCP and TLS.
    pub(crate) async fn dial(&self, target: &Uri) -> Result<DirectStream, ProxyError> {
        let mut connector = self.direct.clone();
        match tokio::time::timeout(self.config.connect_timeout, connector.call(target.clone()))
            .await
        {
            // Nothing was sent: it is a failure to reach KMS, not a wait for its answer.
            Err(_) => Err(self.connect_timed_out()),
            Ok(Err(e)) => Err(self.connect_failed(error_chain(e.as_ref()))),
            Ok(Ok(stream)) => Ok(TokioIo::new(stream)),
        }
    }

    /// [`Self::dial`], then an HTTP/1.1 client over it; `connection` drives it until it closes.
    pub(crate) async fn dial_h1(
        &self,
        target: &Uri,
    ) -> Result<(H1Sender, impl std::future::Future<Output = ()> + Send), ProxyError> {
        let stream = self.dial(target).await?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.connect_failed(error_chain(&e)))?;
        let shown = origin(target);
        Ok((sender, async move {
            if let Err(error) = connection.await {
                tracing::debug!(upstream = %shown, %error, "HTTP/1.1 connection to KMS ended");
            }
        }))
    }

    /// An HTTP/2 connection to `dial` (the target's scheme and authority): TLS with ALPN `h2`,
    /// or HTTP/2 with prior knowledge for an `http://` endpoint, within `connect_timeout_ms`,
    /// the server's first SETTINGS frame included. No request is written before that frame
    /// arrived, so an upstream that will not speak HTTP/2 provably received none: the client is
    /// told which setting to change. The second value drives the connection until it closes.
    pub(crate) async fn dial_h2(
        &self,
        dial: &Uri,
    ) -> Result<(H2Sender, impl std::future::Future<Output = ()> + Send), ProxyError> {
        match tokio::time::timeout(self.config.connect_timeout, self.h2_handshake(dial)).await {
            Err(_) => Err(self.connect_timed_out()),
            Ok(result) => result,
        }
    }

    async fn h2_handshake(
        &self,
        dial: &Uri,
    ) -> Result<(H2Sender, impl std::future::Future<Output = ()> + Send), ProxyError> {
        let mut connector = self.h2.clone();
        let stream = connector
            .call(dial.clone())
            .await
            .map_err(|e| self.connect_failed(error_chain(e.as_ref())))?;
        let tls = matches!(stream, MaybeHttpsStream::Https(_));
        if tls && !stream.connected().is_negotiated_h2() {
            self.metrics.upstream_error(UpstreamErrorKind::connect);
            return Err(ProxyError::UpstreamNoH2(format!(
                "{} did not agree to HTTP/2 in its TLS handshake (ALPN h2)",
                origin(dial)
            )));
        }
        let (first_frame, told) = oneshot::channel();
        let io = TokioIo::new(FirstFrame {
            inner: TokioIo::new(stream),
            seen: [0; 9],
            filled: 0,
            tell: Some(first_frame),
        });
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|e| self.connect_failed(error_chain(&e)))?;
        let shown = origin(dial);
        let connection = async move {
            if let Err(error) = connection.await {
                tracing::debug!(upstream = %shown, %error, "HTTP/2 connection to KMS ended");
            }
        };
        // The connection must run for the server's SETTINGS to be read.
        let mut connection = Box::pin(connection);
        let mut told = told;
        let first = tokio::select! {
            biased;
            first = &mut told => first.unwrap_or(Seen::Closed),
            // Ended as it read the first bytes (an HTTP/1.1 answer is no frame): what they were.
            () = connection.as_mut() => told.try_recv().unwrap_or(Seen::Closed),
        };
        match first {
            Seen::Settings => Ok((sender, connection)),
            Seen::Other(bytes) if !tls => {
                self.metrics.upstream_error(UpstreamErrorKind::connect);
                Err(ProxyError::UpstreamNoH2(format!(
                    "{} did not answer HTTP/2 with prior knowledge (it answered {:?})",
                    origin(dial),
                    String::from_utf8_lossy(&bytes)
                )))
            }
            Seen::Other(bytes) => Err(self.connect_failed(format!(
                "{} agreed to HTTP/2 but did not answer its preface with SETTINGS (it answered {:?})",
                origin(dial),
                String::from_utf8_lossy(&bytes)
            ))),
            Seen::Closed => Err(self.connect_failed(format!(
                "{} closed the connection before its HTTP/2 settings arrived",
                origin(dial)
            ))),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

/// What the first bytes from an HTTP/2 upstream were.
enum Seen {
    /// A SETTINGS frame on stream 0, as every HTTP/2 server's preface starts.
    Settings,
    /// Something else: an HTTP/1.1 answer to the preface, or garbage.
    Other(Vec<u8>),
    /// The connection closed (or failed) before 9 bytes arrived.
    Closed,
}

/// An upstream stream that reports its first frame header (9 bytes) once it has read it.
struct FirstFrame<T> {
    inner: T,
    seen: [u8; 9],
    filled: usize,
    tell: Option<oneshot::Sender<Seen>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstFrame<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.tell.is_some() {
            let seen = match &polled {
                Poll::Pending => None,
                Poll::Ready(Err(_)) => Some(Seen::Closed),
                Poll::Ready(Ok(())) => {
                    let new = &buf.filled()[before..];
                    if new.is_empty() {
                        Some(Seen::Closed)
                    } else {
                        let filled = self.filled;
                        let take = new.len().min(9 - filled);
                        self.seen[filled..filled + take].copy_from_slice(&new[..take]);
                        self.filled += take;
                        (self.filled == 9).then(|| {
                            let h = &self.seen;
                            // Type 4 (SETTINGS), no ACK flag, stream 0.
                            if h[3] == 4 && h[4] & 1 == 0 && h[5..9] == [0, 0, 0, 0] {
                                Seen::Settings
                            } else {
                                Seen::Other(h.to_vec())
                            }
                        })
                    }
                }
            };
            if let Some(seen) = seen {
                if let Some(tell) = self.tell.take() {
                    let _ = tell.send(seen);
                }
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FirstFrame<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What a failed exchange with KMS tells the client. `unsent`: hyper handed the request back,
/// so not a byte of it was written.
pub(crate) fn exchange_failed(metrics: &Metrics, error: &hyper::Error, unsent: bool) -> ProxyError {
    if client_body_failed(error) {
        return ProxyError::Unreadable(format!(
            "the request body broke off before it was complete ({}); KMS received no complete request",
            error_chain(error)
        ));
    }
    metrics.upstream_error(UpstreamErrorKind::connect);
    if unsent {
        return ProxyError::UpstreamConnect(format!(
            "the connection to KMS closed before the request went out ({})",
            error_chain(error)
        ));
    }
    ProxyError::UpstreamBroken(error_chain(error))
}

/// `scheme://authority` of a target, for messages.
fn origin(uri: &Uri) -> String {
    match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) => format!("{scheme}://{authority}"),
        _ => uri.to_string(),
    }
}

fn root_store(config: &UpstreamConfig) -> Result<RootCertStore, UpstreamSetupError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "skipping an unreadable system root certificate");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, ignored, "system root certificates");
    if let Some(path) = &config.ca_file {
        let ca_error = |detail: String| UpstreamSetupError::CaFile {
            path: path.display().to_string(),
            detail,
        };
        let (pem, _) = crate::files::read(path, crate::files::MAX_PEM_BYTES)
            .map_err(|e| ca_error(e.to_string()))?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| ca_error(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_error("it holds no certificate".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
        }
    }
    if roots.is_empty() {
        return Err(UpstreamSetupError::NoRoots);
    }
    Ok(roots)
}

/// Whether a client error came from the request body the proxy was streaming from its client.
fn client_body_failed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(hyper_error) = e.downcast_ref::<hyper::Error>() {
            if hyper_error.is_user() {
                return true;
            }
        }
        current = e.source();
    }
    false
}

/// An error and its causes on one line: hyper's top-level messages alone ("client error
/// (Connect)") do not tell an operator what to fix.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn targets_follow_the_endpoint_or_the_allowed_host() {
        let config = crate::Config::parse("", crate::config::ConfigSource::BuiltIn).unwrap();
        let upstream =
            Upstream::new(&config.upstream, Arc::default(), OwnAddresses::default()).unwrap();
        assert_eq!(
            upstream.target("kms.eu-west-1.amazonaws.com").unwrap(),
            "https://kms.eu-west-1.amazonaws.com:443/"
        );
        // Which hosts are let through is `decide`'s check, made once.
        assert!(!config.upstream.allows_host("evil.example.com"));
        let config = crate::Config::parse(
            "[upstream]\nendpoint = \"http://127.0.0.1:4566\"",
            crate::config::ConfigSource::BuiltIn,
        )
        .unwrap();
        let upstream =
            Upstream::new(&config.upstream, Arc::default(), OwnAddresses::default()).unwrap();
        assert_eq!(
            upstream.target("anything:1").unwrap(),
            "http://127.0.0.1:4566/"
        );
    }
}
