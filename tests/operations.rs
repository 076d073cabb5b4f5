//! Operating the proxy: the admin port and its metrics (contract section 8), the audit log under
//! concurrent writers and across log rotation (section 5), and an upstream that breaks off or
//! restarts.
//!
//! Metrics are checked by scraping `/metrics` and parsing the OpenMetrics text
//! (`common::ops::Scrape`), and compared exactly: every request a test sends is accounted for.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kms::error::ProvideErrorMetadata;
use aws_sdk_kms::primitives::Blob;
use common::child::{start_child, ChildOptions};
use common::ops::*;
use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

const REQUESTS: &str = "kms_tag_guard_requests_total";
const DURATION_COUNT: &str = "kms_tag_guard_request_duration_seconds_count";
const DURATION_BUCKET: &str = "kms_tag_guard_request_duration_seconds_bucket";
const UPSTREAM_ERRORS: &str = "kms_tag_guard_upstream_errors_total";
const AUDIT_FAILURES: &str = "kms_tag_guard_audit_write_failures_total";
const POLICY_INFO: &str = "kms_tag_guard_policy_info";
const RELOADS: &str = "kms_tag_guard_policy_reloads_total";

/// Asserts `kms_tag_guard_requests_total` holds exactly these series and values.
fn assert_requests(m: &Scrape, expected: &[(&str, &str, u32)]) {
    for (operation, decision, n) in expected {
        assert_eq!(
            m.get(
                REQUESTS,
                &[("operation", operation), ("decision", decision)]
            ),
            Some(f64::from(*n)),
            "{REQUESTS}{{operation={operation},decision={decision}}}\n{}",
            m.text
        );
    }
    assert_eq!(
        m.series(REQUESTS).len(),
        expected.len(),
        "unexpected {REQUESTS} series:\n{}",
        m.text
    );
}

/// Asserts the duration histogram counted exactly `pass` and `inspect` requests, and that its
/// `+Inf` buckets agree with its counts.
fn assert_classes(m: &Scrape, pass: u32, inspect: u32) {
    for (class, n) in [("pass", pass), ("inspect", inspect)] {
        let count = m.count(DURATION_COUNT, &[("class", class)]);
        assert_eq!(count, f64::from(n), "class {class}\n{}", m.text);
        if n > 0 {
            assert_eq!(
                m.get(DURATION_BUCKET, &[("class", class), ("le", "+Inf")]),
                Some(count),
                "{}",
                m.text
            );
        }
    }
}

fn assert_policy_info(m: &Scrape, sha256: &str) {
    let info = m.series(POLICY_INFO);
    assert_eq!(info.len(), 1, "one policy in force:\n{}", m.text);
    assert_eq!(
        info[0].labels.get("sha256").map(String::as_str),
        Some(sha256)
    );
    assert_eq!(info[0].value, 1.0);
}

fn records(path: &std::path::Path, event: &str) -> Vec<Value> {
    proxy::read_audit(path)
        .into_iter()
        .filter(|r| r["event"] == event)
        .collect()
}

// ---------------------------------------------------------------------------- admin port

