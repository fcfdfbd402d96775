//! Start-up checks: everything a user commonly gets wrong, found before
//! streaming starts, each reported with its fix.

use tokio_postgres::Client;

use crate::apply::catalog::TableMapping;
use crate::capture::catalog::{source_table, SourceTable};
use crate::config::TenantConfig;
use crate::error::{on_source as src, on_target, ReplicationError, Result};
use crate::lsn::Lsn;
use crate::pg::quote_literal;

/// What the source checks found.
#[derive(Debug, Clone)]
pub struct SourceReport {
    pub tables: Vec<SourceTable>,
    /// The slot's confirmed position.
    pub slot_confirmed: Lsn,
}

/// The source can do logical replication, and the role may.
pub async fn check_source_server(client: &Client) -> Result<()> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), current_setting('server_version_num')::int,
                    r.rolreplication OR r.rolsuper, current_user::text
               FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(src("checking the server settings"))?;
    let wal_level: String = row.get(0);
    let version: i32 = row.get(1);
    let may_replicate: bool = row.get(2);
    let user: String = row.get(3);
    if wal_level != "logical" {
        return Err(ReplicationError::operator(
            format!("source: wal_level is '{wal_level}', logical replication needs 'logical'"),
            "set wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL",
        ));
    }
    if version < 150_000 {
        return Err(ReplicationError::operator(
            format!("source: PostgreSQL {} has no publication row filters, which keep other tenants' rows on the source", version / 10_000),
            "upgrade the source to PostgreSQL 15 or newer",
        ));
    }
    if !may_replicate {
        return Err(ReplicationError::operator(
            format!("source: role '{user}' lacks the REPLICATION attribute"),
            format!(
                "ALTER ROLE {} WITH REPLICATION",
                crate::pg::quote_ident(&user)
            ),
        ));
    }
    Ok(())
}

/// Slot and publication exist and fit the tenant.
pub async fn check_source(client: &Client, t: &TenantConfig) -> Result<SourceReport> {
    check_source_server(client).await?;
    let slot = client
        .query_opt(
            "SELECT plugin::text, slot_type, database::text = current_database()::text,
                    coalesce(confirmed_flush_lsn, '0/0')::text, wal_status = 'lost'
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&t.slot],
        )
        .await
        .map_err(src("reading pg_replication_slots"))?;
    let Some(slot) = slot else {
        return Err(ReplicationError::operator(
            format!("source: replication slot '{}' does not exist", t.slot),
            format!(
                "run `heliosdb-tenant-replication --config <file> init`, or: SELECT pg_create_logical_replication_slot({}, 'pgoutput');",
                quote_literal(&t.slot)
            ),
        ));
    };
    let plugin: Option<String> = slot.get(0);
    let slot_type: String = slot.get(1);
    let same_db: Option<bool> = slot.get(2);
    if slot_type != "logical" || plugin.as_deref() != Some("pgoutput") {
        return Err(ReplicationError::operator(
            format!("source: slot '{}' is a {slot_type} slot with plugin {}, not a logical pgoutput slot", t.slot, plugin.unwrap_or_default()),
            format!("use another [cdc] replication_slot, or drop it and let init create it: SELECT pg_drop_replication_slot({})", quote_literal(&t.slot)),
        ));
    }
    if same_db != Some(true) {
        return Err(ReplicationError::operator(
            format!(
                "source: slot '{}' belongs to another database than {}",
                t.slot,
                t.source()?.dbname
            ),
            "connect to the slot's database, or create the slot in this one",
        ));
    }
    if slot.get::<_, Option<bool>>(4) == Some(true) {
        return Err(super::invalidated_slot(&t.slot));
    }
    let slot_confirmed: String = slot.get(3);
    let slot_confirmed = slot_confirmed.parse().unwrap_or(Lsn::ZERO);

    let publication = client
        .query_opt("SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1", &[&t.publication])
        .await
        .map_err(src("reading pg_publication"))?;
    let Some(publication) = publication else {
        return Err(ReplicationError::operator(
            format!("source: publication '{}' does not exist", t.publication),
            format!(
                "run `heliosdb-tenant-replication --config <file> init`, or: CREATE PUBLICATION {} FOR TABLE <table> WHERE ({} = {}), …;",
                crate::pg::quote_ident(&t.publication),
                crate::pg::quote_ident(&t.tenant_column),
                quote_literal(&t.tenant_id)
            ),
        ));
    };
    for (i, what) in ["INSERT", "UPDATE", "DELETE"].iter().enumerate() {
        if !publication.get::<_, bool>(i) {
            tracing::warn!(publication = %t.publication, "the publication does not publish {what}: those changes will not be replicated");
        }
    }

    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text, rowfilter FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
            &[&t.publication],
        )
        .await
        .map_err(src("reading pg_publication_tables"))?;
    if rows.is_empty() {
        return Err(ReplicationError::operator(
            format!("source: publication '{}' has no tables", t.publication),
            "run init to add the tables that carry the tenant column, or ALTER PUBLICATION … ADD TABLE …",
        ));
    }
    let literal = quote_literal(&t.tenant_id);
    let mut tables = Vec::new();
    for row in rows {
        let (schema, name, filter): (String, String, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        let table = source_table(client, &schema, &name, &t.tenant_column)
            .await?
            .ok_or_else(|| {
                ReplicationError::Internal(format!("published table {schema}.{name} vanished"))
            })?;
        if !table.has_tenant_column {
            return Err(ReplicationError::operator(
                format!(
                    "source: table {schema}.{name} is in publication '{}' but has no column {}",
                    t.publication, t.tenant_column
                ),
                format!(
                    "drop it from the publication: ALTER PUBLICATION {} DROP TABLE {}",
                    crate::pg::quote_ident(&t.publication),
                    table.qualified()
                ),
            ));
        }
        // Before the filter: a filter written with another form of the id
        // would be reported as missing.
        check_tenant_id_form(client, t, &table).await?;
        let filtered = filter
            .as_deref()
            .is_some_and(|f| f.contains(&t.tenant_column) && f.contains(&literal));
        if !filtered {
            return Err(ReplicationError::operator(
                format!(
                    "source: publication '{}' sends every tenant's rows of {schema}.{name} (row filter: {})",
                    t.publication,
                    filter.as_deref().unwrap_or("none")
                ),
                format!(
                    "ALTER PUBLICATION {} SET TABLE … {} WHERE ({} = {}) — or run init, which builds the filters",
                    crate::pg::quote_ident(&t.publication),
                    table.qualified(),
                    crate::pg::quote_ident(&t.tenant_column),
                    literal
                ),
            ));
        }
        table.check_replica_identity(&t.tenant_column)?;
        tables.push(table);
    }
    // Tables that carry the tenant column but are not published (added
    // later, or left out by hand) would be silent gaps: say so at every start.
    let (candidates, _) = super::tenant_tables(client, t).await?;
    for c in candidates.iter().filter(|c| {
        !tables
            .iter()
            .any(|p| p.schema == c.schema && p.name == c.name)
    }) {
        tracing::warn!(
            table = %c.display(), publication = %t.publication,
            "table has a {} column but is not in the publication: its rows are NOT replicated; run init to add it",
            t.tenant_column
        );
    }
    Ok(SourceReport {
        tables,
        slot_confirmed,
    })
}

