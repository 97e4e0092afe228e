//! Sync-health metrics (Prometheus text at `/metrics`), health levels, `/ready`.
//!
//! # What is measured, and how
//!
//! The pipeline stages keep plain atomics ([`StreamState`], [`HubStats`],
//! [`WsStats`]); nothing on the hot path takes a lock for metrics. At scrape time a
//! custom [`Collector`] reads those atomics and builds the metric families, so a
//! value is never stale and never double-kept. The two things the stages cannot
//! know are polled: the slot's position on the server (`pg_current_wal_lsn()`
//! against the slot's `confirmed_flush_lsn` and `restart_lsn`, and its
//! `wal_status`), read every `health.slot_poll_interval_secs` over an ordinary SQL
//! connection. Process metrics (CPU, RSS, open fds) come from the `prometheus`
//! crate's process collector. Everything is registered on one explicit
//! [`Registry`]; names follow `walcast_<noun>_<unit>[_total]` and every label has
//! a fixed, small set of values (see the README's "Metrics" section).
//!
//! # Lag in seconds
//!
//! `walcast_replication_lag_seconds` is "now minus the commit time of the last
//! transaction the hub finished", **but 0 when walcast is caught up**: a quiet
//! database is not a lagging one. walcast counts as caught up when downstream has
//! confirmed every transaction the stream handed it *and* the walsender has read
//! the server's WAL up to its flush position as of the last poll
//! (`pg_stat_replication.sent_lsn`, or the last position the server reported to
//! walcast when that view is not readable). When not caught up, the lag is also
//! bounded by the time since walcast was last seen caught up, so a single slow
//! poll after hours of quiet does not report hours of lag.
//!
//! # Health levels
//!
//! Each check — lag seconds, lag bytes, seconds disconnected from PostgreSQL and
//! client drops per minute — is `normal` (0), `warning` (1) or `critical` (2)
//! against the `[health]` thresholds; `walcast_health_status` is the worst of
//! them. `/ready` is 200 when replication is connected, not blocked (a dropped
//! slot or publication, see [`Blocked`]; always critical), the change log (with
//! `[log] dir`) can be written ([`LogHealth`]; a log that cannot is critical:
//! nothing more is confirmed to PostgreSQL) and neither lag check is critical,
//! else 503, and names each check with its value, thresholds and level.
//! `/health` only says the process is alive.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{Registry, TextEncoder};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::changelog::stage::LogHandle;
use crate::config::{HealthConfig, PgConnInfo};
use crate::decode::event::ChangeKind;
use crate::deliver::broadcast::BroadcastStats;
use crate::deliver::socket::WsStats;
use crate::deliver::stats::{AuthFailure, DisconnectReason, DropReason, RefuseReason};
use crate::route::hub::{HubStats, LatencyHistogram, LATENCY_BUCKETS};
use crate::source::session::{Blocked, Progress, StreamState};

/// How long a slot poll (connect or query) may take before it counts as failed.
const SLOT_POLL_TIMEOUT: Duration = Duration::from_secs(10);

/// Window over which the client drop rate is measured.
const DROP_RATE_WINDOW: Duration = Duration::from_secs(60);

/// How often health is re-evaluated in the background (drop-rate samples, level
/// transitions in the log) between scrapes.
const HEALTH_TICK: Duration = Duration::from_secs(1);

/// Where the metrics read their values.
pub struct Sources {
    pub stream: Arc<StreamState>,
    pub progress: Arc<Progress>,
    pub hub: Arc<HubStats>,
    pub ws: Arc<WsStats>,
    pub broadcast: Arc<BroadcastStats>,
    /// The change log stage (its counters, and its reader for size and range),
    /// when `[log] dir` is set.
    pub log: Option<LogHandle>,
    /// Replays from the change log to channels that resume.
    pub replay: Arc<crate::deliver::replay::ReplayStats>,
    /// RLS mode, when on: its counters and how each table is enforced.
    pub rls: Option<Arc<crate::route::rls::Rls>>,
}

/// `wal_status` values of `pg_replication_slots` (PostgreSQL 13+).
const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// The slot as last read from the server.
#[derive(Clone, Debug, Default)]
struct SlotSnapshot {
    /// At least one poll succeeded.
    polled: bool,
    exists: bool,
    /// The server's WAL flush position at the poll.
    server_flush: u64,
    lag_bytes: u64,
    retained_bytes: u64,
    wal_status: Option<String>,
    /// How far the slot's walsender had read WAL (None: not visible to this role).
    sent: Option<u64>,
}

#[derive(Debug)]
struct Tracker {
    last_caught_up_unix_micros: i64,
    /// (when, clients dropped so far), oldest first, spanning [`DROP_RATE_WINDOW`].
    drops: VecDeque<(Instant, u64)>,
}

/// A level of a check or of the whole daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Normal = 0,
    Warning = 1,
    Critical = 2,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Warning => "warning",
            Level::Critical => "critical",
        }
    }

    fn of(value: f64, warning: u64, critical: u64) -> Level {
        if value >= critical as f64 {
            Level::Critical
        } else if value >= warning as f64 {
            Level::Warning
        } else {
            Level::Normal
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One health check's outcome.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub value: f64,
    pub warning: u64,
    pub critical: u64,
    pub level: Level,
}

/// The daemon's health at one moment.
#[derive(Clone, Debug)]
pub struct Health {
    pub connected: bool,
    pub lag_seconds: f64,
    pub lag_bytes: u64,
    pub disconnected_seconds: f64,
    pub drops_per_minute: f64,
    pub checks: Vec<Check>,
    pub level: Level,
    /// A slot or publication problem that stops streaming until an operator acts
    /// (always critical), with what to do about it.
    pub blocked: Option<(Blocked, String)>,
    /// The change log's state, when `[log] dir` is set.
    pub log: Option<LogHealth>,
}

/// Whether the change log can be written (`walcast_log_writable`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogHealth {
    Writable,
    /// Not opened yet (it opens when the replication stream starts): nothing is
    /// confirmed to PostgreSQL until it is; not ready, but not a failure.
    Opening,
    /// A write or the open failed: delivery goes on, but nothing more is
    /// confirmed to PostgreSQL until the log can be written again. Critical.
    NotWritable,
}

