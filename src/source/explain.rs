//! Server errors an operator can fix, rewritten into instructions.
//!
//! Decided by the SQLSTATE code and, where a code names no object, by what the
//! catalog says now ([`ErrorFacts`]) — never by the message text, which the server
//! translates (`lc_messages`). 42704 (undefined_object) is the slot when the slot
//! is gone, else the publication; 55000 (object_not_in_prerequisite_state) is
//! `wal_level` when that is not `logical`, else an invalidated slot when its
//! `wal_status` is `lost`; 55006 (object_in_use) at the first start is another
//! consumer holding the slot.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::source::error::PgError;
use crate::source::protocol::ReplicationOptions;
use crate::source::slot;

/// What the catalog says when an error's SQLSTATE alone does not tell which object
/// it is about; `None` where it could not be read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ErrorFacts {
    pub wal_level: Option<String>,
    pub publication_exists: Option<bool>,
    pub slot_exists: Option<bool>,
    /// The slot's `wal_status` is `lost`: it was invalidated.
    pub slot_lost: bool,
}

/// How long [`explain`] waits for the catalog before giving the error as it is.
const FACTS_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads [`ErrorFacts`] over a new SQL connection (the replication connection is
/// gone or unusable after an error).
async fn read_facts(opts: &ReplicationOptions) -> Result<ErrorFacts, PgError> {
    let sql = crate::source::tls::connect_sql(&opts.conn).await?;
    let row = sql
        .query_one(
            "select current_setting('wal_level'), \
                    exists (select 1 from pg_catalog.pg_publication where pubname = $1), \
                    exists (select 1 from pg_catalog.pg_replication_slots where slot_name = $2), \
                    coalesce((select wal_status = 'lost' from pg_catalog.pg_replication_slots where slot_name = $2), false)",
            &[&opts.publication, &opts.slot],
        )
        .await?;
    Ok(ErrorFacts {
        wal_level: Some(row.get(0)),
        publication_exists: Some(row.get(1)),
        slot_exists: Some(row.get(2)),
        slot_lost: row.get(3),
    })
}

/// Rewrites server errors that an operator can fix into instructions. Decided by
/// the SQLSTATE code and, where the code names no object, by what the catalog
/// says now ([`ErrorFacts`]) — never by the message, which the server translates.
pub(crate) async fn explain(
    e: PgError,
    opts: &ReplicationOptions,
    ever_streamed: bool,
    shutdown: &CancellationToken,
) -> PgError {
    let facts = if matches!(e.sqlstate(), Some("42704" | "55000")) {
        tokio::select! {
            _ = shutdown.cancelled() => ErrorFacts::default(),
            r = tokio::time::timeout(FACTS_TIMEOUT, read_facts(opts)) => match r {
                Ok(Ok(f)) => f,
                Ok(Err(err)) => {
                    tracing::debug!(slot = %opts.slot, error = %err, "cannot read the catalog to explain an error");
                    ErrorFacts::default()
                }
                Err(_) => ErrorFacts::default(),
            },
        }
    } else {
        ErrorFacts::default()
    };
    explain_with(e, opts, &facts, ever_streamed)
}

/// [`explain`] once the facts are known: pure, so tests can show that the message
/// plays no part.
pub(crate) fn explain_with(
    e: PgError,
    opts: &ReplicationOptions,
    facts: &ErrorFacts,
    ever_streamed: bool,
) -> PgError {
    let Some(code) = e.sqlstate() else {
        return e;
    };
    match code {
        // undefined_object: START_REPLICATION names the slot, decoding names the
        // publication.
        "42704" if facts.slot_exists == Some(false) => PgError::Setup(format!(
            "replication slot {:?} does not exist (it may have been dropped): create it with `walcast setup --publication {} --slot {} --create-slot` or run with --create-slot; changes made while it did not exist are not recoverable ({e})",
            opts.slot, opts.publication, opts.slot
        )),
        "42704" if facts.publication_exists == Some(false) => PgError::Setup(format!(
            "publication {:?} does not exist (it may have been dropped): create it with `walcast setup --publication {} --tables …` or CREATE PUBLICATION ({e})",
            opts.publication, opts.publication
        )),
        // object_in_use: another walsender holds the slot. After a lost stream it
        // may be this walcast's previous session going away (transient: retried).
        "55006" if !ever_streamed => PgError::Setup(format!(
            "replication slot {:?} is already in use by another connection ({e}): stop the other consumer, or give this walcast its own slot with --slot",
            opts.slot
        )),
        // object_not_in_prerequisite_state: wal_level, or the slot invalidated.
        "55000" if facts.wal_level.as_deref().is_some_and(|l| l != "logical") => {
            PgError::Setup(slot::WAL_LEVEL_HELP.to_string())
        }
        "55000" if facts.slot_lost => PgError::Setup(format!(
            "replication slot {:?} was invalidated because the WAL it needed was removed (max_slot_wal_keep_size): drop and recreate it; changes since its confirmed position are lost ({e})",
            opts.slot
        )),
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PgConnInfo;
    use crate::source::error::{ErrorKind, ServerError};

    fn opts() -> ReplicationOptions {
        ReplicationOptions {
            conn: PgConnInfo::parse("postgres://u@localhost/db").unwrap(),
            slot: "s1".into(),
            publication: "p1".into(),
            create_slot: false,
            temporary: false,
            start_lsn: None,
            retry_definite_errors: false,
        }
    }

    /// Messages a server may send with the same code: English, translated,
    /// garbage, empty, and one full of the words the old matcher looked for.
    const MESSAGES: [&str; 6] = [
        "replication slot \"s1\" does not exist",
        "Replikations-Slot »s1« existiert nicht",
        "le slot de réplication « s1 » n'existe pas",
        "\u{fffd}\u{fffd} garbage",
        "",
        "publication does not exist wal_level invalidated is active for PID can no longer get changes",
    ];

    fn server(code: &str, message: &str) -> PgError {
        PgError::Server(ServerError {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: None,
        })
    }

    /// The explanation with the server's own error (quoted for context) cut out.
    fn explained(
        code: &str,
        message: &str,
        facts: &ErrorFacts,
        streamed: bool,
    ) -> (ErrorKind, String) {
        let e = server(code, message);
        let quoted = e.to_string();
        let out = explain_with(e, &opts(), facts, streamed);
        (
            out.kind(),
            out.to_string().replace(&quoted, "<server error>"),
        )
    }

    fn same_for_every_message(
        code: &str,
        facts: &ErrorFacts,
        streamed: bool,
    ) -> (ErrorKind, String) {
        let first = explained(code, MESSAGES[0], facts, streamed);
        for m in MESSAGES {
            assert_eq!(
                explained(code, m, facts, streamed),
                first,
                "{code} with {m:?}"
            );
        }
        first
    }

    #[test]
    fn undefined_object_is_the_slot_or_the_publication_by_the_catalog() {
        let slot_gone = ErrorFacts {
            slot_exists: Some(false),
            publication_exists: Some(true),
            ..Default::default()
        };
        let (kind, text) = same_for_every_message("42704", &slot_gone, false);
        assert_eq!(kind, ErrorKind::Usage);
        assert!(
            text.starts_with("replication slot \"s1\" does not exist"),
            "{text}"
        );
        assert!(text.contains("--create-slot"), "{text}");

        let publication_gone = ErrorFacts {
            slot_exists: Some(true),
            publication_exists: Some(false),
            ..Default::default()
        };
        let (kind, text) = same_for_every_message("42704", &publication_gone, false);
        assert_eq!(kind, ErrorKind::Usage);
        assert!(
            text.starts_with("publication \"p1\" does not exist"),
            "{text}"
        );

        // Both there (or unknown): the server's error as it is.
        let (kind, text) = same_for_every_message("42704", &ErrorFacts::default(), false);
        assert_eq!((kind, text.as_str()), (ErrorKind::Usage, "<server error>"));
    }

    #[test]
    fn prerequisite_state_is_wal_level_or_an_invalidated_slot_by_the_catalog() {
        let replica = ErrorFacts {
            wal_level: Some("replica".into()),
            ..Default::default()
        };
        let (kind, text) = same_for_every_message("55000", &replica, false);
        assert_eq!(kind, ErrorKind::Usage);
        assert_eq!(text, slot::WAL_LEVEL_HELP);

        let lost = ErrorFacts {
            wal_level: Some("logical".into()),
            slot_exists: Some(true),
            slot_lost: true,
            ..Default::default()
        };
        let (kind, text) = same_for_every_message("55000", &lost, false);
        assert_eq!(kind, ErrorKind::Usage);
        assert!(text.contains("was invalidated"), "{text}");
        assert!(text.contains("drop and recreate it"), "{text}");
    }

    #[test]
    fn a_slot_in_use_is_explained_at_first_and_retried_after_streaming() {
        let (kind, text) = same_for_every_message("55006", &ErrorFacts::default(), false);
        assert_eq!(kind, ErrorKind::Usage);
        assert!(
            text.contains("already in use by another connection"),
            "{text}"
        );
        // After a lost stream the holder may be this walcast's previous session.
        let (kind, text) = same_for_every_message("55006", &ErrorFacts::default(), true);
        assert_eq!(
            (kind, text.as_str()),
            (ErrorKind::Transient, "<server error>")
        );
    }

    #[test]
    fn other_codes_are_left_alone_whatever_the_message_says() {
        let facts = ErrorFacts {
            wal_level: Some("replica".into()),
            slot_exists: Some(false),
            publication_exists: Some(false),
            slot_lost: true,
        };
        for code in ["42P01", "57P01", "XX000", "08006"] {
            let (_, text) = same_for_every_message(code, &facts, false);
            assert_eq!(text, "<server error>", "{code}");
        }
    }
}
