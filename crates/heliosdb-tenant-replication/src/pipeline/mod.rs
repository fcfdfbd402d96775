//! One tenant's pipeline: capture → batch → apply → checkpoint.
//!
//! ```text
//!           capture task                          apply loop (this task)
//! slot ─► PgwireSource ─► Assembler ─► [bounded queue] ─► Applier ─► target
//!              ▲                                            │ commit (data + progress)
//!              └──────────── acknowledged LSN ◄─────────────┘
//! ```
//!
//! A *session* connects both sides, runs the start-up checks, reads the
//! target's progress and streams from there. Any error ends the session with
//! the open target transaction rolled back; passing errors start a new
//! session after exponential back-off, others stop the tenant with a hint.
//!
//! Shutdown (SIGTERM/SIGINT): stop reading; commit the open target
//! transaction if it ends on a source commit, else roll it back; write the
//! checkpoint file; send the last acknowledgement to the source; return.

pub mod apply_node;
mod capture_node;
pub mod driver;
pub mod hub;
mod lanes;
mod session;
mod spool;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::config::{Config, Mode};
use crate::error::{ErrorClass, ReplicationError, Result};
use crate::telemetry::{State, Telemetry, TenantTelemetry};

pub use crate::shutdown::Shutdown;
pub use session::queue_spec;

/// A source commit this much older than now means a backlog is being read:
/// batches (and, in one process, target transactions) then fill up to
/// `[cdc] batch_size` or `batch_timeout_ms` instead of closing whenever the
/// queue runs empty. The source's clock is compared with this host's; a
/// skew larger than this only delays a quiet tenant's batch by up to
/// `batch_timeout_ms`.
pub(crate) const BACKLOG_AGE_US: i64 = 1_000_000;

/// Is a source transaction that committed at `commit_time_us` (PostgreSQL
/// epoch) part of a backlog?
pub(crate) fn is_backlog(commit_time_us: i64) -> bool {
    crate::clock::pg_now_us().saturating_sub(commit_time_us) > BACKLOG_AGE_US
}

/// A tenant's pipeline running on its own thread: await it for the result.
pub struct Pipeline {
    done: oneshot::Receiver<Result<()>>,
}

impl std::future::Future for Pipeline {
    type Output = Result<()>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<()>> {
        std::pin::Pin::new(&mut self.done).poll(cx).map(|r| {
            r.unwrap_or_else(|_| {
                Err(ReplicationError::Internal(
                    "the pipeline thread panicked".into(),
                ))
            })
        })
    }
}

/// Run one tenant on a thread of its own with a single-threaded runtime.
///
/// A tenant's pipeline is a chain of stages that hand each message to the
/// next; on a multi-threaded runtime every hand-over can wake a sibling
/// worker thread, and those wake-ups cost more CPU than the stages
/// themselves (the reference drain: 1.10 s of daemon CPU on two worker
/// threads, 0.78 s on one). Here they stay on one thread; the process's
/// multi-threaded runtime keeps monitoring and signals. Blocking work
/// (checkpoint files) still goes to a blocking pool.
pub fn spawn_tenant(
    config: Arc<Config>,
    hub: Option<hub::HubHandle>,
    shutdown: Shutdown,
    telemetry: Arc<Telemetry>,
) -> Result<Pipeline> {
    spawn_tenant_of(config, NodeShared { hub, apply: None }, shutdown, telemetry)
}

/// What a node's tenants share: the hub of their slot (shared decode), the
/// apply node's listener (tenants of an apply node).
#[derive(Clone, Default)]
pub struct NodeShared {
    pub hub: Option<hub::HubHandle>,
    pub apply: Option<Arc<apply_node::SharedApplyNode>>,
}

/// [`spawn_tenant`] with everything the node shares.
pub fn spawn_tenant_of(
    config: Arc<Config>,
    shared: NodeShared,
    shutdown: Shutdown,
    telemetry: Arc<Telemetry>,
) -> Result<Pipeline> {
    let (tx, done) = oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ReplicationError::Internal(format!("starting the pipeline's runtime: {e}")))?;
    std::thread::Builder::new()
        .name(format!("pipeline {}", config.tenant.tenant_id))
        .spawn(move || {
            let result = runtime.block_on(run_tenant(config, shared, shutdown, telemetry));
            let _ = tx.send(result);
        })
        .map_err(|e| ReplicationError::Internal(format!("starting the pipeline's thread: {e}")))?;
    Ok(Pipeline { done })
}

