//! Counters of the relay and of a gateway's stream reader, and the Prometheus
//! families that expose them (`walcast_relay_*`, `walcast_cluster_*`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};

/// Counters of the relay and the gateway side (read by metrics).
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// 1 while this relay holds the slot (it leads), 0 while it waits as standby.
    pub leader: AtomicI64,
    /// Messages published (each change, including republished ones).
    pub published: AtomicU64,
    /// Acknowledgements JetStream marked as duplicates (absorbed republishes).
    pub duplicates: AtomicU64,
    /// Publishes that failed or timed out (each is sent again).
    pub publish_errors: AtomicU64,
    /// Messages published and not yet acknowledged.
    pub in_flight: AtomicI64,
    /// Messages a gateway read from the stream.
    pub consumed: AtomicU64,
    /// Messages a gateway skipped: already handed on, or unreadable.
    pub skipped: AtomicU64,
    /// Last stream sequence a gateway read.
    pub stream_sequence: AtomicU64,
}

/// Which side a process is: the families it exposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Relay,
    Gateway,
}

/// (name, help, counter?, role)
const FAMILIES: &[(&str, &str, bool, Role)] = &[
    (
        "walcast_relay_leader",
        "1 while this relay holds the replication slot and publishes, 0 while it waits as standby.",
        false,
        Role::Relay,
    ),
    (
        "walcast_relay_published_total",
        "Messages published to the JetStream stream, republished ones included.",
        true,
        Role::Relay,
    ),
    (
        "walcast_relay_duplicates_total",
        "Publishes JetStream acknowledged as duplicates (a republished change stored once).",
        true,
        Role::Relay,
    ),
    (
        "walcast_relay_publish_errors_total",
        "Publishes that failed or were not acknowledged in time (each is sent again).",
        true,
        Role::Relay,
    ),
    (
        "walcast_relay_in_flight",
        "Messages published and not yet acknowledged by JetStream.",
        false,
        Role::Relay,
    ),
    (
        "walcast_cluster_nats_connected",
        "1 while the connection to NATS is up.",
        false,
        Role::Relay,
    ),
    (
        "walcast_cluster_nats_connected",
        "1 while the connection to NATS is up.",
        false,
        Role::Gateway,
    ),
    (
        "walcast_cluster_consumed_total",
        "Messages this gateway read from the JetStream stream.",
        true,
        Role::Gateway,
    ),
    (
        "walcast_cluster_skipped_total",
        "Messages this gateway skipped: already handed on (a late duplicate), or unreadable.",
        true,
        Role::Gateway,
    ),
    (
        "walcast_cluster_stream_sequence",
        "Stream sequence of the last message this gateway read.",
        false,
        Role::Gateway,
    ),
];

/// The families of `role` over `stats`; `connected` says whether NATS is up now.
pub struct StatsCollector {
    stats: Arc<ClusterStats>,
    role: Role,
    connected: Box<dyn Fn() -> bool + Send + Sync>,
    descs: Vec<Desc>,
}

impl StatsCollector {
    pub fn new(
        stats: Arc<ClusterStats>,
        role: Role,
        connected: Box<dyn Fn() -> bool + Send + Sync>,
    ) -> Result<Self, prometheus::Error> {
        let descs = FAMILIES
            .iter()
            .filter(|f| f.3 == role)
            .map(|(name, help, _, _)| {
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    vec![],
                    Default::default(),
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(StatsCollector {
            stats,
            role,
            connected,
            descs,
        })
    }
}

impl Collector for StatsCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let s = &self.stats;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let i = |a: &AtomicI64| a.load(Ordering::Relaxed) as f64;
        FAMILIES
            .iter()
            .filter(|f| f.3 == self.role)
            .map(|&(name, help, counter, _)| {
                let v = match name {
                    "walcast_relay_leader" => i(&s.leader),
                    "walcast_relay_published_total" => n(&s.published),
                    "walcast_relay_duplicates_total" => n(&s.duplicates),
                    "walcast_relay_publish_errors_total" => n(&s.publish_errors),
                    "walcast_relay_in_flight" => i(&s.in_flight),
                    "walcast_cluster_nats_connected" => f64::from(u8::from((self.connected)())),
                    "walcast_cluster_consumed_total" => n(&s.consumed),
                    "walcast_cluster_skipped_total" => n(&s.skipped),
                    "walcast_cluster_stream_sequence" => n(&s.stream_sequence),
                    _ => 0.0,
                };
                let mut m = proto::Metric::default();
                let mut f = MetricFamily::default();
                if counter {
                    let mut c = proto::Counter::default();
                    c.set_value(v);
                    m.set_counter(c);
                    f.set_field_type(MetricType::COUNTER);
                } else {
                    let mut g = proto::Gauge::default();
                    g.set_value(v);
                    m.set_gauge(g);
                    f.set_field_type(MetricType::GAUGE);
                }
                f.set_name(name.to_string());
                f.set_help(help.to_string());
                f.set_metric(vec![m]);
                f
            })
            .collect()
    }
}
