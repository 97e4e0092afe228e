//! Client broadcasts between the gateways of a cluster, over core NATS (subject
//! `_walcast_peer.<subject_prefix>.broadcast`): what a client of one gateway sends to a
//! topic reaches the topic's members on every gateway.
//!
//! Guarantee: at most once, like a broadcast within one node — core NATS does
//! not store, so a gateway that is disconnected from NATS misses what is sent
//! meanwhile, and a full outbound queue ([`OUTBOUND`]) drops (counted as
//! `undeliverable`). Each gateway checked the sender's rights (private
//! channels, rate, size) before handing the message on. Presence crosses
//! gateways in [`crate::daemon::peer_presence`].

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{BufMut, Bytes};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::deliver::broadcast::{Broadcaster, PeerBroadcast};

/// Broadcasts waiting to go to NATS, at most.
pub const OUTBOUND: usize = 1024;

const PRIVATE: u8 = 1;
const RAW: u8 = 2;
const BINARY: u8 = 4;

/// Links `broadcaster` to the other gateways until `stop` fires.
pub async fn run(
    client: async_nats::Client,
    prefix: String,
    broadcaster: Arc<Broadcaster>,
    stop: CancellationToken,
) {
    let subject = crate::cluster::wire::peer_subject(&prefix, "broadcast");
    let node = {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    };
    let (tx, mut rx) = mpsc::channel::<PeerBroadcast>(OUTBOUND);
    let stats = broadcaster.stats();
    broadcaster.set_peer_sink(Box::new(move |b| {
        if tx.try_send(b).is_err() {
            stats.undeliverable.fetch_add(1, Ordering::Relaxed);
        }
    }));
    let mut sub = loop {
        match client.subscribe(subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!("cannot subscribe to {subject}: {e}; broadcasts stay on this gateway until it can");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            b = rx.recv() => {
                let Some(b) = b else { return };
                // At most once: a failed publish is not retried.
                let _ = client.publish(subject.clone(), encode(node, &b)).await;
            }
            m = sub.next() => {
                let Some(m) = m else { return };
                match decode(&m.payload) {
                    Some((from, b)) if from != node => {
                        broadcaster.from_peer(b);
                    }
                    Some(_) => {}
                    None => tracing::debug!("ignored a peer broadcast that does not decode"),
                }
            }
        }
    }
}

fn encode(node: u64, b: &PeerBroadcast) -> Bytes {
    let mut out = Vec::with_capacity(16 + b.topic.len() + b.event.len() + b.body.len());
    out.put_u64_le(node);
    let mut flags = 0;
    if b.private {
        flags |= PRIVATE;
    }
    if b.raw {
        flags |= RAW;
    }
    if b.binary {
        flags |= BINARY;
    }
    out.push(flags);
    for s in [&b.topic, &b.event] {
        let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        out.put_u16_le(s.len() as u16);
        out.extend_from_slice(s);
    }
    out.extend_from_slice(&b.body);
    out.into()
}

fn decode(b: &[u8]) -> Option<(u64, PeerBroadcast)> {
    let node = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
    let flags = *b.get(8)?;
    let mut at = 9;
    let mut string = || -> Option<String> {
        let n = u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as usize;
        let s = String::from_utf8(b.get(at + 2..at + 2 + n)?.to_vec()).ok()?;
        at += 2 + n;
        Some(s)
    };
    let topic = string()?;
    let event = string()?;
    Some((
        node,
        PeerBroadcast {
            topic,
            private: flags & PRIVATE != 0,
            event,
            body: b.get(at..)?.to_vec(),
            raw: flags & RAW != 0,
            binary: flags & BINARY != 0,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_broadcast_comes_back_as_sent_and_garbage_is_none() {
        let b = PeerBroadcast {
            topic: "realtime:room".into(),
            private: true,
            event: "e".into(),
            body: b"{\"a\":1}".to_vec(),
            raw: false,
            binary: true,
        };
        assert_eq!(decode(&encode(7, &b)), Some((7, b)));
        for g in [&b""[..], &[0; 9], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, b'a']] {
            assert_eq!(decode(g), None);
        }
    }
}
