//! The shipped monitoring (`deploy/`) works with what the daemon exports:
//! Prometheus config and rules pass `promtool`, Grafana dashboards are valid
//! current-schema JSON with provisioning, and every metric that a rule or a
//! dashboard queries is one the daemon exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use heliosdb_tenant_replication::telemetry::metrics::{FAMILIES, HISTOGRAMS};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool").args(args).output().expect(
        "promtool not found: install Debian's prometheus package (apt-get install prometheus)",
    );
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `heliosdb_*` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("heliosdb_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

fn exported(name: &str) -> bool {
    FAMILIES.contains(&name)
        || HISTOGRAMS.iter().any(|h| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name == format!("{h}{s}"))
        })
}

#[test]
fn prometheus_config_and_rules_pass_promtool() {
    let d = deploy();
    promtool(&[
        "check",
        "config",
        d.join("prometheus/prometheus.yml").to_str().expect("utf8"),
    ]);
    promtool(&[
        "check",
        "rules",
        d.join("prometheus/rules/replication-alerts.yml")
            .to_str()
            .expect("utf8"),
    ]);
}

#[test]
fn every_metric_queried_by_rules_and_dashboards_is_exported() {
    let d = deploy();
    let mut queried = BTreeSet::new();
    let rules =
        std::fs::read_to_string(d.join("prometheus/rules/replication-alerts.yml")).expect("rules");
    for line in rules.lines() {
        if let Some(expr) = line.trim().strip_prefix("expr:") {
            queried.extend(metric_names(expr));
        }
    }
    let mut panels_seen = 0;
    for name in ["replication-overview.json", "performance-metrics.json"] {
        let text =
            std::fs::read_to_string(d.join("grafana/dashboards").join(name)).expect("dashboard");
        let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert!(
            dash["uid"].as_str().is_some_and(|u| !u.is_empty()),
            "{name}: uid"
        );
        assert!(
            dash["schemaVersion"].as_u64().unwrap_or(0) >= 36,
            "{name}: current schema"
        );
        for panel in dash["panels"].as_array().expect("panels") {
            let kind = panel["type"].as_str().unwrap_or("");
            assert!(
                ["timeseries", "stat", "gauge", "table", "bargauge"].contains(&kind),
                "{name}: panel type {kind} (the deprecated 'graph' does not render in current Grafana)"
            );
            assert_eq!(
                panel["datasource"]["uid"], "heliosdb-prometheus",
                "{name}: datasource"
            );
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                let names = metric_names(expr);
                assert!(
                    !names.is_empty(),
                    "{name}: {expr} queries no heliosdb metric"
                );
                queried.extend(names);
            }
            panels_seen += 1;
        }
    }
    assert!(panels_seen >= 10);
    let missing: Vec<&String> = queried.iter().filter(|n| !exported(n)).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
    // What the guide's dashboards and troubleshooting query is among them.
    for guide in [
        "heliosdb_replication_lag_seconds_bucket",
        "heliosdb_replication_events_total",
        "heliosdb_replication_errors_total",
        "heliosdb_replication_conflicts_total",
        "heliosdb_compression_ratio",
        "heliosdb_bytes_replicated_total",
        "heliosdb_checkpoints_total",
    ] {
        assert!(queried.contains(guide), "{guide} is not on a dashboard");
    }
    assert!(exported("heliosdb_vector_clock_drift_seconds"));

    let ds = std::fs::read_to_string(d.join("grafana/provisioning/datasources/prometheus.yml"))
        .expect("datasource provisioning");
    assert!(ds.contains("uid: heliosdb-prometheus"));
    assert!(d
        .join("grafana/provisioning/dashboards/heliosdb.yml")
        .exists());
}
