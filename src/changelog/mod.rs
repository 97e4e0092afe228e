//! The change log: every committed transaction walcast reads, kept on disk for a
//! while so that a client that was away can be sent what it missed (DESIGN.md
//! "Resume").
//!
//! The log is an append-only sequence of segment files in one directory, named by
//! the commit LSN of their first transaction (`00000000016B3748.seg`), so the
//! name order is the log order. Each holds whole transactions in commit order
//! ([`segment`] has the byte format); the active one is appended to, the others
//! are sealed and carry a small `.idx` file with their sparse index (one entry
//! every [`LogOptions::index_every`] bytes). A `meta.json` remembers which
//! database and slot the log belongs to and the **horizon**: the log holds every
//! transaction committed after the horizon that walcast has read.
//!
//! Invariants:
//! - **Exactly once in the log.** A transaction whose commit LSN is not above the
//!   last one logged (the slot re-sends from its confirmed position after a
//!   restart) is skipped by [`ChangeLog::begin`].
//! - **Durable before confirmed.** [`ChangeLog::sync`] makes everything appended
//!   durable and returns the LSN up to which that holds; the replication session
//!   confirms to PostgreSQL no further than that.
//! - **Torn tails are cut.** Opening the log scans the active segment and
//!   truncates it after its last complete, checksummed transaction.
//! - **All or nothing for readers.** A [`Cursor`] starts only where the log can
//!   prove it holds everything after the start ([`ReplayError::Gap`] otherwise),
//!   and fails with the same error if retention removes a segment before the
//!   cursor reached it.
//! - **Reset on a different source.** A log opened for another database system or
//!   slot than it was written for is emptied; its horizon moves to now, so every
//!   older resume position is a gap.
//!
//! [`LogReader::open_read_only`] reads a log that another process (a running
//! `walcast serve`) writes, without changing the directory (`walcast log`).
//!
//! Payloads are opaque bytes: the caller stores each change in a form that replays
//! without re-decoding pgoutput. All IO here is blocking; async callers use
//! `spawn_blocking` or a thread of their own.

pub mod codec;
mod readonly;
mod segment;
pub mod stage;

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::decode::pgoutput::RelId;
use crate::decode::relation::Table;
use crate::lsn::Lsn;
pub use segment::IndexEntry;
use segment::{ReadError, Record, RecordReader};

/// Default size of a segment before the next transaction starts a new one.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Default distance between sparse index entries.
pub const DEFAULT_INDEX_EVERY: u64 = 64 * 1024;
/// Bytes of appended records buffered in memory before they are written.
const WRITE_BUFFER: usize = 256 * 1024;

/// Where the log lives and how much of it is kept.
#[derive(Clone, Debug)]
pub struct LogOptions {
    pub dir: PathBuf,
    /// Total size kept; the oldest sealed segments go first.
    pub max_bytes: u64,
    /// Age kept, by commit time; older sealed segments go.
    pub max_age: Duration,
    pub segment_bytes: u64,
    pub index_every: u64,
}

impl LogOptions {
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64, max_age: Duration) -> Self {
        LogOptions {
            dir: dir.into(),
            max_bytes,
            max_age,
            segment_bytes: DEFAULT_SEGMENT_BYTES.min((max_bytes / 8).max(1024 * 1024)),
            index_every: DEFAULT_INDEX_EVERY,
        }
    }
}

/// The source a log belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogIdentity {
    /// PostgreSQL's database system identifier (`IDENTIFY_SYSTEM`).
    pub system_id: String,
    pub slot: String,
}

/// The log holds every transaction committed after this point that walcast read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Horizon {
    pub lsn: Lsn,
    /// Unix microseconds.
    pub ts: i64,
}

impl Horizon {
    /// The horizon of a log that starts where the source resumes: transactions
    /// commit at or after the source's confirmed position.
    fn fresh(start: Lsn) -> Horizon {
        Horizon {
            lsn: Lsn(start.0.saturating_sub(1)),
            ts: now_micros(),
        }
    }
}

