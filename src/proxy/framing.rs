//! How an answer from KMS says where its body ends, checked the same way on both serving paths:
//! the fast path runs it over the raw head it parses, the general server over the head hyper
//! parsed. An answer a reader could frame another way (a `101`, a Transfer-Encoding other than
//! one `chunked`, a Content-Length that is not one number, or both headers) is not relayed: the
//! client gets a 502.

use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::HeaderMap;

/// Why an answer's framing is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadFraming {
    #[error("the answer switches protocols")]
    SwitchingProtocols,
    #[error("the answer's framing is ambiguous (Transfer-Encoding {0:?})")]
    TransferEncoding(String),
    #[error("the answer's framing is ambiguous (chunked, with a Content-Length)")]
    Both,
    #[error("the answer's Content-Length is not one number")]
    Length,
}

/// The framing headers of one answer, fed one header at a time.
#[derive(Debug, Default)]
pub(crate) struct AnswerFraming {
    chunked: bool,
    length: Option<u64>,
}

impl AnswerFraming {
    /// A `101` is never an answer to a KMS request: nothing asked to switch protocols.
    pub(crate) fn new(status: u16) -> Result<AnswerFraming, BadFraming> {
        if status == 101 {
            return Err(BadFraming::SwitchingProtocols);
        }
        Ok(AnswerFraming::default())
    }

    /// Takes one header; `Ok(true)` when it was a framing header (Transfer-Encoding or
    /// Content-Length), which the caller need not look at again.
    #[inline]
    pub(crate) fn header(&mut self, name: &[u8], value: &[u8]) -> Result<bool, BadFraming> {
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if self.chunked || !value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(BadFraming::TransferEncoding(
                    String::from_utf8_lossy(value).into_owned(),
                ));
            }
            self.chunked = true;
            Ok(true)
        } else if name.eq_ignore_ascii_case(b"content-length") {
            if self.length.is_some() {
                return Err(BadFraming::Length);
            }
            self.length = Some(digits(value.trim_ascii()).ok_or(BadFraming::Length)?);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Whether the body is chunked, and its Content-Length.
    pub(crate) fn finish(self) -> Result<(bool, Option<u64>), BadFraming> {
        if self.chunked && self.length.is_some() {
            return Err(BadFraming::Both);
        }
        Ok((self.chunked, self.length))
    }
}

/// The check on an answer head hyper has parsed (the general server's upstream answers).
pub(crate) fn check_answer(status: u16, headers: &HeaderMap) -> Result<(), BadFraming> {
    let mut framing = AnswerFraming::new(status)?;
    for (name, values) in [
        (TRANSFER_ENCODING, headers.get_all(TRANSFER_ENCODING)),
        (CONTENT_LENGTH, headers.get_all(CONTENT_LENGTH)),
    ] {
        for value in values {
            framing.header(name.as_str().as_bytes(), value.as_bytes())?;
        }
    }
    framing.finish().map(|_| ())
}

/// A decimal number of digits only, as Content-Length must be.
pub(crate) fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn refuses_every_answer_a_reader_could_frame_another_way() {
        let ok: &[&[(&str, &str)]] = &[
            &[],
            &[("content-length", "12")],
            &[("transfer-encoding", "chunked")],
            &[("transfer-encoding", " Chunked ")],
        ];
        for pairs in ok {
            assert_eq!(check_answer(200, &headers(pairs)), Ok(()), "{pairs:?}");
        }
        let bad: &[(u16, &[(&str, &str)])] = &[
            (101, &[]),
            (
                200,
                &[("transfer-encoding", "chunked"), ("content-length", "3")],
            ),
            (200, &[("transfer-encoding", "gzip, chunked")]),
            (200, &[("transfer-encoding", "identity")]),
            (
                200,
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked"),
                ],
            ),
            (200, &[("content-length", "3"), ("content-length", "3")]),
            (200, &[("content-length", "+3")]),
            (200, &[("content-length", "3, 3")]),
        ];
        for (status, pairs) in bad {
            assert!(
                check_answer(*status, &headers(pairs)).is_err(),
                "{status} {pairs:?}"
            );
        }
    }
}
