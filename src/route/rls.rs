//! RLS mode: the database's own row-level security policies decide what a
//! subscriber receives (`[auth] rls = true`, or `rls_tables`).
//!
//! # Two paths
//!
//! For each (table, JWT role) walcast reads what PostgreSQL applies to a
//! `SELECT` by that role ([`PolicyDb::security`]): privileges, whether row
//! security applies, and the `SELECT`/`ALL` policies of the role. Then:
//!
//! - **Compiled** (no SQL per change): when every applicable policy's `USING`
//!   is built only of `true`/`false`, `column = <expr>` and `<expr> = <expr>`
//!   joined by `AND`/`OR`, where `<expr>` reads no column and calls only
//!   `auth.uid()`, `auth.role()`, `auth.jwt()`, `auth.email()` or
//!   `current_setting()` (also wrapped as `(SELECT auth.uid())`), the
//!   expressions are evaluated once per subscriber at join, under its role and
//!   claims, by PostgreSQL itself; the policies become a row rule
//!   (`owner_id=eq.<uid>`, ORs of such), evaluated in memory and indexed like
//!   any `eq` filter. A comparison is compiled only when the expression's type is
//!   the column's (integers with integers, `text` with `text`/`varchar`, `uuid`,
//!   `boolean`), so the in-memory comparison is PostgreSQL's.
//! - **SQL**: anything else (subqueries, other functions, casts on a column,
//!   other operators). Subscribers are grouped into *classes* (same role, same
//!   claims but `exp`/`iat`/`nbf`/`jti`, same table, same policies); the
//!   rows of sealed batches are judged in rounds: a worker takes the classes
//!   waiting, loads each table's new rows once and judges every class over
//!   them in one transaction ([`PolicyDb::judge_round`]) on a small pool of
//!   connections. A class has one round at a time; its next round takes
//!   every batch sealed meanwhile (rounds coalesce commits under load). The
//!   hub never waits: it queues each frame with a [`Ticket`] and the connection's writer waits for
//!   the verdict, so a slow check delays only that class's connections. A
//!   check that fails (a policy raised, a timeout, the queue of checks full)
//!   closes that class's channels with `RLS_CHECK_FAILED` naming the cause; no
//!   row is ever skipped silently.
//!
//! A policy is judged only on columns the stream carries: a join whose
//! policies read a column the publication does not stream (a column list, a
//! generated column; any, for a whole-row policy) is refused with the
//! reason ([`RlsAccess::Unjudgeable`]), and a class whose column leaves the
//! stream later has its channels closed at the next change — never a NULL
//! standing in for the value.
//!
//! Policies are combined as PostgreSQL does: permissive ones ORed, restrictive
//! ones ANDed with them; no permissive policy, no rows. INSERT and UPDATE are
//! judged on the new row image, DELETE on the old one (REPLICA IDENTITY FULL);
//! an UPDATE whose old image the subscriber may not see is delivered without
//! `old_record` values.
//!
//! # Changes to policies
//!
//! [`Rls::poll`] reads a digest of policies, row security flags, privileges
//! and roles every `auth.rls_poll_ms`; when it changes, the cache is dropped
//! and the generation bumped, and every session re-judges its channels as on a
//! token refresh (channels that lost access are closed, the others get the new
//! rules without a gap).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, watch, Notify};

use crate::config::PgConnInfo;
use crate::decode::event::{Cell, Change, ChangeKind, Row};
use crate::decode::relation::Table;
use crate::route::auth::{Claims, RowRule};
use crate::route::filter::Filter;
use crate::source::policy::{CheckError, Policy, PolicyDb, Principal, TableSecurity};

/// Classes whose check failed, each with the reason, until the hub has closed
/// their channels: one entry per class, so it is bounded by the live classes
/// and no failure is ever dropped (a lost notice would leave a channel open
/// with rows missing).
#[derive(Default)]
pub struct Failures {
    pending: Mutex<HashMap<u64, String>>,
    notify: Notify,
}

impl Failures {
    fn push(&self, class: u64, why: String) {
        if let Ok(mut p) = self.pending.lock() {
            p.entry(class).or_insert(why);
        }
        self.notify.notify_one();
    }

    /// Waits for failures and takes them all.
    pub async fn next(&self) -> Vec<(u64, String)> {
        loop {
            let notified = self.notify.notified();
            let taken: Vec<(u64, String)> = self
                .pending
                .lock()
                .map(|mut p| p.drain().collect())
                .unwrap_or_default();
            if !taken.is_empty() {
                return taken;
            }
            notified.await;
        }
    }
}

/// `system` code of a channel closed because its row-level security check failed.
pub const RLS_CHECK_FAILED: &str = "RLS_CHECK_FAILED";

/// Rows of one class judged by one query at most (a longer transaction makes
/// several batches).
const MAX_BATCH_ROWS: usize = 512;

/// Claims that change on every token refresh: not part of a class, not passed
/// to the policies.
const VOLATILE_CLAIMS: [&str; 4] = ["exp", "iat", "nbf", "jti"];

/// RLS-mode settings (from `[auth]`).
#[derive(Clone, Debug)]
pub struct RlsSettings {
    /// Connections of the check pool.
    pub pool: usize,
    /// Longest round of checks (and each check in it).
    pub timeout: Duration,
    /// Checks waiting for a connection, at most.
    pub queue: usize,
    /// Compile what can be compiled (false: every policy runs as SQL).
    pub compile: bool,
    /// The publication streamed: a policy reading a column it does not
    /// stream cannot be judged on a row image.
    pub publication: Option<String>,
}

/// What a subscriber may see of a table under RLS.
pub enum RlsAccess {
    /// No such role, no such table, or no `SELECT` privilege.
    Denied(String),
    /// The role may read the table, but its policies read a column the
    /// stream does not carry: its rows cannot be judged (the join is refused
    /// with this reason).
    Unjudgeable(String),
    Allowed {
        rows: RowRule,
        /// Columns the role may read, when not all.
        columns: Option<Vec<String>>,
        /// Rows are judged by SQL per transaction (`rows` is then `All`).
        sql: Option<Arc<SqlClass>>,
    },
}

/// How one table's policies are enforced for one role (the status page's view).
#[derive(Clone, Debug, serde::Serialize)]
pub struct PlanReport {
    pub table: String,
    pub role: String,
    /// `compiled`, `sql`, `no rows` (no permissive policy), `unrestricted`
    /// (row security off or not applying to the role) or `denied`.
    pub path: String,
    pub policies: Vec<String>,
    pub why: String,
}

/// Counters for metrics.
#[derive(Default)]
pub struct RlsStats {
    pub checks_ok: AtomicU64,
    pub checks_failed: AtomicU64,
    pub rows_checked: AtomicU64,
    pub check_micros: AtomicU64,
    pub queued: AtomicU64,
    pub compiled_joins: AtomicU64,
    pub sql_joins: AtomicU64,
    pub policy_reloads: AtomicU64,
    /// Changes the SQL path could not judge (a value missing from the image).
    pub unjudgeable: AtomicU64,
    /// Joins refused, and changes not delivered (their class's channels
    /// closed), because the policies read a column the stream does not carry.
    pub unstreamed: AtomicU64,
    /// Rounds of checks that ran past `rls_check_timeout_ms` (the classes not
    /// judged by then had their channels closed).
    pub round_timeouts: AtomicU64,
    /// Rounds of checks (one table's rows loaded once, its classes judged in
    /// one transaction).
    pub rounds: AtomicU64,
    /// Class checks judged without the round's temp table (its rows could not
    /// be loaded into one).
    pub unloaded: AtomicU64,
}

/// A policy's `USING`, parsed into the shapes the compiled path handles.
#[derive(Clone, Debug, PartialEq)]
enum Pred {
    Const(bool),
    /// `column = expr` (expr: an index into the plan's expressions).
    Eq {
        column: String,
        expr: usize,
    },
    /// A column-free comparison, evaluated once (as a boolean expression).
    Bool {
        expr: usize,
    },
    And(Vec<Pred>),
    Or(Vec<Pred>),
}

/// A (table, role)'s policies, parsed.
#[derive(Clone, Debug)]
enum Plan {
    /// Row security does not restrict this role.
    Unrestricted,
    /// No permissive policy applies: no rows.
    Nothing,
    Compiled {
        permissive: Vec<Pred>,
        restrictive: Vec<Pred>,
        exprs: Vec<String>,
    },
    Sql {
        predicate: String,
        why: String,
    },
}

struct Entry {
    security: TableSecurity,
    plan: Plan,
    /// The columns a row image must have for the policies to be judged on it
    /// (those they read; every streamed one for a whole-row policy).
    needs: Vec<String>,
    /// Why rows cannot be judged: the policies read these columns, which the
    /// publication does not stream.
    missing: Vec<String>,
    /// The table's columns (as streamed) this entry was made for.
    columns: Vec<String>,
}

