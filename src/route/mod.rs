//! Route: who may and wants to see a change.

pub mod auth;
pub mod filter;
pub mod hub;
