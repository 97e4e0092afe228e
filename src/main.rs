use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use walcast::cli::args::{Cli, Command, LogFormat};
use walcast::config::{ConfigError, PgConnInfo, ServeConfig};
use walcast::decode::value::RenderOptions;
use walcast::source::error::ErrorKind;
use walcast::source::session::ReplicationOptions;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walcast: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed stdout (`walcast tail | head`) is a normal way to stop.
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            say_err(format_args!("walcast: {}", render_chain(&e)));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Writes a line to stderr, ignoring a closed stderr (`walcast serve 2>&1 | head`
/// must not panic as `eprintln!` would).
fn say_err(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{args}");
}

/// Writes a line to stdout; a closed stdout ends the command quietly.
fn say(args: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(std::io::stdout(), "{args}")
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || matches!(
                c.downcast_ref::<walcast::cli::tail::TailError>(),
                Some(walcast::cli::tail::TailError::Stdout(io)) if io.kind() == std::io::ErrorKind::BrokenPipe
            )
            || matches!(
                c.downcast_ref::<walcast::cli::log::LogCmdError>(),
                Some(walcast::cli::log::LogCmdError::Stdout(io)) if io.kind() == std::io::ErrorKind::BrokenPipe
            )
    })
}

/// Runs a one-shot command, stopping it on SIGINT/SIGTERM (the signal handler
/// replaces the default action, so a command stuck on an unanswering database
/// must watch the token itself).
async fn interruptible<T>(
    shutdown: &tokio_util::sync::CancellationToken,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Err(anyhow::anyhow!("interrupted")),
        r = f => r,
    }
}

/// Exit codes (README, "Exit codes"): 0 success; 1 a runtime failure (the stream
/// or its data is broken, or anything not classified); 2 a usage or configuration
/// error — flags, config file, database URL, and whatever PostgreSQL says the
/// operator must change (authentication, TLS settings, a missing slot, publication
/// or database, `wal_level`, privileges); 3 PostgreSQL could not be reached or the
/// connection failed, and the command gave up (running it again later may work).
/// clap's own usage errors exit 2 as well.
const EXIT_RUNTIME: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_TRANSIENT: u8 = 3;

/// The exit code of a failed command, from the [`ErrorKind`] of its error.
fn exit_code(e: &anyhow::Error) -> u8 {
    match error_kind(e) {
        Some(ErrorKind::Usage) => EXIT_USAGE,
        Some(ErrorKind::Transient) => EXIT_TRANSIENT,
        Some(ErrorKind::Definite) | None => EXIT_RUNTIME,
    }
}

/// The kind of the outermost error in the chain that has one.
fn error_kind(e: &anyhow::Error) -> Option<ErrorKind> {
    use walcast::cli::demo::DemoError;
    use walcast::cli::setup::SetupError;
    use walcast::cli::tail::TailError;
    use walcast::daemon::serve::ServeError;
    use walcast::source::catalog::CatalogError;
    use walcast::source::error::PgError;
    e.chain().find_map(|cause| {
        if cause.is::<ConfigError>() {
            Some(ErrorKind::Usage)
        } else if let Some(e) = cause.downcast_ref::<PgError>() {
            Some(e.kind())
        } else if let Some(e) = cause.downcast_ref::<SetupError>() {
            Some(e.kind())
        } else if let Some(e) = cause.downcast_ref::<CatalogError>() {
            Some(e.kind())
        } else if let Some(e) = cause.downcast_ref::<TailError>() {
            match e {
                TailError::Replication(e) => Some(e.kind()),
                TailError::Stdout(_) => None,
            }
        } else if let Some(e) = cause.downcast_ref::<walcast::cli::log::LogCmdError>() {
            e.kind()
        } else if let Some(e) = cause.downcast_ref::<ServeError>() {
            serve_kind(e)
        } else if let Some(e) = cause.downcast_ref::<DemoError>() {
            match e {
                DemoError::Serve(e) => serve_kind(e),
                other => other.kind(),
            }
        } else {
            None
        }
    })
}

fn serve_kind(e: &walcast::daemon::serve::ServeError) -> Option<ErrorKind> {
    use walcast::daemon::serve::ServeError;
    match e {
        ServeError::Config(_)
        | ServeError::NoDatabaseUrl
        | ServeError::Auth(_)
        | ServeError::Log { .. } => Some(ErrorKind::Usage),
        ServeError::Replication(e) => Some(e.kind()),
        ServeError::Catalog(e) => Some(e.kind()),
        ServeError::Cluster(walcast::cluster::ClusterError::Connect { .. }) => {
            Some(ErrorKind::Transient)
        }
        ServeError::Cluster(walcast::cluster::ClusterError::Stream { .. }) => {
            Some(ErrorKind::Usage)
        }
        _ => None,
    }
}

