//! The proxy's Prometheus metrics (contract section 8), served on the admin port.
//!
//! Label values are bounded: operation names come from the KMS model (or `unknown`), never from
//! the raw header, so a client cannot blow up the series count.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Log lines dropped because the reader of standard error was too slow (`crate::logs`). One per
/// process, like the log itself; every [`Metrics`] registers it.
static LOG_LINES_DROPPED: std::sync::LazyLock<Counter> = std::sync::LazyLock::new(Counter::default);

/// Counts a log line dropped (or lost to a broken standard error).
pub fn log_line_dropped() {
    LOG_LINES_DROPPED.inc();
}

/// How many log lines this process has dropped.
pub fn log_lines_dropped_total() -> u64 {
    LOG_LINES_DROPPED.get()
}

/// What became of a request, as `kms_tag_guard_requests_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// Passed through to KMS, which answered.
    pass,
    /// A tag change, allowed and forwarded; KMS answered.
    allow,
    /// Refused by the proxy: policy, unreadable request, foreign host, oversized body.
    deny,
    /// Not completed: upstream failure, or the audit log could not be written.
    error,
}

/// Which path a request took, as `kms_tag_guard_request_duration_seconds` splits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Class {
    /// Streamed through unread.
    pass,
    /// A tag change, read whole and judged (`Route::Judge`). The label keeps its published name.
    inspect,
}

/// Why an upstream exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum UpstreamErrorKind {
    /// Connecting, TLS or DNS failed, or the connection broke before an answer.
    connect,
    /// No answer head within `timeout_ms`.
    timeout,
    /// The answer broke off mid-body.
    response,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReloadResult {
    success,
    error,
}

/// What a reload reloads, as `kms_tag_guard_reloads_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reloaded {
    /// The `[policy]` of the config file.
    policy,
    /// The listener's certificate and key (`[listener] tls_cert`, `tls_key`).
    listener_cert,
    /// The interception CA (`[intercept] ca_cert`, `ca_key`).
    ca,
    /// The trust bundle of client certificates (`[listener] client_ca`).
    client_ca,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadLabels {
    what: Reloaded,
    result: ReloadResult,
}

/// What the connection budget did when `[limits].max_connections` was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ConnectionLimitAction {
    /// The oldest idle connection was asked to close to make room.
    evicted,
    /// Every connection had a request in flight: the new one was closed at once.
    refused,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LimitLabels {
    action: ConnectionLimitAction,
}

/// Which certificate `kms_tag_guard_certificate_expiry_seconds` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Certificate {
    /// The listener's certificate (`[listener] tls_cert`).
    listener_cert,
    /// The interception CA (`[intercept] ca_cert`).
    ca,
    /// The client CA bundle (`[listener] client_ca`): the latest notAfter of its CAs.
    client_ca,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CertificateLabels {
    what: Certificate,
}

