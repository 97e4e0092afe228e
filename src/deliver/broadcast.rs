//! Broadcast: client-to-client messages on a topic, from sockets, from the REST
//! API and from the database, plus the membership that presence rides on.
//!
//! # Topics and membership
//!
//! Every channel join registers a member of the topic `(realtime:<name>, private)`:
//! a public and a private channel with the same name are disjoint. The registry
//! (one mutex; every operation under it is non-blocking) maps topics to members
//! and their [`PresenceState`]. A join is registered *before* its `ok` reply is
//! queued, and the reply and the first `presence_state` are queued under the same
//! lock, so every broadcast or presence diff that happens after a client sees
//! `SUBSCRIBED` reaches it, in order after its `presence_state`.
//!
//! # Fan-out
//!
//! A message is encoded at most once per wire form and the bytes are shared by
//! every recipient: a JSON text frame per protocol version, and for a 2.0.0 sender
//! who pushed a binary kind-3 frame a kind-4 frame for 2.0.0 recipients (as
//! Supabase's `V2Serializer.fastlane!` does; 1.0.0 recipients always get JSON
//! text, reference/realtime-js-protocol.md §2). The sender's own channel gets the
//! message only with `config.broadcast.self`. Queues are bounded: a recipient
//! whose queue is full is closed as a slow client (as the hub does) and counted.
//!
//! # Limits and errors
//!
//! Payloads over [`BroadcastConfig::max_payload_bytes`] get an error reply with
//! `ack`, and are a counted drop without. Each connection has a token bucket for
//! broadcasts; a push over it is answered with a `system` error "Too many messages
//! per second" (and an error reply with `ack`), never dropped silently. Private
//! channels are read and written only when a `[[channels]]` rule grants the
//! caller's JWT claims ([`may_read`], [`may_write`]); on a private channel
//! presence `track` is a write. A rule's `presence_sees` limits whose presences a
//! member sees (by role): `presence_state` and each `presence_diff` are then
//! filtered per recipient (encoded once per version for everyone else). A token
//! refresh re-judges a member's claims ([`Broadcaster::update_claims`]).
//!
//! # From the database
//!
//! `sql/broadcast.sql` defines `walcast.broadcast(topic, event, payload, private)`
//! on `pg_logical_emit_message(true, 'walcast.broadcast', …)`: the message travels
//! inside its transaction in the WAL, so it is delivered only if the transaction
//! commits, in commit order with that transaction's row changes. The hub hands
//! each logical message to [`Broadcaster::on_db_message`] in stream order
//! (PostgreSQL docs: "Logical Decoding Output Plugins", `pg_logical_emit_message`).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Message;
use axum::http::StatusCode;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use crate::config::{BroadcastConfig, ChannelRule, PresenceConfig};
use crate::decode::event::DbMessage;
use crate::deliver::frame::system_payload;
use crate::deliver::frame::{self, BinaryBroadcast, Frame, Vsn};
use crate::deliver::presence::{
    Diff, PresenceState, RemoteDiff, RemotePresences, RemoteTopic, SharedDiff, SharedMeta,
};
use crate::route::hub::{ChannelId, ConnHandle, Outbound};

/// Prefix of the logical messages `walcast.broadcast()` emits.
pub const DB_MESSAGE_PREFIX: &str = "walcast.broadcast";

/// A database broadcast (`walcast.broadcast()`): a logical decoding message with
/// [`DB_MESSAGE_PREFIX`] whose content is `{topic, event, payload, private, id}`.
#[derive(Clone, Debug, PartialEq)]
pub struct DbBroadcast {
    pub topic: String,
    pub event: String,
    /// JSON text (`{}` when absent).
    pub payload: String,
    pub private: bool,
    /// `meta.id`: the message's own, else one derived from its LSN, so a message
    /// sent live and again replayed has the same id.
    pub id: String,
}

impl DbBroadcast {
    /// `Ok(None)` for a message that is not a database broadcast.
    pub fn of(m: &DbMessage) -> Result<Option<DbBroadcast>, serde_json::Error> {
        if m.prefix != DB_MESSAGE_PREFIX {
            return Ok(None);
        }
        #[derive(serde::Deserialize)]
        struct Wire<'a> {
            topic: String,
            event: String,
            #[serde(borrow)]
            payload: Option<&'a RawValue>,
            #[serde(default)]
            private: bool,
            id: Option<String>,
        }
        let w: Wire = serde_json::from_slice(&m.content)?;
        let lsn = m.lsn.0;
        Ok(Some(DbBroadcast {
            topic: w.topic,
            event: w.event,
            payload: w
                .payload
                .map(|p| p.get().to_string())
                .unwrap_or_else(|| "{}".into()),
            private: w.private,
            id: w.id.unwrap_or_else(|| {
                format!(
                    "{:08x}-{:04x}-{:04x}-8000-000000000000",
                    lsn >> 32,
                    (lsn >> 16) & 0xffff,
                    lsn & 0xffff
                )
            }),
        }))
    }

    /// The `meta` object: `{"id":…}`, with `"replayed":true` when replayed.
    fn meta(&self, replayed: bool) -> String {
        let mut meta = String::from("{\"id\":");
        crate::decode::value::write_str(&mut meta, &self.id);
        if replayed {
            meta.push_str(",\"replayed\":true");
        }
        meta.push('}');
        meta
    }
}
/// Messages in one `POST /api/broadcast` (Supabase accepts batches; keep them bounded).
pub const REST_MAX_MESSAGES: usize = 100;
/// The `system` message a rate-limited client gets (Supabase's wording).
pub const RATE_LIMITED: &str = "Too many messages per second";
/// Callers of `POST /api/broadcast` whose rate is tracked at once (each one is a
/// token bucket keyed by a hash of its token, or by its address without auth).
/// Past this, buckets back to full (idle callers) are forgotten first.
const REST_CALLERS_MAX: usize = 10_000;

impl ChannelRule {
    fn pattern(&self) -> &str {
        channel_name(&self.topic)
    }

    fn grants(&self, roles: &[String], claims: &Map<String, Value>, name: &str) -> bool {
        let Some(captured) = glob(self.pattern(), name) else {
            return false;
        };
        let role_ok = claims
            .get(&self.role_claim)
            .and_then(Value::as_str)
            .is_some_and(|r| roles.iter().any(|x| x == r || x == "*"));
        if !role_ok {
            return false;
        }
        match &self.match_claim {
            None => true,
            Some(c) => match (captured, claims.get(c)) {
                (Some(cap), Some(Value::String(s))) => s == cap,
                (Some(cap), Some(Value::Number(n))) => n.to_string() == cap,
                _ => false,
            },
        }
    }
}

use crate::config::channel_name;

