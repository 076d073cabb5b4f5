//! The connection to KMS a client connection holds on the fast path: opened at its first
//! request, reused while both stay open; the request written as the client sent it; KMS's answer
//! head read (interim answers skipped) and its body relayed as it arrives, or read whole for a
//! tag change's outcome record, both through one [`BodyWalker`].

use std::task::{Context, Poll, Waker};

use bytes::{Buf, BytesMut};
use http::Uri;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::chunked::ChunkedScanner;
use super::head::{forwarded_head, parse_response, Framing, Parsed, RequestHead, ResponseHead};
use super::{Connection, READ_CHUNK};
use crate::answer::ProxyError;
use crate::kms::answer::{KmsAnswer, MAX_ANSWER_BYTES};
use crate::kms::protocol::BodyCheck;
use crate::kms::Unreadable;
use crate::metrics::UpstreamErrorKind;
use crate::proxy::upstream::DirectStream;

/// The connection to KMS a client connection holds.
pub(super) struct Kms {
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
pub(super) enum RelayError {
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

/// Where an answer's body ends, whatever its framing: how much of what is buffered belongs to
/// it, and whether it has ended.
struct BodyWalker {
    framing: Framing,
    /// For `Framing::Length`: bytes still to come.
    left: u64,
    chunks: ChunkedScanner,
}

impl BodyWalker {
    fn new(framing: Framing) -> BodyWalker {
        BodyWalker {
            framing,
            left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunks: ChunkedScanner::new(),
        }
    }

    /// How many of `buf`'s bytes belong to the body, and whether they end it. For a chunked
    /// body, its data is appended to `decoded` when given.
    fn step(&mut self, buf: &[u8], decoded: Option<&mut Vec<u8>>) -> Result<(usize, bool), String> {
        match self.framing {
            Framing::Empty => Ok((0, true)),
            Framing::Length(_) => {
                let take = buf
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                self.left -= take as u64;
                Ok((take, self.left == 0))
            }
            Framing::Chunked => self.chunks.scan(buf, decoded).map_err(|e| e.to_string()),
            Framing::UntilClose => Ok((buf.len(), false)),
        }
    }

