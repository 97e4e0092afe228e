//! The relation and type caches.
//!
//! pgoutput identifies tables by OID in row messages and sends a `Relation`
//! message (and `Type` messages for non-built-in types) before the first change
//! of a table in each session and after every schema change. Row messages carry
//! no names or types, so walcast keeps the latest `Relation` per OID and resolves
//! column type OIDs to [`PgType`]s through the ordinary SQL connection
//! ([`TypeCatalog`]), once per type, again after a `Type` message.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::decode::pgoutput::Oid;
use crate::decode::pgoutput::{RelId, ReplicaIdentity};
use crate::decode::value::{PgType, TypeKind};

/// A published table as the stream last described it.
#[derive(Debug, PartialEq)]
pub struct Table {
    pub id: RelId,
    pub schema: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
    /// JSON text of the columns, made on first use (`Default::default()` to build).
    pub json: ColumnsJson,
}

/// JSON text derived from a table's columns, made once on first use and shared
/// by every change of the table, so encoding a change does not re-escape names.
/// A cache, not part of the table's identity: it compares equal always.
#[derive(Debug, Default)]
pub struct ColumnsJson(std::sync::OnceLock<RenderedColumns>);

#[derive(Debug)]
pub struct RenderedColumns {
    /// Each column's name as a JSON string (quoted and escaped).
    pub names: Vec<Box<str>>,
    /// Each column's `{"name":…,"type":…}` entry of the Supabase `columns` array.
    pub entries: Vec<Box<str>>,
    /// The whole `columns` array.
    pub all: Box<str>,
    /// The names' lengths summed, plus a `:` and `,` each: a row's keys in JSON.
    pub names_len: usize,
}

impl PartialEq for ColumnsJson {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

#[derive(Debug, PartialEq)]
pub struct Column {
    pub name: String,
    pub ty: Arc<PgType>,
    /// Part of the replica identity.
    pub key: bool,
}

impl Table {
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// The columns' JSON text, rendered on first use.
    pub fn columns_json(&self) -> &RenderedColumns {
        self.json.0.get_or_init(|| {
            let quoted = |s: &str| {
                let mut out = String::with_capacity(s.len() + 2);
                crate::decode::value::write_str(&mut out, s);
                out
            };
            let names: Vec<Box<str>> = self
                .columns
                .iter()
                .map(|c| quoted(&c.name).into())
                .collect();
            let entries: Vec<Box<str>> = self
                .columns
                .iter()
                .zip(&names)
                .map(|(c, n)| format!("{{\"name\":{n},\"type\":{}}}", quoted(&c.ty.name)).into())
                .collect();
            let all = format!("[{}]", entries.join(",")).into();
            let names_len = names.iter().map(|n| n.len() + 2).sum();
            RenderedColumns {
                names,
                entries,
                all,
                names_len,
            }
        })
    }
}

/// A `pg_type` row as loaded from the catalog.
#[derive(Clone, Debug)]
struct RawType {
    name: String,
    typtype: u8,
    element: u32,
    /// A true array type (`typelem` set and variable length: `_int4`, `int2vector`).
    array: bool,
    base: u32,
    delimiter: u8,
    /// Fields of a composite type: (name, type OID).
    fields: Vec<(String, u32)>,
}

/// Type OID → [`PgType`], loaded from `pg_type` on demand and cached.
#[derive(Default)]
pub struct TypeCatalog {
    raw: HashMap<u32, RawType>,
    built: HashMap<u32, Arc<PgType>>,
}

impl TypeCatalog {
    /// Makes sure every OID in `oids` (and what they depend on) is known.
    pub async fn ensure(
        &mut self,
        client: &tokio_postgres::Client,
        oids: impl IntoIterator<Item = Oid>,
    ) -> Result<(), tokio_postgres::Error> {
        let mut missing: Vec<u32> = oids
            .into_iter()
            .map(|o| o.0)
            .filter(|o| !self.raw.contains_key(o))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut rounds = 0;
        while !missing.is_empty() && rounds < 16 {
            rounds += 1;
            let oid_list: Vec<i64> = missing.iter().map(|&o| i64::from(o)).collect();
            let rows = client
                .query(
                    "select t.oid::int8, t.typname::text, t.typtype::text, t.typelem::int8, \
                            t.typbasetype::int8, t.typdelim::text, t.typrelid::int8, \
                            (t.typelem <> 0 and t.typlen = -1) \
                     from pg_catalog.pg_type t where t.oid::int8 = any($1)",
                    &[&oid_list],
                )
                .await?;
            let mut next = Vec::new();
            for row in rows {
                let oid = row.get::<_, i64>(0) as u32;
                let typtype = row.get::<_, String>(2).bytes().next().unwrap_or(b'b');
                let relid = row.get::<_, i64>(6);
                let mut fields = Vec::new();
                if typtype == b'c' && relid != 0 {
                    for a in client
                        .query(
                            "select attname::text, atttypid::int8 from pg_catalog.pg_attribute \
                             where attrelid = $1::int8::oid and attnum > 0 and not attisdropped \
                             order by attnum",
                            &[&relid],
                        )
                        .await?
                    {
                        fields.push((a.get::<_, String>(0), a.get::<_, i64>(1) as u32));
                    }
                }
                let raw = RawType {
                    name: row.get(1),
                    typtype,
                    element: row.get::<_, i64>(3) as u32,
                    array: row.get(7),
                    base: row.get::<_, i64>(4) as u32,
                    delimiter: row.get::<_, String>(5).bytes().next().unwrap_or(b','),
                    fields,
                };
                for dep in [raw.element, raw.base]
                    .into_iter()
                    .chain(raw.fields.iter().map(|f| f.1))
                {
                    if dep != 0 && !self.raw.contains_key(&dep) {
                        next.push(dep);
                    }
                }
                self.raw.insert(oid, raw);
            }
            // OIDs the catalog does not know stay missing; they render as text.
            for o in &missing {
                self.raw.entry(*o).or_insert_with(|| RawType {
                    name: format!("oid{o}"),
                    typtype: b'b',
                    element: 0,
                    array: false,
                    base: 0,
                    delimiter: b',',
                    fields: Vec::new(),
                });
            }
            next.sort_unstable();
            next.dedup();
            missing = next;
        }
        Ok(())
    }

