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
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ConfigError, PgConnInfo, ServeConfig};
use crate::decode::event::DbMessage;
use crate::decode::value::RenderOptions;
use crate::deliver::broadcast::{BroadcastStats, Broadcaster};
use crate::deliver::socket::{Shared, WsStats};
use crate::route::hub::{Hub, HubCommand, HubStats};
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
    #[error("cannot start the change log in {dir}: {source}")]
    Log { dir: String, source: std::io::Error },
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
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
/// `on_ready` is called once the listener is bound and the stream is up (or the
/// startup wait ran out).
pub async fn run(
    config: ServeConfig,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(&Running),
) -> Result<(), ServeError> {
    let Some(checked) = Checked::new(config, &shutdown).await? else {
        tracing::info!("shutdown requested while connecting to PostgreSQL; stopping");
        return Ok(());
    };
    let mut pipeline = Pipeline::start(checked)?;
    if !pipeline.wait_for_stream(&shutdown).await {
        return pipeline.stop_failed_start().await;
    }
    on_ready(&pipeline.running());
    pipeline.serve_http();
    let result = pipeline.wait(&shutdown).await;
    pipeline.shutdown(result).await
}

/// Step 1: what must be right before anything starts — the config, PostgreSQL
/// reachable with the publication, the auth keys, both listeners bound.
struct Checked {
    config: ServeConfig,
    conn: PgConnInfo,
    catalog: Arc<Catalog>,
    auth: Arc<crate::route::auth::Verifier>,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    metrics_listener: Option<tokio::net::TcpListener>,
    /// A gateway (`serve --cluster`): its NATS connection.
    nats: Option<async_nats::Client>,
}

impl Checked {
    /// `None`: shutdown was requested meanwhile.
    async fn new(
        config: ServeConfig,
        shutdown: &CancellationToken,
    ) -> Result<Option<Checked>, ServeError> {
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
            _ = shutdown.cancelled() => return Ok(None),
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
        let listener = bind(&config.server.listen).await?;
        let addr = listener.local_addr().map_err(|source| ServeError::Listen {
            addr: config.server.listen.clone(),
            source,
        })?;
        let metrics_listener = match &config.server.metrics_listen {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let nats = if config.cluster.gateway {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(None),
                c = crate::cluster::connect(&config.cluster, "walcast-gateway") => Some(c?),
            }
        } else {
            None
        };
        Ok(Some(Checked {
            nats,
            config,
            conn,
            catalog,
            auth,
            listener,
            addr,
            metrics_listener,
        }))
    }
}

async fn bind(addr: &str) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Listen {
            addr: addr.to_string(),
            source,
        })
}

/// The running stages, each with its own stop token, in the order they stop.
/// Every task runs on [`Pipeline::tasks`] (sessions on their own tracker), so
/// shutdown waits for all of them.
struct Pipeline {
    config: Arc<ServeConfig>,
    /// The status page's sampler and feed.
    status: Arc<crate::server::status::Status>,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    listener: Option<tokio::net::TcpListener>,
    metrics_listener: Option<tokio::net::TcpListener>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    stream: Arc<StreamState>,
    hub_stats: Arc<HubStats>,
    ws_stats: Arc<WsStats>,
    broadcast: Arc<Broadcaster>,
    /// Background tasks (everything but the sessions).
    tasks: TaskTracker,
    /// The WebSocket sessions.
    sessions: TaskTracker,
    repl: JoinHandle<Result<(), ReplicationError>>,
    /// What replication returned, once it ended.
    ended: Option<ReplResult>,
    hub: JoinHandle<()>,
    http: Vec<JoinHandle<()>>,
    stop_notices: CancellationToken,
    stop_http: CancellationToken,
    stop_stream: CancellationToken,
    stop_sessions: CancellationToken,
    stop_monitor: CancellationToken,
}

