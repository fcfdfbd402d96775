//! `start`: every tenant's pipeline, the monitoring endpoints, signals.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// Run every tenant's pipeline, each on a thread of its own, until a
/// signal. A tenant that stops (an error a person must fix) stops alone:
/// the others go on, `/health` shows it; the process exits when none is
/// left, with the first stopped tenant's code.
pub(super) async fn start(configs: Vec<Arc<Config>>) -> ExitCode {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let telemetry = match start_telemetry(&configs, stop_rx.clone()).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return exit_for(&e);
        }
    };
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    for config in &configs {
        let pipeline =
            match crate::pipeline::spawn_tenant(config.clone(), stop_rx.clone(), telemetry.clone())
            {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e}");
                    let _ = stop_tx.send(true);
                    return exit_for(&e);
                }
            };
        let (tenant, done_tx) = (config.tenant.tenant_id.clone(), done_tx.clone());
        tokio::spawn(async move {
            let _ = done_tx.send((tenant, pipeline.await));
        });
    }
    drop(done_tx);
    let mut running = configs.len();
    let mut code = ExitCode::SUCCESS;
    let finished = |tenant: String, result: crate::error::Result<()>, code: &mut ExitCode| {
        if let Err(e) = result {
            tracing::error!(%tenant, "replication_stop: {e}");
            if *code == ExitCode::SUCCESS {
                *code = exit_for(&e);
            }
        }
    };
    let signal = wait_for_signal();
    tokio::pin!(signal);
    while running > 0 {
        tokio::select! {
            ended = done.recv() => {
                let Some((tenant, result)) = ended else { break };
                running -= 1;
                finished(tenant, result, &mut code);
                if running > 0 {
                    tracing::warn!(running, "a tenant stopped; the others go on");
                }
            }
            sig = &mut signal => {
                tracing::info!(signal = sig, "shutting down: finishing the open transaction and writing checkpoints");
                let _ = stop_tx.send(true);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(9);
                while running > 0 {
                    match tokio::time::timeout_at(deadline, done.recv()).await {
                        Ok(Some((tenant, result))) => {
                            running -= 1;
                            finished(tenant, result, &mut code);
                        }
                        Ok(None) => break,
                        Err(_) => {
                            tracing::warn!("shutdown took too long; exiting (the target's progress is consistent, nothing is lost)");
                            return ExitCode::SUCCESS;
                        }
                    }
                }
                return code;
            }
        }
    }
    code
}

/// The audit log (if enabled) and the monitoring endpoints (unless
/// `[features] enable_monitoring = false`).
pub(super) async fn start_telemetry(
    configs: &[Arc<Config>],
    shutdown: crate::pipeline::Shutdown,
) -> Result<Arc<crate::telemetry::Telemetry>, ReplicationError> {
    // The node's sections are every tenant's.
    let config = &configs[0];
    let audit = match &config.monitoring.audit_log {
        Some((path, events)) => {
            let t = &config.tenant;
            let user = t
                .target
                .as_ref()
                .or(t.source.as_ref())
                .map(|c| c.user.clone())
                .unwrap_or_default();
            let source_ip = t
                .source
                .as_ref()
                .map(|c| c.host.clone())
                .unwrap_or_default();
            let log = crate::telemetry::audit::AuditLog::open(path, events, &user, &source_ip)
                .map_err(|e| {
                    ReplicationError::operator(
                        format!("audit log {}: {e}", path.display()),
                        "make [monitoring] audit_log_path writable by this user (its directory is created if missing)",
                    )
                })?;
            Some(Arc::new(log))
        }
        None => None,
    };
    let conflicts = match &config.monitoring.conflict_log {
        Some(path) => Some(Arc::new(
            crate::telemetry::audit::ConflictLog::open(path).map_err(|e| {
                ReplicationError::operator(
                    format!("conflict log {}: {e}", path.display()),
                    "make [conflict] conflict_log_path writable by this user",
                )
            })?,
        )),
        None => None,
    };
    let telemetry = crate::telemetry::Telemetry::new(audit, conflicts);
    if config.monitoring.enabled {
        crate::telemetry::server::start(configs.to_vec(), telemetry.clone(), shutdown).await?;
    }
    Ok(telemetry)
}

/// SIGTERM or SIGINT; SIGHUP (systemd's ExecReload) is logged, not fatal.
pub(super) async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        // Without signal handlers, run until the pipeline ends.
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            _ = hup.recv() => tracing::info!("SIGHUP: configuration reload is not supported; restart the service to apply changes"),
        }
    }
}
