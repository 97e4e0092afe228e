//! Presence between the gateways of a cluster, over core NATS (subject
//! `_walcast_peer.<subject_prefix>.presence`): a client that `track()`s on one gateway
//! is in the `presence_state` and `presence_diff`s of the topic's members on
//! every gateway.
//!
//! Each gateway process is a node with a random id. It publishes:
//!
//! - a **diff** for each local presence change, numbered (`s`, per node, from 1);
//! - a **heartbeat** every [`HEARTBEAT`] with the number of its last diff sent;
//! - a **summary** (every local presence, in chunks) when another node asks
//!   for it, and when its own outbound queue had to drop something;
//! - a **request** ("send me your summary"): to all when it starts or
//!   reconnects to NATS, to one node when it missed one of that node's diffs
//!   (a gap in the numbers, or a heartbeat ahead of what it has);
//! - a **goodbye** when it shuts down cleanly.
//!
//! A receiver applies a node's diffs in order and, after a gap, ignores them
//! until the node's next summary, which replaces everything it held of that
//! node (applied chunk by chunk as it arrives; what it does not name leaves at
//! its last chunk; the difference goes to clients as a `presence_diff`). A
//! node not heard from for [`TIMEOUT`] is gone: its presences leave. So the
//! state converges (eventual consistency): a lost diff heals within about a
//! heartbeat, a dead gateway's presences linger at most [`TIMEOUT`] plus a
//! heartbeat.
//!
//! Diffs are handed over under the broadcast registry's lock, numbered there,
//! and go through one bounded queue ([`OUTBOUND`]) to the publisher; a full
//! queue drops (counted) and schedules a summary. The same hand-over keeps a
//! mirror of the local presences (shared pointers), so a summary is a copy of
//! pointers taken outside the registry lock, numbered with the last diff it
//! includes. Summaries are coalesced (one at a time, at most one per half
//! heartbeat) and not sent while NATS is disconnected; nothing is published
//! then (counted as dropped; a summary follows the reconnection).
//!
//! Receiving and publishing are separate: the receiver never waits on NATS,
//! and handles the messages waiting for it before it expires anyone. If it
//! ends for any reason but shutdown, the other gateways' presences leave.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use prometheus::{IntCounter, IntGauge};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::deliver::broadcast::{Broadcaster, PresenceOut};
use crate::deliver::presence::{SharedDiff, SharedMeta, TopicKey};
use crate::server::metrics::{Metrics, MetricsError};

/// Presence messages waiting to go to NATS, at most.
pub const OUTBOUND: usize = 1024;
/// How often a node says it is alive (with the number of its last diff).
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node not heard from for this long is gone: its presences leave.
pub const TIMEOUT: Duration = Duration::from_secs(4);
/// Other nodes followed at most; past it new ones are ignored (counted).
pub const MAX_NODES: usize = 64;
/// A summary is published in chunks of about this many bytes at most, and of
/// half the server's `max_payload` (1 MiB by default; NATS refuses messages
/// over it).
const CHUNK_BYTES: usize = 128 * 1024;
/// How long one publish may take before it is given up (NATS down: the
/// client's buffer is full).
const PUBLISH_WAIT: Duration = Duration::from_millis(500);

/// The metric families of cross-gateway presence.
#[derive(Clone)]
pub struct PresenceMetrics {
    remote: IntGauge,
    nodes: IntGauge,
    dropped: IntCounter,
    refused: IntCounter,
    resyncs: IntCounter,
}

impl PresenceMetrics {
    /// The families, registered with `metrics`.
    pub fn register(metrics: &Metrics) -> Result<Self, MetricsError> {
        let m = Self::new()?;
        for c in [&m.remote, &m.nodes] {
            metrics.register(Box::new(c.clone()))?;
        }
        for c in [&m.dropped, &m.refused, &m.resyncs] {
            metrics.register(Box::new(c.clone()))?;
        }
        Ok(m)
    }

    fn new() -> Result<Self, prometheus::Error> {
        Ok(PresenceMetrics {
            remote: IntGauge::new(
                "walcast_cluster_remote_presences",
                "Presences of other gateways this gateway holds (shown to its clients).",
            )?,
            nodes: IntGauge::new(
                "walcast_cluster_presence_nodes",
                "Other gateways this gateway hears presence heartbeats from.",
            )?,
            dropped: IntCounter::new(
                "walcast_cluster_presence_dropped_total",
                "Presence messages not sent to the other gateways (outbound queue full, or NATS did not take them in time); a summary follows.",
            )?,
            refused: IntCounter::new(
                "walcast_cluster_presence_refused_total",
                "Presences of other gateways not taken: over the [presence] limits, over the remote presence cap, malformed, or from too many gateways.",
            )?,
            resyncs: IntCounter::new(
                "walcast_cluster_presence_resyncs_total",
                "Summaries asked of another gateway after missing one of its presence diffs.",
            )?,
        })
    }
}

