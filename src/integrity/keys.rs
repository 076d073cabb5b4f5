//! The checkpoint signing key: `audit keygen`, reading the private key (`[audit].signing_key`)
//! and the public key (`audit verify --public-key`).
//!
//! The private key is an Ed25519 key in PKCS#8, PEM (`-----BEGIN PRIVATE KEY-----`): what
//! `audit keygen` writes, and what `openssl genpkey -algorithm ed25519` writes. The public key is
//! PEM SubjectPublicKeyInfo (`-----BEGIN PUBLIC KEY-----`, as `openssl pkey -pubout` writes it).
//! A key's id is the first 8 bytes of the SHA-256 of its 32 public key bytes, in hex.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::files;

/// The DER of a SubjectPublicKeyInfo for Ed25519 before its 32 key bytes (RFC 8410).
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The DER of an Ed25519 PKCS#8 v1 private key before its 32-byte seed (RFC 8410).
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the audit signing key: {0}")]
    Read(#[from] files::FileError),
    #[error("{path} is {mode:03o}: other users may {access} the audit signing key; chmod 600 it")]
    Access {
        path: String,
        mode: u32,
        access: &'static str,
    },
    #[error(
        "{path} is not {what}: {detail}; make one with `kms-tag-guard audit keygen --out FILE`"
    )]
    Format {
        path: String,
        what: &'static str,
        detail: String,
    },
    #[error("cannot write {path}: {source}{hint}")]
    Write {
        path: String,
        source: std::io::Error,
        hint: &'static str,
    },
}

/// The signing key, with its id.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    id: String,
}

impl SigningKey {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }

    pub fn public(&self) -> PublicKey {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey::from_bytes(bytes)
    }
}

/// A public key, with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    bytes: [u8; 32],
    id: String,
}

impl PublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> PublicKey {
        PublicKey {
            id: key_id(&bytes),
            bytes,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.bytes)
            .verify(message, signature)
            .is_ok()
    }

    /// The key as PEM SubjectPublicKeyInfo.
    pub fn pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.bytes);
        pem_text("PUBLIC KEY", der)
    }
}

/// The id of a public key: the first 8 bytes of its SHA-256, in hex.
pub fn key_id(public: &[u8; 32]) -> String {
    hex::encode(&super::line_hash(public)[..8])
}

/// Reads the private key `[audit].signing_key` names: a regular file that only its owner (and
/// its group) may read, holding an Ed25519 PKCS#8 PEM key.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let (bytes, _) = files::read(path, files::MAX_PEM_BYTES)?;
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    let access = if mode & 0o022 != 0 {
        Some("write")
    } else if mode & 0o004 != 0 {
        Some("read")
    } else {
        None
    };
    if let Some(access) = access {
        return Err(KeyError::Access {
            path: path.display().to_string(),
            mode,
            access,
        });
    }
    let format = |detail: String| KeyError::Format {
        path: path.display().to_string(),
        what: "an Ed25519 private key (PKCS#8 PEM)",
        detail,
    };
    let block = pem::parse(&bytes).map_err(|e| format(e.to_string()))?;
    if block.tag() != "PRIVATE KEY" {
        return Err(format(format!("its PEM block is {}", block.tag())));
    }
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(block.contents())
        .map_err(|e| format(e.to_string()))?;
    let mut public = [0u8; 32];
    public.copy_from_slice(pair.public_key().as_ref());
    Ok(SigningKey {
        id: key_id(&public),
        pair,
    })
}

/// Reads a public key (PEM `PUBLIC KEY`); a private key file is taken too (its public half).
pub fn load_public_key(path: &Path) -> Result<PublicKey, KeyError> {
    let (bytes, _) = files::read(path, files::MAX_PEM_BYTES)?;
    let format = |detail: String| KeyError::Format {
        path: path.display().to_string(),
        what: "an Ed25519 public key (PEM, as `audit keygen` writes it)",
        detail,
    };
    let block = pem::parse(&bytes).map_err(|e| format(e.to_string()))?;
    match block.tag() {
        "PUBLIC KEY" => {
            let der = block.contents();
            match der.strip_prefix(&SPKI_PREFIX[..]) {
                Some(key) if key.len() == 32 => {
                    let mut bytes = [0u8; 32];
                    bytes.copy_from_slice(key);
                    Ok(PublicKey::from_bytes(bytes))
                }
                _ => Err(format("not an Ed25519 SubjectPublicKeyInfo".into())),
            }
        }
        "PRIVATE KEY" => Ed25519KeyPair::from_pkcs8_maybe_unchecked(block.contents())
            .map(|pair| {
                let mut bytes = [0u8; 32];
                bytes.copy_from_slice(pair.public_key().as_ref());
                PublicKey::from_bytes(bytes)
            })
            .map_err(|e| format(e.to_string())),
        other => Err(format(format!("its PEM block is {other}"))),
    }
}

