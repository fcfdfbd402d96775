//! A real Prometheus scraping a daemon that replicates between two real
//! clusters: the series appear, the shipped lag alert (with a short `for:`)
//! fires while the target is down and `/health` turns 503; both recover.

mod common;

use std::time::Duration;

use common::prometheus::Prometheus;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_series_and_the_lag_alert_fires_and_recovers_with_the_target() {
    let (mut env, config) = Env::provisioned(SCHEMA).await;
    let (metrics_port, health_port) = monitoring_ports(&config);
    let daemon = env.start_daemon(&config);
    let src = env.src().await;
    src.batch_execute("INSERT INTO orders SELECT 'tenant-123', g, 1, 'new', g, '{}', now() FROM generate_series(1, 2000) g")
        .await
        .expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &daemon).await;

    // The daemon's own endpoints.
    let (status, body) = http_get(health_port, "/health")
        .await
        .expect("health answers");
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("health JSON");
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["replication"]["tenant_id"], TENANT);
    assert_eq!(health["replication"]["state"], "running");
    for key in [
        "lag_seconds",
        "throughput_events_per_sec",
        "last_checkpoint_lsn",
        "last_checkpoint_time",
        "total_events_processed",
        "total_errors",
        "total_conflicts",
    ] {
        assert!(
            health["replication"].get(key).is_some(),
            "{key} missing: {health}"
        );
    }
    assert!(health["replication"]["total_events_processed"].as_u64() >= Some(2000));
    for key in ["cpu_usage_percent", "memory_usage_mb", "disk_usage_percent"] {
        assert!(
            health["system"].get(key).is_some(),
            "{key} missing: {health}"
        );
    }
    let checks: Vec<&str> = health["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        checks,
        ["source_database", "target_database", "checkpoint_storage"]
    );
    assert!(health["version"].is_string() && health["uptime_seconds"].is_u64());
    assert_eq!(
        http_get(health_port, "/ready").await.map(|r| r.0),
        Some(200)
    );
    let (_, metrics) = http_get(metrics_port, "/metrics").await.expect("metrics");
    assert!(
        metric_value(
            &metrics,
            "heliosdb_replication_events_total",
            &["table=\"public.orders\""]
        ) >= Some(2000.0),
        "{metrics}"
    );
    wait_until(Duration::from_secs(30), "the slot metrics", || async {
        http_get(metrics_port, "/metrics")
            .await
            .is_some_and(|(_, m)| m.contains("heliosdb_slot_retained_wal_bytes{"))
    })
    .await;
    // No secret and no row value in either.
    for text in [&body, &metrics] {
        assert!(!text.contains("postgresql://"), "{text}");
    }

    let prometheus = Prometheus::start(
        &env.dir.path().join("prometheus"),
        metrics_port,
        &[(
            "expr: heliosdb_replication_current_lag_seconds > 30\n        for: 5m",
            "expr: heliosdb_replication_current_lag_seconds > 3\n        for: 2s",
        )],
    );
    wait_until(
        Duration::from_secs(60),
        "Prometheus to scrape the lag and throughput series",
        || async {
            let throughput = prometheus
                .query("heliosdb_replication_throughput_events_per_sec")
                .await;
            let lag = prometheus
                .query("heliosdb_replication_lag_seconds_count")
                .await;
            throughput
                .iter()
                .any(|s| s["metric"]["tenant_id"] == TENANT)
                && lag
                    .iter()
                    .any(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()) > Some(0.0))
        },
    )
    .await;
    assert_eq!(prometheus.alert_state("HighReplicationLag").await, None);

    // The target goes away while the source keeps changing.
    env.target.stop().expect("stop target");
    src.batch_execute("UPDATE orders SET status = 'paid' WHERE id <= 100")
        .await
        .expect("update");
    wait_until(Duration::from_secs(90), "the lag alert to fire", || async {
        prometheus
            .alert_state("HighReplicationLag")
            .await
            .as_deref()
            == Some("firing")
    })
    .await;
    let (status, body) = http_get(health_port, "/health")
        .await
        .expect("health answers");
    assert_eq!(status, 503, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("health JSON");
    assert_eq!(health["status"], "unhealthy");
    let target = health["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "target_database")
        .cloned()
        .expect("target check");
    assert_eq!(target["status"], "unhealthy", "{health}");
    assert_eq!(
        http_get(health_port, "/ready").await.map(|r| r.0),
        Some(503)
    );

    // The target comes back: replication catches up, health and the alert recover.
    env.target.start_again().expect("start target");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(90), &daemon).await;
    wait_until(
        Duration::from_secs(60),
        "/health to be 200 again",
        || async { http_get(health_port, "/health").await.map(|r| r.0) == Some(200) },
    )
    .await;
    wait_until(
        Duration::from_secs(60),
        "the lag alert to resolve",
        || async { prometheus.alert_state("HighReplicationLag").await.is_none() },
    )
    .await;
    let errors = prometheus.query("heliosdb_replication_errors_total").await;
    assert!(
        errors
            .iter()
            .any(|s| s["metric"]["error_type"] == "target_database"),
        "the outage was counted: {errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_records_the_tenants_life_and_audit_verify_detects_tampering() {
    let env = Env::new(SCHEMA).await;
    let audit = env.dir.path().join("log").join("audit.log");
    let text = env.config_text("").replace(
        "[monitoring]\n",
        &format!(
            "[monitoring]\nenable_audit_log = true\naudit_log_path = \"{}\"\naudit_log_format = \"json\"\naudit_events = [\"replication_start\", \"replication_stop\", \"checkpoint_created\", \"error\"]\n",
            audit.display()
        ),
    );
    let config = env.write_config("replication.toml", &text);
    env.init(&config);
    let mut daemon = env.start_daemon(&config);
    env.src()
        .await
        .batch_execute("INSERT INTO events SELECT 'tenant-123', g, 'k', 'b', now() FROM generate_series(1, 3000) g")
        .await
        .expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &daemon).await;
    let (status, _) = daemon.terminate();
    assert!(status.success());

    let log = std::fs::read_to_string(&audit).expect("audit log written");
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let kinds: Vec<&str> = records
        .iter()
        .filter_map(|r| r["event_type"].as_str())
        .collect();
    assert_eq!(kinds.first(), Some(&"replication_start"), "{log}");
    assert!(kinds.contains(&"checkpoint_created"), "{log}");
    assert_eq!(kinds.last(), Some(&"replication_stop"), "{log}");
    for r in &records {
        assert_eq!(r["tenant_id"], TENANT);
        assert_eq!(r["user"], "postgres");
        assert_eq!(r["source_ip"], "127.0.0.1");
        assert!(r["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert_eq!(r["prev_hash"].as_str().map(str::len), Some(64));
    }
    assert!(!log.contains("postgresql://"));

    let out = run(&config, &["audit-verify"]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains(&format!("intact ({} records)", records.len())),
        "{}",
        out.stdout
    );

    // Change one record: the chain breaks at the next one.
    let tampered = log.replacen("checkpoint_created", "checkpoint_deleted", 1);
    std::fs::write(&audit, tampered).expect("write");
    let out = run(
        &config,
        &["audit-verify", "--path", audit.to_str().expect("utf8")],
    );
    assert_eq!(out.status.code(), Some(5), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("BROKEN at line"), "{}", out.stdout);
}
