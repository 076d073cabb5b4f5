//! Live policy reload (contract section 3): the 5 s poll of the config file (following
//! symlinks, as a Kubernetes ConfigMap update needs), an invalid file that leaves the old policy
//! in force, `RunningProxy::reload()` (what SIGHUP does), and requests in flight during a reload.
//!
//! Each proxy is started from a config FILE, so the reloader has a file to read. Two policies
//! tell which one is in force: V1 allows the tag `team:x`, V2 forbids it.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::child::{start_child, ChildOptions, ChildProxy};
use common::ops::*;
use common::*;
use serde_json::Value;

const RELOADS: &str = "kms_tag_guard_policy_reloads_total";
const POLICY_INFO: &str = "kms_tag_guard_policy_info";

/// Forbids `legacy:a`: `team:x` is allowed.
const POLICY_V1: &str = r#"
[policy]
[[policy.rule]]
id = "v1-no-legacy"
type = "forbidden-key"
keys = ["legacy:a"]
"#;

/// Forbids `team:x`.
const POLICY_V2: &str = r#"
[policy]
[[policy.rule]]
id = "v2-no-team-x"
type = "forbidden-key"
keys = ["team:x"]
"#;

/// V2 with an error (an unknown rule type): were any of it applied, `team:x` would be denied.
const POLICY_V2_INVALID: &str = r#"
[policy]
[[policy.rule]]
id = "v2-no-team-x"
type = "forbidden-keys"
keys = ["team:x"]
"#;

