//! `/health` (§4.4 of the deployment guide) and `/ready`.
//!
//! `/health` answers 200 with `"status": "healthy"` when every tenant is
//! replicating (or copying, or, on an apply node, waiting for its capture
//! node) and every check passes; otherwise 503 with `"unhealthy"`. Checks:
//! `source_database` and `target_database` (a fresh connection and
//! `SELECT 1`, 2 s at most; only the databases this node connects to) and
//! `checkpoint_storage` (a probe file written, synced and removed in
//! `[cdc] checkpoint_dir`). Results are reused for one second, so a busy
//! probe cannot load the databases. `/ready` answers 200 once every tenant
//! streams (or copies), 503 before.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{State, Telemetry};
use crate::config::{Config, Mode};
use crate::error::Side;
use crate::pg;

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub healthy: bool,
    pub latency_ms: f64,
    /// Why it failed (no secrets: connection strings are masked).
    pub error: Option<String>,
    /// The tenants it serves (said when the node has several).
    pub tenants: Vec<String>,
}

/// Builds the health and readiness answers.
pub struct Health {
    /// The node's tenants.
    configs: super::NodeTenants,
    telemetry: Arc<Telemetry>,
    cache: tokio::sync::Mutex<Option<(Instant, Vec<Check>)>>,
    cpu: Mutex<(Instant, f64)>,
}

impl Health {
    pub fn new(configs: super::NodeTenants, telemetry: Arc<Telemetry>) -> Self {
        Self {
            configs,
            telemetry,
            cache: tokio::sync::Mutex::new(None),
            cpu: Mutex::new((Instant::now(), process_cpu_seconds())),
        }
    }

    async fn checks(&self) -> Vec<Check> {
        let mut cache = self.cache.lock().await;
        if let Some((at, checks)) = cache.as_ref() {
            if at.elapsed() < Duration::from_secs(1) {
                return checks.clone();
            }
        }
        // Each database once, naming the tenants it serves when the node
        // has several.
        let mut checks: Vec<Check> = Vec::new();
        let mut seen: Vec<(&'static str, String)> = Vec::new();
        let configs = super::server::read(&self.configs);
        let several = configs.len() > 1;
        for config in &configs {
            let t = &config.tenant;
            let mode = config.transport.mode;
            let databases = [
                (
                    "source_database",
                    t.source.as_ref().filter(|_| mode != Mode::Apply),
                    Side::Source,
                ),
                (
                    "target_database",
                    t.target.as_ref().filter(|_| mode != Mode::Capture),
                    Side::Target,
                ),
            ];
            for (name, info, side) in databases {
                let Some(info) = info else { continue };
                let key = (name, info.masked());
                let at = match seen.iter().position(|k| *k == key) {
                    Some(at) => at,
                    None => {
                        seen.push(key);
                        checks.push(self.database(name, info, side, config).await);
                        checks.len() - 1
                    }
                };
                if several {
                    checks[at].tenants.push(t.tenant_id.clone());
                }
            }
        }
        let mut dirs: Vec<&std::path::Path> = Vec::new();
        for config in &configs {
            let dir = config.tenant.checkpoint_dir.as_path();
            if !dirs.contains(&dir) {
                dirs.push(dir);
                checks.push(checkpoint_storage(dir));
            }
        }
        *cache = Some((Instant::now(), checks.clone()));
        checks
    }

    async fn database(
        &self,
        name: &'static str,
        info: &crate::config::ConnInfo,
        side: Side,
        config: &Config,
    ) -> Check {
        let started = Instant::now();
        let probe = async {
            let c = pg::connect(
                info,
                &config.network,
                side,
                "heliosdb-tenant-replication health",
            )
            .await?;
            c.simple_query("SELECT 1")
                .await
                .map_err(crate::error::on_target("SELECT 1"))?;
            Ok::<_, crate::error::ReplicationError>(())
        };
        let error = match tokio::time::timeout(Duration::from_secs(2), probe).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(first_line(&e.to_string())),
            Err(_) => Some("no answer within 2 s".to_string()),
        };
        Check {
            name,
            healthy: error.is_none(),
            latency_ms: round2(started.elapsed().as_secs_f64() * 1000.0),
            error,
            tenants: Vec::new(),
        }
    }

