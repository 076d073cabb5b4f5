//! Self-tests of the shared harness (tests/common): no proxy involved.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use common::fake_kms::{base64_decode, base64_encode};
use common::*;
use http_body_util::Full;

const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";

#[tokio::test]
async fn sdk_client_against_fake_every_operation_verifies() {
    let fake = FakeKms::start().await;
    let kms = kms_client(&fake.url());

    let enc = kms
        .encrypt()
        .key_id(KEY)
        .plaintext(Blob::new(b"hello guard".to_vec()))
        .send()
        .await
        .expect("Encrypt");
    assert!(enc.key_id().unwrap().ends_with(KEY));
    let blob = enc.ciphertext_blob().expect("ciphertext").clone();

    let dec = kms
        .decrypt()
        .ciphertext_blob(blob)
        .send()
        .await
        .expect("Decrypt");
    assert_eq!(dec.plaintext().unwrap().as_ref(), b"hello guard");

    let dk = kms
        .generate_data_key()
        .key_id(KEY)
        .key_spec(DataKeySpec::Aes256)
        .send()
        .await
        .expect("GenerateDataKey");
    assert_eq!(dk.plaintext().unwrap().as_ref().len(), 32);
    assert!(dk.ciphertext_blob().is_some());

    let keys = kms.list_keys().send().await.expect("ListKeys");
    assert_eq!(keys.keys().len(), 1);
    assert!(!keys.truncated());

    let created = kms
        .create_key()
        .description("harness")
        .tags(tag("team:owner", "payments"))
        .tags(tag("cost:center", "1234"))
        .send()
        .await
        .expect("CreateKey");
    let meta = created.key_metadata().expect("KeyMetadata");
    assert_eq!(meta.key_state().map(|s| s.as_str()), Some("Enabled"));
    assert!(meta.creation_date().is_some());
    assert!(meta.arn().unwrap().starts_with("arn:aws:kms:us-east-1:"));

    kms.tag_resource()
        .key_id(KEY)
        .tags(tag("team:owner", "payments"))
        .send()
        .await
        .expect("TagResource");
    kms.untag_resource()
        .key_id(KEY)
        .tag_keys("team:owner")
        .send()
        .await
        .expect("UntagResource");

    let rep = kms
        .replicate_key()
        .key_id(format!("arn:aws:kms:us-east-1:111122223333:key/mrk-{KEY}"))
        .replica_region("eu-west-1")
        .tags(tag("team:owner", "payments"))
        .send()
        .await
        .expect("ReplicateKey");
    let rmeta = rep.replica_key_metadata().expect("ReplicaKeyMetadata");
    assert!(rmeta.arn().unwrap().contains(":eu-west-1:"));
    assert_eq!(rep.replica_tags().len(), 1);

    let reqs = fake.requests();
    let ops: Vec<_> = reqs.iter().map(|r| r.operation().unwrap()).collect();
    assert_eq!(
        ops,
        [
            "Encrypt",
            "Decrypt",
            "GenerateDataKey",
            "ListKeys",
            "CreateKey",
            "TagResource",
            "UntagResource",
            "ReplicateKey"
        ]
    );
    for r in &reqs {
        let cred = r.verified();
        assert_eq!(cred.access_key_id, ACCESS_KEY_ID);
        assert_eq!(cred.region, REGION);
        assert_eq!(cred.service, "kms");
        // The Rust SDK signs every header present at signing time, content-length included.
        for h in ["host", "x-amz-date", "x-amz-target", "content-type"] {
            assert!(cred.signs(h), "{h} not signed: {:?}", cred.signed_headers);
        }
        assert_eq!(r.method, http::Method::POST);
        assert_eq!(r.uri.path(), "/");
        assert_eq!(r.version, http::Version::HTTP_11);
        assert!(r.first_body_byte_at.unwrap() <= r.received_at);
    }
    // The body the fake recorded is exactly what the SDK sent.
    let tag_req = reqs[5].json();
    assert_eq!(tag_req["KeyId"], KEY);
    assert_eq!(tag_req["Tags"][0]["TagKey"], "team:owner");
    assert_eq!(fake.count(), 8);
    fake.clear();
    assert_eq!(fake.count(), 0);
    assert!(fake.progress().is_empty());
}

