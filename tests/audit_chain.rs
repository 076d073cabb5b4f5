//! The audit log proves it is whole: a real proxy in front of the fake KMS writes a real log,
//! `kms-tag-guard audit verify` (the real binary) finds it whole, and finds, with its line, every
//! change made to it afterwards: a byte edited, a line deleted, two lines swapped, a line
//! inserted, the tail cut after a checkpoint (against an anchor kept elsewhere). Rotation with
//! logrotate (copytruncate, and create with SIGHUP, gzip'd), and a restart appending, keep one
//! chain. Property test: no single edit of a signed log verifies as whole.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::child::{start_child, ChildOptions};
use common::ops::{call, outcome_made, tag_body};
use common::proxy::{ProxyConfig, TestProxy, TEST_POLICY};
use common::*;
use kms_tag_guard::integrity::chain::{parse_seal, Sealer};
use kms_tag_guard::integrity::checkpoint::Checkpoints;
use kms_tag_guard::integrity::{keys, line_hash, verify};
use proptest::prelude::*;

/// `kms-tag-guard audit verify ARGS`: its exit code and standard output.
fn verify_cli(args: &[&Path]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kms-tag-guard"))
        .args(["audit", "verify"])
        .args(args)
        .output()
        .expect("run kms-tag-guard audit verify");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("$ kms-tag-guard audit verify {args:?}\n{stdout}{stderr}");
    (output.status.code().unwrap_or(-1), stdout)
}

fn key_in(dir: &Path) -> (PathBuf, PathBuf) {
    let made = keys::keygen(&dir.join("audit.key")).unwrap();
    (made.private, made.public)
}

