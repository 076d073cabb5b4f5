//! Step 3 of the pipeline: the one decision.
//!
//! [`decide`] takes a request's head, its body once it has been read, and the rules in force,
//! and says what the proxy does: stream the request unread, read its body first, forward (or
//! deny) a judged tag change, or refuse it with an answer, recorded or not. Both serving paths,
//! `kms-tag-guard test`, the property tests and the fuzz target call it, so a request is judged
//! by one piece of code wherever it comes from. Pure: no I/O, no clock, no async.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, Uri};

use crate::answer::ProxyError;
use crate::ascii::split_byte;
use crate::config::{Config, UpstreamConfig};
use crate::kms::classify::{
    check_content_encoding, classify, classify_scanned, names_pass_through, request_host_of,
    HeaderScan,
};
use crate::kms::credential::{read_credential, read_credential_of};
use crate::kms::protocol::check_body;
use crate::kms::request::parse_tag_request;
use crate::kms::{Credential, Refused, Route, TagChange, TagOperation, Unreadable};
use crate::policy::{Context, Decision, Policy, UnknownOperations};

/// The metrics label of a request whose operation is not (exactly) one of the model's.
pub const UNKNOWN_OPERATION: &str = "unknown";

/// A request's head, as the proxy received it.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    /// For a request inside an intercepted CONNECT tunnel: the host the tunnel was opened to.
    pub tunnel_host: Option<&'a str>,
    /// The caller's workload identity: the SPIFFE ID (or DNS name) of the verified client
    /// certificate of the connection the request came on. `None` without one.
    pub caller: Option<&'a str>,
}

/// A request's body, as far as it has been read.
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    /// Not read (yet): the decision is made on the head.
    Unread,
    /// Read whole.
    Whole(&'a [u8]),
}

/// What a decision is made against.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub policy: &'a Policy,
    pub upstream: &'a UpstreamConfig,
    /// The largest body of a tag-changing request (`[limits].max_body_bytes`).
    pub max_body_bytes: u64,
}

impl<'a> Rules<'a> {
    /// The rules of a configuration, with its policy (the one it was loaded with).
    pub fn of(config: &'a Config) -> Rules<'a> {
        Rules {
            policy: &config.policy,
            upstream: &config.upstream,
            max_body_bytes: config.limits.max_body_bytes,
        }
    }
}

/// What the proxy does with a request.
#[derive(Debug)]
pub enum Verdict<'a> {
    /// Forward it to `host`, its body streamed unread (and checked for another protocol's shape
    /// as it passes, [`crate::kms::protocol::BodyCheck`]).
    Stream {
        operation: &'static str,
        host: &'a str,
    },
    /// A tag change: read its body (at most `max_body_bytes`), then decide again with it.
    ReadBody { operation: TagOperation },
    /// A tag change, read and judged: forwarded to `host` when the judgement allows it, else
    /// denied; recorded either way.
    Judged {
        operation: TagOperation,
        host: &'a str,
        judgement: Judgement,
    },
    /// Answered now, and never forwarded.
    Refuse(Refusal),
}

/// A request the proxy answers itself before it could judge a change.
#[derive(Debug)]
pub struct Refusal {
    pub answer: ProxyError,
    /// The metrics label: a model operation, or [`UNKNOWN_OPERATION`].
    pub operation: &'static str,
    /// Some reader could take the request for a tag change: it is recorded as a `deny` decision
    /// (rule `request`) with this judgement, under `target`.
    pub record: Option<(Judgement, String)>,
}

/// What the proxy made of one tag-bearing request.
#[derive(Debug, Clone)]
pub struct Judgement {
    /// `None` when the request could not be read.
    pub change: Option<TagChange>,
    pub credential: Option<Credential>,
    /// The `KeyId` the request names: the parsed one, or, for a body refused as unreadable, the
    /// `KeyId` member a plain JSON reading finds (for the record only). For CreateAlias and
    /// UpdateAlias: the `TargetKeyId`.
    pub key_id: Option<String>,
    /// The `AliasName` of an alias operation, read the same way.
    pub alias: Option<String>,
    /// Which SDK call the request is an attempt of, when the SDK says so.
    pub call: SdkCall,
    pub decision: Decision,
    /// The SHA-256 of the configuration whose policy was in force for the request (the one it
    /// loaded, even if a reload landed meanwhile): `policy_sha256` in its record.
    pub policy_sha256: Option<Arc<str>>,
    /// The caller's workload identity ([`Head::caller`]): `caller` in its records.
    pub caller: Option<Arc<str>>,
}

/// The SDK's invocation id (`amz-sdk-invocation-id`, the same for every retry of one call) and
/// attempt number (`amz-sdk-request: attempt=N; max=M`), so the retries of one call can be
/// grouped in the audit log. Only short, printable values are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SdkCall {
    pub invocation_id: Option<String>,
    pub attempt: Option<u32>,
}

