//! `walcast log` against the log a running `walcast serve` writes: every change
//! once, in commit order, with exact values; `--table`, `--since` (an LSN and a
//! timestamp from an earlier line), `--until`, `--limit` and `--messages`; clear
//! errors with a nonzero exit for a bad directory, a bad `--since` and a gap.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use walcast::lsn::Lsn;

use crate::support::walcast::{run, serve};
use crate::support::{cluster, http_get, wait_for};

const T: Duration = Duration::from_secs(30);

/// Runs `walcast log` with `args`: (success, JSON lines, raw stdout, stderr).
async fn log(args: &[&str]) -> (bool, Vec<Value>, String, String) {
    let mut all = vec!["log"];
    all.extend_from_slice(args);
    let (ok, out, err) = run(&all, T).await;
    let lines = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (ok, lines, out, err)
}

/// Runs `sql` in one transaction; returns its xid.
async fn txn(c: &mut tokio_postgres::Client, sql: &str) -> u32 {
    let t = c.transaction().await.unwrap();
    t.batch_execute(sql).await.unwrap();
    let xid: i64 = t
        .query_one("select txid_current()", &[])
        .await
        .unwrap()
        .get(0);
    t.commit().await.unwrap();
    (xid & 0xFFFF_FFFF) as u32
}

/// What a line must say, apart from its commit position and time.
fn want(xid: u32, kind: &str, table: &str, record: Option<Value>, old: Option<Value>) -> Value {
    let mut v = json!({"xid": xid, "type": kind, "schema": "public", "table": table});
    if let Some(r) = record {
        v["record"] = r;
    }
    if let Some(o) = old {
        v["old_record"] = o;
    }
    v
}

fn without_position(l: &Value) -> Value {
    let mut v = l.clone();
    let o = v.as_object_mut().unwrap();
    o.remove("commit_lsn");
    o.remove("commit_timestamp");
    v
}

/// The exact text of a row image (`record`, `old_record`) in a JSON object.
fn rows(text: &str) -> (Option<String>, Option<String>) {
    #[derive(serde::Deserialize)]
    struct Rows<'a> {
        #[serde(borrow)]
        record: Option<&'a RawValue>,
        #[serde(borrow)]
        old_record: Option<&'a RawValue>,
    }
    let r: Rows = serde_json::from_str(text).unwrap();
    (
        r.record.map(|v| v.get().to_string()),
        r.old_record.map(|v| v.get().to_string()),
    )
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next frame of `event` on `ws` (vsn 1.0.0), as text.
async fn next_frame(ws: &mut Ws, event: &str) -> String {
    loop {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .expect("no frame in time")
            .expect("socket ended")
            .expect("socket error");
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["event"] == event {
                return t.to_string();
            }
        }
    }
}

