//! The caller's workload identity, read from the client certificate the TLS listener verified:
//! its SPIFFE ID (the certificate's one `spiffe://` URI SAN), else its first DNS SAN, else none.
//!
//! The chain, the validity period and the client-auth key usage are rustls' to verify
//! (`tls.rs`); rustls knows nothing of SPIFFE, so the rules of an X.509-SVID are checked here,
//! strictly: a certificate with more than one URI SAN is ambiguous and refused, a URI SAN that is
//! not a well-formed SPIFFE ID is refused rather than passed on, and a SPIFFE leaf must have the
//! key usage the X.509-SVID standard asks for. A leaf: depends on no other module of the crate.

use std::sync::Arc;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The longest SPIFFE ID taken, in bytes: what the SPIFFE ID standard requires implementations to
/// support.
pub const MAX_SPIFFE_ID_BYTES: usize = 2048;
/// The longest trust domain name of a SPIFFE ID, in bytes (the standard's bound).
pub const MAX_TRUST_DOMAIN_BYTES: usize = 255;
/// The longest DNS name taken as an identity, in bytes.
pub const MAX_DNS_NAME_BYTES: usize = 253;
/// The longest label of a DNS name taken as an identity, in bytes.
pub const MAX_DNS_LABEL_BYTES: usize = 63;
/// The longest caller identity of any kind, in bytes (a SPIFFE ID's bound; a DNS name's is
/// lower): what a record keeps of `caller` whole.
pub const MAX_CALLER_BYTES: usize = MAX_SPIFFE_ID_BYTES;

/// How much of a refused name an error shows.
const SHOWN_CHARS: usize = 120;

/// Why a verified client certificate yields no usable identity: the connection is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the client certificate cannot be read: {0}; present an X.509 certificate")]
    Unreadable(String),
    #[error("the client certificate has {0} URI SANs, so whose it is is ambiguous (an X.509-SVID has exactly one); issue the workload a certificate with one spiffe:// URI SAN")]
    Ambiguous(usize),
    #[error("the client certificate's URI SAN {uri} is not a SPIFFE ID: {why}; issue the workload a certificate whose one URI SAN is a spiffe://trust-domain/path ID")]
    NotSpiffe { uri: String, why: &'static str },
    #[error("the client certificate has the SPIFFE ID {id} but {why}; an X.509-SVID leaf has a critical key usage with digitalSignature and without keyCertSign or cRLSign")]
    KeyUsage { id: String, why: &'static str },
    #[error("the client certificate expired at {0} (a resumed TLS session brought it back); the client must present a current certificate")]
    Expired(String),
    #[error("the client certificate is a CA certificate (basicConstraints CA:TRUE); a workload presents a leaf")]
    Ca,
    #[error("the client certificate's first DNS SAN {name} cannot name a caller: {why}; issue the workload a certificate with a spiffe:// URI SAN, or a plain host name as its first DNS SAN")]
    BadDnsName { name: String, why: &'static str },
}

/// What a connection's verified client certificate says of the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The SPIFFE ID, or the DNS name (lower case); `None` when the certificate names neither.
    pub caller: Option<Arc<str>>,
    /// The certificate's notAfter, in seconds since the Unix epoch: a resumed TLS session brings
    /// back a certificate without verifying it again.
    pub not_after: i64,
}

/// The identity in a client certificate (DER) that has been verified: `caller` is `None` when it
/// names none (no URI SAN, no DNS SAN).
pub fn identity_of(leaf: &[u8]) -> Result<Identity, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|e| IdentityError::Unreadable(e.to_string()))?;
    let not_after = cert.validity().not_after.timestamp();
    if cert
        .basic_constraints()
        .map_err(|e| IdentityError::Unreadable(e.to_string()))?
        .is_some_and(|bc| bc.value.ca)
    {
        return Err(IdentityError::Ca);
    }
    // Two SAN extensions are an error here (x509-parser refuses duplicate extensions).
    let names: Vec<&GeneralName<'_>> = match cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Unreadable(e.to_string()))?
    {
        Some(san) => san.value.general_names.iter().collect(),
        None => Vec::new(),
    };
    let uris: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    let key_usage = cert
        .key_usage()
        .map_err(|e| IdentityError::Unreadable(e.to_string()))?
        .map(|ku| *ku.value);
    // Never a signing certificate, whatever name it carries.
    if let Some(ku) = key_usage {
        if ku.key_cert_sign() || ku.crl_sign() {
            return Err(IdentityError::KeyUsage {
                id: shown(uris.first().copied().unwrap_or("(none)")),
                why: "its key usage allows signing certificates or CRLs",
            });
        }
    }
    match uris.as_slice() {
        [] => {}
        [uri] => {
            check_spiffe_id(uri).map_err(|why| IdentityError::NotSpiffe {
                uri: shown(uri),
                why,
            })?;
            match key_usage {
                None => {
                    return Err(IdentityError::KeyUsage {
                        id: shown(uri),
                        why: "it has no key usage extension",
                    })
                }
                Some(ku) if !ku.digital_signature() => {
                    return Err(IdentityError::KeyUsage {
                        id: shown(uri),
                        why: "its key usage lacks digitalSignature",
                    })
                }
                Some(_) => {}
            }
            return Ok(Identity {
                caller: Some(Arc::from(*uri)),
                not_after,
            });
        }
        more => return Err(IdentityError::Ambiguous(more.len())),
    }
    let first_dns = names.iter().find_map(|n| match n {
        GeneralName::DNSName(name) => Some(*name),
        _ => None,
    });
    let Some(name) = first_dns else {
        return Ok(Identity {
            caller: None,
            not_after,
        });
    };
    let id = dns_identity(name).map_err(|why| IdentityError::BadDnsName {
        name: shown(name),
        why,
    })?;
    Ok(Identity {
        caller: Some(Arc::from(id)),
        not_after,
    })
}

