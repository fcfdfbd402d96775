//! Telemetry: what operators watch.
//!
//! * [`metrics`]: Prometheus metrics (`GET /metrics` on `[monitoring]
//!   prometheus_port`), the deployment guide's §10.2 names.
//! * [`health`]: `GET /health` (§4.4 JSON; 200 healthy, 503 not) and
//!   `GET /ready` on `health_check_port`.
//! * [`audit`]: the §7.4 audit log, one JSON object per line, hash-chained.
//! * [`server`]: the plain-HTTP listeners for the above.
//!
//! The pipeline reports into a [`TenantTelemetry`] per tenant: state
//! changes, commits, checkpoints, errors. Nothing here ever holds a secret
//! or a row value.

pub mod audit;
pub mod health;
pub mod metrics;
pub mod report;
pub mod server;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};

use crate::error::ReplicationError;
use crate::lsn::Lsn;
use metrics::{Metrics, TenantMetrics};

use crate::clock::now_us;
pub use crate::clock::{pg_now_us, PG_EPOCH_US};
pub use report::{Committed, Conflict};

/// Where a tenant's replication stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Starting,
    Snapshotting,
    /// Streaming changes (the guide's `"running"`).
    Running,
    /// A passing failure; retrying with back-off.
    Reconnecting,
    /// An apply node with no capture node connected.
    WaitingForCapture,
    /// Stopped (shutdown, or an error a person must fix).
    Stopped,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Snapshotting => "snapshotting",
            Self::Running => "running",
            Self::Reconnecting => "reconnecting",
            Self::WaitingForCapture => "waiting_for_capture",
            Self::Stopped => "stopped",
        }
    }

    /// Does this state count as replication working?
    pub fn is_up(self) -> bool {
        matches!(
            self,
            Self::Starting | Self::Snapshotting | Self::Running | Self::WaitingForCapture
        )
    }
}

/// The configurations of the tenants a node serves now (a reload changes
/// them; `/health` and the gauge collector read them at each use).
pub type NodeTenants = Arc<std::sync::RwLock<Vec<Arc<crate::config::Config>>>>;

/// The process's telemetry: metrics registry, tenants, audit log.
pub struct Telemetry {
    pub metrics: Metrics,
    pub audit: Option<Arc<audit::AuditLog>>,
    pub conflicts: Option<Arc<audit::ConflictLog>>,
    started: Instant,
    tenants: Mutex<Vec<Arc<TenantTelemetry>>>,
}

