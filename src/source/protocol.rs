//! The replication protocol without IO: what to ask for, the messages of the
//! CopyBoth stream, and the standby status updates.

use crate::config::PgConnInfo;
use crate::lsn::Lsn;

/// What to stream from where.
#[derive(Clone, Debug)]
pub struct ReplicationOptions {
    pub conn: PgConnInfo,
    pub slot: String,
    pub publication: String,
    /// Create the slot when it does not exist.
    pub create_slot: bool,
    /// Create a temporary slot (dropped by the server when the connection ends).
    pub temporary: bool,
    /// Start from this LSN instead of the slot's confirmed position.
    pub start_lsn: Option<Lsn>,
    /// Keep retrying on errors that need an operator (slot dropped, …) once streaming
    /// has begun, instead of returning them. Errors at the first connect always return.
    pub retry_definite_errors: bool,
}
