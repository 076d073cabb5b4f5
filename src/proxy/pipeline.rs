//! The request pipeline: classify -> pass through | inspect -> decide -> audit -> forward.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, HOST};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, Version};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tracing::{info, warn};

use super::body::Streamed;
use super::connect::{self, Tunnels};
use super::error::ProxyError;
use super::headers::strip_hop_by_hop;
use super::serve::{Lifecycle, Origin};
use super::upstream::{error_chain, Upstream};
use super::ProxyBody;
use crate::audit::{timestamp, AuditLog, DecisionRecord, OutcomeRecord};
use crate::config::LimitsConfig;
use crate::inspect::{judge, Judgement};
use crate::kms::classify::{check_tag_request_head, classify, names_pass_through, request_host};
use crate::kms::{Refused, Route, TagOperation, Unreadable};
use crate::metrics::{Class, Metrics, Outcome, UpstreamErrorKind};
use crate::policy::{Policy, UnknownOperations};

/// The largest KMS answer to a tag-bearing request the proxy reads to record its outcome. KMS
/// answers to these operations are a few KiB.
pub(crate) const MAX_INSPECTED_RESPONSE_BYTES: usize = 4 << 20;

/// What every connection's requests share.
pub(crate) struct Shared {
    pub policy: ArcSwap<Policy>,
    pub audit: Arc<AuditLog>,
    pub upstream: Upstream,
    pub limits: LimitsConfig,
    pub metrics: Arc<Metrics>,
    /// HTTP/1.1 + h2 settings for every connection, including those inside tunnels.
    pub server: auto::Builder<TokioExecutor>,
    pub tunnels: Tunnels,
    pub lifecycle: Lifecycle,
}

/// An answer, and what became of the request for the metrics.
pub(crate) struct Handled {
    pub response: Response<ProxyBody>,
    pub operation: &'static str,
    pub outcome: Outcome,
}

impl Handled {
    pub(crate) fn error(error: ProxyError, operation: &'static str, request_id: &str) -> Handled {
        Handled {
            outcome: error.outcome(),
            response: error.into_response(request_id),
            operation,
        }
    }
}

/// The metrics label of a request whose operation is not (exactly) one of the model's.
pub(crate) const UNKNOWN_OPERATION: &str = "unknown";
/// The header that names the operation.
const X_AMZ_TARGET: &str = "x-amz-target";
/// The metrics label of a CONNECT request.
const CONNECT_OPERATION: &str = "CONNECT";

pub(crate) async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    origin: Origin,
) -> Response<ProxyBody> {
    let started = Instant::now();
    if request.method() == Method::CONNECT {
        let request_id = new_request_id();
        let (response, outcome) =
            connect::handle(Arc::clone(&shared), request, &origin, &request_id).await;
        let seconds = started.elapsed().as_secs_f64();
        shared
            .metrics
            .request(CONNECT_OPERATION, outcome, Class::pass, seconds);
        return response;
    }
    let peer = origin.peer;
    let tunnel_host = origin.tunnel_host.as_deref();
    let route = classify(request.method(), request.uri(), request.headers());
    let class = match route {
        Ok(Route::Inspect(_)) => Class::inspect,
        _ => Class::pass,
    };
    let handled = match route {
        Ok(Route::Pass(op)) => pass_through(&shared, request, op.name(), peer, tunnel_host).await,
        Ok(Route::Unknown(target)) => match shared.policy.load().unknown_operations {
            UnknownOperations::Forward => {
                pass_through(&shared, request, UNKNOWN_OPERATION, peer, tunnel_host).await
            }
            UnknownOperations::Reject => Handled::error(
                ProxyError::UnknownOperation(target),
                UNKNOWN_OPERATION,
                &new_request_id(),
            ),
        },
        Ok(Route::Inspect(operation)) => {
            inspect(shared.clone(), request, operation, peer, tunnel_host).await
        }
        Err(refused) => refuse_head(&shared, request.headers(), peer, refused).await,
    };
    let seconds = started.elapsed().as_secs_f64();
    shared
        .metrics
        .request(handled.operation, handled.outcome, class, seconds);
    handled.response
}

/// Answers a request refused by its head. A refusal that may be a tag change is audited as a
/// `deny`; one whose head provably names an operation that changes no tags is only answered
/// (the audit log is for tag changes).
pub(crate) async fn refuse_head(
    shared: &Shared,
    headers: &HeaderMap,
    peer: SocketAddr,
    refused: Refused,
) -> Handled {
    let request_id = new_request_id();
    if refused.may_change_tags {
        let target = target_text(headers);
        return refuse(
            shared,
            &request_id,
            &target,
            UNKNOWN_OPERATION,
            peer,
            refused.reason.into(),
        )
        .await;
    }
    let operation = names_pass_through(headers).map_or(UNKNOWN_OPERATION, |op| op.name());
    info!(%request_id, reason = %refused.reason, "ambiguous request refused");
    Handled::error(ProxyError::from(refused.reason), operation, &request_id)
}

