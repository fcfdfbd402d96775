//! `cargo run --release -p bench -- live`: scenario 4 of issue 3 — many
//! small transactions from 4 concurrent clients (`pgbench` with the reference
//! workload's `pgbench-txn.sql`), at a fixed rate and as fast as the source
//! goes, replicated by PostgreSQL's own subscription and by this daemon, one
//! after the other on the same clusters.
//!
//! * Lag is measured per row, the same way for both systems: a poller reads
//!   new rows of the tenant's `events` table on the target every 5 ms and
//!   notes when each became visible; the source row's commit time comes from
//!   `pg_xact_commit_timestamp` (`track_commit_timestamp = on`, one machine
//!   clock). Only events rows pgbench never updates or deletes afterwards
//!   (id mod 10 in 5..8) count, so the source's commit time is the insert's.
//!   (Commit timestamps on the target cannot be used: a replicated
//!   transaction records its origin's time.)
//! * Source slowdown: pgbench's transactions per second at full speed with
//!   the system replicating, against the same with nothing replicating. No
//!   checkpoint runs during the phases (one, and a warm-up run, before
//!   them); the systems take turns at going first and the phase without
//!   replication runs between them (the source slows down as its tables
//!   grow). The CPU each cluster (and its walsenders) and this process used
//!   per source transaction, until the target caught up, says where the
//!   time went.
//! * Peak resident memory of this process (capture and apply node run in
//!   it), read from `/proc/self/status` (VmHWM) after our runs.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgcluster::Cluster;
use tokio_postgres::Client;

use crate::drain::PUBLICATION;
use crate::nodes::{cluster_cpu_split, drop_slot, process_cpu, Split};
use crate::{cores, median, TABLES, TENANT};

/// Events per pgbench transaction of `pgbench-txn.sql` (10 inserts, 2
/// updates, 0.5 deletes), all tenants.
const EVENTS_PER_TXN: f64 = 12.5;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum System {
    Native,
    Ours,
}

/// The systems' keys in `live.json` (also read by the summary and chart).
pub(crate) const NATIVE: &str = "PostgreSQL subscription";
pub(crate) const OURS: &str = "heliosdb capture → apply (zstd, AES-256-GCM, TLS)";

impl System {
    fn label(self) -> &'static str {
        match self {
            Self::Native => NATIVE,
            Self::Ours => OURS,
        }
    }
}

/// pgbench for `seconds` with 4 clients, at `tps` (None: as fast as it
/// goes); the transactions per second it reports.
#[derive(Clone)]
struct Pgbench {
    bin: std::path::PathBuf,
    port: u16,
    script: std::path::PathBuf,
}

impl Pgbench {
    fn new(source: &Cluster, dir: &Path) -> Self {
        Self {
            bin: source.bindir().join("pgbench"),
            port: source.port(),
            script: dir.join("pgbench-txn.sql"),
        }
    }

    /// Run in a blocking thread (the pollers keep running meanwhile).
    async fn run(&self, tps: Option<u32>, seconds: u32) -> Result<f64> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || pgbench(&me, tps, seconds)).await?
    }
}

