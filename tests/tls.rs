//! TLS end to end: the listener's own certificate (ALPN, the SDK over it, live replacement),
//! TLS to the upstream (extra roots, h2 via ALPN), CONNECT interception (HTTPS_PROXY clients,
//! blind tunnels, refusals, SNI and Host pinning), the forwarding-loop guard, `ca init` and its
//! name constraints, and `resolver = "dns"`.
//!
//! Every network wait has a timeout. Tests that need a listener on port 443 (CONNECT only
//! tunnels to 443) take [`PORT_443`] so they never race each other, and skip that part with a
//! message when the port cannot be bound.

mod common;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kms::primitives::Blob;
use bytes::Bytes;
use common::child::{start_child, try_spawn_proxy, ChildOptions};
use common::ops::{encrypt_body, free_port, tag_body};
use common::sentinel::seen_besides_sentinels;
use common::tls_client::tls_connect;
use common::*;
use http::{HeaderMap, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The longest any single network step may take before the test fails.
const STEP: Duration = Duration::from_secs(5);
const KEY_ID: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
const KMS_HOST: &str = "kms.us-east-1.amazonaws.com";

/// Serialises the tests that listen on (or make the proxy listen on) port 443.
static PORT_443: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ------------------------------------------------------------------------ certificates

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test CA (no name constraints) that issues leaves.
struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and its key, as PEM and DER.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Leaf {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server leaf for `names` (DNS names or IP addresses) with this serial.
    fn leaf(&self, names: &[&str], serial: u64) -> Leaf {
        mint_leaf(&self.issuer, names, serial)
    }

    /// Writes the CA's certificate and key as `NAME.pem` and `NAME.key` (for `[intercept]`).
    fn write_pair(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&key, self.issuer.key().serialize_pem()).unwrap();
        // The proxy refuses a CA key other users may read.
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        (self.write(dir, &format!("{name}.pem")), key)
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).unwrap();
        path
    }
}

fn mint_leaf(issuer: &Issuer<'_, KeyPair>, names: &[&str], serial: u64) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names.clone()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, &names[0]);
    params.serial_number = Some(SerialNumber::from(serial));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer).unwrap();
    Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().clone(),
        key_der: key.serialize_der(),
    }
}

/// Writes a certificate and key through a rename each, key first, so a reader never sees a
/// half-written file.
fn install(cert_path: &Path, key_path: &Path, cert_pem: &str, key_pem: &str) {
    write_atomic(key_path, key_pem);
    write_atomic(cert_path, cert_pem);
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A rustls client configuration trusting only the PEM roots in `ca_pem`, offering `alpn`.
fn client_config(ca_pem: &[u8], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn tcp(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// The leaf the server at `addr` presents now (a fresh connection and handshake).
async fn presented_leaf(addr: SocketAddr, ca_pem: &[u8]) -> io::Result<CertificateDer<'static>> {
    let stream = tls_connect(tcp(addr).await, "localhost", client_config(ca_pem, &[])).await?;
    let (_, conn) = stream.get_ref();
    Ok(conn.peer_certificates().expect("server certificates")[0].clone())
}

// ------------------------------------------------------------------------ HTTP over any stream

/// A response read by [`send_h1`] / [`send_h2`].
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
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

async fn read_answer(response: http::Response<hyper::body::Incoming>) -> Answer {
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(STEP, body.collect())
        .await
        .expect("response body timed out")
        .expect("response body")
        .to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// One HTTP/1.1 request (Host and all as in `raw`) on `io`.
async fn send_h1<S>(io: S, raw: &RawRequest) -> Answer
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    let response = tokio::time::timeout(STEP, sender.send_request(to_http(raw, "/", true)))
        .await
        .expect("HTTP/1.1 response timed out")
        .expect("HTTP/1.1 response");
    read_answer(response).await
}

/// One HTTP/2 request on `io`: `raw`'s Host becomes `:authority`, the way h2 clients send it.
async fn send_h2<S>(io: S, raw: &RawRequest) -> Answer
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let authority = raw.header("host").expect("a Host to sign").to_owned();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let request = to_http(raw, &format!("https://{authority}/"), false);
    let response = tokio::time::timeout(STEP, sender.send_request(request))
        .await
        .expect("h2 response timed out")
        .expect("h2 response");
    read_answer(response).await
}

// ------------------------------------------------------------------------ CONNECT by hand

/// The proxy's answer to a CONNECT; on 200 `stream` is the tunnel.
struct Connected {
    stream: TcpStream,
    status: u16,
    head: String,
    body: String,
}

/// Sends `CONNECT authority` on a fresh connection and reads the answer head (a byte at a time,
/// so nothing of the tunnel is consumed) and, when it says so, a Content-Length body.
async fn connect(proxy: SocketAddr, authority: &str) -> Connected {
    let mut stream = tcp(proxy).await;
    let request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    tokio::time::timeout(STEP, async move {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).await.expect("read CONNECT answer");
            assert!(
                n > 0,
                "the proxy closed the CONNECT without an answer: {:?}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line in {head:?}"));
        let length = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        stream
            .read_exact(&mut body)
            .await
            .expect("CONNECT answer body");
        Connected {
            stream,
            status,
            head,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    })
    .await
    .expect("CONNECT answer timed out")
}

// ------------------------------------------------------------------------ a watched listener

