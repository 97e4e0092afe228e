//! A gateway's source (`walcast serve --cluster`): the relay's stream read back in
//! order and handed downstream as the same items the slot gives `serve`
//! (stream start, begin, changes, messages, commit), so the change log, the hub
//! and replay work unchanged.
//!
//! - **In order, from the start.** An ordered consumer (ephemeral, no acks: the
//!   client recreates it after a lost connection, from the last sequence read)
//!   reads every subject of the stream from its first message. The gateway's own
//!   change log skips the transactions it already holds, so a restart catches up
//!   from the stream, the source of truth.
//! - **Once.** An entry whose key (commit LSN, position) is not after the last
//!   one handed on is skipped: a republish that outlived the duplicate window.
//! - **Health.** The stream counts as connected (the `StreamState` read by
//!   `/ready` and the `REPLICATION_DOWN`/`REPLICATION_OK` notices) while the NATS
//!   connection is up and the consumer has caught up once and reads without error.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::wire::{self, Key, Source};
use super::ClusterStats;
use crate::changelog::codec::Logged;
use crate::config::ClusterConfig;
use crate::decode::event::{Item, StreamStart};
use crate::lsn::Lsn;
use crate::source::session::{ReplicationError, StreamState};

/// Pause before trying again when the stream cannot be read.
const RETRY: Duration = Duration::from_secs(1);
/// How often the NATS connection's state is looked at.
const TICK: Duration = Duration::from_millis(250);

/// What the gateway has handed downstream so far.
#[derive(Default)]
struct Cursor {
    /// Next stream sequence to read (0: from the start).
    next_seq: u64,
    last: Option<Key>,
    source: Option<Source>,
    /// The transaction begun and not yet committed downstream.
    open: Option<crate::decode::event::TxnInfo>,
    tables: wire::Tables,
}