fn lines_of(path: &Path) -> Vec<Vec<u8>> {
    std::fs::read(path)
        .unwrap()
        .split_inclusive(|b| *b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    std::fs::write(path, lines.concat()).unwrap();
}

/// `n` allowed tag changes and one denied, through `proxy`.
async fn traffic(addr: std::net::SocketAddr, label: &str, n: usize) {
    for i in 0..n {
        allowed_change(addr, &format!("{label}-{i}")).await;
    }
    let denied = call(addr, "TagResource", &tag_body(&[("Project", "x")])).await;
    assert!(denied.status >= 400, "{}", denied.body_str());
}

/// A TagResource the test policy allows (`team:app` set to `value`), answered 200.
async fn allowed_change(addr: std::net::SocketAddr, value: &str) {
    let response = call(addr, "TagResource", &tag_body(&[("team:app", value)])).await;
    assert_eq!(response.status, 200, "{}", response.body_str());
}

fn signed_config(fake: &FakeKms, audit: &Path, key: &Path, every: u64) -> ProxyConfig {
    ProxyConfig {
        endpoint: Some(fake.url()),
        audit_path: Some(audit.to_owned()),
        audit: format!(
            "signing_key = \"{}\"\ncheckpoint_every = {every}\n",
            key.display()
        ),
        policy: TEST_POLICY.to_owned(),
        ..ProxyConfig::default()
    }
}

/// A real log: 6 allowed changes (decision and outcome each), one denied, signed every 4
/// records, ended by the checkpoint the writer signs as it stops.
async fn real_log(dir: &Path) -> (PathBuf, PathBuf) {
    let fake = FakeKms::start().await;
    let (key, public) = key_in(dir);
    let audit = dir.join("audit.log");
    let proxy = start_proxy_with(&fake, signed_config(&fake, &audit, &key, 4)).await;
    traffic(proxy.addr, "ledger", 6).await;
    proxy.settled_audit().await;
    proxy.proxy.shutdown();
    proxy.proxy.wait().await;
    (audit, public)
}

fn event(line: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(line).unwrap();
    value["event"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_log_verifies_whole_and_each_change_is_found_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let (audit, public) = real_log(dir.path()).await;
    let lines = lines_of(&audit);
    let events: Vec<String> = lines.iter().map(|l| event(l)).collect();
    // 13 records, a checkpoint after every 4th and one at the end.
    assert_eq!(
        events.iter().filter(|e| *e == "checkpoint").count(),
        4,
        "{events:?}"
    );
    assert_eq!(events.last().unwrap(), "checkpoint");
    assert_eq!(events.len(), 17, "{events:?}");
    // Every line links to the exact bytes of the one before; the first to genesis.
    assert_eq!(parse_seal(&lines[0]).unwrap(), (0, [0; 32]));
    for (i, pair) in lines.windows(2).enumerate() {
        assert_eq!(
            parse_seal(&pair[1]).unwrap(),
            (i as u64 + 1, line_hash(&pair[0]))
        );
    }

    let (code, out) = verify_cli(&[
        Path::new("--public-key"),
        &public,
        Path::new("--from-genesis"),
        &audit,
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("The chain is whole."), "{out}");
    assert!(out.contains("4/4 checkpoints valid"), "{out}");
    assert!(
        out.contains("Every line is covered by a valid checkpoint"),
        "{out}"
    );
    assert!(out.contains("Chain begins at genesis"), "{out}");

    let tampered = dir.path().join("tampered.log");
    let check = |lines: &[Vec<u8>], expect: &[&str]| {
        write_lines(&tampered, lines);
        let (code, out) = verify_cli(&[
            Path::new("--public-key"),
            &public,
            Path::new("--from-genesis"),
            &tampered,
        ]);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("INVALID: the chain is not whole."), "{out}");
        for expected in expect {
            assert!(out.contains(expected), "{expected:?} in\n{out}");
        }
    };

    // One byte edited in a decision: the value the second change set.
    let mut edited = lines.clone();
    let index = events
        .iter()
        .zip(&lines)
        .position(|(e, l)| e == "decision" && l.windows(8).any(|w| w == b"ledger-1"))
        .expect("the second change's decision");
    let at = edited[index]
        .windows(8)
        .position(|w| w == b"ledger-1")
        .unwrap();
    edited[index][at + 7] = b'9';
    check(
        &edited,
        &[&format!(
            "tampered.log line {}: INVALID (changed)",
            index + 1
        )],
    );

    // A line deleted (line 6): the line now at 6 says one line is missing before it.
    let mut deleted = lines.clone();
    deleted.remove(5);
    check(
        &deleted,
        &["tampered.log line 6: INVALID (removed): 1 line(s) removed before it (seq 5..5"],
    );

    // Two lines swapped (7 and 8).
    let mut swapped = lines.clone();
    swapped.swap(6, 7);
    check(
        &swapped,
        &[
            "tampered.log line 7: INVALID (reordered)",
            "tampered.log line 8: INVALID (reordered)",
        ],
    );

    // A line inserted after line 3, sealed to follow it as the writer would have.
    let mut inserted = lines.clone();
    let forged = format!(
        "{{\"seq\":3,\"prev\":\"{}\",\"event\":\"decision\",\"decision\":\"allow\"}}\n",
        hex::encode(line_hash(&lines[2]))
    );
    inserted.insert(3, forged.into_bytes());
    check(&inserted, &["tampered.log line 4: INVALID (inserted)"]);

    // The first line removed: the rest is linked, but does not begin at genesis.
    check(&lines[1..], &[]);

    // A line repeated.
    let mut repeated = lines.clone();
    repeated.insert(9, lines[8].clone());
    check(&repeated, &["tampered.log line 10: INVALID (duplicated)"]);

    // The last checkpoint edited (its time): its signature fails.
    let mut resigned = lines.clone();
    let last = resigned.len() - 1;
    let t = resigned[last]
        .windows(7)
        .position(|w| w == b"\"time\":")
        .unwrap()
        + 9;
    resigned[last][t] = if resigned[last][t] == b'1' {
        b'2'
    } else {
        b'1'
    };
    check(
        &resigned,
        &["tampered.log line 17: INVALID (checkpoint): checkpoint INVALID: its signature does not verify"],
    );

    // The last line removed: what remains is linked, but its tail is unsigned, and says so.
    write_lines(&tampered, &lines[..lines.len() - 1]);
    let (code, out) = verify_cli(&[Path::new("--public-key"), &public, &tampered]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("Unsigned: 1 line(s) from ") && out.contains("tampered.log line 16 on"),
        "{out}"
    );

    // The tail cut right after a checkpoint (the last checkpoint and the records before it
    // removed): the file alone cannot show it (docs/security.md) ...
    let cut_at = events[..last]
        .iter()
        .rposition(|e| e == "checkpoint")
        .unwrap();
    write_lines(&tampered, &lines[..=cut_at]);
    let (code, out) = verify_cli(&[Path::new("--public-key"), &public, &tampered]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("The chain is whole."), "{out}");
    // ... a copy of the last checkpoint kept elsewhere (the anchor) does.
    let anchor = dir.path().join("anchor");
    std::fs::write(&anchor, &lines[last]).unwrap();
    let (code, out) = verify_cli(&[
        Path::new("--public-key"),
        &public,
        Path::new("--anchor"),
        &anchor,
        &tampered,
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "INVALID (truncated): the log ends at seq {cut_at}, before the anchored checkpoint at seq {last}"
        )),
        "{out}"
    );
    // The whole log reaches the anchor.
    let (code, _) = verify_cli(&[Path::new("--anchor"), &anchor, &audit]);
    assert_eq!(code, 0);

    // Another key's public key: every checkpoint fails.
    let other = tempfile::tempdir().unwrap();
    let (_, other_public) = key_in(other.path());
    let (code, out) = verify_cli(&[Path::new("--public-key"), &other_public, &audit]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not by the key given"), "{out}");

    // JSON for machines.
    let output = Command::new(env!("CARGO_BIN_EXE_kms-tag-guard"))
        .args(["audit", "verify", "--format", "json"])
        .arg(&tampered)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["valid"], true);
    assert_eq!(report["lines"], cut_at as u64 + 1);
}

/// An idle writer signs what it wrote within `checkpoint_interval_ms`, while the proxy runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_writer_signs_its_last_records_within_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let (key, public) = key_in(dir.path());
    let audit = dir.path().join("audit.log");
    let mut config = signed_config(&fake, &audit, &key, 1000);
    config.audit.push_str("checkpoint_interval_ms = 300\n");
    let proxy = start_proxy_with(&fake, config).await;
    traffic(proxy.addr, "idle", 1).await;
    let signed = || {
        let lines = lines_of(&audit);
        lines.len() >= 4 && event(lines.last().unwrap()) == "checkpoint"
    };
    assert!(
        poll_until(Duration::from_secs(5), signed).await,
        "no checkpoint after the last records: {:?}",
        std::fs::read_to_string(&audit)
    );
    let (code, out) = verify_cli(&[Path::new("--public-key"), &public, &audit]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("Every line is covered by a valid checkpoint"),
        "{out}"
    );
    // Nothing new: no more checkpoints.
    let before = lines_of(&audit).len();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(lines_of(&audit).len(), before);
    proxy.proxy.shutdown();
    proxy.proxy.wait().await;
    assert_eq!(
        lines_of(&audit).len(),
        before,
        "nothing left to sign at the stop"
    );
}

