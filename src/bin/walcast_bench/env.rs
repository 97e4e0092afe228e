//! A benchmark case's surroundings: a throwaway cluster (the harness the
//! integration tests use, `walcast::testing`), SQL helpers, and `walcast serve`
//! run as a child process of the binary built next to this driver.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use walcast::testing::Cluster;

/// Settings of the benchmark cluster on top of the harness's (fsync off,
/// `synchronous_commit=off`), as in reference/cdc-peers.md §1.2.
const CLUSTER_SETTINGS: &[(&str, &str)] = &[
    ("logical_decoding_work_mem", "'256MB'"),
    ("max_wal_size", "'4GB'"),
    ("checkpoint_timeout", "'30min'"),
    ("max_connections", "400"),
];

pub const DB: &str = "bench";

/// The benchmark cluster, stopped and removed when dropped.
pub struct Env {
    pub cluster: Cluster,
}

impl Env {
    pub async fn start() -> Result<Env> {
        let cluster = tokio::task::spawn_blocking(|| Cluster::start(CLUSTER_SETTINGS)).await??;
        let env = Env { cluster };
        env.cluster.new_db(DB).await?;
        Ok(env)
    }

    pub async fn sql(&self) -> Result<tokio_postgres::Client> {
        Ok(self.cluster.client(DB).await?)
    }

    /// URL of the bench database, directly or through a relay on `port`.
    pub fn url_via(&self, port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/{DB}?sslmode=disable")
    }

    pub fn url(&self) -> String {
        self.url_via(self.cluster.port())
    }
}

/// The `walcast` binary built beside this driver, built (same profile) when it
/// is missing or older than the driver, so `cargo run --bin walcast-bench` is enough.
/// `WALCAST_BIN` names a binary to use as it is instead (CI builds both first).
pub fn walcast_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("WALCAST_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("WALCAST_BIN={}: no such file", bin.display());
        }
        return Ok(bin);
    }
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("walcast");
    let stale = |p: &PathBuf| -> bool {
        let (Ok(a), Ok(b)) = (std::fs::metadata(p), std::fs::metadata(&me)) else {
            return true;
        };
        match (a.modified(), b.modified()) {
            (Ok(a), Ok(b)) => a < b,
            _ => true,
        }
    };
    if stale(&bin) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--bin", "walcast"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        eprintln!("building the walcast binary: {cmd:?}");
        let status = cmd.status().context("run cargo build")?;
        if !status.success() || !bin.is_file() {
            bail!(
                "could not build {}: run `cargo build --release --bins` first",
                bin.display()
            );
        }
    }
    Ok(bin)
}

/// A running `walcast serve`.
pub struct Walcast {
    pub child: Child,
    pub port: u16,
    _config: tempfile_path::TempPath,
    /// Its working directory, where the change log goes by default.
    _cwd: tempfile_path::TempPath,
}

