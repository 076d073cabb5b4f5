//! The real aws-sdk-kms client through the proxy to a fake KMS that verifies every signature.

mod common;

use aws_sdk_kms::error::SdkError;
use aws_sdk_kms::operation::RequestId;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use common::sentinel::{assert_nothing_forwarded, is_sentinel};
use common::*;
use serde_json::Value;

/// Tags a request sets, and the rules its denial must name.
type DenialCase<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);

const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
const KEY_ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

/// Every request the fake received verified against the test credentials.
fn assert_all_verified(fake: &FakeKms) -> Vec<Recorded> {
    let requests = fake.requests();
    for r in &requests {
        r.verified();
    }
    requests
}

fn decision_records(audit: &[Value]) -> Vec<&Value> {
    audit.iter().filter(|r| r["event"] == "decision").collect()
}

fn violated_rules(record: &Value, field: &str) -> Vec<String> {
    let mut rules: Vec<String> = record[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["rule"].as_str().unwrap().to_owned())
        .collect();
    rules.sort();
    rules.dedup();
    rules
}

#[tokio::test]
async fn pass_through_operations_arrive_signed_and_unaudited() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let kms = kms_client(&proxy.url());

    let encrypted = kms
        .encrypt()
        .key_id(KEY)
        .plaintext(Blob::new(b"secret".to_vec()))
        .send()
        .await
        .expect("Encrypt");
    let decrypted = kms
        .decrypt()
        .ciphertext_blob(encrypted.ciphertext_blob().unwrap().clone())
        .send()
        .await
        .expect("Decrypt");
    assert_eq!(decrypted.plaintext().unwrap().as_ref(), b"secret");
    kms.generate_data_key()
        .key_id(KEY)
        .key_spec(DataKeySpec::Aes256)
        .send()
        .await
        .expect("GenerateDataKey");
    let keys = kms.list_keys().send().await.expect("ListKeys");
    assert_eq!(keys.keys().len(), 1);

    let requests = assert_all_verified(&fake);
    let ops: Vec<_> = requests
        .iter()
        .map(|r| r.operation().unwrap().to_owned())
        .collect();
    assert_eq!(ops, ["Encrypt", "Decrypt", "GenerateDataKey", "ListKeys"]);
    // The signed Host is the proxy's address, forwarded unchanged.
    assert_eq!(
        requests[0].header("host"),
        Some(proxy.addr.to_string().as_str())
    );
    assert!(
        proxy.audit().is_empty(),
        "pass-through traffic is not audited"
    );
}

