//! `status`: where a tenant's replication stands, read from both databases.

use crate::config::Config;
use crate::error::{on_source as src, on_target as dst, Result, Side};
use crate::pg;

/// Lines for the terminal, and the tenant's state
/// (`not started` | `snapshotting` | `streaming` | `stopped`).
pub async fn status(config: &Config) -> Result<(String, Vec<String>)> {
    let t = &config.tenant;
    let app = "heliosdb-tenant-replication status";
    let target = pg::connect(t.target()?, &config.network, Side::Target, app).await?;
    let source = pg::connect(t.source()?, &config.network, Side::Source, app).await?;
    let has_schema: bool = target
        .query_one(
            "SELECT to_regclass('heliosdb_replication.copy_state') IS NOT NULL",
            &[],
        )
        .await
        .map_err(dst("looking for heliosdb_replication"))?
        .get(0);

    let mut lines = vec![format!("tenant:        {}", t.tenant_id)];
    let progress = if has_schema {
        target
            .query_opt(
                "SELECT end_lsn::text, to_char(commit_time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS UTC'),
                        extract(epoch FROM now() - commit_time)::float8
                   FROM heliosdb_replication.progress WHERE tenant_id = $1",
                &[&t.tenant_id],
            )
            .await
            .map_err(dst("reading progress"))?
    } else {
        None
    };
    let copy = if has_schema {
        target
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE done), coalesce(sum(rows), 0)::int8
                   FROM heliosdb_replication.copy_state WHERE tenant_id = $1",
                &[&t.tenant_id],
            )
            .await
            .map_err(dst("reading the copy plan"))
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)))?
    } else {
        (0, 0, 0)
    };
    let slot = source
        .query_opt(
            "SELECT active, active_pid, confirmed_flush_lsn::text,
                    pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)), wal_status
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&t.slot],
        )
        .await
        .map_err(src("reading pg_replication_slots"))?;
    let active = slot.as_ref().is_some_and(|r| r.get::<_, bool>(0));

    let state = if copy.0 > 0 {
        "snapshotting"
    } else if progress.is_some() && active {
        "streaming"
    } else if progress.is_some() {
        "stopped"
    } else {
        "not started"
    };
    lines.push(format!("state:         {state}"));
    if copy.0 > 0 {
        lines.push(format!(
            "initial copy:  {}/{} ranges done, {} rows copied",
            copy.1, copy.0, copy.2
        ));
    }
    if let Some(p) = &progress {
        let lsn: String = p.get(0);
        let when: Option<String> = p.get(1);
        let age: Option<f64> = p.get(2);
        lines.push(match (when, age) {
            (Some(w), Some(a)) => {
                format!("applied up to: {lsn} (last source commit {w}, {a:.1} s ago)")
            }
            _ => format!("applied up to: {lsn} (initial copy; no change applied since)"),
        });
    }
    match &slot {
        Some(r) => {
            let pid: Option<i32> = r.get(1);
            let confirmed: Option<String> = r.get(2);
            let retained: Option<String> = r.get(3);
            let wal_status: Option<String> = r.get(4);
            lines.push(format!(
                "slot:          {} {}, confirmed {}, retains {} of WAL ({})",
                t.slot,
                pid.map(|p| format!("in use by pid {p}"))
                    .unwrap_or_else(|| "inactive".into()),
                confirmed.unwrap_or_else(|| "-".into()),
                retained.unwrap_or_else(|| "-".into()),
                wal_status.unwrap_or_else(|| "-".into()),
            ));
        }
        None => lines.push(format!(
            "slot:          {} does not exist (run init)",
            t.slot
        )),
    }
    if has_schema {
        let pending = crate::snapshot::pending_resyncs(&target, &t.tenant_id).await?;
        if !pending.is_empty() {
            let names: Vec<String> = pending
                .iter()
                .map(|p| p.clone().unwrap_or_else(|| "all tables".into()))
                .collect();
            lines.push(format!("resync:        requested for {}", names.join(", ")));
        }
    }
    Ok((state.to_string(), lines))
}
