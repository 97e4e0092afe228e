//! The building blocks of `walcast demo`: a throwaway PostgreSQL, a bakery, and
//! traffic.
//!
//! - [`Cluster`] (the throwaway-cluster harness in [`crate::testing`], shared
//!   with the integration tests and the benchmark driver) makes a PostgreSQL
//!   cluster from the server binaries on this machine (`initdb`, `pg_ctl`) in a
//!   temp dir, with `wal_level = logical`, listening on a free port on 127.0.0.1
//!   only. It is stopped and its directory removed when the value is dropped —
//!   `walcast demo` drops it when its shutdown token fires on Ctrl-C or SIGTERM —
//!   and, should the process die without running destructors (SIGKILL, abort), a
//!   small watchdog process does the same once walcast has gone.
//! - [`load_schema`] loads `sql/demo/schema.sql` (the bakery: ingredients,
//!   recipes, customers, orders and the triggers that tie them together) and
//!   `sql/demo/traffic.sql` (`demo.tick()`), and creates the replication slot.
//!   Both files are compiled into the binary, so the demo runs from any
//!   directory.
//! - [`traffic`] calls `demo.tick()` at a steady rate until shutdown.
//! - [`next_steps`] / [`print_next_steps`] tell the user what to try next.
//!
//! PostgreSQL refuses to run as root: when walcast runs as root, the server
//! binaries run as the `postgres` user through `runuser -u postgres --`.
//! The cluster trusts connections from 127.0.0.1: it holds only demo data, and
//! lives only as long as the demo.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, PgConnInfo};
use crate::source::error::{ErrorKind, PgError};
use crate::testing::{Cluster, ClusterError};

/// The bakery schema, its triggers, the publication and the seed data.
pub const SCHEMA_SQL: &str = include_str!("../../sql/demo/schema.sql");

/// `demo.tick()` and the steps it chooses from.
pub const TRAFFIC_SQL: &str = include_str!("../../sql/demo/traffic.sql");

/// The database the demo creates in its [`Cluster`].
pub const DEMO_DATABASE: &str = "bakery";

/// The publication created by `schema.sql`; also walcast's default.
pub const DEMO_PUBLICATION: &str = "walcast";

/// The slot [`load_schema`] creates; also walcast's default.
pub const DEMO_SLOT: &str = "walcast";

/// Two business steps a second: fast enough to watch things happen, slow enough
/// to read them.
pub const DEFAULT_TICKS_PER_SECOND: f64 = 2.0;

/// The fastest [`traffic`] accepts. More is a load test, not a demo.
pub const MAX_TICKS_PER_SECOND: f64 = 1000.0;

/// What to run to get PostgreSQL's server binaries.
pub use crate::testing::INSTALL_HELP;

/// Why the demo could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The throwaway cluster ([`crate::testing::Cluster`]) could not be made or used.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("{0}")]
    Setup(String),
    #[error("invalid demo traffic rate {0}: give ticks per second, more than 0 and at most {MAX_TICKS_PER_SECOND}")]
    Rate(f64),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Connect(#[from] PgError),
    /// Boxed: a serve error is large, and this enum is returned often.
    #[error(transparent)]
    Serve(Box<crate::daemon::serve::ServeError>),
    #[error("{0} (a demo task stopped unexpectedly)")]
    Task(String),
    #[error("{context}: {source}")]
    Sql {
        context: &'static str,
        #[source]
        source: Box<PgError>,
    },
}

impl From<crate::daemon::serve::ServeError> for DemoError {
    fn from(e: crate::daemon::serve::ServeError) -> Self {
        DemoError::Serve(Box::new(e))
    }
}

impl DemoError {
    fn sql(context: &'static str, e: tokio_postgres::Error) -> DemoError {
        DemoError::Sql {
            context,
            source: Box::new(PgError::from_sql(e)),
        }
    }