/// RLS mode's state: the policy cache, the classes of the SQL path, the check
/// workers' queue.
pub struct Rls {
    db: Arc<PolicyDb>,
    settings: RlsSettings,
    cache: tokio::sync::Mutex<HashMap<(String, String, String), Arc<Entry>>>,
    classes: Mutex<HashMap<String, Weak<SqlClass>>>,
    reports: Mutex<HashMap<(String, String), PlanReport>>,
    generation: watch::Sender<u64>,
    next_class: AtomicU64,
    gate: Arc<Gate>,
    failed: Arc<Failures>,
    pub stats: Arc<RlsStats>,
}

impl Rls {
    /// RLS mode on `conn`; check failures are reported on [`Rls::failures`]
    /// (the daemon has the hub close the class's channels).
    pub fn new(conn: PgConnInfo, settings: RlsSettings) -> Arc<Rls> {
        let failed = Arc::new(Failures::default());
        let db = Arc::new(
            PolicyDb::new(conn, settings.pool, settings.timeout)
                .streaming(settings.publication.clone()),
        );
        let stats = Arc::new(RlsStats::default());
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let gate = Arc::new(Gate {
            pending: Mutex::new(Vec::new()),
            jobs: tx,
            failed: failed.clone(),
            stats: stats.clone(),
            last: Mutex::new(None),
            seq: AtomicU64::new(0),
        });
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..settings.pool.max(1) {
            tokio::spawn(worker(
                db.clone(),
                rx.clone(),
                failed.clone(),
                stats.clone(),
            ));
        }
        Arc::new(Rls {
            db,
            settings,
            cache: tokio::sync::Mutex::new(HashMap::new()),
            classes: Mutex::new(HashMap::new()),
            reports: Mutex::new(HashMap::new()),
            generation: watch::channel(0).0,
            next_class: AtomicU64::new(1),
            gate,
            failed,
            stats,
        })
    }

    /// Classes whose check failed (their channels must be closed).
    pub fn failures(&self) -> Arc<Failures> {
        self.failed.clone()
    }

    /// The hub's side of the SQL path: sealing batches at commits.
    pub fn gate(&self) -> Arc<Gate> {
        self.gate.clone()
    }

    /// Bumps whenever policies, privileges or roles changed (sessions re-judge).
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// How each (table, role) seen so far is enforced.
    pub fn reports(&self) -> Vec<PlanReport> {
        let mut v: Vec<PlanReport> = self
            .reports
            .lock()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| (&a.table, &a.role).cmp(&(&b.table, &b.role)));
        v
    }

    /// Watches for policy changes every `every` until `stop`.
    pub async fn poll(self: Arc<Self>, every: Duration, stop: tokio_util::sync::CancellationToken) {
        let mut last: Option<String> = None;
        loop {
            match self.db.fingerprint().await {
                Ok(f) => {
                    if last.as_ref().is_some_and(|l| *l != f) {
                        tracing::info!("row-level security policies or privileges changed: re-judging channels");
                        // Reports stay until the re-judging rewrites them: a
                        // status read meanwhile shows the last known path.
                        self.db.invalidate_temps();
                        self.cache.lock().await.clear();
                        self.stats.policy_reloads.fetch_add(1, Ordering::Relaxed);
                        self.generation.send_modify(|g| *g += 1);
                    }
                    last = Some(f);
                }
                Err(e) => tracing::debug!(error = %e, "cannot read the policy digest"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// What `claims` may see of `table` under its policies.
    pub async fn access(&self, table: &Arc<Table>, claims: &Claims) -> RlsAccess {
        let Some(role) = claims.get("role").and_then(Value::as_str) else {
            return RlsAccess::Denied("the token has no role claim (RLS mode needs one)".into());
        };
        let name = format!("{}.{}", table.schema, table.name);
        let entry = match self.entry(role, table).await {
            Ok(e) => e,
            Err(e) => return RlsAccess::Denied(format!("cannot read the policies of {name}: {e}")),
        };
        let s = &entry.security;
        if !s.role_exists {
            return RlsAccess::Denied(format!("role {role:?} does not exist in the database"));
        }
        if !s.table_exists || !s.select {
            return RlsAccess::Denied(format!("role {role:?} has no SELECT privilege on {name}"));
        }
        if let Some(col) = entry.missing.first() {
            // Never judged on a NULL standing in for a value the stream lacks.
            self.stats.unstreamed.fetch_add(1, Ordering::Relaxed);
            return RlsAccess::Unjudgeable(format!(
                "cannot subscribe to {name} in RLS mode: its row-level security policies read \
                 column {col:?}, which publication {:?} does not stream (left out of its column \
                 list, or a generated column), so its rows cannot be judged",
                self.settings.publication.as_deref().unwrap_or("")
            ));
        }
        let columns = s.columns.clone();
        let who = principal(role, claims);
        let report = |path: &str, why: String| PlanReport {
            table: name.clone(),
            role: role.to_string(),
            path: path.to_string(),
            policies: s.policies.iter().map(|p| p.name.clone()).collect(),
            why,
        };
        let (rows, sql, rep) = match &entry.plan {
            Plan::Unrestricted => (
                RowRule::All,
                None,
                report(
                    "unrestricted",
                    s.exempt
                        .unwrap_or("row security is not enabled on the table")
                        .to_string(),
                ),
            ),
            Plan::Nothing => (
                RowRule::Nothing,
                None,
                report(
                    "no rows",
                    "no permissive SELECT policy applies to the role".into(),
                ),
            ),
            Plan::Compiled {
                permissive,
                restrictive,
                exprs,
            } => match self
                .compile_for(&who, table, permissive, restrictive, exprs)
                .await
            {
                Ok(rule) => {
                    self.stats.compiled_joins.fetch_add(1, Ordering::Relaxed);
                    (
                        rule,
                        None,
                        report("compiled", "every policy has a compiled shape".into()),
                    )
                }
                Err(why) => {
                    let predicate = sql_predicate(&s.policies);
                    self.stats.sql_joins.fetch_add(1, Ordering::Relaxed);
                    let class = self.class(&who, table, &predicate, &entry.needs);
                    (RowRule::All, Some(class), report("sql", why))
                }
            },
            Plan::Sql { predicate, why } => {
                self.stats.sql_joins.fetch_add(1, Ordering::Relaxed);
                let class = self.class(&who, table, predicate, &entry.needs);
                (RowRule::All, Some(class), report("sql", why.clone()))
            }
        };
        if let Ok(mut r) = self.reports.lock() {
            r.insert((name.clone(), role.to_string()), rep);
        }
        RlsAccess::Allowed { rows, columns, sql }
    }

    async fn entry(&self, role: &str, table: &Table) -> Result<Arc<Entry>, CheckError> {
        let key = (role.to_string(), table.schema.clone(), table.name.clone());
        if let Some(e) = self.cache.lock().await.get(&key) {
            // Made for the table as the stream describes it now (a column
            // added, renamed or dropped changes what the policies need).
            if e.columns.len() == table.columns.len()
                && e.columns
                    .iter()
                    .zip(&table.columns)
                    .all(|(a, b)| *a == b.name)
            {
                return Ok(e.clone());
            }
        }
        let security = self.db.security(role, &table.schema, &table.name).await?;
        let plan = plan(&security, table, self.settings.compile);
        let (needs, missing) = match plan {
            Plan::Unrestricted | Plan::Nothing => (Vec::new(), Vec::new()),
            Plan::Compiled { .. } | Plan::Sql { .. } => {
                if reads_whole_row(&sql_predicate(&security.policies), &table.name) {
                    // The whole row: every column must be streamed.
                    let streamed = table
                        .columns
                        .iter()
                        .map(|c| c.name.clone())
                        .filter(|c| !security.unstreamed.contains(c))
                        .collect();
                    (streamed, security.unstreamed.clone())
                } else {
                    let missing = security
                        .policy_columns
                        .iter()
                        .filter(|c| security.unstreamed.contains(c))
                        .cloned()
                        .collect();
                    (security.policy_columns.clone(), missing)
                }
            }
        };
        let e = Arc::new(Entry {
            security,
            plan,
            needs,
            missing,
            columns: table.columns.iter().map(|c| c.name.clone()).collect(),
        });
        self.cache.lock().await.insert(key, e.clone());
        Ok(e)
    }

    /// The row rule of compiled policies for one principal: their expressions
    /// evaluated by PostgreSQL under its role and claims. `Err`: why this
    /// principal needs the SQL path after all (a type the in-memory comparison
    /// does not share with PostgreSQL).
    async fn compile_for(
        &self,
        who: &Principal,
        table: &Table,
        permissive: &[Pred],
        restrictive: &[Pred],
        exprs: &[String],
    ) -> Result<RowRule, String> {
        let mut asked: Vec<String> = exprs.to_vec();
        asked.extend(exprs.iter().map(|e| format!("pg_catalog.pg_typeof(({e}))")));
        let got = self
            .db
            .constants(who, &asked)
            .await
            .map_err(|e| format!("evaluating the policies' expressions failed: {e}"))?;
        let (values, types) = got.split_at(exprs.len());
        let resolve = |p: &Pred| resolve(p, table, values, types);
        let mut all = Vec::new();
        let perm: Result<Vec<Resolved>, String> = permissive.iter().map(resolve).collect();
        all.push(simplify(Resolved::Or(perm?)));
        for r in restrictive {
            all.push(resolve(r)?);
        }
        match simplify(Resolved::And(all)) {
            Resolved::True => Ok(RowRule::All),
            Resolved::False => Ok(RowRule::Nothing),
            r => {
                let text = render_top(&r);
                Filter::parse(&text)
                    .map(RowRule::Filter)
                    .map_err(|e| format!("the compiled rule {text:?} is not a valid filter: {e}"))
            }
        }
    }

    /// The class of `who` for `table` under `predicate` (shared by every channel
    /// of the same class).
    fn class(
        &self,
        who: &Principal,
        table: &Arc<Table>,
        predicate: &str,
        needs: &[String],
    ) -> Arc<SqlClass> {
        let key = format!(
            "{}\u{0}{}\u{0}{}.{}\u{0}{}",
            who.role, who.claims, table.schema, table.name, predicate
        );
        let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        // A class whose check failed is closing its channels: a new join
        // gets a fresh one.
        if let Some(c) = classes.get(&key).and_then(Weak::upgrade) {
            if c.failed.get().is_none() {
                return c;
            }
        }
        // Forget classes nobody holds any more, now and then (amortized).
        if classes.len() % 1024 == 1023 {
            classes.retain(|_, w| w.strong_count() > 0);
        }
        let c = Arc::new(SqlClass {
            id: self.next_class.fetch_add(1, Ordering::Relaxed),
            who: who.clone(),
            schema: table.schema.clone(),
            table: table.name.clone(),
            predicate: predicate.to_string(),
            whole_row: reads_whole_row(predicate, &table.name),
            needs: needs.to_vec(),
            layout: Mutex::new(None),
            failed: OnceLock::new(),
            open: Mutex::new(None),
            sealed: Mutex::new(Sealed::default()),
            gate: Arc::downgrade(&self.gate),
        });
        classes.insert(key, Arc::downgrade(&c));
        c
    }
}

/// The principal of a token: its role and its claims without the ones that
/// change on every refresh.
fn principal(role: &str, claims: &Claims) -> Principal {
    let mut c = claims.clone();
    for k in VOLATILE_CLAIMS {
        c.remove(k);
    }
    Principal {
        role: role.to_string(),
        claims: Value::Object(c.clone()).to_string(),
        sub: c.get("sub").and_then(Value::as_str).map(str::to_string),
        email: c.get("email").and_then(Value::as_str).map(str::to_string),
    }
}

/// How a (table, role)'s policies are enforced.
fn plan(s: &TableSecurity, table: &Table, compile: bool) -> Plan {
    if !s.row_security {
        return Plan::Unrestricted;
    }
    let reads = |p: &&Policy| p.using.is_some();
    if !s.policies.iter().filter(reads).any(|p| p.permissive) {
        return Plan::Nothing;
    }
    let predicate = sql_predicate(&s.policies);
    if !compile {
        return Plan::Sql {
            predicate,
            why: "compiling is off (auth.rls_compile = false)".into(),
        };
    }
    let mut exprs = Vec::new();
    let mut permissive = Vec::new();
    let mut restrictive = Vec::new();
    for p in s.policies.iter().filter(reads) {
        let text = p.using.as_deref().unwrap_or("true");
        match parse_policy(text, table, &mut exprs) {
            Ok(pred) if p.permissive => permissive.push(pred),
            Ok(pred) => restrictive.push(pred),
            Err(why) => {
                return Plan::Sql {
                    predicate,
                    why: format!("policy {:?} ({text}): {why}", p.name),
                }
            }
        }
    }
    Plan::Compiled {
        permissive,
        restrictive,
        exprs,
    }
}

/// The policies combined as PostgreSQL combines them for a read.
fn sql_predicate(policies: &[Policy]) -> String {
    let perm: Vec<String> = policies
        .iter()
        .filter(|p| p.permissive)
        .filter_map(|p| p.using.as_ref().map(|u| format!("({u})")))
        .collect();
    let mut out = if perm.is_empty() {
        "false".to_string()
    } else {
        format!("({})", perm.join(" OR "))
    };
    for p in policies.iter().filter(|p| !p.permissive) {
        if let Some(u) = &p.using {
            out.push_str(&format!(" AND ({u})"));
        }
    }
    out
}

// ---- parsing pg_get_expr's text into compiled shapes ----

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    /// A quoted identifier.
    Quoted(String),
    Str(String),
    Num(String),
    Op(String),
}

/// The text of the quoted token opening at `start` (`q` doubled inside stands
/// for itself) and where it ends.
fn quoted(s: &str, start: usize, q: u8, what: &str) -> Result<(String, usize), String> {
    let b = s.as_bytes();
    let mut v = String::new();
    let mut i = start + 1;
    loop {
        match b.get(i) {
            None => return Err(format!("unterminated {what}")),
            Some(&c) if c == q && b.get(i + 1) == Some(&q) => {
                v.push(q as char);
                i += 2;
            }
            Some(&c) if c == q => return Ok((v, i + 1)),
            Some(_) => {
                let ch = s[i..].chars().next().unwrap_or('\0');
                v.push(ch);
                i += ch.len_utf8();
            }
        }
    }
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'\'' {
            let (v, next) = quoted(s, i, b'\'', "string")?;
            out.push(Tok::Str(v));
            i = next;
        } else if c == b'"' {
            let (v, next) = quoted(s, i, b'"', "identifier")?;
            out.push(Tok::Quoted(v));
            i = next;
        } else if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            let start = i;
            while i < b.len()
                && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$' || b[i] >= 0x80)
            {
                i += 1;
            }
            out.push(Tok::Ident(s[start..i].to_string()));
        } else if c.is_ascii_digit() {
            let start = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            out.push(Tok::Num(s[start..i].to_string()));
        } else if matches!(c, b'(' | b')' | b',' | b'.' | b'[' | b']') {
            out.push(Tok::Op((c as char).to_string()));
            i += 1;
        } else {
            let start = i;
            while i < b.len() && b"+-*/<>=~!@#%^&|`?:".contains(&b[i]) {
                i += 1;
            }
            if i == start {
                return Err(format!("unexpected character {:?}", c as char));
            }
            out.push(Tok::Op(s[start..i].to_string()));
        }
    }
    Ok(out)
}

