//! RLS mode (issue 18), adversarially: a check that times out, rows moving
//! between owners, column privileges against `select` and filters, a token
//! refresh to another user, tables without row security, replay, TRUNCATE —
//! each with the real realtime-js, on the compiled path and the SQL path.

use std::time::Duration;

use serde_json::{json, Value};

use super::rls::{auth_sql, connect, roles, start_with, token};
use crate::support::js::{is_on, JsClient};
use crate::support::setup_db;
use crate::support::walcast::Server;

const T: Duration = Duration::from_secs(20);
const A: &str = "00000000-0000-0000-0000-0000000000a1";
const B: &str = "00000000-0000-0000-0000-0000000000b1";

/// The database with `sql/auth.sql`, the given roles, then `ddl`.
async fn db(name: &str, role_names: &[&str], ddl: &str) -> tokio_postgres::Client {
    setup_db(
        name,
        &format!("{}\n{}\n{ddl}", roles(role_names), auth_sql()),
    )
    .await
}

/// Table `t` (uuid `owner`) judged on both paths: role `<prefix>_c` by a
/// compiled policy (`owner = auth.uid()`), `<prefix>_s` by one that runs as
/// SQL (a cast on the column); `full`: REPLICA IDENTITY FULL.
async fn two_path_db(name: &str, prefix: &str, full: bool) -> tokio_postgres::Client {
    let (c, s) = (format!("{prefix}_c"), format!("{prefix}_s"));
    let identity = if full {
        "alter table t replica identity full;"
    } else {
        ""
    };
    db(
        name,
        &[&c, &s],
        &format!(
            "create table t (id int primary key, owner uuid, body text);
             {identity}
             alter table t enable row level security;
             create policy c on t for select to {c} using (owner = auth.uid());
             create policy s on t for select to {s} using (owner::text = auth.uid()::text);
             grant select on t to {c}, {s};"
        ),
    )
    .await
}

async fn start(db: &str, extra: &str) -> Server {
    start_with(db, db, extra).await
}

/// Joins `channel` with `binding`; the status event.
async fn join(js: &mut JsClient, client: &str, channel: &str, binding: Value) -> Value {
    js.call(
        json!({"cmd": "subscribe", "client": client, "channel": channel,
               "postgres_changes": [binding]}),
        T,
    )
    .await;
    js.wait_for("a status", T, |v| {
        v["client"] == client && is_on(v, "status", channel)
    })
    .await
}

async fn joined(js: &mut JsClient, client: &str, channel: &str, table: &str) {
    let st = join(
        js,
        client,
        channel,
        json!({"event": "*", "schema": "public", "table": table}),
    )
    .await;
    assert_eq!(st["status"], "SUBSCRIBED", "{client}: {st}");
}

fn change_of(client: &str) -> impl Fn(&Value) -> bool + '_ {
    move |v| v["client"] == client && v["ev"] == "postgres_changes"
}

fn change_with_id(client: &str, id: i64) -> impl Fn(&Value) -> bool + '_ {
    move |v| {
        v["client"] == client
            && v["ev"] == "postgres_changes"
            && (v["payload"]["new"]["id"] == id || v["payload"]["old"]["id"] == id)
    }
}

/// 1. A policy that sleeps past `rls_check_timeout_ms`: that subscriber's
/// channel is closed with `RLS_CHECK_FAILED`; a compiled subscriber on the same
/// table keeps receiving.
#[tokio::test]
async fn a_check_that_times_out_closes_only_its_channel() {
    let name = "rlsm_timeout";
    let c = db(
        name,
        &["rlsm_slow", "rlsm_fast"],
        "create table t (id int primary key, owner uuid);
         alter table t replica identity full;
         alter table t enable row level security;
         create function slow_yes() returns boolean language plpgsql as
           'begin perform pg_sleep(3); return true; end';
         create policy slow on t for select to rlsm_slow using (slow_yes());
         create policy fast on t for select to rlsm_fast using (owner = auth.uid());
         grant select on t to rlsm_slow, rlsm_fast;",
    )
    .await;
    let server = start(name, "rls_check_timeout_ms = 300").await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "slow", &server, &token("rlsm_slow", A)).await;
    connect(&mut js, "fast", &server, &token("rlsm_fast", A)).await;
    joined(&mut js, "slow", "t", "t").await;
    joined(&mut js, "fast", "t", "t").await;
    c.batch_execute(&format!("insert into t values (1, '{A}')"))
        .await
        .unwrap();
    let sys = js
        .wait_for("slow's system error", T, |v| {
            v["client"] == "slow" && is_on(v, "system", "t") && v["payload"]["status"] == "error"
        })
        .await;
    assert!(sys.to_string().contains("RLS_CHECK_FAILED"), "{sys}");
    assert!(sys.to_string().contains("timeout"), "{sys}");
    let got = js.wait_for("fast's row", T, change_of("fast")).await;
    assert_eq!(got["payload"]["new"]["id"], 1, "{got}");
    c.batch_execute(&format!("insert into t values (2, '{A}')"))
        .await
        .unwrap();
    let got = js.wait_for("fast's second row", T, change_of("fast")).await;
    assert_eq!(got["payload"]["new"]["id"], 2, "{got}");
    // The slow subscriber never saw a row: its check failed, not passed.
    js.expect_none(
        "a change for slow",
        Duration::from_millis(300),
        change_of("slow"),
    )
    .await;
}

