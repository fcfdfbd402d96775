//! The TOML file as written by users: every section and key of §10.1, §3.1
//! step 5, §7.2 (`[source]`/`[target]`) and §8.2 of the deployment guide.
//!
//! Everything is `deny_unknown_fields`, so a misspelt key stops start-up with
//! the list of keys that section allows. Keys are `Option` where we must know
//! whether the user set them (to report features that are not built yet).

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub replication: ReplicationSection,
    pub source: Option<EndpointSection>,
    pub target: Option<EndpointSection>,
    #[serde(default)]
    pub features: FeaturesSection,
    #[serde(default)]
    pub cdc: CdcSection,
    #[serde(default)]
    pub compression: CompressionSection,
    #[serde(default)]
    pub encryption: EncryptionSection,
    #[serde(default)]
    pub conflict: ConflictSection,
    #[serde(default)]
    pub monitoring: MonitoringSection,
    #[serde(default)]
    pub performance: PerformanceSection,
    #[serde(default)]
    pub network: NetworkSection,
    #[serde(default)]
    pub transport: TransportSection,
}

/// `[replication]`. Connection strings hold passwords: kept as plain strings
/// only until `Config::resolve` turns them into `ConnInfo`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSection {
    pub tenant_id: Option<String>,
    pub source_connection: Option<String>,
    pub target_connection: Option<String>,
    /// The region of the target this daemon applies to (version vectors,
    /// origins); default: the host name.
    pub node_id: Option<String>,
}

/// `[source]` / `[target]` (§7.2).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSection {
    pub connection: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FeaturesSection {
    pub enable_cdc: Option<bool>,
    pub enable_compression: Option<bool>,
    pub enable_encryption: Option<bool>,
    pub enable_monitoring: Option<bool>,
    pub enable_semantic_resolution: Option<bool>,
    pub enable_predictive_replication: Option<bool>,
}

/// `start_lsn` may be a number (`0`, `987654321`) or PostgreSQL's text form.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum LsnValue {
    Number(u64),
    Text(String),
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CdcSection {
    pub replication_slot: Option<String>,
    pub publication_name: Option<String>,
    pub batch_size: Option<u64>,
    pub checkpoint_interval: Option<u64>,
    pub wal_path: Option<String>,
    pub start_lsn: Option<LsnValue>,
    /// Where `<tenant>.checkpoint` files go (default `/var/lib/heliosdb/checkpoints`).
    pub checkpoint_dir: Option<String>,
    /// The column that names a row's tenant (default `tenant_id`).
    pub tenant_column: Option<String>,
    /// `apply` (default) or `halt` on a table definition change.
    pub schema_changes: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionSection {
    pub algorithm: Option<String>,
    pub level: Option<i64>,
    pub min_size_bytes: Option<u64>,
    pub dictionary_path: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionSection {
    pub algorithm: Option<String>,
    pub key_file: Option<String>,
    pub kms_key_arn: Option<String>,
    pub key_rotation_days: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConflictSection {
    pub resolution_strategy: Option<String>,
    pub log_conflicts: Option<bool>,
    pub conflict_log_path: Option<String>,
    /// Tables (`schema.table` or `table` for public) whose row images never
    /// reach the conflict log.
    pub sensitive_tables: Option<Vec<String>>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MonitoringSection {
    pub prometheus_port: Option<u16>,
    pub health_check_port: Option<u16>,
    pub metrics_interval_seconds: Option<u64>,
    pub enable_audit_log: Option<bool>,
    pub audit_log_path: Option<String>,
    pub audit_log_format: Option<String>,
    pub audit_events: Option<Vec<String>>,
    /// Address the monitoring endpoints listen on (default 0.0.0.0).
    pub bind_address: Option<String>,
}

/// `[performance]`, including the keys §8.2 shows there (batching,
/// checkpointing, compression and network settings), which are accepted as
/// aliases of their canonical sections.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PerformanceSection {
    pub max_throughput_events_per_sec: Option<u64>,
    pub target_replication_lag_seconds: Option<f64>,
    pub buffer_size_events: Option<u64>,
    pub worker_threads: Option<u64>,
    pub batch_timeout_ms: Option<u64>,
    /// Not in the guide: the most a tenant of a shared slot may spill to
    /// disk while it is slower than the stream.
    pub spool_max_mb: Option<u64>,
    // §8.2 aliases
    pub batch_size: Option<u64>,
    pub checkpoint_interval: Option<u64>,
    pub checkpoint_async: Option<bool>,
    pub compression_level: Option<i64>,
    pub compression_min_size_bytes: Option<u64>,
    pub tcp_keepalive_seconds: Option<u64>,
    pub connection_pool_size: Option<u64>,
    pub connect_timeout_seconds: Option<u64>,
    pub read_timeout_seconds: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    pub tcp_keepalive_seconds: Option<u64>,
    pub connection_pool_size: Option<u64>,
    pub connect_timeout_seconds: Option<u64>,
    pub read_timeout_seconds: Option<u64>,
    pub retry_max_attempts: Option<u64>,
    pub retry_backoff_ms: Option<u64>,
}

/// `[transport]` (not in the guide): where capture and apply run.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TransportSection {
    /// `local` (default: both in this process), `capture` or `apply`.
    pub mode: Option<String>,
    /// Capture node: the apply node's base URL (`https://host:port`).
    pub apply_url: Option<String>,
    /// Apply node: the address to listen on (`0.0.0.0:8443`).
    pub listen_address: Option<String>,
    /// PEM CA: the capture node trusts the apply node's certificate by it;
    /// the apply node accepts client certificates it signed.
    pub ca_file: Option<String>,
    /// PEM certificate chain of this node.
    pub cert_file: Option<String>,
    /// PEM private key of this node (mode 0600 or stricter).
    pub key_file: Option<String>,
    /// Longest a batch may take to be applied and answered.
    pub request_timeout_seconds: Option<u64>,
}
