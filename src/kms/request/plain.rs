//! The plain shape of a tag or alias body, read in one pass without serde.
//!
//! Almost every TagResource, UntagResource and alias request an SDK sends is one JSON object
//! holding exactly the members its operation takes, each once, with strings that hold no escape
//! and no control character. A body of exactly that shape means the same to every JSON reader:
//! there is nothing to decode, no name to fold, no repeat, nothing nested deeper than a tag. This
//! reader takes only such bodies and reads them straight into a [`TagChange`]; for anything else
//! (another member, a repeat, an escape, a number, a missing member, CreateKey and ReplicateKey,
//! which carry members the proxy does not read) it answers `None` and the strict parser
//! (`super::strict`) reads the body and, if it refuses it, says why. So the plain reader decides
//! nothing the strict parser would decide otherwise: a property test in `super` holds the two
//! readings to the same result on generated bodies.
//!
//! The checks after parsing (repeated tag keys, the alias name, the target key id) are made on
//! either reading's result by `super::parse_tag_request`.

use super::{Tag, TagChange};
use crate::kms::operation::TagOperation;

/// The body read in the plain shape, or `None` when it is not in it.
pub(super) fn read(operation: TagOperation, text: &str) -> Option<TagChange> {
    let mut r = Reader {
        text,
        bytes: text.as_bytes(),
        at: 0,
    };
    let mut key_id = None;
    let mut alias = None;
    let mut set = None;
    let mut remove = None;
    r.byte(b'{')?;
    if r.peek()? != b'}' {
        // The names the operation takes; any other (or one spelt with an escape) is not plain.
        let names: &[&str] = match operation {
            TagOperation::TagResource => &["KeyId", "Tags"],
            TagOperation::UntagResource => &["KeyId", "TagKeys"],
            TagOperation::CreateAlias | TagOperation::UpdateAlias => &["AliasName", "TargetKeyId"],
            TagOperation::DeleteAlias => &["AliasName"],
            TagOperation::CreateKey | TagOperation::ReplicateKey => return None,
        };
        loop {
            let name = r.name(names)?;
            r.byte(b':')?;
            let slot_taken = match (operation, name) {
                (TagOperation::TagResource | TagOperation::UntagResource, "KeyId")
                | (TagOperation::CreateAlias | TagOperation::UpdateAlias, "TargetKeyId") => {
                    key_id.replace(r.string()?).is_some()
                }
                (
                    TagOperation::CreateAlias
                    | TagOperation::UpdateAlias
                    | TagOperation::DeleteAlias,
                    "AliasName",
                ) => alias.replace(r.string()?).is_some(),
                (TagOperation::TagResource, "Tags") => set.replace(r.tags()?).is_some(),
                (TagOperation::UntagResource, "TagKeys") => remove.replace(r.strings()?).is_some(),
                _ => return None,
            };
            if slot_taken {
                return None;
            }
            if !r.more(b'}')? {
                break;
            }
        }
    } else {
        r.at += 1;
    }
    if !r.rest_is_whitespace() {
        return None;
    }
    let required = match operation {
        TagOperation::TagResource => key_id.is_some() && set.is_some(),
        TagOperation::UntagResource => key_id.is_some() && remove.is_some(),
        TagOperation::CreateAlias | TagOperation::UpdateAlias => {
            key_id.is_some() && alias.is_some()
        }
        TagOperation::DeleteAlias => alias.is_some(),
        TagOperation::CreateKey | TagOperation::ReplicateKey => false,
    };
    if !required {
        return None;
    }
    Some(TagChange {
        operation,
        key_id: key_id.map(str::to_owned),
        alias: alias.map(str::to_owned),
        set: set.unwrap_or_default(),
        remove: remove.unwrap_or_default(),
    })
}

/// A cursor over the body. Every method answers `None` for anything outside the plain shape.
struct Reader<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

/// The length of a string's content up to its closing quote, or `None` when an escape (which
/// serde_json decodes: read here it would be compared undecoded), a control character (which
/// serde_json refuses) or the end of the body comes first. Eight bytes at a time.
fn string_length(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    let mut at = 0;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let w = u64::from_le_bytes(chunk.try_into().ok()?);
        // A byte below 0x20, or equal to `"` or `\` (zero after the xor), sets its high bit
        // here. A later byte may be flagged falsely (the borrow runs upwards), never an earlier
        // one: the lowest flag is the first such byte.
        let below = |w: u64, n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & HIGH;
        let special = below(w, 0x20)
            | below(w ^ (ONES * u64::from(b'"')), 1)
            | below(w ^ (ONES * u64::from(b'\\')), 1);
        if special != 0 {
            at += (special.trailing_zeros() / 8) as usize;
            return (bytes[at] == b'"').then_some(at);
        }
        at += 8;
    }
    loop {
        match *bytes.get(at)? {
            b'"' => return Some(at),
            b'\\' => return None,
            b if b < 0x20 => return None,
            _ => at += 1,
        }
    }
}

