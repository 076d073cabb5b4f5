//! The front door, tested as differentials: generated requests (spellings of the target, other
//! protocols' shapes, look-alike member names, header tricks) are read by several model readers
//! written here, each a way some KMS front end or stand-in could read the same bytes:
//!
//! - **exact**: the KMS model as documented: `X-Amz-Target: TrentService.<Op>`, awsJson 1.1, JSON
//!   members by their exact names (a repeated member: the last one, as most parsers do);
//! - **last segment**: moto and LocalStack: the operation from an `Action` form parameter in the
//!   query or in any body first, then (when the query and the body name no parameter at all) from
//!   a header named `Action` (werkzeug's spelling: any case, `_` read as `-`), else from the last
//!   `.`-segment of the target, through moto's `camelcase_to_underscores`; JSON members by exact
//!   name;
//! - **case-insensitive**: the target compared ignoring case and surrounding whitespace (a
//!   prefix ignored), member names matched ignoring case when no exact one is there (Go's
//!   `encoding/json`), the header read under any `_`/`-` spelling;
//! - **lenient**: member names read through `kms_tag_guard::fold::skeleton` (invisible and
//!   format characters dropped, compatibility forms and case folded);
//! - **query**: the Query protocol: an `Action` parameter (any case) in the query or in a form
//!   body, its tags from `Tags.member.N.TagKey` parameters or, like moto, from the JSON body.
//!
//! The invariant: whenever any reader would see a tag change the policy forbids, the proxy
//! refuses the request, and nothing reaches the upstream. And the other way round, so that the
//! proxy is not simply refusing everything: a canonical request that every reader reads the same
//! way and the policy allows is allowed.
//!
//! Three runs of the same generator: against the library's decision (many cases), against the
//! running proxy in front of a recording fake KMS (raw sockets), and against the running proxy in
//! front of moto, whose real state is checked afterwards.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};

use common::moto::Moto;
use common::raw::RawConn;
use common::*;
use kms_tag_guard::config::ConfigSource;
use kms_tag_guard::decide::{decision, Head, Rules};
use kms_tag_guard::fold::skeleton;
use kms_tag_guard::kms::{Tag, TagChange, TagOperation};
use kms_tag_guard::policy::{Context, Decision};
use kms_tag_guard::Config;

// ------------------------------------------------------------------------------------------------
// Generated requests

/// A request as bytes on the wire would carry it.
#[derive(Debug, Clone)]
struct Attack {
    /// The `X-Amz-Target` value (any UTF-8), or none.
    target: Option<String>,
    /// More headers, verbatim (look-alike names, a second target).
    extra: Vec<(String, String)>,
    content_type: Option<String>,
    /// The request target: `/` or `/?query`.
    path: String,
    body: Vec<u8>,
}

/// The key every request names (moto's key in the moto run).
const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";

/// A tag the policy forbids (`abac-keys`), one it allows, and a key it requires.
const FORBIDDEN: (&str, &str) = ("Project", "apollo");
const ALLOWED: (&str, &str) = ("team:app", "ledger");
const REQUIRED: &str = "team:owner";

/// An alias the policy protects (`payments-aliases`), and one it allows (`alias-namespace`).
const PROTECTED_ALIAS: &str = "alias/team-payments-db";
const ALLOWED_ALIAS: &str = "alias/team-ledger";

fn tags(list: &[(&str, &str)]) -> Value {
    Value::Array(
        list.iter()
            .map(|(k, v)| json!({"TagKey": k, "TagValue": v}))
            .collect(),
    )
}

/// The operations the generated targets name.
const TAG_OPERATIONS: [&str; 7] = [
    "TagResource",
    "UntagResource",
    "CreateKey",
    "ReplicateKey",
    "CreateAlias",
    "UpdateAlias",
    "DeleteAlias",
];
const PASS_OPERATIONS: [&str; 2] = ["Encrypt", "ListKeys"];

/// Letters some readers fold onto ASCII ones.
fn unicode_look_alike(c: char) -> Option<char> {
    match c {
        's' => Some('\u{17f}'),
        'K' | 'k' => Some('\u{212a}'),
        'i' => Some('\u{131}'),
        'A'..='Z' | 'a'..='z' => char::from_u32(c as u32 - 0x21 + 0xff01),
        _ => None,
    }
}

