//! The replication protocol without IO: what to ask for, the messages of the
//! CopyBoth stream, and the standby status updates.
//!
//! Implements the "Streaming Replication Protocol" chapter of the PostgreSQL
//! documentation (the `START_REPLICATION … LOGICAL` command and the CopyBoth
//! sub-protocol: `XLogData` 'w', Primary keepalive message 'k', Standby status
//! update 'r') and the `pgoutput` options of "Logical Streaming Replication
//! Parameters". Everything here is a pure function of its arguments: no IO, no
//! async, no clock (times are passed in), and nothing panics on any input.
//!
//! Wire facts a reader can check against the docs: every integer is big-endian;
//! LSNs are `u64`; times are `i64` microseconds since 2000-01-01 00:00:00 UTC (the
//! PostgreSQL epoch, [`PG_EPOCH_UNIX_MICROS`] after the Unix one).
//!
//! Parsing borrows: the payload of an `XLogData` is a slice of the received
//! [`Bytes`] (a reference count, no copy), and a status update encodes into a
//! fixed-size array.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use crate::config::PgConnInfo;
use crate::decode::pgoutput::PgTimestamp;
use crate::lsn::Lsn;

/// What to stream from where.
#[derive(Clone, Debug)]
pub struct ReplicationOptions {
    pub conn: PgConnInfo,
    pub slot: String,
    pub publication: String,
    /// Create the slot when it does not exist.
    pub create_slot: bool,
    /// Create a temporary slot (dropped by the server when the connection ends).
    pub temporary: bool,
    /// Start from this LSN instead of the slot's confirmed position.
    pub start_lsn: Option<Lsn>,
    /// Keep retrying on errors that need an operator (slot dropped, …) once streaming
    /// has begun, instead of returning them. Errors at the first connect always return.
    pub retry_definite_errors: bool,
}

/// `XLogData`: WAL data (for a logical slot, one pgoutput message).
pub const XLOG_DATA: u8 = b'w';
/// Primary keepalive message.
pub const PRIMARY_KEEPALIVE: u8 = b'k';
/// Standby status update (sent by walcast).
pub const STANDBY_STATUS_UPDATE: u8 = b'r';

/// Tag, start LSN, end LSN, send time.
const XLOG_DATA_HEADER: usize = 1 + 8 + 8 + 8;
/// Tag, wal_end, send time, reply-requested flag.
const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;
/// Tag, write, flush and apply LSNs, client time, reply-request flag.
pub const STATUS_UPDATE_LEN: usize = 1 + 8 + 8 + 8 + 8 + 1;

/// Microseconds between the Unix epoch and the PostgreSQL epoch (2000-01-01 UTC).
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// The first `server_version_num` whose pgoutput knows the `messages` option.
const MESSAGES_OPTION_SINCE: i32 = 140_000;

/// One message the server sends inside a `CopyData` of the replication stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// `XLogData` ('w').
    XLogData {
        /// Where the WAL in `data` starts.
        start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// When the server sent it.
        sent: PgTimestamp,
        /// The payload: one pgoutput message for a logical slot (shares the input's memory).
        data: Bytes,
    },
    /// Primary keepalive message ('k').
    PrimaryKeepalive {
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// When the server sent it.
        sent: PgTimestamp,
        /// The server asks for a status update at once (it is about to time out).
        reply_requested: bool,
    },
}

/// Why a `CopyData` body is not a replication message walcast understands.
/// Definite: the same bytes fail the same way.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("empty CopyData message in the replication stream")]
    Empty,
    #[error("short {what}: {got} bytes, at least {need} expected")]
    Short {
        what: &'static str,
        got: usize,
        need: usize,
    },
    #[error("unknown CopyData message {:?} (0x{tag:02x}) in the replication stream", char::from(*tag))]
    UnknownTag { tag: u8 },
}

impl ReplicationMessage {
    /// Parses the body of one `CopyData` message from the server. The `XLogData`
    /// payload is a slice of `body`, not a copy. Bytes after a keepalive's fields
    /// are ignored, as PostgreSQL's own clients do.
    pub fn parse(body: &Bytes) -> Result<ReplicationMessage, ProtocolError> {
        let Some(&tag) = body.first() else {
            return Err(ProtocolError::Empty);
        };
        match tag {
            XLOG_DATA => {
                let h = header(body, XLOG_DATA_HEADER, "XLogData")?;
                Ok(ReplicationMessage::XLogData {
                    start: Lsn(be_u64(h, 1)),
                    wal_end: Lsn(be_u64(h, 9)),
                    sent: PgTimestamp(be_u64(h, 17) as i64),
                    data: body.slice(XLOG_DATA_HEADER..),
                })
            }
            PRIMARY_KEEPALIVE => {
                let h = header(body, KEEPALIVE_LEN, "keepalive")?;
                Ok(ReplicationMessage::PrimaryKeepalive {
                    wal_end: Lsn(be_u64(h, 1)),
                    sent: PgTimestamp(be_u64(h, 9) as i64),
                    reply_requested: h[17] == 1,
                })
            }
            tag => Err(ProtocolError::UnknownTag { tag }),
        }
    }

