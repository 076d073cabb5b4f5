//! The chain's state in the audit writer, and the one function that seals a record line.
//!
//! The writer hands every serialised line (one JSON object and its `\n`) to [`Sealer::seal`],
//! which appends it to the batch with `{"seq":N,"prev":"<hex>",` spliced in front of the
//! object's first member: `seq` counts the lines of the chain from its start, `prev` is the
//! SHA-256 of the exact bytes of the line written before it (its `\n` included). The hash of the
//! sealed line becomes the next line's `prev`. A checkpoint ([`super::checkpoint`]) is sealed
//! after a record when one is due.
//!
//! Where the chain starts ([`Sealer::begin`], at open and at every reopen):
//! - a new or empty file, or standard output, at start: the first line has `seq` 0 and a `prev`
//!   of 64 zeros (genesis);
//! - a new or empty file after a reopen (rotation): the chain goes on, so the new file's first
//!   line names the hash of the old file's last line;
//! - an existing file whose last line is sealed (a restart appending): the chain goes on from it;
//! - an existing file ending in anything else (a line from before the chain, a line cut short, a
//!   line of another chain): a `chain_start` line, `"follows":"line_before"`, whose `prev` is that
//!   line's hash (a line cut short is ended with `\n` first, and hashed with it); a last line
//!   that cannot be read (longer than the proxy writes): a `chain_start` at genesis,
//!   `"follows":"unreadable_line_before"`.
//!
//! Nothing here rolls back: a batch the sink fails to take is kept byte for byte and written
//! again (`crate::audit`), so the chain's state is that of the batch, written or not.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use super::checkpoint::Checkpoints;
use super::keys::{self, KeyError};
use super::{line_hash, GENESIS};
use crate::config::AuditConfig;

/// The most bytes sealing adds to a line: `{"seq":` (7), 20 digits, `,"prev":"` (9), 64 hex
/// digits, `",` (2).
pub const SEAL_MAX_BYTES: usize = 7 + 20 + 9 + 64 + 2;
/// How much of an existing file's end is read to find its last line: more than the longest line
/// the writer writes.
const TAIL_WINDOW: u64 = 256 * 1024;

/// The chain in the writer: what the next line's seal says, and the checkpoints to sign.
pub struct Sealer {
    /// The `seq` of the next line.
    next_seq: u64,
    /// The hash of the last line sealed.
    prev: [u8; 32],
    /// Whether the chain has begun (a reopen continues it).
    started: bool,
    checkpoints: Option<Checkpoints>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("next_seq", &self.next_seq)
            .field("prev", &hex::encode(self.prev))
            .field("signed", &self.checkpoints.is_some())
            .finish()
    }
}

/// Where the chain goes on in a file, from its last line.
enum Tail {
    /// Not a regular file (standard output, a pipe): nothing to read.
    NotAFile,
    Empty,
    /// The last line, whole (with its `\n`).
    Line(Vec<u8>),
    /// The last line cut short: no `\n` at the end.
    Partial(Vec<u8>),
    /// The last line could not be read (longer than the window, or the file unreadable).
    Unreadable,
}

impl Sealer {
    /// The chain of a new log; checkpoints signed with `[audit].signing_key` when set (the key is
    /// read here, as `crate::proxy::prepare` read and checked it).
    pub fn new(config: &AuditConfig) -> Result<Sealer, KeyError> {
        let checkpoints = match &config.signing_key {
            Some(path) => Some(Checkpoints::new(
                keys::load_signing_key(path)?,
                config.checkpoint_every,
                config.checkpoint_interval,
            )),
            None => None,
        };
        Ok(Sealer::with(checkpoints))
    }

    pub fn with(checkpoints: Option<Checkpoints>) -> Sealer {
        Sealer {
            next_seq: 0,
            prev: GENESIS,
            started: false,
            checkpoints,
        }
    }

    /// The `seq` of the next line and the hash of the last.
    pub fn head(&self) -> (u64, [u8; 32]) {
        (self.next_seq, self.prev)
    }