#[tokio::test]
async fn second_principal_and_wrong_secret() {
    let fake = FakeKms::start().await;
    let exempt = kms_client_with(&fake.url(), EXEMPT_ACCESS_KEY_ID, EXEMPT_SECRET_KEY, 1);
    exempt.list_keys().send().await.expect("ListKeys as exempt");
    assert_eq!(
        fake.last().unwrap().verified().access_key_id,
        EXEMPT_ACCESS_KEY_ID
    );

    // Right key id, wrong secret: the fake rejects, the SDK surfaces it, the recording says why.
    let wrong = kms_client_with(&fake.url(), ACCESS_KEY_ID, EXEMPT_SECRET_KEY, 1);
    let err = wrong.list_keys().send().await.unwrap_err();
    let svc = err.into_service_error();
    assert_eq!(
        aws_sdk_kms::error::ProvideErrorMetadata::code(&svc),
        Some("InvalidSignatureException")
    );
    let last = fake.last().unwrap();
    let msg = last.signature.as_ref().unwrap_err();
    assert!(msg.contains("does not match"), "{msg}");

    // Unknown key id.
    let unknown = kms_client_with(&fake.url(), "AKIDUNKNOWN", SECRET_KEY, 1);
    assert!(unknown.list_keys().send().await.is_err());
    let msg = fake.last().unwrap().signature.unwrap_err();
    assert!(msg.contains("unknown access key id"), "{msg}");
    assert_eq!(fake.count(), 3);
}

#[tokio::test]
async fn sdk_retries_are_fast_and_resigned() {
    let fake = FakeKms::start().await;
    fake.set_status_override(Some((
        500,
        r#"{"__type":"KMSInternalException","message":"boom"}"#.into(),
    )));
    let kms = kms_client_with(&fake.url(), ACCESS_KEY_ID, SECRET_KEY, 3);
    let started = Instant::now();
    let err = kms.list_keys().send().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        aws_sdk_kms::error::ProvideErrorMetadata::code(&err.into_service_error()),
        Some("KMSInternalException")
    );
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 3);
    for r in &reqs {
        r.verified();
    }
    assert_eq!(
        reqs[1].header("amz-sdk-request"),
        Some("attempt=2; max=3"),
        "unsigned retry header"
    );
    assert!(!reqs[1].verified().signs("amz-sdk-request"));
}

fn tag_body() -> Vec<u8> {
    format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:owner","TagValue":"payments"}}]}}"#)
        .into_bytes()
}

