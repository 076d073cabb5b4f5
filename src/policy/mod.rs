//! The organisation's tag and alias rules, compiled once, and their evaluation.
//!
//! Pure: no I/O, no async, no HTTP. `evaluate` turns a [`TagChange`] and its [`Context`] into a
//! [`Decision`] that lists every violation, so one denial tells the caller everything to fix.

pub mod caller;
mod compile;
mod org;
mod rules;

pub(crate) use compile::{compile, OrgPolicyText, RULE_TYPES};

use std::sync::Arc;

use serde::Serialize;

pub use rules::Rule;

use crate::kms::TagChange;

/// Whether violations deny the request or are only recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    DryRun,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "enforce" => Some(Mode::Enforce),
            "dry-run" => Some(Mode::DryRun),
            _ => None,
        }
    }
}

/// What to do with an `X-Amz-Target` that is not an operation of the KMS model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownOperations {
    Forward,
    Reject,
}

/// The rule id under which a request that sets more than `max_tags` tags is denied.
pub const MAX_TAGS_RULE: &str = "max-tags";
/// The rule id under which an unreadable or ambiguous request is denied.
pub const REQUEST_RULE: &str = "request";

/// A compiled policy: built by [`compile`] from the `[policy]` section, and only so.
#[derive(Debug, Clone)]
pub struct Policy {
    mode: Mode,
    max_tags: usize,
    unknown_operations: UnknownOperations,
    rules: Vec<Rule>,
    /// Whether any rule looks at the caller's identity (else it is not even read).
    reads_caller: bool,
    /// SHA-256 (hex) of the configuration text the policy was loaded from (what
    /// `kms_tag_guard_policy_info{sha256}` shows), for the decision records it judges.
    sha256: Arc<str>,
}

impl Policy {
    /// The SHA-256 (hex) of the configuration the policy was loaded from.
    pub fn sha256(&self) -> &Arc<str> {
        &self.sha256
    }

    /// The policy, known as loaded from a configuration text of SHA-256 `sha256` (hex).
    pub(crate) fn with_sha256(mut self, sha256: &str) -> Policy {
        self.sha256 = sha256.into();
        self
    }

    /// How many `[[policy.rule]]`s it holds.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn max_tags(&self) -> usize {
        self.max_tags
    }

    pub fn unknown_operations(&self) -> UnknownOperations {
        self.unknown_operations
    }

    /// Every rule, as `kms-tag-guard check` lists it: id, type, mode in force, and where it was
    /// written (`policy.rule[N]`, or the tag policy file and policy key it was imported from).
    pub fn rule_summaries(&self) -> Vec<RuleSummary> {
        self.rules
            .iter()
            .map(|r| {
                let (callers, exempt_callers) = r.caller_scope();
                RuleSummary {
                    id: r.id.to_string(),
                    kind: r.kind.type_name(),
                    mode: r.mode.unwrap_or(self.mode),
                    origin: r.origin.to_string(),
                    callers,
                    exempt_callers,
                    binds: r.binding(),
                }
            })
            .collect()
    }

    /// Whether no violation can deny: dry-run, and no rule enforced on its own.
    pub fn enforces_no_rule(&self) -> bool {
        self.mode == Mode::DryRun && self.rules.iter().all(|r| r.mode != Some(Mode::Enforce))
    }
}

/// One rule, as `kms-tag-guard check` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSummary {
    pub id: String,
    /// The rule type (`required-prefix`, ..., `org-tag-policy` for imported rules).
    pub kind: &'static str,
    pub mode: Mode,
    pub origin: String,
    /// The `callers` globs: empty when the rule applies to every caller.
    pub callers: Vec<String>,
    /// The `exempt_callers` globs.
    pub exempt_callers: Vec<String>,
    /// For a `caller-value` rule: which callers may set its key, and to what.
    pub binds: Option<String>,
}

impl std::fmt::Display for RuleSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.mode {
            Mode::Enforce => "enforce",
            Mode::DryRun => "dry-run",
        };
        write!(
            f,
            "{} ({}, {mode}) from {}",
            self.id, self.kind, self.origin
        )?;
        if let Some(binds) = &self.binds {
            write!(f, "; {binds}")?;
        }
        let list = |globs: &[String]| {
            globs
                .iter()
                .map(|g| format!("{g:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.callers.is_empty() {
            write!(
                f,
                "; applies only to callers {} (not to callers without an identity)",
                list(&self.callers)
            )?;
        }
        if !self.exempt_callers.is_empty() {
            write!(f, "; exempt callers {}", list(&self.exempt_callers))?;
        }
        Ok(())
    }
}

