//! Step 4 of the pipeline: the one place that turns a verdict into the audit record, the
//! metrics and the answer. Both serving paths call it; nothing else writes to the audit log,
//! counts a request or builds an answer of the proxy's own.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::answer::ProxyError;
use crate::audit::{timestamp, AuditError, AuditLog};
use crate::decide::{Judgement, Refusal};
use crate::kms::answer::KmsAnswer;
use crate::kms::Tag;
use crate::metrics::{Class, Metrics, Outcome};
use crate::policy::Violation;
use crate::text::bounded;

/// How many tags (set or removed) a decision record lists; the rest are counted.
pub const MAX_RECORDED_TAGS: usize = 50;
/// The longest key a record shows, in characters (KMS allows 128).
const MAX_KEY_CHARS: usize = 256;
/// The longest value a record shows, in characters (KMS allows 256).
const MAX_VALUE_CHARS: usize = 512;

/// A fresh request id: the audit record's and the answer's `x-amzn-RequestId`.
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// An answer of the proxy's own, and what became of the request for the metrics.
pub struct Handled {
    pub response: Response<Full<Bytes>>,
    pub operation: &'static str,
    pub outcome: Outcome,
}

impl Handled {
    /// The answer `error`, with its request id.
    pub fn error(error: ProxyError, operation: &'static str, request_id: &str) -> Handled {
        Handled {
            outcome: error.outcome(),
            response: error.into_response(request_id),
            operation,
        }
    }
}

/// Which path a request for `operation` takes, for the metrics: inspected for the operations
/// that change tags.
pub fn class_of(operation: &str) -> Class {
    if crate::kms::TagOperation::from_name(operation).is_some() {
        Class::inspect
    } else {
        Class::pass
    }
}

/// Counts a finished request: once per request, whichever way it went.
pub fn finished(
    metrics: &Metrics,
    operation: &'static str,
    outcome: Outcome,
    class: Class,
    started: Instant,
) {
    metrics.request(operation, outcome, class, started.elapsed().as_secs_f64());
}

/// Writes the decision record of a judged tag change. `Err` is the answer when the change may
/// not be forwarded: denied, or (with `fail_closed`) not audited.
pub async fn decision(
    audit: &AuditLog,
    request_id: &str,
    operation: &'static str,
    source: SocketAddr,
    judgement: &Judgement,
) -> Result<(), Handled> {
    let record = DecisionRecord::new(request_id, operation, Some(source), judgement);
    if let Err(error) = audit.write(&record).await {
        // The audit log says it once per stall or failing spell, not once per request.
        debug!(%request_id, %error, "decision record not written");
        if audit.fail_closed {
            let refusal = ProxyError::AuditUnavailable;
            if matches!(error, AuditError::Stalled(_)) {
                // The decision may still reach the log later: say what became of the request.
                outcome(audit, request_id, Instant::now(), Err(&refusal));
            }
            return Err(Handled::error(refusal, operation, request_id));
        }
    }
    if !judgement.allowed() {
        info!(%request_id, operation, "tag change denied");
        let alias = crate::kms::TagOperation::from_name(operation).is_some_and(|op| op.is_alias());
        let error = match (judgement.change.is_some(), alias) {
            (true, false) => ProxyError::Denied(judgement.decision.denial_message()),
            (false, false) => {
                ProxyError::Unreadable(judgement.decision.violations[0].message.clone())
            }
            (true, true) => ProxyError::AliasDenied(judgement.decision.denial_message()),
            (false, true) => {
                ProxyError::AliasUnreadable(judgement.decision.violations[0].message.clone())
            }
        };
        return Err(Handled::error(error, operation, request_id));
    }
    Ok(())
}

/// Answers a refusal, recording it first as a `deny` decision when it may be a tag change.
/// With `fail_closed`, a refusal whose record cannot be written is answered 503 like any
/// other tag change.
pub async fn refusal(audit: &AuditLog, source: SocketAddr, refusal: Refusal) -> Handled {
    let request_id = new_request_id();
    let Refusal {
        answer,
        operation,
        record,
    } = refusal;
    let Some((judgement, target)) = record else {
        debug!(%request_id, %answer, "request refused");
        return Handled::error(answer, operation, &request_id);
    };
    let record = DecisionRecord::new(&request_id, &target, Some(source), &judgement);
    if let Err(error) = audit.write(&record).await {
        debug!(%request_id, %error, "decision record not written");
        if audit.fail_closed {
            return Handled::error(ProxyError::AuditUnavailable, operation, &request_id);
        }
    }
    info!(%request_id, operation = target, %answer, "request refused");
    Handled::error(answer, operation, &request_id)
}

