//! RLS mode's SQL path judged in rounds (one load of a table's rows into a
//! temp table, every waiting class judged over it in one pipelined
//! transaction): a class whose policy raises fails alone in its round; a
//! class judging only some of the round's rows never sees (nor raises on) the
//! others; a policy reading the row as a whole; the rounds really used the
//! temp table (`walcast_rls_unloaded_checks_total` stays 0). And the security
//! review's findings: no class sees another's transaction-local settings, the
//! load runs as a subscriber role, no system columns of the temp table, no
//! shadowed real table, a domain over jsonb as JSON, a round retried once.

use std::time::Duration;

use serde_json::{json, Value};

use super::resume::metric;
use super::rls::{auth_sql, connect, roles, start_with, token};
use crate::support::js::{is_on, JsClient};
use crate::support::setup_db;

const T: Duration = Duration::from_secs(20);
const A: &str = "00000000-0000-0000-0000-0000000000a2";
const B: &str = "00000000-0000-0000-0000-0000000000b2";
const C: &str = "00000000-0000-0000-0000-0000000000c2";

async fn join(js: &mut JsClient, client: &str, binding: Value) {
    js.call(
        json!({"cmd": "subscribe", "client": client, "channel": "t",
               "postgres_changes": [binding]}),
        T,
    )
    .await;
    let st = js
        .wait_for("a status", T, |v| {
            v["client"] == client && is_on(v, "status", "t")
        })
        .await;
    assert_eq!(st["status"], "SUBSCRIBED", "{client}: {st}");
}

fn whole_table() -> Value {
    json!({"event": "*", "schema": "public", "table": "t"})
}

fn change_with_id(client: &str, id: i64) -> impl Fn(&Value) -> bool + '_ {
    move |v| {
        v["client"] == client
            && v["ev"] == "postgres_changes"
            && (v["payload"]["new"]["id"] == id || v["payload"]["old"]["id"] == id)
    }
}

fn change_of(client: &str) -> impl Fn(&Value) -> bool + '_ {
    move |v| v["client"] == client && v["ev"] == "postgres_changes"
}

/// Three users and one whose `sub` is not a uuid (its policy raises), all on
/// the SQL path (a cast on the column is not compiled), one pool connection
/// so their checks share rounds: the raising class's channel is closed with
/// the cause, the three others get exactly their own rows — in that
/// transaction and the next ones.
#[tokio::test]
async fn a_class_that_raises_fails_alone_in_its_round() {
    let name = "rlsr_raise";
    let c = setup_db(
        name,
        &format!(
            "{}\n{}\n
             create table t (id int primary key, owner uuid, body text);
             alter table t replica identity full;
             alter table t enable row level security;
             create policy p on t for select to rlsr_u using (owner::text = auth.uid()::text);
             grant select on t to rlsr_u;",
            roles(&["rlsr_u"]),
            auth_sql()
        ),
    )
    .await;
    let server = start_with(name, name, "rls_pool = 1").await;
    let mut js = JsClient::spawn().await;
    let users = [("a", A), ("bad", "not-a-uuid"), ("b", B), ("c", C)];
    for (client, sub) in users {
        connect(&mut js, client, &server, &token("rlsr_u", sub)).await;
        join(&mut js, client, whole_table()).await;
    }
    // One transaction: a row for each good user.
    c.batch_execute(&format!(
        "begin; insert into t values (1, '{A}', 'x'); insert into t values (2, '{B}', 'x');
         insert into t values (3, '{C}', 'x'); commit;"
    ))
    .await
    .unwrap();
    let sys = js
        .wait_for("bad's system error", T, |v| {
            v["client"] == "bad" && is_on(v, "system", "t") && v["payload"]["status"] == "error"
        })
        .await;
    let text = sys.to_string();
    assert!(
        text.contains("RLS_CHECK_FAILED") && text.contains("uuid"),
        "{sys}"
    );
    for (client, id) in [("a", 1), ("b", 2), ("c", 3)] {
        js.wait_for(&format!("{client}'s row"), T, change_with_id(client, id))
            .await;
    }
    // Later transactions: still their own rows only (each client's next
    // change is its own row: nothing of the others' came first).
    c.batch_execute(&format!(
        "insert into t values (4, '{B}', 'y'); insert into t values (5, '{C}', 'y');
         insert into t values (6, '{A}', 'y');"
    ))
    .await
    .unwrap();
    for (client, id) in [("a", 6), ("b", 4), ("c", 5)] {
        let v = js
            .wait_for(&format!("{client}'s next change"), T, change_of(client))
            .await;
        assert_eq!(v["payload"]["new"]["id"], id, "{client}: {v}");
    }
    assert!(metric(server.port, "walcast_rls_rounds_total").await >= 1.0);
    assert_eq!(
        metric(server.port, "walcast_rls_unloaded_checks_total").await,
        0.0,
        "every round loaded its rows into the temp table"
    );
    assert!(metric(server.port, "walcast_rls_checks_total{result=\"error\"}").await >= 1.0);
}

