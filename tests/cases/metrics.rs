//! `/metrics`, `/health`, `/ready` and the health levels against a live daemon.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::http_get as get;
use crate::support::walcast::{serve, Server};
use crate::support::{cluster, wait_for, Cluster};

const T: Duration = Duration::from_secs(30);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn scrape(port: u16) -> String {
    let (status, body) = get(port, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of one series (`name` or `name{label="v"}`), exactly as exported.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("series {series} not in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// The `/ready` check named `name`.
fn check<'a>(r: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    r["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name} in {r}"))
}

async fn ready(port: u16) -> (u16, Value) {
    let (status, body) = get(port, "/ready").await;
    (status, serde_json::from_str(&body).expect("/ready JSON"))
}

fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("promtool"))
            .find(|f| f.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "promtool not found: install it (Debian/Ubuntu: apt-get install prometheus; .ci/run does this)"
        )
    })
}

/// Runs promtool with `args`, `stdin` as input; panics with its output on failure.
fn promtool_ok(args: &[&str], stdin: &str) {
    use std::io::Write;
    let mut child = Command::new(promtool())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn setup(c: &Cluster, db: &str) -> tokio_postgres::Client {
    let client = c.new_db(db).await;
    client
        .batch_execute(&format!(
            "create table m (id int primary key, v text); \
             create publication pub_{db} for all tables;"
        ))
        .await
        .unwrap();
    client
}

async fn start(c: &Cluster, db: &str, config: Option<&PathBuf>) -> Server {
    let mut extra = vec!["--create-slot"];
    let path;
    if let Some(p) = config {
        path = p.to_string_lossy().into_owned();
        extra.extend(["--config", path.as_str()]);
    }
    serve(
        &c.url(db),
        &format!("slot_{db}"),
        &format!("pub_{db}"),
        &extra,
    )
    .await
}

/// A raw vsn 1.0.0 client joined to every change of table `m`.
async fn subscribe(server: &Server) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url("1.0.0"))
        .await
        .expect("connect");
    let join = json!({"topic": "realtime:m", "event": "phx_join", "ref": "1", "join_ref": "1",
        "payload": {"config": {"postgres_changes": [{"event": "*", "schema": "public", "table": "m"}]}}});
    ws.send(Message::Text(join.to_string().into()))
        .await
        .unwrap();
    let reply = next_event(&mut ws, "phx_reply").await;
    assert_eq!(reply["payload"]["status"], "ok", "{reply}");
    next_event(&mut ws, "system").await;
    ws
}

async fn next_event(ws: &mut Ws, event: &str) -> Value {
    loop {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {event} frame in time"))
            .expect("socket ended")
            .expect("socket error");
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["event"] == event {
                return v;
            }
        }
    }
}

/// Reads `postgres_changes` until every id in `want` was seen (duplicates allowed:
/// delivery is at-least-once across a reconnect).
async fn receive_ids(ws: &mut Ws, want: impl IntoIterator<Item = i64>) {
    let mut missing: BTreeSet<i64> = want.into_iter().collect();
    while !missing.is_empty() {
        let f = next_event(ws, "postgres_changes").await;
        let data = &f["payload"]["data"];
        let id = data["record"]["id"]
            .as_i64()
            .or_else(|| data["old_record"]["id"].as_i64());
        if let Some(id) = id {
            missing.remove(&id);
        }
    }
}

fn health_status(text: &str) -> f64 {
    value(text, "walcast_health_status")
}

