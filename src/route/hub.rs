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
//! # The change log
//!
//! With a change log, the hub hands every item to the log's stage once it has
//! routed it ([`LogTap`]), in batches, so delivery never waits for the log. When
//! the log's input is full the hub takes no more items (commands still run)
//! until it has room: a log that falls behind slows the stream, not a client.
//!
//! # Readiness and progress
//!
//! A subscribe command is acknowledged once the subscription is in the index, and
//! the session sends the join reply only then, so every change committed after the
//! client sees `SUBSCRIBED` reaches it. A transaction's end LSN is confirmed to the
//! replication stream after its changes were handed to the connection queues.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::decode::event::{AllColumns, Change, ChangeKind, DbMessage, Item};
use crate::decode::pgoutput::RelId;
use crate::decode::relation::Table;
use crate::decode::value::RenderOptions;
use crate::lsn::Lsn;
use crate::route::filter::{canonical_key, BoundFilter, Filter};
use crate::route::queue::queue;
pub use crate::route::queue::{
    BindingIds, CloseReason, ConnHandle, ConnId, OutRx, OutTx, Outbound, QueueError, QueuedBytes,
    CLOSE_SLOW_CLIENT,
};
use crate::source::session::Progress;

/// `system` code of a channel closed because its table's shape changed so that
/// a binding no longer applies (a filtered or selected column dropped, a value
/// not valid for a column's new type).
pub const TABLE_CHANGED: &str = "TABLE_CHANGED";

/// `system` code of a channel closed because its table was dropped or removed
/// from the publication.
pub const TABLE_UNPUBLISHED: &str = "TABLE_UNPUBLISHED";

pub type ChannelId = u64;

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
    /// What the subscriber asked for beyond the filter (`select`, `moves`).
    pub options: BindingOptions,
}

/// A binding's optional behaviour (see README "Filters").
#[derive(Clone, Debug, Default)]
pub struct BindingOptions {
    /// `select`: only these columns in `record`, `old_record` and `columns`
    /// (already checked to exist and be visible); `None` = every visible column.
    pub select: Option<Arc<Vec<String>>>,
    /// `moves`: an UPDATE that takes a row out of the binding's filter or rule is
    /// delivered as a DELETE, one that brings it in as an INSERT, and a TRUNCATE
    /// reaches filtered bindings. Only honoured on tables with REPLICA IDENTITY
    /// FULL (the old image must be complete).
    pub moves: bool,
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
    /// RLS mode's SQL path: rows are judged per transaction by this class's
    /// check, and the connection's writer waits for the verdict.
    pub sql: Option<Arc<crate::route::rls::SqlClass>>,
}

pub enum HubCommand {
    /// Adds a channel. Answered once its subscriptions are in the index, with the
    /// commit LSN of the last change the hub routed before them. With `hold`, the
    /// channel's live frames are held back (from that moment) until `Release`:
    /// the channel is about to replay from the change log.
    Subscribe {
        conn: ConnHandle,
        channel: ChannelId,
        topic: Arc<str>,
        bindings: Vec<Binding>,
        hold: bool,
        done: oneshot::Sender<Lsn>,
    },
    /// Replayed changes (from the change log, in commit order) for one channel:
    /// judged by its bindings exactly as live changes are and queued past its
    /// hold. Answered with how many of them were sent, or `None` when the
    /// channel is gone (left, closed, or its connection closed as slow).
    Replay {
        channel: ChannelId,
        changes: Vec<Arc<Change>>,
        done: oneshot::Sender<Option<Replayed>>,
    },
    /// Ends a channel's hold: its held frames of transactions committed after
    /// `after` are queued in order (those at or before it were replayed), then
    /// live delivery goes on.
    Release {
        channel: ChannelId,
        after: Lsn,
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
    /// The relations published as of `read_at` (polled by the daemon):
    /// subscriptions to a table that is no longer among them, made before
    /// `read_at`, are closed with a `system` message.
    Published {
        relids: Vec<RelId>,
        read_at: Instant,
    },
    /// Live `postgres_changes` subscriptions by table (`schema.table`, or a
    /// wildcard pattern such as `public.*`), for the status page.
    Census(oneshot::Sender<Vec<(String, u64)>>),
    /// An RLS check of class `class` failed: its channels are closed with
    /// [`crate::route::rls::RLS_CHECK_FAILED`] and `message`.
    RlsFailed {
        class: u64,
        message: String,
    },
}

/// What a [`HubCommand::Replay`] queued: `sent` changes as they are, and one
/// ticket per change that waits for an RLS check's verdict (sent only if it
/// passes; counting it before would tell the subscriber that a row it may not
/// see changed).
#[derive(Debug, Default)]
pub struct Replayed {
    pub sent: u64,
    pub gated: Vec<crate::route::rls::Ticket>,
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
    pub subscriptions: AtomicU64,
    /// Changes routed, by [`ChangeKind`] (see [`HubStats::changes_of`]).
    pub changes_by_kind: [AtomicU64; 4],
    /// Commit → queued-to-clients latency of each change that had a subscriber.
    pub commit_to_send: LatencyHistogram,
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

/// A change's `data` encoded for one (column mask, old image hidden) variant, as a kind.
type Encoding = (EncodingKey, ChangeKind, Arc<str>);

/// Hands one change's frames to channels, encoding each payload variant once.
struct Delivery<'a> {
    encodings: &'a mut Vec<Encoding>,
    /// The default payload (no column mask, old image kept) by delivered kind
    /// ([`kind_index`]): what nearly every sub gets, found without a search.
    defaults: &'a mut [Option<Arc<str>>; 4],
    change: &'a Arc<Change>,
    render: RenderOptions,
    delivered: ChangeKind,
    queued: &'a mut u64,
    slow: &'a mut Vec<ConnId>,
    /// A replayed change: past the channel's hold, straight to its queue.
    replay: bool,
}

impl Delivery<'_> {
    /// Queues one channel's frame around the change's payload for `key` (or
    /// holds it back while the channel's replay runs).
    #[inline]
    fn send(
        &mut self,
        ch: &mut ChannelState,
        key: &EncodingKey,
        ids: BindingIds,
        ticket: Option<&crate::route::rls::Ticket>,
    ) {
        let data = self.payload(key);
        let out = match ticket {
            None => Outbound::Change {
                topic: ch.topic.clone(),
                ids,
                data,
            },
            Some(t) => {
                // Both variants: the writer drops the old image's values when
                // the verdict says the subscriber may not see the old row.
                let hidden = (self.delivered == ChangeKind::Update && !key.1)
                    .then(|| self.payload(&(key.0.clone(), true)));
                Outbound::Gated(Box::new(crate::route::queue::Gated {
                    topic: ch.topic.clone(),
                    ids,
                    data,
                    old_hidden: hidden,
                    ticket: t.clone(),
                }))
            }
        };
        if !self.replay {
            if let Some(hold) = ch.hold.as_mut() {
                let n = out.queued_size();
                if hold.frames.len() >= ch.tx.max_capacity() || hold.bytes + n > ch.queued.limit() {
                    self.slow.push(ch.conn);
                } else {
                    hold.bytes += n;
                    hold.frames.push((self.change.txn.commit_lsn, out));
                }
                return;
            }
        }
        match queue(&ch.tx, &ch.queued, out) {
            Ok(()) => *self.queued += 1,
            Err(_) => self.slow.push(ch.conn),
        }
    }

    /// Encode: the change's `data` for one payload variant, made on first use and
    /// shared by every channel that gets the same variant.
    #[inline]
    fn payload(&mut self, key: &EncodingKey) -> Arc<str> {
        if key.0.is_none() && !key.1 {
            let slot = kind_index(self.delivered);
            if let Some(d) = &self.defaults[slot] {
                return d.clone();
            }
            let d = self.encode(key);
            self.defaults[slot] = Some(d.clone());
            return d;
        }
        match self
            .encodings
            .iter()
            .find(|e| e.1 == self.delivered && same_encoding(&e.0, key))
        {
            Some(e) => e.2.clone(),
            None => {
                let d = self.encode(key);
                self.encodings
                    .push((key.clone(), self.delivered, d.clone()));
                d
            }
        }
    }

    /// The first use of a payload variant: encodes it.
    #[cold]
    #[inline(never)]
    fn encode(&self, key: &EncodingKey) -> Arc<str> {
        let mut text = String::with_capacity(self.change.supabase_data_len_hint());
        match &key.0 {
            Some(m) => self.change.to_supabase_data_as(
                &mut text,
                &m[..],
                self.render,
                key.1,
                self.delivered,
            ),
            None => self.change.to_supabase_data_as(
                &mut text,
                &AllColumns,
                self.render,
                key.1,
                self.delivered,
            ),
        }
        Arc::from(text)
    }
}

/// A subscription that matched a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Hit {
    channel: ChannelId,
    /// The kind delivered ([`kind_index`]): the change's own, or a move's.
    kind: u8,
    binding_id: u32,
    sub: SubId,
    /// The sub's payload is the default one ([`SubHot::plain`]): delivery need
    /// not read its `Sub`.
    plain: bool,
    /// The sub has moves on (it may be found twice: by the old and the new row).
    moves: bool,
}

