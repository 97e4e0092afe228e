//! `--runs N`: each case run N times (a fresh cluster each time), summarised per
//! figure as the median and the spread (min–max) over the runs, ratios included
//! (each run's ratio, then their median); and what the report says about the run
//! itself: the commit, the time, the machine's load.

use super::{labelled, Cell, Figure};

/// The median of `xs` (the mean of the middle two for an even count); `None` if empty.
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn min_max(xs: &[f64]) -> (f64, f64) {
    xs.iter()
        .filter(|x| x.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// One cell over the runs: a number as `median (min–max)`, text as itself when
/// every run agrees, else each run's text.
fn summarise_cells(cells: &[&Cell]) -> String {
    let nums: Option<Vec<f64>> = cells
        .iter()
        .map(|c| match c {
            Cell::Num { x, .. } => Some(*x),
            Cell::Text(_) => None,
        })
        .collect();
    match (nums, cells.first()) {
        (Some(xs), Some(Cell::Num { label, fmt, .. })) if xs.len() > 1 => {
            let (lo, hi) = min_max(&xs);
            match median(&xs) {
                Some(m) => labelled(label, format!("{} ({}–{})", fmt(m), fmt(lo), fmt(hi))),
                None => labelled(label, "—".into()),
            }
        }
        _ => {
            let mut seen: Vec<String> = Vec::new();
            for c in cells {
                let s = c.show();
                if !seen.contains(&s) {
                    seen.push(s);
                }
            }
            seen.join(" | ")
        }
    }
}

/// The figures of `runs` (each run's figures of one or more cases), one row per
/// figure name in order of first appearance.
pub fn summarise(runs: &[Vec<Figure>]) -> Vec<[String; 7]> {
    let mut keys: Vec<(&'static str, &str)> = Vec::new();
    for f in runs.iter().flatten() {
        if !keys.contains(&(f.case, f.name.as_str())) {
            keys.push((f.case, f.name.as_str()));
        }
    }
    keys.into_iter()
        .map(|(case, name)| {
            let figs: Vec<&Figure> = runs
                .iter()
                .flatten()
                .filter(|f| f.case == case && f.name == name)
                .collect();
            let ratios: Vec<f64> = figs.iter().filter_map(|f| f.ratio).collect();
            let ratio = match median(&ratios) {
                Some(m) if ratios.len() > 1 => {
                    let (lo, hi) = min_max(&ratios);
                    format!("{m:.2} ({lo:.2}–{hi:.2})")
                }
                Some(m) => format!("{m:.2}"),
                None => String::new(),
            };
            let verdicts: Vec<bool> = figs.iter().filter_map(|f| f.met).collect();
            let met_n = verdicts.iter().filter(|m| **m).count();
            let met = if verdicts.is_empty() {
                String::new()
            } else if met_n == verdicts.len() {
                "yes".to_string()
            } else if met_n == 0 {
                "NO".to_string()
            } else {
                format!("{met_n} of {} runs", verdicts.len())
            };
            let runs_of_case = runs
                .iter()
                .filter(|r| r.iter().any(|f| f.case == case))
                .count();
            let name = if figs.len() < runs_of_case {
                format!("{name} (in {} of {runs_of_case} runs)", figs.len())
            } else {
                name.to_string()
            };
            [
                case.to_string(),
                name,
                summarise_cells(&figs.iter().map(|f| &f.value).collect::<Vec<_>>()),
                summarise_cells(&figs.iter().map(|f| &f.baseline).collect::<Vec<_>>()),
                ratio,
                figs.first().map(|f| f.target.clone()).unwrap_or_default(),
                met,
            ]
        })
        .collect()
}

/// `/proc/loadavg`'s 1, 5 and 15 minute load averages, as printed there.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" / "))
        .unwrap_or_else(|| "unknown".into())
}

/// The commit the driver was built from (`git rev-parse --short HEAD` in the
/// source tree, `+changes` when tracked files differ from it), else the crate version.
pub fn commit() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(head) if !head.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{head}+changes")
            } else {
                head
            }
        }
        _ => format!("walcast {}", env!("CARGO_PKG_VERSION")),
    }
}

/// The time now in UTC, `YYYY-MM-DD HH:MM`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(x: f64) -> String {
        format!("{x:.2} s")
    }

    fn fig(value: f64, base: f64, met: bool) -> Figure {
        Figure::new(
            "drain",
            "drain time",
            Cell::num(value, secs),
            Cell::labelled("pg_recvlogical", base, secs),
            Some(value / base),
            "≤ 1.2×",
            Some(met),
        )
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn runs_are_summarised_per_figure_with_the_ratio_taken_per_run() {
        let runs = vec![
            vec![fig(10.0, 10.0, true)],
            vec![fig(12.0, 8.0, false)],
            vec![fig(9.0, 10.0, true)],
        ];
        let rows = summarise(&runs);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r[2], "10.00 s (9.00 s–12.00 s)");
        assert_eq!(r[3], "pg_recvlogical 10.00 s (8.00 s–10.00 s)");
        // Each run's ratio (1.0, 1.5, 0.9), then their median.
        assert_eq!(r[4], "1.00 (0.90–1.50)");
        assert_eq!(r[6], "2 of 3 runs");
    }

    #[test]
    fn one_run_prints_as_before_and_text_cells_that_differ_are_listed() {
        let rows = summarise(&[vec![fig(10.0, 8.0, true)]]);
        assert_eq!(rows[0][2], "10.00 s");
        assert_eq!(rows[0][4], "1.25");
        assert_eq!(rows[0][6], "yes");
        let t = |v: &str| vec![Figure::new("x", "n", v, "—", None, "", None)];
        let rows = summarise(&[t("1 / 1"), t("0 / 1"), t("1 / 1")]);
        assert_eq!(rows[0][2], "1 / 1 | 0 / 1");
        assert_eq!(rows[0][3], "—");
    }

    #[test]
    fn the_date_is_a_civil_date() {
        let s = utc_now();
        assert!(s.starts_with("20") && s.ends_with(" UTC"), "{s}");
        assert_eq!(s.len(), "2026-11-30 05:30 UTC".len());
    }
}
