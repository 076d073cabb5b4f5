//! Reads (never verifies) the SigV4 credential scope of a request: the access key id and region.
//!
//! KMS verifies the signature. The proxy only needs to know whose key signed, for
//! `exempt_principals` and the audit record, so it must read the same credential KMS will verify:
//! a request that names two (a repeated `Credential=`, or the header and the query both) is refused.

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};

use crate::ascii::{split_byte, split_once_byte};

/// The credential scope of a SigV4 (or SigV4a) request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub access_key_id: String,
    /// Absent for SigV4a, whose scope has no region.
    pub region: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("the request carries a credential both in Authorization and in X-Amz-Credential; sign it one way")]
    TwoCredentials,
    #[error(
        "the Authorization header is not a SigV4 header the proxy can read unambiguously: {0}"
    )]
    MalformedHeader(&'static str),
    #[error(
        "the X-Amz-Credential query parameter is not a credential scope the proxy can read: {0}"
    )]
    MalformedQuery(&'static str),
}

const ALGORITHMS: [&str; 2] = ["AWS4-HMAC-SHA256", "AWS4-ECDSA-P256-SHA256"];

/// The credential the request is signed with, if any.
pub fn read_credential(
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Option<Credential>, CredentialError> {
    read_credential_of(headers.get(AUTHORIZATION), query)
}

/// [`read_credential`], given the first `Authorization` value (`classify::HeaderScan`'s).
pub fn read_credential_of(
    authorization: Option<&HeaderValue>,
    query: Option<&str>,
) -> Result<Option<Credential>, CredentialError> {
    let from_query = match query {
        Some(q) => credential_from_query(q)?,
        None => None,
    };
    let from_header = match authorization {
        Some(value) => {
            Some(credential_from_header(value.to_str().map_err(|_| {
                CredentialError::MalformedHeader("not visible ASCII")
            })?)?)
        }
        None => None,
    };
    match (from_header, from_query) {
        (Some(_), Some(_)) => Err(CredentialError::TwoCredentials),
        (Some(c), None) | (None, Some(c)) => Ok(Some(c)),
        (None, None) => Ok(None),
    }
}

/// Whether the request's signature covers the HTTP/2 pseudo-header `:authority` (the AWS SDK for
/// JavaScript v3's `NodeHttp2Handler` signs it instead of `host`): such a request can only reach
/// KMS as HTTP/2, with `:authority` as received. Read leniently: any `SignedHeaders` parameter
/// that lists `:authority` counts. (A query-signed request never gets this far: `classify`
/// refuses every query string.)
pub fn signs_authority(headers: &HeaderMap) -> bool {
    let lists = |signed: &str| signed.split(';').any(|h| h.trim() == ":authority");
    headers.get_all(AUTHORIZATION).iter().any(|value| {
        String::from_utf8_lossy(value.as_bytes())
            .split([',', ' '])
            .filter_map(|param| param.trim().strip_prefix("SignedHeaders="))
            .any(lists)
    })
}

fn credential_from_header(value: &str) -> Result<Credential, CredentialError> {
    use CredentialError::MalformedHeader as Bad;
    let (algorithm, params) = split_once_byte(value, b' ').ok_or(Bad("no parameters"))?;
    if !ALGORITHMS.contains(&algorithm) {
        return Err(Bad("unknown signing algorithm"));
    }
    let mut credential = None;
    let mut signed_headers = 0;
    let mut signature = 0;
    for param in split_byte(params, b',') {
        // `to_str` lets only visible ASCII and tabs through: trimming ASCII whitespace trims
        // exactly what `str::trim` would.
        let (name, value) =
            split_once_byte(param.trim_ascii(), b'=').ok_or(Bad("a parameter without '='"))?;
        match name {
            "Credential" if credential.is_none() => credential = Some(value),
            "Credential" => return Err(Bad("Credential appears twice")),
            "SignedHeaders" => signed_headers += 1,
            "Signature" => signature += 1,
            _ => return Err(Bad("an unknown parameter")),
        }
    }
    if signed_headers != 1 || signature != 1 {
        return Err(Bad("SignedHeaders and Signature must each appear once"));
    }
    parse_scope(credential.ok_or(Bad("no Credential"))?).ok_or(Bad("Credential is not a scope"))
}

fn credential_from_query(query: &str) -> Result<Option<Credential>, CredentialError> {
    use CredentialError::MalformedQuery as Bad;
    let mut found = None;
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !percent_decode(name)
            .ok_or(Bad("bad percent-encoding"))?
            .eq_ignore_ascii_case("X-Amz-Credential")
        {
            continue;
        }
        if found.is_some() {
            return Err(Bad("X-Amz-Credential appears twice"));
        }
        let value = percent_decode(value).ok_or(Bad("bad percent-encoding"))?;
        found = Some(parse_scope(&value).ok_or(Bad("not a credential scope"))?);
    }
    Ok(found)
}

