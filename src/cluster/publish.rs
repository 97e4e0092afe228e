//! The relay's publishing stage: what the slot gives, as JetStream messages.
//!
//! What it promises (DESIGN.md §2, "Scale-out"):
//!
//! - **Acknowledged before confirmed.** A transaction's end LSN is handed to
//!   [`Progress::confirm`] only once JetStream acknowledged every message of it
//!   and of every transaction before it, so PostgreSQL keeps (and resends after a
//!   crash or a takeover) whatever the stream could still lose.
//! - **Once in the stream.** A message holds a run of consecutive entries of one
//!   transaction and table (see [`super::wire`]; where a run ends depends only
//!   on the transaction) and carries `Nats-Msg-Id` from its commit LSN and first
//!   position ([`super::wire::Key::msg_id`]): a republished change (a standby
//!   resuming from `confirmed_flush_lsn`, a reconnect) is dropped by the
//!   stream's duplicate window.
//! - **In order.** Messages are pipelined (at most `max_in_flight` unacknowledged),
//!   each with `Nats-Expected-Last-Msg-Id` naming the one before, so a message that
//!   overtakes a lost predecessor (a connection dropped under a full pipeline) is
//!   refused rather than stored out of order. After any failure the stage stops
//!   reading, lets every outstanding publish settle, then sends again, one at a
//!   time and without the expectation, everything not acknowledged — in order.
//! - **Backpressure, never a drop.** While NATS is slow or down the stage does not
//!   take items; the slot's channel fills and the replication session stops
//!   reading the slot while it goes on answering keepalives.

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::Context;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::wire::{self, Key, Source};
use super::ClusterStats;
use crate::decode::event::{Change, Item};
use crate::lsn::Lsn;
use crate::source::session::Progress;

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

/// Bytes of published, unacknowledged messages at most (besides
/// `max_in_flight` messages): a message holds up to ~64 KB of changes.
const MAX_IN_FLIGHT_BYTES: usize = 32 << 20;

/// Longest pause between two attempts to publish while NATS fails.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// One message (or a commit with nothing to publish) in publish order.
struct Out {
    /// None: a transaction that published nothing; only its confirmation.
    msg: Option<(String, String, Bytes)>,
    /// The end LSN to confirm once this and everything before it is acknowledged.
    confirm: Option<Lsn>,
    ack: Option<AckFuture>,
    acked: bool,
}

/// The message being filled: consecutive entries of the open transaction, of
/// one table (`Some(relation id)`) or logical decoding messages (`None`). Held
/// until an entry that does not fit or the commit shows where it ends.
struct Open {
    table: Option<crate::decode::pgoutput::RelId>,
    subject: String,
    batch: wire::Batch,
}

struct Publisher {
    js: Context,
    prefix: String,
    max_in_flight: usize,
    progress: Arc<Progress>,
    stats: Arc<ClusterStats>,
    source: Source,
    /// Position of the next entry in the open transaction.
    pos: u32,
    open: Option<Open>,
    queue: VecDeque<Out>,
    /// Id of the last message published in order (the next one expects it).
    last_id: Option<String>,
    /// A publish failed: settle and resend before reading more.
    resync: bool,
    /// Entries of `queue` whose acknowledgement is awaited (`ack` is Some).
    unacked: usize,
    /// Payload bytes of the messages in `queue`.
    queued_bytes: usize,
    /// Per table (the decoder's `Arc`): its subject and its encoding, made once.
    tables: std::collections::HashMap<crate::decode::pgoutput::RelId, TableOut>,
}

/// What every message of one table carries, made once per table version.
struct TableOut {
    table: Arc<crate::decode::relation::Table>,
    subject: String,
    encoded: Vec<u8>,
}

