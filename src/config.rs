//! Configuration: connection info for PostgreSQL and the daemon's settings.
//!
//! Database URLs are accepted in both libpq forms (`postgres://user:pw@host:port/db?…`
//! and `host=… user=… dbname=…`). `sslmode` and `sslrootcert` are read here with
//! libpq's meanings (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`)
//! because tokio-postgres only knows the first three; everything else is parsed by
//! tokio-postgres so both connections (replication and SQL) agree on it.

use std::path::PathBuf;
use std::str::FromStr;

/// libpq `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    /// Use TLS when the server offers it, without verifying the certificate (libpq's default).
    #[default]
    Prefer,
    /// TLS, certificate not verified.
    Require,
    /// TLS, certificate chain verified against `sslrootcert`.
    VerifyCa,
    /// TLS, chain verified and the host name checked.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConfigError::Invalid {
                    field: "sslmode".into(),
                    reason: format!(
                        "{other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                    ),
                })
            }
        })
    }
}

/// Where and how to reach PostgreSQL. `Debug` never prints the password.
#[derive(Clone)]
pub struct PgConnInfo {
    /// The URL as given, with `sslmode`/`sslrootcert` removed, for tokio-postgres.
    pub sql_config: tokio_postgres::Config,
    pub hosts: Vec<PgHost>,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub options: Option<String>,
    pub application_name: String,
    pub ssl_mode: SslMode,
    pub ssl_root_cert: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgHost {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

impl std::fmt::Debug for PgConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnInfo")
            .field("hosts", &self.hosts)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("ssl_mode", &self.ssl_mode)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for PgConnInfo {
    /// A description safe to log: host, port, database and user, never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.hosts.first() {
            Some(PgHost::Tcp { host, port }) => write!(f, "{host}:{port}")?,
            Some(PgHost::Unix { path }) => write!(f, "{}", path.display())?,
            None => write!(f, "?")?,
        }
        write!(f, "/{} as {}", self.dbname, self.user)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

impl PgConnInfo {
    /// Parses a libpq URL or key/value connection string. A password may also come from
    /// `PGPASSWORD`.
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let (rest, tls) = split_tls_params(url);
        let ssl_mode = match tls.mode {
            Some(m) => m.parse()?,
            None => SslMode::default(),
        };
        let mut sql_config =
            tokio_postgres::Config::from_str(&rest).map_err(|e| ConfigError::Invalid {
                field: "database URL".into(),
                reason: format!(
                    "{e} (expected postgres://user:password@host:port/dbname or host=… dbname=…)"
                ),
            })?;
        let user = sql_config
            .get_user()
            .map(str::to_string)
            .or_else(|| std::env::var("PGUSER").ok())
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".into());
        sql_config.user(&user);
        let password = sql_config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .or_else(|| std::env::var("PGPASSWORD").ok());
        if let Some(p) = &password {
            sql_config.password(p);
        }
        let dbname = sql_config
            .get_dbname()
            .map(str::to_string)
            .unwrap_or_else(|| user.clone());
        sql_config.dbname(&dbname);
        let application_name = sql_config
            .get_application_name()
            .unwrap_or("walcast")
            .to_string();
        sql_config.application_name(&application_name);
        sql_config.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });

        let ports = sql_config.get_ports();
        let mut hosts = Vec::new();
        for (i, h) in sql_config.get_hosts().iter().enumerate() {
            let port = ports
                .get(i)
                .or_else(|| ports.first())
                .copied()
                .unwrap_or(5432);
            hosts.push(match h {
                tokio_postgres::config::Host::Tcp(host) => PgHost::Tcp {
                    host: host.clone(),
                    port,
                },
                tokio_postgres::config::Host::Unix(dir) => PgHost::Unix {
                    path: dir.join(format!(".s.PGSQL.{port}")),
                },
            });
        }
        if hosts.is_empty() {
            let port = ports.first().copied().unwrap_or(5432);
            hosts.push(PgHost::Tcp {
                host: "localhost".into(),
                port,
            });
            sql_config.host("localhost");
        }
        Ok(PgConnInfo {
            sql_config,
            hosts,
            user,
            password,
            dbname,
            options: None,
            application_name,
            ssl_mode,
            ssl_root_cert: tls.root_cert.map(PathBuf::from),
        })
    }
}

struct TlsParams {
    mode: Option<String>,
    root_cert: Option<String>,
}

