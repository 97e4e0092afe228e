//! How a change is stored in the log: its row images as pgoutput sent them (text
//! values, zero-copy on the way back), next to the id of its table's shape, so a
//! replay filters and encodes exactly as the live path does without re-decoding
//! pgoutput or asking the catalog what the table looked like then.
//!
//! ```text
//! change:  1u8  table_id u32  kind u8 (I U D T)  flags u8 (1 old, 2 new)  [old row] [new row]
//! message: 2u8  lsn u64  transactional u8  prefix (u16 len, bytes)  content (rest)
//! row:     n u16, then per cell: 0 null | 1 text (u32 len, bytes) | 2 binary (…) | 3 absent
//! ```
//!
//! A table shape (schema, name, replica identity, columns with their types, the
//! types' own structure for arrays and composites) is encoded once by
//! [`encode_table`] and stored in the log's table file under a small id; two
//! changes of a table whose columns did not change share the id.

use std::sync::Arc;

use bytes::Bytes;

use crate::decode::event::{Cell, Change, ChangeKind, DbMessage, Row, TxnInfo};
use crate::decode::pgoutput::{Oid, PgTimestamp, RelId, ReplicaIdentity, Xid};
use crate::decode::relation::{Column, Table};
use crate::decode::value::{PgType, TypeKind};
use crate::lsn::Lsn;

const TAG_CHANGE: u8 = 1;
const TAG_MESSAGE: u8 = 2;

/// Nesting of array/composite types deeper than this is corruption.
const MAX_TYPE_DEPTH: usize = 32;

/// A stored entry that does not decode: the log is damaged or from a newer walcast.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("change log entry: {0}")]
pub struct CodecError(pub &'static str);

/// One logged item, decoded.
#[derive(Debug)]
pub enum Logged {
    Change(Change),
    Message(DbMessage),
}

/// The transaction of a logged entry, from its `Begin`.
pub fn txn_info(commit_lsn: Lsn, commit_ts_unix: i64, xid: u32) -> TxnInfo {
    TxnInfo {
        commit_lsn,
        commit_time: PgTimestamp::from_unix_micros(commit_ts_unix),
        xid: Xid(xid),
    }
}

pub fn encode_change(out: &mut Vec<u8>, table_id: u32, c: &Change) {
    out.push(TAG_CHANGE);
    out.extend_from_slice(&table_id.to_le_bytes());
    out.push(match c.kind {
        ChangeKind::Insert => b'I',
        ChangeKind::Update => b'U',
        ChangeKind::Delete => b'D',
        ChangeKind::Truncate => b'T',
    });
    out.push(u8::from(c.old.is_some()) | (u8::from(c.new.is_some()) << 1));
    for row in [&c.old, &c.new].into_iter().flatten() {
        put_row(out, row);
    }
}

pub fn encode_message(out: &mut Vec<u8>, m: &DbMessage) {
    out.push(TAG_MESSAGE);
    out.extend_from_slice(&m.lsn.0.to_le_bytes());
    out.push(u8::from(m.txn.is_some()));
    put_str(out, &m.prefix);
    out.extend_from_slice(&m.content);
}

/// Whether a stored entry is a logical decoding message (not a row change).
pub fn is_message(payload: &[u8]) -> bool {
    payload.first() == Some(&TAG_MESSAGE)
}

/// Decodes an entry of the transaction `txn`; `table` resolves a table id.
pub fn decode(
    payload: &Bytes,
    txn: TxnInfo,
    table: impl FnOnce(u32) -> Option<Arc<Table>>,
) -> Result<Logged, CodecError> {
    let mut r = Reader { b: payload, at: 0 };
    match r.u8()? {
        TAG_CHANGE => {
            let id = r.u32()?;
            let kind = match r.u8()? {
                b'I' => ChangeKind::Insert,
                b'U' => ChangeKind::Update,
                b'D' => ChangeKind::Delete,
                b'T' => ChangeKind::Truncate,
                _ => return Err(CodecError("unknown change kind")),
            };
            let flags = r.u8()?;
            let old = if flags & 1 != 0 { Some(r.row()?) } else { None };
            let new = if flags & 2 != 0 { Some(r.row()?) } else { None };
            r.end()?;
            let table = table(id).ok_or(CodecError("unknown table id"))?;
            for row in [&old, &new].into_iter().flatten() {
                if row.len() != table.columns.len() {
                    return Err(CodecError("row and table disagree on the column count"));
                }
            }
            Ok(Logged::Change(Change {
                txn,
                table,
                kind,
                new,
                old,
            }))
        }
        TAG_MESSAGE => {
            let lsn = Lsn(r.u64()?);
            let transactional = r.u8()? != 0;
            let prefix = r.string()?;
            let content = payload.slice(r.at..);
            Ok(Logged::Message(DbMessage {
                txn: transactional.then_some(txn),
                lsn,
                prefix,
                content,
            }))
        }
        _ => Err(CodecError("unknown entry tag")),
    }
}

/// The shape of a table, for the log's table file.
pub fn encode_table(t: &Table) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + 32 * t.columns.len());
    out.extend_from_slice(&t.id.0.to_le_bytes());
    put_str(&mut out, &t.schema);
    put_str(&mut out, &t.name);
    out.push(match t.replica_identity {
        ReplicaIdentity::Default => b'd',
        ReplicaIdentity::Nothing => b'n',
        ReplicaIdentity::Full => b'f',
        ReplicaIdentity::Index => b'i',
    });
    out.extend_from_slice(&(t.columns.len() as u16).to_le_bytes());
    for c in &t.columns {
        put_str(&mut out, &c.name);
        out.push(u8::from(c.key));
        put_type(&mut out, &c.ty);
    }
    out
}

