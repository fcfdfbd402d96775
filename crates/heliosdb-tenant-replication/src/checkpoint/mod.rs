//! Checkpoints: where a tenant's replication stands.
//!
//! Exactly-once rule: the truth is the tenant's row in the target's
//! `heliosdb_replication.progress` table ([`progress`]), written in the same
//! target transaction as the data it covers. A crash therefore loses either
//! both the data and its progress or neither, and on start the daemon resumes
//! after the last commit the target holds. The slot's flush position is only
//! ever moved to a position the target has committed.
//!
//! The checkpoint file of §5.2 ([`file`]) mirrors that progress on the
//! daemon's disk for operators and backups. It names the source cluster
//! (system identifier) and slot it belongs to; a file from another source or
//! slot is recognised and never trusted.

pub mod definitions;
pub mod file;
pub mod progress;

pub use crate::error::CheckpointError;
