//! Initial copy: the tenant's existing rows, before streaming starts.
//!
//! How the copy and the stream meet without a gap:
//!
//! * **Exported snapshot** (the slot is created by `init`): the slot is made
//!   on a replication connection that exports its snapshot; every copy worker
//!   reads under that snapshot, and streaming starts at the slot's consistent
//!   point. Copy and stream meet exactly.
//! * **Slot first, copy after** (a slot made by hand, or a copy resumed after
//!   a crash): the slot already exists at position X; the copy reads a newer
//!   snapshot T ≥ X; streaming starts at X and replays X..T over the copied
//!   rows. Apply is idempotent per primary key (upsert, delete by key), so
//!   each row ends in its latest state: the target converges.
//!
//! Copying is fast and bounded: each table is split into block ranges
//! (`ctid` ranges, scanned with TID range scans), up to `[performance]
//! worker_threads` ranges are copied in parallel, bytes stream from `COPY …
//! TO STDOUT` straight into `COPY … FROM STDIN` (binary when both sides have
//! the same column types), and target indexes stay in place.
//!
//! Resumable: the plan and each finished range are recorded in
//! `heliosdb_replication.copy_state` in the same target transaction as the
//! range's rows, so after `kill -9` only unfinished ranges are copied again.
//! When every range is done, the tenant's progress row is written (the
//! position streaming starts from) and the plan is removed, in one
//! transaction.

mod copy;

use std::sync::Arc;

use tokio_postgres::Client;

use crate::capture::catalog::SourceTable;
use crate::config::{Config, NetworkConfig, TenantConfig};
use crate::error::{on_source as src, on_target as dst, ReplicationError, Result, Side};
use crate::lsn::Lsn;
use crate::pg::{self, quote_ident, quote_literal};

pub use copy::CopyProgress;

/// Under which snapshot the copy reads the source.
#[derive(Debug, Clone)]
pub enum Snapshot {
    /// Exported by the session that created the slot (kept open by the caller).
    Exported(String),
    /// Take a new one now (the slot already existed).
    Fresh,
}

/// One block range of one table.
#[derive(Debug, Clone)]
pub struct Range {
    pub table: Arc<SourceTable>,
    pub chunk: i32,
    pub block_lo: i64,
    /// `None`: to the end of the table (covers growth after planning).
    pub block_hi: Option<i64>,
}

/// Blocks (8 KiB) per range: about 128 MiB of table.
const BLOCKS_PER_RANGE: i64 = 16384;

/// What copying reads of the configuration: the tenant's section, the
/// connection settings, and how many ranges are copied at once.
#[derive(Debug, Clone)]
pub struct CopyConfig {
    pub tenant: TenantConfig,
    pub network: NetworkConfig,
    /// `[performance] worker_threads`.
    pub workers: usize,
}

impl CopyConfig {
    pub fn of(config: &Config) -> Self {
        Self {
            tenant: config.tenant.clone(),
            network: config.network.clone(),
            workers: config.worker_threads,
        }
    }
}

/// Does the tenant still need its initial copy? (No progress yet, and
/// `[cdc] start_lsn = 0`.)
pub fn wanted(tenant: &TenantConfig, has_progress: bool) -> bool {
    !has_progress && tenant.start_lsn.is_zero()
}