fn is_kw(t: &Tok, kw: &str) -> bool {
    matches!(t, Tok::Ident(s) if s.eq_ignore_ascii_case(kw))
}

fn is_op(t: &Tok, op: &str) -> bool {
    matches!(t, Tok::Op(s) if s == op)
}

/// The index of the `)` closing the `(` at `open`.
fn closing(toks: &[Tok], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, t) in toks.iter().enumerate().skip(open) {
        if is_op(t, "(") {
            depth += 1;
        } else if is_op(t, ")") {
            depth -= 1;
            if depth == 0 {
                return Some(i);
            }
        }
    }
    None
}

/// Splits at depth-0 tokens for which `at` holds.
fn split_top(toks: &[Tok], at: impl Fn(&Tok) -> bool) -> Vec<&[Tok]> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, t) in toks.iter().enumerate() {
        if is_op(t, "(") {
            depth += 1;
        } else if is_op(t, ")") {
            depth -= 1;
        } else if depth == 0 && at(t) {
            parts.push(&toks[start..i]);
            start = i + 1;
        }
    }
    parts.push(&toks[start..]);
    parts
}

fn render_tokens(toks: &[Tok]) -> String {
    let mut out = String::new();
    for t in toks {
        let piece = match t {
            Tok::Ident(s) | Tok::Num(s) | Tok::Op(s) => s.clone(),
            Tok::Quoted(s) => crate::source::policy::quote_ident(s),
            Tok::Str(s) => format!("'{}'", s.replace('\'', "''")),
        };
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&piece);
    }
    out
}

/// Functions a column-free expression may call: they read only the role and
/// the claims (as Supabase's helpers do).
const CLAIM_FUNCTIONS: [(&str, &str); 5] = [
    ("auth", "uid"),
    ("auth", "role"),
    ("auth", "jwt"),
    ("auth", "email"),
    ("", "current_setting"),
];

