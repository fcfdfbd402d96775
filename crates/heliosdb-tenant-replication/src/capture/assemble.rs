//! From pgoutput messages to [`TxEvent`]s.

use std::collections::HashMap;
use std::sync::Arc;

use super::pgoutput::{Message, RelationDesc};
use super::{Announced, RowChange, RowOp, SourceEvent, TxEvent};
use crate::apply::tracking::{ORIGIN_PREFIX, VERSION_PREFIX};
use crate::error::{ReplicationError, Result};
use crate::lsn::Lsn;

/// Tracks relations and transaction boundaries of one stream.
///
/// Exactly-once rule, part 1: a transaction whose commit LSN is at or below
/// `applied_commit_lsn` (read from the target's progress table at start) is
/// dropped whole, however often the server sends it again.
#[derive(Debug)]
pub struct Assembler {
    relations: HashMap<u32, Arc<RelationDesc>>,
    applied_commit_lsn: Lsn,
    in_txn: bool,
    skipping: bool,
    /// The open transaction was written by a daemon's applier (its origin
    /// starts with `heliosdb_`): its changes are not sent back.
    foreign_origin: bool,
    /// Version notes are passed on for this tenant only.
    tenant: String,
    /// A Begin not passed on yet: PostgreSQL sends a transaction's Origin
    /// right after its Begin, and a transaction of the daemon's own
    /// appliers is dropped whole.
    begin: Option<TxEvent>,
    /// An event that follows the Begin just returned (see [`Self::take_held`]).
    held: Option<TxEvent>,
    /// Transactions dropped as already applied (for logs and tests).
    pub skipped_transactions: u64,
}

impl Assembler {
    pub fn new(applied_commit_lsn: Lsn, tenant: &str) -> Self {
        Self {
            relations: HashMap::new(),
            applied_commit_lsn,
            in_txn: false,
            skipping: false,
            foreign_origin: false,
            tenant: tenant.to_string(),
            begin: None,
            held: None,
            skipped_transactions: 0,
        }
    }

    /// Turn one source event into zero or one [`TxEvent`].
    pub fn push(&mut self, event: SourceEvent) -> Result<Option<TxEvent>> {
        let msg = match event {
            SourceEvent::Keepalive { wal_end } => {
                return Ok((!self.in_txn).then_some(TxEvent::Keepalive { wal_end }));
            }
            SourceEvent::Message(m) => m,
        };
        match msg {
            Message::Begin {
                final_lsn,
                commit_time_us,
                xid,
            } => {
                if self.in_txn {
                    return Err(protocol("Begin inside an open transaction"));
                }
                self.in_txn = true;
                self.skipping =
                    !self.applied_commit_lsn.is_zero() && final_lsn <= self.applied_commit_lsn;
                if self.skipping {
                    self.skipped_transactions += 1;
                    tracing::debug!(%final_lsn, xid, "skipping a transaction the target already has");
                    return Ok(None);
                }
                self.begin = Some(TxEvent::Begin {
                    final_lsn,
                    commit_time_us,
                    xid,
                });
                Ok(None)
            }
            Message::Commit {
                commit_lsn,
                end_lsn,
                commit_time_us,
                ..
            } => {
                if !self.in_txn {
                    return Err(protocol("Commit without Begin"));
                }
                self.in_txn = false;
                if std::mem::take(&mut self.foreign_origin) {
                    return Ok(None);
                }
                if std::mem::take(&mut self.skipping) {
                    return Ok(None);
                }
                Ok(self.emit(TxEvent::Commit {
                    commit_lsn,
                    end_lsn,
                    commit_time_us,
                }))
            }
            Message::Relation(desc) => {
                self.relations.insert(desc.id, Arc::new(desc));
                Ok(None)
            }
            // A change a daemon applied here goes no further (no loops in
            // active-active). Other origins (e.g. PostgreSQL's own
            // subscriptions) pass, as with `origin = any`.
            Message::Origin { name, .. } => {
                self.require_txn()?;
                if name.starts_with(ORIGIN_PREFIX) && !self.skipping {
                    self.foreign_origin = true;
                    self.begin = None;
                }
                Ok(None)
            }
            Message::LogicalMessage {
                transactional: true,
                prefix,
                content,
                ..
            } if prefix == VERSION_PREFIX => {
                self.require_txn()?;
                if self.skipping || self.foreign_origin {
                    return Ok(None);
                }
                // Another tenant's keys never leave for this tenant's target.
                match Announced::parse(&content) {
                    Some(a) if a.tenant == self.tenant => Ok(self.emit(TxEvent::Version(content))),
                    _ => Ok(None),
                }
            }
            // Types are resolved on the target by column type.
            Message::Type { .. } | Message::LogicalMessage { .. } => Ok(None),
            Message::Insert { relation_id, new } => self.row(relation_id, RowOp::Insert { new }),
            Message::Update {
                relation_id,
                old,
                new,
            } => self.row(
                relation_id,
                RowOp::Update {
                    old: old.map(|(_, t)| t),
                    new,
                },
            ),
            Message::Delete {
                relation_id, old, ..
            } => self.row(relation_id, RowOp::Delete { old }),
            Message::Truncate {
                cascade,
                restart_identity,
                relation_ids,
            } => {
                self.require_txn()?;
                if self.skipping || self.foreign_origin {
                    return Ok(None);
                }
                let relations = relation_ids
                    .iter()
                    .map(|id| self.relation(*id))
                    .collect::<Result<Vec<_>>>()?;
                Ok(self.emit(TxEvent::Truncate {
                    relations,
                    cascade,
                    restart_identity,
                }))
            }
        }
    }

    fn require_txn(&self) -> Result<()> {
        if self.in_txn {
            Ok(())
        } else {
            Err(protocol("row change outside a transaction"))
        }
    }

    fn relation(&self, id: u32) -> Result<Arc<RelationDesc>> {
        self.relations.get(&id).cloned().ok_or_else(|| {
            protocol(&format!(
                "change for relation {id} before its Relation message"
            ))
        })
    }

    fn row(&mut self, relation_id: u32, op: RowOp) -> Result<Option<TxEvent>> {
        self.require_txn()?;
        if self.skipping || self.foreign_origin {
            return Ok(None);
        }
        let relation = self.relation(relation_id)?;
        let width = relation.columns.len();
        let ok = match &op {
            RowOp::Insert { new } => new.len() == width,
            RowOp::Update { old, new } => {
                new.len() == width && old.as_ref().is_none_or(|o| o.len() == width)
            }
            RowOp::Delete { old } => old.len() == width,
        };
        if !ok {
            return Err(protocol(&format!(
                "row of {}.{} does not have the {width} columns its Relation message announced",
                relation.namespace, relation.name
            )));
        }
        Ok(self.emit(TxEvent::Row(RowChange { relation, op })))
    }

    /// Pass `event` on, after the transaction's Begin if that is still held.
    fn emit(&mut self, event: TxEvent) -> Option<TxEvent> {
        match self.begin.take() {
            Some(begin) => {
                self.held = Some(event);
                Some(begin)
            }
            None => Some(event),
        }
    }

    /// The event to pass on after the one [`Self::push`] just returned.
    pub fn take_held(&mut self) -> Option<TxEvent> {
        self.held.take()
    }
}

fn protocol(what: &str) -> ReplicationError {
    ReplicationError::Internal(format!("replication stream out of order: {what}"))
}