/// 2. An UPDATE moving a row from owner A to owner B (REPLICA IDENTITY FULL),
/// on both paths: judged on the new row, so A gets nothing and B gets the
/// UPDATE with `old_record` hidden (A's old values never reach B).
#[tokio::test]
async fn a_row_moving_between_owners_hides_the_old_owners_values() {
    let name = "rlsm_move";
    let c = two_path_db(name, "rlsm_mv", true).await;
    let server = start(name, "").await;
    let mut js = JsClient::spawn().await;
    for path in ["c", "s"] {
        let role = format!("rlsm_mv_{path}");
        for (who, sub) in [("a", A), ("b", B)] {
            let client = format!("{who}{path}");
            connect(&mut js, &client, &server, &token(&role, sub)).await;
            joined(&mut js, &client, "t", "t").await;
        }
    }
    c.batch_execute(&format!(
        "insert into t values (1, '{A}', 'secret of A');
         update t set owner = '{B}', body = 'now B''s' where id = 1;
         insert into t values (2, '{A}', 'fence');
         insert into t values (3, '{B}', 'fence');"
    ))
    .await
    .unwrap();
    for path in ["c", "s"] {
        let (a, b) = (format!("a{path}"), format!("b{path}"));
        let ins = js.wait_for("A's insert", T, change_of(&a)).await;
        assert_eq!(ins["payload"]["eventType"], "INSERT", "{ins}");
        assert_eq!(ins["payload"]["new"]["id"], 1, "{ins}");
        // A: nothing more before its next own row.
        js.expect_none_before(
            &format!("a change of row 1 for {a}"),
            change_with_id(&a, 1),
            "row 2",
            change_with_id(&a, 2),
            T,
        )
        .await;
        let up = js.wait_for("B's update", T, change_of(&b)).await;
        let p = &up["payload"];
        assert_eq!(p["eventType"], "UPDATE", "{up}");
        assert_eq!(p["new"]["body"], "now B's", "{up}");
        let old = p["old"].to_string();
        assert!(
            !old.contains("secret of A") && !old.contains(A),
            "{b} saw A's old row: {up}"
        );
        assert!(
            p["old"].as_object().is_none_or(|o| o.is_empty()),
            "old_record not hidden for {b}: {up}"
        );
        let f = js.wait_for("B's fence", T, change_of(&b)).await;
        assert_eq!(f["payload"]["new"]["id"], 3, "{b}: {f}");
    }
}