#[tokio::test]
async fn allowed_tag_changes_are_forwarded_and_audited() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let kms = kms_client(&proxy.url());

    let tagged = kms
        .tag_resource()
        .key_id(KEY_ARN)
        .set_tags(Some(tags(&[
            ("team:app", "ledger"),
            ("cost:center", "4711"),
            ("app:tier", "gold"),
        ])))
        .send()
        .await
        .expect("TagResource allowed");
    let untagged = kms
        .untag_resource()
        .key_id(KEY)
        .tag_keys("team:app")
        .send()
        .await
        .expect("UntagResource allowed");
    let created = kms
        .create_key()
        .description("ledger key")
        .set_tags(Some(tags(&[("team:owner", "payments")])))
        .send()
        .await
        .expect("CreateKey allowed");
    let replicated = kms
        .replicate_key()
        .key_id("mrk-1234abcd12ab34cd56ef1234567890ab")
        .replica_region("eu-west-1")
        .set_tags(Some(tags(&[("team:owner", "payments")])))
        .send()
        .await
        .expect("ReplicateKey allowed");

    let requests = assert_all_verified(&fake);
    let ops: Vec<_> = requests
        .iter()
        .map(|r| r.operation().unwrap().to_owned())
        .collect();
    assert_eq!(
        ops,
        ["TagResource", "UntagResource", "CreateKey", "ReplicateKey"]
    );
    assert_eq!(requests[0].json()["Tags"][1]["TagValue"], "4711");

    let audit = proxy.wait_for_audit(8).await;
    assert_eq!(audit.len(), 8, "{audit:#?}");
    let sdk_request_ids = [
        tagged.request_id(),
        untagged.request_id(),
        created.request_id(),
        replicated.request_id(),
    ];
    for (pair, aws_request_id) in audit.chunks(2).zip(sdk_request_ids) {
        let (decision, outcome) = (&pair[0], &pair[1]);
        assert_eq!(decision["event"], "decision");
        assert_eq!(decision["decision"], "allow");
        assert_eq!(decision["access_key_id"], ACCESS_KEY_ID);
        assert_eq!(decision["region"], REGION);
        assert!(decision["source"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"));
        assert_eq!(outcome["event"], "outcome");
        assert_eq!(outcome["request_id"], decision["request_id"]);
        assert_eq!(outcome["upstream_status"], 200);
        assert_eq!(outcome["aws_error"], Value::Null);
        assert_eq!(outcome["aws_request_id"].as_str(), aws_request_id);
        assert!(outcome["duration_ms"].as_f64().unwrap() >= 0.0);
    }
    assert_eq!(audit[0]["key_id"], KEY_ARN);
    assert_eq!(
        audit[0]["set"],
        serde_json::json!([
            {"key": "team:app", "value": "ledger"},
            {"key": "cost:center", "value": "4711"},
            {"key": "app:tier", "value": "gold"}
        ])
    );
    assert_eq!(audit[2]["remove"], serde_json::json!(["team:app"]));
    assert_eq!(audit[4]["operation"], "CreateKey");
    assert_eq!(audit[4]["key_id"], Value::Null);
}

#[tokio::test]
async fn policy_violations_are_modeled_tag_exceptions_and_never_reach_kms() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let kms = kms_client(&proxy.url());

    let tag_cases: &[DenialCase] = &[
        (&[("Project", "apollo")], &["abac-keys", "org-prefix"]),
        (&[("project", "apollo")], &["abac-keys", "org-prefix"]),
        (&[("PROJECT", "apollo")], &["abac-keys", "org-prefix"]),
        (&[("abac:team", "x")], &["abac-keys", "org-prefix"]),
        (&[("owner", "x")], &["org-prefix"]),
        (&[("cost:center", "12a")], &["cost-center"]),
        (&[("app:tier", "bronze")], &["tier"]),
        (
            &[
                ("team:1", "a"),
                ("team:2", "a"),
                ("team:3", "a"),
                ("team:4", "a"),
                ("team:5", "a"),
                ("team:6", "a"),
            ],
            &["max-tags"],
        ),
        // One allowed and one forbidden tag: the whole request is denied.
        (
            &[("team:app", "ledger"), ("Environment", "prod")],
            &["abac-keys", "org-prefix"],
        ),
    ];
    for (pairs, rules) in tag_cases {
        let result = kms
            .tag_resource()
            .key_id(KEY)
            .set_tags(Some(tags(pairs)))
            .send()
            .await;
        if let Err(SdkError::ServiceError(e)) = &result {
            assert!(e.err().is_tag_exception(), "{pairs:?}: {:?}", e.err());
        }
        assert_tag_exception(result, rules);
    }

    let untag_cases: &[(&str, &[&str])] = &[
        ("Environment", &["abac-keys"]),
        ("abac-role", &["abac-keys"]),
        ("team:owner", &["owner-on-create"]),
    ];
    for (key, rules) in untag_cases {
        let result = kms.untag_resource().key_id(KEY).tag_keys(*key).send().await;
        if let Err(SdkError::ServiceError(e)) = &result {
            assert!(e.err().is_tag_exception(), "{key}");
        }
        assert_tag_exception(result, rules);
    }

    let result = kms
        .create_key()
        .set_tags(Some(tags(&[("team:app", "x")])))
        .send()
        .await;
    if let Err(SdkError::ServiceError(e)) = &result {
        assert!(e.err().is_tag_exception());
    }
    assert_tag_exception(result, &["owner-on-create"]);
    let result = kms.create_key().description("no tags").send().await;
    assert_tag_exception(result, &["owner-on-create"]);
    let result = kms
        .create_key()
        .set_tags(Some(tags(&[("team:owner", "x"), ("Project", "y")])))
        .send()
        .await;
    assert_tag_exception(result, &["abac-keys", "org-prefix"]);
    let result = kms
        .replicate_key()
        .key_id("mrk-1")
        .replica_region("eu-west-1")
        .set_tags(Some(tags(&[("team:owner", "x"), ("environment", "prod")])))
        .send()
        .await;
    if let Err(SdkError::ServiceError(e)) = &result {
        assert!(e.err().is_tag_exception());
    }
    assert_tag_exception(result, &["abac-keys", "org-prefix"]);

    assert_nothing_forwarded("denied tag changes", &fake, proxy.addr).await;

    let audit = proxy.audit();
    let decisions = decision_records(&audit);
    assert_eq!(
        decisions.len(),
        audit.len(),
        "denials have no outcome records"
    );
    assert_eq!(decisions.len(), tag_cases.len() + untag_cases.len() + 4);
    for record in &decisions {
        assert_eq!(record["decision"], "deny");
    }
    assert_eq!(
        violated_rules(decisions[1], "violations"),
        ["abac-keys", "org-prefix"]
    );
    let project = decisions[1]["violations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["rule"] == "abac-keys")
        .unwrap();
    assert_eq!(project["key"], "project");

    // The proxy still forwards what the policy allows.
    kms.tag_resource()
        .key_id(KEY)
        .tags(tag("team:app", "ledger"))
        .send()
        .await
        .expect("allowed after denials");
    let forwarded = assert_all_verified(&fake);
    assert_eq!(forwarded.iter().filter(|r| !is_sentinel(r)).count(), 1);
}

#[tokio::test]
async fn dry_run_forwards_and_records_violations() {
    let fake = FakeKms::start().await;
    let policy = TEST_POLICY.replace("[policy]\n", "[policy]\nmode = \"dry-run\"\n");
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            policy,
            ..ProxyConfig::default()
        },
    )
    .await;
    let kms = kms_client(&proxy.url());
    kms.tag_resource()
        .key_id(KEY)
        .tags(tag("Project", "apollo"))
        .send()
        .await
        .expect("dry-run forwards");
    assert_eq!(assert_all_verified(&fake).len(), 1);
    let audit = proxy.wait_for_audit(2).await;
    assert_eq!(audit[0]["decision"], "allow");
    assert_eq!(
        violated_rules(&audit[0], "violations"),
        Vec::<String>::new()
    );
    assert_eq!(
        violated_rules(&audit[0], "dry_run_violations"),
        ["abac-keys", "org-prefix"]
    );
    assert_eq!(audit[1]["upstream_status"], 200);
}