#[tokio::test]
async fn the_admin_port_serves_health_readiness_and_metrics() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            admin: true,
            shutdown: "drain_delay_ms = 1000".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let admin = proxy.admin_addr.expect("an admin port");
    assert_ne!(admin, proxy.addr, "the admin port is a listener of its own");

    let health = admin_get(admin, "/healthz").await;
    assert_eq!(health.status, 200);
    let ready = admin_get(admin, "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body_str());

    let metrics = admin_get(admin, "/metrics").await;
    assert_eq!(metrics.status, 200);
    let content_type = metrics.header("content-type").unwrap_or("");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let scrape = Scrape::parse(&metrics.body_str());
    for (family, kind) in [
        ("kms_tag_guard_requests", "counter"),
        ("kms_tag_guard_request_duration_seconds", "histogram"),
        ("kms_tag_guard_upstream_errors", "counter"),
        ("kms_tag_guard_policy_reloads", "counter"),
        ("kms_tag_guard_audit_write_failures", "counter"),
        ("kms_tag_guard_policy_info", "gauge"),
    ] {
        let declared = format!("# TYPE {family} {kind}");
        assert!(
            scrape.text.lines().any(|l| l == declared),
            "{declared} missing:\n{}",
            scrape.text
        );
    }
    assert_eq!(scrape.get(AUDIT_FAILURES, &[]), Some(0.0));
    assert_eq!(scrape.series(POLICY_INFO).len(), 1);

    assert_eq!(admin_get(admin, "/other").await.status, 404);
    let post = raw::send(
        admin,
        format!("POST /metrics HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(post.status, 405);

    // Draining: /readyz fails at once, /healthz still answers while the process serves.
    proxy.proxy.shutdown();
    let ready = admin_get(admin, "/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.body_str());
    assert_eq!(admin_get(admin, "/healthz").await.status, 200);
    tokio::time::timeout(Duration::from_secs(10), proxy.proxy.wait())
        .await
        .expect("the proxy stops after the drain delay");
    assert!(
        try_admin_get(admin, "/healthz").await.is_err(),
        "the admin port closes with the proxy"
    );
}

/// The issue's mixed workload, with every counter compared exactly.
#[tokio::test]
async fn metrics_count_a_mixed_workload_exactly() {
    let fake = FakeKms::start().await;
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.log");
    let mut config = ProxyConfig::with_admin(&fake.url(), &audit_path, TEST_POLICY);
    config.upstream = "timeout_ms = 500".into();
    let config_path = dir.path().join("kms-tag-guard.toml");
    std::fs::write(&config_path, config.render()).unwrap();
    let proxy = start_from_file(&config_path).await;
    let admin = proxy.admin_addr;
    let sha256 = sha256_file(&config_path);

    let before = scrape(admin).await;
    assert_eq!(before.sum(REQUESTS), 0.0, "{}", before.text);
    assert_eq!(before.sum(DURATION_COUNT), 0.0);
    assert!(before.series(UPSTREAM_ERRORS).is_empty());
    assert_eq!(before.get(AUDIT_FAILURES, &[]), Some(0.0));
    assert_policy_info(&before, &sha256);

    let kms = kms_client(&proxy.url());
    // Pass-through: 3 Encrypt, 2 ListKeys.
    for _ in 0..3 {
        kms.encrypt()
            .key_id(KEY)
            .plaintext(Blob::new(b"x".to_vec()))
            .send()
            .await
            .unwrap();
    }
    for _ in 0..2 {
        kms.list_keys().send().await.unwrap();
    }
    // Tag changes: 2 allowed, 1 TagResource and 1 UntagResource denied by the policy.
    for value in ["payments", "billing"] {
        kms.tag_resource()
            .key_id(KEY)
            .tags(tag("team:owner", value))
            .send()
            .await
            .unwrap();
    }
    let denied = kms
        .tag_resource()
        .key_id(KEY)
        .tags(tag("Project", "x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Some("TagException"));
    let denied = kms
        .untag_resource()
        .key_id(KEY)
        .tag_keys("Project")
        .send()
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Some("TagException"));
    // An unreadable tag request: a repeated member.
    let unreadable = call(
        proxy.addr,
        "TagResource",
        r#"{"KeyId":"k","KeyId":"k","Tags":[{"TagKey":"team:a","TagValue":"b"}]}"#,
    )
    .await;
    assert_eq!(unreadable.status, 400, "{}", unreadable.body_str());
    assert_eq!(unreadable.header("x-kms-tag-guard"), Some("reject"));
    // Upstream timeouts: one pass-through, one allowed tag change.
    fake.set_delay(Duration::from_secs(2));
    let late = call(proxy.addr, "ListKeys", "{}").await;
    assert_eq!(late.status, 504, "{}", late.body_str());
    let late = call(proxy.addr, "TagResource", &tag_body(&[("team:late", "x")])).await;
    assert_eq!(late.status, 504, "{}", late.body_str());
    fake.set_delay(Duration::ZERO);
    // An upstream connect failure: KMS is gone.
    fake.shutdown().await;
    let gone = call(proxy.addr, "Encrypt", &encrypt_body()).await;
    assert_eq!(gone.status, 502, "{}", gone.body_str());

    let m = scrape(admin).await;
    assert_requests(
        &m,
        &[
            ("Encrypt", "pass", 3),
            ("Encrypt", "error", 1),
            ("ListKeys", "pass", 2),
            ("ListKeys", "error", 1),
            ("TagResource", "allow", 2),
            ("TagResource", "deny", 2),
            ("TagResource", "error", 1),
            ("UntagResource", "deny", 1),
        ],
    );
    assert_classes(&m, 7, 6);
    assert_eq!(m.get(UPSTREAM_ERRORS, &[("kind", "timeout")]), Some(2.0));
    assert_eq!(m.get(UPSTREAM_ERRORS, &[("kind", "connect")]), Some(1.0));
    assert_eq!(m.series(UPSTREAM_ERRORS).len(), 2, "{}", m.text);
    assert_eq!(m.get(AUDIT_FAILURES, &[]), Some(0.0));
    assert_policy_info(&m, &sha256);
    assert!(
        m.series(RELOADS).is_empty(),
        "no reload happened:\n{}",
        m.text
    );

    // The audit log agrees: 6 decisions (3 allow incl. the timed-out one, 3 deny), 3 outcomes.
    proxy::settled_audit(&audit_path).await;
    let decisions = records(&audit_path, "decision");
    let allow = decisions
        .iter()
        .filter(|r| r["decision"] == "allow")
        .count();
    assert_eq!((decisions.len(), allow), (6, 3), "{decisions:#?}");
    let outcomes = records(&audit_path, "outcome");
    assert_eq!(outcomes.len(), 3, "{outcomes:#?}");
    assert_eq!(
        outcomes
            .iter()
            .filter(|r| r["aws_error"] == "GatewayTimeout")
            .count(),
        1
    );

    // A 421 needs a proxy without a fixed endpoint: it checks the Host against allowed_hosts.
    let dir_b = tempfile::tempdir().unwrap();
    let config_b = ProxyConfig::with_admin("", &dir_b.path().join("audit.log"), TEST_POLICY);
    let path_b = dir_b.path().join("kms-tag-guard.toml");
    std::fs::write(&path_b, config_b.render()).unwrap();
    let b = start_from_file(&path_b).await;
    for (operation, body) in [
        ("Encrypt", encrypt_body()),
        ("TagResource", tag_body(&[("team:a", "b")])),
    ] {
        let request = RawRequest::signed_kms(
            "kms.evil.example.com",
            &format!("TrentService.{operation}"),
            body.as_bytes(),
        );
        let response = raw::send(b.addr, &request.to_bytes()).await;
        assert_eq!(response.status, 421, "{}", response.body_str());
        assert_eq!(response.json()["__type"], "MisdirectedRequest");
    }
    let m = scrape(b.admin_addr).await;
    assert_requests(&m, &[("Encrypt", "deny", 1), ("TagResource", "deny", 1)]);
    assert_classes(&m, 1, 1);
    assert!(m.series(UPSTREAM_ERRORS).is_empty(), "{}", m.text);
    assert_policy_info(&m, &sha256_file(&path_b));
    assert_ne!(sha256_file(&path_b), sha256);
}

/// `kms_tag_guard_audit_write_failures_total`, with the audit log on a full disk (`/dev/full`).
#[tokio::test]
async fn audit_write_failures_are_counted() {
    let fake = FakeKms::start().await;
    // fail_closed (the default): tag changes are refused with 503, pass-through is unaffected.
    let closed = start_proxy_with(
        &fake,
        ProxyConfig {
            admin: true,
            audit_path: Some("/dev/full".into()),
            ..ProxyConfig::default()
        },
    )
    .await;
    let allowed = call(closed.addr, "TagResource", &tag_body(&[("team:a", "b")])).await;
    assert_eq!(allowed.status, 503, "{}", allowed.body_str());
    assert_eq!(allowed.json()["__type"], "ServiceUnavailable");
    let denied = call(closed.addr, "TagResource", &tag_body(&[("Project", "b")])).await;
    assert_eq!(denied.status, 503, "{}", denied.body_str());
    let pass = call(closed.addr, "Encrypt", &encrypt_body()).await;
    assert_eq!(pass.status, 200, "{}", pass.body_str());
    assert_eq!(fake.count(), 1, "no tag change reached KMS unaudited");
    // The pass-through request is counted once its answer has gone out.
    let m = scrape_when(closed.admin_addr.unwrap(), |m| {
        m.get(REQUESTS, &[("operation", "Encrypt"), ("decision", "pass")])
            .is_some()
    })
    .await;
    // The allowed change's decision, the outcome that says it was not forwarded (both kept, to
    // be written when the sink recovers), and the denied change's decision.
    assert_eq!(m.get(AUDIT_FAILURES, &[]), Some(3.0), "{}", m.text);
    assert_requests(&m, &[("TagResource", "error", 2), ("Encrypt", "pass", 1)]);

    // fail_closed = false: the change goes ahead, and both of its records are counted as lost.
    let open = start_proxy_with(
        &fake,
        ProxyConfig {
            admin: true,
            audit_path: Some("/dev/full".into()),
            audit: "fail_closed = false".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let allowed = call(open.addr, "TagResource", &tag_body(&[("team:a", "b")])).await;
    assert_eq!(allowed.status, 200, "{}", allowed.body_str());
    let denied = call(open.addr, "TagResource", &tag_body(&[("Project", "b")])).await;
    assert_eq!(denied.status, 400, "{}", denied.body_str());
    let m = scrape(open.admin_addr.unwrap()).await;
    // decision + outcome of the allowed change, decision of the denied one.
    assert_eq!(m.get(AUDIT_FAILURES, &[]), Some(3.0), "{}", m.text);
    assert_requests(
        &m,
        &[("TagResource", "allow", 1), ("TagResource", "deny", 1)],
    );
}

// ---------------------------------------------------------------------- audit under load

/// `writers` tasks, each on its own keep-alive connection, send `per_writer` TagResource
/// requests, alternately allowed and denied, each with a tag value naming it. Returns the
/// values sent as (value, allowed).
async fn tag_storm(addr: SocketAddr, writers: usize, per_writer: usize) -> Vec<(String, bool)> {
    let mut tasks = JoinSet::new();
    for w in 0..writers {
        tasks.spawn(async move {
            let mut conn = RawConn::connect(addr).await.expect("connect");
            let mut sent = Vec::new();
            for i in 0..per_writer {
                let value = format!("w{w}-r{i}");
                let allowed = (w + i) % 2 == 0;
                let key = if allowed { "team:writer" } else { "Project" };
                let request = signed(addr, "TagResource", &tag_body(&[(key, &value)]));
                conn.write(&request.to_bytes()).await.expect("write");
                let response = conn.read_response().await.expect("an answer");
                let expected = if allowed { 200 } else { 400 };
                assert_eq!(
                    response.status,
                    expected,
                    "{value}: {}",
                    response.body_str()
                );
                sent.push((value, allowed));
            }
            sent
        });
    }
    let mut all = Vec::new();
    while let Some(sent) = tasks.join_next().await {
        all.extend(sent.expect("writer task"));
    }
    all
}

/// Checks the audit file against what was sent: every line one JSON object, one decision per
/// request with the right verdict, one outcome per allowed request, nothing else.
async fn check_audit_file(path: &std::path::Path, sent: &[(String, bool)]) {
    // Outcome records are queued after the answer goes out.
    proxy::settled_audit(path).await;
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.ends_with('\n'), "the last record is a whole line");
    let mut decisions: BTreeMap<String, (String, bool)> = BTreeMap::new();
    let mut outcomes: BTreeSet<String> = BTreeSet::new();
    // One chain through every line, in the file's order, however many wrote at once.
    let mut prev = (0, [0u8; 32]);
    for line in text.split_inclusive('\n') {
        use kms_tag_guard::integrity::{chain::parse_seal, line_hash};
        assert_eq!(parse_seal(line.as_bytes()), Some(prev), "{line}");
        prev = (prev.0 + 1, line_hash(line.as_bytes()));
    }
    for line in text.lines() {
        let record: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line:?}"));
        let object = record.as_object().expect("a JSON object");
        let id = record["request_id"]
            .as_str()
            .expect("request_id")
            .to_owned();
        match record["event"].as_str() {
            Some("decision") => {
                assert_eq!(
                    object.len(),
                    16,
                    "decision fields (policy_sha256, the chain's seq and prev too): {line}"
                );
                let value = record["set"][0]["value"].as_str().unwrap().to_owned();
                let allowed = match record["decision"].as_str() {
                    Some("allow") => true,
                    Some("deny") => false,
                    other => panic!("decision {other:?}"),
                };
                assert!(
                    decisions.insert(id, (value, allowed)).is_none(),
                    "request_id twice"
                );
            }
            Some("outcome") => {
                assert_eq!(record["upstream_status"], 200, "{line}");
                assert!(outcomes.insert(id), "two outcomes for one request: {line}");
            }
            other => panic!("event {other:?}: {line}"),
        }
    }
    assert_eq!(decisions.len(), sent.len(), "one decision per request");
    let mut recorded: Vec<(String, bool)> = decisions.values().cloned().collect();
    let mut expected = sent.to_vec();
    recorded.sort();
    expected.sort();
    assert_eq!(recorded, expected, "each request's own decision, once");
    let allowed_ids: BTreeSet<String> = decisions
        .iter()
        .filter(|(_, (_, allowed))| *allowed)
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(outcomes, allowed_ids, "an outcome for each allowed request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_writers_lose_and_mangle_no_audit_record() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(&fake, ProxyConfig::default()).await;
    let started = Instant::now();
    let sent = tag_storm(proxy.addr, 64, 10).await;
    let elapsed = started.elapsed();
    assert_eq!(sent.len(), 640);
    check_audit_file(&proxy.audit_path, &sent).await;
    let forwarded: BTreeSet<String> = fake
        .requests()
        .iter()
        .map(|r| r.json()["Tags"][0]["TagValue"].as_str().unwrap().to_owned())
        .collect();
    let allowed: BTreeSet<String> = sent
        .iter()
        .filter(|(_, a)| *a)
        .map(|(v, _)| v.clone())
        .collect();
    assert_eq!(
        forwarded, allowed,
        "exactly the allowed changes reached KMS"
    );
    assert_eq!(fake.count(), 320);
    eprintln!(
        "figure: 64 writers x 10 tag changes (320 allowed, 320 denied, 960 audit records) in {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_with_fsync_lose_no_audit_record() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            audit: "fsync = true".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let started = Instant::now();
    let sent = tag_storm(proxy.addr, 32, 4).await;
    let elapsed = started.elapsed();
    check_audit_file(&proxy.audit_path, &sent).await;
    eprintln!("figure: 32 writers x 4 tag changes with fsync = true in {elapsed:?}");
}

/// logrotate's `move, then signal` with the real binary: every record lands in exactly one of
/// the two files, the old one holding everything before the reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_audit_file_so_logrotate_loses_nothing() {
    let fake = FakeKms::start().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let rotated = dir.path().join("audit.log.1");
    let config = ProxyConfig::with_admin(&fake.url(), &audit, TEST_POLICY);
    let mut serve = start_child(ChildOptions::with_config(config)).await;
    let (addr, admin) = (serve.addr, serve.admin());

    async fn change(addr: SocketAddr, value: String) -> String {
        let response = call(addr, "TagResource", &tag_body(&[("team:phase", &value)])).await;
        assert_eq!(response.status, 200, "{value}: {}", response.body_str());
        value
    }
    for i in 0..10 {
        change(addr, format!("before-{i}")).await;
    }
    // A writer that keeps going while the file is moved and the signal lands.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn({
        let (stop, written) = (Arc::clone(&stop), Arc::clone(&written));
        async move {
            let mut sent = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                sent.push(change(addr, format!("during-{}", sent.len())).await);
                written.fetch_add(1, Ordering::SeqCst);
            }
            sent
        }
    });
    // Waits until the writer has had five more changes answered.
    let five_more = || {
        let target = written.load(Ordering::SeqCst) + 5;
        let written = Arc::clone(&written);
        async move {
            let done = poll_until(Duration::from_secs(5), || {
                written.load(Ordering::SeqCst) >= target
            });
            assert!(done.await, "the writer stalled");
        }
    };
    five_more().await;
    std::fs::rename(&audit, &rotated).unwrap();
    five_more().await;
    serve.signal("HUP");
    // The reopen creates a new file at the configured path.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !audit.exists() {
        assert!(Instant::now() < deadline, "no new audit file after SIGHUP");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    five_more().await;
    stop.store(true, Ordering::SeqCst);
    let during = writer.await.unwrap();
    for i in 0..10 {
        change(addr, format!("after-{i}")).await;
    }
    // SIGHUP also reloaded the (unchanged) policy, once the file had read the same twice.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut m = scrape(admin).await;
    while m.get(RELOADS, &[("result", "success")]).is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = scrape(admin).await;
    }
    assert_eq!(
        m.get(RELOADS, &[("result", "success")]),
        Some(1.0),
        "{}",
        m.text
    );
    serve.signal("TERM");
    let (status, _) = serve
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status}\n{}", serve.stderr());

    // Where each request's records are: 0 = the rotated file, 1 = the new one.
    let mut file_of: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut id_to_value: BTreeMap<String, String> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let old_records = proxy::read_audit(&rotated);
    let new_records = proxy::read_audit(&audit);
    for (file, records) in [(0, &old_records), (1, &new_records)] {
        for record in records {
            let id = record["request_id"].as_str().unwrap().to_owned();
            if record["event"] == "decision" {
                let value = record["set"][0]["value"].as_str().unwrap().to_owned();
                file_of.entry(value.clone()).or_default().push(file);
                id_to_value.insert(id, value);
            } else {
                *outcomes.entry(id).or_default() += 1;
            }
        }
    }
    let total = 20 + during.len();
    assert_eq!(file_of.len(), total, "a decision for every request");
    assert!(
        file_of.values().all(|files| files.len() == 1),
        "a decision in two places"
    );
    assert_eq!(outcomes.len(), total, "an outcome for every request");
    assert!(outcomes.values().all(|n| *n == 1), "an outcome twice");
    assert!(outcomes.keys().all(|id| id_to_value.contains_key(id)));
    assert_eq!(old_records.len() + new_records.len(), 2 * total);
    for i in 0..10 {
        assert_eq!(file_of[&format!("before-{i}")], [0], "before-{i}");
        assert_eq!(file_of[&format!("after-{i}")], [1], "after-{i}");
    }
    // The writer's records switch files once, at the reopen, and never go back.
    let order: Vec<usize> = during.iter().map(|v| file_of[v][0]).collect();
    assert!(
        order.windows(2).all(|w| w[0] <= w[1]),
        "records went back to the old file: {order:?}"
    );
    eprintln!(
        "figure: logrotate: {} records in the rotated file, {} in the new one; the writer sent {} during the rotation ({} before the reopen)",
        old_records.len(),
        new_records.len(),
        during.len(),
        order.iter().filter(|f| **f == 0).count()
    );
}

