//! The rule types and what each one checks: five on tags, three on aliases, and the rules
//! imported from an AWS Organizations tag policy (`super::org`).

use std::sync::Arc;

use regex::{Regex, RegexSet};

use super::caller::{Caller, CallerPattern, ValueTemplate};
use super::org::OrgTag;
use super::{quoted, shown_key, Context, Mode, Violation, Violations};
use crate::fold::{eq_ignore_case, fold};
use crate::glob::KeyGlob;
use crate::kms::{TagChange, TagOperation};

/// A rule with its scope.
#[derive(Debug, Clone)]
pub struct Rule {
    pub(super) id: Arc<str>,
    /// Overrides `[policy].mode` for this rule.
    pub(super) mode: Option<Mode>,
    /// When not empty, the rule applies only to requests whose KeyId may match.
    pub(super) key_ids: Vec<KeyGlob>,
    /// Access key ids the rule does not apply to.
    pub(super) exempt_principals: Vec<String>,
    /// When not empty, the rule applies only to callers matching one of these (never to a
    /// caller without an identity).
    pub(super) callers: Vec<CallerPattern>,
    /// Callers the rule does not apply to.
    pub(super) exempt_callers: Vec<CallerPattern>,
    pub(super) kind: RuleKind,
    /// Where the rule was written: `policy.rule[N]`, or the tag policy file and policy key it
    /// was imported from.
    pub(super) origin: Arc<str>,
}

#[derive(Debug, Clone)]
pub(super) enum RuleKind {
    /// Every key set must start with one of `prefixes` (exact case), unless listed in `exempt_keys`.
    RequiredPrefix {
        prefixes: Vec<String>,
        exempt_keys: Vec<String>,
    },
    /// Keys that may not be set or removed: `keys` compared ignoring case, `patterns` matched
    /// ignoring case.
    ForbiddenKey {
        keys: Vec<String>,
        /// `keys`, folded once.
        folded_keys: Vec<String>,
        patterns: Vec<Regex>,
        /// `patterns` as one set, built at load: a key that matches none of them (the common
        /// case) costs one search instead of one per pattern. `None` without patterns, or when
        /// the set would be too large to build (then each pattern is searched).
        any_pattern: Option<RegexSet>,
        on_set: bool,
        on_remove: bool,
    },
    /// Values of matching keys must match.
    ValuePattern {
        key: KeyMatcher,
        value: ValueMatcher,
    },
    /// CreateKey and ReplicateKey must carry these keys (exact case); UntagResource may not
    /// remove them.
    RequiredKey { keys: Vec<String> },
    /// CreateAlias and UpdateAlias names must start with one of `prefixes` (exact case).
    AliasPrefix { prefixes: Vec<String> },
    /// Aliases matching one of `aliases` (globs, ignoring ASCII case) may not be created,
    /// repointed or deleted.
    ProtectedAlias { aliases: Vec<KeyGlob> },
    /// An alias matching one of `aliases` (ignoring ASCII case) may be created or repointed only
    /// to a key matching one of `targets` ([`target_matches`]).
    AliasTarget {
        aliases: Vec<KeyGlob>,
        targets: Vec<KeyGlob>,
    },
    /// A tag whose key equals `key` ignoring case may be set only by a caller matching
    /// `caller`, and only to a value `value` denotes over what `caller` captured.
    CallerValue {
        key: String,
        caller: CallerPattern,
        value: ValueTemplate,
    },
    /// One entry of an imported AWS Organizations tag policy.
    OrgTag(OrgTag),
}

impl RuleKind {
    /// The rule type, as the configuration names it.
    pub(super) fn type_name(&self) -> &'static str {
        match self {
            RuleKind::RequiredPrefix { .. } => "required-prefix",
            RuleKind::ForbiddenKey { .. } => "forbidden-key",
            RuleKind::ValuePattern { .. } => "value-pattern",
            RuleKind::RequiredKey { .. } => "required-key",
            RuleKind::AliasPrefix { .. } => "alias-prefix",
            RuleKind::ProtectedAlias { .. } => "protected-alias",
            RuleKind::AliasTarget { .. } => "alias-target",
            RuleKind::CallerValue { .. } => "caller-value",
            RuleKind::OrgTag(_) => "org-tag-policy",
        }
    }
}

#[derive(Debug, Clone)]
pub(super) enum KeyMatcher {
    /// Compared ignoring case.
    Exact(String),
    /// Matched ignoring case.
    Pattern(Regex),
}