    /// Whether the body ends when KMS closes the connection.
    fn ends_at_close(&self) -> bool {
        self.framing == Framing::UntilClose
    }
}

/// KMS's whole answer to a tag change.
pub(super) struct WholeAnswer {
    status: u16,
    aws_request_id: Option<String>,
    aws_error_type: Option<String>,
    /// The head for the client.
    pub head: Vec<u8>,
    /// The body as KMS framed it, relayed as it is.
    pub raw_body: Vec<u8>,
    /// The body without chunked framing, when it had it.
    decoded: Option<Vec<u8>>,
    pub reusable: bool,
    /// The body ended with the KMS connection; the client's connection ends too.
    pub until_close: bool,
    /// The head arrived, then the body broke off: the answer to the client is this error,
    /// and the outcome record has the head's status.
    pub broken: Option<ProxyError>,
}

impl WholeAnswer {
    pub(super) fn kms(&self) -> KmsAnswer<'_> {
        KmsAnswer {
            status: self.status,
            aws_request_id: self.aws_request_id.clone(),
            aws_error_header: self.aws_error_type.clone(),
            body: self.decoded.as_deref().unwrap_or(&self.raw_body),
        }
    }
}

/// What became of a streamed answer.
pub(super) struct Relayed {
    /// The connection to KMS can carry another request.
    pub reusable: bool,
    /// The body ended with the KMS connection; the client's connection ends too.
    pub until_close: bool,
}

impl<I> Connection<'_, I>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
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
    pub(super) async fn send_within_timeout(
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
    ) -> Result<ResponseHead, ProxyError> {
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

    /// Streams KMS's answer to the client as it arrives: the head with the first piece of the
    /// body in one write, then each piece as it comes.
    pub(super) async fn relay_answer(&mut self, close_after: bool) -> Result<Relayed, RelayError> {
        let answer = self
            .answer_head(close_after, false)
            .await
            .map_err(RelayError::Kms)?;
        let metrics = &self.shared.metrics;
        let broken = || {
            metrics.upstream_error(UpstreamErrorKind::response);
            RelayError::Broken
        };
        let timeout = self.shared.upstream.timeout();
        let timer = &mut self.kms_timer;
        let kms = self.kms.as_mut().expect("connected");
        let client = &mut self.client;
        let mut walker = BodyWalker::new(answer.framing);
        let mut head = Some(answer.rewritten);
        loop {
            let (take, done) = walker.step(&kms.buf, None).map_err(|_| broken())?;
            let written = match head.take() {
                Some(mut out) => {
                    out.extend_from_slice(&kms.buf[..take]);
                    client.write_all(&out).await
                }
                None if take > 0 => client.write_all(&kms.buf[..take]).await,
                None => Ok(()),
            };
            written.map_err(|_| RelayError::ClientGone)?;
            kms.buf.advance(take);
            if done {
                break;
            }
            kms.buf.reserve(READ_CHUNK);
            // A body that stalls is cut off: at most `timeout_ms` between its pieces (the timer
            // stays armed across reads; only a wait that outlasts it costs timer work).
            match timer
                .within(timeout, kms.stream.read_buf(&mut kms.buf))
                .await
            {
                Ok(Ok(0)) if walker.ends_at_close() => break,
                Ok(Ok(n)) if n > 0 => {}
                _ => return Err(broken()),
            }
        }
        client.flush().await.map_err(|_| RelayError::ClientGone)?;
        // Bytes after the answer are not an answer to anything: do not reuse the connection.
        Ok(Relayed {
            reusable: answer.reusable && kms.buf.is_empty(),
            until_close: walker.ends_at_close(),
        })
    }

    /// Reads KMS's answer to a tag change whole (at most `MAX_ANSWER_BYTES`, within
    /// `timeout_ms` for the body as for the head). A body that breaks off after the head comes
    /// back as `broken`, with the head's status.
    pub(super) async fn read_answer(
        &mut self,
        close_after: bool,
    ) -> Result<WholeAnswer, ProxyError> {
        let answer = self.answer_head(close_after, true).await?;
        let timeout = self.shared.upstream.timeout();
        let timer = &mut self.kms_timer;
        let kms = self.kms.as_mut().expect("connected");
        let mut walker = BodyWalker::new(answer.framing);
        let reading = async {
            let mut raw = Vec::new();
            let mut decoded = Vec::new();
            loop {
                let (take, done) = walker.step(&kms.buf, Some(&mut decoded))?;
                raw.extend_from_slice(&kms.buf[..take]);
                kms.buf.advance(take);
                if done {
                    return Ok((raw, decoded));
                }
                if raw.len() > MAX_ANSWER_BYTES {
                    return Err("length limit exceeded".to_owned());
                }
                kms.buf.reserve(READ_CHUNK);
                match kms.stream.read_buf(&mut kms.buf).await {
                    Ok(0) if walker.ends_at_close() => return Ok((raw, decoded)),
                    Ok(0) => return Err("the connection closed".to_owned()),
                    Ok(_) => {}
                    Err(error) => return Err(error.to_string()),
                }
            }
        };
        let broken = |error: ProxyError| WholeAnswer {
            status: answer.status,
            aws_request_id: answer.aws_request_id.clone(),
            aws_error_type: answer.aws_error_type.clone(),
            head: Vec::new(),
            raw_body: Vec::new(),
            decoded: None,
            reusable: false,
            until_close: true,
            broken: Some(error),
        };
        let (raw_body, decoded) = match timer.within(timeout, reading).await {
            Ok(Ok(bodies)) => bodies,
            Ok(Err(message)) => {
                self.shared
                    .metrics
                    .upstream_error(UpstreamErrorKind::response);
                return Ok(broken(ProxyError::UpstreamBroken(format!(
                    "the answer from KMS broke off: {message}"
                ))));
            }
            Err(_) => {
                self.shared
                    .metrics
                    .upstream_error(UpstreamErrorKind::response);
                return Ok(broken(ProxyError::UpstreamTimeout(timeout.as_millis())));
            }
        };
        Ok(WholeAnswer {
            broken: None,
            status: answer.status,
            aws_request_id: answer.aws_request_id,
            aws_error_type: answer.aws_error_type,
            head: answer.rewritten,
            raw_body,
            decoded: (answer.framing == Framing::Chunked).then_some(decoded),
            reusable: answer.reusable && kms.buf.is_empty(),
            until_close: answer.framing == Framing::UntilClose,
        })
    }
}