/// A name for an error message: quoted and escaped, cut to [`SHOWN_CHARS`].
fn shown(name: &str) -> String {
    let cut: String = name.chars().take(SHOWN_CHARS).collect();
    if cut.len() < name.len() {
        format!("{cut:?}...")
    } else {
        format!("{cut:?}")
    }
}

/// Which kind of name a caller identity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerKind {
    /// A SPIFFE ID: a certificate's one URI SAN.
    Spiffe,
    /// A DNS name: a certificate's first DNS SAN, when it has no URI SAN.
    Dns,
}

/// Checks a caller identity written as text (a policy test case's `caller`, or what the policy
/// matches caller patterns against) exactly as the listener checks the names of a certificate:
/// text that starts with `spiffe:` (in any case) is read as a SPIFFE ID ([`check_spiffe_id`]),
/// anything else as a DNS name ([`check_dns_name`]). No DNS name holds a `:` and every SPIFFE ID
/// does, so a text passes exactly when a certificate naming it (as its URI SAN or its DNS SAN)
/// gives it as the caller. The one check of both the listener and the policy.
pub fn check_caller(id: &str) -> Result<CallerKind, &'static str> {
    if id
        .get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("spiffe:"))
    {
        check_spiffe_id(id).map(|()| CallerKind::Spiffe)
    } else {
        check_dns_name(id).map(|()| CallerKind::Dns)
    }
}

/// A byte a SPIFFE ID's trust domain may hold: `[a-z0-9._-]`.
pub fn trust_domain_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
}

/// A byte a SPIFFE ID's path segment may hold: `[A-Za-z0-9._-]`.
pub fn spiffe_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

/// A byte a DNS label of an identity may hold: `[A-Za-z0-9-]`.
pub fn dns_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}