impl LogHealth {
    pub const NOT_WRITABLE: &'static str = "change log not writable: nothing more is confirmed to PostgreSQL until it can be written (see walcast_log_errors_total and the error in walcast's log)";
    pub const OPENING: &'static str =
        "change log not open yet: nothing is confirmed to PostgreSQL until it opens";

    fn of(stats: &crate::changelog::stage::LogStageStats) -> LogHealth {
        if stats.writable.load(Ordering::Relaxed) {
            LogHealth::Writable
        } else if stats.errors.load(Ordering::Relaxed) > 0 {
            LogHealth::NotWritable
        } else {
            LogHealth::Opening
        }
    }
}

impl Health {
    /// Replication connected, not blocked, the change log (if any) writable, and
    /// neither lag check critical.
    pub fn ready(&self) -> bool {
        self.connected
            && self.blocked.is_none()
            && self.log.is_none_or(|l| l == LogHealth::Writable)
            && self
                .checks
                .iter()
                .filter(|c| c.name == "lag_seconds" || c.name == "lag_bytes")
                .all(|c| c.level < Level::Critical)
    }
}

struct State_ {
    src: Sources,
    health: HealthConfig,
    started_unix_micros: i64,
    slot: Mutex<SlotSnapshot>,
    tracker: Mutex<Tracker>,
    slot_poll_errors: AtomicU64,
    /// The level last evaluated, to log transitions.
    level: AtomicU8,
}

/// The registry and everything the metrics endpoints need.
pub struct Metrics {
    registry: Registry,
    state: Arc<State_>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot register metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    pub fn new(src: Sources, health: HealthConfig) -> Result<Metrics, MetricsError> {
        let now = unix_now_micros();
        let state = Arc::new(State_ {
            src,
            health,
            started_unix_micros: now,
            slot: Mutex::new(SlotSnapshot::default()),
            tracker: Mutex::new(Tracker {
                last_caught_up_unix_micros: now,
                drops: VecDeque::new(),
            }),
            slot_poll_errors: AtomicU64::new(0),
            level: AtomicU8::new(0),
        });
        let registry = Registry::new();
        registry.register(Box::new(SyncCollector::new(state.clone())?))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Metrics { registry, state })
    }

    /// Adds a collector (the cluster roles' families) to what `/metrics` shows.
    pub fn register(&self, c: Box<dyn Collector>) -> Result<(), MetricsError> {
        Ok(self.registry.register(c)?)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let families = self.registry.gather();
        TextEncoder::new().encode_to_string(&families)
    }

    /// Evaluates every health check now.
    pub fn health(&self) -> Health {
        self.state.evaluate()
    }
}

impl State_ {
    fn evaluate(&self) -> Health {
        let now = unix_now_micros();
        let s = &self.src.stream;
        let connected = s.connected.load(Ordering::Acquire);
        let disconnected_seconds = if connected {
            0.0
        } else {
            let since = s.disconnected_since.load(Ordering::Relaxed);
            let since_micros = if since > 0 {
                since.saturating_mul(1_000_000)
            } else {
                self.started_unix_micros
            };
            secs_between(since_micros, now)
        };
        let slot = self.slot.lock().map(|g| g.clone()).unwrap_or_default();
        let downstream_idle =
            self.src.progress.confirmed().0 >= s.handed_commit_end.load(Ordering::Acquire);
        let server_read = if slot.polled {
            let seen = slot
                .sent
                .unwrap_or(0)
                .max(s.received.load(Ordering::Relaxed));
            seen >= slot.server_flush
        } else {
            true
        };
        let caught_up = connected && downstream_idle && server_read;
        let last_commit = self.src.hub.last_commit_unix_micros.load(Ordering::Relaxed);
        let dropped = self.src.ws.events.dropped_total();
        let (lag_seconds, drops_per_minute) = match self.tracker.lock() {
            Ok(mut t) => {
                let lag = if caught_up {
                    t.last_caught_up_unix_micros = now;
                    0.0
                } else {
                    secs_between(last_commit.max(t.last_caught_up_unix_micros), now)
                };
                let at = Instant::now();
                while t.drops.len() > 1
                    && t.drops
                        .get(1)
                        .is_some_and(|(when, _)| at.duration_since(*when) >= DROP_RATE_WINDOW)
                {
                    t.drops.pop_front();
                }
                if t.drops
                    .back()
                    .is_none_or(|(when, _)| at.duration_since(*when) >= Duration::from_millis(500))
                {
                    t.drops.push_back((at, dropped));
                }
                let rate = match t.drops.front() {
                    Some(&(when, n)) => {
                        // Drops within the last window, per minute (a younger
                        // history counts as a full window, so one drop at startup
                        // is not a storm).
                        let span = at
                            .duration_since(when)
                            .as_secs_f64()
                            .max(DROP_RATE_WINDOW.as_secs_f64());
                        dropped.saturating_sub(n) as f64 * 60.0 / span
                    }
                    None => 0.0,
                };
                (lag, rate)
            }
            Err(_) => (0.0, 0.0),
        };
        let h = &self.health;
        let check = |name, value: f64, warning, critical| Check {
            name,
            value,
            warning,
            critical,
            level: Level::of(value, warning, critical),
        };
        let checks = vec![
            check(
                "lag_seconds",
                lag_seconds,
                h.lag_seconds_warning,
                h.lag_seconds_critical,
            ),
            check(
                "lag_bytes",
                slot.lag_bytes as f64,
                h.lag_bytes_warning,
                h.lag_bytes_critical,
            ),
            check(
                "disconnected_seconds",
                disconnected_seconds,
                h.disconnected_seconds_warning,
                h.disconnected_seconds_critical,
            ),
            check(
                "client_drops_per_minute",
                drops_per_minute,
                h.client_drops_per_minute_warning,
                h.client_drops_per_minute_critical,
            ),
        ];
        let blocked = s.blocked().map(|b| (b, s.blocked_message()));
        let log = self.src.log.as_ref().map(|l| LogHealth::of(&l.stats));
        let level = checks
            .iter()
            .map(|c| c.level)
            .max()
            .unwrap_or(Level::Normal)
            .max(
                if blocked.is_some() || log == Some(LogHealth::NotWritable) {
                    Level::Critical
                } else {
                    Level::Normal
                },
            );
        let health = Health {
            blocked,
            connected,
            lag_seconds,
            lag_bytes: slot.lag_bytes,
            disconnected_seconds,
            drops_per_minute,
            checks,
            level,
            log,
        };
        self.note_level(&health);
        health
    }

