//! Policy test cases (`kms-tag-guard test`): requests written down with the verdict they must get.
//!
//! Each case is judged by the same steps the proxy runs on live traffic (classify, head checks,
//! body limit, strict parse, policy), without a network.

use std::fmt;
use std::path::{Path, PathBuf};

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};

use crate::config::Config;
use crate::decide::{decision, Head, Rules};
use crate::kms::operation::TARGET_PREFIX;
use crate::policy::Decision;

/// One test case.
#[derive(Debug, Clone)]
pub struct Case {
    pub file: PathBuf,
    /// The line of the case's `[[case]]` header, where the file has one per case.
    pub line: Option<usize>,
    pub name: String,
    /// The caller's workload identity the case is sent with, as a verified client certificate
    /// would give it.
    pub caller: Option<String>,
    headers: HeaderMap,
    body: Vec<u8>,
    expect_allow: bool,
    rules: Option<Vec<String>>,
    dry_run_rules: Option<Vec<String>>,
}

/// A case file that cannot be read: the whole run is invalid (exit 78).
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct CaseFileError {
    pub file: String,
    pub message: String,
}

/// What became of one case.
#[derive(Debug)]
pub struct CaseResult {
    pub case: Case,
    pub failure: Option<String>,
}

/// The outcome of a run.
#[derive(Debug, Default)]
pub struct Report {
    pub results: Vec<CaseResult>,
}

impl Report {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.failure.is_none()).count()
    }

    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }
}

impl CaseResult {
    /// `file:line` (or `file`) of the case.
    pub fn place(&self) -> String {
        match self.case.line {
            Some(line) => format!("{}:{line}", self.case.file.display()),
            None => self.case.file.display().to_string(),
        }
    }

    /// The case's name, and its caller when it has one.
    pub fn title(&self) -> String {
        match &self.case.caller {
            Some(caller) => format!("{} (as caller {caller})", self.case.name),
            None => self.case.name.clone(),
        }
    }
}

impl Report {
    /// The report as text: each failure (and with `verbose`, each pass), then the counts.
    pub fn text(&self, verbose: bool) -> String {
        let mut out = String::new();
        for result in &self.results {
            match &result.failure {
                Some(failure) => out.push_str(&format!(
                    "FAIL {}: {}: {failure}\n",
                    result.place(),
                    result.title()
                )),
                None if verbose => {
                    out.push_str(&format!("ok   {}: {}\n", result.place(), result.title()))
                }
                None => {}
            }
        }
        out.push_str(&format!(
            "{} passed, {} failed\n",
            self.passed(),
            self.failed()
        ));
        out
    }

    /// The report as one JSON object: the configuration, the counts and every case.
    pub fn json(&self, config: &str) -> String {
        let cases: Vec<serde_json::Value> = self
            .results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "file": r.case.file.display().to_string(),
                    "line": r.case.line,
                    "name": r.case.name,
                    "caller": r.case.caller,
                    "passed": r.failure.is_none(),
                    "failure": r.failure,
                })
            })
            .collect();
        let report = serde_json::json!({
            "config": config,
            "passed": self.passed(),
            "failed": self.failed(),
            "cases": cases,
        });
        format!("{report:#}\n")
    }

    /// The report as JUnit XML (one test suite, one test case per case, its file as the class
    /// name), which CI systems (GitLab, Jenkins, GitHub actions' reporters) read.
    pub fn junit(&self, config: &str) -> String {
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        out.push_str(&format!(
            "<testsuites name=\"kms-tag-guard test\" tests=\"{}\" failures=\"{}\">\n",
            self.results.len(),
            self.failed()
        ));
        out.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"0\">\n",
            xml_escape(config),
            self.results.len(),
            self.failed()
        ));
        for r in &self.results {
            let file = r.case.file.display().to_string();
            let line = r
                .case
                .line
                .map(|l| format!(" line=\"{l}\""))
                .unwrap_or_default();
            let head = format!(
                "    <testcase name=\"{}\" classname=\"{}\" file=\"{}\"{line}",
                xml_escape(&r.case.name),
                xml_escape(&file),
                xml_escape(&file)
            );
            match &r.failure {
                None => out.push_str(&format!("{head}/>\n")),
                Some(failure) => out.push_str(&format!(
                    "{head}>\n      <failure message=\"{}\">{}: {}: {}</failure>\n    </testcase>\n",
                    xml_escape(failure),
                    xml_escape(&r.place()),
                    xml_escape(&r.title()),
                    xml_escape(failure)
                )),
            }
        }
        out.push_str("  </testsuite>\n</testsuites>\n");
        out
    }
}

