//! A connection's outbound queue: what the hub, broadcast and the session hand
//! to a connection's writer, bounded in frames and in bytes, and the one way a
//! connection that cannot keep up is closed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Close code sent to a client whose outbound queue overflowed.
pub const CLOSE_SLOW_CLIENT: u16 = 4008;

pub type ConnId = u64;

/// What a client closed as slow is told (the close frame's reason and each
/// channel's `system` message).
pub const SLOW_CLIENT_REASON: &str =
    "slow client: walcast's outbound queue for this connection is full; reconnect and re-read state";

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
    /// A server push to one channel (`system`, `phx_close`), framed by the writer
    /// for the connection's protocol version, without a join ref.
    Push {
        topic: Arc<str>,
        event: &'static str,
        payload: String,
    },
    /// A `postgres_changes` frame waiting for RLS mode's SQL verdict: the writer
    /// waits for it, then sends it (or not).
    Gated(Box<Gated>),
}

/// A change frame whose row is being judged by a policy check.
#[derive(Debug)]
pub struct Gated {
    pub topic: Arc<str>,
    pub ids: BindingIds,
    pub data: Arc<str>,
    /// The same change without the old image's values (an UPDATE whose old row
    /// the subscriber may not see).
    pub old_hidden: Option<Arc<str>>,
    pub ticket: crate::route::rls::Ticket,
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
    #[inline]
    fn reserve(&self, n: usize) -> bool {
        let before = self.used.fetch_add(n, Ordering::Relaxed);
        if before > 0 && before + n > self.limit {
            self.used.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Gives back the bytes of a frame taken off the queue.
    #[inline]
    pub fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// The bound.
    pub fn limit(&self) -> usize {
        self.limit
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
#[inline]
pub(crate) fn queue(
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
    #[inline]
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
                Outbound::Push { topic, payload, .. } => topic.len() + payload.len(),
                Outbound::Gated(g) => {
                    g.topic.len()
                        + 12 * g.ids.len()
                        + g.data.len()
                        + g.old_hidden.as_ref().map_or(0, |d| d.len())
                }
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

    /// Queues a frame; a full queue closes the connection as a slow client
    /// ([`ConnHandle::close_slow`]). False when the frame was not queued.
    pub fn queue_or_close(&self, out: Outbound) -> bool {
        match self.try_queue(out) {
            Ok(()) => true,
            Err(QueueError::Full) => {
                self.close_slow();
                false
            }
            Err(QueueError::Closed) => false,
        }
    }

    /// The one way a connection is closed for falling behind, whatever frame did
    /// not fit (a change, a broadcast, a reply): 4008 with [`SLOW_CLIENT_REASON`].
    /// Logged here once per connection; counted once, by reason, when its writer
    /// sends the close (`walcast_clients_dropped_total{reason="slow_client"}`).
    pub fn close_slow(&self) {
        if self.kill.is_cancelled() || self.tx.is_closed() {
            return;
        }
        tracing::warn!(
            conn = self.id,
            "closing a client that fell behind: its outbound queue is full"
        );
        self.close(CLOSE_SLOW_CLIENT, SLOW_CLIENT_REASON);
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
