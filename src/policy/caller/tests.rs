use super::*;
use proptest::prelude::*;

fn glob(text: &str) -> CallerPattern {
    CallerPattern::glob(text).unwrap()
}

fn matches(pattern: &str, id: &str) -> bool {
    glob(pattern).matches(&Caller::new(id))
}

#[test]
fn star_stays_inside_one_segment() {
    let p = "spiffe://example.org/ns/*/sa/*";
    assert!(matches(p, "spiffe://example.org/ns/payments/sa/api"));
    assert!(!matches(p, "spiffe://example.org/ns/payments/x/sa/api"));
    assert!(!matches(p, "spiffe://example.org/ns/payments/sa/api/x"));
    assert!(!matches(p, "spiffe://example.org/ns/payments/sa"));
    // `a*` is a prefix inside the segment: namespace `ab` matches it, as written; `a/*` names
    // namespace `a` alone.
    assert!(matches(
        "spiffe://example.org/ns/a*",
        "spiffe://example.org/ns/ab"
    ));
    assert!(!matches(
        "spiffe://example.org/ns/a*",
        "spiffe://example.org/ns/a/b"
    ));
    assert!(!matches(
        "spiffe://example.org/ns/a/*",
        "spiffe://example.org/ns/ab/x"
    ));
    assert!(matches(
        "spiffe://example.org/ns/a/*",
        "spiffe://example.org/ns/a/x"
    ));
    assert!(matches(
        "spiffe://example.org/ns/web-*",
        "spiffe://example.org/ns/web-"
    ));
    assert!(matches("spiffe://example.org/**", "spiffe://example.org/a"));
    assert!(matches(
        "spiffe://example.org/**",
        "spiffe://example.org/a/b/c"
    ));
    assert!(!matches(
        "spiffe://example.org/a/**",
        "spiffe://example.org/a"
    ));
    assert!(!matches(
        "spiffe://example.org/**",
        "spiffe://example.org.evil/a"
    ));
    assert!(!matches("spiffe://example.org/**", "spiffe://other.org/a"));
}

#[test]
fn malformed_identities_match_nothing() {
    let p = "spiffe://example.org/**";
    for id in [
        "spiffe://example.org/ns/a/../b",
        "spiffe://example.org/ns/./b",
        "spiffe://example.org/ns//b",
        "spiffe://example.org/ns/b/",
        "spiffe://example.org/ns/a%2Fb",
        "spiffe://example.org/ns/a?team=admin",
        "spiffe://example.org/ns/a#x",
        "spiffe://Example.org/ns/a",
        "SPIFFE://example.org/ns/a",
        "spiffe://user@example.org/ns/a",
        "spiffe://example.org:443/ns/a",
        "spiffe://example.org",
        "spiffe://example.org/",
        "spiffe://example.org/ns/\u{e9}",
        "spiffe://example.org/ns/a b",
    ] {
        assert!(!Caller::new(id).is_well_formed(), "{id}");
        assert!(!matches(p, id), "{id}");
    }
    let long = format!("spiffe://example.org/{}", "a".repeat(MAX_IDENTITY_BYTES));
    assert!(!matches(p, &long));
    // A DNS name with a wildcard or an odd character is no identity either.
    for id in ["*.payments.svc", "a..b", "a_b.svc", "", ".svc", "svc."] {
        assert!(!matches("**", id), "{id}");
        assert!(!matches("*.svc", id), "{id}");
    }
}

#[test]
fn dns_names_compare_ignoring_case_label_by_label() {
    assert!(matches("*.payments.svc", "api.payments.svc"));
    assert!(matches("*.payments.svc", "API.Payments.SVC"));
    assert!(matches("*.PAYMENTS.svc", "api.payments.svc"));
    assert!(!matches("*.payments.svc", "a.b.payments.svc"));
    assert!(!matches("*.payments.svc", "payments.svc"));
    assert!(matches("**.payments.svc", "a.b.payments.svc"));
    assert!(!matches("**.payments.svc", "payments.svc"));
    // The two kinds never match each other.
    assert!(!matches("**", "spiffe://example.org/a"));
    assert!(!matches("spiffe://example.org/**", "example.org"));
    let t =
        CallerPattern::template("{sa}.{ns}.serviceaccount.identity.linkerd.cluster.local").unwrap();
    assert_eq!(
        t.captures(&Caller::new(
            "Web.Payments.serviceaccount.identity.linkerd.cluster.local"
        )),
        Some(vec!["web".to_owned(), "payments".to_owned()])
    );
}