/// Text as XML character data or an attribute value; characters XML 1.0 cannot hold become
/// U+FFFD.
fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push_str(&format!("&#{};", c as u32)),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text(false))
    }
}

const CASE_KEYS: [&str; 12] = [
    "name",
    "operation",
    "target",
    "body",
    "body_hex",
    "pad_body_to",
    "headers",
    "access_key_id",
    "caller",
    "expect",
    "rules",
    "dry_run_rules",
];

/// Reads every `[[case]]` of a case file.
pub fn load_cases(path: &Path) -> Result<Vec<Case>, CaseFileError> {
    let error = |message: String| CaseFileError {
        file: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot read: {e}")))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| error(format!("not valid TOML: {}", e.message())))?;
    if let Some(key) = table.keys().find(|k| *k != "case") {
        return Err(error(format!(
            "unknown key {key:?}; a case file holds [[case]] tables"
        )));
    }
    let items = table
        .get("case")
        .and_then(toml::Value::as_array)
        .ok_or_else(|| error("no [[case]] tables".into()))?;
    let lines = case_header_lines(&text);
    // One `[[case]]` header per case: then each case has the line of its header.
    let lines = (lines.len() == items.len()).then_some(lines);
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let line = lines.as_ref().map(|lines| lines[i]);
            let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
            let table = item
                .as_table()
                .ok_or_else(|| error(format!("case[{i}]{at} is not a table")))?;
            let mut case =
                parse_case(path, table).map_err(|m| error(format!("case[{i}]{at}: {m}")))?;
            case.line = line;
            Ok(case)
        })
        .collect()
}

/// The 1-based lines of the `[[case]]` headers of a case file, in order (a header line is
/// `[[case]]`, spaces allowed inside the brackets and a comment after it).
fn case_header_lines(text: &str) -> Vec<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| {
            let line = line.split('#').next().unwrap_or("").trim();
            line.strip_prefix("[[")
                .and_then(|l| l.strip_suffix("]]"))
                .is_some_and(|name| name.trim() == "case")
        })
        .map(|(i, _)| i + 1)
        .collect()
}

fn parse_case(path: &Path, t: &toml::Table) -> Result<Case, String> {
    if let Some(key) = t.keys().find(|k| !CASE_KEYS.contains(&k.as_str())) {
        return Err(format!("unknown key {key:?}"));
    }
    let string = |key: &str| -> Result<Option<&str>, String> {
        match t.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or(format!("{key} must be a string")),
        }
    };
    let list = |key: &str| -> Result<Option<Vec<String>>, String> {
        let Some(v) = t.get(key) else { return Ok(None) };
        let items = v
            .as_array()
            .ok_or(format!("{key} must be a list of strings"))?;
        let mut out: Vec<String> = items
            .iter()
            .map(|i| i.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or(format!("{key} must be a list of strings"))?;
        out.sort_unstable();
        Ok(Some(out))
    };
    let name = string("name")?.ok_or("every case needs a name")?.to_owned();
    let target = match (string("operation")?, string("target")?) {
        (Some(op), None) => format!("{TARGET_PREFIX}{op}"),
        (None, Some(target)) => target.to_owned(),
        _ => return Err(format!("{name:?}: set exactly one of operation and target")),
    };
    let mut body = match (string("body")?, string("body_hex")?) {
        (Some(b), None) => b.as_bytes().to_vec(),
        (None, Some(hex)) => decode_hex(hex).ok_or(format!("{name:?}: body_hex is not hex"))?,
        _ => return Err(format!("{name:?}: set exactly one of body and body_hex")),
    };
    if let Some(n) = t.get("pad_body_to") {
        let n = n
            .as_integer()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or(format!("{name:?}: pad_body_to must be a byte count"))?;
        // JSON allows trailing whitespace: the padded body means the same, only larger.
        body.resize(n.max(body.len()), b' ');
    }
    let expect_allow = match string("expect")? {
        Some("allow") => true,
        Some("deny") => false,
        _ => return Err(format!("{name:?}: expect must be \"allow\" or \"deny\"")),
    };

    let mut extra = Vec::new();
    if let Some(v) = t.get("headers") {
        let pairs = v.as_array().ok_or(format!(
            "{name:?}: headers must be a list of [name, value] pairs"
        ))?;
        for pair in pairs {
            match pair.as_array().map(Vec::as_slice) {
                Some([toml::Value::String(k), toml::Value::String(v)]) => {
                    let k = HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| format!("{name:?}: {k:?} is not a header name"))?;
                    let v = HeaderValue::from_bytes(v.as_bytes())
                        .map_err(|_| format!("{name:?}: {v:?} is not a header value"))?;
                    extra.push((k, v));
                }
                _ => return Err(format!("{name:?}: headers must be [name, value] pairs")),
            }
        }
    }
    let mut headers = HeaderMap::new();
    let mut default = |k: &'static str, v: String| {
        if !extra.iter().any(|(n, _)| n.as_str() == k) {
            headers.insert(k, HeaderValue::from_str(&v).expect("valid default header"));
        }
    };
    default("host", "kms.us-east-1.amazonaws.com".into());
    default("content-type", "application/x-amz-json-1.1".into());
    default("x-amz-target", target);
    if let Some(akid) = string("access_key_id")? {
        default(
            "authorization",
            format!("AWS4-HMAC-SHA256 Credential={akid}/20260101/us-east-1/kms/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=0"),
        );
    }
    for (k, v) in extra {
        headers.append(k, v);
    }
    let caller = match string("caller")? {
        None => None,
        Some(c) => match crate::identity::check_caller(c) {
            Ok(_) => Some(c.to_owned()),
            Err(why) => return Err(format!(
                "{name:?}: caller {c:?} is not an identity the listener would accept: {why}; write a SPIFFE ID (spiffe://example.org/ns/payments/sa/api: lower-case trust domain, path segments of letters, digits, '.', '-', '_', no '.' or '..' segment) or a DNS name (labels of 1 to 63 letters, digits and '-')"
            )),
        },
    };
    Ok(Case {
        file: path.to_owned(),
        line: None,
        name,
        caller,
        headers,
        body,
        expect_allow,
        rules: list("rules")?,
        dry_run_rules: list("dry_run_rules")?,
    })
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    let hex: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    hex.chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

