//! A throwaway PostgreSQL cluster made with `initdb`: the one harness behind the
//! integration tests (`tests/support`), the end-to-end benchmark driver
//! (`walcast-bench`) and `walcast demo`. Not used by `walcast serve`.
//!
//! [`Cluster::start`] makes a cluster in a temp dir with `wal_level = logical`,
//! listening on 127.0.0.1 only, on a free port: the port is probed and, should
//! someone take it before the server binds it, starting is retried with a new one
//! ([`START_ATTEMPTS`]). Every connection from 127.0.0.1 is trusted except two
//! password roles the tests use (`walcast_scram`, `walcast_md5`). Durability is
//! off: the data is thrown away.
//!
//! The cluster is stopped and its directory removed when the value is dropped
//! (or by [`Cluster::remove`], which reports failures), and — should the process
//! die without running destructors (SIGKILL, abort, or a `static` that is never
//! dropped) — by a small watchdog process once the starting process has gone.
//! The server binaries run in a process group of their own, so a Ctrl-C in the
//! terminal reaches the caller (which stops the server in order) and not the
//! server. When run as root they run as the `postgres` user through
//! `runuser -u postgres --`, since PostgreSQL refuses root.
//!
//! Every failure is a [`ClusterError`] naming the command and its output (and the
//! end of the server log when the server would not start): a harness that cannot
//! start a server must say why, never pass vacuously.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What to run to get PostgreSQL's server binaries.
pub const INSTALL_HELP: &str = "install the PostgreSQL server: \
     Debian/Ubuntu: `sudo apt-get install postgresql`; \
     Fedora: `sudo dnf install postgresql-server`; \
     macOS: `brew install postgresql@16`; \
     or point WALCAST_PG_BINDIR at the directory holding initdb and pg_ctl";

/// How long `pg_ctl` may take to start or stop the server.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// A probed free port can be taken before the server binds it; starting is
/// tried this many times, each with a new port.
pub const START_ATTEMPTS: usize = 3;

/// Why a cluster could not be made, started, stopped or used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("PostgreSQL server binaries (initdb, pg_ctl) not found: {INSTALL_HELP}")]
    PostgresNotFound,
    #[error("WALCAST_PG_BINDIR is {0:?}, but it holds no initdb and pg_ctl: point it at PostgreSQL's bin directory, or unset it")]
    BadBindir(PathBuf),
    #[error("PostgreSQL refuses to run as root and there is no `postgres` user to run it as: run as an ordinary user, or create the user (`useradd --system postgres`)")]
    NoPostgresUser,
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
    #[error("{context}: {source}")]
    Sql {
        context: String,
        source: tokio_postgres::Error,
    },
}

impl ClusterError {
    fn sql(context: impl Into<String>, source: tokio_postgres::Error) -> ClusterError {
        ClusterError::Sql {
            context: context.into(),
            source,
        }
    }
}

// ---------------------------------------------------------------------------
// Finding PostgreSQL

