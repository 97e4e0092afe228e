//! Time-driven session behaviour with paused time (`start_paused`): the
//! heartbeat timeout and token expiry, in process and without PostgreSQL.
//!
//! The real router, session, writer and hub run in this process; a WebSocket
//! client (tungstenite) talks to them over an in-memory duplex stream served by
//! hyper, so nothing waits on the kernel and tokio's paused clock only moves
//! when every task is idle — a test of a 60 s timeout takes milliseconds and
//! measures the timeout exactly. No database: joins carry no `postgres_changes`
//! bindings, so the catalog is never asked.
//!
//! The replication status-update cadence is not covered here: it lives in
//! `src/source/` (being made sans-IO separately) and needs its own test there.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use walcast::config::{PgConnInfo, ServeConfig};
use walcast::decode::value::RenderOptions;
use walcast::deliver::broadcast::Broadcaster;
use walcast::deliver::socket::{Shared, WsStats};
use walcast::route::auth::{AuthMode, Verifier};
use walcast::route::hub::{Hub, HubStats};
use walcast::source::catalog::Catalog;
use walcast::source::session::Progress;

const SECRET: &str = "paused-time-test-secret-at-least-32-bytes";

type Ws = WebSocketStream<tokio::io::DuplexStream>;

/// walcast's WebSocket side, in process: the router over a fresh [`Shared`]
/// with a running hub fed by no replication.
struct InProcess {
    app: axum::Router,
    shutdown: CancellationToken,
    /// The hub's input from replication: nothing is sent, but the hub stops
    /// when it closes.
    _items: mpsc::Sender<walcast::decode::event::Item>,
}

impl InProcess {
    fn new(config: ServeConfig) -> InProcess {
        let config = Arc::new(config);
        let (items_tx, items_rx) = mpsc::channel(16);
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let hub = Hub::new(RenderOptions::default(), Arc::new(HubStats::default()));
        tokio::spawn(hub.run(items_rx, cmd_rx, Arc::new(Progress::default()), None));
        let conn = PgConnInfo::parse("postgres://nobody@127.0.0.1:1/none").unwrap();
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            hub: cmd_tx,
            auth: Arc::new(Verifier::new(config.auth.clone())),
            broadcast: Arc::new(Broadcaster::new(
                config.broadcast.clone(),
                config.presence.clone(),
                config.channels.clone(),
            )),
            catalog: Arc::new(Catalog::new(conn, "none".into())),
            config: config.clone(),
            stats: Arc::new(WsStats::default()),
            next_id: AtomicU64::new(0),
            shutdown: shutdown.clone(),
            tracker: TaskTracker::new(),
            log: None,
            replay: Arc::default(),
            rls: None,
            working: tokio::sync::Semaphore::new(walcast::deliver::socket::MESSAGES_AT_ONCE),
        });
        InProcess {
            app: walcast::server::router::router(shared),
            shutdown,
            _items: items_tx,
        }
    }

    /// A WebSocket client connected over an in-memory stream (`query`: the
    /// upgrade request's query string).
    async fn connect(&self, query: &str) -> Ws {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let inner = TowerToHyperService::new(self.app.clone());
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let call = hyper::service::Service::call(&inner, req);
            async move {
                Ok::<_, Infallible>(match call.await {
                    Ok(r) => r,
                    Err(never) => match never {},
                })
            }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), svc)
                .with_upgrades()
                .await;
        });
        let url = format!("ws://walcast.test/realtime/v1/websocket?{query}");
        let (ws, _) = tokio_tungstenite::client_async(url, client)
            .await
            .expect("WebSocket handshake");
        ws
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// What the server sent next: a JSON frame, or the close frame's code and reason.
#[derive(Debug)]
enum Got {
    Frame(Value),
    Close(u16, String),
}

/// The next frame; panics when the socket ends without a close frame, or when
/// nothing comes within `limit` of (virtual) time.
async fn next(ws: &mut Ws, limit: Duration) -> Got {
    loop {
        let m = tokio::time::timeout(limit, ws.next())
            .await
            .unwrap_or_else(|_| panic!("nothing within {limit:?}"))
            .expect("the socket ended without a close frame")
            .expect("socket error");
        match m {
            Message::Text(t) => return Got::Frame(serde_json::from_str(&t).unwrap()),
            Message::Close(Some(c)) => return Got::Close(u16::from(c.code), c.reason.to_string()),
            Message::Close(None) => return Got::Close(u16::from(CloseCode::Status), String::new()),
            _ => {}
        }
    }
}

