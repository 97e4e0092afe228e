//! The load-generating WebSocket client: connects, joins `postgres_changes`
//! channels the way supabase-js does (Phoenix vsn 1.0.0), and counts what arrives.
//!
//! Receiving is kept cheap so the client, which shares the machine's cores with
//! walcast and PostgreSQL, measures walcast rather than itself: a change frame is
//! recognised by a substring, and only clients that sample latency read one field
//! (`sent_us`, the writer's clock in the row) out of the text.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Limit for a connect or a join reply.
const STEP_LIMIT: Duration = Duration::from_secs(60);

/// Microseconds since the Unix epoch (the clock PostgreSQL's `clock_timestamp()` reads too).
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

pub async fn connect(port: u16) -> Result<Ws> {
    connect_as(port, "bench").await
}

/// [`connect`] with a token as the `apikey`.
pub async fn connect_as(port: u16, apikey: &str) -> Result<Ws> {
    let url = format!("ws://127.0.0.1:{port}/realtime/v1/websocket?apikey={apikey}&vsn=1.0.0");
    // Small buffers: the driver holds up to 10,000 connections.
    let config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0);
    let (ws, _) = tokio::time::timeout(
        STEP_LIMIT,
        tokio_tungstenite::connect_async_with_config(url, Some(config), true),
    )
    .await
    .context("WebSocket connect timed out")?
    .context("WebSocket connect")?;
    Ok(ws)
}

/// A `postgres_changes` binding on `public.<table>`, optionally filtered.
pub fn binding(table: &str, filter: Option<&str>) -> Value {
    match filter {
        Some(f) => json!({"event": "*", "schema": "public", "table": table, "filter": f}),
        None => json!({"event": "*", "schema": "public", "table": table}),
    }
}

/// Joins `topic` with `bindings` and waits for an ok reply.
pub async fn join(ws: &mut Ws, topic: &str, r: u64, bindings: Vec<Value>) -> Result<()> {
    let r = r.to_string();
    let msg = json!({
        "topic": format!("realtime:{topic}"),
        "event": "phx_join",
        "payload": {"config": {"postgres_changes": bindings}},
        "ref": r,
        "join_ref": r,
    });
    ws.send(Message::Text(msg.to_string().into())).await?;
    let deadline = tokio::time::Instant::now() + STEP_LIMIT;
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .context("no join reply")?
            .context("connection closed before the join reply")??;
        let Message::Text(t) = m else { continue };
        if !t.contains("phx_reply") {
            continue;
        }
        let v: Value = serde_json::from_str(&t)?;
        if v["ref"] != json!(r) {
            continue;
        }
        if v["payload"]["status"] != "ok" {
            bail!("join refused: {}", v["payload"]);
        }
        return Ok(());
    }
}

/// What one receiving client saw.
#[derive(Default)]
pub struct Received {
    /// Write→receipt latencies in microseconds (`sent_us`, stamped by the
    /// writer's INSERT), when sampled.
    pub latencies_us: Vec<u32>,
    /// Commit→receipt latencies in microseconds, from the frame's
    /// `commit_timestamp` (microsecond resolution), when sampled.
    pub after_commit_us: Vec<u32>,
    /// Set when the server closed the connection (e.g. as a slow client).
    pub closed: Option<String>,
}

/// Reads until `stop` fires or the connection ends, adding each change frame to
/// `count`; with `sample`, records `now - sent_us` of each.
pub async fn receive(
    mut ws: Ws,
    count: Arc<AtomicU64>,
    sample: bool,
    stop: CancellationToken,
) -> Received {
    let mut out = Received::default();
    loop {
        let m = tokio::select! {
            _ = stop.cancelled() => break,
            m = ws.next() => m,
        };
        match m {
            Some(Ok(Message::Text(t))) => {
                // Not `"postgres_changes"` alone: the join's `system` message names it too.
                if !t.contains("\"event\":\"postgres_changes\"") {
                    continue;
                }
                count.fetch_add(1, Ordering::Relaxed);
                if sample {
                    let now = now_us();
                    if let Some(sent) = field_i64(&t, "\"sent_us\":") {
                        out.latencies_us.push(clamp_us(now - sent));
                    }
                    if let Some(commit) = commit_us(&t) {
                        out.after_commit_us.push(clamp_us(now - commit));
                    }
                }
            }
            Some(Ok(Message::Close(c))) => {
                out.closed = Some(format!("{c:?}"));
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                out.closed = Some(e.to_string());
                break;
            }
            None => {
                out.closed = Some("connection ended".into());
                break;
            }
        }
    }
    out
}

