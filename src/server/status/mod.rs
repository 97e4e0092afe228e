//! The live status page: `/status` (HTML and a hand-written script, no build step,
//! nothing fetched from elsewhere), `/status/events` (server-sent events) and
//! `/status.json` (one snapshot, for `walcast status --url`), plus the catch-up
//! progress log.
//!
//! # What it costs when nobody watches
//!
//! A sampler task wakes every [`SAMPLE_EVERY`] and reads a few atomics (changes
//! by kind, frames and bytes sent) and the health evaluation the metrics already
//! make, and appends one [`Sample`] to a ring of [`HISTORY`] entries (the last
//! 15 minutes: the page's plot is there the moment it opens). The feed of
//! changes is a hook in the hub's `route` that loads one atomic counter of
//! watchers and returns when it is zero; per-table rates and the subscription
//! census (a hub command) are only made while a page is open.
//!
//! # The feed
//!
//! Each change while someone watches becomes a [`FeedItem`]: commit time, table,
//! kind, commit LSN and the replica-identity (primary key) values — never other
//! column values. Items go through a bounded `tokio::sync::broadcast` channel of
//! [`FEED_CAPACITY`]: a viewer that falls behind skips items (it is told how
//! many) rather than holding memory or slowing the hub. A feed for watching,
//! not an audit log.
//!
//! # Access
//!
//! The page shows client details and primary keys, so it is not public:
//! - a request carrying `[status] token` (as `Authorization: Bearer`, `apikey`
//!   header or `?apikey=`) is allowed;
//! - with `[auth] mode = "jwt"`, a token whose role is in `auth.bypass_roles`
//!   is allowed, any other token or none is refused (401/403), from anywhere;
//! - without JWT auth (unset or `mode = "none"`), requests from loopback are
//!   allowed and others refused.
//!
//! # Catch-up progress
//!
//! When the slot is more than [`CATCHUP_MIN_BYTES`] behind the server's WAL (a
//! long outage, a slot far behind at startup), the sampler logs the position
//! reached, the bytes remaining, the rate and an ETA every
//! [`CATCHUP_LOG_EVERY`], and once more when it has caught up.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::PgConnInfo;
use crate::decode::event::{Change, ChangeKind};
use crate::deliver::stats::{AuthFailure, DisconnectReason, DropReason};
use crate::lsn::Lsn;
use crate::route::auth::Verifier;
use crate::route::hub::HubCommand;
use crate::server::metrics::{Health, Level, Metrics};

/// How often the sampler reads the counters.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Samples kept: 15 minutes.
pub const HISTORY: usize = 900;
/// Feed items buffered per viewer before it skips some.
pub const FEED_CAPACITY: usize = 256;
/// A catch-up is logged when the slot is at least this far behind (one WAL segment).
pub const CATCHUP_MIN_BYTES: u64 = 16 * 1024 * 1024;
/// How often catch-up progress is logged.
pub const CATCHUP_LOG_EVERY: Duration = Duration::from_secs(10);
/// Per-table rate rows kept (the rest are summed as "other").
const MAX_TABLES: usize = 200;
/// Primary-key columns shown per feed item, and characters per value.
const MAX_KEY_COLUMNS: usize = 8;
const MAX_KEY_CHARS: usize = 120;

const PAGE_HTML: &str = include_str!("page.html");
const PAGE_JS: &str = include_str!("page.js");

pub use crate::config::StatusConfig;

// ---------------------------------------------------------------------------
// The feed

/// One change as the feed shows it: metadata and key values only.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FeedItem {
    /// Commit time, Unix milliseconds.
    pub time: i64,
    pub table: String,
    pub kind: &'static str,
    pub lsn: String,
    /// Replica-identity columns and their text values (null: NULL or not sent).
    pub key: Vec<(String, Option<String>)>,
}

/// Where the hub hands changes while a status page is open.
pub struct Feed {
    watchers: AtomicUsize,
    tx: broadcast::Sender<Arc<FeedItem>>,
    /// Changes by table and kind counted while watched.
    by_table: Mutex<HashMap<String, [u64; 4]>>,
    /// Primary-key column names of tables whose replica identity does not say
    /// (`FULL`, `NOTHING`), read from the catalog by the sampler.
    primary_keys: Mutex<HashMap<u32, Arc<[String]>>>,
    /// Such tables seen in the feed whose primary key is not known yet.
    wanted: Mutex<Vec<(u32, String, String)>>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            watchers: AtomicUsize::new(0),
            tx: broadcast::channel(FEED_CAPACITY).0,
            by_table: Mutex::new(HashMap::new()),
            primary_keys: Mutex::new(HashMap::new()),
            wanted: Mutex::new(Vec::new()),
        }
    }
}

fn kind_index(kind: ChangeKind) -> usize {
    match kind {
        ChangeKind::Insert => 0,
        ChangeKind::Update => 1,
        ChangeKind::Delete => 2,
        ChangeKind::Truncate => 3,
    }
}

impl Feed {
    /// The hook for [`crate::route::hub::Hub::with_change_hook`].
    pub fn hook(self: &Arc<Self>) -> crate::route::hub::ChangeHook {
        let feed = self.clone();
        Arc::new(move |c: &Change| feed.change(c))
    }

