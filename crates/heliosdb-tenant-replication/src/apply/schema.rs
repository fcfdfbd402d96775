//! Schema changes: keep the target table in step with the source relation.
//!
//! pgoutput sends a Relation message before the first change that uses a
//! new table definition. When it differs from the target table, and
//! `[cdc] schema_changes = "apply"`, the change is applied to the target in
//! the open target transaction, before the rows that need it:
//!
//! | on the source | on the target |
//! |---|---|
//! | `ADD COLUMN c t` | `ADD COLUMN c t` |
//! | `ADD COLUMN c t DEFAULT k` (existing rows get `k`) | `ADD COLUMN c t DEFAULT <the value the source stored for existing rows>`, then `DROP DEFAULT` |
//! | `ADD COLUMN c t DEFAULT volatile()` (table rewritten) | `ADD COLUMN`, and a resync of the table (the rows' values are unknowable from the stream) |
//! | `RENAME COLUMN a TO b` | `RENAME COLUMN a TO b` (seen within a session: same position, same type) |
//! | `DROP COLUMN c` | `DROP COLUMN c` (seen within a session) |
//! | `ALTER COLUMN c TYPE t` | `ALTER COLUMN c TYPE t USING c::t` |
//!
//! Anything ambiguous (a column missing on the target while the target has a
//! column the source no longer sends, after a restart: a rename or a drop and
//! an add?) stops the tenant with the table, the change and the fix, as does
//! every change under `"halt"`. Wrong data is never written.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::capture::pgoutput::RelationDesc;
use crate::error::{ReplicationError, Result, Side};
use crate::pg::{qualified, quote_ident, quote_literal};

pub use crate::config::SchemaChanges;

/// A column as the source's catalog describes it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceColumn {
    pub name: String,
    pub type_name: String,
    /// The value rows that existed when the column was added got.
    pub missing_value: Option<String>,
    pub has_default: bool,
}

/// Where a table's current definition on the source comes from when its
/// relation changes.
pub enum SourceCatalog {
    /// Ask the source (capture and apply in one process).
    Live(Client),
    /// Sent by the capture node with each relation (an apply node has no
    /// source connection), by relation id.
    Shipped(HashMap<u32, Vec<SourceColumn>>),
}

/// What reconciling did.
#[derive(Debug, Default)]
pub struct Reconciled {
    pub actions: Vec<String>,
    /// Existing rows' values of an added column are unknown: re-copy the table.
    pub needs_resync: bool,
}

pub async fn source_columns(
    source: &SourceCatalog,
    rel: &RelationDesc,
) -> Result<Vec<SourceColumn>> {
    match source {
        SourceCatalog::Live(client) => {
            describe_source_table(client, (&rel.namespace, &rel.name)).await
        }
        SourceCatalog::Shipped(map) => map.get(&rel.id).cloned().ok_or_else(|| {
            ReplicationError::Internal(format!(
                "the capture node sent no source definition of {}.{}",
                rel.namespace, rel.name
            ))
        }),
    }
}

/// The source catalog's columns of `rel` (the capture node ships them).
pub async fn describe_source_table(
    source: &Client,
    (namespace, name): (&str, &str),
) -> Result<Vec<SourceColumn>> {
    let rows = source
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                    CASE WHEN a.atthasmissing THEN (a.attmissingval::text::text[])[1] END, a.atthasdef
               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&namespace, &name],
        )
        .await
        .map_err(|e| ReplicationError::db(Side::Source, "reading a changed table definition", e))?;
    Ok(rows
        .iter()
        .map(|r| SourceColumn {
            name: r.get(0),
            type_name: r.get(1),
            missing_value: r.get(2),
            has_default: r.get(3),
        })
        .collect())
}