    /// What this error means, where the demo knows: a bad flag or a missing
    /// PostgreSQL installation is the user's to fix, a PostgreSQL error has the kind
    /// of its [`PgError`]. `None` for the demo's own failures (and for `Serve`,
    /// which the caller looks into).
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            DemoError::Rate(_)
            | DemoError::Config(_)
            | DemoError::Cluster(
                ClusterError::PostgresNotFound
                | ClusterError::BadBindir(_)
                | ClusterError::NoPostgresUser,
            ) => Some(ErrorKind::Usage),
            DemoError::Cluster(ClusterError::Sql { source, .. }) => {
                Some(source.as_db_error().map_or(ErrorKind::Transient, |db| {
                    ErrorKind::of_sqlstate(db.code().code())
                }))
            }
            DemoError::Connect(e) => Some(e.kind()),
            DemoError::Sql { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Schema and traffic

async fn connect(url: &str) -> Result<tokio_postgres::Client, DemoError> {
    let info = PgConnInfo::parse(url)?;
    Ok(crate::source::tls::connect_sql(&info).await?)
}

/// Loads the bakery (`schema.sql`) and its traffic functions (`traffic.sql`) into
/// the database at `url`, then creates the logical replication slot
/// [`DEMO_SLOT`] (pgoutput) unless it exists. Safe to run again.
pub async fn load_schema(url: &str) -> Result<(), DemoError> {
    let client = connect(url).await?;
    let wal_level: String = client
        .query_one("select current_setting('wal_level')", &[])
        .await
        .map_err(|e| DemoError::sql("cannot read wal_level", e))?
        .get(0);
    if wal_level != "logical" {
        return Err(DemoError::Setup(format!(
            "{} (it is '{wal_level}' now)",
            crate::source::slot::WAL_LEVEL_HELP
        )));
    }
    // The schema's `drop … if exists` notices are noise in the demo's output.
    client
        .batch_execute("set client_min_messages = warning")
        .await
        .map_err(|e| DemoError::sql("cannot set client_min_messages", e))?;
    client
        .batch_execute(SCHEMA_SQL)
        .await
        .map_err(|e| DemoError::sql("cannot load the demo schema (sql/demo/schema.sql)", e))?;
    client.batch_execute(TRAFFIC_SQL).await.map_err(|e| {
        DemoError::sql(
            "cannot load the demo traffic functions (sql/demo/traffic.sql)",
            e,
        )
    })?;
    client
        .execute(
            "select pg_create_logical_replication_slot($1, 'pgoutput') \
             where not exists (select 1 from pg_replication_slots where slot_name = $1)",
            &[&DEMO_SLOT],
        )
        .await
        .map_err(|e| DemoError::sql("cannot create the demo replication slot", e))?;
    Ok(())
}

/// Calls `demo.tick()` `rate_per_sec` times a second until `shutdown` fires;
/// returns how many ticks ran. A tick that fails inside the database (say, two
/// generators raced for one order) is logged and skipped; a lost connection or a
/// missing `demo.tick()` ends traffic with an error.
pub async fn traffic(
    url: &str,
    rate_per_sec: f64,
    shutdown: CancellationToken,
) -> Result<u64, DemoError> {
    let period = tick_period(rate_per_sec)?;
    let client = connect(url).await?;
    let tick = client
        .prepare("select demo.tick()")
        .await
        .map_err(|e| DemoError::sql("demo.tick() is missing; load the demo schema first", e))?;
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => {}
        }
        let result = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = client.query_one(&tick, &[]) => r,
        };
        match result {
            Ok(row) => {
                ticks += 1;
                let step: Option<String> = row.get(0);
                tracing::debug!(
                    tick = ticks,
                    step = step.as_deref().unwrap_or(""),
                    "demo tick"
                );
            }
            Err(e) if e.is_closed() || e.as_db_error().is_none() => {
                return Err(DemoError::sql("demo traffic lost its connection", e));
            }
            Err(e) => {
                tracing::warn!(error = %DemoError::sql("demo tick failed", e), "skipping a demo tick");
            }
        }
    }
    Ok(ticks)
}

/// The pause between ticks for a rate, or why the rate is no good.
fn tick_period(rate_per_sec: f64) -> Result<Duration, DemoError> {
    if !rate_per_sec.is_finite() || rate_per_sec <= 0.0 || rate_per_sec > MAX_TICKS_PER_SECOND {
        return Err(DemoError::Rate(rate_per_sec));
    }
    Ok(Duration::from_secs_f64(1.0 / rate_per_sec))
}

// ---------------------------------------------------------------------------
// `walcast demo`

/// The customer whose portal the demo shows.
pub const DEMO_CUSTOMER_ID: i64 = 1;

/// How long the demo's tokens stay valid.
const DEMO_TOKEN_SECS: i64 = 7 * 24 * 3600;

/// The demo's auth: a fresh HS256 secret, row rules like a customer portal's, and
/// two tokens signed with it — staff (`service_role`, sees everything) and one
/// customer (`role: customer`, `sub` = the customer id: their own orders and
/// customer row, without the email; ingredients are public).
pub struct DemoAuth {
    pub config: crate::route::auth::AuthConfig,
    pub staff_token: String,
    pub customer_token: String,
}

