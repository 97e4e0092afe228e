//! Driving the real `@supabase/realtime-js` from tests.
//!
//! [`JsClient`] runs `node tests/js/client.mjs`, a driver that takes JSON
//! commands on stdin and reports JSON events on stdout; the command and event
//! shapes are documented at the top of that file. It needs `npm ci` in
//! `tests/js` (done by `.ci/run`).
//!
//! Events read but not yet taken stay queued: [`JsClient::wait_for`] takes the
//! first event that matches and leaves the others, in order, for later calls.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::Instant;

/// How many recent events a failure message shows.
const SHOWN: usize = 30;

/// A running `tests/js/client.mjs`.
pub struct JsClient {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    /// Events read from stdout but not yet taken.
    queue: VecDeque<Value>,
    /// The last [`SHOWN`] events read, for failure messages.
    recent: VecDeque<String>,
    stderr: Arc<Mutex<String>>,
    next_id: u64,
    /// Package versions the driver reported in its `ready` event.
    pub versions: Value,
}

/// `tests/js` in the source tree.
pub fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

/// True if `v` is the event `ev` (e.g. `"status"`).
pub fn is(v: &Value, ev: &str) -> bool {
    v["ev"] == ev
}

/// True if `v` is the event `ev` about channel `channel`.
pub fn is_on(v: &Value, ev: &str, channel: &str) -> bool {
    v["ev"] == ev && v["channel"] == channel
}

impl JsClient {
    /// Starts the driver and waits for its `ready` event. Panics when Node or
    /// `tests/js/node_modules` is missing.
    pub async fn spawn() -> JsClient {
        Self::spawn_script("tests/js/client.mjs", "@supabase/realtime-js").await
    }

