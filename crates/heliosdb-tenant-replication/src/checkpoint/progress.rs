//! The tenant's progress on the target, written in the same transaction as
//! the applied data.

use tokio_postgres::Client;

use super::CheckpointError;
use crate::error::{ReplicationError, Result, Side};
use crate::lsn::Lsn;

/// DDL of the daemon's own schema on the target (idempotent).
pub const SCHEMA_DDL: &str = "
CREATE SCHEMA IF NOT EXISTS heliosdb_replication;
CREATE TABLE IF NOT EXISTS heliosdb_replication.progress (
    tenant_id        text PRIMARY KEY,
    slot_name        text NOT NULL,
    source_system_id text NOT NULL,
    commit_lsn       pg_lsn NOT NULL,
    end_lsn          pg_lsn NOT NULL,
    commit_time      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- Split deployment: the last sealed batch applied, and how many batches
-- the capture node's current key has sealed (its cap survives restarts).
ALTER TABLE heliosdb_replication.progress
    ADD COLUMN IF NOT EXISTS batch_sequence bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS seal_key_id text,
    ADD COLUMN IF NOT EXISTS seal_key_batches bigint,
    -- Source transactions up to here may be replays over a copy: no conflicts.
    ADD COLUMN IF NOT EXISTS converge_until pg_lsn;
-- Conflicts found at apply (the guide's §5.5 queries this table).
CREATE TABLE IF NOT EXISTS heliosdb_replication.heliosdb_conflict_log (
    id                  bigserial PRIMARY KEY,
    timestamp           timestamptz NOT NULL DEFAULT now(),
    tenant_id           text NOT NULL,
    table_name          text NOT NULL,
    primary_key         jsonb NOT NULL,
    conflict_type       text NOT NULL,
    resolution_strategy text NOT NULL,
    winner              text NOT NULL
);
-- Both row images (absent for tables marked sensitive).
ALTER TABLE heliosdb_replication.heliosdb_conflict_log
    ADD COLUMN IF NOT EXISTS source_row jsonb,
    ADD COLUMN IF NOT EXISTS target_row jsonb;
CREATE INDEX IF NOT EXISTS heliosdb_conflict_log_tenant_time
    ON heliosdb_replication.heliosdb_conflict_log (tenant_id, timestamp);
CREATE TABLE IF NOT EXISTS heliosdb_replication.copy_state (
    tenant_id  text NOT NULL,
    table_name text NOT NULL,
    chunk      int NOT NULL,
    block_lo   bigint NOT NULL,
    block_hi   bigint,
    rows       bigint,
    done       boolean NOT NULL DEFAULT false,
    PRIMARY KEY (tenant_id, table_name, chunk)
);
-- The replicated columns of each target table as replication last made
-- them (name and type): a target changed outside replication is told apart
-- from a change on the source.
CREATE TABLE IF NOT EXISTS heliosdb_replication.table_definitions (
    tenant_id   text NOT NULL,
    schema_name text NOT NULL,
    table_name  text NOT NULL,
    columns     text[] NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, schema_name, table_name)
);
CREATE TABLE IF NOT EXISTS heliosdb_replication.resync_requests (
    tenant_id    text NOT NULL,
    table_name   text NOT NULL DEFAULT '*',
    requested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, table_name)
);
";

/// The SQL that records progress; run inside the apply transaction.
pub const UPSERT_SQL: &str = "
INSERT INTO heliosdb_replication.progress
    (tenant_id, slot_name, source_system_id, commit_lsn, end_lsn, commit_time, updated_at,
     batch_sequence, seal_key_id, seal_key_batches)
VALUES ($1, $2, $3, $4::text::pg_lsn, $5::text::pg_lsn,
        timestamptz '2000-01-01 00:00:00+00' + $6::bigint * interval '1 microsecond', now(),
        COALESCE($7::bigint, 0), $8::text, $9::bigint)
