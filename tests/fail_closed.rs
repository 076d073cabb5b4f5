//! Fail-closed behaviour (contract section 4): every request the proxy cannot read unambiguously
//! is refused with a KMS-shaped 400 (413 when too large), recorded as a `deny` with rule
//! `request`, and never reaches KMS; the proxy keeps serving afterwards.
//!
//! Every request here is sent as raw HTTP/1.1 and signed correctly for the bytes on the wire, so
//! the ambiguity is the only reason for the refusal (the fake KMS would accept the request).

mod common;

use std::time::Duration;

use common::raw::{self, RawRequest, RawResponse};
use common::sentinel::{assert_nothing_forwarded, seen_besides_sentinels};
use common::sigv4;
use common::*;
use serde_json::Value;

const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
const TAG_RESOURCE: &str = "TrentService.TagResource";
const UNTAG_RESOURCE: &str = "TrentService.UntagResource";
const CREATE_KEY: &str = "TrentService.CreateKey";

/// What a refusal must look like.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    status: u16,
    /// The `x-kms-tag-guard` kind.
    kind: &'static str,
    /// A rule that must be among the audit record's violations.
    rule: &'static str,
}

/// An ambiguous or unreadable request.
const REJECT: Refusal = Refusal {
    status: 400,
    kind: "reject",
    rule: "request",
};
/// A body over `max_body_bytes`.
const TOO_LARGE: Refusal = Refusal {
    status: 413,
    kind: "too-large",
    rule: "request",
};
/// A readable request that breaks the policy rule `abac-keys`.
const ABAC_DENIAL: Refusal = Refusal {
    status: 400,
    kind: "deny",
    rule: "abac-keys",
};

/// A TagResource body setting one allowed tag.
fn allowed_tag_body() -> String {
    format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:owner","TagValue":"payments"}}]}}"#)
}

/// A request signed over exactly `signed` (plus `X-Amz-Date`, added here), with an unsigned
/// `Content-Length` unless the caller removes it. Repeated names are signed as SigV4 joins them.
fn signed_request(signed: &[(&str, &str)], body: &[u8]) -> RawRequest {
    signed_request_as(signed, body, ACCESS_KEY_ID, SECRET_KEY)
}

fn signed_request_as(
    signed: &[(&str, &str)],
    body: &[u8],
    access_key_id: &str,
    secret: &str,
) -> RawRequest {
    let amz_date = sigv4::amz_date_now();
    let mut all: Vec<(&str, &str)> = signed.to_vec();
    all.push(("X-Amz-Date", &amz_date));
    let authorization = sigv4::sign_headers(
        "POST",
        "/",
        &all,
        body,
        access_key_id,
        secret,
        REGION,
        "kms",
    );
    let mut headers: Vec<(String, String)> = all
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    headers.push(("Content-Length".into(), body.len().to_string()));
    headers.push(("Authorization".into(), authorization));
    RawRequest {
        method: "POST".into(),
        target: "/".into(),
        headers,
        body: body.to_vec(),
    }
}

