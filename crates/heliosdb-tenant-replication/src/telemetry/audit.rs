//! The audit log of §7.4: one JSON object per line, appended and flushed.
//!
//! ```json
//! {"timestamp":"2026-11-26T14:35:12.456Z","event_type":"conflict_resolved","tenant_id":"tenant-123",
//!  "table_name":"users","primary_key":{"id":456},"resolution_strategy":"VectorClock","winner":"source",
//!  "user":"heliosdb_writer","source_ip":"10.1.2.45","prev_hash":"…"}
//! ```
//!
//! Each record carries `prev_hash`, the SHA-256 (hex) of the previous line
//! as written (64 zeros for the first line of a file), so editing, removing
//! or reordering a record breaks the chain at the next one.
//! `heliosdb-tenant-replication audit-verify` checks a file. (Removing the
//! *last* records leaves an intact shorter chain; ship the log off the host,
//! as §7.4 intends, to protect the tail.)

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ring::digest::{digest, SHA256};
use serde_json::{Map, Value};

/// The events §7.4 lists.
pub const EVENTS: [&str; 6] = [
    "replication_start",
    "replication_stop",
    "failover",
    "conflict_resolved",
    "checkpoint_created",
    "error",
];

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An append-only, hash-chained audit log.
pub struct AuditLog {
    path: PathBuf,
    events: Vec<String>,
    /// Who writes (the target role) and from where, as §7.4 shows.
    user: String,
    source_ip: String,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    prev_hash: String,
}

fn hash_hex(line: &[u8]) -> String {
    digest(&SHA256, line)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl AuditLog {
    /// Open (or create) the log at `path`, continuing the chain of what it
    /// holds. `events`: which event types to record (all when empty).
    pub fn open(
        path: &Path,
        events: &[String],
        user: &str,
        source_ip: &str,
    ) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let prev_hash = match File::open(path) {
            Ok(f) => BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .filter(|l| !l.is_empty())
                .last()
                .map(|l| hash_hex(l.as_bytes()))
                .unwrap_or_else(|| GENESIS.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => GENESIS.to_string(),
            Err(e) => return Err(e),
        };
        let file = crate::files::append(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            events: events.to_vec(),
            user: user.to_string(),
            source_ip: source_ip.to_string(),
            inner: Mutex::new(Inner { file, prev_hash }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one record (if `event_type` is selected). A write failure is
    /// logged, never fatal to replication.
    pub fn record(&self, event_type: &str, tenant: &str, fields: Value) {
        if !self.events.is_empty() && !self.events.iter().any(|e| e == event_type) {
            return;
        }
        let mut obj = Map::new();
        obj.insert(
            "timestamp".into(),
            Value::String(
                chrono::Utc::now()
                    .format("%Y-%m-%dT%H:%M:%S%.3fZ")
                    .to_string(),
            ),
        );
        obj.insert("event_type".into(), event_type.into());
        obj.insert("tenant_id".into(), tenant.into());
        if let Value::Object(extra) = fields {
            obj.extend(extra);
        }
        obj.entry("user")
            .or_insert_with(|| self.user.clone().into());
        obj.entry("source_ip")
            .or_insert_with(|| self.source_ip.clone().into());
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        obj.insert("prev_hash".into(), inner.prev_hash.clone().into());
        let line = Value::Object(obj).to_string();
        let written = inner
            .file
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| inner.file.flush());
        match written {
            Ok(()) => inner.prev_hash = hash_hex(line.as_bytes()),
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "audit log record not written")
            }
        }
    }
}

/// The conflict log (`[conflict] log_conflicts`): one JSON object per
/// conflict, appended and flushed.
pub struct ConflictLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl ConflictLog {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = crate::files::append(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    pub fn record(&self, record: &Value) {
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f
            .write_all(format!("{record}\n").as_bytes())
            .and_then(|()| f.flush())
        {
            tracing::error!(path = %self.path.display(), error = %e, "conflict log record not written");
        }
    }
}

/// The outcome of checking a file's chain.
#[derive(Debug, PartialEq, Eq)]
pub enum Verified {
    Intact { records: usize },
    Broken { line: usize, reason: String },
}

/// Check the hash chain of the audit log at `path`.
pub fn verify(path: &Path) -> std::io::Result<Verified> {
    let f = File::open(path)?;
    let mut prev = GENESIS.to_string();
    let mut records = 0;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line?;
        let n = i + 1;
        if line.is_empty() {
            continue;
        }
        let value: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                return Ok(Verified::Broken {
                    line: n,
                    reason: format!("not JSON: {e}"),
                })
            }
        };
        match value.get("prev_hash").and_then(Value::as_str) {
            Some(h) if h == prev => {}
            Some(_) => {
                return Ok(Verified::Broken {
                    line: n,
                    reason: "prev_hash does not match the line before: a record was changed, removed or inserted".into(),
                })
            }
            None => {
                return Ok(Verified::Broken {
                    line: n,
                    reason: "no prev_hash".into(),
                })
            }
        }
        prev = hash_hex(line.as_bytes());
        records += 1;
    }
    Ok(Verified::Intact { records })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_survives_reopening_and_detects_any_edit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, &[], "writer", "10.0.0.1").expect("open");
        log.record(
            "replication_start",
            "t1",
            serde_json::json!({"state": "running"}),
        );
        log.record("checkpoint_created", "t1", serde_json::json!({"lsn": 42}));
        drop(log);
        // Appending after a restart continues the chain.
        let log =
            AuditLog::open(&path, &["error".to_string()], "writer", "10.0.0.1").expect("reopen");
        log.record("checkpoint_created", "t1", serde_json::json!({}));
        log.record(
            "error",
            "t1",
            serde_json::json!({"error_type": "transport"}),
        );
        assert_eq!(
            verify(&path).expect("verify"),
            Verified::Intact { records: 3 }
        );

        let text = std::fs::read_to_string(&path).expect("read");
        let first: Value = serde_json::from_str(text.lines().next().expect("line")).expect("json");
        for key in [
            "timestamp",
            "event_type",
            "tenant_id",
            "user",
            "source_ip",
            "prev_hash",
        ] {
            assert!(first.get(key).is_some(), "{key} missing: {first}");
        }
        // Edit one value of the second record.
        let edited = text.replacen("\"lsn\":42", "\"lsn\":43", 1);
        std::fs::write(&path, &edited).expect("write");
        assert!(matches!(
            verify(&path).expect("verify"),
            Verified::Broken { line: 3, .. }
        ));
        // Remove the first record.
        let removed: String = text.lines().skip(1).map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, removed).expect("write");
        assert!(matches!(
            verify(&path).expect("verify"),
            Verified::Broken { line: 1, .. }
        ));
    }
}