/// A logged transaction's place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnPos {
    pub commit_lsn: Lsn,
    /// Commit time, Unix microseconds.
    pub commit_ts: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("change log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("change log {path}: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("change log: {0}")]
    Usage(&'static str),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Why a read could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The log cannot prove it holds everything after the requested position.
    #[error("the change log does not reach back that far (it holds everything after {} at {})", horizon.lsn, horizon.ts)]
    Gap {
        horizon: Horizon,
        oldest: Option<TxnPos>,
    },
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Why the log was emptied when opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResetReason {
    /// No log was there.
    New,
    /// The log was written for another database system or slot.
    OtherSource { was: LogIdentity },
    /// A sealed segment was damaged (not a torn tail).
    Corrupt(String),
}

/// What opening found.
#[derive(Debug)]
pub struct Recovery {
    pub reset: Option<ResetReason>,
    /// Bytes cut from the tail of the active segment.
    pub cut_bytes: u64,
    /// Why the tail was cut.
    pub cut_reason: Option<&'static str>,
}

#[derive(Clone, Debug)]
struct SegInfo {
    path: PathBuf,
    first_lsn: Lsn,
    last_lsn: Lsn,
    first_ts: i64,
    max_ts: i64,
    /// Committed length of the file, header included.
    end: u64,
    txns: u64,
    index: Vec<IndexEntry>,
}

struct State {
    segs: VecDeque<SegInfo>,
    horizon: Horizon,
    bytes: u64,
    /// Made new or reset, no transaction logged yet.
    fresh: bool,
}

struct Inner {
    opts: LogOptions,
    state: Mutex<State>,
    /// Last commit LSN made durable by `sync`.
    durable: AtomicU64,
    /// Held while `durable` is moved.
    sync: Mutex<SyncState>,
    /// Last commit LSN appended (readable).
    appended: AtomicU64,
    /// Table shapes by id, as stored in the table file.
    tables: Mutex<HashMap<u32, Arc<Table>>>,
}

/// What [`SyncJob`]s need to agree on.
#[derive(Default)]
struct SyncState {
    /// Bumped when the log is emptied: a job from before leaves `durable` alone.
    gen: u64,
    /// A sync of this generation failed: `durable` stays where it is until the
    /// log is emptied (after a failed `fdatasync` a later one may succeed
    /// without the lost data).
    failed: bool,
}

impl Inner {
    fn sync_state(&self) -> MutexGuard<'_, SyncState> {
        self.sync.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A reader that panicked cannot leave the list half-changed: every change
        // is one assignment or push/pop under the lock.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Read access to the log, cheap to clone and safe to use from many threads while
/// the writer appends.
#[derive(Clone)]
pub struct LogReader {
    inner: Arc<Inner>,
}

/// A sync of what a [`ChangeLog`] had appended when it was made
/// ([`ChangeLog::sync_job`]).
pub struct SyncJob {
    files: Vec<(File, PathBuf)>,
    /// The directory, when a segment file was made since the last sync.
    dir: Option<PathBuf>,
    /// The commit LSN durable once the files are (`None`: only the table file).
    upto: Option<u64>,
    gen: u64,
    inner: Arc<Inner>,
}

impl SyncJob {
    /// Syncs; returns the commit LSN now durable, unless the log was emptied
    /// since the job was made (`None`: what it synced, or failed to, counts for
    /// nothing). On an error nothing is marked durable, now or by a later job,
    /// until the log is emptied.
    pub fn run(self) -> Result<Option<Lsn>, LogError> {
        let synced = self.sync_files();
        let mut st = self.inner.sync_state();
        if st.gen != self.gen {
            return Ok(None);
        }
        if let Err(e) = synced {
            st.failed = true;
            return Err(e);
        }
        if st.failed {
            return Err(SYNC_FAILED);
        }
        if let Some(upto) = self.upto {
            self.inner.durable.fetch_max(upto, Ordering::AcqRel);
        }
        Ok(Some(Lsn(self.inner.durable.load(Ordering::Acquire))))
    }

    fn sync_files(&self) -> Result<(), LogError> {
        for (f, path) in &self.files {
            f.sync_data().map_err(io_err(path))?;
        }
        if let Some(dir) = &self.dir {
            sync_dir(dir)?;
        }
        Ok(())
    }
}

const SYNC_FAILED: LogError =
    LogError::Usage("an earlier sync failed: nothing is durable until the log starts over");

/// A running transaction being appended.
struct Open {
    commit_lsn: Lsn,
    commit_ts: i64,
    offset: u64,
    changes: u32,
}

/// The writer: one per log directory.
pub struct ChangeLog {
    inner: Arc<Inner>,
    file: Option<File>,
    /// Records not yet written to `file`.
    buf: Vec<u8>,
    /// Bytes of the active segment written or buffered (past `end` while a
    /// transaction is open).
    written: u64,
    open: Option<Open>,
    /// Skipping a transaction that is already logged.
    skipping: bool,
    /// The file may hold bytes past the committed end (a failed write).
    dirty_tail: bool,
    /// Appended but not yet synced.
    unsynced: bool,
    /// A new segment file whose directory entry is not yet synced.
    dir_unsynced: bool,
    identity: LogIdentity,
    /// The table file, and the ids of the shapes in it.
    tables: TableFile,
}

/// The log's table shapes: `tables.wct`, records of `id u32` + [`codec::encode_table`].
struct TableFile {
    file: File,
    path: PathBuf,
    by_shape: HashMap<Vec<u8>, u32>,
    /// The last table seen per relation, to skip encoding the shape per change.
    last: HashMap<RelId, (Arc<Table>, u32)>,
    unsynced: bool,
}

const TABLES: &str = "tables.wct";

#[derive(Serialize, Deserialize)]
struct Meta {
    version: u32,
    identity: LogIdentity,
    horizon_lsn: String,
    horizon_ts: i64,
    resets: u64,
}

const META: &str = "meta.json";

pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl ChangeLog {
    /// Opens (or creates) the log in `opts.dir` for `identity`. `start` is where
    /// the source will resume (the slot's confirmed position) and becomes the
    /// horizon of a new or reset log.
    pub fn open(
        opts: LogOptions,
        identity: LogIdentity,
        start: Lsn,
    ) -> Result<(ChangeLog, Recovery), LogError> {
        fs::create_dir_all(&opts.dir).map_err(io_err(&opts.dir))?;
        let meta_path = opts.dir.join(META);
        let meta: Option<Meta> = match fs::read(&meta_path) {
            Ok(b) => Some(serde_json::from_slice(&b).map_err(|e| LogError::Corrupt {
                path: meta_path.clone(),
                what: format!("unreadable meta.json: {e}"),
            })?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&meta_path)(e)),
        };
        let mut recovery = Recovery {
            reset: None,
            cut_bytes: 0,
            cut_reason: None,
        };
        let reset = match &meta {
            None => Some(ResetReason::New),
            Some(m) if m.identity != identity => Some(ResetReason::OtherSource {
                was: m.identity.clone(),
            }),
            Some(_) => None,
        };
        let mut resets = meta.as_ref().map_or(0, |m| m.resets);
        let mut horizon = match &meta {
            Some(m) if reset.is_none() => Horizon {
                lsn: m.horizon_lsn.parse().map_err(|_| LogError::Corrupt {
                    path: meta_path.clone(),
                    what: "bad horizon_lsn".into(),
                })?,
                ts: m.horizon_ts,
            },
            _ => Horizon::fresh(start),
        };
        let mut segs = VecDeque::new();
        if let Some(r) = reset {
            remove_segments(&opts.dir)?;
            if !matches!(r, ResetReason::New) {
                resets += 1;
            }
            recovery.reset = Some(r);
        } else {
            match load_segments(&opts, &mut recovery) {
                Ok(s) => segs = s,
                Err(LoadError::Corrupt(what)) => {
                    remove_segments(&opts.dir)?;
                    resets += 1;
                    horizon = Horizon::fresh(start);
                    recovery.reset = Some(ResetReason::Corrupt(what));
                }
                Err(LoadError::Log(e)) => return Err(e),
            }
            // Left behind by retention that stopped between meta and unlink.
            while segs.front().is_some_and(|s| s.last_lsn <= horizon.lsn) {
                let s = segs.pop_front().expect("front");
                remove_segment_files(&s.path)?;
            }
        }
        let fresh = recovery.reset.is_some();
        if fresh {
            write_meta(&opts.dir, &identity, horizon, resets)?;
        }
        let bytes = segs.iter().map(|s| s.end).sum();
        let last = segs
            .back()
            .map_or(horizon.lsn, |s| s.last_lsn.max(horizon.lsn));
        let (file, written) = match segs.back() {
            Some(s) => {
                let f = OpenOptions::new()
                    .append(true)
                    .open(&s.path)
                    .map_err(io_err(&s.path))?;
                // What survived in the page cache becomes durable before any of
                // it is confirmed.
                f.sync_all().map_err(io_err(&s.path))?;
                (Some(f), s.end)
            }
            None => (None, 0),
        };
        let (tables, decoded) = TableFile::open(&opts.dir, fresh)?;
        let inner = Arc::new(Inner {
            tables: Mutex::new(decoded),
            opts,
            state: Mutex::new(State {
                segs,
                horizon,
                bytes,
                fresh,
            }),
            durable: AtomicU64::new(last.0),
            sync: Mutex::default(),
            appended: AtomicU64::new(last.0),
        });
        Ok((
            ChangeLog {
                inner,
                file,
                buf: Vec::with_capacity(WRITE_BUFFER),
                written,
                open: None,
                skipping: false,
                dirty_tail: false,
                unsynced: false,
                dir_unsynced: false,
                identity,
                tables,
            },
            recovery,
        ))
    }

    pub fn reader(&self) -> LogReader {
        LogReader {
            inner: self.inner.clone(),
        }
    }

    /// The source this log belongs to.
    pub fn identity(&self) -> &LogIdentity {
        &self.identity
    }

    /// Commit LSN of the last transaction appended.
    pub fn last_lsn(&self) -> Lsn {
        Lsn(self.inner.appended.load(Ordering::Acquire))
    }

    /// Commit LSN up to which the log is durable.
    pub fn durable_lsn(&self) -> Lsn {
        Lsn(self.inner.durable.load(Ordering::Acquire))
    }

    /// Starts a transaction. Returns `false` when it is already logged (its
    /// changes and commit are then ignored).
    pub fn begin(&mut self, commit_lsn: Lsn, commit_ts: i64, xid: u32) -> Result<bool, LogError> {
        if self.open.is_some() || self.skipping {
            return Err(LogError::Usage("begin inside a transaction"));
        }
        if commit_lsn <= self.last_lsn() {
            self.skipping = true;
            return Ok(false);
        }
        self.repair_tail()?;
        let roll = match self.inner.state().segs.back() {
            None => true,
            Some(s) => {
                s.end >= self.inner.opts.segment_bytes
                    || commit_ts.saturating_sub(s.first_ts) > self.max_age_micros() / 4
            }
        };
        if roll {
            self.roll(commit_lsn)?;
        }
        self.open = Some(Open {
            commit_lsn,
            commit_ts,
            offset: self.written,
            changes: 0,
        });
        self.push(|buf| {
            segment::encode(
                buf,
                &Record::Begin {
                    commit_lsn,
                    commit_ts,
                    xid,
                },
            )
        })?;
        Ok(true)
    }

    /// Appends one change of the open transaction.
    pub fn append(&mut self, payload: &[u8]) -> Result<(), LogError> {
        if self.skipping {
            return Ok(());
        }
        let Some(open) = self.open.as_mut() else {
            return Err(LogError::Usage("change outside a transaction"));
        };
        open.changes += 1;
        self.push(|buf| segment::encode_change(buf, payload))
    }

    /// Ends the open transaction; readers see it from now on.
    pub fn commit(&mut self, end_lsn: Lsn) -> Result<(), LogError> {
        if std::mem::take(&mut self.skipping) {
            return Ok(());
        }
        let Some(open) = self.open.take() else {
            return Err(LogError::Usage("commit outside a transaction"));
        };
        let rec = Record::Commit {
            commit_lsn: open.commit_lsn,
            end_lsn,
            changes: open.changes,
        };
        if let Err(e) = self
            .push(|buf| segment::encode(buf, &rec))
            .and_then(|()| self.write_buf())
        {
            self.abandon();
            return Err(e);
        }
        let mut st = self.inner.state();
        let every = self.inner.opts.index_every;
        let seg = st.segs.back_mut().expect("a segment is open");
        if seg.txns == 0 {
            seg.first_lsn = open.commit_lsn;
            seg.first_ts = open.commit_ts;
            seg.max_ts = open.commit_ts;
        }
        seg.max_ts = seg.max_ts.max(open.commit_ts);
        seg.last_lsn = open.commit_lsn;
        seg.txns += 1;
        if seg
            .index
            .last()
            .is_none_or(|l| open.offset >= l.offset + every)
        {
            seg.index.push(IndexEntry {
                commit_lsn: open.commit_lsn,
                commit_ts: open.commit_ts,
                offset: open.offset,
            });
        }
        let grew = self.written - seg.end;
        seg.end = self.written;
        st.bytes += grew;
        // A new log's horizon time is when it was made; its first transaction
        // (from the slot's backlog, perhaps) pins it to just before that commit.
        let pin = std::mem::take(&mut st.fresh).then(|| Horizon {
            lsn: st.horizon.lsn,
            ts: open.commit_ts.saturating_sub(1).min(st.horizon.ts),
        });
        if let Some(h) = pin {
            st.horizon = h;
        }
        drop(st);
        if let Some(h) = pin {
            write_meta(&self.inner.opts.dir, &self.identity, h, self.resets())?;
        }
        self.unsynced = true;
        self.inner
            .appended
            .store(open.commit_lsn.0, Ordering::Release);
        Ok(())
    }

    /// Drops the open transaction (the source failed mid-transaction); its bytes
    /// are cut before the next one.
    pub fn abandon(&mut self) {
        self.skipping = false;
        if self.open.take().is_some() {
            self.buf.clear();
            self.dirty_tail = true;
        }
    }

    /// Makes everything committed so far durable; returns the durable commit LSN.
    pub fn sync(&mut self) -> Result<Lsn, LogError> {
        if self.inner.sync_state().failed {
            return Err(SYNC_FAILED);
        }
        if let Some(job) = self.sync_job()? {
            job.run()?;
        }
        Ok(self.durable_lsn())
    }

    /// What [`ChangeLog::sync`] would do now, to be done on another thread
    /// while this one appends on (`None`: nothing to sync). The job syncs
    /// duplicates of the files' descriptors, so a segment sealed or a log
    /// emptied meanwhile is no harm: sealing syncs on its own, and emptying
    /// makes the job leave `durable` alone.
    pub fn sync_job(&mut self) -> Result<Option<SyncJob>, LogError> {
        let mut files = Vec::new();
        if self.tables.unsynced {
            let f = self.tables.file.try_clone();
            files.push((
                f.map_err(io_err(&self.tables.path))?,
                self.tables.path.clone(),
            ));
        }
        let mut upto = None;
        if self.unsynced {
            if let Some(f) = &self.file {
                let path = self.active_path();
                files.push((f.try_clone().map_err(io_err(&path))?, path));
            }
            upto = Some(self.inner.appended.load(Ordering::Acquire));
        }
        if files.is_empty() && upto.is_none() {
            return Ok(None);
        }
        let dir = (upto.is_some() && self.dir_unsynced).then(|| self.inner.opts.dir.clone());
        self.tables.unsynced = false;
        if upto.is_some() {
            self.unsynced = false;
            self.dir_unsynced = false;
        }
        let gen = self.inner.sync_state().gen;
        Ok(Some(SyncJob {
            files,
            dir,
            upto,
            gen,
            inner: self.inner.clone(),
        }))
    }

    /// The id of `table`'s shape in the log, stored on first use. Changes store
    /// the id; a reader gets the shape back with [`LogReader::table`].
    pub fn table_id(&mut self, table: &Arc<Table>) -> Result<u32, LogError> {
        if let Some((t, id)) = self.tables.last.get(&table.id) {
            if Arc::ptr_eq(t, table) {
                return Ok(*id);
            }
        }
        let shape = codec::encode_table(table);
        let id = match self.tables.by_shape.get(&shape) {
            Some(&id) => id,
            None => {
                let id = self.tables.by_shape.len() as u32;
                let mut rec = Vec::with_capacity(shape.len() + 12);
                let mut body = id.to_le_bytes().to_vec();
                body.extend_from_slice(&shape);
                rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
                rec.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
                rec.extend_from_slice(&body);
                self.tables
                    .file
                    .write_all(&rec)
                    .map_err(io_err(&self.tables.path))?;
                self.tables.unsynced = true;
                let decoded = codec::decode_table(&shape).map_err(|e| LogError::Corrupt {
                    path: self.tables.path.clone(),
                    what: e.to_string(),
                })?;
                self.inner
                    .tables
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, Arc::new(decoded));
                self.tables.by_shape.insert(shape, id);
                id
            }
        };
        self.tables.last.insert(table.id, (table.clone(), id));
        Ok(id)
    }

    /// Whether `sync` has anything to do.
    pub fn needs_sync(&self) -> bool {
        self.unsynced
    }

    /// Removes sealed segments past the size or age limit (never the active one)
    /// and moves the horizon. Returns the bytes removed.
    pub fn retain(&mut self, now: i64) -> Result<u64, LogError> {
        let max_age = self.max_age_micros();
        let mut doomed = Vec::new();
        let horizon = {
            let mut st = self.inner.state();
            let mut bytes = st.bytes;
            let mut horizon = st.horizon;
            let mut keep_from = 0;
            for (i, s) in st.segs.iter().enumerate() {
                let last = i + 1 == st.segs.len();
                let too_big = bytes > self.inner.opts.max_bytes;
                let too_old = s.max_ts < now.saturating_sub(max_age);
                if last || !(too_big || too_old) {
                    break;
                }
                bytes -= s.end;
                horizon = Horizon {
                    lsn: s.last_lsn.max(horizon.lsn),
                    ts: s.max_ts.max(horizon.ts),
                };
                keep_from = i + 1;
            }
            if keep_from == 0 {
                return Ok(0);
            }
            // The horizon is recorded before any file goes, so a crash in between
            // leaves files the next open removes, never a hole the meta hides.
            write_meta(&self.inner.opts.dir, &self.identity, horizon, self.resets())?;
            for _ in 0..keep_from {
                doomed.push(st.segs.pop_front().expect("counted"));
            }
            st.bytes = bytes;
            st.horizon = horizon;
            horizon
        };
        let mut removed = 0;
        for s in doomed {
            remove_segment_files(&s.path)?;
            removed += s.end;
        }
        tracing::debug!(horizon = %horizon.lsn, removed, "change log retention");
        Ok(removed)
    }

    /// Empties the log: the source was reset (a re-created slot). Every resume
    /// position before `start` becomes a gap.
    pub fn reset(&mut self, start: Lsn) -> Result<(), LogError> {
        self.open = None;
        self.skipping = false;
        self.buf.clear();
        self.file = None;
        let st = self.inner.state();
        let horizon = Horizon::fresh(start);
        write_meta(
            &self.inner.opts.dir,
            &self.identity,
            horizon,
            self.resets() + 1,
        )?;
        remove_segments(&self.inner.opts.dir)?;
        drop(st);
        let (tables, decoded) = TableFile::open(&self.inner.opts.dir, true)?;
        self.tables = tables;
        *self.inner.tables.lock().unwrap_or_else(|p| p.into_inner()) = decoded;
        let mut st = self.inner.state();
        st.segs.clear();
        st.bytes = 0;
        st.horizon = horizon;
        st.fresh = true;
        self.written = 0;
        self.dirty_tail = false;
        self.unsynced = false;
        self.inner.appended.store(horizon.lsn.0, Ordering::Release);
        let mut sync = self.inner.sync_state();
        sync.gen += 1;
        sync.failed = false;
        self.inner.durable.store(horizon.lsn.0, Ordering::Release);
        drop(sync);
        Ok(())
    }

    fn resets(&self) -> u64 {
        read_meta(&self.inner.opts.dir).map_or(0, |m| m.resets)
    }

    fn max_age_micros(&self) -> i64 {
        i64::try_from(self.inner.opts.max_age.as_micros()).unwrap_or(i64::MAX)
    }

    fn active_path(&self) -> PathBuf {
        self.inner
            .state()
            .segs
            .back()
            .map(|s| s.path.clone())
            .unwrap_or_else(|| self.inner.opts.dir.clone())
    }

    fn push(&mut self, f: impl FnOnce(&mut Vec<u8>)) -> Result<(), LogError> {
        let before = self.buf.len();
        f(&mut self.buf);
        self.written += (self.buf.len() - before) as u64;
        if self.buf.len() >= WRITE_BUFFER {
            if let Err(e) = self.write_buf() {
                self.abandon();
                return Err(e);
            }
        }
        Ok(())
    }

    fn write_buf(&mut self) -> Result<(), LogError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = self.active_path();
        let f = self
            .file
            .as_mut()
            .ok_or(LogError::Usage("no active segment"))?;
        let r = f.write_all(&self.buf);
        self.buf.clear();
        r.map_err(io_err(&path))
    }

    /// Cuts bytes of an abandoned transaction from the active segment.
    fn repair_tail(&mut self) -> Result<(), LogError> {
        if !self.dirty_tail {
            return Ok(());
        }
        let end = self
            .inner
            .state()
            .segs
            .back()
            .map(|s| (s.end, s.path.clone()));
        if let (Some((end, path)), Some(f)) = (end, &self.file) {
            f.set_len(end).map_err(io_err(&path))?;
            self.written = end;
        }
        self.dirty_tail = false;
        Ok(())
    }

    /// Seals the active segment and starts a new one at `first_lsn`.
    fn roll(&mut self, first_lsn: Lsn) -> Result<(), LogError> {
        if let Some(f) = self.file.take() {
            let sealed = self.inner.state().segs.back().cloned();
            if let Some(s) = sealed {
                if s.txns == 0 {
                    // An empty segment (every transaction in it abandoned).
                    drop(f);
                    remove_segment_files(&s.path)?;
                    let mut st = self.inner.state();
                    st.bytes -= s.end;
                    st.segs.pop_back();
                } else {
                    f.sync_data().map_err(io_err(&s.path))?;
                    write_index(&s)?;
                }
            }
        }
        let path = self.inner.opts.dir.join(segment_name(first_lsn));
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        f.write_all(&segment::header(first_lsn))
            .map_err(io_err(&path))?;
        drop(f);
        let f = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        self.file = Some(f);
        self.dir_unsynced = true;
        self.unsynced = true;
        self.written = segment::HEADER_LEN;
        let mut st = self.inner.state();
        st.bytes += segment::HEADER_LEN;
        st.segs.push_back(SegInfo {
            path,
            first_lsn,
            last_lsn: first_lsn,
            first_ts: 0,
            max_ts: 0,
            end: segment::HEADER_LEN,
            txns: 0,
            index: Vec::new(),
        });
        Ok(())
    }
}

