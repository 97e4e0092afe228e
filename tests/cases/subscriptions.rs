//! Subscriptions that keep a client's view right (issue 17), with the real
//! realtime-js: `select` column lists, moves (rows entering and leaving a
//! filter), and schema changes under live subscriptions.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};

use super::ws::{setup_db, start};
use crate::support::js::{is_on, JsClient};
use crate::support::walcast::Server;

const T: Duration = Duration::from_secs(20);

async fn client(server: &Server) -> JsClient {
    let mut js = JsClient::spawn().await;
    js.call(
        json!({"cmd": "connect", "url": format!("ws://127.0.0.1:{}/realtime/v1", server.port),
               "apikey": "test-key", "vsn": "2.0.0", "heartbeat_interval_ms": 500}),
        T,
    )
    .await;
    js
}

/// Subscribes one binding on `channel`; returns the status and its error text.
async fn subscribe(js: &mut JsClient, channel: &str, binding: Value) -> (String, String) {
    js.call(
        json!({"cmd": "subscribe", "channel": channel, "postgres_changes": [binding]}),
        T,
    )
    .await;
    let v = js
        .wait_for("a status", T, |v| is_on(v, "status", channel))
        .await;
    (
        v["status"].as_str().unwrap_or_default().to_string(),
        v["error"].to_string(),
    )
}

async fn subscribed(js: &mut JsClient, channel: &str, binding: Value) {
    let (st, err) = subscribe(js, channel, binding).await;
    assert_eq!(st, "SUBSCRIBED", "{channel}: {err}");
}

async fn change(js: &mut JsClient, channel: &str) -> Value {
    js.wait_for(&format!("a change on {channel}"), T, |v| {
        is_on(v, "postgres_changes", channel)
    })
    .await["payload"]
        .clone()
}

