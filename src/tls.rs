//! TLS the proxy terminates: the listener's own certificate (reloaded from disk when it changes),
//! leaves minted on the fly for intercepted CONNECT tunnels, and `ca init`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::config::{sha256_hex, TlsFiles, DEFAULT_LEAF_CACHE_SIZE};
use crate::files::{self, Stamp};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("{0}")]
    File(String),
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("the key in {path} cannot be used: {detail}")]
    Key { path: String, detail: String },
    #[error("cannot mint a certificate: {0}")]
    Mint(String),
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("{path} may be {access} by other users (mode {mode:03o}); the interception CA's key signs certificates clients trust: chmod 600 {path}{hint}")]
    KeyAccess {
        path: String,
        mode: u32,
        access: &'static str,
        hint: &'static str,
    },
    #[error("{path} is not a CA certificate: {detail}; set ca_cert to the ca.pem `kms-tag-guard ca init` wrote")]
    NotCa { path: String, detail: String },
    #[error("{key} is not the private key of the certificate in {cert}; set ca_key to the ca.key written together with that ca.pem")]
    KeyMismatch { cert: String, key: String },
    #[error("{path} is not valid now: {detail}; install a certificate valid now (on a reload, the previous one stays in use)")]
    NotValidNow { path: String, detail: String },
    #[error("{path} cannot be the client CA bundle ([listener] client_ca): {detail}")]
    ClientCa { path: String, detail: String },
    #[error("{0} already exists; move it away or choose another --out directory")]
    Exists(PathBuf),
    #[error("{0} exists and is not a directory; --out names the directory to write ca.pem and ca.key into (it is created if absent)")]
    NotADirectory(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server configuration offering h2 and HTTP/1.1.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<ServerConfig, TlsError> {
    server_config_verifying(resolver, WebPkiClientVerifier::no_client_auth())
}

/// A rustls server configuration offering h2 and HTTP/1.1, verifying client certificates with
/// `clients` (`crate::mtls`).
pub fn server_config_verifying(
    resolver: Arc<dyn ResolvesServerCert>,
    clients: Arc<dyn ClientCertVerifier>,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(clients)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A PEM file: a regular file (never waited on) of at most [`files::MAX_PEM_BYTES`].
pub(crate) fn read(path: &Path) -> Result<(Vec<u8>, Stamp), TlsError> {
    files::read(path, files::MAX_PEM_BYTES).map_err(|e| TlsError::File(e.to_string()))
}

/// The certified key of a PEM pair, and its certificate's notAfter (seconds since the epoch).
fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    files: &TlsFiles,
) -> Result<(CertifiedKey, i64), TlsError> {
    let cert_path = files.cert.display().to_string();
    let key_path = files.key.display().to_string();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read {
            path: cert_path.clone(),
            detail: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert_path });
    }
    let not_after = check_valid_now(&chain[0], &cert_path, SystemTime::now())?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Key {
        path: key_path.clone(),
        detail: e.to_string(),
    })?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Key {
        path: key_path,
        detail: e.to_string(),
    })?;
    Ok((certified, not_after))
}

/// The listener's certificate, swapped in place when the files on disk change.
pub struct ListenerCert {
    files: TlsFiles,
    current: ArcSwap<CertifiedKey>,
    /// The notAfter of the certificate in `current`, in seconds since the epoch.
    not_after: AtomicI64,
    seen: Mutex<Seen>,
}

/// What the last look at the certificate files found.
struct Seen {
    /// SHA-256 of the certificate and key last loaded (or last found unusable).
    fingerprint: String,
    /// The files' stamps when last read: while they stay the same, the files are not read again.
    stamps: (Stamp, Stamp),
}

impl fmt::Debug for ListenerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerCert")
            .field("files", &self.files)
            .finish()
    }
}

impl ListenerCert {
    pub fn load(files: &TlsFiles) -> Result<ListenerCert, TlsError> {
        let ((cert, cert_stamp), (key, key_stamp)) = (read(&files.cert)?, read(&files.key)?);
        let (certified, not_after) = certified_key(&cert, &key, files)?;
        Ok(ListenerCert {
            files: files.clone(),
            current: ArcSwap::from_pointee(certified),
            not_after: AtomicI64::new(not_after),
            seen: Mutex::new(Seen {
                fingerprint: fingerprint(&cert, &key),
                stamps: (cert_stamp, key_stamp),
            }),
        })
    }