// ------------------------------------------------------------------------ upstream churn

/// KMS restarts on the same port: the requests in flight at that moment fail with a retryable
/// 502, requests after the restart succeed on new connections, with no proxy restart.
/// `n` concurrent requests to `addr`, Encrypts and allowed TagResources (`team:<label>`) in turn.
fn encrypts_and_tag_changes(addr: SocketAddr, label: &str, n: usize) -> JoinSet<RawResponse> {
    let mut requests = JoinSet::new();
    for i in 0..n {
        let key = format!("team:{label}");
        requests.spawn(async move {
            if i % 2 == 0 {
                call(addr, "Encrypt", &encrypt_body()).await
            } else {
                call(addr, "TagResource", &tag_body(&[(&key, &i.to_string())])).await
            }
        });
    }
    requests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_restart_costs_only_the_requests_in_flight() {
    let fake = FakeKms::start().await;
    let upstream = fake.addr();
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            admin: true,
            ..ProxyConfig::default()
        },
    )
    .await;
    // Fill the pool with a few kept-alive upstream connections.
    let mut warm = JoinSet::new();
    for _ in 0..8 {
        let addr = proxy.addr;
        warm.spawn(async move { call(addr, "Encrypt", &encrypt_body()).await.status });
    }
    while let Some(status) = warm.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }

    // Six requests in flight (KMS holds them) when KMS goes away.
    fake.set_delay(Duration::from_secs(5));
    let mut in_flight = encrypts_and_tag_changes(proxy.addr, "inflight", 6);
    fake.wait_for_requests(8 + 6, Duration::from_secs(5)).await;
    fake.shutdown().await;
    let mut failed = 0;
    while let Some(response) = in_flight.join_next().await {
        let response = response.unwrap();
        if response.status != 200 {
            failed += 1;
            assert_eq!(response.status, 502, "{}", response.body_str());
            assert_eq!(response.json()["__type"], "BadGateway");
        }
    }
    assert!(failed <= 6);
    // While KMS is down: 502 at once.
    let down = call(proxy.addr, "Encrypt", &encrypt_body()).await;
    assert_eq!(down.status, 502, "{}", down.body_str());

    let fake = FakeKms::start_on(upstream).await;
    let mut after = encrypts_and_tag_changes(proxy.addr, "after", 20);
    while let Some(response) = after.join_next().await {
        let response = response.unwrap();
        assert_eq!(response.status, 200, "{}", response.body_str());
    }
    assert_eq!(fake.count(), 20);

    let m = scrape(proxy.admin_addr.unwrap()).await;
    assert_eq!(
        m.get(UPSTREAM_ERRORS, &[("kind", "connect")]),
        Some(f64::from(failed + 1)),
        "{}",
        m.text
    );
    assert_eq!(m.series(UPSTREAM_ERRORS).len(), 1, "{}", m.text);
    // The failed tag changes have outcome records naming the failure.
    let outcomes: Vec<Value> = proxy
        .settled_audit()
        .await
        .into_iter()
        .filter(|r| r["event"] == "outcome" && r["upstream_status"].is_null())
        .collect();
    assert_eq!(outcomes.len(), 3, "{outcomes:#?}");
    assert!(outcomes.iter().all(|r| r["aws_error"] == "BadGateway"));
    eprintln!("figure: upstream restart: {failed} of 6 in-flight requests failed (502), 20 of 20 after the restart succeeded");
}

