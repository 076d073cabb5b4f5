//! Upstream failures are answered with retryable 5xx, and unknown hosts are never contacted.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kms::error::ProvideErrorMetadata;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::Tag;
use common::*;
use tokio::net::TcpListener;

const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";

/// A TCP server that accepts connections and closes them without a word, counting them.
async fn hang_up_server() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (url, accepted)
}

fn assert_json_error(response: &RawResponse, status: u16, error_type: &str) {
    assert_eq!(response.status, status, "{}", response.body_str());
    assert_eq!(
        response.header("content-type"),
        Some("application/x-amz-json-1.1")
    );
    assert!(response.header("x-amzn-requestid").is_some());
    assert!(response.header("x-kms-tag-guard").is_some());
    let body = response.json();
    assert_eq!(body["__type"], error_type);
    assert!(!body["message"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_retryable_bad_gateway() {
    let fake = FakeKms::start().await;
    // A port with nothing listening: bind, note it, close.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            endpoint: Some(dead),
            ..ProxyConfig::default()
        },
    )
    .await;

    let request = RawRequest::signed_kms(&proxy.addr.to_string(), "TrentService.Encrypt", b"{}");
    let response = raw::send(proxy.addr, &request.to_bytes()).await;
    assert_json_error(&response, 502, "BadGateway");
    assert!(response.json()["message"]
        .as_str()
        .unwrap()
        .contains("could not reach KMS"));

    let request = RawRequest::signed_kms(
        &proxy.addr.to_string(),
        "TrentService.TagResource",
        br#"{"KeyId":"k","Tags":[{"TagKey":"team:a","TagValue":"b"}]}"#,
    );
    let response = raw::send(proxy.addr, &request.to_bytes()).await;
    assert_json_error(&response, 502, "BadGateway");
    let audit = proxy.wait_for_audit(2).await;
    assert_eq!(audit[0]["decision"], "allow");
    assert_eq!(audit[1]["event"], "outcome");
    assert_eq!(audit[1]["upstream_status"], serde_json::Value::Null);
    assert_eq!(audit[1]["aws_error"], "BadGateway");
    assert!(audit[1]["error"]
        .as_str()
        .unwrap()
        .contains("could not reach KMS"));
}

#[tokio::test]
async fn the_sdk_retries_a_bad_gateway() {
    let fake = FakeKms::start().await;
    let (url, accepted) = hang_up_server().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            endpoint: Some(url),
            ..ProxyConfig::default()
        },
    )
    .await;
    let kms = kms_client_with(&proxy.url(), ACCESS_KEY_ID, SECRET_KEY, 3);
    let error = kms
        .encrypt()
        .key_id(KEY)
        .plaintext(Blob::new(b"x".to_vec()))
        .send()
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("BadGateway"));
    assert!(
        accepted.load(Ordering::SeqCst) >= 3,
        "the SDK should have tried 3 times, the upstream saw {} connections",
        accepted.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn a_silent_upstream_is_a_retryable_gateway_timeout() {
    let fake = FakeKms::start().await;
    fake.set_delay(Duration::from_secs(2));
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            upstream: "timeout_ms = 200".into(),
            ..ProxyConfig::default()
        },
    )
    .await;

    let request = RawRequest::signed_kms(&proxy.addr.to_string(), "TrentService.ListKeys", b"{}");
    let response = raw::send(proxy.addr, &request.to_bytes()).await;
    assert_json_error(&response, 504, "GatewayTimeout");

    fake.clear();
    let kms = kms_client_with(&proxy.url(), ACCESS_KEY_ID, SECRET_KEY, 2);
    let error = kms
        .tag_resource()
        .key_id(KEY)
        .tags(
            Tag::builder()
                .tag_key("team:a")
                .tag_value("b")
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("GatewayTimeout"));
    let received = fake.wait_for_requests(2, Duration::from_secs(2)).await;
    assert_eq!(received.len(), 2, "the SDK retries a 504");
    let audit = proxy.wait_for_audit(4).await;
    let outcomes: Vec<_> = audit.iter().filter(|r| r["event"] == "outcome").collect();
    assert_eq!(outcomes.len(), 2);
    assert_eq!(outcomes[0]["aws_error"], "GatewayTimeout");
}

#[tokio::test]
async fn a_host_outside_allowed_hosts_is_misdirected_and_not_contacted() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            without_endpoint: true,
            ..ProxyConfig::default()
        },
    )
    .await;
    for (host, target) in [
        ("evil.example.com", "TrentService.Encrypt"),
        (
            "kms.us-east-1.amazonaws.com.evil.example.com",
            "TrentService.Encrypt",
        ),
        ("127.0.0.1", "TrentService.TagResource"),
    ] {
        let request = RawRequest::signed_kms(
            host,
            target,
            br#"{"KeyId":"k","Tags":[{"TagKey":"team:a","TagValue":"b"}]}"#,
        );
        let response = raw::send(proxy.addr, &request.to_bytes()).await;
        assert_json_error(&response, 421, "MisdirectedRequest");
        assert!(response.json()["message"].as_str().unwrap().contains(host));
    }
    // The SDK pointed straight at the proxy signs the proxy's address: not a KMS host.
    let kms = kms_client(&proxy.url());
    let error = kms.list_keys().send().await.unwrap_err();
    assert_eq!(error.code(), Some("MisdirectedRequest"));
    assert_eq!(fake.count(), 0);
    let audit = proxy.audit();
    assert_eq!(
        audit.len(),
        1,
        "the refused tag change is recorded: {audit:#?}"
    );
    assert_eq!(audit[0]["decision"], "deny");
}
