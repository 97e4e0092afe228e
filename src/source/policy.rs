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
//! The policies are evaluated over row images taken from the WAL, not over
//! the table (which may hold other values by then, or no row after a
//! DELETE). Each image is a JSON object of the row's columns: a `json`/`jsonb`
//! value as its JSON, any other value as a JSON string of the type's text
//! output (what pgoutput sends), which the populate functions feed to the
//! type's input function — so every value is exactly the row's.
//!
//! [`PolicyDb::judge_round`] judges one table's new images for every class
//! waiting (a class: one role and claims, one predicate), in rounds. Each
//! pool connection keeps, per table, a temp table of the table's columns (from
//! the catalog: types, typmods and collations, no constraints) plus
//! `"walcast ord"`, readable and insertable by `PUBLIC` (a session's own temp
//! schema is usable by whatever role it switches to). The load runs as the
//! round's first class's role and claims, so the types' input functions and
//! a domain's `CHECK` (the table owner's code) never run as walcast's own
//! user — as each class's own check did before rounds; what a class does to
//! the temp table ends with its savepoint. A round is one transaction, rolled
//! back, every statement sent before the first answer is read (one round
//! trip):
//!
//! ```sql
//! BEGIN;
//! SELECT set_config('statement_timeout', $ms, true);
//! SELECT set_config('role', $first_role, true), …;         -- the first class's
//! INSERT INTO pg_temp."walcast rls N <pid>-<random>"        -- the images, parsed once
//!   SELECT * FROM json_populate_recordset(NULL::pg_temp."walcast rls N …", $1);
//! SAVEPOINT "walcast class";
//! -- per class:
//! SELECT set_config('role', $role, true), set_config('request.jwt.claims', $claims, true),
//!        set_config('request.jwt.claim.sub', $sub, true), …;
//! SELECT "t"."walcast ord" FROM (SELECT * FROM pg_temp."walcast rls N …" OFFSET 0) AS "t"
//!  WHERE ((permissive_1) OR (permissive_2) …) AND (restrictive_1) AND …;
//! ROLLBACK TO SAVEPOINT "walcast class";
//! ROLLBACK;
//! ```
//!
//! The alias is the table's own name, so a policy's unqualified and qualified
//! column references (`owner_id`, `jobs.id` inside a subquery) resolve to the
//! image; subqueries and functions in a policy run as the subscriber's role,
//! under its claims, with the row security of the real tables they read — as
//! in PostgreSQL. A class that judges only some of the round's rows (its
//! channels' filters matched only those) reads them behind an `OFFSET 0`
//! fence (`WHERE "walcast ord" = ANY($1)`), so its policy never runs on —
//! nor raises for — another class's rows. A policy that reads the row as a
//! whole (`jobs.*`, whose type must be the table's) is judged by the
//! construction without a temp table below, in the same transaction.
//! Statements without per-round parameters are prepared once per connection
//! (planning a policy costs more than running it over a round's rows).
//!
//! A round's transaction has a time budget (the check timeout, for all of
//! it): the class whose check is running when it runs out fails with
//! [`CheckError::RoundTimeout`], and the connection, in an unknown state, is
//! dropped — its task aborted and its query cancelled, so its backend stops
//! ([`PolicyDb::discard`]). The classes after it never started: they get a
//! new round (once; should that one run out too, the classes it did not
//! judge fail). A round without a connection fails over to a new one
//! once, then runs class by class, the rest failing after a class times out
//! or once the budget is spent. Each class runs in
//! the savepoint and is rolled back to it: nothing a class's policy does (`set_config(…, true)`, `SET LOCAL`, temp
//! objects) reaches the next class, and a class whose statement fails (its
//! error is its verdict) does not abort the others. Should rolling back to
//! the savepoint fail, the classes after it are judged again in a new
//! transaction. When the images cannot be loaded into a temp table (a column
//! type the walcast user may not use…), the temp table is made again once,
//! then each class is judged alone by [`PolicyDb::check`]:
//!
//! ```sql
//! SELECT w.walcast_ord
//!   FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS w(walcast_img, walcast_ord)
//!   CROSS JOIN LATERAL jsonb_populate_record(NULL::"s"."t", w.walcast_img) AS "t"
//!  WHERE <predicate>;
//! ```
//!
//! Rolled-back rows stay in a temp table as dead tuples (temp tables are not
//! autovacuumed): it is vacuumed every 16,384 loaded rows. Temp tables
//! are made again when the images' columns (names, types) differ from theirs
//! and when policies or privileges changed ([`PolicyDb::invalidate_temps`]).
//! The test `rls::portal_policies_match_postgres_on_both_paths` compares the
//! verdicts with `SET ROLE …; SELECT … FROM t` on the same rows.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::MaybeDone;
use futures::TryStreamExt;
use tokio_postgres::types::{ToSql, Type};

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
    /// The table's columns those policies read (their dependencies in
    /// `pg_depend`: `USING` and `WITH CHECK`, subqueries included; a
    /// whole-row reference names no column).
    pub policy_columns: Vec<String>,
    /// The table's columns the publication does not stream (left out of its
    /// column list; a generated column, before PostgreSQL 18): a row image
    /// never has them, so a policy reading one cannot be judged on it.
    pub unstreamed: Vec<String>,
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
    pool: Vec<Mutex<Option<Conn>>>,
    next: AtomicUsize,
    timeout: Duration,
    /// Bumped when policies or privileges changed: temp tables are made again
    /// (a policy may read a column they lack).
    epoch: AtomicU64,
    /// Each table's temp table name (the same on every connection).
    temp_names: std::sync::Mutex<HashMap<(String, String), usize>>,
    /// Ends every temp table's name: the process id and a random number, so
    /// no real table a policy reads unqualified is shadowed by one (a
    /// session's temp schema is searched first).
    temp_suffix: String,
    /// Rounds judged ([`PolicyDb::judge_round`]).
    pub rounds: AtomicU64,
    /// Class checks that ran without a temp table (the round's rows could
    /// not be loaded into one).
    pub unloaded: AtomicU64,
    /// Rounds (or class-by-class fallbacks) that ran past the round's time
    /// budget: the classes not judged by then failed.
    pub round_timeouts: AtomicU64,
    /// The publication walcast streams (which columns a row image has).
    publication: Option<String>,
}

