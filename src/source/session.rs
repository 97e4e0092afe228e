//! Consuming a logical replication slot with `pgoutput`.
//!
//! Implements the "Streaming Replication Protocol" and "Logical Streaming
//! Replication Protocol" chapters of the PostgreSQL documentation: a connection
//! with `replication=database`, `START_REPLICATION SLOT … LOGICAL … (proto_version
//! '1', publication_names '…', messages 'true')`, then a CopyBoth stream of
//! `XLogData` ('w') and primary keepalive ('k') messages from the server, answered
//! with standby status updates ('r').
//!
//! The bytes of that stream are [`crate::source::protocol`]'s business (pure
//! parsing and encoding); this module does the IO around it.
//!
//! # Progress tracking: what the flush LSN means
//!
//! The flush LSN walcast reports is a promise: everything before it has been
//! handled and need never be sent again. The rules that keep it — downstream
//! confirms through [`Progress::confirm`], idle keepalives are confirmed only
//! when nothing is in flight, reported LSNs never go backwards, a requested reply
//! goes out at once, status updates on a timer also while downstream is full —
//! are written down, implemented and unit-tested in [`crate::source::flush`]
//! ([`FlushTracker`]). This module feeds the tracker what happens on the stream
//! and sends the status updates it returns.
//!
//! # Resume
//!
//! `START_REPLICATION … 0/0` makes the server start from the slot's
//! `confirmed_flush_lsn`. After a crash or reconnect a transaction may be delivered
//! again (if it was handled but not yet confirmed), never skipped. Every event
//! carries its commit LSN so clients can de-duplicate.
//!
//! On a reconnect, `START_REPLICATION` asks for the position downstream already
//! confirmed (the server skips transactions that committed before it), so what
//! was handled but not yet reported is not delivered again.
//!
//! # The slot and the publication under a running walcast
//!
//! A missing slot is created (when asked) only before the first successful
//! stream. Later, a missing slot, a missing publication, or a publication that
//! was re-created after changes the slot still has to decode (SQLSTATE 42704 from
//! the walsender while the publication exists) is [`Blocked`]: it needs an
//! operator, shows in [`StreamState`] (`/ready`, metrics, client notices), and is
//! never "fixed" by re-creating anything. When walcast finds its slot past the
//! position it had confirmed (re-created or advanced), it records a gap.
//!
//! # Timeouts
//!
//! Connecting (TCP, TLS, startup, authentication) has [`CONNECT_TIMEOUT`], every
//! query and replication command [`QUERY_TIMEOUT`] (slot creation, which waits for
//! open transactions, has none), and the whole start of a session watches the
//! shutdown token, so SIGTERM is prompt even when PostgreSQL accepts the
//! connection and never answers. A stream that hears nothing for twice the
//! server's `wal_sender_timeout` (at least 30 s) counts as lost.
//!
//! # Backpressure
//!
//! When the channel is full the stream stops reading the socket (the walsender
//! then blocks on its send buffer) but keeps sending status updates, so the
//! server does not time the connection out.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::decode::assembler::Assembler;
use crate::decode::event::{Item, StreamStart};
use crate::decode::pgoutput::{self, Message};
use crate::decode::relation::TypeCatalog;
use crate::lsn::Lsn;
use crate::source::conn::ReplicationConnection;
pub use crate::source::error::{
    Blocked, ReplicationError, ServerError, CONNECT_TIMEOUT, QUERY_TIMEOUT,
};
use crate::source::explain;
pub use crate::source::flush::Progress;
use crate::source::flush::{FlushTracker, StatusReason};
pub use crate::source::protocol::ReplicationOptions;
use crate::source::protocol::{self, ReplicationMessage};
use crate::source::slot;

/// How long shutdown waits for downstream to confirm what it was handed.
const SHUTDOWN_DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Changes into one transaction from which it counts as bulk (see [`BULK_NAP`]).
const BULK_CHANGES: u64 = 256;

