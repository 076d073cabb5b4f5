//! Staying up for everyone, with the real binary (issue 18): a log pipe nobody reads stops no
//! traffic, a SIGHUP in the first milliseconds is never fatal.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::child::{start_child, ChildOptions};
use common::ops::*;
use common::raw::{RawConn, RawRequest};
use common::*;

const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";

fn denied_tag_change(host: &str) -> Vec<u8> {
    let body =
        format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"Project","TagValue":"apollo"}}]}}"#);
    RawRequest::signed_kms(host, "TrentService.TagResource", body.as_bytes()).to_bytes()
}

fn encrypt(host: &str) -> Vec<u8> {
    let body = format!(r#"{{"KeyId":"{KEY}","Plaintext":"aGVsbG8="}}"#);
    RawRequest::signed_kms(host, "TrentService.Encrypt", body.as_bytes()).to_bytes()
}

/// Point 4: the proxy's standard error is a pipe nobody reads after the start. Denied requests
/// (each logs a line) fill it; they keep being answered, lines are dropped and counted, and an
/// Encrypt still passes. When the reader comes back, a summary line says how many were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_pipe_nobody_reads_stops_no_traffic() {
    let fake = FakeKms::start().await;
    let mut opts = ChildOptions::new(&fake.url());
    opts.config.admin = true;
    opts.stderr_pipe = true;
    let mut proxy = start_child(opts).await;
    let admin = proxy.admin();
    let host = fake.host();

    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    let mut sent = 0;
    let dropped = loop {
        for _ in 0..500 {
            conn.write(&denied_tag_change(&host)).await.unwrap();
            let answer = conn
                .read_response_within(Duration::from_secs(5))
                .await
                .unwrap_or_else(|e| {
                    panic!("denied request {sent} not answered (a full log pipe stalls it?): {e}")
                });
            assert_eq!(answer.status, 400, "{}", answer.body_str());
            sent += 1;
        }
        let dropped = scrape(admin)
            .await
            .count("kms_tag_guard_log_lines_dropped_total", &[]);
        if dropped > 0.0 || sent >= 40_000 {
            break dropped;
        }
    };
    assert!(dropped > 0.0, "{sent} denied requests dropped no log line");
    eprintln!("{sent} denied requests answered with stderr unread; {dropped} log lines dropped");
    assert_eq!(fake.count(), 0, "no denied request reached KMS");

    // Pass-through is served while the pipe is full.
    let mut other = RawConn::connect(proxy.addr).await.unwrap();
    other.write(&encrypt(&host)).await.unwrap();
    let answer = other
        .read_response_within(Duration::from_secs(5))
        .await
        .expect("Encrypt answered while the log pipe is full");
    assert_eq!(answer.status, 200, "{}", answer.body_str());
    assert_eq!(fake.count(), 1);
    let later = scrape(admin)
        .await
        .count("kms_tag_guard_log_lines_dropped_total", &[]);
    assert!(later >= dropped);

    // The reader comes back: the summary arrives within the summary interval.
    let mut pipe = proxy.stderr_pipe.take().unwrap();
    let drained = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut text = Vec::new();
        let mut buf = [0u8; 65536];
        while Instant::now() < deadline {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
            }
            if String::from_utf8_lossy(&text).contains("log lines dropped in the last") {
                break;
            }
        }
        (String::from_utf8_lossy(&text).into_owned(), pipe)
    });
    let (text, _pipe) = drained.await.unwrap();
    let summary = text
        .lines()
        .find(|l| l.contains("log lines dropped in the last"))
        .unwrap_or_else(|| panic!("no summary line in {} bytes of stderr", text.len()));
    assert!(summary.contains("WARN"), "{summary}");
    proxy.stop();
}

/// A large policy, so that loading the configuration takes a while.
fn large_policy(rules: usize) -> String {
    let mut policy = String::from("[policy]\nmax_tags = 50\n");
    for i in 0..rules {
        policy.push_str(&format!(
            "\n[[policy.rule]]\nid = \"rule-{i}\"\ntype = \"value-pattern\"\nkey = \"app:k{i}\"\npattern = \"^v{i}-[a-z]{{1,20}}$\"\n"
        ));
    }
    policy
}

/// Whether SIGHUP (signal 1) is ignored or caught, from `/proc/<pid>/status`.
fn hangup_disposition_set(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status.lines().any(|l| {
        (l.starts_with("SigIgn:") || l.starts_with("SigCgt:"))
            && u64::from_str_radix(l[7..].trim(), 16).is_ok_and(|mask| mask & 1 == 1)
    })
}