/// A non-tag-bearing request: streamed both ways, never buffered, never parsed. Its body is only
/// watched, as it passes, for another protocol's shape ([`BodyCheck`]); a body that shows one is
/// cut off before its end, so KMS never receives it whole, and the refusal is audited.
async fn pass_through(
    shared: &Shared,
    request: Request<Incoming>,
    operation: &'static str,
    peer: SocketAddr,
    tunnel_host: Option<&str>,
) -> Handled {
    let (mut parts, body) = request.into_parts();
    if let Err(error) = prepare_forward(&shared.upstream, &mut parts, tunnel_host) {
        return Handled::error(error, operation, &new_request_id());
    }
    let refusal = Arc::new(OnceLock::new());
    let body = Streamed::from_client(body, Arc::clone(&refusal));
    // Classified, so exactly one target: a cheap clone of it names a refusal in the audit log.
    let target_header = parts.headers.get(X_AMZ_TARGET).cloned();
    let sent = shared
        .upstream
        .send(Request::from_parts(parts, Either::Left(body)))
        .await;
    if let Some(reason) = refusal.get() {
        let target = target_header.map_or_else(String::new, |v| {
            String::from_utf8_lossy(v.as_bytes())
                .chars()
                .take(128)
                .collect()
        });
        let request_id = new_request_id();
        let judgement = Judgement::unreadable(reason);
        let error = ProxyError::Unreadable(reason.to_string());
        return refuse(
            shared,
            &request_id,
            &target,
            operation,
            peer,
            (judgement, error),
        )
        .await;
    }
    match sent {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Handled {
                response: Response::from_parts(
                    parts,
                    Either::Left(Streamed::from_upstream(body, Arc::clone(&shared.metrics))),
                ),
                operation,
                outcome: Outcome::pass,
            }
        }
        Err(error) => {
            let request_id = new_request_id();
            warn!(%request_id, %error, "forwarding failed");
            Handled::error(error, operation, &request_id)
        }
    }
}

/// Points a request at the upstream without touching what the client signed: the Host header,
/// the other headers and the body stay as they are; only hop-by-hop headers go.
fn prepare_forward(
    upstream: &Upstream,
    parts: &mut Parts,
    tunnel_host: Option<&str>,
) -> Result<(), ProxyError> {
    let (host, target) = forward_target(upstream, &parts.uri, &parts.headers, tunnel_host)?;
    let host = host.to_owned();
    if !parts.headers.contains_key(HOST) {
        // An HTTP/2 client signed its :authority as `host`; HTTP/1.1 to KMS carries it as Host.
        let value = HeaderValue::from_str(&host).map_err(|_| {
            ProxyError::Unreadable("the request authority is not a header value".into())
        })?;
        parts.headers.insert(HOST, value);
    }
    strip_hop_by_hop(&mut parts.headers);
    parts.uri = target;
    parts.version = Version::HTTP_11;
    Ok(())
}

/// The host a request is addressed to and the upstream URI it goes to.
pub(crate) fn forward_target<'a>(
    upstream: &Upstream,
    uri: &'a http::Uri,
    headers: &'a HeaderMap,
    tunnel_host: Option<&str>,
) -> Result<(&'a str, http::Uri), ProxyError> {
    let host = request_host(uri, headers).map_err(ProxyError::from)?;
    // Inside an intercepted tunnel, requests must stay with the host the client connected to.
    if let Some(tunnel_host) = tunnel_host {
        if !crate::glob::host_name(host).eq_ignore_ascii_case(tunnel_host) {
            return Err(ProxyError::HostNotTunnel {
                host: host.to_owned(),
                tunnel: tunnel_host.to_owned(),
            });
        }
    }
    let target = upstream.target(host, uri.path_and_query())?;
    Ok((host, target))
}