fn lsn_of(l: &Value) -> Lsn {
    l["commit_lsn"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn walcast_log_prints_what_a_running_walcast_logged() {
    let db = "logcli";
    let slot = "slot_logcli";
    let publication = "pub_logcli";
    let mut c = cluster().new_db(db).await;
    c.batch_execute(&format!(
        "create table accounts (id int primary key, name text, balance numeric, meta jsonb, big int8);
         alter table accounts replica identity full;
         create table events (id bigint primary key, kind text, tags text[]);
         create table other (id int primary key);
         create publication {publication} for all tables;"
    ))
    .await
    .unwrap();
    crate::support::create_slot(&c, slot).await;
    let (dir, log_dir, config) = crate::support::log_dir_config();
    let url = cluster().url(db);
    let mut server = serve(
        &url,
        slot,
        publication,
        &["--config", config.to_str().unwrap()],
    )
    .await;

    // A live subscriber to every table, to compare with what the log prints.
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url("1.0.0"))
        .await
        .unwrap();
    let join = json!({"topic": "realtime:audit", "event": "phx_join", "ref": "1", "join_ref": "1",
        "payload": {"config": {"postgres_changes": [{"event": "*", "schema": "public"}]}}});
    ws.send(Message::Text(join.to_string().into()))
        .await
        .unwrap();
    let subscribed = next_frame(&mut ws, "system").await;
    assert!(
        subscribed.contains("Subscribed to PostgreSQL"),
        "{subscribed}"
    );

    // Two tables, inserts, updates and deletes, some transactions touching both.
    let x1 = txn(
        &mut c,
        "insert into accounts values (1, 'ann', 10.50, '{\"a\": [1, \"é\"]}', 9007199254740993);
         insert into events values (1, 'open', '{x,\"y z\"}')",
    )
    .await;
    let x2 = txn(
        &mut c,
        "insert into accounts values (2, 'bob', null, null, -1)",
    )
    .await;
    let x3 = txn(
        &mut c,
        "update accounts set balance = 20, name = 'ann \"a\"' where id = 1",
    )
    .await;
    let x4 = txn(&mut c, "delete from events where id = 1").await;
    let x5 = txn(
        &mut c,
        "insert into events values (2, 'close', null); update events set kind = 'closed' where id = 2;
         select pg_logical_emit_message(true, 'walcast.broadcast', '{\"topic\": \"room\", \"event\": \"e\", \"payload\": {\"n\": 1}}');
         delete from accounts where id = 2",
    )
    .await;
    let x6 = txn(&mut c, "insert into other values (7)").await;
    let x7 = txn(&mut c, "truncate other").await;

    // The log holds transactions in commit order: once the last one (x7, the
    // second change of `other`) can be read, every earlier one can.
    let d = log_dir.to_str().unwrap();
    wait_for("walcast to log the last transaction", T, || async {
        let (_, lines, _, _) = log(&["--dir", d, "--table", "public.other"]).await;
        (lines.len() == 2).then_some(())
    })
    .await;

    // Everything, while walcast is running and writing the same directory.
    let (ok, lines, raw, err) = log(&["--dir", d]).await;
    assert!(ok, "{err}");
    let ann = json!({"id": 1, "name": "ann", "balance": 10.50, "meta": {"a": [1, "é"]}, "big": 9007199254740993u64});
    let ann2 = json!({"id": 1, "name": "ann \"a\"", "balance": 20, "meta": {"a": [1, "é"]}, "big": 9007199254740993u64});
    let bob = json!({"id": 2, "name": "bob", "balance": null, "meta": null, "big": -1});
    let expected = vec![
        want(x1, "INSERT", "accounts", Some(ann.clone()), None),
        want(
            x1,
            "INSERT",
            "events",
            Some(json!({"id": 1, "kind": "open", "tags": ["x", "y z"]})),
            None,
        ),
        want(x2, "INSERT", "accounts", Some(bob.clone()), None),
        want(x3, "UPDATE", "accounts", Some(ann2), Some(ann)),
        want(x4, "DELETE", "events", None, Some(json!({"id": 1}))),
        want(
            x5,
            "INSERT",
            "events",
            Some(json!({"id": 2, "kind": "close", "tags": null})),
            None,
        ),
        want(
            x5,
            "UPDATE",
            "events",
            Some(json!({"id": 2, "kind": "closed", "tags": null})),
            // Identity DEFAULT: the key, as the live path sends it.
            Some(json!({"id": 2})),
        ),
        want(x5, "DELETE", "accounts", None, Some(bob)),
        want(x6, "INSERT", "other", Some(json!({"id": 7})), None),
        want(x7, "TRUNCATE", "other", None, None),
    ];
    let got: Vec<Value> = lines.iter().map(without_position).collect();
    for (i, (g, w)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, w, "line {i} of\n{raw}");
    }
    assert_eq!(got.len(), expected.len(), "{raw}");
    // Values exactly as the live path renders them: numerics keep their digits,
    // int8 above 2^53 stays exact.
    assert!(raw.contains("\"balance\":10.50,"), "{raw}");
    assert!(raw.contains("\"big\":9007199254740993"), "{raw}");
    // Rows byte for byte as the live path sent them to the subscriber.
    for (i, line) in raw.lines().enumerate() {
        let frame = next_frame(&mut ws, "postgres_changes").await;
        let data: Value = serde_json::from_str(&frame).unwrap();
        let data = &data["payload"]["data"];
        assert_eq!(
            (&data["type"], &data["table"], &data["commit_lsn"]),
            (
                &lines[i]["type"],
                &lines[i]["table"],
                &lines[i]["commit_lsn"]
            ),
            "{frame}"
        );
        let payload_text = {
            #[derive(serde::Deserialize)]
            struct F<'a> {
                #[serde(borrow)]
                payload: P<'a>,
            }
            #[derive(serde::Deserialize)]
            struct P<'a> {
                #[serde(borrow)]
                data: &'a RawValue,
            }
            let f: F = serde_json::from_str(&frame).unwrap();
            f.payload.data.get().to_string()
        };
        assert_eq!(
            rows(&payload_text),
            rows(line),
            "line {i}: {line}\nframe: {frame}"
        );
    }

    // Commit order, one position per transaction, times with microseconds.
    let xids = [x1, x1, x2, x3, x4, x5, x5, x5, x6, x7];
    for (i, l) in lines.iter().enumerate() {
        let ts = l["commit_timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
        if i > 0 {
            let same_txn = xids[i] == xids[i - 1];
            assert_eq!(lsn_of(l) == lsn_of(&lines[i - 1]), same_txn, "{raw}");
            assert!(lsn_of(l) >= lsn_of(&lines[i - 1]), "commit order: {raw}");
        }
    }

    // --table, repeatable, with schema.*.
    let (ok, only, _, _) = log(&["--dir", d, "--table", "public.events"]).await;
    assert!(ok);
    assert_eq!(
        only,
        lines
            .iter()
            .filter(|l| l["table"] == "events")
            .cloned()
            .collect::<Vec<_>>()
    );
    let (_, two, _, _) = log(&["--dir", d, "--table", "events", "--table", "public.other"]).await;
    assert_eq!(
        two,
        lines
            .iter()
            .filter(|l| l["table"] != "accounts")
            .cloned()
            .collect::<Vec<_>>()
    );
    let (_, all, _, _) = log(&["--dir", d, "--table", "public.*"]).await;
    assert_eq!(all, lines);

    // --since a line's LSN or timestamp: right after that transaction (x3's).
    let after_x3: Vec<Value> = lines[4..].to_vec();
    let (ok, since_lsn, _, err) = log(&[
        "--dir",
        d,
        "--since",
        lines[3]["commit_lsn"].as_str().unwrap(),
    ])
    .await;
    assert!(ok, "{err}");
    assert_eq!(since_lsn, after_x3);
    let (ok, since_ts, _, err) = log(&[
        "--dir",
        d,
        "--since",
        lines[3]["commit_timestamp"].as_str().unwrap(),
    ])
    .await;
    assert!(ok, "{err}");
    assert_eq!(since_ts, after_x3);
    // A transaction's first line works as well as its last (x1 has two).
    let (_, since_x1, _, _) = log(&[
        "--dir",
        d,
        "--since",
        lines[0]["commit_lsn"].as_str().unwrap(),
    ])
    .await;
    assert_eq!(since_x1, lines[2..].to_vec());

    // --until (inclusive), by LSN and by time, and with --since.
    let (_, until, _, _) = log(&[
        "--dir",
        d,
        "--until",
        lines[3]["commit_lsn"].as_str().unwrap(),
    ])
    .await;
    assert_eq!(until, lines[..4].to_vec());
    let (_, until_ts, _, _) = log(&[
        "--dir",
        d,
        "--until",
        lines[3]["commit_timestamp"].as_str().unwrap(),
    ])
    .await;
    assert_eq!(until_ts, lines[..4].to_vec());
    let (_, between, _, _) = log(&[
        "--dir",
        d,
        "--since",
        lines[2]["commit_lsn"].as_str().unwrap(),
        "--until",
        lines[4]["commit_lsn"].as_str().unwrap(),
    ])
    .await;
    assert_eq!(between, lines[3..5].to_vec());

    // --limit: exactly N lines (here cutting x5 after its first line).
    let (_, limited, _, _) = log(&["--dir", d, "--limit", "6"]).await;
    assert_eq!(limited, lines[..6].to_vec());
    let (_, limited, _, _) = log(&[
        "--dir",
        d,
        "--since",
        lines[3]["commit_lsn"].as_str().unwrap(),
        "--limit",
        "1",
    ])
    .await;
    assert_eq!(limited, lines[4..5].to_vec());

    // --messages: the database broadcast in x5, its content as JSON, in its place.
    let (_, with_messages, _, _) =
        log(&["--dir", d, "--messages", "--table", "public.events"]).await;
    let m: Vec<&Value> = with_messages
        .iter()
        .filter(|l| l["type"] == "MESSAGE")
        .collect();
    assert_eq!(m.len(), 1, "{with_messages:?}");
    assert_eq!(m[0]["prefix"], "walcast.broadcast");
    assert_eq!(m[0]["content"]["payload"], json!({"n": 1}));
    assert_eq!(m[0]["xid"], json!(x5));
    assert_eq!(m[0]["commit_lsn"], lines[5]["commit_lsn"]);

    // --config instead of --dir: its [log] dir.
    let (ok, via_config, _, err) = log(&["--config", config.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    assert_eq!(via_config, lines);

    // Clear errors, nonzero exits, nothing on stdout.
    let missing = dir.path().join("missing");
    let (ok, _, out, err) = log(&["--dir", missing.to_str().unwrap()]).await;
    assert!(!ok && out.is_empty());
    assert!(
        err.contains("no change log at") && err.contains("no such directory"),
        "{err}"
    );
    let (ok, _, out, err) = log(&["--dir", dir.path().to_str().unwrap()]).await;
    assert!(!ok && out.is_empty());
    assert!(err.contains("not a walcast change log"), "{err}");
    let (ok, _, out, err) = log(&["--dir", d, "--since", "yesterday"]).await;
    assert!(!ok && out.is_empty());
    assert!(err.contains("invalid position"), "{err}");
    let (ok, _, out, err) = log(&[]).await;
    assert!(!ok && out.is_empty());
    assert!(err.contains("pass --dir"), "{err}");
    // Older than the log reaches: a gap, naming the oldest position available.
    for old in ["0/1", "2001-01-01T00:00:00Z"] {
        let (ok, _, out, err) = log(&["--dir", d, "--since", old]).await;
        assert!(!ok && out.is_empty(), "{old}");
        assert!(err.contains("older than the change log reaches"), "{err}");
        assert!(
            err.contains(&format!(
                "oldest change available is the transaction committed at {}",
                lines[0]["commit_lsn"].as_str().unwrap()
            )),
            "{err}"
        );
    }

    // The daemon's gauges say the same: its size, and the range these lines span.
    let (status, metrics) = http_get(server.port, "/metrics").await;
    assert_eq!(status, 200);
    let gauge = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing: {metrics}"))
    };
    assert!(gauge("walcast_log_bytes") > 0.0);
    assert_eq!(gauge("walcast_log_segments"), 1.0);
    assert_eq!(
        gauge("walcast_log_oldest_commit_lsn"),
        lsn_of(&lines[0]).0 as f64
    );
    assert_eq!(
        gauge("walcast_log_newest_commit_lsn"),
        lsn_of(lines.last().unwrap()).0 as f64
    );
    assert!((0.0..T.as_secs_f64()).contains(&gauge("walcast_log_oldest_age_seconds")));
    assert_eq!(gauge("walcast_log_writable"), 1.0);
    let (status, ready) = http_get(server.port, "/ready").await;
    assert_eq!(status, 200, "{ready}");
    assert!(ready.contains("\"log_writable\""), "{ready}");

    // walcast was running all along and is still fine.
    assert!(
        server.proc.child.try_wait().unwrap().is_none(),
        "walcast exited"
    );
    server.proc.signal(15);
    let _ = tokio::time::timeout(T, server.proc.child.wait()).await;
}
