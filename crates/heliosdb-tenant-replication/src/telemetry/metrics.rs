//! Prometheus metrics: the §10.2 table of the deployment guide, name for
//! name, plus what an operator of a replication slot needs beyond it.
//!
//! Every series carries `tenant_id`. Hot paths do not touch the registry
//! per event: the pipeline adds per-table counts when a target transaction
//! commits, and seal/transport counters once per batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Lag buckets: 10 ms to 30 min.
const LAG_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
const BATCH_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Names of every metric family the daemon exports (histograms add
/// `_bucket`, `_sum`, `_count`). Shipped dashboards and rules may only use
/// these (checked by `tests/deploy_monitoring.rs`).
pub const FAMILIES: &[&str] = &[
    "heliosdb_replication_lag_seconds",
    "heliosdb_replication_current_lag_seconds",
    "heliosdb_replication_throughput_events_per_sec",
    "heliosdb_replication_events_total",
    "heliosdb_replication_bytes_total",
    "heliosdb_bytes_replicated_total",
    "heliosdb_replication_errors_total",
    "heliosdb_replication_conflicts_total",
    "heliosdb_checkpoints_total",
    "heliosdb_checkpoint_failures_total",
    "heliosdb_compression_ratio",
    "heliosdb_in_flight_events",
    "heliosdb_vector_clock_drift_seconds",
    "heliosdb_replication_transactions_total",
    "heliosdb_apply_batch_duration_seconds",
    "heliosdb_replication_applied_lsn",
    "heliosdb_tenant_wal_held_bytes",
    "heliosdb_tenant_spool_bytes",
    "heliosdb_tenant_paused",
    "heliosdb_slot_retained_wal_bytes",
    "heliosdb_slot_confirmed_flush_lsn",
    "heliosdb_replication_up",
];

/// Histogram families (their series carry `_bucket`, `_sum`, `_count`).
pub const HISTOGRAMS: &[&str] = &[
    "heliosdb_replication_lag_seconds",
    "heliosdb_apply_batch_duration_seconds",
];

/// Every metric family the daemon exports.
pub struct Metrics {
    registry: Registry,
    lag: HistogramVec,
    current_lag: GaugeVec,
    throughput: GaugeVec,
    events: IntCounterVec,
    bytes: IntCounterVec,
    bytes_replicated: IntCounterVec,
    errors: IntCounterVec,
    conflicts: IntCounterVec,
    checkpoints: IntCounterVec,
    checkpoint_failures: IntCounterVec,
    compression_ratio: GaugeVec,
    in_flight: IntGaugeVec,
    vector_clock_drift: GaugeVec,
    transactions: IntCounterVec,
    batch_seconds: HistogramVec,
    applied_lsn: IntGaugeVec,
    wal_held: IntGaugeVec,
    spool_bytes: IntGaugeVec,
    paused: IntGaugeVec,
    slot_retained: IntGaugeVec,
    slot_confirmed: IntGaugeVec,
    up: IntGaugeVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

macro_rules! register {
    ($registry:expr, $metric:expr) => {{
        let m = $metric.expect("metric definition");
        $registry
            .register(Box::new(m.clone()))
            .expect("unique metric name");
        m
    }};
}

impl Metrics {
    #[allow(clippy::expect_used)] // static definitions: a mistake fails every test at once
    pub fn new() -> Self {
        let r = Registry::new();
        let t = &["tenant_id"];
        Self {
            lag: register!(r, HistogramVec::new(
                HistogramOpts::new("heliosdb_replication_lag_seconds", "Replication lag distribution: target commit time minus source commit time of each applied transaction").buckets(LAG_BUCKETS.to_vec()), t)),
            current_lag: register!(r, GaugeVec::new(opts("heliosdb_replication_current_lag_seconds", "How far the target is behind the source now (grows while replication is stalled; 0 when caught up)"), t)),
            throughput: register!(r, GaugeVec::new(opts("heliosdb_replication_throughput_events_per_sec", "Current throughput (events applied per second over the last interval)"), t)),
            events: register!(r, IntCounterVec::new(opts("heliosdb_replication_events_total", "Total events replicated"), &["tenant_id", "table"])),
            bytes: register!(r, IntCounterVec::new(opts("heliosdb_replication_bytes_total", "Total bytes replicated (row data as sent by the source)"), t)),
            bytes_replicated: register!(r, IntCounterVec::new(opts("heliosdb_bytes_replicated_total", "Bytes sent between capture and apply (sealed batches on the wire; row data in one process)"), t)),
            errors: register!(r, IntCounterVec::new(opts("heliosdb_replication_errors_total", "Total errors"), &["tenant_id", "error_type"])),
            conflicts: register!(r, IntCounterVec::new(opts("heliosdb_replication_conflicts_total", "Total conflicts"), &["tenant_id", "strategy"])),
            checkpoints: register!(r, IntCounterVec::new(opts("heliosdb_checkpoints_total", "Total checkpoints created"), t)),
            checkpoint_failures: register!(r, IntCounterVec::new(opts("heliosdb_checkpoint_failures_total", "Total checkpoint failures"), t)),
            compression_ratio: register!(r, GaugeVec::new(opts("heliosdb_compression_ratio", "Compression ratio of the last sealed batch (compressed/original)"), t)),
            in_flight: register!(r, IntGaugeVec::new(opts("heliosdb_in_flight_events", "Events currently being processed (queued or applied, not yet committed)"), t)),
            vector_clock_drift: register!(r, GaugeVec::new(opts("heliosdb_vector_clock_drift_seconds", "Difference between the source commit time and this node's clock at apply (clock skew plus delay)"), t)),
            transactions: register!(r, IntCounterVec::new(opts("heliosdb_replication_transactions_total", "Source transactions applied"), t)),
            batch_seconds: register!(r, HistogramVec::new(
                HistogramOpts::new("heliosdb_apply_batch_duration_seconds", "Time to apply and commit one target transaction").buckets(BATCH_BUCKETS.to_vec()), t)),
            applied_lsn: register!(r, IntGaugeVec::new(opts("heliosdb_replication_applied_lsn", "End LSN of the last source transaction committed on the target"), t)),
            wal_held: register!(r, IntGaugeVec::new(opts("heliosdb_tenant_wal_held_bytes", "WAL the source keeps because of this tenant: its current WAL position minus what the tenant let its slot release (on a shared slot, the tenant furthest behind holds it for all)"), t)),
            spool_bytes: register!(r, IntGaugeVec::new(opts("heliosdb_tenant_spool_bytes", "Bytes in the tenant's spool on disk: changes of a shared slot its target has not applied yet (bounded by [performance] spool_max_mb)"), t)),
            paused: register!(r, IntGaugeVec::new(opts("heliosdb_tenant_paused", "1 while the tenant is paused because its spool is full (the shared slot holds for it)"), t)),
            slot_retained: register!(r, IntGaugeVec::new(opts("heliosdb_slot_retained_wal_bytes", "WAL the source keeps for the tenant's slot (current WAL position minus restart_lsn)"), &["tenant_id", "slot"])),
            slot_confirmed: register!(r, IntGaugeVec::new(opts("heliosdb_slot_confirmed_flush_lsn", "The slot's confirmed_flush_lsn on the source"), &["tenant_id", "slot"])),
            up: register!(r, IntGaugeVec::new(opts("heliosdb_replication_up", "1 while the tenant streams or copies, 0 while it is stopped or reconnecting"), t)),
            registry: r,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Handles for one tenant.
    pub fn tenant(&self, tenant: &str) -> TenantMetrics {
        let t = &[tenant];
        let m = TenantMetrics {
            tenant: tenant.to_string(),
            lag: self.lag.with_label_values(t),
            current_lag: self.current_lag.with_label_values(t),
            throughput: self.throughput.with_label_values(t),
            bytes: self.bytes.with_label_values(t),
            bytes_replicated: self.bytes_replicated.with_label_values(t),
            checkpoints: self.checkpoints.with_label_values(t),
            checkpoint_failures: self.checkpoint_failures.with_label_values(t),
            compression_ratio: self.compression_ratio.with_label_values(t),
            in_flight: self.in_flight.with_label_values(t),
            vector_clock_drift: self.vector_clock_drift.with_label_values(t),
            transactions: self.transactions.with_label_values(t),
            batch_seconds: self.batch_seconds.with_label_values(t),
            applied_lsn: self.applied_lsn.with_label_values(t),
            wal_held: self.wal_held.with_label_values(t),
            spool_bytes: self.spool_bytes.with_label_values(t),
            paused: self.paused.with_label_values(t),
            up: self.up.with_label_values(t),
            events: self.events.clone(),
            errors: self.errors.clone(),
            conflicts: self.conflicts.clone(),
            slot_retained: self.slot_retained.clone(),
            slot_confirmed: self.slot_confirmed.clone(),
            tables: Mutex::new(HashMap::new()),
            labelled: Mutex::new(std::collections::HashSet::new()),
            events_total: AtomicU64::new(0),
            errors_total: AtomicU64::new(0),
            conflicts_total: AtomicU64::new(0),
            rate: Mutex::new((Instant::now(), 0)),
        };
        // Series exist from the start (alerts and dashboards see zeros, not gaps).
        m.throughput.set(0.0);
        m.current_lag.set(0.0);
        for error_type in crate::error::ReplicationError::ERROR_TYPES {
            m.error_series(error_type).inc_by(0);
        }
        m
    }

    /// Drop every series of the tenant `m` is for (a tenant removed from
    /// the node): dashboards stop showing it, alerts stop firing for it.
    pub fn remove_tenant(&self, m: &TenantMetrics) {
        let t = &[m.tenant.as_str()];
        let _ = self.lag.remove_label_values(t);
        let _ = self.current_lag.remove_label_values(t);
        let _ = self.throughput.remove_label_values(t);
        let _ = self.bytes.remove_label_values(t);
        let _ = self.bytes_replicated.remove_label_values(t);
        let _ = self.checkpoints.remove_label_values(t);
        let _ = self.checkpoint_failures.remove_label_values(t);
        let _ = self.compression_ratio.remove_label_values(t);
        let _ = self.in_flight.remove_label_values(t);
        let _ = self.vector_clock_drift.remove_label_values(t);
        let _ = self.transactions.remove_label_values(t);
        let _ = self.batch_seconds.remove_label_values(t);
        let _ = self.applied_lsn.remove_label_values(t);
        let _ = self.wal_held.remove_label_values(t);
        let _ = self.spool_bytes.remove_label_values(t);
        let _ = self.paused.remove_label_values(t);
        let _ = self.up.remove_label_values(t);
        for table in m.tables.lock().unwrap_or_else(|p| p.into_inner()).keys() {
            let _ = self.events.remove_label_values(&[&m.tenant, table]);
        }
        for (family, second) in m.labelled.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let labels = [m.tenant.as_str(), second.as_str()];
            let _ = match *family {
                "errors" => self.errors.remove_label_values(&labels),
                "conflicts" => self.conflicts.remove_label_values(&labels),
                _ => self
                    .slot_retained
                    .remove_label_values(&labels)
                    .and(self.slot_confirmed.remove_label_values(&labels)),
            };
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One tenant's metric handles, plus running totals for `/health`.
pub struct TenantMetrics {
    pub tenant: String,
    pub lag: Histogram,
    pub current_lag: Gauge,
    pub throughput: Gauge,
    pub bytes: IntCounter,
    pub bytes_replicated: IntCounter,
    pub checkpoints: IntCounter,
    pub checkpoint_failures: IntCounter,
    pub compression_ratio: Gauge,
    pub in_flight: IntGauge,
    pub vector_clock_drift: Gauge,
    pub transactions: IntCounter,
    pub batch_seconds: Histogram,
    pub applied_lsn: IntGauge,
    pub wal_held: IntGauge,
    pub spool_bytes: IntGauge,
    pub paused: IntGauge,
    pub up: IntGauge,
    events: IntCounterVec,
    errors: IntCounterVec,
    conflicts: IntCounterVec,
    slot_retained: IntGaugeVec,
    slot_confirmed: IntGaugeVec,
    tables: Mutex<HashMap<String, IntCounter>>,
    /// Second labels this tenant's series were made with (errors,
    /// conflicts, slots), so that a removed tenant's series go too.
    labelled: Mutex<std::collections::HashSet<(&'static str, String)>>,
    events_total: AtomicU64,
    errors_total: AtomicU64,
    conflicts_total: AtomicU64,
    /// When the throughput gauge was last computed, and the event total then.
    rate: Mutex<(Instant, u64)>,
}

impl TenantMetrics {
    /// Events applied to `table` (counted when their transaction committed).
    pub fn add_events(&self, table: &str, n: u64) {
        if n == 0 {
            return;
        }
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        tables
            .entry(table.to_string())
            .or_insert_with(|| self.events.with_label_values(&[&self.tenant, table]))
            .inc_by(n);
        self.events_total.fetch_add(n, Ordering::Relaxed);
    }

    /// An error of `error_type` (a stable, low-cardinality label).
    pub fn error(&self, error_type: &str) {
        self.error_series(error_type).inc();
        self.errors_total.fetch_add(1, Ordering::Relaxed);
    }

    /// The series of `family` with second label `value`, remembered.
    fn labelled(&self, family: &'static str, value: &str) {
        self.labelled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((family, value.to_string()));
    }

    fn error_series(&self, error_type: &str) -> IntCounter {
        self.labelled("errors", error_type);
        self.errors.with_label_values(&[&self.tenant, error_type])
    }

    fn conflict_series(&self, strategy: &str) -> IntCounter {
        self.labelled("conflicts", strategy);
        self.conflicts.with_label_values(&[&self.tenant, strategy])
    }

    /// The conflict counter of `strategy` exists at 0 from the start.
    pub fn conflict_strategy(&self, strategy: &str) {
        self.conflict_series(strategy).inc_by(0);
    }

    pub fn conflict(&self, strategy: &str) {
        self.conflict_series(strategy).inc();
        self.conflicts_total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn slot(&self, slot: &str, retained_bytes: i64, confirmed_lsn: u64) {
        self.labelled("slots", slot);
        self.slot_retained
            .with_label_values(&[&self.tenant, slot])
            .set(retained_bytes);
        self.slot_confirmed
            .with_label_values(&[&self.tenant, slot])
            .set(confirmed_lsn as i64);
    }

    pub fn events_total(&self) -> u64 {
        self.events_total.load(Ordering::Relaxed)
    }

    pub fn errors_total(&self) -> u64 {
        self.errors_total.load(Ordering::Relaxed)
    }

    pub fn conflicts_total(&self) -> u64 {
        self.conflicts_total.load(Ordering::Relaxed)
    }

    /// Recompute the throughput gauge (events per second since the last call).
    pub fn update_throughput(&self) {
        let mut rate = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let total = self.events_total();
        let secs = now.duration_since(rate.0).as_secs_f64();
        if secs > 0.0 {
            self.throughput
                .set((total.saturating_sub(rate.1)) as f64 / secs);
        }
        *rate = (now, total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_exported_with_the_guide_types_and_labels() {
        let m = Metrics::new();
        let t = m.tenant("tenant-123");
        t.add_events("public.orders", 3);
        t.error("transport");
        t.conflict("LastWriteWins");
        t.slot("tenant_123_slot", 1024, 42);
        t.lag.observe(0.2);
        t.batch_seconds.observe(0.01);
        let text = m.render();
        for name in FAMILIES {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} not exported:\n{text}"
            );
        }
        for (name, kind) in [
            ("heliosdb_replication_lag_seconds", "histogram"),
            ("heliosdb_replication_throughput_events_per_sec", "gauge"),
            ("heliosdb_replication_events_total", "counter"),
            ("heliosdb_replication_bytes_total", "counter"),
            ("heliosdb_replication_errors_total", "counter"),
            ("heliosdb_replication_conflicts_total", "counter"),
            ("heliosdb_checkpoints_total", "counter"),
            ("heliosdb_checkpoint_failures_total", "counter"),
            ("heliosdb_compression_ratio", "gauge"),
            ("heliosdb_in_flight_events", "gauge"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}")),
                "{name} is not a {kind}"
            );
        }
        assert!(text.contains(r#"heliosdb_replication_events_total{table="public.orders",tenant_id="tenant-123"} 3"#), "{text}");
        assert!(text.contains(
            r#"heliosdb_replication_errors_total{error_type="transport",tenant_id="tenant-123"} 1"#
        ));
        assert!(text.contains(r#"heliosdb_replication_conflicts_total{strategy="LastWriteWins",tenant_id="tenant-123"} 1"#));
        assert_eq!(t.events_total(), 3);
        assert_eq!(t.errors_total(), 1);

        // A removed tenant leaves no series behind; another keeps its own.
        let other = m.tenant("tenant-456");
        other.add_events("public.orders", 1);
        m.remove_tenant(&t);
        let text = m.render();
        assert!(!text.contains("tenant-123"), "{text}");
        assert!(text.contains("tenant-456"), "{text}");
    }
}
