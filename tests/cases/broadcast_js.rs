//! Broadcast and Presence with the real `@supabase/realtime-js`.

use std::time::Duration;

use serde_json::{json, Value};

use super::ws::{setup_db, start};
use crate::support::js::{is_on, JsClient};
use crate::support::walcast::Server;

const T: Duration = Duration::from_secs(20);
const SQL: &str = include_str!("../../sql/broadcast.sql");

async fn connect(js: &mut JsClient, client: &str, server: &Server, vsn: &str) {
    js.call(
        json!({"cmd": "connect", "client": client, "url": format!("ws://127.0.0.1:{}/realtime/v1", server.port),
               "apikey": "k", "vsn": vsn}),
        T,
    )
    .await;
}

async fn join(
    js: &mut JsClient,
    client: &str,
    channel: &str,
    config: Value,
    presence: bool,
) -> String {
    js.call(
        json!({"cmd": "subscribe", "client": client, "channel": channel, "config": config,
               "broadcast": [{"event": "*"}], "presence": presence}),
        T,
    )
    .await;
    let v = js
        .wait_for("a status", T, |v| {
            v["client"] == client && is_on(v, "status", channel)
        })
        .await;
    v["status"].as_str().unwrap_or_default().to_string()
}

fn is_broadcast_for(v: &Value, client: &str, event: &str) -> bool {
    v["client"] == client && v["ev"] == "broadcast" && v["payload"]["event"] == event
}

#[tokio::test]
async fn realtime_js_broadcast_self_ack_and_mixed_versions() {
    let db = "bjs_broadcast";
    setup_db(db, "create table t (id int primary key);").await;
    let server = start(db, &[]).await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "a", &server, "2.0.0").await;
    connect(&mut js, "b", &server, "1.0.0").await;
    connect(&mut js, "c", &server, "2.0.0").await;
    assert_eq!(
        join(
            &mut js,
            "a",
            "room",
            json!({"broadcast": {"ack": true, "self": false}}),
            false
        )
        .await,
        "SUBSCRIBED"
    );
    assert_eq!(
        join(&mut js, "b", "room", json!({}), false).await,
        "SUBSCRIBED"
    );
    assert_eq!(
        join(
            &mut js,
            "c",
            "room",
            json!({"broadcast": {"self": true}}),
            false
        )
        .await,
        "SUBSCRIBED"
    );

    // A (2.0.0: a binary kind-3 push) → B (1.0.0, JSON) and C (2.0.0); ack says ok; no echo to A.
    let r = js
        .call(json!({"cmd": "send", "client": "a", "channel": "room", "event": "hello", "payload": {"n": 1}}), T)
        .await;
    assert_eq!(r, "ok");
    for who in ["b", "c"] {
        let v = js
            .wait_for(&format!("hello at {who}"), T, |v| {
                is_broadcast_for(v, who, "hello")
            })
            .await;
        assert_eq!(v["payload"]["payload"], json!({"n": 1}), "{who}");
    }
    // C asked for self: it hears its own message.
    js.call(
        json!({"cmd": "send", "client": "c", "channel": "room", "event": "mine", "payload": {}}),
        T,
    )
    .await;
    js.wait_for("C's own message", T, |v| is_broadcast_for(v, "c", "mine"))
        .await;
    // C's message at A is the fence: an echo of A's own hello would have come first.
    js.expect_none_before(
        "echo to the sender",
        |v| is_broadcast_for(v, "a", "hello"),
        "C's message at A",
        |v| is_broadcast_for(v, "a", "mine"),
        T,
    )
    .await;

    // An oversized payload with ack is an error, and nobody receives it.
    let big = "x".repeat(300 * 1024);
    let r = js
        .call(json!({"cmd": "send", "client": "a", "channel": "room", "event": "big", "payload": {"big": big}}), T)
        .await;
    assert_eq!(r, "error");
    // The fence: a later message from C that everyone hears (C asked for self).
    js.call(
        json!({"cmd": "send", "client": "c", "channel": "room", "event": "after", "payload": {}}),
        T,
    )
    .await;
    for who in ["a", "b", "c"] {
        js.expect_none_before(
            &format!("oversized message at {who}"),
            |v| is_broadcast_for(v, who, "big"),
            &format!("C's later message at {who}"),
            |v| is_broadcast_for(v, who, "after"),
            T,
        )
        .await;
    }
    js.exit().await;
}

