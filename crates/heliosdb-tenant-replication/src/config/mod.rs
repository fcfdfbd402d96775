//! Configuration: the TOML file of §10.1 of the deployment guide, checked as a
//! whole at start-up.
//!
//! * Every key of the guide parses; an unknown key or a bad value stops
//!   start-up with the file, the key and what is allowed.
//! * `REPLICATION_SOURCE_CONNECTION` / `REPLICATION_TARGET_CONNECTION` override
//!   the connection strings (§3.3, §3.4).
//! * Keys whose feature is not built yet are accepted (so the guide's files
//!   work) and reported as [`Notice`]s at start-up and by `check-config`;
//!   nothing is silently ignored.
//! * [`Config::render_masked`] prints the effective configuration with
//!   passwords replaced by `***`.
//!
//! Files: one per section, next to its defaults and checks (`cdc.rs`,
//! `seal.rs` for `[compression]` and `[encryption]`, `conflict.rs`,
//! `monitoring.rs`, `transport.rs`, `performance.rs` with `[network]`);
//! `model.rs` the raw TOML; `choices.rs` the value words stages act on;
//! `conninfo.rs` connection strings; `node.rs` files of several tenants
//! (`[[tenants]]`). This file checks `[replication]` and `[features]` and
//! puts the sections together (~670 lines: the keys that span sections,
//! the guide's aliases and the masked rendering are checked in one place).

mod cdc;
mod choices;
mod conflict;
mod conninfo;
pub mod model;
mod monitoring;
mod node;
mod performance;
mod seal;
mod secret;
mod transport;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use choices::{host_name, SchemaChanges, Strategy};
pub use conninfo::{ConnInfo, ConnInfoError, SslMode};
pub use secret::SecretString;

use crate::lsn::Lsn;
use model::RawConfig;

/// A config file that cannot be used. The message names the file and key and
/// says what is allowed; it never contains a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

/// A key that was accepted but has no effect in this build, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub key: String,
    pub message: String,
}

/// Everything one tenant's pipeline needs: its own slot, publication,
/// connections and checkpoint. One process may later run several.
#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub tenant_id: String,
    /// `None` only on an apply node (`[transport] mode = "apply"`).
    pub source: Option<ConnInfo>,
    /// `None` only on a capture node (`[transport] mode = "capture"`).
    pub target: Option<ConnInfo>,
    pub slot: String,
    pub publication: String,
    pub tenant_column: String,
    /// Where streaming starts when the target has no progress for the tenant.
    /// `Lsn::ZERO` ("from the beginning"): copy the tenant's existing rows
    /// first, then stream from the slot.
    pub start_lsn: Lsn,
    pub checkpoint_dir: PathBuf,
    /// What to do when a table's definition changes on the source.
    pub schema_changes: SchemaChanges,
    /// Every tenant of this node that reads the same slot (this one
    /// included), sorted; empty when the slot is this tenant's alone. The
    /// slot is decoded once for all of them and its publication's row
    /// filter lists them.
    pub shared_with: Vec<String>,
}

impl TenantConfig {
    /// Does this tenant share its slot with other tenants of the node?
    pub fn is_shared(&self) -> bool {
        !self.shared_with.is_empty()
    }

    /// Which slot the tenant reads: its source (masked) and slot name.
    /// Tenants with the same key share one slot.
    pub fn slot_key(&self) -> (String, String) {
        let source = self.source.as_ref().map(|s| s.masked()).unwrap_or_default();
        (source, self.slot.clone())
    }
}

impl TenantConfig {
    /// The source connection; an apply node has none.
    pub fn source(&self) -> Result<&ConnInfo, crate::error::ReplicationError> {
        self.source.as_ref().ok_or_else(|| {
            crate::error::ReplicationError::operator(
                "this node runs apply only ([transport] mode = \"apply\") and has no source connection",
                "run this command with a configuration that names the source (the capture node's, or mode = \"local\")",
            )
        })
    }

    /// The target connection; a capture node has none.
    pub fn target(&self) -> Result<&ConnInfo, crate::error::ReplicationError> {
        self.target.as_ref().ok_or_else(|| {
            crate::error::ReplicationError::operator(
                "this node runs capture only ([transport] mode = \"capture\") and has no target connection",
                "run this command with a configuration that names the target (the apply node's, or mode = \"local\")",
            )
        })
    }
}

