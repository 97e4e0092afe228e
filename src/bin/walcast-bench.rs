//! `walcast-bench`: end-to-end benchmarks against a live throwaway cluster.
//!
//! ```text
//! cargo run --release --bin walcast-bench -- <case|all> [--quick] [--rate=N] [--no-log]
//! cases: drain latency fanout routing connections replay   (capture: rewrite the decode corpus)
//! --rate=N: commits/s of the fanout case (default 100), to find the rate it sustains
//! --no-log: run walcast without its change log (`[log] dir = ""`; on by default)
//! ```
//!
//! Each case starts its own cluster (`walcast::testing`), writes its workload,
//! runs `walcast serve` (the binary built beside this one) and a WebSocket load
//! generator in this process, and prints one table: the figure, the baseline
//! measured in the same run (`pg_recvlogical` for the drain and as the latency
//! floor), their ratio and the target. `--quick` runs every case at a tiny scale
//! to prove it works (CI).
//! The method and the latest figures are in BENCHMARKS.md.

#[path = "walcast_bench/cases.rs"]
mod cases;
#[path = "walcast_bench/client.rs"]
mod client;
#[path = "walcast_bench/env.rs"]
mod env;
#[path = "walcast_bench/relay.rs"]
mod relay;
#[path = "walcast_bench/rls.rs"]
mod rls;

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

/// One line of the results table.
pub struct Figure {
    case: &'static str,
    name: String,
    value: String,
    baseline: String,
    /// walcast ÷ baseline (or as the figure says).
    ratio: Option<f64>,
    target: String,
    met: Option<bool>,
}

impl Figure {
    pub fn new(
        case: &'static str,
        name: impl Into<String>,
        value: impl Into<String>,
        baseline: impl Into<String>,
        ratio: Option<f64>,
        target: impl Into<String>,
        met: Option<bool>,
    ) -> Figure {
        Figure {
            case,
            name: name.into(),
            value: value.into(),
            baseline: baseline.into(),
            ratio,
            target: target.into(),
            met,
        }
    }
}

const CASES: &[&str] = &[
    "drain",
    "latency",
    "fanout",
    "routing",
    "connections",
    "replay",
    "rls",
];

fn usage() -> String {
    format!(
        "usage: walcast-bench <{}|all|capture> [--quick] [--rate=N (fanout commits/s)] [--no-log]",
        CASES.join("|")
    )
}

fn print_table(figs: &[Figure]) {
    let rows: Vec<[String; 7]> = figs
        .iter()
        .map(|f| {
            [
                f.case.to_string(),
                f.name.clone(),
                f.value.clone(),
                f.baseline.clone(),
                f.ratio.map(|r| format!("{r:.2}")).unwrap_or_default(),
                f.target.clone(),
                match f.met {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => String::new(),
                },
            ]
        })
        .collect();
    let head = [
        "case", "figure", "walcast", "baseline", "ratio", "target", "met",
    ];
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        println!("| {} |", parts.join(" | "));
    };
    line(head.to_vec());
    println!(
        "|{}|",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

async fn run_case(name: &str, quick: bool, rate: Option<u64>) -> Result<Vec<Figure>> {
    let figs = match name {
        "drain" => cases::drain(quick).await?,
        "latency" => cases::latency(quick).await?,
        "fanout" => cases::fanout(quick, rate).await?,
        "routing" => cases::routing(quick).await?,
        "connections" => cases::connections(quick).await?,
        "replay" => cases::replay(quick).await?,
        "rls" => rls::rls(quick).await?,
        "capture" => cases::capture().await?,
        other => bail!("unknown case {other:?}; {}", usage()),
    };
    Ok(figs)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let no_log = args.iter().any(|a| a == "--no-log");
    let mut rate = None;
    for a in args.iter().filter(|a| a.starts_with("--")) {
        if let Some(v) = a.strip_prefix("--rate=") {
            let r: u64 = v
                .parse()
                .with_context(|| format!("--rate={v}: not a number"))?;
            ensure!(r > 0, "--rate must be at least 1");
            rate = Some(r);
        } else if a != "--quick" && a != "--no-log" {
            bail!("unknown option {a}; {}", usage());
        }
    }
    let names: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    let [case] = names.as_slice() else {
        bail!("{}", usage());
    };
    let list: Vec<&str> = if *case == "all" {
        // Without the log there is nothing to replay.
        CASES
            .iter()
            .copied()
            .filter(|c| !(no_log && *c == "replay"))
            .collect()
    } else {
        vec![case]
    };
    env::walcast_binary()?;
    env::set_log_off(no_log);
    eprintln!("walcast's change log: {}", env::log_label());
    let start = Instant::now();
    let mut figs = Vec::new();
    let mut failed = Vec::new();
    for c in list {
        eprintln!("== {c}{}", if quick { " (quick)" } else { "" });
        let t = Instant::now();
        match run_case(c, quick, rate).await {
            Ok(f) => figs.extend(f),
            Err(e) => {
                eprintln!("{c}: FAILED: {e:#}");
                failed.push(c);
            }
        }
        eprintln!("== {c} took {:.1} s", t.elapsed().as_secs_f64());
    }
    println!();
    print_table(&figs);
    println!(
        "\n{} case(s) in {:.0} s{}",
        figs.iter()
            .map(|f| f.case)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        start.elapsed().as_secs_f64(),
        if quick {
            " (--quick: tiny scale, figures are not meaningful)"
        } else {
            ""
        }
    );
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}
