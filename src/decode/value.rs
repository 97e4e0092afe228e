//! Column values: pgoutput text → JSON exactly as PostgreSQL's `to_jsonb()` gives it.
//!
//! pgoutput sends every value in its type's text output format, printed by the
//! walsender with the settings walcast pins at startup (`DateStyle=ISO`,
//! `IntervalStyle=postgres`, `TimeZone=UTC`, `bytea_output=hex`,
//! `extra_float_digits=1`), so the text does not depend on the server's or the
//! role's configuration. This module renders that text as JSON, following the
//! categories of PostgreSQL's `to_jsonb()` (`jsonb.c`, `jsonb_categorize_type`),
//! judged on the base type of a domain:
//!
//! | type | JSON |
//! |---|---|
//! | `bool` | `true` / `false` |
//! | `int2` `int4` `int8` | number (int8 optionally a string, see [`RenderOptions`]) |
//! | `numeric` | number, digits as PostgreSQL prints them (`1.50` stays `1.50`); `NaN`, `Infinity`, `-Infinity` as strings |
//! | `float4` `float8` | number in plain decimal notation, because jsonb holds numbers as numeric: `1e+300` prints as 1 followed by 300 zeros, `5e-324` as `0.000…5`, `-0` as `0`; `NaN`, `±Infinity` as strings |
//! | `json` | the value as `jsonb` holds it ([`json`]): last of duplicate keys, keys ordered shorter-first, numbers as numeric prints them (`1e2` → `100`), escapes decoded; on one line |
//! | `jsonb` | the value itself, embedded |
//! | `date` | `"2024-01-02"`, `"0044-03-15 BC"`, `"infinity"` (the ISO text) |
//! | `timestamp` | `"2024-01-02T03:04:05.678"`, `"0044-03-15T10:00:00 BC"`, `"infinity"` |
//! | `timestamptz` | `"2024-01-02T03:04:05.678+00:00"` (UTC), `"…+00:00 BC"`, `"-infinity"` |
//! | true arrays of any element type (`_x`, `int2vector`, `oidvector`) | JSON arrays (nested for more dimensions; lower bounds dropped; `{}` → `[]`), elements by the element type |
//! | composite types | an object of the fields (dropped columns left out) by their types |
//! | domains | as their base type (a domain over `int4[]` is an array) |
//! | `oid` and everything else (text, `char(n)` with its padding, uuid, bytea `"\\x…"`, time, timetz, interval, inet, money, bit, ranges, multiranges, enums, geometric, xml, tsvector, citext, …) | the text output as a JSON string |
//!
//! Not handled: a non-built-in type with an explicit cast to `json` (`hstore`'s,
//! for one) — `to_jsonb` uses the cast, walcast prints the text output as a string.
//!
//! Malformed text never panics: a value that cannot be read as its type is emitted
//! as a JSON string of its text, so nothing is lost.

use std::fmt::Write as _;

use crate::decode::pgoutput::Oid;
use std::sync::Arc;

/// How a type's values render as JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TypeKind {
    Bool,
    /// int2, int4.
    Int,
    Int8,
    Float,
    Numeric,
    /// `json`: rewritten as `jsonb` holds it.
    Json,
    /// `jsonb`: its text output is already what `to_jsonb()` gives.
    Jsonb,
    Date,
    Timestamp,
    TimestampTz,
    /// An array; elements render by `element`, separated by `delimiter` in the text form.
    Array {
        element: Arc<PgType>,
        delimiter: u8,
    },
    /// A composite (row) type with its fields.
    Composite {
        fields: Vec<(String, Arc<PgType>)>,
    },
    /// Everything else: a JSON string of the text output.
    Text,
}

/// A PostgreSQL type as walcast needs it: its `pg_type.typname` and how it renders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgType {
    pub oid: Oid,
    /// `pg_type.typname`, e.g. `int4`, `_text`, `timestamptz` (what Supabase sends in `columns`).
    pub name: String,
    pub kind: TypeKind,
}

impl PgType {
    pub fn new(oid: u32, name: &str, kind: TypeKind) -> Self {
        PgType {
            oid: Oid(oid),
            name: name.to_string(),
            kind,
        }
    }

    /// The render kind of a built-in scalar type by its base type's `typname`.
    pub fn kind_for_base_name(name: &str) -> TypeKind {
        match name {
            "bool" => TypeKind::Bool,
            "int2" | "int4" => TypeKind::Int,
            "int8" => TypeKind::Int8,
            "float4" | "float8" => TypeKind::Float,
            "numeric" => TypeKind::Numeric,
            "json" => TypeKind::Json,
            "jsonb" => TypeKind::Jsonb,
            "date" => TypeKind::Date,
            "timestamp" => TypeKind::Timestamp,
            "timestamptz" => TypeKind::TimestampTz,
            _ => TypeKind::Text,
        }
    }
}

/// Options that change how values render.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenderOptions {
    /// Render `int8` and `numeric` as JSON strings, for JavaScript clients that lose
    /// precision above 2^53.
    pub big_numbers_as_strings: bool,
}