/// Where capture and apply run (`[transport] mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Both in this process; nothing crosses a network between them.
    Local,
    /// Read the source and ship sealed batches to an apply node.
    Capture,
    /// Receive sealed batches and apply them to the target.
    Apply,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Capture => "capture",
            Self::Apply => "apply",
        }
    }
}

/// `[transport]`: TLS 1.3 with certificates on both sides.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    pub mode: Mode,
    /// Capture node: the apply node's base URL.
    pub apply_url: Option<String>,
    /// Apply node: where to listen.
    pub listen_address: Option<std::net::SocketAddr>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub request_timeout: Duration,
}

/// `[compression]` and `[encryption]`: how batches are sealed when they
/// cross the network.
#[derive(Debug, Clone)]
pub struct SealConfig {
    pub compression: crate::seal::Algorithm,
    pub level: i32,
    pub min_size_bytes: usize,
    pub dictionary_path: Option<PathBuf>,
    /// A key file (`openssl rand -hex 32`) or a keys directory
    /// (`<dir>/<tenant>/<key_id>.key`).
    pub key_path: Option<PathBuf>,
}

impl SealConfig {
    /// The compression `[compression]` asks for; reads the dictionary file.
    pub fn compression(&self) -> Result<crate::seal::Compression, String> {
        let dictionary = match &self.dictionary_path {
            Some(p) => {
                let raw = std::fs::read(p)
                    .map_err(|e| format!("[compression] dictionary_path {}: {e}", p.display()))?;
                Some(std::sync::Arc::new(crate::seal::Dictionary::new(
                    &raw, self.level,
                )))
            }
            None => None,
        };
        Ok(crate::seal::Compression {
            algorithm: self.compression,
            level: self.level,
            min_size_bytes: self.min_size_bytes,
            dictionary,
        })
    }
}

/// `[conflict]` and `[replication] node_id`: how divergent rows are resolved.
#[derive(Debug, Clone)]
pub struct ConflictConfig {
    pub strategy: Strategy,
    /// The region of the target database this daemon applies to: the name
    /// its local writes carry in version vectors.
    pub node_id: String,
    /// Tables (`schema.table`) whose row images stay out of the conflict log.
    pub sensitive_tables: Vec<String>,
}

impl Default for ConflictConfig {
    fn default() -> Self {
        Self {
            strategy: Strategy::SourcePreferred,
            node_id: host_name(),
            sensitive_tables: Vec::new(),
        }
    }
}

/// `[monitoring]`: metrics, health, audit log.
#[derive(Debug, Clone)]
pub struct MonitoringConfig {
    /// `false` only with `[features] enable_monitoring = false`.
    pub enabled: bool,
    pub bind_address: std::net::IpAddr,
    pub prometheus_port: u16,
    pub health_check_port: u16,
    pub metrics_interval: Duration,
    /// `enable_audit_log = true`: where, and which events (all when empty).
    pub audit_log: Option<(PathBuf, Vec<String>)>,
    /// `[conflict] log_conflicts = true`: the conflict log file.
    pub conflict_log: Option<PathBuf>,
}

/// Batching and flow control.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Events per target flush (`[cdc] batch_size`).
    pub batch_size: usize,
    /// Longest a committed source transaction waits for more to batch with.
    pub batch_timeout: Duration,
    /// Capacity of the queue between capture and apply, in events.
    pub buffer_events: usize,
    /// Events between two checkpoint-file writes.
    pub checkpoint_interval: u64,
    /// Row changes applied per second at most, per tenant
    /// (`[performance] max_throughput_events_per_sec`).
    pub max_events_per_sec: Option<u64>,
    /// Bytes a tenant of a shared slot may spill to disk while it is slower
    /// than the stream (`[performance] spool_max_mb`).
    pub spool_max_bytes: u64,
}

/// Connections and retries.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub connect_timeout: Duration,
    pub tcp_keepalive: Duration,
    /// Quick retries (exponential back-off) before an outage is reported as
    /// an error; retrying then goes on at the longest interval.
    pub retry_max_attempts: u32,
    pub retry_backoff: Duration,
}

/// The `[network]` defaults: for one-shot connections made without a config
/// file (`demo`, `load --source`).
impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(30),
            retry_max_attempts: 3,
            retry_backoff: Duration::from_millis(1000),
        }
    }
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: String,
    pub tenant: TenantConfig,
    pub batch: BatchConfig,
    pub network: NetworkConfig,
    pub transport: TransportConfig,
    pub seal: SealConfig,
    pub monitoring: MonitoringConfig,
    pub conflict: ConflictConfig,
    pub worker_threads: usize,
    pub notices: Vec<Notice>,
    raw_view: toml::Table,
}

