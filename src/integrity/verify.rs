//! `kms-tag-guard audit verify`: reads the audit files in order (gzip'd ones too, told by their
//! content), checks every link of the chain and every checkpoint, and says, as CloudTrail's
//! `validate-logs` does, what was checked and each line that was changed, removed, inserted or
//! reordered.
//!
//! What the chain alone proves: every line but the last is exactly the line the proxy wrote
//! before the line after it, in that order, with nothing removed or put between them. What it
//! does not: that the last lines were not removed, or the last line changed (nothing follows
//! them), nor that the whole log was not rewritten by someone able to compute SHA-256. Signed
//! checkpoints prove the lines up to the last one were written by the holder of the key; lines
//! after the last checkpoint are reported as unsigned; removing the last checkpoint and what
//! follows it shows only against a copy of a later checkpoint kept elsewhere (`--anchor`).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::chain::parse_seal;
use super::checkpoint::{self, CheckpointError};
use super::keys::PublicKey;
use super::{line_hash, GENESIS};

/// The longest line read whole; a longer one is reported and not hashed.
const MAX_LINE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no checkpoint line to anchor to (one line of the audit log with \"event\":\"checkpoint\")")]
    Anchor { path: String },
}

/// What a line is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Record,
    ChainStart,
    Checkpoint(Option<Result<(), CheckpointError>>),
    /// Not a JSON object (or not whole: no `\n` at its end, or too long).
    Broken(&'static str),
}

struct Entry {
    file: usize,
    line: u64,
    hash: [u8; 32],
    seal: Option<(u64, [u8; 32])>,
    kind: Kind,
}

/// One thing found wrong, where.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub file: String,
    pub line: u64,
    /// changed, removed, inserted, reordered, duplicated, broken, not_chained, new_chain,
    /// checkpoint, truncated, unsigned.
    pub kind: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileSummary {
    pub path: String,
    pub lines: u64,
    pub gzip: bool,
    pub problems: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct UnsignedRun {
    pub from: Place,
    pub lines: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Place {
    pub file: String,
    pub line: u64,
}

/// What `audit verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub files: Vec<FileSummary>,
    pub lines: u64,
    pub records: u64,
    pub chain_starts: u64,
    /// Lines before the first sealed line of the first file (written before the chain began):
    /// not checked.
    pub unchained_before: u64,
    /// Where the chain begins: at genesis, or after a line these files do not hold.
    pub begins: String,
    /// Whether it begins at genesis (`seq` 0, `prev` 64 zeros).
    pub genesis: bool,
    pub checkpoints: u64,
    /// With a public key: the checkpoints whose signature verifies.
    pub checkpoints_valid: Option<u64>,
    pub key_id: Option<String>,
    /// With a public key: the lines after the last valid checkpoint of each chain (nothing signs
    /// them), and where each such run begins.
    pub unsigned_lines: Option<u64>,
    pub unsigned: Vec<UnsignedRun>,
    /// Where a new chain begins after the first (genesis: the proxy started with nothing to go
    /// on from: standard output, or its file removed while it was stopped).
    pub new_chains: Vec<Place>,
    pub anchors: u64,
    pub problems: Vec<Problem>,
    /// The lines a problem names (the others are about the log as a whole: an anchor it does not
    /// reach, no valid checkpoint).
    pub lines_invalid: u64,
    /// No problem: every link holds (and with a key, every checkpoint verifies, at least one).
    pub valid: bool,
}

/// What to check beyond the links.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Checks the checkpoints' signatures.
    pub key: Option<PublicKey>,
    /// Files holding checkpoint lines kept elsewhere: the log must reach each, unchanged.
    pub anchors: Vec<PathBuf>,
    /// The first file is the first the proxy wrote: its first line must be the chain's genesis.
    pub from_genesis: bool,
}

