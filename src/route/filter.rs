//! Row filters: Supabase / PostgREST filter strings, parsed once, bound to a
//! table's column types, and evaluated in memory for every change.
//!
//! Supabase evaluates a subscription's `filter` inside PostgreSQL, one dynamic
//! SQL statement per subscriber and condition (`select $1::type op $2::type`).
//! walcast decodes each change once and evaluates filters in process, so this
//! module has to give the answers PostgreSQL would give. The integration test
//! `tests/cases/filter.rs` checks that against a real server for generated values.
//!
//! # Lifecycle
//!
//! [`Filter::parse`] turns the wire string into an unbound [`Filter`] (a list of
//! [`Condition`]s, ANDed). [`Filter::bind`] resolves column names against a
//! [`Table`] and parses every value as its column's type, so a bad value is
//! reported when the client subscribes, never when a change arrives. The result,
//! a [`BoundFilter`], is immutable, `Send + Sync`, and evaluated with
//! [`BoundFilter::matches`] without allocating. A filter must be bound again
//! after the table's `Relation` changes (columns and types may differ).
//!
//! # Grammar
//!
//! ```text
//! filter     = blank | condition *( "," condition )      ; blank: empty or whitespace only
//! condition  = column "=" [ "not." ] operator "." value
//! column     = name | quoted                              ; surrounding whitespace ignored
//! operator   = "eq" | "neq" | "lt" | "lte" | "gt" | "gte" | "in" | "is"
//!            | "like" | "ilike" | "isdistinct"
//! value      = quoted | raw                               ; raw: taken as is, not trimmed
//!            | "(" [ item *( "," item ) ] ")"             ; only for in
//! item       = [ws] ( quoted | bare ) [ws]                ; bare: trimmed; bare null = SQL NULL
//! quoted     = DQUOTE *( char | "\" char ) DQUOTE         ; PostgREST quoting, \ escapes
//! ```
//!
//! Commas inside double quotes or parentheses do not split conditions; a value
//! containing `,` `(` `)` `"` or `\` must be quoted (`name=eq."Doe, Jane"`). An
//! empty condition (`a=eq.1,,b=eq.2`) is an error. `in` lists hold at most
//! [`MAX_IN_VALUES`] values. `is` takes `null`, `true`, `false` or `unknown`
//! (the last three on `bool` columns only). `match` and `imatch` (POSIX regular
//! expressions), `cs` `cd` `ov` (containment), the range operators and full-text
//! search are recognised and rejected with an error naming what to use instead:
//! walcast has no bounded in-process engine with PostgreSQL's semantics for them.
//!
//! # Logic groups
//!
//! ```text
//! group      = [ "not." ] ( "or" | "and" ) "=(" item *( "," item ) ")"   ; a top-level condition
//! item       = column "." [ "not." ] operator "." value
//!            | [ "not." ] ( "or" | "and" ) "(" item *( "," item ) ")"
//! ```
//!
//! PostgREST's syntax: `or=(status.eq.new,total.gt.100)`, nested as in
//! `or=(a.eq.1,and(b.gt.2,c.lt.3))`. Groups are ANDed with the plain
//! conditions beside them and evaluated with SQL's three-valued AND/OR/NOT.
//! They nest at most [`MAX_GROUP_DEPTH`] deep and a filter holds at most
//! [`MAX_CONDITIONS`] conditions. A group whose every branch is a non-negated
//! `eq`/`in` on one column is used as the routing index key (the union of the
//! branches' keys) when no plain `eq`/`in` condition is.
//!
//! # Comparison rules
//!
//! Values are compared as the column's type, following PostgreSQL's operators:
//!
//! | column type | comparison |
//! |---|---|
//! | `int2` `int4` `int8` | integers; literals out of the type's range are rejected |
//! | `numeric` | exact decimals of any precision (never through `f64`); `NaN` equals `NaN` and sorts above everything, `±Infinity` as expected |
//! | `float4` `float8` | IEEE doubles (float4 literals are rounded to single precision first); `NaN` equals `NaN` and sorts above everything, `-0` equals `0`. Hexadecimal literals (`0x10`, which PostgreSQL's `strtod` takes) are rejected |
//! | `bool` | `false < true`; literals as `boolin` reads them (`t`, `yes`, `on`, `1`, …) |
//! | `date` `timestamp` `timestamptz` | instants; ISO input (`2024-01-02`, `2024-01-02 03:04:05.678`, `T` separator, offsets `Z`, `+02`, `+02:00`, `-0530`), `BC`, `infinity`, `-infinity`, `epoch`. A `timestamptz` literal without an offset is UTC (the walsender runs with `TimeZone=UTC`); a `timestamp` literal's offset is ignored, as PostgreSQL does |
//! | `uuid` | 128-bit values (any case, hyphens optional, braces allowed) |
//! | `text` `varchar` `bpchar` `name` `"char"` | **byte-wise**, which is PostgreSQL's `"C"` collation. Under another collation `lt`/`gt` may disagree with the database for non-ASCII or mixed-case text; `eq`, `neq` and `in` agree for every deterministic collation. `bpchar` ignores trailing spaces, as `bpchareq` does |
//! | everything else (`json`, `jsonb`, arrays, enums, domains over text, `inet`, …) | `eq`, `neq`, `in`, `isdistinct` compare the text output exactly, so a literal must be written as PostgreSQL prints the value; `lt` `lte` `gt` `gte` `like` `ilike` are rejected at bind time |
//!
//! `like` and `ilike` work on the text-like types above; `%` (and `*`, which
//! PostgREST accepts in URLs) matches any run of characters, `_` one character,
//! and `\` escapes the next character (`\*` is a literal star). `ilike` folds
//! ASCII letters only, as PostgreSQL does under the `"C"` collation.
//!
//! NULL follows SQL's three-valued logic: a comparison with a NULL column is
//! unknown, so neither the condition nor its `not.` form matches; only `is.null`,
//! `is.unknown`, `not.is.true`/`not.is.false` and `isdistinct` match NULLs. An `in`
//! list with a bare `null` item behaves like SQL `= ANY('{…,NULL}')`, and an empty
//! list matches nothing, not even NULL (so `not.in.()` matches every row, as
//! `not (NULL = any('{}'))` is true). A column that was
//! not sent ([`Cell::Absent`]: unchanged TOAST, or a non-key column of a key-only
//! old image) matches no condition, negated or not, as in Supabase: walcast does
//! not know its value.
//!
//! References: PostgREST "Horizontal Filtering" (operators, quoting), Supabase
//! Realtime `Subscriptions.parse_subscription_params` (the wire form), and the
//! PostgreSQL manual: "Comparison Functions and Operators", "Pattern Matching"
//! (`LIKE`), "Date/Time Input", and the input functions of each type (`int4in`,
//! `numeric_in`, `float8in`, `boolin`, `uuid_in`, `date_in`, `timestamptz_in`).
//!
//! # Invariants
//!
//! - Parsing, binding and evaluation never panic, on any input.
//! - [`canonical_key`] and [`BoundFilter::index_key`] use the same typed value and
//!   the same equality as [`BoundFilter::matches`]: if an `eq`/`in` condition
//!   holds for a row, the row value's key is among the condition's keys.

use std::cmp::Ordering;
use std::fmt;

use crate::decode::event::{Cell, Row};
use crate::decode::relation::Table;
use crate::decode::value::{PgType, TypeKind};

/// The most values an `in` list may hold. Supabase allows 100; walcast evaluates
/// lists with a binary search, so it allows more, but keeps a bound so one
/// subscription cannot make binding or the routing index arbitrarily large.
pub const MAX_IN_VALUES: usize = 1000;

const OPERATOR_LIST: &str = "eq, neq, lt, lte, gt, gte, in, is, like, ilike, isdistinct";

/// A filter operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    In,
    Is,
    Like,
    Ilike,
    IsDistinct,
}

impl Op {
    /// The PostgREST spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "eq",
            Op::Neq => "neq",
            Op::Lt => "lt",
            Op::Lte => "lte",
            Op::Gt => "gt",
            Op::Gte => "gte",
            Op::In => "in",
            Op::Is => "is",
            Op::Like => "like",
            Op::Ilike => "ilike",
            Op::IsDistinct => "isdistinct",
        }
    }

    fn from_name(s: &str) -> Option<Op> {
        Some(match s {
            "eq" => Op::Eq,
            "neq" => Op::Neq,
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "in" => Op::In,
            "is" => Op::Is,
            "like" => Op::Like,
            "ilike" => Op::Ilike,
            "isdistinct" => Op::IsDistinct,
            _ => return None,
        })
    }

    fn is_ordering(self) -> bool {
        matches!(self, Op::Lt | Op::Lte | Op::Gt | Op::Gte)
    }
}

/// The right-hand side of a condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operand {
    /// One value, as text (unquoted already).
    Value(String),
    /// The items of an `in` list; `None` is a bare `null` (SQL NULL).
    List(Vec<Option<String>>),
}

/// One `column=[not.]op.value` condition, unbound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub column: String,
    pub negated: bool,
    pub op: Op,
    pub operand: Operand,
}

impl Condition {
    /// A condition; `in` takes [`Operand::List`], every other operator [`Operand::Value`]
    /// (checked by [`Filter::bind`]).
    pub fn new(column: impl Into<String>, negated: bool, op: Op, operand: Operand) -> Self {
        Condition {
            column: column.into(),
            negated,
            op,
            operand,
        }
    }
}

/// A parsed, unbound filter: the AND of its conditions and its logic groups
/// (`or=(…)`, `and=(…)`). Empty = matches every row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    conditions: Vec<Condition>,
    groups: Vec<Group>,
}

/// The deepest nesting of `and(…)` / `or(…)` groups a filter may use.
pub const MAX_GROUP_DEPTH: usize = 4;

/// The most conditions one filter may hold, groups included.
pub const MAX_CONDITIONS: usize = 100;

/// A PostgREST logic group: `or=(a.eq.1,and(b.gt.2,c.lt.3))`, optionally `not.`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub negated: bool,
    /// `true`: OR of the items; `false`: AND.
    pub or: bool,
    pub items: Vec<GroupItem>,
}

/// One member of a [`Group`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupItem {
    Condition(Condition),
    Group(Group),
}