#[tokio::test]
async fn raw_signed_request_verifies_and_tampering_fails() {
    let fake = FakeKms::start().await;
    let host = fake.host();
    let body = tag_body();

    // Valid (the convenience builder, with an unsigned extra header).
    let bytes = raw::kms_request(
        &host,
        "TrentService.TagResource",
        &body,
        &[("User-Agent", "raw")],
    );
    let resp = raw::send(fake.addr(), &bytes).await;
    assert_eq!(resp.status, 200, "{}", resp.body_str());
    assert_eq!(
        resp.header("CONTENT-TYPE"),
        Some("application/x-amz-json-1.1")
    );
    assert_eq!(resp.header("x-amzn-requestid").unwrap().len(), 36);
    assert_eq!(resp.json(), serde_json::json!({}));
    let rec = fake.last().unwrap();
    assert_eq!(
        rec.verified().signed_headers,
        ["content-type", "host", "x-amz-date", "x-amz-target"]
    );
    assert_eq!(rec.body.as_ref(), body.as_slice());
    assert_eq!(rec.operation(), Some("TagResource"));

    let good = RawRequest::signed_kms(&host, "TrentService.TagResource", &body);

    // One body byte changed (same length).
    let mut broken = good.clone();
    let pos = broken.body.iter().position(|&b| b == b'p').unwrap();
    broken.body[pos] = b'P';
    // An unsigned header changed: still fine.
    let mut unsigned_changed = good.clone();
    unsigned_changed.set_header("Content-Length", &body.len().to_string());
    unsigned_changed.add_header("X-Forwarded-For", "10.0.0.1");
    let resp = raw::send(fake.addr(), &unsigned_changed.to_bytes()).await;
    assert_eq!(resp.status, 200, "{}", resp.body_str());

    let mut wrong_host = good.clone();
    wrong_host.set_header("Host", "kms.us-east-1.amazonaws.com");
    let mut wrong_target = good.clone();
    wrong_target.set_header("X-Amz-Target", "TrentService.UntagResource");
    let mut spaced_target = good.clone();
    spaced_target.set_header("X-Amz-Target", "TrentService.TagResource  x");
    let mut no_target = good.clone();
    no_target.remove_header("X-Amz-Target");
    let mut repeated_target = good.clone();
    repeated_target.add_header("X-Amz-Target", "TrentService.TagResource");

    for (name, req, expect) in [
        ("body byte", broken, "does not match"),
        ("host", wrong_host, "does not match"),
        ("target", wrong_target, "does not match"),
        ("target value", spaced_target, "does not match"),
        ("no target", no_target, "missing"),
        ("repeated target", repeated_target, "does not match"),
    ] {
        let resp = raw::send(fake.addr(), &req.to_bytes()).await;
        assert_eq!(resp.status, 403, "{name}: {}", resp.body_str());
        let j = resp.json();
        assert_eq!(j["__type"], "InvalidSignatureException", "{name}");
        let rec = fake.last().unwrap();
        let err = rec.signature.as_ref().unwrap_err();
        assert!(err.contains(expect), "{name}: {err}");
    }

    // Host not signed at all.
    let date = sigv4::amz_date_now();
    let auth = sigv4::sign_headers(
        "POST",
        "/",
        &[
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-date", &date),
            ("x-amz-target", "TrentService.TagResource"),
        ],
        &body,
        ACCESS_KEY_ID,
        SECRET_KEY,
        REGION,
        "kms",
    );
    let mut unsigned_host = good.clone();
    unsigned_host.set_header("X-Amz-Date", &date);
    unsigned_host.set_header("Authorization", &auth);
    let resp = raw::send(fake.addr(), &unsigned_host.to_bytes()).await;
    assert_eq!(resp.status, 403);
    let err = fake.last().unwrap().signature.unwrap_err();
    assert!(err.contains("'Host' must be a 'SignedHeader'"), "{err}");

    // Signing content-length too (like the Rust and Go SDKs), with a header value that needs
    // trimming and space-collapsing.
    let date = sigv4::amz_date_now();
    let len = body.len().to_string();
    let auth = sigv4::sign_headers(
        "POST",
        "/",
        &[
            ("content-length", &len),
            ("content-type", "application/x-amz-json-1.1"),
            ("host", &host),
            ("x-amz-date", &date),
            ("x-amz-target", "TrentService.TagResource"),
            ("x-amz-user-agent", "a   b c"),
        ],
        &body,
        EXEMPT_ACCESS_KEY_ID,
        EXEMPT_SECRET_KEY,
        "eu-central-1",
        "kms",
    );
    let mut more = good.clone();
    more.set_header("X-Amz-Date", &date)
        .set_header("Authorization", &auth)
        .add_header("x-amz-user-agent", "  a b    c ");
    let resp = raw::send(fake.addr(), &more.to_bytes()).await;
    assert_eq!(resp.status, 200, "{}", resp.body_str());
    let cred = fake.last().unwrap().verified().clone();
    assert_eq!(cred.access_key_id, EXEMPT_ACCESS_KEY_ID);
    assert_eq!(cred.region, "eu-central-1");
    assert!(cred.signs("content-length"));
    // ... and then a different Content-Length (with a body to match) breaks it.
    let mut longer = more.clone();
    longer.set_body(&[body.clone(), b" ".to_vec()].concat());
    let resp = raw::send(fake.addr(), &longer.to_bytes()).await;
    assert_eq!(resp.status, 403);
}