/// Removes `sslmode` and `sslrootcert` from a URL's query string or a key/value string.
fn split_tls_params(url: &str) -> (String, TlsParams) {
    let mut tls = TlsParams {
        mode: None,
        root_cert: None,
    };
    let is_tls_key = |k: &str| k == "sslmode" || k == "sslrootcert";
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_string(), tls);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if is_tls_key(k) {
                let v = percent_decode(v);
                if k == "sslmode" {
                    tls.mode = Some(v)
                } else {
                    tls.root_cert = Some(v)
                }
            } else if !pair.is_empty() {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (rest, tls)
    } else {
        let mut kept = Vec::new();
        for tok in url.split_whitespace() {
            match tok.split_once('=') {
                Some((k, v)) if is_tls_key(k.trim()) => {
                    let v = v.trim_matches('\'').to_string();
                    if k.trim() == "sslmode" {
                        tls.mode = Some(v)
                    } else {
                        tls.root_cert = Some(v)
                    }
                }
                _ => kept.push(tok),
            }
        }
        (kept.join(" "), tls)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_url_with_tls_params() {
        let i = PgConnInfo::parse(
            "postgres://app:s3cret@db.example:6543/shop?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(i.user, "app");
        assert_eq!(i.password.as_deref(), Some("s3cret"));
        assert_eq!(i.dbname, "shop");
        assert_eq!(i.ssl_mode, SslMode::VerifyFull);
        assert_eq!(i.ssl_root_cert, Some(PathBuf::from("/tmp/ca.pem")));
        assert_eq!(
            i.hosts,
            vec![PgHost::Tcp {
                host: "db.example".into(),
                port: 6543
            }]
        );
        assert!(!format!("{i:?} {i}").contains("s3cret"));
    }

    #[test]
    fn parses_key_value_form() {
        let i = PgConnInfo::parse("host=/tmp port=5433 user=u dbname=d sslmode=disable").unwrap();
        assert_eq!(i.ssl_mode, SslMode::Disable);
        assert_eq!(
            i.hosts,
            vec![PgHost::Unix {
                path: PathBuf::from("/tmp/.s.PGSQL.5433")
            }]
        );
    }

    #[test]
    fn rejects_unknown_sslmode() {
        let e = PgConnInfo::parse("postgres://u@h/d?sslmode=sometimes").unwrap_err();
        assert!(e.to_string().contains("sslmode"), "{e}");
    }
}

/// Default address: loopback only, so a server without auth configured is not
/// reachable from other machines by accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4000";
/// Phoenix closes sockets silent for 60 s; realtime-js heartbeats every 25 s.
pub const DEFAULT_HEARTBEAT_TIMEOUT_SECS: u64 = 60;
/// Largest WebSocket message accepted from a client.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Frames queued for one connection before it counts as too slow and is closed.
pub const DEFAULT_CLIENT_QUEUE: usize = 4096;
/// Bytes queued for one connection before it counts as too slow and is closed
/// (16 MiB): thousands of ordinary changes, or 64 of the largest broadcasts, so a
/// healthy client never meets it while a stalled one pins at most this much.
pub const DEFAULT_CLIENT_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// How long a new connection may take to send a complete request (headers, the
/// WebSocket upgrade) and an idle HTTP connection may wait for its next one:
/// a real client needs milliseconds; a slowloris socket is dropped.
pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 10;
/// Open TCP connections (WebSockets and HTTP requests) served at once. It is
/// also kept below the process's open-file limit, so `/health` and new clients
/// are refused cleanly rather than failing to accept.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Open connections from one IP address; 0 = no per-address limit (the default,
/// since behind a reverse proxy every client shares the proxy's address).
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 0;
/// Channels one connection may join (Supabase's default is 100).
pub const DEFAULT_CHANNELS_PER_CONNECTION: usize = 100;
/// `postgres_changes` bindings in one join.
pub const DEFAULT_BINDINGS_PER_CHANNEL: usize = 100;
/// Items buffered between the slot reader and the hub; when full, walcast stops
/// reading the slot (backpressure) while status updates continue.
pub const DEFAULT_PIPELINE_CAPACITY: usize = 8192;
/// How long a graceful shutdown waits for sessions to close.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 10;
/// How long replication must be lost (or lag critical) before channels get a
/// `REPLICATION_DOWN` notice: long enough to hide a routine reconnect.
pub const DEFAULT_OUTAGE_NOTICE_SECS: u64 = 5;
/// How long a join with `broadcast.replication_ready` waits for replication before
/// it is told `error` (Supabase's `replication_ready_timeout`).
pub const DEFAULT_REPLICATION_READY_TIMEOUT_SECS: u64 = 60;
/// How often the slot's position is read from PostgreSQL for lag metrics: often enough
/// for alerts measured in minutes, rare enough to cost nothing on the server.
pub const DEFAULT_SLOT_POLL_INTERVAL_SECS: u64 = 5;
/// Seconds behind the newest commit before health is "warning": realtime clients
/// notice a delay of half a minute.
pub const DEFAULT_LAG_SECONDS_WARNING: u64 = 30;
/// Seconds behind before health is "critical" and `/ready` fails: five minutes of
/// delay means the live views are no longer live.
pub const DEFAULT_LAG_SECONDS_CRITICAL: u64 = 300;
/// WAL bytes the slot has not confirmed before "warning" (256 MiB): a few seconds of
/// a busy server's writes; more means walcast is not keeping up.
pub const DEFAULT_LAG_BYTES_WARNING: u64 = 256 * 1024 * 1024;
/// Unconfirmed WAL bytes before "critical" (4 GiB): WAL piles up on the server's disk.
pub const DEFAULT_LAG_BYTES_CRITICAL: u64 = 4 * 1024 * 1024 * 1024;
/// Seconds without a replication connection before "warning": longer than a
/// reconnect after a brief network blip or a PostgreSQL restart takes.
pub const DEFAULT_DISCONNECTED_SECONDS_WARNING: u64 = 15;
/// Seconds without a replication connection before "critical": clients get no
/// changes at all.
pub const DEFAULT_DISCONNECTED_SECONDS_CRITICAL: u64 = 60;
/// Clients dropped (slow, heartbeat timeout, …) per minute before "warning".
pub const DEFAULT_CLIENT_DROPS_PER_MINUTE_WARNING: u64 = 10;
/// Clients dropped per minute before "critical": many clients are being cut off.
pub const DEFAULT_CLIENT_DROPS_PER_MINUTE_CRITICAL: u64 = 100;

/// Largest broadcast payload (JSON or raw bytes). Supabase's default is 256 KiB.
pub const DEFAULT_BROADCAST_MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// Broadcasts per second one connection may push (steady rate).
pub const DEFAULT_MESSAGES_PER_SECOND: u32 = 100;

/// Broadcasts one connection may push in a burst.
pub const DEFAULT_MESSAGES_BURST: u32 = 200;

/// `[broadcast]` in the config file.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BroadcastConfig {
    pub max_payload_bytes: usize,
    pub messages_per_second: u32,
    pub messages_burst: u32,
}