#[tokio::test]
async fn metrics_count_a_known_workload_and_pass_promtool() {
    let db = "metrics_counts";
    let c = cluster();
    let sql = setup(c, db).await;
    sql.batch_execute("alter table m replica identity full")
        .await
        .unwrap();
    // Port 0: the system picks; walcast says which.
    let cfg = config_file_named("counts", "[server]\nmetrics_listen = \"127.0.0.1:0\"\n");
    let server = start(c, db, Some(&cfg)).await;
    let metrics_port = server
        .metrics_port
        .expect("walcast: metrics listening on … before the listening line");
    assert_ne!(metrics_port, server.port);
    for port in [server.port, metrics_port] {
        let (status, body) = get(port, "/health").await;
        assert_eq!(status, 200);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["status"],
            "ok"
        );
        assert!(scrape(port).await.contains("# HELP walcast_health_status "));
    }

    let mut ws = subscribe(&server).await;
    let before = scrape(server.port).await;
    assert_eq!(value(&before, "walcast_websocket_connections"), 1.0);
    assert_eq!(value(&before, "walcast_websocket_channels"), 1.0);
    assert_eq!(value(&before, "walcast_subscriptions"), 1.0);
    assert!(value(&before, "walcast_joins_total{result=\"ok\"}") >= 1.0);
    assert_eq!(value(&before, "walcast_replication_connected"), 1.0);

    // 4 transactions: 10 inserts, 2 updates, 1 delete = 13 changes, 13 frames.
    sql.batch_execute("insert into m select g, 'a' from generate_series(1, 4) g")
        .await
        .unwrap();
    sql.batch_execute("insert into m select g, 'b' from generate_series(5, 7) g")
        .await
        .unwrap();
    sql.batch_execute("insert into m select g, 'c' from generate_series(8, 10) g")
        .await
        .unwrap();
    sql.batch_execute(
        "begin; update m set v = 'u' where id in (1, 2); delete from m where id = 3; commit;",
    )
    .await
    .unwrap();
    for _ in 0..13 {
        next_event(&mut ws, "postgres_changes").await;
    }

    let d = |after: &str, series: &str| value(after, series) - value(&before, series);
    let after = wait_for("counters to reflect the workload", T, || async {
        let after = scrape(server.port).await;
        (d(&after, "walcast_transactions_total") >= 4.0
            && d(&after, "walcast_websocket_frames_sent_total") >= 13.0)
            .then_some(after)
    })
    .await;
    assert_eq!(d(&after, "walcast_changes_total{kind=\"insert\"}"), 10.0);
    assert_eq!(d(&after, "walcast_changes_total{kind=\"update\"}"), 2.0);
    assert_eq!(d(&after, "walcast_changes_total{kind=\"delete\"}"), 1.0);
    assert_eq!(d(&after, "walcast_changes_total{kind=\"truncate\"}"), 0.0);
    assert_eq!(d(&after, "walcast_transactions_total"), 4.0);
    assert_eq!(d(&after, "walcast_websocket_frames_sent_total"), 13.0);
    assert!(d(&after, "walcast_websocket_sent_bytes_total") > 13.0 * 100.0);
    assert_eq!(
        d(&after, "walcast_commit_to_send_latency_seconds_count"),
        13.0
    );
    assert!(
        d(
            &after,
            "walcast_commit_to_send_latency_seconds_bucket{le=\"10\"}"
        ) >= 13.0
    );
    assert_eq!(value(&after, "walcast_decode_errors_total"), 0.0);
    assert_eq!(
        value(
            &after,
            "walcast_clients_dropped_total{reason=\"slow_client\"}"
        ),
        0.0
    );
    assert_eq!(
        value(&after, "walcast_auth_failures_total{reason=\"expired\"}"),
        0.0
    );
    assert!(value(&after, "process_resident_memory_bytes") > 0.0);
    assert!(after.contains("# HELP walcast_slot_lag_bytes "));

    // The slot poll fills in the slot's state.
    let polled = wait_for("the first slot poll", T, || async {
        let t = scrape(server.port).await;
        (value(&t, "walcast_slot_exists") == 1.0).then_some(t)
    })
    .await;
    assert_eq!(
        value(&polled, "walcast_slot_wal_status{status=\"reserved\"}"),
        1.0
    );
    assert_eq!(
        value(&polled, "walcast_slot_wal_status{status=\"lost\"}"),
        0.0
    );

    let (status, r) = ready(server.port).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["ready"], true);
    let names: Vec<&str> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "replication_connected",
            "log_writable",
            "lag_seconds",
            "lag_bytes",
            "disconnected_seconds",
            "client_drops_per_minute"
        ]
    );

    let (status, _) = ready(metrics_port).await;
    assert_eq!(status, 200, "/ready on server.metrics_listen");

    promtool_ok(&["check", "metrics"], &polled);
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/config/prometheus-alerts.yml");
    promtool_ok(&["check", "rules", rules], "");
    let _ = std::fs::remove_file(cfg);
}