impl DemoAuth {
    pub fn new() -> Result<Self, DemoError> {
        let secret = random_hex(32);
        let rule =
            |name: &str, row_filter: Option<&str>, columns: Option<&[&str]>, public: bool| {
                crate::route::auth::TableRule {
                    name: name.into(),
                    roles: if public {
                        vec![]
                    } else {
                        vec!["customer".into()]
                    },
                    row_filter: row_filter.map(str::to_string),
                    columns: columns.map(|c| c.iter().map(|s| s.to_string()).collect()),
                    public,
                }
            };
        let config = crate::route::auth::AuthConfig {
            mode: Some(crate::route::auth::AuthMode::Jwt),
            jwt_secret: Some(secret.clone()),
            tables: vec![
                rule(
                    "public.orders",
                    Some("customer_id=eq.{claims.sub}"),
                    None,
                    false,
                ),
                rule(
                    "public.customers",
                    Some("id=eq.{claims.sub}"),
                    Some(&[
                        "id",
                        "name",
                        "total_orders",
                        "total_spent",
                        "loyalty_points",
                        "last_order_at",
                    ]),
                    false,
                ),
                rule("public.ingredients", None, None, true),
                rule("public.recipes", None, None, true),
            ],
            ..crate::route::auth::AuthConfig::default()
        };
        let exp = crate::route::auth::now_unix() + DEMO_TOKEN_SECS;
        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            )
            .map_err(|e| DemoError::Setup(format!("cannot sign a demo token: {e}")))
        };
        Ok(DemoAuth {
            staff_token: sign(serde_json::json!({"role": "service_role", "exp": exp}))?,
            customer_token: sign(serde_json::json!({
                "role": "customer",
                "sub": DEMO_CUSTOMER_ID.to_string(),
                "exp": exp,
            }))?,
            config,
        })
    }
}

