//! The AWS SDK for JavaScript v3 (`@aws-sdk/client-kms`, pinned by tests/js/package-lock.json)
//! through the proxy to the fake KMS, which verifies every signature: deployment modes A (plain
//! HTTP endpoint), B (the TLS listener) and C (HTTPS_PROXY-style CONNECT with `hpagent`) over
//! HTTP/1.1; what the SDK retries; connection hygiene on one kept-alive socket (early refusals,
//! idle gaps and the keep-alive hint; issue 11); and `NodeHttp2Handler` straight to the fake over
//! h2 (TLS and prior knowledge). `NodeHttp2Handler` through the proxy (modes A, B and C) is
//! written but ignored until the proxy forwards h2 (issue 12).
//!
//! One `node tests/js/kms-driver.mjs` process runs a list of scenarios and prints one JSON line
//! per call (see tests/js/README.md). The npm packages are installed on first use under the
//! target directory (tests/common/deps.rs); `node` 20+ and `npm` must be on the PATH.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::fake_kms::base64_decode;
use common::ops::{free_port, scrape};
use common::*;
use http::Version;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};

const KEY_ID: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
/// The name the SDK signs when it is given no endpoint (region us-east-1): mode C.
const KMS_HOST: &str = "kms.us-east-1.amazonaws.com";
/// The longest one driver run may take.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(60);
const PLAINTEXT: &str = "hello from node";
const REQUESTS: &str = "kms_tag_guard_requests_total";

// ------------------------------------------------------------------------ the driver

/// Runs the driver on `scenarios` with these extra environment variables; returns one JSON
/// object per call. The child gets none of this process's AWS_*, proxy or NODE_* variables and
/// no shared config files, so only the scenario decides what the SDK does.
async fn run_driver(scenarios: Value, env: &[(&str, &str)]) -> Vec<Value> {
    static MODULES: OnceLock<PathBuf> = OnceLock::new();
    let modules = MODULES.get_or_init(common::deps::node_modules).clone();
    let dir = tempfile::tempdir().unwrap();
    let scenario_path = dir.path().join("scenario.json");
    std::fs::write(
        &scenario_path,
        serde_json::to_vec_pretty(&scenarios).unwrap(),
    )
    .unwrap();
    let stdout_path = dir.path().join("stdout.jsonl");
    let stderr_path = dir.path().join("stderr.log");
    let mut command = Command::new("node");
    command
        .arg(common::deps::repo_root().join("tests/js/kms-driver.mjs"))
        .arg(&scenario_path)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
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
    let mut child = command.spawn().expect("start node");
    // Wait off the runtime: the fake KMS runs on this test's runtime.
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + DRIVER_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for node") {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let shown = || format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    match status {
        None => panic!(
            "the driver did not finish within {DRIVER_TIMEOUT:?}\n{}",
            shown()
        ),
        Some(s) if !s.success() => panic!("the driver failed ({s})\n{}", shown()),
        Some(_) => {}
    }
    let mut lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{}", shown())))
        .collect();
    let done = lines.pop().unwrap_or_default();
    assert_eq!(done["done"], true, "the driver did not finish\n{}", shown());
    assert_eq!(done["calls"], lines.len(), "{}", shown());
    lines
}

/// The result of the call with this id (exactly one).
fn call<'a>(results: &'a [Value], id: &str) -> &'a Value {
    let mut found = results.iter().filter(|r| r["id"] == id);
    let first = found
        .next()
        .unwrap_or_else(|| panic!("no call {id:?} in {results:#?}"));
    assert!(found.next().is_none(), "call {id:?} reported twice");
    first
}

/// The results of a repeated call (`id#0`, `id#1`, ...).
fn repeated<'a>(results: &'a [Value], id: &str) -> Vec<&'a Value> {
    let prefix = format!("{id}#");
    results
        .iter()
        .filter(|r| r["id"].as_str().is_some_and(|i| i.starts_with(&prefix)))
        .collect()
}

