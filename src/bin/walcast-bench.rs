//! `walcast-bench`: end-to-end benchmarks against a live throwaway cluster.
//!
//! ```text
//! cargo run --release --bin walcast-bench -- <case|all> [--quick] [--runs N] [--rate=N] [--no-log]
//! cases: drain tail latency fanout routing connections replay   (capture: rewrite the decode corpus)
//! --runs N: run each case N times (a fresh cluster each time) and report per figure
//!           the median and the spread (min–max); default 1
//! --rate=N: commits/s of the fanout case (default 100), to find the rate it sustains
//! --no-log: run walcast without its change log (`[log] dir = ""`; on by default)
//! ```
//!
//! Each case starts its own cluster (`walcast::testing`), writes its workload,
//! runs `walcast serve` (the binary built beside this one) and a WebSocket load
//! generator in this process, and prints one table: the figure, the baseline
//! measured in the same run (`pg_recvlogical` for the drain and as the latency
//! floor), their ratio and the target, then the commit and the machine's load
//! average at the start and the end. `--quick` runs every case at a tiny scale
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
#[path = "walcast_bench/summary.rs"]
mod summary;

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

/// A cell of the results table: text, or a number with its format, so that the
/// runs of `--runs N` can be summarised (median, min–max).
#[derive(Clone)]
pub enum Cell {
    Text(String),
    Num {
        /// Printed before the number (the baseline's name).
        label: String,
        x: f64,
        fmt: fn(f64) -> String,
    },
}

impl Cell {
    pub fn num(x: f64, fmt: fn(f64) -> String) -> Cell {
        Cell::labelled("", x, fmt)
    }

    pub fn labelled(label: &str, x: f64, fmt: fn(f64) -> String) -> Cell {
        Cell::Num {
            label: label.to_string(),
            x,
            fmt,
        }
    }

    fn show(&self) -> String {
        match self {
            Cell::Text(t) => t.clone(),
            Cell::Num { label, x, fmt } => labelled(label, fmt(*x)),
        }
    }
}

fn labelled(label: &str, v: String) -> String {
    if label.is_empty() {
        v
    } else {
        format!("{label} {v}")
    }
}

impl From<String> for Cell {
    fn from(s: String) -> Cell {
        Cell::Text(s)
    }
}

impl From<&str> for Cell {
    fn from(s: &str) -> Cell {
        Cell::Text(s.to_string())
    }
}

/// One line of the results table.
pub struct Figure {
    case: &'static str,
    name: String,
    value: Cell,
    baseline: Cell,
    /// walcast ÷ baseline (or as the figure says).
    ratio: Option<f64>,
    target: String,
    met: Option<bool>,
}

