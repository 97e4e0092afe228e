//! The `rls` case (issue 18), two shapes.
//!
//! - **One user per client** (the shape): 1,000 clients, each a
//!   different user subscribed to the whole table, an `owner = auth.uid()`
//!   rule three ways — `[[auth.tables]]` rules, RLS mode's compiled path, and
//!   RLS mode forced to check every change by SQL (`rls_compile = false`: a
//!   class per user, every row judged for every class) — at the same paced
//!   write rate, side by side. Each row has one recipient.
//! - **Many subscribers per class** (what the SQL path's delivered msgs/s
//!   capacity is about): 1,000 clients in 20 teams, each token carrying its
//!   team only (so the 50 clients of a team form one class), a policy with a
//!   subquery on a team table (not compilable: always the SQL path), rows
//!   round-robin over the teams so each row is for 50 clients; the same shape
//!   with an `[[auth.tables]]` rule as the baseline.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::cases::f_ms;
use super::client;
use super::env::{self, exec, Env};
use super::{Cell, Figure};

/// A whole number of messages or rows (per second).
fn f_whole(x: f64) -> String {
    format!("{x:.0}")
}

const SECRET: &str = "walcast-bench-rls-secret-with-enough-bytes";

fn user(i: u64) -> String {
    format!("00000000-0000-0000-0000-{i:012}")
}

fn team(i: u64) -> String {
    format!("t{i:03}")
}

fn sign(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap_or_default()
}

fn exp() -> i64 {
    client::now_us() / 1_000_000 + 3600
}

