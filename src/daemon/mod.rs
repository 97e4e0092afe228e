//! Daemon (layer 6): `walcast serve`, the stages wired together.
//!
//! - [`serve`]: the pipeline: checks, start order, serving, shutdown order.
//! - [`notice`]: `system` messages to channels when replication is down or back.

pub mod notice;
pub mod serve;
