//! Helpers for the operations tests: admin-port requests and a small OpenMetrics parser, proxies
//! started in process from a configuration FILE (so the live reload has a file to read; the text
//! comes from [`super::ProxyConfig`]), atomic file replacement, and signed KMS requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kms_tag_guard::{Config, RunningProxy};

use super::raw::{self, RawResponse};

// ------------------------------------------------------------------------------ admin port

/// `GET path` on the admin port, on a fresh connection.
pub async fn admin_get(admin: SocketAddr, path: &str) -> RawResponse {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    raw::send(admin, request.as_bytes()).await
}

/// Like [`admin_get`], but an I/O error (e.g. the process is gone) is returned.
pub async fn try_admin_get(admin: SocketAddr, path: &str) -> std::io::Result<RawResponse> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    raw::try_send(admin, request.as_bytes()).await
}

/// Scrapes `/metrics` and parses it (panics on a malformed exposition).
pub async fn scrape(admin: SocketAddr) -> Scrape {
    let response = admin_get(admin, "/metrics").await;
    assert_eq!(response.status, 200, "{}", response.body_str());
    Scrape::parse(&response.body_str())
}

/// Scrapes `/metrics` until `done` holds of the exposition (a counter the proxy bumps after the
/// client already has its answer), for up to 5 s; the last scrape either way.
pub async fn scrape_when(admin: SocketAddr, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let m = scrape(admin).await;
        if done(&m) || Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Waits (up to 5 s) until the outcome of the tag change just answered is made: the proxy makes
/// it right after writing the answer, which the client may read first. Made means the last
/// record of `audit` (the decision's own write carried every earlier record out), or a record
/// held for the next write (`kms_tag_guard_audit_queue_records` above 0). A test that moves the
/// file away (rotation) waits for this first, or the outcome may go to the new file.
pub async fn outcome_made(admin: SocketAddr, audit: &std::path::Path) -> bool {
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let last = super::proxy::read_audit(audit).pop();
        if last.is_some_and(|record| record["event"] == "outcome") {
            return true;
        }
        let held = scrape(admin)
            .await
            .get("kms_tag_guard_audit_queue_records", &[])
            .unwrap_or(0.0);
        if held > 0.0 {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed OpenMetrics text exposition.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Scrape {
    /// Parses the OpenMetrics text format strictly enough for the tests: every line is a
    /// `# TYPE|HELP|UNIT` comment, the final `# EOF`, or `name{l="v",...} value [timestamp]`.
    pub fn parse(text: &str) -> Scrape {
        assert!(
            text.ends_with("# EOF\n"),
            "an OpenMetrics exposition ends with `# EOF`:\n{text}"
        );
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.is_empty() {
                panic!("empty line in the exposition:\n{text}");
            }
            if let Some(comment) = line.strip_prefix("# ") {
                let kind = comment.split(' ').next().unwrap_or("");
                assert!(
                    matches!(kind, "TYPE" | "HELP" | "UNIT" | "EOF"),
                    "unexpected comment line {line:?}"
                );
                continue;
            }
            samples.push(
                parse_sample(line).unwrap_or_else(|e| panic!("bad sample line {line:?}: {e}")),
            );
        }
        Scrape {
            samples,
            text: text.to_owned(),
        }
    }

    /// The value of the sample with exactly this name and exactly these labels.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut found = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == wanted);
        let first = found.next()?;
        assert!(
            found.next().is_none(),
            "{name}{wanted:?} appears twice:\n{}",
            self.text
        );
        Some(first.value)
    }

    /// Like [`Scrape::get`], with an absent series counting as 0 (a counter never incremented).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Every sample of this name.
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The sum over every sample of this name.
    pub fn sum(&self, name: &str) -> f64 {
        self.series(name).iter().map(|s| s.value).sum()
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or_else(|| "no value".to_owned())?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let mut consumed = None;
        loop {
            // label name
            let start = match chars.peek() {
                Some((_, '}')) => {
                    consumed = Some(chars.next().unwrap().0 + 1);
                    break;
                }
                Some((i, _)) => *i,
                None => break,
            };
            let mut eq = None;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    eq = Some(i);
                    break;
                }
            }
            let eq = eq.ok_or("label without `=`")?;
            let label = &inner[start..eq];
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {label:?}: value not quoted"));
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some('"') => value.push('"'),
                        Some('\\') => value.push('\\'),
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err("unterminated label value".into());
            }
            if labels.insert(label.to_owned(), value).is_some() {
                return Err(format!("label {label:?} repeated"));
            }
            match chars.next() {
                Some((_, ',')) => continue,
                Some((i, '}')) => {
                    consumed = Some(i + 1);
                    break;
                }
                other => return Err(format!("unexpected {other:?} after a label")),
            }
        }
        let consumed = consumed.ok_or("unterminated label set")?;
        rest = &inner[consumed..];
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or_else(|| "no space before the value".to_owned())?;
    let value_text = rest.split(' ').next().unwrap_or("");
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The hex SHA-256 of a file's bytes, computed here (not by the crate).
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).expect("read the file to hash");
    hex::encode(sha2::Sha256::digest(bytes))
}