    /// The §4.4 document and its status code (200 or 503).
    pub async fn report(&self) -> (u16, Value) {
        let checks = self.checks().await;
        let tenants = self.telemetry.tenants();
        let replication: Vec<Value> = tenants
            .iter()
            .map(|t| {
                let (lsn, time) = match t.last_checkpoint() {
                    Some((lsn, at)) => (
                        json!(lsn.0),
                        json!(at.format("%Y-%m-%dT%H:%M:%SZ").to_string()),
                    ),
                    None => (Value::Null, Value::Null),
                };
                let mut entry = json!({
                    "tenant_id": t.tenant(),
                    "state": t.state().name(),
                    "lag_seconds": round3(t.current_lag()),
                    "throughput_events_per_sec": round2(t.m.throughput.get()),
                    "last_checkpoint_lsn": lsn,
                    "last_checkpoint_time": time,
                    "total_events_processed": t.m.events_total(),
                    "total_errors": t.m.errors_total(),
                    "total_conflicts": t.m.conflicts_total(),
                });
                // A tenant sharing a slot: what its spool holds, and why
                // it is paused.
                let spooled = t.spool.bytes();
                if spooled > 0 {
                    entry["spool_bytes"] = json!(spooled);
                }
                if let Some(why) = t.spool.paused() {
                    entry["paused"] = json!(why);
                }
                entry
            })
            .collect();
        let healthy = !tenants.is_empty()
            && tenants
                .iter()
                .all(|t| t.state().is_up() && t.spool.paused().is_none())
            && checks.iter().all(|c| c.healthy);
        let body = json!({
            "status": if healthy { "healthy" } else { "unhealthy" },
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.telemetry.uptime_seconds(),
            "replication": replication.first().cloned().unwrap_or(Value::Null),
            "tenants": replication,
            "system": {
                "cpu_usage_percent": round2(self.cpu_percent()),
                "memory_usage_mb": memory_mb(),
                "disk_usage_percent": super::server::read(&self.configs)
                    .first()
                    .and_then(|c| disk_percent(&c.tenant.checkpoint_dir)).map(round2),
            },
            "checks": checks.iter().map(|c| {
                let mut v = json!({
                    "name": c.name,
                    "status": if c.healthy { "healthy" } else { "unhealthy" },
                    "latency_ms": c.latency_ms,
                });
                if let Some(e) = &c.error { v["error"] = json!(e); }
                if !c.tenants.is_empty() { v["tenants"] = json!(c.tenants); }
                v
            }).collect::<Vec<_>>(),
        });
        (if healthy { 200 } else { 503 }, body)
    }

    /// `/ready`: every tenant streams or copies (an apply node: listens).
    pub fn ready(&self) -> (u16, Value) {
        let tenants = self.telemetry.tenants();
        let ready = !tenants.is_empty()
            && tenants.iter().all(|t| {
                matches!(
                    t.state(),
                    State::Running | State::Snapshotting | State::WaitingForCapture
                )
            });
        let states: Vec<Value> = tenants
            .iter()
            .map(|t| json!({"tenant_id": t.tenant(), "state": t.state().name()}))
            .collect();
        (
            if ready { 200 } else { 503 },
            json!({"ready": ready, "tenants": states}),
        )
    }

    /// This process's CPU use since the previous call, in percent of one core.
    fn cpu_percent(&self) -> f64 {
        let mut last = self.cpu.lock().unwrap_or_else(|p| p.into_inner());
        let (now, cpu) = (Instant::now(), process_cpu_seconds());
        let wall = now.duration_since(last.0).as_secs_f64();
        let pct = if wall > 0.0 {
            (cpu - last.1) / wall * 100.0
        } else {
            0.0
        };
        *last = (now, cpu);
        pct.max(0.0)
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Write, sync and remove a probe file in the checkpoint directory.
fn checkpoint_storage(dir: &Path) -> Check {
    let started = Instant::now();
    let probe = dir.join(".heliosdb-health-probe");
    let result = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::File::create(&probe))
        .and_then(|mut f| f.write_all(b"ok").and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::remove_file(&probe));
    Check {
        name: "checkpoint_storage",
        healthy: result.is_ok(),
        latency_ms: round2(started.elapsed().as_secs_f64() * 1000.0),
        error: result
            .err()
            .map(|e| format!("{} is not writable: {e}", dir.display())),
        tenants: Vec::new(),
    }
}

/// User + system CPU seconds of this process (Linux `/proc/self/stat`,
/// clock ticks of 1/100 s).
pub fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident memory of this process in MiB.
fn memory_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

/// How full the file system of `dir` is (as `df` reports it).
fn disk_percent(dir: &Path) -> Option<f64> {
    let existing = dir.ancestors().find(|p| p.exists())?;
    let st = rustix::fs::statvfs(existing).ok()?;
    let used = st.f_blocks.saturating_sub(st.f_bfree) as f64;
    let avail = st.f_bavail as f64;
    (used + avail > 0.0).then(|| used / (used + avail) * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_storage_fails_where_nothing_can_be_written_and_passes_elsewhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = checkpoint_storage(&dir.path().join("checkpoints"));
        assert!(ok.healthy && ok.error.is_none(), "{ok:?}");
        assert!(!dir
            .path()
            .join("checkpoints/.heliosdb-health-probe")
            .exists());
        // A file where the directory should be: not writable even for root.
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").expect("write");
        let bad = checkpoint_storage(&file.join("checkpoints"));
        assert!(!bad.healthy);
        assert!(
            bad.error
                .as_deref()
                .is_some_and(|e| e.contains("not writable")),
            "{bad:?}"
        );
    }
}