#[tokio::test]
async fn a_rule_in_dry_run_records_while_the_others_enforce() {
    let fake = FakeKms::start().await;
    let policy = r#"
[[policy.rule]]
id = "abac-keys"
type = "forbidden-key"
keys = ["Project"]
mode = "dry-run"

[[policy.rule]]
id = "org-prefix"
type = "required-prefix"
prefixes = ["team:"]
"#;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            policy: policy.into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let kms = kms_client(&proxy.url());
    // Only the dry-run rule is broken: forwarded, recorded.
    kms.tag_resource()
        .key_id(KEY)
        .tags(tag("team:Project", "x"))
        .send()
        .await
        .expect("no enforced rule broken");
    let result = kms
        .tag_resource()
        .key_id(KEY)
        .tags(tag("Project", "x"))
        .send()
        .await;
    assert_tag_exception(result, &["org-prefix"]);
    assert_eq!(assert_all_verified(&fake).len(), 1);
    let audit = proxy.wait_for_audit(3).await;
    let decisions = decision_records(&audit);
    assert_eq!(decisions[1]["decision"], "deny");
    assert_eq!(violated_rules(decisions[1], "violations"), ["org-prefix"]);
    assert_eq!(
        violated_rules(decisions[1], "dry_run_violations"),
        ["abac-keys"]
    );
}

