//! Consuming a logical replication slot with `pgoutput`.
//!
//! Implements the "Streaming Replication Protocol" and "Logical Streaming
//! Replication Protocol" chapters of the PostgreSQL documentation: a connection
//! with `replication=database`, `START_REPLICATION SLOT … LOGICAL … (proto_version
//! '1', publication_names '…', messages 'true')`, then a CopyBoth stream of
//! `XLogData` ('w') and primary keepalive ('k') messages from the server, answered
//! with standby status updates ('r').
//!
//! # Progress tracking: what the flush LSN means
//!
//! The flush LSN walcast reports is a promise: everything before it has been
//! handled and need never be sent again. PostgreSQL then lets the slot release
//! the WAL before it. walcast keeps that promise like this:
//!
//! - pgoutput without `streaming` sends each transaction only after it committed,
//!   whole, in commit order. The stream hands every item downstream through a
//!   bounded channel; the consumer (the hub, or `tail`'s printer) calls
//!   [`Progress::confirm`] with a transaction's `end_lsn` only once every change of
//!   it has been handed on (printed, or given to the hub).
//! - When nothing is in flight — no open transaction, nothing waiting for the
//!   channel, every sent commit confirmed — the `wal_end` of the latest keepalive
//!   is confirmed too. The walsender sends keepalives for WAL it decoded but did
//!   not publish (other tables, other databases), so a slot whose tables are quiet
//!   while others are busy does not pin WAL (the most common CDC bug). Every
//!   periodic status update asks for a keepalive (`reply = 1`) so this happens
//!   promptly even when the server has no reason to send one.
//! - Reported LSNs never go backwards.
//! - Status updates go out on a timer (at most half of `wal_sender_timeout`, read
//!   from the server) and whenever the server asks, also while downstream is full.
//!
//! # Resume
//!
//! `START_REPLICATION … 0/0` makes the server start from the slot's
//! `confirmed_flush_lsn`. After a crash or reconnect a transaction may be delivered
//! again (if it was handled but not yet confirmed), never skipped. Every event
//! carries its commit LSN so clients can de-duplicate.
//!
//! # Backpressure
//!
//! When the channel is full the stream stops reading the socket (the walsender
//! then blocks on its send buffer) but keeps sending status updates, so the
//! server does not time the connection out.

pub mod conn;
pub mod slot;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, BytesMut};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::PgConnInfo;
use crate::event::Item;
use crate::lsn::Lsn;
use crate::pgoutput::{self, DecodeError, Message};
use crate::relation::{Assembler, FramingError, TypeCatalog};
use conn::{ReplicationConnection, ServerError};

/// Longest pause between standby status updates, whatever `wal_sender_timeout` is.
const MAX_STATUS_INTERVAL: Duration = Duration::from_secs(10);

/// How long shutdown waits for downstream to confirm what it was handed.
const SHUTDOWN_DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Reconnect delays after a transient error; the last repeats.
const BACKOFF: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
];

/// What to stream from where.
#[derive(Clone, Debug)]
pub struct ReplicationOptions {
    pub conn: PgConnInfo,
    pub slot: String,
    pub publication: String,
    /// Create the slot when it does not exist.
    pub create_slot: bool,
    /// Create a temporary slot (dropped by the server when the connection ends).
    pub temporary: bool,
    /// Start from this LSN instead of the slot's confirmed position.
    pub start_lsn: Option<Lsn>,
    /// Keep retrying on errors that need an operator (slot dropped, …) once streaming
    /// has begun, instead of returning them. Errors at the first connect always return.
    pub retry_definite_errors: bool,
}

/// Shared between the stream and its consumer: how far downstream has handled the stream.
#[derive(Debug, Default)]
pub struct Progress {
    confirmed: AtomicU64,
}

impl Progress {
    /// Marks everything up to `lsn` (a commit's end LSN) as handled.
    pub fn confirm(&self, lsn: Lsn) {
        self.confirmed.fetch_max(lsn.0, Ordering::AcqRel);
    }

    pub fn confirmed(&self) -> Lsn {
        Lsn(self.confirmed.load(Ordering::Acquire))
    }
}

/// Live facts about the stream, read by metrics and health checks.
#[derive(Debug, Default)]
pub struct StreamState {
    pub connected: AtomicBool,
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
}