/// Reads and checks `files`, in order, as one chain.
pub fn verify(files: &[PathBuf], options: &Options) -> Result<Report, VerifyError> {
    let key = options.key.as_ref();
    let anchors = &options.anchors;
    let mut entries = Vec::new();
    let mut summaries = Vec::new();
    for (index, path) in files.iter().enumerate() {
        let (lines, gzip) = read_file(path, index, key, &mut entries)?;
        summaries.push(FileSummary {
            path: path.display().to_string(),
            lines,
            gzip,
            problems: 0,
        });
    }
    let mut anchor_lines = Vec::new();
    for path in anchors {
        anchor_lines.extend(read_anchors(path)?);
    }
    let mut report = analyse(&entries, summaries, key, &anchor_lines);
    if options.from_genesis && (!report.genesis || report.unchained_before > 0) {
        let (file, line) = report
            .files
            .first()
            .map_or((String::new(), 0), |f| (f.path.clone(), 1));
        report.problems.insert(
            0,
            Problem {
                file,
                line,
                kind: if report.genesis { "inserted" } else { "removed" },
                detail: if report.genesis {
                    format!("{} line(s) before the chain's genesis: put in", report.unchained_before)
                } else {
                    "the chain does not begin at genesis (seq 0, prev 64 zeros) here: lines were removed from its beginning, or the files before it were not given".into()
                },
            },
        );
        if let Some(first) = report.files.first_mut() {
            first.problems += 1;
        }
        report.valid = false;
    }
    Ok(report)
}

fn read_err(path: &Path) -> impl Fn(std::io::Error) -> VerifyError + '_ {
    move |source| VerifyError::Read {
        path: path.display().to_string(),
        source,
    }
}

/// A file's lines (gunzipped when it begins as gzip does).
fn open(path: &Path) -> Result<(Box<dyn BufRead>, bool), VerifyError> {
    let mut file = BufReader::new(std::fs::File::open(path).map_err(read_err(path))?);
    let gzip = file
        .fill_buf()
        .map_err(read_err(path))?
        .starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn BufRead> = if gzip {
        Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(file)))
    } else {
        Box::new(file)
    };
    Ok((reader, gzip))
}

/// Reads one line (with its `\n`) into `line`, at most [`MAX_LINE_BYTES`]; `Ok(false)` at the
/// end; a longer line is read to its end and cut.
fn next_line(reader: &mut dyn BufRead, line: &mut Vec<u8>) -> std::io::Result<(bool, bool)> {
    line.clear();
    let mut too_long = false;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok((!line.is_empty() || too_long, too_long));
        }
        let (take, done) = match memchr::memchr(b'\n', buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_LINE_BYTES {
            too_long = true;
        } else {
            line.extend_from_slice(&buf[..take]);
        }
        reader.consume(take);
        if done {
            return Ok((true, too_long));
        }
    }
}

#[derive(serde::Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    event: Option<std::borrow::Cow<'a, str>>,
}

fn read_file(
    path: &Path,
    index: usize,
    key: Option<&PublicKey>,
    entries: &mut Vec<Entry>,
) -> Result<(u64, bool), VerifyError> {
    let (mut reader, gzip) = open(path)?;
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        let (more, too_long) = next_line(&mut *reader, &mut line).map_err(read_err(path))?;
        if !more {
            break;
        }
        number += 1;
        entries.push(entry(index, number, &line, too_long, key));
    }
    Ok((number, gzip))
}

fn entry(file: usize, line: u64, bytes: &[u8], too_long: bool, key: Option<&PublicKey>) -> Entry {
    let kind = if too_long {
        Kind::Broken("longer than the proxy writes a line")
    } else if bytes.last() != Some(&b'\n') {
        Kind::Broken("cut short: no line end")
    } else {
        match serde_json::from_slice::<Event>(bytes) {
            Ok(event) => {
                let name = event.event.as_deref().unwrap_or("");
                // A checkpoint by its event or by its signature: one changed byte cannot make
                // either pass for a record.
                if name == "checkpoint" || checkpoint::has_signature(bytes) {
                    Kind::Checkpoint(match key {
                        Some(key) => Some(checkpoint::check(bytes, key)),
                        None => checkpoint::key_id_of(bytes)
                            .is_none()
                            .then_some(Err(CheckpointError::Malformed)),
                    })
                } else if name == "chain_start" {
                    Kind::ChainStart
                } else {
                    Kind::Record
                }
            }
            Err(_) => Kind::Broken("not a JSON object"),
        }
    };
    Entry {
        file,
        line,
        hash: line_hash(bytes),
        seal: if too_long { None } else { parse_seal(bytes) },
        kind,
    }
}

