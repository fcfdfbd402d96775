//! `cargo run --release -p bench -- seal`: what sealing costs and saves on
//! the reference workload.
//!
//! 1. The reference workload (`CALL bench_run(rows, 100, true)`) runs on a
//!    source with the tenant provisioned; the tenant's changes are read from
//!    the slot exactly as the capture node reads them.
//! 2. They are encoded into batch bodies (1000 events, and 10 events for the
//!    small batches of a quiet tenant) and sealed + opened with every
//!    algorithm, and with zstd-3 plus a dictionary trained on other batches:
//!    bytes on the wire per event, compression ratio, seal+open time.
//! 3. The same backlog is replicated by a capture node and an apply node
//!    (in this process, TLS on loopback): the daemon's CPU per event, so
//!    seal+open can be put in proportion.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use heliosdb_tenant_replication::capture::assemble::Assembler;
use heliosdb_tenant_replication::capture::stream::{PgwireSource, StreamSpec};
use heliosdb_tenant_replication::capture::{ChangeSource, TxEvent};
use heliosdb_tenant_replication::config::Config;
use heliosdb_tenant_replication::lsn::Lsn;
use heliosdb_tenant_replication::seal::{self, Algorithm, BatchInfo, Compression, FileKeys};
use heliosdb_tenant_replication::transport::codec::Encoder;
use pgcluster::Cluster;

use crate::nodes::{cluster_cpu, config_text, process_cpu, write_key, Split};
use crate::{cores, median, TENANT};

struct Case {
    label: String,
    compression: Compression,
    small: bool,
}

