//! The `pipeline` fuzz target's input format, configurations and checks, in one place for the
//! two programs that run them: `fuzz/fuzz_targets/pipeline.rs` (libFuzzer) and the seed replay in
//! `tests/properties.rs` (`cargo test`). Both include this file with `#[path]`; it is not part
//! of `mod common`, so it needs nothing but the library, `http`, `serde` and `serde_json`.
//!
//! The checks, on any input:
//!
//! - only an exact `X-Amz-Target: TrentService.<Op>` names an operation;
//! - whenever the strict parser accepts a body, serde_json reads the same body, with no repeated
//!   member in any object, and agrees on `KeyId`, `Tags` and `TagKeys` (and, for the alias
//!   operations, on `AliasName` and `TargetKeyId`);
//! - an allowed tag-bearing request was read by the strict parser;
//! - under a policy in dry-run, only an unreadable request is denied.
//!
//! Input: header lines, an empty line, then the body. An optional first line `METHOD URI` (no `:`
//! before its first space) sets the request line, else `POST /`. Header lines are `name: value`;
//! lines that are not a valid header are skipped. Without an empty line the body is empty.

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};
use serde_json::Value;

use kms_tag_guard::config::ConfigSource;
use kms_tag_guard::decide::{decision, Head, Rules};
use kms_tag_guard::kms::classify::classify;
use kms_tag_guard::kms::operation::TARGET_PREFIX;
use kms_tag_guard::kms::request::parse_tag_request;
use kms_tag_guard::kms::{Route, TagChange, TagOperation};
use kms_tag_guard::policy::REQUEST_RULE;
use kms_tag_guard::Config;

/// The test policy (`tests/fixtures/policy.toml`).
pub const TEST_POLICY: &str = include_str!("../fixtures/policy.toml");

/// Every rule type and option, enforced (`tests/fixtures/all-rules.toml`).
pub const ALL_RULES: &str = include_str!("../fixtures/all-rules.toml");

/// `policy` (a `[policy]` section and its rules) with `mode = "dry-run"`.
pub fn dry_run(policy: &str) -> String {
    assert!(
        policy.contains("[policy]\n"),
        "no [policy] section in {policy}"
    );
    policy.replace("[policy]\n", "[policy]\nmode = \"dry-run\"\n")
}

/// The three configurations the checks run under: the built-in one; [`ALL_RULES`]; and the
/// test policy in dry-run, with a fixed endpoint (so any host is forwarded).
pub fn configs() -> [Config; 3] {
    let dry_run = format!(
        "[upstream]\nendpoint = \"http://127.0.0.1:4566\"\n\n{}",
        dry_run(TEST_POLICY)
    );
    [
        Config::built_in().expect("the built-in config"),
        Config::parse(ALL_RULES, ConfigSource::BuiltIn).expect("tests/fixtures/all-rules.toml"),
        Config::parse(&dry_run, ConfigSource::BuiltIn).expect("the dry-run test policy"),
    ]
}

/// Reads an input in the format above: the request line, the headers and the body.
pub fn read_fuzz_input(data: &[u8]) -> (Method, Uri, HeaderMap, &[u8]) {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => match data.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(i) => (&data[..i], &data[i + 4..]),
            None => (data, &[][..]),
        },
    };
    let (mut method, mut uri, mut headers) =
        (Method::POST, Uri::from_static("/"), HeaderMap::new());
    for (i, line) in head.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let space = line.iter().position(|&b| b == b' ');
        let colon = line.iter().position(|&b| b == b':');
        if i == 0 && space.is_some_and(|s| colon.is_none_or(|c| s < c)) {
            let mut parts = line.split(|&b| b == b' ');
            let m = parts.next().and_then(|m| Method::from_bytes(m).ok());
            let u = parts.next().and_then(|u| Uri::try_from(u).ok());
            if let (Some(m), Some(u)) = (m, u) {
                (method, uri) = (m, u);
            }
            continue;
        }
        let Some(colon) = colon else { continue };
        // HTTP's optional whitespace around a value: spaces and tabs only.
        let mut value = &line[colon + 1..];
        while let [b' ' | b'\t', rest @ ..] = value {
            value = rest;
        }
        while let [rest @ .., b' ' | b'\t'] = value {
            value = rest;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    (method, uri, headers, body)
}

