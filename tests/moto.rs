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

/// What the boto3 script below does through the proxy, printed as one JSON object: the result
/// of each call (`ok`, or the exception class boto3 raised and its message).
const BOTO3_ALIASES: &str = r#"
import json, sys
import boto3
from botocore.config import Config

kms = boto3.client(
    "kms",
    endpoint_url=sys.argv[1],
    region_name="us-east-1",
    aws_access_key_id="AKIDEXAMPLE",
    aws_secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
    config=Config(retries={"max_attempts": 1}),
)
key, other = sys.argv[2], sys.argv[3]
results = {}

def call(name, fn, **kwargs):
    try:
        fn(**kwargs)
        results[name] = {"result": "ok"}
    except kms.exceptions.InvalidAliasNameException as e:
        results[name] = {"result": "InvalidAliasNameException", "message": str(e)}
    except Exception as e:
        results[name] = {"result": type(e).__name__, "message": str(e)}

call("create-allowed", kms.create_alias, AliasName="alias/team-ledger", TargetKeyId=key)
call("update-allowed", kms.update_alias, AliasName="alias/team-ledger", TargetKeyId=other)
call("create-denied", kms.create_alias, AliasName="alias/payments", TargetKeyId=key)
call("create-protected", kms.create_alias, AliasName="alias/team-payments-new", TargetKeyId=key)
call("update-denied", kms.update_alias, AliasName="alias/team-payments-db", TargetKeyId=other)
call("delete-denied", kms.delete_alias, AliasName="alias/team-payments-db")
call("create-reserved", kms.create_alias, AliasName="alias/aws/ebs", TargetKeyId=key)
call("delete-allowed", kms.delete_alias, AliasName="alias/team-ledger")
print(json.dumps(results))
"#;

#[tokio::test]
async fn boto3_through_the_proxy_to_moto_alias_changes_land_or_raise_invalid_alias_name() {
    let moto = Moto::start().await;
    let key = moto.create_key(&[("team:owner", "payments")]).await;
    let other = moto.create_key(&[("team:owner", "ledger")]).await;
    // The protected alias exists, made behind the proxy's back.
    let created = moto
        .call(
            "CreateAlias",
            &json!({"AliasName": "alias/team-payments-db", "TargetKeyId": key}),
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.body_str());
    let proxy = start_proxy_to(&moto.url(), ProxyConfig::default()).await;
    let before = moto_requests(&moto);

    let python = common::moto::Moto::python();
    let url = proxy.url();
    let (key_arg, other_arg) = (key.clone(), other.clone());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args(["-c", BOTO3_ALIASES, &url, &key_arg, &other_arg])
            .env_remove("AWS_PROFILE")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .output()
            .expect("run the venv's python")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "boto3 script failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    for allowed in ["create-allowed", "update-allowed", "delete-allowed"] {
        assert_eq!(results[allowed]["result"], "ok", "{allowed}: {results:#}");
    }
    for (denied, rule) in [
        ("create-denied", Some("alias-namespace")),
        ("create-protected", Some("payments-aliases")),
        ("update-denied", Some("payments-aliases")),
        ("delete-denied", Some("payments-aliases")),
        ("create-reserved", None),
    ] {
        assert_eq!(
            results[denied]["result"], "InvalidAliasNameException",
            "{denied}: {results:#}"
        );
        if let Some(rule) = rule {
            let message = results[denied]["message"].as_str().unwrap();
            assert!(
                message.contains(&format!("rule {rule}")),
                "{denied}: {message}"
            );
        }
    }
    // Only the three allowed calls reached moto.
    assert_eq!(moto_requests(&moto), before + 3, "{}", moto.log());
    // moto's state: the protected alias still points at its key, the denied ones do not exist,
    // and the allowed one came and went.
    let aliases = moto.call("ListAliases", &json!({})).await.json();
    let names: Vec<(&str, Option<&str>)> = aliases["Aliases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["AliasName"].as_str().unwrap(), a["TargetKeyId"].as_str()))
        .filter(|(n, _)| !n.starts_with("alias/aws/"))
        .collect();
    assert_eq!(
        names,
        [("alias/team-payments-db", Some(key.as_str()))],
        "{aliases:#}"
    );
    let audit = proxy.settled_audit().await;
    let decisions: Vec<(&str, &str)> = audit
        .iter()
        .filter(|r| r["event"] == "decision")
        .map(|r| {
            (
                r["alias"].as_str().unwrap_or_default(),
                r["decision"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [
            ("alias/team-ledger", "allow"),
            ("alias/team-ledger", "allow"),
            ("alias/payments", "deny"),
            ("alias/team-payments-new", "deny"),
            ("alias/team-payments-db", "deny"),
            ("alias/team-payments-db", "deny"),
            ("alias/aws/ebs", "deny"),
            ("alias/team-ledger", "allow"),
        ]
    );
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