/// A tag-bearing request: read it whole, parse it strictly, judge it, record the decision, then
/// deny it or forward the original bytes.
async fn inspect(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    operation: TagOperation,
    peer: SocketAddr,
    tunnel_host: Option<&str>,
) -> Handled {
    let started = Instant::now();
    let request_id = new_request_id();
    let op = operation.name();
    // One policy for the whole request, even if a reload lands meanwhile.
    let policy = shared.policy.load_full();
    let (mut parts, body) = request.into_parts();

    if let Err(reason) = check_tag_request_head(&parts.headers) {
        return refuse(&shared, &request_id, op, op, peer, reason.into()).await;
    }
    if let Err(error) = prepare_forward(&shared.upstream, &mut parts, tunnel_host) {
        let judgement = Judgement::unreadable(&error);
        return refuse(&shared, &request_id, op, op, peer, (judgement, error)).await;
    }
    let bytes = match read_body(&parts.headers, body, &shared.limits).await {
        Ok(bytes) => bytes,
        Err(error) => {
            let judgement = Judgement::unreadable(&error);
            return refuse(&shared, &request_id, op, op, peer, (judgement, error)).await;
        }
    };

    let judgement = judge(
        operation,
        &parts.headers,
        parts.uri.query(),
        &bytes,
        &policy,
        Some(peer),
    );
    if let Err(handled) = record_decision(&shared, &request_id, op, peer, &judgement).await {
        return handled;
    }

    // Forwarding runs in its own task: a client that hangs up must not cancel a tag change KMS
    // may already be applying before its outcome is recorded.
    let forward = tokio::spawn(forward_inspected(
        Arc::clone(&shared),
        parts,
        bytes,
        request_id.clone(),
        started,
    ));
    match forward.await {
        Ok(Ok(response)) => Handled {
            response,
            operation: op,
            outcome: Outcome::allow,
        },
        Ok(Err(error)) => Handled::error(error, op, &request_id),
        Err(error) => {
            warn!(%request_id, %error, "forwarding task failed");
            let error = ProxyError::UpstreamConnect("internal error while forwarding".into());
            Handled::error(error, op, &request_id)
        }
    }
}

/// Writes the decision record of a judged tag-bearing request. `Err` is the answer when the
/// request may not be forwarded: denied, or (with `fail_closed`) not audited.
pub(crate) async fn record_decision(
    shared: &Shared,
    request_id: &str,
    op: &'static str,
    peer: SocketAddr,
    judgement: &Judgement,
) -> Result<(), Handled> {
    let record = DecisionRecord::new(request_id, op, Some(peer), judgement);
    if let Err(error) = shared.audit.write(&record).await {
        warn!(%request_id, %error, "audit record not written");
        if shared.audit.fail_closed {
            return Err(Handled::error(ProxyError::AuditUnavailable, op, request_id));
        }
    }
    if !judgement.decision.allowed() {
        info!(%request_id, operation = op, "tag change denied");
        let error = if judgement.change.is_some() {
            ProxyError::Denied(judgement.decision.denial_message())
        } else {
            ProxyError::Unreadable(judgement.decision.violations[0].message.clone())
        };
        return Err(Handled::error(error, op, request_id));
    }
    Ok(())
}

