use std::io::Read;

use proptest::prelude::*;

use super::input::{read_events, InputError, Peek, Sink};
use super::Position;

#[derive(Default)]
struct Collect {
    /// (operation or "-", position) of each readable record.
    records: Vec<(String, Position)>,
    unreadable: Vec<(String, Position)>,
}

impl Sink for Collect {
    fn record(&mut self, peek: &Peek, _bytes: &[u8], at: Position) {
        let name = peek
            .operation()
            .map_or("-".to_owned(), |op| op.name().to_owned());
        self.records.push((name, at));
    }
    fn unreadable(&mut self, message: String, at: Position) {
        self.unreadable.push((message, at));
    }
}

/// A reader that returns at most `step` bytes per read: every value straddles refills.
struct Trickle<'a> {
    bytes: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

fn read(text: &str, step: usize) -> (Collect, Result<(), InputError>) {
    let mut sink = Collect::default();
    let result = read_events(
        Trickle {
            bytes: text.as_bytes(),
            step,
        },
        &mut sink,
    );
    (sink, result)
}

fn names(text: &str) -> Vec<String> {
    let (sink, result) = read(text, 7);
    result.unwrap();
    assert!(sink.unreadable.is_empty(), "{:?}", sink.unreadable);
    sink.records.into_iter().map(|(n, _)| n).collect()
}

const TAG: &str = r#"{"eventSource":"kms.amazonaws.com","eventName":"TagResource","requestParameters":{"keyId":"k","tags":[]}}"#;
const DECRYPT: &str = r#"{"eventVersion":"1.08","eventSource":"kms.amazonaws.com","eventName":"Decrypt","requestParameters":{"encryptionContext":{"a":"\"eventName\":\"TagResource\""}}}"#;

