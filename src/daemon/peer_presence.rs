//! Presence between the gateways of a cluster, over core NATS (subject
//! `<subject_prefix>._peer.presence`): a client that `track()`s on one gateway
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
//! node (the difference goes to clients as a `presence_diff`). A node not heard
//! from for [`TIMEOUT`] is gone: its presences leave. So the state converges
//! (eventual consistency): a lost diff heals within about a heartbeat, a dead
//! gateway's presences linger at most [`TIMEOUT`] plus a heartbeat.
//!
//! Diffs and summaries are handed over under the broadcast registry's lock,
//! numbered there, and go through one bounded queue ([`OUTBOUND`]) to one
//! publisher, so a summary is in order with the diffs around it. A full queue
//! drops (counted) and schedules a summary.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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
use crate::deliver::presence::{SharedDiff, SharedMeta, TopicKey, MAX_REMOTE_PRESENCES};
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

/// An item of the outbound queue: a numbered diff, or a summary with the
/// number of the last diff it includes.
#[derive(Debug)]
struct Out {
    seq: u64,
    what: PresenceOut,
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

/// The messages on `<prefix>._peer.presence` (JSON); `n` is the sender's node.
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

/// A summary's entries as messages of about `chunk_bytes` each (at least one).
fn summary_chunks(
    node: u64,
    seq: u64,
    id: u64,
    all: Vec<(TopicKey, SharedMeta)>,
    chunk_bytes: usize,
) -> Vec<Wire> {
    let mut out = Vec::new();
    let mut chunk = Vec::new();
    let mut size = 0;
    for ((t, p), m) in all {
        let e = WireEntry {
            t,
            p,
            m: to_wire(m),
        };
        size += e.t.len() + e.m.k.len() + e.m.m.to_string().len() + 32;
        chunk.push(e);
        if size >= chunk_bytes {
            out.push(std::mem::take(&mut chunk));
            size = 0;
        }
    }
    if !chunk.is_empty() || out.is_empty() {
        out.push(chunk);
    }
    let last = out.len() - 1;
    out.into_iter()
        .enumerate()
        .map(|(i, m)| Wire::Summary {
            n: node,
            s: seq,
            id,
            i: i as u32,
            last: i == last,
            m,
        })
        .collect()
}

/// A summary being received.
struct Pending {
    id: u64,
    seq: u64,
    next: u32,
    items: Vec<(TopicKey, SharedMeta)>,
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
        if let Wire::Bye { .. } = w {
            if self.nodes.remove(&n).is_some() {
                b.remote_gone(n);
            }
            return r;
        }
        if let Wire::Request { to, .. } = w {
            r.summary = to.is_none_or(|t| t == self.me);
        }
        if !self.nodes.contains_key(&n) && self.nodes.len() >= MAX_NODES {
            metrics.refused.inc();
            return r;
        }
        let peer = self.nodes.entry(n).or_insert(Peer {
            heard: now,
            seq: 0,
            synced: false,
            asked: None,
            pending: None,
        });
        peer.heard = now;
        let mut out_of_step = false;
        match w {
            Wire::Diff {
                s,
                topic,
                private,
                j,
                l,
                ..
            } => {
                if peer.synced && s == peer.seq + 1 {
                    peer.seq = s;
                    let diff = SharedDiff {
                        joins: j.into_iter().map(from_wire).collect(),
                        leaves: l,
                    };
                    let refused = b.remote_diff(n, (topic, private), diff);
                    metrics.refused.inc_by(refused as u64);
                } else if !peer.synced || s > peer.seq {
                    out_of_step = true;
                }
            }
            Wire::Heartbeat { s, .. } => out_of_step = !peer.synced || s != peer.seq,
            Wire::Summary {
                s, id, i, last, m, ..
            } => {
                let p = match peer.pending.take() {
                    Some(p) if i > 0 && p.id == id && p.next == i => Some(p),
                    _ if i == 0 => Some(Pending {
                        id,
                        seq: s,
                        next: 0,
                        items: Vec::new(),
                    }),
                    _ => None,
                };
                if let Some(mut p) = p {
                    p.next += 1;
                    p.items
                        .extend(m.into_iter().map(|e| ((e.t, e.p), from_wire(e.m))));
                    if p.items.len() > MAX_REMOTE_PRESENCES {
                        // More than could be held: kept whole or not at all.
                        metrics.refused.inc_by(p.items.len() as u64);
                    } else if last {
                        let refused = b.remote_summary(n, p.items);
                        metrics.refused.inc_by(refused as u64);
                        peer.seq = p.seq;
                        peer.synced = true;
                        peer.asked = None;
                    } else {
                        peer.pending = Some(p);
                    }
                } else {
                    // A chunk missing: wait for the next summary.
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

    /// Forgets the nodes not heard from for [`TIMEOUT`]: their presences leave.
    fn expire(&mut self, now: Instant, b: &Broadcaster) {
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

/// Links `broadcaster`'s presences to the other gateways until `stop` fires.
pub async fn run(
    client: async_nats::Client,
    prefix: String,
    broadcaster: Arc<Broadcaster>,
    metrics: PresenceMetrics,
    stop: CancellationToken,
) {
    let subject = format!("{prefix}._peer.presence");
    let me = node_id();
    let (tx, mut rx) = mpsc::channel::<Out>(OUTBOUND);
    let seq = Arc::new(AtomicU64::new(0));
    // Something was dropped: the others need a summary.
    let lost = Arc::new(AtomicBool::new(false));
    {
        let (seq, lost, dropped) = (seq.clone(), lost.clone(), metrics.dropped.clone());
        broadcaster.set_presence_sink(Box::new(move |what| {
            // Called under the registry lock: numbers follow the changes' order.
            let s = match &what {
                PresenceOut::Diff { .. } => seq.fetch_add(1, Ordering::Relaxed) + 1,
                PresenceOut::Summary(_) => seq.load(Ordering::Relaxed),
            };
            if tx.try_send(Out { seq: s, what }).is_err() {
                dropped.inc();
                lost.store(true, Ordering::Relaxed);
            }
        }));
    }
    let mut sub = loop {
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
    let publish = |w: &Wire| {
        let client = client.clone();
        let subject = subject.clone();
        let dropped = metrics.dropped.clone();
        let lost = lost.clone();
        let bytes: Bytes = serde_json::to_vec(w).unwrap_or_default().into();
        async move {
            let ok = matches!(
                tokio::time::timeout(PUBLISH_WAIT, client.publish(subject, bytes)).await,
                Ok(Ok(()))
            );
            if !ok {
                dropped.inc();
                lost.store(true, Ordering::Relaxed);
            }
        }
    };
    let mut peers = Peers {
        me,
        nodes: HashMap::new(),
    };
    // Numbers of what was last published, and of the summaries.
    let mut sent_seq = 0;
    let mut summary_id = 0u64;
    let mut last_summary: Option<Instant> = None;
    let mut summary_due = false;
    let mut connected = true;
    // Learn what the others hold.
    publish(&Wire::Request { n: me, to: None }).await;
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                publish(&Wire::Bye { n: me }).await;
                let _ = tokio::time::timeout(PUBLISH_WAIT, client.flush()).await;
                return;
            }
            o = rx.recv() => {
                let Some(Out { seq: s, what }) = o else { return };
                sent_seq = s;
                match what {
                    PresenceOut::Diff { topic: (topic, private), diff } => {
                        let w = Wire::Diff {
                            n: me,
                            s,
                            topic,
                            private,
                            j: diff.joins.into_iter().map(to_wire).collect(),
                            l: diff.leaves,
                        };
                        publish(&w).await;
                    }
                    PresenceOut::Summary(all) => {
                        summary_id += 1;
                        let chunk = (client.server_info().max_payload / 2).clamp(4096, CHUNK_BYTES);
                        for w in summary_chunks(me, s, summary_id, all, chunk) {
                            publish(&w).await;
                        }
                    }
                }
            }
            m = sub.next() => {
                let Some(m) = m else { return };
                let Ok(w) = serde_json::from_slice::<Wire>(&m.payload) else {
                    tracing::debug!("ignored a peer presence message that does not decode");
                    continue;
                };
                let r = peers.on(w, Instant::now(), &broadcaster, &metrics);
                if let Some(to) = r.request {
                    publish(&Wire::Request { n: me, to: Some(to) }).await;
                }
                if r.summary {
                    // At most one summary per half heartbeat; the rest wait.
                    if last_summary.is_none_or(|t| t.elapsed() >= HEARTBEAT / 2) {
                        last_summary = Some(Instant::now());
                        broadcaster.share_summary();
                    } else {
                        summary_due = true;
                    }
                }
                metrics.remote.set(broadcaster.remote_presences() as i64);
            }
            _ = tick.tick() => {
                let now_connected =
                    client.connection_state() == async_nats::connection::State::Connected;
                if now_connected && !connected {
                    // Back on NATS: what changed meanwhile, both ways.
                    publish(&Wire::Request { n: me, to: None }).await;
                    summary_due = true;
                }
                connected = now_connected;
                if summary_due || lost.swap(false, Ordering::Relaxed) {
                    summary_due = false;
                    last_summary = Some(Instant::now());
                    broadcaster.share_summary();
                }
                publish(&Wire::Heartbeat { n: me, s: sent_seq }).await;
                peers.expire(Instant::now(), &broadcaster);
                metrics.nodes.set(peers.nodes.len() as i64);
                metrics.remote.set(broadcaster.remote_presences() as i64);
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
    fn summaries_are_chunked_and_the_last_is_marked() {
        let all: Vec<_> = (0..2000)
            .map(|i| {
                (
                    ("realtime:room".to_string(), false),
                    SharedMeta {
                        key: format!("k{i}"),
                        role: None,
                        meta: json!({"phx_ref": format!("r{i}"), "pad": "x".repeat(200)}),
                    },
                )
            })
            .collect();
        let chunks = summary_chunks(1, 5, 7, all, CHUNK_BYTES);
        assert!(chunks.len() > 1);
        let mut total = 0;
        for (i, c) in chunks.iter().enumerate() {
            let Wire::Summary { i: ci, last, m, .. } = c else {
                panic!("a summary")
            };
            assert_eq!(*ci as usize, i);
            assert_eq!(*last, i == chunks.len() - 1);
            assert!(serde_json::to_vec(c).unwrap().len() < 2 * CHUNK_BYTES);
            total += m.len();
        }
        assert_eq!(total, 2000);
        assert_eq!(summary_chunks(1, 0, 1, Vec::new(), CHUNK_BYTES).len(), 1);
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

    #[test]
    fn a_summary_in_chunks_applies_whole_or_not_at_all_and_bye_clears() {
        let b = broadcaster();
        let m = metrics();
        let mut p = Peers {
            me: 1,
            nodes: HashMap::new(),
        };
        let t0 = Instant::now();
        let entries = |ms: Vec<WireMeta>| -> Vec<WireEntry> {
            ms.into_iter()
                .map(|m| WireEntry {
                    t: "realtime:room".into(),
                    p: false,
                    m,
                })
                .collect()
        };
        let chunk = |id, i, last, ms| Wire::Summary {
            n: 2,
            s: 0,
            id,
            i,
            last,
            m: entries(ms),
        };
        p.on(chunk(1, 0, false, vec![meta("a", "r1")]), t0, &b, &m);
        assert_eq!(b.remote_presences(), 0);
        // Chunk 1 of summary 1 lost: summary 2's second chunk is no use.
        let r = p.on(chunk(2, 1, true, vec![meta("b", "r2")]), t0, &b, &m);
        assert_eq!(r.request, Some(2));
        assert_eq!(b.remote_presences(), 0);
        p.on(chunk(3, 0, false, vec![meta("a", "r1")]), t0, &b, &m);
        p.on(chunk(3, 1, true, vec![meta("b", "r2")]), t0, &b, &m);
        assert_eq!(b.remote_presences(), 2);
        p.on(Wire::Bye { n: 2 }, t0, &b, &m);
        assert_eq!(b.remote_presences(), 0);
        assert!(p.nodes.is_empty());
    }
}
