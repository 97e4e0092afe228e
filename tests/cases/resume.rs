//! Resume on join with the real `@supabase/realtime-js`: a client whose binding
//! carries `replay: { since }` — kept current from its callback, resent by
//! realtime-js on every rejoin — gets every change it missed, once, in commit
//! order, then live ones: after its network is cut, after it drops its socket,
//! and across walcast restarts (SIGTERM and SIGKILL). A `since` the log cannot
//! serve is answered `REPLAY_GAP`, with nothing replayed.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::support::cluster;
use crate::support::js::{is_on, JsClient};
use crate::support::walcast::{serve, Server};

const T: Duration = Duration::from_secs(30);

/// A TCP proxy in front of walcast: the test can cut every connection through it
/// (both ends see the TCP connection end, as when a network drops), refuse new
/// ones for a while, and point it at a restarted walcast.
struct Proxy {
    port: u16,
    upstream: Arc<AtomicU16>,
    up: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = Arc::new(AtomicU16::new(upstream));
        let up = Arc::new(AtomicBool::new(true));
        let (cut, cut_rx) = watch::channel(0u64);
        let (u, a) = (upstream.clone(), up.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !a.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close
                }
                let mut cut = cut_rx.clone();
                cut.mark_unchanged();
                let to = u.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", to)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            upstream,
            up,
            cut,
        }
    }

    /// Ends every connection through the proxy now.
    fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    fn point_at(&self, port: u16) {
        self.upstream.store(port, Ordering::SeqCst);
    }
}

/// A realtime-js client through `proxy`, subscribed to `items` on channel
/// `feed` with the resume idiom (`replay: { since: null }` at first).
async fn resuming_client(proxy: &Proxy, binding: Value) -> JsClient {
    let mut js = JsClient::spawn().await;
    js.call(
        json!({
            "cmd": "connect",
            "url": format!("ws://127.0.0.1:{}/realtime/v1", proxy.port),
            "apikey": "test-key",
            "heartbeat_interval_ms": 500,
        }),
        T,
    )
    .await;
    js.call(
        json!({"cmd": "subscribe", "channel": "feed", "postgres_changes": [binding], "resume": true}),
        T,
    )
    .await;
    assert_eq!(js.status("feed", T).await, "SUBSCRIBED");
    js
}

fn items_binding() -> Value {
    json!({"event": "INSERT", "schema": "public", "table": "items"})
}

async fn insert(c: &tokio_postgres::Client, ids: std::ops::Range<i32>, per_txn: usize) {
    let ids: Vec<i32> = ids.collect();
    for chunk in ids.chunks(per_txn) {
        let values: Vec<String> = chunk.iter().map(|i| format!("({i})")).collect();
        c.batch_execute(&format!(
            "insert into items (id) values {}",
            values.join(",")
        ))
        .await
        .unwrap();
    }
}

/// Every INSERT id the client receives up to and including `last`, in arrival
/// order, and the `system` messages with a `code` seen meanwhile.
async fn ids_until(js: &mut JsClient, last: i64) -> (Vec<i64>, Vec<Value>) {
    let mut ids = Vec::new();
    let mut systems = Vec::new();
    loop {
        let v = js
            .wait_for(&format!("changes up to id {last}"), T, |v| {
                is_on(v, "postgres_changes", "feed")
                    || (is_on(v, "system", "feed") && v["payload"].get("code").is_some())
            })
            .await;
        if v["ev"] == "system" {
            systems.push(v["payload"].clone());
            continue;
        }
        let id = v["payload"]["new"]["id"].as_i64().unwrap();
        ids.push(id);
        if id == last {
            return (ids, systems);
        }
    }
}

fn codes(systems: &[Value]) -> Vec<&str> {
    systems
        .iter()
        .filter_map(|s| s["code"].as_str())
        .filter(|c| c.starts_with("REPLAY"))
        .collect()
}

/// Database `db` with `ddl` run, a publication `pub_<db>` for all its tables and
/// a slot `slot_<db>` made before anything is written.
async fn db_with(db: &str, ddl: &str) -> tokio_postgres::Client {
    let c = cluster().new_db(db).await;
    c.batch_execute(ddl).await.unwrap();
    c.batch_execute(&format!("create publication pub_{db} for all tables"))
        .await
        .unwrap();
    crate::support::create_slot(&c, &format!("slot_{db}")).await;
    c
}