/// A TCP listener that counts connections and echoes what it reads.
struct Watched {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Watched {
    async fn bind(addr: &str) -> io::Result<Watched> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(Watched {
            addr,
            accepted,
            task,
        })
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A watched listener on `ip:443`, or `None` (with a message) when the port cannot be bound.
async fn watch_443(ip: &str, test: &str) -> Option<Watched> {
    match Watched::bind(&format!("{ip}:443")).await {
        Ok(watched) => Some(watched),
        Err(e) => {
            eprintln!("SKIPPED part of {test}: cannot listen on {ip}:443 ({e}); CONNECT only tunnels to port 443");
            None
        }
    }
}

// ------------------------------------------------------------------------ SDK helpers

/// Encrypt, an allowed TagResource and a denied one through `client`; the fake must get exactly
/// the first two, both verifying. Returns what the fake recorded.
async fn encrypt_tag_and_deny(client: &aws_sdk_kms::Client, fake: &FakeKms) -> Vec<Recorded> {
    let encrypted = client
        .encrypt()
        .key_id(KEY_ID)
        .plaintext(Blob::new("hello"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("Encrypt: {}", error_chain(&e)));
    assert!(encrypted.ciphertext_blob().is_some());
    client
        .tag_resource()
        .key_id(KEY_ID)
        .tags(tag("team:owner", "payments"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("allowed TagResource: {}", error_chain(&e)));
    assert_tag_exception(
        client
            .tag_resource()
            .key_id(KEY_ID)
            .tags(tag("Project", "x"))
            .send()
            .await,
        &["abac-keys"],
    );
    let requests = fake.requests();
    let operations: Vec<_> = requests.iter().map(|r| r.operation()).collect();
    assert_eq!(
        operations,
        [Some("Encrypt"), Some("TagResource")],
        "the denied request must not reach KMS"
    );
    for request in &requests {
        request.verified();
    }
    requests
}

/// The audit shows one allowed and one denied TagResource.
async fn assert_audited_allow_and_deny(proxy: &TestProxy) {
    let records = proxy.wait_for_audit(3).await;
    let decisions: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "decision")
        .collect();
    let verdicts: Vec<&str> = decisions
        .iter()
        .map(|r| r["decision"].as_str().unwrap())
        .collect();
    assert_eq!(verdicts, ["allow", "deny"], "{records:#?}");
    assert!(decisions
        .iter()
        .all(|r| r["operation"] == "TagResource" && r["access_key_id"] == ACCESS_KEY_ID));
    let rules: Vec<&str> = decisions[1]["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["rule"].as_str().unwrap())
        .collect();
    assert!(rules.contains(&"abac-keys"), "{rules:?}");
}

// ======================================================================== 1. TLS listener

/// A proxy whose listener speaks TLS with `leaf`, in front of `fake`.
async fn tls_listener_proxy(fake: &FakeKms, dir: &Path, leaf: &Leaf) -> (TestProxy, PathBuf) {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    install(&cert, &key, &leaf.cert_pem, &leaf.key_pem);
    let proxy = start_proxy_with(
        fake,
        ProxyConfig {
            listener: format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"",
                cert.display(),
                key.display()
            ),
            ..ProxyConfig::default()
        },
    )
    .await;
    (proxy, cert)
}

/// The ALPN protocols a client offers, and the one the listener must pick.
type AlpnCase<'a> = (&'a [&'a [u8]], Option<&'a [u8]>);

#[tokio::test]
async fn tls_listener_negotiates_h2_and_http1_and_serves_both() {
    let ca = TestCa::new("listener test CA");
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let leaf = ca.leaf(&["localhost", "127.0.0.1"], 1);
    let (proxy, _) = tls_listener_proxy(&fake, dir.path(), &leaf).await;
    let host = format!("localhost:{}", proxy.addr.port());
    let ca_pem = ca.pem.as_bytes();

    let offers: [AlpnCase; 4] = [
        (&[b"h2"], Some(b"h2")),
        (&[b"http/1.1"], Some(b"http/1.1")),
        (&[b"h2", b"http/1.1"], Some(b"h2")),
        (&[], None),
    ];
    for (offer, expected) in offers {
        let stream = tls_connect(
            tcp(proxy.addr).await,
            "localhost",
            client_config(ca_pem, offer),
        )
        .await
        .unwrap_or_else(|e| panic!("handshake offering {offer:?}: {e}"));
        let negotiated = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        assert_eq!(
            negotiated.as_deref(),
            expected,
            "ALPN offering {:?}",
            offer
                .iter()
                .map(|p| String::from_utf8_lossy(p))
                .collect::<Vec<_>>()
        );
        let raw = RawRequest::signed_kms(&host, "TrentService.Encrypt", encrypt_body().as_bytes());
        let answer = if negotiated.as_deref() == Some(b"h2") {
            send_h2(stream, &raw).await
        } else {
            send_h1(stream, &raw).await
        };
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        assert!(answer.json()["CiphertextBlob"].is_string());
    }
    let requests = fake.requests();
    assert_eq!(requests.len(), 4);
    for request in &requests {
        request.verified();
        assert_eq!(
            request.header("host"),
            Some(host.as_str()),
            "the signed Host (h2: :authority) reaches KMS unchanged"
        );
    }
}

#[tokio::test]
async fn sdk_over_the_tls_listener_encrypts_tags_and_is_denied() {
    let ca = TestCa::new("listener test CA");
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let leaf = ca.leaf(&["localhost", "127.0.0.1"], 2);
    let (proxy, _) = tls_listener_proxy(&fake, dir.path(), &leaf).await;
    let client = kms_client_opts(
        &format!("https://localhost:{}", proxy.addr.port()),
        ClientOptions {
            ca_pem: Some(ca.pem.clone().into_bytes()),
            ..ClientOptions::default()
        },
    );
    let requests = encrypt_tag_and_deny(&client, &fake).await;
    let host = format!("localhost:{}", proxy.addr.port());
    assert!(requests
        .iter()
        .all(|r| r.header("host") == Some(host.as_str())));
    assert_audited_allow_and_deny(&proxy).await;

    // A client that does not trust the test CA gets nowhere.
    let stranger = TestCa::new("some other CA");
    let refused = tls_connect(
        tcp(proxy.addr).await,
        "localhost",
        client_config(stranger.pem.as_bytes(), &[]),
    )
    .await;
    assert!(
        refused.is_err(),
        "an unknown issuer must fail the handshake"
    );
}

/// Polls fresh handshakes until the server presents `want`, for at most `within`.
async fn wait_for_leaf(
    addr: SocketAddr,
    ca_pem: &[u8],
    want: &CertificateDer<'_>,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if presented_leaf(addr, ca_pem).await.ok().as_ref() == Some(want) {
            return Some(started.elapsed());
        }
        if started.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Calls `reload()` and waits (up to 2 s) until it has run. A reload handles the listener
/// certificate first, then reopens the audit log (`src/reload.rs`), so with the audit file moved
/// away, a new one at its path shows the certificate step is done.
async fn reload_and_wait(proxy: &TestProxy) {
    let moved = proxy.audit_path.with_extension("moved");
    std::fs::rename(&proxy.audit_path, &moved).expect("move the audit file away");
    proxy.proxy.reload();
    assert!(
        poll_until(Duration::from_secs(2), || proxy.audit_path.exists()).await,
        "reload() not handled in 2 s"
    );
}

#[tokio::test]
async fn tls_listener_certificate_is_replaced_on_reload_and_a_broken_one_is_ignored() {
    let ca = TestCa::new("listener test CA");
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let a = ca.leaf(&["localhost"], 10);
    let b = ca.leaf(&["localhost"], 11);
    let (proxy, cert_path) = tls_listener_proxy(&fake, dir.path(), &a).await;
    let key_path = dir.path().join("tls.key");
    let ca_pem = ca.pem.as_bytes();
    assert_eq!(
        presented_leaf(proxy.addr, ca_pem).await.unwrap(),
        a.cert_der
    );

    install(&cert_path, &key_path, &b.cert_pem, &b.key_pem);
    proxy.proxy.reload();
    let took = wait_for_leaf(proxy.addr, ca_pem, &b.cert_der, Duration::from_secs(2))
        .await
        .expect("after reload() new handshakes present certificate B");
    eprintln!("certificate B served {took:?} after reload()");

    // A garbage replacement: the previous certificate stays in service.
    write_atomic(
        &cert_path,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
    );
    reload_and_wait(&proxy).await;
    for _ in 0..3 {
        assert_eq!(
            presented_leaf(proxy.addr, ca_pem).await.unwrap(),
            b.cert_der,
            "a broken replacement must leave B in service"
        );
    }
    // A key that does not match the certificate is as broken.
    let c = ca.leaf(&["localhost"], 12);
    install(&cert_path, &key_path, &c.cert_pem, &a.key_pem);
    reload_and_wait(&proxy).await;
    assert_eq!(
        presented_leaf(proxy.addr, ca_pem).await.unwrap(),
        b.cert_der,
        "a certificate with someone else's key must leave B in service"
    );
    // And requests still go through.
    let client = kms_client_opts(
        &format!("https://localhost:{}", proxy.addr.port()),
        ClientOptions {
            ca_pem: Some(ca.pem.clone().into_bytes()),
            ..ClientOptions::default()
        },
    );
    client
        .encrypt()
        .key_id(KEY_ID)
        .plaintext(Blob::new("x"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("Encrypt: {}", error_chain(&e)));
    fake.last().unwrap().verified();

    // Repaired: the good pair is picked up.
    install(&cert_path, &key_path, &c.cert_pem, &c.key_pem);
    proxy.proxy.reload();
    wait_for_leaf(proxy.addr, ca_pem, &c.cert_der, Duration::from_secs(2))
        .await
        .expect("a repaired pair is picked up on the next reload");
}

#[tokio::test]
async fn tls_listener_certificate_is_replaced_by_the_poll() {
    let ca = TestCa::new("listener test CA");
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let a = ca.leaf(&["localhost"], 20);
    let b = ca.leaf(&["localhost"], 21);
    let (proxy, cert_path) = tls_listener_proxy(&fake, dir.path(), &a).await;
    let ca_pem = ca.pem.as_bytes();
    assert_eq!(
        presented_leaf(proxy.addr, ca_pem).await.unwrap(),
        a.cert_der
    );
    install(
        &cert_path,
        &dir.path().join("tls.key"),
        &b.cert_pem,
        &b.key_pem,
    );
    // No reload(): the 5 s poll has to notice.
    let took = wait_for_leaf(proxy.addr, ca_pem, &b.cert_der, Duration::from_secs(7))
        .await
        .expect("the 5 s poll picks up certificate B within 7 s");
    eprintln!("certificate B served {took:?} after the files changed (poll)");
}

// ======================================================================== 2. TLS upstream

/// A fake KMS behind TLS for `localhost`, offering `alpn`.
async fn tls_fake(ca: &TestCa, alpn: &[&[u8]]) -> FakeKms {
    let leaf = ca.leaf(&["localhost"], 30);
    FakeKms::start_tls(
        vec![leaf.cert_der.clone()],
        leaf.key(),
        alpn.iter().map(|p| p.to_vec()).collect(),
    )
    .await
}

/// A plain-HTTP proxy whose upstream is `fake` (`https://localhost:PORT`) with these extra
/// `[upstream]` lines.
async fn proxy_to_tls_fake(fake: &FakeKms, upstream: String) -> TestProxy {
    assert!(fake.url().starts_with("https://localhost:"));
    start_proxy_with(
        fake,
        ProxyConfig {
            upstream,
            ..ProxyConfig::default()
        },
    )
    .await
}

#[tokio::test]
async fn upstream_tls_with_ca_file_over_http1() {
    let ca = TestCa::new("upstream test CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "upstream-ca.pem");
    let fake = tls_fake(&ca, &[b"http/1.1"]).await;
    let proxy = proxy_to_tls_fake(&fake, format!("ca_file = \"{}\"", ca_file.display())).await;
    let client = kms_client(&proxy.url());
    let requests = encrypt_tag_and_deny(&client, &fake).await;
    for request in &requests {
        assert_eq!(request.version, Version::HTTP_11);
        assert_eq!(
            request.header("host"),
            Some(proxy.addr.to_string().as_str())
        );
    }
    assert_audited_allow_and_deny(&proxy).await;
}

/// A request signed over `host` goes to KMS as HTTP/1.1 even when the upstream offers h2: over
/// h2 the :authority would be the target the proxy dials (the endpoint, or `<host>:443`), not the
/// Host the client signed, and an h2 server may judge (or verify) the request by :authority.
/// Only a request signed over `:authority` goes as h2 (the tests below).
#[tokio::test]
async fn upstream_tls_keeps_http1_to_a_fixed_endpoint_even_when_h2_is_offered() {
    let ca = TestCa::new("upstream test CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "upstream-ca.pem");
    let fake = tls_fake(&ca, &[b"h2", b"http/1.1"]).await;
    let proxy = proxy_to_tls_fake(&fake, format!("ca_file = \"{}\"", ca_file.display())).await;
    let client = kms_client(&proxy.url());
    let requests = encrypt_tag_and_deny(&client, &fake).await;
    let signed_host = proxy.addr.to_string();
    for request in &requests {
        assert_eq!(
            request.version,
            Version::HTTP_11,
            "no h2 toward a fixed endpoint"
        );
        assert_eq!(request.header("host"), Some(signed_host.as_str()));
        request.verified();
    }
}

#[tokio::test]
async fn upstream_tls_with_an_unknown_issuer_is_a_502() {
    let ca = TestCa::new("upstream test CA");
    let stranger = TestCa::new("an unrelated CA");
    let dir = tempfile::tempdir().unwrap();
    let stranger_file = stranger.write(dir.path(), "stranger.pem");
    let fake = tls_fake(&ca, &[b"h2", b"http/1.1"]).await;

    let check = |answer: RawResponse, what: &str| {
        assert_eq!(answer.status, 502, "{what}: {}", answer.body_str());
        let body = answer.json();
        assert_eq!(body["__type"], "BadGateway", "{what}");
        assert_eq!(answer.header("x-amzn-errortype"), Some("BadGateway"));
        let message = body["message"].as_str().unwrap().to_ascii_lowercase();
        assert!(
            message.contains("certificate") || message.contains("issuer"),
            "{what}: the message should say the certificate is not trusted: {message}"
        );
        eprintln!("{what}: {message}");
    };

    // ca_file names a CA that did not sign the upstream's certificate.
    let proxy =
        proxy_to_tls_fake(&fake, format!("ca_file = \"{}\"", stranger_file.display())).await;
    let answer = common::ops::call(proxy.addr, "Encrypt", &encrypt_body()).await;
    check(answer, "ca_file of another CA");
    let answer = common::ops::call(
        proxy.addr,
        "TagResource",
        &tag_body(&[("team:owner", "payments")]),
    )
    .await;
    check(answer, "allowed TagResource, ca_file of another CA");
    let outcome = proxy
        .wait_for_audit(2)
        .await
        .into_iter()
        .find(|r| r["event"] == "outcome");
    eprintln!("audit outcome of the failed forward: {outcome:?}");

    // No ca_file: the system roots alone do not know the test CA.
    match try_start_proxy_to(&fake.url(), ProxyConfig::default()).await {
        Ok(bare) => {
            let answer = common::ops::call(bare.addr, "Encrypt", &encrypt_body()).await;
            check(answer, "no ca_file");
            bare.proxy.shutdown();
        }
        Err(e) => eprintln!(
            "SKIPPED the no-ca_file case: this machine has no system roots, so the proxy refuses to start ({e})"
        ),
    }
    assert_eq!(
        fake.count(),
        0,
        "no request may complete over an untrusted TLS connection"
    );
}

/// An h2 connection to the proxy's plain listener, with prior knowledge (mode A).
async fn h2_to(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    sender
}

/// One request signed over `:authority` (as NodeHttp2Handler signs), answered.
async fn over_authority(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    authority: &str,
    operation: &str,
    body: &str,
) -> Answer {
    let request = sigv4::signed_over_authority(
        authority,
        &format!("http://{authority}/"),
        operation,
        body.as_bytes(),
    );
    let response = tokio::time::timeout(STEP, sender.send_request(request))
        .await
        .expect("h2 response timed out")
        .expect("h2 response");
    read_answer(response).await
}

/// A request whose signature covers `:authority` only verifies where `:authority` arrives as
/// signed: the proxy sends it to KMS as h2 (ALPN h2 over TLS; prior knowledge to a plain
/// endpoint) with the `:authority` the client sent, and adds no Host.
#[tokio::test]
async fn a_request_signed_over_authority_reaches_kms_as_h2_with_its_authority() {
    let ca = TestCa::new("upstream test CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "upstream-ca.pem");
    let tls = tls_fake(&ca, &[b"h2", b"http/1.1"]).await;
    let plain = FakeKms::start().await;
    for (fake, what) in [(&tls, "TLS, ALPN h2"), (&plain, "plain, prior knowledge")] {
        let proxy = proxy_to_tls_fake_or_plain(fake, &ca_file).await;
        let authority = proxy.addr.to_string();
        let mut h2 = h2_to(proxy.addr).await;
        let encrypt = over_authority(&mut h2, &authority, "Encrypt", &encrypt_body()).await;
        assert_eq!(encrypt.status, 200, "{what}: {:?}", encrypt.body);
        let allowed = tag_body(&[("team:owner", "payments")]);
        let tagged = over_authority(&mut h2, &authority, "TagResource", &allowed).await;
        assert_eq!(tagged.status, 200, "{what}: {:?}", tagged.body);
        let denied = tag_body(&[("Project", "x")]);
        let refused = over_authority(&mut h2, &authority, "TagResource", &denied).await;
        assert_eq!(refused.status, 400, "{what}: {:?}", refused.body);
        assert_eq!(refused.json()["__type"], "TagException", "{what}");
        // Multiplexed: many at once on the client's connection, and on the proxy's to KMS.
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let mut h2 = h2.clone();
            let authority = authority.clone();
            calls.spawn(async move {
                over_authority(&mut h2, &authority, "Encrypt", &encrypt_body()).await
            });
        }
        while let Some(answer) = calls.join_next().await {
            let answer = answer.unwrap();
            assert_eq!(answer.status, 200, "{what}: {:?}", answer.body);
        }

        let requests = fake.requests();
        let operations: Vec<_> = requests.iter().map(|r| r.operation()).collect();
        assert_eq!(operations.len(), 22, "{what}: {operations:?}");
        assert_eq!(
            operations[..2],
            [Some("Encrypt"), Some("TagResource")],
            "{what}"
        );
        for request in &requests {
            assert_eq!(request.version, Version::HTTP_2, "{what}");
            assert_eq!(
                request.uri.authority().map(|a| a.as_str()),
                Some(authority.as_str()),
                "{what}: :authority as the client sent it"
            );
            assert_eq!(request.header("host"), None, "{what}: nothing added");
            assert!(request.verified().signs(":authority"), "{what}");
        }
        assert_audited_allow_and_deny(&proxy).await;
        fake.clear();
    }
}

/// A TLS upstream that accepts TCP and never answers the handshake: the request is never sent,
/// so the client gets a 502 once `connect_timeout_ms` has passed (not a 504 after `timeout_ms`),
/// on the fast path and the general server alike, and a tag change is recorded not applied.
#[tokio::test]
async fn a_tls_handshake_that_never_answers_is_a_502_within_connect_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let holding = Arc::clone(&held);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            holding.lock().unwrap().push(stream);
        }
    });
    let ca = TestCa::new("upstream test CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "upstream-ca.pem");
    let proxy = start_proxy_to(
        &format!("https://localhost:{port}"),
        ProxyConfig {
            upstream: format!(
                "ca_file = \"{}\"\nconnect_timeout_ms = 300\ntimeout_ms = 4000",
                ca_file.display()
            ),
            ..ProxyConfig::default()
        },
    )
    .await;
    let authority = proxy.addr.to_string();
    let check = |status: u16, body: &[u8], what: &str| {
        assert_eq!(status, 502, "{what}: {}", String::from_utf8_lossy(body));
        let json: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(json["__type"], "BadGateway", "{what}");
        let message = json["message"].as_str().unwrap();
        assert!(message.contains("connect_timeout_ms"), "{what}: {message}");
        assert!(message.contains("not sent"), "{what}: {message}");
    };
    let fast = common::ops::call(proxy.addr, "Encrypt", &encrypt_body()).await;
    check(fast.status, &fast.body, "fast path");
    let allowed = tag_body(&[("team:owner", "payments")]);
    let tagged = common::ops::call(proxy.addr, "TagResource", &allowed).await;
    check(tagged.status, &tagged.body, "fast path, tag change");
    let mut h2 = h2_to(proxy.addr).await;
    let over = over_authority(&mut h2, &authority, "Encrypt", &encrypt_body()).await;
    check(
        over.status.as_u16(),
        &over.body,
        "general, signed over :authority",
    );
    let raw = common::ops::signed(proxy.addr, "ListKeys", "{}");
    let general = send_h2(tcp(proxy.addr).await, &raw).await;
    check(
        general.status.as_u16(),
        &general.body,
        "general, signed over host",
    );
    let records = proxy.settled_audit().await;
    let outcome = records
        .iter()
        .find(|r| r["event"] == "outcome")
        .unwrap_or_else(|| panic!("{records:#?}"));
    assert_eq!(outcome["applied"], "no", "{outcome}");
    assert!(held.lock().unwrap().len() >= 3, "the upstream was dialled");
}

/// `proxy_to_tls_fake` for a TLS fake, or a proxy in front of a plain one.
async fn proxy_to_tls_fake_or_plain(fake: &FakeKms, ca_file: &Path) -> TestProxy {
    if fake.url().starts_with("https://") {
        proxy_to_tls_fake(fake, format!("ca_file = \"{}\"", ca_file.display())).await
    } else {
        start_proxy(fake).await
    }
}

/// A plain-HTTP upstream that speaks only HTTP/1.1: every connection gets a 400 and is closed.
/// Returns its URL and how many connections it has had.
async fn http1_only_upstream() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    (url, connections)
}

/// An upstream that will not speak h2 (TLS without ALPN h2, or a plain endpoint that answers
/// HTTP/1.1 to the h2 preface) never gets a request signed over `:authority`, which it could
/// only fail as a bad signature: the client gets a KMS-shaped 400 (not retried) that says which
/// setting to change, and an allowed tag change is recorded as not applied.
#[tokio::test]
async fn an_upstream_without_h2_gets_nothing_and_the_client_is_told_which_setting_to_change() {
    let ca = TestCa::new("upstream test CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "upstream-ca.pem");
    let http1 = tls_fake(&ca, &[b"http/1.1"]).await;
    let no_alpn = tls_fake(&ca, &[]).await;
    let (plain_url, plain_connections) = http1_only_upstream().await;
    let proxies = [
        (
            proxy_to_tls_fake_or_plain(&http1, &ca_file).await,
            "ALPN h2",
            "ALPN http/1.1",
        ),
        (
            proxy_to_tls_fake_or_plain(&no_alpn, &ca_file).await,
            "ALPN h2",
            "no ALPN",
        ),
        (
            start_proxy_to(&plain_url, ProxyConfig::default()).await,
            "prior knowledge",
            "plain HTTP/1.1",
        ),
    ];
    for (proxy, says, what) in &proxies {
        let authority = proxy.addr.to_string();
        let mut h2 = h2_to(proxy.addr).await;
        let allowed = tag_body(&[("team:owner", "payments")]);
        for (operation, body) in [("Encrypt", encrypt_body()), ("TagResource", allowed)] {
            let answer = over_authority(&mut h2, &authority, operation, &body).await;
            assert_eq!(answer.status, 400, "{what} {operation}: {:?}", answer.body);
            assert_eq!(
                answer
                    .headers
                    .get("x-kms-tag-guard")
                    .map(|v| v.to_str().unwrap()),
                Some("upstream-no-h2"),
                "{what} {operation}"
            );
            let body = answer.json();
            assert_eq!(body["__type"], "UnsupportedHttpVersion", "{what}");
            let message = body["message"].as_str().unwrap();
            for needle in [":authority", *says, "NodeHttpHandler", "nothing was sent"] {
                assert!(
                    message.contains(needle),
                    "{what}: {needle:?} not in {message}"
                );
            }
        }
        let records = proxy.wait_for_audit(2).await;
        let outcome = records
            .iter()
            .find(|r| r["event"] == "outcome")
            .unwrap_or_else(|| panic!("{what}: no outcome record in {records:#?}"));
        assert_eq!(outcome["applied"], "no", "{what}: {outcome}");
    }
    assert_eq!(http1.count() + no_alpn.count(), 0, "nothing reached KMS");
    // The plain endpoint was asked for h2 (its connection opened) but never saw a request it
    // could read: it answered the preface with a 400.
    assert!(plain_connections.load(Ordering::SeqCst) >= 1);
}

// ======================================================================== 3. CONNECT

/// An interception CA from `ca init`, as (cert path, key path, PEM).
fn interception_ca(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let (cert, key) = kms_tag_guard::tls::ca_init(&dir.join("ca")).unwrap();
    let pem = std::fs::read(&cert).unwrap();
    (cert, key, pem)
}

fn intercept_section(cert: &Path, key: &Path, tunnel_hosts: &str) -> String {
    format!(
        "ca_cert = \"{}\"\nca_key = \"{}\"\ntunnel_hosts = {tunnel_hosts}",
        cert.display(),
        key.display()
    )
}

/// A proxy in front of `fake` that intercepts KMS names with a CA made in `dir` (and tunnels no
/// other host), `config` giving the rest; and the CA's PEM, for clients.
async fn intercepting_proxy(
    fake: &FakeKms,
    dir: &Path,
    config: ProxyConfig,
) -> (TestProxy, Vec<u8>) {
    let (cert, key, ca_pem) = interception_ca(dir);
    let config = ProxyConfig {
        intercept: intercept_section(&cert, &key, "[]"),
        ..config
    };
    (start_proxy_with(fake, config).await, ca_pem)
}

#[tokio::test]
async fn connect_intercepts_kms_for_the_sdk() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let (proxy, ca_pem) = intercepting_proxy(&fake, dir.path(), ProxyConfig::default()).await;
    let client = kms_client_opts(
        &format!("https://{KMS_HOST}"),
        ClientOptions {
            proxy: Some(proxy.url()),
            ca_pem: Some(ca_pem),
            ..ClientOptions::default()
        },
    );
    let requests = encrypt_tag_and_deny(&client, &fake).await;
    for request in &requests {
        assert_eq!(
            request.header("host"),
            Some(KMS_HOST),
            "KMS sees the name the client signed"
        );
        assert_eq!(request.verified().region, REGION);
    }
    assert_audited_allow_and_deny(&proxy).await;
}

#[tokio::test]
async fn connect_refuses_a_kms_name_without_an_interception_ca() {
    let fake = FakeKms::start().await;
    // A KMS name in tunnel_hosts is a configuration error: KMS traffic is never tunnelled
    // uninspected.
    let refused = kms_tag_guard::Config::parse(
        &format!("[intercept]\ntunnel_hosts = [\"{KMS_HOST}\"]\n"),
        kms_tag_guard::config::ConfigSource::BuiltIn,
    )
    .expect_err("a KMS name in tunnel_hosts must be refused");
    assert!(
        refused.to_string().contains("never tunnelled blind"),
        "{refused}"
    );
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            intercept: "tunnel_hosts = [\"sts.*.amazonaws.com\"]".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let answer = connect(proxy.addr, &format!("{KMS_HOST}:443")).await;
    assert_eq!(answer.status, 403, "{}{}", answer.head, answer.body);
    let body: Value = serde_json::from_str(&answer.body).unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("ca_cert"),
        "{body}"
    );
    assert!(answer
        .head
        .to_ascii_lowercase()
        .contains("x-kms-tag-guard: connect-refused"));

