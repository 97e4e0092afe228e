//! Filters agree with PostgreSQL.
//!
//! For each column type, a seeded generator makes values and filter literals (in
//! the many input forms PostgreSQL accepts). The server gives each value's text
//! form (what pgoutput would send, with the walsender's `TimeZone=UTC`,
//! `DateStyle=ISO`) and evaluates `value::type op literal::type` for every pair;
//! walcast must give the same answer for `col=[not.]op.literal` on that text,
//! with SQL's three-valued logic (NULL → neither the condition nor its negation).
//! `canonical_key` must be equal exactly for the pairs PostgreSQL calls equal.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio_postgres::Client;
use walcast::decode::event::{Cell, Row};
use walcast::decode::pgoutput::{RelId, ReplicaIdentity};
use walcast::decode::relation::{Column, Table};
use walcast::decode::value::PgType;
use walcast::route::filter::{canonical_key, BoundFilter, Filter};

use crate::support::cluster;

/// splitmix64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One column type under test.
struct Case {
    /// Type of the column (the value side of the comparison), as SQL.
    col_sql: &'static str,
    /// Type the literal is cast to (Supabase casts to the column's type OID, without typmod).
    lit_sql: &'static str,
    /// `pg_type.typname` and OID, for the walcast `Table`.
    typname: &'static str,
    oid: u32,
    /// `collate "C"` for text types: walcast compares byte-wise.
    collate: &'static str,
    ordered: bool,
    gen: fn(&mut Rng) -> String,
    /// Literal forms PostgreSQL accepts for this type beyond what `gen` makes.
    extra_literals: &'static [&'static str],
    /// Literals PostgreSQL rejects; walcast must reject them too.
    invalid: &'static [&'static str],
}

fn gen_int4(r: &mut Rng) -> String {
    match r.below(10) {
        0 => r.pick(&["-2147483648", "2147483647", "0"]).to_string(),
        1 => format!("{}", r.next() as i32),
        2 => format!("00{}", r.range(0, 5)),
        3 => format!("+{}", r.range(0, 5)),
        4 => format!(" {} ", r.range(-5, 5)),
        _ => format!("{}", r.range(-5, 5)),
    }
}

fn gen_int8(r: &mut Rng) -> String {
    match r.below(10) {
        0 => r
            .pick(&["-9223372036854775808", "9223372036854775807", "-0"])
            .to_string(),
        1 | 2 => format!("{}", r.next() as i64),
        3 => format!("{}", 4_000_000_000i64 + r.range(-2, 2)),
        _ => format!("{}", r.range(-5, 5)),
    }
}

fn gen_numeric(r: &mut Rng) -> String {
    if r.chance(8) {
        return r
            .pick(&["NaN", "Infinity", "-Infinity", "nan", "+inf"])
            .to_string();
    }
    let int = *r.pick(&[
        "0",
        "1",
        "2",
        "10",
        "99",
        "100",
        "12345678901234567890123",
        "",
    ]);
    let frac = *r.pick(&["", "5", "50", "05", "000", "123456789012345678901", "9"]);
    let int = if int.is_empty() && frac.is_empty() {
        "0"
    } else {
        int
    };
    let sign = *r.pick(&["", "", "-", "+"]);
    let mut s = if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    };
    if r.chance(15) {
        s.push_str(&format!("e{}", r.range(-3, 3)));
    }
    s
}

fn gen_float(r: &mut Rng) -> String {
    match r.below(10) {
        0 => r
            .pick(&["NaN", "Infinity", "-Infinity", "-0", "0", "1e-310", "+inf"])
            .to_string(),
        1 => {
            // Any finite double, by its bits.
            let f = f64::from_bits(r.next());
            if f.is_finite() {
                format!("{f:e}")
            } else {
                "1.5".to_string()
            }
        }
        2 => format!("{}.{}0", r.range(-3, 3), r.range(0, 9)),
        3 => r
            .pick(&["0.1", "0.100000001", "0.30000000000000004", "1e300", ".5"])
            .to_string(),
        _ => format!("{}.{}", r.range(-3, 3), r.pick(&["0", "5", "25"])),
    }
}

/// Like [`gen_float`], within float4's range.
fn gen_float4(r: &mut Rng) -> String {
    let s = gen_float(r);
    match s.trim().parse::<f64>() {
        Ok(f) if f.is_finite() && f != 0.0 && (f.abs() > 3e38 || f.abs() < 1e-37) => "2.5".into(),
        _ => s,
    }
}

