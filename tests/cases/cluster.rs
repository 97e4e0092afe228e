//! Several nodes through NATS JetStream (README, "Running several nodes"), with
//! real processes: a throwaway `nats-server -js`, `walcast relay` reading the slot
//! and publishing, gateways (`walcast serve --cluster`) serving the real
//! `@supabase/realtime-js`.

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::support::js::{is_on, JsClient};
use crate::support::walcast::{read_listening, spawn, Proc};
use crate::support::{cluster, create_slot, scratch_dir};

const T: Duration = Duration::from_secs(30);

fn nats() -> walcast::testing::Nats {
    walcast::testing::Nats::start().unwrap_or_else(|e| panic!("cannot start nats-server: {e}"))
}

/// A database `db` with `ddl`, a publication `pub_<db>` for all tables and a slot
/// `slot_<db>`.
async fn db_with(db: &str, ddl: &str) -> tokio_postgres::Client {
    let c = cluster().new_db(db).await;
    c.batch_execute(ddl).await.unwrap();
    c.batch_execute(&format!("create publication pub_{db} for all tables"))
        .await
        .unwrap();
    create_slot(&c, &format!("slot_{db}")).await;
    c
}

/// A running walcast process of a cluster and its port.
struct Node {
    proc: Proc,
    port: u16,
    /// The scratch dir its config (and a gateway's change log) lives in.
    _dir: std::path::PathBuf,
}

impl Node {
    fn ws(&self) -> String {
        format!("ws://127.0.0.1:{}/realtime/v1", self.port)
    }
}

/// The config of a node of `db`'s cluster on `nats_url`.
fn node_config(db: &str, nats_url: &str, extra: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = scratch_dir();
    let log = dir.join("log");
    let config = dir.join("walcast.toml");
    std::fs::write(
        &config,
        format!(
            "[cluster]\nnats_url = {nats_url:?}\nstream = \"S_{db}\"\nsubject_prefix = \"wc_{db}\"\n\
             [log]\ndir = {:?}\n[server]\noutage_notice_secs = 1\n{extra}",
            log.display().to_string()
        ),
    )
    .unwrap();
    (dir, config)
}

async fn start_node(
    cmd: &str,
    db: &str,
    nats_url: &str,
    extra_args: &[&str],
    extra_toml: &str,
) -> Node {
    let (dir, config) = node_config(db, nats_url, extra_toml);
    let url = cluster().url(db);
    let slot = format!("slot_{db}");
    let publication = format!("pub_{db}");
    let mut args = vec![
        cmd,
        "--config",
        config.to_str().unwrap(),
        "--database-url",
        &url,
        "--slot",
        &slot,
        "--publication",
        &publication,
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra_args);
    let mut proc = spawn(&args);
    let mut err = BufReader::new(proc.stderr.take().expect("stderr")).lines();
    let (port, _) = read_listening(&mut err, T, |_| {}).await;
    let name = format!("{cmd}:{port}");
    tokio::spawn(async move {
        while let Ok(Some(l)) = err.next_line().await {
            if std::env::var_os("WALCAST_TEST_VERBOSE").is_some() {
                eprintln!("[{name}] {l}");
            }
        }
    });
    Node {
        proc,
        port,
        _dir: dir,
    }
}

async fn relay(db: &str, nats_url: &str) -> Node {
    start_node("relay", db, nats_url, &[], "").await
}

async fn gateway(db: &str, nats_url: &str) -> Node {
    start_node("serve", db, nats_url, &["--cluster"], "").await
}

/// A realtime-js client at `url` subscribed on channel `feed` to `bindings`.
async fn client(url: &str, bindings: Value, resume: bool) -> JsClient {
    let mut js = JsClient::spawn().await;
    js.call(
        json!({"cmd": "connect", "url": url, "apikey": "k", "heartbeat_interval_ms": 500}),
        T,
    )
    .await;
    js.call(
        json!({"cmd": "subscribe", "channel": "feed", "postgres_changes": bindings, "resume": resume}),
        T,
    )
    .await;
    assert_eq!(js.status("feed", T).await, "SUBSCRIBED");
    js
}

