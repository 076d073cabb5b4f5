//! Client certificates on the TLS listener (`[listener] client_ca`, `client_auth`): the trust
//! bundle, read and checked at start and reloaded like the listener's certificate; the verifier
//! (rustls' WebPKI client verifier for the chain, the validity period and the client-auth key
//! usage, then the SPIFFE rules of [`crate::identity`]); the listener's rustls configuration,
//! rebuilt when the bundle changes; and the caller a verified connection carries.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, ServerConnection, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::config::{ClientAuth, ClientAuthConfig, TlsFiles};
use crate::files::{self, Stamp};
use crate::identity::{identity_of, IdentityError};
use crate::metrics::ClientCertRefusal;
use crate::tls::{self, ListenerCert, TlsError, CLOCK_SKEW};

/// The TLS listener: its certificate, and the client certificates it asks for.
pub struct ListenerTls {
    cert: Arc<ListenerCert>,
    client: Option<ClientCa>,
    /// The rustls configuration new connections get. Rebuilt when the trust bundle changes, so
    /// that it also starts with an empty session cache: no TLS session verified against the
    /// old bundle is resumed under the new one.
    config: ArcSwap<ServerConfig>,
}

impl fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerTls")
            .field("cert", &self.cert)
            .field("client", &self.client.as_ref().map(|c| &c.path))
            .finish()
    }
}

/// The trust bundle of client certificates and what the last look at its file found.
struct ClientCa {
    path: PathBuf,
    mode: ClientAuth,
    /// The latest notAfter of the CAs in use (when the bundle stops vouching for anyone), in
    /// seconds since the Unix epoch.
    not_after: AtomicI64,
    /// SHA-256 of the bundle last loaded (or last found unusable) and the file's stamp then.
    seen: Mutex<(String, Stamp)>,
}

/// The CAs of a bundle usable now, and the latest notAfter among them.
struct Bundle {
    roots: Arc<RootCertStore>,
    not_after: i64,
}

impl ListenerTls {
    /// Reads and checks the listener's certificate and key and, when configured, the client CA
    /// bundle.
    pub fn load(
        files: &TlsFiles,
        client: Option<&ClientAuthConfig>,
    ) -> Result<ListenerTls, TlsError> {
        let cert = Arc::new(ListenerCert::load(files)?);
        let (client, bundle) = match client {
            None => (None, None),
            Some(client) => {
                let (bytes, stamp) = tls::read(&client.ca)?;
                let bundle = load_bundle(&client.ca, &bytes, SystemTime::now())?;
                let ca = ClientCa {
                    path: client.ca.clone(),
                    mode: client.mode,
                    not_after: AtomicI64::new(bundle.not_after),
                    seen: Mutex::new((tls::fingerprint(&bytes, b""), stamp)),
                };
                (Some(ca), Some(bundle))
            }
        };
        let config = build(
            &cert,
            client
                .as_ref()
                .zip(bundle)
                .map(|(c, b)| (&*c.path, c.mode, b)),
        )?;
        Ok(ListenerTls {
            cert,
            client,
            config: ArcSwap::from_pointee(config),
        })
    }

    /// The listener's own certificate (reloaded in place).
    pub fn cert(&self) -> &Arc<ListenerCert> {
        &self.cert
    }

    /// The rustls configuration for a new connection.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    /// Whether client certificates are asked for, and how.
    pub fn client_auth(&self) -> Option<ClientAuth> {
        self.client.as_ref().map(|c| c.mode)
    }

    /// When the client CA bundle stops vouching for anyone (the latest notAfter of its CAs in
    /// use), in seconds since the Unix epoch; `None` without client certificates.
    pub fn client_ca_not_after(&self) -> Option<i64> {
        self.client
            .as_ref()
            .map(|c| c.not_after.load(Ordering::Relaxed))
    }