impl Default for BroadcastConfig {
    fn default() -> Self {
        BroadcastConfig {
            max_payload_bytes: DEFAULT_BROADCAST_MAX_PAYLOAD_BYTES,
            messages_per_second: DEFAULT_MESSAGES_PER_SECOND,
            messages_burst: DEFAULT_MESSAGES_BURST,
        }
    }
}

impl BroadcastConfig {
    /// The first field that makes no sense, with why.
    pub fn invalid_field(&self) -> Option<(&'static str, &'static str)> {
        [
            ("broadcast.max_payload_bytes", self.max_payload_bytes),
            (
                "broadcast.messages_per_second",
                self.messages_per_second as usize,
            ),
            ("broadcast.messages_burst", self.messages_burst as usize),
        ]
        .into_iter()
        .find(|(_, v)| *v == 0)
        .map(|(f, _)| (f, "must be at least 1"))
    }
}

fn default_role_claim() -> String {
    "role".into()
}

/// One `[[channels]]` rule: who may read (join) and write (broadcast to) the
/// private channels whose name matches `topic`.
///
/// `topic` is a channel name pattern (`realtime:` prefix optional) where `*`
/// matches any run of characters, e.g. `room:*`. A caller is granted when the
/// claim `role_claim` (default `role`, as in Supabase JWTs) is a string listed in
/// `read_roles` / `write_roles` (`"*"` = any role), and, when `match_claim` is set,
/// the part of the name matched by the pattern's single `*` equals that claim
/// (e.g. `topic = "user:*"`, `match_claim = "sub"`: only user X may use `user:X`).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelRule {
    pub topic: String,
    #[serde(default)]
    pub read_roles: Vec<String>,
    #[serde(default)]
    pub write_roles: Vec<String>,
    #[serde(default = "default_role_claim")]
    pub role_claim: String,
    #[serde(default)]
    pub match_claim: Option<String>,
    /// Presence visibility: for each role, the roles whose presences it sees
    /// (`"*"` = every role). Unset: every member sees every presence. Set: a role
    /// not listed sees only its own presences.
    #[serde(default)]
    pub presence_sees: Option<std::collections::BTreeMap<String, Vec<String>>>,
}

impl ChannelRule {
    /// Why the rule makes no sense, if it does not.
    pub fn invalid(&self) -> Option<&'static str> {
        if crate::config::channel_name(&self.topic).is_empty() {
            return Some("topic must not be empty");
        }
        if self.role_claim.is_empty() {
            return Some("role_claim must not be empty");
        }
        if self.match_claim.is_some()
            && crate::config::channel_name(&self.topic)
                .matches('*')
                .count()
                != 1
        {
            return Some("match_claim needs a topic pattern with exactly one '*'");
        }
        if self.presence_sees.as_ref().is_some_and(|m| {
            m.iter()
                .any(|(k, v)| k.is_empty() || v.iter().any(String::is_empty))
        }) {
            return Some("presence_sees maps role names to lists of role names; none may be empty");
        }
        None
    }
}

/// The channel name of a topic: `realtime:room` → `room`.
pub fn channel_name(topic: &str) -> &str {
    topic.strip_prefix("realtime:").unwrap_or(topic)
}

/// Distinct presence keys on one topic: one per user or device in practice; a
/// room with more is better served by a counter than by presence.
pub const DEFAULT_MAX_KEYS_PER_TOPIC: usize = 1000;

/// Metas under one key (one per tab or device of the same user).
pub const DEFAULT_MAX_METAS_PER_KEY: usize = 16;

/// Largest tracked payload (JSON bytes). Presence state is sent whole to every
/// joiner, so it must stay small.
pub const DEFAULT_PRESENCE_MAX_PAYLOAD_BYTES: usize = 10 * 1024;

/// Tracks per second one connection may make (steady rate).
pub const DEFAULT_TRACKS_PER_SECOND: u32 = 10;

/// Tracks one connection may make in a burst.
pub const DEFAULT_TRACKS_BURST: u32 = 20;

/// `[presence]` in the config file.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    pub max_keys_per_topic: usize,
    pub max_metas_per_key: usize,
    pub max_payload_bytes: usize,
    pub tracks_per_second: u32,
    pub tracks_burst: u32,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            max_keys_per_topic: DEFAULT_MAX_KEYS_PER_TOPIC,
            max_metas_per_key: DEFAULT_MAX_METAS_PER_KEY,
            max_payload_bytes: DEFAULT_PRESENCE_MAX_PAYLOAD_BYTES,
            tracks_per_second: DEFAULT_TRACKS_PER_SECOND,
            tracks_burst: DEFAULT_TRACKS_BURST,
        }
    }
}