/// One pool connection, the temp tables it holds and its prepared
/// statements (by text; with the round they were last used in).
struct Conn {
    client: tokio_postgres::Client,
    /// The task driving the connection: aborted when the connection is
    /// dropped in an unknown state (see [`PolicyDb::discard`]).
    task: tokio::task::JoinHandle<()>,
    temps: HashMap<(String, String), Temp>,
    prepared: HashMap<String, (tokio_postgres::Statement, u64)>,
    /// Statements that could not be prepared (as the session user: a schema
    /// only the subscriber's role may use…): they run unprepared, as the role.
    unpreparable: std::collections::HashSet<String>,
    rounds: u64,
}

impl Conn {
    fn new((client, task): (tokio_postgres::Client, tokio::task::JoinHandle<()>)) -> Conn {
        Conn {
            client,
            task,
            temps: HashMap::new(),
            prepared: HashMap::new(),
            unpreparable: std::collections::HashSet::new(),
            rounds: 0,
        }
    }
}

/// A temp table of one table's row images on one connection.
struct Temp {
    /// Quoted name.
    name: String,
    epoch: u64,
    /// Its columns (type oids by name), as the catalog had them.
    columns: HashMap<String, u32>,
    /// Rows inserted (and rolled back) since the last `VACUUM`.
    dead: usize,
}

/// One class's part of a round ([`PolicyDb::judge_round`]).
pub struct RoundClass<'a> {
    pub who: &'a Principal,
    /// The policies combined as PostgreSQL does.
    pub predicate: &'a str,
    /// The predicate reads the row as a whole (`table.*`): judged over the
    /// images as values of the table's row type (the construction of
    /// [`PolicyDb::check`]), not over the temp table, whose row type differs.
    pub whole_row: bool,
    /// The class's rows: 1-based positions among the round's images.
    pub rows: &'a [u32],
}

