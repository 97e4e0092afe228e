//! Progress tracking: what the flush LSN means, and when to say it.
//!
//! The flush LSN walcast reports is a promise: everything before it has been
//! handled and need never be sent again. PostgreSQL then lets the slot release
//! the WAL before it. walcast keeps that promise with these rules, which
//! [`FlushTracker`] implements (each has a unit test named after it below):
//!
//! - **Downstream confirms.** pgoutput without `streaming` sends each transaction
//!   only after it committed, whole, in commit order. The stream hands every item
//!   downstream through a bounded channel; the consumer (the hub, or `tail`'s
//!   printer) calls [`Progress::confirm`] with a transaction's `end_lsn` only once
//!   every change of it has been handed on (printed, or given to the hub). What is
//!   confirmed may be reported.
//! - **Idle keepalives are confirmed when nothing is in flight.** When nothing is
//!   in flight — no open transaction, nothing waiting for the channel, every commit
//!   handed downstream confirmed — the `wal_end` of the latest keepalive is
//!   confirmed too. The walsender sends keepalives for WAL it decoded but did not
//!   publish (other tables, other databases), so a slot whose tables are quiet
//!   while others are busy does not pin WAL (the most common CDC bug). A keepalive
//!   that arrives while a transaction is open, or while an item waits for room
//!   downstream, is not used: its `wal_end` may lie past that transaction's commit.
//!   Commits handed downstream before a reconnect stay in flight until confirmed.
//! - **Monotone.** Reported LSNs never go backwards, also across reconnects and
//!   whatever start position a session resumes from (the slot's confirmed
//!   position, or the one it was created at, counts as reported).
//! - **Reply requested: answer at once.** A keepalive with the reply-requested flag
//!   is answered with a status update right away, whatever the timer says.
//! - **Cadence.** Status updates go out on a timer — half of `wal_sender_timeout`
//!   (read from the server), at most [`MAX_STATUS_INTERVAL`] — also while
//!   downstream is full and the stream is not being read, so the server does not
//!   time the connection out. Every periodic update asks for a keepalive
//!   (`reply = 1`), so idle keepalives come promptly even when the server has no
//!   reason to send one; answers and the final update on shutdown do not.
//!
//! [`FlushTracker`] is pure: no IO, no clock (times are arguments), no locks. The
//! replication session (`crate::source::session`) feeds it what happens and sends
//! what it returns. [`Progress`] is the one piece shared with the consumer.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::decode::pgoutput::PgTimestamp;
use crate::lsn::Lsn;
use crate::source::protocol::StandbyStatusUpdate;

/// Longest pause between standby status updates, whatever `wal_sender_timeout` is.
pub const MAX_STATUS_INTERVAL: Duration = Duration::from_secs(10);

/// Shortest pause between periodic status updates (a tiny `wal_sender_timeout`
/// must not turn the timer into a busy loop).
pub const MIN_STATUS_INTERVAL: Duration = Duration::from_millis(100);

/// Shared between the stream and its consumer: how far downstream has handled the stream.
#[derive(Debug, Default)]
pub struct Progress {
    confirmed: AtomicU64,
    /// With a change log: the end LSN up to which the log is durable.
    logged: AtomicU64,
    /// Whether [`Progress::confirmed`] waits for the log too.
    gated: bool,
    /// Tasks inside [`Progress::reached`]; [`Progress::confirm`] wakes them only
    /// when there are some, so the consumer's hot path stays one atomic.
    waiters: AtomicUsize,
    changed: Notify,
}

impl Progress {
    /// Progress whose confirmed position is also bounded by a change log's
    /// durable position ([`Progress::logged`]): nothing is confirmed to
    /// PostgreSQL that the log could lose.
    pub fn gated_by_log() -> Self {
        Progress {
            gated: true,
            ..Progress::default()
        }
    }

