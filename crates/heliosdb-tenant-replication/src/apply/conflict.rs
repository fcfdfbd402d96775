//! Conflicts: the target did not hold what a source change expected.
//!
//! The first change to a key within a chunk says what the source had before
//! it: an insert, no row; an update or a delete, the row. The apply
//! statements return the keys they touched (and whether an upsert inserted),
//! so the target's state is known without an extra query. Kinds follow
//! PostgreSQL 18's names. Resolution today is `SourcePreferred`: the source's
//! change is applied (an update of a missing row inserts the full row when
//! the change carries it). Conflicts are written to
//! `heliosdb_replication.heliosdb_conflict_log` in the same target
//! transaction, and reported to the conflict log file, the metrics and the
//! audit log after it commits.
//!
//! Changes replayed while a copy converges (after `resync`, or a copy made
//! without the slot's exported snapshot) are expected to find rows in any
//! state; detection is off for source transactions up to
//! `progress.converge_until`.

use serde_json::{Map, Value};

use super::catalog::TableMapping;
use crate::batch::Key;

/// What kind of divergence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An insert found a row with its key.
    InsertExists,
    /// An update found no row with its key.
    UpdateMissing,
    /// A delete found no row with its key.
    DeleteMissing,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::InsertExists => "insert_exists",
            Self::UpdateMissing => "update_missing",
            Self::DeleteMissing => "delete_missing",
        }
    }
}

/// One detected and resolved conflict. Carries the primary key, never the
/// row's other values.
#[derive(Debug, Clone)]
pub struct Conflict {
    pub table: String,
    pub primary_key: Value,
    pub kind: Kind,
    pub strategy: &'static str,
    /// `source` (the change was applied) or `target` (the target's state stays).
    pub winner: &'static str,
}

impl Conflict {
    pub fn new(m: &TableMapping, key: &Key, kind: Kind, winner: &'static str) -> Self {
        let mut pk = Map::new();
        for (k, &i) in m.key.iter().enumerate() {
            let v = key
                .get(k)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            pk.insert(m.column_name(i).to_string(), Value::String(v));
        }
        Self {
            table: m.display.clone(),
            primary_key: Value::Object(pk),
            kind,
            strategy: "SourcePreferred",
            winner,
        }
    }
}

/// The key of a row a statement returned (its first `n` text columns from `from`).
pub fn returned_key(row: &tokio_postgres::Row, from: usize, n: usize) -> Vec<&str> {
    (from..from + n)
        .map(|i| row.get::<_, Option<&str>>(i).unwrap_or_default())
        .collect()
}

/// A key as text, for comparing with returned keys (borrowed, no copy).
pub fn key_text(key: &Key) -> Vec<&str> {
    key.iter()
        .map(|b| std::str::from_utf8(b).unwrap_or_default())
        .collect()
}

/// Record conflicts in the target's conflict log table (inside the apply
/// transaction). Parameters: tenant, then arrays of table, key (jsonb text),
/// kind, strategy, winner.
pub const INSERT_SQL: &str = "
INSERT INTO heliosdb_replication.heliosdb_conflict_log
    (tenant_id, table_name, primary_key, conflict_type, resolution_strategy, winner)
SELECT $1, t, k::jsonb, c, s, w
  FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) AS v(t, k, c, s, w)";
