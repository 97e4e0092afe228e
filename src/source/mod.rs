//! Source (layer 2): everything that talks to PostgreSQL, and nothing above it.
//!
//! - [`conn`]: the replication connection (startup, authentication, CopyBoth).
//! - [`tls`]: TLS as `sslmode` asks, and ordinary SQL connections.
//! - [`protocol`]: the bytes of the replication stream and of status updates,
//!   without IO.
//! - [`flush`]: which flush LSN may be reported, and when.
//! - [`session`]: the streaming loop: reconnects, backpressure, blocked states.
//! - [`slot`]: pre-flight checks and slot creation.
//! - [`catalog`]: the published tables and their columns, read over SQL.
//! - [`error`]: the one error type of this layer.

pub mod catalog;
pub mod conn;
pub mod error;
pub mod explain;
pub mod flush;
pub mod policy;
pub mod protocol;
pub mod session;
pub mod slot;
pub mod tls;
