//! The host names of AWS KMS endpoints, recognised by their shape in every AWS partition,
//! whatever the configuration says.
//!
//! CONNECT uses this so that a KMS name is intercepted and judged, or refused, but never spliced
//! blind because `tunnel_hosts` happens to match it; `check` refuses a `tunnel_hosts` glob that
//! can match one; the leaf minter signs only for names of this shape (plus names the config lists
//! exactly), so what it can be asked to mint is a well-formed set.
//!
//! The partitions' DNS suffixes are those of the AWS SDKs' endpoint rules, `partitions.json`
//! version 1.1 (aws-sdk-js-v3, `packages/util-endpoints/src/lib/aws/partitions.json`, the same
//! data as botocore's and aws-sdk-rust's):
//!
//! | partition  | dnsSuffix          | dualStackDnsSuffix             |
//! |------------|--------------------|--------------------------------|
//! | aws        | `amazonaws.com`    | `api.aws`                      |
//! | aws-cn     | `amazonaws.com.cn` | `api.amazonwebservices.com.cn` |
//! | aws-us-gov | `amazonaws.com`    | `api.aws`                      |
//! | aws-iso    | `c2s.ic.gov`       | (same)                         |
//! | aws-iso-b  | `sc2s.sgov.gov`    | (same)                         |
//! | aws-iso-e  | `cloud.adc-e.uk`   | (same)                         |
//! | aws-iso-f  | `csp.hci.ic.gov`   | (same)                         |
//! | aws-eusc   | `amazonaws.eu`     | (same)                         |
//!
//! A KMS endpoint is `kms.<region>.<suffix>` or `kms-fips.<region>.<suffix>`. Interface VPC
//! endpoints have names of their own, `vpce-<id>[-<zone>].kms[-fips].<region>.vpce.<suffix>`:
//! they are KMS names too (never tunnelled), but only intercepted when `allowed_hosts` lists them
//! exactly, because a glob over endpoint ids is not a bounded set of names. (With private DNS, the
//! usual set-up, clients use the regional name and never see these.)

use crate::glob::HostGlob;

/// The DNS suffixes of the partitions, and of their dual-stack endpoints.
pub const PARTITION_SUFFIXES: &[&str] = &[
    "amazonaws.com",
    "api.aws",
    "amazonaws.com.cn",
    "api.amazonwebservices.com.cn",
    "c2s.ic.gov",
    "sc2s.sgov.gov",
    "cloud.adc-e.uk",
    "csp.hci.ic.gov",
    "amazonaws.eu",
];

/// The first label of a KMS endpoint.
pub const SERVICE_LABELS: &[&str] = &["kms", "kms-fips"];

/// What kind of KMS name a host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KmsName {
    /// `kms[-fips].<region>.<suffix>`: the regional (or FIPS, or dual-stack) endpoint.
    Regional,
    /// `vpce-<id>.kms[-fips].<region>.vpce.<suffix>`: an interface VPC endpoint's own name.
    VpcEndpoint,
}

/// One label of a name shape.
#[derive(Debug, Clone, Copy)]
enum Label {
    Exact(&'static str),
    Service,
    Region,
    VpceId,
}

impl Label {
    fn accepts(self, label: &str) -> bool {
        match self {
            Label::Exact(text) => label.eq_ignore_ascii_case(text),
            Label::Service => SERVICE_LABELS.iter().any(|s| label.eq_ignore_ascii_case(s)),
            Label::Region => is_region(label),
            Label::VpceId => is_vpce_id(label),
        }
    }

    /// A label this accepts, to show in messages.
    fn example(self) -> &'static str {
        match self {
            Label::Exact(text) => text,
            Label::Service => "kms",
            Label::Region => "us-east-1",
            Label::VpceId => "vpce-0123456789abcdef0-abcdefgh",
        }
    }
}

/// Every shape of a KMS name, with what it is.
fn shapes() -> impl Iterator<Item = (KmsName, Vec<Label>)> {
    PARTITION_SUFFIXES.iter().flat_map(|suffix| {
        let suffix: Vec<Label> = suffix.split('.').map(Label::Exact).collect();
        let regional = [Label::Service, Label::Region]
            .into_iter()
            .chain(suffix.iter().copied())
            .collect();
        let vpce = [
            Label::VpceId,
            Label::Service,
            Label::Region,
            Label::Exact("vpce"),
        ]
        .into_iter()
        .chain(suffix.iter().copied())
        .collect();
        [(KmsName::Regional, regional), (KmsName::VpcEndpoint, vpce)]
    })
}

