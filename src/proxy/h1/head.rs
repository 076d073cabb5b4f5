//! HTTP/1.1 heads on the fast path.
//!
//! A request head is taken only in one narrow, canonical shape (below); anything else goes to the
//! general server, which parses and normalises it. A head in that shape reads the same to every
//! HTTP/1.1 parser, so its bytes can be forwarded exactly as the client sent and signed them.
//! An answer from KMS is parsed and its head written anew for the client, without the hop-by-hop
//! headers.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Uri, Version};

use crate::proxy::framing::{digits, AnswerFraming, BadFraming};
use crate::proxy::headers::is_hop_by_hop;

/// More headers than any KMS request or answer carries; a head with more goes to the general
/// server (requests) or is refused (answers).
const MAX_HEADERS: usize = 64;

/// The longest head the fast path reads, like the general server's buffer: beyond it, the
/// general server answers 431.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// What the fast path makes of the bytes read so far.
pub(crate) enum Parsed<T> {
    /// A complete head in the shape the fast path takes.
    Complete(T),
    /// The head is not complete yet.
    Partial,
    /// Not a head the fast path takes: hand the connection to the general server.
    Other,
}

/// A request head in the fast path's shape: `POST / HTTP/1.1`, lines ending in CRLF, header
/// values that are header values, at most one Content-Length of digits, and of the hop-by-hop
/// headers only `Connection: keep-alive|close` and `Keep-Alive`.
#[derive(Debug)]
pub(crate) struct RequestHead {
    pub parts: Parts,
    /// Bytes of the head, final empty line included.
    pub len: usize,
    /// The Content-Length; none declared (and no Transfer-Encoding) is an empty body.
    pub body_len: u64,
    /// The client asked to close the connection after this request.
    pub close: bool,
    /// Byte ranges of the Connection and Keep-Alive lines, which are not forwarded.
    pub hop_lines: Vec<(usize, usize)>,
}

pub(crate) fn parse_request(buf: &[u8]) -> Parsed<RequestHead> {
    // A head that starts with empty lines is one some parsers skip and others do not.
    if buf.first().is_some_and(|b| *b == b'\r' || *b == b'\n') {
        return Parsed::Other;
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut slots);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => return Parsed::Partial,
        _ => return Parsed::Other,
    };
    if request.method != Some("POST") || request.path != Some("/") || request.version != Some(1) {
        return Parsed::Other;
    }
    let head = &buf[..len];
    if !crlf_only(head) {
        return Parsed::Other;
    }
    let mut headers = HeaderMap::with_capacity(request.headers.len());
    let mut close = false;
    let mut hop_lines = Vec::new();
    // One copy of the head holds every header value, instead of an allocation per value.
    let values = Bytes::copy_from_slice(head);
    for h in request.headers.iter() {
        let name = match read_name(h.name.as_bytes()) {
            Name::Connection => {
                match connection_says_close(h.value) {
                    Some(c) => close |= c,
                    None => return Parsed::Other,
                }
                hop_lines.push(line_of(head, h.name.as_ptr()));
                header::CONNECTION
            }
            Name::KeepAlive => {
                hop_lines.push(line_of(head, h.name.as_ptr()));
                KEEP_ALIVE
            }
            Name::Other(name) => name,
            // Framing, upgrades, proxy credentials, 100-continue: the general server's.
            Name::NotTaken => return Parsed::Other,
        };
        let value = if h.value.is_empty() {
            Ok(HeaderValue::from_static(""))
        } else {
            let at = h.value.as_ptr() as usize - head.as_ptr() as usize;
            HeaderValue::from_maybe_shared(values.slice(at..at + h.value.len()))
        };
        let Ok(value) = value else {
            return Parsed::Other;
        };
        headers.append(name, value);
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let body_len = match (lengths.next(), lengths.next()) {
        (None, _) => 0,
        (Some(v), None) => match digits(v.as_bytes()) {
            Some(n) => n,
            None => return Parsed::Other,
        },
        (Some(_), Some(_)) => return Parsed::Other,
    };
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = Method::POST;
    parts.uri = Uri::from_static("/");
    parts.version = Version::HTTP_11;
    parts.headers = headers;
    Parsed::Complete(RequestHead {
        parts,
        len,
        body_len,
        close,
        hop_lines,
    })
}