    /// Logs a change of the overall level, naming the checks that are not normal.
    fn note_level(&self, h: &Health) {
        let before = self.level.swap(h.level as u8, Ordering::Relaxed);
        if before == h.level as u8 {
            return;
        }
        let mut failing: Vec<String> = h
            .checks
            .iter()
            .filter(|c| c.level > Level::Normal)
            .map(|c| format!("{}={:.0} ({})", c.name, c.value, c.level))
            .collect();
        if let Some((b, _)) = &h.blocked {
            failing.push(format!("replication_blocked={} (critical)", b.as_str()));
        }
        if h.log == Some(LogHealth::NotWritable) {
            failing.push("log_writable=0 (critical)".into());
        }
        let failing = failing.join(", ");
        match h.level {
            Level::Normal => tracing::info!(level = %h.level, "health back to normal"),
            Level::Warning => {
                tracing::warn!(level = %h.level, checks = %failing, "health degraded")
            }
            Level::Critical => {
                tracing::error!(level = %h.level, checks = %failing, "health critical")
            }
        }
    }

    /// A failed slot poll: logs it (loudly on the first of a run) and counts it.
    fn slot_poll_failed(&self, slot: &str, error: &str) {
        let before = self.slot_poll_errors.fetch_add(1, Ordering::Relaxed);
        let first = self.slot.lock().map(|s| s.polled).unwrap_or(false) || before == 0;
        if first {
            tracing::warn!(%slot, %error, "cannot read the slot's position; lag metrics are stale");
        } else {
            tracing::debug!(%slot, %error, "slot poll failed");
        }
        if let Ok(mut s) = self.slot.lock() {
            // Keep the last values, but do not warn again until a poll succeeds.
            s.polled = false;
        }
    }
}

/// A histogram in Prometheus's form.
fn histogram_proto(hist: &LatencyHistogram) -> proto::Histogram {
    let (counts, sum_micros) = hist.snapshot();
    let mut h = proto::Histogram::default();
    let mut cumulative = 0u64;
    let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len());
    for (i, &bound) in LATENCY_BUCKETS.iter().enumerate() {
        cumulative += counts[i];
        let mut b = proto::Bucket::default();
        b.set_upper_bound(bound);
        b.set_cumulative_count(cumulative);
        buckets.push(b);
    }
    cumulative += counts[LATENCY_BUCKETS.len()];
    h.set_bucket(buckets);
    h.set_sample_count(cumulative);
    h.set_sample_sum(sum_micros as f64 / 1e6);
    h
}

fn unix_now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn secs_between(from_micros: i64, to_micros: i64) -> f64 {
    (to_micros.saturating_sub(from_micros).max(0)) as f64 / 1e6
}

// ---------------------------------------------------------------------------
// The collector

/// The kinds of change, in the order of [`HubStats::changes_by_kind`].
const CHANGE_KINDS: [(ChangeKind, &str); 4] = [
    (ChangeKind::Insert, "insert"),
    (ChangeKind::Update, "update"),
    (ChangeKind::Delete, "delete"),
    (ChangeKind::Truncate, "truncate"),
];

const HEALTH_CHECKS: [&str; 4] = [
    "lag_seconds",
    "lag_bytes",
    "disconnected_seconds",
    "client_drops_per_minute",
];

