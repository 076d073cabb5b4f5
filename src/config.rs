//! TOML configuration -> validated [`Config`], with every error at once, each with its key path
//! (read through [`crate::toml_reader`]). The `[policy]` section is compiled by
//! [`crate::policy::compile`]; this module reads the settings around it.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::Table;

use crate::glob::HostGlob;
use crate::policy::Policy;
use crate::toml_reader::{section, Errors, Reader};
pub use crate::toml_reader::{ConfigError, ConfigErrors};

/// The configuration compiled into the binary: `config/kms-tag-guard.toml`.
pub const DEFAULT_CONFIG: &str = include_str!("../config/kms-tag-guard.toml");

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    BuiltIn,
    File(PathBuf),
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::BuiltIn => f.write_str("the built-in config/kms-tag-guard.toml"),
            ConfigSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub source: ConfigSource,
    /// SHA-256 (hex) of the configuration text: `kms_tag_guard_policy_info{sha256}`.
    pub sha256: String,
    /// Every section but `[policy]`, as written: a reload compares them to say what needs a
    /// restart.
    pub restart_sections: Table,
    pub listener: ListenerConfig,
    pub admin: AdminConfig,
    pub upstream: UpstreamConfig,
    pub intercept: InterceptConfig,
    pub limits: LimitsConfig,
    pub audit: AuditConfig,
    pub shutdown: ShutdownConfig,
    pub policy: Arc<Policy>,
    /// The AWS Organizations tag policy file the policy imports (`[policy].org_tag_policy`):
    /// a reload watches it with the config file.
    pub org_tag_policy: Option<OrgTagPolicyFile>,
}

/// The tag policy file a configuration imports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgTagPolicyFile {
    /// Resolved against the config file's directory.
    pub path: PathBuf,
    /// SHA-256 (hex) of the text read.
    pub sha256: String,
}

impl Config {
    /// What the policy in force was built from: the config text's hash, and the imported tag
    /// policy's. A reload applies a configuration whose key differs from the one in force.
    pub fn policy_key(&self) -> String {
        match &self.org_tag_policy {
            Some(org) => format!("{}+{}", self.sha256, org.sha256),
            None => self.sha256.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// Client certificates on the TLS listener (`client_ca`, `client_auth`).
    pub client_auth: Option<ClientAuthConfig>,
}

/// `[listener] client_ca` and `client_auth`: the trust anchors client certificates are verified
/// against, and whether a client may come without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuthConfig {
    /// A PEM bundle of trust anchors (CA certificates).
    pub ca: PathBuf,
    pub mode: ClientAuth,
}

/// Whether the TLS listener requires a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A connection without a valid client certificate fails its handshake.
    Required,
    /// A connection may come without one (its requests then have no caller identity); one that
    /// presents a certificate must present a valid one.
    Optional,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// `None` when disabled with `address = ""`.
    pub address: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolver {
    System,
    Dns,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub allowed_hosts: Vec<HostGlob>,
    /// A fixed upstream (`scheme://authority`) for every request.
    pub endpoint: Option<http::uri::Uri>,
    pub ca_file: Option<PathBuf>,
    pub resolver: Resolver,
    pub connect_timeout: Duration,
    pub timeout: Duration,
}

impl UpstreamConfig {
    /// Whether a request addressed to `host` (`name[:port]`) may be forwarded: always with a fixed
    /// `endpoint`, else only when the name matches `allowed_hosts`.
    pub fn allows_host(&self, host: &str) -> bool {
        self.endpoint.is_some() || {
            let name = crate::glob::host_name(host);
            self.allowed_hosts.iter().any(|g| g.matches(name))
        }
    }
}

#[derive(Debug, Clone)]
pub struct InterceptConfig {
    pub ca: Option<TlsFiles>,
    pub tunnel_hosts: Vec<HostGlob>,
    /// How many minted leaves are kept (least recently used dropped first).
    pub leaf_cache_size: usize,
    /// Whether `ca_key` may be readable by its group (a Secret mounted for the pod's fsGroup).
    pub ca_key_group_readable: bool,
    /// A blind tunnel with no byte either way for this long is closed.
    pub tunnel_idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub max_body_bytes: u64,
    /// Client connections open at once (lowered at start to fit RLIMIT_NOFILE).
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// How long a kept-alive connection may wait between requests.
    pub idle_timeout: Duration,
    pub body_read_timeout: Duration,
    /// Streams an HTTP/2 client connection may have open at once (its SETTINGS).
    pub max_concurrent_streams: u32,
    /// The bytes of tag-bearing bodies read whole, all connections together; past it a tag
    /// change is answered 503.
    pub max_buffered_body_bytes: u64,
}

/// `[limits].max_concurrent_streams` unless set: a client connection's streams are a term of the
/// memory formula (docs/security.md), and SDKs open a few at most.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 16;

/// `[limits].max_buffered_body_bytes` unless set: 256 tag changes of the default largest body
/// at once.
pub const DEFAULT_MAX_BUFFERED_BODY_BYTES: u64 = 64 << 20;

/// `[limits].max_connections` unless set: at roughly 100 KiB per intercepted connection with
/// its KMS connection, about 100 MiB at the limit (docs/security.md).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditPath {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub path: AuditPath,
    pub fsync: bool,
    pub fail_closed: bool,
    /// How long a tag change waits for its decision record to be written.
    pub stall_timeout: Duration,
    /// How many records may wait for the writer (places held for outcome records included).
    pub queue_capacity: usize,
    /// How many bytes of records may wait for the writer (places held for outcome records
    /// included): `[audit].queue_max_bytes`.
    pub queue_max_bytes: usize,
    /// The Ed25519 key that signs checkpoints (`[audit].signing_key`), read by
    /// `crate::proxy::prepare`; none: the chain is not signed.
    pub signing_key: Option<PathBuf>,
    /// A checkpoint after this many records (`[audit].checkpoint_every`)...
    pub checkpoint_every: u64,
    /// ... or this long after the first record it covers (`[audit].checkpoint_interval_ms`).
    pub checkpoint_interval: Duration,
}

