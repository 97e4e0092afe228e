//! A connection's outbound queue: what the hub, broadcast and the session hand
//! to a connection's writer, bounded in frames and in bytes, and the one way a
//! connection that cannot keep up is closed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
    pub tx: OutTx,
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
pub(crate) fn queue(tx: &OutTx, queued: &QueuedBytes, out: Outbound) -> Result<(), QueueError> {
    let n = out.queued_size();
    if !queued.reserve(n) {
        return Err(QueueError::Full);
    }
    tx.try_send(out).inspect_err(|_| queued.release(n))
}

/// A connection's outbound queue with room for `cap` frames: its sender (the
/// hub, broadcast, the session hold clones) and its one receiver (the writer).
///
/// Why not tokio's `mpsc`: it allocates its first block of 32 slots (~1.8 KB
/// with a 56-byte [`Outbound`]) and ~0.5 KB of state up front, per connection,
/// for a queue that is empty nearly all of an idle connection's life. This one
/// is a `VecDeque` that grows with use and is given back once a burst has been
/// written. The writer takes everything queued in one step (swapping deques
/// under the lock), so senders and the writer meet on the lock once per batch,
/// not once per frame, and it is woken only when the queue goes from empty to
/// not empty.
pub fn channel(cap: usize) -> (OutTx, OutRx) {
    let chan = Arc::new(Chan {
        items: Mutex::new(VecDeque::new()),
        len: AtomicUsize::new(0),
        ready: tokio::sync::Notify::new(),
        cap: cap.max(1),
        senders: AtomicUsize::new(1),
        receiver_gone: AtomicBool::new(false),
    });
    (
        OutTx(chan.clone()),
        OutRx {
            chan,
            taken: VecDeque::new(),
        },
    )
}

/// Slots an emptied deque keeps; past this it gives its memory back.
const KEPT_SLOTS: usize = 8;

struct Chan {
    items: Mutex<VecDeque<Outbound>>,
    /// Frames queued and not yet handed to the writer: those in `items` plus
    /// those the writer has taken in its batch but not returned yet. Changed
    /// under the lock when it grows, so it never counts a frame twice or not at
    /// all; it bounds the queue in frames.
    len: AtomicUsize,
    /// Wakes the writer: signalled when the queue becomes non-empty and when the
    /// last sender goes (a stored permit covers a writer not waiting yet).
    ready: tokio::sync::Notify,
    cap: usize,
    senders: AtomicUsize,
    receiver_gone: AtomicBool,
}

impl std::fmt::Debug for Chan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chan")
            .field("cap", &self.cap)
            .field("len", &self.len.load(Ordering::Relaxed))
            .field("senders", &self.senders.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Chan {
    fn items(&self) -> std::sync::MutexGuard<'_, VecDeque<Outbound>> {
        // A panic while holding this lock leaves a consistent deque.
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending side of [`channel`]; clones count as senders.
#[derive(Debug)]
pub struct OutTx(Arc<Chan>);

/// The receiving side of [`channel`] (the connection's writer).
#[derive(Debug)]
pub struct OutRx {
    chan: Arc<Chan>,
    /// The batch taken from the queue and not yet returned by `try_recv`.
    taken: VecDeque<Outbound>,
}

/// Why [`OutRx::try_recv`] returned nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryRecvError {
    /// Nothing queued now.
    Empty,
    /// Nothing queued and every sender is gone.
    Disconnected,
}

impl Clone for OutTx {
    fn clone(&self) -> Self {
        self.0.senders.fetch_add(1, Ordering::Relaxed);
        OutTx(self.0.clone())
    }
}

impl Drop for OutTx {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.ready.notify_one();
        }
    }
}

impl OutTx {
    /// Queues `out` unless the queue is full or its receiver is gone.
    #[inline]
    pub fn try_send(&self, out: Outbound) -> Result<(), QueueError> {
        if self.0.receiver_gone.load(Ordering::Acquire) {
            return Err(QueueError::Closed);
        }
        let mut items = self.0.items();
        let before = self.0.len.load(Ordering::Acquire);
        if before >= self.0.cap {
            return Err(QueueError::Full);
        }
        items.push_back(out);
        self.0.len.fetch_add(1, Ordering::AcqRel);
        drop(items);
        if before == 0 {
            self.0.ready.notify_one();
        }
        Ok(())
    }

    /// Whether the receiver is gone.
    pub fn is_closed(&self) -> bool {
        self.0.receiver_gone.load(Ordering::Acquire)
    }

    /// Frames that still fit.
    pub fn capacity(&self) -> usize {
        self.0
            .cap
            .saturating_sub(self.0.len.load(Ordering::Acquire))
    }

    /// Frames the queue holds at most.
    pub fn max_capacity(&self) -> usize {
        self.0.cap
    }
}

