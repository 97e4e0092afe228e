//! Several nodes fed from one slot, through NATS JetStream (README, "Running
//! several nodes"; DESIGN.md "Scale-out").
//!
//! - [`publish`]: the relay's stage after the slot — every committed change
//!   becomes a JetStream message ([`wire`]), and the slot's flush LSN is
//!   confirmed only up to the last transaction whose every message the stream
//!   acknowledged.
//! - [`consume`]: a gateway's source — the stream read back in order, turned into
//!   the same [`crate::decode::event::Item`]s the slot gives `serve`.
//! - [`stats`]: their counters, as Prometheus families.
//!
//! This module connects to NATS and makes or checks the stream.

pub mod consume;
pub mod publish;
pub mod stats;
pub mod wire;

use std::time::Duration;

use async_nats::jetstream;

use crate::config::ClusterConfig;

/// How long connecting to NATS at startup may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What is wrong with NATS or the stream, said so an operator can act.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach NATS at {url}: {message} (is nats-server running with JetStream, `nats-server -js`?)")]
    Connect { url: String, message: String },
    #[error("JetStream stream {stream:?}: {message}")]
    Stream { stream: String, message: String },
}

pub use stats::ClusterStats;

/// Connects to the NATS server(s) of `cfg`, retrying for ever after the first
/// connection (a restarted NATS is reconnected to).
pub async fn connect(cfg: &ClusterConfig, name: &str) -> Result<async_nats::Client, ClusterError> {
    let url = cfg.nats_url.clone().unwrap_or_default();
    let opts = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .reconnect_delay_callback(|attempt| {
            Duration::from_millis((100 * attempt as u64).clamp(100, 1000))
        });
    let addrs: Vec<&str> = url.split(',').map(str::trim).collect();
    let addrs: Vec<async_nats::ServerAddr> = addrs
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()
        .map_err(|e: std::io::Error| ClusterError::Connect {
            url: url.clone(),
            message: format!("bad URL: {e}"),
        })?;
    match tokio::time::timeout(CONNECT_TIMEOUT, opts.connect(addrs.as_slice())).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(ClusterError::Connect {
            url,
            message: e.to_string(),
        }),
        Err(_) => Err(ClusterError::Connect {
            url,
            message: format!("no answer within {CONNECT_TIMEOUT:?}"),
        }),
    }
}

/// The JetStream context with `cfg`'s acknowledgement timeout.
pub fn context(client: async_nats::Client, cfg: &ClusterConfig) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(cfg.ack_timeout_ms))
        .max_ack_inflight(cfg.max_in_flight.saturating_add(16))
        .backpressure_on_inflight(true)
        .build(client)
}

/// The stream as `cfg` wants it.
pub fn stream_config(cfg: &ClusterConfig) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![format!("{}.>", cfg.subject_prefix)],
        max_bytes: cfg.max_bytes,
        max_age: Duration::from_secs(cfg.max_age_secs),
        num_replicas: cfg.replicas,
        duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
        storage: jetstream::stream::StorageType::File,
        retention: jetstream::stream::RetentionPolicy::Limits,
        discard: jetstream::stream::DiscardPolicy::Old,
        description: Some("walcast: committed changes of one replication slot".into()),
        ..Default::default()
    }
}

/// Creates the stream, or checks an existing one and brings its limits to `cfg`'s.
/// An existing stream that cannot carry the changes (other subjects, a work-queue
/// or interest retention that deletes what gateways need to replay) is an error
/// naming what to change.
pub async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &ClusterConfig,
) -> Result<(), ClusterError> {
    let err = |message: String| ClusterError::Stream {
        stream: cfg.stream.clone(),
        message,
    };
    let want = stream_config(cfg);
    match js.get_stream(&cfg.stream).await {
        Ok(mut s) => {
            let info = s
                .info()
                .await
                .map_err(|e| err(format!("cannot read its configuration: {e}")))?;
            let have = &info.config;
            let subject = &want.subjects[0];
            if !have.subjects.iter().any(|s| s == subject) {
                return Err(err(format!(
                    "its subjects are {:?}, not {subject:?}: delete it, or set [cluster] stream or subject_prefix to match",
                    have.subjects
                )));
            }
            let peer = wire::peer_subject(&cfg.subject_prefix, "presence");
            if let Some(s) = have.subjects.iter().find(|s| subject_covers(s, &peer)) {
                return Err(err(format!(
                    "its subject {s:?} also takes the gateways' own messages ({peer:?}), which must never be stored: give it only {subject:?}"
                )));
            }
            if have.retention != jetstream::stream::RetentionPolicy::Limits {
                return Err(err(format!(
                    "its retention is {:?}: walcast needs limits retention (messages stay for replay until max_bytes/max_age); delete the stream and let the relay create it",
                    have.retention
                )));
            }
            if have.max_bytes != want.max_bytes
                || have.max_age != want.max_age
                || have.num_replicas != want.num_replicas
                || have.duplicate_window != want.duplicate_window
            {
                let mut new = have.clone();
                new.max_bytes = want.max_bytes;
                new.max_age = want.max_age;
                new.num_replicas = want.num_replicas;
                new.duplicate_window = want.duplicate_window;
                js.update_stream(new)
                    .await
                    .map_err(|e| err(format!("cannot apply [cluster] limits: {e}")))?;
                tracing::info!(stream = %cfg.stream, "stream limits updated from [cluster]");
            }
            Ok(())
        }
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            js.create_stream(want)
                .await
                .map_err(|e| err(format!("cannot create it: {e}")))?;
            tracing::info!(stream = %cfg.stream, "stream created");
            Ok(())
        }
        Err(e) => Err(err(format!(
            "cannot read it: {e} (is JetStream enabled on the server, `nats-server -js`?)"
        ))),
    }
}

/// Whether the NATS subject pattern `pattern` (`*` one token, `>` the rest)
/// matches `subject`.
fn subject_covers(pattern: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for p in pattern.split('.') {
        match (p, subject.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::subject_covers;

    #[test]
    fn subject_patterns_match_as_nats_does() {
        let peer = "_walcast_peer.walcast.presence";
        for p in [
            ">",
            "_walcast_peer.>",
            "*.walcast.*",
            "_walcast_peer.walcast.presence",
        ] {
            assert!(subject_covers(p, peer), "{p}");
        }
        for p in [
            "walcast.>",
            "_walcast_peer.*",
            "*.*",
            "_walcast_peer.walcast.presence.x",
        ] {
            assert!(!subject_covers(p, peer), "{p}");
        }
    }
}
