//! The checkpoint file of §5.2:
//! `/var/lib/heliosdb/checkpoints/<tenant>.checkpoint` holding
//! `{"tenant_id":"tenant-123","lsn":987654321,"timestamp":"2025-11-02T14:30:00Z"}`
//! plus the source cluster and slot it belongs to. Written atomically
//! (temporary file, fsync, rename, fsync of the directory).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CheckpointError;
use crate::lsn::Lsn;

/// The file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub tenant_id: String,
    /// End LSN of the last applied source commit, as a number.
    pub lsn: u64,
    /// RFC 3339, UTC.
    pub timestamp: String,
    /// The same LSN in PostgreSQL's text form, for people.
    #[serde(default)]
    pub lsn_text: Option<String>,
    /// The source cluster's system identifier.
    #[serde(default)]
    pub source_system_id: Option<String>,
    #[serde(default)]
    pub slot_name: Option<String>,
}

/// What start-up made of an existing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileState {
    Missing,
    /// Belongs to this source and slot.
    Valid(CheckpointRecord),
    /// Left by another source cluster or slot: ignored and overwritten.
    Foreign {
        reason: String,
    },
}

/// The checkpoint file of one tenant.
#[derive(Debug, Clone)]
pub struct CheckpointFile {
    path: PathBuf,
    dir: PathBuf,
}

impl CheckpointFile {
    pub fn new(dir: &Path, tenant: &str) -> Self {
        Self {
            path: dir.join(format!("{tenant}.checkpoint")),
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read and check the file. A file that cannot be parsed is an error
    /// naming the file and the way out; one of another source is reported.
    pub fn inspect(
        &self,
        tenant: &str,
        system_id: &str,
        slot: &str,
    ) -> Result<FileState, CheckpointError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileState::Missing),
            Err(e) => return Err(self.corrupted(e.to_string())),
        };
        let rec: CheckpointRecord = serde_json::from_str(&text)
            .map_err(|e| self.corrupted(format!("not the checkpoint JSON: {e}")))?;
        if rec.tenant_id != tenant {
            return Err(self.corrupted(format!("it is for tenant '{}'", rec.tenant_id)));
        }
        match (&rec.source_system_id, &rec.slot_name) {
            (Some(sys), _) if sys != system_id => Ok(FileState::Foreign {
                reason: format!("written for source system {sys}, this source is {system_id}"),
            }),
            (_, Some(s)) if s != slot => Ok(FileState::Foreign {
                reason: format!("written for slot '{s}', configured slot is '{slot}'"),
            }),
            (None, _) => Ok(FileState::Foreign {
                reason: "it does not name its source cluster".into(),
            }),
            _ => Ok(FileState::Valid(rec)),
        }
    }

    /// Write atomically.
    pub fn write(
        &self,
        tenant: &str,
        lsn: Lsn,
        system_id: &str,
        slot: &str,
    ) -> Result<(), CheckpointError> {
        let rec = CheckpointRecord {
            tenant_id: tenant.to_string(),
            lsn: lsn.0,
            timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            lsn_text: Some(lsn.to_string()),
            source_system_id: Some(system_id.to_string()),
            slot_name: Some(slot.to_string()),
        };
        let mut json = serde_json::to_vec(&rec).map_err(|e| self.write_err(e.to_string()))?;
        json.push(b'\n');
        std::fs::create_dir_all(&self.dir).map_err(|e| self.write_err(e.to_string()))?;
        let tmp = self.path.with_extension("checkpoint.tmp");
        crate::files::replace(&self.path, &tmp, &json).map_err(|e| self.write_err(e.to_string()))
    }

    fn corrupted(&self, reason: String) -> CheckpointError {
        CheckpointError::Corrupted {
            path: self.path.display().to_string(),
            reason,
        }
    }

    fn write_err(&self, reason: String) -> CheckpointError {
        CheckpointError::Write {
            path: self.path.display().to_string(),
            dir: self.dir.display().to_string(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_the_guide_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = CheckpointFile::new(dir.path(), "tenant-123");
        assert_eq!(
            f.inspect("tenant-123", "1", "s").expect("missing"),
            FileState::Missing
        );
        f.write("tenant-123", Lsn(987_654_321), "7301", "tenant_123_slot")
            .expect("write");
        let text = std::fs::read_to_string(dir.path().join("tenant-123.checkpoint")).expect("read");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["tenant_id"], "tenant-123");
        assert_eq!(v["lsn"], 987_654_321u64);
        assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
        match f
            .inspect("tenant-123", "7301", "tenant_123_slot")
            .expect("valid")
        {
            FileState::Valid(r) => assert_eq!(r.lsn, 987_654_321),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            f.inspect("tenant-123", "9999", "tenant_123_slot"),
            Ok(FileState::Foreign { .. })
        ));
        assert!(matches!(
            f.inspect("tenant-123", "7301", "other_slot"),
            Ok(FileState::Foreign { .. })
        ));
    }

    #[test]
    fn a_corrupted_file_names_itself_and_the_recovery() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = CheckpointFile::new(dir.path(), "t");
        std::fs::write(f.path(), b"{\"tenant_id\":\"t\",\"lsn\":").expect("write");
        let e = f.inspect("t", "1", "s").expect_err("corrupted").to_string();
        assert!(e.contains(&f.path().display().to_string()), "{e}");
        assert!(e.contains("rm "), "{e}");
    }

    #[test]
    fn the_guides_own_example_is_recognised_as_foreign() {
        // §5.2's example has no source identity: never trusted.
        let dir = tempfile::tempdir().expect("tempdir");
        let f = CheckpointFile::new(dir.path(), "tenant-123");
        std::fs::write(
            f.path(),
            r#"{"tenant_id":"tenant-123","lsn":987654321,"timestamp":"2025-11-02T14:30:00Z"}"#,
        )
        .expect("write");
        assert!(matches!(
            f.inspect("tenant-123", "1", "s"),
            Ok(FileState::Foreign { .. })
        ));
    }
}