/// Matches `name` against a pattern with `*` wildcards. `None`: no match;
/// `Some(capture)`: a match, with what a single `*` matched (`None` for patterns
/// with zero or several `*`).
fn glob<'n>(pattern: &str, name: &'n str) -> Option<Option<&'n str>> {
    let stars = pattern.matches('*').count();
    if stars == 0 {
        return (pattern == name).then_some(None);
    }
    if stars == 1 {
        let (pre, suf) = pattern.split_once('*')?;
        if name.len() >= pre.len() + suf.len() && name.starts_with(pre) && name.ends_with(suf) {
            return Some(name.get(pre.len()..name.len() - suf.len()));
        }
        return None;
    }
    // Several stars: each literal piece in order, first anchored at the start,
    // last at the end.
    let pieces: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (pieces[0], pieces[pieces.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() {
        return None;
    }
    if !name.ends_with(last) {
        return None;
    }
    let mut rest = name.get(first.len()..name.len() - last.len())?;
    for p in &pieces[1..pieces.len() - 1] {
        let i = rest.find(p)?;
        rest = &rest[i + p.len()..];
    }
    Some(None)
}

/// Whether `claims` may join the private channel `topic` (`realtime:` optional).
/// With no rule granting it, the answer is no.
pub fn may_read(rules: &[ChannelRule], claims: &Map<String, Value>, topic: &str) -> bool {
    let name = channel_name(topic);
    rules.iter().any(|r| r.grants(&r.read_roles, claims, name))
}

/// What a member of the private channel `topic` is in presence terms: its role
/// (the role claim of the first rule granting it read access) and, when that rule
/// has `presence_sees`, the roles whose presences it sees.
fn presence_view(
    rules: &[ChannelRule],
    claims: &Map<String, Value>,
    topic: &str,
) -> (Option<String>, Option<Vec<String>>) {
    let name = channel_name(topic);
    let Some(rule) = rules.iter().find(|r| r.grants(&r.read_roles, claims, name)) else {
        return (None, None);
    };
    let role = claims
        .get(&rule.role_claim)
        .and_then(Value::as_str)
        .map(str::to_string);
    let sees = rule.presence_sees.as_ref().map(|m| {
        role.as_ref()
            .and_then(|r| m.get(r))
            .cloned()
            .unwrap_or_default()
    });
    (role, sees)
}

/// Whether `viewer` may see the presences tracked by channel `owner`.
fn sees_presence(viewer: &Member, members: &[Member], owner: ChannelId) -> bool {
    let Some(sees) = &viewer.sees else {
        return true;
    };
    if owner == viewer.channel {
        return true;
    }
    let role = members
        .iter()
        .find(|m| m.channel == owner)
        .and_then(|m| m.role.as_deref());
    sees.iter().any(|s| s == "*" || Some(s.as_str()) == role)
}

/// Whether `claims` may broadcast to the private channel `topic`.
pub fn may_write(rules: &[ChannelRule], claims: &Map<String, Value>, topic: &str) -> bool {
    let name = channel_name(topic);
    rules.iter().any(|r| r.grants(&r.write_roles, claims, name))
}

/// A token bucket: `rate` tokens a second up to `capacity`.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32) -> Self {
        TokenBucket {
            rate: f64::from(rate),
            capacity: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self) -> bool {
        self.take_at(Instant::now())
    }

    pub fn take_at(&mut self, now: Instant) -> bool {
        self.take_n_at(1, now)
    }

    /// Takes `n` tokens if there are that many (all or nothing).
    pub fn take_n_at(&mut self, n: usize, now: Instant) -> bool {
        self.refill(now);
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    fn refill(&mut self, now: Instant) {
        if now > self.last {
            let dt = now.duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
            self.last = now;
        }
    }

    /// Whether the bucket has refilled completely (its owner has been idle).
    fn is_full_at(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }
}

/// A connection's rate limits; the session owns it.
#[derive(Clone, Debug)]
pub struct ConnLimits {
    messages: TokenBucket,
    tracks: TokenBucket,
}

/// A channel's `config` from its `phx_join`, as far as broadcast and presence go.
/// Booleans may be JSON booleans or the strings `"true"`/`"false"`; missing = false.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelOptions {
    pub private: bool,
    pub echo_self: bool,
    pub ack: bool,
    pub presence: bool,
    pub presence_key: Option<String>,
}

fn flag(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

impl ChannelOptions {
    pub fn from_join_config(config: &Value) -> Self {
        ChannelOptions {
            private: flag(config.get("private")),
            echo_self: flag(config.pointer("/broadcast/self")),
            ack: flag(config.pointer("/broadcast/ack")),
            presence: flag(config.pointer("/presence/enabled")),
            presence_key: config
                .pointer("/presence/key")
                .and_then(|k| match k {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .filter(|s| !s.is_empty()),
        }
    }
}

/// Counters (read by metrics). Each is counted by `Broadcaster::note`, which also logs.
#[derive(Debug, Default)]
pub struct BroadcastStats {
    /// Client broadcasts accepted for fan-out.
    pub messages_received: AtomicU64,
    /// Broadcasts from `walcast.broadcast()` delivered to the fan-out.
    pub messages_from_database: AtomicU64,
    /// Broadcasts accepted from `POST /api/broadcast`.
    pub messages_from_rest: AtomicU64,
    /// Frames queued to recipients.
    pub frames_queued: AtomicU64,
    /// Broadcasts refused for their size (error reply with ack, dropped without).
    pub payload_too_large: AtomicU64,
    /// Broadcasts refused by the per-connection rate limit.
    pub rate_limited: AtomicU64,
    /// Joins or broadcasts refused by the private channel rules.
    pub denied: AtomicU64,
    /// Malformed broadcasts (no event, bad JSON, bad database message).
    pub invalid: AtomicU64,
    /// Raw-binary broadcasts that a 1.0.0 recipient cannot receive.
    pub undeliverable: AtomicU64,
    /// Presence tracks accepted.
    pub presence_tracks: AtomicU64,
    /// Presence tracks refused (limits, rate).
    pub presence_rejected: AtomicU64,
}

/// Unique ids: a per-process random key hashed with a counter.
struct Ids {
    key: RandomState,
    counter: AtomicU64,
}

impl Ids {
    fn next(&self) -> (u64, u64) {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut h = self.key.build_hasher();
        h.write_u64(n);
        (n, h.finish())
    }

    /// A random-looking UUID (version 4 layout).
    fn uuid(&self) -> String {
        let (_, a) = self.next();
        let (_, b) = self.next();
        let a = (a & 0xffff_ffff_ffff_0fff) | 0x4000;
        let b = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xffff,
            b >> 48,
            b & 0xffff_ffff_ffff
        )
    }

    /// A presence `phx_ref`: unique in this process (the counter), unlikely to
    /// repeat across restarts (the hash).
    fn phx_ref(&self) -> String {
        let (n, h) = self.next();
        format!("F{:08x}{n:x}", h as u32)
    }
}

type TopicKey = (String, bool);

struct Member {
    channel: ChannelId,
    conn: ConnHandle,
    vsn: Vsn,
    join_ref: Option<String>,
    opts: ChannelOptions,
    presence_key: String,
    claims: Map<String, Value>,
    /// Its role on a private channel (see [`presence_view`]).
    role: Option<String>,
    /// Roles whose presences it sees; `None`: all.
    sees: Option<Vec<String>>,
}

#[derive(Default)]
struct Topic {
    members: Vec<Member>,
    presence: PresenceState,
}

#[derive(Default)]
struct Registry {
    topics: HashMap<TopicKey, Topic>,
    channels: HashMap<ChannelId, TopicKey>,
    /// Presences of the other gateways of a cluster (empty on a single node).
    remote: RemotePresences,
}

/// What a channel join hands to [`Broadcaster::join`].
pub struct JoinRequest<'a> {
    pub conn: &'a ConnHandle,
    pub vsn: Vsn,
    pub channel: ChannelId,
    pub topic: &'a str,
    pub join_ref: Option<&'a str>,
    pub config: &'a Value,
    /// The caller's verified JWT claims (empty without auth).
    pub claims: Map<String, Value>,
}

/// A message's user payload.
enum Body {
    /// JSON text.
    Json(String),
    /// Raw bytes (kind 3 with encoding 0); only 2.0.0 sockets can receive it.
    Raw(Vec<u8>),
}

impl Body {
    fn len(&self) -> usize {
        match self {
            Body::Json(s) => s.len(),
            Body::Raw(b) => b.len(),
        }
    }
}

/// One message to fan out, with its encodings made on first use.
struct Outgoing<'a> {
    topic: &'a str,
    event: &'a str,
    body: Body,
    /// `meta` object (DB broadcasts carry `{"id": …}`), JSON text.
    meta: Option<String>,
    /// The sender pushed kind 3: 2.0.0 recipients get kind 4.
    binary: bool,
    v1: Option<Option<Message>>,
    v2: Option<Option<Message>>,
}

impl<'a> Outgoing<'a> {
    fn new(topic: &'a str, event: &'a str, body: Body, meta: Option<String>, binary: bool) -> Self {
        Outgoing {
            topic,
            event,
            body,
            meta,
            binary,
            v1: None,
            v2: None,
        }
    }

    /// `{"type":"broadcast","event":…,"payload":…[,"meta":…]}`; `None` for raw bytes.
    fn payload_object(&self) -> Option<String> {
        let Body::Json(p) = &self.body else {
            return None;
        };
        let mut s = String::with_capacity(p.len() + self.event.len() + 64);
        s.push_str("{\"type\":\"broadcast\",\"event\":");
        crate::decode::value::write_str(&mut s, self.event);
        s.push_str(",\"payload\":");
        s.push_str(p);
        if let Some(m) = &self.meta {
            s.push_str(",\"meta\":");
            s.push_str(m);
        }
        s.push('}');
        Some(s)
    }

    fn text(&self, vsn: Vsn) -> Option<Message> {
        let p = self.payload_object()?;
        Some(Message::Text(
            frame::encode(vsn, None, None, self.topic, "broadcast", &p).into(),
        ))
    }

