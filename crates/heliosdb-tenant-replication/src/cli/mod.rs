//! Command line: `heliosdb-tenant-replication [--config FILE] <start|init|check-config>`.
//!
//! Exit codes (stable, for systemd and scripts):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success, or stopped by SIGTERM/SIGINT |
//! | 1 | internal error (a bug or corrupt input) |
//! | 2 | invalid command line or configuration |
//! | 3 | a database needs an operator's action (the message says which) |
//! | 4 | a database could not be reached (one-shot commands) |
//! | 5 | `audit-verify`: the audit log's hash chain is broken |

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

mod commands;
mod start;
mod tenants;

use commands::{audit_verify, check_config, init, load, resync, status, train_dictionary};
use start::start;

use crate::config::Config;
use crate::error::{ErrorClass, ReplicationError};

pub const EXIT_INTERNAL: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_OPERATOR: u8 = 3;
pub const EXIT_UNREACHABLE: u8 = 4;
pub const EXIT_TAMPERED: u8 = 5;

/// Replicates one tenant of a multi-tenant PostgreSQL database to another
/// PostgreSQL, continuously and exactly once.
#[derive(Debug, Parser)]
#[command(name = "heliosdb-tenant-replication", version, about, long_about = None,
    after_help = "Exit codes: 0 ok or stopped by signal; 1 internal error; 2 bad command line or config; 3 database needs an operator's action; 4 database unreachable; 5 audit log chain broken.\nLogging: RUST_LOG (e.g. info,heliosdb_tenant_replication=debug); row values are never logged unless HELIOSDB_LOG_ROW_VALUES=1.")]
pub struct Cli {
    /// Configuration file (TOML, see docs/configuration.md).
    #[arg(
        long,
        short = 'c',
        env = "HELIOSDB_CONFIG",
        default_value = "/etc/heliosdb/replication.toml",
        global = true
    )]
    pub config: PathBuf,

    /// Log line format.
    #[arg(
        long,
        value_enum,
        env = "HELIOSDB_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    /// In a file of several tenants (`[[tenants]]`), act on this one only.
    #[arg(long, env = "HELIOSDB_TENANT", global = true)]
    pub tenant: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replicate in the foreground until SIGTERM or SIGINT.
    Start {
        /// Also read the file again whenever its content changes (looked at
        /// every 5 s), as SIGHUP does: for a file no one can signal the
        /// node about, such as a Kubernetes ConfigMap mounted as a volume.
        #[arg(long)]
        watch_config: bool,
    },
    /// Provision the tenant (idempotent): publication with per-table tenant
    /// row filters and pgoutput slot on the source, progress schema on the
    /// target, a check of the target tables, and the initial copy of the
    /// tenant's existing rows (under the snapshot the new slot exports).
    Init {
        /// Do not copy existing rows now (`start` copies them when
        /// `[cdc] start_lsn = 0`).
        #[arg(long)]
        no_copy: bool,
        /// The tenant already has rows on the target: delete them and copy
        /// them again. Needed when the slot they were streamed from is gone
        /// (its changes since are lost to it); local writes on the target
        /// that were not replicated back are lost.
        #[arg(long)]
        resync: bool,
    },
    /// Copy the tenant's rows again, replacing them on the target. A running
    /// daemon does it within seconds, between transactions; otherwise the
    /// next `start` does.
    Resync {
        /// Only this table (`schema.table` or `table`).
        #[arg(long)]
        table: Option<String>,
    },
    /// Show where the tenant's replication stands: state, applied position,
    /// slot and retained WAL, pending resyncs.
    Status,
    /// Train a zstd dictionary from the tenant's rows on the source, for
    /// `[compression] dictionary_path` (both nodes load the same file). It
    /// holds fragments of tenant data: written with mode 0600.
    TrainDictionary {
        /// Where to write it (default: `[compression] dictionary_path`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Sample rows per table.
        #[arg(long, default_value_t = 20_000)]
        rows_per_table: usize,
        /// Largest dictionary size in bytes.
        #[arg(long, default_value_t = 112_640)]
        size: usize,
    },
    /// Try it without setting anything up: two throw-away PostgreSQL
    /// clusters, several tenants, one replicated through a capture node and
    /// an apply node (TLS, zstd, AES-256-GCM) under a live workload, then a
    /// consistency check. Needs PostgreSQL ≥ 15 server binaries and openssl.
    Demo {
        /// Seconds of workload.
        #[arg(long, default_value_t = 30)]
        duration: u64,
        /// Row changes per second (all tenants).
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// Tenants in the schema (tenant-1 is replicated).
        #[arg(long, default_value_t = 5)]
        tenants: usize,
        /// Leave the clusters running and print how to connect.
        #[arg(long)]
        keep: bool,
        /// Port of /metrics (default 9090, or a free one).
        #[arg(long)]
        metrics_port: Option<u16>,
        /// Port of /health (default 8080, or a free one).
        #[arg(long)]
        health_port: Option<u16>,
    },
    /// Drive a source with a reproducible mixed workload (inserts, updates,
    /// deletes of ~500-byte rows across tenants and tables).
    Load(LoadArgs),
    /// Check the hash chain of the audit log: every record must carry the
    /// hash of the one before it.
    AuditVerify {
        /// The log (default: `[monitoring] audit_log_path` of the config).
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// Check the configuration file and print the effective configuration
    /// (passwords masked) and every key that has no effect in this build.
    CheckConfig,
    /// Add a tenant to a node file of several tenants ([[tenants]]) and to
    /// the node running it: the entry is appended (the file is checked as a
    /// whole first), the node reloads (SIGHUP), provisions the tenant and
    /// copies its rows while the others stream; waits until it streams.
    AddTenant(tenants::AddTenantArgs),
}

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Source to load (default: the config's source connection).
    #[arg(long)]
    pub source: Option<String>,
    /// Row changes per second over all clients; 0 = as fast as possible.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds to run.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Concurrent clients (connections).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Tenants tenant-1 … tenant-N.
    #[arg(long, default_value_t = 10)]
    pub tenants: usize,
    /// Row changes per transaction.
    #[arg(long, default_value_t = 10)]
    pub txn_size: usize,
    /// Seed: the same seed and sizes give the same transactions.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Create the accounts/orders/events tables if missing.
    #[arg(long)]
    pub create_schema: bool,
    /// Stop each client after this many transactions (a fixed workload:
    /// with the same seed, the same rows every time).
    #[arg(long)]
    pub transactions: Option<u64>,
}