/// The kind of KMS name `host` is (ASCII case ignored, one trailing dot allowed), if it is one.
pub fn kms_name(host: &str) -> Option<KmsName> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.len() > 253 {
        return None;
    }
    let host = host.to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    shapes()
        .find(|(_, shape)| {
            shape.len() == labels.len() && shape.iter().zip(&labels).all(|(s, l)| s.accepts(l))
        })
        .map(|(kind, _)| kind)
}

/// Whether `host` is the name of a KMS endpoint (regional, FIPS, dual-stack or VPC endpoint).
pub fn is_kms_name(host: &str) -> bool {
    kms_name(host).is_some()
}

/// A KMS name that `glob` matches, if it can match any: `check` refuses such a `tunnel_hosts`
/// entry. Exact, because a glob's `*` is one whole label: the glob matches a KMS name exactly when
/// it has as many labels as one of the shapes and each of its literal labels fits there.
pub fn kms_name_matched_by(glob: &HostGlob) -> Option<String> {
    let labels = glob.labels();
    shapes()
        .find(|(_, shape)| {
            shape.len() == labels.len()
                && shape
                    .iter()
                    .zip(labels)
                    .all(|(s, l)| l == "*" || s.accepts(l))
        })
        .map(|(_, shape)| {
            shape
                .iter()
                .zip(labels)
                .map(|(s, l)| if l == "*" { s.example() } else { l.as_str() })
                .collect::<Vec<_>>()
                .join(".")
        })
}

/// The shape of an AWS region name: two to four letters, one or more words, a number of one or
/// two digits (`us-east-1`, `us-gov-west-1`, `us-isob-east-1`, `eusc-de-east-1`).
pub fn is_region(label: &str) -> bool {
    if label.len() > 32 {
        return false;
    }
    let parts: Vec<&str> = label.split('-').collect();
    let [first, words @ .., number] = parts.as_slice() else {
        return false;
    };
    (2..=4).contains(&first.len())
        && first.bytes().all(|b| b.is_ascii_lowercase())
        && !words.is_empty()
        && words
            .iter()
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
        && (1..=2).contains(&number.len())
        && number.bytes().all(|b| b.is_ascii_digit())
}