/// Bring the target table in line with `rel` (the previous definition seen
/// in this session, if any, tells renames and drops apart), after checking
/// the target was not changed outside replication ([`check_drift`]). Runs
/// inside the open target transaction.
pub async fn reconcile(
    target: &Client,
    tenant: &str,
    source: &SourceCatalog,
    rel: &RelationDesc,
    previous: Option<&RelationDesc>,
    mode: SchemaChanges,
) -> Result<Reconciled> {
    let tgt = crate::pg::columns(target, &rel.namespace, &rel.name)
        .await
        .map_err(|e| {
            ReplicationError::db(Side::Target, "reading the target table definition", e)
        })?;
    if tgt.is_empty() {
        return Ok(Reconciled::default()); // missing table: reported by the mapping check
    }
    let display = format!("{}.{}", rel.namespace, rel.name);
    let table = qualified(&rel.namespace, &rel.name);
    let has = |n: &str| tgt.iter().any(|(t, _)| t == n);
    let sends = |n: &str| rel.columns.iter().any(|c| c.name == n);

    // Renames and drops, recognised against the previous definition.
    let mut renames: Vec<(String, String)> = Vec::new();
    let mut drops: Vec<String> = Vec::new();
    if let Some(prev) = previous {
        if prev.columns.len() == rel.columns.len() {
            for (p, n) in prev.columns.iter().zip(&rel.columns) {
                if p.name != n.name
                    && p.type_oid == n.type_oid
                    && has(&p.name)
                    && !has(&n.name)
                    && !sends(&p.name)
                {
                    renames.push((p.name.clone(), n.name.clone()));
                }
            }
        }
        for p in &prev.columns {
            if !sends(&p.name) && has(&p.name) && !renames.iter().any(|(o, _)| *o == p.name) {
                drops.push(p.name.clone());
            }
        }
    }
    let added: Vec<&str> = rel
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .filter(|n| !has(n) && !renames.iter().any(|(_, new)| new == n))
        .collect();

    let src = source_columns(source, rel).await?;
    check_drift(target, tenant, (&rel.namespace, &rel.name), &src).await?;
    let src_col = |n: &str| src.iter().find(|c| c.name == n);
    let mut retyped: Vec<(String, String)> = Vec::new();
    for c in &rel.columns {
        let renamed_from = renames
            .iter()
            .find(|(_, new)| *new == c.name)
            .map(|(old, _)| old.as_str());
        let on_target = tgt
            .iter()
            .find(|(t, _)| t == renamed_from.unwrap_or(&c.name));
        if let (Some((_, tt)), Some(sc)) = (on_target, src_col(&c.name)) {
            if *tt != sc.type_name {
                retyped.push((c.name.clone(), sc.type_name.clone()));
            }
        }
    }
    // Columns the target has that the source does not send (and that no
    // rename explains): dropped on the source, before this session saw it?
    let orphans: Vec<String> = tgt
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| !sends(n) && !drops.contains(n) && !renames.iter().any(|(o, _)| o == n))
        .collect();
    let strict_orphans = mode == SchemaChanges::Halt && !orphans.is_empty();
    if renames.is_empty()
        && drops.is_empty()
        && added.is_empty()
        && retyped.is_empty()
        && !strict_orphans
    {
        return Ok(Reconciled::default());
    }

    let describe = || {
        let mut parts = Vec::new();
        for (o, n) in &renames {
            parts.push(format!("column {o} renamed to {n}"));
        }
        for d in &drops {
            parts.push(format!("column {d} dropped"));
        }
        for a in &added {
            parts.push(format!(
                "column {a} added ({})",
                src_col(a).map(|c| c.type_name.as_str()).unwrap_or("?")
            ));
        }
        for (c, t) in &retyped {
            parts.push(format!("column {c} changed to type {t}"));
        }
        if mode == SchemaChanges::Halt {
            for o in &orphans {
                parts.push(format!(
                    "column {o} is no longer sent by the source (dropped or renamed there)"
                ));
            }
        }
        parts.join("; ")
    };
    if mode == SchemaChanges::Halt {
        return Err(ReplicationError::operator(
            format!("schema change on the source, table {display}: {}", describe()),
            format!("apply the same change to the target table {display} and restart, or set [cdc] schema_changes = \"apply\""),
        ));
    }
    // A column the target has but the source no longer sends, with no earlier
    // definition to compare: renamed or dropped? Do not guess.
    if previous.is_none() && !added.is_empty() && !orphans.is_empty() {
        return Err(ReplicationError::operator(
            format!(
                "table {display}: the source sends column(s) {} that the target lacks, and no longer sends {} that the target has: renamed, or dropped and added?",
                added.join(", "),
                orphans.join(", ")
            ),
            format!("make the target table {display} match the source by hand (ALTER TABLE … RENAME COLUMN, or ADD/DROP COLUMN), then restart"),
        ));
    }

    let mut done = Reconciled::default();
    let mut run = |sql: String| {
        done.actions.push(sql.clone());
        sql
    };
    let mut statements = Vec::new();
    for (o, n) in &renames {
        statements.push(run(format!(
            "ALTER TABLE {table} RENAME COLUMN {} TO {}",
            quote_ident(o),
            quote_ident(n)
        )));
    }
    for a in &added {
        let sc = src_col(a).ok_or_else(|| {
            ReplicationError::operator(
                format!("table {display}: column {a} appears in the stream but no longer exists on the source"),
                format!("add it to the target table {display} by hand with the type it had, then restart"),
            )
        })?;
        let col = quote_ident(a);
        match &sc.missing_value {
            Some(v) => {
                statements.push(run(format!(
                    "ALTER TABLE {table} ADD COLUMN {col} {} DEFAULT {}::{}",
                    sc.type_name,
                    quote_literal(v),
                    sc.type_name
                )));
                statements.push(run(format!(
                    "ALTER TABLE {table} ALTER COLUMN {col} DROP DEFAULT"
                )));
            }
            None => {
                statements.push(run(format!(
                    "ALTER TABLE {table} ADD COLUMN {col} {}",
                    sc.type_name
                )));
                if sc.has_default {
                    // A volatile default rewrote the table: values unknown.
                    done.needs_resync = true;
                }
            }
        }
    }
    for d in &drops {
        statements.push(run(format!(
            "ALTER TABLE {table} DROP COLUMN {}",
            quote_ident(d)
        )));
    }
    for (c, t) in &retyped {
        let col = quote_ident(c);
        statements.push(run(format!(
            "ALTER TABLE {table} ALTER COLUMN {col} TYPE {t} USING {col}::{t}"
        )));
    }
    for sql in statements {
        target.batch_execute(&sql).await.map_err(|e| {
            ReplicationError::db(
                Side::Target,
                format!("applying a schema change to {display} ({sql})"),
                e,
            )
        })?;
    }
    let summary = describe();
    tracing::info!(table = %rel.name, schema = %rel.namespace, changes = %summary, "schema change applied to the target");
    Ok(done)
}

