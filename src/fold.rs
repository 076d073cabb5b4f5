//! Case-insensitive comparison the way AWS compares tag keys in IAM conditions.
//!
//! IAM matches the key in `aws:ResourceTag/<key>` ignoring case, and the services behind it are
//! Java, whose `equalsIgnoreCase` also equates `ſ` with `s`, `ı` and `İ` with `i`, and `K` (Kelvin)
//! with `k`. A forbidden `Kind` must therefore also stop `Kind`. Folding errs on the side of calling
//! more keys equal: every rule that uses it becomes stricter, never looser.

/// The case fold of `s`: each character upper-cased, then lower-cased.
pub fn fold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        push_folded(&mut out, c);
    }
    out
}

fn push_folded(out: &mut String, c: char) {
    if c.is_ascii() {
        out.push(c.to_ascii_lowercase());
    } else if c == '\u{130}' {
        // `İ` lower-cases to `i` + combining dot; Java's per-character fold gives plain `i`.
        out.push('i');
    } else {
        for upper in c.to_uppercase() {
            out.extend(upper.to_lowercase());
        }
    }
}

/// Whether `a` and `b` are equal ignoring case, as [`fold`] defines it.
pub fn eq_ignore_case(a: &str, b: &str) -> bool {
    if a.is_ascii() && b.is_ascii() {
        return a.eq_ignore_ascii_case(b);
    }
    fold(a) == fold(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_case_variants_are_equal() {
        assert!(eq_ignore_case("Project", "PROJECT"));
        assert!(eq_ignore_case("project", "Project"));
        assert!(!eq_ignore_case("Project", "Projects"));
    }

    #[test]
    fn unicode_letters_that_java_folds_onto_ascii_are_equal() {
        assert!(eq_ignore_case("Tag\u{17f}", "Tags")); // long s
        assert!(eq_ignore_case("\u{212a}ind", "kind")); // Kelvin sign
        assert!(eq_ignore_case("\u{131}d", "ID")); // dotless i
        assert!(eq_ignore_case("\u{130}D", "id")); // dotted capital I
        assert!(eq_ignore_case("\u{3c2}", "\u{3a3}")); // final sigma
        assert!(!eq_ignore_case("Proj\u{e9}ct", "Project"));
    }
}
