//! The general server's service (hyper): every request the fast path does not take (HTTP/2,
//! CONNECT, chunked or `Expect` requests, other methods or versions) goes through the same
//! `decide` and `record` as on the fast path, with hyper's bodies.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST};
use http::request::Parts;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use tracing::warn;

use super::bodies::Reservation;
use super::body::{ProxyBody, Streamed};
use super::connect;
use super::framing::check_answer;
use super::headers::strip_hop_by_hop;
use super::lane::{Lane, Reuse};
use super::state::{Origin, Shared};
use super::upstream::error_chain;
use crate::answer::ProxyError;
use crate::decide::{
    decide, refused_tag_change, streamed_body_refused, Body, Head, Judgement, Rules, Verdict,
};
use crate::kms::answer::{KmsAnswer, MAX_ANSWER_BYTES};
use crate::kms::credential::signs_authority;
use crate::kms::{TagOperation, Unreadable};
use crate::metrics::{Class, Outcome, UpstreamErrorKind};
use crate::record::{self, new_request_id, Handled};

/// The metrics label of a CONNECT request.
const CONNECT_OPERATION: &str = "CONNECT";

/// An answer of the proxy's own, as the general server sends it.
fn own(handled: Handled) -> Response<ProxyBody> {
    handled.response.map(Either::Right)
}

/// Serves one request of a connection whose connections to KMS are `lane`'s.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    origin: Origin,
    lane: Arc<Lane>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    if request.method() == Method::CONNECT {
        let request_id = new_request_id();
        let (response, outcome) =
            connect::handle(Arc::clone(&shared), request, &origin, &request_id).await;
        record::finished(
            &shared.metrics,
            CONNECT_OPERATION,
            outcome,
            Class::pass,
            started,
        );
        return response;
    }
    let peer = origin.peer;
    // One policy for the whole request, even if a reload lands meanwhile.
    let policy = shared.policy.load_full();
    let rules = shared.rules(&policy);
    let (parts, body) = request.into_parts();
    let head = Head {
        method: &parts.method,
        uri: &parts.uri,
        headers: &parts.headers,
        tunnel_host: origin.tunnel_host.as_deref(),
        caller: origin.caller.as_deref(),
    };
    let (response, operation, outcome, class) = match decide(&head, Body::Unread, &rules) {
        Verdict::Stream { operation, host } => {
            let host = host.to_owned();
            let handled =
                pass_through(&shared, &lane, parts, body, &host, operation, &origin).await;
            (handled.0, operation, handled.1, Class::pass)
        }
        Verdict::ReadBody { operation } => {
            let handled = tag_change(&shared, &lane, parts, body, operation, &origin, &rules).await;
            (handled.0, operation.name(), handled.1, Class::inspect)
        }
        Verdict::Refuse(refusal) => {
            let class = record::class_of(refusal.operation);
            let handled = record::refusal(&shared.audit, peer, refusal).await;
            let (operation, outcome) = (handled.operation, handled.outcome);
            (own(handled), operation, outcome, class)
        }
        Verdict::Judged { .. } => unreachable!("no body was given"),
    };
    record::finished(&shared.metrics, operation, outcome, class, started);
    response
}

