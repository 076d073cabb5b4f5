//! Signed checkpoints: a line, in the chain like any other, that signs the chain up to it.
//!
//! ```text
//! {"seq":N,"prev":"<hex>","event":"checkpoint","time":"<RFC 3339>","key_fingerprint":"<hex>","signature":"<hex>"}
//! ```
//!
//! `seq` is the number of lines in the chain before it and `prev` the hash of the last of them,
//! which, link by link, covers every line before it. The signature is Ed25519 over
//! `kms-tag-guard audit checkpoint v1\n` followed by the line's exact bytes up to (not including)
//! `,"signature":"`: every byte of the line but the signature itself.
//!
//! A checkpoint is written after `checkpoint_every` records, or `checkpoint_interval_ms` after the
//! first record it is to cover (the idle writer wakes for it), and when the writer stops.

use std::time::{Duration, Instant};

use super::keys::{PublicKey, SigningKey};

/// What a checkpoint's signature covers, before the line's bytes.
pub const DOMAIN: &[u8] = b"kms-tag-guard audit checkpoint v1\n";
/// Between the signed part of a checkpoint line and its signature.
const SIGNATURE_MEMBER: &[u8] = b",\"signature\":\"";
/// Before the id of the key that signed it.
const KEY_MEMBER: &[u8] = b",\"key_fingerprint\":\"";

/// When checkpoints are due, and the key that signs them.
pub struct Checkpoints {
    key: SigningKey,
    every: u64,
    interval: Duration,
    /// Lines sealed since the last checkpoint, and the records among them.
    lines: u64,
    records: u64,
    /// When the first record since the last checkpoint was sealed.
    first_record: Option<Instant>,
}

impl Checkpoints {
    pub fn new(key: SigningKey, every: u64, interval: Duration) -> Checkpoints {
        Checkpoints {
            key,
            every: every.max(1),
            interval,
            lines: 0,
            records: 0,
            first_record: None,
        }
    }

    /// A record was sealed; whether a checkpoint is due now.
    pub(crate) fn note_record(&mut self, now: Instant) -> bool {
        self.lines += 1;
        self.records += 1;
        let first = *self.first_record.get_or_insert(now);
        self.records >= self.every || now.duration_since(first) >= self.interval
    }

    /// A line of the chain's own (`chain_start`) was sealed: the next checkpoint covers it, but
    /// it does not start the interval.
    pub(crate) fn note_line(&mut self) {
        self.lines += 1;
    }

    pub(crate) fn pending(&self) -> bool {
        self.lines > 0
    }

    pub(crate) fn due_in(&self, now: Instant) -> Option<Duration> {
        self.first_record
            .map(|first| (first + self.interval).saturating_duration_since(now))
    }

    pub(crate) fn signed(&mut self) {
        self.lines = 0;
        self.records = 0;
        self.first_record = None;
    }

    /// The checkpoint line for the chain at `seq` with `prev`, as `Sealer::seal_line` is given it
    /// (unsealed: the seal it gets is the one signed here).
    pub(crate) fn line(&self, seq: u64, prev: &[u8; 32], time: &str) -> Vec<u8> {
        let members = format!(
            "\"event\":\"checkpoint\",\"time\":\"{time}\",\"key_fingerprint\":\"{}\"",
            self.key.id()
        );
        let mut message = DOMAIN.to_vec();
        message.extend_from_slice(
            format!(
                "{{\"seq\":{seq},\"prev\":\"{}\",{members}",
                hex::encode(prev)
            )
            .as_bytes(),
        );
        let signature = hex::encode(self.key.sign(&message));
        format!("{{{members},\"signature\":\"{signature}\"}}\n").into_bytes()
    }
}

/// Why a checkpoint line does not check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("not a checkpoint line as the proxy writes it")]
    Malformed,
    #[error("signed by key {0}, not by the key given")]
    OtherKey(String),
    #[error("its signature does not verify")]
    BadSignature,
}

