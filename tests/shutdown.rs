//! Graceful shutdown of the real binary (`kms-tag-guard serve`): SIGTERM makes `/readyz` fail at
//! once, new connections are accepted for `drain_delay_ms`, in-flight requests finish and are
//! audited, and the process exits 0 within `grace_ms`; a second signal exits at once.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::child::{start_child, ChildOptions, ChildProxy};
use common::ops::*;
use common::*;
use tokio::task::JoinSet;

/// A `serve` process in front of `fake`, with `[shutdown]` as given.
async fn serve(fake: &FakeKms, dir: &Path, shutdown: &str) -> (ChildProxy, SocketAddr, SocketAddr) {
    let mut config = ProxyConfig::with_admin(&fake.url(), &dir.join("audit.log"), TEST_POLICY);
    config.shutdown = shutdown.into();
    let process = start_child(ChildOptions::with_config(config)).await;
    let (addr, admin) = (process.addr, process.admin());
    (process, addr, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let fake = FakeKms::start().await;
    fake.set_delay(Duration::from_millis(1500));
    let dir = tempfile::tempdir().unwrap();
    let grace = Duration::from_millis(8000);
    let (mut process, addr, admin) = serve(
        &fake,
        dir.path(),
        &format!("drain_delay_ms = 1000\ngrace_ms = {}", grace.as_millis()),
    )
    .await;
    assert_eq!(admin_get(admin, "/readyz").await.status, 200);

    // 50 slow requests in flight: 20 tag changes, 30 Encrypt.
    let completed = Arc::new(AtomicUsize::new(0));
    let mut in_flight = JoinSet::new();
    for i in 0..50 {
        let completed = Arc::clone(&completed);
        in_flight.spawn(async move {
            let (operation, body, value) = if i < 20 {
                let value = format!("drain-{i}");
                (
                    "TagResource",
                    tag_body(&[("team:drain", &value)]),
                    Some(value),
                )
            } else {
                ("Encrypt", encrypt_body(), None)
            };
            let response = call(addr, operation, &body).await;
            completed.fetch_add(1, Ordering::SeqCst);
            (response, value)
        });
    }
    fake.wait_for_requests(50, Duration::from_secs(10)).await;

    process.signal("TERM");
    let signalled = Instant::now();
    // /readyz fails at once, before any in-flight request is done; /healthz still answers.
    loop {
        let ready = admin_get(admin, "/readyz").await;
        if ready.status == 503 {
            break;
        }
        assert_eq!(ready.status, 200);
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "/readyz still 200 a second after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let readyz_failed_after = signalled.elapsed();
    assert_eq!(
        completed.load(Ordering::SeqCst),
        0,
        "/readyz must fail before the in-flight requests finish"
    );
    assert_eq!(admin_get(admin, "/healthz").await.status, 200);

    // 300 ms in, within the 1000 ms drain delay: a new connection is still accepted and served.
    tokio::time::sleep_until((signalled + Duration::from_millis(300)).into()).await;
    let late = tokio::spawn(async move { call(addr, "Encrypt", &encrypt_body()).await });
    // After the drain delay the listener is closed.
    tokio::time::sleep_until((signalled + Duration::from_millis(1600)).into()).await;
    let refused = match RawConn::connect(addr).await {
        Err(_) => true,
        Ok(mut conn) => {
            let request = signed(addr, "Encrypt", &encrypt_body());
            conn.write(&request.to_bytes()).await.is_err() || conn.read_response().await.is_err()
        }
    };
    assert!(
        refused,
        "a connection 1.6 s after SIGTERM (drain 1 s) was served"
    );

    let late = late.await.unwrap();
    assert_eq!(late.status, 200, "{}", late.body_str());
    let mut values = Vec::new();
    while let Some(done) = in_flight.join_next().await {
        let (response, value) = done.unwrap();
        assert_eq!(response.status, 200, "{}", response.body_str());
        values.extend(value);
    }
    assert_eq!(values.len(), 20);

    let (status, _) = process
        .wait_exit(grace + Duration::from_secs(2))
        .await
        .unwrap_or_else(|| panic!("no exit within grace_ms\n{}", process.stderr()));
    let exited_after = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", process.stderr());
    assert!(exited_after < grace, "exit took {exited_after:?}");
    assert!(
        try_admin_get(admin, "/healthz").await.is_err(),
        "the admin port is gone with the process"
    );

    // Every tag change has its decision and its outcome on disk.
    let records = proxy::read_audit(&dir.path().join("audit.log"));
    assert_eq!(records.len(), 40, "{records:#?}");
    for value in &values {
        let decision: Vec<_> = records
            .iter()
            .filter(|r| r["event"] == "decision" && r["set"][0]["value"] == value.as_str())
            .collect();
        assert_eq!(decision.len(), 1, "decision for {value}");
        assert_eq!(decision[0]["decision"], "allow");
        let id = &decision[0]["request_id"];
        let outcome: Vec<_> = records
            .iter()
            .filter(|r| r["event"] == "outcome" && &r["request_id"] == id)
            .collect();
        assert_eq!(outcome.len(), 1, "outcome for {value}");
        assert_eq!(outcome[0]["upstream_status"], 200);
    }
    eprintln!(
        "figure: drain: /readyz 503 {readyz_failed_after:?} after SIGTERM; 51 requests finished; exit 0 {exited_after:?} after SIGTERM (drain 1000 ms, upstream delay 1500 ms, grace {grace:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_during_a_long_drain_exits_at_once() {
    let fake = FakeKms::start().await;
    fake.set_delay(Duration::from_secs(10));
    let dir = tempfile::tempdir().unwrap();
    let (mut process, addr, admin) = serve(
        &fake,
        dir.path(),
        "drain_delay_ms = 20000\ngrace_ms = 30000",
    )
    .await;
    let slow = tokio::spawn(async move {
        raw::try_send(addr, &signed(addr, "Encrypt", &encrypt_body()).to_bytes()).await
    });
    fake.wait_for_requests(1, Duration::from_secs(5)).await;

    process.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(2);
    while admin_get(admin, "/readyz").await.status != 503 {
        assert!(Instant::now() < deadline, "first SIGTERM not handled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The first signal is handled, and the watcher for a second one is in place (the signal
    // handlers are registered once, before serving, so the second signal is not missed).
    assert!(
        poll_until(Duration::from_secs(2), || process
            .stderr()
            .contains("a second signal exits at once"))
        .await,
        "{}",
        process.stderr()
    );
    assert!(!process.has_exited(), "still draining");
    process.signal("TERM");
    let second = Instant::now();
    let (status, _) = process
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| {
            panic!(
                "a second SIGTERM did not end the drain\n{}",
                process.stderr()
            )
        });
    let took = second.elapsed();
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
    assert_eq!(status.code(), Some(1), "{}", process.stderr());
    // The in-flight request is cut off: no answer.
    assert!(slow.await.unwrap().is_err());
    eprintln!("figure: second SIGTERM: exit {status} {took:?} after it (drain was 20 s)");
}