    /// Loads the files again if they changed. `Ok(true)` when a new certificate is in use; on an
    /// error the previous certificate stays. Files whose stamps are unchanged are not read, unless
    /// `forced`. Blocks on file I/O: call it off the runtime that accepts.
    pub fn reload_if_changed(&self, forced: bool) -> Result<bool, TlsError> {
        let stamps = (
            files::stamp(&self.files.cert).map_err(|e| TlsError::File(e.to_string()))?,
            files::stamp(&self.files.key).map_err(|e| TlsError::File(e.to_string()))?,
        );
        let unchanged = |seen: &Seen| seen.stamps == stamps;
        if !forced && unchanged(&self.lock_seen()) {
            return Ok(false);
        }
        let ((cert, cert_stamp), (key, key_stamp)) =
            (read(&self.files.cert)?, read(&self.files.key)?);
        let print = fingerprint(&cert, &key);
        let mut seen = self.lock_seen();
        // Remember the attempt either way: a half-written pair is retried when it changes again.
        seen.stamps = (cert_stamp, key_stamp);
        if seen.fingerprint == print {
            return Ok(false);
        }
        seen.fingerprint = print;
        let (certified, not_after) = certified_key(&cert, &key, &self.files)?;
        self.current.store(Arc::new(certified));
        self.not_after.store(not_after, Ordering::Relaxed);
        Ok(true)
    }

    /// When the certificate in use ends (its notAfter), in seconds since the Unix epoch.
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Ordering::Relaxed)
    }

    fn lock_seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) fn fingerprint(cert: &[u8], key: &[u8]) -> String {
    let mut both = String::from_utf8_lossy(cert).into_owned();
    both.push_str(&String::from_utf8_lossy(key));
    sha256_hex(&both)
}

impl ResolvesServerCert for ListenerCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// How long a minted leaf is valid, and how long before its end it is replaced.
const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(3600);
/// Minted leaves are valid from a little before now, for clients with a slow clock.
pub(crate) const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Mints short-lived leaf certificates for intercepted hosts, signed by the interception CA.
///
/// Leaves are cached per name in a bounded cache that drops the least recently used leaf when
/// full, so a client that CONNECTs to ever new names costs at most `capacity` leaves of memory.
/// Minting (a key generation and a signature) runs on the blocking pool, one at a time, with the
/// cache unlocked: a handshake whose leaf is cached never waits for a mint.
pub struct LeafMinter {
    /// The CA that signs new leaves; a reload swaps it (and empties the cache).
    signer: ArcSwap<Signer>,
    files: TlsFiles,
    group_readable: bool,
    /// What the last look at the CA files found (as for the listener's certificate).
    seen: Mutex<Seen>,
    cache: Mutex<LeafCache>,
    /// One mint at a time, whichever connection thread asks.
    minting: Arc<tokio::sync::Semaphore>,
    metrics: Option<Arc<Metrics>>,
}

/// The interception CA: its certificate and the key that signs with it.
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    ca: CertificateDer<'static>,
    /// The CA certificate's notAfter, in seconds since the epoch.
    not_after: i64,
    /// Counts CAs loaded: a leaf minted by an earlier one is not cached after a reload.
    generation: u64,
}

/// Leaves by lowercase host name, each with when it was last used.
struct LeafCache {
    entries: HashMap<String, CachedLeaf>,
    /// The generation of the CA whose leaves the cache holds.
    generation: u64,
    capacity: usize,
    /// Counts lookups; an entry's `used` is the count when it was last returned.
    clock: u64,
}

struct CachedLeaf {
    leaf: Arc<CertifiedKey>,
    renew_at: SystemTime,
    used: u64,
}

impl LeafCache {
    fn get(&mut self, host: &str, now: SystemTime) -> Option<Arc<CertifiedKey>> {
        self.clock += 1;
        let clock = self.clock;
        let entry = self.entries.get_mut(host)?;
        if now >= entry.renew_at {
            return None;
        }
        entry.used = clock;
        Some(Arc::clone(&entry.leaf))
    }