/// (name, help, type, label) of every family the collector exports.
const FAMILIES: &[(&str, &str, MetricType, Option<&str>)] = &[
    ("walcast_build_info", "walcast's version (always 1).", MetricType::GAUGE, Some("version")),
    ("walcast_replication_connected", "1 while the replication stream is connected and streaming, else 0.", MetricType::GAUGE, None),
    ("walcast_replication_reconnects_total", "Times the replication stream was lost and walcast reconnected.", MetricType::COUNTER, None),
    ("walcast_replication_disconnected_seconds", "Seconds since the replication stream was lost (0 while connected).", MetricType::GAUGE, None),
    ("walcast_replication_lag_seconds", "Now minus the commit time of the last transaction processed; 0 when caught up with the server.", MetricType::GAUGE, None),
    ("walcast_slot_lag_bytes", "pg_current_wal_lsn() minus the slot's confirmed_flush_lsn, as last polled.", MetricType::GAUGE, None),
    ("walcast_slot_retained_wal_bytes", "pg_current_wal_lsn() minus the slot's restart_lsn: WAL the server keeps for the slot.", MetricType::GAUGE, None),
    ("walcast_slot_wal_status", "The slot's wal_status (1 for the current value; all 0 when the slot is missing).", MetricType::GAUGE, Some("status")),
    ("walcast_slot_exists", "1 when the replication slot exists on the server, as last polled.", MetricType::GAUGE, None),
    ("walcast_replication_blocked", "1 while streaming is stopped by a slot or publication problem that needs an operator, by reason (see /ready).", MetricType::GAUGE, Some("reason")),
    ("walcast_replication_gaps_total", "Times walcast found its slot re-created or advanced past the position it had confirmed (changes in between were not delivered).", MetricType::COUNTER, None),
    ("walcast_slot_poll_errors_total", "Failed reads of the slot's position from PostgreSQL.", MetricType::COUNTER, None),
    ("walcast_transactions_total", "Committed transactions received from the slot.", MetricType::COUNTER, None),
    ("walcast_changes_total", "Row changes routed by the hub, by kind.", MetricType::COUNTER, Some("kind")),
    ("walcast_decode_errors_total", "pgoutput messages that could not be decoded.", MetricType::COUNTER, None),
    ("walcast_websocket_connections", "Open WebSocket connections.", MetricType::GAUGE, None),
    ("walcast_websocket_connections_accepted_total", "WebSocket connections accepted.", MetricType::COUNTER, None),
    ("walcast_websocket_channels", "Joined channels over all connections.", MetricType::GAUGE, None),
    ("walcast_subscriptions", "postgres_changes bindings live in the hub.", MetricType::GAUGE, None),
    ("walcast_websocket_frames_sent_total", "WebSocket frames sent to clients.", MetricType::COUNTER, None),
    ("walcast_websocket_sent_bytes_total", "Bytes of WebSocket frame payloads sent to clients.", MetricType::COUNTER, None),
    ("walcast_websocket_malformed_frames_total", "Frames from clients that could not be parsed.", MetricType::COUNTER, None),
    ("walcast_clients_dropped_total", "Clients the server disconnected, by reason.", MetricType::COUNTER, Some("reason")),
    ("walcast_websocket_disconnects_total", "WebSocket connections ended, by reason.", MetricType::COUNTER, Some("reason")),
    ("walcast_connections_refused_total", "TCP connections refused or dropped before being served, by reason.", MetricType::COUNTER, Some("reason")),
    ("walcast_joins_total", "Channel joins, by result.", MetricType::COUNTER, Some("result")),
    ("walcast_auth_failures_total", "Refused credentials, by reason.", MetricType::COUNTER, Some("reason")),
    ("walcast_frames_queued_total", "Frames queued to clients' outbound queues, by source (changes, broadcast).", MetricType::COUNTER, Some("source")),
    ("walcast_broadcast_messages_total", "Broadcasts accepted for fan-out, by source (client, database, rest).", MetricType::COUNTER, Some("source")),
    ("walcast_broadcast_refused_total", "Broadcasts and private-channel joins refused, by reason.", MetricType::COUNTER, Some("reason")),
    ("walcast_log_transactions_total", "Transactions appended to the change log.", MetricType::COUNTER, None),
    ("walcast_log_changes_total", "Changes (rows and database messages) appended to the change log.", MetricType::COUNTER, None),
    ("walcast_log_syncs_total", "Syncs of the change log to disk.", MetricType::COUNTER, None),
    ("walcast_log_errors_total", "Failed change log writes (each stops confirmation to PostgreSQL until the log is writable again).", MetricType::COUNTER, None),
    ("walcast_log_writable", "1 while the change log can be written; 0 when a write failed (nothing more is confirmed to PostgreSQL).", MetricType::GAUGE, None),
    ("walcast_log_bytes", "Bytes of committed transactions in the change log's segments on disk.", MetricType::GAUGE, None),
    ("walcast_log_segments", "Segment files of the change log.", MetricType::GAUGE, None),
    ("walcast_log_oldest_commit_lsn", "Commit LSN of the oldest transaction the change log holds, as a number (WAL byte position).", MetricType::GAUGE, None),
    ("walcast_log_oldest_age_seconds", "Now minus the commit time of the oldest transaction the change log holds: how far back a client can resume.", MetricType::GAUGE, None),
    ("walcast_log_newest_commit_lsn", "Commit LSN of the newest transaction in the change log, as a number (WAL byte position).", MetricType::GAUGE, None),
    ("walcast_replays_total", "Channels that resumed with replay.since, by result (done: REPLAY_DONE sent; gap: REPLAY_GAP sent).", MetricType::COUNTER, Some("result")),
    ("walcast_replayed_changes_total", "Changes read back from the change log for replays (before each channel's filters).", MetricType::COUNTER, None),
    ("walcast_rls_checks_total", "RLS mode's SQL checks (one per class and round of rows), by result (ok; error: the class's channels were closed).", MetricType::COUNTER, Some("result")),
    ("walcast_rls_checked_rows_total", "Row images judged by RLS mode's SQL checks.", MetricType::COUNTER, None),
    ("walcast_rls_check_seconds_total", "Time spent in RLS mode's SQL checks (divide by walcast_rls_checks_total for the mean).", MetricType::COUNTER, None),
    ("walcast_rls_checks_queued", "RLS checks waiting for a connection of the pool (auth.rls_queue at most).", MetricType::GAUGE, None),
    ("walcast_rls_bindings_total", "Bindings judged by RLS mode, by path (compiled: in-memory rule; sql: checked per transaction).", MetricType::COUNTER, Some("path")),
    ("walcast_rls_unjudgeable_total", "Changes RLS mode's SQL path could not judge and did not deliver: a value missing from the row image (use REPLICA IDENTITY FULL).", MetricType::COUNTER, None),
    ("walcast_rls_rounds_total", "Rounds of RLS mode's SQL checks: one table's new rows loaded once into a temp table, then every class waiting judged over them in one transaction.", MetricType::COUNTER, None),
    ("walcast_rls_unloaded_checks_total", "RLS class checks that ran without the round's temp table (its rows could not be loaded into one; see the log): same verdicts, slower.", MetricType::COUNTER, None),
    ("walcast_rls_unstreamed_total", "RLS joins refused, and changes not delivered (their channels closed), because the table's policies read a column the publication does not stream.", MetricType::COUNTER, None),
    ("walcast_rls_round_timeouts_total", "Rounds of RLS mode's SQL checks that ran past auth.rls_check_timeout_ms: the classes not judged by then had their channels closed.", MetricType::COUNTER, None),
    ("walcast_rls_policy_reloads_total", "Times policies, privileges or roles changed and every channel was judged again.", MetricType::COUNTER, None),
    ("walcast_presence_tracks_total", "Presence tracks, by result (accepted, rejected).", MetricType::COUNTER, Some("result")),
    ("walcast_commit_to_send_latency_seconds", "Time from a transaction's commit to its change being queued to subscribed clients.", MetricType::HISTOGRAM, None),
    ("walcast_health_status", "Overall health: 0 normal, 1 warning, 2 critical.", MetricType::GAUGE, None),
    ("walcast_health_check_status", "Level of each health check: 0 normal, 1 warning, 2 critical.", MetricType::GAUGE, Some("check")),
];

struct SyncCollector {
    state: Arc<State_>,
    descs: Vec<Desc>,
}

impl SyncCollector {
    fn new(state: Arc<State_>) -> Result<Self, prometheus::Error> {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _, label)| {
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    label.iter().map(|l| l.to_string()).collect(),
                    Default::default(),
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(SyncCollector { state, descs })
    }
}

fn sample(value: f64, label: Option<(&str, &str)>, ty: MetricType) -> proto::Metric {
    let mut m = proto::Metric::default();
    if let Some((k, v)) = label {
        let mut l = proto::LabelPair::default();
        l.set_name(k.to_string());
        l.set_value(v.to_string());
        m.set_label(vec![l]);
    }
    if ty == MetricType::COUNTER {
        let mut c = proto::Counter::default();
        c.set_value(value);
        m.set_counter(c);
    } else {
        let mut g = proto::Gauge::default();
        g.set_value(value);
        m.set_gauge(g);
    }
    m
}