impl Pipeline {
    /// Step 2: starts replication, the hub, broadcast, metrics, notices and the
    /// publication watch; nothing is served yet.
    fn start(c: Checked) -> Result<Pipeline, ServeError> {
        let config = Arc::new(c.config);
        let render = RenderOptions {
            big_numbers_as_strings: config.values.big_numbers_as_strings,
        };
        let (items_tx, items_rx) = mpsc::channel(config.limits.pipeline_capacity);
        let (cmd_tx, cmd_rx) = mpsc::channel(HUB_COMMAND_CAPACITY);
        // With a change log, the hub hands each item to the log stage once it has
        // routed it, and nothing is confirmed to PostgreSQL before the log holds it.
        let (progress, log_tap, log) = match config.log.dir() {
            None => (Arc::new(Progress::default()), None, None),
            Some(dir) => {
                let progress = Arc::new(Progress::gated_by_log());
                // Batches of up to LOG_BATCH items: as many items as the pipeline holds.
                let (log_tx, log_rx) = mpsc::channel(
                    (config.limits.pipeline_capacity / crate::route::hub::LOG_BATCH).max(2),
                );
                let opts = crate::changelog::LogOptions::new(
                    dir,
                    config.log.max_bytes,
                    Duration::from_secs(config.log.max_age_secs),
                );
                let (handle, _thread) =
                    crate::changelog::stage::spawn(opts, log_rx, progress.clone()).map_err(
                        |source| ServeError::Log {
                            dir: dir.display().to_string(),
                            source,
                        },
                    )?;
                let tap = crate::route::hub::LogTap::new(log_tx, handle.routed_mark());
                (progress, Some(tap), Some(handle))
            }
        };
        let stream = Arc::new(StreamState::default());
        let hub_stats = Arc::new(HubStats::default());
        let ws_stats = Arc::new(WsStats::default());
        let replay_stats = Arc::new(crate::deliver::replay::ReplayStats::default());
        let broadcast = Arc::new(Broadcaster::new(
            config.broadcast.clone(),
            config.presence.clone(),
            config.channels.clone(),
        ));
        let tasks = TaskTracker::new();
        // RLS mode: the database's policies (route::rls); a failed check closes
        // its class's channels through the hub.
        let rls = config.auth.rls_on().then(|| {
            let rls = crate::route::rls::Rls::new(
                c.conn.clone(),
                crate::route::rls::RlsSettings {
                    pool: config.auth.rls_pool,
                    timeout: Duration::from_millis(config.auth.rls_check_timeout_ms),
                    queue: config.auth.rls_queue,
                    compile: config.auth.rls_compile,
                    publication: Some(config.postgres.publication.clone()),
                },
            );
            let (hub, failures) = (cmd_tx.clone(), rls.failures());
            // Not tracked: it waits for failures for ever and ends with the
            // runtime (the hub no longer listening ends it sooner).
            tokio::spawn(async move {
                loop {
                    for (class, message) in failures.next().await {
                        if hub
                            .send(HubCommand::RlsFailed { class, message })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
            rls
        });
        let metrics = Arc::new(Metrics::new(
            Sources {
                stream: stream.clone(),
                progress: progress.clone(),
                hub: hub_stats.clone(),
                ws: ws_stats.clone(),
                broadcast: broadcast.stats(),
                log: log.clone(),
                replay: replay_stats.clone(),
                rls: rls.clone(),
            },
            config.health.clone(),
        )?);
        let stop_monitor = CancellationToken::new();
        tasks.spawn(crate::server::metrics::monitor(
            metrics.clone(),
            c.conn.clone(),
            config.postgres.slot.clone(),
            stop_monitor.clone(),
        ));
        // Replication stops on its own token, cancelled after the server stops accepting.
        let stop_stream = CancellationToken::new();
        let repl = match c.nats.clone() {
            // A gateway: the relay's stream instead of the slot.
            Some(client) => {
                let stats = Arc::new(crate::cluster::ClusterStats::default());
                let connected = {
                    let c = client.clone();
                    Box::new(move || {
                        c.connection_state() == async_nats::connection::State::Connected
                    })
                };
                metrics.register(Box::new(
                    crate::cluster::stats::StatsCollector::new(
                        stats.clone(),
                        crate::cluster::stats::Role::Gateway,
                        connected,
                    )
                    .map_err(MetricsError::from)?,
                ))?;
                tasks.spawn(crate::cluster::consume::run(
                    client,
                    config.cluster.clone(),
                    items_tx,
                    stream.clone(),
                    stats,
                    stop_stream.clone(),
                ))
            }
            None => tasks.spawn(session::run(
                ReplicationOptions {
                    conn: c.conn.clone(),
                    slot: config.postgres.slot.clone(),
                    publication: config.postgres.publication.clone(),
                    create_slot: config.postgres.create_slot,
                    temporary: false,
                    start_lsn: None,
                    retry_definite_errors: true,
                },
                items_tx,
                progress.clone(),
                stream.clone(),
                stop_stream.clone(),
            )),
        };
        // The status page's feed of recent changes (nothing when nobody watches).
        let status_feed = Arc::new(crate::server::status::Feed::default());
        let hub = {
            let b = broadcast.clone();
            let mut hub = Hub::new(render, hub_stats.clone())
                .with_message_hook(Arc::new(move |m: &DbMessage| b.on_db_message(m)))
                .with_change_hook(status_feed.hook());
            if let Some(r) = &rls {
                hub = hub.with_rls_gate(r.gate());
            }
            tasks.spawn(hub.run(items_rx, cmd_rx, progress, log_tap))
        };
        // Stopped first on shutdown: stopping is not an outage to announce.
        let stop_notices = CancellationToken::new();
        tasks.spawn(crate::daemon::notice::run(
            metrics.clone(),
            stream.clone(),
            cmd_tx.clone(),
            Duration::from_secs(config.server.outage_notice_secs),
            stop_notices.clone(),
        ));
        let stop_sessions = CancellationToken::new();
        // Subscriptions of dropped or unpublished tables are closed with a reason.
        tasks.spawn(watch_published(
            c.catalog.clone(),
            cmd_tx.clone(),
            stop_sessions.clone(),
        ));
        if let Some(r) = &rls {
            tasks.spawn(r.clone().poll(
                Duration::from_millis(config.auth.rls_poll_ms),
                stop_sessions.clone(),
            ));
        }
        // A gateway: client broadcasts cross to the other gateways.
        if let Some(client) = c.nats.clone() {
            tasks.spawn(crate::daemon::peers::run(
                client.clone(),
                config.cluster.subject_prefix.clone(),
                broadcast.clone(),
                stop_sessions.clone(),
            ));
            // And presence.
            tasks.spawn(crate::daemon::peer_presence::run(
                client,
                config.cluster.subject_prefix.clone(),
                broadcast.clone(),
                crate::daemon::peer_presence::PresenceMetrics::register(&metrics)?,
                stop_sessions.clone(),
            ));
        }
        let sessions = TaskTracker::new();
        let shared = Arc::new(Shared {
            hub: cmd_tx,
            auth: c.auth,
            broadcast: broadcast.clone(),
            catalog: c.catalog,
            config: config.clone(),
            stats: ws_stats.clone(),
            next_id: AtomicU64::new(0),
            shutdown: stop_sessions.clone(),
            tracker: sessions.clone(),
            log: log.clone(),
            replay: replay_stats,
            rls,
            working: tokio::sync::Semaphore::new(crate::deliver::socket::MESSAGES_AT_ONCE),
        });
        let status = crate::server::status::Status::start(crate::server::status::StatusOptions {
            metrics: metrics.clone(),
            hub: shared.hub.clone(),
            auth: shared.auth.clone(),
            config: (*config).clone(),
            conn: c.conn,
            feed: status_feed,
            catalog: shared.catalog.clone(),
            stop: stop_sessions.clone(),
        });
        Ok(Pipeline {
            status,
            config,
            addr: c.addr,
            metrics_addr: c
                .metrics_listener
                .as_ref()
                .and_then(|l| l.local_addr().ok()),
            listener: Some(c.listener),
            metrics_listener: c.metrics_listener,
            shared,
            metrics,
            stream,
            hub_stats,
            ws_stats,
            broadcast,
            tasks,
            sessions,
            repl,
            ended: None,
            hub,
            http: Vec::new(),
            stop_notices,
            stop_http: CancellationToken::new(),
            stop_stream,
            stop_sessions,
            stop_monitor,
        })
    }

    /// Step 3: waits until the slot is streaming (so a slot created at startup
    /// exists before the first client can write), or for [`STARTUP_STREAM_WAIT`]
    /// so `/health` answers while PostgreSQL is unreachable. False when
    /// replication already ended (it failed for good).
    async fn wait_for_stream(&mut self, shutdown: &CancellationToken) -> bool {
        let stream = self.stream.clone();
        tokio::select! {
            _ = stream.until_connected() => true,
            _ = tokio::time::sleep(STARTUP_STREAM_WAIT) => true,
            _ = shutdown.cancelled() => true,
            // Replication ended (it failed for good): kept for the caller.
            r = &mut self.repl => {
                self.ended = Some(r);
                false
            }
        }
    }

    fn running(&self) -> Running {
        Running {
            addr: self.addr,
            hub_stats: self.hub_stats.clone(),
            ws_stats: self.ws_stats.clone(),
            stream: self.stream.clone(),
            metrics: self.metrics.clone(),
            metrics_addr: self.metrics_addr,
            broadcast_stats: self.broadcast.stats(),
        }
    }

    /// Step 4: serves HTTP and WebSocket, and the metrics listener if configured.
    fn serve_http(&mut self) {
        let app = crate::server::router::router(self.shared.clone())
            .merge(crate::server::metrics::routes(self.metrics.clone()))
            .merge(crate::server::status::routes(self.status.clone()));
        let app = crate::server::http::finish(app, &self.config.server.cors_origins);
        tracing::info!(addr = %self.addr, "listening");
        if let Some(listener) = self.listener.take() {
            // Connection limits and the request timeout (slowloris) are applied here.
            self.http
                .push(self.tasks.spawn(crate::server::listener::serve(
                    listener,
                    app,
                    crate::server::listener::ListenOptions::of(&self.config.server),
                    self.ws_stats.clone(),
                    self.stop_http.clone(),
                )));
        }
        if let Some(l) = self.metrics_listener.take() {
            if let Some(a) = self.metrics_addr {
                tracing::info!(addr = %a, "metrics listening");
            }
            let app = crate::server::http::finish(
                crate::server::metrics::routes_with_health(self.metrics.clone()),
                &self.config.server.cors_origins,
            );
            let stop = self.stop_http.clone();
            self.http.push(self.tasks.spawn(async move {
                let _ = axum::serve(l, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
            }));
        }
    }

    /// Runs until shutdown is asked or replication ends for good; the
    /// replication result in the second case.
    async fn wait(&mut self, shutdown: &CancellationToken) -> Option<ReplResult> {
        if let Some(r) = self.ended.take() {
            return Some(r);
        }
        tokio::select! {
            _ = shutdown.cancelled() => None,
            r = &mut self.repl => Some(r),
        }
    }

    /// Replication ended before anything was served: stop the rest, return why.
    async fn stop_failed_start(mut self) -> Result<(), ServeError> {
        self.stop_notices.cancel();
        self.stop_monitor.cancel();
        self.stop_stream.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.hub).await;
        let result = match self.ended.take() {
            Some(r) => r,
            None => (&mut self.repl).await,
        };
        self.stop_sessions.cancel();
        self.finish_tasks().await;
        outcome(result)
    }

    /// Step 5, the shutdown order: stop accepting and announcing; stop reading
    /// the slot while the hub drains and confirms (final status update); close
    /// sockets with 1001 under the grace period; then the listeners and the
    /// monitor.
    async fn shutdown(mut self, repl: Option<ReplResult>) -> Result<(), ServeError> {
        // 1. Stop accepting.
        self.stop_notices.cancel();
        self.stop_http.cancel();
        // 2. Stop reading the slot; the hub drains and confirms; final status update.
        self.stop_stream.cancel();
        let repl = match repl {
            Some(r) => r,
            None => (&mut self.repl).await,
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.hub).await;
        // 3. Close sockets with 1001 and wait under a deadline.
        self.stop_sessions.cancel();
        self.sessions.close();
        let grace = Duration::from_secs(self.config.server.shutdown_grace_secs);
        if tokio::time::timeout(grace, self.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close within the grace period");
        }
        for h in std::mem::take(&mut self.http) {
            let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
        }
        // 4. The monitor last: metrics stay readable until the end.
        self.stop_monitor.cancel();
        self.finish_tasks().await;
        outcome(repl)
    }

    /// Waits (bounded) for every background task to end.
    async fn finish_tasks(&self) {
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some background tasks did not stop within 5 s");
        }
    }
}

type ReplResult = Result<Result<(), ReplicationError>, tokio::task::JoinError>;

fn outcome(r: ReplResult) -> Result<(), ServeError> {
    match r {
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
        // A read that hangs (PostgreSQL accepting and never answering) must not
        // hold up shutdown.
        let rels = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = catalog.published_relations() => r,
        };
        let Ok(rels) = rels else {
            continue;
        };
        let relids = rels.into_iter().map(|(id, _, _)| id).collect();
        let cmd = crate::route::hub::HubCommand::Published { relids, read_at };
        if hub.send(cmd).await.is_err() {
            return;
        }
    }
}