/// A request head the fast path neither takes nor hands over, because the general server's
/// parser would refuse it too, with a bare status of its own: it is refused here, in the KMS
/// shape, with an audit record when it may be a tag change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Malformed {
    #[error("the request head is larger than {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("the request head has more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("the request head is not valid HTTP/1.1 ({0}); HTTP/1.1 readers differ on such heads (obs-fold, whitespace before a colon, control characters)")]
    Syntax(String),
    #[error("the request's framing is ambiguous: {0}")]
    Framing(&'static str),
}

/// The start of the HTTP/2 connection preface: handed to the general server, which speaks h2.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// For a head [`parse_request`] did not take: `Some` when the general server's parser would
/// refuse it too (or its framing could be read two ways), `None` when the general server takes
/// it (another method, path or version, chunked, `Expect`, HTTP/2's preface, bare LF lines).
pub(crate) fn malformed(buf: &[u8]) -> Option<Malformed> {
    let preface_len = buf.len().min(H2_PREFACE.len());
    if buf[..preface_len] == H2_PREFACE[..preface_len] {
        return None;
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut slots);
    match request.parse(buf) {
        Err(httparse::Error::TooManyHeaders) => return Some(Malformed::TooManyHeaders),
        Err(error) => return Some(Malformed::Syntax(error.to_string())),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Some(Malformed::TooLarge)
        }
        Ok(httparse::Status::Partial) => return None,
        Ok(httparse::Status::Complete(_)) => {}
    }
    let named = |name: &'static [u8]| -> Vec<&[u8]> {
        request
            .headers
            .iter()
            .filter(|h| h.name.as_bytes().eq_ignore_ascii_case(name))
            .map(|h| h.value.trim_ascii())
            .collect()
    };
    let encodings = named(b"transfer-encoding");
    let lengths = named(b"content-length");
    match encodings.as_slice() {
        [] => {}
        [one] if one.eq_ignore_ascii_case(b"chunked") => {
            if request.version != Some(1) {
                return Some(Malformed::Framing(
                    "Transfer-Encoding in an HTTP/1.0 request",
                ));
            }
            if !lengths.is_empty() {
                return Some(Malformed::Framing(
                    "both Transfer-Encoding and Content-Length; send one",
                ));
            }
        }
        [_] => {
            return Some(Malformed::Framing(
                "a Transfer-Encoding other than exactly \"chunked\"",
            ))
        }
        _ => return Some(Malformed::Framing("more than one Transfer-Encoding header")),
    }
    match lengths.as_slice() {
        [] => None,
        [one] if digits(one).is_some() => None,
        [_] => Some(Malformed::Framing("a Content-Length that is not a number")),
        _ => Some(Malformed::Framing("more than one Content-Length header")),
    }
}

/// A request head as the most lenient reader would see it, for deciding whether a refused head
/// may be a tag change and for its audit record: lines split at LF (a CR before it dropped),
/// obs-fold continuations joined to the line before, names trimmed and lower-cased, values
/// trimmed. Lines that cannot be read at all are skipped.
pub(crate) struct LenientHead {
    pub method: Option<Method>,
    pub uri: Option<Uri>,
    pub headers: HeaderMap,
}

pub(crate) fn lenient_read(buf: &[u8]) -> LenientHead {
    let end = memchr::memmem::find(buf, b"\r\n\r\n")
        .or_else(|| memchr::memmem::find(buf, b"\n\n"))
        .unwrap_or(buf.len());
    let mut lines = buf[..end]
        .split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .skip_while(|line| line.is_empty());
    let mut method = None;
    let mut uri = None;
    if let Some(request_line) = lines.next() {
        let mut parts = request_line
            .split(|b| b.is_ascii_whitespace())
            .filter(|p| !p.is_empty());
        method = parts.next().and_then(|m| Method::from_bytes(m).ok());
        uri = parts.next().and_then(|u| Uri::try_from(u).ok());
    }
    let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for line in lines {
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            if let Some((_, value)) = fields.last_mut() {
                value.push(b' ');
                value.extend_from_slice(line.trim_ascii());
            }
            continue;
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let name = line[..colon].trim_ascii().to_ascii_lowercase();
        fields.push((name, line[colon + 1..].trim_ascii().to_vec()));
    }
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, value) in fields {
        let Ok(name) = HeaderName::from_bytes(&name) else {
            continue;
        };
        // A value no header can hold still counts: as a value no check will accept.
        let value = HeaderValue::from_bytes(&value)
            .unwrap_or_else(|_| HeaderValue::from_static("(unreadable)"));
        headers.append(name, value);
    }
    LenientHead {
        method,
        uri,
        headers,
    }
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// A request header's name, as the fast path sees it.
enum Name {
    Connection,
    KeepAlive,
    /// Another hop-by-hop header, `Expect`, or not a valid name: the general server's.
    NotTaken,
    Other(HeaderName),
}

