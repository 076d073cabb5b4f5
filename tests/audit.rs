//! Audit before action: the decision is on disk before KMS sees the request, the outcome after,
//! and a tag change that cannot be recorded does not happen.

mod common;

use std::sync::{Arc, Mutex};

use aws_sdk_kms::error::ProvideErrorMetadata;
use aws_sdk_kms::operation::RequestId;
use aws_sdk_kms::primitives::Blob;
use common::proxy::read_audit;
use common::*;
use serde_json::Value;

const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";

#[tokio::test]
async fn the_decision_is_written_before_kms_receives_the_request() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;

    // What the audit file held at the moment each request reached the upstream.
    let seen: Arc<Mutex<Vec<Vec<Value>>>> = Arc::default();
    let (seen_in_hook, audit_path) = (Arc::clone(&seen), proxy.audit_path.clone());
    fake.set_hook(Arc::new(move |_| {
        seen_in_hook.lock().unwrap().push(read_audit(&audit_path));
    }));

    let kms = kms_client(&proxy.url());
    let tagged = kms
        .tag_resource()
        .key_id(KEY)
        .tags(tag("team:app", "ledger"))
        .send()
        .await
        .unwrap();
    kms.untag_resource()
        .key_id(KEY)
        .tag_keys("team:app")
        .send()
        .await
        .unwrap();

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    // First request: exactly its decision record, and no outcome yet.
    assert_eq!(seen[0].len(), 1, "{:#?}", seen[0]);
    assert_eq!(seen[0][0]["event"], "decision");
    assert_eq!(seen[0][0]["operation"], "TagResource");
    assert_eq!(seen[0][0]["decision"], "allow");
    // Second request: the first one's pair, then its own decision.
    assert_eq!(seen[1].len(), 3, "{:#?}", seen[1]);
    assert_eq!(seen[1][2]["event"], "decision");
    assert_eq!(seen[1][2]["operation"], "UntagResource");

    let audit = proxy.wait_for_audit(4).await;
    assert_eq!(audit.len(), 4);
    let outcome = &audit[1];
    assert_eq!(outcome["event"], "outcome");
    assert_eq!(outcome["request_id"], audit[0]["request_id"]);
    assert_eq!(outcome["upstream_status"], 200);
    assert_eq!(outcome["aws_request_id"].as_str(), tagged.request_id());
}

#[tokio::test]
async fn outcome_records_carry_kms_errors() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    fake.set_status_override(Some((
        400,
        r#"{"__type":"NotFoundException","message":"Key does not exist"}"#.into(),
    )));
    let kms = kms_client(&proxy.url());
    let error = kms
        .tag_resource()
        .key_id(KEY)
        .tags(tag("team:app", "ledger"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("NotFoundException"));
    let audit = proxy.wait_for_audit(2).await;
    assert_eq!(audit[0]["decision"], "allow");
    assert_eq!(audit[1]["upstream_status"], 400);
    assert_eq!(audit[1]["aws_error"], "NotFoundException");
}

#[tokio::test]
async fn an_unwritable_audit_log_stops_tag_changes_but_not_other_traffic() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            audit_path: Some("/dev/full".into()),
            ..ProxyConfig::default()
        },
    )
    .await;
    let kms = kms_client(&proxy.url());

    let allowed = kms
        .tag_resource()
        .key_id(KEY)
        .tags(tag("team:app", "ledger"))
        .send()
        .await;
    let denied = kms
        .tag_resource()
        .key_id(KEY)
        .tags(tag("Project", "x"))
        .send()
        .await;
    let created = kms.create_key().tags(tag("team:owner", "x")).send().await;
    for error in [
        allowed.unwrap_err().into_service_error().meta().clone(),
        denied.unwrap_err().into_service_error().meta().clone(),
        created.unwrap_err().into_service_error().meta().clone(),
    ] {
        assert_eq!(error.code(), Some("ServiceUnavailable"), "{error:?}");
    }
    assert_eq!(
        fake.count(),
        0,
        "a tag change without an audit record reached KMS"
    );

    kms.encrypt()
        .key_id(KEY)
        .plaintext(Blob::new(b"still flowing".to_vec()))
        .send()
        .await
        .expect("pass-through does not need the audit log");
    assert_eq!(fake.count(), 1);
}

#[tokio::test]
async fn fail_open_audit_lets_tag_changes_through() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            audit_path: Some("/dev/full".into()),
            audit: "fail_closed = false".into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let kms = kms_client(&proxy.url());
    kms.tag_resource()
        .key_id(KEY)
        .tags(tag("team:app", "ledger"))
        .send()
        .await
        .expect("fail_closed = false forwards despite the audit failure");
    let denied = kms
        .tag_resource()
        .key_id(KEY)
        .tags(tag("Project", "x"))
        .send()
        .await;
    assert_eq!(denied.unwrap_err().code(), Some("TagException"));
    assert_eq!(fake.count(), 1);
}

#[tokio::test]
async fn audit_records_never_hold_secrets() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let kms = kms_client_opts(
        &proxy.url(),
        ClientOptions {
            session_token: Some("SESSIONTOKENSECRET".into()),
            ..ClientOptions::default()
        },
    );
    kms.tag_resource()
        .key_id(KEY)
        .tags(tag("team:app", "ledger"))
        .send()
        .await
        .unwrap();
    kms.tag_resource()
        .key_id(KEY)
        .tags(tag("Project", "x"))
        .send()
        .await
        .unwrap_err();
    kms.encrypt()
        .key_id(KEY)
        .plaintext(Blob::new(b"PLAINTEXTSECRET".to_vec()))
        .send()
        .await
        .unwrap();
    let text = std::fs::read_to_string(&proxy.audit_path).unwrap();
    let signature = fake.requests()[0]
        .header("authorization")
        .unwrap()
        .rsplit("Signature=")
        .next()
        .unwrap()
        .to_owned();
    for secret in [
        SECRET_KEY,
        "SESSIONTOKENSECRET",
        &signature,
        "UExBSU5URVhUU0VDUkVU",
    ] {
        assert!(!text.contains(secret), "{secret} leaked into the audit log");
    }
    assert_eq!(read_audit(&proxy.audit_path).len(), 3);
}
