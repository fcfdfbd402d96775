//! Nothing lost, nothing doubled: restarts, `kill -9`, and outages, on real clusters.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_restart_lose_and_double_nothing() {
    let (env, config) = Env::provisioned(SCHEMA).await;
    let src = env.src().await;

    let mut daemon = env.start_daemon(&config);
    src.batch_execute("INSERT INTO orders SELECT 'tenant-123', g, 1, 'a', 1, '{}', now() FROM generate_series(1, 5000) g")
        .await
        .expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    let (status, took) = daemon.terminate();
    assert!(status.success(), "exit {status:?}:\n{}", daemon.log());
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");

    // The checkpoint file (§5.2 format) and the slot both reflect the target's progress.
    let dst = env.dst().await;
    let progress: String = dst
        .query_one(
            "SELECT end_lsn::text FROM heliosdb_replication.progress WHERE tenant_id = $1",
            &[&TENANT],
        )
        .await
        .expect("progress")
        .get(0);
    let text = std::fs::read_to_string(env.checkpoint_dir().join("tenant-123.checkpoint"))
        .expect("checkpoint file");
    let file: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(file["tenant_id"], TENANT);
    assert_eq!(file["lsn_text"], progress.as_str(), "{text}");
    assert!(
        file["lsn"].as_u64().is_some() && file["timestamp"].as_str().is_some(),
        "{text}"
    );
    let confirmed: bool = src
        .query_one(
            "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'tenant_123_slot'",
            &[&progress],
        )
        .await
        .expect("slot")
        .get(0);
    assert!(confirmed, "the last status update did not reach the source");

    // Changes made while stopped arrive after the restart.
    src.batch_execute(
        "UPDATE orders SET status = 'while-stopped' WHERE id % 7 = 0; DELETE FROM orders WHERE id > 4900;
         INSERT INTO events SELECT 'tenant-123', g, 'k', 'b', now() FROM generate_series(1, 100) g",
    )
    .await
    .expect("changes while stopped");
    let daemon = env.start_daemon(&config);
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    assert_eq!(foreign_rows(&dst).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_random_moments_loses_and_doubles_nothing_five_times_in_a_row() {
    let env = Env::new(SCHEMA).await;
    // Small batches so that kills land inside multi-chunk target transactions too.
    let config = env.write_config(
        "replication.toml",
        &env.config_text("")
            .replace("batch_size = 1000", "batch_size = 50"),
    );
    env.init(&config);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);

    for round in 1..=5 {
        let stop = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn(workload(
            env.source.superuser_url("app"),
            round,
            stop.clone(),
        ));
        let mut daemon = env.start_daemon(&config);
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..2500))).await;
        daemon.kill9();
        // Restart while the workload goes on, then let it finish.
        let daemon = env.start_daemon(&config);
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1000))).await;
        stop.store(true, Ordering::Relaxed);
        let txns = load.await.expect("workload");
        assert!(txns > 0, "the workload ran");
        wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &daemon).await;
        assert_eq!(
            foreign_rows(&env.dst().await).await,
            0,
            "round {round}: other tenants' rows on the target"
        );
        assert_eq!(
            conflicts_logged(&env.dst().await).await,
            0,
            "round {round}: restarts must not look like conflicts"
        );
        drop(daemon); // kill -9 again at the end of the round
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_outage_is_retried_and_recovers() {
    let (mut env, config) = Env::provisioned(SCHEMA).await;
    let mut daemon = env.start_daemon(&config);
    let src = env.src().await;
    src.batch_execute("INSERT INTO accounts SELECT 'tenant-123', g, 'n', 'e', 1, now() FROM generate_series(1, 100) g")
        .await
        .expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;

    env.target.stop().expect("stop target");
    src.batch_execute("INSERT INTO accounts SELECT 'tenant-123', g, 'n', 'e', 1, now() FROM generate_series(101, 200) g")
        .await
        .expect("rows while the target is down");
    wait_until(Duration::from_secs(20), "a retry to be logged", || {
        let log = daemon.log();
        async move { log.contains("retrying") }
    })
    .await;
    assert!(
        daemon.exited().is_none(),
        "the daemon exited during the outage:\n{}",
        daemon.log()
    );
    env.target.start_again().expect("start target");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &daemon).await;
    let (status, _) = daemon.terminate();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_target_does_not_trip_wal_sender_timeout() {
    let mut env = Env::new(SCHEMA).await;
    env.source
        .reconfigure(&[("wal_sender_timeout", "'2s'")])
        .expect("short wal_sender_timeout");
    let config = env.config();
    env.init(&config);
    let daemon = env.start_daemon(&config);
    let src = env.src().await;
    src.batch_execute("INSERT INTO orders VALUES ('tenant-123', 0, 0, 'warm-up', 0, '{}', now())")
        .await
        .expect("warm-up");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;

    // Another session holds a lock on the target table for 8 s: apply blocks
    // four times longer than the walsender's timeout.
    let (locker, conn) =
        tokio_postgres::connect(&env.target.superuser_url("app"), tokio_postgres::NoTls)
            .await
            .expect("locker");
    tokio::spawn(conn);
    locker
        .batch_execute("BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    src.batch_execute("INSERT INTO orders SELECT 'tenant-123', g, 0, 'stalled', 0, '{}', now() FROM generate_series(1, 500) g")
        .await
        .expect("rows");
    tokio::time::sleep(Duration::from_secs(8)).await;
    locker.batch_execute("COMMIT").await.expect("unlock");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    let log = daemon.log();
    assert!(
        !log.contains("retrying"),
        "the stream was interrupted during the stall:\n{log}"
    );
    let source_log = env.source.log();
    assert!(
        !source_log.contains("terminating walsender process due to replication timeout"),
        "{source_log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_work_and_a_source_restart_leave_nothing_wrong() {
    let (mut env, config) = Env::provisioned(SCHEMA).await;
    let daemon = env.start_daemon(&config);
    {
        let src = env.src().await;
        src.batch_execute(
            "BEGIN;
               INSERT INTO orders VALUES ('tenant-123', 1, 0, 'kept', 0, '{}', now());
               SAVEPOINT s1;
               INSERT INTO orders SELECT 'tenant-123', g, 0, 'rolled back', 0, '{}', now() FROM generate_series(100, 5100) g;
               UPDATE orders SET status = 'rolled back too' WHERE id = 1;
               ROLLBACK TO SAVEPOINT s1;
               INSERT INTO orders VALUES ('tenant-123', 2, 0, 'kept', 0, '{}', now());
             COMMIT;
             BEGIN; INSERT INTO orders SELECT 'tenant-123', g, 0, 'aborted', 0, '{}', now() FROM generate_series(10, 9000) g; ROLLBACK;",
        )
        .await
        .expect("savepoints");
        wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    }
    let dst = env.dst().await;
    let statuses: Vec<String> = dst
        .query("SELECT status FROM orders ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statuses, ["kept", "kept"]);

    // The source restarts under the daemon: it reconnects and goes on.
    env.source.stop().expect("stop source");
    env.source.start_again().expect("start source");
    env.src()
        .await
        .batch_execute(
            "INSERT INTO orders VALUES ('tenant-123', 3, 0, 'after restart', 0, '{}', now())",
        )
        .await
        .expect("row after restart");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &daemon).await;
}
