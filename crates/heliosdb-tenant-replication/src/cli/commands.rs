//! The one-shot commands: `init`, `status`, `resync`, `check-config`,
//! `train-dictionary`, `load`, `audit-verify`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::*;

pub(super) async fn load(info: crate::config::ConnInfo, args: &LoadArgs) -> ExitCode {
    use crate::load::{LoadSpec, LoadStats};
    use std::sync::atomic::{AtomicBool, Ordering};
    let spec = LoadSpec {
        rate: args.rate,
        duration: Duration::from_secs(args.duration),
        clients: args.clients.max(1),
        tenants: args.tenants.max(1),
        txn_size: args.txn_size.max(1),
        seed: args.seed,
        transactions: args.transactions,
    };
    let network = crate::config::NetworkConfig::default();
    let connect = || {
        crate::pg::connect(
            &info,
            &network,
            crate::error::Side::Source,
            "heliosdb-tenant-replication load",
        )
    };
    if args.create_schema {
        let created = async {
            connect()
                .await?
                .batch_execute(crate::load::SCHEMA)
                .await
                .map_err(crate::error::on_source("creating the schema"))
        }
        .await;
        if let Err(e) = created {
            eprintln!("error: {e}");
            return exit_for(&e);
        }
    }
    let stats = Arc::new(LoadStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let bar = indicatif::ProgressBar::new(args.duration);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} s  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let ticker = {
        let (bar, stats) = (bar.clone(), stats.clone());
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = stats.events.load(Ordering::Relaxed);
                bar.inc(1);
                bar.set_message(format!("{n} changes, {} /s", n - last));
                last = n;
            }
        })
    };
    let started = std::time::Instant::now();
    let result = tokio::select! {
        r = crate::load::run(&spec, connect, stats.clone(), stop.clone()) => r,
        _ = tokio::signal::ctrl_c() => { stop.store(true, Ordering::Relaxed); Ok(()) }
    };
    ticker.abort();
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let n = stats.events.load(Ordering::Relaxed);
    println!(
        "load: {n} row changes in {} transactions over {secs:.1} s ({:.0}/s; {} clients, {} tenants, {} per transaction, seed {}); {} transactions failed",
        stats.transactions.load(Ordering::Relaxed),
        n as f64 / secs.max(0.001),
        spec.clients,
        spec.tenants,
        spec.txn_size,
        spec.seed,
        stats.failed.load(Ordering::Relaxed)
    );
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            exit_for(&e)
        }
    }
}

pub(super) fn audit_verify(path: &std::path::Path) -> ExitCode {
    use crate::telemetry::audit::{verify, Verified};
    match verify(path) {
        Ok(Verified::Intact { records }) => {
            println!("{}: intact ({records} records)", path.display());
            ExitCode::SUCCESS
        }
        Ok(Verified::Broken { line, reason }) => {
            println!("{}: BROKEN at line {line}: {reason}", path.display());
            ExitCode::from(EXIT_TAMPERED)
        }
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", path.display());
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

pub(super) fn check_config(config: &Config) -> ExitCode {
    let problems = node_files(config);
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("error: {}: {p}", config.file);
        }
        return ExitCode::from(EXIT_CONFIG);
    }
    println!("# {}: valid", config.file);
    if config.notices.is_empty() {
        println!("# every key is in effect");
    } else {
        println!("# keys that have no effect in this build:");
        for n in &config.notices {
            println!("#   {}: {}", n.key, n.message);
        }
    }
    println!("# effective configuration (passwords masked):\n");
    print!("{}", config.render_masked());
    ExitCode::SUCCESS
}

/// The files a capture or apply node opens when it starts (the tenant's
/// key, the dictionary, its TLS certificates and key), opened as it would
/// open them: a missing or unreadable file, or a key others may read, shows
/// here instead of at the first start.
fn node_files(config: &Config) -> Vec<String> {
    use crate::config::Mode;
    let mut problems = Vec::new();
    if config.transport.mode == Mode::Local {
        return problems;
    }
    if let Some(path) = config.seal.key_path.as_deref() {
        if let Err(e) = crate::seal::FileKeys::load(&config.tenant.tenant_id, path) {
            problems.push(e.to_string());
        }
    }
    if let Err(e) = config.seal.compression() {
        problems.push(e);
    }
    let tls = match config.transport.mode {
        Mode::Apply => crate::transport::tls::server_config(&config.transport).map(drop),
        _ => crate::transport::tls::client_config(&config.transport).map(drop),
    };
    if let Err(e) = tls {
        problems.push(e.to_string());
    }
    problems
}

pub(super) async fn resync(config: Arc<Config>, table: Option<String>) -> ExitCode {
    let t = &config.tenant;
    let result = async {
        let target = crate::pg::connect(
            t.target()?,
            &config.network,
            crate::error::Side::Target,
            "heliosdb-tenant-replication resync",
        )
        .await?;
        crate::apply::tracking::ensure_schema(&target).await?;
        crate::snapshot::request_resync(&target, &t.tenant_id, table.as_deref()).await
    }
    .await;
    match result {
        Ok(()) => {
            println!(
                "resync of {} for tenant '{}' requested: a running daemon performs it within seconds, otherwise the next start does",
                table.as_deref().unwrap_or("all tables"),
                t.tenant_id
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit_for(&e)
        }
    }
}

pub(super) async fn train_dictionary(
    config: Arc<Config>,
    out: Option<PathBuf>,
    rows_per_table: usize,
    size: usize,
) -> ExitCode {
    let Some(out) = out.or_else(|| config.seal.dictionary_path.clone()) else {
        eprintln!("error: say where to write the dictionary: --out FILE, or set [compression] dictionary_path");
        return ExitCode::from(EXIT_CONFIG);
    };
    let t = &config.tenant;
    let result = async {
        let source = crate::pg::connect(
            t.source()?,
            &config.network,
            crate::error::Side::Source,
            "heliosdb-tenant-replication train-dictionary",
        )
        .await?;
        let report = crate::provision::preflight::check_source(&source, t).await?;
        let samples = crate::transport::dictionary::samples(
            &source,
            &report.tables,
            &t.tenant_column,
            &t.tenant_id,
            rows_per_table,
        )
        .await?;
        crate::transport::dictionary::train(&samples, size, &out)
    }
    .await;
    match result {
        Ok(done) => {
            println!(
                "wrote {} ({} bytes) trained on {} samples ({} bytes) of tenant '{}'; set [compression] dictionary_path = \"{}\" on the capture and the apply node",
                out.display(),
                done.dictionary_bytes,
                done.samples,
                done.sample_bytes,
                t.tenant_id,
                out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit_for(&e)
        }
    }
}

pub(super) async fn status(config: Arc<Config>) -> ExitCode {
    match crate::provision::status::status(&config).await {
        Ok((_, lines)) => {
            for l in lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit_for(&e)
        }
    }
}

pub(super) async fn init(config: Arc<Config>, copy: bool, resync: bool) -> ExitCode {
    match crate::provision::init(&config, copy, resync).await {
        Ok(report) => {
            for line in report.lines {
                println!("{line}");
            }
            println!("tenant '{}' is provisioned; start replication with: heliosdb-tenant-replication --config {} start", config.tenant.tenant_id, config.file);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit_for(&e)
        }
    }
}
