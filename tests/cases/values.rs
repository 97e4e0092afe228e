//! Column values against the oracle: every value `walcast tail` prints in `record`
//! and `old_record` must equal what PostgreSQL's own `to_jsonb()` gives for the
//! same row (DESIGN.md §4).
//!
//! A "type zoo" table holds a column of nearly every built-in type family, a
//! domain, an enum, a composite, ranges and arrays of many of them. Hundreds of
//! rows come from a seeded generator that favours edge values. Every row is
//! inserted, updated and deleted with `REPLICA IDENTITY FULL`; after each phase
//! the test reads `to_jsonb(t)` of every row back, and then compares each event
//! key by key. Numbers are compared by their exact text (see [`Json`]), never as
//! `f64`, because dropping digits is exactly the bug this test exists to catch.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::support::cluster;
use crate::support::walcast::{self, spawn};

const T: Duration = Duration::from_secs(120);

/// Rows in the zoo; one of them carries a 1 MB text value.
const ROWS: i32 = 300;
const BIG_ROW: i32 = 7;

// ---------------------------------------------------------------------------
// An exact JSON tree: numbers keep their text, objects keep every entry.

/// A JSON value whose numbers are kept as the exact text that was printed.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    /// Entries in document order, duplicates included.
    Obj(Vec<(String, Json)>),
}

/// An object's entries, raw, in order (serde's maps would fold duplicate keys).
struct Entries(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = m.next_entry::<String, Box<RawValue>>()? {
                    v.push(e);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

fn entries(raw: &str) -> Result<Vec<(String, Box<RawValue>)>, String> {
    serde_json::from_str::<Entries>(raw)
        .map(|e| e.0)
        .map_err(|e| format!("{e}: {}", clip(raw)))
}

fn parse(raw: &str) -> Result<Json, String> {
    let t = raw.trim();
    let err = |e: serde_json::Error| format!("{e}: {}", clip(t));
    Ok(match t.as_bytes().first() {
        Some(b'{') => Json::Obj(
            entries(t)?
                .into_iter()
                .map(|(k, v)| Ok((k, parse(v.get())?)))
                .collect::<Result<_, String>>()?,
        ),
        Some(b'[') => Json::Arr(
            serde_json::from_str::<Vec<Box<RawValue>>>(t)
                .map_err(err)?
                .iter()
                .map(|v| parse(v.get()))
                .collect::<Result<_, _>>()?,
        ),
        Some(b'"') => Json::Str(serde_json::from_str(t).map_err(err)?),
        Some(b't') | Some(b'f') => Json::Bool(serde_json::from_str(t).map_err(err)?),
        Some(b'n') => {
            serde_json::from_str::<()>(t).map_err(err)?;
            Json::Null
        }
        _ => {
            // Validate it is a number, keep its text.
            serde_json::from_str::<serde::de::IgnoredAny>(t).map_err(err)?;
            Json::Num(t.to_string())
        }
    })
}

/// Equal as JSON values: objects key by key (order-free, no duplicate keys),
/// arrays element by element, numbers by exact text.
fn same(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Obj(x), Json::Obj(y)) => {
            let mx: BTreeMap<_, _> = x.iter().map(|(k, v)| (k, v)).collect();
            let my: BTreeMap<_, _> = y.iter().map(|(k, v)| (k, v)).collect();
            mx.len() == x.len()
                && my.len() == y.len()
                && mx.len() == my.len()
                && mx
                    .iter()
                    .all(|(k, v)| my.get(k).is_some_and(|w| same(v, w)))
        }
        (Json::Arr(x), Json::Arr(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same(v, w))
        }
        _ => a == b,
    }
}

