//! The transaction assembler: decoded pgoutput messages → [`Item`]s.
//!
//! [`Assembler`] enforces transaction framing over the stream: every row change
//! and transactional message sits between `Begin` and `Commit`, the `Commit`'s
//! LSN equals the `Begin`'s final LSN, and a row names a known relation with the
//! right number of columns. A violation is a definite error.

use std::collections::HashMap;
use std::sync::Arc;

use crate::decode::event::{Cell, Change, ChangeKind, DbMessage, Item, Row, TxnInfo};
use crate::decode::pgoutput::{self, Message, OldTuple, RelId, ReplicaIdentity, TupleValue};
use crate::decode::relation::{Column, Table, TypeCatalog};
use crate::lsn::Lsn;

/// Why the message stream broke transaction framing or referenced an unknown relation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FramingError {
    #[error("{what} outside a transaction")]
    OutsideTransaction { what: &'static str },
    #[error("Begin inside transaction {xid}")]
    NestedBegin { xid: u32 },
    #[error("Commit LSN {commit} does not match the Begin's final LSN {begin}")]
    CommitLsnMismatch { begin: Lsn, commit: Lsn },
    #[error("row change for relation {0} before its Relation message")]
    UnknownRelation(u32),
    #[error("row for {table} has {got} columns, its Relation message has {want}")]
    ColumnCount {
        table: String,
        got: usize,
        want: usize,
    },
}

/// Turns decoded messages into [`Item`]s, enforcing framing (see the module docs).
#[derive(Default)]
pub struct Assembler {
    relations: HashMap<RelId, Arc<Table>>,
    txn: Option<TxnInfo>,
}

impl Assembler {
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// Forgets the open transaction (after a reconnect the server resends it whole).
    pub fn reset_transaction(&mut self) {
        self.txn = None;
    }

    /// Applies one message. `types` must already know the OIDs a `Relation` names.
    pub fn apply(
        &mut self,
        msg: Message,
        types: &mut TypeCatalog,
    ) -> Result<Option<Item>, FramingError> {
        Ok(match msg {
            Message::Begin(b) => {
                if let Some(t) = &self.txn {
                    return Err(FramingError::NestedBegin { xid: t.xid.0 });
                }
                let info = TxnInfo {
                    commit_lsn: b.final_lsn,
                    commit_time: b.commit_time,
                    xid: b.xid,
                };
                self.txn = Some(info);
                Some(Item::Begin(info))
            }
            Message::Commit(c) => {
                let info = self
                    .txn
                    .take()
                    .ok_or(FramingError::OutsideTransaction { what: "Commit" })?;
                if info.commit_lsn != c.commit_lsn {
                    return Err(FramingError::CommitLsnMismatch {
                        begin: info.commit_lsn,
                        commit: c.commit_lsn,
                    });
                }
                Some(Item::Commit {
                    info,
                    end_lsn: c.end_lsn,
                })
            }
            Message::Origin(_) => None,
            Message::Type(t) => {
                types.invalidate(t.id);
                None
            }
            Message::Relation(r) => {
                let columns = r
                    .columns
                    .iter()
                    .map(|c| Column {
                        name: c.name.clone(),
                        ty: types.get(c.type_oid),
                        key: c.key,
                    })
                    .collect();
                let schema = if r.namespace.is_empty() {
                    "pg_catalog".to_string()
                } else {
                    r.namespace
                };
                self.relations.insert(
                    r.id,
                    Arc::new(Table {
                        id: r.id,
                        schema,
                        name: r.name,
                        replica_identity: r.replica_identity,
                        json: Default::default(),
                        columns,
                    }),
                );
                None
            }
            Message::Insert(i) => {
                let txn = self.txn("Insert")?;
                let table = self.table(i.relation)?;
                let new = row(&table, i.new)?;
                Some(change(txn, table, ChangeKind::Insert, Some(new), None))
            }
            Message::Update(u) => {
                let txn = self.txn("Update")?;
                let table = self.table(u.relation)?;
                let mut new = row(&table, u.new)?;
                let old = match u.old {
                    Some(o) => Some(old_row(&table, o)?),
                    // The key did not change: the old key equals the new one.
                    None => Some(
                        new.iter()
                            .zip(&table.columns)
                            .map(|(c, col)| if col.key { c.clone() } else { Cell::Absent })
                            .collect(),
                    ),
                };
                // Unchanged TOAST: fill from the full old image when there is one.
                if let Some(old) = &old {
                    if table.replica_identity == ReplicaIdentity::Full {
                        for (n, o) in new.iter_mut().zip(old.iter()) {
                            if *n == Cell::Absent && *o != Cell::Absent {
                                *n = o.clone();
                            }
                        }
                    }
                }
                Some(change(txn, table, ChangeKind::Update, Some(new), old))
            }
            Message::Delete(d) => {
                let txn = self.txn("Delete")?;
                let table = self.table(d.relation)?;
                let old = old_row(&table, d.old)?;
                Some(change(txn, table, ChangeKind::Delete, None, Some(old)))
            }
            Message::Truncate(t) => {
                let txn = self.txn("Truncate")?;
                let mut tables = Vec::with_capacity(t.relations.len());
                for id in t.relations {
                    tables.push(self.table(id)?);
                }
                Some(Item::Truncate(
                    tables
                        .into_iter()
                        .map(|table| change(txn, table, ChangeKind::Truncate, None, None))
                        .filter_map(|i| match i {
                            Item::Change(c) => Some(c),
                            _ => None,
                        })
                        .collect(),
                ))
            }
            Message::Message(m) => {
                let txn = if m.transactional {
                    Some(self.txn("transactional Message")?)
                } else {
                    None
                };
                Some(Item::Message(Arc::new(DbMessage {
                    txn,
                    lsn: m.lsn,
                    prefix: m.prefix,
                    content: m.content,
                })))
            }
        })
    }

    fn txn(&self, what: &'static str) -> Result<TxnInfo, FramingError> {
        self.txn.ok_or(FramingError::OutsideTransaction { what })
    }

    fn table(&self, id: RelId) -> Result<Arc<Table>, FramingError> {
        self.relations
            .get(&id)
            .cloned()
            .ok_or(FramingError::UnknownRelation(id.0))
    }
}

fn change(
    txn: TxnInfo,
    table: Arc<Table>,
    kind: ChangeKind,
    new: Option<Row>,
    old: Option<Row>,
) -> Item {
    Item::Change(Arc::new(Change {
        txn,
        table,
        kind,
        new,
        old,
    }))
}

fn cell(v: TupleValue) -> Cell {
    match v {
        TupleValue::Null => Cell::Null,
        TupleValue::UnchangedToast => Cell::Absent,
        TupleValue::Text(b) => Cell::Text(b),
        TupleValue::Binary(b) => Cell::Binary(b),
    }
}

fn row(table: &Table, values: pgoutput::TupleData) -> Result<Row, FramingError> {
    if values.len() != table.columns.len() {
        return Err(FramingError::ColumnCount {
            table: format!("{}.{}", table.schema, table.name),
            got: values.len(),
            want: table.columns.len(),
        });
    }
    Ok(values.into_iter().map(cell).collect())
}

/// A key-only old tuple has NULL in every non-key column: those are absent, not null.
fn old_row(table: &Table, old: OldTuple) -> Result<Row, FramingError> {
    match old {
        OldTuple::Full(t) => row(table, t),
        OldTuple::Key(t) => {
            let mut r = row(table, t)?;
            for (c, col) in r.iter_mut().zip(&table.columns) {
                if !col.key {
                    *c = Cell::Absent;
                }
            }
            Ok(r)
        }
    }
}