/// `[audit].queue_max_bytes` unless the config says otherwise: 16 MiB.
pub const DEFAULT_AUDIT_QUEUE_MAX_BYTES: usize = 16 * 1024 * 1024;
/// The smallest `[audit].queue_max_bytes`: the largest record and the place held for its outcome
/// must fit, with room to spare.
pub const MIN_AUDIT_QUEUE_MAX_BYTES: i64 = 128 * 1024;

#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    pub drain_delay: Duration,
    pub grace: Duration,
}

impl Config {
    /// The configuration compiled into the binary.
    pub fn built_in() -> Result<Config, ConfigErrors> {
        Config::parse(DEFAULT_CONFIG, ConfigSource::BuiltIn)
    }

    /// Reads and validates a configuration file: a regular file (a FIFO or a device is refused,
    /// never waited on) of at most [`crate::files::MAX_CONFIG_BYTES`].
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let source = ConfigSource::File(path.to_owned());
        match read_config_text(path) {
            Ok(text) => Config::parse(&text, source),
            // Reported once, as the file system said it: no error count, no repeated path.
            Err(message) => Err(ConfigErrors {
                origin: String::new(),
                errors: vec![ConfigError {
                    path: String::new(),
                    message,
                    at: None,
                    rule: None,
                }],
            }),
        }
    }

    /// Validates a configuration given as TOML text.
    pub fn parse(text: &str, source: ConfigSource) -> Result<Config, ConfigErrors> {
        let mut errors = Errors::default();
        let table = match text.parse::<Table>() {
            Ok(t) => t,
            Err(e) => {
                errors.push("", format!("not valid TOML: {}", e.message().trim_end()));
                errors.0[0].at = e
                    .span()
                    .map(|span| crate::toml_reader::line_column(text, span.start));
                return Err(errors.into_result(&source));
            }
        };
        let mut root = Reader::new(&table, "");
        let mut config = read_config(&mut root, &mut errors, source.clone(), sha256_hex(text));
        root.finish(&mut errors);
        if !errors.is_empty() {
            crate::toml_reader::Places::of(text).mark(&mut errors.0);
        }
        if errors.is_empty() {
            config.restart_sections = table;
            config.restart_sections.remove("policy");
            Ok(config)
        } else {
            Err(errors.into_result(&source))
        }
    }
}

