//! Daemon (layer 6): `walcast serve`, the stages wired together.
//!
//! - [`serve`]: the pipeline: checks, start order, serving, shutdown order.
//! - [`relay`]: `walcast relay`, the slot reader of a cluster (publishes to NATS JetStream).
//! - [`peers`]: client broadcasts between the gateways of a cluster (core NATS).
//! - [`peer_presence`]: presence between the gateways of a cluster (core NATS).
//! - [`notice`]: `system` messages to channels when replication is down or back.

pub mod notice;
pub mod peer_presence;
pub mod peers;
pub mod relay;
pub mod serve;