fn read_anchors(path: &Path) -> Result<Vec<Vec<u8>>, VerifyError> {
    let (mut reader, _) = open(path)?;
    let mut out = Vec::new();
    let mut line = Vec::new();
    while next_line(&mut *reader, &mut line)
        .map_err(read_err(path))?
        .0
    {
        // An anchor may come from another log (a JSON log line quoting it is not taken): the
        // checkpoint line itself, exactly.
        let mut bytes = line.trim_ascii().to_vec();
        bytes.push(b'\n');
        if parse_seal(&bytes).is_some() && checkpoint::key_id_of(&bytes).is_some() {
            out.push(bytes);
        }
    }
    if out.is_empty() {
        return Err(VerifyError::Anchor {
            path: path.display().to_string(),
        });
    }
    Ok(out)
}

fn analyse(
    entries: &[Entry],
    mut files: Vec<FileSummary>,
    key: Option<&PublicKey>,
    anchors: &[Vec<u8>],
) -> Report {
    let name = |e: &Entry| files[e.file].path.clone();
    let mut problems: Vec<(usize, &'static str, String)> = Vec::new();
    let mut position: HashMap<[u8; 32], usize> = HashMap::with_capacity(entries.len());
    let mut referenced: HashSet<[u8; 32]> = HashSet::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        position.entry(e.hash).or_insert(i);
        if let Some((_, prev)) = e.seal {
            referenced.insert(prev);
        }
    }
    let here = |i: usize| format!("{} line {}", files[entries[i].file].path, entries[i].line);
    let follows = |i: usize| match (entries[i].seal, i.checked_sub(1)) {
        (Some((_, prev)), Some(a)) => prev == entries[a].hash,
        _ => false,
    };

    // Where the chain begins.
    let first_sealed = entries.iter().position(|e| e.seal.is_some());
    let unchained_before = first_sealed.unwrap_or(entries.len()) as u64;
    let genesis = first_sealed.is_some_and(|i| entries[i].seal == Some((0, GENESIS)));
    let begins = match first_sealed {
        None => "nowhere: no line of these files is sealed".to_owned(),
        Some(i) => {
            let (seq, prev) = entries[i].seal.expect("sealed");
            if prev == GENESIS && seq == 0 {
                format!("at genesis ({})", here(i))
            } else if i > 0 && follows(i) {
                format!(
                    "after {i} lines written before the chain began ({})",
                    here(i)
                )
            } else {
                format!(
                    "after seq {} (hash {}), which these files do not hold: give the files before {} to check that link",
                    seq.saturating_sub(1),
                    &hex::encode(prev)[..16],
                    files[entries[i].file].path
                )
            }
        }
    };

    let mut segments: Vec<usize> = first_sealed.into_iter().collect();
    let mut reported: HashSet<usize> = HashSet::new();
    let mut skip_link: HashSet<usize> = HashSet::new();
    let report = |problems: &mut Vec<(usize, &'static str, String)>,
                  reported: &mut HashSet<usize>,
                  at: usize,
                  kind: &'static str,
                  detail: String| {
        if reported.insert(at) {
            problems.push((at, kind, detail));
        }
    };
    let start = first_sealed.map_or(entries.len(), |i| i + 1);
    for i in start..entries.len() {
        let e = &entries[i];
        let a = i - 1;
        // A line cut short and ended by the proxy when it started again is what it wrote: the
        // chain_start after it names it (and the link into that line is still checked below).
        let named = entries
            .get(i + 1)
            .is_some_and(|n| n.kind == Kind::ChainStart && follows(i + 1));
        if let Kind::Broken(why) = e.kind {
            if !named {
                report(&mut problems, &mut reported, i, "broken", why.to_owned());
            }
        }
        let Some((seq, prev)) = e.seal else {
            if named {
                continue;
            }
            report(
                &mut problems,
                &mut reported,
                i,
                "not_chained",
                "not a chained line (no seq and prev where the proxy writes them): inserted, or changed".into(),
            );
            continue;
        };
        if follows(i) || skip_link.contains(&i) {
            continue;
        }
        let prev_seq = entries[a].seal.map(|s| s.0);
        if e.hash == entries[a].hash {
            report(
                &mut problems,
                &mut reported,
                i,
                "duplicated",
                format!("repeats {}", here(a)),
            );
            continue;
        }
        if prev == GENESIS && seq == 0 {
            // A new chain: the proxy started with nothing to go on from. Not a break by itself
            // (a line put in here shows as the next line not following it).
            segments.push(i);
            continue;
        }
        match position.get(&prev).copied() {
            Some(j) if j > i => report(
                &mut problems,
                &mut reported,
                i,
                "reordered",
                format!("out of order: the line it follows is {}", here(j)),
            ),
            Some(j) if j < a => {
                for (k, between) in entries.iter().enumerate().take(a + 1).skip(j + 1) {
                    if referenced.contains(&between.hash) {
                        report(
                            &mut problems,
                            &mut reported,
                            k,
                            "reordered",
                            format!("out of order: {} follows {}", here(i), here(j)),
                        );
                    } else {
                        report(
                            &mut problems,
                            &mut reported,
                            k,
                            "inserted",
                            format!("not in the chain: {} follows {}", here(i), here(j)),
                        );
                    }
                }
            }
            Some(_) => {}
            None => {
                let before_a = a.checked_sub(1).and_then(|b| entries[b].seal.map(|s| s.0));
                let next_broken = entries.get(i + 1).is_some_and(|n| {
                    n.seal
                        .is_some_and(|(_, p)| p != e.hash && !position.contains_key(&p))
                });
                match prev_seq {
                    Some(s)
                        if seq == s + 1
                            && next_broken
                            && entries[i + 1].seal.map(|x| x.0) == Some(seq + 1) =>
                    {
                        // One change to this line explains both broken links.
                        skip_link.insert(i + 1);
                        report(
                            &mut problems,
                            &mut reported,
                            i,
                            "changed",
                            "changed: its seq/prev do not match the line before, and the line after does not follow it".into(),
                        );
                    }
                    Some(s) if seq == s + 1 => report(
                        &mut problems,
                        &mut reported,
                        a,
                        "changed",
                        format!("changed: {} follows other bytes than these", here(i)),
                    ),
                    _ if before_a.is_some_and(|b| seq == b + 2) && follows(a) => report(
                        &mut problems,
                        &mut reported,
                        a,
                        "changed",
                        format!(
                            "changed (its seq too): {} follows other bytes than these",
                            here(i)
                        ),
                    ),
                    Some(s) if seq > s + 1 => report(
                        &mut problems,
                        &mut reported,
                        i,
                        "removed",
                        format!(
                            "{} line(s) removed before it (seq {}..{}, after {})",
                            seq - s - 1,
                            s + 1,
                            seq - 1,
                            here(a)
                        ),
                    ),
                    _ => report(
                        &mut problems,
                        &mut reported,
                        i,
                        "changed",
                        format!(
                            "does not follow {}: changed, inserted or reordered",
                            here(a)
                        ),
                    ),
                }
            }
        }
    }

    // Checkpoints.
    let mut checkpoints = 0;
    let mut valid_checkpoints = 0;
    for (i, e) in entries.iter().enumerate() {
        if let Kind::Checkpoint(result) = &e.kind {
            checkpoints += 1;
            match result {
                Some(Ok(())) if e.seal.is_some() => {
                    valid_checkpoints += 1;
                }
                Some(Ok(())) => {}
                Some(Err(error)) => report(
                    &mut problems,
                    &mut reported,
                    i,
                    "checkpoint",
                    format!("checkpoint INVALID: {error}"),
                ),
                None => {}
            }
        }
    }
    let place = |i: usize| Place {
        file: name(&entries[i]),
        line: entries[i].line,
    };
    let mut unsigned = Vec::new();
    if key.is_some() {
        let mut bounds = segments.clone();
        bounds.push(entries.len());
        if bounds[0] > 0 {
            bounds.insert(0, 0);
        }
        for pair in bounds.windows(2) {
            let (from, to) = (pair[0], pair[1]);
            let signed_to = (from..to)
                .rev()
                .find(|&i| matches!(entries[i].kind, Kind::Checkpoint(Some(Ok(())))))
                .map_or(from, |i| i + 1);
            if signed_to < to {
                unsigned.push(UnsignedRun {
                    from: place(signed_to),
                    lines: (to - signed_to) as u64,
                });
            }
        }
    }
    let unsigned_lines = key.map(|_| unsigned.iter().map(|r| r.lines).sum());
    let new_chains: Vec<Place> = segments.iter().skip(1).map(|&i| place(i)).collect();

    // Anchors: checkpoints kept elsewhere that these files must reach.
    let mut loose: Vec<(Option<usize>, &'static str, String)> = Vec::new();
    let last_seq = entries.iter().rev().find_map(|e| e.seal.map(|s| s.0));
    for anchor in anchors {
        let (seq, _) = parse_seal(anchor).expect("anchors are sealed");
        if let Some(key) = key {
            if let Err(error) = checkpoint::check(anchor, key) {
                loose.push((
                    None,
                    "checkpoint",
                    format!("the anchor at seq {seq} is INVALID: {error}"),
                ));
                continue;
            }
        }
        if position.contains_key(&line_hash(anchor)) {
            continue;
        }
        match last_seq {
            Some(last) if last < seq => loose.push((
                None,
                "truncated",
                format!("the log ends at seq {last}, before the anchored checkpoint at seq {seq}: {} line(s) were removed from its end", seq - last),
            )),
            _ => loose.push((
                None,
                "changed",
                format!("the anchored checkpoint at seq {seq} is not in these files: the line at that place differs"),
            )),
        }
    }
    if key.is_some() && valid_checkpoints == 0 && !entries.is_empty() {
        loose.push((
            None,
            "unsigned",
            "no checkpoint signed by this key: nothing in these files is signed (is [audit].signing_key set?)".into(),
        ));
    }

    problems.sort_by_key(|p| p.0);
    let mut out = Vec::new();
    let mut per_file = vec![0; files.len()];
    for (at, kind, detail) in problems {
        per_file[entries[at].file] += 1;
        out.push(Problem {
            file: name(&entries[at]),
            line: entries[at].line,
            kind,
            detail,
        });
    }
    let lines_invalid = out.len() as u64;
    for (_, kind, detail) in loose {
        if let Some(last) = entries.last() {
            per_file[last.file] += 1;
        }
        let (file, line) = entries
            .last()
            .map_or((String::new(), 0), |e| (name(e), e.line));
        out.push(Problem {
            file,
            line,
            kind,
            detail,
        });
    }
    for (file, n) in files.iter_mut().zip(per_file) {
        file.problems = n;
    }
    let count = |k: &Kind| entries.iter().filter(|e| &e.kind == k).count() as u64;
    let records = entries
        .iter()
        .filter(|e| matches!(e.kind, Kind::Record | Kind::Broken(_)))
        .count() as u64;
    Report {
        lines: entries.len() as u64,
        records,
        chain_starts: count(&Kind::ChainStart),
        unchained_before,
        begins,
        genesis,
        checkpoints,
        checkpoints_valid: key.map(|_| valid_checkpoints),
        key_id: key.map(|k| k.id().to_owned()),
        unsigned_lines,
        unsigned,
        new_chains,
        anchors: anchors.len() as u64,
        valid: out.is_empty(),
        lines_invalid,
        problems: out,
        files,
    }
}

impl Report {
    /// Whether the chain is whole and every line of it signed by a checkpoint (with a key).
    pub fn signed_to_the_end(&self) -> bool {
        self.valid && self.unsigned_lines == Some(0)
    }

    /// The report as text: one line per file, one per problem, then the counts.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for file in &self.files {
            let gz = if file.gzip { " (gzip)" } else { "" };
            let verdict = if file.problems == 0 {
                "valid".to_owned()
            } else {
                format!("INVALID: {} problem(s)", file.problems)
            };
            let _ = writeln!(
                out,
                "File {}{gz}  {} lines  {verdict}",
                file.path, file.lines
            );
        }
        for p in &self.problems {
            let _ = writeln!(
                out,
                "  {} line {}: INVALID ({}): {}",
                p.file, p.line, p.kind, p.detail
            );
        }
        let _ = writeln!(out, "Chain begins {}", self.begins);
        if self.unchained_before > 0 {
            let _ = writeln!(
                out,
                "{} line(s) before the chain began are not checked",
                self.unchained_before
            );
        }
        match (&self.key_id, self.checkpoints_valid) {
            (Some(id), Some(valid)) => {
                let _ = writeln!(
                    out,
                    "{valid}/{} checkpoints valid (key {id})",
                    self.checkpoints
                );
            }
            _ => {
                let _ = writeln!(
                    out,
                    "{} checkpoints, signatures not checked (give --public-key)",
                    self.checkpoints
                );
            }
        }
        if self.anchors > 0 {
            let _ = writeln!(out, "{} anchor checkpoint(s) given", self.anchors);
        }
        for start in &self.new_chains {
            let _ = writeln!(
                out,
                "A new chain begins at {} line {} (genesis: the proxy started with no file to go on from); lines removed from the end of the chain before it would not show",
                start.file, start.line
            );
        }
        match self.unsigned_lines {
            Some(0) => {
                let _ = writeln!(out, "Every line is covered by a valid checkpoint");
            }
            Some(_) => {
                for run in &self.unsigned {
                    let _ = writeln!(
                        out,
                        "Unsigned: {} line(s) from {} line {} on follow the last valid checkpoint of their chain: a change to the last of them, or their removal, would not show",
                        run.lines, run.from.file, run.from.line
                    );
                }
            }
            None => {
                let _ = writeln!(
                    out,
                    "Without --public-key: a change to the last line, or lines removed from the end, would not show"
                );
            }
        }
        let _ = writeln!(
            out,
            "{}/{} lines valid ({} records, {} checkpoints, {} chain starts), {} files",
            self.lines.saturating_sub(self.lines_invalid),
            self.lines,
            self.records,
            self.checkpoints,
            self.chain_starts,
            self.files.len()
        );
        let _ = writeln!(
            out,
            "{}",
            if self.valid {
                "The chain is whole."
            } else {
                "INVALID: the chain is not whole."
            }
        );
        out
    }

    pub fn json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("a report serialises");
        text.push('\n');
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::chain::Sealer;

    fn seal_into(sealer: &mut Sealer, file: &Path, records: &[&str]) {
        let handle = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .unwrap();
        let mut batch = Vec::new();
        sealer.begin(Some(&handle), &mut batch);
        for record in records {
            sealer.seal(
                format!("{{\"event\":\"{record}\"}}\n").as_bytes(),
                &mut batch,
            );
        }
        std::io::Write::write_all(&mut &handle, &batch).unwrap();
    }

    fn check(files: &[PathBuf]) -> Report {
        verify(files, &Options::default()).unwrap()
    }

    #[test]
    fn lines_from_before_the_chain_and_a_line_cut_short_are_named_not_failed() {
        let dir = tempfile::tempdir().unwrap();
        // An upgrade: a file of unchained records, then the chain, named by a chain_start.
        let old = dir.path().join("old.log");
        std::fs::write(&old, "{\"event\":\"decision\"}\n{\"event\":\"outcome\"}\n").unwrap();
        seal_into(&mut Sealer::with(None), &old, &["decision", "outcome"]);
        let report = check(std::slice::from_ref(&old));
        assert!(report.valid, "{}", report.text());
        assert_eq!(report.unchained_before, 2);
        assert_eq!(report.chain_starts, 1);
        assert!(report
            .begins
            .contains("after 2 lines written before the chain began"));

        // A crash cut the last line short: the restart ends it and names it.
        let cut = dir.path().join("cut.log");
        let mut first = Sealer::with(None);
        seal_into(&mut first, &cut, &["decision", "outcome"]);
        let mut bytes = std::fs::read(&cut).unwrap();
        bytes.extend_from_slice(b"{\"seq\":2,\"prev\":\"");
        std::fs::write(&cut, &bytes).unwrap();
        seal_into(&mut Sealer::with(None), &cut, &["decision"]);
        let report = check(std::slice::from_ref(&cut));
        assert!(report.valid, "{}", report.text());
        assert!(report.genesis);
        // The same cut line with nothing naming it is a problem.
        std::fs::write(&cut, &bytes).unwrap();
        let report = check(&[cut]);
        assert!(!report.valid);
        assert_eq!(report.problems[0].kind, "broken");
    }

    #[test]
    fn a_new_chain_is_reported_and_a_line_put_in_before_it_is_not_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.log"), dir.path().join("b.log"));
        seal_into(&mut Sealer::with(None), &a, &["decision", "outcome"]);
        // Standard output after a restart: a new chain from genesis.
        seal_into(&mut Sealer::with(None), &b, &["deny", "decision"]);
        let report = check(&[a.clone(), b.clone()]);
        assert!(report.valid, "{}", report.text());
        assert_eq!(report.new_chains.len(), 1);
        assert_eq!(report.new_chains[0].line, 1);
        assert!(report.text().contains("A new chain begins at"));

        // A forged chain put in the middle of another: the line after it does not follow it.
        let lines: Vec<Vec<u8>> = std::fs::read(&a)
            .unwrap()
            .split_inclusive(|c| *c == b'\n')
            .map(<[u8]>::to_vec)
            .collect();
        let forged = std::fs::read(&b).unwrap();
        let mut mixed = lines[0].clone();
        mixed.extend_from_slice(&forged);
        mixed.extend_from_slice(&lines[1]);
        std::fs::write(&a, mixed).unwrap();
        let report = check(&[a]);
        assert!(!report.valid, "{}", report.text());
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.line == 3 && p.kind == "inserted"),
            "{}",
            report.text()
        );
    }
}
