//! The pure request pipeline (contract section 4) on arbitrary requests: classification, head
//! checks, the body limit, the strict parse and every rule, as `kms_tag_guard::cases::decide` runs
//! them, under three policies. It must never panic, and it checks what must always hold:
//!
//! - only an exact `X-Amz-Target: TrentService.<Op>` names an operation;
//! - whenever the strict parser accepts a body, serde_json reads the same body, with no repeated
//!   member in any object, and agrees on `KeyId`, `Tags` and `TagKeys`;
//! - an allowed tag-bearing request was read by the strict parser;
//! - under a policy in dry-run, only an unreadable request is denied.
//!
//! Input: header lines, an empty line, then the body. An optional first line `METHOD URI` (no `:`
//! before its first space) sets the request line, else `POST /`. Header lines are `name: value`;
//! lines that are not a valid header are skipped. Without an empty line the body is empty.

#![no_main]

use std::sync::LazyLock;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

use kms_tag_guard::config::ConfigSource;
use kms_tag_guard::decide::{decision, Head, Rules};
use kms_tag_guard::kms::classify::classify;
use kms_tag_guard::kms::operation::TARGET_PREFIX;
use kms_tag_guard::kms::request::parse_tag_request;
use kms_tag_guard::kms::{Route, TagChange, TagOperation};
use kms_tag_guard::policy::{Decision, REQUEST_RULE};
use kms_tag_guard::Config;

/// Every rule type and option, enforced; a small body limit so the limit is reachable.
const ALL_RULES: &str = r#"
[limits]
max_body_bytes = 1024

[policy]
mode = "enforce"
max_tags = 4
unknown_operations = "reject"

[[policy.rule]]
id = "prod-prefix"
type = "required-prefix"
prefixes = ["team:", "app:"]
exempt_keys = ["Name"]
key_ids = ["arn:aws:kms:*:111122223333:key/*", "mrk-*"]

[[policy.rule]]
id = "reserved"
type = "forbidden-key"
keys = ["Kind", "Sensitivity", "Project"]
patterns = ["^sec[-:]", "^iam[-:]"]
exempt_principals = ["AKIAIOSFODNN7EXAMPLE"]

[[policy.rule]]
id = "no-new-legacy"
type = "forbidden-key"
patterns = ["^legacy[-:_]"]
on = ["set"]

[[policy.rule]]
id = "keep-compliance"
type = "forbidden-key"
keys = ["app:compliance"]
on = ["remove"]

[[policy.rule]]
id = "env-values"
type = "value-pattern"
key_pattern = "^app:env(ironment)?$"
allowed = ["dev", "staging", "prod"]

[[policy.rule]]
id = "team-names"
type = "value-pattern"
key_pattern = "^team:"
pattern = "^[a-z][a-z0-9-]{1,38}$"

[[policy.rule]]
id = "ticket-format"
type = "value-pattern"
key = "app:ticket"
pattern = "^[A-Z][A-Z0-9]+-[0-9]+$"
mode = "dry-run"

[[policy.rule]]
id = "owner-and-env"
type = "required-key"
keys = ["team:owner", "app:env"]
"#;

/// Every rule type in dry-run, any host (a fixed endpoint), unknown operations forwarded.
const DRY_RUN: &str = r#"
[upstream]
endpoint = "http://127.0.0.1:4566"

[policy]
mode = "dry-run"
max_tags = 2

[[policy.rule]]
id = "prefix"
type = "required-prefix"
prefixes = ["team:"]

[[policy.rule]]
id = "abac"
type = "forbidden-key"
keys = ["Project", "Kind"]
patterns = ["^aws:"]

[[policy.rule]]
id = "cost"
type = "value-pattern"
key = "cost:center"
pattern = "^[0-9]{4}$"

[[policy.rule]]
id = "owner"
type = "required-key"
keys = ["team:owner"]
"#;

static CONFIGS: LazyLock<[Config; 3]> = LazyLock::new(|| {
    [
        Config::built_in().expect("the built-in config"),
        Config::parse(ALL_RULES, ConfigSource::BuiltIn).expect("ALL_RULES"),
        Config::parse(DRY_RUN, ConfigSource::BuiltIn).expect("DRY_RUN"),
    ]
});

struct Request<'a> {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: &'a [u8],
}

fn split(data: &[u8]) -> Request<'_> {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => match data.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(i) => (&data[..i], &data[i + 4..]),
            None => (data, &[][..]),
        },
    };
    let mut request = Request {
        method: Method::POST,
        uri: Uri::from_static("/"),
        headers: HeaderMap::new(),
        body,
    };
    for (i, line) in head.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let space = line.iter().position(|&b| b == b' ');
        let colon = line.iter().position(|&b| b == b':');
        if i == 0 && space.is_some_and(|s| colon.is_none_or(|c| s < c)) {
            let mut parts = line.split(|&b| b == b' ');
            let method = parts.next().and_then(|m| Method::from_bytes(m).ok());
            let uri = parts.next().and_then(|u| Uri::try_from(u).ok());
            if let (Some(method), Some(uri)) = (method, uri) {
                request.method = method;
                request.uri = uri;
            }
            continue;
        }
        let Some(colon) = colon else { continue };
        let value = trim(&line[colon + 1..]);
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            request.headers.append(name, value);
        }
    }
    request
}