    /// Inserts a leaf, first dropping the least recently used one when the cache is full.
    fn insert(&mut self, host: String, leaf: Arc<CertifiedKey>, renew_at: SystemTime) {
        self.clock += 1;
        if !self.entries.contains_key(&host) && self.entries.len() >= self.capacity {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, entry)| entry.used)
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        let used = self.clock;
        self.entries.insert(
            host,
            CachedLeaf {
                leaf,
                renew_at,
                used,
            },
        );
    }
}

impl fmt::Debug for LeafMinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeafMinter")
    }
}

impl LeafMinter {
    /// Loads the CA with a cache of [`DEFAULT_LEAF_CACHE_SIZE`] leaves, after checking that the
    /// key is not open to other users (group read allowed with `group_readable`, as a mounted
    /// Kubernetes Secret needs), that the certificate is a CA, and that the key is its key.
    pub fn load(files: &TlsFiles, group_readable: bool) -> Result<LeafMinter, TlsError> {
        let (signer, seen) = load_ca(files, group_readable, 0)?;
        Ok(LeafMinter {
            signer: ArcSwap::from_pointee(signer),
            files: files.clone(),
            group_readable,
            seen: Mutex::new(seen),
            cache: Mutex::new(LeafCache {
                entries: HashMap::new(),
                generation: 0,
                capacity: DEFAULT_LEAF_CACHE_SIZE,
                clock: 0,
            }),
            minting: Arc::new(tokio::sync::Semaphore::new(1)),
            metrics: None,
        })
    }

    /// Loads the CA files again if they changed, with the checks made at start (key access, a
    /// CA, its key, valid now). `Ok(true)` when the new CA is in use: the leaf cache is emptied,
    /// so every leaf from then on is signed by it. On an error the previous CA stays. Files whose
    /// stamps are unchanged are not read, unless `forced`. Blocks on file I/O.
    pub fn reload_if_changed(&self, forced: bool) -> Result<bool, TlsError> {
        let stamps = (
            files::stamp(&self.files.cert).map_err(|e| TlsError::File(e.to_string()))?,
            files::stamp(&self.files.key).map_err(|e| TlsError::File(e.to_string()))?,
        );
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if !forced && seen.stamps == stamps {
            return Ok(false);
        }
        let generation = self.signer.load().generation + 1;
        let ((cert, cert_stamp), (key, key_stamp)) =
            (read(&self.files.cert)?, read(&self.files.key)?);
        let print = fingerprint(&cert, &key);
        // Remember the attempt either way: a bad pair is reported once, and read again when it
        // changes.
        seen.stamps = (cert_stamp, key_stamp);
        if seen.fingerprint == print {
            return Ok(false);
        }
        seen.fingerprint = print;
        let (signer, _) = load_ca(&self.files, self.group_readable, generation)?;
        let mut cache = self.lock();
        self.signer.store(Arc::new(signer));
        cache.entries.clear();
        cache.generation = generation;
        drop(cache);
        if let Some(metrics) = &self.metrics {
            metrics.leaf_cache(0);
        }
        Ok(true)
    }

    /// Holds at most `capacity` (at least 1) leaves.
    pub fn with_capacity(self, capacity: usize) -> LeafMinter {
        self.lock().capacity = capacity.max(1);
        self
    }

    /// Reports the cache's size and the leaves minted to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> LeafMinter {
        metrics.leaf_cache(self.len());
        self.metrics = Some(metrics);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LeafCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the CA in use ends (its notAfter), in seconds since the Unix epoch.
    pub fn not_after(&self) -> i64 {
        self.signer.load().not_after
    }

    /// How many leaves the cache holds.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cached leaf for `host`, while it has more than an hour to live.
    pub fn cached(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        self.lock()
            .get(&host.to_ascii_lowercase(), SystemTime::now())
    }

