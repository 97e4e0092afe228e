//! One JetStream message per change: how the relay writes it and a gateway reads
//! it back. Pure: no IO.
//!
//! The entry itself is the change log's record ([`crate::changelog::codec`]): the
//! row images as pgoutput sent them, so a gateway filters and encodes exactly what
//! an embedded log would have stored, without re-decoding pgoutput. Around it:
//!
//! ```text
//! 'W' 1u8  flags u8 (1 last of its transaction, 2 transactional)
//! key_lsn u64  pos u32  end_lsn u64  commit_ts i64  xid u32
//! system_id (u16 len, bytes)  slot (u16 len, bytes)
//! table (u32 len, bytes: codec::encode_table; 0 for a message)
//! entry (the rest: codec::encode_change with table id 0, or codec::encode_message)
//! ```
//!
//! A relay that starts streaming first announces its source (flags 4, no table,
//! no entry; `key_lsn` the slot's confirmed position), so a gateway opens its
//! change log before the first change arrives.
//!
//! `key_lsn` is the commit LSN of the enclosing transaction (a non-transactional
//! message: its own LSN) and `pos` the entry's place in it; together they order
//! every message and make its `Nats-Msg-Id` ([`Envelope::msg_id`]), so a change
//! published twice (a standby taking over, a reconnect) is stored once.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes};

use crate::changelog::codec::{self, CodecError, Logged};
use crate::decode::event::{Change, DbMessage, TxnInfo};
use crate::decode::pgoutput::{PgTimestamp, Xid};
use crate::decode::relation::Table;
use crate::lsn::Lsn;

const MAGIC: u8 = b'W';
const VERSION: u8 = 1;
const LAST: u8 = 1;
const TRANSACTIONAL: u8 = 2;
const SOURCE: u8 = 4;

/// Where a message stands in the stream of changes: later keys are later changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Key {
    pub lsn: Lsn,
    pub pos: u32,
}

impl Key {
    /// The `Nats-Msg-Id` of the message at this key.
    pub fn msg_id(&self, transactional: bool) -> String {
        if transactional {
            format!("{:X}/{}", self.lsn.0, self.pos)
        } else {
            format!("m{:X}", self.lsn.0)
        }
    }
}

/// What identifies the source of the changes (the change log's identity).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub system_id: String,
    pub slot: String,
}

/// One message, decoded.
#[derive(Debug)]
pub struct Envelope {
    pub key: Key,
    /// The last entry of its transaction (a gateway ends the transaction after it).
    pub last: bool,
    /// The transaction (None: a non-transactional message).
    pub txn: Option<TxnInfo>,
    /// The transaction's end LSN, on its last entry.
    pub end_lsn: Lsn,
    pub source: Source,
    /// None: the announcement of a relay's source.
    pub entry: Option<Logged>,
}

/// The message of the change `c`, entry `pos` of its transaction.
pub fn encode_change(source: &Source, c: &Change, pos: u32, last: Option<Lsn>) -> Bytes {
    encode_change_with(source, c, &codec::encode_table(&c.table), pos, last)
}

/// [`encode_change`] with the table already encoded (`codec::encode_table` of
/// `c.table`): the relay encodes each table once, not once per change.
pub fn encode_change_with(
    source: &Source,
    c: &Change,
    table: &[u8],
    pos: u32,
    last: Option<Lsn>,
) -> Bytes {
    // Sized once: the head, the table, and each cell's bytes and length.
    let rows: usize = [&c.old, &c.new]
        .into_iter()
        .flatten()
        .flat_map(|r| r.iter())
        .map(|cell| match cell {
            crate::decode::event::Cell::Text(b) | crate::decode::event::Cell::Binary(b) => {
                b.len() + 5
            }
            _ => 1,
        })
        .sum();
    let mut out = Vec::with_capacity(
        64 + source.system_id.len() + source.slot.len() + table.len() + rows + 16,
    );
    let key = Key {
        lsn: c.txn.commit_lsn,
        pos,
    };
    head(&mut out, source, key, Some(&c.txn), last);
    out.put_u32_le(table.len() as u32);
    out.extend_from_slice(table);
    codec::encode_change(&mut out, 0, c);
    out.into()
}

