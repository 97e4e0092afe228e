//! `walcast log`: the change log as JSON lines, one per change, in commit order —
//! the audit trail of what walcast read from PostgreSQL.
//!
//! It opens the log directory read-only ([`LogReader::open_read_only`]), so it
//! runs next to a `walcast serve` that is writing the same directory: it prints
//! what was committed to the log when it started, changes nothing there, and a
//! transaction the daemon is still appending is simply not there yet.
//!
//! Values are rendered by the live path's own code ([`Change::write_row`] with
//! the same [`RenderOptions`]), so a row reads exactly as a subscriber got it; the
//! commit time has microseconds, so a line's `commit_timestamp` or `commit_lsn`
//! given back as `--since` starts right after that transaction.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokio_util::sync::CancellationToken;

use crate::changelog::codec::{self, CodecError, Logged};
use crate::changelog::{Entry, Horizon, LogError, LogReader, ReplayError, Start, TxnPos};
use crate::decode::event::{AllColumns, Change, DbMessage};
use crate::decode::pgoutput::{parse_iso_unix_micros, PgTimestamp};
use crate::decode::value::{self, RenderOptions};
use crate::lsn::Lsn;
use crate::source::error::ErrorKind;

/// A place in the log: a commit LSN, or a commit time (Unix microseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    Lsn(Lsn),
    Time(i64),
}

impl FromStr for Position {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains('/') {
            return s.parse().map(Position::Lsn).map_err(|e| format!("{e}"));
        }
        parse_iso_unix_micros(s.trim())
            .map(Position::Time)
            .ok_or_else(|| {
                format!(
                    "invalid position {s:?}: expected an LSN (X/Y, such as 0/16B3748) or an \
                 ISO 8601 time with a zone (such as 2026-11-30T01:02:03.123456Z)"
                )
            })
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Position::Lsn(l) => write!(f, "{l}"),
            Position::Time(t) => f.write_str(&iso_micros(*t)),
        }
    }
}

/// A `--table`: `schema.table`, `schema.*`, or `table` (in `public`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableMatch {
    pub schema: String,
    /// `None`: every table of the schema.
    pub table: Option<String>,
}

impl FromStr for TableMatch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (schema, table) = s.split_once('.').unwrap_or(("public", s));
        if schema.is_empty() || table.is_empty() {
            return Err(format!(
                "invalid table {s:?}: expected schema.table, schema.* or table"
            ));
        }
        Ok(TableMatch {
            schema: schema.to_string(),
            table: (table != "*").then(|| table.to_string()),
        })
    }
}

impl TableMatch {
    fn matches(&self, c: &Change) -> bool {
        c.table.schema == self.schema && self.table.as_ref().is_none_or(|t| *t == c.table.name)
    }
}

/// What `walcast log` prints.
#[derive(Clone, Debug)]
pub struct LogQuery {
    pub dir: PathBuf,
    /// Only changes of these tables (empty: all).
    pub tables: Vec<TableMatch>,
    /// Start after this transaction (an LSN: every transaction committed after it;
    /// a time: after the transaction committed at exactly that microsecond, or
    /// from the first one committed at or after it).
    pub since: Option<Position>,
    /// Stop after the transactions committed at or before this.
    pub until: Option<Position>,
    /// Print at most this many lines.
    pub limit: Option<u64>,
    /// Also print database messages (`walcast.broadcast` and other prefixes).
    pub messages: bool,
    pub render: RenderOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum LogCmdError {
    #[error("no change log directory: pass --dir, or --config with a file that sets [log] dir")]
    NoDir,
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("no change log at {}: no such directory", .0.display())]
    Missing(PathBuf),
    /// (The source names the directory or file.)
    #[error("{source}")]
    Open {
        dir: PathBuf,
        #[source]
        source: LogError,
    },
    /// `--since` is before what the log holds.
    #[error("{0}")]
    Gap(String),
    #[error("reading the change log: {0}")]
    Read(#[source] LogError),
    #[error("change log entry of the transaction committed at {lsn}: {source}")]
    Decode {
        lsn: Lsn,
        #[source]
        source: CodecError,
    },
    #[error("cannot write to stdout: {0}")]
    Stdout(#[source] std::io::Error),
}

impl LogCmdError {
    /// Exit code class: a wrong path or argument is the operator's to fix (2); a
    /// damaged or unreadable log, or a gap, is a runtime failure (1).
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            LogCmdError::NoDir | LogCmdError::Config(_) | LogCmdError::Missing(_) => {
                Some(ErrorKind::Usage)
            }
            LogCmdError::Open {
                source: LogError::Corrupt { what, .. },
                ..
            } if what.starts_with("not a ") => Some(ErrorKind::Usage),
            LogCmdError::Stdout(_) => None,
            _ => Some(ErrorKind::Definite),
        }
    }
}

