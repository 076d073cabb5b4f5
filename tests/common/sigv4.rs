//! An independent SigV4 (AWS4-HMAC-SHA256) signer and verifier, written from the spec with
//! `hmac` + `sha2`, so the tests never trust the proxy's (or the SDK's) idea of what is signed.
//!
//! Spec: <https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html>

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http::header::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// What a successful verification learned from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCredential {
    /// Access key id from the credential scope.
    pub access_key_id: String,
    /// Scope date, `YYYYMMDD`.
    pub date: String,
    pub region: String,
    pub service: String,
    /// The `SignedHeaders` list, in the order the client gave it (lowercase names).
    pub signed_headers: Vec<String>,
    /// The `X-Amz-Date` header value.
    pub amz_date: String,
}

impl VerifiedCredential {
    pub fn signs(&self, header: &str) -> bool {
        self.signed_headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case(header))
    }
}

/// The parts of an `Authorization: AWS4-HMAC-SHA256 ...` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedAuthorization {
    pub access_key_id: String,
    pub date: String,
    pub region: String,
    pub service: String,
    pub terminator: String,
    /// The raw `SignedHeaders=` value (`a;b;c`).
    pub signed_headers_raw: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

/// Parse `AWS4-HMAC-SHA256 Credential=AKID/20150830/us-east-1/kms/aws4_request,
/// SignedHeaders=content-type;host;x-amz-date, Signature=abcd...`.
pub fn parse_authorization(value: &str) -> Result<ParsedAuthorization, String> {
    let rest = value
        .strip_prefix(ALGORITHM)
        .ok_or_else(|| format!("Authorization does not start with {ALGORITHM}: {value:?}"))?;
    if !rest.starts_with(' ') {
        return Err(format!("no space after the algorithm: {value:?}"));
    }
    let mut credential = None;
    let mut signed_headers = None;
    let mut signature = None;
    for component in rest.split(',') {
        let component = component.trim();
        let (name, val) = component
            .split_once('=')
            .ok_or_else(|| format!("malformed Authorization component {component:?}"))?;
        let slot = match name {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            other => return Err(format!("unknown Authorization component {other:?}")),
        };
        if slot.is_some() {
            return Err(format!("repeated Authorization component {name:?}"));
        }
        *slot = Some(val.to_string());
    }
    let credential = credential.ok_or("Authorization has no Credential")?;
    let signed_headers_raw = signed_headers.ok_or("Authorization has no SignedHeaders")?;
    let signature = signature.ok_or("Authorization has no Signature")?;

    let scope: Vec<&str> = credential.split('/').collect();
    if scope.len() != 5 || scope.iter().any(|s| s.is_empty()) {
        return Err(format!(
            "Credential must be akid/date/region/service/aws4_request, got {credential:?}"
        ));
    }
    if scope[4] != "aws4_request" {
        return Err(format!(
            "credential scope must end in aws4_request, got {:?}",
            scope[4]
        ));
    }
    if scope[1].len() != 8 || !scope[1].bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "credential scope date {:?} is not YYYYMMDD",
            scope[1]
        ));
    }
    let signed: Vec<String> = signed_headers_raw
        .split(';')
        .map(|h| h.to_ascii_lowercase())
        .collect();
    if signed.iter().any(|h| h.is_empty()) {
        return Err(format!(
            "empty name in SignedHeaders {signed_headers_raw:?}"
        ));
    }
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("Signature is not 64 hex digits: {signature:?}"));
    }
    Ok(ParsedAuthorization {
        access_key_id: scope[0].to_string(),
        date: scope[1].to_string(),
        region: scope[2].to_string(),
        service: scope[3].to_string(),
        terminator: scope[4].to_string(),
        signed_headers_raw,
        signed_headers: signed,
        signature,
    })
}

