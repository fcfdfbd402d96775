//! How a source relation maps onto its target table.

use std::sync::Arc;

use tokio_postgres::Client;

use crate::capture::pgoutput::RelationDesc;
use crate::error::{ReplicationError, Result, Side};
use crate::pg::qualified;

/// A source relation matched to its target table, checked once per
/// Relation message (so a changed source definition is checked again).
#[derive(Debug)]
pub struct TableMapping {
    pub relation: Arc<RelationDesc>,
    /// `"schema"."table"` on the target.
    pub target: String,
    /// `schema.table`, for messages.
    pub display: String,
    /// Target type of each source column, by source column index, as
    /// `format_type` spells it without a type modifier (so that values are
    /// checked against the column's modifier on assignment, never truncated
    /// by an explicit cast).
    pub casts: Vec<String>,
    /// Source column indices of the target's primary key, in key order.
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
                "SELECT a.attname::text, format_type(a.atttypid, NULL), a.attgenerated <> '',
                        array_position(i.indkey::int2[], a.attnum)
                   FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                   LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
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
            pk_pos: Option<i32>,
        }
        let cols: Vec<Col> = rows
            .iter()
            .map(|r| Col {
                name: r.get(0),
                cast: r.get(1),
                generated: r.get(2),
                pk_pos: r.get(3),
            })
            .collect();

        let mut casts = Vec::with_capacity(relation.columns.len());
        let mut missing = Vec::new();
        for sc in &relation.columns {
            match cols.iter().find(|c| c.name == sc.name) {
                Some(c) if c.generated => {
                    return Err(ReplicationError::operator(
                        format!("target column {display}.{} is a generated column but the source sends values for it", sc.name),
                        "make the target column a plain column, as on the source",
                    ))
                }
                Some(c) => casts.push(c.cast.clone()),
                None => missing.push(sc.name.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(ReplicationError::operator(
                format!("target table {display} lacks column(s) {} that the source sends", missing.join(", ")),
                format!("add them to the target table (ALTER TABLE {display} ADD COLUMN …) with the source's types"),
            ));
        }
        let mut pk: Vec<(i32, &Col)> = cols
            .iter()
            .filter_map(|c| c.pk_pos.map(|p| (p, c)))
            .collect();
        pk.sort_by_key(|(p, _)| *p);
        if pk.is_empty() {
            return Err(ReplicationError::operator(
                format!("target table {display} has no primary key"),
                format!("add the source's primary key to the target table: ALTER TABLE {display} ADD PRIMARY KEY (…)"),
            ));
        }
        let mut key = Vec::with_capacity(pk.len());
        for (_, c) in pk {
            let idx = relation.columns.iter().position(|sc| sc.name == c.name).ok_or_else(|| {
                ReplicationError::operator(
                    format!("primary key column {display}.{} of the target is not sent by the source", c.name),
                    "give the target table the same primary key as the source",
                )
            })?;
            key.push(idx);
        }
        let tenant = relation.columns.iter().position(|c| c.name == tenant_column).ok_or_else(|| {
            ReplicationError::operator(
                format!("table {display} has no tenant column '{tenant_column}' but is in the tenant's publication"),
                format!("remove it from the publication (ALTER PUBLICATION … DROP TABLE {display}) or set [cdc] tenant_column"),
            )
        })?;
        let target = qualified(&relation.namespace, &relation.name);
        Ok(Self {
            relation,
            target,
            display,
            casts,
            key,
            tenant,
        })
    }

    pub fn column_name(&self, idx: usize) -> &str {
        &self.relation.columns[idx].name
    }
}