impl Collector for SyncCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let st = &self.state;
        let s = &st.src.stream;
        let hub = &st.src.hub;
        let ws = &st.src.ws;
        let bc = &st.src.broadcast;
        let rls = st
            .src
            .rls
            .as_ref()
            .map(|r| r.stats.clone())
            .unwrap_or_default();
        let log = st.src.log.as_ref().map(|l| &*l.stats);
        // Size and range of the log, once it is open (the families are left out before).
        let log_stats = st
            .src
            .log
            .as_ref()
            .and_then(|l| l.reader())
            .map(|r| r.stats());
        let oldest = log_stats.as_ref().and_then(|s| s.oldest);
        let newest = log_stats.as_ref().and_then(|s| s.newest);
        let now_micros = unix_now_micros();
        let health = st.evaluate();
        let slot = st.slot.lock().map(|g| g.clone()).unwrap_or_default();
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let mut out = Vec::with_capacity(FAMILIES.len());
        for &(name, help, ty, label) in FAMILIES {
            let one = |v: f64| vec![sample(v, None, ty)];
            let labelled = |pairs: Vec<(&str, f64)>| -> Vec<proto::Metric> {
                let key = label.unwrap_or("label");
                pairs
                    .into_iter()
                    .map(|(lv, v)| sample(v, Some((key, lv)), ty))
                    .collect()
            };
            let metrics = match name {
                "walcast_build_info" => labelled(vec![(env!("CARGO_PKG_VERSION"), 1.0)]),
                "walcast_replication_connected" => one(if health.connected { 1.0 } else { 0.0 }),
                "walcast_replication_reconnects_total" => one(n(&s.reconnects)),
                "walcast_replication_disconnected_seconds" => one(health.disconnected_seconds),
                "walcast_replication_lag_seconds" => one(health.lag_seconds),
                "walcast_slot_lag_bytes" => one(slot.lag_bytes as f64),
                "walcast_slot_retained_wal_bytes" => one(slot.retained_bytes as f64),
                "walcast_slot_wal_status" => labelled(
                    WAL_STATUSES
                        .iter()
                        .map(|&w| {
                            let on = slot.wal_status.as_deref() == Some(w);
                            (w, if on { 1.0 } else { 0.0 })
                        })
                        .collect(),
                ),
                "walcast_slot_exists" => one(if slot.exists { 1.0 } else { 0.0 }),
                "walcast_slot_poll_errors_total" => one(n(&st.slot_poll_errors)),
                "walcast_replication_blocked" => labelled(
                    Blocked::ALL
                        .iter()
                        .map(|&b| {
                            let on = health.blocked.as_ref().is_some_and(|(x, _)| *x == b);
                            (b.as_str(), if on { 1.0 } else { 0.0 })
                        })
                        .collect(),
                ),
                "walcast_replication_gaps_total" => one(n(&s.gaps)),
                "walcast_transactions_total" => one(n(&s.transactions)),
                "walcast_changes_total" => labelled(
                    CHANGE_KINDS
                        .iter()
                        .map(|&(k, l)| (l, hub.changes_of(k) as f64))
                        .collect(),
                ),
                "walcast_decode_errors_total" => one(n(&s.decode_errors)),
                "walcast_websocket_connections" => {
                    one(ws.connections.load(Ordering::Relaxed).max(0) as f64)
                }
                "walcast_websocket_connections_accepted_total" => one(n(&ws.connections_total)),
                "walcast_websocket_channels" => {
                    one(ws.channels.load(Ordering::Relaxed).max(0) as f64)
                }
                "walcast_subscriptions" => one(n(&hub.subscriptions)),
                "walcast_websocket_frames_sent_total" => one(n(&ws.frames_sent)),
                "walcast_websocket_sent_bytes_total" => one(n(&ws.bytes_sent)),
                "walcast_websocket_malformed_frames_total" => one(n(&ws.malformed_frames)),
                "walcast_clients_dropped_total" => labelled(
                    DropReason::ALL
                        .iter()
                        .map(|&r| (r.as_str(), ws.events.dropped(r) as f64))
                        .collect(),
                ),
                "walcast_websocket_disconnects_total" => labelled(
                    DisconnectReason::ALL
                        .iter()
                        .map(|&r| (r.as_str(), ws.events.disconnects(r) as f64))
                        .collect(),
                ),
                "walcast_connections_refused_total" => labelled(
                    RefuseReason::ALL
                        .iter()
                        .map(|&r| (r.as_str(), ws.events.refusals(r) as f64))
                        .collect(),
                ),
                "walcast_joins_total" => {
                    labelled(vec![("ok", n(&ws.joins_ok)), ("error", n(&ws.joins_error))])
                }
                "walcast_frames_queued_total" => labelled(vec![
                    ("changes", n(&hub.frames_queued)),
                    ("broadcast", n(&bc.frames_queued)),
                ]),
                "walcast_broadcast_messages_total" => labelled(vec![
                    ("client", n(&bc.messages_received)),
                    ("database", n(&bc.messages_from_database)),
                    ("rest", n(&bc.messages_from_rest)),
                ]),
                "walcast_broadcast_refused_total" => labelled(vec![
                    ("payload_too_large", n(&bc.payload_too_large)),
                    ("rate_limited", n(&bc.rate_limited)),
                    ("denied", n(&bc.denied)),
                    ("invalid", n(&bc.invalid)),
                    ("undeliverable", n(&bc.undeliverable)),
                ]),
                "walcast_log_transactions_total" => log.map_or(vec![], |l| one(n(&l.transactions))),
                "walcast_log_changes_total" => log.map_or(vec![], |l| one(n(&l.changes))),
                "walcast_log_syncs_total" => log.map_or(vec![], |l| one(n(&l.syncs))),
                "walcast_log_errors_total" => log.map_or(vec![], |l| one(n(&l.errors))),
                "walcast_log_writable" => log.map_or(vec![], |l| {
                    one(f64::from(u8::from(l.writable.load(Ordering::Relaxed))))
                }),
                "walcast_log_bytes" => log_stats.as_ref().map_or(vec![], |s| one(s.bytes as f64)),
                "walcast_log_segments" => log_stats
                    .as_ref()
                    .map_or(vec![], |s| one(s.segments as f64)),
                "walcast_log_oldest_commit_lsn" => {
                    oldest.map_or(vec![], |o| one(o.commit_lsn.0 as f64))
                }
                "walcast_log_oldest_age_seconds" => {
                    oldest.map_or(vec![], |o| one(secs_between(o.commit_ts, now_micros)))
                }
                "walcast_log_newest_commit_lsn" => {
                    newest.map_or(vec![], |o| one(o.commit_lsn.0 as f64))
                }
                "walcast_replays_total" => labelled(vec![
                    ("done", n(&st.src.replay.served)),
                    ("gap", n(&st.src.replay.gaps)),
                ]),
                "walcast_replayed_changes_total" => one(n(&st.src.replay.changes)),
                // RLS mode's families read 0 while it is off.
                "walcast_rls_checks_total" => labelled(vec![
                    ("ok", n(&rls.checks_ok)),
                    ("error", n(&rls.checks_failed)),
                ]),
                "walcast_rls_checked_rows_total" => one(n(&rls.rows_checked)),
                "walcast_rls_check_seconds_total" => one(n(&rls.check_micros) / 1e6),
                "walcast_rls_checks_queued" => one(n(&rls.queued)),
                "walcast_rls_bindings_total" => labelled(vec![
                    ("compiled", n(&rls.compiled_joins)),
                    ("sql", n(&rls.sql_joins)),
                ]),
                "walcast_rls_policy_reloads_total" => one(n(&rls.policy_reloads)),
                "walcast_rls_unjudgeable_total" => one(n(&rls.unjudgeable)),
                "walcast_rls_rounds_total" => one(n(&rls.rounds)),
                "walcast_rls_unstreamed_total" => one(n(&rls.unstreamed)),
                "walcast_rls_round_timeouts_total" => one(n(&rls.round_timeouts)),
                "walcast_rls_unloaded_checks_total" => one(n(&rls.unloaded)),
                "walcast_presence_tracks_total" => labelled(vec![
                    ("accepted", n(&bc.presence_tracks)),
                    ("rejected", n(&bc.presence_rejected)),
                ]),
                "walcast_auth_failures_total" => labelled(
                    AuthFailure::ALL
                        .iter()
                        .map(|&r| (r.as_str(), ws.events.auth_failures(r) as f64))
                        .collect(),
                ),
                "walcast_commit_to_send_latency_seconds" => {
                    let mut m = proto::Metric::default();
                    m.set_histogram(histogram_proto(&hub.commit_to_send));
                    vec![m]
                }
                "walcast_health_status" => one(health.level as u8 as f64),
                "walcast_health_check_status" => labelled(
                    HEALTH_CHECKS
                        .iter()
                        .map(|&c| {
                            let level = health
                                .checks
                                .iter()
                                .find(|x| x.name == c)
                                .map_or(Level::Normal, |x| x.level);
                            (c, level as u8 as f64)
                        })
                        .collect(),
                ),
                _ => Vec::new(),
            };
            // A family with nothing to report (the log's, without a log) is left out.
            if metrics.is_empty() {
                continue;
            }
            let mut f = MetricFamily::default();
            f.set_name(name.to_string());
            f.set_help(help.to_string());
            f.set_field_type(ty);
            f.set_metric(metrics);
            out.push(f);
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Background work: slot polls and health ticks

/// Polls the slot's position and re-evaluates health until `stop` fires.
pub async fn monitor(
    metrics: Arc<Metrics>,
    conn: PgConnInfo,
    slot: String,
    stop: CancellationToken,
) {
    let st = metrics.state.clone();
    let poll = async {
        let mut client: Option<tokio_postgres::Client> = None;
        let mut ticker =
            tokio::time::interval(Duration::from_secs(st.health.slot_poll_interval_secs));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = None;
                match tokio::time::timeout(
                    SLOT_POLL_TIMEOUT,
                    crate::source::tls::connect_sql(&conn),
                )
                .await
                {
                    Ok(Ok(c)) => client = Some(c),
                    Ok(Err(e)) => {
                        st.slot_poll_failed(&slot, &e.to_string());
                        continue;
                    }
                    Err(_) => {
                        st.slot_poll_failed(&slot, "connecting timed out");
                        continue;
                    }
                }
            }
            let Some(c) = client.as_ref() else { continue };
            match tokio::time::timeout(SLOT_POLL_TIMEOUT, read_slot(c, &slot)).await {
                Ok(Ok(snap)) => {
                    if let Ok(mut s) = st.slot.lock() {
                        *s = snap;
                    }
                }
                Ok(Err(e)) => {
                    client = None;
                    st.slot_poll_failed(&slot, &e.to_string());
                }
                Err(_) => {
                    client = None;
                    st.slot_poll_failed(&slot, "query timed out");
                }
            }
        }
    };
    let tick = async {
        let mut ticker = tokio::time::interval(HEALTH_TICK);
        loop {
            ticker.tick().await;
            st.evaluate();
        }
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = poll => {}
        _ = tick => {}
    }
}

