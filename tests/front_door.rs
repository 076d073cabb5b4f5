//! The front door, case by case (the generated differentials are in tests/differential.rs):
//! heads the HTTP parsers refuse are refused in the KMS shape and audited when they may be a
//! tag change; hosts are DNS names; a body streamed through is cut off the moment it shows
//! another protocol's shape, and never arrives whole; a refused request's body is skipped so
//! that the connection serves on.
//!
//! Every refusal also checks that nothing reached the upstream.

mod common;

use std::time::Duration;

use common::ops::scrape;
use common::raw::{self, RawConn, RawRequest, RawResponse};
use common::*;
use serde_json::Value;

const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";

fn forbidden_tags() -> Vec<u8> {
    format!(r#"{{"KeyId":"{KEY}","Tags":[{{"TagKey":"Project","TagValue":"x"}}]}}"#).into_bytes()
}

fn encrypt_body() -> Vec<u8> {
    format!(r#"{{"KeyId":"{KEY}","Plaintext":"aGVsbG8="}}"#).into_bytes()
}

/// `head` (ending in the blank line) with `line` inserted before the blank line.
fn with_line(request: &RawRequest, line: &[u8]) -> Vec<u8> {
    let mut head = request.head_bytes();
    head.truncate(head.len() - 2);
    head.extend_from_slice(line);
    head.extend_from_slice(b"\r\n\r\n");
    head.extend_from_slice(&request.body);
    head
}

/// The proxy's own KMS-shaped answer of this status and `x-kms-tag-guard` kind.
fn assert_shaped(case: &str, response: &RawResponse, status: u16, kind: &str) -> String {
    assert_eq!(response.status, status, "{case}: {}", response.body_str());
    assert_eq!(
        response.header("content-type"),
        Some("application/x-amz-json-1.1"),
        "{case}"
    );
    let body = response.json();
    assert!(body["__type"].is_string(), "{case}: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{case}: {body}"
    );
    assert_eq!(response.header("x-kms-tag-guard"), Some(kind), "{case}");
    response
        .header("x-amzn-requestid")
        .unwrap_or_else(|| panic!("{case}: no request id"))
        .to_owned()
}

fn decision_for(proxy: &TestProxy, request_id: &str) -> Option<Value> {
    proxy
        .audit()
        .into_iter()
        .find(|r| r["event"] == "decision" && r["request_id"] == request_id)
}

/// What the fake saw, once the proxy has answered a sentinel request after everything else:
/// anything forwarded before is recorded by then.
async fn settled(fake: &FakeKms, proxy: &TestProxy) -> Vec<common::Recorded> {
    let before = fake.count();
    let sentinel = RawRequest::signed_kms(&fake.host(), "TrentService.ListKeys", b"{}");
    let response = raw::send(proxy.addr, &sentinel.to_bytes()).await;
    assert_eq!(response.status, 200, "sentinel: {}", response.body_str());
    let mut recorded = fake
        .wait_for_requests(before + 1, Duration::from_secs(5))
        .await;
    recorded.pop();
    recorded
}

/// Heads hyper would refuse with a bare status are refused by the proxy in the KMS shape, with
/// a deny record when they may be a tag change, and `Connection: close`.
#[tokio::test]
async fn heads_the_http_parser_refuses_are_refused_in_the_kms_shape_and_audited() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let tag = RawRequest::signed_kms(&fake.host(), "TrentService.TagResource", &forbidden_tags());
    let encrypt = RawRequest::signed_kms(&fake.host(), "TrentService.Encrypt", &encrypt_body());
    let mut space_before_colon = tag.clone();
    space_before_colon.remove_header("X-Amz-Target");
    let cases: Vec<(&str, Vec<u8>, u16, bool)> = vec![
        ("obs-fold", with_line(&tag, b"X-Trace: a\r\n b"), 400, true),
        (
            "Transfer-Encoding: chunked, identity",
            with_line(&tag, b"Transfer-Encoding: chunked, identity"),
            400,
            true,
        ),
        (
            "a second, different Content-Length",
            with_line(&tag, b"Content-Length: 5"),
            400,
            true,
        ),
        (
            "Transfer-Encoding and Content-Length",
            with_line(&tag, b"Transfer-Encoding: chunked"),
            400,
            true,
        ),
        (
            "a space before a colon, on the target",
            with_line(
                &space_before_colon,
                b"X-Amz-Target : TrentService.TagResource",
            ),
            400,
            true,
        ),
        (
            "a control character in a value",
            with_line(&tag, b"X-Trace: a\x01b"),
            400,
            true,
        ),
        (
            "an Encrypt with an obs-fold line",
            with_line(&encrypt, b"X-Trace: a\r\n b"),
            400,
            false,
        ),
        (
            "a 70 KiB head",
            with_line(&tag, &[b"X-Big: ".as_slice(), &[b'a'; 70 * 1024]].concat()),
            431,
            true,
        ),
    ];
    for (case, bytes, status, audited) in cases {
        let mut conn = RawConn::connect(proxy.addr).await.unwrap();
        let _ = conn.write(&bytes).await;
        let response = conn.read_response().await.unwrap();
        let kind = if status == 431 { "too-large" } else { "reject" };
        let request_id = assert_shaped(case, &response, status, kind);
        assert_eq!(response.header("connection"), Some("close"), "{case}");
        assert!(
            conn.is_closed_within(Duration::from_secs(2)).await,
            "{case}"
        );
        match (audited, decision_for(&proxy, &request_id)) {
            (true, Some(record)) => {
                assert_eq!(record["decision"], "deny", "{case}: {record}");
                assert_eq!(record["violations"][0]["rule"], "request", "{case}");
                // The credential is read as leniently as the head, for the record.
                assert_eq!(record["access_key_id"], ACCESS_KEY_ID, "{case}: {record}");
            }
            (false, None) => {}
            (audited, record) => panic!("{case}: audited {audited}, record {record:?}"),
        }
    }
    assert!(
        settled(&fake, &proxy).await.is_empty(),
        "something reached the upstream"
    );
}

/// `Host` is a DNS name and an optional port: anything a URL parser could read as another host
/// is refused with 421, before any connection or name lookup.
#[tokio::test]
async fn hosts_that_are_not_dns_names_are_misdirected_and_never_looked_up() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            without_endpoint: true,
            admin: true,
            ..ProxyConfig::default()
        },
    )
    .await;
    for host in [
        "kms.x@sts.amazonaws.com",
        "kms.us-east-1.amazonaws.com:443@sts.amazonaws.com",
        "kms.us-east-1.amazonaws.com:+443",
        "kms.us-east-1.amazonaws.com:65536",
        "kms.us-east-1.amazonaws.com:",
        "[::1]:443",
        "kms.us-east-1.amazonaws.com\\@evil",
    ] {
        for (target, body) in [
            ("TrentService.Encrypt", encrypt_body()),
            ("TrentService.TagResource", forbidden_tags()),
        ] {
            let request = RawRequest::signed_kms(host, target, &body);
            let response = raw::send(proxy.addr, &request.to_bytes()).await;
            let case = format!("{host} {target}");
            let request_id = assert_shaped(&case, &response, 421, "host-not-allowed");
            assert!(
                !response.body_str().contains("sts.amazonaws.com:443"),
                "{case}"
            );
            let audited = decision_for(&proxy, &request_id);
            assert_eq!(
                audited.is_some(),
                target.ends_with("TagResource"),
                "{case}: {audited:?}"
            );
        }
    }
    let metrics = scrape(proxy.admin_addr.unwrap()).await;
    assert!(
        !metrics
            .text
            .contains("kms_tag_guard_upstream_errors_total{"),
        "a connection (or a lookup) was attempted:\n{}",
        metrics.text
    );
    assert_eq!(fake.count(), 0);
}

