//! Counters of the delivery side: connections, frames, and client events by
//! reason. The server's metrics read them; nothing here takes a lock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::deliver::frame::{CLOSE_FRAME_TOO_LARGE, CLOSE_HEARTBEAT_TIMEOUT};
use crate::route::hub::CLOSE_SLOW_CLIENT;

/// Counters of the WebSocket side (read by metrics).
#[derive(Debug, Default)]
pub struct WsStats {
    pub connections: AtomicI64,
    pub connections_total: AtomicU64,
    pub channels: AtomicI64,
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub malformed_frames: AtomicU64,
    pub joins_ok: AtomicU64,
    pub joins_error: AtomicU64,
    /// Clients dropped and auth failures, by reason.
    pub events: ClientEvents,
}

/// Why the server closed a client (label `reason` of `walcast_clients_dropped_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Its outbound queue was full (it could not keep up).
    SlowClient,
    /// It sent nothing, not even heartbeats, for too long.
    HeartbeatTimeout,
    /// Any other server-initiated close (auth expiry, …).
    Other,
}

impl DropReason {
    pub const ALL: [DropReason; 3] = [
        DropReason::SlowClient,
        DropReason::HeartbeatTimeout,
        DropReason::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::SlowClient => "slow_client",
            DropReason::HeartbeatTimeout => "heartbeat_timeout",
            DropReason::Other => "other",
        }
    }

    /// The reason for a close code the server sent.
    pub fn from_close_code(code: u16) -> DropReason {
        match code {
            CLOSE_SLOW_CLIENT => DropReason::SlowClient,
            CLOSE_HEARTBEAT_TIMEOUT => DropReason::HeartbeatTimeout,
            _ => DropReason::Other,
        }
    }
}

/// How a WebSocket connection ended (label `reason` of
/// `walcast_websocket_disconnects_total`). Every connection ends with exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The client sent a close frame (the server answered it).
    ClientClose,
    /// The socket ended without a close frame: reset, EOF or a write error.
    ConnectionLost,
    /// The client sent nothing, not even heartbeats, for too long (4000).
    HeartbeatTimeout,
    /// The client's outbound queue overflowed, in frames or bytes (4008).
    SlowClient,
    /// The client sent a frame over `server.max_frame_bytes` (1009).
    FrameTooLarge,
    /// The server shut down (1001).
    Shutdown,
    /// Any other close the server initiated.
    ServerClose,
}

impl DisconnectReason {
    pub const ALL: [DisconnectReason; 7] = [
        DisconnectReason::ClientClose,
        DisconnectReason::ConnectionLost,
        DisconnectReason::HeartbeatTimeout,
        DisconnectReason::SlowClient,
        DisconnectReason::FrameTooLarge,
        DisconnectReason::Shutdown,
        DisconnectReason::ServerClose,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::ClientClose => "client_close",
            DisconnectReason::ConnectionLost => "connection_lost",
            DisconnectReason::HeartbeatTimeout => "heartbeat_timeout",
            DisconnectReason::SlowClient => "slow_client",
            DisconnectReason::FrameTooLarge => "frame_too_large",
            DisconnectReason::Shutdown => "shutdown",
            DisconnectReason::ServerClose => "server_close",
        }
    }

    /// The reason for a close code the server sent.
    pub fn of_close_code(code: u16) -> DisconnectReason {
        match code {
            CLOSE_SLOW_CLIENT => DisconnectReason::SlowClient,
            CLOSE_HEARTBEAT_TIMEOUT => DisconnectReason::HeartbeatTimeout,
            CLOSE_FRAME_TOO_LARGE => DisconnectReason::FrameTooLarge,
            1001 => DisconnectReason::Shutdown,
            _ => DisconnectReason::ServerClose,
        }
    }
}

