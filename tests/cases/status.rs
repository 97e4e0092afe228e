//! The live status page: in a real headless Chromium (Debian's `chromium`, driven
//! by `tests/js/status-page.mjs` through puppeteer-core), who may open it, what
//! its feed holds, and `walcast status --url`.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::ws::setup_db;
use crate::support::js::{is, JsClient};
use crate::support::walcast::{self, serve, serve_on, Server};
use crate::support::{cluster, Cluster};

const T: Duration = Duration::from_secs(20);
const SECRET: &str = "walcast-status-test-secret-with-enough-bytes";

fn jwt(role: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"role": role, "sub": "u1", "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// An HTTP/1.0 GET to `addr` with extra headers: (status, body).
async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut raw))
        .await
        .expect("HTTP response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    (status, body.to_string())
}

/// An open `/status/events` stream, read as text.
struct Events {
    sock: tokio::net::TcpStream,
    text: String,
}

impl Events {
    async fn open(addr: SocketAddr, path: &str) -> Events {
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        sock.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut e = Events {
            sock,
            text: String::new(),
        };
        e.until("the hello event", T, |t| t.contains("event: hello"))
            .await;
        assert!(e.text.starts_with("HTTP/1.1 200"), "{}", e.text);
        e
    }

    /// Reads until `pred` holds for everything read so far.
    async fn until(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = [0u8; 16384];
        while !pred(&self.text) {
            let n = tokio::time::timeout_at(deadline, self.sock.read(&mut buf))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no {what} within {timeout:?}; read:\n{}",
                        &self.text[self.text.len().saturating_sub(3000)..]
                    )
                })
                .unwrap();
            assert!(n > 0, "the event stream ended before {what}");
            self.text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }

    /// The `change` events read so far.
    fn changes(&self) -> Vec<Value> {
        self.text
            .split("event: change\n")
            .skip(1)
            .filter_map(|c| {
                let line = c.lines().find(|l| l.starts_with("data: "))?;
                serde_json::from_str(&line["data: ".len()..]).ok()
            })
            .collect()
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One of this machine's non-loopback addresses (`hostname -I`, else the
/// address of the default route), if it has one.
fn outside_address() -> Option<IpAddr> {
    let from_hostname = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|w| w.parse::<IpAddr>().ok())
                .find(|ip| ip.is_ipv4() && !ip.is_loopback())
        });
    from_hostname.or_else(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        s.connect("192.0.2.1:9").ok()?;
        let ip = s.local_addr().ok()?.ip();
        (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
    })
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("walcast.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------
// Access

#[tokio::test]
async fn status_without_auth_is_loopback_only_unless_the_status_token_is_sent() {
    let Some(outside) = outside_address() else {
        eprintln!("SKIPPED: this machine has no non-loopback address to test from");
        return;
    };
    let db = "status_access_noauth";
    let _c = setup_db(db, "create table t (id int primary key)").await;
    let dir = tempfile::tempdir().unwrap();
    // A short request deadline: the event stream must outlive it.
    let config = write_config(
        &dir,
        "[server]\nheader_timeout_secs = 1\n[status]\ntoken = \"ops-secret-token\"\n",
    );
    let server = serve_on(
        "0.0.0.0",
        &cluster().url(db),
        &format!("slot_{db}"),
        &format!("pub_{db}"),
        &["--create-slot", "--auth-mode", "none", "--config", &config],
    )
    .await;
    let inside = loopback(server.port);
    let outside = SocketAddr::new(outside, server.port);
    for path in ["/status", "/status.json", "/status/events"] {
        let (code, body) = get(outside, path, &[]).await;
        assert_eq!(code, 403, "anonymous {path} from {outside}: {body}");
        assert!(body.contains("loopback"), "{body}");
        assert!(!body.contains("replication"), "{body}");
        let (code, _) = get(outside, path, &[("authorization", "Bearer wrong")]).await;
        assert_eq!(code, 403, "{path} with a wrong token");
    }
    let (code, body) = get(inside, "/status.json", &[]).await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["replication"]["connected"], true, "{v}");
    let (code, body) = get(
        outside,
        "/status.json",
        &[("authorization", "Bearer ops-secret-token")],
    )
    .await;
    assert_eq!(code, 200, "the status token from outside: {body}");
    let (code, body) = get(outside, "/status?apikey=ops-secret-token", &[]).await;
    assert_eq!(code, 200);
    assert!(body.contains("<title>walcast status</title>"), "{body}");

    // The event stream is not cut by the 1 s request deadline: three snapshots
    // (one a second) arrive on one connection.
    let mut ev = Events::open(inside, "/status/events").await;
    ev.until("three snapshots", Duration::from_secs(6), |t| {
        t.matches("event: snapshot").count() >= 3
    })
    .await;
}