#[track_caller]
fn assert_ok(result: &Value, attempts: u64) {
    assert_eq!(result["ok"], true, "{result:#}");
    assert_eq!(result["status"], 200, "{result:#}");
    assert_eq!(result["attempts"], attempts, "{result:#}");
    assert!(
        result["requestId"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{result:#}"
    );
}

#[track_caller]
fn assert_tag_exception(result: &Value, rule: &str) {
    assert_eq!(result["ok"], false, "{result:#}");
    assert_eq!(result["error"], "TagException", "{result:#}");
    assert_eq!(result["fault"], "client", "{result:#}");
    assert_eq!(result["status"], 400, "{result:#}");
    assert_eq!(result["attempts"], 1, "a denial is not retried: {result:#}");
    let message = result["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("rule {rule}")), "{result:#}");
}

// ------------------------------------------------------------------------ scenarios

fn credentials() -> Value {
    json!({"accessKeyId": ACCESS_KEY_ID, "secretAccessKey": SECRET_KEY})
}

/// Client settings: these `extra` keys over the test credentials, region and 3 attempts.
fn client(extra: Value) -> Value {
    let mut settings = json!({
        "region": REGION,
        "credentials": credentials(),
        "maxAttempts": 3,
        "handler": "http1",
    });
    for (k, v) in extra.as_object().expect("an object") {
        settings[k] = v.clone();
    }
    settings
}

fn tags(pairs: &[(&str, &str)]) -> Value {
    pairs
        .iter()
        .map(|(k, v)| json!({"TagKey": k, "TagValue": v}))
        .collect()
}

/// Encrypt/Decrypt, an allowed and a denied TagResource, CreateKey with and without the
/// required tag: in this order, one after the other.
fn standard_calls() -> Value {
    json!([
        {"id": "encrypt", "op": "Encrypt",
         "input": {"KeyId": KEY_ID, "Plaintext": {"$utf8": PLAINTEXT}}},
        {"id": "decrypt", "op": "Decrypt",
         "input": {"CiphertextBlob": {"$output": "encrypt", "field": "CiphertextBlob"}}},
        {"id": "tag-allowed", "op": "TagResource",
         "input": {"KeyId": KEY_ID, "Tags": tags(&[("team:app", "ledger"), ("cost:center", "4711")])}},
        {"id": "tag-denied", "op": "TagResource",
         "input": {"KeyId": KEY_ID, "Tags": tags(&[("Project", "apollo")])}},
        {"id": "create-tagged", "op": "CreateKey",
         "input": {"Description": "node", "Tags": tags(&[("team:owner", "payments")])}},
        {"id": "create-untagged", "op": "CreateKey", "input": {"Description": "node, no tags"}},
    ])
}

/// 25 allowed TagResource and 25 Encrypt, all at once.
fn parallel_calls() -> Value {
    json!([
        {"id": "par-tag", "op": "TagResource", "repeat": 25,
         "input": {"KeyId": KEY_ID, "Tags": tags(&[("team:app", "parallel")])}},
        {"id": "par-encrypt", "op": "Encrypt", "repeat": 25,
         "input": {"KeyId": KEY_ID, "Plaintext": {"$utf8": "p"}}},
    ])
}

fn scenario(name: &str, client: Value, calls: Value, parallel: bool) -> Value {
    json!({"name": name, "client": client, "calls": calls, "parallel": parallel})
}

/// The fake's requests, each verified and signed for `host` (the signed Host the proxy must
/// forward unchanged).
fn verified_requests(fake: &FakeKms, host: &str) -> Vec<Recorded> {
    let requests = fake.requests();
    for r in &requests {
        let credential = r.verified();
        assert_eq!(credential.access_key_id, ACCESS_KEY_ID);
        assert_eq!(credential.region, REGION);
        assert!(credential.signs("host"), "{:?}", credential.signed_headers);
        assert_eq!(r.header("host"), Some(host), "request {}", r.seq);
    }
    requests
}

/// Checks the results of [`standard_calls`] then [`parallel_calls`] against the fake and the
/// audit log: outcomes, attempts, request ids, and that only allowed requests reached the fake,
/// every one with a signature that verifies.
async fn check_standard_and_parallel(
    results: &[Value],
    fake: &FakeKms,
    proxy: &TestProxy,
    host: &str,
) {
    let encrypt = call(results, "encrypt");
    assert_ok(encrypt, 1);
    let decrypt = call(results, "decrypt");
    assert_ok(decrypt, 1);
    let plaintext = base64_decode(decrypt["output"]["Plaintext"]["$base64"].as_str().unwrap());
    assert_eq!(plaintext.as_deref(), Some(PLAINTEXT.as_bytes()));
    assert_ok(call(results, "tag-allowed"), 1);
    assert_tag_exception(call(results, "tag-denied"), "abac-keys");
    assert_ok(call(results, "create-tagged"), 1);
    assert_tag_exception(call(results, "create-untagged"), "owner-on-create");

    let par: Vec<&Value> = [
        repeated(results, "par-tag"),
        repeated(results, "par-encrypt"),
    ]
    .concat();
    assert_eq!(par.len(), 50);
    for r in &par {
        assert_ok(r, 1);
    }
    let mut ids: Vec<&str> = par
        .iter()
        .map(|r| r["requestId"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 50, "every call has its own request id");

    // Only the allowed calls reached KMS, each signature verified.
    let requests = verified_requests(fake, host);
    let ops: Vec<&str> = requests.iter().map(|r| r.operation().unwrap()).collect();
    assert_eq!(
        ops[..4],
        ["Encrypt", "Decrypt", "TagResource", "CreateKey"],
        "the denied requests must not reach KMS"
    );
    assert_eq!(requests.len(), 4 + 50, "{ops:?}");
    assert_eq!(ops.iter().filter(|o| **o == "TagResource").count(), 26);
    assert!(
        requests
            .iter()
            .all(|r| !String::from_utf8_lossy(&r.body).contains("Project")),
        "a denied tag reached KMS"
    );

    // The SDK's request ids are the proxy's for denials, KMS's (relayed) for the rest.
    // Two records (decision, outcome) per forwarded tag change, one per denial.
    let audit = proxy.wait_for_audit(2 + 1 + 2 + 1 + 25 * 2).await;
    assert_eq!(audit.len(), 56, "{audit:#?}");
    let decisions: Vec<&Value> = audit.iter().filter(|r| r["event"] == "decision").collect();
    let verdicts: Vec<&str> = decisions[..4]
        .iter()
        .map(|r| r["decision"].as_str().unwrap())
        .collect();
    assert_eq!(verdicts, ["allow", "deny", "allow", "deny"], "{audit:#?}");
    assert_eq!(
        call(results, "tag-denied")["requestId"],
        decisions[1]["request_id"],
        "the SDK's requestId is the audit record's request_id"
    );
    assert_eq!(
        call(results, "create-untagged")["requestId"],
        decisions[3]["request_id"]
    );
    let outcome_of = |decision: &Value| {
        audit
            .iter()
            .find(|r| r["event"] == "outcome" && r["request_id"] == decision["request_id"])
            .unwrap_or_else(|| panic!("no outcome for {decision}"))
            .clone()
    };
    assert_eq!(
        call(results, "tag-allowed")["requestId"],
        outcome_of(decisions[0])["aws_request_id"],
        "an allowed call's requestId is KMS's, relayed"
    );
    assert_eq!(
        call(results, "create-tagged")["requestId"],
        outcome_of(decisions[2])["aws_request_id"]
    );
}

// ------------------------------------------------------------------------ certificates

/// A test CA and a server leaf it issued, as PEM files in `dir` and as DER.
struct Pki {
    ca_path: PathBuf,
    cert_path: PathBuf,
    key_path: PathBuf,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Pki {
    fn new(dir: &Path, names: &[&str]) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "node_sdk test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        leaf.distinguished_name.push(DnType::CommonName, names[0]);
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = leaf.signed_by(&key, &issuer).unwrap();

        let pki = Pki {
            ca_path: dir.join("ca.pem"),
            cert_path: dir.join("tls.crt"),
            key_path: dir.join("tls.key"),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        };
        std::fs::write(&pki.ca_path, ca_pem).unwrap();
        std::fs::write(&pki.cert_path, cert.pem()).unwrap();
        std::fs::write(&pki.key_path, key.serialize_pem()).unwrap();
        pki
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// A fake KMS behind TLS with this leaf (`https://localhost:PORT`), offering h2 and
    /// HTTP/1.1.
    async fn tls_fake(&self) -> FakeKms {
        FakeKms::start_tls(
            vec![self.cert_der.clone()],
            self.key(),
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )
        .await
    }

    /// `[listener]` lines for a TLS listener with this leaf.
    fn listener(&self) -> String {
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            self.cert_path.display(),
            self.key_path.display()
        )
    }
}

/// A mode C gateway in front of `fake`, with its admin port (for the CONNECT counts). With
/// `ca_dir`, it intercepts KMS names with a CA that `kms-tag-guard ca init` writes there
/// (name-constrained to KMS names), whose certificate's path is returned: what clients trust.
async fn gateway(fake: &FakeKms, ca_dir: Option<&Path>) -> (TestProxy, PathBuf) {
    let mut ca = PathBuf::new();
    let mut intercept = String::new();
    if let Some(dir) = ca_dir {
        let (cert, key) = kms_tag_guard::tls::ca_init(&dir.join("ca")).unwrap();
        intercept = format!(
            "ca_cert = \"{}\"\nca_key = \"{}\"\ntunnel_hosts = []",
            cert.display(),
            key.display()
        );
        ca = cert;
    }
    let proxy = start_proxy_with(
        fake,
        ProxyConfig {
            intercept,
            admin: true,
            ..ProxyConfig::default()
        },
    )
    .await;
    (proxy, ca)
}

/// The proxy's count of CONNECT requests with this decision (`pass` = intercepted).
async fn connects(proxy: &TestProxy, decision: &str) -> f64 {
    let admin = proxy.admin_addr.expect("the proxy's admin port");
    scrape(admin).await.count(
        REQUESTS,
        &[("operation", "CONNECT"), ("decision", decision)],
    )
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

// ======================================================================== HTTP/1.1 modes

/// Mode A: plain HTTP to the proxy, the endpoint given the documented way
/// (`AWS_ENDPOINT_URL_KMS`; in a pod `http://kms.<region>.amazonaws.com` resolved to the
/// sidecar, here the proxy's address, which is then the signed Host, as in tests/sdk.rs).
#[tokio::test]
async fn mode_a_endpoint_url_env() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let settings = client(json!({}));
    assert!(settings.get("endpoint").is_none());
    let results = run_driver(
        json!([
            scenario("mode-a", settings.clone(), standard_calls(), false),
            scenario("mode-a-parallel", settings, parallel_calls(), true),
        ]),
        &[("AWS_ENDPOINT_URL_KMS", &proxy.url())],
    )
    .await;
    check_standard_and_parallel(&results, &fake, &proxy, &proxy.addr.to_string()).await;
}

/// Mode B: the proxy's TLS listener with a certificate from a test CA that Node trusts
/// through `NODE_EXTRA_CA_CERTS`.
#[tokio::test]
async fn mode_b_tls_listener_node_extra_ca_certs() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &["localhost"]);
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            listener: pki.listener(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let host = format!("localhost:{}", proxy.addr.port());
    let settings = client(json!({"endpoint": format!("https://{host}")}));
    let results = run_driver(
        json!([
            scenario("mode-b", settings.clone(), standard_calls(), false),
            scenario("mode-b-parallel", settings, parallel_calls(), true),
        ]),
        &[("NODE_EXTRA_CA_CERTS", path_str(&pki.ca_path))],
    )
    .await;
    check_standard_and_parallel(&results, &fake, &proxy, &host).await;
}

/// Mode C: no endpoint (the SDK's own `https://kms.us-east-1.amazonaws.com`), an `hpagent`
/// HttpsProxyAgent with keep-alive as the https agent of `NodeHttpHandler`, the interception
/// CA in `NODE_EXTRA_CA_CERTS`. Keep-alive reuses the tunnel: one CONNECT for six calls in a
/// row, denials included.
#[tokio::test]
async fn mode_c_hpagent_keep_alive() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let (proxy, ca) = gateway(&fake, Some(dir.path())).await;
    let settings = client(json!({
        "proxy": {"url": proxy.url(), "agent": "hpagent"},
        "keepAlive": true,
    }));
    let env = [("NODE_EXTRA_CA_CERTS", path_str(&ca))];
    let sequential = run_driver(
        json!([scenario(
            "mode-c",
            settings.clone(),
            standard_calls(),
            false
        )]),
        &env,
    )
    .await;
    assert_eq!(
        connects(&proxy, "pass").await,
        1.0,
        "keep-alive: six calls in a row through one tunnel"
    );
    let parallel = run_driver(
        json!([scenario(
            "mode-c-parallel",
            settings,
            parallel_calls(),
            true
        )]),
        &env,
    )
    .await;
    let tunnels = connects(&proxy, "pass").await - 1.0;
    assert!(
        (1.0..=50.0).contains(&tunnels),
        "50 parallel calls, at most one tunnel each: {tunnels}"
    );
    eprintln!("mode C, hpagent keep-alive: 6 sequential calls in 1 CONNECT, 50 parallel calls in {tunnels} CONNECTs");
    let results = [sequential, parallel].concat();
    check_standard_and_parallel(&results, &fake, &proxy, KMS_HOST).await;
    assert_eq!(connects(&proxy, "deny").await, 0.0);
}

/// The same sequential calls through `https-proxy-agent` (also with `keepAlive: true`): every
/// call opens a tunnel of its own, which is why deploy/README.md recommends `hpagent`.
#[tokio::test]
async fn mode_c_https_proxy_agent_opens_a_connect_per_call() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let (proxy, ca) = gateway(&fake, Some(dir.path())).await;
    let settings = client(json!({
        "proxy": {"url": proxy.url(), "agent": "https-proxy-agent"},
        "keepAlive": true,
    }));
    let results = run_driver(
        json!([scenario(
            "https-proxy-agent",
            settings,
            standard_calls(),
            false
        )]),
        &[("NODE_EXTRA_CA_CERTS", path_str(&ca))],
    )
    .await;
    assert_ok(call(&results, "encrypt"), 1);
    assert_ok(call(&results, "tag-allowed"), 1);
    assert_tag_exception(call(&results, "tag-denied"), "abac-keys");
    assert_eq!(verified_requests(&fake, KMS_HOST).len(), 4);
    let tunnels = connects(&proxy, "pass").await;
    eprintln!("mode C, https-proxy-agent keepAlive: 6 sequential calls in {tunnels} CONNECTs");
    assert_eq!(tunnels, 6.0, "one CONNECT per call");
}

/// A CONNECT the proxy refuses (here: a KMS name without an interception CA) is an error with
/// the 403 in its message, which the SDK does not retry; nothing reaches KMS.
#[tokio::test]
async fn mode_c_refused_connect_is_a_403_error_that_is_not_retried() {
    let fake = FakeKms::start().await;
    let (proxy, _) = gateway(&fake, None).await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &["localhost"]);
    let settings = client(json!({"proxy": {"url": proxy.url(), "agent": "hpagent"}}));
    let calls = json!([{"id": "encrypt", "op": "Encrypt",
                        "input": {"KeyId": KEY_ID, "Plaintext": {"$utf8": "x"}}}]);
    let results = run_driver(
        json!([scenario("refused", settings, calls, false)]),
        &[("NODE_EXTRA_CA_CERTS", path_str(&pki.ca_path))],
    )
    .await;
    let encrypt = call(&results, "encrypt");
    assert_eq!(encrypt["ok"], false, "{encrypt:#}");
    assert_eq!(encrypt["attempts"], 1, "not retried: {encrypt:#}");
    assert_eq!(encrypt["status"], Value::Null, "{encrypt:#}");
    assert_eq!(encrypt["message"], "Bad response: 403", "{encrypt:#}");
    assert_eq!(connects(&proxy, "deny").await, 1.0);
    assert_eq!(connects(&proxy, "pass").await, 0.0);
    assert_eq!(fake.count(), 0, "nothing reached KMS");
}

/// `HTTPS_PROXY` alone does nothing: the SDK connects straight to the endpoint (here a listener
/// that counts connections), and the proxy sees no CONNECT. Mode C needs an agent.
#[tokio::test]
async fn mode_c_https_proxy_env_alone_is_ignored() {
    let fake = FakeKms::start().await;
    let (proxy, _) = gateway(&fake, None).await;
    let direct = Closer::start().await;
    let settings = client(json!({
        "endpoint": format!("https://{}", direct.addr),
        "maxAttempts": 1,
    }));
    let calls = json!([{"id": "encrypt", "op": "Encrypt",
                        "input": {"KeyId": KEY_ID, "Plaintext": {"$utf8": "x"}}}]);
    let proxy_url = proxy.url();
    let results = run_driver(
        json!([scenario("env-only", settings, calls, false)]),
        &[("HTTPS_PROXY", &proxy_url), ("https_proxy", &proxy_url)],
    )
    .await;
    let encrypt = call(&results, "encrypt");
    assert_eq!(encrypt["ok"], false, "{encrypt:#}");
    assert_eq!(
        direct.accepted.load(Ordering::SeqCst),
        1,
        "the SDK went straight to the endpoint"
    );
    assert_eq!(connects(&proxy, "pass").await, 0.0);
    assert_eq!(connects(&proxy, "deny").await, 0.0);
    assert_eq!(fake.count(), 0);
}

// ======================================================================== retries

/// Accepts connections and closes each at once (counting them): a broken socket.
struct Closer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Closer {
    async fn start() -> Closer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Closer {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The proxy's 502 (KMS unreachable) and 504 (KMS too slow) are retried up to `maxAttempts`,
/// as is a connection closed without an answer; each retry is signed anew and verifies.
#[tokio::test]
async fn the_sdk_retries_the_proxys_502_and_504_and_broken_sockets() {
    // 502: the proxy's endpoint is a closed port.
    let unused = FakeKms::start().await;
    let to_nowhere = start_proxy_with(
        &unused,
        ProxyConfig {
            endpoint: Some(format!("http://127.0.0.1:{}", free_port())),
            ..ProxyConfig::default()
        },
    )
    .await;
    // 504: KMS answers after 2 s, the proxy waits 300 ms.
    let slow = FakeKms::start().await;
    slow.set_delay(Duration::from_secs(2));
    let impatient = start_proxy_with(
        &slow,
        ProxyConfig {
            upstream: "timeout_ms = 300".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let closer = Closer::start().await;

    let encrypt = json!([{"id": "encrypt", "op": "Encrypt",
                          "input": {"KeyId": KEY_ID, "Plaintext": {"$utf8": "x"}}}]);
    let results = run_driver(
        json!([
            scenario(
                "502",
                client(json!({"endpoint": to_nowhere.url()})),
                encrypt.clone(),
                false
            ),
            scenario(
                "504",
                client(json!({"endpoint": impatient.url()})),
                encrypt.clone(),
                false
            ),
            scenario(
                "closed",
                client(json!({"endpoint": format!("http://{}", closer.addr)})),
                encrypt,
                false
            ),
        ]),
        &[],
    )
    .await;
    let by_scenario = |name: &str| {
        results
            .iter()
            .find(|r| r["scenario"] == name)
            .unwrap_or_else(|| panic!("no result for {name}"))
    };

    let bad_gateway = by_scenario("502");
    assert_eq!(bad_gateway["ok"], false, "{bad_gateway:#}");
    assert_eq!(bad_gateway["status"], 502, "{bad_gateway:#}");
    assert_eq!(bad_gateway["error"], "BadGateway", "{bad_gateway:#}");
    assert_eq!(bad_gateway["attempts"], 3, "{bad_gateway:#}");
    assert_eq!(unused.count(), 0);

    let timeout = by_scenario("504");
    assert_eq!(timeout["ok"], false, "{timeout:#}");
    assert_eq!(timeout["status"], 504, "{timeout:#}");
    assert_eq!(timeout["error"], "GatewayTimeout", "{timeout:#}");
    assert_eq!(timeout["attempts"], 3, "{timeout:#}");
    let attempts = slow.wait_for_requests(3, Duration::from_secs(5)).await;
    assert_eq!(attempts.len(), 3);
    for r in &attempts {
        r.verified();
    }

    let closed = by_scenario("closed");
    assert_eq!(closed["ok"], false, "{closed:#}");
    assert_eq!(closed["code"], "ECONNRESET", "{closed:#}");
    assert_eq!(closed["attempts"], 3, "{closed:#}");
    assert_eq!(closer.accepted.load(Ordering::SeqCst), 3);
}

// ======================================================================== connection hygiene

/// The proxy's request count for this operation and decision.
async fn requests_counted(proxy: &TestProxy, operation: &str, decision: &str) -> f64 {
    let admin = proxy.admin_addr.expect("the proxy's admin port");
    scrape(admin).await.count(
        REQUESTS,
        &[("operation", operation), ("decision", decision)],
    )
}

/// A response header the driver reported for a call (`headers`, names in lower case).
fn response_header<'a>(result: &'a Value, name: &str) -> Option<&'a str> {
    result["headers"][name].as_str()
}

/// The answer kept the connection open: no `Connection: close`, and the idle hint
/// `keep-alive: timeout=<idle_timeout_ms / 1000>`.
#[track_caller]
fn assert_kept_alive(result: &Value, idle_secs: u64) {
    assert_eq!(response_header(result, "connection"), None, "{result:#}");
    assert_eq!(
        response_header(result, "keep-alive"),
        Some(format!("timeout={idle_secs}").as_str()),
        "{result:#}"
    );
}

/// How many connections the call's agent had opened when the call ended.
#[track_caller]
fn sockets(result: &Value) -> u64 {
    result["sockets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no socket count: {result:#}"))
}

/// Early refusals on one kept-alive agent with a single socket and no retries (issue 11):
/// a TagResource larger than `max_body_bytes` gets 413 with `Connection: close`, so the agent
/// retires that socket and the next call opens another; a CreateKey refused for its
/// Content-Type, and one refused for a Content-Encoding, get 400 with the keep-alive hint, and
/// the proxy skips their bodies, so the next calls reuse the same socket. Every call after a
/// refusal succeeds at its first attempt, and only those reach KMS.
///
/// The SDK never sends a wrong Content-Type or a Content-Encoding on its own (KMS operations do
/// not compress requests): the driver sets them with a build-step middleware before signing, as
/// a user's middleware could. Raw-socket coverage of these refusals is in tests/front_door.rs.
///
/// Checked against the behaviour issue 11 describes, put back in `refuse` for a trial run (the
/// answer without `Connection: close`, the body unread, then the connection closed): the agent
/// kept the socket, and the call right after each refusal (`encrypt-after-413`,
/// `create-content-encoding`) failed with `ECONNRESET` ("socket hang up", no response) in 3 runs
/// of 3; the first assertion to fail here is the 413's `Connection: close`. With the body left
/// unread on a connection kept open instead, its bytes were read as the start of the next head
/// and those two calls were refused 400 (the head is not valid HTTP/1.1).
#[tokio::test]
async fn early_refusals_do_not_break_the_next_call_on_a_reused_socket() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            limits: "max_body_bytes = 2048".into(),
            admin: true,
            ..ProxyConfig::default()
        },
    )
    .await;
    let settings = client(json!({
        "endpoint": proxy.url(),
        "maxAttempts": 1,
        "keepAlive": true,
        "maxSockets": 1,
    }));
    let long_value = "v".repeat(200);
    let many_tags: Vec<(String, &str)> = (0..50)
        .map(|i| (format!("team:app{i}"), long_value.as_str()))
        .collect();
    let many_tags: Vec<(&str, &str)> = many_tags.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    // Under max_body_bytes, so that the proxy skips it rather than closing.
    let description = "d".repeat(1500);
    let create = json!({"Description": description, "Tags": tags(&[("team:owner", "payments")])});
    let encrypt = json!({"KeyId": KEY_ID, "Plaintext": {"$utf8": PLAINTEXT}});
    let calls = json!([
        {"id": "encrypt-first", "op": "Encrypt", "input": encrypt},
        {"id": "tag-too-large", "op": "TagResource",
         "input": {"KeyId": KEY_ID, "Tags": tags(&many_tags)}},
        {"id": "encrypt-after-413", "op": "Encrypt", "input": encrypt},
        {"id": "create-content-type", "op": "CreateKey", "input": create,
         "headers": {"content-type": "application/json"}},
        {"id": "create-content-encoding", "op": "CreateKey", "input": create,
         "headers": {"content-encoding": "gzip"}},
        {"id": "encrypt-after-400s", "op": "Encrypt", "input": encrypt},
        {"id": "tag-allowed", "op": "TagResource",
         "input": {"KeyId": KEY_ID, "Tags": tags(&[("team:app", "ledger")])}},
    ]);
    let results = run_driver(
        json!([scenario("early-refusals", settings, calls, false)]),
        &[],
    )
    .await;
    let idle_secs = 120; // the default idle_timeout_ms

    let encrypt_first = call(&results, "encrypt-first");
    assert_ok(encrypt_first, 1);
    assert_kept_alive(encrypt_first, idle_secs);
    assert_eq!(sockets(encrypt_first), 1);

    // 413 with Connection: close, its body never read: the agent retires the socket.
    let too_large = call(&results, "tag-too-large");
    assert_eq!(too_large["ok"], false, "{too_large:#}");
    assert_eq!(too_large["status"], 413, "{too_large:#}");
    assert_eq!(too_large["error"], "TagException", "{too_large:#}");
    assert_eq!(too_large["fault"], "client", "{too_large:#}");
    assert_eq!(too_large["attempts"], 1, "{too_large:#}");
    assert_eq!(
        response_header(too_large, "connection"),
        Some("close"),
        "{too_large:#}"
    );
    assert_eq!(response_header(too_large, "keep-alive"), None);
    assert_eq!(sockets(too_large), 1);

    let after_413 = call(&results, "encrypt-after-413");
    assert_ok(after_413, 1);
    assert_eq!(
        sockets(after_413),
        2,
        "a new socket after Connection: close"
    );

    // 400s before the body was read: the body is skipped, the connection kept.
    for id in ["create-content-type", "create-content-encoding"] {
        let refused = call(&results, id);
        assert_eq!(refused["ok"], false, "{refused:#}");
        assert_eq!(refused["status"], 400, "{refused:#}");
        assert_eq!(refused["error"], "TagException", "{refused:#}");
        assert_eq!(refused["attempts"], 1, "{refused:#}");
        assert_kept_alive(refused, idle_secs);
        assert_eq!(sockets(refused), 2, "the same socket: {refused:#}");
    }
    assert!(
        call(&results, "create-content-type")["message"]
            .as_str()
            .is_some_and(|m| m.contains("application/json")),
        "{:#}",
        call(&results, "create-content-type")
    );
    assert!(
        call(&results, "create-content-encoding")["message"]
            .as_str()
            .is_some_and(|m| m.contains("gzip")),
        "{:#}",
        call(&results, "create-content-encoding")
    );
    for id in ["encrypt-after-400s", "tag-allowed"] {
        let r = call(&results, id);
        assert_ok(r, 1);
        assert_kept_alive(r, idle_secs);
        assert_eq!(
            sockets(r),
            2,
            "the same socket after two skipped bodies: {r:#}"
        );
    }

    // Only the successful calls reached KMS, and the proxy counted each refusal once.
    let ops: Vec<String> = verified_requests(&fake, &proxy.addr.to_string())
        .iter()
        .map(|r| r.operation().unwrap().to_owned())
        .collect();
    assert_eq!(ops, ["Encrypt", "Encrypt", "Encrypt", "TagResource"]);
    assert_eq!(requests_counted(&proxy, "Encrypt", "pass").await, 3.0);
    assert_eq!(requests_counted(&proxy, "TagResource", "deny").await, 1.0);
    assert_eq!(requests_counted(&proxy, "TagResource", "allow").await, 1.0);
    assert_eq!(requests_counted(&proxy, "CreateKey", "deny").await, 1.0);
    assert_eq!(requests_counted(&proxy, "unknown", "deny").await, 1.0);
}

