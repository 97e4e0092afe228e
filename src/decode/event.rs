//! Change events: what walcast forwards for each committed row change, and their
//! JSON encodings.
//!
//! A [`Change`] keeps the row values as pgoutput sent them (text, zero-copy) next
//! to the table description, so filters compare typed values without parsing
//! JSON and each encoding is produced once per change and shared.
//!
//! Row semantics (DESIGN.md §5): with `REPLICA IDENTITY FULL` an UPDATE's
//! unchanged TOASTed column is filled from the old image by the assembler; without
//! it the column is [`Cell::Absent`] — left out of `record` and listed in
//! `unchanged_toast` — so clients can tell "not sent" from `null`. A key-only old
//! image (identity DEFAULT/INDEX) holds only the key columns.

use std::sync::Arc;

use bytes::Bytes;

use crate::decode::pgoutput::{PgTimestamp, Xid};
use crate::decode::relation::Table;
use crate::decode::value::{self, RenderOptions};
use crate::lsn::Lsn;

/// The transaction a change belongs to (from its `Begin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnInfo {
    /// The commit record's LSN: orders transactions, and lets clients de-duplicate.
    pub commit_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: Xid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Insert => "INSERT",
            ChangeKind::Update => "UPDATE",
            ChangeKind::Delete => "DELETE",
            ChangeKind::Truncate => "TRUNCATE",
        }
    }
}

/// One column value of a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cell {
    Null,
    /// The type's text output.
    Text(Bytes),
    /// Binary format (never requested by walcast; kept for completeness).
    Binary(Bytes),
    /// Not sent: an unchanged TOASTed value, or a non-key column of a key-only old image.
    Absent,
}