/// The `system` error of a channel closed by the server, with its code; then
/// realtime-js reports the channel `CLOSED`.
async fn system_error(js: &mut JsClient, channel: &str, code: &str) -> String {
    let v = js
        .wait_for(&format!("a system error on {channel}"), T, |v| {
            is_on(v, "system", channel) && v["payload"]["status"] == "error"
        })
        .await;
    assert_eq!(v["payload"]["code"], code, "{v}");
    assert_eq!(js.status(channel, T).await, "CLOSED");
    v["payload"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn select_lists_carry_exactly_the_selected_columns() {
    let db = "subs_select";
    let c = setup_db(
        db,
        "create table people (id int primary key, first_name text, last_name text, age int);
         alter table people replica identity full;",
    )
    .await;
    let server = start(db, &[]).await;
    let mut js = client(&server).await;
    // The filter names a column outside the list: allowed.
    subscribed(
        &mut js,
        "sel",
        json!({"event": "*", "schema": "public", "table": "people",
               "select": ["id", "first_name"], "filter": "age=gt.17"}),
    )
    .await;
    subscribed(
        &mut js,
        "all",
        json!({"event": "*", "schema": "public", "table": "people"}),
    )
    .await;
    let (st, err) = subscribe(
        &mut js,
        "bad",
        json!({"event": "*", "schema": "public", "table": "people", "select": ["id", "nope"]}),
    )
    .await;
    assert_eq!(st, "CHANNEL_ERROR");
    assert!(err.contains("\\\"nope\\\" does not exist"), "{err}");
    c.batch_execute(
        "insert into people values (1, 'Ada', 'Lovelace', 36);
         update people set last_name = 'King' where id = 1;",
    )
    .await
    .unwrap();
    let ins = change(&mut js, "sel").await;
    assert_eq!(ins["eventType"], "INSERT");
    assert_eq!(ins["new"], json!({"id": 1, "first_name": "Ada"}));
    let upd = change(&mut js, "sel").await;
    assert_eq!(keys(&upd["new"]), set(&["id", "first_name"]));
    assert_eq!(upd["old"], json!({"id": 1, "first_name": "Ada"}));
    // A binding without select on the same socket still gets every column.
    let all = change(&mut js, "all").await;
    assert_eq!(
        keys(&all["new"]),
        set(&["id", "first_name", "last_name", "age"])
    );
    js.exit().await;
}

#[tokio::test]
async fn select_lists_combine_with_rule_column_lists() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let secret = "walcast-subs-select-secret-with-enough-bytes";
    let db = "subs_select_rule";
    let c = setup_db(
        db,
        "create table staff (id int primary key, name text, salary int, team text);",
    )
    .await;
    let config = format!(
        "[auth]\nmode = \"jwt\"\njwt_secret = \"{secret}\"\n\n[[auth.tables]]\nname = \"public.staff\"\n\
         roles = [\"anon\"]\ncolumns = [\"id\", \"name\", \"team\"]\n"
    );
    let path = std::env::temp_dir().join(format!("walcast-{db}-{}.toml", std::process::id()));
    std::fs::write(&path, config).unwrap();
    let server = start(db, &["--config", path.to_str().unwrap()]).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let key = encode(
        &Header::new(Algorithm::HS256),
        &json!({"role": "anon", "exp": exp}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let mut js = JsClient::spawn().await;
    js.call(
        json!({"cmd": "connect", "url": format!("ws://127.0.0.1:{}/realtime/v1", server.port),
               "apikey": key, "vsn": "2.0.0"}),
        T,
    )
    .await;
    subscribed(
        &mut js,
        "sel",
        json!({"event": "INSERT", "schema": "public", "table": "staff", "select": ["id", "team"]}),
    )
    .await;
    // A hidden column cannot be selected; the error does not say whether it exists.
    let (st, err) = subscribe(
        &mut js,
        "hidden",
        json!({"event": "INSERT", "schema": "public", "table": "staff", "select": ["id", "salary"]}),
    )
    .await;
    assert_eq!(st, "CHANNEL_ERROR");
    assert!(
        err.contains("not selectable by the subscribing role"),
        "{err}"
    );
    subscribed(
        &mut js,
        "rule",
        json!({"event": "INSERT", "schema": "public", "table": "staff"}),
    )
    .await;
    c.batch_execute("insert into staff values (1, 'Bo', 9000, 'ops')")
        .await
        .unwrap();
    assert_eq!(
        change(&mut js, "sel").await["new"],
        json!({"id": 1, "team": "ops"})
    );
    assert_eq!(
        keys(&change(&mut js, "rule").await["new"]),
        set(&["id", "name", "team"])
    );
    js.exit().await;
}

/// splitmix64, seeded: the same sequence on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

/// Applies a channel's events to a local list of rows by id.
fn apply(list: &mut BTreeMap<i64, Value>, ev: &Value) {
    let p = &ev["payload"];
    match p["eventType"].as_str().unwrap() {
        "INSERT" | "UPDATE" => {
            list.insert(p["new"]["id"].as_i64().unwrap(), p["new"].clone());
        }
        "DELETE" => {
            list.remove(&p["old"]["id"].as_i64().unwrap());
        }
        other => panic!("unexpected {other}"),
    }
}

#[tokio::test]
async fn moves_keep_each_local_list_equal_to_the_query() {
    let db = "subs_moves";
    let c = setup_db(
        db,
        "create table orders (id int primary key, status text, total int);
         alter table orders replica identity full;",
    )
    .await;
    // Rows exist before the clients join; their lists start from a query.
    let statuses = ["new", "confirmed", "baked", "shipped"];
    let mut model: BTreeMap<i64, (String, i64)> = BTreeMap::new();
    let mut rng = Rng(17);
    for id in 1..=12 {
        let st = statuses[rng.below(4) as usize].to_string();
        let total = rng.below(200) as i64;
        c.execute(
            "insert into orders values ($1, $2, $3)",
            &[&(id as i32), &st, &(total as i32)],
        )
        .await
        .unwrap();
        model.insert(id, (st, total));
    }
    let server = start(db, &[]).await;
    let mut js = client(&server).await;
    let filters = [
        ("confirmed", "status=eq.confirmed", true),
        ("big", "total=gt.100", true),
        ("either", "status=in.(new,baked)", true),
        ("plain", "status=eq.confirmed", false),
    ];
    let mut lists: BTreeMap<&str, BTreeMap<i64, Value>> = BTreeMap::new();
    for (name, filter, moves) in filters {
        subscribed(
            &mut js,
            name,
            json!({"event": "*", "schema": "public", "table": "orders", "filter": filter,
                   "moves": moves}),
        )
        .await;
        let rows = c
            .query(
                &format!(
                    "select id from orders where {}",
                    match name {
                        "big" => "total > 100",
                        "either" => "status in ('new', 'baked')",
                        _ => "status = 'confirmed'",
                    }
                ),
                &[],
            )
            .await
            .unwrap();
        lists.insert(
            name,
            rows.iter()
                .map(|r| (i64::from(r.get::<_, i32>(0)), Value::Null))
                .collect(),
        );
    }
    let confirmed = |m: &(String, i64)| m.0 == "confirmed";
    let mut plain_updates = 0;
    for _ in 0..60 {
        let id = 1 + rng.below(12) as i64;
        let st = statuses[rng.below(4) as usize].to_string();
        let total = rng.below(200) as i64;
        c.execute(
            "update orders set status = $2, total = $3 where id = $1",
            &[&(id as i32), &st, &(total as i32)],
        )
        .await
        .unwrap();
        let m = (st, total);
        if confirmed(&m) {
            plain_updates += 1;
        }
        model.insert(id, m);
    }
    // A delete and a truncate-free fence: a row that matches every filter.
    c.batch_execute(
        "delete from orders where id = 3;
         insert into orders values (100, 'confirmed', 150);
         insert into orders values (101, 'new', 150);",
    )
    .await
    .unwrap();
    if model.remove(&3).is_some_and(|m| confirmed(&m)) {
        plain_updates += 1;
    }
    for (name, _, _) in filters {
        let list = lists.get_mut(name).unwrap();
        // The last insert each channel sees.
        let fence = if matches!(name, "big" | "either") {
            101
        } else {
            100
        };
        let mut n = 0;
        loop {
            let ev = js
                .wait_for(&format!("changes on {name}"), T, |v| {
                    is_on(v, "postgres_changes", name)
                })
                .await;
            if name == "plain" {
                // Supabase's behaviour: updates matched on the new row only.
                let t = ev["payload"]["eventType"].as_str().unwrap().to_string();
                if t == "UPDATE" || t == "DELETE" {
                    n += 1;
                }
            }
            let done = ev["payload"]["new"]["id"] == json!(fence);
            apply(list, &ev);
            if done {
                break;
            }
        }
        if name == "plain" {
            assert_eq!(
                n, plain_updates,
                "moves off: one event per update into the filter"
            );
            continue;
        }
        let want = c
            .query(
                &format!(
                    "select id from orders where {} order by id",
                    match name {
                        "big" => "total > 100",
                        "either" => "status in ('new', 'baked')",
                        _ => "status = 'confirmed'",
                    }
                ),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| i64::from(r.get::<_, i32>(0)))
            .collect::<Vec<_>>();
        let got: Vec<i64> = list.keys().copied().collect();
        assert_eq!(got, want, "channel {name}: local list vs the query");
    }
    js.exit().await;
}

#[tokio::test]
async fn add_column_joins_at_once_and_drop_column_closes_its_filters() {
    let db = "subs_add_drop";
    let c = setup_db(
        db,
        "create table items (id int primary key, name text, colour text);",
    )
    .await;
    let server = start(db, &[]).await;
    let mut js = client(&server).await;
    subscribed(
        &mut js,
        "colour",
        json!({"event": "INSERT", "schema": "public", "table": "items", "filter": "colour=eq.red"}),
    )
    .await;
    subscribed(
        &mut js,
        "other",
        json!({"event": "INSERT", "schema": "public", "table": "items", "filter": "name=eq.pen"}),
    )
    .await;
    // ADD COLUMN: a join filtering on the new column succeeds without a restart.
    c.batch_execute("alter table items add column size int")
        .await
        .unwrap();
    subscribed(
        &mut js,
        "size",
        json!({"event": "INSERT", "schema": "public", "table": "items", "filter": "size=gt.3"}),
    )
    .await;
    c.batch_execute("insert into items values (1, 'pen', 'red', 5)")
        .await
        .unwrap();
    assert_eq!(change(&mut js, "size").await["new"]["size"], 5);
    assert_eq!(change(&mut js, "colour").await["new"]["id"], 1);
    assert_eq!(change(&mut js, "other").await["new"]["id"], 1);
    // DROP COLUMN under a live filter on it: that channel is told and closed.
    c.batch_execute(
        "alter table items drop column colour;
         insert into items values (2, 'pen', 7);",
    )
    .await
    .unwrap();
    let msg = system_error(&mut js, "colour", "TABLE_CHANGED").await;
    assert!(msg.contains("\"colour\""), "{msg}");
    // The others go on: the insert that brought the new shape reaches them.
    assert_eq!(change(&mut js, "other").await["new"]["id"], 2);
    assert_eq!(change(&mut js, "size").await["new"]["id"], 2);
    c.batch_execute("insert into items values (3, 'pen', 9)")
        .await
        .unwrap();
    // Row 3 on "other" is the fence: nothing on the closed channel before it.
    let fence = js
        .expect_none_before(
            "change on the closed channel",
            |v| is_on(v, "postgres_changes", "colour"),
            "row 3 on channel other",
            |v| is_on(v, "postgres_changes", "other"),
            T,
        )
        .await;
    assert_eq!(fence["payload"]["new"]["id"], 3, "{fence}");
    js.exit().await;
}

#[tokio::test]
async fn alter_type_retypes_live_filters_or_closes_them() {
    let db = "subs_alter_type";
    let c = setup_db(
        db,
        "create table parts (id int primary key, code int, flag int);",
    )
    .await;
    let server = start(db, &[]).await;
    let mut js = client(&server).await;
    subscribed(
        &mut js,
        "code",
        json!({"event": "INSERT", "schema": "public", "table": "parts", "filter": "code=eq.5"}),
    )
    .await;
    subscribed(
        &mut js,
        "flag",
        json!({"event": "INSERT", "schema": "public", "table": "parts", "filter": "flag=eq.7"}),
    )
    .await;
    c.batch_execute(
        "alter table parts alter column code type text;
         alter table parts alter column flag type bool using flag <> 0;",
    )
    .await
    .unwrap();
    // A new join is checked against the new type at once (like needs text).
    subscribed(
        &mut js,
        "like",
        json!({"event": "INSERT", "schema": "public", "table": "parts", "filter": "code=like.5*"}),
    )
    .await;
    c.batch_execute("insert into parts values (1, '5', true)")
        .await
        .unwrap();
    // Re-typed: 5 is a valid text literal.
    assert_eq!(change(&mut js, "code").await["new"]["code"], "5");
    assert_eq!(change(&mut js, "like").await["new"]["id"], 1);
    // 7 is no bool: closed with the reason.
    let msg = system_error(&mut js, "flag", "TABLE_CHANGED").await;
    assert!(msg.contains("bool"), "{msg}");
    js.exit().await;
}

#[tokio::test]
async fn drop_table_is_announced_and_a_new_table_of_the_same_name_is_joined() {
    let db = "subs_drop_table";
    let c = setup_db(db, "create table notes (id int primary key, body text);").await;
    let server = start(db, &[]).await;
    let mut js = client(&server).await;
    subscribed(
        &mut js,
        "old",
        json!({"event": "*", "schema": "public", "table": "notes"}),
    )
    .await;
    c.batch_execute("insert into notes values (1, 'a')")
        .await
        .unwrap();
    assert_eq!(change(&mut js, "old").await["new"]["id"], 1);
    // DROP + CREATE of the same name (the publication is FOR ALL TABLES).
    c.batch_execute(
        "drop table notes;
         create table notes (id int primary key, body text, pinned bool);",
    )
    .await
    .unwrap();
    let msg = system_error(&mut js, "old", "TABLE_UNPUBLISHED").await;
    assert!(msg.contains("public.notes is no longer published"), "{msg}");
    subscribed(
        &mut js,
        "new",
        json!({"event": "*", "schema": "public", "table": "notes", "filter": "pinned=is.true"}),
    )
    .await;
    c.batch_execute("insert into notes values (2, 'b', true)")
        .await
        .unwrap();
    assert_eq!(change(&mut js, "new").await["new"]["id"], 2);
    js.exit().await;
}

#[tokio::test]
async fn moves_without_full_identity_say_so_and_fall_back() {
    let db = "subs_moves_fallback";
    let c = setup_db(db, "create table tasks (id int primary key, state text);").await;
    c.batch_execute("insert into tasks values (1, 'open')")
        .await
        .unwrap();
    let server = start(db, &[]).await;
    let mut js = JsClient::spawn().await;
    js.call(
        json!({"cmd": "connect", "url": format!("ws://127.0.0.1:{}/realtime/v1", server.port),
               "apikey": "test-key", "vsn": "2.0.0", "trace_frames": true}),
        T,
    )
    .await;
    subscribed(
        &mut js,
        "open",
        json!({"event": "*", "schema": "public", "table": "tasks", "filter": "state=eq.open",
               "moves": true}),
    )
    .await;
    let reply = js
        .wait_for("the join reply", T, |v| {
            v["ev"] == "frame"
                && v["dir"] == "in"
                && v["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("phx_reply") && t.contains("moves_unavailable"))
        })
        .await;
    assert!(
        reply["text"]
            .as_str()
            .unwrap()
            .contains("REPLICA IDENTITY FULL"),
        "{reply}"
    );
    // Supabase's behaviour: the row leaving the filter is not announced; the
    // next row entering it is (the fence).
    c.batch_execute(
        "update tasks set state = 'done' where id = 1;
         insert into tasks values (2, 'open');",
    )
    .await
    .unwrap();
    let ev = change(&mut js, "open").await;
    assert_eq!(ev["eventType"], "INSERT", "{ev}");
    assert_eq!(ev["new"]["id"], 2);
    js.exit().await;
}