/// JSON's whitespace, the only bytes allowed between tokens (as serde_json skips them).
fn is_json_space(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\r' | b'\t')
}

impl<'a> Reader<'a> {
    /// The next byte after whitespace, not taken.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&b) = self.bytes.get(self.at) {
            if !is_json_space(b) {
                return Some(b);
            }
            self.at += 1;
        }
        None
    }

    /// Takes `want` after whitespace.
    fn byte(&mut self, want: u8) -> Option<()> {
        (self.peek()? == want).then(|| self.at += 1)
    }

    /// After a member or an element: `,` (another follows: true) or `close` (the end: false).
    fn more(&mut self, close: u8) -> Option<bool> {
        let b = self.peek()?;
        self.at += 1;
        match b {
            b',' => Some(true),
            b if b == close => Some(false),
            _ => None,
        }
    }

    /// A string holding no escape and no control character, borrowed from the body.
    fn string(&mut self) -> Option<&'a str> {
        self.byte(b'"')?;
        let start = self.at;
        let end = start + string_length(&self.bytes[start..])?;
        // `start` and `end` sit next to ASCII quotes: both are character boundaries.
        let s = self.text.get(start..end)?;
        self.at = end + 1;
        Some(s)
    }

    /// A member name that is exactly one of `names` (no escape, nothing else between the
    /// quotes), compared in place rather than scanned for its end first.
    fn name(&mut self, names: &[&'static str]) -> Option<&'static str> {
        self.byte(b'"')?;
        let rest = &self.bytes[self.at..];
        let name = names.iter().find(|name| {
            rest.starts_with(name.as_bytes()) && rest.get(name.len()) == Some(&b'"')
        })?;
        self.at += name.len() + 1;
        Some(name)
    }

    /// `[` strings `]`.
    fn strings(&mut self) -> Option<Vec<String>> {
        self.array(|r| r.string().map(str::to_owned))
    }

    /// `[` tag objects `]`: each exactly `TagKey` and `TagValue`, strings, once each.
    fn tags(&mut self) -> Option<Vec<Tag>> {
        self.array(Reader::tag)
    }

    /// `[` elements read by `element`, separated by `,` `]`.
    fn array<T>(&mut self, mut element: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        self.byte(b'[')?;
        let mut out = Vec::with_capacity(4);
        if self.peek()? == b']' {
            self.at += 1;
            return Some(out);
        }
        loop {
            out.push(element(self)?);
            if !self.more(b']')? {
                return Some(out);
            }
        }
    }

    fn tag(&mut self) -> Option<Tag> {
        self.byte(b'{')?;
        let (mut key, mut value) = (None, None);
        loop {
            let name = self.name(&["TagKey", "TagValue"])?;
            self.byte(b':')?;
            let slot = match name {
                "TagKey" => &mut key,
                "TagValue" => &mut value,
                _ => return None,
            };
            if slot.replace(self.string()?).is_some() {
                return None;
            }
            if !self.more(b'}')? {
                break;
            }
        }
        Some(Tag {
            key: key?.to_owned(),
            value: value?.to_owned(),
        })
    }

    /// Whether only whitespace follows.
    fn rest_is_whitespace(&self) -> bool {
        self.bytes[self.at..].iter().all(|&b| is_json_space(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `string_length` a byte at a time.
    fn string_length_bytewise(bytes: &[u8]) -> Option<usize> {
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b'"' => return Some(i),
                b'\\' => return None,
                b if b < 0x20 => return None,
                _ => {}
            }
        }
        None
    }

    proptest! {
        #[test]
        fn string_length_finds_what_a_byte_loop_finds(
            bytes in proptest::collection::vec(
                prop_oneof![
                    8 => 0x20u8..0x7f,
                    1 => Just(b'"'),
                    1 => Just(b'\\'),
                    1 => 0u8..0x20,
                    1 => 0x7fu8..=0xff,
                    1 => Just(0x21u8),
                    1 => Just(0x5du8),
                ],
                0..40,
            )
        ) {
            prop_assert_eq!(string_length(&bytes), string_length_bytewise(&bytes));
        }
    }
}
