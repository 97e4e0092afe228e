//! The `rls` case (issue 18): one client per user, each subscribed to the whole
//! table, with an `owner = auth.uid()` rule three ways — `[[auth.tables]]`
//! rules, RLS mode's compiled path, and RLS mode forced to check every change by
//! SQL — at the same paced write rate, side by side.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::client;
use super::env::{self, exec, Env};
use super::Figure;

const SECRET: &str = "walcast-bench-rls-secret-with-enough-bytes";

fn user(i: u64) -> String {
    format!("00000000-0000-0000-0000-{i:012}")
}

fn token(i: u64) -> String {
    let exp = client::now_us() / 1_000_000 + 3600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"role": "authenticated", "sub": user(i), "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap_or_default()
}

/// What one mode delivered.
struct Run {
    written: u64,
    delivered: u64,
    elapsed: Duration,
    latencies: Vec<u32>,
    closed: usize,
    checked_rows: Option<f64>,
}

pub async fn rls(quick: bool) -> Result<Vec<Figure>> {
    let (users, rate, secs) = if quick {
        (20, 200, 2)
    } else {
        (1_000, 2_000, 10)
    };
    let env = Env::start().await?;
    let sql = env.sql().await?;
    sql.batch_execute(include_str!("../../../sql/auth.sql"))
        .await?;
    exec(
        &sql,
        &[
            "do $$ begin create role authenticated nologin; exception when duplicate_object then null; end $$".into(),
            "create table rls_t (id bigserial primary key, owner uuid not null, sent_us int8 not null, pad text)".into(),
            "alter table rls_t replica identity full".into(),
            "alter table rls_t enable row level security".into(),
            "create policy own on rls_t for select to authenticated using (owner = auth.uid())".into(),
            "grant select on rls_t to authenticated".into(),
            "create publication pub for table rls_t".into(),
        ],
    )
    .await?;
    let base = env::config(4096, 100);
    let auth = format!("\n[auth]\nmode = \"jwt\"\njwt_secret = \"{SECRET}\"\n");
    // The SQL path judges every row for every class (rows × users): also run
    // at a tenth of the users and rate, where it keeps up on a small machine.
    let sql_mode = format!("{auth}rls = true\nrls_compile = false\n");
    let rules_mode = format!(
        "{auth}\n[[auth.tables]]\nname = \"public.rls_t\"\nrow_filter = \"owner=eq.{{claims.sub}}\"\n"
    );
    let modes = [
        ("rules", rules_mode, users, rate),
        ("compiled", format!("{auth}rls = true\n"), users, rate),
        ("sql", sql_mode.clone(), users, rate),
        ("sql (1/10 scale)", sql_mode, users / 10, rate / 10),
    ];
    let mut runs = Vec::new();
    for (i, (mode, extra, users, rate)) in modes.iter().enumerate() {
        let slot = format!("s_{i}");
        exec(
            &sql,
            &[format!(
                "select pg_create_logical_replication_slot('{slot}', 'pgoutput')"
            )],
        )
        .await?;
        let walcast = env::serve(&env.url(), &slot, "pub", &format!("{base}{extra}")).await?;
        let r = run_mode(&env, walcast.port, *users, *rate, secs).await;
        let checked = super::cases::metrics_text(walcast.port)
            .await
            .and_then(|t| super::cases::metric_value(&t, "walcast_rls_checked_rows_total"));
        walcast.stop().await;
        env::drop_slot(&sql, &slot).await?;
        let mut r = r?;
        r.checked_rows = checked;
        runs.push((*mode, *users, *rate, r));
    }
    let rate_of = |r: &Run| r.delivered as f64 / r.elapsed.as_secs_f64().max(1e-9);
    let rules = rate_of(&runs[0].3);
    let mut figs = vec![Figure::new(
        "rls",
        format!(
            "{users} clients (one user each, whole table), owner = auth.uid(), {rate} commits/s × {secs} s ({})",
            env::log_label()
        ),
        "—",
        "—",
        None,
        "",
        None,
    )];
    for (mode, users, rate, r) in &mut runs {
        let mps = rate_of(r);
        let (ratio, target, met) = match *mode {
            "compiled" => (
                Some(mps / rules),
                "≥ 0.8× rules".to_string(),
                Some(mps / rules >= 0.8),
            ),
            "sql" => (Some(mps / rules), String::new(), None),
            _ => (None, String::new(), None),
        };
        figs.push(Figure::new(
            "rls",
            format!(
                "{mode}: delivered msgs/s ({users} users, {rate} commits/s: {} of {} rows, {} closed)",
                r.delivered, r.written, r.closed
            ),
            format!("{mps:.0}"),
            if *mode == "rules" {
                "—".to_string()
            } else {
                format!("rules {rules:.0}")
            },
            ratio,
            target,
            met,
        ));
        r.latencies.sort_unstable();
        for (q, p) in [("p50", 50.0), ("p99", 99.0)] {
            let v = client::percentile(&r.latencies, p);
            figs.push(Figure::new(
                "rls",
                format!("{mode}: write → client {q}"),
                format!("{:.2} ms", v as f64 / 1000.0),
                "—",
                None,
                "",
                None,
            ));
        }
        if let Some(rows) = r.checked_rows.filter(|_| mode.starts_with("sql")) {
            figs.push(Figure::new(
                "rls",
                format!("{mode}: row images judged by PostgreSQL (every row × every class)"),
                format!(
                    "{rows:.0} ({:.0}/s)",
                    rows / r.elapsed.as_secs_f64().max(1e-9)
                ),
                "—",
                None,
                "",
                None,
            ));
        }
    }
    Ok(figs)
}