/// Two classes in one round over the same loaded rows: `x` subscribed to
/// `id=eq.1` only, under a policy that raises on the other row's body
/// (`body::int`), and `y` to the whole table under a policy that does not.
/// `x` is judged on its own row only (no error), `y` on both.
#[tokio::test]
async fn a_class_is_judged_on_its_own_rows_of_the_round_only() {
    let name = "rlsr_subset";
    let c = setup_db(
        name,
        &format!(
            "{}\n{}\n
             create table t (id int primary key, owner uuid, body text);
             alter table t replica identity full;
             alter table t enable row level security;
             create policy px on t for select to rlsr_x using ((body)::int > 0);
             create policy py on t for select to rlsr_y using (length(body) > 0);
             grant select on t to rlsr_x, rlsr_y;",
            roles(&["rlsr_x", "rlsr_y"]),
            auth_sql()
        ),
    )
    .await;
    let server = start_with(name, name, "rls_pool = 1").await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "x", &server, &token("rlsr_x", A)).await;
    connect(&mut js, "y", &server, &token("rlsr_y", B)).await;
    join(
        &mut js,
        "x",
        json!({"event": "*", "schema": "public", "table": "t", "filter": "id=eq.1"}),
    )
    .await;
    join(&mut js, "y", whole_table()).await;
    c.batch_execute("begin; insert into t values (1, null, '5'); insert into t values (2, null, 'not a number'); commit;")
        .await
        .unwrap();
    js.wait_for("x's row", T, change_with_id("x", 1)).await;
    js.wait_for("y's first row", T, change_with_id("y", 1))
        .await;
    js.wait_for("y's second row", T, change_with_id("y", 2))
        .await;
    // x's channel stays open: its next row arrives (and no error before it).
    c.batch_execute("update t set body = '7' where id = 1")
        .await
        .unwrap();
    js.expect_none_before(
        "a system error for x",
        |v| v["client"] == "x" && v["ev"] == "system" && v["payload"]["status"] == "error",
        "x's update",
        |v| change_with_id("x", 1)(v) && v["payload"]["eventType"] == "UPDATE",
        T,
    )
    .await;
    assert_eq!(
        metric(server.port, "walcast_rls_unloaded_checks_total").await,
        0.0
    );
}

