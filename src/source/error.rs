//! Errors of the PostgreSQL side ([`PgError`], classified by [`ErrorKind`]), and the
//! limits on waiting for it.
//!
//! Classification reads the SQLSTATE code and the error's variant, never the
//! message: PostgreSQL translates messages (`lc_messages`), codes stay the same.
//! Where a code alone does not say which object an error is about (42704
//! undefined_object: the slot or the publication? 55000: `wal_level` or an
//! invalidated slot?), the replication session looks at the catalog to decide.

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
    /// The fields of an error `tokio_postgres` received.
    pub fn from_db(db: &tokio_postgres::error::DbError) -> ServerError {
        ServerError {
            severity: db.severity().to_string(),
            code: db.code().code().to_string(),
            message: db.message().to_string(),
            detail: db.detail().map(str::to_string),
            hint: db.hint().map(str::to_string),
        }
    }

    /// What this error means, by its SQLSTATE code.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::of_sqlstate(&self.code)
    }

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

/// What an error means for whoever got it, decided by the SQLSTATE code and the
/// error's variant only — never by message text, which PostgreSQL translates
/// (`lc_messages`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Retrying may help without anyone changing anything: the connection broke,
    /// the server is starting or shutting down, too many connections, a serialization
    /// failure, the slot still held by a session that is going away.
    Transient,
    /// The stream or its data is broken (protocol, decoding, framing, an internal
    /// server error): retrying repeats it, and it is not the operator's setting.
    Definite,
    /// The operator or the configuration must change something first: a bad URL,
    /// failed authentication, TLS settings, a missing slot, publication or database,
    /// `wal_level`, privileges, limits. The message says what.
    Usage,
}

impl ErrorKind {
    /// The kind of an error PostgreSQL sent, by its SQLSTATE code
    /// (<https://www.postgresql.org/docs/current/errcodes-appendix.html>).
    pub fn of_sqlstate(code: &str) -> ErrorKind {
        match code {
            // too_many_connections (53300) is transient; configuration_limit_exceeded
            // (53400: max_replication_slots) needs an operator.
            "53400" => ErrorKind::Usage,
            // admin/crash shutdown, cannot connect now, object in use (the slot's
            // previous session may still be going away), lock not available, query
            // canceled, serialization failure, deadlock.
            "57P01" | "57P02" | "57P03" | "55006" | "55P03" | "57014" | "40001" | "40P01" => {
                ErrorKind::Transient
            }
            // The database was dropped: an operator matter.
            "57P04" => ErrorKind::Usage,
            // object_not_in_prerequisite_state (wal_level, an invalidated slot),
            // feature_not_supported (logical decoding on a standby before 16).
            "55000" | "0A000" => ErrorKind::Usage,
            // invalid catalog name (no such database), invalid schema name.
            "3D000" | "3F000" => ErrorKind::Usage,
            _ => match code.get(..2) {
                // connection exception; insufficient resources.
                Some("08") | Some("53") => ErrorKind::Transient,
                // invalid authorization; syntax error or access rule violation
                // (undefined object, insufficient privilege); configuration file error.
                Some("28") | Some("42") | Some("F0") => ErrorKind::Usage,
                _ => ErrorKind::Definite,
            },
        }
    }
}