#[tokio::test]
async fn key_ids_and_exempt_principals_scope_rules() {
    let fake = FakeKms::start().await;
    let policy = r#"
[[policy.rule]]
id = "prod-abac"
type = "forbidden-key"
keys = ["Project"]
key_ids = ["arn:aws:kms:*:111122223333:key/*"]
exempt_principals = ["AKIDGUARDEXEMPT001"]
"#;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            policy: policy.into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let kms = kms_client(&proxy.url());
    let in_scope = kms
        .tag_resource()
        .key_id("arn:aws:kms:us-east-1:111122223333:key/k1")
        .tags(tag("Project", "x"))
        .send()
        .await;
    assert_tag_exception(in_scope, &["prod-abac"]);
    // A bare key id may belong to the account: the rule applies.
    let bare = kms
        .tag_resource()
        .key_id(KEY)
        .tags(tag("Project", "x"))
        .send()
        .await;
    assert_tag_exception(bare, &["prod-abac"]);
    assert_eq!(fake.count(), 0);

    // Another account's ARN: the key id inside it may name a key of the account (a reader such as
    // moto looks it up in the caller's account), so the rule applies.
    let other_account = kms
        .tag_resource()
        .key_id("arn:aws:kms:us-east-1:444455556666:key/k2")
        .tags(tag("Project", "x"))
        .send()
        .await;
    assert_tag_exception(other_account, &["prod-abac"]);
    assert_eq!(fake.count(), 0);
    // CreateKey has no KeyId, so rules with key_ids do not apply to it.
    kms.create_key()
        .tags(tag("Project", "x"))
        .send()
        .await
        .expect("CreateKey is out of a key_ids rule's scope");
    let exempt = kms_client_with(&proxy.url(), EXEMPT_ACCESS_KEY_ID, EXEMPT_SECRET_KEY, 1);
    exempt
        .tag_resource()
        .key_id("arn:aws:kms:us-east-1:111122223333:key/k1")
        .tags(tag("Project", "x"))
        .send()
        .await
        .expect("an exempt principal is allowed");
    let requests = assert_all_verified(&fake);
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].verified().access_key_id, EXEMPT_ACCESS_KEY_ID);
}

/// A denial of an alias change: 400, `InvalidAliasNameException` (the error the SDK raises for
/// a bad alias), a message naming every rule.
fn assert_alias_denied<E, R>(
    result: Result<R, SdkError<E, aws_sdk_kms::config::http::HttpResponse>>,
    rules: &[&str],
) where
    E: aws_sdk_kms::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_kms::error::ProvideErrorMetadata;
    let error = result.expect_err("the proxy must deny");
    let status = error.raw_response().map(|r| r.status().as_u16());
    assert_eq!(status, Some(400), "{}", error_chain(&error));
    assert_eq!(
        error.code(),
        Some("InvalidAliasNameException"),
        "{}",
        error_chain(&error)
    );
    let message = error.message().unwrap_or_default().to_owned();
    for rule in rules {
        assert!(
            message.contains(&format!("rule {rule}")),
            "{rule} not in {message}"
        );
    }
}

const PROD_KEY_ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd";
const OTHER_KEY_ARN: &str = "arn:aws:kms:us-east-1:999999999999:key/1234abcd";