/// A policy that passes the row as a whole to a function (`t.*`) is judged
/// over values of the table's row type, in the same rounds.
#[tokio::test]
async fn a_policy_reading_the_whole_row_is_judged() {
    let name = "rlsr_whole";
    let c = setup_db(
        name,
        &format!(
            "{}\n{}\n
             create table t (id int primary key, owner uuid, body text);
             alter table t replica identity full;
             alter table t enable row level security;
             create function mine(r t) returns boolean language sql stable
               as 'select r.owner = auth.uid()';
             create policy p on t for select to rlsr_w using (mine(t.*));
             grant select on t to rlsr_w;",
            roles(&["rlsr_w"]),
            auth_sql()
        ),
    )
    .await;
    let server = start_with(name, name, "").await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "a", &server, &token("rlsr_w", A)).await;
    connect(&mut js, "b", &server, &token("rlsr_w", B)).await;
    join(&mut js, "a", whole_table()).await;
    join(&mut js, "b", whole_table()).await;
    c.batch_execute(&format!(
        "begin; insert into t values (1, '{B}', 'x'); insert into t values (2, '{A}', 'x'); commit;"
    ))
    .await
    .unwrap();
    let v = js.wait_for("a's row", T, change_of("a")).await;
    assert_eq!(v["payload"]["new"]["id"], 2, "{v}");
    let v = js.wait_for("b's row", T, change_of("b")).await;
    assert_eq!(v["payload"]["new"]["id"], 1, "{v}");
    // DELETE is judged on the old row image.
    c.batch_execute("delete from t where id = 2").await.unwrap();
    let v = js.wait_for("a's delete", T, change_of("a")).await;
    assert_eq!(v["payload"]["eventType"], "DELETE", "{v}");
    assert_eq!(v["payload"]["old"]["id"], 2, "{v}");
    assert_eq!(
        metric(server.port, "walcast_rls_unloaded_checks_total").await,
        0.0
    );
}

/// Review finding 1: a policy function caching a value in a transaction-local
/// setting (`set_config(…, true)`) when it is empty. Two classes (users of
/// different teams) judged in one round: each class runs in its own
/// savepoint, so the second never reads the first's cached team.
#[tokio::test]
async fn a_class_never_sees_the_settings_of_the_class_before_it() {
    let name = "rlsr_cache";
    let c = setup_db(
        name,
        &format!(
            "{}\n{}\n
             create table members (uid uuid primary key, team int);
             insert into members values ('{A}', 1), ('{B}', 2);
             create function my_team() returns int language plpgsql volatile as $f$
             declare v text := current_setting('app.team', true);
             begin
               if v is null or v = '' then
                 select m.team::text into v from public.members m where m.uid = auth.uid();
                 perform set_config('app.team', v, true);
               end if;
               return v::int;
             end $f$;
             create table t (id int primary key, team int);
             alter table t replica identity full;
             alter table t enable row level security;
             create policy p on t for select to rlsr_team using (team = my_team());
             grant select on t, members to rlsr_team;",
            roles(&["rlsr_team"]),
            auth_sql()
        ),
    )
    .await;
    let server = start_with(name, name, "rls_pool = 1").await;
    let mut js = JsClient::spawn().await;
    for (client, sub) in [("a", A), ("b", B)] {
        connect(&mut js, client, &server, &token("rlsr_team", sub)).await;
        join(&mut js, client, whole_table()).await;
    }
    c.batch_execute("begin; insert into t values (1, 1); insert into t values (2, 2); commit;")
        .await
        .unwrap();
    for (client, id) in [("a", 1), ("b", 2)] {
        let v = js
            .wait_for(&format!("{client}'s first change"), T, change_of(client))
            .await;
        assert_eq!(v["payload"]["new"]["id"], id, "{client}: {v}");
    }
    // The next round (the other order of rows): still only their own team's.
    c.batch_execute("begin; insert into t values (3, 2); insert into t values (4, 1); commit;")
        .await
        .unwrap();
    for (client, id) in [("a", 4), ("b", 3)] {
        let v = js
            .wait_for(&format!("{client}'s next change"), T, change_of(client))
            .await;
        assert_eq!(v["payload"]["new"]["id"], id, "{client}: {v}");
    }
    assert_eq!(
        metric(server.port, "walcast_rls_unloaded_checks_total").await,
        0.0
    );
}

