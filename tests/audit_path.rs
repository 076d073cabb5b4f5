//! The audit path never stalls the proxy and never lies: a sink that blocks (a pipe nobody
//! reads) or fails (`/dev/full`) refuses tag changes with 503 after a bounded wait, says so once
//! in the log and in `/metrics`, and never delays traffic that changes no tags; every record
//! accepted is written by the time the proxy exits; records and answers stay bounded however
//! large the request; records link the attempts of one SDK call and escape the characters some
//! line readers split on.

mod common;

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::child::{spawn_proxy, ChildOptions};
use common::ops::{admin_get, scrape};
use common::raw::{self, RawRequest};
use common::*;
use serde_json::Value;

const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";

/// An allowed TagResource whose record is a few KiB (five tags with 256-character values).
fn large_allowed_tag_body(n: usize) -> String {
    let tags: Vec<String> = (0..5)
        .map(|i| {
            format!(
                r#"{{"TagKey":"team:k{i}","TagValue":"{}{n:06}"}}"#,
                "v".repeat(250)
            )
        })
        .collect();
    format!(r#"{{"KeyId":"{KEY}","Tags":[{}]}}"#, tags.join(","))
}

fn encrypt_body() -> String {
    format!(r#"{{"KeyId":"{KEY}","Plaintext":"aGVsbG8="}}"#)
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

fn sample(metrics: &common::ops::Scrape, name: &str) -> Option<f64> {
    metrics
        .samples
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.value)
}

/// A sink that blocks: the audit log is a FIFO whose reader never reads. Tag changes get 503
/// within `stall_timeout_ms` once the pipe is full; Encrypt still passes; `/healthz` answers;
/// the stall is logged once and shown in `/metrics`. After SIGTERM, with the pipe read again,
/// every record accepted is written, and the log tells the truth about every request.
#[test]
fn a_stalled_sink_refuses_tag_changes_and_never_delays_pass_through() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fake = runtime.block_on(FakeKms::start());
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.fifo");
    mkfifo(&fifo);
    // Opened for reading (so the proxy's open does not block), and never read until the end.
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let mut opts = ChildOptions::new(&fake.url());
    opts.config.audit_path = Some(fifo.clone());
    opts.config.audit = "stall_timeout_ms = 500\nqueue_capacity = 16".into();
    opts.config.admin = true;
    let mut proxy = spawn_proxy(&opts);
    let admin = proxy.admin_addr.expect("admin port");

    runtime.block_on(async {
        let host = fake.host();
        let mut answered: Vec<(String, u16)> = Vec::new();
        let mut refused = 0;
        for n in 0..400 {
            let body = large_allowed_tag_body(n);
            let request =
                RawRequest::signed_kms(&host, "TrentService.TagResource", body.as_bytes());
            let sent = Instant::now();
            let response = raw::send(proxy.addr, &request.to_bytes()).await;
            let took = sent.elapsed();
            let id = response
                .header("x-amzn-requestid")
                .unwrap_or_default()
                .to_owned();
            answered.push((id, response.status));
            match response.status {
                200 => {}
                503 => {
                    assert_eq!(response.json()["__type"], "ServiceUnavailable");
                    eprintln!(
                        "MEASURE tag-change-refused-during-stall ms={}",
                        took.as_millis()
                    );
                    refused += 1;
                    if refused == 4 {
                        break;
                    }
                }
                other => panic!("TagResource {n}: {other} {}", response.body_str()),
            }
        }
        assert_eq!(
            refused,
            4,
            "the pipe never filled: {} requests",
            answered.len()
        );

        // While the audit is stalled: pass-through traffic is served, the process is healthy.
        for _ in 0..3 {
            let request =
                RawRequest::signed_kms(&host, "TrentService.Encrypt", encrypt_body().as_bytes());
            let sent = Instant::now();
            let response = tokio::time::timeout(
                Duration::from_secs(5),
                raw::send(proxy.addr, &request.to_bytes()),
            )
            .await
            .expect("an Encrypt waited for the stalled audit log");
            assert_eq!(response.status, 200, "{}", response.body_str());
            eprintln!(
                "MEASURE encrypt-during-audit-stall ms={}",
                sent.elapsed().as_millis()
            );
        }
        assert_eq!(admin_get(admin, "/healthz").await.status, 200);
        let metrics = scrape(admin).await;
        assert_eq!(
            sample(&metrics, "kms_tag_guard_audit_stalled"),
            Some(1.0),
            "{}",
            metrics.text
        );
        assert!(
            sample(&metrics, "kms_tag_guard_audit_queue_records").unwrap_or(0.0) > 0.0,
            "{}",
            metrics.text
        );
        let stderr = proxy.stderr();
        assert_eq!(
            stderr.matches("the audit log is stalled").count(),
            1,
            "the stall is logged once, not once per request:\n{stderr}"
        );

        // SIGTERM, then the pipe is read again: everything accepted reaches it.
        let drained = std::thread::spawn(move || {
            let mut all = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut chunk = [0u8; 65536];
            loop {
                match reader.read(&mut chunk) {
                    Ok(0) => return all,
                    Ok(n) => all.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(Instant::now() < deadline, "the proxy never closed the FIFO");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("reading the FIFO: {e}"),
                }
            }
        });
        let status = proxy.stop().expect("the proxy exits");
        assert!(status.success(), "{status}: {}", proxy.stderr());
        let log = String::from_utf8(drained.join().unwrap()).unwrap();
        let records: Vec<Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        let of = |id: &str, event: &str| {
            records
                .iter()
                .find(|r| r["request_id"] == id && r["event"] == event)
                .cloned()
        };
        for (id, status) in &answered {
            match status {
                200 => {
                    // A forwarded request's answer carries KMS's request id: the outcome names
                    // it, and the proxy's own id links the outcome to the decision.
                    let outcome = records
                        .iter()
                        .find(|r| r["event"] == "outcome" && r["aws_request_id"] == id.as_str())
                        .unwrap_or_else(|| panic!("no outcome for KMS request {id}"));
                    assert_eq!(outcome["upstream_status"], 200);
                    assert_eq!(outcome["applied"], "yes");
                    let ours = outcome["request_id"].as_str().unwrap();
                    assert_eq!(of(ours, "decision").expect("decision")["decision"], "allow");
                }
                _ => {
                    // Refused: either the record never got into the queue, or the log says
                    // the request was not forwarded.
                    if of(id, "decision").is_some() {
                        let outcome = of(id, "outcome").expect("an outcome for a queued decision");
                        assert_eq!(outcome["aws_error"], "ServiceUnavailable", "{outcome}");
                        assert_eq!(outcome["applied"], "no", "{outcome}");
                    }
                }
            }
        }
        let stderr = proxy.stderr();
        assert!(stderr.contains("unwritten_audit_records=0"), "{stderr}");
        // Every forwarded tag change reached the fake, and no refused one did.
        let forwarded = answered.iter().filter(|(_, s)| *s == 200).count();
        let tag_changes = fake
            .requests()
            .iter()
            .filter(|r| r.operation() == Some("TagResource"))
            .count();
        assert_eq!(tag_changes, forwarded);
    });
}

/// A sink that fails: every write to `/dev/full` fails with ENOSPC. Tag changes get 503 with
/// `fail_closed` (forwarded without), pass-through is served, failures are counted.
#[tokio::test]
async fn a_failing_sink_refuses_tag_changes_unless_fail_open() {
    let fake = FakeKms::start().await;
    for fail_closed in [true, false] {
        let proxy = start_proxy_with(
            &fake,
            ProxyConfig {
                audit_path: Some("/dev/full".into()),
                audit: format!("fail_closed = {fail_closed}"),
                admin: true,
                ..ProxyConfig::default()
            },
        )
        .await;
        let before = fake.count();
        let body = large_allowed_tag_body(1);
        let tag = RawRequest::signed_kms(&fake.host(), "TrentService.TagResource", body.as_bytes());
        let response = raw::send(proxy.addr, &tag.to_bytes()).await;
        let expected = if fail_closed { 503 } else { 200 };
        assert_eq!(
            response.status,
            expected,
            "fail_closed {fail_closed}: {}",
            response.body_str()
        );
        let encrypt = RawRequest::signed_kms(
            &fake.host(),
            "TrentService.Encrypt",
            encrypt_body().as_bytes(),
        );
        assert_eq!(raw::send(proxy.addr, &encrypt.to_bytes()).await.status, 200);
        let forwarded: Vec<_> = fake.requests()[before..]
            .iter()
            .map(|r| r.operation().map(str::to_owned))
            .collect();
        let expected_ops: Vec<Option<String>> = if fail_closed {
            vec![Some("Encrypt".into())]
        } else {
            vec![Some("TagResource".into()), Some("Encrypt".into())]
        };
        assert_eq!(forwarded, expected_ops);
        let metrics = scrape(proxy.admin_addr.unwrap()).await;
        assert!(
            sample(&metrics, "kms_tag_guard_audit_write_failures_total").unwrap_or(0.0) >= 1.0,
            "{}",
            metrics.text
        );
    }
}

/// 7,000 forbidden tags: the answer and the record stay under 64 KiB, name every rule broken,
/// and count what they leave out.
#[tokio::test]
async fn thousands_of_forbidden_tags_make_a_bounded_answer_and_record() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            limits: "max_body_bytes = 1048576".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let tags: Vec<String> = (0..7000)
        .map(|i| {
            format!(
                r#"{{"TagKey":"Project{i}","TagValue":"{}"}}"#,
                "x".repeat(40)
            )
        })
        .collect();
    let body = format!(r#"{{"KeyId":"{KEY}","Tags":[{}]}}"#, tags.join(","));
    let request = RawRequest::signed_kms(&fake.host(), "TrentService.TagResource", body.as_bytes());
    let response = raw::send(proxy.addr, &request.to_bytes()).await;
    assert_eq!(response.status, 400);
    assert!(
        response.body.len() < 64 * 1024,
        "answer of {} bytes",
        response.body.len()
    );
    let message = response.json()["message"].as_str().unwrap().to_owned();
    for rule in ["max-tags", "org-prefix"] {
        assert!(
            message.contains(&format!("rule {rule}:")),
            "{rule} in {message}"
        );
    }
    assert!(message.contains("more violations"), "{message}");
    let audit = proxy.wait_for_audit(1).await;
    let line = std::fs::read_to_string(&proxy.audit_path).unwrap();
    assert!(line.len() < 64 * 1024, "record of {} bytes", line.len());
    eprintln!(
        "MEASURE request={} answer={} record={} (bytes)",
        body.len(),
        response.body.len(),
        line.len()
    );
    let record = &audit[0];
    assert_eq!(record["decision"], "deny");
    assert_eq!(record["set"].as_array().unwrap().len(), 50);
    assert_eq!(record["set_omitted"], 7000 - 50);
    assert!(
        record["violations_omitted"].as_u64().unwrap() > 1000,
        "{record}"
    );
    let rules: std::collections::BTreeSet<&str> = record["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["rule"].as_str().unwrap())
        .collect();
    assert_eq!(rules, ["max-tags", "org-prefix"].into());
    assert_eq!(fake.count(), 0);
}

/// The attempts of one SDK call share its invocation id; a value with U+2028, U+2029 or U+0085
/// is written escaped, so that no line reader splits the record; a 413 refusal still names the
/// credential.
#[tokio::test]
async fn records_link_sdk_attempts_escape_line_separators_and_name_the_credential() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            limits: "max_body_bytes = 1024".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let value = "a\u{2028}b\u{2029}c\u{85}d";
    let body =
        format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:note","TagValue":"{value}"}}]}}"#);
    for attempt in 1..=2 {
        let mut request =
            RawRequest::signed_kms(&fake.host(), "TrentService.TagResource", body.as_bytes());
        request
            .add_header(
                "amz-sdk-invocation-id",
                "3f1a6c2e-6d55-4b43-9c1e-2b7e0f0a1d11",
            )
            .add_header("amz-sdk-request", &format!("attempt={attempt}; max=3"));
        assert_eq!(raw::send(proxy.addr, &request.to_bytes()).await.status, 200);
    }
    let big = format!(
        r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:x","TagValue":"{}"}}]}}"#,
        "y".repeat(2000)
    );
    let too_large =
        RawRequest::signed_kms(&fake.host(), "TrentService.TagResource", big.as_bytes());
    assert_eq!(
        raw::send(proxy.addr, &too_large.to_bytes()).await.status,
        413
    );

    let audit = proxy.wait_for_audit(5).await;
    let raw_log = std::fs::read(&proxy.audit_path).unwrap();
    for bad in ["\u{2028}", "\u{2029}", "\u{85}"] {
        assert!(
            !raw_log.windows(bad.len()).any(|w| w == bad.as_bytes()),
            "{bad:?} written raw"
        );
    }
    let decisions: Vec<&Value> = audit.iter().filter(|r| r["event"] == "decision").collect();
    assert_eq!(decisions.len(), 3, "{audit:#?}");
    for (i, decision) in decisions[..2].iter().enumerate() {
        assert_eq!(
            decision["invocation_id"],
            "3f1a6c2e-6d55-4b43-9c1e-2b7e0f0a1d11"
        );
        assert_eq!(decision["attempt"], i as u64 + 1);
        assert_eq!(
            decision["set"][0]["value"], value,
            "decoded back, unchanged"
        );
    }
    let refused = decisions[2];
    assert_eq!(refused["decision"], "deny");
    assert_eq!(refused["access_key_id"], ACCESS_KEY_ID, "{refused}");
    assert_eq!(refused["region"], REGION, "{refused}");
}

/// A sink that fails, then comes back: the audit log is a FIFO whose reader goes away (every
/// write fails with EPIPE) and later returns. Meanwhile tag changes are refused at once (503),
/// `kms_tag_guard_audit_failed` is 1 and the failure is logged once; pass-through is served.
/// When a reader opens the FIFO again, the proxy reopens it by itself, writes every record it
/// held (each refused change's decision with an outcome saying it was not forwarded), and
/// forwards tag changes again; no restart, no signal.
#[test]
fn a_failed_sink_is_shown_and_recovers_by_itself() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fake = runtime.block_on(FakeKms::start());
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.fifo");
    mkfifo(&fifo);
    let open_reader = || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap()
    };
    let read_all = |reader: &mut std::fs::File, into: &mut Vec<u8>| {
        let mut chunk = [0u8; 65536];
        while let Ok(n) = reader.read(&mut chunk) {
            if n == 0 {
                break;
            }
            into.extend_from_slice(&chunk[..n]);
        }
    };
    let mut reader = open_reader();
    let mut opts = ChildOptions::new(&fake.url());
    opts.config.audit_path = Some(fifo.clone());
    opts.config.admin = true;
    let mut proxy = spawn_proxy(&opts);
    let admin = proxy.admin_addr.expect("admin port");

    runtime.block_on(async {
        let host = fake.host();
        let tag = |n: usize| {
            RawRequest::signed_kms(
                &host,
                "TrentService.TagResource",
                large_allowed_tag_body(n).as_bytes(),
            )
            .to_bytes()
        };
        let mut answered: Vec<(String, u16)> = Vec::new();
        let send = |n: usize, expected: u16| {
            let request = tag(n);
            let addr = proxy.addr;
            async move {
                let response = raw::send(addr, &request).await;
                assert_eq!(response.status, expected, "{n}: {}", response.body_str());
                let id = response.header("x-amzn-requestid").unwrap().to_owned();
                (id, response.status)
            }
        };
        answered.push(send(0, 200).await);
        let mut log = Vec::new();
        read_all(&mut reader, &mut log);
        drop(reader);

        // The reader is gone: every write fails.
        for n in 1..=3 {
            let sent = Instant::now();
            answered.push(send(n, 503).await);
            eprintln!(
                "MEASURE tag-change-refused-while-failed ms={}",
                sent.elapsed().as_millis()
            );
        }
        let encrypt =
            RawRequest::signed_kms(&host, "TrentService.Encrypt", encrypt_body().as_bytes());
        assert_eq!(raw::send(proxy.addr, &encrypt.to_bytes()).await.status, 200);
        let metrics = scrape(admin).await;
        assert_eq!(sample(&metrics, "kms_tag_guard_audit_failed"), Some(1.0));
        assert_eq!(sample(&metrics, "kms_tag_guard_audit_stalled"), Some(0.0));
        assert_eq!(admin_get(admin, "/readyz").await.status, 200);
        let stderr = proxy.stderr();
        assert_eq!(
            stderr.matches("audit records could not be written").count(),
            1,
            "logged once:\n{stderr}"
        );

        // A reader again: the proxy finds it by itself.
        let mut reader = open_reader();
        let deadline = Instant::now() + Duration::from_secs(10);
        while sample(&scrape(admin).await, "kms_tag_guard_audit_failed") != Some(0.0) {
            assert!(
                Instant::now() < deadline,
                "no recovery:\n{}",
                proxy.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(proxy.stderr().contains("the audit log takes writes again"));
        answered.push(send(4, 200).await);

        let drained = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut chunk = [0u8; 65536];
            loop {
                match reader.read(&mut chunk) {
                    Ok(0) => return log,
                    Ok(n) => log.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(Instant::now() < deadline, "the proxy never closed the FIFO");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("reading the FIFO: {e}"),
                }
            }
        });
        let status = proxy.stop().expect("the proxy exits");
        assert!(status.success(), "{status}: {}", proxy.stderr());
        let log = String::from_utf8(drained.join().unwrap()).unwrap();
        let records: Vec<Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        let of = |id: &str, event: &str| {
            records
                .iter()
                .find(|r| r["request_id"] == id && r["event"] == event)
                .cloned()
        };
        for (id, status) in &answered {
            if *status == 503 {
                // Held while the sink failed, written when it came back.
                assert_eq!(
                    of(id, "decision").expect("its decision")["decision"],
                    "allow"
                );
                let outcome = of(id, "outcome").expect("its outcome");
                assert_eq!(outcome["applied"], "no", "{outcome}");
                assert_eq!(outcome["aws_error"], "ServiceUnavailable", "{outcome}");
            } else {
                let outcome = records
                    .iter()
                    .find(|r| r["event"] == "outcome" && r["aws_request_id"] == id.as_str())
                    .unwrap_or_else(|| panic!("no outcome for {id}"));
                assert_eq!(outcome["applied"], "yes");
            }
        }
        assert_eq!(records.len(), 2 * answered.len(), "{records:#?}");
        let tag_changes = fake
            .requests()
            .iter()
            .filter(|r| r.operation() == Some("TagResource"))
            .count();
        assert_eq!(tag_changes, 2, "only the 200s reached KMS");
    });
}
