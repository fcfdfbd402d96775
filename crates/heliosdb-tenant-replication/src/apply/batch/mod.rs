//! Batching: the row changes of one target flush, and how repeated changes
//! to one row coalesce.
//!
//! A [`Chunk`] holds up to `[cdc] batch_size` changes in source order. Its
//! [`Chunk::plan`] reduces them to the final state of each row (per primary
//! key): an upsert of the full row, a delete, or an update of the columns that
//! changed when unchanged TOAST values were not sent. Applying the plans gives
//! the same table contents as applying the changes one by one, because within
//! one target transaction only the final state of each key is visible.
//!
//! Guarantees: per key, the last change wins; no key appears twice in one
//! statement (PostgreSQL's `ON CONFLICT` forbids that). The original order is
//! kept in the chunk for the row-by-row fallback.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::apply::catalog::TableMapping;
use crate::apply::version::Version;
use crate::capture::pgoutput::{Tuple, Value};
use crate::capture::RowOp;
use crate::error::{ReplicationError, Result};

/// A row's primary key values, in text form.
pub type Key = Vec<Bytes>;

/// Changes of one flush, in source order.
#[derive(Debug, Default)]
pub struct Chunk {
    pub ops: Vec<(Arc<TableMapping>, RowOp)>,
    /// Source commit time of each op's transaction (µs, PostgreSQL epoch).
    pub times: Vec<i64>,
    /// The version the source announced for each op (active-active), taken
    /// when the op arrived: a later change of the same row announces its
    /// own, which must not decide this one.
    pub versions: Vec<Option<Version>>,
}

/// The first change to a key in a chunk: what the source expects the
/// target to hold before it (an insert: no row; an update or delete: the
/// row). Conflict detection compares the target with this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstOp {
    Insert,
    Update,
    Delete,
}

/// What one table's rows come to.
#[derive(Debug)]
pub struct TablePlan {
    pub mapping: Arc<TableMapping>,
    pub deletes: Vec<Key>,
    /// The first change of each key in `deletes`.
    pub delete_first: Vec<FirstOp>,
    /// Full rows.
    pub upserts: Vec<Tuple>,
    /// The first change of each row in `upserts`.
    pub upsert_first: Vec<FirstOp>,
    /// Rows with unchanged TOAST columns: update only what was sent.
    pub partial_updates: Vec<Tuple>,
    /// The first change of each row in `partial_updates`.
    pub partial_first: Vec<FirstOp>,
    /// Source commit time of each key's last change, per list.
    pub upsert_time: Vec<i64>,
    pub partial_time: Vec<i64>,
    pub delete_time: Vec<i64>,
    /// The version announced with each key's last change, per list.
    pub upsert_version: Vec<Option<Version>>,
    pub partial_version: Vec<Option<Version>>,
    pub delete_version: Vec<Option<Version>>,
    /// Set by conflict resolution: was each upsert's row on the target?
    /// (Empty: not known.)
    pub upsert_present: Vec<bool>,
}

impl TablePlan {
    pub fn new(mapping: Arc<TableMapping>) -> Self {
        Self {
            mapping,
            deletes: Vec::new(),
            delete_first: Vec::new(),
            upserts: Vec::new(),
            upsert_first: Vec::new(),
            partial_updates: Vec::new(),
            partial_first: Vec::new(),
            upsert_time: Vec::new(),
            partial_time: Vec::new(),
            delete_time: Vec::new(),
            upsert_version: Vec::new(),
            partial_version: Vec::new(),
            delete_version: Vec::new(),
            upsert_present: Vec::new(),
        }
    }
}

enum Final {
    Upsert(Tuple),
    Partial(Tuple),
    Delete(Key),
}

impl Chunk {
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn push(&mut self, mapping: Arc<TableMapping>, op: RowOp) {
        self.push_at(mapping, op, 0);
    }

    /// A change of a source transaction that committed at `time_us`.
    pub fn push_at(&mut self, mapping: Arc<TableMapping>, op: RowOp, time_us: i64) {
        self.push_versioned(mapping, op, time_us, None);
    }

    /// [`Self::push_at`] with the version the source announced for it.
    pub fn push_versioned(
        &mut self,
        mapping: Arc<TableMapping>,
        op: RowOp,
        time_us: i64,
        version: Option<Version>,
    ) {
        self.ops.push((mapping, op));
        self.times.push(time_us);
        self.versions.push(version);
    }

