//! Resume on join: a channel whose `postgres_changes` bindings carry
//! `replay: { since }` gets, after its join reply, every change it missed from
//! the change log, then `REPLAY_DONE`, then live changes — with no gap and no
//! duplicate at the hand-over (DESIGN.md "Resume").
//!
//! # The hand-over
//!
//! The join subscribes its channel with a *hold*: from that moment the hub keeps
//! the channel's live frames aside instead of queueing them, and answers with the
//! commit LSN of the last change it routed before (`routed`). The hub hands each
//! change to the log right after routing it, so the replay first waits for the
//! log to hold `routed` (moments, unless the log cannot be written), then reads
//! it from `since` up to `max(routed, the log's end)`. Each batch goes through the hub
//! ([`HubCommand::Replay`]), which judges it with the channel's bindings exactly as
//! a live change (filters, row rules, column lists, moves) and queues it past the
//! hold. Then `REPLAY_DONE`, and [`HubCommand::Release`] queues the held frames of
//! transactions after the last one replayed and ends the hold.
//!
//! # All or nothing
//!
//! A `since` older than the log's oldest retained change, from before a reset of
//! the log (another database system or slot, a failed write), or a channel that
//! asks while the log is off: nothing is replayed and a `system` error with code
//! `REPLAY_GAP` names the oldest position the log can resume from; live delivery
//! starts at once. A replay that fails part-way (retention overtook it, the log
//! could not be read) also ends with `REPLAY_GAP`, never with `REPLAY_DONE`.
//!
//! # Bounded
//!
//! Replayed frames go to the connection's ordinary queue: a batch is read only
//! when that queue is at most half full, so a long replay never closes a client
//! that reads, and the hold is bounded like the queue (a channel whose live frames
//! outgrow it while the replay runs is closed as a slow client, and can resume).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::changelog::codec::Logged;
use crate::changelog::stage::LogHandle;
use crate::changelog::{codec, Cursor, Entry, LogReader, ReplayError, Start};
use crate::decode::event::Change;
use crate::decode::pgoutput::{parse_iso_unix_micros, PgTimestamp};
use crate::lsn::Lsn;
use crate::route::hub::{ChannelId, ConnHandle, HubCommand, Outbound};
use crate::route::rls::Verdict;

/// `system` code: the replay is complete (`replayed` changes sent to the channel,
/// of `transactions` read, up to `commit_lsn`).
pub const REPLAY_DONE: &str = "REPLAY_DONE";
/// `system` code (status `error`): nothing could be replayed from `since`; refetch.
pub const REPLAY_GAP: &str = "REPLAY_GAP";

/// A `since` that matches no logged transaction exactly resumes from the first
/// transaction committed at or after `since - SLACK_MICROS` (duplicates possible,
/// loss never): 1 ms, the resolution of timestamps from elsewhere.
pub const SLACK_MICROS: i64 = 1_000;

/// How long a replay waits for the log to open (it opens once replication is
/// connected, right after a start) and to hold what the hub has routed.
const LOG_WAIT: Duration = Duration::from_secs(30);

/// Counters of replays (read by metrics).
#[derive(Debug, Default)]
pub struct ReplayStats {
    /// Replays completed (`REPLAY_DONE` sent).
    pub served: AtomicU64,
    /// Changes read back for replays (before each channel's filters).
    pub changes: AtomicU64,
    /// `REPLAY_GAP` answers.
    pub gaps: AtomicU64,
}

/// Where a channel resumes from: its bindings' `replay.since`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// After the transaction committed at this LSN (`"X/Y"`).
    Lsn(Lsn),
    /// After the transaction committed at this time (Unix microseconds), as
    /// [`Start::AfterTimestamp`] resolves it.
    Time(i64),
}

impl Since {
    fn start(self) -> Start {
        match self {
            Since::Lsn(l) => Start::AfterLsn(l),
            Since::Time(ts) => Start::AfterTimestamp {
                ts,
                slack: SLACK_MICROS,
            },
        }
    }
}

