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
