//! Errors of the PostgreSQL side, and the limits on waiting for it.

use crate::decode::assembler::FramingError;
use crate::decode::pgoutput::DecodeError;
use crate::lsn::Lsn;
use std::time::Duration;

/// Longest wait for a connection to PostgreSQL (TCP, TLS, startup, authentication).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for the answer to one query or replication command (slot creation,
/// which waits for open transactions, has none; it only watches shutdown).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// An error or notice sent by the server (`ErrorResponse` / `NoticeResponse` fields).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    /// SQLSTATE code, such as `42704`.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, "; {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl ServerError {
    pub fn parse(mut body: &[u8]) -> ServerError {
        let mut e = ServerError::default();
        while let Some((&field, rest)) = body.split_first() {
            if field == 0 {
                break;
            }
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let value = String::from_utf8_lossy(&rest[..end]).into_owned();
            match field {
                b'S' => e.severity = value,
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                _ => {}
            }
            body = rest.get(end + 1..).unwrap_or_default();
        }
        e
    }
}

/// A condition of the slot or publication that retrying cannot fix: streaming stops
/// until an operator acts, `/ready` fails and clients are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// The slot was dropped after walcast had streamed from it. walcast does not
    /// re-create it (everything committed meanwhile is gone); an operator does, and
    /// walcast reports the gap.
    SlotMissing = 1,
    /// The publication does not exist.
    PublicationMissing = 2,
    /// The publication was dropped and re-created while the slot still had changes
    /// from before to decode: the walsender cannot get past them.
    PublicationRecreated = 3,
}

impl Blocked {
    pub const ALL: [Blocked; 3] = [
        Blocked::SlotMissing,
        Blocked::PublicationMissing,
        Blocked::PublicationRecreated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Blocked::SlotMissing => "slot_missing",
            Blocked::PublicationMissing => "publication_missing",
            Blocked::PublicationRecreated => "publication_recreated",
        }
    }

    pub(crate) fn from_u8(v: u8) -> Option<Blocked> {
        Blocked::ALL.into_iter().find(|b| *b as u8 == v)
    }
}

/// Why streaming stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("replication connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("{0}")]
    Setup(String),
    #[error("PostgreSQL: {0}")]
    Server(ServerError),
    #[error("SQL connection: {0}")]
    Sql(String),
    /// TLS could not be set up as `sslmode` asks (definite: the message says what to change).
    #[error("TLS: {0}")]
    Tls(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("cannot decode pgoutput message: {0}")]
    Decode(#[from] DecodeError),
    #[error("broken replication stream: {0}")]
    Framing(#[from] FramingError),
    /// Needs an operator (see [`Blocked`]); the message says what to do.
    #[error("{message}")]
    Blocked {
        kind: Blocked,
        message: String,
        /// The slot's confirmed position when this was found (a blocked stream
        /// waits for it to move).
        slot_at: Option<Lsn>,
    },
}

impl ReplicationError {
    /// Whether retrying may help without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Connect { .. } | ReplicationError::Io(_) => true,
            ReplicationError::Sql(_) => true,
            // 57P01 admin shutdown, 57P03 cannot connect now, 53300 too many connections,
            // 55006 slot in use (the previous session may still be going away), 08*: connection.
            ReplicationError::Server(e) => {
                matches!(e.code.as_str(), "57P01" | "57P02" | "57P03" | "53300")
                    || e.code.starts_with("08")
            }
            _ => false,
        }
    }

    /// The SQLSTATE code of an error the server sent, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server(e) => Some(e.code.as_str()),
            _ => None,
        }
    }

    pub(crate) fn from_sql(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            return ReplicationError::Server(ServerError {
                severity: db.severity().to_string(),
                code: db.code().code().to_string(),
                message: db.message().to_string(),
                detail: db.detail().map(str::to_string),
                hint: db.hint().map(str::to_string),
            });
        }
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        ReplicationError::Sql(msg)
    }
}