/// One driver run of [`idle_gaps_do_not_break_calls_on_one_agent`]: an agent with or without a
/// `timeout`, and for each of its Encrypt calls the gap (ms) before it and how many connections
/// the agent should have opened by its end.
struct IdleRun {
    name: String,
    agent_timeout: bool,
    gaps: Vec<(u64, u64)>,
}

/// Idle gaps on kept-alive agents with a single socket each and no retries (issue 11), with
/// `idle_timeout_ms = 3000`: every answer says `keep-alive: timeout=3`, and every call succeeds
/// at its first attempt, whatever the gap before it.
///
/// Node's `http.Agent` retires a free socket one second before the hint (here after 2 s), but
/// only if the agent has a `timeout` of its own: the hint can only shorten it
/// (`Agent.prototype.keepSocketAlive`, Node 20). So:
///
/// - an agent with a `timeout` (any value over the hint): a 1.5 s gap reuses the socket; after
///   2.5 s (the proxy would still hold it), 3.5 s and 4.5 s it has been retired and a new one is
///   opened. Three more such agents make calls right as the proxy closes their idle socket
///   (gaps of 2990 to 3012 ms, in steps of 2 ms): each opens a new socket and succeeds.
/// - the agent `NodeHttpHandler` builds by default (`keepAlive`, no `timeout`): the hint is
///   ignored, a 2.5 s gap reuses the socket, and after 3.5 s (the proxy closed it at 3 s, Node saw
///   the FIN) a new one is opened. Such an agent races the proxy's close: swept over gaps of
///   2994 to 3009 ms in six processes like those below, it failed 1 of 30, 5 of 36 and 5 of 36
///   calls in three runs, with `ECONNRESET` ("socket hang up"); the agent with a timeout failed
///   0 of 36. That race is not asserted (it is a race); deploy/README.md tells Node users to give
///   their agent a timeout.
///
/// Checked with the hint removed from the proxy for a trial run (its check here skipped): the
/// agent with a timeout kept its socket past 2.5 s, failing the socket counts, and in one of two
/// runs one of the 12 calls at the close failed with `ECONNRESET`.
#[tokio::test]
async fn idle_gaps_do_not_break_calls_on_one_agent() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            limits: "idle_timeout_ms = 3000".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let one_socket = |agent_timeout: bool| {
        let mut settings = client(json!({
            "endpoint": proxy.url(),
            "maxAttempts": 1,
            "keepAlive": true,
            "maxSockets": 1,
        }));
        if agent_timeout {
            settings["agentTimeoutMs"] = json!(60_000);
        }
        settings
    };
    let mut runs = vec![
        IdleRun {
            name: "agent-timeout".into(),
            agent_timeout: true,
            gaps: vec![
                (0, 1),
                (1500, 1),
                (2500, 2),
                (3500, 3),
                (4500, 4),
                (1500, 4),
            ],
        },
        IdleRun {
            name: "default-agent".into(),
            agent_timeout: false,
            gaps: vec![(0, 1), (1500, 1), (2500, 1), (3500, 2)],
        },
    ];
    for k in 0..3 {
        let gaps = (0..4).map(|i| 2990 + 2 * k + 6 * i);
        runs.push(IdleRun {
            name: format!("at-the-close-{k}"),
            agent_timeout: true,
            gaps: std::iter::once((0, 1)).chain(gaps.zip(2..)).collect(),
        });
    }
    let started = Instant::now();
    // All at once, each with its own agent and driver process, to keep the test short (~15 s).
    let handles: Vec<_> = runs
        .iter()
        .map(|run| {
            let calls: Value = run
                .gaps
                .iter()
                .enumerate()
                .map(|(i, (gap, _))| {
                    json!({"id": format!("encrypt-{i}"), "op": "Encrypt", "delayMs": gap,
                           "input": {"KeyId": KEY_ID, "Plaintext": {"$utf8": PLAINTEXT}}})
                })
                .collect();
            let settings = one_socket(run.agent_timeout);
            let scenarios = json!([scenario(&run.name, settings, calls, false)]);
            tokio::spawn(run_driver(scenarios, &[]))
        })
        .collect();
    let mut total = 0;
    for (IdleRun { name, gaps, .. }, handle) in runs.iter().zip(handles) {
        let results = handle.await.unwrap();
        assert_eq!(results.len(), gaps.len(), "{name}");
        for (i, (gap, expected)) in gaps.iter().enumerate() {
            let r = call(&results, &format!("encrypt-{i}"));
            assert_ok(r, 1);
            assert_kept_alive(r, 3);
            assert_eq!(
                sockets(r),
                *expected,
                "{name}: after a gap of {gap} ms: {r:#}\nall: {results:#?}"
            );
        }
        total += results.len();
    }
    assert_eq!(fake.count(), total);
    eprintln!(
        "idle gaps: {total} calls on {} agents, every one at its first attempt; {:.1} s",
        runs.len(),
        started.elapsed().as_secs_f64()
    );
}