const KINDS: [ChangeKind; 4] = [
    ChangeKind::Insert,
    ChangeKind::Update,
    ChangeKind::Delete,
    ChangeKind::Truncate,
];

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
    /// Column allow-list (rule and `select`) as a mask over the table's columns.
    mask: Option<Arc<[bool]>>,
    options: BindingOptions,
    /// Moves are on and the table's old images are complete.
    moves: bool,
    /// Where the sub sits in its table's index, to remove it.
    slot: IndexSlot,
}

/// What matching and delivery read of a [`Sub`] for every change, kept in a
/// dense vector beside `subs` (same index): a change fanned out to thousands of
/// whole-table subs walks this compact array instead of touching each large
/// `Sub`, which is read only for filters, moves and payload variants.
#[derive(Clone, Copy, Debug)]
struct SubHot {
    channel: ChannelId,
    /// The token's `exp` (unix seconds); `i64::MAX` when it has none.
    expires_at: i64,
    binding_id: u32,
    events: EventMask,
    /// Moves are on (`Sub::moves`).
    moves: bool,
    /// The bound filter (subscriber's filter AND row rule) matches every row.
    all_rows: bool,
    /// The payload is the default one whatever the change (see [`Sub::plain`]).
    plain: bool,
}

impl SubHot {
    /// A free slot: wants no event and has expired, so nothing matches it.
    const FREE: SubHot = SubHot {
        channel: 0,
        expires_at: i64::MIN,
        binding_id: 0,
        events: EventMask(0),
        moves: false,
        all_rows: false,
        plain: false,
    };

    fn of(sub: &Sub) -> SubHot {
        SubHot {
            channel: sub.channel,
            expires_at: sub.access.expires_at.unwrap_or(i64::MAX),
            binding_id: sub.binding_id,
            events: sub.events,
            moves: sub.moves,
            all_rows: sub.bound.as_ref().is_some_and(BoundFilter::is_empty),
            plain: sub.plain(),
        }
    }
}

impl Sub {
    /// No column mask and no row rule that could hide an old image: the sub's
    /// payload is the default one for every change ([`encoding_key`] is
    /// `(None, false)`).
    fn plain(&self) -> bool {
        self.mask.is_none() && self.rule.is_none() && self.access.sql.is_none()
    }
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
    tx: OutTx,
    queued: Arc<QueuedBytes>,
    topic: Arc<str>,
    subs: Vec<SubId>,
    /// While the channel's replay runs: its live frames, held back.
    hold: Option<Box<Hold>>,
    /// RLS SQL classes this channel's subscriptions had before a token
    /// refresh or re-judge gave it others: frames of theirs may still be
    /// queued, so should one fail the channel is closed (see
    /// [`Hub::retire_classes`]).
    retired: Vec<Arc<crate::route::rls::SqlClass>>,
}

/// A channel's live frames held back while its replay runs, each with its
/// transaction's commit LSN (see [`HubCommand::Release`]); bounded like the
/// connection's queue.
#[derive(Default)]
struct Hold {
    frames: Vec<(Lsn, Outbound)>,
    bytes: usize,
}

struct ConnState {
    handle: ConnHandle,
    channels: Vec<ChannelId>,
}

struct TableIndex {
    table: Arc<Table>,
    keyed: HashMap<usize, HashMap<String, SubList>>,
    /// The keyed subs with moves on, indexed again on their own: an UPDATE's old
    /// row is looked up here (a row leaving their filter), so subs without moves
    /// are not walked a second time.
    moves_keyed: HashMap<usize, HashMap<String, SubList>>,
    scan: SubList,
    /// When the index was made (a `Published` list read earlier does not judge it).
    since: Instant,
}

pub struct Hub {
    subs: Vec<Option<Sub>>,
    /// `subs`' hot fields, same index ([`SubHot::FREE`] where `subs` has `None`).
    hot: Vec<SubHot>,
    free: Vec<SubId>,
    tables: HashMap<RelId, TableIndex>,
    patterns: SubList,
    channels: IdMap<ChannelId, ChannelState>,
    conns: IdMap<ConnId, ConnState>,
    render: RenderOptions,
    stats: Arc<HubStats>,
    /// Scratch buffer of hits, reused per change.
    hits: Vec<Hit>,
    /// Scratch buffer of the hits delivery groups by channel ([`Hub::deliver`]).
    grouped: Vec<Hit>,
    /// Where logical decoding messages go (the broadcast module).
    on_message: Option<MessageHook>,
    /// Sees every routed change (the status page's feed).
    on_change: Option<ChangeHook>,
    /// Replication readiness as last reported, and the channels waiting for it.
    replication_ready: bool,
    ready_watches: Vec<(ChannelId, std::time::Instant)>,
    /// The `REPLICATION_DOWN` notice in force (for channels that join meanwhile).
    down_notice: Option<Notice>,
    /// Commit LSN of the last change routed (a channel that replays reads the
    /// log at least this far before its hold is released).
    routed_lsn: Lsn,
    /// RLS mode's SQL path: its open batches are sealed at each commit.
    gate: Option<Arc<crate::route::rls::Gate>>,
}

/// Receives each logical decoding message (`pg_logical_emit_message`) the stream
/// carries, in commit order with the changes; must not block.
pub type MessageHook = Arc<dyn Fn(&DbMessage) + Send + Sync>;

/// Sees each row change the hub routes (the status page's feed); must not block
/// and should return at once when nobody listens.
pub type ChangeHook = Arc<dyn Fn(&Change) + Send + Sync>;

/// Items in one batch handed to the change log at most.
pub const LOG_BATCH: usize = 256;

/// The hub's side of the change log's input: items it has routed, batched and
/// handed over in order when [`LOG_BATCH`] are waiting or its own input runs
/// dry (then up to the last whole transaction: an open one's items wait for
/// its commit, as the log's readers see only committed transactions anyway). A batch the
/// log had no room for waits in `unsent`, and the hub takes no item until it
/// went (bounded: the channel's batches plus one).
pub struct LogTap {
    tx: mpsc::Sender<Vec<Item>>,
    batch: Vec<Item>,
    unsent: Option<Vec<Item>>,
    /// The last item pushed was inside a transaction.
    in_txn: bool,
    /// Items of `batch` up to the end of its last whole transaction (or
    /// item outside one): what an idle moment hands over.
    whole: usize,
    /// Commit LSN of the last change routed, for readers of the log that must
    /// see whatever was delivered live (`LogHandle::caught_up`).
    routed: Arc<AtomicU64>,
}

impl LogTap {
    pub fn new(tx: mpsc::Sender<Vec<Item>>, routed: Arc<AtomicU64>) -> Self {
        LogTap {
            tx,
            batch: Vec::with_capacity(LOG_BATCH),
            unsent: None,
            in_txn: false,
            whole: 0,
            routed,
        }
    }

    /// The commit LSN an item belongs to, when the log holds it as part of a
    /// transaction (row changes, transactional messages).
    fn commit_lsn(item: &Item) -> Option<Lsn> {
        match item {
            Item::Change(c) => Some(c.txn.commit_lsn),
            Item::Truncate(cs) => cs.first().map(|c| c.txn.commit_lsn),
            Item::Message(m) => m.txn.map(|t| t.commit_lsn),
            _ => None,
        }
    }

    /// Records, before the hub routes `item` or hands it to broadcast, that
    /// the log's readers must wait for its transaction (see `LogHandle::caught_up`).
    fn mark(&self, item: &Item) {
        match item {
            // Another stream (a reconnect, maybe another source with lower
            // LSNs): what the log must reach starts over.
            Item::Stream(_) => self.routed.store(0, Ordering::Release),
            _ => {
                if let Some(l) = Self::commit_lsn(item) {
                    self.routed.store(l.0, Ordering::Release);
                }
            }
        }
    }

