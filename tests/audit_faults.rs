//! The audit trail is whole under faults: a full disk never leaves a torn record and the log
//! recovers by itself when space returns (`kms_tag_guard_audit_failed` says meanwhile); a full
//! queue never costs a forwarded change its outcome record; the end of the shutdown grace period
//! answers the clients still waiting and records their changes as `applied: "unknown"`; a
//! client's strings never make a record over 64 KiB.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::ops::scrape;
use common::raw::{self, RawConn, RawRequest};
use common::*;
use serde_json::Value;

const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
/// Allows the large tag changes these tests send.
const POLICY: &str = "[policy]\nmax_tags = 50\n";

/// An allowed TagResource whose decision record is about `tags` × 270 bytes, told apart by `n`.
fn tag_body(n: usize, tags: usize) -> String {
    let tags: Vec<String> = (0..tags)
        .map(|i| {
            format!(
                r#"{{"TagKey":"team:k{i}","TagValue":"{}{n:06}"}}"#,
                "v".repeat(240)
            )
        })
        .collect();
    format!(r#"{{"KeyId":"{KEY}","Tags":[{}]}}"#, tags.join(","))
}

fn tag_request(host: &str, n: usize, tags: usize) -> Vec<u8> {
    RawRequest::signed_kms(
        host,
        "TrentService.TagResource",
        tag_body(n, tags).as_bytes(),
    )
    .to_bytes()
}

/// Every line of an audit log, parsed: a line that does not parse fails the test.
fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a torn audit line {l:?}: {e}")))
        .collect()
}

fn gauge(metrics: &common::ops::Scrape, name: &str) -> Option<f64> {
    metrics.get(name, &[])
}

/// What each answered tag change left in the log, checked: an answered 200 has its `allow`
/// decision and an outcome `applied: "yes"`; a 503 has either no decision, or one with an outcome
/// saying it was not forwarded; every `allow` decision has exactly one outcome.
fn check_trail(records: &[Value], answered: &[(String, u16)]) {
    let outcomes = |id: &Value| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["event"] == "outcome" && &r["request_id"] == id)
            .collect()
    };
    for decision in records
        .iter()
        .filter(|r| r["event"] == "decision" && r["decision"] == "allow")
    {
        let found = outcomes(&decision["request_id"]);
        assert_eq!(found.len(), 1, "one outcome for {decision}: {found:?}");
    }
    for (id, status) in answered {
        match status {
            200 => {
                let outcome = records
                    .iter()
                    .find(|r| r["event"] == "outcome" && r["aws_request_id"] == id.as_str())
                    .unwrap_or_else(|| panic!("no outcome for the forwarded change {id}"));
                assert_eq!(outcome["applied"], "yes", "{outcome}");
            }
            503 => {
                let decision = records
                    .iter()
                    .find(|r| r["event"] == "decision" && r["request_id"] == id.as_str());
                if let Some(decision) = decision {
                    let found = outcomes(&decision["request_id"]);
                    assert_eq!(found.len(), 1, "one outcome for the refused {decision}");
                    assert_eq!(found[0]["applied"], "no", "{}", found[0]);
                    assert_eq!(found[0]["aws_error"], "ServiceUnavailable", "{}", found[0]);
                }
            }
            other => panic!("unexpected status {other}"),
        }
    }
}