/// 3. Column privileges with `select` and filters: a column the role cannot
/// read can be neither selected nor filtered on, and never arrives.
#[tokio::test]
async fn a_column_without_privilege_cannot_be_selected_or_filtered() {
    let name = "rlsm_cols";
    let c = db(
        name,
        &["rlsm_col"],
        "create table t (id int primary key, owner uuid, secret text);
         alter table t replica identity full;
         alter table t enable row level security;
         create policy p on t for select to rlsm_col using (owner = auth.uid());
         grant select (id, owner) on t to rlsm_col;",
    )
    .await;
    let server = start(name, "").await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "u", &server, &token("rlsm_col", A)).await;
    let st = join(
        &mut js,
        "u",
        "sel",
        json!({"event": "*", "schema": "public", "table": "t", "select": ["id", "secret"]}),
    )
    .await;
    assert_eq!(st["status"], "CHANNEL_ERROR", "{st}");
    let st = join(
        &mut js,
        "u",
        "filt",
        json!({"event": "*", "schema": "public", "table": "t", "filter": "secret=eq.x"}),
    )
    .await;
    assert_eq!(st["status"], "CHANNEL_ERROR", "{st}");
    assert!(st.to_string().contains("unknown column"), "{st}");
    // Not even `in`, `neq` or `is`.
    for f in ["secret=neq.x", "secret=is.null", "secret=in.(x,y)"] {
        let st = join(
            &mut js,
            "u",
            &format!("f{f}"),
            json!({"event": "*", "schema": "public", "table": "t", "filter": f}),
        )
        .await;
        assert_eq!(st["status"], "CHANNEL_ERROR", "{f}: {st}");
    }
    joined(&mut js, "u", "all", "t").await;
    c.batch_execute(&format!(
        "insert into t values (1, '{A}', 'hush');
         update t set secret = 'still hush' where id = 1;
         delete from t where id = 1;"
    ))
    .await
    .unwrap();
    for kind in ["INSERT", "UPDATE", "DELETE"] {
        let v = js.wait_for(kind, T, change_of("u")).await;
        assert_eq!(v["payload"]["eventType"], kind, "{v}");
        assert!(!v.to_string().contains("hush"), "{v}");
        assert!(
            !v["payload"]["columns"].to_string().contains("secret"),
            "{v}"
        );
    }
}

/// 4. A token refresh to another user's `sub` on an SQL-path table re-judges:
/// the old user's rows stop, the new user's flow.
#[tokio::test]
async fn a_refresh_to_another_user_rejudges_the_sql_path() {
    let name = "rlsm_refresh";
    let c = db(
        name,
        &["rlsm_rf"],
        "create table t (id int primary key, owner uuid);
         alter table t replica identity full;
         alter table t enable row level security;
         create policy p on t for select to rlsm_rf using (owner::text = auth.uid()::text);
         grant select on t to rlsm_rf;",
    )
    .await;
    let server = start(name, "").await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "u", &server, &token("rlsm_rf", A)).await;
    joined(&mut js, "u", "t", "t").await;
    c.batch_execute(&format!(
        "insert into t values (1, '{B}'); insert into t values (2, '{A}');"
    ))
    .await
    .unwrap();
    let v = js.wait_for("A's row", T, change_of("u")).await;
    assert_eq!(v["payload"]["new"]["id"], 2, "only A's row: {v}");
    js.call(
        json!({"cmd": "set_auth", "client": "u", "token": token("rlsm_rf", B)}),
        T,
    )
    .await;
    // Until the refresh took effect, B's rows are not seen (and no A rows are
    // written meanwhile).
    let deadline = std::time::Instant::now() + T;
    let mut id = 100;
    loop {
        c.execute("insert into t values ($1, $2::text::uuid)", &[&id, &B])
            .await
            .unwrap();
        if let Some(v) = js.next_event(Duration::from_millis(300)).await {
            if change_of("u")(&v) {
                assert_eq!(v["payload"]["new"]["owner"], B, "{v}");
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the refresh never took effect"
        );
        id += 1;
    }
    js.drain();
    c.batch_execute(&format!(
        "insert into t values (3, '{A}'); insert into t values (4, '{B}');"
    ))
    .await
    .unwrap();
    js.expect_none_before(
        "A's row after the refresh",
        change_with_id("u", 3),
        "B's row",
        change_with_id("u", 4),
        T,
    )
    .await;
}

