//! Presence across the gateways of a cluster (README, "Running several nodes"),
//! with real processes: a throwaway `nats-server -js`, `walcast relay`, two
//! gateways (`walcast serve --cluster`) and the real `@supabase/realtime-js`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::js::JsClient;
use crate::support::walcast::{read_listening, spawn, Proc};
use crate::support::{cluster, create_slot, scratch_dir};

const T: Duration = Duration::from_secs(30);

/// A running walcast process of a cluster and its port.
struct Node {
    proc: Proc,
    port: u16,
    _dir: std::path::PathBuf,
}

impl Node {
    fn ws(&self) -> String {
        format!("ws://127.0.0.1:{}/realtime/v1", self.port)
    }
}

/// Database `db` with a table, a publication for all tables, a slot, and a
/// NATS server.
async fn setup(db: &str) -> walcast::testing::Nats {
    let c = cluster().new_db(db).await;
    c.batch_execute(&format!(
        "create table items (id int primary key); create publication pub_{db} for all tables"
    ))
    .await
    .unwrap();
    create_slot(&c, &format!("slot_{db}")).await;
    walcast::testing::Nats::start().unwrap_or_else(|e| panic!("cannot start nats-server: {e}"))
}

async fn start_node(cmd: &str, db: &str, nats_url: &str, extra: &[&str]) -> Node {
    let dir = scratch_dir();
    let config = dir.join("walcast.toml");
    std::fs::write(
        &config,
        format!(
            "[cluster]\nnats_url = {nats_url:?}\nstream = \"S_{db}\"\nsubject_prefix = \"wc_{db}\"\n\
             [log]\ndir = {:?}\n",
            dir.join("log").display().to_string()
        ),
    )
    .unwrap();
    let url = cluster().url(db);
    let (slot, publication) = (format!("slot_{db}"), format!("pub_{db}"));
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
    args.extend_from_slice(extra);
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

async fn gateway(db: &str, nats_url: &str) -> Node {
    start_node("serve", db, nats_url, &["--cluster"]).await
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

async fn wait_metric(node: &Node, name: &str, want: f64) {
    crate::support::wait_for(name, T, || async {
        (metric(node.port, name).await == Some(want)).then_some(())
    })
    .await;
}

/// A relay that leads, on `db`'s cluster.
async fn relay(db: &str, nats_url: &str) -> Node {
    let r = start_node("relay", db, nats_url, &[]).await;
    wait_metric(&r, "walcast_relay_leader", 1.0).await;
    r
}

/// Connects client `who` of the driver to `url` and joins channel `lobby` with
/// presence key `key`; returns the first presence `sync` (after `presence_state`).
async fn join(js: &mut JsClient, who: &str, url: &str, key: &str) -> Value {
    js.call(
        json!({"cmd": "connect", "client": who, "url": url, "apikey": "k"}),
        T,
    )
    .await;
    js.call(
        json!({"cmd": "subscribe", "client": who, "channel": "lobby",
               "config": {"presence": {"key": key}}, "presence": true}),
        T,
    )
    .await;
    let s = js
        .wait_for(&format!("{who} subscribed"), T, |v| {
            v["client"] == who && v["ev"] == "status"
        })
        .await;
    assert_eq!(s["status"], "SUBSCRIBED", "{s}");
    js.wait_for(&format!("{who}'s first presence sync"), T, |v| {
        v["client"] == who && v["ev"] == "presence" && v["event"] == "sync"
    })
    .await["state"]
        .clone()
}

async fn track(js: &mut JsClient, who: &str, payload: Value) {
    let r = js
        .call(
            json!({"cmd": "track", "client": who, "channel": "lobby", "payload": payload}),
            T,
        )
        .await;
    assert_eq!(r, "ok");
}

/// Waits for `who`'s presence `event` (join/leave) of `key` with a meta of
/// `status` (joined or left); returns it.
async fn presence(js: &mut JsClient, who: &str, event: &str, key: &str, status: &str) -> Value {
    let metas = if event == "join" { "new" } else { "left" };
    js.wait_for(&format!("{who} sees {key} {event} ({status})"), T, |v| {
        v["client"] == who
            && v["ev"] == "presence"
            && v["event"] == event
            && v["key"] == key
            && v[metas][0]["status"] == status
    })
    .await
}

/// The keys with metas in a realtime-js `presenceState()` (inside a leave
/// callback, the key that left is still there, empty).
fn shown(state: &Value) -> Vec<&str> {
    state
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, metas)| metas.as_array().is_some_and(|m| !m.is_empty()))
        .map(|(k, _)| k.as_str())
        .collect()
}