#[test]
fn sigv4_known_answer_and_parsing() {
    // AWS's documented example (IAM ListUsers, GET with a query string).
    let mut headers = http::HeaderMap::new();
    headers.insert("host", "iam.amazonaws.com".parse().unwrap());
    headers.insert(
        "content-type",
        "application/x-www-form-urlencoded; charset=utf-8"
            .parse()
            .unwrap(),
    );
    headers.insert("x-amz-date", "20150830T123600Z".parse().unwrap());
    headers.insert(
        "authorization",
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
         SignedHeaders=content-type;host;x-amz-date, \
         Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
            .parse()
            .unwrap(),
    );
    let secret = |akid: &str| {
        (akid == "AKIDEXAMPLE").then(|| "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".to_string())
    };
    let cred = sigv4::verify(
        "GET",
        "/?Version=2010-05-08&Action=ListUsers",
        &headers,
        b"",
        secret,
    )
    .expect("AWS example verifies");
    assert_eq!(cred.service, "iam");
    assert_eq!(cred.amz_date, "20150830T123600Z");
    assert!(sigv4::verify(
        "GET",
        "/?Action=ListUsers&Version=2010-05-09",
        &headers,
        b"",
        secret
    )
    .is_err());
    assert!(sigv4::verify(
        "POST",
        "/?Action=ListUsers&Version=2010-05-08",
        &headers,
        b"",
        secret
    )
    .is_err());
    assert!(sigv4::verify(
        "GET",
        "/?Action=ListUsers&Version=2010-05-08",
        &headers,
        b"x",
        secret
    )
    .is_err());

    // Scope date must match X-Amz-Date.
    let mut h2 = headers.clone();
    h2.insert("x-amz-date", "20150831T123600Z".parse().unwrap());
    let err = sigv4::verify(
        "GET",
        "/?Action=ListUsers&Version=2010-05-08",
        &h2,
        b"",
        secret,
    )
    .unwrap_err();
    assert!(err.contains("scope date"), "{err}");

    let p = sigv4::parse_authorization(
        "AWS4-HMAC-SHA256 Credential=AKID/20250101/us-east-1/kms/aws4_request,SignedHeaders=host;x-amz-date,Signature=0000000000000000000000000000000000000000000000000000000000000000",
    )
    .unwrap();
    assert_eq!(p.access_key_id, "AKID");
    assert_eq!(p.signed_headers, ["host", "x-amz-date"]);
    assert!(sigv4::parse_authorization("AWS4-HMAC-SHA256 Credential=AKID/2025/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=00").is_err());
    assert!(sigv4::parse_authorization("Basic Zm9vOmJhcg==").is_err());

    assert_eq!(sigv4::amz_date_from_unix(0), "19700101T000000Z");
    assert_eq!(sigv4::amz_date_from_unix(1_440_938_160), "20150830T123600Z");
    assert_eq!(sigv4::amz_date_from_unix(951_782_400), "20000229T000000Z");

    for data in [
        &b""[..],
        b"f",
        b"fo",
        b"foo",
        b"foob",
        b"fooba",
        b"foobar",
        &[0xff, 0, 0xfe],
    ] {
        assert_eq!(base64_decode(&base64_encode(data)).unwrap(), data);
    }
    assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    assert_eq!(base64_encode(b"fooba"), "Zm9vYmE=");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_runs_before_the_answer() {
    let fake = FakeKms::start().await;
    let hook_done = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let hook_done = hook_done.clone();
        let seen = seen.clone();
        fake.set_hook(Arc::new(move |r: &Recorded| {
            // Deliberate: a slow hook, so that an answer sent before it finished would show.
            std::thread::sleep(Duration::from_millis(100));
            seen.lock().unwrap().push(r.target.clone());
            hook_done.store(true, Ordering::SeqCst);
        }));
    }
    let kms = kms_client(&fake.url());
    let started = Instant::now();
    let send = kms.list_keys().send();
    send.await.expect("ListKeys");
    // The answer was only sent after the (slow) hook finished.
    assert!(hook_done.load(Ordering::SeqCst));
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [Some("TrentService.ListKeys".to_string())]
    );
    fake.clear_hook();
    hook_done.store(false, Ordering::SeqCst);
    kms.list_keys().send().await.unwrap();
    assert!(!hook_done.load(Ordering::SeqCst));
}

