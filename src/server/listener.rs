//! Accepting connections: the connection limits and the request timeout that
//! keep slow or silent sockets (slowloris) from holding the server.
//!
//! Every accepted TCP connection takes a [`Permit`] that lives exactly as long as
//! its socket — through the HTTP exchange and, after an upgrade, the WebSocket —
//! so `server.max_connections` and `server.max_connections_per_ip` count every
//! open connection. Over a limit the socket gets a one-line 503 (best effort) and
//! is closed at once. The global limit is also kept below the process's
//! open-file limit, so walcast refuses cleanly instead of failing to accept.
//!
//! A connection that has not been upgraded must send a complete request within
//! `server.header_timeout_secs` of being accepted or of its previous response,
//! and each request is handled within another such window; otherwise it is
//! dropped. A WebSocket, once upgraded, is watched by its heartbeat timeout
//! instead. Every refusal and drop is counted by reason
//! (`walcast_connections_refused_total`). HTTP/1.1 is served by hyper directly
//! (the accept loop `axum::serve` would run has no such timer).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::service::Service as _;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::deliver::stats::RefuseReason;
use crate::deliver::stats::WsStats;

/// Descriptors kept free of connections when the open-file limit caps
/// `max_connections`: the replication and SQL connections, the listeners, logs
/// and what the runtime holds, with room to spare.
const FD_RESERVE: usize = 32;

/// After a failed accept (out of descriptors, typically), wait this long before
/// the next, so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// What a refused connection is told before it is closed.
const REFUSED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 50\r\nConnection: close\r\n\r\n{\"error\": \"too many connections: try again later\"}";

/// The connection limits of one listener.
pub struct Limits {
    max: usize,
    max_per_ip: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl Limits {
    /// `max_per_ip = 0`: no per-address limit.
    pub fn new(max: usize, max_per_ip: usize) -> Arc<Limits> {
        Arc::new(Limits {
            max,
            max_per_ip,
            open: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        // Plain counters: nothing a panic elsewhere could leave half-done.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A permit for one more connection from `ip`, or why not.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, RefuseReason> {
        let mut open = self.lock();
        if open.total >= self.max {
            return Err(RefuseReason::GlobalLimit);
        }
        let n = open.per_ip.entry(ip).or_default();
        if self.max_per_ip > 0 && *n >= self.max_per_ip {
            return Err(RefuseReason::IpLimit);
        }
        *n += 1;
        open.total += 1;
        Ok(Permit {
            limits: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().total
    }
}

/// One open connection, counted until dropped.
pub struct Permit {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.limits.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.per_ip.remove(&self.ip);
            }
        }
    }
}

/// A TCP stream that holds its connection's [`Permit`].
struct Counted {
    tcp: TcpStream,
    _permit: Permit,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// How one listener accepts and times connections.
#[derive(Clone, Copy, Debug)]
pub struct ListenOptions {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub header_timeout: Duration,
}

impl ListenOptions {
    pub fn of(server: &crate::config::ServerConfig) -> Self {
        ListenOptions {
            max_connections: server.max_connections,
            max_connections_per_ip: server.max_connections_per_ip,
            header_timeout: Duration::from_secs(server.header_timeout_secs),
        }
    }
}

/// The soft limit on open files of this process (`/proc/self/limits`), if known.
fn open_file_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `max_connections`, lowered to fit the open-file limit (with a warning).
fn effective_max(configured: usize) -> usize {
    match open_file_limit() {
        Some(fds) if fds.saturating_sub(FD_RESERVE) < configured => {
            let max = fds.saturating_sub(FD_RESERVE).max(1);
            tracing::warn!(
                configured,
                open_file_limit = fds,
                effective = max,
                "server.max_connections is above what the open-file limit allows; raise the limit (ulimit -n, LimitNOFILE=) to serve more"
            );
            max
        }
        _ => configured,
    }
}

/// Serves `app` on `listener` until `stop`, under `opts`. Connections being served
/// when it stops are asked to finish their request and close.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    opts: ListenOptions,
    stats: Arc<WsStats>,
    stop: CancellationToken,
) {
    let limits = Limits::new(
        effective_max(opts.max_connections),
        opts.max_connections_per_ip,
    );
    let conns = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let permit = match limits.acquire(peer.ip()) {
            Ok(p) => p,
            Err(reason) => {
                stats.events.refused(peer, reason);
                // Best effort: a client that is not reading gets nothing.
                let _ = tcp.try_write(REFUSED_RESPONSE);
                continue;
            }
        };
        // No Nagle: a change frame written while the previous one is still
        // unacknowledged would otherwise wait for the client's delayed ACK (up to
        // 40 ms). The writer already batches what is queued into one flush.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let io = TokioIo::new(Counted {
            tcp,
            _permit: permit,
        });
        conns.spawn(serve_connection(
            io,
            peer,
            app.clone(),
            opts.header_timeout,
            stats.clone(),
            stop.clone(),
        ));
    }
    conns.close();
    conns.wait().await;
}

