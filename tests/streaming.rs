//! Streaming (contract sections 1, 4.2, 4.3 and 4.6): pass-through bodies are streamed, not
//! buffered; tag-bearing bodies are read whole before anything reaches KMS; answers come back
//! unchanged.
//!
//! No timing thresholds: the tests check causal order (what the fake KMS had received at the
//! moment the client had sent only part of a body).

mod common;

use std::time::{Duration, Instant};

use common::raw::{self, RawConn, RawRequest};
use common::sentinel::{is_sentinel, seen_besides_sentinels};
use common::*;

const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
const WAIT: Duration = Duration::from_secs(5);

/// A valid Encrypt body of exactly `len` bytes (the padding is an encryption-context value).
fn encrypt_body_of_len(len: usize) -> Vec<u8> {
    let head = format!(r#"{{"KeyId":"{KEY}","Plaintext":"aGVsbG8=","EncryptionContext":{{"pad":""#);
    let tail = r#""}}"#;
    let pad = len - head.len() - tail.len();
    let mut body = Vec::with_capacity(len);
    body.extend_from_slice(head.as_bytes());
    body.resize(head.len() + pad, b'x');
    body.extend_from_slice(tail.as_bytes());
    assert_eq!(body.len(), len);
    body
}

#[tokio::test]
async fn a_pass_through_body_is_streamed_not_buffered() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let body = encrypt_body_of_len(4 << 20);
    let request = RawRequest::signed_kms(&fake.host(), "TrentService.Encrypt", &body);
    let first = 64 << 10;

    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    conn.write(&request.head_bytes()).await.unwrap();
    conn.write(&body[..first]).await.unwrap();

    // The upstream must see the first body bytes while most of the body is still with the client.
    let progress = fake
        .wait_for_progress(WAIT, |p| {
            p.target.as_deref() == Some("TrentService.Encrypt") && p.bytes_received > 0
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "the upstream received no body bytes before the client sent the rest: \
                 the pass-through body is buffered; progress {:?}",
                fake.progress()
            )
        });
    assert!(progress.bytes_received <= first, "{progress:?}");
    assert!(progress.complete_at.is_none(), "{progress:?}");
    let rest_sent_at = Instant::now();

    conn.write(&body[first..]).await.unwrap();
    let response = conn.read_response().await.unwrap();
    assert_eq!(response.status, 200, "{}", response.body_str());
    assert_eq!(response.header("x-kms-tag-guard"), None);

    let recorded = fake.wait_for_requests(1, WAIT).await;
    assert_eq!(recorded.len(), 1);
    let rec = &recorded[0];
    assert_eq!(rec.operation(), Some("Encrypt"));
    assert!(rec.body[..] == body[..], "the forwarded body differs");
    rec.verified();
    let first_byte = rec.first_body_byte_at.expect("first body byte time");
    assert!(first_byte < rest_sent_at);
    assert!(rec.received_at >= rest_sent_at);
    // Pass-through requests are not audited.
    assert!(proxy.audit().is_empty(), "{:?}", proxy.audit());
}

