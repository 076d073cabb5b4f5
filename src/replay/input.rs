//! The inputs of `replay`: which files, and each file's events, streamed.
//!
//! A file is read through a buffer of a few hundred KiB (grown only for a single record larger
//! than that, up to [`MAX_VALUE`]), inflated on the way when it is gzip (its first two bytes), so
//! neither a whole file nor the whole input is ever held. What the file holds is told by its
//! content, not its name:
//!
//! - an object whose first member is `Records` (a log file as CloudTrail delivers it to S3):
//!   each element of the array is one event;
//! - an object whose first member is `Events` or `NextToken` (`aws cloudtrail lookup-events`):
//!   each element's `CloudTrailEvent` is an event serialised as a JSON string;
//! - any other object: one event (JSON lines of single events, or several objects one after
//!   another);
//! - an array: each element one event.
//!
//! Every element is first read as a [`Peek`]: its `eventName` and `eventSource`, decoded and
//! compared whole, everything else skipped without being kept. Only the events that may change
//! tags or aliases reach the caller's full reading. serde_json checks the syntax of every
//! record, read or skipped, so a broken record anywhere is reported with its place.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::{self, DeserializeOwned, IgnoredAny};
use serde::Deserialize;

use crate::kms::TagOperation;

/// How much is read from a file at a time.
const CHUNK: usize = 256 * 1024;
/// The largest single value (one record, or a member skipped) a file may hold. CloudTrail cuts
/// `requestParameters` and `responseElements` at 100 KB each, so a real record stays far below.
pub const MAX_VALUE: usize = 4 << 20;

/// Where in a file something is: the record's number (from 1) and its first byte's offset in
/// the file's (inflated) content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, Deserialize)]
pub struct Position {
    pub record: u64,
    pub offset: u64,
}

/// Why a file could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read it: {0}")]
    Io(#[from] io::Error),
    #[error("byte {offset}: cannot read on: {error} (a file cut short?)")]
    Read { offset: u64, error: io::Error },
    #[error("byte {offset}: {message}")]
    Syntax { offset: u64, message: String },
    #[error("byte {offset}: a value larger than {} MiB; CloudTrail records are far smaller: is this a CloudTrail file?", MAX_VALUE >> 20)]
    TooLarge { offset: u64 },
    #[error("byte {offset}: the file ends inside a value (cut short?)")]
    Truncated { offset: u64 },
    #[error("byte {offset}: expected {expected}, found {found:?}: not CloudTrail events (an S3 log file with `Records`, `aws cloudtrail lookup-events` output, or JSON lines of events)")]
    Unexpected {
        offset: u64,
        expected: &'static str,
        found: char,
    },
}

/// The two members of a record read before anything else.
#[derive(Debug, Deserialize)]
#[serde(expecting = "a CloudTrail event (an object)")]
pub struct Peek {
    #[serde(rename = "eventName")]
    name: Option<EventName>,
    #[serde(rename = "eventSource")]
    source: Option<EventSource>,
}

impl Peek {
    /// Whether the record names its event at all (every CloudTrail record does).
    pub fn has_name(&self) -> bool {
        self.name.is_some()
    }

    /// The operation, when the record is a KMS event that may change tags or aliases.
    pub fn operation(&self) -> Option<TagOperation> {
        match (&self.name, &self.source) {
            (Some(EventName(Some(op))), Some(EventSource(true))) => Some(*op),
            _ => None,
        }
    }
}

/// What a record without `eventName` is told.
const NO_NAME: &str = "not a CloudTrail event: it has no eventName (a file whose first member is not Records or Events is read as events)";

/// An `eventName`, compared whole after its escapes are decoded: one of the seven, or another.
#[derive(Debug)]
struct EventName(Option<TagOperation>);

/// Whether an `eventSource` is exactly `kms.amazonaws.com`.
#[derive(Debug)]
struct EventSource(bool);

struct ExactStr<F>(F);

impl<'de, T, F: Fn(&str) -> T> de::Visitor<'de> for ExactStr<F> {
    type Value = T;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        Ok((self.0)(v))
    }
}

impl<'de> Deserialize<'de> for EventName {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ExactStr(|s: &str| EventName(TagOperation::from_name(s))))
    }
}

impl<'de> Deserialize<'de> for EventSource {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ExactStr(|s: &str| EventSource(s == "kms.amazonaws.com")))
    }
}