#[test]
fn every_input_shape_is_read_by_its_content() {
    let s3 = format!(r#"{{"Records":[{TAG},{DECRYPT}]}}"#);
    assert_eq!(names(&s3), ["TagResource", "-"]);
    let lookup = format!(
        r#"{{"Events":[{{"EventId":"1","CloudTrailEvent":{}}},{{"CloudTrailEvent":{}}}],"NextToken":"t"}}"#,
        serde_json::to_string(TAG).unwrap(),
        serde_json::to_string(DECRYPT).unwrap()
    );
    assert_eq!(names(&lookup), ["TagResource", "-"]);
    let lookup_token_first = format!(
        r#"{{"NextToken":"t","Events":[{{"CloudTrailEvent":{}}}]}}"#,
        serde_json::to_string(TAG).unwrap()
    );
    assert_eq!(names(&lookup_token_first), ["TagResource"]);
    let lines = format!("{TAG}\n{DECRYPT}\n\n{TAG}\n");
    assert_eq!(names(&lines), ["TagResource", "-", "TagResource"]);
    let array = format!("[{DECRYPT}, {TAG}]");
    assert_eq!(names(&array), ["-", "TagResource"]);
    // Several S3 files one after another (zcat of many files).
    assert_eq!(names(&format!("{s3}\n{s3}")).len(), 4);
    assert_eq!(names(r#"{"Records":[]}"#).len(), 0);
    assert_eq!(names("  ").len(), 0);
}

#[test]
fn the_event_name_must_match_whole_after_decoding() {
    let with = |name: &str, source: &str| {
        format!(r#"{{"eventSource":{source},"eventName":{name},"x":1}}"#)
    };
    let kms = r#""kms.amazonaws.com""#;
    assert_eq!(names(&with(r#""TagResource""#, kms)), ["TagResource"]);
    assert_eq!(names(&with(r#""Tag\u0052esource""#, kms)), ["TagResource"]);
    assert_eq!(
        names(&with(r#""TagResource""#, r#""k\u006ds.amazonaws.com""#)),
        ["TagResource"]
    );
    for name in [r#""TagResourceX""#, r#""tagresource""#, r#"" TagResource""#] {
        assert_eq!(names(&with(name, kms)), ["-"], "{name}");
    }
    for source in [
        r#""kms.amazonaws.com.evil""#,
        r#""s3.amazonaws.com""#,
        "null",
    ] {
        assert_eq!(names(&with(r#""TagResource""#, source)), ["-"], "{source}");
    }
    // Without an eventSource it is not a KMS event.
    assert_eq!(names(r#"{"eventName":"TagResource"}"#), ["-"]);
    // Without an eventName it is no event at all: counted as unreadable, not skipped, so that
    // a file of another shape (`Records` not first) is not taken for one event and passed.
    for text in [
        r#"{"eventName":null,"eventSource":"kms.amazonaws.com"}"#,
        r#"{"Other":1,"Records":[{"eventName":"TagResource","eventSource":"kms.amazonaws.com"}]}"#,
        r#"{"Records":[{}]}"#,
    ] {
        let (sink, result) = read(text, 3);
        result.unwrap();
        assert!(sink.records.is_empty(), "{text}");
        assert_eq!(sink.unreadable.len(), 1, "{text}");
        assert!(sink.unreadable[0].0.contains("no eventName"), "{text}");
    }
}

#[test]
fn odd_records_are_counted_as_unreadable_with_their_place_and_reading_goes_on() {
    let text = format!(
        r#"{{"Records":[{TAG},{{"eventName":5}},"text",{{"eventName":"A","eventName":"B"}},{TAG}]}}"#
    );
    let (sink, result) = read(&text, 5);
    result.unwrap();
    assert_eq!(sink.records.len(), 2);
    let places: Vec<u64> = sink.unreadable.iter().map(|(_, at)| at.record).collect();
    assert_eq!(places, [2, 3, 4]);
    assert_eq!(sink.records[1].1.record, 5);
    let offset = text.find("\"text\"").unwrap() as u64;
    assert_eq!(sink.unreadable[1].1.offset, offset);
}

#[test]
fn broken_files_fail_with_the_byte_where_they_break() {
    let (_, result) = read(&format!(r#"{{"Records":[{TAG},{TAG}"#), 3);
    assert!(
        matches!(result, Err(InputError::Truncated { .. })),
        "{result:?}"
    );
    let text = format!(r#"{{"Records":[{TAG},{{"eventName":}}]}}"#);
    let (sink, result) = read(&text, 3);
    assert_eq!(sink.records.len(), 1);
    match result {
        Err(InputError::Syntax { offset, .. }) => {
            assert_eq!(offset, text.find(":}").unwrap() as u64 + 1)
        }
        other => panic!("{other:?}"),
    }
    let (_, result) = read("hello", 3);
    assert!(
        matches!(result, Err(InputError::Unexpected { offset: 0, .. })),
        "{result:?}"
    );
    let (_, result) = read(r#"{"Records":{}}"#, 3);
    assert!(
        matches!(result, Err(InputError::Unexpected { .. })),
        "{result:?}"
    );
}

#[test]
fn a_value_larger_than_the_bound_is_refused_not_buffered() {
    let big = format!(
        r#"{{"Records":[{{"eventName":"Decrypt","x":"{}"}}]}}"#,
        "a".repeat(super::MAX_VALUE + 10)
    );
    let (_, result) = read(&big, 1 << 20);
    assert!(
        matches!(result, Err(InputError::TooLarge { .. })),
        "{result:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// However the stream is cut into reads, the same records are found at the same places.
    #[test]
    fn refills_anywhere_find_the_same_records(step in 1usize..300, n in 0usize..20, which in any::<u32>()) {
        let records: Vec<&str> = (0..n).map(|i| if which >> (i % 32) & 1 == 1 { TAG } else { DECRYPT }).collect();
        let text = format!("{{\"Records\":[{}]}}", records.join(" ,\n"));
        let (whole, r1) = read(&text, usize::MAX);
        let (trickled, r2) = read(&text, step);
        prop_assert!(r1.is_ok() && r2.is_ok());
        prop_assert_eq!(&whole.records, &trickled.records);
        let expected: Vec<String> = records.iter().map(|r| if *r == TAG { "TagResource".to_owned() } else { "-".to_owned() }).collect();
        let got: Vec<String> = trickled.records.iter().map(|(n, _)| n.clone()).collect();
        prop_assert_eq!(got, expected);
    }
}
