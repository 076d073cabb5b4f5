//! Patterns over the caller's workload identity: the globs of `callers` and `exempt_callers`,
//! and the `caller` template and `value` template of a `caller-value` rule.
//!
//! An identity is a SPIFFE ID (`spiffe://example.org/ns/payments/sa/api`) or, for a certificate
//! without one, a DNS name (`api.payments.svc`). A pattern is of the same kind, cut the same way:
//!
//! - a SPIFFE pattern is `spiffe://` (lower case), the trust domain written out (no wildcard), and
//!   one or more path segments; a DNS pattern is labels between dots;
//! - a segment (label) is literal text, which may hold `*`: any run of characters **within the
//!   segment** (possibly empty; never a `/` or a `.` between labels), or `{name}`, a whole segment
//!   captured under a name (only in a `caller-value` rule's `caller`), or `**`: one or more whole
//!   segments, only as the last segment of a SPIFFE pattern or the first label of a DNS one;
//! - SPIFFE IDs compare byte for byte (the spec makes the trust domain lower case and the path
//!   case-sensitive); DNS names compare ignoring ASCII case, as DNS does (and captures are lower
//!   case).
//!
//! Only a well-formed identity matches anything, and well-formed means exactly what the listener
//! takes from a certificate: the one check of [`crate::identity::check_caller`] (`spiffe://`, a
//! trust domain of `[a-z0-9._-]`, a non-empty path of non-empty segments of `[A-Za-z0-9._-]`,
//! none `.` or `..`, at most 2048 bytes; or a DNS name of labels of 1 to 63 bytes of
//! `[A-Za-z0-9-]`, at most 253 bytes). Percent-encoding, `..`, upper case in the trust domain, a
//! query, a `*` in a certificate's DNS name: none of these can make a caller match a pattern
//! written for another. The listener refuses such certificates anyway; this is the policy's own
//! guard, and a policy test case's `caller` is held to the same check.

use std::fmt;

use crate::identity::{
    check_caller, dns_label_byte, spiffe_segment_byte, trust_domain_byte, CallerKind as Kind,
    MAX_DNS_LABEL_BYTES, MAX_TRUST_DOMAIN_BYTES,
};

/// The longest identity that can match (the SPIFFE spec's bound for IDs).
pub const MAX_IDENTITY_BYTES: usize = crate::identity::MAX_CALLER_BYTES;
const SCHEME: &str = "spiffe://";

/// A caller identity, read once per decision.
#[derive(Debug, Clone)]
pub struct Caller<'a> {
    /// As the connection's certificate gave it.
    pub raw: &'a str,
    /// `None` when it is not well-formed: it matches no pattern.
    parts: Option<Parts>,
}

/// A well-formed identity cut into segments: a SPIFFE ID's path segments in order, a DNS name's
/// labels from the last (so that `**` always stands at the end).
#[derive(Debug, Clone)]
struct Parts {
    kind: Kind,
    /// The trust domain (SPIFFE); empty for a DNS name.
    trust_domain: String,
    segments: Vec<String>,
}

impl<'a> Caller<'a> {
    pub fn new(raw: &'a str) -> Caller<'a> {
        Caller {
            raw,
            parts: parse_identity(raw),
        }
    }

    /// Whether the identity is one a pattern can match.
    pub fn is_well_formed(&self) -> bool {
        self.parts.is_some()
    }
}

/// Whether `id` is a well-formed identity: one the listener takes from a certificate (see the
/// module's documentation).
pub fn well_formed(id: &str) -> bool {
    check_caller(id).is_ok()
}

/// A well-formed identity cut into segments; `None` for any other.
fn parse_identity(id: &str) -> Option<Parts> {
    match check_caller(id).ok()? {
        Kind::Spiffe => {
            let rest = id.strip_prefix(SCHEME)?;
            let (trust_domain, path) = rest.split_once('/')?;
            Some(Parts {
                kind: Kind::Spiffe,
                trust_domain: trust_domain.to_owned(),
                segments: path.split('/').map(str::to_owned).collect(),
            })
        }
        // DNS names compare ignoring ASCII case: cut from the last label, in lower case.
        Kind::Dns => Some(Parts {
            kind: Kind::Dns,
            trust_domain: String::new(),
            segments: id
                .to_ascii_lowercase()
                .split('.')
                .rev()
                .map(str::to_owned)
                .collect(),
        }),
    }
}

/// One segment of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Literal text, `*` = any run of characters inside the segment.
    Glob(String),
    /// A whole segment, captured under the name with this index.
    Capture(usize),
    /// One or more whole segments (only at the end).
    Rest,
}