/// Review finding 2: loading a round's images runs the CHECK of a column's
/// domain; it runs as a subscriber's role, never as walcast's own user (the
/// function bumps a sequence, which no rollback undoes, when it runs as any
/// other role).
#[tokio::test]
async fn a_domain_check_in_the_load_runs_as_a_subscriber_role() {
    let name = "rlsr_domain";
    let c = setup_db(
        name,
        &format!(
            "{}\n{}\n
             create sequence as_other;
             grant usage on sequence as_other to public;
             create function dom_ok(v text) returns boolean language plpgsql volatile as $f$
             begin
               if current_user <> 'rlsr_dom' then perform nextval('public.as_other'); end if;
               return true;
             end $f$;
             create domain checked_text as text check (dom_ok(value));
             create table t (id int primary key, owner uuid, body checked_text);
             alter table t replica identity full;
             alter table t enable row level security;
             create policy p on t for select to rlsr_dom using (owner::text = auth.uid()::text);
             create policy i on t for insert to rlsr_dom with check (true);
             grant select, insert on t to rlsr_dom;",
            roles(&["rlsr_dom"]),
            auth_sql()
        ),
    )
    .await;
    let server = start_with(name, name, "rls_pool = 1").await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "a", &server, &token("rlsr_dom", A)).await;
    join(&mut js, "a", whole_table()).await;
    // Inserted as the subscriber's role too: only walcast could bump it.
    c.batch_execute(&format!(
        "begin; set local role rlsr_dom; insert into t values (1, '{B}', 'x');
         insert into t values (2, '{A}', 'y'); commit;"
    ))
    .await
    .unwrap();
    let v = js.wait_for("a's row", T, change_of("a")).await;
    assert_eq!(v["payload"]["new"]["id"], 2, "{v}");
    let bumped: bool = c
        .query_one("select is_called from as_other", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !bumped,
        "the domain's check ran as another role than rlsr_dom"
    );
    assert_eq!(
        metric(server.port, "walcast_rls_unloaded_checks_total").await,
        0.0
    );
}

/// Review finding 3: a policy reading a system column (`tableoid`) must not
/// read the temp table's: the class covering all of the round's rows raises
/// (no such column, as on the old path) — it never gets another owner's row.
#[tokio::test]
async fn a_policy_reading_system_columns_never_reads_the_temp_table() {
    let name = "rlsr_sys";
    let c = setup_db(
        name,
        &format!(
            "{}\n{}\n
             create table t (id int primary key, owner uuid, body text);
             alter table t replica identity full;
             alter table t enable row level security;
             create policy p on t for select to rlsr_sys
               using (tableoid <> 't'::regclass or owner = auth.uid());
             grant select on t to rlsr_sys;",
            roles(&["rlsr_sys"]),
            auth_sql()
        ),
    )
    .await;
    let server = start_with(name, name, "rls_pool = 1").await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "a", &server, &token("rlsr_sys", A)).await;
    join(&mut js, "a", whole_table()).await;
    c.batch_execute(&format!(
        "begin; insert into t values (1, '{B}', 'x'); insert into t values (2, '{B}', 'y'); commit;"
    ))
    .await
    .unwrap();
    let sys = js
        .expect_none_before(
            "a change for a (all rows are B's)",
            change_of("a"),
            "a's system error",
            |v| v["client"] == "a" && is_on(v, "system", "t") && v["payload"]["status"] == "error",
            T,
        )
        .await;
    assert!(sys.to_string().contains("tableoid"), "{sys}");
}

