//! Broadcast, presence and broadcast from the database, with a raw WebSocket client
//! speaking the protocol as realtime-js does (reference/realtime-js-protocol.md §2,
//! §6, §7, §9).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::cases::ws::{setup_db, start};
use crate::support::walcast::Server;

const T: Duration = Duration::from_secs(20);
const SQL: &str = include_str!("../../sql/broadcast.sql");

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A client and its protocol version.
struct Client {
    ws: Ws,
    vsn: &'static str,
}

/// A frame received: JSON text normalised to `[join_ref, ref, topic, event, payload]`,
/// or a binary frame.
#[derive(Debug)]
enum In {
    Text(Value),
    Binary(Vec<u8>),
}

/// A decoded kind-4 user broadcast.
#[derive(Debug, PartialEq)]
struct Kind4 {
    topic: String,
    event: String,
    metadata: Vec<u8>,
    json: bool,
    payload: Vec<u8>,
}

fn decode_kind4(b: &[u8]) -> Kind4 {
    assert_eq!(b[0], 4, "binary frames to clients must be kind 4");
    let (t, e, m) = (b[1] as usize, b[2] as usize, b[3] as usize);
    let mut p = 5;
    let mut take = |n: usize| {
        let s = b[p..p + n].to_vec();
        p += n;
        s
    };
    let topic = String::from_utf8(take(t)).unwrap();
    let event = String::from_utf8(take(e)).unwrap();
    let metadata = take(m);
    Kind4 {
        topic,
        event,
        metadata,
        json: b[4] == 1,
        payload: b[5 + t + e + m..].to_vec(),
    }
}

fn kind3(join_ref: &str, r: &str, topic: &str, event: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![
        3,
        join_ref.len() as u8,
        r.len() as u8,
        topic.len() as u8,
        event.len() as u8,
        0,
        1,
    ];
    for s in [join_ref, r, topic, event] {
        b.extend_from_slice(s.as_bytes());
    }
    b.extend_from_slice(payload);
    b
}

impl Client {
    async fn connect(server: &Server, vsn: &'static str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(server.ws_url(vsn))
            .await
            .expect("connect");
        Client { ws, vsn }
    }

    /// Sends `[join_ref, ref, topic, event, payload]` in this client's encoding.
    async fn send(&mut self, join_ref: &str, r: &str, topic: &str, event: &str, payload: Value) {
        let v = if self.vsn == "2.0.0" {
            json!([join_ref, r, topic, event, payload])
        } else {
            json!({"join_ref": join_ref, "ref": r, "topic": topic, "event": event, "payload": payload})
        };
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    async fn next_in(&mut self, timeout: Duration) -> Option<In> {
        loop {
            let m = match tokio::time::timeout(timeout, self.ws.next()).await {
                Err(_) => return None,
                Ok(m) => m.expect("socket ended").expect("socket error"),
            };
            match m {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    return Some(In::Text(match v {
                        Value::Object(o) => {
                            assert_eq!(self.vsn, "1.0.0", "objects only on 1.0.0");
                            json!([
                                o["join_ref"],
                                o["ref"],
                                o["topic"],
                                o["event"],
                                o["payload"]
                            ])
                        }
                        a => {
                            assert_eq!(self.vsn, "2.0.0", "arrays only on 2.0.0");
                            a
                        }
                    }));
                }
                Message::Binary(b) => {
                    assert_eq!(self.vsn, "2.0.0", "never binary to a 1.0.0 socket");
                    return Some(In::Binary(b.to_vec()));
                }
                Message::Close(c) => panic!("closed: {c:?}"),
                _ => {}
            }
        }
    }

    async fn next(&mut self) -> In {
        self.next_in(T).await.expect("no frame in time")
    }

    /// The next text frame with `event`, skipping others.
    async fn expect_event(&mut self, event: &str) -> Value {
        loop {
            if let In::Text(f) = self.next().await {
                if f[3] == event {
                    return f;
                }
            }
        }
    }

    /// Joins `realtime:<name>`; returns the reply.
    async fn join(&mut self, name: &str, r: &str, config: Value) -> Value {
        let topic = format!("realtime:{name}");
        self.send(r, r, &topic, "phx_join", json!({ "config": config }))
            .await;
        self.expect_event("phx_reply").await
    }

