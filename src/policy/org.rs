//! Rules imported from an AWS Organizations tag policy (`[policy].org_tag_policy`).
//!
//! The file is what `aws organizations describe-effective-policy --policy-type TAG_POLICY`
//! prints (`{"EffectivePolicy":{"PolicyContent":"<the policy, as a JSON string>",...}}`), or the
//! effective policy document itself (`{"tags":{...}}`). An authored policy, with inheritance
//! operators (`@@assign`, `@@append`, `@@remove`, `@@operators_allowed_for_child_policies`), is
//! refused: only AWS knows how it merges with the policies above and beside it.
//!
//! Each policy key becomes one rule, `org:<policy key>`, that judges the tags a request sets:
//!
//! - a tag whose key equals the policy key ignoring case (folded as IAM folds tag keys) must be
//!   spelled exactly as `tag_key` says (lower case when it says nothing, as AWS does);
//! - its value must match one of `tag_value` (when given; `[]` allows none), where `*` stands for
//!   one or more characters;
//! - when `report_required_tag_for` names KMS keys, CreateKey and ReplicateKey must set the tag.
//!
//! The rule is enforced when `enforced_for` names KMS keys (`kms:*`, `kms:key`,
//! `kms:ALL_SUPPORTED`, any `kms:` entry); otherwise it runs in dry-run: reported, not enforced.
//! Where AWS's documents leave a reading open, the stricter one is taken (docs/configuration.md).
//! Pure: the caller reads the file.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::{quoted, shown_key, Mode, Violation, Violations};
use crate::fold::{eq_ignore_case, fold};
use crate::kms::{TagChange, TagOperation};

/// The rule id prefix of imported rules; TOML rules may not use it.
pub const ORG_RULE_PREFIX: &str = "org:";

/// One rule imported from a tag policy, before `compile` gives it its place among the others.
#[derive(Debug, Clone)]
pub(super) struct Imported {
    pub id: String,
    /// `None`: enforced as `[policy].mode` says; dry-run when not enforced for KMS keys.
    pub mode: Option<Mode>,
    /// `FILE: tags.<policy key>`.
    pub origin: String,
    pub tag: OrgTag,
}

/// One policy key of an imported tag policy, compiled.
#[derive(Debug, Clone)]
pub struct OrgTag {
    /// The policy key as written.
    policy_key: String,
    /// `policy_key`, folded.
    folded: String,
    /// The one compliant spelling of the tag key.
    tag_key: String,
    /// The allowed values; `None`: any value.
    values: Option<Vec<String>>,
    /// CreateKey and ReplicateKey must set the tag.
    required: bool,
    /// Where it came from, for messages: the policy key (not the file: messages go to clients).
    origin: Arc<str>,
}

impl OrgTag {
    /// Adds every violation of this entry by `change` to `out`.
    pub(super) fn check(&self, rule: &Arc<str>, change: &TagChange, out: &mut Violations) {
        let violation = |key: &str, message: String| Violation {
            rule: rule.clone(),
            key: Some(shown_key(key)),
            message,
        };
        for tag in &change.set {
            if !self.governs(&tag.key) {
                continue;
            }
            if tag.key != self.tag_key {
                out.add(rule, || {
                    violation(
                        &tag.key,
                        format!(
                            "tag key {} must be spelled exactly {:?} ({})",
                            quoted(&tag.key),
                            self.tag_key,
                            self.origin
                        ),
                    )
                });
            }
            if let Some(values) = &self.values {
                if !values.iter().any(|v| value_matches(v, &tag.value)) {
                    out.add(rule, || {
                        violation(
                            &tag.key,
                            format!(
                                "the value {} of tag key {} is not allowed: {} ({}; values are compared exactly, and * stands for one or more characters)",
                                quoted(&tag.value),
                                quoted(&tag.key),
                                allowed_text(values),
                                self.origin
                            ),
                        )
                    });
                }
            }
        }
        let creates = matches!(
            change.operation,
            TagOperation::CreateKey | TagOperation::ReplicateKey
        );
        if self.required && creates && !change.set.iter().any(|t| t.key == self.tag_key) {
            out.add(rule, || {
                violation(
                    &self.tag_key,
                    format!(
                        "{} must set the tag key {:?} (exact case): report_required_tag_for names KMS keys ({})",
                        change.operation, self.tag_key, self.origin
                    ),
                )
            });
        }
    }

    /// Whether the entry judges a tag with this key: it equals the policy key ignoring case.
    fn governs(&self, key: &str) -> bool {
        if key.is_ascii() && self.folded.is_ascii() {
            return key.eq_ignore_ascii_case(&self.folded);
        }
        eq_ignore_case(key, &self.policy_key)
    }
}

