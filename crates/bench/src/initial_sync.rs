//! Initial copy of one tenant: `init` next to a plain COPY pipe.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pgcluster::Cluster;

use crate::{cores, median, TABLES, TENANT};

pub async fn run(rows: i64, runs: usize, dir: &Path, out: &Path) -> Result<()> {
    let (source, target) = crate::nodes::clusters(dir).await?;
    let src = source.connect("bench").await?;
    eprintln!("generating {rows} rows with the reference workload …");
    let t = Instant::now();
    src.execute("SELECT bench_ins(1, $1)", &[&rows]).await?;
    src.batch_execute("VACUUM ANALYZE").await?;
    let tenant_rows: i64 = {
        let mut n = 0;
        for t in TABLES {
            n += src
                .query_one(
                    &format!("SELECT count(*) FROM {t} WHERE tenant_id = $1"),
                    &[&TENANT],
                )
                .await?
                .get::<_, i64>(0);
        }
        n
    };
    eprintln!(
        "  done in {:.1} s; {tenant_rows} rows belong to {TENANT}",
        t.elapsed().as_secs_f64()
    );
    let dst = target.connect("bench").await?;

    let dir = std::env::temp_dir().join(format!("heliosdb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config_text = format!(
        "[replication]\ntenant_id = \"{TENANT}\"\nsource_connection = \"{}\"\ntarget_connection = \"{}\"\n\
         [cdc]\nreplication_slot = \"bench_slot\"\npublication_name = \"bench_pub\"\ncheckpoint_dir = \"{}\"\n\
         [performance]\nworker_threads = 2\n",
        source.superuser_url("bench"),
        target.superuser_url("bench"),
        dir.display()
    );
    let config =
        heliosdb_tenant_replication::config::Config::from_toml(&config_text, "bench.toml", |_| {
            None
        })?;

    let mut pipe = Vec::new();
    let mut ours = Vec::new();
    for run in 1..=runs {
        reset_target(&dst).await?;
        let t = Instant::now();
        for table in TABLES {
            copy_pipe(&source, &target, table)?;
        }
        pipe.push(t.elapsed().as_secs_f64());
        check_count(&dst, tenant_rows).await?;

        reset_target(&dst).await?;
        src.batch_execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'bench_slot'; DROP PUBLICATION IF EXISTS bench_pub;")
            .await?;
        let t = Instant::now();
        heliosdb_tenant_replication::provision::init(&config, true, false)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        ours.push(t.elapsed().as_secs_f64());
        check_count(&dst, tenant_rows).await?;
        eprintln!(
            "  run {run}: COPY pipe {:.2} s, heliosdb init {:.2} s",
            pipe[run - 1],
            ours[run - 1]
        );
    }
    src.batch_execute("SELECT pg_drop_replication_slot('bench_slot')")
        .await?;
    let (mp, mo) = (median(&mut pipe), median(&mut ours));
    let (rp, ro) = (tenant_rows as f64 / mp, tenant_rows as f64 / mo);
    println!("initial copy of {tenant_rows} rows of {TENANT} (3 tables, reference workload), median of {runs} runs, {} cores", cores());
    println!(
        "  {:<48} {:>12.0} rows/s",
        "plain COPY pipe (psql | psql, table by table)", rp
    );
    println!(
        "  {:<48} {:>12.0} rows/s",
        "heliosdb-tenant-replication init (slot + copy)", ro
    );
    println!("  {:<48} {:>12.2}", "ratio (init / COPY pipe)", ro / rp);
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(
        out,
        serde_json::to_string_pretty(&serde_json::json!({
            "benchmark": "initial-sync", "tenant_rows": tenant_rows, "generated_rows": rows, "runs": runs,
            "cores": cores(), "copy_pipe_seconds": pipe, "init_seconds": ours,
            "copy_pipe_rows_per_sec_median": rp, "init_rows_per_sec_median": ro, "ratio": ro / rp,
        }))?,
    )?;
    eprintln!("raw numbers: {}", out.display());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn reset_target(dst: &tokio_postgres::Client) -> Result<()> {
    dst.batch_execute("TRUNCATE accounts, orders, events; DROP SCHEMA IF EXISTS heliosdb_replication CASCADE; CHECKPOINT;")
        .await?;
    Ok(())
}

async fn check_count(dst: &tokio_postgres::Client, expected: i64) -> Result<()> {
    let mut n = 0;
    for t in TABLES {
        n += dst
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await?
            .get::<_, i64>(0);
    }
    if n != expected {
        bail!("target has {n} rows, expected {expected}");
    }
    Ok(())
}

/// `psql -c "COPY (SELECT …) TO STDOUT" | psql -c "COPY t FROM STDIN"`.
pub(crate) fn copy_pipe(source: &Cluster, target: &Cluster, table: &str) -> Result<()> {
    let mut out = psql(
        source,
        &format!("COPY (SELECT * FROM {table} WHERE tenant_id = '{TENANT}') TO STDOUT"),
    )
    .stdout(Stdio::piped())
    .spawn()?;
    let stdout = out.stdout.take().context("psql stdout")?;
    let status_in = psql(target, &format!("COPY {table} FROM STDIN"))
        .stdin(stdout)
        .status()?;
    let status_out = out.wait()?;
    if !status_in.success() || !status_out.success() {
        bail!("COPY pipe of {table} failed");
    }
    Ok(())
}

/// psql running one command against the `bench` database of `cluster`.
fn psql(cluster: &Cluster, command: &str) -> Command {
    let mut cmd = Command::new(cluster.bindir().join("psql"));
    cmd.args([
        "-X",
        "-q",
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
        "-d",
        "bench",
        "-p",
    ])
    .arg(cluster.port().to_string())
    .arg("-c")
    .arg(command);
    cmd
}
