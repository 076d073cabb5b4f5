//! Strict parsing of a tag- or alias-bearing request body into a [`TagChange`].
//!
//! The proxy forwards the client's bytes, never a re-serialisation, so what KMS reads must be what
//! the proxy judged. Wherever two reasonable JSON parsers could read the body differently, the body
//! is refused. In every operation: repeated members at any depth, wrong types, repeated tag keys,
//! trailing bytes, invalid UTF-8, a byte order mark, nesting deeper than 128, and any member whose
//! name is a look-alike of a guarded member (`Tags`, `TagKeys`, `TagKey`, `TagValue`, `KeyId`):
//! the same name in another letter case, with whitespace, control or format characters (NUL,
//! zero-width, BOM) or accents in it, or in Unicode that folds onto it (fullwidth, `ſ`, `K`).
//! A guarded member is also refused wherever the model does not put it (`TagKeys` in CreateKey,
//! `Tags` inside another member). TagResource and UntagResource take no other members at all;
//! CreateKey and ReplicateKey carry members the proxy does not judge, which are still checked as
//! above at every depth. Escapes are decoded before anything is compared, so `"Pro\u006aect"` is
//! judged as `Project`.
//!
//! CreateAlias, UpdateAlias and DeleteAlias are read the same way: exactly `AliasName` and
//! `TargetKeyId` (DeleteAlias: `AliasName`), with look-alikes of both guarded like the tag
//! members, and the alias name held to the rules of the model, read strictly ([`check_alias_name`]).

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::operation::TagOperation;
use crate::fold::skeleton;

mod plain;

/// One tag a request sets.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Tag {
    pub key: String,
    pub value: String,
}

/// What a tag- or alias-bearing request would change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagChange {
    pub operation: TagOperation,
    /// The key the request names, as sent (key id, key ARN, ...): the `KeyId` member, or for
    /// CreateAlias and UpdateAlias the `TargetKeyId` (the key the alias is to point at); `None`
    /// for CreateKey and DeleteAlias (which names no key: the proxy cannot see which key the
    /// alias points at).
    pub key_id: Option<String>,
    /// The `AliasName` of an alias operation.
    pub alias: Option<String>,
    /// Tags set (TagResource, CreateKey, ReplicateKey), in request order.
    pub set: Vec<Tag>,
    /// Tag keys removed (UntagResource), in request order.
    pub remove: Vec<String>,
}

/// Why a tag-bearing body cannot be read unambiguously.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the body is not valid UTF-8; send the JSON request as UTF-8")]
    NotUtf8,
    #[error("the body starts with a byte order mark; send plain UTF-8 JSON")]
    ByteOrderMark,
    #[error("the body is not one unambiguous JSON object: {0}")]
    Json(String),
    #[error("the tag key {0:?} appears twice in one request; send each tag key once")]
    DuplicateTagKey(String),
    #[error("{0}")]
    AliasName(String),
    #[error("{0}")]
    TargetKeyId(String),
}

/// The members whose spelling decides what a request changes. A look-alike of one of these (the
/// same skeleton, `crate::fold::skeleton`, but not the same name) is refused wherever it stands:
/// some parsers match member names ignoring case, and lenient ones drop what they cannot read.
const GUARDED_MEMBERS: [&str; 7] = [
    "Tags",
    "TagKeys",
    "TagKey",
    "TagValue",
    "KeyId",
    "AliasName",
    "TargetKeyId",
];

/// The longest alias name the model allows (`AliasNameType`), in characters.
pub const MAX_ALIAS_CHARS: usize = 256;
/// The longest key identifier the model allows (`KeyIdType`), in characters.
pub const MAX_KEY_ID_CHARS: usize = 2048;