#[tokio::test]
async fn realtime_js_presence_track_untrack_and_disconnect() {
    let db = "bjs_presence";
    setup_db(db, "create table t (id int primary key);").await;
    let server = start(db, &[]).await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "a", &server, "2.0.0").await;
    connect(&mut js, "b", &server, "1.0.0").await;
    assert_eq!(
        join(
            &mut js,
            "a",
            "lobby",
            json!({"presence": {"key": "alice"}}),
            true
        )
        .await,
        "SUBSCRIBED"
    );
    assert_eq!(
        join(
            &mut js,
            "b",
            "lobby",
            json!({"presence": {"key": "bob"}}),
            true
        )
        .await,
        "SUBSCRIBED"
    );
    assert_eq!(js.call(json!({"cmd": "track", "client": "a", "channel": "lobby", "payload": {"status": "online"}}), T).await, "ok");
    assert_eq!(js.call(json!({"cmd": "track", "client": "b", "channel": "lobby", "payload": {"status": "typing"}}), T).await, "ok");
    // Each sees both.
    for who in ["a", "b"] {
        js.wait_for(&format!("{who} sees alice and bob"), T, |v| {
            v["client"] == who
                && v["ev"] == "presence"
                && v["event"] == "sync"
                && v["state"]["alice"][0]["status"] == "online"
                && v["state"]["bob"][0]["status"] == "typing"
        })
        .await;
    }
    // Untrack is seen as a leave.
    assert_eq!(
        js.call(
            json!({"cmd": "untrack", "client": "b", "channel": "lobby"}),
            T
        )
        .await,
        "ok"
    );
    js.wait_for("a sees bob leave", T, |v| {
        v["client"] == "a" && v["ev"] == "presence" && v["event"] == "leave" && v["key"] == "bob"
    })
    .await;
    // Disconnect is seen too.
    assert_eq!(js.call(json!({"cmd": "track", "client": "b", "channel": "lobby", "payload": {"status": "back"}}), T).await, "ok");
    js.wait_for("a sees bob back", T, |v| {
        v["client"] == "a" && v["ev"] == "presence" && v["event"] == "join" && v["key"] == "bob"
    })
    .await;
    js.call(json!({"cmd": "disconnect", "client": "b"}), T)
        .await;
    js.wait_for("a sees bob gone", T, |v| {
        v["client"] == "a" && v["ev"] == "presence" && v["event"] == "leave" && v["key"] == "bob"
    })
    .await;
    js.exit().await;
}

#[tokio::test]
async fn realtime_js_receives_database_broadcasts_only_on_commit() {
    let db = "bjs_database";
    let c = setup_db(db, "create table t (id int primary key);").await;
    c.batch_execute(SQL).await.unwrap();
    let server = start(db, &[]).await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "a", &server, "2.0.0").await;
    assert_eq!(
        join(&mut js, "a", "orders", json!({}), false).await,
        "SUBSCRIBED"
    );
    c.batch_execute("begin; select walcast.broadcast('orders', 'rolled', '{\"n\": 1}'); rollback;")
        .await
        .unwrap();
    c.batch_execute(
        "begin; select walcast.broadcast('orders', 'committed', '{\"n\": 2}'); commit;",
    )
    .await
    .unwrap();
    let v = js
        .wait_for("the committed broadcast", T, |v| {
            is_broadcast_for(v, "a", "committed")
        })
        .await;
    assert_eq!(v["payload"]["payload"], json!({"n": 2}));
    // The fence: a later committed broadcast; changes arrive in commit order.
    c.batch_execute("select walcast.broadcast('orders', 'fence', '{}')")
        .await
        .unwrap();
    js.expect_none_before(
        "rolled-back broadcast, nor a second copy",
        |v| {
            v["ev"] == "broadcast"
                && (v["payload"]["event"] == "rolled" || is_broadcast_for(v, "a", "committed"))
        },
        "the later broadcast",
        |v| is_broadcast_for(v, "a", "fence"),
        T,
    )
    .await;
    // A private channel without a rule granting it is refused.
    let st = join(&mut js, "a", "secret", json!({"private": true}), false).await;
    assert_eq!(st, "CHANNEL_ERROR");
    js.exit().await;
}