/// The text of a configuration file, or why it cannot be had.
fn read_config_text(path: &Path) -> Result<String, String> {
    let (bytes, _) = crate::files::read(path, crate::files::MAX_CONFIG_BYTES).map_err(|e| {
        format!("{e}; --config names the configuration file (docs/configuration.md)")
    })?;
    String::from_utf8(bytes)
        .map_err(|e| format!("{}: the file is not UTF-8 text: {e}", path.display()))
}

/// How many minted leaves the cache holds unless `[intercept].leaf_cache_size` says otherwise:
/// every regional, FIPS and dual-stack KMS name of every region several times over, about 8 MiB.
pub const DEFAULT_LEAF_CACHE_SIZE: usize = 1024;

/// The hex SHA-256 of a configuration text.
pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_config(
    root: &mut Reader,
    errors: &mut Errors,
    source: ConfigSource,
    sha256: String,
) -> Config {
    static EMPTY: std::sync::OnceLock<Table> = std::sync::OnceLock::new();
    let empty = EMPTY.get_or_init(Table::new);

    let mut r = section(root, "listener", errors, empty);
    let address = socket_addr(&mut r, "address", errors, "127.0.0.1:8080");
    let tls = tls_pair(&mut r, "tls_cert", "tls_key", errors);
    let client_auth = read_client_auth(&mut r, errors, tls.is_some());
    let listener = ListenerConfig {
        address,
        tls,
        client_auth,
    };
    r.finish(errors);

    let mut r = section(root, "admin", errors, empty);
    let admin = AdminConfig {
        address: match r.string("address", errors) {
            Some("") => None,
            Some(_) | None => Some(socket_addr(&mut r, "address", errors, "127.0.0.1:9901")),
        },
    };
    r.finish(errors);

    let mut r = section(root, "upstream", errors, empty);
    let upstream = read_upstream(&mut r, errors);
    r.finish(errors);

    let mut r = section(root, "intercept", errors, empty);
    let intercept = InterceptConfig {
        ca: tls_pair(&mut r, "ca_cert", "ca_key", errors),
        tunnel_hosts: read_tunnel_hosts(&mut r, errors),
        leaf_cache_size: r
            .integer("leaf_cache_size", errors, 1)
            .map_or(DEFAULT_LEAF_CACHE_SIZE, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            }),
        ca_key_group_readable: r.boolean("ca_key_group_readable", errors).unwrap_or(false),
        tunnel_idle_timeout: r.millis("tunnel_idle_timeout_ms", errors, 60_000),
    };
    r.finish(errors);

    let mut r = section(root, "limits", errors, empty);
    let limits = LimitsConfig {
        max_body_bytes: r.integer("max_body_bytes", errors, 1).unwrap_or(262_144),
        max_connections: r
            .integer("max_connections", errors, 1)
            .map_or(DEFAULT_MAX_CONNECTIONS, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            }),
        header_read_timeout: r.millis("header_read_timeout_ms", errors, 10_000),
        idle_timeout: r.millis("idle_timeout_ms", errors, 120_000),
        body_read_timeout: r.millis("body_read_timeout_ms", errors, 10_000),
        max_concurrent_streams: r
            .integer("max_concurrent_streams", errors, 1)
            .map_or(DEFAULT_MAX_CONCURRENT_STREAMS, |n| {
                u32::try_from(n).unwrap_or(u32::MAX)
            }),
        max_buffered_body_bytes: r
            .integer("max_buffered_body_bytes", errors, 1)
            .unwrap_or(DEFAULT_MAX_BUFFERED_BODY_BYTES),
    };
    if limits.max_buffered_body_bytes < limits.max_body_bytes {
        errors.push(
            "limits.max_buffered_body_bytes",
            format!(
                "{} is less than max_body_bytes ({}): a tag change of the largest body allowed could never be read; raise it, or lower max_body_bytes",
                limits.max_buffered_body_bytes, limits.max_body_bytes
            ),
        );
    }
    r.finish(errors);

    let mut r = section(root, "audit", errors, empty);
    let audit = AuditConfig {
        path: match r.string("path", errors) {
            None | Some("-") => AuditPath::Stdout,
            Some("") => {
                errors.push(
                    "audit.path",
                    "may not be empty; use \"-\" for standard output or a file path",
                );
                AuditPath::Stdout
            }
            Some(p) => AuditPath::File(PathBuf::from(p)),
        },
        fsync: r.boolean("fsync", errors).unwrap_or(false),
        fail_closed: r.boolean("fail_closed", errors).unwrap_or(true),
        stall_timeout: r.millis("stall_timeout_ms", errors, 2_000),
        // Two at least: an allowed tag change's decision and the place held for its outcome.
        queue_capacity: r.integer("queue_capacity", errors, 2).unwrap_or(1024) as usize,
        queue_max_bytes: r
            .integer("queue_max_bytes", errors, MIN_AUDIT_QUEUE_MAX_BYTES)
            .map_or(DEFAULT_AUDIT_QUEUE_MAX_BYTES, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            }),
        signing_key: match r.string("signing_key", errors) {
            Some("") => {
                errors.push(
                    "audit.signing_key",
                    "may not be empty; name the key file `kms-tag-guard audit keygen --out FILE` wrote, or leave the key out",
                );
                None
            }
            other => other.map(PathBuf::from),
        },
        checkpoint_every: r.integer("checkpoint_every", errors, 1).unwrap_or(1000),
        checkpoint_interval: r.millis("checkpoint_interval_ms", errors, 60_000),
    };
    if audit.signing_key.is_none() {
        for key in ["checkpoint_every", "checkpoint_interval_ms"] {
            if r.has(key) {
                errors.push(
                    &format!("audit.{key}"),
                    "has no effect without audit.signing_key (checkpoints are signed): set the key, or remove this",
                );
            }
        }
    }
    r.finish(errors);

    let mut r = section(root, "shutdown", errors, empty);
    let shutdown = ShutdownConfig {
        drain_delay: Duration::from_millis(r.integer("drain_delay_ms", errors, 0).unwrap_or(0)),
        grace: r.millis("grace_ms", errors, 30_000),
    };
    r.finish(errors);

    let mut r = section(root, "policy", errors, empty);
    let org_path = r
        .string("org_tag_policy", errors)
        .map(|file| org_policy_path(file, &source));
    let org_text = match &org_path {
        Some(path) if path.as_os_str().is_empty() => {
            errors.push(
                "policy.org_tag_policy",
                "may not be empty; name the file describe-effective-policy wrote, or leave the key out",
            );
            None
        }
        Some(path) => match read_config_text(path) {
            Ok(text) => Some(text),
            Err(message) => {
                errors.push(
                    "policy.org_tag_policy",
                    format!("{}: {message}", path.display()),
                );
                None
            }
        },
        None => None,
    };
    let shown = org_path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let org_tag_policy = org_path
        .zip(org_text.as_deref())
        .map(|(path, text)| OrgTagPolicyFile {
            path,
            sha256: sha256_hex(text),
        });
    let org = org_text
        .as_deref()
        .map(|text| crate::policy::OrgPolicyText { file: &shown, text });
    // The digest of what the policy was built from: the config text, and the imported tag
    // policy's text when there is one (`policy_sha256` in decision records).
    let policy_sha256 = match &org_tag_policy {
        Some(file) => sha256_hex(&format!("{sha256}+{}", file.sha256)),
        None => sha256.clone(),
    };
    let policy = crate::policy::compile(&mut r, errors, org).with_sha256(&policy_sha256);
    r.finish(errors);

    Config {
        source,
        sha256,
        restart_sections: Table::new(),
        listener,
        admin,
        upstream,
        intercept,
        limits,
        audit,
        shutdown,
        policy: Arc::new(policy),
        org_tag_policy,
    }
}