#[tokio::test]
async fn alias_changes_are_judged_and_denials_are_typed_alias_exceptions() {
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let kms = kms_client(&proxy.url());

    // Allowed: inside the namespaces, not protected, the production alias at a production key.
    kms.create_alias()
        .alias_name("alias/team-ledger")
        .target_key_id(KEY)
        .send()
        .await
        .expect("CreateAlias in the team namespace is allowed");
    kms.update_alias()
        .alias_name("alias/app-prod-ledger")
        .target_key_id(PROD_KEY_ARN)
        .send()
        .await
        .expect("UpdateAlias to a production key is allowed");
    kms.delete_alias()
        .alias_name("alias/legacy")
        .send()
        .await
        .expect("DeleteAlias of an unprotected alias is allowed");
    let allowed = fake
        .wait_for_requests(3, std::time::Duration::from_secs(5))
        .await;
    let targets: Vec<&str> = allowed.iter().filter_map(|r| r.operation()).collect();
    assert_eq!(targets, ["CreateAlias", "UpdateAlias", "DeleteAlias"]);
    fake.clear();

    // Denied, with the modeled CreateAlias exception.
    let result = kms
        .create_alias()
        .alias_name("alias/payments")
        .target_key_id(KEY)
        .send()
        .await;
    if let Err(SdkError::ServiceError(e)) = &result {
        assert!(e.err().is_invalid_alias_name_exception(), "{:?}", e.err());
    }
    assert_alias_denied(result, &["alias-namespace"]);
    let result = kms
        .create_alias()
        .alias_name("alias/team-payments")
        .target_key_id(KEY)
        .send()
        .await;
    assert_alias_denied(result, &["payments-aliases"]);
    // UpdateAlias: judged on its name and its new target.
    let result = kms
        .update_alias()
        .alias_name("alias/team-payments-db")
        .target_key_id(KEY)
        .send()
        .await;
    assert_alias_denied(result, &["payments-aliases"]);
    let result = kms
        .update_alias()
        .alias_name("alias/app-prod-ledger")
        .target_key_id(OTHER_KEY_ARN)
        .send()
        .await;
    assert_alias_denied(result, &["prod-alias-targets"]);
    // A bare key id cannot be tied to the production account.
    let result = kms
        .update_alias()
        .alias_name("alias/app-prod-ledger")
        .target_key_id(KEY)
        .send()
        .await;
    assert_alias_denied(result, &["prod-alias-targets"]);
    // DeleteAlias: judged on its name.
    let result = kms
        .delete_alias()
        .alias_name("alias/team-payments")
        .send()
        .await;
    assert_alias_denied(result, &["payments-aliases"]);
    // The model's alias name rules, read strictly: refused as unreadable, typed the same way.
    let result = kms
        .create_alias()
        .alias_name("alias/aws/ebs")
        .target_key_id(KEY)
        .send()
        .await;
    assert_alias_denied(result, &[]);
    let result = kms
        .create_alias()
        .alias_name("alias/team-x")
        .target_key_id("alias/team-ledger")
        .send()
        .await;
    assert_alias_denied(result, &[]);

    assert_nothing_forwarded("denied alias changes", &fake, proxy.addr).await;

    let audit = proxy.settled_audit().await;
    let decisions = decision_records(&audit);
    assert_eq!(decisions.len(), 3 + 8, "{audit:#?}");
    assert_eq!(decisions[0]["operation"], "CreateAlias");
    assert_eq!(decisions[0]["alias"], "alias/team-ledger");
    assert_eq!(decisions[0]["target_key_id"], KEY);
    assert_eq!(decisions[0]["decision"], "allow");
    assert_eq!(decisions[2]["operation"], "DeleteAlias");
    assert_eq!(decisions[2]["alias"], "alias/legacy");
    assert_eq!(decisions[2]["target_key_id"], Value::Null);
    assert_eq!(decisions[2]["key_id"], Value::Null);
    let outcomes: Vec<&Value> = audit.iter().filter(|r| r["event"] == "outcome").collect();
    assert_eq!(outcomes.len(), 3);
    assert!(
        outcomes.iter().all(|o| o["applied"] == "yes"),
        "{outcomes:#?}"
    );
    let repoint = decisions[6];
    assert_eq!(repoint["operation"], "UpdateAlias");
    assert_eq!(repoint["decision"], "deny");
    assert_eq!(repoint["alias"], "alias/app-prod-ledger");
    assert_eq!(repoint["target_key_id"], OTHER_KEY_ARN);
    assert_eq!(
        violated_rules(repoint, "violations"),
        ["prod-alias-targets"]
    );
    let reserved = decisions[9];
    assert_eq!(reserved["alias"], "alias/aws/ebs");
    assert_eq!(violated_rules(reserved, "violations"), ["request"]);
    // A tag change is recorded without the alias fields.
    kms.tag_resource()
        .key_id(KEY)
        .tags(tag("team:app", "ledger"))
        .send()
        .await
        .unwrap();
    let audit = proxy.settled_audit().await;
    let last = decision_records(&audit).last().copied().unwrap().clone();
    assert_eq!(last["operation"], "TagResource");
    assert!(last.get("alias").is_none() && last.get("target_key_id").is_none());
}