impl OutRx {
    /// The next frame; `None` once the queue is empty and every sender is gone.
    pub async fn recv(&mut self) -> Option<Outbound> {
        loop {
            match self.try_recv() {
                Ok(out) => return Some(out),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => self.chan.ready.notified().await,
            }
        }
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Result<Outbound, TryRecvError> {
        if self.taken.is_empty() {
            if self.taken.capacity() > KEPT_SLOTS {
                self.taken = VecDeque::new();
            }
            let mut items = self.chan.items();
            if items.is_empty() {
                // Senders are counted down outside the lock: read after it, a
                // sender's last frame is either seen above or its drop is seen here.
                drop(items);
                return Err(if self.chan.senders.load(Ordering::Acquire) == 0 {
                    TryRecvError::Disconnected
                } else {
                    TryRecvError::Empty
                });
            }
            std::mem::swap(&mut *items, &mut self.taken);
        }
        let out = self.taken.pop_front().expect("a batch was taken");
        self.chan.len.fetch_sub(1, Ordering::AcqRel);
        Ok(out)
    }
}

impl Drop for OutRx {
    fn drop(&mut self) {
        self.chan.receiver_gone.store(true, Ordering::Release);
        // What was queued goes now, not when the last sender does.
        let items = std::mem::take(&mut *self.chan.items());
        drop(items);
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
    pub fn new(id: ConnId, tx: OutTx, max_bytes: usize) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Outbound {
        Outbound::Text(s.to_string())
    }

    fn got(o: Outbound) -> String {
        match o {
            Outbound::Text(t) => t,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn frames_come_out_in_order_up_to_the_bound() {
        let (tx, mut rx) = channel(3);
        for s in ["a", "b", "c"] {
            tx.try_send(text(s)).unwrap();
        }
        assert_eq!(tx.try_send(text("d")), Err(QueueError::Full));
        assert_eq!((tx.capacity(), tx.max_capacity()), (0, 3));
        assert_eq!(got(rx.try_recv().unwrap()), "a");
        tx.try_send(text("d")).unwrap();
        let rest: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).map(got).collect();
        assert_eq!(rest, ["b", "c", "d"]);
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
        assert_eq!(tx.capacity(), 3);
    }

    #[test]
    fn a_gone_receiver_closes_the_queue_and_frees_what_it_held() {
        let (tx, rx) = channel(4);
        let shared = Arc::new(());
        tx.try_send(Outbound::Change {
            topic: "realtime:t".into(),
            ids: BindingIds::One(1),
            data: "{}".into(),
        })
        .unwrap();
        let held = Arc::downgrade(&shared);
        drop(shared);
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.try_send(text("x")), Err(QueueError::Closed));
        assert!(held.upgrade().is_none());
        assert!(tx.0.items().is_empty());
    }

    #[tokio::test]
    async fn the_writer_sees_everything_queued_then_the_end_when_the_senders_go() {
        let (tx, mut rx) = channel(8);
        let tx2 = tx.clone();
        tx.try_send(text("1")).unwrap();
        drop(tx);
        tx2.try_send(text("2")).unwrap();
        assert_eq!(got(rx.recv().await.unwrap()), "1");
        assert_eq!(got(rx.recv().await.unwrap()), "2");
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
        drop(tx2);
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Disconnected);
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_writer_is_woken_by_each_burst_and_misses_nothing() {
        let (tx, mut rx) = channel(64);
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(o) = rx.recv().await {
                seen.push(got(o).parse::<u32>().unwrap());
            }
            seen
        });
        let mut sent = 0u32;
        while sent < 20_000 {
            match tx.try_send(text(&sent.to_string())) {
                Ok(()) => sent += 1,
                Err(QueueError::Full) => tokio::task::yield_now().await,
                Err(QueueError::Closed) => panic!("receiver gone"),
            }
            if sent.is_multiple_of(97) {
                tokio::task::yield_now().await;
            }
        }
        drop(tx);
        let seen = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("the writer was left asleep")
            .unwrap();
        assert_eq!(seen, (0..20_000).collect::<Vec<_>>());
    }

    #[test]
    fn an_emptied_queue_gives_its_memory_back_after_a_burst() {
        let (tx, mut rx) = channel(1024);
        for i in 0..500 {
            tx.try_send(text(&i.to_string())).unwrap();
        }
        assert!(tx.0.items().capacity() >= 500);
        while rx.try_recv().is_ok() {}
        // A quiet connection's few frames keep their slots.
        tx.try_send(text("a")).unwrap();
        rx.try_recv().unwrap();
        assert!(tx.0.items().capacity() <= KEPT_SLOTS);
        assert!(rx.taken.capacity() <= KEPT_SLOTS);
    }
}
