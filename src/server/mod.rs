//! Server (layer 5): HTTP. Every axum route and handler lives here.
//!
//! - [`router`]: the main listener's routes: the WebSocket upgrade, `/health`.
//! - [`rest`]: `POST /api/broadcast`.
//! - [`listener`]: the accept loop: connection limits, request timeout.
//! - [`http`]: CORS and the 404 for paths walcast does not serve.
//! - [`metrics`]: Prometheus metrics read from every stage's counters, health
//!   levels, `/metrics`, `/ready`.
//! - [`status`]: the live status page and its event stream.

pub mod http;
pub mod listener;
pub mod metrics;
pub mod rest;
pub mod router;
pub mod status;
