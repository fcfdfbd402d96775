//! Table definitions that change on the source, mid-stream, under both
//! `[cdc] schema_changes` settings, on real clusters.

mod common;

use std::time::Duration;

use common::*;

async fn step(env: &Env, daemon: &Daemon, sql: &str) {
    env.src()
        .await
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    wait_tenant_equal(env, &["orders"], Duration::from_secs(30), daemon).await;
}

async fn target_columns(env: &Env) -> Vec<String> {
    env.dst()
        .await
        .query(
            "SELECT attname || ' ' || format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = 'orders'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_are_applied_before_the_rows_that_use_them() {
    let (env, config) = Env::provisioned(SCHEMA).await;
    let daemon = env.start_daemon(&config);
    step(&env, &daemon, "INSERT INTO orders SELECT t, g, g, 'new', g, '{}', now() FROM generate_series(1, 200) g, (VALUES ('tenant-123'), ('tenant-456')) v(t)").await;

    // ADD COLUMN with a default: existing rows get it on the source without a
    // single row change; the target's existing rows must get the same value.
    step(&env, &daemon, "ALTER TABLE orders ADD COLUMN discount numeric DEFAULT 5;
                          INSERT INTO orders VALUES ('tenant-123', 1000, 1, 'new', 1, '{}', now(), 7.5)").await;
    // ADD COLUMN without default, used in the same transaction.
    step(
        &env,
        &daemon,
        "BEGIN; ALTER TABLE orders ADD COLUMN note text;
                          UPDATE orders SET note = 'hello ' || id WHERE id % 10 = 0; COMMIT;",
    )
    .await;
    // RENAME COLUMN keeps the values.
    step(
        &env,
        &daemon,
        "ALTER TABLE orders RENAME COLUMN note TO remark;
                          UPDATE orders SET status = 'renamed' WHERE id % 7 = 0;",
    )
    .await;
    // ALTER TYPE (the source rewrites the table, no row changes are sent).
    step(&env, &daemon, "ALTER TABLE orders ALTER COLUMN account_id TYPE numeric(20,2);
                          INSERT INTO orders VALUES ('tenant-123', 1001, 12.34, 'new', 1, '{}', now(), 1, 'typed')").await;
    // DROP COLUMN.
    step(&env, &daemon, "ALTER TABLE orders DROP COLUMN remark;
                          INSERT INTO orders VALUES ('tenant-123', 1002, 1, 'new', 1, '{}', now(), 2)").await;
    // A volatile default rewrites every row with values the stream never
    // carries: the table is copied again.
    step(&env, &daemon, "ALTER TABLE orders ADD COLUMN token text DEFAULT md5(random()::text);
                          INSERT INTO orders (tenant_id, id, status) VALUES ('tenant-123', 1003, 'new')").await;

    assert_eq!(
        target_columns(&env).await,
        [
            "tenant_id text",
            "id bigint",
            "account_id numeric(20,2)",
            "status text",
            "amount numeric",
            "payload jsonb",
            "created_at timestamp with time zone",
            "discount numeric",
            "token text"
        ]
    );
    let row = env
        .dst()
        .await
        .query_one(
            "SELECT discount::text FROM orders WHERE tenant_id = 'tenant-123' AND id = 1",
            &[],
        )
        .await
        .expect("row");
    assert_eq!(
        row.get::<_, String>(0),
        "5",
        "existing rows got the source's default"
    );
    assert_eq!(foreign_rows(&env.dst().await).await, 0);
    assert!(daemon.log().contains("schema change applied to the target"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_stops_with_the_table_and_the_change_and_resumes_once_fixed() {
    let env = Env::new(SCHEMA).await;
    let text = env.config_text("").replace(
        "checkpoint_dir =",
        "schema_changes = \"halt\"\ncheckpoint_dir =",
    );
    let config = env.write_config("replication.toml", &text);
    env.init(&config);
    let mut daemon = env.start_daemon(&config);
    step(&env, &daemon, "INSERT INTO orders SELECT 'tenant-123', g, g, 'new', g, '{}', now() FROM generate_series(1, 100) g").await;

    env.src()
        .await
        .batch_execute("ALTER TABLE orders ADD COLUMN discount numeric DEFAULT 5; INSERT INTO orders VALUES ('tenant-123', 500, 1, 'new', 1, '{}', now(), 9)")
        .await
        .expect("ddl");
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)), Some(3));
    let log = daemon.log();
    assert!(
        log.contains(
            "schema change on the source, table public.orders: column discount added (numeric)"
        ),
        "{log}"
    );
    assert!(log.contains("schema_changes = \"apply\""), "{log}");
    // Nothing of that transaction was applied.
    assert_eq!(tenant_count(&env.dst().await, "orders", TENANT).await, 100);

    // The operator applies the change; replication resumes where it stopped.
    env.dst()
        .await
        .batch_execute("ALTER TABLE orders ADD COLUMN discount numeric DEFAULT 5")
        .await
        .expect("fix");
    let daemon = env.start_daemon(&config);
    wait_tenant_equal(&env, &["orders"], Duration::from_secs(30), &daemon).await;

    // A rename under halt is named too.
    env.src().await.batch_execute("ALTER TABLE orders RENAME COLUMN status TO state; UPDATE orders SET state = 'x' WHERE id = 1").await.expect("rename");
    let mut daemon = daemon;
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)), Some(3));
    let log = daemon.log();
    assert!(log.contains("column status renamed to state"), "{log}");

    // Fixed by hand; then a DROP and a type change, each stopping the tenant.
    env.dst()
        .await
        .batch_execute("ALTER TABLE orders RENAME COLUMN status TO state")
        .await
        .expect("fix rename");
    for (ddl, fix, needle) in [
        (
            "ALTER TABLE orders DROP COLUMN discount; UPDATE orders SET state = 'y' WHERE id = 2",
            "ALTER TABLE orders DROP COLUMN discount",
            // Seen within the session: a drop; after a restart: a column no longer sent.
            &["column discount dropped", "column discount is no longer sent by the source"][..],
        ),
        (
            "ALTER TABLE orders ALTER COLUMN account_id TYPE numeric(20,2); UPDATE orders SET state = 'z' WHERE id = 3",
            "ALTER TABLE orders ALTER COLUMN account_id TYPE numeric(20,2)",
            &["column account_id changed to type numeric(20,2)"][..],
        ),
    ] {
        let mut daemon = env.start_daemon(&config);
        wait_tenant_equal(&env, &["orders"], Duration::from_secs(30), &daemon).await;
        env.src().await.batch_execute(ddl).await.expect("ddl");
            assert_eq!(daemon.wait_exit(Duration::from_secs(30)), Some(3));
        let log = daemon.log();
        assert!(needle.iter().any(|n| log.contains(n)), "{needle:?}: {log}");
        env.dst().await.batch_execute(fix).await.expect("fix");
    }
    let daemon = env.start_daemon(&config);
    wait_tenant_equal(&env, &["orders"], Duration::from_secs(30), &daemon).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_changed_outside_replication_stops_the_tenant_until_restored_and_resynced() {
    let (env, config) = Env::provisioned(SCHEMA).await;
    let mut daemon = env.start_daemon(&config);
    step(&env, &daemon, "INSERT INTO orders SELECT 'tenant-123', g, g, 'new', g * 1.5, '{}', now() FROM generate_series(1, 200) g").await;

    // A narrowed type rounds every value: found while streaming.
    env.dst()
        .await
        .batch_execute("ALTER TABLE orders ALTER COLUMN amount TYPE int")
        .await
        .expect("narrow on the target");
    daemon.assert_stops_with(&[
        "target table public.orders was changed outside replication",
        "column amount is integer, replication made it numeric",
        "ALTER TABLE \"public\".\"orders\" ALTER COLUMN \"amount\" TYPE numeric",
        "resync --table public.orders",
    ]);
    // A restart changes nothing about it.
    let mut again = env.start_daemon(&config);
    assert_eq!(again.wait_exit(Duration::from_secs(30)), Some(3));

    // A dropped column is not added back empty after a restart either.
    let dst = env.dst().await;
    dst.batch_execute("ALTER TABLE orders DROP COLUMN status")
        .await
        .expect("drop on the target");
    env.src()
        .await
        .batch_execute("UPDATE orders SET status = 'paid' WHERE id <= 10")
        .await
        .expect("source change");
    let mut third = env.start_daemon(&config);
    assert_eq!(third.wait_exit(Duration::from_secs(30)), Some(3));
    assert!(
        third.log().contains("column status (text) was dropped"),
        "{}",
        third.log()
    );
    assert!(!target_columns(&env)
        .await
        .iter()
        .any(|c| c.starts_with("status")));

    // The fix named: restore, resync the table; then the rows equal the source's.
    dst.batch_execute(
        "ALTER TABLE orders ALTER COLUMN amount TYPE numeric; ALTER TABLE orders ADD COLUMN status text",
    )
    .await
    .expect("restore");
    let out = run(&config, &["resync", "--table", "public.orders"]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    let daemon = Daemon::start(&config, &env.dir.path().join("after-the-fix.log"));
    // Column by column: `status` is the target's last column now.
    let rows = "SELECT coalesce(string_agg(concat_ws('|', id, account_id, status, amount, payload, created_at), ','
                  ORDER BY id), '') FROM orders WHERE tenant_id = 'tenant-123'";
    let src = env.src().await;
    let want: String = src.query_one(rows, &[]).await.expect("source rows").get(0);
    assert!(want.contains("|paid|") && want.contains("|1.5|"), "{want}");
    wait_until(Duration::from_secs(30), "the resynced rows", || async {
        dst.query_one(rows, &[])
            .await
            .expect("target rows")
            .get::<_, String>(0)
            == want
    })
    .await;
    assert!(!daemon.log().contains("ERROR"), "{}", daemon.log());
    assert_eq!(foreign_rows(&env.dst().await).await, 0);
}

/// A column dropped on the target after `init` copied the tenant's rows,
/// before any change streamed: drift (the copied values are gone), never a
/// source column to add back empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_dropped_between_the_copy_and_the_first_change_is_drift() {
    let env = Env::new(SCHEMA).await;
    env.src()
        .await
        .batch_execute("INSERT INTO orders SELECT 'tenant-123', g, g, 'new', g, '{}', now() FROM generate_series(1, 50) g")
        .await
        .expect("rows");
    let config = env.config();
    env.init(&config);
    env.dst()
        .await
        .batch_execute("ALTER TABLE orders DROP COLUMN status")
        .await
        .expect("drop on the target");
    let mut daemon = env.start_daemon(&config);
    daemon.assert_stops_with(&[
        "target table public.orders was changed outside replication",
        "column status (text) was dropped",
        "resync --table public.orders",
    ]);
    assert!(!target_columns(&env).await.iter().any(|c| c == "status"));
}