/// Strips the optional whitespace HTTP allows around a header value.
fn trim(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// The library's one decision (`kms_tag_guard::decide::decision`) on the input's request,
/// with the tag operation its head names.
fn decide(config: &Config, request: &Request) -> (Option<TagOperation>, Decision) {
    let operation = match classify(&request.method, &request.uri, &request.headers) {
        Ok(Route::Judge(op)) => Some(op),
        _ => None,
    };
    let head = Head {
        method: &request.method,
        uri: &request.uri,
        headers: &request.headers,
        tunnel_host: None,
    };
    let decision = decision(&head, request.body, &Rules::of(config));
    (operation, decision)
}

/// Whether any object in `body` repeats a member name (serde_json's `Value` keeps only one).
fn has_repeated_member(body: &[u8]) -> bool {
    use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    struct Repeats;
    impl<'de> Visitor<'de> for Repeats {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_str<E>(self, _: &str) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_unit<E>(self) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
            let mut repeats = false;
            while let Some(r) = seq.next_element_seed(RepeatsSeed)? {
                repeats |= r;
            }
            Ok(repeats)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut names = std::collections::HashSet::new();
            let mut repeats = false;
            while let Some(name) = map.next_key::<String>()? {
                repeats |= !names.insert(name);
                repeats |= map.next_value_seed(RepeatsSeed)?;
            }
            Ok(repeats)
        }
    }
    struct RepeatsSeed;
    impl<'de> serde::de::DeserializeSeed<'de> for RepeatsSeed {
        type Value = bool;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_any(Repeats)
        }
    }
    let mut d = serde_json::Deserializer::from_slice(body);
    d.deserialize_any(Repeats)
        .expect("serde_json reads what the strict parser read")
}

/// The change serde_json reads from a body the strict parser accepted.
fn serde_reading(op: TagOperation, value: &Value) -> TagChange {
    let object = value.as_object().expect("an object");
    let text = |v: &Value| v.as_str().expect("a string").to_owned();
    let key_id = op
        .has_key_id()
        .then(|| text(object.get("KeyId").expect("KeyId")));
    let set = match (op, object.get("Tags")) {
        (TagOperation::UntagResource, _) | (_, None) => Vec::new(),
        (_, Some(tags)) => tags
            .as_array()
            .expect("Tags is an array")
            .iter()
            .map(|tag| {
                let tag = tag.as_object().expect("a tag object");
                assert_eq!(tag.len(), 2, "a tag has exactly TagKey and TagValue");
                kms_tag_guard::kms::Tag {
                    key: text(&tag["TagKey"]),
                    value: text(&tag["TagValue"]),
                }
            })
            .collect(),
    };
    let remove = match (op, object.get("TagKeys")) {
        (TagOperation::UntagResource, Some(keys)) => keys
            .as_array()
            .expect("TagKeys is an array")
            .iter()
            .map(text)
            .collect(),
        _ => Vec::new(),
    };
    TagChange {
        operation: op,
        key_id,
        set,
        remove,
    }
}

/// Whenever the strict parser accepts `body` as `op`, serde_json reads the same change.
fn check_parser_agrees(op: TagOperation, body: &[u8]) -> bool {
    let Ok(change) = parse_tag_request(op, body) else {
        return false;
    };
    let json: &[u8] = if body.is_empty() { b"{}" } else { body };
    let value: Value = serde_json::from_slice(json).expect("serde_json reads an accepted body");
    assert!(
        !has_repeated_member(json),
        "an accepted body repeats a member"
    );
    assert_eq!(
        serde_reading(op, &value),
        change,
        "serde_json reads another change"
    );
    let members = value.as_object().expect("an object").len();
    match op {
        TagOperation::TagResource | TagOperation::UntagResource => assert_eq!(members, 2),
        _ => {}
    }
    true
}

fuzz_target!(|data: &[u8]| {
    let request = split(data);

    let target = request
        .headers
        .get("x-amz-target")
        .map(HeaderValue::as_bytes);
    if let Ok(Route::Judge(op)) = classify(&request.method, &request.uri, &request.headers) {
        let exact = format!("{TARGET_PREFIX}{}", op.name());
        assert_eq!(
            target,
            Some(exact.as_bytes()),
            "only the exact target names {op}"
        );
    }

    let mut read = [false; 4];
    for (i, op) in TagOperation::ALL.into_iter().enumerate() {
        read[i] = check_parser_agrees(op, request.body);
    }

    for config in CONFIGS.iter() {
        let (operation, decision) = decide(config, &request);
        if let (Some(op), true) = (operation, decision.allowed()) {
            let i = TagOperation::ALL.iter().position(|o| *o == op).unwrap();
            assert!(
                read[i],
                "an allowed {op} whose body the strict parser refuses"
            );
        }
        if config.policy.enforces_no_rule() {
            assert!(
                decision.violations.iter().all(|v| &*v.rule == REQUEST_RULE),
                "a dry-run policy enforced {:?}",
                decision.violations
            );
        }
        if !decision.allowed() {
            let _ = decision.denial_message();
        }
    }
});