/// What `audit keygen` wrote.
#[derive(Debug)]
pub struct Generated {
    pub private: PathBuf,
    pub public: PathBuf,
    pub key: PublicKey,
}

/// Writes a new key: the private key to `out` (mode 0600, never over an existing file), the public
/// key to `out` + `.pub` (never over an existing file either).
pub fn keygen(out: &Path) -> Result<Generated, KeyError> {
    let rng = ring::rand::SystemRandom::new();
    let document = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| KeyError::Write {
        path: out.display().to_string(),
        source: std::io::Error::other(e.to_string()),
        hint: "",
    })?;
    let pair = Ed25519KeyPair::from_pkcs8(document.as_ref()).expect("a key ring just made");
    // Written as PKCS#8 v1 (RFC 8410: the 32-byte seed only), which openssl reads too; ring's
    // v2 document holds the seed at the same place.
    let v2 = document.as_ref();
    let seed = v2
        .get(PKCS8_V1_PREFIX.len()..PKCS8_V1_PREFIX.len() + 32)
        .filter(|_| v2[5..PKCS8_V1_PREFIX.len()] == PKCS8_V1_PREFIX[5..])
        .expect("ring's PKCS#8 document holds the seed after the algorithm");
    let mut v1 = PKCS8_V1_PREFIX.to_vec();
    v1.extend_from_slice(seed);
    let mut public = [0u8; 32];
    public.copy_from_slice(pair.public_key().as_ref());
    let key = PublicKey::from_bytes(public);
    let mut public_path = out.as_os_str().to_owned();
    public_path.push(".pub");
    let public_path = PathBuf::from(public_path);
    let private_pem = pem_text("PRIVATE KEY", v1);
    // The public key first: a failure leaves no private key behind.
    write_new(&public_path, key.pem().as_bytes(), 0o644)?;
    if let Err(error) = write_new(out, private_pem.as_bytes(), 0o600) {
        let _ = std::fs::remove_file(&public_path);
        return Err(error);
    }
    Ok(Generated {
        private: out.to_owned(),
        public: public_path,
        key,
    })
}

/// PEM with `\n` line ends, as openssl writes it.
fn pem_text(tag: &str, der: Vec<u8>) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let failed = |source: std::io::Error| KeyError::Write {
        path: path.display().to_string(),
        hint: if source.kind() == std::io::ErrorKind::AlreadyExists {
            " (it exists: keygen never writes over a key; remove it or choose another --out)"
        } else {
            ""
        },
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(failed)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_a_key_that_loads_signs_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("audit.key");
        let made = keygen(&out).unwrap();
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let key = load_signing_key(&out).unwrap();
        assert_eq!(key.id(), made.key.id());
        let der = pem::parse(std::fs::read(&out).unwrap()).unwrap();
        assert!(der.contents().starts_with(&PKCS8_V1_PREFIX));
        let public = load_public_key(&made.public).unwrap();
        assert_eq!(public, made.key);
        assert_eq!(load_public_key(&out).unwrap(), made.key);
        let signature = key.sign(b"message");
        assert!(public.verify(b"message", &signature));
        assert!(!public.verify(b"messagf", &signature));
        let mut flipped = signature.clone();
        flipped[5] ^= 1;
        assert!(!public.verify(b"message", &flipped));

        // Never over an existing key.
        let again = keygen(&out).unwrap_err().to_string();
        assert!(again.contains("never writes over"), "{again}");
        assert_eq!(load_signing_key(&out).unwrap().id(), made.key.id());

        // A key others may read is refused.
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = load_signing_key(&out).err().unwrap().to_string();
        assert!(refused.contains("chmod 600"), "{refused}");
        // Not a key.
        std::fs::set_permissions(&made.public, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_signing_key(&made.public),
            Err(KeyError::Format { .. })
        ));
    }
}