/// Reads a tag-bearing body under `max_body_bytes` and `body_read_timeout_ms`.
async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    limits: &LimitsConfig,
) -> Result<Bytes, ProxyError> {
    let limit = limits.max_body_bytes;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match tokio::time::timeout(limits.body_read_timeout, limited.collect()).await {
        Err(_) => Err(ProxyError::BodyTimeout(
            limits.body_read_timeout.as_millis(),
        )),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Ok(Err(error)) => Err(ProxyError::Unreadable(format!(
            "the request body could not be read: {}",
            error_chain(error.as_ref())
        ))),
        Ok(Ok(collected)) if collected.trailers().is_some() => {
            Err(ProxyError::Unreadable(Unreadable::Trailers.to_string()))
        }
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Forwards an allowed tag change, records its outcome, and relays KMS's answer.
async fn forward_inspected(
    shared: Arc<Shared>,
    parts: Parts,
    body: Bytes,
    request_id: String,
    started: Instant,
) -> Result<Response<ProxyBody>, ProxyError> {
    let request = Request::from_parts(parts, Either::Right(Full::new(body)));
    let upstream = &shared.upstream;
    let result = match upstream.send(request).await {
        Ok(response) => {
            let answer = read_response(response, upstream.timeout()).await;
            if answer.is_err() {
                shared.metrics.upstream_error(UpstreamErrorKind::response);
            }
            answer
        }
        Err(error) => Err(error),
    };
    match result {
        Ok((parts, body)) => {
            let header = |name: &str| {
                parts
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let answer = KmsAnswer {
                status: parts.status.as_u16(),
                aws_request_id: header("x-amzn-requestid"),
                aws_error_header: header("x-amzn-errortype"),
                body: &body,
            };
            record_outcome(&shared, &request_id, started, Ok(answer)).await;
            Ok(Response::from_parts(parts, Either::Right(Full::new(body))))
        }
        Err(error) => {
            record_outcome(&shared, &request_id, started, Err(&error)).await;
            Err(error)
        }
    }
}

/// What KMS answered a forwarded tag change, as far as its outcome record goes.
pub(crate) struct KmsAnswer<'a> {
    pub status: u16,
    pub aws_request_id: Option<String>,
    pub aws_error_header: Option<String>,
    pub body: &'a [u8],
}

/// Writes the outcome record of a forwarded tag change.
pub(crate) async fn record_outcome(
    shared: &Shared,
    request_id: &str,
    started: Instant,
    result: Result<KmsAnswer<'_>, &ProxyError>,
) {
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (upstream_status, aws_request_id, aws_error, error) = match result {
        Ok(answer) => {
            let aws_error = (answer.status >= 400)
                .then(|| aws_error_type(answer.aws_error_header.as_deref(), answer.body))
                .flatten();
            (Some(answer.status), answer.aws_request_id, aws_error, None)
        }
        Err(error) => {
            warn!(%request_id, %error, "forwarding a tag change failed");
            let (_, error_type, _) = error.shape();
            (
                None,
                None,
                Some(error_type.to_owned()),
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
        duration_ms: (duration_ms * 1000.0).round() / 1000.0,
        error: error.as_deref(),
    };
    if let Err(error) = shared.audit.write(&record).await {
        warn!(%request_id, %error, "outcome record not written");
    }
}

/// Reads KMS's answer to a tag-bearing request whole, so its outcome can be recorded.
async fn read_response(
    response: Response<Incoming>,
    timeout: Duration,
) -> Result<(http::response::Parts, Bytes), ProxyError> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let limited = Limited::new(body, MAX_INSPECTED_RESPONSE_BYTES);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => Err(ProxyError::UpstreamTimeout(timeout.as_millis())),
        Ok(Err(error)) => Err(ProxyError::UpstreamConnect(format!(
            "the answer from KMS broke off: {}",
            error_chain(error.as_ref())
        ))),
        Ok(Ok(collected)) => Ok((parts, collected.to_bytes())),
    }
}

/// The error type of a KMS error answer: the body's `__type` (or `code`), else the
/// `x-amzn-ErrorType` header, without namespace or URI.
fn aws_error_type(header: Option<&str>, body: &[u8]) -> Option<String> {
    let from_body = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("__type")
                .or_else(|| v.get("code"))
                .and_then(|t| t.as_str())
                .map(str::to_owned)
        });
    let raw = from_body.or_else(|| header.map(str::to_owned))?;
    let before_colon = raw.split(':').next().unwrap_or(&raw);
    Some(
        before_colon
            .rsplit('#')
            .next()
            .unwrap_or(before_colon)
            .to_owned(),
    )
}

/// Records a refusal as a `deny` decision, then answers it. With `fail_closed`, a refusal whose
/// record cannot be written is answered 503 like any other tag-bearing request.
pub(crate) async fn refuse(
    shared: &Shared,
    request_id: &str,
    target: &str,
    operation: &'static str,
    peer: SocketAddr,
    (judgement, error): (Judgement, ProxyError),
) -> Handled {
    let record = DecisionRecord::new(request_id, target, Some(peer), &judgement);
    if let Err(audit_error) = shared.audit.write(&record).await {
        warn!(%request_id, error = %audit_error, "audit record not written");
        if shared.audit.fail_closed {
            return Handled::error(ProxyError::AuditUnavailable, operation, request_id);
        }
    }
    info!(%request_id, operation = target, %error, "request refused");
    Handled::error(error, operation, request_id)
}

impl From<Unreadable> for (Judgement, ProxyError) {
    fn from(reason: Unreadable) -> Self {
        (Judgement::unreadable(&reason), ProxyError::from(reason))
    }
}

/// The X-Amz-Target of a refused request, for its audit record.
pub(crate) fn target_text(headers: &HeaderMap) -> String {
    let mut values = headers.get_all(X_AMZ_TARGET).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => {
            let text = String::from_utf8_lossy(v.as_bytes());
            text.chars().take(128).collect()
        }
        (Some(_), Some(_)) => "(repeated X-Amz-Target)".into(),
        (None, _) => "(no X-Amz-Target)".into(),
    }
}

pub(crate) fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_error_types_are_sanitised() {
        assert_eq!(
            aws_error_type(
                None,
                br#"{"__type":"com.amazon#NotFoundException:http://x","message":"m"}"#
            ),
            Some("NotFoundException".into())
        );
        assert_eq!(
            aws_error_type(Some("TagException"), b"<html>"),
            Some("TagException".into())
        );
        assert_eq!(aws_error_type(None, b""), None);
    }
}