impl PresenceConfig {
    /// The first field that makes no sense, with why.
    pub fn invalid_field(&self) -> Option<(&'static str, &'static str)> {
        let zero = [
            ("presence.max_keys_per_topic", self.max_keys_per_topic),
            ("presence.max_metas_per_key", self.max_metas_per_key),
            ("presence.max_payload_bytes", self.max_payload_bytes),
            (
                "presence.tracks_per_second",
                self.tracks_per_second as usize,
            ),
            ("presence.tracks_burst", self.tracks_burst as usize),
        ];
        zero.into_iter()
            .find(|(_, v)| *v == 0)
            .map(|(f, _)| (f, "must be at least 1"))
    }
}

/// Default clock leeway for `exp`/`nbf`/`iat`.
pub const DEFAULT_LEEWAY_SECS: u64 = 10;

/// Least time between two JWKS refreshes caused by unknown `kid`s.
pub const DEFAULT_JWKS_REFRESH_MIN_SECS: u64 = 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No tokens; every published table is subscribable.
    None,
    /// Tokens required; row rules enforced.
    Jwt,
}

#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Unset: like `none`, but only loopback addresses may be served.
    pub mode: Option<AuthMode>,
    /// Secret for HS256/384/512 tokens.
    pub jwt_secret: Option<String>,
    /// JWKS file with public keys (RS*, ES*, EdDSA).
    pub jwks_file: Option<PathBuf>,
    /// JWKS URL with public keys.
    pub jwks_url: Option<String>,
    pub jwks_refresh_min_secs: u64,
    pub leeway_secs: u64,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Roles that see every table and row without rules (e.g. `service_role`).
    pub bypass_roles: Vec<String>,
    pub tables: Vec<TableRule>,
    /// RLS mode for every published table: the database's own row-level
    /// security policies and privileges decide what a subscriber receives.
    pub rls: bool,
    /// RLS mode for these tables only (`schema.table`), when `rls` is off.
    pub rls_tables: Vec<String>,
    /// Compile policies of common shapes into in-memory rules (false: every
    /// policy is checked by SQL).
    pub rls_compile: bool,
    /// Connections for policy reads and SQL checks.
    pub rls_pool: usize,
    /// Time budget of a round of SQL checks, in milliseconds (each check
    /// within it too); the classes a round has not judged by then have their
    /// channels closed.
    pub rls_check_timeout_ms: u64,
    /// Checks waiting for a connection, at most (each: the classes sealed at
    /// one commit, up to 256; beyond: their channels are closed, never a row
    /// skipped).
    pub rls_queue: usize,
    /// How often policies, privileges and roles are checked for changes.
    pub rls_poll_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: None,
            jwt_secret: None,
            jwks_file: None,
            jwks_url: None,
            jwks_refresh_min_secs: DEFAULT_JWKS_REFRESH_MIN_SECS,
            leeway_secs: DEFAULT_LEEWAY_SECS,
            issuer: None,
            audience: None,
            bypass_roles: vec!["service_role".into()],
            tables: Vec::new(),
            rls: false,
            rls_tables: Vec::new(),
            rls_compile: true,
            rls_pool: 4,
            rls_check_timeout_ms: 5_000,
            rls_queue: 4_096,
            rls_poll_ms: 2_000,
        }
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("mode", &self.mode)
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("jwks_file", &self.jwks_file)
            .field("jwks_url", &self.jwks_url)
            .field("tables", &self.tables.len())
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableRule {
    /// `schema.table`.
    pub name: String,
    /// Roles (the `role` claim) that may subscribe; empty = any valid token.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Rows a subscriber may see, in the client filter grammar with `{claims.X}`.
    #[serde(default)]
    pub row_filter: Option<String>,
    /// Columns a subscriber may see; all when absent.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Anyone (any valid token, or none with auth off) sees every row and column.
    #[serde(default)]
    pub public: bool,
}

impl TableRule {
    /// Whether this rule applies to a token with `role` (public rules and rules
    /// without `roles` apply to every role).
    pub fn matches_role(&self, role: Option<&str>) -> bool {
        self.public
            || self.roles.is_empty()
            || role.is_some_and(|r| self.roles.iter().any(|x| x == r))
    }

    /// A role both rules apply to (`None` inside: any role), if there is one.
    fn overlap<'a>(&'a self, other: &'a TableRule) -> Option<Option<&'a str>> {
        let any = |r: &TableRule| r.public || r.roles.is_empty();
        match (any(self), any(other)) {
            (true, true) => Some(None),
            (true, false) => other.roles.first().map(|r| Some(r.as_str())),
            (false, true) => self.roles.first().map(|r| Some(r.as_str())),
            (false, false) => self
                .roles
                .iter()
                .find(|r| other.roles.contains(r))
                .map(|r| Some(r.as_str())),
        }
    }
}

