use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use walcast::cli::{Cli, Command, LogFormat};
use walcast::config::PgConnInfo;
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
            ExitCode::FAILURE
        }
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