/// A restart appends to its own file: the chain goes on from the last line, no break.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_appending_goes_on_with_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let (key, public) = key_in(dir.path());
    let audit = dir.path().join("audit.log");
    for run in ["first", "second"] {
        let proxy = start_proxy_with(&fake, signed_config(&fake, &audit, &key, 1000)).await;
        traffic(proxy.addr, run, 2).await;
        proxy.settled_audit().await;
        proxy.proxy.shutdown();
        proxy.proxy.wait().await;
    }
    let lines = lines_of(&audit);
    let seqs: Vec<u64> = lines.iter().map(|l| parse_seal(l).unwrap().0).collect();
    assert_eq!(seqs, (0..lines.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        lines.iter().filter(|l| event(l) == "checkpoint").count(),
        2,
        "one as each run stopped"
    );
    let (code, out) = verify_cli(&[Path::new("--public-key"), &public, &audit]);
    assert_eq!(code, 0);
    assert!(
        out.contains("Every line is covered by a valid checkpoint"),
        "{out}"
    );
    assert!(!out.contains("new chain"), "{out}");
}

/// The records of `path` as (event, request_id, seq).
/// A proxy in front of `fake` auditing to `audit.log` in `dir`, with the test policy.
async fn audited_proxy(fake: &FakeKms, dir: &Path) -> (PathBuf, TestProxy) {
    let audit = dir.join("audit.log");
    let config = ProxyConfig {
        endpoint: Some(fake.url()),
        audit_path: Some(audit.clone()),
        admin: true,
        ..ProxyConfig::default()
    };
    (audit.clone(), start_proxy_with(fake, config).await)
}