pub async fn run(rows: i64, runs: usize, dir: &Path, out: &Path) -> Result<()> {
    let (source, target) = crate::nodes::clusters(dir).await?;
    let src = source.connect("bench").await?;

    let work = tempfile::tempdir()?;
    let local = Config::from_toml(
        &config_text(&source, &target, work.path(), "bench_slot", "bench_pub", ""),
        "bench.toml",
        |_| None,
    )?;
    heliosdb_tenant_replication::provision::init(&local, false, false)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!("running the reference workload ({rows} rows, 100-row transactions) …");
    src.batch_execute(&format!("CALL bench_run({rows}, 100, true)"))
        .await?;
    let end: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let end: Lsn = end.parse().map_err(|e| anyhow::anyhow!("{e}"))?;

    let events = read_slot(&local, end).await?;
    let row_events = events
        .iter()
        .filter(|e| matches!(e, TxEvent::Row(_) | TxEvent::Truncate { .. }))
        .count();
    eprintln!("  {row_events} changes of {TENANT} read from the slot");

    let large = bodies(&events, 1000);
    let small = bodies(&events, 10);
    // Dictionary: trained on the first half of the small batches, measured on the second.
    let (train, held_out) = small.split_at(small.len() / 2);
    let training: Vec<&[u8]> = train.iter().map(|(b, _)| b.as_ref()).collect();
    let dictionary = Arc::new(seal::Dictionary::new(
        &zstd::dict::from_samples(&training, 112_640)?,
        3,
    ));

    let key_dir = work.path().join("keys");
    let key_path = write_key(&key_dir)?;
    let keys = FileKeys::load(TENANT, &key_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let plain = |algorithm, level| Compression {
        algorithm,
        level,
        min_size_bytes: 0,
        dictionary: None,
    };
    let mut cases = Vec::new();
    for small in [false, true] {
        for (label, c) in [
            ("none", plain(Algorithm::None, 0)),
            ("lz4", plain(Algorithm::Lz4, 0)),
            ("snappy", plain(Algorithm::Snappy, 0)),
            ("gzip-6", plain(Algorithm::Gzip, 6)),
            ("zstd-1", plain(Algorithm::Zstd, 1)),
            ("zstd-3", plain(Algorithm::Zstd, 3)),
            ("zstd-9", plain(Algorithm::Zstd, 9)),
            ("zstd-19", plain(Algorithm::Zstd, 19)),
            (
                "zstd-3 + dictionary",
                Compression {
                    dictionary: Some(dictionary.clone()),
                    ..plain(Algorithm::Zstd, 3)
                },
            ),
        ] {
            cases.push(Case {
                label: label.to_string(),
                compression: c,
                small,
            });
        }
    }

    let mut results = Vec::new();
    println!(
        "sealing {row_events} changes of {TENANT} (reference workload), median of {runs} runs, {} cores",
        cores()
    );
    println!(
        "  {:<22} {:>7} {:>14} {:>8} {:>18}",
        "algorithm", "batch", "wire B/event", "ratio", "seal+open µs/event"
    );
    for case in &cases {
        // The dictionary is measured on batches it was not trained on.
        let set: &[(Bytes, u32)] = if case.small { held_out } else { &large };
        let events_in_set: u64 = set.iter().map(|(_, n)| *n as u64).sum();
        let mut times = Vec::new();
        let (mut wire, mut plain_bytes) = (0u64, 0u64);
        for _ in 0..runs {
            let t = Instant::now();
            wire = 0;
            plain_bytes = 0;
            for (seq, (body, n)) in set.iter().enumerate() {
                let info = BatchInfo {
                    tenant: TENANT,
                    sequence: seq as u64 + 1,
                    first_lsn: Lsn::ZERO,
                    last_lsn: Lsn::ZERO,
                    events: *n,
                };
                let sealed = seal::seal(&info, body, &case.compression, &keys)?;
                let (_, back) = seal::open_with(
                    &sealed.bytes,
                    TENANT,
                    None,
                    &keys,
                    case.compression.dictionary.as_deref(),
                )?;
                if back.len() != body.len() {
                    bail!("{}: round trip changed the body", case.label);
                }
                wire += sealed.bytes.len() as u64;
                plain_bytes += body.len() as u64;
            }
            times.push(t.elapsed().as_secs_f64());
        }
        let secs = median(&mut times);
        let per_event_us = secs * 1e6 / events_in_set as f64;
        let ratio = plain_bytes as f64 / wire as f64;
        let batch = if case.small { 10 } else { 1000 };
        println!(
            "  {:<22} {:>7} {:>14.1} {:>7.2}x {:>18.2}",
            case.label,
            batch,
            wire as f64 / events_in_set as f64,
            ratio,
            per_event_us
        );
        results.push(serde_json::json!({
            "algorithm": case.label, "batch_events": batch, "events": events_in_set,
            "plain_bytes": plain_bytes, "wire_bytes": wire, "ratio": ratio,
            "seal_open_seconds": times, "seal_open_us_per_event": per_event_us,
        }));
    }

    eprintln!("replicating the same backlog through a capture and an apply node (zstd-3) …");
    let (daemon_us, servers_us) =
        split_cpu_per_event(&source, &target, work.path(), end, row_events).await?;
    let zstd3 = results
        .iter()
        .find(|r| r["algorithm"] == "zstd-3" && r["batch_events"] == 1000)
        .and_then(|r| r["seal_open_us_per_event"].as_f64())
        .unwrap_or(0.0);
    println!(
        "  capture + apply nodes: {daemon_us:.2} µs CPU/event; seal+open (zstd-3, 1000-event batches) is {:.1}% of it",
        100.0 * zstd3 / daemon_us
    );
    println!(
        "  end to end (daemon + both PostgreSQL servers: decoding, apply): {:.2} µs CPU/event; seal+open is {:.1}% of it",
        daemon_us + servers_us,
        100.0 * zstd3 / (daemon_us + servers_us)
    );
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(
        out,
        serde_json::to_string_pretty(&serde_json::json!({
            "benchmark": "seal", "generated_rows": rows, "tenant_changes": row_events,
            "runs": runs, "cores": cores(), "cases": results,
            "pipeline_cpu_us_per_event": daemon_us,
            "postgres_cpu_us_per_event": servers_us,
            "seal_open_share_of_daemon_zstd3": zstd3 / daemon_us,
            "seal_open_share_end_to_end_zstd3": zstd3 / (daemon_us + servers_us),
        }))?,
    )?;
    eprintln!("raw numbers: {}", out.display());
    Ok(())
}

/// The tenant's transaction events from the slot up to `end`, without
/// acknowledging anything (the slot keeps the backlog).
async fn read_slot(config: &Config, end: Lsn) -> Result<Vec<TxEvent>> {
    let t = &config.tenant;
    let spec = StreamSpec {
        slot: t.slot.clone(),
        publication: t.publication.clone(),
        start_lsn: Lsn::ZERO,
        ack_lsn: Lsn::ZERO,
        buffer_events: 10_000,
        application_name: "bench read".into(),
    };
    let conn = t.source().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut stream = PgwireSource::start(conn, &spec)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut assembler = Assembler::new(Lsn::ZERO, &t.tenant_id);
    let mut out = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), stream.recv())
            .await
            .context("the slot went quiet before the end of the workload")?
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .context("stream ended")?;
        let first = assembler.push(ev).map_err(|e| anyhow::anyhow!("{e}"))?;
        let held = assembler.take_held();
        let mut done = false;
        for e in first.into_iter().chain(held) {
            match e {
                TxEvent::Keepalive { wal_end } => done |= wal_end >= end,
                TxEvent::Commit { end_lsn, .. } => {
                    done |= end_lsn >= end;
                    out.push(e);
                }
                e => out.push(e),
            }
        }
        if done {
            break;
        }
    }
    stream.close().await;
    Ok(out)
}