/// Reads a header name in one lowercase pass. The names every SDK request carries come from
/// constants, so that naming them costs no allocation; any other is parsed by
/// `HeaderName::from_bytes`, which gives the same name.
fn read_name(raw: &[u8]) -> Name {
    // Longer than every name matched below, hop-by-hop ones included (a test checks).
    let mut lower = [0u8; 24];
    let Some(lower) = lower.get_mut(..raw.len()) else {
        return HeaderName::from_bytes(raw).map_or(Name::NotTaken, Name::Other);
    };
    for (to, from) in lower.iter_mut().zip(raw) {
        *to = from.to_ascii_lowercase();
    }
    let known = match &*lower {
        b"connection" => return Name::Connection,
        b"keep-alive" => return Name::KeepAlive,
        b"expect" => return Name::NotTaken,
        hop if is_hop_by_hop(hop) => return Name::NotTaken,
        b"host" => header::HOST,
        b"content-type" => header::CONTENT_TYPE,
        b"content-length" => header::CONTENT_LENGTH,
        b"authorization" => header::AUTHORIZATION,
        b"user-agent" => header::USER_AGENT,
        b"x-amz-target" => HeaderName::from_static("x-amz-target"),
        b"x-amz-date" => HeaderName::from_static("x-amz-date"),
        b"x-amz-security-token" => HeaderName::from_static("x-amz-security-token"),
        b"x-amz-content-sha256" => HeaderName::from_static("x-amz-content-sha256"),
        b"x-amz-user-agent" => HeaderName::from_static("x-amz-user-agent"),
        b"amz-sdk-invocation-id" => HeaderName::from_static("amz-sdk-invocation-id"),
        b"amz-sdk-request" => HeaderName::from_static("amz-sdk-request"),
        _ => match HeaderName::from_bytes(raw) {
            Ok(name) => name,
            Err(_) => return Name::NotTaken,
        },
    };
    Name::Other(known)
}

/// Every line ends in CRLF, and CR appears nowhere else: every CR is followed by LF and every LF
/// follows a CR, so for each pair of neighbouring bytes, the first is CR exactly when the second
/// is LF. One branch-free pass the compiler vectorises (stopping at each CR and LF cost about
/// 1,600 instructions per SDK head).
fn crlf_only(head: &[u8]) -> bool {
    let (Some(first), Some(last)) = (head.first(), head.last()) else {
        return true;
    };
    if *first == b'\n' || *last == b'\r' {
        return false;
    }
    let mismatched = head.iter().zip(&head[1..]).fold(0u8, |bad, (a, b)| {
        bad | u8::from((*a == b'\r') != (*b == b'\n'))
    });
    mismatched == 0
}

/// The first `crlf_only`, kept as the oracle of its property test.
#[cfg(test)]
fn crlf_only_by_search(head: &[u8]) -> bool {
    let mut expect_lf_at = None;
    for at in memchr::memchr2_iter(b'\r', b'\n', head) {
        match (head[at], expect_lf_at) {
            (b'\r', None) => expect_lf_at = Some(at + 1),
            (b'\n', Some(lf)) if lf == at => expect_lf_at = None,
            _ => return false,
        }
    }
    expect_lf_at.is_none()
}

/// `Some(true)` for a Connection header of `close`, `Some(false)` for `keep-alive`; `None` for
/// anything else, which names headers to drop and is left to the general server.
fn connection_says_close(value: &[u8]) -> Option<bool> {
    let mut close = false;
    for token in value.split(|b| *b == b',') {
        let token = token.trim_ascii();
        if token.eq_ignore_ascii_case(b"close") {
            close = true;
        } else if !token.eq_ignore_ascii_case(b"keep-alive") {
            return None;
        }
    }
    Some(close)
}