/// Copy the tenant's rows of `tables`, then record `start_point` as the
/// tenant's progress: streaming continues from there.
pub async fn initial_copy(
    config: &CopyConfig,
    tables: &[SourceTable],
    snapshot: Snapshot,
    start_point: Lsn,
    system_id: &str,
) -> Result<u64> {
    let t = &config.tenant;
    let app = format!("heliosdb-tenant-replication/{} copy", t.tenant_id);
    let target = pg::connect(t.target()?, &config.network, Side::Target, &app).await?;
    let source = pg::connect(t.source()?, &config.network, Side::Source, &app).await?;
    let tables: Vec<Arc<SourceTable>> = tables.iter().cloned().map(Arc::new).collect();
    if matches!(snapshot, Snapshot::Fresh) {
        for table in &tables {
            table.check_copy_converges(&t.slot)?;
        }
    }

    let mut ranges = load_plan(&target, &t.tenant_id, &tables).await?;
    if ranges.is_empty() {
        ranges = make_plan(&source, &target, config, &tables).await?;
    }
    for table in &tables {
        record_copied_columns(&target, &t.tenant_id, table).await?;
    }
    let pending: Vec<Range> = ranges
        .into_iter()
        .filter(|(_, done)| !done)
        .map(|(r, _)| r)
        .collect();
    tracing::info!(tenant = %t.tenant_id, state = "snapshotting", ranges = pending.len(), tables = tables.len(), "initial copy");

    // A copy under another snapshot than the slot's converges by replay:
    // no conflicts are reported for transactions it may overlap.
    let exact = matches!(snapshot, Snapshot::Exported(_));
    // The snapshot every worker reads under.
    let snapshot_name = match snapshot {
        Snapshot::Exported(name) => {
            source
                .batch_execute(&format!(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                    quote_literal(&name)
                ))
                .await
                .map_err(src("importing the slot's snapshot"))?;
            name
        }
        Snapshot::Fresh => {
            source
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(src("starting the snapshot"))?;
            source
                .query_one("SELECT pg_export_snapshot()", &[])
                .await
                .map_err(src("exporting a snapshot"))?
                .get(0)
        }
    };
    // Every transaction the snapshot sees committed before this position
    // (read right after it was taken; earlier, interrupted copies read
    // older snapshots).
    let converge_until: Option<String> = if exact {
        None
    } else {
        Some(wal_insert_position(&source).await?.to_string())
    };
    let copied = if pending.is_empty() {
        0
    } else {
        copy::run(config, &source, &target, &snapshot_name, pending).await?
    };
    // `source` holds the snapshot open until every worker is done.
    drop(source);

    let mut target = target;
    let tx = target.transaction().await.map_err(dst("BEGIN"))?;
    tx.execute(
        "INSERT INTO heliosdb_replication.progress
             (tenant_id, slot_name, source_system_id, commit_lsn, end_lsn, commit_time, updated_at, converge_until)
         VALUES ($1, $2, $3, '0/0', $4::text::pg_lsn, NULL, now(), $5::text::pg_lsn)
         ON CONFLICT (tenant_id) DO UPDATE SET slot_name = EXCLUDED.slot_name,
             source_system_id = EXCLUDED.source_system_id, commit_lsn = EXCLUDED.commit_lsn,
             end_lsn = EXCLUDED.end_lsn, commit_time = NULL, updated_at = now(),
             converge_until = EXCLUDED.converge_until",
        &[&t.tenant_id, &t.slot, &system_id, &start_point.to_string(), &converge_until],
    )
    .await
    .map_err(dst("recording progress after the initial copy"))?;
    tx.execute(
        "DELETE FROM heliosdb_replication.copy_state WHERE tenant_id = $1",
        &[&t.tenant_id],
    )
    .await
    .map_err(dst("clearing the copy plan"))?;
    tx.commit().await.map_err(dst("COMMIT"))?;
    tracing::info!(tenant = %t.tenant_id, rows = copied, stream_from = %start_point, state = "streaming", "initial copy done");
    Ok(copied)
}

/// The recorded plan, if a copy was started before.
async fn load_plan(
    target: &Client,
    tenant: &str,
    tables: &[Arc<SourceTable>],
) -> Result<Vec<(Range, bool)>> {
    let rows = target
        .query(
            "SELECT table_name, chunk, block_lo, block_hi, done FROM heliosdb_replication.copy_state
              WHERE tenant_id = $1 ORDER BY table_name, chunk",
            &[&tenant],
        )
        .await
        .map_err(dst("reading heliosdb_replication.copy_state"))?;
    let mut out = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        let Some(table) = tables.iter().find(|t| t.display() == name) else {
            tracing::warn!(table = %name, "a table of the recorded copy plan is no longer published; skipping it");
            continue;
        };
        out.push((
            Range {
                table: table.clone(),
                chunk: r.get(1),
                block_lo: r.get(2),
                block_hi: r.get(3),
            },
            r.get(4),
        ));
    }
    if !out.is_empty() {
        let done = out.iter().filter(|(_, d)| *d).count();
        tracing::info!(
            done,
            total = out.len(),
            "resuming an interrupted initial copy: finished ranges are not copied again"
        );
    }
    Ok(out)
}

/// The columns a copy writes into, recorded as replication made them.
async fn record_copied_columns(
    target: &impl tokio_postgres::GenericClient,
    tenant: &str,
    table: &SourceTable,
) -> Result<()> {
    let names: Vec<&str> = table.columns.iter().map(|(n, _)| n.as_str()).collect();
    crate::checkpoint::definitions::record_columns(
        target,
        tenant,
        (&table.schema, &table.name),
        &names,
    )
    .await
}