/// A chunked Encrypt goes through the general server, which streams its body: a form `Action`
/// in a later chunk cuts the stream, so the upstream never receives the request whole, and the
/// refusal is audited. Trailers are refused the same way.
#[tokio::test]
async fn a_streamed_body_is_cut_off_when_it_shows_another_protocol() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let first = br#"{"KeyId":"1234abcd-12ab-34cd-56ef-1234567890ab","Plaintext":"aGVsbG8=","#;
    let second = br#""EncryptionContext":{"a":"&Action=TagResource&"}}"#;
    let chunk = |data: &[u8]| [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat();
    for (case, tail) in [
        (
            "an Action parameter in the second chunk",
            [chunk(second), b"0\r\n\r\n".to_vec()].concat(),
        ),
        (
            "a trailer naming a tag-changing target",
            [
                chunk(b"}"),
                b"0\r\nX-Amz-Target: TrentService.TagResource\r\n\r\n".to_vec(),
            ]
            .concat(),
        ),
    ] {
        let mut request = RawRequest::signed_kms(&fake.host(), "TrentService.Encrypt", b"");
        request.remove_header("Content-Length");
        request.add_header("Transfer-Encoding", "chunked");
        let mut conn = RawConn::connect(proxy.addr).await.unwrap();
        conn.write(&request.head_bytes()).await.unwrap();
        conn.write(&chunk(first)).await.unwrap();
        // The first chunk is on its way upstream before the second is sent.
        fake.wait_for_progress(Duration::from_secs(5), |p| p.bytes_received >= first.len())
            .await
            .unwrap_or_else(|| panic!("{case}: the first chunk never reached the upstream"));
        conn.write(&tail).await.unwrap();
        let response = conn.read_response().await.unwrap();
        let request_id = assert_shaped(case, &response, 400, "reject");
        let record = decision_for(&proxy, &request_id).expect("audited");
        assert_eq!(record["decision"], "deny", "{case}");
        let progress = fake.progress();
        assert!(
            progress.iter().all(|p| p.complete_at.is_none()),
            "{case}: the upstream received the body whole: {progress:?}"
        );
        fake.clear();
    }
    assert!(settled(&fake, &proxy).await.is_empty());
}

