//! Decoder for the `pgoutput` logical replication message format, protocol version 1.
//!
//! Implements "Logical Replication Message Formats" of the PostgreSQL documentation
//! (chapter 55.9 in PostgreSQL 15). The payload of every `XLogData` message the
//! walsender sends on a slot using the `pgoutput` plugin is one of the messages
//! below; [`decode`] turns its bytes into a [`Message`].
//!
//! Invariants:
//! - [`decode`] is pure (no I/O, no global state) and total: it never panics, on
//!   any input. Every read is bounds-checked, negative counts and lengths are
//!   rejected before anything is allocated, counts are checked against the bytes
//!   left, unknown tags are a typed error (never skipped), and bytes left over
//!   after a complete message are an error.
//! - Column values are zero-copy slices of the input [`Bytes`].
//! - Transaction framing (no row change outside `Begin`..`Commit`, matching commit
//!   LSN) is not a property of one message; [`crate::decode::assembler::Assembler`]
//!   enforces it over the stream.

mod reader;

use std::fmt::Write as _;

use bytes::Bytes;

use crate::lsn::Lsn;
use reader::Reader;

/// A PostgreSQL object identifier (`oid`), such as a type's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Oid(pub u32);

/// The OID of a relation, as pgoutput identifies tables in row messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelId(pub u32);

/// A transaction id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Xid(pub u32);

/// A timestamp as PostgreSQL sends it on the wire: microseconds since 2000-01-01 00:00:00 UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

/// Seconds between the Unix epoch and the PostgreSQL epoch (2000-01-01).
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

impl PgTimestamp {
    /// The time `unix_micros` microseconds after the Unix epoch.
    pub fn from_unix_micros(unix_micros: i64) -> Self {
        PgTimestamp(unix_micros.saturating_sub(PG_EPOCH_UNIX_SECS * 1_000_000))
    }

    /// Microseconds since the Unix epoch.
    pub fn unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_UNIX_SECS * 1_000_000)
    }

    /// The time as ISO 8601 UTC with microseconds, `2024-01-02T03:04:05.678901Z`:
    /// the `commit_timestamp` walcast sends. Supabase sends milliseconds; the
    /// extra digits let a timestamp walcast sent name exactly one transaction when
    /// a client resumes from it, and `Date.parse` still reads it.
    pub fn to_iso_micros(self) -> String {
        let mut out = String::with_capacity(27);
        self.write_iso_micros(&mut out);
        out
    }

    /// [`PgTimestamp::to_iso_micros`], appended to `out`.
    pub fn write_iso_micros(self, out: &mut String) {
        let us = self.unix_micros();
        let secs = us.div_euclid(1_000_000);
        let micros = us.rem_euclid(1_000_000);
        let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
        let sod = secs.rem_euclid(86_400);
        if (0..=9999).contains(&y) {
            // Every commit renders this once per change: digits by hand, not
            // through the formatter (the same text as the general case below).
            let mut b = *b"0000-00-00T00:00:00.000000Z";
            let mut put = |at: usize, width: usize, mut v: u64| {
                for i in (at..at + width).rev() {
                    b[i] = b'0' + (v % 10) as u8;
                    v /= 10;
                }
            };
            put(0, 4, y as u64);
            put(5, 2, m as u64);
            put(8, 2, d as u64);
            put(11, 2, (sod / 3600) as u64);
            put(14, 2, ((sod / 60) % 60) as u64);
            put(17, 2, (sod % 60) as u64);
            put(20, 6, micros as u64);
            // Only ASCII digits and separators were written.
            out.push_str(std::str::from_utf8(&b).unwrap_or_default());
            return;
        }
        let _ = write!(
            out,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
            sod / 3600,
            (sod / 60) % 60,
            sod % 60
        );
    }
}