#[tokio::test]
async fn delay_and_status_override() {
    let fake = FakeKms::start().await;
    fake.set_delay(Duration::from_millis(300));
    let kms = kms_client(&fake.url());
    let started = Instant::now();
    kms.list_keys().send().await.unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    // Recorded before the delay.
    let rec = fake.last().unwrap();
    assert!(rec.received_at < started + Duration::from_millis(250));

    // An attempt timeout shorter than the delay fails on the client side.
    let impatient = kms_client_opts(
        &fake.url(),
        ClientOptions {
            attempt_timeout: Some(Duration::from_millis(100)),
            ..Default::default()
        },
    );
    assert!(impatient.list_keys().send().await.is_err());
    fake.set_delay(Duration::ZERO);

    fake.set_status_override(Some((
        400,
        r#"{"__type":"NotFoundException","message":"no such key"}"#.into(),
    )));
    let resp = raw::send(
        fake.addr(),
        &raw::kms_request(
            &fake.host(),
            "TrentService.DescribeKey",
            br#"{"KeyId":"x"}"#,
            &[],
        ),
    )
    .await;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.json()["__type"], "NotFoundException");
    let err = kms.describe_key().key_id("x").send().await.unwrap_err();
    assert!(err.into_service_error().is_not_found_exception());
    fake.set_status_override(None);
    kms.describe_key().key_id("x").send().await.unwrap();
}

#[tokio::test]
async fn streaming_progress_is_visible_before_the_body_completes() {
    let fake = FakeKms::start().await;
    let body = tag_body();
    let req = RawRequest::signed_kms(&fake.host(), "TrentService.TagResource", &body);
    let mut conn = RawConn::connect(fake.addr()).await.unwrap();
    let (first, rest) = body.split_at(10);
    conn.write(&req.head_bytes()).await.unwrap();
    conn.write(first).await.unwrap();

    let p = fake
        .wait_for_progress(Duration::from_secs(5), |p| p.bytes_received >= 10)
        .await
        .expect("first bytes seen");
    assert_eq!(p.bytes_received, 10);
    assert!(p.first_body_byte_at.is_some());
    assert!(p.complete_at.is_none());
    assert_eq!(
        fake.count(),
        0,
        "not recorded before the whole body arrived"
    );
    let chunks = fake.first_chunk_times();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].2, 10);
    assert!(!chunks[0].3);

    // Deliberate: a gap between the two parts of the body, which the timestamps must show.
    tokio::time::sleep(Duration::from_millis(50)).await;
    conn.write(rest).await.unwrap();
    let resp = conn.read_response().await.unwrap();
    assert_eq!(resp.status, 200, "{}", resp.body_str());
    let recs = fake.wait_for_requests(1, Duration::from_secs(1)).await;
    let rec = &recs[0];
    rec.verified();
    let first_at = rec.first_body_byte_at.unwrap();
    assert!(rec.received_at.duration_since(first_at) >= Duration::from_millis(50));
    assert!(fake.progress()[0].complete_at.is_some());

    // Keep-alive: a second request on the same connection.
    conn.write(&RawRequest::signed_kms(&fake.host(), "TrentService.ListKeys", b"{}").to_bytes())
        .await
        .unwrap();
    let resp = conn.read_response().await.unwrap();
    assert_eq!(resp.json()["Keys"][0]["KeyId"], KEY);
    assert_eq!(fake.count(), 2);
}

