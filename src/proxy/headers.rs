//! Hop-by-hop headers: what belongs to one connection and must not be forwarded (RFC 9110 §7.6.1).
//!
//! SDKs never sign these (botocore's blacklist, Rust and Go's ignore lists), so dropping them
//! keeps the signature. Everything else is forwarded byte for byte.

use http::header::{self, HeaderMap, HeaderName};

/// Lowercase, as `HeaderName`s are.
pub(crate) const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether a header name as received (any case) is one of [`HOP_BY_HOP`].
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|hop| hop.as_bytes().eq_ignore_ascii_case(name))
}

/// Removes hop-by-hop headers and the headers the `Connection` header names. The classifier has
/// already refused a `Connection` header that names a signed or routing header.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    // hyper's server answers `Expect: 100-continue` itself; SDKs never sign it.
    headers.remove(header::EXPECT);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-trace"),
            ("keep-alive", "timeout=5"),
            ("x-trace", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("expect", "100-continue"),
            ("x-amz-target", "TrentService.Encrypt"),
            ("content-length", "2"),
        ] {
            h.append(HeaderName::from_static(k), v.parse().unwrap());
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "x-amz-target"]);
    }
}
