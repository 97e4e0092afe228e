//! Opening a log directory for reading only: `walcast log` reads the log that a
//! running `walcast serve` is writing, from another process.
//!
//! [`LogReader::open_read_only`] takes a snapshot of what is committed in the
//! directory when it is called and never changes a byte there: it does not
//! create, truncate, repair, lock or delete anything (a writer opening the same
//! directory does all of these). What it does instead:
//!
//! - **A tail in progress is not an error.** The newest segment is scanned up to
//!   the end of its last complete, checksummed transaction; whatever follows (a
//!   transaction the writer is appending, or a torn tail a crash left for the
//!   next writer to cut) is neither read nor touched. A newest segment without a
//!   valid header yet (just created) holds nothing.
//! - **Damage elsewhere is.** A sealed segment that does not scan to its end, or
//!   segments that overlap, fail the open (a writer would reset such a log).
//! - **Races with the writer are retried.** Retention may remove a segment while
//!   it is being scanned, and a reset may empty the log; the open starts over
//!   (a few times) rather than hand out a log with a hole. The horizon is read
//!   after the segments, so segments retention already gave up are dropped.
//!
//! The snapshot does not follow the log as it grows: a cursor ends at what was
//! committed at the open. A segment removed by retention after the open (the
//! reader was slow) is an IO error when the cursor gets to it.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::segment::{self, ReadError};
use super::{
    io_err, list_segments, parse_tables, read_index, Horizon, Inner, LogError, LogOptions,
    LogReader, Meta, SegInfo, State, DEFAULT_INDEX_EVERY, DEFAULT_SEGMENT_BYTES, META, TABLES,
};

/// Opens started over after a race with the writer, before giving up.
const ATTEMPTS: usize = 5;

/// Why one attempt failed.
enum Attempt {
    /// The writer changed the directory under the open: try again.
    Raced(LogError),
    Failed(LogError),
}

impl From<LogError> for Attempt {
    fn from(e: LogError) -> Self {
        Attempt::Failed(e)
    }
}

impl LogReader {
    /// Opens the log in `dir` for reading only, as it is committed now (see the
    /// module documentation): never modifies the directory, and stops at a torn
    /// or incomplete tail. Errors name the directory: missing, not a walcast
    /// change log, unreadable, or damaged.
    pub fn open_read_only(dir: &Path) -> Result<LogReader, LogError> {
        let mut last = None;
        for _ in 0..ATTEMPTS {
            match snapshot(dir) {
                Ok(r) => return Ok(r),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Raced(e)) => last = Some(e),
            }
        }
        Err(last.unwrap_or(LogError::Usage("the log kept changing while being opened")))
    }
}

fn read_meta_strict(dir: &Path) -> Result<Meta, LogError> {
    let path = dir.join(META);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(LogError::Corrupt {
                path: dir.to_path_buf(),
                what: format!("not a walcast change log (no {META})"),
            })
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| LogError::Corrupt {
        path: path.clone(),
        what: format!("not a walcast change log ({META} unreadable: {e})"),
    })?;
    if meta.version != 1 {
        return Err(LogError::Corrupt {
            path,
            what: format!(
                "written in format {} by another version of walcast",
                meta.version
            ),
        });
    }
    Ok(meta)
}

