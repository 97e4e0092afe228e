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
//! | `numeric` | number, digits as PostgreSQL prints them (no rounding); `NaN`, `±Infinity` as strings |
//! | `float4` `float8` | number in plain decimal notation (jsonb stores numbers as numeric, so `1e+100` prints as 1 followed by 100 zeros); `NaN`, `±Infinity` as strings |
//! | `json` `jsonb` | the JSON value itself, embedded |
//! | `date` | `"2024-01-02"`; `infinity` as a string |
//! | `timestamp` | `"2024-01-02T03:04:05.678"` |
//! | `timestamptz` | `"2024-01-02T03:04:05.678+00:00"` (UTC) |
//! | arrays of any element type | JSON arrays (nested for more dimensions; lower bounds dropped), elements by the element type |
//! | composite types | an object of the fields by their types |
//! | everything else (text, uuid, bytea `"\\x…"`, time, interval, inet, money, ranges, enums, geometric, xml, tsvector, …) | the text output as a JSON string |
//!
//! Malformed text never panics: a value that cannot be read as its type is emitted
//! as a JSON string of its text, so nothing is lost.

use std::fmt::Write as _;

use crate::pgoutput::Oid;
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
    Json,
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
            "json" | "jsonb" => TypeKind::Json,
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
            if serde_json::from_str::<&serde_json::value::RawValue>(text).is_ok() {
                out.push_str(text.trim())
            } else {
                write_str(out, text)
            }
        }
        TypeKind::Date | TypeKind::Text => write_str(out, text),
        TypeKind::Timestamp => write_str(out, &iso_timestamp(text, false)),
        TypeKind::TimestampTz => write_str(out, &iso_timestamp(text, true)),
        TypeKind::Array { element, delimiter } => {
            match crate::value::array::parse(text, *delimiter) {
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
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
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

fn is_integer(s: &str) -> bool {
    let d = s.strip_prefix('-').unwrap_or(s);
    !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())
}

/// A plain decimal number as PostgreSQL's numeric prints it: `-?digits(.digits)?`.
fn is_decimal(s: &str) -> bool {
    let d = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = d.split_once('.').unwrap_or((d, ""));
    !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && (frac.is_empty() && !d.ends_with('.') || frac.bytes().all(|b| b.is_ascii_digit()))
}

/// Renders a float's text (`1.5`, `1e+100`, `-2.5e-07`) as the plain decimal that
/// `numeric_in` would print for it; `None` for NaN and infinities (and junk).
pub fn float_to_decimal(text: &str) -> Option<String> {
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
        || exp.abs() > 400
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
fn iso_timestamp(text: &str, with_zone: bool) -> String {
    if text.ends_with("infinity") {
        return text.to_string();
    }
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
    s
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

    /// Parses an array literal; `None` if it is malformed.
    pub fn parse(text: &str, delimiter: u8) -> Option<Node> {
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
            let raw = std::str::from_utf8(&self.s[start..self.pos]).ok()?.trim();
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

    proptest::proptest! {
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
