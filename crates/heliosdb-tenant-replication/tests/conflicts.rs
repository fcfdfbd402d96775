//! A one-way replica that someone wrote to directly: the divergence is
//! detected when the source's changes meet it, resolved SourcePreferred, and
//! logged everywhere an operator looks.

mod common;

use std::time::Duration;

use common::*;

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
        "\n[conflict]\nresolution_strategy = \"SourcePreferred\"\nlog_conflicts = true\nconflict_log_path = \"{}\"\n",
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
         UPDATE accounts SET name = 'edited on the replica' WHERE tenant_id = 'tenant-123' AND id = 3",
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
         COMMIT;",
    )
    .await
    .expect("source changes");
    // SourcePreferred: the source's rows win, the tenant converges.
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;

    let rows = dst
        .query(
            "SELECT table_name, primary_key::text, conflict_type, resolution_strategy, winner
               FROM heliosdb_replication.heliosdb_conflict_log WHERE tenant_id = $1 ORDER BY conflict_type",
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
            "public.accounts".to_string(),
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
            expect(1, "update_missing"),
        ],
        "an update of a row that is still there (id 3) is not a conflict this build can see"
    );
    // §5.5's query works as written (with the daemon's schema on the search path).
    dst.batch_execute("SET search_path = heliosdb_replication, public")
        .await
        .expect("search_path");
    let n: i64 = dst
        .query_one(
            "SELECT COUNT(*) FROM heliosdb_conflict_log WHERE timestamp > NOW() - INTERVAL '1 hour' GROUP BY table_name ORDER BY COUNT(*) DESC",
            &[],
        )
        .await
        .expect("the guide's query")
        .get(0);
    assert_eq!(n, 3);

    // The conflict log file, the journal line, the metric, the audit log.
    wait_until(Duration::from_secs(10), "the conflict log file", || async {
        std::fs::read_to_string(&conflicts_file)
            .unwrap_or_default()
            .lines()
            .count()
            == 3
    })
    .await;
    let file = std::fs::read_to_string(&conflicts_file).expect("conflict log");
    for line in file.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        assert_eq!(v["tenant_id"], TENANT);
        assert_eq!(v["table_name"], "public.accounts");
        assert_eq!(v["resolution_strategy"], "SourcePreferred");
        assert!(v["primary_key"]["id"].is_string() && v["timestamp"].is_string());
    }
    assert!(
        !file.contains("made on the source"),
        "row values stay out of the log"
    );
    assert_eq!(
        daemon.log().matches("CONFLICT").count(),
        3,
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
        Some(3.0),
        "{metrics}"
    );
    let audit = std::fs::read_to_string(&audit_file).expect("audit log");
    let resolved: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event_type"] == "conflict_resolved")
        .collect();
    assert_eq!(resolved.len(), 3, "{audit}");
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