/// The channel's resume point from its `postgres_changes` bindings: `None` when
/// no binding asks for a replay (no `replay`, or `since: null`). Every binding
/// that names a `since` must name the same one (the replay is the channel's).
pub fn since_of(bindings: &[Value]) -> Result<Option<Since>, String> {
    let mut found: Option<(Since, usize)> = None;
    for (i, b) in bindings.iter().enumerate() {
        let Some(r) = b.get("replay") else { continue };
        let since = match r {
            Value::Null => continue,
            Value::Object(o) => match o.get("since") {
                None | Some(Value::Null) => continue,
                Some(v) => parse_since(v)
                    .map_err(|e| format!("postgres_changes[{i}].replay.since: {e}"))?,
            },
            _ => {
                return Err(format!(
                    "postgres_changes[{i}].replay must be an object {{\"since\": …}}"
                ))
            }
        };
        match found {
            Some((s, j)) if s != since => {
                return Err(format!(
                    "postgres_changes[{j}] and [{i}] replay from different `since` values; a channel replays from one position"
                ))
            }
            _ => found = Some((since, i)),
        }
    }
    Ok(found.map(|f| f.0))
}

/// A `since` value: a commit_timestamp, a commit LSN `X/Y`.
pub fn parse_since(v: &Value) -> Result<Since, String> {
    const WHAT: &str = "must be a commit_timestamp as walcast sent it (\"2026-11-30T01:02:03.123456Z\"), a commit LSN \"X/Y\", or null";
    let Value::String(s) = v else {
        return Err(WHAT.into());
    };
    if let Ok(l) = s.parse::<Lsn>() {
        return Ok(Since::Lsn(l));
    }
    match parse_iso_unix_micros(s) {
        Some(us) => Ok(Since::Time(us)),
        None => Err(format!("{WHAT}; got {s:?}")),
    }
}

/// One replay to run for a channel that just joined with a hold.
pub struct Job {
    pub hub: mpsc::Sender<HubCommand>,
    pub conn: ConnHandle,
    pub channel: ChannelId,
    pub topic: Arc<str>,
    pub since: Since,
    /// The hub's answer to the subscribe: the last commit LSN routed before the hold.
    pub routed: Lsn,
    /// The change log; `None` when it is off.
    pub log: Option<LogHandle>,
    pub stats: Arc<ReplayStats>,
    /// Changes per batch handed to the hub.
    pub batch: usize,
}

/// How a replay ended.
enum Outcome {
    Done {
        replayed: u64,
        transactions: u64,
        /// The last transaction replayed (commit LSN, Unix micros).
        last: Option<(Lsn, i64)>,
        /// Held frames at or before this commit LSN were replayed.
        through: Lsn,
    },
    Gap {
        message: String,
        oldest: Option<(Lsn, i64)>,
    },
    /// The channel or its connection went away: nothing more to say.
    Gone,
}

/// Runs `job`: replays, says how it ended, and releases the channel's hold.
pub async fn run(job: Job) {
    let outcome = replay(&job).await;
    let release_after = match &outcome {
        Outcome::Gone => return,
        Outcome::Done {
            replayed,
            transactions,
            last,
            through,
        } => {
            job.stats.served.fetch_add(1, Ordering::Relaxed);
            let mut extra = Map::new();
            extra.insert("replayed".into(), json!(replayed));
            extra.insert("transactions".into(), json!(transactions));
            if let Some((lsn, ts)) = last {
                extra.insert("commit_lsn".into(), json!(lsn.to_string()));
                extra.insert("commit_timestamp".into(), json!(iso(*ts)));
            }
            let message = format!("Replayed {replayed} changes missed since the given position");
            system(&job, "ok", REPLAY_DONE, &message, extra);
            *through
        }
        Outcome::Gap { message, oldest } => {
            job.stats.gaps.fetch_add(1, Ordering::Relaxed);
            let mut extra = Map::new();
            if let Some((lsn, ts)) = oldest {
                extra.insert("oldest_commit_lsn".into(), json!(lsn.to_string()));
                extra.insert("oldest_commit_timestamp".into(), json!(iso(*ts)));
            }
            system(&job, "error", REPLAY_GAP, message, extra);
            Lsn::ZERO
        }
    };
    let _ = job
        .hub
        .send(HubCommand::Release {
            channel: job.channel,
            after: release_after,
        })
        .await;
}