    // The SDK sees a failed connection, and nothing reaches KMS.
    let client = kms_client_opts(
        &format!("https://{KMS_HOST}"),
        ClientOptions {
            proxy: Some(proxy.url()),
            ca_pem: Some(TestCa::new("unused").pem.into_bytes()),
            ..ClientOptions::default()
        },
    );
    let result = client
        .encrypt()
        .key_id(KEY_ID)
        .plaintext(Blob::new("x"))
        .send()
        .await;
    assert!(result.is_err());
    assert_eq!(fake.count(), 0);
}

#[tokio::test]
async fn connect_refuses_other_hosts_without_connecting_anywhere() {
    let _port = PORT_443.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = interception_ca(dir.path());
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            intercept: intercept_section(&cert, &key, "[\"sts.*.amazonaws.com\"]"),
            ..ProxyConfig::default()
        },
    )
    .await;
    let watched = watch_443("127.0.0.1", "connect_refuses_other_hosts").await;
    let extra = Watched::bind("127.0.0.1:0").await.unwrap();
    for target in [
        "localhost:443".to_owned(),
        "127.0.0.1:443".to_owned(),
        format!("127.0.0.1:{}", extra.addr.port()),
        format!("localhost:{}", extra.addr.port()),
        // A KMS name on another port is not intercepted either.
        format!("{KMS_HOST}:{}", extra.addr.port()),
        // An allowed tunnel host on another port.
        "sts.us-east-1.amazonaws.com:8443".to_owned(),
        // Ports that are not exactly "443", though some parsers read them as 443.
        format!("{KMS_HOST}:+443"),
        format!("{KMS_HOST}:0443"),
        format!("{KMS_HOST}:65979"),
        format!("{KMS_HOST}:"),
        KMS_HOST.to_owned(),
        "sts.us-east-1.amazonaws.com:+443".to_owned(),
        "sts.us-east-1.amazonaws.com:65979".to_owned(),
        // A KMS endpoint allowed_hosts does not list (the default lists no ISO partition).
        "kms.us-iso-east-1.c2s.ic.gov:443".to_owned(),
        // What the allowed_hosts glob admits, but is not a KMS endpoint name: no leaf is minted.
        "kms.notaregion.amazonaws.com:443".to_owned(),
        "kms.localhost.amazonaws.com:443".to_owned(),
    ] {
        let answer = connect(proxy.addr, &target).await;
        assert_eq!(answer.status, 403, "CONNECT {target}: {}", answer.head);
        let body: Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(body["__type"], "Forbidden", "CONNECT {target}");
    }
    // Once a sentinel sent after the refusals has reached the fake, a connection the proxy
    // opened for one of them would have been counted.
    let (forwarded, _) = seen_besides_sentinels("refused CONNECTs", &fake, proxy.addr).await;
    if let Some(watched) = &watched {
        assert_eq!(watched.connections(), 0, "a refused CONNECT opens nothing");
    }
    assert_eq!(extra.connections(), 0, "a refused CONNECT opens nothing");
    assert!(forwarded.is_empty(), "{forwarded:#?}");
}