#[tokio::test]
async fn ready_fails_while_postgres_is_down_and_recovers() {
    let db = "metrics_outage";
    let c = Cluster::start(&[]);
    let sql = setup(&c, db).await;
    let cfg = config_file_named(
        "outage",
        "[health]\nslot_poll_interval_secs = 1\ndisconnected_seconds_warning = 1\ndisconnected_seconds_critical = 3\n",
    );
    let server = start(&c, db, Some(&cfg)).await;
    let mut ws = subscribe(&server).await;
    sql.batch_execute("insert into m select g, 'x' from generate_series(1, 5) g")
        .await
        .unwrap();
    wait_for("ready and normal", T, || async {
        let (status, _) = ready(server.port).await;
        let h = health_status(&scrape(server.port).await);
        (status == 200 && h == 0.0).then_some(())
    })
    .await;

    c.stop();
    let stopped = Instant::now();
    let r = wait_for("/ready 503 and health critical", T, || async {
        let (status, r) = ready(server.port).await;
        let h = health_status(&scrape(server.port).await);
        (status == 503 && h == 2.0 && r["status"] == "critical").then_some(r)
    })
    .await;
    // critical 3 s, plus the reconnect attempt and a scrape.
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(r["ready"], false);
    assert_eq!(r["status"], "critical");
    assert_eq!(r["checks"][0]["name"], "replication_connected");
    assert_eq!(r["checks"][0]["level"], "critical");
    let disc = check(&r, "disconnected_seconds");
    assert_eq!(disc["name"], "disconnected_seconds");
    assert_eq!(disc["level"], "critical");
    assert!(disc["value"].as_f64().unwrap() >= 3.0, "{disc}");
    let text = scrape(server.port).await;
    assert_eq!(value(&text, "walcast_replication_connected"), 0.0);
    assert_eq!(
        value(
            &text,
            "walcast_health_check_status{check=\"disconnected_seconds\"}"
        ),
        2.0
    );

    c.restart();
    let sql = c.client(db).await;
    sql.batch_execute("insert into m select g, 'y' from generate_series(6, 10) g")
        .await
        .unwrap();
    wait_for(
        "ready and normal again",
        Duration::from_secs(60),
        || async {
            let (status, _) = ready(server.port).await;
            let h = health_status(&scrape(server.port).await);
            (status == 200 && h == 0.0).then_some(())
        },
    )
    .await;
    let text = scrape(server.port).await;
    assert!(value(&text, "walcast_replication_reconnects_total") >= 1.0);
    assert_eq!(value(&text, "walcast_replication_connected"), 1.0);
    // No change lost across the outage.
    receive_ids(&mut ws, 1..=10).await;
    drop(ws);
    c.stop();
    let _ = std::fs::remove_file(cfg);
}

/// Resumes a stopped process when dropped, so a failing test never leaves the
/// walsender frozen.
struct Frozen(i32);

impl Frozen {
    fn new(pid: i32) -> Frozen {
        signal("STOP", pid);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal("CONT", self.0);
    }
}

fn signal(sig: &str, pid: i32) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid} failed");
}

/// A walsender that cannot send makes the slot fall behind for real: the server
/// keeps writing WAL, nothing reaches walcast, the slot is not confirmed. Lag
/// grows past the warning threshold (level 1) but stays under critical (ready).
/// A quiet database before that must not count as lag.
#[tokio::test]
async fn held_back_slot_raises_warning_and_quiet_database_does_not() {
    let db = "metrics_lag";
    let c = Cluster::start(&[]);
    let sql = setup(&c, db).await;
    let cfg = config_file_named(
        "lag",
        "[health]\nslot_poll_interval_secs = 1\nlag_seconds_warning = 2\nlag_seconds_critical = 3600\n",
    );
    let server = start(&c, db, Some(&cfg)).await;
    let mut ws = subscribe(&server).await;
    sql.batch_execute("insert into m values (1, 'first')")
        .await
        .unwrap();
    receive_ids(&mut ws, [1]).await;
    wait_for("caught up: lag 0, normal", T, || async {
        let t = scrape(server.port).await;
        (value(&t, "walcast_replication_lag_seconds") == 0.0 && health_status(&t) == 0.0)
            .then_some(())
    })
    .await;
    // Quiet for longer than the warning threshold: still no lag.
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(4) {
        let t = scrape(server.port).await;
        assert_eq!(
            value(&t, "walcast_replication_lag_seconds"),
            0.0,
            "a quiet database is not lag"
        );
        assert_eq!(health_status(&t), 0.0);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let pid: i32 = sql
        .query_one(
            "select active_pid from pg_replication_slots where slot_name = $1",
            &[&format!("slot_{db}")],
        )
        .await
        .unwrap()
        .get(0);
    let frozen = Frozen::new(pid);
    sql.batch_execute("insert into m select g, repeat('x', 1000) from generate_series(2, 200) g")
        .await
        .unwrap();
    let t = wait_for("lag past the warning threshold", T, || async {
        let t = scrape(server.port).await;
        (health_status(&t) == 1.0).then_some(t)
    })
    .await;
    assert!(value(&t, "walcast_replication_lag_seconds") >= 2.0);
    assert_eq!(
        value(&t, "walcast_health_check_status{check=\"lag_seconds\"}"),
        1.0
    );
    assert!(
        value(&t, "walcast_slot_lag_bytes") > 100_000.0,
        "the slot is behind the inserted rows"
    );
    let (status, r) = ready(server.port).await;
    assert_eq!(status, 200, "warning is still ready: {r}");
    assert_eq!(r["status"], "warning");
    assert_eq!(check(&r, "lag_seconds")["level"], "warning");

    drop(frozen);
    receive_ids(&mut ws, 2..=200).await;
    wait_for("caught up again", T, || async {
        let t = scrape(server.port).await;
        (value(&t, "walcast_replication_lag_seconds") == 0.0 && health_status(&t) == 0.0)
            .then_some(())
    })
    .await;
    drop(ws);
    c.stop();
    let _ = std::fs::remove_file(cfg);
}

/// A config file for this file's tests.
fn config_file_named(name: &str, toml: &str) -> std::path::PathBuf {
    crate::support::config_file(&format!("metrics-{name}"), toml)
}
