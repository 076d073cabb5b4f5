//! Proof that a refused request did not reach the upstream, without a fixed wait: a sentinel, an
//! Encrypt of its own sent through the proxy afterwards, must arrive; once the fake has recorded
//! it, whatever the refused request made the proxy send upstream is seen too (the refusal was
//! answered before the sentinel was sent, and the proxy forwards a request before it answers it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::fake_kms::{FakeKms, Progress, Recorded};
use super::raw::{self, RawRequest};

/// Sentinels name this key alias (the fake answers for any alias), followed by a number.
const SENTINEL_KEY: &str = "alias/sentinel-";

/// Whether `rec` is a sentinel.
pub fn is_sentinel(rec: &Recorded) -> bool {
    rec.operation() == Some("Encrypt")
        && std::str::from_utf8(&rec.body).is_ok_and(|body| body.contains(SENTINEL_KEY))
}

/// Sends a sentinel through the proxy at `proxy` on a new connection, expects 200, and waits (up
/// to 5 s) until `fake` has recorded it, its signature verified. Returns its record.
pub async fn send_sentinel(case: &str, fake: &FakeKms, proxy: SocketAddr) -> Recorded {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let body = format!(r#"{{"KeyId":"{SENTINEL_KEY}{n}","Plaintext":"aGVsbG8="}}"#);
    let request = RawRequest::signed_kms(&fake.host(), "TrentService.Encrypt", body.as_bytes());
    let response = raw::send(proxy, &request.to_bytes()).await;
    assert_eq!(
        response.status,
        200,
        "{case}: the sentinel Encrypt after it failed: {}",
        response.body_str()
    );
    let find = || {
        fake.requests()
            .into_iter()
            .find(|r| r.body[..] == *body.as_bytes())
    };
    assert!(
        super::poll_until(Duration::from_secs(5), || find().is_some()).await,
        "{case}: the sentinel never reached the upstream"
    );
    let rec = find().unwrap();
    rec.verified();
    rec
}

/// Sends a sentinel ([`send_sentinel`]) and returns what `fake` has seen besides sentinels: the
/// recorded requests, and the heads of every request (complete or not).
pub async fn seen_besides_sentinels(
    case: &str,
    fake: &FakeKms,
    proxy: SocketAddr,
) -> (Vec<Recorded>, Vec<Progress>) {
    send_sentinel(case, fake, proxy).await;
    let (sentinels, requests): (Vec<Recorded>, Vec<Recorded>) =
        fake.requests().into_iter().partition(is_sentinel);
    let heads = fake
        .progress()
        .into_iter()
        .filter(|p| !sentinels.iter().any(|s| s.seq == p.seq))
        .collect();
    (requests, heads)
}

/// Nothing but sentinels reached `fake`: no request, not even a head.
pub async fn assert_nothing_forwarded(case: &str, fake: &FakeKms, proxy: SocketAddr) {
    let (requests, heads) = seen_besides_sentinels(case, fake, proxy).await;
    assert!(
        requests.is_empty(),
        "{case}: the request reached the upstream: {requests:#?}"
    );
    assert!(
        heads.is_empty(),
        "{case}: the upstream saw a request head: {heads:?}"
    );
}