/// Why the TLS listener refused a client certificate
/// (`kms_tag_guard_client_certificate_refusals_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ClientCertRefusal {
    /// `client_auth = "required"` and the client sent none.
    none,
    /// rustls' verifier refused it: another CA, expired, not for client authentication, ...
    invalid,
    /// It names no usable caller: two URI SANs, a malformed SPIFFE ID, a signing key usage.
    identity,
    /// A resumed TLS session brought back a certificate that has expired since.
    expired_session,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClientCertLabels {
    reason: ClientCertRefusal,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    operation: &'static str,
    decision: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClassLabels {
    class: Class,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: UpstreamErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: ReloadResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PolicyLabels {
    sha256: String,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Family<ClassLabels, Histogram>,
    upstream_errors: Family<KindLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    all_reloads: Family<ReloadLabels, Counter>,
    audit_write_failures: Counter,
    audit_queue: Gauge,
    audit_stalled: Gauge,
    audit_failed: Gauge,
    audit_queue_bytes: Gauge,
    policy_info: Family<PolicyLabels, Gauge>,
    leaf_cache_entries: Gauge,
    leaves_minted: Counter,
    connections_open: Gauge,
    connections_max: Gauge,
    connection_limit: Family<LimitLabels, Counter>,
    setup_timeouts: Counter,
    buffered_body_bytes: Gauge,
    buffered_body_bytes_max: Gauge,
    body_budget_refusals: Counter,
    certificate_expiry: Family<CertificateLabels, Gauge>,
    client_cert_refusals: Family<ClientCertLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "kms_tag_guard_requests",
            "Requests by KMS operation and what became of them",
            requests.clone(),
        );
        // 100 µs .. ~13 s: the pass path costs well under a millisecond, KMS answers in tens.
        let durations = Family::<ClassLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.5, 14))
        });
        registry.register_with_unit(
            "kms_tag_guard_request_duration",
            "Time from a request's arrival to the head of its answer",
            Unit::Seconds,
            durations.clone(),
        );
        let upstream_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "kms_tag_guard_upstream_errors",
            "Failed exchanges with KMS by kind",
            upstream_errors.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "kms_tag_guard_policy_reloads",
            "Policy reloads by result",
            reloads.clone(),
        );
        let all_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "kms_tag_guard_reloads",
            "Reloads by what was reloaded (policy, listener_cert, ca, client_ca) and result; a failed one keeps what was in use",
            all_reloads.clone(),
        );
        let audit_write_failures = Counter::default();
        registry.register(
            "kms_tag_guard_audit_write_failures",
            "Audit records that could not be written when they came (a failed write: kept and written when the sink recovers; or a full queue)",
            audit_write_failures.clone(),
        );
        let audit_queue = Gauge::default();
        registry.register(
            "kms_tag_guard_audit_queue_records",
            "Audit records accepted and not yet written",
            audit_queue.clone(),
        );
        let audit_stalled = Gauge::default();
        registry.register(
            "kms_tag_guard_audit_stalled",
            "1 while the audit log is stalled (its queue full, or a record not written within stall_timeout_ms): tag changes are refused",
            audit_stalled.clone(),
        );
        let audit_failed = Gauge::default();
        registry.register(
            "kms_tag_guard_audit_failed",
            "1 while the audit sink fails (its last write or fsync returned an error: a full disk, a closed pipe): tag changes are refused, and the records are written when it recovers",
            audit_failed.clone(),
        );
        let audit_queue_bytes = Gauge::default();
        registry.register(
            "kms_tag_guard_audit_queue_bytes",
            "Bytes of the audit records accepted and not yet written, and of the places held for outcome records to come ([audit].queue_max_bytes bounds it)",
            audit_queue_bytes.clone(),
        );
        let policy_info = Family::<PolicyLabels, Gauge>::default();
        registry.register(
            "kms_tag_guard_policy_info",
            "The policy in force: sha256 of the configuration file it was loaded from",
            policy_info.clone(),
        );
        let leaf_cache_entries = Gauge::default();
        registry.register(
            "kms_tag_guard_leaf_cache_entries",
            "Leaves minted for intercepted CONNECT tunnels that the bounded cache holds",
            leaf_cache_entries.clone(),
        );
        let leaves_minted = Counter::default();
        registry.register(
            "kms_tag_guard_leaves_minted",
            "Leaves minted for intercepted CONNECT tunnels",
            leaves_minted.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "kms_tag_guard_connections_open",
            "Client connections open (set-up, requests, tunnels)",
            connections_open.clone(),
        );
        let connections_max = Gauge::default();
        registry.register(
            "kms_tag_guard_connections_max",
            "The connection limit in force ([limits].max_connections, lowered to fit RLIMIT_NOFILE)",
            connections_max.clone(),
        );
        let connection_limit = Family::<LimitLabels, Counter>::default();
        registry.register(
            "kms_tag_guard_connection_limit",
            "Connections accepted at the limit: the oldest idle one evicted, or the new one refused",
            connection_limit.clone(),
        );
        let setup_timeouts = Counter::default();
        registry.register(
            "kms_tag_guard_connection_setup_timeouts",
            "Connections closed because their set-up (TLS, CONNECT, first request head) outlasted header_read_timeout_ms",
            setup_timeouts.clone(),
        );
        registry.register(
            "kms_tag_guard_log_lines_dropped",
            "Log lines dropped because the reader of standard error was slower than the proxy logs (logging never waits)",
            LOG_LINES_DROPPED.clone(),
        );
        let buffered_body_bytes = Gauge::default();
        registry.register(
            "kms_tag_guard_buffered_body_bytes",
            "Bytes of tag-bearing request bodies held (read whole, or reserved for a declared length)",
            buffered_body_bytes.clone(),
        );
        let buffered_body_bytes_max = Gauge::default();
        registry.register(
            "kms_tag_guard_buffered_body_bytes_max",
            "The budget of tag-bearing request bodies held at once ([limits].max_buffered_body_bytes)",
            buffered_body_bytes_max.clone(),
        );
        let body_budget_refusals = Counter::default();
        registry.register(
            "kms_tag_guard_body_budget_refusals",
            "Tag changes refused with 503 because their body did not fit in [limits].max_buffered_body_bytes",
            body_budget_refusals.clone(),
        );
        let certificate_expiry = Family::<CertificateLabels, Gauge>::default();
        registry.register_with_unit(
            "kms_tag_guard_certificate_expiry",
            "When the certificate in use ends (its notAfter), in seconds since the Unix epoch: the listener's (listener_cert), the interception CA (ca), the client CA bundle (client_ca, its latest CA)",
            Unit::Seconds,
            certificate_expiry.clone(),
        );
        let client_cert_refusals = Family::<ClientCertLabels, Counter>::default();
        registry.register(
            "kms_tag_guard_client_certificate_refusals",
            "TLS connections refused for their client certificate ([listener] client_ca), by reason: none, invalid, identity, expired_session",
            client_cert_refusals.clone(),
        );
        Metrics {
            registry,
            requests,
            durations,
            upstream_errors,
            reloads,
            all_reloads,
            audit_write_failures,
            audit_queue,
            audit_stalled,
            audit_failed,
            audit_queue_bytes,
            policy_info,
            leaf_cache_entries,
            leaves_minted,
            connections_open,
            connections_max,
            connection_limit,
            setup_timeouts,
            buffered_body_bytes,
            buffered_body_bytes_max,
            body_budget_refusals,
            certificate_expiry,
            client_cert_refusals,
        }
    }

    pub fn request(&self, operation: &'static str, decision: Outcome, class: Class, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                operation,
                decision,
            })
            .inc();
        self.durations
            .get_or_create(&ClassLabels { class })
            .observe(seconds);
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// A policy reload: counted in `kms_tag_guard_policy_reloads_total` (its published name)
    /// and in `kms_tag_guard_reloads_total{what="policy"}`.
    pub fn reload(&self, result: ReloadResult) {
        self.reloads.get_or_create(&ResultLabels { result }).inc();
        self.reloaded(Reloaded::policy, result);
    }

    /// A reload of `what` (certificates; policies through [`Metrics::reload`]).
    pub fn reloaded(&self, what: Reloaded, result: ReloadResult) {
        self.all_reloads
            .get_or_create(&ReloadLabels { what, result })
            .inc();
    }

    pub fn audit_write_failure(&self) {
        self.audit_write_failures.inc();
    }

    /// `delta` records more (or fewer) waiting in the audit queue.
    pub fn audit_queued(&self, delta: i64) {
        self.audit_queue.inc_by(delta);
    }

    pub fn audit_stalled(&self, stalled: bool) {
        self.audit_stalled.set(i64::from(stalled));
    }

    pub fn audit_failed(&self, failed: bool) {
        self.audit_failed.set(i64::from(failed));
    }

    /// `delta` bytes more (or fewer) held in the audit queue.
    pub fn audit_queue_bytes(&self, delta: i64) {
        self.audit_queue_bytes.inc_by(delta);
    }

    /// How many leaves the leaf cache holds.
    pub fn leaf_cache(&self, entries: usize) {
        self.leaf_cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    pub fn leaf_minted(&self) {
        self.leaves_minted.inc();
    }

    pub fn connections_open(&self, open: usize) {
        self.connections_open
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    pub fn connection_limit(&self, max: usize) {
        self.connections_max
            .set(i64::try_from(max).unwrap_or(i64::MAX));
    }

    pub fn connection_limited(&self, action: ConnectionLimitAction) {
        self.connection_limit
            .get_or_create(&LimitLabels { action })
            .inc();
    }

    /// A TLS connection refused for its client certificate.
    pub fn client_cert_refused(&self, reason: ClientCertRefusal) {
        self.client_cert_refusals
            .get_or_create(&ClientCertLabels { reason })
            .inc();
    }

    pub fn setup_timeout(&self) {
        self.setup_timeouts.inc();
    }

    /// `delta` bytes more (or fewer) of tag-bearing bodies held.
    pub fn body_budget_used(&self, delta: i64) {
        self.buffered_body_bytes.inc_by(delta);
    }

    pub fn body_budget_limit(&self, limit: u64) {
        self.buffered_body_bytes_max
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }

    pub fn body_budget_refused(&self) {
        self.body_budget_refusals.inc();
    }

    /// The certificate `what` in use ends at `not_after` (seconds since the Unix epoch).
    pub fn certificate_expiry(&self, what: Certificate, not_after: i64) {
        self.certificate_expiry
            .get_or_create(&CertificateLabels { what })
            .set(not_after);
    }

    /// Marks `sha256` as the policy in force, and only it.
    pub fn policy_in_force(&self, sha256: &str) {
        self.policy_info.clear();
        self.policy_info
            .get_or_create(&PolicyLabels {
                sha256: sha256.to_owned(),
            })
            .set(1);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// The content type of [`Metrics::encode`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_contract_names() {
        let m = Metrics::new();
        m.request("Encrypt", Outcome::pass, Class::pass, 0.001);
        m.request("TagResource", Outcome::deny, Class::inspect, 0.002);
        m.upstream_error(UpstreamErrorKind::timeout);
        m.reload(ReloadResult::error);
        m.audit_write_failure();
        m.policy_in_force("abc");
        m.policy_in_force("def");
        m.certificate_expiry(Certificate::ca, 1_900_000_000);
        let text = m.encode();
        for line in [
            "kms_tag_guard_requests_total{operation=\"Encrypt\",decision=\"pass\"} 1",
            "kms_tag_guard_requests_total{operation=\"TagResource\",decision=\"deny\"} 1",
            "kms_tag_guard_request_duration_seconds_count{class=\"inspect\"} 1",
            "kms_tag_guard_upstream_errors_total{kind=\"timeout\"} 1",
            "kms_tag_guard_policy_reloads_total{result=\"error\"} 1",
            "kms_tag_guard_reloads_total{what=\"policy\",result=\"error\"} 1",
            "kms_tag_guard_audit_write_failures_total 1",
            "kms_tag_guard_policy_info{sha256=\"def\"} 1",
            "kms_tag_guard_certificate_expiry_seconds{what=\"ca\"} 1900000000",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(!text.contains("sha256=\"abc\""));
    }
}
