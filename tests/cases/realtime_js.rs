//! End to end with the real `@supabase/realtime-js` (and supabase-js) against `walcast serve`.

use std::time::Duration;

use serde_json::{json, Value};

use super::ws::{setup_db, start};
use crate::support::js::{is, is_on, JsClient};
use crate::support::walcast::Server;

const T: Duration = Duration::from_secs(20);

async fn client(server: &Server, vsn: &str) -> JsClient {
    let mut js = JsClient::spawn().await;
    js.call(
        json!({
            "cmd": "connect",
            "url": format!("ws://127.0.0.1:{}/realtime/v1", server.port),
            "apikey": "test-key",
            "vsn": vsn,
            "heartbeat_interval_ms": 500,
        }),
        T,
    )
    .await;
    js
}

async fn subscribe(js: &mut JsClient, channel: &str, bindings: Value) -> String {
    js.call(
        json!({"cmd": "subscribe", "channel": channel, "postgres_changes": bindings}),
        T,
    )
    .await;
    js.status(channel, T).await
}

async fn next_change(js: &mut JsClient, channel: &str) -> Value {
    js.wait_for(&format!("a change on {channel}"), T, |v| {
        is_on(v, "postgres_changes", channel)
    })
    .await
}

#[tokio::test]
async fn realtime_js_receives_typed_changes_in_both_versions() {
    let db = "rtjs_basic";
    let c = setup_db(
        db,
        "create table todos (id int primary key, title text, done bool, tags text[], meta jsonb, due timestamptz);
         alter table todos replica identity full;",
    )
    .await;
    let server = start(db, &[]).await;
    for vsn in ["1.0.0", "2.0.0"] {
        let mut js = client(&server, vsn).await;
        let st = subscribe(
            &mut js,
            "room",
            json!([{"event": "*", "schema": "public", "table": "todos"}]),
        )
        .await;
        assert_eq!(st, "SUBSCRIBED", "vsn {vsn}");
        // A heartbeat is answered.
        js.wait_for("a heartbeat reply", T, |v| {
            is(v, "heartbeat") && v["status"] == "ok"
        })
        .await;
        c.batch_execute(
            r#"insert into todos values (1, 'bake', false, '{a,"b c"}', '{"n": 1.50}', '2024-01-02 03:04:05+00');
               update todos set done = true where id = 1;
               delete from todos where id = 1;"#,
        )
        .await
        .unwrap();
        let ins = next_change(&mut js, "room").await["payload"].clone();
        assert_eq!(ins["eventType"], "INSERT");
        assert_eq!(ins["schema"], "public");
        assert_eq!(ins["table"], "todos");
        assert_eq!(
            ins["new"],
            json!({"id": 1, "title": "bake", "done": false, "tags": ["a", "b c"], "meta": {"n": 1.5}, "due": "2024-01-02T03:04:05+00:00"})
        );
        assert_eq!(ins["old"], json!({}));
        assert!(ins["commit_timestamp"].as_str().unwrap().ends_with('Z'));
        let up = next_change(&mut js, "room").await["payload"].clone();
        assert_eq!(up["eventType"], "UPDATE");
        assert_eq!(up["new"]["done"], true);
        assert_eq!(up["old"]["done"], false);
        let del = next_change(&mut js, "room").await["payload"].clone();
        assert_eq!(del["eventType"], "DELETE");
        assert_eq!(del["old"]["title"], "bake");
        assert_eq!(del["new"], json!({}));
        js.exit().await;
    }
}