/// Reads the stream into `tx` until `shutdown` fires or `tx` closes. Errors of
/// NATS are retried for ever (and shown in `state`).
pub async fn run(
    client: async_nats::Client,
    cfg: ClusterConfig,
    tx: mpsc::Sender<Item>,
    state: Arc<StreamState>,
    stats: Arc<ClusterStats>,
    shutdown: CancellationToken,
) -> Result<(), ReplicationError> {
    let js = super::context(client.clone(), &cfg);
    let mut cur = Cursor::default();
    let mut warned = false;
    let mut caught_up = false;
    let old_peer = format!("{}._peer.", cfg.subject_prefix);
    loop {
        if shutdown.is_cancelled() || tx.is_closed() {
            return Ok(());
        }
        let messages = async {
            let stream = js
                .get_stream(&cfg.stream)
                .await
                .map_err(|e| e.to_string())?;
            let deliver_policy = match cur.next_seq {
                0 => DeliverPolicy::All,
                s => DeliverPolicy::ByStartSequence { start_sequence: s },
            };
            let consumer = stream
                .create_consumer(OrderedConfig {
                    filter_subject: format!("{}.>", cfg.subject_prefix),
                    deliver_policy,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            let pending = consumer.cached_info().num_pending;
            let messages = consumer.messages().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((messages, pending))
        };
        let (mut messages, pending) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = messages => match r {
                Ok(m) => m,
                Err(e) => {
                    state.set_connected(false);
                    if !warned {
                        tracing::warn!(stream = %cfg.stream, "cannot read the cluster's JetStream stream: {e}; retrying every {RETRY:?} (is the relay running? it creates the stream)");
                        warned = true;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                    continue;
                }
            },
        };
        if warned {
            tracing::info!(stream = %cfg.stream, "reading the cluster's stream");
            warned = false;
        }
        if pending == 0 {
            caught_up = true;
        }
        let mut was_down = false;
        let mut tick = tokio::time::interval(TICK);
        loop {
            let up = client.connection_state() == async_nats::connection::State::Connected;
            // Back after a lost connection: the server may have lost the ephemeral
            // consumer (a restart), so read on from a new one at once rather than
            // wait for its heartbeats to be missed.
            if up && was_down {
                tracing::info!(
                    "NATS is back; reading the stream on from sequence {}",
                    cur.next_seq
                );
                break;
            }
            was_down |= !up;
            let healthy = caught_up && up;
            if healthy != state.connected.load(Ordering::Acquire) {
                set_health(&state, healthy);
            }
            let next = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => continue,
                m = messages.next() => m,
            };
            match next {
                Some(Ok(msg)) => {
                    let (seq, pending) = match msg.info() {
                        Ok(i) => (i.stream_sequence, i.pending),
                        Err(_) => (cur.next_seq, 1),
                    };
                    cur.next_seq = seq + 1;
                    stats.stream_sequence.store(seq, Ordering::Relaxed);
                    stats.consumed.fetch_add(1, Ordering::Relaxed);
                    if pending == 0 {
                        caught_up = true;
                    }
                    // What gateways of walcast before 63f3119 said to each other
                    // landed in the stream too (their peer subjects were under
                    // the prefix): not changes, skipped without a word.
                    if msg.subject.starts_with(old_peer.as_str()) {
                        stats.skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if !hand_on(&mut cur, &msg.payload, &tx, &stats, &state).await {
                        return Ok(());
                    }
                }
                Some(Err(e)) => {
                    // Whatever went wrong, a new consumer from the next sequence
                    // reads on without a gap.
                    tracing::warn!(
                        "reading the cluster's stream: {e}; reading on from sequence {}",
                        cur.next_seq
                    );
                    set_health(&state, false);
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(TICK) => {}
                    }
                    break;
                }
                None => break,
            }
        }
    }
}

fn set_health(state: &StreamState, healthy: bool) {
    state.set_connected(healthy);
    if healthy {
        state.disconnected_since.store(0, Ordering::Relaxed);
    } else if state.disconnected_since.load(Ordering::Relaxed) == 0 {
        state.disconnected_since.store(
            crate::changelog::now_micros() / 1_000_000,
            Ordering::Relaxed,
        );
    }
}

/// Turns one message into items; false when downstream went away.
async fn hand_on(
    cur: &mut Cursor,
    payload: &bytes::Bytes,
    tx: &mpsc::Sender<Item>,
    stats: &ClusterStats,
    state: &StreamState,
) -> bool {
    let env = match wire::decode(payload, &mut cur.tables) {
        Ok(e) => e,
        Err(e) => {
            stats.skipped.fetch_add(1, Ordering::Relaxed);
            state.decode_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("skipped a message of the cluster's stream that does not decode: {e}");
            return true;
        }
    };
    // Entries already handed on (a republish that outlived the duplicate
    // window, or cut into other messages by an older relay) are skipped one by one.
    let fresh = env
        .entries
        .len()
        .saturating_sub(skip_count(cur.last, env.key, env.entries.len()));
    if !env.announcement {
        if fresh == 0 {
            stats.skipped.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        cur.last = Some(Key {
            lsn: env.key.lsn,
            pos: env.key.pos + env.entries.len() as u32 - 1,
        });
    }
    let mut items = Vec::with_capacity(3 + fresh);
    if cur.source.as_ref() != Some(&env.source) {
        if let Some(open) = cur.open.take() {
            items.push(Item::Commit {
                info: open,
                end_lsn: open.commit_lsn,
            });
        }
        items.push(Item::Stream(StreamStart {
            system_id: env.source.system_id.clone(),
            slot: env.source.slot.clone(),
            slot_confirmed: env.key.lsn,
        }));
        cur.source = Some(env.source.clone());
    }
    if env.announcement {
        return send(items, tx).await;
    }
    if let Some(txn) = env.txn {
        if cur.open.is_some_and(|o| o.commit_lsn != txn.commit_lsn) {
            // The rest of the open transaction never came (lost past the
            // duplicate window): end it where it is.
            let open = cur.open.take().expect("open");
            items.push(Item::Commit {
                info: open,
                end_lsn: open.commit_lsn,
            });
        }
        if cur.open.is_none() {
            items.push(Item::Begin(txn));
            cur.open = Some(txn);
        }
    }
    let skip = env.entries.len() - fresh;
    for entry in env.entries.into_iter().skip(skip) {
        match entry {
            Logged::Change(c) => items.push(Item::Change(Arc::new(c))),
            Logged::Message(m) => items.push(Item::Message(Arc::new(m))),
        }
    }
    if let (Some(txn), true) = (env.txn, env.last) {
        cur.open = None;
        let end_lsn = if env.end_lsn > Lsn::ZERO {
            env.end_lsn
        } else {
            txn.commit_lsn
        };
        items.push(Item::Commit { info: txn, end_lsn });
        state
            .last_commit_unix_micros
            .store(txn.commit_time.unix_micros(), Ordering::Relaxed);
        state.transactions.fetch_add(1, Ordering::Relaxed);
        state.handed_commit_end.store(end_lsn.0, Ordering::Release);
    }
    send(items, tx).await
}

/// How many of `n` entries starting at `first` are at or before `last` (were
/// handed on already).
fn skip_count(last: Option<Key>, first: Key, n: usize) -> usize {
    match last {
        None => 0,
        Some(l) if l.lsn > first.lsn => n,
        Some(l) if l.lsn < first.lsn || l.pos < first.pos => 0,
        Some(l) => ((l.pos - first.pos) as usize + 1).min(n),
    }
}

async fn send(items: Vec<Item>, tx: &mpsc::Sender<Item>) -> bool {
    for item in items {
        if tx.send(item).await.is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_handed_on_already_are_skipped_one_by_one() {
        let k = |lsn, pos| Key { lsn: Lsn(lsn), pos };
        assert_eq!(skip_count(None, k(10, 0), 5), 0);
        // An earlier transaction: all new.
        assert_eq!(skip_count(Some(k(9, 7)), k(10, 0), 5), 0);
        // A later transaction was handed on: all old.
        assert_eq!(skip_count(Some(k(11, 0)), k(10, 0), 5), 5);
        // The same transaction: up to and including the last one handed on.
        assert_eq!(skip_count(Some(k(10, 2)), k(10, 0), 5), 3);
        assert_eq!(skip_count(Some(k(10, 9)), k(10, 0), 5), 5);
        assert_eq!(skip_count(Some(k(10, 2)), k(10, 3), 5), 0);
    }
}