    /// Adds a routed item; hands the batch over when full, or at `idle`
    /// (nothing more waiting) up to its last whole transaction — the items of
    /// one still open wait for its commit (the log's readers see committed
    /// transactions only). False when the log's stage is gone.
    fn push(&mut self, item: Item, idle: bool) -> bool {
        match item {
            Item::Begin(_) => self.in_txn = true,
            // A new stream abandons a transaction left open by the old one.
            Item::Commit { .. } | Item::Stream(_) => self.in_txn = false,
            _ => {}
        }
        self.batch.push(item);
        if !self.in_txn {
            self.whole = self.batch.len();
        }
        let batch = if self.batch.len() >= LOG_BATCH {
            self.whole = 0;
            std::mem::replace(&mut self.batch, Vec::with_capacity(LOG_BATCH))
        } else if idle && self.whole > 0 {
            // The open transaction's items stay for the next batch.
            let open = self.batch.split_off(self.whole);
            self.whole = 0;
            std::mem::replace(&mut self.batch, open)
        } else {
            return true;
        };
        match self.tx.try_send(batch) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(b)) => {
                self.unsent = Some(b);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Room for the unsent batch, or `None` when the stage is gone.
    async fn room(tap: &Option<LogTap>) -> Option<mpsc::OwnedPermit<Vec<Item>>> {
        let tx = tap.as_ref()?.tx.clone();
        tx.reserve_owned().await.ok()
    }

    /// The stage is gone (it cannot have ended on its own: it ends when this
    /// side closes): delivery goes on, nothing more is logged or confirmed.
    fn lost(tap: Option<LogTap>) -> Option<LogTap> {
        if let Some(t) = tap {
            tracing::error!("the change log's stage stopped: changes are no longer logged, and nothing more is confirmed to PostgreSQL");
            // Readers that wait for the log to catch up are told it will not.
            t.routed.store(u64::MAX, Ordering::Release);
        }
        None
    }

    /// The stream ended: what is left goes to the log, then its input closes
    /// (the stage syncs and ends).
    async fn finish(mut self) {
        for b in [self.unsent.take(), Some(std::mem::take(&mut self.batch))]
            .into_iter()
            .flatten()
            .filter(|b| !b.is_empty())
        {
            if self.tx.send(b).await.is_err() {
                return;
            }
        }
    }
}

impl Hub {
    pub fn new(render: RenderOptions, stats: Arc<HubStats>) -> Self {
        Hub {
            subs: Vec::new(),
            hot: Vec::new(),
            free: Vec::new(),
            tables: HashMap::new(),
            patterns: SubList::default(),
            channels: IdMap::default(),
            conns: IdMap::default(),
            render,
            stats,
            hits: Vec::new(),
            grouped: Vec::new(),
            on_message: None,
            on_change: None,
            replication_ready: false,
            ready_watches: Vec::new(),
            down_notice: None,
            routed_lsn: Lsn::ZERO,
            gate: None,
        }
    }

    /// Seals RLS mode's SQL-path batches at each commit (see `route::rls`).
    pub fn with_rls_gate(mut self, gate: Arc<crate::route::rls::Gate>) -> Self {
        self.gate = Some(gate);
        self
    }

    fn seal_checks(&self) {
        if let Some(g) = &self.gate {
            g.seal();
        }
    }

    /// Shows every routed change to `hook` (see [`ChangeHook`]).
    pub fn with_change_hook(mut self, hook: ChangeHook) -> Self {
        self.on_change = Some(hook);
        self
    }

    /// Hands logical decoding messages to `hook`.
    pub fn with_message_hook(mut self, hook: MessageHook) -> Self {
        self.on_message = Some(hook);
        self
    }

    /// Runs until the item stream ends (the replication stream stopped); with
    /// `log`, hands every item on to the change log after routing it.
    pub async fn run(
        mut self,
        mut items: mpsc::Receiver<Item>,
        mut commands: mpsc::Receiver<HubCommand>,
        progress: Arc<Progress>,
        mut log: Option<LogTap>,
    ) {
        let mut commands_open = true;
        loop {
            let full = log.as_ref().is_some_and(|l| l.unsent.is_some());
            tokio::select! {
                biased;
                cmd = commands.recv(), if commands_open => match cmd {
                    Some(c) => self.command(c),
                    None => commands_open = false,
                },
                room = LogTap::room(&log), if full => {
                    match (room, log.as_mut().and_then(|l| l.unsent.take())) {
                        (Some(permit), Some(batch)) => {
                            permit.send(batch);
                        }
                        _ => log = LogTap::lost(log),
                    }
                }
                item = items.recv(), if !full => match item {
                    Some(item) => {
                        if let Some(tap) = &log {
                            tap.mark(&item);
                        }
                        self.item(&item, &progress);
                        if let Some(tap) = &mut log {
                            if !tap.push(item, items.is_empty()) {
                                log = LogTap::lost(log);
                            }
                        }
                    }
                    None => break,
                },
            }
        }
        if let Some(tap) = log {
            tap.finish().await;
        }
    }

    pub fn item(&mut self, item: &Item, progress: &Progress) {
        match item {
            Item::Change(c) => self.route(c),
            Item::Truncate(cs) => {
                for c in cs {
                    self.route(c)
                }
            }
            Item::Commit { end_lsn, info } => {
                self.stats
                    .last_commit_unix_micros
                    .store(info.commit_time.unix_micros(), Ordering::Relaxed);
                self.seal_checks();
                progress.confirm(*end_lsn)
            }
            // Logical messages (e.g. `walcast.broadcast()`), in stream order.
            Item::Message(m) => {
                if let Some(hook) = &self.on_message {
                    hook(m)
                }
            }
            Item::Begin(_) | Item::Stream(_) => {}
        }
    }

