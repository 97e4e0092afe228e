//! A daemon that stays up: SIGTERM while PostgreSQL does not answer, a slot or
//! publication dropped under a running walcast, `tail` and `serve` with closed
//! pipes and a restarting database, and the `system` notices clients get about
//! all of it (issue 13, items 4–8).

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use crate::support::http_get as get;
use crate::support::js::{is_on, JsClient};
use crate::support::walcast::BIN;
use crate::support::{cluster, wait_for, Cluster};

const T: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Helpers

/// A `walcast` process whose stderr (the log) is collected as it is written.
struct Daemon {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
    /// The task collecting stderr (ends at EOF, after the process exited).
    reader: Option<tokio::task::JoinHandle<()>>,
}

/// Starts `walcast serve` with `args` (plus `--listen 127.0.0.1:0` and `--log
/// info`); when `wait_listening`, waits until it says where it listens (`port`
/// is 0 otherwise).
async fn daemon(args: &[&str], wait_listening: bool) -> Daemon {
    daemon_logging(args, wait_listening, "info").await
}

/// [`daemon`] with a log filter.
async fn daemon_logging(args: &[&str], wait_listening: bool, filter: &str) -> Daemon {
    let mut child = Command::new(BIN)
        .current_dir(crate::support::scratch_dir())
        .arg("serve")
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--log", filter])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn walcast");
    let log = Arc::new(Mutex::new(String::new()));
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let sink = log.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            if std::env::var_os("WALCAST_TEST_VERBOSE").is_some() {
                eprintln!("[walcast] {l}");
            }
            let mut s = sink.lock().unwrap();
            s.push_str(&l);
            s.push('\n');
        }
    });
    let mut d = Daemon {
        child,
        port: 0,
        log,
        reader: Some(reader),
    };
    if wait_listening {
        d.wait_log("walcast: listening on ", T).await;
        d.port = d
            .log()
            .lines()
            .find_map(walcast::testing::listening_addr)
            .expect("the listening line")
            .port();
    }
    d
}

impl Daemon {
    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    async fn wait_log(&self, needle: &str, timeout: Duration) {
        let log = self.log.clone();
        wait_for(&format!("{needle:?} in the log"), timeout, || {
            let found = log.lock().unwrap().contains(needle);
            async move { found.then_some(()) }
        })
        .await;
    }

    fn sigterm(&self) {
        let pid = self.child.id().expect("running");
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM {pid}");
    }

    /// Waits for exit within `timeout`; returns the exit code.
    async fn exit_code(&mut self, timeout: Duration) -> i32 {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "walcast did not exit within {timeout:?}; log:\n{}",
                    self.log()
                )
            })
            .unwrap();
        // The last lines of the log, up to EOF.
        if let Some(r) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
        }
        status.code().unwrap_or(-1)
    }
}

async fn ready(port: u16) -> (u16, Value) {
    let (status, body) = get(port, "/ready").await;
    (status, serde_json::from_str(&body).unwrap())
}

/// The value of one metric series, exactly as exported.
async fn metric(port: u16, series: &str) -> f64 {
    let (_, text) = get(port, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("series {series} not exported"))
        .trim()
        .parse()
        .unwrap()
}

/// The `replication_blocked` check of `/ready`, if present.
fn blocked_check(r: &Value) -> Option<Value> {
    r["checks"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == "replication_blocked")
        .cloned()
}

