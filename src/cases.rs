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
    pub name: String,
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

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for result in &self.results {
            if let Some(failure) = &result.failure {
                writeln!(
                    f,
                    "FAIL {}: {}: {failure}",
                    result.case.file.display(),
                    result.case.name
                )?;
            }
        }
        writeln!(f, "{} passed, {} failed", self.passed(), self.failed())
    }
}

const CASE_KEYS: [&str; 11] = [
    "name",
    "operation",
    "target",
    "body",
    "body_hex",
    "pad_body_to",
    "headers",
    "access_key_id",
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
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let table = item
                .as_table()
                .ok_or_else(|| error(format!("case[{i}] is not a table")))?;
            parse_case(path, table).map_err(|m| error(format!("case[{i}]: {m}")))
        })
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
    Ok(Case {
        file: path.to_owned(),
        name,
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
    };
    decision(&head, &case.body, &Rules::of(config))
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
