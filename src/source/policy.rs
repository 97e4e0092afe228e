//! Row-level security as PostgreSQL defines it, read from the catalog and
//! evaluated by PostgreSQL itself (the SQL path of RLS mode, see `route::rls`).
//!
//! # What applies to a role
//!
//! [`PolicyDb::security`] answers, for one table and one role, what PostgreSQL
//! would apply to a `SELECT` by that role: whether the role exists and may read
//! the table at all (table or column `SELECT` privilege), which columns it may
//! read, whether row security applies (`relrowsecurity`, unless the role is a
//! superuser, has `BYPASSRLS`, or owns the table without `FORCE ROW LEVEL
//! SECURITY`), and the `SELECT`/`ALL` policies whose roles include it (`PUBLIC`,
//! or a role whose privileges it has: `pg_has_role(…, 'USAGE')`, as PostgreSQL's
//! own `has_privs_of_role`), with their `USING` expressions as
//! `pg_get_expr` prints them.
//!
//! # Judging row images
//!
//! [`PolicyDb::check`] evaluates the policies over row images taken from the
//! WAL, not over the table (which may hold other values by then, or no row after
//! a DELETE). In one transaction, rolled back at the end:
//!
//! ```sql
//! SELECT set_config('role', $role, true),
//!        set_config('request.jwt.claims', $claims, true),
//!        set_config('request.jwt.claim.sub', $sub, true),
//!        set_config('request.jwt.claim.role', $role_claim, true),
//!        set_config('statement_timeout', $ms, true);
//! SELECT w.walcast_ord
//!   FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS w(walcast_img, walcast_ord)
//!   CROSS JOIN LATERAL jsonb_populate_record(NULL::"s"."t", w.walcast_img) AS "t"
//!  WHERE ((permissive_1) OR (permissive_2) …) AND (restrictive_1) AND …;
//! ```
//!
//! Each image is a JSON object of the row's columns: a `json`/`jsonb` value as
//! its JSON, any other value as a JSON string of the type's text output (what
//! pgoutput sends), which `jsonb_populate_record` feeds to the type's input
//! function — so every value is exactly the row's. The alias is the table's own
//! name, so a policy's unqualified and qualified column references (`owner_id`,
//! `jobs.id` inside a subquery) resolve to the image; subqueries and functions in
//! a policy run as the subscriber's role, under its claims, with the row
//! security of the tables they read — as in PostgreSQL. The test
//! `rls::sql_path_agrees_with_postgres_own_select` compares this construction
//! with `SET ROLE …; SELECT … FROM t` on the same rows.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;

use crate::config::PgConnInfo;
use crate::source::error::PgError;

/// One policy of a table as it applies to a `SELECT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub permissive: bool,
    /// The `USING` expression (`None`: the policy has only `WITH CHECK` and
    /// adds nothing to a read).
    pub using: Option<String>,
}

/// What PostgreSQL applies to a `SELECT` of one table by one role.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableSecurity {
    /// The role exists.
    pub role_exists: bool,
    /// The table exists.
    pub table_exists: bool,
    /// The role may read the table (table privilege, or a column's).
    pub select: bool,
    /// The columns it may read, when not all of them (column privileges only).
    pub columns: Option<Vec<String>>,
    /// Row security applies to this role (enabled, and the role neither
    /// bypasses it nor owns the table without FORCE).
    pub row_security: bool,
    /// Why row security does not apply, when the table has it enabled.
    pub exempt: Option<&'static str>,
    /// The table's `SELECT`/`ALL` policies that apply to the role, by name.
    pub policies: Vec<Policy>,
}

/// A role and claims under which policies are evaluated.
#[derive(Clone, Debug)]
pub struct Principal {
    pub role: String,
    /// `request.jwt.claims` (a JSON object).
    pub claims: String,
    pub sub: Option<String>,
    pub email: Option<String>,
}

/// A small pool of ordinary SQL connections for policy reads and checks.
pub struct PolicyDb {
    conn: PgConnInfo,
    pool: Vec<Mutex<Option<tokio_postgres::Client>>>,
    next: AtomicUsize,
    timeout: Duration,
}

/// An error of a check: the database's (a policy raised, a timeout) or the
/// connection's.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{0}")]
    Database(#[from] PgError),
    #[error("PostgreSQL did not answer within {0} ms")]
    Timeout(u64),
}