/// Size, range and horizon of the log (for metrics and status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogStats {
    pub bytes: u64,
    pub segments: usize,
    pub oldest: Option<TxnPos>,
    pub newest: Option<TxnPos>,
    pub horizon: Horizon,
}

/// Where a read starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Every transaction with a commit LSN above this one.
    AfterLsn(Lsn),
    /// After the first transaction committed at exactly `ts` (Unix microseconds);
    /// without one, from the first transaction committed at or after `ts - slack`.
    AfterTimestamp { ts: i64, slack: i64 },
}

/// One item read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Begin {
        commit_lsn: Lsn,
        commit_ts: i64,
        xid: u32,
    },
    Change(Bytes),
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
    },
}

impl LogReader {
    pub fn stats(&self) -> LogStats {
        let st = self.inner.state();
        let oldest = st.segs.iter().find(|s| s.txns > 0).map(|s| TxnPos {
            commit_lsn: s.first_lsn,
            commit_ts: s.first_ts,
        });
        let newest = st.segs.iter().rev().find(|s| s.txns > 0).map(|s| TxnPos {
            commit_lsn: s.last_lsn,
            commit_ts: s.max_ts,
        });
        LogStats {
            bytes: st.bytes,
            segments: st.segs.len(),
            oldest,
            newest,
            horizon: st.horizon,
        }
    }

