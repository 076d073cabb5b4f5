//! Shared integration-test harness: test credentials, an independent SigV4 verifier/signer
//! (`sigv4`), an in-process fake KMS (`fake_kms`), raw HTTP/1.1 helpers (`raw`), an
//! aws-sdk-kms client builder that needs no aws-config, moto as a second upstream (`moto`), and
//! the installer of such third-party test programs (`deps`).
//!
//! A proxy under test is configured with [`ProxyConfig`] (the one builder of configuration text,
//! with the test policy of `tests/fixtures/policy.toml`) and started in process
//! ([`start_proxy_with`], or from a file: `ops::start_from_file`) or as the real binary
//! (`child::spawn_proxy`, the one launcher of a child process).
//!
//! Use from a test file with `mod common;`.
#![allow(dead_code, unused_imports)]

pub mod child;
pub mod deps;
pub mod fake_kms;
pub mod moto;
pub mod ops;
pub mod proxy;
pub mod raw;
pub mod sentinel;
pub mod sigv4;
pub mod tls_client;

use std::time::Duration;

pub use fake_kms::{FakeKms, Hook, Progress, Recorded};
pub use proxy::{
    start_proxy, start_proxy_to, start_proxy_with, try_start_proxy_to, ProxyConfig, TestProxy,
    TEST_POLICY,
};
pub use raw::{RawConn, RawRequest, RawResponse};
pub use sigv4::VerifiedCredential;

use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use aws_smithy_http_client::proxy::ProxyConfig as SdkProxyConfig;
use aws_smithy_http_client::tls::rustls_provider::CryptoMode;
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
use aws_smithy_http_client::Connector;

pub const ACCESS_KEY_ID: &str = "AKIDGUARDTEST0001";
pub const SECRET_KEY: &str = "guard/test/secret/Key0000000000000000000";
/// A second principal, e.g. for `exempt_principals`.
pub const EXEMPT_ACCESS_KEY_ID: &str = "AKIDGUARDEXEMPT001";
pub const EXEMPT_SECRET_KEY: &str = "guard/test/exempt/Key000000000000000000";
pub const REGION: &str = "us-east-1";

/// The secret the fake KMS knows for an access key id.
pub fn secret_for(access_key_id: &str) -> Option<String> {
    match access_key_id {
        ACCESS_KEY_ID => Some(SECRET_KEY.to_string()),
        EXEMPT_ACCESS_KEY_ID => Some(EXEMPT_SECRET_KEY.to_string()),
        _ => None,
    }
}

/// Options for [`kms_client_opts`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub access_key_id: String,
    pub secret_key: String,
    /// Adds `X-Amz-Security-Token` (signed) to every request.
    pub session_token: Option<String>,
    pub region: String,
    /// Total attempts including the first (1 = no retries).
    pub max_attempts: u32,
    /// Per-attempt timeout.
    pub attempt_timeout: Option<Duration>,
    /// PEM root(s) to trust for `https://` endpoints (the platform roots are never used).
    pub ca_pem: Option<Vec<u8>>,
    /// `http://host:port` forward proxy (HTTPS_PROXY-style: CONNECT for `https://`
    /// endpoints, absolute-form requests for `http://` ones).
    pub proxy: Option<String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            access_key_id: ACCESS_KEY_ID.into(),
            secret_key: SECRET_KEY.into(),
            session_token: None,
            region: REGION.into(),
            max_attempts: 1,
            attempt_timeout: None,
            ca_pem: None,
            proxy: None,
        }
    }
}

/// An SDK client for `endpoint_url` with the default test credentials and no retries.
pub fn kms_client(endpoint_url: &str) -> aws_sdk_kms::Client {
    kms_client_opts(endpoint_url, ClientOptions::default())
}

/// An SDK client with the given credentials and total attempts (1 = no retries).
pub fn kms_client_with(
    endpoint_url: &str,
    access_key_id: &str,
    secret_key: &str,
    max_attempts: u32,
) -> aws_sdk_kms::Client {
    kms_client_opts(
        endpoint_url,
        ClientOptions {
            access_key_id: access_key_id.into(),
            secret_key: secret_key.into(),
            max_attempts,
            ..ClientOptions::default()
        },
    )
}