fn gen_text(r: &mut Rng) -> String {
    let alphabet = [
        "a", "b", "B", "_", "%", "é", " ", "\\", "\"", ",", "(", "*", "A",
    ];
    (0..r.below(4)).map(|_| *r.pick(&alphabet)).collect()
}

fn gen_bool(r: &mut Rng) -> String {
    r.pick(&[
        "t", "f", "true", "false", "yes", "no", "on", "off", "1", "0", "TRUE", " y ", "of", "tr",
    ])
    .to_string()
}

fn gen_ymd(r: &mut Rng, pad: bool) -> (String, bool) {
    let year = if r.chance(10) {
        r.range(1, 3000)
    } else {
        r.range(1999, 2001)
    };
    let month = r.range(1, 12);
    let day = if r.chance(10) {
        r.range(28, 31).min(if month == 2 { 29 } else { 30 })
    } else {
        r.range(1, 3)
    };
    // Feb 29 only in leap years.
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let day = if month == 2 && day == 29 && !leap {
        28
    } else {
        day
    };
    let bc = r.chance(5);
    let s = if pad {
        format!("{year:04}-{month:02}-{day:02}")
    } else {
        format!("{year}-{month}-{day}")
    };
    (s, bc)
}

fn gen_date(r: &mut Rng) -> String {
    if r.chance(5) {
        return r.pick(&["infinity", "-infinity", "epoch"]).to_string();
    }
    let pad = !r.chance(20);
    let (d, bc) = gen_ymd(r, pad);
    if bc {
        format!("{d} BC")
    } else {
        d
    }
}

fn gen_time(r: &mut Rng) -> String {
    let mut t = format!("{:02}:{:02}", r.pick(&[0, 1, 12, 23]), r.pick(&[0, 30, 59]));
    if r.chance(80) {
        t.push_str(&format!(":{:02}", r.pick(&[0, 1, 59])));
        if r.chance(40) {
            let digits = r.range(1, 7) as usize;
            let frac: String = (0..digits)
                .map(|_| char::from(b'0' + r.below(10) as u8))
                .collect();
            t.push('.');
            t.push_str(&frac);
        }
    }
    t
}

fn gen_timestamptz(r: &mut Rng) -> String {
    if r.chance(4) {
        return r.pick(&["infinity", "-infinity"]).to_string();
    }
    let (d, bc) = gen_ymd(r, true);
    let sep = *r.pick(&[" ", "T"]);
    let zone = *r.pick(&[
        "", "Z", "+00", "+02", "+05:30", "-0800", " +01:00", "-03:00", "+14", "z", " UTC",
    ]);
    let mut s = format!("{d}{sep}{}{zone}", gen_time(r));
    if bc {
        s.push_str(" BC");
    }
    s
}

fn gen_timestamp(r: &mut Rng) -> String {
    if r.chance(4) {
        return r.pick(&["infinity", "-infinity"]).to_string();
    }
    let (d, bc) = gen_ymd(r, true);
    let mut s = if r.chance(15) {
        d // midnight
    } else {
        format!("{d}{}{}", r.pick(&[" ", "T"]), gen_time(r))
    };
    if bc {
        s.push_str(" BC");
    }
    s
}

const UUIDS: [&str; 5] = [
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12",
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "7fffffff-0000-4000-8000-123456789abc",
];

fn gen_uuid(r: &mut Rng) -> String {
    let u = *r.pick(&UUIDS);
    match r.below(4) {
        0 => u.to_uppercase(),
        1 => u.replace('-', ""),
        2 => format!("{{{u}}}"),
        _ => u.to_string(),
    }
}

