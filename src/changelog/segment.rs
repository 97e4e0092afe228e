//! The on-disk format of one log segment, and the scan that validates it.
//!
//! A segment file is a 16-byte header (`MAGIC`, then the commit LSN of its first
//! transaction, little-endian) followed by records. A record is
//!
//! ```text
//! len: u32 LE   crc: u32 LE (CRC-32 of body)   body: len bytes
//! ```
//!
//! and its body starts with a tag: `Begin` (commit LSN, commit time in Unix
//! microseconds, xid), `Change` (the opaque payload), `Commit` (commit LSN, end
//! LSN, number of changes). A segment holds whole transactions only; a reader
//! trusts nothing past the end of the last valid `Commit`, so a torn tail — a
//! short record, a bad checksum, a transaction without its `Commit` — is cut on
//! recovery and never replayed.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use bytes::Bytes;

use crate::lsn::Lsn;

pub(super) const MAGIC: &[u8; 8] = b"WCLOG\0\0\x01";
pub(super) const HEADER_LEN: u64 = 16;
pub(super) const RECORD_HEADER_LEN: usize = 8;
/// A record longer than this is corruption, not data (PostgreSQL's own limit on a
/// single value is 1 GiB; a change carries at most a few of them as text).
pub(super) const MAX_RECORD: u32 = 1 << 30;

pub(super) const TAG_BEGIN: u8 = 1;
pub(super) const TAG_CHANGE: u8 = 2;
pub(super) const TAG_COMMIT: u8 = 3;

/// One decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Begin {
        commit_lsn: Lsn,
        commit_ts: i64,
        xid: u32,
    },
    Change(Bytes),
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        changes: u32,
    },
}

/// Appends the encoded `rec` to `out`.
pub(super) fn encode(out: &mut Vec<u8>, rec: &Record) {
    match rec {
        Record::Begin {
            commit_lsn,
            commit_ts,
            xid,
        } => {
            let mut body = [0u8; 21];
            body[0] = TAG_BEGIN;
            body[1..9].copy_from_slice(&commit_lsn.0.to_le_bytes());
            body[9..17].copy_from_slice(&commit_ts.to_le_bytes());
            body[17..21].copy_from_slice(&xid.to_le_bytes());
            push_record(out, &[&body]);
        }
        Record::Change(payload) => encode_change(out, payload),
        Record::Commit {
            commit_lsn,
            end_lsn,
            changes,
        } => {
            let mut body = [0u8; 21];
            body[0] = TAG_COMMIT;
            body[1..9].copy_from_slice(&commit_lsn.0.to_le_bytes());
            body[9..17].copy_from_slice(&end_lsn.0.to_le_bytes());
            body[17..21].copy_from_slice(&changes.to_le_bytes());
            push_record(out, &[&body]);
        }
    }
}

/// Appends a `Change` record without copying `payload` into a `Record` first.
pub(super) fn encode_change(out: &mut Vec<u8>, payload: &[u8]) {
    push_record(out, &[&[TAG_CHANGE], payload]);
}

fn push_record(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut crc = crc32fast::Hasher::new();
    for p in parts {
        crc.update(p);
    }
    out.reserve(RECORD_HEADER_LEN + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

pub(super) fn header(first_lsn: Lsn) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..].copy_from_slice(&first_lsn.0.to_le_bytes());
    h
}