/// Split each table into block ranges and record the plan. Refuses to copy
/// over tenant rows the target already has (unless a resync was requested,
/// which replaces them).
async fn make_plan(
    source: &Client,
    target: &Client,
    config: &CopyConfig,
    tables: &[Arc<SourceTable>],
) -> Result<Vec<(Range, bool)>> {
    let t = &config.tenant;
    let replace = resync_requested(target, &t.tenant_id).await?;
    if !replace {
        for table in tables {
            let rows = pg::own_rows(target, &table.schema, &table.name)
                .await
                .map_err(dst("reading the target table"))?;
            let sql = format!(
                "SELECT EXISTS (SELECT 1 FROM {rows} WHERE {} = {})",
                quote_ident(&t.tenant_column),
                tenant_param(target, table, &t.tenant_column).await?
            );
            let has: bool = target
                .query_one(&sql, &[&t.tenant_id])
                .await
                .map_err(dst("checking the target table"))?
                .get(0);
            if has {
                return Err(ReplicationError::operator(
                    format!(
                        "target table {} already holds rows of tenant '{}' but the target has no replication progress for it",
                        table.display(),
                        t.tenant_id
                    ),
                    "to replace them with a fresh copy, run `heliosdb-tenant-replication --config <file> resync`; to stream without copying, set [cdc] start_lsn to the slot's position",
                ));
            }
        }
    }
    let mut plan = Vec::new();
    for table in tables {
        let pages: i64 = source
            .query_one(
                "SELECT pg_relation_size(c.oid) / current_setting('block_size')::int8
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2",
                &[&table.schema, &table.name],
            )
            .await
            .map_err(src("sizing a table"))?
            .get(0);
        let chunks = (pages / BLOCKS_PER_RANGE).clamp(1, 256);
        let step = (pages / chunks).max(1);
        for i in 0..chunks {
            plan.push(Range {
                table: table.clone(),
                chunk: i as i32,
                block_lo: i * step,
                block_hi: (i + 1 < chunks).then_some((i + 1) * step),
            });
        }
    }
    let mut batch = String::from("BEGIN;\n");
    if replace {
        for table in tables {
            batch.push_str(&format!(
                "DELETE FROM {} WHERE {} = {};\n",
                table.qualified(),
                quote_ident(&t.tenant_column),
                quote_literal(&t.tenant_id)
            ));
        }
        batch.push_str(&format!(
            "DELETE FROM heliosdb_replication.resync_requests WHERE tenant_id = {};\n",
            quote_literal(&t.tenant_id)
        ));
    }
    for r in &plan {
        batch.push_str(&format!(
            "INSERT INTO heliosdb_replication.copy_state (tenant_id, table_name, chunk, block_lo, block_hi) VALUES ({}, {}, {}, {}, {});\n",
            quote_literal(&t.tenant_id),
            quote_literal(&r.table.display()),
            r.chunk,
            r.block_lo,
            r.block_hi.map(|h| h.to_string()).unwrap_or_else(|| "NULL".into()),
        ));
    }
    batch.push_str("COMMIT;");
    target
        .batch_execute(&batch)
        .await
        .map_err(dst("recording the copy plan"))?;
    Ok(plan.into_iter().map(|r| (r, false)).collect())
}

/// Is a resync of the tenant (all tables) pending?
pub async fn resync_requested(target: &Client, tenant: &str) -> Result<bool> {
    Ok(target
        .query_opt(
            "SELECT 1 FROM heliosdb_replication.resync_requests WHERE tenant_id = $1 AND table_name = '*'",
            &[&tenant],
        )
        .await
        .map_err(dst("reading resync requests"))?
        .is_some())
}

/// Pending resync requests of the tenant: `None` means every table.
pub async fn pending_resyncs(target: &Client, tenant: &str) -> Result<Vec<Option<String>>> {
    let rows = target
        .query(
            "SELECT table_name FROM heliosdb_replication.resync_requests WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .map_err(dst("reading resync requests"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let name: String = r.get(0);
            (name != "*").then_some(name)
        })
        .collect())
}

/// Ask for a resync (performed by the running daemon, or at its next start).
pub async fn request_resync(target: &Client, tenant: &str, table: Option<&str>) -> Result<()> {
    target
        .execute(
            "INSERT INTO heliosdb_replication.resync_requests (tenant_id, table_name) VALUES ($1, $2)
             ON CONFLICT (tenant_id, table_name) DO UPDATE SET requested_at = now()",
            &[&tenant, &table.unwrap_or("*")],
        )
        .await
        .map_err(dst("recording the resync request"))?;
    Ok(())
}