    /// A certificate for `host`: the cached one, or one minted now on this thread.
    pub fn leaf_for(&self, host: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        if let Some(leaf) = self.cached(host) {
            return Ok(leaf);
        }
        let host = host.to_ascii_lowercase();
        let now = SystemTime::now();
        let signer = self.signer.load_full();
        // Minted with the cache unlocked: other handshakes look it up meanwhile.
        let leaf = Arc::new(self.mint(&signer, &host, now)?);
        let renew_at = now + LEAF_LIFETIME - LEAF_RENEW_BEFORE;
        let len = {
            let mut cache = self.lock();
            // A CA reloaded during the mint: this leaf serves this handshake, and is not kept.
            if cache.generation == signer.generation {
                cache.insert(host, Arc::clone(&leaf), renew_at);
            }
            cache.entries.len()
        };
        if let Some(metrics) = &self.metrics {
            metrics.leaf_minted();
            metrics.leaf_cache(len);
        }
        Ok(leaf)
    }

    /// A certificate for `host` without blocking the caller's thread: the cached one, or one
    /// minted on the blocking pool, one mint at a time across the process.
    pub async fn leaf(self: &Arc<Self>, host: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        if let Some(leaf) = self.cached(host) {
            return Ok(leaf);
        }
        let one_at_a_time = Arc::clone(&self.minting)
            .acquire_owned()
            .await
            .map_err(|e| TlsError::Mint(e.to_string()))?;
        // Whoever held the permit before may have minted this very name.
        if let Some(leaf) = self.cached(host) {
            return Ok(leaf);
        }
        let minter = Arc::clone(self);
        let host = host.to_owned();
        // The permit goes with the mint: a handshake given up meanwhile (its deadline) does not
        // let a second mint start beside this one.
        tokio::task::spawn_blocking(move || {
            let leaf = minter.leaf_for(&host);
            drop(one_at_a_time);
            leaf
        })
        .await
        .map_err(|e| TlsError::Mint(e.to_string()))?
    }

    fn mint(&self, signer: &Signer, host: &str, now: SystemTime) -> Result<CertifiedKey, TlsError> {
        let mint_error = |e: rcgen::Error| TlsError::Mint(e.to_string());
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(mint_error)?;
        let mut params = CertificateParams::new(vec![host.to_owned()]).map_err(mint_error)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host);
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + LEAF_LIFETIME).into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&key, &signer.issuer).map_err(mint_error)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        CertifiedKey::from_der(
            vec![leaf.der().clone(), signer.ca.clone()],
            key_der,
            &provider(),
        )
        .map_err(|e| TlsError::Mint(e.to_string()))
    }
}

/// Reads and checks the interception CA: the key not open to other users (group read allowed
/// with `group_readable`, as a mounted Kubernetes Secret needs), the certificate a CA valid now,
/// the key its key.
fn load_ca(
    files: &TlsFiles,
    group_readable: bool,
    generation: u64,
) -> Result<(Signer, Seen), TlsError> {
    check_key_access(&files.key, group_readable)?;
    let (cert_bytes, cert_stamp) = read(&files.cert)?;
    let (key_bytes, key_stamp) = read(&files.key)?;
    let seen = Seen {
        fingerprint: fingerprint(&cert_bytes, &key_bytes),
        stamps: (cert_stamp, key_stamp),
    };
    let cert_pem = String::from_utf8_lossy(&cert_bytes).into_owned();
    let key_pem = String::from_utf8_lossy(&key_bytes).into_owned();
    let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Key {
        path: files.key.display().to_string(),
        detail: e.to_string(),
    })?;
    let ca = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .next()
        .ok_or_else(|| TlsError::NoCertificate {
            path: files.cert.display().to_string(),
        })?
        .map_err(|e| TlsError::Read {
            path: files.cert.display().to_string(),
            detail: e.to_string(),
        })?;
    check_ca(&ca, &key, files)?;
    let not_after = check_valid_now(&ca, &files.cert.display().to_string(), SystemTime::now())?;
    let issuer = Issuer::from_ca_cert_der(&ca, key).map_err(|e| TlsError::Read {
        path: files.cert.display().to_string(),
        detail: format!("not a CA certificate rcgen can sign with: {e}"),
    })?;
    Ok((
        Signer {
            issuer,
            ca,
            not_after,
            generation,
        },
        seen,
    ))
}