/// Whether `toks` read no column and call only [`CLAIM_FUNCTIONS`]; `Err`
/// names what is not allowed.
fn claim_expr(toks: &[Tok]) -> Result<(), String> {
    if toks.is_empty() {
        return Err("an empty operand".into());
    }
    let mut i = 0;
    let mut after_cast = false;
    while i < toks.len() {
        let t = &toks[i];
        match t {
            Tok::Str(_) | Tok::Num(_) => after_cast = false,
            Tok::Op(o) => {
                after_cast = o == "::";
            }
            Tok::Quoted(q) if after_cast => {
                let _ = q;
            }
            Tok::Quoted(q) => return Err(format!("it reads {q:?}")),
            Tok::Ident(w) => {
                let lw = w.to_ascii_lowercase();
                if after_cast
                    || matches!(
                        lw.as_str(),
                        "true"
                            | "false"
                            | "null"
                            | "select"
                            | "as"
                            | "varying"
                            | "with"
                            | "time"
                            | "zone"
                            | "without"
                            | "precision"
                    )
                {
                    // a type name's words, a keyword of `(SELECT f() AS x)`
                    if lw == "as" {
                        // the alias after AS
                        i += 1;
                    }
                } else if toks.get(i + 1).is_some_and(|n| is_op(n, "(")) {
                    let schema = if i >= 2 && is_op(&toks[i - 1], ".") {
                        match &toks[i - 2] {
                            Tok::Ident(s) => s.to_ascii_lowercase(),
                            _ => String::new(),
                        }
                    } else {
                        String::new()
                    };
                    let ok = CLAIM_FUNCTIONS.iter().any(|(s, f)| {
                        *f == lw
                            && (s.is_empty() && (schema.is_empty() || schema == "pg_catalog")
                                || *s == schema)
                    });
                    if !ok {
                        let name = if schema.is_empty() {
                            lw
                        } else {
                            format!("{schema}.{lw}")
                        };
                        return Err(format!("it calls {name}()"));
                    }
                } else if toks.get(i + 1).is_some_and(|n| is_op(n, ".")) {
                    // a schema qualifier: checked with its function
                    if !toks.get(i + 3).is_some_and(|n| is_op(n, "(")) {
                        return Err(format!("it reads {w}.…"));
                    }
                } else {
                    return Err(format!("it reads {w:?}"));
                }
                if matches!(lw.as_str(), "from" | "where" | "join") {
                    return Err("it has a subquery".into());
                }
            }
        }
        i += 1;
    }
    Ok(())
}

/// The column a side of `=` is, if it is a bare (possibly table-qualified)
/// column of `table`.
fn column_ref(toks: &[Tok], table: &Table) -> Option<String> {
    let name = |t: &Tok| match t {
        Tok::Ident(s) => Some(s.clone()),
        Tok::Quoted(s) => Some(s.clone()),
        _ => None,
    };
    let col = match toks {
        [c] => name(c)?,
        [t, dot, c] if is_op(dot, ".") && name(t).as_deref() == Some(table.name.as_str()) => {
            name(c)?
        }
        _ => return None,
    };
    table.column_index(&col).map(|_| col)
}

fn strip_parens(mut toks: &[Tok]) -> &[Tok] {
    while toks.len() >= 2 && is_op(&toks[0], "(") && closing(toks, 0) == Some(toks.len() - 1) {
        toks = &toks[1..toks.len() - 1];
    }
    toks
}

/// Whether a policy's `USING` has a compiled shape (`Err`: why it runs as
/// SQL), for `walcast status`. At join the values' types must match the
/// columns' too.
pub fn policy_shape(
    using: &str,
    schema: &str,
    table: &str,
    columns: &[String],
) -> Result<(), String> {
    let t = Table {
        id: crate::decode::pgoutput::RelId(0),
        schema: schema.to_string(),
        name: table.to_string(),
        replica_identity: crate::decode::pgoutput::ReplicaIdentity::Default,
        columns: columns
            .iter()
            .map(|c| crate::decode::relation::Column {
                name: c.clone(),
                ty: Arc::new(crate::decode::value::PgType::new(
                    0,
                    "unknown",
                    crate::decode::value::TypeKind::Text,
                )),
                key: false,
            })
            .collect(),
        json: Default::default(),
    };
    parse_policy(using, &t, &mut Vec::new()).map(|_| ())
}

/// Parses a policy's `USING` into a [`Pred`], collecting its column-free
/// expressions into `exprs`; `Err` says why it needs the SQL path.
fn parse_policy(text: &str, table: &Table, exprs: &mut Vec<String>) -> Result<Pred, String> {
    let toks = tokenize(text)?;
    parse_pred(&toks, table, exprs, 0)
}

fn parse_pred(
    toks: &[Tok],
    table: &Table,
    exprs: &mut Vec<String>,
    depth: usize,
) -> Result<Pred, String> {
    if depth > 8 {
        return Err("nested too deep".into());
    }
    let toks = strip_parens(toks);
    let ors = split_top(toks, |t| is_kw(t, "or"));
    if ors.len() > 1 {
        return ors
            .iter()
            .map(|p| parse_pred(p, table, exprs, depth + 1))
            .collect::<Result<_, _>>()
            .map(Pred::Or);
    }
    let ands = split_top(toks, |t| is_kw(t, "and"));
    if ands.len() > 1 {
        return ands
            .iter()
            .map(|p| parse_pred(p, table, exprs, depth + 1))
            .collect::<Result<_, _>>()
            .map(Pred::And);
    }
    match toks {
        [t] if is_kw(t, "true") => return Ok(Pred::Const(true)),
        [t] if is_kw(t, "false") => return Ok(Pred::Const(false)),
        _ => {}
    }
    if toks.iter().any(|t| is_kw(t, "not")) {
        return Err("NOT is not compiled".into());
    }
    let sides = split_top(toks, |t| is_op(t, "="));
    let [l, r] = sides[..] else {
        return Err("only `column = value` comparisons are compiled".into());
    };
    let (l, r) = (strip_parens(l), strip_parens(r));
    let (lc, rc) = (column_ref(l, table), column_ref(r, table));
    let lx = claim_expr(l);
    let rx = claim_expr(r);
    let mut push = |t: &[Tok]| {
        exprs.push(render_tokens(t));
        exprs.len() - 1
    };
    match (lc, rc, lx, rx) {
        (Some(column), None, _, Ok(())) => Ok(Pred::Eq {
            column,
            expr: push(r),
        }),
        (None, Some(column), Ok(()), _) => Ok(Pred::Eq {
            column,
            expr: push(l),
        }),
        (None, None, Ok(()), Ok(())) => Ok(Pred::Bool { expr: push(toks) }),
        (Some(_), Some(_), _, _) => Err("a comparison of two columns".into()),
        (Some(_), None, _, Err(e)) | (None, Some(_), Err(e), _) => Err(e),
        (_, _, Err(e), _) | (_, _, _, Err(e)) => Err(e),
    }
}

/// A compiled predicate with its expressions' values.
#[derive(Clone, Debug, PartialEq)]
enum Resolved {
    True,
    False,
    Eq(String, String),
    And(Vec<Resolved>),
    Or(Vec<Resolved>),
}

/// The type families whose in-memory `eq` is PostgreSQL's `=`; the names are
/// `pg_typeof`'s (for the value) and `typname` (for the column).
fn family(name: &str) -> Option<&'static str> {
    Some(match name {
        "smallint" | "integer" | "bigint" | "int2" | "int4" | "int8" => "int",
        "text" | "character varying" | "varchar" => "text",
        "uuid" => "uuid",
        "boolean" | "bool" => "bool",
        _ => return None,
    })
}

fn resolve(
    p: &Pred,
    table: &Table,
    values: &[Option<String>],
    types: &[Option<String>],
) -> Result<Resolved, String> {
    Ok(match p {
        Pred::Const(true) => Resolved::True,
        Pred::Const(false) => Resolved::False,
        Pred::Bool { expr } => match values[*expr].as_deref() {
            Some("true") => Resolved::True,
            _ => Resolved::False,
        },
        Pred::Eq { column, expr } => {
            let col = table
                .column_index(column)
                .map(|i| &table.columns[i])
                .ok_or_else(|| format!("column {column:?} is gone"))?;
            let vt = types[*expr].as_deref().unwrap_or("");
            match (family(&col.ty.name), family(vt)) {
                (Some(a), Some(b)) if a == b => {}
                _ => {
                    return Err(format!(
                        "{column} ({}) is compared with a {vt} value: only integers, text, uuid and boolean are compiled",
                        col.ty.name
                    ))
                }
            }
            if !column
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(format!("column name {column:?} needs quoting in a filter"));
            }
            match &values[*expr] {
                // NULL = x is never true.
                None => Resolved::False,
                Some(v) => Resolved::Eq(column.clone(), v.clone()),
            }
        }
        Pred::And(v) => Resolved::And(
            v.iter()
                .map(|p| resolve(p, table, values, types))
                .collect::<Result<_, _>>()?,
        ),
        Pred::Or(v) => Resolved::Or(
            v.iter()
                .map(|p| resolve(p, table, values, types))
                .collect::<Result<_, _>>()?,
        ),
    })
}