async fn items_db(db: &str) -> tokio_postgres::Client {
    db_with(db, "create table items (id int primary key, owner text)").await
}

async fn start(db: &str, args: &[&str]) -> Server {
    serve(
        &cluster().url(db),
        &format!("slot_{db}"),
        &format!("pub_{db}"),
        args,
    )
    .await
}

#[tokio::test]
async fn a_client_cut_off_gets_what_it_missed_once_in_order_then_live_changes() {
    let db = "resume_cut";
    let c = items_db(db).await;
    let server = start(db, &[]).await;
    let proxy = Proxy::start(server.port).await;
    let mut js = resuming_client(&proxy, items_binding()).await;
    insert(&c, 0..1, 1).await;
    let (first, _) = ids_until(&mut js, 0).await;
    assert_eq!(first, [0]);

    let mut next = 1;
    // First the network (walcast sees the TCP connection end), then the client
    // drops its own socket; each time 250 rows in 50 transactions are written
    // while it cannot reconnect.
    for round in 0..2 {
        proxy.set_up(false);
        if round == 0 {
            proxy.cut();
        } else {
            js.call(json!({"cmd": "drop"}), T).await;
        }
        js.wait_for("the socket to close", T, |v| {
            v["ev"] == "socket" && v["state"] == "close"
        })
        .await;
        insert(&c, next..next + 250, 5).await;
        next += 250;
        proxy.set_up(true);
        let (ids, systems) = ids_until(&mut js, i64::from(next - 1)).await;
        let want: Vec<i64> = (i64::from(next - 250)..i64::from(next)).collect();
        assert_eq!(
            ids, want,
            "round {round}: every missed change once, in order"
        );
        assert!(codes(&systems).is_empty(), "{systems:?}");
        // After the last replayed change.
        let done = js
            .wait_for("REPLAY_DONE", T, |v| {
                is_on(v, "system", "feed") && v["payload"].get("code").is_some()
            })
            .await["payload"]
            .clone();
        assert_eq!(done["code"], "REPLAY_DONE", "{done}");
        assert_eq!(done["status"], "ok");
        assert_eq!(done["replayed"], 250, "{done}");
        assert_eq!(done["transactions"], 50, "{done}");
    }
    // Live again: the next change arrives once, and nothing else came before it.
    insert(&c, 100_000..100_001, 1).await;
    let (ids, systems) = ids_until(&mut js, 100_000).await;
    assert_eq!(ids, [100_000]);
    assert!(codes(&systems).is_empty(), "{systems:?}");
    js.exit().await;
}

#[tokio::test]
async fn a_since_the_log_cannot_serve_is_a_gap_and_nothing_is_replayed() {
    let db = "resume_gap";
    let c = items_db(db).await;
    let server = start(db, &[]).await;
    let proxy = Proxy::start(server.port).await;
    // Rows in the log that a replay from `since` would send, routed (so logged)
    // before the resuming clients join.
    let mut first = resuming_client(&proxy, items_binding()).await;
    insert(&c, 0..3, 1).await;
    ids_until(&mut first, 2).await;
    first.exit().await;
    for since in ["2000-01-01T00:00:00.000000Z", "0/0"] {
        let mut binding = items_binding();
        binding["replay"] = json!({ "since": since });
        let mut js = resuming_client(&proxy, binding).await;
        let gap = js
            .wait_for("REPLAY_GAP", T, |v| {
                is_on(v, "system", "feed") && v["payload"]["code"] == "REPLAY_GAP"
            })
            .await;
        assert_eq!(gap["payload"]["status"], "error", "{gap}");
        // Live changes go on; nothing was replayed before them.
        let id = if since == "0/0" { 11 } else { 10 };
        c.execute("insert into items (id) values ($1)", &[&id])
            .await
            .unwrap();
        let (ids, _) = ids_until(&mut js, i64::from(id)).await;
        assert_eq!(ids, [i64::from(id)], "since {since}");
        js.exit().await;
    }
    // A since that is not a position is a join error naming it.
    let mut js = JsClient::spawn().await;
    js.call(
        json!({"cmd": "connect", "url": format!("ws://127.0.0.1:{}/realtime/v1", proxy.port), "apikey": "k"}),
        T,
    )
    .await;
    let mut binding = items_binding();
    binding["replay"] = json!({ "since": "yesterday" });
    js.call(
        json!({"cmd": "subscribe", "channel": "feed", "postgres_changes": [binding]}),
        T,
    )
    .await;
    let st = js
        .wait_for("the join error", T, |v| is_on(v, "status", "feed"))
        .await;
    assert_eq!(st["status"], "CHANNEL_ERROR", "{st}");
    assert!(
        st.to_string().contains("replay.since"),
        "the error names the field: {st}"
    );
    js.exit().await;
}