#[derive(Debug, Clone)]
pub(super) enum ValueMatcher {
    Pattern(Regex),
    Allowed(Vec<String>),
}

impl Rule {
    /// Whether the rule applies to this request at all; `caller` is `context.caller`, read.
    pub(super) fn applies_to(
        &self,
        change: &TagChange,
        context: &Context,
        caller: Option<&Caller>,
    ) -> bool {
        if let Some(akid) = context.access_key_id {
            if self.exempt_principals.iter().any(|p| p == akid) {
                return false;
            }
        }
        if let Some(caller) = caller {
            if self.exempt_callers.iter().any(|p| p.matches(caller)) {
                return false;
            }
        }
        if !self.callers.is_empty() {
            // A caller without an identity matches no `callers`.
            let Some(caller) = caller else { return false };
            if !self.callers.iter().any(|p| p.matches(caller)) {
                return false;
            }
        }
        if self.key_ids.is_empty() {
            return true;
        }
        match &change.key_id {
            Some(key_id) => self.key_ids.iter().any(|g| key_glob_may_match(g, key_id)),
            // DeleteAlias names no key, but the alias may point at a listed one: the proxy
            // cannot tell, so the rule applies.
            None if change.operation == TagOperation::DeleteAlias => true,
            // CreateKey has no KeyId: only rules without key_ids apply to it.
            None => false,
        }
    }

