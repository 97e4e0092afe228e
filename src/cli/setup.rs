//! Preparing a database for walcast, reporting on it, and cleaning up: the logic
//! behind `walcast setup`, `walcast status` and `walcast teardown`.
//!
//! Everything walcast needs on the server is a publication (which tables to
//! stream; "Logical Replication → Publication" in the PostgreSQL docs), optionally
//! `REPLICA IDENTITY FULL` on those tables (so UPDATE and DELETE carry the whole old
//! row; "ALTER TABLE … REPLICA IDENTITY"), and a logical replication slot using the
//! built-in `pgoutput` plugin ("Replication Slots";
//! `pg_create_logical_replication_slot`).
//!
//! Invariants:
//!
//! - **Plan, check, then act.** Setup first reads the catalog and works out the
//!   statements to run, checks every privilege and setting they need, and only
//!   then changes anything; a run that would fail half-way fails before its first
//!   change. `--dry-run` prints the planned statements and stops there.
//! - **Idempotent.** Only what is missing is planned; a second run plans nothing
//!   and says so, one line per part.
//! - **Atomic where PostgreSQL allows.** The publication and replica identity
//!   changes run in one transaction; the slot is created after it commits (a slot
//!   cannot be created in a transaction that has written).
//! - **Errors name the fix.** Missing privileges, `wal_level`, exhausted
//!   `max_replication_slots` and unknown tables each come with what to change.
//!
//! `sql/setup.sql` and `sql/teardown.sql` do the same by hand with psql; a test
//! keeps them in step with this module.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::config::PgConnInfo;
use crate::source::error::{ErrorKind, PgError};
use crate::source::slot::{quote_ident, quote_literal, validate_slot_name, WAL_LEVEL_HELP};

/// How long `teardown --force` waits for a terminated consumer to let go of its slot.
const RELEASE_DEADLINE: Duration = Duration::from_secs(15);

/// Which tables the publication should have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableSelection {
    /// Leave the publication's tables as they are (it must exist).
    Unchanged,
    /// These tables (names as in SQL: `orders`, `public.orders`, `"Odd Name"`).
    Tables(Vec<String>),
    /// `FOR ALL TABLES` (needs superuser).
    AllTables,
}

/// The replica identity to give the publication's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// The primary key (PostgreSQL's default): old images carry only key columns.
    Default,
    /// The whole row: old images are complete.
    Full,
}

impl ReplicaIdentity {
    fn code(self) -> &'static str {
        match self {
            ReplicaIdentity::Default => "d",
            ReplicaIdentity::Full => "f",
        }
    }
    fn sql(self) -> &'static str {
        match self {
            ReplicaIdentity::Default => "DEFAULT",
            ReplicaIdentity::Full => "FULL",
        }
    }
}

/// What `walcast setup` should make true.
#[derive(Clone, Debug)]
pub struct SetupOptions {
    pub conn: PgConnInfo,
    pub publication: String,
    pub tables: TableSelection,
    pub replica_identity: Option<ReplicaIdentity>,
    pub slot: String,
    pub create_slot: bool,
    pub dry_run: bool,
}

/// What `walcast teardown` should remove.
#[derive(Clone, Debug)]
pub struct TeardownOptions {
    pub conn: PgConnInfo,
    pub slot: Option<String>,
    pub publication: Option<String>,
    /// Terminate the backend using the slot instead of refusing.
    pub force: bool,
    pub dry_run: bool,
}

/// Why setup, status or teardown could not do its work. None of these is retried.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Connecting failed (network, authentication, TLS).
    #[error(transparent)]
    Connect(#[from] PgError),
    /// Something an operator must change first; the message says what.
    #[error("{0}")]
    Refused(String),
    /// PostgreSQL rejected a statement; `fix` is the advice its SQLSTATE calls
    /// for (empty when there is none).
    #[error("{doing}: {source}{fix}")]
    Sql {
        doing: String,
        #[source]
        source: Box<PgError>,
        fix: &'static str,
    },
}

/// Which statement failed, for the advice that goes with a SQLSTATE code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Creating or altering the publication, or a table's replica identity.
    ChangePublication,
    CreateSlot,
    Other,
}

impl SetupError {
    /// What this error means: refusals are the operator's to fix; a PostgreSQL
    /// error has the kind of its [`PgError`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            SetupError::Connect(e) => e.kind(),
            SetupError::Sql { source, .. } => source.kind(),
            SetupError::Refused(_) => ErrorKind::Usage,
        }
    }

    fn from_sql(e: tokio_postgres::Error, doing: &str) -> Self {
        Self::from_sql_in(e, doing, Step::Other)
    }

    /// Advice by SQLSTATE and by the statement that failed, never by the message
    /// (the server translates it).
    fn from_sql_in(e: tokio_postgres::Error, doing: &str, step: Step) -> Self {
        let source = PgError::from_sql(e);
        let fix = match (source.sqlstate().unwrap_or_default(), step) {
            ("42501", Step::ChangePublication) => {
                "; only a table's owner (or a superuser) can add it to a publication or change its replica identity, and only a superuser can create a FOR ALL TABLES publication: run setup as the owner or a superuser, or list the tables with --tables"
            }
            ("42501", Step::CreateSlot) => {
                "; the role needs the REPLICATION attribute (ALTER ROLE … REPLICATION) or superuser"
            }
            ("42501", _) => "; grant the privilege or run setup as a superuser",
            ("53400", _) => {
                "; raise max_replication_slots in postgresql.conf and restart PostgreSQL, or drop unused slots (walcast teardown --slot …)"
            }
            ("55000", Step::CreateSlot) => {
                "; logical replication slots need wal_level = logical and max_replication_slots above 0 in postgresql.conf (both need a restart of PostgreSQL)"
            }
            ("42P01", _) => "; check the table name (schema.table) in --tables",
            _ => "",
        };
        SetupError::Sql {
            doing: doing.to_string(),
            source: Box::new(source),
            fix,
        }
    }
}