/// The chunked encoding of `body` in pieces of at most `chunk` bytes.
fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in body.chunks(chunk) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A correctly signed request whose body travels chunked (no Content-Length; the signature
/// covers the de-chunked body, as SigV4 does for an unsigned Content-Length).
fn signed_chunked(host: &str, target: &str, body: &[u8]) -> Vec<u8> {
    let mut request = RawRequest::signed_kms(host, target, body);
    request.remove_header("Content-Length");
    request.add_header("Transfer-Encoding", "chunked");
    let mut bytes = request.head_bytes();
    bytes.extend_from_slice(&chunked(body, 600));
    bytes
}

/// CRC-32 (IEEE), for the gzip trailer.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A valid gzip member holding `data` in one stored (uncompressed) deflate block.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(data.len()).expect("small body");
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    out.push(1); // BFINAL, BTYPE = stored
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// Sends `request` on a fresh connection and checks the whole refusal: status, KMS error shape,
/// `x-kms-tag-guard`, the audit `deny` record under the response's request id, and that nothing
/// reached the upstream. Returns the response and the audit record.
async fn assert_refused(
    case: &str,
    fake: &FakeKms,
    proxy: &TestProxy,
    request: &[u8],
    want: Refusal,
) -> (RawResponse, Value) {
    let response = raw::send(proxy.addr, request).await;
    let body = response.body_str();
    assert_eq!(
        response.status, want.status,
        "{case}: status; body {body}; headers {:?}",
        response.headers
    );
    assert_eq!(
        response.header("content-type"),
        Some("application/x-amz-json-1.1"),
        "{case}: content-type"
    );
    let json = response.json();
    assert_eq!(json["__type"], "TagException", "{case}: __type in {body}");
    assert!(
        json["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{case}: message in {body}"
    );
    if let Some(error_type) = response.header("x-amzn-errortype") {
        assert_eq!(error_type, "TagException", "{case}: x-amzn-ErrorType");
    }
    assert_eq!(
        response.header("x-kms-tag-guard"),
        Some(want.kind),
        "{case}: x-kms-tag-guard; headers {:?}",
        response.headers
    );
    let request_id = response
        .header("x-amzn-requestid")
        .unwrap_or_else(|| panic!("{case}: no x-amzn-RequestId in {:?}", response.headers))
        .to_owned();
    assert!(!request_id.is_empty(), "{case}: empty x-amzn-RequestId");

    // The decision record is written before the answer.
    let audit = proxy.audit();
    let record = audit
        .iter()
        .find(|r| r["event"] == "decision" && r["request_id"] == request_id.as_str())
        .unwrap_or_else(|| panic!("{case}: no decision record for {request_id} in {audit:#?}"))
        .clone();
    assert_eq!(record["decision"], "deny", "{case}: {record}");
    let violations = record["violations"]
        .as_array()
        .unwrap_or_else(|| panic!("{case}: violations in {record}"));
    assert!(
        violations.iter().any(|v| v["rule"] == want.rule),
        "{case}: expected a violation of rule {:?} in {record}",
        want.rule
    );
    assert!(
        audit.iter().all(|r| r["event"] != "outcome"),
        "{case}: an outcome record means something was forwarded: {audit:#?}"
    );

    assert_nothing_forwarded(case, fake, proxy.addr).await;
    (response, record)
}

/// The proxy still serves: a signed Encrypt on a new connection gets 200 from the fake, with the
/// signature verified there.
async fn assert_still_serving(case: &str, fake: &FakeKms, proxy: &TestProxy) {
    let before = fake.count();
    let body = format!(r#"{{"KeyId":"{KEY}","Plaintext":"aGVsbG8="}}"#);
    let request = RawRequest::signed_kms(&fake.host(), "TrentService.Encrypt", body.as_bytes());
    let response = raw::send(proxy.addr, &request.to_bytes()).await;
    assert_eq!(
        response.status,
        200,
        "{case}: the next ordinary request failed: {}",
        response.body_str()
    );
    let recorded = fake
        .wait_for_requests(before + 1, Duration::from_secs(5))
        .await;
    let last = &recorded[before];
    assert_eq!(last.operation(), Some("Encrypt"), "{case}");
    assert_eq!(&last.body[..], body.as_bytes(), "{case}");
    last.verified();
}

/// One refused case, end to end, against a proxy with the test policy.
async fn refused(case: &str, build: impl FnOnce(&str) -> Vec<u8>, want: Refusal) -> Value {
    refused_with(case, ProxyConfig::default(), build, want).await
}

async fn refused_with(
    case: &str,
    config: ProxyConfig,
    build: impl FnOnce(&str) -> Vec<u8>,
    want: Refusal,
) -> Value {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(&fake, config).await;
    let request = build(&fake.host());
    let (_, record) = assert_refused(case, &fake, &proxy, &request, want).await;
    assert_still_serving(case, &fake, &proxy).await;
    assert_signature_is_valid(case, &request).await;
    record
}

/// The refused bytes, sent straight to a fake KMS, carry a valid signature: the ambiguity, not
/// a broken signature, is why the proxy refused them. (The verifier refuses a repeated
/// Authorization header by design; each of those signatures is checked by construction.)
async fn assert_signature_is_valid(case: &str, request: &[u8]) {
    let control = FakeKms::start().await;
    raw::send(control.addr(), request).await;
    let recorded = control.wait_for_requests(1, Duration::from_secs(5)).await;
    match &recorded[0].signature {
        Ok(_) => {}
        Err(e) if e.contains("repeated Authorization") => {}
        Err(e) => panic!("{case}: the test request is not correctly signed: {e}"),
    }
}

/// A correctly signed request with this target and body.
fn signed(target: &'static str, body: String) -> impl FnOnce(&str) -> Vec<u8> {
    move |host| RawRequest::signed_kms(host, target, body.as_bytes()).to_bytes()
}

/// The allowed TagResource body, signed over exactly `Host` (the fake's) and then `headers`.
fn signed_over(headers: Vec<(&'static str, &'static str)>) -> impl FnOnce(&str) -> Vec<u8> {
    move |host| {
        let mut all = vec![("Host", host)];
        all.extend(headers);
        signed_request(&all, allowed_tag_body().as_bytes()).to_bytes()
    }
}

// ---- JSON ambiguities ----

#[tokio::test]
async fn repeated_tags_member_is_rejected() {
    let body = format!(
        r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:owner","TagValue":"a"}}],"Tags":[{{"TagKey":"Project","TagValue":"x"}}]}}"#
    );
    refused("repeated Tags", signed(TAG_RESOURCE, body), REJECT).await;
}

#[tokio::test]
async fn repeated_tag_key_inside_one_tag_is_rejected() {
    let body = format!(
        r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:owner","TagKey":"Project","TagValue":"x"}}]}}"#
    );
    refused(
        "repeated TagKey in a tag",
        signed(TAG_RESOURCE, body),
        REJECT,
    )
    .await;
}

#[tokio::test]
async fn repeated_tag_value_inside_one_tag_is_rejected() {
    let body = format!(
        r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"cost:center","TagValue":"1234","TagValue":"oops"}}]}}"#
    );
    refused(
        "repeated TagValue in a tag",
        signed(TAG_RESOURCE, body),
        REJECT,
    )
    .await;
}

