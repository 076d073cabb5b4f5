//! The `[policy]` section of the configuration, compiled: every rule checked and built once
//! (regexes compiled, forbidden keys folded), every mistake reported with its key path.

use std::collections::HashSet;
use std::sync::Arc;

use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};

use super::caller::{CallerPattern, ValueTemplate};
use super::org::ORG_RULE_PREFIX;
use super::rules::{KeyMatcher, Rule, RuleKind, ValueMatcher};
use super::{Mode, Policy, UnknownOperations, MAX_TAGS_RULE, REQUEST_RULE};
use crate::fold::fold;
use crate::glob::KeyGlob;
use crate::toml_reader::{Errors, Reader};

/// An AWS Organizations tag policy to import (`[policy].org_tag_policy`), read by the caller.
pub(crate) struct OrgPolicyText<'a> {
    /// The file, as messages and rule origins name it.
    pub file: &'a str,
    pub text: &'a str,
}

/// The rule types a `[[policy.rule]]` may name.
pub const RULE_TYPES: [&str; 8] = [
    "required-prefix",
    "forbidden-key",
    "value-pattern",
    "required-key",
    "caller-value",
    "alias-prefix",
    "protected-alias",
    "alias-target",
];

/// [`RULE_TYPES`] as messages list them.
const RULE_TYPES_TEXT: &str = "required-prefix, forbidden-key, value-pattern, required-key, caller-value, alias-prefix, protected-alias or alias-target";

/// Compiles the `[policy]` section `r` reads, and the rules of the tag policy `org` (whose
/// `org_tag_policy` key the caller has read).
pub(crate) fn compile(
    r: &mut Reader,
    errors: &mut Errors,
    org: Option<OrgPolicyText<'_>>,
) -> Policy {
    let mode = read_mode(r, errors).unwrap_or(Mode::Enforce);
    let max_tags = r.integer("max_tags", errors, 1).unwrap_or(50) as usize;
    // Secure by default: an operation the proxy does not know is one it cannot judge.
    let unknown_operations = match r.string("unknown_operations", errors) {
        None | Some("reject") => UnknownOperations::Reject,
        Some("forward") => UnknownOperations::Forward,
        Some(s) => {
            errors.push(
                "policy.unknown_operations",
                format!("{s:?} is not allowed; use \"reject\" (the default) or \"forward\""),
            );
            UnknownOperations::Reject
        }
    };
    let mut rules = Vec::new();
    if let Some(value) = r.get("rule") {
        match value.as_array() {
            None => errors.push(
                "policy.rule",
                "expected [[policy.rule]] tables, one per rule",
            ),
            Some(items) => {
                let mut ids = HashSet::new();
                for (i, item) in items.iter().enumerate() {
                    let path = format!("policy.rule[{i}]");
                    let Some(table) = item.as_table() else {
                        errors.push(&path, "expected a table ([[policy.rule]])");
                        continue;
                    };
                    let first_error = errors.0.len();
                    let mut rr = Reader::new(table, &path);
                    let rule = read_rule(&mut rr, errors, &mut ids);
                    // A misspelt type reads none of its keys: they would each be reported
                    // unknown, after the one mistake that matters.
                    let known_type = table
                        .get("type")
                        .and_then(toml::Value::as_str)
                        .is_none_or(|t| RULE_TYPES.contains(&t));
                    if known_type {
                        rr.finish(errors);
                    }
                    // Each error names the rule by its id too, not only by its place.
                    if let Some(id) = table.get("id").and_then(toml::Value::as_str) {
                        for e in &mut errors.0[first_error..] {
                            e.rule = Some(id.to_owned());
                        }
                    }
                    rules.extend(rule);
                }
            }
        }
    }
    if let Some(org) = org {
        match super::org::import(org.text, org.file) {
            Ok(imported) => rules.extend(imported.into_iter().map(|i| Rule {
                id: i.id.into(),
                mode: i.mode,
                key_ids: Vec::new(),
                exempt_principals: Vec::new(),
                // Imported entries apply to every caller, as the tag policy does to every
                // principal.
                callers: Vec::new(),
                exempt_callers: Vec::new(),
                kind: RuleKind::OrgTag(i.tag),
                origin: i.origin.into(),
            })),
            Err(messages) => {
                for message in messages {
                    errors.push("policy.org_tag_policy", format!("{}: {message}", org.file));
                }
            }
        }
    }
    Policy {
        mode,
        max_tags,
        unknown_operations,
        reads_caller: rules.iter().any(Rule::reads_caller),
        rules,
        sha256: Arc::from(""),
    }
}

