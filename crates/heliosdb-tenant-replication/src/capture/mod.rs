//! Capture: the tenant's changes from the source's logical replication slot.
//!
//! ```text
//! slot (pgoutput) ──► ChangeSource ──► Assembler ──► TxEvent queue ──► apply
//! ```
//!
//! * [`ChangeSource`] is the replication connection, behind a trait of ours
//!   so that the protocol client can be replaced (see
//!   `docs/decisions/2026-11-26-replication-client.md`). The implementation,
//!   [`stream::PgwireSource`], answers keepalives from a background task, so
//!   a slow target never makes the walsender time out.
//! * [`pgoutput`] decodes the raw messages (outside bytes: never panics).
//! * [`assemble::Assembler`] resolves relations, drops transactions the target
//!   already has, and emits [`TxEvent`]s in commit order.
//!
//! Guarantees: events reach apply in source commit order, each transaction
//! whole (Begin … Commit) or not at all. The queue to apply is bounded
//! (`[performance] buffer_size_events`): when it is full, capture waits, and
//! back-pressure reaches the walsender instead of memory.

pub mod assemble;
pub mod catalog;
pub mod pgoutput;
pub mod stream;
pub mod walsender;

use std::sync::Arc;

use crate::error::Result;
use crate::lsn::Lsn;
use pgoutput::{Message, RelationDesc, Tuple};

/// Prefix of the logical decoding messages that carry a row's version
/// (written by the version triggers the daemon installs).
pub const VERSION_PREFIX: &str = "heliosdb_version";

/// Replication origins the daemon tags its writes with start with this:
/// changes under them are its own and are not captured again.
pub const ORIGIN_PREFIX: &str = "heliosdb_";

/// What the replication connection delivers.
#[derive(Debug)]
pub enum SourceEvent {
    Message(Message),
    /// Proto 2: a message inside a stream block, made by (sub)transaction
    /// `xid` of the streamed transaction.
    Streamed {
        xid: u32,
        message: Message,
    },
    /// The server's periodic heartbeat; `wal_end` is how far it has sent.
    Keepalive {
        wal_end: Lsn,
    },
}

/// A logical replication connection for one slot.
#[allow(async_fn_in_trait)]
pub trait ChangeSource: Send {
    /// The next event; `Ok(None)` when the stream ended cleanly.
    async fn recv(&mut self) -> Result<Option<SourceEvent>>;
    /// Tell the server that everything up to `lsn` is durable on the target,
    /// so the slot may release WAL before it. Must never pass what the target
    /// has committed.
    fn acknowledge(&self, lsn: Lsn);
    /// Send the last acknowledgement (waiting briefly for it to go out) and
    /// close the stream.
    async fn close(&mut self);
}

/// A row change, with the relation as it was when the change was made.
#[derive(Debug, Clone)]
pub struct RowChange {
    pub relation: Arc<RelationDesc>,
    pub op: RowOp,
}

#[derive(Debug, Clone)]
pub enum RowOp {
    Insert {
        new: Tuple,
    },
    /// `old` is the key (or full) image when the key changed or the table is
    /// REPLICA IDENTITY FULL.
    Update {
        old: Option<Tuple>,
        new: Tuple,
    },
    Delete {
        old: Tuple,
    },
}

/// What apply receives, in source commit order.
#[derive(Debug, Clone)]
pub enum TxEvent {
    Begin {
        final_lsn: Lsn,
        commit_time_us: i64,
        xid: u32,
    },
    Row(RowChange),
    /// The version of a row change that follows in the same transaction,
    /// announced by the source's version trigger (active-active; see
    /// `apply::tracking`). The body is the message as the source wrote it.
    Version(bytes::Bytes),
    Truncate {
        relations: Vec<Arc<RelationDesc>>,
        cascade: bool,
        restart_identity: bool,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time_us: i64,
    },
    /// A change of transaction `top` made before it committed (proto 2
    /// streaming of large transactions), by `top` itself or by its
    /// subtransaction `xid`. Wraps a `Row`, `Truncate` or `Version`; applied
    /// into a target transaction of its own that commits at `StreamCommit`.
    Streamed {
        top: u32,
        xid: u32,
        event: Box<TxEvent>,
    },
    /// Streamed transaction `top` committed on the source.
    StreamCommit {
        top: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time_us: i64,
    },
    /// Streamed transaction `top` (`xid == top`) or its subtransaction `xid`
    /// rolled back: its changes (and those of its subtransactions) go.
    StreamAbort {
        top: u32,
        xid: u32,
    },
    /// Between transactions: the server has sent everything up to `wal_end`.
    /// When apply has nothing uncommitted it may acknowledge this position, so
    /// an idle tenant's slot does not hold WAL back.
    Keepalive {
        wal_end: Lsn,
    },
}

/// A row version a source's trigger announced (`pg_logical_emit_message`
/// with prefix `heliosdb_version`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Announced {
    pub tenant: String,
    pub table: String,
    pub pk: Vec<String>,
    pub node: String,
    pub vclock: std::collections::BTreeMap<String, u64>,
    pub deleted: bool,
}

impl Announced {
    /// Parse a message body (outside bytes: `None`, never a panic).
    pub fn parse(content: &[u8]) -> Option<Self> {
        serde_json::from_slice(content).ok()
    }
}
