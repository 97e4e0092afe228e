//! One client connection speaking Phoenix Channels as `@supabase/realtime-js` does.
//!
//! Handles `heartbeat`, `phx_join`, `phx_leave` and `access_token`, and answers a
//! message for a topic the socket has not joined with an `unmatched topic` error.
//! A join's `postgres_changes` bindings are resolved against the catalog (table in
//! the publication, filter valid for its columns) before anything is subscribed;
//! any problem is a join error reply naming it, and the socket's other channels go
//! on working. The `ok` reply is sent only after the hub has the subscription
//! (DESIGN.md §8), echoing the client's bindings in order with an `id` each, then a
//! `system` message "Subscribed to PostgreSQL".
//!
//! # Access
//!
//! Each binding is judged ([`crate::route::auth`]) before the catalog is asked, so a
//! refusal says nothing about the schema, and a filter is checked against the
//! columns the token may see only (a hidden column is "unknown"). A join judged
//! with a project apikey (no user token in the join, and an apikey without `sub`)
//! does not fail for tables that role may not see: those bindings are *pending*
//! — accepted, echoed, not subscribed — and a `system` message (status
//! `pending`) says so. supabase-js often joins before it has the user's token;
//! the `access_token` that follows re-judges the channel at once, without the
//! rejoin that would lose the changes in between.
//!
//! An `access_token` re-judges everything the channel may do: its
//! `postgres_changes` (hub bindings replaced), and on a private channel its
//! `[[channels]]` rights — without read rights the channel is closed with a
//! `system` error, and broadcast and presence judge writes with the new claims.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use super::frame::{self, Frame, Vsn};
use crate::deliver::expiry::ExpiryClock;
use crate::deliver::frame::system_payload;
use crate::deliver::socket::{JoinedTopics, Shared};
use crate::deliver::stats::{AuthFailure, DisconnectReason};
use crate::route::auth::{now_unix, Access, AuthError, RowRule, Verified};
use crate::route::filter::Filter;
use crate::route::hub::{
    binding_id, Binding, BindingAccess, BindingOptions, ChannelId, ConnHandle, EventMask,
    HubCommand, Outbound, Target,
};

/// Start of the `system` message (status `pending`) of a channel whose bindings
/// wait for a token that grants them.
pub const PENDING_MESSAGE: &str = "Waiting for an access token";

pub use crate::deliver::frame::{CLOSE_FRAME_TOO_LARGE, CLOSE_HEARTBEAT_TIMEOUT};

/// Why a connection the server was asked to close ends: the close reason's code,
/// or a lost socket (the writer failed) when none was given.
fn kill_reason(h: &ConnHandle) -> DisconnectReason {
    match h
        .close_reason
        .lock()
        .ok()
        .and_then(|r| r.as_ref().map(|r| r.code))
    {
        Some(code) => DisconnectReason::of_close_code(code),
        None => DisconnectReason::ConnectionLost,
    }
}

/// Whether a read error is a frame over the size limit (the WebSocket library's
/// capacity error; its type is not ours to name, so it is recognised by text).
fn frame_too_large(e: &axum::Error) -> bool {
    let text = e.to_string();
    text.contains("Space limit exceeded") || text.contains("Message too long")
}

struct Joined {
    id: ChannelId,
    join_ref: Option<String>,
    /// The join's `config`, to resolve the bindings again after a token refresh:
    /// kept as JSON text, parsed again on a refresh. As a `Value` every object in
    /// it is a B-tree node of ~630 bytes (1.3 KB for a one-binding config, more
    /// for realtime-js's), held for the life of every channel.
    config: Box<str>,
    /// The token the channel's access was judged with (`None` without auth).
    token: Option<Verified>,
    /// Its text, to ignore refreshes that repeat it.
    token_text: Option<String>,
    /// Tables of bindings waiting for a token that grants them.
    pending: Vec<String>,
}

struct Session {
    vsn: Vsn,
    shared: Arc<Shared>,
    handle: ConnHandle,
    channels: HashMap<String, Joined>,
    joined: JoinedTopics,
    peer: SocketAddr,
    /// Broadcast and presence rate limits of this connection.
    limits: crate::deliver::broadcast::ConnLimits,
    /// The token verified at connect (the `apikey`), the fallback for joins.
    connect_token: Option<Verified>,
    /// Token expiry on the runtime's clock ([`crate::deliver::expiry`]).
    expiry_clock: ExpiryClock,
}

