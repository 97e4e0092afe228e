//! `walcast serve`: the daemon. Wires the replication stream, the hub and the
//! WebSocket server together and runs them until shutdown.
//!
//! Shutdown order (SIGTERM/SIGINT): stop accepting connections, stop reading the
//! slot, let the hub drain what it was handed and confirm it, send the final
//! status update, close sockets with 1001, and wait for tasks under a deadline.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ConfigError, PgConnInfo, ServeConfig};
use crate::decode::event::DbMessage;
use crate::decode::value::RenderOptions;
use crate::deliver::broadcast::{BroadcastStats, Broadcaster};
use crate::deliver::socket::{Shared, WsStats};
use crate::route::hub::{Hub, HubStats};
use crate::server::metrics::{Metrics, MetricsError, Sources};
use crate::source::catalog::Catalog;
use crate::source::session::{self, Progress, ReplicationError, ReplicationOptions, StreamState};

/// How long startup waits for the replication stream before serving anyway.
const STARTUP_STREAM_WAIT: Duration = Duration::from_secs(30);

/// Hub commands buffered from sessions.
const HUB_COMMAND_CAPACITY: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("no database URL: pass --database-url, set DATABASE_URL, or set postgres.database_url in the config file")]
    NoDatabaseUrl,
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("auth configuration: {0}")]
    Auth(String),
    #[error("{0}")]
    Catalog(#[from] crate::source::catalog::CatalogError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// Everything running, for callers (tests, the demo) that need the address or stats.
pub struct Running {
    pub addr: SocketAddr,
    pub hub_stats: Arc<HubStats>,
    pub ws_stats: Arc<WsStats>,
    pub stream: Arc<StreamState>,
    pub metrics: Arc<Metrics>,
    /// The separate metrics listener (`server.metrics_listen`), when configured.
    pub metrics_addr: Option<SocketAddr>,
    pub broadcast_stats: Arc<BroadcastStats>,
}

/// Runs the daemon until `shutdown` fires or replication fails for good.
/// `on_ready` is called once the listener is bound.
pub async fn run(
    config: ServeConfig,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(&Running),
) -> Result<(), ServeError> {
    config.validate()?;
    let url = config
        .postgres
        .database_url
        .clone()
        .ok_or(ServeError::NoDatabaseUrl)?;
    let conn = PgConnInfo::parse(&url)?;
    let catalog = Arc::new(Catalog::new(
        conn.clone(),
        config.postgres.publication.clone(),
    ));
    // PostgreSQL may accept the connection and never answer: the check has a
    // timeout, and SIGTERM during it stops at once.
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            tracing::info!("shutdown requested while connecting to PostgreSQL; stopping");
            return Ok(());
        }
        r = catalog.check() => r?,
    }
    let auth = Arc::new(crate::route::auth::Verifier::new(config.auth.clone()));
    auth.preload()
        .await
        .map_err(|e| ServeError::Auth(e.to_string()))?;
    match config.auth.mode {
        None => tracing::warn!(
            "no [auth] mode configured: serving without authentication, on loopback only"
        ),
        Some(crate::route::auth::AuthMode::None) => {
            tracing::warn!(
                "auth.mode = \"none\": any client may subscribe to every published table"
            )
        }
        Some(crate::route::auth::AuthMode::Jwt) => {}
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

    let metrics_listener =
        match &config.server.metrics_listen {
            Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(|source| {
                ServeError::Listen {
                    addr: a.clone(),
                    source,
                }
            })?),
            None => None,
        };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

    let config = Arc::new(config);
    let render = RenderOptions {
        big_numbers_as_strings: config.values.big_numbers_as_strings,
    };
    let (items_tx, items_rx) = mpsc::channel(config.limits.pipeline_capacity);
    let (cmd_tx, cmd_rx) = mpsc::channel(HUB_COMMAND_CAPACITY);
    let progress = Arc::new(Progress::default());
    let stream = Arc::new(StreamState::default());
    let hub_stats = Arc::new(HubStats::default());
    let ws_stats = Arc::new(WsStats::default());
    let tracker = TaskTracker::new();
    let metrics = Arc::new(Metrics::new(
        Sources {
            stream: stream.clone(),
            progress: progress.clone(),
            hub: hub_stats.clone(),
            ws: ws_stats.clone(),
        },
        config.health.clone(),
    )?);
    let monitor_stop = CancellationToken::new();
    let monitor = tokio::spawn(crate::server::metrics::monitor(
        metrics.clone(),
        conn.clone(),
        config.postgres.slot.clone(),
        monitor_stop.clone(),
    ));

    // Replication stops on its own token, cancelled after the server stops accepting.
    let stop_stream = CancellationToken::new();
    let repl_opts = ReplicationOptions {
        conn,
        slot: config.postgres.slot.clone(),
        publication: config.postgres.publication.clone(),
        create_slot: config.postgres.create_slot,
        temporary: false,
        start_lsn: None,
        retry_definite_errors: true,
    };
    let repl = tokio::spawn(session::run(
        repl_opts,
        items_tx,
        progress.clone(),
        stream.clone(),
        stop_stream.clone(),
    ));
    let broadcast = Arc::new(Broadcaster::new(
        config.broadcast.clone(),
        config.presence.clone(),
        config.channels.clone(),
    ));
    let hub = {
        let b = broadcast.clone();
        let hub = Hub::new(render, hub_stats.clone())
            .with_message_hook(Arc::new(move |m: &DbMessage| b.on_db_message(m)));
        tokio::spawn(hub.run(items_rx, cmd_rx, progress))
    };

    // Stopped first on shutdown: stopping is not an outage to announce.
    let notices_stop = CancellationToken::new();
    let notices = tokio::spawn(crate::daemon::notice::run(
        metrics.clone(),
        stream.clone(),
        cmd_tx.clone(),
        Duration::from_secs(config.server.outage_notice_secs),
        notices_stop.clone(),
    ));
    let sessions_stop = CancellationToken::new();
    // Subscriptions of dropped or unpublished tables are closed with a reason.
    tokio::spawn(watch_published(
        catalog.clone(),
        cmd_tx.clone(),
        sessions_stop.clone(),
    ));
    let shared = Arc::new(Shared {
        hub: cmd_tx,
        auth,
        broadcast: broadcast.clone(),
        catalog,
        config: config.clone(),
        stats: ws_stats.clone(),
        next_id: AtomicU64::new(0),
        shutdown: sessions_stop.clone(),
        tracker: tracker.clone(),
    });
    let app = crate::server::router::router(shared.clone())
        .merge(crate::server::metrics::routes(metrics.clone()));
    let app = crate::server::http::finish(app, &config.server.cors_origins);
    // Serve once the slot is streaming (so a slot created at startup exists before the
    // first client can write), or after a deadline so /health answers while PostgreSQL
    // is unreachable.
    let mut repl = repl;
    let deadline = tokio::time::Instant::now() + STARTUP_STREAM_WAIT;
    while !stream.connected.load(std::sync::atomic::Ordering::Acquire)
        && tokio::time::Instant::now() < deadline
        && !shutdown.is_cancelled()
    {
        if repl.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if repl.is_finished() {
        notices_stop.cancel();
        monitor_stop.cancel();
        let _ = monitor.await;
        let _ = notices.await;
        stop_stream.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), hub).await;
        return match (&mut repl).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(join) => {
                Err(ReplicationError::Protocol(format!("replication task failed: {join}")).into())
            }
        };
    }
    on_ready(&Running {
        addr,
        hub_stats,
        ws_stats: ws_stats.clone(),
        stream,
        metrics: metrics.clone(),
        metrics_addr,
        broadcast_stats: broadcast.stats(),
    });
    tracing::info!(%addr, "listening");

    let http_stop = CancellationToken::new();
    let http = {
        let stop = http_stop.clone();
        // Connection limits and the request timeout (slowloris) are applied here.
        tokio::spawn(crate::server::listener::serve(
            listener,
            app,
            crate::server::listener::ListenOptions::of(&config.server),
            ws_stats.clone(),
            stop,
        ))
    };

    let metrics_http = metrics_listener.map(|l| {
        let stop = http_stop.clone();
        if let Some(a) = metrics_addr {
            tracing::info!(addr = %a, "metrics listening");
        }
        let app = crate::server::http::finish(
            crate::server::metrics::routes_with_health(metrics.clone()),
            &config.server.cors_origins,
        );
        tokio::spawn(async move {
            axum::serve(l, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    });

    // Wait for shutdown, or for replication to fail for good.
    let repl_result = tokio::select! {
        _ = shutdown.cancelled() => None,
        r = &mut repl => Some(r),
    };
    // 1. Stop accepting.
    notices_stop.cancel();
    http_stop.cancel();
    // 2. Stop reading the slot; the hub drains and confirms; final status update.
    stop_stream.cancel();
    let repl_result = match repl_result {
        Some(r) => r,
        None => repl.await,
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), hub).await;
    // 3. Close sockets with 1001 and wait under a deadline.
    sessions_stop.cancel();
    tracker.close();
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("some connections did not close within the grace period");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), http).await;
    if let Some(h) = metrics_http {
        let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
    }
    monitor_stop.cancel();
    let _ = monitor.await;
    let _ = notices.await;
    drop(shared);
    match repl_result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(join) => {
            Err(ReplicationError::Protocol(format!("replication task failed: {join}")).into())
        }
    }
}

/// Polls which relations are published (every [`crate::source::catalog::PUBLISHED_POLL`]) and hands the
/// answer to the hub, which closes subscriptions of tables that were dropped or
/// left the publication. Runs until `shutdown`; a failed read is retried on the
/// next tick (the replication side reports a lost server).
async fn watch_published(
    catalog: Arc<Catalog>,
    hub: tokio::sync::mpsc::Sender<crate::route::hub::HubCommand>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(crate::source::catalog::PUBLISHED_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let read_at = Instant::now();
        let Ok(rels) = catalog.published_relations().await else {
            continue;
        };
        let relids = rels.into_iter().map(|(id, _, _)| id).collect();
        let cmd = crate::route::hub::HubCommand::Published { relids, read_at };
        if hub.send(cmd).await.is_err() {
            return;
        }
    }
}