/// What is wrong with a filter, phrased for the subscriber who wrote it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error(
        "empty condition in filter {filter:?}: separate conditions with single commas, \
         as in \"id=eq.1,status=eq.open\""
    )]
    EmptyCondition { filter: String },
    #[error(
        "unterminated double quote in filter {filter:?}: close every quoted value, \
         as in name=eq.\"Doe, Jane\", and escape quotes inside it as \\\""
    )]
    UnterminatedQuote { filter: String },
    #[error(
        "unbalanced parentheses in filter {filter:?}: parentheses only enclose in lists, \
         as in id=in.(1,2,3); quote values that contain them, as in name=eq.\"a(b)\""
    )]
    UnbalancedParentheses { filter: String },
    #[error("malformed condition {condition:?}: {reason}")]
    Malformed {
        condition: String,
        reason: &'static str,
    },
    #[error(
        "unknown operator {op:?} in {condition:?}: use one of {OPERATOR_LIST}, \
         optionally prefixed with not."
    )]
    UnknownOperator { op: String, condition: String },
    #[error("operator {op:?} in {condition:?} is not supported by walcast: {hint}")]
    UnsupportedOperator {
        op: String,
        condition: String,
        hint: &'static str,
    },
    #[error(
        "malformed logic group {group:?}: {reason}; write or=(status.eq.new,total.gt.100), \
         nesting with and(…) / or(…), as in or=(a.eq.1,and(b.gt.2,c.lt.3))"
    )]
    MalformedGroup { group: String, reason: &'static str },
    #[error(
        "filter {filter:?} nests and(…)/or(…) deeper than {MAX_GROUP_DEPTH} levels or holds more \
         than {MAX_CONDITIONS} conditions: simplify it, or split it over several bindings"
    )]
    TooComplex { filter: String },
    #[error("too many values in {condition:?}: an in list holds at most {MAX_IN_VALUES} values")]
    TooManyValues { condition: String },
    #[error("unknown column {column:?} in {condition:?}: table {table} has columns {columns}")]
    UnknownColumn {
        column: String,
        condition: String,
        table: String,
        columns: String,
    },
    #[error("value {value:?} in {condition:?} is not a valid {ty}: expected {expected}")]
    InvalidValue {
        value: String,
        condition: String,
        ty: String,
        expected: String,
    },
    #[error("is in {condition:?} takes null, true, false or unknown, not {value:?}")]
    InvalidIsValue { value: String, condition: String },
    #[error("{op} cannot be used in {condition:?} on column {column:?} of type {ty}: {hint}")]
    NotApplicable {
        op: &'static str,
        condition: String,
        column: String,
        ty: String,
        hint: String,
    },
}

// ---------------------------------------------------------------------------
// Parsing

impl Filter {
    /// Parses Supabase's filter string (see the module doc for the grammar).
    pub fn parse(s: &str) -> Result<Filter, FilterError> {
        if s.trim().is_empty() {
            return Ok(Filter::default());
        }
        let mut conditions = Vec::new();
        let mut groups = Vec::new();
        let mut count = 0;
        for seg in split_top_level(s)? {
            if seg.trim().is_empty() {
                return Err(FilterError::EmptyCondition {
                    filter: s.to_string(),
                });
            }
            match top_level_group(seg) {
                Some((negated, or, inner)) => {
                    groups.push(parse_group(s, seg, negated, or, inner, 1, &mut count)?)
                }
                None => {
                    count += 1;
                    conditions.push(parse_condition(seg)?)
                }
            }
            if count > MAX_CONDITIONS {
                return Err(FilterError::TooComplex {
                    filter: s.to_string(),
                });
            }
        }
        Ok(Filter { conditions, groups })
    }

    /// A filter of the given conditions (ANDed).
    pub fn from_conditions(conditions: Vec<Condition>) -> Filter {
        Filter {
            conditions,
            groups: Vec::new(),
        }
    }

    /// The logic groups (`or=(…)`, `and=(…)`), ANDed with the conditions.
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// `column = value`, for filters built in code (e.g. from JWT claims): no
    /// quoting needed, the value is taken literally.
    pub fn eq(column: impl Into<String>, value: impl Into<String>) -> Filter {
        Filter::from_conditions(vec![Condition::new(
            column,
            false,
            Op::Eq,
            Operand::Value(value.into()),
        )])
    }

    /// Both filters' conditions (AND).
    pub fn and(mut self, other: Filter) -> Filter {
        self.conditions.extend(other.conditions);
        self.groups.extend(other.groups);
        self
    }

    pub fn conditions(&self) -> &[Condition] {
        &self.conditions
    }

    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty() && self.groups.is_empty()
    }
}

/// `or=(…)`, `and=(…)`, `not.or=(…)`, `not.and=(…)` at the top level: (negated,
/// or, the text inside the parentheses). A column named `or` compared with an
/// operator (`or=eq.1`) is not a group.
fn top_level_group(seg: &str) -> Option<(bool, bool, &str)> {
    let t = seg.trim_matches(is_pg_space);
    let (negated, t) = match t.strip_prefix("not.") {
        Some(r) => (true, r),
        None => (false, t),
    };
    let (or, rest) = if let Some(r) = t.strip_prefix("or=") {
        (true, r)
    } else if let Some(r) = t.strip_prefix("and=") {
        (false, r)
    } else {
        return None;
    };
    let inner = rest.trim_start_matches(is_pg_space).strip_prefix('(')?;
    Some((negated, or, inner.strip_suffix(')').unwrap_or(inner)))
}

/// Parses the items of a group (the text inside its parentheses).
fn parse_group(
    filter: &str,
    seg: &str,
    negated: bool,
    or: bool,
    inner: &str,
    depth: usize,
    count: &mut usize,
) -> Result<Group, FilterError> {
    let malformed = |reason| FilterError::MalformedGroup {
        group: seg.trim().to_string(),
        reason,
    };
    if depth > MAX_GROUP_DEPTH {
        return Err(FilterError::TooComplex {
            filter: filter.to_string(),
        });
    }
    if !seg.trim_end_matches(is_pg_space).ends_with(')') {
        return Err(malformed("the group's parentheses are not closed"));
    }
    if inner.trim_matches(is_pg_space).is_empty() {
        return Err(malformed("the group is empty"));
    }
    let mut items = Vec::new();
    for item in split_top_level(inner)? {
        let t = item.trim_matches(is_pg_space);
        if t.is_empty() {
            return Err(malformed("an empty item between commas"));
        }
        let (neg, rest) = match t.strip_prefix("not.") {
            Some(r) if r.starts_with("or(") || r.starts_with("and(") => (true, r),
            _ => (false, t),
        };
        let nested = if let Some(r) = rest.strip_prefix("or(") {
            Some((true, r))
        } else {
            rest.strip_prefix("and(").map(|r| (false, r))
        };
        if let Some((sub_or, r)) = nested {
            let body = r
                .strip_suffix(')')
                .ok_or(malformed("a nested group's parentheses are not closed"))?;
            items.push(GroupItem::Group(parse_group(
                filter,
                t,
                neg,
                sub_or,
                body,
                depth + 1,
                count,
            )?));
            continue;
        }
        *count += 1;
        if *count > MAX_CONDITIONS {
            return Err(FilterError::TooComplex {
                filter: filter.to_string(),
            });
        }
        // `column.op.value`: the column ends at the first dot outside quotes.
        let (column, rest) = if t.starts_with('"') {
            let (col, after) =
                read_quoted(t).ok_or(malformed("a quoted column name is not closed"))?;
            let rest = after
                .strip_prefix('.')
                .ok_or(malformed("expected a dot after the column name"))?;
            (col, rest)
        } else {
            let (col, rest) = t.split_once('.').ok_or(malformed(
                "a condition inside a group is column.op.value, with dots",
            ))?;
            (col.trim_matches(is_pg_space).to_string(), rest)
        };
        if column.is_empty() {
            return Err(malformed("a condition has no column name"));
        }
        if column.contains('=') {
            return Err(malformed(
                "a condition inside a group is column.op.value, with dots, not =",
            ));
        }
        items.push(GroupItem::Condition(parse_op_value(t, column, rest)?));
    }
    Ok(Group { negated, or, items })
}

fn is_pg_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// Splits at commas outside double quotes and parentheses.
fn split_top_level(s: &str) -> Result<Vec<&str>, FilterError> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut in_quote = false;
    let mut escaped = false;
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        if in_quote {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_quote = false;
            }
            continue;
        }
        match b {
            b'"' => in_quote = true,
            b'(' => depth += 1,
            b')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| FilterError::UnbalancedParentheses {
                        filter: s.to_string(),
                    })?
            }
            b',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if in_quote {
        return Err(FilterError::UnterminatedQuote {
            filter: s.to_string(),
        });
    }
    if depth != 0 {
        return Err(FilterError::UnbalancedParentheses {
            filter: s.to_string(),
        });
    }
    parts.push(&s[start..]);
    Ok(parts)
}

/// Reads a quoted string starting at `s[0] == '"'`; returns the unescaped text
/// and the rest after the closing quote.
fn read_quoted(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    if chars.next()?.1 != '"' {
        return None;
    }
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => out.push(chars.next()?.1),
            _ => out.push(c),
        }
    }
    None
}

fn parse_condition(seg: &str) -> Result<Condition, FilterError> {
    let malformed = |reason| FilterError::Malformed {
        condition: seg.to_string(),
        reason,
    };
    let lead = seg.trim_start_matches(is_pg_space);
    let (column, rest) = if lead.starts_with('"') {
        let (col, after) =
            read_quoted(lead).ok_or(malformed("the quoted column name is not closed"))?;
        let after = after.trim_start_matches(is_pg_space);
        let rest = after.strip_prefix('=').ok_or(malformed(
            "expected = after the column name; write column=op.value, as in \"id=eq.1\"",
        ))?;
        (col, rest)
    } else {
        let (col, rest) = lead.split_once('=').ok_or(malformed(
            "no = after the column name; write column=op.value, as in \"id=eq.1\"",
        ))?;
        (col.trim_matches(is_pg_space).to_string(), rest)
    };
    if column.is_empty() {
        return Err(malformed(
            "no column name before =; write column=op.value, as in \"id=eq.1\"",
        ));
    }
    parse_op_value(seg, column, rest)
}

/// The `[not.]op.value` part of a condition on `column`; `seg` names it in errors.
fn parse_op_value(seg: &str, column: String, rest: &str) -> Result<Condition, FilterError> {
    let malformed = |reason| FilterError::Malformed {
        condition: seg.to_string(),
        reason,
    };
    let rest = rest.trim_start_matches(is_pg_space);
    let (negated, rest) = match rest.strip_prefix("not.") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let Some((op_name, raw)) = rest.split_once('.') else {
        if Op::from_name(rest).is_some() || unsupported_hint(rest).is_some() {
            return Err(malformed(
                "the operator needs a value after a dot, as in \"id=eq.1\"",
            ));
        }
        if rest.is_empty() {
            return Err(malformed(
                "no operator after =; write column=op.value, as in \"id=eq.1\"",
            ));
        }
        return Err(FilterError::UnknownOperator {
            op: rest.to_string(),
            condition: seg.to_string(),
        });
    };
    let op = match Op::from_name(op_name) {
        Some(op) => op,
        None if unsupported_hint(op_name).is_some() => {
            return Err(FilterError::UnsupportedOperator {
                op: op_name.to_string(),
                condition: seg.to_string(),
                hint: unsupported_hint(op_name).unwrap_or_default(),
            })
        }
        None => {
            return Err(FilterError::UnknownOperator {
                op: op_name.to_string(),
                condition: seg.to_string(),
            })
        }
    };
    let operand = if op == Op::In {
        Operand::List(parse_list(seg, raw)?)
    } else if raw.starts_with('"') {
        let (v, after) = read_quoted(raw).ok_or(malformed("the quoted value is not closed"))?;
        if !after.is_empty() {
            return Err(malformed(
                "text after the closing quote; quote the whole value, as in name=eq.\"a,b\"",
            ));
        }
        Operand::Value(v)
    } else {
        Operand::Value(raw.to_string())
    };
    if op == Op::Is {
        if let Operand::Value(v) = &operand {
            is_keyword(v).ok_or_else(|| FilterError::InvalidIsValue {
                value: v.clone(),
                condition: seg.to_string(),
            })?;
        }
    }
    Ok(Condition {
        column,
        negated,
        op,
        operand,
    })
}

