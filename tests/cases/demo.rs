//! `walcast demo`'s building blocks against a real cluster: the demo's cluster,
//! the bakery schema, traffic, and `walcast tail` on the demo slot.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use walcast::cli::demo::{self, DEMO_DATABASE};

use crate::support::wait_for;
use crate::support::walcast::spawn;

const T: Duration = Duration::from_secs(60);

const TABLES: [&str; 8] = [
    "customers",
    "ingredients",
    "inventory_logs",
    "order_items",
    "orders",
    "recipe_ingredients",
    "recipes",
    "supplier_deliveries",
];

async fn sql(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to the demo database: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A number column as f64 (numeric arrives as text to keep the test free of decimal types).
async fn num(c: &tokio_postgres::Client, query: &str) -> f64 {
    let s: String = c
        .query_one(&format!("select ({query})::text"), &[])
        .await
        .unwrap_or_else(|e| panic!("{query}: {e}"))
        .get(0);
    s.parse().unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

#[tokio::test]
async fn demo_bakery_changes_reach_tail_and_triggers_do_their_job() {
    let cluster = tokio::task::spawn_blocking(demo::start_cluster)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start the demo cluster: {e}"));
    let dir = cluster.dir().to_path_buf();
    let url = cluster.create_database(DEMO_DATABASE).await.unwrap();
    demo::load_schema(&url).await.unwrap();
    // Loading twice is harmless.
    demo::load_schema(&url).await.unwrap();
    let c = sql(&url).await;
    assert_eq!(num(&c, "select count(*) from ingredients").await, 12.0);

    // Traffic before the schema exists: a clear error, not a hang.
    let empty = cluster.create_database("empty").await.unwrap();
    let err = demo::traffic(&empty, 10.0, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("load the demo schema first"), "{err}");

    // `walcast tail` on the demo's slot and publication (the CLI defaults).
    let mut tail = spawn(&["tail", "--database-url", &url]);

    // ~40 ticks of traffic, as fast as the test likes.
    let shutdown = CancellationToken::new();
    let traffic = tokio::spawn({
        let url = url.clone();
        let shutdown = shutdown.clone();
        async move { demo::traffic(&url, 200.0, shutdown).await }
    });
    // Tick 41 started: the 40 before it finished (ticks run one at a time).
    wait_for("40 demo ticks", T, || async {
        (num(&c, "select last_value from demo.tick_seq").await >= 41.0).then_some(())
    })
    .await;
    shutdown.cancel();
    let ticks = traffic.await.unwrap().unwrap();
    assert!(ticks >= 40, "{ticks} ticks");

    // Now one confirmation by hand, to check the triggers exactly.
    let order_id: i64 = c
        .query_one(
            "insert into orders (customer_id)
             select id from customers where email = 'ada@example.com' returning id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    c.execute(
        "insert into order_items (order_id, recipe_id, quantity)
         select $1, id, case name when 'sourdough loaf' then 2 else 3 end
           from recipes where name in ('sourdough loaf', 'croissant')",
        &[&order_id],
    )
    .await
    .unwrap();
    let total = num(
        &c,
        &format!("select total from orders where id = {order_id}"),
    )
    .await;
    let expected_total = num(
        &c,
        &format!("select sum(quantity * price) from order_items where order_id = {order_id}"),
    )
    .await;
    assert!(close(total, expected_total) && total > 0.0, "{total}");
    let customer = "from customers where email = 'ada@example.com'";
    let orders_before = num(&c, &format!("select total_orders {customer}")).await;
    let spent_before = num(&c, &format!("select total_spent {customer}")).await;
    let points_before = num(&c, &format!("select loyalty_points {customer}")).await;
    // What the order needs, per ingredient, and the stock before.
    let needs = c
        .query(
            "select i.id, i.stock::text, sum(oi.quantity * ri.quantity)::text
               from order_items oi
               join recipe_ingredients ri on ri.recipe_id = oi.recipe_id
               join ingredients i on i.id = ri.ingredient_id
              where oi.order_id = $1
              group by i.id order by i.id",
            &[&order_id],
        )
        .await
        .unwrap();
    assert!(
        needs.len() >= 5,
        "sourdough + croissant use at least 5 ingredients"
    );

    c.execute(
        "update orders set status = 'confirmed' where id = $1",
        &[&order_id],
    )
    .await
    .unwrap();

    for row in &needs {
        let id: i64 = row.get(0);
        let before: f64 = row.get::<_, String>(1).parse().unwrap();
        let need: f64 = row.get::<_, String>(2).parse().unwrap();
        let after = num(
            &c,
            &format!("select stock from ingredients where id = {id}"),
        )
        .await;
        assert!(
            close(after, before - need),
            "ingredient {id}: {before} - {need} != {after}"
        );
        let logged = num(
            &c,
            &format!(
                "select delta from inventory_logs
                  where order_id = {order_id} and ingredient_id = {id} and reason = 'order'"
            ),
        )
        .await;
        assert!(
            close(logged, -need),
            "ingredient {id}: logged {logged}, needed {need}"
        );
    }
    assert_eq!(
        num(
            &c,
            &format!("select count(*) from inventory_logs where order_id = {order_id}")
        )
        .await,
        needs.len() as f64
    );
    assert_eq!(
        num(&c, &format!("select total_orders {customer}")).await,
        orders_before + 1.0
    );
    assert!(close(
        num(&c, &format!("select total_spent {customer}")).await,
        spent_before + total
    ));
    assert_eq!(
        num(&c, &format!("select loyalty_points {customer}")).await,
        points_before + total.floor()
    );

    // A confirmed order cannot be cancelled or edited.
    let err = c
        .execute(
            "update orders set status = 'cancelled' where id = $1",
            &[&order_id],
        )
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("cannot go from confirmed to cancelled"),
        "{err:?}"
    );
    let err = c
        .execute("delete from order_items where order_id = $1", &[&order_id])
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("only change while it is pending"),
        "{err:?}"
    );

    // A supplier delivery restocks.
    let flour_before = num(&c, "select stock from ingredients where name = 'flour'").await;
    c.batch_execute(
        "insert into supplier_deliveries (ingredient_id, quantity, cost)
         select id, 25, 22.50 from ingredients where name = 'flour'",
    )
    .await
    .unwrap();
    assert!(close(
        num(&c, "select stock from ingredients where name = 'flour'").await,
        flour_before + 25.0
    ));
    assert_eq!(
        num(
            &c,
            "select count(*) from inventory_logs l join supplier_deliveries d on d.id = l.delivery_id
              where l.reason = 'delivery' and l.delta = d.quantity"
        )
        .await,
        num(&c, "select count(*) from supplier_deliveries").await
    );

    // Everything above reached `walcast tail`: every table, the confirmation's
    // inventory_logs rows, and Ada's new totals, with full old rows.
    let mut seen = BTreeSet::new();
    let mut confirmation_logs = 0;
    let mut ada_updated = false;
    let mut confirmed_seen = false;
    let deadline = Instant::now() + T;
    while !(seen.len() == TABLES.len()
        && confirmation_logs == needs.len()
        && ada_updated
        && confirmed_seen)
    {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "tail did not show everything: tables {seen:?}, {confirmation_logs} logs of order {order_id}, ada {ada_updated}, confirmed {confirmed_seen}"
        );
        let ev = tail.next_json(left).await;
        let table = ev["table"].as_str().unwrap_or_default().to_string();
        assert!(TABLES.contains(&table.as_str()), "unexpected table in {ev}");
        assert_eq!(ev["schema"], "public");
        let kind = ev["type"].as_str().unwrap_or_default();
        if kind == "UPDATE" {
            // REPLICA IDENTITY FULL: the whole old row, not just the key.
            let old = ev["old_record"].as_object().unwrap();
            assert_eq!(old.len(), ev["record"].as_object().unwrap().len(), "{ev}");
        }
        let rec = &ev["record"];
        match (table.as_str(), kind) {
            ("inventory_logs", "INSERT") if rec["order_id"] == order_id => {
                assert_eq!(rec["reason"], "order");
                assert!(rec["delta"].as_f64().unwrap() < 0.0, "{ev}");
                confirmation_logs += 1;
            }
            ("customers", "UPDATE")
                if rec["email"] == "ada@example.com"
                    && rec["total_orders"].as_f64() == Some(orders_before + 1.0) =>
            {
                assert!(close(
                    rec["total_spent"].as_f64().unwrap(),
                    spent_before + total
                ));
                ada_updated = true;
            }
            ("orders", "UPDATE") if rec["id"] == order_id && rec["status"] == "confirmed" => {
                assert_eq!(ev["old_record"]["status"], "pending");
                assert!(rec["confirmed_at"].is_string(), "{ev}");
                confirmed_seen = true;
            }
            _ => {}
        }
        seen.insert(table);
    }
    tail.signal(15);
    let (ok, err) = tail.wait(T).await;
    assert!(ok, "tail did not exit cleanly: {err}");

    drop(c);
    tokio::task::spawn_blocking(move || cluster.remove())
        .await
        .unwrap()
        .unwrap();
    assert!(!dir.exists(), "{} not removed", dir.display());
}

