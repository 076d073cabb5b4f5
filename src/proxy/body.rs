//! The bodies the proxy streams: a peer's body passed on as it arrives, watched as it passes.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

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

/// A peer's body, streamed. A client's body is checked as it passes ([`BodyCheck`]): the first
/// chunk that shows another protocol's shape ends the stream with an error, so the upstream
/// never receives the body whole, and the reason is left in `refusal` for the answer. An answer
/// from KMS that breaks off mid-body is counted as an upstream error (once); the client sees the
/// connection cut, never a short body that looks complete.
pub struct Streamed {
    inner: Incoming,
    count_break: Option<Arc<Metrics>>,
    check: Option<(BodyCheck, Arc<OnceLock<Unreadable>>)>,
}

impl Streamed {
    /// A client's request body, passed on to KMS and checked on the way.
    pub fn from_client(inner: Incoming, refusal: Arc<OnceLock<Unreadable>>) -> Streamed {
        Streamed {
            inner,
            count_break: None,
            check: Some((BodyCheck::new(), refusal)),
        }
    }

    /// KMS's answer, passed on to the client.
    pub fn from_upstream(inner: Incoming, metrics: Arc<Metrics>) -> Streamed {
        Streamed {
            inner,
            count_break: Some(metrics),
            check: None,
        }
    }
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some((_, refusal)) = &self.check {
            if let Some(reason) = refusal.get() {
                // Refused once, refused for good: never a later chunk, never a clean end.
                return Poll::Ready(Some(Err(Box::new(BodyRefused(reason.clone())))));
            }
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Err(_))) => {
                if let Some(metrics) = self.count_break.take() {
                    metrics.upstream_error(UpstreamErrorKind::response);
                }
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some((check, refusal)) = &mut self.check {
                    let checked = match frame.data_ref() {
                        Some(data) => check.feed(data),
                        // Trailers could carry a second X-Amz-Target that some reader merges.
                        None => Err(Unreadable::Trailers),
                    };
                    if let Err(reason) = checked {
                        let _ = refusal.set(reason.clone());
                        return Poll::Ready(Some(Err(Box::new(BodyRefused(reason)))));
                    }
                }
            }
            _ => {}
        }
        polled.map(|frame| frame.map(|result| result.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
