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
    let mut daemon = env.start_daemon(&config);
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

const TYPED: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE typed(
    tenant_id text, id bigint,
    n numeric, ts timestamptz, d date, iv interval, j jsonb, b bytea,
    ints int[], texts text[], u uuid, m mood, t text, f8 float8, f4 real, flag boolean,
    PRIMARY KEY (tenant_id, id));
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_keep_full_fidelity() {
    let (env, config) = Env::provisioned(TYPED).await;
    let daemon = env.start_daemon(&config);
    let src = env.src().await;
    let big = format!("-{}.{}", "7".repeat(1000), "1".repeat(100));
    src.batch_execute(&format!(
        "INSERT INTO typed VALUES
          ('tenant-123', 1, 'NaN', 'infinity', 'infinity', '1 year 2 mons 3 days 04:05:06.789',
           '{{\"a\": [1, 2.50, null, {{\"b\": \"é\"}}]}}', '\\x00ff10', '{{1,NULL,3}}', '{{\"a,b\",NULL,\"c\\\"d\",\"\"}}',
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'happy', 'héllo wörld 你好 🎉 \t tab', 'NaN', '-0', true),
          ('tenant-123', 2, '{big}', '-infinity', '-infinity', '-178000000 years', 'null', '\\x', '{{}}', '{{}}',
           NULL, 'sad', '', 'Infinity', '3.4028235e38', false),
          ('tenant-123', 3, '-0.000000000000000000000000000001', '2026-11-26 12:34:56.123456+05:30', '4713-01-01 BC', '-1 day',
           '[]', NULL, NULL, NULL, NULL, NULL, NULL, 1.7976931348623157e308, 1.17549435e-38, NULL),
          ('tenant-123', 4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
          ('tenant-456', 1, 1, now(), now(), '1 day', '{{}}', '\\x01', '{{1}}', '{{a}}', gen_random_uuid(), 'ok', 'other', 1, 1, true);",
    ))
    .await
    .expect("insert typed rows");
    src.batch_execute(&format!(
        "UPDATE typed SET n = '{big}' WHERE id = 3 AND tenant_id = 'tenant-123'",
        big = "9".repeat(1000) + ".0000001"
    ))
    .await
    .expect("update big numeric");
    wait_tenant_equal(&env, &["typed"], Duration::from_secs(30), &daemon).await;

    // Beyond text equality: the values compare equal as their own types.
    let dst = env.dst().await;
    let row = dst
        .query_one(
            "SELECT n::text, length(n::text) FROM typed WHERE tenant_id = 'tenant-123' AND id = 3",
            &[],
        )
        .await
        .expect("row 3");
    let (n, len): (String, i32) = (row.get(0), row.get(1));
    assert!(
        n.starts_with("999999999"),
        "row 3 after the tenant compared equal: {n}\ndaemon log:\n{}",
        daemon.log()
    );
    assert_eq!(len, 1008);
    let row = dst
        .query_one("SELECT n = 'NaN', ts = 'infinity', t FROM typed WHERE tenant_id = 'tenant-123' AND id = 1", &[])
        .await
        .expect("row 1");
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1));
    assert_eq!(row.get::<_, String>(2), "héllo wörld 你好 🎉 \t tab");
    assert_eq!(foreign_rows_of(&dst, "typed").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_values_are_kept_across_updates() {
    let (env, config) = Env::provisioned(SCHEMA).await;
    let daemon = env.start_daemon(&config);
    let src = env.src().await;
    // ~190 KB of poorly compressible text: stored out of line (TOAST).
    src.batch_execute(
        "INSERT INTO events SELECT 'tenant-123', g, 'big', (SELECT string_agg(md5(g::text || s.i::text || random()::text), '') FROM generate_series(1, 6000) AS s(i)), now()
           FROM generate_series(1, 3) g;",
    )
    .await
    .expect("insert toasted rows");
    wait_tenant_equal(&env, &["events"], Duration::from_secs(30), &daemon).await;

    // Updates of other columns send the big value as 'unchanged'.
    src.batch_execute(
        "UPDATE events SET kind = 'edited' WHERE tenant_id = 'tenant-123' AND id = 1;
         BEGIN; UPDATE events SET kind = 'twice' WHERE id = 2; UPDATE events SET created_at = now() WHERE id = 2; COMMIT;
         UPDATE events SET id = 30 WHERE tenant_id = 'tenant-123' AND id = 3;",
    )
    .await
    .expect("update other columns");
    wait_tenant_equal(&env, &["events"], Duration::from_secs(30), &daemon).await;
    let dst = env.dst().await;
    let row = dst
        .query_one(
            "SELECT min(length(body)), count(*) FROM events WHERE tenant_id = 'tenant-123'",
            &[],
        )
        .await
        .expect("lengths");
    assert_eq!(row.get::<_, i32>(0), 192_000, "big values kept");
    assert_eq!(row.get::<_, i64>(1), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200k_row_transaction_replicates_and_is_never_half_visible() {
    let (env, config) = Env::provisioned(SCHEMA).await;
    let daemon = env.start_daemon(&config);
    let src = env.src().await;
    src.batch_execute(
        "INSERT INTO events SELECT CASE WHEN g % 10 = 0 THEN 'tenant-456' ELSE 'tenant-123' END, g, 'bulk', md5(g::text), now()
           FROM generate_series(1, 222222) g",
    )
    .await
    .expect("one big transaction");
    let expected: i64 = src
        .query_one(
            "SELECT count(*) FROM events WHERE tenant_id = 'tenant-123'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(expected, 200_000);
    // Watch the target while it applies: nothing or everything.
    let dst = env.dst().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let n: i64 = dst
            .query_one("SELECT count(*) FROM events", &[])
            .await
            .expect("count")
            .get(0);
        assert!(
            n == 0 || n == expected,
            "target shows {n} of {expected} rows: a half-applied transaction"
        );
        if n == expected {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_tenant_equal(&env, &["events"]).await;
    assert_eq!(foreign_rows(&dst).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tenant_does_not_hold_back_the_slot() {
    let (env, config) = Env::provisioned(SCHEMA).await;
    let daemon = env.start_daemon(&config);
    let src = env.src().await;
    // Only other tenants write: nothing reaches our target, yet the slot must move.
    let after = other_tenant_writes(&src).await;
    wait_slot_confirmed(&src, &after).await;
    assert_eq!(
        tenant_digest(&env.dst().await, "events", "tenant-456")
            .await
            .0,
        0
    );
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_of_several_tables_and_cascade_removes_only_the_tenants_rows() {
    let schema = format!(
        "{SCHEMA}
         CREATE TABLE order_items(tenant_id text, id bigint, order_id bigint, sku text, PRIMARY KEY (tenant_id, id),
                                  FOREIGN KEY (tenant_id, order_id) REFERENCES orders (tenant_id, id));"
    );
    let (env, config) = Env::provisioned(&schema).await;
    let daemon = env.start_daemon(&config);
    let src = env.src().await;
    // The target holds another tenant's rows too (another daemon writes them there).
    env.dst()
        .await
        .batch_execute(
            "INSERT INTO orders VALUES ('tenant-999', 1, 0, 'other daemon', 0, '{}', now());
             INSERT INTO order_items VALUES ('tenant-999', 1, 1, 'x');
             INSERT INTO events VALUES ('tenant-999', 1, 'k', 'b', now());",
        )
        .await
        .expect("other tenant on the target");
    let tables = ["accounts", "orders", "events", "order_items"];
    src.batch_execute(
        "INSERT INTO accounts SELECT t, g, 'n', 'e', 1, now() FROM generate_series(1, 50) g, (VALUES ('tenant-123'), ('tenant-456')) v(t);
         INSERT INTO orders SELECT t, g, 1, 'new', 1, '{}', now() FROM generate_series(1, 50) g, (VALUES ('tenant-123'), ('tenant-456')) v(t);
         INSERT INTO order_items SELECT t, g, g, 'sku' FROM generate_series(1, 50) g, (VALUES ('tenant-123'), ('tenant-456')) v(t);
         INSERT INTO events SELECT t, g, 'k', 'b', now() FROM generate_series(1, 50) g, (VALUES ('tenant-123'), ('tenant-456')) v(t);",
    )
    .await
    .expect("rows");
    wait_tenant_equal(&env, &tables, Duration::from_secs(30), &daemon).await;

    src.batch_execute("TRUNCATE accounts, events")
        .await
        .expect("two tables at once");
    src.batch_execute("TRUNCATE orders CASCADE")
        .await
        .expect("cascade to order_items");
    src.batch_execute("INSERT INTO orders VALUES ('tenant-123', 7, 1, 'after', 1, '{}', now())")
        .await
        .expect("row after");
    wait_tenant_equal(&env, &tables, Duration::from_secs(30), &daemon).await;
    let dst = env.dst().await;
    for t in tables {
        let n = tenant_count(&dst, t, "tenant-999").await;
        assert_eq!(
            n,
            1 - i64::from(t == "accounts"),
            "{t}: the other tenant's rows on the target were touched"
        );
    }
    assert_eq!(tenant_count(&dst, "order_items", TENANT).await, 0);
    assert_eq!(tenant_count(&dst, "orders", TENANT).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraints_the_batch_order_breaks_fall_back_to_source_order_and_real_violations_stop() {
    let schema =
        format!("{SCHEMA} CREATE UNIQUE INDEX accounts_email ON accounts (tenant_id, email);");
    let (env, config) = Env::provisioned(&schema).await;
    let mut daemon = env.start_daemon(&config);
    let src = env.src().await;
    src.batch_execute(
        "INSERT INTO accounts VALUES ('tenant-123', 1, 'a', 'x@example.com', 1, now()), ('tenant-123', 2, 'b', 'y@example.com', 1, now())",
    )
    .await
    .expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    // Swap two unique values in one transaction: valid in source order,
    // a unique violation when coalesced into one statement.
    src.batch_execute(
        "BEGIN;
         UPDATE accounts SET email = 'tmp@example.com' WHERE id = 1;
         UPDATE accounts SET email = 'x@example.com' WHERE id = 2;
         UPDATE accounts SET email = 'y@example.com' WHERE id = 1;
         COMMIT;",
    )
    .await
    .expect("swap");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;

    // A constraint only the target has: the tenant stops, naming table and key.
    env.dst()
        .await
        .batch_execute("ALTER TABLE orders ADD CONSTRAINT positive CHECK (amount >= 0)")
        .await
        .expect("check");
    src.batch_execute("INSERT INTO orders VALUES ('tenant-123', 5, 0, 'refund', -10, '{}', now())")
        .await
        .expect("row");
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)), Some(3));
    let log = daemon.log();
    assert!(
        log.contains("target rejected a change to public.orders (primary key tenant-123, 5)"),
        "{log}"
    );
    assert!(
        log.contains("violates check constraint \"positive\""),
        "{log}"
    );
    assert!(
        !log.contains("Failing row contains") && !log.contains("refund"),
        "row values in the log:\n{log}"
    );
}

/// A backlog (source commits more than a second old when read) is applied
/// in few, large target transactions, not one per source commit whenever
/// the queue runs empty (it does whenever the walsender is the slower side).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_applied_in_few_large_target_transactions() {
    let env = Env::new(SCHEMA).await;
    let config = env.config();
    env.init(&config);
    let (metrics_port, _) = monitoring_ports(&config);
    let src = env.src().await;
    make_backlog(&src, 1, 400).await;
    let daemon = env.start_daemon(&config);
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &daemon).await;
    let (_, metrics) = http_get(metrics_port, "/metrics").await.expect("metrics");
    let commits = metric_value(
        &metrics,
        "heliosdb_apply_batch_duration_seconds_count",
        &["tenant_id=\"tenant-123\""],
    )
    .expect("target transactions in the metrics");
    assert!(
        (1.0..=10.0).contains(&commits),
        "400 source transactions went in {commits} target transactions\n{}",
        daemon.log()
    );
    // Reads were paced during the backlog; the first live change after it,
    // a few bytes on the socket, still arrives.
    src.execute(
        "INSERT INTO accounts VALUES ($1, 100000, 'live', 'l@x', 1, now())",
        &[&TENANT],
    )
    .await
    .expect("live insert");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(10), &daemon).await;
}