/// Reads the slot's position relative to the server's WAL (on a standby, its replay
/// position).
async fn read_slot(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<SlotSnapshot, tokio_postgres::Error> {
    let row = client
        .query_one(
            "select (w.flush - '0/0'::pg_lsn)::int8, \
                    (w.cur - s.confirmed_flush_lsn)::int8, \
                    (w.cur - s.restart_lsn)::int8, \
                    s.wal_status::text, \
                    (r.sent_lsn - '0/0'::pg_lsn)::int8, \
                    s.slot_name is not null \
             from (select case when pg_is_in_recovery() then pg_last_wal_replay_lsn() else pg_current_wal_lsn() end as cur, \
                          case when pg_is_in_recovery() then pg_last_wal_replay_lsn() else pg_current_wal_flush_lsn() end as flush) w \
             left join pg_replication_slots s on s.slot_name = $1 \
             left join pg_stat_replication r on r.pid = s.active_pid",
            &[&slot],
        )
        .await?;
    let bytes = |i: usize| -> Result<u64, tokio_postgres::Error> {
        Ok(row.try_get::<_, Option<i64>>(i)?.unwrap_or(0).max(0) as u64)
    };
    Ok(SlotSnapshot {
        polled: true,
        server_flush: bytes(0)?,
        lag_bytes: bytes(1)?,
        retained_bytes: bytes(2)?,
        wal_status: row.try_get(3)?,
        sent: row.try_get::<_, Option<i64>>(4)?.map(|v| v.max(0) as u64),
        exists: row.try_get(5)?,
    })
}

// ---------------------------------------------------------------------------
// Read access for the status page (src/status)

/// The slot as last polled, for the status page.
#[derive(Clone, Debug, Default)]
pub struct SlotView {
    /// At least one poll succeeded (and the last one did).
    pub polled: bool,
    pub exists: bool,
    /// The server's WAL flush position at the poll.
    pub server_flush: u64,
    pub lag_bytes: u64,
    pub retained_bytes: u64,
    pub wal_status: Option<String>,
}

impl Metrics {
    /// The counters the metrics read.
    pub fn sources(&self) -> &Sources {
        &self.state.src
    }

    /// The slot as last polled.
    pub fn slot_view(&self) -> SlotView {
        let s = self
            .state
            .slot
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        SlotView {
            polled: s.polled,
            exists: s.exists,
            server_flush: s.server_flush,
            lag_bytes: s.lag_bytes,
            retained_bytes: s.retained_bytes,
            wal_status: s.wal_status,
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP

/// `/metrics` and `/ready`, for the main listener (which has its own `/health`).
pub fn routes(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/ready", get(ready))
        .with_state(metrics)
}

/// `/metrics`, `/ready` and `/health`, for the separate `server.metrics_listen`.
pub fn routes_with_health(metrics: Arc<Metrics>) -> Router {
    routes(metrics).route("/health", get(health))
}

async fn health() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn scrape(State(m): State<Arc<Metrics>>) -> Response {
    match m.render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode metrics: {e}"),
            )
                .into_response()
        }
    }
}

/// The checks as `/ready` reports them (also shown by the status page).
pub fn ready_checks(h: &Health) -> Vec<Value> {
    let mut checks: Vec<Value> = vec![json!({
        "name": "replication_connected",
        "value": u8::from(h.connected),
        "threshold": 1,
        "level": if h.connected { Level::Normal } else { Level::Critical }.as_str(),
    })];
    if let Some((b, message)) = &h.blocked {
        checks.push(json!({
            "name": "replication_blocked",
            "value": b.as_str(),
            "level": Level::Critical.as_str(),
            "message": message,
        }));
    }
    match h.log {
        None => {}
        Some(LogHealth::Writable) => checks.push(json!({
            "name": "log_writable",
            "value": 1,
            "threshold": 1,
            "level": Level::Normal.as_str(),
        })),
        Some(LogHealth::Opening) => checks.push(json!({
            "name": "log_writable",
            "value": 0,
            "threshold": 1,
            "level": Level::Normal.as_str(),
            "affects_ready": true,
            "message": LogHealth::OPENING,
        })),
        Some(LogHealth::NotWritable) => checks.push(json!({
            "name": "log_writable",
            "value": 0,
            "threshold": 1,
            "level": Level::Critical.as_str(),
            "message": LogHealth::NOT_WRITABLE,
        })),
    }
    for c in &h.checks {
        checks.push(json!({
            "name": c.name,
            "value": c.value,
            "threshold": c.critical,
            "warning": c.warning,
            "critical": c.critical,
            "level": c.level.as_str(),
            "affects_ready": c.name == "lag_seconds" || c.name == "lag_bytes",
        }));
    }
    checks
}

async fn ready(State(m): State<Arc<Metrics>>) -> Response {
    let h = m.health();
    let ready = h.ready();
    let checks = ready_checks(&h);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "ready": ready,
            "status": h.level.as_str(),
            "checks": checks,
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::frame::CLOSE_HEARTBEAT_TIMEOUT;
    use crate::deliver::stats::ClientEvents;

    fn metrics(health: HealthConfig) -> Metrics {
        metrics_with_log(health, Some(logged(&tempfile::tempdir().unwrap()).1))
    }

    fn metrics_with_log(health: HealthConfig, log: Option<LogHandle>) -> Metrics {
        Metrics::new(
            Sources {
                stream: Arc::default(),
                progress: Arc::default(),
                hub: Arc::default(),
                ws: Arc::default(),
                broadcast: Arc::default(),
                log,
                replay: Arc::default(),
                rls: None,
            },
            health,
        )
        .unwrap()
    }

    /// A real log in `dir` holding two transactions, one committed an hour ago,
    /// and a writable stage handle on it.
    fn logged(dir: &tempfile::TempDir) -> (crate::changelog::ChangeLog, LogHandle) {
        use crate::changelog::{ChangeLog, LogIdentity, LogOptions};
        use crate::lsn::Lsn;
        let (mut log, _) = ChangeLog::open(
            LogOptions::new(dir.path(), 1 << 30, Duration::from_secs(86_400)),
            LogIdentity {
                system_id: "1".into(),
                slot: "walcast".into(),
            },
            Lsn(0x100),
        )
        .unwrap();
        let hour_ago = unix_now_micros() - 3_600_000_000;
        for (lsn, ts) in [(0x1000, hour_ago), (0x2000, hour_ago + 1)] {
            log.begin(Lsn(lsn), ts, 1).unwrap();
            log.append(b"x").unwrap();
            log.commit(Lsn(lsn + 8)).unwrap();
        }
        log.sync().unwrap();
        let stats = Arc::new(crate::changelog::stage::LogStageStats::default());
        stats.writable.store(true, Ordering::Relaxed);
        let handle = LogHandle::detached(stats, Some(log.reader()));
        (log, handle)
    }

    /// The value of an unlabelled sample in a scrape.
    fn scraped(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn the_log_gauges_give_its_size_and_range() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, handle) = logged(&dir);
        let m = metrics_with_log(HealthConfig::default(), Some(handle));
        let text = m.render().unwrap();
        let bytes = scraped(&text, "walcast_log_bytes").unwrap();
        assert!(bytes > 16.0, "{text}");
        assert_eq!(scraped(&text, "walcast_log_segments"), Some(1.0));
        assert_eq!(
            scraped(&text, "walcast_log_oldest_commit_lsn"),
            Some(4096.0)
        );
        assert_eq!(
            scraped(&text, "walcast_log_newest_commit_lsn"),
            Some(8192.0)
        );
        let age = scraped(&text, "walcast_log_oldest_age_seconds").unwrap();
        assert!((3599.0..3700.0).contains(&age), "{age}");
        assert_eq!(scraped(&text, "walcast_log_writable"), Some(1.0));

        // Configured but not open yet: the counters, no size or range.
        let m = metrics_with_log(
            HealthConfig::default(),
            Some(LogHandle::detached(Arc::default(), None)),
        );
        let text = m.render().unwrap();
        assert_eq!(scraped(&text, "walcast_log_writable"), Some(0.0));
        assert!(!text.contains("walcast_log_bytes"), "{text}");
        assert!(!text.contains("walcast_log_oldest_age_seconds"), "{text}");
    }

    #[test]
    fn a_log_that_cannot_be_written_fails_ready_and_is_critical() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, handle) = logged(&dir);
        let stats = handle.stats.clone();
        let m = metrics_with_log(HealthConfig::default(), Some(handle));
        m.state.src.stream.connected.store(true, Ordering::Relaxed);
        let h = m.health();
        assert!(h.ready(), "{h:?}");
        assert_eq!(h.level, Level::Normal);
        let check = |h: &Health| {
            ready_checks(h)
                .into_iter()
                .find(|c| c["name"] == "log_writable")
                .expect("a log_writable check")
        };
        assert_eq!(check(&h)["level"], "normal");

        // A failed write (disk full): the stage counts it and clears `writable`.
        stats.errors.fetch_add(1, Ordering::Relaxed);
        stats.writable.store(false, Ordering::Relaxed);
        let h = m.health();
        assert!(!h.ready());
        assert_eq!(h.level, Level::Critical);
        let c = check(&h);
        assert_eq!(
            (c["value"].as_u64(), c["level"].as_str()),
            (Some(0), Some("critical"))
        );
        assert!(
            c["message"]
                .as_str()
                .unwrap()
                .starts_with("change log not writable: nothing more is confirmed to PostgreSQL"),
            "{c}"
        );
        let text = m.render().unwrap();
        assert_eq!(scraped(&text, "walcast_log_writable"), Some(0.0));
        assert_eq!(scraped(&text, "walcast_health_status"), Some(2.0));

        // Writable again (the stage emptied the log and goes on): ready.
        stats.writable.store(true, Ordering::Relaxed);
        assert!(m.health().ready());

        // Not opened yet (before the stream starts): not ready, but no failure.
        let m = metrics_with_log(
            HealthConfig::default(),
            Some(LogHandle::detached(Arc::default(), None)),
        );
        m.state.src.stream.connected.store(true, Ordering::Relaxed);
        let h = m.health();
        assert!(!h.ready());
        assert_eq!(h.level, Level::Normal);
        assert_eq!(check(&h)["message"], LogHealth::OPENING);

        // Without a log there is no such check.
        let m = metrics_with_log(HealthConfig::default(), None);
        assert!(ready_checks(&m.health())
            .iter()
            .all(|c| c["name"] != "log_writable"));
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = LatencyHistogram::default();
        h.observe_micros(100);
        h.observe_micros(3_000);
        h.observe_micros(20_000_000);
        let p = histogram_proto(&h);
        assert_eq!(p.get_sample_count(), 3);
        let b = p.get_bucket();
        assert_eq!(b[0].cumulative_count(), 1);
        assert_eq!(b[3].cumulative_count(), 2); // 5 ms
        assert_eq!(b[b.len() - 1].cumulative_count(), 2); // 10 s
        assert!((p.get_sample_sum() - 20.0031).abs() < 1e-9);
    }

    #[test]
    fn renders_every_family_with_help() {
        let m = metrics(HealthConfig::default());
        let text = m.render().unwrap();
        for (name, _, _, _) in FAMILIES {
            assert!(text.contains(&format!("# HELP {name} ")), "{name} missing");
        }
        assert!(text.contains("walcast_changes_total{kind=\"truncate\"} 0"));
        assert!(text.contains("walcast_clients_dropped_total{reason=\"slow_client\"} 0"));
        assert!(text.contains("process_resident_memory_bytes"));
    }

    #[test]
    fn the_log_families_appear_only_with_a_log() {
        let m = Metrics::new(
            Sources {
                stream: Arc::default(),
                progress: Arc::default(),
                hub: Arc::default(),
                ws: Arc::default(),
                broadcast: Arc::default(),
                log: None,
                replay: Arc::default(),
                rls: None,
            },
            HealthConfig::default(),
        )
        .unwrap();
        let text = m.render().unwrap();
        assert!(!text.contains("walcast_log_"), "{text}");
        assert!(text.contains("walcast_changes_total"));
    }

    #[test]
    fn disconnected_since_start_is_critical_after_the_threshold() {
        let m = metrics(HealthConfig::default());
        let h = m.health();
        assert!(!h.ready());
        assert!(!h.connected);
        // Just started: not yet disconnected for long.
        assert_eq!(h.level, Level::Normal);
        m.state
            .src
            .stream
            .disconnected_since
            .store(unix_now_micros() / 1_000_000 - 120, Ordering::Relaxed);
        let h = m.health();
        assert_eq!(h.level, Level::Critical);
        assert!(h.disconnected_seconds >= 119.0);
    }

    #[test]
    fn lag_is_zero_when_caught_up_and_bounded_when_not() {
        let m = metrics(HealthConfig::default());
        let st = &m.state;
        st.src.stream.connected.store(true, Ordering::Relaxed);
        // An hour-old last commit, everything confirmed, server read: caught up.
        st.src
            .hub
            .last_commit_unix_micros
            .store(unix_now_micros() - 3_600_000_000, Ordering::Relaxed);
        assert_eq!(m.health().lag_seconds, 0.0);
        assert!(m.health().ready());
        // The server has WAL walcast has not read: lag counts from when it was last
        // caught up (just now), not from the hour-old commit.
        if let Ok(mut s) = st.slot.lock() {
            s.polled = true;
            s.server_flush = 1000;
            s.lag_bytes = 5_000_000_000;
        }
        let h = m.health();
        assert!(h.lag_seconds < 5.0, "{}", h.lag_seconds);
        assert_eq!(h.level, Level::Critical, "lag bytes over 4 GiB");
        assert!(!h.ready());
    }

    #[test]
    fn drop_reasons_follow_close_codes() {
        let e = ClientEvents::default();
        e.client_dropped(1, crate::route::hub::CLOSE_SLOW_CLIENT, "slow");
        e.client_dropped(2, CLOSE_HEARTBEAT_TIMEOUT, "quiet");
        e.client_dropped(3, 4999, "?");
        assert_eq!(e.dropped(DropReason::SlowClient), 1);
        assert_eq!(e.dropped(DropReason::HeartbeatTimeout), 1);
        assert_eq!(e.dropped(DropReason::Other), 1);
        assert_eq!(e.dropped_total(), 3);
    }
}