/// One entry of `lookup-events` output: the record is a string inside it.
#[derive(Deserialize)]
#[serde(expecting = "a lookup-events entry (an object)")]
struct LookupEntry {
    #[serde(rename = "CloudTrailEvent")]
    event: Option<String>,
}

/// What a file's events go to.
pub trait Sink {
    /// A record that parsed as a [`Peek`]: `bytes` is the whole record.
    fn record(&mut self, peek: &Peek, bytes: &[u8], at: Position);
    /// A record that is well-formed JSON but not an event this tool can read (not an object,
    /// `eventName` not a string, a member twice, ...).
    fn unreadable(&mut self, message: String, at: Position);
}

/// A serde_json error's message without its " at line L column C", which would count from the
/// record, not the file (the caller says where the record is).
pub fn without_place(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    text.strip_suffix(&suffix).unwrap_or(&text).to_owned()
}

/// The files of the inputs: files as given, directories walked depth first in byte order of the
/// names (hidden entries and `CloudTrail-Digest` directories left out), so that every run sees
/// the same files in the same order. A path that cannot be read is returned as a problem.
pub fn files(inputs: &[PathBuf]) -> (Vec<PathBuf>, Vec<String>) {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for input in inputs {
        walk(input, true, &mut files, &mut problems);
    }
    (files, problems)
}

fn walk(path: &Path, given: bool, files: &mut Vec<PathBuf>, problems: &mut Vec<String>) {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(error) => {
            problems.push(format!("{}: cannot read it: {error}", path.display()));
            return;
        }
    };
    if meta.is_file() {
        files.push(path.to_owned());
        return;
    }
    if !meta.is_dir() {
        if given {
            problems.push(format!(
                "{}: not a file or a directory; give CloudTrail log files or directories of them",
                path.display()
            ));
        }
        return;
    }
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(error) => {
            problems.push(format!("{}: cannot list it: {error}", path.display()));
            return;
        }
    };
    let mut names: Vec<_> = entries
        .filter_map(|entry| entry.ok().map(|e| e.file_name()))
        .filter(|name| {
            let name = name.as_encoded_bytes();
            !name.starts_with(b".") && name != b"CloudTrail-Digest"
        })
        .collect();
    names.sort_unstable_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    for name in names {
        walk(&path.join(name), false, files, problems);
    }
}

/// A reader that adds what it reads to a counter (the progress bar's).
struct Counted<'a, R> {
    inner: R,
    count: &'a AtomicU64,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Reads every event of one file into `sink`; `read_bytes` counts the file's bytes as read.
pub fn read_file(
    path: &Path,
    read_bytes: &AtomicU64,
    sink: &mut dyn Sink,
) -> Result<(), InputError> {
    let file = File::open(path)?;
    let mut raw = BufReader::with_capacity(
        64 * 1024,
        Counted {
            inner: file,
            count: read_bytes,
        },
    );
    let head = raw.fill_buf()?;
    let reader: Box<dyn Read + '_> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(raw))
    } else {
        Box::new(raw)
    };
    read_events(reader, sink)
}

/// Reads every event of a stream (already inflated) into `sink`.
pub fn read_events(reader: impl Read, sink: &mut dyn Sink) -> Result<(), InputError> {
    let mut source = Source::new(reader);
    while let Some(byte) = source.peek_byte()? {
        match byte {
            b'{' => match source.first_key()? {
                Some(FirstKey::Records) | Some(FirstKey::Events) => source.container(sink)?,
                None => source.event(sink)?,
            },
            b'[' => source.array(Element::Record, sink)?,
            other => return Err(source.unexpected("an object or an array", other)),
        }
    }
    Ok(())
}

enum FirstKey {
    Records,
    Events,
}

#[derive(Clone, Copy)]
enum Element {
    Record,
    Lookup,
}

/// A value parsed in place and where it is in the buffer, or why it is not a `T`.
type Parsed<T> = Result<(T, Range<usize>), serde_json::Error>;

/// A stream read through a buffer: values are parsed in place, whole, and the buffer moves on.
struct Source<R> {
    reader: R,
    buf: Vec<u8>,
    /// The next byte to read.
    pos: usize,
    /// The end of the bytes read.
    len: usize,
    /// The stream offset of `buf[0]`.
    base: u64,
    eof: bool,
    /// Records seen so far.
    records: u64,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\r' | b'\t')
}

