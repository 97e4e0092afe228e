//! Replication core: `walcast tail` against a real cluster.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::json;

use crate::support::walcast::{self, spawn};
use crate::support::{cluster, wait_for, Cluster};

const T: Duration = Duration::from_secs(30);

/// A database with a publication for all tables and a slot, ready to tail.
async fn setup(db: &str, ddl: &str) -> tokio_postgres::Client {
    let c = cluster().new_db(db).await;
    c.batch_execute(ddl).await.unwrap();
    c.batch_execute(&format!("create publication pub_{db} for all tables"))
        .await
        .unwrap();
    create_slot(&c, &format!("slot_{db}")).await;
    c
}

async fn create_slot(c: &tokio_postgres::Client, name: &str) {
    c.execute(
        "select pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&name],
    )
    .await
    .unwrap();
}

fn tail_args(db: &str) -> Vec<String> {
    vec![
        "tail".into(),
        "--database-url".into(),
        cluster().url(db),
        "--slot".into(),
        format!("slot_{db}"),
        "--publication".into(),
        format!("pub_{db}"),
    ]
}

fn spawn_tail(db: &str) -> walcast::Proc {
    let args = tail_args(db);
    spawn(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[tokio::test]
async fn tail_streams_every_kind_with_old_images() {
    let db = "repl_kinds";
    let c = setup(
        db,
        "create table plain (id int primary key, name text, qty numeric);
         create table full_t (id int primary key, name text, qty numeric);
         alter table full_t replica identity full;",
    )
    .await;
    let mut tail = spawn_tail(db);
    c.batch_execute(
        "insert into plain values (1, 'a', 1.50);
         update plain set name = 'b' where id = 1;
         delete from plain where id = 1;
         insert into full_t values (1, 'a', 1.50);
         update full_t set name = 'b' where id = 1;
         delete from full_t where id = 1;
         truncate plain, full_t;",
    )
    .await
    .unwrap();
    let ev = tail.take_json(8, T).await;
    let kinds: Vec<_> = ev
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e["table"].as_str().unwrap(),
                e["type"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "plain:INSERT",
            "plain:UPDATE",
            "plain:DELETE",
            "full_t:INSERT",
            "full_t:UPDATE",
            "full_t:DELETE",
            "plain:TRUNCATE",
            "full_t:TRUNCATE"
        ]
    );
    // Values are typed JSON; numeric keeps its digits.
    assert_eq!(ev[0]["record"], json!({"id": 1, "name": "a", "qty": 1.50}));
    assert!(tail.raw[0].contains(r#""qty":1.50"#), "{}", tail.raw[0]);
    assert!(ev[0].get("old_record").is_none());
    // DEFAULT identity: the old image is the key only.
    assert_eq!(ev[1]["old_record"], json!({"id": 1}));
    assert_eq!(ev[1]["record"], json!({"id": 1, "name": "b", "qty": 1.50}));
    assert_eq!(ev[2]["old_record"], json!({"id": 1}));
    assert!(ev[2].get("record").is_none());
    // FULL identity: the whole old row.
    assert_eq!(
        ev[4]["old_record"],
        json!({"id": 1, "name": "a", "qty": 1.50})
    );
    assert_eq!(
        ev[5]["old_record"],
        json!({"id": 1, "name": "b", "qty": 1.50})
    );
    for e in &ev {
        assert_eq!(e["schema"], "public");
        assert!(e["lsn"].as_str().unwrap().contains('/'));
        let ts = e["commit_timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.contains('T'), "{ts}");
    }
    assert!(ev[6].get("record").is_none() && ev[6].get("old_record").is_none());
    // Commit LSNs never go down.
    let lsns: Vec<u64> = ev.iter().map(|e| lsn(e["lsn"].as_str().unwrap())).collect();
    assert!(lsns.windows(2).all(|w| w[0] <= w[1]));
    tail.signal(15);
    let (ok, err) = tail.wait(T).await;
    assert!(ok, "tail did not exit cleanly: {err}");
}

fn lsn(s: &str) -> u64 {
    let (a, b) = s.split_once('/').unwrap();
    (u64::from_str_radix(a, 16).unwrap() << 32) | u64::from_str_radix(b, 16).unwrap()
}

#[tokio::test]
async fn unchanged_toast_is_filled_with_full_identity_and_named_without_it() {
    let db = "repl_toast";
    let c = setup(
        db,
        "create table doc_full (id int primary key, body text, n int);
         alter table doc_full replica identity full;
         create table doc_plain (id int primary key, body text, n int);
         alter table doc_full alter column body set storage external;
         alter table doc_plain alter column body set storage external;",
    )
    .await;
    let big: String = (0..200_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    c.execute("insert into doc_full values (1, $1, 0)", &[&big])
        .await
        .unwrap();
    c.execute("insert into doc_plain values (1, $1, 0)", &[&big])
        .await
        .unwrap();
    let mut tail = spawn_tail(db);
    let ins = tail.take_json(2, T).await;
    assert_eq!(ins[0]["record"]["body"].as_str().unwrap().len(), big.len());
    c.batch_execute(
        "update doc_full set n = 1 where id = 1; update doc_plain set n = 1 where id = 1;",
    )
    .await
    .unwrap();
    let up = tail.take_json(2, T).await;
    assert_eq!(up[0]["table"], "doc_full");
    assert_eq!(up[0]["record"]["body"].as_str().unwrap(), big);
    assert!(up[0].get("unchanged_toast").is_none());
    assert_eq!(up[1]["table"], "doc_plain");
    assert!(up[1]["record"].get("body").is_none(), "absent, not null");
    assert_eq!(up[1]["record"]["n"], 1);
    assert_eq!(up[1]["unchanged_toast"], json!(["body"]));
    tail.signal(15);
    assert!(tail.wait(T).await.0);
}

/// Peak RSS of `tail` while it streams one transaction of `rows` rows.
async fn peak_rss_for(db: &str, c: &tokio_postgres::Client, rows: i64) -> (u64, Duration) {
    c.execute(
        "insert into big select g, md5(g::text), g * 1.5 from generate_series((select coalesce(max(id), 0) + 1 from big), (select coalesce(max(id), 0) from big) + $1::int8) g",
        &[&rows],
    )
    .await
    .unwrap();
    let start = std::time::Instant::now();
    let args = tail_args(db);
    let mut child = tokio::process::Command::new(walcast::BIN)
        .args(&args)
        .env("WALCAST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut out = child.stdout.take().unwrap();
    // Count lines without keeping them.
    let mut buf = vec![0u8; 1 << 16];
    let mut lines = 0i64;
    use tokio::io::AsyncReadExt;
    while lines < rows {
        let n = tokio::time::timeout(Duration::from_secs(120), out.read(&mut buf))
            .await
            .expect("tail stalled")
            .unwrap();
        assert!(n > 0, "tail exited early");
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as i64;
    }
    let elapsed = start.elapsed();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status();
    let _ = child.wait().await;
    (hwm, elapsed)
}

#[tokio::test]
async fn large_transaction_streams_in_constant_memory() {
    let db = "repl_big";
    let c = setup(
        db,
        "create table big (id int8 primary key, h text, v numeric);",
    )
    .await;
    let (small_kib, _) = peak_rss_for(db, &c, 20_000).await;
    let (big_kib, took) = peak_rss_for(db, &c, 200_000).await;
    eprintln!(
        "tail peak RSS: 20k-row txn {small_kib} KiB, 200k-row txn {big_kib} KiB; 200k rows in {took:?}"
    );
    // Ten times the rows must not mean noticeably more memory.
    assert!(
        big_kib < small_kib + 16 * 1024,
        "peak RSS grew with the transaction: {small_kib} KiB -> {big_kib} KiB"
    );
}

#[tokio::test]
async fn restart_after_sigkill_loses_nothing_and_repeats_only_unconfirmed() {
    let db = "repl_restart";
    let c = setup(db, "create table seq (id int primary key);").await;
    let total = 400;
    for i in 0..total {
        c.execute("insert into seq values ($1)", &[&i])
            .await
            .unwrap();
    }
    let mut tail = spawn_tail(db);
    let first = tail.take_json(150, T).await;
    tail.signal(9);
    let _ = tail.wait(T).await;
    let confirmed: String = c
        .query_one(
            &format!(
                "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = 'slot_{db}'"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let confirmed = lsn(&confirmed);
    let mut tail = spawn_tail(db);
    let mut seen: HashMap<i64, Vec<u64>> = HashMap::new();
    for e in &first {
        seen.entry(e["record"]["id"].as_i64().unwrap())
            .or_default()
            .push(lsn(e["lsn"].as_str().unwrap()));
    }
    let mut second = Vec::new();
    // Read until every id has been seen.
    while seen.len() < total as usize {
        let e = tail.next_json(T).await;
        seen.entry(e["record"]["id"].as_i64().unwrap())
            .or_default()
            .push(lsn(e["lsn"].as_str().unwrap()));
        second.push(e);
    }
    for (id, lsns) in &seen {
        if lsns.len() > 1 {
            assert!(
                lsns[0] >= confirmed,
                "transaction of id {id} at {:X} was confirmed ({confirmed:X}) yet delivered again",
                lsns[0]
            );
        }
    }
    // The restart resumed after what was confirmed, not from the start.
    let first_again = lsn(second[0]["lsn"].as_str().unwrap());
    assert!(first_again >= confirmed);
    tail.signal(15);
    assert!(tail.wait(T).await.0);
}

#[tokio::test]
async fn quiet_slot_does_not_pin_wal_while_other_tables_are_busy() {
    let db = "repl_idle";
    let c = cluster().new_db(db).await;
    c.batch_execute(&format!(
        "create table published (id int primary key);
         create table unpublished (id int, pad text);
         create publication pub_{db} for table published;"
    ))
    .await
    .unwrap();
    create_slot(&c, &format!("slot_{db}")).await;
    let mut tail = spawn_tail(db);
    c.batch_execute("insert into published values (1)")
        .await
        .unwrap();
    tail.next_json(T).await;
    // About 300 MB of WAL on a table the publication does not include.
    for _ in 0..6 {
        c.batch_execute(
            "insert into unpublished select g, repeat('x', 1000) from generate_series(1, 40000) g",
        )
        .await
        .unwrap();
    }
    let retained = wait_for("the slot to release WAL", Duration::from_secs(90), || async {
        c.batch_execute("checkpoint").await.unwrap();
        let r: i64 = c
            .query_one(
                &format!(
                    "select (pg_current_wal_lsn() - restart_lsn)::int8 from pg_replication_slots where slot_name = 'slot_{db}'"
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (r < 32 * 1024 * 1024).then_some(r)
    })
    .await;
    eprintln!("retained WAL after ~300 MB of unpublished writes: {retained} bytes");
    tail.signal(15);
    assert!(tail.wait(T).await.0);
}

#[tokio::test]
async fn scram_and_md5_roles_replicate_and_a_wrong_password_is_a_clear_error() {
    let db = "repl_auth";
    let c = setup(db, "create table t (id int primary key);").await;
    c.batch_execute(
        "set password_encryption = 'scram-sha-256';
         create role walcast_scram login replication password 'scram-pw';
         set password_encryption = 'md5';
         create role walcast_md5 login replication password 'md5-pw';
         grant select on t to walcast_scram, walcast_md5;",
    )
    .await
    .unwrap();
    create_slot(&c, "slot_repl_auth_2").await;
    let cl: &Cluster = cluster();
    for (user, pw, slot) in [
        ("walcast_scram", "scram-pw", "slot_repl_auth"),
        ("walcast_md5", "md5-pw", "slot_repl_auth_2"),
    ] {
        let url = cl.url_as(user, pw, db);
        let mut tail = spawn(&[
            "tail",
            "--database-url",
            &url,
            "--slot",
            slot,
            "--publication",
            "pub_repl_auth",
        ]);
        c.execute(
            "insert into t values ($1)",
            &[&(user.len() as i32 + pw.len() as i32)],
        )
        .await
        .unwrap();
        let e = tail.next_json(T).await;
        assert_eq!(e["table"], "t", "{user}");
        tail.signal(15);
        assert!(tail.wait(T).await.0, "{user}");
    }
    let url = cl.url_as("walcast_scram", "wrong", db);
    let (ok, _, err) = walcast::run(
        &[
            "tail",
            "--database-url",
            &url,
            "--slot",
            "slot_repl_auth",
            "--publication",
            "pub_repl_auth",
        ],
        T,
    )
    .await;
    assert!(!ok);
    assert!(err.contains("password authentication failed"), "{err}");
}

#[tokio::test]
async fn bad_setup_gives_actionable_errors() {
    let db = "repl_bad";
    let c = setup(db, "create table t (id int primary key);").await;
    let url = cluster().url(db);
    let run = |slot: &'static str, publication: &'static str| {
        let url = url.clone();
        async move {
            walcast::run(
                &[
                    "tail",
                    "--database-url",
                    &url,
                    "--slot",
                    slot,
                    "--publication",
                    publication,
                ],
                T,
            )
            .await
        }
    };
    let (ok, _, err) = run("no_such_slot", "pub_repl_bad").await;
    assert!(
        !ok && err.contains("does not exist") && err.contains("--create-slot"),
        "{err}"
    );
    let (ok, _, err) = run("slot_repl_bad", "no_such_pub").await;
    assert!(
        !ok && err.contains("publication") && err.contains("walcast setup"),
        "{err}"
    );

    // A slot in use elsewhere.
    let mut first = spawn_tail(db);
    c.batch_execute("insert into t values (1)").await.unwrap();
    first.next_json(T).await;
    let (ok, _, err) = run("slot_repl_bad", "pub_repl_bad").await;
    assert!(!ok && err.contains("already in use"), "{err}");
    first.signal(15);
    assert!(first.wait(T).await.0);

    // A publication dropped while streaming.
    let mut tail = spawn_tail(db);
    c.batch_execute("insert into t values (2)").await.unwrap();
    tail.next_json(T).await;
    c.batch_execute("drop publication pub_repl_bad; insert into t values (3)")
        .await
        .unwrap();
    let (ok, err) = tail.wait(T).await;
    assert!(
        !ok && err.contains("publication") && err.contains("does not exist"),
        "{err}"
    );

    // A server without wal_level = logical.
    let replica = Cluster::start(&[("wal_level", "replica")]);
    let (ok, _, err) = walcast::run(
        &[
            "tail",
            "--database-url",
            &replica.url("postgres"),
            "--slot",
            "s",
            "--publication",
            "p",
        ],
        T,
    )
    .await;
    assert!(
        !ok && err.contains("wal_level") && err.contains("restart"),
        "{err}"
    );
    replica.stop();
}

#[tokio::test]
async fn create_slot_and_temporary_slot_work() {
    let db = "repl_create";
    let c = cluster().new_db(db).await;
    c.batch_execute(&format!(
        "create table t (id int primary key, tags text[], doc jsonb, at timestamptz);
         create publication pub_{db} for table t;"
    ))
    .await
    .unwrap();
    let url = cluster().url(db);
    for extra in [vec!["--create-slot"], vec!["--temporary"]] {
        let slot = if extra[0] == "--temporary" {
            "tmp_slot"
        } else {
            "made_slot"
        };
        let mut args = vec![
            "tail",
            "--database-url",
            &url,
            "--slot",
            slot,
            "--publication",
            "pub_repl_create",
        ];
        args.extend(extra.iter().copied());
        let mut tail = spawn(&args);
        wait_for("the slot to exist", T, || async {
            let n: i64 = c
                .query_one(
                    "select count(*) from pg_replication_slots where slot_name = $1 and active and confirmed_flush_lsn is not null",
                    &[&slot],
                )
                .await
                .unwrap()
                .get(0);
            (n == 1).then_some(())
        })
        .await;
        c.batch_execute(
            r#"insert into t values (1, '{a,"b c",NULL}', '{"k": [1, 2.50]}', '2024-01-02 03:04:05.678+00');
               delete from t;"#,
        )
        .await
        .unwrap();
        let e = tail.next_json(T).await;
        assert_eq!(
            e["record"],
            json!({"id": 1, "tags": ["a", "b c", null], "doc": {"k": [1, 2.50]}, "at": "2024-01-02T03:04:05.678+00:00"})
        );
        let columns: BTreeMap<String, String> = e["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().into(),
                    c["type"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(columns["tags"], "_text");
        assert_eq!(columns["at"], "timestamptz");
        tail.next_json(T).await;
        tail.signal(15);
        assert!(tail.wait(T).await.0);
    }
    // The server drops a temporary slot as the connection's backend exits.
    wait_for("the temporary slot to be dropped", T, || async {
        let n: i64 = c
            .query_one(
                "select count(*) from pg_replication_slots where slot_name = 'tmp_slot'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 0).then_some(())
    })
    .await;
}
