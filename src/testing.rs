//! A throwaway PostgreSQL cluster made with `initdb`, for the integration tests
//! (`tests/support`) and the end-to-end benchmark driver (`walcast-bench`). Not
//! used by the daemon.
//!
//! The cluster lives in a temp dir, listens on a free port on 127.0.0.1, and is
//! stopped and removed when the process that started it exits (a watchdog process
//! does it even if that process is killed). When run as root the server runs as
//! the `postgres` user, since PostgreSQL refuses root. Failures panic with the
//! command and its output: a harness that cannot start a server must fail loudly,
//! never pass vacuously.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    pub bindir: PathBuf,
    as_postgres: bool,
}

/// Finds PostgreSQL's server binaries: `WALCAST_PG_BINDIR`, `initdb` on PATH,
/// `pg_config --bindir`, or the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> PathBuf {
    if let Ok(d) = std::env::var("WALCAST_PG_BINDIR") {
        return PathBuf::from(d);
    }
    if let Ok(path) = std::env::var("PATH") {
        for p in std::env::split_paths(&path) {
            if p.join("initdb").is_file() && p.join("pg_ctl").is_file() {
                return p;
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").is_file() {
            return p;
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, p)) => p,
        None => panic!(
            "PostgreSQL server binaries not found (initdb, pg_ctl): install them \
             (Debian/Ubuntu: apt-get install postgresql) or set WALCAST_PG_BINDIR"
        ),
    }
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// Starts a new cluster with `wal_level=logical` plus `extra` settings.
    pub fn start(extra: &[(&str, &str)]) -> Cluster {
        Cluster::start_with_env(extra, &[])
    }

    /// [`Cluster::start`] with `env` set for the server (e.g. `LOCPATH`, where
    /// glibc looks for a locale `lc_messages` names).
    pub fn start_with_env(extra: &[(&str, &str)], env: &[(&str, &str)]) -> Cluster {
        let bindir = find_bindir();
        let as_postgres = is_root();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("walcast-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if as_postgres {
            run_ok(Command::new("chown").arg("postgres:").arg(&dir));
        }
        let data = dir.join("data");
        let port = free_port();
        let c = Cluster {
            dir: dir.clone(),
            port,
            bindir,
            as_postgres,
        };
        run_ok(c.pg_cmd("initdb").args([
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]));
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_wal_senders = 64\nmax_replication_slots = 64\n\
             max_connections = 300\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             shared_buffers = 128MB\nlogical_decoding_work_mem = 64MB\nmax_wal_size = 1GB\n\
             log_min_messages = warning\npassword_encryption = 'scram-sha-256'\n",
            dir.display()
        );
        for (k, v) in extra {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        append(&data.join("postgresql.conf"), &conf);
        // Password roles first; everything else is trusted.
        let hba = "host all walcast_scram 127.0.0.1/32 scram-sha-256\n\
                   host all walcast_md5 127.0.0.1/32 md5\n\
                   host all all 127.0.0.1/32 trust\n\
                   host replication all 127.0.0.1/32 trust\n\
                   local all all trust\n";
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        if as_postgres {
            run_ok(Command::new("chown").arg("-R").arg("postgres:").arg(&dir));
        }
        run_ok(c.pg_cmd("pg_ctl").envs(env.iter().copied()).args([
            "-D",
            data.to_str().unwrap(),
            "-l",
            dir.join("server.log").to_str().unwrap(),
            "-w",
            "-t",
            "60",
            "start",
        ]));
        c.spawn_watchdog();
        c
    }

    /// A command for a server binary, run as `postgres` when we are root.
    fn pg_cmd(&self, bin: &str) -> Command {
        let path = self.bindir.join(bin);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// Stops the cluster and removes its directory once this test process exits.
    // The watchdog must outlive the test process, so it is deliberately not waited for.
    #[allow(clippy::zombie_processes)]
    fn spawn_watchdog(&self) {
        let pg_ctl = self.bindir.join("pg_ctl");
        let data = self.dir.join("data");
        let stop = if self.as_postgres {
            format!(
                "runuser -u postgres -- {} -D {} -m immediate stop",
                pg_ctl.display(),
                data.display()
            )
        } else {
            format!(
                "{} -D {} -m immediate stop",
                pg_ctl.display(),
                data.display()
            )
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = self.dir.display()
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cluster watchdog");
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Stops the server (fast mode) and waits.
    pub fn stop(&self) {
        run_ok(self.pg_cmd("pg_ctl").args([
            "-D",
            self.data_dir().to_str().unwrap(),
            "-m",
            "fast",
            "-w",
            "stop",
        ]));
    }

    /// Starts it again after [`Cluster::stop`].
    pub fn restart(&self) {
        run_ok(self.pg_cmd("pg_ctl").args([
            "-D",
            self.data_dir().to_str().unwrap(),
            "-l",
            self.dir.join("server.log").to_str().unwrap(),
            "-w",
            "start",
        ]));
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// A SQL client to `db`.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {db}: {e}"));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Creates a fresh database named after the test and returns a client to it.
    pub async fn new_db(&self, name: &str) -> tokio_postgres::Client {
        let admin = self.client("postgres").await;
        for sql in [
            format!("drop database if exists {name} with (force)"),
            format!("create database {name}"),
        ] {
            admin.batch_execute(&sql).await.unwrap();
        }
        self.client(name).await
    }

    /// Stops the server at once and removes its directory (the watchdog would do it
    /// at process exit; a long-running caller such as the benchmark driver does it
    /// sooner).
    pub fn destroy(&self) {
        let _ = self
            .pg_cmd("pg_ctl")
            .args([
                "-D",
                self.data_dir().to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// A command for a client program of the server's bin dir (`pg_recvlogical`,
    /// `psql`…), run as `postgres` when we are root.
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

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

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