/// `n` random bytes as hex, from the OS (a throwaway demo secret).
fn random_hex(n: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    let filled = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok();
    if !filled {
        // No /dev/urandom: fall back to the standard library's per-process random keys.
        use std::hash::{BuildHasher, Hasher};
        for (i, chunk) in buf.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(i);
            let v = h.finish().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// What `walcast demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where `serve` listens (WebSocket, `/metrics`, `/health`). Loopback only:
    /// the demo runs without auth, and `serve` refuses other addresses then.
    pub listen: String,
    /// Business steps per second; see [`traffic`].
    pub ticks_per_second: f64,
    /// How to run walcast from another terminal, for the printed `tail` command.
    pub walcast: String,
}

/// `walcast demo`: starts a [`Cluster`], loads the bakery, runs
/// [`crate::daemon::serve::run`] on it with the traffic generator beside it, writes
/// [`next_steps`] to `out` once serve listens, and runs until `shutdown` fires.
/// Then serve stops, traffic stops, and the cluster is stopped and its
/// directory removed — also when something failed on the way.
///
/// Bad options (rate, listen address) are refused before anything starts.
pub async fn run_demo(
    options: DemoOptions,
    shutdown: CancellationToken,
    out: &mut (dyn Write + Send),
) -> Result<(), DemoError> {
    tick_period(options.ticks_per_second)?;
    let mut config = crate::config::ServeConfig::default();
    config.server.listen = options.listen.clone();
    config.postgres.slot = DEMO_SLOT.into();
    config.postgres.publication = DEMO_PUBLICATION.into();
    let auth = DemoAuth::new()?;
    config.auth = auth.config.clone();
    config.validate()?;

    let cluster = tokio::task::spawn_blocking(start_cluster)
        .await
        .map_err(|e| DemoError::Task(format!("starting PostgreSQL: {e}")))??;
    let result = if shutdown.is_cancelled() {
        Ok(())
    } else {
        serve_with_traffic(&cluster, config, &auth, &options, shutdown, out).await
    };
    let stopped = tokio::task::spawn_blocking(move || cluster.remove())
        .await
        .map_err(|e| DemoError::Task(format!("stopping PostgreSQL: {e}")))
        .and_then(|r| Ok(r?));
    if stopped.is_ok() {
        tracing::info!("demo postgres stopped and removed");
    }
    result.and(stopped)
}

/// The demo's cluster: the harness's settings, fewer senders and slots (one
/// walcast and a `tail` or two use them).
pub fn start_cluster() -> Result<Cluster, DemoError> {
    let cluster = Cluster::start_named(
        "demo",
        &[("max_wal_senders", "10"), ("max_replication_slots", "10")],
    )?;
    tracing::info!(port = cluster.port(), dir = %cluster.dir().display(), "demo postgres started");
    Ok(cluster)
}

/// The part of [`run_demo`] that needs the cluster: schema, serve and traffic. A
/// failure of either serve or traffic stops the other.
async fn serve_with_traffic(
    cluster: &Cluster,
    mut config: crate::config::ServeConfig,
    auth: &DemoAuth,
    options: &DemoOptions,
    shutdown: CancellationToken,
    out: &mut (dyn Write + Send),
) -> Result<(), DemoError> {
    let url = cluster.create_database(DEMO_DATABASE).await?;
    load_schema(&url).await?;
    config.postgres.database_url = Some(url.clone());
    // The demo's change log lives and goes with its throwaway cluster.
    if config.log.dir() == Some(std::path::Path::new(crate::config::DEFAULT_LOG_DIR)) {
        config.log.dir = Some(cluster.dir().join("walcast-log"));
    }

    let stop = shutdown.child_token();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let on_ready = |r: &crate::daemon::serve::Running| {
        let steps = NextSteps {
            walcast: &options.walcast,
            database_url: &url,
            http_addr: r.addr,
            api_key: &auth.staff_token,
            customer_token: &auth.customer_token,
            ticks_per_second: options.ticks_per_second,
        };
        if let Err(e) = print_next_steps(out, &steps) {
            tracing::warn!(error = %e, "cannot print the demo's next steps");
        }
        let _ = ready_tx.send(());
    };
    let serve = async {
        let r = crate::daemon::serve::run(config, stop.clone(), on_ready).await;
        stop.cancel();
        r
    };
    let generate = async {
        // Traffic starts once clients can connect, so the first steps are seen.
        if ready_rx.await.is_err() {
            return Ok(0);
        }
        let r = traffic(&url, options.ticks_per_second, stop.clone()).await;
        if r.is_err() {
            stop.cancel();
        }
        r
    };
    let (served, generated) = tokio::join!(serve, generate);
    served?;
    let ticks = generated?;
    tracing::info!(ticks, "demo stopped");
    Ok(())
}

// ---------------------------------------------------------------------------
// What to try next

/// What [`next_steps`] needs to know about the running demo.
#[derive(Debug, Clone)]
pub struct NextSteps<'a> {
    /// How to run walcast from another terminal, usually `walcast`.
    pub walcast: &'a str,
    /// The demo database.
    pub database_url: &'a str,
    /// Where `walcast serve` listens (WebSocket, `/metrics`, `/health`).
    pub http_addr: SocketAddr,
    /// The key a client passes as supabase-js's `supabaseKey`.
    pub api_key: &'a str,
    /// A token of customer [`DEMO_CUSTOMER_ID`], for the portal snippet.
    pub customer_token: &'a str,
    /// The traffic rate.
    pub ticks_per_second: f64,
}

