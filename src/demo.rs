//! The building blocks of `walcast demo`: a throwaway PostgreSQL, a bakery, and
//! traffic.
//!
//! - [`LocalCluster`] makes a PostgreSQL cluster from the server binaries on this
//!   machine (`initdb`, `pg_ctl`) in a temp dir, with `wal_level = logical`,
//!   listening on a free port on 127.0.0.1 only. It is stopped and its directory
//!   removed when the value is dropped — `walcast demo` drops it when its shutdown
//!   token fires on Ctrl-C or SIGTERM — and, should the process die without
//!   running destructors (SIGKILL, abort), a small watchdog process does the same
//!   once walcast has gone.
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
//! The cluster trusts every connection from 127.0.0.1: it holds only demo data,
//! and lives only as long as the demo.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, PgConnInfo};
use crate::replication::ReplicationError;

/// The bakery schema, its triggers, the publication and the seed data.
pub const SCHEMA_SQL: &str = include_str!("../sql/demo/schema.sql");

/// `demo.tick()` and the steps it chooses from.
pub const TRAFFIC_SQL: &str = include_str!("../sql/demo/traffic.sql");

/// The database [`LocalCluster`] users create for the demo.
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
pub const INSTALL_HELP: &str = "install the PostgreSQL server: \
     Debian/Ubuntu: `sudo apt-get install postgresql`; \
     Fedora: `sudo dnf install postgresql-server`; \
     macOS: `brew install postgresql@16`; \
     or point WALCAST_PG_BINDIR at the directory holding initdb and pg_ctl";

/// How long `pg_ctl` may take to start or stop the server.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Ports picked by [`free_port`] can be taken before the server binds them;
/// starting is retried this many times with a new port.
const START_ATTEMPTS: usize = 3;

/// Why the demo could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("PostgreSQL server binaries (initdb, pg_ctl) not found: {INSTALL_HELP}")]
    PostgresNotFound,
    #[error("WALCAST_PG_BINDIR is {0:?}, but it holds no initdb and pg_ctl: point it at PostgreSQL's bin directory, or unset it")]
    BadBindir(PathBuf),
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{what} failed: {output}")]
    Command { what: String, output: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error("invalid demo traffic rate {0}: give ticks per second, more than 0 and at most {MAX_TICKS_PER_SECOND}")]
    Rate(f64),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Connect(#[from] ReplicationError),
    /// Boxed: a serve error is large, and this enum is returned often.
    #[error(transparent)]
    Serve(Box<crate::serve::ServeError>),
    #[error("{0} (a demo task stopped unexpectedly)")]
    Task(String),
    #[error("{context}: {message}")]
    Sql {
        context: &'static str,
        message: String,
    },
}

impl From<crate::serve::ServeError> for DemoError {
    fn from(e: crate::serve::ServeError) -> Self {
        DemoError::Serve(Box::new(e))
    }
}

impl DemoError {
    fn sql(context: &'static str, e: tokio_postgres::Error) -> DemoError {
        let message = match e.as_db_error() {
            Some(db) => {
                let mut m = db.message().to_string();
                if let Some(d) = db.detail() {
                    m.push_str(&format!(" ({d})"));
                }
                if let Some(h) = db.hint() {
                    m.push_str(&format!("; hint: {h}"));
                }
                m
            }
            None => e.to_string(),
        };
        DemoError::Sql { context, message }
    }
}

// ---------------------------------------------------------------------------
// Finding PostgreSQL

/// Finds the directory of PostgreSQL's server binaries, in this order:
/// `WALCAST_PG_BINDIR`, `initdb` on `PATH`, `pg_config --bindir`, the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian, Ubuntu), the newest Homebrew
/// `postgresql@<version>` (macOS).
pub fn find_bindir() -> Result<PathBuf, DemoError> {
    if let Some(dir) = std::env::var_os("WALCAST_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if has_server_binaries(&dir) {
            Ok(dir)
        } else {
            Err(DemoError::BadBindir(dir))
        };
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|p| has_server_binaries(p)) {
            return Ok(dir);
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server_binaries(&dir) {
            return Ok(dir);
        }
    }
    let candidates = [
        ("/usr/lib/postgresql", ""),
        ("/opt/homebrew/opt", "postgresql@"),
        ("/usr/local/opt", "postgresql@"),
    ];
    candidates
        .iter()
        .find_map(|(parent, prefix)| newest_versioned_bindir(Path::new(parent), prefix))
        .ok_or(DemoError::PostgresNotFound)
}

