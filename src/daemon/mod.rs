//! Daemon wiring.

pub mod notice;
pub mod serve;