/// `AKID/date/region/service/aws4_request` (SigV4) or `AKID/date/service/aws4_request` (SigV4a).
fn parse_scope(scope: &str) -> Option<Credential> {
    // A readable scope has at most five parts, so they fit an array; a sixth makes it unreadable.
    let mut parts = [""; 5];
    let mut count = 0;
    for part in split_byte(scope, b'/') {
        *parts.get_mut(count)? = part;
        count += 1;
    }
    let (akid, region) = match &parts[..count] {
        [akid, _date, region, _service, "aws4_request"] => (*akid, Some(*region)),
        [akid, _date, _service, "aws4_request"] => (*akid, None),
        _ => return None,
    };
    if akid.is_empty() || !akid.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some(Credential {
        access_key_id: akid.to_owned(),
        region: region.map(str::to_owned),
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, auth.parse().unwrap());
        h
    }

    const AUTH: &str = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261128/us-east-1/kms/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=abcd";

    #[test]
    fn reads_the_sigv4_header() {
        let c = read_credential(&headers(AUTH), None).unwrap().unwrap();
        assert_eq!(c.access_key_id, "AKIDEXAMPLE");
        assert_eq!(c.region.as_deref(), Some("us-east-1"));
    }

    #[test]
    fn reads_sigv4a_without_region() {
        let h = headers("AWS4-ECDSA-P256-SHA256 Credential=AKID/20261128/kms/aws4_request,SignedHeaders=host,Signature=ab");
        let c = read_credential(&h, None).unwrap().unwrap();
        assert_eq!(c.region, None);
    }

    #[test]
    fn reads_the_query_credential() {
        let c = read_credential(
            &HeaderMap::new(),
            Some("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20261128%2Feu-west-1%2Fkms%2Faws4_request"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.access_key_id, "AKID");
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(read_credential(&HeaderMap::new(), None).unwrap(), None);
    }

    #[test]
    fn refuses_two_credentials() {
        let twice = "AWS4-HMAC-SHA256 Credential=AKIDEXEMPT/20261128/us-east-1/kms/aws4_request, Credential=AKIDOTHER/20261128/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=ab";
        assert!(read_credential(&headers(twice), None).is_err());
        let q = "X-Amz-Credential=AKID%2F20261128%2Feu-west-1%2Fkms%2Faws4_request";
        assert_eq!(
            read_credential(&headers(AUTH), Some(q)),
            Err(CredentialError::TwoCredentials)
        );
        let q2 = format!("{q}&x-amz-credential={q}");
        assert!(read_credential(&HeaderMap::new(), Some(&q2)).is_err());
    }

    /// The reader before it split on bytes, kept to check the byte-splitting one against.
    fn credential_from_header_by_str_split(value: &str) -> Result<Credential, CredentialError> {
        use CredentialError::MalformedHeader as Bad;
        let (algorithm, params) = value.split_once(' ').ok_or(Bad("no parameters"))?;
        if !ALGORITHMS.contains(&algorithm) {
            return Err(Bad("unknown signing algorithm"));
        }
        let (mut credential, mut signed_headers, mut signature) = (None, 0, 0);
        for param in params.split(',') {
            let (name, value) = param
                .trim()
                .split_once('=')
                .ok_or(Bad("a parameter without '='"))?;
            match name {
                "Credential" if credential.is_none() => credential = Some(value),
                "Credential" => return Err(Bad("Credential appears twice")),
                "SignedHeaders" => signed_headers += 1,
                "Signature" => signature += 1,
                _ => return Err(Bad("an unknown parameter")),
            }
        }
        if signed_headers != 1 || signature != 1 {
            return Err(Bad("SignedHeaders and Signature must each appear once"));
        }
        let scope = credential.ok_or(Bad("no Credential"))?;
        let parts: Vec<&str> = scope.split('/').collect();
        let (akid, region) = match parts.as_slice() {
            [akid, _date, region, _service, "aws4_request"] => (*akid, Some(*region)),
            [akid, _date, _service, "aws4_request"] => (*akid, None),
            _ => return Err(Bad("Credential is not a scope")),
        };
        if akid.is_empty() || !akid.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(Bad("Credential is not a scope"));
        }
        Ok(Credential {
            access_key_id: akid.to_owned(),
            region: region.map(str::to_owned),
        })
    }

    #[test]
    fn the_byte_splitting_reader_reads_as_the_str_splitting_one() {
        let scopes = [
            "AKID/20261128/us-east-1/kms/aws4_request",
            "AKID/20261128/kms/aws4_request",
            "AKID/20261128/us-east-1/kms/aws4_request/",
            "AKID/20261128/us-east-1/kms/x/aws4_request",
            "/20261128/us-east-1/kms/aws4_request",
            "AKID//us-east-1//aws4_request",
            "AKID/20261128/kms/aws4_requestx",
            "AK-ID/20261128/kms/aws4_request",
            "AKID/aws4_request",
            "",
            "/",
            "////",
            "/////",
        ];
        let mut headers = Vec::new();
        for scope in scopes {
            for (sep, pad) in [
                (",", ""),
                (", ", ""),
                (",\t", "\t"),
                (",,", " "),
                (" ,", "  "),
            ] {
                headers.push(format!(
                    "AWS4-HMAC-SHA256 {pad}Credential={scope}{sep}SignedHeaders=host{sep}Signature=ab{pad}"
                ));
            }
        }
        headers.extend(
            [
                "AWS4-HMAC-SHA256 Credential=AKID/d/r/kms/aws4_request, SignedHeaders=host, Signature=ab,",
                "AWS4-HMAC-SHA256 Signature=ab, SignedHeaders=a=b, Credential=AKID/d/kms/aws4_request",
                "AWS4-HMAC-SHA256  Credential=AKID/d/r/kms/aws4_request, SignedHeaders=host, Signature=ab",
                "AWS4-HMAC-SHA256 Credential =AKID/d/r/kms/aws4_request, SignedHeaders=host, Signature=ab",
                "AWS4-HMAC-SHA256 Credential=AKID/d/r/kms/aws4_request, SignedHeaders=host, Signature",
                "AWS4-HMAC-SHA256 Credential=AKID/d/r/kms/aws4_request SignedHeaders=host, Signature=ab",
                "AWS4-HMAC-SHA256 ",
                "AWS4-HMAC-SHA256",
                " AWS4-HMAC-SHA256 Credential=AKID/d/r/kms/aws4_request, SignedHeaders=h, Signature=ab",
                "AWS4-ECDSA-P256-SHA256 Credential=AKID/d/kms/aws4_request,SignedHeaders=h,Signature=ab",
                "",
            ]
            .map(String::from),
        );
        for header in &headers {
            assert_eq!(
                credential_from_header(header),
                credential_from_header_by_str_split(header),
                "{header:?}"
            );
        }
    }

    #[test]
    fn refuses_malformed_headers() {
        for bad in [
            "AWS4-HMAC-SHA256",
            "Basic dXNlcjpwYXNz",
            "AWS4-HMAC-SHA256 Credential=AKID/x/kms, SignedHeaders=host, Signature=ab",
            "AWS4-HMAC-SHA256 Credential=AK/ID/20261128/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=ab",
            "AWS4-HMAC-SHA256 Credential=AKID/20261128/us-east-1/kms/aws4_request, SignedHeaders=host",
            "AWS4-HMAC-SHA256 Credential=AKID/20261128/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=ab, Extra=1",
        ] {
            assert!(read_credential(&headers(bad), None).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_signed_authority_is_seen_in_the_header() {
        let signed = |list: &str| {
            headers(&format!(
                "AWS4-HMAC-SHA256 Credential=AKID/20261128/us-east-1/kms/aws4_request, SignedHeaders={list}, Signature=ab"
            ))
        };
        assert!(signs_authority(&signed(
            ":authority;content-type;x-amz-date"
        )));
        assert!(signs_authority(&signed("content-type;:authority")));
        assert!(!signs_authority(&signed("content-type;host;x-amz-date")));
        assert!(!signs_authority(&signed("authority;host")));
        assert!(!signs_authority(&HeaderMap::new()));
    }
}