    fn kind4(&self) -> Option<Message> {
        let (json, bytes) = match &self.body {
            Body::Json(s) => (true, s.as_bytes()),
            Body::Raw(b) => (false, b.as_slice()),
        };
        let meta = self.meta.as_deref().unwrap_or("").as_bytes();
        frame::encode_binary_broadcast(self.topic, self.event, meta, json, bytes)
            .map(|b| Message::Binary(b.into()))
    }

    /// The frame for a recipient speaking `vsn` (`None`: cannot be carried).
    fn frame_for(&mut self, vsn: Vsn) -> Option<Message> {
        match vsn {
            Vsn::V1 => {
                if self.v1.is_none() {
                    self.v1 = Some(self.text(Vsn::V1));
                }
                self.v1.clone().flatten()
            }
            Vsn::V2 => {
                if self.v2.is_none() {
                    let bin = if self.binary { self.kind4() } else { None };
                    self.v2 = Some(bin.or_else(|| self.text(Vsn::V2)));
                }
                self.v2.clone().flatten()
            }
        }
    }
}

/// Where a client push came from, to reply to it.
struct Origin<'a> {
    join_ref: Option<&'a str>,
    ref_: Option<&'a str>,
}

/// A client broadcast crossing to (or arriving from) another gateway of a
/// cluster (`walcast serve --cluster`), already checked by the gateway it was
/// sent to. At most once: ephemeral, like Supabase's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerBroadcast {
    /// `realtime:<name>`.
    pub topic: String,
    pub private: bool,
    pub event: String,
    /// JSON text of the payload, or (`raw`) bytes only 2.0.0 sockets can receive.
    pub body: Vec<u8>,
    pub raw: bool,
    /// Sent as a binary frame (vsn 2.0.0).
    pub binary: bool,
}

/// Where a gateway hands its clients' broadcasts for the other gateways.
pub type PeerSink = Box<dyn Fn(PeerBroadcast) + Send + Sync>;

/// What a gateway of a cluster tells the other gateways about its presences.
/// Handed to the [`PresenceSink`] under the registry lock, so deltas and
/// summaries reach the sink in the order they happened.
#[derive(Clone, Debug, PartialEq)]
pub enum PresenceOut {
    /// A change in one topic.
    Diff {
        topic: (String, bool),
        diff: SharedDiff,
    },
    /// Every presence this gateway holds: once, when the sink is set (the
    /// sink keeps its own copy from there, diff by diff).
    Summary(Vec<((String, bool), SharedMeta)>),
}

/// Where a gateway hands its presence changes for the other gateways.
pub type PresenceSink = Box<dyn Fn(PresenceOut) + Send + Sync>;

/// Whether `viewer` may see a presence tracked on another gateway by a channel
/// of `role` (see [`sees_presence`]).
fn sees_role(viewer: &Member, role: Option<&str>) -> bool {
    match &viewer.sees {
        None => true,
        Some(sees) => sees.iter().any(|s| s == "*" || Some(s.as_str()) == role),
    }
}

/// The topic registry, fan-out and limits. One per server, shared by sessions,
/// the REST handler and the hub.
pub struct Broadcaster {
    /// A gateway of a cluster: client broadcasts also go to the other gateways.
    peers: std::sync::OnceLock<PeerSink>,
    /// A gateway of a cluster: presence changes also go to the other gateways.
    presence_peers: std::sync::OnceLock<PresenceSink>,
    config: BroadcastConfig,
    presence: PresenceConfig,
    rules: Vec<ChannelRule>,
    registry: Mutex<Registry>,
    stats: Arc<BroadcastStats>,
    ids: Ids,
    /// Rate of `POST /api/broadcast` per caller (token, or address without auth).
    rest_buckets: Mutex<HashMap<u64, TokenBucket>>,
}

impl Broadcaster {
    pub fn new(config: BroadcastConfig, presence: PresenceConfig, rules: Vec<ChannelRule>) -> Self {
        Broadcaster {
            peers: std::sync::OnceLock::new(),
            presence_peers: std::sync::OnceLock::new(),
            config,
            presence,
            rules,
            registry: Mutex::new(Registry::default()),
            rest_buckets: Mutex::default(),
            stats: Arc::default(),
            ids: Ids {
                key: RandomState::new(),
                counter: AtomicU64::new(1),
            },
        }
    }

    pub fn stats(&self) -> Arc<BroadcastStats> {
        self.stats.clone()
    }

    /// Sends every accepted client broadcast to `sink` too (once; a gateway's
    /// link to the other gateways).
    pub fn set_peer_sink(&self, sink: PeerSink) {
        let _ = self.peers.set(sink);
    }

    /// A client broadcast from another gateway: to every member of its topic
    /// here. Returns the number of recipients.
    pub fn from_peer(&self, b: PeerBroadcast) -> usize {
        let body = if b.raw {
            Body::Raw(b.body)
        } else {
            match String::from_utf8(b.body) {
                Ok(s) => Body::Json(s),
                Err(_) => return 0,
            }
        };
        let reg = self.lock();
        let Some(t) = reg.topics.get(&(b.topic.clone(), b.private)) else {
            return 0;
        };
        let mut out = Outgoing::new(&b.topic, &b.event, body, None, b.binary);
        self.fan_out(&t.members, None, &mut out);
        t.members.len()
    }