impl SdkCall {
    pub fn read(headers: &HeaderMap) -> SdkCall {
        let scan = HeaderScan::of(headers);
        SdkCall::of(scan.invocation_id, scan.sdk_request)
    }

    /// The call named by the first `amz-sdk-invocation-id` and `amz-sdk-request` values.
    fn of(invocation_id: Option<&HeaderValue>, sdk_request: Option<&HeaderValue>) -> SdkCall {
        let invocation_id = invocation_id
            .map(HeaderValue::as_bytes)
            .filter(|v| !v.is_empty() && v.len() <= 64)
            .filter(|v| v.iter().all(u8::is_ascii_graphic))
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned);
        let attempt = sdk_request.and_then(|v| v.to_str().ok()).and_then(|v| {
            // `to_str` lets only visible ASCII and tabs through: trimming ASCII whitespace
            // trims exactly what `str::trim` would.
            split_byte(v, b';')
                .find_map(|p| p.trim_ascii().strip_prefix("attempt="))
                .and_then(|n| n.parse().ok())
        });
        SdkCall {
            invocation_id,
            attempt,
        }
    }
}

impl Judgement {
    /// A request refused before its change could be read.
    pub fn unreadable(reason: impl std::fmt::Display) -> Judgement {
        Judgement {
            change: None,
            credential: None,
            key_id: None,
            alias: None,
            call: SdkCall::default(),
            decision: Decision::unreadable(reason.to_string()),
            policy_sha256: None,
            caller: None,
        }
    }

    /// A request refused before its change could be read, with what its headers say about the
    /// sender (credential scope, SDK call). A credential that cannot be read is left out, and
    /// the query is never read: a request with one is refused by `classify` before any judging,
    /// and what a refused request's query says is not copied into its record.
    pub fn refused(reason: impl std::fmt::Display, head: &Head<'_>, policy: &Policy) -> Judgement {
        let headers = head.headers;
        Judgement {
            caller: head.caller.map(Arc::from),
            credential: read_credential(headers, None).ok().flatten(),
            call: SdkCall::read(headers),
            policy_sha256: Some(Arc::clone(policy.sha256())),
            ..Judgement::unreadable(reason)
        }
    }

    /// Whether the change may be forwarded.
    pub fn allowed(&self) -> bool {
        self.decision.allowed()
    }
}

/// The one decision on a request.
pub fn decide<'a>(head: &Head<'a>, body: Body<'_>, rules: &Rules<'_>) -> Verdict<'a> {
    // The headers every step reads, found in one pass.
    let scan = HeaderScan::of(head.headers);
    let route = match classify_scanned(head.method, head.uri, head.headers, &scan) {
        Ok(route) => route,
        Err(refused) => return Verdict::Refuse(refused_head(head, refused, rules.policy)),
    };
    let (operation, tag_operation) = match route {
        Route::Pass(op) => (op.name(), None),
        Route::Judge(op) => (op.name(), Some(op)),
        Route::Unknown(name) => match rules.policy.unknown_operations() {
            UnknownOperations::Forward => (UNKNOWN_OPERATION, None),
            UnknownOperations::Reject => {
                return Verdict::Refuse(Refusal {
                    answer: ProxyError::UnknownOperation(name),
                    operation: UNKNOWN_OPERATION,
                    record: None,
                })
            }
        },
    };
    let host = match host(head, scan.host(), rules.upstream) {
        Ok(host) => host,
        Err(answer) => {
            return Verdict::Refuse(match tag_operation {
                Some(op) => refused_tag_change(head, op, answer, rules.policy),
                None => Refusal {
                    answer,
                    operation,
                    record: None,
                },
            })
        }
    };
    let Some(op) = tag_operation else {
        // Streamed unread; a body already read (a policy test case) is checked here as the
        // stream would be.
        if let Body::Whole(bytes) = body {
            if let Err(reason) = check_body(bytes) {
                return Verdict::Refuse(streamed_body_refused(
                    head,
                    operation,
                    reason,
                    rules.policy,
                ));
            }
        }
        return Verdict::Stream { operation, host };
    };
    let refuse = |answer| Verdict::Refuse(refused_tag_change(head, op, answer, rules.policy));
    if let Err(reason) = check_content_encoding(scan.content_encoding()) {
        return refuse(ProxyError::from(reason));
    }
    let too_large = ProxyError::BodyTooLarge {
        limit: rules.max_body_bytes,
    };
    let bytes = match body {
        Body::Unread => {
            if declared_length(head.headers).is_some_and(|n| n > rules.max_body_bytes) {
                return refuse(too_large);
            }
            return Verdict::ReadBody { operation: op };
        }
        Body::Whole(bytes) if bytes.len() as u64 > rules.max_body_bytes => {
            return refuse(too_large)
        }
        Body::Whole(bytes) => bytes,
    };
    Verdict::Judged {
        operation: op,
        host,
        judgement: judge(op, head, &scan, bytes, rules.policy),
    }
}