    /// Loads the client CA bundle again if it changed, with the checks made at start, and
    /// rebuilds the configuration new connections get. `Ok(true)` when a new bundle is in use;
    /// on an error the previous one stays. A file whose stamp is unchanged is not read, unless
    /// `forced`. Blocks on file I/O.
    pub fn reload_client_ca_if_changed(&self, forced: bool) -> Result<bool, TlsError> {
        let Some(client) = &self.client else {
            return Ok(false);
        };
        let stamp = files::stamp(&client.path).map_err(|e| TlsError::File(e.to_string()))?;
        let mut seen = client.seen.lock().unwrap_or_else(|e| e.into_inner());
        if !forced && seen.1 == stamp {
            return Ok(false);
        }
        let (bytes, stamp) = tls::read(&client.path)?;
        let print = tls::fingerprint(&bytes, b"");
        // Remember the attempt either way: a bad bundle is reported once, and read again when
        // it changes.
        seen.1 = stamp;
        if seen.0 == print {
            return Ok(false);
        }
        seen.0 = print;
        let bundle = load_bundle(&client.path, &bytes, SystemTime::now())?;
        let not_after = bundle.not_after;
        let config = build(&self.cert, Some((&client.path, client.mode, bundle)))?;
        self.config.store(Arc::new(config));
        client.not_after.store(not_after, Ordering::Relaxed);
        Ok(true)
    }

    /// The caller a connection's verified client certificate names (`None` without one, or
    /// when it names none), and when that certificate ends (seconds since the Unix epoch). A
    /// resumed TLS session brings back the certificate verified when the session began without
    /// verifying it again: one that has expired since is refused here.
    pub fn caller(
        &self,
        connection: &ServerConnection,
    ) -> Result<Option<(Arc<str>, i64)>, IdentityError> {
        if self.client.is_none() {
            return Ok(None);
        }
        let Some(leaf) = connection
            .peer_certificates()
            .and_then(|chain| chain.first())
        else {
            return Ok(None);
        };
        let identity = identity_of(leaf.as_ref())?;
        if unix_now() > identity.not_after {
            let at = x509_parser::time::ASN1Time::from_timestamp(identity.not_after)
                .map_or_else(|_| identity.not_after.to_string(), |t| t.to_string());
            return Err(IdentityError::Expired(at));
        }
        Ok(identity.caller.map(|caller| (caller, identity.not_after)))
    }
}

fn unix_now() -> i64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_secs()).unwrap_or(i64::MAX)
}

/// The listener's rustls configuration: without client certificates, or verifying them against
/// `bundle`.
fn build(
    cert: &Arc<ListenerCert>,
    client: Option<(&Path, ClientAuth, Bundle)>,
) -> Result<ServerConfig, TlsError> {
    let resolver = Arc::clone(cert) as _;
    let Some((path, mode, bundle)) = client else {
        return tls::server_config(resolver);
    };
    // No CA names in the CertificateRequest: a Go client whose chain does not reach one of the
    // names silently sends no certificate, and under `optional` would pass as anonymous.
    let mut builder = WebPkiClientVerifier::builder_with_provider(bundle.roots, tls::provider())
        .clear_root_hint_subjects();
    if mode == ClientAuth::Optional {
        builder = builder.allow_unauthenticated();
    }
    let inner = builder.build().map_err(|e| TlsError::ClientCa {
        path: path.display().to_string(),
        detail: format!("no verifier can be built on it ({e})"),
    })?;
    tls::server_config_verifying(resolver, Arc::new(WorkloadVerifier { inner }))
}