/// `HELIOSDB_LOG_ROW_VALUES=1`: let `RUST_LOG=tokio_postgres=debug` log
/// statement parameters, i.e. row values (for debugging on test data only).
pub const LOG_ROW_VALUES: &str = "HELIOSDB_LOG_ROW_VALUES";

/// Set up logging to stderr (the journal under systemd).
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // The PostgreSQL client logs every statement's parameters (tenant rows)
    // at debug: never, whatever RUST_LOG says, unless asked for by name.
    if std::env::var_os(LOG_ROW_VALUES).is_none_or(|v| v != "1") {
        filter = filter.add_directive(
            "tokio_postgres::query=info"
                .parse()
                .expect("a valid directive"),
        );
    }
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Run the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    // The demo prints its own view; its log lines are for problems only.
    let quiet = matches!(cli.command, Command::Demo { .. } | Command::Load(_));
    init_logging(cli.log_format, if quiet { "warn" } else { "info" });
    if let Command::AuditVerify { path: Some(path) } = &cli.command {
        return audit_verify(path);
    }
    if let Command::AddTenant(args) = &cli.command {
        return tenants::add_tenant(&cli.config, args);
    }
    if let Command::Demo {
        duration,
        rate,
        tenants,
        keep,
        metrics_port,
        health_port,
    } = &cli.command
    {
        let args = crate::demo::DemoArgs {
            duration: Duration::from_secs(*duration),
            rate: *rate,
            tenants: *tenants,
            keep: *keep,
            metrics_port: *metrics_port,
            health_port: *health_port,
        };
        return block_on(async move {
            match crate::demo::run(args).await {
                Ok(o) if o.consistent || o.interrupted => ExitCode::SUCCESS,
                Ok(_) => ExitCode::from(EXIT_INTERNAL),
                Err(e) => {
                    eprintln!("error: {e}");
                    exit_for(&e)
                }
            }
        });
    }
    if let Command::Load(args) = &cli.command {
        if let Some(url) = &args.source {
            return match crate::config::ConnInfo::parse(url) {
                Ok(info) => block_on(load(info, args)),
                Err(e) => {
                    eprintln!("error: --source: {}", e.0);
                    ExitCode::from(EXIT_CONFIG)
                }
            };
        }
    }
    let mut configs = match Config::load_node(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(id) = &cli.tenant {
        let listed: Vec<String> = configs.iter().map(|c| c.tenant.tenant_id.clone()).collect();
        configs.retain(|c| c.tenant.tenant_id == *id);
        if configs.is_empty() {
            eprintln!(
                "error: --tenant {id}: {} lists no such tenant (it lists: {})",
                cli.config.display(),
                listed.join(", ")
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    if let Command::CheckConfig = cli.command {
        let mut code = ExitCode::SUCCESS;
        for c in &configs {
            let one = check_config(c);
            if one != ExitCode::SUCCESS {
                code = one;
            }
        }
        return code;
    }
    // What the node shares (every tenant has the same node sections).
    let node = configs[0].clone();
    if let Command::AuditVerify { .. } = cli.command {
        return match &node.monitoring.audit_log {
            Some((path, _)) => audit_verify(path),
            None => {
                eprintln!("error: {}: the audit log is not enabled ([monitoring] enable_audit_log); give the file with --path", node.file);
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    for c in &configs {
        for n in &c.notices {
            tracing::warn!(tenant = %c.tenant.tenant_id, key = %n.key, "{}", n.message);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(node.worker_threads)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_INTERNAL);
        }
    };
    let configs: Vec<Arc<Config>> = configs.into_iter().map(Arc::new).collect();
    match cli.command {
        Command::Start { watch_config } => {
            return runtime.block_on(start(
                cli.config.clone(),
                cli.tenant.clone(),
                configs,
                watch_config,
            ))
        }
        // Replacing rows is asked for one tenant at a time.
        Command::Init { no_copy, resync } if !resync || configs.len() == 1 => {
            return each_tenant(&configs, |c| runtime.block_on(init(c, !no_copy, resync)))
        }
        Command::Status => return each_tenant(&configs, |c| runtime.block_on(status(c))),
        _ => {}
    }
    if configs.len() > 1 {
        let ids: Vec<&str> = configs
            .iter()
            .map(|c| c.tenant.tenant_id.as_str())
            .collect();
        eprintln!(
            "error: {} lists {} tenants ({}): name one with --tenant ID",
            cli.config.display(),
            ids.len(),
            ids.join(", ")
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let config = configs[0].clone();
    match cli.command {
        Command::Resync { table } => runtime.block_on(resync(config, table)),
        Command::TrainDictionary {
            out,
            rows_per_table,
            size,
        } => runtime.block_on(train_dictionary(config, out, rows_per_table, size)),
        Command::Load(args) => match config.tenant.source() {
            Ok(info) => runtime.block_on(load(info.clone(), &args)),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Init { no_copy, resync } => runtime.block_on(init(config, !no_copy, resync)),
        Command::Start { .. }
        | Command::Status
        | Command::CheckConfig
        | Command::AuditVerify { .. }
        | Command::AddTenant(_)
        | Command::Demo { .. } => ExitCode::SUCCESS,
    }
}

/// Run a one-shot command for each tenant (a header names it when there
/// are several); the exit code is the first failure's.
fn each_tenant(configs: &[Arc<Config>], mut run: impl FnMut(Arc<Config>) -> ExitCode) -> ExitCode {
    let mut first_failure = None;
    for c in configs {
        if configs.len() > 1 {
            println!("== tenant {}", c.tenant.tenant_id);
        }
        let code = run(c.clone());
        if code != ExitCode::SUCCESS {
            first_failure.get_or_insert(code);
        }
    }
    first_failure.unwrap_or(ExitCode::SUCCESS)
}

fn block_on(f: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(EXIT_INTERNAL)
        }
    }
}

fn exit_for(e: &ReplicationError) -> ExitCode {
    ExitCode::from(match e.class() {
        ErrorClass::Retry => EXIT_UNREACHABLE,
        ErrorClass::OperatorAction => EXIT_OPERATOR,
        ErrorClass::Fatal => EXIT_INTERNAL,
    })
}