/// A spelling of `TrentService.<op>` other than the exact one, as far as the edits go:
/// prefixes, separators, case, whitespace, escapes, Unicode, lists, nothing at all.
fn spelling_of(op: &'static str) -> impl Strategy<Value = Option<String>> {
    let prefix = select(vec![
        "TrentService.",
        "TrentService.",
        "",
        "x.",
        "TrentService.Encrypt.",
        "com.amazonaws.kms.TrentService.",
        "TrentService..",
        "trentservice.",
        "TrentService/",
        "TrentService#",
        "TrentService:",
    ]);
    let edits = proptest::collection::vec(
        (
            any::<proptest::sample::Index>(),
            select(vec![
                "case", "space", "tab", "nbsp", "zwsp", "pct", "unicode", "dot",
            ]),
        ),
        0..3,
    );
    let whole = select(vec![
        "",
        "",
        "",
        "list",
        "list-reversed",
        "empty",
        "none",
        "trailing",
    ]);
    (prefix, edits, whole).prop_map(move |(prefix, edits, whole)| {
        let mut name: Vec<char> = op.chars().collect();
        for (at, edit) in edits {
            let i = at.index(name.len());
            let c = name[i];
            match edit {
                "case" if c.is_ascii_uppercase() => name[i] = c.to_ascii_lowercase(),
                "case" => name[i] = c.to_ascii_uppercase(),
                "space" => name.insert(i, ' '),
                "tab" => name.insert(i, '\t'),
                "nbsp" => name.insert(i, '\u{a0}'),
                "zwsp" => name.insert(i, '\u{200b}'),
                "dot" => name.insert(i, '.'),
                "pct" => {
                    let escaped: Vec<char> = format!("%{:02X}", c as u32).chars().collect();
                    name.splice(i..=i, escaped);
                }
                _ => {
                    if let Some(u) = unicode_look_alike(c) {
                        name[i] = u;
                    }
                }
            }
        }
        let name: String = name.into_iter().collect();
        let target = format!("{prefix}{name}");
        match whole {
            "list" => Some(format!("TrentService.Encrypt,{target}")),
            "list-reversed" => Some(format!("{target}, TrentService.Encrypt")),
            "empty" => Some(String::new()),
            "none" => None,
            "trailing" => Some(format!("{target} ")),
            _ => Some(target),
        }
    })
}

/// Look-alikes of the `Tags` member name.
fn tags_look_alike() -> impl Strategy<Value = &'static str> {
    select(vec![
        "tags",
        "TAGS",
        "Tags ",
        " Tags",
        "Ta gs",
        "Tags\u{0}",
        "T\u{200b}ags",
        "\u{feff}Tags",
        "Tag\u{17f}",
        "\u{ff34}\u{ff41}\u{ff47}\u{ff53}",
        "Ta\u{301}gs",
        "Tags\u{ad}",
    ])
}

/// Look-alikes of the `AliasName` member name.
fn alias_look_alike() -> impl Strategy<Value = &'static str> {
    select(vec![
        "aliasName",
        "ALIASNAME",
        "AliasName ",
        "Alias Name",
        "AliasName\u{0}",
        "Alias\u{200b}Name",
        "\u{feff}AliasName",
        "\u{ff21}liasName",
        "Alia\u{17f}Name",
        "AliasNam\u{e9}",
    ])
}

/// The model's body for `op`: a forbidden change for a tag-changing operation (an allowed one
/// when `allowed`), a plain body for the others.
fn model_body(op: &str, allowed: bool) -> Value {
    let change = if allowed { ALLOWED } else { FORBIDDEN };
    let alias = if allowed {
        ALLOWED_ALIAS
    } else {
        PROTECTED_ALIAS
    };
    match op {
        "CreateAlias" | "UpdateAlias" => json!({"AliasName": alias, "TargetKeyId": KEY}),
        "DeleteAlias" => json!({"AliasName": alias}),
        "UntagResource" if allowed => json!({"KeyId": KEY, "TagKeys": [ALLOWED.0]}),
        "UntagResource" => json!({"KeyId": KEY, "TagKeys": [REQUIRED, FORBIDDEN.0]}),
        "TagResource" => json!({"KeyId": KEY, "Tags": tags(&[change])}),
        "CreateKey" => json!({"Tags": tags(&[(REQUIRED, "x"), change])}),
        "ReplicateKey" => json!({"KeyId": KEY, "ReplicaRegion": "eu-west-1",
                                 "Tags": tags(&[(REQUIRED, "x"), change])}),
        "Encrypt" => json!({"KeyId": KEY, "Plaintext": "aGVsbG8="}),
        _ => json!({}),
    }
}

/// A canonical request for `op` with this body.
fn canonical_attack(op: &str, body: Vec<u8>) -> Attack {
    Attack {
        target: Some(format!("TrentService.{op}")),
        extra: Vec::new(),
        content_type: Some("application/x-amz-json-1.1".into()),
        path: "/".into(),
        body,
    }
}

