//! The proxy in front of moto (tests/common/moto.rs), a KMS that keeps state: an allowed tag
//! change lands in moto, a denied one neither reaches nor changes it. This proves the harness
//! the differential tests build on.

mod common;

use common::moto::Moto;
use common::*;
use serde_json::json;

/// The requests moto has answered so far (werkzeug logs one line per request).
fn moto_requests(moto: &Moto) -> usize {
    moto.log()
        .lines()
        .filter(|l| l.contains("\"POST /"))
        .count()
}

#[tokio::test]
async fn through_the_proxy_an_allowed_tag_change_lands_in_moto_and_a_denied_one_does_not() {
    let moto = Moto::start().await;
    let key_id = moto.create_key(&[("team:owner", "payments")]).await;
    let proxy = start_proxy_to(&moto.url(), ProxyConfig::default()).await;
    // As in tests/sdk.rs: the client signs the proxy's address, which is forwarded unchanged.
    let host = proxy.addr.to_string();

    let allowed = json!({"KeyId": key_id, "Tags": [{"TagKey": "team:app", "TagValue": "ledger"}]});
    let request = RawRequest::signed_kms(
        &host,
        "TrentService.TagResource",
        allowed.to_string().as_bytes(),
    );
    let answer = raw::send(proxy.addr, &request.to_bytes()).await;
    assert_eq!(answer.status, 200, "{}", answer.body_str());
    assert_eq!(
        answer.header("x-kms-tag-guard"),
        None,
        "moto's answer, relayed"
    );
    assert_eq!(
        moto.list_tags(&key_id).await,
        [
            ("team:owner".to_owned(), "payments".to_owned()),
            ("team:app".to_owned(), "ledger".to_owned())
        ]
    );

    let before = moto_requests(&moto);
    assert!(
        before >= 3,
        "CreateKey, TagResource and ListResourceTags are in moto's log:\n{}",
        moto.log()
    );
    let denied = json!({"KeyId": key_id, "Tags": [{"TagKey": "Project", "TagValue": "apollo"}]});
    let request = RawRequest::signed_kms(
        &host,
        "TrentService.TagResource",
        denied.to_string().as_bytes(),
    );
    let answer = raw::send(proxy.addr, &request.to_bytes()).await;
    assert_eq!(answer.status, 400, "{}", answer.body_str());
    assert_eq!(answer.json()["__type"], "TagException");
    assert_eq!(answer.header("x-kms-tag-guard"), Some("deny"));
    assert_eq!(
        moto_requests(&moto),
        before,
        "the denied request reached moto:\n{}",
        moto.log()
    );
    let tags = moto.list_tags(&key_id).await;
    assert!(
        !tags.iter().any(|(k, _)| k == "Project"),
        "moto holds the denied tag: {tags:?}"
    );

    let audit = proxy.wait_for_audit(3).await;
    let decisions: Vec<&str> = audit
        .iter()
        .filter(|r| r["event"] == "decision")
        .map(|r| r["decision"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, ["allow", "deny"], "{audit:#?}");
}

/// Point 8a: a rule scoped to a key id applies when the KeyId is an ARN of another partition,
/// region or account with that id: moto finds its key by the id alone, so such a request would
/// change the scoped key. The control, sent to moto directly, shows that it does.
#[tokio::test]
async fn a_key_scoped_rule_applies_to_the_key_id_inside_any_arn() {
    let moto = Moto::start().await;
    let key_id = moto.create_key(&[("team:owner", "payments")]).await;
    let policy = format!(
        "[policy]\n[[policy.rule]]\nid = \"scoped-abac\"\ntype = \"forbidden-key\"\nkeys = [\"Project\"]\nkey_ids = [\"{key_id}\"]\n"
    );
    let proxy = start_proxy_to(
        &moto.url(),
        ProxyConfig {
            policy,
            ..ProxyConfig::default()
        },
    )
    .await;
    let host = proxy.addr.to_string();
    let arns = [
        format!("arn:aws:kms:eu-west-3:999999999999:key/{key_id}"),
        format!("arn:aws-cn:kms:cn-north-1:444455556666:key/{key_id}"),
        format!("arn:aws:kms:us-east-1:123456789012:key/{key_id}"),
    ];
    for arn in &arns {
        let body = json!({"KeyId": arn, "Tags": [{"TagKey": "Project", "TagValue": "apollo"}]});
        let request = RawRequest::signed_kms(
            &host,
            "TrentService.TagResource",
            body.to_string().as_bytes(),
        );
        let answer = raw::send(proxy.addr, &request.to_bytes()).await;
        assert_eq!(answer.status, 400, "{arn}: {}", answer.body_str());
        assert_eq!(answer.header("x-kms-tag-guard"), Some("deny"), "{arn}");
    }
    assert_eq!(
        moto.list_tags(&key_id).await,
        [("team:owner".to_owned(), "payments".to_owned())]
    );
    // The control: moto itself applies such a request to its key.
    let body = json!({"KeyId": arns[0], "Tags": [{"TagKey": "Project", "TagValue": "apollo"}]});
    let answer = moto.call("TagResource", &body).await;
    assert_eq!(answer.status, 200, "{}", answer.body_str());
    assert!(moto
        .list_tags(&key_id)
        .await
        .contains(&("Project".to_owned(), "apollo".to_owned())));
}
