//! Step 4 of the pipeline: the one place that turns a verdict into the audit record, the
//! metrics and the answer. Both serving paths call it; nothing else writes to the audit log,
//! counts a request or builds an answer of the proxy's own.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::answer::ProxyError;
use crate::audit::{json_name, json_str, timestamp, AuditLog, OutcomeSlot, Record};
use crate::decide::{Judgement, Refusal};
use crate::kms::answer::KmsAnswer;
use crate::kms::Tag;
use crate::metrics::{Class, Metrics, Outcome};
use crate::policy::Violation;
use crate::text::{bounded, push_decimal};

/// How many tags (set or removed) a decision record lists; the rest are counted.
pub const MAX_RECORDED_TAGS: usize = 50;
/// The longest key a record shows, in characters (KMS allows 128).
const MAX_KEY_CHARS: usize = 256;
/// The longest value (or key id) a record shows, in characters (KMS allows 256).
const MAX_VALUE_CHARS: usize = 512;
/// The longest region a record shows, in characters (AWS regions are under 30).
const MAX_REGION_CHARS: usize = 64;
/// The longest access key id, operation, rule id, KMS request id or error type a record shows.
const MAX_ID_CHARS: usize = 128;
/// The longest message (a violation, a failed forward) a record shows.
const MAX_MESSAGE_CHARS: usize = 1024;
/// The longest caller a record shows whole, in characters: the longest identity the listener
/// takes (an identity is ASCII, so as many bytes), so a caller is never cut.
const MAX_CALLER_CHARS: usize = crate::identity::MAX_CALLER_BYTES;
/// The longest error (why a forward failed) an outcome record shows, in characters: with the
/// longest caller and KMS's request id and error type, at 6 bytes a character at worst, an
/// outcome stays within [`crate::audit::OUTCOME_RESERVE_BYTES`].
const MAX_OUTCOME_ERROR_CHARS: usize = 640;

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

/// A tag change whose decision is recorded and which may be forwarded: its `outcome` record is
/// still to come, and its place in the audit queue is held for it. [`outcome`] records what
/// became of it; dropped without that (the shutdown grace period ended while KMS had it, or its
/// task was cancelled), it records `applied: "unknown"`, so no forwarded change is left without
/// an outcome.
pub struct OpenChange {
    audit: Arc<AuditLog>,
    /// The place held in the queue; `None` when the decision never got into it (only with
    /// `fail_closed = false`), and the outcome then takes its chance like any record.
    slot: Option<OutcomeSlot>,
    request_id: String,
    /// The caller's workload identity, for the outcome record.
    caller: Option<Arc<str>>,
    started: Instant,
    open: bool,
    /// Still waiting for its decision record: not forwarded.
    deciding: bool,
}

impl OpenChange {
    pub fn request_id(&self) -> &str {
        &self.request_id
    }
}

impl Drop for OpenChange {
    fn drop(&mut self) {
        if self.open {
            self.open = false;
            let why = if self.deciding {
                ProxyError::AuditUnavailable
            } else {
                ProxyError::ShutDown
            };
            let record = outcome_record(
                &self.request_id,
                self.caller.as_deref(),
                self.started,
                Err(&why),
            );
            write_outcome(&self.audit, self.slot.take(), &record);
        }
    }
}

