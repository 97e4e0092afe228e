//! Decoder tests from hand-encoded bytes, plus malformed-input regressions.

use super::*;
use bytes::{BufMut, BytesMut};

/// A tiny encoder used to build test messages byte by byte, following the docs.
#[derive(Default)]
struct Enc(BytesMut);

impl Enc {
    fn u8(mut self, v: u8) -> Self {
        self.0.put_u8(v);
        self
    }
    fn i16(mut self, v: i16) -> Self {
        self.0.put_i16(v);
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.put_i32(v);
        self
    }
    fn i64(mut self, v: i64) -> Self {
        self.0.put_i64(v);
        self
    }
    fn s(mut self, v: &str) -> Self {
        self.0.put_slice(v.as_bytes());
        self.0.put_u8(0);
        self
    }
    fn raw(mut self, v: &[u8]) -> Self {
        self.0.put_slice(v);
        self
    }
    fn text(self, v: &str) -> Self {
        self.u8(b't').i32(v.len() as i32).raw(v.as_bytes())
    }
    fn done(self) -> Bytes {
        self.0.freeze()
    }
}

fn begin() -> Bytes {
    Enc::default()
        .u8(b'B')
        .i64(0x1_0000_0010)
        .i64(757_382_400_000_000)
        .i32(731)
        .done()
}

fn relation() -> Bytes {
    Enc::default()
        .u8(b'R')
        .i32(16_384)
        .s("public")
        .s("orders")
        .u8(b'f')
        .i16(3)
        .u8(1)
        .s("id")
        .i32(20)
        .i32(-1)
        .u8(0)
        .s("note")
        .i32(25)
        .i32(-1)
        .u8(0)
        .s("qty")
        .i32(1700)
        .i32(655_366)
        .done()
}

fn update_full() -> Bytes {
    Enc::default()
        .u8(b'U')
        .i32(16_384)
        .u8(b'O')
        .i16(3)
        .text("1")
        .u8(b'n')
        .text("2.50")
        .u8(b'N')
        .i16(3)
        .text("1")
        .u8(b'u')
        .text("3.75")
        .done()
}

/// One message of every kind, used by the malformed-input tests.
fn corpus() -> Vec<Bytes> {
    vec![
        begin(),
        relation(),
        update_full(),
        Enc::default()
            .u8(b'C')
            .u8(0)
            .i64(0x1_0000_0010)
            .i64(0x1_0000_0040)
            .i64(757_382_400_000_000)
            .done(),
        Enc::default().u8(b'O').i64(77).s("node_a").done(),
        Enc::default()
            .u8(b'Y')
            .i32(90_001)
            .s("public")
            .s("mood")
            .done(),
        Enc::default()
            .u8(b'I')
            .i32(16_384)
            .u8(b'N')
            .i16(2)
            .text("42")
            .u8(b'b')
            .i32(2)
            .raw(&[0xde, 0xad])
            .done(),
        Enc::default()
            .u8(b'U')
            .i32(16_384)
            .u8(b'K')
            .i16(1)
            .text("1")
            .u8(b'N')
            .i16(1)
            .text("2")
            .done(),
        Enc::default()
            .u8(b'U')
            .i32(16_384)
            .u8(b'N')
            .i16(1)
            .text("2")
            .done(),
        Enc::default()
            .u8(b'D')
            .i32(16_384)
            .u8(b'K')
            .i16(1)
            .text("9")
            .done(),
        Enc::default()
            .u8(b'T')
            .i32(2)
            .u8(3)
            .i32(16_384)
            .i32(16_390)
            .done(),
        Enc::default()
            .u8(b'M')
            .u8(1)
            .i64(0x20)
            .s("walcast")
            .i32(5)
            .raw(b"hello")
            .done(),
    ]
}

#[test]
fn decodes_begin() {
    assert_eq!(
        decode(&begin()).unwrap(),
        Message::Begin(Begin {
            final_lsn: Lsn(0x1_0000_0010),
            commit_time: PgTimestamp(757_382_400_000_000),
            xid: Xid(731),
        })
    );
}

#[test]
fn decodes_relation_with_flags_and_identity() {
    let Message::Relation(r) = decode(&relation()).unwrap() else {
        panic!("not a relation")
    };
    assert_eq!(r.id, RelId(16_384));
    assert_eq!(
        (r.namespace.as_str(), r.name.as_str()),
        ("public", "orders")
    );
    assert_eq!(r.replica_identity, ReplicaIdentity::Full);
    assert_eq!(r.columns.len(), 3);
    assert!(r.columns[0].key && !r.columns[1].key);
    assert_eq!(r.columns[2].type_oid, Oid(1700));
    assert_eq!(r.columns[2].type_modifier, 655_366);
}

