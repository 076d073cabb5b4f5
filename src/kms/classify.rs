//! Step 1 of the pipeline: which operation a request is, read from its head alone.
//!
//! The principle: a request goes on only when every reader of its head must see the same single
//! KMS operation. `X-Amz-Target` must be exactly `TrentService.<Operation>`, the request line
//! exactly `POST /`, the content type exactly awsJson 1.1, and no header may be repeated or
//! spelled so that some reader takes it for a routing header. Anything else is refused. Since
//! nobody can say how every KMS front end would read a refused request, its refusal is recorded as
//! a possible tag change unless the head provably names an operation that changes no tags
//! ([`Refused::may_change_tags`]).

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Uri};

use super::operation::{Operation, TagOperation, TARGET_PREFIX};

/// Where a request goes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A model operation that changes no tags: streamed through untouched.
    Pass(Operation),
    /// A tag-bearing operation: read whole, parsed and judged by the policy.
    Judge(TagOperation),
    /// `TrentService.<Name>` in the canonical shape, for a name outside the model that cannot
    /// name a tag-changing operation; `[policy].unknown_operations` decides.
    Unknown(String),
}

/// Why a request cannot be read unambiguously.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    #[error("the header {0} appears more than once; send it once")]
    RepeatedHeader(&'static str),
    #[error("the header name {0:?} is a look-alike of a signed or routing header (some readers treat '_' as '-'); send it only as {1}")]
    LookAlikeHeader(String, &'static str),
    #[error("the X-Amz-Target header is missing; KMS requests name their operation in it as TrentService.<Operation>")]
    MissingTarget,
    #[error("the X-Amz-Target header is not visible ASCII; KMS requests name their operation in it as TrentService.<Operation>")]
    TargetNotText,
    #[error("X-Amz-Target {0:?} is not exactly TrentService.<Operation>, and some readers would take it for a tag-changing operation; send the exact target")]
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
        "Content-Type {0:?} is refused: KMS speaks awsJson 1.1 only; send Content-Type: application/x-amz-json-1.1"
    )]
    ContentType(String),
    #[error("the Host header {host:?} and the request target's authority {authority:?} differ")]
    HostMismatch { host: String, authority: String },
    #[error("the request names no host: send a Host header")]
    MissingHost,
    #[error("the host {0:?} is not a DNS name with an optional port; address a KMS host name such as kms.us-east-1.amazonaws.com")]
    HostNotName(String),
    #[error("the request carries trailers, which KMS requests never do")]
    Trailers,
    #[error("the body is not awsJson: a KMS request body is a JSON object (or empty); this one starts with {0:?}")]
    BodyNotJson(char),
    #[error("the body carries an Action parameter in the form (Query protocol) shape, which some front ends would read as the operation; KMS requests name their operation only in X-Amz-Target")]
    ActionParameter,
    #[error("the header {0:?} is refused: some front ends (moto) take the operation from a header named Action; KMS requests name their operation only in X-Amz-Target, so drop the header")]
    ActionHeader(String),
}

/// A request the proxy refuses, and whether the refusal belongs in the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: Unreadable,
    /// Some reader could take the request for a tag change: the refusal is recorded as a `deny`
    /// decision (rule `request`). False only when the head names exactly one operation that
    /// changes no tags and the reason cannot change which operation any reader sees.
    pub may_change_tags: bool,
}

