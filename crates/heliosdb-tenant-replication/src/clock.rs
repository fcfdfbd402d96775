//! Time as replication measures it: commit times arrive in PostgreSQL's
//! epoch (microseconds since 2000-01-01). Shared vocabulary: depends on no
//! other module of the crate.

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// Now, in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Now in PostgreSQL's epoch, as commit times arrive.
pub fn pg_now_us() -> i64 {
    now_us() - PG_EPOCH_US
}
