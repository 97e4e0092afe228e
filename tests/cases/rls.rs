//! RLS mode (issue 18) with the real realtime-js: the database's own policies
//! and privileges decide deliveries, compared with PostgreSQL's own verdict
//! (`SET ROLE …; SELECT … FROM jobs`), on the compiled path and the SQL path
//! side by side; a policy that raises for one subscriber; a policy changed
//! while clients are connected.

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::support::js::{is_on, JsClient};
use crate::support::walcast::{serve, Server};
use crate::support::{cluster, config_file, setup_db};

const T: Duration = Duration::from_secs(20);
pub(super) const SECRET: &str = "walcast-rls-test-secret-with-enough-bytes!";

pub(super) fn token(role: &str, sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"role": role, "sub": sub, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Roles are cluster-wide: each test makes its own, idempotently.
pub(super) fn roles(names: &[&str]) -> String {
    names
        .iter()
        .map(|r| {
            format!(
                "do $$ begin create role {r} nologin; exception when duplicate_object then null; end $$;"
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub(super) fn auth_sql() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/auth.sql")).unwrap()
}

async fn start(db: &str, name: &str, compile: bool) -> Server {
    let extra = format!("rls_compile = {compile}\n\n[status]\ntoken = \"rls-status\"");
    start_with(db, name, &extra).await
}

/// walcast in RLS mode on `db` (slot named after `name`), `extra` appended to
/// its `[auth]` section.
pub(super) async fn start_with(db: &str, name: &str, extra: &str) -> Server {
    let toml = format!(
        "[auth]\nmode = \"jwt\"\njwt_secret = \"{SECRET}\"\nrls = true\nrls_poll_ms = 200\n{extra}\n"
    );
    let path = config_file(name, &toml);
    serve(
        &cluster().url(db),
        &format!("slot_{name}"),
        &format!("pub_{db}"),
        &["--create-slot", "--config", path.to_str().unwrap()],
    )
    .await
}

pub(super) async fn connect(js: &mut JsClient, client: &str, server: &Server, token: &str) {
    js.call(
        json!({"cmd": "connect", "client": client, "url": format!("ws://127.0.0.1:{}/realtime/v1", server.port),
               "apikey": token, "vsn": "2.0.0"}),
        T,
    )
    .await;
}

async fn subscribe(js: &mut JsClient, client: &str, channel: &str, table: &str) -> Value {
    js.call(
        json!({"cmd": "subscribe", "client": client, "channel": channel,
               "postgres_changes": [{"event": "*", "schema": "public", "table": table}]}),
        T,
    )
    .await;
    js.wait_for("a status", T, |v| {
        v["client"] == client && is_on(v, "status", channel)
    })
    .await
}

const CUST_A: &str = "00000000-0000-0000-0000-00000000000a";
const CUST_B: &str = "00000000-0000-0000-0000-00000000000b";
const TECH: &str = "00000000-0000-0000-0000-0000000000c1";
const STAFF: &str = "00000000-0000-0000-0000-0000000000f1";

/// Seed 004's portal in miniature: customers see their own jobs (compiled:
/// `customer_id = auth.uid()`) without the cost column (column privileges);
/// technicians the jobs assigned to them through a subquery, but never those
/// costing 1000 or more (a restrictive policy) — the SQL path; staff everything
/// (`true`, compiled). Randomized inserts, updates that move jobs between
/// customers and technicians' assignments, and deletes; two walcast servers
/// on the same database, one compiling, one checking every change by SQL; every
/// client on both. Each delivery is compared with PostgreSQL's own verdict for
/// the row image: after the write for INSERT/UPDATE, before it for DELETE.
#[tokio::test]
async fn portal_policies_match_postgres_on_both_paths() {
    let db = "rls_portal";
    let ddl = format!(
        "{roles}\n{auth}\n
         create table assignments (job_id int, tech_id uuid);
         create table jobs (id int primary key, customer_id uuid, tech_id uuid, title text, cost int);
         alter table jobs replica identity full;
         alter table jobs enable row level security;
         create policy customer_own on jobs for select to rls_cust using (customer_id = auth.uid());
         create policy tech_assigned on jobs for select to rls_tech using (
           exists (select 1 from assignments a where a.job_id = jobs.id and a.tech_id = auth.uid()));
         create policy tech_cheap on jobs as restrictive for select to rls_tech using (cost < 1000);
         create policy staff_all on jobs for select to rls_staff using (true);
         grant select (id, customer_id, tech_id, title) on jobs to rls_cust;
         grant select on jobs, assignments to rls_tech;
         grant select on jobs to rls_staff;",
        roles = roles(&["rls_cust", "rls_tech", "rls_staff"]),
        auth = auth_sql(),
    );
    let c = setup_db(db, &ddl).await;
    // Technicians are assigned to every odd job id up front (assignments are
    // read when the check runs, so they stay put during the workload).
    c.batch_execute(&format!(
        "insert into assignments select g, '{TECH}' from generate_series(1, 999, 2) g"
    ))
    .await
    .unwrap();
    let compiled = start(db, "rls_portal_c", true).await;
    let by_sql = start(db, "rls_portal_s", false).await;

    let clients = [
        ("a", "rls_cust", CUST_A),
        ("b", "rls_cust", CUST_B),
        ("t", "rls_tech", TECH),
        ("s", "rls_staff", STAFF),
    ];
    let mut js = JsClient::spawn().await;
    for (server, suffix) in [(&compiled, "c"), (&by_sql, "s")] {
        for (name, role, sub) in clients {
            let client = format!("{name}{suffix}");
            connect(&mut js, &client, server, &token(role, sub)).await;
            let st = subscribe(&mut js, &client, "jobs", "jobs").await;
            assert_eq!(st["status"], "SUBSCRIBED", "{client}: {st}");
        }
    }

    // PostgreSQL's own verdict: may `role` with `sub` see job `id` now?
    let visible = |role: &'static str, sub: &'static str, id: i32| {
        let c = &c;
        async move {
            c.batch_execute(&format!(
                "begin; set local role {role}; select set_config('request.jwt.claims', '{{\"sub\":\"{sub}\",\"role\":\"{role}\"}}', true);"
            ))
            .await
            .unwrap();
            let n = c
                .query("select id from jobs where id = $1", &[&id])
                .await
                .unwrap()
                .len();
            c.batch_execute("rollback").await.unwrap();
            n == 1
        }
    };
    let mut seed: u64 = 0x5eed_0018;
    let mut rnd = |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let customers = [CUST_A, CUST_B];
    let mut expected: HashMap<&str, Vec<(String, i32)>> = HashMap::new();
    let mut live: Vec<i32> = Vec::new();
    let mut next_id = 1;
    for _ in 0..90 {
        let op = if live.is_empty() { 0 } else { rnd(4) };
        let (kind, id) = match op {
            0 => {
                let id = next_id;
                next_id += 1;
                c.execute(
                    "insert into jobs values ($1, $2::text::uuid, $3::text::uuid, 'job', $4)",
                    &[
                        &id,
                        &customers[rnd(2) as usize],
                        &TECH,
                        &((rnd(4) * 400) as i32),
                    ],
                )
                .await
                .unwrap();
                live.push(id);
                ("INSERT", id)
            }
            1 | 2 => {
                let id = live[rnd(live.len() as u64) as usize];
                c.execute(
                    "update jobs set customer_id = $2::text::uuid, cost = $3 where id = $1",
                    &[&id, &customers[rnd(2) as usize], &((rnd(4) * 400) as i32)],
                )
                .await
                .unwrap();
                ("UPDATE", id)
            }
            _ => {
                let id = live.swap_remove(rnd(live.len() as u64) as usize);
                // The old image's verdict: before the row is gone.
                for (name, role, sub) in clients {
                    if visible(role, sub, id).await {
                        expected
                            .entry(name)
                            .or_default()
                            .push(("DELETE".into(), id));
                    }
                }
                c.execute("delete from jobs where id = $1", &[&id])
                    .await
                    .unwrap();
                continue;
            }
        };
        for (name, role, sub) in clients {
            if visible(role, sub, id).await {
                expected.entry(name).or_default().push((kind.into(), id));
            }
        }
    }
    let mut total = 0;
    for (name, _, _) in clients {
        for suffix in ["c", "s"] {
            let client = format!("{name}{suffix}");
            for (kind, id) in expected.get(name).cloned().unwrap_or_default() {
                let v = js
                    .wait_for(&format!("{kind} {id} for {client}"), T, |v| {
                        v["client"] == client.as_str() && is_on(v, "postgres_changes", "jobs")
                    })
                    .await;
                let p = &v["payload"];
                let got = p["new"]["id"].as_i64().or(p["old"]["id"].as_i64());
                assert_eq!(
                    (p["eventType"].as_str().unwrap(), got),
                    (kind.as_str(), Some(id as i64)),
                    "{client} got {p}"
                );
                if name == "a" || name == "b" {
                    for side in ["new", "old"] {
                        if let Some(row) = p[side].as_object() {
                            assert!(!row.contains_key("cost"), "{client} saw the cost: {p}");
                        }
                    }
                }
                total += 1;
            }
        }
    }
    js.expect_none(
        "any change beyond PostgreSQL's verdict",
        Duration::from_millis(800),
        |v| is_on(v, "postgres_changes", "jobs"),
    )
    .await;
    assert!(total > 150, "the workload produced {total} deliveries");
    // How each role is enforced, as the status page shows it.
    let (_, body) = crate::support::http_get(compiled.port, "/status.json?apikey=rls-status").await;
    let status: Value = serde_json::from_str(&body).unwrap();
    let plans = status["rls"].as_array().cloned().unwrap_or_default();
    let path = |role: &str| {
        plans
            .iter()
            .find(|p| p["role"] == role)
            .map(|p| p["path"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(path("rls_cust").as_deref(), Some("compiled"), "{plans:?}");
    assert_eq!(path("rls_staff").as_deref(), Some("compiled"), "{plans:?}");
    assert_eq!(path("rls_tech").as_deref(), Some("sql"), "{plans:?}");
    // And per policy, from the database alone.
    let url = cluster().url(db);
    let (ok, out, err) = crate::support::walcast::run(
        &[
            "status",
            "--database-url",
            &url,
            "--slot",
            "slot_rls_portal_c",
            "--publication",
            "pub_rls_portal",
        ],
        T,
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("row security public.jobs: enabled"), "{out}");
    assert!(
        out.contains("policy customer_own (SELECT, permissive, to rls_cust): compiled"),
        "{out}"
    );
    assert!(
        out.contains(
            "policy tech_assigned (SELECT, permissive, to rls_tech): sql (only `column = value`"
        ),
        "{out}"
    );
    assert!(
        out.contains("policy tech_cheap (SELECT, restrictive, to rls_tech): sql"),
        "{out}"
    );
}

/// A subscriber whose claims make a policy raise (a `sub` that is not a uuid:
/// `auth.uid()` fails) gets its channel closed with a `system` error naming
/// the cause; the others keep receiving everything.
#[tokio::test]
async fn a_policy_that_raises_closes_only_that_subscribers_channel() {
    let db = "rls_raise";
    let ddl = format!(
        "{roles}\n{auth}\n
         create table notes (id int primary key, owner uuid, body text);
         alter table notes replica identity full;
         alter table notes enable row level security;
         create policy own on notes for select to rls_r_user using (owner = auth.uid() or body = 'public');
         grant select on notes to rls_r_user;",
        roles = roles(&["rls_r_user"]),
        auth = auth_sql(),
    );
    let c = setup_db(db, &ddl).await;
    let server = start(db, "rls_raise", true).await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "good", &server, &token("rls_r_user", CUST_A)).await;
    connect(&mut js, "bad", &server, &token("rls_r_user", "not-a-uuid")).await;
    for name in ["good", "bad"] {
        let st = subscribe(&mut js, name, "notes", "notes").await;
        assert_eq!(st["status"], "SUBSCRIBED", "{name}: {st}");
    }
    c.execute(
        "insert into notes values (1, $1::text::uuid, 'mine')",
        &[&CUST_A],
    )
    .await
    .unwrap();
    let sys = js
        .wait_for("bad's system error", T, |v| {
            v["client"] == "bad" && is_on(v, "system", "notes") && v["payload"]["status"] == "error"
        })
        .await;
    let text = sys.to_string();
    assert!(
        text.contains("RLS_CHECK_FAILED") && text.contains("uuid"),
        "{sys}"
    );
    let got = js
        .wait_for("good's insert", T, |v| {
            v["client"] == "good" && is_on(v, "postgres_changes", "notes")
        })
        .await;
    assert_eq!(got["payload"]["new"]["id"], 1, "{got}");
    c.execute(
        "insert into notes values (2, $1::text::uuid, 'mine too')",
        &[&CUST_A],
    )
    .await
    .unwrap();
    let got = js
        .wait_for("good's second insert", T, |v| {
            v["client"] == "good" && is_on(v, "postgres_changes", "notes")
        })
        .await;
    assert_eq!(got["payload"]["new"]["id"], 2, "{got}");
    let (_, metrics) = crate::support::http_get(server.port, "/metrics").await;
    assert!(
        metrics.lines().any(
            |l| l.starts_with("walcast_rls_checks_total{result=\"error\"}") && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
}

/// A policy replaced while clients are connected takes effect without a
/// restart: the next change is judged by the new policy.
#[tokio::test]
async fn a_policy_changed_while_connected_takes_effect() {
    let db = "rls_alter";
    let ddl = format!(
        "{roles}\n{auth}\n
         create table tasks (id int primary key, owner uuid, team text);
         alter table tasks replica identity full;
         alter table tasks enable row level security;
         create policy p on tasks for select to rls_a_user using (owner = auth.uid());
         grant select on tasks to rls_a_user;",
        roles = roles(&["rls_a_user"]),
        auth = auth_sql(),
    );
    let c = setup_db(db, &ddl).await;
    let server = start(db, "rls_alter", true).await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "u", &server, &token("rls_a_user", CUST_A)).await;
    let st = subscribe(&mut js, "u", "tasks", "tasks").await;
    assert_eq!(st["status"], "SUBSCRIBED", "{st}");
    c.batch_execute(&format!(
        "insert into tasks values (1, '{CUST_B}', 'x'); insert into tasks values (2, '{CUST_A}', 'x');"
    ))
    .await
    .unwrap();
    let got = js
        .wait_for("own task", T, |v| {
            v["client"] == "u" && is_on(v, "postgres_changes", "tasks")
        })
        .await;
    assert_eq!(got["payload"]["new"]["id"], 2, "only the own row: {got}");
    // Now the whole team 'x' is visible.
    c.batch_execute("alter policy p on tasks using (owner = auth.uid() or team = 'x')")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + T;
    let mut id = 10;
    loop {
        c.execute(
            "insert into tasks values ($1, $2::text::uuid, 'x')",
            &[&id, &CUST_B],
        )
        .await
        .unwrap();
        let v = js.next_event(Duration::from_millis(500)).await;
        if let Some(v) = v {
            if v["client"] == "u" && is_on(&v, "postgres_changes", "tasks") {
                assert_eq!(v["payload"]["new"]["team"], "x", "{v}");
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the altered policy never took effect"
        );
        id += 1;
    }
}