/// How long a drained socket is given to fill again in the middle of a bulk
/// transaction before the stream waits on it. The walsender sends each change
/// as it decodes it, so a reader that keeps up wakes for every few changes —
/// and each wake costs more on every stage after it (a hand-over, a WebSocket
/// write, a wake of each client) than the changes it brings; on two cores that
/// work is taken from the walsender itself, which then sends slower still: a
/// drain ran at 2× `pg_recvlogical` with 8× the wake-ups and sends of a run
/// that read 8 KB at a time. Waiting 1 ms whenever the socket runs dry inside
/// a transaction of hundreds of changes lets ~100 changes gather (the socket
/// buffer holds them) and costs those rows, already committed before the first
/// was sent, a millisecond. Transactions shorter than [`BULK_CHANGES`] (every
/// live single-row commit) are read the moment they arrive.
const BULK_NAP: Duration = Duration::from_millis(1);

/// The stream counts as lost when the server sent nothing for this many times its
/// `wal_sender_timeout` (a busy walsender still sends a keepalive every half of it),
/// and at least [`MIN_SILENCE_LIMIT`]. With `wal_sender_timeout = 0` the server
/// promises nothing, and there is no limit.
const SILENCE_TIMEOUTS: u32 = 2;
const MIN_SILENCE_LIMIT: Duration = Duration::from_secs(30);

/// How often a blocked stream (see [`Blocked`]) looks whether an operator fixed it.
const BLOCKED_POLL: Duration = Duration::from_secs(2);

/// Reconnect delays after a transient error; the last repeats.
const BACKOFF: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
];

/// Live facts about the stream, read by metrics and health checks.
#[derive(Debug, Default)]
pub struct StreamState {
    pub connected: AtomicBool,
    /// Woken when the stream connects.
    connected_changed: tokio::sync::Notify,
    pub reconnects: AtomicU64,
    /// The flush LSN last reported to the server.
    pub reported_flush: AtomicU64,
    /// Highest WAL position received from the server.
    pub received: AtomicU64,
    /// Unix micros of the commit time of the last transaction handed downstream.
    pub last_commit_unix_micros: AtomicI64,
    pub transactions: AtomicU64,
    pub decode_errors: AtomicU64,
    /// Unix seconds when the connection was last lost (0 = never / connected).
    pub disconnected_since: AtomicI64,
    /// End LSN of the last commit handed downstream; downstream has caught up when
    /// [`Progress::confirmed`] reaches it.
    pub handed_commit_end: AtomicU64,
    /// A condition that stops streaming until an operator acts ([`Blocked`] as u8,
    /// 0 = none), and its explanation.
    pub blocked: AtomicU8,
    pub blocked_message: Mutex<String>,
    /// Gaps found: the slot was re-created or moved past the position walcast had
    /// confirmed, so the changes in between were never delivered. The last one is
    /// kept as (from, to).
    pub gaps: AtomicU64,
    pub last_gap: Mutex<Option<(Lsn, Lsn)>>,
}

impl StreamState {
    /// Records whether the stream is connected and streaming, and wakes
    /// [`StreamState::until_connected`].
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
        if connected {
            self.connected_changed.notify_waiters();
        }
    }

    /// Returns once the stream is connected (at once if it is).
    pub async fn until_connected(&self) {
        loop {
            // Registered before the check: a connect after the check wakes it.
            let changed = self.connected_changed.notified();
            if self.connected.load(Ordering::Acquire) {
                return;
            }
            changed.await;
        }
    }

    /// The condition blocking the stream, if any.
    pub fn blocked(&self) -> Option<Blocked> {
        Blocked::from_u8(self.blocked.load(Ordering::Acquire))
    }

    /// Why the stream is blocked (empty when it is not).
    pub fn blocked_message(&self) -> String {
        self.blocked_message
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    fn set_blocked(&self, b: Option<Blocked>, message: &str) -> Option<Blocked> {
        if let Ok(mut m) = self.blocked_message.lock() {
            *m = message.to_string();
        }
        Blocked::from_u8(
            self.blocked
                .swap(b.map_or(0, |b| b as u8), Ordering::AcqRel),
        )
    }

    fn note_gap(&self, from: Lsn, to: Lsn) {
        if let Ok(mut g) = self.last_gap.lock() {
            *g = Some((from, to));
        }
        self.gaps.fetch_add(1, Ordering::AcqRel);
    }
}

