//! Finding where a chunked answer ends, so it can be relayed as it arrives and the connection to
//! KMS reused after it.

/// Longest chunk-size line (with extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size {
        digits: usize,
    },
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    Trailer,
    TrailerLf {
        empty: bool,
    },
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the chunked answer is malformed")]
pub(crate) struct BadChunk;

/// Walks a chunked body a piece at a time.
#[derive(Debug)]
pub(crate) struct ChunkedScanner {
    state: State,
    remaining: u64,
    line: usize,
}

impl ChunkedScanner {
    pub(crate) fn new() -> ChunkedScanner {
        ChunkedScanner {
            state: State::Size { digits: 0 },
            remaining: 0,
            line: 0,
        }
    }

    /// Scans `data`; returns how many of its bytes belong to the body and whether the body ends
    /// there. With `decoded`, the chunk data is also appended to it.
    pub(crate) fn scan(
        &mut self,
        data: &[u8],
        mut decoded: Option<&mut Vec<u8>>,
    ) -> Result<(usize, bool), BadChunk> {
        let mut i = 0;
        while i < data.len() {
            if self.state == State::Data {
                let take =
                    (data.len() - i).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                if let Some(out) = decoded.as_deref_mut() {
                    out.extend_from_slice(&data[i..i + take]);
                }
                i += take;
                self.remaining -= take as u64;
                if self.remaining == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            let b = data[i];
            i += 1;
            self.line += 1;
            if self.line > MAX_LINE {
                return Err(BadChunk);
            }
            self.state = match (self.state, b) {
                (State::Size { digits }, _) if b.is_ascii_hexdigit() => {
                    if digits == 15 {
                        return Err(BadChunk);
                    }
                    let value = (b as char).to_digit(16).expect("hex digit") as u64;
                    self.remaining = self.remaining * 16 + value;
                    State::Size { digits: digits + 1 }
                }
                (State::Size { digits }, b';') if digits > 0 => State::Extension,
                (State::Size { digits }, b'\r') if digits > 0 => State::SizeLf,
                (State::Extension, b'\r') => State::SizeLf,
                (State::Extension, b'\n') => return Err(BadChunk),
                (State::Extension, _) => State::Extension,
                (State::SizeLf, b'\n') => {
                    self.line = 0;
                    if self.remaining == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    }
                }
                (State::DataCr, b'\r') => State::DataLf,
                (State::DataLf, b'\n') => {
                    self.line = 0;
                    State::Size { digits: 0 }
                }
                (State::TrailerStart, b'\r') => State::TrailerLf { empty: true },
                (State::TrailerStart | State::Trailer, b'\n') => return Err(BadChunk),
                (State::Trailer, b'\r') => State::TrailerLf { empty: false },
                (State::TrailerStart | State::Trailer, _) => State::Trailer,
                (State::TrailerLf { empty }, b'\n') => {
                    self.line = 0;
                    if empty {
                        self.state = State::Done;
                        return Ok((i, true));
                    }
                    State::TrailerStart
                }
                _ => return Err(BadChunk),
            };
        }
        Ok((i, self.state == State::Done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(pieces: &[&[u8]]) -> Result<(usize, bool, Vec<u8>), BadChunk> {
        let mut scanner = ChunkedScanner::new();
        let mut decoded = Vec::new();
        let mut total = 0;
        for piece in pieces {
            let (n, done) = scanner.scan(piece, Some(&mut decoded))?;
            total += n;
            if done {
                return Ok((total, true, decoded));
            }
        }
        Ok((total, false, decoded))
    }

    #[test]
    fn finds_the_end_across_pieces() {
        let body = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let (n, done, decoded) = scan_all(&[body]).unwrap();
        assert!(done);
        assert_eq!(&body[n..], b"NEXT");
        assert_eq!(decoded, b"hello0123456789");
        for split in 1..body.len() - 4 {
            let (n, done, decoded) = scan_all(&[&body[..split], &body[split..]]).unwrap();
            assert!(done, "split at {split}");
            assert_eq!(n, body.len() - 4);
            assert_eq!(decoded, b"hello0123456789");
        }
        let (_, done, _) = scan_all(&[b"5\r\nhel"]).unwrap();
        assert!(!done);
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for bad in [
            b"\r\n".as_slice(),
            b"x\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"1234567890123456\r\n",
            b"0\r\nx-trailer: 1\n\r\n",
        ] {
            assert_eq!(
                scan_all(&[bad]),
                Err(BadChunk),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
