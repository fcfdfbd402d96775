//! `cargo run --release -p bench -- tenants`: N tenants drained from one
//! backlog, in the same run, by
//!
//! * this node with one shared slot (one walsender decodes the WAL once; the
//!   hub routes each change to its tenant),
//! * this node with a slot per tenant (N walsenders, each decoding all of
//!   the WAL),
//! * PostgreSQL's own replication: one subscription per tenant to the
//!   tenant's row-filtered publication (N walsenders, N apply workers;
//!   `max_wal_senders`, `max_replication_slots`, `max_logical_replication_workers`
//!   and `max_worker_processes` raised so that 50 fit).
//!
//! The backlog: the reference workload's rows (`bench_ins`, made before any
//! slot exists) written again as tenants `n-00` … `n-{N-1}`, 100 rows per
//! transaction, each transaction one tenant's (a SaaS application writes a
//! tenant's rows together); then 20% of the blocks updated and 5% deleted,
//! again one tenant per transaction. Every system's slots exist before the
//! backlog is made. A drain ends when every tenant's marker row (one
//! transaction after the backlog) is on the target; the tenants' rows are
//! then compared with the source's.
//!
//! Printed per N and system (medians of the runs): drain time, CPU of the
//! source's walsenders (the decoding) and of the whole source cluster, the
//! node's CPU and peak RSS (ours is the daemon's binary, `start` with a node
//! file, in a process of its own: build the workspace first). The node logs
//! at `warn`; `BENCH_NODE_LOG=info` sets its `RUST_LOG`, and
//! `BENCH_NODE_LOG_DIR=<dir>` keeps each node's log there.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use heliosdb_tenant_replication::config::Config;
use pgcluster::Cluster;
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::nodes::{cluster_cpu_split, drop_slot};
use crate::{median, TABLES};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    Shared,
    SlotPerTenant,
    PostgreSql,
}

impl System {
    const ALL: [System; 3] = [System::Shared, System::SlotPerTenant, System::PostgreSql];

    fn label(self) -> &'static str {
        match self {
            Self::Shared => "heliosdb, one shared slot",
            Self::SlotPerTenant => "heliosdb, a slot per tenant",
            Self::PostgreSql => "PostgreSQL, a subscription per tenant",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::SlotPerTenant => "slot_per_tenant",
            Self::PostgreSql => "postgresql",
        }
    }
}

/// One drain's figures.
#[derive(Clone, Copy, Default)]
struct Drain {
    seconds: f64,
    walsender_cpu: f64,
    source_cpu: f64,
    node_cpu: f64,
    node_rss_mb: f64,
}

/// The backlog generator: template rows (tenants `tenant-*`) written again
/// for tenant `n-<k % n>`, block by block.
const TENANTS_SQL: &str = "
CREATE INDEX IF NOT EXISTS accounts_id ON accounts (id);
CREATE INDEX IF NOT EXISTS orders_id ON orders (id);
CREATE INDEX IF NOT EXISTS events_id ON events (id);
CREATE OR REPLACE FUNCTION bench_tenant(k bigint, n int) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT 'n-' || lpad((k % n)::text, 2, '0') $$;
CREATE OR REPLACE PROCEDURE bench_tenants(rows bigint, n int) LANGUAGE plpgsql AS $$
DECLARE k bigint;
BEGIN
  FOR k IN 0 .. rows / 100 - 1 LOOP
    INSERT INTO accounts SELECT bench_tenant(k, n), id, name, email, balance, updated_at
      FROM accounts WHERE tenant_id LIKE 'tenant-%' AND id BETWEEN k * 100 AND k * 100 + 99;
    INSERT INTO orders SELECT bench_tenant(k, n), id, account_id, status, amount, payload, created_at
      FROM orders WHERE tenant_id LIKE 'tenant-%' AND id BETWEEN k * 100 AND k * 100 + 99;
    INSERT INTO events SELECT bench_tenant(k, n), id, kind, body, created_at
      FROM events WHERE tenant_id LIKE 'tenant-%' AND id BETWEEN k * 100 AND k * 100 + 99;
    COMMIT;
  END LOOP;
  FOR k IN 0 .. rows / 100 - 1 LOOP
    CONTINUE WHEN k % 5 <> 1;
    UPDATE accounts SET balance = balance + 1 WHERE tenant_id = bench_tenant(k, n) AND id BETWEEN k * 100 AND k * 100 + 99;
    UPDATE orders SET status = 'paid' WHERE tenant_id = bench_tenant(k, n) AND id BETWEEN k * 100 AND k * 100 + 99;
    UPDATE events SET kind = kind || '-seen' WHERE tenant_id = bench_tenant(k, n) AND id BETWEEN k * 100 AND k * 100 + 99;
    COMMIT;
  END LOOP;
  FOR k IN 0 .. rows / 100 - 1 LOOP
    CONTINUE WHEN k % 20 <> 3;
    DELETE FROM accounts WHERE tenant_id = bench_tenant(k, n) AND id BETWEEN k * 100 AND k * 100 + 99;
    DELETE FROM orders WHERE tenant_id = bench_tenant(k, n) AND id BETWEEN k * 100 AND k * 100 + 99;
    DELETE FROM events WHERE tenant_id = bench_tenant(k, n) AND id BETWEEN k * 100 AND k * 100 + 99;
    COMMIT;
  END LOOP;