fn pgbench(p: &Pgbench, tps: Option<u32>, seconds: u32) -> Result<f64> {
    let mut cmd = Command::new(&p.bin);
    cmd.args([
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
        "-n",
        "-c",
        "4",
        "-j",
        "4",
    ])
    .arg("-p")
    .arg(p.port.to_string())
    .arg("-T")
    .arg(seconds.to_string())
    .arg("-f")
    .arg(&p.script);
    if let Some(r) = tps {
        cmd.arg("-R").arg(r.to_string());
    }
    cmd.arg("bench");
    let out = cmd.output().context("running pgbench")?;
    if !out.status.success() {
        bail!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .with_context(|| format!("no tps in pgbench output: {text}"))
}

/// CPU seconds so far: the source cluster (its backends serve pgbench),
/// the source's walsenders among them, the target cluster, this process
/// (the capture and apply nodes, and the lag poller).
#[derive(Clone, Copy)]
struct Cpu {
    source: f64,
    walsender: f64,
    target: f64,
    process: f64,
}

impl Cpu {
    fn now(source: &Cluster, target: &Cluster) -> Self {
        let (source, walsender) = cluster_cpu_split(source);
        Self {
            source,
            walsender,
            target: cluster_cpu_split(target).0,
            process: process_cpu(),
        }
    }

    /// Microseconds per transaction since `before`, for `txns` transactions.
    fn per_txn(self, before: Self, txns: f64) -> Self {
        let us = |a: f64, b: f64| (a - b) * 1e6 / txns.max(1.0);
        Self {
            source: us(self.source, before.source),
            walsender: us(self.walsender, before.walsender),
            target: us(self.target, before.target),
            process: us(self.process, before.process),
        }
    }

    fn json(self) -> serde_json::Value {
        serde_json::json!({
            "source_cluster": self.source, "source_walsenders": self.walsender,
            "target_cluster": self.target, "bench_process": self.process,
        })
    }
}

/// The median of each field.
fn median_cpu(v: &[Cpu]) -> Cpu {
    let m = |f: fn(&Cpu) -> f64| median(&mut v.iter().map(f).collect::<Vec<_>>());
    Cpu {
        source: m(|c| c.source),
        walsender: m(|c| c.walsender),
        target: m(|c| c.target),
        process: m(|c| c.process),
    }
}

/// After a run with nothing replicating: the target lacks its rows, and
/// the next transactions would update and delete them (`bench_small(b)`
/// changes the rows of block b - 100), which a system replicating then
/// meets as missing rows (conflicts for us, silently skipped by
/// PostgreSQL; and a table with conflicts keeps stored versions, so our
/// apply would take its slower path from then on). Skipping 100 blocks
/// makes those changes touch no row on either side.
async fn skip_unreplicated(src: &Client) -> Result<()> {
    src.batch_execute("SELECT setval('bench_blk', nextval('bench_blk') + 100)")
        .await?;
    Ok(())
}

/// Source commit time (µs since the Unix epoch) of the tenant's events rows
/// inserted since `since_us` that pgbench leaves alone afterwards.
async fn source_times(c: &Client, since_us: i64) -> Result<HashMap<i64, i64>> {
    let rows = c
        .query(
            "SELECT id, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1e6)::bigint
               FROM events WHERE tenant_id = $1 AND id >= 0 AND id % 10 BETWEEN 5 AND 8
                AND (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1e6)::bigint >= $2",
            &[&TENANT, &since_us],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Polls the target's events rows of the tenant; when each id first showed.
struct Poller {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<HashMap<i64, i64>>>,
}

impl Poller {
    async fn start(target: &Cluster) -> Result<Poller> {
        let c = target.connect("bench").await?;
        let last: i64 = c
            .query_one(
                "SELECT coalesce(max(id), 0) FROM events WHERE tenant_id = $1",
                &[&TENANT],
            )
            .await?
            .get(0);
        let (stop, mut rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let stmt = c
                .prepare("SELECT id FROM events WHERE tenant_id = $1 AND id > $2")
                .await?;
            let mut seen = HashMap::new();
            let mut last = last;
            loop {
                let rows = c.query(&stmt, &[&TENANT, &last]).await?;
                let now = now_us();
                for r in rows {
                    let id: i64 = r.get(0);
                    last = last.max(id);
                    seen.entry(id).or_insert(now);
                }
                if *rx.borrow() {
                    return Ok(seen);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                    _ = rx.changed() => {}
                }
            }
        });
        Ok(Poller { stop, task })
    }

    async fn finish(self) -> Result<HashMap<i64, i64>> {
        let _ = self.stop.send(true);
        self.task.await?
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Insert a marker row and wait until the target has it (everything the
/// source committed before it is applied).
async fn wait_caught_up(src: &Client, dst: &Client, marker: i64) -> Result<()> {
    src.execute(
        "INSERT INTO events VALUES ($1, $2, 'marker', '', now())",
        &[&TENANT, &marker],
    )
    .await?;
    let started = Instant::now();
    while dst
        .query_opt(
            "SELECT 1 FROM events WHERE tenant_id = $1 AND id = $2",
            &[&TENANT, &marker],
        )
        .await?
        .is_none()
    {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the target did not catch up within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Lags of the rows the source committed since `since_us`: sorted (s),
/// and the p99 per half second of source commit time (seconds since
/// `since_us`, lag ms) for the chart.
async fn lags(
    src: &Client,
    seen: &HashMap<i64, i64>,
    since_us: i64,
) -> Result<(Vec<f64>, Vec<(f64, f64)>)> {
    let s = source_times(src, since_us).await?;
    let pairs: Vec<(i64, f64)> = s
        .iter()
        .filter_map(|(id, t0)| {
            seen.get(id)
                .map(|t1| (t0 - since_us, (t1 - t0) as f64 / 1e6))
        })
        .collect();
    if pairs.len() < s.len() * 9 / 10 {
        bail!(
            "only {} of {} rows were seen arriving",
            pairs.len(),
            s.len()
        );
    }
    let mut buckets: std::collections::BTreeMap<i64, Vec<f64>> = Default::default();
    for (t, lag) in &pairs {
        buckets.entry(t / 500_000).or_default().push(*lag);
    }
    let series = buckets
        .into_iter()
        .map(|(b, mut v)| {
            v.sort_by(|a, b| a.total_cmp(b));
            (b as f64 * 0.5, quantile(&v, 0.99) * 1000.0)
        })
        .collect();
    let mut out: Vec<f64> = pairs.into_iter().map(|(_, l)| l).collect();
    out.sort_by(|a, b| a.total_cmp(b));
    Ok((out, series))
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub async fn run(tps: u32, seconds: u32, runs: usize, dir: &Path, out: &Path) -> Result<()> {
    let (source, target) = crate::nodes::clusters(dir).await?;
    let (src, dst) = (
        source.connect("bench").await?,
        target.connect("bench").await?,
    );
    let work = tempfile::tempdir()?;
    let pg = Pgbench::new(&source, dir);
    // Rows the updates and deletes of pgbench-txn.sql refer to.
    pg.run(None, 3).await?;
    // The tenant's publication, and the target equal to the source.
    crate::nodes::init_slot(&source, &target, work.path(), "live_init").await?;
    src.execute("SELECT pg_drop_replication_slot('live_init')", &[])
        .await?;
    for table in TABLES {
        crate::initial_sync::copy_pipe(&source, &target, table)?;
    }
    // A checkpoint now, and none during the phases (`checkpoint_timeout`
    // of the benchmark's clusters is an hour): full-page writes after a
    // checkpoint halve the source's rate for a while, and a timed
    // checkpoint used to land in some phases and not others. The warm-up
    // run takes the full-page writes of the pages the workload touches.
    for c in [&src, &dst] {
        c.batch_execute("CHECKPOINT").await?;
    }
    pg.run(None, seconds).await?;
    skip_unreplicated(&src).await?;

    let mut none_tps = Vec::new();
    let mut fixed: HashMap<&str, Vec<Vec<f64>>> = HashMap::new();
    let mut full: HashMap<&str, Vec<(f64, Vec<f64>)>> = HashMap::new();
    // Lag over time of the last run, per system: (fixed rate, full speed).
    type Series = Vec<(f64, f64)>;
    let mut over_time: HashMap<&str, (Series, Series)> = HashMap::new();
    let mut marker = -1_000_000i64;
    // Peak resident memory while our nodes ran (the largest of the runs).
    let mut peak = 0.0f64;
    // CPU µs per pgbench transaction at full speed, per system (None: no
    // replication).
    let mut cpu: HashMap<Option<System>, Vec<Cpu>> = HashMap::new();
    for r in 0..runs {
        // The source slows down as its tables grow: the systems take turns
        // at going first, and the run without replication sits between
        // them.
        let order = if r % 2 == 0 {
            [Some(System::Native), None, Some(System::Ours)]
        } else {
            [Some(System::Ours), None, Some(System::Native)]
        };
        for system in order {
            let Some(system) = system else {
                let before = Cpu::now(&source, &target);
                let t = pg.run(None, seconds).await?;
                skip_unreplicated(&src).await?;
                none_tps.push(t);
                cpu.entry(None)
                    .or_default()
                    .push(Cpu::now(&source, &target).per_txn(before, t * f64::from(seconds)));
                eprintln!("  run {}: no replication: {t:.0} tps", r + 1);
                continue;
            };
            let slot = format!(
                "live_{}_{r}",
                if system == System::Ours {
                    "ours"
                } else {
                    "native"
                }
            );
            let mut nodes = None;
            match system {
                System::Native => {
                    dst.batch_execute(&format!(
                        "CREATE SUBSCRIPTION {slot} CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=bench'
                           PUBLICATION {PUBLICATION} WITH (copy_data = false, slot_name = '{slot}')",
                        source.port()
                    ))
                    .await?;
                }
                System::Ours => {
                    // Each run reads a new slot from now: the progress of
                    // the run before would be a gap (`init` refuses it).
                    dst.batch_execute("DROP SCHEMA IF EXISTS heliosdb_replication CASCADE")
                        .await?;
                    crate::nodes::init_slot(&source, &target, work.path(), &slot).await?;
                    crate::reset_peak_rss();
                    nodes = Some(
                        Split::start(&source, &target, work.path(), &slot, PUBLICATION).await?,
                    );
                }
            }
            marker -= 1;
            wait_caught_up(&src, &dst, marker).await?;

            let since = now_us();
            let poller = Poller::start(&target).await?;
            pg.run(Some(tps), seconds).await?;
            marker -= 1;
            wait_caught_up(&src, &dst, marker).await?;
            let (fixed_lags, fixed_series) = lags(&src, &poller.finish().await?, since).await?;

            let since = now_us();
            let poller = Poller::start(&target).await?;
            let before = Cpu::now(&source, &target);
            let max_tps = pg.run(None, seconds).await?;
            marker -= 1;
            wait_caught_up(&src, &dst, marker).await?;
            cpu.entry(Some(system))
                .or_default()
                .push(Cpu::now(&source, &target).per_txn(before, max_tps * f64::from(seconds)));
            let (full_lags, full_series) = lags(&src, &poller.finish().await?, since).await?;
            over_time.insert(system.label(), (fixed_series, full_series));
            eprintln!(
                "  run {}: {:<52} at {tps} tps: lag p50 {:.3} s p99 {:.3} s p999 {:.3} s; full speed {max_tps:.0} tps, lag p99 {:.3} s",
                r + 1,
                system.label(),
                quantile(&fixed_lags, 0.5),
                quantile(&fixed_lags, 0.99),
                quantile(&fixed_lags, 0.999),
                quantile(&full_lags, 0.99),
            );
            fixed.entry(system.label()).or_default().push(fixed_lags);
            full.entry(system.label())
                .or_default()
                .push((max_tps, full_lags));
            match system {
                System::Native => {
                    dst.batch_execute(&format!("DROP SUBSCRIPTION {slot}"))
                        .await?;
                }
                System::Ours => {
                    peak = peak.max(crate::peak_rss_mb());
                    if let Some(n) = nodes.take() {
                        n.stop().await;
                    }
                    drop_slot(&src, &slot).await?;
                }
            }
        }
    }

    let tps0 = median(&mut none_tps.clone());
    println!(
        "\nlive: pgbench-txn.sql from 4 clients, {tps} tps fixed (~{:.0} events/s, ~{:.0} of {TENANT}) and full speed, {seconds} s per phase, median of {runs} runs, {} cores",
        tps as f64 * EVENTS_PER_TXN,
        tps as f64 * EVENTS_PER_TXN / 10.0,
        cores()
    );
    println!(
        "  {:<52} {:>8} {:>8} {:>8} {:>10} {:>9} {:>9}",
        "", "p50 s", "p99 s", "p999 s", "full tps", "slowdown", "p99 full"
    );
    println!(
        "  {:<52} {:>8} {:>8} {:>8} {tps0:>10.0} {:>9} {:>9}",
        "no replication", "", "", "", "", ""
    );
    let mut json = serde_json::Map::new();
    let mut slowdowns = HashMap::new();
    for system in [System::Native, System::Ours] {
        let label = system.label();
        let q = |qq: f64| {
            let mut v: Vec<f64> = fixed[label].iter().map(|l| quantile(l, qq)).collect();
            median(&mut v)
        };
        let mut tpss: Vec<f64> = full[label].iter().map(|(t, _)| *t).collect();
        let t = median(&mut tpss);
        let mut p99full: Vec<f64> = full[label].iter().map(|(_, l)| quantile(l, 0.99)).collect();
        let slowdown = tps0 / t - 1.0;
        slowdowns.insert(label, slowdown);
        println!(
            "  {label:<52} {:>8.3} {:>8.3} {:>8.3} {t:>10.0} {:>8.0}% {:>9.3}",
            q(0.5),
            q(0.99),
            q(0.999),
            slowdown * 100.0,
            median(&mut p99full)
        );
        json.insert(
            label.into(),
            serde_json::json!({
                "fixed_rate_lag_p50_s": q(0.5), "fixed_rate_lag_p99_s": q(0.99), "fixed_rate_lag_p999_s": q(0.999),
                "full_speed_tps": tpss, "full_speed_lag_p99_s": p99full, "source_slowdown": slowdown,
                "fixed_rate_lag_p99_ms_per_half_second": over_time.get(label).map(|s| &s.0),
                "full_speed_lag_p99_ms_per_half_second": over_time.get(label).map(|s| &s.1),
            }),
        );
    }
    println!(
        "  source slowdown, ours vs PostgreSQL's: {:.2}; peak resident memory of this process (capture + apply nodes): {peak:.0} MB",
        slowdowns[System::Ours.label()] / slowdowns[System::Native.label()].max(1e-9),
    );
    println!("  CPU µs per source transaction at full speed (until caught up), medians:");
    println!(
        "  {:<52} {:>8} {:>10} {:>8} {:>8}",
        "", "source", "walsender", "target", "bench"
    );
    let mut cpu_json = serde_json::Map::new();
    for system in [None, Some(System::Native), Some(System::Ours)] {
        let name = system.map_or("no replication", System::label);
        let c = median_cpu(&cpu[&system]);
        println!(
            "  {name:<52} {:>8.0} {:>10.0} {:>8.0} {:>8.0}",
            c.source, c.walsender, c.target, c.process
        );
        cpu_json.insert(
            name.into(),
            serde_json::Value::Array(cpu[&system].iter().map(|c| c.json()).collect()),
        );
    }
    json.insert(
        "full_speed_cpu_us_per_txn".into(),
        serde_json::Value::Object(cpu_json),
    );
    json.insert("no_replication_tps".into(), serde_json::json!(none_tps));
    json.insert("fixed_tps".into(), serde_json::json!(tps));
    json.insert("seconds".into(), serde_json::json!(seconds));
    json.insert("runs".into(), serde_json::json!(runs));
    json.insert("cores".into(), serde_json::json!(cores()));
    json.insert("peak_rss_mb".into(), serde_json::json!(peak));
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(
        out,
        serde_json::to_string_pretty(&serde_json::Value::Object(json))?,
    )?;
    eprintln!("raw numbers: {}", out.display());
    Ok(())
}