/// A test directory with a fake KMS and the config text for a policy.
struct Setup {
    fake: FakeKms,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Setup {
        Setup {
            fake: FakeKms::start().await,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn config(&self, policy: &str) -> String {
        self.proxy_config(policy).render()
    }

    fn proxy_config(&self, policy: &str) -> ProxyConfig {
        ProxyConfig::with_admin(&self.fake.url(), &self.audit_path(), policy)
    }

    fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The status of `TagResource team:x=<value>`: 200 under V1, 400 under V2.
async fn team_x(proxy: &FileProxy, value: &str) -> u16 {
    call(proxy.addr, "TagResource", &tag_body(&[("team:x", value)]))
        .await
        .status
}

/// Probes every 100 ms until `team:x` is denied (V2 in force), up to `limit`; the time it took.
async fn wait_for_v2(proxy: &FileProxy, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let status = team_x(proxy, "probe").await;
        if status == 400 {
            return started.elapsed();
        }
        assert_eq!(status, 200, "V1 allows team:x");
        assert!(
            started.elapsed() < limit,
            "the new policy was not in force within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn policy_sha(m: &Scrape) -> String {
    let info = m.series(POLICY_INFO);
    assert_eq!(info.len(), 1, "one policy in force:\n{}", m.text);
    info[0].labels["sha256"].clone()
}

fn decision_for(audit: &Path, value: &str) -> Value {
    let found: Vec<Value> = proxy::read_audit(audit)
        .into_iter()
        .filter(|r| r["event"] == "decision" && r["set"].to_string().contains(value))
        .collect();
    assert_eq!(found.len(), 1, "one decision for {value}: {found:#?}");
    found.into_iter().next().unwrap()
}

fn rule_ids(decision: &Value) -> Vec<String> {
    decision["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["rule"].as_str().unwrap().to_owned())
        .collect()
}

/// (a) A file changed in place is in force within 6 s, by the poll alone.
#[tokio::test]
async fn a_changed_config_file_is_in_force_within_six_seconds() {
    let setup = Setup::new().await;
    let path = setup.path("kms-tag-guard.toml");
    std::fs::write(&path, setup.config(POLICY_V1)).unwrap();
    let proxy = start_from_file(&path).await;
    assert_eq!(team_x(&proxy, "before").await, 200);

    std::fs::write(&path, setup.config(POLICY_V2)).unwrap();
    let written = Instant::now();
    if proxy.started.elapsed() < Duration::from_secs(4) {
        // No poll has run yet: the change waits for it (there is no inotify).
        assert_eq!(team_x(&proxy, "not-yet").await, 200);
    }
    wait_for_v2(&proxy, Duration::from_secs(6)).await;
    eprintln!(
        "figure: in-place change in force {:?} after the write (poll every 5 s)",
        written.elapsed()
    );
    let m = scrape(proxy.admin_addr).await;
    assert_eq!(policy_sha(&m), sha256_file(&path));
    assert_eq!(m.get(RELOADS, &[("result", "success")]), Some(1.0));
    assert_eq!(m.count(RELOADS, &[("result", "error")]), 0.0, "{}", m.text);
}

/// (c) An invalid file leaves the old policy in force and is counted once, though the poll
/// keeps seeing it; a later valid file is applied.
#[tokio::test]
async fn an_invalid_policy_keeps_the_old_one_and_is_counted_once() {
    let setup = Setup::new().await;
    let path = setup.path("kms-tag-guard.toml");
    std::fs::write(&path, setup.config(POLICY_V1)).unwrap();
    let old_sha = sha256_file(&path);
    let proxy = start_from_file(&path).await;
    // Replaced atomically, so no poll ever reads half a file (which would count as an error).
    write_atomic(&path, &setup.config(POLICY_V2_INVALID));

    let deadline = proxy.started + Duration::from_secs(7);
    loop {
        let m = scrape(proxy.admin_addr).await;
        if m.count(RELOADS, &[("result", "error")]) >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reload error counted:\n{}",
            m.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Deliberate, the test's subject: past the second 5 s poll, which saw the same invalid file
    // (a poll that changes nothing leaves no trace to wait for).
    tokio::time::sleep_until((proxy.started + Duration::from_millis(10_700)).into()).await;
    let m = scrape(proxy.admin_addr).await;
    assert_eq!(
        m.get(RELOADS, &[("result", "error")]),
        Some(1.0),
        "{}",
        m.text
    );
    assert_eq!(m.count(RELOADS, &[("result", "success")]), 0.0);
    assert_eq!(
        policy_sha(&m),
        old_sha,
        "policy_info still names the old file"
    );
    assert_eq!(team_x(&proxy, "still-v1").await, 200, "V1 stays in force");

    write_atomic(&path, &setup.config(POLICY_V2));
    wait_for_v2(&proxy, Duration::from_secs(7)).await;
    let m = scrape(proxy.admin_addr).await;
    assert_eq!(m.get(RELOADS, &[("result", "success")]), Some(1.0));
    assert_eq!(m.get(RELOADS, &[("result", "error")]), Some(1.0));
    assert_eq!(policy_sha(&m), sha256_file(&path));
    assert_ne!(sha256_file(&path), old_sha);
}

/// (e) A request is judged by the policy in force when its HEAD arrived: `inspect` loads the
/// policy (`shared.policy.load_full()`) as soon as hyper hands it the parsed head, before it
/// reads the body. So a reload that lands while the body is still arriving does not touch that
/// request, and a request whose head is still incomplete at the reload gets the new policy. The
/// policy is per request, not per connection: the next request on the same connection gets the
/// new one.
#[tokio::test]
async fn in_flight_requests_are_judged_by_the_policy_their_head_met() {
    let setup = Setup::new().await;
    let path = setup.path("kms-tag-guard.toml");
    std::fs::write(&path, setup.config(POLICY_V1)).unwrap();
    let v1_sha = sha256_file(&path);
    let proxy = start_from_file(&path).await;
    let audit = setup.audit_path();

    // A: allowed by V1, denied by V2. B: violates V1 and V2, each by a rule of its own, so its
    // violations say which policy judged it (a mix would name both, or neither).
    let a = signed(
        proxy.addr,
        "TagResource",
        &tag_body(&[("team:x", "held-a")]),
    );
    let b = signed(
        proxy.addr,
        "TagResource",
        &tag_body(&[("team:x", "held-b"), ("legacy:a", "y")]),
    );
    // C: its head is only half sent when the reload lands.
    let c = signed(
        proxy.addr,
        "TagResource",
        &tag_body(&[("team:x", "held-c")]),
    );
    let split = |r: &RawRequest| {
        let head = r.head_bytes().len();
        (r.to_bytes(), head + r.body.len() / 2)
    };
    let (a_bytes, a_split) = split(&a);
    let (b_bytes, b_split) = split(&b);
    let c_bytes = c.to_bytes();
    let c_split = c.head_bytes().len() / 2;

    let mut conn_a = RawConn::connect(proxy.addr).await.unwrap();
    let mut conn_b = RawConn::connect(proxy.addr).await.unwrap();
    let mut conn_c = RawConn::connect(proxy.addr).await.unwrap();
    conn_a.write(&a_bytes[..a_split]).await.unwrap();
    conn_b.write(&b_bytes[..b_split]).await.unwrap();
    conn_c.write(&c_bytes[..c_split]).await.unwrap();
    // Deliberate: generous time for the proxy to parse the heads of A and B and judge them by
    // the policy in force; nothing outside the proxy shows that it has, so there is no
    // condition to poll.
    tokio::time::sleep(Duration::from_millis(500)).await;

    write_atomic(&path, &setup.config(POLICY_V2));
    let v2_sha = sha256_file(&path);
    proxy.proxy.reload();
    wait_for_v2(&proxy, Duration::from_secs(3)).await;

    conn_a.write(&a_bytes[a_split..]).await.unwrap();
    conn_b.write(&b_bytes[b_split..]).await.unwrap();
    conn_c.write(&c_bytes[c_split..]).await.unwrap();
    let answer_a = conn_a.read_response().await.unwrap();
    let answer_b = conn_b.read_response().await.unwrap();
    let answer_c = conn_c.read_response().await.unwrap();

    assert_eq!(
        answer_a.status,
        200,
        "A was judged by V1: {}",
        answer_a.body_str()
    );
    let forwarded = setup
        .fake
        .requests()
        .iter()
        .any(|r| r.json()["Tags"][0]["TagValue"] == "held-a");
    assert!(forwarded, "A reached KMS");
    let record_a = decision_for(&audit, "held-a");
    assert_eq!(record_a["decision"], "allow");
    assert!(rule_ids(&record_a).is_empty());

    assert_eq!(answer_b.status, 400, "{}", answer_b.body_str());
    let message = answer_b.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("v1-no-legacy"), "{message}");
    assert!(!message.contains("v2-no-team-x"), "{message}");
    let record_b = decision_for(&audit, "held-b");
    assert_eq!(record_b["decision"], "deny");
    assert_eq!(
        rule_ids(&record_b),
        ["v1-no-legacy"],
        "B judged by V1 alone"
    );

    assert_eq!(answer_c.status, 400, "{}", answer_c.body_str());
    let record_c = decision_for(&audit, "held-c");
    assert_eq!(rule_ids(&record_c), ["v2-no-team-x"], "C judged by V2");
    // Each record names the policy that judged it, though all were written after the reload.
    assert_ne!(v1_sha, v2_sha);
    assert_eq!(record_a["policy_sha256"], v1_sha.as_str(), "{record_a}");
    assert_eq!(record_b["policy_sha256"], v1_sha.as_str(), "{record_b}");
    assert_eq!(record_c["policy_sha256"], v2_sha.as_str(), "{record_c}");
    let metrics = scrape(proxy.admin_addr).await;
    assert_eq!(
        policy_sha(&metrics),
        v2_sha,
        "the metric shows the same digest"
    );

    // The next request on A's connection meets V2.
    let again = signed(
        proxy.addr,
        "TagResource",
        &tag_body(&[("team:x", "again-a")]),
    );
    conn_a.write(&again.to_bytes()).await.unwrap();
    let answer = conn_a.read_response().await.unwrap();
    assert_eq!(answer.status, 400, "{}", answer.body_str());
    let again = decision_for(&audit, "again-a");
    assert_eq!(rule_ids(&again), ["v2-no-team-x"]);
    assert_eq!(again["policy_sha256"], v2_sha.as_str());
}

/// (b) A Kubernetes ConfigMap update: the proxy is given `dir/config.toml`, a symlink through
/// `..data` to a timestamped directory; the kubelet writes a new directory and renames a new
/// `..data` link over the old one.
#[tokio::test]
async fn kubernetes_configmap_update_is_followed() {
    use std::os::unix::fs::symlink;
    let setup = Setup::new().await;
    let mount = setup.path("configmap");
    std::fs::create_dir_all(mount.join("..2026_01")).unwrap();
    std::fs::write(mount.join("..2026_01/config.toml"), setup.config(POLICY_V1)).unwrap();
    symlink("..2026_01", mount.join("..data")).unwrap();
    symlink("..data/config.toml", mount.join("config.toml")).unwrap();
    let proxy = start_from_file(&mount.join("config.toml")).await;
    assert_eq!(team_x(&proxy, "before").await, 200);

    std::fs::create_dir_all(mount.join("..2026_02")).unwrap();
    std::fs::write(mount.join("..2026_02/config.toml"), setup.config(POLICY_V2)).unwrap();
    symlink("..2026_02", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    std::fs::remove_dir_all(mount.join("..2026_01")).unwrap();
    assert_eq!(
        std::fs::read_link(mount.join("config.toml")).unwrap(),
        Path::new("..data/config.toml"),
        "the file the proxy was given is the same symlink"
    );

    let took = wait_for_v2(&proxy, Duration::from_secs(6)).await;
    eprintln!("figure: ConfigMap update in force {took:?} after the ..data swap");
    let m = scrape(proxy.admin_addr).await;
    assert_eq!(
        policy_sha(&m),
        sha256_file(&mount.join("..2026_02/config.toml"))
    );
    assert_eq!(m.get(RELOADS, &[("result", "success")]), Some(1.0));
    assert_eq!(m.count(RELOADS, &[("result", "error")]), 0.0);
}

/// (d) `RunningProxy::reload()` (SIGHUP) applies a change at once, long before the poll would;
/// only `[policy]` reloads, so a changed `[limits]` waits for a restart. It also reopens the
/// audit file.
#[tokio::test]
async fn reload_applies_a_change_at_once_and_reopens_the_audit_file() {
    let setup = Setup::new().await;
    let path = setup.path("kms-tag-guard.toml");
    std::fs::write(&path, setup.config(POLICY_V1)).unwrap();
    let proxy = start_from_file(&path).await;
    assert_eq!(team_x(&proxy, "before").await, 200);

    // V2, and a [limits] change that only a restart applies.
    let mut changed = setup.proxy_config(POLICY_V2);
    changed.limits = "max_body_bytes = 16".into();
    write_atomic(&path, &changed.render());
    proxy.proxy.reload();
    let took = wait_for_v2(&proxy, Duration::from_secs(2)).await;
    assert!(
        proxy.started.elapsed() < Duration::from_millis(4500),
        "too slow to tell reload() from the 5 s poll"
    );
    eprintln!("figure: reload() in force within {took:?}");
    let m = scrape(proxy.admin_addr).await;
    assert_eq!(policy_sha(&m), sha256_file(&path));
    assert_eq!(m.get(RELOADS, &[("result", "success")]), Some(1.0));
    // A 60-byte tag change allowed by V2 is not refused as too large: max_body_bytes needs a
    // restart.
    let allowed = call(proxy.addr, "TagResource", &tag_body(&[("team:y", "z")])).await;
    assert_eq!(allowed.status, 200, "{}", allowed.body_str());

    // logrotate: move the file, reload; later records go to a new file at the path.
    let audit = setup.audit_path();
    let rotated = setup.path("audit.log.1");
    // The last change's outcome is made before the file moves (it is made right after the
    // answer; one made after the reopen would rightly go to the new file).
    assert!(outcome_made(proxy.admin_addr, &audit).await);
    std::fs::rename(&audit, &rotated).unwrap();
    proxy.proxy.reload();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !audit.exists() {
        assert!(Instant::now() < deadline, "the audit file was not reopened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Records queued before the reopen (an outcome is queued, not waited for) went to the
    // old file; nothing after it does.
    let before = proxy::read_audit(&rotated).len();
    let after = call(
        proxy.addr,
        "TagResource",
        &tag_body(&[("team:y", "rotated")]),
    )
    .await;
    assert_eq!(after.status, 200);
    // The decision and the outcome (queued, not waited for: it may come a moment later).
    assert!(
        poll_until(Duration::from_secs(5), || proxy::read_audit(&audit).len()
            >= 2)
        .await
    );
    assert_eq!(proxy::read_audit(&rotated).len(), before);
    let fresh = proxy::read_audit(&audit);
    assert_eq!(fresh.len(), 2, "{fresh:#?}");
    assert!(fresh[0]["set"].to_string().contains("rotated"));
}

/// A config file edited in place (`>`, `std::fs::write`, most editors without a backup copy) is
/// empty for a moment between the truncation and the write. A poll (or SIGHUP) that reads it
/// then must not put a policy without rules in force: an empty file is a valid configuration
/// (every key has a default, `check` says `ok: 0 rules`), so today the reload applies it and
/// every tag change is allowed until the next poll. Simulated here by reloading an empty file.
#[tokio::test]
async fn a_config_file_read_mid_rewrite_does_not_empty_the_policy() {
    let setup = Setup::new().await;
    let path = setup.path("kms-tag-guard.toml");
    std::fs::write(&path, setup.config(proxy::TEST_POLICY)).unwrap();
    let proxy = start_from_file(&path).await;
    let forbidden = tag_body(&[("Project", "x")]);
    assert_eq!(
        call(proxy.addr, "TagResource", &forbidden).await.status,
        400
    );

    std::fs::write(&path, "").unwrap();
    proxy.proxy.reload();
    // Wait until the reload has been handled one way or the other.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let m = scrape(proxy.admin_addr).await;
        if m.sum(RELOADS) >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "reload() not handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = call(proxy.addr, "TagResource", &forbidden).await;
    assert_eq!(
        answer.status, 400,
        "an ABAC tag went through after reading an empty file"
    );
}

/// The real binary: a config file or listener certificate that becomes a FIFO (or too large a
/// file) is refused with a log line naming it, and the process keeps accepting, answering
/// `/healthz`, serving requests and obeying SIGTERM. (Reading a FIFO blocks until a writer
/// comes; read on the thread that accepts, it stopped all of that.)
#[tokio::test]
async fn a_config_or_certificate_that_becomes_a_fifo_stops_nothing() {
    let setup = Setup::new().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (setup.path("tls.crt"), setup.path("tls.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let mut config = setup.proxy_config(POLICY_V1);
    config.listener = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        cert_path.display(),
        key_path.display()
    );
    let mut serve = start_child(ChildOptions::with_config(config.clone())).await;
    let (tls_listener, admin) = (serve.addr, serve.admin());
    let path = serve.config_path.clone();

    let mkfifo = |at: &Path| {
        let status = std::process::Command::new("mkfifo")
            .arg(at)
            .status()
            .unwrap();
        assert!(status.success());
    };
    let wait_for_log = |serve: &ChildProxy, needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = serve.stderr();
            if log.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let still_serving = |what: &'static str| async move {
        let health = tokio::time::timeout(Duration::from_secs(5), admin_get(admin, "/healthz"))
            .await
            .unwrap_or_else(|_| panic!("/healthz stalled after {what}"));
        assert_eq!(health.status, 200, "after {what}");
        let metrics = tokio::time::timeout(Duration::from_secs(5), scrape(admin))
            .await
            .unwrap_or_else(|_| panic!("/metrics stalled after {what}"));
        assert!(
            metrics.sum(RELOADS) >= 1.0,
            "after {what}: the refusal is counted"
        );
    };

    // The config file: swapped for a FIFO (rename, as a ConfigMap update swaps files), SIGHUP.
    let fifo = setup.path("config.fifo");
    mkfifo(&fifo);
    std::fs::rename(&fifo, &path).unwrap();
    serve.signal("HUP");
    wait_for_log(&serve, "is a FIFO (named pipe), not a regular file");
    still_serving("a FIFO config").await;

    // Too large a config file: refused without being read whole.
    std::fs::remove_file(&path).unwrap();
    let mut big = config.render();
    big.push_str(&"# padding\n".repeat(120_000));
    std::fs::write(&path, big).unwrap();
    serve.signal("HUP");
    wait_for_log(&serve, "more than the 1048576 bytes");
    still_serving("a 1.2 MB config").await;

    // The listener certificate: swapped for a FIFO, then picked up by SIGHUP.
    let fifo = setup.path("cert.fifo");
    mkfifo(&fifo);
    std::fs::rename(&fifo, &cert_path).unwrap();
    serve.signal("HUP");
    wait_for_log(&serve, "listener certificate not reloaded");
    assert!(
        serve.stderr().contains("tls.crt is a FIFO"),
        "{}",
        serve.stderr()
    );
    still_serving("a FIFO certificate").await;
    // A TLS handshake with the certificate still in use.
    let tcp = tokio::net::TcpStream::connect(&tls_listener).await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, tcp),
    )
    .await
    .expect("TLS handshake stalled")
    .expect("the previous certificate is still served");

    serve.signal("TERM");
    let exited = serve.wait_exit(Duration::from_secs(10)).await;
    let (status, _) =
        exited.unwrap_or_else(|| panic!("no exit after SIGTERM:\n{}", serve.stderr()));
    assert!(status.success(), "{status}:\n{}", serve.stderr());
}

/// The imported AWS Organizations tag policy (`[policy].org_tag_policy`) reloads with its own
/// file: a changed tag policy is in force by the poll alone though the config file is unchanged,
/// and an invalid one (an authored policy) leaves the last good one in force.
#[tokio::test]
async fn a_changed_tag_policy_file_is_in_force_by_the_poll_alone() {
    let setup = Setup::new().await;
    let org = setup.path("effective-tag-policy.json");
    // V1: team:x may hold any value; V2: only "a" (so every probe, "probe", is denied).
    let v1 = r#"{"tags":{"team:x":{"tag_key":"team:x","enforced_for":["kms:key"]}}}"#;
    let v2 =
        r#"{"tags":{"team:x":{"tag_key":"team:x","tag_value":["a"],"enforced_for":["kms:key"]}}}"#;
    std::fs::write(&org, v1).unwrap();
    let path = setup.path("kms-tag-guard.toml");
    std::fs::write(
        &path,
        setup.config("[policy]\norg_tag_policy = \"effective-tag-policy.json\"\n"),
    )
    .unwrap();
    let proxy = start_from_file(&path).await;
    assert_eq!(team_x(&proxy, "before").await, 200);

    // An authored policy is refused: the V1 rules stay in force.
    std::fs::write(
        &org,
        r#"{"tags":{"team:x":{"tag_value":{"@@assign":["a"]}}}}"#,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(7);
    loop {
        let m = scrape(proxy.admin_addr).await;
        if m.count(RELOADS, &[("result", "error")]) >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the authored tag policy was not seen:\n{}",
            m.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(team_x(&proxy, "still-v1").await, 200);

    write_atomic(&org, v2);
    wait_for_v2(&proxy, Duration::from_secs(7)).await;
    let denied = proxy::read_audit(&setup.audit_path())
        .into_iter()
        .rfind(|r| r["event"] == "decision" && r["decision"] == "deny")
        .expect("the denial is recorded");
    assert_eq!(rule_ids(&denied), ["org:team:x"]);
    let m = scrape(proxy.admin_addr).await;
    assert_eq!(m.get(RELOADS, &[("result", "success")]), Some(1.0));
}

/// A config change that names a tag policy file which is not valid yet is refused; the file is
/// watched from then on, so fixing the file alone (the config untouched) applies the policy.
#[tokio::test]
async fn a_newly_named_tag_policy_file_is_watched_even_while_invalid() {
    let setup = Setup::new().await;
    let path = setup.path("kms-tag-guard.toml");
    std::fs::write(&path, setup.config(POLICY_V1)).unwrap();
    let proxy = start_from_file(&path).await;
    assert_eq!(team_x(&proxy, "before").await, 200);

    let org = setup.path("effective-tag-policy.json");
    std::fs::write(
        &org,
        r#"{"tags":{"team:x":{"tag_value":{"@@assign":["a"]}}}}"#,
    )
    .unwrap();
    write_atomic(
        &path,
        &setup.config("[policy]\norg_tag_policy = \"effective-tag-policy.json\"\n"),
    );
    proxy.proxy.reload();
    let m = scrape_when(proxy.admin_addr, |m| {
        m.count(RELOADS, &[("result", "error")]) >= 1.0
    })
    .await;
    assert_eq!(m.count(RELOADS, &[("result", "error")]), 1.0, "{}", m.text);
    assert_eq!(team_x(&proxy, "still-v1").await, 200);

    write_atomic(
        &org,
        r#"{"tags":{"team:x":{"tag_key":"team:x","tag_value":["a"],"enforced_for":["kms:key"]}}}"#,
    );
    wait_for_v2(&proxy, Duration::from_secs(12)).await;
}
