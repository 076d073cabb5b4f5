//! The fast path for HTTP/1.1 connections.
//!
//! The request loop: the next head (in the narrow canonical shape of `head::parse_request`),
//! `decide`, then stream the request's exact bytes to KMS and KMS's answer back (`kms.rs`), or
//! read a tag change whole, decide with its body, record and forward it, or answer a refusal
//! (through `record`) and skip its body. Each client connection holds one connection to KMS of
//! its own: no pool, no second task, no per-request channel.
//!
//! A head the general server's parser would refuse is refused here, in the KMS shape, and so is
//! every request `decide` refuses by its head: answered here, its body skipped, and the
//! connection serves on. Anything else outside the canonical shape (HTTP/2, CONNECT, chunked or `Expect` requests, other methods
//! or versions) is handed, with the bytes read so far, to the general server, which serves one
//! request of it (an HTTP/2 connection whole).

mod chunked;
mod head;
mod kms;
mod timer;

pub(crate) use head::MAX_HEAD_BYTES;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Response, Uri};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, warn};

use self::head::{lenient_read, malformed, parse_request, Malformed, Parsed, RequestHead};
use self::kms::{Kms, RelayError};
use self::timer::LazyTimer;
use super::rewind::Rewind;
use super::state::{Origin, Shared};
use crate::answer::ProxyError;
use crate::decide::{
    decide, malformed_head, refused_tag_change, streamed_body_refused, Body, Head, Refusal, Rules,
    Verdict,
};
use crate::kms::protocol::BodyCheck;
use crate::kms::TagOperation;
use crate::metrics::{Class, Outcome};
use crate::record::{self, new_request_id, Handled};

/// How much more the read buffers make room for before each read.
const READ_CHUNK: usize = 16 * 1024;

/// The largest read buffer a connection keeps between requests: one grown past it (by a tag
/// change's body, or a head of more than a few KiB) is replaced by one of [`READ_CHUNK`] once
/// the request is answered.
const IDLE_BUFFER: usize = 2 * READ_CHUNK;

/// How the fast path left a connection.
pub(crate) enum Ended<I> {
    Closed,
    /// The general server takes over, the bytes already read first.
    HandOver(Rewind<I>),
}

/// Serves requests on a client connection until it closes or needs the general server.
pub(crate) async fn serve<I>(client: I, shared: &Arc<Shared>, origin: &Origin) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut connection = Connection {
        client,
        buf: BytesMut::with_capacity(READ_CHUNK),
        buf_grown: false,
        kms: None,
        shared,
        origin,
        closing: shared.lifecycle.closing.subscribe(),
        grace_over: None,
        idle_timer: LazyTimer::new(),
        kms_timer: LazyTimer::new(),
    };
    loop {
        let head = match connection.next_head().await {
            Next::Head(head) => head,
            Next::Close => return Ended::Closed,
            Next::Other => return connection.hand_over("a request head in another shape"),
            Next::Malformed(malformed) => {
                connection.refuse_malformed(malformed).await;
                let _ = connection.client.shutdown().await;
                return Ended::Closed;
            }
        };
        match connection.handle(head).await {
            Step::Continue => connection.shed_buffer(),
            Step::Close => {
                let _ = connection.client.shutdown().await;
                return Ended::Closed;
            }
        }
    }
}

// Returned once per request; boxing the head would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Next {
    Head(RequestHead),
    Close,
    Other,
    /// A head the general server would refuse too: refused here, then the connection closes.
    Malformed(Malformed),
}

enum Step {
    Continue,
    Close,
}

struct Connection<'a, I> {
    client: I,
    buf: BytesMut,
    /// Whether `buf` has grown past [`IDLE_BUFFER`] since it was last shed.
    buf_grown: bool,
    kms: Option<Kms>,
    shared: &'a Arc<Shared>,
    origin: &'a Origin,
    closing: watch::Receiver<bool>,
    /// Resolves when the shutdown grace period is over: made at the connection's first tag change
    /// and kept for the next ones (one registration, not one per request).
    grace_over: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// For the wait for the next head.
    idle_timer: LazyTimer,
    /// For the wait for KMS's answer (separate, so that each timer's deadlines only move later).
    kms_timer: LazyTimer,
}