    /// Marks everything up to `lsn` (a commit's end LSN) as handled.
    pub fn confirm(&self, lsn: Lsn) {
        let before = self.confirmed.fetch_max(lsn.0, Ordering::SeqCst);
        if before < lsn.0 && self.waiters.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    /// Marks everything up to `lsn` (a commit's end LSN) as durable in the log.
    pub fn logged(&self, lsn: Lsn) {
        let before = self.logged.fetch_max(lsn.0, Ordering::SeqCst);
        if before < lsn.0 && self.waiters.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    /// Handled downstream (and, when gated, durable in the log).
    pub fn confirmed(&self) -> Lsn {
        let handled = self.confirmed.load(Ordering::Acquire);
        if self.gated {
            Lsn(handled.min(self.logged.load(Ordering::Acquire)))
        } else {
            Lsn(handled)
        }
    }

    /// Returns once downstream has confirmed `lsn` (at once if it has).
    pub async fn reached(&self, lsn: Lsn) {
        /// Counts this task as a waiter until it returns or is dropped.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if self.confirmed() >= lsn {
            return;
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiters);
        loop {
            // Registered before the check: a confirm after the check wakes it.
            let changed = self.changed.notified();
            if self.confirmed() >= lsn {
                return;
            }
            changed.await;
        }
    }
}

/// Why a status update goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusReason {
    /// The timer: asks the server for a keepalive in return.
    Periodic,
    /// The server asked (a keepalive with reply-requested).
    Requested,
    /// The last one, on shutdown or when downstream went away.
    Final,
}

/// The interval of periodic status updates for the server's `wal_sender_timeout`
/// (`None` or zero: the server has no timeout).
pub fn status_interval(wal_sender_timeout: Option<Duration>) -> Duration {
    wal_sender_timeout
        .filter(|t| !t.is_zero())
        .map(|t| (t / 2).min(MAX_STATUS_INTERVAL))
        .unwrap_or(MAX_STATUS_INTERVAL)
        .max(MIN_STATUS_INTERVAL)
}

/// The flush-LSN rules of the module docs, over the events of one slot's stream.
/// Lives as long as the stream (across reconnects).
#[derive(Debug)]
pub struct FlushTracker {
    /// A transaction's Begin was decoded and its Commit not yet.
    open_txn: bool,
    /// An item is waiting for room in the channel.
    waiting: bool,
    /// End LSN of the last commit handed downstream (put into the channel).
    handed_commit: Lsn,
    /// `wal_end` of the last keepalive received while nothing was in flight, on
    /// this connection.
    idle_end: Lsn,
    /// Highest WAL position received on this connection.
    received: Lsn,
    /// The flush LSN last reported (or resumed from).
    reported: Lsn,
    interval: Duration,
    last_status: Option<Instant>,
}

impl Default for FlushTracker {
    fn default() -> Self {
        FlushTracker::new(Lsn::ZERO)
    }
}

impl FlushTracker {
    /// A tracker that has reported `reported` already.
    pub fn new(reported: Lsn) -> Self {
        FlushTracker {
            open_txn: false,
            waiting: false,
            handed_commit: Lsn::ZERO,
            idle_end: Lsn::ZERO,
            received: Lsn::ZERO,
            reported,
            interval: MAX_STATUS_INTERVAL,
            last_status: None,
        }
    }

    /// A new connection streams from the slot at `slot_at` (its confirmed position,
    /// or where it was just created) and the server has this `wal_sender_timeout`.
    /// The open transaction and the waiting item of the old connection are gone
    /// (the server sends them again); commits already handed downstream stay in
    /// flight until confirmed. The first status update is due at once.
    pub fn connected(&mut self, slot_at: Lsn, wal_sender_timeout: Option<Duration>) {
        self.open_txn = false;
        self.waiting = false;
        self.idle_end = Lsn::ZERO;
        self.received = Lsn::ZERO;
        self.reported = self.reported.max(slot_at);
        self.interval = status_interval(wal_sender_timeout);
        self.last_status = None;
    }

    /// WAL up to `lsn` arrived (an `XLogData`'s start).
    pub fn received(&mut self, lsn: Lsn) {
        self.received = self.received.max(lsn);
    }

    /// A transaction's Begin was decoded.
    pub fn begin(&mut self) {
        self.open_txn = true;
    }

    /// Its Commit was decoded: the transaction is whole (handing it on is tracked
    /// by [`FlushTracker::waiting`] and [`FlushTracker::handed_commit`]).
    pub fn commit(&mut self) {
        self.open_txn = false;
    }

    /// Whether a transaction's Begin was decoded and its Commit not yet.
    pub fn in_transaction(&self) -> bool {
        self.open_txn
    }

    /// An item is (or no longer is) waiting for room in the channel.
    pub fn waiting(&mut self, waiting: bool) {
        self.waiting = waiting;
    }

    /// A Commit with this end LSN went into the channel.
    pub fn handed_commit(&mut self, end_lsn: Lsn) {
        self.handed_commit = self.handed_commit.max(end_lsn);
    }

    /// End LSN of the last commit handed downstream.
    pub fn last_handed_commit(&self) -> Lsn {
        self.handed_commit
    }