// ======================================================================== HTTP/2

/// `NodeHttp2Handler` straight to the fake (no proxy), over TLS + h2 and over h2 with prior
/// knowledge on plain TCP (`http2.connect("http://...")`): it signs `:authority` instead of
/// `host`, and the fake verifies that. This proves the fake before the proxy forwards h2
/// (issue 12).
#[tokio::test]
async fn node_http2_handler_signs_authority_and_the_fake_verifies_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &["localhost"]);
    let tls_fake = pki.tls_fake().await;
    let plain_fake = FakeKms::start().await;
    let over_tls = client(json!({"endpoint": tls_fake.url(), "handler": "http2"}));
    let prior_knowledge = client(json!({"endpoint": plain_fake.url(), "handler": "http2"}));
    let results = run_driver(
        json!([
            scenario("h2", over_tls.clone(), standard_calls(), false),
            scenario("h2-parallel", over_tls, parallel_calls(), true),
            scenario("h2c", prior_knowledge, standard_calls(), false),
        ]),
        &[("NODE_EXTRA_CA_CERTS", path_str(&pki.ca_path))],
    )
    .await;
    // No proxy: every call reaches the fake and succeeds.
    for r in &results {
        assert_ok(r, 1);
    }
    assert_eq!(results.len(), 6 + 50 + 6);
    for (fake, calls) in [(&tls_fake, 6 + 50), (&plain_fake, 6)] {
        let requests = fake.requests();
        assert_eq!(requests.len(), calls);
        for r in &requests {
            assert_eq!(r.version, Version::HTTP_2);
            let credential = r.verified();
            assert_eq!(credential.signed_headers[0], ":authority");
            assert!(!credential.signs("host"), "{:?}", credential.signed_headers);
            assert_eq!(r.header("host"), None);
            assert_eq!(
                r.uri.authority().map(|a| a.as_str()),
                Some(fake.host().as_str())
            );
        }
    }
}