/// A caller glob (`callers`, `exempt_callers`) or a `caller-value` template (with `{name}`s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerPattern {
    text: String,
    kind: Kind,
    trust_domain: String,
    /// In identity order (a DNS pattern's labels from the last).
    segments: Vec<Segment>,
    /// The names of the captures, in order of appearance.
    names: Vec<String>,
}

/// What a template captured from a caller: one value per name.
pub type Captures = Vec<String>;

fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks the braces of a pattern or template: balanced, not nested, not spanning `sep`, each
/// holding a name. Returns a message for the first fault.
fn check_braces(text: &str, seps: &[char]) -> Result<(), String> {
    let mut open: Option<usize> = None;
    for (i, c) in text.char_indices() {
        match (c, open) {
            ('{', None) => open = Some(i),
            ('{', Some(_)) => return Err(format!("{text:?}: `{{` inside `{{…}}`; braces do not nest")),
            ('}', None) => {
                return Err(format!(
                    "{text:?}: `}}` without its `{{`; a name is written {{name}}"
                ))
            }
            ('}', Some(start)) => {
                let name = &text[start + 1..i];
                if !valid_name(name) {
                    return Err(format!(
                        "{text:?}: {{{name}}} is not a name; use letters, digits, `_` or `-`, starting with a letter, as in {{team}}"
                    ));
                }
                open = None;
            }
            (c, Some(_)) if seps.contains(&c) => {
                return Err(format!(
                    "{text:?}: `{{…}}` may not span segments; {{name}} stands for one whole segment, as in spiffe://example.org/ns/{{team}}/sa/*"
                ))
            }
            _ => {}
        }
    }
    match open {
        Some(_) => Err(format!("{text:?}: `{{` without its `}}`")),
        None => Ok(()),
    }
}

impl CallerPattern {
    /// A glob of `callers` or `exempt_callers`: no `{name}`s.
    pub fn glob(text: &str) -> Result<CallerPattern, String> {
        Self::new(text, false)
    }

    /// The `caller` template of a `caller-value` rule: `{name}`s allowed, each a whole segment.
    pub fn template(text: &str) -> Result<CallerPattern, String> {
        Self::new(text, true)
    }

    fn new(text: &str, captures: bool) -> Result<CallerPattern, String> {
        if text.is_empty() {
            return Err("a caller pattern may not be empty".into());
        }
        if text.len() > MAX_IDENTITY_BYTES {
            return Err(format!(
                "a caller pattern is at most {MAX_IDENTITY_BYTES} bytes, as SPIFFE IDs are"
            ));
        }
        if let Some(rest) = text.strip_prefix(SCHEME) {
            check_braces(rest, &['/'])?;
            let Some((trust_domain, path)) = rest.split_once('/') else {
                return Err(format!(
                    "{text:?}: a SPIFFE pattern needs a path after the trust domain, as in spiffe://example.org/ns/*/sa/* (or spiffe://example.org/** for every workload of the trust domain)"
                ));
            };
            if trust_domain.is_empty()
                || trust_domain.len() > MAX_TRUST_DOMAIN_BYTES
                || !trust_domain.bytes().all(trust_domain_byte)
            {
                return Err(format!(
                    "{text:?}: the trust domain is written out in lower case (letters, digits, `.`, `-`, `_`), without `*` or {{…}}, at most 255 bytes, as in spiffe://example.org/…"
                ));
            }
            let raw: Vec<&str> = path.split('/').collect();
            let mut pattern = CallerPattern {
                text: text.to_owned(),
                kind: Kind::Spiffe,
                trust_domain: trust_domain.to_owned(),
                segments: Vec::new(),
                names: Vec::new(),
            };
            let last = raw.len() - 1;
            for (i, s) in raw.iter().enumerate() {
                pattern.push_segment(s, i == last, captures, spiffe_segment_byte)?;
            }
            return Ok(pattern);
        }
        if text.contains(':') || text.contains('/') {
            let hint = if text
                .get(..7)
                .is_some_and(|p| p.eq_ignore_ascii_case("spiffe:"))
            {
                "write the scheme as spiffe:// in lower case"
            } else {
                "a caller pattern is a SPIFFE ID (spiffe://trust-domain/path) or a DNS name"
            };
            return Err(format!("{text:?}: {hint}"));
        }
        check_braces(text, &['.'])?;
        let raw: Vec<&str> = text.split('.').rev().collect();
        let mut pattern = CallerPattern {
            text: text.to_owned(),
            kind: Kind::Dns,
            trust_domain: String::new(),
            segments: Vec::new(),
            names: Vec::new(),
        };
        let last = raw.len() - 1;
        for (i, s) in raw.iter().enumerate() {
            pattern.push_segment(s, i == last, captures, dns_label_byte)?;
        }
        // The labels were read from the last: the names go back in the order written.
        let n = pattern.names.len();
        pattern.names.reverse();
        for segment in &mut pattern.segments {
            if let Segment::Capture(i) = segment {
                *i = n - 1 - *i;
            }
        }
        Ok(pattern)
    }