/// An error of a check: the database's (a policy raised, a timeout) or the
/// connection's.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{0}")]
    Database(#[from] PgError),
    #[error("PostgreSQL did not answer within {0} ms")]
    Timeout(u64),
    /// The round this check was part of ran past its time budget before
    /// judging it.
    #[error("the round of row-level security checks took longer than auth.rls_check_timeout_ms ({0} ms)")]
    RoundTimeout(u64),
    #[error("{0}")]
    Other(String),
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
            epoch: AtomicU64::new(0),
            temp_names: std::sync::Mutex::new(HashMap::new()),
            temp_suffix: temp_suffix(),
            rounds: AtomicU64::new(0),
            unloaded: AtomicU64::new(0),
            round_timeouts: AtomicU64::new(0),
            publication: None,
        }
    }

    /// The publication whose row images are judged: [`PolicyDb::security`]
    /// then says which of a table's columns it does not stream.
    pub fn streaming(mut self, publication: Option<String>) -> Self {
        self.publication = publication;
        self
    }

    /// Policies or privileges changed: every temp table is made again before
    /// its next use.
    pub fn invalidate_temps(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
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
        if slot.as_ref().is_none_or(|c| c.client.is_closed()) {
            *slot = Some(Conn::new(
                crate::source::tls::connect_sql_task(&self.conn).await?,
            ));
        }
        let Some(Conn { client, .. }) = slot.as_mut() else {
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
                self.discard(slot.take());
                Err(CheckError::Timeout(deadline.as_millis() as u64))
            }
        }
    }

    /// Drops a connection in an unknown state (no answer in time, a round
    /// cut at its budget) so that its backend stops too: the task driving it
    /// is aborted (the socket closes: the backend ends at its next answer,
    /// nothing more of the pipeline runs) and what it is running is
    /// cancelled — never a backend left running a round nobody waits for,
    /// while the pool opens another.
    fn discard(&self, conn: Option<Conn>) {
        let Some(conn) = conn else { return };
        conn.task.abort();
        let token = conn.client.cancel_token();
        drop(conn);
        let info = self.conn.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::source::tls::cancel_sql(&info, &token).await {
                tracing::debug!(error = %e, "cancelling a dropped check connection's query failed");
            }
        });
    }

    /// What applies to a `SELECT` of `schema.table` by `role`.
    pub async fn security(
        &self,
        role: &str,
        schema: &str,
        table: &str,
    ) -> Result<TableSecurity, CheckError> {
        let (role, schema, table) = (role.to_string(), schema.to_string(), table.to_string());
        let publication = self.publication.clone();
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
                if !s.policies.is_empty() {
                    // Which columns the policies read, and which the stream
                    // lacks: `attnames` (PostgreSQL 15+, read through
                    // to_jsonb so older servers do not fail) is the column
                    // list; generated columns are never streamed before 18.
                    let names: Vec<String> = s.policies.iter().map(|p| p.name.clone()).collect();
                    let cols = c
                        .query(
                            "select a.attname::text, \
                                    exists (select 1 from pg_catalog.pg_depend d \
                                            join pg_catalog.pg_policy p on p.oid = d.objid \
                                            where d.classid = 'pg_catalog.pg_policy'::pg_catalog.regclass \
                                              and d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
                                              and d.refobjid = a.attrelid and d.refobjsubid = a.attnum \
                                              and p.polrelid = a.attrelid and p.polname = any($2)), \
                                    (a.attgenerated <> '' \
                                     and pg_catalog.current_setting('server_version_num')::int4 < 180000) \
                                    or not coalesce(( \
                                       select (pg_catalog.to_jsonb(pt) -> 'attnames') ? a.attname::text \
                                         from pg_catalog.pg_publication_tables pt \
                                        where pt.pubname = $3 and pt.schemaname = $4 \
                                          and pt.tablename = $5 limit 1), true) \
                             from pg_catalog.pg_attribute a \
                             where a.attrelid = $1::int8::oid and a.attnum > 0 \
                               and not a.attisdropped \
                             order by a.attnum",
                            &[&oid, &names, &publication, &schema, &table],
                        )
                        .await?;
                    for r in &cols {
                        let name: String = r.get(0);
                        if r.get::<_, bool>(2) {
                            s.unstreamed.push(name.clone());
                        }
                        if r.get::<_, bool>(1) {
                            s.policy_columns.push(name);
                        }
                    }
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
        let sql = row_typed_sql(schema, table, predicate);
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

    /// Judges one table's row images for several classes in one round: the
    /// images are loaded once into a temp table of the table's columns, then
    /// each class is judged over its rows of it, as its role and under its
    /// claims, every statement pipelined in one transaction (rolled back). Per
    /// class: the 1-based positions of the images it may see, or why its
    /// check failed — each class runs in its own savepoint, so a class whose
    /// policy raises fails alone and none sees what another's policy did.
    pub async fn judge_round(
        &self,
        schema: &str,
        table: &str,
        columns: &[(String, u32)],
        images: &[&str],
        classes: &[RoundClass<'_>],
    ) -> Vec<Result<Vec<u32>, CheckError>> {
        self.rounds.fetch_add(1, Ordering::Relaxed);
        let mut out: Vec<Result<Vec<u32>, CheckError>> = Vec::with_capacity(classes.len());
        let mut remake = false;
        let mut retried = false;
        let mut cut = false;
        while out.len() < classes.len() {
            let rest = &classes[out.len()..];
            match self
                .round_attempt(schema, table, columns, images, rest, remake)
                .await
            {
                Attempt::Judged(results) => {
                    let progress = !results.is_empty();
                    out.extend(results);
                    if !progress {
                        // Not expected: never loop without progress.
                        let e = "the round judged no class".to_string();
                        while out.len() < classes.len() {
                            out.push(Err(CheckError::Other(e.clone())));
                        }
                    }
                }
                Attempt::Cut(results) => {
                    // One slow class fails alone: those that never started
                    // get a round of their own, once (a second cut fails
                    // them: PostgreSQL is that slow for everyone).
                    out.extend(results);
                    if cut {
                        tracing::warn!(schema, table,
                            "a second round of checks ran past its time budget; failing the classes left");
                        while out.len() < classes.len() {
                            out.push(Err(CheckError::RoundTimeout(
                                self.timeout.as_millis() as u64
                            )));
                        }
                    } else {
                        tracing::debug!(schema, table,
                            "a round of checks ran past its time budget; the classes not started get another");
                    }
                    cut = true;
                }
                Attempt::OverBudget(e) => {
                    tracing::warn!(error = %e, schema, table,
                        "a round of checks ran past its time budget; failing the classes left");
                    while out.len() < classes.len() {
                        out.push(Err(CheckError::RoundTimeout(
                            self.timeout.as_millis() as u64
                        )));
                    }
                }
                Attempt::AllFailed(e) if !retried => {
                    // No connection, or no answer in time: once more (on a
                    // new connection: one that did not answer was dropped).
                    tracing::debug!(error = %e, schema, table,
                        "a round of checks failed; trying again");
                    retried = true;
                }
                Attempt::AllFailed(e) => {
                    // Class by class, each on its own; after a timeout the
                    // rest fail with it (PostgreSQL is not answering: never
                    // a timeout per class).
                    tracing::warn!(error = %e, schema, table,
                        "a round of checks failed twice; judging class by class");
                    let first = out.len();
                    let end = tokio::time::Instant::now() + self.timeout;
                    for c in rest {
                        if let Some(Err(CheckError::Timeout(ms))) = out[first..].last() {
                            let ms = *ms;
                            while out.len() < classes.len() {
                                out.push(Err(CheckError::Timeout(ms)));
                            }
                            break;
                        }
                        out.push(self.check_alone_until(end, schema, table, images, c).await);
                    }
                }
                Attempt::Unloaded(e) if !remake => {
                    tracing::debug!(error = %e, schema, table,
                        "loading row images into a temp table failed; making it again");
                    remake = true;
                }
                Attempt::Unloaded(e) => {
                    // Class by class, without a temp table.
                    self.unloaded
                        .fetch_add(rest.len() as u64, Ordering::Relaxed);
                    tracing::warn!(error = %e, schema, table,
                        "row images cannot be loaded into a temp table; judging class by class");
                    let end = tokio::time::Instant::now() + self.timeout;
                    for c in rest {
                        out.push(self.check_alone_until(end, schema, table, images, c).await);
                    }
                }
            }
        }
        if out
            .iter()
            .any(|r| matches!(r, Err(CheckError::RoundTimeout(_))))
        {
            self.round_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    /// [`PolicyDb::check_alone`] unless the budget ending at `end` ran out
    /// (class by class, a round still has one): then the class fails. A check
    /// begun is never cut short (its own timeout bounds it): the connection
    /// stays in a known state.
    async fn check_alone_until(
        &self,
        end: tokio::time::Instant,
        schema: &str,
        table: &str,
        images: &[&str],
        c: &RoundClass<'_>,
    ) -> Result<Vec<u32>, CheckError> {
        if tokio::time::Instant::now() >= end {
            return Err(CheckError::RoundTimeout(self.timeout.as_millis() as u64));
        }
        self.check_alone(schema, table, images, c).await
    }

    /// One class of a round judged alone, without a temp table
    /// ([`PolicyDb::check`]).
    async fn check_alone(
        &self,
        schema: &str,
        table: &str,
        images: &[&str],
        c: &RoundClass<'_>,
    ) -> Result<Vec<u32>, CheckError> {
        let mine: Vec<&str> = c
            .rows
            .iter()
            .map(|&r| images.get(r as usize - 1).copied().unwrap_or("{}"))
            .collect();
        self.check(c.who, schema, table, c.predicate, json_array(&mine))
            .await
            .map(|pass| positions(c.rows, &pass))
    }

    /// One transaction of a round on one connection, from `classes[0]` on.
    async fn round_attempt(
        &self,
        schema: &str,
        table: &str,
        columns: &[(String, u32)],
        images: &[&str],
        classes: &[RoundClass<'_>],
        remake: bool,
    ) -> Attempt {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len();
        let mut slot = self.pool[i].lock().await;
        if slot.as_ref().is_none_or(|c| c.client.is_closed()) {
            match crate::source::tls::connect_sql_task(&self.conn).await {
                Ok(client) => *slot = Some(Conn::new(client)),
                Err(e) => return Attempt::AllFailed(e.into()),
            }
        }
        let Some(conn) = slot.as_mut() else {
            return Attempt::AllFailed(CheckError::Timeout(0));
        };
        let deadline = self.timeout + Duration::from_secs(1);
        let timed_out = CheckError::Timeout(deadline.as_millis() as u64);
        let key = (schema.to_string(), table.to_string());
        let epoch = self.epoch.load(Ordering::Relaxed);
        let current = !remake
            && conn.temps.get(&key).is_some_and(|t| {
                t.epoch == epoch
                    && columns
                        .iter()
                        .all(|(n, oid)| t.columns.get(n).is_some_and(|o| *oid == 0 || o == oid))
            });
        if !current {
            conn.temps.remove(&key);
            let name = quote_ident(&format!(
                "walcast rls {} {}",
                self.temp_index(&key),
                self.temp_suffix
            ));
            match tokio::time::timeout(deadline, make_temp(&conn.client, schema, table, &name))
                .await
            {
                Ok(Ok(columns)) => {
                    conn.temps.insert(
                        key.clone(),
                        Temp {
                            name,
                            epoch,
                            columns,
                            dead: 0,
                        },
                    );
                }
                Ok(Err(e)) => return Attempt::Unloaded(e),
                Err(_) => {
                    self.discard(slot.take());
                    return Attempt::AllFailed(timed_out);
                }
            }
        }
        let Some(temp) = conn.temps.get_mut(&key) else {
            return Attempt::Unloaded(CheckError::Other("no temp table".into()));
        };
        temp.dead += images.len();
        let tmp = temp.name.clone();
        conn.rounds += 1;
        let round = conn.rounds;

        // The statements: the load, then per class its role and claims and
        // its judgement. Those without parameters that vary per round are
        // prepared once per connection (parsing and planning a policy costs
        // more than running it over a round's rows).
        let load = format!(
            "insert into pg_temp.{tmp} select * from \
             pg_catalog.json_populate_recordset(null::pg_temp.{tmp}, $1::text::json)"
        );
        let mut judge: Vec<(String, Vec<Param>, bool)> = Vec::with_capacity(classes.len());
        for c in classes {
            judge.push(if c.whole_row {
                let mine: Vec<&str> = c
                    .rows
                    .iter()
                    .map(|&r| images.get(r as usize - 1).copied().unwrap_or("{}"))
                    .collect();
                (
                    row_typed_sql(schema, table, c.predicate),
                    vec![text(&json_array(&mine))],
                    true,
                )
            } else {
                let (sql, params) = judge_sql(&tmp, table, c.predicate, c.rows, images.len());
                let prepare = params.is_empty();
                (sql, params, prepare)
            });
        }
        let mut wanted: Vec<&str> = vec![PRINCIPAL_SQL, &load];
        wanted.extend(judge.iter().filter(|j| j.2).map(|j| j.0.as_str()));
        let mut missing: Vec<String> = wanted
            .iter()
            .filter(|w| !conn.prepared.contains_key(**w) && !conn.unpreparable.contains(**w))
            .map(|w| w.to_string())
            .collect();
        drop(wanted);
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            let made =
                match tokio::time::timeout(deadline, prepare_all(&conn.client, &missing)).await {
                    Ok(made) => made,
                    Err(_) => {
                        self.discard(slot.take());
                        return Attempt::AllFailed(timed_out);
                    }
                };
            // Room for them: the least recently used go (never one this
            // round needs).
            let excess = (conn.prepared.len() + missing.len()).saturating_sub(MAX_PREPARED);
            if excess > 0 {
                let mut old: Vec<(u64, String)> = conn
                    .prepared
                    .iter()
                    .filter(|(_, (_, used))| *used < round)
                    .map(|(k, (_, used))| (*used, k.clone()))
                    .collect();
                old.sort_unstable();
                for (_, k) in old.into_iter().take(excess) {
                    conn.prepared.remove(&k);
                }
            }
            for (sql, r) in missing.into_iter().zip(made) {
                match r {
                    Ok(st) => {
                        conn.prepared.insert(sql, (st, round));
                    }
                    Err(e) => {
                        // Runs unprepared (parsed as the class's role).
                        tracing::debug!(error = %e, "a policy check cannot be prepared");
                        if conn.unpreparable.len() >= MAX_PREPARED {
                            conn.unpreparable.clear();
                        }
                        conn.unpreparable.insert(sql);
                    }
                }
            }
        }
        let mut stmt = |sql: &str, params: Vec<Param>| -> Stmt {
            match conn.prepared.get_mut(sql) {
                Some((st, used)) => {
                    *used = round;
                    Stmt::Prepared(st.clone(), params)
                }
                None => Stmt::Text(sql.to_string(), params),
            }
        };
        // The load runs the input functions of the columns' types (and a
        // domain's CHECK, the table owner's code) as the first class's role
        // and claims — never as walcast's own user.
        let Some(first) = classes.first() else {
            return Attempt::Judged(Vec::new());
        };
        let load_as = stmt(PRINCIPAL_SQL, principal_params(first.who));
        let load_stmt = stmt(&load, vec![text(&load_json(images))]);
        let mut per_class: Vec<Result<(Stmt, Stmt), CheckError>> =
            Vec::with_capacity(classes.len());
        for (c, (sql, params, _)) in classes.iter().zip(judge) {
            let principal = stmt(PRINCIPAL_SQL, principal_params(c.who));
            per_class.push(Ok((principal, stmt(&sql, params))));
        }
        let (outcome, keep) = pipeline(
            &conn.client,
            [load_as, load_stmt],
            per_class,
            classes,
            self.timeout,
        )
        .await;
        if keep {
            self.after_round(&mut slot, &key).await;
        } else {
            // In an unknown state (no answer, or the transaction may not
            // have begun): its temp tables cannot be trusted any more.
            self.discard(slot.take());
        }
        outcome
    }

    /// After a round's transaction: `VACUUM` the temp table once enough
    /// rolled-back rows piled up (every class's scan reads past them).
    async fn after_round(&self, slot: &mut Option<Conn>, key: &(String, String)) {
        let Some(conn) = slot.as_mut() else { return };
        let Some(temp) = conn.temps.get_mut(key) else {
            return;
        };
        if temp.dead < VACUUM_AFTER_ROWS {
            return;
        }
        temp.dead = 0;
        let sql = format!("vacuum pg_temp.{}", temp.name);
        let deadline = self.timeout + Duration::from_secs(1);
        match tokio::time::timeout(deadline, conn.client.batch_execute(&sql)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "vacuuming a temp table of row images failed");
                conn.temps.remove(key);
            }
            Err(_) => self.discard(slot.take()),
        }
    }

    /// The index in the temp table name of `key` (one per table, the same on
    /// every connection).
    fn temp_index(&self, key: &(String, String)) -> usize {
        let mut names = self.temp_names.lock().unwrap_or_else(|e| e.into_inner());
        let n = names.len();
        *names.entry(key.clone()).or_insert(n + 1)
    }

    /// A digest of everything that decides what a role may read: policies, row
    /// security flags, table and column privileges, role memberships and
    /// attributes, publications (which columns a row image has), and the
    /// columns of tables with row security (names, types, generated or
    /// dropped: a whole-row policy reads them all). It
    /// changes when any of them does.
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
                              from pg_catalog.pg_class \
                             where relkind in ('r', 'p') and relpersistence <> 't'), \
                           (select string_agg(concat_ws(',', attrelid, attnum, attacl::text), ';' \
                                   order by attrelid, attnum) \
                              from pg_catalog.pg_attribute where attacl is not null), \
                           (select string_agg(concat_ws(',', a.attrelid, a.attnum, a.attname, \
                                   a.atttypid, a.attgenerated, a.attisdropped), ';' \
                                   order by a.attrelid, a.attnum) \
                              from pg_catalog.pg_attribute a \
                              join pg_catalog.pg_class r on r.oid = a.attrelid \
                             where r.relrowsecurity and a.attnum > 0), \
                           (select string_agg(concat_ws(',', roleid, member), ';' \
                                   order by roleid, member) from pg_catalog.pg_auth_members), \
                           (select string_agg(concat_ws(',', oid, rolsuper, rolbypassrls, \
                                   rolinherit), ';' order by oid) from pg_catalog.pg_roles), \
                           (select string_agg(pg_catalog.to_jsonb(pb)::text, ';' order by pb.oid) \
                              from pg_catalog.pg_publication pb), \
                           (select string_agg(pg_catalog.to_jsonb(pr)::text, ';' order by pr.oid) \
                              from pg_catalog.pg_publication_rel pr)))",
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