    /// Starts another driver of tests/js speaking the same protocol (such as
    /// `tests/js/status-page.mjs`), which needs the npm package `package`.
    pub async fn spawn_script(script: &str, package: &str) -> JsClient {
        let dir = js_dir();
        if !dir
            .join(format!("node_modules/{package}/package.json"))
            .is_file()
        {
            panic!(
                "{}/node_modules is missing: run npm ci in tests/js",
                dir.display()
            );
        }
        let node = std::env::var("WALCAST_NODE").unwrap_or_else(|_| "node".into());
        let mut child = Command::new(&node)
            .arg(script)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `{node}` (install Node.js >= 20 or set WALCAST_NODE): {e}")
            });
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = stderr.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = err_lines.next_line().await {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut c = JsClient {
            child,
            stdin,
            stdout,
            queue: VecDeque::new(),
            recent: VecDeque::new(),
            stderr,
            next_id: 1,
            versions: Value::Null,
        };
        let ready = c
            .wait_for("the driver's ready event", Duration::from_secs(30), |v| {
                is(v, "ready")
            })
            .await;
        c.versions = ready["versions"].clone();
        c
    }

    /// Writes one command; gives it an `id` when it has none. Returns the id.
    pub async fn send(&mut self, mut cmd: Value) -> Value {
        assert!(cmd.is_object(), "a command must be a JSON object: {cmd}");
        let id = cmd
            .as_object_mut()
            .unwrap()
            .entry("id")
            .or_insert_with(|| {
                self.next_id += 1;
                json!(self.next_id - 1)
            })
            .clone();
        let mut line = cmd.to_string();
        line.push('\n');
        if let Err(e) = self.stdin.write_all(line.as_bytes()).await {
            self.fail(&format!("cannot write to client.mjs ({e})"));
        }
        self.stdin.flush().await.unwrap();
        id
    }

    /// Sends `cmd` and waits for its ack; returns the ack's `result` (null when
    /// it has none), or the error event's message.
    pub async fn try_call(&mut self, cmd: Value, timeout: Duration) -> Result<Value, String> {
        let what = format!("the answer to {cmd}");
        let id = self.send(cmd).await;
        let v = self
            .wait_for(&what, timeout, |v| {
                (is(v, "ack") || is(v, "error")) && v["id"] == id
            })
            .await;
        if is(&v, "ack") {
            Ok(v.get("result").cloned().unwrap_or(Value::Null))
        } else {
            Err(v["message"].as_str().unwrap_or_default().to_string())
        }
    }

    /// Like [`JsClient::try_call`], but panics on an error event.
    pub async fn call(&mut self, cmd: Value, timeout: Duration) -> Value {
        let what = cmd.to_string();
        match self.try_call(cmd, timeout).await {
            Ok(v) => v,
            Err(e) => self.fail(&format!("command {what} failed: {e}")),
        }
    }

    /// The next event (queued first), or `None` after `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<Value> {
        if let Some(v) = self.queue.pop_front() {
            return Some(v);
        }
        self.read(Instant::now() + timeout).await
    }

    /// Takes the first event for which `pred` holds, queued or new; the events
    /// skipped stay queued. Panics after `timeout`, naming `what`.
    pub async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        if let Some(i) = self.queue.iter().position(&mut pred) {
            return self.queue.remove(i).unwrap();
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read(deadline).await {
                Some(v) if pred(&v) => return v,
                Some(v) => self.queue.push_back(v),
                None => self.fail(&format!("timed out after {timeout:?} waiting for {what}")),
            }
        }
    }

    /// Panics if an event for which `pred` holds is queued or arrives within `wait`.
    pub async fn expect_none(
        &mut self,
        what: &str,
        wait: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) {
        let deadline = Instant::now() + wait;
        let found = match self.queue.iter().find(|v| pred(v)) {
            Some(v) => Some(v.clone()),
            None => loop {
                match self.read(deadline).await {
                    Some(v) if pred(&v) => break Some(v),
                    Some(v) => self.queue.push_back(v),
                    None => break None,
                }
            },
        };
        if let Some(v) = found {
            self.fail(&format!("expected no {what}, got {v}"));
        }
    }

    /// A fenced negative assertion: takes events, queued ones first, up to the
    /// first for which `fence` holds, and panics if one for which `unwanted`
    /// holds comes before it (or the fence does not come within `timeout`).
    /// Returns the fence; events that are neither stay queued.
    ///
    /// The fence is what a second action, made *after* the one that must
    /// produce nothing, must produce: a later INSERT the client does see, a
    /// broadcast from another client… One socket delivers in order, so had the
    /// first action produced something, it would have arrived first. Unlike
    /// [`JsClient::expect_none`], no fixed wait: it is as fast as the fence and
    /// cannot pass because the unwanted event was merely slow.
    pub async fn expect_none_before(
        &mut self,
        what: &str,
        mut unwanted: impl FnMut(&Value) -> bool,
        fence_what: &str,
        mut fence: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> Value {
        let mut i = 0;
        while i < self.queue.len() {
            if fence(&self.queue[i]) {
                return self.queue.remove(i).unwrap();
            }
            if unwanted(&self.queue[i]) {
                let v = self.queue[i].clone();
                self.fail(&format!("expected no {what} before {fence_what}, got {v}"));
            }
            i += 1;
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read(deadline).await {
                Some(v) if fence(&v) => return v,
                Some(v) if unwanted(&v) => {
                    self.fail(&format!("expected no {what} before {fence_what}, got {v}"))
                }
                Some(v) => self.queue.push_back(v),
                None => self.fail(&format!(
                    "timed out after {timeout:?} waiting for {fence_what} (the fence after no {what})"
                )),
            }
        }
    }

    /// Waits for the next `status` event of `channel` and returns its `status`
    /// (`SUBSCRIBED`, `CHANNEL_ERROR`, …).
    pub async fn status(&mut self, channel: &str, timeout: Duration) -> String {
        let what = format!("a status event on channel {channel}");
        let v = self
            .wait_for(&what, timeout, |v| is_on(v, "status", channel))
            .await;
        v["status"].as_str().unwrap_or_default().to_string()
    }

    /// Forgets every queued event.
    pub fn drain(&mut self) -> Vec<Value> {
        self.queue.drain(..).collect()
    }

    /// What the driver wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Asks the driver to exit and waits for it.
    pub async fn exit(mut self) {
        self.send(json!({"cmd": "exit"})).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }

    /// Reads one event from stdout before `deadline`; `None` on timeout. Panics
    /// if the driver exited or wrote something that is not JSON.
    async fn read(&mut self, deadline: Instant) -> Option<Value> {
        let line = match tokio::time::timeout_at(deadline, self.stdout.next_line()).await {
            Err(_) => return None,
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => self.fail("client.mjs exited"),
            Ok(Err(e)) => self.fail(&format!("cannot read client.mjs's output ({e})")),
        };
        if self.recent.len() == SHOWN {
            self.recent.pop_front();
        }
        self.recent.push_back(line.clone());
        match serde_json::from_str(&line) {
            Ok(v) => Some(v),
            Err(e) => self.fail(&format!("client.mjs wrote a non-JSON line ({e}): {line}")),
        }
    }

    fn fail(&self, msg: &str) -> ! {
        let recent: Vec<&str> = self.recent.iter().map(String::as_str).collect();
        panic!(
            "realtime-js driver: {msg}\n--- last {} events:\n{}\n--- stderr:\n{}",
            recent.len(),
            recent.join("\n"),
            self.stderr()
        );
    }
}
