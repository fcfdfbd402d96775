//! Provisioning a tenant (`init`) and the checks `start` runs first.
//!
//! `init` is idempotent: run it again after adding tables or fixing the
//! target and it does only what is missing.
//!
//! PostgreSQL has no `CREATE PUBLICATION … FOR ALL TABLES WHERE` (the
//! deployment guide's §2.4 shows one); row filters exist per table from
//! PostgreSQL 15 on. So `init` lists the tables that carry the tenant column
//! and builds `FOR TABLE t1 WHERE (tenant_id = '…'), t2 WHERE (…)`.

pub mod preflight;
pub mod status;

use tokio_postgres::Client;

use crate::capture::catalog::{source_table, SourceTable};
use crate::capture::stream::SlotSnapshot;
use crate::checkpoint::progress;
use crate::config::{Config, TenantConfig};
use crate::error::{on_source as src, ReplicationError, Result, Side};
use crate::pg::{self, quote_ident, quote_literal};
use crate::snapshot::{self, Snapshot};

/// What `init` did, line by line, for the terminal.
#[derive(Debug, Default)]
pub struct InitReport {
    pub lines: Vec<String>,
}

/// Provision the tenant: publication and slot on the source, progress schema
/// on the target, a check of the target tables, and (unless `copy` is false)
/// the initial copy of the tenant's rows. A tenant that already has progress
/// on the target but whose slot is gone has a gap (the changes made since
/// were never captured): refused unless `resync`, which deletes the
/// tenant's rows on the target and copies them again.
pub async fn init(config: &Config, copy: bool, resync: bool) -> Result<InitReport> {
    let t = &config.tenant;
    let mut report = InitReport::default();
    let source = pg::connect(
        t.source()?,
        &config.network,
        Side::Source,
        "heliosdb-tenant-replication init",
    )
    .await?;
    preflight::check_source_server(&source).await?;

    let (tables, skipped) = tenant_tables(&source, t).await?;
    if tables.is_empty() {
        return Err(ReplicationError::operator(
            format!("source: no table has a column named {}", t.tenant_column),
            "set [cdc] tenant_column to the column that names a row's tenant",
        ));
    }
    // The tenant id as the source writes it, before anything is created.
    for table in &tables {
        preflight::check_tenant_id_form(&source, t, table).await?;
    }
    let mut problems = Vec::new();
    for table in &tables {
        if let Err(e) = table.check_replica_identity(&t.tenant_column) {
            problems.push(e.to_string());
        }
    }
    if !problems.is_empty() {
        return Err(ReplicationError::operator(
            format!(
                "source tables are not ready:\n  - {}",
                problems.join("\n  - ")
            ),
            "fix the tables listed above, then run init again (nothing was created)",
        ));
    }
    for s in &skipped {
        report.lines.push(format!("source: not replicated: {s}"));
    }

    ensure_publication(&source, t, &tables, &mut report).await?;

    let target = pg::connect(
        t.target()?,
        &config.network,
        Side::Target,
        "heliosdb-tenant-replication init",
    )
    .await?;
    crate::apply::tracking::ensure_schema(&target).await?;
    report
        .lines
        .push("target: schema heliosdb_replication ready".into());
    preflight::check_target(&target, t, &tables).await?;
    report
        .lines
        .push(format!("target: {} table(s) ready", tables.len()));

    let slot_lsn = ensure_slot(&source, t, &mut report).await?;
    let mut recorded = progress::load(&target, &t.tenant_id).await?;
    if let Some(p) = &recorded {
        if slot_lsn.is_none() && !resync {
            return Err(ReplicationError::operator(
                format!(
                    "target: tenant '{}' was applied up to {} from slot '{}', which no longer exists on the source: the changes made since were never captured, and a new slot would start from now",
                    t.tenant_id, p.end_lsn, p.slot_name
                ),
                "run init --resync: it creates the slot and copies the tenant's rows again, replacing them on the target (local writes on the target not yet replicated back are lost)",
            ));
        }
        if resync {
            let n = clear_tenant(&target, t, &tables).await?;
            report.lines.push(format!(
                "target: {n} row(s) of tenant '{}' deleted, to be copied again (--resync)",
                t.tenant_id
            ));
            recorded = None;
        }
    }
    let copy = copy && snapshot::wanted(&config.tenant, recorded.is_some());
    if copy {
        let system_id = preflight::system_id(&source).await?;
        let rows = match slot_lsn {
            // Slot and copy from one snapshot: they meet exactly.
            None => {
                let slot = SlotSnapshot::create(t.source()?, &t.slot).await?;
                report.lines.push(format!(
                    "source: slot '{}' created (pgoutput) at {}, exporting its snapshot for the copy",
                    t.slot, slot.consistent_point
                ));
                let rows = snapshot::initial_copy(
                    &snapshot::CopyConfig::of(config),
                    &tables,
                    Snapshot::Exported(slot.snapshot_name.clone()),
                    slot.consistent_point,
                    &system_id,
                )
                .await?;
                drop(slot);
                rows
            }
            // The slot existed: copy now, streaming replays from the slot.
            Some(lsn) => {
                snapshot::initial_copy(
                    &snapshot::CopyConfig::of(config),
                    &tables,
                    Snapshot::Fresh,
                    lsn,
                    &system_id,
                )
                .await?
            }
        };
        report.lines.push(format!(
            "target: initial copy done: {rows} row(s) of tenant '{}'",
            t.tenant_id
        ));
    } else if slot_lsn.is_none() {
        create_slot(&source, t, &mut report).await?;
    }
    Ok(report)
}