/// Prints the lines `q` asks for to `out`; returns how many. Stops early, cleanly,
/// when `stop` fires.
pub fn run(
    q: &LogQuery,
    out: &mut impl Write,
    stop: &CancellationToken,
) -> Result<u64, LogCmdError> {
    let reader = LogReader::open_read_only(&q.dir).map_err(|e| open_error(&q.dir, e))?;
    let start = match q.since {
        None => Start::AfterLsn(reader.stats().horizon.lsn),
        Some(Position::Lsn(l)) => Start::AfterLsn(l),
        Some(Position::Time(ts)) => Start::AfterTimestamp { ts, slack: 0 },
    };
    let mut cursor = reader.cursor(start).map_err(|e| match e {
        ReplayError::Gap { horizon, oldest } => gap_error(q.since, horizon, oldest),
        ReplayError::Log(e) => LogCmdError::Read(e),
    })?;
    if let Some(Position::Lsn(until)) = q.until {
        cursor = cursor.until(until);
    }
    let until_ts = match q.until {
        Some(Position::Time(t)) => Some(t),
        _ => None,
    };
    let mut printed = 0u64;
    if q.limit == Some(0) {
        return Ok(0);
    }
    let mut txn = None;
    let mut line = String::with_capacity(1024);
    loop {
        if stop.is_cancelled() {
            break;
        }
        let entry = match cursor.next_entry() {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(ReplayError::Log(e)) => return Err(LogCmdError::Read(e)),
            Err(ReplayError::Gap { horizon, oldest }) => {
                return Err(gap_error(q.since, horizon, oldest))
            }
        };
        match entry {
            Entry::Begin {
                commit_lsn,
                commit_ts,
                xid,
            } => {
                if until_ts.is_some_and(|u| commit_ts > u) {
                    break;
                }
                txn = Some(codec::txn_info(commit_lsn, commit_ts, xid));
            }
            Entry::Change(payload) => {
                let Some(info) = txn else { continue };
                let logged =
                    reader
                        .decode(&payload, info)
                        .map_err(|source| LogCmdError::Decode {
                            lsn: info.commit_lsn,
                            source,
                        })?;
                line.clear();
                match logged {
                    Logged::Change(c) => {
                        if !q.tables.is_empty() && !q.tables.iter().any(|t| t.matches(&c)) {
                            continue;
                        }
                        write_change(&mut line, &c, q.render);
                    }
                    Logged::Message(m) => {
                        if !q.messages {
                            continue;
                        }
                        write_message(&mut line, &m, info.xid.0, info.commit_time.unix_micros());
                    }
                }
                line.push('\n');
                out.write_all(line.as_bytes())
                    .map_err(LogCmdError::Stdout)?;
                printed += 1;
                if Some(printed) == q.limit {
                    break;
                }
            }
            Entry::Commit { .. } => txn = None,
        }
    }
    out.flush().map_err(LogCmdError::Stdout)?;
    Ok(printed)
}

fn open_error(dir: &Path, e: LogError) -> LogCmdError {
    match &e {
        LogError::Io { path, source }
            if path == dir && source.kind() == std::io::ErrorKind::NotFound =>
        {
            LogCmdError::Missing(dir.to_path_buf())
        }
        _ => LogCmdError::Open {
            dir: dir.to_path_buf(),
            source: e,
        },
    }
}

fn gap_error(since: Option<Position>, horizon: Horizon, oldest: Option<TxnPos>) -> LogCmdError {
    let asked = since.map_or_else(|| "the start".to_string(), |p| format!("--since {p}"));
    let held = match oldest {
        Some(o) => format!(
            "the oldest change available is the transaction committed at {} ({}); \
             the log holds every transaction committed after {}",
            o.commit_lsn,
            iso_micros(o.commit_ts),
            horizon.lsn
        ),
        None => format!(
            "the log holds no transaction yet; it keeps every transaction committed after {} ({})",
            horizon.lsn,
            iso_micros(horizon.ts)
        ),
    };
    LogCmdError::Gap(format!(
        "{asked} is older than the change log reaches (retention removed it, or the log was reset): {held}"
    ))
}