/// Review finding 8: a real table named like a temp table of row images,
/// read unqualified by a policy, is the real one (the temp tables' names
/// carry a suffix nobody can guess).
#[tokio::test]
async fn a_real_table_named_like_a_temp_table_is_not_shadowed() {
    let name = "rlsr_shadow";
    let c = setup_db(
        name,
        &format!(
            "{}\n{}\n
             create table \"walcast rls 1\" (id int);
             create table t (id int primary key, owner uuid, body text);
             alter table t replica identity full;
             alter table t enable row level security;
             create policy p on t for select to rlsr_shadow
               using (owner = auth.uid() or exists (select 1 from \"walcast rls 1\" w where w.id = t.id));
             grant select on t, \"walcast rls 1\" to rlsr_shadow;",
            roles(&["rlsr_shadow"]),
            auth_sql()
        ),
    )
    .await;
    let server = start_with(name, name, "rls_pool = 1").await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "a", &server, &token("rlsr_shadow", A)).await;
    join(&mut js, "a", whole_table()).await;
    c.batch_execute(&format!(
        "begin; insert into t values (1, '{B}', 'x'); insert into t values (2, '{A}', 'y'); commit;"
    ))
    .await
    .unwrap();
    let v = js.wait_for("a's first change", T, change_of("a")).await;
    assert_eq!(v["payload"]["new"]["id"], 2, "{v}");
}

/// Review finding 7 (its domain part): a column of a domain over `jsonb`
/// reaches the policy as the row's JSON (not as a JSON string of it), so
/// `doc ->> 'owner'` reads the value.
#[tokio::test]
async fn a_domain_over_jsonb_reaches_the_policy_as_json() {
    let name = "rlsr_jdom";
    let c = setup_db(
        name,
        &format!(
            "{}\n{}\n
             create domain jdoc as jsonb check (jsonb_typeof(value) = 'object');
             create table t (id int primary key, doc jdoc);
             alter table t replica identity full;
             alter table t enable row level security;
             create policy p on t for select to rlsr_jdom
               using ((doc ->> 'owner') = auth.uid()::text);
             grant select on t to rlsr_jdom;",
            roles(&["rlsr_jdom"]),
            auth_sql()
        ),
    )
    .await;
    let server = start_with(name, name, "rls_pool = 1").await;
    let mut js = JsClient::spawn().await;
    connect(&mut js, "a", &server, &token("rlsr_jdom", A)).await;
    join(&mut js, "a", whole_table()).await;
    c.batch_execute(&format!(
        "begin; insert into t values (1, '{{\"owner\": \"{B}\"}}');
         insert into t values (2, '{{\"owner\": \"{A}\"}}'); commit;"
    ))
    .await
    .unwrap();
    let v = js
        .wait_for("a's row", Duration::from_secs(8), change_of("a"))
        .await;
    assert_eq!(v["payload"]["new"]["id"], 2, "{v}");
}

/// Review finding 4: a round that gets no answer in time fails no class
/// when the next try succeeds. A table the policy reads is locked, so
/// preparing the class's statement (outside the round's transaction: no
/// statement timeout) waits past walcast's deadline; the lock is released
/// once a second connection waits for it (the round tried again on a new
/// connection): every class is judged.
#[tokio::test]
async fn a_round_without_an_answer_is_tried_again() {
    let name = "rlsr_retry";
    let c = setup_db(
        name,
        &format!(
            "{}\n{}\n
             create table gate (open bool);
             insert into gate values (true);
             create table t (id int primary key, owner uuid, body text);
             alter table t replica identity full;
             alter table t enable row level security;
             create policy p on t for select to rlsr_retry
               using (owner::text = auth.uid()::text and exists (select 1 from gate where open));
             grant select on t, gate to rlsr_retry;",
            roles(&["rlsr_retry"]),
            auth_sql()
        ),
    )
    .await;
    let server = start_with(name, name, "rls_pool = 1\nrls_check_timeout_ms = 500").await;
    let mut js = JsClient::spawn().await;
    for (client, sub) in [("a", A), ("b", B)] {
        connect(&mut js, client, &server, &token("rlsr_retry", sub)).await;
        join(&mut js, client, whole_table()).await;
    }
    let mut locker = crate::support::cluster().client(name).await;
    let tx = locker.transaction().await.unwrap();
    tx.batch_execute("lock table gate in access exclusive mode")
        .await
        .unwrap();
    c.batch_execute(&format!(
        "begin; insert into t values (1, '{B}', 'x'); insert into t values (2, '{A}', 'y'); commit;"
    ))
    .await
    .unwrap();
    // Held until a second connection waits (or 4 s: without a retry, none
    // does).
    let until = std::time::Instant::now() + Duration::from_secs(4);
    loop {
        let waiting: i64 = c
            .query_one(
                "select count(*) from pg_locks where relation = 'gate'::regclass and not granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting >= 2 || std::time::Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tx.rollback().await.unwrap();
    for (client, id) in [("a", 2), ("b", 1)] {
        let v = js
            .expect_none_before(
                &format!("a system error for {client}"),
                |v| {
                    v["client"] == client
                        && is_on(v, "system", "t")
                        && v["payload"]["status"] == "error"
                },
                &format!("{client}'s row"),
                change_of(client),
                T,
            )
            .await;
        assert_eq!(v["payload"]["new"]["id"], id, "{client}: {v}");
    }
}