    /// Adds every violation of this rule to `out`. Messages are built only for the violations
    /// `out` keeps. `caller` is the request's caller identity, read.
    pub(super) fn check(&self, change: &TagChange, caller: Option<&Caller>, out: &mut Violations) {
        let violation = |key: &str, message: String| Violation {
            rule: self.id.clone(),
            key: Some(shown_key(key)),
            message,
        };
        match &self.kind {
            RuleKind::RequiredPrefix {
                prefixes,
                exempt_keys,
            } => {
                for tag in &change.set {
                    let ok = prefixes.iter().any(|p| tag.key.starts_with(p.as_str()))
                        || exempt_keys.contains(&tag.key);
                    if !ok {
                        out.add(&self.id, || {
                            violation(
                                &tag.key,
                                format!(
                                    "tag key {} must start with one of {}",
                                    quoted(&tag.key),
                                    quoted_list(prefixes)
                                ),
                            )
                        });
                    }
                }
            }
            RuleKind::ForbiddenKey {
                keys,
                folded_keys,
                patterns,
                any_pattern,
                on_set,
                on_remove,
            } => {
                let set = change.set.iter().map(|t| &t.key).filter(|_| *on_set);
                let removed = change.remove.iter().filter(|_| *on_remove);
                for key in set.chain(removed) {
                    let verb = if change.operation == TagOperation::UntagResource {
                        "removed"
                    } else {
                        "set"
                    };
                    if let Some(i) = position_folded(folded_keys, key) {
                        out.add(&self.id, || violation(
                            key,
                            format!(
                                "tag key {} may not be {verb}: it is reserved for access control ({:?}, compared ignoring case as IAM does)",
                                quoted(key),
                                keys[i]
                            ),
                        ));
                    } else if let Some(p) = any_pattern
                        .as_ref()
                        .is_none_or(|set| set_matches_ignoring_case(set, key))
                        .then(|| patterns.iter().find(|p| matches_ignoring_case(p, key)))
                        .flatten()
                    {
                        out.add(&self.id, || violation(
                            key,
                            format!(
                                "tag key {} may not be {verb}: it matches the reserved pattern {:?} (ignoring case)",
                                quoted(key),
                                p.as_str().trim_start_matches("(?i)")
                            ),
                        ));
                    }
                }
            }
            RuleKind::ValuePattern { key, value } => {
                for tag in &change.set {
                    let applies = match key {
                        KeyMatcher::Exact(k) => eq_ignore_case(k, &tag.key),
                        KeyMatcher::Pattern(p) => matches_ignoring_case(p, &tag.key),
                    };
                    if !applies {
                        continue;
                    }
                    if !value.allows(&tag.value) {
                        out.add(&self.id, || {
                            violation(
                                &tag.key,
                                format!(
                                    "the value {} of tag key {} must {}",
                                    quoted(&tag.value),
                                    quoted(&tag.key),
                                    value.wanted()
                                ),
                            )
                        });
                    }
                }
            }
            RuleKind::RequiredKey { keys } => match change.operation {
                TagOperation::CreateKey | TagOperation::ReplicateKey => {
                    for required in keys {
                        if !change.set.iter().any(|t| &t.key == required) {
                            out.add(&self.id, || {
                                violation(
                                    required,
                                    format!(
                                        "{} must set the tag key {required:?} (exact case)",
                                        change.operation
                                    ),
                                )
                            });
                        }
                    }
                }
                TagOperation::UntagResource => {
                    for key in change.remove.iter().filter(|k| keys.contains(k)) {
                        out.add(&self.id, || {
                            violation(
                                key,
                                format!(
                                    "tag key {} is required and may not be removed",
                                    quoted(key)
                                ),
                            )
                        });
                    }
                }
                TagOperation::TagResource
                | TagOperation::CreateAlias
                | TagOperation::UpdateAlias
                | TagOperation::DeleteAlias => {}
            },
            RuleKind::AliasPrefix { prefixes } => {
                let Some(alias) = &change.alias else { return };
                if change.operation == TagOperation::DeleteAlias {
                    return;
                }
                if !prefixes.iter().any(|p| alias.starts_with(p.as_str())) {
                    out.add(&self.id, || Violation {
                        rule: self.id.clone(),
                        key: None,
                        message: format!(
                            "the alias name {} must start with one of {} ({} names an alias only inside those)",
                            quoted(alias),
                            quoted_list(prefixes),
                            change.operation
                        ),
                    });
                }
            }
            RuleKind::ProtectedAlias { aliases } => {
                let Some(alias) = &change.alias else { return };
                if let Some(glob) = aliases.iter().find(|g| g.matches(alias)) {
                    let verb = match change.operation {
                        TagOperation::CreateAlias => "created",
                        TagOperation::UpdateAlias => "repointed",
                        _ => "deleted",
                    };
                    out.add(&self.id, || Violation {
                        rule: self.id.clone(),
                        key: None,
                        message: format!(
                            "the alias {} is protected ({:?}, ignoring case) and may not be {verb}",
                            quoted(alias),
                            glob.as_str()
                        ),
                    });
                }
            }
            RuleKind::AliasTarget { aliases, targets } => {
                let (Some(alias), Some(target)) = (&change.alias, &change.key_id) else {
                    return;
                };
                let Some(glob) = aliases.iter().find(|g| g.matches(alias)) else {
                    return;
                };
                if !targets.iter().any(|t| target_matches(t, target)) {
                    out.add(&self.id, || Violation {
                        rule: self.id.clone(),
                        key: None,
                        message: format!(
                            "the alias {} ({:?}) may point only at a key matching {}; {} is not one (a bare key id matches an ARN glob only when its partition, region and account are *: send the key ARN)",
                            quoted(alias),
                            glob.as_str(),
                            quoted_list(&targets.iter().map(|t| t.as_str().to_owned()).collect::<Vec<_>>()),
                            quoted(target)
                        ),
                    });
                }
            }
            RuleKind::CallerValue {
                key,
                caller: template,
                value,
            } => {
                let sets_tags = matches!(
                    change.operation,
                    TagOperation::TagResource
                        | TagOperation::CreateKey
                        | TagOperation::ReplicateKey
                );
                if !sets_tags {
                    return;
                }
                // What the caller may set, read once: `None` when it may not set the key.
                let mut captured: Option<Option<Vec<String>>> = None;
                for tag in change.set.iter().filter(|t| eq_ignore_case(key, &t.key)) {
                    let captures =
                        captured.get_or_insert_with(|| caller.and_then(|c| template.captures(c)));
                    let allowed = captures
                        .as_ref()
                        .is_some_and(|c| value.allows(c, &tag.value));
                    if allowed {
                        continue;
                    }
                    out.add(&self.id, || {
                        let message = match (caller, captures) {
                            (None, _) => format!(
                                "tag key {} may be set only by a caller whose workload identity matches {:?}, and this request has no identity: send it with the workload's client certificate, or ask the owners of the key to tag it",
                                quoted(&tag.key),
                                template.as_str()
                            ),
                            (Some(c), None) => format!(
                                "caller {} may not set tag key {}: only callers matching {:?} may, each to its own value ({:?}); ask the owners of the key to tag it",
                                quoted(c.raw),
                                quoted(&tag.key),
                                template.as_str(),
                                value.as_str()
                            ),
                            (Some(c), Some(captures)) => {
                                let mine = value.render(captures);
                                let wanted = if value.has_star() {
                                    format!("a value matching {} (* stands for one or more characters)", quoted(&mine))
                                } else {
                                    quoted(&mine)
                                };
                                format!(
                                    "caller {} may set tag key {} only to {wanted} (the value {:?} for callers matching {:?}); {} is not that: set the value to {wanted}",
                                    quoted(c.raw),
                                    quoted(&tag.key),
                                    value.as_str(),
                                    template.as_str(),
                                    quoted(&tag.value)
                                )
                            }
                        };
                        violation(&tag.key, message)
                    });
                }
            }
            RuleKind::OrgTag(entry) => entry.check(&self.id, change, out),
        }
    }

