//! The fast path for HTTP/1.1 connections.
//!
//! Each client connection gets one connection of its own to KMS, opened at its first request and
//! reused while both stay open: no pool, no second task, no per-request channel. A request head
//! in the narrow canonical shape of `head::parse_request` is classified; a pass-through request
//! is written to KMS as the exact bytes the client sent and KMS's answer is streamed back; a
//! tag-bearing request is read whole, judged, audited and forwarded the same way.
//!
//! Everything else (HTTP/2, CONNECT, chunked or `Expect` requests, heads in any other shape, and
//! every request the pipeline refuses) is handed, with the bytes read so far, to the general
//! server for the rest of the connection, so refusals and odd requests are answered by exactly
//! the code that answered them before this path existed.

mod chunked;
mod head;
mod timer;

pub(crate) use head::MAX_HEAD_BYTES;

use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Response, Uri};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tracing::{debug, warn};

use self::chunked::ChunkedScanner;
use self::head::{
    forwarded_head, lenient_read, malformed, parse_request, parse_response, Framing, Malformed,
    Parsed, RequestHead,
};
use self::timer::LazyTimer;
use super::error::ProxyError;
use super::pipeline::{
    self, forward_target, new_request_id, Handled, KmsAnswer, Shared, MAX_INSPECTED_RESPONSE_BYTES,
    UNKNOWN_OPERATION,
};
use super::rewind::Rewind;
use super::serve::Origin;
use super::upstream::DirectStream;
use super::ProxyBody;
use crate::inspect::{judge, Judgement};
use crate::kms::classify::{check_tag_request_head, classify, names_pass_through};
use crate::kms::protocol::BodyCheck;
use crate::kms::{Route, TagOperation, Unreadable};
use crate::metrics::{Class, Outcome, UpstreamErrorKind};
use crate::policy::UnknownOperations;

/// How much more the read buffers make room for before each read.
const READ_CHUNK: usize = 16 * 1024;

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
        kms: None,
        shared,
        origin,
        closing: shared.lifecycle.closing.subscribe(),
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
            Step::Continue => {}
            Step::Close => {
                let _ = connection.client.shutdown().await;
                return Ended::Closed;
            }
            Step::HandOver(why) => return connection.hand_over(why),
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
    /// To the general server, for this reason (logged at debug level).
    HandOver(&'static str),
}

/// The connection to KMS a client connection holds.
struct Kms {
    /// Scheme and authority it was opened to.
    target: Uri,
    stream: DirectStream,
    buf: BytesMut,
}

impl Kms {
    /// Whether KMS still holds the connection open: it may have closed it while idle, and a
    /// request written into a closed connection would fail after the fact.
    fn still_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut scratch = [0u8; 1];
        let mut read = ReadBuf::new(&mut scratch);
        matches!(
            std::pin::Pin::new(&mut self.stream).poll_read(&mut cx, &mut read),
            Poll::Pending
        )
    }

    fn serves(&self, target: &Uri) -> bool {
        self.target.scheme() == target.scheme() && self.target.authority() == target.authority()
    }
}

/// Why a request could not be relayed.
enum RelayError {
    /// The client's body broke off before it was complete.
    Client(std::io::Error),
    /// The client went away while KMS's answer was relayed: nothing to answer.
    ClientGone,
    /// KMS failed before its answer began: answer with this.
    Kms(ProxyError),
    /// KMS's answer broke off after it began: the client sees the connection cut.
    Broken,
    /// The body showed another protocol's shape; KMS did not receive it whole.
    Refused(Unreadable),
}

