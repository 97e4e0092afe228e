//! The relay's publishing stage: what the slot gives, as JetStream messages.
//!
//! What it promises (DESIGN.md §2, "Scale-out"):
//!
//! - **Acknowledged before confirmed.** A transaction's end LSN is handed to
//!   [`Progress::confirm`] only once JetStream acknowledged every message of it
//!   and of every transaction before it, so PostgreSQL keeps (and resends after a
//!   crash or a takeover) whatever the stream could still lose.
//! - **Once in the stream.** Each message carries `Nats-Msg-Id` from its commit
//!   LSN and position ([`super::wire::Key::msg_id`]): a republished change (a
//!   standby resuming from `confirmed_flush_lsn`, a reconnect) is dropped by the
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
use crate::decode::event::{Change, DbMessage, Item};
use crate::lsn::Lsn;
use crate::source::session::Progress;

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

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

/// An entry held back until the next one shows whether it ends its transaction.
enum Held {
    Change(Arc<Change>, u32),
    Message(Arc<DbMessage>, u32),
}

struct Publisher {
    js: Context,
    prefix: String,
    max_in_flight: usize,
    progress: Arc<Progress>,
    stats: Arc<ClusterStats>,
    source: Source,
    pos: u32,
    held: Option<Held>,
    queue: VecDeque<Out>,
    /// Id of the last message published in order (the next one expects it).
    last_id: Option<String>,
    /// A publish failed: settle and resend before reading more.
    resync: bool,
    /// Entries of `queue` whose acknowledgement is awaited (`ack` is Some).
    unacked: usize,
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
        held: None,
        queue: VecDeque::new(),
        last_id: None,
        resync: false,
        unacked: 0,
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
        let room = p.queue.len() < p.max_in_flight;
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

impl Publisher {
    fn settle_front(&mut self) {
        while self.queue.front().is_some_and(|o| o.acked) {
            let o = self.queue.pop_front().expect("front");
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
                self.held = None;
            }
            Item::Change(c) => self.hold(Held::Change(c, 0)).await,
            Item::Truncate(cs) => {
                for c in cs {
                    self.hold(Held::Change(c, 0)).await;
                }
            }
            Item::Message(m) if m.txn.is_none() => {
                let payload = wire::encode_message(&self.source, &m, 0, None);
                let id = Key { lsn: m.lsn, pos: 0 }.msg_id(false);
                self.enqueue(
                    Some((wire::message_subject(&self.prefix), id, payload)),
                    None,
                )
                .await;
            }
            Item::Message(m) => self.hold(Held::Message(m, 0)).await,
            Item::Commit { end_lsn, .. } => match self.held.take() {
                Some(h) => self.publish_held(h, Some(end_lsn)).await,
                None => self.enqueue(None, Some(end_lsn)).await,
            },
        }
    }

    async fn hold(&mut self, mut h: Held) {
        let pos = self.pos;
        self.pos += 1;
        match &mut h {
            Held::Change(_, p) | Held::Message(_, p) => *p = pos,
        }
        if let Some(prev) = self.held.replace(h) {
            self.publish_held(prev, None).await;
        }
    }

    async fn publish_held(&mut self, h: Held, end: Option<Lsn>) {
        let msg = match h {
            Held::Change(c, pos) => {
                let t = match self.tables.get(&c.table.id) {
                    Some(t) if Arc::ptr_eq(&t.table, &c.table) => t,
                    _ => {
                        let t = TableOut {
                            table: c.table.clone(),
                            subject: wire::table_subject(
                                &self.prefix,
                                &c.table.schema,
                                &c.table.name,
                            ),
                            encoded: crate::changelog::codec::encode_table(&c.table),
                        };
                        self.tables.insert(c.table.id, t);
                        &self.tables[&c.table.id]
                    }
                };
                (
                    t.subject.clone(),
                    Key {
                        lsn: c.txn.commit_lsn,
                        pos,
                    }
                    .msg_id(true),
                    wire::encode_change_with(&self.source, &c, &t.encoded, pos, end),
                )
            }
            Held::Message(m, pos) => {
                let lsn = m.txn.map_or(m.lsn, |t| t.commit_lsn);
                (
                    wire::message_subject(&self.prefix),
                    Key { lsn, pos }.msg_id(true),
                    wire::encode_message(&self.source, &m, pos, end),
                )
            }
        };
        self.enqueue(Some(msg), end).await;
    }

    async fn enqueue(&mut self, msg: Option<(String, String, Bytes)>, confirm: Option<Lsn>) {
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