    fn push_segment(
        &mut self,
        s: &str,
        last: bool,
        captures: bool,
        allowed: fn(u8) -> bool,
    ) -> Result<(), String> {
        let text = &self.text;
        let (unit, place) = match self.kind {
            Kind::Spiffe => ("segment", "the last segment"),
            Kind::Dns => ("label", "the first label"),
        };
        if s == "**" {
            if !last {
                return Err(format!(
                    "{text:?}: `**` (one or more whole {unit}s) may only be {place}"
                ));
            }
            self.segments.push(Segment::Rest);
            return Ok(());
        }
        if let Some(name) = s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            if !name.contains(['{', '}']) {
                if !captures {
                    return Err(format!(
                        "{text:?}: {{{name}}} names a part of the caller only in a caller-value rule's `caller`; here write * for any {unit}"
                    ));
                }
                if self.names.iter().any(|n| n == name) {
                    return Err(format!(
                        "{text:?}: {{{name}}} appears twice; give each captured {unit} its own name"
                    ));
                }
                self.names.push(name.to_owned());
                self.segments.push(Segment::Capture(self.names.len() - 1));
                return Ok(());
            }
        }
        if s.contains(['{', '}']) {
            return Err(format!(
                "{text:?}: {{name}} stands for a whole {unit}, as in spiffe://example.org/ns/{{team}}/sa/*; it cannot be part of {s:?}"
            ));
        }
        if s.is_empty() {
            return Err(format!("{text:?} has an empty {unit}"));
        }
        if s == "." || s == ".." {
            return Err(format!(
                "{text:?}: a {unit} may not be `.` or `..` (SPIFFE IDs have none)"
            ));
        }
        if s.contains("**") {
            return Err(format!(
                "{text:?}: `**` stands alone as a whole {unit}; inside {s:?} write one `*`"
            ));
        }
        if let Some(c) = s.bytes().find(|&b| b != b'*' && !allowed(b)) {
            let c = char::from(c);
            return Err(format!(
                "{text:?}: {c:?} cannot appear in a {unit} of a caller identity (SPIFFE path segments hold letters, digits, `.`, `-`, `_`; DNS labels letters, digits, `-`)"
            ));
        }
        // A DNS label the listener would refuse for its length can match nothing.
        if self.kind == Kind::Dns && s.bytes().filter(|&b| b != b'*').count() > MAX_DNS_LABEL_BYTES
        {
            return Err(format!(
                "{text:?}: a DNS label is at most {MAX_DNS_LABEL_BYTES} bytes, so {s:?} matches no caller"
            ));
        }
        // DNS names compare ignoring ASCII case: both sides lower case.
        self.segments.push(Segment::Glob(match self.kind {
            Kind::Spiffe => s.to_owned(),
            Kind::Dns => s.to_ascii_lowercase(),
        }));
        Ok(())
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The names of its captures.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether the caller matches.
    pub fn matches(&self, caller: &Caller) -> bool {
        self.captures(caller).is_some()
    }

    /// What the pattern captures from the caller, when it matches: one value per name.
    pub fn captures(&self, caller: &Caller) -> Option<Captures> {
        let parts = caller.parts.as_ref()?;
        if parts.kind != self.kind || parts.trust_domain != self.trust_domain {
            return None;
        }
        let mut captured = vec![String::new(); self.names.len()];
        let mut ids = parts.segments.iter();
        for segment in &self.segments {
            match segment {
                Segment::Rest => return ids.next().map(|_| captured),
                Segment::Capture(i) => captured[*i] = ids.next()?.clone(),
                Segment::Glob(glob) => {
                    let id = ids.next()?;
                    // `*` within one segment (it holds no separator), byte for byte.
                    if !crate::glob::star_match(glob.as_bytes(), id.as_bytes(), |p, t| p == t) {
                        return None;
                    }
                }
            }
        }
        ids.next().is_none().then_some(captured)
    }
}

