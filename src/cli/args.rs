//! The command line: `walcast <command> [flags]`.
//!
//! Exit codes: 0 success (including a clean stop on SIGINT/SIGTERM), 1 a runtime
//! error (the message says what to do), 2 a usage or configuration error.

use clap::{Args, Parser, Subcommand};

use crate::lsn::Lsn;

#[derive(Debug, Parser)]
#[command(
    name = "walcast",
    version,
    about = "Stream PostgreSQL changes from a logical replication slot to WebSocket clients (Supabase Realtime protocol)",
    long_about = None
)]
pub struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info`, `walcast=debug`. Also RUST_LOG.
    #[arg(long, global = true, env = "WALCAST_LOG", default_value = "info")]
    pub log: String,

    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print every change of a publication as one JSON object per line.
    Tail(TailArgs),
    /// Run the daemon: stream changes to WebSocket clients (Supabase Realtime protocol).
    Serve(ServeArgs),
    /// Read the slot and publish every committed change to the cluster's NATS
    /// JetStream stream (needs [cluster] nats_url); a second relay waits as standby.
    Relay(ServeArgs),
    /// Create or update the publication (and optionally the slot and replica identity).
    Setup(SetupArgs),
    /// Show the server, slot and publication as walcast sees them, with warnings.
    Status(StatusArgs),
    /// Drop the slot and/or the publication.
    Teardown(TeardownArgs),
    /// Try walcast in one command: a throwaway PostgreSQL with a bakery, live traffic, and `serve`.
    Demo(DemoArgs),
    /// Check a config file: print "ok", or name the bad field and exit 2.
    CheckConfig(CheckConfigArgs),
    /// Print the change log ([log] dir) as one JSON object per change: the audit trail.
    Log(LogArgs),
}

/// Where to connect and which slot and publication to use.
#[derive(Debug, Args, Clone)]
pub struct SourceArgs {
    /// PostgreSQL connection URL (postgres://user:password@host:port/db?sslmode=…).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,

    /// Logical replication slot to consume.
    #[arg(long, default_value = "walcast")]
    pub slot: String,

    /// Publication whose tables to stream.
    #[arg(long, default_value = "walcast")]
    pub publication: String,

    /// Create the slot if it does not exist.
    #[arg(long)]
    pub create_slot: bool,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub source: SourceArgs,

    /// Use a temporary slot, dropped when walcast disconnects (changes made while
    /// walcast is not connected are not kept).
    #[arg(long)]
    pub temporary: bool,

    /// Start from this LSN (X/Y) instead of the slot's confirmed position.
    #[arg(long)]
    pub start_lsn: Option<Lsn>,

    /// Render int8 and numeric values as JSON strings.
    #[arg(long)]
    pub big_numbers_as_strings: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (see config/walcast.toml); flags and environment override it.
    #[arg(long, env = "WALCAST_CONFIG")]
    pub config: Option<std::path::PathBuf>,

    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// Logical replication slot to consume [default: walcast].
    #[arg(long)]
    pub slot: Option<String>,

    /// Publication whose tables to stream [default: walcast].
    #[arg(long)]
    pub publication: Option<String>,

    /// Create the slot if it does not exist.
    #[arg(long)]
    pub create_slot: bool,

    /// Address for HTTP and WebSocket [default: 127.0.0.1:4000].
    #[arg(long, env = "WALCAST_LISTEN")]
    pub listen: Option<String>,

    /// Authentication: `jwt` (tokens required, row rules enforced) or `none`
    /// (explicitly no auth). Unset: no auth, loopback addresses only.
    #[arg(long, env = "WALCAST_AUTH_MODE", value_parser = ["jwt", "none"])]
    pub auth_mode: Option<String>,

    /// Secret for HS256/384/512 tokens (prefer the environment variable to the flag).
    #[arg(long, env = "WALCAST_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// NATS server URL of a cluster ([cluster] nats_url).
    #[arg(long, env = "WALCAST_NATS_URL")]
    pub nats_url: Option<String>,

    /// Run as a gateway of a cluster: consume the relay's JetStream stream
    /// instead of the slot (needs [cluster] nats_url).
    #[arg(long)]
    pub cluster: bool,
}

impl ServeArgs {
    /// The config file (or defaults) with flags and environment applied.
    pub fn into_config(self) -> Result<crate::config::ServeConfig, crate::config::ConfigError> {
        let mut c = match &self.config {
            Some(p) => crate::config::ServeConfig::from_file(p)?,
            None => crate::config::ServeConfig::default(),
        };
        if self.database_url.is_some() {
            c.postgres.database_url = self.database_url;
        }
        if let Some(s) = self.slot {
            c.postgres.slot = s;
        }
        if let Some(p) = self.publication {
            c.postgres.publication = p;
        }
        if self.create_slot {
            c.postgres.create_slot = true;
        }
        if let Some(l) = self.listen {
            c.server.listen = l;
        }
        match self.auth_mode.as_deref() {
            Some("jwt") => c.auth.mode = Some(crate::route::auth::AuthMode::Jwt),
            Some("none") => c.auth.mode = Some(crate::route::auth::AuthMode::None),
            _ => {}
        }
        if self.jwt_secret.is_some() {
            c.auth.jwt_secret = self.jwt_secret;
        }
        if self.nats_url.is_some() {
            c.cluster.nats_url = self.nats_url;
        }
        c.cluster.gateway = self.cluster;
        c.validate()?;
        check_feature_rules(&c)?;
        Ok(c)
    }
}

/// The checks of a config that need a feature's grammar (row filters), on top of
/// [`crate::config::ServeConfig::validate`].
pub fn check_feature_rules(
    c: &crate::config::ServeConfig,
) -> Result<(), crate::config::ConfigError> {
    crate::route::auth::check_row_filters(&c.auth).map_err(|reason| {
        crate::config::ConfigError::Invalid {
            field: "auth".into(),
            reason,
        }
    })
}

/// `walcast demo`: a throwaway cluster, the bakery, traffic and `serve`, until Ctrl-C.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Address for HTTP and WebSocket (loopback only: the demo has no auth).
    #[arg(long, default_value = crate::config::DEFAULT_LISTEN)]
    pub listen: String,

    /// Business steps (orders, deliveries, …) per second, at most 1000.
    #[arg(long, default_value_t = crate::cli::demo::DEFAULT_TICKS_PER_SECOND)]
    pub rate: f64,
}

/// `walcast log`: read a change log directory (also while `serve` writes it).
#[derive(Debug, Args)]
pub struct LogArgs {
    /// The change log's directory; default: `[log] dir` of --config.
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,

    /// TOML config file whose `[log] dir` and `[values]` to use (see config/walcast.toml).
    #[arg(long, env = "WALCAST_CONFIG")]
    pub config: Option<std::path::PathBuf>,

    /// Only changes of this table: `schema.table`, `schema.*`, or `table` (in
    /// public). Repeatable.
    #[arg(long = "table", value_name = "SCHEMA.TABLE")]
    pub tables: Vec<crate::cli::log::TableMatch>,

    /// Start after this transaction: an LSN (X/Y) or a commit time in ISO 8601
    /// (2026-11-30T01:02:03.123456Z), e.g. a printed line's commit_lsn or
    /// commit_timestamp. Default: the oldest change kept.
    #[arg(long, value_name = "LSN|TIME")]
    pub since: Option<crate::cli::log::Position>,

    /// Stop after the transactions committed at or before this LSN or time.
    #[arg(long, value_name = "LSN|TIME")]
    pub until: Option<crate::cli::log::Position>,

    /// Print at most N lines.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,

    /// Also print database messages (walcast.broadcast and other prefixes).
    #[arg(long)]
    pub messages: bool,

    /// Render int8 and numeric values as JSON strings (also `[values]` of --config).
    #[arg(long)]
    pub big_numbers_as_strings: bool,
}

impl LogArgs {
    /// The query, with the directory and value options of --config where not given.
    pub fn query(self) -> Result<crate::cli::log::LogQuery, crate::cli::log::LogCmdError> {
        let config = match &self.config {
            Some(p) => Some(crate::config::ServeConfig::from_file(p)?),
            None => None,
        };
        let dir = match self.dir {
            Some(d) => d,
            None => config
                .as_ref()
                .and_then(|c| c.log.dir.clone())
                .ok_or(crate::cli::log::LogCmdError::NoDir)?,
        };
        Ok(crate::cli::log::LogQuery {
            dir,
            tables: self.tables,
            since: self.since,
            until: self.until,
            limit: self.limit,
            messages: self.messages,
            render: crate::decode::value::RenderOptions {
                big_numbers_as_strings: self.big_numbers_as_strings
                    || config.is_some_and(|c| c.values.big_numbers_as_strings),
            },
        })
    }
}

/// `walcast check-config`: validate a config file without starting anything.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The TOML config file to check (see config/walcast.toml).
    pub file: std::path::PathBuf,
}

/// `walcast setup`: make the database ready for walcast. Idempotent.
#[derive(Debug, Args)]
pub struct SetupArgs {
    /// PostgreSQL connection URL (postgres://user:password@host:port/db?sslmode=…).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,

    /// Publication to create or extend.
    #[arg(long, default_value = "walcast")]
    pub publication: String,

    /// Tables to publish, comma-separated (`orders,public.items`); missing ones are added.
    #[arg(long, value_delimiter = ',', conflicts_with = "all_tables")]
    pub tables: Vec<String>,

    /// Publish every table (FOR ALL TABLES; needs superuser).
    #[arg(long)]
    pub all_tables: bool,

    /// Set this replica identity on every table of the publication (`full`: complete old rows).
    #[arg(long, value_enum)]
    pub replica_identity: Option<ReplicaIdentityArg>,

    /// Replication slot to create with --create-slot.
    #[arg(long, default_value = "walcast")]
    pub slot: String,

    /// Create the replication slot (pgoutput) if it does not exist.
    #[arg(long)]
    pub create_slot: bool,

    /// Print the SQL that would run and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ReplicaIdentityArg {
    Full,
    Default,
}

impl SetupArgs {
    pub fn options(&self) -> Result<crate::cli::setup::SetupOptions, crate::config::ConfigError> {
        use crate::cli::setup::{ReplicaIdentity, SetupOptions, TableSelection};
        let tables: Vec<String> = self
            .tables
            .iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        Ok(SetupOptions {
            conn: crate::config::PgConnInfo::parse(&self.database_url)?,
            publication: self.publication.clone(),
            tables: if self.all_tables {
                TableSelection::AllTables
            } else if tables.is_empty() {
                TableSelection::Unchanged
            } else {
                TableSelection::Tables(tables)
            },
            replica_identity: self.replica_identity.map(|r| match r {
                ReplicaIdentityArg::Full => ReplicaIdentity::Full,
                ReplicaIdentityArg::Default => ReplicaIdentity::Default,
            }),
            slot: self.slot.clone(),
            create_slot: self.create_slot,
            dry_run: self.dry_run,
        })
    }
}

/// `walcast status`: what walcast would find, with warnings and their fixes.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// PostgreSQL connection URL (postgres://user:password@host:port/db?sslmode=…).
    #[arg(long, env = "DATABASE_URL", required_unless_present = "url")]
    pub database_url: Option<String>,

    /// A running walcast's HTTP address (http://host:port): also print its live
    /// summary (health, replication, rates, clients) from /status.json.
    #[arg(long)]
    pub url: Option<String>,

    /// Token for --url: a bypass role's JWT or `[status] token`.
    #[arg(long, env = "WALCAST_STATUS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Replication slot to report on.
    #[arg(long, default_value = "walcast")]
    pub slot: String,

    /// Publication to report on.
    #[arg(long, default_value = "walcast")]
    pub publication: String,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `walcast teardown`: drop what setup made.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["slot", "publication"])))]
pub struct TeardownArgs {
    /// PostgreSQL connection URL (postgres://user:password@host:port/db?sslmode=…).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,

    /// Replication slot to drop.
    #[arg(long)]
    pub slot: Option<String>,

    /// Publication to drop.
    #[arg(long)]
    pub publication: Option<String>,

    /// Drop the slot even while a consumer uses it (terminates that server process first).
    #[arg(long)]
    pub force: bool,

    /// Print the SQL that would run and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl TeardownArgs {
    pub fn options(
        &self,
    ) -> Result<crate::cli::setup::TeardownOptions, crate::config::ConfigError> {
        Ok(crate::cli::setup::TeardownOptions {
            conn: crate::config::PgConnInfo::parse(&self.database_url)?,
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            force: self.force,
            dry_run: self.dry_run,
        })
    }
}
