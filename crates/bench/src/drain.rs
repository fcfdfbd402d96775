//! `cargo run --release -p bench -- drain`: scenario 2 of issue 3 — a slot
//! backlog of the reference workload drained by PostgreSQL's own logical
//! replication and by this daemon, in the same run, on the same clusters.
//!
//! * The backlog: `CALL bench_run(rows, 100, true)` (inserts, then updates
//!   and deletes, 100-row transactions; `tenant-1` holds a tenth) made while
//!   every consumer's slot already exists and nothing consumes it.
//! * PostgreSQL: a subscription on the target to the same row-filtered
//!   publication, `streaming = off` and `on` (the better one is the baseline),
//!   enabled once the backlog is there.
//! * This daemon: a capture node and an apply node in this process, TLS on
//!   loopback, zstd-3 and AES-256-GCM.
//! * References: the capture ceiling (`pg_recvlogical` decoding the same
//!   backlog to /dev/null over the replication protocol) and the apply
//!   ceiling (a `COPY … TO STDOUT | COPY … FROM STDIN` pipe of the tenant's
//!   final rows).
//!
//! A drain ends when the row written after the backlog (the marker) is on
//! the target, polled by its key every 10 ms; the tenant's rows are then
//! compared with the source's (md5 of the rows in key order). Each system
//! drains its own slot; runs alternate the order of the systems. Besides
//! the times it prints each system's CPU until the marker: the source and
//! target clusters' (every process of each, background work included) and
//! this process's (the daemon's two nodes).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio_postgres::Client;

use crate::nodes::{cluster_cpu, drop_slot, process_cpu, Split};
use crate::{cores, median, TABLES, TENANT};

pub(crate) const PUBLICATION: &str = "tenant_1_pub";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    NativeStreamingOff,
    NativeStreamingOn,
    Ours,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            Self::NativeStreamingOff => "PostgreSQL subscription (streaming = off)",
            Self::NativeStreamingOn => "PostgreSQL subscription (streaming = on)",
            Self::Ours => "heliosdb capture → apply (zstd, AES-256-GCM, TLS)",
        }
    }
}

pub(crate) async fn tenant_state(c: &Client) -> Result<Vec<(i64, String)>> {
    let mut out = Vec::new();
    for t in TABLES {
        out.push(heliosdb_tenant_replication::load::tenant_digest(c, t, TENANT).await?);
    }
    Ok(out)
}

/// The statements that write the marker: the row every workload writes
/// last (after the backlog; the big transaction's last statement), so a
/// system has applied the workload once the marker is on the target (every
/// system here applies transactions in commit order).
pub(crate) fn marker_sql() -> String {
    format!(
        "DELETE FROM events WHERE tenant_id = '{TENANT}' AND id = {MARKER_ID}; \
         INSERT INTO events VALUES ('{TENANT}', {MARKER_ID}, 'bench-marker', 'the workload ends here', now())"
    )
}

const MARKER_ID: i64 = -1;