    /// Commit LSN of the last transaction readers can see.
    pub fn last_lsn(&self) -> Lsn {
        Lsn(self.inner.appended.load(Ordering::Acquire))
    }

    /// A table shape stored by [`ChangeLog::table_id`].
    pub fn table(&self, id: u32) -> Option<Arc<Table>> {
        self.inner
            .tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// Decodes a change or message read back inside the transaction `txn` (from
    /// its [`Entry::Begin`]).
    pub fn decode(
        &self,
        payload: &Bytes,
        txn: crate::decode::event::TxnInfo,
    ) -> Result<codec::Logged, codec::CodecError> {
        codec::decode(payload, txn, |id| self.table(id))
    }

    /// A cursor over every transaction after `start`, or [`ReplayError::Gap`].
    pub fn cursor(&self, start: Start) -> Result<Cursor, ReplayError> {
        let after = match start {
            Start::AfterLsn(l) => l,
            Start::AfterTimestamp { ts, slack } => self.resolve_timestamp(ts, slack)?,
        };
        let horizon = self.inner.state().horizon;
        if after < horizon.lsn {
            return Err(self.gap());
        }
        Ok(Cursor {
            log: self.clone(),
            after,
            passed: after,
            reader: None,
            seg_first: None,
            until: Lsn(u64::MAX),
            in_txn: None,
        })
    }

    fn gap(&self) -> ReplayError {
        let s = self.stats();
        ReplayError::Gap {
            horizon: s.horizon,
            oldest: s.oldest,
        }
    }

    /// The commit LSN after which a timestamp resume starts.
    fn resolve_timestamp(&self, ts: i64, slack: i64) -> Result<Lsn, ReplayError> {
        let lo = ts.saturating_sub(slack);
        let hi = ts.saturating_add(slack);
        let (horizon, start_seg, start_off, last) = {
            let st = self.inner.state();
            if ts < st.horizon.ts {
                drop(st);
                return Err(self.gap());
            }
            let i = st.segs.iter().position(|s| s.txns > 0 && s.max_ts >= lo);
            let last = st.segs.back().map_or(st.horizon.lsn, |s| s.last_lsn);
            match i {
                None => return Ok(last.max(st.horizon.lsn)),
                Some(i) => {
                    let s = &st.segs[i];
                    let off = s
                        .index
                        .iter()
                        .take_while(|e| e.commit_ts < lo)
                        .last()
                        .map_or(segment::HEADER_LEN, |e| e.offset);
                    (st.horizon, s.first_lsn, off, last)
                }
            }
        };
        // Scan transaction heads forward for an exact match.
        let mut cur = Cursor {
            log: self.clone(),
            after: Lsn::ZERO,
            passed: Lsn::ZERO,
            reader: None,
            seg_first: None,
            until: last,
            in_txn: None,
        };
        cur.open_segment_at(start_seg, start_off)?;
        let mut candidate: Option<Lsn> = None;
        while let Some(e) = cur.next_raw()? {
            let Entry::Begin {
                commit_lsn,
                commit_ts,
                ..
            } = e
            else {
                continue;
            };
            if commit_ts == ts {
                return Ok(commit_lsn);
            }
            if candidate.is_none() && commit_ts >= lo {
                // "After the LSN just below it" starts at this transaction.
                candidate = Some(Lsn(commit_lsn.0 - 1));
            }
            if commit_ts > hi {
                break;
            }
        }
        Ok(candidate.unwrap_or(last).max(horizon.lsn))
    }
}

/// Reads transactions in commit order, following the log as it grows.
pub struct Cursor {
    log: LogReader,
    /// Transactions up to this commit LSN are skipped.
    after: Lsn,
    /// The last commit LSN passed (delivered or skipped).
    passed: Lsn,
    reader: Option<RecordReader>,
    seg_first: Option<Lsn>,
    /// Stop after this commit LSN.
    until: Lsn,
    /// Inside a transaction being delivered (or skipped: `false`).
    in_txn: Option<bool>,
}

impl Cursor {
    /// Stops the cursor after the transaction committed at `lsn`.
    pub fn until(mut self, lsn: Lsn) -> Self {
        self.until = lsn;
        self
    }

