use super::*;
use crate::config::{Config, ConfigSource};
use crate::kms::{Tag, TagOperation};

/// The test policy the integration tests, the property tests and the fuzz target share.
const POLICY: &str = include_str!("../../tests/fixtures/policy.toml");

fn policy(text: &str) -> Arc<Policy> {
    Config::parse(text, ConfigSource::BuiltIn).unwrap().policy
}

fn set(op: TagOperation, tags: &[(&str, &str)]) -> TagChange {
    TagChange {
        operation: op,
        key_id: op.has_key_id().then(|| "1234abcd".to_owned()),
        set: tags
            .iter()
            .map(|(k, v)| Tag {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect(),
        remove: vec![],
    }
}

fn untag(keys: &[&str]) -> TagChange {
    TagChange {
        operation: TagOperation::UntagResource,
        key_id: Some("1234abcd".into()),
        set: vec![],
        remove: keys.iter().map(|k| (*k).to_owned()).collect(),
    }
}

fn rules_violated(decision: &Decision) -> Vec<&str> {
    decision.violations.iter().map(|v| &*v.rule).collect()
}

#[test]
fn each_rule_type_allows_and_denies() {
    let p = policy(POLICY);
    let ctx = Context::default();
    let tag = TagOperation::TagResource;
    let cases: &[(TagChange, &[&str])] = &[
        (set(tag, &[("team:a", "x")]), &[]),
        (set(tag, &[("Name", "x")]), &[]),
        (set(tag, &[("name", "x")]), &["org-prefix"]),
        (set(tag, &[("TEAM:a", "x")]), &["org-prefix"]),
        (set(tag, &[("Project", "x")]), &["org-prefix", "abac-keys"]),
        (
            set(tag, &[("team:ok", "x"), ("project", "x")]),
            &["org-prefix", "abac-keys"],
        ),
        (
            set(tag, &[("app:x", "1"), ("ABAC:team", "x")]),
            &["org-prefix", "abac-keys"],
        ),
        (set(tag, &[("cost:center", "1234")]), &[]),
        (set(tag, &[("cost:center", "12345")]), &["cost-center"]),
        (
            set(tag, &[("COST:CENTER", "abc")]),
            &["org-prefix", "cost-center"],
        ),
        (set(tag, &[("app:tier", "gold")]), &[]),
        (set(tag, &[("app:tier", "Gold")]), &["tier"]),
        (set(tag, &[("App:Tier", "bronze")]), &["org-prefix", "tier"]),
        (set(TagOperation::CreateKey, &[("team:owner", "pay")]), &[]),
        (set(TagOperation::CreateKey, &[]), &["owner-on-create"]),
        (
            set(TagOperation::ReplicateKey, &[("team:Owner", "pay")]),
            &["owner-on-create"],
        ),
        (untag(&["team:x"]), &[]),
        (untag(&["team:owner"]), &["owner-on-create"]),
        (untag(&["TEAM:OWNER"]), &[]),
        (untag(&["environment"]), &["abac-keys"]),
        (
            set(
                tag,
                &[
                    ("team:a", "1"),
                    ("team:b", "2"),
                    ("team:c", "3"),
                    ("team:d", "4"),
                    ("team:e", "5"),
                    ("team:f", "6"),
                ],
            ),
            &["max-tags"],
        ),
    ];
    for (change, expected) in cases {
        let decision = p.evaluate(change, &ctx);
        assert_eq!(rules_violated(&decision), *expected, "{change:?}");
        assert_eq!(decision.allowed(), expected.is_empty());
        assert!(decision.dry_run_violations.is_empty());
    }
}

#[test]
fn violations_name_the_rule_and_key() {
    let p = policy(POLICY);
    let d = p.evaluate(
        &set(
            TagOperation::TagResource,
            &[("team:x", "1"), ("PROJECT", "y")],
        ),
        &Context::default(),
    );
    assert_eq!(d.violations.len(), 2);
    let abac = d
        .violations
        .iter()
        .find(|v| &*v.rule == "abac-keys")
        .unwrap();
    assert_eq!(abac.key.as_deref(), Some("PROJECT"));
    let message = d.denial_message();
    assert!(message.contains("rule abac-keys"), "{message}");
    assert!(message.contains("\"PROJECT\""), "{message}");
    assert!(message.contains("rule org-prefix"), "{message}");
}

#[test]
fn forbidden_key_on_limits_the_direction() {
    let p = policy(
        r#"
[[policy.rule]]
id = "no-set"
type = "forbidden-key"
keys = ["Locked"]
on = ["set"]
"#,
    );
    let ctx = Context::default();
    assert!(!p
        .evaluate(&set(TagOperation::TagResource, &[("locked", "")]), &ctx)
        .allowed());
    assert!(p.evaluate(&untag(&["Locked"]), &ctx).allowed());
}

#[test]
fn dry_run_records_instead_of_denying() {
    let global = policy(&POLICY.replace("[policy]\n", "[policy]\nmode = \"dry-run\"\n"));
    let d = global.evaluate(
        &set(TagOperation::TagResource, &[("Project", "x")]),
        &Context::default(),
    );
    assert!(d.allowed());
    assert_eq!(d.dry_run_violations.len(), 2);

    let per_rule = policy(
        r#"
[[policy.rule]]
id = "trial"
type = "forbidden-key"
keys = ["Project"]
mode = "dry-run"

[[policy.rule]]
id = "strict"
type = "required-prefix"
prefixes = ["team:"]
"#,
    );
    let d = per_rule.evaluate(
        &set(TagOperation::TagResource, &[("Project", "x")]),
        &Context::default(),
    );
    assert_eq!(rules_violated(&d), ["strict"]);
    assert_eq!(d.dry_run_violations.len(), 1);
    assert_eq!(&*d.dry_run_violations[0].rule, "trial");
}

#[test]
fn key_ids_and_exempt_principals_scope_a_rule() {
    let p = policy(
        r#"
[[policy.rule]]
id = "prod-keys"
type = "forbidden-key"
keys = ["Project"]
key_ids = ["arn:aws:kms:*:111122223333:key/*"]
exempt_principals = ["AKIDADMIN"]
"#,
    );
    let mut change = set(TagOperation::TagResource, &[("Project", "x")]);
    change.key_id = Some("arn:aws:kms:us-east-1:111122223333:key/k".into());
    assert!(!p.evaluate(&change, &Context::default()).allowed());
    let admin = Context {
        access_key_id: Some("AKIDADMIN"),
    };
    assert!(p.evaluate(&change, &admin).allowed());
    // Another account's ARN: the key id inside may name a key of the account to a reader that
    // looks it up in the caller's account (moto): the rule applies.
    change.key_id = Some("arn:aws:kms:us-east-1:444455556666:key/k".into());
    assert!(!p.evaluate(&change, &Context::default()).allowed());
    // A bare key id may be in the account: the rule applies.
    change.key_id = Some("1234abcd-12ab-34cd-56ef-1234567890ab".into());
    assert!(!p.evaluate(&change, &Context::default()).allowed());
    // CreateKey has no KeyId: rules with key_ids do not apply to it.
    let create = set(TagOperation::CreateKey, &[("Project", "x")]);
    assert!(p.evaluate(&create, &Context::default()).allowed());
}

#[test]
fn unicode_case_variants_of_forbidden_keys_are_denied() {
    let p = policy(
        r#"
[[policy.rule]]
id = "abac"
type = "forbidden-key"
keys = ["Kind", "Status"]
patterns = ["^secret", "^iam[-:]"]
"#,
    );
    for key in [
        "\u{212a}ind",
        "KIND",
        "Statu\u{17f}",
        "\u{17f}ecret-x",
        "SECRET",
    ] {
        let d = p.evaluate(
            &set(TagOperation::TagResource, &[(key, "x")]),
            &Context::default(),
        );
        assert!(!d.allowed(), "{key}");
    }
    // The regex engine does not fold dotless or dotted i onto i; IAM (Java) does.
    for key in ["\u{131}am:role", "\u{130}AM:role", "IAM-x"] {
        let d = p.evaluate(
            &set(TagOperation::TagResource, &[(key, "x")]),
            &Context::default(),
        );
        assert!(!d.allowed(), "{key}");
    }
}
