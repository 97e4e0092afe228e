//! Test support: the throwaway PostgreSQL cluster ([`walcast::testing`], shared
//! with the benchmark driver and `walcast demo`) behind a thin panicking
//! wrapper, helpers to run the `walcast` binary, and fenced negative assertions.
//!
//! One cluster serves all tests of the binary; each test makes its own database,
//! slot and publication.

#![allow(dead_code)]

pub mod js;
pub mod walcast;

use std::ops::Deref;
use std::sync::OnceLock;

pub use ::walcast::testing::wait_for;

static SHARED: OnceLock<Cluster> = OnceLock::new();

/// The cluster shared by the tests of this process.
pub fn cluster() -> &'static Cluster {
    SHARED.get_or_init(|| Cluster::start(&[]))
}

/// A fresh database `db` on the shared cluster with `ddl` run in it and a
/// publication `pub_<db>` for all tables (the names [`walcast::serve_db`] uses).
pub async fn setup_db(db: &str, ddl: &str) -> tokio_postgres::Client {
    let c = cluster().new_db(db).await;
    c.batch_execute(ddl).await.unwrap();
    c.batch_execute(&format!("create publication pub_{db} for all tables"))
        .await
        .unwrap();
    c
}

/// A config file holding `toml` in the temp dir, named after `name` and this
/// process (each test passes its own name).
pub fn config_file(name: &str, toml: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("walcast-{name}-{}.toml", std::process::id()));
    std::fs::write(&p, toml).unwrap();
    p
}

/// A temp dir holding a walcast config (`walcast.toml`) whose change log is in
/// the same dir and stays across restarts: (the dir, the log dir, the config).
pub fn log_dir_config() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    let config = dir.path().join("walcast.toml");
    std::fs::write(
        &config,
        format!("[log]\ndir = {:?}\n", log_dir.display().to_string()),
    )
    .unwrap();
    (dir, log_dir, config)
}

/// Creates the logical replication slot `slot` (pgoutput) in `c`'s database.
pub async fn create_slot(c: &tokio_postgres::Client, slot: &str) {
    c.execute(
        "select pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await
    .unwrap();
}

/// A fresh empty directory for one `walcast` process to run in: its default
/// change log (`walcast-log`) goes there, not into the crate.
pub fn scratch_dir() -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let p = std::env::temp_dir().join(format!(
        "walcast-tests-{}/{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// [`walcast::testing::Cluster`] whose failures panic with the harness's error
/// (a test that cannot start its server must fail loudly). Everything else
/// (`url`, `port`, `server_log`…) is the harness's own, through `Deref`.
pub struct Cluster(::walcast::testing::Cluster);

impl Deref for Cluster {
    type Target = ::walcast::testing::Cluster;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Cluster {
    /// A new cluster with `wal_level=logical` plus `extra` settings; stopped and
    /// removed when dropped (the shared one: when the test process exits).
    pub fn start(extra: &[(&str, &str)]) -> Cluster {
        Cluster::start_with_env(extra, &[])
    }

    /// [`Cluster::start`] with `env` set for the server process.
    pub fn start_with_env(extra: &[(&str, &str)], env: &[(&str, &str)]) -> Cluster {
        match ::walcast::testing::Cluster::start_with_env("test", extra, env) {
            Ok(c) => Cluster(c),
            Err(e) => panic!("cannot start a throwaway PostgreSQL: {e}"),
        }
    }

    /// Stops the server (fast mode) and waits.
    pub fn stop(&self) {
        self.0
            .stop()
            .unwrap_or_else(|e| panic!("cannot stop PostgreSQL: {e}"));
    }

    /// Starts it again after [`Cluster::stop`].
    pub fn restart(&self) {
        self.0
            .restart()
            .unwrap_or_else(|e| panic!("cannot restart PostgreSQL: {e}"));
    }

    /// A SQL client to `db`.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        self.0.client(db).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Creates a fresh database named after the test and returns a client to it.
    pub async fn new_db(&self, name: &str) -> tokio_postgres::Client {
        self.0.new_db(name).await.unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A plain HTTP/1.0 GET to walcast on 127.0.0.1: (status, body).
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to walcast's HTTP listener");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("HTTP response in time")
        .unwrap();
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    (status, body.to_string())
}