/// A request refused by its head on a kept-alive connection: the answer comes at once, its body
/// is skipped, and the request pipelined behind it is served on the same connection.
#[tokio::test]
async fn a_refused_request_is_skipped_and_the_connection_serves_on() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let mut refused = RawRequest::signed_kms(&fake.host(), "TrentService.Encrypt", &encrypt_body());
    refused.set_header("Content-Type", "application/x-www-form-urlencoded");
    let misspelled = RawRequest::signed_kms(&fake.host(), "x.TagResource", &forbidden_tags());
    let behind = RawRequest::signed_kms(&fake.host(), "TrentService.Encrypt", &encrypt_body());
    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    conn.write(&[refused.to_bytes(), misspelled.to_bytes(), behind.to_bytes()].concat())
        .await
        .unwrap();
    let first = conn.read_response().await.unwrap();
    let first_id = assert_shaped("form content type", &first, 400, "reject");
    let second = conn.read_response().await.unwrap();
    let second_id = assert_shaped("misspelled target", &second, 400, "reject");
    let third = conn.read_response().await.unwrap();
    assert_eq!(third.status, 200, "{}", third.body_str());
    for id in [first_id, second_id] {
        assert_eq!(decision_for(&proxy, &id).unwrap()["decision"], "deny");
    }
    let recorded = settled(&fake, &proxy).await;
    let operations: Vec<_> = recorded.iter().map(|r| r.operation()).collect();
    assert_eq!(
        operations,
        [Some("Encrypt")],
        "only the request behind arrived"
    );
    recorded[0].verified();
}

