//! The two glob dialects of the configuration.
//!
//! Host globs (`allowed_hosts`, `tunnel_hosts`): `*` stands for exactly one DNS label, so
//! `kms.*.amazonaws.com` matches `kms.us-east-1.amazonaws.com` but not
//! `kms.evil.com.x.amazonaws.com`. Key globs (`key_ids`): `*` stands for any run of characters,
//! ARNs being colon- and slash-separated. Both compare ignoring ASCII case.

/// The host name of a `host[:port]` authority, IPv6 brackets kept.
pub fn host_name(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.split_inclusive(']').next().unwrap_or(authority);
    }
    // `split(':').next()`, without setting up a searcher.
    match authority.bytes().position(|b| b == b':') {
        Some(at) => &authority[..at],
        None => authority,
    }
}

/// A host-name glob; `*` matches one DNS label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostGlob {
    labels: Vec<String>,
    text: String,
}

impl HostGlob {
    pub fn new(pattern: &str) -> Result<HostGlob, String> {
        if pattern.is_empty() {
            return Err("a host glob may not be empty".into());
        }
        let lower = pattern.to_ascii_lowercase();
        let labels: Vec<String> = lower.split('.').map(str::to_owned).collect();
        for label in &labels {
            if label.is_empty() {
                return Err(format!("{pattern:?} has an empty DNS label"));
            }
            if label != "*" && label.contains('*') {
                return Err(format!(
                    "{pattern:?}: `*` must stand for a whole DNS label, as in kms.*.amazonaws.com"
                ));
            }
            if !label
                .bytes()
                .all(|b| b == b'*' || b == b'-' || b.is_ascii_alphanumeric())
            {
                return Err(format!(
                    "{pattern:?} has a character that is not allowed in a host name"
                ));
            }
        }
        Ok(HostGlob {
            labels,
            text: pattern.to_owned(),
        })
    }

    /// Whether `host` (a bare host name, no port) matches.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        // The labels of `host` split at `.` by hand (`str::split` sets up a searcher per call).
        let mut rest = Some(host.as_bytes());
        for label in &self.labels {
            let Some(piece) = rest else {
                return false;
            };
            let part = match piece.iter().position(|&b| b == b'.') {
                Some(at) => {
                    rest = Some(&piece[at + 1..]);
                    &piece[..at]
                }
                None => {
                    rest = None;
                    piece
                }
            };
            let ok = if label.as_bytes() == b"*" {
                // `*` is one DNS label: letters, digits and `-`, nothing a URL parser could read
                // as something else (`x@sts` in `kms.x@sts.amazonaws.com`).
                !part.is_empty() && part.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            } else {
                part.eq_ignore_ascii_case(label.as_bytes())
            };
            if !ok {
                return false;
            }
        }
        rest.is_none()
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The glob's labels, lowercase; `*` for a wildcard label.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Whether the glob has no `*`: it names one host.
    pub fn is_literal(&self) -> bool {
        self.labels.iter().all(|l| l != "*")
    }
}

/// A glob over key ids and ARNs; `*` matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyGlob {
    pattern: String,
}

impl KeyGlob {
    pub fn new(pattern: &str) -> Result<KeyGlob, String> {
        if pattern.is_empty() {
            return Err("a key_ids glob may not be empty".into());
        }
        Ok(KeyGlob {
            pattern: pattern.to_owned(),
        })
    }

    pub fn matches(&self, text: &str) -> bool {
        // Key ids and ARNs compare case-insensitively.
        star_match(self.pattern.as_bytes(), text.as_bytes(), |p, t| {
            p.eq_ignore_ascii_case(&t)
        })
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }
}

