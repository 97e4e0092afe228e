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
        c.validate()?;
        Ok(c)
    }
}
