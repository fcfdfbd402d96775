//! What several benchmarks share: the daemon's nodes in this process,
//! their configurations, and CPU accounting from `/proc`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use heliosdb_tenant_replication::config::Config;
use heliosdb_tenant_replication::pipeline::{spawn_tenant, Pipeline};
use heliosdb_tenant_replication::telemetry::Telemetry;
use pgcluster::{pki, Cluster};
use tokio::sync::watch;

use crate::TENANT;

/// Source and target clusters (durable settings) with database `bench`,
/// the reference schema on both and the workload generators on the source
/// (from `dir`, normally `../shared/bench`).
pub async fn clusters(dir: &Path) -> Result<(Cluster, Cluster)> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .with_context(|| format!("reading {} (set --workload-dir)", dir.join(name).display()))
    };
    let (schema, workload) = (read("schema.sql")?, read("workload.sql")?);
    let source = Cluster::start_with(crate::options())?;
    let target = Cluster::start_with(crate::options())?;
    for c in [&source, &target] {
        c.create_database("bench").await?;
        c.connect("bench").await?.batch_execute(&schema).await?;
    }
    source
        .connect("bench")
        .await?
        .batch_execute(&workload)
        .await?;
    Ok((source, target))
}

/// A configuration for the benchmark tenant; `extra` is appended.
pub fn config_text(
    source: &Cluster,
    target: &Cluster,
    dir: &Path,
    slot: &str,
    publication: &str,
    extra: &str,
) -> String {
    format!(
        "[replication]\ntenant_id = \"{TENANT}\"\nsource_connection = \"{}\"\ntarget_connection = \"{}\"\n\
         [cdc]\nreplication_slot = \"{slot}\"\npublication_name = \"{publication}\"\ncheckpoint_dir = \"{}\"\nstart_lsn = 1\n\
         [performance]\nworker_threads = 2\n[features]\nenable_monitoring = false\n{extra}",
        source.superuser_url("bench"),
        target.superuser_url("bench"),
        // One checkpoint directory per slot: runs use a new slot each.
        dir.join("checkpoints").join(slot).display()
    )
}

