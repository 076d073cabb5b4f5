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
        alias: None,
    }
}

fn untag(keys: &[&str]) -> TagChange {
    TagChange {
        operation: TagOperation::UntagResource,
        key_id: Some("1234abcd".into()),
        set: vec![],
        remove: keys.iter().map(|k| (*k).to_owned()).collect(),
        alias: None,
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
        caller: None,
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

fn alias_change(op: TagOperation, alias: &str, target: Option<&str>) -> TagChange {
    TagChange {
        operation: op,
        key_id: target.map(str::to_owned),
        set: vec![],
        remove: vec![],
        alias: Some(alias.to_owned()),
    }
}

const ALIAS_RULES: &str = r#"
[[policy.rule]]
id = "team-aliases"
type = "alias-prefix"
prefixes = ["alias/team-", "alias/app/"]

[[policy.rule]]
id = "payments-aliases"
type = "protected-alias"
aliases = ["alias/payments-*", "alias/root"]

[[policy.rule]]
id = "prod-targets"
type = "alias-target"
aliases = ["alias/team-prod-*"]
targets = ["arn:aws:kms:*:111122223333:key/*", "mrk-prod-*"]
"#;

#[test]
fn each_alias_rule_type_allows_and_denies() {
    use TagOperation::{CreateAlias, DeleteAlias, UpdateAlias};
    let p = policy(ALIAS_RULES);
    let ctx = Context::default();
    let prod = "arn:aws:kms:us-east-1:111122223333:key/1234abcd";
    let other = "arn:aws:kms:us-east-1:999999999999:key/1234abcd";
    let cases: &[(TagChange, &[&str])] = &[
        (alias_change(CreateAlias, "alias/team-a", Some("k1")), &[]),
        (alias_change(CreateAlias, "alias/app/x", Some("k1")), &[]),
        (
            alias_change(CreateAlias, "alias/other", Some("k1")),
            &["team-aliases"],
        ),
        // Exact case: alias names are case-sensitive.
        (
            alias_change(CreateAlias, "alias/Team-a", Some("k1")),
            &["team-aliases"],
        ),
        (
            alias_change(UpdateAlias, "alias/other", Some("k1")),
            &["team-aliases"],
        ),
        // DeleteAlias is not held to the prefixes.
        (alias_change(DeleteAlias, "alias/other", None), &[]),
        (
            alias_change(CreateAlias, "alias/payments-x", Some("k1")),
            &["payments-aliases", "team-aliases"],
        ),
        // Protected globs compare ignoring case: the stricter reading.
        (
            alias_change(DeleteAlias, "alias/PAYMENTS-x", None),
            &["payments-aliases"],
        ),
        (
            alias_change(DeleteAlias, "alias/root", None),
            &["payments-aliases"],
        ),
        (alias_change(DeleteAlias, "alias/rooted", None), &[]),
        (
            alias_change(UpdateAlias, "alias/team-prod-db", Some(prod)),
            &[],
        ),
        (
            alias_change(UpdateAlias, "alias/team-prod-db", Some(other)),
            &["prod-targets"],
        ),
        // A bare id cannot be tied to the account: it is not certainly a listed key.
        (
            alias_change(CreateAlias, "alias/team-prod-db", Some("1234abcd")),
            &["prod-targets"],
        ),
        (
            alias_change(CreateAlias, "alias/TEAM-PROD-db", Some("mrk-prod-1")),
            &["team-aliases"],
        ),
        (
            alias_change(CreateAlias, "alias/team-prod-db", Some("mrk-prod-1")),
            &[],
        ),
        (
            alias_change(CreateAlias, "alias/team-dev", Some(other)),
            &[],
        ),
    ];
    for (change, expected) in cases {
        let decision = p.evaluate(change, &ctx);
        let mut got = rules_violated(&decision);
        got.sort_unstable();
        assert_eq!(got, *expected, "{change:?}");
        assert!(decision
            .violations
            .iter()
            .all(|v| v.message.contains("alias")));
    }
    // Tag changes are not judged by alias rules, nor alias changes by tag rules.
    let tags = policy(&POLICY[..POLICY.find("# Aliases grant").unwrap()]);
    assert!(tags
        .evaluate(&alias_change(CreateAlias, "alias/x", Some("k")), &ctx)
        .allowed());
    assert!(p
        .evaluate(&set(TagOperation::TagResource, &[("Project", "x")]), &ctx)
        .allowed());
}

#[test]
fn alias_rules_take_mode_key_ids_and_exempt_principals() {
    let p = policy(
        r#"
[[policy.rule]]
id = "protected"
type = "protected-alias"
aliases = ["alias/payments-*"]
key_ids = ["k"]
exempt_principals = ["AKIDADMIN"]

[[policy.rule]]
id = "trial"
type = "alias-prefix"
prefixes = ["alias/team-"]
mode = "dry-run"
"#,
    );
    let ctx = Context::default();
    let in_account = alias_change(
        TagOperation::CreateAlias,
        "alias/payments-x",
        Some("arn:aws:kms:us-east-1:111122223333:key/k"),
    );
    let d = p.evaluate(&in_account, &ctx);
    assert_eq!(rules_violated(&d), ["protected"]);
    assert_eq!(d.dry_run_violations.len(), 1);
    assert_eq!(&*d.dry_run_violations[0].rule, "trial");
    let admin = Context {
        access_key_id: Some("AKIDADMIN"),
        caller: None,
    };
    assert!(p.evaluate(&in_account, &admin).allowed());
    // Another key is out of the rule's scope; the same key id in another account's ARN is not
    // (key_ids match the id inside any ARN).
    let elsewhere = alias_change(
        TagOperation::CreateAlias,
        "alias/payments-x",
        Some("arn:aws:kms:us-east-1:111122223333:key/other"),
    );
    assert!(p.evaluate(&elsewhere, &ctx).allowed());
    let same_id = alias_change(
        TagOperation::CreateAlias,
        "alias/payments-x",
        Some("arn:aws:kms:eu-west-1:444455556666:key/k"),
    );
    assert_eq!(rules_violated(&p.evaluate(&same_id, &ctx)), ["protected"]);
    // DeleteAlias names no key: the alias may point at a listed one, so the rule applies.
    let delete = alias_change(TagOperation::DeleteAlias, "alias/payments-x", None);
    assert_eq!(rules_violated(&p.evaluate(&delete, &ctx)), ["protected"]);
}

#[test]
fn alias_rules_are_checked_at_load() {
    let errors = Config::parse(
        r#"
[[policy.rule]]
id = "a"
type = "alias-prefix"
prefixes = ["team-"]

[[policy.rule]]
id = "b"
type = "protected-alias"
aliases = []

[[policy.rule]]
id = "c"
type = "alias-target"
aliases = ["payments-*"]
targets = ["alias/other"]

[[policy.rule]]
id = "org:mine"
type = "protected-alias"
aliases = ["alias/x"]
"#,
        ConfigSource::BuiltIn,
    )
    .unwrap_err()
    .to_string();
    for expected in [
        "policy.rule[0].prefixes[0]",
        "policy.rule[1].aliases: may not be empty",
        "policy.rule[2].aliases[0]",
        "policy.rule[2].targets[0]",
        "policy.rule[3].id",
    ] {
        assert!(errors.contains(expected), "{expected}: {errors}");
    }
}

/// The three example policies of the research note (shared/research/org-tag-policies.md, §6),
/// as effective policies, with the verdicts listed there.
pub(crate) const ORG_P1: &str = r#"{"tags":{"costcenter":{"tag_key":"CostCenter","tag_value":["100","200","300*"],"enforced_for":["kms:ALL_SUPPORTED"]}}}"#;
pub(crate) const ORG_P2: &str = r#"{"tags":{"environment":{"tag_key":"Environment","tag_value":["Staging","Development"],"enforced_for":["kms:key"]}}}"#;
pub(crate) const ORG_P3: &str = r#"{"tags":{"owner":{"tag_key":"Owner","tag_value":["*@example.com"],"enforced_for":["kms:key"],"report_required_tag_for":["kms:key"]},"keyaccess":{"tag_key":"KeyAccess","tag_value":[],"enforced_for":["kms:key"]}}}"#;

fn org_policy(document: &str) -> (tempfile::TempDir, Arc<Policy>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("org.json"), document).unwrap();
    let config = dir.path().join("kms-tag-guard.toml");
    std::fs::write(&config, "[policy]\norg_tag_policy = \"org.json\"\n").unwrap();
    let policy = Config::load(&config).unwrap().policy;
    (dir, policy)
}

#[test]
fn the_research_notes_example_policies_get_their_verdicts() {
    use TagOperation::{CreateKey, ReplicateKey, TagResource};
    let ctx = Context::default();
    let p1: &[(TagChange, &[&str])] = &[
        (set(TagResource, &[("CostCenter", "200")]), &[]),
        (
            set(TagResource, &[("costcenter", "200")]),
            &["org:costcenter"],
        ),
        (set(TagResource, &[("CostCenter", "300-emea")]), &[]),
        (
            set(TagResource, &[("CostCenter", "400")]),
            &["org:costcenter"],
        ),
        (set(CreateKey, &[]), &[]),
        (set(TagResource, &[("Owner", "alice")]), &[]),
    ];
    let p2: &[(TagChange, &[&str])] = &[
        (set(CreateKey, &[("Environment", "Development")]), &[]),
        (
            set(CreateKey, &[("Environment", "Production")]),
            &["org:environment"],
        ),
        (
            set(TagResource, &[("Environment", "development")]),
            &["org:environment"],
        ),
        (
            set(TagResource, &[("ENVIRONMENT", "Staging")]),
            &["org:environment"],
        ),
        (
            set(ReplicateKey, &[("Environment", "Staging"), ("Team", "x")]),
            &[],
        ),
    ];
    let p3: &[(TagChange, &[&str])] = &[
        // AWS allows this and only reports the missing tag; the proxy enforces
        // report_required_tag_for at creation when the entry is enforced for KMS keys.
        (set(CreateKey, &[]), &["org:owner"]),
        (set(CreateKey, &[("Owner", "alice@example.com")]), &[]),
        (
            set(TagResource, &[("Owner", "alice@example.org")]),
            &["org:owner"],
        ),
        (
            set(TagResource, &[("Owner", "alice@EXAMPLE.com")]),
            &["org:owner"],
        ),
        (
            set(TagResource, &[("KeyAccess", "admins")]),
            &["org:keyaccess"],
        ),
        (untag(&["Owner"]), &[]),
    ];
    for (document, cases) in [(ORG_P1, p1), (ORG_P2, p2), (ORG_P3, p3)] {
        let (_dir, p) = org_policy(document);
        for (change, expected) in cases {
            let d = p.evaluate(change, &ctx);
            assert_eq!(rules_violated(&d), *expected, "{document}: {change:?}");
        }
    }
}

#[test]
fn imported_rules_sit_beside_toml_rules_and_say_where_they_come_from() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("org.json"), ORG_P1).unwrap();
    let config = dir.path().join("kms-tag-guard.toml");
    assert!(POLICY.contains("[policy]\n"));
    std::fs::write(
        &config,
        POLICY.replace("[policy]\n", "[policy]\norg_tag_policy = \"org.json\"\n"),
    )
    .unwrap();
    let config = Config::load(&config).unwrap();
    let summaries = config.policy.rule_summaries();
    let org = summaries.iter().find(|s| s.id == "org:costcenter").unwrap();
    assert_eq!(org.kind, "org-tag-policy");
    assert!(org.origin.ends_with("org.json: tags.costcenter"), "{org:?}");
    let toml = summaries.iter().find(|s| s.id == "abac-keys").unwrap();
    assert!(toml.origin.starts_with("policy.rule["), "{toml:?}");
    assert_eq!(
        config.org_tag_policy.as_ref().unwrap().path,
        dir.path().join("org.json")
    );
    let d = config.policy.evaluate(
        &set(
            TagOperation::TagResource,
            &[("costcenter", "1"), ("Project", "x")],
        ),
        &Context::default(),
    );
    let mut got = rules_violated(&d);
    got.sort_unstable();
    got.dedup();
    assert_eq!(got, ["abac-keys", "org-prefix", "org:costcenter"]);
}