/// Connects one client per user, writes `rate` rows a second for `secs`
/// seconds (owners round-robin), and waits until each row reached its owner.
async fn run_mode(env: &Env, port: u16, users: u64, rate: u64, secs: u64) -> Result<Run> {
    let count = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut joining = Vec::new();
    for i in 0..users {
        let sem = sem.clone();
        joining.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let mut ws = client::connect_as(port, &token(i)).await?;
            let binding = json!({"event": "*", "schema": "public", "table": "rls_t"});
            client::join(&mut ws, &format!("u{i}"), 1, vec![binding]).await?;
            Ok::<_, anyhow::Error>(ws)
        }));
    }
    let mut tasks = Vec::new();
    for j in joining {
        let ws = j.await??;
        tasks.push(tokio::spawn(client::receive(
            ws,
            count.clone(),
            true,
            stop.clone(),
        )));
    }
    let started = Instant::now();
    let total = rate * secs;
    let writers = 4;
    let t0 = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut w = Vec::new();
    for k0 in 0..writers {
        let c = env.sql().await?;
        w.push(tokio::spawn(async move {
            c.batch_execute("set synchronous_commit = on").await?;
            let stmt = c
                .prepare(
                    "insert into rls_t(owner, sent_us, pad) values ($1::text::uuid, \
                     (extract(epoch from clock_timestamp()) * 1000000)::int8, 'payload text')",
                )
                .await?;
            let mut written = 0u64;
            let mut k = k0;
            while k < total {
                tokio::time::sleep_until(t0 + Duration::from_micros(k * 1_000_000 / rate)).await;
                c.execute(&stmt, &[&user(k % users)]).await?;
                written += 1;
                k += writers;
            }
            Ok::<u64, anyhow::Error>(written)
        }));
    }
    let mut written = 0;
    for t in w {
        written += t.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(std::sync::atomic::Ordering::Relaxed) < written && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    stop.cancel();
    let mut latencies = Vec::new();
    let mut closed = 0;
    for t in tasks {
        let r = t.await?;
        latencies.extend(r.latencies_us);
        closed += usize::from(r.closed.is_some());
    }
    let delivered = count.load(std::sync::atomic::Ordering::Relaxed);
    ensure!(
        delivered <= written,
        "delivered {delivered} of {written}: more than written (a leak)"
    );
    Ok(Run {
        written,
        delivered,
        elapsed,
        latencies,
        closed,
        checked_rows: None,
    })
}