/// The tag policy file a configuration text names (`[policy].org_tag_policy`), resolved, whether
/// or not the rest of it is valid: what a reload watches.
pub fn org_tag_policy_named(text: &str, source: &ConfigSource) -> Option<PathBuf> {
    let table = text.parse::<Table>().ok()?;
    let file = table.get("policy")?.get("org_tag_policy")?.as_str()?;
    Some(org_policy_path(file, source))
}

/// The `org_tag_policy` file: a relative path is relative to the config file's directory (to the
/// working directory for the built-in configuration).
fn org_policy_path(file: &str, source: &ConfigSource) -> PathBuf {
    let path = Path::new(file);
    match source {
        ConfigSource::File(config) if path.is_relative() && !file.is_empty() => config
            .parent()
            .map_or_else(|| path.to_owned(), |dir| dir.join(path)),
        _ => path.to_owned(),
    }
}

fn socket_addr(r: &mut Reader, key: &str, errors: &mut Errors, default: &str) -> SocketAddr {
    let fallback = default.parse().expect("valid default address");
    let Some(text) = r.string(key, errors) else {
        return fallback;
    };
    text.parse().unwrap_or_else(|_| {
        errors.push(
            &r.key_path(key),
            format!("{text:?} is not an IP address and port such as {default:?}"),
        );
        fallback
    })
}