/// Batch bodies of about `per_batch` events, encoded as one capture session
/// would (relations described once).
fn bodies(events: &[TxEvent], per_batch: u32) -> Vec<(Bytes, u32)> {
    let mut enc = Encoder::new();
    let mut out = Vec::new();
    for ev in events {
        for rel in enc.unsent_relations(ev) {
            enc.relation(&rel, &[]);
        }
        enc.event(ev);
        if enc.events() >= per_batch {
            let n = enc.events();
            out.push((enc.finish(), n));
        }
    }
    if !enc.is_empty() {
        let n = enc.events();
        out.push((enc.finish(), n));
    }
    out
}

/// Replicate the backlog with a capture and an apply node in this process;
/// CPU microseconds per event of the daemon, and of both PostgreSQL servers.
async fn split_cpu_per_event(
    source: &Cluster,
    target: &Cluster,
    dir: &Path,
    end: Lsn,
    events: usize,
) -> Result<(f64, f64)> {
    let cpu0 = process_cpu();
    let servers0 = cluster_cpu(source) + cluster_cpu(target);
    let started = Instant::now();
    let nodes = Split::start(source, target, dir, "bench_slot", "bench_pub").await?;
    let dst = target.connect("bench").await?;
    loop {
        let done: Option<bool> = dst
            .query_opt(
                "SELECT end_lsn >= $1::text::pg_lsn FROM heliosdb_replication.progress WHERE tenant_id = $2",
                &[&end.to_string(), &TENANT],
            )
            .await?
            .map(|r| r.get(0));
        if done == Some(true) {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the split pipeline did not catch up within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu = process_cpu() - cpu0;
    let servers = cluster_cpu(source) + cluster_cpu(target) - servers0;
    let secs = started.elapsed().as_secs_f64();
    nodes.stop().await;
    eprintln!(
        "  {events} changes in {secs:.1} s ({:.0} events/s), daemon {cpu:.2} CPU s, PostgreSQL servers {servers:.2} CPU s",
        events as f64 / secs
    );
    Ok((cpu * 1e6 / events as f64, servers * 1e6 / events as f64))
}
