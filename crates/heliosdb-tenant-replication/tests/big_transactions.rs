//! Big and unusual transactions on real clusters.

mod common;

use std::time::Duration;

use common::*;

/// Peak resident memory of a process, from /proc (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .expect("VmHWM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2m_row_transaction_stays_under_256_mb_without_a_walsender_timeout() {
    let mut env = Env::new(SCHEMA).await;
    env.source
        .reconfigure(&[("wal_sender_timeout", "'5s'")])
        .expect("short timeout");
    let config = env.config();
    env.init(&config);
    let daemon = env.start_daemon(&config);
    env.src()
        .await
        .batch_execute("INSERT INTO events SELECT 'tenant-123', g, 'bulk', md5(g::text), now() FROM generate_series(1, 2000000) g")
        .await
        .expect("one 2,000,000-row transaction");
    wait_until(
        Duration::from_secs(600),
        "2,000,000 rows on the target",
        || async { tenant_count(&env.dst().await, "events", TENANT).await == 2_000_000 },
    )
    .await;
    assert_tenant_equal(&env, &["events"]).await;
    let peak = peak_rss_mib(daemon.pid());
    assert!(peak < 256, "peak resident memory {peak} MiB");
    let log = daemon.log();
    assert!(
        !log.contains("retrying"),
        "the stream was interrupted:\n{log}"
    );
    assert!(
        !env.source.log().contains("replication timeout"),
        "walsender timed out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_commits_replicate_and_rolled_back_prepared_work_leaves_nothing() {
    let mut env = Env::new(SCHEMA).await;
    env.source
        .reconfigure(&[("max_prepared_transactions", "10")])
        .expect("2pc");
    let config = env.config();
    env.init(&config);
    let daemon = env.start_daemon(&config);
    let src = env.src().await;
    // One statement per call: COMMIT/ROLLBACK PREPARED refuse a transaction block.
    for sql in [
        "BEGIN; INSERT INTO orders VALUES ('tenant-123', 1, 0, 'prepared then committed', 0, '{}', now()); PREPARE TRANSACTION 'a'",
        "BEGIN; INSERT INTO orders VALUES ('tenant-123', 2, 0, 'prepared then rolled back', 0, '{}', now()); PREPARE TRANSACTION 'b'",
        "INSERT INTO orders VALUES ('tenant-123', 3, 0, 'plain', 0, '{}', now())",
        "COMMIT PREPARED 'a'",
        "ROLLBACK PREPARED 'b'",
    ] {
        src.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    let ids: Vec<i64> = env
        .dst()
        .await
        .query("SELECT id FROM orders ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [1, 3]);
}