/// A TCP proxy in front of PostgreSQL that can turn silent: while silent, it
/// accepts connections and never answers (and has cut the ones it forwarded).
struct Proxy {
    port: u16,
    silent: Arc<AtomicBool>,
    /// Connections accepted while silent.
    held: Arc<AtomicUsize>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    /// `upstream: None` = silent from the start (a server that never answers).
    async fn start(upstream: Option<u16>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent = Arc::new(AtomicBool::new(upstream.is_none()));
        let held = Arc::new(AtomicUsize::new(0));
        let (cut, cut_rx) = tokio::sync::watch::channel(0u64);
        let (s, h) = (silent.clone(), held.clone());
        tokio::spawn(async move {
            let mut parked = Vec::new();
            while let Ok((mut down, _)) = listener.accept().await {
                if s.load(Ordering::SeqCst) || upstream.is_none() {
                    h.fetch_add(1, Ordering::SeqCst);
                    parked.push(down);
                    continue;
                }
                let up_port = upstream.unwrap();
                let mut cut = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(("127.0.0.1", up_port)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            silent,
            held,
            cut,
        }
    }

    /// From now on: new connections are held unanswered, forwarded ones are cut.
    fn go_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------
// 4. SIGTERM while PostgreSQL accepts TCP and never answers

#[tokio::test]
async fn sigterm_at_startup_with_a_postgres_that_never_answers() {
    let proxy = Proxy::start(None).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/x?sslmode=disable",
        proxy.port
    );
    let mut d = daemon(&["--database-url", &url, "--create-slot"], false).await;
    wait_for("walcast to connect to the silent server", T, || {
        let n = proxy.held();
        async move { (n > 0).then_some(()) }
    })
    .await;
    let sent = Instant::now();
    d.sigterm();
    let code = d.exit_code(Duration::from_secs(5)).await;
    let log = d.log();
    assert_eq!(code, 0, "{log}");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "{:?}",
        sent.elapsed()
    );
    assert!(
        log.contains("shutdown requested while connecting to PostgreSQL"),
        "{log}"
    );
}

#[tokio::test]
async fn sigterm_during_a_reconnect_to_a_postgres_that_never_answers() {
    let db = "life_silent";
    let c = cluster().new_db(db).await;
    c.batch_execute(&format!(
        "create table t (id int primary key); create publication pub_{db} for table t"
    ))
    .await
    .unwrap();
    let proxy = Proxy::start(Some(cluster().port())).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
        proxy.port
    );
    let mut d = daemon_logging(
        &[
            "--database-url",
            &url,
            "--slot",
            &format!("slot_{db}"),
            "--publication",
            &format!("pub_{db}"),
            "--create-slot",
        ],
        true,
        "info,walcast::source::session=debug",
    )
    .await;
    d.wait_log("streaming", T).await;
    proxy.go_silent();
    // The stream is cut; walcast reconnects (after its 1 s backoff) into silence.
    d.wait_log("replication stream lost; reconnecting", T).await;
    let log = d.log.clone();
    wait_for("a reconnect attempt to the silent server", T, || {
        let attempts = log
            .lock()
            .unwrap()
            .matches("connecting to PostgreSQL")
            .count();
        let n = proxy.held();
        async move { (attempts >= 2 && n > 0).then_some(()) }
    })
    .await;
    let sent = Instant::now();
    d.sigterm();
    let code = d.exit_code(Duration::from_secs(8)).await;
    let log = d.log();
    assert_eq!(code, 0, "{log}");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
    assert!(
        log.contains("shutdown requested while connecting to PostgreSQL"),
        "{log}"
    );
}

// ---------------------------------------------------------------------------
// 5. A slot dropped while serve runs is not re-created

/// Terminates the slot's walsender and drops the slot (retrying while walcast's
/// walsender is still going away).
async fn drop_active_slot(c: &tokio_postgres::Client, slot: &str) {
    c.batch_execute(&format!(
        "do $$ begin
           for i in 1..200 loop
             perform pg_terminate_backend(active_pid) from pg_replication_slots
               where slot_name = '{slot}' and active_pid is not null;
             begin
               perform pg_drop_replication_slot('{slot}');
               return;
             exception when object_in_use then perform pg_sleep(0.02);
             end;
           end loop;
           raise exception 'slot {slot} stayed active';
         end $$"
    ))
    .await
    .unwrap();
}

async fn js_client(port: u16) -> JsClient {
    let mut js = JsClient::spawn().await;
    js.call(
        json!({"cmd": "connect", "url": format!("ws://127.0.0.1:{port}/realtime/v1"),
               "apikey": "k", "heartbeat_interval_ms": 500}),
        T,
    )
    .await;
    js
}

async fn subscribe(js: &mut JsClient, channel: &str, table: &str, config: Value) {
    js.call(
        json!({"cmd": "subscribe", "channel": channel, "config": config,
               "postgres_changes": [{"event": "*", "schema": "public", "table": table}]}),
        T,
    )
    .await;
    assert_eq!(js.status(channel, T).await, "SUBSCRIBED");
}

async fn system_with_code(js: &mut JsClient, channel: &str, code: &str) -> Value {
    js.wait_for(&format!("system {code} on {channel}"), T, |v| {
        is_on(v, "system", channel) && v["payload"]["code"] == code
    })
    .await["payload"]
        .clone()
}

async fn change_with_id(js: &mut JsClient, channel: &str, id: i64) -> Value {
    js.wait_for(&format!("change id {id} on {channel}"), T, |v| {
        is_on(v, "postgres_changes", channel) && v["payload"]["new"]["id"] == id
    })
    .await
}

#[tokio::test]
async fn a_slot_dropped_while_serving_is_critical_and_not_recreated() {
    let db = "life_slot";
    let slot = format!("slot_{db}");
    let c = cluster().new_db(db).await;
    c.batch_execute(&format!(
        "create table t (id int primary key); create publication pub_{db} for table t"
    ))
    .await
    .unwrap();
    let url = cluster().url(db);
    let d = daemon(
        &[
            "--database-url",
            &url,
            "--slot",
            &slot,
            "--publication",
            &format!("pub_{db}"),
            "--create-slot",
        ],
        true,
    )
    .await;
    let mut js = js_client(d.port).await;
    subscribe(&mut js, "room", "t", json!({})).await;
    c.batch_execute("insert into t values (1)").await.unwrap();
    change_with_id(&mut js, "room", 1).await;

    drop_active_slot(&c, &slot).await;
    let down = system_with_code(&mut js, "room", "REPLICATION_DOWN").await;
    assert_eq!(down["status"], "error");
    assert_eq!(down["extension"], "postgres_changes");
    assert_eq!(down["channel"], "room");
    assert_eq!(down["reason"], "slot_missing");
    assert!(
        down["message"].as_str().unwrap().contains("walcast setup"),
        "{down}"
    );
    let (status, r) = ready(d.port).await;
    assert_eq!(status, 503, "{r}");
    let check = blocked_check(&r).expect("a replication_blocked check");
    assert_eq!(check["value"], "slot_missing");
    assert_eq!(
        metric(
            d.port,
            "walcast_replication_blocked{reason=\"slot_missing\"}"
        )
        .await,
        1.0
    );
    assert!(d.log().contains("replication blocked"), "{}", d.log());
    // A channel that joins meanwhile is told too, after its join.
    subscribe(&mut js, "late", "t", json!({})).await;
    let late = system_with_code(&mut js, "late", "REPLICATION_DOWN").await;
    assert_eq!(late["reason"], "slot_missing");
    // walcast keeps looking (reconnect attempts go on) but never re-creates it.
    let before = metric(d.port, "walcast_replication_reconnects_total").await;
    wait_for("two more attempts", T, || async {
        (metric(d.port, "walcast_replication_reconnects_total").await >= before + 2.0).then_some(())
    })
    .await;
    let exists = c
        .query_opt(
            "select 1 from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    assert!(exists.is_none(), "walcast re-created the dropped slot");
    c.batch_execute("insert into t values (2)").await.unwrap();

    // The operator re-creates it: walcast resumes and reports the gap.
    let (ok, out, err) = crate::support::walcast::run(
        &[
            "setup",
            "--database-url",
            &url,
            "--publication",
            &format!("pub_{db}"),
            "--slot",
            &slot,
            "--create-slot",
        ],
        T,
    )
    .await;
    assert!(ok, "{out}{err}");
    let gap = system_with_code(&mut js, "room", "REPLICATION_GAP").await;
    assert_eq!(gap["status"], "error");
    assert!(
        gap["from_lsn"].is_string() && gap["to_lsn"].is_string(),
        "{gap}"
    );
    system_with_code(&mut js, "room", "REPLICATION_OK").await;
    c.batch_execute("insert into t values (3)").await.unwrap();
    change_with_id(&mut js, "room", 3).await;
    assert!(d.log().contains("replication gap"), "{}", d.log());
    assert_eq!(metric(d.port, "walcast_replication_gaps_total").await, 1.0);
    wait_for("/ready 200 again", T, || async {
        (ready(d.port).await.0 == 200).then_some(())
    })
    .await;
    js.exit().await;
}

// ---------------------------------------------------------------------------
// 6. A publication dropped and re-created under a running walcast

#[tokio::test]
async fn a_recreated_publication_holds_with_the_right_advice_and_no_redelivery() {
    let db = "life_pub";
    let slot = format!("slot_{db}");
    let publication = format!("pub_{db}");
    let c = cluster().new_db(db).await;
    c.batch_execute(&format!(
        "create table t (id int primary key); create publication {publication} for table t"
    ))
    .await
    .unwrap();
    let d = daemon(
        &[
            "--database-url",
            &cluster().url(db),
            "--slot",
            &slot,
            "--publication",
            &publication,
            "--create-slot",
        ],
        true,
    )
    .await;
    let mut js = js_client(d.port).await;
    subscribe(&mut js, "room", "t", json!({})).await;
    c.batch_execute("insert into t values (1)").await.unwrap();
    change_with_id(&mut js, "room", 1).await;

    // Drop, write, re-create: the slot cannot decode the write in between.
    c.batch_execute(&format!(
        "drop publication {publication}; insert into t values (2); \
         create publication {publication} for table t; insert into t values (3)"
    ))
    .await
    .unwrap();
    let r = wait_for(
        "/ready blocked by the re-created publication",
        T,
        || async {
            let (status, r) = ready(d.port).await;
            let check = blocked_check(&r)?;
            (status == 503 && check["value"] == "publication_recreated").then_some(check)
        },
    )
    .await;
    let advice = r["message"].as_str().unwrap();
    assert!(
        advice.contains("pg_replication_slot_advance") && advice.contains("--create-slot"),
        "{advice}"
    );
    assert!(!advice.contains("create it with"), "{advice}");
    let down = system_with_code(&mut js, "room", "REPLICATION_DOWN").await;
    assert_eq!(down["reason"], "publication_recreated");
    assert!(d.log().contains("replication blocked"), "{}", d.log());
    // Held: no reconnect loop while blocked (it would re-read row 1 every time).
    let reconnects = metric(d.port, "walcast_replication_reconnects_total").await;

    // The operator skips past the undecodable changes.
    c.batch_execute(&format!(
        "select pg_replication_slot_advance('{slot}', pg_current_wal_lsn())"
    ))
    .await
    .unwrap();
    system_with_code(&mut js, "room", "REPLICATION_GAP").await;
    system_with_code(&mut js, "room", "REPLICATION_OK").await;
    c.batch_execute("insert into t values (4)").await.unwrap();
    change_with_id(&mut js, "room", 4).await;
    assert!(
        metric(d.port, "walcast_replication_reconnects_total").await <= reconnects + 1.0,
        "walcast kept reconnecting while blocked"
    );
    let ones = js
        .drain()
        .into_iter()
        .filter(|v| is_on(v, "postgres_changes", "room") && v["payload"]["new"]["id"] == 1)
        .count();
    assert_eq!(ones, 0, "row 1 was delivered again");
    js.exit().await;
}

// ---------------------------------------------------------------------------
// 7. Closed pipes and a restarting database

async fn tail_proc(url: &str, slot: &str, publication: &str) -> Child {
    Command::new(BIN)
        .args([
            "tail",
            "--database-url",
            url,
            "--slot",
            slot,
            "--publication",
            publication,
            "--create-slot",
        ])
        .env("WALCAST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn walcast tail")
}

#[tokio::test]
async fn tail_exits_quietly_when_its_reader_goes_away() {
    let db = "life_tail_pipe";
    let c = cluster().new_db(db).await;
    c.batch_execute(&format!(
        "create table t (id int primary key); create publication pub_{db} for table t"
    ))
    .await
    .unwrap();
    let mut tail = tail_proc(
        &cluster().url(db),
        &format!("slot_{db}"),
        &format!("pub_{db}"),
    )
    .await;
    let mut out = BufReader::new(tail.stdout.take().unwrap()).lines();
    // `head -n 1`: read one line, then close the pipe.
    let first = loop {
        c.batch_execute("insert into t select coalesce(max(id), 0) + 1 from t")
            .await
            .unwrap();
        if let Ok(Ok(Some(l))) =
            tokio::time::timeout(Duration::from_millis(500), out.next_line()).await
        {
            break l;
        }
    };
    assert!(first.contains("\"INSERT\""), "{first}");
    drop(out);
    c.batch_execute(
        "insert into t select max(id) + 1 from t; insert into t select max(id) + 1 from t",
    )
    .await
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), tail.wait())
        .await
        .expect("tail exits once its stdout is closed")
        .unwrap();
    let mut err = String::new();
    tail.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert!(status.success(), "{status:?}: {err}");
    assert!(err.is_empty(), "{err}");
}