struct Connection<'a, I> {
    client: I,
    buf: BytesMut,
    kms: Option<Kms>,
    shared: &'a Arc<Shared>,
    origin: &'a Origin,
    closing: watch::Receiver<bool>,
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
        let peer = self.origin.peer;
        let headers = &head.parts.headers;
        let (operation, tag_operation) =
            match classify(&head.parts.method, &head.parts.uri, headers) {
                Ok(Route::Pass(op)) => (op.name(), None),
                Ok(Route::Inspect(op)) => (op.name(), Some(op)),
                Ok(Route::Unknown(name)) => match shared.policy.load().unknown_operations {
                    UnknownOperations::Forward => (UNKNOWN_OPERATION, None),
                    UnknownOperations::Reject => {
                        let error = ProxyError::UnknownOperation(name);
                        let handled = Handled::error(error, UNKNOWN_OPERATION, &new_request_id());
                        return self.refuse(head, handled, Class::pass, started).await;
                    }
                },
                Err(refused) => {
                    let handled = pipeline::refuse_head(&shared, headers, peer, refused).await;
                    return self.refuse(head, handled, Class::pass, started).await;
                }
            };
        let tunnel_host = self.origin.tunnel_host.as_deref();
        let target = match forward_target(&shared.upstream, &head.parts.uri, headers, tunnel_host) {
            Ok((_, target)) => target,
            Err(error) => {
                let (handled, class) = match tag_operation {
                    None => (
                        Handled::error(error, operation, &new_request_id()),
                        Class::pass,
                    ),
                    Some(_) => {
                        let judgement = Judgement::unreadable(&error).about(headers, None);
                        let request_id = new_request_id();
                        let handled = pipeline::refuse(
                            &shared,
                            &request_id,
                            operation,
                            operation,
                            peer,
                            (judgement, error),
                        )
                        .await;
                        (handled, Class::inspect)
                    }
                };
                return self.refuse(head, handled, class, started).await;
            }
        };
        match tag_operation {
            None => self.pass(head, target, operation, started).await,
            Some(op) => self.inspect(head, target, op, started).await,
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
            // (its connection is dropped below). A possible tag change: audited.
            Err(RelayError::Refused(reason)) => {
                let target = pipeline::target_text(&head.parts.headers);
                let request_id = new_request_id();
                let judgement = Judgement::unreadable(&reason).about(&head.parts.headers, None);
                let handled = pipeline::refuse(
                    self.shared,
                    &request_id,
                    &target,
                    operation,
                    self.origin.peer,
                    (judgement, ProxyError::from(reason)),
                )
                .await;
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

    /// A tag-bearing request: read whole, judged, its decision recorded, then refused or
    /// forwarded; KMS's answer is read whole for the outcome record.
    async fn inspect(
        &mut self,
        head: RequestHead,
        target: Uri,
        operation: TagOperation,
        started: Instant,
    ) -> Step {
        let shared = Arc::clone(self.shared);
        let op = operation.name();
        let parts = &head.parts;
        if !head.has_length {
            // No Content-Length and no Transfer-Encoding: an empty body, which the general
            // server reads as it always has.
            return Step::HandOver("a tag-changing request without a Content-Length");
        }
        let request_id = new_request_id();
        let peer = self.origin.peer;
        let refused = if head.body_len > shared.limits.max_body_bytes {
            Some(ProxyError::BodyTooLarge {
                limit: shared.limits.max_body_bytes,
            })
        } else {
            check_tag_request_head(&parts.headers)
                .err()
                .map(ProxyError::from)
        };
        if let Some(error) = refused {
            let judgement = Judgement::unreadable(&error).about(&parts.headers, None);
            let handled =
                pipeline::refuse(&shared, &request_id, op, op, peer, (judgement, error)).await;
            return self.refuse(head, handled, Class::inspect, started).await;
        }
        // One policy for the whole request, even if a reload lands meanwhile.
        let policy = shared.policy.load_full();
        let end = head.len + head.body_len as usize;
        if let Err(error) = self.read_body(end).await {
            let judgement = Judgement::unreadable(&error).about(&parts.headers, None);
            let handled =
                pipeline::refuse(&shared, &request_id, op, op, peer, (judgement, error)).await;
            return self.answer(handled, Class::inspect, started, true).await;
        }
        let body = &self.buf[head.len..end];
        let judgement = judge(operation, &parts.headers, None, body, &policy, Some(peer));
        if let Err(handled) =
            pipeline::record_decision(&shared, &request_id, op, peer, &judgement).await
        {
            self.buf.advance(end);
            return self
                .answer(handled, Class::inspect, started, head.close)
                .await;
        }

        // The body was checked whole by `judge`.
        let result = match self.send_within_timeout(&head, &target, None).await {
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
        };
        match result {
            Ok(answer) => {
                pipeline::record_outcome(&shared, &request_id, started, Ok(answer.kms()));
                if !answer.reusable {
                    self.kms = None;
                }
                let close = head.close || answer.until_close || self.closing_now();
                self.count(op, Outcome::allow, Class::inspect, started);
                let mut out = answer.head;
                out.extend_from_slice(&answer.raw_body);
                if self.write_client(&out).await.is_err() || close {
                    Step::Close
                } else {
                    Step::Continue
                }
            }
            Err(error) => {
                self.kms = None;
                pipeline::record_outcome(&shared, &request_id, started, Err(&error));
                let handled = Handled::error(error, op, &request_id);
                self.answer(handled, Class::inspect, started, true).await
            }
        }
    }

    /// Refuses a head the general server's parser would refuse too, in the KMS shape: with a
    /// `deny` decision record when the head, read as leniently as any reader might, may be a tag
    /// change. The body is never read; the answer says `Connection: close`.
    async fn refuse_malformed(&mut self, malformed: Malformed) {
        let started = Instant::now();
        let lenient = lenient_read(&self.buf);
        let error = match malformed {
            Malformed::TooLarge | Malformed::TooManyHeaders => {
                ProxyError::HeadTooLarge(malformed.to_string())
            }
            _ => ProxyError::Unreadable(malformed.to_string()),
        };
        let method = lenient.method.unwrap_or(Method::OPTIONS);
        let uri = lenient.uri.unwrap_or_else(|| Uri::from_static("*"));
        let may_change_tags = match classify(&method, &uri, &lenient.headers) {
            Ok(Route::Pass(_) | Route::Unknown(_)) => false,
            Ok(Route::Inspect(_)) => true,
            Err(refused) => refused.may_change_tags,
        };
        let request_id = new_request_id();
        let handled = if may_change_tags {
            let judgement = Judgement::unreadable(&error).about(&lenient.headers, uri.query());
            pipeline::refuse(
                self.shared,
                &request_id,
                &pipeline::target_text(&lenient.headers),
                UNKNOWN_OPERATION,
                self.origin.peer,
                (judgement, error),
            )
            .await
        } else {
            debug!(peer = %self.origin.peer, %error, "malformed request head refused");
            let operation =
                names_pass_through(&lenient.headers).map_or(UNKNOWN_OPERATION, |op| op.name());
            Handled::error(error, operation, &request_id)
        };
        self.answer(handled, Class::pass, started, true).await;
    }

    /// Reads until the buffer holds `end` bytes, within `body_read_timeout_ms`.
    async fn read_body(&mut self, end: usize) -> Result<(), ProxyError> {
        let limits = &self.shared.limits;
        let deadline = tokio::time::Instant::now() + limits.body_read_timeout;
        while self.buf.len() < end {
            self.buf.reserve(end - self.buf.len());
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

    /// The connection to KMS for `target`: the one held, if it serves that target and is still
    /// open, else a new one.
    async fn kms_for(&mut self, target: &Uri) -> Result<&mut Kms, ProxyError> {
        let usable = self
            .kms
            .as_mut()
            .is_some_and(|kms| kms.serves(target) && kms.still_open());
        if !usable {
            self.kms = None;
            let stream = self.shared.upstream.dial(target).await?;
            self.kms = Some(Kms {
                target: target.clone(),
                stream,
                buf: BytesMut::with_capacity(READ_CHUNK),
            });
        }
        Ok(self.kms.as_mut().expect("just set"))
    }

    /// [`Self::send`] within `timeout_ms`: a client that stalls mid-body gets 504, as KMS would
    /// not answer such a request either.
    async fn send_within_timeout(
        &mut self,
        head: &RequestHead,
        target: &Uri,
        check: Option<&mut BodyCheck>,
    ) -> Result<(), RelayError> {
        let timeout = self.shared.upstream.timeout();
        match tokio::time::timeout(timeout, self.send(head, target, check)).await {
            Ok(sent) => sent,
            Err(_) => {
                self.shared
                    .metrics
                    .upstream_error(UpstreamErrorKind::timeout);
                Err(RelayError::Kms(ProxyError::UpstreamTimeout(
                    timeout.as_millis(),
                )))
            }
        }
    }

    /// Writes the request to KMS: the head as the client sent it (without Connection and
    /// Keep-Alive lines) and the body as it arrives. With `check`, each piece of the body is
    /// checked before it is written; a refused piece is never written, and the KMS connection is
    /// dropped (`RelayError::Refused`), so KMS never receives the request whole.
    async fn send(
        &mut self,
        head: &RequestHead,
        target: &Uri,
        mut check: Option<&mut BodyCheck>,
    ) -> Result<(), RelayError> {
        let mut left = head.body_len;
        let buffered = (self.buf.len() - head.len).min(usize::try_from(left).unwrap_or(usize::MAX));
        if let Some(check) = check.as_deref_mut() {
            // Usually the whole body: refused before KMS sees a byte of the request.
            check
                .feed(&self.buf[head.len..head.len + buffered])
                .map_err(RelayError::Refused)?;
        }
        self.kms_for(target).await.map_err(RelayError::Kms)?;
        let kms = self.kms.as_mut().expect("connected");
        let to_kms = |e: std::io::Error| {
            RelayError::Kms(ProxyError::UpstreamBroken(format!(
                "writing the request to KMS failed: {e}"
            )))
        };
        if head.hop_lines.is_empty() {
            // The common case: one write of the bytes exactly as they came.
            kms.stream
                .write_all(&self.buf[..head.len + buffered])
                .await
                .map_err(to_kms)?;
        } else {
            let mut out = forwarded_head(&self.buf[..head.len], &head.hop_lines).to_vec();
            out.extend_from_slice(&self.buf[head.len..head.len + buffered]);
            kms.stream.write_all(&out).await.map_err(to_kms)?;
        }
        self.buf.advance(head.len + buffered);
        left -= buffered as u64;
        while left > 0 {
            self.buf.reserve(READ_CHUNK);
            match self.client.read_buf(&mut self.buf).await {
                Ok(0) => return Err(RelayError::Client(std::io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(error) => return Err(RelayError::Client(error)),
            }
            let take = self
                .buf
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            if let Some(check) = check.as_deref_mut() {
                if let Err(reason) = check.feed(&self.buf[..take]) {
                    // Part of the body is with KMS: drop the connection before the rest.
                    self.kms = None;
                    return Err(RelayError::Refused(reason));
                }
            }
            kms.stream
                .write_all(&self.buf[..take])
                .await
                .map_err(to_kms)?;
            self.buf.advance(take);
            left -= take as u64;
        }
        kms.stream.flush().await.map_err(to_kms)?;
        Ok(())
    }

    /// Reads KMS's answer head within `timeout_ms`, skipping interim answers.
    async fn answer_head(
        &mut self,
        close_after: bool,
        want_ids: bool,
    ) -> Result<head::ResponseHead, ProxyError> {
        let upstream = &self.shared.upstream;
        let timeout = upstream.timeout();
        let keep_alive_secs = self.shared.limits.idle_timeout.as_secs();
        let timer = &mut self.kms_timer;
        let kms = self.kms.as_mut().expect("connected");
        let reading = async {
            loop {
                if !kms.buf.is_empty() {
                    match parse_response(&kms.buf, close_after, want_ids, keep_alive_secs) {
                        // An interim answer (100, 103): skipped, and what follows it in the
                        // buffer parsed before anything more is read.
                        Ok(Parsed::Complete(head)) if head.status < 200 => {
                            kms.buf.advance(head.len);
                            continue;
                        }
                        Ok(Parsed::Complete(head)) => {
                            kms.buf.advance(head.len);
                            return Ok(head);
                        }
                        Ok(_) => {}
                        Err(error) => {
                            return Err(format!("KMS's answer is not valid HTTP/1.1: {error}"))
                        }
                    }
                }
                kms.buf.reserve(READ_CHUNK);
                match kms.stream.read_buf(&mut kms.buf).await {
                    Ok(0) => return Err("KMS closed the connection before answering".to_owned()),
                    Ok(_) => {}
                    Err(error) => return Err(format!("reading KMS's answer failed: {error}")),
                }
            }
        };
        match timer.within(timeout, reading).await {
            Ok(Ok(head)) => Ok(head),
            Ok(Err(message)) => {
                self.shared
                    .metrics
                    .upstream_error(UpstreamErrorKind::connect);
                Err(ProxyError::UpstreamBroken(message))
            }
            Err(_) => {
                self.shared
                    .metrics
                    .upstream_error(UpstreamErrorKind::timeout);
                Err(ProxyError::UpstreamTimeout(timeout.as_millis()))
            }
        }
    }

    /// Streams KMS's answer to the client as it arrives.
    async fn relay_answer(&mut self, close_after: bool) -> Result<Relayed, RelayError> {
        let answer = self
            .answer_head(close_after, false)
            .await
            .map_err(RelayError::Kms)?;
        let kms = self.kms.as_mut().expect("connected");
        let client = &mut self.client;
        let mut out = answer.rewritten;
        let broken = |metrics: &crate::metrics::Metrics| {
            metrics.upstream_error(UpstreamErrorKind::response);
            RelayError::Broken
        };
        let metrics = &self.shared.metrics;
        match answer.framing {
            Framing::Empty => client
                .write_all(&out)
                .await
                .map_err(|_| RelayError::ClientGone)?,
            Framing::Length(length) => {
                let mut left = length;
                let take = kms
                    .buf
                    .len()
                    .min(usize::try_from(left).unwrap_or(usize::MAX));
                out.extend_from_slice(&kms.buf[..take]);
                kms.buf.advance(take);
                left -= take as u64;
                client
                    .write_all(&out)
                    .await
                    .map_err(|_| RelayError::ClientGone)?;
                while left > 0 {
                    kms.buf.reserve(READ_CHUNK);
                    match kms.stream.read_buf(&mut kms.buf).await {
                        Ok(n) if n > 0 => {}
                        _ => return Err(broken(metrics)),
                    }
                    let take = kms
                        .buf
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    client
                        .write_all(&kms.buf[..take])
                        .await
                        .map_err(|_| RelayError::ClientGone)?;
                    kms.buf.advance(take);
                    left -= take as u64;
                }
            }
            Framing::Chunked => {
                let mut scanner = ChunkedScanner::new();
                loop {
                    let (take, done) = scanner.scan(&kms.buf, None).map_err(|_| broken(metrics))?;
                    out.extend_from_slice(&kms.buf[..take]);
                    kms.buf.advance(take);
                    client
                        .write_all(&out)
                        .await
                        .map_err(|_| RelayError::ClientGone)?;
                    out.clear();
                    if done {
                        break;
                    }
                    kms.buf.reserve(READ_CHUNK);
                    match kms.stream.read_buf(&mut kms.buf).await {
                        Ok(n) if n > 0 => {}
                        _ => return Err(broken(metrics)),
                    }
                }
            }
            Framing::UntilClose => {
                out.extend_from_slice(&kms.buf);
                kms.buf.clear();
                client
                    .write_all(&out)
                    .await
                    .map_err(|_| RelayError::ClientGone)?;
                loop {
                    kms.buf.reserve(READ_CHUNK);
                    match kms.stream.read_buf(&mut kms.buf).await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(_) => return Err(broken(metrics)),
                    }
                    client
                        .write_all(&kms.buf)
                        .await
                        .map_err(|_| RelayError::ClientGone)?;
                    kms.buf.clear();
                }
            }
        }
        client.flush().await.map_err(|_| RelayError::ClientGone)?;
        // Bytes after the answer are not an answer to anything: do not reuse the connection.
        Ok(Relayed {
            reusable: answer.reusable && kms.buf.is_empty(),
            until_close: answer.framing == Framing::UntilClose,
        })
    }

    /// Reads KMS's answer to a tag change whole (at most `MAX_INSPECTED_RESPONSE_BYTES`, within
    /// `timeout_ms` for the body as for the head).
    async fn read_answer(&mut self, close_after: bool) -> Result<WholeAnswer, ProxyError> {
        let answer = self.answer_head(close_after, true).await?;
        let timeout = self.shared.upstream.timeout();
        let timer = &mut self.kms_timer;
        let kms = self.kms.as_mut().expect("connected");
        let reading = async {
            let mut raw = Vec::new();
            let mut decoded = Vec::new();
            let mut scanner = ChunkedScanner::new();
            loop {
                let done = match answer.framing {
                    Framing::Empty => true,
                    Framing::Length(length) => {
                        let want = usize::try_from(length).unwrap_or(usize::MAX) - raw.len();
                        let take = kms.buf.len().min(want);
                        raw.extend_from_slice(&kms.buf[..take]);
                        kms.buf.advance(take);
                        raw.len() as u64 == length
                    }
                    Framing::Chunked => {
                        let (take, done) = scanner
                            .scan(&kms.buf, Some(&mut decoded))
                            .map_err(|e| e.to_string())?;
                        raw.extend_from_slice(&kms.buf[..take]);
                        kms.buf.advance(take);
                        done
                    }
                    Framing::UntilClose => {
                        raw.extend_from_slice(&kms.buf);
                        kms.buf.clear();
                        false
                    }
                };
                if done {
                    return Ok((raw, decoded));
                }
                if raw.len() > MAX_INSPECTED_RESPONSE_BYTES {
                    return Err("length limit exceeded".to_owned());
                }
                kms.buf.reserve(READ_CHUNK);
                match kms.stream.read_buf(&mut kms.buf).await {
                    Ok(0) if answer.framing == Framing::UntilClose => return Ok((raw, decoded)),
                    Ok(0) => return Err("the connection closed".to_owned()),
                    Ok(_) => {}
                    Err(error) => return Err(error.to_string()),
                }
            }
        };
        let (raw_body, decoded) = match timer.within(timeout, reading).await {
            Ok(Ok(bodies)) => bodies,
            Ok(Err(message)) => {
                self.shared
                    .metrics
                    .upstream_error(UpstreamErrorKind::response);
                return Err(ProxyError::UpstreamBroken(format!(
                    "the answer from KMS broke off: {message}"
                )));
            }
            Err(_) => {
                self.shared
                    .metrics
                    .upstream_error(UpstreamErrorKind::response);
                return Err(ProxyError::UpstreamTimeout(timeout.as_millis()));
            }
        };
        let reusable = answer.reusable && kms.buf.is_empty();
        let decoded = if answer.framing == Framing::Chunked {
            decoded
        } else {
            Vec::new()
        };
        Ok(WholeAnswer {
            status: answer.status,
            aws_request_id: answer.aws_request_id,
            aws_error_type: answer.aws_error_type,
            head: answer.rewritten,
            raw_body,
            decoded,
            reusable,
            until_close: answer.framing == Framing::UntilClose,
        })
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

    fn count(&self, operation: &'static str, outcome: Outcome, class: Class, started: Instant) {
        let seconds = started.elapsed().as_secs_f64();
        self.shared
            .metrics
            .request(operation, outcome, class, seconds);
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

/// KMS's whole answer to a tag change.
struct WholeAnswer {
    status: u16,
    aws_request_id: Option<String>,
    aws_error_type: Option<String>,
    /// The head for the client.
    head: Vec<u8>,
    /// The body as KMS framed it, relayed as it is.
    raw_body: Vec<u8>,
    /// The body without chunked framing, when it had it.
    decoded: Vec<u8>,
    reusable: bool,
    /// The body ended with the KMS connection; the client's connection ends too.
    until_close: bool,
}

/// What became of a streamed answer.
struct Relayed {
    /// The connection to KMS can carry another request.
    reusable: bool,
    /// The body ended with the KMS connection; the client's connection ends too.
    until_close: bool,
}

impl WholeAnswer {
    fn kms(&self) -> KmsAnswer<'_> {
        let body = if self.decoded.is_empty() {
            &self.raw_body
        } else {
            &self.decoded
        };
        KmsAnswer {
            status: self.status,
            aws_request_id: self.aws_request_id.clone(),
            aws_error_header: self.aws_error_type.clone(),
            body,
        }
    }
}

/// An answer of the proxy's own, as HTTP/1.1 bytes.
async fn serialise(
    response: Response<ProxyBody>,
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