#[tokio::test]
async fn a_track_on_one_gateway_is_seen_on_the_other_in_state_and_diffs() {
    let db = "clp_cross";
    let nats = setup(db).await;
    let _relay = relay(db, &nats.url()).await;
    let g1 = gateway(db, &nats.url()).await;
    let mut js = JsClient::spawn().await;
    // alice tracks on g1 before g2 even runs ...
    join(&mut js, "a", &g1.ws(), "alice").await;
    track(&mut js, "a", json!({"status": "online"})).await;
    // ... g2 learns it when it starts (it asks the others for their presences),
    let g2 = gateway(db, &nats.url()).await;
    wait_metric(&g2, "walcast_cluster_remote_presences", 1.0).await;
    // and a client joining on g2 has alice in its presence_state.
    let state = join(&mut js, "b", &g2.ws(), "bob").await;
    assert_eq!(state["alice"][0]["status"], "online", "{state}");
    assert_eq!(state["alice"].as_array().unwrap().len(), 1, "{state}");
    // The other way: bob tracks on g2, alice on g1 gets the join diff.
    track(&mut js, "b", json!({"status": "typing"})).await;
    let v = presence(&mut js, "a", "join", "bob", "typing").await;
    assert_eq!(v["new"][0]["status"], "typing", "{v}");
    assert_eq!(v["state"]["alice"][0]["status"], "online", "{v}");
    // Untrack on g1: a leave on g2; track again: a join (one meta, not two).
    assert_eq!(
        js.call(
            json!({"cmd": "untrack", "client": "a", "channel": "lobby"}),
            T
        )
        .await,
        "ok"
    );
    let v = presence(&mut js, "b", "leave", "alice", "online").await;
    assert_eq!(shown(&v["state"]), vec!["bob"], "{v}");
    track(&mut js, "a", json!({"status": "back"})).await;
    let v = presence(&mut js, "b", "join", "alice", "back").await;
    assert_eq!(v["current"], json!([]), "{v}");
    assert_eq!(v["new"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["new"][0]["status"], "back", "{v}");
    // A closed socket on g1 is a leave on g2.
    join(&mut js, "c", &g1.ws(), "carol").await;
    track(&mut js, "c", json!({"status": "here"})).await;
    presence(&mut js, "b", "join", "carol", "here").await;
    js.call(json!({"cmd": "disconnect", "client": "c"}), T)
        .await;
    let v = presence(&mut js, "b", "leave", "carol", "here").await;
    assert_eq!(shown(&v["state"]), vec!["alice", "bob"], "{v}");
    // A re-track (new payload) is, on g2 as on g1, a join of the new meta
    // (`phx_ref_prev` naming the old one) and a leave of the old one. (Not
    // checked: realtime-js's presenceState() afterwards. Its join callback
    // strips `phx_ref` from the metas a key already had, so it keeps a stale
    // copy of the old meta — on a single node just the same.)
    track(&mut js, "a", json!({"status": "away"})).await;
    presence(&mut js, "b", "join", "alice", "away").await;
    presence(&mut js, "b", "leave", "alice", "back").await;
    // Leaving the channel on g1 is a leave on g2.
    js.call(
        json!({"cmd": "unsubscribe", "client": "a", "channel": "lobby"}),
        T,
    )
    .await;
    presence(&mut js, "b", "leave", "alice", "away").await;
    // g1's clients are all gone from g2.
    wait_metric(&g2, "walcast_cluster_remote_presences", 0.0).await;
    js.exit().await;
}

#[tokio::test]
async fn a_killed_gateways_presences_leave_the_others_within_the_timeout() {
    let db = "clp_kill";
    let nats = setup(db).await;
    let _relay = relay(db, &nats.url()).await;
    let mut g1 = gateway(db, &nats.url()).await;
    let g2 = gateway(db, &nats.url()).await;
    let mut js = JsClient::spawn().await;
    join(&mut js, "b", &g2.ws(), "bob").await;
    track(&mut js, "b", json!({"status": "staying"})).await;
    join(&mut js, "a", &g1.ws(), "alice").await;
    track(&mut js, "a", json!({"status": "doomed"})).await;
    presence(&mut js, "b", "join", "alice", "doomed").await;
    // g1 dies without a word.
    g1.proc.signal(9);
    let _ = tokio::time::timeout(T, g1.proc.child.wait()).await;
    let killed = Instant::now();
    let v = presence(&mut js, "b", "leave", "alice", "doomed").await;
    let took = killed.elapsed();
    // Timeout 4 s, checked every second (heartbeat).
    assert!(took < Duration::from_secs(7), "the leave took {took:?}");
    assert_eq!(v["state"]["bob"][0]["status"], "staying", "{v}");
    assert_eq!(shown(&v["state"]), vec!["bob"], "{v}");
    wait_metric(&g2, "walcast_cluster_remote_presences", 0.0).await;
    wait_metric(&g2, "walcast_cluster_presence_nodes", 0.0).await;
    let (_, body) = crate::support::http_get(g2.port, "/metrics").await;
    for family in [
        "walcast_cluster_remote_presences",
        "walcast_cluster_presence_nodes",
        "walcast_cluster_presence_dropped_total",
        "walcast_cluster_presence_refused_total",
        "walcast_cluster_presence_resyncs_total",
    ] {
        assert!(body.contains(&format!("# HELP {family} ")), "{family}");
    }
    js.exit().await;
}

#[tokio::test]
async fn presence_changes_made_while_nats_is_down_reach_the_other_gateway_once_it_is_back() {
    let db = "clp_natsdown";
    let nats = setup(db).await;
    let _relay = relay(db, &nats.url()).await;
    let g1 = gateway(db, &nats.url()).await;
    let g2 = gateway(db, &nats.url()).await;
    let mut js = JsClient::spawn().await;
    join(&mut js, "b", &g2.ws(), "bob").await;
    track(&mut js, "b", json!({"status": "steady"})).await;
    join(&mut js, "a", &g1.ws(), "alice").await;
    track(&mut js, "a", json!({"status": "before"})).await;
    presence(&mut js, "b", "join", "alice", "before").await;
    join(&mut js, "d", &g1.ws(), "dave").await;
    // g2 follows g1 (one node) through the outage: watched until the end.
    wait_metric(&g2, "walcast_cluster_presence_nodes", 1.0).await;
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (watching, port) = (watching.clone(), g2.port);
        tokio::spawn(async move {
            let mut least = f64::MAX;
            while watching.load(Ordering::Relaxed) {
                if let Some(v) = metric(port, "walcast_cluster_presence_nodes").await {
                    least = least.min(v);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            least
        })
    };
    // NATS goes away; both gateways notice.
    let down = Instant::now();
    nats.stop();
    wait_metric(&g1, "walcast_cluster_nats_connected", 0.0).await;
    wait_metric(&g2, "walcast_cluster_nats_connected", 0.0).await;
    // Meanwhile on g1: alice leaves, dave arrives.
    assert_eq!(
        js.call(
            json!({"cmd": "untrack", "client": "a", "channel": "lobby"}),
            T
        )
        .await,
        "ok"
    );
    track(&mut js, "d", json!({"status": "during"})).await;
    nats.restart().unwrap();
    // Once NATS is back, g2's client sees both (by the diffs, if NATS got
    // them, else by g1's summary).
    presence(&mut js, "b", "leave", "alice", "before").await;
    presence(&mut js, "b", "join", "dave", "during").await;
    // Not by g2 taking g1 for gone: that only happens TIMEOUT after g1's
    // last heartbeat, and the node count would show it.
    let took = down.elapsed();
    watching.store(false, Ordering::Relaxed);
    assert_eq!(watcher.await.unwrap(), 1.0, "g2 lost track of g1");
    assert!(took < Duration::from_secs(3), "the changes took {took:?}");
    let state = js
        .call(
            json!({"cmd": "presence_state", "client": "b", "channel": "lobby"}),
            T,
        )
        .await;
    assert_eq!(shown(&state), vec!["bob", "dave"], "{state}");
    wait_metric(&g2, "walcast_cluster_remote_presences", 1.0).await;
    js.exit().await;
}