fn events_of(path: &Path) -> Vec<(String, String, u64)> {
    lines_of(path)
        .iter()
        .filter(|line| event(line) != "chain_start")
        .map(|line| {
            let value: serde_json::Value = serde_json::from_slice(line).unwrap();
            let id = value["request_id"].as_str().unwrap_or_default().to_owned();
            (event(line), id, parse_seal(line).unwrap().0)
        })
        .collect()
}

/// Every allowed decision in `records` has its outcome after it in the chain.
fn outcomes_follow_decisions(records: &[(String, String, u64)]) {
    for (event, id, seq) in records {
        if event == "decision" {
            let outcome = records.iter().find(|(e, i, _)| e == "outcome" && i == id);
            if let Some((_, _, after)) = outcome {
                assert!(after > seq, "the outcome of {id} comes before its decision");
            }
        }
    }
}

/// An outcome record is left for the next write (issue 20): with nothing else coming, the writer
/// thread writes it on its own, after its decision, in chain order; a run of changes one at a
/// time (each outcome carried by the next decision's write) leaves the chain whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_is_written_after_its_decision_when_nothing_else_comes() {
    let fake = FakeKms::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (audit, proxy) = audited_proxy(&fake, dir.path()).await;
    allowed_change(proxy.addr, "idle").await;
    // Nothing else comes: no other write carries the outcome.
    assert!(
        poll_until(Duration::from_secs(5), || events_of(&audit).len() == 2).await,
        "the outcome was not written: {:?}",
        events_of(&audit)
    );
    let records = events_of(&audit);
    assert_eq!(records[0].0, "decision");
    assert_eq!(records[1].0, "outcome");
    assert_eq!(records[0].1, records[1].1);
    let (code, out) = verify_cli(&[&audit]);
    assert_eq!(code, 0, "{out}");

    traffic(proxy.addr, "serial", 20).await;
    let settled = proxy.settled_audit().await;
    assert_eq!(settled.len(), 2 + 21 + 20, "{settled:?}");
    outcomes_follow_decisions(&events_of(&audit));
    let (code, out) = verify_cli(&[&audit]);
    assert_eq!(code, 0, "{out}");
    proxy.proxy.shutdown();
    proxy.proxy.wait().await;
}

/// A client that sends tag changes and never reads its answers (a receive buffer of a few KiB,
/// answers of 3.5 MiB) cannot hold back their outcome records: the first answer cannot be
/// written whole, and its outcome is in the log anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_cannot_hold_back_an_outcome() {
    use tokio::io::AsyncWriteExt;
    let fake = FakeKms::start().await;
    let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(3_500_000));
    fake.set_status_override(Some((200, body)));
    let dir = tempfile::tempdir().unwrap();
    let (audit, proxy) = audited_proxy(&fake, dir.path()).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut client = socket.connect(proxy.addr).await.unwrap();
    let requests: Vec<u8> = (0..3)
        .flat_map(|i| {
            common::ops::signed(
                proxy.addr,
                "TagResource",
                &tag_body(&[("team:app", &format!("unread-{i}"))]),
            )
            .to_bytes()
        })
        .collect();
    client.write_all(&requests).await.unwrap();
    let outcomes = || {
        events_of(&audit)
            .iter()
            .filter(|(event, _, _)| event == "outcome")
            .count()
    };
    assert!(
        poll_until(Duration::from_secs(10), || outcomes() >= 1).await,
        "outcomes held back by a client that does not read: {:?}",
        events_of(&audit)
    );
    // The connection waits for the client with the first answer: the next requests are not
    // forwarded.
    assert_eq!(fake.count(), 1);
    outcomes_follow_decisions(&events_of(&audit));
    drop(client);
    proxy.proxy.shutdown();
    proxy.proxy.wait().await;
    let (code, out) = verify_cli(&[&audit]);
    assert_eq!(code, 0, "{out}");
}

/// Shutdown right after a tag change is answered, its outcome perhaps still left for the next
/// write: the outcome is in the file and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_writes_an_outcome_left_for_the_next_write() {
    let fake = FakeKms::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (audit, proxy) = audited_proxy(&fake, dir.path()).await;
    allowed_change(proxy.addr, "last").await;
    proxy.proxy.shutdown();
    proxy.proxy.wait().await;
    let records = events_of(&audit);
    let names: Vec<&str> = records.iter().map(|(e, _, _)| e.as_str()).collect();
    assert_eq!(names, ["decision", "outcome"], "{records:?}");
    let (code, out) = verify_cli(&[&audit]);
    assert_eq!(code, 0, "{out}");
}

