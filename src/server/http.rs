//! What every HTTP route shares: CORS for browsers on other origins, and a clear
//! 404 for paths walcast does not serve.
//!
//! # CORS
//!
//! `[server] cors_origins` lists the origins (`https://app.example.com`, or `"*"`
//! for any) whose pages may call walcast's HTTP endpoints (`POST /api/broadcast`,
//! `/health`, `/ready`, `/metrics`). None by default: browsers then refuse
//! cross-origin reads, as before. For an allowed `Origin`, a preflight (`OPTIONS`
//! with `Access-Control-Request-Method`) is answered 204 with the allowed methods
//! and headers, and every other response carries `Access-Control-Allow-Origin`
//! (the request's origin, with `Vary: Origin`). A preflight from an origin not
//! listed gets 403 with a JSON error naming the setting. WebSocket upgrades are
//! not subject to CORS in browsers and are not affected. (Fetch standard, "CORS
//! protocol".)
//!
//! # Unknown paths
//!
//! Any other path is answered 404 with a JSON error saying walcast serves
//! Realtime only, so `supabase.from('orders')` pointed at walcast fails with a
//! message instead of "succeeding" with no data.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;

/// Methods walcast's HTTP endpoints accept.
const ALLOW_METHODS: &str = "GET, POST, OPTIONS";
/// Request headers a browser may send (supabase-js sends these).
const ALLOW_HEADERS: &str = "authorization, apikey, x-api-key, content-type, x-client-info";
/// How long a browser may cache a preflight answer, seconds.
const MAX_AGE_SECS: &str = "600";

/// Adds the 404 fallback and, with `cors_origins`, CORS to every route of `app`.
pub fn finish(app: Router, cors_origins: &[String]) -> Router {
    let app = app.fallback(not_found);
    if cors_origins.is_empty() {
        return app;
    }
    let origins = Arc::new(cors_origins.to_vec());
    app.layer(axum::middleware::from_fn_with_state(origins, cors))
}

fn allowed(origins: &[String], origin: &str) -> bool {
    origins
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
}

async fn cors(State(origins): State<Arc<Vec<String>>>, req: Request, next: Next) -> Response {
    let Some(origin) = req.headers().get(header::ORIGIN).cloned() else {
        return next.run(req).await;
    };
    let ok = origin.to_str().is_ok_and(|o| allowed(&origins, o));
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        if !ok {
            let error = format!(
                "origin {} is not allowed: add it to [server] cors_origins",
                origin.to_str().unwrap_or("(not text)")
            );
            return (StatusCode::FORBIDDEN, Json(json!({ "error": error }))).into_response();
        }
        let mut resp = StatusCode::NO_CONTENT.into_response();
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(MAX_AGE_SECS),
        );
        return resp;
    }
    let mut resp = next.run(req).await;
    if ok {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    resp
}

async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    let error = format!(
        "walcast serves Supabase Realtime only: {method} {} is not served here. Realtime is at /realtime/v1/websocket (WebSocket) and /api/broadcast; REST and database queries (supabase.from) need PostgREST or Supabase",
        uri.path()
    );
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": error, "message": error, "code": "not_found" })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::invalid_origin;

    #[test]
    fn origins_are_checked() {
        assert!(invalid_origin("*").is_none());
        assert!(invalid_origin("https://app.example.com").is_none());
        assert!(invalid_origin("http://localhost:5173").is_none());
        assert!(invalid_origin("app.example.com").is_some());
        assert!(invalid_origin("https://app.example.com/").is_some());
        assert!(allowed(&["https://A.example".into()], "https://a.example"));
        assert!(!allowed(&["https://a.example".into()], "https://b.example"));
        assert!(allowed(&["*".into()], "https://b.example"));
    }
}