fn cases() -> Vec<(&'static str, Case)> {
    let case = |col_sql, lit_sql, typname, oid, gen| Case {
        col_sql,
        lit_sql,
        typname,
        oid,
        collate: "",
        ordered: true,
        gen,
        extra_literals: &[],
        invalid: &[],
    };
    vec![
        (
            "int4",
            Case {
                extra_literals: &["  -0  ", "+0", "0000000000000000000000000000000000042"],
                invalid: &[
                    "abc",
                    "1.5",
                    "2147483648",
                    "",
                    "1e3",
                    "0x1F",
                    "1_000",
                    "- 1",
                ],
                ..case("int4", "int4", "int4", 23, gen_int4)
            },
        ),
        (
            "int8",
            Case {
                invalid: &["9223372036854775808", "1.0", "x"],
                ..case("int8", "int8", "int8", 20, gen_int8)
            },
        ),
        (
            "int2",
            Case {
                invalid: &["32768", "-32769"],
                ..case("int2", "int2", "int2", 21, |r| {
                    format!("{}", r.range(-5, 5))
                })
            },
        ),
        (
            "numeric",
            Case {
                extra_literals: &["5.", ".5", "1E+2", " 7 ", "-0.000", "1e-3"],
                invalid: &["abc", "1.2.3", "e5", "1e", "--1", "-nan", ""],
                ..case("numeric", "numeric", "numeric", 1700, gen_numeric)
            },
        ),
        (
            "float8",
            Case {
                extra_literals: &["5.", "1E2", " 2 ", "-INF", "infinity", "nan"],
                invalid: &["1e400", "-1e400", "1e-400", "abc", "1_0", ""],
                ..case("float8", "float8", "float8", 701, gen_float)
            },
        ),
        (
            "float4",
            Case {
                invalid: &["1e39", "1e-50"],
                ..case("float4", "float4", "float4", 700, gen_float4)
            },
        ),
        (
            "text",
            Case {
                collate: " collate \"C\"",
                extra_literals: &["null", "NULL", "", "é"],
                ..case("text", "text", "text", 25, gen_text)
            },
        ),
        (
            "bpchar",
            Case {
                collate: " collate \"C\"",
                ..case("char(3)", "bpchar", "bpchar", 1042, gen_text)
            },
        ),
        (
            "bool",
            Case {
                extra_literals: &["No", "oN", "T"],
                invalid: &["o", "2", "maybe", "", "yess"],
                ..case("bool", "bool", "bool", 16, gen_bool)
            },
        ),
        (
            "date",
            Case {
                extra_literals: &[
                    "2000-2-29",
                    " 2000-01-01 ",
                    "0001-01-01 BC",
                    "2000-01-01 AD",
                ],
                invalid: &[
                    "2001-02-29",
                    "2000-13-01",
                    "2000-00-10",
                    "0000-01-01",
                    "x",
                    "",
                ],
                ..case("date", "date", "date", 1082, gen_date)
            },
        ),
        (
            "timestamptz",
            Case {
                extra_literals: &[
                    "2000-01-01 24:00:00",
                    "2000-01-01 23:59:60",
                    "2000-01-01T00:00:00.0000005Z",
                    "2000-01-01 00:00:00.9999995+00",
                    "epoch",
                    "2000-01-01",
                    "1999-12-31T22:00:00-02:00",
                ],
                invalid: &[
                    "2000-01-01 25:00",
                    "2000-01-01 24:00:01",
                    "2000-01-01 10:60",
                    "2000-02-30 10:00",
                    "2000-01-01 10:00+16",
                    "2000-01-01 10:00 junk",
                ],
                ..case(
                    "timestamptz",
                    "timestamptz",
                    "timestamptz",
                    1184,
                    gen_timestamptz,
                )
            },
        ),
        (
            "timestamp",
            Case {
                extra_literals: &["2000-01-01 00:00:00+05", "2000-01-01T12:00Z"],
                ..case("timestamp", "timestamp", "timestamp", 1114, gen_timestamp)
            },
        ),
        (
            "uuid",
            Case {
                invalid: &[
                    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
                    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a111",
                    "a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11",
                    "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                    "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                ],
                ..case("uuid", "uuid", "uuid", 2950, gen_uuid)
            },
        ),
    ]
}

/// PostgREST-quotes a value, or not when it is safe and the coin says so.
fn encode(r: &mut Rng, v: &str, in_list: bool) -> String {
    let special = v.is_empty()
        || v.contains([',', '(', ')', '"', '\\'])
        || (in_list && (v.trim() != v || v.eq_ignore_ascii_case("null")));
    if special || r.chance(50) {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        v.to_string()
    }
}

fn table(c: &Case) -> Table {
    Table {
        id: RelId(1),
        schema: "public".into(),
        name: "t".into(),
        replica_identity: ReplicaIdentity::Full,
        json: Default::default(),
        columns: vec![Column {
            name: "c".into(),
            ty: Arc::new(PgType::new(
                c.oid,
                c.typname,
                PgType::kind_for_base_name(c.typname),
            )),
            key: false,
        }],
    }
}