ON CONFLICT (tenant_id) DO UPDATE SET
    batch_sequence = COALESCE($7::bigint, heliosdb_replication.progress.batch_sequence),
    seal_key_id = COALESCE($8::text, heliosdb_replication.progress.seal_key_id),
    seal_key_batches = COALESCE($9::bigint, heliosdb_replication.progress.seal_key_batches),
    slot_name = EXCLUDED.slot_name,
    source_system_id = EXCLUDED.source_system_id,
    commit_lsn = EXCLUDED.commit_lsn,
    end_lsn = EXCLUDED.end_lsn,
    commit_time = EXCLUDED.commit_time,
    updated_at = EXCLUDED.updated_at";

/// A tenant's recorded progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub slot_name: String,
    pub source_system_id: String,
    /// LSN of the last applied source commit record.
    pub commit_lsn: Lsn,
    /// End of that commit record: where streaming resumes.
    pub end_lsn: Lsn,
    /// Split deployment: the last sealed batch applied (0: none).
    pub batch_sequence: u64,
    /// Split deployment: the capture node's sealing key and how many
    /// batches it had sealed by that batch.
    pub seal_key: Option<(String, u64)>,
    /// Transactions up to here may replay over a copy (no conflict detection).
    pub converge_until: Lsn,
}

/// What a sealed batch adds to the progress record (apply node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchMark {
    pub sequence: u64,
    pub key_id: String,
    pub key_batches: u64,
}

