//! What the pipeline reports to telemetry after a target commit: plain
//! values (no types of the stages that produce them).

use std::collections::HashMap;

use serde_json::Value;

/// What one target commit contained (for metrics).
#[derive(Debug, Default, Clone)]
pub struct Committed {
    /// Source commit times (PostgreSQL epoch µs) of the transactions in it.
    pub commit_times_us: Vec<i64>,
    /// Row changes and truncates per table (`schema.table`).
    pub events_by_table: HashMap<String, u64>,
    /// Bytes of row values (as the source sent them).
    pub bytes: u64,
    /// How long the target transaction was open.
    pub duration: std::time::Duration,
    /// Conflicts found (and recorded in the target's conflict log table).
    pub conflicts: Vec<Conflict>,
}

impl Committed {
    /// `n` more events of `table` (allocates the name only the first time).
    pub fn count(&mut self, table: &str, n: u64) {
        match self.events_by_table.get_mut(table) {
            Some(c) => *c += n,
            None => {
                self.events_by_table.insert(table.to_string(), n);
            }
        }
    }

    /// Add what `other` holds (transactions confirmed together later).
    pub fn absorb(&mut self, other: Committed) {
        self.commit_times_us.extend(other.commit_times_us);
        for (table, n) in other.events_by_table {
            *self.events_by_table.entry(table).or_insert(0) += n;
        }
        self.bytes += other.bytes;
        self.conflicts.extend(other.conflicts);
    }
}

/// One detected and resolved conflict, as reported.
#[derive(Debug, Clone)]
pub struct Conflict {
    pub table: String,
    /// The key's columns and text values, as a JSON object.
    pub primary_key: Value,
    /// `insert_exists`, `update_missing`, … (PostgreSQL 18's names).
    pub kind: &'static str,
    pub strategy: &'static str,
    /// `source` (the change was applied) or `target` (the target's state stays).
    pub winner: &'static str,
    /// The change's row (column → text) and the target's row as it was;
    /// `None` for a sensitive table, a delete, or a missing row.
    pub source_row: Option<Value>,
    pub target_row: Option<Value>,
}