impl AuthConfig {
    /// Checks what needs no filter grammar; the row filters themselves are
    /// parsed by `route::auth::check_row_filters`.
    pub fn validate(&self) -> Result<(), String> {
        if self.mode == Some(AuthMode::Jwt)
            && self.jwt_secret.is_none()
            && self.jwks_file.is_none()
            && self.jwks_url.is_none()
        {
            return Err(
                "auth.mode = \"jwt\" needs auth.jwt_secret, auth.jwks_file or auth.jwks_url".into(),
            );
        }
        if (self.rls || !self.rls_tables.is_empty()) && self.mode != Some(AuthMode::Jwt) {
            return Err("auth.rls needs auth.mode = \"jwt\": policies are judged by the token's role and claims".into());
        }
        if self.rls_pool == 0 || self.rls_queue == 0 || self.rls_check_timeout_ms == 0 {
            return Err(
                "auth.rls_pool, auth.rls_queue and auth.rls_check_timeout_ms must be at least 1"
                    .into(),
            );
        }
        if let Some(t) = self.rls_tables.iter().find(|t| {
            t.split_once('.')
                .is_none_or(|(s, n)| s.is_empty() || n.is_empty())
        }) {
            return Err(format!(
                "auth.rls_tables entries must be schema.table, got {t:?}"
            ));
        }
        for (i, t) in self.tables.iter().enumerate() {
            if t.name
                .split_once('.')
                .is_none_or(|(s, n)| s.is_empty() || n.is_empty())
            {
                return Err(format!(
                    "auth.tables[{i}].name must be schema.table, got {:?}",
                    t.name
                ));
            }
            // Several rules per table are fine when no role can match two of them:
            // otherwise which one applies would depend on their order.
            if let Some((j, other)) = self.tables[..i]
                .iter()
                .enumerate()
                .find(|(_, o)| o.name == t.name && o.overlap(t).is_some())
            {
                let who = match other.overlap(t).flatten() {
                    Some(r) => format!("role {r:?}"),
                    None => "every role".to_string(),
                };
                return Err(format!(
                    "auth.tables[{j}] and auth.tables[{i}] ({}) can both match {who}: give each rule of a table its own roles (a rule without roles, or with public = true, matches every role)",
                    t.name
                ));
            }
        }
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.mode == Some(AuthMode::Jwt)
    }

    /// Whether RLS mode judges `schema.table`.
    pub fn rls_covers(&self, schema: &str, table: &str) -> bool {
        self.enabled()
            && (self.rls
                || self
                    .rls_tables
                    .iter()
                    .any(|t| t.split_once('.') == Some((schema, table))))
    }

    /// Whether RLS mode is on for any table.
    pub fn rls_on(&self) -> bool {
        self.enabled() && (self.rls || !self.rls_tables.is_empty())
    }
}

/// The daemon's configuration (`walcast serve`): a TOML file, then environment
/// variables and flags on top. Every key is documented in `config/walcast.toml`.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    pub postgres: PostgresConfig,
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub values: ValuesConfig,
    pub health: HealthConfig,
    /// `[subscriptions]`: defaults of `postgres_changes` bindings.
    pub subscriptions: SubscriptionsConfig,
    /// `[broadcast]`: payload size and per-connection rate limits.
    pub broadcast: BroadcastConfig,
    /// `[presence]`: bounds on presence state and the track rate.
    pub presence: PresenceConfig,
    /// `[[channels]]`: who may read and write private channels.
    pub channels: Vec<ChannelRule>,
    /// `[auth]`: JWT verification and per-table row rules.
    pub auth: AuthConfig,
    /// `[log]`: the on-disk change log.
    pub log: LogConfig,
    /// `[status]`: who may open the live status page besides a bypass role.
    pub status: StatusConfig,
    /// `[cluster]`: the NATS JetStream stream between `walcast relay` and
    /// gateways (`walcast serve --cluster`).
    pub cluster: ClusterConfig,
}

/// The first token of the subjects gateways talk to each other on
/// (`_walcast_peer.<subject_prefix>.broadcast`, `….presence`); a subject prefix
/// may not start with it.
pub const PEER_ROOT: &str = "_walcast_peer";

/// `[cluster]`: several nodes fed from one slot through NATS JetStream (README,
/// "Running several nodes"). Off unless `nats_url` is set.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS server URL(s), comma-separated (`nats://host:4222`).
    pub nats_url: Option<String>,
    /// The JetStream stream's name.
    pub stream: String,
    /// Subjects are `<subject_prefix>.<schema>.<table>` (and `<prefix>._msg`
    /// for logical decoding messages).
    pub subject_prefix: String,
    /// Bytes the stream keeps; the oldest messages go first.
    pub max_bytes: i64,
    /// Seconds the stream keeps a message.
    pub max_age_secs: u64,
    /// Copies of the stream in a NATS cluster (1, 3 or 5).
    pub replicas: usize,
    /// Seconds JetStream remembers message ids to drop a republished change.
    pub duplicate_window_secs: u64,
    /// Messages the relay has published and JetStream not yet acknowledged, at most.
    pub max_in_flight: usize,
    /// How long the relay waits for JetStream's acknowledgement of a message.
    pub ack_timeout_ms: u64,
    /// Set by `walcast serve --cluster` (not a file key): this process is a gateway.
    #[serde(skip)]
    pub gateway: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats_url: None,
            stream: "WALCAST".into(),
            subject_prefix: "walcast".into(),
            max_bytes: 1024 * 1024 * 1024,
            max_age_secs: 24 * 60 * 60,
            replicas: 1,
            duplicate_window_secs: 120,
            max_in_flight: 1024,
            ack_timeout_ms: 5000,
            gateway: false,
        }
    }
}