    /// Forgets a type (after a `Type` message) so it is loaded again.
    pub fn invalidate(&mut self, oid: Oid) {
        self.raw.remove(&oid.0);
        self.built.clear();
    }

    /// The type for an OID; unknown OIDs render as text.
    pub fn get(&mut self, oid: Oid) -> Arc<PgType> {
        self.build(oid.0, 0)
    }

    fn build(&mut self, oid: u32, depth: usize) -> Arc<PgType> {
        if let Some(t) = self.built.get(&oid) {
            return t.clone();
        }
        let Some(raw) = self.raw.get(&oid).cloned() else {
            return Arc::new(PgType::new(oid, &format!("oid{oid}"), TypeKind::Text));
        };
        let kind = if depth > 8 {
            TypeKind::Text
        } else if raw.typtype == b'd' && raw.base != 0 {
            // A domain renders as its base type but keeps its own name.
            self.build(raw.base, depth + 1).kind.clone()
        } else if raw.array && raw.element != 0 {
            TypeKind::Array {
                element: self.build(raw.element, depth + 1),
                // `int2vector` and `oidvector` print their elements space-separated
                // without braces; `to_jsonb` still makes them arrays.
                delimiter: if matches!(raw.name.as_str(), "int2vector" | "oidvector") {
                    b' '
                } else {
                    raw.delimiter
                },
            }
        } else if raw.typtype == b'c' {
            TypeKind::Composite {
                fields: raw
                    .fields
                    .iter()
                    .map(|(n, t)| (n.clone(), self.build(*t, depth + 1)))
                    .collect(),
            }
        } else if raw.typtype == b'b' {
            PgType::kind_for_base_name(&raw.name)
        } else {
            TypeKind::Text
        };
        let t = Arc::new(PgType {
            oid: Oid(oid),
            name: raw.name.clone(),
            kind,
        });
        self.built.insert(oid, t.clone());
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(name: &str, typtype: u8, element: u32, array: bool, base: u32) -> RawType {
        RawType {
            name: name.into(),
            typtype,
            element,
            array,
            base,
            delimiter: b',',
            fields: Vec::new(),
        }
    }

    #[test]
    fn kinds_follow_base_types_and_true_arrays() {
        let mut cat = TypeCatalog::default();
        cat.raw.insert(23, raw("int4", b'b', 0, false, 0));
        cat.raw.insert(1007, raw("_int4", b'b', 23, true, 0));
        cat.raw.insert(21, raw("int2", b'b', 0, false, 0));
        cat.raw.insert(22, raw("int2vector", b'b', 21, true, 0));
        // `point` has an element type but is not an array.
        cat.raw.insert(701, raw("float8", b'b', 0, false, 0));
        cat.raw.insert(600, raw("point", b'b', 701, false, 0));
        // A domain over int4[], a domain over int4 and an array of that domain.
        cat.raw.insert(9001, raw("dintarr", b'd', 0, false, 1007));
        cat.raw.insert(9002, raw("dint", b'd', 0, false, 23));
        cat.raw.insert(9003, raw("_dint", b'b', 9002, true, 0));
        cat.raw.insert(9004, raw("mood", b'e', 0, false, 0));
        let mut comp = raw("pair", b'c', 0, false, 0);
        comp.fields = vec![("a".into(), 9001), ("m".into(), 9004)];
        cat.raw.insert(9005, comp);

        let int_array = |k: &TypeKind, delim: u8| {
            matches!(k, TypeKind::Array { element, delimiter }
                if element.kind == TypeKind::Int && *delimiter == delim)
        };
        assert!(int_array(&cat.get(Oid(9001)).kind, b','));
        assert_eq!(cat.get(Oid(9001)).name, "dintarr");
        assert!(int_array(&cat.get(Oid(9003)).kind, b','));
        assert!(int_array(&cat.get(Oid(22)).kind, b' '));
        assert_eq!(cat.get(Oid(600)).kind, TypeKind::Text);
        assert_eq!(cat.get(Oid(9004)).kind, TypeKind::Text);
        match &cat.get(Oid(9005)).kind {
            TypeKind::Composite { fields } => {
                assert!(int_array(&fields[0].1.kind, b','));
                assert_eq!(fields[1].1.kind, TypeKind::Text);
            }
            other => panic!("{other:?}"),
        }
        // Unknown OIDs render as text.
        assert_eq!(cat.get(Oid(424242)).kind, TypeKind::Text);
    }
}