fn row_of(text: &Option<String>) -> Row {
    vec![match text {
        Some(t) => Cell::Text(Bytes::copy_from_slice(t.as_bytes())),
        None => Cell::Null,
    }]
}

fn bind(filter: &str, t: &Table) -> BoundFilter {
    Filter::parse(filter)
        .unwrap_or_else(|e| panic!("parse {filter:?}: {e}"))
        .bind(t)
        .unwrap_or_else(|e| panic!("bind {filter:?}: {e}"))
}

/// `matches` for a condition and its negation against PostgreSQL's three-valued result.
fn expect(t: &Table, filter: &str, negated: &str, text: &Option<String>, pg: Option<bool>) {
    let row = row_of(text);
    let got = bind(filter, t).matches(&row);
    assert_eq!(
        got,
        pg == Some(true),
        "{filter:?} on {text:?}: PostgreSQL says {pg:?}"
    );
    let got = bind(negated, t).matches(&row);
    assert_eq!(
        got,
        pg == Some(false),
        "{negated:?} on {text:?}: PostgreSQL says not {pg:?}"
    );
}

async fn session(db: &str) -> Client {
    let c = cluster().client(db).await;
    c.batch_execute("set TimeZone = 'UTC'; set DateStyle = 'ISO'; set extra_float_digits = 1")
        .await
        .unwrap();
    c
}