/// Record the replicated columns of `rel`'s target table as they are now
/// (after [`reconcile`]), in the open target transaction. Written only when
/// they changed: an upsert locks the row even when it changes nothing, and a
/// streamed transaction's lane holds its locks until the source commits.
pub async fn record_definition(target: &Client, tenant: &str, rel: &RelationDesc) -> Result<()> {
    let names: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
    crate::checkpoint::definitions::record_columns(
        target,
        tenant,
        (&rel.namespace, &rel.name),
        &names,
    )
    .await
}

/// Tables of the tenant whose target definition lost a column replication
/// made, or changed its type, since it was recorded: `(schema, table)`.
pub async fn drifted_tables(target: &Client, tenant: &str) -> Result<Vec<(String, String)>> {
    Ok(target
        .query(
            "SELECT d.schema_name, d.table_name FROM heliosdb_replication.table_definitions d
              WHERE d.tenant_id = $1
                AND NOT d.columns <@ ARRAY(
                    SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                      FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                      JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = d.schema_name AND c.relname = d.table_name
                       AND a.attnum > 0 AND NOT a.attisdropped)",
            &[&tenant],
        )
        .await
        .map_err(|e| ReplicationError::db(Side::Target, "checking table definitions", e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The target table of `rel` must still have every column replication made,
/// with the type it made (a column dropped on the target would be added
/// back empty; a narrowed type rounds or cuts values). A difference that
/// the source's own definition explains (its change applied to the target
/// by hand, under `schema_changes = "halt"`) is not drift.
pub async fn check_drift(
    target: &Client,
    tenant: &str,
    (namespace, name): (&str, &str),
    src: &[SourceColumn],
) -> Result<()> {
    let stored: Option<Vec<String>> = target
        .query_opt(
            "SELECT columns FROM heliosdb_replication.table_definitions
              WHERE tenant_id = $1 AND schema_name = $2 AND table_name = $3",
            &[&tenant, &namespace, &name],
        )
        .await
        .map_err(|e| ReplicationError::db(Side::Target, "reading a recorded table definition", e))?
        .map(|r| r.get(0));
    let Some(stored) = stored else {
        return Ok(());
    };
    let current = crate::pg::columns(target, namespace, name)
        .await
        .map_err(|e| {
            ReplicationError::db(Side::Target, "reading the target table definition", e)
        })?;
    let table = qualified(namespace, name);
    let (mut found, mut fixes) = (Vec::new(), Vec::new());
    for entry in &stored {
        let Some((column, made)) = entry.split_once(' ') else {
            continue;
        };
        let now = current
            .iter()
            .find(|(n, _)| n == column)
            .map(|(_, t)| t.as_str());
        let source_type = src
            .iter()
            .find(|c| c.name == column)
            .map(|c| c.type_name.as_str());
        let col = quote_ident(column);
        match now {
            // Dropped on the source too: the hand-applied change.
            None if source_type.is_none() => {}
            None => {
                found.push(format!("column {column} ({made}) was dropped"));
                fixes.push(format!("ALTER TABLE {table} ADD COLUMN {col} {made}"));
            }
            Some(t) if t == made || Some(t) == source_type => {}
            Some(t) => {
                found.push(format!(
                    "column {column} is {t}, replication made it {made}"
                ));
                fixes.push(format!(
                    "ALTER TABLE {table} ALTER COLUMN {col} TYPE {made}"
                ));
            }
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    let display = format!("{namespace}.{name}");
    Err(ReplicationError::operator(
        format!(
            "target table {display} was changed outside replication: {} (its rows may no longer equal the source's)",
            found.join("; ")
        ),
        format!(
            "restore it ({}), then copy its rows again: heliosdb-tenant-replication --config <file> resync --table {display}",
            fixes.join("; ")
        ),
    ))
}