pub async fn run(
    socket: WebSocket,
    vsn: Vsn,
    shared: Arc<Shared>,
    peer: SocketAddr,
    connect_token: Option<Verified>,
) {
    let conn_id = shared.next_id();
    let (tx, rx) = crate::route::queue::channel(shared.config.limits.client_queue);
    let handle = ConnHandle::new(conn_id, tx, shared.config.limits.client_queue_bytes);
    let joined: JoinedTopics = Arc::new(Mutex::new(Vec::new()));
    let (sink, mut stream) = socket.split();
    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    shared
        .stats
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    let writer = shared.tracker.spawn(crate::deliver::socket::writer(
        sink,
        rx,
        vsn,
        crate::deliver::socket::WriterConn::of(&handle),
        joined.clone(),
        shared.shutdown.clone(),
        shared.stats.clone(),
    ));
    tracing::debug!(conn = conn_id, %peer, ?vsn, "connected");
    let mut s = Session {
        vsn,
        shared: shared.clone(),
        handle: handle.clone(),
        channels: HashMap::new(),
        joined,
        peer,
        limits: shared.broadcast.conn_limits(),
        connect_token,
        expiry_clock: ExpiryClock::now(),
    };
    let idle = Duration::from_secs(shared.config.server.heartbeat_timeout_secs);
    // RLS mode: policies or privileges changed → every channel is judged again.
    let mut policies = shared.rls.as_ref().map(|r| r.generation());
    let end = loop {
        let expiry = s.next_expiry().map(|exp| s.expiry_clock.deadline(exp));
        let next = tokio::select! {
            biased;
            _ = handle.kill.cancelled() => break kill_reason(&handle),
            _ = shared.shutdown.cancelled() => break DisconnectReason::Shutdown,
            _ = crate::deliver::expiry::sleep_until(expiry), if expiry.is_some() => {
                Box::pin(s.expire_channels()).await;
                continue;
            }
            r = async { policies.as_mut()?.changed().await.ok() }, if policies.is_some() => {
                if r.is_none() {
                    policies = None;
                } else {
                    Box::pin(s.rejudge_channels()).await;
                }
                continue;
            }
            n = tokio::time::timeout(idle, stream.next()) => n,
        };
        match next {
            Err(_) => {
                handle.close(
                    CLOSE_HEARTBEAT_TIMEOUT,
                    format!("no message or heartbeat for {}s", idle.as_secs()),
                );
                break DisconnectReason::HeartbeatTimeout;
            }
            Ok(None) => break DisconnectReason::ConnectionLost,
            Ok(Some(Err(e))) => {
                if frame_too_large(&e) {
                    let max = shared.config.server.max_frame_bytes;
                    handle.close(
                        CLOSE_FRAME_TOO_LARGE,
                        format!(
                            "frame too large: the limit is {max} bytes (server.max_frame_bytes)"
                        ),
                    );
                    break DisconnectReason::FrameTooLarge;
                }
                tracing::debug!(conn = conn_id, error = %e, "connection lost");
                break DisconnectReason::ConnectionLost;
            }
            Ok(Some(Ok(Message::Close(_)))) => break DisconnectReason::ClientClose,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(Some(Ok(msg))) => {
                // A join or refresh may wait on the catalog (PostgreSQL slow or
                // gone): the connection's end and shutdown still win meanwhile. A
                // join cut short leaves nothing behind: the hub's `Disconnect`
                // removes whatever it subscribed.
                let work = async {
                    // Boxed: the wait is rare next to the session's idle life.
                    let _turn = Box::pin(tokio::time::timeout(
                        crate::deliver::socket::ADMISSION_WAIT,
                        shared.working.acquire(),
                    ))
                    .await;
                    match msg {
                        // Boxed so the idle session future stays small (see `dispatch`).
                        Message::Text(t) => Box::pin(s.on_text(t.as_str())).await,
                        Message::Binary(b) => Box::pin(s.on_binary(&b)).await,
                        _ => {}
                    }
                };
                tokio::select! {
                    biased;
                    _ = handle.kill.cancelled() => break kill_reason(&handle),
                    _ = shared.shutdown.cancelled() => break DisconnectReason::Shutdown,
                    () = work => {}
                }
            }
        }
    };
    // The writer answers the client's close frame (or sends the server's reason)
    // and ends; it owns no sender of its own queue, so nothing else keeps it alive.
    handle.kill.cancel();
    shared.stats.events.disconnected(conn_id, end);
    let channels = s.channels.len() as i64;
    // Broadcast hook: drop this connection's memberships and presences.
    for j in s.channels.values() {
        shared.broadcast.leave(j.id);
    }
    shared.stats.channels.fetch_sub(channels, Ordering::Relaxed);
    let _ = shared
        .hub
        .send(HubCommand::Disconnect { conn: conn_id })
        .await;
    drop(s);
    drop(handle);
    let _ = writer.await;
    shared.stats.connections.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(conn = conn_id, "disconnected");
}

impl Session {
    fn send_text(&self, text: String) {
        self.handle.queue_or_close(Outbound::Text(text));
    }

    fn reply(&self, f: &Frame, ok: bool, response: Value) {
        let payload = frame::reply_payload(ok, &response);
        self.send_text(frame::encode(
            self.vsn,
            f.join_ref.as_deref(),
            f.ref_.as_deref(),
            &f.topic,
            "phx_reply",
            &payload,
        ));
    }

    fn push(&self, topic: &str, join_ref: Option<&str>, event: &str, payload: &str) {
        self.send_text(frame::encode(
            self.vsn, join_ref, None, topic, event, payload,
        ));
    }