/// The `mode` key of the table `r` reads: `None` when it is absent or not a mode (reported).
fn read_mode(r: &mut Reader, errors: &mut Errors) -> Option<Mode> {
    let s = r.string("mode", errors)?;
    let mode = Mode::parse(s);
    if mode.is_none() {
        errors.push(
            &r.key_path("mode"),
            format!("{s:?} is not a mode; use \"enforce\" or \"dry-run\""),
        );
    }
    mode
}

fn read_rule(r: &mut Reader, errors: &mut Errors, ids: &mut HashSet<String>) -> Option<Rule> {
    let id = r.string("id", errors);
    match id {
        None if !r.has("id") => {
            errors.push(&r.key_path("id"), "every rule needs an id");
        }
        Some(id) if !valid_rule_id(id) => errors.push(
            &r.key_path("id"),
            format!("{id:?}: use letters, digits, '-', '_', '.' or ':' (it shows in metrics)"),
        ),
        Some(id) if id == MAX_TAGS_RULE || id == REQUEST_RULE => errors.push(
            &r.key_path("id"),
            format!("{id:?} is reserved for the proxy's own denials; choose another id"),
        ),
        Some(id) if id.starts_with(ORG_RULE_PREFIX) => errors.push(
            &r.key_path("id"),
            format!("{id:?}: ids starting with {ORG_RULE_PREFIX:?} are reserved for the rules imported from org_tag_policy; choose another id"),
        ),
        Some(id) if !ids.insert(id.to_owned()) => errors.push(
            &r.key_path("id"),
            format!("{id:?} is used by an earlier rule; rule ids must be unique"),
        ),
        _ => {}
    }
    let mode = read_mode(r, errors);
    let key_ids = r
        .strings("key_ids", errors)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, g)| {
            KeyGlob::new(g)
                .map_err(|e| errors.push(&format!("{}[{i}]", r.key_path("key_ids")), e))
                .ok()
        })
        .collect();
    let exempt_principals: Vec<String> = r
        .strings("exempt_principals", errors)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, p)| {
            if !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()) {
                Some(p.to_owned())
            } else {
                errors.push(
                    &format!("{}[{i}]", r.key_path("exempt_principals")),
                    format!("{p:?} is not an access key id such as \"AKIAIOSFODNN7EXAMPLE\""),
                );
                None
            }
        })
        .collect();
    let callers = caller_globs(r, "callers", errors);
    let exempt_callers = caller_globs(r, "exempt_callers", errors);
    let kind = match r.string("type", errors) {
        None => {
            if !r.has("type") {
                errors.push(
                    &r.key_path("type"),
                    format!("every rule needs a type: {RULE_TYPES_TEXT}"),
                );
            }
            None
        }
        Some("required-prefix") => read_required_prefix(r, errors),
        Some("forbidden-key") => read_forbidden_key(r, errors),
        Some("value-pattern") => read_value_pattern(r, errors),
        Some("required-key") => read_required_key(r, errors),
        Some("caller-value") => read_caller_value(r, errors),
        Some("alias-prefix") => read_alias_prefix(r, errors),
        Some("protected-alias") => {
            alias_globs(r, "aliases", errors).map(|aliases| RuleKind::ProtectedAlias { aliases })
        }
        Some("alias-target") => read_alias_target(r, errors),
        Some(other) => {
            let hint = match crate::toml_reader::nearest(other, RULE_TYPES) {
                Some(near) => format!("did you mean `{near}`? The types are"),
                None => "use".to_owned(),
            };
            errors.push(
                &r.key_path("type"),
                format!("{other:?} is not a rule type; {hint} {RULE_TYPES_TEXT}"),
            );
            None
        }
    };
    Some(Rule {
        id: id?.into(),
        mode,
        key_ids,
        exempt_principals,
        callers: callers?,
        exempt_callers: exempt_callers?,
        kind: kind?,
        origin: r.key_path("").trim_end_matches('.').into(),
    })
}

/// A list of caller globs (`callers`, `exempt_callers`): absent is none; present, it may not be
/// empty (`callers = []` would silently turn the rule off). `None` when a glob is bad (reported).
fn caller_globs(r: &mut Reader, key: &str, errors: &mut Errors) -> Option<Vec<CallerPattern>> {
    let path = r.key_path(key);
    let Some(items) = r.strings(key, errors) else {
        return (!r.has(key)).then(Vec::new);
    };
    if items.is_empty() {
        let hint = if key == "callers" {
            "leave `callers` out to apply the rule to every caller"
        } else {
            "leave `exempt_callers` out to exempt no caller"
        };
        errors.push(&path, format!("may not be empty; {hint}"));
        return None;
    }
    let mut globs = Vec::new();
    for (i, g) in items.iter().enumerate() {
        match CallerPattern::glob(g) {
            Ok(glob) => globs.push(glob),
            Err(e) => errors.push(&format!("{path}[{i}]"), e),
        }
    }
    (globs.len() == items.len()).then_some(globs)
}