impl Figure {
    pub fn new(
        case: &'static str,
        name: impl Into<String>,
        value: impl Into<Cell>,
        baseline: impl Into<Cell>,
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

    fn row(&self) -> [String; 7] {
        [
            self.case.to_string(),
            self.name.clone(),
            self.value.show(),
            self.baseline.show(),
            self.ratio.map(|r| format!("{r:.2}")).unwrap_or_default(),
            self.target.clone(),
            match self.met {
                Some(true) => "yes".into(),
                Some(false) => "NO".into(),
                None => String::new(),
            },
        ]
    }
}

const CASES: &[&str] = &[
    "drain",
    "tail",
    "latency",
    "fanout",
    "routing",
    "connections",
    "replay",
    "rls",
    "cluster",
];

fn usage() -> String {
    format!(
        "usage: walcast-bench <{}|cluster-fanout|cluster-relay|all|capture>[,<another case>…] [--quick] [--runs N] [--rate=N (fanout commits/s)] [--no-log]",
        CASES.join("|")
    )
}

/// The results table (markdown) of `rows`.
fn table(rows: &[[String; 7]]) -> String {
    let head = [
        "case", "figure", "walcast", "baseline", "ratio", "target", "met",
    ];
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
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
        format!("| {} |\n", parts.join(" | "))
    };
    let mut out = line(head.to_vec());
    out.push_str(&format!(
        "|{}|\n",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    ));
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

async fn run_case(name: &str, quick: bool, rate: Option<u64>) -> Result<Vec<Figure>> {
    let figs = match name {
        "drain" => cases::drain(quick).await?,
        "tail" => cases::tail(quick).await?,
        "latency" => cases::latency(quick).await?,
        "fanout" => cases::fanout(quick, rate).await?,
        "routing" => cases::routing(quick).await?,
        "connections" => cases::connections(quick).await?,
        "replay" => cases::replay(quick).await?,
        "rls" => rls::rls(quick).await?,
        "cluster" => cases::cluster(quick).await?,
        // Parts of `cluster` alone (not in `all`, which runs them within it).
        "cluster-fanout" => cases::cluster_fanout(quick).await?,
        "cluster-relay" => cases::relay_drain(quick).await?,
        "capture" => cases::capture().await?,
        other => bail!("unknown case {other:?}; {}", usage()),
    };
    Ok(figs)
}

struct Options {
    case: String,
    quick: bool,
    no_log: bool,
    rate: Option<u64>,
    runs: usize,
}

fn parse_args(args: &[String]) -> Result<Options> {
    let mut o = Options {
        case: String::new(),
        quick: false,
        no_log: false,
        rate: None,
        runs: 1,
    };
    let mut names = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--quick" {
            o.quick = true;
        } else if a == "--no-log" {
            o.no_log = true;
        } else if let Some(v) = a.strip_prefix("--rate=") {
            let r: u64 = v
                .parse()
                .with_context(|| format!("--rate={v}: not a number"))?;
            ensure!(r > 0, "--rate must be at least 1");
            o.rate = Some(r);
        } else if a == "--runs" || a.starts_with("--runs=") {
            let v = match a.strip_prefix("--runs=") {
                Some(v) => v.to_string(),
                None => it.next().context("--runs needs a number")?.clone(),
            };
            let n: usize = v
                .parse()
                .with_context(|| format!("--runs {v}: not a number"))?;
            ensure!((1..=100).contains(&n), "--runs must be 1 to 100");
            o.runs = n;
        } else if a.starts_with("--") {
            bail!("unknown option {a}; {}", usage());
        } else {
            names.push(a.clone());
        }
    }
    let [case] = names.as_slice() else {
        bail!("{}", usage());
    };
    o.case = case.clone();
    Ok(o)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{}", usage());
        return Ok(());
    }
    let Options {
        case,
        quick,
        no_log,
        rate,
        runs,
    } = parse_args(&args)?;
    let list: Vec<&str> = if case == "all" {
        // Without the log there is nothing to replay.
        CASES
            .iter()
            .copied()
            .filter(|c| !(no_log && *c == "replay"))
            .collect()
    } else {
        // Several cases, comma-separated, in one summary.
        let list: Vec<&str> = case.split(',').filter(|c| !c.is_empty()).collect();
        for c in &list {
            ensure!(
                CASES.contains(c) || ["cluster-fanout", "cluster-relay", "capture"].contains(c),
                "unknown case {c:?}; {}",
                usage()
            );
        }
        list
    };
    env::walcast_binary()?;
    env::set_log_off(no_log);
    let commit = summary::commit();
    let load_start = summary::load_average();
    let started_at = summary::utc_now();
    eprintln!(
        "walcast's change log: {}; commit {commit}; load average {load_start}",
        env::log_label()
    );
    let start = Instant::now();
    // One entry per run of a case: that run's figures.
    let mut results: Vec<Vec<Figure>> = Vec::new();
    let mut failed = Vec::new();
    for c in list {
        for r in 1..=runs {
            let of = if runs > 1 {
                format!(" run {r} of {runs}")
            } else {
                String::new()
            };
            eprintln!("== {c}{of}{}", if quick { " (quick)" } else { "" });
            let t = Instant::now();
            match run_case(c, quick, rate).await {
                Ok(f) => {
                    if runs > 1 {
                        eprint!("{}", table(&f.iter().map(Figure::row).collect::<Vec<_>>()));
                    }
                    results.push(f);
                }
                Err(e) => {
                    eprintln!("{c}{of}: FAILED: {e:#}");
                    failed.push(format!("{c}{of}"));
                }
            }
            eprintln!("== {c}{of} took {:.1} s", t.elapsed().as_secs_f64());
        }
    }
    let load_end = summary::load_average();
    println!();
    if runs > 1 {
        println!("Each figure: median (min–max) over {runs} runs; ratio: each run's, then their median.\n");
    }
    print!("{}", table(&summary::summarise(&results)));
    println!(
        "\n{} case(s) × {runs} run(s) in {:.0} s, started {started_at}, commit {commit}{}",
        results
            .iter()
            .flatten()
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
    println!("load average (1 / 5 / 15 min): {load_start} at the start, {load_end} at the end");
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}