#[tokio::test]
async fn a_client_resumes_across_five_walcast_restarts_under_load() {
    let db = "resume_restarts";
    let c = items_db(db).await;
    let (_dir, _log, config) = crate::support::log_dir_config();
    let args = ["--config", config.to_str().unwrap()];
    let mut server = start(db, &args).await;
    let proxy = Proxy::start(server.port).await;
    let mut js = resuming_client(&proxy, items_binding()).await;

    // A steady writer: one row per transaction.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let w = cluster().client(db).await;
            let mut id = 1;
            while !stop.load(Ordering::SeqCst) {
                w.execute("insert into items (id) values ($1)", &[&id])
                    .await
                    .unwrap();
                id += 1;
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
            id - 1
        })
    };
    let mut ids = Vec::new();
    let mut systems = Vec::new();
    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sig = if round % 2 == 0 { 15 } else { 9 };
        server.proc.signal(sig);
        let _ = tokio::time::timeout(T, server.proc.child.wait()).await;
        server = start(db, &args).await;
        proxy.point_at(server.port);
        // The client reconnects and rejoins with its `since` (realtime-js's own
        // backoff); the writer goes on meanwhile.
        loop {
            let v = js
                .wait_for(
                    &format!("the rejoin's replay after restart {round}"),
                    T,
                    |v| {
                        is_on(v, "postgres_changes", "feed")
                            || (is_on(v, "system", "feed") && v["payload"].get("code").is_some())
                    },
                )
                .await;
            if v["ev"] == "system" {
                systems.push(v["payload"].clone());
                if v["payload"]["code"] == "REPLAY_DONE" {
                    break;
                }
            } else {
                ids.push(v["payload"]["new"]["id"].as_i64().unwrap());
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let last = writer.await.unwrap();
    insert(&c, 1_000_000..1_000_001, 1).await;
    let (rest, more) = ids_until(&mut js, 1_000_000).await;
    ids.extend(rest);
    systems.extend(more);

    let mut seen = HashSet::new();
    let mut firsts = Vec::new();
    for &id in &ids {
        if seen.insert(id) {
            firsts.push(id);
        }
    }
    let missing: Vec<i64> = (1..=i64::from(last))
        .filter(|i| !seen.contains(i))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {last} rows never arrived: {missing:?}",
        missing.len()
    );
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "first arrivals in commit order"
    );
    let done = codes(&systems)
        .iter()
        .filter(|c| **c == "REPLAY_DONE")
        .count();
    assert!(done >= 5, "a replay per rejoin: {systems:?}");
    assert!(!codes(&systems).contains(&"REPLAY_GAP"), "{systems:?}");
    eprintln!(
        "resume across restarts: {last} rows, {} deliveries ({} duplicates), {done} replays",
        ids.len() - 1,
        ids.len() - 1 - (seen.len() - 1)
    );
    js.exit().await;
}

const SECRET: &str = "walcast-resume-test-secret-with-enough-bytes";