fn simplify(r: Resolved) -> Resolved {
    match r {
        Resolved::And(v) => {
            let mut out = Vec::new();
            for x in v.into_iter().map(simplify) {
                match x {
                    Resolved::True => {}
                    Resolved::False => return Resolved::False,
                    Resolved::And(inner) => out.extend(inner),
                    x => out.push(x),
                }
            }
            match out.len() {
                0 => Resolved::True,
                1 => out.pop().unwrap_or(Resolved::True),
                _ => Resolved::And(out),
            }
        }
        Resolved::Or(v) => {
            let mut out = Vec::new();
            for x in v.into_iter().map(simplify) {
                match x {
                    Resolved::False => {}
                    Resolved::True => return Resolved::True,
                    Resolved::Or(inner) => out.extend(inner),
                    x => out.push(x),
                }
            }
            match out.len() {
                0 => Resolved::False,
                1 => out.pop().unwrap_or(Resolved::False),
                _ => Resolved::Or(out),
            }
        }
        x => x,
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A simplified rule as a filter string (top level: conditions joined by `,`).
fn render_top(r: &Resolved) -> String {
    match r {
        Resolved::Eq(c, v) => format!("{c}=eq.{}", quote(v)),
        Resolved::And(v) => v.iter().map(render_top).collect::<Vec<_>>().join(","),
        Resolved::Or(v) => format!(
            "or=({})",
            v.iter().map(render_inner).collect::<Vec<_>>().join(",")
        ),
        Resolved::True | Resolved::False => String::new(),
    }
}

fn render_inner(r: &Resolved) -> String {
    match r {
        Resolved::Eq(c, v) => format!("{c}.eq.{}", quote(v)),
        Resolved::And(v) => format!(
            "and({})",
            v.iter().map(render_inner).collect::<Vec<_>>().join(",")
        ),
        Resolved::Or(v) => format!(
            "or({})",
            v.iter().map(render_inner).collect::<Vec<_>>().join(",")
        ),
        Resolved::True | Resolved::False => String::new(),
    }
}

// ---- the SQL path: classes, batches, tickets ----

/// Subscribers judged alike: one role and claims, one table, one predicate.
pub struct SqlClass {
    pub id: u64,
    who: Principal,
    schema: String,
    table: String,
    predicate: String,
    /// The predicate reads the row as a whole (see [`reads_whole_row`]).
    whole_row: bool,
    /// The columns a change's row image must have to be judged (see
    /// `Entry::needs`): should the stream stop carrying one, the class's
    /// channels are closed rather than its policies judging a NULL.
    needs: Vec<String>,
    /// The table layout `needs` was last found complete in (a change of the
    /// same layout is not checked again).
    layout: Mutex<Option<Arc<Table>>>,
    /// Why a check of the class failed: its channels are being closed, and
    /// every later row of it fails at once — none is judged (and sent) after
    /// a row that was not, while the close is on its way.
    failed: OnceLock<Arc<str>>,
    /// The batch filling for the current transaction.
    open: Mutex<Option<OpenBatch>>,
    /// Batches sealed and not yet judged, in commit order; a worker judges
    /// all of them with one query (so checks that fall behind get cheaper per
    /// row instead of piling up).
    sealed: Mutex<Sealed>,
    gate: Weak<Gate>,
}

#[derive(Default)]
struct Sealed {
    batches: Vec<(Arc<Batch>, Vec<Img>)>,
    rows: usize,
    /// Bytes of their row images (a row shared with other classes counts
    /// for each).
    bytes: usize,
    /// The class is in the workers' queue, or a worker is judging it: its
    /// batches sealed meanwhile wait, and its next round takes them all
    /// ([`SqlClass::release`]).
    queued: bool,
}

impl std::fmt::Debug for SqlClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlClass")
            .field("id", &self.id)
            .field("role", &self.who.role)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

struct OpenBatch {
    batch: Arc<Batch>,
    images: Vec<Img>,
    /// The change last added (held, so its address is not reused), and where
    /// its images sit.
    last: Option<(Arc<Change>, u32, Option<u32>)>,
}

/// Rows of one class judged together; the verdict is set once.
pub struct Batch {
    verdict: OnceLock<Result<Vec<bool>, Arc<str>>>,
    done: Notify,
}

/// A frame's claim on a verdict: the positions of its judged image (and of
/// the old image of an UPDATE) in a batch.
#[derive(Clone)]
pub struct Ticket {
    batch: Arc<Batch>,
    row: u32,
    old: Option<u32>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket({}, {:?})", self.row, self.old)
    }
}

/// What a writer does with a gated frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it (`old_visible`: with the old image's values).
    Send { old_visible: bool },
    /// The row is not the subscriber's to see.
    Skip,
    /// The check failed: the channel is being closed with the reason.
    Failed,
}

impl Ticket {
    /// Why the check of this frame's batch failed, once it has.
    pub fn failure(&self) -> Option<Arc<str>> {
        match self.batch.verdict.get() {
            Some(Err(why)) => Some(why.clone()),
            _ => None,
        }
    }

    pub fn ready(&self) -> bool {
        self.batch.verdict.get().is_some()
    }

    /// Waits for the batch's verdict on this frame.
    pub async fn wait(&self) -> Verdict {
        loop {
            let notified = self.batch.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = self.batch.verdict.get() {
                return match v {
                    Err(_) => Verdict::Failed,
                    Ok(pass) => {
                        let seen = |i: u32| pass.get(i as usize).copied().unwrap_or(false);
                        if seen(self.row) {
                            Verdict::Send {
                                old_visible: self.old.is_none_or(seen),
                            }
                        } else {
                            Verdict::Skip
                        }
                    }
                };
            }
            notified.await;
        }
    }
}

impl Batch {
    fn new() -> Arc<Batch> {
        Arc::new(Batch {
            verdict: OnceLock::new(),
            done: Notify::new(),
        })
    }

    fn set(&self, v: Result<Vec<bool>, Arc<str>>) {
        let _ = self.verdict.set(v);
        self.done.notify_waiters();
    }
}

impl SqlClass {
    /// Why a check of the class failed (its channels are to be closed).
    pub fn failure(&self) -> Option<String> {
        self.failed.get().map(|w| w.to_string())
    }

    /// Every ticket of the class has its verdict: no batch open, sealed or
    /// being judged (so none of its frames can still fail).
    pub fn settled(&self) -> bool {
        let open = self.open.lock().map(|o| o.is_none()).unwrap_or(false);
        let sealed = self
            .sealed
            .lock()
            .map(|s| s.batches.is_empty() && !s.queued)
            .unwrap_or(false);
        open && sealed
    }