/// `[listener] client_ca` and `client_auth` (`required` unless said otherwise once `client_ca`
/// is set; an error without it, and without the listener's own certificate).
fn read_client_auth(r: &mut Reader, errors: &mut Errors, tls: bool) -> Option<ClientAuthConfig> {
    let ca = r.string("client_ca", errors);
    let mode = match r.string("client_auth", errors) {
        None | Some("required") => ClientAuth::Required,
        Some("optional") => ClientAuth::Optional,
        Some(other) => {
            errors.push(
                &r.key_path("client_auth"),
                format!("{other:?} is not a client_auth; use \"required\" or \"optional\""),
            );
            ClientAuth::Required
        }
    };
    match ca {
        None => {
            if r.has("client_auth") {
                errors.push(
                    &r.key_path("client_auth"),
                    "needs client_ca: set client_ca to the PEM bundle of the CAs that issue your clients' certificates (or remove client_auth)",
                );
            }
            None
        }
        Some("") => {
            errors.push(
                &r.key_path("client_ca"),
                "is empty; name the PEM bundle of the CAs that issue your clients' certificates, or remove the key",
            );
            None
        }
        Some(ca) => {
            if !tls {
                errors.push(
                    &r.key_path("client_ca"),
                    "client certificates need the listener to speak TLS: set tls_cert and tls_key too",
                );
            }
            Some(ClientAuthConfig {
                ca: ca.into(),
                mode,
            })
        }
    }
}

fn tls_pair(
    r: &mut Reader,
    cert_key: &str,
    key_key: &str,
    errors: &mut Errors,
) -> Option<TlsFiles> {
    let cert = r.string(cert_key, errors);
    let key = r.string(key_key, errors);
    match (cert, key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.into(),
            key: key.into(),
        }),
        (None, None) => None,
        (Some(_), None) => {
            errors.push(
                &r.key_path(key_key),
                format!("must be set together with {cert_key}"),
            );
            None
        }
        (None, Some(_)) => {
            errors.push(
                &r.key_path(cert_key),
                format!("must be set together with {key_key}"),
            );
            None
        }
    }
}

fn host_globs(r: &mut Reader, key: &str, errors: &mut Errors) -> Option<Vec<HostGlob>> {
    let path = r.key_path(key);
    let patterns = r.strings(key, errors)?;
    let mut globs = Vec::with_capacity(patterns.len());
    for (i, p) in patterns.iter().enumerate() {
        match HostGlob::new(p) {
            Ok(g) => globs.push(g),
            Err(e) => errors.push(&format!("{path}[{i}]"), e),
        }
    }
    Some(globs)
}