#[tokio::test]
async fn a_tag_bearing_body_is_read_whole_before_anything_is_forwarded() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let body = format!(
        r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:owner","TagValue":"payments"}},{{"TagKey":"app:tier","TagValue":"gold"}},{{"TagKey":"cost:center","TagValue":"1234"}}]}}"#
    );
    let body = body.as_bytes();
    let request = RawRequest::signed_kms(&fake.host(), "TrentService.TagResource", body);
    let half = body.len() / 2;

    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    conn.write(&request.head_bytes()).await.unwrap();
    conn.write(&body[..half]).await.unwrap();
    let (seen, heads) = seen_besides_sentinels("half a TagResource", &fake, proxy.addr).await;
    assert!(seen.is_empty(), "{seen:?}");
    assert!(
        heads.is_empty(),
        "the upstream saw part of a tag-bearing request: {heads:?}"
    );
    assert!(
        proxy.audit().is_empty(),
        "decided before the body arrived: {:?}",
        proxy.audit()
    );
    let rest_sent_at = Instant::now();

    conn.write(&body[half..]).await.unwrap();
    let response = conn.read_response().await.unwrap();
    assert_eq!(response.status, 200, "{}", response.body_str());

    let recorded: Vec<_> = fake
        .wait_for_requests(2, WAIT)
        .await
        .into_iter()
        .filter(|r| !is_sentinel(r))
        .collect();
    assert_eq!(recorded.len(), 1);
    let rec = &recorded[0];
    assert_eq!(rec.operation(), Some("TagResource"));
    assert_eq!(&rec.body[..], body);
    rec.verified();
    assert!(
        rec.head_received_at >= rest_sent_at,
        "the upstream saw the head before the whole body had been sent"
    );
    let audit = proxy.wait_for_audit(2).await;
    assert_eq!(audit[0]["event"], "decision", "{audit:?}");
    assert_eq!(audit[0]["decision"], "allow", "{audit:?}");
}

#[tokio::test]
async fn an_encrypt_answer_reaches_the_client_unchanged() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let body = format!(r#"{{"KeyId":"{KEY}","Plaintext":"c3RyZWFtaW5nIHRlc3Q="}}"#);
    let request =
        RawRequest::signed_kms(&fake.host(), "TrentService.Encrypt", body.as_bytes()).to_bytes();

    let direct = raw::send(fake.addr(), &request).await;
    let proxied = raw::send(proxy.addr, &request).await;
    assert_eq!(direct.status, 200, "{}", direct.body_str());
    assert_eq!(proxied.status, 200, "{}", proxied.body_str());
    assert_eq!(
        proxied.body,
        direct.body,
        "proxied {} vs direct {}",
        proxied.body_str(),
        direct.body_str()
    );
    assert_eq!(
        proxied.header("content-type"),
        direct.header("content-type")
    );
    assert_eq!(proxied.header("x-kms-tag-guard"), None);
    // KMS's own request id is relayed (the fake makes a new one per request).
    let proxied_id = proxied.header("x-amzn-requestid").expect("request id");
    assert_ne!(Some(proxied_id), direct.header("x-amzn-requestid"));

    let recorded = fake.wait_for_requests(2, WAIT).await;
    for rec in &recorded {
        rec.verified();
    }
}

#[tokio::test]
async fn arbitrary_answer_bytes_are_relayed_unchanged() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    // Not JSON a re-serialiser would reproduce: odd spacing, escapes, a trailing newline.
    let answer_body = "{ \"KeyId\" :\"k\\u0041\",\t\"Extra\":[1,2.50,1e3] }\n";
    for (status, target, body) in [
        (
            200,
            "TrentService.Encrypt",
            format!(r#"{{"KeyId":"{KEY}","Plaintext":"aGk="}}"#),
        ),
        (
            400,
            "TrentService.Encrypt",
            format!(r#"{{"KeyId":"{KEY}","Plaintext":"aGk="}}"#),
        ),
        (
            200,
            "TrentService.TagResource",
            format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:a","TagValue":"b"}}]}}"#),
        ),
    ] {
        fake.set_status_override(Some((status, answer_body.to_owned())));
        let request = RawRequest::signed_kms(&fake.host(), target, body.as_bytes()).to_bytes();
        let proxied = raw::send(proxy.addr, &request).await;
        assert_eq!(proxied.status, status, "{target}: {}", proxied.body_str());
        assert_eq!(
            proxied.body_str(),
            answer_body,
            "{target} {status}: the answer was changed"
        );
        assert_eq!(
            proxied.header("content-type"),
            Some("application/x-amz-json-1.1")
        );
        assert_eq!(proxied.header("x-kms-tag-guard"), None, "{target} {status}");
    }
}