    /// Where the chain goes on in `file` (`None`: standard output), just opened at start or
    /// reopened: appends to `batch` the `chain_start` line it needs, if any. With lines already
    /// in `batch` (a batch not yet written), nothing changes: they go to the new file first,
    /// chained to the line written before them.
    pub fn begin(&mut self, file: Option<&File>, batch: &mut Vec<u8>) {
        if !batch.is_empty() {
            return;
        }
        let tail = file.map_or(Tail::NotAFile, read_tail);
        let started = std::mem::replace(&mut self.started, true);
        match tail {
            // Genesis at start; after a reopen the chain goes on.
            Tail::NotAFile | Tail::Empty => {}
            Tail::Line(line) => {
                let hash = line_hash(&line);
                match parse_seal(&line) {
                    Some(_) if started && hash == self.prev => {}
                    Some((seq, _)) if !started => {
                        // A restart appending to its own file: the chain goes on.
                        self.next_seq = seq.saturating_add(1);
                        self.prev = hash;
                    }
                    _ => {
                        self.prev = hash;
                        self.start("line_before", batch);
                    }
                }
            }
            Tail::Partial(mut line) => {
                if let (Some((seq, _)), false) = (parse_seal(&line), started) {
                    self.next_seq = seq.saturating_add(1);
                }
                batch.push(b'\n');
                line.push(b'\n');
                self.prev = line_hash(&line);
                self.start("line_before", batch);
            }
            Tail::Unreadable => {
                self.next_seq = 0;
                self.prev = GENESIS;
                self.start("unreadable_line_before", batch);
            }
        }
    }

    /// Appends `line` (one JSON object and its `\n`, as `crate::audit` serialises it) to `batch`,
    /// sealed; then a checkpoint, when one is due.
    pub fn seal(&mut self, line: &[u8], batch: &mut Vec<u8>) {
        self.seal_line(line, batch);
        if let Some(checkpoints) = &mut self.checkpoints {
            if checkpoints.note_record(Instant::now()) {
                self.checkpoint(batch);
            }
        }
    }

    /// How long until a checkpoint is due for the records sealed since the last one, if any are
    /// and checkpoints are signed: the writer, idle, wakes then to write one.
    pub fn checkpoint_due_in(&self) -> Option<Duration> {
        self.checkpoints
            .as_ref()
            .and_then(|c| c.due_in(Instant::now()))
    }

    /// Appends a signed checkpoint to `batch` now, if checkpoints are signed and lines were sealed
    /// since the last one. Returns whether it did.
    pub fn checkpoint(&mut self, batch: &mut Vec<u8>) -> bool {
        let Some(checkpoints) = &mut self.checkpoints else {
            return false;
        };
        if !checkpoints.pending() {
            return false;
        }
        let line = checkpoints.line(self.next_seq, &self.prev, &super::timestamp());
        let start = batch.len();
        self.seal_line(&line, batch);
        if let Some(checkpoints) = &mut self.checkpoints {
            checkpoints.signed();
        }
        tracing::info!(
            checkpoint = %String::from_utf8_lossy(batch[start..].trim_ascii_end()),
            "audit checkpoint (keep a copy elsewhere: `audit verify --anchor` proves the log reaches it)"
        );
        true
    }

    fn start(&mut self, follows: &str, batch: &mut Vec<u8>) {
        let line = format!(
            "{{\"event\":\"chain_start\",\"time\":\"{}\",\"follows\":\"{follows}\"}}\n",
            super::timestamp()
        );
        self.seal_line(line.as_bytes(), batch);
        if let Some(checkpoints) = &mut self.checkpoints {
            checkpoints.note_line();
        }
    }