#[test]
fn decodes_update_with_old_image_and_unchanged_toast() {
    let Message::Update(u) = decode(&update_full()).unwrap() else {
        panic!("not an update")
    };
    let old = match u.old {
        Some(OldTuple::Full(t)) => t,
        other => panic!("expected a full old tuple, got {other:?}"),
    };
    assert_eq!(old[1], TupleValue::Null);
    assert_eq!(old[2], TupleValue::Text(Bytes::from_static(b"2.50")));
    assert_eq!(u.new[1], TupleValue::UnchangedToast);
}

#[test]
fn decodes_every_kind() {
    let kinds: Vec<_> = corpus()
        .iter()
        .map(|b| std::mem::discriminant(&decode(b).unwrap()))
        .collect();
    assert_eq!(kinds.len(), 12);
    let Message::Truncate(t) = decode(&corpus()[10]).unwrap() else {
        panic!()
    };
    assert!(t.cascade && t.restart_identity);
    assert_eq!(t.relations, vec![RelId(16_384), RelId(16_390)]);
    let Message::Message(m) = decode(&corpus()[11]).unwrap() else {
        panic!()
    };
    assert!(m.transactional);
    assert_eq!(&m.content[..], b"hello");
}

#[test]
fn every_truncation_is_an_error() {
    for msg in corpus() {
        for cut in 0..msg.len() {
            let short = msg.slice(..cut);
            assert!(
                decode(&short).is_err(),
                "prefix of {} bytes of {:?} decoded",
                cut,
                char::from(msg[0])
            );
        }
    }
}

#[test]
fn trailing_bytes_are_an_error() {
    for msg in corpus() {
        let mut long = BytesMut::from(&msg[..]);
        long.put_u8(0);
        let err = decode(&long.freeze()).unwrap_err();
        assert!(
            matches!(err, DecodeError::TrailingBytes { count: 1, .. }),
            "{err}"
        );
    }
}

#[test]
fn unknown_tags_are_typed_errors() {
    for byte in [b'X', b'S', b'E', b'c', 0, 0xff] {
        let err = decode(&Bytes::from(vec![byte, 0, 0])).unwrap_err();
        assert_eq!(err, DecodeError::UnknownTag { byte });
    }
    assert_eq!(decode(&Bytes::new()).unwrap_err(), DecodeError::Empty);
}

#[test]
fn negative_and_huge_lengths_are_rejected_without_allocating() {
    // A negative text length.
    let neg = Enc::default()
        .u8(b'I')
        .i32(1)
        .u8(b'N')
        .i16(1)
        .u8(b't')
        .i32(-5)
        .done();
    assert!(matches!(
        decode(&neg).unwrap_err(),
        DecodeError::NegativeLength { value: -5, .. }
    ));
    // A text length far past the end.
    let huge = Enc::default()
        .u8(b'I')
        .i32(1)
        .u8(b'N')
        .i16(1)
        .u8(b't')
        .i32(i32::MAX)
        .done();
    assert!(matches!(
        decode(&huge).unwrap_err(),
        DecodeError::Truncated { .. }
    ));
    // A column count that cannot fit the bytes left.
    let many = Enc::default().u8(b'I').i32(1).u8(b'N').i16(i16::MAX).done();
    assert!(matches!(
        decode(&many).unwrap_err(),
        DecodeError::Truncated { .. }
    ));
    let neg_cols = Enc::default().u8(b'I').i32(1).u8(b'N').i16(-1).done();
    assert!(matches!(
        decode(&neg_cols).unwrap_err(),
        DecodeError::NegativeLength { .. }
    ));
    // A truncate relation count of i32::MAX.
    let trunc = Enc::default().u8(b'T').i32(i32::MAX).u8(0).done();
    assert!(matches!(
        decode(&trunc).unwrap_err(),
        DecodeError::Truncated { .. }
    ));
}