/// An upstream that answers every request with a head promising 64 bytes of body, sends 10,
/// and hangs up. Returns its address and the accept task.
async fn breaks_off_mid_answer() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                // The head, then Content-Length bytes of body.
                let (head_end, length) = loop {
                    let Ok(n) = stream.read(&mut tmp).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (end + 4, length);
                    }
                };
                while buf.len() < head_end + length {
                    match stream.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n\
                          x-amzn-RequestId: broken\r\nContent-Length: 64\r\n\r\n{\"KeyId\":",
                    )
                    .await;
                let _ = stream.flush().await;
                // Deliberate: the partial answer goes out on its own before the hang-up.
                tokio::time::sleep(Duration::from_millis(20)).await;
            });
        }
    });
    (addr, task)
}

/// An upstream that hangs up mid-answer: a pass-through client sees a broken connection, never
/// a short body that looks whole; a tag change gets a 502 and an outcome record; then KMS comes
/// back on the same port and the pool recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_broken_off_mid_body_is_never_relayed_as_whole() {
    let (upstream, server) = breaks_off_mid_answer().await;
    let proxy = start_proxy_to(
        &format!("http://{upstream}"),
        ProxyConfig {
            admin: true,
            ..ProxyConfig::default()
        },
    )
    .await;

    let request = signed(proxy.addr, "Encrypt", &encrypt_body());
    let result = raw::try_send(proxy.addr, &request.to_bytes()).await;
    let error = result.expect_err("a truncated answer must not arrive as a whole one");
    assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "{error}");

    let change = call(
        proxy.addr,
        "TagResource",
        &tag_body(&[("team:a", "broken")]),
    )
    .await;
    assert_eq!(change.status, 502, "{}", change.body_str());
    assert_eq!(change.json()["__type"], "BadGateway");
    let audit = proxy.wait_for_audit(2).await;
    assert_eq!(audit[0]["decision"], "allow");
    assert_eq!(audit[1]["event"], "outcome");
    assert!(
        audit[1]["error"]
            .as_str()
            .unwrap_or("")
            .contains("broke off"),
        "{:#}",
        audit[1]
    );

    // KMS comes back on the same port.
    server.abort();
    let _ = server.await;
    let fake = FakeKms::start_on(upstream).await;
    for i in 0..5 {
        let ok = call(proxy.addr, "Encrypt", &encrypt_body()).await;
        assert_eq!(ok.status, 200, "{}", ok.body_str());
        let ok = call(
            proxy.addr,
            "TagResource",
            &tag_body(&[("team:a", &i.to_string())]),
        )
        .await;
        assert_eq!(ok.status, 200, "{}", ok.body_str());
    }
    assert_eq!(fake.count(), 10);

    let m = scrape(proxy.admin_addr.unwrap()).await;
    // Both broken answers: the Encrypt's (streamed) and the TagResource's.
    assert_eq!(
        m.get(UPSTREAM_ERRORS, &[("kind", "response")]),
        Some(2.0),
        "{}",
        m.text
    );
    assert_requests(
        &m,
        &[
            // The broken pass-through answer had a head from KMS: counted as passed.
            ("Encrypt", "pass", 6),
            ("TagResource", "error", 1),
            ("TagResource", "allow", 5),
        ],
    );
}

/// A pass-through answer that breaks off mid-body is a failed exchange with KMS, and should show
/// in `kms_tag_guard_upstream_errors_total{kind="response"}` ("the answer broke off mid-body")
/// the way a tag change's does.
#[tokio::test]
async fn a_pass_through_answer_broken_off_mid_body_is_counted() {
    let (upstream, _server) = breaks_off_mid_answer().await;
    let proxy = start_proxy_to(
        &format!("http://{upstream}"),
        ProxyConfig {
            admin: true,
            ..ProxyConfig::default()
        },
    )
    .await;
    let request = signed(proxy.addr, "Encrypt", &encrypt_body());
    assert!(raw::try_send(proxy.addr, &request.to_bytes())
        .await
        .is_err());
    // The break reaches the proxy asynchronously, after the head was relayed.
    let admin = proxy.admin_addr.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let counted = loop {
        let counted = scrape(admin)
            .await
            .count(UPSTREAM_ERRORS, &[("kind", "response")]);
        if counted > 0.0 || Instant::now() > deadline {
            break counted;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(counted, 1.0);
}