/// (table, id) of each change the client gets until `done` says enough, and the
/// `system` payloads with a code seen meanwhile.
async fn changes_until(
    js: &mut JsClient,
    mut done: impl FnMut(&[(String, i64)]) -> bool,
) -> (Vec<(String, i64)>, Vec<Value>) {
    let mut got = Vec::new();
    let mut systems = Vec::new();
    while !done(&got) {
        let v = js
            .wait_for("changes", T, |v| {
                is_on(v, "postgres_changes", "feed")
                    || (is_on(v, "system", "feed") && v["payload"].get("code").is_some())
            })
            .await;
        if v["ev"] == "system" {
            systems.push(v["payload"].clone());
            continue;
        }
        let p = &v["payload"];
        let row = if p["eventType"] == "DELETE" {
            &p["old"]
        } else {
            &p["new"]
        };
        got.push((
            p["table"].as_str().unwrap().to_string(),
            row["id"].as_i64().unwrap(),
        ));
    }
    (got, systems)
}

fn ids_of(got: &[(String, i64)], table: &str) -> Vec<i64> {
    got.iter()
        .filter(|(t, _)| t == table)
        .map(|(_, id)| *id)
        .collect()
}

#[tokio::test]
async fn one_relay_two_gateways_every_change_reaches_every_matching_client_in_order() {
    let db = "cl_fanout";
    let c = db_with(
        db,
        "create table a (id int primary key, v text); create table b (id int primary key)",
    )
    .await;
    let nats = nats();
    let relay = relay(db, &nats.url()).await;
    wait_leader(&relay, true).await;
    let g1 = gateway(db, &nats.url()).await;
    let g2 = gateway(db, &nats.url()).await;
    let all = json!([
        {"event": "*", "schema": "public", "table": "a"},
        {"event": "*", "schema": "public", "table": "b"}
    ]);
    let mut on_g1 = client(&g1.ws(), all.clone(), false).await;
    let mut on_g2 = client(&g2.ws(), all, false).await;
    let mut filtered = client(
        &g2.ws(),
        json!([{"event": "INSERT", "schema": "public", "table": "a", "filter": "id=gte.20"}]),
        false,
    )
    .await;
    // 40 transactions over two tables, a multi-row one, an update and a delete.
    for i in 0..40 {
        c.batch_execute(&format!(
            "begin; insert into a values ({i}, 'x'); insert into b values ({i}); commit"
        ))
        .await
        .unwrap();
    }
    c.batch_execute("insert into a values (100, 'y'), (101, 'y'), (102, 'y'); update a set v = 'z' where id = 0; delete from b where id = 1")
        .await
        .unwrap();
    let mut want_a: Vec<i64> = (0..40).collect();
    want_a.extend([100, 101, 102, 0]);
    let mut want_b: Vec<i64> = (0..40).collect();
    want_b.push(1);
    for (name, js) in [("g1", &mut on_g1), ("g2", &mut on_g2)] {
        let n = want_a.len() + want_b.len();
        let (got, systems) = changes_until(js, |g| g.len() >= n).await;
        assert_eq!(ids_of(&got, "a"), want_a, "{name}: table a in commit order");
        assert_eq!(ids_of(&got, "b"), want_b, "{name}: table b in commit order");
        assert!(systems.is_empty(), "{name}: {systems:?}");
    }
    let (got, _) = changes_until(&mut filtered, |g| g.last().is_some_and(|l| l.1 == 102)).await;
    let mut want: Vec<i64> = (20..40).collect();
    want.extend([100, 101, 102]);
    assert_eq!(
        ids_of(&got, "a"),
        want,
        "the filtered client gets its rows only"
    );
    // A table whose shape changes mid-stream: the relay sends the new shape.
    c.batch_execute("alter table a add column w text; insert into a values (200, 'p', 'q')")
        .await
        .unwrap();
    for (name, js) in [("g1", &mut on_g1), ("g2", &mut on_g2)] {
        let v = js
            .wait_for("the row with the new column", T, |v| {
                is_on(v, "postgres_changes", "feed") && v["payload"]["new"]["id"] == 200
            })
            .await;
        assert_eq!(v["payload"]["new"]["w"], "q", "{name}: {v}");
    }
    // A transaction larger than one message holds, the tables interleaved: the
    // relay sends runs of a table's changes as one message each (711 changes,
    // 5 messages), and every change arrives once, in order.
    let published = metric(relay.port, "walcast_relay_published_total")
        .await
        .unwrap();
    c.batch_execute(
        "begin; insert into a select g, 'big' from generate_series(1000, 1699) g; \
         insert into b select g from generate_series(1000, 1009) g; \
         insert into a values (1700, 't'); commit",
    )
    .await
    .unwrap();
    for (name, js) in [("g1", &mut on_g1), ("g2", &mut on_g2)] {
        let (got, systems) = changes_until(js, |g| g.len() >= 711).await;
        assert_eq!(
            ids_of(&got, "a"),
            (1000..=1700).collect::<Vec<i64>>(),
            "{name}: the large transaction's table a, in order"
        );
        assert_eq!(ids_of(&got, "b"), (1000..=1009).collect::<Vec<i64>>());
        assert!(systems.is_empty(), "{name}: {systems:?}");
    }
    let sent = metric(relay.port, "walcast_relay_published_total")
        .await
        .unwrap()
        - published;
    assert_eq!(sent, 5.0, "runs of up to 256 changes per message");
    for js in [on_g1, on_g2, filtered] {
        js.exit().await;
    }
    // The gateways talked to each other all along (presence heartbeats every
    // second): none of that is in the stream, whose every message is the relay's,
    // and the relay's chain of expected ids never broke.
    let stream = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap())
        .get_stream(format!("S_{db}"))
        .await
        .unwrap();
    let mut subjects = stream.info_with_subjects(">").await.unwrap();
    let mut held = Vec::new();
    while let Some((subject, _)) = futures::TryStreamExt::try_next(&mut subjects)
        .await
        .unwrap()
    {
        held.push(subject);
    }
    held.sort();
    let p = format!("wc_{db}");
    assert_eq!(
        held,
        [
            format!("{p}._src"),
            format!("{p}.public.a"),
            format!("{p}.public.b")
        ],
        "only the relay's subjects are stored"
    );
    assert_eq!(
        metric(relay.port, "walcast_relay_publish_errors_total").await,
        Some(0.0),
        "no publish of the relay was refused"
    );
}

