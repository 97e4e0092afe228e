//! Deliver: the Phoenix-protocol sessions and their writers.

pub mod broadcast;
pub mod expiry;
pub mod frame;
pub mod presence;
pub mod session;
pub mod socket;
pub mod stats;
