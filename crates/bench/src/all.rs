//! `cargo run --release -p bench -- all`: the four scenarios of the
//! benchmark one after the other (each on fresh clusters, each next to
//! PostgreSQL's own logical replication in the same run), then one table of
//! ratios against the goals. Raw numbers of each scenario stay in its JSON
//! file; the table is also written as `summary.json`.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{big_txn, drain, live, median};

/// Sizes of one `all` run.
pub struct Sizes {
    pub wide_rows: i64,
    pub drain_rows: i64,
    pub big_txn_rows: i64,
    pub live_seconds: u32,
    pub runs: usize,
}

pub(crate) fn read(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Median of the numbers under `key` (NaN when there are none).
pub(crate) fn med(v: &Value, key: &str) -> f64 {
    let mut xs: Vec<f64> = v[key]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    if xs.is_empty() {
        return f64::NAN;
    }
    median(&mut xs)
}

pub async fn run(sizes: Sizes, dir: &Path, out_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(out_dir)?;
    let (wide, drain_json, big, live_json) = (
        out_dir.join("wide.json"),
        out_dir.join("drain.json"),
        out_dir.join("big-txn.json"),
        out_dir.join("live.json"),
    );
    eprintln!("== scenario 1: backlog drain, ~2 KB rows");
    drain::run(
        drain::Backlog::Wide,
        sizes.wide_rows,
        sizes.runs,
        dir,
        &wide,
    )
    .await?;
    eprintln!("== scenario 2: backlog drain, reference workload");
    drain::run(
        drain::Backlog::Reference,
        sizes.drain_rows,
        sizes.runs,
        dir,
        &drain_json,
    )
    .await?;
    eprintln!("== scenario 3: one big transaction");
    big_txn::run(sizes.big_txn_rows, sizes.runs, None, dir, &big).await?;
    eprintln!("== scenario 4: live");
    live::run(800, sizes.live_seconds, sizes.runs, dir, &live_json).await?;
    summarize(out_dir)
}

/// The table of ratios against the goals (and `summary.json`, `chart.png`)
/// from the scenario files in `out_dir`.
pub fn summarize(out_dir: &Path) -> Result<()> {
    let (wide, drain_json, big, live_json) = (
        out_dir.join("wide.json"),
        out_dir.join("drain.json"),
        out_dir.join("big-txn.json"),
        out_dir.join("live.json"),
    );

    let (w, d, b, l) = (
        read(&wide)?,
        read(&drain_json)?,
        read(&big)?,
        read(&live_json)?,
    );
    let ceiling = |v: &Value| med(v, "capture_ceiling_seconds") / med(v, "ours_seconds");
    let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let (ours, native) = (&l[live::OURS], &l[live::NATIVE]);
    let slowdown_ratio = num(&ours["source_slowdown"]) / num(&native["source_slowdown"]);
    let (wide_ratio, drain_ratio) = (
        num(&w["ratio_ours_to_best_native"]),
        num(&d["ratio_ours_to_best_native"]),
    );
    let big_time = 1.0 / num(&b["ratio_ours_to_best_native"]);
    let (p99, p999) = (
        num(&ours["fixed_rate_lag_p99_s"]),
        num(&ours["fixed_rate_lag_p999_s"]),
    );
    let live_peak = num(&l["peak_rss_mb"]);
    let drain_peak = med(&w, "ours_peak_rss_mb").max(med(&d, "ours_peak_rss_mb"));
    let wire_share = med(&d, "ours_wire_bytes_per_change") / med(&d, "pgoutput_bytes_per_change");
    let rows: Vec<(&str, String, &str, bool)> = vec![
        (
            "1 wide-row drain, vs PostgreSQL",
            format!("{wide_ratio:.2}x"),
            ">= 2x",
            wide_ratio >= 2.0,
        ),
        (
            "2 ~500-byte drain, vs PostgreSQL",
            format!("{drain_ratio:.2}x"),
            ">= 0.9x",
            drain_ratio >= 0.9,
        ),
        (
            "2 ~500-byte drain, of the capture ceiling",
            format!("{:.2}", ceiling(&d)),
            ">= 0.8",
            ceiling(&d) >= 0.8,
        ),
        (
            "3 big transaction, time vs PostgreSQL",
            format!("{big_time:.2}x"),
            "<= 0.5x",
            big_time <= 0.5,
        ),
        (
            "4 live 10k events/s, lag p99",
            format!("{p99:.3} s"),
            "< 0.25 s",
            p99 < 0.25,
        ),
        (
            "4 live 10k events/s, lag p999",
            format!("{p999:.3} s"),
            "< 1 s",
            p999 < 1.0,
        ),
        (
            "4 source slowdown, ours / PostgreSQL's",
            format!("{slowdown_ratio:.2}"),
            "<= 0.5",
            slowdown_ratio <= 0.5,
        ),
        (
            "4 peak resident memory (capture + apply)",
            format!("{live_peak:.0} MB"),
            "< 150 MB",
            live_peak < 150.0,
        ),
        (
            "1+2 peak resident memory in drains",
            format!("{drain_peak:.0} MB"),
            "< 256 MB",
            drain_peak < 256.0,
        ),
        (
            "2 wire bytes per change, of pgoutput's",
            format!("{wire_share:.2}"),
            "<= 0.25",
            wire_share <= 0.25,
        ),
    ];
    println!(
        "\nsummary (medians of {} runs, {} cores)",
        d["runs"].as_u64().unwrap_or(0),
        crate::cores()
    );
    println!("  {:<44} {:>10} {:>10}  met", "", "measured", "goal");
    for (what, got, goal, met) in &rows {
        println!(
            "  {what:<44} {got:>10} {goal:>10}  {}",
            if *met { "yes" } else { "no" }
        );
    }
    let summary: Vec<Value> = rows
        .iter()
        .map(|(w, g, goal, met)| serde_json::json!({"what": w, "measured": g, "goal": goal, "met": met}))
        .collect();
    std::fs::write(
        out_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    match crate::chart::draw(out_dir) {
        Ok(path) => println!("chart: {}", path.display()),
        Err(e) => eprintln!("no chart: {e:#}"),
    }
    eprintln!("raw numbers: {}", out_dir.display());
    Ok(())
}
