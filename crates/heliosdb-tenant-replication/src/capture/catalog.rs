//! What the source's catalog says about a table.

use std::sync::Arc;

use tokio_postgres::Client;

use super::pgoutput::{ColumnDesc, RelationDesc};
use crate::error::{ReplicationError, Result, Side};
use crate::pg::quote_ident;

/// A source table's replication-relevant facts.
#[derive(Debug, Clone)]
pub struct SourceTable {
    pub schema: String,
    pub name: String,
    pub has_tenant_column: bool,
    /// `d`efault, `n`othing, `f`ull, `i`ndex.
    pub replica_identity: u8,
    pub primary_key: Vec<String>,
    /// Columns of the replica identity index (identity `i`).
    pub identity_index: Vec<String>,
    /// Columns pgoutput sends (not generated, not dropped), in order.
    pub columns: Vec<(String, u32)>,
    pub partitioned: bool,
}

impl SourceTable {
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// Rows are identified by a key (primary key or replica identity
    /// index); without one (`REPLICA IDENTITY FULL` on a table without a
    /// primary key) equal rows cannot be told apart.
    pub fn has_key(&self) -> bool {
        !self.primary_key.is_empty()
            || (self.replica_identity == b'i' && !self.identity_index.is_empty())
    }

    /// A copy that the stream replays changes over (its snapshot is newer
    /// than the slot's position) doubles rows of a table without a key.
    pub fn check_copy_converges(&self, slot: &str) -> Result<()> {
        if self.has_key() {
            return Ok(());
        }
        Err(ReplicationError::operator(
            format!(
                "table {} has no key, and this copy is not under the slot's own snapshot: changes replayed over the copied rows would double them (rows without a key cannot be told apart)",
                self.display()
            ),
            format!(
                "give the table a primary key; or drop the slot (SELECT pg_drop_replication_slot({})) and run init --resync, whose new slot's snapshot makes copy and stream meet exactly",
                crate::pg::quote_literal(slot)
            ),
        ))
    }

    /// The table's own rows on the source, in a query or a publication:
    /// `ONLY` for a plain table (an inheritance parent's children are
    /// tables of their own), the whole tree for a partitioned table (its
    /// partitions are replicated through it).
    pub fn own_rows(&self) -> String {
        if self.partitioned {
            self.qualified()
        } else {
            format!("ONLY {}", self.qualified())
        }
    }

    /// The relation as pgoutput will describe it (for checking the target
    /// before the first row arrives).
    pub fn relation_desc(&self) -> Arc<RelationDesc> {
        let key: &[String] = match self.replica_identity {
            b'i' => &self.identity_index,
            _ => &self.primary_key,
        };
        Arc::new(RelationDesc {
            id: 0,
            namespace: self.schema.clone(),
            name: self.name.clone(),
            replica_identity: self.replica_identity,
            columns: self
                .columns
                .iter()
                .map(|(n, t)| ColumnDesc {
                    is_key: self.replica_identity == b'f' || key.contains(n),
                    name: n.clone(),
                    type_oid: *t,
                    type_modifier: -1,
                })
                .collect(),
        })
    }

    /// PostgreSQL rejects UPDATE and DELETE on a published table whose row
    /// filter uses a column outside the replica identity, and cannot
    /// replicate them without an identity: catch both before they break the
    /// application's writes or the stream.
    pub fn check_replica_identity(&self, tenant_column: &str) -> Result<()> {
        let t = self.display();
        let identity: Vec<String> = match self.replica_identity {
            b'f' => return Ok(()),
            b'n' => {
                return Err(ReplicationError::operator(
                    format!("table {t} has REPLICA IDENTITY NOTHING: its updates and deletes cannot be replicated"),
                    format!("ALTER TABLE {} REPLICA IDENTITY DEFAULT (with a primary key) or REPLICA IDENTITY FULL", self.qualified()),
                ))
            }
            b'i' => self.identity_index.clone(),
            _ => self.primary_key.clone(),
        };
        if identity.is_empty() {
            return Err(ReplicationError::operator(
                format!("table {t} has no primary key: its updates and deletes cannot be replicated"),
                format!("add one (ALTER TABLE {} ADD PRIMARY KEY ({tenant_column}, id)) or set REPLICA IDENTITY FULL", self.qualified()),
            ));
        }
        if !identity.iter().any(|c| c == tenant_column) {
            return Err(ReplicationError::operator(
                format!(
                    "table {t}: column {tenant_column} is not part of the replica identity ({}); PostgreSQL rejects UPDATE and DELETE on the table while a publication filters rows on {tenant_column}",
                    identity.join(", ")
                ),
                format!(
                    "include {tenant_column} in the primary key (e.g. PRIMARY KEY ({tenant_column}, {})), or ALTER TABLE {} REPLICA IDENTITY FULL",
                    identity.join(", "),
                    self.qualified()
                ),
            ));
        }
        Ok(())
    }
}

/// Facts about `schema.name` on the source (`None` if it does not exist).
pub async fn source_table(
    client: &Client,
    schema: &str,
    name: &str,
    tenant_column: &str,
) -> Result<Option<SourceTable>> {
    let row = client
        .query_opt(
            "SELECT c.relreplident::text, c.relkind = 'p',
                    EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = $3
                             AND a.attnum > 0 AND NOT a.attisdropped),
                    coalesce((SELECT array_agg(a.attname::text ORDER BY k)
                                FROM pg_index i, generate_series(0, i.indnkeyatts - 1) k, pg_attribute a
                               WHERE a.attrelid = i.indrelid AND a.attnum = i.indkey[k]
                                 AND i.indrelid = c.oid AND i.indisprimary), '{}'),
                    coalesce((SELECT array_agg(a.attname::text ORDER BY k)
                                FROM pg_index i, generate_series(0, i.indnkeyatts - 1) k, pg_attribute a
                               WHERE a.attrelid = i.indrelid AND a.attnum = i.indkey[k]
                                 AND i.indrelid = c.oid AND i.indisreplident), '{}'),
                    coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum)
                                FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
                                 AND NOT a.attisdropped AND a.attgenerated = ''), '{}'),
                    coalesce((SELECT array_agg(a.atttypid::int8 ORDER BY a.attnum)
                                FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
                                 AND NOT a.attisdropped AND a.attgenerated = ''), '{}')
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &name, &tenant_column],
        )
        .await
        .map_err(|e| ReplicationError::db(Side::Source, format!("reading the definition of {schema}.{name}"), e))?;
    let Some(row) = row else { return Ok(None) };
    let ident: String = row.get(0);
    let names: Vec<String> = row.get(5);
    let types: Vec<i64> = row.get(6);
    Ok(Some(SourceTable {
        schema: schema.to_string(),
        name: name.to_string(),
        replica_identity: ident.bytes().next().unwrap_or(b'd'),
        partitioned: row.get(1),
        has_tenant_column: row.get(2),
        primary_key: row.get(3),
        identity_index: row.get(4),
        columns: names
            .into_iter()
            .zip(types.into_iter().map(|t| t as u32))
            .collect(),
    }))
}
