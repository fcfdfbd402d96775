//! `[monitoring]`: metrics and health endpoints, the audit log, with their
//! defaults and checks.

use std::path::PathBuf;
use std::time::Duration;

use super::model::RawConfig;
use super::MonitoringConfig;
use super::{notice, Checker, ConfigError, Notice};

pub(super) fn monitoring(
    c: &Checker<'_>,
    raw: &RawConfig,
    conflict_log: Option<PathBuf>,
    notices: &mut Vec<Notice>,
) -> Result<MonitoringConfig, ConfigError> {
    let f = &raw.features;
    let m = &raw.monitoring;
    for (key, port) in [
        ("[monitoring] prometheus_port", m.prometheus_port),
        ("[monitoring] health_check_port", m.health_check_port),
    ] {
        if port == Some(0) {
            return Err(c.err(key, "0 is not a port: allowed 1 to 65535"));
        }
    }
    if m.prometheus_port.unwrap_or(9090) == m.health_check_port.unwrap_or(8080) {
        return Err(c.err(
            "[monitoring] health_check_port",
            "must differ from prometheus_port",
        ));
    }
    if let Some(fmt) = m.audit_log_format.as_deref() {
        if fmt != "json" {
            return Err(c.err(
                "[monitoring] audit_log_format",
                format!("'{fmt}' is not supported: allowed json"),
            ));
        }
    }
    for ev in m.audit_events.iter().flatten() {
        if !matches!(
            ev.as_str(),
            "replication_start"
                | "replication_stop"
                | "failover"
                | "conflict_resolved"
                | "checkpoint_created"
                | "error"
                | "tenant_added"
                | "tenant_removed"
        ) {
            return Err(c.err("[monitoring] audit_events", format!("'{ev}' is not an audit event: allowed replication_start, replication_stop, failover, conflict_resolved, checkpoint_created, error, tenant_added, tenant_removed")));
        }
    }
    let metrics_interval = c.range(
        "[monitoring] metrics_interval_seconds",
        m.metrics_interval_seconds,
        10,
        1,
        3600,
    )?;
    let bind_address = match m.bind_address.as_deref() {
        None => std::net::IpAddr::from([0, 0, 0, 0]),
        Some(a) => a.parse().map_err(|_| {
            c.err(
                "[monitoring] bind_address",
                format!("'{a}' is not an IP address, e.g. 0.0.0.0 or 127.0.0.1"),
            )
        })?,
    };
    let audit_log = match (m.enable_audit_log, &m.audit_log_path) {
        (Some(true), Some(p)) if !p.is_empty() => {
            Some((PathBuf::from(p), m.audit_events.clone().unwrap_or_default()))
        }
        (Some(true), _) => Some((
            PathBuf::from("/var/log/heliosdb/audit.log"),
            m.audit_events.clone().unwrap_or_default(),
        )),
        _ => {
            if m.audit_log_path.is_some() || m.audit_events.is_some() {
                notice(
                    notices,
                    "[monitoring] audit_log_path",
                    "no effect without enable_audit_log = true",
                );
            }
            None
        }
    };
    let monitoring = MonitoringConfig {
        enabled: f.enable_monitoring != Some(false),
        bind_address,
        prometheus_port: m.prometheus_port.unwrap_or(9090),
        health_check_port: m.health_check_port.unwrap_or(8080),
        metrics_interval: Duration::from_secs(metrics_interval),
        audit_log,
        conflict_log,
    };
    Ok(monitoring)
}