    /// A primary keepalive arrived. Returns whether to answer at once.
    pub fn keepalive(&mut self, wal_end: Lsn, reply_requested: bool) -> bool {
        self.received(wal_end);
        if !self.open_txn && !self.waiting {
            self.idle_end = self.idle_end.max(wal_end);
        }
        reply_requested
    }

    /// Whether anything is in flight, given what downstream has `confirmed`.
    pub fn in_flight(&self, confirmed: Lsn) -> bool {
        self.open_txn || self.waiting || confirmed < self.handed_commit
    }

    /// The LSN it is safe to report as flushed now.
    pub fn flush(&self, confirmed: Lsn) -> Lsn {
        let mut flush = confirmed;
        if !self.in_flight(confirmed) {
            flush = flush.max(self.idle_end);
        }
        flush.max(self.reported)
    }

    /// The flush LSN last reported.
    pub fn reported(&self) -> Lsn {
        self.reported
    }

    /// When the next periodic status update is due (`None`: now).
    pub fn next_status(&self) -> Option<Instant> {
        self.last_status.map(|t| t + self.interval)
    }

    /// Whether a periodic status update is due at `now`.
    pub fn status_due(&self, now: Instant) -> bool {
        self.next_status().is_none_or(|t| now >= t)
    }

    /// The status update to send now, recorded as sent at `now`.
    pub fn status(
        &mut self,
        confirmed: Lsn,
        reason: StatusReason,
        now: Instant,
        client_time: PgTimestamp,
    ) -> StandbyStatusUpdate {
        let flush = self.flush(confirmed);
        self.reported = flush;
        self.last_status = Some(now);
        StandbyStatusUpdate {
            write: self.received.max(flush),
            flush,
            apply: flush,
            client_time,
            reply_requested: reason == StatusReason::Periodic,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    const T: PgTimestamp = PgTimestamp(0);

    fn report(t: &mut FlushTracker, confirmed: Lsn) -> Lsn {
        t.status(confirmed, StatusReason::Periodic, Instant::now(), T)
            .flush
    }

    /// A tracker on a fresh connection with a slot at 0/0.
    fn tracker() -> FlushTracker {
        let mut t = FlushTracker::default();
        t.connected(Lsn::ZERO, Some(Duration::from_secs(60)));
        t
    }

    /// One whole transaction handed downstream.
    fn transaction(t: &mut FlushTracker, end: u64) {
        t.begin();
        t.received(Lsn(end - 1));
        t.commit();
        t.handed_commit(Lsn(end));
    }

    #[test]
    fn downstream_confirms_what_may_be_reported() {
        let mut t = tracker();
        transaction(&mut t, 100);
        assert_eq!(report(&mut t, Lsn::ZERO), Lsn::ZERO);
        assert_eq!(report(&mut t, Lsn(100)), Lsn(100));
    }

    #[test]
    fn idle_keepalive_is_confirmed_when_nothing_is_in_flight() {
        let mut t = tracker();
        assert!(!t.in_flight(Lsn::ZERO));
        t.keepalive(Lsn(500), false);
        assert_eq!(report(&mut t, Lsn::ZERO), Lsn(500));
        // Later keepalives move it on.
        t.keepalive(Lsn(900), false);
        assert_eq!(report(&mut t, Lsn::ZERO), Lsn(900));
    }

    #[test]
    fn idle_keepalive_is_not_confirmed_during_an_open_transaction() {
        let mut t = tracker();
        t.begin();
        // Mid-transaction the walsender has decoded past the commit already.
        t.keepalive(Lsn(500), false);
        assert!(t.in_flight(Lsn::ZERO));
        assert_eq!(report(&mut t, Lsn::ZERO), Lsn::ZERO);
        t.commit();
        t.handed_commit(Lsn(400));
        // The keepalive's wal_end was never recorded: only the commit counts.
        assert_eq!(report(&mut t, Lsn(400)), Lsn(400));
    }

    #[test]
    fn idle_keepalive_is_not_confirmed_while_an_item_waits_for_the_channel() {
        let mut t = tracker();
        t.begin();
        t.commit();
        t.waiting(true);
        t.keepalive(Lsn(500), false);
        assert!(t.in_flight(Lsn::ZERO));
        assert_eq!(report(&mut t, Lsn::ZERO), Lsn::ZERO);
        // Waiting also holds back a keepalive recorded earlier.
        t.waiting(false);
        t.handed_commit(Lsn(400));
        t.keepalive(Lsn(600), false);
        t.begin();
        t.commit();
        t.waiting(true);
        assert_eq!(report(&mut t, Lsn(400)), Lsn(400));
        t.waiting(false);
        t.handed_commit(Lsn(700));
        assert_eq!(report(&mut t, Lsn(700)), Lsn(700));
    }

    #[test]
    fn idle_keepalive_is_not_confirmed_before_every_handed_commit_is() {
        let mut t = tracker();
        transaction(&mut t, 100);
        transaction(&mut t, 200);
        t.keepalive(Lsn(500), false);
        assert!(t.in_flight(Lsn(100)));
        assert_eq!(report(&mut t, Lsn(100)), Lsn(100));
        assert!(!t.in_flight(Lsn(200)));
        assert_eq!(report(&mut t, Lsn(200)), Lsn(500));
    }

    #[test]
    fn commits_handed_before_a_reconnect_stay_in_flight() {
        let mut t = tracker();
        transaction(&mut t, 100);
        t.connected(Lsn(50), Some(Duration::from_secs(60)));
        t.keepalive(Lsn(500), false);
        assert_eq!(report(&mut t, Lsn(60)), Lsn(60));
        assert_eq!(report(&mut t, Lsn(100)), Lsn(500));
    }

    #[test]
    fn a_reconnect_forgets_the_open_transaction_and_the_waiting_item() {
        let mut t = tracker();
        t.begin();
        t.waiting(true);
        t.connected(Lsn::ZERO, None);
        t.keepalive(Lsn(300), false);
        assert_eq!(report(&mut t, Lsn::ZERO), Lsn(300));
    }

    #[test]
    fn a_reconnect_forgets_keepalives_of_the_old_connection() {
        let mut t = tracker();
        t.keepalive(Lsn(300), false);
        t.begin();
        t.connected(Lsn::ZERO, None);
        // The new connection resends the transaction; the old idle position is
        // not carried over (the publication may have changed in between).
        assert_eq!(report(&mut t, Lsn::ZERO), Lsn::ZERO);
    }

    #[test]
    fn reported_flush_never_goes_backwards() {
        let mut t = tracker();
        t.keepalive(Lsn(500), false);
        assert_eq!(report(&mut t, Lsn::ZERO), Lsn(500));
        // A transaction opens: the idle position no longer counts, but what was
        // reported stays reported.
        t.begin();
        assert_eq!(report(&mut t, Lsn::ZERO), Lsn(500));
        assert_eq!(t.flush(Lsn(10)), Lsn(500));
    }

    #[test]
    fn reported_flush_never_goes_backwards_across_reconnects() {
        let mut t = tracker();
        t.keepalive(Lsn(500), false);
        assert_eq!(report(&mut t, Lsn::ZERO), Lsn(500));
        t.connected(Lsn(200), None);
        assert_eq!(report(&mut t, Lsn::ZERO), Lsn(500));
        assert_eq!(t.reported(), Lsn(500));
    }

    #[test]
    fn the_start_position_counts_as_reported() {
        // Resuming from the slot's confirmed position, or from where it was
        // created: reported from the first update on, before any confirm.
        let mut t = FlushTracker::default();
        t.connected(Lsn(0x1_0000), None);
        assert_eq!(t.reported(), Lsn(0x1_0000));
        assert_eq!(report(&mut t, Lsn::ZERO), Lsn(0x1_0000));
        // An earlier report higher than the slot wins.
        let mut t = FlushTracker::new(Lsn(0x2_0000));
        t.connected(Lsn(0x1_0000), None);
        assert_eq!(report(&mut t, Lsn::ZERO), Lsn(0x2_0000));
    }

    #[test]
    fn reply_requested_is_answered_at_once() {
        let mut t = tracker();
        let now = Instant::now();
        t.status(Lsn::ZERO, StatusReason::Periodic, now, T);
        assert!(!t.status_due(now));
        assert!(
            t.keepalive(Lsn(10), true),
            "answer now, not at the next tick"
        );
        let answer = t.status(Lsn::ZERO, StatusReason::Requested, now, T);
        assert_eq!(answer.flush, Lsn(10));
        assert!(!answer.reply_requested, "an answer does not ask back");
        assert!(!t.keepalive(Lsn(20), false));
    }

    #[test]
    fn periodic_status_asks_for_a_keepalive() {
        let mut t = tracker();
        let now = Instant::now();
        assert!(
            t.status(Lsn::ZERO, StatusReason::Periodic, now, T)
                .reply_requested
        );
        assert!(
            !t.status(Lsn::ZERO, StatusReason::Final, now, T)
                .reply_requested
        );
    }

    #[test]
    fn status_update_carries_received_flush_and_client_time() {
        let mut t = tracker();
        transaction(&mut t, 100);
        t.received(Lsn(150));
        let u = t.status(
            Lsn(100),
            StatusReason::Periodic,
            Instant::now(),
            PgTimestamp(42),
        );
        assert_eq!((u.write, u.flush, u.apply), (Lsn(150), Lsn(100), Lsn(100)));
        assert_eq!(u.client_time, PgTimestamp(42));
        // Write is never below flush (flush may come from a resume position).
        let mut t = FlushTracker::default();
        t.connected(Lsn(900), None);
        let u = t.status(Lsn::ZERO, StatusReason::Periodic, Instant::now(), T);
        assert_eq!((u.write, u.flush), (Lsn(900), Lsn(900)));
    }

    #[test]
    fn cadence_is_half_the_wal_sender_timeout_at_most_the_maximum() {
        assert_eq!(
            status_interval(Some(Duration::from_secs(6))),
            Duration::from_secs(3)
        );
        assert_eq!(
            status_interval(Some(Duration::from_secs(60))),
            MAX_STATUS_INTERVAL
        );
        // No timeout (absent or 0): the maximum.
        assert_eq!(status_interval(None), MAX_STATUS_INTERVAL);
        assert_eq!(status_interval(Some(Duration::ZERO)), MAX_STATUS_INTERVAL);
        // A tiny timeout does not make a busy loop.
        assert_eq!(
            status_interval(Some(Duration::from_millis(10))),
            MIN_STATUS_INTERVAL
        );
    }

    #[test]
    fn cadence_first_status_at_once_then_every_interval() {
        let mut t = FlushTracker::default();
        t.connected(Lsn::ZERO, Some(Duration::from_secs(6)));
        let start = Instant::now();
        assert_eq!(t.next_status(), None);
        assert!(t.status_due(start));
        t.status(Lsn::ZERO, StatusReason::Periodic, start, T);
        assert_eq!(t.next_status(), Some(start + Duration::from_secs(3)));
        assert!(!t.status_due(start + Duration::from_millis(2999)));
        assert!(t.status_due(start + Duration::from_secs(3)));
        // Any update (an answer too) restarts the interval.
        let later = start + Duration::from_secs(2);
        t.status(Lsn::ZERO, StatusReason::Requested, later, T);
        assert_eq!(t.next_status(), Some(later + Duration::from_secs(3)));
        // A new connection: at once again, with the new server's timeout.
        t.connected(Lsn::ZERO, Some(Duration::from_secs(2)));
        assert!(t.status_due(later));
        t.status(Lsn::ZERO, StatusReason::Periodic, later, T);
        assert_eq!(t.next_status(), Some(later + Duration::from_secs(1)));
    }

    #[test]
    fn cadence_holds_while_downstream_is_full() {
        let mut t = tracker();
        let start = Instant::now();
        t.status(Lsn::ZERO, StatusReason::Periodic, start, T);
        t.begin();
        t.waiting(true);
        let due = start + status_interval(Some(Duration::from_secs(60)));
        assert!(t.status_due(due), "a full channel does not stop the timer");
        let u = t.status(Lsn::ZERO, StatusReason::Periodic, due, T);
        assert!(u.reply_requested);
    }

    #[test]
    fn progress_confirms_only_forward() {
        let p = Progress::default();
        p.confirm(Lsn(10));
        p.confirm(Lsn(5));
        assert_eq!(p.confirmed(), Lsn(10));
    }

    #[tokio::test]
    async fn progress_reached_wakes_when_downstream_confirms() {
        let p = Arc::new(Progress::default());
        p.confirm(Lsn(5));
        // Already there: at once.
        p.reached(Lsn(5)).await;
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { p.reached(Lsn(100)).await }
        });
        tokio::task::yield_now().await;
        p.confirm(Lsn(50));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "50 is not 100");
        p.confirm(Lsn(100));
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the confirm")
            .unwrap();
        assert_eq!(p.waiters.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn progress_waiter_dropped_unregisters() {
        let p = Progress::default();
        let r = tokio::time::timeout(Duration::from_millis(1), p.reached(Lsn(1))).await;
        assert!(r.is_err());
        assert_eq!(p.waiters.load(Ordering::SeqCst), 0);
    }

    /// What happens on the stream, as the session tells the tracker.
    #[derive(Clone, Debug)]
    enum Event {
        /// A transaction begins; its commit record ends `len` bytes further on.
        Begin {
            len: u64,
        },
        /// Its Commit is decoded; the channel is full or not.
        Commit {
            full: bool,
        },
        /// The channel takes the waiting item.
        Room,
        /// Downstream confirms the oldest commit in the channel.
        Confirm,
        /// A keepalive `ahead` bytes past everything so far (while a transaction is
        /// open, the walsender is already past its commit).
        Keepalive {
            ahead: u64,
            reply: bool,
        },
        Status,
        /// The connection breaks and comes back (allowed between transactions).
        Reconnect,
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (1..50u64).prop_map(|len| Event::Begin { len }),
            any::<bool>().prop_map(|full| Event::Commit { full }),
            Just(Event::Room),
            Just(Event::Confirm),
            (0..50u64, any::<bool>()).prop_map(|(ahead, reply)| Event::Keepalive { ahead, reply }),
            Just(Event::Status),
            Just(Event::Reconnect),
        ]
    }

