//! `cargo run --release -p bench -- big-txn`: scenario 3 of issue 3 — one
//! transaction of the reference workload (`CALL bench_run(rows, 100,
//! false)`: 1.25 × rows changes, a tenth of them `tenant-1`'s) made while
//! the consumer runs; measured from the moment its COMMIT returns on the
//! source until the target holds the tenant's rows (the first 10 ms poll
//! that finds the transaction's last row, confirmed by comparing the rows). PostgreSQL's
//! subscription with `streaming = on` receives the transaction while it is
//! still running (spooled to a file, applied at the commit); `off` receives
//! it only after the commit; this daemon (pgoutput proto_version 2,
//! streaming) applies it while it runs, into a target transaction of its
//! own, and commits that at the source's commit. One consumer at a time, a
//! fresh slot each.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;

use crate::drain::{marker_sql, reset_target, wait_visible, PUBLICATION};
use crate::nodes::{drop_slot, wait_slot, Split};
use crate::{cores, median, TABLES, TENANT};

pub async fn run(
    rows: i64,
    runs: usize,
    decoding_work_mem: Option<&str>,
    dir: &Path,
    out: &Path,
) -> Result<()> {
    let (source, target) = crate::nodes::clusters(dir).await?;
    let (src, dst) = (
        source.connect("bench").await?,
        target.connect("bench").await?,
    );
    if let Some(mem) = decoding_work_mem {
        src.simple_query(&format!(
            "ALTER SYSTEM SET logical_decoding_work_mem = '{}'",
            mem.replace('\'', "")
        ))
        .await?;
        src.simple_query("SELECT pg_reload_conf()").await?;
    }
    let work = tempfile::tempdir()?;
    let labels = [
        "PostgreSQL subscription (streaming = off)",
        "PostgreSQL subscription (streaming = on)",
        "heliosdb capture → apply (zstd, AES-256-GCM, TLS)",
    ];
    // The row-filtered publication every consumer reads (made by `init`).
    crate::nodes::init_slot(&source, &target, work.path(), "big_setup").await?;
    src.execute("SELECT pg_drop_replication_slot('big_setup')", &[])
        .await?;
    // No autovacuum racing the TRUNCATE and ANALYZE between runs.
    for table in TABLES {
        src.batch_execute(&format!(
            "ALTER TABLE {table} SET (autovacuum_enabled = off)"
        ))
        .await?;
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); labels.len()];
    let changes = rows + rows / 5 + rows / 20;
    for r in 0..runs {
        for k in 0..labels.len() {
            let i = (k + r) % labels.len();
            // Statistics of the emptied tables, taken now: an autovacuum of
            // the previous run's rows finishing after the TRUNCATE leaves
            // "pages, no rows", and the generator's updates are then
            // planned as if the tables stayed empty (a scan of the whole
            // table per statement: minutes instead of seconds).
            src.batch_execute(
                "TRUNCATE accounts, orders, events; ANALYZE accounts, orders, events",
            )
            .await?;
            reset_target(&dst).await?;
            let slot = format!("big_{i}_{r}");
            let mut nodes = None;
            if i < 2 {
                dst.batch_execute(&format!(
                    "CREATE SUBSCRIPTION {slot} CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=bench'
                       PUBLICATION {PUBLICATION} WITH (copy_data = false, streaming = {}, slot_name = '{slot}')",
                    source.port(),
                    if i == 1 { "on" } else { "off" }
                ))
                .await?;
            } else {
                crate::nodes::init_slot(&source, &target, work.path(), &slot).await?;
                dst.batch_execute("DROP SCHEMA IF EXISTS heliosdb_replication CASCADE")
                    .await?;
                nodes =
                    Some(Split::start(&source, &target, work.path(), &slot, PUBLICATION).await?);
            }
            wait_slot(&src, &slot, true).await?;
            src.batch_execute(&format!(
                "BEGIN; CALL bench_run({rows}, 100, false); {}; COMMIT",
                marker_sql()
            ))
            .await?;
            let committed = Instant::now();
            let secs = wait_visible(&src, &dst, committed).await?;
            eprintln!(
                "  run {}: {:<52} visible {secs:>7.2} s after COMMIT",
                r + 1,
                labels[i]
            );
            times[i].push(secs);
            match nodes {
                Some(n) => {
                    n.stop().await;
                    drop_slot(&src, &slot).await?;
                }
                None => {
                    dst.batch_execute(&format!("DROP SUBSCRIPTION {slot}"))
                        .await?
                }
            }
        }
    }
    let best_native = median(&mut times[0].clone()).min(median(&mut times[1].clone()));
    println!(
        "\none transaction of {changes} changes ({} of {TENANT}): commit to visible on the target, median of {runs} runs, {} cores",
        changes / 10,
        cores()
    );
    for (i, l) in labels.iter().enumerate() {
        let m = median(&mut times[i].clone());
        println!("  {l:<56} {m:>8.2} s  {:>6.2}x", best_native / m);
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(
        out,
        serde_json::to_string_pretty(&serde_json::json!({
            "benchmark": "big-transaction", "rows": rows, "changes": changes, "runs": runs, "cores": cores(),
            "logical_decoding_work_mem": decoding_work_mem.unwrap_or("server default (64MB)"),
            "native_streaming_off_seconds": times[0], "native_streaming_on_seconds": times[1],
            "ours_seconds": times[2], "ratio_ours_to_best_native": best_native / median(&mut times[2].clone()),
        }))?,
    )?;
    eprintln!("raw numbers: {}", out.display());
    Ok(())
}
