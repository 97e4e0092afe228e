//! A gating TCP relay between a replication client and PostgreSQL.
//!
//! A catch-up drain must start timing when the consumer is ready, not when its
//! process starts: walcast begins reading its slot as soon as it runs, before the
//! benchmark's WebSocket client has joined, and changes routed before the join go
//! nowhere. So each consumer (walcast and `pg_recvlogical` alike, for a fair
//! comparison) connects to PostgreSQL through this relay. The relay forwards the
//! server's messages until it has passed on a `CopyBothResponse` (`W`: the
//! replication stream has started), then holds the rest of that connection's
//! server → client bytes until [`Relay::release`]. Other connections (catalog
//! queries) pass through untouched. After the release the relay is a plain copy
//! with large buffers; both consumers pay the same extra hop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Buffer of the relay's copy loops.
const COPY_BUFFER: usize = 256 * 1024;
/// How long a held stream may wait for its release.
const HOLD_LIMIT: Duration = Duration::from_secs(900);
/// `SSLRequest` / `GSSENCRequest` codes: answered with one untagged byte.
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

pub struct Relay {
    pub port: u16,
    /// When a replication stream started (`W` passed), per the relay's clock.
    started: watch::Receiver<Option<Instant>>,
    release: watch::Sender<bool>,
    stop: CancellationToken,
}

impl Relay {
    /// Listens on a free 127.0.0.1 port and relays to `upstream_port`.
    pub async fn start(upstream_port: u16) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (started_tx, started) = watch::channel(None);
        let (release, release_rx) = watch::channel(false);
        let stop = CancellationToken::new();
        let started_tx = Arc::new(started_tx);
        let stop2 = stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop2.cancelled() => break,
                    a = listener.accept() => a,
                };
                let Ok((client, _)) = accepted else { break };
                let started_tx = started_tx.clone();
                let release_rx = release_rx.clone();
                let stop = stop2.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = relay_one(client, upstream_port, started_tx, release_rx) => {}
                    }
                });
            }
        });
        Ok(Relay {
            port,
            started,
            release,
            stop,
        })
    }

    /// Waits until a replication stream has started through the relay.
    pub async fn stream_started(&self, limit: Duration) -> Result<Instant> {
        let mut rx = self.started.clone();
        let r = tokio::time::timeout(limit, rx.wait_for(Option::is_some))
            .await
            .context("no replication stream started through the relay")?
            .context("relay stopped")?;
        Ok(r.expect("checked is_some"))
    }

    /// Lets held streams flow; returns the release instant.
    pub fn release(&self) -> Instant {
        let now = Instant::now();
        let _ = self.release.send(true);
        now
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn relay_one(
    mut client: TcpStream,
    upstream_port: u16,
    started: Arc<watch::Sender<Option<Instant>>>,
    release: watch::Receiver<bool>,
) -> Result<()> {
    client.set_nodelay(true)?;
    let mut server = TcpStream::connect(("127.0.0.1", upstream_port)).await?;
    server.set_nodelay(true)?;
    // The first 8 bytes tell an SSL/GSS request (answered with one untagged byte)
    // from a startup message (whose answers are all tagged messages).
    let mut first = [0u8; 8];
    client.read_exact(&mut first).await?;
    server.write_all(&first).await?;
    let code = u32::from_be_bytes([first[4], first[5], first[6], first[7]]);
    if code == SSL_REQUEST || code == GSSENC_REQUEST {
        let mut answer = [0u8; 1];
        server.read_exact(&mut answer).await?;
        client.write_all(&answer).await?;
        if answer[0] != b'N' {
            bail!("the relay cannot gate an encrypted connection: use sslmode=disable");
        }
    }
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async move {
        let mut buf = vec![0u8; COPY_BUFFER];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                let _ = sw.shutdown().await;
                return Ok::<(), anyhow::Error>(());
            }
            sw.write_all(&buf[..n]).await?;
        }
    };
    let down = async move {
        let mut buf = vec![0u8; COPY_BUFFER];
        let mut pending: Vec<u8> = Vec::new();
        // Phase 1: whole messages until a CopyBothResponse.
        let mut streaming = false;
        while !streaming {
            let n = sr.read(&mut buf).await?;
            if n == 0 {
                cw.write_all(&pending).await?;
                return Ok::<(), anyhow::Error>(());
            }
            pending.extend_from_slice(&buf[..n]);
            let mut at = 0;
            while pending.len() - at >= 5 {
                let len = u32::from_be_bytes([
                    pending[at + 1],
                    pending[at + 2],
                    pending[at + 3],
                    pending[at + 4],
                ]) as usize;
                let end = at + 1 + len;
                if len < 4 || pending.len() < end {
                    break;
                }
                let tag = pending[at];
                at = end;
                if tag == b'W' {
                    streaming = true;
                    break;
                }
            }
            cw.write_all(&pending[..at]).await?;
            pending.drain(..at);
        }
        let _ = started.send(Some(Instant::now()));
        // Phase 2: hold until released, then copy.
        let mut release = release;
        tokio::time::timeout(HOLD_LIMIT, release.wait_for(|r| *r))
            .await
            .context("relay held a stream past its limit")?
            .context("relay stopped")?;
        cw.write_all(&pending).await?;
        loop {
            let n = sr.read(&mut buf).await?;
            if n == 0 {
                let _ = cw.shutdown().await;
                return Ok(());
            }
            cw.write_all(&buf[..n]).await?;
        }
    };
    let (a, b) = tokio::join!(up, down);
    a.and(b)
}