pub fn decode_table(b: &[u8]) -> Result<Table, CodecError> {
    let bytes = Bytes::copy_from_slice(b);
    let mut r = Reader { b: &bytes, at: 0 };
    let id = RelId(r.u32()?);
    let schema = r.string()?;
    let name = r.string()?;
    let replica_identity = match r.u8()? {
        b'd' => ReplicaIdentity::Default,
        b'n' => ReplicaIdentity::Nothing,
        b'f' => ReplicaIdentity::Full,
        b'i' => ReplicaIdentity::Index,
        _ => return Err(CodecError("unknown replica identity")),
    };
    let n = r.u16()?;
    let mut columns = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let name = r.string()?;
        let key = r.u8()? != 0;
        let ty = r.ty(0)?;
        columns.push(Column { name, ty, key });
    }
    r.end()?;
    Ok(Table {
        id,
        schema,
        name,
        replica_identity,
        columns,
        json: Default::default(),
    })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

fn put_type(out: &mut Vec<u8>, t: &PgType) {
    out.extend_from_slice(&t.oid.0.to_le_bytes());
    put_str(out, &t.name);
    match &t.kind {
        TypeKind::Bool => out.push(1),
        TypeKind::Int => out.push(2),
        TypeKind::Int8 => out.push(3),
        TypeKind::Float => out.push(4),
        TypeKind::Numeric => out.push(5),
        TypeKind::Json => out.push(6),
        TypeKind::Jsonb => out.push(7),
        TypeKind::Date => out.push(8),
        TypeKind::Timestamp => out.push(9),
        TypeKind::TimestampTz => out.push(10),
        TypeKind::Text => out.push(11),
        TypeKind::Array { element, delimiter } => {
            out.push(12);
            out.push(*delimiter);
            put_type(out, element);
        }
        TypeKind::Composite { fields } => {
            out.push(13);
            out.extend_from_slice(&(fields.len() as u16).to_le_bytes());
            for (name, ty) in fields {
                put_str(out, name);
                put_type(out, ty);
            }
        }
    }
}

fn put_row(out: &mut Vec<u8>, row: &Row) {
    out.extend_from_slice(&(row.len() as u16).to_le_bytes());
    for cell in row {
        match cell {
            Cell::Null => out.push(0),
            Cell::Text(b) | Cell::Binary(b) => {
                out.push(if matches!(cell, Cell::Text(_)) { 1 } else { 2 });
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
            Cell::Absent => out.push(3),
        }
    }
}

/// A bounds-checked cursor; values are slices of the payload.
struct Reader<'a> {
    b: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<Bytes, CodecError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or(CodecError("entry cut short"))?;
        let s = self.b.slice(self.at..end);
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        Ok(self.take(N)?[..].try_into().expect("N bytes"))
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, CodecError> {
        let n = usize::from(self.u16()?);
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| CodecError("name is not UTF-8"))
    }

    fn row(&mut self) -> Result<Row, CodecError> {
        let n = usize::from(self.u16()?);
        let mut row = Vec::with_capacity(n);
        for _ in 0..n {
            row.push(match self.u8()? {
                0 => Cell::Null,
                t @ (1 | 2) => {
                    let len = self.u32()? as usize;
                    let b = self.take(len)?;
                    if t == 1 {
                        Cell::Text(b)
                    } else {
                        Cell::Binary(b)
                    }
                }
                3 => Cell::Absent,
                _ => return Err(CodecError("unknown cell tag")),
            });
        }
        Ok(row)
    }

    fn ty(&mut self, depth: usize) -> Result<Arc<PgType>, CodecError> {
        if depth > MAX_TYPE_DEPTH {
            return Err(CodecError("type nested too deep"));
        }
        let oid = Oid(self.u32()?);
        let name = self.string()?;
        let kind = match self.u8()? {
            1 => TypeKind::Bool,
            2 => TypeKind::Int,
            3 => TypeKind::Int8,
            4 => TypeKind::Float,
            5 => TypeKind::Numeric,
            6 => TypeKind::Json,
            7 => TypeKind::Jsonb,
            8 => TypeKind::Date,
            9 => TypeKind::Timestamp,
            10 => TypeKind::TimestampTz,
            11 => TypeKind::Text,
            12 => {
                let delimiter = self.u8()?;
                TypeKind::Array {
                    element: self.ty(depth + 1)?,
                    delimiter,
                }
            }
            13 => {
                let n = self.u16()?;
                let mut fields = Vec::with_capacity(usize::from(n));
                for _ in 0..n {
                    let name = self.string()?;
                    fields.push((name, self.ty(depth + 1)?));
                }
                TypeKind::Composite { fields }
            }
            _ => return Err(CodecError("unknown type kind")),
        };
        Ok(Arc::new(PgType { oid, name, kind }))
    }

    fn end(&self) -> Result<(), CodecError> {
        if self.at == self.b.len() {
            Ok(())
        } else {
            Err(CodecError("trailing bytes"))
        }
    }
}