async fn heartbeat(ws: &mut Ws, r: &str) {
    send(
        ws,
        json!({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": r}),
    )
    .await;
    match next(ws, Duration::from_secs(1)).await {
        Got::Frame(v) if v["event"] == "phx_reply" && v["ref"] == r => {
            assert_eq!(v["payload"]["status"], "ok", "{v}");
        }
        other => panic!("expected the heartbeat reply, got {other:?}"),
    }
}

fn timeout_secs() -> u64 {
    ServeConfig::default().server.heartbeat_timeout_secs
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_closed_with_4000_after_the_heartbeat_timeout() {
    let server = InProcess::new(ServeConfig::default());
    let idle = Duration::from_secs(timeout_secs());
    let mut ws = server.connect("vsn=1.0.0").await;
    let start = Instant::now();
    match next(&mut ws, idle * 2).await {
        Got::Close(code, reason) => {
            assert_eq!(code, 4000, "{reason}");
            assert!(reason.contains("heartbeat"), "{reason}");
        }
        other => panic!("expected a close, got {other:?}"),
    }
    // Exactly the timeout, on the paused clock.
    assert_eq!(start.elapsed(), idle);
}

#[tokio::test(start_paused = true)]
async fn a_heartbeating_client_stays_open_and_is_closed_a_timeout_after_it_stops() {
    let server = InProcess::new(ServeConfig::default());
    let idle = Duration::from_secs(timeout_secs());
    let mut ws = server.connect("vsn=1.0.0").await;
    // realtime-js heartbeats every 25 s; five timeouts' worth of them.
    let every = Duration::from_secs(25);
    let rounds = 5 * idle.as_secs() / every.as_secs();
    for i in 0..rounds {
        tokio::time::sleep(every).await;
        // Each reply is the fence: had the socket been closed meanwhile, the
        // close would arrive instead.
        heartbeat(&mut ws, &format!("hb{i}")).await;
    }
    let last = Instant::now();
    match next(&mut ws, idle * 2).await {
        Got::Close(code, reason) => assert_eq!(code, 4000, "{reason}"),
        other => panic!("expected a close, got {other:?}"),
    }
    assert_eq!(last.elapsed(), idle);
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn token(exp: i64) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"role": "authenticated", "sub": "u1", "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn jwt_config() -> ServeConfig {
    let mut c = ServeConfig::default();
    c.auth.mode = Some(AuthMode::Jwt);
    c.auth.jwt_secret = Some(SECRET.into());
    c.auth.leeway_secs = 0;
    c
}

/// Joins `realtime:<name>` (broadcast only) with `access_token`; returns once the
/// join is acknowledged.
async fn join(ws: &mut Ws, name: &str, access_token: &str) {
    let topic = format!("realtime:{name}");
    send(
        ws,
        json!({"topic": topic, "event": "phx_join", "ref": "j1", "join_ref": "j1",
               "payload": {"config": {"broadcast": {}}, "access_token": access_token}}),
    )
    .await;
    loop {
        match next(ws, Duration::from_secs(5)).await {
            Got::Frame(v) if v["event"] == "phx_reply" && v["ref"] == "j1" => {
                assert_eq!(v["payload"]["status"], "ok", "{v}");
                return;
            }
            Got::Frame(_) => {}
            other => panic!("expected the join reply, got {other:?}"),
        }
    }
}

/// Keeps the socket alive with heartbeats every 25 s (realtime-js's period) and
/// returns the first frame that is not a heartbeat reply, with when it came.
/// Each heartbeat reply is a fence: whatever the server sent before it arrives
/// first.
async fn first_other_frame(ws: &mut Ws, limit: Duration) -> (Value, Instant) {
    let deadline = Instant::now() + limit;
    let mut n = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "nothing but heartbeat replies within {limit:?}"
        );
        match tokio::time::timeout(Duration::from_secs(25), next(ws, limit)).await {
            Ok(Got::Frame(v)) if v["event"] == "phx_reply" && v["topic"] == "phoenix" => {}
            Ok(Got::Frame(v)) => return (v, Instant::now()),
            Ok(other) => panic!("expected a frame, got {other:?}"),
            Err(_) => {
                n += 1;
                send(
                    ws,
                    json!({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": format!("hb{n}")}),
                )
                .await;
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_channel_is_closed_when_its_token_expires_and_not_before() {
    let server = InProcess::new(jwt_config());
    let long = token(unix_now() + 24 * 3600);
    let mut ws = server.connect(&format!("vsn=1.0.0&apikey={long}")).await;
    let lifetime = 90;
    let start = Instant::now();
    join(&mut ws, "room", &token(unix_now() + lifetime)).await;
    // Heartbeats keep the socket open past the expiry.
    let (sys, at) = first_other_frame(&mut ws, Duration::from_secs(600)).await;
    // `exp` is whole seconds: the deadline lies within a second of `lifetime`
    // (plus the real milliseconds between connecting and joining).
    let after = at - start;
    assert!(
        after > Duration::from_secs(lifetime as u64 - 1)
            && after <= Duration::from_secs(lifetime as u64 + 1),
        "closed after {after:?}, token lifetime {lifetime} s: {sys}"
    );
    assert_eq!(sys["event"], "system", "{sys}");
    assert_eq!(sys["topic"], "realtime:room", "{sys}");
    assert_eq!(sys["payload"]["status"], "error", "{sys}");
    let message = sys["payload"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("expired"), "{sys}");
    match next(&mut ws, Duration::from_secs(1)).await {
        Got::Frame(v) if v["event"] == "phx_close" && v["topic"] == "realtime:room" => {}
        other => panic!("expected phx_close, got {other:?}"),
    }
    // The connection itself stays.
    heartbeat(&mut ws, "after").await;
}

#[tokio::test(start_paused = true)]
async fn a_refreshed_token_moves_the_expiry() {
    let server = InProcess::new(jwt_config());
    let long = token(unix_now() + 24 * 3600);
    let mut ws = server.connect(&format!("vsn=1.0.0&apikey={long}")).await;
    let start = Instant::now();
    join(&mut ws, "room", &token(unix_now() + 40)).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    // A fresh token, valid 120 s from the start instead of 40.
    send(
        &mut ws,
        json!({"topic": "realtime:room", "event": "access_token", "ref": "a1", "join_ref": "j1",
               "payload": {"access_token": token(unix_now() + 120)}}),
    )
    .await;
    let (sys, at) = loop {
        let (v, at) = first_other_frame(&mut ws, Duration::from_secs(600)).await;
        // An answer to the refresh, if it gets one, is not the expiry.
        if !(v["event"] == "phx_reply" && v["ref"] == "a1") {
            break (v, at);
        }
    };
    let after = at - start;
    assert_eq!(sys["event"], "system", "{sys}");
    assert!(
        after > Duration::from_secs(119) && after <= Duration::from_secs(121),
        "expired after {after:?}, not at the refreshed token's expiry: {sys}"
    );
}