/// The host a request goes to: its `Host` (or `:authority`), a DNS name, allowed by the
/// upstream settings, and inside an intercepted tunnel the tunnel's own host.
fn host<'a>(
    head: &Head<'a>,
    host: Option<&'a HeaderValue>,
    upstream: &UpstreamConfig,
) -> Result<&'a str, ProxyError> {
    let host = request_host_of(head.uri, host).map_err(ProxyError::from)?;
    if let Some(tunnel_host) = head.tunnel_host {
        if !crate::glob::host_name(host).eq_ignore_ascii_case(tunnel_host) {
            return Err(ProxyError::HostNotTunnel {
                host: host.to_owned(),
                tunnel: tunnel_host.to_owned(),
            });
        }
    }
    if !upstream.allows_host(host) {
        return Err(ProxyError::HostNotAllowed(host.to_owned()));
    }
    Ok(host)
}

/// The `Content-Length` a head declares (classified: at most one).
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A refusal by the head: recorded when it may be a tag change, as `classify` says.
fn refused_head(head: &Head, refused: Refused, policy: &Policy) -> Refusal {
    let operation = names_pass_through(head.headers).map_or(UNKNOWN_OPERATION, |op| op.name());
    let record = refused.may_change_tags.then(|| {
        let judgement = Judgement::refused(&refused.reason, head, policy);
        (judgement, target_text(head.headers))
    });
    Refusal {
        answer: ProxyError::from(refused.reason),
        operation,
        record,
    }
}

/// The refusal of a body streamed through that showed another protocol's shape (or trailers):
/// always recorded, as a possible tag change. `policy` is the one in force for the request.
pub fn streamed_body_refused(
    head: &Head,
    operation: &'static str,
    reason: Unreadable,
    policy: &Policy,
) -> Refusal {
    let judgement = Judgement::refused(&reason, head, policy);
    Refusal {
        answer: ProxyError::from(reason),
        operation,
        record: Some((judgement, target_text(head.headers))),
    }
}

/// The refusal of a tag change before it could be judged: by its head or host, or because its
/// body could not be read (too large, too slow, broken off). Always recorded. `policy` is the
/// one in force for the request.
pub fn refused_tag_change(
    head: &Head,
    operation: TagOperation,
    answer: ProxyError,
    policy: &Policy,
) -> Refusal {
    let judgement = Judgement::refused(&answer, head, policy);
    Refusal {
        answer,
        operation: operation.name(),
        record: Some((judgement, operation.name().to_owned())),
    }
}

/// The refusal of a head no HTTP parser reads the same way twice (`answer` says why),
/// recorded when its lenient reading (`head`) may be a tag change. `policy` is the one in force.
pub fn malformed_head(head: &Head, answer: ProxyError, policy: &Policy) -> Refusal {
    let may_change_tags = match classify(head.method, head.uri, head.headers) {
        Ok(Route::Pass(_) | Route::Unknown(_)) => false,
        Ok(Route::Judge(_)) => true,
        Err(refused) => refused.may_change_tags,
    };
    let operation = names_pass_through(head.headers).map_or(UNKNOWN_OPERATION, |op| op.name());
    let record = may_change_tags.then(|| {
        let judgement = Judgement::refused(&answer, head, policy);
        (judgement, target_text(head.headers))
    });
    Refusal {
        answer,
        operation,
        record,
    }
}

/// The X-Amz-Target of a refused request, for its audit record.
pub fn target_text(headers: &HeaderMap) -> String {
    let mut values = headers.get_all("x-amz-target").iter();
    match (values.next(), values.next()) {
        (Some(v), None) => {
            let text = String::from_utf8_lossy(v.as_bytes());
            text.chars().take(128).collect()
        }
        (Some(_), Some(_)) => "(repeated X-Amz-Target)".into(),
        (None, _) => "(no X-Amz-Target)".into(),
    }
}