/// The byte range of the header line whose name starts at `name` (a pointer into `head`).
fn line_of(head: &[u8], name: *const u8) -> (usize, usize) {
    let start = name as usize - head.as_ptr() as usize;
    let end = head[start..]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(head.len(), |p| start + p + 2);
    (start, end)
}

/// How an answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// No length: the body runs until KMS closes the connection.
    UntilClose,
}

/// An answer's head, written anew for the client.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub status: u16,
    /// Bytes of the head as KMS sent it.
    pub len: usize,
    /// The head for the client: `HTTP/1.1`, without hop-by-hop headers.
    pub rewritten: Vec<u8>,
    pub framing: Framing,
    /// Whether the connection to KMS can carry another request after this answer.
    pub reusable: bool,
    pub aws_request_id: Option<String>,
    pub aws_error_type: Option<String>,
}

/// Why an answer from KMS cannot be relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadResponse {
    #[error("the answer's head could not be parsed: {0}")]
    Parse(String),
    #[error("the answer's head is larger than {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("{0}")]
    Framing(#[from] BadFraming),
}

/// Parses an answer's head. Interim (1xx) answers come back as `Ok(Complete)` with status < 200:
/// the caller skips them.
/// `want_ids`: also read the request id and error type (for an outcome record).
pub(crate) fn parse_response(
    buf: &[u8],
    close_after: bool,
    want_ids: bool,
    keep_alive_secs: u64,
) -> Result<Parsed<ResponseHead>, BadResponse> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => return Ok(Parsed::Partial),
        Ok(httparse::Status::Partial) => return Err(BadResponse::TooLarge),
        Err(error) => return Err(BadResponse::Parse(error.to_string())),
    };
    let status = response.code.unwrap_or(0);
    // The same check as the general server's (`framing::check_answer`), fed as the head is read.
    let mut framing = AnswerFraming::new(status)?;
    let mut reusable = response.version == Some(1);
    let mut aws_request_id = None;
    let mut aws_error_type = None;
    let mut dropped: Vec<&[u8]> = Vec::new();
    for h in response.headers.iter() {
        let name = h.name.as_bytes();
        if framing.header(name, h.value)? {
            continue;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    reusable = false;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                    dropped.push(token);
                }
            }
        } else if !want_ids {
            continue;
        } else if name.eq_ignore_ascii_case(b"x-amzn-requestid") {
            aws_request_id = Some(String::from_utf8_lossy(h.value).into_owned());
        } else if name.eq_ignore_ascii_case(b"x-amzn-errortype") {
            aws_error_type = Some(String::from_utf8_lossy(h.value).into_owned());
        }
    }
    let (chunked, length) = framing.finish()?;
    let framing = match (status, chunked, length) {
        (100..=199 | 204 | 304, _, _) => Framing::Empty,
        (_, true, _) => Framing::Chunked,
        (_, false, Some(n)) => Framing::Length(n),
        (_, false, None) => Framing::UntilClose,
    };
    if framing == Framing::UntilClose {
        reusable = false;
    }
    let mut rewritten = Vec::with_capacity(len + 32);
    rewritten.extend_from_slice(b"HTTP/1.1 ");
    match http::StatusCode::from_u16(status) {
        Ok(code) => rewritten.extend_from_slice(code.as_str().as_bytes()),
        Err(_) => return Err(BadResponse::Parse(format!("status {status}"))),
    }
    rewritten.push(b' ');
    rewritten.extend_from_slice(response.reason.unwrap_or("").as_bytes());
    rewritten.extend_from_slice(b"\r\n");
    for h in response.headers.iter() {
        let name = h.name.as_bytes();
        // The body is relayed by these, so the client must see them whatever Connection names.
        let frames_body = name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"transfer-encoding");
        let hop = is_hop_by_hop(name) || dropped.iter().any(|n| n.eq_ignore_ascii_case(name));
        if hop && !frames_body {
            continue;
        }
        rewritten.extend_from_slice(name);
        rewritten.extend_from_slice(b": ");
        rewritten.extend_from_slice(h.value);
        rewritten.extend_from_slice(b"\r\n");
    }
    if close_after || framing == Framing::UntilClose {
        rewritten.extend_from_slice(b"connection: close\r\n");
    } else if status >= 200 {
        // The client's agent retires the connection before the proxy's idle timeout closes it.
        keep_alive_hint(&mut rewritten, keep_alive_secs);
    }
    rewritten.extend_from_slice(b"\r\n");
    Ok(Parsed::Complete(ResponseHead {
        status,
        len,
        rewritten,
        framing,
        reusable,
        aws_request_id,
        aws_error_type,
    }))
}