#[test]
fn bad_markers_are_errors() {
    let bad_kind = Enc::default()
        .u8(b'I')
        .i32(1)
        .u8(b'N')
        .i16(1)
        .u8(b'x')
        .done();
    assert!(matches!(
        decode(&bad_kind).unwrap_err(),
        DecodeError::UnexpectedByte { found: b'x', .. }
    ));
    let bad_new = Enc::default().u8(b'I').i32(1).u8(b'K').i16(0).done();
    assert!(decode(&bad_new).is_err());
    let bad_identity = Enc::default()
        .u8(b'R')
        .i32(1)
        .s("s")
        .s("t")
        .u8(b'z')
        .i16(0)
        .done();
    assert!(decode(&bad_identity).is_err());
    let bad_utf8 = Enc::default().u8(b'O').i64(1).raw(&[0xff, 0xfe, 0]).done();
    assert!(matches!(
        decode(&bad_utf8).unwrap_err(),
        DecodeError::InvalidUtf8 { .. }
    ));
}

#[test]
fn commit_timestamp_formats_as_iso_utc_with_microseconds() {
    // 2024-01-02T03:04:05.678901Z
    let unix_us: i64 = 1_704_164_645_678_901;
    let ts = PgTimestamp(unix_us - PG_EPOCH_UNIX_SECS * 1_000_000);
    assert_eq!(ts.to_iso_micros(), "2024-01-02T03:04:05.678901Z");
    assert_eq!(
        PgTimestamp(0).to_iso_micros(),
        "2000-01-01T00:00:00.000000Z"
    );
    assert_eq!(
        PgTimestamp(-1).to_iso_micros(),
        "1999-12-31T23:59:59.999999Z"
    );
    // Years outside 0..=9999 take the formatter's path: wider, or signed.
    let day = |y| PgTimestamp::from_unix_micros(days_from_civil(y, 1, 1) * 86_400_000_000);
    assert_eq!(day(10_000).to_iso_micros(), "10000-01-01T00:00:00.000000Z");
    assert_eq!(day(-1).to_iso_micros(), "-001-01-01T00:00:00.000000Z");
    assert_eq!(day(0).to_iso_micros(), "0000-01-01T00:00:00.000000Z");
    assert_eq!(day(9_999).to_iso_micros(), "9999-01-01T00:00:00.000000Z");
}

#[test]
fn iso_times_parse_back_to_the_microsecond() {
    let us: i64 = 1_704_164_645_678_901;
    for s in [
        "2024-01-02T03:04:05.678901Z",
        "2024-01-02 03:04:05.678901+00",
        "2024-01-02T05:04:05.678901+02:00",
        "2024-01-02T01:04:05.678901-0200",
        "2024-01-02T03:04:05.678901234z",
    ] {
        assert_eq!(parse_iso_unix_micros(s), Some(us), "{s}");
    }
    // The millisecond form Supabase sends; whole seconds; a date alone.
    assert_eq!(
        parse_iso_unix_micros("2024-01-02T03:04:05.678Z"),
        Some(1_704_164_645_678_000)
    );
    assert_eq!(
        parse_iso_unix_micros("2024-01-02T03:04:05Z"),
        Some(1_704_164_645_000_000)
    );
    assert_eq!(
        parse_iso_unix_micros("2024-01-02"),
        Some(1_704_153_600_000_000)
    );
    for bad in [
        "",
        "yesterday",
        "2024-01-02T03:04:05",
        "2024-13-02T03:04:05Z",
        "2023-02-29T00:00:00Z",
        "2024-01-02T24:00:00Z",
        "2024-01-02T03:04:05.Z",
        "2024-01-02T03:04:05Zjunk",
        "2024-01-02T03:04:05+1",
        "0/16B3748",
    ] {
        assert_eq!(parse_iso_unix_micros(bad), None, "{bad}");
    }
}

proptest::proptest! {
    #[test]
    fn iso_micros_round_trip(us in -62_000_000_000_000_000i64..253_000_000_000_000_000i64) {
        let t = PgTimestamp::from_unix_micros(us);
        proptest::prop_assert_eq!(parse_iso_unix_micros(&t.to_iso_micros()), Some(us));
    }
}

proptest::proptest! {
    #[test]
    fn never_panics_on_arbitrary_bytes(data in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
        let _ = decode(&Bytes::from(data));
    }

    #[test]
    fn never_panics_on_mutated_messages(idx in 0usize..12, pos in 0usize..64, byte in proptest::num::u8::ANY) {
        let msg = &corpus()[idx];
        let mut m = msg.to_vec();
        let p = pos % m.len();
        m[p] = byte;
        let _ = decode(&Bytes::from(m));
    }
}