    /// Final state per key, per table in order of first appearance.
    pub fn plan(&self) -> Result<Vec<TablePlan>> {
        let mut tables: Vec<TableState> = Vec::new();
        for (n, (mapping, op)) in self.ops.iter().enumerate() {
            let time = self.times.get(n).copied().unwrap_or(0);
            let version = self.versions.get(n).cloned().flatten();
            let t = match tables.iter().position(|t| Arc::ptr_eq(&t.mapping, mapping)) {
                Some(i) => i,
                None => {
                    tables.push(TableState::new(mapping.clone()));
                    tables.len() - 1
                }
            };
            let table = &mut tables[t];
            match op {
                RowOp::Insert { new } => table.set(
                    key_of(mapping, new)?,
                    Final::Upsert(new.clone()),
                    FirstOp::Insert,
                    (time, version),
                ),
                RowOp::Delete { old } => {
                    let k = key_of(mapping, old)?;
                    table.set(
                        k.clone(),
                        Final::Delete(k),
                        FirstOp::Delete,
                        (time, version),
                    )
                }
                RowOp::Update { old, new } => {
                    let k = key_of(mapping, new)?;
                    if let Some(old) = old {
                        if key_of(mapping, old)? != k {
                            return Err(ReplicationError::Internal(
                                "key-changing update reached the batch planner".into(),
                            ));
                        }
                    }
                    let state = if !has_unchanged(new) {
                        Final::Upsert(new.clone())
                    } else {
                        match table.get(&k) {
                            Some(Final::Upsert(prev)) => Final::Upsert(merge(prev, new)),
                            Some(Final::Partial(prev)) => Final::Partial(merge(prev, new)),
                            _ => Final::Partial(new.clone()),
                        }
                    };
                    table.set(k, state, FirstOp::Update, (time, version))
                }
            }
        }
        Ok(tables.into_iter().map(TableState::into_plan).collect())
    }
}

/// The source commit time and announced version of a key's last change.
type Last = (i64, Option<Version>);

/// The final state of each key of one table, in order of first appearance.
struct TableState {
    mapping: Arc<TableMapping>,
    /// Final state, first change, time and announced version of the last
    /// change (the key is in `index`).
    entries: Vec<(Final, FirstOp, Last)>,
    index: HashMap<Key, usize>,
}

impl TableState {
    fn new(mapping: Arc<TableMapping>) -> Self {
        Self {
            mapping,
            entries: Vec::new(),
            index: HashMap::new(),
        }
    }

    fn get(&self, key: &Key) -> Option<&Final> {
        self.index.get(key).map(|&i| &self.entries[i].0)
    }

    fn set(&mut self, key: Key, state: Final, first: FirstOp, last: Last) {
        match self.index.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let entry = &mut self.entries[*e.get()];
                entry.0 = state;
                entry.2 = last;
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(self.entries.len());
                self.entries.push((state, first, last));
            }
        }
    }

    fn into_plan(self) -> TablePlan {
        let mut plan = TablePlan::new(self.mapping);
        for (state, first, (time, version)) in self.entries {
            match state {
                Final::Upsert(t) => {
                    plan.upserts.push(t);
                    plan.upsert_first.push(first);
                    plan.upsert_time.push(time);
                    plan.upsert_version.push(version);
                }
                Final::Partial(t) => {
                    plan.partial_updates.push(t);
                    plan.partial_first.push(first);
                    plan.partial_time.push(time);
                    plan.partial_version.push(version);
                }
                Final::Delete(k) => {
                    plan.deletes.push(k);
                    plan.delete_first.push(first);
                    plan.delete_time.push(time);
                    plan.delete_version.push(version);
                }
            }
        }
        plan
    }
}

/// Bytes of a change's row values, as the source sent them (the image the
/// change writes, or the key image of a delete).
pub fn row_bytes(op: &RowOp) -> u64 {
    let t = match op {
        RowOp::Insert { new } | RowOp::Update { new, .. } => new,
        RowOp::Delete { old } => old,
    };
    t.iter()
        .map(|v| match v {
            Value::Text(b) | Value::Binary(b) => b.len() as u64,
            _ => 0,
        })
        .sum()
}

/// A key's values as text (lossy for bytes that are not UTF-8, which the
/// text protocol does not send).
pub fn key_texts(key: &Key) -> Vec<String> {
    key.iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect()
}

/// Does the row carry unchanged-TOAST markers?
pub fn has_unchanged(t: &Tuple) -> bool {
    t.iter().any(|v| matches!(v, Value::UnchangedToast))
}

/// `new`, with unchanged-TOAST columns taken from `prev`.
fn merge(prev: &Tuple, new: &Tuple) -> Tuple {
    new.iter()
        .zip(prev)
        .map(|(n, p)| match n {
            Value::UnchangedToast => p.clone(),
            other => other.clone(),
        })
        .collect()
}

/// The primary key of a row image.
pub fn key_of(mapping: &TableMapping, t: &Tuple) -> Result<Key> {
    mapping
        .key
        .iter()
        .map(|&i| match t.get(i) {
            Some(Value::Text(b)) => Ok(b.clone()),
            _ => Err(ReplicationError::operator(
                format!(
                    "a change to {} arrived without a value for primary key column {}",
                    mapping.display,
                    mapping.column_name(i)
                ),
                "the source's replica identity must cover the primary key: ALTER TABLE … REPLICA IDENTITY DEFAULT (with a primary key) or FULL",
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests;