/// The decision the proxy would reach for this case: [`crate::decide::decision`] on a `POST /`
/// with the case's headers and body, against the configuration's rules.
pub fn decide(config: &Config, case: &Case) -> Decision {
    let head = Head {
        method: &Method::POST,
        uri: &Uri::from_static("/"),
        headers: &case.headers,
        tunnel_host: None,
        caller: case.caller.as_deref(),
    };
    decision(&head, &case.body, &Rules::of(config))
}

/// One request, judged on its own (`kms-tag-guard explain`): the operation, its JSON body, the
/// caller's access key id (for rules limited by `key_ids` or `exempt_principals`) and workload
/// identity (for `callers`, `exempt_callers` and `caller-value` rules).
pub fn request(
    operation: &str,
    body: Vec<u8>,
    access_key_id: Option<&str>,
    caller: Option<&str>,
) -> Result<Case, String> {
    let mut t = toml::Table::new();
    t.insert("name".into(), "explain".into());
    t.insert("operation".into(), operation.into());
    t.insert("expect".into(), "allow".into());
    t.insert("body".into(), "".into());
    if let Some(akid) = access_key_id {
        t.insert("access_key_id".into(), akid.into());
    }
    if let Some(caller) = caller {
        t.insert("caller".into(), caller.into());
    }
    let mut case = parse_case(Path::new("-"), &t)?;
    case.body = body;
    Ok(case)
}

/// Runs cases against a configuration.
pub fn run(config: &Config, cases: Vec<Case>) -> Report {
    let results = cases
        .into_iter()
        .map(|case| {
            let decision = decide(config, &case);
            let failure = check(&case, &decision);
            CaseResult { case, failure }
        })
        .collect();
    Report { results }
}