/// 5. A table without row security follows its GRANTs; a role PostgreSQL does
/// not know is refused.
#[tokio::test]
async fn a_table_without_row_security_follows_grants() {
    let name = "rlsm_plain";
    let c = db(
        name,
        &["rlsm_pl_yes", "rlsm_pl_no"],
        "create table t (id int primary key, owner uuid);
         grant select on t to rlsm_pl_yes;",
    )
    .await;
    let server = start(name, "").await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "yes", &server, &token("rlsm_pl_yes", A)).await;
    connect(&mut js, "no", &server, &token("rlsm_pl_no", A)).await;
    connect(&mut js, "ghost", &server, &token("rlsm_no_such_role", A)).await;
    joined(&mut js, "yes", "t", "t").await;
    // Both refused alike (the answer does not tell which: no existence leak).
    for client in ["no", "ghost"] {
        let st = join(
            &mut js,
            client,
            "t",
            json!({"event": "*", "schema": "public", "table": "t"}),
        )
        .await;
        assert_eq!(st["status"], "CHANNEL_ERROR", "{client}: {st}");
        assert!(st.to_string().contains("Unauthorized"), "{client}: {st}");
    }
    c.batch_execute(&format!(
        "insert into t values (1, '{A}'); insert into t values (2, '{B}');"
    ))
    .await
    .unwrap();
    for id in [1, 2] {
        let v = js.wait_for("a row", T, change_of("yes")).await;
        assert_eq!(v["payload"]["new"]["id"], id, "{v}");
    }
    // The privilege revoked: the channel is closed.
    c.batch_execute("revoke select on t from rlsm_pl_yes")
        .await
        .unwrap();
    js.wait_for("yes's system error", T, |v| {
        v["client"] == "yes" && is_on(v, "system", "t") && v["payload"]["status"] == "error"
    })
    .await;
    c.batch_execute(&format!("insert into t values (3, '{A}')"))
        .await
        .unwrap();
    js.expect_none(
        "a row after the revoke",
        Duration::from_millis(500),
        change_of("yes"),
    )
    .await;
}

/// 6. Replay on an RLS table is judged like live changes: on both paths, a
/// resumed channel gets its own rows only, then `REPLAY_DONE`.
#[tokio::test]
async fn replayed_changes_are_judged_too() {
    let name = "rlsm_replay";
    let c = two_path_db(name, "rlsm_rp", true).await;
    let server = start(name, "").await;
    let mut js = JsClient::spawn().await;
    for path in ["c", "s"] {
        connect(
            &mut js,
            path,
            &server,
            &token(&format!("rlsm_rp_{path}"), A),
        )
        .await;
        joined(&mut js, path, "live", "t").await;
    }
    c.batch_execute(&format!("insert into t values (1, '{A}', 'mine')"))
        .await
        .unwrap();
    let mut since = Vec::new();
    for path in ["c", "s"] {
        let v = js.wait_for("the first row", T, change_of(path)).await;
        since.push(v["payload"]["commit_timestamp"].clone());
    }
    // Missed while away: B's rows interleaved with A's, in several shapes.
    c.batch_execute(&format!(
        "insert into t values (2, '{B}', 'not yours');
         insert into t values (3, '{A}', 'yours');
         begin; insert into t values (4, '{B}', 'not yours'); insert into t values (5, '{A}', 'yours');
                update t set owner = '{B}', body = 'moved away' where id = 3; commit;
         update t set owner = '{A}', body = 'moved in' where id = 2;
         delete from t where id = 4;
         delete from t where id = 5;"
    ))
    .await
    .unwrap();
    // Everything has reached walcast (the live channels saw the last change).
    for path in ["c", "s"] {
        js.wait_for("the last change, live", T, |v| {
            change_of(path)(v)
                && v["payload"]["eventType"] == "DELETE"
                && v["payload"]["old"]["id"] == 5
        })
        .await;
    }
    for (i, path) in ["c", "s"].into_iter().enumerate() {
        let st = join(
            &mut js,
            path,
            "resumed",
            json!({"event": "*", "schema": "public", "table": "t", "replay": {"since": since[i]}}),
        )
        .await;
        assert_eq!(st["status"], "SUBSCRIBED", "{path}: {st}");
        let mut got = Vec::new();
        let done = loop {
            let v = js
                .wait_for("replay", T, |v| {
                    v["client"] == path
                        && v["channel"] == "resumed"
                        && (v["ev"] == "postgres_changes"
                            || (v["ev"] == "system" && v["payload"]["code"] == "REPLAY_DONE"))
                })
                .await;
            if v["ev"] == "system" {
                break v;
            }
            let p = &v["payload"];
            assert!(!v.to_string().contains("not yours"), "{path}: {v}");
            assert!(!v.to_string().contains("moved away"), "{path}: {v}");
            let id = p["new"]["id"].as_i64().or(p["old"]["id"].as_i64());
            got.push((p["eventType"].as_str().unwrap().to_string(), id.unwrap()));
        };
        // The count is what was sent: it does not tell how many changes the
        // subscriber may not see.
        assert_eq!(
            done["payload"]["replayed"].as_u64(),
            Some(got.len() as u64),
            "{path}: {done}"
        );
        got.retain(|g| g != &("INSERT".to_string(), 1));
        let want: Vec<(String, i64)> = [("INSERT", 3), ("INSERT", 5), ("UPDATE", 2), ("DELETE", 5)]
            .iter()
            .map(|(k, i)| (k.to_string(), *i))
            .collect();
        assert_eq!(got, want, "{path}");
    }
}

