//! Client certificates on the TLS listener and the caller identity they carry
//! (`[listener] client_ca`, `client_auth`): real clients (a rustls/hyper client over HTTP/1.1 and
//! h2, boto3 with `client_cert` and through the listener as an `https://` proxy with
//! `proxy_client_cert`, the AWS SDK for JavaScript v3 with an `https.Agent({cert, key, ca})` and
//! `NodeHttp2Handler`'s connect options), certificates made here with rcgen: SPIFFE IDs of
//! several namespaces, one from another CA, an expired one, ambiguous and malformed ones. Every
//! refusal checks that nothing reached the upstream and nothing was audited.

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::ops::tag_body;
use common::tls_client::tls_connect;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any single network step may take before the test fails.
const STEP: Duration = Duration::from_secs(5);
const KMS_HOST: &str = "kms.us-east-1.amazonaws.com";
const PAYMENTS: &str = "spiffe://example.org/ns/payments/sa/api";
const SEARCH: &str = "spiffe://example.org/ns/search/sa/web";

// ------------------------------------------------------------------------ certificates

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test CA.
struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM and DER, and where they were written.
struct Leaf {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl Leaf {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// What a client leaf is like.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// An X.509-SVID: key usage digitalSignature, EKU clientAuth and serverAuth.
    Svid,
    /// Its validity ended yesterday.
    Expired,
    /// EKU serverAuth only.
    ServerOnly,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).unwrap();
        path
    }

    /// A leaf with these SANs, written to `dir` as `name.pem` / `name.key`.
    fn leaf(&self, dir: &Path, name: &str, sans: Vec<SanType>, kind: Kind) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match kind {
            Kind::ServerOnly => vec![ExtendedKeyUsagePurpose::ServerAuth],
            _ => vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ],
        };
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        if kind == Kind::Expired {
            params.not_before = (now - 2 * day).into();
            params.not_after = (now - day).into();
        } else {
            params.not_before = (now - day).into();
            params.not_after = (now + day).into();
        }
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
            cert_path,
            key_path,
        }
    }

    fn svid(&self, dir: &Path, name: &str, id: &str) -> Leaf {
        self.leaf(dir, name, vec![uri(id)], Kind::Svid)
    }
}

fn uri(id: &str) -> SanType {
    SanType::URI(id.try_into().unwrap())
}

fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().unwrap())
}

/// Everything a test needs: the listener's CA and certificate, the CA of client certificates,
/// another CA, and client leaves.
struct Pki {
    dir: tempfile::TempDir,
    listener_ca: TestCa,
    listener_ca_path: PathBuf,
    clients: TestCa,
    client_ca_path: PathBuf,
    other: TestCa,
    payments: Leaf,
    search: Leaf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let listener_ca = TestCa::new("listener CA");
        let listener_ca_path = listener_ca.write(dir.path(), "listener-ca.pem");
        let server = listener_ca.leaf(dir.path(), "tls", vec![dns("localhost")], Kind::Svid);
        std::fs::rename(&server.cert_path, dir.path().join("tls.crt")).unwrap();
        std::fs::rename(&server.key_path, dir.path().join("tls.key")).unwrap();
        let clients = TestCa::new("workload CA");
        let client_ca_path = clients.write(dir.path(), "client-ca.pem");
        let other = TestCa::new("another CA");
        let payments = clients.svid(dir.path(), "payments", PAYMENTS);
        let search = clients.svid(dir.path(), "search", SEARCH);
        Pki {
            dir,
            listener_ca,
            listener_ca_path,
            clients,
            client_ca_path,
            other,
            payments,
            search,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The `[listener]` body: TLS, client certificates from the workload CA, `client_auth`.
    fn listener(&self, client_auth: &str) -> String {
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\nclient_auth = \"{client_auth}\"",
            self.path().join("tls.crt").display(),
            self.path().join("tls.key").display(),
            self.client_ca_path.display()
        )
    }

    /// The certificates every `required` listener must refuse.
    fn refused(&self) -> Vec<(&'static str, Leaf)> {
        let dir = self.path();
        vec![
            ("another CA", self.other.svid(dir, "other", PAYMENTS)),
            (
                "expired",
                self.clients
                    .leaf(dir, "expired", vec![uri(PAYMENTS)], Kind::Expired),
            ),
            (
                "serverAuth only",
                self.clients
                    .leaf(dir, "server-only", vec![uri(PAYMENTS)], Kind::ServerOnly),
            ),
            (
                "two URI SANs",
                self.clients
                    .leaf(dir, "two", vec![uri(PAYMENTS), uri(SEARCH)], Kind::Svid),
            ),
            (
                "upper-case trust domain",
                self.clients
                    .svid(dir, "upper", "spiffe://Example.org/ns/payments/sa/api"),
            ),
            (
                "a query in the ID",
                self.clients
                    .svid(dir, "query", "spiffe://example.org/ns/a?team=payments"),
            ),
        ]
    }
}

// ------------------------------------------------------------------------ a Rust client