fn has_server_binaries(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("pg_ctl").is_file()
}

/// Among `parent/<prefix><version>/bin` holding the server binaries, the one with
/// the highest version (`16` > `9.6`).
fn newest_versioned_bindir(parent: &Path, prefix: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(parent).ok()?;
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let version = parse_version(name.to_str()?.strip_prefix(prefix)?)?;
            let bin = e.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
}

/// `"16"` → `[16]`, `"9.6"` → `[9, 6]`; anything else is not a version.
fn parse_version(s: &str) -> Option<Vec<u32>> {
    s.split('.').map(|p| p.parse().ok()).collect()
}

// ---------------------------------------------------------------------------
// The cluster

static CLUSTERS: AtomicUsize = AtomicUsize::new(0);

/// A throwaway PostgreSQL cluster: temp dir, `wal_level = logical`, 127.0.0.1 on
/// a free port, trust authentication, superuser `postgres`. Stopped and removed on
/// drop.
///
/// Starting runs `initdb` and `pg_ctl` and blocks for a few seconds; from async
/// code, call [`LocalCluster::start`] through `tokio::task::spawn_blocking`.
#[derive(Debug)]
pub struct LocalCluster {
    dir: PathBuf,
    port: u16,
    bindir: PathBuf,
    as_postgres: bool,
    watchdog: Option<Child>,
    running: bool,
}

impl LocalCluster {
    /// Creates and starts a cluster. Errors name what is missing and how to get it.
    pub fn start() -> Result<LocalCluster, DemoError> {
        let bindir = find_bindir()?;
        let as_postgres = is_root();
        if as_postgres {
            check_postgres_user()?;
        }
        let dir = new_temp_dir()?;
        let mut cluster = LocalCluster {
            dir,
            port: 0,
            bindir,
            as_postgres,
            watchdog: None,
            running: false,
        };
        // From here on, dropping `cluster` cleans up whatever was made.
        cluster.init()?;
        cluster.watchdog = cluster.spawn_watchdog();
        let mut attempt = 1;
        loop {
            cluster.port = free_port()?;
            match cluster.pg_ctl_start() {
                Ok(()) => break,
                // Someone took the port between our probe and the server's bind.
                Err(_)
                    if attempt < START_ATTEMPTS
                        && cluster.server_log().contains("could not bind") =>
                {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
        cluster.running = true;
        tracing::info!(port = cluster.port, dir = %cluster.dir.display(), "demo postgres started");
        Ok(cluster)
    }

    /// The port the server listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temp dir holding the data directory, the socket and the server log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of the server binaries in use.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// A connection URL for `database`, as superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }

    /// Creates `database` unless it exists; returns its URL.
    pub async fn create_database(&self, database: &str) -> Result<String, DemoError> {
        let admin = connect(&self.url("postgres")).await?;
        let exists = admin
            .query_opt("select 1 from pg_database where datname = $1", &[&database])
            .await
            .map_err(|e| DemoError::sql("cannot list databases", e))?
            .is_some();
        if !exists {
            admin
                .batch_execute(&format!(
                    "create database {}",
                    crate::replication::slot::quote_ident(database)
                ))
                .await
                .map_err(|e| DemoError::sql("cannot create the demo database", e))?;
        }
        Ok(self.url(database))
    }

    /// What the server wrote to its log.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Stops the server and removes the directory, reporting failures (dropping
    /// does the same, silently).
    pub fn stop(mut self) -> Result<(), DemoError> {
        self.shut_down()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn init(&self) -> Result<(), DemoError> {
        self.chown_to_postgres()?;
        let data = self.data_dir();
        run(self
            .pg_cmd("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync"])
            .args(["-E", "UTF8", "--locale=C"]))?;
        // Throwaway data: durability off, logical decoding on, no outside access.
        let conf = format!(
            "\n# walcast demo\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             wal_level = logical\n\
             max_wal_senders = 10\n\
             max_replication_slots = 10\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             log_min_messages = warning\n",
            self.dir.display().to_string().replace('\'', "''")
        );
        let conf_path = data.join("postgresql.conf");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .map_err(|source| DemoError::Io {
                what: "cannot write",
                path: conf_path,
                source,
            })
    }

    fn pg_ctl_start(&self) -> Result<(), DemoError> {
        run(self
            .pg_cmd("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-o", &format!("-p {}", self.port)])
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "start"]))
        .map_err(|e| match e {
            DemoError::Command { what, output } => DemoError::Command {
                what,
                output: format!(
                    "{output}\nserver log:\n{}",
                    tail_lines(&self.server_log(), 20)
                ),
            },
            other => other,
        })
    }

