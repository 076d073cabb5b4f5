//! Text as answers, records and logs show it: cut to a bound, and marked as cut with its
//! length, so that a request with enormous keys or values makes a bounded answer and record.

use std::borrow::Cow;

/// Where `s` is cut to show at most `max` characters: the part shown and the whole length in
/// characters; `None` when `s` is short enough to show whole.
fn cut(s: &str, max: usize) -> Option<(&str, usize)> {
    // A string of at most `max` bytes has at most `max` characters: no need to count them (the
    // common case, on every tag change's record).
    if s.len() <= max {
        return None;
    }
    let (at, _) = s.char_indices().nth(max)?;
    Some((&s[..at], s.chars().count()))
}

/// `s`, or its first `max` characters marked as cut, with its length.
pub fn bounded(s: &str, max: usize) -> Cow<'_, str> {
    match cut(s, max) {
        None => Cow::Borrowed(s),
        Some((shown, chars)) => Cow::Owned(format!("{shown}…({chars} characters)")),
    }
}

/// [`bounded`], the part shown quoted like `{:?}`.
pub fn bounded_quoted(s: &str, max: usize) -> String {
    match cut(s, max) {
        None => format!("{s:?}"),
        Some((shown, chars)) => format!("{shown:?}…({chars} characters)"),
    }
}

/// Appends `n`'s decimal digits (a JSON number, an audit line's `seq`), without `core::fmt`.
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_are_cut_and_marked() {
        let long = "k".repeat(1000);
        assert_eq!(
            bounded(&long, 256).chars().count(),
            256 + "…(1000 characters)".chars().count()
        );
        assert_eq!(bounded("short", 256), "short");
        assert_eq!(bounded_quoted("short", 256), "\"short\"");
        assert_eq!(bounded_quoted(&long, 3), "\"kkk\"…(1000 characters)");
    }

    proptest::proptest! {
        #[test]
        fn decimals_are_what_display_writes(n in proptest::prelude::any::<u64>()) {
            let mut out = b"x".to_vec();
            push_decimal(&mut out, n);
            proptest::prop_assert_eq!(out, format!("x{n}").into_bytes());
        }
    }
}
