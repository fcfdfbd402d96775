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

pub mod file;
pub mod progress;

use crate::error::ErrorClass;

/// Checkpoint problems, with the file and the way out.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint file {path} is corrupted ({reason}).\n  fix: the target database holds the real progress, so nothing is lost: remove the file (rm {path}) and restart; it is rewritten after the next commit")]
    Corrupted { path: String, reason: String },
    #[error("cannot write checkpoint file {path}: {reason}.\n  fix: make the directory writable by the daemon's user (e.g. chown heliosdb {dir}) or set [cdc] checkpoint_dir")]
    Write {
        path: String,
        dir: String,
        reason: String,
    },
    #[error("the target's progress for tenant '{tenant}' was written by another source ({what}).\n  fix: if the source really changed (restored or rebuilt), re-copy the tenant; to accept the new source as is, delete its progress row: DELETE FROM heliosdb_replication.progress WHERE tenant_id = '{tenant}'")]
    ForeignProgress { tenant: String, what: String },
}

impl CheckpointError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Write { .. } => ErrorClass::Retry,
            _ => ErrorClass::OperatorAction,
        }
    }
}
