//! The hub: routes each change to the subscriptions that want it and may see it.
//!
//! One task owns all subscription state, so there are no locks on the hot path.
//! It takes commands (subscribe, unsubscribe, disconnect) from WebSocket sessions
//! and items from the replication stream, commands first, in one loop.
//!
//! # Routing index
//!
//! Subscriptions to a specific table live in that table's `TableIndex`:
//! those whose filter has an `eq`/`in` condition are hashed by the canonical key
//! of that value (per column); the rest sit in a scan list. A change looks up its
//! row's value in each indexed column and scans the short list, so the work is
//! proportional to the matches, not to all subscribers. Wildcard subscriptions
//! (`schema: "*"`, `table: "*"`) are checked by pattern.
//!
//! # Fan-out
//!
//! A change's Supabase `data` object is encoded once and shared (`Arc<str>`);
//! each channel gets one frame listing all of its binding ids that matched. Each
//! connection has one queue, bounded in frames (`limits.client_queue`) and in
//! bytes (`limits.client_queue_bytes`, one atomic add per frame). The hub never
//! waits on a connection: when a queue is full, that client is closed with a reason (a `system` message, then a
//! close frame with [`CLOSE_SLOW_CLIENT`]) and counted — no other client and not
//! the slot is slowed by it, and nothing is dropped silently.
//!
//! # Readiness and progress
//!
//! A subscribe command is acknowledged once the subscription is in the index, and
//! the session sends the join reply only then, so every change committed after the
//! client sees `SUBSCRIBED` reaches it. A transaction's end LSN is confirmed to the
//! replication stream after its changes were handed to the connection queues.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::event::{AllColumns, Change, ChangeKind, DbMessage, Item};
use crate::filter::{canonical_key, BoundFilter, Filter};
use crate::pgoutput::RelId;
use crate::relation::Table;
use crate::replication::Progress;
use crate::value::RenderOptions;

/// Close code sent to a client whose outbound queue overflowed.
pub const CLOSE_SLOW_CLIENT: u16 = 4008;

pub type ConnId = u64;
pub type ChannelId = u64;

/// What a connection's writer sends, in order.
#[derive(Debug)]
pub enum Outbound {
    /// A complete text frame.
    Text(String),
    /// A complete binary frame (vsn 2.0.0 only).
    Binary(Vec<u8>),
    /// A complete frame whose bytes are shared by many connections (broadcast fan-out).
    Ws(axum::extract::ws::Message),
    /// A `system` message for one channel (the writer encodes it for the socket's
    /// protocol version); `payload` is the JSON object.
    System { topic: Arc<str>, payload: String },
    /// A `postgres_changes` frame, assembled by the writer around the shared `data`.
    Change {
        topic: Arc<str>,
        ids: BindingIds,
        data: Arc<str>,
    },
}

/// The binding ids of one channel that a change matched: nearly always one, so
/// that case is kept inline (no allocation per delivery).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindingIds {
    One(u32),
    Many(Box<[u32]>),
}

impl std::ops::Deref for BindingIds {
    type Target = [u32];

    fn deref(&self) -> &[u32] {
        match self {
            BindingIds::One(id) => std::slice::from_ref(id),
            BindingIds::Many(ids) => ids,
        }
    }
}

/// Hasher for the hub's own sequential ids (channels, connections): one
/// multiplication. Not for keys a client chooses (those keep SipHash).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Past this many entries a [`SubList`] keeps a position map.
const SUB_LIST_INDEXED_FROM: usize = 32;

/// A set of subscription ids iterated as a plain vector. Removal is O(1) once
/// the list is long (a position map, kept from [`SUB_LIST_INDEXED_FROM`]
/// entries), so thousands of subscribers of one table or one key leaving at once
/// cost linear, not quadratic, time; short lists (most `eq` keys) stay small.
#[derive(Debug, Default)]
struct SubList {
    ids: Vec<SubId>,
    pos: Option<Box<IdMap<SubId, usize>>>,
}

impl SubList {
    fn insert(&mut self, id: SubId) {
        match &mut self.pos {
            Some(pos) => {
                if pos.contains_key(&id) {
                    return;
                }
                pos.insert(id, self.ids.len());
            }
            None if self.ids.contains(&id) => return,
            None => {}
        }
        self.ids.push(id);
        if self.pos.is_none() && self.ids.len() > SUB_LIST_INDEXED_FROM {
            let pos = self.ids.iter().enumerate().map(|(i, &s)| (s, i)).collect();
            self.pos = Some(Box::new(pos));
        }
    }

    fn remove(&mut self, id: SubId) {
        let at = match &mut self.pos {
            Some(pos) => pos.remove(&id),
            None => self.ids.iter().position(|&s| s == id),
        };
        let Some(i) = at else { return };
        self.ids.swap_remove(i);
        if let (Some(pos), Some(&moved)) = (&mut self.pos, self.ids.get(i)) {
            pos.insert(moved, i);
        }
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = SubId> + '_ {
        self.ids.iter().copied()
    }
}

/// Why a connection is being closed by the server.
#[derive(Clone, Debug)]
pub struct CloseReason {
    pub code: u16,
    pub reason: String,
}

