//! `walcast relay`: the slot reader of a cluster (README, "Running several nodes").
//! It reads the slot as `serve` does and publishes every committed change to the
//! JetStream stream ([`crate::cluster::publish`]); gateways serve the clients.
//!
//! Leadership: PostgreSQL lets one connection stream a slot at a time, so "the
//! slot is active" is the lock. A relay that finds it active (another relay leads)
//! waits as standby, looking every [`STANDBY_POLL`]; once the leader's walsender
//! is gone it starts streaming from the slot's `confirmed_flush_lsn`, and what it
//! republishes is absorbed by the stream's duplicate window.
//! `walcast_relay_leader` says which relay leads.
//!
//! It serves `/metrics`, `/health` and `/ready` on `server.listen`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cluster::stats::{Role, StatsCollector};
use crate::cluster::ClusterStats;
use crate::config::{ConfigError, PgConnInfo, ServeConfig};
use crate::daemon::serve::ServeError;
use crate::deliver::broadcast::BroadcastStats;
use crate::deliver::socket::WsStats;
use crate::route::hub::HubStats;
use crate::server::metrics::{Metrics, Sources};
use crate::source::session::{self, Progress, ReplicationError, ReplicationOptions, StreamState};

/// How often a standby looks whether the slot is free.
pub const STANDBY_POLL: Duration = Duration::from_secs(1);

/// How long shutdown waits for JetStream to acknowledge what is in flight.
const PUBLISH_DRAIN: Duration = Duration::from_secs(10);

/// Runs the relay until `shutdown` fires or replication fails for good.
/// `on_ready` gets the address of the metrics listener once it is bound and NATS
/// and the stream are checked.
pub async fn run(
    config: ServeConfig,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    config.validate()?;
    if config.cluster.nats_url.is_none() {
        return Err(ConfigError::Invalid {
            field: "cluster.nats_url".into(),
            reason:
                "walcast relay publishes to NATS JetStream: set [cluster] nats_url or --nats-url"
                    .into(),
        }
        .into());
    }
    let url = config
        .postgres
        .database_url
        .clone()
        .ok_or(ServeError::NoDatabaseUrl)?;
    let conn = PgConnInfo::parse(&url)?;
    let client = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        c = crate::cluster::connect(&config.cluster, "walcast-relay") => c?,
    };
    let js = crate::cluster::context(client.clone(), &config.cluster);
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        r = crate::cluster::ensure_stream(&js, &config.cluster) => r?,
    }
    let listener = tokio::net::TcpListener::bind(&config.server.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.server.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: config.server.listen.clone(),
        source,
    })?;

    let stream = Arc::new(StreamState::default());
    let progress = Arc::new(Progress::default());
    let stats = Arc::new(ClusterStats::default());
    let metrics = Arc::new(Metrics::new(
        Sources {
            stream: stream.clone(),
            progress: progress.clone(),
            hub: Arc::new(HubStats::default()),
            ws: Arc::new(WsStats::default()),
            broadcast: Arc::new(BroadcastStats::default()),
            log: None,
            replay: Arc::new(crate::deliver::replay::ReplayStats::default()),
            rls: None,
        },
        config.health.clone(),
    )?);
    {
        let c = client.clone();
        metrics.register(Box::new(
            StatsCollector::new(
                stats.clone(),
                Role::Relay,
                Box::new(move || c.connection_state() == async_nats::connection::State::Connected),
            )
            .map_err(crate::server::metrics::MetricsError::from)?,
        ))?;
    }
    let stop_http = CancellationToken::new();
    let http = {
        let app = crate::server::http::finish(
            crate::server::metrics::routes_with_health(metrics.clone()),
            &config.server.cors_origins,
        );
        let stop = stop_http.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        })
    };
    let stop_monitor = CancellationToken::new();
    let monitor = tokio::spawn(crate::server::metrics::monitor(
        metrics.clone(),
        conn.clone(),
        config.postgres.slot.clone(),
        stop_monitor.clone(),
    ));
    tracing::info!(%addr, stream = %config.cluster.stream, "relay: metrics listening");
    on_ready(addr);

    let (items_tx, items_rx) = mpsc::channel(config.limits.pipeline_capacity);
    let stop_publish = CancellationToken::new();
    let publisher = tokio::spawn(crate::cluster::publish::run(
        js,
        config.cluster.clone(),
        items_rx,
        progress.clone(),
        stats.clone(),
        stop_publish.clone(),
    ));
    let leader_watch = {
        let (stream, stats, stop) = (stream.clone(), stats.clone(), stop_monitor.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let leads = stream.connected.load(Ordering::Acquire);
                stats.leader.store(i64::from(leads), Ordering::Relaxed);
            }
        })
    };
    let opts = ReplicationOptions {
        conn: conn.clone(),
        slot: config.postgres.slot.clone(),
        publication: config.postgres.publication.clone(),
        create_slot: config.postgres.create_slot,
        temporary: false,
        start_lsn: None,
        retry_definite_errors: true,
    };
    let result = lead_or_wait(opts, items_tx, progress, stream, &shutdown).await;
    // The session ended (shutdown: after its final status update); the publisher
    // finishes what is in flight, under a deadline.
    let mut publisher = publisher;
    if tokio::time::timeout(PUBLISH_DRAIN, &mut publisher)
        .await
        .is_err()
    {
        tracing::warn!("JetStream did not acknowledge everything in flight within {PUBLISH_DRAIN:?}; the slot resends it on the next start");
        stop_publish.cancel();
        let _ = publisher.await;
    }
    stop_monitor.cancel();
    stop_http.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), http).await;
    let _ = monitor.await;
    let _ = leader_watch.await;
    result.map_err(Into::into)
}