impl Refused {
    /// A refusal recorded as a possible tag change.
    pub fn audited(reason: Unreadable) -> Refused {
        Refused {
            reason,
            may_change_tags: true,
        }
    }
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

/// Header names some readers merge with another spelling of them (CGI, WSGI and nginx with
/// `underscores_in_headers` read `_` as `-`): a request may carry these only as spelled here.
const GUARDED_HEADERS: [&str; 10] = [
    "x-amz-target",
    "host",
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "authorization",
    "x-amz-date",
    "x-amz-security-token",
    "x-amz-content-sha256",
];

/// The content type of every KMS request (awsJson 1.1).
pub const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

/// What [`classify`] and the judging steps read from a head's headers, found in one pass over
/// the map instead of one lookup per header (each hashes its name and probes the table).
#[derive(Debug, Default)]
pub struct HeaderScan<'a> {
    /// How many values each of [`SINGLE_HEADERS`] has (2 standing for "more than one").
    counts: [u8; 6],
    /// The first value of each of [`SINGLE_HEADERS`], in that order.
    first: [Option<&'a HeaderValue>; 6],
    /// The first value of `amz-sdk-invocation-id` and of `amz-sdk-request`.
    pub invocation_id: Option<&'a HeaderValue>,
    pub sdk_request: Option<&'a HeaderValue>,
    /// The first name (in the map's order) that is an `_` spelling of a guarded header.
    look_alike: Option<(&'a HeaderName, &'static str)>,
    /// The first name that reads as `Action`.
    action: Option<&'a HeaderName>,
    /// Whether a `Connection` header is present.
    connection: bool,
}

impl<'a> HeaderScan<'a> {
    /// One pass over every header (every value of a repeated one).
    pub fn of(headers: &'a HeaderMap) -> HeaderScan<'a> {
        /// Where a name's values go: one of [`SINGLE_HEADERS`], or one of these.
        const CONNECTION: u8 = 6;
        const INVOCATION_ID: u8 = 7;
        const SDK_REQUEST: u8 = 8;
        const OTHER: u8 = 9;
        let mut scan = HeaderScan::default();
        let mut last: Option<&HeaderName> = None;
        let mut slot = OTHER;
        for (name, value) in headers {
            // The values of one name come one after another, with the same name (the same
            // reference into the map): the name is looked at once.
            if !last.is_some_and(|l| std::ptr::eq(l, name)) {
                last = Some(name);
                let text = name.as_str();
                slot = match text {
                    "x-amz-target" => 0,
                    "host" => 1,
                    "content-type" => 2,
                    "content-length" => 3,
                    "content-encoding" => 4,
                    "authorization" => 5,
                    "connection" => CONNECTION,
                    "amz-sdk-invocation-id" => INVOCATION_ID,
                    "amz-sdk-request" => SDK_REQUEST,
                    _ => OTHER,
                };
                // The names matched above hold no `_` and do not read as `Action`.
                if slot == OTHER {
                    scan.look_at_name(name, text);
                }
            }
            match slot {
                CONNECTION => scan.connection = true,
                INVOCATION_ID => scan.invocation_id = scan.invocation_id.or(Some(value)),
                SDK_REQUEST => scan.sdk_request = scan.sdk_request.or(Some(value)),
                OTHER => {}
                i => {
                    let i = usize::from(i);
                    scan.counts[i] = scan.counts[i].saturating_add(1).min(2);
                    scan.first[i].get_or_insert(value);
                }
            }
        }
        scan
    }

    fn look_at_name(&mut self, name: &'a HeaderName, text: &str) {
        // Names are short: a plain loop is cheaper here than a vectorised search's set-up.
        if self.look_alike.is_none() && text.bytes().any(|b| b == b'_') {
            let dashed = text.replace('_', "-");
            if let Some(guarded) = GUARDED_HEADERS.iter().find(|g| **g == dashed) {
                self.look_alike = Some((name, guarded));
            }
        }
        if self.action.is_none() && is_action_name(text) {
            self.action = Some(name);
        }
    }

    /// The first `X-Amz-Target`.
    fn target(&self) -> Option<&'a HeaderValue> {
        self.first[0]
    }

    /// The first `Host`.
    pub fn host(&self) -> Option<&'a HeaderValue> {
        self.first[1]
    }

    fn content_type(&self) -> Option<&'a HeaderValue> {
        self.first[2]
    }

    /// The first `Content-Encoding`.
    pub fn content_encoding(&self) -> Option<&'a HeaderValue> {
        self.first[4]
    }

    /// The first `Authorization`.
    pub fn authorization(&self) -> Option<&'a HeaderValue> {
        self.first[5]
    }
}