/// Why streaming stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("replication connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("{0}")]
    Setup(String),
    #[error("PostgreSQL: {0}")]
    Server(ServerError),
    #[error("SQL connection: {0}")]
    Sql(String),
    /// TLS could not be set up as `sslmode` asks (definite: the message says what to change).
    #[error("TLS: {0}")]
    Tls(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("cannot decode pgoutput message: {0}")]
    Decode(#[from] DecodeError),
    #[error("broken replication stream: {0}")]
    Framing(#[from] FramingError),
}

impl ReplicationError {
    /// Whether retrying may help without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Connect { .. } | ReplicationError::Io(_) => true,
            ReplicationError::Sql(_) => true,
            // 57P01 admin shutdown, 57P03 cannot connect now, 53300 too many connections,
            // 55006 slot in use (the previous session may still be going away), 08*: connection.
            ReplicationError::Server(e) => {
                matches!(e.code.as_str(), "57P01" | "57P02" | "57P03" | "53300")
                    || e.code.starts_with("08")
            }
            _ => false,
        }
    }

    pub(crate) fn from_sql(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            return ReplicationError::Server(ServerError {
                severity: db.severity().to_string(),
                code: db.code().code().to_string(),
                message: db.message().to_string(),
                detail: db.detail().map(str::to_string),
                hint: db.hint().map(str::to_string),
            });
        }
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        ReplicationError::Sql(msg)
    }

    /// Rewrites server errors that an operator can fix into instructions.
    fn explain(self, opts: &ReplicationOptions) -> Self {
        let ReplicationError::Server(e) = &self else {
            return self;
        };
        let m = &e.message;
        if m.contains("publication") && m.contains("does not exist") {
            return ReplicationError::Setup(format!(
                "publication {:?} does not exist (it may have been dropped): create it with `walcast setup --publication {} --tables …` or CREATE PUBLICATION",
                opts.publication, opts.publication
            ));
        }
        if m.contains("replication slot") && m.contains("does not exist") {
            return ReplicationError::Setup(format!(
                "replication slot {:?} does not exist (it may have been dropped): create it with `walcast setup --publication {} --slot {} --create-slot` or run with --create-slot; changes made while it did not exist are not recoverable",
                opts.slot, opts.publication, opts.slot
            ));
        }
        if e.code == "55006" || m.contains("is active for PID") {
            return ReplicationError::Setup(format!(
                "replication slot {:?} is already in use by another connection ({m}): stop the other consumer, or give this walcast its own slot with --slot",
                opts.slot
            ));
        }
        if m.contains("wal_level") {
            return ReplicationError::Setup(slot::WAL_LEVEL_HELP.to_string());
        }
        if m.contains("can no longer get changes") || m.contains("invalidated") {
            return ReplicationError::Setup(format!(
                "replication slot {:?} was invalidated because the WAL it needed was removed (max_slot_wal_keep_size): drop and recreate it; changes since its confirmed position are lost ({m})",
                opts.slot
            ));
        }
        self
    }
}