/// Reads a PEM bundle of trust anchors: every certificate must be a CA that may sign
/// certificates; CAs not valid now (expired, or not valid yet beyond [`CLOCK_SKEW`]) are left
/// out with a warning (a trust anchor's own validity is not checked when a chain is verified);
/// at least one must remain.
fn load_bundle(path: &Path, pem: &[u8], now: SystemTime) -> Result<Bundle, TlsError> {
    let error = |detail: String| TlsError::ClientCa {
        path: path.display().to_string(),
        detail,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| error(format!("it is not a PEM bundle ({e}); write the CA certificates in PEM (-----BEGIN CERTIFICATE-----)")))?;
    if certs.is_empty() {
        return Err(error("it holds no PEM certificate; put the PEM certificates of the CAs that issue your clients' certificates in it".into()));
    }
    let unix = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    };
    let mut roots = RootCertStore::empty();
    let mut not_after = i64::MIN;
    let mut left_out = Vec::new();
    for (index, der) in certs.iter().enumerate() {
        let n = index + 1;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| error(format!("certificate {n} cannot be parsed ({e})")))?;
        let named = format!("certificate {n} ({})", cert.subject());
        match cert.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(_) => return Err(error(format!("{named} is not a CA (its basic constraints do not say CA:TRUE); client_ca holds the CAs that issue client certificates, not the client certificates themselves"))),
            Err(e) => return Err(error(format!("{named} has unreadable basic constraints ({e})"))),
        }
        match cert.key_usage() {
            Ok(Some(ku)) if !ku.value.key_cert_sign() => {
                return Err(error(format!(
                    "{named} may not sign certificates (its key usage lacks keyCertSign)"
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(error(format!("{named} has an unreadable key usage ({e})"))),
        }
        if let Ok(Some(nc)) = cert.name_constraints() {
            let uri = |subtrees: &Option<Vec<x509_parser::extensions::GeneralSubtree<'_>>>| {
                subtrees
                    .iter()
                    .flatten()
                    .any(|s| matches!(s.base, x509_parser::extensions::GeneralName::URI(_)))
            };
            if uri(&nc.value.permitted_subtrees) || uri(&nc.value.excluded_subtrees) {
                tracing::warn!(client_ca = %path.display(), "{named} has URI name constraints, which the verifier cannot check: it refuses every client certificate with a URI SAN (every SPIFFE certificate) under this CA");
            }
        }
        let validity = cert.validity();
        let (from, until) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        if unix(now) > until || unix(now + CLOCK_SKEW) < from {
            left_out.push(format!(
                "{named}, valid from {} until {}",
                validity.not_before, validity.not_after
            ));
            continue;
        }
        roots
            .add(der.clone())
            .map_err(|e| error(format!("{named} cannot be a trust anchor ({e})")))?;
        not_after = not_after.max(until);
    }
    if roots.is_empty() {
        return Err(error(format!(
            "none of its CAs is valid now ({}); install the current bundle",
            left_out.join("; ")
        )));
    }
    for cert in &left_out {
        tracing::warn!(client_ca = %path.display(), "{cert}, is not valid now and is not trusted");
    }
    Ok(Bundle {
        roots: Arc::new(roots),
        not_after,
    })
}

/// rustls' WebPKI client verifier (chain to the bundle, validity, the client-auth extended key
/// usage), then the rules of a workload's certificate ([`identity_of`]): a certificate that names
/// no usable caller fails the handshake, so the client sees its certificate refused.
#[derive(Debug)]
struct WorkloadVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for WorkloadVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        identity_of(end_entity.as_ref()).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Why a failed handshake failed, when it was the client certificate that was refused (logged
/// louder, and counted, unlike a client that went away).
pub fn client_cert_refusal(error: &std::io::Error) -> Option<ClientCertRefusal> {
    match error.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::NoCertificatesPresented => Some(ClientCertRefusal::none),
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner)))
            if inner.downcast_ref::<IdentityError>().is_some() =>
        {
            Some(ClientCertRefusal::identity)
        }
        rustls::Error::InvalidCertificate(_) => Some(ClientCertRefusal::invalid),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
    use std::time::Duration;

    fn ca(valid: bool, is_ca: bool) -> String {
        let mut params = CertificateParams::default();
        if is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        }
        if !valid {
            params.not_after = (SystemTime::now() - Duration::from_secs(3600)).into();
            params.not_before = (SystemTime::now() - Duration::from_secs(7200)).into();
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn a_bundle_holds_cas_valid_now() {
        let path = Path::new("bundle.pem");
        let now = SystemTime::now();
        let good = load_bundle(
            path,
            format!("{}{}", ca(true, true), ca(false, true)).as_bytes(),
            now,
        )
        .unwrap();
        assert_eq!(good.roots.len(), 1, "the expired CA is left out");
        for (pem, says) in [
            (String::new(), "holds no PEM certificate"),
            ("garbage".to_owned(), "holds no PEM certificate"),
            (ca(true, false), "is not a CA"),
            (ca(false, true), "none of its CAs is valid now"),
        ] {
            let error = load_bundle(path, pem.as_bytes(), now)
                .err()
                .unwrap()
                .to_string();
            assert!(
                error.contains("bundle.pem") && error.contains(says),
                "{error}"
            );
        }
    }
}