impl Cell {
    /// The text of the value, if it has one that is valid UTF-8.
    pub fn text(&self) -> Option<&str> {
        match self {
            Cell::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

pub type Row = Vec<Cell>;

/// One row change of a committed transaction.
#[derive(Debug)]
pub struct Change {
    pub txn: TxnInfo,
    pub table: Arc<Table>,
    pub kind: ChangeKind,
    /// The new row: INSERT and UPDATE.
    pub new: Option<Row>,
    /// The old row: UPDATE (when the server sent one) and DELETE.
    pub old: Option<Row>,
}

/// A message written with `pg_logical_emit_message`.
#[derive(Debug)]
pub struct DbMessage {
    /// The enclosing transaction, for transactional messages.
    pub txn: Option<TxnInfo>,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// What the replication stream hands downstream, in stream order.
#[derive(Clone, Debug)]
pub enum Item {
    /// A (re)connected stream is about to start: which database system it comes
    /// from and where the slot stands. Sent before the first transaction of each
    /// replication session, so a stage that keeps changes (the change log) knows
    /// their source.
    Stream(StreamStart),
    Begin(TxnInfo),
    Change(Arc<Change>),
    /// One TRUNCATE statement: a change per truncated table.
    Truncate(Vec<Arc<Change>>),
    Message(Arc<DbMessage>),
    /// The transaction is complete; `end_lsn` is what to confirm once it is handled.
    Commit {
        info: TxnInfo,
        end_lsn: Lsn,
    },
}

/// What a replication session reports before it streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStart {
    /// PostgreSQL's database system identifier (`IDENTIFY_SYSTEM`).
    pub system_id: String,
    pub slot: String,
    /// The slot's confirmed position: the stream resumes after it.
    pub slot_confirmed: Lsn,
}

/// Which columns an encoding includes.
pub trait ColumnSet {
    fn includes(&self, index: usize) -> bool;

    /// Includes every column (lets encoders use a table's pre-rendered text).
    fn is_all(&self) -> bool {
        false
    }
}

/// Every column.
pub struct AllColumns;

impl ColumnSet for AllColumns {
    fn includes(&self, _: usize) -> bool {
        true
    }

    fn is_all(&self) -> bool {
        true
    }
}

impl ColumnSet for [bool] {
    fn includes(&self, index: usize) -> bool {
        self.get(index).copied().unwrap_or(false)
    }
}

impl Change {
    /// Names of the columns of the new row that were not sent (unchanged TOAST).
    pub fn unchanged_toast(&self) -> impl Iterator<Item = &str> {
        self.new
            .iter()
            .flat_map(|r| r.iter().enumerate())
            .filter(|(_, c)| **c == Cell::Absent)
            .map(|(i, _)| self.table.columns[i].name.as_str())
    }

    /// Appends a row as a JSON object; absent cells are left out.
    pub fn write_row(
        &self,
        out: &mut String,
        row: &Row,
        cols: &(impl ColumnSet + ?Sized),
        opts: RenderOptions,
    ) {
        out.push('{');
        let names = &self.table.columns_json().names;
        let mut first = true;
        for (i, (cell, col)) in row.iter().zip(&self.table.columns).enumerate() {
            if *cell == Cell::Absent || !cols.includes(i) {
                continue;
            }
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&names[i]);
            out.push(':');
            match cell {
                Cell::Null | Cell::Absent => out.push_str("null"),
                Cell::Text(b) => match std::str::from_utf8(b) {
                    Ok(t) => value::write_json(out, &col.ty, t, opts),
                    Err(_) => value::write_str(out, &String::from_utf8_lossy(b)),
                },
                Cell::Binary(b) => {
                    let mut hex = String::with_capacity(2 + b.len() * 2);
                    hex.push_str("\\x");
                    for byte in b.iter() {
                        hex.push_str(&format!("{byte:02x}"));
                    }
                    value::write_str(out, &hex);
                }
            }
        }
        out.push('}');
    }

    fn write_columns(&self, out: &mut String, cols: &(impl ColumnSet + ?Sized)) {
        let json = self.table.columns_json();
        if cols.is_all() {
            out.push_str(&json.all);
            return;
        }
        out.push('[');
        let mut first = true;
        for (i, entry) in json.entries.iter().enumerate() {
            if !cols.includes(i) {
                continue;
            }
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(entry);
        }
        out.push(']');
    }

    fn write_unchanged_toast(&self, out: &mut String, cols: &(impl ColumnSet + ?Sized)) {
        out.push('[');
        let mut first = true;
        if let Some(r) = &self.new {
            for (i, c) in r.iter().enumerate() {
                if *c == Cell::Absent && cols.includes(i) {
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    value::write_str(out, &self.table.columns[i].name);
                }
            }
        }
        out.push(']');
    }

    /// The line `walcast tail` prints: one JSON object.
    pub fn to_tail_json(&self, opts: RenderOptions) -> String {
        let mut out = String::with_capacity(256);
        out.push_str("{\"lsn\":\"");
        out.push_str(&self.txn.commit_lsn.to_string());
        out.push_str("\",\"xid\":");
        out.push_str(&self.txn.xid.0.to_string());
        out.push_str(",\"commit_timestamp\":\"");
        self.txn.commit_time.write_iso_micros(&mut out);
        out.push_str("\",\"schema\":");
        value::write_str(&mut out, &self.table.schema);
        out.push_str(",\"table\":");
        value::write_str(&mut out, &self.table.name);
        out.push_str(",\"type\":\"");
        out.push_str(self.kind.as_str());
        out.push('"');
        if self.kind != ChangeKind::Truncate {
            out.push_str(",\"columns\":");
            self.write_columns(&mut out, &AllColumns);
        }
        if let Some(r) = &self.new {
            out.push_str(",\"record\":");
            self.write_row(&mut out, r, &AllColumns, opts);
        }
        if let Some(r) = &self.old {
            out.push_str(",\"old_record\":");
            self.write_row(&mut out, r, &AllColumns, opts);
        }
        if self.unchanged_toast().next().is_some() {
            out.push_str(",\"unchanged_toast\":");
            self.write_unchanged_toast(&mut out, &AllColumns);
        }
        out.push('}');
        out
    }

    /// The `data` object of a Supabase `postgres_changes` frame, limited to `cols`.
    /// An unchanged-TOAST column absent from `record` is named in `unchanged_toast`.
    /// With `hide_old`, `old_record` is `{}`: the old image is not the subscriber's to see.
    pub fn to_supabase_data(
        &self,
        out: &mut String,
        cols: &(impl ColumnSet + ?Sized),
        opts: RenderOptions,
        hide_old: bool,
    ) {
        self.to_supabase_data_as(out, cols, opts, hide_old, self.kind)
    }

    /// About how long [`Change::to_supabase_data_as`]'s text is with every
    /// column: values as sent plus a little for quoting, keys, the envelope.
    /// Rendering into a buffer this large seldom has to grow it.
    pub fn supabase_data_len_hint(&self) -> usize {
        let json = self.table.columns_json();
        let row = |r: &Option<Row>| match r {
            Some(r) => {
                json.names_len
                    + r.iter()
                        .map(|c| match c {
                            Cell::Text(b) => b.len() + b.len() / 8 + 4,
                            Cell::Binary(b) => 2 * b.len() + 6,
                            Cell::Null | Cell::Absent => 4,
                        })
                        .sum::<usize>()
            }
            None => 0,
        };
        192 + self.table.schema.len()
            + self.table.name.len()
            + json.all.len()
            + row(&self.new)
            + row(&self.old)
    }

    /// [`Change::to_supabase_data`] delivered as `kind`: an UPDATE that took a row
    /// into a subscriber's filter goes out as an INSERT of the new image (no
    /// `old_record`), one that took it out as a DELETE of the old image (no
    /// `record`). Any other `kind` is the change's own.
    pub fn to_supabase_data_as(
        &self,
        out: &mut String,
        cols: &(impl ColumnSet + ?Sized),
        opts: RenderOptions,
        hide_old: bool,
        kind: ChangeKind,
    ) {
        let moved = kind != self.kind;
        let (new, old) = match kind {
            ChangeKind::Insert if moved => (self.new.as_ref(), None),
            ChangeKind::Delete if moved => (None, self.old.as_ref()),
            _ => (self.new.as_ref(), self.old.as_ref()),
        };
        out.push_str("{\"schema\":");
        value::write_str(out, &self.table.schema);
        out.push_str(",\"table\":");
        value::write_str(out, &self.table.name);
        out.push_str(",\"commit_timestamp\":\"");
        self.txn.commit_time.write_iso_micros(out);
        out.push_str("\",\"commit_lsn\":\"");
        self.txn.commit_lsn.push_to(out);
        out.push_str("\",\"type\":\"");
        out.push_str(kind.as_str());
        out.push_str("\",\"columns\":");
        self.write_columns(out, cols);
        if let Some(r) = new {
            out.push_str(",\"record\":");
            self.write_row(out, r, cols, opts);
        }
        if let Some(r) = old {
            out.push_str(",\"old_record\":");
            if hide_old {
                out.push_str("{}");
            } else {
                self.write_row(out, r, cols, opts);
            }
        }
        if new.is_some() && self.unchanged_toast().next().is_some() {
            out.push_str(",\"unchanged_toast\":");
            self.write_unchanged_toast(out, cols);
        }
        out.push_str(",\"errors\":null}");
    }
}
