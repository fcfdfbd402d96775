//! `[conflict]` and `[replication] node_id`: how divergent rows are
//! resolved and reported, with their defaults and checks.

use std::path::PathBuf;

use super::model::RawConfig;
use super::{host_name, ConflictConfig, Strategy};
use super::{notice, Checker, ConfigError, Notice};

/// `[conflict]` as checked, and the conflict log file if one is asked for.
pub(super) fn conflict(
    c: &Checker<'_>,
    raw: &RawConfig,
    notices: &mut Vec<Notice>,
) -> Result<(ConflictConfig, Option<PathBuf>), ConfigError> {
    let strategy = match raw.conflict.resolution_strategy.as_deref() {
        None => Strategy::default(),
        Some(s) => Strategy::parse(s).ok_or_else(|| {
            c.err("[conflict] resolution_strategy", format!("'{s}' is not supported: allowed LastWriteWins, SourcePreferred, TargetPreferred, VectorClock"))
        })?,
    };
    let node_id = match raw.replication.node_id.as_deref() {
        None => host_name(),
        Some(n) if n.is_empty() || n.len() > 63 || n.chars().any(|ch| ch.is_control()) => {
            return Err(c.err(
                "[replication] node_id",
                "must be 1-63 printable characters naming this region, e.g. \"eu-west-1\"",
            ))
        }
        Some(n) => n.to_string(),
    };
    let sensitive_tables = raw
        .conflict
        .sensitive_tables
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|t| {
            if t.contains('.') {
                t
            } else {
                format!("public.{t}")
            }
        })
        .collect();
    let conflict = ConflictConfig {
        strategy,
        node_id,
        sensitive_tables,
    };
    let conflict_log = match (raw.conflict.log_conflicts, &raw.conflict.conflict_log_path) {
        (Some(true), Some(p)) if !p.is_empty() => Some(PathBuf::from(p)),
        (Some(true), _) => Some(PathBuf::from("/var/log/heliosdb/conflicts.log")),
        (_, Some(_)) => {
            notice(notices,
                "[conflict] conflict_log_path",
                "no effect without log_conflicts = true (conflicts still go to the target's heliosdb_replication.heliosdb_conflict_log table)",
            );
            None
        }
        _ => None,
    };
    Ok((conflict, conflict_log))
}
