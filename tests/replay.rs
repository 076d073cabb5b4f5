//! `kms-tag-guard replay`, run as a real process over CloudTrail files.
//!
//! The fixtures in tests/fixtures/replay/ are built from the record shapes AWS documents
//! (shared research note: TagResource verbatim, UntagResource, CreateAlias, UpdateAlias,
//! DeleteAlias, CreateKey and ReplicateKey with tags, a TagResource KMS refused, the DeleteKey
//! service event, a Decrypt): `s3-trail.json` as CloudTrail delivers a log file to S3, and
//! `lookup-events.json`, the same events as `aws cloudtrail lookup-events` prints them. The
//! gzip file, the JSON lines and the directory are made from them here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kms_tag_guard::{cases, Config};
use proptest::prelude::*;
use serde_json::{json, Value};

const EXIT_CONFIG: i32 = 78;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/replay").join(name)
}

fn policy() -> PathBuf {
    root().join("tests/fixtures/policy.toml")
}

fn replay<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_kms-tag-guard"))
        .arg("replay")
        .args(args)
        .current_dir(root())
        .stdin(Stdio::null())
        .output()
        .expect("run kms-tag-guard replay")
}

fn describe(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json_report(args: &[&Path]) -> (Value, Output) {
    let mut all: Vec<&std::ffi::OsStr> =
        vec!["--config".as_ref(), "--format".as_ref(), "json".as_ref()];
    let config = policy();
    all.insert(1, config.as_os_str());
    all.extend(args.iter().map(|p| p.as_os_str()));
    let out = replay(&all);
    let value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe(&out)));
    (value, out)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn records() -> Vec<Value> {
    let trail: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("s3-trail.json")).unwrap()).unwrap();
    trail["Records"].as_array().unwrap().clone()
}

/// The lines after "would be denied": what a reader acts on.
fn denial_lines(out: &Output) -> Vec<String> {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .skip_while(|l| !l.starts_with("would be denied"))
        .skip(1)
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_input_shape_gives_the_same_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = std::fs::read(fixture("s3-trail.json")).unwrap();
    let gz = dir
        .path()
        .join("111122223333_CloudTrail_us-west-2_20200701T2120Z_Mu0KsOhtH1ar15ZZ.json.gz");
    std::fs::write(&gz, gzip(&s3)).unwrap();
    let lines = dir.path().join("events.jsonl");
    let text: Vec<String> = records().iter().map(|r| r.to_string()).collect();
    std::fs::write(&lines, text.join("\n") + "\n").unwrap();
    // A directory as the S3 layout has it, with a digest file that is not read.
    let tree = dir
        .path()
        .join("AWSLogs/111122223333/CloudTrail/us-west-2/2020/07/01");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::copy(&gz, tree.join("a.json.gz")).unwrap();
    let digest = dir
        .path()
        .join("AWSLogs/111122223333/CloudTrail-Digest/us-west-2");
    std::fs::create_dir_all(&digest).unwrap();
    std::fs::write(
        digest.join("d.json.gz"),
        gzip(br#"{"digestStartTime":"x"}"#),
    )
    .unwrap();

    let config = policy();
    let mut reference = None;
    for input in [
        fixture("s3-trail.json"),
        gz.clone(),
        fixture("lookup-events.json"),
        lines.clone(),
        dir.path().join("AWSLogs"),
    ] {
        let out = replay(["--config".as_ref(), config.as_os_str(), input.as_os_str()]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}: {}",
            input.display(),
            describe(&out)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            text.contains("read: 1 file, 10 events"),
            "{}: {text}",
            input.display()
        );
        let denials = denial_lines(&out);
        assert_eq!(denials.len(), 4, "{}: {text}", input.display());
        match &reference {
            None => reference = Some(denials),
            Some(reference) => assert_eq!(&denials, reference, "{}", input.display()),
        }
        // Not a terminal: no progress bar, nothing on standard error.
        assert!(out.stderr.is_empty(), "{}", describe(&out));
    }
    let reference = reference.unwrap();
    assert!(reference[0].starts_with(
        "2020-07-01T21:11:25Z  arn:aws:iam::111122223333:user/Alice  TagResource  arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab  org-prefix: tag key \"Department\""
    ), "{reference:?}");
}