/// Runs every check on one input under `configs`; the first that fails, as a message.
pub fn check(data: &[u8], configs: &[Config]) -> Result<(), String> {
    let (method, uri, headers, body) = read_fuzz_input(data);

    let target = headers.get("x-amz-target").map(HeaderValue::as_bytes);
    let route = classify(&method, &uri, &headers);
    if let Ok(Route::Judge(op)) = route {
        let exact = format!("{TARGET_PREFIX}{}", op.name());
        if target != Some(exact.as_bytes()) {
            return Err(format!("only the exact target names {op}: {target:?}"));
        }
    }

    let mut read = [false; TagOperation::ALL.len()];
    for (i, op) in TagOperation::ALL.into_iter().enumerate() {
        read[i] = check_parser_agrees(op, body)?;
    }

    for config in configs {
        let head = Head {
            method: &method,
            uri: &uri,
            headers: &headers,
            tunnel_host: None,
            caller: None,
        };
        let decision = decision(&head, body, &Rules::of(config));
        if let (Ok(Route::Judge(op)), true) = (&route, decision.allowed()) {
            let i = TagOperation::ALL.iter().position(|o| o == op).unwrap();
            if !read[i] {
                return Err(format!(
                    "an allowed {op} whose body the strict parser refuses"
                ));
            }
        }
        if config.policy.enforces_no_rule()
            && !decision.violations.iter().all(|v| &*v.rule == REQUEST_RULE)
        {
            return Err(format!(
                "a dry-run policy enforced {:?}",
                decision.violations
            ));
        }
        if !decision.allowed() {
            let _ = decision.denial_message();
        }
    }
    Ok(())
}

/// Whether any object in `body` repeats a member name (serde_json's `Value` keeps only one).
fn has_repeated_member(body: &[u8]) -> Result<bool, String> {
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
        .map_err(|e| format!("serde_json does not read what the strict parser read: {e}"))
}

/// The change serde_json reads from a body the strict parser accepted.
fn serde_reading(op: TagOperation, value: &Value) -> Result<TagChange, String> {
    let object = value.as_object().ok_or("not an object")?;
    let text = |v: &Value| v.as_str().map(str::to_owned).ok_or("not a string");
    let key_id = if op.has_key_id() {
        Some(text(object.get("KeyId").ok_or("no KeyId")?)?)
    } else if op.has_target_key_id() {
        Some(text(object.get("TargetKeyId").ok_or("no TargetKeyId")?)?)
    } else {
        None
    };
    let alias = if op.is_alias() {
        Some(text(object.get("AliasName").ok_or("no AliasName")?)?)
    } else {
        None
    };
    let set = match (op, object.get("Tags")) {
        (TagOperation::UntagResource, _) | (_, None) => Vec::new(),
        (op, Some(_)) if op.is_alias() => return Err("Tags in an alias operation".into()),
        (_, Some(tags)) => {
            let tags = tags.as_array().ok_or("Tags is not an array")?;
            let mut set = Vec::new();
            for tag in tags {
                let tag = tag.as_object().ok_or("a tag is not an object")?;
                if tag.len() != 2 {
                    return Err("a tag has more than TagKey and TagValue".into());
                }
                let field = |name| tag.get(name).ok_or(format!("a tag without {name}"));
                set.push(kms_tag_guard::kms::Tag {
                    key: text(field("TagKey")?)?,
                    value: text(field("TagValue")?)?,
                });
            }
            set
        }
    };
    let remove = match (op, object.get("TagKeys")) {
        (TagOperation::UntagResource, Some(keys)) => keys
            .as_array()
            .ok_or("TagKeys is not an array")?
            .iter()
            .map(text)
            .collect::<Result<_, _>>()?,
        _ => Vec::new(),
    };
    Ok(TagChange {
        operation: op,
        key_id,
        set,
        remove,
        alias,
    })
}

/// Whenever the strict parser accepts `body` as `op`, serde_json reads the same change; whether
/// it accepted.
fn check_parser_agrees(op: TagOperation, body: &[u8]) -> Result<bool, String> {
    let Ok(change) = parse_tag_request(op, body) else {
        return Ok(false);
    };
    let json: &[u8] = if body.is_empty() { b"{}" } else { body };
    let value: Value = serde_json::from_slice(json)
        .map_err(|e| format!("{op}: serde_json refuses an accepted body: {e}"))?;
    if has_repeated_member(json)? {
        return Err(format!("{op}: an accepted body repeats a member"));
    }
    let reading = serde_reading(op, &value).map_err(|e| format!("{op}: {e}"))?;
    if reading != change {
        return Err(format!(
            "{op}: serde_json reads {reading:?}, the strict parser {change:?}"
        ));
    }
    let members = value.as_object().map_or(0, |o| o.len());
    let exact_members = match op {
        TagOperation::TagResource
        | TagOperation::UntagResource
        | TagOperation::CreateAlias
        | TagOperation::UpdateAlias => Some(2),
        TagOperation::DeleteAlias => Some(1),
        TagOperation::CreateKey | TagOperation::ReplicateKey => None,
    };
    if exact_members.is_some_and(|n| n != members) {
        return Err(format!("{op}: an accepted body with {members} members"));
    }
    Ok(true)
}