    /// The last commit LSN the cursor passed.
    pub fn position(&self) -> Lsn {
        self.passed
    }

    /// The next entry, or `None` when the cursor reached `until` or the end of
    /// what is committed now (call again later to follow the log).
    pub fn next_entry(&mut self) -> Result<Option<Entry>, ReplayError> {
        loop {
            let Some(e) = self.next_raw()? else {
                return Ok(None);
            };
            match &e {
                Entry::Begin { commit_lsn, .. } => {
                    let deliver = *commit_lsn > self.after;
                    self.in_txn = Some(deliver);
                    if deliver {
                        return Ok(Some(e));
                    }
                }
                Entry::Change(_) => {
                    if self.in_txn == Some(true) {
                        return Ok(Some(e));
                    }
                }
                Entry::Commit { .. } => {
                    if self.in_txn.take() == Some(true) {
                        return Ok(Some(e));
                    }
                }
            }
        }
    }

    fn open_segment_at(&mut self, first: Lsn, offset: u64) -> Result<(), ReplayError> {
        let (path, end) = {
            let st = self.log.inner.state();
            let Some(s) = st.segs.iter().find(|s| s.first_lsn == first) else {
                drop(st);
                return Err(self.log.gap());
            };
            (s.path.clone(), s.end)
        };
        let (r, _) = RecordReader::open(&path, offset, end).map_err(|e| read_err(&path, e))?;
        self.reader = Some(r);
        self.seg_first = Some(first);
        Ok(())
    }