/// An item of the outbound queue: a numbered diff.
#[derive(Debug)]
struct Out {
    seq: u64,
    topic: TopicKey,
    diff: SharedDiff,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct WireMeta {
    k: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<String>,
    m: Value,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct WireEntry {
    t: String,
    #[serde(default)]
    p: bool,
    #[serde(flatten)]
    m: WireMeta,
}

/// The messages on `_walcast_peer.<prefix>.presence` (JSON); `n` is the sender's node.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "t")]
enum Wire {
    #[serde(rename = "d")]
    Diff {
        n: u64,
        s: u64,
        topic: String,
        #[serde(default)]
        private: bool,
        #[serde(default)]
        j: Vec<WireMeta>,
        #[serde(default)]
        l: Vec<(String, String)>,
    },
    #[serde(rename = "s")]
    Summary {
        n: u64,
        s: u64,
        id: u64,
        i: u32,
        last: bool,
        m: Vec<WireEntry>,
    },
    #[serde(rename = "h")]
    Heartbeat { n: u64, s: u64 },
    #[serde(rename = "r")]
    Request {
        n: u64,
        #[serde(default)]
        to: Option<u64>,
    },
    #[serde(rename = "b")]
    Bye { n: u64 },
}

fn to_wire(m: SharedMeta) -> WireMeta {
    WireMeta {
        k: m.key,
        r: m.role,
        m: m.meta,
    }
}

fn from_wire(m: WireMeta) -> SharedMeta {
    SharedMeta {
        key: m.k,
        role: m.r,
        meta: m.m,
    }
}

/// An entry of a summary, serialised; its size is what a chunk counts.
fn entry_bytes(t: &TopicKey, m: &SharedMeta) -> Option<Vec<u8>> {
    let e = WireEntry {
        t: t.0.clone(),
        p: t.1,
        m: to_wire(m.clone()),
    };
    serde_json::to_vec(&e).ok()
}

/// Room for a summary message's fields besides its entries.
const ENVELOPE: usize = 160;

/// The entries of a chunk at most, in serialised bytes, for a server taking
/// messages of `max_payload` bytes.
fn chunk_limit(max_payload: usize) -> usize {
    if max_payload == 0 {
        // Not told (yet): the default server takes 1 MiB.
        return CHUNK_BYTES;
    }
    max_payload.saturating_sub(ENVELOPE).clamp(1, CHUNK_BYTES)
}

/// A summary's entries as messages whose entries take at most `limit` bytes
/// serialised (at least one message). An entry over `limit` on its own is
/// left out (counted in the second value): the server would refuse it.
fn summary_chunks(
    node: u64,
    seq: u64,
    id: u64,
    all: &[(Arc<TopicKey>, Arc<SharedMeta>)],
    limit: usize,
) -> (Vec<Bytes>, usize) {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut chunk: Vec<u8> = Vec::new();
    let mut skipped = 0;
    for (t, m) in all {
        let Some(e) = entry_bytes(t, m) else {
            skipped += 1;
            continue;
        };
        if e.len() > limit {
            skipped += 1;
            continue;
        }
        if !chunk.is_empty() && chunk.len() + 1 + e.len() > limit {
            chunks.push(std::mem::take(&mut chunk));
        }
        if !chunk.is_empty() {
            chunk.push(b',');
        }
        chunk.extend_from_slice(&e);
    }
    if !chunk.is_empty() || chunks.is_empty() {
        chunks.push(chunk);
    }
    let last = chunks.len() - 1;
    let out = chunks
        .into_iter()
        .enumerate()
        .map(|(i, entries)| {
            let head = format!(
                "{{\"t\":\"s\",\"n\":{node},\"s\":{seq},\"id\":{id},\"i\":{i},\"last\":{},\"m\":[",
                i == last
            );
            let mut b = Vec::with_capacity(head.len() + entries.len() + 2);
            b.extend_from_slice(head.as_bytes());
            b.extend_from_slice(&entries);
            b.extend_from_slice(b"]}");
            Bytes::from(b)
        })
        .collect();
    (out, skipped)
}

/// A summary's entries, shared with the mirror they were taken from.
type Entries = Vec<(Arc<TopicKey>, Arc<SharedMeta>)>;

/// One topic's presences in the mirror, by `(key, phx_ref)`.
type MirrorTopic = (Arc<TopicKey>, HashMap<(String, String), Arc<SharedMeta>>);

/// This node's presences as last handed to the other gateways (kept by the
/// presence sink, under the registry lock), so a summary is a copy of
/// pointers taken outside that lock.
#[derive(Default)]
struct Mirror {
    /// Number of the last diff applied.
    seq: u64,
    topics: HashMap<TopicKey, MirrorTopic>,
}

impl Mirror {
    fn reset(&mut self, all: Vec<(TopicKey, SharedMeta)>) {
        self.topics.clear();
        for (t, m) in all {
            self.join(&t, m);
        }
    }

    fn join(&mut self, t: &TopicKey, m: SharedMeta) {
        let Some(r) = m.meta.get("phx_ref").and_then(Value::as_str) else {
            return;
        };
        let r = r.to_string();
        let (_, metas) = self
            .topics
            .entry(t.clone())
            .or_insert_with(|| (Arc::new(t.clone()), HashMap::new()));
        metas.insert((m.key.clone(), r), Arc::new(m));
    }

    fn apply(&mut self, t: &TopicKey, d: &SharedDiff) {
        if let Some((_, metas)) = self.topics.get_mut(t) {
            for (k, r) in &d.leaves {
                metas.remove(&(k.clone(), r.clone()));
            }
        }
        for m in &d.joins {
            self.join(t, m.clone());
        }
        if self.topics.get(t).is_some_and(|(_, m)| m.is_empty()) {
            self.topics.remove(t);
        }
    }

    fn snapshot(&self) -> (u64, Entries) {
        let all = self
            .topics
            .values()
            .flat_map(|(t, metas)| metas.values().map(move |m| (t.clone(), m.clone())))
            .collect();
        (self.seq, all)
    }
}

/// A summary being received (applied chunk by chunk as it comes).
struct Pending {
    id: u64,
    seq: u64,
    /// The index of the chunk expected next.
    next: u32,
    started: Instant,
}

/// What this node knows of another one.
struct Peer {
    heard: Instant,
    /// Number of its last diff applied here.
    seq: u64,
    /// False until its first summary, and again after a gap: its diffs wait
    /// for the next summary.
    synced: bool,
    asked: Option<Instant>,
    /// Last asked for a summary because presences of it were refused at the
    /// cap.
    asked_capped: Option<Instant>,
    pending: Option<Pending>,
}

/// What a received message asks of the node.
#[derive(Debug, Default, PartialEq)]
struct Reaction {
    /// Ask this node for its summary.
    request: Option<u64>,
    /// Send our summary.
    summary: bool,
}

/// The receiving side: other nodes' state, applied to the broadcaster.
struct Peers {
    me: u64,
    nodes: HashMap<u64, Peer>,
}

impl Peers {
    /// Whether node `n` may be followed: known, or room for it (a node that
    /// never completed a summary makes room for a newcomer).
    fn admit_node(&mut self, n: u64, b: &Broadcaster) -> bool {
        if self.nodes.contains_key(&n) || self.nodes.len() < MAX_NODES {
            return true;
        }
        let idle = self
            .nodes
            .iter()
            .filter(|(_, p)| !p.synced)
            .min_by_key(|(_, p)| p.heard)
            .map(|(n, _)| *n);
        match idle {
            Some(old) => {
                self.nodes.remove(&old);
                b.remote_gone(old);
                true
            }
            None => false,
        }
    }

    /// Handles one message at `now`.
    fn on(
        &mut self,
        w: Wire,
        now: Instant,
        b: &Broadcaster,
        metrics: &PresenceMetrics,
    ) -> Reaction {
        let mut r = Reaction::default();
        let n = match &w {
            Wire::Diff { n, .. }
            | Wire::Summary { n, .. }
            | Wire::Heartbeat { n, .. }
            | Wire::Request { n, .. }
            | Wire::Bye { n } => *n,
        };
        if n == self.me {
            return r;
        }
        match w {
            Wire::Bye { .. } => {
                if self.nodes.remove(&n).is_some() {
                    b.remote_gone(n);
                }
                return r;
            }
            Wire::Request { to, .. } => {
                // A request follows no one: it only asks for our summary.
                r.summary = to.is_none_or(|t| t == self.me);
                if let Some(p) = self.nodes.get_mut(&n) {
                    p.heard = now;
                }
                return r;
            }
            _ => {}
        }
        if !self.admit_node(n, b) {
            metrics.refused.inc();
            return r;
        }
        let peer = self.nodes.entry(n).or_insert(Peer {
            heard: now,
            seq: 0,
            synced: false,
            asked: None,
            asked_capped: None,
            pending: None,
        });
        peer.heard = now;
        let mut out_of_step = false;
        if matches!(w, Wire::Diff { .. } | Wire::Heartbeat { .. }) && peer.pending.take().is_some()
        {
            // A node publishes a summary's chunks one after the other: what
            // it sends next means the rest of the summary was lost.
            b.remote_summary_abort(n);
            out_of_step = true;
        }
        match w {
            Wire::Diff {
                s,
                topic,
                private,
                j,
                l,
                ..
            } => {
                if peer.synced && peer.seq.checked_add(1) == Some(s) {
                    peer.seq = s;
                    let diff = SharedDiff {
                        joins: j.into_iter().map(from_wire).collect(),
                        leaves: l,
                    };
                    let refused = b.remote_diff(n, (topic, private), diff);
                    metrics.refused.inc_by(refused as u64);
                } else if out_of_step || !peer.synced || s > peer.seq {
                    out_of_step = true;
                }
            }
            Wire::Heartbeat { s, .. } => out_of_step |= !peer.synced || s != peer.seq,
            Wire::Summary {
                s, id, i, last, m, ..
            } => {
                let first = i == 0;
                let follows = peer
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.id == id && p.next == i);
                if first || follows {
                    let p = peer.pending.get_or_insert(Pending {
                        id,
                        seq: s,
                        next: 0,
                        started: now,
                    });
                    if first {
                        *p = Pending {
                            id,
                            seq: s,
                            next: 0,
                            started: now,
                        };
                    }
                    p.next = i.saturating_add(1);
                    let seq = p.seq;
                    let items = m
                        .into_iter()
                        .map(|e| ((e.t, e.p), from_wire(e.m)))
                        .collect();
                    let refused = b.remote_summary_part(n, first, items, last);
                    metrics.refused.inc_by(refused as u64);
                    if last {
                        // Taken up to the cap (the rest counted as refused):
                        // the node is followed from here.
                        peer.pending = None;
                        peer.seq = seq;
                        peer.synced = true;
                        peer.asked = None;
                    }
                } else {
                    // A chunk missing: what came of this summary stays until
                    // the next one.
                    if peer.pending.take().is_some() {
                        b.remote_summary_abort(n);
                    }
                    out_of_step = true;
                }
            }
            Wire::Request { .. } | Wire::Bye { .. } => {}
        }
        if out_of_step {
            if peer.synced {
                metrics.resyncs.inc();
            }
            peer.synced = false;
            // Asked at most once a heartbeat (its summary may be on its way).
            if peer
                .asked
                .is_none_or(|a| now.duration_since(a) >= HEARTBEAT)
            {
                peer.asked = Some(now);
                r.request = Some(n);
            }
        }
        r
    }

    /// Forgets the nodes not heard from for [`TIMEOUT`] (their presences
    /// leave) and summaries that stalled for as long. Returns the nodes to
    /// ask for a summary: those whose stalled summary was dropped, and those
    /// with presences refused at the cap now that there is room.
    fn expire(&mut self, now: Instant, b: &Broadcaster) -> Vec<u64> {
        let gone: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, p)| now.duration_since(p.heard) >= TIMEOUT)
            .map(|(n, _)| *n)
            .collect();
        for n in gone {
            tracing::info!(node = n, "a gateway is silent; its presences leave");
            self.nodes.remove(&n);
            b.remote_gone(n);
        }
        let mut ask = Vec::new();
        for (n, p) in &mut self.nodes {
            if p.pending
                .as_ref()
                .is_some_and(|s| now.duration_since(s.started) >= TIMEOUT)
            {
                p.pending = None;
                b.remote_summary_abort(*n);
                p.synced = false;
                p.asked = Some(now);
                ask.push(*n);
            }
        }
        for n in b.remote_capped() {
            let Some(p) = self.nodes.get_mut(&n) else {
                continue;
            };
            if p.pending.is_none()
                && p.asked_capped
                    .is_none_or(|a| now.duration_since(a) >= TIMEOUT)
                && !ask.contains(&n)
            {
                p.asked_capped = Some(now);
                ask.push(n);
            }
        }
        ask
    }
}