/// A request that changes no tags: streamed both ways, never buffered, never parsed. Its body is
/// only watched, as it passes, for another protocol's shape; a body that shows one is cut off
/// before its end, so KMS never receives it whole, and the refusal is recorded.
async fn pass_through(
    shared: &Shared,
    lane: &Arc<Lane>,
    mut parts: Parts,
    body: Incoming,
    host: &str,
    operation: &'static str,
    origin: &Origin,
) -> (Response<ProxyBody>, Outcome) {
    let peer = origin.peer;
    let forward = match prepare_forward(shared, &mut parts, host) {
        Ok(forward) => forward,
        Err(error) => {
            let outcome = error.outcome();
            return (
                own(Handled::error(error, operation, &new_request_id())),
                outcome,
            );
        }
    };
    let refusal = Arc::new(OnceLock::new());
    let body = Streamed::from_client(body, Arc::clone(&refusal));
    // Cheap clones of what a record of a refusal made after the head has gone on needs.
    let head_copy = record_headers(&parts.headers);
    let (method, uri) = (parts.method.clone(), parts.uri.clone());
    let sent = send(
        lane,
        Request::from_parts(parts, Either::Left(body)),
        &forward,
    )
    .await;
    if let Some(reason) = refusal.get() {
        let head = Head {
            method: &method,
            uri: &uri,
            headers: &head_copy,
            tunnel_host: None,
            caller: origin.caller.as_deref(),
        };
        let refused =
            streamed_body_refused(&head, operation, reason.clone(), &shared.policy.load());
        let handled = record::refusal(&shared.audit, peer, refused).await;
        let outcome = handled.outcome;
        return (own(handled), outcome);
    }
    match sent {
        Ok((response, reuse)) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            // The answer is cut off when KMS stalls mid-body, as its head is not waited for
            // longer than `timeout_ms` either; a kept connection is reused once it has ended.
            let on_end = reuse.map(|reuse| Box::new(move || reuse.give_back()) as Box<_>);
            let body = Streamed::from_upstream(
                body,
                Arc::clone(&shared.metrics),
                shared.upstream.timeout(),
                on_end,
            );
            (
                Response::from_parts(parts, Either::Left(body)),
                Outcome::pass,
            )
        }
        Err(error) => {
            let request_id = new_request_id();
            warn!(%request_id, %error, "forwarding failed");
            let outcome = error.outcome();
            (own(Handled::error(error, operation, &request_id)), outcome)
        }
    }
}

/// The headers a refusal's record reads (the target, the credential, the SDK call), copied
/// cheaply (a `HeaderValue` clone shares its bytes).
fn record_headers(headers: &HeaderMap) -> HeaderMap {
    let mut copy = HeaderMap::new();
    for name in [
        "x-amz-target",
        "authorization",
        "amz-sdk-invocation-id",
        "amz-sdk-request",
    ] {
        if let Some(value) = headers.get(name) {
            copy.insert(HeaderName::from_static(name), value.clone());
        }
    }
    copy
}

/// How a request goes to KMS.
enum Forward {
    /// As HTTP/1.1 to `target`, its Host as signed.
    Http1 { target: Uri },
    /// As HTTP/2 over a connection to `dial`: the signature covers `:authority`.
    Http2 { dial: Uri },
}

/// Points a request at the upstream without touching what the client signed: the Host header
/// (or, for a request signed over `:authority`, the `:authority`), the other headers and the
/// body stay as they are; only hop-by-hop headers go.
fn prepare_forward(shared: &Shared, parts: &mut Parts, host: &str) -> Result<Forward, ProxyError> {
    let target = shared.upstream.target(host)?;
    strip_hop_by_hop(&mut parts.headers);
    if parts.version == Version::HTTP_2 && signs_authority(&parts.headers) {
        // Only HTTP/2 carries `:authority`: KMS gets the one the client sent, as it sent it.
        let unreadable =
            |e: http::Error| ProxyError::Unreadable(format!("the request target: {e}"));
        let authority = match parts.uri.authority() {
            Some(authority) => authority.clone(),
            None => Authority::try_from(host)
                .map_err(|e| ProxyError::Unreadable(format!("the request authority: {e}")))?,
        };
        // `target` is `<scheme>://<authority>/`: the connection to dial; the request keeps the
        // client's :authority.
        parts.uri = Uri::builder()
            .scheme(target.scheme().cloned().unwrap_or(Scheme::HTTPS))
            .authority(authority)
            .path_and_query("/")
            .build()
            .map_err(unreadable)?;
        return Ok(Forward::Http2 { dial: target });
    }
    if !parts.headers.contains_key(HOST) {
        // An HTTP/2 client signed its :authority as `host`; HTTP/1.1 to KMS carries it as Host.
        let value = HeaderValue::from_str(host).map_err(|_| {
            ProxyError::Unreadable("the request authority is not a header value".into())
        })?;
        parts.headers.insert(HOST, value);
    }
    // HTTP/1.1 carries the path alone; the connection goes to `target`.
    parts.uri = Uri::from_static("/");
    parts.version = Version::HTTP_11;
    Ok(Forward::Http1 { target })
}