/// Credential, the body's protocol, strict parse, policy: the judgement of a tag change.
fn judge(
    operation: TagOperation,
    head: &Head<'_>,
    scan: &HeaderScan<'_>,
    body: &[u8],
    policy: &Policy,
) -> Judgement {
    let query = head.uri.query();
    let caller = head.caller.map(Arc::from);
    let call = SdkCall::of(scan.invocation_id, scan.sdk_request);
    let policy_sha256 = Some(Arc::clone(policy.sha256()));
    let credential = match read_credential_of(scan.authorization(), query) {
        Ok(c) => c,
        Err(e) => {
            return Judgement {
                key_id: claimed_member(body, key_member(operation)),
                alias: claimed_alias(operation, body),
                call,
                policy_sha256,
                caller,
                ..Judgement::unreadable(e)
            }
        }
    };
    // The body must be one protocol's before its JSON is read (an `Action=` form parameter in a
    // string value would be another operation to some readers).
    let parsed = check_body(body)
        .map_err(|e| e.to_string())
        .and_then(|()| parse_tag_request(operation, body).map_err(|e| e.to_string()));
    let change = match parsed {
        Ok(c) => c,
        Err(e) => {
            return Judgement {
                credential,
                key_id: claimed_member(body, key_member(operation)),
                alias: claimed_alias(operation, body),
                call,
                policy_sha256,
                caller,
                ..Judgement::unreadable(e)
            }
        }
    };
    let context = Context {
        access_key_id: credential.as_ref().map(|c| c.access_key_id.as_str()),
        caller: head.caller,
    };
    let decision = policy.evaluate(&change, &context);
    Judgement {
        key_id: change.key_id.clone(),
        alias: change.alias.clone(),
        change: Some(change),
        credential,
        call,
        decision,
        policy_sha256,
        caller,
    }
}

/// The member that names the key an operation concerns.
fn key_member(operation: TagOperation) -> &'static str {
    if operation.is_alias() {
        "TargetKeyId"
    } else {
        "KeyId"
    }
}

/// The `AliasName` an alias operation's refused body claims.
fn claimed_alias(operation: TagOperation, body: &[u8]) -> Option<String> {
    operation
        .is_alias()
        .then(|| claimed_member(body, "AliasName"))
        .flatten()
}

/// A string member (`KeyId`, `TargetKeyId`, `AliasName`) of a body that is a JSON object, however
/// the strict parser judged it: what the refused request said it was about. At most 2048 bytes
/// (the model's limit).
fn claimed_member(body: &[u8], member: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = value.get(member)?.as_str()?;
    (text.len() <= 2048).then(|| text.to_owned())
}

/// The decision on a whole request, as a policy verdict: what `kms-tag-guard test`, the
/// property tests and the fuzz target compare. A request streamed through is an empty `allow`;
/// a refusal is a `deny` with rule `request` naming the answer.
pub fn decision(head: &Head, body: &[u8], rules: &Rules) -> Decision {
    match decide(head, Body::Whole(body), rules) {
        Verdict::Stream { .. } => Decision::default(),
        Verdict::Judged { judgement, .. } => judgement.decision,
        Verdict::Refuse(refusal) => match refusal.record {
            Some((judgement, _)) => judgement.decision,
            None => Decision::unreadable(refusal.answer.to_string()),
        },
        Verdict::ReadBody { .. } => unreachable!("a whole body was given"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `SdkCall::read` as it was: the headers looked up by `&str`, `str::split` and `str::trim`.
    fn sdk_call_by_str(headers: &HeaderMap) -> SdkCall {
        let invocation_id = headers
            .get("amz-sdk-invocation-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 64)
            .filter(|v| v.bytes().all(|b| b.is_ascii_graphic()))
            .map(str::to_owned);
        let attempt = headers
            .get("amz-sdk-request")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.split(';')
                    .filter_map(|p| p.trim().strip_prefix("attempt="))
                    .next()
                    .and_then(|n| n.parse().ok())
            });
        SdkCall {
            invocation_id,
            attempt,
        }
    }

    /// Header values built from the pieces SDKs send and the odd bytes a client may.
    fn value() -> impl Strategy<Value = Vec<u8>> {
        let piece = proptest::sample::select(vec![
            &b"attempt="[..],
            b"attempt",
            b"max=",
            b";",
            b"; ",
            b" ",
            b"\t",
            b"1",
            b"+2",
            b"-3",
            b"4294967296",
            b"a",
            b"5f6d27c3-6e61-4a5b",
            b"\x80",
            b"\xff",
            b"\x7f",
            b"=",
        ]);
        proptest::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #[test]
        fn sdk_call_reads_what_it_read_by_str(
            id in proptest::option::of(value()),
            request in proptest::option::of(value()),
            long in 0usize..3,
        ) {
            let mut headers = HeaderMap::new();
            if let Some(mut id) = id {
                // Around the 64-byte limit too.
                id.extend(std::iter::repeat_n(b'x', long * 31));
                if let Ok(v) = HeaderValue::from_bytes(&id) {
                    headers.insert("amz-sdk-invocation-id", v);
                }
            }
            if let Some(request) = request {
                if let Ok(v) = HeaderValue::from_bytes(&request) {
                    headers.insert("amz-sdk-request", v);
                }
            }
            prop_assert_eq!(SdkCall::read(&headers), sdk_call_by_str(&headers));
        }
    }
}