impl<I> Connection<'_, I>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    fn hand_over(self, why: &'static str) -> Ended<I> {
        debug!(peer = %self.origin.peer, why, "HTTP/1.1 connection handed to the general server");
        Ended::HandOver(Rewind::new(self.client, self.buf.freeze()))
    }

    /// Reads the next request head: the connection may stay idle (no byte of a head yet) for
    /// `idle_timeout_ms`, and a head, once begun, must be complete within
    /// `header_read_timeout_ms`; unless the proxy is shutting down. A head is parsed once it has
    /// ended (or while it is short), not at every read of it, so a head trickled a byte at a time
    /// costs no more than one sent whole.
    async fn next_head(&mut self) -> Next {
        let limits = &self.shared.limits;
        let now = tokio::time::Instant::now();
        let mut deadline = if self.buf.is_empty() {
            now + limits.idle_timeout
        } else {
            now + limits.header_read_timeout
        };
        // Bytes already searched for the end of the head.
        let mut searched = 0;
        loop {
            if !self.buf.is_empty() {
                if worth_parsing(&self.buf, searched) {
                    match parse_request(&self.buf) {
                        Parsed::Complete(head) => return Next::Head(head),
                        Parsed::Other => {
                            return match malformed(&self.buf) {
                                Some(malformed) => Next::Malformed(malformed),
                                None => Next::Other,
                            }
                        }
                        Parsed::Partial => {}
                    }
                }
                searched = self.buf.len();
            } else if *self.closing.borrow() {
                return Next::Close;
            }
            self.buf.reserve(READ_CHUNK);
            self.buf_grown |= self.buf.capacity() > IDLE_BUFFER;
            let idle = self.buf.is_empty();
            let read = tokio::select! {
                biased;
                read = self.client.read_buf(&mut self.buf) => read,
                () = self.idle_timer.until(deadline) => return Next::Close,
                _ = self.closing.wait_for(|closed| *closed), if idle => return Next::Close,
            };
            if !matches!(read, Ok(n) if n > 0) {
                return Next::Close;
            }
            if idle {
                // A head has begun: it has the header read timeout to arrive whole.
                deadline = tokio::time::Instant::now() + self.shared.limits.header_read_timeout;
            }
        }
    }

    async fn handle(&mut self, head: RequestHead) -> Step {
        let started = Instant::now();
        let shared = Arc::clone(self.shared);
        // A borrowed look at the policy decides by the head; only a tag change keeps the policy
        // (one for the whole request, even if a reload lands meanwhile), so a request streamed
        // through never touches the policy's reference count.
        let policy = shared.policy.load();
        let plan = {
            let view = self.view(&head);
            match decide(&view, Body::Unread, &shared.rules(&policy)) {
                Verdict::Stream { operation, host } => match shared.upstream.target(host) {
                    Ok(target) => Plan::Stream(operation, target),
                    Err(answer) => Plan::Refuse(Box::new(Refusal {
                        answer,
                        operation,
                        record: None,
                    })),
                },
                Verdict::ReadBody { operation } => Plan::ReadBody(operation),
                Verdict::Refuse(refusal) => Plan::Refuse(Box::new(refusal)),
                Verdict::Judged { .. } => unreachable!("no body was given"),
            }
        };
        match plan {
            Plan::Stream(operation, target) => {
                drop(policy);
                self.pass(head, target, operation, started).await
            }
            Plan::ReadBody(operation) => {
                // The body is read into the connection's buffer: its size is paid for from the
                // budget of bodies held until the buffer is let go of.
                let reservation = match shared.bodies.reserve(head.body_len) {
                    Ok(reservation) => reservation,
                    Err(error) => {
                        let refusal =
                            refused_tag_change(&self.view(&head), operation, error, &policy);
                        drop(policy);
                        let handled =
                            record::refusal(&shared.audit, self.origin.peer, refusal).await;
                        return self.refuse(head, handled, Class::inspect, started).await;
                    }
                };
                let policy = arc_swap::Guard::into_inner(policy);
                let rules = shared.rules(&policy);
                let step = self.tag_change(head, operation, &rules, started).await;
                self.shed_buffer();
                drop(reservation);
                step
            }
            Plan::Refuse(refusal) => {
                drop(policy);
                let class = record::class_of(refusal.operation);
                let handled = record::refusal(&shared.audit, self.origin.peer, *refusal).await;
                self.refuse(head, handled, class, started).await
            }
        }
    }

    /// Lets go of a read buffer grown past [`IDLE_BUFFER`] (by a tag change's body or a large
    /// head) for one of [`READ_CHUNK`], the bytes not yet used moved along: an idle connection
    /// holds a small buffer whatever it carried before. A buffer that never grew is kept, so a
    /// request streamed through allocates nothing.
    fn shed_buffer(&mut self) {
        if self.buf_grown {
            self.buf_grown = false;
            let mut small = BytesMut::with_capacity(READ_CHUNK.max(self.buf.len()));
            small.extend_from_slice(&self.buf);
            self.buf = small;
        }
    }

    /// The head as `decide` reads it.
    fn view<'h>(&self, head: &'h RequestHead) -> Head<'h>
    where
        Self: 'h,
    {
        Head {
            method: &head.parts.method,
            uri: &head.parts.uri,
            headers: &head.parts.headers,
            tunnel_host: self.origin.tunnel_host.as_deref(),
            caller: self.origin.caller.as_deref(),
        }
    }

    /// Answers a request refused by its head, then skips its body so that the connection can
    /// serve the next request. A body larger than `max_body_bytes` is not skipped: the answer
    /// says `Connection: close`, and the connection closes.
    async fn refuse(
        &mut self,
        head: RequestHead,
        handled: Handled,
        class: Class,
        started: Instant,
    ) -> Step {
        let skip = head.body_len <= self.shared.limits.max_body_bytes;
        let close = head.close || !skip;
        match self.answer(handled, class, started, close).await {
            Step::Continue => {}
            other => return other,
        }
        self.buf.advance(head.len);
        match self.skip_body(head.body_len).await {
            Ok(()) => Step::Continue,
            Err(_) => Step::Close,
        }
    }

    /// Reads and drops `len` bytes of a refused request's body, within `body_read_timeout_ms`.
    async fn skip_body(&mut self, mut len: u64) -> Result<(), ProxyError> {
        let limits = &self.shared.limits;
        let deadline = tokio::time::Instant::now() + limits.body_read_timeout;
        loop {
            let take = self
                .buf
                .len()
                .min(usize::try_from(len).unwrap_or(usize::MAX));
            self.buf.advance(take);
            len -= take as u64;
            if len == 0 {
                return Ok(());
            }
            self.buf.reserve(READ_CHUNK);
            let read = tokio::select! {
                biased;
                read = self.client.read_buf(&mut self.buf) => read,
                () = tokio::time::sleep_until(deadline) => {
                    return Err(ProxyError::BodyTimeout(limits.body_read_timeout.as_millis()));
                }
            };
            if !matches!(read, Ok(n) if n > 0) {
                return Err(ProxyError::Unreadable(
                    "the connection closed inside a refused request's body".into(),
                ));
            }
        }
    }

    /// A request that changes no tags: its bytes to KMS, KMS's answer back, both as they arrive.
    async fn pass(
        &mut self,
        head: RequestHead,
        target: Uri,
        operation: &'static str,
        started: Instant,
    ) -> Step {
        let mut check = BodyCheck::new();
        let result = match self
            .send_within_timeout(&head, &target, Some(&mut check))
            .await
        {
            Ok(()) => self.relay_answer(head.close).await,
            Err(error) => Err(error),
        };
        let step = match result {
            Ok(relayed) => {
                self.count(operation, Outcome::pass, Class::pass, started);
                if !relayed.reusable {
                    self.kms = None;
                }
                return if head.close || relayed.until_close || self.closing_now() {
                    Step::Close
                } else {
                    Step::Continue
                };
            }
            // The request may not have been read to its end: answer, then close.
            Err(RelayError::Kms(error)) => {
                let request_id = new_request_id();
                warn!(%request_id, %error, "forwarding failed");
                let handled = Handled::error(error, operation, &request_id);
                self.answer(handled, Class::pass, started, true).await
            }
            Err(RelayError::Client(error)) => {
                let error = ProxyError::Unreadable(format!(
                    "the request body broke off before it was complete ({error}); KMS received no complete request"
                ));
                let handled = Handled::error(error, operation, &new_request_id());
                self.answer(handled, Class::pass, started, true).await
            }
            // The body showed another protocol's shape: KMS got none of it, or not all of it
            // (its connection is dropped below). A possible tag change: recorded.
            Err(RelayError::Refused(reason)) => {
                let policy = self.shared.policy.load();
                let refusal = streamed_body_refused(&self.view(&head), operation, reason, &policy);
                drop(policy);
                let handled = record::refusal(&self.shared.audit, self.origin.peer, refusal).await;
                self.answer(handled, Class::pass, started, true).await
            }
            // Forwarded and answered by KMS; only the relay broke off.
            Err(RelayError::Broken | RelayError::ClientGone) => {
                self.count(operation, Outcome::pass, Class::pass, started);
                Step::Close
            }
        };
        self.kms = None;
        step
    }

    /// A tag-bearing request: read whole, decided again with its body, its decision recorded,
    /// then refused or forwarded; KMS's answer is read whole for the outcome record.
    async fn tag_change(
        &mut self,
        head: RequestHead,
        operation: TagOperation,
        rules: &Rules<'_>,
        started: Instant,
    ) -> Step {
        let shared = Arc::clone(self.shared);
        let peer = self.origin.peer;
        let op = operation.name();
        // No Content-Length (and, on this path, no Transfer-Encoding): an empty body.
        let end = head.len + head.body_len as usize;
        if let Err(error) = self.read_body(end).await {
            let refusal = refused_tag_change(&self.view(&head), operation, error, rules.policy);
            let handled = record::refusal(&shared.audit, peer, refusal).await;
            return self.answer(handled, Class::inspect, started, true).await;
        }
        let judged = {
            let view = self.view(&head);
            match decide(&view, Body::Whole(&self.buf[head.len..end]), rules) {
                Verdict::Judged {
                    host, judgement, ..
                } => Ok((shared.upstream.target(host), judgement)),
                Verdict::Refuse(refusal) => Err(refusal),
                other => unreachable!("a tag change with its body: {other:?}"),
            }
        };
        let (target, judgement) = match judged {
            Ok(judged) => judged,
            Err(refusal) => {
                self.buf.advance(end);
                let handled = record::refusal(&shared.audit, peer, refusal).await;
                return self
                    .answer(handled, Class::inspect, started, head.close)
                    .await;
            }
        };
        let request_id = new_request_id();
        let change =
            match record::decision(&shared.audit, &request_id, op, peer, &judgement, started).await
            {
                Ok(change) => change,
                Err(handled) => {
                    self.buf.advance(end);
                    return self
                        .answer(handled, Class::inspect, started, head.close)
                        .await;
                }
            };
        let target = match target {
            Ok(target) => target,
            Err(error) => {
                self.buf.advance(end);
                record::outcome(change, Err(&error));
                let handled = Handled::error(error, op, &request_id);
                return self.answer(handled, Class::inspect, started, true).await;
            }
        };

        // The body was checked whole by `decide`. At the end of the shutdown grace period the
        // client is answered and the outcome recorded as unknown, before the connection ends.
        let mut grace_over = match self.grace_over.take() {
            Some(grace_over) => grace_over,
            None => Box::pin(shared.lifecycle.grace_over()),
        };
        let exchange = async {
            match self.send_within_timeout(&head, &target, None).await {
                Ok(()) => self.read_answer(head.close).await,
                Err(RelayError::Kms(error)) => Err(error),
                Err(
                    RelayError::Client(_)
                    | RelayError::ClientGone
                    | RelayError::Broken
                    | RelayError::Refused(_),
                ) => Err(ProxyError::UpstreamBroken(
                    "the connection broke off while the request was sent".into(),
                )),
            }
        };
        let (result, grace_ended) = tokio::select! {
            biased;
            result = exchange => (result, false),
            () = &mut grace_over => (Err(ProxyError::ShutDown), true),
        };
        if !grace_ended {
            self.grace_over = Some(grace_over);
        }
        match result {
            Ok(mut answer) if answer.broken.is_some() => {
                self.kms = None;
                let error = answer.broken.take().expect("broken");
                record::outcome_after_head(change, answer.kms(), &error);
                let handled = Handled::error(error, op, &request_id);
                self.answer(handled, Class::inspect, started, true).await
            }
            Ok(mut answer) => {
                if !answer.reusable {
                    self.kms = None;
                }
                let close = head.close || answer.until_close || self.closing_now();
                self.count(op, Outcome::allow, Class::inspect, started);
                let mut out = std::mem::take(&mut answer.head);
                out.extend_from_slice(&answer.raw_body);
                // The answer first when the client takes it at once; the outcome record is never
                // left waiting for the client.
                let outcome = || record::outcome(change, Ok(answer.kms()));
                if self.write_client_then(&out, outcome).await.is_err() || close {
                    Step::Close
                } else {
                    Step::Continue
                }
            }
            Err(error) => {
                self.kms = None;
                record::outcome(change, Err(&error));
                let handled = Handled::error(error, op, &request_id);
                self.answer(handled, Class::inspect, started, true).await
            }
        }
    }

    /// Refuses a head the general server's parser would refuse too, in the KMS shape: recorded
    /// as a `deny` decision when the head, read as leniently as any reader might, may be a tag
    /// change. The body is never read; the answer says `Connection: close`.
    async fn refuse_malformed(&mut self, malformed: Malformed) {
        let started = Instant::now();
        let lenient = lenient_read(&self.buf);
        let answer = match malformed {
            Malformed::TooLarge | Malformed::TooManyHeaders => {
                ProxyError::HeadTooLarge(malformed.to_string())
            }
            _ => ProxyError::Unreadable(malformed.to_string()),
        };
        let method = lenient.method.unwrap_or(Method::OPTIONS);
        let uri = lenient.uri.unwrap_or_else(|| Uri::from_static("*"));
        let view = Head {
            method: &method,
            uri: &uri,
            headers: &lenient.headers,
            tunnel_host: self.origin.tunnel_host.as_deref(),
            caller: self.origin.caller.as_deref(),
        };
        let refusal = malformed_head(&view, answer, &self.shared.policy.load());
        let handled = record::refusal(&self.shared.audit, self.origin.peer, refusal).await;
        self.answer(handled, Class::pass, started, true).await;
    }

    /// Reads until the buffer holds `end` bytes, within `body_read_timeout_ms`.
    async fn read_body(&mut self, end: usize) -> Result<(), ProxyError> {
        let limits = &self.shared.limits;
        let deadline = tokio::time::Instant::now() + limits.body_read_timeout;
        while self.buf.len() < end {
            self.buf.reserve(end - self.buf.len());
            self.buf_grown |= self.buf.capacity() > IDLE_BUFFER;
            let read = tokio::select! {
                biased;
                read = self.client.read_buf(&mut self.buf) => read,
                () = tokio::time::sleep_until(deadline) => {
                    return Err(ProxyError::BodyTimeout(limits.body_read_timeout.as_millis()));
                }
            };
            match read {
                Ok(0) => {
                    return Err(ProxyError::Unreadable(
                        "the request body could not be read: the connection closed before the body was complete".into(),
                    ))
                }
                Ok(_) => {}
                Err(error) => {
                    return Err(ProxyError::Unreadable(format!(
                        "the request body could not be read: {error}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Answers a request the proxy answers itself.
    async fn answer(
        &mut self,
        handled: Handled,
        class: Class,
        started: Instant,
        close: bool,
    ) -> Step {
        self.count(handled.operation, handled.outcome, class, started);
        let close = close || self.closing_now();
        let keep_alive_secs = self.shared.limits.idle_timeout.as_secs();
        match serialise(handled.response, close, keep_alive_secs).await {
            Some(bytes) if self.write_client(&bytes).await.is_ok() && !close => Step::Continue,
            _ => Step::Close,
        }
    }

    async fn write_client(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.client.write_all(bytes).await?;
        self.client.flush().await
    }

    /// Writes `bytes` to the client and runs `record` once: right after, when the client's socket
    /// takes them at the first try (the common case: the answer is not delayed by the record),
    /// else before waiting for the client, so that a client that does not read can neither
    /// delay nor prevent the record (a tag change's outcome).
    async fn write_client_then(
        &mut self,
        bytes: &[u8],
        record: impl FnOnce(),
    ) -> std::io::Result<()> {
        let mut write = std::pin::pin!(self.write_client(bytes));
        // One poll, with the task's own waker: the write goes on from where it stopped.
        let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
        record();
        match first {
            Poll::Ready(result) => result,
            Poll::Pending => write.await,
        }
    }

    fn count(&self, operation: &'static str, outcome: Outcome, class: Class, started: Instant) {
        record::finished(&self.shared.metrics, operation, outcome, class, started);
    }

    fn closing_now(&self) -> bool {
        *self.closing.borrow()
    }
}

/// Whether a buffered head is worth parsing: it is short (so that nonsense is refused at once),
/// it has reached the head limit, or the bytes new since `searched` end a head (an empty line,
/// with or without CR). Parsing only then keeps a trickled head linear.
fn worth_parsing(buf: &[u8], searched: usize) -> bool {
    const ALWAYS_BELOW: usize = 1024;
    if buf.len() < ALWAYS_BELOW || buf.len() >= MAX_HEAD_BYTES {
        return true;
    }
    // An LF up to two bytes before the new ones may end the head with them.
    let from = searched.saturating_sub(2);
    memchr::memchr_iter(b'\n', &buf[from..]).any(|at| {
        let next = &buf[from + at + 1..];
        next.first() == Some(&b'\n') || next.starts_with(b"\r\n")
    })
}

/// The plan for a request, once decided: owned, so that the head can move on.
enum Plan {
    Stream(&'static str, Uri),
    ReadBody(TagOperation),
    /// Boxed: refusals are rare, and the plan of every request would carry its size.
    Refuse(Box<Refusal>),
}

/// An answer of the proxy's own, as HTTP/1.1 bytes.
async fn serialise(
    response: Response<Full<Bytes>>,
    close: bool,
    keep_alive_secs: u64,
) -> Option<Vec<u8>> {
    let (parts, body) = response.into_parts();
    let body: Bytes = body.collect().await.ok()?.to_bytes();
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else {
        head::keep_alive_hint(&mut out, keep_alive_secs);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    Some(out)
}