/// Streams the slot into `tx` until `shutdown` fires, reconnecting after transient
/// errors. Returns `Ok` after a clean shutdown (with a final status update sent).
pub async fn run(
    opts: ReplicationOptions,
    tx: mpsc::Sender<Item>,
    progress: Arc<Progress>,
    state: Arc<StreamState>,
    shutdown: CancellationToken,
) -> Result<(), ReplicationError> {
    let mut attempt = 0usize;
    let mut ever_streamed = false;
    loop {
        let mut session = Session::new(&opts, &tx, &progress, &state, &shutdown);
        let res = session.run(&mut ever_streamed).await;
        state.connected.store(false, Ordering::Release);
        match res {
            Ok(()) => return Ok(()),
            Err(e) => {
                let e = e.explain(&opts);
                let retry = e.is_transient() || (ever_streamed && opts.retry_definite_errors);
                if !retry || shutdown.is_cancelled() {
                    return Err(e);
                }
                let delay = BACKOFF[attempt.min(BACKOFF.len() - 1)];
                attempt += 1;
                state.reconnects.fetch_add(1, Ordering::Relaxed);
                if state.disconnected_since.load(Ordering::Relaxed) == 0 {
                    state
                        .disconnected_since
                        .store(unix_secs(), Ordering::Relaxed);
                }
                tracing::warn!(slot = %opts.slot, error = %e, retry_in = ?delay, "replication stream lost; reconnecting");
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

fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Microseconds since 2000-01-01, the clock in status updates.
fn pg_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64 - 946_684_800_000_000)
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
    /// End LSN of the last commit handed downstream.
    last_sent_commit_end: Lsn,
    /// `wal_end` of the last keepalive received while nothing was in flight.
    idle_end: Lsn,
    received: Lsn,
    reported: Lsn,
}

impl<'a> Session<'a> {
    fn new(
        opts: &'a ReplicationOptions,
        tx: &'a mpsc::Sender<Item>,
        progress: &'a Progress,
        state: &'a StreamState,
        shutdown: &'a CancellationToken,
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
            last_sent_commit_end: Lsn::ZERO,
            idle_end: Lsn::ZERO,
            received: Lsn::ZERO,
            reported: Lsn(state.reported_flush.load(Ordering::Acquire)),
        }
    }

    async fn run(&mut self, ever_streamed: &mut bool) -> Result<(), ReplicationError> {
        let sql = crate::tls::connect_sql(&self.opts.conn).await?;
        let checks = slot::preflight(&sql, self.opts).await?;
        let mut conn = ReplicationConnection::connect(&self.opts.conn).await?;
        // IDENTIFY_SYSTEM: the server's identity and position, logged so an operator can
        // tell which cluster and timeline a stream came from.
        let ident = conn.simple_query("IDENTIFY_SYSTEM").await?;
        match ident.first().map(|r| r.as_slice()) {
            Some([Some(system), Some(timeline), Some(xlogpos), ..]) => tracing::info!(
                slot = %self.opts.slot,
                system = %system,
                timeline = %timeline,
                xlogpos = %xlogpos,
                server_version = %conn.server_version,
                "connected for replication"
            ),
            _ => {
                return Err(ReplicationError::Protocol(
                    "IDENTIFY_SYSTEM returned no row".into(),
                ))
            }
        }
        if checks.slot.is_none() {
            slot::create_slot(&mut conn, &self.opts.slot, self.opts.temporary).await?;
            tracing::info!(slot = %self.opts.slot, temporary = self.opts.temporary, "created replication slot");
        }
        if let Some(s) = &checks.slot {
            self.reported = self.reported.max(s.confirmed_flush);
        }
        let start = self.opts.start_lsn.unwrap_or(Lsn::ZERO);
        let mut options = format!(
            "proto_version '1', publication_names {}",
            slot::quote_literal(&slot::quote_ident(&self.opts.publication))
        );
        if checks.server_version_num >= 140_000 {
            options.push_str(", messages 'true'");
        }
        conn.start_replication(&format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({})",
            slot::quote_ident(&self.opts.slot),
            start,
            options
        ))
        .await?;
        *ever_streamed = true;
        self.state.connected.store(true, Ordering::Release);
        self.state.disconnected_since.store(0, Ordering::Relaxed);
        tracing::info!(slot = %self.opts.slot, publication = %self.opts.publication, start = %start, "streaming");

        let interval = checks
            .wal_sender_timeout
            .filter(|t| !t.is_zero())
            .map(|t| (t / 2).min(MAX_STATUS_INTERVAL))
            .unwrap_or(MAX_STATUS_INTERVAL)
            .max(Duration::from_millis(100));
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    self.finish(&mut conn).await;
                    conn.close().await;
                    return Ok(());
                }
                _ = ticker.tick() => {
                    self.send_status(&mut conn, true).await?;
                }
                permit = self.tx.reserve(), if self.pending.is_some() => {
                    let permit = permit.map_err(|_| closed())?;
                    if let Some(item) = self.pending.take() {
                        permit.send(item);
                    }
                }
                msg = conn.recv(), if self.pending.is_none() => {
                    let msg = msg?;
                    self.handle(&mut conn, &sql, msg).await?;
                }
            }
        }
    }

    async fn handle(
        &mut self,
        conn: &mut ReplicationConnection,
        sql: &tokio_postgres::Client,
        msg: conn::BackendMessage,
    ) -> Result<(), ReplicationError> {
        match msg.tag {
            b'd' => {
                let mut body = msg.body;
                if body.is_empty() {
                    return Err(ReplicationError::Protocol("empty CopyData".into()));
                }
                match body[0] {
                    b'w' => {
                        if body.len() < 25 {
                            return Err(ReplicationError::Protocol("short XLogData".into()));
                        }
                        body.advance(1);
                        let start = Lsn(body.get_u64());
                        let _end = body.get_u64();
                        let _sent = body.get_i64();
                        self.received = self.received.max(start);
                        self.state.received.fetch_max(start.0, Ordering::Relaxed);
                        let m = match pgoutput::decode(&body) {
                            Ok(m) => m,
                            Err(e) => {
                                self.state.decode_errors.fetch_add(1, Ordering::Relaxed);
                                return Err(e.into());
                            }
                        };
                        if let Message::Relation(r) = &m {
                            self.types
                                .ensure(sql, r.columns.iter().map(|c| c.type_oid))
                                .await
                                .map_err(ReplicationError::from_sql)?;
                        }
                        if let Some(item) = self.assembler.apply(m, &mut self.types)? {
                            self.note_sent(&item);
                            match self.tx.try_send(item) {
                                Ok(()) => {}
                                Err(mpsc::error::TrySendError::Full(item)) => {
                                    self.pending = Some(item)
                                }
                                Err(mpsc::error::TrySendError::Closed(_)) => return Err(closed()),
                            }
                        }
                        Ok(())
                    }
                    b'k' => {
                        if body.len() < 18 {
                            return Err(ReplicationError::Protocol("short keepalive".into()));
                        }
                        body.advance(1);
                        let wal_end = Lsn(body.get_u64());
                        let _time = body.get_i64();
                        let reply = body.get_u8() == 1;
                        self.received = self.received.max(wal_end);
                        self.state.received.fetch_max(wal_end.0, Ordering::Relaxed);
                        if !self.assembler.in_transaction() && self.pending.is_none() {
                            self.idle_end = self.idle_end.max(wal_end);
                        }
                        if reply {
                            self.send_status(conn, false).await?;
                        }
                        Ok(())
                    }
                    other => Err(ReplicationError::Protocol(format!(
                        "unknown CopyData message {:?}",
                        char::from(other)
                    ))),
                }
            }
            b'E' => Err(ReplicationError::Server(ServerError::parse(&msg.body))),
            b'N' => {
                let n = ServerError::parse(&msg.body);
                tracing::info!(notice = %n.message, "server notice");
                Ok(())
            }
            b'c' => Err(ReplicationError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server ended the replication stream",
            ))),
            other => Err(ReplicationError::Protocol(format!(
                "unexpected message {:?} in the replication stream",
                char::from(other)
            ))),
        }
    }

    fn note_sent(&mut self, item: &Item) {
        if let Item::Commit { end_lsn, info } = item {
            self.last_sent_commit_end = self.last_sent_commit_end.max(*end_lsn);
            self.state
                .last_commit_unix_micros
                .store(info.commit_time.unix_micros(), Ordering::Relaxed);
            self.state.transactions.fetch_add(1, Ordering::Relaxed);
            self.state
                .handed_commit_end
                .fetch_max(end_lsn.0, Ordering::Release);
        }
    }

    /// The LSN it is safe to report as flushed now (see the module docs).
    fn flush_lsn(&self) -> Lsn {
        let confirmed = self.progress.confirmed();
        let mut flush = confirmed;
        if !self.assembler.in_transaction()
            && self.pending.is_none()
            && confirmed >= self.last_sent_commit_end
        {
            flush = flush.max(self.idle_end);
        }
        flush.max(self.reported)
    }

    async fn send_status(
        &mut self,
        conn: &mut ReplicationConnection,
        request_reply: bool,
    ) -> Result<(), ReplicationError> {
        let flush = self.flush_lsn();
        self.reported = flush;
        self.state.reported_flush.store(flush.0, Ordering::Release);
        let mut b = BytesMut::with_capacity(34);
        b.put_u8(b'r');
        b.put_u64(self.received.max(flush).0);
        b.put_u64(flush.0);
        b.put_u64(flush.0);
        b.put_i64(pg_now());
        b.put_u8(u8::from(request_reply));
        conn.send_copy_data(&b).await
    }

    /// Shutdown: stop reading, give downstream a moment to confirm what it has, report it.
    async fn finish(&mut self, conn: &mut ReplicationConnection) {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN_DEADLINE;
        while self.progress.confirmed() < self.last_sent_commit_end
            && tokio::time::Instant::now() < deadline
            && !self.tx.is_closed()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Err(e) = self.send_status(conn, false).await {
            tracing::warn!(error = %e, "final status update failed");
        } else {
            tracing::info!(flush = %self.reported, "confirmed on shutdown");
        }
    }
}

fn closed() -> ReplicationError {
    ReplicationError::Io(std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "downstream stopped",
    ))
}