#[tokio::test]
async fn connect_tunnels_listed_hosts_blind() {
    let _port = PORT_443.lock().await;
    let Some(watched) = watch_443("127.0.0.1", "connect_tunnels_listed_hosts_blind").await else {
        return;
    };
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            intercept: "tunnel_hosts = [\"localhost\"]".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let mut tunnel = connect(proxy.addr, "localhost:443").await;
    assert_eq!(tunnel.status, 200, "{}", tunnel.head);
    // The bytes are spliced as they are: the listener echoes them back.
    let payload = b"\x16\x03\x01 not HTTP, not inspected\r\n\r\n";
    tunnel.stream.write_all(payload).await.unwrap();
    let mut echoed = vec![0u8; payload.len()];
    tokio::time::timeout(STEP, tunnel.stream.read_exact(&mut echoed))
        .await
        .expect("echo timed out")
        .unwrap();
    assert_eq!(echoed, payload);
    assert_eq!(watched.connections(), 1);
    assert_eq!(fake.count(), 0, "a blind tunnel is not KMS traffic");
}

#[tokio::test]
async fn a_blind_tunnel_that_cannot_connect_names_the_tunnel_not_kms() {
    let _port = PORT_443.lock().await;
    if std::net::TcpStream::connect("127.0.0.1:443").is_ok() {
        eprintln!("SKIPPED a_blind_tunnel_that_cannot_connect_names_the_tunnel_not_kms: something listens on 127.0.0.1:443");
        return;
    }
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            intercept: "tunnel_hosts = [\"localhost\"]".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let answer = connect(proxy.addr, "localhost:443").await;
    assert_eq!(answer.status, 502, "{}{}", answer.head, answer.body);
    assert!(answer
        .head
        .to_ascii_lowercase()
        .contains("x-kms-tag-guard: tunnel-error"));
    let message = serde_json::from_str::<Value>(&answer.body).unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("could not open the tunnel") && !message.contains("KMS"),
        "{message}"
    );
    assert_eq!(fake.count(), 0);
}

/// The issue's configuration: a region in allowed_hosts, a tunnel glob over another region's
/// names. `check` refuses it, and a CONNECT to that region's KMS name is refused without any
/// outbound connection, whatever the tunnel list says.
#[tokio::test]
async fn a_kms_name_outside_allowed_hosts_is_refused_not_tunnelled() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "[upstream]\nallowed_hosts = [\"kms.us-east-1.amazonaws.com\"]\n\
         [intercept]\ntunnel_hosts = [\"*.us-west-2.amazonaws.com\"]\n",
    )
    .unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_kms-tag-guard"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("intercept.tunnel_hosts[0]")
            && stderr.contains("kms.us-west-2.amazonaws.com"),
        "{stderr}"
    );

    let _port = PORT_443.lock().await;
    let (cert, key, _) = interception_ca(dir.path());
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            upstream: "allowed_hosts = [\"kms.us-east-1.amazonaws.com\"]".into(),
            intercept: intercept_section(&cert, &key, "[\"sts.us-west-2.amazonaws.com\"]"),
            ..ProxyConfig::default()
        },
    )
    .await;
    let watched = watch_443("127.0.0.1", "a_kms_name_outside_allowed_hosts").await;
    for target in [
        "kms.us-west-2.amazonaws.com:443",
        "kms-fips.us-west-2.amazonaws.com:443",
        "kms.us-west-2.api.aws:443",
        "vpce-0a1b2c3d.kms.us-west-2.vpce.amazonaws.com:443",
    ] {
        let answer = connect(proxy.addr, target).await;
        assert_eq!(answer.status, 403, "CONNECT {target}: {}", answer.head);
        assert!(
            answer.body.contains("never tunnelled blind"),
            "CONNECT {target}: {}",
            answer.body
        );
    }
    if let Some(watched) = &watched {
        assert_eq!(watched.connections(), 0, "a refused CONNECT opens nothing");
    }
    assert_eq!(fake.count(), 0);
}

/// Echoes `payload` through a blind tunnel and reads it back.
async fn echo(stream: &mut TcpStream, payload: &[u8]) -> io::Result<()> {
    stream.write_all(payload).await?;
    let mut echoed = vec![0u8; payload.len()];
    tokio::time::timeout(STEP, stream.read_exact(&mut echoed))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "echo timed out"))??;
    assert_eq!(echoed, payload);
    Ok(())
}

/// Whether the peer closes `stream` within `within`.
async fn closes_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// A blind tunnel lives while bytes move, and is closed after `tunnel_idle_timeout_ms` of
/// silence either way.
#[tokio::test]
async fn a_quiet_blind_tunnel_is_closed_after_its_idle_timeout() {
    let _port = PORT_443.lock().await;
    let Some(_watched) = watch_443("127.0.0.1", "a_quiet_blind_tunnel_is_closed").await else {
        return;
    };
    let fake = FakeKms::start().await;
    let idle = Duration::from_millis(800);
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            intercept: format!(
                "tunnel_hosts = [\"localhost\"]\ntunnel_idle_timeout_ms = {}",
                idle.as_millis()
            ),
            ..ProxyConfig::default()
        },
    )
    .await;
    let mut tunnel = connect(proxy.addr, "localhost:443").await;
    assert_eq!(tunnel.status, 200, "{}", tunnel.head);
    // Three idle timeouts' worth of traffic, a byte every third of one.
    let started = Instant::now();
    while started.elapsed() < idle * 3 {
        echo(&mut tunnel.stream, b"ping")
            .await
            .expect("an active tunnel stays open");
        // Deliberate pacing, the test's subject: traffic every third of the idle timeout.
        tokio::time::sleep(idle / 3).await;
    }
    assert!(
        closes_within(&mut tunnel.stream, idle + Duration::from_secs(3)).await,
        "a blind tunnel quiet for longer than tunnel_idle_timeout_ms is still open"
    );
}