/// Re-copy tables while streaming: in one target transaction per table,
/// delete the tenant's rows and copy them again from a fresh snapshot. The
/// stream then goes on from where it was; the changes it still has to apply
/// were made before or after the snapshot and converge (idempotent apply).
pub async fn resync_tables(
    config: &CopyConfig,
    target: &mut Client,
    tables: &[SourceTable],
    only: &[Option<String>],
) -> Result<(u64, Lsn)> {
    let t = &config.tenant;
    let all = only.iter().any(Option::is_none);
    let chosen: Vec<&SourceTable> = tables
        .iter()
        .filter(|tb| {
            all || only
                .iter()
                .flatten()
                .any(|n| *n == tb.display() || *n == tb.name)
        })
        .collect();
    for table in &chosen {
        table.check_copy_converges(&t.slot)?;
    }
    for name in only.iter().flatten() {
        if !tables
            .iter()
            .any(|tb| *name == tb.display() || *name == tb.name)
        {
            tracing::warn!(table = %name, "resync requested for a table that is not published; ignoring it");
        }
    }
    let app = format!("heliosdb-tenant-replication/{} resync", t.tenant_id);
    // Rows are deleted and copied table by table: foreign keys between the
    // tables must not fire meanwhile (the apply session has this role too).
    pg::replica_role(target)
        .await
        .map_err(dst("setting session_replication_role"))?;
    let source = pg::connect(t.source()?, &config.network, Side::Source, &app).await?;
    source
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(src("starting the snapshot"))?;
    let mut rows = 0;
    let count = chosen.len();
    for (i, table) in chosen.into_iter().enumerate() {
        // The definition now, not the one seen at start (columns may have been added since).
        let table = &crate::capture::catalog::source_table(
            &source,
            &table.schema,
            &table.name,
            &t.tenant_column,
        )
        .await?
        .ok_or_else(|| {
            ReplicationError::operator(
                format!(
                    "table {} vanished from the source during a resync",
                    table.display()
                ),
                "remove it from the publication, then restart",
            )
        })?;
        let tx = target.transaction().await.map_err(dst("BEGIN"))?;
        let own_rows = pg::own_rows(&tx, &table.schema, &table.name)
            .await
            .map_err(dst("reading the target table"))?;
        let param = tenant_param(&tx, table, &t.tenant_column).await?;
        tx.execute(
            &format!(
                "DELETE FROM {own_rows} WHERE {} = {param}",
                quote_ident(&t.tenant_column)
            ),
            &[&t.tenant_id],
        )
        .await
        .map_err(dst("deleting the tenant's rows for resync"))?;
        record_copied_columns(&tx, &t.tenant_id, table).await?;
        let n = copy::copy_range(
            &source,
            &tx,
            table,
            &t.tenant_column,
            &t.tenant_id,
            (0, None),
            copy::binary_compatible(&source, &tx, table).await?,
            None,
        )
        .await?;
        // The request is fulfilled in the same transaction as the copy.
        let last = if i + 1 == count { "*" } else { "" };
        tx.execute(
            "DELETE FROM heliosdb_replication.resync_requests WHERE tenant_id = $1 AND table_name IN ($2, $3, $4)",
            &[&t.tenant_id, &table.display(), &table.name, &last],
        )
        .await
        .map_err(dst("clearing the resync request"))?;
        tx.commit().await.map_err(dst("COMMIT"))?;
        tracing::info!(table = %table.display(), rows = n, "resync: table copied again");
        rows += n;
    }
    // The stream replays changes made before the copies' snapshot over them:
    // no conflicts for those.
    let converge_until = wal_insert_position(&source).await?;
    crate::checkpoint::progress::set_converge_until(target, &t.tenant_id, converge_until).await?;
    // Requests for tables that are not published cannot be fulfilled.
    let published: Vec<String> = tables
        .iter()
        .flat_map(|tb| [tb.display(), tb.name.clone()])
        .collect();
    target
        .execute(
            "DELETE FROM heliosdb_replication.resync_requests
              WHERE tenant_id = $1 AND table_name <> '*' AND table_name <> ALL($2)",
            &[&t.tenant_id, &published],
        )
        .await
        .map_err(dst("clearing resync requests"))?;
    Ok((rows, converge_until))
}

/// The source's WAL insert position. A transaction visible to a snapshot
/// taken before this call committed below it, also with asynchronous
/// commits (`synchronous_commit = off`), whose commit records may not be
/// written out yet: `pg_current_wal_lsn()`, the write position, can lag
/// behind them.
async fn wal_insert_position(source: &Client) -> Result<Lsn> {
    let wal: String = source
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(src("reading the WAL position"))?
        .get(0);
    wal.parse()
        .map_err(|e: crate::lsn::ParseLsnError| ReplicationError::Internal(e.to_string()))
}

/// `$1` (the tenant id, text) as a value of the target's tenant column
/// type, so `column = …` compares in that type (a uuid, an integer) and can
/// use its index.
async fn tenant_param(
    target: &impl tokio_postgres::GenericClient,
    table: &SourceTable,
    column: &str,
) -> Result<String> {
    let columns = pg::columns(target, &table.schema, &table.name)
        .await
        .map_err(dst("reading the target table's columns"))?;
    Ok(match columns.into_iter().find(|(n, _)| n == column) {
        Some((_, ty)) => format!("CAST($1::text AS {ty})"),
        None => "$1::text".to_string(),
    })
}
