//! Deliver (layer 4): the WebSocket side of a connection, after the upgrade.
//!
//! - [`session`]: a connection's channels in the Phoenix protocol: join, leave,
//!   heartbeat, access tokens.
//! - [`socket`]: what sessions share, and each connection's writer.
//! - [`frame`]: Phoenix frames (vsn 1.0.0 / 2.0.0), close codes.
//! - [`broadcast`] and [`presence`]: Supabase Broadcast and Presence.
//! - [`replay`]: resume on join, from the change log.
//! - [`stats`]: this layer's counters, read by the server's metrics.

pub mod broadcast;
pub mod expiry;
pub mod frame;
pub mod presence;
pub mod replay;
pub mod session;
pub mod socket;
pub mod stats;
