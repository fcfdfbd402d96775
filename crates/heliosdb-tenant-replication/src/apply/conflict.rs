//! Conflicts: the target did not hold what a source change expected.
//!
//! Per key of a flush, the applier reads whether the target has the row and
//! the row's stored version (see [`super::version`]) in one statement, then
//! [`super::version::decide`] names the kind and the winner by the
//! configured strategy. Kinds follow PostgreSQL 18's names:
//! `insert_exists`, `update_missing`, `update_origin_differs`,
//! `delete_missing`, `delete_origin_differs`, plus `insert_deleted` (an
//! insert met a concurrent delete of its key, which PostgreSQL does not
//! detect). Conflicts are written to
//! `heliosdb_replication.heliosdb_conflict_log` in the same target
//! transaction, with both row images unless the table is listed in
//! `[conflict] sensitive_tables`, and reported to the conflict log file, the
//! metrics and the audit log after it commits.
//!
//! Changes replayed while a copy converges (after `resync`, or a copy made
//! without the slot's exported snapshot) are expected to find rows in any
//! state; detection is off for source transactions up to
//! `progress.converge_until`.

use serde_json::{Map, Value};

use super::catalog::TableMapping;
use super::version::{Strategy, Winner};
use crate::apply::batch::Key;
use crate::capture::pgoutput::{Tuple, Value as TupleValue};

/// What kind of divergence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An insert found a row with its key.
    InsertExists,
    /// An update found no row with its key.
    UpdateMissing,
    /// A delete found no row with its key.
    DeleteMissing,
    /// An update found a row changed by someone other than this stream
    /// since it was last replicated (the change had not seen that write).
    UpdateOriginDiffers,
    /// A delete found such a row.
    DeleteOriginDiffers,
    /// An insert met a concurrent delete of its key on the target.
    InsertDeleted,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::InsertExists => "insert_exists",
            Self::UpdateMissing => "update_missing",
            Self::DeleteMissing => "delete_missing",
            Self::UpdateOriginDiffers => "update_origin_differs",
            Self::DeleteOriginDiffers => "delete_origin_differs",
            Self::InsertDeleted => "insert_deleted",
        }
    }
}

pub use crate::telemetry::Conflict;

/// The report of a conflict on `key` of `m`'s table.
pub fn report(
    m: &TableMapping,
    key: &Key,
    kind: Kind,
    strategy: Strategy,
    winner: Winner,
) -> Conflict {
    let mut pk = Map::new();
    for (k, &i) in m.key.iter().enumerate() {
        let v = key
            .get(k)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default();
        pk.insert(m.column_name(i).to_string(), Value::String(v));
    }
    Conflict {
        table: m.display.clone(),
        primary_key: Value::Object(pk),
        kind: kind.name(),
        strategy: strategy.name(),
        winner: winner.name(),
        source_row: None,
        target_row: None,
    }
}

/// A row image as a JSON object of the columns' text values.
pub fn image(m: &TableMapping, t: &Tuple) -> Value {
    let mut o = Map::new();
    for (i, v) in t.iter().enumerate() {
        let v = match v {
            TupleValue::Null => Value::Null,
            TupleValue::Text(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
            TupleValue::Binary(_) | TupleValue::UnchangedToast => continue,
        };
        o.insert(m.column_name(i).to_string(), v);
    }
    Value::Object(o)
}

/// Record conflicts in the target's conflict log table (inside the apply
/// transaction). Parameters: tenant, then arrays of table, key (jsonb text),
/// kind, strategy, winner, source row, target row (jsonb text or null).
pub const INSERT_SQL: &str = "
INSERT INTO heliosdb_replication.heliosdb_conflict_log
    (tenant_id, table_name, primary_key, conflict_type, resolution_strategy, winner,
     source_row, target_row)
SELECT $1, t, k::jsonb, c, s, w, sr::jsonb, tr::jsonb
  FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[])
       AS v(t, k, c, s, w, sr, tr)";
