//! How a source relation maps onto its target table.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio_postgres::Client;

use crate::capture::pgoutput::RelationDesc;
use crate::error::{ReplicationError, Result, Side};
use crate::pg::{qualified, quote_ident};

/// A source relation matched to its target table, checked once per
/// Relation message (so a changed source definition is checked again).
#[derive(Debug)]
pub struct TableMapping {
    pub relation: Arc<RelationDesc>,
    /// `"schema"."table"` on the target.
    pub target: String,
    /// The table's own rows on the target, for reads, updates and deletes:
    /// `ONLY "schema"."table"` (an inheritance parent's children are tables
    /// of their own), or the whole tree of a partitioned table (`ONLY`
    /// there would silently match nothing).
    pub own_rows: String,
    /// `schema.table`, for messages.
    pub display: String,
    /// Target type of each source column, by source column index, spelled
    /// by its catalog name (`pg_catalog.bpchar`, `pg_catalog."bit"`,
    /// `public._varchar`): a type without a modifier. `format_type` would say
    /// `character` or `bit`, which mean `char(1)` and `bit(1)` in a cast and
    /// cut values; the column's own modifier applies on assignment, as when
    /// PostgreSQL's apply worker stores a value.
    pub casts: Vec<String>,
    /// How each column's value is sent in `COPY … (FORMAT binary)`, when
    /// every column is a built-in type with an encoder and the same type
    /// on both sides; `None`: rows are copied as text.
    pub binary: Option<Vec<crate::apply::binary::Encoder>>,
    /// Source column indices of the key rows are matched by (see
    /// [`apply_key`]); empty for a table without one (rows are found by
    /// their whole old image, one by one).
    pub key: Vec<usize>,
    /// Source column index of the tenant column.
    pub tenant: usize,
}

