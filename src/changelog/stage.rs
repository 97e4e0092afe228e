//! The log stage of the pipeline: every committed transaction is appended to
//! the [`ChangeLog`] on a thread of its own, beside live delivery rather than in
//! front of it — the hub hands it each item once routed, in batches
//! ([`crate::route::hub::LogTap`]), so a change reaches clients without waiting
//! for the log, and the log holds it a moment later. Readers that must see
//! whatever was delivered live (a replay's hand-over, `GET /api/changes`) wait
//! for the log to reach what the hub routed ([`LogHandle::caught_up`]).
//!
//! What it promises (DESIGN.md §2, "Resume"):
//!
//! - **Durable before confirmed.** The stage tells [`Progress::logged`] the end
//!   LSN of each transaction once the log made it durable; a gated `Progress`
//!   never confirms past that, so PostgreSQL keeps (and resends after a crash)
//!   whatever the log could still lose. Syncs are grouped: one at most every
//!   [`SYNC_INTERVAL`], covering whatever was appended since the last, and a
//!   thread of its own does it, so the changes behind are not held up by the
//!   disk (a failed sync confirms nothing more of that log). Readers never wait
//!   for a sync: each transaction is written to the file at its commit.
//! - **Exactly once in the log.** A transaction resent after a reconnect or
//!   restart is skipped by the log (its commit LSN is not above the last logged);
//!   its end LSN still counts as logged once what is already in the log is durable.
//! - **A log that cannot be written stops confirming, and says so.** On a write
//!   error (disk full) the open transaction is dropped from the log, delivery goes
//!   on, the error is logged and counted, and nothing more is confirmed. The next
//!   transaction tries again by emptying the log ([`ChangeLog::reset`]): every
//!   resume position before it becomes a gap — a client is told, never handed a
//!   log with a hole.
//! - **Its source.** The log is opened (or reset, for another database system or
//!   slot) when the stream says where it comes from ([`Item::Stream`]).
//!
//! The log's IO is blocking, so the stage runs on a thread of its own; its
//! input is bounded, so a log that falls behind holds up the hub's intake (and
//! so the slot), never a client.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{codec, ChangeLog, LogError, LogIdentity, LogOptions, LogReader, SyncJob};
use crate::decode::event::{Change, Item, StreamStart};
use crate::lsn::Lsn;
use crate::source::session::Progress;

/// The shortest time between the starts of two syncs. A sync per commit (at an
/// idle moment after each) cost a third of walcast's CPU at 2,000 commits/s —
/// the journal and block IO of each `fdatasync`, on the cores the changes are
/// delivered from — and bought nothing: a confirmation only lets PostgreSQL
/// discard WAL, and goes out with the next status update anyway. So at most
/// this much of what was appended (never more than a crash could cost: the
/// slot resends it) waits to be confirmed.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(20);
/// Room in the sync thread's queue (more than [`SYNCS_IN_FLIGHT`]: the stage
/// never waits on it).
const SYNCS_QUEUED: usize = 4;
/// Syncs queued or running at most: another is put off (and covers more)
/// rather than waited for.
const SYNCS_IN_FLIGHT: usize = 2;
/// How soon a sync put off while [`SYNCS_IN_FLIGHT`] ran is asked for again.
const SYNC_RETRY: Duration = Duration::from_micros(200);
/// How often old segments are looked at for removal.
const RETAIN_EVERY: Duration = Duration::from_secs(10);

/// One sync handed to the sync thread, counted in `Stage::in_flight` until it
/// is dropped — after it ran, or unrun with the queue of a sync thread that
/// died (so a dead thread never leaves the count full).
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counters of the log stage (read by metrics).
#[derive(Debug, Default)]
pub struct LogStageStats {
    /// Transactions appended to the log.
    pub transactions: AtomicU64,
    /// Changes (rows and database messages) appended.
    pub changes: AtomicU64,
    /// Transactions skipped because the log already held them.
    pub skipped: AtomicU64,
    /// Syncs to disk.
    pub syncs: AtomicU64,
    /// Failed writes (each stops confirmation until the log is usable again).
    pub errors: AtomicU64,
    /// Whether the log can be written now.
    pub writable: AtomicBool,
    /// Times the log was emptied (another source, a failed write).
    pub resets: AtomicU64,
}