/// Client `i`'s token in a shape.
fn token(shape: Shape, i: u64, groups: u64) -> String {
    match shape {
        Shape::Users => sign(json!({"role": "authenticated", "sub": user(i), "exp": exp()})),
        Shape::Teams => {
            sign(json!({"role": "team_member", "team": team(i % groups), "exp": exp()}))
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// One user per client: row `k` is for client `k % clients`.
    Users,
    /// Clients in `groups` teams: row `k` is for every client of team `k % groups`.
    Teams,
}

/// What one mode delivered.
struct Run {
    written: u64,
    expected: u64,
    delivered: u64,
    elapsed: Duration,
    latencies: Vec<u32>,
    closed: usize,
    checked_rows: Option<f64>,
}

struct Mode {
    name: &'static str,
    shape: Shape,
    config: String,
    clients: u64,
    groups: u64,
    rate: u64,
}

pub async fn rls(quick: bool) -> Result<Vec<Figure>> {
    let (users, rate, secs) = if quick {
        (20, 200, 2)
    } else {
        (1_000, 2_000, 10)
    };
    // Many subscribers per class: clients, teams, commits/s (each row for
    // clients / teams of them).
    let (members, teams, team_rate) = if quick {
        (40, 4, 100)
    } else {
        (1_000, 20, 1_500)
    };
    let env = Env::start().await?;
    let sql = env.sql().await?;
    sql.batch_execute(include_str!("../../../sql/auth.sql"))
        .await?;
    exec(
        &sql,
        &[
            "do $$ begin create role authenticated nologin; exception when duplicate_object then null; end $$".into(),
            "do $$ begin create role team_member nologin; exception when duplicate_object then null; end $$".into(),
            "create table rls_teams (team text primary key, active boolean not null)".into(),
            format!("insert into rls_teams select format('t%s', lpad(g::text, 3, '0')), true from generate_series(0, {teams} - 1) g"),
            "create table rls_t (id bigserial primary key, owner uuid not null, team text not null, sent_us int8 not null, pad text)".into(),
            "alter table rls_t replica identity full".into(),
            "alter table rls_t enable row level security".into(),
            "create policy own on rls_t for select to authenticated using (owner = auth.uid())".into(),
            // Not compilable (a subquery): the SQL path, whatever rls_compile says.
            "create policy team on rls_t for select to team_member using (team = (auth.jwt() ->> 'team') and exists (select 1 from rls_teams m where m.team = rls_t.team and m.active))".into(),
            "grant select on rls_t to authenticated, team_member".into(),
            "grant select on rls_teams to team_member".into(),
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
    let team_rules = format!(
        "{auth}\n[[auth.tables]]\nname = \"public.rls_t\"\nrow_filter = \"team=eq.{{claims.team}}\"\n"
    );
    let mode = |name, shape, config: &str, clients, groups, rate| Mode {
        name,
        shape,
        config: config.to_string(),
        clients,
        groups,
        rate,
    };
    let mut modes = vec![
        mode("rules", Shape::Users, &rules_mode, users, users, rate),
        mode(
            "compiled",
            Shape::Users,
            &format!("{auth}rls = true\n"),
            users,
            users,
            rate,
        ),
        mode("sql", Shape::Users, &sql_mode, users, users, rate),
    ];
    if !quick {
        modes.push(mode(
            "sql (1/10 scale)",
            Shape::Users,
            &sql_mode,
            users / 10,
            users / 10,
            rate / 10,
        ));
    }
    modes.push(mode(
        "teams: rules",
        Shape::Teams,
        &team_rules,
        members,
        teams,
        team_rate,
    ));
    modes.push(mode(
        "teams: sql",
        Shape::Teams,
        &format!("{auth}rls = true\n"),
        members,
        teams,
        team_rate,
    ));
    let mut runs = Vec::new();
    for (i, m) in modes.iter().enumerate() {
        let slot = format!("s_{i}");
        exec(
            &sql,
            &[format!(
                "select pg_create_logical_replication_slot('{slot}', 'pgoutput')"
            )],
        )
        .await?;
        let walcast = env::serve(&env.url(), &slot, "pub", &format!("{base}{}", m.config)).await?;
        let r = run_mode(&env, walcast.port, m, secs).await;
        let checked = super::cases::metrics_text(walcast.port)
            .await
            .and_then(|t| super::cases::metric_value(&t, "walcast_rls_checked_rows_total"));
        walcast.stop().await;
        env::drop_slot(&sql, &slot).await?;
        let mut r = r?;
        r.checked_rows = checked;
        runs.push((m, r));
    }
    let rate_of = |r: &Run| r.delivered as f64 / r.elapsed.as_secs_f64().max(1e-9);
    let baseline = |shape: Shape| {
        runs.iter()
            .find(|(m, _)| m.shape == shape && m.name.ends_with("rules"))
            .map(|(_, r)| rate_of(r))
            .unwrap_or(0.0)
    };
    let (rules, team_base) = (baseline(Shape::Users), baseline(Shape::Teams));
    let mut figs = vec![
        Figure::new(
            "rls",
            format!(
                "one user per client: {users} clients (whole table), owner = auth.uid(), {rate} commits/s × {secs} s, each row for 1 client ({})",
                env::log_label()
            ),
            "—",
            "—",
            None,
            "",
            None,
        ),
        Figure::new(
            "rls",
            format!(
                "many subscribers per class (\"teams:\" rows): {members} clients in {teams} teams (one class each), policy with a subquery (SQL path), {team_rate} commits/s × {secs} s, each row for {} clients: {} msgs/s offered",
                members / teams,
                team_rate * (members / teams)
            ),
            "—",
            "—",
            None,
            "",
            None,
        ),
    ];
    for (m, r) in &mut runs {
        let mps = rate_of(r);
        let base = if m.shape == Shape::Users {
            rules
        } else {
            team_base
        };
        let (ratio, target, met) = match m.name {
            "compiled" => (
                Some(mps / rules),
                "≥ 0.8× rules".to_string(),
                Some(mps / rules >= 0.8),
            ),
            "teams: sql" if !quick => (
                Some(mps / base),
                "≥ 50 k msgs/s".to_string(),
                Some(mps >= 50_000.0),
            ),
            n if n.ends_with("rules") => (None, String::new(), None),
            _ => (Some(mps / base), String::new(), None),
        };
        // Names are the same in every run (counts go in the cells), so that
        // `--runs N` gives each figure its median and spread.
        figs.push(Figure::new(
            "rls",
            format!(
                "{}: delivered msgs/s ({} clients, {} classes or groups, {} commits/s)",
                m.name, m.clients, m.groups, m.rate
            ),
            Cell::num(mps, f_whole),
            if m.name.ends_with("rules") {
                Cell::Text("—".to_string())
            } else {
                Cell::labelled("rules", base, f_whole)
            },
            ratio,
            target,
            met,
        ));
        figs.push(Figure::new(
            "rls",
            format!(
                "{}: deliveries delivered / expected (rows written), connections closed",
                m.name
            ),
            format!(
                "{} / {} ({} rows), {} closed",
                r.delivered, r.expected, r.written, r.closed
            ),
            "—",
            None,
            "",
            None,
        ));
        r.latencies.sort_unstable();
        for (q, p) in [("p50", 50.0), ("p99", 99.0)] {
            let v = client::percentile(&r.latencies, p);
            figs.push(Figure::new(
                "rls",
                format!("{}: write → client {q}", m.name),
                Cell::num(v as f64 / 1000.0, f_ms),
                "—",
                None,
                "",
                None,
            ));
        }
        if let Some(rows) = r.checked_rows.filter(|_| m.name.contains("sql")) {
            figs.push(Figure::new(
                "rls",
                format!(
                    "{}: row images judged by PostgreSQL per second (every row × every class)",
                    m.name
                ),
                Cell::num(rows / r.elapsed.as_secs_f64().max(1e-9), f_whole),
                "—",
                None,
                "",
                None,
            ));
        }
    }
    Ok(figs)
}

/// Connects the mode's clients, writes `rate` rows a second for `secs`
/// seconds (groups round-robin), and waits until every row reached each of
/// its recipients (or every connection was closed).
async fn run_mode(env: &Env, port: u16, m: &Mode, secs: u64) -> Result<Run> {
    let count = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut joining = Vec::new();
    for i in 0..m.clients {
        let sem = sem.clone();
        let token = token(m.shape, i, m.groups);
        joining.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let mut ws = client::connect_as(port, &token).await?;
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
    let (rate, groups) = (m.rate, m.groups);
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
                    "insert into rls_t(owner, team, sent_us, pad) values ($1::text::uuid, $2, \
                     (extract(epoch from clock_timestamp()) * 1000000)::int8, 'payload text')",
                )
                .await?;
            let mut written = 0u64;
            let mut k = k0;
            while k < total {
                tokio::time::sleep_until(t0 + Duration::from_micros(k * 1_000_000 / rate)).await;
                c.execute(&stmt, &[&user(k % groups), &team(k % groups)])
                    .await?;
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
    // Each group's clients: clients / groups (clients are spread evenly).
    let expected = written * (m.clients / m.groups);
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(std::sync::atomic::Ordering::Relaxed) < expected
        && Instant::now() < deadline
        && !tasks.iter().all(|t| t.is_finished())
    {
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
        delivered <= expected,
        "delivered {delivered} of {expected}: more than written (a leak)"
    );
    Ok(Run {
        written,
        expected,
        delivered,
        elapsed,
        latencies,
        closed,
        checked_rows: None,
    })
}
