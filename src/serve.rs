//! `walcast serve`: the daemon. Wires the replication stream, the hub and the
//! WebSocket server together and runs them until shutdown.
//!
//! Shutdown order (SIGTERM/SIGINT): stop accepting connections, stop reading the
//! slot, let the hub drain what it was handed and confirm it, send the final
//! status update, close sockets with 1001, and wait for tasks under a deadline.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broadcast::{BroadcastStats, Broadcaster};
use crate::catalog::Catalog;
use crate::config::{ConfigError, PgConnInfo, ServeConfig};
use crate::event::DbMessage;
use crate::hub::{Hub, HubStats};
use crate::metrics::{Metrics, MetricsError, Sources};
use crate::replication::{self, Progress, ReplicationError, ReplicationOptions, StreamState};
use crate::value::RenderOptions;
use crate::ws::{self, Shared, WsStats};

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
    Catalog(#[from] crate::catalog::CatalogError),
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
    let auth = Arc::new(crate::auth::Verifier::new(config.auth.clone()));
    auth.preload()
        .await
        .map_err(|e| ServeError::Auth(e.to_string()))?;
    match config.auth.mode {
        None => tracing::warn!(
            "no [auth] mode configured: serving without authentication, on loopback only"
        ),
        Some(crate::auth::AuthMode::None) => {
            tracing::warn!(
                "auth.mode = \"none\": any client may subscribe to every published table"
            )
        }
        Some(crate::auth::AuthMode::Jwt) => {}
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
    let monitor = tokio::spawn(crate::metrics::monitor(
        metrics.clone(),
        conn.clone(),
        config.postgres.slot.clone(),
        monitor_stop.clone(),
    ));

    // Replication stops on its own token, cancelled after the server stops accepting.
    let stop_stream = CancellationToken::new();
    let repl_opts = ReplicationOptions {
        conn: conn.clone(),
        slot: config.postgres.slot.clone(),
        publication: config.postgres.publication.clone(),
        create_slot: config.postgres.create_slot,
        temporary: false,
        start_lsn: None,
        retry_definite_errors: true,
    };
    let repl = tokio::spawn(replication::run(
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
    let status_feed = Arc::new(crate::status::Feed::default());
    let hub = {
        let b = broadcast.clone();
        let hub = Hub::new(render, hub_stats.clone())
            .with_message_hook(Arc::new(move |m: &DbMessage| b.on_db_message(m)))
            .with_change_hook(status_feed.hook());
        tokio::spawn(hub.run(items_rx, cmd_rx, progress))
    };

    // Stopped first on shutdown: stopping is not an outage to announce.
    let notices_stop = CancellationToken::new();
    let notices = tokio::spawn(crate::notice::run(
        metrics.clone(),
        stream.clone(),
        cmd_tx.clone(),
        Duration::from_secs(config.server.outage_notice_secs),
        notices_stop.clone(),
    ));
    let sessions_stop = CancellationToken::new();
    // Subscriptions of dropped or unpublished tables are closed with a reason.
    tokio::spawn(crate::catalog::watch_published(
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
    let status = crate::status::Status::start(crate::status::StatusOptions {
        metrics: metrics.clone(),
        hub: shared.hub.clone(),
        auth: shared.auth.clone(),
        config: (*config).clone(),
        conn,
        feed: status_feed,
        catalog: shared.catalog.clone(),
        stop: sessions_stop.clone(),
    });
    let app = ws::router(shared.clone())
        .merge(crate::metrics::routes(metrics.clone()))
        .merge(crate::status::routes(status));
    let app = ws::http::finish(app, &config.server.cors_origins);
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
        sessions_stop.cancel(); // the status sampler
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
        tokio::spawn(ws::listener::serve(
            listener,
            app,
            ws::listener::ListenOptions::of(&config.server),
            ws_stats.clone(),
            stop,
        ))
    };

    let metrics_http = metrics_listener.map(|l| {
        let stop = http_stop.clone();
        if let Some(a) = metrics_addr {
            tracing::info!(addr = %a, "metrics listening");
        }
        let app = ws::http::finish(
            crate::metrics::routes_with_health(metrics.clone()),
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