/// A tmpfs of 64 KiB mounted for the test, unmounted when dropped; `None` (the test is skipped)
/// where mounting is not permitted.
struct Tmpfs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Tmpfs {
    fn mount() -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&path)
            .output();
        match mounted {
            Ok(out) if out.status.success() => Some(Tmpfs(path, dir)),
            Ok(out) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs (run the test as root to fill a real file system): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(error) => {
                eprintln!("SKIPPED: cannot run mount: {error}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: a proxy left running by a failed test may still hold its file.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system that holds `dir` to the last byte: a file written until ENOSPC.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    for chunk in [4096, 1] {
        let bytes = vec![b'x'; chunk];
        while file.write_all(&bytes).is_ok() {}
    }
    path
}

/// A disk that fills up under the audit log: the record cut short by ENOSPC is rolled back, so
/// no line is ever torn or glued to the next; tag changes are refused (503) meanwhile, with
/// `kms_tag_guard_audit_failed` at 1 and one log line; pass-through is served; when space returns
/// the log recovers by itself, writes the records it held (the refused changes' decisions, each
/// with an outcome saying it was not forwarded), and tag changes are forwarded again.
#[tokio::test]
async fn a_full_disk_never_tears_a_record_and_the_log_recovers_by_itself() {
    let Some(fs) = Tmpfs::mount() else { return };
    let fake = FakeKms::start().await;
    let audit_path = fs.0.join("audit.log");
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            audit_path: Some(audit_path.clone()),
            audit: "stall_timeout_ms = 1000".into(),
            policy: POLICY.into(),
            admin: true,
            ..ProxyConfig::default()
        },
    )
    .await;
    let admin = proxy.admin_addr.unwrap();
    let host = fake.host();
    let mut answered: Vec<(String, u16)> = Vec::new();
    let mut n = 0;
    let mut send = |statuses: &'static [u16]| {
        n += 1;
        let request = tag_request(&host, n, 4);
        let addr = proxy.addr;
        async move {
            let response = raw::send(addr, &request).await;
            assert!(
                statuses.contains(&response.status),
                "request {n}: {}: {}",
                response.status,
                response.body_str()
            );
            let id = response
                .header("x-amzn-requestid")
                .unwrap_or_default()
                .to_owned();
            (id, response.status)
        }
    };
    for _ in 0..3 {
        answered.push(send(&[200]).await);
    }

    let filler = fill(&fs.0);
    // Some records may still fit the last page of the file; then the disk is full for them.
    let mut refused = 0;
    for _ in 0..12 {
        let (id, status) = send(&[200, 503]).await;
        refused += usize::from(status == 503);
        answered.push((id, status));
    }
    assert!(refused >= 8, "the full disk refused only {refused} of 12");
    let metrics = scrape(admin).await;
    assert_eq!(
        gauge(&metrics, "kms_tag_guard_audit_failed"),
        Some(1.0),
        "{}",
        metrics.text
    );
    assert_eq!(gauge(&metrics, "kms_tag_guard_audit_stalled"), Some(0.0));
    let encrypt = RawRequest::signed_kms(
        &host,
        "TrentService.Encrypt",
        format!(r#"{{"KeyId":"{KEY}","Plaintext":"aGVsbG8="}}"#).as_bytes(),
    );
    assert_eq!(raw::send(proxy.addr, &encrypt.to_bytes()).await.status, 200);

    // Space returns: the log recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = scrape(admin).await;
        if gauge(&metrics, "kms_tag_guard_audit_failed") == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the audit log did not recover within 10 s of space returning"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..3 {
        answered.push(send(&[200]).await);
    }

    let TestProxy { proxy: running, .. } = proxy;
    running.shutdown();
    running.wait().await;
    let text = std::fs::read_to_string(&audit_path).unwrap();
    let records = parse_lines(&text);
    check_trail(&records, &answered);
    let forwarded = answered.iter().filter(|(_, s)| *s == 200).count();
    let tag_changes = fake
        .requests()
        .iter()
        .filter(|r| r.operation() == Some("TagResource"))
        .count();
    assert_eq!(tag_changes, forwarded, "only the 200s reached KMS");
    let decisions = records.iter().filter(|r| r["event"] == "decision").count();
    let outcomes = records.iter().filter(|r| r["event"] == "outcome").count();
    assert_eq!(decisions, outcomes, "every decision has its outcome");
    assert!(decisions >= forwarded);
    eprintln!(
        "MEASURE full-disk: {} requests, {forwarded} forwarded, {refused} refused while full, {decisions} decisions and {outcomes} outcomes in the log",
        answered.len()
    );
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// One run of [`a_full_queue_never_costs_a_forwarded_change_its_outcome`] with the queue bounded
/// by `bound`.
async fn full_queue_run(bound: &str, tags: usize) {
    let fake = FakeKms::start().await;
    fake.set_delay(Duration::from_millis(1000));
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.fifo");
    mkfifo(&fifo);
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            audit_path: Some(fifo.clone()),
            audit: format!("stall_timeout_ms = 300\n{bound}"),
            policy: POLICY.into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    // The pipe filled with lines of our own, then read down to 48 KiB of room.
    let mut filler = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let line = format!("{{\"filler\":\"{}\"}}\n", "f".repeat(1000));
    while filler.write(line.as_bytes()).is_ok() {}
    drop(filler);
    let mut all = vec![0u8; 48 * 1024];
    reader.read_exact(&mut all).unwrap();

    // Wave 1: forwarded, their decisions written; KMS answers in 1 s.
    let host = fake.host();
    let mut first = tokio::task::JoinSet::new();
    for n in 0..6 {
        let request = tag_request(&host, n, tags);
        let addr = proxy.addr;
        first.spawn(async move { raw::send(addr, &request).await });
    }
    fake.wait_for_requests(6, Duration::from_secs(5)).await;
    // Wave 2, while wave 1 is at KMS: the pipe fills, then the queue.
    let mut second = tokio::task::JoinSet::new();
    for n in 100..140 {
        let request = tag_request(&host, n, tags);
        let addr = proxy.addr;
        second.spawn(async move { raw::send(addr, &request).await });
    }
    let mut answered = Vec::new();
    let mut statuses = [0usize; 2];
    for set in [&mut first, &mut second] {
        while let Some(response) = set.join_next().await {
            let response = response.unwrap();
            let id = response
                .header("x-amzn-requestid")
                .unwrap_or_default()
                .to_owned();
            statuses[usize::from(response.status == 503)] += 1;
            answered.push((id, response.status));
        }
    }
    assert!(statuses[1] > 0, "{bound}: the queue never filled");

    let drained = std::thread::spawn(move || {
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
    let TestProxy { proxy: running, .. } = proxy;
    running.shutdown();
    running.wait().await;
    let text = String::from_utf8(drained.join().unwrap()).unwrap();
    let records: Vec<Value> = parse_lines(&text)
        .into_iter()
        .filter(|r| r.get("filler").is_none())
        .collect();
    check_trail(&records, &answered);
    let tag_changes = fake
        .requests()
        .iter()
        .filter(|r| r.operation() == Some("TagResource"))
        .count();
    assert_eq!(
        tag_changes, statuses[0],
        "{bound}: only the 200s reached KMS"
    );
    eprintln!(
        "MEASURE full-queue ({bound}): {} forwarded, {} refused, {} records",
        statuses[0],
        statuses[1],
        records.len()
    );
}

/// A queue full of decisions waiting for a stalled sink (a FIFO whose pipe is full) while earlier
/// changes are at KMS: every forwarded change still gets its outcome record, since its decision
/// held a place for it; every change refused with 503 whose decision reached the log has an
/// outcome saying it was not forwarded. The queue bounded in records, then in bytes.
#[tokio::test]
async fn a_full_queue_never_costs_a_forwarded_change_its_outcome() {
    full_queue_run("queue_capacity = 16", 6).await;
    full_queue_run("queue_max_bytes = 131072", 20).await;
}

/// The grace period ends while KMS holds tag changes (it answers in 10 s): each client gets an
/// answer (504 `GatewayTimeout`, saying the change may have been applied), on the fast path and
/// the general server alike, and each change an outcome `applied: "unknown"`.
#[tokio::test]
async fn the_end_of_the_grace_period_answers_and_records_every_open_change() {
    let fake = FakeKms::start().await;
    fake.set_delay(Duration::from_secs(10));
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            shutdown: "grace_ms = 300".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let host = fake.host();
    let mut conns = Vec::new();
    for n in 0..2 {
        let mut conn = RawConn::connect(proxy.addr).await.unwrap();
        conn.write(&tag_request(&host, n, 1)).await.unwrap();
        conns.push(conn);
    }
    // A chunked body: the general server's path.
    let body = tag_body(2, 1);
    let mut chunked = RawRequest::signed_kms(&host, "TrentService.TagResource", body.as_bytes());
    chunked
        .remove_header("Content-Length")
        .add_header("Transfer-Encoding", "chunked");
    let mut bytes = chunked.head_bytes();
    bytes.extend_from_slice(format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len()).as_bytes());
    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    conn.write(&bytes).await.unwrap();
    conns.push(conn);
    fake.wait_for_requests(3, Duration::from_secs(5)).await;

    let running = proxy.proxy;
    let audit_path = proxy.audit_path.clone();
    let stopping = Instant::now();
    running.shutdown();
    let mut ids = Vec::new();
    for conn in &mut conns {
        let answer = conn
            .read_response_within(Duration::from_secs(5))
            .await
            .expect("an answer before the connection closes");
        assert_eq!(answer.status, 504, "{}", answer.body_str());
        assert_eq!(answer.json()["__type"], "GatewayTimeout");
        assert!(
            answer.body_str().contains("may or may not have applied"),
            "{}",
            answer.body_str()
        );
        ids.push(answer.header("x-amzn-requestid").unwrap().to_owned());
    }
    running.wait().await;
    let stopped = stopping.elapsed();
    let records = parse_lines(&std::fs::read_to_string(&audit_path).unwrap());
    for id in &ids {
        let decision = records
            .iter()
            .find(|r| r["event"] == "decision" && r["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no decision {id}: {records:#?}"));
        assert_eq!(decision["decision"], "allow");
        let outcomes: Vec<&Value> = records
            .iter()
            .filter(|r| r["event"] == "outcome" && r["request_id"] == id.as_str())
            .collect();
        assert_eq!(outcomes.len(), 1, "{id}: {records:#?}");
        assert_eq!(outcomes[0]["applied"], "unknown");
        assert_eq!(outcomes[0]["upstream_status"], Value::Null);
        assert_eq!(outcomes[0]["aws_error"], "GatewayTimeout");
    }
    eprintln!("MEASURE grace-end: stopped {stopped:?} after shutdown (grace 300 ms)");
}

/// Strings a client chooses, as long as a request head may carry them: a 65,000-character SigV4
/// region, a 30,000-character access key id. Each record stays under 64 KiB, one line that
/// parses, with each string cut and marked with its length.
#[tokio::test]
async fn a_clients_long_strings_never_make_a_record_over_64_kib() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(&fake, ProxyConfig::default()).await;
    let long_region = "r".repeat(65_000);
    let long_key = "A".repeat(30_000);
    let body = tag_body(1, 1);
    let mut requests = Vec::new();
    for (access_key, region) in [(ACCESS_KEY_ID, long_region.as_str()), (&long_key, REGION)] {
        let request = RawRequest::signed_kms_with(
            &fake.host(),
            "TrentService.TagResource",
            body.as_bytes(),
            access_key,
            SECRET_KEY,
            region,
        );
        let response = raw::send(proxy.addr, &request.to_bytes()).await;
        assert_ne!(
            response.status,
            431,
            "the head fits: {}",
            response.body_str()
        );
        requests.push(request.head_bytes().len());
    }
    let records = proxy.wait_for_audit(2).await;
    let text = std::fs::read_to_string(&proxy.audit_path).unwrap();
    for line in text.lines() {
        assert!(line.len() < 64 * 1024, "a record of {} bytes", line.len());
    }
    let decisions: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "decision")
        .collect();
    let region = decisions[0]["region"].as_str().unwrap();
    assert!(
        region.len() < 200 && region.ends_with("…(65000 characters)"),
        "{region}"
    );
    let key = decisions[1]["access_key_id"].as_str().unwrap();
    assert!(
        key.len() < 200 && key.ends_with("…(30000 characters)"),
        "{key}"
    );
    eprintln!(
        "MEASURE long-strings: request heads {requests:?} bytes, records {:?} bytes",
        text.lines().map(str::len).collect::<Vec<_>>()
    );
}