#[tokio::test]
async fn http2_prior_knowledge_uses_the_authority_as_host() {
    use http_body_util::{BodyExt, Full};
    let fake = FakeKms::start().await;
    let stream = tokio::net::TcpStream::connect(fake.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let host = fake.host();
    let body = b"{}".to_vec();
    let signed = sigv4::sign(
        "POST",
        &host,
        "TrentService.ListKeys",
        &body,
        ACCESS_KEY_ID,
        SECRET_KEY,
        REGION,
        Some("20250102T030405Z"),
    );
    let req = http::Request::post(format!("http://{host}/"))
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amz-target", "TrentService.ListKeys")
        .header("x-amz-date", &signed.amz_date)
        .header("authorization", &signed.authorization)
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&got).contains("KeyArn"));
    let rec = fake.last().unwrap();
    assert_eq!(rec.version, http::Version::HTTP_2);
    assert!(rec.headers.get("host").is_none());
    assert_eq!(rec.verified().amz_date, "20250102T030405Z");
}

/// A `POST /` ListKeys signed the way NodeHttp2Handler signs: `:authority` (value
/// `signed_authority`) among the SignedHeaders, no `host`.
fn signed_with_authority(signed_authority: &str, uri: &str) -> http::Request<Full<bytes::Bytes>> {
    sigv4::signed_over_authority(signed_authority, uri, "ListKeys", b"{}")
}

#[tokio::test]
async fn a_signed_authority_verifies_over_h2_only_and_only_as_received() {
    let fake = FakeKms::start().await;
    let host = fake.host();
    let stream = tokio::net::TcpStream::connect(fake.addr()).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);

    // Signed :authority = the :authority sent: verifies.
    let resp = h2
        .send_request(signed_with_authority(&host, &format!("http://{host}/")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rec = fake.last().unwrap();
    assert_eq!(rec.version, http::Version::HTTP_2);
    assert!(rec.verified().signs(":authority"));
    assert!(!rec.verified().signs("host"));

    // Another :authority than the one signed: refused.
    let resp = h2
        .send_request(signed_with_authority(
            "localhost:1",
            &format!("http://{host}/"),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let err = fake.last().unwrap().signature.unwrap_err();
    assert!(err.contains("does not match"), "{err}");
    assert!(err.contains(&format!("\n:authority:{host}\n")), "{err}");

    // The same signature over HTTP/1.1 with the signed value as Host: there is no :authority
    // to rebuild the canonical request from (what an h2-to-HTTP/1.1 hop produces).
    let stream = tokio::net::TcpStream::connect(fake.addr()).await.unwrap();
    let (mut h1, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = signed_with_authority(&host, "/");
    req.headers_mut().insert("host", host.parse().unwrap());
    let resp = h1.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 403);
    let rec = fake.last().unwrap();
    assert_eq!(rec.version, http::Version::HTTP_11);
    let err = rec.signature.unwrap_err();
    assert!(err.contains("\":authority\" is missing"), "{err}");
    assert_eq!(fake.count(), 3);
}

#[tokio::test]
async fn shutdown_closes_the_port() {
    let fake = FakeKms::start().await;
    let addr = fake.addr();
    // An open idle connection must not keep the server alive.
    let mut conn = RawConn::connect(addr).await.unwrap();
    fake.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    assert!(conn.is_closed_within(Duration::from_secs(2)).await);
}

#[tokio::test]
async fn client_proxy_option_sends_absolute_form_with_the_endpoint_host() {
    let fake = FakeKms::start().await;
    // The fake stands in for a forward proxy here: the SDK sends `POST http://kms.../`.
    let kms = kms_client_opts(
        "http://kms.us-east-1.amazonaws.com",
        ClientOptions {
            proxy: Some(fake.url()),
            ..Default::default()
        },
    );
    kms.list_keys().send().await.expect("ListKeys via proxy");
    let rec = fake.last().unwrap();
    assert_eq!(rec.header("host"), Some("kms.us-east-1.amazonaws.com"));
    assert_eq!(
        rec.uri.authority().map(|a| a.as_str()),
        Some("kms.us-east-1.amazonaws.com")
    );
    rec.verified();
}