#[tokio::test]
async fn alias_rules_take_dry_run_key_ids_and_exempt_principals() {
    let fake = FakeKms::start().await;
    let policy = r#"
[[policy.rule]]
id = "protected"
type = "protected-alias"
aliases = ["alias/payments*"]
key_ids = ["1234abcd"]
exempt_principals = ["AKIDGUARDEXEMPT001"]

[[policy.rule]]
id = "trial-namespace"
type = "alias-prefix"
prefixes = ["alias/team-"]
mode = "dry-run"
"#;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            policy: policy.into(),
            ..ProxyConfig::default()
        },
    )
    .await;
    let kms = kms_client(&proxy.url());
    let in_scope = kms
        .create_alias()
        .alias_name("alias/payments")
        .target_key_id(PROD_KEY_ARN)
        .send()
        .await;
    assert_alias_denied(in_scope, &["protected"]);
    // The same key id in another account's ARN is in scope too (moto would find the key by it).
    let same_id = kms
        .create_alias()
        .alias_name("alias/payments")
        .target_key_id(OTHER_KEY_ARN)
        .send()
        .await;
    assert_alias_denied(same_id, &["protected"]);
    // DeleteAlias names no key: the alias may point at a key in scope, so the rule applies.
    let delete = kms.delete_alias().alias_name("alias/Payments").send().await;
    assert_alias_denied(delete, &["protected"]);
    assert_eq!(fake.count(), 0);

    kms.create_alias()
        .alias_name("alias/payments")
        .target_key_id("arn:aws:kms:us-east-1:111122223333:key/5678efgh")
        .send()
        .await
        .expect("another key is out of the rule's scope");
    let exempt = kms_client_with(&proxy.url(), EXEMPT_ACCESS_KEY_ID, EXEMPT_SECRET_KEY, 1);
    exempt
        .delete_alias()
        .alias_name("alias/payments")
        .send()
        .await
        .expect("an exempt principal is allowed");
    let requests = assert_all_verified(&fake);
    assert_eq!(requests.len(), 2);
    let audit = proxy.settled_audit().await;
    let decisions = decision_records(&audit);
    // The dry-run namespace rule recorded every alias outside alias/team-, and denied none.
    let forwarded = &decisions[3];
    assert_eq!(forwarded["decision"], "allow");
    assert_eq!(
        violated_rules(forwarded, "dry_run_violations"),
        ["trial-namespace"]
    );
}

/// The three example tag policies of the research note (shared/research/org-tag-policies.md §6),
/// as the effective policies AWS would hand out: P1 as `describe-effective-policy` prints it,
/// P2 and P3 as plain documents.
const ORG_P1: &str = r#"{"tags":{"costcenter":{"tag_key":"CostCenter","tag_value":["100","200","300*"],"enforced_for":["kms:ALL_SUPPORTED"]}}}"#;
const ORG_P2: &str = r#"{"tags":{"environment":{"tag_key":"Environment","tag_value":["Staging","Development"],"enforced_for":["kms:key"]}}}"#;
const ORG_P3: &str = r#"{"tags":{"owner":{"tag_key":"Owner","tag_value":["*@example.com"],"enforced_for":["kms:key"],"report_required_tag_for":["kms:key"]},"keyaccess":{"tag_key":"KeyAccess","tag_value":[],"enforced_for":["kms:key"]}}}"#;

/// A proxy whose policy is only the imported tag policy `document`.
async fn org_proxy(fake: &FakeKms, dir: &tempfile::TempDir, document: &str) -> TestProxy {
    let path = dir.path().join("effective-tag-policy.json");
    std::fs::write(&path, document).unwrap();
    start_proxy_with(
        fake,
        ProxyConfig {
            policy: format!("[policy]\norg_tag_policy = \"{}\"\n", path.display()),
            ..ProxyConfig::default()
        },
    )
    .await
}

