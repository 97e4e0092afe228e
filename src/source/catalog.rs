//! Table lookups for subscriptions, over the ordinary SQL connection.
//!
//! A join names tables by schema and name; the hub binds filters to column
//! positions and types. [`Catalog`] answers "is this table in the publication,
//! and what are its columns" from `pg_publication_tables` and `pg_attribute`, and
//! reconnects when the SQL connection is lost. The replication stream remains the
//! authority on a table's shape: when its `Relation` message differs from what a
//! subscription was bound to, the hub rebinds (see `hub`).
//!
//! # Freshness
//!
//! A join must see the table as it is now: after `ADD COLUMN` a filter on the new
//! column is valid at once, and after `DROP TABLE` + `CREATE TABLE` a join binds
//! to the new relation. So a table's shape is read again for every join that
//! arrived after the cached answer was read — but one read serves every join
//! that was waiting for it, so a storm of joins costs one query per query
//! round-trip, not one per join. `daemon::serve` polls which relations are
//! published (every [`PUBLISHED_POLL`]) and tells the hub, which closes the
//! subscriptions of a dropped or unpublished table with a `system` message
//! (pgoutput says nothing about `DROP TABLE` or `ALTER PUBLICATION … DROP TABLE`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::config::PgConnInfo;
use crate::decode::pgoutput::{Oid, RelId, ReplicaIdentity};
use crate::decode::relation::{Column, Table, TypeCatalog};
use crate::source::error::{ErrorKind, PgError};

/// How long the list of published tables is trusted before it is read again.
const PUBLICATION_TTL: Duration = Duration::from_secs(5);

/// Longest wait for one catalog query (a join waits on it; realtime-js gives a
/// join 10 s).
const CATALOG_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the daemon reads which relations are published.
pub const PUBLISHED_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("table {schema}.{table} does not exist")]
    NoSuchTable { schema: String, table: String },
    #[error(
        "table {schema}.{table} is not in publication {publication:?}: add it with `walcast setup --publication {publication} --tables {schema}.{table}` (or ALTER PUBLICATION … ADD TABLE)"
    )]
    NotPublished {
        schema: String,
        table: String,
        publication: String,
    },
    #[error("cannot read the catalog: {0}")]
    Database(#[source] PgError),
}

impl CatalogError {
    /// What this error means: a missing or unpublished table is the caller's to
    /// fix; a database error has the kind of the [`PgError`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            CatalogError::NoSuchTable { .. } | CatalogError::NotPublished { .. } => {
                ErrorKind::Usage
            }
            CatalogError::Database(e) => e.kind(),
        }
    }
}

fn not_connected() -> CatalogError {
    CatalogError::Database(PgError::Io(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "no connection",
    )))
}

pub struct Catalog {
    conn: PgConnInfo,
    publication: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    client: Option<tokio_postgres::Client>,
    types: TypeCatalog,
    /// Each table with the instant its catalog read was sent.
    tables: HashMap<(String, String), (Arc<Table>, Instant)>,
    published: Vec<(String, String)>,
    published_at: Option<Instant>,
}

impl Catalog {
    pub fn new(conn: PgConnInfo, publication: String) -> Self {
        Catalog {
            conn,
            publication,
            state: Mutex::new(State::default()),
        }
    }

    pub fn publication(&self) -> &str {
        &self.publication
    }

    /// Checks the connection works (used at startup for a clear early error).
    pub async fn check(&self) -> Result<(), CatalogError> {
        let mut st = self.state.lock().await;
        client(&mut st, &self.conn).await.map(|_| ())
    }

    /// The tables of the publication, as (schema, table).
    pub async fn published_tables(&self) -> Result<Vec<(String, String)>, CatalogError> {
        let mut st = self.state.lock().await;
        self.refresh_published(&mut st).await?;
        Ok(st.published.clone())
    }

    async fn refresh_published(&self, st: &mut State) -> Result<(), CatalogError> {
        if st
            .published_at
            .is_some_and(|t| t.elapsed() < PUBLICATION_TTL)
        {
            return Ok(());
        }
        let c = client(st, &self.conn).await?;
        let rows = timed(c.query(
            "select schemaname::text, tablename::text from pg_catalog.pg_publication_tables \
             where pubname = $1 order by 1, 2",
            &[&self.publication],
        ))
        .await;
        let rows = match rows {
            Ok(r) => r,
            Err(e) => {
                st.client = None;
                return Err(e);
            }
        };
        st.published = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        st.published_at = Some(Instant::now());
        Ok(())
    }

    /// Forgets cached shapes (after a schema change seen on the stream).
    pub async fn invalidate(&self) {
        let mut st = self.state.lock().await;
        st.tables.clear();
        st.published_at = None;
    }

    /// Looks a published table up by schema and name, as it is now: the answer
    /// was read from the catalog after this call began (see "Freshness").
    pub async fn table(&self, schema: &str, table: &str) -> Result<Arc<Table>, CatalogError> {
        let arrived = Instant::now();
        let mut st = self.state.lock().await;
        let key = (schema.to_string(), table.to_string());
        if let Some((t, read_at)) = st.tables.get(&key) {
            if *read_at >= arrived {
                return Ok(t.clone());
            }
        }
        client(&mut st, &self.conn).await?;
        let Some(c) = st.client.take() else {
            return Err(not_connected());
        };
        let read_at = Instant::now();
        let res = load_table(&mut st.types, &c, schema, table, &self.publication).await;
        // A query that failed or timed out leaves the connection in doubt: drop it.
        match &res {
            Err(CatalogError::Database(_)) => {}
            _ => st.client = Some(c),
        }
        let t = match res {
            Ok(t) => t,
            Err(e) => {
                st.tables.remove(&key);
                return Err(e);
            }
        };
        st.tables.insert(key, (t.clone(), read_at));
        Ok(t)
    }