/// Streams the slot into `tx` until `shutdown` fires, reconnecting after transient
/// errors. Returns `Ok` after a clean shutdown (with a final status update sent),
/// also when shutdown comes while connecting: every connect and query has a
/// timeout and watches `shutdown`. Returns at once when downstream went away.
///
/// With `retry_definite_errors`, once streaming has begun a [`Blocked`] condition
/// (slot dropped, publication dropped or re-created) is held rather than returned:
/// it is logged once as an error, shown in [`StreamState`] (so `/ready` fails and
/// clients are told), and walcast looks every few seconds whether an operator fixed
/// it — without re-reading (and re-delivering) changes in between.
pub async fn run(
    opts: ReplicationOptions,
    tx: mpsc::Sender<Item>,
    progress: Arc<Progress>,
    state: Arc<StreamState>,
    shutdown: CancellationToken,
) -> Result<(), ReplicationError> {
    let mut attempt = 0usize;
    let mut ever_streamed = false;
    // The flush rules hold across reconnects (commits handed on before one are
    // still in flight), so the tracker outlives each session.
    let mut flush = FlushTracker::new(Lsn(state.reported_flush.load(Ordering::Acquire)));
    loop {
        let mut session = Session::new(&opts, &tx, &progress, &state, &shutdown, &mut flush);
        let res = session.run(&mut ever_streamed).await;
        state.set_connected(false);
        match res {
            Ok(()) => return Ok(()),
            Err(e) => {
                let e = explain::explain(e, &opts, ever_streamed, &shutdown).await;
                if tx.is_closed() {
                    // Downstream is gone (tail's stdout closed, serve stopping).
                    return Err(e);
                }
                let blocked = matches!(e, ReplicationError::Blocked { .. });
                let retry = e.is_transient() || (ever_streamed && opts.retry_definite_errors);
                if !retry || shutdown.is_cancelled() {
                    return Err(e);
                }
                state.reconnects.fetch_add(1, Ordering::Relaxed);
                if state.disconnected_since.load(Ordering::Relaxed) == 0 {
                    state
                        .disconnected_since
                        .store(unix_secs(), Ordering::Relaxed);
                }
                if let ReplicationError::Blocked {
                    kind,
                    message,
                    slot_at,
                } = &e
                {
                    if state.set_blocked(Some(*kind), message) != Some(*kind) {
                        tracing::error!(slot = %opts.slot, publication = %opts.publication, problem = kind.as_str(), "replication blocked: {message}");
                    } else {
                        tracing::debug!(slot = %opts.slot, problem = kind.as_str(), "still blocked");
                    }
                    if *kind == Blocked::PublicationRecreated {
                        // Reconnecting would fail at the same change after handing
                        // the changes before it downstream again: wait for the slot
                        // to be advanced, dropped or re-created first.
                        if !wait_for_slot_change(&opts, *slot_at, &shutdown).await {
                            return Ok(());
                        }
                        continue;
                    }
                }
                let delay = if blocked {
                    BLOCKED_POLL
                } else {
                    BACKOFF[attempt.min(BACKOFF.len() - 1)]
                };
                attempt += 1;
                if !blocked {
                    tracing::warn!(slot = %opts.slot, error = %e, retry_in = ?delay, "replication stream lost; reconnecting");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                if ever_streamed {
                    attempt = attempt.min(1);
                }
            }
        }
    }
}

/// Waits until the slot's confirmed position is no longer `at` (an operator
/// advanced, dropped or re-created it). Returns false when shutdown came first.
async fn wait_for_slot_change(
    opts: &ReplicationOptions,
    at: Option<Lsn>,
    shutdown: &CancellationToken,
) -> bool {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(BLOCKED_POLL) => {}
        }
        let check = async {
            let sql = crate::source::tls::connect_sql(&opts.conn).await?;
            let row = tokio::time::timeout(
                QUERY_TIMEOUT,
                sql.query_opt(
                    "select confirmed_flush_lsn::text from pg_catalog.pg_replication_slots where slot_name = $1",
                    &[&opts.slot],
                ),
            )
            .await
            .map_err(|_| timed_out("reading the slot"))?
            .map_err(ReplicationError::from_sql)?;
            Ok::<_, ReplicationError>(row.map(|r| {
                r.get::<_, Option<String>>(0)
                    .and_then(|s| s.parse::<Lsn>().ok())
            }))
        };
        let res = tokio::select! {
            _ = shutdown.cancelled() => return false,
            r = check => r,
        };
        match res {
            Ok(Some(now)) if now == at => {}
            Ok(_) => return true,
            Err(e) => {
                tracing::debug!(slot = %opts.slot, error = %e, "cannot read the slot while blocked")
            }
        }
    }
}