/// Read the tenant's progress (check it with [`Progress::check_source`]).
pub async fn load(target: &Client, tenant: &str) -> Result<Option<Progress>> {
    let row = target
        .query_opt(
            "SELECT slot_name, source_system_id, commit_lsn::text, end_lsn::text,
                    batch_sequence, seal_key_id, seal_key_batches,
                    coalesce(converge_until, '0/0')::text
               FROM heliosdb_replication.progress WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .map_err(|e| {
            ReplicationError::db(Side::Target, "reading heliosdb_replication.progress", e)
        })?;
    let Some(row) = row else { return Ok(None) };
    let parse = |s: String| {
        s.parse::<Lsn>()
            .map_err(|e| ReplicationError::Internal(e.to_string()))
    };
    Ok(Some(Progress {
        slot_name: row.get(0),
        source_system_id: row.get(1),
        commit_lsn: parse(row.get(2))?,
        end_lsn: parse(row.get(3))?,
        batch_sequence: row.get::<_, i64>(4).max(0) as u64,
        seal_key: match (
            row.get::<_, Option<String>>(5),
            row.get::<_, Option<i64>>(6),
        ) {
            (Some(id), Some(n)) => Some((id, n.max(0) as u64)),
            _ => None,
        },
        converge_until: parse(row.get(7))?,
    }))
}

impl Progress {
    /// Progress recorded from another source cluster is never trusted.
    pub fn check_source(&self, tenant: &str, system_id: &str, slot: &str) -> Result<()> {
        if self.source_system_id != system_id {
            return Err(CheckpointError::ForeignProgress {
                tenant: tenant.to_string(),
                what: format!(
                    "source system {} (this source is {system_id})",
                    self.source_system_id
                ),
            }
            .into());
        }
        if self.slot_name != slot {
            tracing::warn!(
                recorded = %self.slot_name, configured = %slot,
                "the target's progress was recorded through another slot of the same source; resuming from it"
            );
        }
        Ok(())
    }
}

/// The slot's confirmed position must not pass `end_lsn`, where the
/// target's progress says streaming resumes (on a shared slot: extended by
/// what the tenant's spool covers): the changes in between were delivered
/// to no one (a slot dropped and made again by hand, or advanced).
pub fn check_slot_covered(
    tenant: &str,
    slot: &str,
    end_lsn: Lsn,
    slot_confirmed: Lsn,
) -> Result<()> {
    if slot_confirmed <= end_lsn {
        return Ok(());
    }
    Err(ReplicationError::operator(
        format!(
            "source: slot '{slot}' delivers changes from {slot_confirmed} on, but the target holds tenant '{tenant}' only up to {end_lsn}: the changes in between were never replicated (was the slot dropped and made again, or advanced by hand?)"
        ),
        "copy the tenant again: heliosdb-tenant-replication --config <file> init --resync (it replaces the tenant's rows on the target)",
    ))
}

/// Between two idle positions recorded on the target (see [`record_idle`]).
pub const IDLE_RECORD_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A keepalive's position on its way to the target's record (see
/// [`record_idle`]): the latest one seen, recorded at most once per
/// [`IDLE_RECORD_EVERY`].
#[derive(Debug, Default)]
pub struct IdlePosition {
    pending: Option<Lsn>,
    recorded_at: Option<std::time::Instant>,
}

impl IdlePosition {
    /// A keepalive said nothing of the tenant is pending before `lsn`.
    pub fn seen(&mut self, lsn: Lsn) {
        self.pending = Some(lsn);
    }

    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// When a pending position may be recorded.
    pub fn due_at(&self) -> std::time::Instant {
        self.recorded_at.unwrap_or_else(std::time::Instant::now) + IDLE_RECORD_EVERY
    }

    /// The pending position, to record now whatever the pace (a sender
    /// that paces its keepalives itself).
    pub fn take_now(&mut self) -> Option<Lsn> {
        let lsn = self.pending.take()?;
        self.recorded_at = Some(std::time::Instant::now());
        Some(lsn)
    }

    /// The position to record now (counted as recorded): pending, past
    /// `acked`, and the last record long enough ago. The caller records it
    /// before it acknowledges the slot there.
    pub fn take_due(&mut self, acked: Lsn) -> Option<Lsn> {
        let lsn = self.pending?;
        if lsn <= acked {
            self.pending = None;
            return None;
        }
        if self
            .recorded_at
            .is_some_and(|at| at.elapsed() < IDLE_RECORD_EVERY)
        {
            return None;
        }
        self.pending = None;
        self.recorded_at = Some(std::time::Instant::now());
        Some(lsn)
    }
}

/// Nothing of the tenant is pending before `lsn` (a keepalive's position,
/// everything before it applied or another tenant's): record it as where
/// streaming resumes, before the slot is acknowledged there. So the slot's
/// confirmed position never passes the target's recorded one, and a slot
/// that did (dropped and made again, moved by hand) is a gap found at start.
/// `mark`: the batch that carried it (apply node), recorded like a commit's.
pub async fn record_idle(
    target: &Client,
    tenant: &str,
    lsn: Lsn,
    mark: Option<&BatchMark>,
) -> Result<()> {
    target
        .execute(
            "UPDATE heliosdb_replication.progress
                SET end_lsn = $2::text::pg_lsn, updated_at = now(),
                    batch_sequence = COALESCE($3::bigint, batch_sequence),
                    seal_key_id = COALESCE($4::text, seal_key_id),
                    seal_key_batches = COALESCE($5::bigint, seal_key_batches)
              WHERE tenant_id = $1 AND end_lsn < $2::text::pg_lsn",
            &[
                &tenant,
                &lsn.to_string(),
                &mark.map(|m| m.sequence as i64),
                &mark.map(|m| m.key_id.as_str()),
                &mark.map(|m| m.key_batches as i64),
            ],
        )
        .await
        .map_err(|e| ReplicationError::db(Side::Target, "recording an idle position", e))?;
    Ok(())
}

/// After a copy that did not use the slot's exported snapshot: changes the
/// stream replays up to `lsn` may meet rows in any state.
pub async fn set_converge_until(target: &Client, tenant: &str, lsn: Lsn) -> Result<()> {
    target
        .execute(
            "UPDATE heliosdb_replication.progress
                SET converge_until = GREATEST(coalesce(converge_until, '0/0'), $2::text::pg_lsn)
              WHERE tenant_id = $1",
            &[&tenant, &lsn.to_string()],
        )
        .await
        .map_err(|e| ReplicationError::db(Side::Target, "recording the copy's end", e))?;
    Ok(())
}
