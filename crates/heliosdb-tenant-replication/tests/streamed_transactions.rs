//! Large transactions streamed while they run (pgoutput proto 2): applied
//! into a target transaction of their own as they arrive, committed with
//! the source, rolled back with it, subtransaction by subtransaction.

mod common;

use std::time::Duration;

use common::*;

const SLOT: &str = "tenant_123_slot";
const LANE_OPENED: &str = "a streamed transaction opens its own target transaction";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_transactions_apply_while_they_run_and_keep_only_what_the_source_committed() {
    let (env, config) = Env::provisioned(SCHEMA).await;
    stream_large_transactions(&env).await;
    let daemon = env.start_daemon(&config);

    // T1 stays open while other transactions commit around it.
    let t1 = env.src().await;
    open_large_transaction(&t1).await;
    wait_for_log(&daemon, LANE_OPENED, Duration::from_secs(30)).await;
    let small = env.src().await;
    small
        .batch_execute(
            "INSERT INTO accounts SELECT 'tenant-123', g, 'n', 'e', g, now() FROM generate_series(1, 50) g;
             UPDATE accounts SET balance = balance + 1 WHERE tenant_id = 'tenant-123' AND id <= 10",
        )
        .await
        .expect("small transactions");
    // T2: streamed too, then rolled back whole.
    let t2 = env.src().await;
    open_doomed_transaction(&t2).await;
    wait_tenant_equal(&env, &["accounts"], Duration::from_secs(30), &daemon).await;
    // Committed around them, the small transactions are there; nothing of
    // the open ones is visible.
    let dst = env.dst().await;
    let events: i64 = dst
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        events, 0,
        "rows of an uncommitted transaction are visible on the target"
    );
    t2.batch_execute("ROLLBACK").await.expect("T2 rollback");
    finish_large_transaction(&t1).await;
    small
        .batch_execute("INSERT INTO accounts VALUES ('tenant-123', 1000, 'after', 'e', 1, now())")
        .await
        .expect("after");

    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &daemon).await;
    assert_large_transaction_outcome(&env).await;
    let aborted: i64 = dst
        .query_one("SELECT count(*) FROM events WHERE id > 300000", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(aborted, 0, "rows of a rolled-back transaction arrived");
    assert!(
        streamed_txns(&env, SLOT).await >= 2,
        "the source did not stream the large transactions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_a_streamed_transaction_loses_and_doubles_nothing() {
    let (env, config) = Env::provisioned(SCHEMA).await;
    stream_large_transactions(&env).await;
    let mut daemon = env.start_daemon(&config);
    let t1 = env.src().await;
    open_large_transaction(&t1).await;
    wait_for_log(&daemon, LANE_OPENED, Duration::from_secs(30)).await;
    daemon.kill9();
    // The source goes on; the restarted daemon receives T1 again from its
    // start (the half-applied target transaction died with the daemon).
    finish_large_transaction(&t1).await;
    let daemon = env.start_daemon(&config);
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &daemon).await;
    assert_large_transaction_outcome(&env).await;
    assert_tenant_equal(&env, &TABLES).await;
}