/// A timeout while talking to PostgreSQL: transient (the next attempt may work).
pub(crate) fn timed_out(what: &str) -> ReplicationError {
    ReplicationError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("PostgreSQL did not answer in time ({what})"),
    ))
}

/// Runs `f` with `limit`, mapping a timeout to [`timed_out`].
async fn timed<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, ReplicationError>>,
) -> Result<T, ReplicationError> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| Err(timed_out(what)))
}

fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

struct Session<'a> {
    opts: &'a ReplicationOptions,
    tx: &'a mpsc::Sender<Item>,
    progress: &'a Progress,
    state: &'a StreamState,
    shutdown: &'a CancellationToken,
    assembler: Assembler,
    types: TypeCatalog,
    /// An item downstream had no room for yet.
    pending: Option<Item>,
    /// Changes of the open transaction so far (0 outside one).
    txn_changes: u64,
    /// What may be reported as flushed, and when to say it.
    flush: &'a mut FlushTracker,
}

/// The stream's next message; in a bulk transaction (`bulk`), a drained socket
/// is first given [`BULK_NAP`] to fill. Cancel-safe, as `recv` is.
async fn recv_patiently(
    conn: &mut ReplicationConnection,
    bulk: bool,
) -> Result<crate::source::conn::BackendMessage, crate::source::error::PgError> {
    if bulk {
        if let Some(msg) = futures::FutureExt::now_or_never(conn.recv()) {
            return msg;
        }
        tokio::time::sleep(BULK_NAP).await;
    }
    conn.recv().await
}

impl<'a> Session<'a> {
    fn new(
        opts: &'a ReplicationOptions,
        tx: &'a mpsc::Sender<Item>,
        progress: &'a Progress,
        state: &'a StreamState,
        shutdown: &'a CancellationToken,
        flush: &'a mut FlushTracker,
    ) -> Self {
        Session {
            opts,
            tx,
            progress,
            state,
            shutdown,
            assembler: Assembler::default(),
            types: TypeCatalog::default(),
            pending: None,
            txn_changes: 0,
            flush,
        }
    }