fn iso(unix_micros: i64) -> String {
    PgTimestamp::from_unix_micros(unix_micros).to_iso_micros()
}

/// A channel's `system` message about a replay (`extension` is
/// `postgres_changes` or `broadcast`), with a stable `code`.
fn system_message(
    conn: &ConnHandle,
    topic: &Arc<str>,
    extension: &str,
    (status, code, message): (&str, &str, &str),
    extra: Map<String, Value>,
) {
    let mut payload = Map::new();
    payload.insert("extension".into(), extension.into());
    payload.insert("status".into(), status.into());
    payload.insert("message".into(), message.into());
    let channel = topic.strip_prefix("realtime:").unwrap_or(topic);
    payload.insert("channel".into(), channel.into());
    payload.insert("code".into(), code.into());
    payload.extend(extra);
    conn.queue_or_close(Outbound::System {
        topic: topic.clone(),
        payload: Value::Object(payload).to_string(),
    });
}

fn system(job: &Job, status: &str, code: &str, message: &str, extra: Map<String, Value>) {
    system_message(
        &job.conn,
        &job.topic,
        "postgres_changes",
        (status, code, message),
        extra,
    );
}

fn gap(e: ReplayError, log: &LogReader) -> Outcome {
    let oldest = log.stats().oldest.map(|p| (p.commit_lsn, p.commit_ts));
    let message = match e {
        ReplayError::Gap { .. } => "The change log no longer holds every change since the given position (it is older than the oldest retained change, or the log was reset): nothing was replayed; refetch, then resume from the oldest position or live".to_string(),
        other => format!("The change log could not be read ({other}): the replay is incomplete; refetch"),
    };
    Outcome::Gap { message, oldest }
}