/// The text `walcast demo` prints once everything runs: a `walcast tail` command
/// for another terminal, a supabase-js snippet subscribing to `orders` and to
/// low-stock ingredients, the metrics URL, and how to stop.
pub fn next_steps(s: &NextSteps<'_>) -> String {
    let base = format!("http://{}", reachable(s.http_addr));
    let url = shell_quote(s.database_url);
    let tail = format!(
        "{} tail --database-url {url} --slot walcast_tail --temporary",
        shell_quote(s.walcast)
    );
    let key = js_string(s.api_key);
    let customer_key = js_string(s.customer_token);
    let customer = DEMO_CUSTOMER_ID;
    let base_js = js_string(&base);
    format!(
        r#"walcast demo: a bakery in a throwaway PostgreSQL, {rate} business steps a second
(orders placed, confirmed, baked, delivered; ingredients consumed and restocked).

Watch the raw change stream in another terminal:

    {tail}

Subscribe from JavaScript: save this as bakery.mjs, `npm install @supabase/supabase-js`,
then `node bakery.mjs` (Node 22 or newer; older Node needs the `ws` package, passed
as `realtime: {{ transport: WebSocket }}` in createClient's options):

    import {{ createClient }} from '@supabase/supabase-js'

    const supabase = createClient({base_js}, {key})

    supabase
      .channel('bakery')
      .on('postgres_changes', {{ event: '*', schema: 'public', table: 'orders' }},
        (change) => console.log('order', change.eventType, change.new.id, change.new.status, change.new.total))
      .on('postgres_changes', {{ event: '*', schema: 'public', table: 'ingredients', filter: 'stock=lt.20' }},
        (change) => console.log('low stock:', change.new.name, change.new.stock, change.new.unit))
      .subscribe((status) => console.log('channel:', status))

That key is a staff token (role service_role: every table, row and column). The demo
runs with JWT auth and customer-portal rules: customer {customer} sees only their own
orders and their own customer row (without the email). Their portal:

    const portal = createClient({base_js}, {customer_key})
    portal
      .channel('my-orders')
      .on('postgres_changes', {{ event: '*', schema: 'public', table: 'orders' }},
        (change) => console.log('my order', change.new.id, change.new.status))
      .subscribe()

Status:   {base}/status?apikey={status_key}
Metrics:  {base}/metrics
Health:   {base}/health
Database: psql {url}
          (try `select demo.tick('confirm');` or `update ingredients set stock = 5 where name = 'flour';`)

Ctrl-C stops the demo and removes its database.
"#,
        rate = s.ticks_per_second,
        status_key = s.api_key,
    )
}

/// Writes [`next_steps`] to `out`.
pub fn print_next_steps(out: &mut dyn Write, s: &NextSteps<'_>) -> std::io::Result<()> {
    out.write_all(next_steps(s).as_bytes())?;
    out.flush()
}

/// An address a client on this machine can connect to: a wildcard bind address
/// becomes loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// Quotes a word for a POSIX shell; plain words stay as they are.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:@%+=,".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A JavaScript string literal.
fn js_string(s: &str) -> String {
    // A JSON string is a valid JavaScript string literal.
    serde_json::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_checked() {
        assert_eq!(tick_period(2.0).unwrap(), Duration::from_millis(500));
        assert_eq!(tick_period(1000.0).unwrap(), Duration::from_millis(1));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1000.5] {
            let e = tick_period(bad).unwrap_err();
            assert!(e.to_string().contains("ticks per second"), "{e}");
        }
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("walcast"), "walcast");
        assert_eq!(
            shell_quote("postgres://postgres@127.0.0.1:5/bakery?sslmode=disable"),
            "'postgres://postgres@127.0.0.1:5/bakery?sslmode=disable'"
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn wildcard_addresses_become_loopback() {
        assert_eq!(
            reachable("0.0.0.0:4000".parse().unwrap()),
            "127.0.0.1:4000".parse().unwrap()
        );
        assert_eq!(
            reachable("[::]:4000".parse().unwrap()),
            "[::1]:4000".parse().unwrap()
        );
        assert_eq!(
            reachable("10.1.2.3:80".parse().unwrap()),
            "10.1.2.3:80".parse().unwrap()
        );
    }

    #[test]
    fn next_steps_has_tail_snippet_and_metrics() {
        let text = next_steps(&NextSteps {
            walcast: "walcast",
            database_url: "postgres://postgres@127.0.0.1:5433/bakery?sslmode=disable",
            http_addr: "0.0.0.0:4000".parse().unwrap(),
            api_key: "demo-'key",
            customer_token: "cust-token",
            ticks_per_second: 2.0,
        });
        assert!(text.contains(
            "walcast tail --database-url 'postgres://postgres@127.0.0.1:5433/bakery?sslmode=disable' --slot walcast_tail --temporary"
        ), "{text}");
        assert!(
            text.contains(r#"createClient("http://127.0.0.1:4000", "demo-'key")"#),
            "{text}"
        );
        assert!(text.contains("table: 'orders'"), "{text}");
        assert!(
            text.contains("table: 'ingredients', filter: 'stock=lt.20'"),
            "{text}"
        );
        assert!(text.contains("http://127.0.0.1:4000/metrics"), "{text}");
        assert!(text.contains("2 business steps a second"), "{text}");
        // The tail command goes to a slot of its own: the demo's slot is busy.
        assert!(!text.contains(&format!("--slot {DEMO_SLOT} ")), "{text}");
    }

    #[test]
    fn embedded_sql_is_complete() {
        assert!(SCHEMA_SQL.contains("create publication walcast"));
        assert!(TRAFFIC_SQL.contains("function demo.tick("));
        for table in [
            "ingredients",
            "recipes",
            "recipe_ingredients",
            "customers",
            "orders",
            "order_items",
            "supplier_deliveries",
            "inventory_logs",
        ] {
            assert!(
                SCHEMA_SQL.contains(&format!("alter table public.{table} ")),
                "{table} lacks replica identity full"
            );
        }
    }
}