pub async fn run_tenant(
    config: Arc<Config>,
    shared: NodeShared,
    mut shutdown: Shutdown,
    telemetry: Arc<Telemetry>,
) -> Result<()> {
    let tenant = config.tenant.tenant_id.clone();
    let tel = telemetry.tenant(&tenant);
    tel.m.conflict_strategy(config.conflict.strategy.name());
    let result = run_sessions(&config, &shared, &mut shutdown, &tel).await;
    match &result {
        Ok(()) => tel.set_state(State::Stopped),
        Err(e) => tel.failed(e, false),
    }
    result
}

async fn run_sessions(
    config: &Arc<Config>,
    shared: &NodeShared,
    shutdown: &mut Shutdown,
    tel: &Arc<TenantTelemetry>,
) -> Result<()> {
    let hub = shared.hub.as_ref();
    let tenant = config.tenant.tenant_id.clone();
    let net = &config.network;
    let mut capture = match config.transport.mode {
        Mode::Local => None,
        Mode::Capture => Some(capture_node::CaptureContext::new(config)?),
        Mode::Apply => {
            return apply_node::run(
                config.clone(),
                shared.apply.clone(),
                shutdown.clone(),
                tel.clone(),
            )
            .await
        }
    };
    let mut failures: u32 = 0;
    loop {
        let started = std::time::Instant::now();
        let result = match capture.as_mut() {
            None => session::run(config, hub, shutdown.clone(), tel).await,
            Some(ctx) => capture_node::run(config, ctx, hub, shutdown.clone(), tel).await,
        };
        let stopping = *shutdown.borrow();
        let progressed = tel.take_progressed();
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.class() == ErrorClass::Retry && !stopping => {
                tel.failed(&e, true);
                // A session that made progress (or ran a while) before
                // failing starts the count anew: the back-off is for a source
                // or target that cannot be reached, not for a cut connection.
                if progressed || started.elapsed() > Duration::from_secs(60) {
                    failures = 0;
                }
                failures += 1;
                let exp = failures.saturating_sub(1).min(16);
                let delay = net
                    .retry_backoff
                    .saturating_mul(1 << exp)
                    .min(Duration::from_secs(60));
                if net.retry_max_attempts == 0 || failures <= net.retry_max_attempts {
                    tracing::warn!(%tenant, attempt = failures, retry_in_ms = delay.as_millis() as u64, error = %e, "replication interrupted; retrying");
                } else {
                    tracing::error!(%tenant, attempt = failures, retry_in_ms = delay.as_millis() as u64, error = %e,
                        "replication still failing after {} attempts; retrying until it recovers", net.retry_max_attempts);
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return Ok(()),
                }
            }
            Err(e) if stopping && e.class() == ErrorClass::Retry => {
                tracing::info!(%tenant, error = %e, "stopped while reconnecting");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}

/// Internal helper: `Err` for a closed channel.
pub(crate) fn closed(what: &str) -> ReplicationError {
    ReplicationError::Internal(format!("{what} closed unexpectedly"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pipeline's thread ends in one of two ways: it sends its result,
    /// or it panics and drops the sender; the handle reports both.
    #[tokio::test]
    async fn the_handle_reports_the_result_or_a_panicked_thread() {
        let (tx, done) = oneshot::channel();
        let thread = std::thread::spawn(move || {
            let _ = tx.send(Err(ReplicationError::Internal("stopped".into())));
        });
        let result = Pipeline { done }.await;
        assert!(matches!(result, Err(ReplicationError::Internal(ref m)) if m == "stopped"));
        assert!(thread.join().is_ok());

        let (tx, done) = oneshot::channel::<Result<()>>();
        let thread = std::thread::spawn(move || {
            let _tx = tx;
            panic!("a bug on the pipeline's thread");
        });
        let result = Pipeline { done }.await;
        assert!(thread.join().is_err());
        match result {
            Err(ReplicationError::Internal(m)) => assert_eq!(m, "the pipeline thread panicked"),
            other => panic!("expected an internal error, got {other:?}"),
        }
    }
}