/// Checks a SPIFFE ID of a workload, strictly (the SPIFFE ID standard, as go-spiffe reads it):
/// the literal lower-case scheme `spiffe://`; a trust domain of 1 to 255 bytes of `[a-z0-9._-]`
/// (so no user info, port, upper case or percent-encoding); a path that is not empty, of segments
/// of `[A-Za-z0-9._-]` that are neither empty (no `//`, no trailing `/`) nor `.` or `..`; no
/// query or fragment; at most [`MAX_SPIFFE_ID_BYTES`] in all.
pub fn check_spiffe_id(id: &str) -> Result<(), &'static str> {
    if id.len() > MAX_SPIFFE_ID_BYTES {
        return Err("it is longer than 2048 bytes");
    }
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return Err(
            if id
                .get(..9)
                .is_some_and(|s| s.eq_ignore_ascii_case("spiffe://"))
            {
                "its scheme must be written spiffe:// in lower case"
            } else {
                "its scheme is not spiffe://"
            },
        );
    };
    let (domain, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    if domain.is_empty() {
        return Err("its trust domain is empty");
    }
    if domain.len() > MAX_TRUST_DOMAIN_BYTES {
        return Err("its trust domain is longer than 255 bytes");
    }
    if !domain.bytes().all(trust_domain_byte) {
        return Err("its trust domain may only hold lower-case letters, digits, '.', '-' and '_' (no upper case, user info, port, query or percent-encoding)");
    }
    if path.is_empty() {
        return Err("it has no path, so it names a trust domain, not a workload");
    }
    for segment in path[1..].split('/') {
        if segment.is_empty() {
            return Err("its path has an empty segment ('//' or a trailing '/')");
        }
        if segment == "." || segment == ".." {
            return Err("its path has a '.' or '..' segment");
        }
        if !segment.bytes().all(spiffe_segment_byte) {
            return Err("its path may only hold letters, digits, '.', '-' and '_' between slashes (no query, fragment or percent-encoding)");
        }
    }
    Ok(())
}

/// A DNS SAN as an identity ([`check_dns_name`]), folded to lower case.
fn dns_identity(name: &str) -> Result<String, &'static str> {
    check_dns_name(name)?;
    Ok(name.to_ascii_lowercase())
}

/// Checks a DNS name of a workload: a plain host name; no wildcard, no trailing dot, labels of 1
/// to [`MAX_DNS_LABEL_BYTES`] letters, digits and '-', at most [`MAX_DNS_NAME_BYTES`].
pub fn check_dns_name(name: &str) -> Result<(), &'static str> {
    if name.len() > MAX_DNS_NAME_BYTES {
        return Err("it is longer than 253 bytes");
    }
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.starts_with("*.") || name == "*" {
        return Err("it is a wildcard, which names no one workload");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > MAX_DNS_LABEL_BYTES {
            return Err("its labels must be 1 to 63 bytes (no empty label, no trailing dot)");
        }
        if !label.bytes().all(dns_label_byte) {
            return Err("its labels may only hold letters, digits and '-'");
        }
    }
    Ok(())
}