    /// Fresh rate limits for a new connection.
    pub fn conn_limits(&self) -> ConnLimits {
        ConnLimits {
            messages: TokenBucket::new(self.config.messages_per_second, self.config.messages_burst),
            tracks: TokenBucket::new(self.presence.tracks_per_second, self.presence.tracks_burst),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // The registry holds no invariant a panic elsewhere could break halfway.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one event and logs it at debug level.
    fn note(&self, counter: &AtomicU64, what: &str, topic: &str) {
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(topic, "broadcast: {what}");
    }

    /// Queues a frame; a full queue closes the connection as a slow client.
    fn enqueue(&self, conn: &ConnHandle, out: Outbound) -> bool {
        let queued = conn.queue_or_close(out);
        if queued {
            self.stats.frames_queued.fetch_add(1, Ordering::Relaxed);
        }
        queued
    }

    fn reply(&self, m: &Member, topic: &str, origin: &Origin, ok: bool, response: Value) {
        let payload = frame::reply_payload(ok, &response);
        let text = frame::encode(
            m.vsn,
            origin.join_ref,
            origin.ref_,
            topic,
            "phx_reply",
            &payload,
        );
        self.enqueue(&m.conn, Outbound::Text(text));
    }

    /// Checks a join before anything is subscribed: a private channel needs a rule
    /// granting `claims` read access. The error is the join's error reason.
    pub fn authorize_join(
        &self,
        topic: &str,
        config: &Value,
        claims: &Map<String, Value>,
    ) -> Result<(), String> {
        if !ChannelOptions::from_join_config(config).private {
            return Ok(());
        }
        if may_read(&self.rules, claims, topic) {
            return Ok(());
        }
        self.note(&self.stats.denied, "private join denied", topic);
        Err(format!(
            "Unauthorized: you may not join private channel {:?}; no [[channels]] rule grants your token's claims read access",
            channel_name(topic)
        ))
    }

    /// Registers a joined channel, then queues `reply` (the join's `ok` reply) and,
    /// with presence enabled, the topic's `presence_state`, all under one lock.
    pub fn join(&self, j: JoinRequest<'_>, reply: String) {
        let opts = ChannelOptions::from_join_config(j.config);
        let presence_key = opts.presence_key.clone().unwrap_or_else(|| self.ids.uuid());
        let key: TopicKey = (j.topic.to_string(), opts.private);
        let (role, sees) = if opts.private {
            presence_view(&self.rules, &j.claims, j.topic)
        } else {
            (None, None)
        };
        let member = Member {
            role,
            sees,
            channel: j.channel,
            conn: j.conn.clone(),
            vsn: j.vsn,
            join_ref: j.join_ref.map(str::to_string),
            opts,
            presence_key,
            claims: j.claims,
        };
        let mut reg = self.lock();
        if reg.channels.contains_key(&j.channel) {
            drop(reg);
            self.leave(j.channel);
            reg = self.lock();
        }
        reg.channels.insert(j.channel, key.clone());
        let reg = &mut *reg;
        let remote = reg.remote.topic(&key);
        let topic = reg.topics.entry(key).or_default();
        self.enqueue(j.conn, Outbound::Text(reply));
        if member.opts.presence {
            self.send_state(&member, &topic.members, j.topic, &topic.presence, remote);
        }
        topic.members.push(member);
    }

    /// `presence_state` to `m`: the presences it may see (`members`: the topic's),
    /// those of other gateways (`remote`) included.
    fn send_state(
        &self,
        m: &Member,
        members: &[Member],
        topic: &str,
        state: &PresenceState,
        remote: Option<&RemoteTopic>,
    ) {
        let mut payload = match &m.sees {
            None => state.to_json(),
            Some(_) => state.to_json_where(|owner| sees_presence(m, members, owner)),
        };
        if let Some(r) = remote {
            r.add_to_state(&mut payload, |role| sees_role(m, role));
        }
        let text = frame::encode(
            m.vsn,
            m.join_ref.as_deref(),
            None,
            topic,
            "presence_state",
            &payload.to_string(),
        );
        self.enqueue(&m.conn, Outbound::Text(text));
    }

    /// After an `access_token` re-judged a channel: broadcasts and tracks are
    /// judged with `claims` from now on, and a member of a private channel that
    /// lost write rights no longer shows a presence.
    pub fn update_claims(&self, channel: ChannelId, claims: &Map<String, Value>) {
        let mut reg = self.lock();
        let Some(key) = reg.channels.get(&channel).cloned() else {
            return;
        };
        let Some(topic) = reg.topics.get_mut(&key) else {
            return;
        };
        let Some(me) = topic.members.iter_mut().find(|m| m.channel == channel) else {
            return;
        };
        me.claims = claims.clone();
        if !me.opts.private {
            return;
        }
        let old_role = me.role.clone();
        (me.role, me.sees) = presence_view(&self.rules, claims, &key.0);
        let role = me.role.clone();
        if !may_write(&self.rules, claims, &key.0) && topic.presence.tracks(channel) {
            let diff = topic.presence.untrack(channel);
            self.send_diff(&topic.members, &key.0, &diff, None);
            self.share(&key, &topic.members, &diff);
        } else if role != old_role {
            self.share_role_change(&key, &topic.presence, channel, role);
        }
    }

    /// Removes a channel (leave, rejoin, disconnect): its presences leave, and the
    /// remaining members with presence get the `presence_diff`.
    pub fn leave(&self, channel: ChannelId) {
        let mut reg = self.lock();
        let Some(key) = reg.channels.remove(&channel) else {
            return;
        };
        let Some(topic) = reg.topics.get_mut(&key) else {
            return;
        };
        // The diff goes out while the leaving member is still known (its role
        // decides who sees it leave), to everyone but itself.
        let diff = topic.presence.untrack(channel);
        if !diff.is_empty() {
            self.send_diff(&topic.members, &key.0, &diff, Some(channel));
            self.share(&key, &topic.members, &diff);
        }
        topic.members.retain(|m| m.channel != channel);
        if topic.members.is_empty() && topic.presence.is_empty() {
            reg.topics.remove(&key);
        }
    }

    /// `presence_diff` to every member with presence enabled (but `exclude`), with
    /// only the presences each may see; encoded once per version for members that
    /// see every presence.
    fn send_diff(&self, members: &[Member], topic: &str, diff: &Diff, exclude: Option<ChannelId>) {
        let payload = diff.to_json().to_string();
        let mut frames: [Option<Message>; 2] = [None, None];
        for m in members
            .iter()
            .filter(|m| m.opts.presence && Some(m.channel) != exclude)
        {
            if m.sees.is_some() {
                if let Some(p) = diff.to_json_where(|owner| sees_presence(m, members, owner)) {
                    let text =
                        frame::encode(m.vsn, None, None, topic, "presence_diff", &p.to_string());
                    self.enqueue(&m.conn, Outbound::Text(text));
                }
                continue;
            }
            let slot = &mut frames[usize::from(m.vsn == Vsn::V2)];
            let msg = slot
                .get_or_insert_with(|| {
                    Message::Text(
                        frame::encode(m.vsn, None, None, topic, "presence_diff", &payload).into(),
                    )
                })
                .clone();
            self.enqueue(&m.conn, Outbound::Ws(msg));
        }
    }

    /// Sends every presence change to `sink` too (once; a gateway's link to the
    /// other gateways of a cluster). The sink first gets every presence held
    /// now as one [`PresenceOut::Summary`] (under the same lock, so nothing
    /// falls between it and the first diff).
    pub fn set_presence_sink(&self, sink: PresenceSink) {
        let reg = self.lock();
        if self.presence_peers.set(sink).is_ok() {
            if let Some(sink) = self.presence_peers.get() {
                sink(PresenceOut::Summary(Self::all_shared(&reg)));
            }
        }
    }

    /// Hands a local presence change to the other gateways (with the role of
    /// each channel that tracked, for their `presence_sees`).
    fn share(&self, key: &TopicKey, members: &[Member], diff: &Diff) {
        let Some(sink) = self.presence_peers.get() else {
            return;
        };
        let diff = diff.shared(|c| {
            members
                .iter()
                .find(|m| m.channel == c)
                .and_then(|m| m.role.clone())
        });
        if !diff.is_empty() {
            sink(PresenceOut::Diff {
                topic: key.clone(),
                diff,
            });
        }
    }

    /// The other gateways judge a presence by the role of the channel that
    /// tracked it: when that role changes, they get its leave and its join
    /// with the new role.
    fn share_role_change(
        &self,
        key: &TopicKey,
        state: &PresenceState,
        channel: ChannelId,
        role: Option<String>,
    ) {
        let Some(sink) = self.presence_peers.get() else {
            return;
        };
        let joins = state.shared_of(channel, role);
        if joins.is_empty() {
            return;
        }
        let leaves = joins
            .iter()
            .filter_map(|m| Some((m.key.clone(), m.meta.get("phx_ref")?.as_str()?.to_string())))
            .collect();
        sink(PresenceOut::Diff {
            topic: key.clone(),
            diff: SharedDiff { joins, leaves },
        });
    }

    /// Every local presence, as the other gateways get it.
    fn all_shared(reg: &Registry) -> Vec<(TopicKey, SharedMeta)> {
        let mut all = Vec::new();
        for (key, t) in &reg.topics {
            let metas = t.presence.shared(|c| {
                t.members
                    .iter()
                    .find(|m| m.channel == c)
                    .and_then(|m| m.role.clone())
            });
            all.extend(metas.into_iter().map(|m| (key.clone(), m)));
        }
        all
    }

    /// A presence change on gateway `node`: to the topic's members here with
    /// presence. Returns how many joins were refused (limits).
    pub fn remote_diff(&self, node: u64, topic: (String, bool), diff: SharedDiff) -> usize {
        let mut reg = self.lock();
        let (d, refused) = reg.remote.apply(node, topic.clone(), diff, &self.presence);
        if let Some(t) = reg.topics.get(&topic) {
            self.send_remote_diff(&t.members, &topic.0, &d);
        }
        refused
    }

    /// Everything gateway `node` holds (its summary) replaces what was known of
    /// it; members here get the difference. Returns how many were refused.
    pub fn remote_summary(&self, node: u64, all: Vec<(TopicKey, SharedMeta)>) -> usize {
        self.remote_summary_part(node, true, all, true)
    }

    /// One chunk of gateway `node`'s summary, applied as it comes (`first`
    /// starts the summary; at `last` what it did not name leaves). Members
    /// here get the difference. Returns how many were refused.
    pub fn remote_summary_part(
        &self,
        node: u64,
        first: bool,
        chunk: Vec<(TopicKey, SharedMeta)>,
        last: bool,
    ) -> usize {
        let mut reg = self.lock();
        if first {
            reg.remote.summary_start(node);
        }
        let (mut diffs, refused) = reg.remote.summary_chunk(node, chunk, &self.presence);
        if last {
            diffs.extend(reg.remote.summary_end(node));
        }
        for (topic, d) in diffs {
            if let Some(t) = reg.topics.get(&topic) {
                self.send_remote_diff(&t.members, &topic.0, &d);
            }
        }
        refused
    }

    /// Gateway `node`'s summary will not end (a chunk lost): what is held of
    /// it stays until the next one.
    pub fn remote_summary_abort(&self, node: u64) {
        self.lock().remote.summary_abort(node);
    }

    /// Every other gateway's presences leave (the link to them is gone).
    pub fn remote_clear(&self) {
        let nodes = self.lock().remote.nodes();
        for n in nodes {
            self.remote_gone(n);
        }
    }

    /// Gateways with presences refused at the remote presence cap, once there
    /// is room again (their summary is worth asking for).
    pub fn remote_capped(&self) -> Vec<u64> {
        self.lock().remote.capped()
    }

    /// Sets the remote presence cap (tests).
    #[cfg(test)]
    pub fn set_remote_cap(&self, cap: usize) {
        self.lock().remote.set_cap(cap);
    }

    /// Gateway `node` is gone (said goodbye, or timed out): its presences leave.
    pub fn remote_gone(&self, node: u64) {
        let mut reg = self.lock();
        for (topic, d) in reg.remote.remove_node(node) {
            if let Some(t) = reg.topics.get(&topic) {
                self.send_remote_diff(&t.members, &topic.0, &d);
            }
        }
    }

    /// Presences of other gateways held here.
    pub fn remote_presences(&self) -> usize {
        self.lock().remote.len()
    }

    /// `presence_diff` of other gateways' presences to every member with
    /// presence enabled, with only the presences each may see.
    fn send_remote_diff(&self, members: &[Member], topic: &str, diff: &RemoteDiff) {
        if diff.is_empty() {
            return;
        }
        let mut frames: [Option<Message>; 2] = [None, None];
        let all = diff.to_json_where(|_| true).map(|v| v.to_string());
        let Some(all) = all else {
            return;
        };
        for m in members.iter().filter(|m| m.opts.presence) {
            if m.sees.is_some() {
                if let Some(p) = diff.to_json_where(|role| sees_role(m, role)) {
                    let text =
                        frame::encode(m.vsn, None, None, topic, "presence_diff", &p.to_string());
                    self.enqueue(&m.conn, Outbound::Text(text));
                }
                continue;
            }
            let slot = &mut frames[usize::from(m.vsn == Vsn::V2)];
            let msg = slot
                .get_or_insert_with(|| {
                    Message::Text(
                        frame::encode(m.vsn, None, None, topic, "presence_diff", &all).into(),
                    )
                })
                .clone();
            self.enqueue(&m.conn, Outbound::Ws(msg));
        }
    }

    /// A `broadcast` push in a text frame: payload `{type: "broadcast", event, payload}`.
    pub fn client_text(&self, limits: &mut ConnLimits, channel: ChannelId, f: &Frame) {
        let origin = Origin {
            join_ref: f.join_ref.as_deref(),
            ref_: f.ref_.as_deref(),
        };
        let parsed = match f.payload.get("type") {
            None | Some(Value::Null) => Ok(()),
            Some(Value::String(t)) if t == "broadcast" => Ok(()),
            Some(_) => Err("broadcast payload type must be \"broadcast\"".to_string()),
        }
        .and_then(|()| match f.payload.get("event") {
            Some(Value::String(e)) if !e.is_empty() => Ok(e.as_str()),
            _ => Err("broadcast needs an event: a non-empty string".to_string()),
        });
        let (event, body) = match parsed {
            Ok(e) => {
                let inner = f.payload.get("payload").unwrap_or(&Value::Null);
                let body = if inner.is_null() {
                    "{}".to_string()
                } else {
                    inner.to_string()
                };
                (Ok(e), Body::Json(body))
            }
            Err(reason) => (Err(reason), Body::Json(String::new())),
        };
        self.client_push(limits, channel, &f.topic, origin, event, body, false);
    }

    /// A binary kind-3 user broadcast push (vsn 2.0.0).
    pub fn client_binary(&self, limits: &mut ConnLimits, channel: ChannelId, b: &BinaryBroadcast) {
        let origin = Origin {
            join_ref: Some(&b.join_ref),
            ref_: Some(&b.ref_),
        };
        let (event, body) = if b.event.is_empty() {
            (
                Err("broadcast needs an event: a non-empty string".to_string()),
                Body::Raw(Vec::new()),
            )
        } else if b.json {
            match serde_json::from_slice::<&RawValue>(&b.payload) {
                Ok(raw) => (Ok(b.event.as_str()), Body::Json(raw.get().to_string())),
                Err(e) => (
                    Err(format!("broadcast payload is not valid JSON: {e}")),
                    Body::Raw(Vec::new()),
                ),
            }
        } else {
            (Ok(b.event.as_str()), Body::Raw(b.payload.clone()))
        };
        self.client_push(limits, channel, &b.topic, origin, event, body, true);
    }

    #[allow(clippy::too_many_arguments)]
    fn client_push(
        &self,
        limits: &mut ConnLimits,
        channel: ChannelId,
        topic_name: &str,
        origin: Origin<'_>,
        event: Result<&str, String>,
        body: Body,
        binary: bool,
    ) {
        let reg = self.lock();
        let Some(key) = reg.channels.get(&channel) else {
            return;
        };
        let Some(topic) = reg.topics.get(key) else {
            return;
        };
        let Some(me) = topic.members.iter().find(|m| m.channel == channel) else {
            return;
        };
        let ack = me.opts.ack;
        let refuse = |reason: String| {
            if ack {
                self.reply(me, topic_name, &origin, false, json!({ "reason": reason }));
            }
        };
        if !limits.messages.take() {
            self.note(&self.stats.rate_limited, "rate limited", topic_name);
            let sys = system_payload("system", "error", RATE_LIMITED, topic_name);
            let text = frame::encode(
                me.vsn,
                me.join_ref.as_deref(),
                None,
                topic_name,
                "system",
                &sys,
            );
            self.enqueue(&me.conn, Outbound::Text(text));
            return refuse(RATE_LIMITED.to_string());
        }
        let event = match event {
            Ok(e) => e,
            Err(reason) => {
                self.note(&self.stats.invalid, "invalid client broadcast", topic_name);
                return refuse(reason);
            }
        };
        if me.opts.private && !may_write(&self.rules, &me.claims, topic_name) {
            self.note(&self.stats.denied, "private broadcast denied", topic_name);
            return refuse(format!(
                "Unauthorized: you may not broadcast to private channel {:?}; no [[channels]] rule grants your token's claims write access",
                channel_name(topic_name)
            ));
        }
        if body.len() > self.config.max_payload_bytes {
            self.note(
                &self.stats.payload_too_large,
                "payload too large",
                topic_name,
            );
            return refuse(format!(
                "payload_size_exceeded: broadcast payload is {} bytes; the limit is {} (broadcast.max_payload_bytes)",
                body.len(),
                self.config.max_payload_bytes
            ));
        }
        self.stats.messages_received.fetch_add(1, Ordering::Relaxed);
        if let Some(sink) = self.peers.get() {
            let (body, raw) = match &body {
                Body::Json(s) => (s.as_bytes().to_vec(), false),
                Body::Raw(b) => (b.clone(), true),
            };
            sink(PeerBroadcast {
                topic: topic_name.to_string(),
                private: me.opts.private,
                event: event.to_string(),
                body,
                raw,
                binary,
            });
        }
        let exclude = (!me.opts.echo_self).then_some(channel);
        let mut out = Outgoing::new(topic_name, event, body, None, binary);
        self.fan_out(&topic.members, exclude, &mut out);
        if ack {
            self.reply(me, topic_name, &origin, true, json!({}));
        }
    }

    fn fan_out(&self, members: &[Member], exclude: Option<ChannelId>, out: &mut Outgoing<'_>) {
        for m in members {
            if Some(m.channel) == exclude {
                continue;
            }
            match out.frame_for(m.vsn) {
                Some(msg) => {
                    self.enqueue(&m.conn, Outbound::Ws(msg));
                }
                None => self.note(
                    &self.stats.undeliverable,
                    "raw binary payload cannot reach a 1.0.0 socket",
                    out.topic,
                ),
            }
        }
    }

    /// Sends `event` with JSON `payload` to every member of `realtime:<name>` with
    /// that `private` flag (REST and database broadcasts; the caller has checked
    /// the right to write). Returns the number of recipients.
    pub fn publish(
        &self,
        name: &str,
        private: bool,
        event: &str,
        payload: String,
        meta: Option<String>,
    ) -> usize {
        let topic = format!("realtime:{name}");
        let reg = self.lock();
        let Some(t) = reg.topics.get(&(topic.clone(), private)) else {
            return 0;
        };
        let mut out = Outgoing::new(&topic, event, Body::Json(payload), meta, false);
        self.fan_out(&t.members, None, &mut out);
        t.members.len()
    }

    /// A `presence` push: `{type: "presence", event: "track", payload}` or
    /// `{type: "presence", event: "untrack"}`. Always replied to.
    pub fn client_presence(&self, limits: &mut ConnLimits, channel: ChannelId, f: &Frame) {
        let origin = Origin {
            join_ref: f.join_ref.as_deref(),
            ref_: f.ref_.as_deref(),
        };
        let mut reg = self.lock();
        let Some(key) = reg.channels.get(&channel).cloned() else {
            return;
        };
        let reg = &mut *reg;
        let remote = &reg.remote;
        let Some(topic) = reg.topics.get_mut(&key) else {
            return;
        };
        let Some(idx) = topic.members.iter().position(|m| m.channel == channel) else {
            return;
        };
        let event = f.payload.get("event").and_then(Value::as_str).unwrap_or("");
        match event {
            "track" => {
                let me = &topic.members[idx];
                if me.opts.private && !may_write(&self.rules, &me.claims, &key.0) {
                    self.note(&self.stats.denied, "private track denied", &key.0);
                    let reason = format!(
                        "Unauthorized: you may not track presence on private channel {:?}; no [[channels]] rule grants your token's claims write access",
                        channel_name(&key.0)
                    );
                    return self.reply(me, &key.0, &origin, false, json!({ "reason": reason }));
                }
                if !limits.tracks.take() {
                    self.note(&self.stats.presence_rejected, "track rate limited", &key.0);
                    let reason = format!(
                        "too many presence tracks: the limit is {} per second (presence.tracks_per_second)",
                        self.presence.tracks_per_second
                    );
                    return self.reply(
                        &topic.members[idx],
                        &key.0,
                        &origin,
                        false,
                        json!({ "reason": reason }),
                    );
                }
                let payload = f.payload.get("payload").cloned().unwrap_or(Value::Null);
                let phx_ref = self.ids.phx_ref();
                let pkey = topic.members[idx].presence_key.clone();
                match topic
                    .presence
                    .track(channel, &pkey, payload, phx_ref, &self.presence)
                {
                    Ok(diff) => {
                        self.stats.presence_tracks.fetch_add(1, Ordering::Relaxed);
                        if !topic.members[idx].opts.presence {
                            // Tracking turns presence on for a channel joined without it.
                            topic.members[idx].opts.presence = true;
                            self.send_state(
                                &topic.members[idx],
                                &topic.members,
                                &key.0,
                                &topic.presence,
                                remote.topic(&key),
                            );
                        }
                        self.send_diff(&topic.members, &key.0, &diff, None);
                        self.share(&key, &topic.members, &diff);
                        self.reply(&topic.members[idx], &key.0, &origin, true, json!({}));
                    }
                    Err(e) => {
                        self.note(&self.stats.presence_rejected, "track refused", &key.0);
                        self.reply(
                            &topic.members[idx],
                            &key.0,
                            &origin,
                            false,
                            json!({ "reason": e.to_string() }),
                        );
                    }
                }
            }
            "untrack" => {
                let diff = topic.presence.untrack(channel);
                if !diff.is_empty() {
                    self.send_diff(&topic.members, &key.0, &diff, None);
                    self.share(&key, &topic.members, &diff);
                }
                self.reply(&topic.members[idx], &key.0, &origin, true, json!({}));
            }
            other => self.reply(
                &topic.members[idx],
                &key.0,
                &origin,
                false,
                json!({"reason": format!("unknown presence event {other:?}: use \"track\" or \"untrack\"")}),
            ),
        }
    }

    /// A logical decoding message from the replication stream. Only the prefix
    /// [`DB_MESSAGE_PREFIX`] is ours; its content is the JSON object
    /// `walcast.broadcast()` builds: `{topic, event, payload, private, id}`.
    pub fn on_db_message(&self, m: &DbMessage) {
        let b = match DbBroadcast::of(m) {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(lsn = %m.lsn, error = %e, "ignoring a walcast.broadcast message that is not valid JSON of the expected shape");
                self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if b.payload.len() > self.config.max_payload_bytes {
            tracing::warn!(topic = %b.topic, size = b.payload.len(), limit = self.config.max_payload_bytes,
                "dropping a walcast.broadcast message over broadcast.max_payload_bytes");
            self.stats.payload_too_large.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.stats
            .messages_from_database
            .fetch_add(1, Ordering::Relaxed);
        let meta = b.meta(false);
        self.publish(&b.topic, b.private, &b.event, b.payload, Some(meta));
    }

    /// Sends database broadcasts read back from the change log to one channel,
    /// in order, each marked `meta.replayed` (Supabase's broadcast replay).
    /// Returns how many were queued.
    pub fn replay_to(&self, channel: ChannelId, messages: Vec<DbBroadcast>) -> usize {
        let reg = self.lock();
        let Some(key) = reg.channels.get(&channel) else {
            return 0;
        };
        let Some(m) = reg
            .topics
            .get(key)
            .and_then(|t| t.members.iter().find(|m| m.channel == channel))
        else {
            return 0;
        };
        let mut sent = 0;
        for b in messages {
            let meta = b.meta(true);
            let mut out = Outgoing::new(&key.0, &b.event, Body::Json(b.payload), Some(meta), false);
            if let Some(msg) = out.frame_for(m.vsn) {
                if !self.enqueue(&m.conn, Outbound::Ws(msg)) {
                    break;
                }
                sent += 1;
            }
        }
        sent
    }

    /// Takes `n` messages from the REST caller `caller`'s budget — the same
    /// `messages_per_second` / `messages_burst` a connection has. False: over it.
    fn rest_allow(&self, caller: &impl std::hash::Hash, n: usize) -> bool {
        let key = self.ids.key.hash_one(caller);
        let now = Instant::now();
        let mut buckets = self.rest_buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= REST_CALLERS_MAX && !buckets.contains_key(&key) {
            buckets.retain(|_, b| !b.is_full_at(now));
            if buckets.len() >= REST_CALLERS_MAX {
                // Every tracked caller is busy: start over rather than grow.
                tracing::warn!(
                    callers = buckets.len(),
                    "too many REST broadcast callers to track; their rate limits restart"
                );
                buckets.clear();
            }
        }
        buckets
            .entry(key)
            .or_insert_with(|| {
                TokenBucket::new(self.config.messages_per_second, self.config.messages_burst)
            })
            .take_n_at(n, now)
    }

    /// Validates and sends the body of `POST /api/broadcast`:
    /// `{"messages": [{"topic", "event", "payload", "private"}]}`. Nothing is sent
    /// unless every message is valid.
    pub fn rest(
        &self,
        body: &[u8],
        claims: &Map<String, Value>,
        caller: &impl std::hash::Hash,
    ) -> Result<usize, (StatusCode, String)> {
        let bad = |m: String| (StatusCode::BAD_REQUEST, m);
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| bad(format!("body is not valid JSON: {e}")))?;
        let Some(list) = v.get("messages").and_then(Value::as_array) else {
            return Err(bad(
                "body must be {\"messages\": [{\"topic\", \"event\", \"payload\"}]}".into(),
            ));
        };
        if list.is_empty() {
            return Err(bad("messages must not be empty".into()));
        }
        if list.len() > REST_MAX_MESSAGES {
            return Err(bad(format!(
                "too many messages ({}; the limit is {REST_MAX_MESSAGES} per request)",
                list.len()
            )));
        }
        if list.len() > self.config.messages_burst as usize {
            // The rate limit could never grant it: say so instead of a 429 that
            // no retry cures.
            return Err(bad(format!(
                "too many messages ({}) for one request: the burst allowed is {} (broadcast.messages_burst); send fewer per request",
                list.len(),
                self.config.messages_burst
            )));
        }
        let mut ready = Vec::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            let field = |k: &str| match m.get(k) {
                Some(Value::String(s)) if !s.is_empty() => Ok(s.as_str()),
                _ => Err(bad(format!("messages[{i}].{k} must be a non-empty string"))),
            };
            if !m.is_object() {
                return Err(bad(format!("messages[{i}] must be an object")));
            }
            // The channel's name as a socket joins it (`realtime:` is the topic's
            // prefix), so the write check and the delivery judge the same name.
            let topic = field("topic")?;
            let topic = topic.strip_prefix("realtime:").unwrap_or(topic);
            let event = field("event")?;
            let private = match m.get("private") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(Value::String(s)) if s == "true" || s == "false" => s == "true",
                Some(_) => return Err(bad(format!("messages[{i}].private must be a boolean"))),
            };
            let payload = match m.get("payload") {
                None | Some(Value::Null) => "{}".to_string(),
                Some(p) => p.to_string(),
            };
            if payload.len() > self.config.max_payload_bytes {
                self.note(
                    &self.stats.payload_too_large,
                    "REST payload too large",
                    topic,
                );
                return Err(bad(format!(
                    "payload_size_exceeded: messages[{i}].payload is {} bytes; the limit is {} (broadcast.max_payload_bytes)",
                    payload.len(),
                    self.config.max_payload_bytes
                )));
            }
            if private && !may_write(&self.rules, claims, topic) {
                self.note(&self.stats.denied, "REST private broadcast denied", topic);
                return Err((
                    StatusCode::FORBIDDEN,
                    format!("messages[{i}]: you may not broadcast to private channel {topic:?}; no [[channels]] rule grants your token's claims write access"),
                ));
            }
            ready.push((topic, event, private, payload));
        }
        let n = ready.len();
        if !self.rest_allow(caller, n) {
            self.note(&self.stats.rate_limited, "REST rate limited", ready[0].0);
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{RATE_LIMITED}: the limit is {} messages per second, bursts of {} (broadcast.messages_per_second, broadcast.messages_burst); nothing was sent",
                    self.config.messages_per_second, self.config.messages_burst
                ),
            ));
        }
        for (topic, event, private, payload) in ready {
            self.stats
                .messages_from_rest
                .fetch_add(1, Ordering::Relaxed);
            self.publish(topic, private, event, payload, None);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rule(topic: &str, read: &[&str], write: &[&str], match_claim: Option<&str>) -> ChannelRule {
        ChannelRule {
            topic: topic.into(),
            read_roles: read.iter().map(|s| s.to_string()).collect(),
            write_roles: write.iter().map(|s| s.to_string()).collect(),
            role_claim: "role".into(),
            match_claim: match_claim.map(str::to_string),
            presence_sees: None,
        }
    }

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn globs() {
        assert_eq!(glob("room:*", "room:1"), Some(Some("1")));
        assert_eq!(glob("room:*", "hall:1"), None);
        assert_eq!(glob("a*c", "ac"), Some(Some("")));
        assert_eq!(glob("exact", "exact"), Some(None));
        assert_eq!(glob("exact", "exactly"), None);
        assert_eq!(glob("*:x:*", "a:x:b"), Some(None));
        assert_eq!(glob("*:x:*", "a:y:b"), None);
        assert_eq!(glob("ab*ba", "aba"), None);
        assert_eq!(glob("*", ""), Some(Some("")));
    }

    #[test]
    fn rules_grant_by_role_and_claim() {
        let rules = vec![
            rule("room:*", &["authenticated"], &["admin"], None),
            rule(
                "user:*",
                &["authenticated"],
                &["authenticated"],
                Some("sub"),
            ),
        ];
        let user = claims(json!({"role": "authenticated", "sub": "u1"}));
        assert!(may_read(&rules, &user, "realtime:room:1"));
        assert!(!may_write(&rules, &user, "room:1"));
        assert!(may_read(&rules, &user, "user:u1"));
        assert!(!may_read(&rules, &user, "user:u2"));
        assert!(may_write(&rules, &user, "user:u1"));
        assert!(!may_read(&rules, &Map::new(), "room:1"));
        assert!(!may_read(&rules, &user, "other"));
        assert!(!may_read(&[], &user, "room:1"));
        let admin = claims(json!({"role": "admin"}));
        assert!(may_write(&rules, &admin, "room:1"));
        assert!(rule("a", &[], &[], Some("sub")).invalid().is_some());
        assert!(rule("a:*", &[], &[], Some("sub")).invalid().is_none());
        let mut sees = rule("a:*", &[], &[], None);
        sees.presence_sees = Some([("staff".to_string(), vec![String::new()])].into());
        assert!(sees.invalid().unwrap().contains("presence_sees"));
    }

    #[test]
    fn presence_view_follows_the_granting_rule() {
        let mut r = rule("support:*", &["staff", "customer"], &["staff"], None);
        r.presence_sees = Some(
            [
                ("staff".to_string(), vec!["*".to_string()]),
                ("customer".to_string(), vec!["staff".to_string()]),
            ]
            .into(),
        );
        let rules = vec![r];
        let c = claims(json!({"role": "customer"}));
        assert_eq!(
            presence_view(&rules, &c, "realtime:support:1"),
            (Some("customer".into()), Some(vec!["staff".into()]))
        );
        let other = claims(json!({"role": "other"}));
        assert_eq!(presence_view(&rules, &other, "support:1"), (None, None));
    }

    #[test]
    fn token_bucket_refills() {
        let mut b = TokenBucket::new(2, 3);
        let t0 = b.last;
        assert!(b.take_at(t0) && b.take_at(t0) && b.take_at(t0));
        assert!(!b.take_at(t0));
        assert!(b.take_at(t0 + Duration::from_millis(500)));
        assert!(!b.take_at(t0 + Duration::from_millis(500)));
        // Never more than the burst.
        let later = t0 + Duration::from_secs(100);
        assert!((0..3).all(|_| b.take_at(later)));
        assert!(!b.take_at(later));
    }

    #[test]
    fn options_accept_string_booleans() {
        let o = ChannelOptions::from_join_config(&json!({
            "broadcast": {"self": "true", "ack": true},
            "presence": {"key": "", "enabled": "false"},
            "private": "true"
        }));
        assert_eq!(
            o,
            ChannelOptions {
                private: true,
                echo_self: true,
                ack: true,
                presence: false,
                presence_key: None
            }
        );
        assert_eq!(
            ChannelOptions::from_join_config(&Value::Null),
            ChannelOptions::default()
        );
    }

    #[test]
    fn ids_look_like_uuids_and_are_unique() {
        let ids = Ids {
            key: RandomState::new(),
            counter: AtomicU64::new(0),
        };
        let u = ids.uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(ids.phx_ref(), ids.phx_ref());
        assert_ne!(ids.uuid(), u);
    }

    #[test]
    fn rest_validates() {
        let b = Broadcaster::new(
            BroadcastConfig {
                max_payload_bytes: 16,
                ..Default::default()
            },
            PresenceConfig::default(),
            Vec::new(),
        );
        let none = Map::new();
        for (body, code) in [
            (&b"nope"[..], StatusCode::BAD_REQUEST),
            (br#"{}"#, StatusCode::BAD_REQUEST),
            (br#"{"messages": []}"#, StatusCode::BAD_REQUEST),
            (
                br#"{"messages": [{"event": "e"}]}"#,
                StatusCode::BAD_REQUEST,
            ),
            (
                br#"{"messages": [{"topic": "t"}]}"#,
                StatusCode::BAD_REQUEST,
            ),
            (
                br#"{"messages": [{"topic": "t", "event": "e", "payload": "0123456789abcdefg"}]}"#,
                StatusCode::BAD_REQUEST,
            ),
            (
                br#"{"messages": [{"topic": "t", "event": "e", "private": true}]}"#,
                StatusCode::FORBIDDEN,
            ),
        ] {
            assert_eq!(b.rest(body, &none, &"caller").unwrap_err().0, code);
        }
        assert_eq!(
            b.rest(
                br#"{"messages": [{"topic": "t", "event": "e"}]}"#,
                &none,
                &"caller"
            ),
            Ok(1)
        );
    }

    #[test]
    fn rest_is_rate_limited_per_caller_all_or_nothing() {
        let b = Broadcaster::new(
            BroadcastConfig {
                messages_per_second: 1,
                messages_burst: 3,
                ..Default::default()
            },
            PresenceConfig::default(),
            Vec::new(),
        );
        let none = Map::new();
        let two = br#"{"messages": [{"topic": "t", "event": "e"}, {"topic": "t", "event": "e"}]}"#;
        assert_eq!(b.rest(two, &none, &"a"), Ok(2));
        // One token left: a batch of two is refused whole.
        let err = b.rest(two, &none, &"a").unwrap_err();
        assert_eq!(err.0, StatusCode::TOO_MANY_REQUESTS);
        assert!(err.1.contains("broadcast.messages_per_second"), "{}", err.1);
        assert_eq!(b.stats().rate_limited.load(Ordering::Relaxed), 1);
        // Another caller has its own budget.
        assert_eq!(b.rest(two, &none, &"b"), Ok(2));
        // A batch larger than the burst could never pass: a 400 naming the
        // setting, not a 429 that no retry cures.
        let four = br#"{"messages": [{"topic": "t", "event": "e"}, {"topic": "t", "event": "e"}, {"topic": "t", "event": "e"}, {"topic": "t", "event": "e"}]}"#;
        let err = b.rest(four, &none, &"fresh").unwrap_err();
        assert_eq!(err.0, StatusCode::BAD_REQUEST);
        assert!(err.1.contains("broadcast.messages_burst"), "{}", err.1);
    }

    #[test]
    fn rest_judges_a_channel_by_its_name_with_or_without_the_prefix() {
        let b = Broadcaster::new(
            BroadcastConfig::default(),
            PresenceConfig::default(),
            vec![rule("room:*", &["anon"], &["writer"], None)],
        );
        let writer = claims(json!({"role": "writer"}));
        let anon = claims(json!({"role": "anon"}));
        // With or without the topic prefix, the rule of `room:1` decides.
        for topic in ["room:1", "realtime:room:1"] {
            let body = format!(
                r#"{{"messages": [{{"topic": "{topic}", "event": "e", "private": true}}]}}"#
            );
            assert_eq!(b.rest(body.as_bytes(), &writer, &"w"), Ok(1), "{topic}");
            assert_eq!(
                b.rest(body.as_bytes(), &anon, &"a").unwrap_err().0,
                StatusCode::FORBIDDEN,
                "{topic}"
            );
        }
    }

    #[test]
    fn token_bucket_takes_batches_whole() {
        let mut t = TokenBucket::new(10, 5);
        let now = Instant::now();
        assert!(t.take_n_at(5, now));
        assert!(!t.take_n_at(1, now));
        assert!(t.take_n_at(2, now + Duration::from_millis(200)));
        assert!(!t.is_full_at(now + Duration::from_millis(200)));
        assert!(t.is_full_at(now + Duration::from_secs(1)));
    }

    #[test]
    fn kind4_for_binary_senders_text_otherwise() {
        let mut o = Outgoing::new(
            "realtime:r",
            "e",
            Body::Json("{\"a\":1}".into()),
            None,
            true,
        );
        assert!(matches!(o.frame_for(Vsn::V2), Some(Message::Binary(_))));
        let Some(Message::Text(t)) = o.frame_for(Vsn::V1) else {
            panic!("v1 gets text")
        };
        let v: Value = serde_json::from_str(t.as_str()).unwrap();
        assert_eq!(
            v["payload"],
            json!({"type": "broadcast", "event": "e", "payload": {"a": 1}})
        );
        let mut raw = Outgoing::new("realtime:r", "e", Body::Raw(vec![0, 1]), None, true);
        assert!(raw.frame_for(Vsn::V1).is_none());
        assert!(raw.frame_for(Vsn::V2).is_some());
        let mut text = Outgoing::new(
            "realtime:r",
            "e",
            Body::Json("1".into()),
            Some("{\"id\":\"x\"}".into()),
            false,
        );
        let Some(Message::Text(t)) = text.frame_for(Vsn::V2) else {
            panic!("v2 gets text from a text sender")
        };
        assert!(
            t.as_str().ends_with(r#""meta":{"id":"x"}}]"#),
            "{}",
            t.as_str()
        );
    }

    /// The `(event, payload)` of each frame queued to a connection so far.
    fn frames(rx: &mut crate::route::queue::OutRx) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        while let Ok(o) = rx.try_recv() {
            let text = match o {
                Outbound::Text(t) => t,
                Outbound::Ws(Message::Text(t)) => t.as_str().to_string(),
                _ => continue,
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            // (The join reply these tests pass is `{}`.)
            if let Some(e) = v["event"].as_str() {
                out.push((e.to_string(), v["payload"].clone()));
            }
        }
        out
    }

    #[test]
    fn presences_of_other_gateways_reach_members_as_their_rules_allow() {
        let mut r = rule(
            "support:*",
            &["staff", "customer"],
            &["staff", "customer"],
            None,
        );
        r.presence_sees = Some(
            [
                ("staff".to_string(), vec!["*".to_string()]),
                ("customer".to_string(), vec!["staff".to_string()]),
            ]
            .into(),
        );
        let b = Broadcaster::new(
            BroadcastConfig::default(),
            PresenceConfig::default(),
            vec![r],
        );
        let shared = Arc::new(Mutex::new(Vec::new()));
        let sink = shared.clone();
        b.set_presence_sink(Box::new(move |o| sink.lock().unwrap().push(o)));
        // The sink starts with what is held (nothing yet).
        assert_eq!(
            shared.lock().unwrap().remove(0),
            PresenceOut::Summary(Vec::new())
        );
        let topic = "realtime:support:1";
        let key = (topic.to_string(), true);
        let meta = |k: &str, r: &str, role: &str| SharedMeta {
            key: k.into(),
            role: Some(role.into()),
            meta: json!({"phx_ref": r}),
        };
        // Another gateway's staff member and customer are there before anyone here.
        b.remote_summary(
            9,
            vec![
                (key.clone(), meta("sam", "s1", "staff")),
                (key.clone(), meta("cat", "c1", "customer")),
            ],
        );
        assert_eq!(b.remote_presences(), 2);
        let join = |id: ChannelId, role: &str| {
            let (tx, rx) = crate::route::queue::channel(64);
            let conn = ConnHandle::new(id, tx, usize::MAX);
            b.join(
                JoinRequest {
                    conn: &conn,
                    vsn: Vsn::V1,
                    channel: id,
                    topic,
                    join_ref: Some("1"),
                    config: &json!({"private": true, "presence": {"enabled": true, "key": role}}),
                    claims: claims(json!({ "role": role })),
                },
                "{}".into(),
            );
            (conn, rx)
        };
        let (_c1, mut customer) = join(1, "customer");
        let (_c2, mut staff) = join(2, "staff");
        // presence_state: a customer sees staff only; staff see everyone.
        let state = |f: Vec<(String, Value)>| {
            f.into_iter()
                .find(|(e, _)| e == "presence_state")
                .unwrap()
                .1
        };
        assert_eq!(
            state(frames(&mut customer)),
            json!({"sam": {"metas": [{"phx_ref": "s1"}]}})
        );
        let s = state(frames(&mut staff));
        assert_eq!(s.as_object().unwrap().len(), 2, "{s}");
        // A remote customer leaves: staff see it, the customer does not.
        b.remote_diff(
            9,
            key.clone(),
            SharedDiff {
                joins: vec![],
                leaves: vec![("cat".into(), "c1".into())],
            },
        );
        assert!(frames(&mut customer).is_empty());
        let f = frames(&mut staff);
        assert_eq!(f[0].0, "presence_diff");
        assert_eq!(f[0].1["leaves"]["cat"]["metas"][0]["phx_ref"], "c1");
        // A local track goes to the other gateways with the tracker's role.
        let mut limits = b.conn_limits();
        let push = Frame {
            join_ref: Some("1".into()),
            ref_: Some("2".into()),
            topic: topic.into(),
            event: "presence".into(),
            payload: json!({"type": "presence", "event": "track", "payload": {"on": 1}}),
        };
        b.client_presence(&mut limits, 1, &push);
        let PresenceOut::Diff { topic: t, diff } = shared.lock().unwrap().remove(0) else {
            panic!("a diff")
        };
        assert_eq!(t, key);
        assert_eq!(diff.joins[0].key, "customer");
        assert_eq!(diff.joins[0].role.as_deref(), Some("customer"));
        // A token with another role: the other gateways get the presence
        // again, judged by the new role.
        b.update_claims(1, &claims(json!({"role": "staff"})));
        let PresenceOut::Diff { diff, .. } = shared.lock().unwrap().remove(0) else {
            panic!("a diff")
        };
        assert_eq!(diff.joins.len(), 1);
        assert_eq!(diff.joins[0].role.as_deref(), Some("staff"));
        let r = diff.joins[0].meta["phx_ref"].as_str().unwrap().to_string();
        assert_eq!(diff.leaves, vec![("customer".to_string(), r)]);
        // The same role again: nothing to tell.
        b.update_claims(1, &claims(json!({"role": "staff"})));
        assert!(shared.lock().unwrap().is_empty());
        // The gateway's gone: leaves.
        b.remote_gone(9);
        assert_eq!(b.remote_presences(), 0);
        let f = frames(&mut customer);
        assert!(
            f.iter()
                .any(|(e, p)| e == "presence_diff" && p["leaves"]["sam"].is_object()),
            "{f:?}"
        );
    }
}