#[tokio::test]
async fn event_selection_two_channels_and_unsubscribe() {
    let db = "rtjs_events";
    let c = setup_db(
        db,
        "create table t (id int primary key, n int); alter table t replica identity full;",
    )
    .await;
    let server = start(db, &[]).await;
    let mut js = client(&server, "2.0.0").await;
    assert_eq!(
        subscribe(
            &mut js,
            "inserts",
            json!([{"event": "INSERT", "schema": "public", "table": "t"}])
        )
        .await,
        "SUBSCRIBED"
    );
    assert_eq!(
        subscribe(
            &mut js,
            "deletes",
            json!([{"event": "DELETE", "schema": "public", "table": "t"}])
        )
        .await,
        "SUBSCRIBED"
    );
    c.batch_execute("insert into t values (1, 1); update t set n = 2; delete from t;")
        .await
        .unwrap();
    let i = next_change(&mut js, "inserts").await;
    assert_eq!(i["payload"]["eventType"], "INSERT");
    let d = next_change(&mut js, "deletes").await;
    assert_eq!(d["payload"]["eventType"], "DELETE");
    // The fence: a later transaction whose DELETE the "deletes" channel sees.
    c.batch_execute("insert into t values (99, 0); delete from t where id = 99;")
        .await
        .unwrap();
    let row_id = |v: &Value| {
        let p = &v["payload"];
        p["new"]["id"].as_i64().or(p["old"]["id"].as_i64())
    };
    js.expect_none_before(
        "UPDATE, nor a second INSERT or DELETE of row 1",
        |v| is(v, "postgres_changes") && row_id(v) != Some(99),
        "the DELETE of row 99",
        |v| is_on(v, "postgres_changes", "deletes") && row_id(v) == Some(99),
        T,
    )
    .await;
    let i = next_change(&mut js, "inserts").await;
    assert_eq!(i["payload"]["new"]["id"], 99, "{i}");
    // Unsubscribe one channel: the other keeps receiving.
    js.call(json!({"cmd": "unsubscribe", "channel": "inserts"}), T)
        .await;
    c.batch_execute("insert into t values (2, 1); delete from t;")
        .await
        .unwrap();
    let d = next_change(&mut js, "deletes").await;
    assert_eq!(d["payload"]["old"]["id"], 2);
    // The fence: a later DELETE the other channel sees.
    c.batch_execute("insert into t values (3, 1); delete from t;")
        .await
        .unwrap();
    let d = js
        .expect_none_before(
            "INSERT after unsubscribe",
            |v| is_on(v, "postgres_changes", "inserts"),
            "the DELETE of row 3",
            |v| is_on(v, "postgres_changes", "deletes"),
            T,
        )
        .await;
    assert_eq!(d["payload"]["old"]["id"], 3, "{d}");
    js.exit().await;
}

#[tokio::test]
async fn every_filter_operator_selects_the_right_rows() {
    let db = "rtjs_filters";
    let c = setup_db(
        db,
        "create table f (id int primary key, name text, score numeric, at timestamptz, flag bool);
         alter table f replica identity full;",
    )
    .await;
    let server = start(db, &[]).await;
    let mut js = client(&server, "2.0.0").await;
    let cases: Vec<(&str, &str, Vec<i64>)> = vec![
        ("eq", "id=eq.2", vec![2]),
        ("neq", "id=neq.2", vec![1, 3, 4]),
        ("lt", "score=lt.2.5", vec![1]),
        ("lte", "score=lte.2.5", vec![1, 2, 3]),
        ("gt", "at=gt.2024-01-02T00:00:00Z", vec![3, 4]),
        ("gte", "at=gte.2024-01-02T00:00:00+00:00", vec![2, 3, 4]),
        ("in", "name=in.(alpha,\"d,e\")", vec![1, 4]),
        ("is", "flag=is.null", vec![3]),
        ("like", "name=like.%et%", vec![2]),
        ("ilike", "name=ilike.GAM*", vec![3]),
        ("not", "id=not.in.(1,2)", vec![3, 4]),
        ("and", "score=gt.1,flag=is.true", vec![2]),
    ];
    for (ch, filter, _) in &cases {
        let st = subscribe(
            &mut js,
            ch,
            json!([{"event": "INSERT", "schema": "public", "table": "f", "filter": filter}]),
        )
        .await;
        assert_eq!(st, "SUBSCRIBED", "{filter}");
    }
    c.batch_execute(
        "insert into f values
           (1, 'alpha', 1.0, '2024-01-01 00:00:00+00', false),
           (2, 'beta', 2.5, '2024-01-02 00:00:00+00', true),
           (3, 'gamma', 2.50, '2024-01-03 00:00:00+00', null),
           (4, 'd,e', 10, '2024-01-04 00:00:00+00', false)",
    )
    .await
    .unwrap();
    // A marker row every channel... none matches; wait until every expected row arrived.
    for (ch, filter, want) in &cases {
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let v = next_change(&mut js, ch).await;
            got.push(v["payload"]["new"]["id"].as_i64().unwrap());
        }
        got.sort();
        assert_eq!(&got, want, "filter {filter}");
    }
    // The fence: a later row that channel "neq" (id=neq.2) must see.
    c.batch_execute("insert into f values (22, 'zz', 0, '2023-01-01 00:00:00+00', null)")
        .await
        .unwrap();
    js.expect_none_before(
        "rows outside a filter",
        |v| is(v, "postgres_changes") && v["payload"]["new"]["id"] != 22,
        "row 22 on channel neq",
        |v| is_on(v, "postgres_changes", "neq") && v["payload"]["new"]["id"] == 22,
        T,
    )
    .await;
    js.exit().await;
}