impl ClusterConfig {
    /// The field that makes no sense and why, if one does not.
    pub fn invalid_field(&self) -> Option<(&'static str, &'static str)> {
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !token_ok(&self.stream) {
            return Some((
                "cluster.stream",
                "must be letters, digits, '_' or '-' (a JetStream stream name)",
            ));
        }
        if self.subject_prefix.split('.').any(|t| !token_ok(t)) {
            return Some((
                "cluster.subject_prefix",
                "must be dot-separated tokens of letters, digits, '_' or '-' (no wildcards)",
            ));
        }
        if self.subject_prefix.split('.').next() == Some(PEER_ROOT) {
            return Some((
                "cluster.subject_prefix",
                "must not start with _walcast_peer (the gateways' own subjects)",
            ));
        }
        if self.max_bytes < 1024 * 1024 {
            return Some(("cluster.max_bytes", "must be at least 1 MiB (1048576)"));
        }
        if self.max_age_secs == 0 {
            return Some(("cluster.max_age_secs", "must be at least 1"));
        }
        if !matches!(self.replicas, 1..=5) {
            return Some(("cluster.replicas", "must be 1 to 5 (JetStream's limit)"));
        }
        if self.duplicate_window_secs == 0 || self.duplicate_window_secs > self.max_age_secs {
            return Some((
                "cluster.duplicate_window_secs",
                "must be at least 1 and at most max_age_secs",
            ));
        }
        if self.max_in_flight == 0 {
            return Some(("cluster.max_in_flight", "must be at least 1"));
        }
        if self.ack_timeout_ms < 100 {
            return Some(("cluster.ack_timeout_ms", "must be at least 100"));
        }
        if self.gateway && self.nats_url.is_none() {
            return Some((
                "cluster.nats_url",
                "serve --cluster needs the NATS server: set [cluster] nats_url or --nats-url",
            ));
        }
        None
    }
}

/// `[status]`: who may open the status page besides a bypass role.
#[derive(Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// A shared secret that opens `/status` (e.g. for an operator without a JWT).
    pub token: Option<String>,
}

impl std::fmt::Debug for StatusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Default size of the change log (1 GiB).
pub const DEFAULT_LOG_MAX_BYTES: u64 = 1024 * 1024 * 1024;
/// Default age of the change log (24 h): a client away for a day resumes.
pub const DEFAULT_LOG_MAX_AGE_SECS: u64 = 24 * 60 * 60;

/// Default directory of the change log, relative to the working directory.
pub const DEFAULT_LOG_DIR: &str = "walcast-log";

/// `[log]`: the change log, every committed change kept on disk for a while
/// (DESIGN.md "Resume"). On by default; `dir = ""` turns it off.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// The log's directory (created if missing); empty: no log (see [`LogConfig::dir`]).
    pub dir: Option<PathBuf>,
    /// Bytes kept; the oldest segments go first.
    pub max_bytes: u64,
    /// Seconds kept, by commit time.
    pub max_age_secs: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            dir: Some(PathBuf::from(DEFAULT_LOG_DIR)),
            max_bytes: DEFAULT_LOG_MAX_BYTES,
            max_age_secs: DEFAULT_LOG_MAX_AGE_SECS,
        }
    }
}

impl LogConfig {
    /// The log's directory; `None` when the log is off (`dir = ""`).
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_deref().filter(|d| !d.as_os_str().is_empty())
    }
}

#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL; `DATABASE_URL` or `--database-url` override it.
    pub database_url: Option<String>,
    pub slot: String,
    pub publication: String,
    pub create_slot: bool,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            database_url: None,
            slot: "walcast".into(),
            publication: "walcast".into(),
            create_slot: false,
        }
    }
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field(
                "database_url",
                &self.database_url.as_ref().map(|_| "<redacted>"),
            )
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("create_slot", &self.create_slot)
            .finish()
    }
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub heartbeat_timeout_secs: u64,
    pub max_frame_bytes: usize,
    pub shutdown_grace_secs: u64,
    /// A second address serving only `/metrics`, `/health` and `/ready` (e.g. for a
    /// scraper on another network); they are always on `listen` too.
    pub metrics_listen: Option<String>,
    /// Origins whose browser pages may call the HTTP endpoints (CORS); none by
    /// default. `"*"` allows any.
    pub cors_origins: Vec<String>,
    /// Seconds replication must be lost (or lag critical) before `postgres_changes`
    /// channels get a `REPLICATION_DOWN` system message (0: at once).
    pub outage_notice_secs: u64,
    /// Seconds a join asking `broadcast.replication_ready` waits for replication
    /// before it gets a `system` error.
    pub replication_ready_timeout_secs: u64,
    /// Seconds a connection may take to send a complete request (and an idle HTTP
    /// connection to send its next one) before it is dropped.
    pub header_timeout_secs: u64,
    /// Open connections at most; more are refused at accept.
    pub max_connections: usize,
    /// Open connections from one IP address at most; 0 = no limit.
    pub max_connections_per_ip: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN.into(),
            heartbeat_timeout_secs: DEFAULT_HEARTBEAT_TIMEOUT_SECS,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            shutdown_grace_secs: DEFAULT_SHUTDOWN_GRACE_SECS,
            metrics_listen: None,
            cors_origins: Vec::new(),
            outage_notice_secs: DEFAULT_OUTAGE_NOTICE_SECS,
            replication_ready_timeout_secs: DEFAULT_REPLICATION_READY_TIMEOUT_SECS,
            header_timeout_secs: DEFAULT_HEADER_TIMEOUT_SECS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
        }
    }
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub client_queue: usize,
    /// Bytes queued for one connection at most (the frame count is `client_queue`).
    pub client_queue_bytes: usize,
    pub channels_per_connection: usize,
    pub bindings_per_channel: usize,
    pub pipeline_capacity: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            client_queue: DEFAULT_CLIENT_QUEUE,
            client_queue_bytes: DEFAULT_CLIENT_QUEUE_BYTES,
            channels_per_connection: DEFAULT_CHANNELS_PER_CONNECTION,
            bindings_per_channel: DEFAULT_BINDINGS_PER_CHANNEL,
            pipeline_capacity: DEFAULT_PIPELINE_CAPACITY,
        }
    }
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValuesConfig {
    /// Render int8 and numeric as JSON strings (for JavaScript clients).
    pub big_numbers_as_strings: bool,
}

