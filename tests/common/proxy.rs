//! Starts the real proxy in process, on an ephemeral port, in front of a [`FakeKms`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kms_tag_guard::config::ConfigSource;
use kms_tag_guard::{Config, RunningProxy};
use serde_json::Value;

use super::FakeKms;

/// The policy most tests run against (`tests/fixtures/policy.toml`, which the policy unit tests,
/// the property tests and the fuzz target load too).
pub const TEST_POLICY: &str = include_str!("../fixtures/policy.toml");

/// The sections of a test configuration; each is the body of its TOML section.
pub struct ProxyConfig {
    /// Body of `[upstream]` beyond `endpoint` (e.g. `timeout_ms = 300`).
    pub upstream: String,
    /// `endpoint`: the fake's URL unless set.
    pub endpoint: Option<String>,
    /// No `endpoint` at all: requests go to `https://<Host>:443` for allowed hosts.
    pub without_endpoint: bool,
    pub limits: String,
    /// Body of `[audit]` beyond `path` (e.g. `fail_closed = false`).
    pub audit: String,
    /// The audit file; a fresh file in a temporary directory unless set.
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
    let dir = tempfile::tempdir().unwrap();
    let audit_path = config
        .audit_path
        .clone()
        .unwrap_or_else(|| dir.path().join("audit.log"));
    let endpoint = if config.without_endpoint {
        String::new()
    } else {
        let url = config
            .endpoint
            .clone()
            .unwrap_or_else(|| upstream.to_owned());
        format!("endpoint = \"{url}\"")
    };
    let admin = if config.admin { "127.0.0.1:0" } else { "" };
    let listener_address = config.listener_address.as_deref().unwrap_or("127.0.0.1:0");
    let text = format!(
        "[listener]\naddress = \"{listener_address}\"\n{}\n\n[admin]\naddress = \"{admin}\"\n\n\
         [shutdown]\n{}\n\n[upstream]\n{endpoint}\n{}\n\n[intercept]\n{}\n\n[limits]\n{}\n\n\
         [audit]\npath = \"{}\"\n{}\n\n{}\n",
        config.listener,
        config.shutdown,
        config.upstream,
        config.intercept,
        config.limits,
        audit_path.display(),
        config.audit,
        config.policy
    );
    let parsed = Config::parse(&text, ConfigSource::BuiltIn)
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{text}"));
    let proxy = kms_tag_guard::start(parsed).await.expect("proxy starts");
    let addr = proxy.local_addr();
    let admin_addr = proxy.admin_addr();
    TestProxy {
        proxy,
        addr,
        admin_addr,
        audit_path,
        _dir: dir,
    }
}