/// Checks an `AliasName` against the rules of the KMS model, read strictly: 1 to 256
/// characters, starting with `alias/` and a name after it, only ASCII letters, digits, `/`, `_`
/// and `-` (the documented rule; the model's pattern `^[a-zA-Z0-9:/_-]+$` also admits `:`, which
/// moto refuses: the stricter reading is taken), and not under `alias/aws/`, which is reserved
/// for AWS managed keys (compared ignoring case, the stricter reading).
pub fn check_alias_name(name: &str) -> Result<(), String> {
    let shown = crate::text::bounded_quoted(name, 300);
    if name.chars().count() > MAX_ALIAS_CHARS {
        return Err(format!(
            "the alias name {shown} is longer than the {MAX_ALIAS_CHARS} characters KMS allows"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-')))
    {
        return Err(format!(
            "the alias name {shown} holds {c:?}; an alias name holds only ASCII letters, digits, '/', '_' and '-'"
        ));
    }
    let Some(rest) = name.strip_prefix("alias/") else {
        return Err(format!(
            "the alias name {shown} does not start with \"alias/\" (exact case); name an alias as alias/<name>"
        ));
    };
    if rest.is_empty() {
        return Err(
            "the alias name \"alias/\" names no alias; name an alias as alias/<name>".into(),
        );
    }
    if name.len() >= 10 && name[..10].eq_ignore_ascii_case("alias/aws/") {
        return Err(format!(
            "the alias name {shown} is under alias/aws/, which is reserved for AWS managed keys (compared ignoring case)"
        ));
    }
    Ok(())
}

/// Checks a `TargetKeyId`: a key id (ASCII letters, digits and `-`: `1234abcd-…`, `mrk-…`) or a
/// key ARN of exactly the shape `arn:<partition>:kms:<region>:<account>:key/<key id>`, at most
/// 2048 characters. Anything else is refused: an alias (the model allows only a key id or key
/// ARN, and an alias names no key the proxy can judge), whitespace, other characters, another
/// ARN shape, which some reader might resolve to a key the `targets` of a rule did not name.
pub fn check_target_key_id(key_id: &str) -> Result<(), String> {
    let shown = crate::text::bounded_quoted(key_id, 300);
    if key_id.len() > MAX_KEY_ID_CHARS {
        return Err(format!(
            "the TargetKeyId {shown} is longer than the {MAX_KEY_ID_CHARS} characters KMS allows"
        ));
    }
    let lower = key_id.to_ascii_lowercase();
    if lower.starts_with("alias/") || lower.contains(":alias/") {
        return Err(format!(
            "the TargetKeyId {shown} is an alias; point an alias at a key by its key id or key ARN"
        ));
    }
    let word = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let valid = match key_id.split(':').collect::<Vec<_>>().as_slice() {
        [id] => word(id),
        ["arn", partition, "kms", region, account, resource] => {
            word(partition)
                && word(region)
                && !account.is_empty()
                && account.bytes().all(|b| b.is_ascii_digit())
                && resource.strip_prefix("key/").is_some_and(word)
        }
        _ => false,
    };
    if !valid {
        return Err(format!(
            "the TargetKeyId {shown} is neither a key id (letters, digits and '-') nor a key ARN arn:<partition>:kms:<region>:<account>:key/<key id>; send the key id or key ARN exactly"
        ));
    }
    Ok(())
}

/// Parses the body of a tag-bearing operation strictly.
pub fn parse_tag_request(operation: TagOperation, body: &[u8]) -> Result<TagChange, RequestError> {
    if body.starts_with(b"\xEF\xBB\xBF") {
        return Err(RequestError::ByteOrderMark);
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return Err(RequestError::NotUtf8);
    };
    // The awsJson 1.1 protocol lets a client send an empty body for an empty input.
    let text = if text.is_empty() { "{}" } else { text };

    // The common shape is read in one pass; anything else by the strict parser, which the plain
    // reader never contradicts (it reads only what the strict parser reads the same way).
    let change = match plain::read(operation, text) {
        Some(change) => change,
        None => strict(operation, text)?,
    };
    checked(change)
}

/// The strict parser: serde visitors over serde_json, for every body.
fn strict(operation: TagOperation, text: &str) -> Result<TagChange, RequestError> {
    // Read from the validated `str`: serde_json then skips checking each string's UTF-8 again.
    let mut deserializer = serde_json::Deserializer::from_str(text);
    deserializer
        .deserialize_map(RequestVisitor { operation })
        .and_then(|change| deserializer.end().map(|()| change))
        .map_err(|e| RequestError::Json(e.to_string()))
}

/// The checks on a parsed change: repeated tag keys, the alias name, the target key id.
fn checked(change: TagChange) -> Result<TagChange, RequestError> {
    if let Some(key) = repeated_tag_key(&change) {
        return Err(RequestError::DuplicateTagKey(key.clone()));
    }
    if let Some(alias) = &change.alias {
        check_alias_name(alias).map_err(RequestError::AliasName)?;
    }
    if change.operation.has_target_key_id() {
        if let Some(target) = &change.key_id {
            check_target_key_id(target).map_err(RequestError::TargetKeyId)?;
        }
    }
    Ok(change)
}

/// The first tag key, set or removed, that equals an earlier one.
fn repeated_tag_key(change: &TagChange) -> Option<&String> {
    // A request sets at most 50 tags and usually a few: comparing each key with those before it
    // is cheaper than hashing for a few, and the set keeps a hostile list of thousands linear.
    const SCAN_LIMIT: usize = 16;
    let keys = || change.set.iter().map(|t| &t.key).chain(&change.remove);
    let count = change.set.len() + change.remove.len();
    if count <= SCAN_LIMIT {
        return keys()
            .enumerate()
            .find(|&(i, key)| keys().take(i).any(|earlier| earlier == key))
            .map(|(_, key)| key);
    }
    let mut seen = HashSet::with_capacity(count);
    keys().find(|key| !seen.insert(key.as_str()))
}

/// Member names seen in one object, to refuse repeats. Names borrow from the body unless they
/// hold escapes, so admitting one allocates nothing in the common case.
struct MemberNames<'de> {
    names: Vec<Cow<'de, str>>,
    large: HashSet<Cow<'de, str>>,
}

impl<'de> MemberNames<'de> {
    /// Objects in KMS requests have a handful of members; a linear scan is fastest for those, and
    /// a set keeps a hostile object with thousands of members linear.
    const SCAN_LIMIT: usize = 16;

    fn new() -> Self {
        MemberNames {
            names: Vec::new(),
            large: HashSet::new(),
        }
    }

    fn admit<E: de::Error>(&mut self, name: Cow<'de, str>) -> Result<(), E> {
        if let Some(guarded) = look_alike_of_guarded(&name) {
            return Err(E::custom(format_args!(
                "member {name:?} is a look-alike of {guarded:?} (it differs only in letter case, whitespace, invisible characters or Unicode that folds onto it); send the member exactly as the KMS model names it"
            )));
        }
        let repeated = if self.large.is_empty() && self.names.len() < Self::SCAN_LIMIT {
            self.names.contains(&name)
        } else {
            if self.large.is_empty() {
                self.large.extend(self.names.drain(..));
            }
            self.large.contains(&name)
        };
        if repeated {
            return Err(E::custom(format_args!("member {name:?} appears twice")));
        }
        if self.large.is_empty() {
            self.names.push(name);
        } else {
            self.large.insert(name);
        }
        Ok(())
    }
}

/// The guarded member that `name` is a look-alike of (same skeleton, other name), if any.
fn look_alike_of_guarded(name: &str) -> Option<&'static str> {
    if !name.is_ascii() {
        let skeleton = skeleton(name);
        return GUARDED_MEMBERS
            .into_iter()
            .find(|g| name != *g && skeleton.eq_ignore_ascii_case(g));
    }
    // ASCII: the skeleton drops whitespace and controls and lower-cases the rest, so it is
    // compared byte by byte without being built. A guarded name itself is no look-alike of
    // another (their skeletons differ), which the loop finds too, only later.
    if GUARDED_MEMBERS.contains(&name) {
        return None;
    }
    let kept = name
        .bytes()
        .filter(|b| !crate::fold::dropped_ascii(*b))
        .count();
    GUARDED_MEMBERS
        .into_iter()
        .find(|g| g.len() == kept && ascii_skeleton_is(name, g))
}

/// Whether the skeleton of the ASCII `name` is `guarded` ignoring ASCII case.
fn ascii_skeleton_is(name: &str, guarded: &str) -> bool {
    let mut kept = name.bytes().filter(|b| !crate::fold::dropped_ascii(*b));
    guarded
        .bytes()
        .all(|g| kept.next().is_some_and(|b| b.eq_ignore_ascii_case(&g)))
        && kept.next().is_none()
}

/// Refuses a guarded member where the model does not put it.
fn misplaced<E: de::Error>(name: &str, operation: &str) -> Result<(), E> {
    if GUARDED_MEMBERS.contains(&name) {
        return Err(E::custom(format_args!(
            "member {name:?} may not appear here in {operation}: the KMS model puts it elsewhere, and a lenient reader could take it for a tag change"
        )));
    }
    Ok(())
}

/// A member name, borrowed from the body when it holds no escapes.
struct MemberName;

impl<'de> DeserializeSeed<'de> for MemberName {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for MemberName {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(name))
    }

    fn visit_str<E>(self, name: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(name.to_owned()))
    }

    fn visit_string<E>(self, name: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(name))
    }
}

struct RequestVisitor {
    operation: TagOperation,
}