/// PostgREST operators walcast recognises and refuses, with what to use instead.
fn unsupported_hint(op: &str) -> Option<&'static str> {
    Some(match op {
        "match" | "imatch" => {
            "regular expressions are not evaluated (PostgreSQL's POSIX dialect has no \
             bounded in-process equivalent); use like or ilike, or or=(…) of eq/like"
        }
        "cs" | "cd" | "ov" => {
            "array and jsonb containment is not evaluated; compare the whole value with eq \
             (as PostgreSQL prints it), or keep the tested element in its own column"
        }
        "sl" | "sr" | "nxl" | "nxr" | "adj" => {
            "range operators are not evaluated; compare the range's bounds kept in their own \
             columns with lt/gt"
        }
        "fts" | "plfts" | "phfts" | "wfts" => {
            "full-text search is not evaluated; use like or ilike"
        }
        _ => return None,
    })
}

/// Parses `(a, "b,c", null)`.
fn parse_list(seg: &str, raw: &str) -> Result<Vec<Option<String>>, FilterError> {
    let malformed = |reason| FilterError::Malformed {
        condition: seg.to_string(),
        reason,
    };
    let inner = raw
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or(malformed(
            "in needs a parenthesised list, as in id=in.(1,2,3) or name=in.(\"a,b\",c)",
        ))?;
    let mut items = Vec::new();
    if inner.trim_matches(is_pg_space).is_empty() {
        return Ok(items);
    }
    let mut rest = inner;
    loop {
        let item = rest.trim_start_matches(is_pg_space);
        let (value, after) = if item.starts_with('"') {
            let (v, after) =
                read_quoted(item).ok_or(malformed("a quoted in-list value is not closed"))?;
            (Some(v), after.trim_start_matches(is_pg_space))
        } else {
            let end = item.find([',', '(', ')', '"']).unwrap_or(item.len());
            let bare = item[..end].trim_end_matches(is_pg_space);
            if item[end..].starts_with(['(', ')', '"']) {
                return Err(malformed(
                    "in-list values are separated by commas; quote values that contain \
                     parentheses or quotes, as in name=in.(\"a(b)\",c)",
                ));
            }
            if bare.is_empty() {
                return Err(malformed(
                    "empty value in the in list; quote an empty string as \"\"",
                ));
            }
            let v = if bare.eq_ignore_ascii_case("null") {
                None
            } else {
                Some(bare.to_string())
            };
            (v, &item[end..])
        };
        items.push(value);
        if items.len() > MAX_IN_VALUES {
            return Err(FilterError::TooManyValues {
                condition: seg.to_string(),
            });
        }
        if after.is_empty() {
            return Ok(items);
        }
        rest = after.strip_prefix(',').ok_or(malformed(
            "in-list values are separated by commas; quote values that contain \
             parentheses or quotes, as in name=in.(\"a(b)\",c)",
        ))?;
    }
}

/// The words `is` accepts.
enum IsKeyword {
    Null,
    True,
    False,
    Unknown,
}

fn is_keyword(v: &str) -> Option<IsKeyword> {
    Some(match v.to_ascii_lowercase().as_str() {
        "null" => IsKeyword::Null,
        "true" => IsKeyword::True,
        "false" => IsKeyword::False,
        "unknown" => IsKeyword::Unknown,
        _ => return None,
    })
}

fn needs_quotes(v: &str, in_list: bool) -> bool {
    v.contains([',', '(', ')', '"', '\\'])
        || (in_list
            && (v.is_empty()
                || v.eq_ignore_ascii_case("null")
                || v.starts_with(is_pg_space)
                || v.ends_with(is_pg_space)))
}

fn write_quoted(f: &mut fmt::Formatter<'_>, v: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in v.chars() {
        if c == '"' || c == '\\' {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

impl fmt::Display for Condition {
    /// The PostgREST form, quoted where needed; [`Filter::parse`] reads it back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, "=")
    }
}

impl Condition {
    /// Written with `sep` after the column: `=` at the top level, `.` in a group.
    fn write(&self, f: &mut fmt::Formatter<'_>, sep: &str) -> fmt::Result {
        let col = &self.column;
        if col.contains(['=', ',', '(', ')', '"', '\\', '.'])
            || col.starts_with(is_pg_space)
            || col.ends_with(is_pg_space)
            || matches!(col.as_str(), "or" | "and" | "not")
        {
            write_quoted(f, col)?;
        } else {
            f.write_str(col)?;
        }
        f.write_str(sep)?;
        if self.negated {
            f.write_str("not.")?;
        }
        f.write_str(self.op.as_str())?;
        f.write_str(".")?;
        match &self.operand {
            Operand::Value(v) if needs_quotes(v, false) => write_quoted(f, v),
            Operand::Value(v) => f.write_str(v),
            Operand::List(items) => {
                f.write_str("(")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    match item {
                        None => f.write_str("null")?,
                        Some(v) if needs_quotes(v, true) => write_quoted(f, v)?,
                        Some(v) => f.write_str(v)?,
                    }
                }
                f.write_str(")")
            }
        }
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.conditions.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{c}")?;
        }
        for (i, g) in self.groups.iter().enumerate() {
            if i > 0 || !self.conditions.is_empty() {
                f.write_str(",")?;
            }
            g.write(f, true)?;
        }
        Ok(())
    }
}

impl Group {
    fn write(&self, f: &mut fmt::Formatter<'_>, top: bool) -> fmt::Result {
        if self.negated {
            f.write_str("not.")?;
        }
        f.write_str(if self.or { "or" } else { "and" })?;
        f.write_str(if top { "=(" } else { "(" })?;
        for (i, item) in self.items.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match item {
                GroupItem::Condition(c) => c.write(f, ".")?,
                GroupItem::Group(g) => g.write(f, false)?,
            }
        }
        f.write_str(")")
    }
}

// ---------------------------------------------------------------------------
// Types and typed values

/// How a column's values compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Bool,
    /// Integers of this many bits.
    Int(u8),
    Numeric,
    /// `single`: float4 (literals rounded to single precision).
    Float {
        single: bool,
    },
    Date,
    Timestamp,
    TimestampTz,
    Uuid,
    /// Byte-wise text; `padded`: bpchar (trailing spaces ignored).
    Text {
        padded: bool,
    },
    /// Exact text equality only.
    Opaque,
}

impl Class {
    fn of(ty: &PgType) -> Class {
        match &ty.kind {
            TypeKind::Bool => Class::Bool,
            TypeKind::Int if ty.name == "int2" => Class::Int(16),
            TypeKind::Int => Class::Int(32),
            TypeKind::Int8 => Class::Int(64),
            TypeKind::Float => Class::Float {
                single: ty.name == "float4",
            },
            TypeKind::Numeric => Class::Numeric,
            TypeKind::Date => Class::Date,
            TypeKind::Timestamp => Class::Timestamp,
            TypeKind::TimestampTz => Class::TimestampTz,
            TypeKind::Json
            | TypeKind::Jsonb
            | TypeKind::Array { .. }
            | TypeKind::Composite { .. } => Class::Opaque,
            TypeKind::Text => match ty.name.as_str() {
                "uuid" => Class::Uuid,
                "text" | "varchar" | "name" | "char" => Class::Text { padded: false },
                "bpchar" => Class::Text { padded: true },
                _ => Class::Opaque,
            },
        }
    }

    fn ordered(self) -> bool {
        self != Class::Opaque
    }

    fn keyed(self) -> bool {
        self != Class::Opaque
    }

    /// What a literal of this class looks like, for error messages.
    fn expected(self) -> String {
        match self {
            Class::Bool => "true or false (also t, f, yes, no, on, off, 1, 0)".into(),
            Class::Int(bits) => {
                let (lo, hi) = int_range(bits);
                format!("an integer between {lo} and {hi}")
            }
            Class::Numeric => {
                "a decimal number such as 12.50 or 1e-3, NaN, Infinity or -Infinity".into()
            }
            Class::Float { .. } => {
                "a number in range such as 1.5 or 2e-8, NaN, Infinity or -Infinity".into()
            }
            Class::Date => {
                "a date such as 2024-01-31 (optionally BC), infinity or -infinity".into()
            }
            Class::Timestamp | Class::TimestampTz => {
                "a timestamp such as 2024-01-31 12:00:00, 2024-01-31T12:00:00.5+02:00 or \
                 2024-01-31T10:00:00Z, infinity or -infinity"
                    .into()
            }
            Class::Uuid => "a UUID such as 123e4567-e89b-12d3-a456-426614174000".into(),
            Class::Text { .. } | Class::Opaque => "text".into(),
        }
    }
}

fn int_range(bits: u8) -> (i64, i64) {
    match bits {
        16 => (i16::MIN.into(), i16::MAX.into()),
        32 => (i32::MIN.into(), i32::MAX.into()),
        _ => (i64::MIN, i64::MAX),
    }
}

/// A value parsed as its column's class.
#[derive(Clone, Debug)]
enum Value {
    Bool(bool),
    Int(i64),
    Numeric(Decimal),
    Float(f64),
    /// Days (date) or microseconds (timestamps) since 1970-01-01 (UTC for
    /// timestamptz); `i128::MIN`/`MAX` are `-infinity`/`infinity`.
    Instant(i128),
    Uuid(u128),
    Text(String),
}

const NEG_INFINITY: i128 = i128::MIN;
const POS_INFINITY: i128 = i128::MAX;

impl Value {
    fn parse(class: Class, text: &str) -> Option<Value> {
        Some(match class {
            Class::Bool => Value::Bool(parse_bool(text)?),
            Class::Int(bits) => Value::Int(parse_int(text, bits)?),
            Class::Numeric => Value::Numeric(Decimal::parse(text)?),
            Class::Float { single } => Value::Float(parse_float(text, single)?),
            Class::Date | Class::Timestamp | Class::TimestampTz => {
                Value::Instant(parse_datetime(text, class)?)
            }
            Class::Uuid => Value::Uuid(parse_uuid(text)?),
            Class::Text { padded: true } => Value::Text(text.trim_end_matches(' ').to_string()),
            Class::Text { padded: false } | Class::Opaque => Value::Text(text.to_string()),
        })
    }

    /// PostgreSQL's order for two values of one class.
    fn cmp(&self, other: &Value) -> Option<Ordering> {
        Some(match (self, other) {
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            (Value::Numeric(a), Value::Numeric(b)) => a.cmp(b),
            (Value::Float(a), Value::Float(b)) => float_cmp(*a, *b),
            (Value::Instant(a), Value::Instant(b)) => a.cmp(b),
            (Value::Uuid(a), Value::Uuid(b)) => a.cmp(b),
            (Value::Text(a), Value::Text(b)) => a.as_bytes().cmp(b.as_bytes()),
            _ => return None,
        })
    }

