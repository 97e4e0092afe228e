//! The REST endpoints of the main listener: `POST /api/broadcast` and `GET /api/changes`.

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
            Err(e) => return unauthorized(&shared, peer, &e),
        }
    }
    // Without auth, rate-limited per client address.
    match shared.broadcast.rest(&body, &claims, &peer.ip()) {
        Ok(_) => StatusCode::ACCEPTED.into_response(),
        Err((code, error)) => (code, Json(json!({ "error": error }))).into_response(),
    }
}

/// 401 for a token that does not verify (counted by reason, as on the socket).
fn unauthorized(
    shared: &Shared,
    peer: std::net::SocketAddr,
    e: &crate::route::auth::AuthError,
) -> Response {
    shared.stats.events.auth_failed(AuthFailure::of(e), peer);
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({ "error": e.to_string(), "reason": e.reason() })),
    )
        .into_response()
}

/// How long `GET /api/changes` waits for the change log to hold what the hub
/// already routed (it is written right behind live delivery).
const CAUGHT_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Most changes one page of `GET /api/changes` holds.
pub const CHANGES_PAGE_MAX: usize = 10_000;

/// `GET /api/changes?table=…&since=…` (also under `/realtime/v1`): the changes a
/// channel joined with one `postgres_changes` binding (`event`, `filter`,
/// `select` as query parameters) would be replayed from `since`, judged with the
/// caller's token exactly as a join's, one page at a time (`limit`, default
/// 1000; `cursor` = the previous page's `next_cursor`). 200 with
/// `{"changes":[…data…],"next_cursor":…,"more":…}`; 400 for bad input or a
/// binding a join would refuse; 401 for a bad token; 410 with `code: REPLAY_GAP`
/// when the log cannot serve `since`; 503 while there is no log, or while it
/// is more than 2 s behind what was delivered live.
pub async fn changes(
    State(shared): State<Arc<Shared>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
    axum::extract::Query(params): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    use crate::deliver::replay::{parse_since, read_page, PageStart};
    let bad =
        |code: StatusCode, error: String| (code, Json(json!({ "error": error }))).into_response();
    let token = if shared.auth.enabled() {
        let text = crate::route::auth::request_token(&headers, &params).unwrap_or("");
        match shared.auth.verify(text).await {
            Ok(t) => Some(t),
            Err(e) => return unauthorized(&shared, peer, &e),
        }
    } else {
        None
    };
    let Some((handle, log)) = shared.log.as_ref().and_then(|h| Some((h, h.reader()?))) else {
        return bad(
            StatusCode::SERVICE_UNAVAILABLE,
            "the change log is off ([log] dir) or not open yet (replication has not connected)"
                .into(),
        );
    };
    let Some(table) = params.get("table").filter(|t| !t.is_empty()) else {
        return bad(
            StatusCode::BAD_REQUEST,
            "table is required (schema.table or table)".into(),
        );
    };
    let (schema, table) = table.split_once('.').unwrap_or(("public", table));
    let mut obj = Map::new();
    obj.insert(
        "event".into(),
        json!(params.get("event").map_or("*", String::as_str)),
    );
    obj.insert("schema".into(), json!(schema));
    obj.insert("table".into(), json!(table));
    if let Some(f) = params.get("filter") {
        obj.insert("filter".into(), json!(f));
    }
    if let Some(sel) = params.get("select") {
        let cols: Vec<&str> = sel
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        obj.insert("select".into(), json!(cols));
    }
    let binding =
        match crate::deliver::session::resolve_binding(&shared, peer, &obj, token.as_ref(), false)
            .await
        {
            Ok((Ok(b), _)) => b,
            Ok((Err(table), _)) => {
                return bad(
                    StatusCode::BAD_REQUEST,
                    format!("this token may not see {table}"),
                )
            }
            Err(reason) => return bad(StatusCode::BAD_REQUEST, reason),
        };
    let start = match (params.get("cursor"), params.get("since")) {
        (Some(c), _) => match PageStart::parse_cursor(c) {
            Some(s) => s,
            None => {
                return bad(
                    StatusCode::BAD_REQUEST,
                    format!("cursor {c:?} is not a next_cursor walcast gave"),
                )
            }
        },
        (None, Some(s)) => match parse_since(&Value::String(s.clone())) {
            Ok(s) => PageStart::Since(s),
            Err(e) => return bad(StatusCode::BAD_REQUEST, format!("since {e}")),
        },
        (None, None) => {
            return bad(
                StatusCode::BAD_REQUEST,
                "since (a commit_timestamp or commit LSN X/Y) or cursor is required".into(),
            )
        }
    };
    let limit = match params.get("limit").map(|l| l.parse::<usize>()) {
        None => 1000,
        Some(Ok(n)) if (1..=CHANGES_PAGE_MAX).contains(&n) => n,
        Some(_) => {
            return bad(
                StatusCode::BAD_REQUEST,
                format!("limit must be 1 to {CHANGES_PAGE_MAX}"),
            )
        }
    };
    let render = crate::decode::value::RenderOptions {
        big_numbers_as_strings: shared.config.values.big_numbers_as_strings,
    };
    // Whatever a client was sent live before this request is in the page.
    if !handle.caught_up(&log, CAUGHT_UP_WAIT).await {
        return bad(
            StatusCode::SERVICE_UNAVAILABLE,
            "the change log does not yet hold everything already delivered live (a long transaction still streaming, or the log cannot be written); retry".into(),
        );
    }
    let reader = log.clone();
    let gate = shared.rls.as_ref().map(|r| r.gate());
    let page = tokio::task::spawn_blocking(move || {
        read_page(&reader, binding, start, limit, render, gate)
    })
    .await;
    match page {
        Ok(Ok(p)) => {
            let mut body =
                String::with_capacity(64 + p.changes.iter().map(|c| c.len() + 1).sum::<usize>());
            body.push_str("{\"changes\":[");
            for (i, c) in p.changes.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(c);
            }
            body.push_str("],\"next_cursor\":");
            body.push_str(&Value::String(p.next_cursor).to_string());
            body.push_str(if p.more {
                ",\"more\":true}"
            } else {
                ",\"more\":false}"
            });
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        }
        Ok(Err(crate::changelog::ReplayError::Gap { .. })) => {
            let oldest = log.stats().oldest;
            (
                StatusCode::GONE,
                Json(json!({
                    "error": "the change log no longer holds every change since that position: refetch",
                    "code": crate::deliver::replay::REPLAY_GAP,
                    "oldest_commit_lsn": oldest.map(|o| o.commit_lsn.to_string()),
                })),
            )
                .into_response()
        }
        Ok(Err(e)) => bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(_) => bad(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the read was cancelled".into(),
        ),
    }
}