/// The real binary: at SIGTERM a blind tunnel is drained like a request in flight. It is kept
/// while bytes move and closed after a quiet second, before the grace period ends.
#[tokio::test]
async fn sigterm_drains_a_blind_tunnel() {
    let _port = PORT_443.lock().await;
    let Some(_watched) = watch_443("127.0.0.1", "sigterm_drains_a_blind_tunnel").await else {
        return;
    };
    let fake = FakeKms::start().await;
    let mut opts = ChildOptions::new(&fake.url());
    opts.config.intercept = "tunnel_hosts = [\"localhost\"]".into();
    opts.config.shutdown = "grace_ms = 10000".into();
    let mut serve = start_child(opts).await;
    let mut tunnel = connect(serve.addr, "localhost:443").await;
    assert_eq!(tunnel.status, 200, "{}", tunnel.head);
    echo(&mut tunnel.stream, b"before").await.unwrap();

    serve.signal("TERM");
    let deadline = Instant::now() + STEP;
    while !serve
        .stderr()
        .contains("listener closed; waiting for in-flight requests")
    {
        assert!(Instant::now() < deadline, "no drain:\n{}", serve.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..4 {
        echo(&mut tunnel.stream, format!("draining {i}").as_bytes())
            .await
            .unwrap_or_else(|e| {
                panic!("the tunnel was cut while draining: {e}\n{}", serve.stderr())
            });
        // Deliberate pacing: bytes keep moving through the drain, which the test is about.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let exited = serve.wait_exit(Duration::from_secs(8)).await;
    let (status, _) = exited.unwrap_or_else(|| panic!("no exit:\n{}", serve.stderr()));
    assert!(status.success(), "{status}\n{}", serve.stderr());
    assert!(
        !serve.stderr().contains("grace period over"),
        "the quiet tunnel was closed before the grace period ended:\n{}",
        serve.stderr()
    );
    assert!(closes_within(&mut tunnel.stream, STEP).await);
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>;

/// An HTTP/2 connection to the proxy at `addr`, driven by a task of its own.
async fn h2_connection(addr: SocketAddr) -> (H2Sender, tokio::task::JoinHandle<hyper::Result<()>>) {
    let (h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp(addr).await))
            .await
            .expect("h2 handshake");
    (h2, tokio::spawn(connection))
}

/// A CONNECT to `KMS_HOST:443` over `h2`, answered 200: the tunnel.
async fn h2_connect(h2: &mut H2Sender) -> hyper::upgrade::Upgraded {
    let connect = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("{KMS_HOST}:443"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = h2.send_request(connect).await.expect("CONNECT over h2");
    assert_eq!(response.status(), 200);
    hyper::upgrade::on(response).await.expect("h2 tunnel")
}

/// An HTTP/2 CONNECT tunnel is one stream of its connection: the connection stays while the
/// tunnel carries requests, however long, and the tunnel's own set-up has its own deadline.
#[tokio::test]
async fn an_http2_connect_tunnel_lives_while_its_requests_flow() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let idle = Duration::from_millis(1000);
    let (proxy, ca_pem) = intercepting_proxy(
        &fake,
        dir.path(),
        ProxyConfig {
            limits: format!("header_read_timeout_ms = {}", idle.as_millis()),
            ..ProxyConfig::default()
        },
    )
    .await;
    let (mut h2, connection) = h2_connection(proxy.addr).await;
    let tunnel = h2_connect(&mut h2).await;
    let tls = tls_connect(
        TokioIo::new(tunnel),
        KMS_HOST,
        client_config(&ca_pem, &[b"http/1.1"]),
    )
    .await
    .expect("handshake inside the h2 tunnel");
    let (mut sender, inner) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 inside the tunnel");
    tokio::spawn(inner);
    // Four idle timeouts of requests, one every third of an idle timeout.
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < idle * 4 {
        let raw =
            RawRequest::signed_kms(KMS_HOST, "TrentService.Encrypt", encrypt_body().as_bytes());
        let response = tokio::time::timeout(STEP, sender.send_request(to_http(&raw, "/", true)))
            .await
            .expect("a request in the tunnel timed out")
            .unwrap_or_else(|e| panic!("request {sent} after {:?}: {e}", started.elapsed()));
        assert_eq!(read_answer(response).await.status, 200);
        sent += 1;
        // Deliberate pacing, the test's subject: a request every third of the idle timeout.
        tokio::time::sleep(idle / 3).await;
    }
    assert_eq!(fake.count(), sent);
    assert!(
        !connection.is_finished(),
        "the h2 connection was closed under its tunnel"
    );
}

/// Over HTTP/1.1, the set-up deadline set at accept runs on through the CONNECT head and the
/// handshake inside the tunnel: each stage within the timeout, together beyond it, fails.
#[tokio::test]
async fn the_set_up_deadline_runs_through_connect_and_the_handshake_inside() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let timeout = Duration::from_millis(1500);
    let (proxy, ca_pem) = intercepting_proxy(
        &fake,
        dir.path(),
        ProxyConfig {
            limits: format!("header_read_timeout_ms = {}", timeout.as_millis()),
            ..ProxyConfig::default()
        },
    )
    .await;
    let mut stream = tcp(proxy.addr).await;
    // Deliberate, the test's subject: each stage takes 60% of the set-up deadline.
    tokio::time::sleep(timeout.mul_f64(0.6)).await;
    let request = format!("CONNECT {KMS_HOST}:443 HTTP/1.1\r\nHost: {KMS_HOST}:443\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1);
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // Deliberate: the second stage's 60%.
    tokio::time::sleep(timeout.mul_f64(0.6)).await;
    let inside = tls_connect(stream, KMS_HOST, client_config(&ca_pem, &[])).await;
    let served = match inside {
        Err(_) => false,
        Ok(tls) => {
            let raw =
                RawRequest::signed_kms(KMS_HOST, "TrentService.Encrypt", encrypt_body().as_bytes());
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .expect("HTTP/1.1 handshake");
            tokio::spawn(connection);
            matches!(
                tokio::time::timeout(STEP, sender.send_request(to_http(&raw, "/", true))).await,
                Ok(Ok(_))
            )
        }
    };
    assert!(
        !served,
        "a set-up longer than header_read_timeout_ms was served"
    );
    assert_eq!(fake.count(), 0);
}

/// Writes `bytes` (a CONNECT head, after whatever precedes it) and reads the answer's head.
async fn connect_head(stream: &mut TcpStream, bytes: &[u8]) -> String {
    stream.write_all(bytes).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "closed before the answer"
        );
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The handshake inside an intercepted tunnel has a deadline whatever came before the CONNECT:
/// a request first (the connection's set-up deadline is over by then), or empty lines before the
/// request line (which HTTP/1.1 parsers skip, so the scan for the first head must skip them
/// too). A client that then says nothing is closed; before, it held the connection for ever,
/// and the connection budget could not close it.
#[tokio::test]
async fn a_tunnel_handshake_has_a_deadline_whatever_came_before_the_connect() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let timeout = Duration::from_millis(1000);
    let (proxy, _) = intercepting_proxy(
        &fake,
        dir.path(),
        ProxyConfig {
            limits: format!("header_read_timeout_ms = {}", timeout.as_millis()),
            ..ProxyConfig::default()
        },
    )
    .await;
    let connect = format!("CONNECT {KMS_HOST}:443 HTTP/1.1\r\nHost: {KMS_HOST}:443\r\n\r\n");

    let mut after_request = RawConn::connect(proxy.addr).await.unwrap();
    let encrypt = RawRequest::signed_kms(
        &fake.host(),
        "TrentService.Encrypt",
        encrypt_body().as_bytes(),
    );
    after_request.write(&encrypt.to_bytes()).await.unwrap();
    assert_eq!(after_request.read_response().await.unwrap().status, 200);
    // Past the set-up deadline of the connection, which the request ended.
    tokio::time::sleep(timeout).await;
    let mut after_request = after_request.stream;
    let head = connect_head(&mut after_request, connect.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let started = Instant::now();
    assert!(
        closes_within(&mut after_request, timeout + STEP).await,
        "a tunnel whose client never starts its handshake is held open"
    );
    assert!(
        started.elapsed() >= timeout.mul_f64(0.9),
        "{:?}",
        started.elapsed()
    );

    let mut behind_empty_lines = tcp(proxy.addr).await;
    let head = connect_head(
        &mut behind_empty_lines,
        format!("\r\n\r\n{connect}").as_bytes(),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        closes_within(&mut behind_empty_lines, timeout + STEP).await,
        "a tunnel opened behind empty lines is held open"
    );
    assert_eq!(fake.count(), 1);
}

/// Each CONNECT stream of an HTTP/2 connection takes a place of its own in the connection
/// budget (a blind tunnel opens a connection of its own): one HTTP/2 connection cannot hold more
/// tunnels than `max_connections` allows; at the limit the quiet ones make room.
#[tokio::test]
async fn http2_connect_tunnels_take_places_in_the_connection_budget() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let max = 4;
    let (proxy, _) = intercepting_proxy(
        &fake,
        dir.path(),
        ProxyConfig {
            admin: true,
            limits: format!("max_connections = {max}\nheader_read_timeout_ms = 30000"),
            ..ProxyConfig::default()
        },
    )
    .await;
    let (mut h2, _connection) = h2_connection(proxy.addr).await;
    let opened = 8;
    let mut tunnels = Vec::new();
    for _ in 0..opened {
        tunnels.push(h2_connect(&mut h2).await);
    }
    let m = common::ops::scrape(proxy.admin_addr.unwrap()).await;
    let open = m.get("kms_tag_guard_connections_open", &[]);
    assert_eq!(open, Some(max as f64), "{}", m.text);
    // The outer connection and the newest tunnels hold the places; the oldest tunnels (quiet,
    // in their set-up) were closed to make room.
    assert_eq!(
        m.count(
            "kms_tag_guard_connection_limit_total",
            &[("action", "evicted")]
        ),
        (opened - (max - 1)) as f64,
        "{}",
        m.text
    );
    let mut first = TokioIo::new(tunnels.remove(0));
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(STEP, first.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the oldest tunnel is still open: {read:?}"
    );
}

#[tokio::test]
async fn connect_into_its_own_listener_is_refused_as_a_loop() {
    let _port = PORT_443.lock().await;
    let fake = FakeKms::start().await;
    let config = ProxyConfig {
        listener_address: Some("127.0.0.1:443".into()),
        intercept: "tunnel_hosts = [\"localhost\"]".into(),
        ..ProxyConfig::default()
    };
    let proxy = match try_start_proxy_to(&fake.url(), config).await {
        Ok(proxy) => proxy.proxy,
        Err(e) => {
            eprintln!("SKIPPED connect_into_its_own_listener_is_refused_as_a_loop: {e}");
            return;
        }
    };
    let started = Instant::now();
    let answer = connect(proxy.local_addr(), "localhost:443").await;
    assert_eq!(answer.status, 502, "{}{}", answer.head, answer.body);
    assert!(answer.body.contains("loop"), "{}", answer.body);
    assert!(started.elapsed() < Duration::from_secs(2));
    proxy.shutdown();
    tokio::time::timeout(STEP, proxy.wait()).await.unwrap();
}

#[tokio::test]
async fn connect_intercepts_and_originates_tls_to_the_host_without_an_endpoint() {
    // No endpoint: requests go to https://<Host>:443, as to real KMS. `localhost` plays the KMS
    // name, so the fake has to listen on 127.0.0.1:443.
    let _port = PORT_443.lock().await;
    let upstream_ca = TestCa::new("upstream test CA");
    let leaf = upstream_ca.leaf(&["localhost"], 50);
    let fake = match FakeKms::try_start_tls_on(
        "127.0.0.1:443".parse().unwrap(),
        vec![leaf.cert_der.clone()],
        leaf.key(),
        vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    )
    .await
    {
        Ok(fake) => fake,
        Err(e) => {
            eprintln!("SKIPPED connect_intercepts_and_originates_tls_to_the_host_without_an_endpoint: cannot listen on 127.0.0.1:443 ({e})");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let ca_file = upstream_ca.write(dir.path(), "upstream-ca.pem");
    // An unconstrained interception CA: `ca init`'s name constraints would (rightly) make
    // clients reject a leaf for `localhost`.
    let intercept_ca = TestCa::new("interception test CA");
    let (cert, key) = intercept_ca.write_pair(dir.path(), "intercept");
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            without_endpoint: true,
            upstream: format!(
                "allowed_hosts = [\"localhost\"]\nca_file = \"{}\"",
                ca_file.display()
            ),
            intercept: intercept_section(&cert, &key, "[]"),
            ..ProxyConfig::default()
        },
    )
    .await;

    // Mode C: HTTPS_PROXY + CONNECT, intercepted, TLS originated again to localhost:443.
    let client = kms_client_opts(
        "https://localhost",
        ClientOptions {
            proxy: Some(proxy.url()),
            ca_pem: Some(intercept_ca.pem.clone().into_bytes()),
            ..ClientOptions::default()
        },
    );
    let requests = encrypt_tag_and_deny(&client, &fake).await;
    for request in &requests {
        assert_eq!(request.header("host"), Some("localhost"));
        // The fake offers h2, but the SDK signed `host`: HTTP/1.1 carries it as signed.
        assert_eq!(request.version, Version::HTTP_11, "signed over host");
    }
    assert_audited_allow_and_deny(&proxy).await;

    // Mode A: plain HTTP to the listener with the real name as Host, TLS to <Host>:443.
    fake.clear();
    let raw = RawRequest::signed_kms(
        "localhost",
        "TrentService.Encrypt",
        encrypt_body().as_bytes(),
    );
    let answer = raw::send(proxy.addr, &raw.to_bytes()).await;
    assert_eq!(answer.status, 200, "{}", answer.body_str());
    let recorded = fake.last().expect("forwarded to localhost:443");
    recorded.verified();
    assert_eq!(recorded.header("host"), Some("localhost"));
}

/// A client CONNECTing to ever new KMS names: the leaf cache stays at `leaf_cache_size`, the
/// least recently used leaf goes first, and a name that is not a KMS endpoint name gets no leaf.
#[tokio::test]
async fn the_leaf_cache_is_bounded_whatever_names_a_client_connects_to() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca_pem) = interception_ca(dir.path());
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            admin: true,
            intercept: format!(
                "{}\nleaf_cache_size = 4",
                intercept_section(&cert, &key, "[]")
            ),
            ..ProxyConfig::default()
        },
    )
    .await;
    let admin = proxy.admin_addr.unwrap();
    let handshake = |host: String| {
        let ca_pem = ca_pem.clone();
        async move {
            let tunnel = connect(proxy.addr, &format!("{host}:443")).await;
            assert_eq!(tunnel.status, 200, "CONNECT {host}: {}", tunnel.head);
            let stream = tls_connect(tunnel.stream, &host, client_config(&ca_pem, &[]))
                .await
                .unwrap_or_else(|e| panic!("handshake for {host}: {e}"));
            stream.get_ref().1.peer_certificates().unwrap()[0].clone()
        }
    };
    // Twelve regions the CA from `ca init` covers, three times the cache's size.
    let names: Vec<String> = [
        "us-east-1",
        "us-east-2",
        "us-west-1",
        "us-west-2",
        "eu-west-1",
        "eu-west-2",
        "eu-west-3",
        "eu-central-1",
        "eu-north-1",
        "ap-south-1",
        "ap-northeast-1",
        "sa-east-1",
    ]
    .iter()
    .map(|r| format!("kms.{r}.amazonaws.com"))
    .collect();
    let first = handshake(names[0].clone()).await;
    for name in &names[1..] {
        handshake(name.clone()).await;
        let scraped = common::ops::scrape(admin).await;
        let entries = scraped.count("kms_tag_guard_leaf_cache_entries", &[]);
        assert!(entries <= 4.0, "{entries} leaves cached after {name}");
    }
    let scraped = common::ops::scrape(admin).await;
    assert_eq!(scraped.count("kms_tag_guard_leaf_cache_entries", &[]), 4.0);
    assert_eq!(
        scraped.count("kms_tag_guard_leaves_minted_total", &[]),
        12.0
    );

    // The most recent name is served from the cache; the first was dropped and is minted again.
    let last = names.last().unwrap().clone();
    handshake(last).await;
    let again = handshake(names[0].clone()).await;
    assert_ne!(first, again, "an evicted leaf is minted anew");
    let scraped = common::ops::scrape(admin).await;
    assert_eq!(
        scraped.count("kms_tag_guard_leaves_minted_total", &[]),
        13.0
    );

    // Names the allowed_hosts glob admits but that are no KMS endpoint name: refused, no mint.
    for host in [
        "kms.attacker-label.amazonaws.com",
        "kms.a.amazonaws.com",
        "kms.123.amazonaws.com",
    ] {
        let answer = connect(proxy.addr, &format!("{host}:443")).await;
        assert_eq!(answer.status, 403, "CONNECT {host}: {}", answer.head);
    }
    let scraped = common::ops::scrape(admin).await;
    assert_eq!(
        scraped.count("kms_tag_guard_leaves_minted_total", &[]),
        13.0
    );
    assert_eq!(fake.count(), 0);
}