/// `keep-alive: timeout=N`: how long the proxy keeps an idle connection, so that clients (Node's
/// agent honours it) stop using it before then.
pub(crate) fn keep_alive_hint(out: &mut Vec<u8>, secs: u64) {
    use std::io::Write as _;
    // Formatted straight into `out`: no string of its own on every answer relayed.
    let _ = write!(out, "keep-alive: timeout={secs}\r\n");
}

/// The head to forward: the client's bytes, without the Connection and Keep-Alive lines.
pub(crate) fn forwarded_head(head: &[u8], hop_lines: &[(usize, usize)]) -> Bytes {
    let mut out = Vec::with_capacity(head.len());
    let mut at = 0;
    for &(start, end) in hop_lines {
        out.extend_from_slice(&head[at..start]);
        at = end;
    }
    out.extend_from_slice(&head[at..]);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENCRYPT: &[u8] = b"POST / HTTP/1.1\r\nHost: kms.us-east-1.amazonaws.com\r\nX-Amz-Target: TrentService.Encrypt\r\nContent-Length: 2\r\n\r\n{}";

    fn complete(buf: &[u8]) -> RequestHead {
        match parse_request(buf) {
            Parsed::Complete(head) => head,
            Parsed::Partial => panic!("partial: {:?}", String::from_utf8_lossy(buf)),
            Parsed::Other => panic!("other: {:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn is_other(buf: &[u8]) -> bool {
        matches!(parse_request(buf), Parsed::Other)
    }

    #[test]
    fn a_plain_sdk_request_is_taken() {
        let head = complete(ENCRYPT);
        assert_eq!(head.len, ENCRYPT.len() - 2);
        assert_eq!(head.body_len, 2);
        assert!(!head.close && head.hop_lines.is_empty());
        assert_eq!(head.parts.headers["x-amz-target"], "TrentService.Encrypt");
        assert!(matches!(parse_request(&ENCRYPT[..30]), Parsed::Partial));
    }

    #[test]
    fn every_name_and_value_reads_as_http_would_read_it() {
        let raw = b"POST / HTTP/1.1\r\nHOST: kms\r\nX-Amz-TARGET: TrentService.Encrypt\r\n\
            x-amz-date: 20261128T120000Z\r\nAmz-Sdk-Request: attempt=1\r\nX-Empty:\r\n\
            X-Other: a b\r\nContent-Length: 0\r\n\r\n";
        let head = complete(raw);
        let read: Vec<(&str, &[u8])> = head
            .parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        let expected: [(&str, &[u8]); 7] = [
            ("host", b"kms"),
            ("x-amz-target", b"TrentService.Encrypt"),
            ("x-amz-date", b"20261128T120000Z"),
            ("amz-sdk-request", b"attempt=1"),
            ("x-empty", b""),
            ("x-other", b"a b"),
            ("content-length", b"0"),
        ];
        assert_eq!(read, expected);
    }

    #[test]
    fn names_read_as_http_reads_them_and_hop_by_hop_ones_are_not_taken() {
        let names = [
            "host",
            "content-type",
            "content-length",
            "authorization",
            "user-agent",
            "x-amz-target",
            "x-amz-date",
            "x-amz-security-token",
            "x-amz-content-sha256",
            "x-amz-user-agent",
            "amz-sdk-invocation-id",
            "amz-sdk-request",
            "x-other",
            "a-header-name-longer-than-the-buffer",
        ];
        for name in names {
            for spelling in [name.to_owned(), name.to_ascii_uppercase()] {
                let want = HeaderName::from_bytes(spelling.as_bytes()).unwrap();
                match read_name(spelling.as_bytes()) {
                    Name::Other(got) => assert_eq!(got, want, "{spelling}"),
                    _ => panic!("{spelling} not read as a name"),
                }
            }
        }
        for hop in crate::proxy::headers::HOP_BY_HOP.iter().chain(&["expect"]) {
            let spelling = hop.to_ascii_uppercase();
            let taken = matches!(read_name(spelling.as_bytes()), Name::Other(_));
            assert!(!taken, "{spelling} taken as an ordinary header");
        }
        assert!(matches!(read_name(b"Connection"), Name::Connection));
        assert!(matches!(read_name(b"KEEP-ALIVE"), Name::KeepAlive));
        for bad in [
            &b"x amz"[..],
            b"",
            b"x\xffy",
            b"proxy-connection-and-then-some-more-x\x01",
        ] {
            assert!(matches!(read_name(bad), Name::NotTaken), "{bad:?}");
        }
    }

    #[test]
    fn anything_outside_the_canonical_shape_goes_to_the_general_server() {
        let cases: [&[u8]; 14] = [
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /?a=b HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.0\r\nHost: a\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\r\nPOST / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            b"POST / HTTP/1.1\r\nConnection: x-amz-date\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"POST / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
        ];
        for case in cases {
            assert!(is_other(case), "{:?}", String::from_utf8_lossy(case));
        }
        let too_long = [
            b"POST / HTTP/1.1\r\nX: ".as_slice(),
            &[b'a'; MAX_HEAD_BYTES],
        ]
        .concat();
        assert!(is_other(&too_long));
    }

    /// Whatever bytes are inserted into a valid head, a head the fast path takes reads the same
    /// to a second parse of the bytes it forwards: the same headers, each name's values in the
    /// same order (less the Connection and Keep-Alive lines), the same Content-Length, and
    /// nothing but CRLF line ends.
    #[test]
    fn taken_heads_read_the_same_when_forwarded() {
        use proptest::prelude::*;
        const BASE: &[u8] = b"POST / HTTP/1.1\r\nHost: kms.us-east-1.amazonaws.com\r\nConnection: keep-alive\r\nX-Amz-Target: TrentService.Encrypt\r\nContent-Length: 12\r\nKeep-Alive: timeout=5\r\n\r\n";
        let inserts = proptest::collection::vec(
            (
                0..BASE.len(),
                proptest::sample::select(vec![
                    b'\r', b'\n', b' ', b'\t', b':', b'\0', b',', b'0', b'a', 0x7f, 0x80, 0xff,
                ]),
            ),
            0..4,
        );
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(4000));
        let taken = std::cell::Cell::new(0u32);
        runner
            .run(&inserts, |inserts| {
                let mut bytes = BASE.to_vec();
                for (at, byte) in inserts {
                    bytes.insert(at.min(bytes.len()), byte);
                }
                let Parsed::Complete(head) = parse_request(&bytes) else {
                    return Ok(());
                };
                taken.set(taken.get() + 1);
                let raw = &bytes[..head.len];
                prop_assert!(crlf_only(raw));
                let forwarded = forwarded_head(raw, &head.hop_lines);
                let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut again = httparse::Request::new(&mut slots);
                prop_assert_eq!(
                    again.parse(&forwarded).ok(),
                    Some(httparse::Status::Complete(forwarded.len()))
                );
                prop_assert_eq!((again.method, again.path), (Some("POST"), Some("/")));
                let mut seen: Vec<(String, Vec<u8>)> = again
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                    .collect();
                let mut expected: Vec<(String, Vec<u8>)> = head
                    .parts
                    .headers
                    .iter()
                    .filter(|(name, _)| {
                        **name != header::CONNECTION && name.as_str() != "keep-alive"
                    })
                    .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
                    .collect();
                // A HeaderMap yields the values of one name together (two `co:` lines made by
                // inserted colons, say): compare by name, each name's values in order.
                seen.sort_by(|a, b| a.0.cmp(&b.0));
                expected.sort_by(|a, b| a.0.cmp(&b.0));
                prop_assert_eq!(&seen, &expected);
                let lengths: Vec<&Vec<u8>> = seen
                    .iter()
                    .filter(|(name, _)| name == "content-length")
                    .map(|(_, value)| value)
                    .collect();
                match lengths.as_slice() {
                    [] => prop_assert_eq!(head.body_len, 0),
                    [one] => prop_assert_eq!(
                        std::str::from_utf8(one)
                            .ok()
                            .and_then(|v| v.parse::<u64>().ok()),
                        Some(head.body_len)
                    ),
                    _ => prop_assert!(false, "two Content-Length headers forwarded"),
                }
                Ok(())
            })
            .unwrap();
        // The property must have been tested on many taken heads, not only on refused ones.
        assert!(taken.get() > 500, "only {} heads taken", taken.get());
    }

    proptest::proptest! {
        /// The vectorised check says what the search said, on heads made of CR, LF and
        /// ordinary bytes in any order.
        #[test]
        fn crlf_only_agrees_with_its_search(
            pieces in proptest::collection::vec(
                proptest::prop_oneof![
                    6 => proptest::strategy::Just(b"\r\n".as_slice()),
                    6 => proptest::strategy::Just(b"ab: c".as_slice()),
                    1 => proptest::strategy::Just(b"\r".as_slice()),
                    1 => proptest::strategy::Just(b"\n".as_slice()),
                ],
                0..40,
            )
        ) {
            let head = pieces.concat();
            proptest::prop_assert_eq!(crlf_only(&head), crlf_only_by_search(&head));
        }
    }

    #[test]
    fn only_crlf_ends_lines() {
        assert!(crlf_only(b"a\r\nb: c\r\n\r\n"));
        for bad in [
            b"a\nb\r\n".as_slice(),
            b"a\rb\r\n",
            b"a\r\r\n",
            b"a\r\n\r",
            b"a\n\r",
        ] {
            assert!(!crlf_only(bad), "{bad:?}");
        }
    }

    #[test]
    fn connection_and_keep_alive_lines_are_not_forwarded() {
        let buf = b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive, close\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n";
        let head = complete(buf);
        assert!(head.close);
        assert_eq!(
            forwarded_head(&buf[..head.len], &head.hop_lines),
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n".as_slice()
        );
    }

    #[test]
    fn answers_are_framed_and_rewritten() {
        let buf = b"HTTP/1.1 200 OK\r\nx-amzn-RequestId: r1\r\nConnection: keep-alive, x-hop\r\nx-hop: 1\r\nContent-Length: 5\r\n\r\nhello";
        let Ok(Parsed::Complete(head)) = parse_response(buf, false, true, 60) else {
            panic!()
        };
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.reusable);
        assert_eq!(head.aws_request_id.as_deref(), Some("r1"));
        assert_eq!(
            String::from_utf8(head.rewritten).unwrap(),
            "HTTP/1.1 200 OK\r\nx-amzn-RequestId: r1\r\nContent-Length: 5\r\nkeep-alive: timeout=60\r\n\r\n"
        );
        let chunked = b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n";
        let Ok(Parsed::Complete(head)) = parse_response(chunked, true, true, 60) else {
            panic!()
        };
        assert_eq!(head.framing, Framing::Chunked);
        assert!(String::from_utf8(head.rewritten)
            .unwrap()
            .ends_with("Transfer-Encoding: chunked\r\nconnection: close\r\n\r\n"));
        // A Connection header cannot take away the headers the body is framed by.
        let named = b"HTTP/1.1 200 OK\r\nConnection: content-length, transfer-encoding\r\nContent-Length: 2\r\n\r\n";
        let Ok(Parsed::Complete(head)) = parse_response(named, false, false, 60) else {
            panic!()
        };
        assert_eq!(
            String::from_utf8(head.rewritten).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nkeep-alive: timeout=60\r\n\r\n"
        );
        let close = b"HTTP/1.0 200 OK\r\n\r\n";
        let Ok(Parsed::Complete(head)) = parse_response(close, false, true, 60) else {
            panic!()
        };
        assert_eq!(head.framing, Framing::UntilClose);
        assert!(!head.reusable);
        for bad in [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".as_slice(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            b"HTTP/1.1 101 Switching\r\n\r\n",
        ] {
            assert!(parse_response(bad, false, true, 60).is_err());
        }
    }
}