/// Appends the JSON for one non-null value given its text form.
pub fn write_json(out: &mut String, ty: &PgType, text: &str, opts: RenderOptions) {
    match &ty.kind {
        TypeKind::Bool => out.push_str(match text {
            "t" | "true" => "true",
            "f" | "false" => "false",
            _ => return write_str(out, text),
        }),
        TypeKind::Int => {
            if is_integer(text) {
                out.push_str(text)
            } else {
                write_str(out, text)
            }
        }
        TypeKind::Int8 => {
            if is_integer(text) && !opts.big_numbers_as_strings {
                out.push_str(text)
            } else {
                write_str(out, text)
            }
        }
        TypeKind::Numeric => {
            if opts.big_numbers_as_strings || !is_decimal(text) {
                write_str(out, text)
            } else {
                out.push_str(text)
            }
        }
        TypeKind::Float => match float_to_decimal(text) {
            Some(d) => out.push_str(&d),
            None => write_str(out, text),
        },
        TypeKind::Json => {
            if !json::write_canonical(out, text) {
                write_str(out, text)
            }
        }
        // `jsonb_out` text is already canonical and on one line: embedded as it is
        // once a syntax check (no tree built) says it is JSON; otherwise as `json`.
        TypeKind::Jsonb => {
            if serde_json::from_str::<&serde_json::value::RawValue>(text).is_ok() {
                out.push_str(text)
            } else if !json::write_canonical(out, text) {
                write_str(out, text)
            }
        }
        TypeKind::Date | TypeKind::Text => write_str(out, text),
        TypeKind::Timestamp => write_iso_timestamp(out, text, false),
        TypeKind::TimestampTz => write_iso_timestamp(out, text, true),
        TypeKind::Array { element, delimiter } => {
            match crate::decode::value::array::parse(text, *delimiter) {
                Some(tree) => write_array(out, &tree, element, opts),
                None => write_str(out, text),
            }
        }
        TypeKind::Composite { fields } => match composite::parse(text) {
            Some(values) if values.len() == fields.len() => {
                out.push('{');
                for (i, ((name, fty), v)) in fields.iter().zip(values.iter()).enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(out, name);
                    out.push(':');
                    match v {
                        None => out.push_str("null"),
                        Some(t) => write_json(out, fty, t, opts),
                    }
                }
                out.push('}');
            }
            _ => write_str(out, text),
        },
    }
}

fn write_array(out: &mut String, node: &array::Node, element: &PgType, opts: RenderOptions) {
    match node {
        array::Node::Null => out.push_str("null"),
        array::Node::Value(v) => write_json(out, element, v, opts),
        array::Node::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_array(out, item, element, opts);
            }
            out.push(']');
        }
    }
}

