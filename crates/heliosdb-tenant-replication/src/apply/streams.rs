//! Streamed transactions (pgoutput proto 2): a source transaction larger
//! than the source's `logical_decoding_work_mem` arrives in blocks while it
//! still runs. Each one is applied as it arrives into a target transaction
//! of its own (a "lane": its own connection), so at its source commit only
//! the tail and a COMMIT remain.
//!
//! ```text
//! StreamStart(T) … changes of T and its subtransactions … StreamStop
//!   (other transactions commit in between: they go to the main applier)
//! StreamAbort(T, S)  → ROLLBACK TO SAVEPOINT of S (S and what it contains)
//! StreamAbort(T, T)  → ROLLBACK of the lane
//! StreamCommit(T)    → progress record + COMMIT of the lane
//! ```
//!
//! Rules the callers keep:
//! * Before a lane runs a statement, the main applier holds no open target
//!   transaction (commit it first): a lane waiting for a lock of the main
//!   transaction would wait for the loop that is waiting for the lane.
//! * A subtransaction's savepoint is set before its first change; its rows
//!   are never coalesced with rows before that point (the pending chunk is
//!   written first), so rolling back to it removes exactly what it made.
//!   PostgreSQL sends a subtransaction's abort before any change that
//!   follows it in the WAL, and its nested subtransactions' changes all
//!   come after its savepoint.
//! * A streamed transaction's commit time is unknown until it commits: its
//!   rows are dated by their arrival for conflict resolution.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;

use super::schema::{SourceCatalog, SourceColumn};
use super::{Applier, CommitPoint, Committed};
use crate::capture::TxEvent;
use crate::checkpoint::progress::BatchMark;
use crate::error::{ReplicationError, Result};
use crate::lsn::Lsn;

/// Opens lane number `n` (1, 2, …; the lowest free one): a new [`Applier`]
/// on its own target connection, with replication origin
/// `heliosdb_<tenant>/stream<n>`.
pub type OpenLane =
    Box<dyn Fn(u32) -> Pin<Box<dyn Future<Output = Result<Applier>> + Send>> + Send + Sync>;

struct Lane {
    number: u32,
    applier: Applier,
    /// Subtransactions with a savepoint, in the order they were set, with
    /// the number of conflicts found before each.
    savepoints: Vec<(u32, usize)>,
}

/// The open streamed transactions of one tenant.
pub struct Streams {
    lanes: HashMap<u32, Lane>,
    open: OpenLane,
    converge_until: Lsn,
    /// Apply node: the source definitions the capture node shipped so far
    /// (a lane's catalog starts with them).
    shipped: HashMap<u32, Vec<SourceColumn>>,
    /// Relations whose table the main applier has put triggers on.
    tracked: HashSet<u32>,
}

fn savepoint_name(xid: u32) -> String {
    format!("heliosdb_sub_{xid}")
}

impl Streams {
    pub fn new(open: OpenLane) -> Self {
        Self {
            lanes: HashMap::new(),
            open,
            converge_until: Lsn::ZERO,
            shipped: HashMap::new(),
            tracked: HashSet::new(),
        }
    }

    /// Apply node: source definitions that arrived with a batch, for the
    /// open lanes and the lanes to come.
    pub fn ship(&mut self, columns: &[(u32, Vec<SourceColumn>)]) {
        if columns.is_empty() {
            return;
        }
        self.shipped.extend(columns.iter().cloned());
        for lane in self.lanes.values_mut() {
            if let SourceCatalog::Shipped(map) = lane.applier.source_catalog_mut() {
                map.extend(columns.iter().cloned());
            }
        }
    }

    /// No streamed transaction is open.
    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// See [`Applier::set_converge_until`].
    pub fn set_converge_until(&mut self, lsn: Lsn) {
        self.converge_until = self.converge_until.max(lsn);
    }