/// The first label of a VPC endpoint name: `vpce-` and an id (with a zone, for zonal names).
fn is_vpce_id(label: &str) -> bool {
    let lower = label.to_ascii_lowercase();
    lower.len() <= 63
        && lower.strip_prefix("vpce-").is_some_and(|id| {
            !id.is_empty()
                && !id.ends_with('-')
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn recognises_every_partition_fips_and_dual_stack() {
        for name in [
            "kms.us-east-1.amazonaws.com",
            "KMS.US-EAST-1.AMAZONAWS.COM.",
            "kms-fips.us-gov-west-1.amazonaws.com",
            "kms.cn-north-1.amazonaws.com.cn",
            "kms.cn-northwest-1.api.amazonwebservices.com.cn",
            "kms.eu-west-1.api.aws",
            "kms-fips.us-east-2.api.aws",
            "kms.us-iso-east-1.c2s.ic.gov",
            "kms-fips.us-isob-east-1.sc2s.sgov.gov",
            "kms.eu-isoe-west-1.cloud.adc-e.uk",
            "kms.us-isof-south-1.csp.hci.ic.gov",
            "kms.eusc-de-east-1.amazonaws.eu",
            // A region that does not exist yet still has the shape of one.
            "kms.xx-newplace-9.amazonaws.com",
        ] {
            assert_eq!(kms_name(name), Some(KmsName::Regional), "{name}");
        }
        for name in [
            "vpce-0a1b2c3d4e5f67890-abcdefgh.kms.us-east-1.vpce.amazonaws.com",
            "vpce-0a1b2c3d4e5f67890-abcdefgh-us-east-1a.kms-fips.us-east-1.vpce.amazonaws.com",
            "vpce-0a1b2c3d.kms.cn-north-1.vpce.amazonaws.com.cn",
        ] {
            assert_eq!(kms_name(name), Some(KmsName::VpcEndpoint), "{name}");
        }
        for name in [
            "sts.us-east-1.amazonaws.com",
            "kms.amazonaws.com",
            "kms.us-east-1.amazonaws.com.evil.com",
            "x.kms.us-east-1.amazonaws.com",
            "kms.us-east.amazonaws.com",
            "kms.useast1.amazonaws.com",
            "kms.u-east-1.amazonaws.com",
            "kms.us-east-123.amazonaws.com",
            "kms.us--1.amazonaws.com",
            "kms.US-EAST-1-.amazonaws.com",
            "kms.us-east-1.amazonaws.org",
            "kmsfips.us-east-1.amazonaws.com",
            "vpce-.kms.us-east-1.vpce.amazonaws.com",
            "kms.us-east-1.vpce.amazonaws.com",
            "localhost",
            "169.254.169.254",
            "",
        ] {
            assert_eq!(kms_name(name), None, "{name}");
        }
    }

    #[test]
    fn finds_the_kms_names_a_glob_can_match() {
        let can = |g: &str| kms_name_matched_by(&HostGlob::new(g).unwrap());
        assert_eq!(
            can("*.us-west-2.amazonaws.com").as_deref(),
            Some("kms.us-west-2.amazonaws.com")
        );
        assert_eq!(
            can("*.*.amazonaws.com").as_deref(),
            Some("kms.us-east-1.amazonaws.com")
        );
        assert_eq!(
            can("kms-fips.*.api.aws").as_deref(),
            Some("kms-fips.us-east-1.api.aws")
        );
        assert!(can("*.*.*.*").is_some());
        assert!(can("*.kms.us-east-1.vpce.amazonaws.com").is_some());
        assert!(can("*.*.c2s.ic.gov").is_some());
        for safe in [
            "sts.*.amazonaws.com",
            "sts.amazonaws.com",
            "*.amazonaws.com",
            "*.s3.us-east-1.amazonaws.com",
            "kms.local.amazonaws.com",
            "secretsmanager.*.amazonaws.com",
            "*.*.example.com",
            "localhost",
        ] {
            assert_eq!(can(safe), None, "{safe}");
        }
    }

    /// A glob near the KMS names: a real KMS name's labels, each kept, turned into `*`, or
    /// replaced by another label; sometimes with a label added or dropped.
    fn glob_near_kms() -> impl Strategy<Value = Vec<String>> {
        let name = (
            proptest::sample::select(PARTITION_SUFFIXES),
            proptest::bool::ANY,
            proptest::sample::select(SERVICE_LABELS),
        )
            .prop_map(|(suffix, vpce, service)| {
                let mut labels = Vec::new();
                if vpce {
                    labels.push("vpce-0a1b2c".to_owned());
                }
                labels.push(service.to_owned());
                labels.push("eu-west-3".to_owned());
                if vpce {
                    labels.push("vpce".to_owned());
                }
                labels.extend(suffix.split('.').map(str::to_owned));
                labels
            });
        let edit = prop_oneof![
            4 => Just(None),
            3 => Just(Some("*".to_owned())),
            1 => "[a-z][a-z0-9-]{0,6}[a-z0-9]".prop_map(Some),
            1 => Just(Some("us-gov-east-1".to_owned())),
        ];
        (name, proptest::collection::vec(edit, 12), 0..3u8).prop_map(|(mut labels, edits, grow)| {
            for (label, edit) in labels.iter_mut().zip(edits) {
                if let Some(new) = edit {
                    *label = new;
                }
            }
            match grow {
                1 => labels.insert(0, "*".to_owned()),
                2 => {
                    labels.remove(0);
                }
                _ => {}
            }
            labels
        })
    }

    /// Fills a glob's stars with labels, as a client would pick a name it matches.
    fn filled(glob: &[String], fills: &[String]) -> String {
        glob.iter()
            .zip(fills.iter().cycle())
            .map(|(l, f)| if l == "*" { f.as_str() } else { l.as_str() })
            .collect::<Vec<_>>()
            .join(".")
    }

    proptest! {
        /// The attacker's view: whatever a glob that `check` lets through matches is never a KMS
        /// name; and the example `check` gives for a refused glob is one the glob matches.
        #[test]
        fn a_glob_check_lets_through_matches_no_kms_name(
            labels in glob_near_kms().prop_filter("non-empty", |l| !l.is_empty()),
            fills in proptest::collection::vec(
                prop_oneof![
                    Just("kms".to_owned()),
                    Just("kms-fips".to_owned()),
                    Just("us-east-1".to_owned()),
                    Just("eu-isoe-west-1".to_owned()),
                    Just("vpce-0a1b".to_owned()),
                    Just("vpce".to_owned()),
                    Just("api".to_owned()),
                    "[a-z0-9]{1,6}",
                ],
                1..5,
            ),
        ) {
            let glob = HostGlob::new(&labels.join(".")).unwrap();
            let name = filled(&labels, &fills);
            match kms_name_matched_by(&glob) {
                None => prop_assert!(
                    !(glob.matches(&name) && is_kms_name(&name)),
                    "{} passes check but matches the KMS name {name}", glob.as_str()
                ),
                Some(example) => {
                    prop_assert!(glob.matches(&example), "{example} vs {}", glob.as_str());
                    prop_assert!(is_kms_name(&example), "{example}");
                }
            }
        }
    }
}
