//! One protocol: a KMS request body is awsJson 1.1, and nothing another protocol's reader could
//! take for an operation.
//!
//! The proxy streams the bodies of operations that change no tags without parsing them, so what
//! it checks here is checked byte by byte as the body passes, in constant memory:
//!
//! - A non-empty body starts (after JSON whitespace) with `{`: awsJson input is an object.
//! - No form parameter named `Action` (the Query protocol's operation) appears anywhere. A form
//!   reader splits a body into pairs at `&` (and, in older readers, `;`) and each pair into a
//!   name and a value at the first `=`, then percent-decodes the name (`+` is a space). Some
//!   stand-ins read a form from any body, JSON or not (moto's `parse_qsl(body)`), and then take
//!   the operation from `Action` before they look at `X-Amz-Target`; so
//!   `{"Plaintext":"…&Action=TagResource&…"}` behind `TrentService.Encrypt` would be a
//!   TagResource to them. The check is stricter than any one reader: the name is compared
//!   ignoring ASCII case and surrounding whitespace, and an encoded `&`, `;` or `=` (`%26`,
//!   `%3B`, `%3D`) counts as a separator too, for readers that decode before they split.
//!
//! A JSON body of a real SDK has no `&` or `;` outside string values, and base64 has neither, so
//! the common body is scanned by `memchr` alone.

use super::classify::Unreadable;

/// The streaming check of one request body. Feed it every chunk in order: a chunk is refused
/// as soon as the body shows another protocol's shape (nothing at the end can be found that was
/// not found before it, so there is no end check).
#[derive(Debug, Clone, Default)]
pub struct BodyCheck {
    /// Whether a byte other than JSON whitespace has been seen.
    started: bool,
    /// Where in the current form pair's name the scan stands.
    name: NameState,
    /// A percent-escape in progress: the bytes after `%` seen so far (0, 1 or 2 hex digits).
    escape: Escape,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum NameState {
    /// At the start of a pair's name: only whitespace so far.
    #[default]
    Leading,
    /// This many letters of `action` matched.
    Letters(u8),
    /// All of `action`, then whitespace.
    Trailing,
    /// The name is not `action`, or the pair's value has begun: wait for the next separator.
    Dead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Escape {
    #[default]
    None,
    /// `%` seen.
    Percent,
    /// `%` and one hex digit seen.
    One(u8),
}

const ACTION: &[u8; 6] = b"action";

impl BodyCheck {
    pub fn new() -> BodyCheck {
        BodyCheck::default()
    }

    /// Checks the next chunk of the body.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), Unreadable> {
        if !self.started {
            let Some(at) = chunk
                .iter()
                .position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
            else {
                // Whitespace so far: still a possible start of a form pair's name too.
                return Ok(());
            };
            self.started = true;
            if chunk[at] != b'{' {
                // A body that is not a JSON object is another protocol's.
                return Err(Unreadable::BodyNotJson(first_char(&chunk[at..])));
            }
            // `{` ends the first pair's name as `action`: nothing more to match there.
            self.name = NameState::Dead;
            chunk = &chunk[at + 1..];
        }
        while !chunk.is_empty() {
            if self.name == NameState::Dead && self.escape == Escape::None {
                // Only a separator (raw, or the start of an encoded one) can matter now.
                match memchr::memchr3(b'&', b';', b'%', chunk) {
                    None => return Ok(()),
                    Some(at) => {
                        let byte = chunk[at];
                        chunk = &chunk[at + 1..];
                        if byte == b'%' {
                            self.escape = Escape::Percent;
                        } else {
                            self.name = NameState::Leading;
                        }
                        continue;
                    }
                }
            }
            let byte = chunk[0];
            chunk = &chunk[1..];
            self.step(byte)?;
        }
        Ok(())
    }

    /// One byte of the body, while a name is being matched or an escape is open.
    fn step(&mut self, byte: u8) -> Result<(), Unreadable> {
        let decoded = match self.escape {
            Escape::Percent => {
                if let Some(hi) = hex(byte) {
                    self.escape = Escape::One(hi);
                    return Ok(());
                }
                // Not an escape: `%` stays `%` (as readers leave it), so the name is not
                // `action`; this byte is read as itself.
                self.escape = Escape::None;
                self.name = NameState::Dead;
                return self.step(byte);
            }
            Escape::One(hi) => {
                self.escape = Escape::None;
                let Some(lo) = hex(byte) else {
                    self.name = NameState::Dead;
                    return self.step(byte);
                };
                // Decoded `&`, `;` and `=` act as the raw ones, for readers that decode first.
                match hi << 4 | lo {
                    b'&' | b';' => {
                        self.name = NameState::Leading;
                        return Ok(());
                    }
                    b'=' => return self.end_of_name(),
                    decoded => decoded,
                }
            }
            Escape::None => match byte {
                b'%' => {
                    self.escape = Escape::Percent;
                    return Ok(());
                }
                b'&' | b';' => {
                    self.name = NameState::Leading;
                    return Ok(());
                }
                b'=' => return self.end_of_name(),
                b'+' => b' ',
                other => other,
            },
        };
        self.name = match (self.name, decoded) {
            (NameState::Leading, c) if is_space(c) => NameState::Leading,
            (NameState::Letters(6) | NameState::Trailing, c) if is_space(c) => NameState::Trailing,
            (NameState::Leading, c) if c.eq_ignore_ascii_case(&ACTION[0]) => NameState::Letters(1),
            (NameState::Letters(n), c) if n < 6 && c.eq_ignore_ascii_case(&ACTION[n as usize]) => {
                NameState::Letters(n + 1)
            }
            _ => NameState::Dead,
        };
        Ok(())
    }

    /// An `=` (raw or decoded) ends the current pair's name.
    fn end_of_name(&mut self) -> Result<(), Unreadable> {
        if matches!(self.name, NameState::Letters(6) | NameState::Trailing) {
            return Err(Unreadable::ActionParameter);
        }
        self.name = NameState::Dead;
        Ok(())
    }
}

/// ASCII whitespace as the most lenient trimming reader sees it (Python's `str.strip`).
fn is_space(byte: u8) -> bool {
    matches!(
        byte,
        b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0x1c..=0x1f
    )
}

fn hex(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).map(|d| d as u8)
}