/// The text of the file at `path`, and its name for messages.
fn read_file(path: &Path) -> Result<(String, String), ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        key: "(file)".into(),
        message: format!("cannot read the config file: {e}"),
    })?;
    Ok((text, file))
}

/// Default for `[cdc] checkpoint_dir`.
pub const DEFAULT_CHECKPOINT_DIR: &str = "/var/lib/heliosdb/checkpoints";

impl Config {
    /// Read and check `path`, applying environment overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (text, file) = read_file(path)?;
        Self::from_toml(&text, &file, |k| std::env::var(k).ok())
    }

    /// Parse and check TOML text; `env` supplies environment overrides.
    pub fn from_toml(
        text: &str,
        file: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_string(),
            key: describe_toml_error_key(&e, text),
            message: without_quoted_values(e.message())
                + &line_of(text, e.span())
                    .map(|l| format!(" (line {l})"))
                    .unwrap_or_default(),
        })?;
        resolve(raw, file, env)
    }

    /// The effective configuration as TOML, passwords masked.
    pub fn render_masked(&self) -> String {
        toml::to_string_pretty(&self.raw_view).unwrap_or_default()
    }
}

/// A TOML error message with its quoted values left out (`invalid type:
/// string "postgresql://u:pw@x", expected u16`): a value given to the wrong
/// key may be a connection string or a key.
fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    let mut inside = true;
    for part in parts {
        if inside {
            out.push_str("(value not shown)");
        } else {
            out.push_str(part);
        }
        inside = !inside;
    }
    out
}

/// A key that is accepted but changes nothing (or is not supported): said
/// by `check-config` and at start.
fn notice(notices: &mut Vec<Notice>, key: &str, message: &str) {
    notices.push(Notice {
        key: key.to_string(),
        message: message.to_string(),
    })
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> Option<usize> {
    let span = span?;
    Some(text.get(..span.start)?.matches('\n').count() + 1)
}

/// `[section] key` of a parse error, from the message or the line it points at.
fn describe_toml_error_key(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message();
    let section_at = |pos: usize| {
        text.get(..pos)
            .and_then(|before| {
                before
                    .lines()
                    .rev()
                    .find(|l| l.trim_start().starts_with('['))
            })
            .map(|l| l.trim().to_string())
    };
    let pos = e.span().map(|s| s.start).unwrap_or(0);
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some(name) = rest.split('`').next() {
            return match section_at(pos) {
                Some(sec) if !text.get(pos..).is_some_and(|t| t.starts_with('[')) => {
                    format!("{sec} {name}")
                }
                _ => name.to_string(),
            };
        }
    }
    let line_start = text
        .get(..pos)
        .map(|b| b.rfind('\n').map(|i| i + 1).unwrap_or(0))
        .unwrap_or(0);
    let line = text
        .get(line_start..)
        .and_then(|l| l.lines().next())
        .unwrap_or("");
    match line.split_once('=') {
        Some((key, _)) if !line.trim_start().starts_with('[') => match section_at(line_start) {
            Some(sec) => format!("{sec} {}", key.trim()),
            None => key.trim().to_string(),
        },
        _ => "(syntax)".into(),
    }
}

struct Checker<'a> {
    file: &'a str,
}

impl Checker<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn range(
        &self,
        key: &str,
        v: Option<u64>,
        default: u64,
        lo: u64,
        hi: u64,
    ) -> Result<u64, ConfigError> {
        let v = v.unwrap_or(default);
        if v < lo || v > hi {
            return Err(self.err(key, format!("{v} is out of range: allowed {lo} to {hi}")));
        }
        Ok(v)
    }

    /// A §8.2 `[performance]` alias and its canonical key: either may be
    /// set; both only when equal.
    fn alias<T: PartialEq + std::fmt::Debug + Copy>(
        &self,
        canonical: (&str, Option<T>),
        alias: (&str, Option<T>),
    ) -> Result<Option<T>, ConfigError> {
        match (canonical.1, alias.1) {
            (Some(a), Some(b)) if a != b => Err(self.err(
                alias.0,
                format!(
                    "{b:?} contradicts {} = {a:?}; set it in one place",
                    canonical.0
                ),
            )),
            (Some(a), _) => Ok(Some(a)),
            (None, b) => Ok(b),
        }
    }
}