/// Every published table exists on the target and can take the source's rows.
/// With `[cdc] schema_changes = "apply"`, columns the target lacks are only
/// reported: they are added when the stream reaches the new definition.
pub async fn check_target(client: &Client, t: &TenantConfig, tables: &[SourceTable]) -> Result<()> {
    let mut problems = Vec::new();
    for table in tables {
        let mut desc = (*table.relation_desc()).clone();
        if t.schema_changes == crate::apply::schema::SchemaChanges::Apply {
            // Columns the target lacks are added when the stream reaches the
            // table's new definition: report them, do not stop.
            let present: Vec<String> = crate::pg::columns(client, &table.schema, &table.name)
                .await
                .map_err(on_target("reading target columns"))?
                .into_iter()
                .map(|(name, _)| name)
                .collect();
            let missing: Vec<String> = desc
                .columns
                .iter()
                .filter(|c| !present.contains(&c.name))
                .map(|c| c.name.clone())
                .collect();
            if !present.is_empty() && !missing.is_empty() {
                tracing::warn!(table = %table.display(), columns = %missing.join(", "),
                    "the target lacks columns the source has; they are added when the source's changes to the table arrive ([cdc] schema_changes = apply)");
                desc.columns.retain(|c| present.contains(&c.name));
            }
        }
        if let Err(e) =
            TableMapping::resolve(client, std::sync::Arc::new(desc), &t.tenant_column).await
        {
            match e {
                ReplicationError::Operator { message, hint } => {
                    problems.push(format!("{message} (fix: {hint})"))
                }
                other => return Err(other),
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ReplicationError::operator(
            format!("target is not ready:\n  - {}", problems.join("\n  - ")),
            "create or fix the target tables listed above, then start again",
        ))
    }
}

/// The source cluster's system identifier.
pub async fn system_id(client: &Client) -> Result<String> {
    Ok(client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(src("reading the system identifier"))?
        .get(0))
}

/// The tenant id as the source writes it in the table's tenant column must
/// be the configured one, character for character: a shared slot routes
/// rows by that text, and a row filter compares the column's type. An id
/// the type reads differently (a uuid in capitals, an integer with leading
/// zeros, a `character(n)` column that pads) would match in the filter and
/// in SQL but never in routing: rows would be lost without a word. Refused
/// with the form to write instead.
pub(super) async fn check_tenant_id_form(
    client: &Client,
    t: &TenantConfig,
    table: &SourceTable,
) -> Result<()> {
    let ty: Option<String> = client
        .query_opt(
            "SELECT format_type(a.atttypid, a.atttypmod)
               FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3 AND NOT a.attisdropped",
            &[&table.schema, &table.name, &t.tenant_column],
        )
        .await
        .map_err(src("reading the tenant column's type"))?
        .map(|r| r.get(0));
    let Some(ty) = ty else {
        return Ok(());
    };
    // The simple protocol answers with the type's output function: the
    // text pgoutput sends for the column.
    let written = client
        .simple_query(&format!(
            "SELECT CAST({} AS {ty})",
            quote_literal(&t.tenant_id)
        ))
        .await;
    let column = format!("{}.{}", table.display(), t.tenant_column);
    let written = match written {
        Ok(messages) => messages.into_iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        }),
        Err(e) => {
            return Err(ReplicationError::operator(
                format!(
                "tenant id '{}' is not a valid {ty}, the type of the tenant column {column}: {}",
                t.tenant_id,
                e.as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| e.to_string())
            ),
                "set [replication] tenant_id to a value of the column's type",
            ))
        }
    };
    match written {
        Some(w) if w != t.tenant_id => Err(ReplicationError::operator(
            format!(
                "tenant id '{}' is written '{w}' by the source in the tenant column {column} ({ty}): rows are told apart by that text",
                t.tenant_id
            ),
            format!("set [replication] tenant_id = {}", quote_literal(&w)),
        )),
        _ => Ok(()),
    }
}