    async fn on_text(&mut self, text: &str) {
        let f = match frame::decode_text(text, self.vsn) {
            Ok(f) => f,
            Err(e) => {
                self.shared
                    .stats
                    .malformed_frames
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %self.peer, error = %e, "malformed frame");
                // Answer when the frame at least names a ref and topic to answer to.
                if let Some((topic, r)) = salvage_ref(text) {
                    self.send_text(frame::encode(
                        self.vsn,
                        None,
                        Some(&r),
                        &topic,
                        "phx_reply",
                        &frame::reply_payload(
                            false,
                            &json!({"reason": format!("malformed message: {e}")}),
                        ),
                    ));
                }
                return;
            }
        };
        self.dispatch(f).await;
    }

    async fn on_binary(&mut self, b: &[u8]) {
        if self.vsn != Vsn::V2 {
            self.shared
                .stats
                .malformed_frames
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        match frame::decode_binary(b) {
            // Broadcast hook: kind-3 user broadcast push.
            Ok(bb) => match self.channels.get(&bb.topic).map(|j| j.id) {
                Some(id) => self
                    .shared
                    .broadcast
                    .client_binary(&mut self.limits, id, &bb),
                None => {
                    let f = Frame {
                        join_ref: Some(bb.join_ref),
                        ref_: Some(bb.ref_),
                        topic: bb.topic,
                        event: "broadcast".into(),
                        payload: json!({}),
                    };
                    self.reply(&f, false, json!({"reason": "unmatched topic"}))
                }
            },
            Err(e) => {
                self.shared
                    .stats
                    .malformed_frames
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %self.peer, error = %e, "malformed binary frame");
            }
        }
    }

    async fn dispatch(&mut self, f: Frame) {
        match (f.topic.as_str(), f.event.as_str()) {
            ("phoenix", "heartbeat") => self.reply(&f, true, json!({})),
            // Boxed: joins are rare and their futures large; keeping them out of the
            // session's own future keeps idle connections small.
            (_, "phx_join") => Box::pin(self.join(f)).await,
            (_, "phx_leave") => Box::pin(self.leave(&f)).await,
            (t, _) if !self.channels.contains_key(t) => {
                self.reply(&f, false, json!({"reason": "unmatched topic"}))
            }
            (_, "access_token") => Box::pin(self.refresh_token(&f)).await,
            // Broadcast hooks.
            (t, "broadcast") => {
                if let Some(id) = self.channels.get(t).map(|j| j.id) {
                    self.shared.broadcast.client_text(&mut self.limits, id, &f)
                }
            }
            (t, "presence") => {
                if let Some(id) = self.channels.get(t).map(|j| j.id) {
                    self.shared
                        .broadcast
                        .client_presence(&mut self.limits, id, &f)
                }
            }
            _ => self.reply(
                &f,
                false,
                json!({"reason": format!("unknown event {:?}", f.event)}),
            ),
        }
    }

    async fn leave(&mut self, f: &Frame) {
        self.reply(f, true, json!({}));
        if let Some(j) = self.channels.remove(&f.topic) {
            self.unsubscribe(&f.topic, j).await;
            self.push(&f.topic, f.join_ref.as_deref(), "phx_close", "{}");
        }
    }

    async fn unsubscribe(&mut self, topic: &str, j: Joined) {
        // Broadcast hook: leave the topic (presence leaves go to the others).
        self.shared.broadcast.leave(j.id);
        let _ = self
            .shared
            .hub
            .send(HubCommand::Unsubscribe { channel: j.id })
            .await;
        self.shared.stats.channels.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut joined) = self.joined.lock() {
            joined.retain(|(t, _)| &**t != topic);
        }
    }

    /// A join refused: counted, and answered with an error reply naming the reason.
    fn refuse_join(&self, f: &Frame, response: Value) {
        self.shared
            .stats
            .joins_error
            .fetch_add(1, Ordering::Relaxed);
        self.reply(f, false, response);
    }

    async fn join(&mut self, f: Frame) {
        let topic = f.topic.clone();
        if !topic.starts_with("realtime:") || topic.len() <= "realtime:".len() {
            return self.refuse_join(&f, json!({"reason": "topic must be realtime:<name>"}));
        }
        // A second join of a joined topic replaces the first (as Phoenix does).
        if let Some(old) = self.channels.remove(&topic) {
            let old_ref = old.join_ref.clone();
            self.unsubscribe(&topic, old).await;
            self.push(&topic, old_ref.as_deref(), "phx_close", "{}");
        }
        if self.channels.len() >= self.shared.config.limits.channels_per_connection {
            return self.refuse_join(
                &f,
                json!({"reason": format!(
                    "too many channels on this connection (limit {})",
                    self.shared.config.limits.channels_per_connection
                )}),
            );
        }
        let config = f.payload.get("config").cloned().unwrap_or(Value::Null);
        let (token, token_text) = match self.join_token(&f.payload).await {
            Ok(t) => t,
            Err(e) => {
                self.auth_failed(&e);
                return self.refuse_join(&f, json!({ "reason": e.to_string() }));
            }
        };
        let claims = token.as_ref().map(|t| t.claims.clone()).unwrap_or_default();
        // Broadcast hook: private channels need a [[channels]] rule granting read.
        if let Err(reason) = self
            .shared
            .broadcast
            .authorize_join(&topic, &config, &claims)
        {
            return self.refuse_join(&f, json!({ "reason": reason }));
        }
        let pending_ok = self.judged_by_apikey(token.as_ref());
        let Resolved {
            echo,
            bindings,
            pending,
        } = match self
            .resolve_bindings(&config, token.as_ref(), pending_ok)
            .await
        {
            Ok(v) => v,
            Err(reason) => {
                tracing::debug!(peer = %self.peer, %topic, %reason, "join refused");
                return self.refuse_join(&f, json!({ "reason": reason }));
            }
        };
        // Resume: `replay: { since }` on the bindings (the channel's one position).
        let since = match config.get("postgres_changes") {
            Some(Value::Array(list)) => match crate::deliver::replay::since_of(list) {
                Ok(s) => s,
                Err(reason) => return self.refuse_join(&f, json!({ "reason": reason })),
            },
            _ => None,
        };
        let broadcast_replay = match crate::deliver::replay::broadcast_replay_of(&config) {
            Ok(r) => r,
            Err(reason) => return self.refuse_join(&f, json!({ "reason": reason })),
        };
        let channel = self.shared.next_id();
        let has_bindings = !bindings.is_empty();
        let since = since.filter(|_| has_bindings);
        let (done_tx, done_rx) = oneshot::channel();
        let topic_arc: Arc<str> = Arc::from(topic.as_str());
        let sent = self
            .shared
            .hub
            .send(HubCommand::Subscribe {
                conn: self.handle.clone(),
                channel,
                topic: topic_arc.clone(),
                bindings,
                // Always held until the ok reply is queued: a change routed
                // before it would reach realtime-js's bindings before they have
                // their ids, and go to every binding of the channel.
                hold: has_bindings,
                done: done_tx,
            })
            .await;
        let routed = match (sent, done_rx.await) {
            (Ok(()), Ok(routed)) => routed,
            _ => return self.refuse_join(&f, json!({"reason": "walcast is shutting down"})),
        };
        self.channels.insert(
            topic.clone(),
            Joined {
                id: channel,
                join_ref: f.join_ref.clone(),
                config: config.to_string().into_boxed_str(),
                token,
                token_text,
                pending: pending.clone(),
            },
        );
        if let Ok(mut joined) = self.joined.lock() {
            joined.push((topic_arc.clone(), f.join_ref.clone()));
        }
        self.shared.stats.channels.fetch_add(1, Ordering::Relaxed);
        self.shared.stats.joins_ok.fetch_add(1, Ordering::Relaxed);
        // Broadcast hook: join the topic, then the ok reply and presence_state.
        let reply = frame::encode(
            self.vsn,
            f.join_ref.as_deref(),
            f.ref_.as_deref(),
            &topic,
            "phx_reply",
            &frame::reply_payload(true, &json!({ "postgres_changes": echo })),
        );
        self.shared.broadcast.join(
            crate::deliver::broadcast::JoinRequest {
                conn: &self.handle,
                vsn: self.vsn,
                channel,
                topic: &topic,
                join_ref: f.join_ref.as_deref(),
                config: &config,
                claims,
            },
            reply,
        );
        if has_bindings {
            self.push(
                &topic,
                f.join_ref.as_deref(),
                "system",
                &system_payload("postgres_changes", "ok", "Subscribed to PostgreSQL", &topic),
            );
        }
        if !pending.is_empty() {
            self.push_pending(&topic, f.join_ref.as_deref(), &pending);
        }
        // Live changes routed since the subscription, now after the reply
        // (with a replay, `replay::run` releases the hold once it is done).
        if has_bindings && since.is_none() {
            let _ = self
                .shared
                .hub
                .send(HubCommand::Release {
                    channel,
                    after: crate::lsn::Lsn(0),
                })
                .await;
        }
        // Replication notices for this channel (one in force during an outage;
        // realtime-js `config.broadcast.replication_ready`), after the reply.
        let ready = config.pointer("/broadcast/replication_ready") == Some(&Value::Bool(true));
        if has_bindings || ready {
            let wait =
                Duration::from_secs(self.shared.config.server.replication_ready_timeout_secs);
            let _ = self
                .shared
                .hub
                .send(HubCommand::Joined {
                    channel,
                    replication_ready: ready.then(|| std::time::Instant::now() + wait),
                })
                .await;
        }
        // Supabase's broadcast replay (private channels): database broadcasts since then.
        if let Some((since_ms, limit)) = broadcast_replay {
            self.shared
                .tracker
                .spawn(crate::deliver::replay::run_broadcast(
                    crate::deliver::replay::BroadcastJob {
                        broadcast: self.shared.broadcast.clone(),
                        conn: self.handle.clone(),
                        channel,
                        topic: topic_arc.clone(),
                        since_ms,
                        limit,
                        log: self.shared.log.clone(),
                        stats: self.shared.replay.clone(),
                    },
                ));
        }
        // The missed changes, then `REPLAY_DONE` (or `REPLAY_GAP`), then live ones.
        if let Some(since) = since {
            let limits = &self.shared.config.limits;
            self.shared
                .tracker
                .spawn(crate::deliver::replay::run(crate::deliver::replay::Job {
                    hub: self.shared.hub.clone(),
                    conn: self.handle.clone(),
                    channel,
                    topic: topic_arc,
                    since,
                    routed,
                    log: self.shared.log.clone(),
                    stats: self.shared.replay.clone(),
                    batch: (limits.client_queue / 4).clamp(1, 256),
                }));
        }
    }

    /// Whether a channel judged with `token` was judged with a project apikey
    /// rather than a user's token: the join carried no token or the apikey itself,
    /// and the apikey names no user (no `sub` claim, as Supabase's anon key). Then
    /// bindings it may not see wait for an `access_token` instead of being refused,
    /// since supabase-js often joins before it has the user's token. A user's own
    /// token used as the apikey is judged as it is: its refusals are final.
    fn judged_by_apikey(&self, token: Option<&Verified>) -> bool {
        match (token, &self.connect_token) {
            (Some(t), Some(c)) => t.claims == c.claims && !c.claims.contains_key("sub"),
            _ => false,
        }
    }

    /// The `system` message of a channel whose bindings wait for a token.
    fn push_pending(&self, topic: &str, join_ref: Option<&str>, pending: &[String]) {
        let msg = format!(
            "{PENDING_MESSAGE}: this token may not see {}; nothing is delivered until an access_token grants it",
            pending.join(", ")
        );
        self.push(
            topic,
            join_ref,
            "system",
            &system_payload("postgres_changes", "pending", &msg, topic),
        );
    }

    fn auth_failed(&self, e: &AuthError) {
        self.shared
            .stats
            .events
            .auth_failed(AuthFailure::of(e), self.peer);
    }

    /// The token a join is judged with: its `access_token`, else the connect token.
    async fn join_token(
        &self,
        payload: &Value,
    ) -> Result<(Option<Verified>, Option<String>), AuthError> {
        let auth = &self.shared.auth;
        if !auth.enabled() {
            return Ok((None, None));
        }
        match user_token(payload) {
            Some(t) => Ok((Some(auth.verify(t).await?), Some(t.to_string()))),
            None => match &self.connect_token {
                Some(t) => {
                    if t.exp <= now_unix() {
                        return Err(AuthError::Expired);
                    }
                    Ok((Some(t.clone()), None))
                }
                None => Err(AuthError::Missing),
            },
        }
    }

    /// The earliest token expiry among joined channels.
    fn next_expiry(&self) -> Option<i64> {
        self.channels
            .values()
            .filter_map(|j| j.token.as_ref().map(|t| t.exp))
            .min()
    }

    /// Closes every channel whose token has expired: a `system` error, then `phx_close`.
    async fn expire_channels(&mut self) {
        let clock = self.expiry_clock;
        let expired: Vec<String> = self
            .channels
            .iter()
            .filter(|(_, j)| j.token.as_ref().is_some_and(|t| clock.expired(t.exp)))
            .map(|(t, _)| t.clone())
            .collect();
        for topic in expired {
            self.auth_failed(&AuthError::Expired);
            self.close_channel(
                &topic,
                "Token has expired: send a fresh access_token and rejoin",
            )
            .await;
        }
    }

    /// Server-side close of one channel: a `system` error naming why, then `phx_close`.
    async fn close_channel(&mut self, topic: &str, message: &str) {
        if let Some(j) = self.channels.remove(topic) {
            let join_ref = j.join_ref.clone();
            self.push(
                topic,
                join_ref.as_deref(),
                "system",
                &system_payload("system", "error", message, topic),
            );
            self.unsubscribe(topic, j).await;
            self.push(topic, join_ref.as_deref(), "phx_close", "{}");
        }
    }

    /// Swaps a channel's bindings in the hub at once (no gap); false when the
    /// hub is gone.
    async fn replace_bindings(&self, channel: ChannelId, bindings: Vec<Binding>) -> bool {
        let (done, wait) = oneshot::channel();
        let sent = self
            .shared
            .hub
            .send(HubCommand::Replace {
                channel,
                bindings,
                done,
            })
            .await;
        sent.is_ok() && wait.await.is_ok()
    }

    /// RLS mode saw policies, privileges or roles change: every channel with
    /// `postgres_changes` is judged again with its token, as on a refresh —
    /// channels that lost access are closed, the others get their new rules
    /// without a gap.
    async fn rejudge_channels(&mut self) {
        let topics: Vec<String> = self.channels.keys().cloned().collect();
        for topic in topics {
            let Some(j) = self.channels.get(&topic) else {
                continue;
            };
            let config: Value = serde_json::from_str(&j.config).unwrap_or(Value::Null);
            if config.get("postgres_changes").is_none_or(Value::is_null) {
                continue;
            }
            let (id, token) = (j.id, j.token.clone());
            let pending_ok = self.judged_by_apikey(token.as_ref());
            let resolved = self
                .resolve_bindings(&config, token.as_ref(), pending_ok)
                .await;
            let Resolved {
                bindings, pending, ..
            } = match resolved {
                Ok(r) => r,
                Err(reason) => {
                    let msg = format!("You no longer have access to this channel: {reason}");
                    self.close_channel(&topic, &msg).await;
                    continue;
                }
            };
            if !self.replace_bindings(id, bindings).await {
                return;
            }
            if let Some(j) = self.channels.get_mut(&topic) {
                j.pending = pending;
            }
        }
    }

    /// An `access_token` message: verify it and re-judge what the channel may see.
    async fn refresh_token(&mut self, f: &Frame) {
        if !self.shared.auth.enabled() {
            return;
        }
        let Some(text) = user_token(&f.payload) else {
            return;
        };
        let Some(j) = self.channels.get(&f.topic) else {
            return;
        };
        if j.token_text.as_deref() == Some(text) {
            return;
        }
        // Text this session wrote from a `Value`: it parses back to the same one.
        let config: Value = serde_json::from_str(&j.config).unwrap_or(Value::Null);
        let id = j.id;
        let was_pending = !j.pending.is_empty();
        let join_ref = j.join_ref.clone();
        let token = match self.shared.auth.verify(text).await {
            Ok(t) => t,
            Err(e) => {
                self.auth_failed(&e);
                let msg = format!("access_token refused: {e}");
                return self.close_channel(&f.topic, &msg).await;
            }
        };
        // Broadcast and presence: a private channel needs read rights still.
        if let Err(reason) = self
            .shared
            .broadcast
            .authorize_join(&f.topic, &config, &token.claims)
        {
            self.shared
                .stats
                .events
                .auth_failed(AuthFailure::Forbidden, self.peer);
            let msg = format!("You no longer have access to this channel: {reason}");
            return self.close_channel(&f.topic, &msg).await;
        }
        let pending_ok = self.judged_by_apikey(Some(&token));
        let Resolved {
            bindings, pending, ..
        } = match self
            .resolve_bindings(&config, Some(&token), pending_ok)
            .await
        {
            Ok(r) => r,
            Err(reason) => {
                self.shared
                    .stats
                    .events
                    .auth_failed(AuthFailure::Forbidden, self.peer);
                let msg = format!("You no longer have access to this channel: {reason}");
                return self.close_channel(&f.topic, &msg).await;
            }
        };
        let live = !bindings.is_empty();
        if !self.replace_bindings(id, bindings).await {
            return;
        }
        // Broadcast and presence now judge writes with the new claims.
        self.shared.broadcast.update_claims(id, &token.claims);
        let newly_pending = !pending.is_empty()
            && self
                .channels
                .get(&f.topic)
                .is_none_or(|j| j.pending != pending);
        if let Some(j) = self.channels.get_mut(&f.topic) {
            j.token = Some(token);
            j.token_text = Some(text.to_string());
            j.pending = pending.clone();
        }
        if was_pending && pending.is_empty() && live {
            self.push(
                &f.topic,
                join_ref.as_deref(),
                "system",
                &system_payload(
                    "postgres_changes",
                    "ok",
                    "Subscribed to PostgreSQL",
                    &f.topic,
                ),
            );
            // Now a postgres_changes channel: an outage notice in force reaches it.
            let _ = self
                .shared
                .hub
                .send(HubCommand::Joined {
                    channel: id,
                    replication_ready: None,
                })
                .await;
        }
        if newly_pending {
            self.push_pending(&f.topic, join_ref.as_deref(), &pending);
        }
    }

    /// Checks and resolves a join's `postgres_changes`; the error names the binding and
    /// what is wrong. With `pending_ok` (the channel is judged with the apikey's
    /// token), a binding to a table that token may not see is accepted as pending:
    /// nothing is subscribed for it until an `access_token` grants it.
    async fn resolve_bindings(
        &self,
        config: &Value,
        token: Option<&Verified>,
        pending_ok: bool,
    ) -> Result<Resolved, String> {
        let list = match config.get("postgres_changes") {
            None | Some(Value::Null) => return Ok(Resolved::default()),
            Some(Value::Array(a)) => a,
            Some(_) => return Err("config.postgres_changes must be an array".into()),
        };
        if list.len() > self.shared.config.limits.bindings_per_channel {
            return Err(format!(
                "too many postgres_changes bindings ({}; limit {})",
                list.len(),
                self.shared.config.limits.bindings_per_channel
            ));
        }
        let mut r = Resolved {
            echo: Vec::with_capacity(list.len()),
            bindings: Vec::with_capacity(list.len()),
            pending: Vec::new(),
        };
        for (i, b) in list.iter().enumerate() {
            let Some(obj) = b.as_object() else {
                return Err(format!("postgres_changes[{i}] must be an object"));
            };
            let (binding, id) = self
                .resolve_binding(obj, token, pending_ok)
                .await
                .map_err(|e| format!("postgres_changes[{i}]: {e}"))?;
            let mut e: Map<String, Value> = obj.clone();
            e.insert("id".into(), json!(id));
            if let Ok(b) = &binding {
                if let Some(note) = moves_fallback(obj, b, self.shared.config.subscriptions.moves) {
                    e.insert("moves".into(), json!(false));
                    e.insert("moves_unavailable".into(), json!(note));
                }
            }
            r.echo.push(Value::Object(e));
            match binding {
                Ok(b) => r.bindings.push(b),
                Err(what) => r.pending.push(what),
            }
        }
        Ok(r)
    }

    async fn resolve_binding(
        &self,
        obj: &Map<String, Value>,
        token: Option<&Verified>,
        pending_ok: bool,
    ) -> Result<(Result<Binding, String>, u32), String> {
        resolve_binding(&self.shared, self.peer, obj, token, pending_ok).await
    }
}