/// 7. TRUNCATE on an RLS table carries no row: whatever subscribers get, no
/// row data leaks, and they keep receiving afterwards.
#[tokio::test]
async fn truncate_on_an_rls_table_leaks_no_rows() {
    let name = "rlsm_trunc";
    let c = two_path_db(name, "rlsm_tr", true).await;
    let server = start(name, "").await;
    let mut js = JsClient::spawn().await;
    for path in ["c", "s"] {
        connect(
            &mut js,
            path,
            &server,
            &token(&format!("rlsm_tr_{path}"), A),
        )
        .await;
        joined(&mut js, path, "t", "t").await;
    }
    c.batch_execute(&format!(
        "insert into t values (1, '{B}', 'not yours');
         insert into t values (2, '{A}', 'yours');
         truncate t;
         insert into t values (3, '{A}', 'yours again');"
    ))
    .await
    .unwrap();
    for path in ["c", "s"] {
        let v = js.wait_for("row 2", T, change_of(path)).await;
        assert_eq!(v["payload"]["new"]["id"], 2, "{path}: {v}");
        let mut seen = Vec::new();
        loop {
            let v = js.wait_for("row 3", T, change_of(path)).await;
            assert!(!v.to_string().contains("not yours"), "{path}: {v}");
            if v["payload"]["new"]["id"] == 3 {
                break;
            }
            seen.push(v["payload"].clone());
        }
        for p in &seen {
            assert_eq!(p["eventType"], "TRUNCATE", "{path}: {p}");
            for side in ["new", "old"] {
                assert!(
                    p[side].as_object().is_none_or(|o| o.is_empty()),
                    "{path}: {p}"
                );
            }
        }
        eprintln!("{path}: truncate delivered as {seen:?}");
    }
}

/// 6b. Catch-up over HTTP (`/api/changes`) on an RLS table, on both paths:
/// exactly the caller's rows, none of the others'.
#[tokio::test]
async fn catch_up_over_http_is_judged_on_both_paths() {
    let name = "rlsm_rest";
    let c = two_path_db(name, "rlsm_rs", true).await;
    let server = start(name, "").await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "w", &server, &token("rlsm_rs_c", A)).await;
    joined(&mut js, "w", "t", "t").await;
    c.batch_execute(&format!("insert into t values (0, '{A}', 'start')"))
        .await
        .unwrap();
    let start = js
        .wait_for("the start row", T, change_with_id("w", 0))
        .await;
    let since = start["payload"]["commit_timestamp"]
        .as_str()
        .unwrap()
        .to_string();
    c.batch_execute(&format!(
        "insert into t values (1, '{B}', 'not yours');
         insert into t values (2, '{A}', 'yours');
         insert into t values (3, '{B}', 'not yours');
         update t set owner = '{A}', body = 'moved in' where id = 3;
         insert into t values (4, '{A}', 'last');"
    ))
    .await
    .unwrap();
    // Everything is in the log once the live channel saw the last row.
    js.wait_for("the last row", T, change_with_id("w", 4)).await;
    for path in ["c", "s"] {
        let tok = token(&format!("rlsm_rs_{path}"), A);
        let (status, body) = crate::support::http_get(
            server.port,
            &format!("/api/changes?table=public.t&since={since}&apikey={tok}"),
        )
        .await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(!body.contains("not yours"), "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let mut got: Vec<(String, i64)> = v["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["type"].as_str().unwrap().to_string(),
                    c["record"]["id"].as_i64().unwrap(),
                )
            })
            .collect();
        got.retain(|g| g.1 != 0);
        let want: Vec<(String, i64)> = [("INSERT", 2), ("UPDATE", 3), ("INSERT", 4)]
            .iter()
            .map(|(k, i)| (k.to_string(), *i))
            .collect();
        assert_eq!(got, want, "{path}: {body}");
    }
}