/// `[intercept].tunnel_hosts`: host globs, none of which may match a KMS endpoint name (KMS
/// traffic is intercepted and judged, never spliced blind).
fn read_tunnel_hosts(r: &mut Reader, errors: &mut Errors) -> Vec<HostGlob> {
    let path = r.key_path("tunnel_hosts");
    let Some(patterns) = r.strings("tunnel_hosts", errors) else {
        return Vec::new();
    };
    let mut globs = Vec::with_capacity(patterns.len());
    for (i, p) in patterns.iter().enumerate() {
        let glob = match HostGlob::new(p) {
            Ok(glob) => glob,
            Err(e) => {
                errors.push(&format!("{path}[{i}]"), e);
                continue;
            }
        };
        if let Some(name) = crate::endpoints::kms_name_matched_by(&glob) {
            errors.push(
                &format!("{path}[{i}]"),
                format!(
                    "{p:?} matches KMS endpoint names such as {name:?}, and KMS traffic is never tunnelled blind; list the other service's names instead (e.g. \"sts.*.amazonaws.com\")"
                ),
            );
            continue;
        }
        globs.push(glob);
    }
    globs
}

const DEFAULT_ALLOWED_HOSTS: [&str; 5] = [
    "kms.*.amazonaws.com",
    "kms-fips.*.amazonaws.com",
    "kms.*.amazonaws.com.cn",
    "kms.*.api.aws",
    "kms-fips.*.api.aws",
];

fn read_upstream(r: &mut Reader, errors: &mut Errors) -> UpstreamConfig {
    let allowed_hosts = host_globs(r, "allowed_hosts", errors).unwrap_or_else(|| {
        DEFAULT_ALLOWED_HOSTS
            .iter()
            .map(|h| HostGlob::new(h).expect("valid default glob"))
            .collect()
    });
    let endpoint = r.string("endpoint", errors).and_then(|text| {
        let path = r.key_path("endpoint");
        match parse_endpoint(text) {
            Ok(uri) => Some(uri),
            Err(e) => {
                errors.push(&path, e);
                None
            }
        }
    });
    let ca_file = r.string("ca_file", errors).map(PathBuf::from);
    if let Some(file) = &ca_file {
        if let Err(e) = std::fs::metadata(file) {
            errors.push(
                "upstream.ca_file",
                format!("cannot read {}: {e}", file.display()),
            );
        }
    }
    let resolver = match r.string("resolver", errors) {
        None | Some("system") => Resolver::System,
        Some("dns") => Resolver::Dns,
        Some(other) => {
            errors.push(
                "upstream.resolver",
                format!("{other:?} is not a resolver; use \"system\" or \"dns\""),
            );
            Resolver::System
        }
    };
    UpstreamConfig {
        allowed_hosts,
        endpoint,
        ca_file,
        resolver,
        connect_timeout: r.millis("connect_timeout_ms", errors, 3_000),
        timeout: r.millis("timeout_ms", errors, 30_000),
    }
}

