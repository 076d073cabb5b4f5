//! Property tests of the pure pipeline (contract section 4): classification, strict parsing and
//! policy evaluation, through the library's public API only.
//!
//! (a) every case spelling of a forbidden key, raw or escaped, is denied by its forbidden-key rule;
//! (b) the order of tags and of object members never changes a decision;
//! (c) the strict parser never panics and never accepts a body `serde_json` reads differently;
//! (d) `classify` never panics, and refuses every other spelling of a tag-bearing target.
//!
//! Case counts are kept small so the file runs in a few seconds in a debug build.

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::sync::LazyLock;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, subsequence, Index};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use kms_tag_guard::decide::{decision, Head, Rules};
use kms_tag_guard::fold::eq_ignore_case;
use kms_tag_guard::kms::classify::{check_tag_request_head, classify, request_host};
use kms_tag_guard::kms::credential::read_credential;
use kms_tag_guard::kms::request::parse_tag_request;
use kms_tag_guard::kms::{Route, Tag, TagChange, TagOperation, Unreadable};
use kms_tag_guard::policy::Decision;
use kms_tag_guard::Config;

/// Cases per property; `PROPTEST_CASES=10000 cargo test --test properties` runs more.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

fn config() -> ProptestConfig {
    config_scaled(1)
}

/// `factor` times the usual number of cases, for properties that are cheap to check.
fn config_scaled(factor: u32) -> ProptestConfig {
    ProptestConfig {
        // A failing case is reported with its minimal input; a regression file in the source
        // tree would only be noise for the engineers editing src/ concurrently.
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases() * factor)
    }
}

// ------------------------------------------------------------------------------------------------
// Configurations and the pipeline

#[path = "common/fuzz_pipeline.rs"]
mod fuzz_pipeline;

use fuzz_pipeline::read_fuzz_input;

/// The fuzz target's configurations: the built-in one, every rule type and option
/// (`tests/fixtures/all-rules.toml`, with forbidden keys whose letters Java folds from non-ASCII
/// characters: `ſ` → s, `K` → k, `ı`/`İ` → i), and the test policy in dry-run.
static CONFIGS: LazyLock<[Config; 3]> = LazyLock::new(fuzz_pipeline::configs);
static DEFAULT: LazyLock<&Config> = LazyLock::new(|| &CONFIGS[0]);
static STRICT: LazyLock<&Config> = LazyLock::new(|| &CONFIGS[1]);

const HOST: &str = "kms.us-east-1.amazonaws.com";
const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

/// The head of a well-formed KMS request for `target`, signed by `access_key_id` if given.
fn kms_headers(target: &str, access_key_id: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static(HOST));
    h.insert("content-type", HeaderValue::from_static(CONTENT_TYPE));
    h.insert("x-amz-target", HeaderValue::from_str(target).unwrap());
    if let Some(akid) = access_key_id {
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={akid}/20260101/us-east-1/kms/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=0"
        );
        h.insert("authorization", HeaderValue::from_str(&auth).unwrap());
    }
    h
}

/// The decision the proxy reaches for a `POST /` request.
fn decide(config: &Config, headers: &HeaderMap, body: &[u8]) -> Decision {
    decide_request(config, &Method::POST, &Uri::from_static("/"), headers, body)
}