END $$;";

fn tenant(i: usize) -> String {
    format!("n-{i:02}")
}

/// Settings so that 50 subscriptions (and their walsenders and apply
/// workers) fit; both clusters get them.
fn options() -> pgcluster::ClusterOptions {
    crate::options()
        .set("max_connections", "300")
        .set("max_wal_senders", "200")
        .set("max_replication_slots", "250")
        .set("max_logical_replication_workers", "64")
        .set("max_worker_processes", "96")
        .set("max_sync_workers_per_subscription", "2")
}

/// The live phase: `rate` row changes per second in total, spread over
/// the tenants, for `seconds`, against each system in turn.
#[derive(Clone, Copy)]
pub struct Live {
    pub rate: u32,
    pub seconds: u32,
}

/// One system's lag in the live phase (ms).
#[derive(Clone, Copy, Default)]
struct Lag {
    p50: f64,
    p99: f64,
    /// The worst tenant's p99.
    worst_p99: f64,
    /// Row changes per second the source reached.
    rate: f64,
}

pub async fn run(
    ns: &[usize],
    rows: i64,
    runs: usize,
    live: Live,
    dir: &Path,
    out: &Path,
) -> Result<()> {
    if ns.iter().any(|&n| n == 0 || n > 100) {
        bail!("--tenants takes counts from 1 to 100");
    }
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .with_context(|| format!("reading {} (set --workload-dir)", dir.join(name).display()))
    };
    let (schema, workload) = (read("schema.sql")?, read("workload.sql")?);
    let mut report = serde_json::Map::new();
    let mut table = Vec::new();
    for &n in ns {
        let source = Cluster::start_with(options())?;
        let target = Cluster::start_with(options())?;
        for c in [&source, &target] {
            c.create_database("bench").await?;
            c.connect("bench").await?.batch_execute(&schema).await?;
        }
        let (src, dst) = (
            source.connect("bench").await?,
            target.connect("bench").await?,
        );
        src.batch_execute(&workload).await?;
        src.batch_execute(TENANTS_SQL).await?;
        // Template rows, before any slot.
        src.execute("SELECT bench_ins(0, $1)", &[&(rows - 1)])
            .await?;
        src.batch_execute("CHECKPOINT").await?;
        let work = tempfile::tempdir()?;
        let mut results: Vec<Vec<Drain>> = vec![Vec::new(); System::ALL.len()];
        for r in 0..runs {
            // A clean slate: no tenant rows, every consumer's slot, then the backlog.
            for t in TABLES {
                src.batch_execute(&format!("DELETE FROM {t} WHERE tenant_id LIKE 'n-%'"))
                    .await?;
            }
            reset_target(&dst).await?;
            let (shared_file, shared) = node_configs(&source, &target, work.path(), n, r, true)?;
            let (own_file, own) = node_configs(&source, &target, work.path(), n, r, false)?;
            for c in shared.iter().chain(own.iter()) {
                heliosdb_tenant_replication::provision::init(c, false, false)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            for i in 0..n {
                dst.batch_execute(&format!(
                    "CREATE SUBSCRIPTION pg_{r}_{i} CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=bench'
                       PUBLICATION own_{r}_{i}_pub WITH (copy_data = false, enabled = false, streaming = on, slot_name = 'pg_{r}_{i}')",
                    source.port()
                ))
                .await?;
            }
            reset_target(&dst).await?;
            let t = Instant::now();
            src.batch_execute(&format!("CALL bench_tenants({rows}, {n})"))
                .await?;
            let markers: Vec<String> = (0..n)
                .map(|i| {
                    format!(
                        "('{}', -1, 'bench-marker', 'the backlog ends here', now())",
                        tenant(i)
                    )
                })
                .collect();
            src.batch_execute(&format!("INSERT INTO events VALUES {}", markers.join(", ")))
                .await?;
            let expected = tenants_state(&src).await?;
            eprintln!(
                "N = {n}, run {}: backlog of {} changes over {n} tenant(s) in {:.1} s",
                r + 1,
                rows + rows / 5 + rows / 20,
                t.elapsed().as_secs_f64()
            );
            for k in 0..System::ALL.len() {
                let i = (k + r) % System::ALL.len();
                let system = System::ALL[i];
                reset_target(&dst).await?;
                let d = match system {
                    System::Shared => ours(&source, &dst, &shared_file, n).await?,
                    System::SlotPerTenant => ours(&source, &dst, &own_file, n).await?,
                    System::PostgreSql => postgres(&source, &dst, r, n).await?,
                };
                confirm(&dst, &expected).await?;
                eprintln!(
                    "  {:<40} {:>7.2} s  walsenders {:>6.2} s CPU  source {:>6.2} s  node {:>5.2} s  {:>5.0} MB",
                    system.label(),
                    d.seconds,
                    d.walsender_cpu,
                    d.source_cpu,
                    d.node_cpu,
                    d.node_rss_mb
                );
                results[i].push(d);
            }
            for c in &shared[..1] {
                drop_slot(&src, &c.tenant.slot).await?;
            }
            for c in &own {
                drop_slot(&src, &c.tenant.slot).await?;
            }
        }
        let mut per = serde_json::Map::new();
        let mut medians = Vec::new();
        for (i, system) in System::ALL.iter().enumerate() {
            let pick =
                |f: fn(&Drain) -> f64| median(&mut results[i].iter().map(f).collect::<Vec<_>>());
            let m = Drain {
                seconds: pick(|d| d.seconds),
                walsender_cpu: pick(|d| d.walsender_cpu),
                source_cpu: pick(|d| d.source_cpu),
                node_cpu: pick(|d| d.node_cpu),
                node_rss_mb: pick(|d| d.node_rss_mb),
            };
            per.insert(
                system.key().into(),
                serde_json::json!({
                    "drain_seconds": m.seconds,
                    "walsender_cpu_seconds": m.walsender_cpu,
                    "source_cpu_seconds": m.source_cpu,
                    "node_cpu_seconds": m.node_cpu,
                    "node_peak_rss_mb": m.node_rss_mb,
                    "runs": results[i].iter().map(|d| d.seconds).collect::<Vec<_>>(),
                }),
            );
            medians.push(m);
        }
        let mut lags = Vec::new();
        if live.seconds > 0 {
            for (k, system) in System::ALL.iter().enumerate() {
                let lag =
                    live_phase(&source, &target, work.path(), n, *system, runs + k, live).await?;
                eprintln!(
                    "N = {n}, live: {:<40} p50 {:>6.1} ms  p99 {:>6.1} ms  worst tenant's p99 {:>6.1} ms  at {:>6.0} changes/s",
                    system.label(),
                    lag.p50,
                    lag.p99,
                    lag.worst_p99,
                    lag.rate
                );
                per.insert(
                    format!("{}_live", system.key()),
                    serde_json::json!({
                        "lag_p50_ms": lag.p50, "lag_p99_ms": lag.p99,
                        "worst_tenant_lag_p99_ms": lag.worst_p99, "changes_per_sec": lag.rate,
                    }),
                );
                lags.push(lag);
            }
        }
        report.insert(n.to_string(), serde_json::Value::Object(per));
        table.push((n, medians, lags));
    }

    println!("\nN tenants drained from one backlog of {rows} rows (+20% updates, 5% deletes), medians of {runs}:");
    println!(
        "{:>4}  {:<40} {:>9} {:>16} {:>12} {:>10} {:>9}",
        "N", "system", "drain s", "walsender CPU s", "source CPU s", "node CPU s", "node MB"
    );
    for (n, medians, lags) in &table {
        for (system, m) in System::ALL.iter().zip(medians) {
            println!(
                "{n:>4}  {:<40} {:>9.2} {:>16.2} {:>12.2} {:>10.2} {:>9.0}",
                system.label(),
                m.seconds,
                m.walsender_cpu,
                m.source_cpu,
                m.node_cpu,
                m.node_rss_mb
            );
        }
        for (system, l) in System::ALL.iter().zip(lags) {
            println!(
                "{n:>4}  {:<40} live at {:.0} changes/s: lag p50 {:.1} ms, p99 {:.1} ms, worst tenant's p99 {:.1} ms",
                system.label(),
                l.rate,
                l.p50,
                l.p99,
                l.worst_p99
            );
        }
        let (shared, pg) = (&medians[0], &medians[2]);
        println!(
            "      drain: PostgreSQL / shared = {:.2}x; decoding CPU: PostgreSQL / shared = {:.2}x",
            pg.seconds / shared.seconds,
            pg.walsender_cpu / shared.walsender_cpu.max(1e-9)
        );
    }
    if let (Some((1, first, _)), Some((n, last, _))) = (table.first(), table.last()) {
        println!(
            "decoding CPU at N = {n} / N = 1: shared {:.2}x, slot per tenant {:.2}x, PostgreSQL {:.2}x",
            last[0].walsender_cpu / first[0].walsender_cpu.max(1e-9),
            last[1].walsender_cpu / first[1].walsender_cpu.max(1e-9),
            last[2].walsender_cpu / first[2].walsender_cpu.max(1e-9)
        );
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    println!("results: {}", out.display());
    Ok(())
}

/// The node's tenant configurations: one shared slot, or a slot and
/// publication each (PostgreSQL's subscriptions use those publications).
fn node_configs(
    source: &Cluster,
    target: &Cluster,
    dir: &Path,
    n: usize,
    run: usize,
    shared: bool,
) -> Result<(PathBuf, Vec<Arc<Config>>)> {
    let name = if shared { "shared" } else { "own" };
    let mut text = format!(
        "[replication]\nsource_connection = \"{}\"\n[cdc]\nreplication_slot = \"{name}_{run}_slot\"\npublication_name = \"{name}_{run}_pub\"\n\
         checkpoint_dir = \"{}\"\nstart_lsn = 1\n[performance]\nworker_threads = 2\n[features]\nenable_monitoring = false\n",
        source.superuser_url("bench"),
        dir.join(format!("checkpoints-{name}-{run}")).display()
    );
    for i in 0..n {
        text.push_str(&format!(
            "\n[[tenants]]\n[tenants.replication]\ntenant_id = \"{}\"\ntarget_connection = \"{}\"\n",
            tenant(i),
            target.superuser_url("bench")
        ));
        if !shared {
            text.push_str(&format!(
                "[tenants.cdc]\nreplication_slot = \"own_{run}_{i}\"\npublication_name = \"own_{run}_{i}_pub\"\n"
            ));
        }
    }
    let configs = Config::node_from_toml(&text, "tenants.toml", |_| None)?
        .into_iter()
        .map(Arc::new)
        .collect();
    let file = dir.join(format!("{name}-{run}.toml"));
    std::fs::write(&file, text)?;
    Ok((file, configs))
}

/// Our node: the daemon's binary (`start` with the node file), a process of
/// its own, so its CPU and peak RSS are its own.
struct Node {
    child: std::process::Child,
    log: PathBuf,
}

impl Node {
    fn start(file: &Path) -> Result<Node> {
        let bin = std::env::current_exe()?.with_file_name("heliosdb-tenant-replication");
        if !bin.exists() {
            bail!(
                "{} is missing: build the workspace first (cargo build --release)",
                bin.display()
            );
        }
        let log = file.with_extension("log");
        let child = std::process::Command::new(bin)
            .arg("--config")
            .arg(file)
            .arg("start")
            .env(
                "RUST_LOG",
                std::env::var("BENCH_NODE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(Node { child, log })
    }

    /// `work` unless the node exits first.
    async fn guard<T>(&mut self, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let child = &mut self.child;
        let exited = async move {
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            r = work => r,
            status = exited => bail!(
                "the node exited ({status}): {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            ),
        }
    }

    /// CPU seconds the node has used.
    fn cpu(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (num(11) + num(12)) / 100.0
    }

    /// The node's peak resident set size (MB).
    fn peak_rss_mb(&self) -> f64 {
        crate::peak_rss_mb_of(&self.child.id().to_string())
    }

    /// SIGTERM, and wait for the node to finish (killed after 20 s).
    async fn stop(mut self) {
        if let Ok(keep) = std::env::var("BENCH_NODE_LOG_DIR") {
            let _ = std::fs::copy(
                &self.log,
                Path::new(&keep).join(self.log.file_name().unwrap_or_default()),
            );
        }
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Our node until every tenant's marker is on the target.
async fn ours(source: &Cluster, dst: &Client, file: &Path, n: usize) -> Result<Drain> {
    let walsenders0 = cluster_cpu_split(source);
    let started = Instant::now();
    let mut node = Node::start(file)?;
    let seconds = node.guard(markers_seen(dst, n, started)).await?;
    let walsenders = cluster_cpu_split(source);
    let d = Drain {
        seconds,
        walsender_cpu: walsenders.1,
        source_cpu: walsenders.0 - walsenders0.0,
        node_cpu: node.cpu(),
        node_rss_mb: node.peak_rss_mb(),
    };
    node.stop().await;
    Ok(d)
}

/// PostgreSQL's subscriptions of run `r` until every marker is on the target.
async fn postgres(source: &Cluster, dst: &Client, r: usize, n: usize) -> Result<Drain> {
    let walsenders0 = cluster_cpu_split(source);
    let started = Instant::now();
    for i in 0..n {
        dst.batch_execute(&format!("ALTER SUBSCRIPTION pg_{r}_{i} ENABLE"))
            .await?;
    }
    let seconds = markers_seen(dst, n, started).await?;
    let walsenders = cluster_cpu_split(source);
    for i in 0..n {
        dst.batch_execute(&format!("DROP SUBSCRIPTION pg_{r}_{i}"))
            .await?;
    }
    Ok(Drain {
        seconds,
        walsender_cpu: walsenders.1,
        source_cpu: walsenders.0 - walsenders0.0,
        node_cpu: 0.0,
        node_rss_mb: 0.0,
    })
}

/// Poll for every tenant's marker every 10 ms.
async fn markers_seen(dst: &Client, n: usize, started: Instant) -> Result<f64> {
    loop {
        let seen: i64 = dst
            .query_one(
                "SELECT count(*) FROM events WHERE id = -1 AND tenant_id LIKE 'n-%'",
                &[],
            )
            .await?
            .get(0);
        if seen as usize >= n {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("{seen} of {n} tenants' last rows on the target after 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Count and md5 of the tenants' rows of each table.
async fn tenants_state(c: &Client) -> Result<Vec<(i64, String)>> {
    let mut out = Vec::new();
    for t in TABLES {
        let row = c
            .query_one(
                &format!("SELECT count(*), coalesce(md5(string_agg((x.*)::text, '|' ORDER BY x.tenant_id, x.id)), '') FROM {t} x WHERE tenant_id LIKE 'n-%'"),
                &[],
            )
            .await?;
        out.push((row.get(0), row.get(1)));
    }
    Ok(out)
}

async fn confirm(dst: &Client, expected: &[(i64, String)]) -> Result<()> {
    let by = Instant::now() + Duration::from_secs(60);
    while tenants_state(dst).await? != expected {
        if Instant::now() > by {
            bail!("every marker is on the target, and the tenants' rows still differ from the source's a minute later");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn reset_target(dst: &Client) -> Result<()> {
    dst.batch_execute(
        "TRUNCATE accounts, orders, events; DROP SCHEMA IF EXISTS heliosdb_replication CASCADE; CHECKPOINT;",
    )
    .await?;
    Ok(())
}

/// Ids of the live phase's rows start here (the backlog's are below).
const LIVE_BASE: i64 = 1_000_000_000;

/// One system replicating the live load: its consumers made now (no
/// backlog), warmed up, then `live.rate` changes/s for `live.seconds`; lag
/// per row from its source commit (`pg_xact_commit_timestamp`) to when a
/// poller of the target first saw it.
async fn live_phase(
    source: &Cluster,
    target: &Cluster,
    dir: &Path,
    n: usize,
    system: System,
    r: usize,
    live: Live,
) -> Result<Lag> {
    let (src, dst) = (
        source.connect("bench").await?,
        target.connect("bench").await?,
    );
    reset_target(&dst).await?;
    dst.batch_execute("CREATE INDEX IF NOT EXISTS events_id ON events (id)")
        .await?;
    let base = LIVE_BASE + r as i64 * 10_000_000;
    let (file, configs) = node_configs(source, target, dir, n, r, system == System::Shared)?;
    let mut node = None;
    match system {
        System::PostgreSql => {
            for c in &configs {
                heliosdb_tenant_replication::provision::init(c, false, false)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            // The publications are ours (made by init); their slots go.
            for c in &configs {
                drop_slot(&src, &c.tenant.slot).await?;
            }
            for i in 0..n {
                dst.batch_execute(&format!(
                    "CREATE SUBSCRIPTION pg_{r}_{i} CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=bench'
                       PUBLICATION own_{r}_{i}_pub WITH (copy_data = false, streaming = on, slot_name = 'pg_{r}_{i}')",
                    source.port()
                ))
                .await?;
            }
        }
        _ => {
            for c in &configs {
                heliosdb_tenant_replication::provision::init(c, false, false)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            node = Some(Node::start(&file)?);
        }
    }
    // Warm up: a row per tenant, seen on the target.
    let warm = base - 1;
    let markers: Vec<String> = (0..n)
        .map(|i| format!("('{}', {warm}, 'warm-up', '', now())", tenant(i)))
        .collect();
    src.batch_execute(&format!("INSERT INTO events VALUES {}", markers.join(", ")))
        .await?;
    let wait_ids = |id: i64| {
        let dst = &dst;
        async move {
            let started = Instant::now();
            loop {
                let seen: i64 = dst
                    .query_one("SELECT count(*) FROM events WHERE id = $1", &[&id])
                    .await?
                    .get(0);
                if seen as usize >= n {
                    return Ok::<(), anyhow::Error>(());
                }
                if started.elapsed() > Duration::from_secs(600) {
                    bail!("{seen} of {n} tenants' rows {id} on the target after 10 minutes");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    match node.as_mut() {
        Some(node) => node.guard(wait_ids(warm)).await?,
        None => wait_ids(warm).await?,
    }

    // The poller notes when each row first shows on the target.
    let poll = target.connect("bench").await?;
    let (stop_poll, mut stopping) = watch::channel(false);
    let poller = tokio::spawn(async move {
        let stmt = poll
            .prepare("SELECT tenant_id, id FROM events WHERE id > $1 AND id < $2")
            .await?;
        let (mut last, limit) = (base - 1, base + 9_000_000);
        let mut seen: std::collections::HashMap<(String, i64), i64> = Default::default();
        loop {
            let rows = poll.query(&stmt, &[&last, &limit]).await?;
            let now = now_us();
            for row in rows {
                let id: i64 = row.get(1);
                last = last.max(id);
                seen.entry((row.get(0), id)).or_insert(now);
            }
            if *stopping.borrow() {
                return Ok::<_, anyhow::Error>(seen);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                _ = stopping.changed() => {}
            }
        }
    });
    // The load: 10-row transactions of one tenant each, from 4 clients.
    let clients = 4usize;
    let per_client = f64::from(live.rate) / 10.0 / clients as f64;
    let started = Instant::now();
    let until = started + Duration::from_secs(u64::from(live.seconds));
    let mut load = Vec::new();
    for c in 0..clients {
        let conn = source.connect("bench").await?;
        load.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_client));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let stmt = conn
                .prepare("INSERT INTO events SELECT $1, g, 'live', repeat('x', 200), now() FROM generate_series($2::bigint, $2::bigint + 9) g")
                .await?;
            let mut k = c as i64;
            let mut txns = 0u64;
            while Instant::now() < until {
                tick.tick().await;
                let t = format!("n-{:02}", k as usize % n);
                conn.execute(&stmt, &[&t, &(base + k * 10)]).await?;
                k += clients as i64;
                txns += 1;
            }
            Ok::<u64, anyhow::Error>(txns)
        }));
    }
    let mut txns = 0;
    for l in load {
        txns += l.await??;
    }
    let rate = txns as f64 * 10.0 / started.elapsed().as_secs_f64();
    // Everything written is on the target (a row per tenant after it).
    let done = base + 9_500_000;
    let markers: Vec<String> = (0..n)
        .map(|i| format!("('{}', {done}, 'live-end', '', now())", tenant(i)))
        .collect();
    src.batch_execute(&format!("INSERT INTO events VALUES {}", markers.join(", ")))
        .await?;
    match node.as_mut() {
        Some(node) => node.guard(wait_ids(done)).await?,
        None => wait_ids(done).await?,
    }
    let _ = stop_poll.send(true);
    let seen = poller.await??;
    if let Some(node) = node {
        node.stop().await;
    }
    let committed = src
        .query(
            "SELECT tenant_id, id, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1e6)::bigint
               FROM events WHERE id >= $1 AND id < $2",
            &[&base, &(base + 9_000_000)],
        )
        .await?;
    let mut all = Vec::new();
    let mut by_tenant: std::collections::HashMap<String, Vec<f64>> = Default::default();
    for row in committed {
        let key: (String, i64) = (row.get(0), row.get(1));
        let t0: i64 = row.get(2);
        if let Some(t1) = seen.get(&key) {
            let lag = (t1 - t0) as f64 / 1000.0;
            all.push(lag);
            by_tenant.entry(key.0).or_default().push(lag);
        }
    }
    if all.is_empty() {
        bail!("no row of the live phase was seen arriving");
    }
    all.sort_by(|a, b| a.total_cmp(b));
    let worst_p99 = by_tenant
        .values_mut()
        .map(|v| {
            v.sort_by(|a, b| a.total_cmp(b));
            quantile(v, 0.99)
        })
        .fold(0.0, f64::max);
    // Consumers go: PostgreSQL's subscriptions (and their slots), our slots.
    match system {
        System::PostgreSql => {
            for i in 0..n {
                dst.batch_execute(&format!("DROP SUBSCRIPTION pg_{r}_{i}"))
                    .await?;
            }
        }
        System::Shared => drop_slot(&src, &configs[0].tenant.slot).await?,
        System::SlotPerTenant => {
            for c in &configs {
                drop_slot(&src, &c.tenant.slot).await?;
            }
        }
    }
    Ok(Lag {
        p50: quantile(&all, 0.5),
        p99: quantile(&all, 0.99),
        worst_p99,
        rate,
    })
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
