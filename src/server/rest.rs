//! The REST endpoints of the main listener: `POST /api/broadcast`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::deliver::socket::Shared;
use crate::deliver::stats::AuthFailure;

/// `POST /api/broadcast` and `/realtime/v1/api/broadcast`: 202 when every message
/// was accepted, 400 with `{"error": …}` for bad input, 403 for a private topic the
/// caller may not write to.
pub async fn broadcast(
    State(shared): State<Arc<Shared>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
    axum::extract::Query(params): axum::extract::Query<std::collections::HashMap<String, String>>,
    body: Bytes,
) -> Response {
    // Authenticated like the socket ([`crate::route::auth::request_token`]).
    let mut claims = Map::new();
    if shared.auth.enabled() {
        let token = crate::route::auth::request_token(&headers, &params).unwrap_or("");
        match shared.auth.verify(token).await {
            Ok(t) => {
                claims = t.claims;
                // Rate-limited per user (`sub`); a token naming no user (a
                // project's anon key, shared by every browser) per token and
                // client address, so one abuser does not spend everyone's budget.
                let caller = match claims.get("sub").and_then(Value::as_str) {
                    Some(sub) => format!("sub:{sub}"),
                    None => format!("token:{token}@{}", peer.ip()),
                };
                return match shared.broadcast.rest(&body, &claims, &caller) {
                    Ok(_) => StatusCode::ACCEPTED.into_response(),
                    Err((code, error)) => (code, Json(json!({ "error": error }))).into_response(),
                };
            }
            Err(e) => {
                shared.stats.events.auth_failed(AuthFailure::of(&e), peer);
                return (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({ "error": e.to_string(), "reason": e.reason() })),
                )
                    .into_response();
            }
        }
    }
    // Without auth, rate-limited per client address.
    match shared.broadcast.rest(&body, &claims, &peer.ip()) {
        Ok(_) => StatusCode::ACCEPTED.into_response(),
        Err((code, error)) => (code, Json(json!({ "error": error }))).into_response(),
    }
}