/// Delete the tenant's rows, progress and copy plan on the target, in one
/// transaction: afterwards the target is as before the tenant's first copy.
async fn clear_tenant(target: &Client, t: &TenantConfig, tables: &[SourceTable]) -> Result<u64> {
    let dst = crate::error::on_target;
    // Tables are emptied one by one: foreign keys between them must not fire.
    pg::replica_role(target)
        .await
        .map_err(dst("setting session_replication_role"))?;
    target.batch_execute("BEGIN").await.map_err(dst("BEGIN"))?;
    let mut rows = 0;
    for table in tables {
        let own_rows = pg::own_rows(target, &table.schema, &table.name)
            .await
            .map_err(dst("reading the target table"))?;
        rows += target
            .execute(
                &format!(
                    "DELETE FROM {own_rows} WHERE {} = $1::text",
                    quote_ident(&t.tenant_column)
                ),
                &[&t.tenant_id],
            )
            .await
            .map_err(dst("deleting the tenant's rows"))?;
    }
    for sql in [
        "DELETE FROM heliosdb_replication.progress WHERE tenant_id = $1",
        "DELETE FROM heliosdb_replication.copy_state WHERE tenant_id = $1",
        "DELETE FROM heliosdb_replication.resync_requests WHERE tenant_id = $1",
    ] {
        target
            .execute(sql, &[&t.tenant_id])
            .await
            .map_err(dst("forgetting the tenant's progress"))?;
    }
    target
        .batch_execute("COMMIT")
        .await
        .map_err(dst("COMMIT"))?;
    Ok(rows)
}

/// Tables with the tenant column (plain tables and partitioned tables, whose
/// partitions are replicated through them), and descriptions of those left out.
pub(crate) async fn tenant_tables(
    source: &Client,
    t: &TenantConfig,
) -> Result<(Vec<SourceTable>, Vec<String>)> {
    let rows = source
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relispartition,
                    EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = $1
                             AND a.attnum > 0 AND NOT a.attisdropped)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p')
                AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'heliosdb_replication')
                AND n.nspname NOT LIKE 'pg\\_%'
              ORDER BY 1, 2",
            &[&t.tenant_column],
        )
        .await
        .map_err(src("listing tables"))?;
    let mut tables = Vec::new();
    let mut skipped = Vec::new();
    for r in rows {
        let (schema, name, is_partition, has_col): (String, String, bool, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        if !has_col {
            skipped.push(format!("{schema}.{name} (no {} column)", t.tenant_column));
        } else if is_partition {
            // Its rows travel as its partitioned table's (kind "p" below).
            skipped.push(format!(
                "{schema}.{name} (a partition: replicated through its partitioned table)"
            ));
        } else if let Some(table) = source_table(source, &schema, &name, &t.tenant_column).await? {
            tables.push(table);
        }
    }
    Ok((tables, skipped))
}