/// An SDK client built without aws-config.
pub fn kms_client_opts(endpoint_url: &str, opts: ClientOptions) -> aws_sdk_kms::Client {
    // Never the platform roots: the tests talk to local servers only, and
    // aws-smithy-http-client debug-asserts that native roots exist when enabled.
    let mut trust = TrustStore::empty();
    if let Some(pem) = &opts.ca_pem {
        trust = trust.with_pem_certificate(pem.clone());
    }
    let tls_context = TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .expect("TLS context");
    let provider = tls::Provider::Rustls(CryptoMode::Ring);

    let http_client = match &opts.proxy {
        None => aws_smithy_http_client::Builder::new()
            .tls_provider(provider)
            .tls_context(tls_context)
            .build_https(),
        Some(proxy_url) => {
            let proxy = SdkProxyConfig::all(proxy_url.as_str()).expect("proxy URL");
            aws_smithy_http_client::Builder::new().build_with_connector_fn(
                move |settings, components| {
                    let mut builder = Connector::builder();
                    builder.set_connector_settings(settings.cloned());
                    if let Some(components) = components {
                        builder.set_sleep_impl(components.sleep_impl());
                    }
                    builder
                        .proxy_config(proxy.clone())
                        .tls_provider(provider.clone())
                        .tls_context(tls_context.clone())
                        .build()
                },
            )
        }
    };

    let retry = RetryConfig::standard()
        .with_max_attempts(opts.max_attempts.max(1))
        .with_initial_backoff(Duration::from_millis(5))
        .with_max_backoff(Duration::from_millis(50));
    let mut timeouts = TimeoutConfig::builder().connect_timeout(Duration::from_secs(5));
    if let Some(t) = opts.attempt_timeout {
        timeouts = timeouts.operation_attempt_timeout(t);
    }

    let credentials = Credentials::new(
        opts.access_key_id,
        opts.secret_key,
        opts.session_token,
        None,
        "test",
    );
    let config = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(opts.region))
        .credentials_provider(credentials)
        .endpoint_url(endpoint_url)
        .http_client(http_client)
        .retry_config(retry)
        .timeout_config(timeouts.build())
        .build();
    aws_sdk_kms::Client::from_conf(config)
}

/// Checks `done` every 10 ms until it holds or `timeout` has passed; whether it held.
pub async fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A tag for the SDK's requests.
pub fn tag(key: &str, value: &str) -> aws_sdk_kms::types::Tag {
    aws_sdk_kms::types::Tag::builder()
        .tag_key(key)
        .tag_value(value)
        .build()
        .unwrap()
}

/// [`tag`] for each (key, value).
pub fn tags(pairs: &[(&str, &str)]) -> Vec<aws_sdk_kms::types::Tag> {
    pairs.iter().map(|(k, v)| tag(k, v)).collect()
}

/// A denial as the SDK sees it: a modeled TagException (400) whose message names each of
/// `rules` (`rule <id>`).
pub fn assert_tag_exception<E, R>(
    result: Result<R, aws_sdk_kms::error::SdkError<E, aws_sdk_kms::config::http::HttpResponse>>,
    rules: &[&str],
) where
    E: aws_sdk_kms::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_kms::error::ProvideErrorMetadata;
    let error = result.expect_err("the proxy must deny");
    let status = error.raw_response().map(|r| r.status().as_u16());
    assert_eq!(status, Some(400), "{}", error_chain(&error));
    assert_eq!(
        error.code(),
        Some("TagException"),
        "{}",
        error_chain(&error)
    );
    let message = error.message().unwrap_or_default().to_owned();
    for rule in rules {
        assert!(
            message.contains(&format!("rule {rule}")),
            "{rule} not in {message}"
        );
    }
}

/// The display chain of an SDK error (`DisplayErrorContext`-like), for assertion messages.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