    proptest! {
        /// For any interleaving: the reported flush never goes backwards, never
        /// reaches a commit downstream has not confirmed, and never lags what it
        /// has confirmed.
        #[test]
        fn reported_flush_is_monotone_and_never_passes_an_unconfirmed_commit(
            events in proptest::collection::vec(event(), 0..100)
        ) {
            let mut t = tracker();
            let progress = Progress::default();
            let mut pos = 0u64; // how far the walsender has decoded
            let mut open: Option<u64> = None; // the open transaction's commit end
            let mut waiting: Option<u64> = None; // a decoded commit not yet in the channel
            let mut channel = std::collections::VecDeque::new();
            let mut last = Lsn::ZERO;
            for e in events {
                match e {
                    Event::Begin { len } => {
                        if open.is_none() && waiting.is_none() {
                            open = Some(pos + len);
                            t.begin();
                            pos += len; // the walsender decoded up to the commit
                            t.received(Lsn(pos));
                        }
                    }
                    Event::Commit { full } => {
                        if let (Some(end), None) = (open, waiting) {
                            open = None;
                            t.commit();
                            if full {
                                waiting = Some(end);
                                t.waiting(true);
                            } else {
                                channel.push_back(end);
                                t.handed_commit(Lsn(end));
                            }
                        }
                    }
                    Event::Room => {
                        if let Some(end) = waiting.take() {
                            t.waiting(false);
                            channel.push_back(end);
                            t.handed_commit(Lsn(end));
                        }
                    }
                    Event::Confirm => {
                        if let Some(end) = channel.pop_front() {
                            progress.confirm(Lsn(end));
                        }
                    }
                    Event::Keepalive { ahead, reply } => {
                        // The socket is not read while an item waits.
                        if waiting.is_none() {
                            pos += ahead;
                            if t.keepalive(Lsn(pos), reply) {
                                last = check(&mut t, &progress, open, waiting, &channel, last)?;
                            }
                        }
                    }
                    Event::Status => {
                        last = check(&mut t, &progress, open, waiting, &channel, last)?;
                    }
                    Event::Reconnect => {
                        if open.is_none() && waiting.is_none() {
                            t.connected(progress.confirmed(), None);
                        }
                    }
                }
                // Whenever nothing is in flight, an idle keepalive gets confirmed.
                if open.is_none() && waiting.is_none() && channel.is_empty() {
                    t.keepalive(Lsn(pos), false);
                    let flush = check(&mut t, &progress, open, waiting, &channel, last)?;
                    prop_assert_eq!(flush, Lsn(pos).max(last));
                    last = flush;
                }
            }
        }
    }

    fn check(
        t: &mut FlushTracker,
        progress: &Progress,
        open: Option<u64>,
        waiting: Option<u64>,
        channel: &std::collections::VecDeque<u64>,
        last: Lsn,
    ) -> Result<Lsn, TestCaseError> {
        let confirmed = progress.confirmed();
        let flush = report(t, confirmed);
        prop_assert!(flush >= last, "went backwards: {} after {}", flush, last);
        prop_assert!(flush >= confirmed, "{} lags confirmed {}", flush, confirmed);
        for end in open.iter().chain(waiting.iter()).chain(channel.iter()) {
            prop_assert!(
                flush < Lsn(*end),
                "{} passes unconfirmed commit {}",
                flush,
                end
            );
        }
        Ok(flush)
    }
}
