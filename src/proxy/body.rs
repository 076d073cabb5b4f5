//! The bodies the proxy streams: a peer's body passed on as it arrives, watched for a break.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::metrics::{Metrics, UpstreamErrorKind};

/// A peer's body, streamed. An answer from KMS that breaks off mid-body is counted as an upstream
/// error (once); the client sees the connection cut, never a short body that looks complete.
pub struct Streamed {
    inner: Incoming,
    count_break: Option<Arc<Metrics>>,
}

impl Streamed {
    /// A client's request body, passed on to KMS.
    pub fn from_client(inner: Incoming) -> Streamed {
        Streamed {
            inner,
            count_break: None,
        }
    }

    /// KMS's answer, passed on to the client.
    pub fn from_upstream(inner: Incoming, metrics: Arc<Metrics>) -> Streamed {
        Streamed {
            inner,
            count_break: Some(metrics),
        }
    }
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            if let Some(metrics) = self.count_break.take() {
                metrics.upstream_error(UpstreamErrorKind::response);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