/// Appends `s` as a JSON string literal.
pub fn write_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    // Most text has nothing to escape: skip it eight bytes at a time.
    let clean = clean_prefix(bytes);
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate().skip(clean) {
        let esc: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0x08 => Some("\\b"),
            0x0c => Some("\\f"),
            0..=0x1f => None,
            _ => continue,
        };
        out.push_str(&s[start..i]);
        match esc {
            Some(e) => out.push_str(e),
            None => {
                let _ = write!(out, "\\u{:04x}", b);
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// How many leading bytes of `b` (a multiple of 8, or all of them) need no
/// escape in a JSON string: none is below 0x20, `"` or `\\`.
fn clean_prefix(b: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte of `x` is zero ⇔ its bit 7 is set here (exact when no byte of
    // `x` has bit 7 set before the subtraction borrows: the `!x` term).
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut i = 0;
    while let Some(chunk) = b.get(i..i + 8) {
        let x = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        // Bytes below 0x20: x - 0x20 borrows into bit 7 for them (and for
        // bytes ≥ 0x80, removed by `!x`).
        let ctrl = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
        if ctrl | has_zero(x ^ (ONES * b'"' as u64)) | has_zero(x ^ (ONES * b'\\' as u64)) != 0 {
            return i;
        }
        i += 8;
    }
    if b[i..].iter().all(|&c| c >= 0x20 && c != b'"' && c != b'\\') {
        b.len()
    } else {
        i
    }
}

fn is_integer(s: &str) -> bool {
    let d = s.strip_prefix('-').unwrap_or(s);
    !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())
}

/// A plain decimal number as PostgreSQL's numeric prints it: `-?digits(.digits)?`.
fn is_decimal(s: &str) -> bool {
    let d = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match d.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (d, None),
    };
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    // A JSON number: digits on both sides of a point, no leading zero.
    digits(int) && (int == "0" || !int.starts_with('0')) && frac.is_none_or(digits)
}

/// Renders a float's text (`1.5`, `1e+100`, `-2.5e-07`) as the plain decimal that
/// `numeric_in` would print for it; `None` for NaN and infinities (and junk).
pub fn float_to_decimal(text: &str) -> Option<String> {
    decimal_from_scientific(text)
}

/// A decimal number in plain or scientific notation, printed as `numeric_out`
/// prints what `numeric_in` reads from it: the digits in full, the scale being
/// the digits after the point minus the exponent (never below zero), no sign on
/// zero. `None` if it is not such a number or its exponent is beyond `numeric`'s
/// range (±1000).
fn decimal_from_scientific(text: &str) -> Option<String> {
    let (neg, body) = match text.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, text),
    };
    let (mant, exp) = match body.find(['e', 'E']) {
        Some(p) => (&body[..p], body[p + 1..].parse::<i64>().ok()?),
        None => (body, 0),
    };
    let (int, frac) = mant.split_once('.').unwrap_or((mant, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || exp.abs() > 1000
    {
        return None;
    }
    // digits × 10^(exp - frac.len())
    let digits: String = format!("{int}{frac}");
    let scale = frac.len() as i64 - exp; // digits after the decimal point
    let mut s = if scale <= 0 {
        let mut s = digits;
        s.extend(std::iter::repeat_n('0', (-scale) as usize));
        s
    } else {
        let scale = scale as usize;
        let padded = if digits.len() <= scale {
            format!("{}{}", "0".repeat(scale - digits.len() + 1), digits)
        } else {
            digits
        };
        let (i, f) = padded.split_at(padded.len() - scale);
        format!("{i}.{f}")
    };
    // Strip leading zeros of the integer part (keep one).
    let int_end = s.find('.').unwrap_or(s.len());
    let lead = s[..int_end].bytes().take_while(|&b| b == b'0').count();
    let lead = lead.min(int_end.saturating_sub(1));
    s.drain(..lead);
    let is_zero = s.bytes().all(|b| b == b'0' || b == b'.');
    if neg && !is_zero {
        s.insert(0, '-');
    }
    Some(s)
}

/// `2024-01-02 03:04:05.678+00` → `2024-01-02T03:04:05.678+00:00` (ISO 8601 as
/// `to_jsonb` prints it). Infinities and BC dates pass through unchanged apart from the `T`.
/// `write_str(out, &iso_timestamp(text, with_zone))` without the two passes
/// and the allocation, for the text PostgreSQL prints for an AD time
/// (`2026-11-30 01:02:03.5+01`: digits and `-:. +` only, so nothing to escape
/// and the only `T` is the one put in); anything else takes that path.
fn write_iso_timestamp(out: &mut String, text: &str, with_zone: bool) {
    if !text
        .bytes()
        .all(|b| b.is_ascii_digit() || b"-:. +".contains(&b))
    {
        return write_str(out, &iso_timestamp(text, with_zone));
    }
    out.reserve(text.len() + 5);
    out.push('"');
    match text.split_once(' ') {
        Some((date, time)) => {
            out.push_str(date);
            out.push('T');
            out.push_str(time);
            if with_zone {
                if let Some(p) = time.rfind(['+', '-']) {
                    if time.len() - p == 3 {
                        out.push_str(":00");
                    }
                }
            }
        }
        None => out.push_str(text),
    }
    out.push('"');
}

fn iso_timestamp(text: &str, with_zone: bool) -> String {
    if text.ends_with("infinity") {
        return text.to_string();
    }
    // `to_jsonb` keeps the era suffix after the zone: `0044-03-15T10:00:00+00:00 BC`.
    let (text, era) = match text.strip_suffix(" BC") {
        Some(t) => (t, " BC"),
        None => (text, ""),
    };
    let mut s = text.replacen(' ', "T", 1);
    if with_zone {
        // The zone is the trailing [+-]HH[:MM[:SS]] after the time.
        if let Some(t) = s.find('T') {
            if let Some(p) = s[t..].rfind(['+', '-']) {
                let zone = &s[t + p..];
                if zone.len() == 3 {
                    s.push_str(":00");
                }
            }
        }
    }
    s.push_str(era);
    s
}

pub mod json {
    //! `json` text → the text `jsonb` holds for it, as `to_jsonb()` gives it.
    //!
    //! A `json` value is stored as it was typed; `to_jsonb()` parses it into
    //! `jsonb` (`jsonb_in`), which changes it in ways a JSON reader can see:
    //! duplicate object keys keep only the last value, keys are ordered (shorter
    //! first, then bytewise), numbers become `numeric` (`1e2` → `100`, `2.50E1` →
    //! `25.0`, `-0` → `0`), `\uXXXX` escapes become the characters they name. This
    //! module does the same and prints the result in `jsonb_out`'s layout
    //! (`{"a": 1, "b": [1, 2]}`), so a value never spans lines. `jsonb` text is
    //! already in that form and comes out unchanged.

    use super::{decimal_from_scientific, write_str};

    /// Deeper documents are not rewritten (the caller falls back to a string).
    const MAX_DEPTH: usize = 1000;

    enum Val {
        Null,
        Bool(bool),
        Num(String),
        Str(String),
        Arr(Vec<Val>),
        Obj(Vec<(String, Val)>),
    }

    /// Appends the canonical form of `text`; `false` (and nothing appended) when
    /// `text` is not JSON that `jsonb` accepts (`\u0000`, a lone surrogate, a
    /// number out of `numeric`'s range) or nests deeper than `MAX_DEPTH`.
    pub fn write_canonical(out: &mut String, text: &str) -> bool {
        let mut p = Parser {
            s: text.as_bytes(),
            pos: 0,
        };
        let Some(v) = p.value(0) else {
            return false;
        };
        p.ws();
        if p.pos != p.s.len() {
            return false;
        }
        write(out, &v);
        true
    }

    fn write(out: &mut String, v: &Val) {
        match v {
            Val::Null => out.push_str("null"),
            Val::Bool(true) => out.push_str("true"),
            Val::Bool(false) => out.push_str("false"),
            Val::Num(n) => out.push_str(n),
            Val::Str(s) => write_str(out, s),
            Val::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write(out, item);
                }
                out.push(']');
            }
            Val::Obj(entries) => {
                out.push('{');
                for (i, (k, item)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_str(out, k);
                    out.push_str(": ");
                    write(out, item);
                }
                out.push('}');
            }
        }
    }

    struct Parser<'a> {
        s: &'a [u8],
        pos: usize,
    }

    impl Parser<'_> {
        fn ws(&mut self) {
            while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.pos) {
                self.pos += 1;
            }
        }

        fn eat(&mut self, b: u8) -> bool {
            if self.s.get(self.pos) == Some(&b) {
                self.pos += 1;
                true
            } else {
                false
            }
        }

        fn value(&mut self, depth: usize) -> Option<Val> {
            if depth > MAX_DEPTH {
                return None;
            }
            self.ws();
            let c = *self.s.get(self.pos)?;
            Some(match c {
                b'{' => {
                    self.pos += 1;
                    let mut entries: Vec<(String, Val)> = Vec::new();
                    self.ws();
                    if !self.eat(b'}') {
                        loop {
                            self.ws();
                            let k = self.string()?;
                            self.ws();
                            if !self.eat(b':') {
                                return None;
                            }
                            entries.push((k, self.value(depth + 1)?));
                            self.ws();
                            if self.eat(b'}') {
                                break;
                            }
                            if !self.eat(b',') {
                                return None;
                            }
                        }
                    }
                    Val::Obj(canonical_entries(entries))
                }
                b'[' => {
                    self.pos += 1;
                    let mut items = Vec::new();
                    self.ws();
                    if !self.eat(b']') {
                        loop {
                            items.push(self.value(depth + 1)?);
                            self.ws();
                            if self.eat(b']') {
                                break;
                            }
                            if !self.eat(b',') {
                                return None;
                            }
                        }
                    }
                    Val::Arr(items)
                }
                b'"' => Val::Str(self.string()?),
                b't' => self.word("true", Val::Bool(true))?,
                b'f' => self.word("false", Val::Bool(false))?,
                b'n' => self.word("null", Val::Null)?,
                _ => Val::Num(self.number()?),
            })
        }

        fn word(&mut self, w: &str, v: Val) -> Option<Val> {
            if self.s[self.pos..].starts_with(w.as_bytes()) {
                self.pos += w.len();
                Some(v)
            } else {
                None
            }
        }

        /// A JSON number, as `numeric` prints it.
        fn number(&mut self) -> Option<String> {
            let start = self.pos;
            self.eat(b'-');
            let digits = |p: &mut Self| {
                let from = p.pos;
                while p.s.get(p.pos).is_some_and(u8::is_ascii_digit) {
                    p.pos += 1;
                }
                p.pos - from
            };
            let int_start = self.pos;
            let n = digits(self);
            if n == 0 || (n > 1 && self.s[int_start] == b'0') {
                return None;
            }
            if self.eat(b'.') && digits(self) == 0 {
                return None;
            }
            if self.eat(b'e') || self.eat(b'E') {
                if !self.eat(b'+') {
                    self.eat(b'-');
                }
                if digits(self) == 0 {
                    return None;
                }
            }
            let text = std::str::from_utf8(&self.s[start..self.pos]).ok()?;
            decimal_from_scientific(text)
        }

        fn hex4(&mut self) -> Option<u32> {
            let h = self.s.get(self.pos..self.pos + 4)?;
            self.pos += 4;
            u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
        }

        fn string(&mut self) -> Option<String> {
            if !self.eat(b'"') {
                return None;
            }
            let mut out = String::new();
            loop {
                // Copy the run of plain bytes up to the next quote or backslash.
                let start = self.pos;
                while let Some(&b) = self.s.get(self.pos) {
                    if b == b'"' || b == b'\\' || b < 0x20 {
                        break;
                    }
                    self.pos += 1;
                }
                out.push_str(std::str::from_utf8(&self.s[start..self.pos]).ok()?);
                match *self.s.get(self.pos)? {
                    b'"' => {
                        self.pos += 1;
                        return Some(out);
                    }
                    b'\\' => {
                        self.pos += 1;
                        let e = *self.s.get(self.pos)?;
                        self.pos += 1;
                        match e {
                            b'"' => out.push('"'),
                            b'\\' => out.push('\\'),
                            b'/' => out.push('/'),
                            b'b' => out.push('\u{8}'),
                            b'f' => out.push('\u{c}'),
                            b'n' => out.push('\n'),
                            b'r' => out.push('\r'),
                            b't' => out.push('\t'),
                            b'u' => {
                                let hi = self.hex4()?;
                                let c = if (0xd800..0xdc00).contains(&hi) {
                                    if !(self.eat(b'\\') && self.eat(b'u')) {
                                        return None;
                                    }
                                    let lo = self.hex4()?;
                                    if !(0xdc00..0xe000).contains(&lo) {
                                        return None;
                                    }
                                    0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                                } else {
                                    hi
                                };
                                // jsonb rejects \u0000; char::from_u32 rejects lone low surrogates.
                                if c == 0 {
                                    return None;
                                }
                                out.push(char::from_u32(c)?);
                            }
                            _ => return None,
                        }
                    }
                    // A raw control character is not allowed in a JSON string.
                    _ => return None,
                }
            }
        }
    }

    /// `jsonb`'s object order: shorter keys first, then bytewise; of duplicate
    /// keys the last one wins.
    fn canonical_entries(mut entries: Vec<(String, Val)>) -> Vec<(String, Val)> {
        // A stable sort keeps duplicates in document order, so the last of a run wins.
        entries.sort_by(|a, b| (a.0.len(), a.0.as_bytes()).cmp(&(b.0.len(), b.0.as_bytes())));
        let mut out: Vec<(String, Val)> = Vec::with_capacity(entries.len());
        for e in entries {
            match out.last_mut() {
                Some(last) if last.0 == e.0 => *last = e,
                _ => out.push(e),
            }
        }
        out
    }
}