/// The end of this process's temp table names: its id and 64 random bits
/// (from the standard library's randomly seeded hasher), hex.
fn temp_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{}-{:016x}", std::process::id(), h.finish())
}

/// An identifier quoted for SQL.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Rolled-back rows a temp table may hold before it is vacuumed.
const VACUUM_AFTER_ROWS: usize = 16_384;

/// How an attempt at a round ended.
enum Attempt {
    /// The verdicts of the classes from the first on (those after a class
    /// that got no answer in time, or whose savepoint could not be rolled
    /// back to, are not judged yet).
    Judged(Vec<Result<Vec<u32>, CheckError>>),
    /// The images could not be loaded (no temp table could be made, or the
    /// load failed): no class judged.
    Unloaded(CheckError),
    /// No class can be judged (no connection, or PostgreSQL did not answer).
    AllFailed(CheckError),
    /// The round's time budget ran out before any class was judged: they all
    /// fail (never tried again: that would take as long once more).
    OverBudget(CheckError),
    /// The budget ran out during a class's check: the verdicts up to it (it
    /// failed with [`CheckError::RoundTimeout`]); the classes after it never
    /// started and are tried once more in a new round.
    Cut(Vec<Result<Vec<u32>, CheckError>>),
}

/// Makes (again) the temp table `name` with `schema.table`'s columns (no
/// constraints, no defaults) and `"walcast ord"`, readable by every role:
/// the columns' type oids by name.
async fn make_temp(
    client: &tokio_postgres::Client,
    schema: &str,
    table: &str,
    name: &str,
) -> Result<HashMap<String, u32>, CheckError> {
    let rows = client
        .query(
            "select a.attname::text, a.atttypid::int8, \
                    pg_catalog.format('%I %s%s', a.attname, \
                        pg_catalog.format_type(a.atttypid, a.atttypmod), \
                        case when a.attcollation <> 0 and a.attcollation <> t.typcollation \
                             then pg_catalog.format(' collate %I.%I', cn.nspname, co.collname) \
                             else '' end) \
             from pg_catalog.pg_attribute a \
             join pg_catalog.pg_class c on c.oid = a.attrelid \
             join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
             join pg_catalog.pg_type t on t.oid = a.atttypid \
             left join pg_catalog.pg_collation co on co.oid = a.attcollation \
             left join pg_catalog.pg_namespace cn on cn.oid = co.collnamespace \
             where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p') \
               and a.attnum > 0 and not a.attisdropped \
             order by a.attnum",
            &[&schema, &table],
        )
        .await
        .map_err(|e| CheckError::Database(PgError::from_sql(e)))?;
    if rows.is_empty() {
        return Err(CheckError::Other(format!(
            "table {schema}.{table} not found"
        )));
    }
    let defs: Vec<String> = rows.iter().map(|r| r.get::<_, String>(2)).collect();
    let ddl = format!(
        "drop table if exists pg_temp.{name}; \
         create temp table {name} (\"walcast ord\" int4, {}); \
         grant select, insert on pg_temp.{name} to public",
        defs.join(", ")
    );
    client
        .batch_execute(&ddl)
        .await
        .map_err(|e| CheckError::Database(PgError::from_sql(e)))?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u32))
        .collect())
}