#[tokio::test]
async fn an_imported_tag_policy_gives_the_research_notes_verdicts() {
    let fake = FakeKms::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cli_output = serde_json::json!({"EffectivePolicy": {
        "PolicyContent": ORG_P1,
        "LastUpdatedTimestamp": "2020-06-09T08:34:25.103000-07:00",
        "TargetId": "123456789012",
        "PolicyType": "TAG_POLICY"
    }})
    .to_string();

    // P1: key case, a value list with a wildcard, enforced for KMS.
    let proxy = org_proxy(&fake, &dir, &cli_output).await;
    let kms = kms_client(&proxy.url());
    let tag_one =
        |k: &'static str, v: &'static str| kms.tag_resource().key_id(KEY).tags(tag(k, v)).send();
    tag_one("CostCenter", "200")
        .await
        .expect("exact key, listed value");
    assert_tag_exception(tag_one("costcenter", "200").await, &["org:costcenter"]);
    tag_one("CostCenter", "300-emea")
        .await
        .expect("matches 300*");
    assert_tag_exception(tag_one("CostCenter", "400").await, &["org:costcenter"]);
    kms.create_key().send().await.expect("untagged creation");
    tag_one("Owner", "alice")
        .await
        .expect("key not in the policy");
    drop(proxy);

    // P2: the sandbox OU's effective policy.
    let proxy = org_proxy(&fake, &dir, ORG_P2).await;
    let kms = kms_client(&proxy.url());
    kms.create_key()
        .tags(tag("Environment", "Development"))
        .send()
        .await
        .expect("listed");
    let production = kms
        .create_key()
        .tags(tag("Environment", "Production"))
        .send()
        .await;
    assert_tag_exception(production, &["org:environment"]);
    let lower = kms
        .tag_resource()
        .key_id(KEY)
        .tags(tag("Environment", "development"))
        .send()
        .await;
    assert_tag_exception(lower, &["org:environment"]);
    let upper = kms
        .tag_resource()
        .key_id(KEY)
        .tags(tag("ENVIRONMENT", "Staging"))
        .send()
        .await;
    assert_tag_exception(upper, &["org:environment"]);
    kms.replicate_key()
        .key_id("mrk-1")
        .replica_region("eu-west-1")
        .set_tags(Some(tags(&[("Environment", "Staging"), ("Team", "x")])))
        .send()
        .await
        .expect("Team is not evaluated");
    drop(proxy);

    // P3: a required owner e-mail, a banned key.
    let proxy = org_proxy(&fake, &dir, ORG_P3).await;
    let kms = kms_client(&proxy.url());
    // AWS lets this through and reports the missing tag; the proxy stops it, because the entry
    // is enforced for KMS keys and report_required_tag_for names them.
    assert_tag_exception(kms.create_key().send().await, &["org:owner"]);
    kms.create_key()
        .tags(tag("Owner", "alice@example.com"))
        .send()
        .await
        .expect("matches *@example.com");
    for (key, value, rule) in [
        ("Owner", "alice@example.org", "org:owner"),
        ("Owner", "alice@EXAMPLE.com", "org:owner"),
        ("KeyAccess", "admins", "org:keyaccess"),
    ] {
        let result = kms
            .tag_resource()
            .key_id(KEY)
            .tags(tag(key, value))
            .send()
            .await;
        assert_tag_exception(result, &[rule]);
    }
    kms.untag_resource()
        .key_id(KEY)
        .tag_keys("Owner")
        .send()
        .await
        .expect("UntagResource is not blocked");

    // Every allowed request reached KMS, no denied one did.
    let forwarded: Vec<String> = assert_all_verified(&fake)
        .iter()
        .filter_map(|r| r.operation().map(str::to_owned))
        .collect();
    assert_eq!(
        forwarded,
        [
            "TagResource",
            "TagResource",
            "CreateKey",
            "TagResource",
            "CreateKey",
            "ReplicateKey",
            "CreateKey",
            "UntagResource"
        ]
    );
}