pub mod array {
    //! Parser for PostgreSQL's array text format (`array_out`): `{1,2,NULL}`,
    //! `{{1,2},{3,4}}`, `{"a b","c\"d"}`, `[0:1]={1,2}`.

    /// A parsed array element or sub-array.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Node {
        Null,
        Value(String),
        List(Vec<Node>),
    }

    /// Parses an array literal; `None` if it is malformed. With a space as the
    /// delimiter, the brace-less form of `int2vector` and `oidvector` (`1 2 3`) is
    /// read too.
    pub fn parse(text: &str, delimiter: u8) -> Option<Node> {
        if delimiter == b' ' && !text.starts_with(['{', '[']) {
            let items = text.split(' ').filter(|t| !t.is_empty());
            return Some(Node::List(
                items.map(|t| Node::Value(t.to_string())).collect(),
            ));
        }
        let mut s = text.as_bytes();
        // Optional dimension decoration: [lo:hi][lo:hi]=
        if s.first() == Some(&b'[') {
            let eq = s.iter().position(|&b| b == b'=')?;
            s = &s[eq + 1..];
        }
        let mut p = Parser {
            s,
            pos: 0,
            delimiter,
        };
        let node = p.list(0)?;
        if p.pos != p.s.len() {
            return None;
        }
        Some(node)
    }

    struct Parser<'a> {
        s: &'a [u8],
        pos: usize,
        delimiter: u8,
    }

    impl Parser<'_> {
        fn peek(&self) -> Option<u8> {
            self.s.get(self.pos).copied()
        }

        fn list(&mut self, depth: usize) -> Option<Node> {
            if depth > 6 || self.peek()? != b'{' {
                return None;
            }
            self.pos += 1;
            let mut items = Vec::new();
            if self.peek()? == b'}' {
                self.pos += 1;
                return Some(Node::List(items));
            }
            loop {
                match self.peek()? {
                    b'{' => items.push(self.list(depth + 1)?),
                    b'"' => items.push(Node::Value(self.quoted()?)),
                    _ => items.push(self.bare()?),
                }
                match self.peek()? {
                    b'}' => {
                        self.pos += 1;
                        return Some(Node::List(items));
                    }
                    c if c == self.delimiter => self.pos += 1,
                    _ => return None,
                }
            }
        }

        fn quoted(&mut self) -> Option<String> {
            self.pos += 1;
            let mut out = Vec::new();
            loop {
                let c = self.peek()?;
                self.pos += 1;
                match c {
                    b'"' => return String::from_utf8(out).ok(),
                    b'\\' => {
                        out.push(self.peek()?);
                        self.pos += 1;
                    }
                    _ => out.push(c),
                }
            }
        }

        fn bare(&mut self) -> Option<Node> {
            let start = self.pos;
            while let Some(c) = self.peek() {
                if c == self.delimiter || c == b'}' || c == b'{' || c == b'"' {
                    break;
                }
                self.pos += 1;
            }
            // `array_out` quotes any element with ASCII white space (`array_isspace`),
            // so only that is padding; other white space belongs to the value.
            let raw = std::str::from_utf8(&self.s[start..self.pos])
                .ok()?
                .trim_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
            if raw.is_empty() {
                return None;
            }
            if raw.eq_ignore_ascii_case("NULL") {
                Some(Node::Null)
            } else {
                Some(Node::Value(raw.to_string()))
            }
        }
    }
}