/// With `unknown_operations = "forward"`, only `TrentService.<PascalCase>` names that contain
/// no tag-changing operation are forwarded; the default refuses them, naming the setting.
#[tokio::test]
async fn unknown_operations_are_refused_by_default_and_forwarded_only_in_the_canonical_shape() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let request = RawRequest::signed_kms(&fake.host(), "TrentService.FrobnicateKey", b"{}");
    let response = raw::send(proxy.addr, &request.to_bytes()).await;
    assert_shaped("default", &response, 400, "unknown-operation");
    assert!(
        response.body_str().contains("unknown_operations"),
        "{}",
        response.body_str()
    );

    let forwarding = start_proxy_with(
        &fake,
        ProxyConfig {
            policy: format!("{TEST_POLICY}\n")
                .replace("[policy]\n", "[policy]\nunknown_operations = \"forward\"\n"),
            ..ProxyConfig::default()
        },
    )
    .await;
    let forwarded = RawRequest::signed_kms(&fake.host(), "TrentService.FrobnicateKey", b"{}");
    let response = raw::send(forwarding.addr, &forwarded.to_bytes()).await;
    assert_eq!(response.status, 200, "{}", response.body_str());
    for target in [
        "TrentService.TagResourceV2",
        "TrentService.BatchUntagResource",
        "TrentService.CreateAliasV2",
        "TrentService.BatchDeleteAlias",
        "TrentService.UpdateAliases",
        "TrentService.frobnicateKey",
        "TrentService.Frobnicate_Key",
    ] {
        let request = RawRequest::signed_kms(&fake.host(), target, &forbidden_tags());
        let response = raw::send(forwarding.addr, &request.to_bytes()).await;
        let request_id = assert_shaped(target, &response, 400, "reject");
        assert!(decision_for(&forwarding, &request_id).is_some(), "{target}");
    }
    let recorded = settled(&fake, &forwarding).await;
    let targets: Vec<_> = recorded
        .iter()
        .map(|r| r.header("x-amz-target").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(targets, ["TrentService.FrobnicateKey"]);
}

/// Aliases grant access as tags do: another spelling of CreateAlias, UpdateAlias or DeleteAlias
/// is refused and audited like one of TagResource, and so is a malformed head naming one.
#[tokio::test]
async fn other_spellings_of_alias_operations_are_refused_and_audited_like_tag_operations() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let protected = br#"{"AliasName":"alias/team-payments-db","TargetKeyId":"1234abcd"}"#;
    for target in [
        "trentservice.createalias",
        "TrentService.createAlias",
        "TrentService.UPDATEALIAS",
        "TrentService.DeleteAlias ",
        "TrentService.Delete%41lias",
        "Kms.CreateAlias",
        "TrentService.CreateAlias,TrentService.Encrypt",
    ] {
        let request = RawRequest::signed_kms(&fake.host(), target, protected);
        let response = raw::send(proxy.addr, &request.to_bytes()).await;
        let request_id = assert_shaped(target, &response, 400, "reject");
        let record = decision_for(&proxy, &request_id)
            .unwrap_or_else(|| panic!("{target:?} was refused without a record"));
        assert_eq!(record["decision"], "deny", "{target}: {record}");
        assert_eq!(record["violations"][0]["rule"], "request", "{target}");
    }
    let create = RawRequest::signed_kms(&fake.host(), "TrentService.CreateAlias", protected);
    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    let _ = conn.write(&with_line(&create, b"X-Trace: a\r\n b")).await;
    let response = conn.read_response().await.unwrap();
    let request_id = assert_shaped("obs-fold CreateAlias", &response, 400, "reject");
    let record = decision_for(&proxy, &request_id).expect("a malformed CreateAlias is audited");
    assert_eq!(record["decision"], "deny");
    // The exact target, judged: the protected alias is denied as a bad alias name.
    let response = raw::send(proxy.addr, &create.to_bytes()).await;
    assert_shaped("CreateAlias", &response, 400, "deny");
    assert_eq!(response.json()["__type"], "InvalidAliasNameException");
    assert!(
        settled(&fake, &proxy).await.is_empty(),
        "something reached the upstream"
    );
}