/// An error on the PostgreSQL side: connecting, the SQL connection, the replication
/// stream. Server errors keep their SQLSTATE, severity, message, detail and hint
/// ([`ServerError`]); errors of a lower layer (IO, `tokio_postgres`, rustls) are kept
/// whole as [`std::error::Error::source`]. [`PgError::kind`] says what it means.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("connection to PostgreSQL: {0}")]
    Io(#[from] std::io::Error),
    #[error("authentication failed: {0}")]
    Auth(String),
    /// Something the operator must change; the message says what.
    #[error("{0}")]
    Setup(String),
    #[error("PostgreSQL: {0}")]
    Server(ServerError),
    /// The SQL connection failed for a reason other than a server error (those
    /// become [`PgError::Server`]); the `tokio_postgres` error is the source.
    #[error("SQL connection: {0}")]
    Sql(#[source] tokio_postgres::Error),
    /// TLS could not be set up as `sslmode` asks (the message says what to change);
    /// the rustls or IO error, when there is one, is the source.
    #[error("TLS: {message}")]
    Tls {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
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

/// The name this error had before it covered the SQL connection, setup and the
/// catalog too.
pub type ReplicationError = PgError;

impl PgError {
    /// What this error means, by variant and SQLSTATE code only.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PgError::Connect { .. } | PgError::Io(_) => ErrorKind::Transient,
            // Not a server error: the connection broke or could not be made.
            PgError::Sql(e) => e
                .code()
                .map_or(ErrorKind::Transient, |c| ErrorKind::of_sqlstate(c.code())),
            PgError::Server(e) => ErrorKind::of_sqlstate(&e.code),
            PgError::Auth(_) | PgError::Setup(_) | PgError::Tls { .. } => ErrorKind::Usage,
            PgError::Blocked { .. } => ErrorKind::Usage,
            PgError::Protocol(_) | PgError::Decode(_) | PgError::Framing(_) => ErrorKind::Definite,
        }
    }

    /// Whether retrying may help without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }

    /// The SQLSTATE code of an error the server sent, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            PgError::Server(e) => Some(e.code.as_str()),
            PgError::Sql(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// A TLS set-up error with the message that says what to change.
    pub(crate) fn tls(message: impl Into<String>) -> Self {
        PgError::Tls {
            message: message.into(),
            source: None,
        }
    }

    /// A TLS error explained by `message`, caused by `source`.
    pub(crate) fn tls_caused(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        PgError::Tls {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// An error of the SQL connection: a server error keeps all its fields, any
    /// other error (IO, closed connection) is kept whole as the source.
    pub(crate) fn from_sql(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => PgError::Server(ServerError::from_db(db)),
            None => PgError::Sql(e),
        }
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError::from_sql(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, message: &str) -> PgError {
        PgError::Server(ServerError {
            severity: "FATAL".into(),
            code: code.into(),
            message: message.into(),
            ..Default::default()
        })
    }

    #[test]
    fn sqlstates_are_classified_by_code() {
        use ErrorKind::*;
        for (code, kind) in [
            ("08006", Transient),
            ("08001", Transient),
            ("57P01", Transient),
            ("57P02", Transient),
            ("57P03", Transient),
            ("53300", Transient),
            ("55006", Transient),
            ("40001", Transient),
            ("40P01", Transient),
            ("53400", Usage),
            ("28P01", Usage),
            ("28000", Usage),
            ("3D000", Usage),
            ("42704", Usage),
            ("42501", Usage),
            ("55000", Usage),
            ("XX000", Definite),
            ("22021", Definite),
            ("", Definite),
            ("?", Definite),
        ] {
            assert_eq!(ErrorKind::of_sqlstate(code), kind, "{code}");
        }
    }

    #[test]
    fn the_message_plays_no_part_in_the_kind() {
        let messages = [
            "terminating connection due to administrator command",
            "Verbindung wird abgebrochen aufgrund von Anweisung des Administrators",
            "l'arrêt de la connexion sur commande de l'administrateur",
            "",
            "does not exist wal_level invalidated is active for PID password authentication failed",
        ];
        for code in [
            "57P01", "42704", "55000", "55006", "28P01", "XX000", "08006",
        ] {
            let kinds: Vec<ErrorKind> = messages.iter().map(|m| server(code, m).kind()).collect();
            assert!(kinds.iter().all(|k| *k == kinds[0]), "{code}: {kinds:?}");
            assert_eq!(kinds[0], ErrorKind::of_sqlstate(code));
        }
    }

    #[test]
    fn variants_have_their_kind_and_keep_their_source() {
        use std::error::Error as _;
        let io = PgError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        assert_eq!(io.kind(), ErrorKind::Transient);
        assert!(io.source().is_some(), "the IO error is the source");
        let tls = PgError::tls_caused(
            "bad certificate: point sslrootcert at the CA",
            std::io::Error::other("inner"),
        );
        assert_eq!(tls.kind(), ErrorKind::Usage);
        assert_eq!(
            tls.source().map(|s| s.to_string()).as_deref(),
            Some("inner")
        );
        assert_eq!(PgError::Protocol("x".into()).kind(), ErrorKind::Definite);
        assert_eq!(PgError::Setup("x".into()).kind(), ErrorKind::Usage);
        assert_eq!(PgError::Auth("x".into()).kind(), ErrorKind::Usage);
        let e = server("42704", "whatever");
        assert_eq!(e.sqlstate(), Some("42704"));
    }
}