/// Defaults of `postgres_changes` bindings (README "Filters").
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriptionsConfig {
    /// `moves` for bindings that do not say: deliver an UPDATE that takes a row
    /// out of a filter as a DELETE, one that brings it in as an INSERT.
    pub moves: bool,
}

/// Thresholds of the health levels (`walcast_health_status`, `/ready`). Each check is
/// "warning" at or above its warning value and "critical" at or above its critical
/// value; `/ready` fails when replication is disconnected or a lag check is critical.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    pub slot_poll_interval_secs: u64,
    pub lag_seconds_warning: u64,
    pub lag_seconds_critical: u64,
    pub lag_bytes_warning: u64,
    pub lag_bytes_critical: u64,
    pub disconnected_seconds_warning: u64,
    pub disconnected_seconds_critical: u64,
    pub client_drops_per_minute_warning: u64,
    pub client_drops_per_minute_critical: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            slot_poll_interval_secs: DEFAULT_SLOT_POLL_INTERVAL_SECS,
            lag_seconds_warning: DEFAULT_LAG_SECONDS_WARNING,
            lag_seconds_critical: DEFAULT_LAG_SECONDS_CRITICAL,
            lag_bytes_warning: DEFAULT_LAG_BYTES_WARNING,
            lag_bytes_critical: DEFAULT_LAG_BYTES_CRITICAL,
            disconnected_seconds_warning: DEFAULT_DISCONNECTED_SECONDS_WARNING,
            disconnected_seconds_critical: DEFAULT_DISCONNECTED_SECONDS_CRITICAL,
            client_drops_per_minute_warning: DEFAULT_CLIENT_DROPS_PER_MINUTE_WARNING,
            client_drops_per_minute_critical: DEFAULT_CLIENT_DROPS_PER_MINUTE_CRITICAL,
        }
    }
}

