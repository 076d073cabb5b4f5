//! A tamper-evident audit log: a hash chain through every line the audit writer writes, signed
//! checkpoints, and the verifier.
//!
//! - [`chain`]: the chain's state and the one function that seals a serialised record line (its
//!   `seq` and the hash of the line before, spliced in front), where the chain starts and goes on
//!   (a new file, a restart appending to a file, a file reopened after rotation);
//! - [`checkpoint`]: signed checkpoint lines (Ed25519) every `checkpoint_every` records or
//!   `checkpoint_interval_ms`;
//! - [`keys`]: `audit keygen`, and reading the signing key and the public key;
//! - [`verify`]: `audit verify`: the files in order (gzip'd ones too), every link, every
//!   checkpoint, and what was changed, removed, inserted or reordered.
//!
//! The format (docs/security.md, "The audit chain"): every line is one JSON object that begins
//! `{"seq":N,"prev":"<hex SHA-256>",`, where `prev` is the SHA-256 of the exact bytes of the line
//! before it, its final `\n` included, so that `sed -n 5p audit.log | sha256sum` prints the
//! `prev` of line 6. A chain begins with a `chain_start` line whose `prev` is 64 zeros.
//!
//! Uses `files` and `config`'s audit settings; `crate::audit` uses it, never the reverse.

pub mod chain;
pub mod checkpoint;
pub mod keys;
pub mod verify;

pub use chain::{Sealer, SEAL_MAX_BYTES};
pub use keys::KeyError;

/// The hash of a line: SHA-256 of its exact bytes.
pub fn line_hash(line: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, line);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The time as the audit log writes it (RFC 3339, UTC, milliseconds), as `crate::audit` does.
fn timestamp() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// The `prev` of a chain's first line.
pub const GENESIS: [u8; 32] = [0; 32];
