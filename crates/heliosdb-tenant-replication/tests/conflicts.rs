//! A one-way replica that someone wrote to directly: the divergence is
//! detected when the source's changes meet it, resolved SourcePreferred, and
//! logged everywhere an operator looks.

mod common;

use std::time::Duration;

use common::*;

/// Wait until the marker row `events.id = id`, written after a test's
/// changes, is on the target: everything before it is applied.
async fn wait_marker(dst: &tokio_postgres::Client, id: i64) {
    wait_until(Duration::from_secs(30), &format!("marker {id}"), || async {
        dst.query_opt("SELECT 1 FROM events WHERE id = $1", &[&id])
            .await
            .expect("marker")
            .is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_to_the_replica_are_detected_logged_and_resolved_source_preferred() {
    let env = Env::new(SCHEMA).await;
    let dir = env.dir.path();
    let conflicts_file = dir.join("conflicts.log");
    let audit_file = dir.join("audit.log");
    let text = env.config_text("").replace(
        "[monitoring]\n",
        &format!(
            "[monitoring]\nenable_audit_log = true\naudit_log_path = \"{}\"\n",
            audit_file.display()
        ),
    ) + &format!(
        "\n[conflict]\nresolution_strategy = \"SourcePreferred\"\nlog_conflicts = true\nconflict_log_path = \"{}\"\nsensitive_tables = [\"orders\"]\n",
        conflicts_file.display()
    );
    let config = env.write_config("replication.toml", &text);
    env.init(&config);
    let (metrics_port, _) = monitoring_ports(&config);
    let daemon = env.start_daemon(&config);
    let (src, dst) = (env.src().await, env.dst().await);
    src.batch_execute("INSERT INTO accounts SELECT 'tenant-123', g, 'n' || g, 'e', g, now() FROM generate_series(1, 10) g")
        .await
        .expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    assert_eq!(
        conflicts_logged(&dst).await,
        0,
        "ordinary replication has no conflicts"
    );

    // Someone writes to the replica directly.
    dst.batch_execute(
        "DELETE FROM accounts WHERE tenant_id = 'tenant-123' AND id IN (1, 2);
         INSERT INTO accounts VALUES ('tenant-123', 100, 'made on the replica', 'x', 0, now());
         UPDATE accounts SET name = 'edited on the replica' WHERE tenant_id = 'tenant-123' AND id = 3;
         INSERT INTO orders VALUES ('tenant-123', 7, 1, 'replica', 1, '{}', now());",
    )
    .await
    .expect("direct writes");
    // The source's changes meet the divergence.
    src.batch_execute(
        "BEGIN;
         UPDATE accounts SET balance = balance + 1 WHERE tenant_id = 'tenant-123' AND id = 1;
         DELETE FROM accounts WHERE tenant_id = 'tenant-123' AND id = 2;
         INSERT INTO accounts VALUES ('tenant-123', 100, 'made on the source', 'y', 5, now());
         UPDATE accounts SET balance = 42 WHERE tenant_id = 'tenant-123' AND id = 3;
         INSERT INTO orders VALUES ('tenant-123', 7, 1, 'source', 2, '{}', now());
         COMMIT;",
    )
    .await
    .expect("source changes");
    // SourcePreferred: the source's rows win, the tenant converges.
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;

    let rows = dst
        .query(
            "SELECT table_name, primary_key::text, conflict_type, resolution_strategy, winner
               FROM heliosdb_replication.heliosdb_conflict_log WHERE tenant_id = $1
              ORDER BY conflict_type, table_name",
            &[&TENANT],
        )
        .await
        .expect("conflict log table");
    let got: Vec<(String, String, String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let pk = |id: i32| format!("{{\"id\": \"{id}\", \"tenant_id\": \"tenant-123\"}}");
    let expect = |id, kind: &str| {
        (
            if id == 7 {
                "public.orders"
            } else {
                "public.accounts"
            }
            .to_string(),
            pk(id),
            kind.to_string(),
            "SourcePreferred".to_string(),
            "source".to_string(),
        )
    };
    assert_eq!(
        got,
        vec![
            expect(2, "delete_missing"),
            expect(100, "insert_exists"),
            expect(7, "insert_exists"),
            expect(1, "update_missing"),
            expect(3, "update_origin_differs"),
        ],
    );
    // Both row images, except for the table marked sensitive.
    let images: Vec<(String, Option<String>, Option<String>)> = dst
        .query(
            "SELECT table_name || ':' || conflict_type, source_row::text, target_row::text
               FROM heliosdb_replication.heliosdb_conflict_log ORDER BY id",
            &[],
        )
        .await
        .expect("images")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let image = |what: &str| {
        images
            .iter()
            .find(|(w, ..)| w == what)
            .cloned()
            .unwrap_or_else(|| panic!("{what} in {images:?}"))
    };
    let (_, source_row, target_row) = image("public.accounts:insert_exists");
    assert!(source_row.is_some_and(|r| r.contains("made on the source")));
    assert!(target_row.is_some_and(|r| r.contains("made on the replica")));
    let (_, source_row, target_row) = image("public.accounts:update_origin_differs");
    assert!(source_row.is_some_and(|r| r.contains("\"balance\": \"42\"")));
    assert!(target_row.is_some_and(|r| r.contains("edited on the replica")));
    assert_eq!(image("public.orders:insert_exists").1, None);
    assert_eq!(image("public.orders:insert_exists").2, None);
    // SourcePreferred: the source's rows are on the target.
    let name: String = dst
        .query_one("SELECT name FROM accounts WHERE id = 3", &[])
        .await
        .expect("row 3")
        .get(0);
    assert_eq!(name, "n3", "the source's row won");
    // §5.5's query works as written (with the daemon's schema on the search path).
    dst.batch_execute("SET search_path = heliosdb_replication, public")
        .await
        .expect("search_path");
    let n: i64 = dst
        .query(
            "SELECT COUNT(*) FROM heliosdb_conflict_log WHERE timestamp > NOW() - INTERVAL '1 hour' GROUP BY table_name ORDER BY COUNT(*) DESC",
            &[],
        )
        .await
        .expect("the guide's query")[0]
        .get(0);
    assert_eq!(n, 4);

    // The conflict log file, the journal line, the metric, the audit log.
    wait_until(Duration::from_secs(10), "the conflict log file", || async {
        std::fs::read_to_string(&conflicts_file)
            .unwrap_or_default()
            .lines()
            .count()
            == 5
    })
    .await;
    let file = std::fs::read_to_string(&conflicts_file).expect("conflict log");
    for line in file.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        assert_eq!(v["tenant_id"], TENANT);
        assert!(v["table_name"] == "public.accounts" || v["table_name"] == "public.orders");
        assert_eq!(v["resolution_strategy"], "SourcePreferred");
        assert!(v["primary_key"]["id"].is_string() && v["timestamp"].is_string());
    }
    assert!(
        file.contains("made on the source") && !file.contains("\"status\""),
        "row images in the conflict log, except the sensitive table's: {file}"
    );
    assert!(
        !daemon.log().contains("made on the source"),
        "row values stay out of the daemon's log"
    );
    assert_eq!(
        daemon.log().matches("CONFLICT").count(),
        5,
        "{}",
        daemon.log()
    );
    let (_, metrics) = http_get(metrics_port, "/metrics").await.expect("metrics");
    assert_eq!(
        metric_value(
            &metrics,
            "heliosdb_replication_conflicts_total",
            &["strategy=\"SourcePreferred\"", "tenant_id=\"tenant-123\""]
        ),
        Some(5.0),
        "{metrics}"
    );
    let audit = std::fs::read_to_string(&audit_file).expect("audit log");
    let resolved: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event_type"] == "conflict_resolved")
        .collect();
    assert_eq!(resolved.len(), 5, "{audit}");
    assert!(
        !audit.contains("made on the"),
        "row values stay out of the audit log"
    );
    for r in &resolved {
        for key in [
            "timestamp",
            "tenant_id",
            "table_name",
            "primary_key",
            "resolution_strategy",
            "winner",
            "user",
            "source_ip",
        ] {
            assert!(r.get(key).is_some(), "{key} missing: {r}");
        }
    }
}

/// Each conflict kind under each strategy, on a one-way replica written to
/// directly: the exact row the target ends with and the log entry.
///
/// Per strategy, keys `base+1..=base+6` and `base+10` diverge while the daemon
/// is stopped: the replica is written first ("early", before the source's
/// changes) for 1-4 and 10, the source changes all of them, then the replica
/// is written again ("late", after the source) for 5 and 6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_under_every_strategy_ends_with_the_expected_row() {
    let env = Env::new(SCHEMA).await;
    let base_text = env.config_text("").replace(
        "[replication]\n",
        "[replication]\nnode_id = \"replica-region\"\n",
    );
    let config = env.write_config("replication.toml", &base_text);
    env.init(&config);
    let (src, dst) = (env.src().await, env.dst().await);
    let strategies = [
        "SourcePreferred",
        "TargetPreferred",
        "LastWriteWins",
        "VectorClock",
    ];
    for (n, strategy) in strategies.iter().enumerate() {
        let base = 1000 * (n as i64 + 1);
        let config = env.write_config(
            "replication.toml",
            &format!("{base_text}\n[conflict]\nresolution_strategy = \"{strategy}\"\n"),
        );
        let mut daemon = env.start_daemon(&config);
        src.execute(
            "INSERT INTO accounts SELECT 'tenant-123', $1::bigint + g, 'n', 'e', 1, now() FROM generate_series(1, 6) g",
            &[&base],
        )
        .await
        .expect("rows");
        wait_until(Duration::from_secs(30), "rows replicated", || async {
            dst.query_one(
                "SELECT count(*) FROM accounts WHERE id BETWEEN $1 AND $1 + 6",
                &[&base],
            )
            .await
            .expect("count")
            .get::<_, i64>(0)
                == 6
        })
        .await;
        assert!(daemon.terminate().0.success());

        let k = |i: i64| base + i;
        dst.batch_execute(&format!(
            "DELETE FROM accounts WHERE id IN ({}, {});
             UPDATE accounts SET name = 'early-local' WHERE id IN ({}, {});
             INSERT INTO accounts VALUES ('tenant-123', {}, 'early-local', 'x', 0, now());",
            k(1),
            k(2),
            k(3),
            k(4),
            k(10)
        ))
        .await
        .expect("early local writes");
        src.batch_execute(&format!(
            "BEGIN;
             UPDATE accounts SET name = 'source', balance = 42 WHERE id IN ({}, {}, {});
             DELETE FROM accounts WHERE id IN ({}, {}, {});
             INSERT INTO accounts VALUES ('tenant-123', {}, 'source', 'y', 5, now());
             COMMIT;",
            k(1),
            k(3),
            k(5),
            k(2),
            k(4),
            k(6),
            k(10)
        ))
        .await
        .expect("source changes");
        dst.batch_execute(&format!(
            "UPDATE accounts SET name = 'late-local' WHERE id IN ({}, {})",
            k(5),
            k(6)
        ))
        .await
        .expect("late local writes");
        // A marker after everything: once it is on the target, all is applied.
        src.execute(
            "INSERT INTO events VALUES ('tenant-123', $1, 'marker', '', now())",
            &[&base],
        )
        .await
        .expect("marker");
        let daemon = env.start_daemon(&config);
        wait_marker(&dst, base).await;

        // What each key ends as: None = absent, Some(name).
        let source_wins_early = *strategy != "TargetPreferred";
        let source_wins_late = *strategy == "SourcePreferred";
        let (early, late) = (
            |src_row: Option<&'static str>, local: Option<&'static str>| {
                if source_wins_early {
                    src_row
                } else {
                    local
                }
            },
            |src_row: Option<&'static str>, local: Option<&'static str>| {
                if source_wins_late {
                    src_row
                } else {
                    local
                }
            },
        );
        let expected: Vec<(i64, Option<&str>)> = vec![
            (k(1), early(Some("source"), None)), // update_missing
            (k(2), None),                        // delete_missing
            (k(3), early(Some("source"), Some("early-local"))), // update_origin_differs
            (k(4), early(None, Some("early-local"))), // delete_origin_differs
            (k(5), late(Some("source"), Some("late-local"))), // update_origin_differs
            (k(6), late(None, Some("late-local"))), // delete_origin_differs
            (k(10), early(Some("source"), Some("early-local"))), // insert_exists
        ];
        for (id, want) in &expected {
            let got: Option<String> = dst
                .query_opt("SELECT name FROM accounts WHERE id = $1", &[id])
                .await
                .expect("row")
                .map(|r| r.get(0));
            assert_eq!(
                got.as_deref(),
                *want,
                "{strategy}: row {id}\n{}",
                daemon.log()
            );
        }
        let logged: Vec<(String, String, String, String)> = dst
            .query(
                "SELECT primary_key->>'id', conflict_type, resolution_strategy, winner
                   FROM heliosdb_replication.heliosdb_conflict_log
                  WHERE (primary_key->>'id')::bigint BETWEEN $1 AND $1 + 10
                  ORDER BY (primary_key->>'id')::bigint",
                &[&base],
            )
            .await
            .expect("conflict log")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        let winner = |source: bool| if source { "source" } else { "target" };
        let want: Vec<(String, String, String, String)> = [
            (1, "update_missing", source_wins_early),
            (2, "delete_missing", source_wins_early),
            (3, "update_origin_differs", source_wins_early),
            (4, "delete_origin_differs", source_wins_early),
            (5, "update_origin_differs", source_wins_late),
            (6, "delete_origin_differs", source_wins_late),
            (10, "insert_exists", source_wins_early),
        ]
        .iter()
        .map(|(i, kind, s)| {
            (
                k(*i).to_string(),
                kind.to_string(),
                strategy.to_string(),
                winner(*s).to_string(),
            )
        })
        .collect();
        assert_eq!(logged, want, "{strategy}\n{}", daemon.log());
        let mut daemon = daemon;
        assert!(daemon.terminate().0.success());
    }
}

/// Replica rows written where no version is kept (a restore or a fix-up
/// run with `session_replication_role = replica`, so the daemon's triggers
/// never saw them): the chunk is applied without a prior read, the
/// statements show the rows were not where the source had them, and the
/// chunk is rolled back and resolved. TargetPreferred: the replica's rows
/// stay, the rest of the same source transaction is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn divergence_without_stored_versions_is_still_detected_and_rolled_back() {
    let env = Env::new(SCHEMA).await;
    let text = env.config_text("") + "\n[conflict]\nresolution_strategy = \"TargetPreferred\"\n";
    let config = env.write_config("replication.toml", &text);
    env.init(&config);
    let daemon = env.start_daemon(&config);
    let (src, dst) = (env.src().await, env.dst().await);
    src.batch_execute("INSERT INTO accounts SELECT 'tenant-123', g, 'n', 'e', 1, now() FROM generate_series(1, 20) g")
        .await
        .expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;

    dst.batch_execute(
        "SET session_replication_role = replica;
         DELETE FROM accounts WHERE id IN (1, 2);
         INSERT INTO accounts VALUES ('tenant-123', 100, 'restored on the replica', 'x', 0, now());
         RESET session_replication_role;",
    )
    .await
    .expect("untracked writes");
    let versions: i64 = dst
        .query_one("SELECT count(*) FROM heliosdb_replication.row_version", &[])
        .await
        .expect("versions")
        .get(0);
    assert_eq!(versions, 0, "nothing recorded a version of these writes");
    src.batch_execute(
        "BEGIN;
         UPDATE accounts SET name = 'source' WHERE id BETWEEN 1 AND 10 AND id <> 2;
         DELETE FROM accounts WHERE id IN (2, 11);
         INSERT INTO accounts VALUES ('tenant-123', 100, 'made on the source', 'y', 5, now());
         INSERT INTO accounts SELECT 'tenant-123', g, 'new', 'e', 1, now() FROM generate_series(200, 249) g;
         COMMIT;
         INSERT INTO events VALUES ('tenant-123', 1, 'marker', '', now());",
    )
    .await
    .expect("source changes");
    wait_marker(&dst, 1).await;

    let names: Vec<(i64, String)> = dst
        .query(
            "SELECT id, name FROM accounts WHERE id < 200 ORDER BY id",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut want: Vec<(i64, String)> = (3..=10).map(|i| (i, "source".into())).collect();
    want.extend((12..=20).map(|i| (i, "n".into())));
    want.push((100, "restored on the replica".into()));
    assert_eq!(names, want, "{}", daemon.log());
    let new: i64 = dst
        .query_one("SELECT count(*) FROM accounts WHERE id >= 200", &[])
        .await
        .expect("new rows")
        .get(0);
    assert_eq!(new, 50, "the transaction's other rows are applied");
    let logged: Vec<(String, String, String, Option<String>)> = dst
        .query(
            "SELECT primary_key->>'id', conflict_type, winner, target_row->>'name'
               FROM heliosdb_replication.heliosdb_conflict_log
              ORDER BY (primary_key->>'id')::bigint",
            &[],
        )
        .await
        .expect("conflict log")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let row = |id: &str, kind: &str, image: Option<&str>| {
        (
            id.to_string(),
            kind.to_string(),
            "target".to_string(),
            image.map(str::to_string),
        )
    };
    assert_eq!(
        logged,
        vec![
            row("1", "update_missing", None),
            row("2", "delete_missing", None),
            row("100", "insert_exists", Some("restored on the replica")),
        ],
        "{}",
        daemon.log()
    );

    // Many new rows in one chunk go in by COPY; a row already on the
    // replica makes it fail on the primary key, which is the conflict: the
    // chunk is rolled back and resolved like the small one above.
    dst.batch_execute(
        "SET session_replication_role = replica;
         INSERT INTO accounts VALUES ('tenant-123', 350, 'restored on the replica', 'x', 0, now());
         RESET session_replication_role;",
    )
    .await
    .expect("untracked insert");
    src.batch_execute(
        "INSERT INTO accounts SELECT 'tenant-123', g, 'bulk', 'e', 1, now() FROM generate_series(300, 499) g;
         INSERT INTO events VALUES ('tenant-123', 2, 'marker', '', now());",
    )
    .await
    .expect("bulk insert");
    wait_marker(&dst, 2).await;
    let bulk: Vec<(String, i64)> = dst
        .query(
            "SELECT name, count(*) FROM accounts WHERE id BETWEEN 300 AND 499 GROUP BY name ORDER BY name",
            &[],
        )
        .await
        .expect("bulk rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        bulk,
        vec![("bulk".into(), 199), ("restored on the replica".into(), 1)],
        "{}",
        daemon.log()
    );
    let logged: i64 = dst
        .query_one(
            "SELECT count(*) FROM heliosdb_replication.heliosdb_conflict_log
              WHERE primary_key->>'id' = '350' AND conflict_type = 'insert_exists' AND winner = 'target'",
            &[],
        )
        .await
        .expect("conflict log")
        .get(0);
    assert_eq!(logged, 1, "{}", daemon.log());
}