#[test]
fn templates_capture_whole_segments() {
    let t = CallerPattern::template("spiffe://example.org/ns/{team}/sa/*").unwrap();
    assert_eq!(t.names(), ["team"]);
    assert_eq!(
        t.captures(&Caller::new("spiffe://example.org/ns/payments/sa/api")),
        Some(vec!["payments".to_owned()])
    );
    assert_eq!(
        t.captures(&Caller::new("spiffe://example.org/ns/payments/x/sa/api")),
        None
    );
    let two = CallerPattern::template("spiffe://example.org/ns/{ns}/sa/{sa}/**").unwrap();
    assert_eq!(
        two.captures(&Caller::new("spiffe://example.org/ns/a/sa/b/c/d")),
        Some(vec!["a".to_owned(), "b".to_owned()])
    );
}

#[test]
fn bad_patterns_are_refused_with_a_reason() {
    for (text, says) in [
        ("", "empty"),
        ("spiffe://example.org", "needs a path"),
        ("spiffe://Example.org/a", "lower case"),
        ("spiffe://*.org/a", "lower case"),
        ("spiffe://example.org/", "empty segment"),
        ("spiffe://example.org/a//b", "empty segment"),
        ("spiffe://example.org/a/../b", "`.` or `..`"),
        ("spiffe://example.org/**/a", "may only be the last"),
        ("spiffe://example.org/a**", "write one `*`"),
        ("spiffe://example.org/a%2Fb", "cannot appear"),
        ("spiffe://example.org/a?x", "cannot appear"),
        ("SPIFFE://example.org/a", "lower case"),
        ("spiffe:/example.org/a", "lower case"),
        ("https://example.org/a", "SPIFFE ID"),
        ("a.**", "may only be the first label"),
        ("a_b.svc", "cannot appear"),
        (&format!("{}.svc", "a".repeat(64)), "at most 63 bytes"),
        (
            &format!("spiffe://{}/a", "a".repeat(256)),
            "at most 255 bytes",
        ),
        ("spiffe://example.org/ns/{team}", "only in a caller-value"),
    ] {
        let e = CallerPattern::glob(text).unwrap_err();
        assert!(e.contains(says), "{text:?}: {e}");
    }
    for (text, says) in [
        ("spiffe://example.org/ns/{team}/sa/{team}", "appears twice"),
        ("spiffe://example.org/ns/{te/am}", "may not span segments"),
        (
            "spiffe://example.org/ns/{team/sa/x",
            "may not span segments",
        ),
        ("spiffe://example.org/ns/{team", "without its `}`"),
        ("spiffe://example.org/ns/team}", "without its `{`"),
        ("spiffe://example.org/ns/x-{team}", "whole segment"),
        ("spiffe://example.org/ns/{}", "not a name"),
        ("spiffe://example.org/ns/{{team}}", "do not nest"),
        ("spiffe://example.org/ns/{1x}", "not a name"),
    ] {
        let e = CallerPattern::template(text).unwrap_err();
        assert!(e.contains(says), "{text:?}: {e}");
    }
}

#[test]
fn value_templates_are_checked_against_the_names() {
    let names = vec!["team".to_owned()];
    assert!(ValueTemplate::new("{team}-*", &names).is_ok());
    for (text, says) in [
        ("", "may not be empty"),
        (
            "{owner}",
            "is not a name of `caller`; the caller template names {team}",
        ),
        ("{team", "without its `}`"),
        ("team}", "without its `{`"),
        ("{team}**", "one `*`"),
        ("{}", "not a name"),
    ] {
        let e = ValueTemplate::new(text, &names).unwrap_err();
        assert!(e.contains(says), "{text:?}: {e}");
    }
    let e = ValueTemplate::new("{team}", &[]).unwrap_err();
    assert!(e.contains("names none"), "{e}");
}

#[test]
fn values_compare_exactly_and_star_is_one_or_more() {
    let names = vec!["team".to_owned()];
    let pay = vec!["pay".to_owned()];
    let exact = ValueTemplate::new("{team}", &names).unwrap();
    assert!(exact.allows(&pay, "pay"));
    for other in ["payments", "pa", "Pay", "PAY", "pay ", " pay", "", "pay\0"] {
        assert!(!exact.allows(&pay, other), "{other:?}");
    }
    let a = vec!["a".to_owned()];
    assert!(!exact.allows(&a, "ab"));
    let starred = ValueTemplate::new("{team}-*", &names).unwrap();
    assert!(starred.allows(&pay, "pay-x"));
    assert!(starred.allows(&pay, "pay-x-y"));
    assert!(!starred.allows(&pay, "pay-"));
    assert!(!starred.allows(&pay, "payments-x"));
    assert!(!starred.allows(&pay, "pay"));
    assert_eq!(starred.render(&pay), "pay-*");
    let middle = ValueTemplate::new("*-{team}-*", &names).unwrap();
    assert!(middle.allows(&pay, "eu-pay-1"));
    assert!(!middle.allows(&pay, "-pay-1"));
    assert!(!middle.allows(&pay, "eu-pay-"));
    assert!(middle.allows(&pay, "\u{e9}-pay-\u{e9}"));
}