/// The load's parameter: the images as a JSON array, each with its 1-based
/// position as `"walcast ord"`.
fn load_json(images: &[&str]) -> String {
    let mut out = String::with_capacity(2 + images.iter().map(|i| i.len() + 20).sum::<usize>());
    out.push('[');
    for (i, img) in images.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!("{{\"walcast ord\":{}", i + 1));
        match img.strip_prefix('{') {
            Some(rest) if rest.trim_start().starts_with('}') => out.push('}'),
            Some(rest) => {
                out.push(',');
                out.push_str(rest);
            }
            None => out.push('}'),
        }
    }
    out.push(']');
    out
}

/// Images as one JSON array.
fn json_array(images: &[&str]) -> String {
    let mut out = String::with_capacity(2 + images.iter().map(|i| i.len() + 1).sum::<usize>());
    out.push('[');
    for (i, img) in images.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(img);
    }
    out.push(']');
    out
}

/// Positions in a class's own image list (1-based) as positions among the
/// round's images.
fn positions(rows: &[u32], pass: &[u32]) -> Vec<u32> {
    pass.iter()
        .filter_map(|&p| {
            (p as usize)
                .checked_sub(1)
                .and_then(|i| rows.get(i))
                .copied()
        })
        .collect()
}

/// A class's statement over the temp table `tmp` (quoted), always read
/// through a derived table (no system columns): the table's name as the
/// alias, so the policy's column references (`owner_id`, `jobs.id` in
/// a subquery) resolve to the image; when the class judges only some of the
/// round's rows, those are picked behind an `OFFSET 0` fence, so the policy
/// never runs on (and never raises for) another class's rows.
fn judge_sql(
    tmp: &str,
    table: &str,
    predicate: &str,
    rows: &[u32],
    loaded: usize,
) -> (String, Vec<Param>) {
    let t = quote_ident(table);
    let all = rows.len() == loaded && {
        let mut seen = vec![false; loaded + 1];
        rows.iter().all(|&r| {
            seen.get_mut(r as usize)
                .is_some_and(|s| !std::mem::replace(s, true))
        })
    };
    if all {
        (
            // A derived table, never the temp table itself: it has no
            // system columns (`tableoid`, `ctid`, `xmin` would be the temp
            // table's), so a policy reading them raises, as on the table.
            format!(
                "select {t}.\"walcast ord\" from (select * from pg_temp.{tmp} offset 0) as {t} \
                 where {predicate}"
            ),
            Vec::new(),
        )
    } else {
        let ords: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        (
            format!(
                "select {t}.\"walcast ord\" from (select * from pg_temp.{tmp} \
                 where \"walcast ord\" operator(pg_catalog.=) any($1::int4[]) offset 0) as {t} \
                 where {predicate}"
            ),
            vec![(Box::new(ords), Type::INT4_ARRAY)],
        )
    }
}