    /// The seal: `{"seq":N,"prev":"<hex>",` in front of the object's members (a line that is no
    /// object is wrapped: `{"seq":N,"prev":"<hex>","line":<it, as a JSON string>}`).
    fn seal_line(&mut self, line: &[u8], batch: &mut Vec<u8>) {
        let start = batch.len();
        batch.extend_from_slice(b"{\"seq\":");
        crate::text::push_decimal(batch, self.next_seq);
        batch.extend_from_slice(b",\"prev\":\"");
        let mut hex = [0u8; 64];
        hex::encode_to_slice(self.prev, &mut hex).expect("64 hex digits for 32 bytes");
        batch.extend_from_slice(&hex);
        batch.push(b'"');
        match line {
            [b'{', b'}', b'\n'] => batch.extend_from_slice(b"}\n"),
            [b'{', rest @ .., b'\n'] => {
                batch.push(b',');
                batch.extend_from_slice(rest);
                batch.push(b'\n');
            }
            other => {
                batch.extend_from_slice(b",\"line\":");
                let text = String::from_utf8_lossy(other.strip_suffix(b"\n").unwrap_or(other));
                serde_json::to_writer(&mut *batch, &text).expect("a string serialises");
                batch.extend_from_slice(b"}\n");
            }
        }
        self.prev = line_hash(&batch[start..]);
        self.next_seq += 1;
    }
}

/// The `seq` and `prev` a sealed line begins with, exactly as [`Sealer`] writes them.
pub fn parse_seal(line: &[u8]) -> Option<(u64, [u8; 32])> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 20 || (digits > 1 && rest[0] == b'0') {
        return None;
    }
    let seq: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let rest = rest[digits..].strip_prefix(b",\"prev\":\"")?;
    let hex = rest.get(..64)?;
    if hex.iter().any(|b| !matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut prev = [0u8; 32];
    hex::decode_to_slice(hex, &mut prev).ok()?;
    match rest.get(64..66)? {
        b"\"," | b"\"}" => Some((seq, prev)),
        _ => None,
    }
}