    async fn run(&mut self, ever_streamed: &mut bool) -> Result<(), ReplicationError> {
        let shutdown = self.shutdown;
        // Connecting and the checks before streaming: each step has a timeout, and a
        // shutdown during any of them stops at once (nothing was handed on yet).
        let started = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                tracing::info!(slot = %self.opts.slot, "shutdown requested while connecting to PostgreSQL; stopping");
                return Ok(());
            }
            r = self.start(*ever_streamed) => r?,
        };
        let (sql, mut conn, checks) = started;
        *ever_streamed = true;
        self.state.set_connected(true);
        self.state.disconnected_since.store(0, Ordering::Relaxed);
        if let Some(was) = self.state.set_blocked(None, "") {
            tracing::info!(slot = %self.opts.slot, problem = was.as_str(), "replication unblocked");
        }
        let silence_limit = checks
            .wal_sender_timeout
            .filter(|t| !t.is_zero())
            .map(|t| (t * SILENCE_TIMEOUTS).max(MIN_SILENCE_LIMIT));
        match self.stream(&mut conn, &sql, silence_limit).await {
            Ok(()) => {
                conn.close().await;
                Ok(())
            }
            Err(e) if self.tx.is_closed() => {
                // Downstream stopped (tail's reader went away): confirm what it
                // handled so a later run resumes right after it.
                self.finish(&mut conn).await;
                conn.close().await;
                Err(e)
            }
            Err(e) => Err(self.classify(&sql, e).await),
        }
    }

    /// Connects, checks, creates the slot if allowed, and starts replication.
    async fn start(
        &mut self,
        ever_streamed: bool,
    ) -> Result<
        (
            tokio_postgres::Client,
            ReplicationConnection,
            slot::Preflight,
        ),
        ReplicationError,
    > {
        tracing::debug!(slot = %self.opts.slot, "connecting to PostgreSQL");
        let sql = crate::source::tls::connect_sql(&self.opts.conn).await?;
        let checks = timed(QUERY_TIMEOUT, "checking the slot and publication", async {
            slot::preflight(&sql, self.opts).await
        })
        .await?;
        let publication_ok = checks.publication_exists;
        if !publication_ok {
            let message = format!(
                "publication {:?} does not exist in database {:?}: create it with `walcast setup --publication {} --tables …` (or CREATE PUBLICATION {} FOR TABLE …)",
                self.opts.publication, self.opts.conn.dbname, self.opts.publication, slot::quote_ident(&self.opts.publication)
            );
            return Err(if ever_streamed {
                ReplicationError::Blocked {
                    kind: Blocked::PublicationMissing,
                    message: format!("{message}; if it was dropped while changes were written, the slot may also need to be advanced past them (walcast will say so)"),
                    slot_at: None,
                }
            } else {
                ReplicationError::Setup(message)
            });
        }
        // A missing slot is created only at the first start (or for a temporary
        // slot, which never outlives a connection). Once walcast has streamed from
        // it, a missing slot means everything committed since is lost: that is for
        // an operator to decide, and walcast reports it as a gap.
        let may_create = self.opts.temporary || (self.opts.create_slot && !ever_streamed);
        if checks.slot.is_none() && !may_create {
            return Err(if ever_streamed {
                ReplicationError::Blocked {
                    kind: Blocked::SlotMissing,
                    message: format!(
                        "replication slot {:?} was dropped while walcast was streaming from it: changes committed since are not recoverable. walcast does not re-create it on its own; to go on, create it (`walcast setup --publication {} --slot {} --create-slot`) and walcast resumes from the new slot, reporting the gap to clients",
                        self.opts.slot, self.opts.publication, self.opts.slot
                    ),
                    slot_at: None,
                }
            } else {
                ReplicationError::Setup(format!(
                    "replication slot {:?} does not exist: create it with `walcast setup --publication {} --slot {} --create-slot`, or pass --create-slot",
                    self.opts.slot, self.opts.publication, self.opts.slot
                ))
            });
        }
        let mut conn = timed(
            CONNECT_TIMEOUT,
            "opening the replication connection",
            ReplicationConnection::connect(&self.opts.conn),
        )
        .await?;
        // IDENTIFY_SYSTEM: the server's identity and position, logged so an operator can
        // tell which cluster and timeline a stream came from.
        let ident = timed(
            QUERY_TIMEOUT,
            "IDENTIFY_SYSTEM",
            conn.simple_query("IDENTIFY_SYSTEM"),
        )
        .await?;
        let system_id = match ident.first().map(|r| r.as_slice()) {
            Some([Some(system), Some(timeline), Some(xlogpos), ..]) => {
                tracing::info!(
                slot = %self.opts.slot,
                system = %system,
                timeline = %timeline,
                xlogpos = %xlogpos,
                server_version = %conn.server_version,
                "connected for replication"
                );
                system.clone()
            }
            _ => {
                return Err(ReplicationError::Protocol(
                    "IDENTIFY_SYSTEM returned no row".into(),
                ))
            }
        };
        // Where walcast was: what it last reported, or downstream handled since.
        let last =
            Lsn(self.state.reported_flush.load(Ordering::Acquire)).max(self.progress.confirmed());
        let slot_confirmed = match &checks.slot {
            None => {
                // Slot creation waits for open transactions: no timeout (the caller
                // watches shutdown).
                let at = slot::create_slot(&mut conn, &self.opts.slot, self.opts.temporary).await?;
                tracing::info!(slot = %self.opts.slot, temporary = self.opts.temporary, "created replication slot");
                if ever_streamed && last > Lsn::ZERO && at > last {
                    self.gap(last, at);
                }
                self.state.reported_flush.fetch_max(at.0, Ordering::AcqRel);
                self.flush.connected(at, checks.wal_sender_timeout);
                at
            }
            Some(s) => {
                if ever_streamed && last > Lsn::ZERO && s.confirmed_flush > last {
                    self.gap(last, s.confirmed_flush);
                }
                // The position streaming resumes from is where walcast is now,
                // also before its first status update.
                self.state
                    .reported_flush
                    .fetch_max(s.confirmed_flush.0, Ordering::AcqRel);
                self.flush
                    .connected(s.confirmed_flush, checks.wal_sender_timeout);
                s.confirmed_flush
            }
        };
        // Downstream learns the stream's source before its first transaction.
        let start_item = Item::Stream(StreamStart {
            system_id,
            slot: self.opts.slot.clone(),
            slot_confirmed,
        });
        if self.tx.send(start_item).await.is_err() {
            return Err(ReplicationError::Protocol("downstream closed".into()));
        }
        // On a reconnect, start after what downstream already handled: the server
        // skips transactions that committed before the requested position, so a
        // change handled but not yet confirmed to the server (the connection broke
        // first) is not delivered twice. The server never goes back before the
        // slot's confirmed position.
        let start = self
            .opts
            .start_lsn
            .unwrap_or(Lsn::ZERO)
            .max(self.progress.confirmed());
        let command =
            protocol::start_replication_command(self.opts, start, checks.server_version_num);
        timed(
            QUERY_TIMEOUT,
            "START_REPLICATION",
            conn.start_replication(&command),
        )
        .await?;
        tracing::info!(slot = %self.opts.slot, publication = %self.opts.publication, start = %start, "streaming");
        Ok((sql, conn, checks))
    }

    /// The slot is past the position walcast had confirmed: it was re-created or
    /// advanced, and the changes in between were never delivered.
    fn gap(&mut self, from: Lsn, to: Lsn) {
        tracing::error!(
            slot = %self.opts.slot,
            from = %from,
            to = %to,
            "replication gap: the slot was re-created or advanced past the position walcast had confirmed; changes committed between these positions were not delivered"
        );
        self.state.note_gap(from, to);
    }

    /// Turns "does not exist" (SQLSTATE 42704) from the walsender into what it
    /// means, by looking at the catalog now: the slot gone, the publication gone,
    /// or the publication re-created after changes the slot still has to decode.
    async fn classify(
        &self,
        sql: &tokio_postgres::Client,
        e: ReplicationError,
    ) -> ReplicationError {
        if e.sqlstate() != Some("42704") {
            return e;
        }
        let facts = tokio::time::timeout(QUERY_TIMEOUT, async {
            sql.query_one(
                "select exists (select 1 from pg_catalog.pg_publication where pubname = $1),                         (select confirmed_flush_lsn::text from pg_catalog.pg_replication_slots where slot_name = $2),                         exists (select 1 from pg_catalog.pg_replication_slots where slot_name = $2),                         pg_current_wal_lsn()::text",
                &[&self.opts.publication, &self.opts.slot],
            )
            .await
        })
        .await;
        let Ok(Ok(row)) = facts else {
            return e;
        };
        let publication_exists: bool = row.get(0);
        let slot_at: Option<Lsn> = row.get::<_, Option<String>>(1).and_then(|s| s.parse().ok());
        let slot_exists: bool = row.get(2);
        let current: String = row.get(3);
        let (o, at) = (self.opts, slot_at.unwrap_or(Lsn::ZERO));
        if !slot_exists {
            return ReplicationError::Blocked {
                kind: Blocked::SlotMissing,
                message: format!(
                    "replication slot {:?} does not exist any more ({e}): create it (`walcast setup --publication {} --slot {} --create-slot`) and walcast resumes from the new slot, reporting the gap",
                    o.slot, o.publication, o.slot
                ),
                slot_at: None,
            };
        }
        if !publication_exists {
            return ReplicationError::Blocked {
                kind: Blocked::PublicationMissing,
                message: format!(
                    "publication {:?} does not exist: it was dropped ({e}); create it again with `walcast setup --publication {} --tables …`; if changes were written while it was missing, the slot must then be advanced past them (walcast will say so)",
                    o.publication, o.publication
                ),
                slot_at,
            };
        }
        ReplicationError::Blocked {
            kind: Blocked::PublicationRecreated,
            message: format!(
                "publication {pubname:?} was dropped and re-created while slot {slot:?} still had changes from before to decode, so PostgreSQL cannot decode the slot past them ({e}). walcast holds here instead of re-delivering the same changes on every retry. To go on, either skip the undecodable changes: select pg_replication_slot_advance('{slot}', '{current}') (changes between {at} and {current} are then not delivered; walcast reports the gap), or re-create the slot: `walcast teardown --slot {slot} --force`, then `walcast setup --publication {pubname} --slot {slot} --create-slot`",
                pubname = o.publication,
                slot = o.slot,
            ),
            slot_at,
        }
    }

    /// The CopyBoth loop: reads the stream, hands items downstream, sends status updates.
    async fn stream(
        &mut self,
        conn: &mut ReplicationConnection,
        sql: &tokio_postgres::Client,
        silence_limit: Option<Duration>,
    ) -> Result<(), ReplicationError> {
        // One timer for the whole stream, moved to the tracker's next due time.
        let status_timer =
            tokio::time::sleep_until(self.flush.next_status().unwrap_or_else(Instant::now));
        tokio::pin!(status_timer);
        let mut last_heard = Instant::now();
        // Set once shutdown began while a transaction was in flight.
        let mut drain_until: Option<Instant> = None;
        loop {
            if drain_until.is_some() && !self.flush.in_transaction() && self.pending.is_none() {
                self.finish(conn).await;
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled(), if drain_until.is_none() => {
                    // A transaction in flight is read to its Commit first (its
                    // changes may already be on clients' screens), so that
                    // shutdown confirms it; bounded.
                    if !self.flush.in_transaction() && self.pending.is_none() {
                        self.finish(conn).await;
                        return Ok(());
                    }
                    drain_until = Some(Instant::now() + SHUTDOWN_DRAIN_DEADLINE);
                }
                () = sleep_until_opt(drain_until) => {
                    self.finish(conn).await;
                    return Ok(());
                }
                _ = self.tx.closed() => return Err(closed()),
                () = &mut status_timer => {
                    let now = Instant::now();
                    // An answer to the server may have moved the next update on.
                    if self.flush.status_due(now) {
                        if let Some(limit) = silence_limit.filter(|l| self.pending.is_none() && last_heard.elapsed() > *l) {
                            return Err(ReplicationError::Io(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("the server sent nothing for {}s (not even a keepalive)", limit.as_secs()),
                            )));
                        }
                        timed(QUERY_TIMEOUT, "sending a status update", self.send_status(conn, StatusReason::Periodic)).await?;
                    }
                    let next = self.flush.next_status().unwrap_or(now);
                    status_timer.as_mut().reset(next);
                }
                permit = self.tx.reserve(), if self.pending.is_some() => {
                    let permit = permit.map_err(|_| closed())?;
                    if let Some(item) = self.pending.take() {
                        let end = commit_end(&item);
                        permit.send(item);
                        self.flush.waiting(false);
                        if let Some(end) = end {
                            self.flush.handed_commit(end);
                        }
                    }
                    last_heard = Instant::now();
                }
                msg = recv_patiently(conn, self.txn_changes >= BULK_CHANGES), if self.pending.is_none() => {
                    let msg = msg?;
                    last_heard = Instant::now();
                    self.handle(conn, sql, msg).await?;
                }
            }
        }
    }

    async fn handle(
        &mut self,
        conn: &mut ReplicationConnection,
        sql: &tokio_postgres::Client,
        msg: crate::source::conn::BackendMessage,
    ) -> Result<(), ReplicationError> {
        match msg.tag {
            b'd' => match ReplicationMessage::parse(&msg.body)
                .map_err(|e| ReplicationError::Protocol(e.to_string()))?
            {
                ReplicationMessage::XLogData { start, data, .. } => {
                    self.flush.received(start);
                    self.state.received.fetch_max(start.0, Ordering::Relaxed);
                    let m = match pgoutput::decode(&data) {
                        Ok(m) => m,
                        Err(e) => {
                            self.state.decode_errors.fetch_add(1, Ordering::Relaxed);
                            return Err(e.into());
                        }
                    };
                    if let Message::Relation(r) = &m {
                        timed(QUERY_TIMEOUT, "looking up column types", async {
                            self.types
                                .ensure(sql, r.columns.iter().map(|c| c.type_oid))
                                .await
                                .map_err(ReplicationError::from_sql)
                        })
                        .await?;
                    }
                    if let Some(item) = self.assembler.apply(m, &mut self.types)? {
                        self.note_decoded(&item);
                        let end = commit_end(&item);
                        match self.tx.try_send(item) {
                            Ok(()) => {
                                if let Some(end) = end {
                                    self.flush.handed_commit(end);
                                }
                            }
                            Err(mpsc::error::TrySendError::Full(item)) => {
                                self.pending = Some(item);
                                self.flush.waiting(true);
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => return Err(closed()),
                        }
                    }
                    Ok(())
                }
                ReplicationMessage::PrimaryKeepalive {
                    wal_end,
                    reply_requested,
                    ..
                } => {
                    self.state.received.fetch_max(wal_end.0, Ordering::Relaxed);
                    if self.flush.keepalive(wal_end, reply_requested) {
                        self.send_status(conn, StatusReason::Requested).await?;
                    }
                    Ok(())
                }
            },
            b'E' => Err(ReplicationError::Server(ServerError::parse(&msg.body))),
            b'N' => {
                let n = ServerError::parse(&msg.body);
                tracing::info!(notice = %n.message, "server notice");
                Ok(())
            }
            // CopyDone, or CommandComplete without one: a walsender ends the stream
            // this way when PostgreSQL shuts down (`pg_ctl restart -m fast`). Routine:
            // reconnect.
            b'c' | b'C' => Err(ReplicationError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server ended the replication stream (PostgreSQL shutting down or restarting?)",
            ))),
            other => Err(ReplicationError::Protocol(format!(
                "unexpected message {:?} in the replication stream",
                char::from(other)
            ))),
        }
    }

    /// An item came out of the assembler: the tracker learns of transaction
    /// boundaries, the stream state of commits.
    fn note_decoded(&mut self, item: &Item) {
        match item {
            Item::Begin(_) => {
                self.txn_changes = 0;
                self.flush.begin()
            }
            Item::Change(_) | Item::Truncate(_) => self.txn_changes += 1,
            Item::Commit { end_lsn, info } => {
                self.txn_changes = 0;
                self.flush.commit();
                self.state
                    .last_commit_unix_micros
                    .store(info.commit_time.unix_micros(), Ordering::Relaxed);
                self.state.transactions.fetch_add(1, Ordering::Relaxed);
                self.state
                    .handed_commit_end
                    .fetch_max(end_lsn.0, Ordering::Release);
            }
            _ => {}
        }
    }

    async fn send_status(
        &mut self,
        conn: &mut ReplicationConnection,
        reason: StatusReason,
    ) -> Result<(), ReplicationError> {
        let update = self.flush.status(
            self.progress.confirmed(),
            reason,
            Instant::now(),
            protocol::pg_timestamp(SystemTime::now()),
        );
        self.state
            .reported_flush
            .store(update.flush.0, Ordering::Release);
        conn.send_copy_data(&update.encode()).await
    }

    /// Shutdown: stop reading, give downstream a moment to confirm what it has, report it.
    async fn finish(&mut self, conn: &mut ReplicationConnection) {
        tokio::select! {
            () = self.progress.reached(self.flush.last_handed_commit()) => {}
            // Downstream went away: nothing more will be confirmed.
            () = self.tx.closed() => {}
            () = tokio::time::sleep(SHUTDOWN_DRAIN_DEADLINE) => {}
        }
        let sent = tokio::time::timeout(
            Duration::from_secs(2),
            self.send_status(conn, StatusReason::Final),
        )
        .await
        .unwrap_or_else(|_| Err(timed_out("the final status update")));
        if let Err(e) = sent {
            tracing::warn!(error = %e, "final status update failed");
        } else {
            tracing::info!(flush = %self.flush.reported(), "confirmed on shutdown");
        }
    }
}

/// Sleeps until `at`, or for ever without one.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The end LSN of a Commit item.
fn commit_end(item: &Item) -> Option<Lsn> {
    match item {
        Item::Commit { end_lsn, .. } => Some(*end_lsn),
        _ => None,
    }
}

fn closed() -> ReplicationError {
    ReplicationError::Io(std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "downstream stopped",
    ))
}