fn resolve(
    raw: RawConfig,
    file: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let c = Checker { file };
    let mut notices = Vec::new();

    // --- tenant and connections ---
    let tenant_id = raw.replication.tenant_id.clone().ok_or_else(|| {
        c.err(
            "[replication] tenant_id",
            "missing: name the tenant to replicate, e.g. tenant_id = \"tenant-123\"",
        )
    })?;
    if tenant_id.is_empty()
        || tenant_id.len() > 128
        || tenant_id == "."
        || tenant_id == ".."
        || !tenant_id
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
    {
        return Err(c.err(
            "[replication] tenant_id",
            format!("'{tenant_id}' is not allowed: use 1 to 128 characters from A-Z a-z 0-9 - _ . (it names the checkpoint file)"),
        ));
    }
    let mode = match raw.transport.mode.as_deref() {
        None | Some("local") => Mode::Local,
        Some("capture") => Mode::Capture,
        Some("apply") => Mode::Apply,
        Some(other) => {
            return Err(c.err(
                "[transport] mode",
                format!("'{other}' is not allowed: local (capture and apply in this process), capture, or apply"),
            ))
        }
    };
    let source = connection(
        &c,
        "source",
        raw.replication.source_connection.as_deref(),
        raw.source.as_ref().and_then(|s| s.connection.as_deref()),
        env("REPLICATION_SOURCE_CONNECTION"),
        mode != Mode::Apply,
    )?;
    let target = connection(
        &c,
        "target",
        raw.replication.target_connection.as_deref(),
        raw.target.as_ref().and_then(|s| s.connection.as_deref()),
        env("REPLICATION_TARGET_CONNECTION"),
        mode != Mode::Capture,
    )?;
    if let (Some(source), Some(target)) = (&source, &target) {
        if source.host == target.host
            && source.port == target.port
            && source.dbname == target.dbname
        {
            return Err(c.err(
                "[replication] target_connection",
                format!("source and target are the same database ({}:{}/{}); the target must be another database", target.host, target.port, target.dbname),
            ));
        }
    }

    // --- features ---
    let f = &raw.features;
    if f.enable_cdc == Some(false) {
        return Err(c.err("[features] enable_cdc", "false leaves nothing to do: change data capture is how this daemon replicates; set it to true or remove it"));
    }
    if f.enable_semantic_resolution == Some(true) {
        notice(
            &mut notices,
            "[features] enable_semantic_resolution",
            "not supported: conflicts are not resolved by a model in this build",
        );
    }
    if f.enable_predictive_replication == Some(true) {
        notice(
            &mut notices,
            "[features] enable_predictive_replication",
            "not supported: changes are replicated in commit order",
        );
    }

    let cdc::Cdc {
        slot,
        publication,
        tenant_column,
        batch_size,
        checkpoint_interval,
        start_lsn,
        schema_changes,
        checkpoint_dir,
    } = cdc::cdc(&c, &raw, &tenant_id, &mut notices)?;
    let seal = seal::seal(&c, &raw, mode, &mut notices)?;
    let (conflict, conflict_log) = conflict::conflict(&c, &raw, &mut notices)?;
    let monitoring = monitoring::monitoring(&c, &raw, conflict_log, &mut notices)?;
    let transport = transport::transport(&c, &raw, mode, &mut notices)?;
    let performance::Performance {
        buffer_events,
        worker_threads,
        batch_timeout_ms,
        max_events_per_sec,
        spool_max_mb,
    } = performance::performance(&c, &raw, &mut notices)?;
    let network = performance::network(&c, &raw, &mut notices)?;

    // The effective configuration, for check-config (no secrets in it).
    let mut view = toml::Table::new();
    let mut repl = toml::Table::new();
    repl.insert("tenant_id".into(), tenant_id.clone().into());
    if let Some(source) = &source {
        repl.insert("source_connection".into(), source.masked().into());
    }
    if let Some(target) = &target {
        repl.insert("target_connection".into(), target.masked().into());
    }
    view.insert("replication".into(), repl.into());
    let mut cdc = toml::Table::new();
    cdc.insert("replication_slot".into(), slot.clone().into());
    cdc.insert("publication_name".into(), publication.clone().into());
    cdc.insert("tenant_column".into(), tenant_column.clone().into());
    cdc.insert("batch_size".into(), (batch_size as i64).into());
    cdc.insert(
        "checkpoint_interval".into(),
        (checkpoint_interval as i64).into(),
    );
    cdc.insert(
        "checkpoint_dir".into(),
        checkpoint_dir.display().to_string().into(),
    );
    cdc.insert("start_lsn".into(), start_lsn.to_string().into());
    cdc.insert(
        "schema_changes".into(),
        (if schema_changes == SchemaChanges::Apply {
            "apply"
        } else {
            "halt"
        })
        .into(),
    );
    view.insert("cdc".into(), cdc.into());
    let mut perf = toml::Table::new();
    perf.insert("buffer_size_events".into(), (buffer_events as i64).into());
    perf.insert("worker_threads".into(), (worker_threads as i64).into());
    perf.insert("batch_timeout_ms".into(), (batch_timeout_ms as i64).into());
    perf.insert("spool_max_mb".into(), (spool_max_mb as i64).into());
    view.insert("performance".into(), perf.into());
    let mut net = toml::Table::new();
    net.insert(
        "tcp_keepalive_seconds".into(),
        (network.tcp_keepalive.as_secs() as i64).into(),
    );
    net.insert(
        "connect_timeout_seconds".into(),
        (network.connect_timeout.as_secs() as i64).into(),
    );
    net.insert(
        "retry_max_attempts".into(),
        i64::from(network.retry_max_attempts).into(),
    );
    net.insert(
        "retry_backoff_ms".into(),
        (network.retry_backoff.as_millis() as i64).into(),
    );
    view.insert("network".into(), net.into());
    for (name, section) in [
        ("features", toml::Table::try_from(&raw.features)),
        ("compression", toml::Table::try_from(&raw.compression)),
        ("encryption", toml::Table::try_from(&raw.encryption)),
        ("conflict", toml::Table::try_from(&raw.conflict)),
        ("monitoring", toml::Table::try_from(&raw.monitoring)),
        ("transport", toml::Table::try_from(&raw.transport)),
    ] {
        if let Ok(t) = section {
            if !t.is_empty() {
                view.insert(name.into(), t.into());
            }
        }
    }

    Ok(Config {
        file: file.to_string(),
        tenant: TenantConfig {
            tenant_id,
            source,
            target,
            slot,
            publication,
            tenant_column,
            start_lsn,
            checkpoint_dir,
            schema_changes,
            shared_with: Vec::new(),
        },
        batch: BatchConfig {
            batch_size: batch_size as usize,
            batch_timeout: Duration::from_millis(batch_timeout_ms),
            buffer_events: buffer_events as usize,
            checkpoint_interval,
            max_events_per_sec,
            spool_max_bytes: spool_max_mb << 20,
        },
        transport,
        monitoring,
        conflict,
        seal,
        network,
        worker_threads: worker_threads as usize,
        notices,
        raw_view: view,
    })
}