/// A TCP proxy in front of a gateway, which the test can point at another one (a
/// load balancer after a node died).
struct Proxy {
    port: u16,
    upstream: Arc<AtomicU16>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = Arc::new(AtomicU16::new(upstream));
        let u = upstream.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let to = u.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(("127.0.0.1", to)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Proxy { port, upstream }
    }

    fn ws(&self) -> String {
        format!("ws://127.0.0.1:{}/realtime/v1", self.port)
    }

    fn point_at(&self, port: u16) {
        self.upstream.store(port, Ordering::SeqCst);
    }
}

/// Inserts one row per transaction into `items` (ids from 1) until `stop`;
/// returns the last id.
fn writer(db: &'static str, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<i64> {
    tokio::spawn(async move {
        let w = cluster().client(db).await;
        let mut id = 1i32;
        while !stop.load(Ordering::SeqCst) {
            w.execute("insert into items (id) values ($1)", &[&id])
                .await
                .unwrap();
            id += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        i64::from(id - 1)
    })
}

fn items_binding() -> Value {
    json!([{"event": "INSERT", "schema": "public", "table": "items"}])
}

fn replay_codes(systems: &[Value]) -> Vec<String> {
    systems
        .iter()
        .filter_map(|s| s["code"].as_str())
        .filter(|c| c.starts_with("REPLAY"))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn clients_of_a_killed_gateway_resume_on_the_other_and_miss_nothing() {
    let db = "cl_gwkill";
    db_with(db, "create table items (id int primary key)").await;
    let nats = nats();
    let relay = relay(db, &nats.url()).await;
    wait_leader(&relay, true).await;
    let mut g1 = gateway(db, &nats.url()).await;
    let g2 = gateway(db, &nats.url()).await;
    let proxy = Proxy::start(g1.port).await;
    let mut js = client(&proxy.ws(), items_binding(), true).await;
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(db, stop.clone());
    // Changes flow to the client through g1 ...
    let (before, _) = changes_until(&mut js, |g| g.len() >= 20).await;
    // ... when g1 dies; the load balancer sends the reconnect to g2.
    g1.proc.signal(9);
    let _ = tokio::time::timeout(T, g1.proc.child.wait()).await;
    proxy.point_at(g2.port);
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::SeqCst);
    let last = w.await.unwrap();
    let (got, systems) = changes_until(&mut js, |g| g.last().is_some_and(|l| l.1 == last)).await;
    let mut ids = ids_of(&before, "items");
    ids.extend(ids_of(&got, "items"));
    let want: Vec<i64> = (1..=last).collect();
    assert_eq!(
        ids, want,
        "every change once, in order, across the gateway's death"
    );
    assert!(
        !replay_codes(&systems).contains(&"REPLAY_GAP".to_string()),
        "{systems:?}"
    );
    // The rejoin on g2 replayed from g2's copy of the stream (its REPLAY_DONE may
    // follow the last change).
    if !replay_codes(&systems).contains(&"REPLAY_DONE".to_string()) {
        let v = js
            .wait_for("REPLAY_DONE", T, |v| {
                is_on(v, "system", "feed") && v["payload"].get("code").is_some()
            })
            .await;
        assert_eq!(v["payload"]["code"], "REPLAY_DONE", "{v}");
    }
    js.exit().await;
}

/// The value of the unlabelled series `name` on a node's `/metrics`.
async fn metric(port: u16, name: &str) -> Option<f64> {
    let (status, body) = crate::support::http_get(port, "/metrics").await;
    if status != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

async fn wait_leader(node: &Node, leads: bool) {
    let want = if leads { 1.0 } else { 0.0 };
    crate::support::wait_for("walcast_relay_leader", T, || async {
        (metric(node.port, "walcast_relay_leader").await == Some(want)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_standby_relay_takes_over_from_a_killed_leader_and_nothing_is_lost_or_doubled() {
    let db = "cl_standby";
    db_with(db, "create table items (id int primary key)").await;
    let nats = nats();
    let mut leader = relay(db, &nats.url()).await;
    wait_leader(&leader, true).await;
    let standby = relay(db, &nats.url()).await;
    let g = gateway(db, &nats.url()).await;
    let mut js = client(&g.ws(), items_binding(), true).await;
    // The standby waits while the leader holds the slot.
    wait_leader(&standby, false).await;
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(db, stop.clone());
    let (before, _) = changes_until(&mut js, |g| g.len() >= 20).await;
    leader.proc.signal(9);
    let _ = tokio::time::timeout(T, leader.proc.child.wait()).await;
    let killed_at = std::time::Instant::now();
    wait_leader(&standby, true).await;
    let took = killed_at.elapsed();
    assert!(took < Duration::from_secs(10), "took over after {took:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let last = w.await.unwrap();
    let (got, systems) = changes_until(&mut js, |g| g.last().is_some_and(|l| l.1 == last)).await;
    let mut ids = ids_of(&before, "items");
    ids.extend(ids_of(&got, "items"));
    let want: Vec<i64> = (1..=last).collect();
    assert_eq!(
        ids, want,
        "every committed change once, in order, across the takeover"
    );
    assert!(replay_codes(&systems).is_empty(), "{systems:?}");
    // Fenced: a change after the takeover arrives, and nothing (no late duplicate)
    // before it.
    cluster()
        .client(db)
        .await
        .execute("insert into items (id) values (100000)", &[])
        .await
        .unwrap();
    let (after, _) = changes_until(&mut js, |g| !g.is_empty()).await;
    assert_eq!(ids_of(&after, "items"), [100000]);
    js.exit().await;
}

#[tokio::test]
async fn a_nats_restart_mid_stream_loses_nothing_and_gateways_say_so() {
    let db = "cl_natsrestart";
    db_with(db, "create table items (id int primary key)").await;
    let nats = nats();
    let relay = relay(db, &nats.url()).await;
    wait_leader(&relay, true).await;
    let g1 = gateway(db, &nats.url()).await;
    let g2 = gateway(db, &nats.url()).await;
    let mut c1 = client(&g1.ws(), items_binding(), true).await;
    let mut c2 = client(&g2.ws(), items_binding(), true).await;
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(db, stop.clone());
    let (b1, _) = changes_until(&mut c1, |g| g.len() >= 20).await;
    // NATS goes away for two seconds while the database keeps committing.
    nats.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let last = w.await.unwrap();
    let (a1, s1) = changes_until(&mut c1, |g| g.last().is_some_and(|l| l.1 == last)).await;
    let (a2, s2) = changes_until(&mut c2, |g| g.last().is_some_and(|l| l.1 == last)).await;
    let want: Vec<i64> = (1..=last).collect();
    let mut ids = ids_of(&b1, "items");
    ids.extend(ids_of(&a1, "items"));
    assert_eq!(ids, want, "g1's client: every change once, in order");
    assert_eq!(
        ids_of(&a2, "items"),
        want,
        "g2's client: every change once, in order"
    );
    // The gateways told their channels that the stream was down, then back (the
    // notice and the changes travel apart: it may follow the last change).
    for (name, s, js) in [("g1", s1, &mut c1), ("g2", s2, &mut c2)] {
        let mut s = s;
        // Wait while the last notice is not OK (a gateway that ends down fails).
        if s.last().map(|v| &v["code"]) != Some(&json!("REPLICATION_OK")) {
            let v = js
                .wait_for("REPLICATION_OK", T, |v| {
                    is_on(v, "system", "feed") && v["payload"].get("code").is_some()
                })
                .await;
            s.push(v["payload"].clone());
        }
        let codes: Vec<&str> = s.iter().filter_map(|v| v["code"].as_str()).collect();
        let down = codes.iter().position(|c| *c == "REPLICATION_DOWN");
        let ok = codes.iter().rposition(|c| *c == "REPLICATION_OK");
        assert!(
            down.is_some() && ok > down && ok == Some(codes.len() - 1),
            "{name}: REPLICATION_DOWN then REPLICATION_OK: {codes:?}"
        );
    }
    c1.exit().await;
    c2.exit().await;
}

/// A realtime-js client at `url` joined to broadcast channel `room`.
async fn room_client(url: &str, vsn: &str) -> JsClient {
    let mut js = JsClient::spawn().await;
    js.call(
        json!({"cmd": "connect", "url": url, "apikey": "k", "vsn": vsn}),
        T,
    )
    .await;
    js.call(
        json!({"cmd": "subscribe", "channel": "room", "config": {"broadcast": {"ack": true}},
               "broadcast": [{"event": "*"}]}),
        T,
    )
    .await;
    assert_eq!(js.status("room", T).await, "SUBSCRIBED");
    js
}

#[tokio::test]
async fn client_broadcasts_cross_gateways_over_nats() {
    let db = "cl_bcast";
    db_with(db, "create table items (id int primary key)").await;
    let nats = nats();
    let relay = relay(db, &nats.url()).await;
    wait_leader(&relay, true).await;
    let g1 = gateway(db, &nats.url()).await;
    let g2 = gateway(db, &nats.url()).await;
    let mut a = room_client(&g1.ws(), "2.0.0").await;
    let mut b = room_client(&g2.ws(), "1.0.0").await;
    let mut c = room_client(&g2.ws(), "2.0.0").await;
    let r = a
        .call(
            json!({"cmd": "send", "channel": "room", "event": "hello", "payload": {"n": 1}}),
            T,
        )
        .await;
    assert_eq!(r, "ok");
    for (name, js) in [("b", &mut b), ("c", &mut c)] {
        let v = js
            .wait_for("the broadcast from the other gateway", T, |v| {
                v["ev"] == "broadcast"
            })
            .await;
        assert_eq!(v["payload"]["event"], "hello", "{name}: {v}");
        assert_eq!(v["payload"]["payload"]["n"], 1, "{name}: {v}");
    }
    // And back: b (on g2) → a (on g1), and c, b's neighbour on g2, once.
    let r = b
        .call(
            json!({"cmd": "send", "channel": "room", "event": "back", "payload": {"n": 2}}),
            T,
        )
        .await;
    assert_eq!(r, "ok");
    let v = a
        .wait_for("the broadcast back", T, |v| v["ev"] == "broadcast")
        .await;
    assert_eq!(v["payload"]["event"], "back", "{v}");
    let v = c
        .wait_for("b's broadcast", T, |v| v["ev"] == "broadcast")
        .await;
    assert_eq!(v["payload"]["event"], "back", "{v}");
    // Fenced: a third message arrives at c, and no copy of "back" before it.
    let r = a
        .call(
            json!({"cmd": "send", "channel": "room", "event": "fence", "payload": {}}),
            T,
        )
        .await;
    assert_eq!(r, "ok");
    let v = c.wait_for("the fence", T, |v| v["ev"] == "broadcast").await;
    assert_eq!(
        v["payload"]["event"], "fence",
        "no duplicate before it: {v}"
    );
    for js in [a, b, c] {
        js.exit().await;
    }
}

#[tokio::test]
async fn the_relay_says_what_is_wrong_with_nats_or_the_stream() {
    let db = "cl_errors";
    db_with(db, "create table items (id int primary key)").await;
    let url = cluster().url(db);
    let (slot, publication) = (format!("slot_{db}"), format!("pub_{db}"));
    let base = [
        "relay",
        "--database-url",
        &url,
        "--slot",
        &slot,
        "--publication",
        &publication,
        "--listen",
        "127.0.0.1:0",
    ];
    // Nobody listens there.
    let closed = format!(
        "nats://127.0.0.1:{}",
        walcast::testing::free_port().unwrap()
    );
    let mut args = base.to_vec();
    args.extend(["--nats-url", &closed]);
    let p = spawn(&args);
    let (ok, err) = p.wait(T).await;
    assert!(!ok);
    assert!(err.contains("cannot reach NATS at"), "{err}");
    // A stream of that name that carries other subjects.
    let nats = nats();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "S_cl_errors".into(),
        subjects: vec!["elsewhere.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let (_dir, config) = node_config(db, &nats.url(), "");
    let mut args = base.to_vec();
    args.extend(["--config", config.to_str().unwrap()]);
    let (ok, err) = spawn(&args).wait(T).await;
    assert!(!ok);
    assert!(
        err.contains("S_cl_errors")
            && err.contains("elsewhere.>")
            && err.contains("subject_prefix"),
        "names the stream, its subjects and what to change: {err}"
    );
    // One whose subjects would also store what gateways say to each other.
    js.delete_stream("S_cl_errors").await.unwrap();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "S_cl_errors".into(),
        subjects: vec!["wc_cl_errors.>".into(), "_walcast_peer.*.*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let (ok, err) = spawn(&args).wait(T).await;
    assert!(!ok);
    assert!(
        err.contains("_walcast_peer.*.*") && err.contains("never be stored"),
        "names the subject that would store peer messages: {err}"
    );
}