fn clip(s: &str) -> String {
    if s.len() <= 300 {
        return s.to_string();
    }
    let mut end = 300;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

/// Compares one row image column by column; pushes a line per mismatch.
fn compare_row(what: &str, printed: &str, oracle: &str, mismatches: &mut Vec<(String, String)>) {
    let got = match entries(printed) {
        Ok(e) => e,
        Err(e) => {
            mismatches.push((
                "<row>".into(),
                format!("{what}: walcast row is not JSON: {e}"),
            ));
            return;
        }
    };
    let want = entries(oracle).expect("to_jsonb output is JSON");
    let mut seen = BTreeMap::new();
    for (k, v) in &got {
        if seen.insert(k.clone(), v.get()).is_some() {
            mismatches.push((k.clone(), format!("{what}: column {k} printed twice")));
        }
    }
    for (k, w) in &want {
        let Some(g) = seen.remove(k) else {
            mismatches.push((k.clone(), format!("{what}: column {k} missing")));
            continue;
        };
        let ok = match (parse(g), parse(w.get())) {
            (Ok(a), Ok(b)) => same(&a, &b),
            _ => false,
        };
        if !ok {
            mismatches.push((
                k.clone(),
                format!(
                    "{what}: column {k}: walcast printed {}, to_jsonb gave {}",
                    clip(g),
                    clip(w.get())
                ),
            ));
        }
    }
    for k in seen.keys() {
        mismatches.push((k.clone(), format!("{what}: extra column {k}")));
    }
}

// ---------------------------------------------------------------------------
// The seeded generator.

/// splitmix64: small, seeded, good enough to spread values.
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
        self.next() % n.max(1)
    }
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % ((hi - lo) as u64 + 1)) as i64
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Pieces random strings are made of: the characters array, record, JSON and
/// SQL quoting care about, `NULL` look-alikes, and unicode (accents, combining
/// marks, emoji with joiners, CJK, right-to-left).
const FRAGMENTS: &[&str] = &[
    "a",
    "Z",
    "0",
    "42",
    " ",
    "  ",
    "\"",
    "\\",
    "'",
    ",",
    ";",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    "=",
    "NULL",
    "null",
    "Null",
    "é",
    "e\u{301}",
    "😀",
    "👩\u{200d}👩\u{200d}👧",
    "日本語",
    "עברית",
    "\t",
    "\n",
    "\r",
    "\u{1}",
    "\u{1f}",
    "\u{7f}",
    "\u{feff}",
    "$",
    "::",
    "x y",
];

fn string(r: &mut Rng, max_pieces: u64) -> String {
    (0..r.below(max_pieces + 1))
        .map(|_| r.pick(FRAGMENTS))
        .collect()
}

type Gen = fn(&mut Rng) -> Option<String>;

fn maybe(r: &mut Rng, edges: &[&str], random: impl FnOnce(&mut Rng) -> String) -> String {
    if r.chance(30) {
        r.pick(edges).to_string()
    } else {
        random(r)
    }
}

