//! Step 1 of the pipeline: which operation a request is, read from its head alone.
//!
//! Only an exact `X-Amz-Target: TrentService.<Op>` names an operation. A request whose head could
//! be read two ways (a repeated signed or routing header, a target that names a tag-bearing
//! operation in another spelling, a hop-by-hop trick that would strip a signed header) is refused.

use http::header::{self, HeaderName};
use http::{HeaderMap, Method, Uri};

use super::operation::{Operation, TagOperation, TARGET_PREFIX};
use crate::fold::eq_ignore_case;

/// Where a request goes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A model operation that changes no tags: streamed through untouched.
    Pass(Operation),
    /// A tag-bearing operation: read, parsed and judged.
    Inspect(TagOperation),
    /// A target outside the model; `[policy].unknown_operations` decides.
    Unknown(String),
}

/// Why a request head cannot be read unambiguously.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    #[error("the header {0} appears more than once; send it once")]
    RepeatedHeader(&'static str),
    #[error("the X-Amz-Target header is missing; KMS requests name their operation in it")]
    MissingTarget,
    #[error("the X-Amz-Target header is not visible ASCII")]
    TargetNotText,
    #[error("X-Amz-Target {0:?} names a tag-changing operation but is not spelled exactly TrentService.<Operation>")]
    TargetSpelling(String),
    #[error("the Connection header names {0:?}, which would strip a signed or routing header")]
    ConnectionStripsHeader(String),
    #[error("KMS requests are POST / with no query string; this one is {0}")]
    RequestLine(String),
    #[error(
        "Content-Encoding {0:?} is refused on tag-changing requests; send the body uncompressed"
    )]
    ContentEncoding(String),
    #[error(
        "Content-Type {0:?} is refused on tag-changing requests; use application/x-amz-json-1.1"
    )]
    ContentType(String),
    #[error("the Host header {host:?} and the request target's authority {authority:?} differ")]
    HostMismatch { host: String, authority: String },
    #[error("the request names no host: send a Host header")]
    MissingHost,
    #[error("the request carries trailers, which KMS requests never do")]
    Trailers,
}

static X_AMZ_TARGET: HeaderName = HeaderName::from_static("x-amz-target");

/// Headers that decide what the request is or where it goes: each may appear once at most.
/// Looked up by `HeaderName`, not by `&str`, which would be parsed again on every request.
static SINGLE_HEADERS: [(&HeaderName, &str); 6] = [
    (&X_AMZ_TARGET, "X-Amz-Target"),
    (&header::HOST, "Host"),
    (&header::CONTENT_TYPE, "Content-Type"),
    (&header::CONTENT_LENGTH, "Content-Length"),
    (&header::CONTENT_ENCODING, "Content-Encoding"),
    (&header::AUTHORIZATION, "Authorization"),
];

/// The content type of every KMS request (awsJson 1.1).
pub const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

/// Classifies a request by its head.
pub fn classify(headers: &HeaderMap) -> Result<Route, Unreadable> {
    for (name, display) in &SINGLE_HEADERS {
        let mut values = headers.get_all(*name).iter();
        if values.next().is_some() && values.next().is_some() {
            return Err(Unreadable::RepeatedHeader(display));
        }
    }
    check_connection_tokens(headers)?;
    let target = headers
        .get(&X_AMZ_TARGET)
        .ok_or(Unreadable::MissingTarget)?
        .to_str()
        .map_err(|_| Unreadable::TargetNotText)?;
    if let Some(op) = target
        .strip_prefix(TARGET_PREFIX)
        .and_then(Operation::from_name)
    {
        return Ok(match op.tag_operation() {
            Some(tag_op) => Route::Inspect(tag_op),
            None => Route::Pass(op),
        });
    }
    let trimmed = target.trim_matches(|c: char| c.is_whitespace());
    let names_tag_operation = TagOperation::ALL.iter().any(|op| {
        let exact = format!("{TARGET_PREFIX}{}", op.name());
        eq_ignore_case(trimmed, &exact)
    });
    if names_tag_operation {
        return Err(Unreadable::TargetSpelling(target.to_owned()));
    }
    Ok(Route::Unknown(target.to_owned()))
}

/// A `Connection` header lists headers a proxy must drop before forwarding; naming a signed or
/// routing header there would make the next hop see a different request than the one judged.
fn check_connection_tokens(headers: &HeaderMap) -> Result<(), Unreadable> {
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else {
            return Err(Unreadable::ConnectionStripsHeader("non-ASCII".into()));
        };
        for token in value.split(',').map(str::trim) {
            let token = token.to_ascii_lowercase();
            let dangerous = token == "host"
                || token == "authorization"
                || token.starts_with("content-")
                || token.starts_with("x-amz-")
                || token.starts_with("x-amzn-");
            if dangerous {
                return Err(Unreadable::ConnectionStripsHeader(token));
            }
        }
    }
    Ok(())
}

/// Every KMS operation is `POST /` (awsJson 1.1). Anything else could be another protocol's
/// spelling of an operation (a query string, an RPC path) that a front end might route by, so it
/// is refused rather than forwarded.
pub fn check_request_line(method: &Method, uri: &Uri) -> Result<(), Unreadable> {
    if method == Method::POST && uri.path() == "/" && uri.query().is_none() {
        return Ok(());
    }
    let mut line = format!("{method} {}", uri.path());
    if let Some(query) = uri.query() {
        line.push('?');
        line.push_str(query);
    }
    line.truncate(200);
    Err(Unreadable::RequestLine(line))
}