/// The text form of each value, as PostgreSQL outputs it.
async fn text_forms(db: &Client, case: &Case, raw: &[Option<String>]) -> Vec<Option<String>> {
    let sql = format!(
        // The output function's text (format's %s), not a cast to text: for bpchar
        // that cast strips the padding pgoutput sends.
        "select case when x is null then null else format('%s', x::{}) end
         from unnest($1::text[]) with ordinality u(x, i) order by i",
        case.col_sql
    );
    db.query(&sql, &[&raw])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn agree_with_postgres(db: &str, name: &str, case: &Case, seed: u64) {
    let db = session(db).await;
    let t = table(case);
    let ty = t.columns[0].ty.clone();
    let mut r = Rng(seed);

    // Values: generated, plus NULL.
    let mut raw: Vec<Option<String>> = (0..40).map(|_| Some((case.gen)(&mut r))).collect();
    raw.push(None);
    let values = text_forms(&db, case, &raw).await;

    // Literals: fresh ones, the raw value inputs (equal to some values but written
    // differently), and the extra forms.
    let mut literals: Vec<String> = (0..25).map(|_| (case.gen)(&mut r)).collect();
    literals.extend(raw.iter().flatten().take(15).cloned());
    literals.extend(case.extra_literals.iter().map(|s| s.to_string()));

    // Every literal PostgreSQL accepts, walcast binds; its canonical key equals the
    // key of PostgreSQL's own text for it.
    let lit_opts: Vec<Option<String>> = literals.iter().cloned().map(Some).collect();
    let lit_texts = text_forms(&db, case, &lit_opts).await;
    for (lit, pg_text) in literals.iter().zip(&lit_texts) {
        let f = format!("c=eq.{}", encode(&mut r, lit, false));
        bind(&f, &t);
        if case.lit_sql == case.col_sql {
            let pg_text = pg_text.as_deref().unwrap_or_default();
            assert_eq!(
                canonical_key(&ty, lit),
                canonical_key(&ty, pg_text),
                "{name}: key of {lit:?} vs PostgreSQL's {pg_text:?}"
            );
        }
    }
    for bad in case.invalid {
        let pg = db
            .query_one(&format!("select $1::text::{}", case.lit_sql), &[bad])
            .await;
        assert!(
            pg.is_err(),
            "{name}: PostgreSQL accepts {bad:?}; fix the test"
        );
        let f = Filter::parse(&format!("c=eq.{}", encode(&mut r, bad, false))).unwrap();
        let err = f
            .bind(&t)
            .expect_err(&format!("{name}: {bad:?} should not bind"));
        assert!(err.to_string().contains("is not a valid"), "{err}");
    }

    // Pairwise comparisons.
    let (col, lit, coll) = (case.col_sql, case.lit_sql, case.collate);
    let sql = format!(
        "select v.i, l.i,
                v.x::{col}{coll} = l.x::{lit}, v.x::{col}{coll} <> l.x::{lit},
                v.x::{col}{coll} < l.x::{lit}, v.x::{col}{coll} <= l.x::{lit},
                v.x::{col}{coll} > l.x::{lit}, v.x::{col}{coll} >= l.x::{lit},
                v.x::{col}{coll} is distinct from l.x::{lit}
         from unnest($1::text[]) with ordinality v(x, i),
              unnest($2::text[]) with ordinality l(x, i)"
    );
    let rows = db
        .query(&sql, &[&values, &literals])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    assert_eq!(rows.len(), values.len() * literals.len());
    let mut pg: HashMap<(usize, usize), [Option<bool>; 7]> = HashMap::new();
    for row in &rows {
        let (i, j): (i64, i64) = (row.get(0), row.get(1));
        let res = [2, 3, 4, 5, 6, 7, 8].map(|k| row.get::<_, Option<bool>>(k));
        pg.insert((i as usize - 1, j as usize - 1), res);
    }
    let ops = ["eq", "neq", "lt", "lte", "gt", "gte", "isdistinct"];
    let mut checked = 0;
    for (j, l) in literals.iter().enumerate() {
        let enc = encode(&mut r, l, false);
        let bound: Vec<(BoundFilter, BoundFilter)> = ops
            .iter()
            .filter(|op| case.ordered || !op.starts_with(['l', 'g']))
            .map(|op| {
                (
                    bind(&format!("c={op}.{enc}"), &t),
                    bind(&format!("c=not.{op}.{enc}"), &t),
                )
            })
            .collect();
        for (i, v) in values.iter().enumerate() {
            let row = row_of(v);
            let res = pg[&(i, j)];
            for (k, (pos, neg)) in bound.iter().enumerate() {
                let want = res[k];
                assert_eq!(
                    pos.matches(&row),
                    want == Some(true),
                    "{name}: c={}.{enc} on {v:?}: PostgreSQL says {want:?}",
                    ops[k]
                );
                assert_eq!(
                    neg.matches(&row),
                    want == Some(false),
                    "{name}: c=not.{}.{enc} on {v:?}: PostgreSQL says not {want:?}",
                    ops[k]
                );
                checked += 2;
            }
            // Keys: equal exactly when PostgreSQL says `=`.
            if let (Some(text), Some(eq)) = (v, res[0]) {
                let (kv, kl) = (canonical_key(&ty, text), canonical_key(&ty, l));
                assert!(
                    kv.is_some() && kl.is_some(),
                    "{name}: no key for {text:?}/{l:?}"
                );
                assert_eq!(
                    kv == kl,
                    eq,
                    "{name}: keys {kv:?} (value {text:?}) and {kl:?} (literal {l:?})"
                );
            }
        }
    }
    assert!(checked > 1000, "{name}: only {checked} checks");

    // `in` lists, some with a NULL item.
    for _ in 0..15 {
        let n = r.range(0, 4) as usize;
        let mut items: Vec<Option<String>> =
            (0..n).map(|_| Some(r.pick(&literals).clone())).collect();
        if r.chance(30) {
            items.push(None);
        }
        let list = items
            .iter()
            .map(|i| match i {
                None => "null".to_string(),
                Some(v) => encode(&mut r, v, true),
            })
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "select (x::{col}{coll}) = any($2::text[]::{lit}[])
             from unnest($1::text[]) with ordinality v(x, i) order by i"
        );
        let rows = db.query(&sql, &[&values, &items]).await.unwrap();
        for (v, row) in values.iter().zip(&rows) {
            let want: Option<bool> = row.get(0);
            expect(
                &t,
                &format!("c=in.({list})"),
                &format!("c=not.in.({list})"),
                v,
                want,
            );
        }
        // The index key covers every matching row.
        let f = bind(&format!("c=in.({list})"), &t);
        let (col_idx, keys) = f.index_key().expect("in on a keyed type is indexable");
        assert_eq!(col_idx, 0);
        for v in values.iter().flatten() {
            if f.matches(&row_of(&Some(v.clone()))) {
                let k = canonical_key(&ty, v).unwrap();
                assert!(
                    keys.contains(&k),
                    "{name}: {v:?} matches in.({list}) but key {k:?} not in {keys:?}"
                );
            }
        }
    }

    // `is`.
    let sql = format!(
        "select x::{col} is null from unnest($1::text[]) with ordinality v(x, i) order by i"
    );
    let rows = db.query(&sql, &[&values]).await.unwrap();
    for (v, row) in values.iter().zip(&rows) {
        expect(&t, "c=is.null", "c=not.is.null", v, Some(row.get(0)));
    }
    if case.typname == "bool" {
        let sql = "select x::bool is true, x::bool is false, x::bool is unknown
                   from unnest($1::text[]) with ordinality v(x, i) order by i";
        let rows = db.query(sql, &[&values]).await.unwrap();
        for (v, row) in values.iter().zip(&rows) {
            for (k, word) in [(0, "true"), (1, "false"), (2, "unknown")] {
                let f = format!("c=is.{word}");
                let n = format!("c=not.is.{word}");
                expect(&t, &f, &n, v, Some(row.get(k)));
            }
        }
    }

    // like / ilike on text types, against PostgreSQL with PostgREST's `*` → `%`.
    if case.collate.is_empty() {
        return;
    }
    let alphabet = [
        "a", "A", "b", "%", "_", "*", "\\%", "\\_", "\\*", "é", " ", "\\\\",
    ];
    let patterns: Vec<String> = (0..40)
        .map(|_| (0..r.below(4)).map(|_| *r.pick(&alphabet)).collect())
        .collect();
    let pg_patterns: Vec<String> = patterns.iter().map(|p| postgrest_star(p)).collect();
    let sql = format!(
        "select v.i, l.i, v.x::{col}{coll} like l.x, v.x::{col}{coll} ilike l.x
         from unnest($1::text[]) with ordinality v(x, i),
              unnest($2::text[]) with ordinality l(x, i)"
    );
    let rows = db.query(&sql, &[&values, &pg_patterns]).await.unwrap();
    for row in rows {
        let (i, j): (i64, i64) = (row.get(0), row.get(1));
        let (v, p) = (&values[i as usize - 1], &patterns[j as usize - 1]);
        let p = encode(&mut r, p, false);
        for (k, op) in [(2, "like"), (3, "ilike")] {
            expect(
                &t,
                &format!("c={op}.{p}"),
                &format!("c=not.{op}.{p}"),
                v,
                row.get(k),
            );
        }
    }
}