/// What a resuming channel got: its replayed changes, then `REPLAY_DONE`.
pub struct Replayed {
    /// Change frames before `REPLAY_DONE`.
    pub changes: u64,
    /// When the first change frame arrived.
    pub first: Option<Instant>,
    /// When `REPLAY_DONE` arrived.
    pub done: Instant,
    /// `REPLAY_DONE`'s `replayed` and `transactions`.
    pub replayed: u64,
    pub transactions: u64,
}

/// Reads a channel's replay after its join reply: counts change frames until the
/// `system` message `REPLAY_DONE`; `REPLAY_GAP`, a close or `limit` is an error.
pub async fn receive_replay(ws: &mut Ws, limit: Duration) -> Result<Replayed> {
    let deadline = tokio::time::Instant::now() + limit;
    let (mut changes, mut first) = (0u64, None);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .with_context(|| format!("no REPLAY_DONE within {limit:?} ({changes} changes)"))?
            .with_context(|| {
                format!("connection closed during the replay ({changes} changes)")
            })??;
        let t = match m {
            Message::Text(t) => t,
            Message::Close(c) => bail!("closed during the replay ({changes} changes): {c:?}"),
            _ => continue,
        };
        if t.contains("\"event\":\"postgres_changes\"") {
            changes += 1;
            first.get_or_insert_with(Instant::now);
            continue;
        }
        if !t.contains("REPLAY_") {
            continue;
        }
        let v: Value = serde_json::from_str(&t)?;
        let p = &v["payload"];
        match p["code"].as_str() {
            Some("REPLAY_DONE") => {
                return Ok(Replayed {
                    changes,
                    first,
                    done: Instant::now(),
                    replayed: p["replayed"].as_u64().unwrap_or(0),
                    transactions: p["transactions"].as_u64().unwrap_or(0),
                })
            }
            Some("REPLAY_GAP") => bail!("REPLAY_GAP after {changes} changes: {p}"),
            _ => {}
        }
    }
}

/// The integer after `key` in `text` (a JSON number, or a number in a string).
fn field_i64(text: &str, key: &str) -> Option<i64> {
    let at = text.find(key)? + key.len();
    let rest = text[at..].trim_start_matches('"');
    let end = rest
        .find(|c: char| !c.is_ascii_digit() && c != '-')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn clamp_us(us: i64) -> u32 {
    us.clamp(0, u32::MAX as i64) as u32
}

/// The frame's `commit_timestamp` as Unix microseconds.
fn commit_us(text: &str) -> Option<i64> {
    let key = "\"commit_timestamp\":\"";
    let at = text.find(key)? + key.len();
    let end = at + text[at..].find('"')?;
    walcast::decode::pgoutput::parse_iso_unix_micros(&text[at..end])
}

/// Percentile (0..=100) of sorted values.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_number_field() {
        let t = r#"{"record":{"id":1,"sent_us":1700000000123456,"pad":"x"}}"#;
        assert_eq!(field_i64(t, "\"sent_us\":"), Some(1_700_000_000_123_456));
        assert_eq!(field_i64(r#"{"sent_us":"42"}"#, "\"sent_us\":"), Some(42));
        assert_eq!(field_i64("{}", "\"sent_us\":"), None);
    }

    #[test]
    fn reads_the_commit_time() {
        let t = r#"{"commit_timestamp":"2026-11-22T07:54:27.123456Z","x":1}"#;
        assert_eq!(commit_us(t), Some(1_795_334_067_123_456));
        assert_eq!(commit_us("{}"), None);
    }

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 51);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[], 99.0), 0);
    }
}