#[tokio::test]
async fn lowercase_tags_member_is_rejected() {
    let body = format!(
        r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:owner","TagValue":"a"}}],"tags":[{{"TagKey":"Project","TagValue":"x"}}]}}"#
    );
    refused("Tags and tags", signed(TAG_RESOURCE, body), REJECT).await;
}

#[tokio::test]
async fn uppercase_tags_member_is_rejected() {
    let body = format!(
        r#"{{"KeyId":"{KEY}","TAGS":[{{"TagKey":"Project","TagValue":"x"}}],"Tags":[{{"TagKey":"team:owner","TagValue":"a"}}]}}"#
    );
    refused("TAGS and Tags", signed(TAG_RESOURCE, body), REJECT).await;
}

#[tokio::test]
async fn case_variant_tags_alone_in_create_key_is_rejected() {
    // A strict parser would see a CreateKey without tags; a case-insensitive one sees the tags.
    for (case, member) in [("CreateKey tags", "tags"), ("CreateKey TAGS", "TAGS")] {
        let body = format!(
            r#"{{"Description":"d","{member}":[{{"TagKey":"team:owner","TagValue":"a"}}]}}"#
        );
        refused(case, signed(CREATE_KEY, body), REJECT).await;
    }
}

#[tokio::test]
async fn escaped_member_name_with_an_allowed_tag_is_forwarded_byte_identical() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let body = format!(
        r#"{{"KeyId":"{KEY}","T\u0061gs":[{{"T\u0061gKey":"team:owner","TagV\u0061lue":"p\u0061yments"}}]}}"#
    );
    let request = RawRequest::signed_kms(&fake.host(), TAG_RESOURCE, body.as_bytes());
    let response = raw::send(proxy.addr, &request.to_bytes()).await;
    assert_eq!(response.status, 200, "{}", response.body_str());
    assert_eq!(response.header("x-kms-tag-guard"), None);

    let recorded = fake.wait_for_requests(1, Duration::from_secs(5)).await;
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].operation(), Some("TagResource"));
    assert_eq!(
        &recorded[0].body[..],
        body.as_bytes(),
        "the forwarded body must be the bytes sent, escapes and all"
    );
    recorded[0].verified();

    let audit = proxy.wait_for_audit(2).await;
    let decision = audit
        .iter()
        .find(|r| r["event"] == "decision")
        .expect("decision record");
    assert_eq!(decision["decision"], "allow", "{decision}");
    assert_eq!(
        decision["set"],
        serde_json::json!([{"key": "team:owner", "value": "payments"}]),
        "the escapes are decoded before judging: {decision}"
    );
    assert!(
        audit
            .iter()
            .any(|r| r["event"] == "outcome" && r["request_id"] == decision["request_id"]),
        "{audit:#?}"
    );
}