#[test]
fn an_unreadable_or_authored_tag_policy_makes_the_config_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kms-tag-guard.toml");
    std::fs::write(&config, "[policy]\norg_tag_policy = \"missing.json\"\n").unwrap();
    let errors = Config::load(&config).unwrap_err().to_string();
    assert!(errors.contains("policy.org_tag_policy"), "{errors}");
    assert!(errors.contains("missing.json"), "{errors}");
    let authored = r#"{"tags":{"costcenter":{"tag_key":{"@@assign":"CostCenter"}}}}"#;
    std::fs::write(dir.path().join("missing.json"), authored).unwrap();
    let errors = Config::load(&config).unwrap_err().to_string();
    assert!(errors.contains("describe-effective-policy"), "{errors}");
}

#[test]
fn unclear_aws_semantics_take_the_stricter_reading() {
    let ctx = Context::default();
    // `*` matches one or more characters, never nothing.
    let (_dir, p) = org_policy(
        r#"{"tags":{"costcenter":{"tag_key":"CostCenter","tag_value":["300*","*"],"enforced_for":["kms:*"]}}}"#,
    );
    assert!(p
        .evaluate(
            &set(TagOperation::TagResource, &[("CostCenter", "300")]),
            &ctx
        )
        .allowed());
    let (_dir, p) = org_policy(
        r#"{"tags":{"costcenter":{"tag_key":"CostCenter","tag_value":["300*"],"enforced_for":["kms:*"]}}}"#,
    );
    assert!(!p
        .evaluate(
            &set(TagOperation::TagResource, &[("CostCenter", "300")]),
            &ctx
        )
        .allowed());
    let (_dir, p) = org_policy(
        r#"{"tags":{"costcenter":{"tag_key":"CostCenter","tag_value":["*"],"enforced_for":["kms:*"]}}}"#,
    );
    assert!(!p
        .evaluate(&set(TagOperation::TagResource, &[("CostCenter", "")]), &ctx)
        .allowed());
    // The policy key is matched ignoring case, so a policy key written in capitals still
    // governs every spelling of the tag key, and tag_key decides the one compliant spelling.
    let (_dir, p) =
        org_policy(r#"{"tags":{"CostCenter":{"tag_key":"CostCenter","enforced_for":["kms:*"]}}}"#);
    for key in ["costcenter", "COSTCENTER", "Co\u{17f}tCenter"] {
        let d = p.evaluate(&set(TagOperation::TagResource, &[(key, "1")]), &ctx);
        assert_eq!(rules_violated(&d), ["org:CostCenter"], "{key}");
    }
    // Without tag_key, the lower-case spelling is the compliant one (AWS's default).
    let (_dir, p) = org_policy(r#"{"tags":{"Team":{"enforced_for":["kms:*"]}}}"#);
    assert!(p
        .evaluate(&set(TagOperation::TagResource, &[("team", "1")]), &ctx)
        .allowed());
    assert!(!p
        .evaluate(&set(TagOperation::TagResource, &[("Team", "1")]), &ctx)
        .allowed());
    // Not enforced for KMS keys: reported, not enforced.
    let (_dir, p) = org_policy(
        r#"{"tags":{"costcenter":{"tag_key":"CostCenter","enforced_for":["secretsmanager:*"]}}}"#,
    );
    let d = p.evaluate(
        &set(TagOperation::TagResource, &[("costcenter", "1")]),
        &ctx,
    );
    assert!(d.allowed());
    assert_eq!(d.dry_run_violations.len(), 1);
}

// ------------------------------------------------------------------------------ callers

fn as_caller(caller: &str) -> Context<'_> {
    Context {
        access_key_id: None,
        caller: Some(caller),
    }
}

const PAYMENTS_API: &str = "spiffe://example.org/ns/payments/sa/api";
const PLATFORM_CI: &str = "spiffe://example.org/ns/platform/sa/ci";

#[test]
fn callers_and_exempt_callers_scope_a_rule() {
    let p = policy(
        r#"
[[policy.rule]]
id = "tenants-prefix"
type = "required-prefix"
prefixes = ["app:"]
callers = ["spiffe://example.org/ns/*/sa/*"]
exempt_callers = ["spiffe://example.org/ns/platform/sa/*"]

[[policy.rule]]
id = "everyone"
type = "forbidden-key"
keys = ["Project"]
exempt_callers = ["spiffe://example.org/ns/platform/sa/ci", "ci.platform.svc"]
"#,
    );
    let tag = |k: &str| set(TagOperation::TagResource, &[(k, "x")]);
    // A tenant is held to the scoped rule.
    assert_eq!(
        rules_violated(&p.evaluate(&tag("team"), &as_caller(PAYMENTS_API))),
        ["tenants-prefix"]
    );
    assert!(p
        .evaluate(&tag("app:x"), &as_caller(PAYMENTS_API))
        .allowed());
    // The platform team is exempt from both.
    assert!(p.evaluate(&tag("team"), &as_caller(PLATFORM_CI)).allowed());
    assert!(p
        .evaluate(&tag("Project"), &as_caller(PLATFORM_CI))
        .allowed());
    assert!(p
        .evaluate(&tag("Project"), &as_caller("CI.platform.svc"))
        .allowed());
    // A caller outside `callers`, or none at all, is not held to the scoped rule, but to the
    // unscoped one.
    for context in [
        Context::default(),
        as_caller("spiffe://example.org/ns/payments/sa/api/extra"),
        as_caller("spiffe://other.org/ns/payments/sa/api"),
        as_caller("api.payments.svc"),
    ] {
        let d = p.evaluate(&tag("Project"), &context);
        assert_eq!(rules_violated(&d), ["everyone"], "{context:?}");
    }
    // An identity that merely looks like the exempt one is not exempt.
    for look_alike in [
        "spiffe://example.org/ns/platform/sa/ci/x",
        "spiffe://example.org/ns/platform/sa/../sa/ci",
        "spiffe://Example.org/ns/platform/sa/ci",
        "spiffe://example.org/ns/platform/sa/CI",
        "spiffe://example.org/ns/platform/sa/c%69",
        "spiffe://example.org/ns/platformx/sa/ci",
        "spiffe://example.org.evil/ns/platform/sa/ci",
        "ci.platform.svc.evil",
        "*.platform.svc",
    ] {
        let d = p.evaluate(&tag("Project"), &as_caller(look_alike));
        assert!(rules_violated(&d).contains(&"everyone"), "{look_alike}");
    }
    // The access key id exemption and the caller scope both hold.
    let admin = Context {
        access_key_id: Some("AKIDADMIN"),
        caller: Some(PAYMENTS_API),
    };
    assert_eq!(
        rules_violated(&p.evaluate(&tag("x"), &admin)),
        ["tenants-prefix"]
    );
}

const CALLER_VALUE: &str = r#"
[[policy.rule]]
id = "team-is-yours"
type = "caller-value"
key = "team"
caller = "spiffe://example.org/ns/{team}/sa/*"
value = "{team}"

[[policy.rule]]
id = "service-is-yours"
type = "caller-value"
key = "service"
caller = "spiffe://example.org/ns/{ns}/sa/{sa}"
value = "{ns}-{sa}-*"
exempt_callers = ["spiffe://example.org/ns/platform/sa/*"]
"#;

#[test]
fn caller_value_binds_the_value_to_the_caller() {
    let p = policy(CALLER_VALUE);
    let check = |op: TagOperation, tags: &[(&str, &str)], caller: Option<&str>| {
        let context = Context {
            access_key_id: None,
            caller,
        };
        let d = p.evaluate(&set(op, tags), &context);
        rules_violated(&d)
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let tag = TagOperation::TagResource;
    let me = Some(PAYMENTS_API);
    assert!(check(tag, &[("team", "payments")], me).is_empty());
    // The key is compared as IAM compares tag keys.
    assert!(check(tag, &[("TEAM", "payments")], me).is_empty());
    assert_eq!(check(tag, &[("Team", "billing")], me), ["team-is-yours"]);
    assert_eq!(check(tag, &[("Tea\u{212a}", "x")], me), [] as [&str; 0]);
    assert_eq!(
        check(tag, &[("\u{17f}ervice", "x")], me),
        ["service-is-yours"]
    );
    // Exact values: no prefix, no case.
    for value in ["payment", "payments2", "Payments", "payments ", ""] {
        assert_eq!(
            check(tag, &[("team", value)], me),
            ["team-is-yours"],
            "{value:?}"
        );
    }
    // No identity, or one the template does not match: the key may not be set at all.
    assert_eq!(check(tag, &[("team", "payments")], None), ["team-is-yours"]);
    assert_eq!(
        check(
            tag,
            &[("team", "payments")],
            Some("spiffe://example.org/ns/payments")
        ),
        ["team-is-yours"]
    );
    assert_eq!(
        check(tag, &[("team", "payments")], Some("api.payments.svc")),
        ["team-is-yours"]
    );
    // CreateKey and ReplicateKey are held to it too.
    for op in [TagOperation::CreateKey, TagOperation::ReplicateKey] {
        assert!(check(op, &[("team", "payments")], me).is_empty());
        assert_eq!(check(op, &[("team", "billing")], me), ["team-is-yours"]);
        assert_eq!(check(op, &[("team", "payments")], None), ["team-is-yours"]);
    }
    // Other keys are not its business, and neither is removal.
    assert!(check(tag, &[("app:x", "y")], None).is_empty());
    assert!(p.evaluate(&untag(&["team"]), &Context::default()).allowed());
    // `*` is one or more characters after the caller's own parts.
    assert!(check(tag, &[("service", "payments-api-eu")], me).is_empty());
    for value in [
        "payments-api-",
        "payments-apix-eu",
        "payments-api",
        "billing-api-eu",
    ] {
        assert_eq!(
            check(tag, &[("service", value)], me),
            ["service-is-yours"],
            "{value:?}"
        );
    }
    // The platform team is exempt from the second rule, not from the first.
    assert!(check(tag, &[("service", "anything")], Some(PLATFORM_CI)).is_empty());
    assert_eq!(
        check(tag, &[("team", "payments")], Some(PLATFORM_CI)),
        ["team-is-yours"]
    );
}

#[test]
fn caller_value_denials_name_the_caller_and_what_it_may_set() {
    let p = policy(CALLER_VALUE);
    let message = |tags: &[(&str, &str)], caller: Option<&str>| {
        let context = Context {
            access_key_id: None,
            caller,
        };
        p.evaluate(&set(TagOperation::TagResource, tags), &context)
            .denial_message()
    };
    let m = message(&[("team", "billing")], Some(PAYMENTS_API));
    assert!(m.contains(PAYMENTS_API), "{m}");
    assert!(m.contains("only to \"payments\""), "{m}");
    assert!(m.contains("set the value to \"payments\""), "{m}");
    assert!(m.contains("\"billing\""), "{m}");
    let m = message(&[("service", "x")], Some(PAYMENTS_API));
    assert!(m.contains("a value matching \"payments-api-*\""), "{m}");
    let m = message(&[("team", "payments")], None);
    assert!(m.contains("has no identity"), "{m}");
    assert!(m.contains("client certificate"), "{m}");
    let m = message(&[("team", "payments")], Some("api.payments.svc"));
    assert!(
        m.contains("caller \"api.payments.svc\" may not set tag key \"team\""),
        "{m}"
    );
    assert!(m.contains("spiffe://example.org/ns/{team}/sa/*"), "{m}");
}

#[test]
fn caller_rules_are_checked_at_load_with_key_paths() {
    let errors = Config::parse(
        r#"
[[policy.rule]]
id = "a"
type = "caller-value"
key = "team"
caller = "spiffe://example.org/ns/{team}/sa/{team}"
value = "{team}"

[[policy.rule]]
id = "b"
type = "caller-value"
key = "team"
caller = "spiffe://example.org/ns/{team}/sa/*"
value = "{owner}"

[[policy.rule]]
id = "c"
type = "caller-value"
key = "team"
caller = "spiffe://example.org/ns/{te/am}"
value = "x"

[[policy.rule]]
id = "d"
type = "caller-value"
key = "team"
caller = "spiffe://example.org/ns/{team"
value = "{team"

[[policy.rule]]
id = "e"
type = "caller-value"

[[policy.rule]]
id = "f"
type = "forbidden-key"
keys = ["x"]
callers = []
exempt_callers = ["spiffe://example.org/ns/a/../b", "spiffe://example.org/ns/{team}"]
"#,
        ConfigSource::BuiltIn,
    )
    .unwrap_err()
    .to_string();
    for expected in [
        "policy.rule[0].caller",
        "appears twice",
        "policy.rule[1].value",
        "{owner} is not a name of `caller`",
        "policy.rule[2].caller",
        "may not span segments",
        "policy.rule[3].caller",
        "policy.rule[4].key",
        "policy.rule[4].caller",
        "policy.rule[4].value",
        "policy.rule[5].callers: may not be empty",
        "policy.rule[5].exempt_callers[0]",
        "policy.rule[5].exempt_callers[1]",
    ] {
        assert!(errors.contains(expected), "{expected}: {errors}");
    }
}

#[test]
fn rule_summaries_show_each_rules_caller_scope() {
    let p = policy(
        r#"
[[policy.rule]]
id = "scoped"
type = "forbidden-key"
keys = ["x"]
callers = ["spiffe://example.org/ns/payments/**"]
exempt_callers = ["spiffe://example.org/ns/payments/sa/admin"]

[[policy.rule]]
id = "plain"
type = "forbidden-key"
keys = ["x"]
"#,
    );
    let lines: Vec<String> = p.rule_summaries().iter().map(ToString::to_string).collect();
    assert_eq!(
        lines[0],
        "scoped (forbidden-key, enforce) from policy.rule[0]; applies only to callers \"spiffe://example.org/ns/payments/**\" (not to callers without an identity); exempt callers \"spiffe://example.org/ns/payments/sa/admin\""
    );
    assert_eq!(
        lines[1],
        "plain (forbidden-key, enforce) from policy.rule[1]"
    );
}

/// The same policy with every forbidden-key rule's pattern set dropped: each pattern searched
/// on its own, as before the sets.
fn without_pattern_sets(policy: &Policy) -> Policy {
    let mut plain = policy.clone();
    for rule in &mut plain.rules {
        if let rules::RuleKind::ForbiddenKey { any_pattern, .. } = &mut rule.kind {
            *any_pattern = None;
        }
    }
    plain
}

proptest::proptest! {
    #[test]
    fn pattern_sets_deny_what_each_pattern_denies(
        keys in proptest::collection::vec(
            proptest::string::string_regex("(abac|ABAC|aws|AWS|ab\u{130}c|\u{131}d|team|x)?[-:_ ]?(ſ|\u{212a}|K|id|Project)?").unwrap(),
            0..4,
        ),
        remove in proptest::bool::ANY,
    ) {
        let p = policy(&format!("{POLICY}
[[policy.rule]]
id = \"patterns-only\"
type = \"forbidden-key\"
patterns = [\"^abac[-:]\", \"^aws:\", \"id$\", \"^[a-z]+_k\", \"(?-i)^AWS\"]
on = [\"set\", \"remove\"]
"));
        let plain = without_pattern_sets(&p);
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let change = if remove {
            untag(&keys)
        } else {
            set(TagOperation::TagResource, &keys.iter().map(|k| (*k, "1234")).collect::<Vec<_>>())
        };
        let ctx = Context::default();
        proptest::prop_assert_eq!(
            format!("{:?}", p.evaluate(&change, &ctx)),
            format!("{:?}", plain.evaluate(&change, &ctx))
        );
    }
}
