//! Splitting on an ASCII separator byte.
//!
//! `str::split` and `split_once` with a `char` set up a general searcher on every call, which
//! costs more than the search itself for the short pieces of a request head (Authorization
//! parameters, a credential scope); `memchr` finds the byte with little set-up and scans long
//! pieces (a signature) a vector at a time. Splitting at an ASCII byte always lands on a `char`
//! boundary, so the pieces are exactly the ones `str::split` yields.

/// `s.split_once(sep)` for an ASCII `sep`.
pub fn split_once_byte(s: &str, sep: u8) -> Option<(&str, &str)> {
    debug_assert!(sep.is_ascii());
    let at = memchr::memchr(sep, s.as_bytes())?;
    Some((&s[..at], &s[at + 1..]))
}

/// `s.split(sep)` for an ASCII `sep`.
pub fn split_byte(s: &str, sep: u8) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let piece = rest?;
        match split_once_byte(piece, sep) {
            Some((head, tail)) => {
                rest = Some(tail);
                Some(head)
            }
            None => {
                rest = None;
                Some(piece)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_as_str_split_does() {
        for s in [
            "",
            ",",
            ",,",
            "a",
            "a,",
            ",a",
            "a,b",
            "a,,b",
            " a , b ,",
            "ä,ö,ü",
            "\u{1f600},x,",
            "Credential=A/B/C, SignedHeaders=host;x, Signature=00",
        ] {
            for sep in [b',', b'/', b'=', b' '] {
                let ours: Vec<&str> = split_byte(s, sep).collect();
                let std: Vec<&str> = s.split(char::from(sep)).collect();
                assert_eq!(ours, std, "{s:?} on {sep}");
                assert_eq!(
                    split_once_byte(s, sep),
                    s.split_once(char::from(sep)),
                    "{s:?} on {sep}"
                );
            }
        }
    }
}