/// One binding: `Ok((Ok(binding), id))` live, `Ok((Err(table), id))` pending
/// (only with `pending_ok`), `Err` refused. Access is judged before the catalog
/// is asked, so a refusal says nothing about the schema.
pub async fn resolve_binding(
    shared: &Shared,
    peer: SocketAddr,
    obj: &Map<String, Value>,
    token: Option<&Verified>,
    pending_ok: bool,
) -> Result<(Result<Binding, String>, u32), String> {
    let str_field = |k: &str| -> Result<Option<&str>, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(format!("{k} must be a string")),
        }
    };
    let event_raw = str_field("event")?.unwrap_or("*");
    let events = EventMask::parse(event_raw).ok_or_else(|| {
        format!("invalid event {event_raw:?}: use \"*\", \"INSERT\", \"UPDATE\" or \"DELETE\"")
    })?;
    let schema = str_field("schema")?.unwrap_or("public");
    let table = str_field("table")?;
    let filter_text = str_field("filter")?.filter(|f| !f.trim().is_empty());
    let id = binding_id(event_raw, schema, table, filter_text);
    let filter = match filter_text {
        Some(t) => Filter::parse(t).map_err(|e| format!("invalid filter {t:?}: {e}"))?,
        None => Filter::default(),
    };
    let select = match obj.get("select") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => {
            let mut cols = Vec::with_capacity(a.len());
            for c in a {
                match c.as_str() {
                    Some(c) if !cols.iter().any(|x: &String| x == c) => cols.push(c.to_string()),
                    Some(_) => {}
                    None => return Err("select must be an array of column names".into()),
                }
            }
            Some(cols)
        }
        Some(_) => return Err("select must be an array of column names".into()),
    };
    let moves = match obj.get("moves") {
        None | Some(Value::Null) => shared.config.subscriptions.moves,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("moves must be true or false".into()),
    };
    let wildcard = schema == "*" || table.is_none_or(|t| t == "*");
    if wildcard && select.is_some() {
        return Err("select needs a single table: name the table".into());
    }
    let auth = &shared.auth;
    let mut access = BindingAccess {
        expires_at: token.map(|t| t.exp),
        ..BindingAccess::default()
    };
    let target = if wildcard {
        if !auth.may_use_wildcards(token) {
            if pending_ok && filter_text.is_none() {
                return Ok((Err(format!("{schema}.*")), id));
            }
            return Err(format!(
                "wildcard subscriptions need a role in auth.bypass_roles ({}); name the table",
                auth.config().bypass_roles.join(", ")
            ));
        }
        if filter_text.is_some() {
            return Err("a filter needs a single table: name the table".into());
        }
        if schema != "*" && table.is_none() {
            // Schema only: every published table of the schema.
        }
        let tables = shared
            .catalog
            .published_tables()
            .await
            .map_err(|e| e.to_string())?;
        if !tables.iter().any(|(s, t)| {
            (schema == "*" || s == schema) && table.is_none_or(|x| x == "*" || x == t)
        }) {
            return Err(format!(
                "no table of publication {:?} matches schema {schema:?}",
                shared.catalog.publication()
            ));
        }
        Target::Pattern {
            schema: (schema != "*").then(|| schema.to_string()),
            table: None,
        }
    } else {
        let table = table.unwrap_or_default();
        // Access first: a token without rights learns nothing of the table.
        let columns = match auth.table_access(schema, table, token) {
            Access::Denied(reason) => {
                tracing::debug!(peer = %peer, %reason, "binding refused");
                if pending_ok {
                    return Ok((Err(format!("{schema}.{table}")), id));
                }
                return Err(crate::route::auth::refusal(schema, table));
            }
            Access::Allowed { rows, columns } => {
                match rows {
                    RowRule::All => {}
                    RowRule::Filter(rule) => access.rows = Some(rule),
                    RowRule::Nothing => access.deny_all = true,
                }
                columns
            }
        };
        let t = shared
            .catalog
            .table(schema, table)
            .await
            .map_err(|e| e.to_string())?;
        // RLS mode: the database's own policies and privileges, on top of any rule.
        let mut columns = columns;
        if let (Some(rls), Some(tok)) = (&shared.rls, token) {
            if auth.config().rls_covers(schema, table) && !auth.bypasses(token) {
                match rls.access(&t, &tok.claims).await {
                    crate::route::rls::RlsAccess::Denied(reason) => {
                        tracing::debug!(peer = %peer, %reason, "binding refused by RLS mode");
                        if pending_ok {
                            return Ok((Err(format!("{schema}.{table}")), id));
                        }
                        return Err(crate::route::auth::refusal(schema, table));
                    }
                    // The role may read the table: it learns why its rows
                    // cannot be judged.
                    crate::route::rls::RlsAccess::Unjudgeable(reason) => return Err(reason),
                    crate::route::rls::RlsAccess::Allowed {
                        rows,
                        columns: cols,
                        sql,
                    } => {
                        match rows {
                            RowRule::All => {}
                            RowRule::Nothing => access.deny_all = true,
                            RowRule::Filter(f) => {
                                access.rows = Some(match access.rows.take() {
                                    Some(r) => r.and(f),
                                    None => f,
                                })
                            }
                        }
                        if let Some(cols) = cols {
                            columns = Some(match columns {
                                Some(c) => c.into_iter().filter(|x| cols.contains(x)).collect(),
                                None => cols,
                            });
                        }
                        access.sql = sql;
                    }
                }
            }
        }
        // The filter is checked against the columns this token may see, so a
        // hidden column is reported exactly as a column that does not exist
        // (filtering on it would reveal its values).
        let bound = match &columns {
            None => filter.bind(&t),
            Some(cols) => filter.bind(&visible_columns(&t, cols)),
        };
        bound.map_err(|e| format!("invalid filter {:?}: {e}", filter_text.unwrap_or("")))?;
        if let Some(sel) = &select {
            // A hidden column is reported as an unknown one, as for filters.
            let visible = |c: &str| {
                t.column_index(c).is_some()
                    && columns.as_ref().is_none_or(|v| v.iter().any(|x| x == c))
            };
            if let Some(bad) = sel.iter().find(|c| !visible(c)) {
                let names: Vec<&str> = t
                    .columns
                    .iter()
                    .map(|c| c.name.as_str())
                    .filter(|c| visible(c))
                    .take(50)
                    .collect();
                return Err(format!(
                    "select: column {bad:?} does not exist in {schema}.{table} or is not \
                     selectable by the subscribing role; selectable columns: {}",
                    names.join(", ")
                ));
            }
        }
        access.columns = columns.map(Arc::new);
        Target::Table(t)
    };
    Ok((
        Ok(Binding {
            id,
            events,
            target,
            filter,
            access,
            options: BindingOptions {
                select: select.map(Arc::new),
                moves,
            },
        }),
        id,
    ))
}

