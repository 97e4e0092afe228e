//! A WebSocket connection's shared state and its writer.
//!
//! The upgrade itself is an HTTP route ([`crate::server::router`]). Each
//! connection then has a reader (the [`crate::deliver::session`]: Phoenix
//! protocol) and a writer task draining the connection's bounded queue; the writer
//! batches whatever is queued into one flush.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::stream::SplitSink;
use futures::SinkExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServeConfig;
use crate::deliver::broadcast::Broadcaster;
use crate::deliver::frame::{self, system_payload, Vsn};
pub use crate::deliver::stats::WsStats;
use crate::route::hub::{CloseReason, ConnHandle, HubCommand, Outbound, QueuedBytes};
use crate::route::rls::Verdict;
use crate::source::catalog::Catalog;

/// Initial read buffer of a connection.
pub(crate) const WS_READ_BUFFER: usize = 1024;
/// Bytes buffered for writing before the library writes to the socket. The
/// buffer only grows to this (plus one frame) on a connection that is sent a
/// burst, so an idle one does not pay for it; 32 KB against 4 KB took the
/// drain's CPU per change from 3.6 to 3.3 µs (fewer, larger loopback sends).
pub(crate) const WS_WRITE_BUFFER: usize = 32 * 1024;

/// Most frames the writer sends before flushing.
const WRITE_BATCH: usize = 128;

/// Everything sessions share.
pub struct Shared {
    pub hub: mpsc::Sender<HubCommand>,
    /// Token verification and table rules.
    pub auth: Arc<crate::route::auth::Verifier>,
    /// Topic membership, broadcast fan-out and presence.
    pub broadcast: Arc<Broadcaster>,
    pub catalog: Arc<Catalog>,
    pub config: Arc<ServeConfig>,
    pub stats: Arc<WsStats>,
    pub next_id: AtomicU64,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// The change log, for channels that resume (`None`: `[log] dir` is off).
    pub log: Option<crate::changelog::stage::LogHandle>,
    pub replay: Arc<crate::deliver::replay::ReplayStats>,
    /// RLS mode (`None`: off).
    pub rls: Option<Arc<crate::route::rls::Rls>>,
    /// Admission for client messages being worked on ([`MESSAGES_AT_ONCE`]).
    pub working: tokio::sync::Semaphore,
}

/// Client messages (joins above all) worked on at once across connections. A
/// join's future is several KB and waits on the hub; when every client joins at
/// once (a reconnect storm, a deploy) each connection would hold one, and the
/// memory they free afterwards stays with the allocator as the process's
/// resident size. A message waits at most [`ADMISSION_WAIT`] for its turn and is
/// then worked on anyway, so a stalled join (catalog or key fetch waiting on the
/// network) never holds the others back for longer.
pub const MESSAGES_AT_ONCE: usize = 256;

/// The longest a client message waits for admission.
pub const ADMISSION_WAIT: Duration = Duration::from_secs(1);