fn int2(r: &mut Rng) -> String {
    maybe(r, &["-32768", "32767", "0", "-1", "1"], |r| {
        r.range(-32768, 32767).to_string()
    })
}
fn int4(r: &mut Rng) -> String {
    maybe(r, &["-2147483648", "2147483647", "0", "-1"], |r| {
        (r.next() as i32).to_string()
    })
}
fn int8(r: &mut Rng) -> String {
    maybe(
        r,
        &[
            "-9223372036854775808",
            "9223372036854775807",
            "9007199254740993",
            "0",
        ],
        |r| (r.next() as i64 >> r.below(60)).to_string(),
    )
}
fn oid(r: &mut Rng) -> String {
    maybe(r, &["0", "4294967295", "1"], |r| {
        (r.next() as u32).to_string()
    })
}
fn float4(r: &mut Rng) -> String {
    maybe(
        r,
        &[
            "NaN",
            "Infinity",
            "-Infinity",
            "-0",
            "0",
            "3.4028235e38",
            "-3.4028235e38",
            "1e-45",
            "1.1754944e-38",
            "1.1",
            "0.1",
            "16777217",
        ],
        |r| {
            let f = f32::from_bits(r.next() as u32);
            if f.is_finite() {
                format!("{f:e}")
            } else {
                "1.5".into()
            }
        },
    )
}
fn float8(r: &mut Rng) -> String {
    maybe(
        r,
        &[
            "NaN",
            "Infinity",
            "-Infinity",
            "-0",
            "1e300",
            "-1e300",
            "1e-300",
            "5e-324",
            "2.2250738585072014e-308",
            "2.225073858507201e-308",
            "1.7976931348623157e308",
            "0.1",
            "123456789.123456789",
            "1e15",
            "1e16",
            "1e17",
            "1e-4",
            "1e-5",
        ],
        |r| {
            let f = f64::from_bits(r.next());
            if f.is_finite() {
                format!("{f:e}")
            } else {
                "-2.5".into()
            }
        },
    )
}
fn numeric(r: &mut Rng) -> String {
    maybe(
        r,
        &[
            "NaN",
            "Infinity",
            "-Infinity",
            "0",
            "0.000",
            "-0.0",
            "1.50",
            "100",
            "1e-20",
            "1.000000000000000000000000000001",
            "123456789012345678901234567890.123456789012345678901234567890",
            "-99999999999999999999999999999999999999999999999999999999",
            "0.00000000000000000000000000000000000000000000000000000000000000000000001",
        ],
        |r| {
            let int: String = (0..r.range(1, 40))
                .map(|_| char::from(b'0' + r.below(10) as u8))
                .collect();
            let frac: String = (0..r.range(0, 30))
                .map(|_| char::from(b'0' + r.below(10) as u8))
                .collect();
            let sign = if r.chance(40) { "-" } else { "" };
            if frac.is_empty() {
                format!("{sign}{int}")
            } else {
                format!("{sign}{int}.{frac}")
            }
        },
    )
}
fn boolean(r: &mut Rng) -> String {
    r.pick(&["t", "f"]).into()
}
fn text(r: &mut Rng) -> String {
    string(r, 10)
}
fn bpchar3(r: &mut Rng) -> String {
    string(r, 3).chars().take(3).collect()
}
fn bpchar12(r: &mut Rng) -> String {
    string(r, 6).chars().take(12).collect()
}
fn uuid(r: &mut Rng) -> String {
    let h = format!("{:016x}{:016x}", r.next(), r.next());
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}
fn json_string(r: &mut Rng, out: &mut String) {
    out.push('"');
    for _ in 0..r.below(5) {
        match r.below(8) {
            0 => out.push_str("\\u00e9"),
            1 => out.push_str("\\ud83d\\ude00"),
            2 => out.push_str("\\/\\b\\f\\n\\r\\t\\\"\\\\"),
            3 => out.push_str("\\u0041\\u001f"),
            _ => {
                for c in r.pick(FRAGMENTS).chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        c if (c as u32) < 0x20 => {
                            let _ = write!(out, "\\u{:04X}", c as u32);
                        }
                        c => out.push(c),
                    }
                }
            }
        }
    }
    out.push('"');
}
fn json_value(r: &mut Rng, depth: u32, out: &mut String) {
    let ws = |r: &mut Rng, out: &mut String| {
        if r.chance(20) {
            out.push_str(r.pick(&[" ", "\n", "\t", "  "]));
        }
    };
    ws(r, out);
    match if depth >= 3 { r.below(4) } else { r.below(6) } {
        0 => out.push_str(r.pick(&[
            "0",
            "-0",
            "1.0",
            "1e2",
            "1E+2",
            "-1.5e-3",
            "2.50E1",
            "12345678901234567890.123456789",
            "0.000",
            "-0.0",
            "1e-7",
            "3.14159",
            "100e-1",
            "9007199254740993",
        ])),
        1 => json_string(r, out),
        2 => out.push_str(r.pick(&["true", "false", "null"])),
        3 => {
            let _ = write!(out, "{}", r.next() as i32);
        }
        4 => {
            out.push('[');
            for i in 0..r.below(4) {
                if i > 0 {
                    out.push(',');
                }
                json_value(r, depth + 1, out);
            }
            out.push(']');
        }
        _ => {
            out.push('{');
            let keys = ["a", "b", "aa", "", "é", "key with space", "a"];
            for i in 0..r.below(5) {
                if i > 0 {
                    out.push(',');
                }
                ws(r, out);
                if r.chance(70) {
                    let _ = write!(out, "\"{}\"", r.pick(&keys));
                } else {
                    json_string(r, out);
                }
                ws(r, out);
                out.push(':');
                json_value(r, depth + 1, out);
            }
            out.push('}');
        }
    }
    ws(r, out);
}
fn json(r: &mut Rng) -> String {
    let mut s = String::new();
    json_value(r, 0, &mut s);
    s
}
fn bytea(r: &mut Rng) -> String {
    let mut s = "\\x".to_string();
    for _ in 0..r.below(20) {
        let _ = write!(s, "{:02x}", r.below(256));
    }
    s
}
fn year(r: &mut Rng) -> (i64, &'static str) {
    let y = match r.below(4) {
        0 => r.range(1, 99),
        1 => r.range(1000, 2100),
        2 => r.range(1, 9999),
        _ => r.range(10000, 200000),
    };
    let bc = if y < 4000 && r.chance(20) { " BC" } else { "" };
    (y, bc)
}
fn date(r: &mut Rng) -> String {
    maybe(
        r,
        &[
            "infinity",
            "-infinity",
            "4713-01-01 BC",
            "5874897-12-31",
            "0001-01-01",
            "0001-12-31 BC",
            "2000-02-29",
        ],
        |r| {
            let (y, bc) = year(r);
            format!("{y:04}-{:02}-{:02}{bc}", r.range(1, 12), r.range(1, 28))
        },
    )
}
fn clock(r: &mut Rng) -> String {
    let mut s = format!(
        "{:02}:{:02}:{:02}",
        r.range(0, 23),
        r.range(0, 59),
        r.range(0, 59)
    );
    match r.below(3) {
        0 => {}
        1 => {
            let _ = write!(s, ".{:06}", r.range(0, 999_999));
        }
        _ => {
            let _ = write!(s, ".{}", r.range(1, 9));
        }
    }
    s
}
fn offset(r: &mut Rng) -> &'static str {
    r.pick(&["+00", "-05", "+05:30", "+14", "-12:45", "+01:02:03", "Z"])
}
fn time(r: &mut Rng) -> String {
    maybe(r, &["24:00:00", "00:00:00", "23:59:59.999999"], clock)
}
fn timetz(r: &mut Rng) -> String {
    maybe(
        r,
        &["24:00:00+00", "00:00:00-15:59", "12:00:00+01:02:03"],
        |r| format!("{}{}", clock(r), offset(r)),
    )
}
fn timestamp(r: &mut Rng) -> String {
    maybe(
        r,
        &[
            "infinity",
            "-infinity",
            "4713-01-01 00:00:00 BC",
            "294276-12-31 23:59:59.999999",
            "1999-12-31 23:59:59.5",
            "2000-01-01 00:00:00",
            "0001-01-01 00:00:00 BC",
        ],
        |r| {
            let (y, bc) = year(r);
            format!(
                "{y:04}-{:02}-{:02} {}{bc}",
                r.range(1, 12),
                r.range(1, 28),
                clock(r)
            )
        },
    )
}
fn timestamptz(r: &mut Rng) -> String {
    maybe(
        r,
        &[
            "infinity",
            "-infinity",
            "4713-01-01 00:00:00+00 BC",
            "294276-12-30 23:59:59.999999+00",
            "2024-02-29 12:00:00.000001+05:30",
            "0001-01-01 00:00:00+00",
        ],
        |r| {
            let (y, bc) = year(r);
            format!(
                "{y:04}-{:02}-{:02} {}{}{bc}",
                r.range(1, 12),
                r.range(1, 28),
                clock(r),
                offset(r)
            )
        },
    )
}
fn interval(r: &mut Rng) -> String {
    maybe(
        r,
        &[
            "0",
            "-178000000 years",
            "1 day -00:00:01",
            "00:00:00.000001",
            "-1 mons +1 days",
            "P1Y2M3DT4H5M6.5S",
        ],
        |r| {
            format!(
                "{} years {} mons {} days {}{}",
                r.range(-100, 100),
                r.range(-20, 20),
                r.range(-400, 400),
                if r.chance(50) { "-" } else { "" },
                clock(r)
            )
        },
    )
}
fn inet(r: &mut Rng) -> String {
    maybe(
        r,
        &["::1", "2001:db8::1/64", "0.0.0.0/0", "::ffff:1.2.3.4"],
        |r| {
            format!(
                "{}.{}.{}.{}/{}",
                r.below(256),
                r.below(256),
                r.below(256),
                r.below(256),
                r.range(8, 32)
            )
        },
    )
}
fn cidr(r: &mut Rng) -> String {
    maybe(r, &["10.0.0.0/8", "2001:db8::/32", "192.168.1.1/32"], |r| {
        format!("10.{}.{}.0/24", r.below(256), r.below(256))
    })
}
fn mac(r: &mut Rng) -> String {
    (0..6)
        .map(|_| format!("{:02x}", r.below(256)))
        .collect::<Vec<_>>()
        .join(":")
}
fn mac8(r: &mut Rng) -> String {
    (0..8)
        .map(|_| format!("{:02X}", r.below(256)))
        .collect::<Vec<_>>()
        .join("-")
}
fn money(r: &mut Rng) -> String {
    maybe(
        r,
        &["-92233720368547758.08", "92233720368547758.07", "0", "0.01"],
        |r| {
            format!(
                "{}.{:02}",
                r.range(-1_000_000_000, 1_000_000_000),
                r.below(100)
            )
        },
    )
}
fn bits(r: &mut Rng, n: u64) -> String {
    (0..n)
        .map(|_| if r.chance(50) { '1' } else { '0' })
        .collect()
}
fn bit8(r: &mut Rng) -> String {
    bits(r, 8)
}
fn varbit(r: &mut Rng) -> String {
    let n = r.below(21);
    bits(r, n)
}
fn tsvector(r: &mut Rng) -> String {
    let words = [
        "fat",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "rat",
        "'O''Neil'",
        "'a b'",
        "é",
    ];
    (0..r.below(6))
        .map(|i| {
            let w = r.pick(&words);
            match r.below(3) {
                0 => w.to_string(),
                1 => format!("{w}:{}", i + 1),
                _ => format!("{w}:{}{}", i + 1, r.pick(&["A", "B", "C", "D"])),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
fn coord(r: &mut Rng) -> String {
    maybe(r, &["0", "-0", "1e300", "1e-300", "0.1", "-3"], |r| {
        format!("{}.{}", r.range(-1000, 1000), r.below(100))
    })
}
fn pt(r: &mut Rng) -> String {
    format!("({},{})", coord(r), coord(r))
}
fn point(r: &mut Rng) -> String {
    pt(r)
}
fn line(r: &mut Rng) -> String {
    format!("{{{},{},{}}}", r.range(1, 9), coord(r), coord(r))
}
fn lseg(r: &mut Rng) -> String {
    format!("[{},{}]", pt(r), pt(r))
}
fn geobox(r: &mut Rng) -> String {
    format!("{},{}", pt(r), pt(r))
}
fn path(r: &mut Rng) -> String {
    let pts: Vec<String> = (0..r.range(1, 4)).map(|_| pt(r)).collect();
    if r.chance(50) {
        format!("[{}]", pts.join(","))
    } else {
        format!("({})", pts.join(","))
    }
}
fn polygon(r: &mut Rng) -> String {
    let pts: Vec<String> = (0..r.range(1, 4)).map(|_| pt(r)).collect();
    format!("({})", pts.join(","))
}
fn circle(r: &mut Rng) -> String {
    format!("<{},{}.5>", pt(r), r.below(100))
}
fn xml(r: &mut Rng) -> String {
    maybe(
        r,
        &[
            "<a b=\"1\">t&amp;u</a>",
            "just text",
            "<?xml version=\"1.0\"?><r/>",
            "<x>é😀</x><y/>",
            "",
        ],
        |r| {
            let t: String = (0..r.below(4))
                .map(|_| r.pick(&["a", " ", "&lt;", "é", "😀", "\"", "'", "\n"]))
                .collect();
            format!("<r n=\"{}\">{t}</r>", r.below(100))
        },
    )
}
fn mood(r: &mut Rng) -> String {
    r.pick(&[
        "sad",
        "ok",
        "happy",
        "so \"so\", {really}",
        "ünï 😀",
        "NULL",
    ])
    .into()
}
fn int4range(r: &mut Rng) -> String {
    maybe(r, &["empty", "(,5]", "[3,)", "(,)"], |r| {
        let a = r.range(-1000, 1000);
        format!("[{a},{})", a + r.range(1, 100))
    })
}
fn tstzrange(r: &mut Rng) -> String {
    maybe(
        r,
        &[
            "empty",
            "(,\"2020-01-01 00:00:00+00\"]",
            "[-infinity,infinity]",
        ],
        |r| {
            let y = r.range(1990, 2030);
            format!(
                "[\"{y}-01-01 00:00:00+00\",\"{}-06-30 12:00:00.5+02\")",
                y + 1
            )
        },
    )
}
fn int4multirange(r: &mut Rng) -> String {
    maybe(r, &["{}", "{[1,3), [5,7)}"], |r| {
        let a = r.range(-100, 100);
        format!("{{[{a},{}), [{},{}]}}", a + 2, a + 5, a + 9)
    })
}

fn int2vector(r: &mut Rng) -> String {
    let n = r.below(4);
    (0..n).map(|_| int2(r)).collect::<Vec<_>>().join(" ")
}
fn oidvector(r: &mut Rng) -> String {
    let n = r.below(4);
    (0..n).map(|_| oid(r)).collect::<Vec<_>>().join(" ")
}

/// Quotes a value the way `array_in` and `record_in` both read.
fn quote(v: &str) -> String {
    format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
}

/// An array literal: empty, 1-D or 2-D, sometimes with non-default lower bounds,
/// with NULL elements now and then; every element quoted.
fn array(r: &mut Rng, element: Gen, delimiter: char) -> String {
    let d = delimiter.to_string();
    let elem = |r: &mut Rng| match element(r) {
        Some(v) if !r.chance(12) => quote(&v),
        _ => "NULL".to_string(),
    };
    match r.below(6) {
        0 => "{}".into(),
        1 => {
            let (rows, cols) = (r.range(1, 3), r.range(1, 3));
            let body: Vec<String> = (0..rows)
                .map(|_| {
                    let row: Vec<String> = (0..cols).map(|_| elem(r)).collect();
                    format!("{{{}}}", row.join(&d))
                })
                .collect();
            let dims = if r.chance(50) {
                let lo = r.range(-3, 3);
                format!("[{lo}:{}][1:{cols}]=", lo + rows - 1)
            } else {
                String::new()
            };
            format!("{dims}{{{}}}", body.join(&d))
        }
        _ => {
            let n = r.range(1, 5);
            let items: Vec<String> = (0..n).map(|_| elem(r)).collect();
            let dims = if r.chance(20) {
                let lo = r.range(-5, 5);
                format!("[{lo}:{}]=", lo + n - 1)
            } else {
                String::new()
            };
            format!("{dims}{{{}}}", items.join(&d))
        }
    }
}

fn opt(r: &mut Rng, f: fn(&mut Rng) -> String) -> Option<String> {
    if r.chance(8) {
        None
    } else {
        Some(f(r))
    }
}

fn inner(r: &mut Rng) -> String {
    // inner_t: (x float8, t text, b bool)
    let f = [opt(r, float8), opt(r, text), opt(r, boolean)];
    record(&f)
}

fn record(fields: &[Option<String>]) -> String {
    let f: Vec<String> = fields
        .iter()
        .map(|f| f.as_deref().map(quote).unwrap_or_default())
        .collect();
    format!("({})", f.join(","))
}

fn pair(r: &mut Rng) -> String {
    let fields = [
        opt(r, int4),
        opt(r, text),
        opt(r, |r| array(r, |r| opt(r, text), ',')),
        opt(r, timestamptz),
        opt(r, json),
        opt(r, json),
        opt(r, inner),
        opt(r, |r| array(r, |r| opt(r, inner), ',')),
        opt(r, numeric),
        opt(r, bpchar3),
        opt(r, |r| array(r, |r| opt(r, int4), ',')),
        opt(r, date),
    ];
    record(&fields)
}

const TYPES_DDL: &str = "
create extension citext;
create domain dint as int4;
create domain dtext as text;
create domain dintarr as int4[];
create type mood as enum ('sad', 'ok', 'happy', 'so \"so\", {really}', 'ünï 😀', 'NULL');
create type inner_t as (x float8, t text, b bool);
create type pair as (n int4, s text, arr text[], ts timestamptz, j jsonb, js json,
                     inn inner_t, inns inner_t[], num numeric, ch char(3), da dintarr, d date);
";

/// The zoo's columns: name, SQL type, generator.
fn columns() -> Vec<(&'static str, &'static str, Gen)> {
    macro_rules! s {
        ($f:expr) => {
            (|r: &mut Rng| opt(r, $f)) as Gen
        };
    }
    macro_rules! a {
        ($f:expr) => {
            (|r: &mut Rng| opt(r, |r| array(r, |r| opt(r, $f), ','))) as Gen
        };
    }
    vec![
        ("i2", "int2", s!(int2)),
        ("i4", "int4", s!(int4)),
        ("i8", "int8", s!(int8)),
        ("o", "oid", s!(oid)),
        ("f4", "float4", s!(float4)),
        ("f8", "float8", s!(float8)),
        ("num", "numeric", s!(numeric)),
        ("b", "bool", s!(boolean)),
        ("t", "text", s!(text)),
        ("vc", "varchar", s!(text)),
        ("ch", "char(12)", s!(bpchar12)),
        ("nm", "name", s!(text)),
        ("ci", "citext", s!(text)),
        ("u", "uuid", s!(uuid)),
        ("j", "json", s!(json)),
        ("jb", "jsonb", s!(json)),
        ("by", "bytea", s!(bytea)),
        ("d", "date", s!(date)),
        ("tm", "time", s!(time)),
        ("ttz", "timetz", s!(timetz)),
        ("ts", "timestamp", s!(timestamp)),
        ("tstz", "timestamptz", s!(timestamptz)),
        ("iv", "interval", s!(interval)),
        ("ip", "inet", s!(inet)),
        ("cd", "cidr", s!(cidr)),
        ("mac", "macaddr", s!(mac)),
        ("mac8", "macaddr8", s!(mac8)),
        ("m", "money", s!(money)),
        ("bt", "bit(8)", s!(bit8)),
        ("vb", "varbit", s!(varbit)),
        ("tsv", "tsvector", s!(tsvector)),
        ("pt", "point", s!(point)),
        ("ln", "line", s!(line)),
        ("ls", "lseg", s!(lseg)),
        ("bx", "box", s!(geobox)),
        ("pa", "path", s!(path)),
        ("pg", "polygon", s!(polygon)),
        ("cr", "circle", s!(circle)),
        ("x", "xml", s!(xml)),
        ("di", "dint", s!(int4)),
        ("dt", "dtext", s!(text)),
        ("da", "dintarr", a!(int4)),
        ("e", "mood", s!(mood)),
        ("c", "pair", s!(pair)),
        ("r4", "int4range", s!(int4range)),
        ("rtz", "tstzrange", s!(tstzrange)),
        ("mr", "int4multirange", s!(int4multirange)),
        ("ai2", "int2[]", a!(int2)),
        ("ai4", "int4[]", a!(int4)),
        ("ai8", "int8[]", a!(int8)),
        ("aoid", "oid[]", a!(oid)),
        ("af4", "float4[]", a!(float4)),
        ("af8", "float8[]", a!(float8)),
        ("anum", "numeric[]", a!(numeric)),
        ("ab", "bool[]", a!(boolean)),
        ("at", "text[]", a!(text)),
        ("avc", "varchar[]", a!(text)),
        ("ach", "char(3)[]", a!(bpchar3)),
        ("au", "uuid[]", a!(uuid)),
        ("aby", "bytea[]", a!(bytea)),
        ("ad", "date[]", a!(date)),
        ("atm", "time[]", a!(time)),
        ("attz", "timetz[]", a!(timetz)),
        ("ats", "timestamp[]", a!(timestamp)),
        ("atstz", "timestamptz[]", a!(timestamptz)),
        ("aiv", "interval[]", a!(interval)),
        ("ainet", "inet[]", a!(inet)),
        ("avb", "varbit[]", a!(varbit)),
        ("ajs", "json[]", a!(json)),
        ("ajb", "jsonb[]", a!(json)),
        ("apt", "point[]", a!(point)),
        (
            "abx",
            "box[]",
            (|r: &mut Rng| opt(r, |r| array(r, |r| opt(r, geobox), ';'))) as Gen,
        ),
        ("ae", "mood[]", a!(mood)),
        ("ac", "pair[]", a!(pair)),
        ("adi", "dint[]", a!(int4)),
        ("ar", "int4range[]", a!(int4range)),
        ("ax", "xml[]", a!(xml)),
        ("am", "money[]", a!(money)),
        ("aci", "citext[]", a!(text)),
        ("v2", "int2vector", s!(int2vector)),
        ("vo", "oidvector", s!(oidvector)),
    ]
}

/// A 1 MB text value of mixed ASCII and multi-byte characters.
fn big_text() -> String {
    let mut s = String::with_capacity(1 << 20);
    let mut i = 0u32;
    while s.len() < 1 << 20 {
        s.push_str(["abc", "é", "😀", " ", "\"\\", "\n", "日本"][(i % 7) as usize]);
        i += 1;
    }
    s
}

fn row_values(r: &mut Rng, cols: &[(&str, &str, Gen)]) -> Vec<Option<String>> {
    cols.iter().map(|(_, _, g)| g(r)).collect()
}

/// `id → to_jsonb(row)::text` of every row, read in a UTC session (the alias is
/// not `t`: that would name the text column `t`).
async fn snapshot(c: &tokio_postgres::Client) -> BTreeMap<i32, String> {
    c.query("select id, to_jsonb(z)::text from zoo z", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// `n` lines of tail output as text (serde_json's `Value` cannot hold every
/// number walcast rightly prints, such as 1e400 written out in full).
async fn read_lines(p: &mut walcast::Proc, n: usize) -> Vec<String> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let line = tokio::time::timeout(T, p.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("no output within {T:?} after {} lines", v.len()))
            .expect("read stdout")
            .unwrap_or_else(|| panic!("walcast exited early"));
        v.push(line);
    }
    v
}

fn tail(db: &str, extra: &[&str]) -> walcast::Proc {
    let url = cluster().url(db);
    let slot = format!("slot_{db}");
    let publication = format!("pub_{db}");
    let mut args = vec![
        "tail",
        "--database-url",
        &url,
        "--slot",
        &slot,
        "--publication",
        &publication,
    ];
    args.extend_from_slice(extra);
    spawn(&args)
}

async fn setup(db: &str, ddl: &str) -> tokio_postgres::Client {
    let c = cluster().new_db(db).await;
    c.batch_execute(ddl).await.unwrap();
    for sql in [
        format!("create publication pub_{db} for all tables"),
        format!("select pg_create_logical_replication_slot('slot_{db}', 'pgoutput')"),
        "set timezone = 'UTC'".to_string(),
    ] {
        c.batch_execute(&sql).await.unwrap();
    }
    c
}

#[tokio::test]
async fn values_match_to_jsonb_for_a_zoo_of_types() {
    let db = "values_zoo";
    let cols = columns();
    let mut ddl = String::from(TYPES_DDL);
    ddl.push_str("create table zoo (id int4 primary key");
    for (name, ty, _) in &cols {
        let _ = write!(ddl, ", {name} {ty}");
    }
    ddl.push_str(");\nalter table zoo replica identity full;\n");
    let c = setup(db, &ddl).await;

    let names: Vec<&str> = cols.iter().map(|c| c.0).collect();
    let casts: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, (_, ty, _))| format!("${}::text::{ty}", i + 2))
        .collect();
    let insert = c
        .prepare(&format!(
            "insert into zoo (id, {}) values ($1, {})",
            names.join(", "),
            casts.join(", ")
        ))
        .await
        .unwrap();
    let update = c
        .prepare(&format!(
            "update zoo set ({}) = ({}) where id = $1",
            names.join(", "),
            casts.join(", ")
        ))
        .await
        .unwrap();
    let t_col = names.iter().position(|n| *n == "t").unwrap();
    // The same parameters, but `t` keeps its value (an unchanged TOASTed column).
    let keep_t = c
        .prepare(&format!(
            "update zoo set ({}) = ({}) where id = $1 and ${}::text is not null",
            names
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != t_col)
                .map(|(_, n)| *n)
                .collect::<Vec<_>>()
                .join(", "),
            casts
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != t_col)
                .map(|(_, c)| c.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            t_col + 2
        ))
        .await
        .unwrap();

    let mut tail = tail(db, &[]);
    let mut rng = Rng(0x005e_ed0f_2001);
    // Every column is NULL in one row, and the big text is in another.
    for id in 1..=ROWS {
        let mut vals = if id == 2 {
            vec![None; cols.len()]
        } else {
            row_values(&mut rng, &cols)
        };
        if id == BIG_ROW {
            vals[t_col] = Some(big_text());
        }
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&id];
        params.extend(
            vals.iter()
                .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync)),
        );
        if let Err(e) = c.execute(&insert, &params).await {
            panic!("insert row {id}: {e}\nvalues: {vals:?}");
        }
    }
    let v1 = snapshot(&c).await;
    for id in 1..=ROWS {
        let mut vals = row_values(&mut rng, &cols);
        if id == BIG_ROW {
            // Unchanged and TOASTed: filled from the old image (FULL identity).
            vals[t_col] = Some(big_text());
        }
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&id];
        params.extend(
            vals.iter()
                .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync)),
        );
        let stmt = if id == BIG_ROW { &keep_t } else { &update };
        if let Err(e) = c.execute(stmt, &params).await {
            panic!("update row {id}: {e}\nvalues: {vals:?}");
        }
    }
    let v2 = snapshot(&c).await;
    assert_eq!(v1.len(), ROWS as usize);
    assert_eq!(v2.len(), ROWS as usize);
    c.execute("delete from zoo", &[]).await.unwrap();

    let total = 3 * ROWS as usize;
    let lines = read_lines(&mut tail, total).await;
    let mut mismatches = Vec::new();
    let mut images = 0;
    for (n, line) in lines.iter().enumerate() {
        let ev: BTreeMap<String, Box<RawValue>> = entries(line).unwrap().into_iter().collect();
        let kind: String = serde_json::from_str(ev["type"].get()).unwrap();
        let (new, old, phase) = match (n / ROWS as usize, kind.as_str()) {
            (0, "INSERT") => (Some(&v1), None, 0),
            (1, "UPDATE") => (Some(&v2), Some(&v1), 1),
            (2, "DELETE") => (None, Some(&v2), 2),
            other => panic!("event {n} is {other:?}: {}", clip(line)),
        };
        let image = ev
            .get("record")
            .or(ev.get("old_record"))
            .expect("a row image");
        let id: i32 = entries(image.get())
            .unwrap()
            .iter()
            .find(|(k, _)| k == "id")
            .and_then(|(_, v)| v.get().parse().ok())
            .expect("an integer id");
        for (key, want) in [("record", new), ("old_record", old)] {
            match (ev.get(key), want) {
                (Some(got), Some(want)) => {
                    images += 1;
                    let what = format!("{kind} id={id} {key}");
                    compare_row(&what, got.get(), &want[&id], &mut mismatches);
                }
                (None, None) => {}
                (g, _) => panic!(
                    "{kind} (phase {phase}) id={id}: {key} present: {}",
                    g.is_some()
                ),
            }
        }
    }
    eprintln!(
        "values: {} rows × {} columns, {} events, {} row images compared, {} mismatches",
        ROWS,
        cols.len() + 1,
        lines.len(),
        images,
        mismatches.len()
    );
    if !mismatches.is_empty() {
        // The first few per column, then a count per column.
        let mut per_col: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (col, m) in &mismatches {
            per_col.entry(col).or_default().push(m);
        }
        let mut report = String::new();
        for (col, ms) in &per_col {
            let _ = writeln!(report, "== {col}: {} mismatches", ms.len());
            for m in ms.iter().take(3) {
                let _ = writeln!(report, "  {m}");
            }
        }
        panic!("values differ from to_jsonb():\n{report}");
    }
    assert_eq!(images, 4 * ROWS as usize);
    tail.signal(15);
    assert!(tail.wait(T).await.0);
}

