//! Running the `walcast` binary under test and reading its output.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_walcast");

/// A running `walcast` process with its stdout read line by line.
pub struct Proc {
    pub child: Child,
    pub stdout: Lines<BufReader<ChildStdout>>,
    pub stderr: Option<ChildStderr>,
    /// Every stdout line read so far, as text.
    pub raw: Vec<String>,
}

pub fn spawn(args: &[&str]) -> Proc {
    let mut child = Command::new(BIN)
        .current_dir(super::scratch_dir())
        .args(args)
        .env(
            "WALCAST_LOG",
            std::env::var("WALCAST_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn walcast");
    let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let stderr = child.stderr.take();
    Proc {
        child,
        stdout,
        stderr,
        raw: Vec::new(),
    }
}

impl Proc {
    /// The next stdout line parsed as JSON; panics after `timeout`.
    pub async fn next_json(&mut self, timeout: Duration) -> serde_json::Value {
        let line = tokio::time::timeout(timeout, self.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("no output within {timeout:?}"))
            .expect("read stdout")
            .unwrap_or_else(|| panic!("walcast exited early"));
        let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        self.raw.push(line);
        v
    }

    /// `n` JSON lines.
    pub async fn take_json(&mut self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.next_json(timeout).await);
        }
        v
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("running") as i32
    }

    /// Sends a signal by number (15 = TERM, 9 = KILL).
    pub fn signal(&self, sig: i32) {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }

    /// Waits for exit; returns (success, stderr text).
    pub async fn wait(mut self, timeout: Duration) -> (bool, String) {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("walcast did not exit within {timeout:?}"))
            .expect("wait");
        let mut err = String::new();
        if let Some(mut e) = self.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = e.read_to_string(&mut err).await;
        }
        (status.success(), err)
    }

    /// Peak resident set size of the process so far, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// Runs walcast to completion with a timeout: (success, stdout, stderr).
pub async fn run(args: &[&str], timeout: Duration) -> (bool, String, String) {
    let out = tokio::time::timeout(
        timeout,
        Command::new(BIN)
            .current_dir(super::scratch_dir())
            .args(args)
            .env("WALCAST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("walcast {args:?} did not finish within {timeout:?}"))
    .expect("run walcast");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `walcast serve` and the addresses it listens on.
pub struct Server {
    pub proc: Proc,
    pub port: u16,
    /// The port of `server.metrics_listen`, when configured.
    pub metrics_port: Option<u16>,
}

impl Server {
    pub fn ws_url(&self, vsn: &str) -> String {
        format!(
            "ws://127.0.0.1:{}/realtime/v1/websocket?apikey=test&vsn={vsn}",
            self.port
        )
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// Starts `walcast serve` for `db`'s slot and publication on a port of the
/// system's choosing (`--listen 127.0.0.1:0`), and waits until it says where it
/// listens.
pub async fn serve(db_url: &str, slot: &str, publication: &str, extra: &[&str]) -> Server {
    serve_on("127.0.0.1", db_url, slot, publication, extra).await
}

/// Like [`serve`], listening on `host` (such as `0.0.0.0`) instead of loopback.
pub async fn serve_on(
    host: &str,
    db_url: &str,
    slot: &str,
    publication: &str,
    extra: &[&str],
) -> Server {
    let listen = format!("{host}:0");
    let mut args = vec![
        "serve",
        "--database-url",
        db_url,
        "--slot",
        slot,
        "--publication",
        publication,
        "--listen",
        &listen,
    ];
    args.extend_from_slice(extra);
    let mut proc = spawn(&args);
    let mut err = BufReader::new(proc.stderr.take().expect("stderr")).lines();
    let (port, metrics_port) = read_listening(&mut err, Duration::from_secs(30), |_| {}).await;
    // Keep draining stderr so the process never blocks on a full pipe.
    tokio::spawn(async move {
        while let Ok(Some(l)) = err.next_line().await {
            if std::env::var_os("WALCAST_TEST_VERBOSE").is_some() {
                eprintln!("[walcast] {l}");
            }
        }
    });
    Server {
        proc,
        port,
        metrics_port,
    }
}

/// `walcast serve --create-slot` on the shared cluster for `db`, with the slot
/// and publication named after it (`slot_<db>`, `pub_<db>`), plus `extra`.
pub async fn serve_db(db: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--create-slot"];
    args.extend_from_slice(extra);
    let c = super::cluster();
    serve(
        &c.url(db),
        &format!("slot_{db}"),
        &format!("pub_{db}"),
        &args,
    )
    .await
}

/// [`serve_db`] with a config file holding `toml`.
pub async fn serve_db_with_config(db: &str, toml: &str) -> Server {
    let path = super::config_file(db, toml);
    serve_db(db, &["--config", path.to_str().unwrap()]).await
}

/// Reads `walcast serve`'s stderr up to its `walcast: listening on <addr>` line;
/// returns that port and the metrics listener's, if it printed one before.
/// Every line read is handed to `seen` (the listening lines included). Panics
/// after `timeout` or when the process exits first.
pub async fn read_listening<R>(
    err: &mut Lines<BufReader<R>>,
    timeout: Duration,
    mut seen: impl FnMut(&str),
) -> (u16, Option<u16>)
where
    R: tokio::io::AsyncRead + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut metrics = None;
    let mut lines = Vec::new();
    loop {
        let line = tokio::time::timeout_at(deadline, err.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!("walcast serve did not listen within {timeout:?}: {lines:?}")
            })
            .expect("read stderr");
        let Some(l) = line else {
            panic!("walcast serve exited before listening: {lines:?}");
        };
        seen(&l);
        if let Some(a) = walcast::testing::metrics_listening_addr(&l) {
            metrics = Some(a.port());
        }
        if let Some(a) = walcast::testing::listening_addr(&l) {
            return (a.port(), metrics);
        }
        lines.push(l);
    }
}