/// Refuses a certificate that has expired or is not valid yet (with [`CLOCK_SKEW`] of grace
/// for a `notBefore` just ahead of this host's clock): a pair a client would refuse is kept out
/// of service, at start and on every reload. Returns the certificate's notAfter, in seconds since
/// the Unix epoch.
fn check_valid_now(
    cert: &CertificateDer<'_>,
    path: &str,
    now: SystemTime,
) -> Result<i64, TlsError> {
    let invalid = |detail: String| TlsError::NotValidNow {
        path: path.to_owned(),
        detail,
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| invalid(format!("it cannot be parsed ({e})")))?;
    let unix = |t: SystemTime| match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    let validity = parsed.validity();
    let not_before = validity.not_before.timestamp();
    let not_after = validity.not_after.timestamp();
    if unix(now) > not_after {
        return Err(invalid(format!("it expired at {}", validity.not_after)));
    }
    if unix(now + CLOCK_SKEW) < not_before {
        return Err(invalid(format!(
            "it is not valid before {}",
            validity.not_before
        )));
    }
    Ok(not_after)
}

/// Refuses a key file that users other than its owner may write, or read (group read allowed
/// with `group_readable`). The mode is that of the file a symlink chain ends at, as it is read.
fn check_key_access(path: &Path, group_readable: bool) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).map_err(|e| TlsError::Read {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    let mode = metadata.permissions().mode() & 0o777;
    let (access, hint) = if mode & 0o022 != 0 {
        ("written", "")
    } else if mode & 0o004 != 0 {
        ("read", "")
    } else if mode & 0o040 != 0 && !group_readable {
        (
            "read",
            " (a Kubernetes Secret mounted with mode 0440 for the pod's fsGroup needs [intercept] ca_key_group_readable = true)",
        )
    } else {
        return Ok(());
    };
    Err(TlsError::KeyAccess {
        path: path.display().to_string(),
        mode,
        access,
        hint,
    })
}

/// Checks that `ca` is a CA certificate that may sign certificates, and that `key` is its key;
/// warns when its name constraints do not keep it to DNS names.
fn check_ca(ca: &CertificateDer<'_>, key: &KeyPair, files: &TlsFiles) -> Result<(), TlsError> {
    use rcgen::PublicKeyData;
    let cert_path = files.cert.display().to_string();
    let not_ca = |detail: String| TlsError::NotCa {
        path: cert_path.clone(),
        detail,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(ca)
        .map_err(|e| not_ca(format!("it cannot be parsed ({e})")))?;
    match cert.basic_constraints() {
        Ok(Some(constraints)) if constraints.value.ca => {}
        Ok(_) => return Err(not_ca("its basic constraints do not say CA:TRUE".into())),
        Err(e) => {
            return Err(not_ca(format!(
                "its basic constraints are unreadable ({e})"
            )))
        }
    }
    match cert.key_usage() {
        Ok(Some(usage)) if !usage.value.key_cert_sign() => {
            return Err(not_ca("its key usage does not include keyCertSign".into()))
        }
        Ok(_) => {}
        Err(e) => return Err(not_ca(format!("its key usage is unreadable ({e})"))),
    }
    if cert.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        return Err(TlsError::KeyMismatch {
            cert: cert_path,
            key: files.key.display().to_string(),
        });
    }
    let excludes_all_ips = cert.name_constraints().ok().flatten().is_some_and(|nc| {
        let excluded = nc.value.excluded_subtrees.as_deref().unwrap_or_default();
        let everything = |len: usize| {
            excluded.iter().any(|subtree| {
                matches!(subtree.base, x509_parser::extensions::GeneralName::IPAddress(ip)
                    if ip.len() == len && ip.iter().all(|b| *b == 0))
            })
        };
        everything(8) && everything(32)
    });
    if !excludes_all_ips {
        tracing::warn!(
            ca_cert = %cert_path,
            "the interception CA does not exclude every IP address in its name constraints, so a certificate signed with its key could vouch for an IP address; make a new CA with `kms-tag-guard ca init`"
        );
    }
    Ok(())
}

/// The AWS regions whose KMS host names `ca init` permits (name constraints cannot express
/// `kms.*.amazonaws.com`, so the names are listed).
pub const KMS_REGIONS: &[&str] = &[
    "af-south-1",
    "ap-east-1",
    "ap-east-2",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-northeast-3",
    "ap-south-1",
    "ap-south-2",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-southeast-3",
    "ap-southeast-4",
    "ap-southeast-5",
    "ap-southeast-6",
    "ap-southeast-7",
    "ca-central-1",
    "ca-west-1",
    "eu-central-1",
    "eu-central-2",
    "eu-north-1",
    "eu-south-1",
    "eu-south-2",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "il-central-1",
    "me-central-1",
    "me-south-1",
    "mx-central-1",
    "sa-east-1",
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "us-gov-east-1",
    "us-gov-west-1",
];

/// The China regions, under `amazonaws.com.cn` (dual-stack `api.amazonwebservices.com.cn`).
pub const KMS_CHINA_REGIONS: &[&str] = &["cn-north-1", "cn-northwest-1"];

/// The regions of the other partitions, with their DNS suffix (see `crate::endpoints`).
pub const KMS_OTHER_PARTITION_REGIONS: &[(&str, &str)] = &[
    ("us-iso-east-1", "c2s.ic.gov"),
    ("us-iso-west-1", "c2s.ic.gov"),
    ("us-isob-east-1", "sc2s.sgov.gov"),
    ("eu-isoe-west-1", "cloud.adc-e.uk"),
    ("us-isof-east-1", "csp.hci.ic.gov"),
    ("us-isof-south-1", "csp.hci.ic.gov"),
    ("eusc-de-east-1", "amazonaws.eu"),
];

/// Every KMS host name the interception CA may sign for.
pub fn kms_host_names() -> Vec<String> {
    let mut names = Vec::new();
    for service in crate::endpoints::SERVICE_LABELS {
        for region in KMS_REGIONS {
            names.push(format!("{service}.{region}.amazonaws.com"));
            names.push(format!("{service}.{region}.api.aws"));
        }
        for region in KMS_CHINA_REGIONS {
            names.push(format!("{service}.{region}.amazonaws.com.cn"));
            names.push(format!("{service}.{region}.api.amazonwebservices.com.cn"));
        }
        for (region, suffix) in KMS_OTHER_PARTITION_REGIONS {
            names.push(format!("{service}.{region}.{suffix}"));
        }
    }
    names
}

/// The name constraints of a CA from `ca init`: DNS names of KMS endpoints only; no IP address
/// (v4 or v6) at all; e-mail addresses only at the reserved name `invalid` (none, in effect).
/// URI and the other name forms are not used to identify TLS servers.
pub fn ca_name_constraints() -> NameConstraints {
    let mut permitted: Vec<GeneralSubtree> = kms_host_names()
        .into_iter()
        .map(GeneralSubtree::DnsName)
        .collect();
    permitted.push(GeneralSubtree::Rfc822Name("invalid".into()));
    NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: vec![
            GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
        ],
    }
}