fn node_id() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// What the receiving side asks the publisher to send.
#[derive(Debug)]
enum Ask {
    /// A request for `n`'s summary.
    Summary(u64),
    /// Our summary (coalesced: at most one pending).
    Ours,
}

/// Asks the publisher waiting, at most (more are dropped: asked again later).
const ASKS: usize = 64;

/// Clears every other gateway's presences if the receiving side ends for
/// any reason but shutdown (its subscription ended, or it panicked): they
/// would no longer change.
struct ClearOnExit<'a> {
    b: &'a Broadcaster,
    stop: &'a CancellationToken,
    metrics: &'a PresenceMetrics,
}

impl Drop for ClearOnExit<'_> {
    fn drop(&mut self) {
        if self.stop.is_cancelled() {
            return;
        }
        tracing::error!(
            "cross-gateway presence stopped receiving; other gateways' presences leave this one"
        );
        self.b.remote_clear();
        self.metrics.nodes.set(0);
        self.metrics.remote.set(0);
    }
}

fn connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// Links `broadcaster`'s presences to the other gateways until `stop` fires.
pub async fn run(
    client: async_nats::Client,
    prefix: String,
    broadcaster: Arc<Broadcaster>,
    metrics: PresenceMetrics,
    stop: CancellationToken,
) {
    let subject = crate::cluster::wire::peer_subject(&prefix, "presence");
    let me = node_id();
    let (tx, rx) = mpsc::channel::<Out>(OUTBOUND);
    let mirror = Arc::new(Mutex::new(Mirror::default()));
    // Something was dropped: the others need a summary.
    let lost = Arc::new(AtomicBool::new(false));
    {
        let (mirror, lost, dropped) = (mirror.clone(), lost.clone(), metrics.dropped.clone());
        broadcaster.set_presence_sink(Box::new(move |what| {
            // Called under the registry lock: numbers follow the changes' order.
            let mut mirror = mirror.lock().unwrap_or_else(|e| e.into_inner());
            match what {
                PresenceOut::Diff { topic, diff } => {
                    mirror.seq = mirror.seq.wrapping_add(1);
                    mirror.apply(&topic, &diff);
                    let out = Out {
                        seq: mirror.seq,
                        topic,
                        diff,
                    };
                    if tx.try_send(out).is_err() {
                        dropped.inc();
                        lost.store(true, Ordering::Relaxed);
                    }
                }
                PresenceOut::Summary(all) => mirror.reset(all),
            }
        }));
    }
    let sub = loop {
        match client.subscribe(subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!("cannot subscribe to {subject}: {e}; presence stays on this gateway until it can");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(HEARTBEAT) => {}
                }
            }
        }
    };
    let (ask_tx, ask_rx) = mpsc::channel::<Ask>(ASKS);
    let publisher = Publisher {
        client: &client,
        subject: subject.clone(),
        me,
        metrics: &metrics,
        lost: &lost,
        mirror: &mirror,
        stop: &stop,
        sent_seq: 0,
        summary_id: 0,
    };
    tokio::join!(
        publisher.run(rx, ask_rx),
        receive(me, sub, &broadcaster, &metrics, &stop, ask_tx)
    );
}