impl Shared {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Topics a connection has joined, with their join refs (for closing messages).
pub type JoinedTopics = Arc<Mutex<Vec<(Arc<str>, Option<String>)>>>;

/// What the writer needs of its connection: never the queue's sender, so the
/// writer cannot keep its own queue (and itself) alive.
pub(crate) struct WriterConn {
    id: crate::route::hub::ConnId,
    kill: CancellationToken,
    close_reason: Arc<Mutex<Option<CloseReason>>>,
    queued: Arc<QueuedBytes>,
}

impl WriterConn {
    pub(crate) fn of(handle: &ConnHandle) -> Self {
        WriterConn {
            id: handle.id,
            kill: handle.kill.clone(),
            close_reason: handle.close_reason.clone(),
            queued: handle.queued.clone(),
        }
    }
}

/// How long the writer tries to send its closing frames; a client that does not
/// read them in time (a stalled one) is cut off.
const CLOSE_DEADLINE: Duration = Duration::from_secs(1);

/// Drains a connection's queue into the socket until the connection is killed
/// (the session ended, or the server closes it: slow client, heartbeat timeout,
/// oversized frame…), the server shuts down, or the socket fails; then sends the
/// closing frames under [`CLOSE_DEADLINE`]. Waiting on a stalled socket never
/// hides a kill: the write itself is raced against it.
pub(crate) async fn writer(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: crate::route::queue::OutRx,
    vsn: Vsn,
    conn: WriterConn,
    joined: JoinedTopics,
    shutdown: CancellationToken,
    stats: Arc<WsStats>,
) {
    loop {
        let written = tokio::select! {
            biased;
            _ = conn.kill.cancelled() => break,
            _ = shutdown.cancelled() => break,
            w = write_batch(&mut sink, &mut rx, vsn, &conn.queued, &stats) => w,
        };
        match written {
            Ok(true) => {}
            Ok(false) => break,
            Err(()) => {
                // The socket is gone: the session learns it through the kill.
                conn.kill.cancel();
                break;
            }
        }
    }
    let reason = conn.close_reason.lock().ok().and_then(|r| r.clone());
    if let Some(r) = &reason {
        stats.events.client_dropped(conn.id, r.code, &r.reason);
    }
    let shutting_down = shutdown.is_cancelled();
    // Tell each channel why, then close. Without a reason this answers the
    // client's own close frame (the library echoes it) or says goodbye.
    let _ = tokio::time::timeout(CLOSE_DEADLINE, async {
        let (code, text) = match reason {
            Some(r) => {
                let topics = joined.lock().map(|j| j.clone()).unwrap_or_default();
                for (topic, join_ref) in topics {
                    let msg = system_payload("system", "error", &r.reason, &topic);
                    let f = frame::encode(vsn, join_ref.as_deref(), None, &topic, "system", &msg);
                    let _ = sink.feed(Message::Text(f.into())).await;
                }
                (r.code, r.reason)
            }
            None if shutting_down => (1001, "server shutting down".to_string()),
            None => (1000, "closed".to_string()),
        };
        let frame = CloseFrame {
            code,
            reason: truncate_reason(&text).into(),
        };
        if sink.send(Message::Close(Some(frame))).await.is_err() {
            // After the client's close frame no other may be sent: closing the
            // sink flushes the library's echo of it (the handshake's answer).
            let _ = sink.close().await;
        }
    })
    .await;
}

/// The frames closing `topic` at a frame whose RLS check failed: a `system`
/// error (`RLS_CHECK_FAILED`, the cause) and `phx_close`, written in the
/// failed frame's place — so a row is never dropped with its channel left
/// open, whatever the hub knows of the channel's class by then. (The hub
/// closes the channel too when the failure reaches it; a client sees that
/// close as well, for a channel it closed already.)
fn rls_close(topic: &Arc<str>, why: &str) -> [Outbound; 2] {
    let payload = serde_json::json!({
        "extension": "system",
        "status": "error",
        "message": why,
        "channel": topic.strip_prefix("realtime:").unwrap_or(topic),
        "code": crate::route::rls::RLS_CHECK_FAILED,
    })
    .to_string();
    [
        Outbound::Push {
            topic: topic.clone(),
            event: "system",
            payload,
        },
        Outbound::Push {
            topic: topic.clone(),
            event: "phx_close",
            payload: "{}".to_string(),
        },
    ]
}

/// Writes what is queued (up to [`WRITE_BATCH`] frames) and flushes once.
/// `Ok(false)`: the queue is closed; `Err`: the socket failed.
async fn write_batch(
    sink: &mut SplitSink<WebSocket, Message>,
    rx: &mut crate::route::queue::OutRx,
    vsn: Vsn,
    queued: &QueuedBytes,
    stats: &WsStats,
) -> Result<bool, ()> {
    let Some(first) = rx.recv().await else {
        return Ok(false);
    };
    let mut n = 0;
    let mut next = Some(first);
    // The channel just closed after a failed check (its next failed frames,
    // of the same failure, need no second close).
    let mut closed: Option<Arc<str>> = None;
    while let Some(mut o) = next.take() {
        queued.release(o.queued_size());
        if let Outbound::Gated(g) = o {
            // RLS mode's SQL path: what is written so far goes out while the
            // verdict is awaited; a frame the subscriber may not see is dropped;
            // one whose check failed closes its channel here, with the reason
            // (nothing of that channel is sent after it).
            if !g.ticket.ready() {
                sink.flush().await.map_err(|_| ())?;
            }
            let verdict = g.ticket.wait().await;
            let g = *g;
            o = match verdict {
                Verdict::Send { old_visible } => Outbound::Change {
                    topic: g.topic,
                    ids: g.ids,
                    data: match (old_visible, g.old_hidden) {
                        (false, Some(hidden)) => hidden,
                        _ => g.data,
                    },
                },
                Verdict::Skip => {
                    if n < WRITE_BATCH {
                        next = rx.try_recv().ok();
                    }
                    continue;
                }
                Verdict::Failed => {
                    let why = g.ticket.failure().unwrap_or_else(|| {
                        "the row-level security check failed for your token".into()
                    });
                    if closed.as_ref() != Some(&g.topic) {
                        for o in rls_close(&g.topic, &why) {
                            if let Some(msg) = render(o, vsn) {
                                sink.feed(msg).await.map_err(|_| ())?;
                                stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        closed = Some(g.topic.clone());
                    }
                    n += 1;
                    if n < WRITE_BATCH {
                        next = rx.try_recv().ok();
                    }
                    continue;
                }
            };
        }
        closed = None;
        let Some(msg) = render(o, vsn) else {
            continue;
        };
        let len = match &msg {
            Message::Text(t) => t.len(),
            Message::Binary(b) => b.len(),
            _ => 0,
        };
        sink.feed(msg).await.map_err(|_| ())?;
        stats.frames_sent.fetch_add(1, Ordering::Relaxed);
        stats.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
        n += 1;
        if n < WRITE_BATCH {
            next = rx.try_recv().ok();
        }
    }
    sink.flush().await.map_err(|_| ())?;
    Ok(true)
}

fn truncate_reason(s: &str) -> String {
    // A close reason must fit in 123 bytes.
    let mut end = s.len().min(123);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn render(o: Outbound, vsn: Vsn) -> Option<Message> {
    Some(match o {
        Outbound::Text(t) => Message::Text(t.into()),
        Outbound::Binary(b) => Message::Binary(b.into()),
        Outbound::Ws(m) => m,
        Outbound::System { topic, payload } => {
            Message::Text(frame::encode(vsn, None, None, &topic, "system", &payload).into())
        }
        Outbound::Change { topic, ids, data } => {
            Message::Text(change_frame(vsn, &topic, &ids, &data).into())
        }
        Outbound::Push {
            topic,
            event,
            payload,
        } => Message::Text(frame::encode(vsn, None, None, &topic, event, &payload).into()),
        // Judged by `write_batch` before rendering; never sent unjudged.
        Outbound::Gated(_) => return None,
    })
}

/// The text of a `postgres_changes` frame for one channel: the binding ids that
/// matched around the change's shared `data`. The writer calls it once per
/// channel a change goes to (public for the fan-out benchmark).
pub fn change_frame(vsn: Vsn, topic: &str, ids: &[u32], data: &str) -> String {
    use std::fmt::Write;
    frame::encode_with(
        vsn,
        None,
        None,
        topic,
        "postgres_changes",
        data.len() + 12 * ids.len() + 20,
        |out| {
            out.push_str("{\"ids\":[");
            for (i, id) in ids.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{id}");
            }
            out.push_str("],\"data\":");
            out.push_str(data);
            out.push('}');
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::hub::BindingIds;
    use serde_json::json;

    #[test]
    fn change_frames_list_every_matched_binding_around_the_shared_data() {
        let data = r#"{"type":"INSERT","record":{"id":1}}"#;
        for ids in [
            BindingIds::One(7),
            BindingIds::Many(vec![3, 4_000_000].into()),
        ] {
            let v1: serde_json::Value =
                serde_json::from_str(&change_frame(Vsn::V1, "realtime:r\"x", &ids, data)).unwrap();
            assert_eq!(
                v1,
                json!({"topic": "realtime:r\"x", "event": "postgres_changes",
                       "payload": {"ids": &*ids, "data": {"type": "INSERT", "record": {"id": 1}}},
                       "ref": null, "join_ref": null})
            );
            let v2: serde_json::Value =
                serde_json::from_str(&change_frame(Vsn::V2, "realtime:r", &ids, data)).unwrap();
            assert_eq!(
                v2,
                json!([null, null, "realtime:r", "postgres_changes",
                       {"ids": &*ids, "data": {"type": "INSERT", "record": {"id": 1}}}])
            );
        }
    }
}