/// The announcement of a relay starting to stream `source` after `confirmed`.
pub fn encode_source(source: &Source, confirmed: Lsn) -> Bytes {
    let mut out = Vec::with_capacity(64);
    head(
        &mut out,
        source,
        Key {
            lsn: confirmed,
            pos: 0,
        },
        None,
        None,
    );
    out[2] |= SOURCE;
    out.put_u32_le(0);
    out.into()
}

/// The message of the logical decoding message `m` (entry `pos` of its
/// transaction when it is transactional).
pub fn encode_message(source: &Source, m: &DbMessage, pos: u32, last: Option<Lsn>) -> Bytes {
    let mut out = Vec::with_capacity(64 + m.content.len());
    let key = match &m.txn {
        Some(t) => Key {
            lsn: t.commit_lsn,
            pos,
        },
        None => Key { lsn: m.lsn, pos: 0 },
    };
    head(&mut out, source, key, m.txn.as_ref(), last);
    out.put_u32_le(0);
    codec::encode_message(&mut out, m);
    out.into()
}

fn head(out: &mut Vec<u8>, source: &Source, key: Key, txn: Option<&TxnInfo>, last: Option<Lsn>) {
    out.push(MAGIC);
    out.push(VERSION);
    let mut flags = 0;
    if last.is_some() || txn.is_none() {
        flags |= LAST;
    }
    if txn.is_some() {
        flags |= TRANSACTIONAL;
    }
    out.push(flags);
    out.put_u64_le(key.lsn.0);
    out.put_u32_le(key.pos);
    out.put_u64_le(last.unwrap_or(Lsn::ZERO).0);
    out.put_i64_le(txn.map_or(0, |t| t.commit_time.unix_micros()));
    out.put_u32_le(txn.map_or(0, |t| t.xid.0));
    put_str(out, &source.system_id);
    put_str(out, &source.slot);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.put_u16_le(b.len() as u16);
    out.extend_from_slice(b);
}

/// Table shapes seen, so every change of a table shares one `Arc<Table>` (as the
/// live path's relation cache does). Bounded: emptied when it grows past
/// [`Tables::MAX`] shapes.
#[derive(Default)]
pub struct Tables {
    by_bytes: HashMap<Vec<u8>, Arc<Table>>,
}

impl Tables {
    pub const MAX: usize = 4096;

    fn get(&mut self, b: &[u8]) -> Result<Arc<Table>, CodecError> {
        if let Some(t) = self.by_bytes.get(b) {
            return Ok(t.clone());
        }
        let t = Arc::new(codec::decode_table(b)?);
        if self.by_bytes.len() >= Self::MAX {
            self.by_bytes.clear();
        }
        self.by_bytes.insert(b.to_vec(), t.clone());
        Ok(t)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], CodecError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or(CodecError("cluster message cut short"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn string(&mut self) -> Result<String, CodecError> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| CodecError("not UTF-8"))
    }
}

/// Decodes a message; `tables` keeps the table shapes seen.
pub fn decode(payload: &Bytes, tables: &mut Tables) -> Result<Envelope, CodecError> {
    let mut r = Reader { b: payload, at: 0 };
    if r.u8()? != MAGIC || r.u8()? != VERSION {
        return Err(CodecError(
            "not a walcast cluster message (or from another version)",
        ));
    }
    let flags = r.u8()?;
    let key = Key {
        lsn: Lsn(r.u64()?),
        pos: r.u32()?,
    };
    let end_lsn = Lsn(r.u64()?);
    let ts = r.u64()? as i64;
    let xid = r.u32()?;
    let source = Source {
        system_id: r.string()?,
        slot: r.string()?,
    };
    let table_len = r.u32()? as usize;
    let table = if table_len > 0 {
        Some(tables.get(r.take(table_len)?)?)
    } else {
        None
    };
    let transactional = flags & TRANSACTIONAL != 0;
    let txn = TxnInfo {
        commit_lsn: key.lsn,
        commit_time: PgTimestamp::from_unix_micros(ts),
        xid: Xid(xid),
    };
    let entry = if flags & SOURCE != 0 {
        None
    } else {
        Some(codec::decode(&payload.slice(r.at..), txn, |_| table)?)
    };
    Ok(Envelope {
        key,
        last: flags & LAST != 0,
        txn: transactional.then_some(txn),
        end_lsn,
        source,
        entry,
    })
}