// ------------------------------------------------------------------------------ properties

/// A segment of a generated identity: mostly well-formed, sometimes not.
fn id_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-cA-C0-9._-]{1,4}",
        1 => Just(".".to_owned()),
        1 => Just("..".to_owned()),
        1 => Just(String::new()),
        1 => "[a-c]{0,2}(%2F|%2f|\\?|#|:|@|\u{e9}| )[a-c]{0,2}",
    ]
}

fn trust_domain() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "example.org".to_owned(),
        "Example.org".to_owned(),
        "example.org.evil".to_owned(),
        "other.org".to_owned(),
    ])
}

fn spiffe_id() -> impl Strategy<Value = String> {
    (trust_domain(), prop::collection::vec(id_segment(), 1..6))
        .prop_map(|(td, segments)| format!("spiffe://{td}/{}", segments.join("/")))
}

/// A glob segment: literal text and `*`s.
fn glob_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-cA-C0-9._-]{1,3}",
        2 => Just("*".to_owned()),
        2 => "[a-cA-C]{0,2}\\*[a-cA-C0-9]{0,2}",
    ]
    .prop_filter("not . or ..", |s| {
        s != "." && s != ".." && !s.contains("**")
    })
}

fn spiffe_glob() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["example.org", "other.org"]),
        prop::collection::vec(glob_segment(), 1..5),
        any::<bool>(),
    )
        .prop_map(|(td, segments, rest)| {
            let mut path = segments.join("/");
            if rest {
                path.push_str("/**");
            }
            format!("spiffe://{td}/{path}")
        })
}

/// The regex that says what a glob means, written independently of the matcher.
fn oracle(pattern: &str) -> regex::Regex {
    let (td, path) = pattern["spiffe://".len()..].split_once('/').unwrap();
    let seg = "[A-Za-z0-9._-]+";
    let mut re = format!("^spiffe://{}", regex::escape(td));
    for s in path.split('/') {
        if s == "**" {
            re.push_str(&format!("(/{seg})+"));
        } else {
            let parts: Vec<String> = s.split('*').map(regex::escape).collect();
            re.push('/');
            re.push_str(&parts.join("[A-Za-z0-9._-]*"));
        }
    }
    re.push('$');
    regex::Regex::new(&re).unwrap()
}