/// One side's connection: environment override, else `[replication]
/// <side>_connection`, else `[<side>] connection` (both set: they must agree).
fn connection(
    c: &Checker<'_>,
    side: &str,
    in_replication: Option<&str>,
    in_section: Option<&str>,
    from_env: Option<String>,
    required: bool,
) -> Result<Option<ConnInfo>, ConfigError> {
    let env_name = format!("REPLICATION_{}_CONNECTION", side.to_uppercase());
    let (key, value) = match (from_env, in_replication, in_section) {
        (Some(v), _, _) => (env_name.clone(), v),
        (None, Some(a), Some(b)) if a != b => {
            return Err(c.err(
                &format!("[{side}] connection"),
                format!("differs from [replication] {side}_connection; set the connection in one place"),
            ))
        }
        (None, Some(a), _) => (format!("[replication] {side}_connection"), a.to_string()),
        (None, None, Some(b)) => (format!("[{side}] connection"), b.to_string()),
        (None, None, None) if !required => return Ok(None),
        (None, None, None) => {
            return Err(c.err(
                &format!("[replication] {side}_connection"),
                format!("missing: set [replication] {side}_connection, [{side}] connection, or the environment variable {env_name}"),
            ))
        }
    };
    ConnInfo::parse(&value)
        .map(Some)
        .map_err(|e| c.err(&key, e.0))
}

#[cfg(test)]
mod tests;
