//! One JetStream message per run of changes: how the relay writes it and a
//! gateway reads it back. Pure: no IO.
//!
//! Each entry is the change log's record ([`crate::changelog::codec`]): the row
//! images as pgoutput sent them, so a gateway filters and encodes exactly what an
//! embedded log would have stored, without re-decoding pgoutput. Around them
//! (version 2):
//!
//! ```text
//! 'W' 2u8  flags u8 (1 last of its transaction, 2 transactional, 4 source)
//! key_lsn u64  pos u32  end_lsn u64  commit_ts i64  xid u32
//! system_id (u16 len, bytes)  slot (u16 len, bytes)
//! table (u32 len, bytes: codec::encode_table; 0 for messages)
//! count u32, then count × (u32 len, entry: codec::encode_change with table
//!   id 0, or codec::encode_message)
//! ```
//!
//! One message holds consecutive entries of one transaction and one table (or
//! consecutive logical decoding messages), at most [`BATCH_ENTRIES`] of them and
//! [`BATCH_BYTES`] of entries (one larger entry travels alone): entry `i` is at
//! position `pos + i`. Where a message
//! ends depends only on the transaction's content, so a relay that publishes a
//! transaction again (a standby taking over, a reconnect) cuts it into the same
//! messages with the same ids. Per message, JetStream's own cost (storage,
//! acknowledgement, de-duplication) is paid once per run rather than once per
//! change. Version 1 (one entry per message, no count: the entry is the rest)
//! is still read, so a stream written by an older relay stays readable.
//!
//! A relay that starts streaming first announces its source (flags 4 and 1, no
//! table, no entry; `key_lsn` the slot's confirmed position), so a gateway opens its
//! change log before the first change arrives.
//!
//! `key_lsn` is the commit LSN of the enclosing transaction (a non-transactional
//! message: its own LSN) and `pos` the first entry's place in it; together they
//! order every message and make its `Nats-Msg-Id` ([`Key::msg_id`]), so a change
//! published twice is stored once.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes};

use crate::changelog::codec::{self, CodecError, Logged};
use crate::decode::event::{Change, DbMessage, TxnInfo};
use crate::decode::pgoutput::{PgTimestamp, Xid};
use crate::decode::relation::Table;
use crate::lsn::Lsn;

const MAGIC: u8 = b'W';
const VERSION: u8 = 2;
/// One entry per message, before runs of entries were batched.
const VERSION_1: u8 = 1;
const LAST: u8 = 1;
const TRANSACTIONAL: u8 = 2;
const SOURCE: u8 = 4;

/// Most entries in one message.
pub const BATCH_ENTRIES: u32 = 256;
/// Most bytes of entries in a message that holds more than one (an entry
/// larger than this travels alone, as every change did in version 1).
pub const BATCH_BYTES: usize = 64 * 1024;

/// Where `end_lsn` sits in a message (after magic, version, flags, key).
const END_LSN_AT: usize = 3 + 8 + 4;

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
    /// A relay's announcement of its source (no entries).
    pub announcement: bool,
    /// The entries, at positions `key.pos`, `key.pos + 1`, …
    pub entries: Vec<Logged>,
}

/// A message being filled with consecutive entries of one transaction (and
/// one table, or only logical decoding messages).
pub struct Batch {
    out: Vec<u8>,
    count_at: usize,
    count: u32,
    key: Key,
}

impl Batch {
    /// Starts the message whose first entry is at `key`; `table`: the
    /// encoded table of its changes (`codec::encode_table`), empty for messages.
    pub fn start(source: &Source, key: Key, txn: Option<&TxnInfo>, table: &[u8]) -> Batch {
        let mut out = Vec::with_capacity(512 + table.len());
        head(&mut out, source, key, txn);
        out.put_u32_le(table.len() as u32);
        out.extend_from_slice(table);
        let count_at = out.len();
        out.put_u32_le(0);
        Batch {
            out,
            count_at,
            count: 0,
            key,
        }
    }

    /// The key of its first entry.
    pub fn key(&self) -> Key {
        self.key
    }

    /// Whether the entry limit leaves room for one more.
    pub fn has_room(&self) -> bool {
        self.count < BATCH_ENTRIES
    }

    /// Adds `c`, unless it would take the entries past [`BATCH_BYTES`] in a
    /// message that has some already (false: nothing added). Only the entries
    /// count, not the head, so where a message ends depends on the changes alone.
    pub fn push_change(&mut self, c: &Change) -> bool {
        self.push(|out| codec::encode_change(out, 0, c))
    }

    /// [`Batch::push_change`] for a logical decoding message.
    pub fn push_message(&mut self, m: &DbMessage) -> bool {
        self.push(|out| codec::encode_message(out, m))
    }