/// Sends a prepared request the way [`prepare_forward`] chose, over the client connection's
/// own connections to KMS, and checks the answer's framing as the fast path does: an answer a
/// reader could frame another way is not relayed.
async fn send(
    lane: &Arc<Lane>,
    request: Request<ProxyBody>,
    forward: &Forward,
) -> Result<(Response<Incoming>, Option<Reuse>), ProxyError> {
    let (response, reuse) = match forward {
        Forward::Http1 { target } => lane.send_h1(request, target).await?,
        Forward::Http2 { dial } => (lane.send_h2(request, dial).await?, None),
    };
    if let Err(bad) = check_answer(response.status().as_u16(), response.headers()) {
        lane.metrics().upstream_error(UpstreamErrorKind::connect);
        // The connection is not reused: dropping `reuse` closes it.
        return Err(ProxyError::UpstreamBroken(format!(
            "KMS's answer cannot be relayed: {bad}"
        )));
    }
    Ok((response, reuse))
}

/// A tag-bearing request: read it whole, decide again with its body, record the decision, then
/// deny it or forward the original bytes.
async fn tag_change(
    shared: &Arc<Shared>,
    lane: &Arc<Lane>,
    mut parts: Parts,
    body: Incoming,
    operation: TagOperation,
    origin: &Origin,
    rules: &Rules<'_>,
) -> (Response<ProxyBody>, Outcome) {
    let started = Instant::now();
    let (peer, tunnel_host) = (origin.peer, origin.tunnel_host.as_deref());
    let bytes = match read_body(body, shared).await {
        Ok(bytes) => bytes,
        Err(error) => {
            let head = Head {
                method: &parts.method,
                uri: &parts.uri,
                headers: &parts.headers,
                tunnel_host: None,
                caller: origin.caller.as_deref(),
            };
            let handled = record::refusal(
                &shared.audit,
                peer,
                refused_tag_change(&head, operation, error, rules.policy),
            )
            .await;
            let outcome = handled.outcome;
            return (own(handled), outcome);
        }
    };
    let head = Head {
        method: &parts.method,
        uri: &parts.uri,
        headers: &parts.headers,
        tunnel_host,
        caller: origin.caller.as_deref(),
    };
    let (host, judgement): (String, Judgement) = match decide(&head, Body::Whole(&bytes), rules) {
        Verdict::Judged {
            host, judgement, ..
        } => (host.to_owned(), judgement),
        Verdict::Refuse(refusal) => {
            let handled = record::refusal(&shared.audit, peer, refusal).await;
            let outcome = handled.outcome;
            return (own(handled), outcome);
        }
        other => unreachable!("a tag change with its body: {other:?}"),
    };
    let request_id = new_request_id();
    let op = operation.name();
    let change =
        match record::decision(&shared.audit, &request_id, op, peer, &judgement, started).await {
            Ok(change) => change,
            Err(handled) => {
                let outcome = handled.outcome;
                return (own(handled), outcome);
            }
        };
    let forward = match prepare_forward(shared, &mut parts, &host) {
        Ok(forward) => forward,
        Err(error) => {
            record::outcome(change, Err(&error));
            let outcome = error.outcome();
            return (own(Handled::error(error, op, &request_id)), outcome);
        }
    };
    // Forwarding runs in its own task: a client that hangs up must not cancel a tag change KMS
    // may already be applying before its outcome is recorded.
    let mut forward = tokio::spawn(forward_tag_change(
        Arc::clone(shared),
        Arc::clone(lane),
        parts,
        forward,
        bytes,
        change,
    ));
    // At the end of the shutdown grace period the client is answered, and the forward stopped:
    // its outcome is recorded as unknown as it ends.
    let forward = async {
        tokio::select! {
            result = &mut forward => result,
            () = shared.lifecycle.grace_over() => {
                forward.abort();
                Ok(Err(ProxyError::ShutDown))
            }
        }
    };
    match forward.await {
        Ok(Ok(response)) => (response, Outcome::allow),
        Ok(Err(error)) => {
            let outcome = error.outcome();
            (own(Handled::error(error, op, &request_id)), outcome)
        }
        Err(error) => {
            warn!(%request_id, %error, "forwarding task failed");
            let error = ProxyError::UpstreamBroken("internal error while forwarding".into());
            let outcome = error.outcome();
            (own(Handled::error(error, op, &request_id)), outcome)
        }
    }
}