/// Verify a SigV4-signed request.
///
/// `headers` must contain `host` (over HTTP/2 the caller inserts the URI authority as `host`;
/// see [`headers_with_host`]). Fails when: the Authorization header is missing, repeated or
/// malformed; `host` or `x-amz-date` is not signed; a signed header is missing; the scope date
/// differs from `X-Amz-Date`; the access key id is unknown to `secret_for`; or the signature
/// does not match (any changed signed header value, method, path, query or body byte).
pub fn verify(
    method: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
    secret_for: impl Fn(&str) -> Option<String>,
) -> Result<VerifiedCredential, String> {
    verify_h2(method, path_and_query, headers, None, body, secret_for)
}

/// [`verify`] for a request that may have been signed with the HTTP/2 pseudo-header
/// `:authority` among its SignedHeaders, as the AWS SDK for JavaScript v3's `NodeHttp2Handler`
/// does (its host-header middleware replaces `host` with `:authority` for h2 handlers). The
/// canonical value of `:authority` is `authority`, the pseudo-header as received; pass `None`
/// for an HTTP/1.x request, which has no `:authority`, so such a signature fails there as
/// "missing". A signed `:authority` stands in for the signed `host` that [`verify`] requires.
pub fn verify_h2(
    method: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    authority: Option<&str>,
    body: &[u8],
    secret_for: impl Fn(&str) -> Option<String>,
) -> Result<VerifiedCredential, String> {
    let mut auth_values = headers.get_all(http::header::AUTHORIZATION).iter();
    let auth = auth_values.next().ok_or("missing Authorization header")?;
    if auth_values.next().is_some() {
        return Err("repeated Authorization header".into());
    }
    let auth = auth
        .to_str()
        .map_err(|_| "Authorization header is not visible ASCII".to_string())?;
    let parsed = parse_authorization(auth)?;

    if !parsed
        .signed_headers
        .iter()
        .any(|h| h == "host" || h == AUTHORITY)
    {
        return Err(format!(
            "'Host' must be a 'SignedHeader' in the AWS Authorization (SignedHeaders={})",
            parsed.signed_headers_raw
        ));
    }
    if !parsed.signed_headers.iter().any(|h| h == "x-amz-date") {
        return Err(format!(
            "'X-Amz-Date' must be a 'SignedHeader' (SignedHeaders={})",
            parsed.signed_headers_raw
        ));
    }
    let mut date_values = headers.get_all("x-amz-date").iter();
    let amz_date = date_values.next().ok_or("missing X-Amz-Date header")?;
    if date_values.next().is_some() {
        return Err("repeated X-Amz-Date header".into());
    }
    let amz_date = amz_date
        .to_str()
        .map_err(|_| "X-Amz-Date is not ASCII".to_string())?
        .trim()
        .to_string();
    if amz_date.len() != 16 || !amz_date.starts_with(&parsed.date) {
        return Err(format!(
            "X-Amz-Date {amz_date:?} does not match the credential scope date {:?}",
            parsed.date
        ));
    }
    let secret = secret_for(&parsed.access_key_id).ok_or_else(|| {
        format!(
            "The security token included in the request is invalid (unknown access key id {:?})",
            parsed.access_key_id
        )
    })?;

    let body_hash = hex_sha256(body);
    if let Some(declared) = headers.get("x-amz-content-sha256") {
        if declared.as_bytes() != body_hash.as_bytes() {
            return Err(format!(
                "x-amz-content-sha256 {declared:?} is not the SHA-256 of the body ({body_hash})"
            ));
        }
    }

    let canonical = canonical_request_from(
        method,
        path_and_query,
        |name| {
            if name == AUTHORITY {
                authority.map(|a| vec![a.as_bytes()]).unwrap_or_default()
            } else {
                headers
                    .get_all(name)
                    .iter()
                    .map(HeaderValue::as_bytes)
                    .collect()
            }
        },
        &parsed.signed_headers,
        &parsed.signed_headers_raw,
        &body_hash,
    )?;
    let scope = format!(
        "{}/{}/{}/{}",
        parsed.date, parsed.region, parsed.service, parsed.terminator
    );
    let string_to_sign = string_to_sign(&amz_date, &scope, &canonical);
    let expected = signature(
        &secret,
        &parsed.date,
        &parsed.region,
        &parsed.service,
        &string_to_sign,
    );
    if expected != parsed.signature.to_ascii_lowercase() {
        return Err(format!(
            "The request signature we calculated does not match the signature you provided. \
             Canonical request:\n{canonical}\nString to sign:\n{string_to_sign}"
        ));
    }
    Ok(VerifiedCredential {
        access_key_id: parsed.access_key_id,
        date: parsed.date,
        region: parsed.region,
        service: parsed.service,
        signed_headers: parsed.signed_headers,
        amz_date,
    })
}

