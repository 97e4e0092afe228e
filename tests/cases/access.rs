//! Access rules on every path (issue 14), with the real realtime-js / supabase-js:
//! private channels re-judged on refresh, presence rights and visibility, several
//! rules per table, a join before the user's token, uniform refusals, and the HTTP
//! side (CORS, 404, bearer scheme).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::cluster;
use crate::support::js::{is, is_on, JsClient};
use crate::support::setup_db;
use crate::support::walcast::{serve_db_with_config as start_with, Server};

const T: Duration = Duration::from_secs(20);
const SECRET: &str = "walcast-access-test-secret-with-enough-bytes";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn token(role: &str, sub: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"role": role, "sub": sub, "exp": now() + 3600}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A project key as Supabase's anon key is: a role, no user (`sub`).
fn apikey(role: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"role": role, "exp": now() + 3600}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn auth(rest: &str) -> String {
    format!("[auth]\nmode = \"jwt\"\njwt_secret = \"{SECRET}\"\n\n{rest}")
}

async fn connect(js: &mut JsClient, client: &str, server: &Server, apikey: &str) {
    js.call(
        json!({"cmd": "connect", "client": client, "url": format!("ws://127.0.0.1:{}/realtime/v1", server.port),
               "apikey": apikey, "vsn": "2.0.0"}),
        T,
    )
    .await;
}

/// Subscribes and returns the first status event.
async fn subscribe(js: &mut JsClient, client: &str, channel: &str, extra: Value) -> Value {
    let mut cmd = json!({"cmd": "subscribe", "client": client, "channel": channel});
    for (k, v) in extra.as_object().unwrap() {
        cmd[k] = v.clone();
    }
    js.call(cmd, T).await;
    js.wait_for("a status", T, |v| {
        v["client"] == client && is_on(v, "status", channel)
    })
    .await
}

async fn join_private(js: &mut JsClient, client: &str, channel: &str, config: Value) {
    let mut config = config;
    config["private"] = json!(true);
    let st = subscribe(
        js,
        client,
        channel,
        json!({"config": config, "broadcast": [{"event": "*"}], "presence": true}),
    )
    .await;
    assert_eq!(st["status"], "SUBSCRIBED", "{client} on {channel}: {st}");
}

fn is_broadcast(v: &Value, client: &str, event: &str) -> bool {
    v["client"] == client && is(v, "broadcast") && v["payload"]["event"] == event
}

async fn send(js: &mut JsClient, client: &str, channel: &str, event: &str) -> Value {
    js.call(
        json!({"cmd": "send", "client": client, "channel": channel, "event": event, "payload": {"e": event}}),
        T,
    )
    .await
}

