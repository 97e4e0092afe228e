//! The WebSocket server at the protocol level, with a raw client.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

pub use crate::support::setup_db;
pub use crate::support::walcast::{serve_db as start, Server};

const T: Duration = Duration::from_secs(20);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &Server, vsn: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(server.ws_url(vsn))
        .await
        .expect("connect");
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Next text frame as JSON, normalised to [join_ref, ref, topic, event, payload].
async fn recv(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .expect("no frame in time")
            .expect("socket ended")
            .expect("socket error");
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                return match v {
                    Value::Object(o) => json!([
                        o["join_ref"],
                        o["ref"],
                        o["topic"],
                        o["event"],
                        o["payload"]
                    ]),
                    a => a,
                };
            }
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

async fn recv_event(ws: &mut Ws, event: &str) -> Value {
    loop {
        let f = recv(ws).await;
        if f[3] == event {
            return f;
        }
    }
}

async fn join(ws: &mut Ws, vsn: &str, topic: &str, r: &str, config: Value) -> Value {
    let topic = format!("realtime:{topic}");
    let payload = json!({"config": config});
    if vsn == "2.0.0" {
        send(ws, json!([r, r, topic, "phx_join", payload])).await;
    } else {
        send(ws, json!({"topic": topic, "event": "phx_join", "payload": payload, "ref": r, "join_ref": r})).await;
    }
    recv_event(ws, "phx_reply").await
}