/// A reopen (what SIGHUP does) right after a tag change is answered, the file moved away first:
/// the outcome goes to the old file with its decision, the next change to the new file, and the
/// two files are one chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopen_writes_an_outcome_left_for_the_next_write_to_the_old_file() {
    let fake = FakeKms::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (audit, proxy) = audited_proxy(&fake, dir.path()).await;
    let old = dir.path().join("audit.log.1");
    allowed_change(proxy.addr, "old").await;
    // Made, though perhaps not yet written (left for the next write): an outcome made after
    // the reopen would rightly go to the new file.
    assert!(outcome_made(proxy.admin_addr.unwrap(), &audit).await);
    std::fs::rename(&audit, &old).unwrap();
    proxy.proxy.reload();
    assert!(
        poll_until(Duration::from_secs(5), || audit.exists()).await,
        "the audit file was not opened again"
    );
    allowed_change(proxy.addr, "new").await;
    proxy.proxy.shutdown();
    proxy.proxy.wait().await;
    let names =
        |path: &Path| -> Vec<String> { events_of(path).into_iter().map(|(e, _, _)| e).collect() };
    assert_eq!(names(&old), ["decision", "outcome"]);
    assert_eq!(names(&audit), ["decision", "outcome"]);
    let (code, out) = verify_cli(&[&old, &audit]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("The chain is whole."), "{out}");
}