    /// The ticket of `change` for this class (its images added to the open
    /// batch once, whatever the number of channels); `None` when the change has
    /// no row to judge (TRUNCATE). Called by the hub only.
    pub fn ticket(self: &Arc<Self>, change: &Arc<Change>) -> Option<Ticket> {
        if change.kind == ChangeKind::Truncate {
            return None;
        }
        let gate = self.gate.upgrade()?;
        if let Some(why) = self.failed.get() {
            let failed = Batch::new();
            failed.set(Err(why.clone()));
            gate.failed.push(self.id, why.to_string());
            return Some(Ticket {
                batch: failed,
                row: 0,
                old: None,
            });
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = open.as_ref() {
            if let Some((c, row, old)) = &o.last {
                if Arc::ptr_eq(c, change) {
                    return Some(Ticket {
                        batch: o.batch.clone(),
                        row: *row,
                        old: *old,
                    });
                }
            }
        }
        // Once per change and class (not per channel), and once per table
        // layout: the stream's description of the table is shared.
        let known = self
            .layout
            .lock()
            .map(|l| l.as_ref().is_some_and(|t| Arc::ptr_eq(t, &change.table)))
            .unwrap_or(false);
        let gone = if known {
            None
        } else {
            self.needs
                .iter()
                .find(|c| change.table.column_index(c).is_none())
        };
        if let Some(col) = gone {
            // The stream stopped carrying a column the policies read (the
            // publication's column list changed): fail closed.
            gate.stats.unstreamed.fetch_add(1, Ordering::Relaxed);
            let why = format!(
                "row-level security cannot judge changes of {}.{} any more: its policies read \
                 column {col:?}, which the stream no longer carries (the publication's column \
                 list changed)",
                self.schema, self.table
            );
            drop(open);
            let failed = Batch::new();
            self.fail(&gate, vec![failed.clone()], &why);
            return Some(Ticket {
                batch: failed,
                row: 0,
                old: None,
            });
        }
        if !known {
            if let Ok(mut l) = self.layout.lock() {
                *l = Some(change.table.clone());
            }
        }
        let (judged, old_image) = gate.images(change)?;
        // An UPDATE's old row sent without all its values (a key change under
        // the default replica identity) cannot be judged: its values stay hidden.
        let unjudged_old =
            change.kind == ChangeKind::Update && change.old.is_some() && old_image.is_none();
        if open
            .as_ref()
            .is_some_and(|o| o.images.len() >= MAX_BATCH_ROWS)
        {
            if let Some(o) = open.take() {
                if let Some(c) = self.seal(&gate, o) {
                    gate.enqueue(vec![c]);
                }
            }
        }
        let fresh = open.is_none();
        let o = open.get_or_insert_with(|| OpenBatch {
            batch: Batch::new(),
            images: Vec::new(),
            last: None,
        });
        // No verdict at `u32::MAX`: a row that cannot be judged is not sent.
        let row = match judged {
            Some(i) => {
                o.images.push(i);
                o.images.len() as u32 - 1
            }
            None => u32::MAX,
        };
        let old = match old_image {
            Some(i) => {
                o.images.push(i);
                Some(o.images.len() as u32 - 1)
            }
            // No verdict at this position: never seen.
            None if unjudged_old => Some(u32::MAX),
            None => None,
        };
        o.last = Some((change.clone(), row, old));
        let t = Ticket {
            batch: o.batch.clone(),
            row,
            old,
        };
        drop(open);
        if fresh {
            if let Ok(mut p) = gate.pending.lock() {
                p.push(self.clone());
            }
        }
        Some(t)
    }

    /// Moves a filled batch to the sealed list; `Some`: the class is to be
    /// queued for the workers (it was not already).
    fn seal(self: &Arc<Self>, gate: &Gate, o: OpenBatch) -> Option<Arc<SqlClass>> {
        let mut sealed = self.sealed.lock().unwrap_or_else(|e| e.into_inner());
        let bytes: usize = o.images.iter().map(|i| i.json.len()).sum();
        if sealed.rows + o.images.len() > MAX_SEALED_ROWS || sealed.bytes + bytes > MAX_SEALED_BYTES
        {
            drop(sealed);
            let why = "row-level security checks for your token fell too far behind (PostgreSQL is not keeping up)";
            self.fail(gate, vec![o.batch], why);
            return None;
        }
        sealed.rows += o.images.len();
        sealed.bytes += bytes;
        sealed.batches.push((o.batch, o.images));
        if sealed.queued {
            return None;
        }
        sealed.queued = true;
        Some(self.clone())
    }

    /// Every sealed batch. `judging`: a worker judges them now, and the
    /// class stays out of the queue until it is done ([`SqlClass::release`]);
    /// otherwise the class leaves the queue.
    fn take_sealed(&self, judging: bool) -> Vec<(Arc<Batch>, Vec<Img>)> {
        let mut sealed = self.sealed.lock().unwrap_or_else(|e| e.into_inner());
        sealed.queued = judging;
        sealed.rows = 0;
        sealed.bytes = 0;
        std::mem::take(&mut sealed.batches)
    }

    /// A worker is done with the class's batches: `true` when more were
    /// sealed meanwhile (the class is to be queued again — still marked
    /// queued, so no commit queues it twice), else it leaves the queue.
    fn release(&self) -> bool {
        let mut sealed = self.sealed.lock().unwrap_or_else(|e| e.into_inner());
        if sealed.batches.is_empty() {
            sealed.queued = false;
            false
        } else {
            true
        }
    }

    fn fail(&self, gate: &Gate, batches: Vec<Arc<Batch>>, why: &str) {
        let _ = self.failed.set(why.into());
        gate.stats.checks_failed.fetch_add(1, Ordering::Relaxed);
        for b in batches {
            b.set(Err(why.into()));
        }
        gate.failed.push(self.id, why.to_string());
    }
}

/// Rows of one class a check may hold while earlier checks run, at most;
/// beyond, the class's channels are closed (its subscribers are too far behind).
const MAX_SEALED_ROWS: usize = 100_000;

/// Bytes of row images one class may hold sealed, at most (as
/// [`MAX_SEALED_ROWS`]: beyond, its channels are closed).
const MAX_SEALED_BYTES: usize = 64 << 20;

/// A row image as `jsonb_populate_record` reads it: `json`/`jsonb` values (and
/// a domain's over them) as JSON, others as their text output in a JSON
/// string. An unchanged TOASTed value is taken from the old image when there
/// is one.
///
/// `None` when a value is missing (an unchanged TOASTed value or a non-key
/// column of a key-only old row, with no full old image to take it from): the
/// policy could read it, so such a row cannot be judged and is not delivered.
fn image(table: &Table, row: &Row, old: Option<&Row>) -> Option<String> {
    let mut out = String::with_capacity(64 + row.len() * 16);
    out.push('{');
    let mut first = true;
    for (i, col) in table.columns.iter().enumerate() {
        let mut cell = row.get(i);
        if matches!(cell, Some(Cell::Absent)) {
            cell = old.and_then(|o| o.get(i));
        }
        let text = match cell {
            Some(Cell::Null) => None,
            Some(Cell::Text(b)) => Some(String::from_utf8_lossy(b)),
            _ => return None,
        };
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&Value::String(col.name.clone()).to_string());
        out.push(':');
        match text {
            None => out.push_str("null"),
            // By the base type: a domain over json/jsonb is JSON too.
            Some(t)
                if col.ty.name == "json"
                    || col.ty.name == "jsonb"
                    || matches!(
                        col.ty.kind,
                        crate::decode::value::TypeKind::Json
                            | crate::decode::value::TypeKind::Jsonb
                    ) =>
            {
                out.push_str(&t)
            }
            Some(t) => out.push_str(&Value::String(t.into_owned()).to_string()),
        }
    }
    out.push('}');
    Some(out)
}

/// The hub's handle on the SQL path: batches are sealed and handed to the
/// check workers at each commit (and after a replay batch).
pub struct Gate {
    pending: Mutex<Vec<Arc<SqlClass>>>,
    /// Classes sealed together (at one commit) go to the workers together,
    /// so that one round judges them over one load of their rows.
    jobs: mpsc::Sender<Vec<Arc<SqlClass>>>,
    failed: Arc<Failures>,
    stats: Arc<RlsStats>,
    /// The last change's images, shared by every class that judges it.
    last: Mutex<Option<(Arc<Change>, Images)>>,
    /// The next image's `seq`.
    seq: AtomicU64,
}

/// A change's judged image (`None`: it cannot be judged) and, for an UPDATE,
/// its old image.
type Images = (Option<Img>, Option<Img>);

/// A row image (see [`image`]) made once per change and shared by every
/// class that judges it.
pub struct RowImage {
    /// Its place in the order images were made: a round loads each image
    /// once, however many of its classes hold it.
    seq: u64,
    json: String,
    /// The table as the stream described it when the image was made.
    table: Arc<Table>,
}

type Img = Arc<RowImage>;

impl Gate {
    /// Seals every open batch for the workers (never waits).
    pub fn seal(&self) {
        let classes = match self.pending.lock() {
            Ok(mut p) if !p.is_empty() => std::mem::take(&mut *p),
            _ => return,
        };
        let mut queue = Vec::new();
        for c in classes {
            let o = c.open.lock().map(|mut o| o.take()).unwrap_or(None);
            if let Some(q) = o.and_then(|o| c.seal(self, o)) {
                queue.push(q);
            }
        }
        self.enqueue(queue);
    }

    /// Hands classes to the workers, at most [`MAX_ROUND_CLASSES`] a job;
    /// with the queue full, their checks fail (their channels are closed).
    fn enqueue(&self, mut classes: Vec<Arc<SqlClass>>) {
        while !classes.is_empty() {
            let rest = classes.split_off(classes.len().min(MAX_ROUND_CLASSES));
            let n = classes.len() as u64;
            self.stats.queued.fetch_add(n, Ordering::Relaxed);
            if let Err(e) = self.jobs.try_send(classes) {
                self.stats.queued.fetch_sub(n, Ordering::Relaxed);
                let why =
                    "the queue of row-level security checks is full (PostgreSQL is not keeping up)";
                for c in e.into_inner() {
                    let batches = c.take_sealed(false);
                    c.fail(self, batches.into_iter().map(|(b, _)| b).collect(), why);
                }
            }
            classes = rest;
        }
    }

    /// The judged image of `change` (new row; old row for DELETE) and, for an
    /// UPDATE with a complete old image, that image: made once per change.
    fn images(&self, change: &Arc<Change>) -> Option<Images> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((c, images)) = last.as_ref() {
            if Arc::ptr_eq(c, change) {
                return Some(images.clone());
            }
        }
        let judged = match change.kind {
            ChangeKind::Insert | ChangeKind::Update => change.new.as_ref()?,
            ChangeKind::Delete => change.old.as_ref()?,
            ChangeKind::Truncate => return None,
        };
        let img = |json: String| {
            Arc::new(RowImage {
                seq: self.seq.fetch_add(1, Ordering::Relaxed),
                json,
                table: change.table.clone(),
            })
        };
        let judged = image(&change.table, judged, change.old.as_ref()).map(img);
        if judged.is_none() {
            self.stats.unjudgeable.fetch_add(1, Ordering::Relaxed);
        }
        let old = match (change.kind, change.old.as_ref()) {
            (ChangeKind::Update, Some(old)) => image(&change.table, old, None).map(img),
            _ => None,
        };
        *last = Some((change.clone(), (judged.clone(), old.clone())));
        Some((judged, old))
    }
}