/// `ca init`: writes `ca.pem` and `ca.key` (mode 0600) into `dir`, a new ECDSA P-256 CA whose
/// name constraints permit only the KMS host names and exclude every IP address
/// ([`ca_name_constraints`]). Refuses to overwrite.
pub fn ca_init(dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    ca_init_described(dir).map(|ca| (ca.cert, ca.key))
}

/// A CA [`ca_init_described`] wrote.
#[derive(Debug, Clone)]
pub struct NewCa {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The SHA-256 of the certificate's DER, upper-case hex pairs joined by `:`.
    pub sha256: String,
}

/// [`ca_init`], and what to tell the operator about the CA it wrote.
pub fn ca_init_described(dir: &Path) -> Result<NewCa, TlsError> {
    if dir.exists() && !dir.is_dir() {
        return Err(TlsError::NotADirectory(dir.to_owned()));
    }
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(TlsError::Exists(path.clone()));
        }
    }
    let mint_error = |e: rcgen::Error| TlsError::Mint(e.to_string());
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(mint_error)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "kms-tag-guard interception CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "kms-tag-guard");
    let now = SystemTime::now();
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + Duration::from_secs(5 * 365 * 24 * 3600)).into();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.name_constraints = Some(ca_name_constraints());
    let cert = params.self_signed(&key).map_err(mint_error)?;
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem()).map_err(|source| TlsError::Write {
        path: cert_path.display().to_string(),
        source,
    })?;
    use sha2::Digest;
    let sha256 = sha2::Sha256::digest(cert.der())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok(NewCa {
        cert: cert_path,
        key: key_path,
        not_before: params.not_before.into(),
        not_after: params.not_after.into(),
        sha256,
    })
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write_error = |source| TlsError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(write_error)?;
    file.write_all(contents).map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_init_writes_a_constrained_ca_that_mints_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ca_init(dir.path()).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(matches!(ca_init(dir.path()), Err(TlsError::Exists(_))));

        let minter = LeafMinter::load(&TlsFiles { cert, key }, false).unwrap();
        let a = minter.leaf_for("kms.us-east-1.amazonaws.com").unwrap();
        let b = minter.leaf_for("KMS.us-east-1.amazonaws.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b), "leaves are cached per name");
        assert_eq!(a.cert.len(), 2, "leaf and CA");
        assert!(kms_host_names().contains(&"kms.eu-west-1.amazonaws.com".to_owned()));
    }

    #[test]
    fn the_key_must_be_private_and_match_a_ca_certificate() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ca_init(&dir.path().join("a")).unwrap();
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        };
        let chmod =
            |mode| std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        for (mode, group_readable, ok) in [
            (0o600, false, true),
            (0o400, false, true),
            (0o640, false, false),
            (0o640, true, true),
            (0o440, true, true),
            (0o660, true, false),
            (0o604, true, false),
            (0o602, true, false),
            (0o644, true, false),
        ] {
            chmod(mode);
            let result = LeafMinter::load(&files, group_readable);
            assert_eq!(
                result.is_ok(),
                ok,
                "mode {mode:o}, group_readable {group_readable}"
            );
            if let Err(error) = result {
                assert!(matches!(error, TlsError::KeyAccess { .. }), "{error}");
                assert!(error.to_string().contains("chmod 600"), "{error}");
            }
        }
        chmod(0o600);

        // Another CA's key with this certificate.
        let (_, other_key) = ca_init(&dir.path().join("b")).unwrap();
        let mismatched = TlsFiles {
            cert: cert.clone(),
            key: other_key,
        };
        let error = LeafMinter::load(&mismatched, false).unwrap_err();
        assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error}");

        // A certificate that is not a CA, with its own key.
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::new(vec!["kms.us-east-1.amazonaws.com".to_owned()])
            .unwrap()
            .self_signed(&leaf_key)
            .unwrap();
        let leaf_files = TlsFiles {
            cert: dir.path().join("leaf.pem"),
            key: dir.path().join("leaf.key"),
        };
        std::fs::write(&leaf_files.cert, leaf.pem()).unwrap();
        write_private(&leaf_files.key, leaf_key.serialize_pem().as_bytes()).unwrap();
        let error = LeafMinter::load(&leaf_files, false).unwrap_err();
        assert!(matches!(error, TlsError::NotCa { .. }), "{error}");
    }

    #[test]
    fn the_leaf_cache_is_bounded_and_drops_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ca_init(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::new());
        let minter = LeafMinter::load(&TlsFiles { cert, key }, false)
            .unwrap()
            .with_capacity(4)
            .with_metrics(Arc::clone(&metrics));
        let name = |i: usize| format!("kms.xx-region-{i}.amazonaws.com");
        let first = minter.leaf_for(&name(0)).unwrap();
        for i in 1..4 {
            minter.leaf_for(&name(i)).unwrap();
        }
        // Name 0 is used again, so name 1 is now the least recently used.
        assert!(Arc::ptr_eq(&first, &minter.leaf_for(&name(0)).unwrap()));
        for i in 4..40 {
            minter.leaf_for(&name(i)).unwrap();
            assert!(minter.len() <= 4, "{} leaves after {i} names", minter.len());
            if i == 4 {
                assert!(minter.cached(&name(0)).is_some(), "recently used stays");
                assert!(
                    minter.cached(&name(1)).is_none(),
                    "least recently used goes"
                );
            }
        }
        assert_eq!(minter.len(), 4);
        let text = metrics.encode();
        assert!(
            text.contains("kms_tag_guard_leaf_cache_entries 4"),
            "{text}"
        );
        assert!(
            text.contains("kms_tag_guard_leaves_minted_total 40"),
            "{text}"
        );
    }
}