impl HealthConfig {
    /// The (name, warning, critical) triples, for validation and reporting.
    pub fn pairs(&self) -> [(&'static str, u64, u64); 4] {
        [
            (
                "lag_seconds",
                self.lag_seconds_warning,
                self.lag_seconds_critical,
            ),
            ("lag_bytes", self.lag_bytes_warning, self.lag_bytes_critical),
            (
                "disconnected_seconds",
                self.disconnected_seconds_warning,
                self.disconnected_seconds_critical,
            ),
            (
                "client_drops_per_minute",
                self.client_drops_per_minute_warning,
                self.client_drops_per_minute_critical,
            ),
        ]
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.slot_poll_interval_secs == 0 {
            return Err(ConfigError::Invalid {
                field: "health.slot_poll_interval_secs".into(),
                reason: "must be at least 1".into(),
            });
        }
        for (name, warning, critical) in self.pairs() {
            if warning == 0 {
                return Err(ConfigError::Invalid {
                    field: format!("health.{name}_warning"),
                    reason: "must be at least 1".into(),
                });
            }
            if warning >= critical {
                return Err(ConfigError::Invalid {
                    field: format!("health.{name}_warning"),
                    reason: format!(
                        "must be below health.{name}_critical ({warning} >= {critical})"
                    ),
                });
            }
        }
        Ok(())
    }
}

impl ServeConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let c: ServeConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Checks values that parse but make no sense; names the bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, reason: &str| {
            Err(ConfigError::Invalid {
                field: field.into(),
                reason: reason.into(),
            })
        };
        let Ok(listen) = self.server.listen.parse::<std::net::SocketAddr>() else {
            return bad(
                "server.listen",
                "must be an IP address and port, e.g. 127.0.0.1:4000",
            );
        };
        // Secure by default: without an explicit auth mode, only loopback is served.
        if self.auth.mode.is_none() && !listen.ip().is_loopback() {
            return bad(
                "server.listen",
                "serving a non-loopback address needs authentication: configure [auth] mode = \"jwt\" with a secret or JWKS, or say mode = \"none\" explicitly to serve without auth",
            );
        }
        if let Err(e) = self.auth.validate() {
            return bad("auth", &e);
        }
        if let Some(m) = &self.server.metrics_listen {
            if m.parse::<std::net::SocketAddr>().is_err() {
                return bad(
                    "server.metrics_listen",
                    "must be an IP address and port, e.g. 127.0.0.1:9187",
                );
            }
        }
        for (i, o) in self.server.cors_origins.iter().enumerate() {
            if let Some(reason) = invalid_origin(o) {
                return bad(&format!("server.cors_origins[{i}] ({o:?})"), reason);
            }
        }
        if self.server.heartbeat_timeout_secs < 30 {
            return bad(
                "server.heartbeat_timeout_secs",
                "must be at least 30 (clients heartbeat every 25 s)",
            );
        }
        if self.server.replication_ready_timeout_secs == 0 {
            return bad(
                "server.replication_ready_timeout_secs",
                "must be at least 1",
            );
        }
        if self.server.max_frame_bytes < 1024 {
            return bad("server.max_frame_bytes", "must be at least 1024");
        }
        for (field, v) in [
            ("limits.client_queue", self.limits.client_queue),
            ("limits.client_queue_bytes", self.limits.client_queue_bytes),
            (
                "server.header_timeout_secs",
                self.server.header_timeout_secs as usize,
            ),
            ("server.max_connections", self.server.max_connections),
            (
                "limits.channels_per_connection",
                self.limits.channels_per_connection,
            ),
            (
                "limits.bindings_per_channel",
                self.limits.bindings_per_channel,
            ),
            ("limits.pipeline_capacity", self.limits.pipeline_capacity),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1");
            }
        }
        if let Err(reason) = validate_slot_name(&self.postgres.slot) {
            return bad("postgres.slot", &reason);
        }
        if self.postgres.publication.is_empty() {
            return bad("postgres.publication", "must not be empty");
        }
        if let Some((field, reason)) = self
            .broadcast
            .invalid_field()
            .or_else(|| self.presence.invalid_field())
        {
            return bad(field, reason);
        }
        for (i, rule) in self.channels.iter().enumerate() {
            if let Some(reason) = rule.invalid() {
                return bad(&format!("channels[{i}] ({:?})", rule.topic), reason);
            }
        }
        if self.log.dir().is_some() {
            if self.log.max_bytes < 4 * 1024 * 1024 {
                return bad("log.max_bytes", "must be at least 4 MiB (4194304)");
            }
            if self.log.max_age_secs == 0 {
                return bad("log.max_age_secs", "must be at least 1");
            }
        }
        if let Some((field, reason)) = self.cluster.invalid_field() {
            return bad(field, reason);
        }
        self.health.validate()
    }
}

/// Why a `cors_origins` entry is not an origin, if it is not: `"*"` or
/// `scheme://host[:port]` with no path.
pub fn invalid_origin(origin: &str) -> Option<&'static str> {
    if origin == "*" {
        return None;
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return Some("must be \"*\" or scheme://host[:port], e.g. https://app.example.com");
    };
    if scheme.is_empty() || rest.is_empty() {
        return Some("must be \"*\" or scheme://host[:port], e.g. https://app.example.com");
    }
    if rest.contains('/') {
        return Some("an origin has no path or trailing slash, e.g. https://app.example.com");
    }
    None
}

/// Slot names: lower-case letters, digits and underscores, at most 63 characters.
pub fn validate_slot_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!(
            "invalid slot name {name:?}: use only lower-case letters, digits and underscores (at most 63)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod health_tests {
    use super::*;

    #[test]
    fn health_section_parses_and_names_bad_fields() {
        let c = ServeConfig::from_toml(
            "[health]\nlag_seconds_warning = 2\nlag_seconds_critical = 9\n[server]\nmetrics_listen = \"127.0.0.1:9187\"\n",
        )
        .unwrap();
        assert_eq!(c.health.lag_seconds_warning, 2);
        assert_eq!(c.health.lag_bytes_critical, DEFAULT_LAG_BYTES_CRITICAL);
        let e =
            ServeConfig::from_toml("[health]\nlag_bytes_warning = 10\nlag_bytes_critical = 10\n")
                .unwrap_err();
        assert!(e.to_string().contains("health.lag_bytes_warning"), "{e}");
        let e = ServeConfig::from_toml("[health]\nlag_secs = 1\n").unwrap_err();
        assert!(e.to_string().contains("lag_secs"), "{e}");
        let e = ServeConfig::from_toml("[server]\nmetrics_listen = \"nope\"\n").unwrap_err();
        assert!(e.to_string().contains("server.metrics_listen"), "{e}");
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::*;

    #[test]
    fn a_subject_prefix_cannot_take_the_gateways_own_subjects() {
        let ok = ServeConfig::from_toml("[cluster]\nsubject_prefix = \"shop.live\"\n").unwrap();
        assert_eq!(ok.cluster.subject_prefix, "shop.live");
        for bad in ["_walcast_peer", "_walcast_peer.x", "a.>"] {
            let e = ServeConfig::from_toml(&format!("[cluster]\nsubject_prefix = {bad:?}\n"))
                .unwrap_err();
            assert!(
                e.to_string().contains("cluster.subject_prefix"),
                "{bad}: {e}"
            );
        }
    }
}