/// One statement setup or teardown will run, and the line it prints once done.
#[derive(Clone, Debug)]
struct Action {
    sql: String,
    done: String,
}

/// The result of a run: one line per action taken (or, for a dry run, the SQL).
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
}

impl Report {
    fn note(&mut self, dry_run: bool, line: String) {
        self.lines
            .push(if dry_run { format!("-- {line}") } else { line });
    }
}

/// Who we are and what the server allows, read once before planning.
struct ServerFacts {
    user: String,
    database: String,
    superuser: bool,
    replication: bool,
    create_on_db: bool,
    wal_level: String,
    max_slots: i32,
    used_slots: i32,
}

async fn server_facts(sql: &tokio_postgres::Client) -> Result<ServerFacts, SetupError> {
    let r = sql
        .query_one(
            "select current_user::text, current_database()::text, r.rolsuper, r.rolreplication, \
                    has_database_privilege(current_database(), 'CREATE'), \
                    current_setting('wal_level'), \
                    current_setting('max_replication_slots')::int4, \
                    (select count(*) from pg_catalog.pg_replication_slots)::int4 \
             from pg_catalog.pg_roles r where r.rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| SetupError::from_sql(e, "reading server settings"))?;
    Ok(ServerFacts {
        user: r.get(0),
        database: r.get(1),
        superuser: r.get(2),
        replication: r.get(3),
        create_on_db: r.get(4),
        wal_level: r.get(5),
        max_slots: r.get(6),
        used_slots: r.get(7),
    })
}

/// A table resolved in the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Table {
    schema: String,
    name: String,
    /// `d`efault, `f`ull, `i`ndex, `n`othing.
    identity: String,
    owned: bool,
}