/// The real binary with its audit records on standard output, redirected (`>`) to a file on a
/// disk that fills up: standard output cannot be cut back, so the record cut short is completed
/// when space returns, and every line of the file parses; every forwarded change has its
/// outcome.
#[tokio::test]
async fn standard_output_on_a_full_disk_completes_the_record_it_cut() {
    let Some(fs) = Tmpfs::mount() else { return };
    let fake = FakeKms::start().await;
    let port = common::ops::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = ProxyConfig {
        endpoint: Some(fake.url()),
        listener_address: Some(addr.to_string()),
        policy: POLICY.into(),
        ..ProxyConfig::default()
    };
    let config_path = dir.path().join("kms-tag-guard.toml");
    std::fs::write(&config_path, config.render()).unwrap();
    let out_path = fs.0.join("audit.out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kms-tag-guard"))
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "the proxy did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let host = fake.host();
    let mut answered = Vec::new();
    let send = |n: usize| {
        let request = tag_request(&host, n, 4);
        async move {
            let response = raw::send(addr, &request).await;
            let id = response
                .header("x-amzn-requestid")
                .unwrap_or_default()
                .to_owned();
            (id, response.status)
        }
    };
    for n in 0..2 {
        answered.push(send(n).await);
    }
    let filler = fill(&fs.0);
    for n in 10..20 {
        answered.push(send(n).await);
    }
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 100;
    loop {
        let (id, status) = send(n).await;
        answered.push((id, status));
        n += 1;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    answered.push(send(n).await);
    // SAFETY: kill(2) on the child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let text = std::fs::read_to_string(&out_path).unwrap();
    let records = parse_lines(&text);
    check_trail(&records, &answered);
    let refused = answered.iter().filter(|(_, s)| *s == 503).count();
    assert!(refused >= 5, "the full disk refused only {refused}");
    eprintln!(
        "MEASURE stdout-full-disk: {} requests, {refused} refused, {} records",
        answered.len(),
        records.len()
    );
}