#[tokio::test]
async fn escaped_member_name_with_a_forbidden_tag_is_denied() {
    let body =
        format!(r#"{{"KeyId":"{KEY}","T\u0061gs":[{{"TagKey":"Project","TagValue":"x"}}]}}"#);
    let record = refused(
        "escaped Tags, forbidden key",
        signed(TAG_RESOURCE, body),
        ABAC_DENIAL,
    )
    .await;
    assert_eq!(
        record["set"],
        serde_json::json!([{"key": "Project", "value": "x"}]),
        "{record}"
    );
}

#[tokio::test]
async fn escaped_tag_key_is_judged_decoded() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let body =
        format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"Pro\u006aect","TagValue":"x"}}]}}"#);
    let request = RawRequest::signed_kms(&fake.host(), TAG_RESOURCE, body.as_bytes());
    let (response, record) = assert_refused(
        "escaped TagKey",
        &fake,
        &proxy,
        &request.to_bytes(),
        ABAC_DENIAL,
    )
    .await;
    let abac = record["violations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["rule"] == "abac-keys")
        .unwrap()
        .clone();
    assert!(
        abac["key"]
            .as_str()
            .is_some_and(|k| k.eq_ignore_ascii_case("project")),
        "{record}"
    );
    assert_eq!(
        record["set"],
        serde_json::json!([{"key": "Project", "value": "x"}]),
        "{record}"
    );
    let message = response.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("abac-keys") && message.contains("Project"),
        "the denial names the rule and the key: {message}"
    );
    assert_still_serving("escaped TagKey", &fake, &proxy).await;
}

#[tokio::test]
async fn the_same_tag_key_twice_is_rejected() {
    let body = format!(
        r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"cost:center","TagValue":"1234"}},{{"TagKey":"cost:center","TagValue":"nope"}}]}}"#
    );
    refused("same TagKey twice", signed(TAG_RESOURCE, body), REJECT).await;
}

#[tokio::test]
async fn the_same_tag_key_twice_via_an_escape_is_rejected() {
    let body = format!(
        r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:a","TagValue":"1"}},{{"TagKey":"te\u0061m:a","TagValue":"2"}}]}}"#
    );
    refused(
        "same TagKey twice, escaped",
        signed(TAG_RESOURCE, body),
        REJECT,
    )
    .await;
}

#[tokio::test]
async fn the_same_tag_key_twice_in_untag_resource_is_rejected() {
    let body = format!(r#"{{"KeyId":"{KEY}","TagKeys":["team:a","team:a"]}}"#);
    refused(
        "UntagResource same key twice",
        signed(UNTAG_RESOURCE, body),
        REJECT,
    )
    .await;
}

#[tokio::test]
async fn a_non_string_tag_value_is_rejected() {
    // A lenient parser would read 1234 as the valid cost centre "1234".
    let body =
        format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"cost:center","TagValue":1234}}]}}"#);
    refused("numeric TagValue", signed(TAG_RESOURCE, body), REJECT).await;
}

#[tokio::test]
async fn a_null_tag_value_is_rejected() {
    let body = format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:owner","TagValue":null}}]}}"#);
    refused("null TagValue", signed(TAG_RESOURCE, body), REJECT).await;
}

