//! `walcast setup`, `status` and `teardown` against real clusters, and
//! `sql/setup.sql` / `sql/teardown.sql` kept in step with them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::walcast::{self, spawn};
use crate::support::{cluster, wait_for, Cluster};

const T: Duration = Duration::from_secs(60);

/// Runs walcast with `args`; returns (success, stdout, stderr).
async fn run(args: &[&str]) -> (bool, String, String) {
    walcast::run(args, T).await
}

/// Runs walcast and insists it succeeds; returns stdout.
async fn run_ok(args: &[&str]) -> String {
    let (ok, out, err) = run(args).await;
    assert!(ok, "walcast {args:?} failed:\nstdout: {out}\nstderr: {err}");
    out
}

/// Runs walcast and insists it fails; returns stderr.
async fn run_err(args: &[&str]) -> String {
    let (ok, out, err) = run(args).await;
    assert!(!ok, "walcast {args:?} should have failed:\nstdout: {out}");
    err
}

/// The catalog state setup controls, with names that differ between databases
/// (the slot's) left out: publication flags, each table with its replica
/// identity, and the slot's plugin, type and database.
async fn snapshot(c: &tokio_postgres::Client, publication: &str, slot: &str) -> String {
    let mut out = String::new();
    for r in c
        .query(
            "select puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot \
             from pg_publication where pubname = $1",
            &[&publication],
        )
        .await
        .unwrap()
    {
        let flags: Vec<bool> = (0..6).map(|i| r.get(i)).collect();
        out.push_str(&format!("publication {flags:?}\n"));
    }
    for r in c
        .query(
            "select n.nspname::text, c.relname::text, c.relreplident::text, \
                    exists (select 1 from pg_publication_tables p \
                            where p.pubname = $1 and p.schemaname = n.nspname and p.tablename = c.relname) \
             from pg_class c join pg_namespace n on n.oid = c.relnamespace \
             where c.relkind = 'r' and n.nspname = 'public' order by 1, 2",
            &[&publication],
        )
        .await
        .unwrap()
    {
        let (s, t, ident, published): (String, String, String, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        out.push_str(&format!(
            "table {s}.{t} identity={ident} published={published}\n"
        ));
    }
    for r in c
        .query(
            "select plugin::text, slot_type::text, temporary, database = current_database() \
             from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
    {
        let (plugin, kind, temp, here): (Option<String>, String, bool, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        out.push_str(&format!(
            "slot plugin={plugin:?} type={kind} temporary={temp} this_db={here}\n"
        ));
    }
    out
}

const SCHEMA: &str = "create table orders (id int primary key, note text);
     create table items (id int primary key, order_id int, qty int);
     create table events (at timestamptz, what text);";

#[tokio::test]
async fn setup_is_idempotent_and_dry_run_changes_nothing() {
    let db = "setup_idem";
    let c = cluster().new_db(db).await;
    c.batch_execute(SCHEMA).await.unwrap();
    let url = cluster().url(db);
    let slot = "slot_setup_idem";
    let args = [
        "setup",
        "--database-url",
        &url,
        "--publication",
        "pub_idem",
        "--tables",
        "orders,public.items",
        "--replica-identity",
        "full",
        "--slot",
        slot,
        "--create-slot",
    ];
    let before = snapshot(&c, "pub_idem", slot).await;

    // Dry run: prints the SQL, changes nothing.
    let mut dry = args.to_vec();
    dry.push("--dry-run");
    let out = run_ok(&dry).await;
    assert!(
        out.contains(
            r#"CREATE PUBLICATION "pub_idem" FOR TABLE "public"."orders", "public"."items";"#
        ),
        "{out}"
    );
    assert!(
        out.contains(r#"ALTER TABLE "public"."orders" REPLICA IDENTITY FULL;"#),
        "{out}"
    );
    assert!(
        out.contains(r#"ALTER TABLE "public"."items" REPLICA IDENTITY FULL;"#),
        "{out}"
    );
    assert!(
        out.contains("SELECT pg_create_logical_replication_slot('slot_setup_idem', 'pgoutput');"),
        "{out}"
    );
    assert_eq!(snapshot(&c, "pub_idem", slot).await, before);

    // The real run: one line per action.
    let out = run_ok(&args).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(
        lines[0],
        "created publication pub_idem for tables public.orders, public.items"
    );
    assert_eq!(lines[1], "set REPLICA IDENTITY FULL on public.orders");
    assert_eq!(lines[2], "set REPLICA IDENTITY FULL on public.items");
    assert!(
        lines[3].starts_with("created replication slot slot_setup_idem (pgoutput) at "),
        "{out}"
    );
    let after = snapshot(&c, "pub_idem", slot).await;
    assert_ne!(after, before);
    assert!(
        after.contains("table public.orders identity=f published=true"),
        "{after}"
    );
    assert!(
        after.contains("table public.events identity=d published=false"),
        "{after}"
    );
    assert!(after.contains("slot plugin=Some(\"pgoutput\") type=logical"));

    // Twice: nothing changes, and it says so.
    let out = run_ok(&args).await;
    assert!(
        out.contains(
            "publication pub_idem already has tables public.orders, public.items: nothing to do"
        ),
        "{out}"
    );
    for line in out.lines() {
        assert!(line.ends_with("nothing to do"), "{out}");
    }
    assert_eq!(out.lines().count(), 3, "{out}");
    assert_eq!(snapshot(&c, "pub_idem", slot).await, after);

    // A dry run with nothing to do prints only comments.
    let out = run_ok(&dry).await;
    assert!(out.lines().all(|l| l.starts_with("-- ")), "{out}");

    // A new table is added to the existing publication, nothing else.
    let out = run_ok(&[
        "setup",
        "--database-url",
        &url,
        "--publication",
        "pub_idem",
        "--tables",
        "orders,events",
    ])
    .await;
    assert_eq!(
        out.trim(),
        "added tables public.events to publication pub_idem"
    );

    // --tables against a FOR ALL TABLES publication says so.
    c.batch_execute("create publication pub_idem_all for all tables")
        .await
        .unwrap();
    let out = run_ok(&[
        "setup",
        "--database-url",
        &url,
        "--publication",
        "pub_idem_all",
        "--tables",
        "orders",
    ])
    .await;
    assert!(
        out.contains("publication pub_idem_all is FOR ALL TABLES, so it already publishes public.orders: nothing to add"),
        "{out}"
    );
}

fn psql(cluster: &Cluster, db: &str, file: &str, vars: &[(&str, &str)]) -> String {
    let psql = cluster.bindir().join("psql");
    let psql = if psql.is_file() {
        psql
    } else {
        Path::new("psql").to_path_buf()
    };
    let mut cmd = Command::new(psql);
    cmd.arg(cluster.url(db))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(file));
    for (k, v) in vars {
        cmd.arg("-v").arg(format!("{k}={v}"));
    }
    let out = cmd.output().expect("run psql");
    assert!(
        out.status.success(),
        "psql -f {file} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn sql_files_match_the_cli() {
    let (cli_db, sql_db) = ("setup_by_cli", "setup_by_sql");
    let cli = cluster().new_db(cli_db).await;
    let by_sql = cluster().new_db(sql_db).await;
    for c in [&cli, &by_sql] {
        c.batch_execute(SCHEMA).await.unwrap();
    }
    let (cli_slot, sql_slot) = ("slot_setup_by_cli", "slot_setup_by_sql");

    run_ok(&[
        "setup",
        "--database-url",
        &cluster().url(cli_db),
        "--publication",
        "walcast",
        "--tables",
        "orders,items",
        "--replica-identity",
        "full",
        "--slot",
        cli_slot,
        "--create-slot",
    ])
    .await;
    psql(
        cluster(),
        sql_db,
        "sql/setup.sql",
        &[("tables", "orders, items"), ("slot", sql_slot)],
    );
    let a = snapshot(&cli, "walcast", cli_slot).await;
    let b = snapshot(&by_sql, "walcast", sql_slot).await;
    assert!(a.contains("identity=f published=true"), "{a}");
    assert!(a.contains("slot plugin"), "{a}");
    assert_eq!(a, b, "sql/setup.sql and `walcast setup` disagree");

    run_ok(&[
        "teardown",
        "--database-url",
        &cluster().url(cli_db),
        "--slot",
        cli_slot,
        "--publication",
        "walcast",
    ])
    .await;
    psql(cluster(), sql_db, "sql/teardown.sql", &[("slot", sql_slot)]);
    let a = snapshot(&cli, "walcast", cli_slot).await;
    let b = snapshot(&by_sql, "walcast", sql_slot).await;
    assert!(!a.contains("publication") && !a.contains("slot"), "{a}");
    assert_eq!(a, b, "sql/teardown.sql and `walcast teardown` disagree");
}

#[tokio::test]
async fn status_reports_slot_tables_and_warnings() {
    let db = "setup_status";
    let c = cluster().new_db(db).await;
    c.batch_execute(
        "create table full_t (id int primary key, v text);
         alter table full_t replica identity full;
         create table keyed (id int primary key, v text);
         create table nokey (v text);",
    )
    .await
    .unwrap();
    let url = cluster().url(db);
    let slot = "slot_setup_status";

    // Nothing set up yet: the status says what is missing.
    let out = run_ok(&[
        "status",
        "--database-url",
        &url,
        "--slot",
        slot,
        "--publication",
        "pub_status",
    ])
    .await;
    assert!(out.contains("wal_level: logical"), "{out}");
    assert!(
        out.contains(&format!("slot {slot}: does not exist")),
        "{out}"
    );
    assert!(
        out.contains("warning: publication pub_status does not exist"),
        "{out}"
    );

    run_ok(&[
        "setup",
        "--database-url",
        &url,
        "--publication",
        "pub_status",
        "--tables",
        "full_t,keyed,nokey",
        "--slot",
        slot,
        "--create-slot",
    ])
    .await;
    let out = run_ok(&[
        "status",
        "--database-url",
        &url,
        "--slot",
        slot,
        "--publication",
        "pub_status",
    ])
    .await;
    assert!(out.starts_with("server: PostgreSQL "), "{out}");
    assert!(
        out.contains(&format!("slot {slot}: exists, inactive, plugin pgoutput")),
        "{out}"
    );
    assert!(out.contains("retained WAL "), "{out}");
    assert!(
        out.contains("  table public.full_t: replica identity full, primary key"),
        "{out}"
    );
    assert!(
        out.contains("  table public.keyed: replica identity default, primary key"),
        "{out}"
    );
    assert!(
        out.contains("  table public.nokey: replica identity default, no primary key"),
        "{out}"
    );
    let warnings: Vec<&str> = out.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 2, "{out}");
    assert!(
        warnings[0].contains("public.keyed") && warnings[0].contains("incomplete old images"),
        "{out}"
    );
    assert!(
        warnings[1].contains("public.nokey")
            && warnings[1].contains("no primary key")
            && warnings[1].contains("DELETE filtering"),
        "{out}"
    );

    let out = run_ok(&[
        "status",
        "--database-url",
        &url,
        "--slot",
        slot,
        "--publication",
        "pub_status",
        "--json",
    ])
    .await;
    assert_eq!(out.trim().lines().count(), 1, "one JSON object: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["wal_level"], "logical");
    assert!(v["server_version"].as_str().unwrap().len() > 1);
    assert_eq!(v["slot"]["exists"], true);
    assert_eq!(v["slot"]["active"], false);
    assert_eq!(v["slot"]["plugin"], "pgoutput");
    assert!(v["slot"]["confirmed_flush_lsn"]
        .as_str()
        .unwrap()
        .contains('/'));
    assert!(v["slot"]["retained_wal_bytes"].as_i64().unwrap() >= 0);
    assert!(v["slot"]["wal_status"].is_string());
    let tables = v["publication"]["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 3);
    assert_eq!(tables[0]["name"], "full_t");
    assert_eq!(tables[0]["replica_identity"], "full");
    assert_eq!(tables[2]["name"], "nokey");
    assert_eq!(tables[2]["has_primary_key"], false);
    assert_eq!(v["warnings"].as_array().unwrap().len(), 2);

    // Retained WAL grows while nobody consumes the slot.
    c.batch_execute(
        "insert into keyed select g, repeat('x', 100) from generate_series(1, 20000) g",
    )
    .await
    .unwrap();
    let v2: serde_json::Value = serde_json::from_str(
        &run_ok(&[
            "status",
            "--database-url",
            &url,
            "--slot",
            slot,
            "--publication",
            "pub_status",
            "--json",
        ])
        .await,
    )
    .unwrap();
    assert!(
        v2["slot"]["retained_wal_bytes"].as_i64().unwrap()
            > v["slot"]["retained_wal_bytes"].as_i64().unwrap(),
        "retained WAL did not grow: before {v}, after {v2}"
    );
}

#[tokio::test]
async fn teardown_refuses_an_active_slot_unless_forced() {
    let db = "setup_teardown";
    let c = cluster().new_db(db).await;
    c.batch_execute("create table t (id int primary key)")
        .await
        .unwrap();
    let url = cluster().url(db);
    let slot = "slot_setup_teardown";
    run_ok(&[
        "setup",
        "--database-url",
        &url,
        "--publication",
        "pub_teardown",
        "--tables",
        "t",
        "--slot",
        slot,
        "--create-slot",
    ])
    .await;
    let mut tail = spawn(&[
        "tail",
        "--database-url",
        &url,
        "--slot",
        slot,
        "--publication",
        "pub_teardown",
    ]);
    let slot_active = || async {
        c.query_opt(
            "select 1 from pg_replication_slots where slot_name = $1 and active",
            &[&slot],
        )
        .await
        .unwrap()
    };
    wait_for("the slot to become active", T, || async {
        slot_active().await.map(|_| ())
    })
    .await;
    // Prove the consumer works before tearing it down.
    c.batch_execute("insert into t values (1)").await.unwrap();
    let ev = tail.next_json(T).await;
    assert_eq!(ev["record"]["id"], 1);

    let err = run_err(&[
        "teardown",
        "--database-url",
        &url,
        "--slot",
        slot,
        "--publication",
        "pub_teardown",
    ])
    .await;
    assert!(
        err.contains("is in use by server process") && err.contains("--force"),
        "{err}"
    );
    assert!(
        slot_active().await.is_some(),
        "refused teardown touched the slot"
    );
    let pub_left = c
        .query_opt(
            "select 1 from pg_publication where pubname = 'pub_teardown'",
            &[],
        )
        .await
        .unwrap();
    assert!(pub_left.is_some());

    let out = run_ok(&[
        "teardown",
        "--database-url",
        &url,
        "--slot",
        slot,
        "--publication",
        "pub_teardown",
        "--force",
    ])
    .await;
    assert!(out.contains("terminated server process"), "{out}");
    assert!(
        out.contains(&format!("dropped replication slot {slot}")),
        "{out}"
    );
    assert!(out.contains("dropped publication pub_teardown"), "{out}");
    let left = c
        .query_opt(
            "select 1 from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    assert!(left.is_none(), "slot still exists");
    // The consumer notices its slot is gone and stops with a clear error.
    let (ok, err) = tail.wait(T).await;
    assert!(!ok && err.contains("does not exist"), "{err}");

    let out = run_ok(&[
        "teardown",
        "--database-url",
        &url,
        "--slot",
        slot,
        "--publication",
        "pub_teardown",
    ])
    .await;
    assert!(out.lines().all(|l| l.ends_with("nothing to do")), "{out}");
}

#[tokio::test]
async fn setup_explains_missing_privileges_and_tables() {
    let db = "setup_privs";
    let c = cluster().new_db(db).await;
    c.batch_execute(
        "drop role if exists setup_nobody;
         create role setup_nobody login;
         create table owned_by_admin (id int primary key);",
    )
    .await
    .unwrap();
    let url = cluster().url_as("setup_nobody", "unused", db);
    let setup = |tables: &'static str, extra: &'static [&'static str]| {
        let mut a: Vec<String> = [
            "setup",
            "--database-url",
            &url,
            "--publication",
            "pub_privs",
            "--tables",
            tables,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let err_of = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_err(&args).await
    };

    // A table that does not exist.
    let err = run_err(&[
        "setup",
        "--database-url",
        &cluster().url(db),
        "--publication",
        "pub_privs",
        "--tables",
        "owned_by_admin,no_such_table",
    ])
    .await;
    assert!(
        err.contains("table no_such_table does not exist in database \"setup_privs\""),
        "{err}"
    );

    // No CREATE privilege on the database.
    let err = err_of(setup("owned_by_admin", &[])).await;
    assert!(
        err.contains("lacks the CREATE privilege on database \"setup_privs\"")
            && err.contains("GRANT CREATE ON DATABASE \"setup_privs\" TO \"setup_nobody\""),
        "{err}"
    );

    // With CREATE, but not the table's owner.
    c.batch_execute("grant create on database setup_privs to setup_nobody")
        .await
        .unwrap();
    let err = err_of(setup("owned_by_admin", &[])).await;
    assert!(
        err.contains("does not own table public.owned_by_admin") && err.contains("owner"),
        "{err}"
    );

    // FOR ALL TABLES needs superuser.
    let err = run_err(&[
        "setup",
        "--database-url",
        &url,
        "--publication",
        "pub_privs",
        "--all-tables",
    ])
    .await;
    assert!(err.contains("not a superuser"), "{err}");

    // Owns the table, but has no REPLICATION attribute for the slot; nothing is
    // changed, not even the publication.
    c.batch_execute(
        "create table mine (id int primary key);
         alter table mine owner to setup_nobody;",
    )
    .await
    .unwrap();
    let err = err_of(setup(
        "mine",
        &["--slot", "slot_setup_privs", "--create-slot"],
    ))
    .await;
    assert!(
        err.contains("REPLICATION attribute")
            && err.contains("ALTER ROLE \"setup_nobody\" REPLICATION"),
        "{err}"
    );
    let created = c
        .query_opt(
            "select 1 from pg_publication where pubname = 'pub_privs'",
            &[],
        )
        .await
        .unwrap();
    assert!(created.is_none(), "a refused setup changed the catalog");

    // With the attribute it all works.
    c.batch_execute("alter role setup_nobody replication")
        .await
        .unwrap();
    let args = setup("mine", &["--slot", "slot_setup_privs", "--create-slot"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_ok(&args).await;
    assert!(out.contains("created publication pub_privs"), "{out}");
    assert!(
        out.contains("created replication slot slot_setup_privs"),
        "{out}"
    );
    c.batch_execute("select pg_drop_replication_slot('slot_setup_privs')")
        .await
        .unwrap();
}

#[tokio::test]
async fn setup_explains_wal_level_replica() {
    let pg = Cluster::start(&[("wal_level", "replica")]);
    let c = pg.client("postgres").await;
    c.batch_execute("create table t (id int primary key)")
        .await
        .unwrap();
    let url = pg.url("postgres");
    let err = run_err(&[
        "setup",
        "--database-url",
        &url,
        "--tables",
        "t",
        "--create-slot",
    ])
    .await;
    assert!(
        err.contains("wal_level must be 'logical'")
            && err.contains("restart PostgreSQL")
            && err.contains("it is 'replica' now"),
        "{err}"
    );
    let created = c
        .query_opt("select 1 from pg_publication", &[])
        .await
        .unwrap();
    assert!(created.is_none(), "a refused setup changed the catalog");
    let out = run_ok(&["status", "--database-url", &url]).await;
    assert!(
        out.contains("wal_level: replica") && out.contains("warning: wal_level is 'replica'"),
        "{out}"
    );
}

#[tokio::test]
async fn setup_explains_exhausted_replication_slots() {
    let pg = Cluster::start(&[("max_replication_slots", "1")]);
    let c = pg.client("postgres").await;
    // Separately: a slot cannot be created in a transaction that has written.
    c.batch_execute("create table t (id int primary key)")
        .await
        .unwrap();
    c.batch_execute("select pg_create_logical_replication_slot('someone_else', 'pgoutput')")
        .await
        .unwrap();
    let err = run_err(&[
        "setup",
        "--database-url",
        &pg.url("postgres"),
        "--tables",
        "t",
        "--create-slot",
    ])
    .await;
    assert!(
        err.contains("all 1 replication slots are in use (max_replication_slots = 1)")
            && err.contains("raise max_replication_slots")
            && err.contains("restart"),
        "{err}"
    );
}