fn token(role: &str, sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"role": role, "sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Percent-encodes a query value.
fn q(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every page of `GET /api/changes` from `since`, `limit` at a time: the
/// `(type, id)` of each change, and how many pages it took.
async fn pages(port: u16, query: &str, since: &str, limit: usize) -> (Vec<(String, i64)>, usize) {
    let mut out = Vec::new();
    let mut at = format!("since={}", q(since));
    let mut n = 0;
    loop {
        let (status, body) =
            crate::support::http_get(port, &format!("/api/changes?{query}&limit={limit}&{at}"))
                .await;
        assert_eq!(status, 200, "{body}");
        let page: Value = serde_json::from_str(&body).unwrap();
        n += 1;
        for c in page["changes"].as_array().unwrap() {
            let rec = if c["type"] == "DELETE" {
                &c["old_record"]
            } else {
                &c["record"]
            };
            assert!(rec.get("note").is_none(), "a hidden column: {c}");
            out.push((
                c["type"].as_str().unwrap().to_string(),
                rec["id"].as_i64().unwrap(),
            ));
        }
        if page["more"] != true {
            return (out, n);
        }
        at = format!("cursor={}", q(page["next_cursor"].as_str().unwrap()));
    }
}

#[tokio::test]
async fn a_customer_resumes_only_their_rows_and_api_changes_pages_the_same() {
    let db = "resume_rules";
    let c = db_with(
        db,
        "create table invoices (id int primary key, customer text, amount int, note text);
         alter table invoices replica identity full;",
    )
    .await;
    let config = crate::support::config_file(
        db,
        &format!(
            "[auth]\nmode = \"jwt\"\njwt_secret = \"{SECRET}\"\n\n\
             [[auth.tables]]\nname = \"public.invoices\"\nroles = [\"customer\"]\n\
             row_filter = \"customer=eq.{{claims.sub}}\"\ncolumns = [\"id\", \"customer\", \"amount\"]\n"
        ),
    );
    let server = start(db, &["--config", config.to_str().unwrap()]).await;
    let proxy = Proxy::start(server.port).await;
    let alice = token("customer", "alice");
    let mut js = JsClient::spawn().await;
    js.call(
        json!({"cmd": "connect", "url": format!("ws://127.0.0.1:{}/realtime/v1", proxy.port),
               "apikey": alice, "heartbeat_interval_ms": 500}),
        T,
    )
    .await;
    let binding = json!({"event": "*", "schema": "public", "table": "invoices"});
    js.call(
        json!({"cmd": "subscribe", "channel": "feed", "postgres_changes": [binding], "resume": true}),
        T,
    )
    .await;
    assert_eq!(js.status("feed", T).await, "SUBSCRIBED");
    c.batch_execute("insert into invoices values (0, 'alice', 1, 'secret')")
        .await
        .unwrap();
    let first = js
        .wait_for("alice's first invoice", T, |v| {
            is_on(v, "postgres_changes", "feed")
        })
        .await;
    let since = first["payload"]["commit_timestamp"]
        .as_str()
        .unwrap()
        .to_string();

    // Cut off; meanwhile invoices of both customers, updates and a delete.
    proxy.set_up(false);
    proxy.cut();
    js.wait_for("the socket to close", T, |v| {
        v["ev"] == "socket" && v["state"] == "close"
    })
    .await;
    for t in 0..20 {
        let rows: Vec<String> = (1..=3)
            .map(|k| {
                let id = t * 3 + k;
                let who = if id % 2 == 0 { "alice" } else { "bob" };
                format!("({id}, '{who}', {id}, 'secret')")
            })
            .collect();
        c.batch_execute(&format!("insert into invoices values {}", rows.join(",")))
            .await
            .unwrap();
    }
    c.batch_execute(
        "update invoices set amount = amount + 100 where id in (2, 3);
         delete from invoices where id in (4, 5);",
    )
    .await
    .unwrap();
    proxy.set_up(true);
    let mut replayed = Vec::new();
    loop {
        let v = js
            .wait_for("the replay", T, |v| {
                is_on(v, "postgres_changes", "feed")
                    || (is_on(v, "system", "feed") && v["payload"].get("code").is_some())
            })
            .await;
        if v["ev"] == "system" {
            assert_eq!(v["payload"]["code"], "REPLAY_DONE", "{v}");
            assert_eq!(v["payload"]["replayed"], replayed.len(), "{v}");
            break;
        }
        let p = &v["payload"];
        let rec = if p["eventType"] == "DELETE" {
            &p["old"]
        } else {
            &p["new"]
        };
        assert_eq!(rec["customer"], "alice", "only alice's rows: {p}");
        assert!(rec.get("note").is_none(), "a hidden column: {p}");
        replayed.push((
            p["eventType"].as_str().unwrap().to_string(),
            rec["id"].as_i64().unwrap(),
        ));
    }
    let mut want: Vec<(String, i64)> = (1..=60)
        .filter(|i| i % 2 == 0)
        .map(|i| ("INSERT".to_string(), i))
        .collect();
    want.push(("UPDATE".into(), 2));
    want.push(("DELETE".into(), 4));
    assert_eq!(replayed, want);

    // The same history over HTTP, 7 at a time (pages end inside transactions).
    let query = format!("apikey={}&table=invoices", q(&alice));
    let (paged, n) = pages(server.port, &query, &since, 7).await;
    assert_eq!(paged, want);
    assert!(n >= 5, "{n} pages");
    // A filter and another customer's token are applied the same way.
    let bob = token("customer", "bob");
    let (bobs, _) = pages(
        server.port,
        &format!(
            "apikey={}&table=public.invoices&filter={}",
            q(&bob),
            q("amount=lt.10")
        ),
        &since,
        100,
    )
    .await;
    // (103 after its update no longer matches; the DELETE is judged on the old row.)
    let mut want_bob: Vec<(String, i64)> =
        [1, 3, 5, 7, 9].map(|i| ("INSERT".to_string(), i)).to_vec();
    want_bob.push(("DELETE".into(), 5));
    assert_eq!(bobs, want_bob);
    // No token, a bad since, an older since than the log holds.
    let (status, body) = crate::support::http_get(
        server.port,
        &format!("/api/changes?table=invoices&since={}", q(&since)),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = crate::support::http_get(
        server.port,
        &format!("/api/changes?{query}&since=yesterday"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) =
        crate::support::http_get(server.port, &format!("/api/changes?{query}&since=0/0")).await;
    assert_eq!(status, 410, "{body}");
    assert!(body.contains("REPLAY_GAP"), "{body}");
    js.exit().await;
}

#[tokio::test]
async fn a_private_channel_replays_database_broadcasts_since_a_time() {
    let db = "resume_broadcast";
    let c = db_with(db, "create table t (id int primary key)").await;
    c.batch_execute(include_str!("../../sql/broadcast.sql"))
        .await
        .unwrap();
    let config = crate::support::config_file(
        db,
        &format!(
            "[auth]\nmode = \"jwt\"\njwt_secret = \"{SECRET}\"\n\n\
             [[channels]]\ntopic = \"room:*\"\nread_roles = [\"authenticated\"]\n"
        ),
    );
    let server = start(db, &["--config", config.to_str().unwrap()]).await;
    let t0: i64 = c
        .query_one(
            "select (extract(epoch from clock_timestamp()) * 1000)::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for n in 0..12 {
        c.batch_execute(&format!(
            "select walcast.broadcast('room:1', 'tick', '{{\"n\": {n}}}', true);
             select walcast.broadcast('room:2', 'tick', '{{\"other\": {n}}}', true);
             select walcast.broadcast('room:1', 'tick', '{{\"public\": {n}}}', false);"
        ))
        .await
        .unwrap();
    }
    // In the log before anyone asks (later ones would arrive live, not replayed).
    crate::support::wait_for("the broadcasts in the change log", T, || async {
        (metric(server.port, "walcast_log_changes_total").await >= 36.0).then_some(())
    })
    .await;
    let t1: i64 = c
        .query_one(
            "select (extract(epoch from clock_timestamp()) * 1000)::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let user = token("authenticated", "u1");
    let join = |replay: Value| {
        json!({"cmd": "subscribe", "channel": "room:1",
               "config": {"private": true, "broadcast": {"replay": replay}},
               "broadcast": [{"event": "*"}]})
    };
    let connect = json!({"cmd": "connect", "url": format!("ws://127.0.0.1:{}/realtime/v1", server.port),
                         "apikey": user});

    // The first 10 since t0, marked replayed, then REPLAY_DONE with more.
    let mut js = JsClient::spawn().await;
    js.call(connect.clone(), T).await;
    js.call(join(json!({"since": t0, "limit": 10})), T).await;
    assert_eq!(js.status("room:1", T).await, "SUBSCRIBED");
    let end = broadcast_replay_end(&mut js).await;
    let got: Vec<Value> = js
        .drain()
        .into_iter()
        .filter(|v| is_on(v, "broadcast", "room:1"))
        .map(|v| v["payload"].clone())
        .collect();
    assert_eq!(
        got.iter()
            .map(|p| p["payload"]["n"].clone())
            .collect::<Vec<_>>(),
        (0..10).map(|n| json!(n)).collect::<Vec<_>>(),
        "{got:?}"
    );
    assert!(got
        .iter()
        .all(|p| p["meta"]["replayed"] == true && p["meta"]["id"].is_string()));
    assert_eq!(end["payload"]["code"], "REPLAY_DONE", "{end}");
    assert_eq!(end["payload"]["replayed"], 10);
    assert_eq!(end["payload"]["more"], true);
    js.exit().await;

    // Since after them: nothing, and no more.
    let mut js = JsClient::spawn().await;
    js.call(connect.clone(), T).await;
    js.call(join(json!({"since": t1 + 1})), T).await;
    assert_eq!(js.status("room:1", T).await, "SUBSCRIBED");
    let end = broadcast_replay_end(&mut js).await;
    assert_eq!(end["payload"]["replayed"], 0, "{end}");
    assert_eq!(end["payload"]["more"], false, "{end}");
    js.exit().await;

    // Older than the log: REPLAY_GAP, nothing replayed; a bad limit is a join error.
    let mut js = JsClient::spawn().await;
    js.call(connect.clone(), T).await;
    js.call(join(json!({"since": 1})), T).await;
    assert_eq!(js.status("room:1", T).await, "SUBSCRIBED");
    let end = broadcast_replay_end(&mut js).await;
    assert_eq!(end["payload"]["code"], "REPLAY_GAP", "{end}");
    assert!(!js.drain().iter().any(|v| is_on(v, "broadcast", "room:1")));
    js.call(
        json!({"cmd": "subscribe", "channel": "room:3",
               "config": {"private": true, "broadcast": {"replay": {"since": t0, "limit": 5000}}}}),
        T,
    )
    .await;
    assert_eq!(js.status("room:3", T).await, "CHANNEL_ERROR");
    js.exit().await;
}

async fn broadcast_replay_end(js: &mut JsClient) -> Value {
    js.wait_for("the broadcast replay's end", T, |v| {
        is_on(v, "system", "room:1") && v["payload"]["extension"] == "broadcast"
    })
    .await
}

/// One series of `/metrics`.
pub(super) async fn metric(port: u16, series: &str) -> f64 {
    let (_, text) = crate::support::http_get(port, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

#[tokio::test]
async fn a_connection_lost_mid_replay_releases_its_socket_channel_and_subscriptions() {
    use futures::{SinkExt, StreamExt};
    let db = "resume_lost";
    let c = items_db(db).await;
    let since: String = c
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    c.batch_execute(
        "insert into items (id) select g from generate_series(1, 20000) g;
         insert into items (id) select g from generate_series(20001, 40000) g;",
    )
    .await
    .unwrap();
    let mut server = start(db, &[]).await;
    crate::support::wait_for("the rows in the change log", T, || async {
        (metric(server.port, "walcast_log_changes_total").await >= 40_000.0).then_some(())
    })
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url("2.0.0"))
        .await
        .unwrap();
    let join = json!(["1", "1", "realtime:feed", "phx_join", {"config": {"postgres_changes": [
        {"event": "*", "schema": "public", "table": "items", "replay": {"since": since}}]}}]);
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        join.to_string(),
    ))
    .await
    .unwrap();
    // The replay is under way once its first change arrives; then the socket is
    // lost (no close frame) while it has most of 40,000 changes still to send.
    tokio::time::timeout(T, async {
        while let Some(Ok(m)) = ws.next().await {
            if m.to_text().is_ok_and(|t| {
                t.contains("\"postgres_changes\",{\"data\"") || t.contains("\"ids\"")
            }) {
                break;
            }
        }
    })
    .await
    .expect("a replayed change");
    drop(ws);
    for series in [
        "walcast_websocket_connections",
        "walcast_websocket_channels",
        "walcast_subscriptions",
    ] {
        crate::support::wait_for(&format!("{series} back to 0"), T, || async {
            (metric(server.port, series).await == 0.0).then_some(())
        })
        .await;
    }
    // Nothing of it holds the shutdown up.
    let asked = std::time::Instant::now();
    server.proc.signal(15);
    tokio::time::timeout(Duration::from_secs(10), server.proc.child.wait())
        .await
        .expect("walcast exits after SIGTERM")
        .unwrap();
    assert!(asked.elapsed() < Duration::from_secs(10));
}