#[test]
fn the_report_counts_each_operation_rule_and_principal_and_sets_kms_refusals_apart() {
    let (report, out) = json_report(&[&fixture("s3-trail.json")]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(report["events"], 10);
    assert_eq!(report["judged"], 7);
    assert_eq!(report["failed_in_kms"], 1);
    assert_eq!(report["would_be_denied"], 4);
    assert_eq!(report["unreadable"], 0);
    let op = |name: &str| {
        let c = &report["by_operation"][name];
        (
            c["judged"].as_u64().unwrap(),
            c["denied"].as_u64().unwrap(),
            c["failed_in_kms"].as_u64().unwrap(),
        )
    };
    assert_eq!(op("TagResource"), (1, 1, 1));
    assert_eq!(op("UntagResource"), (1, 0, 0));
    assert_eq!(op("CreateKey"), (1, 0, 0));
    assert_eq!(op("ReplicateKey"), (1, 1, 0));
    assert_eq!(op("CreateAlias"), (1, 1, 0));
    assert_eq!(op("UpdateAlias"), (1, 1, 0));
    assert_eq!(op("DeleteAlias"), (1, 0, 0));
    assert!(report["by_operation"].get("Decrypt").is_none());
    assert!(report["by_operation"].get("DeleteKey").is_none());
    assert_eq!(
        report["by_rule"],
        json!({"abac-keys": 1, "alias-namespace": 2, "org-prefix": 2, "owner-on-create": 1})
    );
    assert_eq!(
        report["by_principal"]["arn:aws:iam::111122223333:user/Bob"],
        json!({"judged": 0, "denied": 0, "failed_in_kms": 1})
    );
    assert_eq!(
        report["by_principal"]["arn:aws:iam::111122223333:user/Alice"],
        json!({"judged": 7, "denied": 4, "failed_in_kms": 0})
    );
    let denials = report["denials"].as_array().unwrap();
    let summary: Vec<(String, String, Value)> = denials
        .iter()
        .map(|d| {
            let rules: Vec<Value> = d["violations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["rule"].clone())
                .collect();
            (
                d["time"].as_str().unwrap().to_owned(),
                d["operation"].as_str().unwrap().to_owned(),
                Value::from(rules),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "2020-07-01T21:11:25Z".to_owned(),
                "TagResource".to_owned(),
                json!(["org-prefix"])
            ),
            (
                "2020-07-01T21:13:25Z".to_owned(),
                "CreateAlias".to_owned(),
                json!(["alias-namespace"])
            ),
            (
                "2020-07-01T21:14:25Z".to_owned(),
                "UpdateAlias".to_owned(),
                json!(["alias-namespace"])
            ),
            (
                "2020-07-01T21:17:25Z".to_owned(),
                "ReplicateKey".to_owned(),
                json!(["org-prefix", "abac-keys", "owner-on-create"])
            ),
        ]
    );
    assert_eq!(denials[1]["alias"], "alias/ExampleAlias");
    assert_eq!(
        denials[0]["event_id"],
        "0a091b9b-0df5-4cf9-b667-6f2879532001"
    );
    assert_eq!(denials[0]["record"], 1);
    assert!(denials[0]["file"]
        .as_str()
        .unwrap()
        .ends_with("s3-trail.json"));
}

/// The live decision on the request an event stands for: the same request as an SDK sends it
/// (`explain`'s request), judged in process.
fn live(config: &Config, operation: &str, body: &Value, akid: Option<&str>) -> (bool, Vec<String>) {
    let case = cases::request(operation, body.to_string().into_bytes(), akid, None).unwrap();
    let decision = cases::decide(config, &case);
    let mut rules: Vec<String> = decision
        .violations
        .iter()
        .map(|v| v.rule.to_string())
        .collect();
    rules.sort();
    rules.dedup();
    (decision.allowed(), rules)
}

#[test]
fn each_documented_operation_is_judged_as_its_live_request() {
    let config = Config::load(&policy()).unwrap();
    let (report, _) = json_report(&[&fixture("s3-trail.json")]);
    let denied: std::collections::HashMap<String, Vec<String>> = report["denials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let mut rules: Vec<String> = d["violations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["rule"].as_str().unwrap().to_owned())
                .collect();
            rules.sort();
            rules.dedup();
            (d["event_id"].as_str().unwrap().to_owned(), rules)
        })
        .collect();
    let key = "arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    // The requests the SDK sent for the documented events, written out by hand from the API.
    let requests = [
        (
            "01",
            "TagResource",
            json!({"KeyId": key, "Tags": [{"TagKey": "Department", "TagValue": "IT"}]}),
        ),
        (
            "02",
            "UntagResource",
            json!({"KeyId": key, "TagKeys": ["Dept"]}),
        ),
        (
            "03",
            "CreateAlias",
            json!({"AliasName": "alias/ExampleAlias", "TargetKeyId": "1234abcd-12ab-34cd-56ef-1234567890ab"}),
        ),
        (
            "04",
            "UpdateAlias",
            json!({"AliasName": "alias/my_alias", "TargetKeyId": "1234abcd-12ab-34cd-56ef-1234567890ab"}),
        ),
        ("05", "DeleteAlias", json!({"AliasName": "alias/team-old"})),
        (
            "06",
            "CreateKey",
            json!({"Description": "", "KeyUsage": "ENCRYPT_DECRYPT", "KeySpec": "SYMMETRIC_DEFAULT", "Origin": "AWS_KMS", "Tags": [{"TagKey": "team:owner", "TagValue": "alice"}]}),
        ),
        (
            "07",
            "ReplicateKey",
            json!({"KeyId": "arn:aws:kms:us-west-2:111122223333:key/mrk-1234abcd12ab34cd56ef1234567890ab", "ReplicaRegion": "eu-west-1", "Tags": [{"TagKey": "Project", "TagValue": "x"}]}),
        ),
    ];
    for (id, operation, body) in requests {
        let event_id = format!("0a091b9b-0df5-4cf9-b667-6f28795320{id}");
        let (allowed, rules) = live(&config, operation, &body, Some("AKIAEXAMPLEKEYID"));
        match denied.get(&event_id) {
            None => assert!(
                allowed,
                "{operation}: live denies ({rules:?}), replay allowed"
            ),
            Some(replayed) => {
                assert!(
                    !allowed,
                    "{operation}: live allows, replay denied {replayed:?}"
                );
                assert_eq!(replayed, &rules, "{operation}");
            }
        }
    }
}

