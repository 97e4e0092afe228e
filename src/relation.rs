//! The relation and type caches, and the transaction assembler that turns decoded
//! pgoutput messages into change events.
//!
//! pgoutput identifies tables by OID in row messages and sends a `Relation`
//! message (and `Type` messages for non-built-in types) before the first change
//! of a table in each session and after every schema change. Row messages carry
//! no names or types, so walcast keeps the latest `Relation` per OID and resolves
//! column type OIDs to [`PgType`]s through the ordinary SQL connection
//! ([`TypeCatalog`]), once per type, again after a `Type` message.
//!
//! [`Assembler`] enforces transaction framing over the stream: every row change
//! and transactional message sits between `Begin` and `Commit`, the `Commit`'s
//! LSN equals the `Begin`'s final LSN, and a row names a known relation with the
//! right number of columns. A violation is a definite error.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::event::{Cell, Change, ChangeKind, DbMessage, Item, Row, TxnInfo};
use crate::lsn::Lsn;
use crate::pgoutput::Oid;
use crate::pgoutput::{self, Message, OldTuple, RelId, ReplicaIdentity, TupleValue};
use crate::value::{PgType, TypeKind};

/// A published table as the stream last described it.
#[derive(Debug, PartialEq)]
pub struct Table {
    pub id: RelId,
    pub schema: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
    /// JSON text of the columns, made on first use (`Default::default()` to build).
    pub json: ColumnsJson,
}

/// JSON text derived from a table's columns, made once on first use and shared
/// by every change of the table, so encoding a change does not re-escape names.
/// A cache, not part of the table's identity: it compares equal always.
#[derive(Debug, Default)]
pub struct ColumnsJson(std::sync::OnceLock<RenderedColumns>);

#[derive(Debug)]
pub struct RenderedColumns {
    /// Each column's name as a JSON string (quoted and escaped).
    pub names: Vec<Box<str>>,
    /// Each column's `{"name":…,"type":…}` entry of the Supabase `columns` array.
    pub entries: Vec<Box<str>>,
    /// The whole `columns` array.
    pub all: Box<str>,
}

impl PartialEq for ColumnsJson {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

#[derive(Debug, PartialEq)]
pub struct Column {
    pub name: String,
    pub ty: Arc<PgType>,
    /// Part of the replica identity.
    pub key: bool,
}

impl Table {
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// The columns' JSON text, rendered on first use.
    pub fn columns_json(&self) -> &RenderedColumns {
        self.json.0.get_or_init(|| {
            let quoted = |s: &str| {
                let mut out = String::with_capacity(s.len() + 2);
                crate::value::write_str(&mut out, s);
                out
            };
            let names: Vec<Box<str>> = self
                .columns
                .iter()
                .map(|c| quoted(&c.name).into())
                .collect();
            let entries: Vec<Box<str>> = self
                .columns
                .iter()
                .zip(&names)
                .map(|(c, n)| format!("{{\"name\":{n},\"type\":{}}}", quoted(&c.ty.name)).into())
                .collect();
            let all = format!("[{}]", entries.join(",")).into();
            RenderedColumns {
                names,
                entries,
                all,
            }
        })
    }
}

/// A `pg_type` row as loaded from the catalog.
#[derive(Clone, Debug)]
struct RawType {
    name: String,
    typtype: u8,
    element: u32,
    /// A true array type (`typelem` set and variable length: `_int4`, `int2vector`).
    array: bool,
    base: u32,
    delimiter: u8,
    /// Fields of a composite type: (name, type OID).
    fields: Vec<(String, u32)>,
}

/// Type OID → [`PgType`], loaded from `pg_type` on demand and cached.
#[derive(Default)]
pub struct TypeCatalog {
    raw: HashMap<u32, RawType>,
    built: HashMap<u32, Arc<PgType>>,
}

impl TypeCatalog {
    /// Makes sure every OID in `oids` (and what they depend on) is known.
    pub async fn ensure(
        &mut self,
        client: &tokio_postgres::Client,
        oids: impl IntoIterator<Item = Oid>,
    ) -> Result<(), tokio_postgres::Error> {
        let mut missing: Vec<u32> = oids
            .into_iter()
            .map(|o| o.0)
            .filter(|o| !self.raw.contains_key(o))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut rounds = 0;
        while !missing.is_empty() && rounds < 16 {
            rounds += 1;
            let oid_list: Vec<i64> = missing.iter().map(|&o| i64::from(o)).collect();
            let rows = client
                .query(
                    "select t.oid::int8, t.typname::text, t.typtype::text, t.typelem::int8, \
                            t.typbasetype::int8, t.typdelim::text, t.typrelid::int8, \
                            (t.typelem <> 0 and t.typlen = -1) \
                     from pg_catalog.pg_type t where t.oid::int8 = any($1)",
                    &[&oid_list],
                )
                .await?;
            let mut next = Vec::new();
            for row in rows {
                let oid = row.get::<_, i64>(0) as u32;
                let typtype = row.get::<_, String>(2).bytes().next().unwrap_or(b'b');
                let relid = row.get::<_, i64>(6);
                let mut fields = Vec::new();
                if typtype == b'c' && relid != 0 {
                    for a in client
                        .query(
                            "select attname::text, atttypid::int8 from pg_catalog.pg_attribute \
                             where attrelid = $1::int8::oid and attnum > 0 and not attisdropped \
                             order by attnum",
                            &[&relid],
                        )
                        .await?
                    {
                        fields.push((a.get::<_, String>(0), a.get::<_, i64>(1) as u32));
                    }
                }
                let raw = RawType {
                    name: row.get(1),
                    typtype,
                    element: row.get::<_, i64>(3) as u32,
                    array: row.get(7),
                    base: row.get::<_, i64>(4) as u32,
                    delimiter: row.get::<_, String>(5).bytes().next().unwrap_or(b','),
                    fields,
                };
                for dep in [raw.element, raw.base]
                    .into_iter()
                    .chain(raw.fields.iter().map(|f| f.1))
                {
                    if dep != 0 && !self.raw.contains_key(&dep) {
                        next.push(dep);
                    }
                }
                self.raw.insert(oid, raw);
            }
            // OIDs the catalog does not know stay missing; they render as text.
            for o in &missing {
                self.raw.entry(*o).or_insert_with(|| RawType {
                    name: format!("oid{o}"),
                    typtype: b'b',
                    element: 0,
                    array: false,
                    base: 0,
                    delimiter: b',',
                    fields: Vec::new(),
                });
            }
            next.sort_unstable();
            next.dedup();
            missing = next;
        }
        Ok(())
    }