/// `key`, `caller` (a template with `{name}`s) and `value` (a template over those names).
fn read_caller_value(r: &mut Reader, errors: &mut Errors) -> Option<RuleKind> {
    let key = r.string("key", errors);
    let caller = r.string("caller", errors);
    let value = r.string("value", errors);
    let key = match key {
        Some(k) if !k.is_empty() => Some(k.to_owned()),
        Some(_) => {
            errors.push(&r.key_path("key"), "may not be an empty string");
            None
        }
        None => {
            if !r.has("key") {
                errors.push(
                    &r.key_path("key"),
                    "a caller-value rule needs `key`, the tag key whose value it binds to the caller",
                );
            }
            None
        }
    };
    let caller = match caller {
        Some(c) => CallerPattern::template(c)
            .map_err(|e| errors.push(&r.key_path("caller"), e))
            .ok(),
        None => {
            if !r.has("caller") {
                errors.push(
                    &r.key_path("caller"),
                    "a caller-value rule needs `caller`, a template over the caller's identity, as in \"spiffe://example.org/ns/{team}/sa/*\"",
                );
            }
            None
        }
    };
    let value = match (value, &caller) {
        (Some(v), Some(c)) => ValueTemplate::new(v, c.names())
            .map_err(|e| errors.push(&r.key_path("value"), e))
            .ok(),
        (Some(_), None) => None,
        (None, _) => {
            if !r.has("value") {
                errors.push(
                    &r.key_path("value"),
                    "a caller-value rule needs `value`, a template over the names of `caller`, as in \"{team}\"",
                );
            }
            None
        }
    };
    Some(RuleKind::CallerValue {
        key: key?,
        caller: caller?,
        value: value?,
    })
}

fn valid_rule_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A required, non-empty list of non-empty strings.
fn non_empty_strings(r: &mut Reader, key: &str, errors: &mut Errors) -> Option<Vec<String>> {
    let path = r.key_path(key);
    let Some(items) = r.strings(key, errors) else {
        if !r.has(key) {
            errors.push(&path, "is required for this rule type");
        }
        return None;
    };
    if items.is_empty() {
        errors.push(&path, "may not be empty");
        return None;
    }
    if let Some(i) = items.iter().position(|s| s.is_empty()) {
        errors.push(&format!("{path}[{i}]"), "may not be an empty string");
        return None;
    }
    Some(items.into_iter().map(str::to_owned).collect())
}

fn regex(path: &str, pattern: &str, ignore_case: bool, errors: &mut Errors) -> Option<Regex> {
    RegexBuilder::new(pattern)
        .case_insensitive(ignore_case)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| {
            // regex's own layout: the pattern, a caret under the fault, what is wrong.
            let detail = e.to_string();
            errors.push(
                path,
                format!("invalid regex {pattern:?}:\n{}", detail.trim_end()),
            );
        })
        .ok()
}

/// Compiled regexes (each built by [`regex`], ignoring case) as one set, for a rule that asks
/// whether any matches: `None` for none, or when the set exceeds the size limit.
fn regex_set(patterns: &[Regex]) -> Option<RegexSet> {
    if patterns.is_empty() {
        return None;
    }
    RegexSetBuilder::new(patterns.iter().map(Regex::as_str))
        .case_insensitive(true)
        .size_limit(1 << 20)
        .build()
        .ok()
}

fn read_required_prefix(r: &mut Reader, errors: &mut Errors) -> Option<RuleKind> {
    let prefixes = non_empty_strings(r, "prefixes", errors);
    let exempt_keys = r
        .strings("exempt_keys", errors)
        .unwrap_or_default()
        .into_iter()
        .map(str::to_owned)
        .collect();
    Some(RuleKind::RequiredPrefix {
        prefixes: prefixes?,
        exempt_keys,
    })
}

fn read_forbidden_key(r: &mut Reader, errors: &mut Errors) -> Option<RuleKind> {
    let keys: Vec<String> = r
        .strings("keys", errors)
        .unwrap_or_default()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let patterns_path = r.key_path("patterns");
    let patterns: Vec<Option<Regex>> = r
        .strings("patterns", errors)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, p)| regex(&format!("{patterns_path}[{i}]"), p, true, errors))
        .collect();
    if keys.is_empty() && patterns.is_empty() {
        errors.push(
            &r.key_path("keys"),
            "a forbidden-key rule needs `keys`, `patterns` or both",
        );
    }
    let (mut on_set, mut on_remove) = (true, true);
    let on_path = r.key_path("on");
    if let Some(on) = r.strings("on", errors) {
        on_set = on.contains(&"set");
        on_remove = on.contains(&"remove");
        if on.is_empty() || on.iter().any(|o| !matches!(*o, "set" | "remove")) {
            errors.push(
                &on_path,
                "use [\"set\"], [\"remove\"] or [\"set\", \"remove\"]",
            );
        }
    }
    let patterns: Vec<Regex> = patterns.into_iter().collect::<Option<_>>()?;
    Some(RuleKind::ForbiddenKey {
        folded_keys: keys.iter().map(|k| fold(k)).collect(),
        keys,
        any_pattern: regex_set(&patterns),
        patterns,
        on_set,
        on_remove,
    })
}