/// Why a TCP connection was refused or dropped before it became a request or a
/// WebSocket (label `reason` of `walcast_connections_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseReason {
    /// `server.max_connections` connections were open.
    GlobalLimit,
    /// `server.max_connections_per_ip` connections from that address were open.
    IpLimit,
    /// The request (headers, upgrade) did not arrive within `server.header_timeout_secs`.
    HeaderTimeout,
}

impl RefuseReason {
    pub const ALL: [RefuseReason; 3] = [
        RefuseReason::GlobalLimit,
        RefuseReason::IpLimit,
        RefuseReason::HeaderTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::GlobalLimit => "global_limit",
            RefuseReason::IpLimit => "ip_limit",
            RefuseReason::HeaderTimeout => "header_timeout",
        }
    }
}

/// Why a client's credentials were refused (label `reason` of
/// `walcast_auth_failures_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `apikey` / access token where one is required.
    MissingToken,
    /// Bad signature, malformed, wrong audience or algorithm.
    InvalidToken,
    /// The token's `exp` has passed.
    Expired,
    /// A valid token whose claims do not allow what was asked.
    Forbidden,
}

impl AuthFailure {
    /// The metric reason of a refused token.
    pub fn of(e: &crate::route::auth::AuthError) -> AuthFailure {
        match e {
            crate::route::auth::AuthError::Missing => AuthFailure::MissingToken,
            crate::route::auth::AuthError::Expired => AuthFailure::Expired,
            _ => AuthFailure::InvalidToken,
        }
    }

    pub const ALL: [AuthFailure; 4] = [
        AuthFailure::MissingToken,
        AuthFailure::InvalidToken,
        AuthFailure::Expired,
        AuthFailure::Forbidden,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::MissingToken => "missing_token",
            AuthFailure::InvalidToken => "invalid_token",
            AuthFailure::Expired => "expired",
            AuthFailure::Forbidden => "forbidden",
        }
    }
}

/// Client events counted by reason; each function logs and counts its event.
#[derive(Debug, Default)]
pub struct ClientEvents {
    dropped: [AtomicU64; DropReason::ALL.len()],
    auth_failures: [AtomicU64; AuthFailure::ALL.len()],
    disconnects: [AtomicU64; DisconnectReason::ALL.len()],
    refused: [AtomicU64; RefuseReason::ALL.len()],
}

impl ClientEvents {
    /// A WebSocket connection ended: logs it and counts it by reason.
    pub fn disconnected(&self, conn: u64, reason: DisconnectReason) {
        self.disconnects[reason as usize].fetch_add(1, Ordering::Relaxed);
        tracing::debug!(conn, reason = reason.as_str(), "disconnected");
    }

    pub fn disconnects(&self, reason: DisconnectReason) -> u64 {
        self.disconnects[reason as usize].load(Ordering::Relaxed)
    }

    /// A TCP connection refused or dropped before it was served: logs it (debug:
    /// a flood must not flood the log too) and counts it by reason.
    pub fn refused(&self, peer: SocketAddr, reason: RefuseReason) {
        self.refused[reason as usize].fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, reason = reason.as_str(), "connection refused");
    }

    pub fn refusals(&self, reason: RefuseReason) -> u64 {
        self.refused[reason as usize].load(Ordering::Relaxed)
    }

    /// A connection the server closed with `code`: logs it and counts it by reason.
    pub fn client_dropped(&self, conn: u64, code: u16, reason: &str) {
        let r = DropReason::from_close_code(code);
        self.dropped[r as usize].fetch_add(1, Ordering::Relaxed);
        tracing::info!(conn, code, reason = r.as_str(), detail = %reason, "client dropped");
    }

    /// Credentials refused: logs it and counts it by reason.
    pub fn auth_failed(&self, reason: AuthFailure, peer: SocketAddr) {
        self.auth_failures[reason as usize].fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, reason = reason.as_str(), "authentication failed");
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    pub fn auth_failures(&self, reason: AuthFailure) -> u64 {
        self.auth_failures[reason as usize].load(Ordering::Relaxed)
    }
}