#[tokio::test]
async fn big_numbers_as_strings_quotes_int8_and_numeric_only() {
    let db = "values_bignum";
    let c = setup(
        db,
        "create type money_pair as (x int8, y numeric, z int4);
         create domain big_id as int8;
         create table bn (id int8 primary key, n numeric, a int8[], na numeric[], c money_pair,
                          d big_id, i int4, s int2, f float8, j jsonb);",
    )
    .await;
    let mut tail = tail(db, &["--big-numbers-as-strings"]);
    c.batch_execute(
        "insert into bn values (9007199254740993, 12345678901234567890.123400,
            '{1,9223372036854775807,NULL}', '{NaN,1.50,-Infinity}',
            '(-9223372036854775808,0.000,7)', 42, 5, -3, 1.5, '{\"big\": 12345678901234567890}');",
    )
    .await
    .unwrap();
    tail.take_json(1, T).await;
    let ev: BTreeMap<String, Box<RawValue>> = entries(&tail.raw[0]).unwrap().into_iter().collect();
    let got = parse(ev["record"].get()).unwrap();
    let want = parse(
        r#"{"id":"9007199254740993","n":"12345678901234567890.123400",
            "a":["1","9223372036854775807",null],"na":["NaN","1.50","-Infinity"],
            "c":{"x":"-9223372036854775808","y":"0.000","z":7},
            "d":"42","i":5,"s":-3,"f":1.5,"j":{"big":12345678901234567890}}"#,
    )
    .unwrap();
    assert!(same(&got, &want), "got {}", ev["record"].get());
    tail.signal(15);
    assert!(tail.wait(T).await.0);
}
