//! Server: HTTP.

pub mod http;
pub mod listener;
pub mod metrics;
pub mod rest;
pub mod router;