#[tokio::test]
async fn status_with_jwt_auth_admits_bypass_roles_only_and_shows_keys_not_rows() {
    let db = "status_access_jwt";
    let c = setup_db(
        db,
        "create table accounts (id int primary key, secret text);
         alter table accounts replica identity full;",
    )
    .await;
    let server = serve(
        &cluster().url(db),
        &format!("slot_{db}"),
        &format!("pub_{db}"),
        &[
            "--create-slot",
            "--auth-mode",
            "jwt",
            "--jwt-secret",
            SECRET,
        ],
    )
    .await;
    let addr = loopback(server.port);
    let customer = jwt("authenticated");
    let staff = jwt("service_role");
    for path in ["/status", "/status.json", "/status/events"] {
        let (code, body) = get(addr, path, &[]).await;
        assert_eq!(
            code, 401,
            "{path} without a token, even from loopback: {body}"
        );
        let (code, body) = get(addr, &format!("{path}?apikey={customer}"), &[]).await;
        assert_eq!(code, 403, "{path} with a customer token: {body}");
        assert!(!body.contains("replication") && !body.contains("accounts"));
        let (code, body) = get(
            addr,
            &format!("{path}?apikey=not-a-jwt"),
            &[("x-unused", "1")],
        )
        .await;
        assert_eq!(code, 401, "{path} with garbage: {body}");
    }
    let (code, body) = get(
        addr,
        "/status.json",
        &[("authorization", &format!("Bearer {staff}"))],
    )
    .await;
    assert_eq!(code, 200, "{body}");

    // The staff viewer's feed: keys, never other columns, also for a table
    // whose replica identity sends every column as "key".
    let mut ev = Events::open(addr, &format!("/status/events?apikey={staff}")).await;
    c.batch_execute("insert into accounts values (7, 'hunter2-row-secret')")
        .await
        .unwrap();
    ev.until("the change of accounts", T, |t| {
        t.contains("public.accounts")
    })
    .await;
    // The primary key of an identity-FULL table is read from the catalog after
    // its first change; later changes carry it.
    let started = Instant::now();
    let mut id = 8;
    loop {
        c.batch_execute(&format!(
            "insert into accounts values ({id}, 'hunter2-row-secret')"
        ))
        .await
        .unwrap();
        let want = format!("[\"id\",\"{id}\"]");
        let found = tokio::time::timeout(
            Duration::from_millis(1500),
            ev.until("the keyed change", T, |t| t.contains(&want)),
        )
        .await;
        if found.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no change with its key: {}",
            ev.text
        );
        id += 1;
    }
    let changes = ev.changes();
    assert!(changes.len() >= 2, "{changes:?}");
    for ch in &changes {
        assert_eq!(ch["table"], "public.accounts");
        assert_eq!(ch["kind"], "INSERT");
        assert!(ch["lsn"].as_str().unwrap().contains('/'));
        let key = ch["key"].as_array().unwrap();
        assert!(key.len() <= 1, "only the primary key: {ch}");
    }
    assert!(
        !ev.text.contains("hunter2"),
        "row contents in the status stream:\n{}",
        ev.text
    );
}

// ---------------------------------------------------------------------------
// The page in a browser