/// 2b. Without `REPLICA IDENTITY FULL`, an UPDATE that changes the key sends
/// an old row of key columns only, which no policy can judge: on both paths
/// the row moved in from another owner arrives with `old_record` hidden (its
/// old key was someone else's).
#[tokio::test]
async fn an_unjudgeable_old_key_stays_hidden() {
    let name = "rlsm_oldkey";
    let c = two_path_db(name, "rlsm_ok", false).await;
    let server = start(name, "").await;
    let mut js = JsClient::spawn().await;
    for path in ["c", "s"] {
        connect(
            &mut js,
            path,
            &server,
            &token(&format!("rlsm_ok_{path}"), A),
        )
        .await;
        joined(&mut js, path, "t", "t").await;
    }
    c.batch_execute(&format!("insert into t values (5, '{B}', 'not yours')"))
        .await
        .unwrap();
    c.batch_execute(&format!(
        "update t set id = 6, owner = '{A}', body = 'moved in' where id = 5"
    ))
    .await
    .unwrap();
    for path in ["c", "s"] {
        let v = js.wait_for("the moved row", T, change_of(path)).await;
        let p = &v["payload"];
        assert_eq!(p["eventType"], "UPDATE", "{path}: {v}");
        assert_eq!(p["new"]["id"], 6, "{path}: {v}");
        assert!(
            p["old"].as_object().is_none_or(|o| o.is_empty()),
            "{path} saw the old key: {v}"
        );
    }
}

/// A table whose name is a plain word the check's own SQL might use as an
/// alias (`w`, here) is judged like any other on the SQL path.
#[tokio::test]
async fn a_table_named_like_the_checks_alias_is_judged() {
    let name = "rlsm_alias";
    let c = db(
        name,
        &["rlsm_al"],
        "create table w (id int primary key, owner uuid);
         alter table w replica identity full;
         alter table w enable row level security;
         create policy p on w for select to rlsm_al using (w.owner::text = auth.uid()::text);
         grant select on w to rlsm_al;",
    )
    .await;
    let server = start(name, "").await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "u", &server, &token("rlsm_al", A)).await;
    joined(&mut js, "u", "w", "w").await;
    c.batch_execute(&format!(
        "insert into w values (1, '{B}'); insert into w values (2, '{A}');"
    ))
    .await
    .unwrap();
    let v = js.wait_for("A's row", T, change_of("u")).await;
    assert_eq!(v["payload"]["new"]["id"], 2, "{v}");
    js.expect_none("a system error", Duration::from_millis(300), |v| {
        v["client"] == "u" && v["ev"] == "system" && v["payload"]["status"] == "error"
    })
    .await;
}

/// A connection that goes away while its writer waits for a slow SQL verdict
/// releases its socket, channel and subscriptions at once, and does not hold
/// up SIGTERM (DESIGN: connection lifecycle).
#[tokio::test]
async fn a_connection_lost_while_a_verdict_is_pending_is_released() {
    let name = "rlsm_lost";
    let c = db(
        name,
        &["rlsm_lo"],
        "create table t (id int primary key, owner uuid);
         alter table t replica identity full;
         alter table t enable row level security;
         create function slow_yes() returns boolean language plpgsql as
           'begin perform pg_sleep(4); return true; end';
         create policy slow on t for select to rlsm_lo using (slow_yes());
         grant select on t to rlsm_lo;",
    )
    .await;
    let mut server = start(name, "rls_check_timeout_ms = 8000").await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "u", &server, &token("rlsm_lo", A)).await;
    joined(&mut js, "u", "t", "t").await;
    c.batch_execute(&format!("insert into t values (1, '{A}')"))
        .await
        .unwrap();
    // The check is running (it sleeps 4 s): the writer waits on its verdict.
    crate::support::wait_for("a check under way", T, || async {
        (super::resume::metric(server.port, "walcast_rls_checks_queued").await == 0.0
            && super::resume::metric(server.port, "walcast_websocket_connections").await == 1.0)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    js.call(json!({"cmd": "disconnect", "client": "u"}), T)
        .await;
    let lost = std::time::Instant::now();
    for series in [
        "walcast_websocket_connections",
        "walcast_websocket_channels",
        "walcast_subscriptions",
    ] {
        crate::support::wait_for(&format!("{series} back to 0"), T, || async {
            (super::resume::metric(server.port, series).await == 0.0).then_some(())
        })
        .await;
    }
    // Released before the 4 s check could answer.
    assert!(
        lost.elapsed() < Duration::from_secs(3),
        "{:?}",
        lost.elapsed()
    );
    let asked = std::time::Instant::now();
    server.proc.signal(15);
    tokio::time::timeout(Duration::from_secs(10), server.proc.child.wait())
        .await
        .expect("walcast exits after SIGTERM")
        .unwrap();
    assert!(asked.elapsed() < Duration::from_secs(10));
}