/// Queues the outcome record of a forwarded tag change (never waits for the audit log).
pub fn outcome(
    audit: &AuditLog,
    request_id: &str,
    started: Instant,
    result: Result<KmsAnswer<'_>, &ProxyError>,
) {
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (upstream_status, aws_request_id, aws_error, applied, error) = match result {
        Ok(answer) => {
            let applied = applied_by_status(answer.status);
            (
                Some(answer.status),
                answer.aws_request_id.clone(),
                answer.error_type(),
                applied,
                None,
            )
        }
        Err(error) => {
            // Not forwarded because the audit log stalls: that is logged once per stall.
            if *error != ProxyError::AuditUnavailable {
                warn!(%request_id, %error, "forwarding a tag change failed");
            }
            let (_, error_type, _) = error.shape();
            (
                None,
                None,
                Some(error_type.to_owned()),
                applied(error),
                Some(error.to_string()),
            )
        }
    };
    let record = OutcomeRecord {
        ts: timestamp(),
        event: "outcome",
        request_id,
        upstream_status,
        aws_request_id: aws_request_id.as_deref(),
        aws_error: aws_error.as_deref(),
        applied,
        duration_ms: (duration_ms * 1000.0).round() / 1000.0,
        error: error.as_deref(),
    };
    if let Err(error) = audit.write_detached(&record) {
        debug!(%request_id, %error, "outcome record not written");
    }
}

/// Queues the outcome record of a forwarded tag change whose answer head arrived (`head`, without
/// a body) and whose body then broke off with `error`: the status says what KMS did.
pub fn outcome_after_head(
    audit: &AuditLog,
    request_id: &str,
    started: Instant,
    head: KmsAnswer<'_>,
    error: &ProxyError,
) {
    warn!(%request_id, status = head.status, %error, "the answer to a forwarded tag change broke off after its head");
    let (aws_error, message) = (head.error_type(), error.to_string());
    let record = OutcomeRecord {
        ts: timestamp(),
        event: "outcome",
        request_id,
        upstream_status: Some(head.status),
        aws_request_id: head.aws_request_id.as_deref(),
        aws_error: aws_error.as_deref(),
        applied: applied_by_status(head.status),
        duration_ms: (started.elapsed().as_secs_f64() * 1_000_000.0).round() / 1000.0,
        error: Some(&message),
    };
    if let Err(error) = audit.write_detached(&record) {
        debug!(%request_id, %error, "outcome record not written");
    }
}

/// What KMS's status says of a change: applied on success, not on a client error.
fn applied_by_status(status: u16) -> Applied {
    match status {
        200..=299 => Applied::Yes,
        400..=499 => Applied::No,
        _ => Applied::Unknown,
    }
}

/// Whether a tag change answered with `error` may have been applied by KMS: only when it was sent
/// and no answer says what became of it.
fn applied(error: &ProxyError) -> Applied {
    match error {
        ProxyError::UpstreamBroken(_) | ProxyError::UpstreamTimeout(_) => Applied::Unknown,
        _ => Applied::No,
    }
}

/// A tag as a record shows it.
#[derive(Debug, Serialize)]
pub struct RecordedTag<'a> {
    pub key: Cow<'a, str>,
    pub value: Cow<'a, str>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The record written before a tag-bearing request is forwarded or answered.