impl PolicyDb {
    /// A pool of `size` connections (made on first use), each check bounded by
    /// `timeout` (PostgreSQL's `statement_timeout` and a client-side deadline).
    pub fn new(conn: PgConnInfo, size: usize, timeout: Duration) -> Self {
        PolicyDb {
            conn,
            pool: (0..size.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            timeout,
        }
    }

    /// Runs `f` on one of the pool's connections (connecting first if needed),
    /// within the timeout plus a second (the server's own timeout answers first).
    async fn with_client<T>(
        &self,
        f: impl for<'c> FnOnce(
            &'c mut tokio_postgres::Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>,
        >,
    ) -> Result<T, CheckError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len();
        let mut slot = self.pool[i].lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = Some(crate::source::tls::connect_sql(&self.conn).await?);
        }
        let Some(client) = slot.as_mut() else {
            return Err(CheckError::Timeout(0));
        };
        let deadline = self.timeout + Duration::from_secs(1);
        match tokio::time::timeout(deadline, f(client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                // A failed transaction must not poison the next check.
                if !client.is_closed() {
                    let _ = client.batch_execute("ROLLBACK").await;
                }
                Err(CheckError::Database(PgError::from_sql(e)))
            }
            Err(_) => {
                // The connection is in an unknown state: drop it.
                *slot = None;
                Err(CheckError::Timeout(deadline.as_millis() as u64))
            }
        }
    }

    /// What applies to a `SELECT` of `schema.table` by `role`.
    pub async fn security(
        &self,
        role: &str,
        schema: &str,
        table: &str,
    ) -> Result<TableSecurity, CheckError> {
        let (role, schema, table) = (role.to_string(), schema.to_string(), table.to_string());
        self.with_client(move |c| {
            Box::pin(async move {
                let mut s = TableSecurity::default();
                let r = c
                    .query(
                        "select r.oid::int8, r.rolsuper or r.rolbypassrls \
                         from pg_catalog.pg_roles r where r.rolname = $1",
                        &[&role],
                    )
                    .await?;
                let Some(r) = r.first() else { return Ok(s) };
                s.role_exists = true;
                let bypass: bool = r.get(1);
                let t = c
                    .query(
                        "select c.oid::int8, c.relrowsecurity, c.relforcerowsecurity, \
                                pg_catalog.pg_has_role($3, c.relowner, 'USAGE'), \
                                pg_catalog.has_table_privilege($3, c.oid, 'SELECT'), \
                                pg_catalog.has_any_column_privilege($3, c.oid, 'SELECT') \
                         from pg_catalog.pg_class c \
                         join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
                         where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')",
                        &[&schema, &table, &role],
                    )
                    .await?;
                let Some(t) = t.first() else { return Ok(s) };
                s.table_exists = true;
                let oid: i64 = t.get(0);
                let (enabled, force, owner, all, any): (bool, bool, bool, bool, bool) =
                    (t.get(1), t.get(2), t.get(3), t.get(4), t.get(5));
                s.select = all || any;
                if !all && any {
                    let cols = c
                        .query(
                            "select a.attname::text from pg_catalog.pg_attribute a \
                             where a.attrelid = $1::int8::oid and a.attnum > 0 \
                               and not a.attisdropped \
                               and pg_catalog.has_column_privilege($2, a.attrelid, a.attnum, 'SELECT') \
                             order by a.attnum",
                            &[&oid, &role],
                        )
                        .await?;
                    s.columns = Some(cols.iter().map(|r| r.get(0)).collect());
                }
                s.exempt = match (enabled, bypass, owner && !force) {
                    (false, _, _) => None,
                    (true, true, _) => Some("the role is a superuser or has BYPASSRLS"),
                    (true, false, true) => {
                        Some("the role owns the table and row security is not forced")
                    }
                    (true, false, false) => None,
                };
                s.row_security = enabled && s.exempt.is_none();
                if s.row_security {
                    let p = c
                        .query(
                            "select p.polname::text, p.polpermissive, \
                                    pg_catalog.pg_get_expr(p.polqual, p.polrelid) \
                             from pg_catalog.pg_policy p \
                             where p.polrelid = $1::int8::oid and p.polcmd in ('r', '*') \
                               and (0::oid = any(p.polroles) or exists ( \
                                    select 1 from unnest(p.polroles) x \
                                    where x <> 0 and pg_catalog.pg_has_role($2, x, 'USAGE'))) \
                             order by p.polname",
                            &[&oid, &role],
                        )
                        .await?;
                    s.policies = p
                        .iter()
                        .map(|r| Policy {
                            name: r.get(0),
                            permissive: r.get(1),
                            using: r.get(2),
                        })
                        .collect();
                }
                Ok(s)
            })
        })
        .await
    }

    /// Evaluates column-free expressions (`auth.uid()`, a claim) under a
    /// principal: each one's value as text, `None` for NULL.
    pub async fn constants(
        &self,
        who: &Principal,
        exprs: &[String],
    ) -> Result<Vec<Option<String>>, CheckError> {
        if exprs.is_empty() {
            return Ok(Vec::new());
        }
        let list: Vec<String> = exprs.iter().map(|e| format!("(({e}))::text")).collect();
        let sql = format!("select {}", list.join(", "));
        let who = who.clone();
        let ms = self.timeout.as_millis().to_string();
        let n = exprs.len();
        self.with_client(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                as_principal(&tx, &who, &ms).await?;
                let row = tx.query_one(sql.as_str(), &[]).await?;
                let out = (0..n).map(|i| row.get::<_, Option<String>>(i)).collect();
                tx.rollback().await?;
                Ok(out)
            })
        })
        .await
    }

    /// Judges row images (a JSON array of objects, see the module docs) by
    /// `predicate` (policy expressions combined as PostgreSQL does) under a
    /// principal: the 1-based positions of the images it lets through.
    pub async fn check(
        &self,
        who: &Principal,
        schema: &str,
        table: &str,
        predicate: &str,
        images: String,
    ) -> Result<Vec<u32>, CheckError> {
        let sql = format!(
            "select \"walcast images\".walcast_ord::int4 \
             from pg_catalog.jsonb_array_elements($1::text::jsonb) \
                  with ordinality as \"walcast images\"(walcast_img, walcast_ord) \
             cross join lateral pg_catalog.jsonb_populate_record(null::{q}.{t}, \"walcast images\".walcast_img) as {t} \
             where {predicate}",
            q = quote_ident(schema),
            t = quote_ident(table),
        );
        let who = who.clone();
        let ms = self.timeout.as_millis().to_string();
        self.with_client(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                as_principal(&tx, &who, &ms).await?;
                let rows = tx.query(sql.as_str(), &[&images]).await?;
                let out = rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect();
                tx.rollback().await?;
                Ok(out)
            })
        })
        .await
    }

    /// A digest of everything that decides what a role may read: policies, row
    /// security flags, table and column privileges, role memberships and
    /// attributes. It changes when any of them does.
    pub async fn fingerprint(&self) -> Result<String, CheckError> {
        self.with_client(|c| {
            Box::pin(async move {
                let row = c
                    .query_one(
                        "select md5(concat_ws('|', \
                           (select string_agg(concat_ws(',', polrelid, polname, polpermissive, \
                                   polroles::text, polcmd, pg_get_expr(polqual, polrelid)), ';' \
                                   order by polrelid, polname) from pg_catalog.pg_policy), \
                           (select string_agg(concat_ws(',', oid, relrowsecurity, \
                                   relforcerowsecurity, relowner, relacl::text), ';' order by oid) \
                              from pg_catalog.pg_class where relkind in ('r', 'p')), \
                           (select string_agg(concat_ws(',', attrelid, attnum, attacl::text), ';' \
                                   order by attrelid, attnum) \
                              from pg_catalog.pg_attribute where attacl is not null), \
                           (select string_agg(concat_ws(',', roleid, member), ';' \
                                   order by roleid, member) from pg_catalog.pg_auth_members), \
                           (select string_agg(concat_ws(',', oid, rolsuper, rolbypassrls, \
                                   rolinherit), ';' order by oid) from pg_catalog.pg_roles)))",
                        &[],
                    )
                    .await?;
                Ok(row.get::<_, String>(0))
            })
        })
        .await
    }
}

/// Sets role, claims and timeout for the rest of the transaction, as Supabase
/// does for its checks (so `auth.uid()`-style helpers read the claims).
async fn as_principal(
    tx: &tokio_postgres::Transaction<'_>,
    who: &Principal,
    timeout_ms: &str,
) -> Result<(), tokio_postgres::Error> {
    tx.query(
        "select set_config('role', $1, true), set_config('request.jwt.claims', $2, true), \
                set_config('request.jwt.claim.sub', $3, true), \
                set_config('request.jwt.claim.role', $1, true), \
                set_config('request.jwt.claim.email', $4, true), \
                set_config('statement_timeout', $5, true)",
        &[
            &who.role,
            &who.claims,
            &who.sub.as_deref().unwrap_or(""),
            &who.email.as_deref().unwrap_or(""),
            &timeout_ms,
        ],
    )
    .await
    .map(|_| ())
}

/// An identifier quoted for SQL.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}