/// The receiving side: applies what the other nodes say; never waits on
/// NATS (what it wants sent goes to the publisher).
async fn receive(
    me: u64,
    mut sub: async_nats::Subscriber,
    broadcaster: &Broadcaster,
    metrics: &PresenceMetrics,
    stop: &CancellationToken,
    asks: mpsc::Sender<Ask>,
) {
    let _clear = ClearOnExit {
        b: broadcaster,
        stop,
        metrics,
    };
    let mut peers = Peers {
        me,
        nodes: HashMap::new(),
    };
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_expiry = Instant::now() + HEARTBEAT;
    loop {
        // Messages first: a heartbeat waiting here must count before expiry.
        let expiry_due = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            m = sub.next() => {
                let Some(m) = m else {
                    tracing::error!("the subscription to peer presence ended");
                    return;
                };
                if let Ok(w) = serde_json::from_slice::<Wire>(&m.payload) {
                    let r = peers.on(w, Instant::now(), broadcaster, metrics);
                    if let Some(to) = r.request {
                        let _ = asks.try_send(Ask::Summary(to));
                    }
                    if r.summary {
                        let _ = asks.try_send(Ask::Ours);
                    }
                } else {
                    tracing::debug!("ignored a peer presence message that does not decode");
                }
                // A steady stream of messages does not put expiry off.
                Instant::now() >= next_expiry
            }
            _ = tick.tick() => true,
        };
        if expiry_due {
            next_expiry = Instant::now() + HEARTBEAT;
            for n in peers.expire(Instant::now(), broadcaster) {
                let _ = asks.try_send(Ask::Summary(n));
            }
            metrics.nodes.set(peers.nodes.len() as i64);
            metrics.remote.set(broadcaster.remote_presences() as i64);
        }
    }
}