impl fmt::Display for CallerPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One piece of a value template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// One or more characters.
    Star,
    /// The value captured under the name with this index.
    Name(usize),
}

/// The `value` of a `caller-value` rule: text, `{name}`s of the `caller` template, and `*`
/// (one or more characters). Values compare exactly (tag values are case-sensitive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueTemplate {
    text: String,
    pieces: Vec<Piece>,
}

impl ValueTemplate {
    /// Reads `text` over the capture names `names` (of the rule's `caller` template).
    pub fn new(text: &str, names: &[String]) -> Result<ValueTemplate, String> {
        if text.is_empty() {
            return Err("a value template may not be empty; write {name} for a part of the caller, as in \"{team}\"".into());
        }
        check_braces(text, &[])?;
        let mut pieces = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('{') {
                let (name, tail) = after.split_once('}').expect("braces are balanced");
                let Some(i) = names.iter().position(|n| n == name) else {
                    let known = if names.is_empty() {
                        "the caller template names none: write one as {name} in `caller`, as in spiffe://example.org/ns/{team}/sa/*".to_owned()
                    } else {
                        format!(
                            "the caller template names {}",
                            names
                                .iter()
                                .map(|n| format!("{{{n}}}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    };
                    return Err(format!(
                        "{text:?}: {{{name}}} is not a name of `caller`; {known}"
                    ));
                };
                pieces.push(Piece::Name(i));
                rest = tail;
            } else if let Some(tail) = rest.strip_prefix('*') {
                if tail.starts_with('*') {
                    return Err(format!(
                        "{text:?}: write one `*` (it already stands for one or more characters)"
                    ));
                }
                pieces.push(Piece::Star);
                rest = tail;
            } else {
                let end = rest.find(['{', '*']).unwrap_or(rest.len());
                pieces.push(Piece::Text(rest[..end].to_owned()));
                rest = &rest[end..];
            }
        }
        Ok(ValueTemplate {
            text: text.to_owned(),
            pieces,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the template holds a `*`.
    pub fn has_star(&self) -> bool {
        self.pieces.contains(&Piece::Star)
    }

    /// The template with the captures filled in, `*`s kept: what the caller may set.
    pub fn render(&self, captures: &[String]) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Star => out.push('*'),
                Piece::Name(i) => out.push_str(&captures[*i]),
            }
        }
        out
    }

    /// Whether `value` is one the template denotes with these captures: equal, byte for byte,
    /// where each `*` stands for one or more characters.
    pub fn allows(&self, captures: &[String], value: &str) -> bool {
        // The literal runs between the stars, captures filled in.
        let mut runs: Vec<String> = vec![String::new()];
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => runs.last_mut().expect("a run").push_str(t),
                Piece::Name(i) => runs.last_mut().expect("a run").push_str(&captures[*i]),
                Piece::Star => runs.push(String::new()),
            }
        }
        starred_match(&runs, value.as_bytes())
    }
}

/// Whether `text` is `runs[0]`, then one or more bytes, then `runs[1]`, …, then `runs[n]`.
/// Byte-wise is character-wise here: every run is whole UTF-8, so it can only be found at a
/// character boundary, and a star between two boundaries covers whole characters.
fn starred_match(runs: &[String], text: &[u8]) -> bool {
    let (first, rest) = runs.split_first().expect("at least one run");
    let Some((last, middle)) = rest.split_last() else {
        return text == first.as_bytes();
    };
    let (first, last) = (first.as_bytes(), last.as_bytes());
    if text.len() < first.len() + last.len() + rest.len()
        || !text.starts_with(first)
        || !text.ends_with(last)
    {
        return false;
    }
    // Each star takes at least one byte; the leftmost place of each middle run leaves the most
    // room for the rest.
    let end = text.len() - last.len();
    let mut at = first.len();
    for run in middle {
        let run = run.as_bytes();
        let from = at + 1;
        if from + run.len() > end {
            return false;
        }
        match find(&text[from..end], run) {
            Some(i) => at = from + i + run.len(),
            None => return false,
        }
    }
    at < end
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests;