/// The error and its causes, `: `-separated, leaving out a cause whose text an
/// outer error already includes (many errors show their source in their own text).
fn render_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if s.is_empty() || text.contains(&s) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&s);
    }
    text
}

fn init_tracing(cli: &Cli) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&cli.log).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr (`walcast serve 2>&1 | head -n 1`) must not end the
        // daemon: the default reports a failed write with `eprintln!`, which panics.
        .log_internal_errors(false);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = walcast::shutdown::on_signals();
    match cli.command {
        Command::Tail(args) => {
            let opts = ReplicationOptions {
                conn: PgConnInfo::parse(&args.source.database_url)?,
                slot: args.source.slot,
                publication: args.source.publication,
                create_slot: args.source.create_slot,
                temporary: args.temporary,
                start_lsn: args.start_lsn,
                retry_definite_errors: false,
            };
            let render = RenderOptions {
                big_numbers_as_strings: args.big_numbers_as_strings,
            };
            walcast::cli::tail::run(opts, render, shutdown).await?;
        }
        Command::Serve(args) => {
            let config = args.into_config()?;
            walcast::daemon::serve::run(config, shutdown, |r| {
                // The bound addresses (with port 0, the ports the system chose);
                // tests and the benchmark driver read them
                // (`walcast::testing::listening_addr`).
                // The metrics line first: the main line says everything is bound.
                if let Some(m) = r.metrics_addr {
                    say_err(format_args!("walcast: metrics listening on {m}"));
                }
                say_err(format_args!("walcast: listening on {}", r.addr));
            })
            .await?;
        }
        Command::Relay(args) => {
            let config = args.into_config()?;
            walcast::daemon::relay::run(config, shutdown, |addr| {
                say_err(format_args!("walcast: listening on {addr}"));
            })
            .await?;
        }
        Command::Setup(args) => {
            let opts = args.options()?;
            let report = interruptible(&shutdown, async {
                Ok(walcast::cli::setup::setup(&opts).await?)
            })
            .await?;
            print_lines(report.lines)?
        }
        Command::Teardown(args) => {
            let opts = args.options()?;
            let report = interruptible(&shutdown, async {
                Ok(walcast::cli::setup::teardown(&opts).await?)
            })
            .await?;
            print_lines(report.lines)?
        }
        Command::Demo(args) => {
            let options = walcast::cli::demo::DemoOptions {
                listen: args.listen,
                ticks_per_second: args.rate,
                walcast: std::env::args().next().unwrap_or_else(|| "walcast".into()),
            };
            let mut out = std::io::stdout();
            walcast::cli::demo::run_demo(options, shutdown, &mut out).await?;
        }
        Command::Log(args) => {
            let query = args.query()?;
            let stop = shutdown.clone();
            tokio::task::spawn_blocking(move || {
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
                walcast::cli::log::run(&query, &mut out, &stop)
            })
            .await??;
        }
        Command::CheckConfig(args) => {
            let c = ServeConfig::from_file(&args.file)?;
            walcast::cli::args::check_feature_rules(&c)?;
            say(format_args!("{}: ok", args.file.display()))?;
        }
        Command::Status(args) => {
            if let Some(database_url) = &args.database_url {
                let conn = PgConnInfo::parse(database_url)?;
                let status = interruptible(&shutdown, async {
                    Ok(walcast::cli::setup::status(&conn, &args.slot, &args.publication).await?)
                })
                .await?;
                if args.json {
                    say(format_args!("{}", serde_json::to_string(&status)?))?;
                } else {
                    use std::io::Write;
                    std::io::stdout().write_all(status.to_text().as_bytes())?;
                }
            }
            if let Some(url) = args.url.clone() {
                let token = args.token.clone();
                let live = interruptible(&shutdown, async move {
                    tokio::task::spawn_blocking(move || {
                        walcast::server::status::fetch_summary(&url, token.as_deref())
                    })
                    .await?
                    .map_err(anyhow::Error::msg)
                })
                .await?;
                if args.json {
                    say(format_args!("{live}"))?;
                } else {
                    use std::io::Write;
                    std::io::stdout()
                        .write_all(walcast::server::status::summary_text(&live).as_bytes())?;
                }
            }
        }
    }
    Ok(())
}

/// Prints a setup/teardown report, one line per action.
fn print_lines(lines: Vec<String>) -> std::io::Result<()> {
    for line in lines {
        say(format_args!("{line}"))?;
    }
    Ok(())
}