    /// Whether the rule looks at the caller's identity.
    pub(super) fn reads_caller(&self) -> bool {
        !self.callers.is_empty()
            || !self.exempt_callers.is_empty()
            || matches!(self.kind, RuleKind::CallerValue { .. })
    }

    /// For a `caller-value` rule, who may set its key and to what, for `kms-tag-guard check`.
    pub(super) fn binding(&self) -> Option<String> {
        match &self.kind {
            RuleKind::CallerValue { key, caller, value } => Some(format!(
                "tag key {key:?} set only by callers matching {:?}, to {:?}",
                caller.as_str(),
                value.as_str()
            )),
            _ => None,
        }
    }

    /// The rule's scope by caller, for `kms-tag-guard check`: the globs of `callers` and of
    /// `exempt_callers`.
    pub(super) fn caller_scope(&self) -> (Vec<String>, Vec<String>) {
        let texts = |ps: &[CallerPattern]| ps.iter().map(|p| p.as_str().to_owned()).collect();
        (texts(&self.callers), texts(&self.exempt_callers))
    }
}

/// Whether an `alias-target` glob certainly names the key `target` (a key id or key ARN, as the
/// strict parser admits them). An allow-list errs on the side of not matching: a bare key id
/// cannot be tied to an account, partition or region, so an ARN glob matches it only when all
/// three are `*` and its resource matches `key/<id>`.
pub(super) fn target_matches(glob: &KeyGlob, target: &str) -> bool {
    if glob.matches(target) {
        return true;
    }
    if target.contains(':') {
        return false;
    }
    let parts: Vec<&str> = glob.as_str().split(':').collect();
    match parts.as_slice() {
        [arn, "*", service, "*", "*", resource]
            if arn.eq_ignore_ascii_case("arn")
                && (service.eq_ignore_ascii_case("kms") || *service == "*") =>
        {
            KeyGlob::new(resource).is_ok_and(|g| g.matches(&format!("key/{target}")))
        }
        _ => false,
    }
}

impl ValueMatcher {
    fn allows(&self, value: &str) -> bool {
        match self {
            ValueMatcher::Pattern(p) => p.is_match(value),
            ValueMatcher::Allowed(allowed) => allowed.iter().any(|a| a == value),
        }
    }

    /// What a value must be, for a violation's message; built only when there is one.
    fn wanted(&self) -> String {
        match self {
            ValueMatcher::Pattern(p) => format!("match {:?}", p.as_str()),
            ValueMatcher::Allowed(allowed) => format!("be one of {}", quoted_list(allowed)),
        }
    }
}

/// Where `key`, folded, stands among `folded_keys`.
fn position_folded(folded_keys: &[String], key: &str) -> Option<usize> {
    if key.is_ascii() {
        // An ASCII key folds to its ASCII lower case: compare in place rather than build it.
        return folded_keys.iter().position(|k| {
            k.len() == key.len()
                && k.bytes()
                    .zip(key.bytes())
                    .all(|(k, c)| k == c.to_ascii_lowercase())
        });
    }
    let folded = fold(key);
    folded_keys.iter().position(|k| *k == folded)
}

/// Whether a case-insensitive key regex matches `key`, also after folding it the way IAM compares
/// tag keys: the regex engine's Unicode folding does not equate `ı` or `İ` with `i`, Java does.
fn matches_ignoring_case(pattern: &Regex, key: &str) -> bool {
    pattern.is_match(key) || (!key.is_ascii() && pattern.is_match(&fold(key)))
}

/// [`matches_ignoring_case`] for a set: whether any of its regexes does.
fn set_matches_ignoring_case(set: &RegexSet, key: &str) -> bool {
    set.is_match(key) || (!key.is_ascii() && set.is_match(&fold(key)))
}