    fn push(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> bool {
        let at = self.out.len();
        self.out.put_u32_le(0);
        encode(&mut self.out);
        if self.count > 0 && self.out.len() - self.count_at - 4 > BATCH_BYTES {
            self.out.truncate(at);
            return false;
        }
        let len = (self.out.len() - at - 4) as u32;
        self.out[at..at + 4].copy_from_slice(&len.to_le_bytes());
        self.count += 1;
        true
    }

    /// The message; `last`: the transaction's end LSN when its last entry is in it.
    pub fn finish(mut self, last: Option<Lsn>) -> Bytes {
        if let Some(end) = last {
            self.out[2] |= LAST;
            self.out[END_LSN_AT..END_LSN_AT + 8].copy_from_slice(&end.0.to_le_bytes());
        }
        self.out[self.count_at..self.count_at + 4].copy_from_slice(&self.count.to_le_bytes());
        self.out.into()
    }
}

/// The message of the change `c` alone, entry `pos` of its transaction.
#[cfg(test)]
pub fn encode_change(source: &Source, c: &Change, pos: u32, last: Option<Lsn>) -> Bytes {
    let key = Key {
        lsn: c.txn.commit_lsn,
        pos,
    };
    let mut b = Batch::start(source, key, Some(&c.txn), &codec::encode_table(&c.table));
    b.push_change(c);
    b.finish(last)
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
    );
    out[2] |= SOURCE | LAST;
    out.put_u32_le(0);
    out.put_u32_le(0);
    out.into()
}

/// The message of the non-transactional logical decoding message `m`.
pub fn encode_message(source: &Source, m: &DbMessage) -> Bytes {
    let mut b = Batch::start(source, Key { lsn: m.lsn, pos: 0 }, None, &[]);
    b.push_message(m);
    b.finish(None)
}