#[tokio::test]
async fn join_delivers_changes_in_both_versions() {
    let db = "ws_basic";
    let c = setup_db(db, "create table items (id int primary key, name text, qty int); alter table items replica identity full;").await;
    let server = start(db, &[]).await;
    for vsn in ["1.0.0", "2.0.0"] {
        let mut ws = connect(&server, vsn).await;
        // Heartbeat.
        if vsn == "2.0.0" {
            send(&mut ws, json!([null, "h1", "phoenix", "heartbeat", {}])).await;
        } else {
            send(
                &mut ws,
                json!({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "h1"}),
            )
            .await;
        }
        let hb = recv(&mut ws).await;
        assert_eq!(
            hb,
            json!([null, "h1", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
        );

        let bindings = json!([
            {"event": "*", "schema": "public", "table": "items"},
            {"event": "INSERT", "schema": "public", "table": "items", "filter": "id=eq.2"}
        ]);
        let reply = join(
            &mut ws,
            vsn,
            "room",
            "1",
            json!({"postgres_changes": bindings}),
        )
        .await;
        assert_eq!(reply[1], "1");
        assert_eq!(reply[4]["status"], "ok", "{reply}");
        let echoed = reply[4]["response"]["postgres_changes"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(echoed.len(), 2);
        assert_eq!(echoed[1]["filter"], "id=eq.2");
        let (id_all, id_two) = (
            echoed[0]["id"].as_u64().unwrap(),
            echoed[1]["id"].as_u64().unwrap(),
        );
        assert!(id_all > 0 && id_two > 0 && id_all != id_two);
        let sys = recv_event(&mut ws, "system").await;
        assert_eq!(sys[4]["message"], "Subscribed to PostgreSQL");
        assert_eq!(sys[4]["channel"], "room");

        c.batch_execute("insert into items values (1, 'a', 1), (2, 'b', 2); update items set qty = 5 where id = 1; delete from items;").await.unwrap();
        let mut got = Vec::new();
        for _ in 0..5 {
            let f = recv_event(&mut ws, "postgres_changes").await;
            assert_eq!(f[0], Value::Null);
            assert_eq!(f[2], "realtime:room");
            got.push(f[4].clone());
        }
        assert_eq!(got[0]["ids"], json!([id_all]));
        assert_eq!(
            got[1]["ids"].as_array().unwrap().len(),
            2,
            "both bindings matched id 2"
        );
        let d = &got[0]["data"];
        assert_eq!(d["type"], "INSERT");
        assert_eq!(d["record"], json!({"id": 1, "name": "a", "qty": 1}));
        assert!(d.get("old_record").is_none());
        assert_eq!(d["columns"][0], json!({"name": "id", "type": "int4"}));
        assert!(d["commit_timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(d["errors"], Value::Null);
        assert_eq!(got[2]["data"]["type"], "UPDATE");
        assert_eq!(got[2]["data"]["old_record"]["qty"], 1);
        assert_eq!(got[3]["data"]["type"], "DELETE");
        assert!(got[3]["data"].get("record").is_none());
        c.batch_execute("delete from items").await.unwrap();
    }
}

#[tokio::test]
async fn bad_joins_are_errors_and_the_socket_keeps_working() {
    let db = "ws_errors";
    let c = setup_db(
        db,
        "create table t (id int primary key, n int); create table other (id int);",
    )
    .await;
    c.batch_execute("drop publication pub_ws_errors")
        .await
        .unwrap();
    c.batch_execute("create publication pub_ws_errors for table t")
        .await
        .unwrap();
    let server = start(db, &[]).await;
    let mut ws = connect(&server, "2.0.0").await;
    for (i, (binding, want)) in [
        (
            json!({"event": "*", "schema": "public", "table": "nope"}),
            "does not exist",
        ),
        (
            json!({"event": "*", "schema": "public", "table": "other"}),
            "not in publication",
        ),
        (
            json!({"event": "*", "schema": "public", "table": "t", "filter": "id=eqq.1"}),
            "filter",
        ),
        (
            json!({"event": "*", "schema": "public", "table": "t", "filter": "missing=eq.1"}),
            "missing",
        ),
        (
            json!({"event": "SOMETIMES", "schema": "public", "table": "t"}),
            "invalid event",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let r = format!("e{i}");
        let reply = join(
            &mut ws,
            "2.0.0",
            &format!("bad{i}"),
            &r,
            json!({"postgres_changes": [binding]}),
        )
        .await;
        assert_eq!(reply[4]["status"], "error", "{reply}");
        let reason = reply[4]["response"]["reason"].as_str().unwrap();
        assert!(reason.contains(want), "{reason:?} should mention {want:?}");
    }
    // Unmatched topic.
    send(
        &mut ws,
        json!(["x", "u1", "realtime:never", "broadcast", {}]),
    )
    .await;
    let r = recv(&mut ws).await;
    assert_eq!(r[4]["response"]["reason"], "unmatched topic");
    // Malformed frames get no crash; a frame with a ref gets an error reply.
    ws.send(Message::Text("not json".into())).await.unwrap();
    send(&mut ws, json!({"ref": "m1", "topic": "phoenix"})).await;
    let r = recv(&mut ws).await;
    assert_eq!(
        (r[1].as_str(), r[4]["status"].as_str()),
        (Some("m1"), Some("error"))
    );
    // The socket still works.
    let reply = join(
        &mut ws,
        "2.0.0",
        "good",
        "g1",
        json!({"postgres_changes": [{"event": "*", "schema": "public", "table": "t"}]}),
    )
    .await;
    assert_eq!(reply[4]["status"], "ok");
    c.batch_execute("insert into t values (1, 1)")
        .await
        .unwrap();
    let f = recv_event(&mut ws, "postgres_changes").await;
    assert_eq!(f[4]["data"]["record"]["id"], 1);
}

#[tokio::test]
async fn leave_stops_delivery_and_a_slow_client_is_closed_without_hurting_others() {
    let db = "ws_slow";
    let c = setup_db(db, "create table t (id int primary key, pad text)").await;
    // A queue of 1,024 frames: the slow client overflows it soon after its socket
    // buffers fill, while the fast one, reading each batch before the next is
    // written, never holds more than a batch there however busy the machine is.
    let server =
        crate::support::walcast::serve_db_with_config(db, "[limits]\nclient_queue = 1024\n").await;
    let binding = json!({"postgres_changes": [{"event": "*", "schema": "public", "table": "t"}]});
    let mut fast = connect(&server, "2.0.0").await;
    assert_eq!(
        join(&mut fast, "2.0.0", "f", "1", binding.clone()).await[4]["status"],
        "ok"
    );
    // A client that joins and then never reads.
    let mut slow = connect(&server, "2.0.0").await;
    assert_eq!(
        join(&mut slow, "2.0.0", "s", "1", binding.clone()).await[4]["status"],
        "ok"
    );
    // Leave on a third socket: nothing arrives after phx_leave.
    let mut leaver = connect(&server, "2.0.0").await;
    assert_eq!(
        join(&mut leaver, "2.0.0", "l", "1", binding.clone()).await[4]["status"],
        "ok"
    );
    send(
        &mut leaver,
        json!(["1", "2", "realtime:l", "phx_leave", {}]),
    )
    .await;
    let r = recv_event(&mut leaver, "phx_reply").await;
    assert_eq!(r[4]["status"], "ok");

    // Enough rows of 2 KB (32 MB) to overflow the slow client's queue and socket
    // buffers, in transactions of 500 rows; the fast client reads each one whole
    // before the next is written.
    let (rows, batch) = (16_000, 500);
    let mut n = 0;
    while n < rows {
        c.execute(
            "insert into t select g, repeat('x', 2000) from generate_series($1::int, $2::int) g",
            &[&(n + 1), &(n + batch)],
        )
        .await
        .unwrap();
        for _ in 0..batch {
            let f = recv_event(&mut fast, "postgres_changes").await;
            assert_eq!(f[4]["data"]["record"]["id"], n + 1, "in order");
            n += 1;
        }
    }
    // The slow client was closed: once it reads, it finds a close with 4008 — or,
    // as here, where it read nothing for longer than walcast gives the closing
    // frames (1 s), its socket simply ends: a stalled socket is not held open.
    let mut ended = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(T, slow.next()).await {
            Ok(Some(Ok(Message::Close(c)))) => {
                ended = Some(c.map(|c| u16::from(c.code)));
                break;
            }
            Ok(Some(Ok(_))) => {}
            Ok(None) | Ok(Some(Err(_))) => {
                ended = Some(None);
                break;
            }
            Err(_) => panic!("the slow client's socket is still open"),
        }
    }
    assert!(
        matches!(ended, Some(Some(4008)) | Some(None)),
        "slow client ended with {ended:?}"
    );
    // The leaver got nothing after leaving (only the phx_close): the fence is
    // its heartbeat's reply, sent after all the rows were delivered.
    send(&mut leaver, json!([null, "hb", "phoenix", "heartbeat", {}])).await;
    loop {
        let f = recv(&mut leaver).await;
        if f[3] == "phx_reply" && f[1] == "hb" {
            break;
        }
        assert_eq!(f[3], "phx_close", "unexpected frame after leave: {f}");
    }
}

#[tokio::test]
async fn sigterm_closes_sockets_with_1001_confirms_and_exits_cleanly() {
    let db = "ws_shutdown";
    let c = setup_db(db, "create table t (id int primary key)").await;
    let server = start(db, &[]).await;
    let mut ws = connect(&server, "2.0.0").await;
    let binding = json!({"postgres_changes": [{"event": "*", "schema": "public", "table": "t"}]});
    assert_eq!(
        join(&mut ws, "2.0.0", "s", "1", binding).await[4]["status"],
        "ok"
    );
    c.batch_execute("insert into t values (1)").await.unwrap();
    let change = recv_event(&mut ws, "postgres_changes").await;
    // The delivered transaction's commit LSN; its end (what is confirmed) is past
    // it. (Not `pg_current_wal_lsn()`: the server may write WAL of its own after
    // the commit, which walcast only confirms once a keepalive reports it.)
    let commit_lsn = change[4]["data"]["commit_lsn"]
        .as_str()
        .expect("commit_lsn in the change")
        .to_string();
    server.proc.signal(15);
    let mut code = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(T, ws.next()).await {
        if let Message::Close(Some(f)) = m {
            code = Some(u16::from(f.code));
            break;
        }
    }
    assert_eq!(code, Some(1001), "sockets close with 1001 on shutdown");
    let (ok, err) = server.proc.wait(T).await;
    assert!(ok, "serve did not exit cleanly: {err}");
    // The delivered transaction was confirmed: the slot is past it.
    let confirmed: bool = c
        .query_one(
            "select confirmed_flush_lsn > $1::text::pg_lsn from pg_replication_slots where slot_name = 'slot_ws_shutdown'",
            &[&commit_lsn],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        confirmed,
        "the slot was not confirmed past the delivered change"
    );
}

/// realtime-js learns its bindings' ids from the join reply; a change that
/// reached a channel before it would go to every binding of the channel. While
/// rows are written as fast as one connection can, no channel gets a change
/// before its `phx_reply`.
#[tokio::test]
async fn no_change_reaches_a_channel_before_its_join_reply() {
    let db = "ws_reply_first";
    let c = setup_db(db, "create table items (id serial primary key, name text);").await;
    let server = start(db, &[]).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                c.execute("insert into items (name) values ('x')", &[])
                    .await
                    .unwrap();
                n += 1;
            }
            n
        })
    };
    let mut ws = connect(&server, "2.0.0").await;
    let bindings = json!({"postgres_changes": [
        {"event": "*", "schema": "public", "table": "items"},
        {"event": "INSERT", "schema": "public", "table": "items"}
    ]});
    let mut changes_seen = 0;
    for i in 0..150 {
        let topic = format!("realtime:t{i}");
        let r = i.to_string();
        send(
            &mut ws,
            json!([r, r, topic, "phx_join", {"config": bindings}]),
        )
        .await;
        loop {
            let f = recv(&mut ws).await;
            if f[2] != topic {
                changes_seen += usize::from(f[3] == "postgres_changes");
                continue;
            }
            assert_ne!(
                f[3], "postgres_changes",
                "a change before the join reply: {f}"
            );
            if f[3] == "phx_reply" {
                assert_eq!(f[4]["status"], "ok", "{f}");
                break;
            }
        }
        // One channel at a time, so the socket's queue never fills: every
        // channel gets every row.
        let l = format!("l{i}");
        send(&mut ws, json!([r, l, topic, "phx_leave", {}])).await;
    }
    stop.cancel();
    let written = writer.await.unwrap();
    // The fence: changes did flow to the channels while they joined.
    assert!(
        written > 0 && changes_seen > 0,
        "{written} rows written, {changes_seen} changes seen"
    );
}