/// A rustls client trusting `ca_pem`, presenting `leaf` if given, offering `alpn`.
fn client_config(ca_pem: &str, leaf: Option<&Leaf>, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match leaf {
        Some(leaf) => builder
            .with_client_auth_cert(vec![leaf.cert_der.clone()], leaf.key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

fn to_http(raw: &RawRequest, uri: &str, with_host: bool) -> http::Request<Full<Bytes>> {
    let mut builder = http::Request::builder()
        .method(raw.method.as_str())
        .uri(uri);
    for (name, value) in &raw.headers {
        if !with_host && name.eq_ignore_ascii_case("host") {
            continue;
        }
        builder = builder.header(name.as_str(), value.as_str());
    }
    builder
        .body(Full::new(Bytes::from(raw.body.clone())))
        .unwrap()
}

/// One request on `io`, HTTP/1.1 or h2: its status and body, or why it failed.
async fn send<S>(io: S, raw: &RawRequest, h2: bool) -> Result<(u16, Value), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let exchange = async move {
        let response = if h2 {
            let authority = raw.header("host").unwrap().to_owned();
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                    .await
                    .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(connection);
            sender
                .send_request(to_http(raw, &format!("https://{authority}/"), false))
                .await
        } else {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
            tokio::spawn(connection);
            sender.send_request(to_http(raw, "/", true)).await
        };
        let response = response.map_err(|e| format!("request: {e:?}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    };
    tokio::time::timeout(STEP, exchange)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// A TagResource signed for the listener's address (mode B), sent over a fresh TLS connection
/// presenting `leaf`, over h2 or HTTP/1.1.
async fn tag_directly(
    proxy: &TestProxy,
    pki: &Pki,
    leaf: Option<&Leaf>,
    h2: bool,
    tags: &[(&str, &str)],
) -> Result<(u16, Value), String> {
    let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
    let config = client_config(&pki.listener_ca.pem, leaf, alpn);
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let stream = tls_connect(tcp, "localhost", config)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let host = format!("localhost:{}", proxy.addr.port());
    let raw = RawRequest::signed_kms(&host, "TrentService.TagResource", tag_body(tags).as_bytes());
    send(stream, &raw, h2).await
}

/// A TagResource through the listener as an `https://` proxy (mode C): TLS to the listener
/// presenting `leaf`, `CONNECT kms…:443` over it, the TLS inside with the interception CA
/// (`inner_ca`), then the request, signed for the KMS name.
async fn tag_through_connect(
    proxy: &TestProxy,
    pki: &Pki,
    leaf: Option<&Leaf>,
    inner_ca: &str,
    tags: &[(&str, &str)],
) -> Result<(u16, Value), String> {
    let config = client_config(&pki.listener_ca.pem, leaf, b"http/1.1");
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let mut outer = tls_connect(tcp, "localhost", config)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let connect = format!("CONNECT {KMS_HOST}:443 HTTP/1.1\r\nHost: {KMS_HOST}:443\r\n\r\n");
    let head = tokio::time::timeout(STEP, async {
        outer.write_all(connect.as_bytes()).await?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if outer.read(&mut byte).await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
            }
            head.push(byte[0]);
        }
        Ok::<_, io::Error>(String::from_utf8_lossy(&head).into_owned())
    })
    .await
    .map_err(|_| "CONNECT timed out".to_owned())?
    .map_err(|e| format!("CONNECT: {e}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("CONNECT answered {head:?}"));
    }
    let inner = tls_connect(outer, KMS_HOST, client_config(inner_ca, None, b"http/1.1"))
        .await
        .map_err(|e| format!("handshake inside: {e}"))?;
    let raw = RawRequest::signed_kms(
        KMS_HOST,
        "TrentService.TagResource",
        tag_body(tags).as_bytes(),
    );
    send(inner, &raw, false).await
}

const ALLOWED: &[(&str, &str)] = &[("team:owner", "payments")];
const DENIED: &[(&str, &str)] = &[("Project", "x")];

async fn proxy_with(fake: &FakeKms, pki: &Pki, client_auth: &str, intercept: String) -> TestProxy {
    start_proxy_with(
        fake,
        ProxyConfig {
            listener: pki.listener(client_auth),
            intercept,
            ..ProxyConfig::default()
        },
    )
    .await
}

/// A proxy whose listener requires a client certificate from `pki`, with its admin port.
async fn required_proxy_with_admin(fake: &FakeKms, pki: &Pki) -> TestProxy {
    start_proxy_with(
        fake,
        ProxyConfig {
            listener: pki.listener("required"),
            admin: true,
            ..ProxyConfig::default()
        },
    )
    .await
}

/// An interception CA from `ca init` in `dir`: the `[intercept]` body and the CA's PEM.
fn interception(dir: &Path) -> (String, String) {
    let (cert, key) = kms_tag_guard::tls::ca_init(&dir.join("ca")).unwrap();
    let pem = std::fs::read_to_string(&cert).unwrap();
    let section = format!(
        "ca_cert = \"{}\"\nca_key = \"{}\"\ntunnel_hosts = []",
        cert.display(),
        key.display()
    );
    (section, pem)
}

/// The `caller` of each decision record, in order.
fn callers(records: &[Value]) -> Vec<Option<String>> {
    records
        .iter()
        .filter(|r| r["event"] == "decision")
        .map(|r| r["caller"].as_str().map(str::to_owned))
        .collect()
}

/// Nothing reached the upstream and nothing was audited.
fn nothing_reached(fake: &FakeKms, proxy: &TestProxy, what: &str) {
    assert_eq!(fake.requests().len(), 0, "{what}: a request reached KMS");
    assert_eq!(proxy.audit().len(), 0, "{what}: {:#?}", proxy.audit());
}

// ======================================================================== the listener

#[tokio::test]
async fn required_refuses_no_certificate_another_ca_expired_and_odd_ones_over_h1_and_h2() {
    let pki = Pki::new();
    let fake = FakeKms::start().await;
    let proxy = required_proxy_with_admin(&fake, &pki).await;
    for h2 in [false, true] {
        let result = tag_directly(&proxy, &pki, None, h2, ALLOWED).await;
        assert!(result.is_err(), "no certificate, h2={h2}: {result:?}");
        for (what, leaf) in pki.refused() {
            let result = tag_directly(&proxy, &pki, Some(&leaf), h2, ALLOWED).await;
            assert!(result.is_err(), "{what}, h2={h2}: {result:?}");
        }
    }
    nothing_reached(&fake, &proxy, "refused client certificates");
    // Counted by reason (never by caller): none, invalid (rustls), identity (the SPIFFE rules).
    const REFUSALS: &str = "kms_tag_guard_client_certificate_refusals_total";
    let count = |m: &common::ops::Scrape, reason: &str| m.count(REFUSALS, &[("reason", reason)]);
    let expected = [("none", 2.0), ("invalid", 6.0), ("identity", 6.0)];
    let metrics = common::ops::scrape_when(proxy.admin_addr.unwrap(), |m| {
        expected.iter().all(|(reason, n)| count(m, reason) == *n)
    })
    .await;
    for (reason, n) in expected {
        assert_eq!(count(&metrics, reason), n, "{reason}: {}", metrics.text);
    }
    assert!(
        !metrics.text.contains("spiffe://"),
        "a caller is never a label"
    );
}

#[tokio::test]
async fn required_takes_spiffe_certificates_and_records_each_caller_over_h1_and_h2() {
    let pki = Pki::new();
    let fake = FakeKms::start().await;
    let proxy = proxy_with(&fake, &pki, "required", String::new()).await;
    let mut expected = Vec::new();
    for h2 in [false, true] {
        for leaf in [&pki.payments, &pki.search] {
            let (status, body) = tag_directly(&proxy, &pki, Some(leaf), h2, ALLOWED)
                .await
                .unwrap();
            assert_eq!(status, 200, "{body}");
            let (status, body) = tag_directly(&proxy, &pki, Some(leaf), h2, DENIED)
                .await
                .unwrap();
            assert_eq!(status, 400, "{body}");
            let id = if std::ptr::eq(leaf, &pki.payments) {
                PAYMENTS
            } else {
                SEARCH
            };
            expected.extend([Some(id.to_owned()), Some(id.to_owned())]);
        }
    }
    let records = proxy.settled_audit().await;
    assert_eq!(callers(&records), expected, "{records:#?}");
    // Outcome records carry it too.
    let outcomes: Vec<&Value> = records.iter().filter(|r| r["event"] == "outcome").collect();
    assert_eq!(outcomes.len(), 4, "{records:#?}");
    assert!(
        outcomes.iter().all(|r| r["caller"].is_string()),
        "{outcomes:#?}"
    );
    // Only the allowed changes reached KMS.
    assert_eq!(fake.requests().len(), 4);
    for request in fake.requests() {
        request.verified();
    }
}

#[tokio::test]
async fn optional_without_a_certificate_has_no_caller_and_a_bad_one_is_still_refused() {
    let pki = Pki::new();
    let fake = FakeKms::start().await;
    let proxy = proxy_with(&fake, &pki, "optional", String::new()).await;
    for (what, leaf) in pki.refused() {
        let result = tag_directly(&proxy, &pki, Some(&leaf), false, ALLOWED).await;
        assert!(result.is_err(), "{what}: {result:?}");
    }
    nothing_reached(&fake, &proxy, "optional, refused certificates");
    for h2 in [false, true] {
        let (status, body) = tag_directly(&proxy, &pki, None, h2, ALLOWED).await.unwrap();
        assert_eq!(status, 200, "{body}");
        let (status, body) = tag_directly(&proxy, &pki, Some(&pki.search), h2, ALLOWED)
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let records = proxy.settled_audit().await;
    let search = Some(SEARCH.to_owned());
    assert_eq!(
        callers(&records),
        [None, search.clone(), None, search],
        "{records:#?}"
    );
    let anonymous = records.iter().find(|r| r["event"] == "decision").unwrap();
    assert!(
        anonymous.get("caller").is_none(),
        "no caller field at all without a certificate: {anonymous}"
    );
}

#[tokio::test]
async fn a_dns_name_is_the_caller_of_a_certificate_without_a_uri() {
    let pki = Pki::new();
    let fake = FakeKms::start().await;
    let proxy = proxy_with(&fake, &pki, "required", String::new()).await;
    let leaf = pki.clients.leaf(
        pki.path(),
        "dns",
        vec![dns("Batch.Jobs.example.org"), dns("other.example.org")],
        Kind::Svid,
    );
    let (status, body) = tag_directly(&proxy, &pki, Some(&leaf), false, ALLOWED)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let records = proxy.settled_audit().await;
    assert_eq!(
        callers(&records),
        [Some("batch.jobs.example.org".to_owned())]
    );
}

#[tokio::test]
async fn connect_through_the_tls_listener_gives_every_request_in_the_tunnel_its_caller() {
    let pki = Pki::new();
    let fake = FakeKms::start().await;
    let (intercept, inner_ca) = interception(pki.path());
    let proxy = proxy_with(&fake, &pki, "required", intercept).await;
    // Refused on the outer connection: no CONNECT is ever read.
    let result = tag_through_connect(&proxy, &pki, None, &inner_ca, ALLOWED).await;
    assert!(result.is_err(), "{result:?}");
    for (what, leaf) in pki.refused() {
        let result = tag_through_connect(&proxy, &pki, Some(&leaf), &inner_ca, ALLOWED).await;
        assert!(result.is_err(), "{what}: {result:?}");
    }
    nothing_reached(&fake, &proxy, "CONNECT with refused certificates");
    for leaf in [&pki.payments, &pki.search] {
        let (status, body) = tag_through_connect(&proxy, &pki, Some(leaf), &inner_ca, ALLOWED)
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let (status, body) = tag_through_connect(&proxy, &pki, Some(leaf), &inner_ca, DENIED)
            .await
            .unwrap();
        assert_eq!(status, 400, "{body}");
    }
    let records = proxy.settled_audit().await;
    let (p, s) = (Some(PAYMENTS.to_owned()), Some(SEARCH.to_owned()));
    assert_eq!(
        callers(&records),
        [p.clone(), p, s.clone(), s],
        "{records:#?}"
    );
    for request in fake.requests() {
        assert_eq!(request.header("host"), Some(KMS_HOST));
        request.verified();
    }
}

/// rustls resumes a TLS session with the client certificate it was verified with, without
/// verifying it again: a session resumed after that certificate expired is closed before its
/// first request.
#[tokio::test]
async fn a_session_resumed_after_its_certificate_expired_is_refused() {
    let pki = Pki::new();
    let fake = FakeKms::start().await;
    let proxy = proxy_with(&fake, &pki, "required", String::new()).await;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![uri(PAYMENTS)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(60)).into();
    let ends = now + Duration::from_secs(3);
    params.not_after = ends.into();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &pki.clients.issuer).unwrap();
    let leaf = Leaf {
        cert_pem: cert.pem(),
        cert_der: cert.der().clone(),
        key_der: key.serialize_der(),
        cert_path: PathBuf::new(),
        key_path: PathBuf::new(),
    };
    // One client configuration, so one session cache: the second connection resumes.
    let config = client_config(&pki.listener_ca.pem, Some(&leaf), b"http/1.1");
    let host = format!("localhost:{}", proxy.addr.port());
    let raw = RawRequest::signed_kms(
        &host,
        "TrentService.TagResource",
        tag_body(ALLOWED).as_bytes(),
    );
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let stream = tls_connect(tcp, "localhost", Arc::clone(&config))
        .await
        .unwrap();
    assert_eq!(send(stream, &raw, false).await.unwrap().0, 200);
    // Until it has expired (at a whole second past its notAfter).
    while SystemTime::now() < ends + Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let stream = tls_connect(tcp, "localhost", Arc::clone(&config))
        .await
        .unwrap();
    assert_eq!(
        stream.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the control: the session is resumed"
    );
    let result = send(stream, &raw, false).await;
    assert!(result.is_err(), "{result:?}");
    let records = proxy.settled_audit().await;
    assert_eq!(
        callers(&records),
        [Some(PAYMENTS.to_owned())],
        "{records:#?}"
    );
    assert_eq!(
        fake.requests().len(),
        1,
        "only the first request reached KMS"
    );
}

/// A leaf for `PAYMENTS` that ends `secs` seconds from now, and when.
fn short_lived(pki: &Pki, secs: u64) -> (Leaf, SystemTime) {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![uri(PAYMENTS)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(60)).into();
    let ends = now + Duration::from_secs(secs);
    params.not_after = ends.into();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &pki.clients.issuer).unwrap();
    let leaf = Leaf {
        cert_pem: cert.pem(),
        cert_der: cert.der().clone(),
        key_der: key.serialize_der(),
        cert_path: PathBuf::new(),
        key_path: PathBuf::new(),
    };
    (leaf, ends)
}

/// A connection does not outlive its caller's certificate: once it has ended, the connection
/// (HTTP/1.1 kept alive, HTTP/2, a CONNECT tunnel) is closed at its first idle moment.
#[tokio::test]
async fn a_connection_is_closed_once_its_certificate_has_ended() {
    let pki = Pki::new();
    let fake = FakeKms::start().await;
    let (intercept, inner_ca) = interception(pki.path());
    let proxy = proxy_with(&fake, &pki, "required", intercept).await;
    let (leaf, ends) = short_lived(&pki, 4);
    let host = format!("localhost:{}", proxy.addr.port());
    let raw = RawRequest::signed_kms(
        &host,
        "TrentService.TagResource",
        tag_body(ALLOWED).as_bytes(),
    );
    let connect = |alpn: &'static [u8]| {
        let config = client_config(&pki.listener_ca.pem, Some(&leaf), alpn);
        async move {
            let tcp = TcpStream::connect(proxy.addr).await.unwrap();
            tls_connect(tcp, "localhost", config).await.unwrap()
        }
    };
    let (mut h1, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(connect(b"http/1.1").await))
            .await
            .unwrap();
    tokio::spawn(connection);
    let (mut h2, connection) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(connect(b"h2").await),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    // A CONNECT tunnel, its first request answered.
    let tunnel_raw = RawRequest::signed_kms(
        KMS_HOST,
        "TrentService.TagResource",
        tag_body(ALLOWED).as_bytes(),
    );
    let mut outer = connect(b"http/1.1").await;
    let head = format!("CONNECT {KMS_HOST}:443 HTTP/1.1\r\nHost: {KMS_HOST}:443\r\n\r\n");
    outer.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        assert_eq!(outer.read(&mut byte).await.unwrap(), 1);
        answer.push(byte[0]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    let inner = tls_connect(outer, KMS_HOST, client_config(&inner_ca, None, b"http/1.1"))
        .await
        .unwrap();
    let (mut tunnel, connection) = hyper::client::conn::http1::handshake(TokioIo::new(inner))
        .await
        .unwrap();
    tokio::spawn(connection);
    let authority = format!("https://{host}/");
    let status = |r: Result<http::Response<hyper::body::Incoming>, hyper::Error>| {
        r.map(|r| r.status().as_u16()).map_err(|e| e.to_string())
    };
    assert_eq!(
        status(h1.send_request(to_http(&raw, "/", true)).await),
        Ok(200)
    );
    assert_eq!(
        status(h2.send_request(to_http(&raw, &authority, false)).await),
        Ok(200)
    );
    assert_eq!(
        status(tunnel.send_request(to_http(&tunnel_raw, "/", true)).await),
        Ok(200)
    );
    // Until it has ended, the connections stay: one more request on each.
    if SystemTime::now() + Duration::from_secs(1) < ends {
        assert_eq!(
            status(h1.send_request(to_http(&raw, "/", true)).await),
            Ok(200)
        );
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(h1.is_closed() && h2.is_closed() && tunnel.is_closed()) {
        assert!(
            Instant::now() < deadline,
            "still open after the certificate ended: h1 {}, h2 {}, tunnel {}",
            !h1.is_closed(),
            !h2.is_closed(),
            !tunnel.is_closed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        SystemTime::now() >= ends,
        "closed only once the certificate ended"
    );
    assert!(h2
        .send_request(to_http(&raw, &authority, false))
        .await
        .is_err());
    let records = proxy.settled_audit().await;
    assert!(callers(&records)
        .iter()
        .all(|c| c.as_deref() == Some(PAYMENTS)));
}

// ======================================================================== rules bound to the caller

const PLATFORM: &str = "spiffe://example.org/ns/platform/sa/ci";

/// Caller rules: `team` bound to the caller's namespace, the `abac:` keys for the platform team
/// only (`exempt_callers`), and `cost:` keys forbidden to the search team alone (`callers`).
const CALLER_POLICY: &str = r#"
[policy]

[[policy.rule]]
id = "team-is-yours"
type = "caller-value"
key = "team"
caller = "spiffe://example.org/ns/{team}/sa/*"
value = "{team}"

[[policy.rule]]
id = "abac-platform-only"
type = "forbidden-key"
patterns = ["^abac:"]
exempt_callers = ["spiffe://example.org/ns/platform/sa/*"]

[[policy.rule]]
id = "search-no-cost"
type = "forbidden-key"
patterns = ["^cost:"]
callers = ["spiffe://example.org/ns/search/sa/*"]
"#;

async fn caller_proxy(fake: &FakeKms, pki: &Pki, intercept: String) -> TestProxy {
    start_proxy_with(
        fake,
        ProxyConfig {
            listener: pki.listener("optional"),
            intercept,
            policy: CALLER_POLICY.to_owned(),
            ..ProxyConfig::default()
        },
    )
    .await
}

/// Each decision record's caller, decision and broken rules, in order.
fn decisions(records: &[Value]) -> Vec<(Option<String>, String, Vec<String>)> {
    records
        .iter()
        .filter(|r| r["event"] == "decision")
        .map(|r| {
            let rules = r["violations"]
                .as_array()
                .map(|v| {
                    v.iter()
                        .map(|v| v["rule"].as_str().unwrap().to_owned())
                        .collect()
                })
                .unwrap_or_default();
            (
                r["caller"].as_str().map(str::to_owned),
                r["decision"].as_str().unwrap().to_owned(),
                rules,
            )
        })
        .collect()
}

/// One request of the caller-rules test: who sends it, what it sets, and the rule it breaks
/// (`None`: allowed), with the words its denial must hold.
struct CallerCase {
    leaf: Option<&'static str>,
    tags: &'static [(&'static str, &'static str)],
    broken: Option<&'static str>,
    says: &'static [&'static str],
}

const CALLER_CASES: &[CallerCase] = &[
    CallerCase {
        leaf: Some(PAYMENTS),
        tags: &[("team", "payments")],
        broken: None,
        says: &[],
    },
    CallerCase {
        leaf: Some(PAYMENTS),
        tags: &[("team", "billing")],
        broken: Some("team-is-yours"),
        says: &[PAYMENTS, "\"billing\"", "only to \"payments\""],
    },
    CallerCase {
        leaf: Some(PLATFORM),
        tags: &[("abac:project", "ledger"), ("team", "platform")],
        broken: None,
        says: &[],
    },
    CallerCase {
        leaf: Some(PAYMENTS),
        tags: &[("abac:project", "ledger")],
        broken: Some("abac-platform-only"),
        says: &["abac:project"],
    },
    CallerCase {
        leaf: Some(SEARCH),
        tags: &[("abac:project", "ledger")],
        broken: Some("abac-platform-only"),
        says: &["abac:project"],
    },
    CallerCase {
        leaf: Some(SEARCH),
        tags: &[("cost:center", "1234")],
        broken: Some("search-no-cost"),
        says: &["cost:center"],
    },
    CallerCase {
        leaf: Some(PAYMENTS),
        tags: &[("cost:center", "1234")],
        broken: None,
        says: &[],
    },
    // No certificate (`client_auth = "optional"`): no caller, so `team` cannot be set at all, no
    // exemption applies, and a rule scoped by `callers` does not bind.
    CallerCase {
        leaf: None,
        tags: &[("team", "payments")],
        broken: Some("team-is-yours"),
        says: &["no identity", "client certificate"],
    },
    CallerCase {
        leaf: None,
        tags: &[("abac:project", "ledger")],
        broken: Some("abac-platform-only"),
        says: &["abac:project"],
    },
    CallerCase {
        leaf: None,
        tags: &[("cost:center", "1234")],
        broken: None,
        says: &[],
    },
];

/// Checks one answer against its case; a denial is KMS-shaped, names what it must, and nothing
/// more reached KMS (`forwarded` counts what has).
fn check_caller_case(
    case: &CallerCase,
    result: Result<(u16, Value), String>,
    fake: &FakeKms,
    forwarded: &mut usize,
    what: &str,
) {
    let (status, body) = result.unwrap_or_else(|e| panic!("{what}: {e}"));
    match case.broken {
        None => {
            assert_eq!(status, 200, "{what}: {body}");
            *forwarded += 1;
        }
        Some(rule) => {
            assert_eq!(status, 400, "{what}: {body}");
            assert_eq!(body["__type"], "TagException", "{what}: {body}");
            let message = body["message"].as_str().unwrap_or_default();
            assert!(message.contains(rule), "{what}: {message}");
            for words in case.says {
                assert!(message.contains(words), "{what}: {words:?} in {message}");
            }
        }
    }
    assert_eq!(
        fake.requests().len(),
        *forwarded,
        "{what}: only the allowed changes reach KMS"
    );
}

/// What the records of `cases`, sent in order, must say.
fn expected_decisions<'a>(
    cases: impl IntoIterator<Item = &'a CallerCase>,
) -> Vec<(Option<String>, String, Vec<String>)> {
    cases
        .into_iter()
        .map(|c| {
            (
                c.leaf.map(str::to_owned),
                if c.broken.is_some() { "deny" } else { "allow" }.to_owned(),
                c.broken.iter().map(|r| r.to_string()).collect(),
            )
        })
        .collect()
}

#[tokio::test]
async fn caller_rules_through_the_proxy_with_real_certificates_over_h1_h2_and_connect() {
    let pki = Pki::new();
    let platform = pki.clients.svid(pki.path(), "platform", PLATFORM);
    let leaf_of = |id: Option<&str>| match id {
        None => None,
        Some(PAYMENTS) => Some(&pki.payments),
        Some(SEARCH) => Some(&pki.search),
        Some(PLATFORM) => Some(&platform),
        Some(other) => panic!("no leaf for {other}"),
    };
    let fake = FakeKms::start().await;
    let (intercept, inner_ca) = interception(pki.path());
    let proxy = caller_proxy(&fake, &pki, intercept).await;
    let mut forwarded = 0;
    let mut sent = Vec::new();
    for h2 in [false, true] {
        for (i, case) in CALLER_CASES.iter().enumerate() {
            let result = tag_directly(&proxy, &pki, leaf_of(case.leaf), h2, case.tags).await;
            check_caller_case(
                case,
                result,
                &fake,
                &mut forwarded,
                &format!("h2={h2}, case {i}"),
            );
            sent.push(case);
        }
    }
    // Inside a CONNECT tunnel, the proxy connection's certificate is the caller.
    for (i, case) in CALLER_CASES.iter().enumerate().take(2) {
        let result =
            tag_through_connect(&proxy, &pki, leaf_of(case.leaf), &inner_ca, case.tags).await;
        check_caller_case(
            case,
            result,
            &fake,
            &mut forwarded,
            &format!("CONNECT, case {i}"),
        );
        sent.push(case);
    }
    let records = proxy.settled_audit().await;
    assert_eq!(
        decisions(&records),
        expected_decisions(sent),
        "{records:#?}"
    );
    // The denial's record holds the violation's message, naming the caller.
    let billing = records
        .iter()
        .find(|r| r["event"] == "decision" && r["set"][0]["value"] == "billing")
        .unwrap();
    let message = billing["violations"][0]["message"].as_str().unwrap();
    assert!(message.contains(PAYMENTS), "{billing}");
    assert_eq!(billing["violations"][0]["key"], "team", "{billing}");
    for request in fake.requests() {
        request.verified();
    }
}

// ======================================================================== start, check, reload

#[tokio::test]
async fn a_bundle_that_is_not_a_ca_bundle_is_refused_at_start_naming_the_file() {
    let pki = Pki::new();
    let fake = FakeKms::start().await;
    let empty = pki.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    for (bundle, says) in [
        (pki.payments.cert_path.clone(), "is not a CA"),
        (empty.clone(), "holds no PEM certificate"),
        (pki.path().join("missing.pem"), "missing.pem"),
    ] {
        let listener = pki.listener("required").replace(
            &pki.client_ca_path.display().to_string(),
            &bundle.display().to_string(),
        );
        let started = try_start_proxy_to(
            &fake.url(),
            ProxyConfig {
                listener,
                ..ProxyConfig::default()
            },
        )
        .await;
        let error = match started {
            Ok(_) => panic!("{} was taken as a client CA bundle", bundle.display()),
            Err(error) => error.to_string(),
        };
        assert!(
            error.contains(&bundle.display().to_string()) && error.contains(says),
            "{error}"
        );
    }
}

/// Waits (up to 5 s) until `check` holds for a fresh connection's result.
async fn eventually<F, Fut>(what: &str, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !attempt().await {
        assert!(Instant::now() < deadline, "{what}: not within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn reloads(admin: std::net::SocketAddr, result: &str) -> f64 {
    common::ops::scrape(admin).await.count(
        "kms_tag_guard_reloads_total",
        &[("what", "client_ca"), ("result", result)],
    )
}

#[tokio::test]
async fn the_client_ca_bundle_reloads_and_a_broken_one_keeps_the_last_good() {
    let pki = Pki::new();
    let fake = FakeKms::start().await;
    let proxy = required_proxy_with_admin(&fake, &pki).await;
    let admin = proxy.admin_addr.unwrap();
    let expiry = common::ops::scrape(admin).await.count(
        "kms_tag_guard_certificate_expiry_seconds",
        &[("what", "client_ca")],
    );
    assert!(
        expiry > 1.0e9,
        "the client CA's notAfter is reported: {expiry}"
    );
    let other = pki.other.svid(pki.path(), "other", PAYMENTS);
    assert!(tag_directly(&proxy, &pki, Some(&other), false, ALLOWED)
        .await
        .is_err());
    // The other CA replaces the workload CA: its certificates in, the old ones out.
    let tmp = pki.path().join("bundle.tmp");
    std::fs::write(&tmp, &pki.other.pem).unwrap();
    std::fs::rename(&tmp, &pki.client_ca_path).unwrap();
    proxy.proxy.reload();
    eventually("the other CA's certificate is taken", || async {
        tag_directly(&proxy, &pki, Some(&other), false, ALLOWED)
            .await
            .is_ok()
    })
    .await;
    assert_eq!(reloads(admin, "success").await, 1.0);
    assert!(
        tag_directly(&proxy, &pki, Some(&pki.payments), false, ALLOWED)
            .await
            .is_err()
    );
    // A leaf in place of the bundle is refused and counted; the other CA stays.
    std::fs::write(&tmp, &pki.payments.cert_pem).unwrap();
    std::fs::rename(&tmp, &pki.client_ca_path).unwrap();
    proxy.proxy.reload();
    eventually("the broken bundle is counted", || async {
        reloads(admin, "error").await == 1.0
    })
    .await;
    let (status, _) = tag_directly(&proxy, &pki, Some(&other), false, ALLOWED)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        tag_directly(&proxy, &pki, Some(&pki.payments), false, ALLOWED)
            .await
            .is_err()
    );
    let records = proxy.settled_audit().await;
    assert_eq!(
        callers(&records),
        [Some(PAYMENTS.to_owned()), Some(PAYMENTS.to_owned())]
    );
}

// ======================================================================== boto3

/// boto3 TagResource calls, printed as JSON: `{"allowed": …, "denied": …}` (or the names of
/// `calls`, a list of `[name, tags]` sent in order), each `ok` or the exception's class and message. argv: a JSON
/// object of settings.
const BOTO3: &str = r#"
import json, sys
import boto3
from botocore.config import Config

s = json.loads(sys.argv[1])
config = {"retries": {"max_attempts": 1}, "connect_timeout": 5, "read_timeout": 5}
if s.get("client_cert"):
    config["client_cert"] = tuple(s["client_cert"])
if s.get("proxy"):
    config["proxies"] = {"https": s["proxy"]}
    config["proxies_config"] = {"proxy_ca_bundle": s["proxy_ca_bundle"]}
    if s.get("proxy_client_cert"):
        config["proxies_config"]["proxy_client_cert"] = tuple(s["proxy_client_cert"])
kms = boto3.client(
    "kms",
    endpoint_url=s.get("endpoint_url"),
    region_name="us-east-1",
    aws_access_key_id=s["access_key_id"],
    aws_secret_access_key=s["secret_key"],
    verify=s["verify"],
    config=Config(**config),
)
results = {}
calls = s.get("calls") or [["allowed", [["team:owner", "payments"]]], ["denied", [["Project", "x"]]]]
for name, tags in calls:
    try:
        kms.tag_resource(KeyId="1234abcd-12ab-34cd-56ef-1234567890ab",
                         Tags=[{"TagKey": k, "TagValue": v} for k, v in tags])
        results[name] = {"result": "ok"}
    except Exception as e:
        results[name] = {"result": type(e).__name__, "message": str(e)}
print(json.dumps(results))
"#;

async fn boto3(settings: Value) -> Value {
    let python = common::moto::Moto::python();
    let mut settings = settings;
    settings["access_key_id"] = json!(ACCESS_KEY_ID);
    settings["secret_key"] = json!(SECRET_KEY);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args(["-c", BOTO3, &settings.to_string()])
            .env_remove("AWS_PROFILE")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("AWS_CA_BUNDLE")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("NO_PROXY", "")
            .output()
            .expect("run the venv's python")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "boto3 script failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)))
}

fn pair(leaf: &Leaf) -> Value {
    json!([leaf.cert_path, leaf.key_path])
}

#[tokio::test]
async fn boto3_with_client_cert_on_the_tls_listener() {
    let pki = Pki::new();
    let fake = FakeKms::start().await;
    let proxy = proxy_with(&fake, &pki, "required", String::new()).await;
    let endpoint = format!("https://localhost:{}", proxy.addr.port());
    let base = json!({"endpoint_url": endpoint, "verify": pki.listener_ca_path});
    // Without a certificate, with the other CA's, with an expired one: refused, nothing sent.
    let other = pki.other.svid(pki.path(), "other", PAYMENTS);
    let expired = pki
        .clients
        .leaf(pki.path(), "expired", vec![uri(PAYMENTS)], Kind::Expired);
    boto3_refused(
        &base,
        "client_cert",
        [
            ("none", Value::Null),
            ("another CA", pair(&other)),
            ("expired", pair(&expired)),
        ],
    )
    .await;
    nothing_reached(&fake, &proxy, "boto3 refused");
    boto3_allowed_and_denied(&base, "client_cert", pair(&pki.payments)).await;
    let records = proxy.settled_audit().await;
    let p = Some(PAYMENTS.to_owned());
    assert_eq!(callers(&records), [p.clone(), p], "{records:#?}");
    assert_eq!(fake.requests().len(), 1);
    fake.requests()[0].verified();
}

/// boto3 with each of the `refused` certificates as its `key` setting (none, another CA's, an
/// expired one): neither call gets an answer from KMS, nor a denial from the policy.
async fn boto3_refused<const N: usize>(base: &Value, key: &str, refused: [(&str, Value); N]) {
    for (what, cert) in refused {
        let mut settings = base.clone();
        settings[key] = cert;
        let results = boto3(settings).await;
        for call in ["allowed", "denied"] {
            assert_ne!(results[call]["result"], "ok", "{what}: {results:#}");
            assert_ne!(
                results[call]["result"], "TagException",
                "{what}: {results:#}"
            );
        }
    }
}

/// boto3 with `cert` as its `key` setting: the allowed call succeeds, the denied one raises
/// botocore's TagException.
async fn boto3_allowed_and_denied(base: &Value, key: &str, cert: Value) {
    let mut settings = base.clone();
    settings[key] = cert;
    let results = boto3(settings).await;
    assert_eq!(results["allowed"]["result"], "ok", "{results:#}");
    assert_eq!(results["denied"]["result"], "TagException", "{results:#}");
}

#[tokio::test]
async fn boto3_through_the_tls_listener_as_an_https_proxy_with_proxy_client_cert() {
    let pki = Pki::new();
    let fake = FakeKms::start().await;
    let (intercept, inner_ca) = interception(pki.path());
    let proxy = proxy_with(&fake, &pki, "required", intercept).await;
    let inner_ca_path = pki.path().join("interception-ca.pem");
    std::fs::write(&inner_ca_path, inner_ca).unwrap();
    let base = json!({
        "proxy": format!("https://localhost:{}", proxy.addr.port()),
        "proxy_ca_bundle": pki.listener_ca_path,
        "verify": inner_ca_path,
    });
    let other = pki.other.svid(pki.path(), "other", PAYMENTS);
    boto3_refused(
        &base,
        "proxy_client_cert",
        [("none", Value::Null), ("another CA", pair(&other))],
    )
    .await;
    nothing_reached(&fake, &proxy, "boto3 through the proxy, refused");
    boto3_allowed_and_denied(&base, "proxy_client_cert", pair(&pki.search)).await;
    let records = proxy.settled_audit().await;
    let s = Some(SEARCH.to_owned());
    assert_eq!(callers(&records), [s.clone(), s], "{records:#?}");
    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].header("host"), Some(KMS_HOST));
    requests[0].verified();
}

#[tokio::test]
async fn boto3_with_client_cert_meets_the_caller_rules_as_a_typed_tag_exception() {
    let pki = Pki::new();
    let fake = FakeKms::start().await;
    let proxy = caller_proxy(&fake, &pki, String::new()).await;
    let endpoint = format!("https://localhost:{}", proxy.addr.port());
    let calls = json!([
        ["own_team", [["team", "payments"]]],
        ["other_team", [["team", "billing"]]],
        ["abac", [["abac:project", "ledger"]]],
    ]);
    let mut settings = json!({
        "endpoint_url": endpoint,
        "verify": pki.listener_ca_path,
        "calls": calls,
        "client_cert": pair(&pki.payments),
    });
    let results = boto3(settings.clone()).await;
    assert_eq!(results["own_team"]["result"], "ok", "{results:#}");
    assert_eq!(fake.requests().len(), 1);
    for call in ["other_team", "abac"] {
        assert_eq!(results[call]["result"], "TagException", "{results:#}");
    }
    let message = results["other_team"]["message"].as_str().unwrap();
    assert!(
        message.contains(PAYMENTS) && message.contains("only to \"payments\""),
        "{message}"
    );
    // Without a certificate (the listener takes none under "optional"): no team at all.
    settings["client_cert"] = Value::Null;
    let results = boto3(settings).await;
    for call in ["own_team", "other_team", "abac"] {
        assert_eq!(results[call]["result"], "TagException", "{results:#}");
    }
    let message = results["own_team"]["message"].as_str().unwrap();
    assert!(message.contains("no identity"), "{message}");
    assert_eq!(fake.requests().len(), 1, "no refused change reached KMS");
    fake.requests()[0].verified();
    let records = proxy.settled_audit().await;
    let p = Some(PAYMENTS.to_owned());
    let deny = |rule: &str| vec![rule.to_owned()];
    assert_eq!(
        decisions(&records),
        [
            (p.clone(), "allow".to_owned(), vec![]),
            (p.clone(), "deny".to_owned(), deny("team-is-yours")),
            (p, "deny".to_owned(), deny("abac-platform-only")),
            (None, "deny".to_owned(), deny("team-is-yours")),
            (None, "deny".to_owned(), deny("team-is-yours")),
            (None, "deny".to_owned(), deny("abac-platform-only")),
        ],
        "{records:#?}"
    );
}

// ======================================================================== the JavaScript SDK

/// Runs tests/js/kms-driver.mjs on `scenarios`; one JSON object per call.
async fn run_driver(scenarios: Value, env: &[(&str, &Path)]) -> Vec<Value> {
    static MODULES: OnceLock<PathBuf> = OnceLock::new();
    let modules = MODULES.get_or_init(common::deps::node_modules).clone();
    let dir = tempfile::tempdir().unwrap();
    let scenario_path = dir.path().join("scenario.json");
    std::fs::write(&scenario_path, scenarios.to_string()).unwrap();
    let mut command = Command::new("node");
    command
        .arg(common::deps::repo_root().join("tests/js/kms-driver.mjs"))
        .arg(&scenario_path)
        .stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        let upper = name.to_ascii_uppercase();
        if upper.starts_with("AWS_")
            || upper.starts_with("NODE_")
            || matches!(upper.as_str(), "HTTP_PROXY" | "HTTPS_PROXY" | "NO_PROXY")
        {
            command.env_remove(&name);
        }
    }
    let nowhere = dir.path().join("no-such-file");
    command
        .env("KMS_DRIVER_NODE_MODULES", &modules)
        .env("AWS_CONFIG_FILE", &nowhere)
        .env("AWS_SHARED_CREDENTIALS_FILE", &nowhere);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = tokio::task::spawn_blocking(move || command.output().expect("run node"))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let shown = format!(
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "the driver failed\n{shown}");
    let mut lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{shown}")))
        .collect();
    let done = lines.pop().unwrap_or_default();
    assert_eq!(done["done"], true, "{shown}");
    lines
}

fn js_scenario(name: &str, client: Value) -> Value {
    let mut settings = json!({
        "region": REGION,
        "credentials": {"accessKeyId": ACCESS_KEY_ID, "secretAccessKey": SECRET_KEY},
        "maxAttempts": 1,
        "handler": "http1",
    });
    for (k, v) in client.as_object().unwrap() {
        settings[k] = v.clone();
    }
    let tags = |pairs: &[(&str, &str)]| -> Value {
        pairs
            .iter()
            .map(|(k, v)| json!({"TagKey": k, "TagValue": v}))
            .collect()
    };
    let key = "1234abcd-12ab-34cd-56ef-1234567890ab";
    json!({
        "name": name,
        "client": settings,
        "calls": [
            {"id": "allowed", "op": "TagResource", "input": {"KeyId": key, "Tags": tags(ALLOWED)}},
            {"id": "denied", "op": "TagResource", "input": {"KeyId": key, "Tags": tags(DENIED)}},
        ],
    })
}

fn js_results<'a>(results: &'a [Value], scenario: &str) -> (&'a Value, &'a Value) {
    let find = |id: &str| {
        results
            .iter()
            .find(|r| r["scenario"] == scenario && r["id"] == id)
            .unwrap_or_else(|| panic!("no {scenario}/{id} in {results:#?}"))
    };
    (find("allowed"), find("denied"))
}

#[tokio::test]
async fn javascript_sdk_with_an_https_agent_certificate_http1_and_http2_and_through_hpagent() {
    let pki = Pki::new();
    let fake = FakeKms::start().await;
    let (intercept, inner_ca) = interception(pki.path());
    let proxy = proxy_with(&fake, &pki, "required", intercept).await;
    let inner_ca_path = pki.path().join("interception-ca.pem");
    std::fs::write(&inner_ca_path, inner_ca).unwrap();
    let endpoint = format!("https://localhost:{}", proxy.addr.port());
    let tls = |leaf: Option<&Leaf>| match leaf {
        Some(leaf) => {
            json!({"cert": leaf.cert_path, "key": leaf.key_path, "ca": pki.listener_ca_path})
        }
        None => json!({"ca": pki.listener_ca_path}),
    };
    let other = pki.other.svid(pki.path(), "other", PAYMENTS);
    // Refused: no certificate, another CA's; HTTP/1.1 and h2.
    let mut refused = Vec::new();
    for (name, leaf) in [("none", None), ("other", Some(&other))] {
        for handler in ["http1", "http2"] {
            refused.push(js_scenario(
                &format!("{name}-{handler}"),
                json!({"endpoint": endpoint, "handler": handler, "tls": tls(leaf)}),
            ));
        }
    }
    let results = run_driver(json!(refused), &[]).await;
    assert_eq!(results.len(), 8, "{results:#?}");
    for result in &results {
        assert_eq!(result["ok"], false, "{result:#}");
        assert_ne!(result["status"], 400, "{result:#}");
    }
    nothing_reached(&fake, &proxy, "the JavaScript SDK, refused");
    let scenarios = json!([
        js_scenario(
            "b-http1",
            json!({"endpoint": endpoint, "tls": tls(Some(&pki.payments))})
        ),
        js_scenario(
            "b-http2",
            json!({"endpoint": endpoint, "handler": "http2", "tls": tls(Some(&pki.search))})
        ),
        js_scenario(
            "c-hpagent",
            json!({
                "proxy": {"url": endpoint, "agent": "hpagent"},
                "tls": tls(Some(&pki.payments)),
            })
        ),
    ]);
    let results = run_driver(scenarios, &[("NODE_EXTRA_CA_CERTS", &inner_ca_path)]).await;
    for scenario in ["b-http1", "b-http2", "c-hpagent"] {
        let (allowed, denied) = js_results(&results, scenario);
        assert_eq!(allowed["ok"], true, "{scenario}: {allowed:#}");
        assert_eq!(denied["ok"], false, "{scenario}: {denied:#}");
        assert_eq!(denied["status"], 400, "{scenario}: {denied:#}");
    }
    let records = proxy.settled_audit().await;
    let (p, s) = (Some(PAYMENTS.to_owned()), Some(SEARCH.to_owned()));
    assert_eq!(
        callers(&records),
        [p.clone(), p.clone(), s.clone(), s, p.clone(), p],
        "{records:#?}"
    );
    assert_eq!(fake.requests().len(), 3);
    for request in fake.requests() {
        request.verified();
    }
}