/// The last line of `file`, read from its end (at most [`TAIL_WINDOW`] bytes), through a
/// descriptor of its own opened on the same file (`/proc/self/fd`: the log may be write-only).
fn read_tail(file: &File) -> Tail {
    use std::os::fd::AsRawFd;
    let Ok(meta) = file.metadata() else {
        return Tail::Unreadable;
    };
    if !meta.is_file() {
        return Tail::NotAFile;
    }
    let len = meta.len();
    if len == 0 {
        return Tail::Empty;
    }
    let Ok(reader) = File::open(format!("/proc/self/fd/{}", file.as_raw_fd())) else {
        return Tail::Unreadable;
    };
    let from = len.saturating_sub(TAIL_WINDOW);
    let mut buf = vec![0u8; (len - from) as usize];
    if reader.read_exact_at(&mut buf, from).is_err() {
        return Tail::Unreadable;
    }
    let whole = buf.last() == Some(&b'\n');
    let body = if whole {
        &buf[..buf.len() - 1]
    } else {
        &buf[..]
    };
    let line = match memchr::memrchr(b'\n', body) {
        Some(i) => &buf[i + 1..],
        None if from == 0 => &buf[..],
        None => return Tail::Unreadable,
    };
    if whole {
        Tail::Line(line.to_vec())
    } else {
        Tail::Partial(line.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(batch: &[u8]) -> Vec<&[u8]> {
        batch
            .split_inclusive(|b| *b == b'\n')
            .collect::<Vec<&[u8]>>()
    }

    #[test]
    fn seals_link_each_line_to_the_exact_bytes_before_it() {
        let mut sealer = Sealer::with(None);
        let mut batch = Vec::new();
        sealer.begin(None, &mut batch);
        assert!(batch.is_empty(), "genesis needs no line of its own");
        sealer.seal(b"{\"event\":\"decision\",\"a\":1}\n", &mut batch);
        sealer.seal(b"{}\n", &mut batch);
        sealer.seal(b"[1,2]\n", &mut batch);
        let lines = lines(&batch);
        assert_eq!(lines.len(), 3);
        let (seq, prev) = parse_seal(lines[0]).unwrap();
        assert_eq!((seq, prev), (0, GENESIS));
        for (i, pair) in lines.windows(2).enumerate() {
            let (seq, prev) = parse_seal(pair[1]).unwrap();
            assert_eq!(seq, i as u64 + 1);
            assert_eq!(prev, line_hash(pair[0]), "line {}", i + 2);
            serde_json::from_slice::<serde_json::Value>(pair[1]).unwrap();
        }
        assert!(lines[0].ends_with(b",\"event\":\"decision\",\"a\":1}\n"));
        assert!(lines[1].ends_with(b"\"}\n"));
        let wrapped: serde_json::Value = serde_json::from_slice(lines[2]).unwrap();
        assert_eq!(wrapped["line"], "[1,2]");
        assert_eq!(sealer.head(), (3, line_hash(lines[2])));
        assert!(lines.iter().all(|l| l.len() <= 40 + SEAL_MAX_BYTES + 80));
    }

    #[test]
    fn the_seal_parser_takes_only_what_the_sealer_writes() {
        let hex = "ab".repeat(32);
        assert!(
            parse_seal(format!("{{\"seq\":7,\"prev\":\"{hex}\",\"x\":1}}").as_bytes()).is_some()
        );
        for bad in [
            format!("{{\"seq\":07,\"prev\":\"{hex}\",\"x\":1}}"),
            format!("{{\"seq\":7,\"prev\":\"{}\",\"x\":1}}", "AB".repeat(32)),
            format!("{{\"seq\":7,\"prev\":\"{}\",\"x\":1}}", "ab".repeat(31)),
            format!("{{\"seq\": 7,\"prev\":\"{hex}\",\"x\":1}}"),
            format!("{{\"prev\":\"{hex}\",\"seq\":7}}"),
        ] {
            assert!(parse_seal(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    fn file_with(dir: &std::path::Path, name: &str, bytes: &[u8]) -> File {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
    }

    #[test]
    fn a_restart_goes_on_from_the_last_line_and_a_rotation_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = Sealer::with(None);
        let mut batch = Vec::new();
        first.begin(Some(&file_with(dir.path(), "new", b"")), &mut batch);
        first.seal(b"{\"a\":1}\n", &mut batch);
        let written = batch.clone();

        // Restart: the same file, its last line sealed: no line of its own, the chain goes on.
        let file = file_with(dir.path(), "log", &written);
        let mut again = Sealer::with(None);
        let mut next = Vec::new();
        again.begin(Some(&file), &mut next);
        assert!(next.is_empty());
        assert_eq!(again.head(), first.head());

        // Reopened on the same file, or on a new, empty one (rotation): the chain goes on.
        again.begin(Some(&file), &mut next);
        again.begin(Some(&file_with(dir.path(), "rotated", b"")), &mut next);
        assert!(next.is_empty());
        again.seal(b"{\"a\":2}\n", &mut next);
        assert_eq!(parse_seal(&next).unwrap(), first.head());

        // A file ending in a sealed line of another chain: a chain_start names it.
        let mut other = Vec::new();
        again.begin(
            Some(&file_with(dir.path(), "another", &written)),
            &mut other,
        );
        let start: serde_json::Value = serde_json::from_slice(&other).unwrap();
        assert_eq!(start["event"], "chain_start");
        assert_eq!(start["follows"], "line_before");
        assert_eq!(parse_seal(&other).unwrap(), (2, line_hash(&written)));

        // A file ending in a line from before the chain, or cut short.
        let mut old = Sealer::with(None);
        let mut batch = Vec::new();
        old.begin(
            Some(&file_with(dir.path(), "old", b"{\"x\":1}\n{\"y\":2}\n")),
            &mut batch,
        );
        assert_eq!(parse_seal(&batch).unwrap(), (0, line_hash(b"{\"y\":2}\n")));
        let mut cut = Sealer::with(None);
        let mut batch = Vec::new();
        cut.begin(
            Some(&file_with(dir.path(), "cut", b"{\"x\":1}\n{\"y\"")),
            &mut batch,
        );
        assert_eq!(batch[0], b'\n');
        assert_eq!(
            parse_seal(&batch[1..]).unwrap(),
            (0, line_hash(b"{\"y\"\n"))
        );

        // A batch not yet written goes first: nothing is put before it.
        let mut pending = b"{\"seq\":1}\n".to_vec();
        again.begin(Some(&file_with(dir.path(), "other", b"")), &mut pending);
        assert_eq!(pending, b"{\"seq\":1}\n");
    }
}