/// Certificates and texts for the tests of the modules that read identities (here, the policy's
/// caller patterns, policy test cases).
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::{prop_oneof, Strategy};
    use rcgen::{
        BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType,
        PKCS_ECDSA_P256_SHA256,
    };

    /// The caller the listener takes from a certificate (DER).
    pub(crate) fn caller(der: &[u8]) -> Result<Option<Arc<str>>, IdentityError> {
        identity_of(der).map(|i| i.caller)
    }

    /// A self-signed leaf with these SANs and key usages (DER).
    pub(crate) fn leaf(sans: Vec<SanType>, usages: Vec<KeyUsagePurpose>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.key_usages = usages;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    pub(crate) fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    pub(crate) fn dns(s: &str) -> SanType {
        SanType::DnsName(s.try_into().unwrap())
    }

    pub(crate) fn sign() -> Vec<KeyUsagePurpose> {
        vec![KeyUsagePurpose::DigitalSignature]
    }

    /// The caller a certificate naming `text` gives the listener: `text` as its URI SAN when it
    /// holds a `:`, else as its DNS SAN.
    pub(crate) fn listener_caller(text: &str) -> Result<Option<Arc<str>>, IdentityError> {
        let san = if text.contains(':') {
            uri(text)
        } else {
            dns(text)
        };
        caller(&leaf(vec![san], sign()))
    }

    /// ASCII text that may or may not be a caller identity: SPIFFE IDs and DNS names, well
    /// formed or off by one thing (scheme case, characters, empty or dot segments, a trailing
    /// dot or slash, a port, labels and names about their length bounds).
    pub(crate) fn identity_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "(spiffe|SPIFFE|Spiffe|https)://[a-z0-9A-Z._%:@-]{0,6}(/[a-zA-Z0-9._%?#*-]{0,4}){0,4}",
            "spiffe://[a-z0-9.-]{1,8}(/[a-zA-Z0-9._-]{1,5}){1,4}",
            "[a-zA-Z0-9_*-]{0,66}(\\.[a-zA-Z0-9_*-]{0,66}){0,4}\\.?",
            "[a-zA-Z0-9-]{1,6}(\\.[a-zA-Z0-9-]{1,6}){0,3}",
            (2000usize..2060).prop_map(|n| format!("spiffe://example.org/{}", "a".repeat(n - 21))),
            (250usize..260).prop_map(|n| format!("spiffe://{}/w", "a".repeat(n))),
            (240usize..260, 58usize..66).prop_map(|(n, l)| {
                let label = "a".repeat(l);
                let mut name = label.clone();
                while name.len() < n {
                    name = format!("{name}.{label}");
                }
                name.truncate(n);
                name
            }),
        ]
    }

    #[test]
    fn the_spiffe_id_first_then_the_first_dns_name_then_none() {
        let id = "spiffe://example.org/ns/payments/sa/api";
        let got = caller(&leaf(vec![dns("a.example"), uri(id)], sign())).unwrap();
        assert_eq!(got.as_deref(), Some(id));
        let got = caller(&leaf(vec![dns("API.Example"), dns("b.example")], vec![])).unwrap();
        assert_eq!(got.as_deref(), Some("api.example"));
        assert_eq!(caller(&leaf(vec![], sign())).unwrap(), None);
    }

    #[test]
    fn two_uri_sans_are_ambiguous() {
        let both = leaf(
            vec![
                uri("spiffe://example.org/ns/a/sa/x"),
                uri("spiffe://example.org/ns/b/sa/x"),
            ],
            sign(),
        );
        assert_eq!(caller(&both), Err(IdentityError::Ambiguous(2)));
    }

    #[test]
    fn a_spiffe_leaf_needs_its_key_usage() {
        let id = "spiffe://example.org/w";
        assert!(matches!(
            caller(&leaf(vec![uri(id)], vec![])),
            Err(IdentityError::KeyUsage { .. })
        ));
        assert!(matches!(
            caller(&leaf(vec![uri(id)], vec![KeyUsagePurpose::KeyEncipherment])),
            Err(IdentityError::KeyUsage { .. })
        ));
        for bad in [KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign] {
            assert!(matches!(
                caller(&leaf(
                    vec![uri(id)],
                    vec![KeyUsagePurpose::DigitalSignature, bad]
                )),
                Err(IdentityError::KeyUsage { .. })
            ));
            assert!(matches!(
                caller(&leaf(vec![dns("a.example")], vec![bad])),
                Err(IdentityError::KeyUsage { .. })
            ));
        }
    }

    #[test]
    fn a_ca_certificate_names_no_caller() {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.subject_alt_names = vec![dns("a.example")];
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(caller(&der), Err(IdentityError::Ca));
    }

    #[test]
    fn malformed_uri_sans_are_refused_not_passed_on() {
        for bad in [
            "SPIFFE://example.org/w",
            "spiffe://Example.org/w",
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a?team=admin",
            "spiffe://example.org/a#x",
            "spiffe://example.org/a%2Fb",
            "spiffe://user@example.org/a",
            "spiffe://example.org:8443/a",
            "https://example.org/a",
        ] {
            assert!(
                matches!(
                    caller(&leaf(vec![uri(bad)], sign())),
                    Err(IdentityError::NotSpiffe { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn wildcards_and_odd_dns_names_name_no_caller() {
        for bad in ["*.example.org", "a..example", "a.example.", "a_b.example"] {
            assert!(
                matches!(
                    caller(&leaf(vec![dns(bad)], sign())),
                    Err(IdentityError::BadDnsName { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn spiffe_id_syntax() {
        for good in [
            "spiffe://example.org/w",
            "spiffe://a.b-c_d.9/ns/Team-A/sa/x.y_z",
            "spiffe://1.2.3.4/a",
        ] {
            assert_eq!(check_spiffe_id(good), Ok(()), "{good}");
        }
        let long_domain = format!("spiffe://{}/a", "a".repeat(256));
        assert!(check_spiffe_id(&long_domain).is_err());
        let long = format!("spiffe://example.org/{}", "a".repeat(2048));
        assert!(check_spiffe_id(&long).is_err());
        let longest = format!("spiffe://example.org/{}", "a".repeat(2048 - 21));
        assert_eq!(longest.len(), 2048);
        assert_eq!(check_spiffe_id(&longest), Ok(()));
        for bad in [
            "spiffe://",
            "spiffe:///a",
            "spiffe://ex ample/a",
            "spiffe://é.org/a",
        ] {
            assert!(check_spiffe_id(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever SANs a certificate carries: two URI SANs or more are refused, one is the
        /// caller exactly as written when it is a well-formed SPIFFE ID and refused otherwise;
        /// without a URI SAN the first DNS SAN (lower case) is the caller, without either none.
        #[test]
        fn the_caller_is_the_one_uri_or_the_first_dns_name_never_a_guess(
            uris in proptest::collection::vec("spiffe://[a-zA-Z0-9.]{1,6}(/[a-zA-Z0-9.%?]{0,4}){0,3}", 0..3),
            names in proptest::collection::vec("[a-zA-Z]{1,5}\\.example", 0..3),
        ) {
            let mut sans: Vec<SanType> = names.iter().map(|n| dns(n)).collect();
            sans.extend(uris.iter().map(|u| uri(u)));
            let got = caller(&leaf(sans, sign()));
            match uris.as_slice() {
                [] => proptest::prop_assert_eq!(
                    got,
                    Ok(names.first().map(|n| Arc::from(n.to_ascii_lowercase())))
                ),
                [one] => match check_spiffe_id(one) {
                    Ok(()) => proptest::prop_assert_eq!(got, Ok(Some(Arc::from(one.as_str())))),
                    Err(_) => proptest::prop_assert!(
                        matches!(got, Err(IdentityError::NotSpiffe { .. })),
                        "{:?}", got
                    ),
                },
                more => proptest::prop_assert_eq!(got, Err(IdentityError::Ambiguous(more.len()))),
            }
        }

        /// Whatever the text, an ID that passes is one the standard allows: lower-case scheme and
        /// trust domain, a path of clean segments.
        #[test]
        fn an_accepted_id_is_well_formed(text in "(spiffe|SPIFFE|http)://[a-zA-Z0-9./:@?#%_-]{0,40}") {
            if check_spiffe_id(&text).is_ok() {
                let rest = text.strip_prefix("spiffe://").unwrap();
                let (domain, path) = rest.split_at(rest.find('/').unwrap());
                proptest::prop_assert!(!domain.is_empty());
                proptest::prop_assert!(!domain.bytes().any(|b| b.is_ascii_uppercase() || b":@?#%/".contains(&b)));
                proptest::prop_assert!(path.len() > 1);
                for segment in path[1..].split('/') {
                    proptest::prop_assert!(!segment.is_empty() && segment != "." && segment != "..");
                    proptest::prop_assert!(!segment.bytes().any(|b| b":@?#%".contains(&b)));
                }
            }
        }
    }
}