/// Finds the directory of PostgreSQL's server binaries, in this order:
/// `WALCAST_PG_BINDIR`, `initdb` on `PATH`, `pg_config --bindir`, the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian, Ubuntu), the newest Homebrew
/// `postgresql@<version>` (macOS).
pub fn find_bindir() -> Result<PathBuf, ClusterError> {
    if let Some(dir) = std::env::var_os("WALCAST_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if has_server_binaries(&dir) {
            Ok(dir)
        } else {
            Err(ClusterError::BadBindir(dir))
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
        .ok_or(ClusterError::PostgresNotFound)
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

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn check_postgres_user() -> Result<(), ClusterError> {
    let exists = Command::new("id")
        .arg("postgres")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if exists {
        Ok(())
    } else {
        Err(ClusterError::NoPostgresUser)
    }
}

/// A port free on 127.0.0.1 at the time of asking. Only for a server whose port
/// must be known before it starts (PostgreSQL): the port can be taken before the
/// server binds it, so such a start must retry (as [`Cluster::start`] does).
/// walcast's own listeners bind port 0 and report the address they got.
pub fn free_port() -> Result<u16, ClusterError> {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| ClusterError::Io {
            what: "cannot find a free port on",
            path: PathBuf::from("127.0.0.1"),
            source,
        })
}

// ---------------------------------------------------------------------------
// The cluster

static CLUSTERS: AtomicUsize = AtomicUsize::new(0);

/// Settings every cluster gets, before the caller's (a later line wins).
const BASE_SETTINGS: &str = "listen_addresses = '127.0.0.1'\n\
     wal_level = logical\n\
     max_wal_senders = 64\n\
     max_replication_slots = 256\n\
     max_connections = 300\n\
     fsync = off\n\
     synchronous_commit = off\n\
     full_page_writes = off\n\
     shared_buffers = 128MB\n\
     logical_decoding_work_mem = 64MB\n\
     max_wal_size = 1GB\n\
     log_min_messages = warning\n\
     password_encryption = 'scram-sha-256'\n";

/// Password roles first (the tests' `walcast_scram` and `walcast_md5`); every
/// other connection from 127.0.0.1 is trusted.
const PG_HBA: &str = "host all walcast_scram 127.0.0.1/32 scram-sha-256\n\
     host all walcast_md5 127.0.0.1/32 md5\n\
     host all all 127.0.0.1/32 trust\n\
     host replication all 127.0.0.1/32 trust\n\
     local all all trust\n";

/// A throwaway PostgreSQL cluster: temp dir, `wal_level = logical`, 127.0.0.1 on
/// a free port, superuser `postgres`. Stopped and removed on drop.
///
/// Starting runs `initdb` and `pg_ctl` and blocks for a few seconds; from async
/// code, call [`Cluster::start`] through `tokio::task::spawn_blocking`.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    port: u16,
    bindir: PathBuf,
    as_postgres: bool,
    watchdog: Mutex<Option<Child>>,
    running: AtomicBool,
    /// Environment of the server process.
    env: Vec<(String, String)>,
}

impl Cluster {
    /// Creates and starts a cluster with the harness's settings plus `settings`
    /// (`(name, value)`, values as written in `postgresql.conf`).
    pub fn start(settings: &[(&str, &str)]) -> Result<Cluster, ClusterError> {
        Cluster::start_named("test", settings)
    }

    /// [`Cluster::start`] with the temp dir named `walcast-<name>-…`.
    pub fn start_named(name: &str, settings: &[(&str, &str)]) -> Result<Cluster, ClusterError> {
        Cluster::start_with_env(name, settings, &[])
    }