/// The construction without a temp table: `$1`, a JSON array of images,
/// each read as a value of the table's row type; the 1-based positions of
/// the images the predicate lets through.
fn row_typed_sql(schema: &str, table: &str, predicate: &str) -> String {
    format!(
        "select \"walcast images\".walcast_ord::int4 \
         from pg_catalog.jsonb_array_elements($1::text::jsonb) \
              with ordinality as \"walcast images\"(walcast_img, walcast_ord) \
         cross join lateral pg_catalog.jsonb_populate_record(null::{q}.{t}, \"walcast images\".walcast_img) as {t} \
         where {predicate}",
        q = quote_ident(schema),
        t = quote_ident(table),
    )
}

/// A parameter of a pipelined statement.
type Param = (Box<dyn ToSql + Sync + Send>, Type);

fn text(s: &str) -> Param {
    (Box::new(s.to_string()), Type::TEXT)
}

/// A statement sent, its answer read later.
type Sent<'c> = Pin<
    Box<
        MaybeDone<
            Pin<
                Box<
                    dyn Future<Output = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>>
                        + Send
                        + 'c,
                >,
            >,
        >,
    >,
>;

/// Statements every class runs first: its role and claims.
const PRINCIPAL_SQL: &str = "select pg_catalog.set_config('role', $1, true), \
     pg_catalog.set_config('request.jwt.claims', $2, true), \
     pg_catalog.set_config('request.jwt.claim.sub', $3, true), \
     pg_catalog.set_config('request.jwt.claim.role', $1, true), \
     pg_catalog.set_config('request.jwt.claim.email', $4, true)";

