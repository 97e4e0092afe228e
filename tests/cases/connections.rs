//! Connection lifecycle (issue 13): every way a connection ends releases its socket,
//! tasks, channels and subscriptions; a client's queue is bounded in bytes; slow or
//! silent sockets cannot hold the server.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::support::js::JsClient;
use crate::support::setup_db;
use crate::support::walcast::serve_db_with_config as start_with;

const T: Duration = Duration::from_secs(20);
const SECRET: &str = "walcast-lifecycle-secret-with-enough-bytes";

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn token(exp_in: i64) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"role": "service_role", "exp": now() + exp_in}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
async fn http(port: u16, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to walcast's HTTP listener");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n{body}",
        body.len()
    );
    let _ = s.write_all(req.as_bytes()).await;
    let mut raw = Vec::new();
    // A refused connection may be reset after its 503: keep what was read.
    let _ = tokio::time::timeout(T, s.read_to_end(&mut raw))
        .await
        .expect("HTTP response in time");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// The value of an exported series (`name` or `name{label="v"}`).
async fn metric(port: u16, series: &str) -> f64 {
    let (status, text) = http(port, "GET", "/metrics", "", "").await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("series {series} not in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A raw WebSocket client (vsn 1.0.0); `rcvbuf` shrinks its receive buffer (a
/// client that stops reading then stalls the server quickly).
async fn ws_connect(port: u16, apikey: &str, rcvbuf: Option<u32>) -> Ws {
    let sock = TcpSocket::new_v4().unwrap();
    if let Some(b) = rcvbuf {
        sock.set_recv_buffer_size(b).unwrap();
    }
    let tcp = sock
        .connect(([127, 0, 0, 1], port).into())
        .await
        .expect("connect");
    let url = format!("ws://127.0.0.1:{port}/realtime/v1/websocket?apikey={apikey}&vsn=1.0.0");
    let (ws, _) = tokio::time::timeout(T, tokio_tungstenite::client_async(url, tcp))
        .await
        .expect("upgrade in time")
        .expect("upgrade");
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// How a socket ended: a close frame (with its code, if any) or without one
/// (reset, EOF, or nothing within the timeout).
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Close(Option<u16>),
    Gone,
}

/// The next text frame as JSON, or how the socket ended.
async fn next_frame(ws: &mut Ws, timeout: Duration) -> Result<Value, Ended> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Ok(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(Message::Close(c)))) => {
                return Err(Ended::Close(c.map(|c| u16::from(c.code))))
            }
            Ok(Some(Ok(_))) => {}
            _ => return Err(Ended::Gone),
        }
    }
}

/// How the server ends the socket, skipping frames before it.
async fn ending(ws: &mut Ws, timeout: Duration) -> Ended {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Err(e) = next_frame(ws, deadline - tokio::time::Instant::now()).await {
            return e;
        }
    }
}

/// The close code the server ends with (`None`: no close frame or no code).
async fn close_code(ws: &mut Ws, timeout: Duration) -> Option<u16> {
    match ending(ws, timeout).await {
        Ended::Close(code) => code,
        Ended::Gone => None,
    }
}

/// Joins `topic` with a `postgres_changes` binding on `items` (a hub
/// subscription) and broadcast (a broadcast membership); waits for the `ok` reply.
async fn join(ws: &mut Ws, topic: &str, access_token: &str) {
    let topic = format!("realtime:{topic}");
    send(
        ws,
        json!({"topic": topic, "event": "phx_join", "ref": "1", "join_ref": "1",
               "payload": {"access_token": access_token, "config": {
                   "broadcast": {"self": false},
                   "postgres_changes": [{"event": "*", "schema": "public", "table": "items"}]}}}),
    )
    .await;
    loop {
        let f = next_frame(ws, T).await.expect("join reply");
        if f["event"] == "phx_reply" && f["topic"] == topic {
            assert_eq!(f["payload"]["status"], "ok", "{f}");
            return;
        }
    }
}

/// POSTs broadcasts of `size` bytes each to `topic` (`n` messages per request).
async fn post_broadcast(port: u16, apikey: &str, topic: &str, n: usize, size: usize) -> u16 {
    let payload = "x".repeat(size);
    let messages: Vec<Value> = (0..n)
        .map(|_| json!({"topic": topic, "event": "big", "payload": {"p": payload}}))
        .collect();
    http(
        port,
        "POST",
        "/api/broadcast",
        &format!("apikey: {apikey}\r\n"),
        &json!({ "messages": messages }).to_string(),
    )
    .await
    .0
}

