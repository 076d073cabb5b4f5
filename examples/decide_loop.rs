//! Runs `decide` for the bench's two-tag TagResource N times (default 10 000), for callgrind:
//! `valgrind --tool=callgrind target/release/examples/decide_loop 10000`; the instructions of
//! `decide` divided by N are the cost of one decision.

use std::hint::black_box;

use kms_tag_guard::cases::{decide, load_cases};
use kms_tag_guard::config::Config;

const TAG_BODY: &str = r#"{"KeyId":"arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab","Tags":[{"TagKey":"team:owner","TagValue":"payments"},{"TagKey":"cost:center","TagValue":"4711"}]}"#;

const CASE: &str = r#"[[case]]
name = "two allowed tags"
operation = "TagResource"
expect = "allow"
headers = [
  ["host", "kms.us-east-1.amazonaws.com"],
  ["content-type", "application/x-amz-json-1.1"],
  ["x-amz-date", "20261128T120000Z"],
  ["authorization", "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20261128/us-east-1/kms/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"],
  ["user-agent", "aws-sdk-rust/1.0 os/linux lang/rust/1.85"],
  ["amz-sdk-invocation-id", "5f6d27c3-6e61-4a5b-9c1d-8a0f1b2c3d4e"],
  ["amz-sdk-request", "attempt=1; max=3"],
]
"#;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(10_000, |a| a.parse().expect("N"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.toml");
    std::fs::write(&path, format!("{CASE}body = '{TAG_BODY}'\n")).unwrap();
    let case = load_cases(&path).unwrap().remove(0);
    let config = Config::built_in().unwrap();
    assert!(decide(&config, &case).allowed());
    for _ in 0..n {
        black_box(decide(black_box(&config), black_box(&case)));
    }
}