/// Why a record could not be read.
#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    /// Not a valid record at this offset: torn write, bit rot or not a log file.
    Invalid(&'static str),
    /// The file ends inside the record.
    Truncated,
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// Reads records sequentially from a segment file.
pub(super) struct RecordReader {
    inner: BufReader<File>,
    /// Offset of the next record.
    pub offset: u64,
    /// Stop at this offset (the last committed byte a reader may see).
    pub limit: u64,
}

impl RecordReader {
    /// Opens `path` and checks its header; positions at `offset` (≥ the header).
    pub fn open(path: &Path, offset: u64, limit: u64) -> Result<(Self, Lsn), ReadError> {
        let mut f = File::open(path)?;
        let mut h = [0u8; HEADER_LEN as usize];
        f.read_exact(&mut h).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ReadError::Truncated
            } else {
                ReadError::Io(e)
            }
        })?;
        if &h[..8] != MAGIC {
            return Err(ReadError::Invalid("not a walcast log segment (bad magic)"));
        }
        let first = Lsn(u64::from_le_bytes(h[8..].try_into().expect("8 bytes")));
        let offset = offset.max(HEADER_LEN);
        if offset != HEADER_LEN {
            f.seek(SeekFrom::Start(offset))?;
        }
        Ok((
            RecordReader {
                inner: BufReader::with_capacity(64 * 1024, f),
                offset,
                limit,
            },
            first,
        ))
    }

    /// The next record, or `None` at `limit`.
    pub fn next(&mut self) -> Result<Option<Record>, ReadError> {
        if self.offset >= self.limit {
            return Ok(None);
        }
        let mut h = [0u8; RECORD_HEADER_LEN];
        read_full(&mut self.inner, &mut h)?;
        let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(h[4..].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_RECORD {
            return Err(ReadError::Invalid("record length out of range"));
        }
        let end = self.offset + RECORD_HEADER_LEN as u64 + u64::from(len);
        if end > self.limit {
            return Err(ReadError::Truncated);
        }
        let mut body = vec![0u8; len as usize];
        read_full(&mut self.inner, &mut body)?;
        if crc32fast::hash(&body) != crc {
            return Err(ReadError::Invalid("checksum mismatch"));
        }
        let rec = parse_body(Bytes::from(body))?;
        self.offset = end;
        Ok(Some(rec))
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<(), ReadError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ReadError::Truncated
        } else {
            ReadError::Io(e)
        }
    })
}

fn parse_body(body: Bytes) -> Result<Record, ReadError> {
    let fixed = |b: &Bytes| -> Result<(u64, u64, u32), ReadError> {
        if b.len() != 21 {
            return Err(ReadError::Invalid("fixed-size record of the wrong length"));
        }
        Ok((
            u64::from_le_bytes(b[1..9].try_into().expect("8 bytes")),
            u64::from_le_bytes(b[9..17].try_into().expect("8 bytes")),
            u32::from_le_bytes(b[17..21].try_into().expect("4 bytes")),
        ))
    };
    match body[0] {
        TAG_BEGIN => {
            let (lsn, ts, xid) = fixed(&body)?;
            Ok(Record::Begin {
                commit_lsn: Lsn(lsn),
                commit_ts: ts as i64,
                xid,
            })
        }
        TAG_CHANGE => Ok(Record::Change(body.slice(1..))),
        TAG_COMMIT => {
            let (lsn, end, n) = fixed(&body)?;
            Ok(Record::Commit {
                commit_lsn: Lsn(lsn),
                end_lsn: Lsn(end),
                changes: n,
            })
        }
        _ => Err(ReadError::Invalid("unknown record tag")),
    }
}

/// A position in the sparse index: the `Begin` of a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub commit_lsn: Lsn,
    pub commit_ts: i64,
    pub offset: u64,
}

/// What a full scan of a segment found.
#[derive(Debug, Default)]
pub(super) struct Scan {
    pub first_lsn: Option<Lsn>,
    pub last_lsn: Option<Lsn>,
    pub first_ts: i64,
    pub max_ts: i64,
    /// End of the last complete transaction: everything after it is cut.
    pub valid_end: u64,
    pub index: Vec<IndexEntry>,
    pub txns: u64,
    /// Why the scan stopped before the end of the file, if it did.
    pub stopped: Option<&'static str>,
}