impl<'de> Visitor<'de> for RequestVisitor {
    type Value = TagChange;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a {} request object", self.operation)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TagChange, A::Error> {
        let op = self.operation;
        let mut names = MemberNames::new();
        let mut key_id = None;
        let mut alias = None;
        let mut set = None;
        let mut remove = None;
        while let Some(name) = map.next_key_seed(MemberName)? {
            names.admit(name.clone())?;
            match (op, name.as_ref()) {
                (
                    TagOperation::CreateAlias
                    | TagOperation::UpdateAlias
                    | TagOperation::DeleteAlias,
                    "AliasName",
                ) => {
                    alias = Some(map.next_value::<String>()?);
                }
                (TagOperation::CreateAlias | TagOperation::UpdateAlias, "TargetKeyId") => {
                    key_id = Some(map.next_value::<String>()?);
                }
                (TagOperation::CreateAlias | TagOperation::UpdateAlias, _) => {
                    return Err(de::Error::custom(format_args!(
                        "unexpected member {name:?}; {op} takes exactly AliasName and TargetKeyId"
                    )));
                }
                (TagOperation::DeleteAlias, _) => {
                    return Err(de::Error::custom(format_args!(
                        "unexpected member {name:?}; DeleteAlias takes exactly AliasName"
                    )));
                }
                (
                    TagOperation::TagResource
                    | TagOperation::UntagResource
                    | TagOperation::ReplicateKey,
                    "KeyId",
                ) => {
                    key_id = Some(map.next_value::<String>()?);
                }
                (TagOperation::UntagResource, "TagKeys") => {
                    remove = Some(map.next_value_seed(StringList)?);
                }
                (TagOperation::UntagResource, _) => {
                    return Err(de::Error::custom(format_args!(
                        "unexpected member {name:?}; UntagResource takes exactly KeyId and TagKeys"
                    )));
                }
                (_, "Tags") => set = Some(map.next_value_seed(TagList)?),
                (TagOperation::TagResource, _) => {
                    return Err(de::Error::custom(format_args!(
                        "unexpected member {name:?}; TagResource takes exactly KeyId and Tags"
                    )));
                }
                // CreateKey and ReplicateKey carry members the proxy does not judge; they are
                // still checked for repeats and guarded (or look-alike) members at every depth.
                (TagOperation::CreateKey | TagOperation::ReplicateKey, _) => {
                    misplaced(&name, op.name())?;
                    map.next_value_seed(AnyStrict { operation: op })?;
                }
            }
        }
        let missing =
            |member: &str| de::Error::custom(format_args!("{op} requires the member {member:?}"));
        if op.has_key_id() && key_id.is_none() {
            return Err(missing("KeyId"));
        }
        if op.has_target_key_id() && key_id.is_none() {
            return Err(missing("TargetKeyId"));
        }
        if op.is_alias() && alias.is_none() {
            return Err(missing("AliasName"));
        }
        match op {
            TagOperation::TagResource if set.is_none() => return Err(missing("Tags")),
            TagOperation::UntagResource if remove.is_none() => return Err(missing("TagKeys")),
            _ => {}
        }
        Ok(TagChange {
            operation: op,
            key_id,
            alias,
            set: set.unwrap_or_default(),
            remove: remove.unwrap_or_default(),
        })
    }
}

/// `Tags`: a list of tag objects.
struct TagList;