/// The subject of a change of `schema.table`: `<prefix>.<schema>.<table>`, each
/// name with bytes that cannot stand in a subject token (`.`, `*`, `>`, `%`,
/// whitespace, control and non-ASCII bytes) written `%XX`.
pub fn table_subject(prefix: &str, schema: &str, table: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + schema.len() + table.len() + 2);
    s.push_str(prefix);
    for name in [schema, table] {
        s.push('.');
        if name.is_empty() {
            s.push_str("%00");
        }
        for b in name.bytes() {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                s.push(b as char);
            } else {
                s.push_str(&format!("%{b:02X}"));
            }
        }
    }
    s
}

/// The subject of a relay's source announcements.
pub fn source_subject(prefix: &str) -> String {
    format!("{prefix}._src")
}

/// The subject of logical decoding messages.
pub fn message_subject(prefix: &str) -> String {
    format!("{prefix}._msg")
}

/// The subject of the gateways' `what` traffic (`broadcast`, `presence`): core
/// NATS, never stored. Outside `<prefix>.>` on purpose: the stream takes every
/// message published under that, and a stored peer message would both reach
/// the gateways' readers as an unreadable change and break the relay's chain
/// of `Nats-Expected-Last-Msg-Id`.
pub fn peer_subject(prefix: &str, what: &str) -> String {
    format!("{}.{prefix}.{what}", crate::config::PEER_ROOT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::event::{Cell, ChangeKind};

    fn table() -> Arc<Table> {
        use crate::decode::pgoutput::{RelId, ReplicaIdentity};
        use crate::decode::relation::Column;
        use crate::decode::value::{PgType, TypeKind};
        Arc::new(Table {
            id: RelId(42),
            schema: "public".into(),
            name: "my.items".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![Column {
                name: "id".into(),
                ty: Arc::new(PgType::new(23, "int4", TypeKind::Int)),
                key: true,
            }],
            json: Default::default(),
        })
    }

    #[test]
    fn a_change_and_a_message_come_back_as_they_were_sent() {
        let source = Source {
            system_id: "7".into(),
            slot: "s".into(),
        };
        let txn = TxnInfo {
            commit_lsn: Lsn(0x1000),
            commit_time: PgTimestamp::from_unix_micros(1_700_000_000_123_456),
            xid: Xid(9),
        };
        let c = Change {
            txn,
            table: table(),
            kind: ChangeKind::Insert,
            new: Some(vec![Cell::Text(Bytes::from_static(b"5"))]),
            old: None,
        };
        let mut tables = Tables::default();
        let a = decode(&encode_change(&source, &c, 3, None), &mut tables).unwrap();
        assert_eq!(
            a.key,
            Key {
                lsn: Lsn(0x1000),
                pos: 3
            }
        );
        assert!(!a.last);
        assert_eq!(a.source, source);
        assert_eq!(a.txn.unwrap().commit_time, txn.commit_time);
        let Some(Logged::Change(back)) = a.entry else {
            panic!("a change")
        };
        assert_eq!(back.new, c.new);
        assert_eq!(back.table.name, "my.items");
        let b = decode(
            &encode_change(&source, &c, 4, Some(Lsn(0x1010))),
            &mut tables,
        )
        .unwrap();
        assert!(b.last);
        assert_eq!(b.end_lsn, Lsn(0x1010));
        let m = DbMessage {
            txn: None,
            lsn: Lsn(0x2000),
            prefix: "walcast".into(),
            content: Bytes::from_static(b"{}"),
        };
        let e = decode(&encode_message(&source, &m, 0, None), &mut tables).unwrap();
        assert!(e.last && e.txn.is_none());
        assert_eq!(e.key.msg_id(false), "m2000");
        assert!(matches!(e.entry, Some(Logged::Message(ref d)) if d.prefix == "walcast"));
        let s = decode(&encode_source(&source, Lsn(5)), &mut tables).unwrap();
        assert!(s.entry.is_none() && s.source == source && s.key.lsn == Lsn(5));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut tables = Tables::default();
        for b in [
            &b""[..],
            b"W",
            b"W\x01\x03",
            b"X\x01",
            &[b'W', 1, 0, 1, 2, 3],
        ] {
            assert!(decode(&Bytes::copy_from_slice(b), &mut tables).is_err());
        }
    }

    #[test]
    fn subjects_escape_what_a_token_cannot_hold() {
        assert_eq!(table_subject("w", "public", "items"), "w.public.items");
        assert_eq!(table_subject("w", "a b", "x.y*"), "w.a%20b.x%2Ey%2A");
    }
}