// ------------------------------------------------------------------ as an attacker would try

/// Tag keys that matter to tests/fixtures/all-rules.toml, and look-alikes of them.
fn tag_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("team:owner".to_owned()),
        Just("app:env".to_owned()),
        Just("app:ticket".to_owned()),
        Just("app:compliance".to_owned()),
        Just("Project".to_owned()),
        Just("project".to_owned()),
        Just("PROJECT".to_owned()),
        Just("Proj\u{0435}ct".to_owned()),
        Just("Name".to_owned()),
        Just("legacy-x".to_owned()),
        Just("sec:level".to_owned()),
        Just("Kind".to_owned()),
        "[a-z:]{1,6}",
    ]
}

fn tag_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("dev".to_owned()),
        Just("prod".to_owned()),
        Just("Prod".to_owned()),
        Just("team-a".to_owned()),
        Just("ABC-12".to_owned()),
        Just("".to_owned()),
        "[ -~]{0,8}",
    ]
}

#[derive(Debug, Clone)]
struct Change {
    operation: &'static str,
    key_id: String,
    tags: Vec<(String, String)>,
    alias: String,
    akid: Option<String>,
}

fn change() -> impl Strategy<Value = Change> {
    (
        prop_oneof![
            Just("TagResource"),
            Just("UntagResource"),
            Just("CreateKey"),
            Just("ReplicateKey"),
            Just("CreateAlias"),
            Just("UpdateAlias"),
            Just("DeleteAlias")
        ],
        prop_oneof![
            Just(
                "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
                    .to_owned()
            ),
            Just(
                "arn:aws:kms:us-east-1:444455556666:key/1234abcd-12ab-34cd-56ef-1234567890ab"
                    .to_owned()
            ),
            Just("mrk-1234abcd12ab34cd56ef1234567890ab".to_owned()),
            Just("1234abcd-12ab-34cd-56ef-1234567890ab".to_owned()),
        ],
        proptest::collection::vec((tag_key(), tag_value()), 0..6),
        prop_oneof![
            Just("alias/team-a".to_owned()),
            Just("alias/team-payments".to_owned()),
            Just("alias/team-prod-db".to_owned()),
            Just("alias/root".to_owned()),
            Just("alias/other".to_owned()),
            Just("alias/aws/kms".to_owned()),
        ],
        prop_oneof![
            Just(None),
            Just(Some("AKIAEXEMPT".to_owned())),
            Just(Some("AKIAIOSFODNN7EXAMPLE".to_owned())),
            Just(Some("AKIAOTHER".to_owned()))
        ],
    )
        .prop_map(|(operation, key_id, tags, alias, akid)| Change {
            operation,
            key_id,
            tags,
            alias,
            akid,
        })
}