/// Scans a whole segment, validating record order, and builds its sparse index
/// (an entry every `index_every` bytes, and always the first transaction).
pub(super) fn scan(path: &Path, index_every: u64) -> Result<Scan, ReadError> {
    let file_len = std::fs::metadata(path)?.len();
    let (mut r, header_lsn) = RecordReader::open(path, HEADER_LEN, file_len)?;
    let mut s = Scan {
        valid_end: HEADER_LEN,
        ..Scan::default()
    };
    let mut open: Option<(Lsn, i64, u64, u32)> = None; // lsn, ts, offset, changes
    let mut last_indexed: Option<u64> = None;
    loop {
        let at = r.offset;
        let rec = match r.next() {
            Ok(Some(rec)) => rec,
            Ok(None) => break,
            Err(ReadError::Io(e)) => return Err(ReadError::Io(e)),
            Err(ReadError::Truncated) => {
                s.stopped = Some("torn record at the end");
                break;
            }
            Err(ReadError::Invalid(why)) => {
                s.stopped = Some(why);
                break;
            }
        };
        match (rec, &mut open) {
            (
                Record::Begin {
                    commit_lsn,
                    commit_ts,
                    ..
                },
                None,
            ) => {
                let ordered = s.last_lsn.is_none_or(|l| commit_lsn > l)
                    && (s.last_lsn.is_some() || commit_lsn == header_lsn);
                if !ordered {
                    s.stopped = Some("transaction out of order");
                    break;
                }
                open = Some((commit_lsn, commit_ts, at, 0));
            }
            (Record::Change(_), Some((_, _, _, n))) => *n += 1,
            (
                Record::Commit {
                    commit_lsn,
                    changes,
                    ..
                },
                Some((lsn, ts, off, n)),
            ) if commit_lsn == *lsn && changes == *n => {
                let (lsn, ts, off) = (*lsn, *ts, *off);
                open = None;
                if s.first_lsn.is_none() {
                    s.first_lsn = Some(lsn);
                    s.first_ts = ts;
                    s.max_ts = ts;
                }
                s.max_ts = s.max_ts.max(ts);
                s.last_lsn = Some(lsn);
                s.txns += 1;
                s.valid_end = r.offset;
                if last_indexed.is_none_or(|l| off >= l + index_every) {
                    s.index.push(IndexEntry {
                        commit_lsn: lsn,
                        commit_ts: ts,
                        offset: off,
                    });
                    last_indexed = Some(off);
                }
            }
            _ => {
                s.stopped = Some("record out of place");
                break;
            }
        }
    }
    if s.stopped.is_none() && open.is_some() {
        s.stopped = Some("transaction without its commit at the end");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(out: &mut Vec<u8>, lsn: u64, ts: i64, payloads: &[&[u8]]) {
        encode(
            out,
            &Record::Begin {
                commit_lsn: Lsn(lsn),
                commit_ts: ts,
                xid: 7,
            },
        );
        for p in payloads {
            encode_change(out, p);
        }
        encode(
            out,
            &Record::Commit {
                commit_lsn: Lsn(lsn),
                end_lsn: Lsn(lsn + 8),
                changes: payloads.len() as u32,
            },
        );
    }

    fn write(dir: &Path, body: &[u8], first: u64) -> std::path::PathBuf {
        let p = dir.join("s.seg");
        let mut all = header(Lsn(first)).to_vec();
        all.extend_from_slice(body);
        std::fs::write(&p, all).unwrap();
        p
    }

    #[test]
    fn a_scan_cuts_at_every_possible_tear_and_keeps_whole_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let mut body = Vec::new();
        txn(&mut body, 100, 1, &[b"a", b"bb"]);
        let first_end = HEADER_LEN + body.len() as u64;
        txn(&mut body, 200, 2, &[b"ccc"]);
        let full = HEADER_LEN + body.len() as u64;
        for cut in 0..=body.len() {
            let p = write(dir.path(), &body[..cut], 100);
            let s = scan(&p, 1).unwrap();
            let want = if HEADER_LEN + cut as u64 == full {
                full
            } else if HEADER_LEN + cut as u64 >= first_end {
                first_end
            } else {
                HEADER_LEN
            };
            assert_eq!(s.valid_end, want, "cut at {cut}");
            assert_eq!(
                s.txns,
                u64::from(want > HEADER_LEN) + u64::from(want == full)
            );
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_stops_the_scan_before_that_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let mut body = Vec::new();
        txn(&mut body, 100, 1, &[b"hello"]);
        let first_end = HEADER_LEN + body.len() as u64;
        txn(&mut body, 200, 2, &[b"world"]);
        for i in (first_end - HEADER_LEN) as usize..body.len() {
            let mut b = body.clone();
            b[i] ^= 0x10;
            let p = write(dir.path(), &b, 100);
            let s = scan(&p, 1).unwrap();
            assert_eq!(s.valid_end, first_end, "flip at {i}");
            assert!(s.stopped.is_some());
        }
    }

    #[test]
    fn out_of_order_and_mismatched_commits_are_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let mut body = Vec::new();
        txn(&mut body, 200, 1, &[]);
        txn(&mut body, 100, 2, &[]);
        let s = scan(&write(dir.path(), &body, 200), 1).unwrap();
        assert_eq!(s.txns, 1);
        assert_eq!(s.stopped, Some("transaction out of order"));

        let mut body = Vec::new();
        encode(
            &mut body,
            &Record::Begin {
                commit_lsn: Lsn(5),
                commit_ts: 0,
                xid: 1,
            },
        );
        encode(
            &mut body,
            &Record::Commit {
                commit_lsn: Lsn(6),
                end_lsn: Lsn(7),
                changes: 0,
            },
        );
        let s = scan(&write(dir.path(), &body, 5), 1).unwrap();
        assert_eq!(s.txns, 0);
        assert_eq!(s.stopped, Some("record out of place"));
    }
}