fn snapshot(dir: &Path) -> Result<LogReader, Attempt> {
    let md = fs::metadata(dir).map_err(io_err(dir))?;
    if !md.is_dir() {
        return Err(Attempt::Failed(LogError::Corrupt {
            path: dir.to_path_buf(),
            what: "not a directory".into(),
        }));
    }
    let before = read_meta_strict(dir)?;
    let files = list_segments(dir)?;
    let n = files.len();
    let mut segs = VecDeque::with_capacity(n);
    for (i, (first, path)) in files.into_iter().enumerate() {
        let newest = i + 1 == n;
        if !newest {
            if let Some(s) = read_index(&path, first) {
                segs.push_back(s);
                continue;
            }
        }
        let scan = match segment::scan(&path, DEFAULT_INDEX_EVERY) {
            Ok(s) => s,
            Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
                // Retention (or a reset) removed it since the listing.
                return Err(Attempt::Raced(io_err(&path)(e)));
            }
            Err(ReadError::Io(e)) => return Err(io_err(&path)(e).into()),
            // Created an instant ago, its header not yet written.
            Err(_) if newest => continue,
            Err(_) => {
                return Err(Attempt::Failed(LogError::Corrupt {
                    path,
                    what: "bad segment header".into(),
                }))
            }
        };
        if !newest {
            let len = fs::metadata(&path)
                .map_err(|e| {
                    if e.kind() == io::ErrorKind::NotFound {
                        Attempt::Raced(io_err(&path)(e))
                    } else {
                        Attempt::Failed(io_err(&path)(e))
                    }
                })?
                .len();
            if scan.valid_end < len {
                return Err(Attempt::Failed(LogError::Corrupt {
                    what: format!(
                        "sealed segment damaged: {} at byte {}",
                        scan.stopped.unwrap_or("trailing bytes"),
                        scan.valid_end
                    ),
                    path,
                }));
            }
        }
        let Some(last_lsn) = scan.last_lsn.filter(|_| scan.txns > 0) else {
            continue;
        };
        segs.push_back(SegInfo {
            path,
            first_lsn: first,
            last_lsn,
            first_ts: scan.first_ts,
            max_ts: scan.max_ts,
            end: scan.valid_end,
            txns: scan.txns,
            index: scan.index,
        });
    }
    for (a, b) in segs.iter().zip(segs.iter().skip(1)) {
        if b.first_lsn <= a.last_lsn {
            return Err(Attempt::Failed(LogError::Corrupt {
                path: b.path.clone(),
                what: format!("overlaps {}", a.path.display()),
            }));
        }
    }
    // Read after the segments: every table a scanned change names was written
    // to the table file before that change.
    let tables_path = dir.join(TABLES);
    let table_bytes = match fs::read(&tables_path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(&tables_path)(e).into()),
    };
    let (_, tables, _) = parse_tables(&table_bytes);
    // Read last: a reset since the first read means the files above may be
    // from two lives of the log.
    let after = read_meta_strict(dir)?;
    if after.resets != before.resets || after.identity != before.identity {
        return Err(Attempt::Raced(LogError::Usage(
            "the log was reset while being opened",
        )));
    }
    let horizon = Horizon {
        lsn: after.horizon_lsn.parse().map_err(|_| LogError::Corrupt {
            path: dir.join(META),
            what: "bad horizon_lsn".into(),
        })?,
        ts: after.horizon_ts,
    };
    // Left behind by retention that has moved the horizon past them.
    while segs.front().is_some_and(|s| s.last_lsn <= horizon.lsn) {
        segs.pop_front();
    }
    let bytes = segs.iter().map(|s| s.end).sum();
    let last = segs
        .back()
        .map_or(horizon.lsn, |s| s.last_lsn.max(horizon.lsn));
    Ok(LogReader {
        inner: Arc::new(Inner {
            opts: LogOptions {
                dir: dir.to_path_buf(),
                max_bytes: u64::MAX,
                max_age: Duration::MAX,
                segment_bytes: DEFAULT_SEGMENT_BYTES,
                index_every: DEFAULT_INDEX_EVERY,
            },
            state: Mutex::new(State {
                segs,
                horizon,
                bytes,
                fresh: false,
            }),
            durable: AtomicU64::new(last.0),
            sync: Mutex::default(),
            appended: AtomicU64::new(last.0),
            tables: Mutex::new(tables),
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::super::{ChangeLog, Entry, LogIdentity, ReplayError, Start};
    use super::*;
    use crate::lsn::Lsn;

    fn opts(dir: &Path) -> LogOptions {
        LogOptions {
            dir: dir.to_path_buf(),
            max_bytes: u64::MAX,
            max_age: Duration::from_secs(365 * 24 * 3600),
            segment_bytes: 600,
            index_every: 256,
        }
    }

    fn ident() -> LogIdentity {
        LogIdentity {
            system_id: "sys".into(),
            slot: "walcast".into(),
        }
    }

    /// The commit LSN of the newest transaction a snapshot holds.
    fn newest(r: &LogReader) -> Option<Lsn> {
        r.stats().newest.map(|p| p.commit_lsn)
    }

    fn lsn(i: u64) -> Lsn {
        Lsn(1000 * i)
    }

    fn write_txn(log: &mut ChangeLog, i: u64) {
        assert!(log.begin(lsn(i), 1_000_000 * i as i64, i as u32).unwrap());
        log.append(format!("change of {i}").as_bytes()).unwrap();
        log.commit(Lsn(lsn(i).0 + 8)).unwrap();
    }

    /// Every file in `dir` with its bytes.
    fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let b = fs::read(&p).unwrap();
                (p, b)
            })
            .collect()
    }

    /// The transactions a reader holds from its horizon on, as commit LSN indices
    /// with their payloads.
    fn read_all(r: &LogReader) -> Vec<(u64, Vec<String>)> {
        let mut c = r.cursor(Start::AfterLsn(r.stats().horizon.lsn)).unwrap();
        let mut out: Vec<(u64, Vec<String>)> = Vec::new();
        while let Some(e) = c.next_entry().unwrap() {
            match e {
                Entry::Begin { commit_lsn, .. } => out.push((commit_lsn.0 / 1000, Vec::new())),
                Entry::Change(b) => out
                    .last_mut()
                    .unwrap()
                    .1
                    .push(String::from_utf8(b.to_vec()).unwrap()),
                Entry::Commit { .. } => {}
            }
        }
        out
    }

    #[test]
    fn a_live_log_reads_up_to_the_last_commit_and_nothing_on_disk_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = ChangeLog::open(opts(dir.path()), ident(), lsn(1)).unwrap();
        for i in 1..=30 {
            write_txn(&mut log, i);
        }
        log.sync().unwrap();
        // A transaction in progress, large enough that the writer has put its
        // begin and first change in the file already: a tail without a commit.
        assert!(log.begin(lsn(31), 31_000_000, 31).unwrap());
        log.append(&vec![b'x'; 300 * 1024]).unwrap();
        let before = files(dir.path());
        let active = log.reader().stats();
        assert!(active.segments > 3, "{active:?}");
        let newest_file = before
            .keys()
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .max()
            .unwrap()
            .clone();
        let committed_end = log.reader().inner.state().segs.back().unwrap().end;
        assert!(
            before[&newest_file].len() as u64 > committed_end + 300 * 1024,
            "the open transaction is in the file"
        );

        let r = LogReader::open_read_only(dir.path()).unwrap();
        let got = read_all(&r);
        assert_eq!(
            got.iter().map(|t| t.0).collect::<Vec<_>>(),
            (1..=30).collect::<Vec<_>>()
        );
        assert_eq!(got[6].1, vec!["change of 7".to_string()]);
        assert_eq!(newest(&r), Some(lsn(30)));
        assert_eq!(r.stats().oldest.unwrap().commit_lsn, lsn(1));
        assert_eq!(
            files(dir.path()),
            before,
            "the read-only open changed the directory"
        );

        // The writer goes on; a new snapshot sees the transaction once committed.
        log.commit(Lsn(lsn(31).0 + 8)).unwrap();
        write_txn(&mut log, 32);
        let r2 = LogReader::open_read_only(dir.path()).unwrap();
        assert_eq!(newest(&r2), Some(lsn(32)));
        assert_eq!(read_all(&r2).len(), 32);
        // The earlier snapshot still ends where it was taken.
        assert_eq!(read_all(&r).len(), 30);
        // Positions before the horizon are gaps, as for the writer's reader.
        assert!(matches!(
            r.cursor(Start::AfterLsn(Lsn(1))),
            Err(ReplayError::Gap { .. })
        ));
    }

    #[test]
    fn a_torn_tail_is_neither_read_nor_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = ChangeLog::open(opts(dir.path()), ident(), lsn(1)).unwrap();
        for i in 1..=5 {
            write_txn(&mut log, i);
        }
        log.sync().unwrap();
        drop(log);
        let seg = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .max()
            .unwrap();
        // Half a record after the last commit, as a crash mid-write leaves it.
        let mut torn = Vec::new();
        segment::encode(
            &mut torn,
            &segment::Record::Begin {
                commit_lsn: lsn(6),
                commit_ts: 6_000_000,
                xid: 6,
            },
        );
        segment::encode_change(&mut torn, b"a change cut short by a crash");
        torn.truncate(torn.len() - 7);
        let mut f = fs::OpenOptions::new().append(true).open(&seg).unwrap();
        io::Write::write_all(&mut f, &torn).unwrap();
        drop(f);
        let before = files(dir.path());

        for _ in 0..2 {
            let r = LogReader::open_read_only(dir.path()).unwrap();
            let got = read_all(&r);
            assert_eq!(
                got.iter().map(|t| t.0).collect::<Vec<_>>(),
                vec![1, 2, 3, 4, 5]
            );
        }
        assert_eq!(files(dir.path()), before, "the torn tail was touched");

        // It was a torn tail indeed: the writer cuts exactly it.
        let (_, rec) = ChangeLog::open(opts(dir.path()), ident(), lsn(1)).unwrap();
        assert_eq!(rec.cut_bytes, torn.len() as u64);
    }

    #[test]
    fn a_directory_that_is_missing_or_not_a_log_is_a_clear_error_and_stays_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = LogReader::open_read_only(&missing).err().unwrap();
        assert!(
            matches!(&e, LogError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{e}"
        );
        assert!(!missing.exists(), "the open created the directory");

        let e = LogReader::open_read_only(dir.path()).err().unwrap();
        assert!(e.to_string().contains("not a walcast change log"), "{e}");
        assert!(
            files(dir.path()).is_empty(),
            "the open wrote into the directory"
        );

        fs::write(dir.path().join(META), b"{ not json").unwrap();
        let e = LogReader::open_read_only(dir.path()).err().unwrap();
        assert!(e.to_string().contains("not a walcast change log"), "{e}");

        let file = dir.path().join(META);
        let e = LogReader::open_read_only(&file).err().unwrap();
        assert!(e.to_string().contains("not a directory"), "{e}");
    }

    #[test]
    fn a_damaged_sealed_segment_fails_the_open_without_touching_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = ChangeLog::open(opts(dir.path()), ident(), lsn(1)).unwrap();
        for i in 1..=20 {
            write_txn(&mut log, i);
        }
        log.sync().unwrap();
        drop(log);
        let mut segs: Vec<PathBuf> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        segs.sort();
        assert!(segs.len() > 2);
        // Its index no longer matches, and its body has a flipped bit.
        let mut b = fs::read(&segs[0]).unwrap();
        let at = b.len() - 3;
        b[at] ^= 0x40;
        fs::write(&segs[0], &b).unwrap();
        fs::remove_file(segs[0].with_extension("idx")).unwrap();
        let before = files(dir.path());
        let e = LogReader::open_read_only(dir.path()).err().unwrap();
        assert!(e.to_string().contains("sealed segment damaged"), "{e}");
        assert_eq!(files(dir.path()), before);
    }
}