    pub fn command(&mut self, cmd: HubCommand) {
        match cmd {
            HubCommand::Subscribe {
                conn,
                channel,
                topic,
                bindings,
                hold,
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
                        hold: hold.then(Box::default),
                        retired: Vec::new(),
                    },
                );
                let _ = done.send(self.routed_lsn);
            }
            HubCommand::Replay {
                channel,
                changes,
                done,
            } => {
                let _ = done.send(self.replay(channel, &changes));
            }
            HubCommand::Release { channel, after } => self.release(channel, after),
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
                let old_classes: Vec<Arc<crate::route::rls::SqlClass>> = old
                    .iter()
                    .filter_map(|&s| self.subs.get(s).and_then(Option::as_ref))
                    .filter_map(|s| s.access.sql.clone())
                    .collect();
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
                    self.retire_classes(channel, old_classes);
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
            HubCommand::Published { relids, read_at } => self.unpublished(&relids, read_at),
            HubCommand::Census(reply) => {
                let _ = reply.send(self.census());
            }
            HubCommand::RlsFailed { class, message } => {
                let mut channels: Vec<ChannelId> = self
                    .subs
                    .iter()
                    .flatten()
                    .filter(|s| s.access.sql.as_ref().is_some_and(|c| c.id == class))
                    .map(|s| s.channel)
                    .collect();
                // Channels that left the class (a token refresh, a re-judge)
                // may still have its frames queued: they are closed too.
                channels.extend(
                    self.channels
                        .iter()
                        .filter(|(_, ch)| ch.retired.iter().any(|c| c.id == class))
                        .map(|(id, _)| *id),
                );
                channels.sort_unstable();
                channels.dedup();
                for ch in channels {
                    self.close_channel(ch, crate::route::rls::RLS_CHECK_FAILED, &message);
                }
            }
        }
    }

    /// Live subscriptions by table or wildcard pattern, most first.
    fn census(&self) -> Vec<(String, u64)> {
        let mut by: HashMap<String, u64> = HashMap::new();
        for s in self.subs.iter().flatten() {
            let name = match &s.slot {
                IndexSlot::Keyed { relid, .. } | IndexSlot::Scan { relid } => {
                    match self.tables.get(relid) {
                        Some(t) => format!("{}.{}", t.table.schema, t.table.name),
                        None => continue,
                    }
                }
                IndexSlot::Pattern { schema, table } => format!(
                    "{}.{}",
                    schema.as_deref().unwrap_or("*"),
                    table.as_deref().unwrap_or("*")
                ),
            };
            *by.entry(name).or_default() += 1;
        }
        let mut v: Vec<(String, u64)> = by.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }

    /// Closes the channels subscribed to tables that are no longer published.
    fn unpublished(&mut self, relids: &[RelId], read_at: Instant) {
        let gone: Vec<RelId> = self
            .tables
            .iter()
            .filter(|(id, ti)| ti.since < read_at && !relids.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for relid in gone {
            let Some(ti) = self.tables.get(&relid) else {
                continue;
            };
            let message = format!(
                "table {}.{} is no longer published (dropped, or removed from the publication): \
                 this channel is closed; rejoin once the table is back",
                ti.table.schema, ti.table.name
            );
            let channels = self.channels_of(relid);
            for ch in channels {
                self.close_channel(ch, TABLE_UNPUBLISHED, &message);
            }
            self.tables.remove(&relid);
        }
    }

    /// The channels with a subscription in a table's index.
    fn channels_of(&self, relid: RelId) -> Vec<ChannelId> {
        let mut out: Vec<ChannelId> = self
            .subs_of(relid)
            .into_iter()
            .filter_map(|sid| self.subs.get(sid)?.as_ref().map(|s| s.channel))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    fn subs_of(&self, relid: RelId) -> Vec<SubId> {
        let Some(ti) = self.tables.get(&relid) else {
            return Vec::new();
        };
        let mut ids: Vec<SubId> = ti.scan.iter().collect();
        for col in ti.keyed.values() {
            for v in col.values() {
                ids.extend(v.iter());
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Server-side close of a channel: a `system` error naming why, then
    /// `phx_close`, and its subscriptions leave the index.
    fn close_channel(&mut self, channel: ChannelId, code: &'static str, message: &str) {
        let Some(ch) = self.channels.get(&channel) else {
            return;
        };
        let payload = serde_json::json!({
            "extension": "system",
            "status": "error",
            "message": message,
            "channel": ch.topic.strip_prefix("realtime:").unwrap_or(&ch.topic),
            "code": code,
        })
        .to_string();
        tracing::info!(topic = %ch.topic, code, %message, "closing a channel");
        for (event, payload) in [("system", payload), ("phx_close", "{}".to_string())] {
            let out = Outbound::Push {
                topic: ch.topic.clone(),
                event,
                payload,
            };
            // Within the byte bound like every frame; a client too slow to take
            // it is closed as slow by the next change anyway.
            let _ = queue(&ch.tx, &ch.queued, out);
        }
        self.remove_channel(channel);
    }

    /// Why a binding can no longer be bound to `t` (a column it names is gone, or a
    /// value no longer parses as its column's new type).
    fn bind_problem(b: &Binding, t: &Table) -> Option<String> {
        if let Err(e) = b.filter.bind(t) {
            return Some(format!(
                "the table changed and the filter no longer applies: {e}"
            ));
        }
        if let Some(rule) = &b.access.rows {
            if rule.bind(t).is_err() {
                return Some(
                    "the table changed and the access rule no longer applies to it".to_string(),
                );
            }
        }
        if let Some(sel) = &b.options.select {
            if let Some(c) = sel.iter().find(|c| t.column_index(c).is_none()) {
                return Some(format!(
                    "the table changed: selected column {c:?} no longer exists"
                ));
            }
        }
        None
    }

    fn add_sub(&mut self, channel: ChannelId, mut b: Binding) -> SubId {
        // The stream is the authority on a table's shape: when the hub already
        // knows the table from the stream, bind to that (unless the join saw a
        // newer shape the stream has not described yet; then the next `Relation`
        // rebinds it).
        if let Target::Table(t) = &b.target {
            if let Some(ti) = self.tables.get(&t.id) {
                if !Arc::ptr_eq(&ti.table, t) && Self::bind_problem(&b, &ti.table).is_none() {
                    b.target = Target::Table(ti.table.clone());
                }
            }
        }
        let sub = compile(channel, &b);
        let (slot, moves) = (sub.slot.clone(), sub.moves);
        let hot = SubHot::of(&sub);
        let id = match self.free.pop() {
            Some(i) => {
                self.subs[i] = Some(sub);
                self.hot[i] = hot;
                i
            }
            None => {
                self.subs.push(Some(sub));
                self.hot.push(hot);
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
                if moves {
                    let col = ti.moves_keyed.entry(column).or_default();
                    for k in &keys {
                        col.entry(k.clone()).or_default().insert(id);
                    }
                }
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
            moves_keyed: HashMap::new(),
            scan: SubList::default(),
            since: Instant::now(),
        })
    }

    fn remove_sub(&mut self, id: SubId) {
        let Some(sub) = self.subs.get_mut(id).and_then(Option::take) else {
            return;
        };
        self.hot[id] = SubHot::FREE;
        self.free.push(id);
        self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
        match sub.slot {
            IndexSlot::Keyed {
                relid,
                column,
                keys,
            } => {
                if let Some(ti) = self.tables.get_mut(&relid) {
                    unindex(&mut ti.keyed, column, &keys, id);
                    if sub.moves {
                        unindex(&mut ti.moves_keyed, column, &keys, id);
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

    /// After `channel`'s subscriptions were replaced: the SQL classes it
    /// left are kept with it while frames of theirs may still wait for a
    /// verdict (a frame whose check failed is never dropped with its channel
    /// left open). One that failed already closes the channel now (its
    /// failure notice may have been handled before the replacement); one
    /// with nothing left to judge is forgotten.
    fn retire_classes(&mut self, channel: ChannelId, old: Vec<Arc<crate::route::rls::SqlClass>>) {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        let current: Vec<u64> = ch
            .subs
            .iter()
            .filter_map(|&s| self.subs.get(s).and_then(Option::as_ref))
            .filter_map(|s| s.access.sql.as_ref().map(|c| c.id))
            .collect();
        let mut retired = std::mem::take(&mut ch.retired);
        for c in old {
            if !retired.iter().any(|r| r.id == c.id) {
                retired.push(c);
            }
        }
        if let Some(why) = retired.iter().find_map(|c| c.failure()) {
            self.close_channel(channel, crate::route::rls::RLS_CHECK_FAILED, &why);
            return;
        }
        retired.retain(|c| !current.contains(&c.id) && !c.settled());
        if let Some(ch) = self.channels.get_mut(&channel) {
            ch.retired = retired;
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
        self.routed_lsn = change.txn.commit_lsn;
        self.stats.changes.fetch_add(1, Ordering::Relaxed);
        self.stats.changes_by_kind[kind_index(change.kind)].fetch_add(1, Ordering::Relaxed);
        if let Some(hook) = &self.on_change {
            hook(change);
        }
        let relid = change.table.id;
        if self.tables.contains_key(&relid) {
            self.rebind_if_changed(relid, &change.table);
        }
        self.match_subscriptions(change);
        if self.hits.is_empty() {
            return;
        }
        for conn in self.deliver(change, false) {
            self.close_slow(conn);
        }
    }

    /// Match: fills `self.hits` with the subscriptions that want `change` (and
    /// as which kind, with moves), through the table's index and the patterns.
    fn match_subscriptions(&mut self, change: &Change) {
        self.hits.clear();
        let kind = change.kind;
        let row = match kind {
            ChangeKind::Insert | ChangeKind::Update => change.new.as_ref(),
            ChangeKind::Delete => change.old.as_ref(),
            ChangeKind::Truncate => None,
        };
        let relid = change.table.id;
        let now = crate::route::auth::now_unix();
        if let Some(ti) = self.tables.get(&relid) {
            let subs = &self.subs;
            let hot = &self.hot;
            let hits = &mut self.hits;
            // Reads the sub's hot record; the full `Sub` only for a filter or moves.
            let mut consider = |sid: SubId| {
                let Some(h) = hot.get(sid) else { return };
                let delivered = if h.all_rows && !h.moves {
                    (h.expires_at > now && h.events.has(kind)).then_some(kind)
                } else {
                    match subs.get(sid) {
                        Some(Some(s)) => table_sub_kind(s, change, row, now),
                        _ => None,
                    }
                };
                if let Some(k) = delivered {
                    hits.push(Hit {
                        channel: h.channel,
                        kind: kind_index(k) as u8,
                        binding_id: h.binding_id,
                        sub: sid,
                        plain: h.plain,
                        moves: h.moves,
                    });
                }
            };
            let lookup = |r: &crate::decode::event::Row,
                          keyed: &HashMap<usize, HashMap<String, SubList>>,
                          consider: &mut dyn FnMut(SubId)| {
                for (&col, map) in keyed {
                    let Some(cell) = r.get(col) else { continue };
                    let Some(text) = cell.text() else { continue };
                    let Some(column) = ti.table.columns.get(col) else {
                        continue;
                    };
                    let Some(key) = canonical_key(&column.ty, text) else {
                        continue;
                    };
                    if let Some(v) = map.get(&key) {
                        for sid in v.iter() {
                            consider(sid);
                        }
                    }
                }
            };
            if let Some(r) = row {
                lookup(r, &ti.keyed, &mut consider);
            }
            if !ti.moves_keyed.is_empty() {
                match (kind, change.old.as_ref()) {
                    // A row leaving a keyed filter is found by its old value.
                    (ChangeKind::Update, Some(old)) => lookup(old, &ti.moves_keyed, &mut consider),
                    // A TRUNCATE reaches every keyed sub with moves.
                    (ChangeKind::Truncate, _) => {
                        for map in ti.moves_keyed.values() {
                            for v in map.values() {
                                for sid in v.iter() {
                                    consider(sid);
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            for sid in ti.scan.iter() {
                consider(sid);
            }
        }
        for sid in self.patterns.iter() {
            if let Some(Some(s)) = self.subs.get(sid) {
                if let Some(k) = pattern_sub_kind(s, change, now) {
                    self.hits.push(Hit {
                        channel: s.channel,
                        kind: kind_index(k) as u8,
                        binding_id: s.binding_id,
                        sub: sid,
                        plain: s.plain(),
                        moves: s.moves,
                    });
                }
            }
        }
    }

    /// Encode and deliver: one frame per channel (per payload variant within a
    /// channel), each distinct payload encoded once and shared. Returns the
    /// connections whose queue had no room.
    fn deliver(&mut self, change: &Arc<Change>, replay: bool) -> Vec<ConnId> {
        // One encoding per distinct (column mask, old image kept, kind) among the channels.
        let mut encodings: Vec<Encoding> = Vec::new();
        let mut defaults: [Option<Arc<str>>; 4] = Default::default();
        let mut slow = Vec::new();
        let mut queued = 0u64;
        let mut out = Delivery {
            encodings: &mut encodings,
            defaults: &mut defaults,
            change,
            render: self.render,
            delivered: change.kind,
            queued: &mut queued,
            slow: &mut slow,
            replay,
        };
        // A channel with one binding gets its one frame straight away, in the
        // order of the hits; only hits that may share a channel (or be found
        // twice: a moves sub by its old and its new row) are sorted into groups.
        // Sorting every hit cost a fan-out O(n log n) as soon as the hits came
        // out of channel order.
        let mut grouped = std::mem::take(&mut self.grouped);
        grouped.clear();
        for h in &self.hits {
            let Some(ch) = self.channels.get_mut(&h.channel) else {
                continue;
            };
            if h.moves || ch.subs.len() != 1 {
                grouped.push(*h);
                continue;
            }
            out.delivered = KINDS[usize::from(h.kind) & 3];
            send_group(&mut out, ch, std::slice::from_ref(h), &self.subs);
        }
        grouped.sort_unstable();
        grouped.dedup_by_key(|h| (h.channel, h.binding_id));
        let mut i = 0;
        while i < grouped.len() {
            let channel = grouped[i].channel;
            let hit_kind = grouped[i].kind;
            let start = i;
            while i < grouped.len() && grouped[i].channel == channel && grouped[i].kind == hit_kind
            {
                i += 1;
            }
            let Some(ch) = self.channels.get_mut(&channel) else {
                continue;
            };
            out.delivered = KINDS[usize::from(hit_kind) & 3];
            send_group(&mut out, ch, &grouped[start..i], &self.subs);
        }
        self.grouped = grouped;
        if queued > 0 {
            self.stats
                .frames_queued
                .fetch_add(queued, Ordering::Relaxed);
            if !replay {
                self.stats
                    .commit_to_send
                    .observe_since_unix_micros(change.txn.commit_time.unix_micros());
            }
        }
        slow
    }

    /// When the stream describes a table differently from what its subscriptions
    /// were bound to (a schema change), bind them again by column name. A binding
    /// that no longer binds (its filter's column was dropped, its value does not
    /// parse as the column's new type, a selected column is gone) has its channel
    /// closed with a `system` error naming why.
    fn rebind_if_changed(&mut self, relid: RelId, table: &Arc<Table>) {
        let Some(ti) = self.tables.get_mut(&relid) else {
            return;
        };
        if Arc::ptr_eq(&ti.table, table) {
            return;
        }
        let unchanged = same_shape(&ti.table, table);
        ti.table = table.clone();
        if unchanged {
            return;
        }
        // Re-index every sub of this table.
        let mut broken: Vec<(ChannelId, String)> = Vec::new();
        for sid in self.subs_of(relid) {
            let Some(Some(sub)) = self.subs.get(sid) else {
                continue;
            };
            let binding = Binding {
                id: sub.binding_id,
                events: sub.events,
                target: Target::Table(table.clone()),
                filter: sub.filter.clone(),
                access: sub.access.clone(),
                options: sub.options.clone(),
            };
            let channel = sub.channel;
            if let Some(why) = Self::bind_problem(&binding, table) {
                broken.push((channel, why));
                continue;
            }
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
        broken.sort();
        broken.dedup_by_key(|b| b.0);
        for (channel, why) in broken {
            self.close_channel(channel, TABLE_CHANGED, &why);
        }
    }
}

// Replay: a channel that resumes from the change log.
impl Hub {
    /// Queues `changes` to `channel` as its bindings judge them now, past its
    /// hold: how many were sent, or `None` when the channel is gone.
    fn replay(&mut self, channel: ChannelId, changes: &[Arc<Change>]) -> Option<Replayed> {
        let ch = self.channels.get(&channel)?;
        let mut out = Replayed::default();
        let subs = ch.subs.clone();
        let now = crate::route::auth::now_unix();
        for logged in changes {
            let change = match self.in_current_shape(logged) {
                Some(c) => c,
                None => logged.clone(),
            };
            let row = match change.kind {
                ChangeKind::Insert | ChangeKind::Update => change.new.as_ref(),
                ChangeKind::Delete => change.old.as_ref(),
                ChangeKind::Truncate => None,
            };
            self.hits.clear();
            for &sid in &subs {
                let Some(Some(s)) = self.subs.get(sid) else {
                    continue;
                };
                let kind = match &s.slot {
                    IndexSlot::Pattern { .. } => pattern_sub_kind(s, &change, now),
                    IndexSlot::Keyed { relid, .. } | IndexSlot::Scan { relid } => {
                        if *relid != change.table.id {
                            continue;
                        }
                        table_sub_kind(s, &change, row, now)
                    }
                };
                if let Some(k) = kind {
                    self.hits.push(Hit {
                        channel,
                        kind: kind_index(k) as u8,
                        binding_id: s.binding_id,
                        sub: sid,
                        plain: s.plain(),
                        moves: s.moves,
                    });
                }
            }
            if self.hits.is_empty() {
                continue;
            }
            let slow = self.deliver(&change, true);
            if !slow.is_empty() {
                for conn in slow {
                    self.close_slow(conn);
                }
                return None;
            }
            // The ticket its frames got (the class hands the same one out
            // again for the same change), or none: sent as it is.
            let ticket = self.hits.iter().find_map(|h| match self.subs.get(h.sub) {
                Some(Some(s)) => s.access.sql.as_ref().and_then(|c| c.ticket(&change)),
                _ => None,
            });
            match ticket {
                Some(t) => out.gated.push(t),
                None => out.sent += 1,
            }
        }
        self.seal_checks();
        self.channels.contains_key(&channel).then_some(out)
    }

    /// A logged change of a table whose shape changed since, in the shape the
    /// hub's subscriptions are bound to now: cells by column name (same name and
    /// type); a column added or retyped since is absent (named in
    /// `unchanged_toast`), one dropped since is left out. `None`: the shape is the
    /// same (or the hub does not index the table).
    fn in_current_shape(&self, change: &Arc<Change>) -> Option<Arc<Change>> {
        let ti = self.tables.get(&change.table.id)?;
        let now = &ti.table;
        if Arc::ptr_eq(now, &change.table) {
            return None;
        }
        if same_shape(now, &change.table) {
            return Some(Arc::new(Change {
                txn: change.txn,
                table: now.clone(),
                kind: change.kind,
                new: change.new.clone(),
                old: change.old.clone(),
            }));
        }
        let then = &change.table;
        let map: Vec<Option<usize>> = now
            .columns
            .iter()
            .map(|c| {
                then.columns
                    .iter()
                    .position(|o| o.name == c.name && o.ty.name == c.ty.name)
            })
            .collect();
        let remap = |r: &crate::decode::event::Row| -> crate::decode::event::Row {
            map.iter()
                .map(|m| match m.and_then(|i| r.get(i)) {
                    Some(cell) => cell.clone(),
                    None => crate::decode::event::Cell::Absent,
                })
                .collect()
        };
        Some(Arc::new(Change {
            txn: change.txn,
            table: now.clone(),
            kind: change.kind,
            new: change.new.as_ref().map(remap),
            old: change.old.as_ref().map(remap),
        }))
    }

    /// Ends `channel`'s hold: held frames after `after` are queued, in order.
    fn release(&mut self, channel: ChannelId, after: Lsn) {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        let Some(hold) = ch.hold.take() else {
            return;
        };
        let mut queued = 0;
        for (lsn, out) in hold.frames {
            if lsn <= after {
                continue;
            }
            match queue(&ch.tx, &ch.queued, out) {
                Ok(()) => queued += 1,
                Err(_) => {
                    let conn = ch.conn;
                    self.close_slow(conn);
                    return;
                }
            }
        }
        self.stats
            .frames_queued
            .fetch_add(queued, Ordering::Relaxed);
    }
}

/// Whether two descriptions of a table have the same columns (names and types)
/// and replica identity, so rows of one read correctly with the other.
fn same_shape(a: &Table, b: &Table) -> bool {
    a.columns.len() == b.columns.len()
        && a.replica_identity == b.replica_identity
        && a.columns
            .iter()
            .zip(&b.columns)
            .all(|(x, y)| x.name == y.name && x.ty.name == y.ty.name)
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
        if queue(&ch.tx, &ch.queued, out).is_err() {
            self.close_slow(conn);
        }
    }

    /// A connection whose queue had no room: closed as slow (or already gone),
    /// and forgotten.
    fn close_slow(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get(&conn) {
            c.handle.close_slow();
        }
        self.remove_conn(conn);
    }
}

/// A binding compiled against its table: filter and rule bound, column mask,
/// where it sits in the index.
fn compile(channel: ChannelId, b: &Binding) -> Sub {
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
            (b.access.columns.is_some() || b.options.select.is_some()).then(|| {
                t.columns
                    .iter()
                    .map(|c| {
                        b.access
                            .columns
                            .as_ref()
                            .is_none_or(|v| v.contains(&c.name))
                            && b.options
                                .select
                                .as_ref()
                                .is_none_or(|v| v.contains(&c.name))
                    })
                    .collect::<Arc<[bool]>>()
            }),
        ),
        Target::Pattern { .. } => (None, None),
    };
    let moves = b.options.moves
        && b.access.sql.is_none()
        && matches!(&b.target, Target::Table(t) if t.replica_identity == crate::decode::pgoutput::ReplicaIdentity::Full);
    Sub {
        channel,
        binding_id: b.id,
        events: b.events,
        filter: b.filter.clone(),
        access: b.access.clone(),
        bound,
        rule,
        mask,
        options: b.options.clone(),
        moves,
        slot,
    }
}

/// Deliver: one channel's frame(s) for a group of its hits of one delivered kind
/// (`out.delivered`). Bindings of one channel whose payloads differ (another
/// `select`, an old image hidden for one only) get a frame each; nearly always
/// one. Plain subs all get the default payload, without reading their `Sub`.
#[inline]
fn send_group(out: &mut Delivery, ch: &mut ChannelState, group: &[Hit], subs: &[Option<Sub>]) {
    let (change, delivered) = (out.change, out.delivered);
    let (key, uniform, ticket) = if group.iter().all(|h| h.plain) {
        ((None, false), true, None)
    } else {
        let Some(Some(first)) = subs.get(group[0].sub) else {
            return;
        };
        let key = encoding_key(first, change, delivered);
        // RLS mode's SQL path: the frame waits for its class's verdict.
        let ticket = first.access.sql.as_ref().and_then(|c| c.ticket(change));
        let uniform = group.len() == 1
            || group[1..].iter().all(|h| match subs.get(h.sub) {
                Some(Some(s)) => same_encoding(&encoding_key(s, change, delivered), &key),
                _ => true,
            });
        (key, uniform, ticket)
    };
    if uniform {
        let ids = match group {
            [one] => BindingIds::One(one.binding_id),
            many => BindingIds::Many(many.iter().map(|h| h.binding_id).collect()),
        };
        out.send(ch, &key, ids, ticket.as_ref());
        return;
    }
    let mut keyed: Vec<(EncodingKey, Vec<u32>)> = Vec::new();
    for h in group {
        let Some(Some(s)) = subs.get(h.sub) else {
            continue;
        };
        let k = encoding_key(s, change, delivered);
        match keyed.iter_mut().find(|(x, _)| same_encoding(x, &k)) {
            Some((_, ids)) => ids.push(h.binding_id),
            None => keyed.push((k, vec![h.binding_id])),
        }
    }
    for (k, ids) in keyed {
        let ids = match &ids[..] {
            [one] => BindingIds::One(*one),
            many => BindingIds::Many(many.into()),
        };
        out.send(ch, &k, ids, ticket.as_ref());
    }
}

/// Takes sub `id` out of a keyed index under `keys` of `column`, dropping
/// emptied entries.
fn unindex(
    keyed: &mut HashMap<usize, HashMap<String, SubList>>,
    column: usize,
    keys: &[String],
    id: SubId,
) {
    let Some(col) = keyed.get_mut(&column) else {
        return;
    };
    for k in keys {
        if let Some(v) = col.get_mut(k) {
            v.remove(id);
            if v.is_empty() {
                col.remove(k);
            }
        }
    }
    if col.is_empty() {
        keyed.remove(&column);
    }
}

/// A topic without its `realtime:` prefix, as `system` payloads name channels.
fn channel_name(topic: &str) -> &str {
    topic.strip_prefix("realtime:").unwrap_or(topic)
}

/// The kind a sub of `change`'s table receives for it (its own, or a move's),
/// if any; `row` is the image the change is judged on.
#[inline]
fn table_sub_kind(
    s: &Sub,
    change: &Change,
    row: Option<&crate::decode::event::Row>,
    now: i64,
) -> Option<ChangeKind> {
    if s.access.expires_at.is_some_and(|e| e <= now) {
        return None;
    }
    if s.moves {
        return moved_kind(s, change);
    }
    let kind = change.kind;
    let ok = s.events.has(kind)
        && match (&s.bound, row) {
            (Some(f), Some(r)) => f.matches(r),
            // TRUNCATE: only to subscribers who may see every row (a row rule or
            // an RLS check that judges rows: no).
            (Some(f), None) => f.is_empty() && s.access.sql.is_none(),
            // A filter that no longer binds to the table matches nothing.
            (None, _) => false,
        };
    ok.then_some(kind)
}

/// The kind a wildcard sub receives for `change`, if its pattern covers the table.
#[inline]
fn pattern_sub_kind(s: &Sub, change: &Change, now: i64) -> Option<ChangeKind> {
    let IndexSlot::Pattern { schema, table } = &s.slot else {
        return None;
    };
    let schema_ok = schema.as_deref().is_none_or(|x| x == change.table.schema);
    let table_ok = table.as_deref().is_none_or(|x| x == change.table.name);
    let live = s.access.expires_at.is_none_or(|e| e > now);
    (schema_ok && table_ok && s.events.has(change.kind) && live).then_some(change.kind)
}

/// The kind a sub with moves on receives for `change`, if any (see
/// [`BindingOptions::moves`]): judged on both images against filter and rule.
fn moved_kind(s: &Sub, change: &Change) -> Option<ChangeKind> {
    let matches = |r: Option<&crate::decode::event::Row>| match (&s.bound, r) {
        (Some(f), Some(r)) => f.matches(r),
        _ => false,
    };
    let k = match change.kind {
        ChangeKind::Update => match (matches(change.old.as_ref()), matches(change.new.as_ref())) {
            (true, true) => ChangeKind::Update,
            (false, true) => ChangeKind::Insert,
            (true, false) => ChangeKind::Delete,
            (false, false) => return None,
        },
        ChangeKind::Insert => {
            if !matches(change.new.as_ref()) {
                return None;
            }
            ChangeKind::Insert
        }
        ChangeKind::Delete => {
            if !matches(change.old.as_ref()) {
                return None;
            }
            ChangeKind::Delete
        }
        // Every row left: filtered bindings hear of it too.
        ChangeKind::Truncate => {
            s.bound.as_ref()?;
            ChangeKind::Truncate
        }
    };
    s.events.has(k).then_some(k)
}

/// What decides a sub's payload for a change delivered as `kind`: its column
/// mask, and whether the old image is hidden (an UPDATE that brought the row
/// into the sub's rule: the old image is not the subscriber's to see. Under
/// REPLICA IDENTITY FULL pgoutput flags every column as key, so "key only"
/// cannot be trusted here.)
fn encoding_key(sub: &Sub, change: &Change, kind: ChangeKind) -> EncodingKey {
    let hide_old = kind == ChangeKind::Update
        && match (&sub.rule, change.old.as_ref()) {
            (Some(rule), Some(old)) => !rule.matches(old),
            _ => false,
        };
    (sub.mask.clone(), hide_old)
}

type EncodingKey = (Option<Arc<[bool]>>, bool);

fn same_encoding(a: &EncodingKey, b: &EncodingKey) -> bool {
    a.1 == b.1
        && match (&a.0, &b.0) {
            (None, None) => true,
            (Some(x), Some(y)) => Arc::ptr_eq(x, y) || x == y,
            _ => false,
        }
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

/// Upper bounds (seconds) of the commit → send latency buckets: 0.5 ms to 10 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram of atomics, cheap to observe on the hot path and exported at
/// scrape time with the [`LATENCY_BUCKETS`] bounds.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per-bucket (not cumulative) counts; the last slot is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    /// Records the time from `unix_micros` (a commit time) until now; a commit time
    /// in the future (clock skew between hosts) counts as zero.
    pub fn observe_since_unix_micros(&self, unix_micros: i64) {
        let micros = unix_now_micros().saturating_sub(unix_micros).max(0) as u64;
        self.observe_micros(micros);
    }

    pub fn observe_micros(&self, micros: u64) {
        let secs = micros as f64 / 1e6;
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Per-bucket (not cumulative) counts, the last one `+Inf`, and the sum in µs.
    pub fn snapshot(&self) -> ([u64; LATENCY_BUCKETS.len() + 1], u64) {
        let mut out = [0u64; LATENCY_BUCKETS.len() + 1];
        for (o, b) in out.iter_mut().zip(&self.buckets) {
            *o = b.load(Ordering::Relaxed);
        }
        (out, self.sum_micros.load(Ordering::Relaxed))
    }
}

/// Microseconds since the Unix epoch.
pub fn unix_now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
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

    fn subscribe_bindings(
        hub: &mut Hub,
        conn: ConnId,
        channel: ChannelId,
        topic: &str,
        bindings: Vec<Binding>,
    ) -> OutRx {
        let (tx, rx) = crate::route::queue::channel(8);
        let (done, _) = oneshot::channel();
        hub.command(HubCommand::Subscribe {
            conn: ConnHandle::new(conn, tx, usize::MAX),
            channel,
            topic: Arc::from(topic),
            bindings,
            hold: false,
            done,
        });
        rx
    }

    use crate::decode::event::{Cell, TxnInfo};
    use crate::decode::pgoutput::{PgTimestamp, ReplicaIdentity, Xid};
    use crate::decode::relation::Column;
    use crate::decode::value::PgType;
    use crate::lsn::Lsn;

    fn table(id: u32, cols: &[(&str, &str)]) -> Arc<Table> {
        Arc::new(Table {
            id: RelId(id),
            schema: "public".into(),
            name: "orders".into(),
            replica_identity: ReplicaIdentity::Full,
            json: Default::default(),
            columns: cols
                .iter()
                .map(|(n, ty)| Column {
                    name: n.to_string(),
                    ty: Arc::new(PgType::new(0, ty, PgType::kind_for_base_name(ty))),
                    key: *n == "id",
                })
                .collect(),
        })
    }

    fn cells(v: &[&str]) -> crate::decode::event::Row {
        v.iter()
            .map(|t| Cell::Text(bytes::Bytes::copy_from_slice(t.as_bytes())))
            .collect()
    }

    fn change(
        t: &Arc<Table>,
        kind: ChangeKind,
        new: Option<&[&str]>,
        old: Option<&[&str]>,
    ) -> Arc<Change> {
        Arc::new(Change {
            txn: TxnInfo {
                commit_lsn: Lsn(1),
                commit_time: PgTimestamp(0),
                xid: Xid(1),
            },
            table: t.clone(),
            kind,
            new: new.map(cells),
            old: old.map(cells),
        })
    }

    fn subscribe(
        hub: &mut Hub,
        t: &Arc<Table>,
        channel: u64,
        filter: &str,
        options: BindingOptions,
    ) -> OutRx {
        let (tx, rx) = crate::route::queue::channel(64);
        let (done, _) = oneshot::channel();
        hub.command(HubCommand::Subscribe {
            conn: ConnHandle::new(channel, tx, usize::MAX),
            channel,
            topic: Arc::from(format!("realtime:c{channel}")),
            bindings: vec![Binding {
                id: channel as u32,
                events: EventMask::ALL,
                target: Target::Table(t.clone()),
                filter: Filter::parse(filter).unwrap(),
                access: BindingAccess::default(),
                options,
            }],
            hold: false,
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
            options: BindingOptions::default(),
        }
    }

    fn system(rx: &mut OutRx) -> Option<(String, serde_json::Value)> {
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
        let mut pg = subscribe_bindings(&mut hub, 1, 10, "realtime:room", vec![any_table()]);
        let mut chat = subscribe_bindings(&mut hub, 2, 20, "realtime:chat", vec![]);
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
        let mut late = subscribe_bindings(&mut hub, 3, 30, "realtime:late", vec![any_table()]);
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
        let mut later = subscribe_bindings(&mut hub, 4, 40, "realtime:later", vec![any_table()]);
        hub.command(HubCommand::Joined {
            channel: 40,
            replication_ready: None,
        });
        assert!(system(&mut later).is_none());
    }

    #[test]
    fn replication_ready_is_answered_when_ready_or_after_the_deadline() {
        let mut hub = Hub::new(RenderOptions::default(), Arc::default());
        let mut a = subscribe_bindings(&mut hub, 1, 10, "realtime:a", vec![]);
        let mut b = subscribe_bindings(&mut hub, 2, 20, "realtime:b", vec![]);
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

    /// The `data` of each change frame queued, or the event of each push.
    fn drain(rx: &mut OutRx) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        while let Ok(o) = rx.try_recv() {
            out.push(match o {
                Outbound::Change { data, .. } => serde_json::from_str(&data).unwrap(),
                Outbound::Push { event, payload, .. } => {
                    serde_json::json!({"push": event, "payload": serde_json::from_str::<serde_json::Value>(&payload).unwrap()})
                }
                other => panic!("{other:?}"),
            });
        }
        out
    }

    fn at(c: Arc<Change>, lsn: u64) -> Arc<Change> {
        let mut txn = c.txn;
        txn.commit_lsn = Lsn(lsn);
        Arc::new(Change {
            txn,
            table: c.table.clone(),
            kind: c.kind,
            new: c.new.clone(),
            old: c.old.clone(),
        })
    }

    #[test]
    fn a_held_channel_gets_its_replay_then_only_the_live_frames_after_it() {
        let t = table(1, &[("id", "int4"), ("status", "text")]);
        let mut hub = Hub::new(RenderOptions::default(), Arc::default());
        let ins = |id: &str, status: &str, lsn| {
            at(
                change(&t, ChangeKind::Insert, Some(&[id, status]), None),
                lsn,
            )
        };
        hub.route(&ins("1", "new", 10));
        let (tx, mut rx) = crate::route::queue::channel(64);
        let (done, mut routed) = oneshot::channel();
        hub.command(HubCommand::Subscribe {
            conn: ConnHandle::new(7, tx, usize::MAX),
            channel: 7,
            topic: Arc::from("realtime:r"),
            bindings: vec![Binding {
                id: 1,
                events: EventMask::ALL,
                target: Target::Table(t.clone()),
                filter: Filter::parse("status=eq.new").unwrap(),
                access: BindingAccess::default(),
                options: BindingOptions::default(),
            }],
            hold: true,
            done,
        });
        assert_eq!(routed.try_recv().unwrap(), Lsn(10));
        // Live while the replay runs: held back (the rest of 20, and 30).
        hub.route(&ins("2", "new", 20));
        hub.route(&ins("3", "new", 30));
        assert!(rx.try_recv().is_err());
        // The replay, judged by the binding's filter: 20's other row is not "new".
        let (done, mut ok) = oneshot::channel();
        hub.command(HubCommand::Replay {
            channel: 7,
            changes: vec![ins("0", "new", 5), ins("9", "old", 20), ins("2", "new", 20)],
            done,
        });
        assert_eq!(ok.try_recv().unwrap().map(|r| r.sent), Some(2));
        let ids = |rx: &mut OutRx| -> Vec<i64> {
            drain(rx)
                .iter()
                .map(|d| d["record"]["id"].as_i64().unwrap())
                .collect()
        };
        assert_eq!(ids(&mut rx), [0, 2]);
        // Released after 20: the held 20 was replayed, 30 was not.
        hub.command(HubCommand::Release {
            channel: 7,
            after: Lsn(20),
        });
        assert_eq!(ids(&mut rx), [3]);
        hub.route(&ins("4", "new", 40));
        assert_eq!(ids(&mut rx), [4]);
        // A replay for a channel that is gone says so.
        hub.command(HubCommand::Unsubscribe { channel: 7 });
        let (done, mut ok) = oneshot::channel();
        hub.command(HubCommand::Replay {
            channel: 7,
            changes: vec![ins("5", "new", 50)],
            done,
        });
        assert!(ok.try_recv().unwrap().is_none());
    }

    #[test]
    fn a_replayed_change_of_an_older_shape_is_read_by_column_name() {
        let now = table(1, &[("id", "int4"), ("note", "text"), ("status", "text")]);
        let then = table(1, &[("id", "int4"), ("status", "text")]);
        let mut hub = Hub::new(RenderOptions::default(), Arc::default());
        let mut rx = subscribe(
            &mut hub,
            &now,
            1,
            "status=eq.new",
            BindingOptions::default(),
        );
        let (done, _ok) = oneshot::channel();
        hub.command(HubCommand::Replay {
            channel: 1,
            changes: vec![change(&then, ChangeKind::Insert, Some(&["1", "new"]), None)],
            done,
        });
        let d = &drain(&mut rx)[0];
        assert_eq!(d["record"], serde_json::json!({"id": 1, "status": "new"}));
        assert_eq!(d["unchanged_toast"], serde_json::json!(["note"]));
    }

    #[test]
    fn select_moves_and_truncate_shape_the_payloads() {
        let t = table(1, &[("id", "int4"), ("status", "text"), ("total", "int4")]);
        let mut hub = Hub::new(RenderOptions::default(), Arc::default());
        let select = BindingOptions {
            select: Some(Arc::new(vec!["id".into(), "status".into()])),
            moves: false,
        };
        let moves = BindingOptions {
            select: None,
            moves: true,
        };
        let mut sel = subscribe(&mut hub, &t, 1, "status=eq.new", select);
        let mut mov = subscribe(&mut hub, &t, 2, "status=eq.new", moves.clone());
        let mut plain = subscribe(&mut hub, &t, 3, "status=eq.new", BindingOptions::default());
        let mut keyed_or = subscribe(&mut hub, &t, 4, "or=(status.eq.new,status.eq.x)", moves);
        hub.route(&change(
            &t,
            ChangeKind::Insert,
            Some(&["1", "new", "5"]),
            None,
        ));
        let d = &drain(&mut sel)[0];
        assert_eq!(
            d["columns"],
            serde_json::json!([{"name": "id", "type": "int4"}, {"name": "status", "type": "text"}])
        );
        assert_eq!(d["record"], serde_json::json!({"id": 1, "status": "new"}));
        // Out of the filter: a DELETE of the old row with moves, nothing without.
        hub.route(&change(
            &t,
            ChangeKind::Update,
            Some(&["1", "baked", "5"]),
            Some(&["1", "new", "5"]),
        ));
        let d = drain(&mut mov);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d[1]["type"], "DELETE");
        assert_eq!(d[1]["old_record"]["status"], "new");
        assert!(d[1].get("record").is_none());
        assert_eq!(drain(&mut keyed_or)[1]["type"], "DELETE");
        assert_eq!(drain(&mut plain).len(), 1);
        assert!(drain(&mut sel).is_empty());
        // Back in: an INSERT of the new row.
        hub.route(&change(
            &t,
            ChangeKind::Update,
            Some(&["1", "new", "6"]),
            Some(&["1", "baked", "5"]),
        ));
        let d = drain(&mut mov);
        assert_eq!(d[0]["type"], "INSERT");
        assert!(d[0].get("old_record").is_none());
        assert_eq!(drain(&mut plain)[0]["type"], "UPDATE");
        assert_eq!(drain(&mut keyed_or)[0]["type"], "INSERT");
        // TRUNCATE reaches filtered bindings with moves only.
        hub.route(&change(&t, ChangeKind::Truncate, None, None));
        assert_eq!(drain(&mut mov)[0]["type"], "TRUNCATE");
        assert_eq!(drain(&mut keyed_or)[0]["type"], "TRUNCATE");
        assert!(drain(&mut plain).is_empty());
    }

    #[test]
    fn a_reused_sub_slot_judges_and_shapes_by_its_new_sub() {
        let t = table(1, &[("id", "int4"), ("status", "text"), ("total", "int4")]);
        let mut hub = Hub::new(RenderOptions::default(), Arc::default());
        let moves = BindingOptions {
            select: None,
            moves: true,
        };
        let mut plain = subscribe(&mut hub, &t, 1, "status=eq.new", BindingOptions::default());
        let _gone = subscribe(&mut hub, &t, 2, "status=eq.new", moves);
        hub.command(HubCommand::Unsubscribe { channel: 2 });
        assert!(hub.tables[&t.id].moves_keyed.is_empty());
        // The freed slot goes to a whole-table binding with `select`, then one to
        // a whole-table binding whose token has expired.
        let whole = |id: u32, options: BindingOptions, expires_at: Option<i64>| Binding {
            id,
            events: EventMask::ALL,
            target: Target::Table(t.clone()),
            filter: Filter::default(),
            access: BindingAccess {
                expires_at,
                ..Default::default()
            },
            options,
        };
        let select = BindingOptions {
            select: Some(Arc::new(vec!["id".into()])),
            moves: false,
        };
        let mut sel =
            subscribe_bindings(&mut hub, 3, 3, "realtime:c3", vec![whole(3, select, None)]);
        let mut expired = subscribe_bindings(
            &mut hub,
            4,
            4,
            "realtime:c4",
            vec![whole(4, BindingOptions::default(), Some(1))],
        );
        // The row leaves `status=eq.new`: no DELETE (the moves sub left), the
        // whole-table sub gets its selected columns, the expired one nothing.
        hub.route(&change(
            &t,
            ChangeKind::Update,
            Some(&["1", "baked", "5"]),
            Some(&["1", "new", "5"]),
        ));
        assert!(drain(&mut plain).is_empty());
        let d = drain(&mut sel);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0]["type"], "UPDATE");
        assert_eq!(d[0]["record"], serde_json::json!({"id": 1}));
        assert!(drain(&mut expired).is_empty());
    }

    #[test]
    fn a_dropped_filter_column_closes_only_its_channel() {
        let t = table(1, &[("id", "int4"), ("status", "text"), ("total", "int4")]);
        let mut hub = Hub::new(RenderOptions::default(), Arc::default());
        let mut a = subscribe(&mut hub, &t, 1, "total=gt.3", BindingOptions::default());
        let mut b = subscribe(&mut hub, &t, 2, "status=eq.new", BindingOptions::default());
        let t2 = table(1, &[("id", "int4"), ("status", "text")]);
        hub.route(&change(&t2, ChangeKind::Insert, Some(&["1", "new"]), None));
        let d = drain(&mut a);
        assert_eq!(d[0]["push"], "system");
        assert_eq!(d[0]["payload"]["code"], TABLE_CHANGED);
        assert!(d[0]["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("\"total\""));
        assert_eq!(d[1]["push"], "phx_close");
        assert_eq!(drain(&mut b)[0]["record"]["id"], 1);
        assert_eq!(hub.subscription_count(), 1);
        // A dropped table: the rest is closed too.
        hub.command(HubCommand::Published {
            relids: vec![RelId(2)],
            read_at: Instant::now(),
        });
        assert_eq!(drain(&mut b)[0]["payload"]["code"], TABLE_UNPUBLISHED);
        assert_eq!(hub.subscription_count(), 0);
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

    /// The hub routes before it logs: a log with no room holds the hub's intake
    /// (commands still run), and once it has room gets every item, in order,
    /// the rest when the stream ends.
    #[test]
    fn the_log_gets_every_item_after_routing_and_a_full_log_holds_only_intake() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let t = table(1, &[("id", "int4")]);
            let stats = Arc::new(HubStats::default());
            let hub = Hub::new(RenderOptions::default(), stats.clone());
            let (items_tx, items_rx) = mpsc::channel(1024);
            let (cmd_tx, cmd_rx) = mpsc::channel(8);
            let (log_tx, mut log_rx) = mpsc::channel(1);
            let routed = Arc::new(AtomicU64::new(0));
            let total = 600u64;
            for i in 1..=total {
                let c = Change {
                    txn: TxnInfo {
                        commit_lsn: Lsn(i),
                        commit_time: PgTimestamp(0),
                        xid: Xid(1),
                    },
                    table: t.clone(),
                    kind: ChangeKind::Insert,
                    new: Some(cells(&["1"])),
                    old: None,
                };
                items_tx.send(Item::Change(Arc::new(c))).await.unwrap();
            }
            let task = tokio::spawn(hub.run(
                items_rx,
                cmd_rx,
                Arc::new(Progress::default()),
                Some(LogTap::new(log_tx, routed.clone())),
            ));
            // One batch in the log's channel, one waiting: the hub routed both
            // and takes no more items, but answers commands.
            let routed_first = 2 * LOG_BATCH as u64;
            for _ in 0..1000 {
                if stats.changes.load(Ordering::Relaxed) >= routed_first {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let (reply, census) = oneshot::channel();
            cmd_tx.send(HubCommand::Census(reply)).await.unwrap();
            census.await.unwrap();
            assert_eq!(stats.changes.load(Ordering::Relaxed), routed_first);
            assert_eq!(routed.load(Ordering::Relaxed), routed_first);
            assert_eq!(
                items_tx.max_capacity() - items_tx.capacity(),
                (total - routed_first) as usize
            );
            // Once the log has room, everything reaches it in order; the rest
            // when the stream ends.
            drop(items_tx);
            let mut logged = Vec::new();
            while let Some(batch) = log_rx.recv().await {
                assert!(!batch.is_empty() && batch.len() <= LOG_BATCH);
                for item in batch {
                    let Item::Change(c) = item else {
                        panic!("{item:?}")
                    };
                    logged.push(c.txn.commit_lsn.0);
                }
            }
            assert_eq!(logged, (1..=total).collect::<Vec<_>>());
            assert_eq!(stats.changes.load(Ordering::Relaxed), total);
            task.await.unwrap();
        });
    }

    /// At an idle moment the tap hands over what it has up to the last whole
    /// transaction: an open one's items go with its commit.
    #[test]
    fn the_log_tap_hands_a_transaction_over_with_its_commit() {
        let t = table(1, &[("id", "int4")]);
        let (tx, mut rx) = mpsc::channel(8);
        let mut tap = LogTap::new(tx, Arc::default());
        let c = change(&t, ChangeKind::Insert, Some(&["1"]), None);
        let info = c.txn;
        assert!(tap.push(Item::Begin(info), true));
        assert!(tap.push(Item::Change(c), true));
        assert!(rx.try_recv().is_err(), "held inside the transaction");
        assert!(tap.push(
            Item::Commit {
                info,
                end_lsn: Lsn(9)
            },
            true
        ));
        assert_eq!(rx.try_recv().unwrap().len(), 3);
        // Not idle: held until the batch fills.
        for _ in 0..LOG_BATCH - 1 {
            assert!(tap.push(Item::Begin(info), false));
        }
        assert!(rx.try_recv().is_err());
        assert!(tap.push(Item::Begin(info), false));
        assert_eq!(rx.try_recv().unwrap().len(), LOG_BATCH);
        // A commit followed by the start of the next transaction when the
        // input runs dry: the whole transaction goes, the open one waits.
        let commit = || Item::Commit {
            info,
            end_lsn: Lsn(9),
        };
        assert!(tap.push(commit(), false));
        assert!(tap.push(Item::Begin(info), false));
        let c = change(&t, ChangeKind::Insert, Some(&["2"]), None);
        assert!(tap.push(Item::Change(c.clone()), true));
        let sent = rx.try_recv().unwrap();
        assert_eq!(sent.len(), 1);
        assert!(matches!(sent[0], Item::Commit { .. }));
        assert!(rx.try_recv().is_err());
        assert!(tap.push(commit(), true));
        assert_eq!(rx.try_recv().unwrap().len(), 3, "begin, change, commit");
        // The mark: set by transactional items, reset by a new stream, and
        // out of reach once the stage is gone.
        tap.mark(&Item::Change(c.clone()));
        assert_eq!(tap.routed.load(Ordering::Relaxed), c.txn.commit_lsn.0);
        tap.mark(&Item::Stream(crate::decode::event::StreamStart {
            system_id: "s".into(),
            slot: "s".into(),
            slot_confirmed: Lsn(5),
        }));
        assert_eq!(tap.routed.load(Ordering::Relaxed), 0);
        let routed = tap.routed.clone();
        drop(rx);
        assert!(!tap.push(commit(), true), "the stage is gone");
        assert!(LogTap::lost(Some(tap)).is_none());
        assert_eq!(routed.load(Ordering::Relaxed), u64::MAX);
    }
}