    async fn join_ok(&mut self, name: &str, r: &str, config: Value) {
        let reply = self.join(name, r, config).await;
        assert_eq!(reply[4]["status"], "ok", "{reply}");
    }

    /// A user broadcast from the JSON client API.
    async fn broadcast(
        &mut self,
        name: &str,
        join_ref: &str,
        r: &str,
        event: &str,
        payload: Value,
    ) {
        let topic = format!("realtime:{name}");
        self.send(
            join_ref,
            r,
            &topic,
            "broadcast",
            json!({"type": "broadcast", "event": event, "payload": payload}),
        )
        .await;
    }

    /// The next broadcast received, as `{type, event, payload, meta?}`, and whether
    /// it came as a kind-4 binary frame.
    async fn next_broadcast(&mut self) -> (Value, bool) {
        loop {
            match self.next().await {
                In::Text(f) if f[3] == "broadcast" => {
                    assert_eq!((&f[0], &f[1]), (&Value::Null, &Value::Null));
                    return (f[4].clone(), false);
                }
                In::Binary(b) => {
                    let k = decode_kind4(&b);
                    assert!(k.json);
                    let payload: Value = serde_json::from_slice(&k.payload).unwrap();
                    return (
                        json!({"type": "broadcast", "event": k.event, "payload": payload, "topic": k.topic}),
                        true,
                    );
                }
                _ => {}
            }
        }
    }