/// The publication's row filter: the tenant's rows, or those of every
/// tenant in `tenants` (a shared slot).
fn row_filter(column: &str, tenants: &[String]) -> String {
    match tenants {
        [one] => format!("WHERE ({} = {})", quote_ident(column), quote_literal(one)),
        many => format!(
            "WHERE ({} IN ({}))",
            quote_ident(column),
            many.iter()
                .map(|t| quote_literal(t))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

async fn ensure_publication(
    source: &Client,
    t: &TenantConfig,
    tables: &[SourceTable],
    report: &mut InitReport,
) -> Result<()> {
    let tenants = if t.is_shared() {
        t.shared_with.clone()
    } else {
        vec![t.tenant_id.clone()]
    };
    let filter = row_filter(&t.tenant_column, &tenants);
    let exists = source
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&t.publication],
        )
        .await
        .map_err(src("reading pg_publication"))?
        .is_some();
    let pub_ident = quote_ident(&t.publication);
    if exists && t.is_shared() {
        // The filter lists the tenants the slot serves: set it whole (the
        // tables with it), effective for changes decoded after this commit.
        set_tables(source, &t.publication, tables, &filter).await?;
        report.lines.push(format!(
            "source: publication '{}' (shared by {} tenants) set for {} table(s) {filter}",
            t.publication,
            tenants.len(),
            tables.len()
        ));
        return Ok(());
    }
    if !exists {
        let list: Vec<String> = tables
            .iter()
            .map(|tb| format!("{} {filter}", tb.own_rows()))
            .collect();
        // Partitioned tables publish their partitions' changes as their own,
        // so the target may be partitioned differently, or not at all.
        let with = if tables.iter().any(|tb| tb.partitioned) {
            " WITH (publish_via_partition_root = true)"
        } else {
            ""
        };
        source
            .batch_execute(&format!(
                "CREATE PUBLICATION {pub_ident} FOR TABLE {}{with}",
                list.join(", ")
            ))
            .await
            .map_err(src("creating the publication"))?;
        report.lines.push(format!(
            "source: publication '{}' created for {} table(s) {filter}: {}",
            t.publication,
            tables.len(),
            tables
                .iter()
                .map(|tb| tb.display())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        return Ok(());
    }
    let published: Vec<(String, String)> = source
        .query("SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1", &[&t.publication])
        .await
        .map_err(src("reading pg_publication_tables"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let missing: Vec<&SourceTable> = tables
        .iter()
        .filter(|tb| {
            !published
                .iter()
                .any(|(s, n)| *s == tb.schema && *n == tb.name)
        })
        .collect();
    for tb in &missing {
        source
            .batch_execute(&format!(
                "ALTER PUBLICATION {pub_ident} ADD TABLE {} {filter}",
                tb.own_rows()
            ))
            .await
            .map_err(src("adding a table to the publication"))?;
        report.lines.push(format!(
            "source: publication '{}': added {}",
            t.publication,
            tb.display()
        ));
    }
    if tables.iter().any(|tb| tb.partitioned) {
        let via_root: bool = source
            .query_one(
                "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
                &[&t.publication],
            )
            .await
            .map_err(src("reading pg_publication"))?
            .get(0);
        if !via_root {
            source
                .batch_execute(&format!(
                    "ALTER PUBLICATION {pub_ident} SET (publish_via_partition_root = true)"
                ))
                .await
                .map_err(src("publishing partitions through their partitioned table"))?;
            report.lines.push(format!(
                "source: publication '{}' publishes partitions through their partitioned table",
                t.publication
            ));
        }
    }
    if missing.is_empty() {
        report.lines.push(format!(
            "source: publication '{}' exists with all {} table(s)",
            t.publication,
            tables.len()
        ));
    }
    Ok(())
}

/// `ALTER PUBLICATION … SET TABLE`: every table with `filter`.
async fn set_tables(
    source: &Client,
    publication: &str,
    tables: &[SourceTable],
    filter: &str,
) -> Result<()> {
    let list: Vec<String> = tables
        .iter()
        .map(|tb| format!("{} {filter}", tb.own_rows()))
        .collect();
    source
        .batch_execute(&format!(
            "ALTER PUBLICATION {} SET TABLE {}",
            quote_ident(publication),
            list.join(", ")
        ))
        .await
        .map_err(src("setting the publication's tables and row filter"))?;
    Ok(())
}

/// A shared slot's publication lists exactly `tenants` (what remains after
/// a tenant was removed). Returns what was done, for the log.
pub async fn publish_for(config: &Config, tenants: &[String]) -> Result<String> {
    let t = &config.tenant;
    let app = "heliosdb-tenant-replication publication";
    let source = pg::connect(t.source()?, &config.network, Side::Source, app).await?;
    let (tables, _) = tenant_tables(&source, t).await?;
    let filter = row_filter(&t.tenant_column, tenants);
    set_tables(&source, &t.publication, &tables, &filter).await?;
    Ok(format!("publication {} {filter}", t.publication))
}

/// Check an existing slot; `None` when there is none yet, else its position.
async fn ensure_slot(
    source: &Client,
    t: &TenantConfig,
    report: &mut InitReport,
) -> Result<Option<crate::lsn::Lsn>> {
    let slot = source
        .query_opt(
            "SELECT plugin::text, coalesce(confirmed_flush_lsn, '0/0')::text, wal_status = 'lost'
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&t.slot],
        )
        .await
        .map_err(src("reading pg_replication_slots"))?;
    let Some(row) = slot else { return Ok(None) };
    let plugin: Option<String> = row.get(0);
    if plugin.as_deref() != Some("pgoutput") {
        return Err(ReplicationError::operator(
            format!(
                "source: slot '{}' exists but is not a pgoutput slot",
                t.slot
            ),
            "choose another [cdc] replication_slot, or drop that slot",
        ));
    }
    if row.get::<_, Option<bool>>(2) == Some(true) {
        return Err(invalidated_slot(&t.slot));
    }
    report
        .lines
        .push(format!("source: slot '{}' exists (pgoutput)", t.slot));
    let lsn: String = row.get(1);
    Ok(Some(lsn.parse().unwrap_or(crate::lsn::Lsn::ZERO)))
}

async fn create_slot(source: &Client, t: &TenantConfig, report: &mut InitReport) -> Result<()> {
    let row = source
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&t.slot],
        )
        .await
        .map_err(src("creating the replication slot"))?;
    let lsn: String = row.get(0);
    report.lines.push(format!(
        "source: slot '{}' created (pgoutput) at {lsn}",
        t.slot
    ));
    Ok(())
}

/// A slot the source invalidated (it lost WAL the tenant still needed,
/// `max_slot_wal_keep_size`): what it held back is gone.
pub fn invalidated_slot(slot: &str) -> ReplicationError {
    ReplicationError::operator(
        format!("source: slot '{slot}' was invalidated (it held more WAL than max_slot_wal_keep_size allows): changes it had not delivered are gone"),
        format!("drop it (SELECT pg_drop_replication_slot({})), then run init --resync to copy the tenant again; raise max_slot_wal_keep_size or alert on heliosdb_slot_retained_wal_bytes to keep it from happening", quote_literal(slot)),
    )
}

/// A tenant the node no longer serves lets go of the source: its slot (so
/// the source stops keeping WAL for it) and its publication. Its rows and
/// progress stay on the target; serving it again finds the slot gone and
/// asks for `init --resync`. Returns what was dropped.
pub async fn release(config: &Config) -> Result<Vec<String>> {
    let t = &config.tenant;
    let app = format!("heliosdb-tenant-replication/{} release", t.tenant_id);
    let source = pg::connect(t.source()?, &config.network, Side::Source, &app).await?;
    let mut dropped = Vec::new();
    // The stopped pipeline's walsender lets go of the slot a moment after
    // the connection closes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let active: Option<bool> = source
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&t.slot],
            )
            .await
            .map_err(src("reading the replication slot"))?
            .map(|r| r.get(0));
        match active {
            None => break,
            Some(true) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Some(true) => {
                return Err(ReplicationError::operator(
                    format!("slot '{}' is still in use by another connection", t.slot),
                    format!("find who reads it (pg_stat_replication) and drop it with SELECT pg_drop_replication_slot('{}')", t.slot),
                ))
            }
            Some(false) => {
                source
                    .execute("SELECT pg_drop_replication_slot($1)", &[&t.slot])
                    .await
                    .map_err(src("dropping the replication slot"))?;
                dropped.push(format!("slot {}", t.slot));
                break;
            }
        }
    }
    let publication: bool = source
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&t.publication],
        )
        .await
        .map_err(src("reading publications"))?
        .get(0);
    if publication {
        source
            .batch_execute(&format!("DROP PUBLICATION {}", quote_ident(&t.publication)))
            .await
            .map_err(src("dropping the publication"))?;
        dropped.push(format!("publication {}", t.publication));
    }
    Ok(dropped)
}