    /// Every record in order, with segment switching and gap detection.
    fn next_raw(&mut self) -> Result<Option<Entry>, ReplayError> {
        loop {
            if self.reader.is_none() {
                // Find where to (re)start: the segment holding the first
                // transaction after `passed`.
                let target = {
                    let st = self.log.inner.state();
                    if self.passed < st.horizon.lsn {
                        drop(st);
                        return Err(self.log.gap());
                    }
                    let next = match self.seg_first {
                        None => {
                            let i = st
                                .segs
                                .iter()
                                .rposition(|s| s.first_lsn <= self.passed)
                                .unwrap_or(0);
                            st.segs.get(i).map(|s| {
                                let off = s
                                    .index
                                    .iter()
                                    .take_while(|e| e.commit_lsn <= self.passed)
                                    .last()
                                    .map_or(segment::HEADER_LEN, |e| e.offset);
                                (s.first_lsn, off)
                            })
                        }
                        Some(cur) => st
                            .segs
                            .iter()
                            .find(|s| s.first_lsn > cur)
                            .map(|s| (s.first_lsn, segment::HEADER_LEN)),
                    };
                    next
                };
                match target {
                    None => return Ok(None),
                    Some((first, off)) => self.open_segment_at(first, off)?,
                }
            }
            let r = self.reader.as_mut().expect("opened above");
            let path_first = self.seg_first.expect("set with reader");
            match r.next() {
                Ok(Some(rec)) => {
                    return Ok(Some(match rec {
                        Record::Begin {
                            commit_lsn,
                            commit_ts,
                            xid,
                        } => {
                            if commit_lsn > self.until {
                                // Leave the reader before this transaction.
                                self.reader = None;
                                self.seg_first = None;
                                return Ok(None);
                            }
                            Entry::Begin {
                                commit_lsn,
                                commit_ts,
                                xid,
                            }
                        }
                        Record::Change(b) => Entry::Change(b),
                        Record::Commit {
                            commit_lsn,
                            end_lsn,
                            ..
                        } => {
                            self.passed = commit_lsn;
                            Entry::Commit {
                                commit_lsn,
                                end_lsn,
                            }
                        }
                    }));
                }
                Ok(None) => {
                    // End of what was committed when opened: more in this
                    // segment, or the next one?
                    let (grown, has_next) = {
                        let st = self.log.inner.state();
                        let cur = st.segs.iter().find(|s| s.first_lsn == path_first);
                        (
                            cur.map(|s| s.end).filter(|&e| e > r.limit),
                            st.segs.iter().any(|s| s.first_lsn > path_first),
                        )
                    };
                    if let Some(end) = grown {
                        r.limit = end;
                        continue;
                    }
                    if !has_next {
                        return Ok(None);
                    }
                    self.reader = None;
                }
                Err(e) => {
                    let path = self.log.inner.opts.dir.join(segment_name(path_first));
                    return Err(read_err(&path, e).into());
                }
            }
        }
    }
}

impl TableFile {
    /// Opens the table file, cutting a torn last record; `empty` starts it anew.
    fn open(dir: &Path, empty: bool) -> Result<(TableFile, HashMap<u32, Arc<Table>>), LogError> {
        let path = dir.join(TABLES);
        let bytes = if empty {
            Vec::new()
        } else {
            match fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(io_err(&path)(e)),
            }
        };
        let (by_shape, decoded, at) = parse_tables(&bytes);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        if (at as u64) < file.metadata().map_err(io_err(&path))?.len() {
            file.set_len(at as u64).map_err(io_err(&path))?;
        }
        Ok((
            TableFile {
                file,
                path,
                by_shape,
                last: HashMap::new(),
                unsynced: true,
            },
            decoded,
        ))
    }
}