/// Classifies a request by its head. The refusals made here are all of those that need only
/// the head; the body's shape is checked as it streams ([`super::protocol::BodyCheck`]).
pub fn classify(method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<Route, Refused> {
    classify_scanned(method, uri, headers, &HeaderScan::of(headers))
}

/// [`classify`], with the headers' scan made already (`scan` is `HeaderScan::of(headers)`).
pub fn classify_scanned(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    scan: &HeaderScan<'_>,
) -> Result<Route, Refused> {
    // Another method, path or a query string could be another protocol's spelling of an
    // operation (`?Action=TagResource`, an RPC path) that some front end routes by.
    check_request_line(method, uri).map_err(Refused::audited)?;
    let pass = || names_pass_through(headers).is_some();
    let refused = |reason| Refused {
        reason,
        may_change_tags: !pass(),
    };
    for ((_, display), count) in SINGLE_HEADERS.iter().zip(scan.counts) {
        if count > 1 {
            return Err(refused(Unreadable::RepeatedHeader(display)));
        }
    }
    if let Some((name, guarded)) = scan.look_alike {
        return Err(Refused::audited(Unreadable::LookAlikeHeader(
            name.as_str().to_owned(),
            guarded,
        )));
    }
    if let Some(name) = scan.action {
        return Err(Refused::audited(Unreadable::ActionHeader(
            name.as_str().to_owned(),
        )));
    }
    if scan.connection {
        check_connection_tokens(headers).map_err(refused)?;
    }
    let route = route(scan.target()).map_err(Refused::audited)?;
    match scan.content_type() {
        Some(ct) if ct.as_bytes() == CONTENT_TYPE.as_bytes() => Ok(route),
        // Another content type is another protocol, which a front end may read another way.
        Some(ct) => Err(Refused::audited(Unreadable::ContentType(
            String::from_utf8_lossy(ct.as_bytes()).into_owned(),
        ))),
        None => Err(Refused::audited(Unreadable::ContentType(String::new()))),
    }
}

/// The route named by the single `X-Amz-Target` (already checked not to be repeated).
fn route(target: Option<&HeaderValue>) -> Result<Route, Unreadable> {
    let target = target
        .ok_or(Unreadable::MissingTarget)?
        .to_str()
        .map_err(|_| Unreadable::TargetNotText)?;
    match read_target(target) {
        Target::Known(op) => Ok(match op.tag_operation() {
            Some(tag_op) => Route::Judge(tag_op),
            None => Route::Pass(op),
        }),
        Target::Unknown(name) => Ok(Route::Unknown(name.to_owned())),
        Target::Other => Err(Unreadable::TargetSpelling(target.to_owned())),
    }
}

/// What an `X-Amz-Target` value names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// Exactly `TrentService.<Operation>` for an operation of the model.
    Known(Operation),
    /// Exactly `TrentService.<Name>` for a PascalCase name outside the model whose letters, in any
    /// case, contain none of the tag-changing operations' names.
    Unknown(&'a str),
    /// Anything else: some other spelling, which some reader may take for any operation.
    Other,
}

/// Reads a target value. Only two shapes are ever forwarded, and both are checked exactly;
/// everything else is [`Target::Other`], however harmless it looks.
pub fn read_target(target: &str) -> Target<'_> {
    let Some(name) = target.strip_prefix(TARGET_PREFIX) else {
        return Target::Other;
    };
    if let Some(op) = Operation::from_name(name) {
        return Target::Known(op);
    }
    let pascal_case = name.as_bytes().first().is_some_and(u8::is_ascii_uppercase)
        && name.bytes().all(|b| b.is_ascii_alphanumeric());
    if pascal_case && !contains_tag_operation(name) {
        Target::Unknown(name)
    } else {
        Target::Other
    }
}

/// Whether `name`'s letters, in any ASCII case, contain the name of a tag-changing operation:
/// a lenient reader that took a prefix, a suffix or a case-folded name could land on it.
fn contains_tag_operation(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    TagOperation::ALL
        .iter()
        .any(|op| lower.contains(&op.name().to_ascii_lowercase()))
}

/// The operation a head names when it has exactly one `X-Amz-Target`, exactly
/// `TrentService.<Op>` for an operation that changes no tags.
pub fn names_pass_through(headers: &HeaderMap) -> Option<Operation> {
    let mut targets = headers.get_all(&X_AMZ_TARGET).iter();
    let (Some(target), None) = (targets.next(), targets.next()) else {
        return None;
    };
    match read_target(target.to_str().ok()?) {
        Target::Known(op) if op.tag_operation().is_none() => Some(op),
        _ => None,
    }
}

/// Whether a header name reads as `Action` once case, punctuation and whitespace are dropped.
pub fn is_action_name(name: &str) -> bool {
    const ACTION: &[u8] = b"action";
    // Cheap on the common path: most names are shorter or longer than their letters allow.
    if name.len() < ACTION.len() {
        return false;
    }
    let mut letters = name
        .bytes()
        .filter(u8::is_ascii_alphanumeric)
        .map(|b| b.to_ascii_lowercase());
    ACTION.iter().all(|want| letters.next() == Some(*want)) && letters.next().is_none()
}