impl<R: Read> Source<R> {
    fn new(reader: R) -> Self {
        Source {
            reader,
            buf: vec![0; CHUNK],
            pos: 0,
            len: 0,
            base: 0,
            eof: false,
            records: 0,
        }
    }

    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// Reads more, keeping the bytes from `pos` on (moved to the front). False at the end.
    fn fill(&mut self) -> Result<bool, InputError> {
        if self.eof {
            return Ok(false);
        }
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.len, 0);
            self.base += self.pos as u64;
            self.len -= self.pos;
            self.pos = 0;
        }
        if self.len == self.buf.len() {
            if self.buf.len() >= MAX_VALUE {
                return Err(InputError::TooLarge {
                    offset: self.offset(),
                });
            }
            self.buf.resize((self.buf.len() * 2).min(MAX_VALUE), 0);
        }
        let n = loop {
            match self.reader.read(&mut self.buf[self.len..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    return Err(InputError::Read {
                        offset: self.base + self.len as u64,
                        error,
                    })
                }
            }
        };
        if n == 0 {
            self.eof = true;
            return Ok(false);
        }
        self.len += n;
        Ok(true)
    }

    /// The next byte that is not whitespace, not consumed; `None` at the end.
    fn peek_byte(&mut self) -> Result<Option<u8>, InputError> {
        loop {
            while self.pos < self.len && is_space(self.buf[self.pos]) {
                self.pos += 1;
            }
            if self.pos < self.len {
                return Ok(Some(self.buf[self.pos]));
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    fn unexpected(&self, expected: &'static str, found: u8) -> InputError {
        InputError::Unexpected {
            offset: self.offset(),
            expected,
            found: found as char,
        }
    }

    /// Consumes `byte` (after whitespace), or fails saying what was expected.
    fn expect(&mut self, byte: u8, expected: &'static str) -> Result<(), InputError> {
        match self.peek_byte()? {
            Some(b) if b == byte => {
                self.pos += 1;
                Ok(())
            }
            Some(b) => Err(self.unexpected(expected, b)),
            None => Err(InputError::Truncated {
                offset: self.offset(),
            }),
        }
    }

    /// Parses the next value (after whitespace) whole, in place. `Ok(Err(..))`: the value is
    /// well-formed JSON but not a `T` (its range is then unknown).
    fn parse<T: DeserializeOwned>(&mut self) -> Result<Parsed<T>, InputError> {
        loop {
            let slice = &self.buf[self.pos..self.len];
            let mut values = serde_json::Deserializer::from_slice(slice).into_iter::<T>();
            match values.next() {
                Some(Ok(value)) => {
                    let end = self.pos + values.byte_offset();
                    let start = self.pos + (slice.len() - slice.trim_ascii_start().len());
                    self.pos = end;
                    return Ok(Ok((value, start..end)));
                }
                Some(Err(e)) if e.is_eof() => {}
                None => {}
                Some(Err(e)) if e.is_data() => return Ok(Err(e)),
                Some(Err(e)) => {
                    return Err(InputError::Syntax {
                        offset: self.error_offset(&e),
                        message: without_place(&e),
                    })
                }
            }
            if !self.fill()? {
                return Err(InputError::Truncated {
                    offset: self.offset(),
                });
            }
        }
    }

    /// Parses the next value, which must be well-formed; a value that is not a `T` is skipped
    /// and its error returned.
    fn value<T: DeserializeOwned>(&mut self) -> Result<Parsed<T>, InputError> {
        match self.parse::<T>()? {
            Ok(found) => Ok(Ok(found)),
            Err(error) => {
                // Well-formed but not what was asked for: skip it whole.
                let _ = self.parse::<IgnoredAny>()?;
                Ok(Err(error))
            }
        }
    }

    /// The stream offset of a parse error at line/column of the slice from `pos`.
    fn error_offset(&self, e: &serde_json::Error) -> u64 {
        let slice = &self.buf[self.pos..self.len];
        let mut line = 1;
        let mut at = 0;
        while line < e.line() {
            match memchr::memchr(b'\n', &slice[at..]) {
                Some(i) => {
                    at += i + 1;
                    line += 1;
                }
                None => break,
            }
        }
        self.offset() + (at + e.column().saturating_sub(1)) as u64
    }

    /// At a `{`: whether its first member is `Records`, `Events` or `NextToken`, without
    /// consuming anything.
    fn first_key(&mut self) -> Result<Option<FirstKey>, InputError> {
        loop {
            let slice = &self.buf[self.pos + 1..self.len];
            let mut values = serde_json::Deserializer::from_slice(slice).into_iter::<String>();
            match values.next() {
                Some(Ok(key)) => {
                    // The key must be followed by a colon to be a member name at all.
                    let rest = slice[values.byte_offset()..].trim_ascii_start();
                    if rest.is_empty() && !self.eof {
                        // The colon is not read yet.
                    } else {
                        return Ok(match (key.as_str(), rest.first()) {
                            ("Records", Some(b':')) => Some(FirstKey::Records),
                            ("Events" | "NextToken", Some(b':')) => Some(FirstKey::Events),
                            _ => None,
                        });
                    }
                }
                Some(Err(e)) if e.is_eof() => {}
                None => {}
                // `{}`, or not a member name: read as one event, which reports it.
                Some(Err(_)) => return Ok(None),
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    /// An object with `Records` or `Events`: their elements are events; other members skipped.
    fn container(&mut self, sink: &mut dyn Sink) -> Result<(), InputError> {
        self.expect(b'{', "an object")?;
        if self.peek_byte()? == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            let key = match self.parse::<String>()? {
                Ok((key, _)) => key,
                Err(e) => {
                    return Err(InputError::Syntax {
                        offset: self.offset(),
                        message: format!("a member name: {}", without_place(&e)),
                    })
                }
            };
            self.expect(b':', "a colon")?;
            match key.as_str() {
                "Records" if self.peek_byte()? == Some(b'[') => {
                    self.array(Element::Record, sink)?
                }
                "Events" if self.peek_byte()? == Some(b'[') => self.array(Element::Lookup, sink)?,
                "Records" | "Events" => {
                    let found = self.peek_byte()?.unwrap_or(b' ');
                    return Err(self.unexpected("an array of events", found));
                }
                _ => {
                    let _ = self.value::<IgnoredAny>()?;
                }
            }
            match self.peek_byte()? {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(other) => return Err(self.unexpected("a comma or '}'", other)),
                None => {
                    return Err(InputError::Truncated {
                        offset: self.offset(),
                    })
                }
            }
        }
    }

    /// An array of events (or of lookup entries).
    fn array(&mut self, element: Element, sink: &mut dyn Sink) -> Result<(), InputError> {
        self.expect(b'[', "an array")?;
        if self.peek_byte()? == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            match element {
                Element::Record => self.event(sink)?,
                Element::Lookup => self.lookup(sink)?,
            }
            match self.peek_byte()? {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(other) => return Err(self.unexpected("a comma or ']'", other)),
                None => {
                    return Err(InputError::Truncated {
                        offset: self.offset(),
                    })
                }
            }
        }
    }

    fn next_position(&mut self) -> Position {
        self.records += 1;
        Position {
            record: self.records,
            offset: self.offset(),
        }
    }

    /// One record.
    fn event(&mut self, sink: &mut dyn Sink) -> Result<(), InputError> {
        self.peek_byte()?;
        let at = self.next_position();
        match self.value::<Peek>()? {
            Ok((peek, _)) if !peek.has_name() => sink.unreadable(NO_NAME.into(), at),
            Ok((peek, range)) => sink.record(&peek, &self.buf[range], at),
            Err(error) => sink.unreadable(without_place(&error), at),
        }
        Ok(())
    }

    /// One entry of `lookup-events` output.
    fn lookup(&mut self, sink: &mut dyn Sink) -> Result<(), InputError> {
        self.peek_byte()?;
        let at = self.next_position();
        let event = match self.value::<LookupEntry>()? {
            Ok((LookupEntry { event: Some(event) }, _)) => event,
            Ok((LookupEntry { event: None }, _)) => {
                sink.unreadable("a lookup-events entry without CloudTrailEvent".into(), at);
                return Ok(());
            }
            Err(error) => {
                sink.unreadable(without_place(&error), at);
                return Ok(());
            }
        };
        match serde_json::from_str::<Peek>(&event) {
            Ok(peek) if !peek.has_name() => sink.unreadable(NO_NAME.into(), at),
            Ok(peek) => sink.record(&peek, event.as_bytes(), at),
            Err(error) => {
                sink.unreadable(format!("its CloudTrailEvent is not an event: {error}"), at)
            }
        }
        Ok(())
    }
}