/// Requests that differ from a canonical one in one way, each a way past one of the proxy's
/// checks if that check were missing:
/// - `target`: another spelling of a tag-changing operation's target, with its forbidden body;
/// - `lookalike`: a canonical tag-changing request whose forbidden tags sit under a look-alike of
///   `Tags` (next to allowed ones for CreateKey and ReplicateKey);
/// - `action`: an operation that changes no tags, whose JSON body holds a forbidden change and a
///   form `Action=<tag operation>` inside a string value;
/// - `query`: the same body, with `?Action=<tag operation>` in the request line;
/// - `form`: an operation that changes no tags, with a whole Query-protocol body;
/// - `header`: an operation that changes no tags, a forbidden change in its body, and
///   `x_amz_target` (or a second `X-Amz-Target`) naming a tag-changing operation;
/// - `action-header`: an operation that changes no tags, an empty body, and a header named
///   `Action` (in some spelling) naming a tag-changing operation;
/// - `canonical`: the canonical request, forbidden or allowed by the policy.
///
/// Some get another content type as well.
fn attack() -> impl Strategy<Value = Attack> {
    let kind = select(vec![
        "target",
        "target",
        "target",
        "lookalike",
        "action",
        "action",
        "query",
        "form",
        "header",
        "action-header",
        "canonical",
    ]);
    let content_type = select(vec![
        None,
        None,
        None,
        None,
        None,
        Some("application/x-www-form-urlencoded"),
        Some("application/x-amz-json-1.0"),
        Some(""),
    ]);
    (
        kind,
        select(TAG_OPERATIONS.to_vec()),
        select(PASS_OPERATIONS.to_vec()),
        (tags_look_alike(), alias_look_alike()),
        (
            select(vec!["x_amz_target", "X_Amz-Target", "X-Amz-Target"]),
            select(vec!["Action", "ACTION", "action", "aCtIoN", "Act_ion", "action_"]),
        ),
        content_type,
        any::<bool>(),
    )
        .prop_flat_map(
            |(kind, tag_op, pass_op, look_alike, (header, action_name), content_type, allowed)| {
                (
                    spelling_of(tag_op),
                    Just((
                        kind,
                        tag_op,
                        pass_op,
                        look_alike,
                        (header, action_name),
                        content_type,
                        allowed,
                    )),
                )
            },
        )
        .prop_map(
            |(
                spelled,
                (kind, tag_op, pass_op, look_alike, (header, action_name), content_type, allowed),
            )| {
                let mut attack = match kind {
                    "target" => {
                        let mut a =
                            canonical_attack(tag_op, model_body(tag_op, false).to_string().into());
                        a.target = spelled;
                        a
                    }
                    "lookalike" if tag_op.ends_with("Alias") => {
                        // The protected alias under a look-alike of AliasName, after an allowed
                        // AliasName (or alone, half the time).
                        let mut body = model_body(tag_op, true);
                        let object = body.as_object_mut().unwrap();
                        if allowed {
                            object.remove("AliasName");
                        }
                        let mut text = body.to_string();
                        text.pop();
                        let name = serde_json::to_string(look_alike.1).unwrap();
                        let separator = if text.len() > 1 { "," } else { "" };
                        canonical_attack(
                            tag_op,
                            format!("{text}{separator}{name}:\"{PROTECTED_ALIAS}\"}}").into(),
                        )
                    }
                    "lookalike" => {
                        let look_alike = look_alike.0;
                        let mut body = model_body(tag_op, false);
                        let object = body.as_object_mut().unwrap();
                        object.remove("Tags");
                        // The tag objects' own members are look-alikes half the time, so that
                        // no exact member name is left for a reader to stumble on.
                        let forbidden = if allowed {
                            json!([{"tagkey": FORBIDDEN.0, "tagvalue": FORBIDDEN.1}])
                        } else {
                            tags(&[FORBIDDEN])
                        };
                        object.remove("TagKeys");
                        if matches!(tag_op, "CreateKey" | "ReplicateKey") {
                            object.insert("Tags".into(), tags(&[(REQUIRED, "x")]));
                        } else if tag_op == "UntagResource" {
                            object.insert("TagKeys".into(), json!([]));
                        }
                        let mut text = body.to_string();
                        text.pop();
                        let name = serde_json::to_string(look_alike).unwrap();
                        let op = if tag_op == "UntagResource" { "TagResource" } else { tag_op };
                        let mut a = canonical_attack(op, format!("{text},{name}:{forbidden}}}").into());
                        if tag_op == "UntagResource" {
                            // TagResource with its whole tag list under a look-alike name.
                            a.body = format!(r#"{{"KeyId":"{KEY}",{name}:{forbidden}}}"#).into();
                        }
                        a
                    }
                    "action" | "query" | "header" => {
                        let mut body = model_body(pass_op, false);
                        let object = body.as_object_mut().unwrap();
                        object.insert("KeyId".into(), json!(KEY));
                        object.insert("AliasName".into(), json!(PROTECTED_ALIAS));
                        object.insert("TargetKeyId".into(), json!(KEY));
                        object.insert("Tags".into(), tags(&[FORBIDDEN]));
                        object.insert("TagKeys".into(), json!([REQUIRED]));
                        if kind == "action" {
                            object.insert("Description".into(), json!(format!("&Action={tag_op}&")));
                        }
                        let mut a = canonical_attack(pass_op, body.to_string().into());
                        if kind == "query" {
                            a.path = format!("/?Action={tag_op}");
                        }
                        if kind == "header" {
                            a.extra = vec![(header.to_owned(), format!("TrentService.{tag_op}"))];
                        }
                        a
                    }
                    "action-header" => {
                        // An empty body: moto then reads its parameters from the headers, and
                        // the operation from `Action` among them.
                        let mut a = canonical_attack(pass_op, Vec::new());
                        a.extra = vec![(action_name.to_owned(), tag_op.to_owned())];
                        a
                    }
                    "form" => canonical_attack(
                        pass_op,
                        format!(
                            "Action={tag_op}&KeyId={KEY}&Tags.member.1.TagKey={}&Tags.member.1.TagValue={}&TagKeys.member.1={REQUIRED}&AliasName={PROTECTED_ALIAS}&TargetKeyId={KEY}",
                            FORBIDDEN.0, FORBIDDEN.1
                        )
                        .into(),
                    ),
                    _ => canonical_attack(tag_op, model_body(tag_op, allowed).to_string().into()),
                };
                if let Some(ct) = content_type {
                    attack.content_type = (!ct.is_empty()).then(|| ct.to_owned());
                }
                attack
            },
        )
}

/// Canonical requests every reader reads the same way: the exact target, awsJson, the model's
/// member names, no extra headers. With whether the policy allows them.
fn canonical() -> impl Strategy<Value = (Attack, bool)> {
    let ops: Vec<&str> = TAG_OPERATIONS
        .iter()
        .chain(&PASS_OPERATIONS)
        .copied()
        .collect();
    (select(ops), any::<bool>()).prop_map(|(op, allowed)| {
        let attack = canonical_attack(op, model_body(op, allowed).to_string().into());
        let passes = PASS_OPERATIONS.contains(&op);
        (attack, passes || allowed)
    })
}

// ------------------------------------------------------------------------------------------------
// The model readers

/// What a reader would do with a request: the tag change it would make, if any.
type Reading = Option<TagChange>;

fn tag_operation(name: &str) -> Option<TagOperation> {
    TagOperation::ALL.into_iter().find(|op| op.name() == name)
}

/// moto's `camelcase_to_underscores` (moto/core/utils.py), which turns an operation name into
/// the method moto calls.
fn camelcase_to_underscores(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let title = |c: char| c.is_uppercase();
    let mut out = String::new();
    let mut prev_title = true;
    for (i, &c) in chars.iter().enumerate() {
        let next_title = chars.get(i + 1).is_none_or(|&n| title(n));
        let upper_to_lower = title(c) && !next_title;
        let lower_to_upper = title(c) && !prev_title;
        if i > 0 && (upper_to_lower || lower_to_upper) {
            out.push('_');
        }
        prev_title = title(c);
        if !c.is_whitespace() {
            out.extend(c.to_lowercase());
        }
    }
    out
}

fn moto_operation(name: &str) -> Option<TagOperation> {
    let method = camelcase_to_underscores(name);
    TagOperation::ALL
        .into_iter()
        .find(|op| camelcase_to_underscores(op.name()) == method)
}

/// Python's `unquote_plus`.
fn unquote_plus(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
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
    String::from_utf8_lossy(&out).into_owned()
}

/// Python's `parse_qsl(s, keep_blank_values=True)`: pairs at `&`, name and value decoded.
fn parse_qsl(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((n, v)) => (unquote_plus(n), unquote_plus(v)),
            None => (unquote_plus(pair), String::new()),
        })
        .collect()
}