    /// The canonical key: equal exactly when [`Value::cmp`] says `Equal`.
    fn key(&self) -> String {
        match self {
            Value::Bool(b) => if *b { "t" } else { "f" }.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Numeric(d) => d.key(),
            Value::Float(f) if f.is_nan() => "NaN".to_string(),
            Value::Float(f) if *f == 0.0 => "0".to_string(),
            Value::Float(f) => format!("{f:e}"),
            Value::Instant(NEG_INFINITY) => "-infinity".to_string(),
            Value::Instant(POS_INFINITY) => "infinity".to_string(),
            Value::Instant(t) => t.to_string(),
            Value::Uuid(u) => format_uuid(*u),
            Value::Text(t) => t.clone(),
        }
    }
}

/// Canonical key of a text value of the given type: equal for values PostgreSQL
/// considers equal under `=` (integers `007` → `7`, numeric `1.50` → `1.5`, bool
/// `t`/`f`, uuid lower-case hyphenated, text as is (bpchar without trailing
/// spaces), floats by value, dates as days and timestamps as microseconds since
/// 1970-01-01 UTC). `None` for types compared as opaque text (json, arrays,
/// enums, …) and for text that is not a valid value of the type: the hub does not
/// index on those.
pub fn canonical_key(ty: &PgType, text: &str) -> Option<String> {
    let class = Class::of(ty);
    if !class.keyed() {
        return None;
    }
    Value::parse(class, text).map(|v| v.key())
}