/// Whether a `key_ids` glob may name the key a request refers to.
///
/// A bare key id (`1234abcd-…`, `mrk-…`) cannot be tied to an account or region, so an ARN glob
/// applies to it whenever the glob's resource part (`key/…`) matches. An alias cannot be tied to a
/// key at all, so every rule applies to it. A key ARN is matched whole, and also by every key id
/// inside it read as a bare one: KMS finds the key by the ARN's account and region, but other
/// readers do not (moto takes the id after the first `:key/` and looks it up in the caller's own
/// account and region), so an ARN of any partition, region or account names whatever key its id
/// may name. Either way the rule errs on the side of applying.
fn key_glob_may_match(glob: &KeyGlob, key_id: &str) -> bool {
    if glob.matches(key_id) {
        return true;
    }
    let is_alias = key_id.starts_with("alias/") || key_id.contains(":alias/");
    if is_alias {
        return true;
    }
    if key_id
        .get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case("arn:"))
    {
        return ids_inside_arn(key_id).any(|id| bare_key_id_may_match(glob, id));
    }
    bare_key_id_may_match(glob, key_id)
}

/// Whether a glob may name the key a bare key id names: it matches the id, or it is an ARN glob
/// whose resource part matches `key/<id>`.
fn bare_key_id_may_match(glob: &KeyGlob, key_id: &str) -> bool {
    if glob.matches(key_id) {
        return true;
    }
    let Some(resource_glob) = glob.as_str().strip_prefix("arn:") else {
        return false;
    };
    let resource_glob = resource_glob.rsplit(':').next().unwrap_or(resource_glob);
    KeyGlob::new(resource_glob).is_ok_and(|g| g.matches(&format!("key/{key_id}")))
}

/// Every reading of the key id inside an ARN: after each `key/` (any case), the rest, the rest up
/// to the next `:`, and the rest up to the next `:key/` (moto's `split(":key/")[1]`).
fn ids_inside_arn(arn: &str) -> impl Iterator<Item = &str> {
    let lower = arn.to_ascii_lowercase();
    let starts: Vec<usize> = lower.match_indices("key/").map(|(i, _)| i + 4).collect();
    starts.into_iter().flat_map(move |start| {
        let rest = &arn[start..];
        let lower_rest = &rest.to_ascii_lowercase();
        let to_colon = rest.find(':').map_or(rest, |end| &rest[..end]);
        let to_next_key = lower_rest.find(":key/").map_or(rest, |end| &rest[..end]);
        [rest, to_colon, to_next_key]
    })
}