impl TableMapping {
    /// Look the table up on the target and check it can take the source's rows.
    pub async fn resolve(
        target: &Client,
        relation: Arc<RelationDesc>,
        tenant_column: &str,
    ) -> Result<Self> {
        let display = format!("{}.{}", relation.namespace, relation.name);
        let rows = target
            .query(
                "SELECT a.attname::text, quote_ident(tn.nspname) || '.' || quote_ident(t.typname),
                        a.attgenerated <> '', c.relkind = 'p', t.oid
                   FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                   JOIN pg_type t ON t.oid = a.atttypid
                   JOIN pg_namespace tn ON tn.oid = t.typnamespace
                  WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
                  ORDER BY a.attnum",
                &[&relation.namespace, &relation.name],
            )
            .await
            .map_err(|e| {
                ReplicationError::db(
                    Side::Target,
                    format!("reading the definition of {display}"),
                    e,
                )
            })?;
        if rows.is_empty() {
            return Err(ReplicationError::operator(
                format!("target table {display} does not exist"),
                format!("create it with the source's definition, e.g. pg_dump --schema-only --table='{display}' <source> | psql <target>"),
            ));
        }
        struct Col {
            name: String,
            cast: String,
            generated: bool,
            type_oid: u32,
        }
        let cols: Vec<Col> = rows
            .iter()
            .map(|r| Col {
                name: r.get(0),
                cast: r.get(1),
                generated: r.get(2),
                type_oid: r.get(4),
            })
            .collect();

        let mut casts = Vec::with_capacity(relation.columns.len());
        let mut binary = Some(Vec::with_capacity(relation.columns.len()));
        let mut missing = Vec::new();
        for sc in &relation.columns {
            match cols.iter().find(|c| c.name == sc.name) {
                Some(c) if c.generated => {
                    return Err(ReplicationError::operator(
                        format!("target column {display}.{} is a generated column but the source sends values for it", sc.name),
                        "make the target column a plain column, as on the source",
                    ))
                }
                Some(c) => {
                    casts.push(c.cast.clone());
                    // Built-in types keep their OIDs across clusters: the
                    // same OID is the same type, and its binary form.
                    let encoder = (c.type_oid == sc.type_oid)
                        .then(|| crate::apply::binary::Encoder::for_type(sc.type_oid))
                        .flatten();
                    match (encoder, binary.as_mut()) {
                        (Some(e), Some(all)) => all.push(e),
                        _ => binary = None,
                    }
                }
                None => missing.push(sc.name.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(ReplicationError::operator(
                format!("target table {display} lacks column(s) {} that the source sends", missing.join(", ")),
                format!("add them to the target table (ALTER TABLE {display} ADD COLUMN …) with the source's types"),
            ));
        }
        let key = apply_key(target, &relation, &display).await?;
        let tenant = relation.columns.iter().position(|c| c.name == tenant_column).ok_or_else(|| {
            ReplicationError::operator(
                format!("table {display} has no tenant column '{tenant_column}' but is in the tenant's publication"),
                format!("remove it from the publication (ALTER PUBLICATION … DROP TABLE {display}) or set [cdc] tenant_column"),
            )
        })?;
        let target = qualified(&relation.namespace, &relation.name);
        let own_rows = if rows[0].get::<_, bool>(3) {
            target.clone()
        } else {
            format!("ONLY {target}")
        };
        Ok(Self {
            relation,
            target,
            own_rows,
            display,
            casts,
            binary,
            key,
            tenant,
        })
    }

    pub fn column_name(&self, idx: usize) -> &str {
        &self.relation.columns[idx].name
    }
}

/// Source column indices of the key the target's rows are found by: the
/// source's replica identity (its primary key or `USING INDEX` index, as
/// the Relation message flags them), which the target must back with a
/// unique index for `ON CONFLICT`; with `REPLICA IDENTITY FULL`, the
/// target's primary key or a unique index on non-null columns, or none.
async fn apply_key(target: &Client, relation: &RelationDesc, display: &str) -> Result<Vec<usize>> {
    // Usable arbiters of ON CONFLICT: unique, valid, not deferrable, no
    // expressions, no predicate; key columns only (never INCLUDE columns).
    let indexes: Vec<(Vec<String>, bool)> = target
        .query(
            "SELECT array(SELECT a.attname::text FROM generate_series(0, i.indnkeyatts - 1) k
                            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[k]
                           ORDER BY k),
                    (SELECT bool_and(a.attnotnull) FROM generate_series(0, i.indnkeyatts - 1) k
                       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[k])
               FROM pg_index i
               JOIN pg_class c ON c.oid = i.indrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique AND i.indisvalid
                AND i.indimmediate AND i.indexprs IS NULL AND i.indpred IS NULL
              ORDER BY i.indisprimary DESC, i.indexrelid",
            &[&relation.namespace, &relation.name],
        )
        .await
        .map_err(|e| ReplicationError::db(Side::Target, format!("reading the unique indexes of {display}"), e))?
        .iter()
        .map(|r| (r.get(0), r.get::<_, Option<bool>>(1).unwrap_or(false)))
        .collect();
    let position = |name: &str| relation.columns.iter().position(|c| c.name == name);
    let identity: Vec<usize> = if relation.replica_identity == b'f' {
        Vec::new()
    } else {
        (0..relation.columns.len())
            .filter(|&i| relation.columns[i].is_key)
            .collect()
    };
    if !identity.is_empty() {
        let names: BTreeSet<&str> = identity
            .iter()
            .map(|&i| relation.columns[i].name.as_str())
            .collect();
        let backed = indexes.iter().any(|(cols, _)| {
            cols.len() == names.len() && cols.iter().all(|c| names.contains(c.as_str()))
        });
        if backed {
            return Ok(identity);
        }
        let list = names
            .iter()
            .map(|n| quote_ident(n))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ReplicationError::operator(
            format!(
                "target table {display} has no unique index on ({list}), the source's replica identity: its rows cannot be matched by key"
            ),
            format!("give the target the source's key: CREATE UNIQUE INDEX ON {} ({list})", qualified(&relation.namespace, &relation.name)),
        ));
    }
    // REPLICA IDENTITY FULL (or a source table without a key, which only
    // inserts): any key the target has that the source sends, else none,
    // and rows are found by their whole old image.
    for (cols, not_null) in &indexes {
        if !not_null {
            continue;
        }
        if let Some(key) = cols
            .iter()
            .map(|c| position(c))
            .collect::<Option<Vec<usize>>>()
        {
            return Ok(key);
        }
    }
    Ok(Vec::new())
}