/// Classes a job holds at most, and a worker takes from the queue for one
/// turn (whole jobs: the classes sealed at one commit) once it has one job;
/// those of one table are judged together, sharing one load of their rows.
const MAX_ROUND_CLASSES: usize = 256;

/// Distinct row images one round loads at most (more sealed rows wait for
/// the next round).
const MAX_ROUND_ROWS: usize = 8_192;

/// Bytes of row images one round holds at most: the images loaded plus each
/// whole-row class's copy of its rows (more sealed rows wait for the next
/// round), so 256 classes cannot make a round of gigabytes.
const MAX_ROUND_BYTES: usize = 16 << 20;

async fn worker(
    db: Arc<PolicyDb>,
    jobs: Arc<tokio::sync::Mutex<mpsc::Receiver<Vec<Arc<SqlClass>>>>>,
    failed: Arc<Failures>,
    stats: Arc<RlsStats>,
) {
    loop {
        let mut taken = Vec::new();
        {
            let mut rx = jobs.lock().await;
            let Some(job) = rx.recv().await else { return };
            taken.extend(job);
            while taken.len() < MAX_ROUND_CLASSES {
                match rx.try_recv() {
                    Ok(job) => taken.extend(job),
                    Err(_) => break,
                }
            }
        }
        stats
            .queued
            .fetch_sub(taken.len() as u64, Ordering::Relaxed);
        // By table, in queue order.
        let mut groups: Vec<Vec<Pending>> = Vec::new();
        for class in taken {
            let batches = class.take_sealed(true).into();
            match groups
                .iter_mut()
                .find(|g| g[0].class.schema == class.schema && g[0].class.table == class.table)
            {
                Some(g) => g.push(Pending { class, batches }),
                None => groups.push(vec![Pending { class, batches }]),
            }
        }
        for mut group in groups {
            while group.iter().any(|p| !p.batches.is_empty()) {
                round(&db, &mut group, &failed, &stats).await;
            }
            // One round at a time per class: what was sealed while it was
            // judged goes back to the end of the queue as one job, and
            // that class's next round takes all of it — under load one
            // round judges many commits instead of a worker per commit.
            // Verdicts are per batch and each writer waits for its frames
            // in order, so every channel keeps its commit order.
            requeue(
                group
                    .into_iter()
                    .map(|p| p.class)
                    .filter(|c| c.release())
                    .collect(),
            );
        }
    }
}

/// Queues again classes with batches sealed while a worker judged them.
fn requeue(classes: Vec<Arc<SqlClass>>) {
    let Some(gate) = classes.first().and_then(|c| c.gate.upgrade()) else {
        return;
    };
    gate.enqueue(classes);
}

/// A class taken by a worker, with its sealed batches not judged yet.
struct Pending {
    class: Arc<SqlClass>,
    batches: std::collections::VecDeque<(Arc<Batch>, Vec<Img>)>,
}

/// A class's part of a round: where it is in its group, its batches this
/// round (with their row counts) and its rows' positions among the round's
/// images (1-based).
type Member = (usize, Vec<(Arc<Batch>, usize)>, Vec<u32>);

/// What one round of `group` takes: each class's next sealed batches, in
/// order, while the round's distinct images stay within `max_rows` and its
/// bytes within `max_bytes` — the images loaded, plus the copy a whole-row
/// class makes of its own rows (see [`PolicyDb::judge_round`]); the rest
/// waits for the next round. A round always takes at least one batch, so
/// every round makes progress. Batches holding only rows that cannot be
/// judged get their (empty) verdict at once.
fn take_round(group: &mut [Pending], max_rows: usize, max_bytes: usize) -> (Vec<Img>, Vec<Member>) {
    let mut ords: HashMap<u64, u32> = HashMap::new();
    let mut images: Vec<Img> = Vec::new();
    let mut bytes = 0usize;
    let mut members: Vec<Member> = Vec::new();
    for (at, p) in group.iter_mut().enumerate() {
        if let Some(why) = p.class.failed.get() {
            // Its channels are being closed: nothing more of it is judged.
            for (batch, _) in p.batches.drain(..) {
                batch.set(Err(why.clone()));
            }
            continue;
        }
        let whole_row = p.class.whole_row;
        let mut taken = Vec::new();
        let mut rows = Vec::new();
        while let Some((_, imgs)) = p.batches.front() {
            let fresh = imgs.iter().filter(|i| !ords.contains_key(&i.seq));
            let (new, mut new_bytes) = fresh.fold((0, 0), |(n, b), i| (n + 1, b + i.json.len()));
            if whole_row {
                new_bytes += imgs.iter().map(|i| i.json.len()).sum::<usize>();
            }
            let started = !images.is_empty() || bytes > 0;
            if started && (images.len() + new > max_rows || bytes + new_bytes > max_bytes) {
                break;
            }
            let Some((batch, imgs)) = p.batches.pop_front() else {
                break;
            };
            bytes += new_bytes;
            for i in &imgs {
                let ord = *ords.entry(i.seq).or_insert_with(|| {
                    images.push(i.clone());
                    images.len() as u32
                });
                rows.push(ord);
            }
            taken.push((batch, imgs.len()));
        }
        if taken.is_empty() {
            continue;
        }
        if rows.is_empty() {
            // Only rows that cannot be judged: nothing to ask.
            for (batch, _) in taken {
                batch.set(Ok(Vec::new()));
            }
            continue;
        }
        members.push((at, taken, rows));
    }
    (images, members)
}

/// One round over classes of one table: each class's next batches (as many
/// as fit), their images loaded once, every class judged in one
/// transaction ([`PolicyDb::judge_round`]); each batch's verdict set.
async fn round(db: &PolicyDb, group: &mut [Pending], failed: &Failures, stats: &RlsStats) {
    let (images, members) = take_round(group, MAX_ROUND_ROWS, MAX_ROUND_BYTES);
    if members.is_empty() {
        return;
    }
    let Pending { class: first, .. } = &group[members[0].0];
    let (schema, table) = (first.schema.clone(), first.table.clone());
    // The columns the images were made with (to keep the temp table's in step).
    let mut columns: Vec<(String, u32)> = Vec::new();
    let mut tables: Vec<&Arc<Table>> = Vec::new();
    for i in &images {
        if !tables.iter().any(|t| Arc::ptr_eq(t, &i.table)) {
            tables.push(&i.table);
            for c in &i.table.columns {
                if !columns.iter().any(|(n, _)| *n == c.name) {
                    columns.push((c.name.clone(), c.ty.oid.0));
                }
            }
        }
    }
    let texts: Vec<&str> = images.iter().map(|i| i.json.as_str()).collect();
    let classes: Vec<crate::source::policy::RoundClass<'_>> = members
        .iter()
        .map(|(at, _, rows)| {
            let c = &group[*at].class;
            crate::source::policy::RoundClass {
                who: &c.who,
                predicate: &c.predicate,
                whole_row: c.whole_row,
                rows,
            }
        })
        .collect();
    let started = std::time::Instant::now();
    let results = db
        .judge_round(&schema, &table, &columns, &texts, &classes)
        .await;
    drop(classes);
    stats
        .rounds
        .store(db.rounds.load(Ordering::Relaxed), Ordering::Relaxed);
    stats
        .unloaded
        .store(db.unloaded.load(Ordering::Relaxed), Ordering::Relaxed);
    stats
        .round_timeouts
        .store(db.round_timeouts.load(Ordering::Relaxed), Ordering::Relaxed);
    stats
        .check_micros
        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    let judged: usize = members.iter().map(|(_, _, rows)| rows.len()).sum();
    stats
        .rows_checked
        .fetch_add(judged as u64, Ordering::Relaxed);
    for ((at, taken, rows), result) in members.into_iter().zip(results) {
        match result {
            Ok(pass) => {
                stats.checks_ok.fetch_add(1, Ordering::Relaxed);
                let mut seen = vec![false; images.len() + 1];
                for p in pass {
                    if let Some(x) = seen.get_mut(p as usize) {
                        *x = true;
                    }
                }
                let mut from = 0;
                for (batch, n) in taken {
                    let v = rows[from..from + n]
                        .iter()
                        .map(|&o| seen[o as usize])
                        .collect();
                    batch.set(Ok(v));
                    from += n;
                }
            }
            Err(e) => {
                stats.checks_failed.fetch_add(1, Ordering::Relaxed);
                let class = &group[at].class;
                let why = format!(
                    "the row-level security check of {}.{} failed for your token: {e}",
                    class.schema, class.table
                );
                tracing::warn!(class = class.id, role = %class.who.role, error = %e,
                    "row-level security check failed; closing that class's channels");
                // Its later batches too: its channels are being closed.
                let _ = class.failed.set(why.as_str().into());
                let later = std::mem::take(&mut group[at].batches);
                for batch in taken
                    .into_iter()
                    .map(|(b, _)| b)
                    .chain(later.into_iter().map(|(b, _)| b))
                {
                    batch.set(Err(why.clone().into()));
                }
                failed.push(group[at].class.id, why);
            }
        }
    }
}