async fn read_id(out: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>, want: i64) {
    let l = tokio::time::timeout(T, out.next_line())
        .await
        .expect("a line in time")
        .unwrap()
        .expect("tail still running");
    let v: Value = serde_json::from_str(&l).unwrap();
    assert_eq!(v["record"]["id"], want, "{l}");
}

#[tokio::test]
async fn tail_survives_a_database_restart() {
    let db = "life_tail_restart";
    let pg = Cluster::start(&[]);
    let c = pg.new_db(db).await;
    c.batch_execute(&format!(
        "create table t (id int primary key); create publication pub_{db} for table t"
    ))
    .await
    .unwrap();
    let mut tail = tail_proc(&pg.url(db), &format!("slot_{db}"), &format!("pub_{db}")).await;
    let mut out = BufReader::new(tail.stdout.take().unwrap()).lines();
    let mut err = BufReader::new(tail.stderr.take().unwrap()).lines();
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(l)) = err.next_line().await {
            sink.lock().unwrap().push_str(&(l + "\n"));
        }
    });
    // tail has created its slot once it printed a change.
    wait_for("tail's slot", T, || async {
        c.query_opt(
            "select 1 from pg_replication_slots where slot_name = $1",
            &[&format!("slot_{db}")],
        )
        .await
        .unwrap()
        .map(|_| ())
    })
    .await;
    c.batch_execute("insert into t values (1)").await.unwrap();
    read_id(&mut out, 1).await;

    // `pg_ctl restart -m fast`: stop (fast) and start.
    pg.stop();
    pg.restart();
    let c = pg.client(db).await;
    c.batch_execute("insert into t values (2)").await.unwrap();
    read_id(&mut out, 2).await;
    assert!(tail.try_wait().unwrap().is_none(), "tail exited");
    let text = log.lock().unwrap().clone();
    assert!(text.contains("reconnecting"), "{text}");
    assert!(!text.contains("protocol error"), "{text}");
    drop(tail);
    pg.stop();
}