/// Reads an ISO 8601 / RFC 3339 time with a zone as Unix microseconds:
/// `2026-11-30T01:02:03.123456Z`, `…+02:00`, `…T01:02:03Z` (digits past the
/// microsecond are dropped), or a date alone (`2026-11-30`, midnight UTC).
pub fn parse_iso_unix_micros(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| std::str::from_utf8(part).ok()?.parse().ok())?
    };
    let (y, m, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    let m = u32::try_from(m).ok().filter(|m| (1..=12).contains(m))?;
    let days_in_month = (days_from_civil(if m == 12 { y + 1 } else { y }, m % 12 + 1, 1)
        - days_from_civil(y, m, 1)) as u32;
    let d = u32::try_from(d)
        .ok()
        .filter(|d| (1..=days_in_month).contains(d))?;
    let days = days_from_civil(y, m, d);
    if b.len() == 10 {
        return Some(days * 86_400_000_000);
    }
    if !matches!(b.get(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    let (hh, mm, ss) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if b.get(13) != Some(&b':') || b.get(16) != Some(&b':') || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    let mut at = 19;
    let mut micros = 0i64;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let digits = b[at..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        for (i, c) in b[at..at + digits].iter().take(6).enumerate() {
            micros += i64::from(c - b'0') * 10i64.pow(5 - i as u32);
        }
        at += digits;
    }
    let offset_secs = match b.get(at..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let rest = std::str::from_utf8(rest).ok()?;
            let (h, mi) = match rest.len() {
                2 => (rest, "00"),
                4 => rest.split_at(2),
                5 if rest.as_bytes()[2] == b':' => (&rest[..2], &rest[3..]),
                _ => return None,
            };
            if !h.bytes().chain(mi.bytes()).all(|c| c.is_ascii_digit()) {
                return None;
            }
            let (h, mi): (i64, i64) = (h.parse().ok()?, mi.parse().ok()?);
            if h > 23 || mi > 59 {
                return None;
            }
            let o = h * 3600 + mi * 60;
            if *sign == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss - offset_secs;
    secs.checked_mul(1_000_000)?.checked_add(micros)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the inverse of
/// [`civil_from_days`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Message type tags (first byte of every pgoutput message).
pub mod tag {
    pub const BEGIN: u8 = b'B';
    pub const MESSAGE: u8 = b'M';
    pub const COMMIT: u8 = b'C';
    pub const ORIGIN: u8 = b'O';
    pub const RELATION: u8 = b'R';
    pub const TYPE: u8 = b'Y';
    pub const INSERT: u8 = b'I';
    pub const UPDATE: u8 = b'U';
    pub const DELETE: u8 = b'D';
    pub const TRUNCATE: u8 = b'T';
    /// Starts the new tuple of an Insert or Update.
    pub const NEW_TUPLE: u8 = b'N';
    /// Starts an old tuple holding only the replica identity (key) columns.
    pub const KEY_TUPLE: u8 = b'K';
    /// Starts an old tuple holding the whole old row (`REPLICA IDENTITY FULL`).
    pub const OLD_TUPLE: u8 = b'O';
}

/// Column value kinds inside `TupleData`.
pub mod column_kind {
    pub const NULL: u8 = b'n';
    pub const UNCHANGED_TOAST: u8 = b'u';
    pub const TEXT: u8 = b't';
    pub const BINARY: u8 = b'b';
}

/// One decoded pgoutput message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(Type),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Begin {
    /// The LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: Xid,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Commit {
    pub flags: u8,
    /// The LSN of the commit record; equals the `Begin`'s `final_lsn`.
    pub commit_lsn: Lsn,
    /// The end of the commit record: the position to confirm once the transaction is handled.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

/// `REPLICA IDENTITY` setting of a relation (`pg_class.relreplident`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `d`: the primary key, if any.
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: a chosen unique index.
    Index,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Relation {
    pub id: RelId,
    /// The schema; pgoutput sends an empty string for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RelationColumn {
    /// Part of the replica identity key (flag bit 1).
    pub key: bool,
    pub name: String,
    pub type_oid: Oid,
    pub type_modifier: i32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Type {
    pub id: Oid,
    pub namespace: String,
    pub name: String,
}

/// One column of a `TupleData`.
#[derive(Clone, Debug, PartialEq)]
pub enum TupleValue {
    Null,
    /// An unchanged TOASTed value: the server did not send it.
    UnchangedToast,
    /// The value in the type's text output format.
    Text(Bytes),
    /// The value in the type's binary format (only sent when `binary 'true'` is requested).
    Binary(Bytes),
}

pub type TupleData = Vec<TupleValue>;

#[derive(Clone, Debug, PartialEq)]
pub struct Insert {
    pub relation: RelId,
    pub new: TupleData,
}

/// The old row sent with an Update or Delete.
#[derive(Clone, Debug, PartialEq)]
pub enum OldTuple {
    /// Only the replica identity columns ('K'); other columns are `Null`.
    Key(TupleData),
    /// The whole old row ('O', `REPLICA IDENTITY FULL`).
    Full(TupleData),
}

impl OldTuple {
    pub fn values(&self) -> &TupleData {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub relation: RelId,
    /// Absent when the replica identity did not change and identity is not FULL.
    pub old: Option<OldTuple>,
    pub new: TupleData,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Delete {
    pub relation: RelId,
    pub old: OldTuple,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Truncate {
    pub cascade: bool,
    pub restart_identity: bool,
    pub relations: Vec<RelId>,
}

/// A logical decoding message written with `pg_logical_emit_message`.
#[derive(Clone, Debug, PartialEq)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// Why a pgoutput message could not be decoded. Always definite: the same bytes fail the same way.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error("unknown pgoutput message tag {tag:?} (0x{byte:02x})", tag = char::from(*.byte))]
    UnknownTag { byte: u8 },
    #[error("truncated pgoutput message: {what} at byte {offset} needs {needed} bytes, {available} left")]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("negative {what} ({value}) at byte {offset}")]
    NegativeLength {
        what: &'static str,
        offset: usize,
        value: i64,
    },
    #[error("{what} at byte {offset} has no NUL terminator")]
    UnterminatedString { what: &'static str, offset: usize },
    #[error("{what} at byte {offset} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str, offset: usize },
    #[error("unexpected byte {found:?} at {offset} for {what}", found = char::from(*.found))]
    UnexpectedByte {
        what: &'static str,
        offset: usize,
        found: u8,
    },
    #[error("{count} trailing bytes after a complete message at byte {offset}")]
    TrailingBytes { offset: usize, count: usize },
}

/// Decodes one pgoutput message (the payload of an `XLogData`).
pub fn decode(buf: &Bytes) -> Result<Message, DecodeError> {
    let mut r = Reader::new(buf);
    let tag = r.u8("message tag").map_err(|_| DecodeError::Empty)?;
    let msg = match tag {
        tag::BEGIN => Message::Begin(Begin {
            final_lsn: Lsn(r.u64("Begin final LSN")?),
            commit_time: PgTimestamp(r.i64("Begin commit timestamp")?),
            xid: Xid(r.u32("Begin xid")?),
        }),
        tag::COMMIT => Message::Commit(Commit {
            flags: r.u8("Commit flags")?,
            commit_lsn: Lsn(r.u64("Commit LSN")?),
            end_lsn: Lsn(r.u64("Commit end LSN")?),
            commit_time: PgTimestamp(r.i64("Commit timestamp")?),
        }),
        tag::ORIGIN => Message::Origin(Origin {
            commit_lsn: Lsn(r.u64("Origin commit LSN")?),
            name: r.cstr("Origin name")?,
        }),
        tag::RELATION => Message::Relation(relation(&mut r)?),
        tag::TYPE => Message::Type(Type {
            id: Oid(r.u32("Type OID")?),
            namespace: r.cstr("Type namespace")?,
            name: r.cstr("Type name")?,
        }),
        tag::INSERT => {
            let relation = RelId(r.u32("Insert relation id")?);
            expect(&mut r, tag::NEW_TUPLE, "Insert new-tuple marker 'N'")?;
            Message::Insert(Insert {
                relation,
                new: tuple(&mut r)?,
            })
        }
        tag::UPDATE => {
            let relation = RelId(r.u32("Update relation id")?);
            let offset = r.offset();
            let (old, new) = match r.u8("Update tuple marker")? {
                tag::KEY_TUPLE => {
                    let old = OldTuple::Key(tuple(&mut r)?);
                    expect(&mut r, tag::NEW_TUPLE, "Update new-tuple marker 'N'")?;
                    (Some(old), tuple(&mut r)?)
                }
                tag::OLD_TUPLE => {
                    let old = OldTuple::Full(tuple(&mut r)?);
                    expect(&mut r, tag::NEW_TUPLE, "Update new-tuple marker 'N'")?;
                    (Some(old), tuple(&mut r)?)
                }
                tag::NEW_TUPLE => (None, tuple(&mut r)?),
                found => {
                    return Err(DecodeError::UnexpectedByte {
                        what: "Update tuple marker ('K', 'O' or 'N')",
                        offset,
                        found,
                    })
                }
            };
            Message::Update(Update { relation, old, new })
        }
        tag::DELETE => {
            let relation = RelId(r.u32("Delete relation id")?);
            let offset = r.offset();
            let old = match r.u8("Delete tuple marker")? {
                tag::KEY_TUPLE => OldTuple::Key(tuple(&mut r)?),
                tag::OLD_TUPLE => OldTuple::Full(tuple(&mut r)?),
                found => {
                    return Err(DecodeError::UnexpectedByte {
                        what: "Delete tuple marker ('K' or 'O')",
                        offset,
                        found,
                    })
                }
            };
            Message::Delete(Delete { relation, old })
        }
        tag::TRUNCATE => {
            let n = r.len32("Truncate relation count")?;
            let options = r.u8("Truncate options")?;
            r.check_fits(n, 4, "Truncate relation ids")?;
            let mut relations = Vec::with_capacity(n);
            for _ in 0..n {
                relations.push(RelId(r.u32("Truncate relation id")?));
            }
            Message::Truncate(Truncate {
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relations,
            })
        }
        tag::MESSAGE => {
            let flags = r.u8("Message flags")?;
            let lsn = Lsn(r.u64("Message LSN")?);
            let prefix = r.cstr("Message prefix")?;
            let n = r.len32("Message content length")?;
            Message::Message(LogicalMessage {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.bytes(n, "Message content")?,
            })
        }
        byte => return Err(DecodeError::UnknownTag { byte }),
    };
    r.finish()?;
    Ok(msg)
}

fn expect(r: &mut Reader<'_>, want: u8, what: &'static str) -> Result<(), DecodeError> {
    let offset = r.offset();
    let found = r.u8(what)?;
    if found == want {
        Ok(())
    } else {
        Err(DecodeError::UnexpectedByte {
            what,
            offset,
            found,
        })
    }
}

fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = RelId(r.u32("Relation id")?);
    let namespace = r.cstr("Relation namespace")?;
    let name = r.cstr("Relation name")?;
    let offset = r.offset();
    let replica_identity = match r.u8("Relation replica identity")? {
        b'd' => ReplicaIdentity::Default,
        b'n' => ReplicaIdentity::Nothing,
        b'f' => ReplicaIdentity::Full,
        b'i' => ReplicaIdentity::Index,
        found => {
            return Err(DecodeError::UnexpectedByte {
                what: "Relation replica identity ('d', 'n', 'f' or 'i')",
                offset,
                found,
            })
        }
    };
    let n = r.len16("Relation column count")?;
    // flags (1) + name (>= 1 for the NUL) + type OID (4) + typmod (4)
    r.check_fits(n, 10, "Relation columns")?;
    let mut columns = Vec::with_capacity(n);
    for _ in 0..n {
        let flags = r.u8("Relation column flags")?;
        columns.push(RelationColumn {
            key: flags & 1 != 0,
            name: r.cstr("Relation column name")?,
            type_oid: Oid(r.u32("Relation column type OID")?),
            type_modifier: r.i32("Relation column type modifier")?,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn tuple(r: &mut Reader<'_>) -> Result<TupleData, DecodeError> {
    let n = r.len16("TupleData column count")?;
    r.check_fits(n, 1, "TupleData columns")?;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        let offset = r.offset();
        let v = match r.u8("TupleData column kind")? {
            column_kind::NULL => TupleValue::Null,
            column_kind::UNCHANGED_TOAST => TupleValue::UnchangedToast,
            column_kind::TEXT => {
                let len = r.len32("TupleData text length")?;
                TupleValue::Text(r.bytes(len, "TupleData text value")?)
            }
            column_kind::BINARY => {
                let len = r.len32("TupleData binary length")?;
                TupleValue::Binary(r.bytes(len, "TupleData binary value")?)
            }
            found => {
                return Err(DecodeError::UnexpectedByte {
                    what: "TupleData column kind ('n', 'u', 't' or 'b')",
                    offset,
                    found,
                })
            }
        };
        values.push(v);
    }
    Ok(values)
}

#[cfg(test)]
mod tests;