impl Walcast {
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Resident set size now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// CPU time (user + system) used so far, from /proc/<pid>/stat.
    pub fn cpu(&self) -> Duration {
        proc_cpu(self.pid())
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// CPU time (user + system) of a process, from /proc/<pid>/stat.
pub fn proc_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of the command name: state is field 3; utime 14, stime 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15, i.e. indices 11 and 12 after the state.
    let total = ticks(11) + ticks(12);
    Duration::from_millis(total * 10) // USER_HZ is 100 on Linux
}

/// Starts `walcast serve` for `db_url` with `config` (TOML) on a port of the
/// system's choosing and waits until it says where it listens.
pub async fn serve(db_url: &str, slot: &str, publication: &str, config: &str) -> Result<Walcast> {
    run_walcast(&["serve"], db_url, slot, publication, config).await
}

/// Starts `walcast <command…>` (`serve`, `serve --cluster`, `relay`) like [`serve`].
pub async fn run_walcast(
    command: &[&str],
    db_url: &str,
    slot: &str,
    publication: &str,
    config: &str,
) -> Result<Walcast> {
    let bin = walcast_binary()?;
    let config_path = tempfile_path::TempPath::write(config)?;
    let cwd = tempfile_path::TempPath::dir()?;
    let listen = "127.0.0.1:0";
    let mut child = Command::new(bin)
        .current_dir(cwd.path())
        .args(command)
        .arg("--config")
        .arg(config_path.path())
        .args(["--database-url", db_url, "--slot", slot])
        .args(["--publication", publication, "--listen", listen])
        .env("WALCAST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawn walcast serve")?;
    let mut err = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let port = loop {
        let line = tokio::time::timeout_at(deadline, err.next_line())
            .await
            .context("walcast serve did not listen within 60 s")??;
        match line {
            Some(l) => match walcast::testing::listening_addr(&l) {
                Some(addr) => break addr.port(),
                None => eprintln!("[walcast] {l}"),
            },
            None => bail!("walcast serve exited before listening"),
        }
    };
    tokio::spawn(async move {
        while let Ok(Some(l)) = err.next_line().await {
            eprintln!("[walcast] {l}");
        }
    });
    Ok(Walcast {
        child,
        port,
        _config: config_path,
        _cwd: cwd,
    })
}

/// Set by `--no-log`: cases run walcast without its change log (`[log] dir = ""`).
static LOG_OFF: AtomicBool = AtomicBool::new(false);

pub fn set_log_off(off: bool) {
    LOG_OFF.store(off, Ordering::Relaxed);
}

/// Whether walcast keeps its change log in this run (on, as by default, unless `--no-log`).
pub fn log_on() -> bool {
    !LOG_OFF.load(Ordering::Relaxed)
}

/// `log on` / `log off`, for figure names.
pub fn log_label() -> &'static str {
    if log_on() {
        "log on"
    } else {
        "log off"
    }
}

/// The config every case starts from: no heartbeat timeouts during a run; the
/// change log as walcast's default (`walcast-log` in its working directory, a
/// fresh temp dir) unless `--no-log`.
pub fn config(client_queue: usize, channels_per_connection: usize) -> String {
    let mut c = format!(
        "[server]\nheartbeat_timeout_secs = 3600\n\n[limits]\nclient_queue = {client_queue}\n\
         channels_per_connection = {channels_per_connection}\nbindings_per_channel = 100\n"
    );
    if !log_on() {
        c.push_str("\n[log]\ndir = \"\"\n");
    }
    c
}

/// Runs `sql` statements one by one (a `DO` block with `COMMIT` inside must be
/// alone in its query), returning the time taken.
pub async fn exec(client: &tokio_postgres::Client, statements: &[String]) -> Result<Duration> {
    let start = Instant::now();
    for s in statements {
        client
            .batch_execute(s)
            .await
            .with_context(|| format!("SQL failed: {s}"))?;
    }
    Ok(start.elapsed())
}

/// Drops a replication slot once its last consumer is gone: the walsender of
/// a walcast just stopped may hold the slot for a moment after the process
/// exited, and dropping an active slot fails.
pub async fn drop_slot(client: &tokio_postgres::Client, slot: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let active: Option<bool> = client
            .query_opt(
                "select active from pg_replication_slots where slot_name = $1",
                &[&slot],
            )
            .await?
            .map(|r| r.get(0));
        match active {
            None => return Ok(()),
            Some(false) => {
                exec(
                    client,
                    &[format!("select pg_drop_replication_slot('{slot}')")],
                )
                .await?;
                return Ok(());
            }
            Some(true) if Instant::now() > deadline => {
                bail!("replication slot {slot} is still in use 15 s after its consumer stopped")
            }
            Some(true) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A file in the temp dir removed on drop (the walcast config of a run).
mod tempfile_path {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    static N: AtomicUsize = AtomicUsize::new(0);

    pub struct TempPath(PathBuf);

    impl TempPath {
        pub fn write(text: &str) -> std::io::Result<TempPath> {
            let p = std::env::temp_dir().join(format!(
                "walcast-bench-{}-{}.toml",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&p, text)?;
            Ok(TempPath(p))
        }

        /// An empty directory.
        pub fn dir() -> std::io::Result<TempPath> {
            let p = std::env::temp_dir().join(format!(
                "walcast-bench-{}-{}.d",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p)?;
            Ok(TempPath(p))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            if self.0.is_dir() {
                let _ = std::fs::remove_dir_all(&self.0);
            } else {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }
}