/// [`decide`] with any request line, as the proxy sees it: the library's one decision.
fn decide_request(
    config: &Config,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Decision {
    let head = Head {
        method,
        uri,
        headers,
        tunnel_host: None,
        caller: None,
    };
    decision(&head, body, &Rules::of(config))
}

fn target(op: TagOperation) -> String {
    format!("TrentService.{}", op.name())
}

/// A JSON string literal for `s` (serde_json's escaping).
fn lit(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Violations as a sorted list of (rule, key, message): the decision with its order forgotten.
fn violation_multiset(
    v: &[kms_tag_guard::policy::Violation],
) -> Vec<(String, Option<String>, String)> {
    let mut out: Vec<_> = v
        .iter()
        .map(|v| (v.rule.to_string(), v.key.clone(), v.message.clone()))
        .collect();
    out.sort();
    out
}

fn rule_ids(v: &[kms_tag_guard::policy::Violation]) -> BTreeSet<String> {
    v.iter().map(|v| v.rule.to_string()).collect()
}

fn op_strategy() -> impl Strategy<Value = TagOperation> {
    select(TagOperation::ALL.to_vec())
}

/// The operations that carry tags (not the alias operations).
fn tag_op_strategy() -> impl Strategy<Value = TagOperation> {
    select(
        TagOperation::ALL
            .into_iter()
            .filter(|op| !op.is_alias())
            .collect::<Vec<_>>(),
    )
}

// ------------------------------------------------------------------------------------------------
// (a) Forbidden keys in every spelling

/// The spellings of one character: both ASCII cases, and the non-ASCII letters Java's
/// `equalsIgnoreCase` folds onto it.
fn alternatives(c: char) -> Vec<char> {
    let mut v = vec![c.to_ascii_lowercase(), c.to_ascii_uppercase()];
    match c.to_ascii_lowercase() {
        's' => v.push('\u{17f}'),
        'k' => v.push('\u{212a}'),
        'i' => v.extend(['\u{131}', '\u{130}']),
        _ => {}
    }
    v.dedup();
    v
}

/// One spelling of a key: the JSON string literal sent, and the string it decodes to.
#[derive(Debug, Clone)]
struct Spelling {
    json: String,
    decoded: String,
}

/// Any spelling of `base`, each character raw or as a `\uXXXX` escape (either hex case).
fn spelling(base: &'static str) -> impl Strategy<Value = Spelling> {
    let n = base.chars().count();
    vec((any::<Index>(), 0u8..4), n).prop_map(move |choices| {
        let mut json = String::from("\"");
        let mut decoded = String::new();
        for (c, (pick, encoding)) in base.chars().zip(choices) {
            let alts = alternatives(c);
            let ch = alts[pick.index(alts.len())];
            decoded.push(ch);
            match encoding {
                0 | 1 => json.push(ch),
                2 => write!(json, "\\u{:04x}", ch as u32).unwrap(),
                _ => write!(json, "\\u{:04X}", ch as u32).unwrap(),
            }
        }
        json.push('"');
        Spelling { json, decoded }
    })
}

/// A forbidden key of one of the two policies, with the rule that forbids it on set and remove.
#[derive(Debug, Clone, Copy)]
struct Forbidden {
    strict: bool,
    rule: &'static str,
    key: &'static str,
}

const FORBIDDEN: [Forbidden; 13] = [
    Forbidden {
        strict: false,
        rule: "abac-keys",
        key: "Project",
    },
    Forbidden {
        strict: false,
        rule: "abac-keys",
        key: "Environment",
    },
    Forbidden {
        strict: false,
        rule: "abac-keys",
        key: "Owner",
    },
    Forbidden {
        strict: false,
        rule: "abac-keys",
        key: "abac-risk",
    },
    Forbidden {
        strict: false,
        rule: "abac-keys",
        key: "abac:kind",
    },
    Forbidden {
        strict: false,
        rule: "abac-keys",
        key: "aws:sikt",
    },
    Forbidden {
        strict: true,
        rule: "reserved",
        key: "Kind",
    },
    Forbidden {
        strict: true,
        rule: "reserved",
        key: "Sensitivity",
    },
    Forbidden {
        strict: true,
        rule: "reserved",
        key: "Risk",
    },
    Forbidden {
        strict: true,
        rule: "reserved",
        key: "Skill",
    },
    Forbidden {
        strict: true,
        rule: "reserved",
        key: "sec:kids",
    },
    Forbidden {
        strict: true,
        rule: "reserved",
        key: "iam-sink",
    },
    Forbidden {
        strict: true,
        rule: "reserved",
        key: "SEC-Disk",
    },
];

/// Keys allowed by both policies, sent next to the forbidden one.
const NEIGHBOURS: [(&str, &str); 4] = [
    ("team:owner", "payments"),
    ("app:env", "dev"),
    ("cost:center", "4711"),
    ("Name", "ledger"),
];

const KEY_IDS: [&str; 4] = [
    "1234abcd-12ab-34cd-56ef-1234567890ab",
    "arn:aws:kms:us-east-1:111122223333:key/mrk-1",
    "arn:aws:kms:eu-west-1:999999999999:key/2",
    "alias/app",
];

/// A body for `op` carrying `key` (a JSON literal) among `neighbours`, at `position`.
fn forbidden_body(
    op: TagOperation,
    key: &str,
    neighbours: &[(&str, &str)],
    position: usize,
    key_id: &str,
) -> String {
    let mut keys: Vec<(String, String)> =
        neighbours.iter().map(|(k, v)| (lit(k), lit(v))).collect();
    keys.insert(position.min(keys.len()), (key.to_owned(), lit("x")));
    let key_id = lit(key_id);
    if op == TagOperation::UntagResource {
        let list: Vec<String> = keys.into_iter().map(|(k, _)| k).collect();
        return format!(r#"{{"KeyId":{key_id},"TagKeys":[{}]}}"#, list.join(","));
    }
    let tags: Vec<String> = keys
        .into_iter()
        .map(|(k, v)| format!(r#"{{"TagKey":{k},"TagValue":{v}}}"#))
        .collect();
    let tags = tags.join(",");
    match op {
        TagOperation::TagResource => format!(r#"{{"KeyId":{key_id},"Tags":[{tags}]}}"#),
        TagOperation::CreateKey => {
            format!(r#"{{"Description":"d","Tags":[{tags}],"KeyUsage":"ENCRYPT_DECRYPT"}}"#)
        }
        _ => format!(r#"{{"KeyId":{key_id},"ReplicaRegion":"eu-west-1","Tags":[{tags}]}}"#),
    }
}

fn forbidden_case() -> impl Strategy<Value = (Forbidden, Spelling)> {
    select(FORBIDDEN.to_vec()).prop_flat_map(|f| (Just(f), spelling(f.key)))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_spelling_of_a_forbidden_key_is_denied(
        (forbidden, spelled) in forbidden_case(),
        op in tag_op_strategy(),
        neighbours in subsequence(NEIGHBOURS.to_vec(), 0..=3),
        position in 0usize..4,
        key_id in select(KEY_IDS.to_vec()),
        signed in any::<bool>(),
    ) {
        let config: &Config = if forbidden.strict { &STRICT } else { &DEFAULT };
        let body = forbidden_body(op, &spelled.json, &neighbours, position, key_id);
        let headers = kms_headers(&target(op), signed.then_some("AKIDEXAMPLE"));

        // The strict parser decodes the spelling exactly.
        let change = parse_tag_request(op, body.as_bytes())
            .unwrap_or_else(|e| panic!("{body}: {e}"));
        let sent: Vec<&String> = change.set.iter().map(|t| &t.key).chain(&change.remove).collect();
        prop_assert!(sent.contains(&&spelled.decoded), "{body}: {change:?}");

        let decision = decide(config, &headers, body.as_bytes());
        prop_assert!(!decision.allowed(), "{body} allowed");
        prop_assert!(
            decision.violations.iter().any(|v| &*v.rule == forbidden.rule
                && v.key.as_deref() == Some(spelled.decoded.as_str())),
            "{body} ({:?}): {:?}", spelled.decoded, decision.violations
        );
    }
}

// ------------------------------------------------------------------------------------------------
// (b) Order never matters

/// Tag keys with values that pass or break the rules of the two policies.
static TAG_POOL: [(&str, &[&str]); 16] = [
    ("team:owner", &["payments", "Payments", "x"]),
    ("team:ledger", &["core-ledger", "9"]),
    ("app:env", &["dev", "prod", "qa"]),
    ("app:environment", &["staging", "Prod"]),
    ("app:ticket", &["OPS-1234", "ops-1"]),
    ("app:classification", &["public", "secret"]),
    ("app:compliance", &["pci"]),
    ("cost:center", &["4711", "12"]),
    ("Name", &["ledger key"]),
    ("name", &["x"]),
    ("Project", &["apollo"]),
    ("Kind", &["k"]),
    ("legacy-id", &["7"]),
    ("sec:level", &["3"]),
    ("aws:thing", &["y"]),
    ("Department", &["ops"]),
];

/// Keys and values both policies allow.
static SAFE_POOL: [(&str, &[&str]); 6] = [
    ("team:owner", &["payments"]),
    ("app:env", &["dev", "prod"]),
    ("cost:center", &["4711"]),
    ("app:classification", &["public", "internal"]),
    ("app:ticket", &["OPS-1234"]),
    ("Name", &["ledger key"]),
];

/// Alias names that pass or break the alias rules of the two policies.
const ALIASES: [&str; 8] = [
    "alias/team-ledger",
    "alias/app-ledger",
    "alias/team-payments-db",
    "alias/team-prod-db",
    "alias/app-prod-db",
    "alias/root",
    "alias/other",
    "alias/team-trial-x",
];

/// Alias targets: key ids and key ARNs in and out of the production account.
const ALIAS_TARGETS: [&str; 5] = [
    "1234abcd-12ab-34cd-56ef-1234567890ab",
    "mrk-1234abcd",
    "arn:aws:kms:us-east-1:111122223333:key/1234abcd",
    "arn:aws:kms:eu-west-1:999999999999:key/2",
    "arn:aws:kms:us-east-1:999999999999:key/mrk-9",
];

/// A tag-bearing request as members and tags, in a canonical order.
#[derive(Debug, Clone)]
struct Request {
    op: TagOperation,
    key_id: &'static str,
    /// (key, value) pairs; for UntagResource only the keys are sent.
    tags: Vec<(&'static str, &'static str)>,
    /// Whether CreateKey/ReplicateKey send `Tags` at all (when empty).
    send_empty_tags: bool,
    access_key_id: Option<&'static str>,
    /// The alias and target of an alias operation.
    alias: &'static str,
    target_key_id: &'static str,
}

impl Request {
    /// The body with tags in the order `tag_order`, members in the order `member_order`, and
    /// `TagValue` before `TagKey` where `value_first` says so.
    fn body(&self, tag_order: &[usize], member_order: &[usize], value_first: &[bool]) -> String {
        let tags: Vec<String> = tag_order
            .iter()
            .map(|&i| {
                let (k, v) = self.tags[i];
                if self.op == TagOperation::UntagResource {
                    lit(k)
                } else if value_first[i] {
                    format!(r#"{{"TagValue":{},"TagKey":{}}}"#, lit(v), lit(k))
                } else {
                    format!(r#"{{"TagKey":{},"TagValue":{}}}"#, lit(k), lit(v))
                }
            })
            .collect();
        let list = format!("[{}]", tags.join(","));
        let key_id = lit(self.key_id);
        let mut members: Vec<(&str, String)> = match self.op {
            TagOperation::TagResource => vec![("KeyId", key_id), ("Tags", list)],
            TagOperation::UntagResource => vec![("KeyId", key_id), ("TagKeys", list)],
            TagOperation::CreateKey => vec![
                ("Description", lit("a key")),
                ("KeyUsage", lit("ENCRYPT_DECRYPT")),
                ("MultiRegion", "true".into()),
                ("Policy", lit(r#"{"Statement":[],"Tags":1}"#)),
                ("Tags", list),
            ],
            TagOperation::ReplicateKey => vec![
                ("KeyId", key_id),
                ("ReplicaRegion", lit("eu-west-1")),
                ("Description", lit("replica")),
                ("Tags", list),
            ],
            TagOperation::CreateAlias | TagOperation::UpdateAlias => vec![
                ("AliasName", lit(self.alias)),
                ("TargetKeyId", lit(self.target_key_id)),
            ],
            TagOperation::DeleteAlias => vec![("AliasName", lit(self.alias))],
        };
        let drop_tags = self.tags.is_empty()
            && !self.send_empty_tags
            && matches!(
                self.op,
                TagOperation::CreateKey | TagOperation::ReplicateKey
            );
        let members: Vec<String> = member_order
            .iter()
            .filter_map(|&i| members.get_mut(i).map(std::mem::take))
            .filter(|(name, _)| !(drop_tags && *name == "Tags"))
            .map(|(name, value)| format!("{}:{value}", lit(name)))
            .collect();
        format!("{{{}}}", members.join(","))
    }

    fn member_count(&self) -> usize {
        match self.op {
            TagOperation::TagResource
            | TagOperation::UntagResource
            | TagOperation::CreateAlias
            | TagOperation::UpdateAlias => 2,
            TagOperation::DeleteAlias => 1,
            TagOperation::CreateKey => 5,
            TagOperation::ReplicateKey => 4,
        }
    }
}

fn request_from(
    pool: &'static [(&'static str, &'static [&'static str])],
) -> impl Strategy<Value = Request> {
    (
        op_strategy(),
        select(KEY_IDS.to_vec()),
        subsequence(pool.to_vec(), 0..=6),
        vec(any::<Index>(), 6),
        any::<bool>(),
        select(vec![None, Some("AKIDEXAMPLE"), Some("AKIAEXEMPT")]),
        (select(ALIASES.to_vec()), select(ALIAS_TARGETS.to_vec())),
    )
        .prop_map(
            |(op, key_id, keys, picks, send_empty_tags, access_key_id, (alias, target))| Request {
                op,
                key_id,
                tags: keys
                    .into_iter()
                    .zip(picks)
                    .map(|((k, values), pick)| (k, values[pick.index(values.len())]))
                    .collect(),
                send_empty_tags,
                access_key_id,
                alias,
                target_key_id: target,
            },
        )
}

/// A request, and a second order of its tags, members and tag members.
fn reordered() -> impl Strategy<Value = (Request, Vec<usize>, Vec<usize>, Vec<bool>, Vec<bool>)> {
    prop_oneof![request_from(&SAFE_POOL), request_from(&TAG_POOL)].prop_flat_map(|request| {
        let tags: Vec<usize> = (0..request.tags.len()).collect();
        let members: Vec<usize> = (0..request.member_count()).collect();
        let n = request.tags.len();
        (
            Just(request),
            Just(tags).prop_shuffle(),
            Just(members).prop_shuffle(),
            vec(any::<bool>(), n),
            vec(any::<bool>(), n),
        )
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn order_of_tags_and_members_never_changes_a_decision(
        (request, tag_order, member_order, value_first_a, value_first_b) in reordered(),
    ) {
        let canonical_tags: Vec<usize> = (0..request.tags.len()).collect();
        let canonical_members: Vec<usize> = (0..request.member_count()).collect();
        let a = request.body(&canonical_tags, &canonical_members, &value_first_a);
        let b = request.body(&tag_order, &member_order, &value_first_b);
        let headers = kms_headers(&target(request.op), request.access_key_id);
        for config in [&*DEFAULT, &*STRICT] {
            let da = decide(config, &headers, a.as_bytes());
            let db = decide(config, &headers, b.as_bytes());
            prop_assert_eq!(da.allowed(), db.allowed(), "{}\n{}\n{:?}\n{:?}", a, b, da, db);
            prop_assert_eq!(rule_ids(&da.violations), rule_ids(&db.violations), "{}\n{}", a, b);
            prop_assert_eq!(
                violation_multiset(&da.violations),
                violation_multiset(&db.violations),
                "{}\n{}", a, b
            );
            prop_assert_eq!(
                violation_multiset(&da.dry_run_violations),
                violation_multiset(&db.dry_run_violations),
                "{}\n{}", a, b
            );
            // Well-formed requests are always readable: any denial comes from a policy rule.
            prop_assert!(
                da.violations.iter().all(|v| &*v.rule != "request"),
                "{}: {:?}", a, da
            );
        }
    }
}

/// The request generator above reaches allowed and denied requests under both policies, so the
/// property covers both halves.
#[test]
fn the_order_generator_reaches_allowed_and_denied_requests() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = reordered();
    let mut allowed = [[0usize; 2]; 2];
    for _ in 0..500 {
        let (request, ..) = strategy.new_tree(&mut runner).unwrap().current();
        let tags: Vec<usize> = (0..request.tags.len()).collect();
        let members: Vec<usize> = (0..request.member_count()).collect();
        let body = request.body(&tags, &members, &vec![false; tags.len()]);
        let headers = kms_headers(&target(request.op), request.access_key_id);
        for (i, config) in [&*DEFAULT, &*STRICT].into_iter().enumerate() {
            allowed[i][usize::from(decide(config, &headers, body.as_bytes()).allowed())] += 1;
        }
    }
    // [denied, allowed] per policy; about 40% and 20% are allowed.
    assert!(
        allowed.iter().flatten().all(|&n| n >= 50),
        "[denied, allowed] per policy: {allowed:?}"
    );
}

// ------------------------------------------------------------------------------------------------
// (c) The strict parser against serde_json

/// A JSON value as written, with every member of every object in order, repeats included.
#[derive(Debug, Clone, PartialEq)]
enum Raw {
    Null,
    Bool,
    Number,
    Str(String),
    Array(Vec<Raw>),
    Object(Vec<(String, Raw)>),
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Raw, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_unit<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Raw, E> {
        Ok(Raw::Bool)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Raw, E> {
        Ok(Raw::Number)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Raw, E> {
        Ok(Raw::Number)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Raw, E> {
        Ok(Raw::Number)
    }
    fn visit_str<E>(self, s: &str) -> Result<Raw, E> {
        Ok(Raw::Str(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Raw, E> {
        Ok(Raw::Str(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element()? {
            out.push(v);
        }
        Ok(Raw::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut out = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, Raw>()? {
            out.push((k, v));
        }
        Ok(Raw::Object(out))
    }
}

const GUARDED: [&str; 7] = [
    "Tags",
    "TagKeys",
    "TagKey",
    "TagValue",
    "KeyId",
    "AliasName",
    "TargetKeyId",
];

/// Every object member name in `raw` is unique in its object and spells no guarded member in
/// another case.
fn check_members(raw: &Raw, path: &str) -> Result<(), String> {
    match raw {
        Raw::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| check_members(item, &format!("{path}[{i}]"))),
        Raw::Object(members) => {
            let mut seen = BTreeSet::new();
            for (name, value) in members {
                if !seen.insert(name.as_str()) {
                    return Err(format!("{path}: member {name:?} repeated"));
                }
                if GUARDED.iter().any(|g| name != g && eq_ignore_case(name, g)) {
                    return Err(format!("{path}: member {name:?} is a case variant"));
                }
                check_members(value, &format!("{path}.{name}"))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// What serde_json reads as the change `op` makes, or why it reads none.
fn change_per_serde(op: TagOperation, value: &Value) -> Result<TagChange, String> {
    let object = value.as_object().ok_or("not an object")?;
    let string = |v: &Value| {
        v.as_str()
            .map(str::to_owned)
            .ok_or(format!("{v} is not a string"))
    };
    let key_id = match object.get("KeyId") {
        Some(v) if op.has_key_id() => Some(string(v)?),
        None if op.has_key_id() => return Err("no KeyId".into()),
        _ => None,
    };
    let mut set = Vec::new();
    let mut remove = Vec::new();
    let allowed: &[&str] = match op {
        TagOperation::TagResource => &["KeyId", "Tags"],
        TagOperation::UntagResource => &["KeyId", "TagKeys"],
        TagOperation::CreateAlias | TagOperation::UpdateAlias => &["AliasName", "TargetKeyId"],
        TagOperation::DeleteAlias => &["AliasName"],
        _ => &[],
    };
    if op.is_alias() {
        if let Some(extra) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(format!("unexpected member {extra:?}"));
        }
        let alias = string(object.get("AliasName").ok_or("no AliasName")?)?;
        let key_id = match object.get("TargetKeyId") {
            Some(v) => Some(string(v)?),
            None if op.has_target_key_id() => return Err("no TargetKeyId".into()),
            None => None,
        };
        return Ok(TagChange {
            operation: op,
            key_id,
            set,
            remove,
            alias: Some(alias),
        });
    }
    if let Some(extra) = object
        .keys()
        .find(|k| !allowed.is_empty() && !allowed.contains(&k.as_str()))
    {
        return Err(format!("unexpected member {extra:?}"));
    }
    if op == TagOperation::UntagResource {
        let keys = object.get("TagKeys").ok_or("no TagKeys")?;
        for k in keys.as_array().ok_or("TagKeys is not an array")? {
            remove.push(string(k)?);
        }
    } else {
        match object.get("Tags") {
            None if op == TagOperation::TagResource => return Err("no Tags".into()),
            None => {}
            Some(tags) => {
                for tag in tags.as_array().ok_or("Tags is not an array")? {
                    let tag = tag.as_object().ok_or("a tag is not an object")?;
                    if tag.len() != 2 {
                        return Err(format!("a tag has {} members", tag.len()));
                    }
                    set.push(Tag {
                        key: string(tag.get("TagKey").ok_or("no TagKey")?)?,
                        value: string(tag.get("TagValue").ok_or("no TagValue")?)?,
                    });
                }
            }
        }
    }
    Ok(TagChange {
        operation: op,
        key_id,
        set,
        remove,
        alias: None,
    })
}

/// Member names: the tag members in many spellings, and others.
fn member_name() -> impl Strategy<Value = String> {
    let names = vec![
        "KeyId",
        "Tags",
        "TagKeys",
        "TagKey",
        "TagValue",
        "AliasName",
        "TargetKeyId",
        "Description",
        "Policy",
        "ReplicaRegion",
        "X",
        "a",
        "",
    ];
    let spelled = (select(names.clone()), vec(0u8..8, 16)).prop_map(|(name, flips)| {
        let mut out = String::from("\"");
        for (c, flip) in name.chars().zip(flips) {
            let c = match flip {
                0..=3 => c,
                4 => c.to_ascii_uppercase(),
                5 => c.to_ascii_lowercase(),
                6 => *alternatives(c).last().unwrap(),
                _ => {
                    write!(out, "\\u{:04x}", c as u32).unwrap();
                    continue;
                }
            };
            out.push(c);
        }
        out.push('"');
        out
    });
    // Mostly as written, so that requests are often readable.
    prop_oneof![2 => select(names).prop_map(lit), 1 => spelled]
}

/// A string value: tag-like keys and values, escapes, awkward characters.
fn string_value() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-zA-Z0-9:_ -]{0,6}".prop_map(|s| lit(&s)),
        3 => select(vec![
            r#""team:owner""#, r#""Project""#, r#""pro\u006aect""#, r#""\u212aind""#, r#""""#,
            r#""1234abcd-12ab-34cd-56ef-1234567890ab""#, r#""\ud83d\ude00""#, r#""\"""#,
            r#""é""#, r#""tab\t""#, r#""a\/b""#, r#""alias/team-a""#, r#""alias\/app-x""#,
            r#""alias/aws/x""#, r#""arn:aws:kms:us-east-1:111122223333:key/1""#,
        ])
        .prop_map(str::to_owned),
        // Not JSON: a lone surrogate, a raw control character, an unknown escape.
        1 => select(vec![r#""\ud800""#, "\"ctl\u{1}\"", r#""\x""#]).prop_map(str::to_owned),
    ]
}

/// A JSON value, possibly nested.
fn any_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        4 => string_value(),
        1 => select(vec!["1", "-0.5e3", "true", "false", "null", "1e400", "01", "[]", "{}"])
            .prop_map(str::to_owned),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(|items| format!("[{}]", items.join(","))),
            vec((member_name(), inner), 0..4).prop_map(|members| {
                let members: Vec<String> = members
                    .into_iter()
                    .map(|(k, v)| format!("{k}:{v}"))
                    .collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    })
}

/// One member of an object, written once, or twice with the same or another value.
fn member(
    name: impl Strategy<Value = String>,
    value: impl Strategy<Value = String>,
) -> impl Strategy<Value = Vec<String>> {
    (name, value, 0u8..16, any_value()).prop_map(|(name, value, dup, other)| {
        let first = format!("{name}:{value}");
        match dup {
            0 => vec![first.clone(), first],
            1 => vec![first, format!("{name}:{other}")],
            _ => vec![first],
        }
    })
}

fn object(members: impl Strategy<Value = Vec<Vec<String>>>) -> impl Strategy<Value = String> {
    members.prop_map(|m| format!("{{{}}}", m.concat().join(",")))
}

/// Mostly no members, sometimes a few.
fn few<T: fmt::Debug + Clone>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Vec<T>> {
    prop_oneof![3 => Just(Vec::new()), 1 => vec(s, 1..3)]
}

/// A tag object: mostly TagKey and TagValue, sometimes more, fewer, repeated or misspelled.
fn tag_object() -> impl Strategy<Value = String> {
    let exact = |name: &'static str| Just(lit(name));
    prop_oneof![
        6 => (
            member(exact("TagKey"), string_value()),
            member(exact("TagValue"), string_value()),
            few(member(member_name(), any_value())),
        )
            .prop_map(|(k, v, mut others)| {
                others.push(k);
                others.push(v);
                others
            })
            .prop_shuffle()
            .prop_map(|m| format!("{{{}}}", m.concat().join(","))),
        1 => object(vec(member(member_name(), any_value()), 0..4)),
        1 => any_value(),
    ]
}

/// A body shaped like a tag request, with random repeats, spellings and junk.
fn tag_request_body() -> impl Strategy<Value = Vec<u8>> {
    let exact = |name: &'static str| Just(lit(name));
    let tags = prop_oneof![
        6 => vec(tag_object(), 0..4).prop_map(|t| format!("[{}]", t.join(","))),
        1 => any_value(),
    ];
    let tag_keys = prop_oneof![
        6 => vec(string_value(), 0..4).prop_map(|t| format!("[{}]", t.join(","))),
        1 => any_value(),
    ];
    let key_id = prop_oneof![6 => string_value(), 1 => any_value()];
    let members = (
        prop::option::weighted(0.8, member(exact("KeyId"), key_id)),
        prop::option::weighted(0.6, member(exact("Tags"), tags)),
        prop::option::weighted(0.4, member(exact("TagKeys"), tag_keys)),
        few(member(member_name(), any_value())),
    )
        .prop_map(|(key_id, tags, tag_keys, mut others)| {
            others.extend([key_id, tags, tag_keys].into_iter().flatten());
            others
        })
        .prop_shuffle();
    let junk: Vec<&'static [u8]> = vec![
        b",",
        b"}",
        b"]",
        b"\"",
        b"\\",
        b"{",
        b":",
        b" ",
        b"\n",
        b"1",
        b"null",
        b"\xff",
        b"\xef\xbb\xbf",
        b"\0",
        b"\\u0000",
        b"\\ud800",
        b"/*c*/",
        b"\xc3",
        b"\xe2\x84\xaa",
    ];
    (
        object(members),
        few((any::<Index>(), select(junk))),
        0u8..24,
        any::<Index>(),
    )
        .prop_map(|(text, junk, edit, at)| {
            let mut bytes = text.into_bytes();
            for (at, piece) in junk {
                let at = at.index(bytes.len() + 1);
                bytes.splice(at..at, piece.iter().copied());
            }
            match edit {
                0 => bytes.truncate(at.index(bytes.len() + 1)),
                1 => bytes.insert(0, b' '),
                2 => bytes.extend_from_slice(b" \r\n\t"),
                3 => bytes.clear(),
                _ => {}
            }
            bytes
        })
}

/// What `parse_tag_request` must agree with whenever it accepts `body`.
fn check_agreement(op: TagOperation, body: &[u8], change: &TagChange) -> Result<(), String> {
    let text: &[u8] = if body.is_empty() { b"{}" } else { body };
    let raw: Raw = serde_json::from_slice(text).map_err(|e| format!("serde_json refuses: {e}"))?;
    check_members(&raw, "$")?;
    let value: Value =
        serde_json::from_slice(text).map_err(|e| format!("serde_json refuses: {e}"))?;
    let expected = change_per_serde(op, &value)?;
    if expected != *change {
        return Err(format!(
            "serde_json reads {expected:?}, the parser {change:?}"
        ));
    }
    let mut keys = BTreeSet::new();
    if !change
        .set
        .iter()
        .map(|t| &t.key)
        .chain(&change.remove)
        .all(|k| keys.insert(k))
    {
        return Err("a tag key twice".into());
    }
    Ok(())
}

proptest! {
    #![proptest_config(config_scaled(4))]

    #[test]
    fn the_strict_parser_reads_only_what_serde_json_reads(body in tag_request_body()) {
        for op in TagOperation::ALL {
            if let Ok(change) = parse_tag_request(op, &body) {
                if let Err(e) = check_agreement(op, &body, &change) {
                    return Err(TestCaseError::fail(format!(
                        "{op} accepted {:?}: {e}",
                        String::from_utf8_lossy(&body)
                    )));
                }
            }
        }
    }

    #[test]
    fn the_strict_parser_never_panics_on_bytes(
        body in vec(select(b"{}[]\":,\\ 0aTKVgeysu\xff\xc3".to_vec()), 0..48),
    ) {
        for op in TagOperation::ALL {
            if let Ok(change) = parse_tag_request(op, &body) {
                prop_assert!(check_agreement(op, &body, &change).is_ok());
            }
        }
    }
}

/// The grammar above produces readable requests often enough for the property to mean something.
#[test]
fn the_grammar_reaches_accepted_requests() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = tag_request_body();
    let mut accepted = [0usize; 4];
    for _ in 0..1000 {
        let body = strategy.new_tree(&mut runner).unwrap().current();
        let tag_ops = TagOperation::ALL.into_iter().filter(|op| !op.is_alias());
        for (i, op) in tag_ops.enumerate() {
            accepted[i] += usize::from(parse_tag_request(op, &body).is_ok());
        }
    }
    // About 3% (TagResource) to 30% (CreateKey) of the bodies are readable.
    assert!(
        accepted.iter().all(|&n| n >= 10),
        "accepted per operation: {accepted:?}"
    );
}

// ------------------------------------------------------------------------------------------------
// (d) Classification

const HEADER_NAMES: [&str; 12] = [
    "x-amz-target",
    "host",
    "content-type",
    "content-length",
    "content-encoding",
    "authorization",
    "connection",
    "x-amz-date",
    "x-amz-credential",
    "transfer-encoding",
    "te",
    "x-other",
];

const SINGLE: [&str; 6] = [
    "x-amz-target",
    "host",
    "content-type",
    "content-length",
    "content-encoding",
    "authorization",
];

/// Header values: fragments of real ones, and arbitrary bytes a header value may hold.
fn header_value() -> impl Strategy<Value = HeaderValue> {
    let fragment = select(vec![
        "TrentService.",
        "TagResource",
        "trentservice.tagresource",
        "Encrypt",
        " ",
        "\t",
        ",",
        "host",
        "authorization",
        "x-amz-target",
        "keep-alive",
        "identity",
        "gzip",
        "application/x-amz-json-1.1",
        HOST,
        ":443",
        "AWS4-HMAC-SHA256 ",
        "Credential=",
        "AKID/20260101/us-east-1/kms/aws4_request",
        "SignedHeaders=host",
        "Signature=0",
        "=",
        "/",
        "%2F",
    ]);
    prop_oneof![
        vec(fragment, 0..6).prop_map(|f| HeaderValue::from_str(&f.concat()).unwrap()),
        vec(any::<u8>(), 0..24).prop_map(|bytes| {
            let bytes: Vec<u8> = bytes
                .into_iter()
                .map(|b| {
                    if (b < 0x20 && b != b'\t') || b == 0x7f {
                        b'.'
                    } else {
                        b
                    }
                })
                .collect();
            HeaderValue::from_bytes(&bytes).unwrap()
        }),
    ]
}

fn header_map() -> impl Strategy<Value = HeaderMap> {
    vec((select(HEADER_NAMES.to_vec()), header_value()), 0..8).prop_map(|pairs| {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(HeaderName::from_static(name), value);
        }
        h
    })
}

/// A target that equals `TrentService.<Op>` of a tag operation ignoring ASCII case and
/// surrounding space, flipped letter by letter.
fn target_spelling() -> impl Strategy<Value = (TagOperation, String)> {
    let space = select(vec!["", "", " ", "\t", "  ", " \t"]);
    op_strategy().prop_flat_map(move |op| {
        let exact = target(op);
        let n = exact.len();
        (
            Just(op),
            vec(any::<bool>(), n),
            space.clone(),
            space.clone(),
        )
            .prop_map(move |(op, flips, before, after)| {
                let body: String = exact
                    .chars()
                    .zip(flips)
                    .map(|(c, flip)| {
                        if !flip {
                            c
                        } else if c.is_ascii_uppercase() {
                            c.to_ascii_lowercase()
                        } else {
                            c.to_ascii_uppercase()
                        }
                    })
                    .collect();
                (op, format!("{before}{body}{after}"))
            })
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn classify_never_panics_and_reads_only_exact_targets(
        headers in header_map(),
        authority in select(vec![None, Some(HOST), Some("kms.eu-west-1.amazonaws.com:443")]),
        query in select(vec![None, Some("X-Amz-Credential=AKID%2F20260101%2Fus-east-1%2Fkms%2Faws4_request"), Some("a=%zz")]),
    ) {
        let route = classify(&Method::POST, &Uri::from_static("/"), &headers);
        for name in SINGLE {
            if headers.get_all(name).iter().count() > 1 {
                prop_assert!(route.is_err(), "{name} repeated: {route:?}");
            }
        }
        let target = headers.get("x-amz-target").map(|v| v.as_bytes().to_vec());
        match &route {
            Ok(Route::Judge(op)) => {
                prop_assert_eq!(target, Some(self::target(*op).into_bytes()));
            }
            Ok(Route::Pass(op)) => {
                prop_assert_eq!(target, Some(format!("TrentService.{op}").into_bytes()));
            }
            Ok(Route::Unknown(t)) => {
                prop_assert_eq!(target, Some(format!("TrentService.{t}").into_bytes()))
            }
            Err(_) => {}
        }
        // The other head functions never panic either.
        let uri = match authority {
            Some(a) => Uri::builder().scheme("http").authority(a).path_and_query("/").build().unwrap(),
            None => Uri::from_static("/"),
        };
        let _ = request_host(&uri, &headers);
        let _ = read_credential(&headers, query);
        let _ = check_tag_request_head(&headers);
    }

    #[test]
    fn other_spellings_of_tag_targets_are_refused(
        (op, spelled) in target_spelling(),
        other in header_map(),
    ) {
        let mut headers = HeaderMap::new();
        headers.insert("x-amz-target", HeaderValue::from_str(&spelled).unwrap());
        // Whatever else the head holds, a variant target is never an operation.
        for (name, value) in &other {
            if name != "x-amz-target" {
                headers.append(name.clone(), value.clone());
            }
        }
        let root = Uri::from_static("/");
        let route = classify(&Method::POST, &root, &headers);
        if spelled == target(op) {
            prop_assert!(
                matches!(route, Ok(Route::Judge(o)) if o == op)
                    || matches!(route, Err(ref e) if !matches!(e.reason, Unreadable::TargetSpelling(_))),
                "{spelled:?}: {route:?}"
            );
        } else {
            prop_assert!(route.is_err(), "{spelled:?}: {route:?}");
            let alone = kms_headers(&spelled, None);
            let refused = classify(&Method::POST, &root, &alone);
            prop_assert!(
                matches!(refused, Err(ref r) if matches!(r.reason, Unreadable::TargetSpelling(_)) && r.may_change_tags),
                "{spelled:?}: {refused:?}"
            );
            // And the whole pipeline denies it as unreadable under both policies.
            for config in [&*DEFAULT, &*STRICT] {
                let decision = decide(config, &alone, b"{}");
                prop_assert!(!decision.allowed());
                prop_assert!(decision.violations.iter().all(|v| &*v.rule == "request"));
            }
        }
    }
}

/// The two target-spelling letters outside ASCII make the header unreadable, never an operation.
#[test]
fn non_ascii_target_letters_are_refused() {
    for spelled in [
        "Trent\u{17f}ervice.TagResource",
        "TrentService.Create\u{212a}ey",
        "TrentServ\u{131}ce.UntagResource",
        "TrentService.CreateKey\u{a0}",
    ] {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-amz-target",
            HeaderValue::from_bytes(spelled.as_bytes()).unwrap(),
        );
        assert!(
            classify(&Method::POST, &Uri::from_static("/"), &headers).is_err(),
            "{spelled:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// The fuzz seeds

/// Every committed fuzz seed (`fuzz/seed.sh`, and minimised crashes kept as regressions) goes
/// through the checks the fuzz target makes (`tests/common/fuzz_pipeline.rs`, under the same
/// three configurations), and the strict parser's agreement with serde_json as property (c)
/// checks it, so `cargo test` replays them without cargo-fuzz.
#[test]
fn the_fuzz_seeds_pass_the_pipeline_checks() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/pipeline");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "the committed fuzz seeds are missing ({}: {e}); fuzz/seed.sh writes them",
            dir.display()
        )
    });
    let mut seen = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        let is_seed = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("seed-"));
        if !is_seed {
            continue;
        }
        seen += 1;
        let data = std::fs::read(&path).unwrap();
        if let Err(failed) = fuzz_pipeline::check(&data, &*CONFIGS) {
            panic!("{}: {failed}", path.display());
        }
        let (_, _, _, body) = read_fuzz_input(&data);
        for op in TagOperation::ALL {
            if let Ok(change) = parse_tag_request(op, body) {
                if let Err(e) = check_agreement(op, body, &change) {
                    panic!("{}: {op}: {e}", path.display());
                }
            }
        }
    }
    assert!(seen > 0, "no seed-* files in {}", dir.display());
}

// ------------------------------------------------------------------------------------------------
// (e) Aliases, as an attacker

const ALIAS_OPS: [TagOperation; 3] = [
    TagOperation::CreateAlias,
    TagOperation::UpdateAlias,
    TagOperation::DeleteAlias,
];

/// A spelling of a member name other than itself as far as a lenient reader goes: letters in
/// another case or folded from Unicode, whitespace, invisible or format characters inserted, or
/// the whole name escaped; the JSON literal and whether it is exactly the name.
fn member_spelling(name: &'static str) -> impl Strategy<Value = (String, bool)> {
    let n = name.chars().count();
    let inserts = select(vec![
        " ", "\\t", "\\u0000", "\\u200b", "\\ufeff", "\\u00ad", "\\u0301", "_",
    ]);
    (
        vec((0u8..10, any::<bool>()), n),
        proptest::option::weighted(0.3, (any::<Index>(), inserts)),
    )
        .prop_map(move |(choices, insert)| {
            let mut json = String::from("\"");
            let mut decoded = String::new();
            let chars: Vec<char> = name.chars().collect();
            let insert_at = insert.as_ref().map(|(i, _)| i.index(chars.len() + 1));
            for (i, (c, (choice, escape))) in chars.iter().zip(choices).enumerate() {
                if insert_at == Some(i) {
                    let piece = insert.as_ref().unwrap().1;
                    json.push_str(piece);
                    decoded.push('\u{1}'); // anything that is not the name
                }
                let ch = match choice {
                    0 => c.to_ascii_lowercase(),
                    1 => c.to_ascii_uppercase(),
                    2 => *alternatives(*c).last().unwrap(),
                    _ => *c,
                };
                decoded.push(ch);
                if escape {
                    write!(json, "\\u{:04x}", ch as u32).unwrap();
                } else {
                    json.push(ch);
                }
            }
            if insert_at == Some(chars.len()) {
                json.push_str(insert.as_ref().unwrap().1);
                decoded.push('\u{1}');
            }
            json.push('"');
            let exact = decoded == name;
            (json, exact)
        })
}

fn alias_headers(op: TagOperation) -> HeaderMap {
    kms_headers(&target(op), None)
}

proptest! {
    #![proptest_config(config_scaled(2))]

    /// A look-alike of `AliasName` or `TargetKeyId` next to the real member (so some reader
    /// would take the look-alike's value, a protected alias or a target outside the account) is
    /// always refused as unreadable; the exact name, escaped or not, is read as itself.
    #[test]
    fn look_alike_alias_members_are_refused(
        op in select(ALIAS_OPS.to_vec()),
        (which, (spelled, exact)) in select(vec!["AliasName", "TargetKeyId"])
            .prop_flat_map(|which| (Just(which), member_spelling(which))),
        first in any::<bool>(),
    ) {
        let canonical_target = "arn:aws:kms:us-east-1:111122223333:key/1234abcd";
        let mut members = vec![r#""AliasName":"alias/team-prod-db""#.to_owned()];
        if op.has_target_key_id() {
            members.push(format!(r#""TargetKeyId":"{canonical_target}""#));
        }
        let smuggled = if which == "AliasName" {
            r#""alias/team-payments-db""#
        } else {
            r#""arn:aws:kms:us-east-1:999999999999:key/1234abcd""#
        };
        let extra = format!("{spelled}:{smuggled}");
        if first { members.insert(0, extra) } else { members.push(extra) }
        let body = format!("{{{}}}", members.join(","));
        let parsed = parse_tag_request(op, body.as_bytes());
        let decision = decide(&STRICT, &alias_headers(op), body.as_bytes());
        if exact {
            // The same member twice, or (for DeleteAlias) a member it does not take.
            prop_assert!(parsed.is_err(), "{body}: {parsed:?}");
        } else {
            let e = parsed.expect_err(&body).to_string();
            prop_assert!(
                e.contains("look-alike") || e.contains("unexpected member"),
                "{body}: {e}"
            );
        }
        prop_assert!(!decision.allowed(), "{body}");
        prop_assert!(
            decision.violations.iter().all(|v| &*v.rule == "request"),
            "{body}: {:?}", decision.violations
        );
    }

    /// Every other spelling of an alias target is either refused as unreadable or judged as the
    /// key it certainly names: the `alias-targets` rule (`arn:aws:kms:*:111122223333:key/*`,
    /// `arn:*:kms:*:*:key/mrk-*`) lets an alias point only at a key the oracle below places in
    /// that account or among the `mrk-` keys.
    #[test]
    fn other_spellings_of_alias_targets_never_escape_a_target_rule(
        op in select(vec![TagOperation::CreateAlias, TagOperation::UpdateAlias]),
        base in select(vec![
            "arn:aws:kms:us-east-1:111122223333:key/1234abcd",
            "arn:aws:kms:us-east-1:999999999999:key/1234abcd",
            "arn:aws:kms:us-east-1:999999999999:key/mrk-1",
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "mrk-1234",
        ]),
        edits in vec((any::<Index>(), select(vec![
            "case", "space", "nl", "tab", "zwsp", "nul", "fullwidth", "colon", "slash",
            "key-prefix", "alias-suffix", "escape", "account", "drop-arn", "percent",
        ])), 0..4),
    ) {
        let mut chars: Vec<String> = base.chars().map(|c| c.to_string()).collect();
        let mut decoded_chars: Vec<String> = chars.clone();
        for (at, edit) in edits {
            let i = at.index(chars.len());
            let c = decoded_chars[i].chars().next().unwrap_or('a');
            let (json, dec): (String, String) = match edit {
                "case" if c.is_ascii_lowercase() => (c.to_ascii_uppercase().to_string(), c.to_ascii_uppercase().to_string()),
                "case" => (c.to_ascii_lowercase().to_string(), c.to_ascii_lowercase().to_string()),
                "space" => (format!(" {c}"), format!(" {c}")),
                "nl" => (format!("\\n{c}"), format!("\n{c}")),
                "tab" => (format!("\\t{c}"), format!("\t{c}")),
                "zwsp" => (format!("\\u200b{c}"), format!("\u{200b}{c}")),
                "nul" => (format!("\\u0000{c}"), format!("\0{c}")),
                "fullwidth" if c.is_ascii_alphanumeric() => {
                    let w = char::from_u32(c as u32 - 0x21 + 0xff01).unwrap();
                    (w.to_string(), w.to_string())
                }
                "colon" => (format!(":{c}"), format!(":{c}")),
                "slash" => (format!("/{c}"), format!("/{c}")),
                "escape" => (format!("\\u{:04x}", c as u32), c.to_string()),
                "percent" => (format!("%{:02X}", c as u32 & 0xff), format!("%{:02X}", c as u32 & 0xff)),
                _ => (c.to_string(), c.to_string()),
            };
            chars[i] = json;
            decoded_chars[i] = dec;
            match edit {
                "key-prefix" => {
                    chars.insert(0, "key/".into());
                    decoded_chars.insert(0, "key/".into());
                }
                "alias-suffix" => {
                    chars.push(":alias/team-prod-db".into());
                    decoded_chars.push(":alias/team-prod-db".into());
                }
                "account" => {
                    let j: String = decoded_chars.concat().replace("111122223333", "111122223334");
                    chars = j.chars().map(|c| c.to_string()).collect();
                    decoded_chars = chars.clone();
                }
                "drop-arn" => {
                    let j: String = decoded_chars.concat();
                    let j = j.rsplit('/').next().unwrap_or(&j).to_owned();
                    chars = j.chars().map(|c| c.to_string()).collect();
                    decoded_chars = chars.clone();
                }
                _ => {}
            }
        }
        let json_target = chars.concat();
        let target = decoded_chars.concat();
        let body = format!(r#"{{"AliasName":"alias/team-prod-db","TargetKeyId":"{json_target}"}}"#);
        let Ok(parsed) = serde_json::from_str::<Value>(&body) else {
            return Ok(()); // not JSON: refused by any reader
        };
        prop_assert_eq!(parsed["TargetKeyId"].as_str(), Some(target.as_str()), "{}", body);
        let decision = decide(&STRICT, &alias_headers(op), body.as_bytes());
        let account_key = regex::Regex::new(
            r"^arn:[A-Za-z0-9-]+:kms:[A-Za-z0-9-]+:111122223333:key/[A-Za-z0-9-]+$",
        )
        .unwrap();
        let mrk_key = regex::Regex::new(
            r"^(arn:[A-Za-z0-9-]+:kms:[A-Za-z0-9-]+:[0-9]+:key/)?(?i:mrk-)[A-Za-z0-9-]+$",
        )
        .unwrap();
        let certainly_allowed = account_key.is_match(&target) || mrk_key.is_match(&target);
        prop_assert_eq!(
            decision.allowed(),
            certainly_allowed,
            "{} ({:?}): {:?}", body, target, decision.violations
        );
        if !decision.allowed() {
            let rules = rule_ids(&decision.violations);
            prop_assert!(
                rules == BTreeSet::from(["request".to_owned()])
                    || rules == BTreeSet::from(["alias-targets".to_owned()]),
                "{}: {:?}", body, rules
            );
        }
    }

    /// Alias names outside the model's rules (read strictly) are refused whatever else the
    /// request says, and a valid name is judged by the alias rules alone.
    #[test]
    fn alias_names_are_held_to_the_model(
        op in select(ALIAS_OPS.to_vec()),
        name in prop_oneof![
            "alias/[a-zA-Z0-9/_-]{1,20}",
            "[a-zA-Z0-9:/_ -]{0,12}",
            "alias/aws/[a-z]{1,5}",
            "(?i:alias/aws/)[a-z]{1,5}",
            "alias/[a-z]{1,5}[:\u{e9}\u{212a}\u{0} ][a-z]{0,3}",
        ],
    ) {
        let target = if op.has_target_key_id() {
            r#","TargetKeyId":"arn:aws:kms:us-east-1:111122223333:key/1""#
        } else {
            ""
        };
        let body = format!(r#"{{"AliasName":{}{target}}}"#, lit(&name));
        let valid = name.starts_with("alias/")
            && name.len() > 6
            && name.len() <= 256
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-'))
            && !name.to_ascii_lowercase().starts_with("alias/aws/");
        let parsed = parse_tag_request(op, body.as_bytes());
        prop_assert_eq!(parsed.is_ok(), valid, "{}: {:?}", body, parsed);
        let decision = decide(&STRICT, &alias_headers(op), body.as_bytes());
        if !valid {
            prop_assert!(!decision.allowed());
            prop_assert_eq!(rule_ids(&decision.violations), BTreeSet::from(["request".to_owned()]));
        } else {
            prop_assert!(decision.violations.iter().all(|v| &*v.rule != "request"));
        }
    }
}

/// The alias property above reaches allowed and denied targets, and refusals by the parser and
/// by the rule.
#[test]
fn the_alias_target_generator_reaches_every_verdict() {
    let headers = alias_headers(TagOperation::CreateAlias);
    let mut seen = BTreeSet::new();
    for target in [
        "arn:aws:kms:us-east-1:111122223333:key/1234abcd",
        "arn:aws:kms:us-east-1:999999999999:key/1234abcd",
        "arn:aws:kms:us-east-1:999999999999:key/mrk-1",
        "1234abcd",
        "MRK-1",
        " arn:aws:kms:us-east-1:111122223333:key/1234abcd",
    ] {
        let body = format!(r#"{{"AliasName":"alias/team-prod-db","TargetKeyId":"{target}"}}"#);
        let d = decide(&STRICT, &headers, body.as_bytes());
        seen.insert(format!("{}:{:?}", d.allowed(), rule_ids(&d.violations)));
    }
    assert_eq!(
        seen,
        BTreeSet::from([
            "true:{}".to_owned(),
            "false:{\"alias-targets\"}".to_owned(),
            "false:{\"request\"}".to_owned(),
        ])
    );
}