    /// Apply one change of streamed transaction `top`, made by `xid`.
    /// `seen` is the latest source position the caller has seen: the
    /// transaction commits after it (conflict detection starts only past
    /// a copy's convergence point).
    pub async fn apply(
        &mut self,
        main: &mut Applier,
        top: u32,
        xid: u32,
        event: TxEvent,
        seen: Lsn,
    ) -> Result<()> {
        // Triggers go in outside the lane (see [`Applier::without_tracking`]),
        // once per relation.
        let relations = match &event {
            TxEvent::Row(change) => std::slice::from_ref(&change.relation),
            TxEvent::Truncate { relations, .. } => relations.as_slice(),
            _ => &[],
        };
        for r in relations {
            if !self.tracked.contains(&r.id) && main.ensure_tracked(r).await? {
                self.tracked.insert(r.id);
            }
        }
        if !self.lanes.contains_key(&top) {
            let number = (1..)
                .find(|n| !self.lanes.values().any(|l| l.number == *n))
                .unwrap_or(1);
            let mut applier = (self.open)(number).await?;
            applier.without_tracking();
            applier.set_converge_until(self.converge_until);
            if let SourceCatalog::Shipped(map) = applier.source_catalog_mut() {
                map.extend(self.shipped.iter().map(|(k, v)| (*k, v.clone())));
            }
            applier.begin(seen, crate::clock::pg_now_us()).await?;
            tracing::debug!(
                xid = top,
                "a streamed transaction opens its own target transaction"
            );
            self.lanes.insert(
                top,
                Lane {
                    number,
                    applier,
                    savepoints: Vec::new(),
                },
            );
        }
        let lane = self
            .lanes
            .get_mut(&top)
            .ok_or_else(|| ReplicationError::Internal("lane vanished".into()))?;
        if xid != top && !lane.savepoints.iter().any(|(x, _)| *x == xid) {
            let mark = lane.applier.savepoint(&savepoint_name(xid)).await?;
            lane.savepoints.push((xid, mark));
        }
        match event {
            TxEvent::Row(change) => lane.applier.row(change).await,
            TxEvent::Truncate { relations, .. } => lane.applier.truncate(&relations).await,
            TxEvent::Version(note) => {
                lane.applier.version(&note);
                Ok(())
            }
            _ => Err(ReplicationError::Internal(
                "a transaction control event inside a streamed change".into(),
            )),
        }
    }

    /// Streamed transaction `top` committed on the source: record the
    /// progress (with the sealed batch it came in, on an apply node) and
    /// commit its lane. `None` when nothing of it was for this tenant (no
    /// lane was opened).
    pub async fn commit(
        &mut self,
        top: u32,
        point: CommitPoint,
        batch: Option<BatchMark>,
    ) -> Result<Option<(CommitPoint, Committed)>> {
        let Some(mut lane) = self.lanes.remove(&top) else {
            return Ok(None);
        };
        lane.applier.source_commit(point);
        if let Some(mark) = batch {
            lane.applier.mark_batch(mark);
        }
        let done = lane.applier.commit().await?;
        Ok(done.map(|p| (p, lane.applier.take_committed())))
    }

    /// `xid` of streamed transaction `top` rolled back (`xid == top`: all of
    /// it).
    pub async fn abort(&mut self, top: u32, xid: u32) -> Result<()> {
        if xid == top {
            if let Some(mut lane) = self.lanes.remove(&top) {
                lane.applier.rollback().await;
                tracing::debug!(
                    xid = top,
                    "a streamed transaction rolled back on the source"
                );
            }
            return Ok(());
        }
        let Some(lane) = self.lanes.get_mut(&top) else {
            return Ok(());
        };
        // A subtransaction none of whose changes reached us has no savepoint.
        let Some(i) = lane.savepoints.iter().position(|(x, _)| *x == xid) else {
            return Ok(());
        };
        let conflicts = lane.savepoints[i].1;
        lane.applier
            .rollback_to(&savepoint_name(xid), conflicts)
            .await?;
        lane.savepoints.truncate(i + 1);
        Ok(())
    }

    /// Abandon every lane (the session ends; the source sends them again).
    pub async fn rollback_all(&mut self) {
        for (_, mut lane) in self.lanes.drain() {
            lane.applier.release().await;
        }
    }
}