/// Writes the decision record of a judged tag change, and holds the place of its outcome record
/// when it may be forwarded. `Err` is the answer when the change may not be forwarded: denied,
/// or (with `fail_closed`) not audited; a change refused because its decision record was not
/// written in time, but was queued, gets an outcome record saying it was not forwarded.
pub async fn decision(
    audit: &Arc<AuditLog>,
    request_id: &str,
    operation: &'static str,
    source: SocketAddr,
    judgement: &Judgement,
    started: Instant,
) -> Result<OpenChange, Handled> {
    let record = DecisionRecord::new(request_id, operation, Some(source), judgement);
    let (queued, slot) = match audit.queue_holding(&record, judgement.allowed()) {
        Ok((queued, slot)) => (Ok(queued), slot),
        Err(error) => (Err(error), None),
    };
    let mut change = OpenChange {
        audit: Arc::clone(audit),
        slot,
        request_id: request_id.to_owned(),
        caller: judgement.caller.clone(),
        started,
        open: judgement.allowed(),
        deciding: true,
    };
    // Dropped while it waits for its decision record (the grace period ended), the change was
    // not forwarded, and its outcome says so.
    let written = match queued {
        Ok(queued) => audit.written(queued).await,
        Err(error) => Err(error),
    };
    change.deciding = false;
    if written.is_ok() {
        if let Some(slot) = &mut change.slot {
            slot.decision_written();
        }
    }
    if let Err(error) = written {
        // The audit log says it once per stall or failing spell, not once per request.
        debug!(%request_id, %error, "decision record not written");
        if audit.fail_closed {
            let refusal = ProxyError::AuditUnavailable;
            if change.slot.is_some() {
                // The decision reaches the log later: say what became of the request.
                outcome(change, Err(&refusal));
            } else {
                change.open = false;
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
    Ok(change)
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

/// Records the outcome of a forwarded tag change (in the place its decision held: never waits
/// for the audit log, never finds its queue full).
pub fn outcome(mut change: OpenChange, result: Result<KmsAnswer<'_>, &ProxyError>) {
    change.open = false;
    let record = outcome_record(
        &change.request_id,
        change.caller.as_deref(),
        change.started,
        result,
    );
    write_outcome(&change.audit, change.slot.take(), &record);
}

fn write_outcome(audit: &AuditLog, slot: Option<OutcomeSlot>, record: &OutcomeRecord<'_>) {
    let written = match slot {
        Some(slot) => slot.write(record),
        None => audit.write_detached(record),
    };
    if let Err(error) = written {
        debug!(request_id = record.request_id, %error, "outcome record not written");
    }
}

/// The outcome record of a forwarded change, every string in it bounded.
fn outcome_record<'a>(
    request_id: &'a str,
    caller: Option<&'a str>,
    started: Instant,
    result: Result<KmsAnswer<'_>, &ProxyError>,
) -> OutcomeRecord<'a> {
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (upstream_status, aws_request_id, aws_error, applied, error) = match result {
        Ok(answer) => {
            let applied = applied_by_status(answer.status);
            (
                Some(answer.status),
                answer
                    .aws_request_id
                    .as_deref()
                    .map(bounded_owned(MAX_ID_CHARS)),
                answer
                    .error_type()
                    .as_deref()
                    .map(bounded_owned(MAX_ID_CHARS)),
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
                Some(outcome_error(error)),
            )
        }
    };
    OutcomeRecord {
        ts: timestamp(),
        event: "outcome",
        request_id,
        caller: caller.map(|c| bounded(c, MAX_CALLER_CHARS)),
        upstream_status,
        aws_request_id,
        aws_error,
        applied,
        duration_ms: (duration_ms * 1000.0).round() / 1000.0,
        error,
    }
}

/// Why a forward failed, as an outcome record shows it.
fn outcome_error(error: &ProxyError) -> String {
    bounded(&error.to_string(), MAX_OUTCOME_ERROR_CHARS).into_owned()
}

/// Records the outcome of a forwarded tag change whose answer head arrived (`head`, without a
/// body) and whose body then broke off with `error`: the status says what KMS did.
pub fn outcome_after_head(mut change: OpenChange, head: KmsAnswer<'_>, error: &ProxyError) {
    change.open = false;
    warn!(request_id = %change.request_id, status = head.status, %error, "the answer to a forwarded tag change broke off after its head");
    let mut record = outcome_record(
        &change.request_id,
        change.caller.as_deref(),
        change.started,
        Ok(head),
    );
    record.error = Some(outcome_error(error));
    write_outcome(&change.audit, change.slot.take(), &record);
}

/// What KMS's status says of a change: applied on success, not on a client error.
fn applied_by_status(status: u16) -> Applied {
    match status {
        200..=299 => Applied::Yes,
        400..=499 => Applied::No,
        _ => Applied::Unknown,
    }
}

fn bounded_owned(max: usize) -> impl Fn(&str) -> String {
    move |s| bounded(s, max).into_owned()
}

/// Whether a tag change answered with `error` may have been applied by KMS: only when it was sent
/// and no answer says what became of it.
fn applied(error: &ProxyError) -> Applied {
    match error {
        ProxyError::UpstreamBroken(_) | ProxyError::UpstreamTimeout(_) | ProxyError::ShutDown => {
            Applied::Unknown
        }
        _ => Applied::No,
    }
}

/// A violation as a record shows it.
#[derive(Debug, Serialize)]
pub struct RecordedViolation<'a> {
    pub rule: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<Cow<'a, str>>,
    pub message: Cow<'a, str>,
}

impl<'a> RecordedViolation<'a> {
    fn of(violations: &'a [Violation]) -> Vec<RecordedViolation<'a>> {
        violations
            .iter()
            .map(|v| RecordedViolation {
                rule: bounded(&v.rule, MAX_ID_CHARS),
                key: v.key.as_deref().map(|k| bounded(k, MAX_KEY_CHARS)),
                message: bounded(&v.message, MAX_MESSAGE_CHARS),
            })
            .collect()
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

/// The record written before a tag-bearing request is forwarded or answered. Every string in
/// it that a client chose is cut to a bound, so that, with its lists cut too, it stays well
/// under [`crate::audit::MAX_RECORD_BYTES`] however long the client's strings.
#[derive(Debug, Serialize)]
pub struct DecisionRecord<'a> {
    pub ts: String,
    pub event: &'static str,
    pub request_id: &'a str,
    pub operation: Cow<'a, str>,
    pub key_id: Option<Cow<'a, str>>,
    /// The `AliasName` of CreateAlias, UpdateAlias and DeleteAlias (absent for tag operations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<Cow<'a, str>>,
    /// The `TargetKeyId` of CreateAlias and UpdateAlias: the key the alias is to point at (absent
    /// for other operations; DeleteAlias names no key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_key_id: Option<Cow<'a, str>>,
    pub region: Option<Cow<'a, str>>,
    pub access_key_id: Option<Cow<'a, str>>,
    /// The caller's workload identity: the SPIFFE ID (or DNS name) of the connection's verified
    /// client certificate (absent without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<Cow<'a, str>>,
    pub source: Option<SocketAddr>,
    /// The SHA-256 of the configuration whose policy was in force for the request: the
    /// `kms_tag_guard_policy_info{sha256}` of that policy, even when a reload landed before the
    /// record was written.
    pub policy_sha256: Option<&'a str>,
    /// The SDK's `amz-sdk-invocation-id`: the same for every attempt of one call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invocation_id: Option<Cow<'a, str>>,
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
    pub violations: Vec<RecordedViolation<'a>>,
    pub dry_run_violations: Vec<RecordedViolation<'a>>,
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
            operation: bounded(operation, MAX_ID_CHARS),
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
            region: credential
                .and_then(|c| c.region.as_deref())
                .map(|r| bounded(r, MAX_REGION_CHARS)),
            access_key_id: credential.map(|c| bounded(&c.access_key_id, MAX_ID_CHARS)),
            caller: judgement
                .caller
                .as_deref()
                .map(|c| bounded(c, MAX_CALLER_CHARS)),
            source,
            policy_sha256: judgement.policy_sha256.as_deref(),
            invocation_id: judgement
                .call
                .invocation_id
                .as_deref()
                .map(|i| bounded(i, MAX_ID_CHARS)),
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
            violations: RecordedViolation::of(&judgement.decision.violations),
            dry_run_violations: RecordedViolation::of(&judgement.decision.dry_run_violations),
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
    /// The caller's workload identity, as in the decision record (absent without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<Cow<'a, str>>,
    pub upstream_status: Option<u16>,
    pub aws_request_id: Option<String>,
    /// The KMS error type (`__type`) of an error answer; for a failed forward, the error the proxy
    /// answered with (`BadGateway`, `GatewayTimeout`).
    pub aws_error: Option<String>,
    /// Whether KMS applied the change: `yes`, `no` or `unknown`.
    pub applied: Applied,
    pub duration_ms: f64,
    /// Why the forward failed, when it did.
    pub error: Option<String>,
}

/// The members of a JSON object written by hand, a comma before each but the first.
struct Members<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

impl<'o> Members<'o> {
    fn open(out: &'o mut Vec<u8>) -> Members<'o> {
        out.push(b'{');
        Members { out, first: true }
    }

    fn name(&mut self, name: &str) -> &mut Vec<u8> {
        if !std::mem::take(&mut self.first) {
            self.out.push(b',');
        }
        json_name(self.out, name);
        self.out
    }

    fn str(&mut self, name: &str, value: &str) {
        json_str(self.name(name), value);
    }

    fn opt_str(&mut self, name: &str, value: Option<&str>) {
        match value {
            Some(value) => self.str(name, value),
            None => self.name(name).extend_from_slice(b"null"),
        }
    }

    fn number(&mut self, name: &str, value: impl Into<u64>) {
        push_decimal(self.name(name), value.into());
    }

    fn close(self) {
        self.out.push(b'}');
    }
}

fn violations_json(out: &mut Vec<u8>, violations: &[RecordedViolation<'_>]) {
    out.push(b'[');
    for (i, RecordedViolation { rule, key, message }) in violations.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let mut members = Members::open(out);
        members.str("rule", rule);
        if let Some(key) = key {
            members.str("key", key);
        }
        members.str("message", message);
        members.close();
    }
    out.push(b']');
}

/// Written by hand, as serde_json writes it (`the_records_write_what_serde_json_writes`). Every
/// member is named here: a member added to the struct does not compile until it is written.
impl Record for DecisionRecord<'_> {
    fn write_json(&self, out: &mut Vec<u8>) {
        let DecisionRecord {
            ts,
            event,
            request_id,
            operation,
            key_id,
            alias,
            target_key_id,
            region,
            access_key_id,
            caller,
            source,
            policy_sha256,
            invocation_id,
            attempt,
            set,
            remove,
            set_omitted,
            remove_omitted,
            decision,
            violations,
            dry_run_violations,
            violations_omitted,
            dry_run_violations_omitted,
        } = self;
        let mut m = Members::open(out);
        m.str("ts", ts);
        m.str("event", event);
        m.str("request_id", request_id);
        m.str("operation", operation);
        m.opt_str("key_id", key_id.as_deref());
        if let Some(alias) = alias {
            m.str("alias", alias);
        }
        if let Some(target_key_id) = target_key_id {
            m.str("target_key_id", target_key_id);
        }
        m.opt_str("region", region.as_deref());
        m.opt_str("access_key_id", access_key_id.as_deref());
        if let Some(caller) = caller {
            m.str("caller", caller);
        }
        // serde writes an address as its Display text: `a.b.c.d:port`, `[v6]:port`.
        match source {
            Some(SocketAddr::V4(v4)) => {
                let out = m.name("source");
                out.push(b'"');
                for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    push_decimal(out, octet.into());
                }
                out.push(b':');
                push_decimal(out, v4.port().into());
                out.push(b'"');
            }
            Some(v6) => m.str("source", &v6.to_string()),
            None => m.name("source").extend_from_slice(b"null"),
        }
        m.opt_str("policy_sha256", *policy_sha256);
        if let Some(invocation_id) = invocation_id {
            m.str("invocation_id", invocation_id);
        }
        if let Some(attempt) = attempt {
            m.number("attempt", *attempt);
        }
        let out = m.name("set");
        out.push(b'[');
        for (i, RecordedTag { key, value }) in set.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let mut tag = Members::open(out);
            tag.str("key", key);
            tag.str("value", value);
            tag.close();
        }
        out.push(b']');
        let out = m.name("remove");
        out.push(b'[');
        for (i, key) in remove.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, key);
        }
        out.push(b']');
        if *set_omitted != 0 {
            m.number("set_omitted", *set_omitted as u64);
        }
        if *remove_omitted != 0 {
            m.number("remove_omitted", *remove_omitted as u64);
        }
        m.str("decision", decision);
        violations_json(m.name("violations"), violations);
        violations_json(m.name("dry_run_violations"), dry_run_violations);
        if *violations_omitted != 0 {
            m.number("violations_omitted", *violations_omitted as u64);
        }
        if *dry_run_violations_omitted != 0 {
            m.number(
                "dry_run_violations_omitted",
                *dry_run_violations_omitted as u64,
            );
        }
        m.close();
    }
}