fn allowed_text(values: &[String]) -> String {
    if values.is_empty() {
        return "the tag policy allows no value for this key".into();
    }
    const SHOWN: usize = 20;
    let mut shown: Vec<String> = values.iter().take(SHOWN).map(|v| quoted(v)).collect();
    if values.len() > SHOWN {
        shown.push(format!("and {} more", values.len() - SHOWN));
    }
    format!("the tag policy allows {}", shown.join(", "))
}

/// Whether `value` matches an allowed value of a tag policy: exactly (case-sensitive), or, for
/// one with a `*`, the text before and after it around one or more characters. Whether AWS's `*`
/// also matches nothing is not documented; the stricter reading is taken.
pub(super) fn value_matches(allowed: &str, value: &str) -> bool {
    match allowed.split_once('*') {
        None => allowed == value,
        Some((before, after)) => {
            value.len() > before.len() + after.len()
                && value.starts_with(before)
                && value.ends_with(after)
        }
    }
}

/// Turns a tag policy file's text into rules. `file` names it in messages and origins. Errors
/// say what is wrong and where (`tags.<policy key>.<field>`).
pub(super) fn import(text: &str, file: &str) -> Result<Vec<Imported>, Vec<String>> {
    let value = strict_json(text).map_err(|e| vec![format!("not one JSON document: {e}")])?;
    let document = effective_document(value)?;
    if let Some(operator) = find_operator(&document) {
        return Err(vec![authored(&operator)]);
    }
    let tags = match document {
        Value::Object(mut top) => {
            if let Some(other) = top.keys().find(|k| *k != "tags") {
                return Err(vec![format!(
                    "{other:?} is not part of a tag policy; an effective tag policy is {{\"tags\":{{...}}}}"
                )]);
            }
            match top.remove("tags") {
                Some(Value::Object(tags)) => tags,
                Some(_) => return Err(vec!["\"tags\" must be an object of policy keys".into()]),
                None => {
                    return Err(vec![
                        "the document has no \"tags\"; an effective tag policy is {\"tags\":{...}}"
                            .into(),
                    ])
                }
            }
        }
        _ => return Err(vec!["the tag policy is not a JSON object".into()]),
    };
    let mut errors = Vec::new();
    let mut rules = Vec::new();
    let mut folded_keys: HashSet<String> = HashSet::new();
    let mut ids: HashSet<String> = HashSet::new();
    for (policy_key, entry) in &tags {
        let at = format!("tags.{policy_key}");
        match entry_rule(policy_key, entry, file, &at) {
            Ok(mut rule) => {
                if !folded_keys.insert(rule.tag.folded.clone()) {
                    errors.push(format!(
                        "{at}: another policy key differs from {policy_key:?} only in letter case; an effective policy has one entry per tag key"
                    ));
                    continue;
                }
                let base = rule.id.clone();
                let mut n = 2;
                while !ids.insert(rule.id.clone()) {
                    rule.id = format!("{base}.{n}");
                    n += 1;
                }
                rules.push(rule);
            }
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(errors)
    }
}

fn authored(operator: &str) -> String {
    format!(
        "the file holds the inheritance operator {operator:?}: it is an authored tag policy, which AWS merges with the policies of the organization root, the OUs and the account before it applies. Export the effective policy instead (aws organizations describe-effective-policy --policy-type TAG_POLICY --target-id <account id> > FILE) and point org_tag_policy at that file"
    )
}

/// The effective policy document: `PolicyContent` of `describe-effective-policy`'s output
/// (parsed a second time), or the file itself.
fn effective_document(value: Value) -> Result<Value, Vec<String>> {
    let Value::Object(mut top) = value else {
        return Err(vec!["the file is not a JSON object".into()]);
    };
    let Some(effective) = top.remove("EffectivePolicy") else {
        return Ok(Value::Object(top));
    };
    if let Some(other) = top.keys().next() {
        return Err(vec![format!(
            "{other:?} next to EffectivePolicy: the file is not the output of describe-effective-policy"
        )]);
    }
    let Value::Object(effective) = effective else {
        return Err(vec!["EffectivePolicy is not an object".into()]);
    };
    match effective.get("PolicyType") {
        None => {}
        Some(Value::String(t)) if t == "TAG_POLICY" => {}
        Some(other) => {
            return Err(vec![format!(
                "EffectivePolicy.PolicyType is {other}, not \"TAG_POLICY\"; export it with --policy-type TAG_POLICY"
            )])
        }
    }
    match effective.get("PolicyContent") {
        Some(Value::String(content)) => strict_json(content).map_err(|e| {
            vec![format!(
                "EffectivePolicy.PolicyContent is not one JSON document: {e}"
            )]
        }),
        _ => Err(vec![
            "EffectivePolicy.PolicyContent is missing or not a string (the policy as JSON text)"
                .into(),
        ]),
    }
}

/// The first object member anywhere whose name starts with `@@`.
fn find_operator(value: &Value) -> Option<String> {
    match value {
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            if k.starts_with("@@") {
                Some(k.clone())
            } else {
                find_operator(v)
            }
        }),
        Value::Array(items) => items.iter().find_map(find_operator),
        _ => None,
    }
}