fn check(case: &Case, decision: &Decision) -> Option<String> {
    let rule_ids = |violations: &[crate::policy::Violation]| {
        let mut ids: Vec<String> = violations.iter().map(|v| v.rule.to_string()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    let got = rule_ids(&decision.violations);
    let got_dry = rule_ids(&decision.dry_run_violations);
    let verdict = |allowed: bool| if allowed { "allow" } else { "deny" };
    let explain = || {
        let messages: Vec<String> = decision
            .violations
            .iter()
            .map(|v| format!("{}: {}", v.rule, v.message))
            .collect();
        if messages.is_empty() {
            String::new()
        } else {
            format!(" ({})", messages.join("; "))
        }
    };
    if decision.allowed() != case.expect_allow {
        return Some(format!(
            "expected {}, got {}{}",
            verdict(case.expect_allow),
            verdict(decision.allowed()),
            explain()
        ));
    }
    if let Some(rules) = &case.rules {
        if *rules != got {
            return Some(format!(
                "expected rules {rules:?}, got {got:?}{}",
                explain()
            ));
        }
    }
    if let Some(rules) = &case.dry_run_rules {
        if *rules != got_dry {
            return Some(format!("expected dry-run rules {rules:?}, got {got_dry:?}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigSource;

    fn run_text(config: &str, cases: &str) -> Report {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cases.toml");
        std::fs::write(&path, cases).unwrap();
        let config = Config::parse(config, ConfigSource::BuiltIn).unwrap();
        run(&config, load_cases(&path).unwrap())
    }

    const CONFIG: &str = r#"
[limits]
max_body_bytes = 100
[[policy.rule]]
id = "abac"
type = "forbidden-key"
keys = ["Project"]
"#;

    #[test]
    fn passing_and_failing_cases_are_reported() {
        let report = run_text(
            CONFIG,
            r#"
[[case]]
name = "denied"
operation = "TagResource"
body = '{"KeyId":"k","Tags":[{"TagKey":"project","TagValue":"x"}]}'
expect = "deny"
rules = ["abac"]

[[case]]
name = "wrong expectation"
operation = "TagResource"
body = '{"KeyId":"k","Tags":[{"TagKey":"team","TagValue":"x"}]}'
expect = "deny"

[[case]]
name = "gzip refused"
operation = "TagResource"
body = '{"KeyId":"k","Tags":[]}'
headers = [["Content-Encoding", "gzip"]]
expect = "deny"
rules = ["request"]

[[case]]
name = "too big"
operation = "CreateKey"
body = '{}'
pad_body_to = 101
expect = "deny"

[[case]]
name = "not utf-8"
operation = "TagResource"
body_hex = "7b224b65794964223a22ff227d"
expect = "deny"
rules = ["request"]

[[case]]
name = "two targets"
operation = "Encrypt"
headers = [["X-Amz-Target", "TrentService.Encrypt"], ["X-Amz-Target", "TrentService.TagResource"]]
body = '{}'
expect = "deny"

[[case]]
name = "pass-through"
operation = "Encrypt"
body = '{not json at all'
expect = "allow"

[[case]]
name = "another protocol behind a pass-through target"
operation = "Encrypt"
body = '{"Plaintext":"&Action=TagResource&"}'
expect = "deny"
rules = ["request"]
"#,
        );
        assert_eq!(report.passed(), 7, "{report}");
        assert_eq!(report.failed(), 1);
        let text = report.to_string();
        assert!(text.contains("FAIL"), "{text}");
        assert!(
            text.contains("wrong expectation: expected deny, got allow"),
            "{text}"
        );
        assert!(text.ends_with("7 passed, 1 failed\n"), "{text}");
    }

    const CALLER_CONFIG: &str = r#"
[[policy.rule]]
id = "team-is-yours"
type = "caller-value"
key = "team"
caller = "spiffe://example.org/ns/{team}/sa/*"
value = "{team}"

[[policy.rule]]
id = "tenants"
type = "required-prefix"
prefixes = ["app:", "team", "Team"]
callers = ["spiffe://example.org/ns/*/sa/*"]
exempt_callers = ["spiffe://example.org/ns/platform/sa/*"]
"#;

    #[test]
    fn cases_are_sent_as_their_caller() {
        let report = run_text(
            CALLER_CONFIG,
            r#"
[[case]]
name = "a team tags its own keys"
operation = "TagResource"
body = '{"KeyId":"k","Tags":[{"TagKey":"team","TagValue":"payments"}]}'
caller = "spiffe://example.org/ns/payments/sa/api"
expect = "allow"
rules = []

[[case]]
name = "not as another team"
operation = "CreateKey"
body = '{"Tags":[{"TagKey":"team","TagValue":"billing"}]}'
caller = "spiffe://example.org/ns/payments/sa/api"
expect = "deny"
rules = ["team-is-yours"]

[[case]]
name = "without an identity the key cannot be set, and the tenant rule does not apply"
operation = "TagResource"
body = '{"KeyId":"k","Tags":[{"TagKey":"team","TagValue":"payments"},{"TagKey":"x","TagValue":"y"}]}'
expect = "deny"
rules = ["team-is-yours"]

[[case]]
name = "tenants are held to the prefix"
operation = "TagResource"
body = '{"KeyId":"k","Tags":[{"TagKey":"x","TagValue":"y"}]}'
caller = "spiffe://example.org/ns/payments/sa/api"
expect = "deny"
rules = ["tenants"]

[[case]]
name = "the platform team is exempt"
operation = "TagResource"
body = '{"KeyId":"k","Tags":[{"TagKey":"x","TagValue":"y"}]}'
caller = "spiffe://example.org/ns/platform/sa/ci"
expect = "allow"

[[case]]
name = "a wrong expectation shows the caller"
operation = "TagResource"
body = '{"KeyId":"k","Tags":[{"TagKey":"team","TagValue":"billing"}]}'
caller = "spiffe://example.org/ns/payments/sa/api"
expect = "allow"
"#,
        );
        assert_eq!(report.passed(), 5, "{report}");
        let text = report.text(false);
        assert!(
            text.contains("a wrong expectation shows the caller (as caller spiffe://example.org/ns/payments/sa/api): expected allow, got deny"),
            "{text}"
        );
        // The denial names the caller and the value it may set.
        assert!(
            text.contains("caller \"spiffe://example.org/ns/payments/sa/api\" may set tag key \"team\" only to \"payments\""),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&report.json("c")).unwrap();
        assert_eq!(
            json["cases"][0]["caller"],
            "spiffe://example.org/ns/payments/sa/api"
        );
        assert!(json["cases"][2]["caller"].is_null());
        let junit = report.junit("c");
        assert!(
            junit.contains("(as caller spiffe://example.org/ns/payments/sa/api): expected allow"),
            "{junit}"
        );
    }

    #[test]
    fn a_case_caller_must_be_an_identity_the_listener_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        for caller in [
            "spiffe://Example.org/ns/a",
            "spiffe://example.org/ns/../a",
            "",
            "a b",
        ] {
            std::fs::write(
                &path,
                format!("[[case]]\nname = \"x\"\nexpect = \"allow\"\noperation = \"TagResource\"\nbody = \"{{}}\"\ncaller = {caller:?}\n"),
            )
            .unwrap();
            let e = load_cases(&path).unwrap_err().to_string();
            assert!(
                e.contains("not an identity the listener would accept"),
                "{caller}: {e}"
            );
        }
    }

    /// The one decision, with the head's caller: the denial and the record carry it.
    #[test]
    fn decide_judges_the_heads_caller() {
        use crate::decide::{decide, Body, Verdict};
        let config = Config::parse(CALLER_CONFIG, ConfigSource::BuiltIn).unwrap();
        let case = request(
            "TagResource",
            br#"{"KeyId":"k","Tags":[{"TagKey":"Team","TagValue":"billing"}]}"#.to_vec(),
            None,
            None,
        )
        .unwrap();
        let judge = |caller: Option<&str>| {
            let head = Head {
                method: &Method::POST,
                uri: &Uri::from_static("/"),
                headers: &case.headers,
                tunnel_host: None,
                caller,
            };
            match decide(&head, Body::Whole(&case.body), &Rules::of(&config)) {
                Verdict::Judged { judgement, .. } => judgement,
                other => panic!("{other:?}"),
            }
        };
        for caller in [
            Some("spiffe://example.org/ns/payments/sa/api"),
            Some("spiffe://example.org/ns/billing/sa/api/x"),
            None,
        ] {
            let j = judge(caller);
            assert!(!j.allowed(), "{caller:?}");
            assert_eq!(j.caller.as_deref(), caller);
            let message = j.decision.denial_message();
            if let Some(caller) = caller {
                assert!(message.contains(caller), "{message}");
            }
        }
        let j = judge(Some("spiffe://example.org/ns/billing/sa/api"));
        assert!(j.allowed(), "{:?}", j.decision);
    }

    proptest::proptest! {
        /// A case's `caller` (and `explain --caller`) is taken exactly when a certificate naming
        /// it gives the listener a caller; a refused one says why.
        #[test]
        fn a_case_caller_is_taken_exactly_when_the_listener_takes_it(
            text in crate::identity::tests::identity_text(),
        ) {
            let listener = crate::identity::tests::listener_caller(&text);
            match request("TagResource", Vec::new(), None, Some(&text)) {
                Ok(case) => {
                    proptest::prop_assert!(listener.is_ok(), "{:?}: {:?}", text, listener);
                    proptest::prop_assert_eq!(case.caller.as_deref(), Some(text.as_str()));
                }
                Err(e) => {
                    proptest::prop_assert!(listener.is_err(), "{:?}: {}", text, e);
                    let why = crate::identity::check_caller(&text).unwrap_err();
                    proptest::prop_assert!(e.contains(why), "{}", e);
                }
            }
        }
    }

    #[test]
    fn bad_case_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[[case]]\nname = \"x\"\nexpect = \"maybe\"\noperation = \"TagResource\"\nbody = \"{}\"\n").unwrap();
        let e = load_cases(&path).unwrap_err();
        assert!(e.to_string().contains("expect must be"), "{e}");
        std::fs::write(
            &path,
            "[[case]]\nname = \"x\"\nexpect = \"allow\"\nbody = \"{}\"\n",
        )
        .unwrap();
        assert!(load_cases(&path).is_err());
    }
}