/// The table shapes of a table file's bytes, up to its first torn or damaged
/// record: (shape → id, id → table, bytes of the valid records).
#[allow(clippy::type_complexity)]
fn parse_tables(bytes: &[u8]) -> (HashMap<Vec<u8>, u32>, HashMap<u32, Arc<Table>>, usize) {
    let mut by_shape = HashMap::new();
    let mut decoded = HashMap::new();
    let mut at = 0;
    while let Some(h) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes(h[..4].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(h[4..].try_into().expect("4"));
        let Some(body) = bytes.get(at + 8..at + 8 + len) else {
            break;
        };
        if len < 4 || crc32fast::hash(body) != crc {
            break;
        }
        let id = u32::from_le_bytes(body[..4].try_into().expect("4"));
        let Ok(t) = codec::decode_table(&body[4..]) else {
            break;
        };
        if id as usize != by_shape.len() {
            break;
        }
        by_shape.insert(body[4..].to_vec(), id);
        decoded.insert(id, Arc::new(t));
        at += 8 + len;
    }
    (by_shape, decoded, at)
}

fn read_err(path: &Path, e: ReadError) -> LogError {
    match e {
        ReadError::Io(source) => LogError::Io {
            path: path.to_path_buf(),
            source,
        },
        ReadError::Invalid(what) => LogError::Corrupt {
            path: path.to_path_buf(),
            what: what.to_string(),
        },
        ReadError::Truncated => LogError::Corrupt {
            path: path.to_path_buf(),
            what: "record cut short".into(),
        },
    }
}

fn segment_name(first: Lsn) -> String {
    format!("{:016X}.seg", first.0)
}

fn parse_segment_name(name: &str) -> Option<Lsn> {
    let hex = name.strip_suffix(".seg")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok().map(Lsn))
        .flatten()
}

fn read_meta(dir: &Path) -> Option<Meta> {
    serde_json::from_slice(&fs::read(dir.join(META)).ok()?).ok()
}

fn write_meta(dir: &Path, identity: &LogIdentity, h: Horizon, resets: u64) -> Result<(), LogError> {
    let meta = Meta {
        version: 1,
        identity: identity.clone(),
        horizon_lsn: h.lsn.to_string(),
        horizon_ts: h.ts,
        resets,
    };
    let tmp = dir.join("meta.json.tmp");
    let body = serde_json::to_vec_pretty(&meta).expect("meta serialises");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&body).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    let path = dir.join(META);
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn list_segments(dir: &Path) -> Result<Vec<(Lsn, PathBuf)>, LogError> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        if let Some(lsn) = e.file_name().to_str().and_then(parse_segment_name) {
            v.push((lsn, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

fn remove_segment_files(path: &Path) -> Result<(), LogError> {
    for p in [path.to_path_buf(), path.with_extension("idx")] {
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&p)(e)),
        }
    }
    Ok(())
}