fn float_cmp(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

fn trim_pg(s: &str) -> &str {
    s.trim_matches(is_pg_space)
}

/// `boolin`: `t`, `true`, `y`, `yes`, `on`, `1` and their opposites, any prefix of
/// the words that is unambiguous, any case, surrounding whitespace ignored.
fn parse_bool(text: &str) -> Option<bool> {
    let t = trim_pg(text).to_ascii_lowercase();
    let prefix_of = |word: &str| !t.is_empty() && word.starts_with(t.as_str());
    match t.as_bytes().first()? {
        b't' if prefix_of("true") => Some(true),
        b'f' if prefix_of("false") => Some(false),
        b'y' if prefix_of("yes") => Some(true),
        b'n' if prefix_of("no") => Some(false),
        b'o' if t.len() >= 2 && "on".starts_with(t.as_str()) => Some(true),
        b'o' if t.len() >= 2 && "off".starts_with(t.as_str()) => Some(false),
        b'1' if t.len() == 1 => Some(true),
        b'0' if t.len() == 1 => Some(false),
        _ => None,
    }
}

/// `int2in`/`int4in`/`int8in` (PostgreSQL 15): optional sign, decimal digits,
/// surrounding whitespace.
fn parse_int(text: &str, bits: u8) -> Option<i64> {
    let t = trim_pg(text);
    let (neg, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut v: i128 = 0;
    for b in digits.bytes() {
        v = v.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
    }
    if neg {
        v = -v;
    }
    let (lo, hi) = int_range(bits);
    if v < i128::from(lo) || v > i128::from(hi) {
        return None;
    }
    i64::try_from(v).ok()
}

/// `float8in`/`float4in`: decimal or exponent notation, `NaN`, `Infinity`, `inf`;
/// values that overflow or underflow to zero are rejected, as PostgreSQL does.
fn parse_float(text: &str, single: bool) -> Option<f64> {
    let t = trim_pg(text);
    if t.is_empty() || t.bytes().any(|b| b == b'_') {
        return None;
    }
    let v = if single {
        f64::from(t.parse::<f32>().ok()?)
    } else {
        t.parse::<f64>().ok()?
    };
    let lower = t.to_ascii_lowercase();
    if v.is_infinite() && !lower.contains("inf") {
        return None; // out of range
    }
    if v == 0.0 {
        let mantissa = lower.split('e').next().unwrap_or("");
        if mantissa.bytes().any(|b| (b'1'..=b'9').contains(&b)) {
            return None; // underflow
        }
    }
    Some(v)
}

/// An exact decimal as `numeric` holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Decimal {
    NegInf,
    /// `0.digits × 10^exp`; `digits` are ASCII digits without leading or trailing
    /// zeros; empty digits = zero (then `neg` is false and `exp` 0).
    Finite {
        neg: bool,
        digits: Vec<u8>,
        exp: i64,
    },
    PosInf,
    NaN,
}

/// Decimal exponents beyond this are rejected (PostgreSQL's numeric holds at most
/// 131072 digits before and 16383 after the point).
const MAX_DECIMAL_EXP: i64 = 200_000;

impl Decimal {
    /// `numeric_in`: `[+-]digits[.digits][e[+-]digits]`, `NaN`, `[+-]Infinity`,
    /// `[+-]inf`, surrounding whitespace.
    fn parse(text: &str) -> Option<Decimal> {
        let t = trim_pg(text);
        let lower = t.to_ascii_lowercase();
        match lower.as_str() {
            "nan" => return Some(Decimal::NaN),
            "infinity" | "+infinity" | "inf" | "+inf" => return Some(Decimal::PosInf),
            "-infinity" | "-inf" => return Some(Decimal::NegInf),
            _ => {}
        }
        let (neg, body) = match t.as_bytes().first()? {
            b'-' => (true, &t[1..]),
            b'+' => (false, &t[1..]),
            _ => (false, t),
        };
        let (mant, e10) = match body.find(['e', 'E']) {
            Some(p) => {
                let e = &body[p + 1..];
                let (eneg, ed) = match e.as_bytes().first()? {
                    b'-' => (true, &e[1..]),
                    b'+' => (false, &e[1..]),
                    _ => (false, e),
                };
                if ed.is_empty() || ed.len() > 9 || !ed.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let v: i64 = ed.parse().ok()?;
                (&body[..p], if eneg { -v } else { v })
            }
            None => (body, 0),
        };
        let (int, frac) = mant.split_once('.').unwrap_or((mant, ""));
        if int.is_empty() && frac.is_empty()
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let all: Vec<u8> = int.bytes().chain(frac.bytes()).collect();
        let lead = all.iter().take_while(|&&b| b == b'0').count();
        let mut digits = all[lead..].to_vec();
        while digits.last() == Some(&b'0') {
            digits.pop();
        }
        if digits.is_empty() {
            return Some(Decimal::Finite {
                neg: false,
                digits,
                exp: 0,
            });
        }
        let exp = i64::try_from(int.len()).ok()? + e10 - i64::try_from(lead).ok()?;
        if exp.abs() > MAX_DECIMAL_EXP {
            return None;
        }
        Some(Decimal::Finite { neg, digits, exp })
    }

    fn rank(&self) -> u8 {
        match self {
            Decimal::NegInf => 0,
            Decimal::Finite { .. } => 1,
            Decimal::PosInf => 2,
            Decimal::NaN => 3,
        }
    }

    fn key(&self) -> String {
        match self {
            Decimal::NaN => "NaN".into(),
            Decimal::PosInf => "Infinity".into(),
            Decimal::NegInf => "-Infinity".into(),
            Decimal::Finite { digits, .. } if digits.is_empty() => "0".into(),
            Decimal::Finite { neg, digits, exp } => {
                let d = String::from_utf8_lossy(digits);
                let sign = if *neg { "-" } else { "" };
                let len = digits.len() as i64;
                if *exp <= 0 && *exp >= -40 {
                    format!("{sign}0.{}{d}", "0".repeat((-*exp) as usize))
                } else if *exp > 0 && *exp < len {
                    let (i, f) = d.split_at(*exp as usize);
                    format!("{sign}{i}.{f}")
                } else if *exp >= len && *exp <= 40 {
                    format!("{sign}{d}{}", "0".repeat((*exp - len) as usize))
                } else {
                    format!("{sign}0.{d}e{exp}")
                }
            }
        }
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (
                Decimal::Finite {
                    neg: an,
                    digits: ad,
                    exp: ae,
                },
                Decimal::Finite {
                    neg: bn,
                    digits: bd,
                    exp: be,
                },
            ) => {
                // -1 negative, 0 zero, 1 positive
                let sign = |neg: bool, d: &[u8]| -> i8 {
                    if d.is_empty() {
                        0
                    } else if neg {
                        -1
                    } else {
                        1
                    }
                };
                let (sa, sb) = (sign(*an, ad), sign(*bn, bd));
                if sa != sb || sa == 0 {
                    return sa.cmp(&sb);
                }
                let magnitude = ae.cmp(be).then_with(|| ad.as_slice().cmp(bd.as_slice()));
                if sa < 0 {
                    magnitude.reverse()
                } else {
                    magnitude
                }
            }
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// `uuid_in`: 32 hex digits, any case, an optional hyphen after each group of
/// four, optionally in braces.
fn parse_uuid(text: &str) -> Option<u128> {
    let inner = match text.strip_prefix('{') {
        Some(r) => r.strip_suffix('}')?,
        None => text,
    };
    let mut v: u128 = 0;
    let mut n = 0u32;
    let mut after_hyphen = false;
    for b in inner.bytes() {
        if b == b'-' {
            if n == 0 || !n.is_multiple_of(4) || n >= 32 || after_hyphen {
                return None;
            }
            after_hyphen = true;
            continue;
        }
        let d = char::from(b).to_digit(16)?;
        n += 1;
        if n > 32 {
            return None;
        }
        v = (v << 4) | u128::from(d);
        after_hyphen = false;
    }
    (n == 32 && !after_hyphen).then_some(v)
}

fn format_uuid(u: u128) -> String {
    let h = format!("{u:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

// ---------------------------------------------------------------------------
// Dates and times (ISO forms; DateStyle ISO output is a subset)

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn eat_word_ci(&mut self, word: &str) -> bool {
        let end = self.i + word.len();
        match self.s.get(self.i..end) {
            Some(w) if w.eq_ignore_ascii_case(word.as_bytes()) => {
                self.i = end;
                true
            }
            _ => false,
        }
    }

    fn skip_space(&mut self) -> usize {
        let start = self.i;
        while matches!(
            self.peek(),
            Some(b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
        ) {
            self.i += 1;
        }
        self.i - start
    }

    /// Between `min` and `max` ASCII digits as a number (stops after `max`).
    fn number(&mut self, min: usize, max: usize) -> Option<i64> {
        let start = self.i;
        let mut v: i64 = 0;
        while let Some(b) = self.peek().filter(u8::is_ascii_digit) {
            if self.i - start == max {
                break;
            }
            v = v * 10 + i64::from(b - b'0');
            self.i += 1;
        }
        (self.i - start >= min).then_some(v)
    }

    fn done(&self) -> bool {
        self.i == self.s.len()
    }
}

fn is_leap(y: i64) -> bool {
    y.rem_euclid(4) == 0 && (y.rem_euclid(100) != 0 || y.rem_euclid(400) == 0)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (astronomical year: 1 BC = 0).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

const USECS_PER_DAY: i128 = 86_400_000_000;

/// Parses a date (→ days) or timestamp (→ microseconds since 1970-01-01, UTC for
/// timestamptz) in ISO form.
fn parse_datetime(text: &str, class: Class) -> Option<i128> {
    let t = trim_pg(text);
    match t.to_ascii_lowercase().as_str() {
        "infinity" | "+infinity" => return Some(POS_INFINITY),
        "-infinity" => return Some(NEG_INFINITY),
        "epoch" => return Some(0),
        _ => {}
    }
    let mut c = Cursor {
        s: t.as_bytes(),
        i: 0,
    };
    let year = c.number(1, 7)?;
    if !c.eat(b'-') {
        return None;
    }
    let month = c.number(1, 2)?;
    if !c.eat(b'-') {
        return None;
    }
    let day = c.number(1, 2)?;
    let mut usecs: i128 = 0;
    let mut offset_secs: i64 = 0;
    if class != Class::Date {
        let save = c.i;
        let sep = c.eat(b'T') || c.eat(b't') || c.skip_space() > 0;
        if sep && c.peek().is_some_and(|b| b.is_ascii_digit()) {
            usecs = parse_time(&mut c)?;
            let save_zone = c.i;
            c.skip_space();
            match parse_zone(&mut c) {
                Some(z) => offset_secs = z?,
                None => c.i = save_zone,
            }
        } else {
            c.i = save;
        }
    }
    c.skip_space();
    let bc = if c.eat_word_ci("BC") {
        true
    } else {
        c.eat_word_ci("AD");
        false
    };
    c.skip_space();
    if !c.done() || year == 0 || !(1..=12).contains(&month) {
        return None;
    }
    let year = if bc { 1 - year } else { year };
    let max_year = if class == Class::Date {
        5_874_897
    } else {
        294_276
    };
    if !(-4713..=max_year).contains(&year) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let days = i128::from(days_from_civil(year, month, day));
    Some(match class {
        Class::Date => days,
        Class::TimestampTz => days * USECS_PER_DAY + usecs - i128::from(offset_secs) * 1_000_000,
        // A timestamp without time zone ignores a given offset, as PostgreSQL does.
        _ => days * USECS_PER_DAY + usecs,
    })
}

/// `HH:MM[:SS[.fraction]]` → microseconds; the fraction is rounded to
/// microseconds the way PostgreSQL does (`rint` of the double).
fn parse_time(c: &mut Cursor<'_>) -> Option<i128> {
    let h = c.number(1, 2)?;
    if !c.eat(b':') {
        return None;
    }
    let m = c.number(2, 2)?;
    let mut s = 0;
    let mut frac_us: i64 = 0;
    if c.eat(b':') {
        s = c.number(2, 2)?;
        if c.eat(b'.') {
            let start = c.i;
            while c.peek().is_some_and(|b| b.is_ascii_digit()) {
                c.i += 1;
            }
            let digits = std::str::from_utf8(&c.s[start..c.i]).ok()?;
            if !digits.is_empty() {
                let f: f64 = format!("0.{digits}").parse().ok()?;
                frac_us = (f * 1e6).round_ties_even() as i64;
            }
        }
    }
    if m > 59 || s > 60 || h > 24 || (h == 24 && (m != 0 || s != 0 || frac_us != 0)) {
        return None;
    }
    Some(i128::from(((h * 60 + m) * 60 + s) * 1_000_000 + frac_us))
}

/// A zone after the time: `Z`, `UTC`, `GMT`, `±HH`, `±HH:MM`, `±HHMM`,
/// `±HH:MM:SS`. `None` = no zone here; `Some(None)` = a malformed one.
fn parse_zone(c: &mut Cursor<'_>) -> Option<Option<i64>> {
    if c.eat(b'Z') || c.eat(b'z') || c.eat_word_ci("UTC") || c.eat_word_ci("GMT") {
        return Some(Some(0));
    }
    let sign = match c.peek() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return None,
    };
    c.i += 1;
    let parse = |c: &mut Cursor<'_>| -> Option<i64> {
        let start = c.i;
        let h = c.number(1, 2)?;
        let mut m = 0;
        let mut s = 0;
        if c.eat(b':') {
            m = c.number(2, 2)?;
            if c.eat(b':') {
                s = c.number(2, 2)?;
            }
        } else if c.i - start == 2 && c.peek().is_some_and(|b| b.is_ascii_digit()) {
            m = c.number(2, 2)?;
        }
        (h <= 15 && m <= 59 && s <= 59).then_some(sign * ((h * 60 + m) * 60 + s))
    };
    Some(parse(c))
}

// ---------------------------------------------------------------------------
// LIKE

#[derive(Clone, Debug, PartialEq, Eq)]
enum LikeToken {
    Literal(char),
    /// `_`
    One,
    /// `%` or `*`
    Any,
}

/// Compiles a LIKE pattern; `None` if it ends with a lone escape character.
fn compile_like(pattern: &str, fold: bool) -> Option<Vec<LikeToken>> {
    let mut out = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        out.push(match c {
            '\\' => {
                let lit = chars.next()?;
                LikeToken::Literal(if fold { lit.to_ascii_lowercase() } else { lit })
            }
            '%' | '*' => {
                if out.last() == Some(&LikeToken::Any) {
                    continue;
                }
                LikeToken::Any
            }
            '_' => LikeToken::One,
            c => LikeToken::Literal(if fold { c.to_ascii_lowercase() } else { c }),
        });
    }
    Some(out)
}

/// Wildcard matching with one backtrack point: O(len(s) × len(p)) at worst.
fn like_matches(p: &[LikeToken], s: &str, fold: bool) -> bool {
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    loop {
        let next = s[si..].chars().next();
        let advanced = match (p.get(pi), next) {
            (Some(LikeToken::Any), _) => {
                star = Some((pi + 1, si));
                pi += 1;
                continue;
            }
            (Some(LikeToken::One), Some(c)) => {
                si += c.len_utf8();
                true
            }
            (Some(LikeToken::Literal(l)), Some(c)) => {
                let c2 = if fold { c.to_ascii_lowercase() } else { c };
                if c2 == *l {
                    si += c.len_utf8();
                    true
                } else {
                    false
                }
            }
            (None, None) => return true,
            _ => false,
        };
        if advanced {
            pi += 1;
            continue;
        }
        match star {
            Some((sp, ss)) => match s[ss..].chars().next() {
                Some(c) => {
                    let ns = ss + c.len_utf8();
                    star = Some((sp, ns));
                    pi = sp;
                    si = ns;
                }
                None => return false,
            },
            None => return false,
        }
    }
}

// ---------------------------------------------------------------------------
// Binding and evaluation

/// A filter bound to a table: column indexes resolved, values typed.
#[derive(Clone, Debug, Default)]
pub struct BoundFilter {
    conditions: Vec<Bound>,
    /// Logic groups; empty for filters without `or`/`and`, so they cost nothing.
    groups: Vec<BoundGroup>,
}

#[derive(Clone, Debug)]
struct BoundGroup {
    negated: bool,
    or: bool,
    items: Vec<BoundItem>,
}

#[derive(Clone, Debug)]
enum BoundItem {
    Condition(Bound),
    Group(BoundGroup),
}

impl BoundGroup {
    /// SQL three-valued AND / OR over the items.
    fn eval(&self, row: &Row) -> Option<bool> {
        let mut unknown = false;
        for item in &self.items {
            let v = match item {
                BoundItem::Condition(c) => c.eval(row),
                BoundItem::Group(g) => g.eval(row),
            };
            match v {
                Some(b) if b == self.or => return Some(self.or != self.negated),
                Some(_) => {}
                None => unknown = true,
            }
        }
        if unknown {
            None
        } else {
            Some(self.or == self.negated)
        }
    }

    /// The keys of a non-negated OR whose every branch is a non-negated `eq`/`in`
    /// on one keyed column: a row can match only with one of them.
    fn index_key(&self) -> Option<(usize, Vec<String>)> {
        if self.negated || !self.or {
            return None;
        }
        let mut column = None;
        let mut keys = Vec::new();
        for item in &self.items {
            let BoundItem::Condition(c) = item else {
                return None;
            };
            if c.negated || !c.class.keyed() || column.is_some_and(|col| col != c.column) {
                return None;
            }
            column = Some(c.column);
            match &c.test {
                Test::Compare(Op::Eq, v) => keys.push(v.key()),
                Test::In { values, .. } => keys.extend(values.iter().map(Value::key)),
                _ => return None,
            }
        }
        keys.sort_unstable();
        keys.dedup();
        Some((column?, keys))
    }
}

fn bind_group(g: &Group, table: &Table) -> Result<BoundGroup, FilterError> {
    let items = g
        .items
        .iter()
        .map(|i| match i {
            GroupItem::Condition(c) => bind_condition(c, table).map(BoundItem::Condition),
            GroupItem::Group(g) => bind_group(g, table).map(BoundItem::Group),
        })
        .collect::<Result<_, _>>()?;
    Ok(BoundGroup {
        negated: g.negated,
        or: g.or,
        items,
    })
}

#[derive(Clone, Debug)]
struct Bound {
    column: usize,
    negated: bool,
    class: Class,
    test: Test,
}

#[derive(Clone, Debug)]
enum Test {
    Compare(Op, Value),
    /// Values sorted by [`Value::cmp`]; `has_null`: the list has a NULL item.
    In {
        values: Vec<Value>,
        has_null: bool,
    },
    IsNull,
    /// `is.true`, `is.false`; `None` = `is.unknown`.
    IsBool(Option<bool>),
    Like {
        pattern: Vec<LikeToken>,
        fold: bool,
    },
    IsDistinct(Value),
}

impl Filter {
    /// Resolves column names against `table` and parses each value as its
    /// column's type. Every error names the condition and says what is allowed.
    pub fn bind(&self, table: &Table) -> Result<BoundFilter, FilterError> {
        let conditions = self
            .conditions
            .iter()
            .map(|c| bind_condition(c, table))
            .collect::<Result<_, _>>()?;
        let groups = self
            .groups
            .iter()
            .map(|g| bind_group(g, table))
            .collect::<Result<_, _>>()?;
        Ok(BoundFilter { conditions, groups })
    }
}

fn bind_condition(cond: &Condition, table: &Table) -> Result<Bound, FilterError> {
    let text = || cond.to_string();
    let Some(column) = table.column_index(&cond.column) else {
        let mut columns: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
        let more = columns.len().saturating_sub(50);
        columns.truncate(50);
        let mut list = columns.join(", ");
        if more > 0 {
            list.push_str(&format!(" and {more} more"));
        }
        return Err(FilterError::UnknownColumn {
            column: cond.column.clone(),
            condition: text(),
            table: format!("{}.{}", table.schema, table.name),
            columns: list,
        });
    };
    let ty = &table.columns[column].ty;
    let class = Class::of(ty);
    let not_applicable = |hint: String| FilterError::NotApplicable {
        op: cond.op.as_str(),
        condition: text(),
        column: cond.column.clone(),
        ty: ty.name.clone(),
        hint,
    };
    let typed = |v: &str| {
        Value::parse(class, v).ok_or_else(|| {
            let mut expected = class.expected();
            if v.eq_ignore_ascii_case("null") {
                expected.push_str("; to match NULL use is.null");
            }
            FilterError::InvalidValue {
                value: v.to_string(),
                condition: text(),
                ty: ty.name.clone(),
                expected,
            }
        })
    };
    let single = || match &cond.operand {
        Operand::Value(v) => Ok(v.as_str()),
        Operand::List(_) => Err(not_applicable(
            "only in takes a list; give one value, as in id=eq.1".into(),
        )),
    };
    let test = match cond.op {
        Op::Eq | Op::Neq | Op::Lt | Op::Lte | Op::Gt | Op::Gte => {
            if cond.op.is_ordering() && !class.ordered() {
                return Err(not_applicable(format!(
                    "walcast orders only numbers, booleans, dates, timestamps, uuids and text \
                     (text, varchar, char, name); use eq, neq, in or is on {} columns",
                    ty.name
                )));
            }
            Test::Compare(cond.op, typed(single()?)?)
        }
        Op::IsDistinct => Test::IsDistinct(typed(single()?)?),
        Op::In => {
            let Operand::List(items) = &cond.operand else {
                return Err(not_applicable(
                    "in takes a parenthesised list, as in id=in.(1,2,3)".into(),
                ));
            };
            if items.len() > MAX_IN_VALUES {
                return Err(FilterError::TooManyValues { condition: text() });
            }
            let mut values = Vec::with_capacity(items.len());
            let mut has_null = false;
            for item in items {
                match item {
                    None => has_null = true,
                    Some(v) => values.push(typed(v)?),
                }
            }
            values.sort_by(|a, b| a.cmp(b).unwrap_or(Ordering::Equal));
            values.dedup_by(|a, b| a.cmp(b) == Some(Ordering::Equal));
            Test::In { values, has_null }
        }
        Op::Is => {
            let v = single()?;
            let kw = is_keyword(v).ok_or_else(|| FilterError::InvalidIsValue {
                value: v.to_string(),
                condition: text(),
            })?;
            let want = match kw {
                IsKeyword::Null => None,
                IsKeyword::True => Some(Some(true)),
                IsKeyword::False => Some(Some(false)),
                IsKeyword::Unknown => Some(None),
            };
            match want {
                None => Test::IsNull,
                Some(_) if class != Class::Bool => {
                    return Err(not_applicable(
                        "is.true, is.false and is.unknown need a bool column; use is.null".into(),
                    ))
                }
                Some(b) => Test::IsBool(b),
            }
        }
        Op::Like | Op::Ilike => {
            if !matches!(class, Class::Text { .. }) {
                return Err(not_applicable(
                    "like and ilike work on text, varchar, char and name columns; \
                     use eq or in here"
                        .into(),
                ));
            }
            let fold = cond.op == Op::Ilike;
            let pattern = compile_like(single()?, fold).ok_or_else(|| {
                not_applicable(
                    "the pattern ends with the escape character \\; write \\\\ for a literal \
                     backslash"
                        .into(),
                )
            })?;
            Test::Like { pattern, fold }
        }
    };
    Ok(Bound {
        column,
        negated: cond.negated,
        class,
        test,
    })
}

impl Bound {
    /// SQL three-valued result: `None` = unknown.
    fn eval(&self, row: &Row) -> Option<bool> {
        let text = match row.get(self.column)? {
            Cell::Text(b) => Some(std::str::from_utf8(b).ok()?),
            Cell::Null => None,
            // Not sent (or not text): the value is unknown, so nothing matches.
            Cell::Absent | Cell::Binary(_) => return None,
        };
        let r = match text {
            None => match &self.test {
                Test::IsNull | Test::IsBool(None) | Test::IsDistinct(_) => Some(true),
                Test::IsBool(Some(_)) => Some(false),
                // `NULL = any('{}')` is false, not unknown: nothing to compare with.
                Test::In {
                    values,
                    has_null: false,
                } if values.is_empty() => Some(false),
                _ => None,
            },
            Some(t) => self.eval_text(t),
        };
        if self.negated {
            r.map(|b| !b)
        } else {
            r
        }
    }

    fn eval_text(&self, t: &str) -> Option<bool> {
        Some(match &self.test {
            Test::IsNull | Test::IsBool(None) => false,
            Test::IsBool(Some(want)) => parse_bool(t)? == *want,
            Test::Like { pattern, fold } => like_matches(pattern, t, *fold),
            Test::Compare(op, lit) => {
                let ord = Value::parse(self.class, t)?.cmp(lit)?;
                match op {
                    Op::Eq => ord == Ordering::Equal,
                    Op::Neq => ord != Ordering::Equal,
                    Op::Lt => ord == Ordering::Less,
                    Op::Lte => ord != Ordering::Greater,
                    Op::Gt => ord == Ordering::Greater,
                    Op::Gte => ord != Ordering::Less,
                    _ => return None,
                }
            }
            Test::IsDistinct(lit) => Value::parse(self.class, t)?.cmp(lit)? != Ordering::Equal,
            Test::In { values, has_null } => {
                let v = Value::parse(self.class, t)?;
                let found = values
                    .binary_search_by(|x| x.cmp(&v).unwrap_or(Ordering::Less))
                    .is_ok();
                if found {
                    true
                } else if *has_null {
                    return None;
                } else {
                    false
                }
            }
        })
    }
}

impl BoundFilter {
    /// Whether every condition holds for `row` (SQL semantics: unknown is not a match).
    pub fn matches(&self, row: &Row) -> bool {
        self.conditions.iter().all(|c| c.eval(row) == Some(true))
            && (self.groups.is_empty() || self.groups.iter().all(|g| g.eval(row) == Some(true)))
    }

    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty() && self.groups.is_empty()
    }

    /// One non-negated `eq` (preferred) or `in` condition on a column with canonical
    /// keys, as (column index, keys): a row can match only if
    /// `canonical_key(column type, value)` is among the keys. An empty key list
    /// (`in.()`, or `in.(null)`) means no row matches. `None` if there is none.
    pub fn index_key(&self) -> Option<(usize, Vec<String>)> {
        let keyed = |c: &&Bound| !c.negated && c.class.keyed();
        let eq = self
            .conditions
            .iter()
            .filter(keyed)
            .find_map(|c| match &c.test {
                Test::Compare(Op::Eq, v) => Some((c.column, vec![v.key()])),
                _ => None,
            });
        eq.or_else(|| {
            self.conditions
                .iter()
                .filter(keyed)
                .find_map(|c| match &c.test {
                    Test::In { values, .. } => {
                        Some((c.column, values.iter().map(Value::key).collect()))
                    }
                    _ => None,
                })
        })
        .or_else(|| self.groups.iter().find_map(BoundGroup::index_key))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::decode::pgoutput::{RelId, ReplicaIdentity};
    use crate::decode::relation::Column;

    fn table(cols: &[(&str, &str)]) -> Table {
        Table {
            id: RelId(1),
            schema: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Full,
            json: Default::default(),
            columns: cols
                .iter()
                .map(|(n, ty)| Column {
                    name: n.to_string(),
                    ty: Arc::new(PgType::new(0, ty, PgType::kind_for_base_name(ty))),
                    key: false,
                })
                .collect(),
        }
    }

    fn row(cells: &[Option<&str>]) -> Row {
        cells
            .iter()
            .map(|c| match c {
                Some(t) => Cell::Text(Bytes::copy_from_slice(t.as_bytes())),
                None => Cell::Null,
            })
            .collect()
    }

    fn cond(column: &str, negated: bool, op: Op, v: &str) -> Condition {
        Condition::new(column, negated, op, Operand::Value(v.into()))
    }

    fn parse_err(s: &str) -> String {
        Filter::parse(s).unwrap_err().to_string()
    }

    /// Binds `filter` on a one-column table of type `ty` and evaluates it on `value`.
    fn check(ty: &str, filter: &str, value: Option<&str>) -> bool {
        let t = table(&[("c", ty)]);
        let f = Filter::parse(filter)
            .unwrap_or_else(|e| panic!("{filter}: {e}"))
            .bind(&t)
            .unwrap_or_else(|e| panic!("{filter}: {e}"));
        f.matches(&row(&[value]))
    }

    #[test]
    fn parses_every_operator() {
        for (s, op) in [
            ("a=eq.1", Op::Eq),
            ("a=neq.1", Op::Neq),
            ("a=lt.1", Op::Lt),
            ("a=lte.1", Op::Lte),
            ("a=gt.1", Op::Gt),
            ("a=gte.1", Op::Gte),
            ("a=is.null", Op::Is),
            ("a=like.x%", Op::Like),
            ("a=ilike.x*", Op::Ilike),
            ("a=isdistinct.1", Op::IsDistinct),
        ] {
            let f = Filter::parse(s).unwrap();
            let value = s.split_once('.').unwrap().1;
            assert_eq!(f.conditions(), &[cond("a", false, op, value)], "{s}");
            let n = Filter::parse(&s.replace('=', "=not.")).unwrap();
            assert_eq!(n.conditions(), &[cond("a", true, op, value)], "{s}");
        }
        let f = Filter::parse("a=in.(1, 2 ,\"3,4\",null,\"null\")").unwrap();
        assert_eq!(
            f.conditions(),
            &[Condition::new(
                "a",
                false,
                Op::In,
                Operand::List(vec![
                    Some("1".into()),
                    Some("2".into()),
                    Some("3,4".into()),
                    None,
                    Some("null".into())
                ])
            )]
        );
        let empty = Filter::parse("a=not.in.()").unwrap();
        assert_eq!(
            empty.conditions(),
            &[Condition::new("a", true, Op::In, Operand::List(vec![]))]
        );
    }

    #[test]
    fn splits_on_top_level_commas_only() {
        let f = Filter::parse(r#"name=eq."Doe, Jane",id=in.(1,2),x=eq.a.b, y = gt.3"#).unwrap();
        assert_eq!(
            f.conditions(),
            &[
                cond("name", false, Op::Eq, "Doe, Jane"),
                Condition::new(
                    "id",
                    false,
                    Op::In,
                    Operand::List(vec![Some("1".into()), Some("2".into())])
                ),
                cond("x", false, Op::Eq, "a.b"),
                cond("y", false, Op::Gt, "3"),
            ]
        );
        // Escapes inside quotes; parentheses inside quotes do not count.
        let f = Filter::parse(r##"a=eq."say \"hi\", (ok) \\",b=eq."""##).unwrap();
        assert_eq!(
            f.conditions(),
            &[
                cond("a", false, Op::Eq, r#"say "hi", (ok) \"#),
                cond("b", false, Op::Eq, ""),
            ]
        );
        // Quoted column names; values keep their spaces.
        let f = Filter::parse(r#""my col"=eq. x "#).unwrap();
        assert_eq!(f.conditions(), &[cond("my col", false, Op::Eq, " x ")]);
        assert!(Filter::parse("").unwrap().is_empty());
        assert!(Filter::parse("  \t ").unwrap().is_empty());
    }

    #[test]
    fn malformed_filters_get_clear_errors() {
        assert_eq!(
            parse_err("id=eqq.1"),
            "unknown operator \"eqq\" in \"id=eqq.1\": use one of eq, neq, lt, lte, gt, gte, \
             in, is, like, ilike, isdistinct, optionally prefixed with not."
        );
        for (s, needle) in [
            ("a=eq.1,,b=eq.2", "empty condition"),
            ("a=eq.1,", "empty condition"),
            ("a=eq.\"x", "unterminated double quote"),
            ("a=in.(1,2", "unbalanced parentheses"),
            ("a=eq.x)", "unbalanced parentheses"),
            ("ideq1", "no = after the column name"),
            ("=eq.1", "no column name"),
            ("a=", "no operator"),
            ("a=eq", "needs a value after a dot"),
            ("a=not.eq", "needs a value after a dot"),
            ("a=foo", "unknown operator \"foo\""),
            ("a=EQ.1", "unknown operator \"EQ\""),
            ("a=match.^x", "not supported by walcast"),
            ("a=not.imatch.x", "not supported by walcast"),
            ("a=in.1,2", "parenthesised list"),
            ("a=in.(1,,2)", "empty value in the in list"),
            ("a=in.(1,(2))", "separated by commas"),
            ("a=in.(\"x\"y)", "separated by commas"),
            ("a=eq.\"x\"y", "text after the closing quote"),
            ("a=is.maybe", "takes null, true, false or unknown"),
            ("\"a=eq.1", "unterminated double quote"),
        ] {
            let e = parse_err(s);
            assert!(e.contains(needle), "{s}: {e}");
        }
        let many = format!("a=in.({})", vec!["1"; MAX_IN_VALUES + 1].join(","));
        assert!(parse_err(&many).contains("at most 1000 values"));
    }

    #[test]
    fn bind_errors_name_the_problem() {
        let t = table(&[
            ("id", "int4"),
            ("doc", "jsonb"),
            ("name", "text"),
            ("ok", "bool"),
        ]);
        let err = |s: &str| Filter::parse(s).unwrap().bind(&t).unwrap_err().to_string();
        assert_eq!(
            err("id=eq.abc"),
            "value \"abc\" in \"id=eq.abc\" is not a valid int4: expected an integer between \
             -2147483648 and 2147483647"
        );
        assert!(err("id=eq.null").contains("to match NULL use is.null"));
        assert!(err("id=eq.3000000000").contains("not a valid int4"));
        assert!(err("id=in.(1,x)").contains("\"x\""));
        assert_eq!(
            err("nope=eq.1"),
            "unknown column \"nope\" in \"nope=eq.1\": table public.t has columns id, doc, \
             name, ok"
        );
        assert!(err("doc=lt.1").contains("use eq, neq, in or is on jsonb columns"));
        assert!(err("id=like.1%").contains("like and ilike work on text"));
        assert!(err("id=is.true").contains("need a bool column"));
        assert!(err("name=like.abc\\").contains("escape character"));
        // Programmatic conditions with the wrong operand shape.
        let f = Filter::from_conditions(vec![Condition::new(
            "id",
            false,
            Op::In,
            Operand::Value("1".into()),
        )]);
        assert!(f.bind(&t).unwrap_err().to_string().contains("list"));
        let f = Filter::from_conditions(vec![cond("ok", false, Op::Is, "yes")]);
        assert!(f.bind(&t).unwrap_err().to_string().contains("takes null"));
        // What binds fine.
        for s in [
            "id=eq. 7 ",
            "doc=eq.{}",
            "ok=is.unknown",
            "name=is.null",
            "id=is.NULL",
            "name=ilike.*x*",
        ] {
            Filter::parse(s).unwrap().bind(&t).unwrap();
        }
    }

    #[test]
    fn or_groups_parse_bind_evaluate_and_index() {
        let t = table(&[("status", "text"), ("total", "int4")]);
        let f = Filter::parse("or=(status.eq.new,total.gt.100)").unwrap();
        assert_eq!(f.groups().len(), 1);
        assert_eq!(f.to_string(), "or=(status.eq.new,total.gt.100)");
        let b = f.bind(&t).unwrap();
        assert!(b.matches(&row(&[Some("new"), Some("5")])));
        assert!(b.matches(&row(&[Some("old"), Some("500")])));
        assert!(!b.matches(&row(&[Some("old"), Some("5")])));
        // Unknown OR true is true; unknown OR false is not a match.
        assert!(b.matches(&row(&[None, Some("500")])));
        assert!(!b.matches(&row(&[None, Some("5")])));
        // Nesting, negation, and a plain condition beside the group.
        let f = "total=gte.0,not.or=(status.eq.a,and(status.eq.b,total.lt.3))";
        let b = Filter::parse(f).unwrap().bind(&t).unwrap();
        assert_eq!(Filter::parse(f).unwrap().to_string(), f);
        assert!(!b.matches(&row(&[Some("a"), Some("1")])));
        assert!(!b.matches(&row(&[Some("b"), Some("1")])));
        assert!(b.matches(&row(&[Some("b"), Some("5")])));
        // Indexed when every branch is an eq/in on one column.
        let b = Filter::parse("or=(status.eq.a,status.in.(b,c))")
            .unwrap()
            .bind(&t)
            .unwrap();
        assert_eq!(b.index_key().map(|k| k.1.len()), Some(3));
        let b = Filter::parse("or=(status.eq.a,total.eq.1)")
            .unwrap()
            .bind(&t)
            .unwrap();
        assert!(b.index_key().is_none());
        // Typed like other operators.
        let e = Filter::parse("or=(total.eq.x,status.eq.a)")
            .unwrap()
            .bind(&t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid int4"), "{e}");
        // A column named `or` is still a column.
        assert_eq!(Filter::parse("or=eq.1").unwrap().conditions().len(), 1);
    }

    #[test]
    fn malformed_or_deep_groups_get_clear_errors() {
        for (f, want) in [
            ("or=()", "the group is empty"),
            ("or=(a.eq.1,)", "an empty item"),
            ("or=(a.eq.1", "unbalanced parentheses"),
            ("or=(a=eq.1)", "column.op.value"),
            ("or=(a.eq.1,and(b.eq.2)", "unbalanced parentheses"),
            ("or=(a.zz.1,b.eq.2)", "unknown operator"),
            (
                "or=(a.eq.1,and(b.eq.1,or(c.eq.1,and(d.eq.1,or(e.eq.1,f.eq.2)))))",
                "deeper than 4",
            ),
            ("a=cs.{1,2}", "containment is not evaluated"),
            ("a=fts.cat", "full-text search"),
        ] {
            let e = parse_err(f);
            assert!(e.contains(want), "{f}: {e}");
        }
        let many = (0..101)
            .map(|i| format!("a.eq.{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(parse_err(&format!("or=({many})")).contains("more than 100 conditions"));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "a=eq.1,b=not.in.(1,\"x,y\",null,\"null\",\"\"),c=like.\"a\\\\b\"",
            "\"we=ird\"=eq.\"(x)\"",
        ] {
            let f = Filter::parse(s).unwrap();
            assert_eq!(Filter::parse(&f.to_string()).unwrap(), f, "{s} → {f}");
        }
        let f = Filter::eq("owner", "a,\"b\"").and(Filter::parse("x=gt.1").unwrap());
        assert_eq!(f.to_string(), "owner=eq.\"a,\\\"b\\\"\",x=gt.1");
        assert_eq!(Filter::parse(&f.to_string()).unwrap(), f);
    }

    #[test]
    fn integers_compare_numerically() {
        assert!(check("int4", "c=eq.007", Some("7")));
        assert!(check("int4", "c=eq.+7", Some("7")));
        assert!(check("int4", "c=gt.-3", Some("2")));
        assert!(!check("int4", "c=gt.10", Some("9")));
        assert!(check(
            "int8",
            "c=lt.9223372036854775807",
            Some("-9223372036854775808")
        ));
        assert!(check("int2", "c=in.(1,2,3)", Some("2")));
        assert!(!check("int2", "c=in.(1,2,3)", Some("4")));
        assert!(check("int4", "c=not.in.(1,2,3)", Some("4")));
    }

    #[test]
    fn numerics_are_exact() {
        assert!(check("numeric", "c=eq.1.50", Some("1.5")));
        assert!(check("numeric", "c=eq.1e3", Some("1000.000")));
        assert!(check("numeric", "c=eq.-0.0", Some("0")));
        assert!(check(
            "numeric",
            "c=lt.0.30000000000000000000000000000001",
            Some("0.3")
        ));
        assert!(!check(
            "numeric",
            "c=eq.12345678901234567890.1",
            Some("12345678901234567890.2")
        ));
        assert!(check("numeric", "c=gt.Infinity", Some("NaN")));
        assert!(check("numeric", "c=eq.nan", Some("NaN")));
        assert!(check("numeric", "c=lt.-99", Some("-100")));
        assert!(check("numeric", "c=gt.-Infinity", Some("-1e300")));
        assert!(check("numeric", "c=lt.0.001", Some("0.0009")));
        assert!(check("numeric", "c=gt.-0.001", Some("-0.0009")));
    }

    #[test]
    fn floats_follow_postgres() {
        assert!(check("float8", "c=eq.NaN", Some("NaN")));
        assert!(check("float8", "c=gt.Infinity", Some("NaN")));
        assert!(check("float8", "c=eq.0", Some("-0")));
        assert!(check("float8", "c=eq.1.50", Some("1.5")));
        assert!(check("float8", "c=lt.+inf", Some("1e300")));
        // float4 literals are rounded to single precision.
        assert!(check("float4", "c=eq.0.100000001", Some("0.1")));
        assert!(!check("float8", "c=eq.0.100000001", Some("0.1")));
        let t = table(&[("c", "float8")]);
        for bad in ["1e400", "1e-400", "0x10", "1_0", "abc"] {
            assert!(
                Filter::parse(&format!("c=eq.{bad}"))
                    .unwrap()
                    .bind(&t)
                    .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn bools_and_is() {
        assert!(check("bool", "c=eq.true", Some("t")));
        assert!(check("bool", "c=eq.yes", Some("t")));
        assert!(check("bool", "c=eq.OFF", Some("f")));
        assert!(check("bool", "c=lt.true", Some("f")));
        assert!(check("bool", "c=is.true", Some("t")));
        assert!(!check("bool", "c=is.true", None));
        assert!(check("bool", "c=not.is.true", None));
        assert!(check("bool", "c=is.unknown", None));
        assert!(check("bool", "c=not.is.unknown", Some("f")));
        assert!(check("int4", "c=is.null", None));
        assert!(!check("int4", "c=is.null", Some("1")));
        assert!(check("int4", "c=not.is.null", Some("1")));
        for s in ["o", "of", "tr", "2", ""] {
            assert_eq!(
                parse_bool(s),
                if s == "of" {
                    Some(false)
                } else if s == "tr" {
                    Some(true)
                } else {
                    None
                },
                "{s}"
            );
        }
    }

    #[test]
    fn null_and_absent_follow_three_valued_logic() {
        for f in ["c=eq.1", "c=not.eq.1", "c=lt.1", "c=not.in.(1)", "c=in.(1)"] {
            assert!(!check("int4", f, None), "{f}");
        }
        assert!(check("int4", "c=isdistinct.1", None));
        assert!(!check("int4", "c=not.isdistinct.1", None));
        assert!(check("int4", "c=not.isdistinct.1", Some("1")));
        // IN with a NULL item: like SQL, a miss is unknown.
        assert!(check("int4", "c=in.(1,null)", Some("1")));
        assert!(!check("int4", "c=in.(1,null)", Some("2")));
        assert!(!check("int4", "c=not.in.(1,null)", Some("2")));
        assert!(!check("int4", "c=not.in.(1,null)", Some("1")));
        // Absent: nothing matches, not even is.null or a negation.
        let t = table(&[("c", "int4")]);
        for s in ["c=is.null", "c=not.is.null", "c=not.eq.1", "c=isdistinct.1"] {
            let f = Filter::parse(s).unwrap().bind(&t).unwrap();
            assert!(!f.matches(&vec![Cell::Absent]), "{s}");
            assert!(!f.matches(&vec![]), "{s} on a short row");
        }
        // Empty filter matches everything.
        let f = Filter::parse("").unwrap().bind(&t).unwrap();
        assert!(f.is_empty() && f.matches(&vec![Cell::Absent]));
    }

    #[test]
    fn dates_and_timestamps_are_instants() {
        assert!(check(
            "timestamptz",
            "c=eq.2024-01-01T00:00:00+02:00",
            Some("2023-12-31 22:00:00+00")
        ));
        assert!(check(
            "timestamptz",
            "c=eq.2024-01-01 00:00:00Z",
            Some("2024-01-01 00:00:00+00")
        ));
        assert!(check(
            "timestamptz",
            "c=eq.2024-01-01 05:30-0530",
            Some("2024-01-01 11:00:00+00")
        ));
        assert!(check(
            "timestamptz",
            "c=lt.2024-01-02 03:04:05.679",
            Some("2024-01-02 03:04:05.678+00")
        ));
        assert!(check(
            "timestamptz",
            "c=eq.2024-01-01 00:00:00.1234565Z",
            Some("2024-01-01 00:00:00.123456+00")
        ));
        assert!(check(
            "timestamptz",
            "c=gt.-infinity",
            Some("0044-03-15 10:00:00+00 BC")
        ));
        assert!(check(
            "timestamptz",
            "c=lt.0001-01-01",
            Some("0044-03-15 10:00:00+00 BC")
        ));
        assert!(check(
            "timestamptz",
            "c=eq.2024-01-01 24:00:00",
            Some("2024-01-02 00:00:00+00")
        ));
        assert!(check(
            "timestamp",
            "c=eq.2024-01-01 00:00+02",
            Some("2024-01-01 00:00:00")
        ));
        assert!(check("date", "c=eq.2024-1-2", Some("2024-01-02")));
        assert!(check("date", "c=gt.2024-02-28", Some("2024-02-29")));
        assert!(check("date", "c=lt.infinity", Some("10000-01-01")));
        assert!(check("date", "c=eq.epoch", Some("1970-01-01")));
        assert!(check("date", "c=lt.0001-01-01", Some("0001-12-31 BC")));
        let t = table(&[("d", "date"), ("ts", "timestamptz")]);
        for bad in [
            "d=eq.2023-02-29",
            "d=eq.2024-13-01",
            "d=eq.0000-01-01",
            "d=eq.2024-01-01 10:00",
            "d=eq.yesterday",
            "ts=eq.2024-01-01 25:00",
            "ts=eq.2024-01-01 10:00+16",
            "ts=eq.2024-01-01 10:00 +02:00 junk",
        ] {
            assert!(
                Filter::parse(bad).unwrap().bind(&t).is_err(),
                "{bad} should not bind"
            );
        }
    }

    #[test]
    fn uuids_and_text() {
        let u = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        assert!(check(
            "uuid",
            "c=eq.{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}",
            Some(u)
        ));
        assert!(check(
            "uuid",
            "c=eq.a0eebc999c0b4ef8bb6d6bb9bd380a11",
            Some(u)
        ));
        assert!(check(
            "uuid",
            "c=lt.b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            Some(u)
        ));
        assert_eq!(parse_uuid("a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11"), None);
        assert_eq!(parse_uuid("a0eebc9-99c0b-4ef8-bb6d-6bb9bd380a11"), None);
        assert_eq!(parse_uuid("{a0eebc999c0b4ef8bb6d6bb9bd380a11"), None);
        // Byte-wise (C collation): upper case sorts before lower case.
        assert!(check("text", "c=lt.a", Some("B")));
        assert!(check("text", "c=gt.z", Some("é")));
        assert!(check("varchar", "c=eq.\"a,b\"", Some("a,b")));
        assert!(check("bpchar", "c=eq.a", Some("a  ")));
        assert!(!check("bpchar", "c=like.a", Some("a  ")));
        // Opaque types: exact text equality.
        assert!(check("jsonb", "c=eq.{\"a\": 1}", Some("{\"a\": 1}")));
        assert!(!check("jsonb", "c=eq.{\"a\":1}", Some("{\"a\": 1}")));
    }

    #[test]
    fn like_patterns() {
        for (pat, s, want) in [
            ("abc", "abc", true),
            ("a%", "abc", true),
            ("a*", "abc", true),
            ("%c", "abc", true),
            ("a_c", "abc", true),
            ("a_c", "aéc", true),
            ("a_c", "ac", false),
            ("%b%", "abc", true),
            ("%%x", "abc", false),
            ("a\\%", "a%", true),
            ("a\\%", "ab", false),
            ("a\\*", "a*", true),
            ("a\\*", "ab", false),
            ("", "", true),
            ("%", "", true),
            ("_", "", false),
            ("%a%b%c%", "xaxbxcx", true),
            ("%a%b%c", "xaxbxcx", false),
        ] {
            let p = compile_like(pat, false).unwrap();
            assert_eq!(like_matches(&p, s, false), want, "{s} like {pat}");
        }
        assert!(check("text", "c=ilike.ABC%", Some("abcdef")));
        assert!(!check("text", "c=like.ABC%", Some("abcdef")));
        assert!(!check("text", "c=ilike.É", Some("é")));
        assert!(check("text", "c=not.like.x%", Some("abc")));
    }

    #[test]
    fn canonical_keys() {
        let ty = |n: &str| PgType::new(0, n, PgType::kind_for_base_name(n));
        for (t, a, b) in [
            ("int4", "007", "7"),
            ("numeric", "1.50", "1.5"),
            ("numeric", "-0.000", "0"),
            ("numeric", "1e3", "1000"),
            ("float8", "-0", "0"),
            ("float8", "1.50", "1.5"),
            ("bool", "yes", "t"),
            (
                "uuid",
                "A0EEBC999C0B4EF8BB6D6BB9BD380A11",
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            ),
            (
                "timestamptz",
                "2024-01-01T00:00:00+02:00",
                "2023-12-31 22:00:00+00",
            ),
            ("bpchar", "a", "a   "),
        ] {
            let (ka, kb) = (canonical_key(&ty(t), a), canonical_key(&ty(t), b));
            assert!(ka.is_some(), "{t} {a}");
            assert_eq!(ka, kb, "{t}: {a} vs {b}");
        }
        assert_eq!(
            canonical_key(&ty("numeric"), "1.50").as_deref(),
            Some("1.5")
        );
        assert_eq!(
            canonical_key(&ty("numeric"), "-120").as_deref(),
            Some("-120")
        );
        assert_eq!(
            canonical_key(&ty("numeric"), "0.05").as_deref(),
            Some("0.05")
        );
        assert_eq!(canonical_key(&ty("int4"), "007").as_deref(), Some("7"));
        assert_ne!(
            canonical_key(&ty("numeric"), "1.5"),
            canonical_key(&ty("numeric"), "15")
        );
        assert_eq!(canonical_key(&ty("jsonb"), "{}"), None);
        assert_eq!(canonical_key(&ty("int4"), "x"), None);
    }

    #[test]
    fn index_keys() {
        let t = table(&[("a", "int4"), ("b", "text"), ("j", "jsonb")]);
        let key = |s: &str| Filter::parse(s).unwrap().bind(&t).unwrap().index_key();
        assert_eq!(key("a=eq.007"), Some((0, vec!["7".into()])));
        assert_eq!(key("a=gt.1,b=eq.x"), Some((1, vec!["x".into()])));
        assert_eq!(key("b=in.(y,x,x),a=eq.1"), Some((0, vec!["1".into()])));
        assert_eq!(
            key("b=in.(y,x,x,null)"),
            Some((1, vec!["x".into(), "y".into()]))
        );
        assert_eq!(key("a=not.eq.1"), None);
        assert_eq!(key("j=eq.{}"), None);
        assert_eq!(key(""), None);
    }

    #[test]
    fn bound_filters_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<BoundFilter>();
        assert_send_sync::<Filter>();
        assert_send_sync::<FilterError>();
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,60}") {
            let t = table(&[("a", "int4"), ("b", "text"), ("c", "numeric"), ("d", "timestamptz")]);
            if let Ok(f) = Filter::parse(&s) {
                if let Ok(b) = f.bind(&t) {
                    let _ = b.matches(&row(&[Some("1"), Some(s.as_str()), Some("1.5"), None]));
                    let _ = b.index_key();
                }
                // Display round-trips whatever parsed.
                proptest::prop_assert_eq!(Filter::parse(&f.to_string()).unwrap(), f);
            }
        }

        #[test]
        fn filter_shaped_strings_never_panic(
            col in "[abcd\"]{0,2}",
            op in "(not\\.)?(eq|neq|lt|lte|gt|gte|in|is|like|ilike|isdistinct|match)",
            val in "[-+0-9a-fA-F.e:TZ ,()\"\\\\%*_{}]{0,24}",
        ) {
            let s = format!("{col}={op}.{val}");
            let t = table(&[("a", "int4"), ("b", "text"), ("c", "numeric"), ("d", "timestamptz")]);
            for ty in ["int8", "numeric", "float4", "date", "timestamp", "uuid", "bool", "bpchar"] {
                let _ = canonical_key(&PgType::new(0, ty, PgType::kind_for_base_name(ty)), &val);
            }
            if let Ok(f) = Filter::parse(&s) {
                if let Ok(b) = f.bind(&t) {
                    let v = Some(val.as_str());
                    let _ = b.matches(&row(&[v, v, v, v]));
                }
            }
        }

        #[test]
        fn like_agrees_with_a_reference(p in "[ab%_]{0,6}", s in "[ab]{0,6}") {
            // Reference: translate to a regex-free recursive matcher.
            fn reference(p: &[u8], s: &[u8]) -> bool {
                match p.first() {
                    None => s.is_empty(),
                    Some(b'%') => (0..=s.len()).any(|i| reference(&p[1..], &s[i..])),
                    Some(b'_') => !s.is_empty() && reference(&p[1..], &s[1..]),
                    Some(c) => s.first() == Some(c) && reference(&p[1..], &s[1..]),
                }
            }
            let tokens = compile_like(&p, false).unwrap();
            proptest::prop_assert_eq!(like_matches(&tokens, &s, false), reference(p.as_bytes(), s.as_bytes()));
        }
    }
}