/// One change as a JSON line: the commit, the table, the rows as subscribers get them.
pub fn write_change(out: &mut String, c: &Change, render: RenderOptions) {
    write_head(
        out,
        c.txn.commit_lsn,
        c.txn.commit_time.unix_micros(),
        c.txn.xid.0,
    );
    out.push_str(",\"type\":\"");
    out.push_str(c.kind.as_str());
    out.push_str("\",\"schema\":");
    value::write_str(out, &c.table.schema);
    out.push_str(",\"table\":");
    value::write_str(out, &c.table.name);
    if let Some(r) = &c.new {
        out.push_str(",\"record\":");
        c.write_row(out, r, &AllColumns, render);
    }
    if let Some(r) = &c.old {
        out.push_str(",\"old_record\":");
        c.write_row(out, r, &AllColumns, render);
    }
    let mut toast = c.unchanged_toast().peekable();
    if toast.peek().is_some() {
        out.push_str(",\"unchanged_toast\":[");
        for (i, name) in toast.enumerate() {
            if i > 0 {
                out.push(',');
            }
            value::write_str(out, name);
        }
        out.push(']');
    }
    out.push('}');
}

/// A database message (`pg_logical_emit_message`) as a JSON line: its content as
/// JSON when it is JSON (a `walcast.broadcast` message is), else as a string.
fn write_message(out: &mut String, m: &DbMessage, xid: u32, commit_ts: i64) {
    let lsn = m.txn.map_or(m.lsn, |t| t.commit_lsn);
    write_head(out, lsn, commit_ts, xid);
    out.push_str(",\"type\":\"MESSAGE\",\"prefix\":");
    value::write_str(out, &m.prefix);
    out.push_str(",\"content\":");
    match serde_json::from_slice::<&serde_json::value::RawValue>(&m.content) {
        Ok(raw) if !raw.get().contains(['\n', '\r']) => out.push_str(raw.get()),
        Ok(raw) => match serde_json::from_str::<serde_json::Value>(raw.get()) {
            Ok(v) => out.push_str(&v.to_string()),
            Err(_) => value::write_str(out, raw.get()),
        },
        Err(_) => value::write_str(out, &String::from_utf8_lossy(&m.content)),
    }
    out.push('}');
}

fn write_head(out: &mut String, lsn: Lsn, commit_ts: i64, xid: u32) {
    use std::fmt::Write as _;
    let _ = write!(
        out,
        "{{\"commit_lsn\":\"{lsn}\",\"commit_timestamp\":\"{}\",\"xid\":{xid}",
        iso_micros(commit_ts)
    );
}

/// Unix microseconds as ISO 8601 UTC with microseconds, as `commit_timestamp` is sent.
fn iso_micros(unix_micros: i64) -> String {
    PgTimestamp::from_unix_micros(unix_micros).to_iso_micros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_tables_parse_or_say_what_is_expected() {
        assert_eq!(
            "0/16B3748".parse::<Position>().unwrap(),
            Position::Lsn(Lsn(0x16B3748))
        );
        assert!(matches!(
            "2026-11-30T01:02:03.123456Z".parse::<Position>().unwrap(),
            Position::Time(_)
        ));
        assert!("0/xyz".parse::<Position>().unwrap_err().contains("LSN"));
        assert!("noon".parse::<Position>().unwrap_err().contains("ISO 8601"));
        let t: TableMatch = "sales.orders".parse().unwrap();
        assert_eq!(
            (t.schema.as_str(), t.table.as_deref()),
            ("sales", Some("orders"))
        );
        let t: TableMatch = "sales.*".parse().unwrap();
        assert_eq!(t.table, None);
        let t: TableMatch = "orders".parse().unwrap();
        assert_eq!(
            (t.schema.as_str(), t.table.as_deref()),
            ("public", Some("orders"))
        );
        assert!(".x".parse::<TableMatch>().is_err());
        assert!("x.".parse::<TableMatch>().is_err());
    }
}