/// The key id a checkpoint line names, and its signed part and signature.
fn split(line: &[u8]) -> Option<(&[u8], Vec<u8>, String)> {
    let at = memchr::memmem::rfind(line, SIGNATURE_MEMBER)?;
    let signed = &line[..at];
    let rest = &line[at + SIGNATURE_MEMBER.len()..];
    let hex_signature = rest.strip_suffix(b"\"}\n")?;
    if hex_signature.len() != 128 || hex_signature.iter().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let signature = hex::decode(hex_signature).ok()?;
    let key_at = memchr::memmem::rfind(signed, KEY_MEMBER)?;
    let key_id = signed[key_at + KEY_MEMBER.len()..].strip_suffix(b"\"")?;
    if !signed[..key_at].ends_with(b"\"")
        || !std::str::from_utf8(key_id).is_ok_and(|k| k.len() == 16)
    {
        return None;
    }
    Some((
        signed,
        signature,
        String::from_utf8_lossy(key_id).into_owned(),
    ))
}

/// Checks a checkpoint line (its exact bytes, `\n` included) against `key`.
pub fn check(line: &[u8], key: &PublicKey) -> Result<(), CheckpointError> {
    let (signed, signature, key_id) = split(line).ok_or(CheckpointError::Malformed)?;
    if key_id != key.id() {
        return Err(CheckpointError::OtherKey(key_id));
    }
    let mut message = DOMAIN.to_vec();
    message.extend_from_slice(signed);
    if key.verify(&message, &signature) {
        Ok(())
    } else {
        Err(CheckpointError::BadSignature)
    }
}

/// Whether a line carries a signature member (only checkpoints do: a record's strings cannot hold
/// these bytes unescaped).
pub fn has_signature(line: &[u8]) -> bool {
    memchr::memmem::find(line, SIGNATURE_MEMBER).is_some()
}

/// The key id a checkpoint line names, if it is shaped as one.
pub fn key_id_of(line: &[u8]) -> Option<String> {
    split(line).map(|(_, _, id)| id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::chain::{parse_seal, Sealer};

    fn key() -> (SigningKey, PublicKey) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("k");
        let made = crate::integrity::keys::keygen(&out).unwrap();
        (
            crate::integrity::keys::load_signing_key(&out).unwrap(),
            made.key,
        )
    }

    #[test]
    fn checkpoints_sign_every_byte_but_their_signature() {
        let (signing, public) = key();
        let mut sealer = Sealer::with(Some(Checkpoints::new(
            signing,
            2,
            Duration::from_secs(3600),
        )));
        let mut batch = Vec::new();
        sealer.begin(None, &mut batch);
        sealer.seal(b"{\"a\":1}\n", &mut batch);
        assert_eq!(batch.split_inclusive(|b| *b == b'\n').count(), 1);
        sealer.seal(b"{\"a\":2}\n", &mut batch);
        let lines: Vec<&[u8]> = batch.split_inclusive(|b| *b == b'\n').collect();
        assert_eq!(lines.len(), 3, "a checkpoint after two records");
        let checkpoint = lines[2];
        assert_eq!(parse_seal(checkpoint).unwrap().0, 2);
        let value: serde_json::Value = serde_json::from_slice(checkpoint).unwrap();
        assert_eq!(value["event"], "checkpoint");
        assert_eq!(value["key_fingerprint"], public.id());
        check(checkpoint, &public).unwrap();

        for i in 0..checkpoint.len() {
            let mut changed = checkpoint.to_vec();
            changed[i] ^= 0x01;
            assert!(check(&changed, &public).is_err(), "byte {i} flipped");
        }
        let (_, other) = key();
        assert!(matches!(
            check(checkpoint, &other),
            Err(CheckpointError::OtherKey(_))
        ));
        // Nothing new since: no checkpoint; a new record starts the interval.
        assert!(!sealer.checkpoint(&mut batch));
        assert_eq!(sealer.checkpoint_due_in(), None);
        sealer.seal(b"{\"a\":3}\n", &mut batch);
        assert!(sealer.checkpoint_due_in().unwrap() > Duration::from_secs(3000));
        assert!(sealer.checkpoint(&mut batch));
    }
}