/// A `Connection` header lists headers a proxy must drop before forwarding; naming a signed or
/// routing header there would make the next hop see a different request than the one judged.
fn check_connection_tokens(headers: &HeaderMap) -> Result<(), Unreadable> {
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else {
            return Err(Unreadable::ConnectionStripsHeader("non-ASCII".into()));
        };
        for token in value.split(',').map(str::trim) {
            let token = token.to_ascii_lowercase().replace('_', "-");
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
/// is refused rather than forwarded. The refusal shows the method and path, never the query,
/// which may carry credentials (`X-Amz-Credential`, `X-Amz-Security-Token`).
pub fn check_request_line(method: &Method, uri: &Uri) -> Result<(), Unreadable> {
    if method == Method::POST && uri.path() == "/" && uri.query().is_none() {
        return Ok(());
    }
    let mut line = format!("{method} {}", uri.path());
    line.truncate(200);
    if uri.query().is_some() {
        line.push_str("?(query not shown)");
    }
    Err(Unreadable::RequestLine(line))
}

/// The host the request is addressed to: its Host header, or the authority of an HTTP/2 (or
/// absolute-form) request target; both present must agree, and it must be a DNS name (letters,
/// digits, `-`, `.`) with an optional port, nothing a URL parser could read another way
/// (`kms.x@sts.amazonaws.com`).
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Result<&'a str, Unreadable> {
    request_host_of(uri, headers.get(header::HOST))
}

/// [`request_host`], given the first `Host` value ([`HeaderScan::host`]).
pub fn request_host_of<'a>(
    uri: &'a Uri,
    host: Option<&'a HeaderValue>,
) -> Result<&'a str, Unreadable> {
    // The common case, a Host that is a host name and no authority, checked once: a host name
    // is ASCII, so `to_str` and the second check below cannot refuse it.
    if let (Some(h), None) = (host, uri.authority()) {
        if is_host_name_bytes(h.as_bytes()) {
            if let Ok(name) = std::str::from_utf8(h.as_bytes()) {
                return Ok(name);
            }
        }
    }
    let header = match host {
        Some(h) => Some(h.to_str().map_err(|_| {
            Unreadable::HostNotName(String::from_utf8_lossy(h.as_bytes()).into_owned())
        })?),
        None => None,
    };
    let authority = uri.authority().map(|a| a.as_str());
    let host = match (header, authority) {
        (Some(h), Some(a)) if !h.eq_ignore_ascii_case(a) => {
            return Err(Unreadable::HostMismatch {
                host: shown_host(h),
                authority: shown_host(a),
            })
        }
        (Some(h), _) => h,
        (None, Some(a)) => a,
        (None, None) => return Err(Unreadable::MissingHost),
    };
    if !is_host_name(host) {
        return Err(Unreadable::HostNotName(shown_host(host)));
    }
    Ok(host)
}

/// A host value as refusals show it (in answers, logs and audit records): without anything
/// before an `@`, which a URL reader takes for credentials, and at most 200 characters.
fn shown_host(host: &str) -> String {
    let host = match host.rfind('@') {
        Some(at) => format!("(userinfo removed)@{}", &host[at + 1..]),
        None => host.to_owned(),
    };
    host.chars().take(200).collect()
}

/// `name[:port]`: a name of ASCII letters, digits, `-` and `.`, and a port of one to five digits
/// from 1 to 65535.
pub fn is_host_name(host: &str) -> bool {
    is_host_name_bytes(host.as_bytes())
}

/// [`is_host_name`] on bytes. One pass: no searcher set up for the `:`, no integer parser for
/// the port.
fn is_host_name_bytes(bytes: &[u8]) -> bool {
    let name_len = bytes
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
        .unwrap_or(bytes.len());
    if name_len == 0 {
        return false;
    }
    let Some(rest) = bytes.get(name_len..).filter(|rest| !rest.is_empty()) else {
        return true;
    };
    let Some(port) = rest.strip_prefix(b":") else {
        return false;
    };
    (1..=5).contains(&port.len())
        && port.iter().all(u8::is_ascii_digit)
        && port
            .iter()
            .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'))
            .wrapping_sub(1)
            < 65535
}

/// The head checks of a tag-bearing request beyond [`classify`], before its body is read.
pub fn check_tag_request_head(headers: &HeaderMap) -> Result<(), Unreadable> {
    check_content_encoding(headers.get(header::CONTENT_ENCODING))
}