/// Who asks: everything a rule may look at besides the change itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context<'a> {
    /// From the SigV4 credential scope (read, not verified: KMS verifies it).
    pub access_key_id: Option<&'a str>,
    /// The caller's workload identity (the SPIFFE ID or DNS name of the connection's verified
    /// client certificate), `None` without one.
    pub caller: Option<&'a str>,
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub rule: Arc<str>,
    /// The tag key concerned, where there is one.
    pub key: Option<String>,
    pub message: String,
}

/// The verdict on one tag change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// Violations of enforced rules: any one denies the request. At most [`MAX_VIOLATIONS`],
    /// and the first of every rule violated (so every violated rule is named).
    pub violations: Vec<Violation>,
    /// Violations of rules in dry-run: recorded, not enforced. Bounded the same way.
    pub dry_run_violations: Vec<Violation>,
    /// Enforced violations counted but not kept.
    pub violations_omitted: usize,
    /// Dry-run violations counted but not kept.
    pub dry_run_violations_omitted: usize,
}

/// How many violations a decision keeps (besides the first of each rule): enough to tell a
/// caller what to fix, bounded so that a request with thousands of bad tags makes a bounded
/// answer and a bounded audit record.
pub const MAX_VIOLATIONS: usize = 20;

/// The longest tag key or value a violation shows, in characters (KMS allows 128 and 256).
const SHOWN_CHARS: usize = 256;

/// A tag key or value as a violation shows it: at most [`SHOWN_CHARS`] characters, and a longer
/// one marked as cut, with its length.
pub(crate) fn shown_key(s: &str) -> String {
    crate::text::bounded(s, SHOWN_CHARS).into_owned()
}

/// [`shown_key`], quoted like `{:?}`.
pub(crate) fn quoted(s: &str) -> String {
    crate::text::bounded_quoted(s, SHOWN_CHARS)
}

/// Violations as they are found, kept up to a bound.
#[derive(Debug, Default)]
pub struct Violations {
    kept: Vec<Violation>,
    omitted: usize,
}

impl Violations {
    /// Adds a violation of rule `rule`; `make` builds it only if it is kept: the first
    /// [`MAX_VIOLATIONS`], and the first of each rule.
    pub fn add(&mut self, rule: &Arc<str>, make: impl FnOnce() -> Violation) {
        if self.kept.len() < MAX_VIOLATIONS || !self.kept.iter().any(|v| v.rule == *rule) {
            self.kept.push(make());
        } else {
            self.omitted += 1;
        }
    }

    /// Adds a violation that is always kept (the proxy's own).
    fn push(&mut self, violation: Violation) {
        self.kept.push(violation);
    }
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.violations.is_empty()
    }

    /// A denial of an unreadable request; dry-run never relaxes it.
    pub fn unreadable(message: String) -> Decision {
        Decision {
            violations: vec![Violation {
                rule: REQUEST_RULE.into(),
                key: None,
                message,
            }],
            ..Decision::default()
        }
    }

    /// The message of a denial: every violated rule id, and the tag keys of the violations kept.
    pub fn denial_message(&self) -> String {
        let mut message = String::from("kms-tag-guard denied the request: ");
        for (i, v) in self.violations.iter().enumerate() {
            if i > 0 {
                message.push_str("; ");
            }
            message.push_str(&format!("rule {}: {}", v.rule, v.message));
        }
        if self.violations_omitted > 0 {
            message.push_str(&format!(
                "; and {} more violations of the rules above",
                self.violations_omitted
            ));
        }
        message
    }
}

impl Policy {
    pub fn evaluate(&self, change: &TagChange, context: &Context) -> Decision {
        let mut enforced = Violations::default();
        let mut dry_run = Violations::default();
        // Counted first: the count alone tells a request with thousands of tags what to fix.
        if change.set.len() > self.max_tags {
            let violation = Violation {
                rule: MAX_TAGS_RULE.into(),
                key: None,
                message: format!(
                    "the request sets {} tags; at most {} are allowed in one request",
                    change.set.len(),
                    self.max_tags
                ),
            };
            match self.mode {
                Mode::Enforce => enforced.push(violation),
                Mode::DryRun => dry_run.push(violation),
            }
        }
        let caller = context
            .caller
            .filter(|_| self.reads_caller)
            .map(caller::Caller::new);
        for rule in &self.rules {
            if !rule.applies_to(change, context, caller.as_ref()) {
                continue;
            }
            let sink = match rule.mode.unwrap_or(self.mode) {
                Mode::Enforce => &mut enforced,
                Mode::DryRun => &mut dry_run,
            };
            rule.check(change, caller.as_ref(), sink);
        }
        Decision {
            violations: enforced.kept,
            dry_run_violations: dry_run.kept,
            violations_omitted: enforced.omitted,
            dry_run_violations_omitted: dry_run.omitted,
        }
    }
}

#[cfg(test)]
mod tests;