/// `walcast demo` as a user runs it: the binary starts its own cluster, serves
/// the bakery with traffic, prints the next steps; supabase-js (as in the printed
/// snippet) gets changes of every demo table; SIGTERM stops it with exit code 0
/// and removes the cluster.
#[tokio::test]
async fn walcast_demo_serves_every_table_and_cleans_up() {
    use serde_json::json;
    use tokio::io::AsyncReadExt;

    use crate::support::js::{is_on, JsClient};

    // Port 0: the printed next steps carry the port the system chose.
    let mut proc = spawn(&["demo", "--listen", "127.0.0.1:0", "--rate", "50"]);
    let pid = proc.pid();
    // Keep stderr drained; keep it for failure messages.
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut err = proc.stderr.take().unwrap();
    let sink = stderr.clone();
    let drain = tokio::spawn(async move {
        let mut buf = String::new();
        let _ = err.read_to_string(&mut buf).await;
        sink.lock().unwrap().push_str(&buf);
    });

    // The next steps appear once serve listens.
    let mut printed = Vec::new();
    let deadline = tokio::time::Instant::now() + T;
    while !printed.iter().any(|l: &String| l.starts_with("Ctrl-C")) {
        let line = tokio::time::timeout_at(deadline, proc.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("no next steps within {T:?}: {printed:?}"))
            .expect("read demo stdout");
        match line {
            Some(l) => printed.push(l),
            None => {
                drain.await.unwrap();
                panic!(
                    "walcast demo exited early: {printed:?}\n{}",
                    stderr.lock().unwrap()
                );
            }
        }
    }
    let text = printed.join("\n");
    let listen = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Metrics:"))
        .and_then(|m| m.trim().strip_prefix("http://"))
        .and_then(|m| m.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics URL in {text}"))
        .to_string();
    let port: u16 = listen
        .strip_prefix("127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not a loopback address: {listen}"));
    assert_ne!(port, 0, "{text}");
    assert!(text.contains(&format!("http://{listen}/metrics")), "{text}");
    assert!(text.contains(" tail --database-url "), "{text}");
    // The printed snippets carry a staff token and a customer token.
    let token_after = |prefix: &str| -> String {
        let start = text
            .find(prefix)
            .unwrap_or_else(|| panic!("no {prefix:?} in {text}"))
            + prefix.len();
        text[start..].split('"').next().unwrap().to_string()
    };
    let staff = token_after(&format!("createClient(\"http://{listen}\", \""));
    let customer = token_after(&format!(
        "const portal = createClient(\"http://{listen}\", \""
    ));
    assert!(
        staff.split('.').count() == 3 && customer.split('.').count() == 3,
        "{text}"
    );
    let prefix = format!("walcast-demo-{pid}-");
    let cluster_dirs = || {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .count()
    };
    assert_eq!(cluster_dirs(), 1, "the demo's cluster dir in the temp dir");

    // supabase-js, as in the printed snippet, plus one binding per demo table.
    let mut js = JsClient::spawn().await;
    js.call(
        json!({"cmd": "connect_supabase_js", "url": format!("http://{listen}"), "apikey": staff}),
        T,
    )
    .await;
    let bindings: Vec<_> = TABLES
        .iter()
        .map(|t| json!({"event": "*", "schema": "public", "table": t}))
        .collect();
    js.call(
        json!({"cmd": "subscribe", "channel": "everything", "postgres_changes": bindings}),
        T,
    )
    .await;
    assert_eq!(js.status("everything", T).await, "SUBSCRIBED");
    js.call(
        json!({"cmd": "subscribe", "channel": "bakery", "postgres_changes": [
            {"event": "*", "schema": "public", "table": "orders"},
            {"event": "*", "schema": "public", "table": "ingredients", "filter": "stock=lt.20"},
        ]}),
        T,
    )
    .await;
    assert_eq!(js.status("bakery", T).await, "SUBSCRIBED");

    let mut seen = BTreeSet::new();
    let mut orders_on_bakery = false;
    let deadline = Instant::now() + T;
    while seen.len() < TABLES.len() || !orders_on_bakery {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "changes seen from {seen:?} of {TABLES:?}; orders on the snippet's channel: {orders_on_bakery}"
        );
        let Some(ev) = js.next_event(left).await else {
            continue;
        };
        if is_on(&ev, "postgres_changes", "everything") {
            let p = &ev["payload"];
            let i = ev["binding"].as_u64().unwrap() as usize;
            assert_eq!(p["schema"], "public", "{ev}");
            assert_eq!(p["table"], TABLES[i], "{ev}");
            seen.insert(TABLES[i]);
        } else if is_on(&ev, "postgres_changes", "bakery") {
            let p = &ev["payload"];
            if p["table"] == "orders" {
                orders_on_bakery = true;
            } else {
                assert_eq!(p["table"], "ingredients", "{ev}");
                let stock = p["new"]["stock"].as_f64().unwrap_or(f64::NAN);
                assert!(stock < 20.0, "the stock=lt.20 filter let through {ev}");
            }
        }
    }
    js.exit().await;

    // Offline catch-up: a supabase-js app keeps the last commit_timestamp it saw,
    // closes, and comes back with it while the demo goes on writing.
    let orders = |replay: serde_json::Value| {
        json!({"cmd": "subscribe", "channel": "orders", "resume": true, "postgres_changes": [
            {"event": "*", "schema": "public", "table": "orders", "replay": replay}]})
    };
    let mut app = JsClient::spawn().await;
    app.call(
        json!({"cmd": "connect_supabase_js", "url": format!("http://{listen}"), "apikey": staff}),
        T,
    )
    .await;
    app.call(orders(json!({"since": null})), T).await;
    assert_eq!(app.status("orders", T).await, "SUBSCRIBED");
    let seen = app
        .wait_for("an order change", T, |v| {
            is_on(v, "postgres_changes", "orders")
        })
        .await;
    let mut last = seen["payload"]["commit_timestamp"]
        .as_str()
        .unwrap()
        .to_string();
    // Later changes already queued count as seen too.
    for v in app.drain() {
        if is_on(&v, "postgres_changes", "orders") {
            last = v["payload"]["commit_timestamp"]
                .as_str()
                .unwrap()
                .to_string();
        }
    }
    app.exit().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut app = JsClient::spawn().await;
    app.call(
        json!({"cmd": "connect_supabase_js", "url": format!("http://{listen}"), "apikey": staff}),
        T,
    )
    .await;
    app.call(orders(json!({ "since": last })), T).await;
    assert_eq!(app.status("orders", T).await, "SUBSCRIBED");
    let mut missed = Vec::new();
    loop {
        let v = app
            .wait_for("the missed orders", T, |v| {
                is_on(v, "postgres_changes", "orders")
                    || (is_on(v, "system", "orders") && v["payload"].get("code").is_some())
            })
            .await;
        if v["ev"] == "system" {
            assert_eq!(v["payload"]["code"], "REPLAY_DONE", "{v}");
            assert_eq!(v["payload"]["replayed"], missed.len(), "{v}");
            break;
        }
        missed.push(
            v["payload"]["commit_timestamp"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert!(
        !missed.is_empty(),
        "1.5 s of demo traffic missed, none replayed"
    );
    let at = |t: &str| walcast::decode::pgoutput::parse_iso_unix_micros(t).unwrap();
    assert!(at(&missed[0]) > at(&last), "{last} then {missed:?}");
    assert!(
        missed.windows(2).all(|w| at(&w[0]) <= at(&w[1])),
        "{missed:?}"
    );
    // Then live again.
    app.wait_for("a live order change", T, |v| {
        is_on(v, "postgres_changes", "orders")
    })
    .await;
    app.exit().await;

    // The customer portal: only this customer's orders, and no table without a rule.
    let mut portal = JsClient::spawn().await;
    portal
        .call(
            json!({"cmd": "connect_supabase_js", "url": format!("http://{listen}"), "apikey": customer}),
            T,
        )
        .await;
    portal
        .call(
            json!({"cmd": "subscribe", "channel": "my-orders", "postgres_changes": [
                {"event": "*", "schema": "public", "table": "orders"}]}),
            T,
        )
        .await;
    assert_eq!(portal.status("my-orders", T).await, "SUBSCRIBED");
    portal
        .call(
            json!({"cmd": "subscribe", "channel": "logs", "postgres_changes": [
                {"event": "*", "schema": "public", "table": "inventory_logs"}]}),
            T,
        )
        .await;
    assert_eq!(portal.status("logs", T).await, "CHANNEL_ERROR");
    let mine = demo::DEMO_CUSTOMER_ID;
    for _ in 0..2 {
        let ev = portal
            .wait_for(
                "an order of the demo customer",
                Duration::from_secs(60),
                |v| is_on(v, "postgres_changes", "my-orders"),
            )
            .await;
        let p = &ev["payload"];
        let owner = p["new"]["customer_id"]
            .as_i64()
            .or(p["old"]["customer_id"].as_i64());
        assert_eq!(
            owner,
            Some(mine),
            "the portal saw another customer's order: {ev}"
        );
    }
    portal.exit().await;

    proc.signal(15);
    let status = tokio::time::timeout(T, proc.child.wait())
        .await
        .expect("walcast demo did not exit within the timeout")
        .expect("wait for walcast demo");
    drain.await.unwrap();
    assert!(
        status.success(),
        "walcast demo exited with {status}: {}",
        stderr.lock().unwrap()
    );
    assert_eq!(cluster_dirs(), 0, "the demo's cluster dir was not removed");
}