    /// [`Cluster::start_named`] with `env` set for the server (e.g. `LOCPATH`,
    /// where glibc looks for a locale `lc_messages` names).
    pub fn start_with_env(
        name: &str,
        settings: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> Result<Cluster, ClusterError> {
        let bindir = find_bindir()?;
        let as_postgres = is_root();
        if as_postgres {
            check_postgres_user()?;
        }
        let dir = new_temp_dir(name)?;
        let mut cluster = Cluster {
            dir,
            port: 0,
            bindir,
            as_postgres,
            watchdog: Mutex::new(None),
            running: AtomicBool::new(false),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        // From here on, dropping `cluster` cleans up whatever was made.
        cluster.init(settings)?;
        *cluster.watchdog_slot() = cluster.spawn_watchdog();
        let mut attempt = 1;
        loop {
            cluster.port = free_port()?;
            let log_before = cluster.server_log().len();
            match cluster.pg_ctl_start() {
                Ok(()) => break,
                // Someone took the port between our probe and the server's bind.
                Err(_)
                    if attempt < START_ATTEMPTS
                        && cluster
                            .server_log()
                            .get(log_before..)
                            .is_some_and(|new| new.contains("could not bind")) =>
                {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
        cluster.running.store(true, Ordering::Release);
        tracing::debug!(port = cluster.port, dir = %cluster.dir.display(), "throwaway postgres started");
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

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// A connection URL for `db`, as superuser `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// A connection URL for `db` as `user` with `password`.
    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// A SQL client to `db` (its connection runs on a spawned task).
    pub async fn client(&self, db: &str) -> Result<tokio_postgres::Client, ClusterError> {
        let (client, conn) = tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls)
            .await
            .map_err(|e| ClusterError::sql(format!("cannot connect to database {db}"), e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Drops `db` if it exists (with force), creates it afresh and returns a
    /// client to it.
    pub async fn new_db(&self, db: &str) -> Result<tokio_postgres::Client, ClusterError> {
        let admin = self.client("postgres").await?;
        for sql in [
            format!("drop database if exists {db} with (force)"),
            format!("create database {db}"),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .map_err(|e| ClusterError::sql(sql.clone(), e))?;
        }
        self.client(db).await
    }

    /// Creates `db` unless it exists; returns its URL.
    pub async fn create_database(&self, db: &str) -> Result<String, ClusterError> {
        let admin = self.client("postgres").await?;
        let exists = admin
            .query_opt("select 1 from pg_database where datname = $1", &[&db])
            .await
            .map_err(|e| ClusterError::sql("cannot list databases", e))?
            .is_some();
        if !exists {
            let quoted = format!("\"{}\"", db.replace('"', "\"\""));
            admin
                .batch_execute(&format!("create database {quoted}"))
                .await
                .map_err(|e| ClusterError::sql(format!("cannot create database {db}"), e))?;
        }
        Ok(self.url(db))
    }

    /// What the server wrote to its log.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Stops the server (fast mode) and waits; the data stays for
    /// [`Cluster::restart`].
    pub fn stop(&self) -> Result<(), ClusterError> {
        self.running.store(false, Ordering::Release);
        self.pg_ctl_stop("fast")
    }

    /// Starts the server again after [`Cluster::stop`], on the same port.
    pub fn restart(&self) -> Result<(), ClusterError> {
        self.pg_ctl_start()?;
        self.running.store(true, Ordering::Release);
        Ok(())
    }

    /// Stops the server and removes the directory, reporting failures (dropping
    /// does the same, silently).
    pub fn remove(mut self) -> Result<(), ClusterError> {
        self.shut_down()
    }

    /// A client program of the server's bin dir (`pg_recvlogical`, `psql`…), run
    /// as the current user (only the server refuses root). The bin dir may be a
    /// directory of wrappers holding only `initdb` and `pg_ctl`; the client
    /// programs are then looked up in the packaged bin dirs.
    pub fn client_cmd(&self, bin: &str) -> Command {
        if self.bindir.join(bin).is_file() {
            return Command::new(self.bindir.join(bin));
        }
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|d| d.join(bin).is_file())
            .collect();
        dirs.sort();
        Command::new(
            dirs.pop()
                .map(|d| d.join(bin))
                .unwrap_or_else(|| bin.into()),
        )
    }

    fn watchdog_slot(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.watchdog.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn init(&self, settings: &[(&str, &str)]) -> Result<(), ClusterError> {
        self.chown_to_postgres()?;
        let data = self.data_dir();
        run(self
            .pg_cmd("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync"])
            .args(["-E", "UTF8", "--locale=C"]))?;
        let mut conf = format!(
            "\n# walcast throwaway cluster\n{BASE_SETTINGS}unix_socket_directories = '{}'\n",
            self.dir.display().to_string().replace('\'', "''")
        );
        for (k, v) in settings {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        let conf_path = data.join("postgresql.conf");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .map_err(|source| ClusterError::Io {
                what: "cannot write",
                path: conf_path,
                source,
            })?;
        let hba_path = data.join("pg_hba.conf");
        std::fs::write(&hba_path, PG_HBA).map_err(|source| ClusterError::Io {
            what: "cannot write",
            path: hba_path,
            source,
        })?;
        // initdb made the data dir as `postgres`; the files written since are ours.
        self.chown_to_postgres()
    }

    fn pg_ctl_start(&self) -> Result<(), ClusterError> {
        run(self
            .pg_cmd("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-o", &format!("-p {}", self.port)])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "start"]))
        .map_err(|e| match e {
            ClusterError::Command { what, output } => ClusterError::Command {
                what,
                output: format!(
                    "{output}\nserver log:\n{}",
                    tail_lines(&self.server_log(), 20)
                ),
            },
            other => other,
        })
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), ClusterError> {
        run(self.pg_cmd("pg_ctl").arg("-D").arg(self.data_dir()).args([
            "-m",
            mode,
            "-w",
            "-t",
            PG_CTL_TIMEOUT_SECS,
            "stop",
        ]))
    }

    fn shut_down(&mut self) -> Result<(), ClusterError> {
        let mut result = Ok(());
        if self.running.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.pg_ctl_stop("fast") {
                result = self.pg_ctl_stop("immediate").map_err(|_| e);
            }
        }
        if self.dir.exists() {
            if let Err(source) = std::fs::remove_dir_all(&self.dir) {
                if result.is_ok() {
                    result = Err(ClusterError::Io {
                        what: "cannot remove",
                        path: self.dir.clone(),
                        source,
                    });
                }
            }
        }
        if let Some(mut w) = self.watchdog_slot().take() {
            // Our own child: its work is done.
            let _ = w.kill();
            let _ = w.wait();
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
        // A process group of its own: Ctrl-C in the terminal reaches the caller,
        // which stops the server in order, and not the server directly (which
        // would shut down under the caller's feet).
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd
    }

    fn chown_to_postgres(&self) -> Result<(), ClusterError> {
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
            sh_quote(&self.bindir.join("pg_ctl").to_string_lossy()),
            sh_quote(&self.data_dir().to_string_lossy())
        ));
        let script = format!(
            "trap '' INT TERM HUP; \
             while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
             if [ -d {dir} ]; then {stop} >/dev/null 2>&1; rm -rf {dir}; fi",
            pid = std::process::id(),
            dir = sh_quote(&self.dir.to_string_lossy()),
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
                tracing::warn!(error = %e, "cannot start the throwaway cluster's watchdog; the cluster is still removed on a clean exit");
                None
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.shut_down() {
            tracing::warn!(error = %e, "cannot clean up the throwaway cluster");
        }
    }
}

fn new_temp_dir(name: &str) -> Result<PathBuf, ClusterError> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "walcast-{name}-{}-{n}-{nanos:08x}",
        std::process::id()
    ));
    std::fs::create_dir(&dir).map_err(|source| ClusterError::Io {
        what: "cannot create",
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

/// Runs a command to completion; a failure carries its output.
fn run(cmd: &mut Command) -> Result<(), ClusterError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .map_err(|source| ClusterError::Spawn { program, source })?;
    if out.status.success() {
        return Ok(());
    }
    let what = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut output = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if output.is_empty() {
        output = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    Err(ClusterError::Command {
        what: format!("`{what}` ({})", out.status),
        output,
    })
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Quotes a word for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

// ---------------------------------------------------------------------------
// Other test helpers

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What `walcast serve` prints (to stderr) once its main listener is bound:
/// `walcast: listening on <addr>`, the address it got (with `--listen …:0`, the
/// port the system chose).
pub const LISTENING_PREFIX: &str = "walcast: listening on ";

/// What it prints once the separate metrics listener (`server.metrics_listen`)
/// is bound: `walcast: metrics listening on <addr>`.
pub const METRICS_LISTENING_PREFIX: &str = "walcast: metrics listening on ";

/// The address in a `walcast: listening on <addr>` line, if `line` is one.
pub fn listening_addr(line: &str) -> Option<std::net::SocketAddr> {
    line.trim().strip_prefix(LISTENING_PREFIX)?.parse().ok()
}

/// The address in a `walcast: metrics listening on <addr>` line, if `line` is one.
pub fn metrics_listening_addr(line: &str) -> Option<std::net::SocketAddr> {
    line.trim()
        .strip_prefix(METRICS_LISTENING_PREFIX)?
        .parse()
        .ok()
}

/// Writes pgoutput payloads as a capture file: each payload is a 4-byte
/// big-endian length followed by that many bytes (the format of
/// `benches/fixtures/*.bin`).
pub fn write_capture(path: &Path, payloads: &[Vec<u8>]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(payloads.iter().map(|p| p.len() + 4).sum());
    for p in payloads {
        let len = u32::try_from(p.len()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "payload over 4 GiB")
        })?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(p);
    }
    std::fs::write(path, out)
}

/// Reads a capture file written by [`write_capture`]; a truncated record is an error.
pub fn read_capture(bytes: &[u8]) -> Result<Vec<bytes::Bytes>, String> {
    let mut rest = bytes;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(format!("truncated length at record {}", out.len()));
        };
        let len = u32::from_be_bytes(*len) as usize;
        if tail.len() < len {
            return Err(format!("truncated payload at record {}", out.len()));
        }
        out.push(bytes::Bytes::copy_from_slice(&tail[..len]));
        rest = &tail[len..];
    }
    Ok(out)
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
        let root = new_temp_dir("bindir-test").unwrap();
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
        let msg = ClusterError::PostgresNotFound.to_string();
        for cmd in [
            "sudo apt-get install postgresql",
            "sudo dnf install postgresql-server",
            "brew install postgresql@16",
            "WALCAST_PG_BINDIR",
        ] {
            assert!(msg.contains(cmd), "{msg}");
        }
    }
}

