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

/// Whether [`skeleton`] drops an ASCII byte: whitespace and controls (vertical tab included).
pub fn dropped_ascii(b: u8) -> bool {
    b.is_ascii_whitespace() || b.is_ascii_control()
}

/// The skeleton of a name: what is left of it for the most lenient reader. Compatibility forms
/// are decomposed (NFKD: fullwidth `Ｔ` → `T`, `ﬆ` → `st`, `é` → `e` + accent), then marks
/// (accents), whitespace, controls, format characters (zero-width space, BOM, bidi controls) and
/// every other default-ignorable code point are dropped, and the rest is case-folded as [`fold`]
/// does. Two names with the same skeleton are names some reader may take for each other.
pub fn skeleton(name: &str) -> String {
    if name.is_ascii() {
        // NFKD and the fold are plain lower-casing on ASCII.
        return name
            .bytes()
            .filter(|b| !dropped_ascii(*b))
            .map(|b| char::from(b.to_ascii_lowercase()))
            .collect();
    }
    use icu_properties::props::{DefaultIgnorableCodePoint, GeneralCategory as Gc};
    use icu_properties::{CodePointMapData, CodePointSetData};
    let decomposed = icu_normalizer::DecomposingNormalizerBorrowed::new_nfkd().normalize(name);
    let ignorable = CodePointSetData::new::<DefaultIgnorableCodePoint>();
    let category = CodePointMapData::<Gc>::new();
    let mut out = String::with_capacity(decomposed.len());
    for c in decomposed.chars() {
        let dropped = c.is_whitespace()
            || ignorable.contains(c)
            || matches!(
                category.get(c),
                Gc::NonspacingMark
                    | Gc::SpacingMark
                    | Gc::EnclosingMark
                    | Gc::Control
                    | Gc::Format
                    | Gc::SpaceSeparator
                    | Gc::LineSeparator
                    | Gc::ParagraphSeparator
            );
        if !dropped {
            push_folded(&mut out, c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skeletons_see_through_look_alikes() {
        for name in [
            "Tags",
            "tags",
            "TAGS",
            " Tags",
            "Tags\0",
            "T\u{200b}ags",
            "\u{feff}Tags",
            "Ta\u{301}gs",
            "T\u{e1}gs",
            "Tag\u{17f}",
            "\u{ff34}\u{ff41}\u{ff47}\u{ff53}",
            "\u{1d413}ags",
            "Tag\u{2006}s",
            "Tags\u{2028}",
            "T\u{ad}ags",
            "Ta\u{34f}gs",
            "Tags\u{e0001}",
            "Tags\u{fe0f}",
            "T\u{202e}ags",
        ] {
            assert_eq!(skeleton(name), "tags", "{name:?}");
        }
        for other in ["Tag", "Tagss", "T-ags", "T\u{430}gs", "Togs"] {
            assert_ne!(skeleton(other), "tags", "{other:?}");
        }
    }

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