/// Marks a response whose body streams for as long as the client stays (the
/// status page's server-sent events): the request deadline does not cut it.
#[derive(Clone, Copy, Debug)]
pub struct LongLived;

/// The deadline of a connection serving a [`LongLived`] response.
const LONG_LIVED: Duration = Duration::from_secs(365 * 24 * 3600);

/// A deadline shared between a connection's task and its requests, as
/// milliseconds since `base`.
struct Deadline {
    base: Instant,
    at_ms: AtomicU64,
}

impl Deadline {
    fn new(after: Duration) -> Arc<Deadline> {
        let d = Arc::new(Deadline {
            base: Instant::now(),
            at_ms: AtomicU64::new(0),
        });
        d.push(after);
        d
    }

    /// Moves the deadline to `after` from now.
    fn push(&self, after: Duration) {
        let ms = (Instant::now() + after - self.base).as_millis() as u64;
        self.at_ms.store(ms, Ordering::Relaxed);
    }

    fn at(&self) -> Instant {
        self.base + Duration::from_millis(self.at_ms.load(Ordering::Relaxed))
    }
}

/// One connection: HTTP/1.1 with upgrades, dropped when it misses its deadline.
async fn serve_connection(
    io: TokioIo<Counted>,
    peer: SocketAddr,
    app: Router,
    timeout: Duration,
    stats: Arc<WsStats>,
    stop: CancellationToken,
) {
    let deadline = Deadline::new(timeout);
    let svc = {
        let deadline = deadline.clone();
        let inner = TowerToHyperService::new(app);
        hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            // The request is in: handling it gets a window of its own.
            deadline.push(timeout);
            let call = inner.call(req);
            let deadline = deadline.clone();
            async move {
                let response = call.await;
                // The next request must come within the window too; a response
                // marked long-lived (an event stream) holds the connection.
                let long =
                    matches!(&response, Ok(r) if r.extensions().get::<LongLived>().is_some());
                deadline.push(if long { LONG_LIVED } else { timeout });
                Ok::<_, Infallible>(match response {
                    Ok(r) => r,
                    Err(never) => match never {},
                })
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let at = deadline.at();
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(at) => {
                if deadline.at() <= Instant::now() {
                    stats.events.refused(peer, RefuseReason::HeaderTimeout);
                    return;
                }
            }
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_globally_and_per_address_and_release_on_drop() {
        let limits = Limits::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = limits.acquire(a).unwrap();
        let a2 = limits.acquire(a).unwrap();
        assert_eq!(limits.acquire(a).err(), Some(RefuseReason::IpLimit));
        let b1 = limits.acquire(b).unwrap();
        assert_eq!(limits.acquire(b).err(), Some(RefuseReason::GlobalLimit));
        drop(a1);
        assert_eq!(limits.open(), 2);
        let a3 = limits.acquire(a).unwrap();
        drop((a2, a3, b1));
        assert_eq!(limits.open(), 0);
        assert!(limits.lock().per_ip.is_empty());
    }

    #[test]
    fn no_per_address_limit_when_zero() {
        let limits = Limits::new(10, 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let permits: Vec<_> = (0..10).map(|_| limits.acquire(a).unwrap()).collect();
        assert_eq!(limits.acquire(a).err(), Some(RefuseReason::GlobalLimit));
        drop(permits);
        assert_eq!(limits.open(), 0);
    }

    #[test]
    fn reads_the_open_file_limit() {
        // Linux has /proc; the value is whatever this process runs with.
        if std::path::Path::new("/proc/self/limits").exists() {
            assert!(open_file_limit().is_some_and(|n| n > 0));
        }
    }
}