fn quoted_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    quoted.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_keys_are_found_among_folded_keys_as_their_fold_is() {
        let keys = [
            "Project",
            "environment",
            "OWNER",
            "Stra\u{df}e",
            "\u{130}d",
            "kind",
        ];
        let folded_keys: Vec<String> = keys.iter().map(|k| fold(k)).collect();
        for key in [
            "Project",
            "PROJECT",
            "project",
            "Projects",
            "Projec",
            "Owner",
            "owner",
            "OWNEr",
            "Environment",
            "environmenT",
            "ID",
            "id",
            "iD",
            "\u{131}d",
            "\u{130}D",
            "KIND",
            "\u{212a}ind",
            "stra\u{df}e",
            "STRASSE",
            "strasse",
            "",
            "team:owner",
            "Pro ject",
        ] {
            let by_fold = folded_keys.iter().position(|k| *k == fold(key));
            assert_eq!(position_folded(&folded_keys, key), by_fold, "{key:?}");
        }
    }

    #[test]
    fn alias_targets_match_only_what_they_certainly_name() {
        let any_account = KeyGlob::new("arn:*:kms:*:*:key/1234*").unwrap();
        assert!(target_matches(&any_account, "1234abcd"));
        assert!(target_matches(
            &any_account,
            "arn:aws:kms:us-east-1:111122223333:key/1234abcd"
        ));
        assert!(!target_matches(&any_account, "9999abcd"));
        let account = KeyGlob::new("arn:aws:kms:*:111122223333:key/*").unwrap();
        assert!(target_matches(
            &account,
            "arn:aws:kms:us-east-1:111122223333:key/1234abcd"
        ));
        // A bare id cannot be tied to the account: not certainly in it.
        assert!(!target_matches(&account, "1234abcd"));
        assert!(!target_matches(
            &account,
            "arn:aws:kms:us-east-1:999999999999:key/1234abcd"
        ));
        let bare = KeyGlob::new("mrk-*").unwrap();
        assert!(target_matches(&bare, "mrk-1"));
        assert!(target_matches(&bare, "MRK-1"));
        assert!(!target_matches(&bare, "arn:aws:kms:us-east-1:1:key/mrk-1"));
    }

    #[test]
    fn arn_globs_apply_to_bare_key_ids_whose_resource_matches() {
        let account = KeyGlob::new("arn:aws:kms:*:111122223333:key/*").unwrap();
        assert!(key_glob_may_match(
            &account,
            "1234abcd-12ab-34cd-56ef-1234567890ab"
        ));
        assert!(key_glob_may_match(
            &account,
            "arn:aws:kms:us-east-1:111122223333:key/1"
        ));
        // Another account's ARN: the id inside it may name a key of the account (moto looks it up
        // in the caller's account).
        assert!(key_glob_may_match(
            &account,
            "arn:aws:kms:us-east-1:999999999999:key/1"
        ));
        assert!(key_glob_may_match(&account, "alias/app"));
        assert!(key_glob_may_match(
            &account,
            "arn:aws:kms:us-east-1:999999999999:alias/app"
        ));
        assert!(key_glob_may_match(
            &account,
            "ARN:AWS:KMS:us-east-1:999999999999:key/1"
        ));
        let other = KeyGlob::new("arn:aws:kms:*:111122223333:key/mrk-1").unwrap();
        assert!(!key_glob_may_match(
            &other,
            "arn:aws:kms:us-east-1:999999999999:key/mrk-2"
        ));
        let one = KeyGlob::new("arn:aws:kms:us-east-1:111122223333:key/mrk-1").unwrap();
        assert!(key_glob_may_match(&one, "mrk-1"));
        assert!(!key_glob_may_match(&one, "mrk-2"));
        let bare = KeyGlob::new("mrk-*").unwrap();
        assert!(key_glob_may_match(&bare, "mrk-9"));
        assert!(key_glob_may_match(
            &bare,
            "arn:aws:kms:us-east-1:1:key/mrk-9"
        ));
        assert!(!key_glob_may_match(
            &bare,
            "arn:aws:kms:us-east-1:1:key/1-9"
        ));
    }

    use proptest::prelude::*;

    /// A spelling of an ARN naming key `id`, as some reader may take it.
    fn arn_spelling(id: String) -> impl Strategy<Value = String> {
        (
            prop::sample::select(vec!["arn", "ARN", "Arn", "aRn"]),
            prop_oneof![
                Just("aws".to_owned()),
                Just("aws-cn".to_owned()),
                Just("aws-us-gov".to_owned()),
                Just("aws-iso-b".to_owned()),
                "[a-z-]{0,12}",
            ],
            prop::sample::select(vec!["kms", "KMS", "", "iam"]),
            "[a-z0-9-]{0,16}",
            "[0-9]{0,12}",
            prop::sample::select(vec!["key/", "KEY/", "Key/"]),
            prop::sample::select(vec!["", ":key/other", ":x"]),
        )
            .prop_map(
                move |(arn, partition, service, region, account, key, tail)| {
                    format!("{arn}:{partition}:{service}:{region}:{account}:{key}{id}{tail}")
                },
            )
    }

    proptest! {
        /// A rule scoped to a key id, bare or in an ARN of any partition, region or account,
        /// applies to every ARN spelling naming that id.
        #[test]
        fn a_key_id_inside_any_arn_spelling_is_matched(
            (id, spelling) in "(mrk-)?[0-9a-f]{8}-[0-9a-f]{4}"
                .prop_flat_map(|id| (Just(id.clone()), arn_spelling(id))),
            scoped_by_arn in any::<bool>(),
        ) {
            let glob = if scoped_by_arn {
                KeyGlob::new(&format!("arn:aws:kms:us-east-1:111122223333:key/{id}")).unwrap()
            } else {
                KeyGlob::new(&id).unwrap()
            };
            prop_assert!(key_glob_may_match(&glob, &spelling), "{} does not match {}", glob.as_str(), spelling);
            // A key id that differs is not matched by the id-scoped glob.
            let other = KeyGlob::new(&format!("{id}0")).unwrap();
            let other_id = format!("{id}0");
            prop_assert!(!key_glob_may_match(&other, &spelling) || spelling.contains(&other_id));
        }
    }
}