/// Why a binding that asked for moves (or got them by default) does without:
/// the old image is incomplete without REPLICA IDENTITY FULL, and wildcards have
/// no filter to move across. `None` when moves are off or work.
fn moves_fallback(obj: &Map<String, Value>, b: &Binding, default: bool) -> Option<String> {
    let asked = obj.get("moves").and_then(Value::as_bool).unwrap_or(default);
    if !asked {
        return None;
    }
    match &b.target {
        Target::Table(_) if b.access.sql.is_some() => Some(
            "moves are not available where row-level security policies are checked by SQL; \
             this binding gets changes judged on their new row (DELETE: old row)"
                .into(),
        ),
        Target::Table(t)
            if t.replica_identity == crate::decode::pgoutput::ReplicaIdentity::Full =>
        {
            None
        }
        Target::Table(t) => Some(format!(
            "moves need the full old row: run ALTER TABLE {}.{} REPLICA IDENTITY FULL; until \
             then an UPDATE is matched on the new row only (as Supabase does)",
            t.schema, t.name
        )),
        Target::Pattern { .. } => {
            Some("moves need a single table; this binding gets every change as it is".into())
        }
    }
}

/// A join's resolved `postgres_changes`.
#[derive(Default)]
struct Resolved {
    /// The client's bindings with their ids, for the `ok` reply.
    echo: Vec<Value>,
    /// Bindings to subscribe now.
    bindings: Vec<Binding>,
    /// Tables (`schema.table`) of bindings waiting for a token that grants them.
    pending: Vec<String>,
}