/// The sending side: diffs, heartbeats, requests and summaries, one at a time.
struct Publisher<'a> {
    client: &'a async_nats::Client,
    subject: String,
    me: u64,
    metrics: &'a PresenceMetrics,
    lost: &'a AtomicBool,
    mirror: &'a Mutex<Mirror>,
    stop: &'a CancellationToken,
    /// Number of the last diff the others have (published, or in a summary).
    sent_seq: u64,
    summary_id: u64,
}

impl Publisher<'_> {
    /// Publishes `bytes`; false (counted, and a summary due) if NATS is not
    /// connected or does not take it in time.
    async fn publish(&self, bytes: Bytes) -> bool {
        let ok = connected(self.client)
            && matches!(
                tokio::time::timeout(
                    PUBLISH_WAIT,
                    self.client.publish(self.subject.clone(), bytes)
                )
                .await,
                Ok(Ok(()))
            );
        if !ok {
            self.metrics.dropped.inc();
            self.lost.store(true, Ordering::Relaxed);
        }
        ok
    }

    async fn send(&self, w: &Wire) -> bool {
        match serde_json::to_vec(w) {
            Ok(b) => self.publish(b.into()).await,
            Err(_) => false,
        }
    }

    /// Every local presence, in chunks, from the mirror (no registry lock).
    async fn summary(&mut self) {
        let (seq, all) = self
            .mirror
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot();
        self.summary_id = self.summary_id.wrapping_add(1);
        let limit = chunk_limit(self.client.server_info().max_payload);
        let (chunks, skipped) = summary_chunks(self.me, seq, self.summary_id, &all, limit);
        drop(all);
        if skipped > 0 {
            tracing::warn!(
                skipped,
                limit,
                "presences too large for a NATS message left out of a summary"
            );
            self.metrics.dropped.inc_by(skipped as u64);
        }
        for c in chunks {
            if self.stop.is_cancelled() || !self.publish(c).await {
                return;
            }
        }
        self.sent_seq = self.sent_seq.max(seq);
    }

    async fn run(mut self, mut diffs: mpsc::Receiver<Out>, mut asks: mpsc::Receiver<Ask>) {
        let me = self.me;
        let mut asks_open = true;
        let mut summary_due = false;
        let mut last_summary: Option<Instant> = None;
        let mut was_connected = connected(self.client);
        // Learn what the others hold.
        self.send(&Wire::Request { n: me, to: None }).await;
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => {
                    if connected(self.client) {
                        self.send(&Wire::Bye { n: me }).await;
                        let _ = tokio::time::timeout(PUBLISH_WAIT, self.client.flush()).await;
                    }
                    return;
                }
                _ = tick.tick() => {
                    let now_connected = connected(self.client);
                    if now_connected && !was_connected {
                        // Back on NATS: what changed meanwhile, both ways.
                        self.send(&Wire::Request { n: me, to: None }).await;
                        summary_due = true;
                    }
                    was_connected = now_connected;
                    if now_connected {
                        summary_due |= self.lost.swap(false, Ordering::Relaxed);
                        self.send(&Wire::Heartbeat { n: me, s: self.sent_seq }).await;
                    }
                }
                a = asks.recv(), if asks_open => match a {
                    Some(Ask::Summary(to)) => {
                        self.send(&Wire::Request { n: me, to: Some(to) }).await;
                    }
                    Some(Ask::Ours) => summary_due = true,
                    None => asks_open = false,
                },
                o = diffs.recv() => {
                    let Some(Out { seq, topic: (topic, private), diff }) = o else { return };
                    let w = Wire::Diff {
                        n: me,
                        s: seq,
                        topic,
                        private,
                        j: diff.joins.into_iter().map(to_wire).collect(),
                        l: diff.leaves,
                    };
                    if self.send(&w).await {
                        self.sent_seq = self.sent_seq.max(seq);
                    }
                }
            }
            // One summary at a time, at most one per half heartbeat, and
            // none while NATS is away (one follows the reconnection).
            if summary_due
                && connected(self.client)
                && last_summary.is_none_or(|t| t.elapsed() >= HEARTBEAT / 2)
            {
                summary_due = false;
                self.lost.store(false, Ordering::Relaxed);
                last_summary = Some(Instant::now());
                self.summary().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BroadcastConfig, PresenceConfig};
    use serde_json::json;

    fn metrics() -> PresenceMetrics {
        PresenceMetrics::new().unwrap()
    }

    fn meta(key: &str, r: &str) -> WireMeta {
        WireMeta {
            k: key.into(),
            r: None,
            m: json!({"phx_ref": r, "online": true}),
        }
    }

    #[test]
    fn wire_messages_come_back_as_sent() {
        for w in [
            Wire::Diff {
                n: u64::MAX,
                s: 3,
                topic: "realtime:room".into(),
                private: true,
                j: vec![meta("alice", "r1")],
                l: vec![("bob".into(), "r0".into())],
            },
            Wire::Heartbeat { n: 1, s: 2 },
            Wire::Request { n: 1, to: Some(2) },
            Wire::Request { n: 1, to: None },
            Wire::Bye { n: 9 },
        ] {
            let b = serde_json::to_vec(&w).unwrap();
            assert_eq!(serde_json::from_slice::<Wire>(&b).unwrap(), w);
        }
        assert!(serde_json::from_slice::<Wire>(b"{\"t\":\"x\"}").is_err());
    }

    #[test]
    fn summaries_are_chunked_by_serialised_size_and_the_last_is_marked() {
        let topic = Arc::new(("realtime:room".to_string(), false));
        let all: Vec<_> = (0..2000)
            .map(|i| {
                (
                    topic.clone(),
                    Arc::new(SharedMeta {
                        key: format!("k{i}"),
                        // Roles and escaped characters count too.
                        role: Some("r".repeat(100)),
                        meta: json!({"phx_ref": format!("r{i}"), "pad": "\"\n".repeat(100)}),
                    }),
                )
            })
            .collect();
        // A server taking 8 KiB messages: every chunk fits.
        let limit = chunk_limit(8192);
        assert_eq!(chunk_limit(1 << 20), CHUNK_BYTES);
        assert_eq!(chunk_limit(0), CHUNK_BYTES);
        let (chunks, skipped) = summary_chunks(1, 5, 7, &all, limit);
        assert_eq!(skipped, 0);
        assert!(chunks.len() > 1);
        let mut total = 0;
        for (i, c) in chunks.iter().enumerate() {
            assert!(c.len() <= 8192, "{} bytes", c.len());
            let Wire::Summary { i: ci, last, m, .. } = serde_json::from_slice(c).unwrap() else {
                panic!("a summary")
            };
            assert_eq!(ci as usize, i);
            assert_eq!(last, i == chunks.len() - 1);
            total += m.len();
        }
        assert_eq!(total, 2000);
        // Nothing: one empty, last chunk. An entry over the limit: left out.
        assert_eq!(summary_chunks(1, 0, 1, &[], limit).0.len(), 1);
        let (chunks, skipped) = summary_chunks(1, 0, 1, &all[..3], 100);
        assert_eq!((chunks.len(), skipped), (1, 3));
    }

    fn broadcaster() -> Broadcaster {
        Broadcaster::new(
            BroadcastConfig::default(),
            PresenceConfig::default(),
            Vec::new(),
        )
    }

    fn diff(n: u64, s: u64, j: Vec<WireMeta>, l: Vec<(&str, &str)>) -> Wire {
        Wire::Diff {
            n,
            s,
            topic: "realtime:room".into(),
            private: false,
            j,
            l: l.into_iter()
                .map(|(k, r)| (k.to_string(), r.to_string()))
                .collect(),
        }
    }

    fn summary(n: u64, s: u64, metas: Vec<WireMeta>) -> Wire {
        Wire::Summary {
            n,
            s,
            id: s,
            i: 0,
            last: true,
            m: metas
                .into_iter()
                .map(|m| WireEntry {
                    t: "realtime:room".into(),
                    p: false,
                    m,
                })
                .collect(),
        }
    }

    #[test]
    fn a_node_is_followed_from_its_summary_and_a_gap_asks_for_the_next() {
        let b = broadcaster();
        let m = metrics();
        let mut p = Peers {
            me: 1,
            nodes: HashMap::new(),
        };
        let t0 = Instant::now();
        // Our own messages are ignored.
        assert_eq!(
            p.on(Wire::Heartbeat { n: 1, s: 9 }, t0, &b, &m),
            Reaction::default()
        );
        // A node first heard of: ask it for its summary; its diffs wait.
        let r = p.on(diff(2, 1, vec![meta("a", "r1")], vec![]), t0, &b, &m);
        assert_eq!(r.request, Some(2));
        assert_eq!(b.remote_presences(), 0);
        // Asked once a heartbeat at most.
        assert_eq!(
            p.on(Wire::Heartbeat { n: 2, s: 1 }, t0, &b, &m).request,
            None
        );
        // The summary (which includes diff 1) starts the node.
        p.on(summary(2, 1, vec![meta("a", "r1")]), t0, &b, &m);
        assert_eq!(b.remote_presences(), 1);
        // In order: applied.
        p.on(diff(2, 2, vec![meta("b", "r2")], vec![]), t0, &b, &m);
        p.on(diff(2, 3, vec![], vec![("a", "r1")]), t0, &b, &m);
        assert_eq!(b.remote_presences(), 1);
        assert_eq!(
            p.on(Wire::Heartbeat { n: 2, s: 3 }, t0, &b, &m),
            Reaction::default()
        );
        // Diff 4 lost: 5 is not applied, the node is asked for a summary.
        let r = p.on(diff(2, 5, vec![meta("c", "r5")], vec![]), t0, &b, &m);
        assert_eq!(r.request, Some(2));
        assert_eq!(m.resyncs.get(), 1);
        assert_eq!(b.remote_presences(), 1);
        // A lost last diff shows in the heartbeat.
        p.on(
            summary(2, 5, vec![meta("b", "r2"), meta("c", "r5")]),
            t0,
            &b,
            &m,
        );
        assert_eq!(b.remote_presences(), 2);
        let later = t0 + HEARTBEAT;
        assert_eq!(
            p.on(Wire::Heartbeat { n: 2, s: 6 }, later, &b, &m).request,
            Some(2)
        );
        // A request names us (or everyone): send our summary.
        assert!(p.on(Wire::Request { n: 3, to: None }, t0, &b, &m).summary);
        assert!(
            !p.on(Wire::Request { n: 3, to: Some(4) }, t0, &b, &m)
                .summary
        );
        assert!(
            p.on(Wire::Request { n: 3, to: Some(1) }, t0, &b, &m)
                .summary
        );
        // Silence: node 2 (heard at `later`) outlives node 3 (heard at t0).
        p.expire(t0 + TIMEOUT, &b);
        assert!(p.nodes.contains_key(&2) && !p.nodes.contains_key(&3));
        p.expire(later + TIMEOUT, &b);
        assert!(p.nodes.is_empty());
        assert_eq!(b.remote_presences(), 0);
    }

    fn peers() -> Peers {
        Peers {
            me: 1,
            nodes: HashMap::new(),
        }
    }

    fn chunk(n: u64, s: u64, id: u64, i: u32, last: bool, ms: Vec<WireMeta>) -> Wire {
        Wire::Summary {
            n,
            s,
            id,
            i,
            last,
            m: ms
                .into_iter()
                .map(|m| WireEntry {
                    t: "realtime:room".into(),
                    p: false,
                    m,
                })
                .collect(),
        }
    }

    #[test]
    fn a_summary_in_chunks_applies_as_it_comes_and_a_lost_chunk_asks_again() {
        let b = broadcaster();
        let m = metrics();
        let mut p = peers();
        let t0 = Instant::now();
        // Held before: x, which the next summaries no longer name.
        p.on(summary(2, 0, vec![meta("x", "r0")]), t0, &b, &m);
        p.on(chunk(2, 0, 1, 0, false, vec![meta("a", "r1")]), t0, &b, &m);
        assert_eq!(b.remote_presences(), 2);
        // Chunk 1 of summary 1 lost: summary 2's second chunk is no use; what
        // came stays until the next summary.
        let r = p.on(chunk(2, 0, 2, 1, true, vec![meta("b", "r2")]), t0, &b, &m);
        assert_eq!(r.request, Some(2));
        assert_eq!(b.remote_presences(), 2);
        p.on(chunk(2, 0, 3, 0, false, vec![meta("a", "r1")]), t0, &b, &m);
        p.on(chunk(2, 0, 3, 1, true, vec![meta("b", "r2")]), t0, &b, &m);
        assert_eq!(b.remote_presences(), 2);
        assert!(p.nodes[&2].synced);
        p.on(Wire::Bye { n: 2 }, t0, &b, &m);
        assert_eq!(b.remote_presences(), 0);
        assert!(p.nodes.is_empty());
    }

    #[test]
    fn a_lost_last_chunk_shows_at_the_next_heartbeat() {
        let b = broadcaster();
        let m = metrics();
        let mut p = peers();
        let t0 = Instant::now();
        p.on(chunk(2, 4, 1, 0, false, vec![meta("a", "r1")]), t0, &b, &m);
        // The last chunk never comes; the node's heartbeat does.
        let r = p.on(Wire::Heartbeat { n: 2, s: 4 }, t0, &b, &m);
        assert_eq!(r.request, Some(2));
        assert!(!p.nodes[&2].synced && p.nodes[&2].pending.is_none());
        // A summary that stalls while the node stays heard is dropped after
        // TIMEOUT and asked again.
        p.on(chunk(2, 4, 2, 0, false, vec![meta("a", "r1")]), t0, &b, &m);
        p.on(Wire::Request { n: 3, to: None }, t0, &b, &m);
        let later = t0 + TIMEOUT;
        p.nodes.get_mut(&2).unwrap().heard = later;
        assert_eq!(p.expire(later, &b), vec![2]);
        assert!(p.nodes[&2].pending.is_none());
        // Then a whole summary: followed.
        p.on(
            chunk(2, 4, 3, 0, true, vec![meta("a", "r1")]),
            later,
            &b,
            &m,
        );
        assert!(p.nodes[&2].synced);
        assert_eq!(
            p.on(Wire::Heartbeat { n: 2, s: 4 }, later, &b, &m),
            Reaction::default()
        );
    }

    #[test]
    fn a_summary_over_the_cap_is_taken_up_to_it_and_the_rest_asked_for_once_there_is_room() {
        let b = broadcaster();
        b.set_remote_cap(3);
        let m = metrics();
        let mut p = peers();
        let t0 = Instant::now();
        let ms = |from: usize, to: usize| -> Vec<WireMeta> {
            (from..to)
                .map(|i| meta(&format!("k{i}"), &format!("r{i}")))
                .collect()
        };
        p.on(chunk(2, 7, 1, 0, false, ms(0, 2)), t0, &b, &m);
        p.on(chunk(2, 7, 1, 1, true, ms(2, 5)), t0, &b, &m);
        assert_eq!(b.remote_presences(), 3);
        assert_eq!(m.refused.get(), 2);
        // Synced: its heartbeat asks nothing, even a second later.
        let t1 = t0 + HEARTBEAT;
        assert_eq!(
            p.on(Wire::Heartbeat { n: 2, s: 7 }, t1, &b, &m),
            Reaction::default()
        );
        // No room: nothing to ask.
        assert!(p.expire(t1, &b).is_empty());
        // A presence leaves: there is room, the node is asked (once).
        p.on(diff(2, 8, vec![], vec![("k0", "r0")]), t1, &b, &m);
        assert_eq!(b.remote_presences(), 2);
        assert_eq!(p.expire(t1, &b), vec![2]);
        assert!(p.expire(t1, &b).is_empty());
        // Its summary fills the room again.
        p.on(chunk(2, 8, 2, 0, true, ms(1, 5)), t1, &b, &m);
        assert_eq!(b.remote_presences(), 3);
    }

    #[test]
    fn hostile_numbers_names_and_nodes_are_refused_without_harm() {
        let b = broadcaster();
        let m = metrics();
        let mut p = peers();
        let t0 = Instant::now();
        p.on(summary(2, u64::MAX, vec![meta("a", "r1")]), t0, &b, &m);
        // The next number would overflow: not applied, no panic.
        p.on(diff(2, 0, vec![meta("z", "r9")], vec![]), t0, &b, &m);
        assert_eq!(b.remote_presences(), 1);
        p.on(chunk(2, 0, 9, u32::MAX, true, vec![]), t0, &b, &m);
        // Overlong topic and role: refused.
        let refused = m.refused.get();
        p.on(
            Wire::Summary {
                n: 2,
                s: 1,
                id: 10,
                i: 0,
                last: true,
                m: vec![
                    WireEntry {
                        t: format!("realtime:{}", "t".repeat(300)),
                        p: false,
                        m: meta("b", "r2"),
                    },
                    WireEntry {
                        t: "realtime:room".into(),
                        p: false,
                        m: WireMeta {
                            r: Some("r".repeat(300)),
                            ..meta("c", "r3")
                        },
                    },
                ],
            },
            t0,
            &b,
            &m,
        );
        assert_eq!(m.refused.get(), refused + 2);
        assert_eq!(b.remote_presences(), 0);
        // Invented nodes that never complete a summary make room for a
        // newcomer; synced nodes stay.
        for n in 100..100 + MAX_NODES as u64 {
            p.on(Wire::Heartbeat { n, s: 0 }, t0, &b, &m);
        }
        assert_eq!(p.nodes.len(), MAX_NODES);
        p.on(Wire::Heartbeat { n: 3, s: 0 }, t0, &b, &m);
        assert!(p.nodes.contains_key(&3) && p.nodes.contains_key(&2));
        assert_eq!(p.nodes.len(), MAX_NODES);
        // Requests follow no one.
        p.on(Wire::Request { n: 4, to: None }, t0, &b, &m);
        assert!(!p.nodes.contains_key(&4));
    }

    #[test]
    fn the_mirror_follows_the_sink_and_a_summary_is_a_copy_of_it() {
        let room: TopicKey = ("realtime:room".into(), false);
        let sm = |k: &str, r: &str, role: Option<&str>| SharedMeta {
            key: k.into(),
            role: role.map(str::to_string),
            meta: json!({"phx_ref": r}),
        };
        let mut mi = Mirror::default();
        mi.reset(vec![(room.clone(), sm("a", "r1", None))]);
        mi.apply(
            &room,
            &SharedDiff {
                joins: vec![sm("b", "r2", None)],
                leaves: vec![],
            },
        );
        // A role change: leave and join of the same ref.
        mi.apply(
            &room,
            &SharedDiff {
                joins: vec![sm("a", "r1", Some("staff"))],
                leaves: vec![("a".into(), "r1".into())],
            },
        );
        mi.seq = 3;
        let (seq, all) = mi.snapshot();
        assert_eq!(seq, 3);
        let mut got: Vec<_> = all
            .iter()
            .map(|(t, m)| (t.0.clone(), m.key.clone(), m.role.clone()))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("realtime:room".into(), "a".into(), Some("staff".into())),
                ("realtime:room".into(), "b".into(), None),
            ]
        );
        mi.apply(
            &room,
            &SharedDiff {
                joins: vec![],
                leaves: vec![("a".into(), "r1".into()), ("b".into(), "r2".into())],
            },
        );
        assert!(mi.topics.is_empty());
    }

    #[test]
    fn remote_presences_leave_when_receiving_ends_but_not_at_shutdown() {
        let b = broadcaster();
        let m = metrics();
        let stop = CancellationToken::new();
        let mut p = peers();
        p.on(summary(2, 0, vec![meta("a", "r1")]), Instant::now(), &b, &m);
        assert_eq!(b.remote_presences(), 1);
        stop.cancel();
        drop(ClearOnExit {
            b: &b,
            stop: &stop,
            metrics: &m,
        });
        assert_eq!(b.remote_presences(), 1);
        let stop = CancellationToken::new();
        drop(ClearOnExit {
            b: &b,
            stop: &stop,
            metrics: &m,
        });
        assert_eq!(b.remote_presences(), 0);
    }
}