fn parse_endpoint(text: &str) -> Result<http::uri::Uri, String> {
    let uri: http::uri::Uri = text.parse().map_err(|e| {
        format!(
            "{text:?} is not a URL ({e}); write it like \"https://kms.us-east-1.amazonaws.com\""
        )
    })?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("{text:?} must start with http:// or https://")),
    }
    if uri.authority().is_none() {
        return Err(format!("{text:?} has no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "{text:?} may not have a path or query: KMS requests always go to `/`"
        ));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(text: &str) -> Vec<String> {
        Config::parse(text, ConfigSource::BuiltIn)
            .unwrap_err()
            .errors
            .iter()
            .map(|e| {
                // Without the line and column: these tests name the mistakes by key path.
                let e = ConfigError {
                    at: None,
                    rule: None,
                    ..e.clone()
                };
                e.to_string()
            })
            .collect()
    }

    #[test]
    fn the_built_in_config_is_valid() {
        let config = Config::built_in().unwrap();
        assert_eq!(config.listener.address, "127.0.0.1:8080".parse().unwrap());
        assert!(config.policy.rule_count() > 0);
    }

    #[test]
    fn an_empty_config_takes_every_default() {
        let c = Config::parse("", ConfigSource::BuiltIn).unwrap();
        assert_eq!(c.limits.max_body_bytes, 262_144);
        assert_eq!(c.limits.max_concurrent_streams, 16);
        assert_eq!(c.limits.max_buffered_body_bytes, 64 << 20);
        assert_eq!(c.upstream.timeout, Duration::from_secs(30));
        assert_eq!(c.upstream.allowed_hosts.len(), 5);
        assert_eq!(c.audit.path, AuditPath::Stdout);
        assert!(c.audit.fail_closed);
        assert_eq!(c.policy.max_tags(), 50);
        assert_eq!(
            c.policy.unknown_operations(),
            crate::policy::UnknownOperations::Reject
        );
        assert_eq!(c.admin.address, Some("127.0.0.1:9901".parse().unwrap()));
        assert_eq!(c.audit.queue_capacity, 1024);
        assert_eq!(c.audit.queue_max_bytes, 16 * 1024 * 1024);
        assert_eq!(c.policy.sha256().as_ref(), sha256_hex(""));
    }

    #[test]
    fn checkpoints_need_a_signing_key() {
        let c = Config::parse(
            "[audit]\nsigning_key = \"/k\"\ncheckpoint_every = 5\n",
            ConfigSource::BuiltIn,
        )
        .unwrap();
        assert_eq!(
            c.audit.signing_key.as_deref(),
            Some(std::path::Path::new("/k"))
        );
        assert_eq!(c.audit.checkpoint_every, 5);
        assert_eq!(c.audit.checkpoint_interval, Duration::from_secs(60));
        let unsigned = Config::parse("", ConfigSource::BuiltIn).unwrap();
        assert_eq!(unsigned.audit.signing_key, None);
        let errors = errors_of("[audit]\ncheckpoint_interval_ms = 100\n");
        assert!(
            errors
                .iter()
                .any(|e| e.contains("audit.checkpoint_interval_ms")
                    && e.contains("without audit.signing_key")),
            "{errors:?}"
        );
        let errors = errors_of("[audit]\nsigning_key = \"\"\ncheckpoint_every = 0\n");
        assert!(
            errors.iter().any(|e| e.contains("audit.signing_key")),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.contains("audit.checkpoint_every")),
            "{errors:?}"
        );
    }

    #[test]
    fn the_audit_queue_holds_a_decision_and_its_outcome_at_least() {
        let c = Config::parse(
            "[audit]\nqueue_capacity = 2\nqueue_max_bytes = 131072\n",
            ConfigSource::BuiltIn,
        )
        .unwrap();
        assert_eq!(c.audit.queue_max_bytes, 131_072);
        let errors = errors_of("[audit]\nqueue_capacity = 1\nqueue_max_bytes = 65536\n");
        assert!(
            errors.iter().any(|e| e.contains("audit.queue_capacity")),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.contains("audit.queue_max_bytes")),
            "{errors:?}"
        );
    }

    #[test]
    fn reports_every_mistake_with_its_path() {
        let errors = errors_of(
            r#"
[listener]
adress = "127.0.0.1:1"
[limits]
max_body_bytes = "big"
[[policy.rule]]
id = "a"
type = "forbidden-key"
patterns = ["("]
[[policy.rule]]
id = "a"
type = "value-pattern"
key = "k"
[[policy.rule]]
type = "nope"
"#,
        );
        let expected = [
            "listener.adress: unknown key",
            "limits.max_body_bytes: expected an integer, found string",
            "policy.rule[0].patterns[0]: invalid regex \"(\"",
            "policy.rule[1].id: \"a\" is used by an earlier rule",
            "policy.rule[1].pattern: a value-pattern rule needs",
            "policy.rule[2].id: every rule needs an id",
            "policy.rule[2].type: \"nope\" is not a rule type",
        ];
        for e in expected {
            assert!(
                errors.iter().any(|x| x.starts_with(e)),
                "{e} not in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    }

    #[test]
    fn the_body_budget_holds_at_least_the_largest_body() {
        let errors = errors_of("[limits]\nmax_body_bytes = 1000\nmax_buffered_body_bytes = 999\n");
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].starts_with(
                "limits.max_buffered_body_bytes: 999 is less than max_body_bytes (1000)"
            ),
            "{errors:#?}"
        );
        let c = Config::parse(
            "[limits]\nmax_concurrent_streams = 4\nmax_buffered_body_bytes = 262144\n",
            ConfigSource::BuiltIn,
        )
        .unwrap();
        assert_eq!(c.limits.max_concurrent_streams, 4);
        assert_eq!(c.limits.max_buffered_body_bytes, 262_144);
        assert!(!errors_of("[limits]\nmax_concurrent_streams = 0\n").is_empty());
    }

    #[test]
    fn reports_toml_syntax_errors_with_a_line() {
        let errors = Config::parse("[listener]\naddress = \n", ConfigSource::BuiltIn)
            .unwrap_err()
            .errors;
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].at, Some((2, 11)), "{errors:?}");
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(errors[0].starts_with("line 2, column 11: "), "{errors:?}");
    }

    #[test]
    fn refuses_tunnel_hosts_that_can_match_a_kms_name() {
        let errors = errors_of(
            "[upstream]\nallowed_hosts = [\"kms.us-east-1.amazonaws.com\"]\n\
             [intercept]\ntunnel_hosts = [\"sts.*.amazonaws.com\", \"*.us-west-2.amazonaws.com\", \"kms-fips.*.api.aws\", \"*.*.*.*\"]\n",
        );
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors[0].starts_with("intercept.tunnel_hosts[1]: \"*.us-west-2.amazonaws.com\" matches KMS endpoint names such as \"kms.us-west-2.amazonaws.com\""), "{errors:#?}");
        assert!(errors[1].starts_with("intercept.tunnel_hosts[2]:"));
        assert!(errors[2].starts_with("intercept.tunnel_hosts[3]:"));
        let c = Config::parse(
            "[intercept]\ntunnel_hosts = [\"sts.*.amazonaws.com\", \"*.s3.us-east-1.amazonaws.com\"]\n",
            ConfigSource::BuiltIn,
        )
        .unwrap();
        assert_eq!(c.intercept.tunnel_hosts.len(), 2);
    }

    #[test]
    fn validates_endpoint_and_pairs() {
        let errors = errors_of(
            "[upstream]\nendpoint = \"ftp://x\"\n[listener]\ntls_cert = \"a\"\n[admin]\naddress = \"nope\"\n",
        );
        assert!(errors.iter().any(|e| e.starts_with("upstream.endpoint:")));
        assert!(errors.iter().any(|e| e.starts_with("listener.tls_key:")));
        assert!(errors.iter().any(|e| e.starts_with("admin.address:")));
        let c = Config::parse(
            "[upstream]\nendpoint = \"http://127.0.0.1:4566\"\n[admin]\naddress = \"\"\n",
            ConfigSource::BuiltIn,
        )
        .unwrap();
        assert_eq!(
            c.upstream.endpoint.unwrap().to_string(),
            "http://127.0.0.1:4566/"
        );
        assert_eq!(c.admin.address, None);
    }

    #[test]
    fn client_certificates_need_a_tls_listener_and_a_bundle() {
        let tls = "[listener]\ntls_cert = \"c\"\ntls_key = \"k\"\n";
        let c = Config::parse(
            &format!("{tls}client_ca = \"ca.pem\"\n"),
            ConfigSource::BuiltIn,
        )
        .unwrap();
        assert_eq!(
            c.listener.client_auth,
            Some(ClientAuthConfig {
                ca: "ca.pem".into(),
                mode: ClientAuth::Required
            })
        );
        let c = Config::parse(
            &format!("{tls}client_ca = \"ca.pem\"\nclient_auth = \"optional\"\n"),
            ConfigSource::BuiltIn,
        )
        .unwrap();
        assert_eq!(c.listener.client_auth.unwrap().mode, ClientAuth::Optional);
        for (text, key) in [
            (
                format!("{tls}client_auth = \"optional\"\n"),
                "listener.client_auth:",
            ),
            (
                format!("{tls}client_ca = \"ca.pem\"\nclient_auth = \"maybe\"\n"),
                "listener.client_auth:",
            ),
            (
                "[listener]\nclient_ca = \"ca.pem\"\n".to_owned(),
                "listener.client_ca:",
            ),
            (format!("{tls}client_ca = \"\"\n"), "listener.client_ca:"),
        ] {
            let errors = errors_of(&text);
            assert!(
                errors.iter().any(|e| e.starts_with(key)),
                "{text}: {errors:?}"
            );
        }
    }
}