fn chromium_or_skip() -> bool {
    let found = std::env::var_os("WALCAST_CHROMIUM").is_some()
        || ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .iter()
            .any(|p| std::path::Path::new(p).exists());
    if !found {
        // .ci/run installs it; outside CI, say so loudly rather than fail.
        eprintln!("SKIPPED: no Chromium (apt-get install chromium, or set WALCAST_CHROMIUM)");
    }
    found
}

/// Waits until `expr` holds in the page; on timeout, fails showing the page's text.
async fn page_wait(page: &mut JsClient, expr: &str, timeout: Duration) -> Value {
    match page
        .try_call(
            json!({"cmd": "wait", "expr": expr, "timeout_ms": timeout.as_millis() as u64}),
            timeout + Duration::from_secs(5),
        )
        .await
    {
        Ok(v) => v,
        Err(e) => {
            let text = page
                .call(json!({"cmd": "eval", "expr": "document.body.innerText"}), T)
                .await;
            panic!(
                "{e}: {expr}\n--- the page showed:\n{}",
                text.as_str().unwrap_or_default()
            );
        }
    }
}

#[tokio::test]
async fn status_page_in_chromium_follows_writes_and_an_outage() {
    if !chromium_or_skip() {
        return;
    }
    let t0 = Instant::now();
    // Its own cluster (the test stops PostgreSQL), started while Chromium starts.
    let (pg, page) = tokio::join!(
        tokio::task::spawn_blocking(|| Cluster::start(&[])),
        JsClient::spawn_script("tests/js/status-page.mjs", "puppeteer-core"),
    );
    let (pg, mut page) = (pg.unwrap(), page);
    eprintln!("[{:?}] cluster up", t0.elapsed());
    let db = "status_page";
    let c = pg.new_db(db).await;
    c.batch_execute(
        "create table orders (id int primary key, note text);
         create publication pub_status_page for all tables;",
    )
    .await
    .unwrap();
    let server: Server = serve(
        &pg.url(db),
        "slot_status_page",
        "pub_status_page",
        &["--create-slot"],
    )
    .await;

    eprintln!("[{:?}] walcast up", t0.elapsed());
    let opened = page
        .call(
            json!({"cmd": "open", "url": server.http_url("/status"), "width": 1280, "height": 1000}),
            T,
        )
        .await;
    assert_eq!(opened["status"], 200);
    page_wait(
        &mut page,
        "document.getElementById('repl-state').textContent === 'connected' \
         && document.getElementById('lag-seconds').textContent === '0 s' \
         && document.getElementById('live').textContent === 'live' \
         && document.body.dataset.level === 'normal'",
        Duration::from_secs(10),
    )
    .await;

    eprintln!("[{:?}] page shows connected", t0.elapsed());
    // A write shows in the feed and the rates within a second or two.
    let wrote = Instant::now();
    c.batch_execute(
        "insert into orders select g, 'n' from generate_series(1, 5) g;
         update orders set note = 'm' where id = 1;",
    )
    .await
    .unwrap();
    page_wait(
        &mut page,
        "[...document.querySelectorAll('#feed-rows tr')].some(r => r.cells[1].textContent === 'public.orders' && r.cells[2].textContent === 'UPDATE' && r.cells[4].textContent === 'id=1')",
        Duration::from_secs(3),
    )
    .await;
    let feed_after = wrote.elapsed();
    page_wait(
        &mut page,
        "Number(document.getElementById('rate-changes').textContent) > 0 \
         && document.querySelector('#tables tbody').textContent.includes('public.orders')",
        Duration::from_secs(4),
    )
    .await;
    let rates_after = wrote.elapsed();
    assert!(
        feed_after < Duration::from_secs(2),
        "feed after {feed_after:?}"
    );
    assert!(
        rates_after < Duration::from_secs(3),
        "rates after {rates_after:?}"
    );

    // Pause holds the feed; resume shows what arrived meanwhile.
    page.call(json!({"cmd": "click", "selector": "#feed-pause"}), T)
        .await;
    c.batch_execute("insert into orders values (100, 'held')")
        .await
        .unwrap();
    page_wait(
        &mut page,
        "document.getElementById('feed-count').textContent.includes('1 held')",
        Duration::from_secs(3),
    )
    .await;
    let shown: Value = page
        .call(
            json!({"cmd": "eval", "expr": "[...document.querySelectorAll('#feed-rows tr')].some(r => r.cells[4].textContent === 'id=100')"}),
            T,
        )
        .await;
    assert_eq!(shown, false, "a paused feed shows nothing new");
    page.call(json!({"cmd": "click", "selector": "#feed-pause"}), T)
        .await;
    page_wait(
        &mut page,
        "[...document.querySelectorAll('#feed-rows tr')].some(r => r.cells[4].textContent === 'id=100')",
        Duration::from_secs(2),
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("status.png");
    page.call(
        json!({"cmd": "screenshot", "path": shot.to_str().unwrap()}),
        T,
    )
    .await;
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    if let Some(keep) = std::env::var_os("WALCAST_STATUS_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
    eprintln!("status page screenshot: {}", shot.display());

    // PostgreSQL stops: critical; it returns: normal again.
    eprintln!("[{:?}] stopping PostgreSQL", t0.elapsed());
    pg.stop();
    page_wait(
        &mut page,
        "document.body.dataset.level === 'critical' \
         && document.getElementById('repl-state').textContent === 'disconnected'",
        Duration::from_secs(5),
    )
    .await;
    eprintln!("[{:?}] critical shown; restarting PostgreSQL", t0.elapsed());
    pg.restart();
    eprintln!("[{:?}] PostgreSQL restarted", t0.elapsed());
    page_wait(
        &mut page,
        "document.body.dataset.level === 'normal' \
         && document.getElementById('repl-state').textContent === 'connected'",
        Duration::from_secs(15),
    )
    .await;

    let trouble: Vec<Value> = page
        .drain()
        .into_iter()
        .filter(|v| {
            (is(v, "console") && v["type"] == "error")
                || is(v, "pageerror")
                || is(v, "requestfailed")
                || is(v, "response")
        })
        .collect();
    assert!(trouble.is_empty(), "the page reported: {trouble:?}");
    eprintln!("[{:?}] normal again", t0.elapsed());
    page.exit().await;
    drop(server);
}

// ---------------------------------------------------------------------------
// The CLI

#[tokio::test]
async fn status_url_prints_the_live_summary() {
    let db = "status_cli";
    let _c = setup_db(db, "create table t (id int primary key)").await;
    let server = serve(
        &cluster().url(db),
        &format!("slot_{db}"),
        &format!("pub_{db}"),
        &["--create-slot"],
    )
    .await;
    let base = format!("http://127.0.0.1:{}", server.port);
    // Ready once replication is connected and the change log open.
    crate::support::wait_for("/ready", T, || async {
        (crate::support::http_get(server.port, "/ready").await.0 == 200).then_some(())
    })
    .await;
    let (ok, out, err) = walcast::run(&["status", "--url", &base], T).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("walcast "), "{out}");
    assert!(out.contains(": normal (ready)"), "{out}");
    assert!(
        out.contains(&format!("replication:  connected, slot slot_{db}")),
        "{out}"
    );
    assert!(out.contains("lag:          0.0 s"), "{out}");
    let (ok, out, err) = walcast::run(&["status", "--url", &base, "--json"], T).await;
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["replication"]["slot"], format!("slot_{db}"));
    // The change log is on by default; no channel resumed yet.
    assert_eq!(v["replay_log"]["writable"], true, "{v}");
    assert_eq!(v["replay_log"]["replays"], 0, "{v}");
    assert_eq!(v["replay_log"]["replay_gaps"], 0, "{v}");
    // Nobody listening there (a port just released): a clear error, exit 1.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (ok, _, err) = walcast::run(
        &["status", "--url", &format!("http://127.0.0.1:{closed}")],
        T,
    )
    .await;
    assert!(!ok);
    assert!(err.contains("status.json"), "{err}");
}