/// One change's payload on its own (tests, tools).
pub fn change_bytes(table_id: u32, c: &Change) -> Bytes {
    let mut out = Vec::with_capacity(64);
    encode_change(&mut out, table_id, c);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let int4 = Arc::new(PgType::new(23, "int4", TypeKind::Int));
        let text = Arc::new(PgType::new(25, "text", TypeKind::Text));
        let arr = Arc::new(PgType::new(
            1007,
            "_int4",
            TypeKind::Array {
                element: int4.clone(),
                delimiter: b',',
            },
        ));
        let comp = Arc::new(PgType::new(
            90_000,
            "money_pair",
            TypeKind::Composite {
                fields: vec![("a".into(), int4.clone()), ("b".into(), arr.clone())],
            },
        ));
        Table {
            id: RelId(16_384),
            schema: "public".into(),
            name: "orders".into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![
                Column {
                    name: "id".into(),
                    ty: int4,
                    key: true,
                },
                Column {
                    name: "note".into(),
                    ty: text,
                    key: false,
                },
                Column {
                    name: "tags".into(),
                    ty: arr,
                    key: false,
                },
                Column {
                    name: "pair".into(),
                    ty: comp,
                    key: false,
                },
            ],
            json: Default::default(),
        }
    }

    fn text(s: &str) -> Cell {
        Cell::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn tables_and_changes_round_trip() {
        let t = table();
        let back = decode_table(&encode_table(&t)).unwrap();
        assert_eq!(back, t);
        let t = Arc::new(t);
        let txn = txn_info(Lsn(0x1_0000_0010), 1_700_000_000_123_456, 77);
        assert_eq!(txn.commit_time.unix_micros(), 1_700_000_000_123_456);
        let c = Change {
            txn,
            table: t.clone(),
            kind: ChangeKind::Update,
            old: Some(vec![text("1"), Cell::Null, Cell::Absent, text("(1,{2})")]),
            new: Some(vec![text("1"), text("é\"\n"), text("{1,2}"), Cell::Null]),
        };
        let b = change_bytes(3, &c);
        let Logged::Change(d) = decode(&b, txn, |id| (id == 3).then(|| t.clone())).unwrap() else {
            panic!("not a change")
        };
        assert_eq!(
            (d.kind, &d.old, &d.new, d.txn),
            (c.kind, &c.old, &c.new, c.txn)
        );
        assert!(Arc::ptr_eq(&d.table, &t));

        let m = DbMessage {
            txn: Some(txn),
            lsn: Lsn(99),
            prefix: "realtime:room".into(),
            content: Bytes::from_static(b"{\"x\":1}"),
        };
        let mut out = Vec::new();
        encode_message(&mut out, &m);
        let Logged::Message(d) = decode(&Bytes::from(out), txn, |_| None).unwrap() else {
            panic!("not a message")
        };
        assert_eq!(
            (d.txn, d.lsn, &d.prefix, &d.content),
            (m.txn, m.lsn, &m.prefix, &m.content)
        );
    }

    #[test]
    fn damaged_entries_are_errors_never_panics() {
        let t = Arc::new(table());
        let txn = txn_info(Lsn(1), 0, 1);
        let c = Change {
            txn,
            table: t.clone(),
            kind: ChangeKind::Insert,
            old: None,
            new: Some(vec![text("1"), text("x"), Cell::Null, Cell::Null]),
        };
        let b = change_bytes(0, &c);
        for cut in 0..b.len() {
            assert!(
                decode(&b.slice(..cut), txn, |_| Some(t.clone())).is_err(),
                "cut {cut}"
            );
        }
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut v = b.to_vec();
                v[i] ^= 1 << bit;
                let _ = decode(&Bytes::from(v), txn, |_| Some(t.clone()));
            }
        }
        let tb = encode_table(&t);
        for cut in 0..tb.len() {
            assert!(decode_table(&tb[..cut]).is_err(), "cut {cut}");
        }
        // A row for another shape of the table is refused.
        let mut short = c;
        short.new = Some(vec![text("1")]);
        let b = change_bytes(0, &short);
        assert_eq!(
            decode(&b, txn, |_| Some(t.clone())).unwrap_err(),
            CodecError("row and table disagree on the column count")
        );
    }
}