/// The parameters of [`PRINCIPAL_SQL`] for `who`.
fn principal_params(who: &Principal) -> Vec<Param> {
    vec![
        text(&who.role),
        text(&who.claims),
        text(who.sub.as_deref().unwrap_or("")),
        text(who.email.as_deref().unwrap_or("")),
    ]
}

/// The savepoint each class of a round runs in, rolled back to after it.
const CLASS_SAVEPOINT: &str = "\"walcast class\"";

/// Prepared statements a pool connection keeps at most.
const MAX_PREPARED: usize = 512;

/// A statement of a round: prepared, or parsed and planned with its
/// parameters (a class picking some of the round's rows: the custom plan
/// hashes the picked positions).
enum Stmt {
    Prepared(tokio_postgres::Statement, Vec<Param>),
    Text(String, Vec<Param>),
}

/// Prepares `texts`, all sent before the first answer is awaited.
async fn prepare_all(
    client: &tokio_postgres::Client,
    texts: &[String],
) -> Vec<Result<tokio_postgres::Statement, CheckError>> {
    type Preparing<'c> = Pin<
        Box<
            MaybeDone<
                Pin<
                    Box<
                        dyn Future<
                                Output = Result<tokio_postgres::Statement, tokio_postgres::Error>,
                            > + Send
                            + 'c,
                    >,
                >,
            >,
        >,
    >;
    let mut sent: Vec<Preparing<'_>> = Vec::with_capacity(texts.len());
    for t in texts {
        let f: Pin<Box<dyn Future<Output = _> + Send + '_>> = Box::pin(client.prepare(t));
        let mut f = Box::pin(futures::future::maybe_done(f));
        let _ = futures::poll!(f.as_mut());
        sent.push(f);
    }
    let mut out = Vec::with_capacity(sent.len());
    for mut f in sent {
        f.as_mut().await;
        out.push(match f.as_mut().take_output() {
            Some(r) => r.map_err(|e| CheckError::Database(PgError::from_sql(e))),
            None => Err(CheckError::Other("no answer to a prepare".into())),
        });
    }
    out
}

