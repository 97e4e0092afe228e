//! Pre-flight checks and slot management over the ordinary SQL connection.
//!
//! Before streaming, walcast checks what would otherwise surface as an obscure
//! error mid-stream, and says what to do about each: `wal_level` not `logical`,
//! the slot missing, made by another plugin, for another database, in use, or
//! invalidated, and the publication missing.

use std::time::Duration;

use crate::lsn::Lsn;
use crate::source::conn::ReplicationConnection;
use crate::source::error::PgError;
use crate::source::protocol::ReplicationOptions;
pub use crate::source::protocol::{quote_ident, quote_literal};

pub const WAL_LEVEL_HELP: &str = "PostgreSQL is not configured for logical replication: wal_level must be 'logical'. Set wal_level = logical in postgresql.conf (or run ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL; a reload is not enough.";

/// What the checks found.
#[derive(Debug)]
pub struct Preflight {
    pub server_version_num: i32,
    pub wal_sender_timeout: Option<Duration>,
    /// The slot, if it exists.
    pub slot: Option<SlotInfo>,
    pub publication_exists: bool,
}

#[derive(Debug)]
pub struct SlotInfo {
    pub confirmed_flush: Lsn,
}

/// Runs the checks; errors are definite and say what to change.
pub async fn preflight(
    sql: &tokio_postgres::Client,
    opts: &ReplicationOptions,
) -> Result<Preflight, PgError> {
    let q = |e| PgError::from_sql(e);
    let row = sql
        .query_one(
            "select current_setting('wal_level'), current_setting('server_version_num')::int4, \
                    current_setting('wal_sender_timeout')",
            &[],
        )
        .await
        .map_err(q)?;
    let wal_level: String = row.get(0);
    if wal_level != "logical" {
        return Err(PgError::Setup(format!(
            "{WAL_LEVEL_HELP} (it is '{wal_level}' now)"
        )));
    }
    let server_version_num: i32 = row.get(1);
    let wal_sender_timeout = parse_pg_duration(&row.get::<_, String>(2));

    let publication = sql
        .query_opt(
            "select 1 from pg_catalog.pg_publication where pubname = $1",
            &[&opts.publication],
        )
        .await
        .map_err(q)?;
    let publication_exists = publication.is_some();

    let slot_row = sql
        .query_opt(
            "select plugin::text, slot_type::text, database::text, active_pid, \
                    confirmed_flush_lsn::text, wal_status::text, temporary \
             from pg_catalog.pg_replication_slots where slot_name = $1",
            &[&opts.slot],
        )
        .await
        .map_err(q)?;
    // A missing slot or publication is for the caller to judge (created at first
    // start, critical later).
    let slot = match slot_row {
        None => None,
        Some(r) => {
            let plugin: Option<String> = r.get(0);
            let database: Option<String> = r.get(2);
            let active_pid: Option<i32> = r.get(3);
            let confirmed: Option<String> = r.get(4);
            let wal_status: Option<String> = r.get(5);
            if plugin.as_deref() != Some("pgoutput") {
                return Err(PgError::Setup(format!(
                    "replication slot {:?} uses plugin {:?}, walcast needs pgoutput: drop it or choose another --slot",
                    opts.slot,
                    plugin.unwrap_or_else(|| "none (a physical slot)".into())
                )));
            }
            if database.as_deref() != Some(opts.conn.dbname.as_str()) {
                return Err(PgError::Setup(format!(
                    "replication slot {:?} belongs to database {:?}, not {:?}: connect to that database or choose another --slot",
                    opts.slot,
                    database.unwrap_or_default(),
                    opts.conn.dbname
                )));
            }
            if let Some(pid) = active_pid {
                return Err(PgError::Setup(format!(
                    "replication slot {:?} is already in use by another connection (server PID {pid}): stop the other consumer, or give this walcast its own slot with --slot",
                    opts.slot
                )));
            }
            if wal_status.as_deref() == Some("lost") {
                return Err(PgError::Setup(format!(
                    "replication slot {:?} was invalidated because the WAL it needed was removed (max_slot_wal_keep_size): drop and recreate it; changes since its confirmed position are lost",
                    opts.slot
                )));
            }
            Some(SlotInfo {
                confirmed_flush: confirmed.and_then(|c| c.parse().ok()).unwrap_or(Lsn::ZERO),
            })
        }
    };
    Ok(Preflight {
        server_version_num,
        wal_sender_timeout,
        slot,
        publication_exists,
    })
}

/// Creates a logical slot with pgoutput on the replication connection (temporary slots
/// must be created there, as they belong to the session).
pub async fn create_slot(
    conn: &mut ReplicationConnection,
    name: &str,
    temporary: bool,
) -> Result<Lsn, PgError> {
    validate_slot_name(name)?;
    let rows = conn
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} {}LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            quote_ident(name),
            if temporary { "TEMPORARY " } else { "" }
        ))
        .await
        .map_err(|e| match e {
            PgError::Server(se) if se.code == "53400" => PgError::Setup(format!(
                "cannot create replication slot {name:?}: {}; raise max_replication_slots (needs a restart) or drop unused slots",
                se.message
            )),
            PgError::Server(se) if se.code == "42501" => PgError::Setup(format!(
                "cannot create replication slot {name:?}: {}; the role needs the REPLICATION attribute or superuser",
                se.message
            )),
            other => other,
        })?;
    Ok(rows
        .first()
        .and_then(|r| r.get(1).cloned().flatten())
        .and_then(|s| s.parse().ok())
        .unwrap_or(Lsn::ZERO))
}

/// Slot names: lower-case letters, digits and underscores, at most 63 characters.
pub fn validate_slot_name(name: &str) -> Result<(), PgError> {
    crate::config::validate_slot_name(name).map_err(PgError::Setup)
}

/// Parses a duration as `current_setting` prints it: `60s`, `1min`, `500ms`, `0`.
pub fn parse_pg_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    Some(match unit.trim() {
        "" | "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "min" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_pg_duration("1min"), Some(Duration::from_secs(60)));
        assert_eq!(parse_pg_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_pg_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_pg_duration("x"), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert!(validate_slot_name("walcast_1").is_ok());
        assert!(validate_slot_name("Bad-Name").is_err());
    }
}
