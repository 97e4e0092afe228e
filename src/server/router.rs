//! The HTTP routes of the main listener: the WebSocket upgrade (token checked
//! before it), `/health`, and the REST broadcast endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::deliver::frame::Vsn;
use crate::deliver::session;
use crate::deliver::socket::{Shared, WS_READ_BUFFER, WS_WRITE_BUFFER};
use crate::deliver::stats::AuthFailure;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/realtime/v1/websocket", get(upgrade))
        .route("/socket/websocket", get(upgrade))
        .route("/health", get(health))
        .route("/api/broadcast", post(crate::server::rest::broadcast))
        .route(
            "/realtime/v1/api/broadcast",
            post(crate::server::rest::broadcast),
        )
        .route("/api/changes", get(crate::server::rest::changes))
        .route(
            "/realtime/v1/api/changes",
            get(crate::server::rest::changes),
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
        let apikey = crate::route::auth::request_token(&headers, &params).unwrap_or("");
        match shared.auth.verify(apikey).await {
            Ok(t) => connect_token = Some(t),
            Err(e) => {
                shared.stats.events.auth_failed(AuthFailure::of(&e), peer);
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
