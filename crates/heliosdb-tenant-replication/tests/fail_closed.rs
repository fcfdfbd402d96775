//! Settings and events that would make the result wrong stop the tenant
//! with the fix named, never a warning followed by wrong data.

mod common;

use std::time::Duration;

use common::*;

async fn write(env: &Env, sql: &str) {
    env.src()
        .await
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_is_a_gap_init_refuses_and_init_resync_closes() {
    let (env, config) = Env::provisioned(SCHEMA).await;
    let (metrics_port, _) = monitoring_ports(&config);
    let mut daemon = env.start_daemon(&config);
    write(&env, "INSERT INTO orders SELECT 'tenant-123', g, 1, 'new', g, '{}', now() FROM generate_series(1, 100) g").await;
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    // Every tenant's error and conflict series exist at 0 on a healthy node.
    let (_, metrics) = http_get(metrics_port, "/metrics").await.expect("metrics");
    for (name, label) in [
        (
            "heliosdb_replication_errors_total",
            "error_type=\"target_database\"",
        ),
        (
            "heliosdb_replication_errors_total",
            "error_type=\"replication_stream\"",
        ),
        (
            "heliosdb_replication_conflicts_total",
            "strategy=\"SourcePreferred\"",
        ),
    ] {
        assert_eq!(
            metric_value(&metrics, name, &[label, "tenant_id=\"tenant-123\""]),
            Some(0.0),
            "{name}{{{label}}}:\n{metrics}"
        );
    }
    assert_eq!(daemon.terminate().0.code(), Some(0));

    // The slot goes; changes made meanwhile are captured by no one.
    write(&env, "SELECT pg_drop_replication_slot('tenant_123_slot')").await;
    write(&env, "UPDATE orders SET status = 'in the gap' WHERE id <= 10;
                 DELETE FROM orders WHERE id > 90;
                 INSERT INTO orders SELECT 'tenant-123', g, 1, 'gap', g, '{}', now() FROM generate_series(500, 520) g").await;
    assert_fails(&config, &["start"], 3, &["does not exist", "init"]);
    assert_fails(
        &config,
        &["init"],
        3,
        &["which no longer exists", "never captured", "init --resync"],
    );
    // Refused: nothing was created.
    let slots: i64 = env
        .src()
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'tenant_123_slot'",
            &[],
        )
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 0);
    // Made again by hand (as the deployment guide's §5.5 suggests), the slot
    // starts from now: start finds the gap too.
    write(
        &env,
        "SELECT pg_create_logical_replication_slot('tenant_123_slot', 'pgoutput')",
    )
    .await;
    assert_fails(
        &config,
        &["start"],
        3,
        &["delivers changes from", "never replicated", "init --resync"],
    );

    let out = env.init_with(&config, &["--resync"]);
    assert!(out.contains("deleted, to be copied again"), "{out}");
    let daemon = env.start_daemon(&config);
    write(
        &env,
        "INSERT INTO orders VALUES ('tenant-123', 1000, 1, 'after', 1, '{}', now())",
    )
    .await;
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    assert_eq!(foreign_rows(&env.dst().await).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_stops_the_tenant_with_the_fix() {
    let (env, config) = Env::provisioned(SCHEMA).await;
    // The slot may hold back 1 MB of WAL; 4 segments go by while nobody reads it.
    write(&env, "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'").await;
    write(&env, "SELECT pg_reload_conf()").await;
    let src = env.src().await;
    wait_until(Duration::from_secs(60), "the slot to be invalidated", || async {
        src.batch_execute(
            "INSERT INTO events VALUES ('tenant-456', (random() * 1e9)::bigint, 'k', 'b', now());
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await
        .expect("switch");
        src.query_one(
            "SELECT wal_status = 'lost' FROM pg_replication_slots WHERE slot_name = 'tenant_123_slot'",
            &[],
        )
        .await
        .expect("slot")
        .get::<_, bool>(0)
    })
    .await;
    assert_fails(
        &config,
        &["start"],
        3,
        &[
            "was invalidated",
            "pg_drop_replication_slot",
            "init --resync",
        ],
    );
    assert_fails(&config, &["init"], 3, &["was invalidated", "init --resync"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_time_strategies_refuse_a_target_without_commit_timestamps() {
    let mut env = Env::new(SCHEMA).await;
    env.target
        .reconfigure(&[("track_commit_timestamp", "off")])
        .expect("restart without commit timestamps");
    for strategy in ["LastWriteWins", "VectorClock"] {
        let text = env.config_text(&format!(
            "[conflict]\nresolution_strategy = \"{strategy}\"\n"
        ));
        let config = env.write_config("replication.toml", &text);
        env.init(&config);
        let mut daemon = env.start_daemon(&config);
        daemon.assert_stops_with(&[
            "track_commit_timestamp is off",
            "ALTER SYSTEM SET track_commit_timestamp = on",
            strategy,
        ]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_values_never_reach_the_log_at_debug() {
    let (env, config) = Env::provisioned(SCHEMA).await;
    let daemon = Daemon::start_logging(&config, &env.dir.path().join("debug.log"), "debug");
    write(
        &env,
        "INSERT INTO accounts VALUES ('tenant-123', 1, 'canary-name-4711', 'canary@x', 1, now());
                 UPDATE accounts SET email = 'canary-mail-4712' WHERE id = 1",
    )
    .await;
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    let log = daemon.log();
    assert!(log.contains("DEBUG"), "debug logging is on:\n{log}");
    for canary in ["canary-name-4711", "canary-mail-4712", "canary@x"] {
        assert!(!log.contains(canary), "{canary} in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_back_off_starts_anew_after_a_session_that_made_progress() {
    let (mut env, config) = Env::provisioned(SCHEMA).await;
    let daemon = env.start_daemon(&config);
    let insert = |from: i64| {
        format!("INSERT INTO accounts SELECT 'tenant-123', g, 'n', 'e', g, now() FROM generate_series({from}, {from} + 9) g")
    };
    write(&env, &insert(1)).await;
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;

    // A long outage: the back-off grows (200 ms, 400, 800, 1600, …).
    env.target.stop().expect("stop target");
    write(&env, &insert(100)).await;
    wait_for_log(&daemon, "attempt=4 ", Duration::from_secs(30)).await;
    env.target.start_again().expect("start target");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &daemon).await;

    // A short cut after the session applied rows retries at the base delay.
    let before = daemon.log().len();
    env.target.stop().expect("stop target");
    write(&env, &insert(200)).await;
    wait_until(
        Duration::from_secs(30),
        "a retry after the second cut",
        || async { daemon.log()[before..].contains("replication interrupted; retrying") },
    )
    .await;
    let after = daemon.log()[before..].to_string();
    assert!(
        after.contains("attempt=1 retry_in_ms=200"),
        "the back-off did not start anew:\n{after}"
    );
    env.target.start_again().expect("start target");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &daemon).await;
}

/// A tenant id the tenant column's type writes differently (a uuid in
/// capitals, an integer with leading zeros) matches in SQL and in the row
/// filter but would never match the text rows are routed by: refused at
/// `init` and `start`, naming the form to write; in that form it replicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_id_the_column_type_writes_differently_is_refused_with_its_form() {
    let schema = "CREATE TABLE docs(tenant_id uuid, id bigint, body text, PRIMARY KEY (tenant_id, id));
                  CREATE TABLE counters(tenant_id int, id bigint, n int, PRIMARY KEY (tenant_id, id));";
    let env = Env::new(schema).await;
    let upper = "0E984725-C51C-4BF4-9960-E1C80E27ABA0";
    let lower = upper.to_lowercase();
    env.src()
        .await
        .batch_execute(&format!(
            "INSERT INTO docs SELECT '{upper}', g, 'b' FROM generate_series(1, 20) g;
             INSERT INTO docs SELECT gen_random_uuid(), g, 'other' FROM generate_series(1, 5) g;"
        ))
        .await
        .expect("rows");
    env.src()
        .await
        .batch_execute("DROP TABLE counters")
        .await
        .expect("drop");
    env.dst()
        .await
        .batch_execute("DROP TABLE counters")
        .await
        .expect("drop");
    let config = env.write_config("uuid.toml", &env.config_text("").replace(TENANT, upper));
    let refused = [
        format!("written '{lower}'"),
        format!("tenant_id = '{lower}'"),
    ];
    let refused: Vec<&str> = refused.iter().map(String::as_str).collect();
    assert_fails(&config, &["init"], 3, &refused);
    // A slot and publication made by hand with that id: `start` refuses too.
    let src = env.src().await;
    for sql in [
        format!("CREATE PUBLICATION tenant_123_pub FOR TABLE docs WHERE (tenant_id = '{upper}')"),
        "SELECT pg_create_logical_replication_slot('tenant_123_slot', 'pgoutput')".to_string(),
    ] {
        src.batch_execute(&sql).await.expect("by hand");
    }
    assert_fails(&config, &["start"], 3, &refused);
    for sql in [
        "DROP PUBLICATION tenant_123_pub",
        "SELECT pg_drop_replication_slot('tenant_123_slot')",
    ] {
        src.batch_execute(sql).await.expect("drop");
    }
    let config = env.write_config("uuid.toml", &env.config_text("").replace(TENANT, &lower));
    env.init(&config);
    let daemon = env.start_daemon(&config);
    env.src()
        .await
        .batch_execute(&format!(
            "INSERT INTO docs VALUES ('{lower}', 100, 'after')"
        ))
        .await
        .expect("row");
    wait_until(Duration::from_secs(30), "the tenant's rows", || async {
        env.dst()
            .await
            .query_one("SELECT count(*) FROM docs", &[])
            .await
            .map(|r| r.get::<_, i64>(0) == 21)
            .unwrap_or(false)
    })
    .await;
    drop(daemon);

    // An integer column: '007' is written 7.
    let env = Env::new(
        "CREATE TABLE counters(tenant_id int, id bigint, n int, PRIMARY KEY (tenant_id, id));",
    )
    .await;
    env.src()
        .await
        .batch_execute("INSERT INTO counters VALUES (7, 1, 1)")
        .await
        .expect("row");
    let config = env.write_config("int.toml", &env.config_text("").replace(TENANT, "007"));
    assert_fails(&config, &["init"], 3, &["written '7'"]);
}