// ---------------------------------------------------------------------------
// A throwaway NATS server

/// A throwaway `nats-server -js` (JetStream on, its store in a temp dir) on
/// 127.0.0.1 and a free port, for the cluster tests and `walcast-bench cluster`.
/// Killed and its store removed on drop. The binary is `$WALCAST_NATS_SERVER`,
/// `nats-server` on PATH, or `/usr/sbin/nats-server` (Debian's package).
#[derive(Debug)]
pub struct Nats {
    dir: tempfile_dir::Dir,
    port: u16,
    bin: PathBuf,
    child: Mutex<Option<Child>>,
}

/// A directory removed on drop (no dependency on the `tempfile` crate here).
mod tempfile_dir {
    #[derive(Debug)]
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Nats {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> Result<Nats, ClusterError> {
        let bin = nats_server_bin()?;
        let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("walcast-nats-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| ClusterError::Io {
            what: "cannot create",
            path: dir.clone(),
            source,
        })?;
        let mut nats = Nats {
            dir: tempfile_dir::Dir(dir),
            port: 0,
            bin,
            child: Mutex::new(None),
        };
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            nats.port = free_port()?;
            match nats.spawn() {
                Ok(()) => return Ok(nats),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ClusterError::NoPostgresUser))
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn spawn(&self) -> Result<(), ClusterError> {
        let store = self.dir.0.join("store");
        let log = self.dir.0.join("nats.log");
        let mut child = Command::new(&self.bin)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&store)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| ClusterError::Io {
                what: "cannot run",
                path: self.bin.clone(),
                source,
            })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(ClusterError::Io {
                    what: "nats-server exited",
                    path: self.bin.clone(),
                    source: std::io::Error::other(format!("{status}: {}", tail_lines(&text, 10))),
                });
            }
            let ready = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok()
                && std::fs::read_to_string(&log).is_ok_and(|t| t.contains("Server is ready"));
            if ready {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ClusterError::Io {
                    what: "nats-server did not accept connections within 10 s",
                    path: self.bin.clone(),
                    source: std::io::Error::other(tail_lines(
                        &std::fs::read_to_string(&log).unwrap_or_default(),
                        10,
                    )),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(mut c) = self.child.lock() {
            *c = Some(child);
        }
        Ok(())
    }

    /// Kills the server (SIGKILL: nothing flushed on the way out) and waits.
    pub fn kill(&self) {
        if let Ok(mut c) = self.child.lock() {
            if let Some(mut child) = c.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Stops the server the way an operator restarting it does (SIGTERM: it
    /// flushes its store) and waits.
    pub fn stop(&self) {
        if let Ok(mut c) = self.child.lock() {
            if let Some(mut child) = c.take() {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(child.id().to_string())
                    .status();
                let deadline = Instant::now() + Duration::from_secs(10);
                while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Starts it again after [`Nats::kill`] or [`Nats::stop`], on the same port
    /// with the same store.
    pub fn restart(&self) -> Result<(), ClusterError> {
        let log = self.dir.0.join("nats.log");
        let _ = std::fs::remove_file(&log);
        self.spawn()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn nats_server_bin() -> Result<PathBuf, ClusterError> {
    if let Some(p) = std::env::var_os("WALCAST_NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("nats-server");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let deb = PathBuf::from("/usr/sbin/nats-server");
    if deb.is_file() {
        return Ok(deb);
    }
    Err(ClusterError::Io {
        what: "cannot find nats-server (install Debian's nats-server package, or set WALCAST_NATS_SERVER) in",
        path: PathBuf::from("PATH"),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })
}