fn read_value_pattern(r: &mut Reader, errors: &mut Errors) -> Option<RuleKind> {
    let key = match (r.string("key", errors), r.string("key_pattern", errors)) {
        (Some(k), None) if !k.is_empty() => Some(KeyMatcher::Exact(k.to_owned())),
        (None, Some(p)) => {
            regex(&r.key_path("key_pattern"), p, true, errors).map(KeyMatcher::Pattern)
        }
        (Some(_), Some(_)) => {
            errors.push(&r.key_path("key"), "set `key` or `key_pattern`, not both");
            None
        }
        _ => {
            errors.push(
                &r.key_path("key"),
                "a value-pattern rule needs `key` (a tag key) or `key_pattern` (a regex)",
            );
            None
        }
    };
    let pattern = r.string("pattern", errors);
    let allowed = r.strings("allowed", errors);
    let value = match (pattern, allowed) {
        (Some(p), None) => {
            regex(&r.key_path("pattern"), p, false, errors).map(ValueMatcher::Pattern)
        }
        (None, Some(list)) => Some(ValueMatcher::Allowed(
            list.into_iter().map(str::to_owned).collect(),
        )),
        (Some(_), Some(_)) => {
            errors.push(
                &r.key_path("pattern"),
                "set `pattern` or `allowed`, not both",
            );
            None
        }
        (None, None) => {
            errors.push(
                &r.key_path("pattern"),
                "a value-pattern rule needs `pattern` (a regex) or `allowed` (a list of values)",
            );
            None
        }
    };
    Some(RuleKind::ValuePattern {
        key: key?,
        value: value?,
    })
}

fn read_required_key(r: &mut Reader, errors: &mut Errors) -> Option<RuleKind> {
    Some(RuleKind::RequiredKey {
        keys: non_empty_strings(r, "keys", errors)?,
    })
}

/// `prefixes`: each starts with `alias/`.
fn read_alias_prefix(r: &mut Reader, errors: &mut Errors) -> Option<RuleKind> {
    let prefixes = non_empty_strings(r, "prefixes", errors)?;
    let path = r.key_path("prefixes");
    let mut ok = true;
    for (i, p) in prefixes.iter().enumerate() {
        if !p.starts_with("alias/") {
            errors.push(
                &format!("{path}[{i}]"),
                format!("{p:?}: an alias prefix starts with \"alias/\" (exact case), as in \"alias/team-\""),
            );
            ok = false;
        }
    }
    ok.then_some(RuleKind::AliasPrefix { prefixes })
}

/// A required list of alias globs (`*` = any run, compared ignoring ASCII case), each starting
/// with `alias/`.
fn alias_globs(r: &mut Reader, key: &str, errors: &mut Errors) -> Option<Vec<KeyGlob>> {
    let items = non_empty_strings(r, key, errors)?;
    let path = r.key_path(key);
    let mut globs = Vec::new();
    for (i, g) in items.iter().enumerate() {
        if !g.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("alias/")) && g != "*" {
            errors.push(
                &format!("{path}[{i}]"),
                format!("{g:?}: an alias glob starts with \"alias/\", as in \"alias/payments-*\" (or is \"*\")"),
            );
            continue;
        }
        match KeyGlob::new(g) {
            Ok(glob) => globs.push(glob),
            Err(e) => errors.push(&format!("{path}[{i}]"), e),
        }
    }
    (globs.len() == items.len()).then_some(globs)
}

fn read_alias_target(r: &mut Reader, errors: &mut Errors) -> Option<RuleKind> {
    let aliases = alias_globs(r, "aliases", errors);
    let targets = non_empty_strings(r, "targets", errors).and_then(|items| {
        let path = r.key_path("targets");
        let globs: Vec<KeyGlob> = items
            .iter()
            .enumerate()
            .filter_map(|(i, g)| {
                if g.to_ascii_lowercase().contains("alias/") {
                    errors.push(
                        &format!("{path}[{i}]"),
                        format!("{g:?}: targets name keys (key ids or key ARNs), not aliases"),
                    );
                    return None;
                }
                KeyGlob::new(g)
                    .map_err(|e| errors.push(&format!("{path}[{i}]"), e))
                    .ok()
            })
            .collect();
        (globs.len() == items.len()).then_some(globs)
    });
    Some(RuleKind::AliasTarget {
        aliases: aliases?,
        targets: targets?,
    })
}