/// The three deployment modes (deploy/README.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    A,
    B,
    C,
}

/// [`standard_calls`] with `NodeHttp2Handler` through a proxy in `mode` whose upstream is a TLS
/// fake that speaks h2: outcomes must be those over HTTP/1.1, and the fake must have verified
/// every forwarded signature, `:authority` signed, as the client sent it.
async fn h2_through_the_proxy(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &["localhost"]);
    let fake = pki.tls_fake().await;
    let mut config = ProxyConfig {
        upstream: format!("ca_file = \"{}\"", pki.ca_path.display()),
        ..ProxyConfig::default()
    };
    let mut trusted = pki.ca_path.clone();
    match mode {
        Mode::A => {}
        Mode::B => config.listener = pki.listener(),
        Mode::C => {
            let (cert, key) = kms_tag_guard::tls::ca_init(&dir.path().join("ca")).unwrap();
            config.intercept = format!(
                "ca_cert = \"{}\"\nca_key = \"{}\"",
                cert.display(),
                key.display()
            );
            trusted = cert;
        }
    }
    let proxy = start_proxy_with(&fake, config).await;
    let (settings, authority) = match mode {
        Mode::A => (
            client(json!({"endpoint": proxy.url(), "handler": "http2"})),
            proxy.addr.to_string(),
        ),
        Mode::B => {
            let authority = format!("localhost:{}", proxy.addr.port());
            let endpoint = format!("https://{authority}");
            (
                client(json!({"endpoint": endpoint, "handler": "http2"})),
                authority,
            )
        }
        // The driver's `connect` agent: `http2.connect` takes no https agent, so the driver
        // opens the CONNECT tunnel itself.
        Mode::C => (
            client(json!({
                "handler": "http2",
                "proxy": {"url": proxy.url(), "agent": "connect"},
            })),
            KMS_HOST.to_owned(),
        ),
    };
    let results = run_driver(
        json!([scenario(
            &format!("mode-{mode:?}-h2"),
            settings,
            standard_calls(),
            false
        )]),
        &[("NODE_EXTRA_CA_CERTS", path_str(&trusted))],
    )
    .await;
    assert_ok(call(&results, "encrypt"), 1);
    assert_ok(call(&results, "decrypt"), 1);
    assert_ok(call(&results, "tag-allowed"), 1);
    assert_tag_exception(call(&results, "tag-denied"), "abac-keys");
    assert_ok(call(&results, "create-tagged"), 1);
    assert_tag_exception(call(&results, "create-untagged"), "owner-on-create");
    let requests = fake.requests();
    assert_eq!(requests.len(), 4);
    for r in &requests {
        assert!(r.verified().signs(":authority"));
        assert_eq!(
            r.uri.authority().map(|a| a.as_str()),
            Some(authority.as_str())
        );
    }
}