    /// The very next frame, which must be a text frame.
    async fn next_text(&mut self) -> Value {
        match self.next().await {
            In::Text(f) => f,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Asserts that nothing was sent to this client by what happened so far,
    /// fenced by a heartbeat: its reply must be the very next frame (a socket
    /// delivers in order, so anything queued before would come first).
    async fn assert_quiet(&mut self, what: &str) {
        self.send("", "quiet-fence", "phoenix", "heartbeat", json!({}))
            .await;
        match self.next().await {
            In::Text(f) if f[3] == "phx_reply" && f[1] == "quiet-fence" => {
                assert_eq!(f[4]["status"], "ok", "{f}");
            }
            other => panic!("{what}: unexpected frame before the heartbeat reply: {other:?}"),
        }
    }
}

fn write_config(name: &str, toml: &str) -> String {
    let path =
        std::env::temp_dir().join(format!("walcast-test-{name}-{}.toml", std::process::id()));
    std::fs::write(&path, toml).unwrap();
    path.to_string_lossy().into_owned()
}

/// A minimal HTTP/1.1 POST; returns (status, body).
async fn http_post(server: &Server, path: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\napikey: test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .expect("HTTP response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn broadcast_fans_out_with_self_ack_and_both_versions() {
    let db = "bc_fanout";
    let _c = setup_db(db, "create table t (id int primary key)").await;
    let server = start(db, &[]).await;
    // A: 2.0.0, ack, no self. B: 1.0.0 defaults. C: 2.0.0, self as the string "true".
    let mut a = Client::connect(&server, "2.0.0").await;
    let mut b = Client::connect(&server, "1.0.0").await;
    let mut c = Client::connect(&server, "2.0.0").await;
    a.join_ok(
        "room",
        "1",
        json!({"broadcast": {"ack": true, "self": false}}),
    )
    .await;
    b.join_ok("room", "1", json!({})).await;
    c.join_ok("room", "1", json!({"broadcast": {"self": "true"}}))
        .await;
    // Another topic sees nothing.
    let mut other = Client::connect(&server, "2.0.0").await;
    other.join_ok("elsewhere", "1", json!({})).await;

    // A JSON text push reaches B (object frame) and C (array frame), acked to A.
    a.broadcast("room", "1", "5", "cursor", json!({"x": 1}))
        .await;
    // The very next frame is the ack: an echo (wrongly sent) would come first.
    let reply = a.next_text().await;
    assert_eq!(
        reply,
        json!(["1", "5", "realtime:room", "phx_reply", {"status": "ok", "response": {}}])
    );
    let want = json!({"type": "broadcast", "event": "cursor", "payload": {"x": 1}});
    assert_eq!(b.next_broadcast().await, (want.clone(), false));
    assert_eq!(c.next_broadcast().await, (want, false));

    // C has self: it gets its own message; A (no self) gets C's, not its own.
    c.broadcast("room", "1", "2", "hello", json!({"from": "c"}))
        .await;
    assert_eq!(c.next_broadcast().await.0["event"], "hello");
    assert_eq!(b.next_broadcast().await.0["event"], "hello");
    let (first_for_a, _) = a.next_broadcast().await;
    assert_eq!(
        first_for_a["event"], "hello",
        "A must not receive its own broadcast without self"
    );

    // A binary kind-3 push: kind 4 to the 2.0.0 client, JSON text to the 1.0.0 one.
    a.ws.send(Message::Binary(
        kind3("1", "6", "realtime:room", "bin", br#"{"y":[1,2]}"#).into(),
    ))
    .await
    .unwrap();
    let reply = a.next_text().await;
    assert_eq!(
        (&reply[1], &reply[4]["status"]),
        (&json!("6"), &json!("ok"))
    );
    let (got, binary) = c.next_broadcast().await;
    assert!(binary, "a 2.0.0 recipient of a kind-3 push gets kind 4");
    assert_eq!(got["event"], "bin");
    assert_eq!(got["topic"], "realtime:room");
    assert_eq!(got["payload"], json!({"y": [1, 2]}));
    let (got, binary) = b.next_broadcast().await;
    assert!(!binary);
    assert_eq!(
        got,
        json!({"type": "broadcast", "event": "bin", "payload": {"y": [1, 2]}})
    );

    // A push without an event is an error reply with ack.
    a.send(
        "1",
        "7",
        "realtime:room",
        "broadcast",
        json!({"type": "broadcast", "payload": {}}),
    )
    .await;
    let reply = a.expect_event("phx_reply").await;
    assert_eq!(reply[4]["status"], "error", "{reply}");
    other.assert_quiet("another topic").await;
}

#[tokio::test]
async fn oversized_payloads_and_rate_limits_are_answered() {
    let db = "bc_limits";
    let _c = setup_db(db, "create table t (id int primary key)").await;
    let config = write_config(
        db,
        "[broadcast]\nmax_payload_bytes = 1024\nmessages_per_second = 1\nmessages_burst = 3\n",
    );
    let server = start(db, &["--config", &config]).await;
    let mut acked = Client::connect(&server, "2.0.0").await;
    let mut plain = Client::connect(&server, "1.0.0").await;
    let mut rx = Client::connect(&server, "2.0.0").await;
    acked
        .join_ok("lim", "1", json!({"broadcast": {"ack": true}}))
        .await;
    plain.join_ok("lim", "1", json!({})).await;
    rx.join_ok("lim", "1", json!({})).await;

    let big = json!({"blob": "x".repeat(2000)});
    acked.broadcast("lim", "1", "2", "big", big.clone()).await;
    let reply = acked.expect_event("phx_reply").await;
    assert_eq!(reply[4]["status"], "error");
    let reason = reply[4]["response"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("payload_size_exceeded"), "{reason}");
    // Without ack: dropped (counted), nothing reaches anyone.
    plain.broadcast("lim", "1", "2", "big", big).await;
    plain.broadcast("lim", "1", "3", "small", json!({})).await;
    assert_eq!(rx.next_broadcast().await.0["event"], "small");

    // Burst of 3, then the rate limit answers with a system error.
    let mut system = None;
    for i in 0..6 {
        plain
            .broadcast("lim", "1", &format!("r{i}"), "flood", json!({"i": i}))
            .await;
    }
    while system.is_none() {
        if let In::Text(f) = plain.next().await {
            if f[3] == "system" {
                system = Some(f);
            }
        }
    }
    let f = system.unwrap();
    assert_eq!(f[2], "realtime:lim");
    assert_eq!(f[4]["extension"], "system");
    assert_eq!(f[4]["status"], "error");
    assert_eq!(f[4]["message"], "Too many messages per second");
    // With ack, a refused push also gets an error reply (the bucket has 2 tokens
    // left after the oversized push, plus whatever refilled meanwhile).
    for i in 0..6 {
        acked
            .broadcast("lim", "1", &format!("a{i}"), "flood", json!({}))
            .await;
    }
    let mut statuses = Vec::new();
    while statuses.len() < 6 {
        let f = acked.expect_event("phx_reply").await;
        if f[4]["status"] == "error" {
            assert_eq!(f[4]["response"]["reason"], "Too many messages per second");
        }
        statuses.push(f[4]["status"].as_str().unwrap().to_string());
    }
    assert_eq!(&statuses[..2], ["ok", "ok"]);
    assert!(statuses.iter().any(|s| s == "error"), "{statuses:?}");
}

#[tokio::test]
async fn presence_state_and_diffs() {
    let db = "bc_presence";
    let _c = setup_db(db, "create table t (id int primary key)").await;
    let server = start(db, &[]).await;
    let topic = "realtime:lobby";
    let mut a = Client::connect(&server, "2.0.0").await;
    a.join_ok(
        "lobby",
        "1",
        json!({"presence": {"enabled": true, "key": "alice"}}),
    )
    .await;
    let state = a.expect_event("presence_state").await;
    assert_eq!(state[0], "1", "presence_state carries the join ref");
    assert_eq!(state[4], json!({}));

    a.send(
        "1",
        "2",
        topic,
        "presence",
        json!({"type": "presence", "event": "track", "payload": {"status": "online"}}),
    )
    .await;
    let diff = a.expect_event("presence_diff").await;
    let metas = &diff[4]["joins"]["alice"]["metas"];
    assert_eq!(metas[0]["status"], "online");
    let alice_ref = metas[0]["phx_ref"].as_str().unwrap().to_string();
    assert_eq!(diff[4]["leaves"], json!({}));
    let reply = a.expect_event("phx_reply").await;
    assert_eq!(
        (&reply[1], &reply[4]["status"]),
        (&json!("2"), &json!("ok"))
    );

    // B (1.0.0) joins and sees alice in its state; its track is seen by both.
    let mut b = Client::connect(&server, "1.0.0").await;
    b.join_ok(
        "lobby",
        "1",
        json!({"presence": {"enabled": "true", "key": "bob"}}),
    )
    .await;
    let state = b.expect_event("presence_state").await;
    assert_eq!(
        state[4],
        json!({"alice": {"metas": [{"phx_ref": alice_ref, "status": "online"}]}})
    );
    b.send(
        "1",
        "2",
        topic,
        "presence",
        json!({"type": "presence", "event": "track", "payload": {"status": "away"}}),
    )
    .await;
    for c in [&mut a, &mut b] {
        let d = c.expect_event("presence_diff").await;
        assert_eq!(d[4]["joins"]["bob"]["metas"][0]["status"], "away");
    }
    assert_eq!(b.expect_event("phx_reply").await[4]["status"], "ok");

    // Re-track replaces: leave of the old meta and join of the new one.
    a.send(
        "1",
        "3",
        topic,
        "presence",
        json!({"type": "presence", "event": "track", "payload": {"status": "busy"}}),
    )
    .await;
    let d = b.expect_event("presence_diff").await;
    assert_eq!(d[4]["leaves"]["alice"]["metas"][0]["phx_ref"], alice_ref);
    assert_eq!(d[4]["joins"]["alice"]["metas"][0]["status"], "busy");
    assert_ne!(d[4]["joins"]["alice"]["metas"][0]["phx_ref"], alice_ref);

    // Untrack.
    b.send(
        "1",
        "3",
        topic,
        "presence",
        json!({"type": "presence", "event": "untrack"}),
    )
    .await;
    let d = a.expect_event("presence_diff").await;
    // A first sees its own re-track diff, then bob's untrack.
    let d = if d[4]["leaves"].get("bob").is_some() {
        d
    } else {
        a.expect_event("presence_diff").await
    };
    assert_eq!(d[4]["leaves"]["bob"]["metas"][0]["status"], "away");
    assert_eq!(d[4]["joins"], json!({}));

    // A key the server generates (UUID-like); a disconnect is a leave.
    let mut c = Client::connect(&server, "2.0.0").await;
    c.join_ok(
        "lobby",
        "1",
        json!({"presence": {"enabled": true, "key": ""}}),
    )
    .await;
    c.send(
        "1",
        "2",
        topic,
        "presence",
        json!({"type": "presence", "event": "track", "payload": {}}),
    )
    .await;
    let d = a.expect_event("presence_diff").await;
    let joins = d[4]["joins"].as_object().unwrap();
    let key = joins.keys().next().unwrap().clone();
    assert_eq!(key.len(), 36, "generated key {key:?}");
    c.ws.close(None).await.unwrap();
    drop(c);
    let d = a.expect_event("presence_diff").await;
    assert!(d[4]["leaves"].get(&key).is_some(), "{d}");

    // phx_leave is a leave too.
    b.send(
        "1",
        "4",
        topic,
        "presence",
        json!({"type": "presence", "event": "track", "payload": {"n": 1}}),
    )
    .await;
    assert!(a.expect_event("presence_diff").await[4]["joins"]
        .get("bob")
        .is_some());
    b.send("1", "5", topic, "phx_leave", json!({})).await;
    let d = a.expect_event("presence_diff").await;
    assert_eq!(d[4]["leaves"]["bob"]["metas"][0]["n"], 1);

    // Limits answer with a clear error.
    a.send(
        "1",
        "9",
        topic,
        "presence",
        json!({"type": "presence", "event": "track", "payload": {"pad": "x".repeat(20_000)}}),
    )
    .await;
    let r = a.expect_event("phx_reply").await;
    assert_eq!(r[4]["status"], "error");
    let reason = r[4]["response"]["reason"].as_str().unwrap();
    assert!(reason.contains("presence.max_payload_bytes"), "{reason}");
}

#[tokio::test]
async fn database_broadcasts_follow_commit() {
    let db = "bc_database";
    let c = setup_db(
        db,
        "create table orders (id int primary key, status text);
         create table notes (id int primary key, body text);",
    )
    .await;
    c.batch_execute(SQL).await.unwrap();
    c.batch_execute(
        "create trigger orders_bc after insert or update or delete on orders
             for each row execute function walcast.broadcast_changes('orders-feed');
         create trigger notes_bc after insert on notes
             for each row execute function walcast.broadcast_changes();",
    )
    .await
    .unwrap();
    let server = start(db, &[]).await;
    let mut v1 = Client::connect(&server, "1.0.0").await;
    let mut v2 = Client::connect(&server, "2.0.0").await;
    for cl in [&mut v1, &mut v2] {
        cl.join_ok("news", "1", json!({})).await;
        cl.join_ok("orders-feed", "2", json!({})).await;
        cl.join_ok("notes", "3", json!({})).await;
    }

    c.batch_execute(
        "begin; select walcast.broadcast('news', 'rolled', '{\"n\": 0}'); rollback;
         begin; insert into notes values (0, 'x');
                select walcast.broadcast('news', 'committed', '{\"n\": 1}'); commit;
         select walcast.broadcast('news', 'marker', '{\"n\": 2}');",
    )
    .await
    .unwrap();
    for cl in [&mut v1, &mut v2] {
        let mut got = Vec::new();
        while got.len() < 3 {
            let (b, binary) = cl.next_broadcast().await;
            assert!(!binary, "database broadcasts are JSON");
            got.push(b);
        }
        // Commit order: the note's trigger fired before the broadcast in the same txn.
        assert_eq!(got[0]["event"], "INSERT");
        assert_eq!(got[0]["payload"]["record"], json!({"id": 0, "body": "x"}));
        assert_eq!(got[0]["payload"]["table"], "notes");
        assert_eq!(
            got[1]["event"], "committed",
            "the rolled-back one never arrives"
        );
        assert_eq!(got[1]["payload"], json!({"n": 1}));
        let id = got[1]["meta"]["id"].as_str().unwrap();
        assert_eq!(id.len(), 36, "meta.id is a uuid: {id}");
        assert_eq!(got[2]["event"], "marker", "delivered once");
    }

    c.batch_execute(
        "insert into orders values (1, 'new');
         update orders set status = 'paid' where id = 1;
         delete from orders where id = 1;",
    )
    .await
    .unwrap();
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(v2.next_broadcast().await.0);
    }
    assert_eq!(events[0]["event"], "INSERT");
    assert_eq!(
        events[0]["payload"]["record"],
        json!({"id": 1, "status": "new"})
    );
    assert_eq!(events[0]["payload"]["old_record"], Value::Null);
    assert_eq!(events[1]["event"], "UPDATE");
    assert_eq!(events[1]["payload"]["old_record"]["status"], "new");
    assert_eq!(events[1]["payload"]["record"]["status"], "paid");
    assert_eq!(events[2]["event"], "DELETE");
    assert_eq!(events[2]["payload"]["record"], Value::Null);
    assert_eq!(events[2]["payload"]["schema"], "public");
    assert_eq!(events[2]["payload"]["operation"], "DELETE");
    assert!(events.iter().all(|e| e["meta"]["id"].is_string()));
}

#[tokio::test]
async fn private_channels_need_a_rule() {
    let db = "bc_private";
    let c = setup_db(db, "create table t (id int primary key)").await;
    c.batch_execute(SQL).await.unwrap();
    let config = write_config(
        db,
        "[[channels]]\ntopic = \"room:*\"\nread_roles = [\"authenticated\"]\nwrite_roles = [\"authenticated\"]\n",
    );
    let server = start(db, &["--config", &config]).await;
    let mut ws = Client::connect(&server, "2.0.0").await;
    for name in ["room:1", "no-rule"] {
        let reply = ws.join(name, "1", json!({"private": true})).await;
        assert_eq!(reply[4]["status"], "error", "{reply}");
        let reason = reply[4]["response"]["reason"].as_str().unwrap();
        assert!(reason.contains("Unauthorized"), "{reason}");
    }
    // The same name as a public channel is fine, and disjoint from the private one.
    ws.join_ok("room:1", "2", json!({"private": false})).await;
    c.batch_execute(
        "select walcast.broadcast('room:1', 'secret', '{}', true);
         select walcast.broadcast('room:1', 'public', '{}', false);",
    )
    .await
    .unwrap();
    assert_eq!(ws.next_broadcast().await.0["event"], "public");
    // REST refuses private topics without a granting claim.
    let (status, body) = http_post(
        &server,
        "/api/broadcast",
        r#"{"messages":[{"topic":"room:1","event":"e","payload":{},"private":true}]}"#,
    )
    .await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test]
async fn rest_broadcast_is_accepted_and_delivered() {
    let db = "bc_rest";
    let _c = setup_db(db, "create table t (id int primary key)").await;
    let server = start(db, &[]).await;
    let mut ws = Client::connect(&server, "2.0.0").await;
    ws.join_ok("alerts", "1", json!({})).await;
    for (i, path) in [
        "/api/broadcast",
        "/realtime/v1/api/broadcast?apikey=test&vsn=2.0.0",
    ]
    .into_iter()
    .enumerate()
    {
        let body = json!({"messages": [
            {"topic": "alerts", "event": "fire", "payload": {"i": i}, "private": false},
            {"topic": "nobody-here", "event": "x", "payload": {}}
        ]});
        let (status, text) = http_post(&server, path, &body.to_string()).await;
        assert_eq!(status, 202, "{path}: {text}");
        let (got, _) = ws.next_broadcast().await;
        assert_eq!(
            got,
            json!({"type": "broadcast", "event": "fire", "payload": {"i": i}})
        );
    }
    for bad in [
        "not json",
        r#"{"messages": "x"}"#,
        r#"{"messages": [{"topic": "", "event": "e"}]}"#,
        r#"{"messages": [{"topic": "alerts", "payload": {}}]}"#,
    ] {
        let (status, text) = http_post(&server, "/api/broadcast", bad).await;
        assert_eq!(status, 400, "{bad}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["error"].is_string(), "{text}");
    }
    ws.assert_quiet("nothing from rejected requests").await;
}