fn query_of(attack: &Attack) -> &str {
    attack.path.split_once('?').map_or("", |(_, q)| q)
}

/// The JSON members of the body, every occurrence in order (a repeated member appears twice).
fn members(body: &[u8]) -> Option<Vec<(String, Value)>> {
    struct Members(Vec<(String, Value)>);
    impl<'de> serde::Deserialize<'de> for Members {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Members;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Members, A::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = map.next_entry::<String, Value>()? {
                        out.push((k, v));
                    }
                    Ok(Members(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    let text = std::str::from_utf8(body).ok()?;
    let text = if text.trim().is_empty() { "{}" } else { text };
    serde_json::from_str::<Members>(text).ok().map(|m| m.0)
}

/// A member by name: `matches` decides which names count; the last match wins.
fn member(members: &[(String, Value)], matches: impl Fn(&str) -> bool) -> Option<&Value> {
    members
        .iter()
        .rev()
        .find(|(k, _)| matches(k))
        .map(|(_, v)| v)
}

/// The change a reader makes of the body, matching member names with `name_eq`.
fn change_from_json(
    op: TagOperation,
    body: &[u8],
    name_eq: &dyn Fn(&str, &str) -> bool,
) -> Reading {
    let members = members(body)?;
    let get = |want: &str| member(&members, |k| name_eq(k, want));
    let set = get("Tags")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|t| {
                    let t = t.as_object()?;
                    let field = |want: &str| {
                        t.iter()
                            .rev()
                            .find(|(k, _)| name_eq(k, want))
                            .and_then(|(_, v)| v.as_str())
                    };
                    Some(Tag {
                        key: field("TagKey")?.to_owned(),
                        value: field("TagValue").unwrap_or_default().to_owned(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let remove = get("TagKeys")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if op.is_alias() {
        return Some(TagChange {
            operation: op,
            key_id: get("TargetKeyId")
                .and_then(Value::as_str)
                .map(str::to_owned),
            set: Vec::new(),
            remove: Vec::new(),
            alias: Some(get("AliasName")?.as_str()?.to_owned()),
        });
    }
    Some(TagChange {
        operation: op,
        alias: None,
        key_id: get("KeyId").and_then(Value::as_str).map(str::to_owned),
        set: if op == TagOperation::UntagResource {
            Vec::new()
        } else {
            set
        },
        remove: if op == TagOperation::UntagResource {
            remove
        } else {
            Vec::new()
        },
    })
}

fn exact_names(a: &str, b: &str) -> bool {
    a == b
}

fn header_values(attack: &Attack, same_name: impl Fn(&str) -> bool) -> Vec<&str> {
    let mut values: Vec<&str> = attack.target.iter().map(String::as_str).collect();
    values.extend(
        attack
            .extra
            .iter()
            .filter(|(n, _)| same_name(n))
            .map(|(_, v)| v.as_str()),
    );
    values
}

/// KMS as documented.
fn exact_reader(attack: &Attack) -> Vec<Reading> {
    let targets = header_values(attack, |n| n.eq_ignore_ascii_case("x-amz-target"));
    if attack.content_type.as_deref() != Some("application/x-amz-json-1.1") {
        return vec![None];
    }
    targets
        .iter()
        .map(|t| {
            let op = tag_operation(t.strip_prefix("TrentService.")?)?;
            change_from_json(op, &attack.body, &exact_names)
        })
        .collect()
}

/// moto and LocalStack.
fn last_segment_reader(attack: &Attack) -> Vec<Reading> {
    let body = String::from_utf8_lossy(&attack.body);
    let mut params: Vec<(String, String)> = parse_qsl(query_of(attack))
        .into_iter()
        .chain(parse_qsl(&body))
        .collect();
    if params.is_empty() {
        // moto: `if not querystring: querystring.update(headers)`, werkzeug's header names.
        params = attack
            .extra
            .iter()
            .filter(|(n, _)| n.replace('_', "-").eq_ignore_ascii_case("action"))
            .map(|(_, v)| ("Action".to_owned(), v.clone()))
            .collect();
    }
    let action = params
        .into_iter()
        .find(|(n, v)| n == "Action" && !v.is_empty())
        .map(|(_, v)| v);
    let names: Vec<String> = match action {
        Some(action) => vec![action],
        // WSGI reads `-` and `_` in header names alike.
        None => header_values(attack, |n| {
            n.replace('_', "-").eq_ignore_ascii_case("x-amz-target")
        })
        .into_iter()
        .map(|t| t.rsplit('.').next().unwrap_or(t).to_owned())
        .collect(),
    };
    names
        .iter()
        .map(|name| change_from_json(moto_operation(name)?, &attack.body, &exact_names))
        .collect()
}

/// A reader that ignores case, surrounding whitespace and any prefix of the target, and matches
/// member names ignoring case when no exact one is there.
fn case_insensitive_reader(attack: &Attack) -> Vec<Reading> {
    let targets = header_values(attack, |n| {
        n.replace('_', "-").eq_ignore_ascii_case("x-amz-target")
    });
    let ignoring_case = |k: &str, want: &str| k == want || k.eq_ignore_ascii_case(want);
    targets
        .iter()
        .flat_map(|t| t.split(','))
        .map(|t| {
            let t = t.trim();
            let name = t.rsplit(['.', '/', '#', ':']).next().unwrap_or(t);
            let op = TagOperation::ALL
                .into_iter()
                .find(|op| kms_tag_guard::fold::eq_ignore_case(op.name(), name))?;
            change_from_json(op, &attack.body, &ignoring_case)
        })
        .collect()
}

/// A reader that reads member names through their skeleton, and the target's last segment too
/// (percent-decoded).
fn lenient_reader(attack: &Attack) -> Vec<Reading> {
    let targets = header_values(attack, |n| {
        n.replace('_', "-").eq_ignore_ascii_case("x-amz-target")
    });
    let by_skeleton = |k: &str, want: &str| skeleton(k) == skeleton(want);
    targets
        .iter()
        .map(|t| {
            let decoded = unquote_plus(t);
            let last = decoded
                .rsplit(['.', '/', '#', ':'])
                .next()
                .unwrap_or(&decoded);
            let s = skeleton(last);
            let op = TagOperation::ALL
                .into_iter()
                .find(|op| s == skeleton(op.name()))?;
            change_from_json(op, &attack.body, &by_skeleton)
        })
        .collect()
}

/// The Query protocol.
fn query_reader(attack: &Attack) -> Vec<Reading> {
    let body = String::from_utf8_lossy(&attack.body);
    let params: Vec<(String, String)> = parse_qsl(query_of(attack))
        .into_iter()
        .chain(parse_qsl(&body))
        .collect();
    let action = params
        .iter()
        .find(|(n, v)| n.trim().eq_ignore_ascii_case("action") && !v.is_empty());
    let Some((_, action)) = action else {
        return vec![None];
    };
    let Some(op) = moto_operation(action.trim()).or_else(|| tag_operation(action.trim())) else {
        return vec![None];
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let mut set = Vec::new();
    let mut remove = Vec::new();
    for i in 1..=3 {
        if let Some(key) = param(&format!("Tags.member.{i}.TagKey")) {
            let value = param(&format!("Tags.member.{i}.TagValue")).unwrap_or_default();
            set.push(Tag { key, value });
        }
        if let Some(key) = param(&format!("TagKeys.member.{i}")) {
            remove.push(key);
        }
    }
    let from_form = TagChange {
        operation: op,
        alias: param("AliasName").filter(|_| op.is_alias()),
        key_id: param(if op.is_alias() {
            "TargetKeyId"
        } else {
            "KeyId"
        }),
        set: if op == TagOperation::UntagResource {
            Vec::new()
        } else {
            set
        },
        remove: if op == TagOperation::UntagResource {
            remove
        } else {
            Vec::new()
        },
    };
    vec![
        Some(from_form),
        change_from_json(op, &attack.body, &exact_names),
    ]
}

/// A model reader: every tag change it could take the request for.
type Reader = fn(&Attack) -> Vec<Reading>;

const READERS: [(&str, Reader); 5] = [
    ("exact", exact_reader),
    ("last-segment", last_segment_reader),
    ("case-insensitive", case_insensitive_reader),
    ("lenient", lenient_reader),
    ("query", query_reader),
];

/// The library's one decision on a `POST` with this path, head and body.
fn decide(config: &Config, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Decision {
    let head = Head {
        method: &Method::POST,
        uri,
        headers,
        tunnel_host: None,
        caller: None,
    };
    decision(&head, body, &Rules::of(config))
}

/// The forbidden tag changes some reader sees, named by reader.
fn forbidden_readings(config: &Config, attack: &Attack) -> Vec<(String, TagChange)> {
    let context = Context {
        access_key_id: Some(ACCESS_KEY_ID),
        caller: None,
    };
    let mut out = Vec::new();
    for (name, reader) in READERS {
        for change in reader(attack).into_iter().flatten() {
            if !config.policy.evaluate(&change, &context).allowed() {
                out.push((name.to_owned(), change));
            }
        }
    }
    out
}

// ------------------------------------------------------------------------------------------------
// The request on the wire

/// `Authorization` with the test credential's scope (service `kms`, which moto routes by); the
/// signature is not checked by any reader here.
fn authorization() -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/20260101/{REGION}/kms/aws4_request, \
         SignedHeaders=host;x-amz-date, Signature={}",
        "0".repeat(64)
    )
}

fn wire(attack: &Attack, host: &str) -> Vec<u8> {
    let mut head = format!("POST {} HTTP/1.1\r\nHost: {host}\r\n", attack.path);
    if let Some(ct) = &attack.content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    if let Some(t) = &attack.target {
        head.push_str(&format!("X-Amz-Target: {t}\r\n"));
    }
    for (n, v) in &attack.extra {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str(&format!(
        "X-Amz-Date: 20260101T000000Z\r\nAuthorization: {}\r\nContent-Length: {}\r\n\r\n",
        authorization(),
        attack.body.len()
    ));
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&attack.body);
    bytes
}

/// The head as the library's decision sees it; `None` when HTTP could not carry it at all (the
/// live runs cover those).
fn header_map(attack: &Attack, host: &str) -> Option<HeaderMap> {
    let mut h = HeaderMap::new();
    h.append("host", HeaderValue::from_str(host).ok()?);
    if let Some(ct) = &attack.content_type {
        h.append("content-type", HeaderValue::from_str(ct).ok()?);
    }
    if let Some(t) = &attack.target {
        h.append("x-amz-target", HeaderValue::from_bytes(t.as_bytes()).ok()?);
    }
    for (n, v) in &attack.extra {
        h.append(
            HeaderName::from_bytes(n.as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        );
    }
    h.append(
        "authorization",
        HeaderValue::from_str(&authorization()).ok()?,
    );
    Some(h)
}

fn policy_config() -> Config {
    let config = common::ProxyConfig {
        endpoint: Some("http://127.0.0.1:1".into()),
        ..common::ProxyConfig::default()
    };
    Config::parse(&config.render(), ConfigSource::BuiltIn).unwrap()
}

fn samples<T: std::fmt::Debug>(strategy: impl Strategy<Value = T>, n: usize) -> Vec<T> {
    let mut runner = TestRunner::deterministic();
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

// ------------------------------------------------------------------------------------------------
// 1. The library's decision

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(cases() * 8) })]

    #[test]
    fn what_any_reader_takes_for_a_forbidden_tag_change_is_refused(attack in attack()) {
        let config = policy_config();
        let forbidden = forbidden_readings(&config, &attack);
        let Some(headers) = header_map(&attack, "kms.us-east-1.amazonaws.com") else {
            return Ok(());
        };
        let uri: Uri = attack.path.parse().unwrap();
        let decision = decide(&config, &uri, &headers, &attack.body);
        if !forbidden.is_empty() {
            prop_assert!(
                !decision.allowed(),
                "{:?} would make forbidden changes {:?}, and the proxy allows it",
                attack,
                forbidden
            );
        }
    }

    #[test]
    fn canonical_requests_are_read_alike_and_allowed_when_the_policy_allows(
        (attack, allowed) in canonical()
    ) {
        let config = policy_config();
        let headers = header_map(&attack, "kms.us-east-1.amazonaws.com").unwrap();
        let decision = decide(&config, &Uri::from_static("/"), &headers, &attack.body);
        let readings: Vec<Vec<Reading>> = READERS.iter().map(|(_, r)| r(&attack)).collect();
        for (i, (name, _)) in READERS.iter().enumerate().skip(1) {
            if *name == "query" {
                continue; // no Action parameter: the Query reader reads nothing
            }
            prop_assert_eq!(&readings[i], &readings[0], "{} reads {:?} otherwise", name, attack);
        }
        prop_assert_eq!(decision.allowed(), allowed, "{:?}: {:?}", attack, decision);
    }
}

/// The generators reach what they must: forbidden readings by each reader, and attacks no reader
/// takes for a tag change.
#[test]
fn the_generator_reaches_every_reader() {
    let config = policy_config();
    let mut by_reader: BTreeMap<String, usize> = BTreeMap::new();
    let mut harmless = 0;
    for attack in samples(attack(), 3000) {
        let forbidden = forbidden_readings(&config, &attack);
        if forbidden.is_empty() {
            harmless += 1;
        }
        for (name, _) in forbidden {
            *by_reader.entry(name).or_default() += 1;
        }
    }
    for (name, _) in READERS {
        assert!(
            by_reader.get(name).copied().unwrap_or(0) > 30,
            "reader {name}: {by_reader:?}"
        );
    }
    assert!(harmless > 100, "{harmless} harmless attacks");
}

// ------------------------------------------------------------------------------------------------
// 2. The running proxy, in front of a fake KMS that records every request

/// Sends one request on a new connection and reads the answer (or the close).
async fn exchange(proxy: &TestProxy, bytes: &[u8]) -> Option<u16> {
    let mut conn = RawConn::connect(proxy.addr).await.unwrap();
    let _ = conn.write(bytes).await;
    conn.read_response_within(Duration::from_secs(5))
        .await
        .ok()
        .map(|r| r.status)
}

#[tokio::test]
async fn the_running_proxy_forwards_nothing_any_reader_takes_for_a_forbidden_change() {
    let config = policy_config();
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let mut refused = 0;
    for attack in samples(attack(), 300) {
        let forbidden = forbidden_readings(&config, &attack);
        let before = fake.count();
        let status = exchange(&proxy, &wire(&attack, &fake.host())).await;
        if forbidden.is_empty() {
            continue;
        }
        refused += 1;
        assert!(
            status.is_none_or(|s| (400..500).contains(&s)),
            "{attack:?} ({forbidden:?}) was answered {status:?}"
        );
        assert_eq!(
            fake.count(),
            before,
            "{attack:?} ({forbidden:?}) reached the upstream: {:?}",
            fake.last()
        );
    }
    assert!(refused > 100, "only {refused} forbidden attacks");
    // Everything sent so far was answered before the next was sent; one more, allowed, request
    // shows that whatever was forwarded has been recorded.
    let before = fake.count();
    let encrypt = RawRequest::signed_kms(&fake.host(), "TrentService.Encrypt", b"{}");
    assert_eq!(exchange(&proxy, &encrypt.to_bytes()).await, Some(200));
    fake.wait_for_requests(before + 1, Duration::from_secs(5))
        .await;
    for recorded in fake.requests() {
        let target = recorded.header("x-amz-target").unwrap_or_default();
        if let Some(op) = target.strip_prefix("TrentService.").and_then(tag_operation) {
            let change = kms_tag_guard::kms::request::parse_tag_request(op, &recorded.body)
                .unwrap_or_else(|e| panic!("an unreadable {op} was forwarded: {e}"));
            let decision = config.policy.evaluate(&change, &Context::default());
            assert!(decision.allowed(), "forwarded: {change:?}");
        }
    }
}

// ------------------------------------------------------------------------------------------------
// 3. The running proxy in front of moto, whose state shows what the requests did

#[tokio::test]
async fn moto_behind_the_proxy_never_makes_a_forbidden_change() {
    let moto = Moto::start().await;
    let key = moto.create_key(&[(REQUIRED, "payments")]).await;
    // The protected alias exists (made behind the proxy's back), pointing at the key.
    let created = moto
        .call(
            "CreateAlias",
            &json!({"AliasName": PROTECTED_ALIAS, "TargetKeyId": key}),
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.body_str());
    let proxy = start_proxy_to(&moto.url(), ProxyConfig::default()).await;
    let config = policy_config();
    let mut forbidden_count = 0;
    for attack in samples(attack(), 200) {
        let mut attack = attack;
        attack.body = String::from_utf8_lossy(&attack.body)
            .replace(KEY, &key)
            .into_bytes();
        if !forbidden_readings(&config, &attack).is_empty() {
            forbidden_count += 1;
        }
        exchange(&proxy, &wire(&attack, &moto.host())).await;
    }
    assert!(
        forbidden_count > 50,
        "only {forbidden_count} forbidden attacks"
    );
    // The protected alias is still there, still pointing at the key.
    let aliases = moto.call("ListAliases", &json!({})).await.json();
    let protected: Vec<&Value> = aliases["Aliases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["AliasName"].as_str() == Some(PROTECTED_ALIAS))
        .collect();
    assert_eq!(protected.len(), 1, "{aliases:#}");
    assert_eq!(protected[0]["TargetKeyId"].as_str(), Some(key.as_str()));
    // The key still has its required tag and no forbidden one; no key moto holds has one.
    let tags = moto.list_tags(&key).await;
    assert!(
        tags.iter().any(|(k, _)| k == REQUIRED),
        "{REQUIRED} was removed: {tags:?}"
    );
    let listed = moto.call("ListKeys", &json!({})).await.json();
    for k in listed["Keys"].as_array().unwrap() {
        let id = k["KeyId"].as_str().unwrap();
        for (tag, _) in moto.list_tags(id).await {
            assert!(
                !kms_tag_guard::fold::eq_ignore_case(&tag, FORBIDDEN.0),
                "key {id} got the forbidden tag {tag:?}"
            );
        }
    }
}