impl<'de> DeserializeSeed<'de> for TagList {
    type Value = Vec<Tag>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Tag>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for TagList {
    type Value = Vec<Tag>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("Tags as a list of {\"TagKey\":…,\"TagValue\":…} objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Tag>, A::Error> {
        let mut tags = Vec::with_capacity(seq.size_hint().unwrap_or(4));
        while let Some(tag) = seq.next_element_seed(TagObject)? {
            tags.push(tag);
        }
        Ok(tags)
    }
}

/// One tag: exactly `TagKey` and `TagValue`, both strings.
struct TagObject;

impl<'de> DeserializeSeed<'de> for TagObject {
    type Value = Tag;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Tag, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TagObject {
    type Value = Tag;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a tag object with exactly the string members TagKey and TagValue")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tag, A::Error> {
        let mut names = MemberNames::new();
        let mut key = None;
        let mut value = None;
        while let Some(name) = map.next_key_seed(MemberName)? {
            names.admit(name.clone())?;
            match name.as_ref() {
                "TagKey" => key = Some(map.next_value::<String>()?),
                "TagValue" => value = Some(map.next_value::<String>()?),
                _ => {
                    return Err(de::Error::custom(format_args!(
                        "unexpected member {name:?} in a tag; a tag has exactly TagKey and TagValue"
                    )))
                }
            }
        }
        match (key, value) {
            (Some(key), Some(value)) => Ok(Tag { key, value }),
            (None, _) => Err(de::Error::custom("a tag has no TagKey")),
            (_, None) => Err(de::Error::custom("a tag has no TagValue")),
        }
    }
}

/// `TagKeys`: a list of strings.
struct StringList;

impl<'de> DeserializeSeed<'de> for StringList {
    type Value = Vec<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for StringList {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("TagKeys as a list of strings")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut keys = Vec::with_capacity(seq.size_hint().unwrap_or(4));
        while let Some(key) = seq.next_element::<String>()? {
            keys.push(key);
        }
        Ok(keys)
    }
}

/// Any JSON value the proxy does not read, checked for repeated, guarded and look-alike members.
#[derive(Clone, Copy)]
struct AnyStrict {
    operation: TagOperation,
}

impl<'de> DeserializeSeed<'de> for AnyStrict {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for AnyStrict {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut names = MemberNames::new();
        while let Some(name) = map.next_key_seed(MemberName)? {
            names.admit(name.clone())?;
            misplaced(&name, self.operation.name())?;
            map.next_value_seed(self)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TagOperation::*;

    fn tag(key: &str, value: &str) -> Tag {
        Tag {
            key: key.into(),
            value: value.into(),
        }
    }

    fn parse(op: TagOperation, body: &str) -> Result<TagChange, RequestError> {
        parse_tag_request(op, body.as_bytes())
    }

    fn rejected(op: TagOperation, body: &str) -> String {
        match parse(op, body) {
            Ok(change) => panic!("accepted {body}: {change:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn reads_a_tag_resource_request() {
        let change = parse(
            TagResource,
            r#"{"KeyId":"k1","Tags":[{"TagKey":"team:a","TagValue":"x"},{"TagValue":"","TagKey":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(change.key_id.as_deref(), Some("k1"));
        assert_eq!(change.set, vec![tag("team:a", "x"), tag("b", "")]);
        assert!(change.remove.is_empty());
    }

    #[test]
    fn reads_an_untag_resource_request() {
        let change = parse(UntagResource, r#"{"TagKeys":["a","b"],"KeyId":"k"}"#).unwrap();
        assert_eq!(change.remove, vec!["a", "b"]);
        assert!(change.set.is_empty());
    }

    #[test]
    fn create_key_tags_are_optional_and_other_members_are_not_read() {
        let change = parse(CreateKey, r#"{"Description":"d","KeyUsage":"ENCRYPT_DECRYPT","MultiRegion":true,"BypassPolicyLockoutSafetyCheck":false}"#).unwrap();
        assert_eq!(change.key_id, None);
        assert!(change.set.is_empty());
        let change = parse(CreateKey, "").unwrap();
        assert!(change.set.is_empty());
        let change = parse(
            CreateKey,
            r#"{"Policy":"{\"Statement\":[]}","Tags":[{"TagKey":"a","TagValue":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(change.set, vec![tag("a", "b")]);
    }

    #[test]
    fn replicate_key_reads_key_id_and_tags() {
        let change = parse(
            ReplicateKey,
            r#"{"KeyId":"mrk-1","ReplicaRegion":"eu-west-1","Tags":[{"TagKey":"a","TagValue":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(change.key_id.as_deref(), Some("mrk-1"));
        assert_eq!(change.set, vec![tag("a", "b")]);
        assert!(rejected(ReplicateKey, r#"{"ReplicaRegion":"eu-west-1"}"#).contains("KeyId"));
    }

    #[test]
    fn escapes_are_decoded_before_judging() {
        let change = parse(
            TagResource,
            r#"{"KeyId":"k","T\u0061gs":[{"TagKey":"Pro\u006aect","TagValue":"x"}]}"#,
        )
        .unwrap();
        assert_eq!(change.set, vec![tag("Project", "x")]);
    }

    #[test]
    fn refuses_repeated_members_at_every_depth() {
        let tags = r#"[{"TagKey":"a","TagValue":"b"}]"#;
        for body in [
            format!(r#"{{"KeyId":"k","Tags":{tags},"Tags":[]}}"#),
            format!(r#"{{"KeyId":"k","Tags":{tags},"T\u0061gs":[]}}"#),
            format!(r#"{{"KeyId":"k","KeyId":"j","Tags":{tags}}}"#),
            r#"{"KeyId":"k","Tags":[{"TagKey":"a","TagKey":"b","TagValue":"c"}]}"#.into(),
            r#"{"KeyId":"k","Tags":[{"TagKey":"a","TagValue":"b","TagValue":"c"}]}"#.into(),
        ] {
            assert!(rejected(TagResource, &body).contains("twice"), "{body}");
        }
        let deep = r#"{"Description":"d","X":{"a":[{"b":1,"b":2}]}}"#;
        assert!(rejected(CreateKey, deep).contains("twice"));
    }

    #[test]
    fn refuses_case_variants_of_tag_members() {
        for body in [
            r#"{"KeyId":"k","tags":[]}"#,
            r#"{"KeyId":"k","TAGS":[]}"#,
            r#"{"keyid":"k","Tags":[]}"#,
            r#"{"KeyId":"k","Tags":[{"tagKey":"a","TagValue":"b"}]}"#,
            r#"{"KeyId":"k","Tags":[{"TagKey":"a","TAGVALUE":"b"}]}"#,
            "{\"KeyId\":\"k\",\"Tag\u{17f}\":[]}",
        ] {
            assert!(rejected(TagResource, body).contains("look-alike"), "{body}");
        }
        assert!(
            rejected(CreateKey, r#"{"tags":[{"TagKey":"a","TagValue":"b"}]}"#)
                .contains("look-alike")
        );
        assert!(rejected(CreateKey, r#"{"Other":{"tagkeys":[]}}"#).contains("look-alike"));
        assert!(rejected(UntagResource, r#"{"KeyId":"k","tagKeys":["a"]}"#).contains("look-alike"));
    }

    #[test]
    fn refuses_look_alikes_of_tags_at_any_depth_in_create_key_and_replicate_key() {
        let look_alikes = [
            "tags",
            "Tags ",
            " Tags",
            "Ta gs",
            "Tags\\u0000",
            "T\\u200bags",
            "\\ufeffTags",
            "Tag\\u017f",
            "\\uff34\\uff41\\uff47\\uff53",
            "Ta\\u0301gs",
            "T\\u00e1gs",
            "Tags\\u00ad",
            "Tags\\u2028",
            "\\u0009Tags",
        ];
        for op in [CreateKey, ReplicateKey] {
            let key_id = if op == ReplicateKey {
                r#""KeyId":"mrk-1","ReplicaRegion":"eu-west-1","#
            } else {
                ""
            };
            for name in look_alikes {
                let tags = r#"[{"TagKey":"Project","TagValue":"x"}]"#;
                for body in [
                    format!(r#"{{{key_id}"{name}":{tags}}}"#),
                    format!(r#"{{{key_id}"Tags":[],"{name}":{tags}}}"#),
                    format!(r#"{{{key_id}"Description":"d","X":{{"{name}":{tags}}}}}"#),
                    format!(r#"{{{key_id}"X":[[{{"a":{{"{name}":1}}}}]]}}"#),
                ] {
                    assert!(rejected(op, &body).contains("look-alike"), "{op}: {body}");
                }
            }
        }
    }

    #[test]
    fn refuses_guarded_members_where_the_model_does_not_put_them() {
        for body in [
            r#"{"KeyId":"k"}"#,
            r#"{"TagKeys":["team:owner"]}"#,
            r#"{"TagKey":"a","TagValue":"b"}"#,
            r#"{"Other":{"TagKeys":[]}}"#,
            r#"{"Description":"d","X":{"Tags":[{"TagKey":"Project","TagValue":"x"}]}}"#,
            r#"{"X":[{"KeyId":"k"}]}"#,
        ] {
            assert!(
                rejected(CreateKey, body).contains("may not appear"),
                "{body}"
            );
        }
        assert!(rejected(
            ReplicateKey,
            r#"{"KeyId":"mrk-1","ReplicaRegion":"eu-west-1","TagKeys":["a"]}"#
        )
        .contains("may not appear"));
        // The members the model does put there are read.
        let change = parse(
            ReplicateKey,
            r#"{"KeyId":"mrk-1","ReplicaRegion":"eu-west-1","Tags":[{"TagKey":"a","TagValue":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(change.key_id.as_deref(), Some("mrk-1"));
        assert_eq!(change.set, vec![tag("a", "b")]);
        parse(CreateKey, r#"{"Description":"d","Policy":"{\"Tags\":1}"}"#).unwrap();
    }

    #[test]
    fn refuses_unexpected_members_and_wrong_types() {
        for body in [
            r#"{"KeyId":"k","Tags":[],"Extra":1}"#,
            r#"{"KeyId":"k","Tags":[{"TagKey":"a","TagValue":1}]}"#,
            r#"{"KeyId":"k","Tags":[{"TagKey":"a","TagValue":null}]}"#,
            r#"{"KeyId":"k","Tags":[{"TagKey":"a"}]}"#,
            r#"{"KeyId":"k","Tags":[{"TagKey":"a","TagValue":"b","Other":"c"}]}"#,
            r#"{"KeyId":"k","Tags":{"TagKey":"a","TagValue":"b"}}"#,
            r#"{"KeyId":"k","Tags":null}"#,
            r#"{"KeyId":1,"Tags":[]}"#,
            r#"{"Tags":[]}"#,
            r#"{"KeyId":"k"}"#,
            r#"[]"#,
            r#""x""#,
        ] {
            rejected(TagResource, body);
        }
        rejected(UntagResource, r#"{"KeyId":"k","TagKeys":[1]}"#);
        rejected(UntagResource, r#"{"KeyId":"k","TagKeys":["a"],"Tags":[]}"#);
        rejected(
            CreateKey,
            r#"{"Tags":[{"TagKey":"a","TagValue":"b"}],"Tags":[]}"#,
        );
    }

    #[test]
    fn refuses_repeated_tag_keys() {
        let e = parse(
            TagResource,
            r#"{"KeyId":"k","Tags":[{"TagKey":"a","TagValue":"1"},{"TagKey":"a","TagValue":"2"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e, RequestError::DuplicateTagKey("a".into()));
        let e = parse(UntagResource, r#"{"KeyId":"k","TagKeys":["a","a"]}"#).unwrap_err();
        assert_eq!(e, RequestError::DuplicateTagKey("a".into()));
    }

    #[test]
    fn refuses_malformed_bytes() {
        assert_eq!(
            parse_tag_request(TagResource, b"{\"KeyId\":\"k\xff\",\"Tags\":[]}"),
            Err(RequestError::NotUtf8)
        );
        assert_eq!(
            parse_tag_request(TagResource, b"\xEF\xBB\xBF{\"KeyId\":\"k\",\"Tags\":[]}"),
            Err(RequestError::ByteOrderMark)
        );
        rejected(TagResource, r#"{"KeyId":"k","Tags":[]}x"#);
        rejected(TagResource, r#"{"KeyId":"k","Tags":[]}{}"#);
        rejected(TagResource, r#"{"KeyId":"k\ud800","Tags":[]}"#);
        rejected(TagResource, "{\"KeyId\":\"k\u{1}\",\"Tags\":[]}");
        rejected(TagResource, " ");
        let deep = format!(
            r#"{{"Description":{}1{}}}"#,
            "[".repeat(1000),
            "]".repeat(1000)
        );
        assert!(rejected(CreateKey, &deep).contains("recursion"));
        // Whitespace around the object is JSON and reads the same everywhere.
        parse(TagResource, " {\"KeyId\":\"k\",\"Tags\":[]}\n").unwrap();
    }

    /// The definition `look_alike_of_guarded` implements with an ASCII fast path.
    fn look_alike_by_skeleton(name: &str) -> Option<&'static str> {
        let skeleton = skeleton(name);
        GUARDED_MEMBERS
            .into_iter()
            .find(|g| name != *g && skeleton.eq_ignore_ascii_case(g))
    }

    #[test]
    fn the_ascii_fast_path_finds_the_look_alikes_the_skeleton_finds() {
        // Every guarded member with one character replaced or inserted: a case variant, a
        // look-alike that folds onto ASCII, whitespace, a control, or a letter that does not.
        let swaps = [
            'a', 'A', 'e', 'E', 'g', 'G', 'i', 'I', 'k', 'K', 's', 'S', 'y', 'Y', '\u{17f}',
            '\u{212a}', '\u{131}', '\u{130}', '\u{e9}', '\u{3a3}', '_', ' ', '\t', '\0', '\u{b}',
            '\u{7f}', '\u{200b}', '\u{ff34}',
        ];
        let mut names: Vec<String> = vec![
            String::new(),
            "Tag".into(),
            "TagKeysX".into(),
            "Description".into(),
            "\u{17f}".into(),
            " \t T a g s \r\n".into(),
        ];
        for guarded in GUARDED_MEMBERS {
            names.push(guarded.into());
            names.push(guarded.to_uppercase());
            names.push(guarded.to_lowercase());
            let chars: Vec<char> = guarded.chars().collect();
            for i in 0..chars.len() {
                for swap in swaps {
                    let mut variant = chars.clone();
                    variant[i] = swap;
                    names.push(variant.iter().collect());
                    let mut inserted = chars.clone();
                    inserted.insert(i, swap);
                    names.push(inserted.into_iter().collect());
                }
            }
        }
        for name in &names {
            assert_eq!(
                look_alike_of_guarded(name),
                look_alike_by_skeleton(name),
                "{name:?}"
            );
        }
        assert_eq!(look_alike_of_guarded("Tag\u{17f}"), Some("Tags"));
        assert_eq!(look_alike_of_guarded("\u{212a}eyId"), Some("KeyId"));
        assert_eq!(look_alike_of_guarded("TAGKEY"), Some("TagKey"));
        assert_eq!(look_alike_of_guarded("Tag Key"), Some("TagKey"));
        assert_eq!(look_alike_of_guarded("TagKey"), None);
    }

    #[test]
    fn repeated_tag_keys_are_found_with_few_and_many_tags() {
        for count in [2, 15, 16, 17, 50] {
            let tags: Vec<String> = (0..count)
                .map(|i| format!(r#"{{"TagKey":"k{i}","TagValue":"v"}}"#))
                .collect();
            let body = format!(r#"{{"KeyId":"k","Tags":[{}]}}"#, tags.join(","));
            assert_eq!(parse(TagResource, &body).unwrap().set.len(), count);
            let body = format!(
                r#"{{"KeyId":"k","Tags":[{},{{"TagKey":"k{}","TagValue":"w"}}]}}"#,
                tags.join(","),
                count / 2
            );
            assert_eq!(
                parse(TagResource, &body).unwrap_err(),
                RequestError::DuplicateTagKey(format!("k{}", count / 2)),
                "{count} tags"
            );
        }
    }

    #[test]
    fn escaped_member_names_are_compared_decoded() {
        // Escaped names are copied, not borrowed: repeats and case variants are still seen.
        assert!(
            rejected(TagResource, r#"{"KeyId":"k","Tags":[],"\u0054ags":[]}"#).contains("twice")
        );
        assert!(rejected(TagResource, r#"{"KeyId":"k","\u0074ags":[]}"#).contains("letter case"));
        assert!(rejected(TagResource, r#"{"KeyId":"k","Tag\u017f":[]}"#).contains("letter case"));
    }

    #[test]
    fn reads_alias_requests() {
        let change = parse(
            CreateAlias,
            r#"{"AliasName":"alias/team-a","TargetKeyId":"1234abcd-12ab-34cd-56ef-1234567890ab"}"#,
        )
        .unwrap();
        assert_eq!(change.alias.as_deref(), Some("alias/team-a"));
        assert_eq!(
            change.key_id.as_deref(),
            Some("1234abcd-12ab-34cd-56ef-1234567890ab")
        );
        assert!(change.set.is_empty() && change.remove.is_empty());
        let change = parse(
            UpdateAlias,
            r#"{"TargetKeyId":"arn:aws:kms:us-east-1:111122223333:key/mrk-1","AliasName":"alias/x_y-z/1"}"#,
        )
        .unwrap();
        assert_eq!(
            change.key_id.as_deref(),
            Some("arn:aws:kms:us-east-1:111122223333:key/mrk-1")
        );
        let change = parse(DeleteAlias, r#"{"AliasName":"alias/\u0078"}"#).unwrap();
        assert_eq!(change.alias.as_deref(), Some("alias/x"));
        assert_eq!(change.key_id, None);
    }

    #[test]
    fn refuses_alias_bodies_another_reader_could_read_otherwise() {
        for (op, body, expected) in [
            (
                CreateAlias,
                r#"{"AliasName":"alias/a","AliasName":"alias/b","TargetKeyId":"k"}"#,
                "twice",
            ),
            (
                CreateAlias,
                r#"{"AliasName":"alias/a","aliasName":"alias/b","TargetKeyId":"k"}"#,
                "look-alike",
            ),
            (
                CreateAlias,
                r#"{"AliasName":"alias/a","TargetKeyID":"k"}"#,
                "look-alike",
            ),
            (
                UpdateAlias,
                r#"{"AliasName":"alias/a","TargetKeyId":"k","Target\u212aeyId":"j"}"#,
                "look-alike",
            ),
            (
                DeleteAlias,
                r#"{"AliasName":"alias/a","Alias Name":"alias/b"}"#,
                "look-alike",
            ),
            (
                DeleteAlias,
                r#"{"AliasName":"alias/a","TargetKeyId":"k"}"#,
                "exactly AliasName",
            ),
            (
                CreateAlias,
                r#"{"AliasName":"alias/a","TargetKeyId":"k","KeyId":"j"}"#,
                "unexpected member",
            ),
            (CreateAlias, r#"{"AliasName":"alias/a"}"#, "TargetKeyId"),
            (CreateAlias, r#"{"TargetKeyId":"k"}"#, "AliasName"),
            (DeleteAlias, "", "AliasName"),
            (
                CreateAlias,
                r#"{"AliasName":["alias/a"],"TargetKeyId":"k"}"#,
                "string",
            ),
            (
                CreateAlias,
                r#"{"AliasName":"alias/a","TargetKeyId":null}"#,
                "string",
            ),
            (CreateKey, r#"{"AliasName":"alias/a"}"#, "may not appear"),
        ] {
            let e = rejected(op, body);
            assert!(e.contains(expected), "{op} {body}: {e}");
        }
    }

    #[test]
    fn alias_names_follow_the_model_read_strictly() {
        for good in ["alias/a", "alias/Team-A_1/x", "alias/aws", "alias/awsx/y"] {
            check_alias_name(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        let long = format!("alias/{}", "a".repeat(250));
        check_alias_name(&long).unwrap();
        for (bad, expected) in [
            ("", "alias/"),
            ("alias/", "names no alias"),
            ("Alias/x", "does not start"),
            ("x", "does not start"),
            ("arn:aws:kms:us-east-1:111122223333:alias/x", "':'"),
            ("alias/a:b", "':'"),
            ("alias/a b", "' '"),
            ("alias/caf\u{e9}", "'\u{e9}'"),
            ("alias/a\u{0}", "'\\0'"),
            ("alias/aws/ebs", "reserved"),
            ("alias/AWS/ebs", "reserved"),
            ("alias/Aws/x", "reserved"),
        ] {
            let e = check_alias_name(bad).unwrap_err();
            assert!(e.contains(expected), "{bad:?}: {e}");
        }
        let too_long = format!("alias/{}", "a".repeat(251));
        assert!(check_alias_name(&too_long).unwrap_err().contains("256"));
        // Through the parser, the same rules refuse the body.
        for op in [CreateAlias, UpdateAlias] {
            let e = rejected(op, r#"{"AliasName":"alias/aws/ebs","TargetKeyId":"k"}"#);
            assert!(e.contains("reserved"), "{e}");
        }
        assert!(rejected(DeleteAlias, r#"{"AliasName":"alias/a:b"}"#).contains("':'"));
    }

    #[test]
    fn alias_targets_are_key_ids_or_key_arns_exactly() {
        for good in [
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "mrk-1234abcd12ab34cd56ef1234567890ab",
            "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/mrk-1",
        ] {
            check_target_key_id(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "",
            "alias/app",
            "ALIAS/app",
            "arn:aws:kms:us-east-1:111122223333:alias/app",
            " 1234abcd",
            "1234abcd\n",
            "key/1234abcd",
            "ARN:aws:kms:us-east-1:111122223333:key/1",
            "arn:aws:kms:us-east-1:111122223333:key/1:2",
            "arn:aws:kms:us-east-1:111122223333:key/a/b",
            "arn:aws:kms:us-east-1:111122223333:x:key/1",
            "arn:aws:kms:us-east-1:11112222333a:key/1",
            "arn:aws:iam::111122223333:key/1",
            "arn:aws:kms:us-east-1::key/1",
            "1234\u{212a}",
        ] {
            assert!(check_target_key_id(bad).is_err(), "{bad:?}");
        }
        let e = rejected(
            CreateAlias,
            r#"{"AliasName":"alias/a","TargetKeyId":"alias/other"}"#,
        );
        assert!(e.contains("is an alias"), "{e}");
    }

    /// The parser before the plain reader: the strict parser for every body (the oracle).
    fn strict_only(op: TagOperation, body: &[u8]) -> Result<TagChange, RequestError> {
        if body.starts_with(b"\xEF\xBB\xBF") {
            return Err(RequestError::ByteOrderMark);
        }
        let Ok(text) = std::str::from_utf8(body) else {
            return Err(RequestError::NotUtf8);
        };
        let text = if text.is_empty() { "{}" } else { text };
        checked(strict(op, text)?)
    }

    /// Random choices for the body generator, drawn in turn from a generated list.
    struct Dice<'a> {
        rolls: &'a [u32],
        next: usize,
    }

    impl Dice<'_> {
        fn roll(&mut self, n: u32) -> u32 {
            let r = self.rolls[self.next % self.rolls.len()];
            self.next += 1;
            // Mixed with the position, so that a short list does not repeat itself exactly.
            (r ^ (self.next as u32).wrapping_mul(0x9e37_79b9)) % n
        }

        fn pick<'s>(&mut self, from: &[&'s str]) -> &'s str {
            from[self.roll(from.len() as u32) as usize]
        }
    }

    /// The content of a JSON string (between its quotes): mostly plain, sometimes with escapes
    /// (of plain letters too), lone surrogates, raw controls, non-ASCII, quotes.
    fn string_content(d: &mut Dice) -> String {
        const PLAIN: [&str; 10] = ["a", "Z", "0", "7", ":", "/", "-", "_", "team", "alias/"];
        const ODD: [&str; 24] = [
            " ",
            "\\u00e9",
            "\\\"",
            "\\\\",
            "\\n",
            "\\u0001",
            "\\u0000",
            "\\ud800",
            "\\udc00x",
            "\\u0041",
            "\\ud83d\\udca1",
            "\\u00",
            "\\x",
            "\\/",
            "\\u017f",
            "\\t",
            "\u{1}",
            "\u{1f}",
            "\u{7f}",
            "é",
            "ſ",
            "\u{212a}",
            "💡",
            "\u{200b}",
        ];
        let mut out = String::new();
        for _ in 0..d.roll(6) {
            match d.roll(8) {
                0 => out.push_str(d.pick(&ODD)),
                _ => out.push_str(d.pick(&PLAIN)),
            }
        }
        out
    }

    /// A member name as JSON text: a guarded name, a look-alike of one (case, whitespace,
    /// controls, invisible characters, marks, confusables, escapes), or another name.
    fn member_name(d: &mut Dice) -> String {
        const OTHER: [&str; 8] = [
            "Description",
            "X",
            "Policy",
            "ReplicaRegion",
            "Tag",
            "TagKeysX",
            "a",
            "",
        ];
        const INSERTED: [&str; 14] = [
            " ", "\t", "\\t", "\\u0000", "\u{0}", "\\u200b", "\u{200b}", "\\ufeff", "\u{feff}",
            "\\u0301", "\u{301}", "\u{ad}", "\\u2028", "_",
        ];
        let base = if d.roll(4) == 0 {
            d.pick(&OTHER)
        } else {
            d.pick(&GUARDED_MEMBERS)
        };
        let mut chars: Vec<String> = base.chars().map(String::from).collect();
        for _ in 0..d.roll(3) {
            let at = d.roll(chars.len() as u32 + 1) as usize;
            match d.roll(7) {
                // Another letter case.
                0 | 1 if at < chars.len() => {
                    let c = chars[at].clone();
                    chars[at] = if c == c.to_lowercase() {
                        c.to_uppercase()
                    } else {
                        c.to_lowercase()
                    };
                }
                // A character that folds onto the one it replaces (or with a mark after it).
                2 if at < chars.len() => {
                    chars[at] = match chars[at].as_str() {
                        "s" => "ſ".into(),
                        "K" | "k" => "\\u212a".into(),
                        "T" => "\\uff34".into(),
                        "a" => "á".into(),
                        "i" | "I" => "ı".into(),
                        other => format!("{other}\u{301}"),
                    };
                }
                // The same character, escaped.
                3 if at < chars.len() => {
                    let c = chars[at].chars().next().unwrap();
                    chars[at] = format!("\\u{:04x}", u32::from(c));
                }
                4 => chars.truncate(at),
                _ => chars.insert(at, d.pick(&INSERTED).to_owned()),
            }
        }
        chars.concat()
    }

    /// Any JSON value, as text.
    fn any_value(d: &mut Dice, depth: u32) -> String {
        let atom = |d: &mut Dice| match d.roll(7) {
            0 => "1".to_owned(),
            1 => "-0.5e3".to_owned(),
            2 => "true".to_owned(),
            3 => "null".to_owned(),
            4 => "1e999".to_owned(),
            _ => format!("\"{}\"", string_content(d)),
        };
        if depth == 0 {
            return atom(d);
        }
        match d.roll(9) {
            0 => {
                let n = d.roll(4);
                let items: Vec<String> = (0..n).map(|_| any_value(d, depth - 1)).collect();
                format!("[{}]", items.join(","))
            }
            1 => {
                let n = d.roll(4);
                let members: Vec<(String, String)> = (0..n)
                    .map(|_| (member_name(d), any_value(d, depth - 1)))
                    .collect();
                object(d, &members)
            }
            2 => format!("{}1{}", "[".repeat(130), "]".repeat(130)),
            3 => tags(d),
            _ => atom(d),
        }
    }

    /// JSON whitespace between tokens, sometimes something that is not.
    fn space(d: &mut Dice) -> &'static str {
        match d.roll(24) {
            0 => " ",
            1 => "\n\t",
            2 => "\r\n ",
            3 => "\u{b}",
            4 => "\u{a0}",
            _ => "",
        }
    }

    fn object(d: &mut Dice, members: &[(String, String)]) -> String {
        let mut out = String::from("{");
        for (i, (name, value)) in members.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(space(d));
            out.push('"');
            out.push_str(name);
            out.push('"');
            out.push_str(space(d));
            out.push(':');
            out.push_str(space(d));
            out.push_str(value);
            out.push_str(space(d));
        }
        out.push('}');
        out
    }

    /// Members in their canonical shape, then mutations (each with chance `1/rate`): renamed,
    /// retyped, repeated, dropped, swapped, added.
    fn mutated(d: &mut Dice, mut members: Vec<(String, String)>, rate: u32) -> String {
        while d.roll(rate) == 0 {
            mutate(d, &mut members);
        }
        object(d, &members)
    }

    fn mutate(d: &mut Dice, members: &mut Vec<(String, String)>) {
        let n = members.len() as u32;
        let i = d.roll(n.max(1)) as usize;
        match d.roll(6) {
            0 if n > 0 => members[i].0 = member_name(d),
            1 if n > 0 => members[i].1 = any_value(d, 2),
            2 if n > 0 => members.insert(d.roll(n + 1) as usize, members[i].clone()),
            3 if n > 0 => drop(members.remove(i)),
            4 if n > 1 => members.swap(i, d.roll(n) as usize),
            _ => members.insert(d.roll(n + 1) as usize, (member_name(d), any_value(d, 1))),
        }
    }

    /// A canonical body for `op` with exactly one defect, at the top or in one tag: the bodies
    /// the plain reader must hand on although they are nearly plain.
    fn body_with_one_defect(op: TagOperation, d: &mut Dice) -> String {
        let plain = |d: &mut Dice| format!("\"{}\"", d.pick(&["a", "b", "k", "alias/a", "x:y"]));
        let tag = |d: &mut Dice| {
            vec![
                ("TagKey".to_owned(), plain(d)),
                ("TagValue".to_owned(), plain(d)),
            ]
        };
        let n = 1 + d.roll(3) as usize;
        let defect_in = d.roll(n as u32 + 1) as usize;
        let tag_list = |d: &mut Dice| {
            let items: Vec<String> = (0..n)
                .map(|i| {
                    let mut members = tag(d);
                    if i == defect_in {
                        mutate(d, &mut members);
                    }
                    object(d, &members)
                })
                .collect();
            format!("[{}]", items.join(","))
        };
        let m = |name: &str, value: String| (name.to_owned(), value);
        let mut members = match op {
            TagResource | CreateKey | ReplicateKey => {
                vec![m("KeyId", plain(d)), m("Tags", tag_list(d))]
            }
            UntagResource => vec![
                m("KeyId", plain(d)),
                m("TagKeys", format!("[{}]", plain(d))),
            ],
            CreateAlias | UpdateAlias => {
                vec![m("AliasName", plain(d)), m("TargetKeyId", plain(d))]
            }
            DeleteAlias => vec![m("AliasName", plain(d))],
        };
        if defect_in == n {
            mutate(d, &mut members);
        }
        object(d, &members)
    }

    fn string_value(d: &mut Dice) -> String {
        match d.roll(2) {
            0 => format!("\"{}\"", d.pick(&["a", "b", "Project", "alias/a"])),
            _ => format!("\"{}\"", string_content(d)),
        }
    }

    fn tags(d: &mut Dice) -> String {
        let n = d.roll(4);
        let items: Vec<String> = (0..n)
            .map(|_| {
                let members = vec![
                    ("TagKey".to_owned(), string_value(d)),
                    ("TagValue".to_owned(), string_value(d)),
                ];
                mutated(d, members, 4)
            })
            .collect();
        format!("[{}]", items.join(&format!(",{}", space(d))))
    }

    /// A body for `op`: its members, usually in their canonical shape, often mutated.
    fn body_for(op: TagOperation, d: &mut Dice) -> String {
        let m = |name: &str, value: String| (name.to_owned(), value);
        let mut members = match op {
            TagResource => vec![m("KeyId", string_value(d)), m("Tags", tags(d))],
            UntagResource => {
                let keys: Vec<String> = (0..d.roll(4)).map(|_| string_value(d)).collect();
                vec![
                    m("KeyId", string_value(d)),
                    m("TagKeys", format!("[{}]", keys.join(","))),
                ]
            }
            CreateAlias | UpdateAlias => vec![
                m("AliasName", string_value(d)),
                m("TargetKeyId", string_value(d)),
            ],
            DeleteAlias => vec![m("AliasName", string_value(d))],
            CreateKey => vec![m("Description", string_value(d)), m("Tags", tags(d))],
            ReplicateKey => vec![
                m("KeyId", string_value(d)),
                m("ReplicaRegion", string_value(d)),
                m("Tags", tags(d)),
            ],
        };
        if d.roll(2) == 0 {
            members.reverse();
        }
        let mut body = format!("{}{}", space(d), mutated(d, members, 3));
        match d.roll(12) {
            0 => body.push_str(d.pick(&["x", "{}", "]", ",", "\"\""])),
            1 => body.push_str(space(d)),
            2 => body.clear(),
            _ => {}
        }
        body
    }

    #[test]
    fn the_plain_reader_and_the_strict_parser_read_every_body_alike() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        use std::cell::Cell;
        let mut runner = TestRunner::new(Config {
            cases: 4096,
            ..Config::default()
        });
        let (plain_read, compared) = (Cell::new(0u32), Cell::new(0u32));
        let ops = proptest::sample::select(TagOperation::ALL.to_vec());
        let rolls = proptest::collection::vec(any::<u32>(), 1..200);
        runner
            .run(&(ops, rolls), |(op, rolls)| {
                let mut dice = Dice {
                    rolls: &rolls,
                    next: 0,
                };
                let body = if dice.roll(3) == 0 {
                    body_with_one_defect(op, &mut dice)
                } else {
                    body_for(op, &mut dice)
                };
                // Each body is read as every operation: one's shape is an odd body to another.
                for read_as in TagOperation::ALL {
                    let text = if body.is_empty() { "{}" } else { &body };
                    if let Some(change) = plain::read(read_as, text) {
                        plain_read.set(plain_read.get() + u32::from(read_as == op));
                        prop_assert_eq!(Ok(change), strict(read_as, text), "{}", body);
                    }
                    prop_assert_eq!(
                        parse_tag_request(read_as, body.as_bytes()),
                        strict_only(read_as, body.as_bytes()),
                        "{} read as {}",
                        body,
                        read_as
                    );
                    compared.set(compared.get() + 1);
                }
                Ok(())
            })
            .unwrap();
        // The generator must reach the plain reader often, or the comparison proves little.
        // (About 18 % of the bodies are, read as their own operation.)
        let (plain_read, compared) = (plain_read.get(), compared.get());
        assert!(
            plain_read * 10 > compared / 7,
            "{plain_read} of {} bodies in the plain shape",
            compared / 7
        );
    }

    #[test]
    fn sdk_bodies_are_read_in_the_plain_shape() {
        for (op, body) in [
            (
                TagResource,
                r#"{"KeyId":"arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab","Tags":[{"TagKey":"team:owner","TagValue":"payments"},{"TagKey":"cost:center","TagValue":"4711"}]}"#,
            ),
            (TagResource, " {\"Tags\": [ ], \"KeyId\" : \"k\"}\n"),
            (UntagResource, r#"{"KeyId":"k","TagKeys":["a","b"]}"#),
            (UntagResource, r#"{"TagKeys":[],"KeyId":"k"}"#),
            (CreateAlias, r#"{"AliasName":"alias/a","TargetKeyId":"k"}"#),
            (UpdateAlias, r#"{"TargetKeyId":"k","AliasName":"alias/a"}"#),
            (DeleteAlias, "{\"AliasName\":\"alias/caf\u{e9}\"}"),
        ] {
            let change = plain::read(op, body).unwrap_or_else(|| panic!("{op} {body}"));
            assert_eq!(Ok(change), strict(op, body), "{op} {body}");
        }
        // Escapes, other members, missing ones and the operations with members the proxy does
        // not read go to the strict parser.
        for (op, body) in [
            (
                TagResource,
                r#"{"KeyId":"k","Tags":[{"TagKey":"Pro\u006aect","TagValue":"x"}]}"#,
            ),
            (TagResource, r#"{"KeyId":"k","Tags":[],"tags":[]}"#),
            (TagResource, r#"{"KeyId":"k","Tags":[],"Tags":[]}"#),
            (TagResource, r#"{"KeyId":"k"}"#),
            (TagResource, r#"{"KeyId":"k","Tags":[{"TagKey":"a"}]}"#),
            (TagResource, r#"{"KeyId":"k","Tags":[]} x"#),
            (CreateKey, r#"{"Tags":[]}"#),
            (ReplicateKey, r#"{"KeyId":"k","ReplicaRegion":"r"}"#),
            (DeleteAlias, "{\"AliasName\":\"alias/\u{1}\"}"),
        ] {
            assert_eq!(plain::read(op, body), None, "{op} {body}");
        }
    }

    #[test]
    fn the_ascii_look_alike_check_agrees_with_the_skeleton_on_generated_names() {
        use proptest::prelude::*;
        use proptest::test_runner::TestRunner;
        // ASCII names near the guarded ones: case changes, whitespace and controls inserted,
        // letters dropped or doubled; the JSON escapes of `member_name` are left as text.
        let near = proptest::collection::vec(any::<u32>(), 1..40).prop_map(|rolls| {
            let mut d = Dice {
                rolls: &rolls,
                next: 0,
            };
            member_name(&mut d)
        });
        let ascii = proptest::string::string_regex(
            r"[ \t\r\n\x0b\x00\x1fTtAaGgKkEeYySsIiDdVvLlUuNnMmRr_-]{0,14}",
        )
        .unwrap();
        let mut runner = TestRunner::deterministic();
        runner
            .run(&prop_oneof![near, ascii], |name| {
                prop_assert_eq!(
                    look_alike_of_guarded(&name),
                    look_alike_by_skeleton(&name),
                    "{:?}",
                    name
                );
                Ok(())
            })
            .unwrap();
        // The fast path relies on this: no guarded name is a look-alike of another.
        for g in GUARDED_MEMBERS {
            assert_eq!(look_alike_by_skeleton(g), None, "{g}");
        }
    }

    #[test]
    fn a_wide_object_is_still_checked_for_repeats() {
        let mut body = String::from("{\"Description\":\"d\",\"X\":{");
        for i in 0..100 {
            body.push_str(&format!("\"m{i}\":1,"));
        }
        body.push_str("\"m7\":2}}");
        assert!(rejected(CreateKey, &body).contains("twice"));
    }
}