fn well_formed_oracle(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return false;
    };
    let Some((td, path)) = rest.split_once('/') else {
        return false;
    };
    !td.is_empty()
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && path.split('/').all(|s| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

proptest! {
    /// A glob matches exactly the well-formed identities its regex reading denotes: `*` never
    /// crosses a `/`, the trust domain is compared exactly (case too), `**` is whole segments,
    /// and no `.`, `..`, empty segment, percent-encoding or other character lets an identity in.
    #[test]
    fn spiffe_globs_match_exactly_what_they_denote(pattern in spiffe_glob(), id in spiffe_id()) {
        let p = CallerPattern::glob(&pattern).unwrap();
        let got = p.matches(&Caller::new(&id));
        let want = well_formed_oracle(&id) && oracle(&pattern).is_match(&id);
        prop_assert_eq!(got, want, "{} vs {}", pattern, id);
        if got {
            // No match crosses segments: without `**`, as many segments on both sides.
            if !pattern.ends_with("/**") {
                prop_assert_eq!(pattern.matches('/').count(), id.matches('/').count());
            }
        }
    }

    /// An identity built from a glob by filling each `*` with segment text matches it; filling a
    /// `*` with text holding a `/` never does.
    #[test]
    fn filled_globs_match_and_slashes_do_not(
        segments in prop::collection::vec(glob_segment(), 0..4),
        at in 0usize..4,
        fill in "[a-zA-Z0-9._-]{0,3}",
        cross in "[a-z]{0,2}/[a-z]{1,2}",
    ) {
        let mut segments = segments;
        segments.insert(at.min(segments.len()), "x*".to_owned());
        let pattern = format!("spiffe://example.org/{}", segments.join("/"));
        let p = CallerPattern::glob(&pattern).unwrap();
        let filled = pattern.replace('*', &fill);
        if well_formed_oracle(&filled) {
            prop_assert!(p.matches(&Caller::new(&filled)), "{} vs {}", pattern, filled);
        }
        let crossed = pattern.replace('*', &cross);
        prop_assert!(!p.matches(&Caller::new(&crossed)), "{} vs {}", pattern, crossed);
    }

    /// A template captures the segments in its `{name}` places, and the value template allows
    /// exactly the values its regex reading denotes over those captures: no capture is a
    /// prefix of a longer value, and `*` is one or more characters.
    #[test]
    fn value_templates_allow_exactly_what_they_denote(
        captures in prop::collection::vec("[a-zA-Z0-9._-]{1,4}", 1..3),
        pieces in prop::collection::vec(prop_oneof![
            Just("*".to_owned()),
            Just("{0}".to_owned()),
            Just("{1}".to_owned()),
            "[a-z\u{e9}-]{1,3}",
        ], 1..5),
        value in "[a-zA-Z0-9._\u{e9}-]{0,10}",
        use_value_from_template in any::<bool>(),
        fill in "[a-z\u{e9}]{1,3}",
    ) {
        let names: Vec<String> = (0..captures.len()).map(|i| format!("n{i}")).collect();
        let text: String = pieces
            .iter()
            .map(|p| match p.as_str() {
                "{0}" => "{n0}".to_owned(),
                "{1}" if captures.len() > 1 => "{n1}".to_owned(),
                "{1}" => "x".to_owned(),
                other => other.to_owned(),
            })
            .collect();
        let mut text = text;
        while text.contains("**") {
            text = text.replace("**", "*");
        }
        let template = ValueTemplate::new(&text, &names).unwrap();
        let rendered = template.render(&captures);
        let re = format!(
            "(?s)^{}$",
            rendered.split('*').map(regex::escape).collect::<Vec<_>>().join(".+")
        );
        let re = regex::Regex::new(&re).unwrap();
        let value = if use_value_from_template { rendered.replace('*', &fill) } else { value };
        prop_assert_eq!(template.allows(&captures, &value), re.is_match(&value), "{} / {} vs {:?}", text, rendered, value);
    }

    /// A template with `{team}` in a segment hands each caller exactly its own segment.
    #[test]
    fn captures_are_the_callers_own_segment(
        team in "[a-zA-Z0-9._-]{1,6}",
        sa in "[a-zA-Z0-9_-]{1,6}",
        other in "[a-zA-Z0-9._-]{1,6}",
    ) {
        prop_assume!(team != "." && team != "..");
        let t = CallerPattern::template("spiffe://example.org/ns/{team}/sa/*").unwrap();
        let id = format!("spiffe://example.org/ns/{team}/sa/{sa}");
        let captured = t.captures(&Caller::new(&id)).unwrap();
        prop_assert_eq!(&captured, &vec![team.clone()]);
        let v = ValueTemplate::new("{team}", t.names()).unwrap();
        prop_assert!(v.allows(&captured, &team));
        prop_assert_eq!(v.allows(&captured, &other), other == team);
        let longer = format!("{team}{other}");
        let before = format!("{other}{team}");
        prop_assert!(!v.allows(&captured, &longer));
        prop_assert!(!v.allows(&captured, &before));
    }
}

/// The policy and the listener read identities with one check: a DNS name with a label over 63
/// bytes, which the listener refuses, is no identity to the policy either.
#[test]
fn a_dns_label_over_63_bytes_is_no_identity() {
    let label = "a".repeat(64);
    let name = format!("{label}.payments.svc");
    assert!(crate::identity::tests::listener_caller(&name).is_err());
    assert!(!Caller::new(&name).is_well_formed());
    assert!(!matches("**.payments.svc", &name));
    let name = format!("{}.payments.svc", &label[1..]);
    assert!(crate::identity::tests::listener_caller(&name).is_ok());
    assert!(matches("**.payments.svc", &name));
}

proptest! {
    /// Whatever the text: a certificate naming it gives the listener a caller exactly when the
    /// policy takes it as a well-formed identity, and the caller the listener gives (a DNS name
    /// in lower case) is well formed too.
    #[test]
    fn the_policy_takes_exactly_the_callers_the_listener_takes(
        text in crate::identity::tests::identity_text(),
    ) {
        let policy = Caller::new(&text).is_well_formed();
        match crate::identity::tests::listener_caller(&text) {
            Ok(Some(caller)) => {
                prop_assert!(policy, "the listener takes {:?}, the policy does not", text);
                prop_assert!(Caller::new(&caller).is_well_formed(), "{:?}", caller);
                let expected = if text.contains(':') { text.clone() } else { text.to_ascii_lowercase() };
                prop_assert_eq!(caller.as_ref(), expected.as_str());
            }
            Ok(None) => prop_assert!(false, "a certificate with a SAN names a caller or is refused"),
            Err(e) => prop_assert!(!policy, "the policy takes {:?}, the listener refuses it: {}", text, e),
        }
    }
}