#[tokio::test]
async fn serve_keeps_running_when_its_stderr_is_closed() {
    let db = "life_stderr";
    let c = cluster().new_db(db).await;
    c.batch_execute(&format!(
        "create table t (id int primary key); create publication pub_{db} for table t"
    ))
    .await
    .unwrap();
    let slot = format!("slot_{db}");
    let mut child = Command::new(BIN)
        .current_dir(crate::support::scratch_dir())
        .args([
            "serve",
            "--database-url",
            &cluster().url(db),
            "--slot",
            &slot,
        ])
        .args([
            "--publication",
            &format!("pub_{db}"),
            "--create-slot",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--log", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // `2>&1 | head -n …`: read up to the line saying where it listens, then the
    // pipe is closed.
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    let (port, _) = crate::support::walcast::read_listening(&mut err, T, |_| {}).await;
    drop(err);
    // Make it log: end its replication connection; it warns and reconnects.
    wait_for("walcast listening", T, || async {
        TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    // Streaming, by walcast's own word: while the slot is being created it is
    // active too, under the creating connection.
    wait_for("streaming", T, || async {
        (metric(port, "walcast_replication_connected").await == 1.0).then_some(())
    })
    .await;
    c.batch_execute(&format!(
        "select pg_terminate_backend(active_pid) from pg_replication_slots where slot_name = '{slot}'"
    ))
    .await
    .unwrap();
    let deadline = Instant::now() + T;
    loop {
        if metric(port, "walcast_replication_reconnects_total").await >= 1.0
            && metric(port, "walcast_replication_connected").await == 1.0
        {
            break;
        }
        if Instant::now() > deadline {
            let (_, m) = get(port, "/metrics").await;
            let (_, r) = get(port, "/ready").await;
            panic!("no reconnect after the logged warning within {T:?}; /ready {r}\n{m}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(child.try_wait().unwrap().is_none(), "walcast exited");
    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(T, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

// ---------------------------------------------------------------------------
// 8. Outage notices and replication_ready, with the real realtime-js

#[tokio::test]
async fn realtime_js_hears_replication_down_and_ok() {
    let db = "life_outage";
    let pg = Cluster::start(&[]);
    let c = pg.new_db(db).await;
    c.batch_execute(&format!(
        "create table t (id int primary key); create publication pub_{db} for table t"
    ))
    .await
    .unwrap();
    let cfg = config_file_named("outage", "[server]\noutage_notice_secs = 1\n");
    let d = daemon(
        &[
            "--database-url",
            &pg.url(db),
            "--slot",
            &format!("slot_{db}"),
            "--publication",
            &format!("pub_{db}"),
            "--create-slot",
            "--config",
            cfg.to_str().unwrap(),
        ],
        true,
    )
    .await;
    let mut js = js_client(d.port).await;
    subscribe(
        &mut js,
        "room",
        "t",
        json!({"broadcast": {"replication_ready": true}}),
    )
    .await;
    let ready_msg = js
        .wait_for("replication ready", T, |v| {
            is_on(v, "system", "room") && v["payload"]["extension"] == "system"
        })
        .await;
    assert_eq!(ready_msg["payload"]["status"], "ok", "{ready_msg}");
    assert_eq!(
        ready_msg["payload"]["message"],
        "Replication connection established"
    );

    pg.stop();
    let down = system_with_code(&mut js, "room", "REPLICATION_DOWN").await;
    assert_eq!(down["status"], "error");
    assert_eq!(down["extension"], "postgres_changes");
    assert_eq!(down["channel"], "room");
    assert_eq!(down["reason"], "disconnected");
    // Still subscribed: the channel is not closed by an outage.
    let state = js.call(json!({"cmd": "state"}), T).await;
    assert_eq!(state["channels"]["room"], "joined", "{state}");

    pg.restart();
    system_with_code(&mut js, "room", "REPLICATION_OK").await;
    let c = pg.client(db).await;
    c.batch_execute("insert into t values (1)").await.unwrap();
    change_with_id(&mut js, "room", 1).await;
    js.exit().await;
    pg.stop();
    let _ = std::fs::remove_file(cfg);
}

#[tokio::test]
async fn replication_ready_is_an_error_when_replication_is_not_ready_in_time() {
    // Replication that cannot become ready: the slot was dropped (and walcast
    // does not re-create it).
    let db = "life_ready_err";
    let slot = format!("slot_{db}");
    let c = cluster().new_db(db).await;
    c.batch_execute(&format!(
        "create table t (id int primary key); create publication pub_{db} for table t"
    ))
    .await
    .unwrap();
    let cfg = config_file_named(
        "ready_err",
        "[server]\nreplication_ready_timeout_secs = 1\n",
    );
    let d = daemon(
        &[
            "--database-url",
            &cluster().url(db),
            "--slot",
            &slot,
            "--publication",
            &format!("pub_{db}"),
            "--create-slot",
            "--config",
            cfg.to_str().unwrap(),
        ],
        true,
    )
    .await;
    drop_active_slot(&c, &slot).await;
    wait_for("blocked", T, || async {
        blocked_check(&ready(d.port).await.1).map(|_| ())
    })
    .await;
    let mut js = js_client(d.port).await;
    subscribe(
        &mut js,
        "late",
        "t",
        json!({"broadcast": {"replication_ready": true}}),
    )
    .await;
    let v = js
        .wait_for("replication not ready", T, |v| {
            is_on(v, "system", "late") && v["payload"]["extension"] == "system"
        })
        .await;
    assert_eq!(v["payload"]["status"], "error", "{v}");
    js.exit().await;
    let _ = std::fs::remove_file(cfg);
}

/// A config file for this file's tests.
fn config_file_named(name: &str, toml: &str) -> std::path::PathBuf {
    crate::support::config_file(&format!("lifecycle-{name}"), toml)
}
