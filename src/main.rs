use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use walcast::cli::{Cli, Command, LogFormat};
use walcast::config::{ConfigError, PgConnInfo, ServeConfig};
use walcast::replication::ReplicationOptions;
use walcast::value::RenderOptions;

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
            eprintln!("walcast: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Exit codes: 0 success, 1 a runtime error, 2 a usage or configuration error
/// (clap's own usage errors exit 2 as well).
const EXIT_RUNTIME: u8 = 1;
const EXIT_USAGE: u8 = 2;

/// 2 when the error is about what the user gave walcast (flags, config file,
/// database URL), 1 otherwise.
fn exit_code(e: &anyhow::Error) -> u8 {
    use walcast::demo::DemoError;
    use walcast::serve::ServeError;
    let usage = e.chain().any(|cause| {
        cause.is::<ConfigError>()
            || matches!(
                cause.downcast_ref::<ServeError>(),
                Some(ServeError::Config(_) | ServeError::NoDatabaseUrl)
            )
            || match cause.downcast_ref::<DemoError>() {
                Some(DemoError::Config(_) | DemoError::Rate(_)) => true,
                Some(DemoError::Serve(e)) => {
                    matches!(**e, ServeError::Config(_) | ServeError::NoDatabaseUrl)
                }
                _ => false,
            }
    });
    if usage {
        EXIT_USAGE
    } else {
        EXIT_RUNTIME
    }
}

fn init_tracing(cli: &Cli) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&cli.log).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
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
            walcast::tail::run(opts, render, shutdown).await?;
        }
        Command::Serve(args) => {
            let config = args.into_config()?;
            walcast::serve::run(config, shutdown, |r| {
                eprintln!("walcast: listening on {}", r.addr);
            })
            .await?;
        }
        Command::Setup(args) => print_lines(walcast::setup::setup(&args.options()?).await?.lines),
        Command::Teardown(args) => {
            print_lines(walcast::setup::teardown(&args.options()?).await?.lines)
        }
        Command::Demo(args) => {
            let options = walcast::demo::DemoOptions {
                listen: args.listen,
                ticks_per_second: args.rate,
                walcast: std::env::args().next().unwrap_or_else(|| "walcast".into()),
            };
            let mut out = std::io::stdout();
            walcast::demo::run_demo(options, shutdown, &mut out).await?;
        }
        Command::CheckConfig(args) => {
            ServeConfig::from_file(&args.file)?;
            println!("{}: ok", args.file.display());
        }
        Command::Status(args) => {
            let conn = PgConnInfo::parse(&args.database_url)?;
            let status = walcast::setup::status(&conn, &args.slot, &args.publication).await?;
            if args.json {
                println!("{}", serde_json::to_string(&status)?);
            } else {
                print!("{}", status.to_text());
            }
        }
    }
    Ok(())
}

/// Prints a setup/teardown report, one line per action.
fn print_lines(lines: Vec<String>) {
    for line in lines {
        println!("{line}");
    }
}