/// The grace period ends while a tag change still waits for its decision record (the sink is a
/// FIFO whose pipe is full, `stall_timeout_ms` is long): the change was never forwarded, and once
/// the pipe is read again its decision is followed by an outcome `applied: "no"`.
#[tokio::test]
async fn a_change_cut_off_while_its_decision_waits_is_recorded_as_not_applied() {
    let fake = FakeKms::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.fifo");
    mkfifo(&fifo);
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            audit_path: Some(fifo.clone()),
            audit: "stall_timeout_ms = 20000".into(),
            shutdown: "grace_ms = 1000".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let mut filler = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let line = format!("{{\"filler\":\"{}\"}}\n", "f".repeat(1000));
    while filler.write(line.as_bytes()).is_ok() {}
    drop(filler);

    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    conn.write(&tag_request(&fake.host(), 1, 1)).await.unwrap();
    // Deliberate: time for the proxy to read the request and queue its decision; nothing
    // outside the proxy shows that it has (the pipe is full).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let running = proxy.proxy;
    running.shutdown();
    let waited = tokio::spawn(running.wait());
    // The grace period (1 s) and the connections' last word (0.5 s) pass, and the connection is
    // closed; then, while the audit log gets its own grace period to write what is queued, the
    // pipe is read again.
    assert!(
        conn.is_closed_within(Duration::from_secs(10)).await,
        "the connection outlived the grace period"
    );
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
    waited.await.unwrap();
    let text = String::from_utf8(drained.join().unwrap()).unwrap();
    let records: Vec<Value> = parse_lines(&text)
        .into_iter()
        .filter(|r| r.get("filler").is_none())
        .collect();
    assert_eq!(records.len(), 2, "{records:#?}");
    assert_eq!(records[0]["event"], "decision");
    assert_eq!(records[0]["decision"], "allow");
    assert_eq!(records[1]["event"], "outcome");
    assert_eq!(records[1]["request_id"], records[0]["request_id"]);
    assert_eq!(records[1]["applied"], "no", "{}", records[1]);
    assert_eq!(fake.count(), 0, "nothing reached KMS");
}