/// Point 6: SIGHUP from the first milliseconds after start, while the configuration is still
/// being read, is never fatal. Each start gets a SIGHUP as soon as `main` has run (SIGHUP
/// ignored or caught) or 20 ms after the spawn, whichever is first, and more while it loads.
#[test]
fn sighup_right_after_start_is_never_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kms-tag-guard.toml");
    let proxy_config = ProxyConfig {
        endpoint: Some("http://127.0.0.1:9".into()),
        policy: large_policy(800),
        ..ProxyConfig::default()
    };
    std::fs::write(&config, proxy_config.render()).unwrap();
    let bin = env!("CARGO_BIN_EXE_kms-tag-guard");
    for start in 0..40 {
        let stderr_path = dir.path().join(format!("stderr-{start}.log"));
        let mut child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .env_remove("RUST_LOG")
            .spawn()
            .unwrap();
        let pid = child.id();
        let spawned = Instant::now();
        while !hangup_disposition_set(pid) && spawned.elapsed() < Duration::from_millis(20) {
            std::thread::sleep(Duration::from_micros(50));
        }
        let hangup = || {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
        };
        hangup();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut hups = 1;
        let listening = loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "start {start}: SIGHUP {:?} after spawn ended the process ({status}); stderr:\n{}",
                    spawned.elapsed(),
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
            let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            if log.contains("kms-tag-guard listening") {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            if hups < 5 {
                hangup();
                hups += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(listening, "start {start}: not listening in 30 s");
        // Ready: SIGHUP now reloads, as before.
        hangup();
        assert!(wait_for_line(&stderr_path, "SIGHUP: reopening"));
        assert!(child.try_wait().unwrap().is_none(), "start {start}: exited");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

fn wait_for_line(path: &Path, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(needle)
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Point 3: the admin port has a connection cap (the oldest closed to make room, so a probe
/// always gets in), a small head limit and a header timeout. 200 connections holding half a head
/// each leave the process with at most the cap open, and `/healthz` still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_is_bounded_and_probes_still_get_in() {
    use tokio::io::AsyncWriteExt;
    let fake = FakeKms::start().await;
    let mut opts = ChildOptions::new(&fake.url());
    opts.config.admin = true;
    let mut proxy = start_child(opts).await;
    let admin = proxy.admin();
    assert_eq!(admin_get(admin, "/healthz").await.status, 200);
    let fds_before = proxy.open_fds();

    // Half a head each: a request line and 6 KB of one header, never finished.
    let partial = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}",
        "a".repeat(6 * 1024)
    );
    let mut held = Vec::new();
    for _ in 0..200 {
        let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
        stream.write_all(partial.as_bytes()).await.unwrap();
        held.push(stream);
    }
    // Every connection accepted, the oldest closed to make room.
    let settled = poll_until(Duration::from_secs(5), || {
        proxy.open_fds() <= fds_before + kms_tag_guard::admin::MAX_CONNECTIONS + 4
    })
    .await;
    assert!(
        settled,
        "200 half-sent admin heads hold {} descriptors (before: {fds_before}, cap {})",
        proxy.open_fds(),
        kms_tag_guard::admin::MAX_CONNECTIONS
    );
    // A probe gets in and is answered while they are held.
    let probe = tokio::time::timeout(Duration::from_secs(2), admin_get(admin, "/healthz"))
        .await
        .expect("/healthz answered while 200 connections hold half a head");
    assert_eq!(probe.status, 200);

    // A head over the limit is refused, not buffered.
    let mut big = RawConn::connect(admin).await.unwrap();
    let over = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(kms_tag_guard::admin::MAX_HEAD_BYTES + 1024)
    );
    let _ = big.write(over.as_bytes()).await;
    match big.read_response().await {
        Ok(answer) => assert_eq!(answer.status, 431, "{}", answer.body_str()),
        Err(e) => assert!(
            e.kind() != std::io::ErrorKind::TimedOut,
            "an oversized admin head was neither refused nor closed: {e}"
        ),
    }

    // A silent connection is closed after the header read timeout.
    let mut silent = RawConn::connect(admin).await.unwrap();
    assert!(
        silent
            .is_closed_within(kms_tag_guard::admin::HEADER_READ_TIMEOUT + Duration::from_secs(3))
            .await,
        "a silent admin connection outlives the header read timeout"
    );
    drop(held);
    // A kept-alive connection that asks once and then sits: closed at the end of its lifetime.
    let mut kept = RawConn::connect(admin).await.unwrap();
    let kept_since = Instant::now();
    kept.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(kept.read_response().await.unwrap().status, 200);
    let lifetime = kms_tag_guard::admin::CONNECTION_LIFETIME + kms_tag_guard::admin::CLOSE_GRACE;
    let left = (lifetime + Duration::from_secs(3)).saturating_sub(kept_since.elapsed());
    assert!(
        kept.is_closed_within(left).await,
        "a kept-alive admin connection outlives its lifetime"
    );
    proxy.stop();
}