/// `t` with only the columns in `cols`, to check a filter against what a token
/// may see.
fn visible_columns(
    t: &crate::decode::relation::Table,
    cols: &[String],
) -> crate::decode::relation::Table {
    crate::decode::relation::Table {
        id: t.id,
        schema: t.schema.clone(),
        name: t.name.clone(),
        replica_identity: t.replica_identity,
        columns: t
            .columns
            .iter()
            .filter(|c| cols.contains(&c.name))
            .map(|c| crate::decode::relation::Column {
                name: c.name.clone(),
                ty: c.ty.clone(),
                key: c.key,
            })
            .collect(),
        json: Default::default(),
    }
}

/// The user token in a join or `access_token` payload; `sb_` keys are not JWTs.
fn user_token(payload: &Value) -> Option<&str> {
    payload
        .get("access_token")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.starts_with("sb_"))
}

/// The topic and ref of a frame that failed to decode, when they can be found.
fn salvage_ref(text: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(text).ok()?;
    match v {
        Value::Array(a) if a.len() >= 3 => Some((a[2].as_str()?.into(), a[1].as_str()?.into())),
        Value::Object(o) => Some((
            o.get("topic")?.as_str()?.into(),
            o.get("ref")?.as_str()?.into(),
        )),
        _ => None,
    }
}