/// The head; flags `LAST` and `end_lsn` are set by [`Batch::finish`] (a
/// non-transactional message is always its own last entry).
fn head(out: &mut Vec<u8>, source: &Source, key: Key, txn: Option<&TxnInfo>) {
    out.push(MAGIC);
    out.push(VERSION);
    let mut flags = 0;
    if txn.is_none() {
        flags |= LAST;
    }
    if txn.is_some() {
        flags |= TRANSACTIONAL;
    }
    out.push(flags);
    out.put_u64_le(key.lsn.0);
    out.put_u32_le(key.pos);
    out.put_u64_le(0);
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
    if r.u8()? != MAGIC {
        return Err(CodecError("not a walcast cluster message"));
    }
    let version = r.u8()?;
    if version != VERSION && version != VERSION_1 {
        return Err(CodecError(
            "a walcast cluster message of a version this walcast cannot read",
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
    let announcement = flags & SOURCE != 0;
    let mut entries = Vec::new();
    if announcement {
        if version != VERSION_1 && (r.u32()? != 0 || r.at != payload.len()) {
            return Err(CodecError("a source announcement with entries"));
        }
    } else if version == VERSION_1 {
        entries.push(codec::decode(&payload.slice(r.at..), txn, |_| table)?);
    } else {
        let count = r.u32()?;
        let fits = key.pos.checked_add(count.saturating_sub(1)).is_some();
        if count == 0 || count > BATCH_ENTRIES || !fits {
            return Err(CodecError("cluster message with a wrong entry count"));
        }
        entries.reserve(count as usize);
        for _ in 0..count {
            let n = r.u32()? as usize;
            let start = r.at;
            r.take(n)?;
            let t = table.clone();
            entries.push(codec::decode(&payload.slice(start..start + n), txn, |_| t)?);
        }
        if r.at != payload.len() {
            return Err(CodecError("cluster message with bytes after its entries"));
        }
    }
    Ok(Envelope {
        key,
        last: flags & LAST != 0,
        txn: transactional.then_some(txn),
        end_lsn,
        source,
        announcement,
        entries,
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
        let [Logged::Change(back)] = &a.entries[..] else {
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
        let e = decode(&encode_message(&source, &m), &mut tables).unwrap();
        assert!(e.last && e.txn.is_none());
        assert_eq!(e.key.msg_id(false), "m2000");
        assert!(matches!(&e.entries[..], [Logged::Message(d)] if d.prefix == "walcast"));
        let s = decode(&encode_source(&source, Lsn(5)), &mut tables).unwrap();
        assert!(s.announcement && s.entries.is_empty());
        assert!(s.source == source && s.key.lsn == Lsn(5));
    }

    fn change(pos_value: &'static [u8]) -> Change {
        Change {
            txn: TxnInfo {
                commit_lsn: Lsn(0x3000),
                commit_time: PgTimestamp::from_unix_micros(1_700_000_000_000_000),
                xid: Xid(11),
            },
            table: table(),
            kind: ChangeKind::Insert,
            new: Some(vec![Cell::Text(Bytes::from_static(pos_value))]),
            old: None,
        }
    }

    #[test]
    fn a_run_of_changes_travels_as_one_message_in_order() {
        let source = Source::default();
        let values: [&'static [u8]; 3] = [b"1", b"2", b"3"];
        let key = Key {
            lsn: Lsn(0x3000),
            pos: 4,
        };
        let first = change(values[0]);
        let mut b = Batch::start(
            &source,
            key,
            Some(&first.txn),
            &codec::encode_table(&first.table),
        );
        for v in values {
            assert!(b.has_room());
            b.push_change(&change(v));
        }
        let m = decode(&b.finish(Some(Lsn(0x3100))), &mut Tables::default()).unwrap();
        assert_eq!(m.key, key);
        assert!(m.last && !m.announcement);
        assert_eq!(m.end_lsn, Lsn(0x3100));
        let got: Vec<_> = m
            .entries
            .iter()
            .map(|e| match e {
                Logged::Change(c) => c.new.clone().unwrap(),
                Logged::Message(_) => panic!("a change"),
            })
            .collect();
        let want: Vec<_> = values
            .iter()
            .map(|v| vec![Cell::Text(Bytes::from_static(v))])
            .collect();
        assert_eq!(got, want);
        // A message stops taking entries at its caps.
        let mut b = Batch::start(&source, key, Some(&first.txn), &[]);
        for _ in 0..BATCH_ENTRIES {
            assert!(b.has_room());
            assert!(b.push_change(&first));
        }
        assert!(!b.has_room());
        // Bytes: an entry that would take a message with entries past the cap
        // stays out (and the message is left as it was); alone it goes in.
        static BIG: [u8; BATCH_BYTES] = [b'x'; BATCH_BYTES];
        let big = change(&BIG);
        let t = codec::encode_table(&first.table);
        let mut b = Batch::start(&source, key, Some(&first.txn), &t);
        assert!(b.push_change(&first));
        assert!(!b.push_change(&big));
        let m = decode(&b.finish(None), &mut Tables::default()).unwrap();
        assert_eq!(m.entries.len(), 1);
        let mut b = Batch::start(&source, key, Some(&first.txn), &[]);
        assert!(b.push_change(&big));
        assert!(!b.push_change(&first));
    }

    #[test]
    fn a_message_of_the_first_version_is_still_read() {
        // Version 1: no entry count, the entry is the rest of the message.
        let c = change(b"7");
        let v2 = encode_change(&Source::default(), &c, 2, None);
        let table_len = codec::encode_table(&c.table).len();
        let at = END_LSN_AT + 8 + 8 + 4 + 2 + 2 + 4 + table_len;
        let mut v1 = v2[..at].to_vec();
        v1[1] = VERSION_1;
        v1.extend_from_slice(&v2[at + 8..]);
        let m = decode(&Bytes::from(v1), &mut Tables::default()).unwrap();
        assert_eq!(m.key.pos, 2);
        assert!(matches!(&m.entries[..], [Logged::Change(b)] if b.new == c.new));
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
            &[b'W', 9, 0],
        ] {
            assert!(decode(&Bytes::copy_from_slice(b), &mut tables).is_err());
        }
        // A count that the bytes cannot hold, a message cut inside an entry.
        let good = encode_change(&Source::default(), &change(b"1"), 0, None);
        let mut big = good.to_vec();
        let count_at = END_LSN_AT + 8 + 8 + 4 + 2 + 2 + 4 + codec::encode_table(&table()).len();
        big[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&Bytes::from(big), &mut tables).is_err());
        for cut in 1..good.len() {
            assert!(
                decode(&good.slice(..cut), &mut tables).is_err(),
                "cut at {cut}"
            );
        }
        // More entries than a message holds; positions past u32::MAX.
        let mut many = good.to_vec();
        many[count_at..count_at + 4].copy_from_slice(&(BATCH_ENTRIES + 1).to_le_bytes());
        assert!(decode(&Bytes::from(many), &mut tables).is_err());
        let mut b = Batch::start(
            &Source::default(),
            Key {
                lsn: Lsn(1),
                pos: u32::MAX,
            },
            Some(&change(b"1").txn),
            &codec::encode_table(&table()),
        );
        b.push_change(&change(b"1"));
        b.push_change(&change(b"2"));
        assert!(decode(&b.finish(None), &mut tables).is_err());
        // An announcement with something after it.
        let mut a = encode_source(&Source::default(), Lsn(5)).to_vec();
        a.push(0);
        assert!(decode(&Bytes::from(a), &mut tables).is_err());
    }

    #[test]
    fn subjects_escape_what_a_token_cannot_hold() {
        assert_eq!(table_subject("w", "public", "items"), "w.public.items");
        assert_eq!(table_subject("w", "a b", "x.y*"), "w.a%20b.x%2Ey%2A");
    }
}