/// A connection as the hub knows it: its queue and a way to close it.
#[derive(Clone, Debug)]
pub struct ConnHandle {
    pub id: ConnId,
    pub tx: mpsc::Sender<Outbound>,
    /// Bytes queued in `tx` and not yet written, against the connection's limit.
    pub queued: Arc<QueuedBytes>,
    pub kill: CancellationToken,
    pub close_reason: Arc<Mutex<Option<CloseReason>>>,
}

/// The bytes a connection's outbound queue holds, bounded by `limit`
/// (`limits.client_queue_bytes`): one atomic add when a frame is queued, one
/// subtraction when the writer takes it.
#[derive(Debug)]
pub struct QueuedBytes {
    used: AtomicUsize,
    limit: usize,
}

impl QueuedBytes {
    pub fn new(limit: usize) -> Self {
        QueuedBytes {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// Reserves `n` bytes; false when that would pass the limit. A frame alone in
    /// an empty queue is always accepted, so one large change cannot close an idle
    /// client.
    fn reserve(&self, n: usize) -> bool {
        let before = self.used.fetch_add(n, Ordering::Relaxed);
        if before > 0 && before + n > self.limit {
            self.used.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Gives back the bytes of a frame taken off the queue.
    pub fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Bytes queued now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Why a frame could not be queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The queue is full (in frames or in bytes): the client is slow.
    Full,
    /// The connection is gone.
    Closed,
}

/// Queues `out` on `tx` within the byte bound `queued`.
fn queue(
    tx: &mpsc::Sender<Outbound>,
    queued: &QueuedBytes,
    out: Outbound,
) -> Result<(), QueueError> {
    let n = out.queued_size();
    if !queued.reserve(n) {
        return Err(QueueError::Full);
    }
    match tx.try_send(out) {
        Ok(()) => Ok(()),
        Err(e) => {
            queued.release(n);
            Err(match e {
                mpsc::error::TrySendError::Full(_) => QueueError::Full,
                mpsc::error::TrySendError::Closed(_) => QueueError::Closed,
            })
        }
    }
}

impl Outbound {
    /// The bytes this frame holds while queued (shared bytes counted in full:
    /// a stalled client keeps them alive).
    pub fn queued_size(&self) -> usize {
        /// Per-frame overhead: the queue slot and the frame's envelope.
        const FRAME_OVERHEAD: usize = 64;
        FRAME_OVERHEAD
            + match self {
                Outbound::Text(t) => t.len(),
                Outbound::Binary(b) => b.len(),
                Outbound::Ws(m) => match m {
                    axum::extract::ws::Message::Text(t) => t.as_str().len(),
                    axum::extract::ws::Message::Binary(b) => b.len(),
                    _ => 0,
                },
                Outbound::Change { topic, ids, data } => topic.len() + 12 * ids.len() + data.len(),
                Outbound::System { topic, payload } => topic.len() + payload.len(),
            }
    }
}

impl ConnHandle {
    /// A handle for connection `id` whose queue holds at most `max_bytes`.
    pub fn new(id: ConnId, tx: mpsc::Sender<Outbound>, max_bytes: usize) -> Self {
        ConnHandle {
            id,
            tx,
            queued: Arc::new(QueuedBytes::new(max_bytes)),
            kill: CancellationToken::new(),
            close_reason: Arc::default(),
        }
    }

    /// Queues a frame without waiting; `Full` means the client is too slow.
    pub fn try_queue(&self, out: Outbound) -> Result<(), QueueError> {
        queue(&self.tx, &self.queued, out)
    }

    /// Asks the connection to close with `reason` (first reason wins).
    pub fn close(&self, code: u16, reason: impl Into<String>) {
        if let Ok(mut r) = self.close_reason.lock() {
            if r.is_none() {
                *r = Some(CloseReason {
                    code,
                    reason: reason.into(),
                });
            }
        }
        self.kill.cancel();
    }
}

/// Event kinds a binding wants, as a bit set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventMask(u8);

impl EventMask {
    pub const INSERT: EventMask = EventMask(1);
    pub const UPDATE: EventMask = EventMask(2);
    pub const DELETE: EventMask = EventMask(4);
    /// `*`: every kind, TRUNCATE included.
    pub const ALL: EventMask = EventMask(15);

    pub fn parse(event: &str) -> Option<EventMask> {
        match event.to_ascii_uppercase().as_str() {
            "*" => Some(EventMask::ALL),
            "INSERT" => Some(EventMask::INSERT),
            "UPDATE" => Some(EventMask::UPDATE),
            "DELETE" => Some(EventMask::DELETE),
            _ => None,
        }
    }

    fn has(self, kind: ChangeKind) -> bool {
        let bit = match kind {
            ChangeKind::Insert => 1,
            ChangeKind::Update => 2,
            ChangeKind::Delete => 4,
            ChangeKind::Truncate => 8,
        };
        self.0 & bit != 0
    }
}

/// Which tables a binding covers.
#[derive(Clone, Debug)]
pub enum Target {
    Table(Arc<Table>),
    /// `None` = any (`*`).
    Pattern {
        schema: Option<String>,
        table: Option<String>,
    },
}

/// One `postgres_changes` binding of a join, resolved.
#[derive(Clone, Debug)]
pub struct Binding {
    pub id: u32,
    pub events: EventMask,
    pub target: Target,
    /// The subscriber's filter (already checked to bind to the target table).
    pub filter: Filter,
    /// What the subscriber's token allows (all, without auth).
    pub access: BindingAccess,
}

/// The auth rule applied to a binding (see `auth`).
#[derive(Clone, Debug, Default)]
pub struct BindingAccess {
    /// Rows the subscriber may see; `None` = all.
    pub rows: Option<Filter>,
    /// The rule matches nothing (a claim it needs is missing).
    pub deny_all: bool,
    /// Columns the subscriber may see; `None` = all.
    pub columns: Option<Arc<Vec<String>>>,
    /// Unix seconds after which nothing more is delivered (the token's `exp`).
    pub expires_at: Option<i64>,
}

pub enum HubCommand {
    Subscribe {
        conn: ConnHandle,
        channel: ChannelId,
        topic: Arc<str>,
        bindings: Vec<Binding>,
        done: oneshot::Sender<()>,
    },
    Unsubscribe {
        channel: ChannelId,
    },
    /// Replaces a channel's bindings (after a token refresh changed what it may see).
    Replace {
        channel: ChannelId,
        bindings: Vec<Binding>,
        done: oneshot::Sender<()>,
    },
    Disconnect {
        conn: ConnId,
    },
    /// A `system` message to every channel with `postgres_changes` bindings (the
    /// replication outage notices; see `notice`).
    Notice(Notice),
    /// Sent by a session after a join's reply: a channel with `postgres_changes`
    /// bindings that joins during an outage gets the `REPLICATION_DOWN` notice now;
    /// with `replication_ready` (`config.broadcast.replication_ready`) it is told
    /// once replication is ready: a `system` message `ok` then, or `error` if it is
    /// not ready by that deadline.
    Joined {
        channel: ChannelId,
        replication_ready: Option<std::time::Instant>,
    },
    /// Whether replication is ready now (sent periodically by the outage monitor;
    /// also expires replication-ready watches past their deadline).
    ReplicationReady(bool),
}

/// A `system` message to all `postgres_changes` channels.
#[derive(Clone, Debug)]
pub struct Notice {
    /// `ok` or `error`.
    pub status: &'static str,
    /// A stable machine-readable code (`REPLICATION_DOWN`, `REPLICATION_OK`, …).
    pub code: &'static str,
    pub message: String,
    /// Extra fields of the payload (such as `from_lsn` / `to_lsn` of a gap).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Counters the hub keeps (read by metrics).
#[derive(Debug, Default)]
pub struct HubStats {
    pub changes: AtomicU64,
    pub frames_queued: AtomicU64,
    pub slow_clients_closed: AtomicU64,
    pub subscriptions: AtomicU64,
    /// Changes routed, by [`ChangeKind`] (see [`HubStats::changes_of`]).
    pub changes_by_kind: [AtomicU64; 4],
    /// Commit → queued-to-clients latency of each change that had a subscriber.
    pub commit_to_send: crate::metrics::LatencyHistogram,
    /// Unix micros of the commit time of the last transaction the hub finished.
    pub last_commit_unix_micros: AtomicI64,
}

impl HubStats {
    /// Changes of `kind` routed so far.
    pub fn changes_of(&self, kind: ChangeKind) -> u64 {
        self.changes_by_kind[kind_index(kind)].load(Ordering::Relaxed)
    }
}

fn kind_index(kind: ChangeKind) -> usize {
    match kind {
        ChangeKind::Insert => 0,
        ChangeKind::Update => 1,
        ChangeKind::Delete => 2,
        ChangeKind::Truncate => 3,
    }
}

type SubId = usize;

/// A change's `data` encoded for one (column mask, old image hidden) variant.
type Encoding = (Option<Arc<[bool]>>, bool, Arc<str>);

/// A subscription that matched a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Hit {
    channel: ChannelId,
    binding_id: u32,
    sub: SubId,
}

struct Sub {
    channel: ChannelId,
    binding_id: u32,
    events: EventMask,
    filter: Filter,
    access: BindingAccess,
    /// Subscriber filter AND row rule, bound to the table.
    bound: Option<BoundFilter>,
    /// The row rule alone, to judge an UPDATE's old image.
    rule: Option<BoundFilter>,
    /// Column allow-list as a mask over the table's columns.
    mask: Option<Arc<[bool]>>,
    /// Where the sub sits in its table's index, to remove it.
    slot: IndexSlot,
}

#[derive(Clone, Debug, PartialEq)]
enum IndexSlot {
    Keyed {
        relid: RelId,
        column: usize,
        keys: Vec<String>,
    },
    Scan {
        relid: RelId,
    },
    Pattern {
        schema: Option<String>,
        table: Option<String>,
    },
}

struct ChannelState {
    conn: ConnId,
    /// The connection's queue (a clone of its handle's), saving a lookup per delivery.
    tx: mpsc::Sender<Outbound>,
    queued: Arc<QueuedBytes>,
    topic: Arc<str>,
    subs: Vec<SubId>,
}

struct ConnState {
    handle: ConnHandle,
    channels: Vec<ChannelId>,
}

struct TableIndex {
    table: Arc<Table>,
    keyed: HashMap<usize, HashMap<String, SubList>>,
    scan: SubList,
}

pub struct Hub {
    subs: Vec<Option<Sub>>,
    free: Vec<SubId>,
    tables: HashMap<RelId, TableIndex>,
    patterns: SubList,
    channels: IdMap<ChannelId, ChannelState>,
    conns: IdMap<ConnId, ConnState>,
    render: RenderOptions,
    stats: Arc<HubStats>,
    /// Scratch buffer of hits, reused per change.
    hits: Vec<Hit>,
    /// Where logical decoding messages go (the broadcast module).
    on_message: Option<MessageHook>,
    /// Replication readiness as last reported, and the channels waiting for it.
    replication_ready: bool,
    ready_watches: Vec<(ChannelId, std::time::Instant)>,
    /// The `REPLICATION_DOWN` notice in force (for channels that join meanwhile).
    down_notice: Option<Notice>,
}

/// Receives each logical decoding message (`pg_logical_emit_message`) the stream
/// carries, in commit order with the changes; must not block.
pub type MessageHook = Arc<dyn Fn(&DbMessage) + Send + Sync>;

impl Hub {
    pub fn new(render: RenderOptions, stats: Arc<HubStats>) -> Self {
        Hub {
            subs: Vec::new(),
            free: Vec::new(),
            tables: HashMap::new(),
            patterns: SubList::default(),
            channels: IdMap::default(),
            conns: IdMap::default(),
            render,
            stats,
            hits: Vec::new(),
            on_message: None,
            replication_ready: false,
            ready_watches: Vec::new(),
            down_notice: None,
        }
    }

    /// Hands logical decoding messages to `hook`.
    pub fn with_message_hook(mut self, hook: MessageHook) -> Self {
        self.on_message = Some(hook);
        self
    }

    /// Runs until the item stream ends (the replication stream stopped).
    pub async fn run(
        mut self,
        mut items: mpsc::Receiver<Item>,
        mut commands: mpsc::Receiver<HubCommand>,
        progress: Arc<Progress>,
    ) {
        let mut commands_open = true;
        loop {
            tokio::select! {
                biased;
                cmd = commands.recv(), if commands_open => match cmd {
                    Some(c) => self.command(c),
                    None => commands_open = false,
                },
                item = items.recv() => match item {
                    Some(item) => self.item(item, &progress),
                    None => break,
                },
            }
        }
    }

    pub fn item(&mut self, item: Item, progress: &Progress) {
        match item {
            Item::Change(c) => self.route(&c),
            Item::Truncate(cs) => {
                for c in &cs {
                    self.route(c)
                }
            }
            Item::Commit { end_lsn, info } => {
                self.stats
                    .last_commit_unix_micros
                    .store(info.commit_time.unix_micros(), Ordering::Relaxed);
                progress.confirm(end_lsn)
            }
            // Logical messages (e.g. `walcast.broadcast()`), in stream order.
            Item::Message(m) => {
                if let Some(hook) = &self.on_message {
                    hook(&m)
                }
            }
            Item::Begin(_) => {}
        }
    }

    pub fn command(&mut self, cmd: HubCommand) {
        match cmd {
            HubCommand::Subscribe {
                conn,
                channel,
                topic,
                bindings,
                done,
            } => {
                let cid = conn.id;
                let state = self.conns.entry(cid).or_insert_with(|| ConnState {
                    handle: conn,
                    channels: Vec::new(),
                });
                state.channels.push(channel);
                let tx = state.handle.tx.clone();
                let queued = state.handle.queued.clone();
                let mut subs = Vec::with_capacity(bindings.len());
                for b in bindings {
                    subs.push(self.add_sub(channel, b));
                }
                self.channels.insert(
                    channel,
                    ChannelState {
                        conn: cid,
                        tx,
                        queued,
                        topic,
                        subs,
                    },
                );
                let _ = done.send(());
            }
            HubCommand::Unsubscribe { channel } => self.remove_channel(channel),
            HubCommand::Replace {
                channel,
                bindings,
                done,
            } => {
                let old = self
                    .channels
                    .get_mut(&channel)
                    .map(|ch| std::mem::take(&mut ch.subs))
                    .unwrap_or_default();
                for s in old {
                    self.remove_sub(s);
                }
                if self.channels.contains_key(&channel) {
                    let mut subs = Vec::with_capacity(bindings.len());
                    for b in bindings {
                        subs.push(self.add_sub(channel, b));
                    }
                    if let Some(ch) = self.channels.get_mut(&channel) {
                        ch.subs = subs;
                    }
                }
                let _ = done.send(());
            }
            HubCommand::Disconnect { conn } => self.remove_conn(conn),
            HubCommand::Notice(n) => self.notice(&n),
            HubCommand::Joined {
                channel,
                replication_ready,
            } => {
                if let Some(n) = self.down_notice.clone() {
                    self.notice_to(channel, &n);
                }
                if let Some(deadline) = replication_ready {
                    self.watch_replication_ready(channel, deadline)
                }
            }
            HubCommand::ReplicationReady(ready) => self.set_replication_ready(ready),
        }
    }

    fn add_sub(&mut self, channel: ChannelId, b: Binding) -> SubId {
        let (slot, bound) = match &b.target {
            Target::Table(t) => {
                let combined = match &b.access.rows {
                    Some(rule) => b.filter.clone().and(rule.clone()),
                    None => b.filter.clone(),
                };
                let bound = if b.access.deny_all {
                    None
                } else {
                    combined.bind(t).ok()
                };
                let relid = t.id;
                let slot = match bound.as_ref().and_then(BoundFilter::index_key) {
                    Some((column, keys)) => IndexSlot::Keyed {
                        relid,
                        column,
                        keys,
                    },
                    None => IndexSlot::Scan { relid },
                };
                (slot, bound)
            }
            Target::Pattern { schema, table } => (
                IndexSlot::Pattern {
                    schema: schema.clone(),
                    table: table.clone(),
                },
                None,
            ),
        };
        let (rule, mask) = match &b.target {
            Target::Table(t) => (
                b.access.rows.as_ref().and_then(|r| r.bind(t).ok()),
                b.access.columns.as_ref().map(|cols| {
                    t.columns
                        .iter()
                        .map(|c| cols.contains(&c.name))
                        .collect::<Arc<[bool]>>()
                }),
            ),
            Target::Pattern { .. } => (None, None),
        };
        let sub = Sub {
            channel,
            binding_id: b.id,
            events: b.events,
            filter: b.filter,
            access: b.access,
            bound,
            rule,
            mask,
            slot: slot.clone(),
        };
        let id = match self.free.pop() {
            Some(i) => {
                self.subs[i] = Some(sub);
                i
            }
            None => {
                self.subs.push(Some(sub));
                self.subs.len() - 1
            }
        };
        let table = match &b.target {
            Target::Table(t) => Some(t.clone()),
            Target::Pattern { .. } => None,
        };
        match (slot, table) {
            (
                IndexSlot::Keyed {
                    relid,
                    column,
                    keys,
                },
                Some(t),
            ) => {
                let ti = self.table_index(relid, t);
                let col = ti.keyed.entry(column).or_default();
                for k in keys {
                    col.entry(k).or_default().insert(id);
                }
            }
            (IndexSlot::Scan { relid }, Some(t)) => self.table_index(relid, t).scan.insert(id),
            _ => self.patterns.insert(id),
        }
        self.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
        id
    }

    fn table_index(&mut self, relid: RelId, table: Arc<Table>) -> &mut TableIndex {
        self.tables.entry(relid).or_insert_with(|| TableIndex {
            table,
            keyed: HashMap::new(),
            scan: SubList::default(),
        })
    }

    fn remove_sub(&mut self, id: SubId) {
        let Some(sub) = self.subs.get_mut(id).and_then(Option::take) else {
            return;
        };
        self.free.push(id);
        self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
        match sub.slot {
            IndexSlot::Keyed {
                relid,
                column,
                keys,
            } => {
                if let Some(ti) = self.tables.get_mut(&relid) {
                    if let Some(col) = ti.keyed.get_mut(&column) {
                        for k in keys {
                            if let Some(v) = col.get_mut(&k) {
                                v.remove(id);
                                if v.is_empty() {
                                    col.remove(&k);
                                }
                            }
                        }
                        if col.is_empty() {
                            ti.keyed.remove(&column);
                        }
                    }
                    if ti.keyed.is_empty() && ti.scan.is_empty() {
                        self.tables.remove(&relid);
                    }
                }
            }
            IndexSlot::Scan { relid } => {
                if let Some(ti) = self.tables.get_mut(&relid) {
                    ti.scan.remove(id);
                    if ti.keyed.is_empty() && ti.scan.is_empty() {
                        self.tables.remove(&relid);
                    }
                }
            }
            IndexSlot::Pattern { .. } => self.patterns.remove(id),
        }
    }

    fn remove_channel(&mut self, channel: ChannelId) {
        if let Some(ch) = self.channels.remove(&channel) {
            for s in ch.subs {
                self.remove_sub(s);
            }
            if let Some(c) = self.conns.get_mut(&ch.conn) {
                c.channels.retain(|&x| x != channel);
            }
        }
    }

    fn remove_conn(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.remove(&conn) {
            for ch in c.channels {
                if let Some(chs) = self.channels.remove(&ch) {
                    for s in chs.subs {
                        self.remove_sub(s);
                    }
                }
            }
        }
    }

    /// Number of live subscriptions (for tests and metrics).
    pub fn subscription_count(&self) -> usize {
        self.subs.iter().filter(|s| s.is_some()).count()
    }

    /// Routes one change to every matching channel.
    pub fn route(&mut self, change: &Arc<Change>) {
        self.stats.changes.fetch_add(1, Ordering::Relaxed);
        self.hits.clear();
        let kind = change.kind;
        self.stats.changes_by_kind[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
        let row = match kind {
            ChangeKind::Insert | ChangeKind::Update => change.new.as_ref(),
            ChangeKind::Delete => change.old.as_ref(),
            ChangeKind::Truncate => None,
        };
        let relid = change.table.id;
        if self.tables.contains_key(&relid) {
            self.rebind_if_changed(relid, &change.table);
        }
        let now = crate::auth::now_unix();
        if let Some(ti) = self.tables.get(&relid) {
            let subs = &self.subs;
            let hits = &mut self.hits;
            let mut consider = |sid: SubId| {
                if let Some(Some(s)) = subs.get(sid) {
                    if !s.events.has(kind) || s.access.expires_at.is_some_and(|e| e <= now) {
                        return;
                    }
                    let ok = match (&s.bound, row) {
                        (Some(f), Some(r)) => f.matches(r),
                        (Some(f), None) => f.is_empty(),
                        // A filter that no longer binds to the table matches nothing.
                        (None, _) => false,
                    };
                    if ok {
                        hits.push(Hit {
                            channel: s.channel,
                            binding_id: s.binding_id,
                            sub: sid,
                        });
                    }
                }
            };
            if let Some(r) = row {
                for (&col, map) in &ti.keyed {
                    let Some(cell) = r.get(col) else { continue };
                    let Some(text) = cell.text() else { continue };
                    let Some(key) = canonical_key(&ti.table.columns[col].ty, text) else {
                        continue;
                    };
                    if let Some(v) = map.get(&key) {
                        for sid in v.iter() {
                            consider(sid);
                        }
                    }
                }
            }
            for sid in ti.scan.iter() {
                consider(sid);
            }
        }
        for sid in self.patterns.iter() {
            if let Some(Some(s)) = self.subs.get(sid) {
                if let IndexSlot::Pattern { schema, table } = &s.slot {
                    let schema_ok = schema.as_deref().is_none_or(|x| x == change.table.schema);
                    let table_ok = table.as_deref().is_none_or(|x| x == change.table.name);
                    let live = s.access.expires_at.is_none_or(|e| e > now);
                    if schema_ok && table_ok && s.events.has(kind) && live {
                        self.hits.push(Hit {
                            channel: s.channel,
                            binding_id: s.binding_id,
                            sub: sid,
                        });
                    }
                }
            }
        }
        if self.hits.is_empty() {
            return;
        }
        self.hits.sort_unstable();
        self.hits.dedup_by_key(|h| (h.channel, h.binding_id));
        // One encoding per distinct (column mask, old image kept) among the channels.
        let mut encodings: Vec<Encoding> = Vec::new();
        let mut slow = Vec::new();
        let mut queued = 0u64;
        let mut i = 0;
        while i < self.hits.len() {
            let channel = self.hits[i].channel;
            let first_sub = self.hits[i].sub;
            let start = i;
            while i < self.hits.len() && self.hits[i].channel == channel {
                i += 1;
            }
            let ids = match &self.hits[start..i] {
                [one] => BindingIds::One(one.binding_id),
                many => BindingIds::Many(many.iter().map(|h| h.binding_id).collect()),
            };
            let Some(Some(sub)) = self.subs.get(first_sub) else {
                continue;
            };
            // An UPDATE that brought a row into the subscriber's rule: its old image
            // is not the subscriber's to see. (Under REPLICA IDENTITY FULL pgoutput
            // flags every column as key, so "key only" cannot be trusted here.)
            let old_key_only = kind == ChangeKind::Update
                && match (&sub.rule, change.old.as_ref()) {
                    (Some(rule), Some(old)) => !rule.matches(old),
                    _ => false,
                };
            let data = match encodings.iter().find(|(m, k, _)| {
                *k == old_key_only
                    && match (m, &sub.mask) {
                        (None, None) => true,
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                        _ => false,
                    }
            }) {
                Some((_, _, d)) => d.clone(),
                None => {
                    let mut text = String::with_capacity(512);
                    match &sub.mask {
                        Some(m) => {
                            change.to_supabase_data(&mut text, &m[..], self.render, old_key_only)
                        }
                        None => change.to_supabase_data(
                            &mut text,
                            &AllColumns,
                            self.render,
                            old_key_only,
                        ),
                    }
                    let d: Arc<str> = Arc::from(text);
                    encodings.push((sub.mask.clone(), old_key_only, d.clone()));
                    d
                }
            };
            let Some(ch) = self.channels.get(&channel) else {
                continue;
            };
            let out = Outbound::Change {
                topic: ch.topic.clone(),
                ids,
                data,
            };
            match queue(&ch.tx, &ch.queued, out) {
                Ok(()) => queued += 1,
                Err(_) => slow.push(ch.conn),
            }
        }
        if queued > 0 {
            self.stats
                .frames_queued
                .fetch_add(queued, Ordering::Relaxed);
            self.stats
                .commit_to_send
                .observe_since_unix_micros(change.txn.commit_time.unix_micros());
        }
        for conn in slow {
            if let Some(c) = self.conns.get(&conn) {
                if !c.handle.tx.is_closed() {
                    self.stats
                        .slow_clients_closed
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        conn,
                        "closing a client that fell behind: its outbound queue is full"
                    );
                    c.handle.close(
                        CLOSE_SLOW_CLIENT,
                        "slow client: walcast's outbound queue for this connection is full; reconnect and re-read state",
                    );
                }
            }
            self.remove_conn(conn);
        }
    }

    /// When the stream describes a table differently from what its subscriptions
    /// were bound to (a schema change), bind them again by column name.
    fn rebind_if_changed(&mut self, relid: RelId, table: &Arc<Table>) {
        let Some(ti) = self.tables.get_mut(&relid) else {
            return;
        };
        if Arc::ptr_eq(&ti.table, table) {
            return;
        }
        let same_shape = ti.table.columns.len() == table.columns.len()
            && ti
                .table
                .columns
                .iter()
                .zip(&table.columns)
                .all(|(a, b)| a.name == b.name && a.ty.name == b.ty.name);
        ti.table = table.clone();
        if same_shape {
            return;
        }
        // Re-index every sub of this table.
        let mut ids: Vec<SubId> = ti.scan.iter().collect();
        for col in ti.keyed.values() {
            for v in col.values() {
                ids.extend(v.iter());
            }
        }
        ids.sort_unstable();
        ids.dedup();
        for sid in ids {
            let Some(Some(sub)) = self.subs.get(sid) else {
                continue;
            };
            let binding = Binding {
                id: sub.binding_id,
                events: sub.events,
                target: Target::Table(table.clone()),
                filter: sub.filter.clone(),
                access: sub.access.clone(),
            };
            let channel = sub.channel;
            self.remove_sub(sid);
            let new_id = self.add_sub(channel, binding);
            if let Some(ch) = self.channels.get_mut(&channel) {
                for s in ch.subs.iter_mut() {
                    if *s == sid {
                        *s = new_id;
                    }
                }
            }
        }
    }
}

// Replication notices: `system` messages about the stream behind the channels.
impl Hub {
    /// Sends `n` to every channel that has `postgres_changes` bindings.
    fn notice(&mut self, n: &Notice) {
        match n.code {
            "REPLICATION_DOWN" => self.down_notice = Some(n.clone()),
            "REPLICATION_OK" => self.down_notice = None,
            _ => {}
        }
        let targets: Vec<ChannelId> = self
            .channels
            .iter()
            .filter(|(_, ch)| !ch.subs.is_empty())
            .map(|(&id, _)| id)
            .collect();
        for channel in targets {
            self.notice_to(channel, n);
        }
    }

    /// Sends `n` to one channel, if it has `postgres_changes` bindings.
    fn notice_to(&mut self, channel: ChannelId, n: &Notice) {
        let Some(topic) = self
            .channels
            .get(&channel)
            .filter(|ch| !ch.subs.is_empty())
            .map(|ch| ch.topic.clone())
        else {
            return;
        };
        let mut payload = serde_json::Map::new();
        payload.insert("extension".into(), "postgres_changes".into());
        payload.insert("status".into(), n.status.into());
        payload.insert("message".into(), n.message.clone().into());
        payload.insert("channel".into(), channel_name(&topic).into());
        payload.insert("code".into(), n.code.into());
        payload.extend(n.extra.clone());
        self.system_to(channel, serde_json::Value::Object(payload).to_string());
    }

    fn watch_replication_ready(&mut self, channel: ChannelId, deadline: std::time::Instant) {
        if self.replication_ready {
            self.replication_ready_reply(channel, true);
        } else {
            self.ready_watches.push((channel, deadline));
        }
    }

    fn set_replication_ready(&mut self, ready: bool) {
        self.replication_ready = ready;
        if self.ready_watches.is_empty() {
            return;
        }
        let now = std::time::Instant::now();
        let watches = std::mem::take(&mut self.ready_watches);
        for (channel, deadline) in watches {
            if ready {
                self.replication_ready_reply(channel, true);
            } else if now >= deadline {
                self.replication_ready_reply(channel, false);
            } else {
                self.ready_watches.push((channel, deadline));
            }
        }
    }

    /// The answer to `replication_ready`, in the form realtime-js documents.
    fn replication_ready_reply(&mut self, channel: ChannelId, ok: bool) {
        let Some(topic) = self.channels.get(&channel).map(|ch| ch.topic.clone()) else {
            return;
        };
        let payload = serde_json::json!({
            "extension": "system",
            "status": if ok { "ok" } else { "error" },
            "message": if ok {
                "Replication connection established"
            } else {
                "Replication connection was not established in time"
            },
            "channel": channel_name(&topic),
            "code": if ok { "REPLICATION_OK" } else { "REPLICATION_DOWN" },
        });
        self.system_to(channel, payload.to_string());
    }

    /// Queues a `system` message for one channel; a full queue closes the
    /// connection as a slow client, as for changes.
    fn system_to(&mut self, channel: ChannelId, payload: String) {
        let Some(ch) = self.channels.get(&channel) else {
            return;
        };
        let conn = ch.conn;
        let out = Outbound::System {
            topic: ch.topic.clone(),
            payload,
        };
        // Within the connection's byte bound, like every other frame (the writer
        // releases what it takes).
        if queue(&ch.tx, &ch.queued, out).is_ok() {
            return;
        }
        if let Some(c) = self.conns.get(&conn) {
            if !c.handle.tx.is_closed() {
                self.stats
                    .slow_clients_closed
                    .fetch_add(1, Ordering::Relaxed);
                c.handle.close(
                    CLOSE_SLOW_CLIENT,
                    "slow client: walcast's outbound queue for this connection is full; reconnect and re-read state",
                );
            }
        }
        self.remove_conn(conn);
    }
}

/// A topic without its `realtime:` prefix, as `system` payloads name channels.
fn channel_name(topic: &str) -> &str {
    topic.strip_prefix("realtime:").unwrap_or(topic)
}

/// A deterministic, non-zero binding id (27 bits, like Supabase's) from the binding's
/// parameters, so identical bindings share an id and a rejoin gets the same ids.
pub fn binding_id(event: &str, schema: &str, table: Option<&str>, filter: Option<&str>) -> u32 {
    // FNV-1a over the fields with separators.
    let mut h: u32 = 0x811c_9dc5;
    for part in [
        event,
        "\u{1}",
        schema,
        "\u{1}",
        table.unwrap_or("\u{2}"),
        "\u{1}",
        filter.unwrap_or("\u{2}"),
    ] {
        for b in part.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    let id = h & 0x07ff_ffff;
    if id == 0 {
        1
    } else {
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any mix of inserts and removals leaves the same set as a plain model,
        /// below and above the size where the position map takes over.
        #[test]
        fn sub_list_is_a_set(ops in proptest::collection::vec((any::<bool>(), 0usize..80), 0..400)) {
            let mut list = SubList::default();
            let mut model = std::collections::BTreeSet::new();
            for (insert, id) in ops {
                if insert {
                    list.insert(id);
                    model.insert(id);
                } else {
                    list.remove(id);
                    model.remove(&id);
                }
                let mut got: Vec<SubId> = list.iter().collect();
                got.sort_unstable();
                prop_assert_eq!(&got, &model.iter().copied().collect::<Vec<_>>());
                prop_assert_eq!(list.is_empty(), model.is_empty());
                if let Some(pos) = &list.pos {
                    prop_assert_eq!(pos.len(), list.ids.len());
                    for (i, s) in list.ids.iter().enumerate() {
                        prop_assert_eq!(pos.get(s), Some(&i));
                    }
                }
            }
        }
    }

    fn subscribe(
        hub: &mut Hub,
        conn: ConnId,
        channel: ChannelId,
        topic: &str,
        bindings: Vec<Binding>,
    ) -> mpsc::Receiver<Outbound> {
        let (tx, rx) = mpsc::channel(8);
        let (done, _) = oneshot::channel();
        hub.command(HubCommand::Subscribe {
            conn: ConnHandle::new(conn, tx, usize::MAX),
            channel,
            topic: Arc::from(topic),
            bindings,
            done,
        });
        rx
    }

    fn any_table() -> Binding {
        Binding {
            id: 1,
            events: EventMask::ALL,
            target: Target::Pattern {
                schema: None,
                table: None,
            },
            filter: Filter::default(),
            access: BindingAccess::default(),
        }
    }

    fn system(rx: &mut mpsc::Receiver<Outbound>) -> Option<(String, serde_json::Value)> {
        match rx.try_recv().ok()? {
            Outbound::System { topic, payload } => {
                Some((topic.to_string(), serde_json::from_str(&payload).unwrap()))
            }
            other => panic!("not a system message: {other:?}"),
        }
    }

    #[test]
    fn notices_reach_only_postgres_changes_channels() {
        let mut hub = Hub::new(RenderOptions::default(), Arc::default());
        let mut pg = subscribe(&mut hub, 1, 10, "realtime:room", vec![any_table()]);
        let mut chat = subscribe(&mut hub, 2, 20, "realtime:chat", vec![]);
        hub.command(HubCommand::Notice(Notice {
            status: "error",
            code: "REPLICATION_DOWN",
            message: "down".into(),
            extra: [("reason".to_string(), serde_json::json!("disconnected"))]
                .into_iter()
                .collect(),
        }));
        let (topic, v) = system(&mut pg).expect("a notice");
        assert_eq!(topic, "realtime:room");
        assert_eq!(
            v,
            serde_json::json!({"extension": "postgres_changes", "status": "error", "message": "down",
                "channel": "room", "code": "REPLICATION_DOWN", "reason": "disconnected"})
        );
        assert!(system(&mut chat).is_none());
        // A channel joining during the outage is told after its join.
        let mut late = subscribe(&mut hub, 3, 30, "realtime:late", vec![any_table()]);
        hub.command(HubCommand::Joined {
            channel: 30,
            replication_ready: None,
        });
        assert_eq!(
            system(&mut late).expect("the notice in force").1["code"],
            "REPLICATION_DOWN"
        );
        hub.command(HubCommand::Notice(Notice {
            status: "ok",
            code: "REPLICATION_OK",
            message: "back".into(),
            extra: Default::default(),
        }));
        let mut later = subscribe(&mut hub, 4, 40, "realtime:later", vec![any_table()]);
        hub.command(HubCommand::Joined {
            channel: 40,
            replication_ready: None,
        });
        assert!(system(&mut later).is_none());
    }

    #[test]
    fn replication_ready_is_answered_when_ready_or_after_the_deadline() {
        let mut hub = Hub::new(RenderOptions::default(), Arc::default());
        let mut a = subscribe(&mut hub, 1, 10, "realtime:a", vec![]);
        let mut b = subscribe(&mut hub, 2, 20, "realtime:b", vec![]);
        let now = std::time::Instant::now();
        hub.command(HubCommand::Joined {
            channel: 10,
            replication_ready: Some(now + std::time::Duration::from_secs(60)),
        });
        hub.command(HubCommand::Joined {
            channel: 20,
            replication_ready: Some(now),
        });
        assert!(system(&mut a).is_none());
        // Not ready: only the watch past its deadline is answered, with an error.
        hub.command(HubCommand::ReplicationReady(false));
        assert!(system(&mut a).is_none());
        let (_, v) = system(&mut b).expect("an answer for b");
        assert_eq!(
            (v["extension"].as_str(), v["status"].as_str()),
            (Some("system"), Some("error"))
        );
        hub.command(HubCommand::ReplicationReady(true));
        let (_, v) = system(&mut a).expect("an answer for a");
        assert_eq!(v["status"], "ok");
        assert_eq!(v["message"], "Replication connection established");
        // Ready now: a new watch is answered at once.
        hub.command(HubCommand::Joined {
            channel: 20,
            replication_ready: Some(now),
        });
        assert_eq!(system(&mut b).expect("at once").1["status"], "ok");
    }

    #[test]
    fn a_long_list_empties_by_removal_in_arrival_order() {
        let mut list = SubList::default();
        for id in 0..100_000 {
            list.insert(id);
        }
        assert!(list.pos.is_some());
        // Each removal moves the last id into the hole; its position must follow.
        for id in 0..100_000 {
            list.remove(id);
        }
        assert!(list.is_empty());
    }
}