/// Poll the target for the marker every 10 ms (a primary-key lookup: the
/// harness used to poll `count(*)` of the tenant's rows, which kept up to a
/// third of a core busy beside the system being measured); the time of the
/// poll that found it.
async fn marker_seen(dst: &Client, started: Instant) -> Result<f64> {
    let lookup = format!("SELECT 1 FROM events WHERE tenant_id = '{TENANT}' AND id = {MARKER_ID}");
    loop {
        if dst.query_opt(&lookup, &[]).await?.is_some() {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("the workload's last row is not on the target after 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// After the marker: the tenant's rows on the target equal `expected` (md5
/// of the rows in key order).
async fn confirm(dst: &Client, expected: &[(i64, String)]) -> Result<()> {
    let confirm_by = Instant::now() + Duration::from_secs(60);
    while tenant_state(dst).await? != expected {
        if Instant::now() > confirm_by {
            bail!("the workload's last row is on the target, and the tenant's rows still differ from the source's a minute later");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// For one transaction (ending with the marker, all of it visible at one
/// target commit): the time until the marker is on the target, confirmed by
/// the rows against the source's.
pub(crate) async fn wait_visible(src: &Client, dst: &Client, started: Instant) -> Result<f64> {
    let at = marker_seen(dst, started).await?;
    confirm(dst, &tenant_state(src).await?).await?;
    Ok(at)
}

pub(crate) async fn reset_target(dst: &Client) -> Result<()> {
    dst.batch_execute(
        "TRUNCATE accounts, orders, events; DROP SCHEMA IF EXISTS heliosdb_replication CASCADE; CHECKPOINT;",
    )
    .await?;
    Ok(())
}

/// Which backlog a drain replays.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Backlog {
    /// Scenario 2: the reference workload (~500-byte rows, a tenth of them
    /// the replicated tenant's).
    Reference,
    /// Scenario 1: ~2 KB text/jsonb rows, nine in ten the replicated
    /// tenant's (inserts, then updates of 20% and deletes of 5%, 100-row
    /// transactions).
    Wide,
}

/// The wide-row generator (scenario 1), created on the source.
const WIDE_SQL: &str = "
CREATE OR REPLACE PROCEDURE wide_run(n bigint) LANGUAGE plpgsql AS $$
DECLARE lo bigint := 1;
BEGIN
  WHILE lo <= n LOOP
    INSERT INTO events
      SELECT CASE WHEN g % 10 = 0 THEN 'tenant-2' ELSE 'tenant-1' END, g, 'wide-' || (g % 7),
             (SELECT string_agg(md5((g * 64 + i)::text), ' ') FROM generate_series(1, 60) i),
             now()
        FROM generate_series(lo, least(lo + 99, n)) g WHERE g % 2 = 0;
    INSERT INTO orders
      SELECT CASE WHEN g % 10 = 1 THEN 'tenant-2' ELSE 'tenant-1' END, g, g % 1000, 'new', g % 997,
             (SELECT jsonb_object_agg('k' || i, md5((g * 32 + i)::text)) FROM generate_series(1, 40) i),
             now()
        FROM generate_series(lo, least(lo + 99, n)) g WHERE g % 2 = 1;
    COMMIT;
    lo := lo + 100;
  END LOOP;
  lo := 1;
  WHILE lo <= n LOOP
    UPDATE events SET body = upper(body) WHERE id BETWEEN lo AND lo + 499 AND id % 10 = 2;
    UPDATE orders SET status = 'paid', payload = payload || jsonb_build_object('paid', true) WHERE id BETWEEN lo AND lo + 499 AND id % 10 = 3;
    COMMIT;
    lo := lo + 500;
  END LOOP;
  lo := 1;
  WHILE lo <= n LOOP
    DELETE FROM events WHERE id BETWEEN lo AND lo + 1999 AND id % 20 = 4;
    DELETE FROM orders WHERE id BETWEEN lo AND lo + 1999 AND id % 20 = 5;
    COMMIT;
    lo := lo + 2000;
  END LOOP;
END $$;";

pub async fn run(backlog: Backlog, rows: i64, runs: usize, dir: &Path, out: &Path) -> Result<()> {
    let (source, target) = crate::nodes::clusters(dir).await?;
    let (src, dst) = (
        source.connect("bench").await?,
        target.connect("bench").await?,
    );
    let work = tempfile::tempdir()?;

    // Every consumer's slot exists before the backlog is made.
    for r in 0..runs {
        crate::nodes::init_slot(&source, &target, work.path(), &format!("ours_{r}")).await?;
        src.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&format!("ceiling_{r}")],
        )
        .await?;
        for (mode, name) in [("off", "native_off"), ("on", "native_on")] {
            dst.batch_execute(&format!(
                "CREATE SUBSCRIPTION {name}_{r} CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=bench'
                   PUBLICATION {PUBLICATION} WITH (copy_data = false, enabled = false, streaming = {mode}, slot_name = '{name}_{r}')",
                source.port()
            ))
            .await?;
        }
    }
    reset_target(&dst).await?;

    let call = match backlog {
        Backlog::Reference => format!("CALL bench_run({rows}, 100, true)"),
        Backlog::Wide => {
            src.batch_execute(WIDE_SQL).await?;
            format!("CALL wide_run({rows})")
        }
    };
    eprintln!("making the backlog: {call} …");
    let t = Instant::now();
    src.batch_execute(&call).await?;
    src.batch_execute(&marker_sql()).await?;
    let end: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let expected = tenant_state(&src).await?;
    let changes = rows + rows / 5 + rows / 20;
    let tenant_changes = match backlog {
        Backlog::Reference => changes / 10,
        Backlog::Wide => changes * 9 / 10,
    };
    eprintln!(
        "  {changes} changes ({tenant_changes} of {TENANT}) in {:.1} s; WAL up to {end}",
        t.elapsed().as_secs_f64()
    );

    let systems = [
        System::NativeStreamingOff,
        System::NativeStreamingOn,
        System::Ours,
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    let mut our_cpu = Vec::new();
    let mut our_peak_mb = Vec::new();
    let mut pgoutput_per_change = Vec::new();
    let mut wire_per_event = Vec::new();
    let mut capture_ceiling = Vec::new();
    let mut apply_ceiling = Vec::new();
    // CPU seconds of each cluster (every process: walsender, target
    // backend or apply worker, background work) from the start of a drain
    // to the marker, per system.
    let mut source_cpu: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    let mut target_cpu: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    for r in 0..runs {
        for k in 0..systems.len() {
            let i = (k + r) % systems.len();
            let system = systems[i];
            reset_target(&dst).await?;
            let clusters0 = (cluster_cpu(&source), cluster_cpu(&target));
            let clusters = || {
                (
                    cluster_cpu(&source) - clusters0.0,
                    cluster_cpu(&target) - clusters0.1,
                )
            };
            let started = Instant::now();
            let (secs, cpu) = match system {
                System::Ours => {
                    let cpu0 = process_cpu();
                    crate::reset_peak_rss();
                    let nodes = Split::start(
                        &source,
                        &target,
                        work.path(),
                        &format!("ours_{r}"),
                        PUBLICATION,
                    )
                    .await?;
                    let secs = marker_seen(&dst, started).await?;
                    our_cpu.push(process_cpu() - cpu0);
                    let cpu = clusters();
                    confirm(&dst, &expected).await?;
                    our_peak_mb.push(crate::peak_rss_mb());
                    let t = nodes.apply.tenants();
                    if let Some(t) = t.first() {
                        wire_per_event.push(
                            t.m.bytes_replicated.get() as f64 / t.m.events_total().max(1) as f64,
                        );
                        eprintln!(
                            "    apply node: {:.2} s in {} target transactions",
                            t.m.batch_seconds.get_sample_sum(),
                            t.m.batch_seconds.get_sample_count()
                        );
                    }
                    nodes.stop().await;
                    drop_slot(&src, &format!("ours_{r}")).await?;
                    (secs, cpu)
                }
                native => {
                    let name = if native == System::NativeStreamingOff {
                        "native_off"
                    } else {
                        "native_on"
                    };
                    dst.batch_execute(&format!("ALTER SUBSCRIPTION {name}_{r} ENABLE"))
                        .await?;
                    let secs = marker_seen(&dst, started).await?;
                    let cpu = clusters();
                    confirm(&dst, &expected).await?;
                    dst.batch_execute(&format!("DROP SUBSCRIPTION {name}_{r}"))
                        .await?;
                    (secs, cpu)
                }
            };
            eprintln!(
                "  run {}: {:<52} {secs:>7.2} s  {:>8.0} changes/s",
                r + 1,
                system.label(),
                tenant_changes as f64 / secs
            );
            times[i].push(secs);
            source_cpu[i].push(cpu.0);
            target_cpu[i].push(cpu.1);
        }
        // Capture ceiling: the same backlog decoded and written to a file
        // (its size: pgoutput's bytes for the tenant's changes).
        let decoded = work.path().join("pgoutput.bin");
        let t = Instant::now();
        let status = Command::new(source.bindir().join("pg_recvlogical"))
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "bench", "-p"])
            .arg(source.port().to_string())
            .args([
                "--slot",
                &format!("ceiling_{r}"),
                "--start",
                "-o",
                "proto_version=1",
            ])
            .args([
                "-o",
                &format!("publication_names={PUBLICATION}"),
                "-E",
                &end,
                "--no-loop",
                "-f",
            ])
            .arg(&decoded)
            .status()?;
        if !status.success() {
            bail!("pg_recvlogical failed");
        }
        capture_ceiling.push(t.elapsed().as_secs_f64());
        let bytes = std::fs::metadata(&decoded).map(|m| m.len()).unwrap_or(0);
        pgoutput_per_change.push(bytes as f64 / tenant_changes as f64);
        let _ = std::fs::remove_file(&decoded);
        src.execute(
            "SELECT pg_drop_replication_slot($1)",
            &[&format!("ceiling_{r}")],
        )
        .await?;
        // Apply ceiling: the tenant's final rows through a COPY pipe.
        reset_target(&dst).await?;
        let t = Instant::now();
        for table in TABLES {
            crate::initial_sync::copy_pipe(&source, &target, table)?;
        }
        apply_ceiling.push(t.elapsed().as_secs_f64());
    }

    let best_native = median(&mut times[0].clone()).min(median(&mut times[1].clone()));
    let rate = |secs: f64| tenant_changes as f64 / secs;
    println!(
        "\nbacklog drain, {}: {tenant_changes} changes of {TENANT} in {changes} (100-row transactions), median of {runs} runs, {} cores",
        if backlog == Backlog::Wide { "~2 KB rows (scenario 1)" } else { "reference workload (scenario 2)" },
        cores()
    );
    println!(
        "  {:<56} {:>9} {:>12} {:>8}",
        "", "seconds", "changes/s", "ratio"
    );
    for (i, s) in systems.iter().enumerate() {
        let m = median(&mut times[i].clone());
        println!(
            "  {:<56} {m:>9.2} {:>12.0} {:>7.2}x",
            s.label(),
            rate(m),
            best_native / m
        );
    }
    let cc = median(&mut capture_ceiling.clone());
    println!(
        "  {:<56} {cc:>9.2} {:>12.0} {:>7.2}x",
        "capture ceiling (pg_recvlogical → file)",
        rate(cc),
        best_native / cc
    );
    let ac = median(&mut apply_ceiling.clone());
    let final_rows: i64 = expected.iter().map(|e| e.0).sum();
    println!(
        "  {:<56} {ac:>9.2} {:>12.0} {:>8}",
        "apply ceiling (COPY pipe of the final rows)",
        final_rows as f64 / ac,
        "rows/s"
    );
    let ours = median(&mut times[2].clone());
    println!(
        "  ours vs capture ceiling: {:.2}; daemon CPU {:.2} s per drain; peak memory {:.0} MB; {:.1} bytes on the wire per change (pgoutput: {:.1})",
        cc / ours,
        median(&mut our_cpu.clone()),
        median(&mut our_peak_mb.clone()),
        median(&mut wire_per_event.clone()),
        median(&mut pgoutput_per_change.clone())
    );
    println!(
        "  CPU seconds per drain, until the marker:                 {:>8} {:>8} {:>8} {:>8}",
        "source", "target", "daemon", "total"
    );
    for (i, s) in systems.iter().enumerate() {
        let (sc, tc) = (
            median(&mut source_cpu[i].clone()),
            median(&mut target_cpu[i].clone()),
        );
        let daemon = if *s == System::Ours {
            median(&mut our_cpu.clone())
        } else {
            0.0
        };
        println!(
            "  {:<56} {sc:>8.2} {tc:>8.2} {:>8} {:>8.2}",
            s.label(),
            if *s == System::Ours {
                format!("{daemon:.2}")
            } else {
                String::new()
            },
            sc + tc + daemon
        );
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(
        out,
        serde_json::to_string_pretty(&serde_json::json!({
            "benchmark": if backlog == Backlog::Wide { "drain-wide" } else { "drain-reference" }, "rows": rows, "changes": changes, "tenant_changes": tenant_changes,
            "runs": runs, "cores": cores(),
            "native_streaming_off_seconds": times[0], "native_streaming_on_seconds": times[1],
            "ours_seconds": times[2], "capture_ceiling_seconds": capture_ceiling,
            "apply_ceiling_seconds": apply_ceiling, "apply_ceiling_rows": final_rows,
            "ours_cpu_seconds": our_cpu, "ours_wire_bytes_per_change": wire_per_event,
            "ours_peak_rss_mb": our_peak_mb, "pgoutput_bytes_per_change": pgoutput_per_change,
            "ratio_ours_to_best_native": best_native / ours,
            "source_cluster_cpu_seconds": {
                "native_streaming_off": source_cpu[0], "native_streaming_on": source_cpu[1], "ours": source_cpu[2],
            },
            "target_cluster_cpu_seconds": {
                "native_streaming_off": target_cpu[0], "native_streaming_on": target_cpu[1], "ours": target_cpu[2],
            },
        }))?,
    )?;
    eprintln!("raw numbers: {}", out.display());
    Ok(())
}