/// Reads a tag-bearing body under `max_body_bytes`, `body_read_timeout_ms` and the body budget
/// (a declared length over the limit was refused by `decide`). Its declared length is reserved
/// from the budget before a byte is read, and a body without one as it grows; the bytes returned
/// hold the reservation until the last of them is dropped.
async fn read_body(body: Incoming, shared: &Shared) -> Result<Bytes, ProxyError> {
    let limits = &shared.limits;
    let reservation = shared
        .bodies
        .reserve(body.size_hint().exact().unwrap_or(0))?;
    match tokio::time::timeout(
        limits.body_read_timeout,
        collect_body(body, limits.max_body_bytes, reservation),
    )
    .await
    {
        Err(_) => Err(ProxyError::BodyTimeout(
            limits.body_read_timeout.as_millis(),
        )),
        Ok(read) => read,
    }
}

/// The frames of a tag-bearing body, gathered into one buffer whose every byte of capacity the
/// reservation covers first.
async fn collect_body(
    mut body: Incoming,
    limit: u64,
    mut reservation: Reservation,
) -> Result<Bytes, ProxyError> {
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    let declared = usize::try_from(reservation.bytes()).unwrap_or(usize::MAX);
    let mut bytes: Vec<u8> = Vec::with_capacity(declared.min(limit_usize));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            ProxyError::Unreadable(format!(
                "the request body could not be read: {}",
                error_chain(&error)
            ))
        })?;
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(_) => return Err(ProxyError::Unreadable(Unreadable::Trailers.to_string())),
        };
        let needed = bytes.len() + data.len();
        if needed > limit_usize {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        if needed > bytes.capacity() {
            // Grow by doubling (at most to the limit), paid for before it is allocated.
            let capacity = needed.max(bytes.capacity() * 2).min(limit_usize);
            reservation.grow_to(capacity as u64)?;
            bytes.reserve_exact(capacity - bytes.len());
        }
        bytes.extend_from_slice(&data);
    }
    Ok(reservation.attach(bytes))
}

/// Forwards an allowed tag change, records its outcome, and relays KMS's answer. The outcome
/// record has KMS's status as soon as its answer head arrived, even if its body then broke off.
async fn forward_tag_change(
    shared: Arc<Shared>,
    lane: Arc<Lane>,
    parts: Parts,
    forward: Forward,
    body: Bytes,
    change: record::OpenChange,
) -> Result<Response<ProxyBody>, ProxyError> {
    let request = Request::from_parts(parts, Either::Right(Full::new(body)));
    let (response, reuse) = match send(&lane, request, &forward).await {
        Ok(sent) => sent,
        Err(error) => {
            record::outcome(change, Err(&error));
            return Err(error);
        }
    };
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (aws_request_id, aws_error_header) =
        (header("x-amzn-requestid"), header("x-amzn-errortype"));
    match read_response(body, shared.upstream.timeout()).await {
        Ok(body) => {
            if let Some(reuse) = reuse {
                reuse.give_back();
            }
            let answer = KmsAnswer {
                status: parts.status.as_u16(),
                aws_request_id,
                aws_error_header,
                body: &body,
            };
            record::outcome(change, Ok(answer));
            Ok(Response::from_parts(parts, Either::Right(Full::new(body))))
        }
        Err(error) => {
            shared.metrics.upstream_error(UpstreamErrorKind::response);
            let head = KmsAnswer {
                status: parts.status.as_u16(),
                aws_request_id,
                aws_error_header,
                body: &[],
            };
            record::outcome_after_head(change, head, &error);
            Err(error)
        }
    }
}

/// Reads the body of KMS's answer to a tag-bearing request whole (at most `MAX_ANSWER_BYTES`,
/// within `timeout_ms`), so its outcome can be recorded.
async fn read_response(body: Incoming, timeout: Duration) -> Result<Bytes, ProxyError> {
    let limited = Limited::new(body, MAX_ANSWER_BYTES);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => Err(ProxyError::UpstreamTimeout(timeout.as_millis())),
        Ok(Err(error)) => Err(ProxyError::UpstreamBroken(format!(
            "the answer from KMS broke off: {}",
            error_chain(error.as_ref())
        ))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}
