//! Replication notices: telling clients when the stream behind their channels is
//! down, back, or skipped changes.
//!
//! A task in `serve` looks at replication health a few times a second. When
//! replication has not been ready (lost, blocked by a dropped slot or publication,
//! or lag critical — what makes `/ready` fail) for `server.outage_notice_secs`,
//! every channel with `postgres_changes` bindings gets a `system` message with code
//! `REPLICATION_DOWN`; a blocked stream is announced at once, and again when the
//! reason changes. When replication is ready again they get `REPLICATION_OK`. A
//! gap (the slot re-created or advanced past what walcast had confirmed) is
//! announced with `REPLICATION_GAP`, before the `REPLICATION_OK`. The hub sends the
//! messages (it knows the channels and their bindings) and answers joins that asked
//! for `broadcast.replication_ready`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::route::hub::{HubCommand, Notice};
use crate::server::metrics::{Health, Metrics};
use crate::source::session::{Blocked, StreamState};

/// How often replication health is looked at.
const TICK: Duration = Duration::from_millis(250);

pub const REPLICATION_DOWN: &str = "REPLICATION_DOWN";
pub const REPLICATION_OK: &str = "REPLICATION_OK";
pub const REPLICATION_GAP: &str = "REPLICATION_GAP";

/// Runs until `stop` fires.
pub async fn run(
    metrics: Arc<Metrics>,
    stream: Arc<StreamState>,
    hub: mpsc::Sender<HubCommand>,
    notice_after: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut down_since: Option<Instant> = None;
    // The reason last announced as down (None: not announced).
    let mut announced: Option<Reason> = None;
    let mut gaps_seen = stream.gaps.load(Ordering::Acquire);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let health = metrics.health();
        let ready = health.ready();
        // Readiness for `replication_ready` joins; a full queue just waits a tick.
        let _ = hub.try_send(HubCommand::ReplicationReady(ready));
        let mut notices = Vec::new();
        let gaps = stream.gaps.load(Ordering::Acquire);
        if gaps != gaps_seen {
            gaps_seen = gaps;
            let (from, to) = stream
                .last_gap
                .lock()
                .ok()
                .and_then(|g| *g)
                .unwrap_or_default();
            let mut extra = Map::new();
            extra.insert("from_lsn".into(), Value::String(from.to_string()));
            extra.insert("to_lsn".into(), Value::String(to.to_string()));
            notices.push(Notice {
                status: "error",
                code: REPLICATION_GAP,
                message: format!(
                    "the replication slot was re-created or advanced: changes committed between {from} and {to} were not delivered; re-read current state"
                ),
                extra,
            });
        }
        if ready {
            down_since = None;
            if announced.take().is_some() {
                tracing::info!("replication is back: telling channels (REPLICATION_OK)");
                notices.push(Notice {
                    status: "ok",
                    code: REPLICATION_OK,
                    message: "replication from PostgreSQL is back; changes flow again".into(),
                    extra: Map::new(),
                });
            }
        } else {
            let since = *down_since.get_or_insert_with(Instant::now);
            let reason = Reason::of(&health);
            let due = matches!(reason, Reason::Blocked(_)) || since.elapsed() >= notice_after;
            if due && announced != Some(reason) {
                announced = Some(reason);
                tracing::warn!(
                    reason = reason.as_str(),
                    "replication down: telling channels (REPLICATION_DOWN)"
                );
                let mut extra = Map::new();
                extra.insert("reason".into(), Value::String(reason.as_str().into()));
                notices.push(Notice {
                    status: "error",
                    code: REPLICATION_DOWN,
                    message: reason.message(&health),
                    extra,
                });
            }
        }
        for n in notices {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = hub.send(HubCommand::Notice(n)) => if r.is_err() { return },
            }
        }
    }
}

/// Why replication is not ready, as announced (a change of reason is announced again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    Disconnected,
    Lag,
    Blocked(Blocked),
}

impl Reason {
    fn of(h: &Health) -> Reason {
        match &h.blocked {
            Some((b, _)) => Reason::Blocked(*b),
            None if !h.connected => Reason::Disconnected,
            None => Reason::Lag,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Reason::Disconnected => "disconnected",
            Reason::Lag => "lag",
            Reason::Blocked(b) => b.as_str(),
        }
    }

    fn message(self, h: &Health) -> String {
        match self {
            Reason::Disconnected => format!(
                "replication from PostgreSQL is lost (for {:.0}s); changes are delayed, not lost: they arrive once it is back",
                h.disconnected_seconds
            ),
            Reason::Lag => format!(
                "replication lag is critical ({:.0}s, {} bytes behind); changes are delayed",
                h.lag_seconds, h.lag_bytes
            ),
            Reason::Blocked(_) => format!(
                "replication stopped and needs an operator: {}",
                h.blocked.as_ref().map(|(_, m)| m.as_str()).unwrap_or("")
            ),
        }
    }
}