#[tokio::test]
async fn connect_tunnel_refuses_an_sni_other_than_the_connect_host() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let (proxy, ca_pem) = intercepting_proxy(&fake, dir.path(), ProxyConfig::default()).await;

    // The control: the CONNECT host as SNI gets a leaf for that name, chained to the CA.
    let tunnel = connect(proxy.addr, &format!("{KMS_HOST}:443")).await;
    assert_eq!(tunnel.status, 200, "{}", tunnel.head);
    let stream = tls_connect(tunnel.stream, KMS_HOST, client_config(&ca_pem, &[b"h2"]))
        .await
        .expect("SNI = CONNECT host is served");
    let chain = stream.get_ref().1.peer_certificates().unwrap().to_vec();
    assert_eq!(chain.len(), 2, "leaf and CA");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // Another KMS name as SNI: no certificate, the handshake fails.
    let tunnel = connect(proxy.addr, &format!("{KMS_HOST}:443")).await;
    assert_eq!(tunnel.status, 200, "{}", tunnel.head);
    let refused = tls_connect(
        tunnel.stream,
        "kms.eu-west-1.amazonaws.com",
        client_config(&ca_pem, &[]),
    )
    .await;
    let error = refused.expect_err("an SNI other than the CONNECT host must fail");
    eprintln!("SNI mismatch: {error}");

    // No SNI at all (a client connecting by IP address): refused as well.
    let tunnel = connect(proxy.addr, &format!("{KMS_HOST}:443")).await;
    assert_eq!(tunnel.status, 200);
    let name = ServerName::IpAddress("203.0.113.7".parse::<std::net::IpAddr>().unwrap().into());
    let no_sni = tokio::time::timeout(
        STEP,
        TlsConnector::from(client_config(&ca_pem, &[])).connect(name, tunnel.stream),
    )
    .await
    .expect("handshake timed out");
    assert!(no_sni.is_err(), "a handshake without SNI must fail");
    assert_eq!(fake.count(), 0);
}

#[tokio::test]
async fn connect_tunnel_pins_requests_to_the_connect_host() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let (proxy, ca_pem) = intercepting_proxy(&fake, dir.path(), ProxyConfig::default()).await;
    let other = "kms.eu-west-1.amazonaws.com";
    let tag = tag_body(&[("team:owner", "payments")]);
    let cases = [
        ("TrentService.TagResource", tag.clone()),
        ("TrentService.Encrypt", encrypt_body()),
    ];
    for (target, body) in &cases {
        let host = other;
        for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
            let tunnel = connect(proxy.addr, &format!("{KMS_HOST}:443")).await;
            assert_eq!(tunnel.status, 200);
            let stream = tls_connect(tunnel.stream, KMS_HOST, client_config(&ca_pem, &[alpn]))
                .await
                .unwrap();
            let raw = RawRequest::signed_kms(host, target, body.as_bytes());
            let answer = if alpn == b"h2" {
                send_h2(stream, &raw).await
            } else {
                send_h1(stream, &raw).await
            };
            assert_eq!(
                answer.status,
                421,
                "{target} for {host} inside a tunnel to {KMS_HOST} ({}): {:?}",
                String::from_utf8_lossy(alpn),
                answer.body
            );
            assert_eq!(answer.json()["__type"], "MisdirectedRequest");
            assert_eq!(
                answer.header("x-amzn-errortype"),
                Some("MisdirectedRequest")
            );
            assert_eq!(answer.header("x-kms-tag-guard"), Some("host-not-allowed"));
            let message = answer.json()["message"].as_str().unwrap().to_owned();
            assert!(
                message.contains("tunnel")
                    && message.contains(KMS_HOST)
                    && !message.contains("allowed_hosts"),
                "the refusal names the tunnel, not allowed_hosts: {message}"
            );
        }
    }
    assert_eq!(fake.count(), 0, "misdirected requests reach nobody");

    // The same tunnel with the right Host works, and the signature survives (h2: the proxy
    // turns the signed :authority into Host).
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let tunnel = connect(proxy.addr, &format!("{KMS_HOST}:443")).await;
        let stream = tls_connect(tunnel.stream, KMS_HOST, client_config(&ca_pem, &[alpn]))
            .await
            .unwrap();
        let raw = RawRequest::signed_kms(KMS_HOST, "TrentService.TagResource", tag.as_bytes());
        let answer = if alpn == b"h2" {
            send_h2(stream, &raw).await
        } else {
            send_h1(stream, &raw).await
        };
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        let recorded = fake.last().unwrap();
        recorded.verified();
        assert_eq!(recorded.header("host"), Some(KMS_HOST));
        assert_eq!(recorded.body, Bytes::from(tag.clone()));
    }
    assert_eq!(fake.count(), 2);
}

// ======================================================================== 4. loop guard

#[tokio::test]
async fn an_endpoint_that_is_the_proxy_itself_is_a_quick_502() {
    // The port was free a moment ago; try another if someone takes it in between.
    let mut attempt = 0;
    let proxy = loop {
        attempt += 1;
        let port = free_port();
        let config = ProxyConfig {
            listener_address: Some(format!("127.0.0.1:{port}")),
            upstream: "timeout_ms = 10000".into(),
            ..ProxyConfig::default()
        };
        match try_start_proxy_to(&format!("http://127.0.0.1:{port}"), config).await {
            Ok(proxy) => break proxy,
            Err(e @ kms_tag_guard::StartError::Bind { .. }) if attempt < 3 => {
                eprintln!("retrying with another port: {e}")
            }
            Err(e) => panic!("cannot start the proxy: {e}"),
        }
    };
    let addr = proxy.addr;
    for (operation, body) in [
        ("Encrypt", encrypt_body()),
        ("TagResource", tag_body(&[("team:owner", "payments")])),
    ] {
        let started = Instant::now();
        let answer = common::ops::call(addr, operation, &body).await;
        let took = started.elapsed();
        assert_eq!(answer.status, 502, "{operation}: {}", answer.body_str());
        let json = answer.json();
        assert_eq!(json["__type"], "BadGateway");
        let message = json["message"].as_str().unwrap();
        assert!(message.contains("forwarding loop"), "{message}");
        assert!(
            took < Duration::from_secs(2),
            "{operation}: the loop is refused at once, not after the timeout ({took:?})"
        );
    }
    // The allowed TagResource was recorded as allowed, then as failed upstream.
    let outcome = proxy
        .wait_for_audit(2)
        .await
        .into_iter()
        .find(|r| r["event"] == "outcome")
        .expect("no outcome record");
    assert_eq!(outcome["aws_error"], "BadGateway", "{outcome}");
    proxy.proxy.shutdown();
    tokio::time::timeout(STEP, proxy.proxy.wait())
        .await
        .unwrap();
}

// ======================================================================== 5. ca init

/// A server presenting `leaf` to a rustls client trusting `roots_pem`, over an in-memory pipe;
/// the client's handshake result.
async fn client_accepts(leaf: Arc<CertifiedKey>, roots_pem: &[u8], sni: &str) -> io::Result<()> {
    #[derive(Debug)]
    struct Fixed(Arc<CertifiedKey>);
    impl ResolvesServerCert for Fixed {
        fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(Arc::clone(&self.0))
        }
    }
    let server_config = kms_tag_guard::tls::server_config(Arc::new(Fixed(leaf))).unwrap();
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let _ = tokio::time::timeout(
            STEP,
            TlsAcceptor::from(Arc::new(server_config)).accept(server_io),
        )
        .await;
    });
    let result = tls_connect(client_io, sni, client_config(roots_pem, &[])).await;
    server.abort();
    result.map(|_| ())
}