/// Written by hand, as serde_json writes it (`the_records_write_what_serde_json_writes`).
impl Record for OutcomeRecord<'_> {
    fn write_json(&self, out: &mut Vec<u8>) {
        let OutcomeRecord {
            ts,
            event,
            request_id,
            caller,
            upstream_status,
            aws_request_id,
            aws_error,
            applied,
            duration_ms,
            error,
        } = self;
        let mut m = Members::open(out);
        m.str("ts", ts);
        m.str("event", event);
        m.str("request_id", request_id);
        if let Some(caller) = caller {
            m.str("caller", caller);
        }
        match upstream_status {
            Some(status) => m.number("upstream_status", *status),
            None => m.name("upstream_status").extend_from_slice(b"null"),
        }
        m.opt_str("aws_request_id", aws_request_id.as_deref());
        m.opt_str("aws_error", aws_error.as_deref());
        m.str(
            "applied",
            match applied {
                Applied::Yes => "yes",
                Applied::No => "no",
                Applied::Unknown => "unknown",
            },
        );
        // serde_json's own float text (ryu; `null` when not finite).
        serde_json::to_writer(m.name("duration_ms"), duration_ms).expect("a float serialises");
        m.opt_str("error", error.as_deref());
        m.close();
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::audit::{encode, MAX_RECORD_BYTES, OUTCOME_RESERVE_BYTES};
    use crate::decide::SdkCall;
    use crate::kms::{Credential, TagChange, TagOperation};
    use crate::policy::Decision;

    /// Characters that cost the most in a JSON line: escaped controls, quotes, backslashes, the
    /// line separators escaped as `\u2028`, `\u0085`, four-byte characters.
    fn costly() -> impl Strategy<Value = String> {
        let chars = prop::sample::select(vec![
            'a', '"', '\\', '\u{1}', '\n', '\u{85}', '\u{2028}', '\u{2029}', 'é', '😀', '…',
        ]);
        (prop::collection::vec(chars, 1..64), 0usize..70_000)
            .prop_map(|(unit, len)| unit.iter().cycle().take(len.max(1)).collect::<String>())
    }

    /// The costliest outcome: the longest caller the listener gives, KMS's request id and error
    /// type and the error all of characters a line escapes in 6 bytes.
    #[test]
    fn the_costliest_outcome_fits_its_reserve() {
        let caller = format!("spiffe://example.org/{}", "a".repeat(2048 - 21));
        assert_eq!(
            crate::identity::check_caller(&caller),
            Ok(crate::identity::CallerKind::Spiffe)
        );
        let worst = "\u{1}".repeat(4096);
        let answer = KmsAnswer {
            status: 400,
            aws_request_id: Some(worst.clone()),
            aws_error_header: Some(worst.clone()),
            body: b"",
        };
        let id = new_request_id();
        let mut record = outcome_record(&id, Some(&caller), Instant::now(), Ok(answer));
        record.error = Some(outcome_error(&ProxyError::UpstreamBroken(worst.clone())));
        let line = encode(&record);
        assert!(line.len() <= OUTCOME_RESERVE_BYTES, "{} bytes", line.len());
        let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            parsed["caller"],
            caller.as_str(),
            "the longest caller is shown whole"
        );
    }

    /// A caller as the listener gives one, up to and past the longest (2048 bytes).
    fn caller() -> impl Strategy<Value = String> {
        (0usize..2100).prop_map(|n| format!("spiffe://example.org/{}", "a".repeat(n)))
    }

    fn violation(rule: &str, key: &str, message: &str) -> Violation {
        Violation {
            rule: rule.into(),
            key: Some(key.to_owned()),
            message: message.to_owned(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Whatever a client puts in its strings (region, access key id, key id, tag keys and
        /// values, the SDK's invocation id, the target of a refused request), the decision
        /// record is one line of at most 64 KiB that parses; so is the outcome, within the place
        /// its decision held for it.
        #[test]
        fn records_stay_bounded_whatever_the_strings(
            region in costly(),
            access_key in costly(),
            key_id in costly(),
            tag in costly(),
            target in costly(),
            tags in 0usize..80,
            violations in 0usize..40,
            caller in caller(),
        ) {
            let set: Vec<Tag> = (0..tags)
                .map(|i| Tag { key: format!("{i}{tag}"), value: tag.clone() })
                .collect();
            let judgement = Judgement {
                change: Some(TagChange {
                    operation: TagOperation::TagResource,
                    key_id: Some(key_id.clone()),
                    set,
                    remove: vec![tag.clone(); tags],
                    alias: None,
                }),
                credential: Some(Credential {
                    access_key_id: access_key.clone(),
                    region: Some(region.clone()),
                }),
                key_id: Some(key_id.clone()),
                alias: None,
                call: SdkCall { invocation_id: Some(tag.clone()), attempt: Some(3) },
                decision: Decision {
                    violations: vec![violation(&tag, &tag, &tag); violations],
                    dry_run_violations: vec![violation(&region, &key_id, &tag); violations],
                    violations_omitted: 7,
                    dry_run_violations_omitted: 0,
                },
                policy_sha256: Some("ab".repeat(32).into()),
                caller: Some(target.as_str().into()),
            };
            let record = DecisionRecord::new("id", &target, None, &judgement);
            let line = encode(&record);
            prop_assert!(line.len() <= MAX_RECORD_BYTES, "{} bytes", line.len());
            prop_assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
            prop_assert_eq!(&parsed["event"], "decision");
            prop_assert_eq!(&parsed["policy_sha256"], &"ab".repeat(32));
            // Every string is bounded by the record itself: at worst its lists are summarised,
            // it never falls back to the last resort (which leaves the lists out).
            prop_assert!(parsed["set"].is_array() && parsed["violations"].is_array());

            let answer = || KmsAnswer {
                status: 400,
                aws_request_id: Some(access_key.clone()),
                aws_error_header: Some(region.clone()),
                body: b"",
            };
            let broken = ProxyError::UpstreamBroken(key_id.clone());
            for result in [Ok(answer()), Err(&broken)] {
                let line = encode(&outcome_record("id", Some(&caller), Instant::now(), result));
                prop_assert!(line.len() <= OUTCOME_RESERVE_BYTES, "{} bytes", line.len());
                serde_json::from_slice::<serde_json::Value>(&line).unwrap();
            }
            // An answer whose body broke off after its head (`outcome_after_head`).
            let mut record = outcome_record("id", Some(&caller), Instant::now(), Ok(answer()));
            record.error = Some(outcome_error(&broken));
            let line = encode(&record);
            prop_assert!(line.len() <= OUTCOME_RESERVE_BYTES, "{} bytes", line.len());
        }

        /// The records written by hand are byte for byte what serde_json writes from their
        /// `Serialize`, whatever the strings, the lists, the absent members and the numbers.
        #[test]
        fn the_records_write_what_serde_json_writes(
            strings in prop::collection::vec(any::<String>(), 8),
            costly_string in costly(),
            tags in 0usize..4,
            removed in 0usize..3,
            violations in 0usize..3,
            omitted in prop_oneof![0usize..3, any::<u32>().prop_map(|n| n as usize)],
            present in any::<[bool; 8]>(),
            attempt in any::<u32>(),
            status in any::<u16>(),
            duration in prop_oneof![any::<f64>(), 0.0..100_000.0, Just(f64::NAN)],
            v6 in any::<bool>(),
            v4 in any::<(u32, u16)>(),
        ) {
            let s = |i: usize| -> &str { if i == 8 { &costly_string } else { &strings[i] } };
            let cow = |i: usize| Cow::Borrowed(s(i));
            let pick = |on: bool, i: usize| on.then(|| cow(i));
            let source: SocketAddr = if v6 {
                "[2001:db8::1]:443".parse().unwrap()
            } else {
                (std::net::Ipv4Addr::from(v4.0), v4.1).into()
            };
            let recorded = |n: usize| -> Vec<RecordedViolation<'_>> {
                (0..n)
                    .map(|i| RecordedViolation {
                        rule: cow(i % 9),
                        key: pick(i % 2 == 0, (i + 3) % 9),
                        message: cow(8),
                    })
                    .collect()
            };
            let record = DecisionRecord {
                ts: s(0).to_owned(),
                event: "decision",
                request_id: s(1),
                operation: cow(2),
                key_id: pick(present[0], 8),
                alias: pick(present[1], 3),
                target_key_id: pick(present[2], 4),
                region: pick(present[3], 5),
                access_key_id: pick(present[4], 6),
                caller: pick(present[5], 8),
                source: present[5].then_some(source),
                policy_sha256: present[6].then(|| s(7)),
                invocation_id: pick(present[7], 8),
                attempt: present[0].then_some(attempt),
                set: (0..tags)
                    .map(|i| RecordedTag { key: cow(i % 9), value: cow((i + 1) % 9) })
                    .collect(),
                remove: (0..removed).map(|i| cow((i + 5) % 9)).collect(),
                set_omitted: omitted,
                remove_omitted: omitted * 2,
                decision: if present[1] { "allow" } else { "deny" },
                violations: recorded(violations),
                dry_run_violations: recorded(violations / 2),
                violations_omitted: omitted,
                dry_run_violations_omitted: omitted / 2,
            };
            let mut by_hand = Vec::new();
            record.write_json(&mut by_hand);
            prop_assert_eq!(
                String::from_utf8(by_hand).unwrap(),
                serde_json::to_string(&record).unwrap()
            );

            let outcome = OutcomeRecord {
                ts: s(0).to_owned(),
                event: "outcome",
                request_id: s(1),
                caller: pick(present[6], 8),
                upstream_status: present[2].then_some(status),
                aws_request_id: present[3].then(|| s(8).to_owned()),
                aws_error: present[4].then(|| s(4).to_owned()),
                applied: [Applied::Yes, Applied::No, Applied::Unknown][tags % 3],
                duration_ms: duration,
                error: present[5].then(|| s(5).to_owned()),
            };
            let mut by_hand = Vec::new();
            outcome.write_json(&mut by_hand);
            prop_assert_eq!(
                String::from_utf8(by_hand).unwrap(),
                serde_json::to_string(&outcome).unwrap()
            );
        }
    }
}
