//! End-to-end streaming on real clusters: every DML kind, tenant isolation.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dml_kind_replicates_and_only_the_tenants_rows_arrive() {
    let env = Env::new(SCHEMA).await;
    let config = env.config();
    let out = env.init(&config);
    assert!(
        out.contains("publication 'tenant_123_pub' created for 3 table(s)"),
        "{out}"
    );
    let mut daemon = Daemon::start(&config, &env.dir.path().join("daemon.log"));
    let src = env.src().await;

    // Three tenants write; only tenant-123 may reach the target.
    for tenant in ["tenant-123", "tenant-456", "tenant-789"] {
        src.execute(
            "INSERT INTO accounts SELECT $1, g, 'name ' || g, 'u' || g || '@example.com', g * 1.5, now()
               FROM generate_series(1, 50) g",
            &[&tenant],
        )
        .await
        .expect("insert accounts");
        src.execute(
            "INSERT INTO orders SELECT $1, g, g % 50, 'new', g * 10.25, jsonb_build_object('n', g, 'tags', jsonb_build_array('a', 'b')), now()
               FROM generate_series(1, 100) g",
            &[&tenant],
        )
        .await
        .expect("insert orders");
        src.execute("INSERT INTO events SELECT $1, g, 'click', repeat('x', 300), now() FROM generate_series(1, 100) g", &[&tenant])
            .await
            .expect("insert events");
    }
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;

    // Updates (also of the key) and deletes, in several transactions.
    src.batch_execute(
        "UPDATE orders SET status = 'paid', amount = amount + 1 WHERE id % 3 = 0;
         UPDATE accounts SET id = id + 1000 WHERE tenant_id = 'tenant-123' AND id <= 5;
         DELETE FROM events WHERE id % 4 = 0;
         BEGIN; UPDATE orders SET payload = payload || '{\"x\": 1}' WHERE id < 10; DELETE FROM orders WHERE id > 90; COMMIT;",
    )
    .await
    .expect("updates");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;

    // TRUNCATE removes the tenant's rows of that table on the target.
    src.batch_execute("TRUNCATE events")
        .await
        .expect("truncate");
    src.execute(
        "INSERT INTO events VALUES ('tenant-123', 1, 'after', 'truncate', now())",
        &[],
    )
    .await
    .expect("insert");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;

    let dst = env.dst().await;
    assert_eq!(
        foreign_rows(&dst).await,
        0,
        "rows of other tenants reached the target"
    );
    let (n, _) = tenant_digest(&dst, "accounts", TENANT).await;
    assert_eq!(n, 50);

    // Progress is recorded on the target.
    let row = dst
        .query_one(
            "SELECT end_lsn::text FROM heliosdb_replication.progress WHERE tenant_id = $1",
            &[&TENANT],
        )
        .await
        .expect("progress row");
    let end_lsn: String = row.get(0);
    assert_ne!(end_lsn, "0/0");

    let (status, took) = daemon.terminate();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        daemon.log()
    );
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
}