/// A copy of `headers` with `host` set from the URI authority when the request has no Host
/// header (HTTP/2 requests carry `:authority` instead).
pub fn headers_with_host(headers: &HeaderMap, uri: &http::Uri) -> HeaderMap {
    let mut headers = headers.clone();
    if !headers.contains_key(http::header::HOST) {
        if let Some(authority) = uri.authority() {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                headers.insert(http::header::HOST, v);
            }
        }
    }
    headers
}

/// The HTTP/2 pseudo-header some signers put among the SignedHeaders instead of `host`.
pub const AUTHORITY: &str = ":authority";

/// The SigV4 canonical request.
pub fn canonical_request(
    method: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    signed_headers: &[String],
    signed_headers_line: &str,
    payload_hash: &str,
) -> Result<String, String> {
    canonical_request_from(
        method,
        path_and_query,
        |name| {
            headers
                .get_all(name)
                .iter()
                .map(HeaderValue::as_bytes)
                .collect()
        },
        signed_headers,
        signed_headers_line,
        payload_hash,
    )
}

/// The SigV4 canonical request, with each signed header's values (in order) from `values`.
fn canonical_request_from<'a>(
    method: &str,
    path_and_query: &str,
    values: impl Fn(&str) -> Vec<&'a [u8]>,
    signed_headers: &[String],
    signed_headers_line: &str,
    payload_hash: &str,
) -> Result<String, String> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, q),
        None => (path_and_query, ""),
    };
    let mut out = String::new();
    out.push_str(method);
    out.push('\n');
    out.push_str(&canonical_uri(path));
    out.push('\n');
    out.push_str(&canonical_query(query));
    out.push('\n');
    for name in signed_headers {
        let values: Vec<String> = values(name.as_str())
            .into_iter()
            .map(canonical_header_value)
            .collect();
        if values.is_empty() {
            return Err(format!(
                "signed header {name:?} is missing from the request"
            ));
        }
        out.push_str(name);
        out.push(':');
        out.push_str(&values.join(","));
        out.push('\n');
    }
    out.push('\n');
    out.push_str(signed_headers_line);
    out.push('\n');
    out.push_str(payload_hash);
    Ok(out)
}

/// Trim, and collapse each run of spaces to one (SigV4 "Trimall").
fn canonical_header_value(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(s.len());
    let mut prev_space = false;
    for c in s.trim_matches(|c| c == ' ' || c == '\t').chars() {
        if c == ' ' || c == '\t' {
            if !prev_space {
                out.push(' ');
            }
            prev_space = true;
        } else {
            out.push(c);
            prev_space = false;
        }
    }
    out
}

/// Non-S3 services: each path segment URI-encoded (again, so `%` becomes `%25`); empty is `/`.
fn canonical_uri(path: &str) -> String {
    if path.is_empty() {
        return "/".into();
    }
    path.split('/')
        .map(uri_encode)
        .collect::<Vec<_>>()
        .join("/")
}

fn canonical_query(query: &str) -> String {
    if query.is_empty() {
        return String::new();
    }
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k)),
                uri_encode(&percent_decode(v)),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hi = (bytes[i + 1] as char).to_digit(16);
            let lo = (bytes[i + 2] as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hi, lo) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex_sha256(canonical_request.as_bytes())
    )
}

pub fn signature(
    secret: &str,
    date: &str,
    region: &str,
    service: &str,
    string_to_sign: &str,
) -> String {
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    hex::encode(hmac(&k_signing, string_to_sign.as_bytes()))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

pub fn hex_sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The current time as `YYYYMMDDTHHMMSSZ`.
pub fn amz_date_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    amz_date_from_unix(secs)
}