    /// Forgets a type (after a `Type` message) so it is loaded again.
    pub fn invalidate(&mut self, oid: Oid) {
        self.raw.remove(&oid.0);
        self.built.clear();
    }

    /// The type for an OID; unknown OIDs render as text.
    pub fn get(&mut self, oid: Oid) -> Arc<PgType> {
        self.build(oid.0, 0)
    }

    fn build(&mut self, oid: u32, depth: usize) -> Arc<PgType> {
        if let Some(t) = self.built.get(&oid) {
            return t.clone();
        }
        let Some(raw) = self.raw.get(&oid).cloned() else {
            return Arc::new(PgType::new(oid, &format!("oid{oid}"), TypeKind::Text));
        };
        let kind = if depth > 8 {
            TypeKind::Text
        } else if raw.typtype == b'd' && raw.base != 0 {
            // A domain renders as its base type but keeps its own name.
            self.build(raw.base, depth + 1).kind.clone()
        } else if raw.array && raw.element != 0 {
            TypeKind::Array {
                element: self.build(raw.element, depth + 1),
                // `int2vector` and `oidvector` print their elements space-separated
                // without braces; `to_jsonb` still makes them arrays.
                delimiter: if matches!(raw.name.as_str(), "int2vector" | "oidvector") {
                    b' '
                } else {
                    raw.delimiter
                },
            }
        } else if raw.typtype == b'c' {
            TypeKind::Composite {
                fields: raw
                    .fields
                    .iter()
                    .map(|(n, t)| (n.clone(), self.build(*t, depth + 1)))
                    .collect(),
            }
        } else if raw.typtype == b'b' {
            PgType::kind_for_base_name(&raw.name)
        } else {
            TypeKind::Text
        };
        let t = Arc::new(PgType {
            oid: Oid(oid),
            name: raw.name.clone(),
            kind,
        });
        self.built.insert(oid, t.clone());
        t
    }
}

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

    fn raw(name: &str, typtype: u8, element: u32, array: bool, base: u32) -> RawType {
        RawType {
            name: name.into(),
            typtype,
            element,
            array,
            base,
            delimiter: b',',
            fields: Vec::new(),
        }
    }

    #[test]
    fn kinds_follow_base_types_and_true_arrays() {
        let mut cat = TypeCatalog::default();
        cat.raw.insert(23, raw("int4", b'b', 0, false, 0));
        cat.raw.insert(1007, raw("_int4", b'b', 23, true, 0));
        cat.raw.insert(21, raw("int2", b'b', 0, false, 0));
        cat.raw.insert(22, raw("int2vector", b'b', 21, true, 0));
        // `point` has an element type but is not an array.
        cat.raw.insert(701, raw("float8", b'b', 0, false, 0));
        cat.raw.insert(600, raw("point", b'b', 701, false, 0));
        // A domain over int4[], a domain over int4 and an array of that domain.
        cat.raw.insert(9001, raw("dintarr", b'd', 0, false, 1007));
        cat.raw.insert(9002, raw("dint", b'd', 0, false, 23));
        cat.raw.insert(9003, raw("_dint", b'b', 9002, true, 0));
        cat.raw.insert(9004, raw("mood", b'e', 0, false, 0));
        let mut comp = raw("pair", b'c', 0, false, 0);
        comp.fields = vec![("a".into(), 9001), ("m".into(), 9004)];
        cat.raw.insert(9005, comp);

        let int_array = |k: &TypeKind, delim: u8| {
            matches!(k, TypeKind::Array { element, delimiter }
                if element.kind == TypeKind::Int && *delimiter == delim)
        };
        assert!(int_array(&cat.get(Oid(9001)).kind, b','));
        assert_eq!(cat.get(Oid(9001)).name, "dintarr");
        assert!(int_array(&cat.get(Oid(9003)).kind, b','));
        assert!(int_array(&cat.get(Oid(22)).kind, b' '));
        assert_eq!(cat.get(Oid(600)).kind, TypeKind::Text);
        assert_eq!(cat.get(Oid(9004)).kind, TypeKind::Text);
        match &cat.get(Oid(9005)).kind {
            TypeKind::Composite { fields } => {
                assert!(int_array(&fields[0].1.kind, b','));
                assert_eq!(fields[1].1.kind, TypeKind::Text);
            }
            other => panic!("{other:?}"),
        }
        // Unknown OIDs render as text.
        assert_eq!(cat.get(Oid(424242)).kind, TypeKind::Text);
    }
}