/// The stage's state, on its own thread.
struct Stage {
    opts: LogOptions,
    log: Option<ChangeLog>,
    progress: Arc<Progress>,
    stats: Arc<LogStageStats>,
    reader: Arc<std::sync::Mutex<Option<LogReader>>>,
    /// The open transaction is being logged (false: skipped, or the log failed).
    logging: bool,
    /// Committed transactions not yet known durable, shared with the syncer.
    confirm: Arc<Confirm>,
    /// The syncer thread's queue (`None`: it could not be started, or the
    /// stage is ending; syncs are then done here).
    syncs: Option<std::sync::mpsc::SyncSender<(SyncJob, u64, InFlight)>>,
    syncer: Option<std::thread::JoinHandle<()>>,
    /// Syncs handed to the syncer and not yet done.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// When a sync that is wanted is to start ([`SYNC_INTERVAL`] after the last
    /// one, or a moment after one of the [`SYNCS_IN_FLIGHT`] ends).
    sync_due: Option<Instant>,
    /// When the last sync was handed out.
    last_sync: Option<Instant>,
    /// A write failed: the next transaction resets the log first.
    broken: bool,
    last_retain: Instant,
    scratch: Vec<u8>,
}

/// Committed transactions not yet known durable, and what the sync thread
/// found: shared by the stage and the sync thread. Confirmations go out in
/// order, under the lock.
#[derive(Default)]
struct Confirm {
    state: std::sync::Mutex<ConfirmState>,
    /// A sync failed (the stage learns it at its next item).
    failed: AtomicBool,
}

#[derive(Default)]
struct ConfirmState {
    /// Bumped when the log is emptied: a sync of the log before is no proof.
    epoch: u64,
    /// (commit LSN, end LSN), in order.
    pending: std::collections::VecDeque<(Lsn, Lsn)>,
    /// A failed sync's error, with its epoch.
    error: Option<(u64, LogError)>,
    /// A sync of this epoch failed: no later one confirms anything of it
    /// (after a failed `fdatasync` a later one may succeed without the data).
    failed_epoch: Option<u64>,
}

impl Confirm {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConfirmState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    fn push(&self, commit: Lsn, end: Lsn) {
        self.lock().pending.push_back((commit, end));
    }

    /// The log was emptied: nothing pending counts any more.
    fn forget(&self) {
        let mut st = self.lock();
        st.epoch += 1;
        st.pending.clear();
    }

    /// Everything committed at or before `durable` is logged (a sync made in
    /// `epoch` says so).
    fn upto(&self, epoch: u64, durable: Lsn, progress: &Progress) {
        let mut st = self.lock();
        if st.epoch != epoch || st.failed_epoch == Some(epoch) {
            return;
        }
        let mut end = None;
        while let Some(&(commit, e)) = st.pending.front() {
            if commit > durable {
                break;
            }
            end = Some(e);
            st.pending.pop_front();
        }
        if let Some(e) = end {
            progress.logged(e);
        }
    }

    fn fail(&self, epoch: u64, e: LogError) {
        let mut st = self.lock();
        st.error = Some((epoch, e));
        st.failed_epoch = Some(epoch);
        self.failed.store(true, Ordering::Release);
    }

    /// A failed sync of the log as it is now (one of a log emptied since is
    /// no news).
    fn take_error(&self) -> Option<LogError> {
        if !self.failed.swap(false, Ordering::AcqRel) {
            return None;
        }
        let mut st = self.lock();
        match st.error.take() {
            Some((epoch, e)) if epoch == st.epoch => Some(e),
            _ => None,
        }
    }
}

/// A handle on the running stage: its counters and, once open, a reader of the log.
#[derive(Clone)]
pub struct LogHandle {
    pub stats: Arc<LogStageStats>,
    reader: Arc<std::sync::Mutex<Option<LogReader>>>,
    /// Commit LSN of the last transactional item the hub routed (set by the
    /// hub's [`crate::route::hub::LogTap`]; `u64::MAX` once the stage is gone).
    routed: Arc<AtomicU64>,
}

impl LogHandle {
    /// A handle on no running stage: `stats`, and `reader` as the log's reader
    /// (metrics tests, tools).
    pub fn detached(stats: Arc<LogStageStats>, reader: Option<LogReader>) -> LogHandle {
        LogHandle {
            stats,
            reader: Arc::new(std::sync::Mutex::new(reader)),
            routed: Arc::default(),
        }
    }

    /// A reader of the log, once the stream said where it comes from.
    pub fn reader(&self) -> Option<LogReader> {
        self.reader.lock().ok().and_then(|r| r.clone())
    }

    /// Where the hub records the commit LSN of each change it routes.
    pub fn routed_mark(&self) -> Arc<AtomicU64> {
        self.routed.clone()
    }

