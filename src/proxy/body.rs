//! The bodies the proxy streams: a peer's body passed on as it arrives, watched as it passes.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::kms::protocol::BodyCheck;
use crate::kms::Unreadable;
use crate::metrics::{Metrics, UpstreamErrorKind};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body the proxy streams from a peer, or one it holds whole.
pub type ProxyBody = Either<Streamed, Full<Bytes>>;

/// A client's body cut off because it showed another protocol's shape (or carried trailers).
#[derive(Debug, thiserror::Error)]
#[error("the request body was refused: {0}")]
pub struct BodyRefused(pub Unreadable);

/// KMS sent no piece of its answer for longer than `timeout_ms`.
#[derive(Debug, thiserror::Error)]
#[error("KMS sent nothing more of its answer for {0} ms ([upstream].timeout_ms); the answer was cut off")]
pub struct AnswerStalled(pub u128);

/// A peer's body, streamed. A client's body is checked as it passes ([`BodyCheck`]): the first
/// chunk that shows another protocol's shape ends the stream with an error, so the upstream
/// never receives the body whole, and the reason is left in `refusal` for the answer. Its last
/// piece is held back until the stream shows whether trailers follow, so that a body forwarded
/// with its Content-Length (after which hyper stops reading it) never reaches KMS whole when
/// trailers come after it.
///
/// An answer from KMS that breaks off mid-body is counted as an upstream error (once); the
/// client sees the connection cut, never a short body that looks complete. An answer that
/// stalls (no piece for `timeout_ms`) is cut off the same way.
pub struct Streamed {
    inner: Incoming,
    count_break: Option<Arc<Metrics>>,
    check: Option<(BodyCheck, Arc<OnceLock<Unreadable>>)>,
    /// A client's piece that completed its declared length, held until the next frame.
    held: Option<Frame<Bytes>>,
    /// The inner body has ended.
    ended: bool,
    gap: Option<Gap>,
    /// Called once when an answer has been read to its end.
    on_end: Option<Box<dyn FnOnce() + Send>>,
}

/// The longest wait for the next piece of an answer, and the timer of the current wait.
struct Gap {
    max: Duration,
    sleep: Pin<Box<Sleep>>,
    armed: bool,
}

impl Streamed {
    /// A client's request body, passed on to KMS and checked on the way.
    pub fn from_client(inner: Incoming, refusal: Arc<OnceLock<Unreadable>>) -> Streamed {
        Streamed {
            inner,
            count_break: None,
            check: Some((BodyCheck::new(), refusal)),
            held: None,
            ended: false,
            gap: None,
            on_end: None,
        }
    }

    /// KMS's answer, passed on to the client: cut off when no piece of it comes for `max_gap`;
    /// `on_end` runs once it has been read to its end.
    pub fn from_upstream(
        inner: Incoming,
        metrics: Arc<Metrics>,
        max_gap: Duration,
        on_end: Option<Box<dyn FnOnce() + Send>>,
    ) -> Streamed {
        let mut body = Streamed {
            inner,
            count_break: Some(metrics),
            check: None,
            held: None,
            ended: false,
            gap: Some(Gap {
                max: max_gap,
                sleep: Box::pin(tokio::time::sleep(max_gap)),
                armed: false,
            }),
            on_end,
        };
        if body.inner.is_end_stream() {
            body.end();
        }
        body
    }

    fn end(&mut self) {
        self.ended = true;
        if let Some(on_end) = self.on_end.take() {
            on_end();
        }
    }

    /// Checks a client's frame; `Err` ends the stream for good.
    fn checked(&mut self, frame: &Frame<Bytes>) -> Result<(), BodyRefused> {
        if let Some((check, refusal)) = &mut self.check {
            let checked = match frame.data_ref() {
                Some(data) => check.feed(data),
                // Trailers could carry a second X-Amz-Target that some reader merges.
                None => Err(Unreadable::Trailers),
            };
            if let Err(reason) = checked {
                let _ = refusal.set(reason.clone());
                return Err(BodyRefused(reason));
            }
        }
        Ok(())
    }
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some((_, refusal)) = &this.check {
            if let Some(reason) = refusal.get() {
                // Refused once, refused for good: never a later chunk, never a clean end.
                return Poll::Ready(Some(Err(Box::new(BodyRefused(reason.clone())))));
            }
        }
        loop {
            if this.ended {
                return Poll::Ready(this.held.take().map(Ok));
            }
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            match polled {
                Poll::Pending => {
                    if let Some(gap) = &mut this.gap {
                        if !gap.armed {
                            let deadline = tokio::time::Instant::now() + gap.max;
                            gap.sleep.as_mut().reset(deadline);
                            gap.armed = true;
                        }
                        if gap.sleep.as_mut().poll(cx).is_ready() {
                            let max = gap.max.as_millis();
                            this.gap = None;
                            this.ended = true;
                            this.on_end = None;
                            if let Some(metrics) = this.count_break.take() {
                                metrics.upstream_error(UpstreamErrorKind::response);
                            }
                            return Poll::Ready(Some(Err(Box::new(AnswerStalled(max)))));
                        }
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    this.end();
                    return Poll::Ready(this.held.take().map(Ok));
                }
                Poll::Ready(Some(Err(error))) => {
                    this.on_end = None;
                    if let Some(metrics) = this.count_break.take() {
                        metrics.upstream_error(UpstreamErrorKind::response);
                    }
                    return Poll::Ready(Some(Err(error.into())));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(gap) = &mut this.gap {
                        gap.armed = false;
                    }
                    if this.check.is_none() {
                        if this.inner.is_end_stream() {
                            this.end();
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    if let Err(refused) = this.checked(&frame) {
                        this.held = None;
                        return Poll::Ready(Some(Err(Box::new(refused))));
                    }
                    // After the piece that completes a declared length hyper reads no more:
                    // hold it until the stream shows how it ends.
                    if let Some(previous) = this.held.take() {
                        // Only an empty piece can follow a completed length.
                        if frame.data_ref().is_some_and(|d| d.is_empty()) {
                            this.held = Some(previous);
                            continue;
                        }
                        this.held = Some(frame);
                        return Poll::Ready(Some(Ok(previous)));
                    }
                    let completes = this.inner.size_hint().exact() == Some(0);
                    if completes && !this.inner.is_end_stream() {
                        this.held = Some(frame);
                        continue;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let held = self
            .held
            .as_ref()
            .and_then(|f| f.data_ref())
            .map_or(0, |d| d.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}