pub mod composite {
    //! Parser for PostgreSQL's record text format (`record_out`): `(1,"a b",)`.

    /// Parses a record literal into its fields (`None` = SQL NULL); `None` if malformed.
    pub fn parse(text: &str) -> Option<Vec<Option<String>>> {
        let s = text.as_bytes();
        if s.first() != Some(&b'(') || s.last() != Some(&b')') || s.len() < 2 {
            return None;
        }
        let inner = &s[1..s.len() - 1];
        let mut fields = Vec::new();
        let mut i = 0;
        loop {
            // One field: empty (NULL), quoted, or bare.
            let mut buf = Vec::new();
            let mut quoted_any = false;
            while i < inner.len() && inner[i] != b',' {
                if inner[i] == b'"' {
                    quoted_any = true;
                    i += 1;
                    loop {
                        let c = *inner.get(i)?;
                        i += 1;
                        match c {
                            b'"' if inner.get(i) == Some(&b'"') => {
                                buf.push(b'"');
                                i += 1;
                            }
                            b'"' => break,
                            b'\\' => {
                                buf.push(*inner.get(i)?);
                                i += 1;
                            }
                            _ => buf.push(c),
                        }
                    }
                } else if inner[i] == b'\\' {
                    buf.push(*inner.get(i + 1)?);
                    i += 2;
                } else {
                    buf.push(inner[i]);
                    i += 1;
                }
            }
            fields.push(if buf.is_empty() && !quoted_any {
                None
            } else {
                Some(String::from_utf8(buf).ok()?)
            });
            if i >= inner.len() {
                break;
            }
            i += 1; // the comma
        }
        Some(fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(kind: TypeKind, text: &str) -> String {
        let mut s = String::new();
        write_json(
            &mut s,
            &PgType::new(0, "t", kind),
            text,
            RenderOptions::default(),
        );
        s
    }

    fn arr(name: &str, kind: TypeKind) -> TypeKind {
        TypeKind::Array {
            element: Arc::new(PgType::new(0, name, kind)),
            delimiter: b',',
        }
    }

    /// The escape scan may stop early (a borrow can flag a clean byte after a
    /// dirty one) but never skips a byte that needs escaping.
    #[test]
    fn clean_prefix_never_passes_a_byte_that_needs_escaping() {
        for len in 0..40 {
            for pos in 0..len {
                for bad in [0u8, 0x1f, b'"', b'\\', 0x01, b'\n'] {
                    for fill in [b'a', 0x7f, 0x80, 0xff, 0x20, 0x21, 0x5d, 0x23] {
                        let mut v = vec![fill; len];
                        v[pos] = bad;
                        let n = clean_prefix(&v);
                        assert!(
                            n <= pos,
                            "len {len} pos {pos} bad {bad:#x} fill {fill:#x}: {n}"
                        );
                        assert!(n.is_multiple_of(8) && pos - n < 8);
                    }
                }
            }
            let v: Vec<u8> = (0..len)
                .map(|i| [b'a', 0x80, 0xff, b' ', 0x7f][i % 5])
                .collect();
            assert_eq!(clean_prefix(&v), len);
        }
    }

    #[test]
    fn timestamps_render_as_the_general_path_does() {
        let samples = [
            "2026-11-30 01:02:03.5+01",
            "2026-11-30 01:02:03+05:30",
            "2026-11-30 01:02:03.123456-08",
            "2026-11-30 01:02:03",
            "0044-03-15 10:00:00+00 BC",
            "infinity",
            "-infinity",
            "2026-11-30",
            "1-1",
            " 1+",
            "",
        ];
        for text in samples {
            for tz in [false, true] {
                let mut fast = String::new();
                write_iso_timestamp(&mut fast, text, tz);
                let mut slow = String::new();
                write_str(&mut slow, &iso_timestamp(text, tz));
                assert_eq!(fast, slow, "{text:?} tz {tz}");
            }
        }
        assert_eq!(
            render(TypeKind::TimestampTz, "2026-11-30 01:02:03.5+01"),
            "\"2026-11-30T01:02:03.5+01:00\""
        );
    }

    proptest::proptest! {
        #[test]
        fn timestamp_fast_path_matches_the_general_one(text in "[0-9 :.+-]{0,30}", tz: bool) {
            let mut fast = String::new();
            write_iso_timestamp(&mut fast, &text, tz);
            let mut slow = String::new();
            write_str(&mut slow, &iso_timestamp(&text, tz));
            proptest::prop_assert_eq!(fast, slow);
        }

        #[test]
        fn strings_escape_as_serde_json_does(text in "(?s).{0,40}") {
            let mut out = String::new();
            write_str(&mut out, &text);
            let back: String = serde_json::from_str(&out).unwrap();
            proptest::prop_assert_eq!(back, text);
        }
    }

    #[test]
    fn scalars() {
        assert_eq!(render(TypeKind::Bool, "t"), "true");
        assert_eq!(render(TypeKind::Int, "-42"), "-42");
        assert_eq!(
            render(TypeKind::Numeric, "12345678901234567890.000100"),
            "12345678901234567890.000100"
        );
        assert_eq!(render(TypeKind::Numeric, "NaN"), "\"NaN\"");
        assert_eq!(render(TypeKind::Float, "Infinity"), "\"Infinity\"");
        assert_eq!(render(TypeKind::Json, "{\"a\": [1, 2]}"), "{\"a\": [1, 2]}");
        assert_eq!(
            render(TypeKind::Text, "a\"b\\c\n\u{1}"),
            "\"a\\\"b\\\\c\\n\\u0001\""
        );
        assert_eq!(
            render(TypeKind::TimestampTz, "2024-01-02 03:04:05.678+00"),
            "\"2024-01-02T03:04:05.678+00:00\""
        );
        assert_eq!(
            render(TypeKind::Timestamp, "2024-01-02 03:04:05"),
            "\"2024-01-02T03:04:05\""
        );
    }

    #[test]
    fn only_json_numbers_render_bare() {
        for ok in ["0", "-0.5", "10", "3.25", "-12.000"] {
            assert_eq!(render(TypeKind::Numeric, ok), ok);
        }
        // Text no numeric_out prints, yet it must not become invalid JSON.
        for odd in ["0.", ".5", "01", "-", "1.2.3", "1e5", ""] {
            assert_eq!(
                render(TypeKind::Numeric, odd),
                format!("\"{odd}\""),
                "{odd}"
            );
        }
    }

    #[test]
    fn floats_render_as_plain_decimals() {
        for (t, want) in [
            ("1.5", "1.5"),
            ("1e+100", &format!("1{}", "0".repeat(100))),
            ("1.5e-07", "0.00000015"),
            ("-2.25e+03", "-2250"),
            ("-0", "0"),
            ("0", "0"),
            ("123.456", "123.456"),
            ("1.2345e+20", "123450000000000000000"),
        ] {
            assert_eq!(float_to_decimal(t).as_deref(), Some(want), "{t}");
        }
        assert_eq!(float_to_decimal("NaN"), None);
        assert_eq!(float_to_decimal("-Infinity"), None);
    }

    #[test]
    fn arrays() {
        assert_eq!(
            render(arr("int4", TypeKind::Int), "{1,2,NULL}"),
            "[1,2,null]"
        );
        assert_eq!(render(arr("int4", TypeKind::Int), "{}"), "[]");
        assert_eq!(
            render(arr("int4", TypeKind::Int), "{{1,2},{3,4}}"),
            "[[1,2],[3,4]]"
        );
        assert_eq!(
            render(
                arr("text", TypeKind::Text),
                r#"{a,"b c","d\"e","NULL",NULL}"#
            ),
            r#"["a","b c","d\"e","NULL",null]"#
        );
        assert_eq!(render(arr("int4", TypeKind::Int), "[0:1]={7,8}"), "[7,8]");
        // Malformed: kept as a string rather than lost.
        assert_eq!(render(arr("int4", TypeKind::Int), "{1,2"), "\"{1,2\"");
    }

    #[test]
    fn composites() {
        let kind = TypeKind::Composite {
            fields: vec![
                ("n".into(), Arc::new(PgType::new(23, "int4", TypeKind::Int))),
                (
                    "s".into(),
                    Arc::new(PgType::new(25, "text", TypeKind::Text)),
                ),
                (
                    "x".into(),
                    Arc::new(PgType::new(25, "text", TypeKind::Text)),
                ),
            ],
        };
        assert_eq!(
            render(kind, r#"(1,"a ""q"", b",)"#),
            r#"{"n":1,"s":"a \"q\", b","x":null}"#
        );
    }

    fn render_str(kind: TypeKind, text: &str) -> String {
        render(kind, text)
    }

    #[test]
    fn bc_timestamps_keep_the_era_after_the_zone() {
        assert_eq!(
            render_str(TypeKind::TimestampTz, "0044-03-15 10:00:00.123456+00 BC"),
            "\"0044-03-15T10:00:00.123456+00:00 BC\""
        );
        assert_eq!(
            render_str(TypeKind::Timestamp, "4713-01-01 00:00:00 BC"),
            "\"4713-01-01T00:00:00 BC\""
        );
        assert_eq!(
            render_str(TypeKind::TimestampTz, "2024-01-02 03:04:05+05:30"),
            "\"2024-01-02T03:04:05+05:30\""
        );
        assert_eq!(
            render_str(TypeKind::TimestampTz, "294276-12-31 23:59:59.999999+00"),
            "\"294276-12-31T23:59:59.999999+00:00\""
        );
        assert_eq!(
            render_str(TypeKind::TimestampTz, "-infinity"),
            "\"-infinity\""
        );
        // Dates, time and timetz are their text, as to_jsonb gives them.
        assert_eq!(
            render_str(TypeKind::Date, "0044-03-15 BC"),
            "\"0044-03-15 BC\""
        );
        assert_eq!(
            render_str(TypeKind::Text, "12:34:56.789+05:30"),
            "\"12:34:56.789+05:30\""
        );
    }

    #[test]
    fn jsonb_text_is_embedded_as_it_is_and_anything_else_stays_json() {
        let j = |t: &str| render_str(TypeKind::Jsonb, t);
        let out = r#"{"a": 4, "b": [1, 2.50, null], "aa": "x\"y\n"}"#;
        assert_eq!(j(out), out);
        assert_eq!(j("12.0"), "12.0");
        // Not JSON (a type that only claims the name): rewritten, else a string.
        assert_eq!(j(r#"{"b":1,"a":2,}"#), r#""{\"b\":1,\"a\":2,}""#);
        assert_eq!(j("{'a': 1}"), r#""{'a': 1}""#);
    }

    #[test]
    fn json_is_rewritten_as_jsonb_holds_it() {
        let j = |t: &str| render_str(TypeKind::Json, t);
        // Last duplicate wins; keys shorter first, then bytewise; jsonb_out layout.
        assert_eq!(
            j(r#"{"b":1,"aa":2,"a":3,"a":4}"#),
            r#"{"a": 4, "b": 1, "aa": 2}"#
        );
        // Numbers as numeric prints them.
        assert_eq!(
            j("[1.0, 1e2, 1E+2, 2.50E1, -0, -0.0, 1e-2, 100e-1, 12345678901234567890.5]"),
            "[1.0, 100, 100, 25.0, 0, 0.0, 0.01, 10.0, 12345678901234567890.5]"
        );
        // Escapes decoded, and re-escaped the way jsonb does; never a raw newline.
        assert_eq!(
            j("{\"u\":\"\\u00e9\\ud83d\\ude00\\/\\u001f\",\n\"n\" : \"a\\nb\"}"),
            "{\"n\": \"a\\nb\", \"u\": \"é😀/\\u001f\"}"
        );
        assert_eq!(j(" {} "), "{}");
        assert_eq!(j("[]"), "[]");
        assert_eq!(j("\"x\""), "\"x\"");
        // What jsonb rejects, or is not JSON, stays a string of the text.
        for bad in [
            r#""\u0000""#,
            r#""\ud83d""#,
            r#""\ude00""#,
            "[1,]",
            "01",
            "1.",
            "{\"a\" 1}",
            "\"a\tb\"",
            "1e1001",
            "[1] x",
        ] {
            let mut want = String::new();
            write_str(&mut want, bad);
            assert_eq!(j(bad), want, "{bad}");
        }
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        assert!(j(&deep).starts_with('"'));
    }

    #[test]
    fn extreme_floats_are_numeric_text() {
        let tiny = format!("0.{}5", "0".repeat(323));
        assert_eq!(float_to_decimal("5e-324").as_deref(), Some(tiny.as_str()));
        assert_eq!(
            float_to_decimal("1.7976931348623157e+308").map(|s| s.len()),
            Some(309)
        );
        assert_eq!(float_to_decimal("-1e-300").map(|s| s.len()), Some(303));
    }

    #[test]
    fn vectors_are_arrays() {
        let vector = TypeKind::Array {
            element: Arc::new(PgType::new(21, "int2", TypeKind::Int)),
            delimiter: b' ',
        };
        assert_eq!(render(vector.clone(), "1 -2 3"), "[1,-2,3]");
        assert_eq!(render(vector, ""), "[]");
    }

    #[test]
    fn arrays_with_other_delimiters_and_odd_elements() {
        let boxes = TypeKind::Array {
            element: Arc::new(PgType::new(603, "box", TypeKind::Text)),
            delimiter: b';',
        };
        assert_eq!(
            render(boxes, "{(1,1),(0,0);(2,2),(1,1)}"),
            r#"["(1,1),(0,0)","(2,2),(1,1)"]"#
        );
        // Non-ASCII white space is not padding; lower bounds on two dimensions.
        assert_eq!(
            render(
                arr("text", TypeKind::Text),
                "[-2:-1][1:1]={{\u{a0}x},{\"\"}}"
            ),
            "[[\"\u{a0}x\"],[\"\"]]"
        );
        // Padded char(n) keeps its spaces.
        assert_eq!(
            render(arr("bpchar", TypeKind::Text), r#"{"a  ","   "}"#),
            r#"["a  ","   "]"#
        );
    }

    #[test]
    fn composites_nest_arrays_and_records() {
        let inner = Arc::new(PgType::new(
            1,
            "inner_t",
            TypeKind::Composite {
                fields: vec![
                    (
                        "x".into(),
                        Arc::new(PgType::new(701, "float8", TypeKind::Float)),
                    ),
                    (
                        "t".into(),
                        Arc::new(PgType::new(25, "text", TypeKind::Text)),
                    ),
                ],
            },
        ));
        let kind = TypeKind::Composite {
            fields: vec![
                (
                    "a".into(),
                    Arc::new(PgType::new(1007, "_int4", arr("int4", TypeKind::Int))),
                ),
                ("i".into(), inner.clone()),
                (
                    "is".into(),
                    Arc::new(PgType::new(
                        2,
                        "_inner_t",
                        TypeKind::Array {
                            element: inner,
                            delimiter: b',',
                        },
                    )),
                ),
                (
                    "j".into(),
                    Arc::new(PgType::new(114, "json", TypeKind::Json)),
                ),
            ],
        };
        assert_eq!(
            render(kind, &{
                // record_out quoting: `"` and `\` doubled inside quotes.
                let q = |f: &str| format!("\"{}\"", f.replace('\\', "\\\\").replace('"', "\"\""));
                let inner = format!("(1e+300,{})", q(r#"a "b" \c"#));
                // array_out quoting: `"` and `\` backslash-escaped.
                let aq = |f: &str| format!("\"{}\"", f.replace('\\', "\\\\").replace('"', "\\\""));
                let inners = format!(
                    "{{{},{},NULL}}",
                    aq("(,)"),
                    aq(&format!("(-0,{})", q("\"")))
                );
                format!(
                    "({},{},{},{})",
                    q("{1,NULL}"),
                    q(&inner),
                    q(&inners),
                    q(r#"{"b":1, "a":2}"#)
                )
            }),
            format!(
                r#"{{"a":[1,null],"i":{{"x":1{},"t":"a \"b\" \\c"}},"is":[{{"x":null,"t":null}},{{"x":0,"t":"\""}},null],"j":{{"a": 2, "b": 1}}}}"#,
                "0".repeat(300)
            )
        );
    }

    #[test]
    fn big_numbers_as_strings() {
        let opts = RenderOptions {
            big_numbers_as_strings: true,
        };
        let r = |kind: TypeKind, text: &str| {
            let mut s = String::new();
            write_json(&mut s, &PgType::new(0, "t", kind), text, opts);
            s
        };
        assert_eq!(
            r(TypeKind::Int8, "9223372036854775807"),
            "\"9223372036854775807\""
        );
        assert_eq!(r(TypeKind::Numeric, "1.50"), "\"1.50\"");
        assert_eq!(r(TypeKind::Numeric, "NaN"), "\"NaN\"");
        assert_eq!(r(TypeKind::Int, "7"), "7");
        assert_eq!(r(TypeKind::Float, "1e+20"), "100000000000000000000");
        assert_eq!(r(arr("int8", TypeKind::Int8), "{1,NULL}"), "[\"1\",null]");
    }

    /// Prints an array the way `array_out` does: an element is quoted when it is
    /// empty, spells NULL, or holds a brace, quote, backslash, the delimiter or
    /// ASCII white space; inside quotes `"` and `\` are backslash-escaped.
    fn array_out(node: &array::Node, delimiter: char, out: &mut String) {
        match node {
            array::Node::Null => out.push_str("NULL"),
            array::Node::Value(v) => {
                let quote = v.is_empty()
                    || v.eq_ignore_ascii_case("NULL")
                    || v.chars().any(|c| {
                        matches!(
                            c,
                            '{' | '}' | '"' | '\\' | ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c'
                        ) || c == delimiter
                    });
                if quote {
                    out.push('"');
                    for c in v.chars() {
                        if c == '"' || c == '\\' {
                            out.push('\\');
                        }
                        out.push(c);
                    }
                    out.push('"');
                } else {
                    out.push_str(v);
                }
            }
            array::Node::List(items) => {
                out.push('{');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(delimiter);
                    }
                    array_out(item, delimiter, out);
                }
                out.push('}');
            }
        }
    }

    fn nested_array() -> impl proptest::strategy::Strategy<Value = array::Node> {
        use proptest::prelude::*;
        let leaf = proptest::option::of(prop_oneof![
            "[^\u{0}]{0,6}",
            Just("NULL".to_string()),
            Just("null".to_string()),
            "[ ,;{}\"\\\\\t\u{a0}é😀a]{0,5}",
        ])
        .prop_map(|v| v.map_or(array::Node::Null, array::Node::Value));
        let one = proptest::collection::vec(leaf, 0..5).prop_map(array::Node::List);
        let two = proptest::collection::vec(one.clone(), 1..4).prop_map(array::Node::List);
        let three = proptest::collection::vec(two.clone(), 1..3).prop_map(array::Node::List);
        prop_oneof![one, two, three]
    }

    proptest::proptest! {
        #[test]
        fn array_literals_round_trip(
            tree in nested_array(),
            delimiter in proptest::sample::select(vec![',', ';']),
            lower in proptest::option::of(-5i32..5),
        ) {
            let mut text = String::new();
            if let Some(lo) = lower {
                text.push_str(&format!("[{lo}:{}]=", lo + 1));
            }
            array_out(&tree, delimiter, &mut text);
            let parsed = array::parse(&text, delimiter as u8);
            proptest::prop_assert_eq!(parsed.as_ref(), Some(&tree), "{}", text);
        }

        #[test]
        fn rendering_is_total(s in "\\PC{0,40}|[\\[\\]{}()\",\\\\ 0-9a-z:.+eE-]{0,40}") {
            let text_arr = arr("text", TypeKind::Text);
            let comp = TypeKind::Composite {
                fields: vec![("a".into(), Arc::new(PgType::new(25, "text", text_arr.clone())))],
            };
            for kind in [
                TypeKind::Bool, TypeKind::Int, TypeKind::Int8, TypeKind::Float, TypeKind::Numeric,
                TypeKind::Json, TypeKind::Date, TypeKind::Timestamp, TypeKind::TimestampTz,
                text_arr, comp, TypeKind::Text,
            ] {
                let out = render(kind, &s);
                // Whatever it made of the text, it is one line of JSON.
                proptest::prop_assert!(serde_json::from_str::<&serde_json::value::RawValue>(&out).is_ok(), "{}", out);
                proptest::prop_assert!(!out.contains('\n'));
            }
        }

        #[test]
        fn json_canonical_form_is_stable(s in "[\\[\\]{}\",: 0-9a-eE.+-]{0,30}") {
            let mut once = String::new();
            if json::write_canonical(&mut once, &s) {
                let mut twice = String::new();
                proptest::prop_assert!(json::write_canonical(&mut twice, &once));
                proptest::prop_assert_eq!(&once, &twice);
            }
        }

        #[test]
        fn array_parser_never_panics(s in ".{0,40}") {
            let _ = array::parse(&s, b',');
            let _ = composite::parse(&s);
            let _ = float_to_decimal(&s);
        }

        #[test]
        fn array_round_trips_text_elements(items in proptest::collection::vec(proptest::option::of("[a-z ,\"\\\\{}]{0,6}"), 0..6)) {
            // Quote every element as array_out would, then parse back.
            let body: Vec<String> = items.iter().map(|i| match i {
                None => "NULL".to_string(),
                Some(v) => format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")),
            }).collect();
            let text = format!("{{{}}}", body.join(","));
            let parsed = array::parse(&text, b',').unwrap();
            let want = array::Node::List(items.iter().map(|i| match i {
                None => array::Node::Null,
                Some(v) => array::Node::Value(v.clone()),
            }).collect());
            proptest::prop_assert_eq!(parsed, want);
        }
    }
}