    fn shut_down(&mut self) -> Result<(), DemoError> {
        let mut result = Ok(());
        let was_running = self.running;
        if self.running {
            let stop = |mode: &str| {
                run(self.pg_cmd("pg_ctl").arg("-D").arg(self.data_dir()).args([
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    PG_CTL_TIMEOUT_SECS,
                    "stop",
                ]))
            };
            if let Err(e) = stop("fast") {
                result = stop("immediate").map_err(|_| e);
            }
            self.running = false;
        }
        if self.dir.exists() {
            if let Err(source) = std::fs::remove_dir_all(&self.dir) {
                if result.is_ok() {
                    result = Err(DemoError::Io {
                        what: "cannot remove",
                        path: self.dir.clone(),
                        source,
                    });
                }
            }
        }
        if let Some(mut w) = self.watchdog.take() {
            // Our own child: its work is done.
            let _ = w.kill();
            let _ = w.wait();
        }
        if result.is_ok() && was_running {
            tracing::info!("demo postgres stopped and removed");
        }
        result
    }

    /// A command for a server binary, run as `postgres` when we are root.
    fn pg_cmd(&self, bin: &str) -> Command {
        let path = self.bindir.join(bin);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        cmd.stdin(Stdio::null());
        // A process group of its own: Ctrl-C in the terminal reaches walcast, which
        // stops the server in order, and not the server directly (which would
        // shut down under walcast's feet).
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd
    }