/// Whether a policy expression reads `table`'s row as a whole (`table.*`,
/// as `pg_get_expr` prints a whole-row reference): such a class is judged
/// over values of the table's row type. When in doubt (it cannot be
/// tokenized), yes.
fn reads_whole_row(predicate: &str, table: &str) -> bool {
    let Ok(toks) = tokenize(predicate) else {
        return true;
    };
    toks.windows(3).any(|w| {
        let named = match &w[0] {
            Tok::Ident(s) => s.eq_ignore_ascii_case(table),
            Tok::Quoted(s) => s == table,
            _ => false,
        };
        named && is_op(&w[1], ".") && matches!(&w[2], Tok::Op(o) if o.starts_with('*'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::pgoutput::{RelId, ReplicaIdentity};
    use crate::decode::relation::Column;
    use crate::decode::value::{PgType, TypeKind};

    fn table() -> Table {
        let col = |n: &str, ty: &str| Column {
            name: n.into(),
            ty: Arc::new(PgType::new(0, ty, TypeKind::Text)),
            key: false,
        };
        Table {
            id: RelId(1),
            schema: "public".into(),
            name: "jobs".into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![
                col("id", "int4"),
                col("owner_id", "uuid"),
                col("org", "text"),
            ],
            json: Default::default(),
        }
    }

    fn parse(s: &str) -> Result<(Pred, Vec<String>), String> {
        let mut e = Vec::new();
        parse_policy(s, &table(), &mut e).map(|p| (p, e))
    }

    #[test]
    fn common_policy_shapes_compile() {
        let (p, e) = parse("(owner_id = auth.uid())").unwrap();
        assert_eq!(
            p,
            Pred::Eq {
                column: "owner_id".into(),
                expr: 0
            }
        );
        assert_eq!(e, vec!["auth . uid ( )"]);
        let (p, e) = parse("(( SELECT auth.uid() AS uid) = owner_id)").unwrap();
        assert_eq!(
            p,
            Pred::Eq {
                column: "owner_id".into(),
                expr: 0
            }
        );
        assert_eq!(e, vec!["SELECT auth . uid ( ) AS uid"]);
        assert_eq!(parse("true").unwrap().0, Pred::Const(true));
        let (p, _) = parse("(auth.role() = 'authenticated'::text)").unwrap();
        assert_eq!(p, Pred::Bool { expr: 0 });
        let (p, e) =
            parse("((org = ((auth.jwt() ->> 'org'::text))) OR (owner_id = auth.uid()))").unwrap();
        assert!(matches!(p, Pred::Or(ref v) if v.len() == 2));
        assert_eq!(e[0], "auth . jwt ( ) ->> 'org' :: text");
        let (p, _) =
            parse("((jobs.org = current_setting('request.jwt.claim.org'::text, true)) AND true)")
                .unwrap();
        assert!(matches!(p, Pred::And(_)));
    }

    #[test]
    fn other_shapes_go_to_sql_with_a_reason() {
        for (s, why) in [
            (
                "(EXISTS ( SELECT 1 FROM assignments a WHERE (a.job_id = jobs.id)))",
                "only",
            ),
            ("(owner_id <> auth.uid())", "only"),
            ("((owner_id)::text = auth.jwt() ->> 'sub'::text)", "reads"),
            ("(org = lower(auth.role()))", "calls lower()"),
            ("(id = org)", "two columns"),
            ("(NOT (owner_id = auth.uid()))", "NOT"),
            ("(org = other_thing)", "reads"),
        ] {
            let e = parse(s).unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn compiled_rules_render_as_filters() {
        let r = simplify(Resolved::And(vec![
            Resolved::Or(vec![
                Resolved::Eq("org".into(), "a,\"b".into()),
                Resolved::False,
                Resolved::Eq("id".into(), "3".into()),
            ]),
            Resolved::True,
            Resolved::Eq("owner_id".into(), "x".into()),
        ]));
        let text = render_top(&r);
        assert_eq!(text, r#"or=(org.eq."a,\"b",id.eq."3"),owner_id=eq."x""#);
        Filter::parse(&text).unwrap();
        assert_eq!(
            simplify(Resolved::Or(vec![Resolved::False])),
            Resolved::False
        );
        assert_eq!(
            simplify(Resolved::And(vec![Resolved::True])),
            Resolved::True
        );
    }

    #[test]
    fn whole_row_references_are_recognised() {
        assert!(reads_whole_row("mine(jobs.*)", "jobs"));
        assert!(reads_whole_row("(row_to_json(jobs.*) IS NOT NULL)", "jobs"));
        assert!(reads_whole_row("(\"My Jobs\".* IS NOT NULL)", "My Jobs"));
        assert!(!reads_whole_row("(owner_id = auth.uid())", "jobs"));
        assert!(!reads_whole_row(
            "(EXISTS ( SELECT 1 FROM a WHERE (a.job_id = jobs.id)))",
            "jobs"
        ));
        // Another table's whole row is not this one's.
        assert!(!reads_whole_row("f(a.*)", "jobs"));
    }

    fn class(id: u64, whole_row: bool) -> Arc<SqlClass> {
        Arc::new(SqlClass {
            id,
            who: Principal {
                role: "r".into(),
                claims: "{}".into(),
                sub: None,
                email: None,
            },
            schema: "public".into(),
            table: "jobs".into(),
            predicate: "true".into(),
            whole_row,
            needs: Vec::new(),
            layout: Mutex::new(None),
            failed: OnceLock::new(),
            open: Mutex::new(None),
            sealed: Mutex::new(Sealed::default()),
            gate: Weak::new(),
        })
    }

    /// A batch of images of `len` bytes each, numbered from `seq`.
    fn batch(seq: std::ops::Range<u64>, len: usize) -> (Arc<Batch>, Vec<Img>) {
        let t = Arc::new(table());
        let imgs = seq
            .map(|seq| {
                Arc::new(RowImage {
                    seq,
                    json: "x".repeat(len),
                    table: t.clone(),
                })
            })
            .collect();
        (Batch::new(), imgs)
    }

    #[test]
    fn a_round_is_capped_by_bytes_and_the_rest_waits() {
        // Two classes sharing rows 0..4 (100 bytes each), then a third batch
        // of each: 1,000 bytes allow the shared 400 and a class's next 400.
        let mut group = vec![
            Pending {
                class: class(1, false),
                batches: vec![batch(0..4, 100), batch(4..8, 100)].into(),
            },
            Pending {
                class: class(2, false),
                batches: vec![batch(0..4, 100), batch(8..12, 100)].into(),
            },
        ];
        let (images, members) = take_round(&mut group, 10_000, 1_000);
        let bytes: usize = images.iter().map(|i| i.json.len()).sum();
        assert!(bytes <= 1_000, "{bytes}");
        assert_eq!(images.len(), 8);
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].2, vec![1, 2, 3, 4, 5, 6, 7, 8]);
        // The second class's rows 0..4 were loaded already: they cost nothing;
        // its next batch does not fit and waits.
        assert_eq!(members[1].2, vec![1, 2, 3, 4]);
        assert_eq!(group[0].batches.len(), 0);
        assert_eq!(group[1].batches.len(), 1);
        // The next round takes it.
        let (images, members) = take_round(&mut group, 10_000, 1_000);
        assert_eq!(images.len(), 4);
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].0, 1);
        assert!(group.iter().all(|p| p.batches.is_empty()));
    }

    #[test]
    fn a_whole_row_class_counts_its_own_copy() {
        // A whole-row class copies its rows: 4 × 100 loaded + 4 × 100 copied.
        let mut group = vec![
            Pending {
                class: class(1, true),
                batches: vec![batch(0..4, 100)].into(),
            },
            Pending {
                class: class(2, true),
                batches: vec![batch(0..4, 100)].into(),
            },
        ];
        let (_, members) = take_round(&mut group, 10_000, 1_000);
        assert_eq!(members.len(), 1, "the second copy does not fit");
        assert_eq!(group[1].batches.len(), 1);
        // A batch larger than the cap alone still makes a round (progress).
        let mut group = vec![Pending {
            class: class(3, false),
            batches: vec![batch(0..20, 100), batch(20..21, 1)].into(),
        }];
        let (images, members) = take_round(&mut group, 10_000, 1_000);
        assert_eq!((images.len(), members.len()), (20, 1));
        assert_eq!(group[0].batches.len(), 1);
    }

    #[test]
    fn policies_combine_as_postgres_does() {
        let p = |n: &str, permissive: bool, u: Option<&str>| Policy {
            name: n.into(),
            permissive,
            using: u.map(str::to_string),
        };
        assert_eq!(
            sql_predicate(&[
                p("a", true, Some("x")),
                p("b", true, Some("y")),
                p("r", false, Some("z")),
                p("w", true, None)
            ]),
            "((x) OR (y)) AND (z)"
        );
        assert_eq!(sql_predicate(&[p("r", false, Some("z"))]), "false AND (z)");
    }
}
