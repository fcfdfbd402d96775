//! `[cdc]`: the tenant's slot, publication, tenant column, batches and
//! checkpoints, with their defaults and checks.

use std::path::PathBuf;

use super::model::LsnValue;
use super::model::RawConfig;
use super::{notice, Checker, ConfigError, Notice};
use super::{SchemaChanges, DEFAULT_CHECKPOINT_DIR};
use crate::lsn::Lsn;

/// `[cdc]` as checked.
pub(super) struct Cdc {
    pub slot: String,
    pub publication: String,
    pub tenant_column: String,
    pub batch_size: u64,
    pub checkpoint_interval: u64,
    pub start_lsn: Lsn,
    pub schema_changes: SchemaChanges,
    pub checkpoint_dir: PathBuf,
}

pub(super) fn cdc(
    c: &Checker<'_>,
    raw: &RawConfig,
    tenant_id: &str,
    notices: &mut Vec<Notice>,
) -> Result<Cdc, ConfigError> {
    let slug: String = tenant_id
        .chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() {
                ch.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let slot = raw
        .cdc
        .replication_slot
        .clone()
        .unwrap_or_else(|| format!("{slug}_slot"));
    if slot.is_empty()
        || slot.len() > 63
        || !slot
            .chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
    {
        return Err(c.err(
            "[cdc] replication_slot",
            format!("'{slot}' is not a valid slot name: PostgreSQL allows 1 to 63 characters from a-z 0-9 _"),
        ));
    }
    let publication = raw
        .cdc
        .publication_name
        .clone()
        .unwrap_or_else(|| format!("{slug}_pub"));
    if publication.is_empty() || publication.len() > 63 || publication.contains('\0') {
        return Err(c.err(
            "[cdc] publication_name",
            format!("'{publication}' is not a valid publication name: 1 to 63 bytes"),
        ));
    }
    let tenant_column = raw
        .cdc
        .tenant_column
        .clone()
        .unwrap_or_else(|| "tenant_id".into());
    if tenant_column.is_empty() || tenant_column.len() > 63 || tenant_column.contains('\0') {
        return Err(c.err(
            "[cdc] tenant_column",
            "must be a column name of 1 to 63 bytes",
        ));
    }
    let batch_size = c.alias(
        ("[cdc] batch_size", raw.cdc.batch_size),
        ("[performance] batch_size", raw.performance.batch_size),
    )?;
    let batch_size = c.range("[cdc] batch_size", batch_size, 1000, 1, 100_000)?;
    let checkpoint_interval = c.alias(
        ("[cdc] checkpoint_interval", raw.cdc.checkpoint_interval),
        (
            "[performance] checkpoint_interval",
            raw.performance.checkpoint_interval,
        ),
    )?;
    let checkpoint_interval = c.range(
        "[cdc] checkpoint_interval",
        checkpoint_interval,
        1000,
        1,
        100_000_000,
    )?;
    let start_lsn = match &raw.cdc.start_lsn {
        None => Lsn::ZERO,
        Some(LsnValue::Number(n)) => Lsn(*n),
        Some(LsnValue::Text(t)) => t
            .parse()
            .map_err(|e: crate::lsn::ParseLsnError| c.err("[cdc] start_lsn", e.to_string()))?,
    };
    if raw.cdc.wal_path.is_some() {
        notice(notices, "[cdc] wal_path", "not used: large transactions stream into one open target transaction instead of spilling to disk");
    }
    let schema_changes = match raw.cdc.schema_changes.as_deref() {
        None | Some("apply") => SchemaChanges::Apply,
        Some("halt") => SchemaChanges::Halt,
        Some(other) => {
            return Err(c.err(
                "[cdc] schema_changes",
                format!("'{other}' is not allowed: apply or halt"),
            ))
        }
    };
    let checkpoint_dir = PathBuf::from(
        raw.cdc
            .checkpoint_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_CHECKPOINT_DIR.into()),
    );
    Ok(Cdc {
        slot,
        publication,
        tenant_column,
        batch_size,
        checkpoint_interval,
        start_lsn,
        schema_changes,
        checkpoint_dir,
    })
}
