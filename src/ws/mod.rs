//! The WebSocket server: HTTP routes, the upgrade, and each connection's writer.
//!
//! Serves the Supabase Realtime endpoints `/realtime/v1/websocket` and
//! `/socket/websocket` (query parameters `apikey` and `vsn`; others are ignored),
//! plus `/health`. Each connection has a reader (the [`session`]: Phoenix
//! protocol) and a writer task draining the connection's bounded queue; the writer
//! batches whatever is queued into one flush.

pub mod frame;
pub mod http;
pub mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::SplitSink;
use futures::SinkExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broadcast::Broadcaster;
use crate::catalog::Catalog;
use crate::config::ServeConfig;
use crate::hub::{ConnHandle, HubCommand, Outbound};
use frame::Vsn;

/// Initial read buffer of a connection.
const WS_READ_BUFFER: usize = 1024;
/// Bytes buffered for writing before the library writes to the socket.
const WS_WRITE_BUFFER: usize = 4 * 1024;

/// Most frames the writer sends before flushing.
const WRITE_BATCH: usize = 128;

/// Counters of the WebSocket side (read by metrics).
#[derive(Debug, Default)]
pub struct WsStats {
    pub connections: AtomicI64,
    pub connections_total: AtomicU64,
    pub channels: AtomicI64,
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub malformed_frames: AtomicU64,
    pub joins_ok: AtomicU64,
    pub joins_error: AtomicU64,
    /// Clients dropped and auth failures, by reason.
    pub events: crate::metrics::ClientEvents,
}

/// Everything sessions share.
pub struct Shared {
    pub hub: mpsc::Sender<HubCommand>,
    /// Token verification and table rules.
    pub auth: Arc<crate::auth::Verifier>,
    /// Topic membership, broadcast fan-out and presence.
    pub broadcast: Arc<Broadcaster>,
    pub catalog: Arc<Catalog>,
    pub config: Arc<ServeConfig>,
    pub stats: Arc<WsStats>,
    pub next_id: AtomicU64,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

impl Shared {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/realtime/v1/websocket", get(upgrade))
        .route("/socket/websocket", get(upgrade))
        .route("/health", get(health))
        .route("/api/broadcast", post(crate::broadcast::rest_handler))
        .route(
            "/realtime/v1/api/broadcast",
            post(crate::broadcast::rest_handler),
        )
        .with_state(shared)
}

async fn health() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn upgrade(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let vsn = match Vsn::parse(params.get("vsn").map(String::as_str)) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({"error": e}))).into_response(),
    };
    if shared.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "walcast is shutting down"})),
        )
            .into_response();
    }
    // With auth on, the connect token (apikey) must verify before the upgrade.
    let mut connect_token = None;
    if shared.auth.enabled() {
        let apikey = crate::auth::request_token(&headers, &params).unwrap_or("");
        match shared.auth.verify(apikey).await {
            Ok(t) => connect_token = Some(t),
            Err(e) => {
                shared
                    .stats
                    .events
                    .auth_failed(crate::metrics::AuthFailure::of(&e), peer);
                return (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"error": e.to_string(), "reason": e.reason()})),
                )
                    .into_response();
            }
        }
    }
    let max = shared.config.server.max_frame_bytes;
    let tracker = shared.tracker.clone();
    // Small initial buffers: most connections are idle most of the time, and the
    // library's defaults (128 KiB to read) would dominate per-connection memory.
    // Both grow on demand up to the frame limit.
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .on_upgrade(move |socket| {
            tracker.track_future(session::run(socket, vsn, shared, peer, connect_token))
        })
}

/// Topics a connection has joined, with their join refs (for closing messages).
pub type JoinedTopics = Arc<Mutex<Vec<(Arc<str>, Option<String>)>>>;

/// Drains a connection's queue into the socket until the queue closes, the
/// connection is killed (slow client, expired token…) or the server shuts down.
pub(crate) async fn writer(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outbound>,
    vsn: Vsn,
    handle: ConnHandle,
    joined: JoinedTopics,
    shutdown: CancellationToken,
    stats: Arc<WsStats>,
) {
    loop {
        tokio::select! {
            biased;
            _ = handle.kill.cancelled() => {
                let reason = handle
                    .close_reason
                    .lock()
                    .ok()
                    .and_then(|r| r.clone());
                if let Some(r) = &reason {
                    stats.events.client_dropped(handle.id, r.code, &r.reason);
                }
                let (code, text) = reason
                    .map(|r| (r.code, r.reason))
                    .unwrap_or((1000, "closed".into()));
                // Tell each channel why, then close; a stuck client gets a short deadline.
                let topics = joined.lock().map(|j| j.clone()).unwrap_or_default();
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    for (topic, join_ref) in topics {
                        let msg = system_payload("system", "error", &text, &topic);
                        let f = frame::encode(vsn, join_ref.as_deref(), None, &topic, "system", &msg);
                        let _ = sink.feed(Message::Text(f.into())).await;
                    }
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame { code, reason: truncate_reason(&text).into() })))
                        .await;
                })
                .await;
                break;
            }
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(Some(CloseFrame {
                    code: 1001,
                    reason: "server shutting down".into(),
                }))))
                .await;
                break;
            }
            m = rx.recv() => {
                let Some(first) = m else {
                    let _ = sink.close().await;
                    break;
                };
                let mut n = 0;
                let mut next = Some(first);
                let mut failed = false;
                while let Some(o) = next.take() {
                    let msg = render(o, vsn);
                    let len = match &msg {
                        Message::Text(t) => t.len(),
                        Message::Binary(b) => b.len(),
                        _ => 0,
                    };
                    if sink.feed(msg).await.is_err() {
                        failed = true;
                        break;
                    }
                    stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                    stats.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
                    n += 1;
                    if n < WRITE_BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                if failed || sink.flush().await.is_err() {
                    handle.kill.cancel();
                    break;
                }
            }
        }
    }
}

fn truncate_reason(s: &str) -> String {
    // A close reason must fit in 123 bytes.
    let mut end = s.len().min(123);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn render(o: Outbound, vsn: Vsn) -> Message {
    match o {
        Outbound::Text(t) => Message::Text(t.into()),
        Outbound::Binary(b) => Message::Binary(b.into()),
        Outbound::Ws(m) => m,
        Outbound::Change { topic, ids, data } => {
            Message::Text(change_frame(vsn, &topic, &ids, &data).into())
        }
        Outbound::Push {
            topic,
            event,
            payload,
        } => Message::Text(frame::encode(vsn, None, None, &topic, event, &payload).into()),
    }
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

/// The payload of a `system` message.
pub fn system_payload(extension: &str, status: &str, message: &str, topic: &str) -> String {
    json!({
        "extension": extension,
        "status": status,
        "message": message,
        "channel": topic.strip_prefix("realtime:").unwrap_or(topic),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::BindingIds;

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