    fn chown_to_postgres(&self) -> Result<(), DemoError> {
        if self.as_postgres {
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres:")
                .arg(&self.dir))?;
        }
        Ok(())
    }

    /// Starts a process that, once this process has exited, stops the server and
    /// removes the directory: cleanup for when destructors do not run. It ignores
    /// SIGINT, SIGTERM and SIGHUP, so a Ctrl-C sent to the whole process group
    /// does not take it down before it has done its job.
    fn spawn_watchdog(&self) -> Option<Child> {
        let mut stop = String::new();
        if self.as_postgres {
            stop.push_str("runuser -u postgres -- ");
        }
        stop.push_str(&format!(
            "{} -D {} -m immediate -w stop",
            shell_quote(&self.bindir.join("pg_ctl").to_string_lossy()),
            shell_quote(&self.data_dir().to_string_lossy())
        ));
        let script = format!(
            "trap '' INT TERM HUP; \
             while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             if [ -d {dir} ]; then {stop} >/dev/null 2>&1; rm -rf {dir}; fi",
            pid = std::process::id(),
            dir = shell_quote(&self.dir.to_string_lossy()),
        );
        match Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => Some(child),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the demo cluster's watchdog; the cluster is still removed on a clean exit");
                None
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if let Err(e) = self.shut_down() {
            tracing::warn!(error = %e, "cannot clean up the demo cluster");
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn check_postgres_user() -> Result<(), DemoError> {
    let user_exists = Command::new("id")
        .arg("postgres")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !user_exists {
        return Err(DemoError::Setup(
            "PostgreSQL refuses to run as root and there is no `postgres` user to run it as: \
             run walcast demo as an ordinary user, or create the user (`useradd --system postgres`)"
                .into(),
        ));
    }
    Ok(())
}

fn new_temp_dir() -> Result<PathBuf, DemoError> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "walcast-demo-{}-{n}-{nanos:08x}",
        std::process::id()
    ));
    std::fs::create_dir(&dir).map_err(|source| DemoError::Io {
        what: "cannot create",
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

fn free_port() -> Result<u16, DemoError> {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| DemoError::Io {
            what: "cannot find a free port on",
            path: PathBuf::from("127.0.0.1"),
            source,
        })
}

/// Runs a command to completion; a failure carries its output.
fn run(cmd: &mut Command) -> Result<(), DemoError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .map_err(|source| DemoError::Spawn { program, source })?;
    if out.status.success() {
        return Ok(());
    }
    let what = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut output = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if output.is_empty() {
        output = stdout.trim().to_string();
    }
    Err(DemoError::Command {
        what: format!("`{what}` ({})", out.status),
        output,
    })
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------
// Schema and traffic

async fn connect(url: &str) -> Result<tokio_postgres::Client, DemoError> {
    let info = PgConnInfo::parse(url)?;
    Ok(crate::tls::connect_sql(&info).await?)
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
            crate::replication::slot::WAL_LEVEL_HELP
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
    pub config: crate::auth::AuthConfig,
    pub staff_token: String,
    pub customer_token: String,
}

impl DemoAuth {
    pub fn new() -> Result<Self, DemoError> {
        let secret = random_hex(32);
        let rule =
            |name: &str, row_filter: Option<&str>, columns: Option<&[&str]>, public: bool| {
                crate::auth::TableRule {
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
        let config = crate::auth::AuthConfig {
            mode: Some(crate::auth::AuthMode::Jwt),
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
            ..crate::auth::AuthConfig::default()
        };
        let exp = crate::auth::now_unix() + DEMO_TOKEN_SECS;
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

/// `walcast demo`: starts a [`LocalCluster`], loads the bakery, runs
/// [`crate::serve::run`] on it with the traffic generator beside it, writes
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

    let cluster = tokio::task::spawn_blocking(LocalCluster::start)
        .await
        .map_err(|e| DemoError::Task(format!("starting PostgreSQL: {e}")))??;
    let result = if shutdown.is_cancelled() {
        Ok(())
    } else {
        serve_with_traffic(&cluster, config, &auth, &options, shutdown, out).await
    };
    let stopped = tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .map_err(|e| DemoError::Task(format!("stopping PostgreSQL: {e}")))
        .and_then(|r| r);
    result.and(stopped)
}

/// The part of [`run_demo`] that needs the cluster: schema, serve and traffic. A
/// failure of either serve or traffic stops the other.
async fn serve_with_traffic(
    cluster: &LocalCluster,
    mut config: crate::config::ServeConfig,
    auth: &DemoAuth,
    options: &DemoOptions,
    shutdown: CancellationToken,
    out: &mut (dyn Write + Send),
) -> Result<(), DemoError> {
    let url = cluster.create_database(DEMO_DATABASE).await?;
    load_schema(&url).await?;
    config.postgres.database_url = Some(url.clone());

    let stop = shutdown.child_token();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let on_ready = |r: &crate::serve::Running| {
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
        let r = crate::serve::run(config, stop.clone(), on_ready).await;
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
    fn versions_compare_numerically() {
        assert_eq!(parse_version("16"), Some(vec![16]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("main"), None);
        assert_eq!(parse_version(""), None);
        assert!(parse_version("16") > parse_version("9.6"));
    }

    #[test]
    fn newest_versioned_bindir_picks_the_highest_complete_install() {
        let root = new_temp_dir().unwrap();
        let mk = |name: &str, complete: bool| {
            let bin = root.join(name).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::write(bin.join("initdb"), "").unwrap();
            if complete {
                std::fs::write(bin.join("pg_ctl"), "").unwrap();
            }
        };
        mk("9.6", true);
        mk("15", true);
        mk("17", false); // client-only: no pg_ctl
        mk("common", true);
        assert_eq!(
            newest_versioned_bindir(&root, ""),
            Some(root.join("15").join("bin"))
        );
        mk("postgresql@16", true);
        assert_eq!(
            newest_versioned_bindir(&root, "postgresql@"),
            Some(root.join("postgresql@16").join("bin"))
        );
        assert_eq!(newest_versioned_bindir(&root.join("absent"), ""), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn missing_postgres_says_how_to_install_it() {
        let msg = DemoError::PostgresNotFound.to_string();
        for cmd in [
            "sudo apt-get install postgresql",
            "sudo dnf install postgresql-server",
            "brew install postgresql@16",
            "WALCAST_PG_BINDIR",
        ] {
            assert!(msg.contains(cmd), "{msg}");
        }
    }

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