/// [`check_tag_request_head`], given the first `Content-Encoding` value
/// ([`HeaderScan::content_encoding`]).
pub fn check_content_encoding(encoding: Option<&HeaderValue>) -> Result<(), Unreadable> {
    if let Some(encoding) = encoding {
        let encoding = String::from_utf8_lossy(encoding.as_bytes());
        if !encoding.trim().eq_ignore_ascii_case("identity") {
            return Err(Unreadable::ContentEncoding(encoding.into_owned()));
        }
    }
    Ok(())
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

    fn classify_headers(headers: &HeaderMap) -> Result<Route, Refused> {
        classify(&Method::POST, &Uri::from_static("/"), headers)
    }

    fn route(target: &str) -> Result<Route, Refused> {
        classify_headers(&headers(&[
            ("x-amz-target", target),
            ("content-type", CONTENT_TYPE),
        ]))
    }

    /// `classify` as it was, one lookup per header: the oracle of the one-pass scan.
    fn classify_by_lookups(
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Route, Refused> {
        check_request_line(method, uri).map_err(Refused::audited)?;
        let pass = || names_pass_through(headers).is_some();
        let refused = |reason| Refused {
            reason,
            may_change_tags: !pass(),
        };
        for (name, display) in &SINGLE_HEADERS {
            let mut values = headers.get_all(*name).iter();
            if values.next().is_some() && values.next().is_some() {
                return Err(refused(Unreadable::RepeatedHeader(display)));
            }
        }
        check_look_alike_names(headers).map_err(Refused::audited)?;
        check_action_header(headers).map_err(Refused::audited)?;
        check_connection_tokens(headers).map_err(refused)?;
        let route = super::route(headers.get(&X_AMZ_TARGET)).map_err(Refused::audited)?;
        match headers.get(header::CONTENT_TYPE) {
            Some(ct) if ct.as_bytes() == CONTENT_TYPE.as_bytes() => Ok(route),
            Some(ct) => Err(Refused::audited(Unreadable::ContentType(
                String::from_utf8_lossy(ct.as_bytes()).into_owned(),
            ))),
            None => Err(Refused::audited(Unreadable::ContentType(String::new()))),
        }
    }

    /// Refuses a header whose name some readers take for a routing or signed header: the same name
    /// with `_` for `-` (`X_Amz_Target`). Only names with a `_` need a look.
    fn check_look_alike_names(headers: &HeaderMap) -> Result<(), Unreadable> {
        for name in headers.keys() {
            let name = name.as_str();
            if memchr::memchr(b'_', name.as_bytes()).is_none() {
                continue;
            }
            let dashed = name.replace('_', "-");
            if let Some(guarded) = GUARDED_HEADERS.iter().find(|g| **g == dashed) {
                return Err(Unreadable::LookAlikeHeader(name.to_owned(), guarded));
            }
        }
        Ok(())
    }

    /// Refuses a header named `Action` in any spelling: moto (and what is built like it) takes the
    /// operation from it when the query and the body name none, so a pass-through target with an
    /// `Action: TagResource` header and an empty body would be a tag change to it. Spelled any way a
    /// lenient reader could merge with it: any case, with `-`, `_` or other punctuation anywhere.
    fn check_action_header(headers: &HeaderMap) -> Result<(), Unreadable> {
        for name in headers.keys() {
            if is_action_name(name.as_str()) {
                return Err(Unreadable::ActionHeader(name.as_str().to_owned()));
            }
        }
        Ok(())
    }

    /// Heads built from the headers KMS clients send and the spellings some reader may merge
    /// with them: repeats, `_` for `-`, `Action` in any spelling, `Connection` tokens, other
    /// targets and content types, in any order.
    fn generated_headers() -> impl proptest::strategy::Strategy<Value = HeaderMap> {
        use proptest::prelude::*;
        let name = proptest::sample::select(vec![
            "x-amz-target",
            "x_amz_target",
            "host",
            "content-type",
            "content_type",
            "content-length",
            "content-encoding",
            "transfer_encoding",
            "authorization",
            "x-amz-date",
            "x_amz_date",
            "x-amz-security_token",
            "connection",
            "action",
            "x-action",
            "ac-tion_",
            "actions",
            "amz-sdk-invocation-id",
            "amz-sdk-request",
            "user-agent",
            "x__amz__target",
        ]);
        let value = proptest::sample::select(vec![
            "TrentService.Encrypt",
            "TrentService.TagResource",
            "TrentService.CreateAlias",
            "TrentService.Frobnicate",
            "TrentService.tagresource",
            "trentservice.Encrypt",
            "application/x-amz-json-1.1",
            "application/json",
            "kms.us-east-1.amazonaws.com",
            "keep-alive",
            "close, x-amz-target",
            "Host",
            "x_amz-date",
            "identity",
            "",
        ]);
        proptest::collection::vec((name, value), 0..10).prop_map(|pairs| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
            }
            h
        })
    }

    proptest::proptest! {
        #[test]
        fn one_pass_classify_decides_what_the_lookups_decided(
            headers in generated_headers(),
            canonical in proptest::bool::weighted(0.3),
        ) {
            let mut headers = headers;
            if canonical {
                // Also the heads that pass: the canonical pair first, the rest after.
                let mut h = HeaderMap::new();
                h.append("x-amz-target", HeaderValue::from_static("TrentService.TagResource"));
                h.append("content-type", HeaderValue::from_static(CONTENT_TYPE));
                for (k, v) in &headers {
                    if k != "x-amz-target" && k != "content-type" {
                        h.append(k.clone(), v.clone());
                    }
                }
                headers = h;
            }
            let (post, root) = (Method::POST, Uri::from_static("/"));
            proptest::prop_assert_eq!(
                classify(&post, &root, &headers),
                classify_by_lookups(&post, &root, &headers),
                "{:?}",
                headers
            );
            let scan = HeaderScan::of(&headers);
            proptest::prop_assert_eq!(scan.host(), headers.get(header::HOST));
            proptest::prop_assert_eq!(scan.authorization(), headers.get(header::AUTHORIZATION));
            proptest::prop_assert_eq!(scan.content_encoding(), headers.get(header::CONTENT_ENCODING));
            proptest::prop_assert_eq!(scan.invocation_id, headers.get("amz-sdk-invocation-id"));
            proptest::prop_assert_eq!(scan.sdk_request, headers.get("amz-sdk-request"));
        }
    }

    #[test]
    fn the_names_the_scan_knows_need_no_look() {
        let known = [
            "x-amz-target",
            "host",
            "content-type",
            "content-length",
            "content-encoding",
            "authorization",
            "connection",
            "amz-sdk-invocation-id",
            "amz-sdk-request",
        ];
        for name in known {
            assert!(!name.contains('_') && !is_action_name(name), "{name}");
        }
        for (i, (name, _)) in SINGLE_HEADERS.iter().enumerate() {
            assert_eq!(name.as_str(), known[i]);
        }
    }

    #[test]
    fn exact_targets_name_operations() {
        assert_eq!(
            route("TrentService.Encrypt"),
            Ok(Route::Pass(Operation::from_name("Encrypt").unwrap()))
        );
        assert_eq!(
            route("TrentService.TagResource"),
            Ok(Route::Judge(TagOperation::TagResource))
        );
        assert_eq!(
            route("TrentService.CreateKey"),
            Ok(Route::Judge(TagOperation::CreateKey))
        );
        for op in [
            TagOperation::CreateAlias,
            TagOperation::UpdateAlias,
            TagOperation::DeleteAlias,
        ] {
            assert_eq!(route(&format!("TrentService.{op}")), Ok(Route::Judge(op)));
        }
        assert_eq!(
            route("TrentService.ListAliases"),
            Ok(Route::Pass(Operation::from_name("ListAliases").unwrap()))
        );
    }

    #[test]
    fn other_spellings_of_alias_targets_are_refused_and_audited() {
        for t in [
            "trentservice.createalias",
            "TrentService.createAlias",
            "TrentService.CREATEALIAS",
            "TrentService.CreateAlias ",
            "TrentService.CreateAliases",
            "TrentService.UpdateAliasV2",
            "TrentService.XDeleteAlias",
            "TrentService.Deletealias",
            "CreateAlias",
        ] {
            let refused = route(t).unwrap_err();
            assert!(refused.may_change_tags, "{t:?}");
            assert!(
                matches!(refused.reason, Unreadable::TargetSpelling(_)),
                "{t:?}: {refused:?}"
            );
        }
    }

    #[test]
    fn other_spellings_are_refused_and_audited() {
        for t in [
            "trentservice.tagresource",
            "TrentService.tagResource",
            "TRENTSERVICE.UNTAGRESOURCE",
            " TrentService.CreateKey",
            "TrentService.ReplicateKey\t",
            "TagResource",
            "x.TagResource",
            "TrentService.Encrypt.TagResource",
            "com.amazonaws.kms.TrentService.TagResource",
            "TrentService..TagResource",
            "TrentService.Tag%52esource",
            "TrentService.TagResource,TrentService.Encrypt",
            "TrentService.TagResources",
            "TrentService.TAGRESOURCE",
            "trentservice.encrypt",
            "",
        ] {
            let refused = route(t).unwrap_err();
            assert!(refused.may_change_tags, "{t:?}");
            assert!(
                matches!(refused.reason, Unreadable::TargetSpelling(_)),
                "{t:?}: {refused:?}"
            );
        }
    }

    #[test]
    fn canonical_unknown_names_are_unknown_unless_they_contain_a_tag_operation() {
        assert_eq!(
            route("TrentService.Frobnicate"),
            Ok(Route::Unknown("Frobnicate".into()))
        );
        for t in ["TrentService.frobnicate", "TrentService.Frob_nicate"] {
            assert!(route(t).is_err(), "{t}");
        }
        assert_eq!(
            classify_headers(&headers(&[("content-type", CONTENT_TYPE)])),
            Err(Refused::audited(Unreadable::MissingTarget))
        );
    }

    #[test]
    fn no_pass_through_operation_contains_a_tag_operation_name() {
        for name in crate::kms::operation::OPERATIONS {
            let op = Operation::from_name(name).unwrap();
            if op.tag_operation().is_none() {
                assert!(!contains_tag_operation(name), "{name}");
            }
        }
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
                ("content-type", CONTENT_TYPE),
                (name, "a"),
                (name, "a"),
            ]);
            let refused = classify_headers(&h).unwrap_err();
            assert!(
                matches!(refused.reason, Unreadable::RepeatedHeader(_)),
                "{name}"
            );
            // Only a repeated target makes the operation unclear.
            assert_eq!(refused.may_change_tags, name == "x-amz-target", "{name}");
        }
    }

    #[test]
    fn underscore_spellings_of_routing_headers_are_refused() {
        for name in ["x_amz_target", "X_Amz-Target", "content_type", "x_amz_date"] {
            let h = headers(&[
                ("x-amz-target", "TrentService.Encrypt"),
                ("content-type", CONTENT_TYPE),
                (name, "TrentService.TagResource"),
            ]);
            let refused = classify_headers(&h).unwrap_err();
            assert!(refused.may_change_tags, "{name}");
            assert!(
                matches!(refused.reason, Unreadable::LookAlikeHeader(..)),
                "{name}"
            );
        }
        let h = headers(&[
            ("x-amz-target", "TrentService.Encrypt"),
            ("content-type", CONTENT_TYPE),
            ("x_trace_id", "1"),
        ]);
        assert!(classify_headers(&h).is_ok());
    }

    #[test]
    fn a_header_named_action_in_any_spelling_is_refused_and_audited() {
        use proptest::prelude::*;
        use proptest::test_runner::TestRunner;
        // Any case, with `-`, `_`, `.` or `~` anywhere: every spelling some reader may merge.
        let spelling = proptest::collection::vec(
            (
                any::<bool>(),
                proptest::sample::select(vec!["", "", "", "-", "_", ".", "~", "__"]),
            ),
            6,
        )
        .prop_map(|parts| {
            "action"
                .chars()
                .zip(parts)
                .map(|(c, (upper, sep))| {
                    let c = if upper { c.to_ascii_uppercase() } else { c };
                    format!("{sep}{c}")
                })
                .collect::<String>()
        });
        let mut runner = TestRunner::deterministic();
        runner
            .run(
                &(spelling, proptest::sample::select(vec!["", "-", "_"])),
                |(name, tail)| {
                    let name = format!("{name}{tail}");
                    prop_assert!(is_action_name(&name), "{}", name);
                    let h = headers(&[
                        ("x-amz-target", "TrentService.Encrypt"),
                        ("content-type", CONTENT_TYPE),
                        (&name, "TagResource"),
                    ]);
                    let refused = classify_headers(&h).unwrap_err();
                    prop_assert!(refused.may_change_tags, "{}", name);
                    prop_assert!(
                        matches!(refused.reason, Unreadable::ActionHeader(_)),
                        "{}",
                        name
                    );
                    Ok(())
                },
            )
            .unwrap();
        // Names that only contain the word are other names.
        for name in [
            "x-amz-action",
            "actions",
            "transaction",
            "reaction",
            "acti0n",
            "act",
        ] {
            assert!(!is_action_name(name), "{name}");
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
            "x_amz_target",
        ] {
            let h = headers(&[
                ("x-amz-target", "TrentService.Encrypt"),
                ("content-type", CONTENT_TYPE),
                ("connection", token),
            ]);
            assert!(
                matches!(
                    classify_headers(&h).map_err(|r| r.reason),
                    Err(Unreadable::ConnectionStripsHeader(_))
                ),
                "{token}"
            );
        }
        let h = headers(&[
            ("x-amz-target", "TrentService.Encrypt"),
            ("content-type", CONTENT_TYPE),
            ("connection", "keep-alive"),
        ]);
        assert!(classify_headers(&h).is_ok());
    }

    #[test]
    fn every_operation_is_post_root_awsjson() {
        let ok = headers(&[
            ("x-amz-target", "TrentService.Encrypt"),
            ("content-type", CONTENT_TYPE),
        ]);
        let root = Uri::from_static("/");
        assert!(classify(&Method::POST, &root, &ok).is_ok());
        let put = classify(&Method::PUT, &root, &ok).unwrap_err();
        assert!(put.may_change_tags);
        let query: Uri = "/?Action=TagResource&X-Amz-Security-Token=secret"
            .parse()
            .unwrap();
        let refused = classify(&Method::POST, &query, &ok).unwrap_err();
        assert!(refused.may_change_tags);
        assert!(!refused.reason.to_string().contains("secret"));
        for ct in [
            "application/x-www-form-urlencoded",
            "application/x-amz-json-1.0",
            "application/x-amz-json-1.1; charset=utf-8",
            "application/cbor",
        ] {
            let h = headers(&[
                ("x-amz-target", "TrentService.Encrypt"),
                ("content-type", ct),
            ]);
            let refused = classify_headers(&h).unwrap_err();
            assert!(refused.may_change_tags, "{ct}");
            assert!(matches!(refused.reason, Unreadable::ContentType(_)));
        }
        let none = headers(&[("x-amz-target", "TrentService.Encrypt")]);
        assert!(classify_headers(&none).is_err());
    }

    #[test]
    fn tag_request_heads_are_uncompressed() {
        let gz = headers(&[("content-encoding", "gzip")]);
        assert_eq!(
            check_tag_request_head(&gz),
            Err(Unreadable::ContentEncoding("gzip".into()))
        );
        let identity = headers(&[("content-encoding", "identity")]);
        assert!(check_tag_request_head(&identity).is_ok());
    }

    /// `is_host_name` as it was: `split_once` and `parse`.
    fn is_host_name_by_split(host: &str) -> bool {
        let (name, port) = match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        };
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        let port_ok = port.is_none_or(|p| {
            (1..=5).contains(&p.len())
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u32>().is_ok_and(|n| (1..=65535).contains(&n))
        });
        name_ok && port_ok
    }

    /// `request_host` as it was, without the shortcut for a plain Host.
    fn request_host_by_steps<'a>(
        uri: &'a Uri,
        headers: &'a HeaderMap,
    ) -> Result<&'a str, Unreadable> {
        let header = match headers.get(header::HOST) {
            Some(h) => Some(h.to_str().map_err(|_| {
                Unreadable::HostNotName(String::from_utf8_lossy(h.as_bytes()).into_owned())
            })?),
            None => None,
        };
        let authority = uri.authority().map(|a| a.as_str());
        let host = match (header, authority) {
            (Some(h), Some(a)) if !h.eq_ignore_ascii_case(a) => {
                return Err(Unreadable::HostMismatch {
                    host: shown_host(h),
                    authority: shown_host(a),
                })
            }
            (Some(h), _) => h,
            (None, Some(a)) => a,
            (None, None) => return Err(Unreadable::MissingHost),
        };
        if !is_host_name_by_split(host) {
            return Err(Unreadable::HostNotName(shown_host(host)));
        }
        Ok(host)
    }

    proptest::proptest! {
        #[test]
        fn request_host_reads_what_it_read_step_by_step(
            host in proptest::option::of(proptest::collection::vec(
                proptest::sample::select(vec![&b"kms"[..], b".", b"us-east-1", b":", b"443", b"0", b"@", b"x", b" ", b"\xe9", b"\t", b"_"]),
                0..6,
            )),
            authority in proptest::option::of(proptest::sample::select(vec!["kms.x", "KMS.X", "kms.x:443", "a@kms.x"])),
        ) {
            let mut headers = HeaderMap::new();
            if let Some(host) = host {
                if let Ok(v) = HeaderValue::from_bytes(&host.concat()) {
                    headers.insert(header::HOST, v);
                }
            }
            let uri = match authority {
                Some(a) => format!("https://{a}/").parse::<Uri>().unwrap(),
                None => Uri::from_static("/"),
            };
            proptest::prop_assert_eq!(request_host(&uri, &headers), request_host_by_steps(&uri, &headers));
        }

        #[test]
        fn is_host_name_agrees_with_its_split_reading(
            host in proptest::string::string_regex(
                "[a-z0-9.-]{0,6}(:[0-9+-]{0,7})?[:@/ _\u{e9}0]{0,2}(:[0-9]{0,3})?"
            ).unwrap()
        ) {
            proptest::prop_assert_eq!(is_host_name(&host), is_host_name_by_split(&host), "{:?}", host);
        }
    }

    #[test]
    fn hosts_are_dns_names_with_an_optional_port() {
        for good in [
            "kms.us-east-1.amazonaws.com",
            "kms.us-east-1.amazonaws.com:443",
            "127.0.0.1:4566",
            "localhost",
            "kms.us-east-1.amazonaws.com.",
        ] {
            assert!(is_host_name(good), "{good}");
        }
        for bad in [
            "kms.x@sts.amazonaws.com",
            "kms.us-east-1.amazonaws.com:",
            "kms.us-east-1.amazonaws.com:0",
            "kms.us-east-1.amazonaws.com:65536",
            "kms.us-east-1.amazonaws.com:+443",
            "kms.us-east-1.amazonaws.com:443:443",
            "[::1]:443",
            "kms us-east-1",
            "kms.us-east-1.amazonaws.com/x",
            "kms.us-east-1.amazonaws.com\\@evil",
            "",
            ":443",
        ] {
            assert!(!is_host_name(bad), "{bad}");
            let h = headers(&[("host", bad)]);
            assert!(request_host(&Uri::from_static("/"), &h).is_err(), "{bad}");
        }
        let h = headers(&[("host", "AKIDLEAK:secret@kms.us-east-1.amazonaws.com")]);
        let refused = request_host(&Uri::from_static("/"), &h).unwrap_err();
        let shown = refused.to_string();
        assert!(
            !shown.contains("secret") && !shown.contains("AKIDLEAK"),
            "{shown}"
        );
    }
}