#[tokio::test]
async fn a_bad_filter_is_a_channel_error_and_the_socket_keeps_working() {
    let db = "rtjs_badfilter";
    let c = setup_db(db, "create table t (id int primary key);").await;
    let server = start(db, &[]).await;
    let mut js = client(&server, "2.0.0").await;
    js.call(
        json!({"cmd": "subscribe", "channel": "bad", "postgres_changes": [{"event": "*", "schema": "public", "table": "t", "filter": "id=eq.notanumber"}]}),
        T,
    )
    .await;
    let v = js
        .wait_for("a channel error", T, |v| is_on(v, "status", "bad"))
        .await;
    assert_eq!(v["status"], "CHANNEL_ERROR", "{v}");
    assert!(
        v["error"].as_str().unwrap_or_default().contains("filter"),
        "{v}"
    );
    js.call(json!({"cmd": "unsubscribe", "channel": "bad"}), T)
        .await;
    let st = subscribe(
        &mut js,
        "good",
        json!([{"event": "*", "schema": "public", "table": "t"}]),
    )
    .await;
    assert_eq!(st, "SUBSCRIBED");
    c.batch_execute("insert into t values (7)").await.unwrap();
    assert_eq!(
        next_change(&mut js, "good").await["payload"]["new"]["id"],
        7
    );
    js.exit().await;
}

#[tokio::test]
async fn a_thousand_row_transaction_arrives_complete_and_in_order() {
    let db = "rtjs_bulk";
    let c = setup_db(db, "create table b (id int primary key, v text);").await;
    let server = start(db, &[]).await;
    let mut js = client(&server, "2.0.0").await;
    assert_eq!(
        subscribe(
            &mut js,
            "bulk",
            json!([{"event": "INSERT", "schema": "public", "table": "b"}])
        )
        .await,
        "SUBSCRIBED"
    );
    c.batch_execute("insert into b select g, md5(g::text) from generate_series(1, 1000) g")
        .await
        .unwrap();
    let mut ts = None;
    for i in 1..=1000 {
        let v = next_change(&mut js, "bulk").await;
        assert_eq!(v["payload"]["new"]["id"], i);
        let t = v["payload"]["commit_timestamp"].clone();
        assert!(
            ts.is_none() || ts.as_ref() == Some(&t),
            "one commit timestamp"
        );
        ts = Some(t);
    }
    js.exit().await;
}

#[tokio::test]
async fn supabase_js_create_client_channel_works_unchanged() {
    let db = "rtjs_supabase";
    let c = setup_db(db, "create table orders (id int primary key, status text);").await;
    let server: Server = start(db, &[]).await;
    let mut js = JsClient::spawn().await;
    js.call(
        json!({"cmd": "connect_supabase_js", "url": format!("http://127.0.0.1:{}", server.port), "apikey": "anon-key"}),
        T,
    )
    .await;
    assert_eq!(
        subscribe(&mut js, "orders", json!([{"event": "*", "schema": "public", "table": "orders", "filter": "status=eq.confirmed"}])).await,
        "SUBSCRIBED"
    );
    c.batch_execute("insert into orders values (1, 'pending'), (2, 'confirmed')")
        .await
        .unwrap();
    let v = next_change(&mut js, "orders").await;
    assert_eq!(v["payload"]["new"], json!({"id": 2, "status": "confirmed"}));
    js.exit().await;
}