#[derive(Debug, Serialize)]
pub struct DecisionRecord<'a> {
    pub ts: String,
    pub event: &'static str,
    pub request_id: &'a str,
    pub operation: &'a str,
    pub key_id: Option<Cow<'a, str>>,
    /// The `AliasName` of CreateAlias, UpdateAlias and DeleteAlias (absent for tag operations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<Cow<'a, str>>,
    /// The `TargetKeyId` of CreateAlias and UpdateAlias: the key the alias is to point at (absent
    /// for other operations; DeleteAlias names no key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_key_id: Option<Cow<'a, str>>,
    pub region: Option<&'a str>,
    pub access_key_id: Option<&'a str>,
    pub source: Option<SocketAddr>,
    /// The SDK's `amz-sdk-invocation-id`: the same for every attempt of one call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invocation_id: Option<&'a str>,
    /// The attempt number from `amz-sdk-request`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    pub set: Vec<RecordedTag<'a>>,
    pub remove: Vec<Cow<'a, str>>,
    /// Tags set past the first [`MAX_RECORDED_TAGS`], counted, not listed.
    #[serde(skip_serializing_if = "is_zero")]
    pub set_omitted: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub remove_omitted: usize,
    pub decision: &'static str,
    pub violations: &'a [Violation],
    pub dry_run_violations: &'a [Violation],
    #[serde(skip_serializing_if = "is_zero")]
    pub violations_omitted: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub dry_run_violations_omitted: usize,
}

impl<'a> DecisionRecord<'a> {
    pub fn new(
        request_id: &'a str,
        operation: &'a str,
        source: Option<SocketAddr>,
        judgement: &'a Judgement,
    ) -> DecisionRecord<'a> {
        let change = judgement.change.as_ref();
        let credential = judgement.credential.as_ref();
        let names_target =
            crate::kms::TagOperation::from_name(operation).is_some_and(|op| op.has_target_key_id());
        let set: &[Tag] = change.map_or(&[], |c| &c.set);
        let remove: &[String] = change.map_or(&[], |c| &c.remove);
        DecisionRecord {
            ts: timestamp(),
            event: "decision",
            request_id,
            operation,
            key_id: judgement
                .key_id
                .as_deref()
                .map(|k| bounded(k, MAX_VALUE_CHARS)),
            alias: judgement
                .alias
                .as_deref()
                .map(|a| bounded(a, MAX_VALUE_CHARS)),
            target_key_id: judgement
                .key_id
                .as_deref()
                .filter(|_| names_target)
                .map(|k| bounded(k, MAX_VALUE_CHARS)),
            region: credential.and_then(|c| c.region.as_deref()),
            access_key_id: credential.map(|c| c.access_key_id.as_str()),
            source,
            invocation_id: judgement.call.invocation_id.as_deref(),
            attempt: judgement.call.attempt,
            set: set
                .iter()
                .take(MAX_RECORDED_TAGS)
                .map(|t| RecordedTag {
                    key: bounded(&t.key, MAX_KEY_CHARS),
                    value: bounded(&t.value, MAX_VALUE_CHARS),
                })
                .collect(),
            remove: remove
                .iter()
                .take(MAX_RECORDED_TAGS)
                .map(|k| bounded(k, MAX_KEY_CHARS))
                .collect(),
            set_omitted: set.len().saturating_sub(MAX_RECORDED_TAGS),
            remove_omitted: remove.len().saturating_sub(MAX_RECORDED_TAGS),
            decision: if judgement.decision.allowed() {
                "allow"
            } else {
                "deny"
            },
            violations: &judgement.decision.violations,
            dry_run_violations: &judgement.decision.dry_run_violations,
            violations_omitted: judgement.decision.violations_omitted,
            dry_run_violations_omitted: judgement.decision.dry_run_violations_omitted,
        }
    }
}

/// Whether KMS applied a forwarded change, as far as the proxy can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Applied {
    /// KMS answered with success.
    Yes,
    /// KMS answered with a client error, or the request never reached it whole.
    No,
    /// The request reached KMS, and no answer (or a server error) says what it did: KMS may or
    /// may not have applied the change; `ListResourceTags` tells.
    Unknown,
}

/// The record written when the upstream answered a forwarded request, or failed to.
#[derive(Debug, Serialize)]
pub struct OutcomeRecord<'a> {
    pub ts: String,
    pub event: &'static str,
    pub request_id: &'a str,
    pub upstream_status: Option<u16>,
    pub aws_request_id: Option<&'a str>,
    /// The KMS error type (`__type`) of an error answer; for a failed forward, the error the proxy
    /// answered with (`BadGateway`, `GatewayTimeout`).
    pub aws_error: Option<&'a str>,
    /// Whether KMS applied the change: `yes`, `no` or `unknown`.
    pub applied: Applied,
    pub duration_ms: f64,
    /// Why the forward failed, when it did.
    pub error: Option<&'a str>,
}
