//! Source: everything that talks to PostgreSQL.

pub mod catalog;
pub mod conn;
pub mod error;
pub mod explain;
pub mod flush;
pub mod protocol;
pub mod session;
pub mod slot;
pub mod tls;
