//! Starts the real proxy in process, on an ephemeral port, in front of a [`FakeKms`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_tag_guard::config::ConfigSource;
use kms_tag_guard::{Config, RunningProxy};
use serde_json::Value;

use super::FakeKms;

/// The policy most tests run against (`tests/fixtures/policy.toml`, which the policy unit tests,
/// the property tests and the fuzz target load too).
pub const TEST_POLICY: &str = include_str!("../fixtures/policy.toml");

/// A test configuration, the one builder of configuration text for the in-process proxy
/// ([`start_proxy_with`]), a proxy started from a file ([`super::ops::start_from_file`]) and the
/// real binary ([`super::child::spawn_proxy`]). Each string is the body of its TOML section.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Body of `[upstream]` beyond `endpoint` (e.g. `timeout_ms = 300`).
    pub upstream: String,
    /// `endpoint`: the upstream's URL when the proxy is started in front of one, unless set.
    pub endpoint: Option<String>,
    /// No `endpoint` at all: requests go to `https://<Host>:443` for allowed hosts.
    pub without_endpoint: bool,
    pub limits: String,
    /// Body of `[audit]` beyond `path` (e.g. `fail_closed = false`).
    pub audit: String,
    /// The audit file; unless set, a fresh file in a temporary directory for the in-process
    /// proxy, standard output (`-`) for the real binary.
    pub audit_path: Option<PathBuf>,
    /// `[policy]` and its rules.
    pub policy: String,
    /// Serve the admin port (on an ephemeral port).
    pub admin: bool,
    /// Body of `[shutdown]`.
    pub shutdown: String,
    /// `[listener].address`: `127.0.0.1:0` unless set.
    pub listener_address: Option<String>,
    /// Body of `[listener]` beyond `address` (e.g. `tls_cert` / `tls_key`).
    pub listener: String,
    /// Body of `[intercept]` (e.g. `ca_cert`, `ca_key`, `tunnel_hosts`).
    pub intercept: String,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            upstream: String::new(),
            endpoint: None,
            without_endpoint: false,
            limits: String::new(),
            audit: String::new(),
            audit_path: None,
            policy: TEST_POLICY.to_owned(),
            admin: false,
            shutdown: String::new(),
            listener_address: None,
            listener: String::new(),
            intercept: String::new(),
        }
    }
}

impl ProxyConfig {
    /// The test policy in front of `endpoint` (`""`: none, requests go to `https://<Host>:443`),
    /// audit records to `audit_path`, and an admin port.
    pub fn with_admin(endpoint: &str, audit_path: &Path, policy: &str) -> ProxyConfig {
        ProxyConfig {
            endpoint: Some(endpoint.to_owned()),
            without_endpoint: endpoint.is_empty(),
            audit_path: Some(audit_path.to_owned()),
            policy: policy.to_owned(),
            admin: true,
            ..ProxyConfig::default()
        }
    }

    /// The configuration file text.
    pub fn render(&self) -> String {
        let endpoint = match (&self.endpoint, self.without_endpoint) {
            (Some(url), false) => format!("endpoint = \"{url}\""),
            _ => String::new(),
        };
        let admin = if self.admin { "127.0.0.1:0" } else { "" };
        let listener_address = self.listener_address.as_deref().unwrap_or("127.0.0.1:0");
        let audit_path = self
            .audit_path
            .as_ref()
            .map_or_else(|| "-".to_owned(), |path| path.display().to_string());
        format!(
            "[listener]\naddress = \"{listener_address}\"\n{}\n\n[admin]\naddress = \"{admin}\"\n\n\
             [shutdown]\n{}\n\n[upstream]\n{endpoint}\n{}\n\n[intercept]\n{}\n\n[limits]\n{}\n\n\
             [audit]\npath = \"{audit_path}\"\n{}\n\n{}\n",
            self.listener,
            self.shutdown,
            self.upstream,
            self.intercept,
            self.limits,
            self.audit,
            self.policy
        )
    }
}

pub struct TestProxy {
    pub proxy: RunningProxy,
    pub addr: SocketAddr,
    /// The admin port, when `ProxyConfig::admin` asked for one.
    pub admin_addr: Option<SocketAddr>,
    pub audit_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestProxy {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every audit record written so far, parsed.
    pub fn audit(&self) -> Vec<Value> {
        read_audit(&self.audit_path)
    }

    /// Every audit record, once each `allow` decision has its outcome ([`settled_audit`]).
    pub async fn settled_audit(&self) -> Vec<Value> {
        settled_audit(&self.audit_path).await
    }

    /// Waits (up to 5 s) until the audit log holds at least `n` records.
    pub async fn wait_for_audit(&self, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let records = self.audit();
            if records.len() >= n || tokio::time::Instant::now() > deadline {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The audit records once every `allow` decision has its outcome record, waiting up to 5 s
/// (an outcome is queued after the answer has gone out, so a client can see the answer before
/// the record is written); after the deadline, what there is.
pub async fn settled_audit(path: &std::path::Path) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let records = read_audit(path);
        let outcomes: Vec<&Value> = records
            .iter()
            .filter(|r| r["event"] == "outcome")
            .map(|r| &r["request_id"])
            .collect();
        let settled = records
            .iter()
            .filter(|r| r["event"] == "decision" && r["decision"] == "allow")
            .all(|r| outcomes.contains(&&r["request_id"]));
        if settled || tokio::time::Instant::now() > deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn read_audit(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("audit line {line:?}: {e}"))
        })
        .collect()
}

/// Starts the proxy with the test policy in front of `fake`.
pub async fn start_proxy(fake: &FakeKms) -> TestProxy {
    start_proxy_with(fake, ProxyConfig::default()).await
}

pub async fn start_proxy_with(fake: &FakeKms, config: ProxyConfig) -> TestProxy {
    let upstream = fake.url();
    start_proxy_to(&upstream, config).await
}

/// Starts the proxy with `endpoint = upstream` (unless `config` says otherwise), for upstreams
/// other than a [`FakeKms`] (e.g. [`super::moto::Moto`]).
pub async fn start_proxy_to(upstream: &str, config: ProxyConfig) -> TestProxy {
    try_start_proxy_to(upstream, config)
        .await
        .expect("proxy starts")
}

/// Like [`start_proxy_to`], for tests that expect the start to fail (e.g. a port it may not
/// bind): the error instead of a panic.
pub async fn try_start_proxy_to(
    upstream: &str,
    mut config: ProxyConfig,
) -> Result<TestProxy, kms_tag_guard::StartError> {
    let dir = tempfile::tempdir().unwrap();
    config.endpoint.get_or_insert_with(|| upstream.to_owned());
    let audit_path = config
        .audit_path
        .get_or_insert_with(|| dir.path().join("audit.log"))
        .clone();
    let text = config.render();
    let parsed = Config::parse(&text, ConfigSource::BuiltIn)
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{text}"));
    let proxy = kms_tag_guard::start(parsed).await?;
    let addr = proxy.local_addr();
    let admin_addr = proxy.admin_addr();
    Ok(TestProxy {
        proxy,
        addr,
        admin_addr,
        audit_path,
        _dir: dir,
    })
}
