//! The would-be denials, in the report's order (event time, then file and record), in bounded
//! memory: at most [`RUN`] are held; each time that many have come, they are sorted and written
//! as a run to an unlinked file in the temporary directory, and the report merges the runs as it
//! writes. A trail with a million denials costs disk, not memory.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Seek, Write};

use serde::{Deserialize, Serialize};

use super::Position;

/// How many denials are held before they are written out as a sorted run.
const RUN: usize = 8192;

/// One change the policy would have denied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Denial {
    pub time: Option<String>,
    pub principal: String,
    pub operation: String,
    pub key: Option<String>,
    pub alias: Option<String>,
    pub event_id: Option<String>,
    /// The input file (its index in `Replay::files`) and the record's place in it.
    pub file: usize,
    pub at: Position,
    pub violations: Vec<Finding>,
    pub violations_omitted: usize,
}

/// One violation, as the report shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finding {
    pub rule: String,
    pub key: Option<String>,
    pub message: String,
}

impl Denial {
    fn order(&self) -> (&Option<String>, usize, Position) {
        (&self.time, self.file, self.at)
    }
}

/// The denials so far: some in memory, the rest in sorted runs on disk.
#[derive(Debug, Default)]
pub struct Denials {
    held: Vec<Denial>,
    runs: Vec<File>,
    /// Why a run could not be written (the denials then stay in memory): a warning, the
    /// report is whole.
    pub spill_error: Option<String>,
}

impl Denials {
    pub fn push(&mut self, denial: Denial) {
        self.held.push(denial);
        if self.held.len() >= RUN && self.spill_error.is_none() {
            if let Err(error) = self.spill() {
                self.spill_error = Some(format!(
                    "cannot write sorted denials to {} ({error}): they were kept in memory",
                    std::env::temp_dir().display()
                ));
            }
        }
    }

    fn spill(&mut self) -> io::Result<()> {
        self.held.sort_by(|a, b| a.order().cmp(&b.order()));
        let mut file = temp_file()?;
        let mut out = BufWriter::new(&mut file);
        for denial in &self.held {
            serde_json::to_writer(&mut out, denial)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        drop(out);
        file.rewind()?;
        self.runs.push(file);
        self.held.clear();
        Ok(())
    }

    /// Every denial, in order.
    pub fn sorted(&mut self) -> Sorted {
        self.held.sort_by(|a, b| a.order().cmp(&b.order()));
        let held = std::mem::take(&mut self.held);
        let mut sources: Vec<Source> = Vec::new();
        for file in &self.runs {
            let reader = match file.try_clone().and_then(|mut f| f.rewind().map(|()| f)) {
                Ok(f) => BufReader::new(f),
                Err(error) => return Sorted::failed(error),
            };
            sources.push(Source::Run(reader));
        }
        sources.push(Source::Held(held.into_iter()));
        let mut sorted = Sorted {
            heads: Vec::new(),
            heap: BinaryHeap::new(),
            sources,
            error: None,
        };
        for i in 0..sorted.sources.len() {
            sorted.heads.push(None);
            sorted.advance(i);
        }
        sorted
    }
}

/// An unlinked file of its own in the temporary directory.
fn temp_file() -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path =
        std::env::temp_dir().join(format!(".kms-tag-guard-replay-{}-{n}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

/// A head's place in the order: event time, file, record, and the source it came from.
type HeapEntry = (Option<String>, usize, Position, usize);

enum Source {
    Run(BufReader<File>),
    Held(std::vec::IntoIter<Denial>),
}

/// The merge of the runs and what is held.
pub struct Sorted {
    sources: Vec<Source>,
    /// The next denial of each source.
    heads: Vec<Option<Denial>>,
    /// (order, source) of each head.
    heap: BinaryHeap<Reverse<HeapEntry>>,
    pub error: Option<io::Error>,
}

impl Sorted {
    fn failed(error: io::Error) -> Sorted {
        Sorted {
            sources: Vec::new(),
            heads: Vec::new(),
            heap: BinaryHeap::new(),
            error: Some(error),
        }
    }

    fn advance(&mut self, i: usize) {
        let next = match &mut self.sources[i] {
            Source::Held(held) => held.next(),
            Source::Run(reader) => {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) => None,
                    Ok(_) => match serde_json::from_str(&line) {
                        Ok(denial) => Some(denial),
                        Err(error) => {
                            self.error = Some(io::Error::other(error));
                            None
                        }
                    },
                    Err(error) => {
                        self.error = Some(error);
                        None
                    }
                }
            }
        };
        if let Some(denial) = &next {
            self.heap
                .push(Reverse((denial.time.clone(), denial.file, denial.at, i)));
        }
        self.heads[i] = next;
    }
}

impl Iterator for Sorted {
    type Item = Denial;

    fn next(&mut self) -> Option<Denial> {
        let Reverse((_, _, _, i)) = self.heap.pop()?;
        let denial = self.heads[i].take();
        self.advance(i);
        denial
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(time: u32, file: usize, record: u64) -> Denial {
        Denial {
            time: Some(format!("2026-11-01T00:{:02}:{:02}Z", time / 60, time % 60)),
            principal: "p".into(),
            operation: "TagResource".into(),
            key: None,
            alias: None,
            event_id: None,
            file,
            at: Position { record, offset: 0 },
            violations: Vec::new(),
            violations_omitted: 0,
        }
    }

    #[test]
    fn more_than_a_run_comes_back_in_order_from_disk() {
        let mut denials = Denials::default();
        let n = RUN * 2 + 100;
        // Times in a scrambled order, with ties broken by file and record.
        for i in 0..n {
            let t = (i * 7919) % 3000;
            denials.push(denial(t as u32, i % 3, i as u64));
        }
        assert_eq!(denials.runs.len(), 2);
        assert!(denials.held.len() < RUN);
        let mut sorted = denials.sorted();
        let got: Vec<Denial> = sorted.by_ref().collect();
        assert!(sorted.error.is_none());
        assert_eq!(got.len(), n);
        for pair in got.windows(2) {
            assert!(pair[0].order() <= pair[1].order());
        }
    }
}