/// The host the request is addressed to: its Host header, or the authority of an HTTP/2 (or
/// absolute-form) request target; both present must agree.
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Result<&'a str, Unreadable> {
    let header = match headers.get(header::HOST) {
        Some(h) => Some(h.to_str().map_err(|_| Unreadable::MissingHost)?),
        None => None,
    };
    let authority = uri.authority().map(|a| a.as_str());
    match (header, authority) {
        (Some(h), Some(a)) if !h.eq_ignore_ascii_case(a) => Err(Unreadable::HostMismatch {
            host: h.to_owned(),
            authority: a.to_owned(),
        }),
        (Some(h), _) => Ok(h),
        (None, Some(a)) => Ok(a),
        (None, None) => Err(Unreadable::MissingHost),
    }
}

/// The head checks of a tag-bearing request, before its body is read.
pub fn check_tag_request_head(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), Unreadable> {
    check_request_line(method, uri)?;
    if let Some(encoding) = headers.get(header::CONTENT_ENCODING) {
        let encoding = String::from_utf8_lossy(encoding.as_bytes());
        if !encoding.trim().eq_ignore_ascii_case("identity") {
            return Err(Unreadable::ContentEncoding(encoding.into_owned()));
        }
    }
    match headers.get(header::CONTENT_TYPE) {
        Some(ct) if ct.as_bytes() == CONTENT_TYPE.as_bytes() => Ok(()),
        Some(ct) => Err(Unreadable::ContentType(
            String::from_utf8_lossy(ct.as_bytes()).into_owned(),
        )),
        None => Err(Unreadable::ContentType(String::new())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderName;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn route(target: &str) -> Result<Route, Unreadable> {
        classify(&headers(&[("x-amz-target", target)]))
    }

    #[test]
    fn exact_targets_name_operations() {
        assert_eq!(
            route("TrentService.Encrypt"),
            Ok(Route::Pass(Operation::from_name("Encrypt").unwrap()))
        );
        assert_eq!(
            route("TrentService.TagResource"),
            Ok(Route::Inspect(TagOperation::TagResource))
        );
        assert_eq!(
            route("TrentService.CreateKey"),
            Ok(Route::Inspect(TagOperation::CreateKey))
        );
    }

    #[test]
    fn spellings_of_tag_operations_are_refused() {
        for t in [
            "trentservice.tagresource",
            "TrentService.tagResource",
            "TRENTSERVICE.UNTAGRESOURCE",
            " TrentService.CreateKey",
            "TrentService.ReplicateKey\t",
        ] {
            assert!(
                matches!(route(t), Err(Unreadable::TargetSpelling(_))),
                "{t:?}"
            );
        }
        // Bytes outside visible ASCII are never an operation name.
        assert!(route("Trent\u{17f}ervice.TagResource").is_err());
    }

    #[test]
    fn other_unknown_targets_are_unknown() {
        assert_eq!(
            route("TrentService.Frobnicate"),
            Ok(Route::Unknown("TrentService.Frobnicate".into()))
        );
        assert_eq!(
            route("trentservice.encrypt"),
            Ok(Route::Unknown("trentservice.encrypt".into()))
        );
        assert_eq!(classify(&HeaderMap::new()), Err(Unreadable::MissingTarget));
    }

    #[test]
    fn repeated_headers_are_refused() {
        for name in [
            "x-amz-target",
            "host",
            "content-type",
            "content-length",
            "content-encoding",
            "authorization",
        ] {
            let h = headers(&[
                ("x-amz-target", "TrentService.Encrypt"),
                (name, "a"),
                (name, "a"),
            ]);
            assert!(
                matches!(classify(&h), Err(Unreadable::RepeatedHeader(_))),
                "{name}"
            );
        }
    }

    #[test]
    fn connection_may_not_strip_signed_headers() {
        for token in [
            "x-amz-target",
            "X-Amz-Date",
            "host",
            "content-length",
            "keep-alive, authorization",
        ] {
            let h = headers(&[
                ("x-amz-target", "TrentService.Encrypt"),
                ("connection", token),
            ]);
            assert!(
                matches!(classify(&h), Err(Unreadable::ConnectionStripsHeader(_))),
                "{token}"
            );
        }
        let h = headers(&[
            ("x-amz-target", "TrentService.Encrypt"),
            ("connection", "keep-alive"),
        ]);
        assert!(classify(&h).is_ok());
    }

    #[test]
    fn tag_request_heads_are_post_root_json_uncompressed() {
        let ok = headers(&[("content-type", CONTENT_TYPE)]);
        let root: Uri = "/".parse().unwrap();
        assert!(check_tag_request_head(&Method::POST, &root, &ok).is_ok());
        assert!(check_tag_request_head(&Method::PUT, &root, &ok).is_err());
        let query: Uri = "/?Action=TagResource".parse().unwrap();
        assert!(check_tag_request_head(&Method::POST, &query, &ok).is_err());
        let gz = headers(&[("content-type", CONTENT_TYPE), ("content-encoding", "gzip")]);
        assert_eq!(
            check_tag_request_head(&Method::POST, &root, &gz),
            Err(Unreadable::ContentEncoding("gzip".into()))
        );
        let identity = headers(&[
            ("content-type", CONTENT_TYPE),
            ("content-encoding", "identity"),
        ]);
        assert!(check_tag_request_head(&Method::POST, &root, &identity).is_ok());
        let cbor = headers(&[("content-type", "application/x-amz-cbor-1.1")]);
        assert!(check_tag_request_head(&Method::POST, &root, &cbor).is_err());
    }
}