/// Mode A with `NodeHttp2Handler`: h2 with prior knowledge to the plain listener.
#[tokio::test]
async fn mode_a_node_http2_handler_through_the_proxy() {
    h2_through_the_proxy(Mode::A).await;
}

/// Mode B with `NodeHttp2Handler`: h2 to the TLS listener.
#[tokio::test]
async fn mode_b_node_http2_handler_through_the_proxy() {
    h2_through_the_proxy(Mode::B).await;
}

/// Mode C with `NodeHttp2Handler`: h2 inside an intercepted CONNECT tunnel.
#[tokio::test]
async fn mode_c_node_http2_handler_through_the_proxy() {
    h2_through_the_proxy(Mode::C).await;
}

/// The proxy's denials of alias changes reach JavaScript callers as the SDK's typed
/// `InvalidAliasNameException` (an instance of the exported class) on all three alias operations,
/// not retried; the allowed ones go through.
#[tokio::test]
async fn alias_denials_are_typed_invalid_alias_name_exceptions() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let calls = json!([
        { "id": "create-ok", "op": "CreateAlias",
          "input": { "AliasName": "alias/team-ledger", "TargetKeyId": KEY_ID } },
        { "id": "create-denied", "op": "CreateAlias",
          "input": { "AliasName": "alias/payments", "TargetKeyId": KEY_ID } },
        { "id": "update-denied", "op": "UpdateAlias",
          "input": { "AliasName": "alias/team-payments-db", "TargetKeyId": KEY_ID } },
        { "id": "delete-denied", "op": "DeleteAlias",
          "input": { "AliasName": "alias/team-payments-db" } },
        { "id": "reserved", "op": "CreateAlias",
          "input": { "AliasName": "alias/aws/ebs", "TargetKeyId": KEY_ID } },
    ]);
    let settings = client(json!({ "endpoint": proxy.url() }));
    let results = run_driver(json!([scenario("aliases", settings, calls, false)]), &[]).await;
    assert_ok(call(&results, "create-ok"), 1);
    for (id, rule) in [
        ("create-denied", Some("alias-namespace")),
        ("update-denied", Some("payments-aliases")),
        ("delete-denied", Some("payments-aliases")),
        ("reserved", None),
    ] {
        let result = call(&results, id);
        assert_eq!(result["ok"], false, "{result:#}");
        assert_eq!(result["error"], "InvalidAliasNameException", "{result:#}");
        assert_eq!(
            result["modeled"], true,
            "{id}: not a typed error: {result:#}"
        );
        assert_eq!(result["fault"], "client", "{result:#}");
        assert_eq!(result["status"], 400, "{result:#}");
        assert_eq!(result["attempts"], 1, "a denial is not retried: {result:#}");
        if let Some(rule) = rule {
            let message = result["message"].as_str().unwrap_or_default();
            assert!(message.contains(&format!("rule {rule}")), "{message}");
        }
    }
    let forwarded: Vec<String> = fake
        .requests()
        .iter()
        .filter_map(|r| r.operation().map(str::to_owned))
        .collect();
    assert_eq!(forwarded, ["CreateAlias"]);
}