fn first_char(bytes: &[u8]) -> char {
    let end = bytes.len().min(4);
    match std::str::from_utf8(&bytes[..end]) {
        Ok(s) => s.chars().next().unwrap_or('\u{fffd}'),
        Err(e) if e.valid_up_to() > 0 => std::str::from_utf8(&bytes[..e.valid_up_to()])
            .ok()
            .and_then(|s| s.chars().next())
            .unwrap_or('\u{fffd}'),
        Err(_) => char::from(bytes[0]),
    }
}

/// Checks a whole body at once.
pub fn check_body(body: &[u8]) -> Result<(), Unreadable> {
    BodyCheck::new().feed(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(body: &str) -> bool {
        check_body(body.as_bytes()).is_err()
    }

    #[test]
    fn sdk_bodies_pass() {
        for body in [
            "",
            "{}",
            " \r\n{}",
            r#"{"KeyId":"1234abcd-12ab-34cd-56ef-1234567890ab","Plaintext":"aGVsbG8+Lz0="}"#,
            r#"{"KeyId":"k","EncryptionContext":{"purpose":"transaction=1","a":"b&c"}}"#,
            r#"{"Description":"action = go"}"#,
            r#"{"x":"&actions=1"}"#,
            r#"{"x":"&xaction=1"}"#,
            r#"{"x":"&act ion=1"}"#,
            r#"{"x":"&Action"}"#,
        ] {
            assert!(check_body(body.as_bytes()).is_ok(), "{body}");
        }
    }

    #[test]
    fn form_shaped_action_parameters_are_refused() {
        for body in [
            r#"{"Plaintext":"&Action=TagResource&"}"#,
            r#"{"x":";action=TagResource"}"#,
            r#"{"x":"& ACTION =TagResource"}"#,
            r#"{"x":"&+Action+=TagResource"}"#,
            r#"{"x":"&%41ction=TagResource"}"#,
            r#"{"x":"&%61%63%74%69%6F%6E=x"}"#,
            r#"{"x":"%26Action=TagResource"}"#,
            r#"{"x":"&Action%3DTagResource"}"#,
            r#"{"x":"%3bAction%3dTagResource"}"#,
            r#"{"x":"&Action="}"#,
            r#"{"a":"=&Action=1"}"#,
        ] {
            assert!(refused(body), "{body}");
        }
    }

    #[test]
    fn other_protocols_bodies_are_refused() {
        assert_eq!(
            check_body(b"Action=TagResource&Version=2014-11-01"),
            Err(Unreadable::BodyNotJson('A'))
        );
        for body in ["[]", "\"x\"", "null", "\u{feff}{}", "\x00"] {
            assert!(refused(body), "{body:?}");
        }
        assert!(check_body(&[0xa1, 0x61]).is_err(), "CBOR");
    }

    /// Whatever the chunking, a body gets the same verdict as whole.
    #[test]
    fn chunking_never_changes_the_verdict() {
        use proptest::prelude::*;
        let pieces = proptest::sample::select(vec![
            "&", ";", "=", "%", "%2", "%26", "%3D", "%3d", "%41", "a", "A", "ction", "ction=", "+",
            " ", "x", "{", "\"", "Action", "%zz",
        ]);
        let bodies = (
            proptest::collection::vec(pieces, 0..12),
            proptest::collection::vec(0usize..64, 0..6),
        );
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::with_cases(2000)
        });
        runner
            .run(&bodies, |(pieces, cuts)| {
                let body = format!("{{{}", pieces.concat());
                let whole = check_body(body.as_bytes());
                let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (body.len() + 1)).collect();
                cuts.sort_unstable();
                let mut check = BodyCheck::new();
                let mut at = 0;
                let mut chunked = Ok(());
                for cut in cuts.into_iter().chain([body.len()]) {
                    if chunked.is_ok() {
                        chunked = check.feed(&body.as_bytes()[at..cut]);
                    }
                    at = cut;
                }
                prop_assert_eq!(whole, chunked, "{}", body);
                Ok(())
            })
            .unwrap();
    }

    /// The check finds exactly what two reference form readers find (split at separators, name up
    /// to the first `=`, trim, compare ignoring case): one that decodes each name, and one that
    /// decodes the whole body first.
    #[test]
    fn agrees_with_a_reference_form_reader() {
        use proptest::prelude::*;
        fn decode(s: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            let mut i = 0;
            while i < s.len() {
                let escape = (s[i] == b'%' && i + 2 < s.len())
                    .then(|| Some(hex(s[i + 1])? << 4 | hex(s[i + 2])?))
                    .flatten();
                match (s[i], escape) {
                    (_, Some(byte)) => {
                        out.push(byte);
                        i += 3;
                    }
                    (b'+', _) => {
                        out.push(b' ');
                        i += 1;
                    }
                    (b, _) => {
                        out.push(b);
                        i += 1;
                    }
                }
            }
            out
        }
        /// Pairs at `&`/`;`, the name up to the first `=`, decoded when `decode_names`.
        fn has_action(body: &[u8], decode_names: bool) -> bool {
            body.split(|b| *b == b'&' || *b == b';').any(|pair| {
                let Some(eq) = pair.iter().position(|b| *b == b'=') else {
                    return false;
                };
                let name = if decode_names {
                    decode(&pair[..eq])
                } else {
                    pair[..eq].to_vec()
                };
                let start = name
                    .iter()
                    .position(|b| !is_space(*b))
                    .unwrap_or(name.len());
                let end = name
                    .iter()
                    .rposition(|b| !is_space(*b))
                    .map_or(start, |e| e + 1);
                name[start..end].eq_ignore_ascii_case(b"action")
            })
        }
        let pieces = proptest::sample::select(vec![
            "&", ";", "=", "%", "%26", "%3D", "%3b", "%41", "a", "A", "ction", "+", " ", "x", "\"",
            "%zz", "%4", "Action", "&Action", "action", "%2541", "%20", "\t",
        ]);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::with_cases(4000)
        });
        let hits = std::cell::Cell::new(0u32);
        runner
            .run(&proptest::collection::vec(pieces, 0..10), |pieces| {
                let body = format!("{{{}", pieces.concat());
                // A reader that splits, then decodes names; and one that decodes, then splits.
                let reference = has_action(body.as_bytes(), true)
                    || has_action(&decode(body.as_bytes()), false);
                let ours = check_body(body.as_bytes()).is_err();
                prop_assert_eq!(reference, ours, "{}", body);
                if reference {
                    hits.set(hits.get() + 1);
                }
                Ok(())
            })
            .unwrap();
        // About 2% of the bodies carry one (some 80 of 4000).
        assert!(
            hits.get() > 40,
            "only {} bodies with an Action parameter",
            hits.get()
        );
    }
}