/// Leads when the slot is free, waits as standby while another connection holds
/// it; returns after shutdown (Ok) or a failure that retrying cannot fix.
async fn lead_or_wait(
    opts: ReplicationOptions,
    items: mpsc::Sender<crate::decode::event::Item>,
    progress: Arc<Progress>,
    stream: Arc<StreamState>,
    shutdown: &CancellationToken,
) -> Result<(), ReplicationError> {
    let mut said_standby = false;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        match slot_holder(&opts).await {
            Ok(Some(pid)) => {
                if !said_standby {
                    tracing::info!(slot = %opts.slot, pid, "standby: the slot is held by another connection (a leading relay); taking over when it is free");
                    said_standby = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(STANDBY_POLL) => {}
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("relay: cannot read the slot's state: {e}; trying again");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(STANDBY_POLL) => {}
                }
                continue;
            }
        }
        if said_standby {
            tracing::info!(slot = %opts.slot, "the slot is free: this relay leads");
            said_standby = false;
        }
        let r = session::run(
            opts.clone(),
            items.clone(),
            progress.clone(),
            stream.clone(),
            shutdown.child_token(),
        )
        .await;
        match r {
            Ok(()) => return Ok(()),
            // Another relay took the slot between the look and the start.
            Err(e) if e.to_string().contains("already in use") => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The server PID of the connection streaming the slot, if one does.
async fn slot_holder(opts: &ReplicationOptions) -> Result<Option<i32>, ReplicationError> {
    let c = crate::source::tls::connect_sql(&opts.conn).await?;
    let row = tokio::time::timeout(
        Duration::from_secs(10),
        c.query_opt(
            "select active_pid from pg_catalog.pg_replication_slots where slot_name = $1",
            &[&opts.slot],
        ),
    )
    .await
    .map_err(|_| ReplicationError::Protocol("reading pg_replication_slots timed out".into()))?
    .map_err(ReplicationError::Sql)?;
    Ok(row.and_then(|r| r.get::<_, Option<i32>>(0)))
}