impl Telemetry {
    pub fn new(
        audit: Option<Arc<audit::AuditLog>>,
        conflicts: Option<Arc<audit::ConflictLog>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            metrics: Metrics::new(),
            audit,
            conflicts,
            started: Instant::now(),
            tenants: Mutex::new(Vec::new()),
        })
    }

    /// Telemetry without an audit log (tests, benchmarks).
    pub fn disabled() -> Arc<Self> {
        Self::new(None, None)
    }

    /// The handle of `tenant` (created on first use).
    pub fn tenant(self: &Arc<Self>, tenant: &str) -> Arc<TenantTelemetry> {
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tenants.iter().find(|t| t.m.tenant == tenant) {
            return t.clone();
        }
        let t = Arc::new(TenantTelemetry {
            m: self.metrics.tenant(tenant),
            audit: self.audit.clone(),
            conflict_log: self.conflicts.clone(),
            state: Mutex::new(State::Starting),
            last_checkpoint: Mutex::new(None),
            caught_up: AtomicBool::new(false),
            progressed: AtomicBool::new(false),
            caught_up_at_us: AtomicI64::new(now_us()),
            applied_commit_us: AtomicI64::new(0),
            acknowledged: AtomicU64::new(0),
            spool: Arc::default(),
            recent_lag: Mutex::new(std::collections::VecDeque::new()),
        });
        t.m.up.set(1);
        tenants.push(t.clone());
        t
    }

    /// A tenant the node no longer serves: gone from `/health`, its
    /// series gone from `/metrics`.
    pub fn remove_tenant(&self, tenant: &str) {
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = tenants.iter().position(|t| t.m.tenant == tenant) {
            let t = tenants.remove(i);
            self.metrics.remove_tenant(&t.m);
        }
    }

    pub fn tenants(&self) -> Vec<Arc<TenantTelemetry>> {
        self.tenants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn uptime_seconds(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Refresh computed gauges, then render the exposition text.
    pub fn render_metrics(&self) -> String {
        for t in self.tenants() {
            t.refresh();
        }
        self.metrics.render()
    }
}

/// A tenant's spool as the shared slot's hub last saw it.
#[derive(Debug, Default)]
pub struct SpoolStatus {
    bytes: AtomicU64,
    /// Where the tenant holds the slot (applied, extended by its spool).
    held: AtomicU64,
    /// Why it is paused.
    paused: Mutex<Option<String>>,
}

impl SpoolStatus {
    pub fn update(&self, bytes: u64, held: Lsn) {
        self.bytes.store(bytes, Ordering::Relaxed);
        self.held.store(held.0, Ordering::Relaxed);
    }

    pub fn set_paused(&self, why: Option<String>) {
        *self.paused.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// The hub no longer routes to the tenant.
    pub fn clear(&self) {
        self.update(0, Lsn::ZERO);
        self.set_paused(None);
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn held(&self) -> Option<Lsn> {
        Some(Lsn(self.held.load(Ordering::Relaxed))).filter(|l| !l.is_zero())
    }

    pub fn paused(&self) -> Option<String> {
        self.paused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// One tenant's telemetry.
pub struct TenantTelemetry {
    /// Its spool, when it shares a slot.
    pub spool: Arc<SpoolStatus>,
    pub m: TenantMetrics,
    audit: Option<Arc<audit::AuditLog>>,
    conflict_log: Option<Arc<audit::ConflictLog>>,
    state: Mutex<State>,
    last_checkpoint: Mutex<Option<(Lsn, DateTime<Utc>)>>,
    /// Everything the source sent is applied (idle and streaming).
    caught_up: AtomicBool,
    /// Something was committed, or the stream caught up, since
    /// [`Self::take_progressed`] last asked.
    progressed: AtomicBool,
    /// Unix µs when the tenant was last known caught up.
    caught_up_at_us: AtomicI64,
    /// Unix µs of the source commit of the last applied transaction.
    applied_commit_us: AtomicI64,
    /// What the tenant let its slot release (0: nothing yet in this process).
    acknowledged: AtomicU64,
    /// The latest lag observations (for quantiles in the demo's live view).
    recent_lag: Mutex<std::collections::VecDeque<f64>>,
}

impl TenantTelemetry {
    pub fn tenant(&self) -> &str {
        &self.m.tenant
    }

    pub fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enter `state`; replication_start/stop go to the audit log.
    pub fn set_state(&self, state: State) {
        let previous = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *s, state)
        };
        self.m.up.set(state.is_up() as i64);
        if !matches!(state, State::Running) {
            self.caught_up.store(false, Ordering::Relaxed);
        }
        if previous == state {
            return;
        }
        if let Some(audit) = &self.audit {
            match state {
                State::Running => audit.record(
                    "replication_start",
                    self.tenant(),
                    serde_json::json!({"state": state.name()}),
                ),
                State::Stopped | State::Reconnecting if previous == State::Running => audit.record(
                    "replication_stop",
                    self.tenant(),
                    serde_json::json!({"state": state.name()}),
                ),
                _ => {}
            }
        }
    }

    /// A session ended with `e`: counted, audited, state changed.
    pub fn failed(&self, e: &ReplicationError, retrying: bool) {
        self.m.error(e.error_type());
        if let Some(audit) = &self.audit {
            audit.record(
                "error",
                self.tenant(),
                serde_json::json!({"error_type": e.error_type(), "error": e.to_string(), "retrying": retrying}),
            );
        }
        self.set_state(if retrying {
            State::Reconnecting
        } else {
            State::Stopped
        });
    }

    /// A refused batch or connection (apply node) — counted and audited.
    pub fn refused(&self, error_type: &str, detail: &str) {
        self.m.error(error_type);
        if let Some(audit) = &self.audit {
            audit.record(
                "error",
                self.tenant(),
                serde_json::json!({"error_type": error_type, "error": detail}),
            );
        }
    }

    /// A source transaction committed at `commit_time_us` (PostgreSQL
    /// epoch) is now committed on the target.
    pub fn applied(&self, commit_time_us: i64, end_lsn: Lsn) {
        let now = now_us();
        let commit_unix = commit_time_us + PG_EPOCH_US;
        let lag = (now - commit_unix).max(0) as f64 / 1e6;
        self.m.lag.observe(lag);
        {
            let mut recent = self.recent_lag.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() >= 50_000 {
                recent.pop_front();
            }
            recent.push_back(lag);
        }
        self.m
            .vector_clock_drift
            .set((now - commit_unix) as f64 / 1e6);
        self.m.transactions.inc();
        self.m.applied_lsn.set(end_lsn.0 as i64);
        self.applied_commit_us
            .fetch_max(commit_unix, Ordering::Relaxed);
    }

    /// A target transaction committed `c`, ending at source `end_lsn`.
    /// `wire_bytes`: what crossed the network for it (split deployment).
    pub fn committed(&self, c: &Committed, end_lsn: Lsn, wire_bytes: Option<u64>) {
        self.progressed.store(true, Ordering::Relaxed);
        self.acknowledged.fetch_max(end_lsn.0, Ordering::Relaxed);
        for t in &c.commit_times_us {
            self.applied(*t, end_lsn);
        }
        for (table, n) in &c.events_by_table {
            self.m.add_events(table, *n);
        }
        self.m.bytes.inc_by(c.bytes);
        self.m
            .bytes_replicated
            .inc_by(wire_bytes.unwrap_or(c.bytes));
        // An idle position recorded is no target transaction of rows.
        if !c.duration.is_zero() {
            self.m.batch_seconds.observe(c.duration.as_secs_f64());
        }
        for conflict in &c.conflicts {
            self.conflict(conflict);
        }
    }

    /// A conflict the target committed: counted, logged with the word
    /// CONFLICT (the guide's troubleshooting greps for it), written to the
    /// conflict log and the audit log.
    pub fn conflict(&self, c: &Conflict) {
        self.m.conflict(c.strategy);
        tracing::warn!(
            tenant = %self.tenant(), table = %c.table, primary_key = %c.primary_key,
            conflict_type = c.kind, strategy = c.strategy, winner = c.winner,
            "CONFLICT {} on {} resolved {} (winner: {})", c.kind, c.table, c.strategy, c.winner
        );
        let mut record = serde_json::json!({
            "timestamp": Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            "tenant_id": self.tenant(),
            "table_name": c.table,
            "primary_key": c.primary_key,
            "conflict_type": c.kind,
            "resolution_strategy": c.strategy,
            "winner": c.winner,
        });
        for (field, row) in [("source_row", &c.source_row), ("target_row", &c.target_row)] {
            if let Some(row) = row {
                record[field] = row.clone();
            }
        }
        if let Some(log) = &self.conflict_log {
            log.record(&record);
        }
        if let Some(audit) = &self.audit {
            audit.record(
                "conflict_resolved",
                self.tenant(),
                serde_json::json!({
                    "table_name": c.table,
                    "primary_key": c.primary_key,
                    "conflict_type": c.kind,
                    "resolution_strategy": c.strategy,
                    "winner": c.winner,
                }),
            );
        }
    }

    /// Everything received is applied, and the stream is idle.
    pub fn caught_up(&self) {
        self.progressed.store(true, Ordering::Relaxed);
        self.caught_up_at_us.store(now_us(), Ordering::Relaxed);
        self.caught_up.store(true, Ordering::Relaxed);
    }

    /// What the tenant let its slot release, if it committed anything in
    /// this process.
    pub fn acknowledged(&self) -> Option<Lsn> {
        Some(Lsn(self.acknowledged.load(Ordering::Relaxed))).filter(|l| !l.is_zero())
    }

    /// Did the session make progress (commit, or catch up) since the last
    /// call? A retry after a session that did starts its back-off anew.
    pub fn take_progressed(&self) -> bool {
        self.progressed.swap(false, Ordering::Relaxed)
    }

    /// Work arrived that is not applied yet.
    pub fn behind(&self) {
        if self.caught_up.swap(false, Ordering::Relaxed) {
            self.caught_up_at_us.store(now_us(), Ordering::Relaxed);
        }
    }

    /// How far behind the target is now (seconds).
    pub fn current_lag(&self) -> f64 {
        if self.caught_up.load(Ordering::Relaxed) && self.state() == State::Running {
            return 0.0;
        }
        let since = self
            .caught_up_at_us
            .load(Ordering::Relaxed)
            .max(self.applied_commit_us.load(Ordering::Relaxed));
        (now_us() - since).max(0) as f64 / 1e6
    }

    /// Quantiles (0–1) of the latest lag observations, in seconds.
    pub fn lag_quantiles(&self, qs: &[f64]) -> Vec<Option<f64>> {
        let mut v: Vec<f64> = self
            .recent_lag
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        v.sort_by(f64::total_cmp);
        qs.iter()
            .map(|q| {
                let i = ((v.len() as f64 - 1.0) * q).round() as usize;
                v.get(i).copied()
            })
            .collect()
    }

    pub fn checkpoint_written(&self, lsn: Lsn) {
        self.m.checkpoints.inc();
        *self
            .last_checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((lsn, Utc::now()));
        if let Some(audit) = &self.audit {
            audit.record(
                "checkpoint_created",
                self.tenant(),
                serde_json::json!({"lsn": lsn.0, "lsn_text": lsn.to_string()}),
            );
        }
    }

    pub fn checkpoint_failed(&self) {
        self.m.checkpoint_failures.inc();
        self.m.error("checkpoint");
    }

    pub fn last_checkpoint(&self) -> Option<(Lsn, DateTime<Utc>)> {
        *self
            .last_checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Recompute the gauge that depends on the clock.
    pub fn refresh(&self) {
        self.m.current_lag.set(self.current_lag());
        self.m.spool_bytes.set(self.spool.bytes() as i64);
        self.m.paused.set(self.spool.paused().is_some() as i64);
    }
}