/// `init` for `slot` (the tenant's row-filtered publication and the slot,
/// no copy: the configs start at the slot's position).
pub async fn init_slot(source: &Cluster, target: &Cluster, dir: &Path, slot: &str) -> Result<()> {
    let text = config_text(source, target, dir, slot, crate::drain::PUBLICATION, "");
    let config = Config::from_toml(&text, "bench.toml", |_| None)?;
    heliosdb_tenant_replication::provision::init(&config, false, false)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

pub fn write_key(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("tenant.key");
    let hex: String = (0..32)
        .map(|i| format!("{:02x}", (i * 37 + 11) % 256))
        .collect();
    std::fs::write(&path, hex)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// Wait until `slot` is (or is no longer) in use by a walsender.
pub async fn wait_slot(src: &tokio_postgres::Client, slot: &str, active: bool) -> Result<()> {
    let started = std::time::Instant::now();
    loop {
        let now: Option<bool> = src
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .map(|r| r.get(0));
        if now == Some(active) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            anyhow::bail!(
                "slot {slot} did not become {}",
                if active { "active" } else { "inactive" }
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Drop `slot` once its walsender has let go of it (a consumer that just
/// stopped may hold it for a moment).
pub async fn drop_slot(src: &tokio_postgres::Client, slot: &str) -> Result<()> {
    wait_slot(src, slot, false).await?;
    src.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await?;
    Ok(())
}

/// CPU seconds this process has used (user + system).
pub fn process_cpu() -> f64 {
    heliosdb_tenant_replication::telemetry::health::process_cpu_seconds()
}

/// CPU seconds of a cluster: the postmaster, its live children, and the
/// children that exited (counted into the postmaster's cutime/cstime).
pub fn cluster_cpu(cluster: &Cluster) -> f64 {
    cluster_cpu_split(cluster).0
}

/// A cluster's CPU seconds as [`cluster_cpu`], and the part of it its live
/// walsenders used.
pub fn cluster_cpu_split(cluster: &Cluster) -> (f64, f64) {
    let pid = std::fs::read_to_string(cluster.data_dir().join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
    let Some(pid) = pid else {
        return (0.0, 0.0);
    };
    let fields = |p: &str| -> Vec<String> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        stat.rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let num = |f: &[String], i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let own = fields(&pid.to_string());
    // After ")": state=0 ppid=1 … utime=11 stime=12 cutime=13 cstime=14.
    let mut ticks = num(&own, 11) + num(&own, 12) + num(&own, 13) + num(&own, 14);
    let mut walsenders = 0.0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let f = fields(&name);
            if f.get(1).map(String::as_str) == Some(pid.to_string().as_str()) {
                let t = num(&f, 11) + num(&f, 12);
                ticks += t;
                let cmdline = std::fs::read(format!("/proc/{name}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains("walsender") {
                    walsenders += t;
                }
            }
        }
    }
    (ticks / 100.0, walsenders / 100.0)
}

/// A capture node and an apply node (TLS on loopback, zstd-3, AES-256-GCM)
/// running in this process.
pub struct Split {
    stop: watch::Sender<bool>,
    tasks: Vec<Pipeline>,
    pub apply: Arc<Telemetry>,
}

impl Split {
    pub async fn start(
        source: &Cluster,
        target: &Cluster,
        dir: &Path,
        slot: &str,
        publication: &str,
    ) -> Result<Split> {
        let (ca, node) = certs(dir)?;
        let key = write_key(&dir.join("keys"))?;
        let port = pgcluster::free_port()?;
        let transport = |mode: &str, line: &str| {
            format!(
                "[encryption]\nkey_file = \"{}\"\n[transport]\nmode = \"{mode}\"\n{line}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                key.display(),
                ca.cert.display(),
                node.cert.display(),
                node.key.display()
            )
        };
        let config = |mode: &str, line: String| {
            Config::from_toml(
                &config_text(
                    source,
                    target,
                    dir,
                    slot,
                    publication,
                    &transport(mode, &line),
                ),
                &format!("{mode}.toml"),
                |_| None,
            )
        };
        let apply = config("apply", format!("listen_address = \"127.0.0.1:{port}\""))?;
        let capture = config(
            "capture",
            format!("apply_url = \"https://127.0.0.1:{port}\""),
        )?;
        let (stop, stop_rx) = watch::channel(false);
        let apply_tel = Telemetry::disabled();
        let mut tasks = vec![spawn_tenant(
            Arc::new(apply),
            None,
            stop_rx.clone(),
            apply_tel.clone(),
        )?];
        wait_listening(&apply_tel).await?;
        tasks.push(spawn_tenant(
            Arc::new(capture),
            None,
            stop_rx,
            Telemetry::disabled(),
        )?);
        Ok(Split {
            stop,
            tasks,
            apply: apply_tel,
        })
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
    }
}

/// Wait until the apply node listens (its tenant waits for a capture node).
async fn wait_listening(apply: &Telemetry) -> Result<()> {
    use heliosdb_tenant_replication::telemetry::State;
    let started = std::time::Instant::now();
    while !apply
        .tenants()
        .iter()
        .any(|t| t.state() == State::WaitingForCapture)
    {
        if started.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("the apply node did not start listening within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// A CA and a node certificate in `dir` (made once, reused).
fn certs(dir: &Path) -> Result<(pki::Pair, pki::Pair)> {
    let pair = |name: &str| pki::Pair {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    let (ca, node) = (pair("ca"), pair("node"));
    if !node.cert.exists() {
        let ca = pki::try_ca(dir, "ca").map_err(anyhow::Error::msg)?;
        pki::try_leaf(dir, &ca, "node", &["DNS:localhost", "IP:127.0.0.1"])
            .map_err(anyhow::Error::msg)?;
    }
    Ok((ca, node))
}