/// A round's transaction on `client`: `BEGIN`, the statement timeout, the
/// load (the first class's role and claims, then the images), a savepoint,
/// per class its role and claims, its judgement and the rollback to the
/// savepoint, `ROLLBACK` — all
/// sent at once, answers read in order. Classes whose statement could not be
/// made (`Err` in `per_class`) are skipped with that error. The outcome, and
/// whether the connection is still in a known state.
async fn pipeline(
    client: &tokio_postgres::Client,
    load: [Stmt; 2],
    per_class: Vec<Result<(Stmt, Stmt), CheckError>>,
    classes: &[RoundClass<'_>],
    timeout: Duration,
) -> (Attempt, bool) {
    // The round's time budget: every answer by then, or the classes not
    // judged yet fail with the timeout (never skipped, nor waited for).
    let round_end = tokio::time::Instant::now() + timeout;
    let over = || CheckError::RoundTimeout(timeout.as_millis() as u64);
    let mut statements: Vec<Stmt> = vec![
        Stmt::Text("begin".into(), Vec::new()),
        Stmt::Text(
            "select pg_catalog.set_config('statement_timeout', $1, true)".into(),
            vec![text(&timeout.as_millis().to_string())],
        ),
    ];
    statements.extend(load);
    statements.push(Stmt::Text(
        format!("savepoint {CLASS_SAVEPOINT}"),
        Vec::new(),
    ));
    const STAGE: usize = 5;
    let mut skipped: Vec<Option<CheckError>> = Vec::with_capacity(per_class.len());
    for c in per_class {
        match c {
            Ok((principal, judge)) => {
                statements.push(principal);
                statements.push(judge);
                // Whatever the class's policy did (settings, temp objects, a
                // raise) ends with it.
                statements.push(Stmt::Text(
                    format!("rollback to savepoint {CLASS_SAVEPOINT}"),
                    Vec::new(),
                ));
                skipped.push(None);
            }
            Err(e) => skipped.push(Some(e)),
        }
    }
    statements.push(Stmt::Text("rollback".into(), Vec::new()));

    // Each future's first poll sends its statement: all are sent, in order,
    // before the first answer is awaited.
    let mut sent: Vec<Sent<'_>> = Vec::with_capacity(statements.len());
    for st in statements {
        let f: Pin<Box<dyn Future<Output = _> + Send + '_>> = Box::pin(async move {
            let rows = match st {
                Stmt::Prepared(st, params) => {
                    client
                        .query_raw(&st, params.into_iter().map(|(v, _)| v))
                        .await?
                }
                Stmt::Text(sql, params) => client.query_typed_raw(&sql, params).await?,
            };
            rows.try_collect::<Vec<_>>().await
        });
        let mut f = Box::pin(futures::future::maybe_done(f));
        let _ = futures::poll!(f.as_mut());
        sent.push(f);
    }
    let mut answers = sent.into_iter();
    // `Err(None)`: no answer within the round's budget.
    let mut next = async || -> Result<Vec<tokio_postgres::Row>, Option<tokio_postgres::Error>> {
        let mut f = answers.next().ok_or(None)?;
        tokio::time::timeout_at(round_end, f.as_mut())
            .await
            .map_err(|_| None)?;
        f.as_mut().take_output().ok_or(None)?.map_err(Some)
    };
    for _ in 0..STAGE {
        match next().await {
            Ok(_) => {}
            Err(Some(e)) => {
                return (
                    Attempt::Unloaded(CheckError::Database(PgError::from_sql(e))),
                    false,
                )
            }
            Err(None) => return (Attempt::OverBudget(over()), false),
        }
    }
    let mut results = Vec::with_capacity(classes.len());
    for (c, skip) in classes.iter().zip(skipped) {
        if let Some(e) = skip {
            results.push(Err(e));
            continue;
        }
        // Its role and claims, its judgement: the first error is its
        // verdict (after one, the judgement fails as the transaction is
        // aborted, up to the savepoint's rollback).
        let principal = next().await;
        let judged = next().await;
        let r = match principal {
            Ok(_) => judged,
            Err(None) => Err(None),
            Err(e) => match judged {
                Err(None) => Err(None),
                _ => Err(e),
            },
        };
        let undone = match &r {
            Err(None) => Err(None),
            _ => next().await,
        };
        match r {
            Ok(rows) => {
                let pass: Vec<u32> = rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect();
                results.push(Ok(if c.whole_row {
                    positions(c.rows, &pass)
                } else {
                    pass
                }));
            }
            Err(Some(e)) => {
                results.push(Err(CheckError::Database(PgError::from_sql(e))));
            }
            Err(None) => {
                // Over budget: this class's own check ran past it and fails;
                // those after it never started (see `Attempt::Cut`).
                results.push(Err(over()));
                return (Attempt::Cut(results), false);
            }
        }
        match undone {
            Ok(_) => {}
            // Not expected: the rest of the pipeline fails (the transaction
            // is aborted) up to its ROLLBACK, which ends it; the classes
            // after this one are judged again in a new transaction.
            Err(Some(e)) => {
                tracing::debug!(error = %e, "rolling back to a class's savepoint failed");
                return (Attempt::Judged(results), true);
            }
            Err(None) => return (Attempt::Cut(results), false),
        }
    }
    let ended = next().await.is_ok();
    (Attempt::Judged(results), ended)
}
