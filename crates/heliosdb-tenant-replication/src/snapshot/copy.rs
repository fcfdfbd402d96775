//! Copy workers: block ranges from `COPY … TO STDOUT` into `COPY … FROM STDIN`.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::{Client, Transaction};

use super::CopyConfig;
use super::Range;
use crate::capture::catalog::SourceTable;
use crate::error::{on_source as src, on_target as dst};
use crate::error::{ReplicationError, Result, Side};
use crate::pg::{self, quote_ident, quote_literal};

/// Rows copied so far, shared by the workers and the progress display.
#[derive(Debug, Default)]
pub struct CopyProgress {
    pub rows: AtomicU64,
}

/// Copy `pending` ranges with up to `[performance] worker_threads` workers,
/// all reading under `snapshot`.
pub(super) async fn run(
    config: &CopyConfig,
    source: &Client,
    target: &Client,
    snapshot: &str,
    pending: Vec<Range>,
) -> Result<u64> {
    let t = &config.tenant;
    // Totals for the progress display (estimates).
    let mut total: u64 = 0;
    let mut binary = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for r in &pending {
        let name = r.table.display();
        if seen.contains(&name) {
            continue;
        }
        seen.push(name.clone());
        // The planner's estimate: good enough for an ETA, free unlike count(*).
        let plan: serde_json::Value = source
            .query_one(
                &format!(
                    "EXPLAIN (FORMAT JSON) SELECT 1 FROM {} WHERE {} = {}",
                    r.table.own_rows(),
                    quote_ident(&t.tenant_column),
                    quote_literal(&t.tenant_id)
                ),
                &[],
            )
            .await
            .map_err(src("estimating the tenant's rows"))?
            .get(0);
        let n = plan[0]["Plan"]["Plan Rows"].as_f64().unwrap_or(0.0) as i64;
        total += n as u64;
        binary.push((name, binary_compatible(source, target, &r.table).await?));
    }
    let binary = Arc::new(binary);
    // Foreign keys would fire for rows whose parents another range has not
    // committed yet. With the replica role they do not (as in PostgreSQL's
    // table sync); a role that may not set it copies one range at a time,
    // referenced tables first.
    let replica = pg::replica_role(target)
        .await
        .map_err(dst("setting session_replication_role"))?;
    let (pending, workers) = if replica {
        target
            .batch_execute("RESET session_replication_role")
            .await
            .map_err(dst("RESET session_replication_role"))?;
        let n = pending.len();
        (pending, config.workers.min(n).max(1))
    } else {
        tracing::info!("the target role may not set session_replication_role: tables are copied one range at a time, referenced tables first");
        (referenced_first(target, pending).await?, 1)
    };
    let queue = Arc::new(Mutex::new(VecDeque::from(pending)));
    let progress = Arc::new(CopyProgress::default());
    let display = tokio::spawn(show_progress(progress.clone(), total));

    let mut handles = Vec::new();
    for w in 0..workers {
        let (config, queue, progress, binary) = (
            config.clone(),
            queue.clone(),
            progress.clone(),
            binary.clone(),
        );
        let snapshot = snapshot.to_string();
        handles.push(tokio::spawn(async move {
            worker(w, &config, &snapshot, queue, progress, binary).await
        }));
    }
    let mut first_error = None;
    for h in handles {
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(ReplicationError::Internal(format!(
                    "copy worker failed: {e}"
                )));
            }
        }
    }
    display.abort();
    let copied = progress.rows.load(Ordering::Relaxed);
    finish_display(copied, total);
    match first_error {
        Some(e) => Err(e),
        None => Ok(copied),
    }
}

async fn worker(
    id: usize,
    config: &CopyConfig,
    snapshot: &str,
    queue: Arc<Mutex<VecDeque<Range>>>,
    progress: Arc<CopyProgress>,
    binary: Arc<Vec<(String, bool)>>,
) -> Result<()> {
    let t = &config.tenant;
    let app = format!("heliosdb-tenant-replication/{} copy {id}", t.tenant_id);
    let source = pg::connect(t.source()?, &config.network, Side::Source, &app).await?;
    source
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await
        .map_err(src("importing the copy snapshot"))?;
    let mut target = pg::connect(t.target()?, &config.network, Side::Target, &app).await?;
    pg::replica_role(&target)
        .await
        .map_err(dst("setting session_replication_role"))?;
    loop {
        let next = queue.lock().ok().and_then(|mut q| q.pop_front());
        let Some(range) = next else { return Ok(()) };
        let name = range.table.display();
        let bin = binary
            .iter()
            .find(|(n, _)| *n == name)
            .is_some_and(|(_, b)| *b);
        let tx = target.transaction().await.map_err(dst("BEGIN"))?;
        let rows = copy_range(
            &source,
            &tx,
            &range.table,
            &t.tenant_column,
            &t.tenant_id,
            (range.block_lo, range.block_hi),
            bin,
            Some(&progress),
        )
        .await?;
        tx.execute(
            "UPDATE heliosdb_replication.copy_state SET done = true, rows = $4
              WHERE tenant_id = $1 AND table_name = $2 AND chunk = $3",
            &[&t.tenant_id, &name, &range.chunk, &(rows as i64)],
        )
        .await
        .map_err(dst("recording a copied range"))?;
        tx.commit().await.map_err(dst("COMMIT"))?;
        tracing::debug!(table = %name, chunk = range.chunk, rows, "range copied");
    }
}

