//! The connection to KMS: where a request goes, a pooled client over rustls, and timeouts.

use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
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

pub struct Upstream {
    client: Client<HttpsConnector<GuardedConnector>, ProxyBody>,
    /// HTTP/1.1 only (ALPN), for the fast path's own connections.
    direct: HttpsConnector<GuardedConnector>,
    metrics: Arc<Metrics>,
    endpoint: Option<(Scheme, Authority)>,
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
        let direct = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(GuardedConnector::new(http.clone(), own.clone()));
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1();
        let connector = GuardedConnector::new(http, own);
        // HTTP/2 carries the host in :authority, which hyper takes from the URI it dials. With a
        // fixed endpoint that is the endpoint, not the Host the client signed, and an h2 server
        // may judge the request by :authority; HTTP/1.1 sends the signed Host as it is.
        let https = if config.endpoint.is_some() {
            builder.wrap_connector(connector)
        } else {
            builder.enable_http2().wrap_connector(connector)
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(https);
        let endpoint = config.endpoint.as_ref().map(|uri| {
            (
                uri.scheme()
                    .cloned()
                    .expect("validated endpoint has a scheme"),
                uri.authority()
                    .cloned()
                    .expect("validated endpoint has a host"),
            )
        });
        let endpoint_root = endpoint.as_ref().map(|(scheme, authority)| {
            Uri::builder()
                .scheme(scheme.clone())
                .authority(authority.clone())
                .path_and_query("/")
                .build()
                .expect("a validated endpoint makes a URI")
        });
        Ok(Upstream {
            client,
            direct,
            metrics,
            endpoint,
            endpoint_root,
            config: config.clone(),
        })
    }

    /// The upstream URI for a request addressed to `host`: the fixed endpoint, or
    /// `https://<host>:443` when the host is an allowed KMS name.
    pub fn target(&self, host: &str, path: Option<&PathAndQuery>) -> Result<Uri, ProxyError> {
        if !self.config.allows_host(host) {
            return Err(ProxyError::HostNotAllowed(host.to_owned()));
        }
        if let (Some(root), None | Some("/")) =
            (&self.endpoint_root, path.map(PathAndQuery::as_str))
        {
            return Ok(root.clone());
        }
        let (scheme, authority) = match &self.endpoint {
            Some((scheme, authority)) => (scheme.clone(), authority.clone()),
            None => {
                let name = crate::glob::host_name(host);
                let authority = Authority::try_from(format!("{name}:443"))
                    .map_err(|_| ProxyError::HostNotAllowed(host.to_owned()))?;
                (Scheme::HTTPS, authority)
            }
        };
        let path = path.map_or("/", PathAndQuery::as_str);
        Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(path)
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
        let path: PathAndQuery = "/".parse().unwrap();
        assert_eq!(
            upstream
                .target("kms.eu-west-1.amazonaws.com", Some(&path))
                .unwrap(),
            "https://kms.eu-west-1.amazonaws.com:443/"
        );
        assert_eq!(
            upstream.target("evil.example.com", Some(&path)),
            Err(ProxyError::HostNotAllowed("evil.example.com".into()))
        );
        let config = crate::Config::parse(
            "[upstream]\nendpoint = \"http://127.0.0.1:4566\"",
            crate::config::ConfigSource::BuiltIn,
        )
        .unwrap();
        let upstream =
            Upstream::new(&config.upstream, Arc::default(), OwnAddresses::default()).unwrap();
        assert_eq!(
            upstream.target("anything:1", Some(&path)).unwrap(),
            "http://127.0.0.1:4566/"
        );
    }
}
