//! `[performance]` and `[network]`: queues, threads, batching time,
//! connections and retries, with their defaults and checks (and the
//! guide's `[performance]` aliases of `[cdc]` and `[network]` keys).

use std::time::Duration;

use super::model::RawConfig;
use super::NetworkConfig;
use super::{notice, Checker, ConfigError, Notice};

/// `[performance]` as checked.
pub(super) struct Performance {
    pub buffer_events: u64,
    pub worker_threads: u64,
    pub batch_timeout_ms: u64,
    pub max_events_per_sec: Option<u64>,
    pub spool_max_mb: u64,
}

pub(super) fn performance(
    c: &Checker<'_>,
    raw: &RawConfig,
    notices: &mut Vec<Notice>,
) -> Result<Performance, ConfigError> {
    let p = &raw.performance;
    let buffer_events = c.range(
        "[performance] buffer_size_events",
        p.buffer_size_events,
        10_000,
        1,
        10_000_000,
    )?;
    let worker_threads = c.range("[performance] worker_threads", p.worker_threads, 4, 1, 256)?;
    let batch_timeout_ms = c.range(
        "[performance] batch_timeout_ms",
        p.batch_timeout_ms,
        100,
        1,
        60_000,
    )?;
    if let Some(t) = p.target_replication_lag_seconds {
        if !(t.is_finite() && t > 0.0) {
            return Err(c.err(
                "[performance] target_replication_lag_seconds",
                format!("{t} must be a positive number of seconds"),
            ));
        }
        notice(
            notices,
            "[performance] target_replication_lag_seconds",
            "not yet supported: no lag target is enforced or reported in this build",
        );
    }
    let max_events_per_sec = match p.max_throughput_events_per_sec {
        Some(_) => Some(c.range(
            "[performance] max_throughput_events_per_sec",
            p.max_throughput_events_per_sec,
            1,
            1,
            u64::MAX,
        )?),
        None => None,
    };
    let spool_max_mb = c.range(
        "[performance] spool_max_mb",
        p.spool_max_mb,
        1024,
        1,
        1 << 30,
    )?;
    if p.checkpoint_async.is_some() {
        notice(notices, "[performance] checkpoint_async", "no effect: progress is committed with the data on the target; checkpoint files are written after commits");
    }
    Ok(Performance {
        buffer_events,
        worker_threads,
        batch_timeout_ms,
        max_events_per_sec,
        spool_max_mb,
    })
}

pub(super) fn network(
    c: &Checker<'_>,
    raw: &RawConfig,
    notices: &mut Vec<Notice>,
) -> Result<NetworkConfig, ConfigError> {
    let p = &raw.performance;
    let n = &raw.network;
    let keepalive = c.alias(
        ("[network] tcp_keepalive_seconds", n.tcp_keepalive_seconds),
        (
            "[performance] tcp_keepalive_seconds",
            p.tcp_keepalive_seconds,
        ),
    )?;
    let pool = c.alias(
        ("[network] connection_pool_size", n.connection_pool_size),
        ("[performance] connection_pool_size", p.connection_pool_size),
    )?;
    let connect_timeout = c.alias(
        (
            "[network] connect_timeout_seconds",
            n.connect_timeout_seconds,
        ),
        (
            "[performance] connect_timeout_seconds",
            p.connect_timeout_seconds,
        ),
    )?;
    let read_timeout = c.alias(
        ("[network] read_timeout_seconds", n.read_timeout_seconds),
        ("[performance] read_timeout_seconds", p.read_timeout_seconds),
    )?;
    let keepalive = c.range("[network] tcp_keepalive_seconds", keepalive, 30, 1, 7200)?;
    c.range("[network] connection_pool_size", pool, 10, 1, 1000)?;
    if pool.is_some() {
        notice(notices, "[network] connection_pool_size", "no effect: each tenant uses one target connection, so its transactions apply in commit order");
    }
    let connect_timeout = c.range(
        "[network] connect_timeout_seconds",
        connect_timeout,
        10,
        1,
        600,
    )?;
    c.range(
        "[network] read_timeout_seconds",
        read_timeout,
        60,
        1,
        86_400,
    )?;
    if read_timeout.is_some() {
        notice(notices, "[network] read_timeout_seconds", "not yet supported: the replication stream relies on PostgreSQL's wal_sender_timeout and TCP keepalives");
    }
    let retry_max_attempts = c.range(
        "[network] retry_max_attempts",
        n.retry_max_attempts,
        3,
        0,
        1000,
    )?;
    let retry_backoff_ms = c.range(
        "[network] retry_backoff_ms",
        n.retry_backoff_ms,
        1000,
        10,
        600_000,
    )?;
    Ok(NetworkConfig {
        connect_timeout: Duration::from_secs(connect_timeout),
        tcp_keepalive: Duration::from_secs(keepalive),
        retry_max_attempts: retry_max_attempts as u32,
        retry_backoff: Duration::from_millis(retry_backoff_ms),
    })
}