/// `*` (any run of bytes, the empty one included) matching, the other bytes compared with
/// `same`, with one back-tracking point: linear in practice, never exponential.
pub fn star_match(pattern: &[u8], text: &[u8], same: impl Fn(u8, u8) -> bool) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && same(pattern[p], text[t]) {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `HostGlob::matches` as it was, with `str::split`.
    fn matches_by_split(glob: &HostGlob, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        let mut parts = host.split('.');
        for label in &glob.labels {
            match parts.next() {
                Some(part) if label == "*" => {
                    let is_label = !part.is_empty()
                        && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                    if !is_label {
                        return false;
                    }
                }
                Some(part) if part.eq_ignore_ascii_case(label) => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }

    proptest::proptest! {
        #[test]
        fn host_globs_match_what_they_matched_with_str_split(
            host in proptest::string::string_regex("(kms|KMS|x|)([.]{1,2}(us-east-1|a@b|\\*|))*(amazonaws|api)?[.]?(com|aws|)[.]?").unwrap()
        ) {
            let authority = format!("{host}:443");
            proptest::prop_assert_eq!(host_name(&authority), authority.split(':').next().unwrap());
            proptest::prop_assert_eq!(host_name(&host), host.split(':').next().unwrap());
            for glob in ["kms.*.amazonaws.com", "kms.*.api.aws", "*.*", "kms", "kms.us-east-1.amazonaws.com"] {
                let glob = HostGlob::new(glob).unwrap();
                proptest::prop_assert_eq!(glob.matches(&host), matches_by_split(&glob, &host), "{} {:?}", glob.as_str(), host);
            }
        }
    }

    #[test]
    fn host_names_drop_the_port() {
        assert_eq!(
            host_name("kms.us-east-1.amazonaws.com"),
            "kms.us-east-1.amazonaws.com"
        );
        assert_eq!(
            host_name("kms.us-east-1.amazonaws.com:443"),
            "kms.us-east-1.amazonaws.com"
        );
        assert_eq!(host_name("[::1]:8080"), "[::1]");
    }

    #[test]
    fn host_star_is_one_label() {
        let g = HostGlob::new("kms.*.amazonaws.com").unwrap();
        assert!(g.matches("kms.us-east-1.amazonaws.com"));
        assert!(g.matches("KMS.US-EAST-1.AMAZONAWS.COM"));
        assert!(g.matches("kms.us-east-1.amazonaws.com."));
        assert!(!g.matches("kms.amazonaws.com"));
        assert!(!g.matches("kms..amazonaws.com"));
        assert!(!g.matches("kms.a.b.amazonaws.com"));
        assert!(!g.matches("kms.us-east-1.amazonaws.com.evil.com"));
        assert!(!g.matches("xkms.us-east-1.amazonaws.com"));
        assert!(!g.matches("kms.x@sts.amazonaws.com"));
        assert!(!g.matches("kms.x:1.amazonaws.com"));
        assert!(!g.matches("kms.x_y.amazonaws.com"));
    }

    #[test]
    fn host_globs_are_validated() {
        assert!(HostGlob::new("kms.*").is_ok());
        assert!(HostGlob::new("kms*.amazonaws.com").is_err());
        assert!(HostGlob::new("kms..com").is_err());
        assert!(HostGlob::new("").is_err());
        assert!(HostGlob::new("kms/x.com").is_err());
    }

    #[test]
    fn key_star_is_any_run() {
        let g = KeyGlob::new("arn:aws:kms:*:111122223333:key/*").unwrap();
        assert!(g.matches("arn:aws:kms:us-east-1:111122223333:key/1234abcd"));
        assert!(g.matches("arn:aws:kms:eu-west-1:111122223333:key/"));
        assert!(!g.matches("arn:aws:kms:us-east-1:444455556666:key/1234abcd"));
        assert!(KeyGlob::new("*").unwrap().matches("anything"));
        assert!(KeyGlob::new("a*b*c").unwrap().matches("aXXbYYbZc"));
        assert!(!KeyGlob::new("a*b*c").unwrap().matches("aXXbYY"));
        assert!(KeyGlob::new("mrk-*").unwrap().matches("MRK-1234"));
    }

    /// `*` matching by its definition, recursively (exponential: short inputs only).
    fn star_match_by_definition(p: &[u8], t: &[u8], same: &dyn Fn(u8, u8) -> bool) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => {
                (0..=t.len()).any(|n| star_match_by_definition(rest, &t[n..], same))
            }
            Some((&c, rest)) => t
                .split_first()
                .is_some_and(|(&u, t)| same(c, u) && star_match_by_definition(rest, t, same)),
        }
    }

    proptest::proptest! {
        #[test]
        fn star_match_is_its_definition(pattern in "[aB*]{0,7}", text in "[abAB]{0,9}") {
            let exact = |p: u8, t: u8| p == t;
            let folded = |p: u8, t: u8| p.eq_ignore_ascii_case(&t);
            let (p, t) = (pattern.as_bytes(), text.as_bytes());
            proptest::prop_assert_eq!(star_match(p, t, exact), star_match_by_definition(p, t, &exact));
            proptest::prop_assert_eq!(star_match(p, t, folded), star_match_by_definition(p, t, &folded));
        }
    }
}