/// Runs until `items` closes (then waits for what is in flight) or `stop` fires.
pub async fn run(
    js: Context,
    cfg: crate::config::ClusterConfig,
    mut items: mpsc::Receiver<Item>,
    progress: Arc<Progress>,
    stats: Arc<ClusterStats>,
    stop: CancellationToken,
) {
    let mut p = Publisher {
        js,
        prefix: cfg.subject_prefix.clone(),
        max_in_flight: cfg.max_in_flight,
        progress,
        stats,
        source: Source::default(),
        pos: 0,
        open: None,
        queue: VecDeque::new(),
        last_id: None,
        resync: false,
        unacked: 0,
        queued_bytes: 0,
        tables: std::collections::HashMap::new(),
    };
    let mut open = true;
    loop {
        p.settle_front();
        if p.resync {
            if !p.resend(&stop).await {
                return;
            }
            continue;
        }
        if !open && p.queue.is_empty() {
            return;
        }
        let room = p.queue.len() < p.max_in_flight && p.queued_bytes < MAX_IN_FLIGHT_BYTES;
        let front = p.queue.front_mut().and_then(|o| o.ack.as_mut());
        let has_front = front.is_some();
        let front_ack = async move {
            match front {
                Some(f) => f.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = front_ack, if has_front => p.front_done(r),
            item = items.recv(), if open && room => match item {
                Some(item) => p.item(item).await,
                None => open = false,
            },
        }
    }
}

impl Open {
    /// Whether the next entry, of `table` (None: a message), may join this one.
    fn fits(&self, table: Option<crate::decode::pgoutput::RelId>) -> bool {
        self.table == table && self.batch.has_room()
    }
}

impl Publisher {
    fn settle_front(&mut self) {
        while self.queue.front().is_some_and(|o| o.acked) {
            let o = self.queue.pop_front().expect("front");
            self.queued_bytes -= o.msg.as_ref().map_or(0, |m| m.2.len());
            if let Some(lsn) = o.confirm {
                self.progress.confirm(lsn);
            }
        }
        self.stats
            .in_flight
            .store(self.unacked as i64, Ordering::Relaxed);
    }

    fn front_done(&mut self, r: Result<PublishAck, PublishError>) {
        let Some(front) = self.queue.front_mut() else {
            return;
        };
        if front.ack.take().is_some() {
            self.unacked -= 1;
        }
        match r {
            Ok(ack) => {
                front.acked = true;
                if ack.duplicate {
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => self.failed(&e.to_string()),
        }
    }

    fn failed(&mut self, why: &str) {
        self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
        if !self.resync {
            tracing::warn!("publishing to JetStream failed: {why}; stopped reading the slot until the stream acknowledges again");
        }
        self.resync = true;
    }

    async fn item(&mut self, item: Item) {
        match item {
            Item::Stream(s) => {
                // A new session: relation ids are announced again, and tables
                // seen before may be gone (bounded by what one session sees).
                self.tables.clear();
                self.source = Source {
                    system_id: s.system_id,
                    slot: s.slot,
                };
                let payload = wire::encode_source(&self.source, s.slot_confirmed);
                let id = format!("s{:X}", s.slot_confirmed.0);
                self.enqueue(
                    Some((wire::source_subject(&self.prefix), id, payload)),
                    None,
                )
                .await;
            }
            Item::Begin(_) => {
                self.pos = 0;
                self.open = None;
            }
            Item::Change(c) => self.add_change(&c).await,
            Item::Truncate(cs) => {
                for c in cs {
                    self.add_change(&c).await;
                }
            }
            Item::Message(m) if m.txn.is_none() => {
                let payload = wire::encode_message(&self.source, &m);
                let id = Key { lsn: m.lsn, pos: 0 }.msg_id(false);
                self.enqueue(
                    Some((wire::message_subject(&self.prefix), id, payload)),
                    None,
                )
                .await;
            }
            Item::Message(m) => {
                let Some(txn) = m.txn else { return };
                self.add(None, &txn, |b| b.push_message(&m)).await;
            }
            Item::Commit { end_lsn, .. } => match self.open.take() {
                Some(o) => self.publish(o, Some(end_lsn)).await,
                None => self.enqueue(None, Some(end_lsn)).await,
            },
        }
    }

    /// Adds `c` to the open message, or to a new one when it is of another
    /// table (or another shape of it) or full.
    async fn add_change(&mut self, c: &Arc<Change>) {
        let id = c.table.id;
        let cached = self.tables.get(&id);
        if !cached.is_some_and(|t| Arc::ptr_eq(&t.table, &c.table)) {
            // A Relation message: pgoutput sends one again for a shape it sent
            // before (a new session, a partition's first row), so only a new
            // shape ends the open message; where messages end then depends on
            // the changes alone, as a republish needs.
            let encoded = crate::changelog::codec::encode_table(&c.table);
            let reshaped = cached.is_some_and(|t| t.encoded != encoded);
            if reshaped && self.open.as_ref().is_some_and(|o| o.table == Some(id)) {
                if let Some(o) = self.open.take() {
                    self.publish(o, None).await;
                }
            }
            let subject = wire::table_subject(&self.prefix, &c.table.schema, &c.table.name);
            self.tables.insert(
                id,
                TableOut {
                    table: c.table.clone(),
                    subject,
                    encoded,
                },
            );
        }
        self.add(Some(id), &c.txn, |b| b.push_change(c)).await;
    }

    /// Adds an entry (`push`) to the open message when it is of `table` (None:
    /// logical decoding messages) and has room, else publishes that one (it did
    /// not end the transaction) and adds the entry to a new one at the next
    /// position.
    async fn add(
        &mut self,
        table: Option<crate::decode::pgoutput::RelId>,
        txn: &crate::decode::event::TxnInfo,
        push: impl Fn(&mut wire::Batch) -> bool,
    ) {
        if let Some(o) = self.open.as_mut().filter(|o| o.fits(table)) {
            if push(&mut o.batch) {
                self.pos += 1;
                return;
            }
        }
        if let Some(o) = self.open.take() {
            self.publish(o, None).await;
        }
        let key = Key {
            lsn: txn.commit_lsn,
            pos: self.pos,
        };
        let t = table.and_then(|id| self.tables.get(&id));
        let subject = t.map_or_else(
            || wire::message_subject(&self.prefix),
            |t| t.subject.clone(),
        );
        let encoded: &[u8] = t.map_or(&[], |t| &t.encoded);
        let mut batch = wire::Batch::start(&self.source, key, Some(txn), encoded);
        // The first entry of a message always goes in.
        push(&mut batch);
        self.pos += 1;
        self.open = Some(Open {
            table,
            subject,
            batch,
        });
    }

    async fn publish(&mut self, o: Open, end: Option<Lsn>) {
        let id = o.batch.key().msg_id(true);
        let payload = o.batch.finish(end);
        self.enqueue(Some((o.subject, id, payload)), end).await;
    }

    async fn enqueue(&mut self, msg: Option<(String, String, Bytes)>, confirm: Option<Lsn>) {
        self.queued_bytes += msg.as_ref().map_or(0, |m| m.2.len());
        let mut out = Out {
            acked: msg.is_none(),
            msg,
            confirm,
            ack: None,
        };
        if let (Some((subject, id, payload)), false) = (&out.msg, self.resync) {
            let mut m = PublishMessage::build()
                .payload(payload.clone())
                .message_id(id);
            if let Some(last) = &self.last_id {
                m = m.expected_last_message_id(last);
            }
            self.stats.published.fetch_add(1, Ordering::Relaxed);
            match self.js.send_publish(subject.clone(), m).await {
                Ok(f) => {
                    out.ack = Some(f.into_future());
                    self.unacked += 1;
                    self.last_id = Some(id.clone());
                }
                Err(e) => self.failed(&e.to_string()),
            }
        }
        self.queue.push_back(out);
    }

    /// After a failure: lets every outstanding publish settle, then sends what is
    /// not acknowledged one at a time, in order, until all is. False when `stop`
    /// fired meanwhile.
    async fn resend(&mut self, stop: &CancellationToken) -> bool {
        for o in self.queue.iter_mut() {
            if let Some(f) = o.ack.take() {
                self.unacked -= 1;
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    r = f => if let Ok(ack) = r {
                        o.acked = true;
                        if ack.duplicate {
                            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                }
            }
        }
        let mut delay = Duration::from_millis(100);
        for i in 0..self.queue.len() {
            if self.queue[i].acked {
                continue;
            }
            let Some((subject, id, payload)) = self.queue[i].msg.clone() else {
                continue;
            };
            loop {
                let m = PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(&id);
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                let r = tokio::select! {
                    _ = stop.cancelled() => return false,
                    r = async {
                        match self.js.send_publish(subject.clone(), m).await {
                            Ok(f) => f.await,
                            Err(e) => Err(e),
                        }
                    } => r,
                };
                match r {
                    Ok(ack) => {
                        if ack.duplicate {
                            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                        self.queue[i].acked = true;
                        break;
                    }
                    Err(e) => {
                        self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("publishing again failed: {e}");
                        tokio::select! {
                            _ = stop.cancelled() => return false,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(MAX_RETRY_DELAY);
                    }
                }
            }
        }
        self.last_id = self
            .queue
            .iter()
            .rev()
            .find_map(|o| o.msg.as_ref().map(|m| m.1.clone()))
            .or(self.last_id.take());
        self.resync = false;
        tracing::info!("JetStream acknowledges again; reading the slot");
        true
    }
}