/// PostgREST's like: an unescaped `*` is `%`.
fn postgrest_star(p: &str) -> String {
    let mut out = String::new();
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                out.push('\\');
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            }
            '*' => out.push('%'),
            c => out.push(c),
        }
    }
    out
}

/// One database for all types (creating a database costs a checkpoint); each type
/// runs on its own connection, concurrently.
#[tokio::test]
async fn filters_agree_with_postgres_for_every_type() {
    let db = "filter_oracle";
    drop(cluster().new_db(db).await);
    let all = cases();
    let runs = all
        .iter()
        .enumerate()
        .map(|(i, (name, case))| agree_with_postgres(db, name, case, 0x5eed_0000 + i as u64));
    futures::future::join_all(runs).await;
}

/// A random `or`/`and` tree over two int4 columns and a text column, as
/// (PostgREST item inside a group, SQL), depth at most `depth`.
fn gen_tree(r: &mut Rng, depth: usize) -> (String, String) {
    if depth == 0 || r.chance(40) {
        let (col, lit) = match r.below(3) {
            0 => ("a", format!("{}", r.range(-2, 2))),
            1 => ("b", format!("{}", r.range(-2, 2))),
            _ => ("t", r.pick(&["x", "y", "z"]).to_string()),
        };
        let sql_lit = if col == "t" {
            format!("'{lit}'")
        } else {
            lit.clone()
        };
        let not = r.chance(25);
        let (op, rest, sql) = match r.below(5) {
            0 => ("eq", lit.clone(), format!("{col} = {sql_lit}")),
            1 => ("neq", lit.clone(), format!("{col} <> {sql_lit}")),
            2 => ("gt", lit.clone(), format!("{col} > {sql_lit}")),
            3 => ("is", "null".to_string(), format!("{col} is null")),
            _ => {
                let other = if col == "t" {
                    "'y'".to_string()
                } else {
                    "0".to_string()
                };
                let item = if col == "t" { "y" } else { "0" };
                (
                    "in",
                    format!("({lit},{item})"),
                    format!("{col} in ({sql_lit}, {other})"),
                )
            }
        };
        let pg = if not { format!("not ({sql})") } else { sql };
        let n = if not { "not." } else { "" };
        return (format!("{col}.{n}{op}.{rest}"), format!("({pg})"));
    }
    let or = r.chance(50);
    let neg = r.chance(20);
    let n = 2 + r.below(2) as usize;
    let items: Vec<(String, String)> = (0..n).map(|_| gen_tree(r, depth - 1)).collect();
    let word = if or { "or" } else { "and" };
    let rest = items
        .iter()
        .map(|i| i.0.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let sql = items
        .iter()
        .map(|i| i.1.as_str())
        .collect::<Vec<_>>()
        .join(if or { " or " } else { " and " });
    let n = if neg { "not." } else { "" };
    let sql = if neg {
        format!("(not ({sql}))")
    } else {
        format!("({sql})")
    };
    (format!("{n}{word}({rest})"), sql)
}

/// `or=(…)` / `and=(…)` trees agree with PostgreSQL's three-valued logic, and the
/// routing index key of an OR never misses a matching row.
#[tokio::test]
async fn or_and_trees_agree_with_postgres() {
    let db = "filter_or_oracle";
    drop(cluster().new_db(db).await);
    let c = session(db).await;
    let ty = |oid, name: &str| Arc::new(PgType::new(oid, name, PgType::kind_for_base_name(name)));
    let table = Table {
        id: RelId(1),
        schema: "public".into(),
        name: "t".into(),
        replica_identity: ReplicaIdentity::Full,
        json: Default::default(),
        columns: vec![
            Column {
                name: "a".into(),
                ty: ty(23, "int4"),
                key: false,
            },
            Column {
                name: "b".into(),
                ty: ty(23, "int4"),
                key: false,
            },
            Column {
                name: "t".into(),
                ty: ty(25, "text"),
                key: false,
            },
        ],
    };
    let mut r = Rng(0x00a1_10e5);
    let cell = |v: Option<String>| match v {
        Some(t) => Cell::Text(Bytes::from(t)),
        None => Cell::Null,
    };
    for _ in 0..60 {
        // A top-level tree: `or=(…)`, `and=(…)` or negated, plus maybe a plain condition.
        let (item, sql) = gen_tree(&mut r, 3);
        let (item, sql) =
            if item.starts_with("or(") || item.starts_with("and(") || item.starts_with("not.") {
                (item, sql)
            } else {
                (format!("or({item},a.eq.9)"), format!("({sql} or a = 9)"))
            };
        let top = item.replacen('(', "=(", 1);
        let (filter, sql) = if r.chance(30) {
            (format!("b=gte.0,{top}"), format!("b >= 0 and {sql}"))
        } else {
            (top, sql)
        };
        let bound = bind(&filter, &table);
        let f = Filter::parse(&filter).unwrap();
        assert_eq!(Filter::parse(&f.to_string()).unwrap(), f, "{filter} → {f}");
        let rows: Vec<(Option<i32>, Option<i32>, Option<String>)> = (0..12)
            .map(|_| {
                let n = |r: &mut Rng| (!r.chance(15)).then(|| r.range(-2, 2) as i32);
                let a = n(&mut r);
                let b = n(&mut r);
                let t = (!r.chance(15)).then(|| r.pick(&["x", "y", "z"]).to_string());
                (a, b, t)
            })
            .collect();
        for (a, b, t) in rows {
            let pg: Option<bool> = c
                .query_one(
                    &format!("select {sql} from (select $1::int4 a, $2::int4 b, $3::text t) s"),
                    &[&a, &b, &t],
                )
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .get(0);
            let row: Row = vec![
                cell(a.map(|v| v.to_string())),
                cell(b.map(|v| v.to_string())),
                cell(t.clone()),
            ];
            let got = bound.matches(&row);
            assert_eq!(
                got,
                pg == Some(true),
                "{filter:?} on ({a:?},{b:?},{t:?}): PostgreSQL says {pg:?} for {sql}"
            );
            if got {
                if let Some((col, keys)) = bound.index_key() {
                    let text = row[col].text().unwrap_or_default();
                    let key = canonical_key(&table.columns[col].ty, text);
                    assert!(
                        key.is_some_and(|k| keys.contains(&k)),
                        "{filter:?}: a matching row's key is not among the index keys"
                    );
                }
            }
        }
    }
}