fn certified(leaf: &Leaf, chain_extra: Option<&[u8]>) -> Arc<CertifiedKey> {
    let mut chain = vec![leaf.cert_der.clone()];
    if let Some(pem) = chain_extra {
        chain.extend(CertificateDer::pem_slice_iter(pem).map(Result::unwrap));
    }
    Arc::new(CertifiedKey::from_der(chain, leaf.key(), &provider()).unwrap())
}

#[tokio::test]
async fn ca_init_writes_a_name_constrained_ca() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("new-ca");
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kms-tag-guard"))
            .args(["ca", "init", "--out"])
            .arg(&out)
            .output()
            .expect("run kms-tag-guard")
    };
    let first = run();
    assert!(
        first.status.success(),
        "ca init: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    let cert_path = out.join("ca.pem");
    let key_path = out.join("ca.key");
    let ca_pem = std::fs::read(&cert_path).expect("ca.pem written");
    let key_pem = std::fs::read_to_string(&key_path).expect("ca.key written");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_path).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "ca.key must be private");

    let second = run();
    assert!(!second.status.success(), "ca init must refuse to overwrite");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already exists"), "{stderr}");
    assert_eq!(
        std::fs::read(&cert_path).unwrap(),
        ca_pem,
        "ca.pem unchanged"
    );
    assert_eq!(
        std::fs::read_to_string(&key_path).unwrap(),
        key_pem,
        "ca.key unchanged"
    );

    // The proxy's own minter: a leaf for a KMS name is accepted by a client trusting the CA.
    let minter = kms_tag_guard::tls::LeafMinter::load(
        &kms_tag_guard::config::TlsFiles {
            cert: cert_path.clone(),
            key: key_path.clone(),
        },
        false,
    )
    .unwrap();
    for host in [
        KMS_HOST,
        "kms-fips.eu-west-1.amazonaws.com",
        "kms.us-west-2.api.aws",
    ] {
        client_accepts(minter.leaf_for(host).unwrap(), &ca_pem, host)
            .await
            .unwrap_or_else(|e| panic!("a minted leaf for {host} must be accepted: {e}"));
    }

    // Leaves signed with ca.key by hand: the name constraints decide.
    let issuer = Issuer::from_ca_cert_pem(
        &String::from_utf8(ca_pem.clone()).unwrap(),
        KeyPair::from_pem(&key_pem).unwrap(),
    )
    .unwrap();
    let kms = mint_leaf(&issuer, &[KMS_HOST], 40);
    client_accepts(certified(&kms, None), &ca_pem, KMS_HOST)
        .await
        .expect("a hand-made leaf for a KMS name is accepted");
    for (names, sni) in [
        (&["evil.example.com"][..], "evil.example.com"),
        (
            &["sts.us-east-1.amazonaws.com"][..],
            "sts.us-east-1.amazonaws.com",
        ),
        // A KMS name cannot carry a foreign name along.
        (&[KMS_HOST, "evil.example.com"][..], KMS_HOST),
    ] {
        let leaf = mint_leaf(&issuer, names, 41);
        let error = client_accepts(certified(&leaf, None), &ca_pem, sni)
            .await
            .expect_err("the name constraints must reject this leaf");
        eprintln!("{names:?}: {error}");
        assert!(
            format!("{error:?}").contains("NameConstraint"),
            "{names:?} should fail on the name constraints: {error:?}"
        );
    }

    // Leaves for IP addresses: a client connecting to an address (no SNI, the IP SAN decides)
    // must refuse them, for IPv4 and IPv6 alike; and an e-mail name rides along with nothing.
    for ip in [
        "169.254.169.254",
        "10.0.0.1",
        "fd00:ec2::254",
        "::ffff:169.254.169.254",
    ] {
        let leaf = mint_leaf(&issuer, &[ip], 43);
        let error = client_accepts(certified(&leaf, None), &ca_pem, ip)
            .await
            .expect_err("the name constraints must exclude every IP address");
        assert!(
            format!("{error:?}").contains("NameConstraint"),
            "{ip} should fail on the name constraints: {error:?}"
        );
    }
    let with_email = {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![KMS_HOST.to_owned()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::Rfc822Name(
            "ops@example.com".try_into().unwrap(),
        ));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    };
    let error = client_accepts(certified(&with_email, None), &ca_pem, KMS_HOST)
        .await
        .expect_err("an e-mail name is not permitted");
    assert!(format!("{error:?}").contains("NameConstraint"), "{error:?}");

    // The control for the IP exclusion: a CA constrained to the same DNS names but without the
    // excluded IP ranges (what `ca init` made before) vouches for the metadata address.
    let dns_only = {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "DNS-only constrained CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: kms_tag_guard::tls::kms_host_names()
                .into_iter()
                .map(rcgen::GeneralSubtree::DnsName)
                .collect(),
            excluded_subtrees: Vec::new(),
        });
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(params, key))
    };
    let metadata = mint_leaf(&dns_only.1, &["169.254.169.254"], 44);
    client_accepts(
        certified(&metadata, None),
        dns_only.0.as_bytes(),
        "169.254.169.254",
    )
    .await
    .expect("without excluded IP subtrees a DNS-constrained CA vouches for an IP address");

    // The control: without name constraints, the same hand-made leaf would be accepted.
    let open = TestCa::new("unconstrained CA");
    let evil = open.leaf(&["evil.example.com"], 42);
    client_accepts(
        certified(&evil, None),
        open.pem.as_bytes(),
        "evil.example.com",
    )
    .await
    .expect("an unconstrained CA's leaf is accepted: the rejection above is the constraint");
}

/// `serve` checks the interception CA before it binds a port: the key private to its owner
/// (group read only with `ca_key_group_readable`), the certificate a CA, the key its key.
#[tokio::test]
async fn serve_refuses_a_ca_key_open_to_others_or_not_matching_the_certificate() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = interception_ca(dir.path());
    let (_, other_key, _) = interception_ca(&dir.path().join("other"));
    let not_ca = TestCa::new("not used").leaf(&[KMS_HOST], 7);
    let leaf_cert = dir.path().join("leaf.pem");
    let leaf_key = dir.path().join("leaf.key");
    std::fs::write(&leaf_cert, &not_ca.cert_pem).unwrap();
    std::fs::write(&leaf_key, &not_ca.key_pem).unwrap();
    std::fs::set_permissions(&leaf_key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A refused CA exits at once; an accepted one logs that it listens.
    let serve = |cert: &Path, key: &Path, extra: &str| {
        let mut opts = ChildOptions::new("http://127.0.0.1:9");
        opts.config.intercept = format!(
            "ca_cert = \"{}\"\nca_key = \"{}\"\n{extra}",
            cert.display(),
            key.display()
        );
        match try_spawn_proxy(&opts) {
            Ok(proxy) => (true, None, proxy.stderr()),
            Err((status, stderr)) => (false, Some(status), stderr),
        }
    };
    let chmod =
        |mode| std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();

    for (mode, extra, refused_with) in [
        (0o644, "", Some("may be read by other users (mode 644)")),
        (0o606, "", Some("may be written by other users")),
        (
            0o620,
            "ca_key_group_readable = true",
            Some("may be written"),
        ),
        (0o640, "", Some("ca_key_group_readable = true")),
        (0o640, "ca_key_group_readable = true", None),
        (0o600, "", None),
    ] {
        chmod(mode);
        let (listening, status, stderr) = serve(&cert, &key, extra);
        match refused_with {
            Some(message) => {
                assert!(
                    !listening && status.is_some_and(|s| !s.success()),
                    "mode {mode:o} {extra}: {stderr}"
                );
                assert!(stderr.contains(message), "mode {mode:o} {extra}: {stderr}");
            }
            None => assert!(listening, "mode {mode:o} {extra}: {stderr}"),
        }
    }
    let (listening, _, stderr) = serve(&cert, &other_key, "");
    assert!(
        !listening && stderr.contains("is not the private key of the certificate"),
        "{stderr}"
    );
    let (listening, _, stderr) = serve(&leaf_cert, &leaf_key, "");
    assert!(
        !listening && stderr.contains("is not a CA certificate"),
        "{stderr}"
    );
}

// ======================================================================== 6. resolver = "dns"

/// A proxy with `resolver = "dns"`, no endpoint, and these allowed hosts.
async fn dns_proxy(fake: &FakeKms, allowed: &str, resolver: &str) -> TestProxy {
    start_proxy_with(
        fake,
        ProxyConfig {
            without_endpoint: true,
            upstream: format!(
                "resolver = \"{resolver}\"\nallowed_hosts = {allowed}\nconnect_timeout_ms = 2000\ntimeout_ms = 4000"
            ),
            ..ProxyConfig::default()
        },
    )
    .await
}

#[tokio::test]
async fn dns_resolver_starts_and_a_failed_lookup_is_a_quick_502() {
    let fake = FakeKms::start().await;
    // The default allowed_hosts, no endpoint: starts.
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            without_endpoint: true,
            upstream: "resolver = \"dns\"".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    proxy.proxy.shutdown();

    // `.invalid` never resolves (RFC 6761; the resolver answers it without asking a server).
    let proxy = dns_proxy(&fake, "[\"kms.*.invalid\"]", "dns").await;
    for host in ["kms.test.invalid.", "kms.test.invalid"] {
        let started = Instant::now();
        let raw = RawRequest::signed_kms(host, "TrentService.Encrypt", encrypt_body().as_bytes());
        let answer = raw::send(proxy.addr, &raw.to_bytes()).await;
        let took = started.elapsed();
        if answer.status == 504 && !host.ends_with('.') {
            // A relative name may also be tried under the resolv.conf search domains, which
            // needs a reachable DNS server.
            eprintln!("SKIPPED {host}: DNS search domains unreachable here (504 after {took:?})");
            continue;
        }
        assert_eq!(answer.status, 502, "{host}: {}", answer.body_str());
        let json = answer.json();
        assert_eq!(json["__type"], "BadGateway");
        let message = json["message"].as_str().unwrap().to_ascii_lowercase();
        assert!(
            message.contains("dns") || message.contains("resolve") || message.contains("record"),
            "{host}: the message should name the failed lookup: {message}"
        );
        assert!(took < Duration::from_secs(3), "{host}: {took:?}");
        eprintln!("{host}: 502 after {took:?}: {message}");
    }
    assert_eq!(fake.count(), 0);
}

/// A name `/etc/hosts` maps to a loopback address other than `localhost` (which DNS resolvers
/// answer themselves, RFC 6761).
fn loopback_name_from_etc_hosts() -> Option<(String, String)> {
    let text = std::fs::read_to_string("/etc/hosts").ok()?;
    text.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let ip: std::net::Ipv4Addr = fields.next()?.parse().ok()?;
            ip.is_loopback().then_some((ip, fields.collect::<Vec<_>>()))
        })
        .flat_map(|(ip, names)| {
            names
                .into_iter()
                .map(move |n| (ip.to_string(), n.to_ascii_lowercase()))
        })
        .find(|(_, name)| {
            name != "localhost"
                && !name.ends_with(".localhost")
                && !name.ends_with(".local")
                && kms_tag_guard::glob::HostGlob::new(name).is_ok()
        })
}

