//! The connection to KMS: where a request goes, a pooled client over rustls, and timeouts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;
use tower_service::Service;

use super::body::ProxyBody;
use super::connector::{GuardedConnector, OwnAddresses, UpstreamResolver};
use crate::answer::ProxyError;
use crate::config::{Resolver, UpstreamConfig};
use crate::metrics::{Metrics, UpstreamErrorKind};

/// How long an idle pooled connection to KMS is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

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

/// How many destinations the HTTP/2 connections are kept for at once.
const MAX_H2_DESTINATIONS: usize = 64;

pub struct Upstream {
    /// HTTP/1.1 only: a request goes to KMS in the version whose headers carry what it signed.
    client: Client<HttpsConnector<GuardedConnector>, ProxyBody>,
    /// HTTP/1.1 only (ALPN), for the fast path's own connections.
    direct: HttpsConnector<GuardedConnector>,
    /// For requests signed over `:authority`.
    h2: H2Connections,
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
        http.set_connect_timeout(Some(config.connect_timeout));
        // HTTP/1.1 only, for the fast path's own connections and the general path's pool:
        // hyper would take an HTTP/2 :authority from the URI it dials (the endpoint, with its
        // port), not from the Host the client signed, and an h2 server may judge the request by
        // :authority. HTTP/1.1 sends the signed Host as it is.
        let direct = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(GuardedConnector::new(http.clone(), own.clone()));
        let h2 = H2Connections {
            // Offers http/1.1 too, so that a server without h2 picks it (instead of failing the
            // handshake) and the proxy can say what the matter is.
            connector: hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_all_versions()
                .wrap_connector(GuardedConnector::new(http, own)),
            open: Mutex::new(HashMap::new()),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(direct.clone());
        // Validated: an endpoint has a scheme and a host.
        let endpoint_root = config.endpoint.as_ref().map(|uri| {
            let mut parts = uri.clone().into_parts();
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
            Uri::from_parts(parts).expect("a validated endpoint makes a URI")
        });
        Ok(Upstream {
            client,
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

    /// Sends a request and waits at most `timeout_ms` for the response head.
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let timeout = self.config.timeout;
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Err(_) => {
                self.metrics.upstream_error(UpstreamErrorKind::timeout);
                Err(ProxyError::UpstreamTimeout(timeout.as_millis()))
            }
            // The client's own body broke off mid-stream: not KMS's fault, and KMS never got a
            // complete request.
            Ok(Err(e)) if client_body_failed(&e) => Err(ProxyError::Unreadable(format!(
                "the request body broke off before it was complete ({}); KMS received no complete request",
                error_chain(&e)
            ))),
            // Connecting failed: nothing was sent.
            Ok(Err(e)) if e.is_connect() => {
                self.metrics.upstream_error(UpstreamErrorKind::connect);
                Err(ProxyError::UpstreamConnect(error_chain(&e)))
            }
            Ok(Err(e)) => {
                self.metrics.upstream_error(UpstreamErrorKind::connect);
                Err(ProxyError::UpstreamBroken(error_chain(&e)))
            }
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// Sends a request signed over `:authority` to KMS as HTTP/2, `:authority` exactly as the
    /// client sent it (`request`'s URI carries it), over a connection to `dial` (the target's
    /// scheme and authority): TLS with ALPN `h2`, or HTTP/2 with prior knowledge for an
    /// `http://` endpoint. An upstream that will not speak HTTP/2 gets nothing, and the client
    /// an answer that says which setting to change. Waits at most `timeout_ms` for the answer's
    /// head, connecting included.
    pub async fn send_h2(
        &self,
        request: Request<ProxyBody>,
        dial: &Uri,
    ) -> Result<Response<Incoming>, ProxyError> {
        let timeout = self.config.timeout;
        match tokio::time::timeout(timeout, self.h2_exchange(request, dial)).await {
            Err(_) => {
                self.metrics.upstream_error(UpstreamErrorKind::timeout);
                Err(ProxyError::UpstreamTimeout(timeout.as_millis()))
            }
            Ok(result) => result,
        }
    }

    async fn h2_exchange(
        &self,
        mut request: Request<ProxyBody>,
        dial: &Uri,
    ) -> Result<Response<Incoming>, ProxyError> {
        // A pooled connection that closed before the request went out is replaced once; a
        // request that went out is never sent again.
        for pooled in [true, false] {
            let (mut sender, fresh) = match self.h2.pooled(dial).filter(|_| pooled) {
                Some(sender) => (sender, false),
                None => (self.h2_connect(dial).await?, true),
            };
            if sender.ready().await.is_err() {
                self.h2.forget(dial);
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut error) => match error.take_message() {
                    Some(unsent) if !fresh => {
                        self.h2.forget(dial);
                        request = unsent;
                    }
                    _ => {
                        let error = error.into_error();
                        return Err(self.h2_failed(&error, dial, fresh));
                    }
                },
            }
        }
        self.metrics.upstream_error(UpstreamErrorKind::connect);
        Err(ProxyError::UpstreamConnect(
            "a new HTTP/2 connection to KMS closed before it could carry the request".into(),
        ))
    }

    /// What a failed HTTP/2 exchange tells the client. A request refused on a connection opened
    /// for it with prior knowledge (no ALPN to ask first) means the upstream does not speak
    /// HTTP/2.
    fn h2_failed(&self, error: &hyper::Error, dial: &Uri, fresh: bool) -> ProxyError {
        if client_body_failed(error) {
            return ProxyError::Unreadable(format!(
                "the request body broke off before it was complete ({}); KMS received no complete request",
                error_chain(error)
            ));
        }
        self.metrics.upstream_error(UpstreamErrorKind::connect);
        if fresh && dial.scheme() == Some(&Scheme::HTTP) && !error.is_timeout() {
            return ProxyError::UpstreamNoH2(format!(
                "{} did not answer HTTP/2 with prior knowledge ({})",
                origin(dial),
                error_chain(error)
            ));
        }
        ProxyError::UpstreamBroken(error_chain(error))
    }

    /// A new HTTP/2 connection to `dial`, kept for the requests after this one.
    async fn h2_connect(&self, dial: &Uri) -> Result<SendRequest<ProxyBody>, ProxyError> {
        let mut connector = self.h2.connector.clone();
        let stream = connector.call(dial.clone()).await.map_err(|e| {
            self.metrics.upstream_error(UpstreamErrorKind::connect);
            ProxyError::UpstreamConnect(error_chain(e.as_ref()))
        })?;
        if matches!(stream, MaybeHttpsStream::Https(_)) && !stream.connected().is_negotiated_h2() {
            self.metrics.upstream_error(UpstreamErrorKind::connect);
            return Err(ProxyError::UpstreamNoH2(format!(
                "{} did not agree to HTTP/2 in its TLS handshake (ALPN h2)",
                origin(dial)
            )));
        }
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(stream)
            .await
            .map_err(|e| {
                self.metrics.upstream_error(UpstreamErrorKind::connect);
                ProxyError::UpstreamConnect(error_chain(&e))
            })?;
        let shown = origin(dial);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(upstream = %shown, %error, "HTTP/2 connection to KMS ended");
            }
        });
        self.h2.keep(dial, sender.clone());
        Ok(sender)
    }

    /// Opens a connection of its own to the target's scheme and authority (TLS with ALPN
    /// `http/1.1` for https), within `timeout_ms`.
    pub(crate) async fn dial(&self, target: &Uri) -> Result<DirectStream, ProxyError> {
        let timeout = self.config.timeout;
        let mut connector = self.direct.clone();
        match tokio::time::timeout(timeout, connector.call(target.clone())).await {
            // Nothing was sent: it is a failure to reach KMS, not a wait for its answer.
            Err(_) => {
                self.metrics.upstream_error(UpstreamErrorKind::timeout);
                Err(ProxyError::UpstreamConnect(format!(
                    "connecting to KMS took longer than {} ms",
                    timeout.as_millis()
                )))
            }
            Ok(Err(e)) => {
                self.metrics.upstream_error(UpstreamErrorKind::connect);
                Err(ProxyError::UpstreamConnect(error_chain(e.as_ref())))
            }
            Ok(Ok(stream)) => Ok(TokioIo::new(stream)),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }
}

/// The HTTP/2 connections to KMS, for requests whose signature covers `:authority`: one per
/// destination, shared by every connection thread, multiplexed, replaced once closed.
struct H2Connections {
    /// ALPN `h2` and `http/1.1`; only a connection that agreed to `h2` is used.
    connector: HttpsConnector<GuardedConnector>,
    open: Mutex<HashMap<Uri, SendRequest<ProxyBody>>>,
}

impl H2Connections {
    fn pooled(&self, dial: &Uri) -> Option<SendRequest<ProxyBody>> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(dial).filter(|s| !s.is_closed()).cloned()
    }

    fn keep(&self, dial: &Uri, sender: SendRequest<ProxyBody>) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() >= MAX_H2_DESTINATIONS && !open.contains_key(dial) {
            open.retain(|_, s| !s.is_closed());
            if open.len() >= MAX_H2_DESTINATIONS {
                // Dropping a sender ends its connection once its streams are done.
                if let Some(any) = open.keys().next().cloned() {
                    open.remove(&any);
                }
            }
        }
        open.insert(dial.clone(), sender);
    }

    fn forget(&self, dial: &Uri) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.remove(dial);
    }
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
