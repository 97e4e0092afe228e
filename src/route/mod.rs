//! Route (layer 3): who may and wants to see a change, and handing it to them.
//!
//! - [`hub`]: the routing index: match a change to subscriptions, encode each
//!   payload once, deliver the shared bytes; confirm flush progress.
//! - [`queue`]: a connection's bounded outbound queue and the one way a client
//!   that cannot keep up is closed.
//! - [`filter`]: PostgREST filters bound to column types, evaluated in memory.
//! - [`auth`]: JWT verification and per-table row rules.
//! - [`rls`]: RLS mode: the database's own policies, compiled to row rules or
//!   checked by batched SQL.

pub mod auth;
pub mod filter;
pub mod hub;
pub mod queue;
pub mod rls;