fn logrotate(dir: &Path, config: &str) {
    let conf = dir.join("logrotate.conf");
    std::fs::write(&conf, config).unwrap();
    let output = Command::new("logrotate")
        .arg("-f")
        .arg("-s")
        .arg(dir.join("logrotate.state"))
        .arg(&conf)
        .output()
        .expect("logrotate is installed (apt-get install logrotate)");
    assert!(
        output.status.success(),
        "logrotate: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// logrotate, as deployed: once with copytruncate (the proxy writes on, to the same file), once
/// with create and a SIGHUP from postrotate (the proxy reopens its path), the older file
/// compressed. The rotated files, oldest first, are one chain; the new file's first line names
/// the last line of the file before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logrotate_copytruncate_and_create_with_sighup_keep_one_chain() {
    if Command::new("logrotate").arg("--version").output().is_err() {
        panic!("logrotate is not installed: apt-get install logrotate (.ci/run installs it)");
    }
    let fake = FakeKms::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = key_in(dir.path());
    let audit = dir.path().join("audit.log");
    let mut config = signed_config(&fake, &audit, &key, 5);
    config.shutdown = "grace_ms = 2000".into();
    let mut serve = start_child(ChildOptions::with_config(config)).await;
    let addr = serve.addr;

    traffic(addr, "one", 3).await;
    common::proxy::settled_audit(&audit).await;
    logrotate(
        dir.path(),
        &format!(
            "{} {{\n  rotate 5\n  copytruncate\n  compress\n  delaycompress\n  missingok\n}}\n",
            audit.display()
        ),
    );
    traffic(addr, "two", 3).await;
    common::proxy::settled_audit(&audit).await;
    logrotate(
        dir.path(),
        &format!(
            "{} {{\n  rotate 5\n  create 0600\n  compress\n  delaycompress\n  postrotate\n    kill -HUP {}\n  endscript\n}}\n",
            audit.display(),
            serve.pid
        ),
    );
    // The reopen: the next records go to the new file.
    traffic(addr, "three", 3).await;
    assert!(
        poll_until(Duration::from_secs(5), || !common::proxy::read_audit(
            &audit
        )
        .is_empty())
        .await,
        "nothing in the new file after SIGHUP"
    );
    serve.signal("TERM");
    let (status, _) = serve
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status}\n{}", serve.stderr());

    let oldest = dir.path().join("audit.log.2.gz");
    let middle = dir.path().join("audit.log.1");
    assert!(oldest.exists() && middle.exists());
    let (code, out) = verify_cli(&[Path::new("--public-key"), &public, &oldest, &middle, &audit]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(gzip)"), "{out}");
    assert!(out.contains("The chain is whole."), "{out}");
    assert!(out.contains("Chain begins at genesis"), "{out}");

    // The current file alone: it begins after a line these files do not hold.
    let (code, out) = verify_cli(&[&audit]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("which these files do not hold"), "{out}");
    // Out of order, or one left out: the break is found.
    let (code, out) = verify_cli(&[&middle, &oldest, &audit]);
    assert_eq!(code, 1, "{out}");
    let (code, out) = verify_cli(&[&oldest, &audit]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("(removed)"), "{out}");
}

/// A tmpfs of 64 KiB to fill (as tests/audit_faults.rs does); `None` (the test is skipped, and
/// says so) where mounting is not permitted.
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
            other => {
                eprintln!("SKIPPED: cannot mount a tmpfs (run the test as root): {other:?}");
                None
            }
        }
    }

    /// Fills it to the last byte; the file to remove to give the space back.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        for chunk in [4096, 1] {
            let bytes = vec![b'x'; chunk];
            while file.write_all(&bytes).is_ok() {}
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Tag changes while the disk is full (refused, 503) and after it has space again, until one is
/// forwarded.
async fn through_a_full_disk(addr: std::net::SocketAddr, fs: &Tmpfs) -> usize {
    let tag = |label: String| async move {
        call(addr, "TagResource", &tag_body(&[("team:app", &label)]))
            .await
            .status
    };
    for i in 0..2 {
        assert_eq!(tag(format!("before-{i}")).await, 200);
    }
    let filler = fs.fill();
    let mut refused = 0;
    for i in 0..8 {
        refused += usize::from(tag(format!("full-{i}")).await == 503);
    }
    std::fs::remove_file(&filler).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut i = 0;
    while tag(format!("after-{i}")).await != 200 {
        assert!(std::time::Instant::now() < deadline, "no recovery in 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
        i += 1;
    }
    refused
}

/// A disk that fills under the audit file: the writer cuts back the batch it could not write
/// and writes it again, byte for byte, when space returns; standard output, which cannot be cut
/// back, completes the line it cut. Either way the chain, and its checkpoints, stay whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_rolled_back_on_a_full_disk_leaves_the_chain_whole() {
    let Some(fs) = Tmpfs::mount() else { return };
    let fake = FakeKms::start().await;
    let keys_dir = tempfile::tempdir().unwrap();
    let (key, public) = key_in(keys_dir.path());

    // The file, in process.
    let audit = fs.0.join("audit.log");
    let mut config = signed_config(&fake, &audit, &key, 3);
    config.audit.push_str("stall_timeout_ms = 1000\n");
    let proxy = start_proxy_with(&fake, config).await;
    let refused = through_a_full_disk(proxy.addr, &fs).await;
    assert!(refused >= 4, "the full disk refused only {refused}");
    proxy.settled_audit().await;
    proxy.proxy.shutdown();
    proxy.proxy.wait().await;
    let (code, out) = verify_cli(&[
        Path::new("--public-key"),
        &public,
        Path::new("--from-genesis"),
        &audit,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("Every line is covered by a valid checkpoint"),
        "{out}"
    );
    std::fs::remove_file(&audit).unwrap();

    // Standard output, redirected to a file on the disk: the real binary.
    let out_path = fs.0.join("audit.out");
    let mut config = signed_config(&fake, Path::new("-"), &key, 3);
    config.audit_path = None;
    config.audit.push_str("stall_timeout_ms = 1000\n");
    let port = common::ops::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    config.listener_address = Some(addr.to_string());
    let config_path = keys_dir.path().join("kms-tag-guard.toml");
    std::fs::write(&config_path, config.render()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kms-tag-guard"))
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(keys_dir.path().join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    assert!(
        poll_until(Duration::from_secs(10), || std::net::TcpStream::connect(
            addr
        )
        .is_ok())
        .await,
        "the proxy did not listen"
    );
    let refused = through_a_full_disk(addr, &fs).await;
    assert!(refused >= 4, "the full disk refused only {refused}");
    // SAFETY: kill(2) on the child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let (code, out) = verify_cli(&[
        Path::new("--public-key"),
        &public,
        Path::new("--from-genesis"),
        &out_path,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("Every line is covered by a valid checkpoint"),
        "{out}"
    );
}

#[test]
fn keygen_writes_a_private_key_once_and_prints_the_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("signing.key");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_kms-tag-guard"))
            .args(["audit", "keygen", "--out"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success());
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(stdout.contains("-----BEGIN PUBLIC KEY-----"), "{stdout}");
    assert!(stdout.contains("signing_key = "), "{stdout}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let before = std::fs::read(&out).unwrap();
    let second = run();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("never writes over"));
    assert_eq!(std::fs::read(&out).unwrap(), before);
    // `check` reads the key as serve would: a key others may read is refused.
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[audit]\npath = \"-\"\nsigning_key = \"{}\"\n\n{TEST_POLICY}",
            out.display()
        ),
    )
    .unwrap();
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_kms-tag-guard"))
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    assert!(check().status.success());
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = check();
    assert_eq!(refused.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("chmod 600"));
}