/// How a cycled connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    /// The client sends a close frame; the server must answer it.
    CloseFrame,
    /// The client resets the TCP connection.
    Reset,
    /// The client closes TCP without a close frame.
    Eof,
    /// The channel's token expires (the server closes the channel), then the client closes.
    TokenExpiry,
    /// The client sends a frame over `server.max_frame_bytes`; the server closes with 1009.
    OversizedFrame,
    /// The client stops reading while large broadcasts arrive; the server closes with 4008.
    SlowClient,
}

// The heartbeat timeout (at least 30 s by config) is not cycled here: it ends a
// connection the way a slow client does (a server close with a reason).
const ENDS: [End; 6] = [
    End::CloseFrame,
    End::Reset,
    End::Eof,
    End::TokenExpiry,
    End::OversizedFrame,
    End::SlowClient,
];

/// One connection's life; `Err` says what went wrong.
async fn cycle(port: u16, i: usize, end: End) -> Result<(), String> {
    let apikey = token(600);
    let topic = format!("cycle{i}");
    let rcvbuf = (end == End::SlowClient).then_some(4096);
    let mut ws = ws_connect(port, &apikey, rcvbuf).await;
    let user = if end == End::TokenExpiry {
        token(2)
    } else {
        apikey.clone()
    };
    join(&mut ws, &topic, &user).await;
    match end {
        End::CloseFrame => {
            ws.close(None).await.map_err(|e| format!("close: {e}"))?;
            match ending(&mut ws, Duration::from_secs(3)).await {
                Ended::Close(_) => Ok(()),
                Ended::Gone => Err("the close handshake was not answered".into()),
            }
        }
        End::Reset => {
            ws.get_ref().set_zero_linger().unwrap();
            drop(ws);
            Ok(())
        }
        End::Eof => {
            drop(ws);
            Ok(())
        }
        End::TokenExpiry => {
            let t = format!("realtime:{topic}");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                match next_frame(&mut ws, deadline - tokio::time::Instant::now()).await {
                    Ok(f) if f["event"] == "phx_close" && f["topic"] == t => break,
                    Ok(_) => {}
                    Err(c) => return Err(format!("no phx_close on token expiry ({c:?})")),
                }
            }
            let _ = ws.close(None).await;
            let _ = close_code(&mut ws, Duration::from_secs(3)).await;
            Ok(())
        }
        End::OversizedFrame => {
            let _ = ws.send(Message::Text("x".repeat(200 * 1024).into())).await;
            match close_code(&mut ws, Duration::from_secs(5)).await {
                Some(1009) => Ok(()),
                other => Err(format!("expected close 1009, got {other:?}")),
            }
        }
        End::SlowClient => {
            // Never read while 768 KB of broadcasts are queued for this client
            // (its queue holds 256 KiB; the socket's buffers are small).
            let status = post_broadcast(port, &apikey, &topic, 12, 64 * 1024).await;
            if status != 202 {
                return Err(format!("broadcast POST answered {status}"));
            }
            match close_code(&mut ws, Duration::from_secs(10)).await {
                Some(4008) => Ok(()),
                other => Err(format!("expected close 4008, got {other:?}")),
            }
        }
    }
}