    /// Waits up to `limit` for `log` to hold every transaction the hub had
    /// routed (or handed to broadcast) when called, so that what it reads
    /// includes whatever clients were sent live; false when it did not get
    /// there (a long transaction still streaming, the log cannot be written, or
    /// its stage stopped).
    pub async fn caught_up(&self, log: &LogReader, limit: Duration) -> bool {
        let routed = Lsn(self.routed.load(Ordering::Acquire));
        let deadline = Instant::now() + limit;
        while log.last_lsn() < routed {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        true
    }
}

/// Starts the stage on a thread of its own: the batches of items from `input`
/// are logged in order. It ends when `input` closes, after a last sync.
pub fn spawn(
    opts: LogOptions,
    input: mpsc::Receiver<Vec<Item>>,
    progress: Arc<Progress>,
) -> std::io::Result<(LogHandle, std::thread::JoinHandle<()>)> {
    let lock = lock_dir(&opts.dir)?;
    let stats = Arc::new(LogStageStats::default());
    let reader = Arc::new(std::sync::Mutex::new(None));
    let stage = Stage {
        opts,
        log: None,
        progress,
        stats: stats.clone(),
        reader: reader.clone(),
        logging: false,
        confirm: Arc::default(),
        syncs: None,
        syncer: None,
        in_flight: Arc::default(),
        sync_due: None,
        last_sync: None,
        broken: false,
        last_retain: Instant::now(),
        scratch: Vec::with_capacity(4096),
    };
    let thread = std::thread::Builder::new()
        .name("walcast-log".into())
        .spawn(move || {
            let _lock = lock;
            stage.run(input)
        })?;
    Ok((
        LogHandle {
            stats,
            reader,
            routed: Arc::default(),
        },
        thread,
    ))
}

/// Takes the log directory for this process (created if missing): two walcasts
/// writing one log would corrupt it. The lock goes with the process.
fn lock_dir(dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    let f = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(std::io::Error::other(
            "the directory is in use by another walcast (one walcast per change log directory; set [log] dir)",
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

impl Stage {
    fn run(mut self, mut input: mpsc::Receiver<Vec<Item>>) {
        self.start_syncer();
        loop {
            let batch = match self.sync_due {
                // A sync is wanted: it starts when due, unless more items
                // come first (they are appended, and it covers them too).
                Some(due) => match recv_until(&mut input, due) {
                    Received::Batch(b) => b,
                    Received::Due => {
                        self.sync();
                        continue;
                    }
                    Received::Closed => break,
                },
                None => match input.blocking_recv() {
                    Some(b) => b,
                    None => break,
                },
            };
            if let Some(e) = self.confirm.take_error() {
                self.failed(&e);
            }
            for item in &batch {
                self.handle(item);
            }
            self.sync();
            if self.last_retain.elapsed() >= RETAIN_EVERY {
                self.retain();
            }
        }
        // The last sync is done here, at once, after the syncer's queue ran dry.
        self.syncs = None;
        if let Some(t) = self.syncer.take() {
            let _ = t.join();
        }
        if let Some(e) = self.confirm.take_error() {
            self.failed(&e);
        }
        self.last_sync = None;
        self.sync();
    }

    /// Starts the thread that syncs the log, so that a slow `fdatasync` never
    /// holds up the changes behind it (they are written while it runs). Without it (the thread could not be made) the stage syncs
    /// itself.
    fn start_syncer(&mut self) {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(SyncJob, u64, InFlight)>(SYNCS_QUEUED);
        let confirm = self.confirm.clone();
        let progress = self.progress.clone();
        let stats = self.stats.clone();
        let spawned = std::thread::Builder::new()
            .name("walcast-log-sync".into())
            .spawn(move || {
                // Each job's `InFlight` is dropped once it ran (or with the
                // queue, should this thread die).
                for (job, epoch, _in_flight) in rx {
                    match job.run() {
                        Ok(Some(durable)) => confirm.upto(epoch, durable, &progress),
                        Ok(None) => {}
                        Err(e) => {
                            // Counted by the stage at its next item; told now.
                            tracing::error!("change log sync failed: {e}; nothing more is confirmed to PostgreSQL until the log starts over");
                            stats.writable.store(false, Ordering::Relaxed);
                            confirm.fail(epoch, e);
                        }
                    }
                }
            });
        match spawned {
            Ok(t) => {
                self.syncs = Some(tx);
                self.syncer = Some(t);
            }
            Err(e) => tracing::warn!("change log: no sync thread ({e}); syncing in line"),
        }
    }

    fn handle(&mut self, item: &Item) {
        match item {
            Item::Stream(s) => {
                // A new stream resends any transaction the old one cut off:
                // the part already appended is dropped, not left open.
                if let Some(log) = self.log.as_mut() {
                    log.abandon();
                }
                self.logging = false;
                self.open(s)
            }
            Item::Begin(info) => {
                self.logging = false;
                let Some(log) = self.log.as_mut() else { return };
                if self.broken {
                    match log.reset(info.commit_lsn) {
                        Ok(()) => {
                            tracing::warn!(at = %info.commit_lsn, "change log usable again; emptied it: resume positions before this are gaps");
                            self.broken = false;
                            self.stats.resets.fetch_add(1, Ordering::Relaxed);
                            self.stats.writable.store(true, Ordering::Relaxed);
                            self.confirm.forget();
                        }
                        Err(e) => return self.failed(&e),
                    }
                }
                let Some(log) = self.log.as_mut() else { return };
                match log.begin(info.commit_lsn, info.commit_time.unix_micros(), info.xid.0) {
                    Ok(fresh) => {
                        self.logging = fresh;
                        if !fresh {
                            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => self.failed(&e),
                }
            }
            Item::Change(c) => self.append_change(c),
            Item::Truncate(cs) => {
                for c in cs {
                    self.append_change(c);
                }
            }
            Item::Message(m) => {
                if self.logging && m.txn.is_some() {
                    self.scratch.clear();
                    codec::encode_message(&mut self.scratch, m);
                    let r = self.log.as_mut().map(|l| l.append(&self.scratch));
                    match r {
                        Some(Ok(())) => {
                            self.stats.changes.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(Err(e)) => self.failed(&e),
                        None => {}
                    }
                }
            }
            Item::Commit { info, end_lsn } => {
                let logging = std::mem::take(&mut self.logging);
                let Some(log) = self.log.as_mut() else { return };
                if self.broken {
                    return;
                }
                // Skipped transactions end here too (the log ignores their commit).
                if let Err(e) = log.commit(*end_lsn) {
                    return self.failed(&e);
                }
                if logging {
                    self.stats.transactions.fetch_add(1, Ordering::Relaxed);
                }
                self.confirm.push(info.commit_lsn, *end_lsn);
            }
        }
    }

    fn append_change(&mut self, c: &Arc<Change>) {
        if !self.logging {
            return;
        }
        let Some(log) = self.log.as_mut() else { return };
        let r = log.table_id(&c.table).and_then(|id| {
            self.scratch.clear();
            codec::encode_change(&mut self.scratch, id, c);
            log.append(&self.scratch)
        });
        match r {
            Ok(()) => {
                self.stats.changes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.failed(&e),
        }
    }

    /// Opens the log for the stream's source (once; a later stream from another
    /// source reopens it, which empties it).
    fn open(&mut self, s: &StreamStart) {
        let identity = LogIdentity {
            system_id: s.system_id.clone(),
            slot: s.slot.clone(),
        };
        if self.log.as_ref().is_some_and(|l| l.identity() == &identity) {
            return;
        }
        // The writer of another source goes first (it holds the directory).
        self.log = None;
        match ChangeLog::open(self.opts.clone(), identity, s.slot_confirmed) {
            Ok((log, recovery)) => {
                if let Some(reason) = &recovery.reset {
                    tracing::info!(dir = %self.opts.dir.display(), ?reason, "change log started empty");
                    self.stats.resets.fetch_add(1, Ordering::Relaxed);
                }
                if recovery.cut_bytes > 0 {
                    tracing::warn!(
                        dir = %self.opts.dir.display(),
                        bytes = recovery.cut_bytes,
                        why = recovery.cut_reason.unwrap_or(""),
                        "change log: cut a torn tail left by a crash"
                    );
                }
                // What the log holds from before is durable (it was read back).
                self.progress.logged(s.slot_confirmed);
                if let Ok(mut r) = self.reader.lock() {
                    *r = Some(log.reader());
                }
                // Another log: syncs of the one before prove nothing, and what
                // was pending belongs to another source.
                self.confirm.forget();
                self.log = Some(log);
                self.broken = false;
                self.stats.writable.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(dir = %self.opts.dir.display(), "cannot open the change log: {e}; nothing is confirmed to PostgreSQL until it opens");
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                self.stats.writable.store(false, Ordering::Relaxed);
            }
        }
    }

    fn failed(&mut self, e: &LogError) {
        if !self.broken {
            tracing::error!("change log write failed: {e}; delivery goes on, but nothing more is confirmed to PostgreSQL until the log can be written");
        }
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        self.stats.writable.store(false, Ordering::Relaxed);
        if let Some(log) = self.log.as_mut() {
            log.abandon();
        }
        self.logging = false;
        self.broken = true;
    }

    /// Makes what was appended durable and lets the stream confirm it: now, or
    /// (when the last sync began less than [`SYNC_INTERVAL`] ago, or
    /// [`SYNCS_IN_FLIGHT`] are under way) at `sync_due`.
    fn sync(&mut self) {
        let now = Instant::now();
        let next = self.last_sync.map(|t| t + SYNC_INTERVAL);
        let needed = self.log.as_ref().is_some_and(|l| l.needs_sync()) && !self.broken;
        if let Some(next) = next.filter(|&n| needed && now < n) {
            self.sync_due = Some(next);
            return;
        }
        if self.syncs.is_some() && self.in_flight.load(Ordering::Acquire) >= SYNCS_IN_FLIGHT {
            self.sync_due = Some(now + SYNC_RETRY);
            return;
        }
        self.sync_due = None;
        if self.broken {
            return;
        }
        let Some(log) = self.log.as_mut() else { return };
        let job = match log.sync_job() {
            Ok(Some(job)) => job,
            // Nothing new: what was skipped counts as logged up to what is durable.
            Ok(None) => {
                let durable = log.durable_lsn();
                return self
                    .confirm
                    .upto(self.confirm.epoch(), durable, &self.progress);
            }
            Err(e) => return self.failed(&e),
        };
        if needed {
            self.stats.syncs.fetch_add(1, Ordering::Relaxed);
            self.last_sync = Some(now);
        }
        let epoch = self.confirm.epoch();
        // Never waits: at most SYNCS_IN_FLIGHT are queued or running.
        let job = match &self.syncs {
            Some(tx) => match tx.send((job, epoch, InFlight::new(&self.in_flight))) {
                Ok(()) => return,
                // The sync thread is gone: synced here from now on.
                Err(std::sync::mpsc::SendError((job, _, _))) => {
                    self.syncs = None;
                    job
                }
            },
            None => job,
        };
        match job.run() {
            Ok(Some(durable)) => self.confirm.upto(epoch, durable, &self.progress),
            Ok(None) => {}
            Err(e) => {
                self.confirm.fail(epoch, e);
                if let Some(e) = self.confirm.take_error() {
                    self.failed(&e);
                }
            }
        }
    }

    fn retain(&mut self) {
        self.last_retain = Instant::now();
        if let Some(log) = self.log.as_mut() {
            if let Err(e) = log.retain(super::now_micros()) {
                tracing::warn!("change log retention: {e}");
            }
        }
    }
}

/// What [`recv_until`] got.
enum Received {
    Batch(Vec<Item>),
    /// The deadline passed first.
    Due,
    Closed,
}

/// Blocks this thread (not a runtime's) until a batch arrives, `input`
/// closes, or `deadline` passes.
fn recv_until(input: &mut mpsc::Receiver<Vec<Item>>, deadline: Instant) -> Received {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark()
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    loop {
        match input.poll_recv(&mut cx) {
            std::task::Poll::Ready(Some(b)) => return Received::Batch(b),
            std::task::Poll::Ready(None) => return Received::Closed,
            std::task::Poll::Pending => {
                let now = Instant::now();
                if now >= deadline {
                    return Received::Due;
                }
                // Woken early (a batch, or spuriously): polled again.
                std::thread::park_timeout(deadline - now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmations_follow_syncs_of_this_log_only_and_stop_after_a_failed_one() {
        let progress = Progress::gated_by_log();
        progress.confirm(Lsn(1000));
        let c = Confirm::default();
        for i in 1..=3 {
            c.push(Lsn(10 * i), Lsn(10 * i + 8));
        }
        let e = c.epoch();
        c.upto(e, Lsn(20), &progress);
        assert_eq!(progress.confirmed(), Lsn(28));
        // A sync from before the log was emptied (another epoch) proves nothing.
        c.upto(e + 1, Lsn(30), &progress);
        assert_eq!(progress.confirmed(), Lsn(28));
        // After a failed sync, a later one of the same log confirms nothing.
        c.fail(e, LogError::Usage("sync failed"));
        c.upto(e, Lsn(30), &progress);
        assert_eq!(progress.confirmed(), Lsn(28));
        assert!(c.take_error().is_some());
        assert!(c.take_error().is_none());
        // Emptied: what was pending is gone, an error of the old log is no
        // news; the new epoch confirms again.
        c.fail(e, LogError::Usage("late sync of the old log"));
        c.forget();
        assert!(c.take_error().is_none());
        c.push(Lsn(40), Lsn(48));
        c.upto(c.epoch(), Lsn(40), &progress);
        assert_eq!(progress.confirmed(), Lsn(48));
    }
}
