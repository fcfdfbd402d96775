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

mod choices;
mod conninfo;
pub mod model;
mod secret;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use choices::{host_name, SchemaChanges, Strategy};
pub use conninfo::{ConnInfo, ConnInfoError, SslMode};
pub use secret::SecretString;

use crate::lsn::Lsn;
use model::{LsnValue, RawConfig};

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

/// Default for `[cdc] checkpoint_dir`.
pub const DEFAULT_CHECKPOINT_DIR: &str = "/var/lib/heliosdb/checkpoints";

impl Config {
    /// Read and check `path`, applying environment overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            message: format!("cannot read the config file: {e}"),
        })?;
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
    let mut notice = |key: &str, message: &str| {
        notices.push(Notice {
            key: key.to_string(),
            message: message.to_string(),
        })
    };

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
            "[features] enable_semantic_resolution",
            "not supported: conflicts are not resolved by a model in this build",
        );
    }
    if f.enable_predictive_replication == Some(true) {
        notice(
            "[features] enable_predictive_replication",
            "not supported: changes are replicated in commit order",
        );
    }

    // --- cdc ---
    let slug: String = tenant_id
        .chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() {
                ch.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let slot = raw
        .cdc
        .replication_slot
        .clone()
        .unwrap_or_else(|| format!("{slug}_slot"));
    if slot.is_empty()
        || slot.len() > 63
        || !slot
            .chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
    {
        return Err(c.err(
            "[cdc] replication_slot",
            format!("'{slot}' is not a valid slot name: PostgreSQL allows 1 to 63 characters from a-z 0-9 _"),
        ));
    }
    let publication = raw
        .cdc
        .publication_name
        .clone()
        .unwrap_or_else(|| format!("{slug}_pub"));
    if publication.is_empty() || publication.len() > 63 || publication.contains('\0') {
        return Err(c.err(
            "[cdc] publication_name",
            format!("'{publication}' is not a valid publication name: 1 to 63 bytes"),
        ));
    }
    let tenant_column = raw
        .cdc
        .tenant_column
        .clone()
        .unwrap_or_else(|| "tenant_id".into());
    if tenant_column.is_empty() || tenant_column.len() > 63 || tenant_column.contains('\0') {
        return Err(c.err(
            "[cdc] tenant_column",
            "must be a column name of 1 to 63 bytes",
        ));
    }
    let batch_size = c.alias(
        ("[cdc] batch_size", raw.cdc.batch_size),
        ("[performance] batch_size", raw.performance.batch_size),
    )?;
    let batch_size = c.range("[cdc] batch_size", batch_size, 1000, 1, 100_000)?;
    let checkpoint_interval = c.alias(
        ("[cdc] checkpoint_interval", raw.cdc.checkpoint_interval),
        (
            "[performance] checkpoint_interval",
            raw.performance.checkpoint_interval,
        ),
    )?;
    let checkpoint_interval = c.range(
        "[cdc] checkpoint_interval",
        checkpoint_interval,
        1000,
        1,
        100_000_000,
    )?;
    let start_lsn = match &raw.cdc.start_lsn {
        None => Lsn::ZERO,
        Some(LsnValue::Number(n)) => Lsn(*n),
        Some(LsnValue::Text(t)) => t
            .parse()
            .map_err(|e: crate::lsn::ParseLsnError| c.err("[cdc] start_lsn", e.to_string()))?,
    };
    if raw.cdc.wal_path.is_some() {
        notice("[cdc] wal_path", "not used: large transactions stream into one open target transaction instead of spilling to disk");
    }
    let schema_changes = match raw.cdc.schema_changes.as_deref() {
        None | Some("apply") => SchemaChanges::Apply,
        Some("halt") => SchemaChanges::Halt,
        Some(other) => {
            return Err(c.err(
                "[cdc] schema_changes",
                format!("'{other}' is not allowed: apply or halt"),
            ))
        }
    };
    let checkpoint_dir = PathBuf::from(
        raw.cdc
            .checkpoint_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_CHECKPOINT_DIR.into()),
    );

    // --- compression ---
    let level = c.alias(
        ("[compression] level", raw.compression.level),
        (
            "[performance] compression_level",
            raw.performance.compression_level,
        ),
    )?;
    let min_size = c.alias(
        (
            "[compression] min_size_bytes",
            raw.compression.min_size_bytes,
        ),
        (
            "[performance] compression_min_size_bytes",
            raw.performance.compression_min_size_bytes,
        ),
    )?;
    let algorithm = raw.compression.algorithm.as_deref().unwrap_or("zstd");
    let level_range = match algorithm {
        "zstd" => Some((1, 22)),
        "gzip" => Some((0, 9)),
        "lz4" | "snappy" => None,
        other => {
            return Err(c.err(
                "[compression] algorithm",
                format!("'{other}' is not supported: allowed zstd, snappy, lz4, gzip"),
            ))
        }
    };
    if let (Some(l), Some((lo, hi))) = (level, level_range) {
        if l < lo || l > hi {
            return Err(c.err(
                "[compression] level",
                format!("{l} is out of range for {algorithm}: allowed {lo} to {hi}"),
            ));
        }
    }
    let compression_set = raw.compression.algorithm.is_some()
        || level.is_some()
        || min_size.is_some()
        || raw.compression.dictionary_path.is_some();
    if mode == Mode::Local && (f.enable_compression == Some(true) || compression_set) {
        notice("[compression]", "no effect with [transport] mode = \"local\": capture and apply run in this process, so no batch crosses a network; batches are compressed when a capture node ships them to an apply node");
    }
    let compression = if f.enable_compression == Some(false) {
        crate::seal::Algorithm::None
    } else {
        crate::seal::Algorithm::from_name(algorithm).unwrap_or(crate::seal::Algorithm::Zstd)
    };
    let default_level = if algorithm == "gzip" { 6 } else { 3 };
    let min_size_bytes = c.range(
        "[compression] min_size_bytes",
        min_size,
        512,
        0,
        crate::seal::MAX_PLAIN_LEN as u64,
    )? as usize;
    if raw.compression.dictionary_path.is_some() && algorithm != "zstd" {
        return Err(c.err(
            "[compression] dictionary_path",
            format!("dictionaries are used by zstd only (algorithm is {algorithm}); remove the key or choose zstd"),
        ));
    }

    // --- encryption ---
    if let Some(a) = raw.encryption.algorithm.as_deref() {
        if a != "aes256gcm" {
            return Err(c.err(
                "[encryption] algorithm",
                format!("'{a}' is not supported: allowed aes256gcm"),
            ));
        }
    }
    let e = &raw.encryption;
    if mode == Mode::Local
        && (f.enable_encryption == Some(true)
            || e.key_file.is_some()
            || e.kms_key_arn.is_some()
            || e.key_rotation_days.is_some())
    {
        notice("[encryption]", "no effect with [transport] mode = \"local\": no batch crosses a network (protect the PostgreSQL connections with sslmode=verify-full); batches are sealed with the tenant key when a capture node ships them to an apply node");
    }
    if mode != Mode::Local {
        if f.enable_encryption == Some(false) {
            return Err(c.err(
                "[features] enable_encryption",
                format!("false is not allowed with [transport] mode = \"{}\": every batch that crosses the network is sealed with the tenant's key", mode.name()),
            ));
        }
        if e.key_file.is_none() {
            return Err(c.err(
                "[encryption] key_file",
                format!("missing: [transport] mode = \"{}\" seals every batch with the tenant's key; create one with `openssl rand -hex 32 > /etc/heliosdb/key.txt && chmod 600 /etc/heliosdb/key.txt` and set key_file (or a keys directory <dir>/<tenant>/<key_id>.key)", mode.name()),
            ));
        }
        if e.kms_key_arn.is_some() {
            notice(
                "[encryption] kms_key_arn",
                "not supported in this build: keys come from key_file",
            );
        }
        if e.key_rotation_days.is_some() {
            notice("[encryption] key_rotation_days", "not enforced: rotate by adding a newer <key_id>.key to the keys directory (batches are sealed with the greatest key id; older keys keep opening batches until renamed to .retired)");
        }
    }

    // --- conflict ---
    let strategy = match raw.conflict.resolution_strategy.as_deref() {
        None => Strategy::default(),
        Some(s) => Strategy::parse(s).ok_or_else(|| {
            c.err("[conflict] resolution_strategy", format!("'{s}' is not supported: allowed LastWriteWins, SourcePreferred, TargetPreferred, VectorClock"))
        })?,
    };
    let node_id = match raw.replication.node_id.as_deref() {
        None => host_name(),
        Some(n) if n.is_empty() || n.len() > 63 || n.chars().any(|ch| ch.is_control()) => {
            return Err(c.err(
                "[replication] node_id",
                "must be 1-63 printable characters naming this region, e.g. \"eu-west-1\"",
            ))
        }
        Some(n) => n.to_string(),
    };
    let sensitive_tables = raw
        .conflict
        .sensitive_tables
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|t| {
            if t.contains('.') {
                t
            } else {
                format!("public.{t}")
            }
        })
        .collect();
    let conflict = ConflictConfig {
        strategy,
        node_id,
        sensitive_tables,
    };
    let conflict_log = match (raw.conflict.log_conflicts, &raw.conflict.conflict_log_path) {
        (Some(true), Some(p)) if !p.is_empty() => Some(PathBuf::from(p)),
        (Some(true), _) => Some(PathBuf::from("/var/log/heliosdb/conflicts.log")),
        (_, Some(_)) => {
            notice(
                "[conflict] conflict_log_path",
                "no effect without log_conflicts = true (conflicts still go to the target's heliosdb_replication.heliosdb_conflict_log table)",
            );
            None
        }
        _ => None,
    };

    // --- monitoring ---
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
        ) {
            return Err(c.err("[monitoring] audit_events", format!("'{ev}' is not an audit event: allowed replication_start, replication_stop, failover, conflict_resolved, checkpoint_created, error")));
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

    // --- transport ---
    let tr = &raw.transport;
    let path_of = |key: &str,
                   v: &Option<String>,
                   needed: bool|
     -> Result<Option<PathBuf>, ConfigError> {
        match v {
            Some(p) if p.is_empty() => Err(c.err(key, "must not be empty")),
            Some(p) => Ok(Some(PathBuf::from(p))),
            None if needed => Err(c.err(
                key,
                format!("missing: [transport] mode = \"{}\" uses TLS 1.3 with certificates on both sides; set ca_file, cert_file and key_file (PEM)", mode.name()),
            )),
            None => Ok(None),
        }
    };
    let split = mode != Mode::Local;
    let ca_file = path_of("[transport] ca_file", &tr.ca_file, split)?;
    let cert_file = path_of("[transport] cert_file", &tr.cert_file, split)?;
    let tls_key_file = path_of("[transport] key_file", &tr.key_file, split)?;
    let apply_url = match (&tr.apply_url, mode) {
        (Some(u), _) if !u.starts_with("https://") => {
            return Err(c.err(
                "[transport] apply_url",
                format!("'{u}' must start with https:// (batches never travel in plaintext)"),
            ))
        }
        (None, Mode::Capture) => {
            return Err(c.err(
                "[transport] apply_url",
                "missing: the capture node ships batches to the apply node at this URL, e.g. apply_url = \"https://apply-eu.internal:8443\"",
            ))
        }
        (u, _) => u.clone(),
    };
    let listen_address = match (&tr.listen_address, mode) {
        (Some(a), _) => Some(a.parse::<std::net::SocketAddr>().map_err(|_| {
            c.err(
                "[transport] listen_address",
                format!("'{a}' is not an address:port, e.g. 0.0.0.0:8443"),
            )
        })?),
        (None, Mode::Apply) => {
            return Err(c.err(
                "[transport] listen_address",
                "missing: the apply node listens for capture nodes here, e.g. listen_address = \"0.0.0.0:8443\"",
            ))
        }
        (None, _) => None,
    };
    let request_timeout = c.range(
        "[transport] request_timeout_seconds",
        tr.request_timeout_seconds,
        60,
        1,
        3600,
    )?;
    if mode == Mode::Local
        && (tr.apply_url.is_some()
            || tr.listen_address.is_some()
            || tr.ca_file.is_some()
            || tr.cert_file.is_some()
            || tr.key_file.is_some())
    {
        notice(
            "[transport]",
            "no effect with mode = \"local\" (set mode = \"capture\" or \"apply\" to split the nodes)",
        );
    }

    // --- performance ---
    let p = &raw.performance;
    let buffer_events = c.range(
        "[performance] buffer_size_events",
        p.buffer_size_events,
        10_000,
        1,
        10_000_000,
    )?;
    let worker_threads = c.range("[performance] worker_threads", p.worker_threads, 4, 1, 256)?;
    let batch_timeout_ms = c.range(
        "[performance] batch_timeout_ms",
        p.batch_timeout_ms,
        100,
        1,
        60_000,
    )?;
    if let Some(t) = p.target_replication_lag_seconds {
        if !(t.is_finite() && t > 0.0) {
            return Err(c.err(
                "[performance] target_replication_lag_seconds",
                format!("{t} must be a positive number of seconds"),
            ));
        }
        notice(
            "[performance] target_replication_lag_seconds",
            "not yet supported: no lag target is enforced or reported in this build",
        );
    }
    if p.max_throughput_events_per_sec.is_some() {
        c.range(
            "[performance] max_throughput_events_per_sec",
            p.max_throughput_events_per_sec,
            1,
            1,
            u64::MAX,
        )?;
        notice(
            "[performance] max_throughput_events_per_sec",
            "not yet supported: replication is not rate-limited in this build",
        );
    }
    if p.checkpoint_async.is_some() {
        notice("[performance] checkpoint_async", "no effect: progress is committed with the data on the target; checkpoint files are written after commits");
    }

    // --- network ---
    let n = &raw.network;
    let keepalive = c.alias(
        ("[network] tcp_keepalive_seconds", n.tcp_keepalive_seconds),
        (
            "[performance] tcp_keepalive_seconds",
            p.tcp_keepalive_seconds,
        ),
    )?;
    let pool = c.alias(
        ("[network] connection_pool_size", n.connection_pool_size),
        ("[performance] connection_pool_size", p.connection_pool_size),
    )?;
    let connect_timeout = c.alias(
        (
            "[network] connect_timeout_seconds",
            n.connect_timeout_seconds,
        ),
        (
            "[performance] connect_timeout_seconds",
            p.connect_timeout_seconds,
        ),
    )?;
    let read_timeout = c.alias(
        ("[network] read_timeout_seconds", n.read_timeout_seconds),
        ("[performance] read_timeout_seconds", p.read_timeout_seconds),
    )?;
    let keepalive = c.range("[network] tcp_keepalive_seconds", keepalive, 30, 1, 7200)?;
    c.range("[network] connection_pool_size", pool, 10, 1, 1000)?;
    if pool.is_some() {
        notice("[network] connection_pool_size", "no effect: each tenant uses one target connection, so its transactions apply in commit order");
    }
    let connect_timeout = c.range(
        "[network] connect_timeout_seconds",
        connect_timeout,
        10,
        1,
        600,
    )?;
    c.range(
        "[network] read_timeout_seconds",
        read_timeout,
        60,
        1,
        86_400,
    )?;
    if read_timeout.is_some() {
        notice("[network] read_timeout_seconds", "not yet supported: the replication stream relies on PostgreSQL's wal_sender_timeout and TCP keepalives");
    }
    let retry_max_attempts = c.range(
        "[network] retry_max_attempts",
        n.retry_max_attempts,
        3,
        0,
        1000,
    )?;
    let retry_backoff_ms = c.range(
        "[network] retry_backoff_ms",
        n.retry_backoff_ms,
        1000,
        10,
        600_000,
    )?;

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
    view.insert("performance".into(), perf.into());
    let mut net = toml::Table::new();
    net.insert("tcp_keepalive_seconds".into(), (keepalive as i64).into());
    net.insert(
        "connect_timeout_seconds".into(),
        (connect_timeout as i64).into(),
    );
    net.insert(
        "retry_max_attempts".into(),
        (retry_max_attempts as i64).into(),
    );
    net.insert("retry_backoff_ms".into(), (retry_backoff_ms as i64).into());
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
        },
        batch: BatchConfig {
            batch_size: batch_size as usize,
            batch_timeout: Duration::from_millis(batch_timeout_ms),
            buffer_events: buffer_events as usize,
            checkpoint_interval,
        },
        transport: TransportConfig {
            mode,
            apply_url,
            listen_address,
            ca_file,
            cert_file,
            key_file: tls_key_file,
            request_timeout: Duration::from_secs(request_timeout),
        },
        monitoring,
        conflict,
        seal: SealConfig {
            compression,
            level: level.map(|l| l as i32).unwrap_or(default_level),
            min_size_bytes,
            dictionary_path: raw.compression.dictionary_path.as_ref().map(PathBuf::from),
            key_path: raw.encryption.key_file.as_ref().map(PathBuf::from),
        },
        network: NetworkConfig {
            connect_timeout: Duration::from_secs(connect_timeout),
            tcp_keepalive: Duration::from_secs(keepalive),
            retry_max_attempts: retry_max_attempts as u32,
            retry_backoff: Duration::from_millis(retry_backoff_ms),
        },
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