/// 100 connections ending every way there is (and supabase-js `disconnect()`):
/// afterwards the connection and channel gauges, the hub's subscriptions and the
/// process's open descriptors are back to where they started.
#[tokio::test]
async fn every_way_a_connection_ends_releases_it() {
    let db = "life_cycle";
    setup_db(
        db,
        "create table items (id int primary key, name text); alter table items replica identity full;",
    )
    .await;
    let config = format!(
        "[server]\nmax_frame_bytes = 65536\n\
         [limits]\nclient_queue_bytes = 262144\n\
         [broadcast]\nmessages_per_second = 1000\nmessages_burst = 1000\n\
         [auth]\nmode = \"jwt\"\njwt_secret = \"{SECRET}\"\nleeway_secs = 0\n"
    );
    let server = start_with(db, &config).await;
    let (port, pid) = (server.port, server.proc.pid());
    // Warm up (first connection, first join), then take the baseline.
    {
        let mut ws = ws_connect(port, &token(600), None).await;
        join(&mut ws, "warmup", &token(600)).await;
        let _ = ws.close(None).await;
        let _ = close_code(&mut ws, Duration::from_secs(3)).await;
    }
    let idle = || async {
        metric(port, "walcast_websocket_connections").await == 0.0
            && metric(port, "walcast_websocket_channels").await == 0.0
            && metric(port, "walcast_subscriptions").await == 0.0
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !idle().await && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let base_fds = open_fds(pid);

    // 90 raw connections at once, every ending mixed.
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let runs = (0..90).map(|i| {
        let end = ENDS[i % ENDS.len()];
        async move { (end, cycle(port, i, end).await) }
    });
    for (end, r) in futures::future::join_all(runs).await {
        if let Err(e) = r {
            *failures.entry(format!("{end:?}: {e}")).or_default() += 1;
        }
    }
    // 10 supabase-js clients that join and call `disconnect()`.
    let mut js = JsClient::spawn().await;
    let url = format!("http://127.0.0.1:{port}");
    for k in 0..10 {
        let client = format!("js{k}");
        js.call(
            json!({"cmd": "connect_supabase_js", "client": client, "url": url,
                   "apikey": token(600), "connect": true}),
            T,
        )
        .await;
        js.call(
            json!({"cmd": "subscribe", "client": client, "channel": format!("js{k}"),
                   "broadcast": [{"event": "*"}],
                   "postgres_changes": [{"event": "*", "schema": "public", "table": "items"}]}),
            T,
        )
        .await;
        js.wait_for("SUBSCRIBED", T, |v| {
            v["client"] == client && v["ev"] == "status" && v["status"] == "SUBSCRIBED"
        })
        .await;
        js.call(json!({"cmd": "disconnect", "client": client}), T)
            .await;
    }
    js.exit().await;

    // Everything is released within a few seconds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let conns = metric(port, "walcast_websocket_connections").await;
        let channels = metric(port, "walcast_websocket_channels").await;
        let subs = metric(port, "walcast_subscriptions").await;
        let fds = open_fds(pid);
        let done = conns == 0.0 && channels == 0.0 && subs == 0.0 && fds <= base_fds + 2;
        if done || tokio::time::Instant::now() >= deadline {
            eprintln!(
                "after 100 cycles: connections {conns}, channels {channels}, subscriptions {subs}, \
                 open fds {fds} (baseline {base_fds}); failures {failures:?}"
            );
            assert!(
                done && failures.is_empty(),
                "not released: connections {conns}, channels {channels}, subscriptions {subs}, \
                 fds {fds} (baseline {base_fds}); failures {failures:?}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each ending was counted by reason.
    for reason in [
        "client_close",
        "connection_lost",
        "frame_too_large",
        "slow_client",
    ] {
        let n = metric(
            port,
            &format!("walcast_websocket_disconnects_total{{reason=\"{reason}\"}}"),
        )
        .await;
        assert!(n > 0.0, "no disconnect counted as {reason}");
    }
    // And the server still serves.
    assert_eq!(http(port, "GET", "/health", "", "").await.0, 200);
    let mut ws = ws_connect(port, &token(600), None).await;
    join(&mut ws, "after", &token(600)).await;
}

/// A TCP connection to walcast from the loopback address `src` (127.0.0.x), so
/// tests can play several client addresses.
async fn connect_from(src: [u8; 4], port: u16) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind((src, 0).into())?;
    sock.connect(([127, 0, 0, 1], port).into()).await
}

/// Waits for a metric series to satisfy `ok`, returning its value.
async fn wait_metric(port: u16, series: &str, timeout: Duration, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let v = metric(port, series).await;
        if ok(v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} stayed at {v} for {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next `postgres_changes` insert's `record.id` on `ws`.
async fn next_insert_id(ws: &mut Ws, timeout: Duration) -> i64 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let f = next_frame(ws, deadline - tokio::time::Instant::now())
            .await
            .unwrap_or_else(|e| panic!("no change arrived: {e:?}"));
        if f["event"] == "postgres_changes" {
            return f["payload"]["data"]["record"]["id"].as_i64().unwrap();
        }
    }
}

/// A client sending a 10 MB frame gets a 1009 close at once, and its connection
/// is released.
#[tokio::test]
async fn a_ten_megabyte_frame_is_closed_with_1009() {
    let db = "life_big_frame";
    setup_db(db, "create table items (id int primary key, name text);").await;
    let server = start_with(db, "").await;
    let port = server.port;
    let ws = ws_connect(port, "k", None).await;
    let (mut tx, mut rx) = ws.split();
    // Write while reading: the server answers before the frame is all sent.
    let writer = tokio::spawn(async move {
        let _ = tx
            .send(Message::Text("x".repeat(10 * 1024 * 1024).into()))
            .await;
    });
    let code = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(m) = rx.next().await {
            match m {
                Ok(Message::Close(c)) => return c.map(|c| u16::from(c.code)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("no answer to a 10 MB frame within 5 s");
    assert_eq!(code, Some(1009));
    writer.abort();
    wait_metric(
        port,
        "walcast_websocket_connections",
        Duration::from_secs(3),
        |v| v == 0.0,
    )
    .await;
    assert_eq!(
        metric(
            port,
            "walcast_websocket_disconnects_total{reason=\"frame_too_large\"}"
        )
        .await,
        1.0
    );
}

/// With 64 open files allowed, more than a hundred connections opened and ended
/// one after another leave walcast accepting: new connections and `/health` work.
#[tokio::test]
async fn under_a_low_open_file_limit_connections_keep_cycling() {
    let db = "life_low_fds";
    setup_db(db, "create table items (id int primary key, name text);").await;
    let server = start_with(db, "").await;
    let (port, pid) = (server.port, server.proc.pid());
    let ok = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=64:64"])
        .status()
        .expect("prlimit (util-linux) is needed");
    assert!(ok.success());
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 64 ")),
        "{limits}"
    );
    for i in 0..120 {
        let mut ws = ws_connect(port, "k", None).await;
        join(&mut ws, &format!("low{i}"), "").await;
        match i % 3 {
            0 => {
                let _ = ws.close(None).await;
                assert!(matches!(
                    ending(&mut ws, Duration::from_secs(3)).await,
                    Ended::Close(_)
                ));
            }
            1 => {
                ws.get_ref().set_zero_linger().unwrap();
                drop(ws);
            }
            _ => drop(ws),
        }
    }
    assert!(open_fds(pid) < 64);
    assert_eq!(http(port, "GET", "/health", "", "").await.0, 200);
    let mut ws = ws_connect(port, "k", None).await;
    join(&mut ws, "after", "").await;
    wait_metric(
        port,
        "walcast_websocket_connections",
        Duration::from_secs(3),
        |v| v == 1.0,
    )
    .await;
}

/// A client that joins and never reads while large broadcasts arrive is closed
/// as slow once its queue holds `client_queue_bytes`; walcast's memory stays
/// bounded and a client that reads gets every message meanwhile.
#[tokio::test]
async fn a_stalled_reader_is_closed_as_slow_while_others_keep_receiving() {
    let db = "life_stalled";
    setup_db(db, "create table items (id int primary key, name text);").await;
    let queue_bytes: usize = std::env::var("WALCAST_TEST_QUEUE_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4 * 1024 * 1024);
    let config = format!(
        "[limits]\nclient_queue_bytes = {queue_bytes}\n\
         [broadcast]\nmessages_per_second = 100000\nmessages_burst = 100000\n"
    );
    let server = start_with(db, &config).await;
    let (port, pid) = (server.port, server.proc.pid());
    let rss = |what: &str| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find(|l| l.starts_with(what))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
    };
    let mut stalled = ws_connect(port, "k", Some(4096)).await;
    join(&mut stalled, "big", "").await;
    let mut reader = ws_connect(port, "k", None).await;
    join(&mut reader, "big", "").await;
    let base = rss("VmRSS:");
    // 30 MB of broadcasts, 200 KB each, while `reader` reads them.
    let (posts, per_post) = (15, 10);
    let read = tokio::spawn(async move {
        let mut n = 0;
        while n < posts * per_post {
            // Only the head of each frame is looked at: parsing 30 MB of JSON
            // would make the test slow, not more exact.
            match tokio::time::timeout(T, reader.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let head = &t.as_str()[..t.len().min(64)];
                    if head.contains("\"event\":\"broadcast\"") {
                        n += 1;
                    }
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("the reader lost its broadcasts after {n}: {other:?}"),
            }
        }
        reader
    });
    for _ in 0..posts {
        assert_eq!(
            post_broadcast(port, "k", "big", per_post, 200 * 1024).await,
            202
        );
    }
    let _reader = read.await.unwrap();
    let (peak, after) = (rss("VmHWM:"), rss("VmRSS:"));
    eprintln!(
        "stalled reader, client_queue_bytes {queue_bytes}: RSS {} MiB before, {} MiB after 30 MB of broadcasts, peak {} MiB",
        base / 1024,
        after / 1024,
        peak / 1024,
    );
    wait_metric(
        port,
        "walcast_websocket_disconnects_total{reason=\"slow_client\"}",
        Duration::from_secs(5),
        |v| v == 1.0,
    )
    .await;
    wait_metric(
        port,
        "walcast_websocket_connections",
        Duration::from_secs(3),
        |v| v == 1.0,
    )
    .await;
    // Without the byte bound all 30 MB stay queued for the stalled client, on
    // top of the ~20–25 MB the reader's traffic takes at its peak. Only the peak
    // is judged: what is freed stays in glibc's per-thread arenas, so the RSS
    // after says little (one CI run saw it 0.2 MB above a 20 MB bound).
    assert!(
        peak < base + 40 * 1024,
        "RSS grew from {base} KiB to {after} KiB (peak {peak} KiB) with one stalled reader"
    );
    drop(stalled);
}

/// `POST /api/broadcast` has the connection's limits: past `messages_burst` the
/// caller gets 429 with a JSON error and nothing of that request is sent; another
/// caller has its own budget.
#[tokio::test]
async fn rest_broadcast_is_rate_limited_per_caller() {
    let db = "life_rest_rate";
    setup_db(db, "create table items (id int primary key, name text);").await;
    let server = start_with(
        db,
        "[broadcast]\nmessages_per_second = 1\nmessages_burst = 150\n",
    )
    .await;
    let port = server.port;
    let mut ws = ws_connect(port, "k", None).await;
    join(&mut ws, "room", "").await;
    let batch = |tag: &str| {
        let messages: Vec<Value> = (0..100)
            .map(|i| json!({"topic": "room", "event": tag, "payload": {"i": i}}))
            .collect();
        json!({ "messages": messages }).to_string()
    };
    assert_eq!(
        http(port, "POST", "/api/broadcast", "", &batch("first"))
            .await
            .0,
        202
    );
    let (status, body) = http(port, "POST", "/api/broadcast", "", &batch("refused")).await;
    assert_eq!(status, 429, "{body}");
    let err: Value = serde_json::from_str(&body).expect("a JSON error");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("Too many messages per second"),
        "{err}"
    );
    // Another address has its own budget; its message fences the refused batch.
    let mut other = connect_from([127, 0, 0, 2], port).await.unwrap();
    let fence =
        json!({"messages": [{"topic": "room", "event": "fence", "payload": {}}]}).to_string();
    other
        .write_all(
            format!(
                "POST /api/broadcast HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{fence}",
                fence.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = String::new();
    other.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 202"), "{raw}");
    let mut firsts = 0;
    loop {
        let f = next_frame(&mut ws, T).await.expect("broadcasts");
        match f["payload"]["event"].as_str() {
            Some("first") => firsts += 1,
            Some("fence") => break,
            Some(other) => panic!("a refused message was sent: {other}"),
            None => {}
        }
    }
    assert_eq!(firsts, 100);
}

/// 1,000 silent or byte-a-second sockets from two addresses: each is refused by
/// the per-address or global limit or dropped by the request timeout, while a
/// connected client keeps receiving changes and `/health` answers again as soon
/// as they are gone.
#[tokio::test]
async fn slow_and_silent_sockets_are_refused_or_dropped() {
    let db = "life_slowloris";
    let sql = setup_db(
        db,
        "create table items (id int primary key, name text); alter table items replica identity full;",
    )
    .await;
    let config =
        "[server]\nheader_timeout_secs = 3\nmax_connections = 450\nmax_connections_per_ip = 300\n";
    let server = start_with(db, config).await;
    let (port, pid) = (server.port, server.proc.pid());
    let mut ws = ws_connect(port, "k", None).await;
    join(&mut ws, "live", "").await;
    let base_fds = open_fds(pid);
    let mut attackers = Vec::new();
    let connected = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let settled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for i in 0..1000usize {
        let src = if i < 600 {
            [127, 0, 0, 2]
        } else {
            [127, 0, 0, 3]
        };
        let (connected, done) = (connected.clone(), settled.clone());
        attackers.push(tokio::spawn(async move {
            let r = connect_from(src, port).await;
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let Ok(mut s) = r else {
                return;
            };
            connected.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if i % 2 == 0 {
                // Silent: hold the socket until walcast drops it.
                let mut buf = [0u8; 256];
                let _ = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
            } else {
                // A byte a second (well, every 300 ms) of a request that never ends.
                for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: "
                    .iter()
                    .cycle()
                    .take(30)
                {
                    if s.write_all(&[*b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }));
        // In waves, so the kernel's accept queue never overflows (a socket it
        // drops there is the test's, not walcast's).
        if i % 100 == 99 {
            while settled.load(std::sync::atomic::Ordering::SeqCst) <= i {
                tokio::task::yield_now().await;
            }
        }
    }
    // The joined client keeps getting changes throughout.
    for id in 1..=5 {
        sql.execute("insert into items values ($1, 'x')", &[&id])
            .await
            .unwrap();
        assert_eq!(
            next_insert_id(&mut ws, Duration::from_secs(3)).await,
            i64::from(id)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every attacking socket was refused or dropped: none is held.
    // While the global limit is reached, a scrape is refused too (503): count 0.
    let counted = || async {
        let (status, text) = http(port, "GET", "/metrics", "", "").await;
        if status != 200 {
            return 0.0;
        }
        ["global_limit", "ip_limit", "header_timeout"]
            .iter()
            .map(|r| {
                let series = format!("walcast_connections_refused_total{{reason=\"{r}\"}} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(series.as_str()))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let settled = settled.load(std::sync::atomic::Ordering::SeqCst);
        let connected = connected.load(std::sync::atomic::Ordering::SeqCst);
        let n = counted().await;
        let fds = open_fds(pid);
        if settled == 1000 && n >= connected as f64 && fds <= base_fds + 2 {
            assert!(
                connected >= 900,
                "only {connected} of 1000 sockets connected"
            );
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let mut by = Vec::new();
            for r in ["global_limit", "ip_limit", "header_timeout"] {
                let series = format!("walcast_connections_refused_total{{reason=\"{r}\"}}");
                by.push((r, metric(port, &series).await));
            }
            panic!("{n} of {connected} connected slow sockets refused or dropped ({settled} settled): {by:?}; walcast has {fds} open files (baseline {base_fds})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for r in ["global_limit", "ip_limit", "header_timeout"] {
        let n = metric(
            port,
            &format!("walcast_connections_refused_total{{reason=\"{r}\"}}"),
        )
        .await;
        assert!(n > 0.0, "nothing counted as {r}");
    }
    assert_eq!(http(port, "GET", "/health", "", "").await.0, 200);
    let mut fresh = ws_connect(port, "k", None).await;
    join(&mut fresh, "fresh", "").await;
    sql.execute("insert into items values (6, 'x')", &[])
        .await
        .unwrap();
    assert_eq!(next_insert_id(&mut ws, Duration::from_secs(3)).await, 6);
    assert_eq!(next_insert_id(&mut fresh, Duration::from_secs(3)).await, 6);
    for a in attackers {
        a.abort();
    }
}

/// On SIGTERM every client gets 1001 and the process exits within its grace.
#[tokio::test]
async fn shutdown_closes_every_client_with_1001() {
    let db = "life_shutdown";
    setup_db(db, "create table items (id int primary key, name text);").await;
    let server = start_with(db, "").await;
    let port = server.port;
    let mut clients = Vec::new();
    for i in 0..10 {
        let mut ws = ws_connect(port, "k", None).await;
        join(&mut ws, &format!("s{i}"), "").await;
        clients.push(ws);
    }
    server.proc.signal(15);
    for ws in &mut clients {
        assert_eq!(close_code(ws, Duration::from_secs(5)).await, Some(1001));
    }
    let (ok, err) = server.proc.wait(Duration::from_secs(15)).await;
    assert!(ok, "{err}");
}