#[tokio::test]
async fn invalid_utf8_is_rejected() {
    let mut body =
        format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:owner","TagValue":"a"#).into_bytes();
    body.extend_from_slice(b"\xff\xfe");
    body.extend_from_slice(br#""}]}"#);
    refused(
        "invalid UTF-8",
        move |host| RawRequest::signed_kms(host, TAG_RESOURCE, &body).to_bytes(),
        REJECT,
    )
    .await;
}

#[tokio::test]
async fn deeply_nested_json_in_an_unread_create_key_member_is_rejected() {
    let arrays = format!(
        r#"{{"Description":"d","X":{}1{},"Tags":[{{"TagKey":"team:owner","TagValue":"a"}}]}}"#,
        "[".repeat(1000),
        "]".repeat(1000)
    );
    refused("1000 nested arrays", signed(CREATE_KEY, arrays), REJECT).await;
    let objects = format!(
        r#"{{"Description":"d","X":{}1{},"Tags":[{{"TagKey":"team:owner","TagValue":"a"}}]}}"#,
        r#"{"a":"#.repeat(1000),
        "}".repeat(1000)
    );
    refused("1000 nested objects", signed(CREATE_KEY, objects), REJECT).await;
}

#[tokio::test]
async fn bytes_after_the_closing_brace_are_rejected() {
    let base = allowed_tag_body();
    for (case, tail) in [
        ("trailing x", "x"),
        ("trailing object", r#"{"KeyId":"other","Tags":[]}"#),
        ("trailing NUL", "\u{0}"),
    ] {
        refused(case, signed(TAG_RESOURCE, format!("{base}{tail}")), REJECT).await;
    }
}

// ---- Head ambiguities ----

#[tokio::test]
async fn gzip_content_encoding_is_rejected() {
    let body = gzip_stored(allowed_tag_body().as_bytes());
    refused(
        "Content-Encoding: gzip",
        move |host| {
            signed_request(
                &[
                    ("Host", host),
                    ("Content-Type", "application/x-amz-json-1.1"),
                    ("Content-Encoding", "gzip"),
                    ("X-Amz-Target", TAG_RESOURCE),
                ],
                &body,
            )
            .to_bytes()
        },
        REJECT,
    )
    .await;
}

#[tokio::test]
async fn a_target_in_another_case_is_rejected() {
    refused(
        "X-Amz-Target: trentservice.tagresource",
        signed("trentservice.tagresource", allowed_tag_body()),
        REJECT,
    )
    .await;
}

#[tokio::test]
async fn two_target_headers_are_rejected() {
    for (case, first, second) in [
        (
            "TagResource then Encrypt",
            TAG_RESOURCE,
            "TrentService.Encrypt",
        ),
        (
            "Encrypt then TagResource",
            "TrentService.Encrypt",
            TAG_RESOURCE,
        ),
        ("TagResource twice", TAG_RESOURCE, TAG_RESOURCE),
    ] {
        refused(
            case,
            signed_over(vec![
                ("Content-Type", "application/x-amz-json-1.1"),
                ("X-Amz-Target", first),
                ("X-Amz-Target", second),
            ]),
            REJECT,
        )
        .await;
    }
}

#[tokio::test]
async fn two_host_headers_are_rejected() {
    refused(
        "two Host headers",
        signed_over(vec![
            ("Host", "kms.eu-west-1.amazonaws.com"),
            ("Content-Type", "application/x-amz-json-1.1"),
            ("X-Amz-Target", TAG_RESOURCE),
        ]),
        REJECT,
    )
    .await;
}

#[tokio::test]
async fn two_authorization_headers_are_rejected() {
    // Both signatures are valid for the bytes sent, for two different principals: which one a
    // policy with exempt_principals would see is exactly the ambiguity.
    let body = allowed_tag_body();
    refused(
        "two Authorization headers",
        move |host| {
            let mut request = RawRequest::signed_kms(host, TAG_RESOURCE, body.as_bytes());
            let amz_date = request.header("X-Amz-Date").unwrap().to_owned();
            let other = sigv4::sign(
                "POST",
                host,
                TAG_RESOURCE,
                body.as_bytes(),
                EXEMPT_ACCESS_KEY_ID,
                EXEMPT_SECRET_KEY,
                REGION,
                Some(&amz_date),
            );
            request.add_header("Authorization", &other.authorization);
            request.to_bytes()
        },
        REJECT,
    )
    .await;
}

#[tokio::test]
async fn two_content_type_headers_are_rejected() {
    refused(
        "two Content-Type headers",
        signed_over(vec![
            ("Content-Type", "application/x-amz-json-1.1"),
            ("Content-Type", "application/x-amz-json-1.1"),
            ("X-Amz-Target", TAG_RESOURCE),
        ]),
        REJECT,
    )
    .await;
}

#[tokio::test]
async fn two_content_encoding_headers_are_rejected() {
    refused(
        "two Content-Encoding: identity headers",
        signed_over(vec![
            ("Content-Type", "application/x-amz-json-1.1"),
            ("Content-Encoding", "identity"),
            ("Content-Encoding", "identity"),
            ("X-Amz-Target", TAG_RESOURCE),
        ]),
        REJECT,
    )
    .await;
}

#[tokio::test]
async fn connection_naming_the_target_header_is_rejected() {
    let body = allowed_tag_body();
    refused(
        "Connection: x-amz-target",
        move |host| {
            let mut request = RawRequest::signed_kms(host, TAG_RESOURCE, body.as_bytes());
            request.add_header("Connection", "x-amz-target");
            request.to_bytes()
        },
        REJECT,
    )
    .await;
}

// ---- Body size ----

fn small_limit() -> ProxyConfig {
    ProxyConfig {
        limits: "max_body_bytes = 1000".into(),
        ..ProxyConfig::default()
    }
}

/// An allowed TagResource body of exactly `len` bytes (the tag value is padded).
fn tag_body_of_len(len: usize) -> String {
    let empty = format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:owner","TagValue":""}}]}}"#);
    let pad = len.checked_sub(empty.len()).expect("len too small");
    let body = format!(
        r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:owner","TagValue":"{}"}}]}}"#,
        "p".repeat(pad)
    );
    assert_eq!(body.len(), len);
    body
}

#[tokio::test]
async fn a_body_one_byte_over_the_limit_with_content_length_is_413() {
    refused_with(
        "1001 bytes, Content-Length",
        small_limit(),
        signed(TAG_RESOURCE, tag_body_of_len(1001)),
        TOO_LARGE,
    )
    .await;
}

#[tokio::test]
async fn a_chunked_body_one_byte_over_the_limit_is_413() {
    let body = tag_body_of_len(1001);
    refused_with(
        "1001 bytes, chunked",
        small_limit(),
        move |host| signed_chunked(host, TAG_RESOURCE, body.as_bytes()),
        TOO_LARGE,
    )
    .await;
}

#[tokio::test]
async fn a_body_at_the_limit_is_forwarded_with_content_length_and_chunked() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(&fake, small_limit()).await;
    let body = tag_body_of_len(1000);
    let with_length = RawRequest::signed_kms(&fake.host(), TAG_RESOURCE, body.as_bytes());
    let as_chunks = signed_chunked(&fake.host(), TAG_RESOURCE, body.as_bytes());
    for (i, (case, request)) in [
        ("1000 bytes, Content-Length", with_length.to_bytes()),
        ("1000 bytes, chunked", as_chunks),
    ]
    .into_iter()
    .enumerate()
    {
        let response = raw::send(proxy.addr, &request).await;
        assert_eq!(response.status, 200, "{case}: {}", response.body_str());
        let recorded = fake.wait_for_requests(i + 1, Duration::from_secs(5)).await;
        assert_eq!(&recorded[i].body[..], body.as_bytes(), "{case}");
        recorded[i].verified();
    }
}

#[tokio::test]
async fn conflicting_framing_is_never_relayed() {
    // Content-Length and Transfer-Encoding together: hyper reads the body chunked; what reaches
    // KMS must be exactly the body that was judged, framed afresh.
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let body = allowed_tag_body();
    let mut request = RawRequest::signed_kms(&fake.host(), TAG_RESOURCE, body.as_bytes());
    request.set_header("Content-Length", "5");
    request.add_header("Transfer-Encoding", "chunked");
    let mut bytes = request.head_bytes();
    bytes.extend_from_slice(&chunked(body.as_bytes(), 40));
    let forwarded = match raw::try_send(proxy.addr, &bytes).await {
        Ok(response) if response.status == 200 => {
            let recorded = fake.wait_for_requests(1, Duration::from_secs(5)).await;
            assert_eq!(&recorded[0].body[..], body.as_bytes());
            assert_eq!(
                recorded[0].header("content-length"),
                Some(&*body.len().to_string())
            );
            recorded[0].verified();
            let audit = proxy.wait_for_audit(1).await;
            assert_eq!(
                audit[0]["set"],
                serde_json::json!([{"key": "team:owner", "value": "payments"}])
            );
            1
        }
        // Refusing the request outright is as good, provided nothing was forwarded.
        Ok(response) => {
            assert!(
                (400..500).contains(&response.status),
                "{}",
                response.body_str()
            );
            0
        }
        Err(_) => 0,
    };
    let (seen, _) = seen_besides_sentinels("CL+TE", &fake, proxy.addr).await;
    assert_eq!(seen.len(), forwarded, "{seen:#?}");
    assert_still_serving("after CL+TE", &fake, &proxy).await;
}

#[tokio::test]
async fn an_ambiguous_pass_through_request_is_refused_but_not_audited() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let body = format!(r#"{{"KeyId":"{KEY}","Plaintext":"aGVsbG8="}}"#);
    let mut request = RawRequest::signed_kms(&fake.host(), "TrentService.Encrypt", body.as_bytes());
    let amz_date = request.header("X-Amz-Date").unwrap().to_owned();
    let other = sigv4::sign(
        "POST",
        &fake.host(),
        "TrentService.Encrypt",
        body.as_bytes(),
        EXEMPT_ACCESS_KEY_ID,
        EXEMPT_SECRET_KEY,
        REGION,
        Some(&amz_date),
    );
    request.add_header("Authorization", &other.authorization);
    let response = raw::send(proxy.addr, &request.to_bytes()).await;
    assert_eq!(response.status, 400, "{}", response.body_str());
    assert_eq!(response.json()["__type"], "TagException");
    assert_eq!(response.header("x-kms-tag-guard"), Some("reject"));
    assert_nothing_forwarded("an ambiguous Encrypt", &fake, proxy.addr).await;
    assert!(
        proxy.audit().is_empty(),
        "the audit log is for tag changes: {:?}",
        proxy.audit()
    );
    assert_still_serving("after an ambiguous Encrypt", &fake, &proxy).await;
}

#[tokio::test]
async fn anything_but_post_root_is_refused_whatever_the_operation() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let encrypt = format!(r#"{{"KeyId":"{KEY}","Plaintext":"aGVsbG8="}}"#);
    let cases: [(&str, &str, &str, String); 4] = [
        (
            "POST",
            "/?Action=TagResource",
            "TrentService.Encrypt",
            encrypt.clone(),
        ),
        (
            "POST",
            "/service/TrentService/operation/TagResource",
            "TrentService.Encrypt",
            encrypt.clone(),
        ),
        ("PUT", "/", "TrentService.Encrypt", encrypt),
        ("POST", "/x", "TrentService.TagResource", allowed_tag_body()),
    ];
    for (method, target, operation, body) in cases {
        let mut request = RawRequest::signed_kms(&fake.host(), operation, body.as_bytes());
        request.method = method.into();
        request.target = target.into();
        let response = raw::send(proxy.addr, &request.to_bytes()).await;
        assert_eq!(
            response.status,
            400,
            "{method} {target}: {}",
            response.body_str()
        );
        assert_eq!(response.json()["__type"], "TagException");
        assert!(
            response.body_str().contains("POST /"),
            "{}",
            response.body_str()
        );
    }
    assert_nothing_forwarded("odd request lines", &fake, proxy.addr).await;
    // Another method, path or a query string could be another protocol's spelling of an
    // operation (here: TagResource, twice), so each refusal is audited as a possible tag change;
    // the query itself is never copied into the record.
    let audit = proxy.audit();
    assert_eq!(audit.len(), 4, "{audit:#?}");
    for record in &audit {
        assert_eq!(record["decision"], "deny", "{record}");
        assert_eq!(record["violations"][0]["rule"], "request", "{record}");
        assert!(!record.to_string().contains("Action="), "{record}");
    }
    assert_still_serving("after odd request lines", &fake, &proxy).await;
}

// ---- a header named Action (moto takes the operation from it when the body names none) ----

/// An Encrypt with an empty body and a header named `Action`, in several spellings, on the fast
/// path (Content-Length) and on the general server (chunked): refused, audited as a possible tag
/// change, nothing forwarded.
#[tokio::test]
async fn a_header_named_action_is_refused_on_both_paths() {
    for name in [
        "Action", "action", "ACTION", "aCtIoN", "Ac_tion", "_Action", "action-",
    ] {
        for chunked_body in [false, true] {
            let case = format!("{name}: CreateKey, chunked {chunked_body}");
            let name = name.to_owned();
            refused(
                &case,
                move |host| {
                    let mut request = RawRequest::signed_kms(host, "TrentService.Encrypt", b"");
                    request.add_header(&name, "CreateKey");
                    if chunked_body {
                        request.remove_header("Content-Length");
                        request.add_header("Transfer-Encoding", "chunked");
                        let mut bytes = request.head_bytes();
                        bytes.extend_from_slice(b"0\r\n\r\n");
                        bytes
                    } else {
                        request.to_bytes()
                    }
                },
                REJECT,
            )
            .await;
        }
    }
}