// ------------------------------------------------------------------------ property test

/// A log as the writer seals it: random records, a checkpoint every `every`, one at the end.
fn sealed_log(records: &[String], every: u64, key: &Path) -> Vec<Vec<u8>> {
    let signing = keys::load_signing_key(key).unwrap();
    let mut sealer = Sealer::with(Some(Checkpoints::new(
        signing,
        every,
        Duration::from_secs(3600),
    )));
    let mut batch = Vec::new();
    sealer.begin(None, &mut batch);
    for record in records {
        let mut line =
            serde_json::to_vec(&serde_json::json!({"event": "decision", "value": record})).unwrap();
        line.push(b'\n');
        sealer.seal(&line, &mut batch);
    }
    sealer.checkpoint(&mut batch);
    batch
        .split_inclusive(|b| *b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

#[derive(Debug, Clone)]
enum Edit {
    Flip { line: usize, byte: usize, mask: u8 },
    Delete(usize),
    Swap(usize, usize),
    Duplicate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<usize>(), 1..=255u8).prop_map(|(line, byte, mask)| Edit::Flip {
            line,
            byte,
            mask
        }),
        any::<usize>().prop_map(Edit::Delete),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::Swap(a, b)),
        any::<usize>().prop_map(Edit::Duplicate),
    ]
}

fn apply(lines: &mut Vec<Vec<u8>>, edit: &Edit) -> bool {
    let n = lines.len();
    match *edit {
        Edit::Flip { line, byte, mask } => {
            let line = &mut lines[line % n];
            let at = byte % line.len();
            line[at] ^= mask;
        }
        Edit::Delete(i) => {
            lines.remove(i % n);
        }
        Edit::Swap(a, b) => {
            if a % n == b % n {
                return false;
            }
            lines.swap(a % n, b % n);
        }
        Edit::Duplicate(i) => {
            let line = lines[i % n].clone();
            lines.insert(i % n, line);
        }
    }
    true
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// No single edit of a signed log (a byte flipped anywhere, a line deleted, two swapped, one
    /// repeated) verifies as whole and signed to its end.
    #[test]
    fn no_single_edit_verifies_whole(
        records in prop::collection::vec("[ -~]{0,40}", 1..24),
        every in 1u64..6,
        edit in edit(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (key, public) = key_in(dir.path());
        let public = keys::load_public_key(&public).unwrap();
        let mut lines = sealed_log(&records, every, &key);
        let path = dir.path().join("audit.log");
        write_lines(&path, &lines);
        let options = verify::Options { key: Some(public), anchors: Vec::new(), from_genesis: true };
        let untouched = verify::verify(std::slice::from_ref(&path), &options).unwrap();
        prop_assert!(untouched.valid && untouched.signed_to_the_end(), "{}", untouched.text());

        prop_assume!(apply(&mut lines, &edit));
        write_lines(&path, &lines);
        let report = verify::verify(std::slice::from_ref(&path), &options).unwrap();
        prop_assert!(
            !report.signed_to_the_end(),
            "{edit:?} verified whole:\n{}",
            report.text()
        );
        // Without the key, every edit but one of the last line is still found.
        let keyless = verify::Options { key: None, ..options };
        let keyless = verify::verify(std::slice::from_ref(&path), &keyless).unwrap();
        let last_line_only = match edit {
            Edit::Flip { line, .. } => line % (lines.len()) == lines.len() - 1,
            Edit::Delete(i) => i % (lines.len() + 1) == lines.len(),
            _ => false,
        };
        if !last_line_only {
            prop_assert!(!keyless.valid, "{edit:?} verified whole without the key:\n{}", keyless.text());
        }
    }
}