// ------------------------------------------------------------------ configuration files

/// Replaces a file the way careful tools do: write a sibling, then rename it over the target,
/// so a reader never sees half a file.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, text).expect("write the new file");
    std::fs::rename(&tmp, path).expect("rename it into place");
}

/// A proxy started in process from a configuration file.
pub struct FileProxy {
    pub proxy: RunningProxy,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub config_path: PathBuf,
    pub audit_path: PathBuf,
    /// When `start` returned: the 5 s reload poll counts from about here.
    pub started: Instant,
}

impl FileProxy {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

/// Loads `config_path` with `Config::load` (so the proxy knows its file and polls it) and starts
/// the proxy; the config must enable the admin port.
pub async fn start_from_file(config_path: &Path) -> FileProxy {
    let config = Config::load(config_path)
        .unwrap_or_else(|e| panic!("config {} invalid:\n{e}", config_path.display()));
    let audit_path = match &config.audit.path {
        kms_tag_guard::config::AuditPath::File(path) => path.clone(),
        kms_tag_guard::config::AuditPath::Stdout => PathBuf::from("-"),
    };
    let proxy = kms_tag_guard::start(config).await.expect("proxy starts");
    let started = Instant::now();
    FileProxy {
        addr: proxy.local_addr(),
        admin_addr: proxy
            .admin_addr()
            .expect("the config enables the admin port"),
        proxy,
        config_path: config_path.to_owned(),
        audit_path,
        started,
    }
}

/// A port that was free a moment ago (bound to port 0, then released), for a listener whose
/// address must be known before it starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind port 0")
        .local_addr()
        .expect("address")
        .port()
}

// ------------------------------------------------------------------------ KMS requests

/// The key id the operations tests tag.
pub const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";

/// A `TagResource` body setting these tags on [`KEY`].
pub fn tag_body(tags: &[(&str, &str)]) -> String {
    let tags: Vec<serde_json::Value> = tags
        .iter()
        .map(|(k, v)| serde_json::json!({"TagKey": k, "TagValue": v}))
        .collect();
    serde_json::json!({"KeyId": KEY, "Tags": tags}).to_string()
}

/// An `UntagResource` body removing these keys from [`KEY`].
pub fn untag_body(keys: &[&str]) -> String {
    serde_json::json!({"KeyId": KEY, "TagKeys": keys}).to_string()
}

/// An `Encrypt` body.
pub fn encrypt_body() -> String {
    serde_json::json!({"KeyId": KEY, "Plaintext": "aGVsbG8="}).to_string()
}

/// A correctly signed `TrentService.<operation>` request addressed to `addr` (its Host).
pub fn signed(addr: SocketAddr, operation: &str, body: &str) -> super::RawRequest {
    super::RawRequest::signed_kms(
        &addr.to_string(),
        &format!("TrentService.{operation}"),
        body.as_bytes(),
    )
}

/// Sends one signed request on a fresh connection and reads the answer.
pub async fn call(addr: SocketAddr, operation: &str, body: &str) -> RawResponse {
    raw::send(addr, &signed(addr, operation, body).to_bytes()).await
}