#[tokio::test]
async fn dns_resolver_ignores_etc_hosts() {
    let Some((ip, name)) = loopback_name_from_etc_hosts() else {
        eprintln!("SKIPPED dns_resolver_ignores_etc_hosts: /etc/hosts maps no name but localhost to a loopback address");
        return;
    };
    let _port = PORT_443.lock().await;
    let Some(watched) = watch_443(&ip, "dns_resolver_ignores_etc_hosts").await else {
        return;
    };
    let fake = FakeKms::start().await;
    let allowed = format!("[\"{name}\"]");
    let raw = RawRequest::signed_kms(&name, "TrentService.Encrypt", encrypt_body().as_bytes());

    // The control: the system resolver follows /etc/hosts to the watched listener.
    let system = dns_proxy(&fake, &allowed, "system").await;
    let answer = raw::send(system.addr, &raw.to_bytes()).await;
    assert_eq!(answer.status, 502, "{}", answer.body_str());
    let followed = watched.connections();
    assert!(
        followed >= 1,
        "/etc/hosts sends {name} to {ip}:443 for the system resolver"
    );
    system.proxy.shutdown();

    // resolver = "dns": /etc/hosts is not consulted, so the listener sees nothing.
    let dns = dns_proxy(&fake, &allowed, "dns").await;
    let started = Instant::now();
    let answer = raw::send(dns.addr, &raw.to_bytes()).await;
    eprintln!(
        "resolver = \"dns\" for {name}: {} after {:?}: {}",
        answer.status,
        started.elapsed(),
        answer.body_str()
    );
    assert!(
        answer.status == 502 || answer.status == 504,
        "{}",
        answer.body_str()
    );
    assert_eq!(
        watched.connections(),
        followed,
        "resolver = \"dns\" must not follow /etc/hosts to {ip}"
    );
    assert_eq!(fake.count(), 0);
}

// ======================================================================== reloads of what rotates

/// A CA valid only from `not_before` to `not_after` (years).
fn ca_valid(name: &str, not_before: i32, not_after: i32) -> TestCa {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = rcgen::date_time_ymd(not_before, 1, 1);
    params.not_after = rcgen::date_time_ymd(not_after, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    TestCa {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// Puts a CA's certificate and key (mode 0600) at the paths the proxy reads, each by a rename.
fn install_ca(ca: &TestCa, cert_path: &Path, key_path: &Path) {
    let tmp = key_path.with_extension("tmp");
    std::fs::write(&tmp, ca.issuer.key().serialize_pem()).unwrap();
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, key_path).unwrap();
    write_atomic(cert_path, &ca.pem);
}

/// Whether an intercepted handshake for KMS_HOST verifies against `ca_pem`.
async fn intercepted_handshake(proxy: SocketAddr, ca_pem: &[u8]) -> bool {
    let tunnel = connect(proxy, &format!("{KMS_HOST}:443")).await;
    assert_eq!(tunnel.status, 200, "{}", tunnel.head);
    tls_connect(tunnel.stream, KMS_HOST, client_config(ca_pem, &[]))
        .await
        .is_ok()
}

async fn reloads(admin: SocketAddr, what: &str, result: &str) -> f64 {
    common::ops::scrape(admin).await.count(
        "kms_tag_guard_reloads_total",
        &[("what", what), ("result", result)],
    )
}

/// Point 7: a rotated interception CA is picked up on reload (and the leaves cached from the old
/// one are dropped); a replacement that is not a CA, has expired, is not yet valid or whose key
/// is open to others is refused, counted, and the CA in use stays.
#[tokio::test]
async fn a_rotated_interception_ca_is_reloaded_and_a_bad_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let first = TestCa::new("first interception CA");
    let (cert, key) = first.write_pair(dir.path(), "ca");
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            admin: true,
            intercept: intercept_section(&cert, &key, "[]"),
            ..ProxyConfig::default()
        },
    )
    .await;
    let admin = proxy.admin_addr.unwrap();
    assert!(intercepted_handshake(proxy.addr, first.pem.as_bytes()).await);

    let second = TestCa::new("second interception CA");
    install_ca(&second, &cert, &key);
    reload_and_wait(&proxy).await;
    assert!(
        poll_until_async(Duration::from_secs(2), || intercepted_handshake(
            proxy.addr,
            second.pem.as_bytes()
        ))
        .await,
        "after a reload, leaves (even for a name cached before) are signed by the new CA"
    );
    assert!(!intercepted_handshake(proxy.addr, first.pem.as_bytes()).await);
    assert_eq!(reloads(admin, "ca", "success").await, 1.0);

    // Replacements that fail the checks: each refused and counted, the second CA stays.
    let not_a_ca = second.leaf(&["localhost"], 70);
    let expired = ca_valid("expired CA", 2001, 2002);
    let not_yet = ca_valid("future CA", 2999, 3001);
    type Replace<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, Replace)> = vec![
        (
            "not a CA",
            Box::new(|| {
                let tmp = key.with_extension("tmp");
                std::fs::write(&tmp, &not_a_ca.key_pem).unwrap();
                std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                    .unwrap();
                std::fs::rename(&tmp, &key).unwrap();
                write_atomic(&cert, &not_a_ca.cert_pem);
            }),
        ),
        ("expired", Box::new(|| install_ca(&expired, &cert, &key))),
        (
            "not yet valid",
            Box::new(|| install_ca(&not_yet, &cert, &key)),
        ),
        (
            "key readable by others",
            Box::new(|| {
                let third = TestCa::new("third interception CA");
                install_ca(&third, &cert, &key);
                std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                    .unwrap();
            }),
        ),
    ];
    for (n, (case, replace)) in cases.iter().enumerate() {
        replace();
        reload_and_wait(&proxy).await;
        assert!(
            poll_until_async(Duration::from_secs(2), || async {
                reloads(admin, "ca", "error").await >= (n + 1) as f64
            })
            .await,
            "{case}: the failed reload is counted"
        );
        assert!(
            intercepted_handshake(proxy.addr, second.pem.as_bytes()).await,
            "{case}: the CA in use stays"
        );
    }
    assert_eq!(reloads(admin, "ca", "success").await, 1.0);
    assert_eq!(fake.count(), 0);
}

/// Point 7: an expired or not yet valid listener certificate is refused on reload (and counted);
/// the one in use stays.
#[tokio::test]
async fn an_expired_or_future_listener_certificate_is_refused_on_reload() {
    let ca = TestCa::new("listener test CA");
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let a = ca.leaf(&["localhost"], 80);
    let (proxy, cert_path) = tls_listener_proxy(&fake, dir.path(), &a).await;
    let key_path = dir.path().join("tls.key");
    let ca_pem = ca.pem.as_bytes();
    for (case, not_before, not_after) in [("expired", 2001, 2002), ("not yet valid", 2999, 3001)] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(not_before, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after, 1, 1);
        let bad = params.signed_by(&key, &ca.issuer).unwrap();
        install(&cert_path, &key_path, &bad.pem(), &key.serialize_pem());
        reload_and_wait(&proxy).await;
        for _ in 0..3 {
            assert_eq!(
                presented_leaf(proxy.addr, ca_pem).await.unwrap(),
                a.cert_der,
                "{case}: the certificate in use stays"
            );
        }
    }
}

/// Polls an async condition every 50 ms until it holds or `timeout` passes.
async fn poll_until_async<F, Fut>(timeout: Duration, mut done: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if done().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A leaf for `localhost` signed by `ca`, valid until 1 January of `not_after` (a year).
fn leaf_until(ca: &TestCa, not_after: i32) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(not_after, 1, 1);
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Issue 21, point 7: `kms_tag_guard_certificate_expiry_seconds` is the notAfter of the listener
/// certificate and of the interception CA in use: set at start, moved by a reload that puts a
/// new one in use, and left alone by a reload that is refused (the old one stays in use).
#[tokio::test]
async fn certificate_expiry_gauges_follow_the_certificates_in_use() {
    // 1 January 2080, 2085, 2090 and 2095, 00:00 UTC, in seconds since the epoch.
    const Y2080: f64 = 3_471_292_800.0;
    const Y2085: f64 = 3_629_145_600.0;
    const Y2090: f64 = 3_786_912_000.0;
    const Y2095: f64 = 3_944_678_400.0;
    const EXPIRY: &str = "kms_tag_guard_certificate_expiry_seconds";
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let ca = ca_valid("expiry test CA", 2020, 2090);
    let (ca_cert, ca_key) = ca.write_pair(dir.path(), "ca");
    let (tls_cert, tls_key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let (cert_pem, key_pem) = leaf_until(&ca, 2080);
    install(&tls_cert, &tls_key, &cert_pem, &key_pem);
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            admin: true,
            listener: format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"",
                tls_cert.display(),
                tls_key.display()
            ),
            intercept: intercept_section(&ca_cert, &ca_key, "[]"),
            ..ProxyConfig::default()
        },
    )
    .await;
    let admin = proxy.admin_addr.unwrap();
    let expiry = |what: &'static str| async move {
        common::ops::scrape(admin)
            .await
            .get(EXPIRY, &[("what", what)])
    };
    assert_eq!(expiry("listener_cert").await, Some(Y2080), "at start");
    assert_eq!(expiry("ca").await, Some(Y2090), "at start");

    // New ones in use: the gauges move.
    let (cert_pem, key_pem) = leaf_until(&ca, 2085);
    install(&tls_cert, &tls_key, &cert_pem, &key_pem);
    install_ca(
        &ca_valid("second expiry test CA", 2020, 2095),
        &ca_cert,
        &ca_key,
    );
    reload_and_wait(&proxy).await;
    assert!(
        poll_until_async(Duration::from_secs(2), || async {
            expiry("listener_cert").await == Some(Y2085) && expiry("ca").await == Some(Y2095)
        })
        .await,
        "after a reload: listener {:?}, CA {:?}",
        expiry("listener_cert").await,
        expiry("ca").await
    );

    // Refused replacements (expired): the gauges keep the certificates still in use.
    let (cert_pem, key_pem) = {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2001, 1, 1);
        params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        (
            params.signed_by(&key, &ca.issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    install(&tls_cert, &tls_key, &cert_pem, &key_pem);
    install_ca(&ca_valid("expired CA", 2001, 2002), &ca_cert, &ca_key);
    reload_and_wait(&proxy).await;
    assert!(
        poll_until_async(Duration::from_secs(2), || async {
            reloads(admin, "ca", "error").await >= 1.0
                && reloads(admin, "listener_cert", "error").await >= 1.0
        })
        .await,
        "the refused reloads are counted"
    );
    assert_eq!(expiry("listener_cert").await, Some(Y2085));
    assert_eq!(expiry("ca").await, Some(Y2095));
    assert_eq!(fake.count(), 0);
}