impl Table {
    fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
    fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

const TABLE_COLUMNS: &str = "n.nspname::text, c.relname::text, c.relreplident::text, \
     pg_has_role(c.relowner, 'USAGE'), c.relkind::text";

fn table_from_row(r: &tokio_postgres::Row) -> Table {
    Table {
        schema: r.get(0),
        name: r.get(1),
        identity: r.get(2),
        owned: r.get(3),
    }
}

/// Looks up the tables named in `--tables`, refusing names that are not tables.
async fn resolve_tables(
    sql: &tokio_postgres::Client,
    names: &[String],
    database: &str,
) -> Result<Vec<Table>, SetupError> {
    let mut out: Vec<Table> = Vec::new();
    for name in names {
        let row = sql
            .query_opt(
                &format!(
                    "select {TABLE_COLUMNS} from pg_catalog.pg_class c \
                     join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
                     where c.oid = to_regclass($1)"
                ),
                &[name],
            )
            .await
            .map_err(|e| {
                SetupError::Refused(format!(
                    "--tables: {name:?} is not a valid table name ({}): write schema.table, quoting names with upper-case letters or spaces",
                    e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())
                ))
            })?;
        let Some(row) = row else {
            return Err(SetupError::Refused(format!(
                "table {name} does not exist in database {database:?}: create it first, or fix --tables (write schema.table; unquoted names are lower-cased)"
            )));
        };
        let kind: String = row.get(4);
        if kind != "r" && kind != "p" {
            return Err(SetupError::Refused(format!(
                "{name} is not a table (relkind {kind}): only ordinary and partitioned tables can be published"
            )));
        }
        let t = table_from_row(&row);
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

/// The tables a publication has now, in name order.
async fn publication_tables(
    sql: &tokio_postgres::Client,
    publication: &str,
) -> Result<Vec<Table>, SetupError> {
    let rows = sql
        .query(
            &format!(
                "select {TABLE_COLUMNS} from pg_catalog.pg_publication_tables p \
                 join pg_catalog.pg_namespace n on n.nspname = p.schemaname \
                 join pg_catalog.pg_class c on c.relnamespace = n.oid and c.relname = p.tablename \
                 where p.pubname = $1 order by 1, 2"
            ),
            &[&publication],
        )
        .await
        .map_err(|e| SetupError::from_sql(e, "reading the publication's tables"))?;
    Ok(rows.iter().map(table_from_row).collect())
}

/// Every user table (what a new `FOR ALL TABLES` publication would have).
async fn all_user_tables(sql: &tokio_postgres::Client) -> Result<Vec<Table>, SetupError> {
    let rows = sql
        .query(
            &format!(
                "select {TABLE_COLUMNS} from pg_catalog.pg_class c \
                 join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
                 where c.relkind in ('r', 'p') and not c.relispartition \
                   and n.nspname not in ('pg_catalog', 'information_schema') \
                   and n.nspname not like 'pg\\_toast%' and n.nspname not like 'pg\\_temp%' \
                 order by 1, 2"
            ),
            &[],
        )
        .await
        .map_err(|e| SetupError::from_sql(e, "listing tables"))?;
    Ok(rows.iter().map(table_from_row).collect())
}

fn names(tables: &[Table]) -> String {
    tables
        .iter()
        .map(Table::display)
        .collect::<Vec<_>>()
        .join(", ")
}

fn qualified_list(tables: &[Table]) -> String {
    tables
        .iter()
        .map(Table::qualified)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `walcast setup`: plans, checks, and (unless a dry run) applies.
pub async fn setup(opts: &SetupOptions) -> Result<Report, SetupError> {
    if opts.create_slot {
        validate_slot_name(&opts.slot).map_err(|e| SetupError::Refused(e.to_string()))?;
    }
    let sql = crate::source::tls::connect_sql(&opts.conn).await?;
    let facts = server_facts(&sql).await?;
    let mut report = Report::default();
    let mut plan = Plan::default();
    let final_tables = plan_publication(&sql, opts, &facts, &mut report, &mut plan).await?;
    plan_replica_identity(opts, &facts, &final_tables, &mut report, &mut plan)?;
    if opts.create_slot {
        plan.slot = plan_slot(&sql, opts, &facts, &mut report).await?;
    }
    if facts.wal_level != "logical" && !opts.create_slot {
        report.note(
            opts.dry_run,
            format!(
                "warning: wal_level is '{}': {WAL_LEVEL_HELP}",
                facts.wal_level
            ),
        );
    }

    apply(&sql, opts, plan, report).await
}

/// What setup will do: statements run in one transaction, then the slot.
#[derive(Default)]
struct Plan {
    tx_actions: Vec<Action>,
    slot: Option<Action>,
}

/// The publication's part of the plan; returns the tables it will publish.
async fn plan_publication(
    sql: &tokio_postgres::Client,
    opts: &SetupOptions,
    facts: &ServerFacts,
    report: &mut Report,
    plan: &mut Plan,
) -> Result<Vec<Table>, SetupError> {
    let dry = opts.dry_run;
    let publication = quote_ident(&opts.publication);
    let tx_actions = &mut plan.tx_actions;
    let final_tables: Vec<Table>;
    let existing = sql
        .query_opt(
            "select puballtables from pg_catalog.pg_publication where pubname = $1",
            &[&opts.publication],
        )
        .await
        .map_err(|e| SetupError::from_sql(e, "reading publications"))?;
    match (existing.map(|r| r.get::<_, bool>(0)), &opts.tables) {
        (None, TableSelection::Unchanged) => {
            return Err(SetupError::Refused(format!(
                "publication {:?} does not exist: say which tables it should publish with --tables a,b (or --all-tables)",
                opts.publication
            )));
        }
        (None, TableSelection::Tables(list)) => {
            let tables = resolve_tables(sql, list, &facts.database).await?;
            need_create_on_db(facts, &opts.publication)?;
            need_ownership(facts, &tables, "add it to a publication")?;
            tx_actions.push(Action {
                sql: format!(
                    "CREATE PUBLICATION {publication} FOR TABLE {}",
                    qualified_list(&tables)
                ),
                done: format!(
                    "created publication {} for tables {}",
                    opts.publication,
                    names(&tables)
                ),
            });
            final_tables = tables;
        }
        (None, TableSelection::AllTables) => {
            if !facts.superuser {
                return Err(SetupError::Refused(format!(
                    "role {:?} is not a superuser, and only a superuser can create a FOR ALL TABLES publication: run setup as a superuser, or list the tables with --tables",
                    facts.user
                )));
            }
            tx_actions.push(Action {
                sql: format!("CREATE PUBLICATION {publication} FOR ALL TABLES"),
                done: format!("created publication {} for all tables", opts.publication),
            });
            final_tables = all_user_tables(sql).await?;
        }
        (Some(true), selection) => {
            let tables = publication_tables(sql, &opts.publication).await?;
            match selection {
                TableSelection::Tables(list) => {
                    let wanted = resolve_tables(sql, list, &facts.database).await?;
                    report.note(dry, format!(
                        "publication {} is FOR ALL TABLES, so it already publishes {}: nothing to add",
                        opts.publication,
                        names(&wanted)
                    ));
                }
                _ => report.note(
                    dry,
                    format!(
                        "publication {} already publishes all tables: nothing to do",
                        opts.publication
                    ),
                ),
            }
            final_tables = tables;
        }
        (Some(false), TableSelection::AllTables) => {
            return Err(SetupError::Refused(format!(
                "publication {:?} exists with a list of tables and cannot be turned into FOR ALL TABLES in place: drop it first (walcast teardown --publication {}) and run setup again, or use --tables",
                opts.publication, opts.publication
            )));
        }
        (Some(false), selection) => {
            let current = publication_tables(sql, &opts.publication).await?;
            let mut final_list = current.clone();
            if let TableSelection::Tables(list) = selection {
                let wanted = resolve_tables(sql, list, &facts.database).await?;
                let missing: Vec<Table> = wanted
                    .iter()
                    .filter(|t| {
                        !current
                            .iter()
                            .any(|c| c.schema == t.schema && c.name == t.name)
                    })
                    .cloned()
                    .collect();
                if missing.is_empty() {
                    report.note(
                        dry,
                        format!(
                            "publication {} already has tables {}: nothing to do",
                            opts.publication,
                            names(&wanted)
                        ),
                    );
                } else {
                    need_ownership(facts, &missing, "add it to a publication")?;
                    tx_actions.push(Action {
                        sql: format!(
                            "ALTER PUBLICATION {publication} ADD TABLE {}",
                            qualified_list(&missing)
                        ),
                        done: format!(
                            "added tables {} to publication {}",
                            names(&missing),
                            opts.publication
                        ),
                    });
                    final_list.extend(missing);
                }
            } else {
                report.note(
                    dry,
                    format!(
                        "publication {} exists with tables {}: nothing to do",
                        opts.publication,
                        names(&current)
                    ),
                );
            }
            final_tables = final_list;
        }
    }

    Ok(final_tables)
}

/// Replica identity changes, when asked for, of the tables to be published.
fn plan_replica_identity(
    opts: &SetupOptions,
    facts: &ServerFacts,
    final_tables: &[Table],
    report: &mut Report,
    plan: &mut Plan,
) -> Result<(), SetupError> {
    let dry = opts.dry_run;
    let tx_actions = &mut plan.tx_actions;
    if let Some(identity) = opts.replica_identity {
        let to_change: Vec<&Table> = final_tables
            .iter()
            .filter(|t| t.identity != identity.code())
            .collect();
        if to_change.is_empty() {
            if final_tables.is_empty() {
                report.note(
                    dry,
                    format!(
                        "publication {} has no tables yet: no replica identity to set",
                        opts.publication
                    ),
                );
            } else {
                report.note(
                    dry,
                    format!(
                        "tables {} already have REPLICA IDENTITY {}: nothing to do",
                        names(final_tables),
                        identity.sql()
                    ),
                );
            }
        } else {
            let owned: Vec<Table> = to_change.iter().map(|t| (*t).clone()).collect();
            need_ownership(facts, &owned, "change its replica identity")?;
            for t in to_change {
                tx_actions.push(Action {
                    sql: format!(
                        "ALTER TABLE {} REPLICA IDENTITY {}",
                        t.qualified(),
                        identity.sql()
                    ),
                    done: format!("set REPLICA IDENTITY {} on {}", identity.sql(), t.display()),
                });
            }
        }
    }

    Ok(())
}

/// The slot's part of the plan: nothing when it exists as it should, refused
/// when it cannot be made.
async fn plan_slot(
    sql: &tokio_postgres::Client,
    opts: &SetupOptions,
    facts: &ServerFacts,
    report: &mut Report,
) -> Result<Option<Action>, SetupError> {
    let dry = opts.dry_run;
    let mut slot_action = None;
    if opts.create_slot {
        let slot = sql
            .query_opt(
                "select plugin::text, database::text from pg_catalog.pg_replication_slots where slot_name = $1",
                &[&opts.slot],
            )
            .await
            .map_err(|e| SetupError::from_sql(e, "reading replication slots"))?;
        match slot {
            Some(r) => {
                let plugin: Option<String> = r.get(0);
                let database: Option<String> = r.get(1);
                if plugin.as_deref() != Some("pgoutput")
                    || database.as_deref() != Some(facts.database.as_str())
                {
                    return Err(SetupError::Refused(format!(
                        "replication slot {:?} already exists but is not a pgoutput slot of database {:?} (plugin {}, database {}): choose another --slot, or drop it with walcast teardown --slot {}",
                        opts.slot,
                        facts.database,
                        plugin.as_deref().unwrap_or("none"),
                        database.as_deref().unwrap_or("none"),
                        opts.slot
                    )));
                }
                report.note(
                    dry,
                    format!(
                        "replication slot {} already exists (pgoutput): nothing to do",
                        opts.slot
                    ),
                );
            }
            None => {
                if facts.wal_level != "logical" {
                    return Err(SetupError::Refused(format!(
                        "cannot create replication slot {:?}: {WAL_LEVEL_HELP} (it is '{}' now)",
                        opts.slot, facts.wal_level
                    )));
                }
                if !facts.superuser && !facts.replication {
                    return Err(SetupError::Refused(format!(
                        "role {:?} cannot create replication slots: it needs the REPLICATION attribute (ALTER ROLE {} REPLICATION, run by a superuser) or superuser",
                        facts.user,
                        quote_ident(&facts.user)
                    )));
                }
                if facts.used_slots >= facts.max_slots {
                    return Err(SetupError::Refused(format!(
                        "cannot create replication slot {:?}: all {} replication slots are in use (max_replication_slots = {}): drop unused slots (see pg_replication_slots; walcast teardown --slot NAME) or raise max_replication_slots in postgresql.conf and restart PostgreSQL",
                        opts.slot, facts.used_slots, facts.max_slots
                    )));
                }
                slot_action = Some(Action {
                    sql: format!(
                        "SELECT pg_create_logical_replication_slot({}, 'pgoutput')",
                        quote_literal(&opts.slot)
                    ),
                    done: format!("created replication slot {} (pgoutput)", opts.slot),
                });
            }
        }
    }

    Ok(slot_action)
}

/// Runs the plan (or, dry, lists its statements): the publication and replica
/// identity in one transaction, then the slot.
async fn apply(
    sql: &tokio_postgres::Client,
    opts: &SetupOptions,
    plan: Plan,
    mut report: Report,
) -> Result<Report, SetupError> {
    let dry = opts.dry_run;
    let Plan {
        tx_actions,
        slot: slot_action,
    } = plan;
    if dry {
        for a in tx_actions.iter().chain(slot_action.iter()) {
            report.lines.push(format!("{};", a.sql));
        }
        return Ok(report);
    }
    if !tx_actions.is_empty() {
        let mut script = String::from("BEGIN;\n");
        for a in &tx_actions {
            script.push_str(&a.sql);
            script.push_str(";\n");
        }
        script.push_str("COMMIT;");
        if let Err(e) = sql.batch_execute(&script).await {
            let _ = sql.batch_execute("ROLLBACK").await;
            return Err(SetupError::from_sql_in(
                e,
                "changing the publication",
                Step::ChangePublication,
            ));
        }
        report.lines.extend(tx_actions.into_iter().map(|a| a.done));
    }
    if let Some(a) = slot_action {
        let row = sql
            .query_one(
                "select lsn::text from pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&opts.slot],
            )
            .await
            .map_err(|e| {
                SetupError::from_sql_in(
                    e,
                    &format!("creating replication slot {}", opts.slot),
                    Step::CreateSlot,
                )
            })?;
        let lsn: String = row.get(0);
        report.lines.push(format!("{} at {lsn}", a.done));
    }
    Ok(report)
}

fn need_create_on_db(facts: &ServerFacts, publication: &str) -> Result<(), SetupError> {
    if facts.superuser || facts.create_on_db {
        return Ok(());
    }
    Err(SetupError::Refused(format!(
        "role {:?} lacks the CREATE privilege on database {:?}, which creating publication {publication:?} needs: run GRANT CREATE ON DATABASE {} TO {} as a superuser, or run setup as a superuser",
        facts.user,
        facts.database,
        quote_ident(&facts.database),
        quote_ident(&facts.user)
    )))
}

fn need_ownership(facts: &ServerFacts, tables: &[Table], what: &str) -> Result<(), SetupError> {
    let not_owned: Vec<Table> = tables.iter().filter(|t| !t.owned).cloned().collect();
    if facts.superuser || not_owned.is_empty() {
        return Ok(());
    }
    Err(SetupError::Refused(format!(
        "role {:?} does not own table {} and only a table's owner (or a superuser) can {what}: run setup as the owner or a superuser",
        facts.user,
        names(&not_owned)
    )))
}

/// Runs `walcast teardown`: drops the slot and/or the publication.
pub async fn teardown(opts: &TeardownOptions) -> Result<Report, SetupError> {
    if opts.slot.is_none() && opts.publication.is_none() {
        return Err(SetupError::Refused(
            "nothing to tear down: pass --slot NAME and/or --publication NAME".into(),
        ));
    }
    let sql = crate::source::tls::connect_sql(&opts.conn).await?;
    let dry = opts.dry_run;
    let mut report = Report::default();
    if let Some(slot) = &opts.slot {
        let row = sql
            .query_opt(
                "select active_pid from pg_catalog.pg_replication_slots where slot_name = $1",
                &[slot],
            )
            .await
            .map_err(|e| SetupError::from_sql(e, "reading replication slots"))?;
        match row {
            None => report.note(
                dry,
                format!("replication slot {slot} does not exist: nothing to do"),
            ),
            Some(r) => {
                let pid: Option<i32> = r.get(0);
                if let (Some(pid), false) = (pid, opts.force) {
                    return Err(SetupError::Refused(format!(
                        "replication slot {slot:?} is in use by server process {pid} (a running consumer, maybe walcast): stop that consumer first, or pass --force to terminate it and drop the slot"
                    )));
                }
                let drop_sql = format!("SELECT pg_drop_replication_slot({})", quote_literal(slot));
                if dry {
                    if pid.is_some() {
                        report.lines.push(format!(
                            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = {};",
                            quote_literal(slot)
                        ));
                    }
                    report.lines.push(format!("{drop_sql};"));
                } else {
                    drop_slot(&sql, slot, &drop_sql, opts.force, &mut report).await?;
                }
            }
        }
    }
    if let Some(publication) = &opts.publication {
        let exists = sql
            .query_opt(
                "select 1 from pg_catalog.pg_publication where pubname = $1",
                &[publication],
            )
            .await
            .map_err(|e| SetupError::from_sql(e, "reading publications"))?
            .is_some();
        let drop_sql = format!("DROP PUBLICATION {}", quote_ident(publication));
        if !exists {
            report.note(
                dry,
                format!("publication {publication} does not exist: nothing to do"),
            );
        } else if dry {
            report.lines.push(format!("{drop_sql};"));
        } else {
            sql.batch_execute(&drop_sql).await.map_err(|e| {
                SetupError::from_sql(e, &format!("dropping publication {publication}"))
            })?;
            report
                .lines
                .push(format!("dropped publication {publication}"));
        }
    }
    Ok(report)
}

/// Drops a slot; with `force`, terminates whoever holds it first (again if the
/// consumer reconnects before the drop).
async fn drop_slot(
    sql: &tokio_postgres::Client,
    slot: &str,
    drop_sql: &str,
    force: bool,
    report: &mut Report,
) -> Result<(), SetupError> {
    let deadline = tokio::time::Instant::now() + RELEASE_DEADLINE;
    loop {
        if force {
            let terminated = sql
                .query(
                    "select active_pid, pg_terminate_backend(active_pid) \
                     from pg_catalog.pg_replication_slots \
                     where slot_name = $1 and active_pid is not null",
                    &[&slot],
                )
                .await
                .map_err(|e| {
                    SetupError::from_sql(e, &format!("terminating the consumer of slot {slot}"))
                })?;
            for r in terminated {
                let pid: i32 = r.get(0);
                report.lines.push(format!(
                    "terminated server process {pid}, which was using replication slot {slot}"
                ));
            }
            // The walsender releases the slot as it exits.
            while tokio::time::Instant::now() < deadline {
                let active = sql
                    .query_opt(
                        "select 1 from pg_catalog.pg_replication_slots where slot_name = $1 and active",
                        &[&slot],
                    )
                    .await
                    .map_err(|e| SetupError::from_sql(e, "reading replication slots"))?;
                if active.is_none() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        match sql.batch_execute(drop_sql).await {
            Ok(()) => {
                report
                    .lines
                    .push(format!("dropped replication slot {slot}"));
                return Ok(());
            }
            // 55006: in use (the consumer came back between terminate and drop).
            Err(e)
                if force
                    && e.as_db_error().map(|d| d.code().code()) == Some("55006")
                    && tokio::time::Instant::now() < deadline =>
            {
                continue
            }
            Err(e) => {
                return Err(SetupError::from_sql(
                    e,
                    &format!("dropping replication slot {slot}"),
                ))
            }
        }
    }
}

/// What `walcast status` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub server_version: String,
    pub wal_level: String,
    pub database: String,
    pub slot: SlotStatus,
    pub publication: PublicationStatus,
    /// One line per problem found, each with what to do.
    pub warnings: Vec<String>,
    /// Published tables with row security enabled or policies, and how RLS
    /// mode would enforce each policy.
    pub row_security: Vec<TablePolicies>,
}

/// A published table's row security and policies (`walcast status`).
#[derive(Clone, Debug, Serialize)]
pub struct TablePolicies {
    pub table: String,
    pub enabled: bool,
    pub forced: bool,
    pub policies: Vec<PolicyStatus>,
}

/// One policy and the path RLS mode takes for it.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyStatus {
    pub name: String,
    /// `SELECT`, `ALL`, `INSERT`, `UPDATE` or `DELETE`.
    pub command: String,
    pub permissive: bool,
    pub roles: Vec<String>,
    pub using: Option<String>,
    /// `compiled`, `sql`, or `not for reads` (INSERT/UPDATE/DELETE policies,
    /// or no USING).
    pub path: String,
    /// Why a policy runs as SQL.
    pub why: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SlotStatus {
    pub name: String,
    pub exists: bool,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    /// `pg_current_wal_lsn() - restart_lsn`: WAL the server keeps for this slot.
    pub retained_wal_bytes: Option<i64>,
    pub wal_status: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PublicationStatus {
    pub name: String,
    pub exists: bool,
    pub all_tables: bool,
    /// The operations published (`insert`, `update`, `delete`, `truncate`).
    pub publishes: Vec<String>,
    pub tables: Vec<TableStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TableStatus {
    pub schema: String,
    pub name: String,
    /// `default`, `full`, `index` or `nothing`.
    pub replica_identity: String,
    pub has_primary_key: bool,
}

/// Runs `walcast status`.
pub async fn status(
    conn: &PgConnInfo,
    slot: &str,
    publication: &str,
) -> Result<Status, SetupError> {
    let sql = crate::source::tls::connect_sql(conn).await?;
    let q = |what: &'static str| move |e| SetupError::from_sql(e, what);
    let r = sql
        .query_one(
            "select current_setting('server_version'), current_setting('wal_level'), current_database()::text",
            &[],
        )
        .await
        .map_err(q("reading server settings"))?;
    let server_version: String = r.get(0);
    let wal_level: String = r.get(1);
    let database: String = r.get(2);
    let mut warnings = Vec::new();
    if wal_level != "logical" {
        warnings.push(format!("wal_level is '{wal_level}': {WAL_LEVEL_HELP}"));
    }

    let slot_row = sql
        .query_opt(
            "select active, active_pid, plugin::text, database::text, confirmed_flush_lsn::text, \
                    restart_lsn::text, \
                    case when pg_is_in_recovery() or restart_lsn is null then null \
                         else pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 end, \
                    wal_status::text \
             from pg_catalog.pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(q("reading replication slots"))?;
    let slot_status = match slot_row {
        None => {
            warnings.push(format!(
                "replication slot {slot} does not exist: create it with `walcast setup --publication {publication} --slot {slot} --create-slot`"
            ));
            SlotStatus {
                name: slot.to_string(),
                exists: false,
                active: false,
                active_pid: None,
                plugin: None,
                database: None,
                confirmed_flush_lsn: None,
                restart_lsn: None,
                retained_wal_bytes: None,
                wal_status: None,
            }
        }
        Some(r) => {
            let s = SlotStatus {
                name: slot.to_string(),
                exists: true,
                active: r.get(0),
                active_pid: r.get(1),
                plugin: r.get(2),
                database: r.get(3),
                confirmed_flush_lsn: r.get(4),
                restart_lsn: r.get(5),
                retained_wal_bytes: r.get(6),
                wal_status: r.get(7),
            };
            if s.plugin.as_deref() != Some("pgoutput") {
                warnings.push(format!(
                    "replication slot {slot} uses plugin {}, walcast needs pgoutput: choose another --slot",
                    s.plugin.as_deref().unwrap_or("none (a physical slot)")
                ));
            } else if s.database.as_deref() != Some(database.as_str()) {
                warnings.push(format!(
                    "replication slot {slot} belongs to database {}, not {database}: connect to that database",
                    s.database.as_deref().unwrap_or("?")
                ));
            }
            if s.wal_status.as_deref() == Some("lost") {
                warnings.push(format!(
                    "replication slot {slot} was invalidated (wal_status lost): drop and recreate it with `walcast teardown --slot {slot}` then `walcast setup --publication {publication} --slot {slot} --create-slot`"
                ));
            }
            s
        }
    };

    let pub_row = sql
        .query_opt(
            "select puballtables, pubinsert, pubupdate, pubdelete, pubtruncate \
             from pg_catalog.pg_publication where pubname = $1",
            &[&publication],
        )
        .await
        .map_err(q("reading publications"))?;
    let publication_status = match pub_row {
        None => {
            warnings.push(format!(
                "publication {publication} does not exist: create it with `walcast setup --publication {publication} --tables a,b`"
            ));
            PublicationStatus {
                name: publication.to_string(),
                exists: false,
                all_tables: false,
                publishes: Vec::new(),
                tables: Vec::new(),
            }
        }
        Some(r) => {
            let publishes: Vec<String> = ["insert", "update", "delete", "truncate"]
                .iter()
                .enumerate()
                .filter(|(i, _)| r.get::<_, bool>(i + 1))
                .map(|(_, op)| op.to_string())
                .collect();
            let rows = sql
                .query(
                    "select p.schemaname::text, p.tablename::text, c.relreplident::text, \
                            exists (select 1 from pg_catalog.pg_constraint k \
                                    where k.conrelid = c.oid and k.contype = 'p') \
                     from pg_catalog.pg_publication_tables p \
                     join pg_catalog.pg_namespace n on n.nspname = p.schemaname \
                     join pg_catalog.pg_class c on c.relnamespace = n.oid and c.relname = p.tablename \
                     where p.pubname = $1 order by 1, 2",
                    &[&publication],
                )
                .await
                .map_err(q("reading the publication's tables"))?;
            let tables: Vec<TableStatus> = rows
                .iter()
                .map(|r| TableStatus {
                    schema: r.get(0),
                    name: r.get(1),
                    replica_identity: identity_name(&r.get::<_, String>(2)).to_string(),
                    has_primary_key: r.get(3),
                })
                .collect();
            if tables.is_empty() {
                warnings.push(format!(
                    "publication {publication} has no tables: add some with `walcast setup --publication {publication} --tables a,b`"
                ));
            }
            for t in &tables {
                warnings.extend(table_warning(t, publication));
            }
            PublicationStatus {
                name: publication.to_string(),
                exists: true,
                all_tables: r.get(0),
                publishes,
                tables,
            }
        }
    };
    let rows = sql
        .query(
            "select n.nspname::text, c.relname::text, c.relrowsecurity, c.relforcerowsecurity, \
                    array(select a.attname::text from pg_catalog.pg_attribute a \
                          where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped \
                          order by a.attnum), \
                    p.polname::text, p.polcmd::text, p.polpermissive, \
                    array(select case when r = 0 then 'public' else pg_catalog.pg_get_userbyid(r)::text end \
                          from unnest(p.polroles) r), \
                    pg_catalog.pg_get_expr(p.polqual, p.polrelid) \
             from pg_catalog.pg_publication_tables pt \
             join pg_catalog.pg_namespace n on n.nspname = pt.schemaname \
             join pg_catalog.pg_class c on c.relnamespace = n.oid and c.relname = pt.tablename \
             left join pg_catalog.pg_policy p on p.polrelid = c.oid \
             where pt.pubname = $1 and (c.relrowsecurity or p.polname is not null) \
             order by 1, 2, 6",
            &[&publication],
        )
        .await
        .map_err(q("reading row security policies"))?;
    let mut row_security: Vec<TablePolicies> = Vec::new();
    for r in &rows {
        let table = format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1));
        if row_security.last().is_none_or(|t| t.table != table) {
            row_security.push(TablePolicies {
                table: table.clone(),
                enabled: r.get(2),
                forced: r.get(3),
                policies: Vec::new(),
            });
        }
        let Some(name) = r.get::<_, Option<String>>(5) else {
            continue;
        };
        let columns: Vec<String> = r.get(4);
        let command = match r.get::<_, String>(6).as_str() {
            "r" => "SELECT",
            "a" => "INSERT",
            "w" => "UPDATE",
            "d" => "DELETE",
            _ => "ALL",
        }
        .to_string();
        let using: Option<String> = r.get(9);
        let (path, why) = match (&using, command.as_str()) {
            (Some(u), "SELECT" | "ALL") => {
                let (schema, tname) = table.split_once('.').unwrap_or(("", &table));
                match crate::route::rls::policy_shape(u, schema, tname, &columns) {
                    Ok(()) => ("compiled".to_string(), None),
                    Err(why) => ("sql".to_string(), Some(why)),
                }
            }
            _ => ("not for reads".to_string(), None),
        };
        if let Some(t) = row_security.last_mut() {
            t.policies.push(PolicyStatus {
                name,
                command,
                permissive: r.get(7),
                roles: r.get(8),
                using,
                path,
                why,
            });
        }
    }
    Ok(Status {
        server_version,
        wal_level,
        database,
        slot: slot_status,
        publication: publication_status,
        warnings,
        row_security,
    })
}

fn identity_name(code: &str) -> &'static str {
    match code {
        "f" => "full",
        "i" => "index",
        "n" => "nothing",
        _ => "default",
    }
}

/// What a table's replica identity means for the events walcast can send.
fn table_warning(t: &TableStatus, publication: &str) -> Option<String> {
    let name = format!("{}.{}", t.schema, t.name);
    let fix = format!(
        "run `walcast setup --publication {publication} --replica-identity full` or ALTER TABLE {}.{} REPLICA IDENTITY FULL",
        quote_ident(&t.schema),
        quote_ident(&t.name)
    );
    match (t.replica_identity.as_str(), t.has_primary_key) {
        ("full", _) => None,
        ("default", false) | ("nothing", _) => Some(format!(
            "table {name} has no primary key and REPLICA IDENTITY {}: UPDATE and DELETE events carry no old row, so DELETE filtering is impossible (and PostgreSQL refuses UPDATE/DELETE on it while the publication publishes them); {fix}",
            t.replica_identity.to_uppercase()
        )),
        (identity, _) => Some(format!(
            "table {name} has REPLICA IDENTITY {}: UPDATE and DELETE events carry only the key columns in old_record (incomplete old images); {fix}",
            identity.to_uppercase()
        )),
    }
}

impl Status {
    /// The human-readable report, one fact per line, warnings last.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "server: PostgreSQL {}", self.server_version);
        let _ = writeln!(s, "wal_level: {}", self.wal_level);
        let _ = writeln!(s, "database: {}", self.database);
        let sl = &self.slot;
        if sl.exists {
            let _ = writeln!(
                s,
                "slot {}: exists, {}, plugin {}, confirmed_flush_lsn {}, retained WAL {}, wal_status {}",
                sl.name,
                match sl.active_pid {
                    Some(pid) if sl.active => format!("active (pid {pid})"),
                    _ if sl.active => "active".to_string(),
                    _ => "inactive".to_string(),
                },
                sl.plugin.as_deref().unwrap_or("none"),
                sl.confirmed_flush_lsn.as_deref().unwrap_or("none"),
                sl.retained_wal_bytes
                    .map(|b| format!("{b} bytes"))
                    .unwrap_or_else(|| "unknown".into()),
                sl.wal_status.as_deref().unwrap_or("unknown"),
            );
        } else {
            let _ = writeln!(s, "slot {}: does not exist", sl.name);
        }
        let p = &self.publication;
        if p.exists {
            let _ = writeln!(
                s,
                "publication {}: {}, publishes {}",
                p.name,
                if p.all_tables {
                    "FOR ALL TABLES"
                } else {
                    "for listed tables"
                },
                p.publishes.join(", ")
            );
            for t in &p.tables {
                let _ = writeln!(
                    s,
                    "  table {}.{}: replica identity {}, {}",
                    t.schema,
                    t.name,
                    t.replica_identity,
                    if t.has_primary_key {
                        "primary key"
                    } else {
                        "no primary key"
                    }
                );
            }
        } else {
            let _ = writeln!(s, "publication {}: does not exist", p.name);
        }
        for t in &self.row_security {
            let _ = writeln!(
                s,
                "row security {}: {}",
                t.table,
                match (t.enabled, t.forced) {
                    (true, true) => "enabled, forced",
                    (true, false) => "enabled",
                    (false, _) => "disabled (policies are not applied)",
                }
            );
            for p in &t.policies {
                let _ = writeln!(
                    s,
                    "  policy {} ({}, {}, to {}): {}{} — {}",
                    p.name,
                    p.command,
                    if p.permissive {
                        "permissive"
                    } else {
                        "restrictive"
                    },
                    p.roles.join(", "),
                    p.path,
                    p.why
                        .as_ref()
                        .map(|w| format!(" ({w})"))
                        .unwrap_or_default(),
                    p.using.as_deref().unwrap_or("no USING"),
                );
            }
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(identity: &str, pk: bool) -> TableStatus {
        TableStatus {
            schema: "public".into(),
            name: "t".into(),
            replica_identity: identity.into(),
            has_primary_key: pk,
        }
    }

    #[test]
    fn warnings_follow_identity_and_key() {
        assert!(table_warning(&table("full", false), "p").is_none());
        let w = table_warning(&table("default", true), "p").unwrap();
        assert!(w.contains("incomplete old images") && w.contains("--replica-identity full"));
        let w = table_warning(&table("default", false), "p").unwrap();
        assert!(w.contains("no primary key") && w.contains("DELETE filtering"));
        assert!(table_warning(&table("index", true), "p")
            .unwrap()
            .contains("INDEX"));
    }
}