    /// The server's side of the wire format (for tests and in-process fake servers).
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            ReplicationMessage::XLogData {
                start,
                wal_end,
                sent,
                data,
            } => {
                out.reserve(XLOG_DATA_HEADER + data.len());
                out.put_u8(XLOG_DATA);
                out.put_u64(start.0);
                out.put_u64(wal_end.0);
                out.put_i64(sent.0);
                out.put_slice(data);
            }
            ReplicationMessage::PrimaryKeepalive {
                wal_end,
                sent,
                reply_requested,
            } => {
                out.reserve(KEEPALIVE_LEN);
                out.put_u8(PRIMARY_KEEPALIVE);
                out.put_u64(wal_end.0);
                out.put_i64(sent.0);
                out.put_u8(u8::from(*reply_requested));
            }
        }
    }
}

/// The first `len` bytes of `body`, or why there are fewer.
fn header<'b>(body: &'b [u8], len: usize, what: &'static str) -> Result<&'b [u8], ProtocolError> {
    body.get(..len).ok_or(ProtocolError::Short {
        what,
        got: body.len(),
        need: len,
    })
}

/// The big-endian `u64` at `at` (the caller checked the length).
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

/// A standby status update: how far walcast has received and handled the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StandbyStatusUpdate {
    /// Received (written) up to here.
    pub write: Lsn,
    /// Handled up to here: the slot may release WAL before it.
    pub flush: Lsn,
    /// Applied up to here (walcast reports its flush position).
    pub apply: Lsn,
    /// The client's clock when sending.
    pub client_time: PgTimestamp,
    /// Asks the server for a keepalive in return.
    pub reply_requested: bool,
}

impl StandbyStatusUpdate {
    /// The body of the `CopyData` message, without allocating.
    pub fn encode(&self) -> [u8; STATUS_UPDATE_LEN] {
        let mut b = [0u8; STATUS_UPDATE_LEN];
        b[0] = STANDBY_STATUS_UPDATE;
        b[1..9].copy_from_slice(&self.write.0.to_be_bytes());
        b[9..17].copy_from_slice(&self.flush.0.to_be_bytes());
        b[17..25].copy_from_slice(&self.apply.0.to_be_bytes());
        b[25..33].copy_from_slice(&self.client_time.0.to_be_bytes());
        b[33] = u8::from(self.reply_requested);
        b
    }

    /// Parses a status update (the server's side; for tests and fake servers).
    pub fn parse(body: &[u8]) -> Result<StandbyStatusUpdate, ProtocolError> {
        match body.first() {
            None => return Err(ProtocolError::Empty),
            Some(&STANDBY_STATUS_UPDATE) => {}
            Some(&tag) => return Err(ProtocolError::UnknownTag { tag }),
        }
        let h = header(body, STATUS_UPDATE_LEN, "standby status update")?;
        Ok(StandbyStatusUpdate {
            write: Lsn(be_u64(h, 1)),
            flush: Lsn(be_u64(h, 9)),
            apply: Lsn(be_u64(h, 17)),
            client_time: PgTimestamp(be_u64(h, 25) as i64),
            reply_requested: h[33] == 1,
        })
    }
}

/// `time` on the PostgreSQL clock (microseconds since 2000-01-01 UTC). Times before
/// the Unix epoch (a broken clock) map to the Unix epoch.
pub fn pg_timestamp(time: SystemTime) -> PgTimestamp {
    let unix_micros = time
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    PgTimestamp(unix_micros.saturating_sub(PG_EPOCH_UNIX_MICROS))
}

/// The `START_REPLICATION` command for `opts` from `start` (`0/0`: the slot's
/// confirmed position), with the pgoutput options the server version supports:
/// protocol version 1, the publication, and logical decoding messages from
/// PostgreSQL 14 on.
pub fn start_replication_command(
    opts: &ReplicationOptions,
    start: Lsn,
    server_version_num: i32,
) -> String {
    let messages = if server_version_num >= MESSAGES_OPTION_SINCE {
        ", messages 'true'"
    } else {
        ""
    };
    format!(
        "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names {}{})",
        quote_ident(&opts.slot),
        start,
        // publication_names is a list of identifiers inside a string literal.
        quote_literal(&quote_ident(&opts.publication)),
        messages
    )
}

/// Quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn xlog(start: u64, end: u64, sent: i64, data: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(start);
        b.put_u64(end);
        b.put_i64(sent);
        b.put_slice(data);
        b.freeze()
    }

    fn keepalive(wal_end: u64, sent: i64, reply: u8) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'k');
        b.put_u64(wal_end);
        b.put_i64(sent);
        b.put_u8(reply);
        b.freeze()
    }

    fn opts(slot: &str, publication: &str) -> ReplicationOptions {
        ReplicationOptions {
            conn: PgConnInfo::parse("postgres://u@localhost/db").unwrap(),
            slot: slot.into(),
            publication: publication.into(),
            create_slot: false,
            temporary: false,
            start_lsn: None,
            retry_definite_errors: false,
        }
    }

    #[test]
    fn xlog_data_parses_big_endian_fields_and_slices_the_payload() {
        let body = xlog(0x0000_0001_0000_0002, 0x0A0B_0C0D_0E0F_1011, -5, b"BEGIN");
        let m = ReplicationMessage::parse(&body).unwrap();
        let ReplicationMessage::XLogData {
            start,
            wal_end,
            sent,
            data,
        } = m
        else {
            panic!("not XLogData: {m:?}");
        };
        assert_eq!(start, Lsn(0x0000_0001_0000_0002));
        assert_eq!(start.to_string(), "1/2");
        assert_eq!(wal_end, Lsn(0x0A0B_0C0D_0E0F_1011));
        assert_eq!(sent, PgTimestamp(-5));
        assert_eq!(&data[..], b"BEGIN");
        // The payload is a view into the received buffer, not a copy.
        assert_eq!(data.as_ptr(), body[XLOG_DATA_HEADER..].as_ptr());
    }

    #[test]
    fn xlog_data_with_an_empty_payload_parses() {
        let m = ReplicationMessage::parse(&xlog(1, 2, 3, b"")).unwrap();
        assert!(matches!(m, ReplicationMessage::XLogData { data, .. } if data.is_empty()));
    }

    #[test]
    fn keepalive_parses_wal_end_time_and_reply_flag() {
        let m = ReplicationMessage::parse(&keepalive(0x1234_5678_9ABC_DEF0, 42, 1)).unwrap();
        assert_eq!(
            m,
            ReplicationMessage::PrimaryKeepalive {
                wal_end: Lsn(0x1234_5678_9ABC_DEF0),
                sent: PgTimestamp(42),
                reply_requested: true,
            }
        );
        let m = ReplicationMessage::parse(&keepalive(7, 0, 0)).unwrap();
        assert!(matches!(
            m,
            ReplicationMessage::PrimaryKeepalive {
                reply_requested: false,
                ..
            }
        ));
    }

    #[test]
    fn server_messages_round_trip() {
        for m in [
            ReplicationMessage::XLogData {
                start: Lsn(u64::MAX),
                wal_end: Lsn(0),
                sent: PgTimestamp(i64::MIN),
                data: Bytes::from_static(b"\x00\xffpayload"),
            },
            ReplicationMessage::PrimaryKeepalive {
                wal_end: Lsn(0x0102_0304_0506_0708),
                sent: PgTimestamp(i64::MAX),
                reply_requested: true,
            },
            ReplicationMessage::PrimaryKeepalive {
                wal_end: Lsn(1),
                sent: PgTimestamp(0),
                reply_requested: false,
            },
        ] {
            let mut b = BytesMut::new();
            m.encode(&mut b);
            assert_eq!(ReplicationMessage::parse(&b.freeze()).unwrap(), m);
        }
    }

    #[test]
    fn truncated_messages_are_errors_at_every_length() {
        let full_x = xlog(1, 2, 3, b"");
        for n in 1..full_x.len() {
            assert_eq!(
                ReplicationMessage::parse(&full_x.slice(..n)),
                Err(ProtocolError::Short {
                    what: "XLogData",
                    got: n,
                    need: XLOG_DATA_HEADER
                }),
            );
        }
        let full_k = keepalive(1, 2, 1);
        for n in 1..full_k.len() {
            assert!(matches!(
                ReplicationMessage::parse(&full_k.slice(..n)),
                Err(ProtocolError::Short {
                    what: "keepalive",
                    ..
                })
            ));
        }
        let full_r = StandbyStatusUpdate {
            write: Lsn(1),
            flush: Lsn(1),
            apply: Lsn(1),
            client_time: PgTimestamp(1),
            reply_requested: false,
        }
        .encode();
        for n in 1..full_r.len() {
            assert!(matches!(
                StandbyStatusUpdate::parse(&full_r[..n]),
                Err(ProtocolError::Short { .. })
            ));
        }
    }

    #[test]
    fn empty_and_unknown_messages_are_errors() {
        assert_eq!(
            ReplicationMessage::parse(&Bytes::new()),
            Err(ProtocolError::Empty)
        );
        let e = ReplicationMessage::parse(&Bytes::from_static(b"zzzzzzzzzzzzzzzzzzzzzzzzzzzz"))
            .unwrap_err();
        assert_eq!(e, ProtocolError::UnknownTag { tag: b'z' });
        assert!(e.to_string().contains("'z'"), "{e}");
        // A status update is what walcast sends, never what it receives.
        assert_eq!(
            ReplicationMessage::parse(&Bytes::from_static(&[b'r'; 34])),
            Err(ProtocolError::UnknownTag { tag: b'r' })
        );
        assert_eq!(StandbyStatusUpdate::parse(b""), Err(ProtocolError::Empty));
        assert_eq!(
            StandbyStatusUpdate::parse(&[b'k'; 34]),
            Err(ProtocolError::UnknownTag { tag: b'k' })
        );
    }

    #[test]
    fn parsing_never_panics_on_arbitrary_bytes() {
        // Every tag, every length up to past the longest header.
        for tag in 0..=u8::MAX {
            for len in 0..40 {
                let mut v = vec![0xAB; len];
                if let Some(first) = v.first_mut() {
                    *first = tag;
                }
                let b = Bytes::from(v);
                let _ = ReplicationMessage::parse(&b);
                let _ = StandbyStatusUpdate::parse(&b);
            }
        }
    }

    #[test]
    fn status_update_encodes_big_endian_fields_in_order() {
        let u = StandbyStatusUpdate {
            write: Lsn(0x0102_0304_0506_0708),
            flush: Lsn(0x1112_1314_1516_1718),
            apply: Lsn(0x2122_2324_2526_2728),
            client_time: PgTimestamp(0x3132_3334_3536_3738),
            reply_requested: true,
        };
        let b = u.encode();
        assert_eq!(b.len(), 34);
        assert_eq!(b[0], b'r');
        assert_eq!(b[1..9], [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(b[9..17], [0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]);
        assert_eq!(b[17..25], [0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28]);
        assert_eq!(b[25..33], [0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38]);
        assert_eq!(b[33], 1);
        assert_eq!(
            StandbyStatusUpdate {
                reply_requested: false,
                ..u
            }
            .encode()[33],
            0
        );
    }

    #[test]
    fn status_update_round_trips() {
        let u = StandbyStatusUpdate {
            write: Lsn(10),
            flush: Lsn(9),
            apply: Lsn(9),
            client_time: PgTimestamp(-1),
            reply_requested: false,
        };
        assert_eq!(StandbyStatusUpdate::parse(&u.encode()), Ok(u));
    }

    #[test]
    fn times_count_microseconds_from_2000_01_01() {
        let pg_epoch = UNIX_EPOCH + Duration::from_secs(946_684_800);
        assert_eq!(pg_timestamp(pg_epoch), PgTimestamp(0));
        assert_eq!(
            pg_timestamp(pg_epoch + Duration::from_micros(1_500_001)),
            PgTimestamp(1_500_001)
        );
        // Before 2000 the PostgreSQL clock is negative.
        assert_eq!(pg_timestamp(UNIX_EPOCH), PgTimestamp(-PG_EPOCH_UNIX_MICROS));
        // 2024-01-02T03:04:05.678Z, read back through the decoder's conversion.
        let t = UNIX_EPOCH + Duration::from_millis(1_704_164_645_678);
        assert_eq!(
            pg_timestamp(t).to_iso_micros(),
            "2024-01-02T03:04:05.678000Z"
        );
        assert_eq!(
            pg_timestamp(t).unix_micros(),
            1_704_164_645_678_000,
            "the conversion is the inverse of PgTimestamp::unix_micros"
        );
    }

    #[test]
    fn start_replication_command_quotes_the_slot_and_publication() {
        assert_eq!(
            start_replication_command(&opts("walcast", "pub"), Lsn(0), 150_000),
            "START_REPLICATION SLOT \"walcast\" LOGICAL 0/0 (proto_version '1', publication_names '\"pub\"', messages 'true')"
        );
        // A quote inside the publication name is doubled for the identifier, and
        // the single quote for the literal around it.
        assert_eq!(
            start_replication_command(&opts("s", "it's \"p\""), Lsn(0x1_0000_00FF), 160_000),
            "START_REPLICATION SLOT \"s\" LOGICAL 1/FF (proto_version '1', publication_names '\"it''s \"\"p\"\"\"', messages 'true')"
        );
    }

    #[test]
    fn start_replication_asks_for_messages_only_from_postgresql_14() {
        let before = start_replication_command(&opts("s", "p"), Lsn(0), 139_999);
        assert!(!before.contains("messages"), "{before}");
        assert!(before.ends_with("publication_names '\"p\"')"), "{before}");
        let from = start_replication_command(&opts("s", "p"), Lsn(0), 140_000);
        assert!(from.ends_with(", messages 'true')"), "{from}");
    }
}
