//! From pgoutput messages to [`TxEvent`]s.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::pgoutput::{Message, RelationDesc};
use super::{Announced, RowChange, RowOp, SourceEvent, TxEvent};
use super::{ORIGIN_PREFIX, VERSION_PREFIX};
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
    /// Version notes are passed on for this tenant only (`None`: every
    /// tenant's, for a slot shared by several, routed after).
    tenant: Option<String>,
    /// A Begin not passed on yet: PostgreSQL sends a transaction's Origin
    /// right after its Begin, and a transaction of the daemon's own
    /// appliers is dropped whole.
    begin: Option<TxEvent>,
    /// An event that follows the Begin just returned (see [`Self::take_held`]).
    held: Option<TxEvent>,
    /// Proto 2: the streamed transaction whose block is open.
    stream: Option<u32>,
    /// Streamed transactions written by a daemon's applier (dropped whole).
    foreign_streams: HashSet<u32>,
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
            tenant: Some(tenant.to_string()),
            begin: None,
            held: None,
            stream: None,
            foreign_streams: HashSet::new(),
            skipped_transactions: 0,
        }
    }

    /// An assembler for a slot shared by several tenants: every tenant's
    /// version notes pass (they are routed by the tenant they name), and
    /// nothing is skipped here (each tenant skips what its target has).
    pub fn for_every_tenant() -> Self {
        Self {
            tenant: None,
            ..Self::new(Lsn::ZERO, "")
        }
    }

    /// Turn one source event into zero or one [`TxEvent`].
    pub fn push(&mut self, event: SourceEvent) -> Result<Option<TxEvent>> {
        let msg = match event {
            SourceEvent::Keepalive { wal_end } => {
                return Ok((!self.in_txn).then_some(TxEvent::Keepalive { wal_end }));
            }
            SourceEvent::Message(m) => m,
            SourceEvent::Streamed { xid, message } => return self.streamed(xid, message),
        };
        match msg {
            Message::StreamStart { xid, first_segment } => {
                if self.in_txn || self.stream.is_some() {
                    return Err(protocol("StreamStart inside a transaction or stream block"));
                }
                self.stream = Some(xid);
                if first_segment {
                    self.foreign_streams.remove(&xid);
                }
                Ok(None)
            }
            Message::StreamStop => {
                if self.stream.take().is_none() {
                    return Err(protocol("StreamStop without StreamStart"));
                }
                Ok(None)
            }
            Message::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                commit_time_us,
                ..
            } => {
                self.outside_blocks("StreamCommit")?;
                if self.foreign_streams.remove(&xid) {
                    return Ok(None);
                }
                if !self.applied_commit_lsn.is_zero() && commit_lsn <= self.applied_commit_lsn {
                    // The target has it: whatever was streamed of it goes.
                    self.skipped_transactions += 1;
                    tracing::debug!(%commit_lsn, xid, "dropping a streamed transaction the target already has");
                    return Ok(Some(TxEvent::StreamAbort { top: xid, xid }));
                }
                Ok(Some(TxEvent::StreamCommit {
                    top: xid,
                    commit_lsn,
                    end_lsn,
                    commit_time_us,
                }))
            }
            Message::StreamAbort { xid, subxid } => {
                self.outside_blocks("StreamAbort")?;
                if self.foreign_streams.contains(&xid) {
                    if subxid == xid {
                        self.foreign_streams.remove(&xid);
                    }
                    return Ok(None);
                }
                Ok(Some(TxEvent::StreamAbort {
                    top: xid,
                    xid: subxid,
                }))
            }
            Message::Begin {
                final_lsn,
                commit_time_us,
                xid,
            } => {
                if self.in_txn || self.stream.is_some() {
                    return Err(protocol("Begin inside an open transaction or stream block"));
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
                if let Some(top) = self.stream {
                    if name.starts_with(ORIGIN_PREFIX) {
                        self.foreign_streams.insert(top);
                    }
                    return Ok(None);
                }
                self.require_txn()?;
                if name.starts_with(ORIGIN_PREFIX) && !self.skipping {
                    self.foreign_origin = true;
                    self.begin = None;
                }
                Ok(None)
            }
            m @ Message::LogicalMessage {
                transactional: true,
                ..
            } if is_version_note(&m) => self.change_in_txn(m),
            // Types are resolved on the target by column type.
            Message::Type { .. } | Message::LogicalMessage { .. } => Ok(None),
            m @ (Message::Insert { .. }
            | Message::Update { .. }
            | Message::Delete { .. }
            | Message::Truncate { .. }) => self.change_in_txn(m),
        }
    }

    /// A change of the open (not streamed) transaction.
    fn change_in_txn(&mut self, message: Message) -> Result<Option<TxEvent>> {
        self.require_txn()?;
        if self.skipping || self.foreign_origin {
            return Ok(None);
        }
        Ok(match self.change(message)? {
            Some(event) => self.emit(event),
            None => None,
        })
    }

    /// A row change, truncate or version note as an event (`None` for a
    /// version note of another tenant and for messages that carry no change).
    fn change(&self, message: Message) -> Result<Option<TxEvent>> {
        let (relation_id, op) = match message {
            Message::LogicalMessage {
                transactional: true,
                prefix,
                content,
                ..
            } if prefix == VERSION_PREFIX => {
                // Another tenant's keys never leave for this tenant's target.
                return Ok(match Announced::parse(&content) {
                    Some(a) if self.tenant.as_ref().is_none_or(|t| a.tenant == *t) => {
                        Some(TxEvent::Version(content))
                    }
                    _ => None,
                });
            }
            Message::Truncate {
                cascade,
                restart_identity,
                relation_ids,
            } => {
                return Ok(Some(TxEvent::Truncate {
                    relations: relation_ids
                        .iter()
                        .map(|id| self.relation(*id))
                        .collect::<Result<Vec<_>>>()?,
                    cascade,
                    restart_identity,
                }))
            }
            Message::Insert { relation_id, new } => (relation_id, RowOp::Insert { new }),
            Message::Update {
                relation_id,
                old,
                new,
            } => (
                relation_id,
                RowOp::Update {
                    old: old.map(|(_, t)| t),
                    new,
                },
            ),
            Message::Delete {
                relation_id, old, ..
            } => (relation_id, RowOp::Delete { old }),
            _ => return Ok(None),
        };
        self.checked_row(relation_id, op).map(Some)
    }

    /// A message of stream block `self.stream`, made by `xid`.
    fn streamed(&mut self, xid: u32, message: Message) -> Result<Option<TxEvent>> {
        let Some(top) = self.stream else {
            return Err(protocol("a streamed change outside a stream block"));
        };
        let event = match message {
            Message::Relation(desc) => {
                self.relations.insert(desc.id, Arc::new(desc));
                return Ok(None);
            }
            m @ (Message::Type { .. }
            | Message::LogicalMessage { .. }
            | Message::Insert { .. }
            | Message::Update { .. }
            | Message::Delete { .. }
            | Message::Truncate { .. }) => match self.change(m)? {
                Some(event) => event,
                None => return Ok(None),
            },
            _ => {
                return Err(protocol(
                    "a transaction control message inside a stream block",
                ))
            }
        };
        if self.foreign_streams.contains(&top) {
            return Ok(None);
        }
        Ok(Some(TxEvent::Streamed {
            top,
            xid,
            event: Box::new(event),
        }))
    }

    fn outside_blocks(&self, what: &str) -> Result<()> {
        if self.in_txn || self.stream.is_some() {
            return Err(protocol(&format!(
                "{what} inside a transaction or stream block"
            )));
        }
        Ok(())
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

    /// A row change whose image has the width its relation announced.
    fn checked_row(&self, relation_id: u32, op: RowOp) -> Result<TxEvent> {
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
        Ok(TxEvent::Row(RowChange { relation, op }))
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

/// A transactional logical message announcing a row version.
fn is_version_note(m: &Message) -> bool {
    matches!(m, Message::LogicalMessage { prefix, .. } if prefix == VERSION_PREFIX)
}

fn protocol(what: &str) -> ReplicationError {
    ReplicationError::Internal(format!("replication stream out of order: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::pgoutput::{ColumnDesc, Value};

    fn relation() -> Message {
        Message::Relation(RelationDesc {
            id: 1,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns: vec![ColumnDesc {
                is_key: true,
                name: "id".into(),
                type_oid: 20,
                type_modifier: -1,
            }],
        })
    }

    fn insert() -> Message {
        Message::Insert {
            relation_id: 1,
            new: vec![Value::Text(bytes::Bytes::from_static(b"1"))],
        }
    }

    fn msg(m: Message) -> SourceEvent {
        SourceEvent::Message(m)
    }

    fn streamed(xid: u32, message: Message) -> SourceEvent {
        SourceEvent::Streamed { xid, message }
    }

    fn commit(xid: u32, lsn: u64) -> SourceEvent {
        msg(Message::StreamCommit {
            xid,
            flags: 0,
            commit_lsn: Lsn(lsn),
            end_lsn: Lsn(lsn + 8),
            commit_time_us: 0,
        })
    }

    #[test]
    fn streamed_changes_carry_their_transaction_and_end_with_commit_or_abort() {
        let mut a = Assembler::new(Lsn::ZERO, "t1");
        let start = |first_segment| {
            msg(Message::StreamStart {
                xid: 7,
                first_segment,
            })
        };
        assert!(a.push(start(true)).expect("start").is_none());
        assert!(a.push(streamed(7, relation())).expect("relation").is_none());
        let Some(TxEvent::Streamed { top, xid, event }) =
            a.push(streamed(8, insert())).expect("row")
        else {
            panic!("a streamed row")
        };
        assert_eq!((top, xid), (7, 8));
        assert!(matches!(*event, TxEvent::Row(_)));
        // Commit and abort come between blocks only.
        assert!(a.push(commit(7, 100)).is_err());
        assert!(a.push(msg(Message::StreamStop)).expect("stop").is_none());
        assert!(
            a.push(streamed(8, insert())).is_err(),
            "a change outside a block"
        );
        assert!(matches!(
            a.push(msg(Message::StreamAbort { xid: 7, subxid: 8 }))
                .expect("abort"),
            Some(TxEvent::StreamAbort { top: 7, xid: 8 })
        ));
        assert!(matches!(
            a.push(commit(7, 100)).expect("commit"),
            Some(TxEvent::StreamCommit { top: 7, .. })
        ));
    }

    #[test]
    fn streamed_transactions_of_an_applier_or_already_applied_go_no_further() {
        let mut a = Assembler::new(Lsn(500), "t1");
        // Written by a daemon's applier (active-active): dropped whole.
        a.push(msg(Message::StreamStart {
            xid: 7,
            first_segment: true,
        }))
        .expect("start");
        a.push(msg(Message::Origin {
            commit_lsn: Lsn::ZERO,
            name: format!("{ORIGIN_PREFIX}t1/stream1"),
        }))
        .expect("origin");
        a.push(streamed(7, relation())).expect("relation");
        assert!(a.push(streamed(7, insert())).expect("row").is_none());
        a.push(msg(Message::StreamStop)).expect("stop");
        assert!(a.push(commit(7, 900)).expect("commit").is_none());
        // Committed at or before what the target has: what came is undone.
        a.push(msg(Message::StreamStart {
            xid: 9,
            first_segment: true,
        }))
        .expect("start");
        assert!(a.push(streamed(9, insert())).expect("row").is_some());
        a.push(msg(Message::StreamStop)).expect("stop");
        assert!(matches!(
            a.push(commit(9, 400)).expect("commit"),
            Some(TxEvent::StreamAbort { top: 9, xid: 9 })
        ));
        assert_eq!(a.skipped_transactions, 1);
    }
}