async fn replay(job: &Job) -> Outcome {
    let Some(handle) = &job.log else {
        return Outcome::Gap {
            message:
                "walcast keeps no change log ([log] dir is off): nothing can be replayed; refetch"
                    .into(),
            oldest: None,
        };
    };
    let waited = Instant::now();
    let log = loop {
        if let Some(r) = handle.reader() {
            break r;
        }
        if waited.elapsed() > LOG_WAIT || gone(&job.conn) {
            return Outcome::Gap {
                message: "The change log is not open (replication has not connected since walcast started): nothing was replayed; refetch".into(),
                oldest: None,
            };
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Everything routed before the hold must be readable before the replay ends.
    let target = job.routed.max(log.last_lsn());
    while log.last_lsn() < job.routed {
        if waited.elapsed() > LOG_WAIT || gone(&job.conn) {
            return Outcome::Gap {
                message: "The change log is behind the live stream (it cannot be written?): nothing was replayed; refetch".into(),
                oldest: None,
            };
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let start = job.since.start();
    let opened = {
        let log = log.clone();
        tokio::task::spawn_blocking(move || log.cursor(start).map(|c| c.until(target))).await
    };
    let mut cursor = match opened {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return gap(e, &log),
        Err(_) => return Outcome::Gone,
    };
    let (mut replayed, mut transactions, mut last) = (0u64, 0u64, None);
    let mut txn = None;
    loop {
        if !room(&job.conn).await {
            return Outcome::Gone;
        }
        let read = {
            let log = log.clone();
            let n = job.batch;
            tokio::task::spawn_blocking(move || {
                let r = read_batch(&mut cursor, &log, &mut txn, n);
                (cursor, txn, r)
            })
            .await
        };
        let (c, t, r) = match read {
            Ok(v) => v,
            Err(_) => return Outcome::Gone,
        };
        (cursor, txn) = (c, t);
        let batch = match r {
            Ok(b) => b,
            Err(e) => return gap(e, &log),
        };
        transactions += batch.transactions;
        if batch.last.is_some() {
            last = batch.last;
        }
        let n = batch.changes.len() as u64;
        job.stats.changes.fetch_add(n, Ordering::Relaxed);
        if n > 0 {
            let (done_tx, done_rx) = oneshot::channel();
            let sent = job
                .hub
                .send(HubCommand::Replay {
                    channel: job.channel,
                    changes: batch.changes,
                    done: done_tx,
                })
                .await;
            match (sent, done_rx.await) {
                (Ok(()), Ok(Some(r))) => {
                    replayed += r.sent;
                    // RLS mode's SQL path: counted only when the check lets
                    // the change through (as the writer sends it).
                    for t in r.gated {
                        if let Verdict::Send { .. } = t.wait().await {
                            replayed += 1;
                        }
                    }
                }
                _ => return Outcome::Gone,
            }
        }
        if batch.end {
            break;
        }
    }
    let since_lsn = match job.since {
        Since::Lsn(l) => l,
        Since::Time(_) => Lsn::ZERO,
    };
    Outcome::Done {
        replayed,
        transactions,
        last,
        through: target.max(cursor.position()).max(since_lsn),
    }
}

/// The connection was closed (asked to, or its writer ended: socket lost,
/// server shutdown), so a replay for it stops at once.
fn gone(conn: &ConnHandle) -> bool {
    conn.kill.is_cancelled() || conn.tx.is_closed()
}

/// Waits until the connection's queue is at most half full; false when it closed.
async fn room(conn: &ConnHandle) -> bool {
    loop {
        if gone(conn) {
            return false;
        }
        let frames_ok = conn.tx.capacity() * 2 >= conn.tx.max_capacity();
        let bytes_ok = conn.queued.used() * 2 <= conn.queued.limit();
        if frames_ok && bytes_ok {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

struct Batch {
    changes: Vec<Arc<Change>>,
    transactions: u64,
    last: Option<(Lsn, i64)>,
    /// The cursor reached its end.
    end: bool,
}

/// One step of a read of the log, decoded.
enum Read {
    Begin,
    Row(Change),
    Message(crate::decode::event::DbMessage),
    /// A row change not decoded (a read for messages only).
    Skipped,
    Commit {
        commit_lsn: Lsn,
        commit_ts: i64,
    },
}

/// The next step of `cursor`, decoding inside the transaction `txn` tracks; row
/// changes are decoded only with `rows`.
fn next_read(
    cursor: &mut Cursor,
    log: &LogReader,
    txn: &mut Option<crate::decode::event::TxnInfo>,
    rows: bool,
) -> Result<Option<Read>, ReplayError> {
    let Some(e) = cursor.next_entry()? else {
        return Ok(None);
    };
    Ok(Some(match e {
        Entry::Begin {
            commit_lsn,
            commit_ts,
            xid,
        } => {
            *txn = Some(codec::txn_info(commit_lsn, commit_ts, xid));
            Read::Begin
        }
        Entry::Change(bytes) => match *txn {
            Some(_) if !rows && !codec::is_message(&bytes) => Read::Skipped,
            Some(info) => match log.decode(&bytes, info) {
                Ok(Logged::Change(c)) => Read::Row(c),
                Ok(Logged::Message(m)) => Read::Message(m),
                Err(e) => {
                    return Err(ReplayError::Log(crate::changelog::LogError::Corrupt {
                        path: "(replay)".into(),
                        what: e.to_string(),
                    }))
                }
            },
            None => Read::Skipped,
        },
        Entry::Commit { commit_lsn, .. } => {
            let commit_ts = txn.take().map_or(0, |t| t.commit_time.unix_micros());
            Read::Commit {
                commit_lsn,
                commit_ts,
            }
        }
    }))
}

/// Reads up to `n` changes (row changes only; database messages are broadcast's).
fn read_batch(
    cursor: &mut Cursor,
    log: &LogReader,
    txn: &mut Option<crate::decode::event::TxnInfo>,
    n: usize,
) -> Result<Batch, ReplayError> {
    let mut b = Batch {
        changes: Vec::with_capacity(n),
        transactions: 0,
        last: None,
        end: false,
    };
    while b.changes.len() < n {
        match next_read(cursor, log, txn, true)? {
            None => {
                b.end = true;
                break;
            }
            Some(Read::Row(c)) => b.changes.push(Arc::new(c)),
            Some(Read::Commit {
                commit_lsn,
                commit_ts,
            }) => {
                b.transactions += 1;
                b.last = Some((commit_lsn, commit_ts));
            }
            Some(_) => {}
        }
    }
    Ok(b)
}

/// Most database broadcasts one broadcast replay sends.
pub const BROADCAST_REPLAY_MAX: usize = 1000;

/// A private channel's `config.broadcast.replay`: `{since: <Unix ms>, limit}`
/// (realtime-js 2.109). `limit` defaults to 25 (Supabase's) and is at most
/// [`BROADCAST_REPLAY_MAX`].
pub fn broadcast_replay_of(config: &Value) -> Result<Option<(i64, usize)>, String> {
    let Some(r) = config.pointer("/broadcast/replay") else {
        return Ok(None);
    };
    if r.is_null() {
        return Ok(None);
    }
    let since = r
        .get("since")
        .and_then(Value::as_i64)
        .ok_or("config.broadcast.replay.since must be a time in Unix milliseconds")?;
    let limit = match r.get("limit") {
        None | Some(Value::Null) => 25,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=BROADCAST_REPLAY_MAX as u64).contains(&n) => n as usize,
            _ => {
                return Err(format!(
                    "config.broadcast.replay.limit must be 1 to {BROADCAST_REPLAY_MAX}"
                ))
            }
        },
    };
    if config.get("private") != Some(&Value::Bool(true)) {
        return Err("config.broadcast.replay needs a private channel (as Supabase's)".into());
    }
    Ok(Some((since, limit)))
}

/// A broadcast replay for a private channel that just joined.
pub struct BroadcastJob {
    pub broadcast: Arc<crate::deliver::broadcast::Broadcaster>,
    pub conn: ConnHandle,
    pub channel: ChannelId,
    pub topic: Arc<str>,
    /// Unix milliseconds: messages committed at or after it.
    pub since_ms: i64,
    pub limit: usize,
    pub log: Option<LogHandle>,
    pub stats: Arc<ReplayStats>,
}

/// Sends the channel's database broadcasts committed since `since_ms` (the first
/// `limit`, oldest first, `meta.replayed`), then `REPLAY_DONE` (with `more` when
/// the limit cut it short) — or `REPLAY_GAP` when the log does not reach back
/// that far, with nothing sent. A message sent live as the channel joined may
/// come again replayed, with the same `meta.id`.
pub async fn run_broadcast(job: BroadcastJob) {
    let name = job
        .topic
        .strip_prefix("realtime:")
        .unwrap_or(&job.topic)
        .to_string();
    let system = |status: &str, code: &str, message: &str, extra: Map<String, Value>| {
        system_message(
            &job.conn,
            &job.topic,
            "broadcast",
            (status, code, message),
            extra,
        )
    };
    let gap = |message: &str, log: Option<&LogReader>| {
        job.stats.gaps.fetch_add(1, Ordering::Relaxed);
        let mut extra = Map::new();
        if let Some(o) = log.and_then(|l| l.stats().oldest) {
            extra.insert("oldest_commit_timestamp".into(), json!(iso(o.commit_ts)));
        }
        system("error", REPLAY_GAP, message, extra);
    };
    let Some(handle) = &job.log else {
        return gap(
            "walcast keeps no change log ([log] dir is off): nothing can be replayed",
            None,
        );
    };
    let waited = Instant::now();
    let log = loop {
        if let Some(r) = handle.reader() {
            break r;
        }
        if waited.elapsed() > LOG_WAIT || gone(&job.conn) {
            return gap("The change log is not open (replication has not connected since walcast started): nothing was replayed", None);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // A message handed to broadcast before this channel joined (so not sent
    // to it live) is read back: the log must hold it first.
    if !handle.caught_up(&log, LOG_WAIT).await {
        return gap(
            "The change log is behind the live stream (it cannot be written?): nothing was replayed",
            Some(&log),
        );
    }
    let (since, limit) = (job.since_ms.saturating_mul(1000), job.limit);
    let read = {
        let log = log.clone();
        let name = name.clone();
        tokio::task::spawn_blocking(move || {
            // "After the transaction at `since - 1µs`": from the first at or after `since`.
            let mut cursor = log
                .cursor(Start::AfterTimestamp {
                    ts: since - 1,
                    slack: 0,
                })?
                .until(log.last_lsn());
            let mut found = Vec::new();
            let mut more = false;
            let mut txn = None;
            while let Some(r) = next_read(&mut cursor, &log, &mut txn, false)? {
                let Read::Message(m) = r else { continue };
                let Ok(Some(b)) = crate::deliver::broadcast::DbBroadcast::of(&m) else {
                    continue;
                };
                if b.private && b.topic == name {
                    if found.len() == limit {
                        more = true;
                        break;
                    }
                    found.push(b);
                }
            }
            Ok::<_, ReplayError>((found, more))
        })
        .await
    };
    let (found, more) = match read {
        Ok(Ok(v)) => v,
        Ok(Err(ReplayError::Gap { .. })) => return gap(
            "The change log no longer holds every message since that time: nothing was replayed",
            Some(&log),
        ),
        Ok(Err(e)) => {
            return gap(
                &format!("The change log could not be read ({e}): nothing was replayed"),
                Some(&log),
            )
        }
        Err(_) => return,
    };
    let n = found.len();
    job.stats.changes.fetch_add(n as u64, Ordering::Relaxed);
    let sent = job.broadcast.replay_to(job.channel, found);
    if sent < n {
        return; // the channel left or its connection closed
    }
    job.stats.served.fetch_add(1, Ordering::Relaxed);
    let mut extra = Map::new();
    extra.insert("replayed".into(), json!(sent));
    extra.insert("more".into(), json!(more));
    system(
        "ok",
        REPLAY_DONE,
        &format!("Replayed {sent} broadcasts since the given time"),
        extra,
    );
}

/// Where a page of `GET /api/changes` starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageStart {
    Since(Since),
    /// A previous page's `next_cursor`: after the transaction committed at
    /// `after`, skipping the first `skip` changes of the next one (a page may end
    /// inside a transaction).
    Cursor {
        after: Lsn,
        skip: usize,
    },
}

impl PageStart {
    /// Reads a `next_cursor` (`X/Y` or `X/Y:N`).
    pub fn parse_cursor(s: &str) -> Option<PageStart> {
        let (lsn, skip) = match s.split_once(':') {
            Some((l, n)) => (l, n.parse().ok()?),
            None => (s, 0),
        };
        Some(PageStart::Cursor {
            after: lsn.parse().ok()?,
            skip,
        })
    }
}

/// One page of changes read from the log for one binding.
pub struct Page {
    /// Each change's `data` object (JSON), as a channel with the binding gets it.
    pub changes: Vec<Arc<str>>,
    /// Where the next page starts (`X/Y` or `X/Y:N`).
    pub next_cursor: String,
    /// The page ended at `limit`, not at the log's end.
    pub more: bool,
}

/// Reads up to `limit` changes that `binding` receives, from `start`: judged by
/// the hub's own code (a hub of one channel), so a page holds exactly what a
/// replay to a channel with that binding sends. Blocking (file reads; and, on
/// RLS mode's SQL path, waits for each check's verdict on the runtime of the
/// caller's `spawn_blocking`, with `gate`).
pub fn read_page(
    log: &LogReader,
    binding: crate::route::hub::Binding,
    start: PageStart,
    limit: usize,
    render: crate::decode::value::RenderOptions,
    gate: Option<Arc<crate::route::rls::Gate>>,
) -> Result<Page, ReplayError> {
    use crate::route::hub::Hub;
    let mut hub = Hub::new(render, Arc::default());
    if let Some(g) = gate {
        hub = hub.with_rls_gate(g);
    }
    let (tx, mut rx) = crate::route::queue::channel(64);
    let (done, _) = oneshot::channel();
    hub.command(HubCommand::Subscribe {
        conn: ConnHandle::new(1, tx, usize::MAX),
        channel: 1,
        topic: Arc::from("realtime:api"),
        bindings: vec![binding],
        hold: false,
        done,
    });
    let (start, mut skip) = match start {
        PageStart::Since(s) => (s.start(), 0),
        PageStart::Cursor { after, skip } => (Start::AfterLsn(after), skip),
    };
    let mut cursor = log.cursor(start)?;
    let mut changes = Vec::new();
    let mut txn = None;
    let mut read_in_txn = 0usize;
    loop {
        let Some(r) = next_read(&mut cursor, log, &mut txn, true)? else {
            return Ok(Page {
                changes,
                next_cursor: cursor.position().to_string(),
                more: false,
            });
        };
        let c = match r {
            Read::Begin => {
                read_in_txn = 0;
                continue;
            }
            Read::Commit { .. } => {
                skip = 0;
                continue;
            }
            Read::Row(c) => {
                read_in_txn += 1;
                c
            }
            Read::Message(_) | Read::Skipped => {
                read_in_txn += 1;
                continue;
            }
        };
        if read_in_txn <= skip {
            continue;
        }
        let (done, _) = oneshot::channel();
        hub.command(HubCommand::Replay {
            channel: 1,
            changes: vec![Arc::new(c)],
            done,
        });
        while let Ok(out) = rx.try_recv() {
            match out {
                Outbound::Change { data, .. } => changes.push(data),
                // RLS mode's SQL path: as the socket writer does.
                Outbound::Gated(g) => {
                    let verdict = tokio::runtime::Handle::try_current()
                        .map(|h| h.block_on(g.ticket.wait()))
                        .unwrap_or(Verdict::Failed);
                    match verdict {
                        Verdict::Send { old_visible } => changes.push(
                            match (old_visible, g.old_hidden) {
                                (false, Some(hidden)) => hidden,
                                _ => g.data,
                            },
                        ),
                        Verdict::Skip => {}
                        Verdict::Failed => {
                            return Err(ReplayError::Log(crate::changelog::LogError::Usage(
                                "a row-level security check failed for this token (see the server's log)",
                            )))
                        }
                    }
                }
                _ => {}
            }
        }
        if changes.len() >= limit {
            return Ok(Page {
                changes,
                next_cursor: format!("{}:{read_in_txn}", cursor.position()),
                more: true,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_read_from_the_bindings() {
        let b = |v: Value| vec![json!({"event": "*", "schema": "public", "replay": v})];
        assert_eq!(since_of(&[json!({"event": "*"})]), Ok(None));
        assert_eq!(since_of(&b(Value::Null)), Ok(None));
        assert_eq!(since_of(&b(json!({"since": null}))), Ok(None));
        assert_eq!(
            since_of(&b(json!({"since": "0/16B3748"}))),
            Ok(Some(Since::Lsn(Lsn(0x16B3748))))
        );
        assert_eq!(
            since_of(&b(json!({"since": "2024-01-02T03:04:05.678901Z"}))),
            Ok(Some(Since::Time(1_704_164_645_678_901)))
        );
        for bad in [
            json!({"since": "yesterday"}),
            json!({"since": 5}),
            json!("0/1"),
        ] {
            let e = since_of(&b(bad.clone())).unwrap_err();
            assert!(e.starts_with("postgres_changes[0].replay"), "{bad}: {e}");
        }
        let two = vec![
            json!({"replay": {"since": "0/10"}}),
            json!({"replay": {"since": null}}),
            json!({"replay": {"since": "0/10"}}),
        ];
        assert_eq!(since_of(&two), Ok(Some(Since::Lsn(Lsn(0x10)))));
        let differ = vec![
            json!({"replay": {"since": "0/10"}}),
            json!({"replay": {"since": "0/20"}}),
        ];
        assert!(since_of(&differ).unwrap_err().contains("different"));
    }
}