fn entry_rule(
    policy_key: &str,
    entry: &Value,
    file: &str,
    at: &str,
) -> Result<Imported, Vec<String>> {
    let mut errors = Vec::new();
    let Value::Object(entry) = entry else {
        return Err(vec![format!(
            "{at}: a policy key's entry must be an object"
        )]);
    };
    if policy_key.is_empty() || policy_key.chars().count() > 128 {
        errors.push(format!(
            "{at}: a policy key is a tag key of 1 to 128 characters"
        ));
    }
    let mut tag_key = None;
    let mut values = None;
    let mut enforced = false;
    let mut required = false;
    for (field, value) in entry {
        let path = format!("{at}.{field}");
        match field.as_str() {
            "tag_key" => match value {
                Value::String(k) if eq_ignore_case(k, policy_key) => tag_key = Some(k.clone()),
                Value::String(k) => errors.push(format!(
                    "{path}: {k:?} is not the policy key {policy_key:?} in another letter case, as AWS requires"
                )),
                _ => errors.push(format!("{path}: must be a string")),
            },
            "tag_value" => match strings(value) {
                Some(list) => {
                    if let Some(v) = list.iter().find(|v| v.matches('*').count() > 1) {
                        errors.push(format!(
                            "{path}: {v:?} has more than one *; AWS allows one wildcard per value"
                        ));
                    }
                    values = Some(list);
                }
                None => errors.push(format!("{path}: must be a list of strings")),
            },
            "enforced_for" | "report_required_tag_for" => match strings(value) {
                Some(list) => {
                    let mut names_kms = false;
                    for token in &list {
                        match token.split_once(':') {
                            Some((service, kind)) if !service.is_empty() && !kind.is_empty() => {
                                names_kms |= service.eq_ignore_ascii_case("kms");
                            }
                            _ => errors.push(format!(
                                "{path}: {token:?} is not <service>:<resource type>, such as kms:key"
                            )),
                        }
                    }
                    if field == "enforced_for" {
                        enforced = names_kms;
                    } else {
                        required = names_kms;
                    }
                }
                None => errors.push(format!("{path}: must be a list of strings")),
            },
            other => errors.push(format!(
                "{path}: {other:?} is not a field of a tag policy entry (tag_key, tag_value, enforced_for, report_required_tag_for)"
            )),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    // Without tag_key, AWS takes the lower-case spelling as the compliant one.
    let tag_key = tag_key.unwrap_or_else(|| policy_key.to_lowercase());
    // Shown to clients in denials: the policy key, never the server's file path.
    let origin: Arc<str> =
        format!("AWS Organizations tag policy, policy key {policy_key:?}").into();
    Ok(Imported {
        id: rule_id(policy_key),
        // Enforced entries follow [policy].mode (so a dry-run rollout covers them too).
        mode: (!enforced).then_some(Mode::DryRun),
        origin: format!("{file}: tags.{policy_key}"),
        tag: OrgTag {
            folded: fold(policy_key),
            policy_key: policy_key.to_owned(),
            tag_key,
            values,
            required,
            origin,
        },
    })
}

/// `org:<policy key>`, with every character a rule id may not hold as `_`.
fn rule_id(policy_key: &str) -> String {
    let mut id = String::from(ORG_RULE_PREFIX);
    id.extend(policy_key.chars().map(|c| {
        if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':') {
            c
        } else {
            '_'
        }
    }));
    id
}

fn strings(value: &Value) -> Option<Vec<String>> {
    value
        .as_array()?
        .iter()
        .map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// Parses JSON into a `Value`, refusing a member repeated in one object (serde_json would keep
/// the last one silently, and another reader the first).
fn strict_json(text: &str) -> Result<Value, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value = deserializer
        .deserialize_any(StrictValue)
        .and_then(|v| deserializer.end().map(|()| v))
        .map_err(|e| e.to_string())?;
    Ok(value)
}

struct StrictValue;

impl<'de> de::DeserializeSeed<'de> for StrictValue {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(StrictValue)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "member {key:?} appears twice in one object"
                )));
            }
            let value = map.next_value_seed(StrictValue)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_star_stands_for_one_or_more_characters() {
        assert!(value_matches("300*", "300-emea"));
        assert!(value_matches("300*", "3001"));
        assert!(!value_matches("300*", "300"));
        assert!(!value_matches("300*", "30"));
        assert!(value_matches("*@example.com", "alice@example.com"));
        assert!(!value_matches("*@example.com", "@example.com"));
        assert!(!value_matches("*@example.com", "alice@EXAMPLE.com"));
        assert!(value_matches("*", "x"));
        assert!(!value_matches("*", ""));
        assert!(value_matches("", ""));
        assert!(value_matches("200", "200"));
        assert!(!value_matches("200", "2000"));
        // The text around the star may not overlap.
        assert!(!value_matches("ab*ba", "aba"));
        assert!(value_matches("ab*ba", "abxba"));
    }

    #[test]
    fn authored_policies_are_refused_with_the_way_out() {
        for text in [
            r#"{"tags":{"costcenter":{"tag_key":{"@@assign":"CostCenter"}}}}"#,
            r#"{"tags":{"environment":{"tag_value":{"@@remove":["Production"]}}}}"#,
            r#"{"tags":{"x":{"tag_value":{"@@append":["a"]}}}}"#,
            r#"{"tags":{"x":{"tag_key":"X","@@operators_allowed_for_child_policies":["@@none"]}}}"#,
        ] {
            let errors = import(text, "p.json").unwrap_err();
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(
                errors[0].contains("describe-effective-policy"),
                "{errors:?}"
            );
            assert!(errors[0].contains("@@"), "{errors:?}");
        }
    }

    #[test]
    fn the_cli_output_and_the_plain_document_import_alike() {
        let plain = r#"{"tags":{"costcenter":{"tag_key":"CostCenter","tag_value":["100","300*"],"enforced_for":["kms:ALL_SUPPORTED"]}}}"#;
        let cli = serde_json::json!({"EffectivePolicy": {
            "PolicyContent": plain,
            "LastUpdatedTimestamp": "2020-06-09T08:34:25.103000-07:00",
            "TargetId": "123456789012",
            "PolicyType": "TAG_POLICY"
        }})
        .to_string();
        for text in [plain.to_owned(), cli] {
            let rules = import(&text, "p.json").unwrap();
            assert_eq!(rules.len(), 1);
            assert_eq!(rules[0].id, "org:costcenter");
            assert_eq!(rules[0].mode, None);
            assert_eq!(rules[0].origin, "p.json: tags.costcenter");
        }
        let other = serde_json::json!({"EffectivePolicy": {"PolicyContent": plain, "PolicyType": "BACKUP_POLICY"}}).to_string();
        assert!(import(&other, "p.json").unwrap_err()[0].contains("TAG_POLICY"));
    }

    #[test]
    fn mistakes_are_reported_with_their_place() {
        let cases = [
            (r#"{"tags":{"a":{"tag_key":"b"}}}"#, "tags.a.tag_key"),
            (r#"{"tags":{"a":{"tag_value":["*x*"]}}}"#, "more than one *"),
            (
                r#"{"tags":{"a":{"enforced_for":["kms"]}}}"#,
                "tags.a.enforced_for",
            ),
            (r#"{"tags":{"a":{"tag_values":[]}}}"#, "not a field"),
            (r#"{"tags":{"a":{},"A":{}}}"#, "letter case"),
            (r#"{"tags":{"a":{}},"tags":{}}"#, "twice"),
            (r#"{"tag":{}}"#, "not part of a tag policy"),
            (r#"[]"#, "not a JSON object"),
            (r#"{"tags":{"a":{}}} x"#, "not one JSON document"),
        ];
        for (text, expected) in cases {
            let errors = import(text, "p.json").unwrap_err();
            assert!(
                errors.iter().any(|e| e.contains(expected)),
                "{text}: {errors:?}"
            );
        }
    }

    #[test]
    fn entries_not_enforced_for_kms_run_in_dry_run() {
        let text = r#"{"tags":{
            "a":{"tag_key":"A","enforced_for":["kms:key"]},
            "b":{"tag_key":"B","enforced_for":["kms:*"]},
            "c":{"tag_key":"C","enforced_for":["KMS:ALL_SUPPORTED"]},
            "d":{"tag_key":"D","enforced_for":["secretsmanager:*"]},
            "e":{"tag_key":"E"}}}"#;
        let rules = import(text, "p.json").unwrap();
        let modes: Vec<(&str, Option<Mode>)> = rules.iter().map(|r| (&*r.id, r.mode)).collect();
        assert_eq!(
            modes,
            [
                ("org:a", None),
                ("org:b", None),
                ("org:c", None),
                ("org:d", Some(Mode::DryRun)),
                ("org:e", Some(Mode::DryRun)),
            ]
        );
    }

    #[test]
    fn rule_ids_hold_only_id_characters() {
        let rules = import(r#"{"tags":{"cost center":{},"cost@center":{}}}"#, "p").unwrap();
        let mut ids: Vec<&str> = rules.iter().map(|r| r.id.as_str()).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["org:cost_center", "org:cost_center.2"]);
    }
}