#[tokio::test]
async fn a_refresh_rejudges_private_channels() {
    let db = "acc_private_refresh";
    setup_db(db, "create table t (id int primary key);").await;
    let server = start_with(
        db,
        &auth(
            r#"
[[channels]]
topic = "user:*"
read_roles = ["authenticated"]
write_roles = ["authenticated"]
match_claim = "sub"

[[channels]]
topic = "room:*"
read_roles = ["authenticated", "anon"]
write_roles = ["authenticated"]
"#,
        ),
    )
    .await;
    let alice = token("authenticated", "alice");
    let mut js = JsClient::spawn().await;
    for c in ["a", "w", "f", "d", "r"] {
        connect(&mut js, c, &server, &alice).await;
    }
    let ack = json!({"broadcast": {"ack": true}});
    join_private(&mut js, "a", "user:alice", json!({})).await;
    join_private(&mut js, "w", "user:alice", ack.clone()).await;
    join_private(&mut js, "f", "user:alice", json!({})).await;
    assert_eq!(send(&mut js, "w", "user:alice", "one").await, "ok");
    js.wait_for("alice's first broadcast", T, |v| {
        is_broadcast(v, "a", "one")
    })
    .await;

    // Refreshing to bob's token: alice's channel is closed with a system error.
    js.call(
        json!({"cmd": "set_auth", "client": "a", "token": token("authenticated", "bob")}),
        T,
    )
    .await;
    let sys = js
        .wait_for("the system error on a", T, |v| {
            v["client"] == "a" && is_on(v, "system", "user:alice")
        })
        .await;
    assert_eq!(sys["payload"]["status"], "error", "{sys}");
    assert!(
        sys["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("no longer have access"),
        "{sys}"
    );
    assert_eq!(send(&mut js, "w", "user:alice", "two").await, "ok");
    js.wait_for("the fence: f gets two", T, |v| is_broadcast(v, "f", "two"))
        .await;
    js.expect_none(
        "alice's broadcast on a socket refreshed to bob",
        Duration::from_millis(300),
        |v| is_broadcast(v, "a", "two"),
    )
    .await;

    // A writer downgraded to anon may still read room:1, but no longer write.
    let mut d_config = ack.clone();
    d_config["presence"] = json!({"key": "writer-d"});
    join_private(&mut js, "d", "room:1", d_config).await;
    join_private(&mut js, "r", "room:1", json!({})).await;
    join_private(&mut js, "w", "room:1", ack.clone()).await;
    assert_eq!(
        js.call(
            json!({"cmd": "track", "client": "d", "channel": "room:1", "payload": {"on": 1}}),
            T
        )
        .await,
        "ok"
    );
    js.wait_for("d's presence at r", T, |v| {
        v["client"] == "r" && is(v, "presence") && v["event"] == "join" && v["key"] == "writer-d"
    })
    .await;
    assert_eq!(send(&mut js, "d", "room:1", "before").await, "ok");
    js.wait_for("before", T, |v| is_broadcast(v, "r", "before"))
        .await;
    js.call(
        json!({"cmd": "set_auth", "client": "d", "token": token("anon", "x")}),
        T,
    )
    .await;
    assert_eq!(send(&mut js, "d", "room:1", "after").await, "error");
    // Its presence goes (tracking is a write), and it cannot track again.
    js.wait_for("d's presence leaves r", T, |v| {
        v["client"] == "r" && is(v, "presence") && v["event"] == "leave" && v["key"] == "writer-d"
    })
    .await;
    assert_eq!(
        js.call(
            json!({"cmd": "track", "client": "d", "channel": "room:1", "payload": {"on": 2}}),
            T
        )
        .await,
        "error"
    );
    assert_eq!(send(&mut js, "w", "room:1", "fence").await, "ok");
    js.expect_none_before(
        "broadcast from a writer downgraded to anon",
        |v| is_broadcast(v, "r", "after"),
        "the fence on r",
        |v| is_broadcast(v, "r", "fence"),
        T,
    )
    .await;
    js.wait_for("the fence on the downgraded reader", T, |v| {
        is_broadcast(v, "d", "fence")
    })
    .await;
    // The same token over REST is refused too (403), as before.
    let (status, _, _) = http(
        &server,
        &format!(
            "POST /api/broadcast HTTP/1.1\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n",
            token("anon", "x")
        ),
        r#"{"messages":[{"topic":"room:1","event":"e","private":true}]}"#,
    )
    .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn presence_needs_write_rights_and_customers_see_only_staff() {
    let db = "acc_presence";
    setup_db(db, "create table t (id int primary key);").await;
    let server = start_with(
        db,
        &auth(
            r#"
[[channels]]
topic = "support:*"
read_roles = ["staff", "customer", "viewer"]
write_roles = ["staff", "customer"]
presence_sees = { staff = ["*"], customer = ["staff"] }
"#,
        ),
    )
    .await;
    let mut js = JsClient::spawn().await;
    let people = [
        ("v", "viewer"),
        ("s1", "staff"),
        ("c1", "customer"),
        ("c2", "customer"),
        ("s2", "staff"),
    ];
    for (name, role) in people {
        connect(&mut js, name, &server, &token(role, name)).await;
    }
    for (name, _) in &people[..4] {
        join_private(
            &mut js,
            name,
            "support:1",
            json!({"presence": {"key": name}}),
        )
        .await;
    }
    let track = |c: &str| json!({"cmd": "track", "client": c, "channel": "support:1", "payload": {"who": c, "pad": "x".repeat(5000)}});
    assert_eq!(
        js.call(track("v"), T).await,
        "error",
        "a read-only member tracked"
    );
    for c in ["s1", "c1", "c2"] {
        assert_eq!(js.call(track(c), T).await, "ok", "{c}");
    }
    js.wait_for("staff sees both customers", T, |v| {
        v["client"] == "s1"
            && is(v, "presence")
            && ["s1", "c1", "c2"]
                .iter()
                .all(|k| v["state"].get(*k).is_some())
    })
    .await;
    // A later staff member's arrival fences what c1 was sent before it.
    join_private(
        &mut js,
        "s2",
        "support:1",
        json!({"presence": {"key": "s2"}}),
    )
    .await;
    assert_eq!(js.call(track("s2"), T).await, "ok");
    js.wait_for("c1 sees the second staff member", T, |v| {
        v["client"] == "c1" && is(v, "presence") && v["event"] == "join" && v["key"] == "s2"
    })
    .await;
    let keys = |state: &Value| -> BTreeSet<String> {
        state.as_object().unwrap().keys().cloned().collect()
    };
    let c1 = js
        .call(
            json!({"cmd": "presence_state", "client": "c1", "channel": "support:1"}),
            T,
        )
        .await;
    assert_eq!(
        keys(&c1),
        BTreeSet::from(["c1".into(), "s1".into(), "s2".into()])
    );
    let s1 = js
        .call(
            json!({"cmd": "presence_state", "client": "s1", "channel": "support:1"}),
            T,
        )
        .await;
    assert_eq!(
        keys(&s1),
        BTreeSet::from(["c1".into(), "c2".into(), "s1".into(), "s2".into()])
    );
    // c2 leaves: staff see it go, c1 never hears of c2 at all.
    js.call(
        json!({"cmd": "unsubscribe", "client": "c2", "channel": "support:1"}),
        T,
    )
    .await;
    js.wait_for("s1 sees c2 leave", T, |v| {
        v["client"] == "s1" && is(v, "presence") && v["event"] == "leave" && v["key"] == "c2"
    })
    .await;
    js.call(
        json!({"cmd": "untrack", "client": "s2", "channel": "support:1"}),
        T,
    )
    .await;
    // s2's untrack at c1 is the fence: c2's presence would have come first.
    js.expect_none_before(
        "c2's presence at c1",
        |v| v["client"] == "c1" && is(v, "presence") && v["key"] == "c2",
        "c1 seeing s2 untrack",
        |v| v["client"] == "c1" && is(v, "presence") && v["event"] == "leave" && v["key"] == "s2",
        T,
    )
    .await;
}

#[tokio::test]
async fn several_rules_per_table_never_leak() {
    let db = "acc_multi_rule";
    let c = setup_db(
        db,
        "create table sales (id int primary key, rep_id text not null, amount int, margin int);
         alter table sales replica identity full;",
    )
    .await;
    let rules = r#"
[[auth.tables]]
name = "public.sales"
roles = ["manager"]

[[auth.tables]]
name = "public.sales"
roles = ["rep"]
row_filter = "rep_id=eq.{claims.sub}"
columns = ["id", "rep_id", "amount"]
"#;
    // Two rules that can match the same role are a config error naming both.
    let overlapping = auth(
        r#"
[[auth.tables]]
name = "public.sales"
roles = ["manager", "rep"]

[[auth.tables]]
name = "public.sales"
roles = ["rep"]
"#,
    );
    let (ok, out, err) = crate::support::walcast::run(
        &[
            "check-config",
            crate::support::config_file("acc_multi_rule_bad", &overlapping)
                .to_str()
                .unwrap(),
        ],
        T,
    )
    .await;
    assert!(!ok, "check-config accepted overlapping rules: {out}");
    assert!(
        err.contains("auth.tables[0] and auth.tables[1]") && err.contains("\"rep\""),
        "{err}"
    );
    let (ok, out, err) = crate::support::walcast::run(
        &[
            "check-config",
            crate::support::config_file("acc_multi_rule_ok", &auth(rules))
                .to_str()
                .unwrap(),
        ],
        T,
    )
    .await;
    assert!(ok, "{out}{err}");

    let server = start_with(db, &auth(rules)).await;
    let reps: Vec<String> = (1..=3).map(|i| format!("rep{i}")).collect();
    let mut js = JsClient::spawn().await;
    let binding =
        json!({"postgres_changes": [{"event": "*", "schema": "public", "table": "sales"}]});
    let mut clients = vec![("boss".to_string(), "manager")];
    clients.extend(reps.iter().map(|r| (r.clone(), "rep")));
    for (name, role) in &clients {
        connect(&mut js, name, &server, &token(role, name)).await;
        let st = subscribe(&mut js, name, "sales", binding.clone()).await;
        assert_eq!(st["status"], "SUBSCRIBED", "{name}: {st}");
    }
    // A rep may not filter on the hidden margin; the manager may.
    let probe = json!({"postgres_changes": [{"event": "*", "schema": "public", "table": "sales", "filter": "margin=gt.0"}]});
    let st = subscribe(&mut js, "rep1", "probe", probe.clone()).await;
    assert_eq!(st["status"], "CHANNEL_ERROR", "{st}");
    let st = subscribe(&mut js, "boss", "probe", probe).await;
    assert_eq!(st["status"], "SUBSCRIBED", "{st}");

    let mut seed: u64 = 0x0dd5_a1e5;
    let mut rnd = |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let mut expected: HashMap<String, Vec<(String, i32)>> = HashMap::new();
    let mut all: Vec<(String, i32)> = Vec::new();
    let mut live: Vec<i32> = Vec::new();
    let mut next_id = 1;
    for _ in 0..120 {
        let op = if live.is_empty() { 0 } else { rnd(4) };
        let (kind, id, owner) = match op {
            0 => {
                let owner = reps[rnd(3) as usize].clone();
                let id = next_id;
                next_id += 1;
                c.execute(
                    "insert into sales values ($1, $2, $3, 4242)",
                    &[&id, &owner, &(rnd(100) as i32)],
                )
                .await
                .unwrap();
                live.push(id);
                ("INSERT", id, owner)
            }
            1 | 2 => {
                let id = live[rnd(live.len() as u64) as usize];
                let new_owner = (op == 2).then(|| reps[rnd(3) as usize].clone());
                let row = c
                    .query_one(
                        "update sales set amount = amount + 1, rep_id = coalesce($2, rep_id) where id = $1 returning rep_id",
                        &[&id, &new_owner],
                    )
                    .await
                    .unwrap();
                ("UPDATE", id, row.get(0))
            }
            _ => {
                let id = live.swap_remove(rnd(live.len() as u64) as usize);
                let row = c
                    .query_one("delete from sales where id = $1 returning rep_id", &[&id])
                    .await
                    .unwrap();
                ("DELETE", id, row.get(0))
            }
        };
        expected
            .entry(owner)
            .or_default()
            .push((kind.to_string(), id));
        all.push((kind.to_string(), id));
    }
    expected.insert("boss".into(), all);
    let mut total = 0;
    for (name, role) in &clients {
        for (kind, id) in expected.remove(name).unwrap_or_default() {
            let v = js
                .wait_for(&format!("{kind} {id} for {name}"), T, |v| {
                    v["client"] == name.as_str() && is_on(v, "postgres_changes", "sales")
                })
                .await;
            let p = &v["payload"];
            let got = p["new"]["id"].as_i64().or(p["old"]["id"].as_i64());
            assert_eq!(
                (p["eventType"].as_str().unwrap(), got),
                (kind.as_str(), Some(id as i64)),
                "{name} got {p}"
            );
            for side in ["new", "old"] {
                let Some(row) = p[side].as_object().filter(|o| !o.is_empty()) else {
                    continue;
                };
                if *role == "manager" {
                    assert_eq!(row.get("margin"), Some(&json!(4242)), "{p}");
                } else {
                    assert!(!row.contains_key("margin"), "{name} saw the margin: {p}");
                    assert_eq!(
                        row["rep_id"],
                        name.as_str(),
                        "{name} saw another rep's row: {p}"
                    );
                }
            }
            total += 1;
        }
    }
    js.expect_none(
        "any change beyond the oracle's",
        Duration::from_millis(500),
        |v| is_on(v, "postgres_changes", "sales"),
    )
    .await;
    assert!(total > 200, "the workload produced {total} deliveries");
}

#[tokio::test]
async fn a_join_before_the_users_token_loses_nothing() {
    let db = "acc_late_token";
    let c = setup_db(
        db,
        "create table orders (id int primary key, customer_id text not null);",
    )
    .await;
    let server = start_with(
        db,
        &auth(
            r#"
[[auth.tables]]
name = "public.orders"
roles = ["authenticated"]
row_filter = "customer_id=eq.{claims.sub}"
"#,
        ),
    )
    .await;
    let mut js = JsClient::spawn().await;
    // supabase-js with the accessToken option: the callback resolves only later.
    js.call(
        json!({"cmd": "connect_supabase_js", "url": format!("http://127.0.0.1:{}", server.port),
               "apikey": apikey("anon"), "access_token_deferred": true}),
        T,
    )
    .await;
    // A join that can never succeed is still refused.
    let bad = json!({"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "orders", "filter": "id=zz.1"}]});
    let st = subscribe(&mut js, "main", "bad", bad).await;
    assert_eq!(st["status"], "CHANNEL_ERROR", "{st}");
    let st = subscribe(
        &mut js,
        "main",
        "o",
        json!({"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "orders"}]}),
    )
    .await;
    assert_eq!(st["status"], "SUBSCRIBED", "{st}");
    let sys = js
        .wait_for("the pending system message", T, |v| is_on(v, "system", "o"))
        .await;
    assert_eq!(sys["payload"]["status"], "pending", "{sys}");
    assert!(
        sys["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("public.orders"),
        "{sys}"
    );
    // A row routed before the token arrives is not delivered: fenced by a
    // service_role subscriber that gets it from the same routing step.
    connect(&mut js, "svc", &server, &token("service_role", "svc")).await;
    let st = subscribe(
        &mut js,
        "svc",
        "all",
        json!({"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "orders"}]}),
    )
    .await;
    assert_eq!(st["status"], "SUBSCRIBED", "{st}");
    c.batch_execute("insert into orders values (1, 'alice')")
        .await
        .unwrap();
    js.wait_for("row 1 at the service role", T, |v| {
        v["client"] == "svc" && is_on(v, "postgres_changes", "all")
    })
    .await;

    // Rows keep coming while the token arrives.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let w = cluster().client(db).await;
        tokio::spawn(async move {
            let mut id = 1000;
            while !stop.load(Ordering::Relaxed) {
                w.execute("insert into orders values ($1, 'alice')", &[&id])
                    .await
                    .unwrap();
                id += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            id - 1
        })
    };
    // The grant lands in the middle of the stream: rows are committing already.
    crate::support::wait_for("the writer to get going", T, || async {
        let n: i32 = c
            .query_one("select max(id) from orders", &[])
            .await
            .unwrap()
            .get(0);
        (n >= 1005).then_some(())
    })
    .await;
    js.call(
        json!({"cmd": "resolve_token", "token": token("authenticated", "alice")}),
        T,
    )
    .await;
    let granted = js
        .wait_for("the subscribed system message", T, |v| {
            is_on(v, "system", "o") && v["payload"]["status"] == "ok"
        })
        .await;
    assert!(
        granted.to_string().contains("Subscribed to PostgreSQL"),
        "{granted}"
    );
    let committed_before: i32 = c
        .query_one("select max(id) from orders", &[])
        .await
        .unwrap()
        .get(0);
    // Let some rows commit after the grant, then stop.
    let target = committed_before + 20;
    crate::support::wait_for("rows after the grant", T, || async {
        let n: i32 = c
            .query_one("select max(id) from orders", &[])
            .await
            .unwrap()
            .get(0);
        (n >= target).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let last = writer.await.unwrap();
    let mut got = Vec::new();
    while got.last() != Some(&last) {
        let v = js
            .wait_for(&format!("row {last}"), T, |v| {
                v["client"] == "main" && is_on(v, "postgres_changes", "o")
            })
            .await;
        got.push(v["payload"]["new"]["id"].as_i64().unwrap() as i32);
    }
    assert!(!got.contains(&1), "a row from before the token: {got:?}");
    let first = got[0];
    assert!(
        first <= committed_before + 1,
        "rows committed after the grant were lost: first {first}, grant seen at {committed_before}"
    );
    assert_eq!(
        got,
        (first..=last).collect::<Vec<_>>(),
        "a gap or a duplicate"
    );
    let statuses: Vec<Value> = js
        .drain()
        .into_iter()
        .filter(|v| v["client"] == "main" && is_on(v, "status", "o"))
        .collect();
    assert!(statuses.is_empty(), "the channel rejoined: {statuses:?}");
}

#[tokio::test]
async fn refusals_do_not_tell_tables_or_hidden_columns_apart() {
    let db = "acc_uniform";
    let c = cluster().new_db(db).await;
    c.batch_execute(
        "create table invoices (id int primary key, customer_id text, amount int, secret_note text);
         create table unruled (id int primary key);
         create table staff_only (id int primary key);
         create table unpublished (id int primary key);
         create publication pub_acc_uniform for table invoices, unruled, staff_only;",
    )
    .await
    .unwrap();
    let server = start_with(
        db,
        &auth(
            r#"
[[auth.tables]]
name = "public.invoices"
roles = ["authenticated"]
row_filter = "customer_id=eq.{claims.sub}"
columns = ["id", "customer_id", "amount"]

[[auth.tables]]
name = "public.staff_only"
roles = ["staff"]
"#,
        ),
    )
    .await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "main", &server, &apikey("anon")).await;
    // The user's token in the join: refusals are final, not pending.
    js.call(
        json!({"cmd": "set_auth", "token": token("authenticated", "c1")}),
        T,
    )
    .await;
    let refusal = |st: Value, name: &str| -> String {
        assert_eq!(st["status"], "CHANNEL_ERROR", "{name}: {st}");
        st["cause"]["reason"]
            .as_str()
            .unwrap_or_else(|| panic!("{st}"))
            .replace(name, "<name>")
    };
    let mut tables = Vec::new();
    for table in ["no_such_table", "unpublished", "unruled", "staff_only"] {
        let st = subscribe(
            &mut js,
            "main",
            table,
            json!({"postgres_changes": [{"event": "*", "schema": "public", "table": table}]}),
        )
        .await;
        tables.push(refusal(st, table));
    }
    assert!(
        tables.iter().all(|r| r == &tables[0]),
        "refusals differ: {tables:#?}"
    );
    // With only the project's apikey (the user's token still to come) every such
    // join is accepted alike and waits: nothing tells the tables apart either.
    connect(&mut js, "k", &server, &apikey("anon")).await;
    for table in ["no_such_table", "unpublished", "unruled"] {
        let st = subscribe(
            &mut js,
            "k",
            table,
            json!({"postgres_changes": [{"event": "*", "schema": "public", "table": table}]}),
        )
        .await;
        assert_eq!(st["status"], "SUBSCRIBED", "{st}");
        let sys = js
            .wait_for("a pending message", T, |v| {
                v["client"] == "k" && is_on(v, "system", table)
            })
            .await;
        assert_eq!(sys["payload"]["status"], "pending", "{sys}");
    }
    let mut columns = Vec::new();
    for col in ["secret_note", "no_such_column"] {
        let st = subscribe(
            &mut js,
            "main",
            col,
            json!({"postgres_changes": [{"event": "*", "schema": "public", "table": "invoices", "filter": format!("{col}=eq.x")}]}),
        )
        .await;
        columns.push(refusal(st, col));
    }
    assert_eq!(columns[0], columns[1]);
    assert!(columns[0].contains("unknown column"), "{}", columns[0]);
    // The visible columns are named, the hidden one is not.
    assert!(columns[0].contains("amount"), "{}", columns[0]);
}

/// One HTTP/1.1 exchange: `head` is the request line and headers (each ending in
/// CRLF, without Host/Content-Length/Connection). Returns (status, headers, body).
async fn http(server: &Server, head: &str, body: &str) -> (u16, HashMap<String, String>, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    let req = format!(
        "{head}Host: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        server.port,
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .expect("an HTTP answer")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

#[tokio::test]
async fn browsers_on_allowed_origins_unknown_paths_and_bearer_case() {
    let db = "acc_http";
    setup_db(db, "create table t (id int primary key);").await;
    let server = start_with(
        db,
        &format!(
            "[server]\ncors_origins = [\"http://localhost:5173\"]\n\n{}",
            auth("")
        ),
    )
    .await;
    let origin = "Origin: http://localhost:5173\r\n";
    // The preflight a browser sends before supabase-js's POST /api/broadcast.
    let (status, h, _) = http(
        &server,
        &format!("OPTIONS /api/broadcast HTTP/1.1\r\n{origin}Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, apikey, content-type, x-client-info\r\n"),
        "",
    )
    .await;
    assert_eq!(status, 204, "{h:?}");
    assert_eq!(h["access-control-allow-origin"], "http://localhost:5173");
    assert!(h["access-control-allow-methods"].contains("POST"), "{h:?}");
    for want in ["authorization", "apikey", "content-type", "x-client-info"] {
        assert!(h["access-control-allow-headers"].contains(want), "{h:?}");
    }
    // The POST itself, with a lower-case bearer scheme.
    let (status, h, body) = http(
        &server,
        &format!(
            "POST /api/broadcast HTTP/1.1\r\n{origin}authorization: bearer {}\r\nContent-Type: application/json\r\n",
            token("authenticated", "u")
        ),
        r#"{"messages":[{"topic":"room:1","event":"e"}]}"#,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(h["access-control-allow-origin"], "http://localhost:5173");
    for path in ["/health", "/ready", "/metrics"] {
        let (status, h, _) = http(&server, &format!("GET {path} HTTP/1.1\r\n{origin}"), "").await;
        assert!(status == 200 || status == 503, "{path}: {status}");
        assert_eq!(
            h.get("access-control-allow-origin").map(String::as_str),
            Some("http://localhost:5173"),
            "{path}"
        );
    }
    // Another origin gets no CORS headers, and its preflight a clear 403.
    let other = "Origin: https://evil.example\r\n";
    let (status, h, _) = http(&server, &format!("GET /health HTTP/1.1\r\n{other}"), "").await;
    assert_eq!(status, 200);
    assert!(!h.contains_key("access-control-allow-origin"), "{h:?}");
    let (status, h, body) = http(
        &server,
        &format!(
            "OPTIONS /api/broadcast HTTP/1.1\r\n{other}Access-Control-Request-Method: POST\r\n"
        ),
        "",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(!h.contains_key("access-control-allow-origin"), "{h:?}");
    assert!(body.contains("cors_origins"), "{body}");

    // Unknown paths: a 404 JSON error, also for supabase-js's REST calls.
    let (status, _, body) = http(&server, "GET /rest/v1/orders?select=* HTTP/1.1\r\n", "").await;
    assert_eq!(status, 404);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("Realtime only"),
        "{body}"
    );
    let mut js = JsClient::spawn().await;
    js.call(
        json!({"cmd": "connect_supabase_js", "url": format!("http://127.0.0.1:{}", server.port),
               "apikey": token("anon", "anon")}),
        T,
    )
    .await;
    let r = js
        .call(json!({"cmd": "rest_select", "table": "orders"}), T)
        .await;
    assert_eq!(r["status"], 404, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Realtime only"),
        "{r}"
    );

    // The WebSocket upgrade takes the same token sources: a lower-case bearer header.
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://127.0.0.1:{}/realtime/v1/websocket?vsn=2.0.0",
            server.port
        ))
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("bearer {}", token("authenticated", "u"))
            .parse()
            .unwrap(),
    );
    tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade with a lower-case bearer token");
}
