//! The organisation's tag rules, compiled once, and their evaluation.
//!
//! Pure: no I/O, no async, no HTTP. `evaluate` turns a [`TagChange`] and its [`Context`] into a
//! [`Decision`] that lists every violation, so one denial tells the caller everything to fix.

mod rules;

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;

pub use rules::{KeyMatcher, Rule, RuleKind, ValueMatcher};

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

/// A compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub mode: Mode,
    pub max_tags: usize,
    pub unknown_operations: UnknownOperations,
    pub rules: Vec<Rule>,
}

/// Who asks, from where; everything a rule may look at besides the change itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context<'a> {
    pub access_key_id: Option<&'a str>,
    pub region: Option<&'a str>,
    pub source: Option<SocketAddr>,
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
    /// Violations of enforced rules: any one denies the request.
    pub violations: Vec<Violation>,
    /// Violations of rules in dry-run: recorded, not enforced.
    pub dry_run_violations: Vec<Violation>,
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
            dry_run_violations: Vec::new(),
        }
    }

    /// The message of a denial: every violated rule id and tag key.
    pub fn denial_message(&self) -> String {
        let mut message = String::from("kms-tag-guard denied the request: ");
        for (i, v) in self.violations.iter().enumerate() {
            if i > 0 {
                message.push_str("; ");
            }
            message.push_str(&format!("rule {}: {}", v.rule, v.message));
        }
        message
    }
}

impl Policy {
    pub fn evaluate(&self, change: &TagChange, context: &Context) -> Decision {
        let mut decision = Decision::default();
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
                Mode::Enforce => decision.violations.push(violation),
                Mode::DryRun => decision.dry_run_violations.push(violation),
            }
        }
        for rule in &self.rules {
            if !rule.applies_to(change, context) {
                continue;
            }
            let sink = match rule.mode.unwrap_or(self.mode) {
                Mode::Enforce => &mut decision.violations,
                Mode::DryRun => &mut decision.dry_run_violations,
            };
            rule.check(change, sink);
        }
        decision
    }
}

#[cfg(test)]
mod tests;