/// `ranges` ordered so that a table comes after the tables its foreign keys
/// on the target reference (stable otherwise; a cycle keeps its order).
pub(super) async fn referenced_first(
    target: &Client,
    mut ranges: Vec<Range>,
) -> Result<Vec<Range>> {
    let edges: Vec<(String, String)> = target
        .query(
            "SELECT cn.nspname || '.' || c.relname, pn.nspname || '.' || p.relname
               FROM pg_constraint k
               JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
               JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
              WHERE k.contype = 'f' AND k.conrelid <> k.confrelid",
            &[],
        )
        .await
        .map_err(dst("reading foreign keys"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Depth of each table in the reference graph (bounded: cycles stop).
    let names: Vec<String> = ranges.iter().map(|r| r.table.display()).collect();
    let mut depth: std::collections::HashMap<&str, usize> =
        names.iter().map(|n| (n.as_str(), 0)).collect();
    for _ in 0..names.len() {
        for (child, parent) in &edges {
            let (Some(&p), Some(&c)) = (depth.get(parent.as_str()), depth.get(child.as_str()))
            else {
                continue;
            };
            if c <= p && p < names.len() {
                depth.insert(child.as_str(), p + 1);
            }
        }
    }
    let depth: std::collections::HashMap<String, usize> =
        depth.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    ranges.sort_by_key(|r| depth.get(&r.table.display()).copied().unwrap_or(0));
    Ok(ranges)
}

/// Same column types on both sides: binary COPY is safe and fastest.
pub(super) async fn binary_compatible(
    source: &Client,
    target: &impl tokio_postgres::GenericClient,
    table: &SourceTable,
) -> Result<bool> {
    let s = pg::columns(source, &table.schema, &table.name)
        .await
        .map_err(src("reading column types"))?;
    let d = pg::columns(target, &table.schema, &table.name)
        .await
        .map_err(dst("reading column types"))?;
    Ok(table.columns.iter().all(|(name, _)| {
        let st = s.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        let dt = d.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        st.is_some() && st == dt
    }))
}

/// Copy the tenant's rows in the block range `[lo, hi)` of `table` into the
/// open target transaction; returns the number of rows.
#[allow(clippy::too_many_arguments)]
pub(super) async fn copy_range(
    source: &Client,
    target: &Transaction<'_>,
    table: &SourceTable,
    tenant_column: &str,
    tenant: &str,
    (lo, hi): (i64, Option<i64>),
    binary: bool,
    progress: Option<&CopyProgress>,
) -> Result<u64> {
    let cols: Vec<String> = table.columns.iter().map(|(n, _)| quote_ident(n)).collect();
    let cols = cols.join(", ");
    let format = if binary { "binary" } else { "text" };
    let mut filter = format!(
        "{} = {} AND ctid >= '({lo},0)'::tid",
        quote_ident(tenant_column),
        quote_literal(tenant)
    );
    if let Some(hi) = hi {
        filter.push_str(&format!(" AND ctid < '({hi},0)'::tid"));
    }
    let out_sql = format!(
        "COPY (SELECT {cols} FROM {} WHERE {filter}) TO STDOUT (FORMAT {format})",
        table.own_rows()
    );
    let in_sql = format!(
        "COPY {} ({cols}) FROM STDIN (FORMAT {format})",
        table.qualified()
    );
    let context = format!("copying {}", table.display());

    let stream = source
        .copy_out(out_sql.as_str())
        .await
        .map_err(src(&context))?;
    let sink = target
        .copy_in::<_, Bytes>(in_sql.as_str())
        .await
        .map_err(dst(&context))?;
    let mut stream = std::pin::pin!(stream);
    let mut sink = std::pin::pin!(sink);
    let mut messages: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(src(&context))?;
        sink.send(chunk).await.map_err(dst(&context))?;
        // The server sends one row per CopyData message.
        messages += 1;
        if let Some(p) = progress {
            if messages.is_multiple_of(1024) {
                p.rows.fetch_add(1024, Ordering::Relaxed);
            }
        }
    }
    let rows = sink.as_mut().finish().await.map_err(dst(&context))?;
    if let Some(p) = progress {
        p.rows.fetch_add(
            rows.saturating_sub(messages - messages % 1024),
            Ordering::Relaxed,
        );
    }
    Ok(rows)
}

/// A progress bar on a terminal; log lines otherwise.
async fn show_progress(progress: Arc<CopyProgress>, total: u64) {
    let started = Instant::now();
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "initial copy [{bar:40}] {pos}/{len} rows  {per_sec}  ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        loop {
            bar.set_position(progress.rows.load(Ordering::Relaxed).min(total));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let done = progress.rows.load(Ordering::Relaxed);
        let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
        let eta = if rate > 0.0 {
            (total.saturating_sub(done)) as f64 / rate
        } else {
            0.0
        };
        tracing::info!(
            rows = done,
            total,
            rows_per_sec = rate as u64,
            eta_seconds = eta as u64,
            "initial copy in progress"
        );
    }
}

fn finish_display(copied: u64, total: u64) {
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    tracing::info!(
        rows = copied,
        estimated = total,
        "initial copy: all ranges copied"
    );
}
