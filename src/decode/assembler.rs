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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::pgoutput::{
        Begin, Commit, Delete, Insert, LogicalMessage, Oid, PgTimestamp, Relation, RelationColumn,
        Truncate, Update, Xid,
    };
    use bytes::Bytes;

    const TEXT: Oid = Oid(25);

    fn begin(final_lsn: u64, xid: u32) -> Message {
        Message::Begin(Begin {
            final_lsn: Lsn(final_lsn),
            commit_time: PgTimestamp(1),
            xid: Xid(xid),
        })
    }

    fn commit(commit_lsn: u64, end_lsn: u64) -> Message {
        Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(commit_lsn),
            end_lsn: Lsn(end_lsn),
            commit_time: PgTimestamp(1),
        })
    }

    /// A relation `public.t<id>` with a key column `id` and a column `body`.
    fn relation(id: u32, identity: ReplicaIdentity) -> Message {
        Message::Relation(Relation {
            id: RelId(id),
            namespace: "public".into(),
            name: format!("t{id}"),
            replica_identity: identity,
            columns: vec![
                RelationColumn {
                    key: true,
                    name: "id".into(),
                    type_oid: TEXT,
                    type_modifier: -1,
                },
                RelationColumn {
                    key: false,
                    name: "body".into(),
                    type_oid: TEXT,
                    type_modifier: -1,
                },
            ],
        })
    }

    fn text(s: &'static str) -> TupleValue {
        TupleValue::Text(Bytes::from_static(s.as_bytes()))
    }

    fn cell(s: &'static str) -> Cell {
        Cell::Text(Bytes::from_static(s.as_bytes()))
    }

    fn insert(rel: u32, values: Vec<TupleValue>) -> Message {
        Message::Insert(Insert {
            relation: RelId(rel),
            new: values,
        })
    }

    /// An assembler that knows relation 1 (identity DEFAULT) and 2 (FULL).
    fn assembler() -> (Assembler, TypeCatalog) {
        let mut a = Assembler::default();
        let mut types = TypeCatalog::default();
        assert!(matches!(
            a.apply(relation(1, ReplicaIdentity::Default), &mut types),
            Ok(None)
        ));
        assert!(matches!(
            a.apply(relation(2, ReplicaIdentity::Full), &mut types),
            Ok(None)
        ));
        (a, types)
    }

    fn change(item: Option<Item>) -> Arc<Change> {
        match item {
            Some(Item::Change(c)) => c,
            other => panic!("not a change: {other:?}"),
        }
    }

    #[test]
    fn a_transaction_frames_its_changes() {
        let (mut a, mut t) = assembler();
        assert!(matches!(
            a.apply(begin(100, 7), &mut t),
            Ok(Some(Item::Begin(_)))
        ));
        assert!(a.in_transaction());
        let c = change(
            a.apply(insert(1, vec![text("1"), text("a")]), &mut t)
                .unwrap(),
        );
        assert_eq!(c.kind, ChangeKind::Insert);
        assert_eq!(c.txn.commit_lsn, Lsn(100));
        assert_eq!(c.txn.xid, Xid(7));
        assert_eq!(c.new, Some(vec![cell("1"), cell("a")]));
        assert_eq!(c.table.schema, "public");
        let Ok(Some(Item::Commit { info, end_lsn })) = a.apply(commit(100, 108), &mut t) else {
            panic!("no commit");
        };
        assert_eq!((info.commit_lsn, end_lsn), (Lsn(100), Lsn(108)));
        assert!(!a.in_transaction());
    }

    #[test]
    fn nested_begin_is_an_error() {
        let (mut a, mut t) = assembler();
        a.apply(begin(100, 7), &mut t).unwrap();
        assert_eq!(
            a.apply(begin(200, 8), &mut t).unwrap_err(),
            FramingError::NestedBegin { xid: 7 }
        );
    }

    #[test]
    fn commit_lsn_mismatch_is_an_error() {
        let (mut a, mut t) = assembler();
        a.apply(begin(100, 7), &mut t).unwrap();
        assert_eq!(
            a.apply(commit(101, 108), &mut t).unwrap_err(),
            FramingError::CommitLsnMismatch {
                begin: Lsn(100),
                commit: Lsn(101)
            }
        );
    }

    #[test]
    fn commit_outside_a_transaction_is_an_error() {
        let (mut a, mut t) = assembler();
        assert_eq!(
            a.apply(commit(100, 108), &mut t).unwrap_err(),
            FramingError::OutsideTransaction { what: "Commit" }
        );
    }

    #[test]
    fn row_changes_outside_a_transaction_are_errors() {
        let (mut a, mut t) = assembler();
        let outside = [
            (insert(1, vec![text("1"), text("a")]), "Insert"),
            (
                Message::Update(Update {
                    relation: RelId(1),
                    old: None,
                    new: vec![text("1"), text("a")],
                }),
                "Update",
            ),
            (
                Message::Delete(Delete {
                    relation: RelId(1),
                    old: OldTuple::Key(vec![text("1"), TupleValue::Null]),
                }),
                "Delete",
            ),
            (
                Message::Truncate(Truncate {
                    cascade: false,
                    restart_identity: false,
                    relations: vec![RelId(1)],
                }),
                "Truncate",
            ),
            (
                Message::Message(LogicalMessage {
                    transactional: true,
                    lsn: Lsn(5),
                    prefix: "p".into(),
                    content: Bytes::new(),
                }),
                "transactional Message",
            ),
        ];
        for (m, what) in outside {
            assert_eq!(
                a.apply(m, &mut t).unwrap_err(),
                FramingError::OutsideTransaction { what }
            );
        }
    }

    #[test]
    fn unknown_relation_is_an_error() {
        let (mut a, mut t) = assembler();
        a.apply(begin(100, 7), &mut t).unwrap();
        assert_eq!(
            a.apply(insert(99, vec![text("1")]), &mut t).unwrap_err(),
            FramingError::UnknownRelation(99)
        );
        // A truncate naming one unknown relation among known ones fails whole.
        let m = Message::Truncate(Truncate {
            cascade: false,
            restart_identity: false,
            relations: vec![RelId(1), RelId(99)],
        });
        assert_eq!(
            a.apply(m, &mut t).unwrap_err(),
            FramingError::UnknownRelation(99)
        );
    }

    #[test]
    fn column_count_mismatch_is_an_error() {
        let (mut a, mut t) = assembler();
        a.apply(begin(100, 7), &mut t).unwrap();
        assert_eq!(
            a.apply(insert(1, vec![text("1")]), &mut t).unwrap_err(),
            FramingError::ColumnCount {
                table: "public.t1".into(),
                got: 1,
                want: 2
            }
        );
        let m = Message::Delete(Delete {
            relation: RelId(1),
            old: OldTuple::Full(vec![text("1"), text("a"), text("extra")]),
        });
        assert!(matches!(
            a.apply(m, &mut t).unwrap_err(),
            FramingError::ColumnCount {
                got: 3,
                want: 2,
                ..
            }
        ));
    }

    #[test]
    fn key_only_old_tuple_marks_non_key_columns_absent() {
        let (mut a, mut t) = assembler();
        a.apply(begin(100, 7), &mut t).unwrap();
        let m = Message::Delete(Delete {
            relation: RelId(1),
            old: OldTuple::Key(vec![text("1"), TupleValue::Null]),
        });
        let c = change(a.apply(m, &mut t).unwrap());
        assert_eq!(c.kind, ChangeKind::Delete);
        assert_eq!(c.old, Some(vec![cell("1"), Cell::Absent]));
        assert_eq!(c.new, None);
        // An update without an old tuple: the old key is the new one.
        let m = Message::Update(Update {
            relation: RelId(1),
            old: None,
            new: vec![text("1"), text("b")],
        });
        let c = change(a.apply(m, &mut t).unwrap());
        assert_eq!(c.old, Some(vec![cell("1"), Cell::Absent]));
    }

    #[test]
    fn unchanged_toast_is_filled_from_a_full_old_image() {
        let (mut a, mut t) = assembler();
        a.apply(begin(100, 7), &mut t).unwrap();
        let update = |rel| {
            Message::Update(Update {
                relation: RelId(rel),
                old: Some(OldTuple::Full(vec![text("1"), text("big")])),
                new: vec![text("1"), TupleValue::UnchangedToast],
            })
        };
        // REPLICA IDENTITY FULL: the old image has the value.
        let c = change(a.apply(update(2), &mut t).unwrap());
        assert_eq!(c.new, Some(vec![cell("1"), cell("big")]));
        assert_eq!(c.old, Some(vec![cell("1"), cell("big")]));
        // Without FULL identity nothing is filled in: the value stays absent.
        let c = change(a.apply(update(1), &mut t).unwrap());
        assert_eq!(c.new, Some(vec![cell("1"), Cell::Absent]));
        // A NULL in the new row is a value, not a gap to fill.
        let m = Message::Update(Update {
            relation: RelId(2),
            old: Some(OldTuple::Full(vec![text("1"), text("big")])),
            new: vec![text("1"), TupleValue::Null],
        });
        let c = change(a.apply(m, &mut t).unwrap());
        assert_eq!(c.new, Some(vec![cell("1"), Cell::Null]));
    }

    #[test]
    fn truncate_of_several_relations_is_one_item() {
        let (mut a, mut t) = assembler();
        a.apply(begin(100, 7), &mut t).unwrap();
        let m = Message::Truncate(Truncate {
            cascade: true,
            restart_identity: false,
            relations: vec![RelId(2), RelId(1)],
        });
        let Ok(Some(Item::Truncate(changes))) = a.apply(m, &mut t) else {
            panic!("not a truncate");
        };
        let names: Vec<_> = changes.iter().map(|c| c.table.name.as_str()).collect();
        assert_eq!(names, ["t2", "t1"]);
        for c in &changes {
            assert_eq!(c.kind, ChangeKind::Truncate);
            assert_eq!(c.txn.commit_lsn, Lsn(100));
            assert!(c.new.is_none() && c.old.is_none());
        }
    }

    #[test]
    fn non_transactional_message_outside_a_transaction_is_fine() {
        let (mut a, mut t) = assembler();
        let m = Message::Message(LogicalMessage {
            transactional: false,
            lsn: Lsn(42),
            prefix: "walcast".into(),
            content: Bytes::from_static(b"hi"),
        });
        let Ok(Some(Item::Message(msg))) = a.apply(m, &mut t) else {
            panic!("not a message");
        };
        assert!(msg.txn.is_none());
        assert_eq!((msg.lsn, msg.prefix.as_str()), (Lsn(42), "walcast"));
        assert_eq!(&msg.content[..], b"hi");
        assert!(!a.in_transaction());
        // Inside a transaction a transactional one carries it.
        a.apply(begin(100, 7), &mut t).unwrap();
        let m = Message::Message(LogicalMessage {
            transactional: true,
            lsn: Lsn(43),
            prefix: "p".into(),
            content: Bytes::new(),
        });
        let Ok(Some(Item::Message(msg))) = a.apply(m, &mut t) else {
            panic!("not a message");
        };
        assert_eq!(msg.txn.map(|t| t.xid), Some(Xid(7)));
    }

    #[test]
    fn reset_forgets_the_open_transaction() {
        let (mut a, mut t) = assembler();
        a.apply(begin(100, 7), &mut t).unwrap();
        a.reset_transaction();
        assert!(!a.in_transaction());
        assert!(matches!(
            a.apply(begin(100, 7), &mut t),
            Ok(Some(Item::Begin(_)))
        ));
    }

    #[test]
    fn pg_catalog_relation_gets_its_schema_name() {
        let mut a = Assembler::default();
        let mut t = TypeCatalog::default();
        let Message::Relation(mut r) = relation(3, ReplicaIdentity::Default) else {
            unreachable!()
        };
        r.namespace = String::new();
        a.apply(Message::Relation(r), &mut t).unwrap();
        a.apply(begin(100, 7), &mut t).unwrap();
        let c = change(
            a.apply(insert(3, vec![text("1"), text("a")]), &mut t)
                .unwrap(),
        );
        assert_eq!(c.table.schema, "pg_catalog");
    }
}