impl Change {
    /// The request as an SDK sends it, and as CloudTrail writes its parameters.
    fn bodies(&self) -> (Value, Value) {
        let api_tags: Vec<Value> = self
            .tags
            .iter()
            .map(|(k, v)| json!({"TagKey": k, "TagValue": v}))
            .collect();
        let ct_tags: Vec<Value> = self
            .tags
            .iter()
            .map(|(k, v)| json!({"tagKey": k, "tagValue": v}))
            .collect();
        let keys: Vec<&String> = self.tags.iter().map(|(k, _)| k).collect();
        match self.operation {
            "TagResource" => (
                json!({"KeyId": self.key_id, "Tags": api_tags}),
                json!({"keyId": self.key_id, "tags": ct_tags}),
            ),
            "UntagResource" => (
                json!({"KeyId": self.key_id, "TagKeys": keys}),
                json!({"keyId": self.key_id, "tagKeys": keys}),
            ),
            "CreateKey" => (
                json!({"Description": "d", "Tags": api_tags}),
                json!({"description": "d", "tags": ct_tags}),
            ),
            "ReplicateKey" => (
                json!({"KeyId": self.key_id, "ReplicaRegion": "eu-west-1", "Tags": api_tags}),
                json!({"keyId": self.key_id, "replicaRegion": "eu-west-1", "tags": ct_tags}),
            ),
            "DeleteAlias" => (
                json!({"AliasName": self.alias}),
                json!({"aliasName": self.alias}),
            ),
            _ => (
                json!({"AliasName": self.alias, "TargetKeyId": self.key_id}),
                json!({"aliasName": self.alias, "targetKeyId": self.key_id}),
            ),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    /// A replayed event and the live request it stands for get the same verdict, with the same
    /// rules named: tag keys in other cases and look-alikes, exempt and other callers, keys in
    /// and out of `key_ids`, every operation, against the policy that uses every rule type.
    #[test]
    fn a_replayed_event_and_its_live_request_get_the_same_verdict(changes in proptest::collection::vec(change(), 1..40)) {
        let config_path = root().join("tests/fixtures/all-rules.toml");
        let config = Config::load(&config_path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut lines = String::new();
        for (i, c) in changes.iter().enumerate() {
            let mut identity = json!({"type": "IAMUser", "arn": format!("arn:aws:iam::111122223333:user/u{i}")});
            if let Some(akid) = &c.akid {
                identity["accessKeyId"] = json!(akid);
            }
            let event = json!({
                "eventVersion": "1.08", "eventTime": "2026-11-01T00:00:00Z", "eventSource": "kms.amazonaws.com",
                "eventName": c.operation, "awsRegion": "us-east-1", "userIdentity": identity,
                "requestParameters": c.bodies().1, "eventID": format!("event-{i}"),
            });
            lines.push_str(&event.to_string());
            lines.push('\n');
        }
        let input = dir.path().join("events.jsonl");
        std::fs::write(&input, lines).unwrap();
        let out = replay(["--config".as_ref(), config_path.as_os_str(), "--format".as_ref(), "json".as_ref(), input.as_os_str()]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        prop_assert_eq!(report["judged"].as_u64(), Some(changes.len() as u64));
        let denied: std::collections::HashMap<String, Vec<String>> = report["denials"].as_array().unwrap().iter().map(|d| {
            let mut rules: Vec<String> = d["violations"].as_array().unwrap().iter().map(|v| v["rule"].as_str().unwrap().to_owned()).collect();
            rules.sort();
            rules.dedup();
            (d["event_id"].as_str().unwrap().to_owned(), rules)
        }).collect();
        for (i, c) in changes.iter().enumerate() {
            let (allowed, rules) = live(&config, c.operation, &c.bodies().0, c.akid.as_deref());
            let replayed = denied.get(&format!("event-{i}"));
            prop_assert_eq!(replayed.is_none(), allowed, "{:?}: live {:?}, replay {:?}", c, rules, replayed);
            if let Some(replayed) = replayed {
                prop_assert_eq!(replayed, &rules, "{:?}", c);
            }
        }
        prop_assert_eq!(out.status.code(), Some(if denied.is_empty() { 0 } else { 1 }));
    }
}

#[test]
fn a_record_with_both_spellings_of_a_member_is_denied_as_the_request_would_be() {
    // Rebuilt member for member, the body has `Tags` twice: the strict parser refuses it, as it
    // refuses such a request, instead of one spelling silently winning.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("odd.jsonl");
    std::fs::write(
        &input,
        r#"{"eventSource":"kms.amazonaws.com","eventName":"TagResource","awsRegion":"us-east-1","requestParameters":{"keyId":"k","tags":[{"tagKey":"team:a","tagValue":"b"}],"Tags":[{"TagKey":"Project","TagValue":"x"}]}}
{"eventSource":"kms.amazonaws.com","eventName":"TagResource","awsRegion":"us-east-1","requestParameters":null}
{"eventSource":"kms.amazonaws.com","eventName":"CreateKey","awsRegion":"us-east-1","requestParameters":{"tags":[{"key":"team:owner","value":"x"}]}}
"#,
    )
    .unwrap();
    let (report, out) = json_report(&[&input]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(report["would_be_denied"], 3, "{report:#}");
    for denial in report["denials"].as_array().unwrap() {
        assert_eq!(denial["violations"][0]["rule"], "request", "{denial:#}");
    }
    assert!(report["denials"][1]["violations"][0]["message"]
        .as_str()
        .unwrap()
        .contains("requestParameters"));
}

// ------------------------------------------------------------------------------ exit codes

#[test]
fn exit_zero_when_nothing_would_be_denied_and_78_for_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let lenient = dir.path().join("lenient.toml");
    std::fs::write(
        &lenient,
        "[policy]\n[[policy.rule]]\nid = \"no-secret\"\ntype = \"forbidden-key\"\nkeys = [\"Secret\"]\n",
    )
    .unwrap();
    let out = replay([
        "--config".as_ref(),
        lenient.as_os_str(),
        fixture("s3-trail.json").as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("would be denied ("));
    assert!(out.stderr.is_empty(), "{}", describe(&out));

    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "[policy]\n[[policy.rule]]\nid = \"x\"\ntype = \"forbiden-key\"\n",
    )
    .unwrap();
    let out = replay([
        "--config".as_ref(),
        broken.as_os_str(),
        fixture("s3-trail.json").as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    let out = replay([
        "--config".as_ref(),
        dir.path().join("missing.toml").as_os_str(),
        fixture("s3-trail.json").as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    // No input at all is a usage error.
    let out = replay(["--config", "tests/fixtures/policy.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}

#[test]
fn broken_inputs_are_reported_with_file_and_place_and_the_rest_is_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = std::fs::read(fixture("s3-trail.json")).unwrap();
    let cut = dir.path().join("cut.json.gz");
    let whole = gzip(&s3);
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let syntax = dir.path().join("syntax.json");
    std::fs::write(
        &syntax,
        "{\"Records\":[{\"eventName\":\"Decrypt\"},\n{\"eventName\" \"x\"}]}",
    )
    .unwrap();
    let odd = dir.path().join("odd.json");
    std::fs::write(
        &odd,
        "{\"Records\":[{\"eventName\":\"Decrypt\"}, 42, {\"eventName\":7}]}",
    )
    .unwrap();
    let other = dir.path().join("other.json");
    std::fs::write(&other, "not json at all").unwrap();
    let missing = dir.path().join("missing.json");
    let out = replay([
        "--config".as_ref(),
        policy().as_os_str(),
        cut.as_os_str(),
        syntax.as_os_str(),
        odd.as_os_str(),
        other.as_os_str(),
        missing.as_os_str(),
        fixture("s3-trail.json").as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panick"), "{}", describe(&out));
    let line_of = |path: &Path| {
        let name = path.display().to_string();
        stderr
            .lines()
            .find(|l| l.starts_with(&name))
            .unwrap_or_else(|| panic!("{name} not reported: {}", describe(&out)))
            .to_owned()
    };
    assert!(line_of(&cut).contains("byte"), "{stderr}");
    let syntax_line = line_of(&syntax);
    assert!(
        syntax_line.contains(&format!(
            "byte {}",
            "{\"Records\":[{\"eventName\":\"Decrypt\"},\n{\"eventName\" ".len()
        )),
        "{syntax_line}"
    );
    let odd_lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with(&odd.display().to_string()))
        .collect();
    assert_eq!(odd_lines.len(), 2, "{stderr}");
    assert!(odd_lines[0].contains("record 2 (byte 37)"), "{stderr}");
    assert!(odd_lines[1].contains("record 3"), "{stderr}");
    assert!(line_of(&other).contains("byte 0"), "{stderr}");
    assert!(line_of(&missing).contains("cannot read"), "{stderr}");
    // The good file after the broken ones was read whole.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("read: 5 files"), "{text}");
    let unreadable = text
        .lines()
        .find(|l| l.contains("unreadable records"))
        .unwrap();
    assert!(unreadable.ends_with(" 2"), "{text}");
    // The whole good file, and what the cut one held before its cut.
    assert!(denial_lines(&out).len() >= 4, "{text}");
}

// ------------------------------------------------------------------------------ bounded

/// Peak RSS of a child, in KiB, from wait4(2) (which reaps it: the child is waited for).
#[allow(clippy::zombie_processes)]
fn run_for_peak_rss(mut command: Command) -> (i32, u64) {
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid);
    (libc::WEXITSTATUS(status), usage.ru_maxrss as u64)
}

#[test]
fn a_trail_larger_than_the_memory_bound_is_streamed() {
    // 80 MiB of records in one plain file, a tag change every 997 records: holding the file,
    // or the records, would take more than the 64 MiB bound.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("big.json");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
    let decrypt = r#"{"eventVersion":"1.08","userIdentity":{"type":"AssumedRole","principalId":"AROAEXAMPLE:s","arn":"arn:aws:sts::111122223333:assumed-role/app/s","accountId":"111122223333","accessKeyId":"ASIAEXAMPLE"},"eventTime":"2026-11-01T00:00:00Z","eventSource":"kms.amazonaws.com","eventName":"Decrypt","awsRegion":"us-east-1","sourceIPAddress":"10.0.0.1","userAgent":"aws-sdk-go-v2/1.21.0","requestParameters":{"encryptionAlgorithm":"SYMMETRIC_DEFAULT","encryptionContext":{"aws:s3:arn":"arn:aws:s3:::bucket/some/object/key/part-00000.parquet"}},"responseElements":null,"requestID":"00000000-0000-0000-0000-000000000000","eventID":"00000000-0000-0000-0000-000000000000","readOnly":true,"resources":[{"accountId":"111122223333","type":"AWS::KMS::Key","ARN":"arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"}],"eventType":"AwsApiCall","managementEvent":true,"recipientAccountId":"111122223333","eventCategory":"Management","tlsDetails":{"tlsVersion":"TLSv1.3","cipherSuite":"TLS_AES_128_GCM_SHA256","clientProvidedHostHeader":"kms.us-east-1.amazonaws.com"}}"#;
    let tag = r#"{"eventSource":"kms.amazonaws.com","eventName":"TagResource","eventTime":"2026-11-01T00:00:01Z","awsRegion":"us-east-1","requestParameters":{"keyId":"k","tags":[{"tagKey":"Project","tagValue":"x"}]}}"#;
    file.write_all(b"{\"Records\":[").unwrap();
    let mut written = 0;
    let mut n = 0u64;
    while written < 80 << 20 {
        if n > 0 {
            file.write_all(b",").unwrap();
        }
        let record = if n % 997 == 996 { tag } else { decrypt };
        file.write_all(record.as_bytes()).unwrap();
        written += record.len() + 1;
        n += 1;
    }
    file.write_all(b"]}").unwrap();
    file.flush().unwrap();
    drop(file);
    let mut command = Command::new(env!("CARGO_BIN_EXE_kms-tag-guard"));
    command
        .args(["replay", "--config"])
        .arg(policy())
        .arg(&input);
    let (code, peak_kib) = run_for_peak_rss(command);
    assert_eq!(code, 1);
    eprintln!(
        "{n} records, {} MiB: peak RSS {} KiB",
        written >> 20,
        peak_kib
    );
    assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB");
}

#[test]
fn help_and_completions_know_the_command() {
    let out = replay(["-h"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    for option in ["--config", "--format", "INPUT", "Exit codes"] {
        assert!(help.contains(option), "{help}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kms-tag-guard"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("replay"));
}

#[test]
fn the_readme_example_is_what_replay_prints() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = &readme[readme
        .find("## Replay CloudTrail")
        .expect("the README's replay section")..];
    let block = section
        .split("```text\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a text block");
    let (command, shown) = block.split_once('\n').unwrap();
    let args: Vec<&str> = command
        .strip_prefix("$ kms-tag-guard replay ")
        .expect("the command first")
        .split(' ')
        .collect();
    let out = replay(&args);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        shown,
        "{}",
        describe(&out)
    );
}

#[test]
fn more_denials_than_are_held_come_out_sorted_by_time() {
    // 10,000 denials in two files, times scrambled: more than one run (8,192) goes through the
    // temporary directory, and the report merges them back in order.
    let dir = tempfile::tempdir().unwrap();
    let mut inputs = Vec::new();
    for f in 0..2 {
        let path = dir.path().join(format!("part{f}.jsonl"));
        let mut text = String::new();
        for i in 0..5_000u32 {
            let t = (i * 7919 + f * 13) % 86_400;
            text.push_str(&format!(
                r#"{{"eventSource":"kms.amazonaws.com","eventName":"TagResource","eventTime":"2026-11-01T{:02}:{:02}:{:02}Z","eventID":"{f}-{i}","awsRegion":"us-east-1","requestParameters":{{"keyId":"k","tags":[{{"tagKey":"Project","tagValue":"x"}}]}}}}"#,
                t / 3600,
                t / 60 % 60,
                t % 60
            ));
            text.push('\n');
        }
        std::fs::write(&path, text).unwrap();
        inputs.push(path);
    }
    let (report, out) = json_report(&[&inputs[0], &inputs[1]]);
    assert_eq!(out.status.code(), Some(1));
    let denials = report["denials"].as_array().unwrap();
    assert_eq!(denials.len(), 10_000);
    let order: Vec<(String, String, u64)> = denials
        .iter()
        .map(|d| {
            (
                d["time"].as_str().unwrap().to_owned(),
                d["file"].as_str().unwrap().to_owned(),
                d["record"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert!(order == sorted, "not in time order");
    let ids: std::collections::HashSet<&str> = denials
        .iter()
        .map(|d| d["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 10_000);
}

/// The counts a reader compares between reports: every summary member but what depends on how
/// many copies of each event were read.
fn verdict_counts(report: &Value) -> Value {
    json!({
        "judged": report["judged"],
        "failed_in_kms": report["failed_in_kms"],
        "would_be_denied": report["would_be_denied"],
        "by_operation": report["by_operation"],
        "by_rule": report["by_rule"],
        "dry_run_by_rule": report["dry_run_by_rule"],
        "by_principal": report["by_principal"],
    })
}

fn denied_event_ids(report: &Value) -> Vec<String> {
    let mut ids: Vec<String> = report["denials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["event_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// The same events from a trail's S3 file and from a `lookup-events` page of the same hours
/// are judged and counted once (CloudTrail's `eventID` is the key); a record without an ID
/// cannot be matched and is counted each time.
#[test]
fn an_event_given_twice_is_judged_and_counted_once() {
    let (single, out) = json_report(&[&fixture("s3-trail.json")]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(single["duplicates"], 0);
    let (both, out) = json_report(&[&fixture("s3-trail.json"), &fixture("lookup-events.json")]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(both["events"], 20);
    // Seven judged and one refused by KMS, in each input.
    assert_eq!(both["duplicates"], 8);
    assert_eq!(both["not_deduplicated"], 0);
    assert_eq!(verdict_counts(&both), verdict_counts(&single));
    assert_eq!(denied_event_ids(&both), denied_event_ids(&single));

    // The text report says so too.
    let config = policy();
    let out = replay([
        "--config".as_ref(),
        config.as_os_str(),
        fixture("s3-trail.json").as_os_str(),
        fixture("lookup-events.json").as_os_str(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("duplicates (an eventID seen before), skipped"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.trim_end().ends_with(" 8"), "{line:?}");
    assert_eq!(denial_lines(&out).len(), 4, "{text}");

    // In one file: a tag change twice with one ID, and twice without any.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let tag = |id: Option<&str>| {
        let mut event = json!({"eventSource": "kms.amazonaws.com", "eventName": "TagResource",
            "eventTime": "2026-11-01T00:00:01Z", "awsRegion": "us-east-1",
            "requestParameters": {"keyId": "k", "tags": [{"tagKey": "Project", "tagValue": "x"}]}});
        if let Some(id) = id {
            event["eventID"] = json!(id);
        }
        event.to_string()
    };
    let lines = [tag(Some("a")), tag(None), tag(Some("a")), tag(None)].join("\n");
    std::fs::write(&input, lines).unwrap();
    let (report, out) = json_report(&[&input]);
    assert_eq!(report["events"], 4, "{}", describe(&out));
    assert_eq!(report["judged"], 3);
    assert_eq!(report["duplicates"], 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// However the fixture's events are repeated, shuffled and split into files, the verdicts
    /// and counts are those of the events read once, and every extra copy of a tag or alias
    /// change is counted as a duplicate.
    #[test]
    fn repeated_events_in_any_arrangement_count_as_the_events_once(
        copies in proptest::collection::vec(1usize..4, 10),
        order in any::<u64>(),
        files in 1usize..5,
    ) {
        let records = records();
        let (single, _) = json_report(&[&fixture("s3-trail.json")]);
        let mut lines: Vec<(u64, String)> = Vec::new();
        let mut extra = 0u64;
        for (i, (record, n)) in records.iter().zip(&copies).enumerate() {
            let judged_or_failed = record["eventName"] != "Decrypt" && record["eventName"] != "DeleteKey";
            for copy in 0..*n {
                extra += u64::from(judged_or_failed && copy > 0);
                // A stable pseudo-random place for each copy.
                let place = (order ^ (i as u64 * 0x9E37_79B9 + copy as u64)).wrapping_mul(0x2545_F491_4F6C_DD1D);
                lines.push((place, record.to_string()));
            }
        }
        lines.sort();
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..files).map(|f| dir.path().join(format!("part-{f}.jsonl"))).collect();
        let mut texts = vec![String::new(); files];
        for (n, (_, line)) in lines.iter().enumerate() {
            texts[n % files].push_str(line);
            texts[n % files].push('\n');
        }
        for (path, text) in paths.iter().zip(&texts) {
            std::fs::write(path, text).unwrap();
        }
        let args: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        let (report, out) = json_report(&args);
        prop_assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        prop_assert_eq!(report["events"].as_u64(), Some(lines.len() as u64));
        prop_assert_eq!(report["duplicates"].as_u64(), Some(extra));
        prop_assert_eq!(verdict_counts(&report), verdict_counts(&single));
        prop_assert_eq!(denied_event_ids(&report), denied_event_ids(&single));
    }
}