    /// The relations of the publication now, as (relid, schema, table).
    pub async fn published_relations(&self) -> Result<Vec<(RelId, String, String)>, CatalogError> {
        let mut st = self.state.lock().await;
        let c = client(&mut st, &self.conn).await?;
        let rows = c
            .query(
                "select c.oid::int8, p.schemaname::text, p.tablename::text \
                 from pg_catalog.pg_publication_tables p \
                 join pg_catalog.pg_namespace n on n.nspname = p.schemaname \
                 join pg_catalog.pg_class c on c.relnamespace = n.oid and c.relname = p.tablename \
                 where p.pubname = $1",
                &[&self.publication],
            )
            .await
            .map_err(db_err)?;
        Ok(rows
            .iter()
            .map(|r| (RelId(r.get::<_, i64>(0) as u32), r.get(1), r.get(2)))
            .collect())
    }
}

/// A published table as the stream describes it: only the columns the
/// publication streams (not those left out of its column list, nor generated
/// ones before PostgreSQL 18 — `attnames` is read through `to_jsonb`, as
/// servers before 15 lack it), so a join binds filters, `select` and rules to
/// the columns rows will have, at the positions they will have them.
async fn load_table(
    types: &mut TypeCatalog,
    c: &tokio_postgres::Client,
    schema: &str,
    table: &str,
    publication: &str,
) -> Result<Arc<Table>, CatalogError> {
    let rows = timed(c.query(
            "select c.oid::int8, c.relreplident::text, a.attname::text, a.atttypid::int8, \
                    coalesce(a.attnum = any(i.indkey::int2[]), false), \
                    exists (select 1 from pg_catalog.pg_publication_tables p \
                            where p.pubname = $3 and p.schemaname = $1 and p.tablename = $2) \
             from pg_catalog.pg_class c \
             join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
             join pg_catalog.pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped \
             left join pg_catalog.pg_index i on i.indrelid = c.oid and i.indisprimary \
             where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p') \
               and not ((a.attgenerated <> '' \
                         and pg_catalog.current_setting('server_version_num')::int4 < 180000) \
                        or not coalesce(( \
                           select (pg_catalog.to_jsonb(p) -> 'attnames') ? a.attname::text \
                             from pg_catalog.pg_publication_tables p \
                            where p.pubname = $3 and p.schemaname = $1 and p.tablename = $2 \
                            limit 1), true)) \
             order by a.attnum",
            &[&schema, &table, &publication],
        ))
        .await?;
    if rows.is_empty() {
        return Err(CatalogError::NoSuchTable {
            schema: schema.into(),
            table: table.into(),
        });
    }
    if !rows[0].get::<_, bool>(5) {
        return Err(CatalogError::NotPublished {
            schema: schema.into(),
            table: table.into(),
            publication: publication.to_string(),
        });
    }
    let oids: Vec<Oid> = rows
        .iter()
        .map(|r| Oid(r.get::<_, i64>(3) as u32))
        .collect();
    timed(types.ensure(c, oids.iter().copied())).await?;
    let relid = RelId(rows[0].get::<_, i64>(0) as u32);
    let replica_identity = match rows[0].get::<_, String>(1).as_str() {
        "f" => ReplicaIdentity::Full,
        "n" => ReplicaIdentity::Nothing,
        "i" => ReplicaIdentity::Index,
        _ => ReplicaIdentity::Default,
    };
    let columns = rows
        .iter()
        .zip(&oids)
        .map(|(r, oid)| Column {
            name: r.get(2),
            ty: types.get(*oid),
            key: r.get(4),
        })
        .collect();
    let t = Arc::new(Table {
        id: relid,
        schema: schema.into(),
        name: table.into(),
        replica_identity,
        json: Default::default(),
        columns,
    });
    Ok(t)
}

async fn client<'a>(
    st: &'a mut State,
    conn: &PgConnInfo,
) -> Result<&'a tokio_postgres::Client, CatalogError> {
    if st.client.as_ref().is_none_or(|c| c.is_closed()) {
        let c = crate::source::tls::connect_sql(conn)
            .await
            .map_err(CatalogError::Database)?;
        st.client = Some(c);
    }
    st.client.as_ref().ok_or_else(not_connected)
}

/// Runs one catalog query with [`CATALOG_QUERY_TIMEOUT`]: a database
/// that stops answering fails the join that asked, instead of holding it (and the
/// catalog lock) for ever.
async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, CatalogError> {
    match tokio::time::timeout(CATALOG_QUERY_TIMEOUT, f).await {
        Ok(r) => r.map_err(db_err),
        Err(_) => Err(CatalogError::Database(PgError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "PostgreSQL did not answer within {}s",
                CATALOG_QUERY_TIMEOUT.as_secs()
            ),
        )))),
    }
}

fn db_err(e: tokio_postgres::Error) -> CatalogError {
    CatalogError::Database(PgError::from_sql(e))
}