    /// A change the hub routed; nothing happens unless a page is open.
    #[inline]
    pub fn change(&self, c: &Change) {
        if self.watchers.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.publish(c);
    }

    #[cold]
    fn publish(&self, c: &Change) {
        let table = format!("{}.{}", c.table.schema, c.table.name);
        if let Ok(mut m) = self.by_table.lock() {
            let n = m.len();
            let key = if n >= MAX_TABLES && !m.contains_key(&table) {
                "other".to_string()
            } else {
                table.clone()
            };
            m.entry(key).or_default()[kind_index(c.kind)] += 1;
        }
        let row = match c.kind {
            ChangeKind::Insert | ChangeKind::Update => c.new.as_ref(),
            ChangeKind::Delete => c.old.as_ref(),
            ChangeKind::Truncate => None,
        };
        let pk = self.primary_key_of(c);
        let key = row
            .map(|r| {
                c.table
                    .columns
                    .iter()
                    .zip(r.iter())
                    .filter(|(col, _)| match &pk {
                        None => col.key,
                        Some(names) => names.contains(&col.name),
                    })
                    .take(MAX_KEY_COLUMNS)
                    .map(|(col, cell)| {
                        let v = cell.text().map(|t| {
                            if t.chars().count() > MAX_KEY_CHARS {
                                let mut s: String = t.chars().take(MAX_KEY_CHARS).collect();
                                s.push('…');
                                s
                            } else {
                                t.to_string()
                            }
                        });
                        (col.name.clone(), v)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let item = FeedItem {
            time: c.txn.commit_time.unix_micros() / 1000,
            table,
            kind: c.kind.as_str(),
            lsn: c.txn.commit_lsn.to_string(),
            key,
        };
        // No receiver: the last viewer just left. Nothing to do.
        let _ = self.tx.send(Arc::new(item));
    }

    /// The primary key's column names when the replica identity does not give
    /// it (`None`: the identity columns are the key). A table not looked up yet
    /// shows no key until the sampler has read it (never all its columns).
    fn primary_key_of(&self, c: &Change) -> Option<Arc<[String]>> {
        use crate::decode::pgoutput::ReplicaIdentity;
        if matches!(
            c.table.replica_identity,
            ReplicaIdentity::Default | ReplicaIdentity::Index
        ) {
            return None;
        }
        let id = c.table.id.0;
        if let Some(k) = self.primary_keys.lock().ok()?.get(&id) {
            return Some(k.clone());
        }
        if let Ok(mut w) = self.wanted.lock() {
            if w.len() < MAX_TABLES && !w.iter().any(|(x, _, _)| *x == id) {
                w.push((id, c.table.schema.clone(), c.table.name.clone()));
            }
        }
        Some(Arc::from(Vec::new()))
    }

    /// Reads the primary keys of the tables the feed asked for.
    async fn resolve_keys(&self, catalog: &crate::source::catalog::Catalog) {
        let wanted = self
            .wanted
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default();
        for (id, schema, name) in wanted {
            match catalog.table(&schema, &name).await {
                Ok(t) => self.note_key(&t),
                // Dropped or unpublished meanwhile: show no key.
                Err(_) => self.note_key_names(id, Vec::new()),
            }
        }
    }

    /// Reads the primary keys of every published table (when a page opens), so
    /// the feed shows keys from the first change.
    async fn preload_keys(&self, catalog: &crate::source::catalog::Catalog) {
        let Ok(tables) = catalog.published_relations().await else {
            return;
        };
        for (id, schema, name) in tables.into_iter().take(MAX_TABLES) {
            let known = self
                .primary_keys
                .lock()
                .map(|m| m.contains_key(&id.0))
                .unwrap_or(true);
            if known {
                continue;
            }
            if let Ok(t) = catalog.table(&schema, &name).await {
                self.note_key(&t);
            }
        }
    }

    fn note_key(&self, t: &crate::decode::relation::Table) {
        let names = t
            .columns
            .iter()
            .filter(|c| c.key)
            .map(|c| c.name.clone())
            .collect();
        self.note_key_names(t.id.0, names);
    }

    fn note_key_names(&self, id: u32, names: Vec<String>) {
        if let Ok(mut m) = self.primary_keys.lock() {
            if m.len() < MAX_TABLES * 5 || m.contains_key(&id) {
                m.insert(id, Arc::from(names));
            }
        }
    }

    fn watch(self: &Arc<Self>) -> Watcher {
        self.watchers.fetch_add(1, Ordering::Relaxed);
        Watcher(self.clone())
    }
}

/// Counts an open page for as long as it lives.
struct Watcher(Arc<Feed>);

impl Drop for Watcher {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// Samples

/// One point of the plot: rates over the interval before `t`.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Sample {
    /// Unix milliseconds.
    pub t: i64,
    /// Changes per second, by kind (insert, update, delete, truncate).
    pub changes: [f64; 4],
    /// WebSocket messages per second sent to clients.
    pub messages: f64,
    /// Bytes per second sent to clients.
    pub bytes: f64,
    pub lag_seconds: f64,
    pub lag_bytes: u64,
    pub connected: bool,
}

#[derive(Clone, Copy)]
struct Counters {
    at: std::time::Instant,
    changes: [u64; 4],
    frames: u64,
    bytes: u64,
}

/// Decides when to log catch-up progress (pure, for tests).
#[derive(Debug, Default)]
pub struct CatchUp {
    /// (when, position reached) at the last log line.
    last: Option<(std::time::Instant, u64)>,
    catching_up: bool,
}

/// A catch-up log line.
#[derive(Debug, PartialEq)]
pub enum CatchUpLog {
    Progress {
        reached: Lsn,
        remaining_bytes: u64,
        bytes_per_sec: Option<f64>,
        eta_secs: Option<f64>,
    },
    Done {
        reached: Lsn,
    },
}

impl CatchUp {
    /// An observation: where the stream is (`received`) and the server's WAL
    /// position (`server`, as last polled; `None` when unknown).
    pub fn observe(
        &mut self,
        now: std::time::Instant,
        received: u64,
        server: Option<u64>,
        connected: bool,
    ) -> Option<CatchUpLog> {
        let server = server?;
        if !connected {
            return None;
        }
        let remaining = server.saturating_sub(received);
        if remaining < CATCHUP_MIN_BYTES {
            if self.catching_up {
                self.catching_up = false;
                self.last = None;
                return Some(CatchUpLog::Done {
                    reached: Lsn(received),
                });
            }
            return None;
        }
        let due = match self.last {
            None => true,
            Some((when, _)) => now.duration_since(when) >= CATCHUP_LOG_EVERY,
        };
        if !due {
            return None;
        }
        let bytes_per_sec = self.last.and_then(|(when, at)| {
            let secs = now.duration_since(when).as_secs_f64();
            (secs > 0.0).then(|| received.saturating_sub(at) as f64 / secs)
        });
        let eta_secs = bytes_per_sec
            .filter(|r| *r > 0.0)
            .map(|r| remaining as f64 / r);
        self.catching_up = true;
        self.last = Some((now, received));
        Some(CatchUpLog::Progress {
            reached: Lsn(received),
            remaining_bytes: remaining,
            bytes_per_sec,
            eta_secs,
        })
    }
}

// ---------------------------------------------------------------------------
// State

/// Everything the status routes need.
pub struct Status {
    metrics: Arc<Metrics>,
    hub: mpsc::Sender<HubCommand>,
    auth: Arc<Verifier>,
    token: Option<String>,
    slot: String,
    publication: String,
    feed: Arc<Feed>,
    catalog: Arc<crate::source::catalog::Catalog>,
    history: Mutex<VecDeque<Sample>>,
    /// Unix milliseconds since when replication is connected (0: not connected).
    connected_since: AtomicI64,
    server_version: Mutex<Option<String>>,
    /// A read of the server's version is under way.
    reading_version: std::sync::atomic::AtomicBool,
    /// For that read (an ordinary SQL connection, made only when a page or
    /// `walcast status --url` asks).
    conn: PgConnInfo,
    /// Per-table change rates over the last interval, while watched.
    table_rates: Mutex<Vec<(String, [f64; 4])>>,
    /// The latest snapshot, made by the sampler while a page is open.
    latest: watch::Sender<Option<Arc<Value>>>,
    stop: CancellationToken,
}

/// What [`Status::start`] needs.
pub struct StatusOptions {
    pub metrics: Arc<Metrics>,
    pub hub: mpsc::Sender<HubCommand>,
    pub auth: Arc<Verifier>,
    pub config: crate::config::ServeConfig,
    pub conn: PgConnInfo,
    pub feed: Arc<Feed>,
    pub catalog: Arc<crate::source::catalog::Catalog>,
    /// Ends the sampler and every open event stream.
    pub stop: CancellationToken,
}

impl Status {
    /// Starts the sampler; returns the state the routes share.
    pub fn start(o: StatusOptions) -> Arc<Status> {
        let status = Arc::new(Status {
            metrics: o.metrics,
            hub: o.hub,
            auth: o.auth,
            token: o.config.status.token.clone().filter(|t| !t.is_empty()),
            slot: o.config.postgres.slot.clone(),
            publication: o.config.postgres.publication.clone(),
            feed: o.feed,
            catalog: o.catalog,
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            connected_since: AtomicI64::new(0),
            server_version: Mutex::new(None),
            reading_version: std::sync::atomic::AtomicBool::new(false),
            conn: o.conn,
            table_rates: Mutex::new(Vec::new()),
            latest: watch::channel(None).0,
            stop: o.stop,
        });
        tokio::spawn(sampler(status.clone()));
        status
    }

    fn history(&self) -> Vec<Sample> {
        self.history
            .lock()
            .map(|h| h.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The subscriptions by table, asked of the hub (empty if it does not answer
    /// within a second).
    async fn census(&self) -> Vec<(String, u64)> {
        let (tx, rx) = oneshot::channel();
        if self.hub.try_send(HubCommand::Census(tx)).is_err() {
            return Vec::new();
        }
        tokio::time::timeout(Duration::from_secs(1), rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    }

    /// Everything the page shows, at this moment.
    pub async fn snapshot(&self) -> Value {
        let census = self.census().await;
        self.snapshot_with(census)
    }

    fn snapshot_with(&self, census: Vec<(String, u64)>) -> Value {
        let m = &self.metrics;
        let src = m.sources();
        let health = m.health();
        let slot = m.slot_view();
        let (checks, level) = checks(&health);
        let last = self.history.lock().ok().and_then(|h| h.back().copied());
        let ws = &src.ws;
        let hub = &src.hub;
        let stream = &src.stream;
        let since = self.connected_since.load(Ordering::Relaxed);
        let by_table: Vec<Value> = self
            .table_rates
            .lock()
            .map(|v| {
                v.iter()
                    .map(|(t, r)| {
                        json!({"table": t, "insert": r[0], "update": r[1], "delete": r[2], "truncate": r[3]})
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (rate_kinds, messages, bytes) = match last {
            Some(s) => (s.changes, s.messages, s.bytes),
            None => ([0.0; 4], 0.0, 0.0),
        };
        let gap = stream
            .last_gap
            .lock()
            .ok()
            .and_then(|g| *g)
            .map(|(a, b)| json!({"from": a.to_string(), "to": b.to_string()}));
        json!({
            "time": unix_millis(),
            "version": env!("CARGO_PKG_VERSION"),
            "level": level.as_str(),
            "ready": health.ready(),
            "checks": checks,
            "replication": {
                "connected": health.connected,
                "since": (since > 0).then_some(since),
                "disconnected_seconds": health.disconnected_seconds,
                "server_version": self.server_version.lock().ok().and_then(|v| v.clone()),
                "slot": self.slot,
                "publication": self.publication,
                "slot_exists": slot.polled.then_some(slot.exists),
                "confirmed_lsn": src.progress.confirmed().to_string(),
                "received_lsn": Lsn(stream.received.load(Ordering::Relaxed)).to_string(),
                "lag_bytes": health.lag_bytes,
                "lag_seconds": health.lag_seconds,
                "retained_wal_bytes": slot.retained_bytes,
                "wal_status": slot.wal_status,
                "reconnects": stream.reconnects.load(Ordering::Relaxed),
                "transactions": stream.transactions.load(Ordering::Relaxed),
                "gaps": stream.gaps.load(Ordering::Relaxed),
                "last_gap": gap,
                "blocked": health.blocked.as_ref().map(|(b, msg)| json!({"reason": b.as_str(), "message": msg})),
            },
            "rates": {
                "changes_per_sec": rate_kinds.iter().sum::<f64>(),
                "by_kind": {"insert": rate_kinds[0], "update": rate_kinds[1], "delete": rate_kinds[2], "truncate": rate_kinds[3]},
                "by_table": by_table,
                "messages_per_sec": messages,
                "bytes_per_sec": bytes,
            },
            "totals": {
                "changes": {
                    "insert": hub.changes_of(ChangeKind::Insert),
                    "update": hub.changes_of(ChangeKind::Update),
                    "delete": hub.changes_of(ChangeKind::Delete),
                    "truncate": hub.changes_of(ChangeKind::Truncate),
                },
                "messages": ws.frames_sent.load(Ordering::Relaxed),
                "bytes": ws.bytes_sent.load(Ordering::Relaxed),
            },
            "clients": {
                "connections": ws.connections.load(Ordering::Relaxed).max(0),
                "connections_total": ws.connections_total.load(Ordering::Relaxed),
                "channels": ws.channels.load(Ordering::Relaxed).max(0),
                "subscriptions": hub.subscriptions.load(Ordering::Relaxed),
                "subscriptions_by_table": census.iter().map(|(t, n)| json!({"table": t, "count": n})).collect::<Vec<_>>(),
                "drops": DropReason::ALL.iter().map(|&r| (r.as_str().to_string(), json!(ws.events.dropped(r)))).collect::<serde_json::Map<_, _>>(),
                "disconnects": DisconnectReason::ALL.iter().map(|&r| (r.as_str().to_string(), json!(ws.events.disconnects(r)))).collect::<serde_json::Map<_, _>>(),
                "auth_failures": AuthFailure::ALL.iter().map(|&r| (r.as_str().to_string(), json!(ws.events.auth_failures(r)))).collect::<serde_json::Map<_, _>>(),
            },
            // RLS mode: how each (table, role) seen so far is enforced.
            "rls": self.metrics.sources().rls.as_ref().map_or(Value::Null, |r| json!(r.reports())),
            // The change log, when `[log] dir` is set, and the replays served from it.
            "replay_log": self.metrics.sources().log.as_ref().map_or(Value::Null, |h| {
                let l = &h.stats;
                let r = &self.metrics.sources().replay;
                let stats = h.reader().map(|r| r.stats());
                let oldest = stats.as_ref().and_then(|s| s.oldest);
                json!({
                    "writable": l.writable.load(Ordering::Relaxed),
                    "transactions": l.transactions.load(Ordering::Relaxed),
                    "changes": l.changes.load(Ordering::Relaxed),
                    "syncs": l.syncs.load(Ordering::Relaxed),
                    "errors": l.errors.load(Ordering::Relaxed),
                    "resets": l.resets.load(Ordering::Relaxed),
                    // Size and range, once the log is open (null before).
                    "bytes": stats.as_ref().map(|s| s.bytes),
                    "segments": stats.as_ref().map(|s| s.segments),
                    "oldest_lsn": oldest.map(|o| o.commit_lsn.to_string()),
                    "oldest_age_seconds": oldest.map(|o| (unix_millis() * 1000 - o.commit_ts).max(0) as f64 / 1e6),
                    "newest_lsn": stats.as_ref().and_then(|s| s.newest).map(|n| n.commit_lsn.to_string()),
                    "replays": r.served.load(Ordering::Relaxed),
                    "replay_gaps": r.gaps.load(Ordering::Relaxed),
                    "replayed_changes": r.changes.load(Ordering::Relaxed),
                })
            }),
            "watchers": self.feed.watchers.load(Ordering::Relaxed),
            "sample": last,
        })
    }
}

/// The checks as `/ready` reports them, and the worst level among them (a lost
/// replication connection is critical at once, as on `/ready`).
fn checks(h: &Health) -> (Vec<Value>, Level) {
    let level = if !h.connected || h.blocked.is_some() {
        Level::Critical
    } else {
        h.level
    };
    (crate::server::metrics::ready_checks(h), level)
}

fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// The sampler

async fn sampler(st: Arc<Status>) {
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prev: Option<Counters> = None;
    let mut prev_tables: Option<(std::time::Instant, HashMap<String, [u64; 4]>)> = None;
    let mut catch_up = CatchUp::default();
    let mut was_connected = false;
    let mut last_tick = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = st.stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let src = st.metrics.sources();
        let now = std::time::Instant::now();
        let c = Counters {
            at: now,
            changes: [
                ChangeKind::Insert,
                ChangeKind::Update,
                ChangeKind::Delete,
                ChangeKind::Truncate,
            ]
            .map(|k| src.hub.changes_of(k)),
            frames: src.ws.frames_sent.load(Ordering::Relaxed),
            bytes: src.ws.bytes_sent.load(Ordering::Relaxed),
        };
        let health = st.metrics.health();
        let connected = health.connected;
        if connected && !was_connected {
            st.connected_since.store(unix_millis(), Ordering::Relaxed);
            // Read again when a page next asks (maybe a different server now).
            if let Ok(mut v) = st.server_version.lock() {
                *v = None;
            }
        } else if !connected {
            st.connected_since.store(0, Ordering::Relaxed);
        }
        was_connected = connected;
        if let Some(p) = prev {
            let secs = c.at.duration_since(p.at).as_secs_f64().max(1e-3);
            let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
            let s = Sample {
                t: unix_millis(),
                changes: [0, 1, 2, 3].map(|i| rate(c.changes[i], p.changes[i])),
                messages: rate(c.frames, p.frames),
                bytes: rate(c.bytes, p.bytes),
                lag_seconds: health.lag_seconds,
                lag_bytes: health.lag_bytes,
                connected,
            };
            if let Ok(mut h) = st.history.lock() {
                if h.len() >= HISTORY {
                    h.pop_front();
                }
                h.push_back(s);
            }
        }
        prev = Some(c);

        let slot = st.metrics.slot_view();
        let received = src.stream.received.load(Ordering::Relaxed);
        match catch_up.observe(
            now,
            received,
            slot.polled.then_some(slot.server_flush),
            connected,
        ) {
            Some(CatchUpLog::Progress {
                reached,
                remaining_bytes,
                bytes_per_sec,
                eta_secs,
            }) => tracing::info!(
                slot = %st.slot,
                %reached,
                remaining_bytes,
                bytes_per_sec = bytes_per_sec.map(|r| r.round() as u64),
                eta_secs = eta_secs.map(|s| s.round() as u64),
                "catching up with the server's WAL"
            ),
            Some(CatchUpLog::Done { reached }) => {
                tracing::info!(slot = %st.slot, %reached, "caught up with the server's WAL")
            }
            None => {}
        }

        // Work for open pages only.
        if st.feed.watchers.load(Ordering::Relaxed) == 0 {
            if prev_tables.take().is_some() {
                if let Ok(mut m) = st.feed.by_table.lock() {
                    m.clear();
                }
            }
            last_tick = now;
            continue;
        }
        let counts = st
            .feed
            .by_table
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        // The first tick watched counts from the previous one: the hook counts
        // since the first page opened, and the map was empty before.
        let (at, before) = prev_tables.get_or_insert_with(|| (last_tick, HashMap::new()));
        {
            let secs = now.duration_since(*at).as_secs_f64().max(1e-3);
            let mut rates: Vec<(String, [f64; 4])> = counts
                .iter()
                .map(|(t, n)| {
                    let b = before.get(t).copied().unwrap_or_default();
                    (
                        t.clone(),
                        [0, 1, 2, 3].map(|i| n[i].saturating_sub(b[i]) as f64 / secs),
                    )
                })
                .collect();
            rates.sort_by(|a, b| {
                let sa: f64 = a.1.iter().sum();
                let sb: f64 = b.1.iter().sum();
                sb.total_cmp(&sa).then_with(|| a.0.cmp(&b.0))
            });
            if let Ok(mut r) = st.table_rates.lock() {
                *r = rates;
            }
        }
        prev_tables = Some((now, counts));
        last_tick = now;
        st.feed.resolve_keys(&st.catalog).await;
        want_server_version(&st);
        let census = st.census().await;
        let snap = st.snapshot_with(census);
        st.latest.send_replace(Some(Arc::new(snap)));
    }
}

/// Starts reading the server's version unless it is known or being read.
fn want_server_version(st: &Arc<Status>) {
    let known = st
        .server_version
        .lock()
        .map(|v| v.is_some())
        .unwrap_or(true);
    if known || st.reading_version.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(read_server_version(st.clone()));
}

async fn read_server_version(st: Arc<Status>) {
    let conn = st.conn.clone();
    let read = async {
        let c = crate::source::tls::connect_sql(&conn).await.ok()?;
        let row = c.query_one("show server_version", &[]).await.ok()?;
        row.try_get::<_, String>(0).ok()
    };
    if let Ok(Some(v)) = tokio::time::timeout(Duration::from_secs(10), read).await {
        if let Ok(mut s) = st.server_version.lock() {
            *s = Some(v);
        }
    }
    st.reading_version.store(false, Ordering::Release);
}

// ---------------------------------------------------------------------------
// HTTP

/// `/status`, `/status/app.js`, `/status/events` and `/status.json`.
pub fn routes(status: Arc<Status>) -> Router {
    Router::new()
        .route("/status", get(page))
        .route("/status/app.js", get(script))
        .route("/status/events", get(events))
        .route("/status.json", get(snapshot))
        .with_state(status)
}

/// Compares two secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn refuse(code: StatusCode, message: &str) -> Response {
    (
        code,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({"error": message})),
    )
        .into_response()
}

impl Status {
    /// Whether this request may see the status page; the refusal otherwise.
    async fn admit(
        &self,
        peer: SocketAddr,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
    ) -> Result<(), Response> {
        let token = crate::route::auth::request_token(headers, query);
        if let (Some(want), Some(got)) = (&self.token, token) {
            if same_secret(want, got) {
                return Ok(());
            }
        }
        let events = &self.metrics.sources().ws.events;
        if self.auth.enabled() {
            let Some(token) = token else {
                events.auth_failed(AuthFailure::MissingToken, peer);
                return Err(refuse(
                    StatusCode::UNAUTHORIZED,
                    "the status page needs a token of a role in auth.bypass_roles, or [status] token (Authorization: Bearer, or ?apikey=)",
                ));
            };
            return match self.auth.verify(token).await {
                Ok(v)
                    if v.role().is_some_and(|r| {
                        self.auth.config().bypass_roles.iter().any(|b| b == r)
                    }) =>
                {
                    Ok(())
                }
                Ok(_) => {
                    events.auth_failed(AuthFailure::Forbidden, peer);
                    Err(refuse(
                        StatusCode::FORBIDDEN,
                        "the status page is for roles in auth.bypass_roles (or [status] token) only",
                    ))
                }
                Err(e) => {
                    // A wrong [status] token lands here too.
                    events.auth_failed(AuthFailure::of(&e), peer);
                    Err(refuse(StatusCode::UNAUTHORIZED, &e.to_string()))
                }
            };
        }
        if peer.ip().is_loopback() || peer.ip().to_canonical().is_loopback() {
            return Ok(());
        }
        if token.is_some() {
            events.auth_failed(AuthFailure::InvalidToken, peer);
        }
        Err(refuse(
            StatusCode::FORBIDDEN,
            "without [auth] mode = \"jwt\", the status page is served to loopback only; set [status] token to open it from elsewhere",
        ))
    }
}

async fn page(
    State(st): State<Arc<Status>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = st.admit(peer, &headers, &q).await {
        return r;
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE_HTML,
    )
        .into_response()
}

async fn script() -> Response {
    // The script holds no data; it may be loaded by anyone.
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE_JS,
    )
        .into_response()
}

async fn snapshot(
    State(st): State<Arc<Status>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = st.admit(peer, &headers, &q).await {
        return r;
    }
    // One-off readers (`walcast status --url`) get the version in this answer.
    let unknown = st
        .server_version
        .lock()
        .map(|v| v.is_none())
        .unwrap_or(false);
    if unknown && !st.reading_version.swap(true, Ordering::AcqRel) {
        read_server_version(st.clone()).await;
    }
    let mut v = st.snapshot().await;
    if q.get("history").is_some_and(|h| h == "1" || h == "true") {
        v["history"] = json!(st.history());
    }
    ([(header::CACHE_CONTROL, "no-store")], Json(v)).into_response()
}

fn event(name: &str, data: &impl serde::Serialize) -> Event {
    Event::default()
        .event(name)
        .json_data(data)
        .unwrap_or_else(|_| Event::default().event(name).data("null"))
}

/// What an open event stream holds.
struct Stream {
    st: Arc<Status>,
    _watcher: Watcher,
    feed: broadcast::Receiver<Arc<FeedItem>>,
    latest: watch::Receiver<Option<Arc<Value>>>,
    hello: Option<Value>,
}

async fn events(
    State(st): State<Arc<Status>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = st.admit(peer, &headers, &q).await {
        return r;
    }
    // At most a couple of seconds; the sampler catches up on what is missing.
    let _ = tokio::time::timeout(Duration::from_secs(2), st.feed.preload_keys(&st.catalog)).await;
    want_server_version(&st);
    let watcher = st.feed.watch();
    let feed = st.feed.tx.subscribe();
    let mut latest = st.latest.subscribe();
    latest.mark_unchanged();
    let hello = json!({"snapshot": st.snapshot().await, "history": st.history(), "sample_every_ms": SAMPLE_EVERY.as_millis() as u64, "history_len": HISTORY});
    let s = Stream {
        st: st.clone(),
        _watcher: watcher,
        feed,
        latest,
        hello: Some(hello),
    };
    let stream = futures::stream::unfold(s, |mut s| async move {
        if let Some(h) = s.hello.take() {
            return Some((Ok::<_, Infallible>(event("hello", &h)), s));
        }
        let ev = tokio::select! {
            _ = s.st.stop.cancelled() => return None,
            r = s.latest.changed() => match r {
                Ok(()) => {
                    let v = s.latest.borrow_and_update().clone();
                    match v {
                        Some(v) => event("snapshot", &*v),
                        None => Event::default().comment(""),
                    }
                }
                Err(_) => return None,
            },
            r = s.feed.recv() => match r {
                Ok(item) => event("change", &*item),
                Err(broadcast::error::RecvError::Lagged(n)) => event("skipped", &json!({"count": n})),
                Err(broadcast::error::RecvError::Closed) => return None,
            },
        };
        Some((Ok(ev), s))
    });
    let mut resp = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    // The connection ends with the stream: its deadline (see below) goes with it.
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    resp.extensions_mut()
        .insert(crate::server::listener::LongLived);
    resp
}

// ---------------------------------------------------------------------------
// `walcast status --url`

/// The `/status.json` URL of a walcast given as `http://host:port` (or the page's
/// URL).
pub fn summary_url(base: &str) -> Result<String, String> {
    let b = base.trim().trim_end_matches('/');
    if !(b.starts_with("http://") || b.starts_with("https://")) {
        return Err(format!(
            "--url {base:?}: expected walcast's HTTP address, such as http://127.0.0.1:4000"
        ));
    }
    let b = b
        .split_once('?')
        .map_or(b, |(a, _)| a)
        .trim_end_matches('/')
        .trim_end_matches("/status")
        .trim_end_matches("/status.json");
    Ok(format!("{b}/status.json"))
}

/// Reads a running walcast's `/status.json` (blocking; 10 s timeout).
pub fn fetch_summary(base: &str, token: Option<&str>) -> Result<Value, String> {
    let url = summary_url(base)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.get(&url);
    if let Some(t) = token {
        req = req.header("authorization", &format!("Bearer {t}"));
    }
    let mut resp = req.call().map_err(|e| format!("{url}: {e}"))?;
    let code = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(4 << 20)
        .read_to_string()
        .map_err(|e| format!("{url}: {e}"))?;
    if code != 200 {
        let why = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(body);
        return Err(format!("{url}: HTTP {code}: {why}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("{url}: not a walcast status ({e})"))
}

fn human_bytes(v: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = v;
    let mut i = 0;
    while x >= 1024.0 && i < units.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{x:.0} {}", units[i])
    } else {
        format!("{x:.1} {}", units[i])
    }
}

/// The live summary as text, one fact per line.
pub fn summary_text(v: &Value) -> String {
    let f = |x: &Value| x.as_f64().unwrap_or(0.0);
    let s = |x: &Value| x.as_str().unwrap_or("-").to_string();
    let r = &v["replication"];
    let rates = &v["rates"];
    let c = &v["clients"];
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    line(format!(
        "walcast {}: {}{}",
        s(&v["version"]),
        s(&v["level"]),
        if v["ready"].as_bool() == Some(true) {
            " (ready)"
        } else {
            " (not ready)"
        }
    ));
    let failing: Vec<String> = v["checks"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|c| c["level"] != "normal")
                .map(|c| format!("{} = {} ({})", s(&c["name"]), c["value"], s(&c["level"])))
                .collect()
        })
        .unwrap_or_default();
    if !failing.is_empty() {
        line(format!("  checks:       {}", failing.join(", ")));
    }
    let state = if r["connected"].as_bool() == Some(true) {
        "connected".to_string()
    } else {
        format!("DISCONNECTED for {:.0} s", f(&r["disconnected_seconds"]))
    };
    line(format!(
        "  replication:  {state}, slot {} (wal_status {}), publication {}, server {}",
        s(&r["slot"]),
        s(&r["wal_status"]),
        s(&r["publication"]),
        s(&r["server_version"])
    ));
    line(format!(
        "  position:     confirmed {}, received {}",
        s(&r["confirmed_lsn"]),
        s(&r["received_lsn"])
    ));
    line(format!(
        "  lag:          {:.1} s, {} behind; retained WAL {}",
        f(&r["lag_seconds"]),
        human_bytes(f(&r["lag_bytes"])),
        human_bytes(f(&r["retained_wal_bytes"]))
    ));
    if let Some(b) = r["blocked"].as_object() {
        line(format!(
            "  BLOCKED:      {}: {}",
            s(&b["reason"]),
            s(&b["message"])
        ));
    }
    let k = &rates["by_kind"];
    line(format!(
        "  rates:        {:.1} changes/s (insert {:.1}, update {:.1}, delete {:.1}), {:.1} messages/s, {}/s sent",
        f(&rates["changes_per_sec"]),
        f(&k["insert"]),
        f(&k["update"]),
        f(&k["delete"]),
        f(&rates["messages_per_sec"]),
        human_bytes(f(&rates["bytes_per_sec"]))
    ));
    let sum = |o: &Value| -> u64 {
        o.as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0)
    };
    line(format!(
        "  clients:      {} connections, {} channels, {} subscriptions; {} dropped, {} auth failures",
        c["connections"],
        c["channels"],
        c["subscriptions"],
        sum(&c["drops"]),
        sum(&c["auth_failures"])
    ));
    if let Some(subs) = c["subscriptions_by_table"].as_array() {
        for t in subs.iter().take(10) {
            line(format!("    {:<30} {}", s(&t["table"]), t["count"]));
        }
    }
    let l = &v["replay_log"];
    if l.is_object() {
        let state = if l["writable"].as_bool() == Some(true) {
            "writing"
        } else {
            "NOT WRITABLE (nothing more is confirmed to PostgreSQL)"
        };
        let range = if l["oldest_lsn"].is_string() {
            format!(
                ", oldest {} ({:.0} s old), newest {}",
                s(&l["oldest_lsn"]),
                f(&l["oldest_age_seconds"]),
                s(&l["newest_lsn"])
            )
        } else {
            String::new()
        };
        line(format!(
            "  change log:   {state}, {} in {} segments{range}; {} transactions, {} errors",
            human_bytes(f(&l["bytes"])),
            l["segments"].as_u64().unwrap_or(0),
            l["transactions"],
            l["errors"]
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catch_up_logs_progress_at_intervals_then_done() {
        let mut c = CatchUp::default();
        let t0 = std::time::Instant::now();
        let gib = 1u64 << 30;
        // Unknown server position, or disconnected: nothing.
        assert_eq!(c.observe(t0, 0, None, true), None);
        assert_eq!(c.observe(t0, 0, Some(gib), false), None);
        // Far behind: logged at once, without a rate yet.
        assert_eq!(
            c.observe(t0, 0, Some(gib), true),
            Some(CatchUpLog::Progress {
                reached: Lsn(0),
                remaining_bytes: gib,
                bytes_per_sec: None,
                eta_secs: None
            })
        );
        // Not again before the interval.
        assert_eq!(
            c.observe(t0 + Duration::from_secs(2), gib / 8, Some(gib), true),
            None
        );
        // After it: rate and ETA.
        let t1 = t0 + CATCHUP_LOG_EVERY;
        match c.observe(t1, gib / 2, Some(gib), true) {
            Some(CatchUpLog::Progress {
                remaining_bytes,
                bytes_per_sec: Some(r),
                eta_secs: Some(eta),
                ..
            }) => {
                assert_eq!(remaining_bytes, gib / 2);
                assert!((r - (gib / 2) as f64 / 10.0).abs() < 1.0);
                assert!((eta - 10.0).abs() < 0.01);
            }
            other => panic!("{other:?}"),
        }
        // Caught up: one line, then quiet.
        assert_eq!(
            c.observe(t1 + Duration::from_secs(1), gib, Some(gib), true),
            Some(CatchUpLog::Done { reached: Lsn(gib) })
        );
        assert_eq!(
            c.observe(t1 + Duration::from_secs(30), gib, Some(gib), true),
            None
        );
    }

    #[test]
    fn small_lag_is_not_a_catch_up() {
        let mut c = CatchUp::default();
        let t0 = std::time::Instant::now();
        assert_eq!(c.observe(t0, 100, Some(100 + 1024 * 1024), true), None);
    }

    #[test]
    fn the_summary_has_a_line_for_the_change_log_when_there_is_one() {
        let v = json!({"replay_log": {"writable": true, "bytes": 3 * 1024 * 1024, "segments": 2,
            "oldest_lsn": "0/16B3748", "oldest_age_seconds": 3600.4, "newest_lsn": "0/2000000",
            "transactions": 12, "errors": 0}});
        let text = summary_text(&v);
        let line = text
            .lines()
            .find(|l| l.contains("change log:"))
            .expect(&text);
        assert!(line.contains("writing, 3.0 MiB in 2 segments, oldest 0/16B3748 (3600 s old), newest 0/2000000; 12 transactions, 0 errors"), "{line}");
        let v = json!({"replay_log": {"writable": false, "bytes": null, "segments": null,
            "oldest_lsn": null, "transactions": 0, "errors": 1}});
        assert!(summary_text(&v).contains("change log:   NOT WRITABLE"));
        assert!(!summary_text(&json!({"replay_log": null})).contains("change log"));
    }

    #[test]
    fn summary_url_accepts_the_base_or_the_page() {
        for u in [
            "http://127.0.0.1:4000",
            "http://127.0.0.1:4000/",
            "http://127.0.0.1:4000/status",
            "http://127.0.0.1:4000/status?apikey=x",
        ] {
            assert_eq!(
                summary_url(u).unwrap(),
                "http://127.0.0.1:4000/status.json",
                "{u}"
            );
        }
        assert!(summary_url("127.0.0.1:4000").is_err());
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
        assert!(!same_secret("", "a"));
    }

    #[test]
    fn status_config_hides_the_token() {
        let c = StatusConfig {
            token: Some("s3cret".into()),
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
