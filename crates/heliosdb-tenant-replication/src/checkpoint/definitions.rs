//! The replicated columns of each target table as replication made them
//! (`heliosdb_replication.table_definitions`): what a later look at the
//! target compares with to find a table changed outside replication.

use crate::error::{ReplicationError, Result, Side};

/// Record the replicated columns `names` of a target table as they are
/// now, when they changed. Also before any change of the table streamed:
/// the initial copy and resyncs record what they copy into, so a column
/// dropped on the target right after is drift, not a source change to
/// apply again (that would re-add it empty).
pub async fn record_columns(
    target: &impl tokio_postgres::GenericClient,
    tenant: &str,
    (namespace, name): (&str, &str),
    names: &[&str],
) -> Result<()> {
    let row = target
        .query_one(
            "SELECT coalesce(array_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) ORDER BY a.attname), '{}'),
                    (SELECT d.columns FROM heliosdb_replication.table_definitions d
                      WHERE d.tenant_id = $1::text AND d.schema_name = $2::text AND d.table_name = $3::text)
               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $2::text AND c.relname = $3::text AND a.attnum > 0 AND NOT a.attisdropped
                AND a.attname = ANY($4::text[])",
            &[&tenant, &namespace, &name, &names],
        )
        .await
        .map_err(|e| ReplicationError::db(Side::Target, "reading a table definition", e))?;
    let (now, stored): (Vec<String>, Option<Vec<String>>) = (row.get(0), row.get(1));
    if stored.as_ref() == Some(&now) {
        return Ok(());
    }
    target
        .execute(
            "INSERT INTO heliosdb_replication.table_definitions (tenant_id, schema_name, table_name, columns)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant_id, schema_name, table_name) DO UPDATE
                SET columns = EXCLUDED.columns, updated_at = now()",
            &[&tenant, &namespace, &name, &now],
        )
        .await
        .map_err(|e| ReplicationError::db(Side::Target, "recording a table definition", e))?;
    Ok(())
}