fn remove_segments(dir: &Path) -> Result<(), LogError> {
    for (_, p) in list_segments(dir)? {
        remove_segment_files(&p)?;
    }
    Ok(())
}

enum LoadError {
    Corrupt(String),
    Log(LogError),
}

impl From<LogError> for LoadError {
    fn from(e: LogError) -> Self {
        LoadError::Log(e)
    }
}

fn load_segments(opts: &LogOptions, rec: &mut Recovery) -> Result<VecDeque<SegInfo>, LoadError> {
    let files = list_segments(&opts.dir)?;
    let mut segs = VecDeque::with_capacity(files.len());
    let n = files.len();
    for (i, (first, path)) in files.into_iter().enumerate() {
        let active = i + 1 == n;
        if !active {
            if let Some(s) = read_index(&path, first) {
                segs.push_back(s);
                continue;
            }
        }
        let scan = match segment::scan(&path, opts.index_every) {
            Ok(s) => s,
            Err(ReadError::Io(e)) => return Err(LoadError::Log(io_err(&path)(e))),
            Err(_) if active => {
                // Not even a valid header: a segment created just before a crash.
                remove_segment_files(&path)?;
                continue;
            }
            Err(_) => {
                return Err(LoadError::Corrupt(format!(
                    "{}: bad segment header",
                    path.display()
                )))
            }
        };
        let len = fs::metadata(&path).map_err(io_err(&path))?.len();
        if scan.valid_end < len {
            if !active {
                return Err(LoadError::Corrupt(format!(
                    "{}: {} at byte {}",
                    path.display(),
                    scan.stopped.unwrap_or("trailing bytes"),
                    scan.valid_end
                )));
            }
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            f.set_len(scan.valid_end).map_err(io_err(&path))?;
            f.sync_all().map_err(io_err(&path))?;
            rec.cut_bytes = len - scan.valid_end;
            rec.cut_reason = scan.stopped;
            tracing::warn!(
                path = %path.display(),
                cut_bytes = rec.cut_bytes,
                reason = scan.stopped.unwrap_or("incomplete transaction"),
                "change log: cut a torn tail"
            );
        }
        if scan.txns == 0 {
            remove_segment_files(&path)?;
            continue;
        }
        let info = SegInfo {
            path: path.clone(),
            first_lsn: first,
            last_lsn: scan.last_lsn.expect("txns > 0"),
            first_ts: scan.first_ts,
            max_ts: scan.max_ts,
            end: scan.valid_end,
            txns: scan.txns,
            index: scan.index,
        };
        if !active {
            write_index(&info)?;
        }
        segs.push_back(info);
    }
    // Segments must follow each other.
    for w in segs.iter().collect::<Vec<_>>().windows(2) {
        if w[1].first_lsn <= w[0].last_lsn {
            return Err(LoadError::Corrupt(format!(
                "{} overlaps {}",
                w[1].path.display(),
                w[0].path.display()
            )));
        }
    }
    Ok(segs)
}

const IDX_MAGIC: &[u8; 8] = b"WCIDX\0\0\x01";

fn write_index(s: &SegInfo) -> Result<(), LogError> {
    let mut b = Vec::with_capacity(64 + 24 * s.index.len());
    b.extend_from_slice(IDX_MAGIC);
    for v in [
        s.first_lsn.0,
        s.last_lsn.0,
        s.first_ts as u64,
        s.max_ts as u64,
        s.end,
        s.txns,
        s.index.len() as u64,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for e in &s.index {
        b.extend_from_slice(&e.commit_lsn.0.to_le_bytes());
        b.extend_from_slice(&e.commit_ts.to_le_bytes());
        b.extend_from_slice(&e.offset.to_le_bytes());
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    let path = s.path.with_extension("idx");
    let mut f = File::create(&path).map_err(io_err(&path))?;
    f.write_all(&b).map_err(io_err(&path))?;
    f.sync_data().map_err(io_err(&path))
}

/// A sealed segment's index, if its `.idx` is present, intact and matches.
fn read_index(seg: &Path, first: Lsn) -> Option<SegInfo> {
    let mut b = Vec::new();
    File::open(seg.with_extension("idx"))
        .ok()?
        .read_to_end(&mut b)
        .ok()?;
    if b.len() < 8 + 56 + 4 || &b[..8] != IDX_MAGIC {
        return None;
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let u = |i: usize| u64::from_le_bytes(body[8 + 8 * i..16 + 8 * i].try_into().expect("8"));
    let n = usize::try_from(u(6)).ok()?;
    if body.len() != 64 + 24 * n || Lsn(u(0)) != first {
        return None;
    }
    let end = u(4);
    if fs::metadata(seg).ok()?.len() != end {
        return None;
    }
    let index = (0..n)
        .map(|k| {
            let at = 64 + 24 * k;
            let w = |j: usize| u64::from_le_bytes(body[at + j..at + j + 8].try_into().expect("8"));
            IndexEntry {
                commit_lsn: Lsn(w(0)),
                commit_ts: w(8) as i64,
                offset: w(16),
            }
        })
        .collect();
    Some(SegInfo {
        path: seg.to_path_buf(),
        first_lsn: first,
        last_lsn: Lsn(u(1)),
        first_ts: u(2) as i64,
        max_ts: u(3) as i64,
        end,
        txns: u(5),
        index,
    })
}

#[cfg(test)]
mod tests;