/// `secs` since the epoch as `YYYYMMDDTHHMMSSZ`.
pub fn amz_date_from_unix(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A signature produced by [`sign`] / [`sign_headers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The full `Authorization` header value.
    pub authorization: String,
    /// The `X-Amz-Date` header value that was signed.
    pub amz_date: String,
}

/// Sign a KMS JSON request like botocore does: `POST /`, SignedHeaders
/// `content-type;host;x-amz-date;x-amz-target`, Content-Type `application/x-amz-json-1.1`.
/// `amz_date` is `YYYYMMDDTHHMMSSZ`; `None` means now.
#[allow(clippy::too_many_arguments)]
pub fn sign(
    method: &str,
    host: &str,
    target: &str,
    body: &[u8],
    access_key_id: &str,
    secret: &str,
    region: &str,
    amz_date: Option<&str>,
) -> Signed {
    let amz_date = amz_date.map(str::to_string).unwrap_or_else(amz_date_now);
    let headers = [
        ("content-type", "application/x-amz-json-1.1"),
        ("host", host),
        ("x-amz-date", amz_date.as_str()),
        ("x-amz-target", target),
    ];
    let authorization = sign_headers(
        method,
        "/",
        &headers,
        body,
        access_key_id,
        secret,
        region,
        "kms",
    );
    Signed {
        authorization,
        amz_date,
    }
}

/// Sign exactly the given headers (all of them; they must include `host` (or `:authority`, as
/// an h2 signer may) and `x-amz-date`; repeated names are joined with `,` as SigV4 does) and
/// return the `Authorization` value.
#[allow(clippy::too_many_arguments)]
pub fn sign_headers(
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    access_key_id: &str,
    secret: &str,
    region: &str,
    service: &str,
) -> String {
    let lower: Vec<(String, &str)> = headers
        .iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), *value))
        .collect();
    let amz_date = lower
        .iter()
        .find(|(name, _)| name == "x-amz-date")
        .expect("x-amz-date among the signed headers")
        .1
        .to_string();
    let date = &amz_date[..8];
    let mut names: Vec<String> = lower.iter().map(|(name, _)| name.clone()).collect();
    names.sort();
    names.dedup();
    let line = names.join(";");
    let canonical = canonical_request_from(
        method,
        path_and_query,
        |name| {
            lower
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_bytes())
                .collect()
        },
        &names,
        &line,
        &hex_sha256(body),
    )
    .expect("all signed headers present");
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let sts = string_to_sign(&amz_date, &scope, &canonical);
    let sig = signature(secret, date, region, service, &sts);
    format!("{ALGORITHM} Credential={access_key_id}/{scope}, SignedHeaders={line}, Signature={sig}")
}

/// A `POST /` KMS request (`TrentService.<operation>`, JSON `body`) to `uri`, signed the way the
/// AWS SDK for JavaScript v3's `NodeHttp2Handler` signs: `:authority` (value `authority`)
/// among the SignedHeaders, no `host`. Sent over h2 to a URI whose authority is `authority`, the
/// signature verifies only where `:authority` arrives as it was signed.
pub fn signed_over_authority(
    authority: &str,
    uri: &str,
    operation: &str,
    body: &[u8],
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let amz_date = amz_date_now();
    let target = format!("TrentService.{operation}");
    let authorization = sign_headers(
        "POST",
        "/",
        &[
            (":authority", authority),
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-date", &amz_date),
            ("x-amz-target", &target),
        ],
        body,
        super::ACCESS_KEY_ID,
        super::SECRET_KEY,
        super::REGION,
        "kms",
    );
    assert!(
        authorization.contains("SignedHeaders=:authority;content-type;x-amz-date;x-amz-target,"),
        "{authorization}"
    );
    http::Request::post(uri)
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amz-target", target)
        .header("x-amz-date", &amz_date)
        .header("authorization", &authorization)
        .body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(
            body,
        )))
        .unwrap()
}
