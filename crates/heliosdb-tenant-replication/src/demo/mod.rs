//! `demo`: the main job on two throw-away clusters, with nothing to set up.
//!
//! Two PostgreSQL clusters from this machine's binaries (as the `postgres`
//! OS user when run as root), a multi-tenant schema with several tenants,
//! `tenant-1` provisioned and copied, then a capture node and an apply node
//! (in this process, TLS 1.3 with certificates made for the run, zstd and
//! AES-256-GCM with a fresh tenant key) replicate a mixed workload while a
//! live line shows events, rate, lag, compression and wire bytes, and the
//! apply node serves `/metrics` and `/health`. At the end: per-table hashes
//! of the tenant's rows on both sides, other tenants' rows on the target
//! (must be none), a summary, and teardown — also on Ctrl-C.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgcluster::{pki, Cluster, ClusterOptions};
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::Config;
use crate::error::ReplicationError;
use crate::load::{self, LoadSpec, LoadStats, TABLES};
use crate::telemetry::Telemetry;

const TENANT: &str = "tenant-1";

/// `demo` options.
#[derive(Debug, Clone)]
pub struct DemoArgs {
    pub duration: Duration,
    pub rate: u64,
    pub tenants: usize,
    pub keep: bool,
    pub metrics_port: Option<u16>,
    pub health_port: Option<u16>,
}

/// How the run ended.
#[derive(Debug)]
pub struct Outcome {
    pub consistent: bool,
    pub interrupted: bool,
}

fn fail(what: &str, e: impl std::fmt::Display) -> ReplicationError {
    ReplicationError::operator(
        format!("demo: {what}: {e}"),
        "see the message above; the demo needs PostgreSQL ≥ 15 server binaries and the openssl CLI",
    )
}

/// A port: the preferred one if free, else any free one.
fn port(preferred: u16) -> u16 {
    if std::net::TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        preferred
    } else {
        pgcluster::free_port().unwrap_or(preferred)
    }
}

/// A throw-away cluster without fsync, but committing synchronously as a
/// production source does: with `synchronous_commit = off` the walsender
/// only sees WAL when the WAL writer flushes it (every `wal_writer_delay`,
/// 200 ms), and that wait would be all the lag the demo shows (PostgreSQL's
/// own replication waits the same).
async fn start_cluster() -> Result<Cluster, ReplicationError> {
    let options = ClusterOptions::default().set("synchronous_commit", "on");
    tokio::task::spawn_blocking(move || Cluster::start_with(options))
        .await
        .map_err(|e| fail("starting a cluster", e))?
        .map_err(|e| fail("starting a cluster", e))
}

/// Run the demo; the clusters stop at the end unless `keep`.
pub async fn run(args: DemoArgs) -> Result<Outcome, ReplicationError> {
    // From here on Ctrl-C (or SIGTERM) stops the demo cleanly instead of
    // leaving the clusters behind.
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| fail("signals", e))?;
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| fail("signals", e))?;
    let stop_signal = async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    };
    let bindir = pgcluster::bindir()
        .ok_or_else(|| fail("PostgreSQL", pgcluster::ClusterError::NoBinaries))?;
    eprintln!(
        "demo: starting two PostgreSQL clusters from {}",
        bindir.display()
    );
    let (mut source, mut target) = (start_cluster().await?, start_cluster().await?);
    for c in [&source, &target] {
        c.create_database("saas")
            .await
            .map_err(|e| fail("creating the database", e))?;
    }
    let (src, dst) = (connect(&source).await?, connect(&target).await?);
    for c in [&src, &dst] {
        c.batch_execute(load::SCHEMA)
            .await
            .map_err(|e| fail("creating the schema", e))?;
    }
    let tenants = load::tenant_names(args.tenants.max(2));
    for t in &tenants {
        src.execute(
            "INSERT INTO accounts SELECT $1, g * 1000000, 'Account ' || g, 'user' || g || '@example.com', g, now() FROM generate_series(1, 500) g",
            &[t],
        )
        .await
        .map_err(|e| fail("seeding rows", e))?;
    }
    eprintln!(
        "demo: schema accounts/orders/events with {} tenants; replicating {TENANT}",
        tenants.len()
    );

    let work = tempfile::Builder::new()
        .prefix("heliosdb-demo-")
        .tempdir()
        .map_err(|e| fail("a work directory", e))?;
    let dir = work.path().to_path_buf();
    let (metrics_port, health_port) = (
        args.metrics_port.unwrap_or_else(|| port(9090)),
        args.health_port.unwrap_or_else(|| port(8080)),
    );
    let configs = write_configs(&dir, &source, &target, metrics_port, health_port)?;
    crate::provision::init(&configs.local, true, false).await?;
    eprintln!("demo: {TENANT} provisioned (publication with row filters, slot, initial copy)");

    let (stop_tx, stop_rx) = watch::channel(false);
    let apply_tel = Telemetry::disabled();
    crate::telemetry::server::start(
        std::sync::Arc::new(std::sync::RwLock::new(vec![configs.apply.clone()])),
        apply_tel.clone(),
        stop_rx.clone(),
    )
    .await?;
    let apply = crate::pipeline::spawn_tenant(
        configs.apply.clone(),
        None,
        stop_rx.clone(),
        apply_tel.clone(),
    )?;
    let capture = crate::pipeline::spawn_tenant(
        configs.capture.clone(),
        None,
        stop_rx.clone(),
        Telemetry::disabled(),
    )?;
    eprintln!(
        "demo: capture node → apply node over TLS 1.3 (zstd, AES-256-GCM); metrics http://127.0.0.1:{metrics_port}/metrics, health http://127.0.0.1:{health_port}/health"
    );

    let spec = LoadSpec {
        rate: args.rate,
        duration: args.duration,
        clients: 4,
        tenants: tenants.len(),
        txn_size: 10,
        seed: 42,
        transactions: None,
    };
    let stats = Arc::new(LoadStats::default());
    let stop_load = Arc::new(AtomicBool::new(false));
    let url = source.superuser_url("saas");
    let workload = {
        let (stats, stop_load, spec) = (stats.clone(), stop_load.clone(), spec.clone());
        tokio::spawn(async move {
            let info = crate::config::ConnInfo::parse(&url).map_err(|e| fail("source URL", e.0))?;
            let network = crate::config::NetworkConfig::default();
            load::run(
                &spec,
                || {
                    crate::pg::connect(
                        &info,
                        &network,
                        crate::error::Side::Source,
                        "heliosdb demo load",
                    )
                },
                stats,
                stop_load,
            )
            .await
        })
    };

    let interrupted = live_view(
        &apply_tel,
        &stats,
        workload,
        &stop_load,
        health_port,
        stop_signal,
    )
    .await;
    let consistent = if interrupted {
        eprintln!("demo: interrupted; stopping");
        false
    } else {
        eprintln!("demo: workload done; waiting for the target to catch up");
        wait_equal(&src, &dst, Duration::from_secs(120)).await;
        report(&src, &dst, &apply_tel).await?
    };
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), capture).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), apply).await;
    drop((src, dst));
    if args.keep {
        source.keep();
        target.keep();
        let _ = work.keep();
        let as_user = if source.runs_as_postgres() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        println!("\nclusters kept running:");
        println!(
            "  source: psql -h 127.0.0.1 -p {} -U postgres saas",
            source.port()
        );
        println!(
            "  target: psql -h 127.0.0.1 -p {} -U postgres saas",
            target.port()
        );
        println!("  configs and certificates: {}", dir.display());
        println!(
            "  stop them: {as_user}{pg_ctl} -D {} stop; {as_user}{pg_ctl} -D {} stop",
            source.data_dir().display(),
            target.data_dir().display(),
            pg_ctl = bindir.join("pg_ctl").display()
        );
    } else {
        source.stop().ok();
        target.stop().ok();
    }
    Ok(Outcome {
        consistent,
        interrupted,
    })
}

async fn connect(c: &Cluster) -> Result<Client, ReplicationError> {
    c.connect("saas").await.map_err(|e| fail("connecting", e))
}

struct Configs {
    local: Config,
    capture: Arc<Config>,
    apply: Arc<Config>,
}

/// Key, certificates, and the three configurations of the run.
fn write_configs(
    dir: &Path,
    source: &Cluster,
    target: &Cluster,
    metrics_port: u16,
    health_port: u16,
) -> Result<Configs, ReplicationError> {
    use std::os::unix::fs::PermissionsExt;
    let key_path = dir.join("tenant.key");
    let mut key = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&key_path, hex).map_err(|e| fail("writing the tenant key", e))?;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fail("writing the tenant key", e))?;
    let tls = |e: String| {
        fail(
            "making TLS certificates",
            format!("{e} (the openssl CLI is needed; Debian: apt-get install openssl)"),
        )
    };
    let ca = pki::try_ca(dir, "demo-ca").map_err(tls)?;
    let node =
        pki::try_leaf(dir, &ca, "demo-node", &["DNS:localhost", "IP:127.0.0.1"]).map_err(tls)?;
    let transport_port = pgcluster::free_port().map_err(|e| fail("a free port", e))?;
    let base = |extra: &str| {
        format!(
            "[replication]\ntenant_id = \"{TENANT}\"\nsource_connection = \"{}\"\ntarget_connection = \"{}\"\n\
             [cdc]\nreplication_slot = \"tenant_1_slot\"\npublication_name = \"tenant_1_pub\"\ncheckpoint_dir = \"{}\"\n\
             [performance]\nbatch_timeout_ms = 20\nworker_threads = 2\n[network]\nretry_backoff_ms = 200\n{extra}",
            source.superuser_url("saas"),
            target.superuser_url("saas"),
            dir.join("checkpoints").display()
        )
    };
    let node_section = |mode: &str, line: &str, monitoring: &str| {
        format!(
            "[compression]\nalgorithm = \"zstd\"\nlevel = 3\n[encryption]\nkey_file = \"{}\"\n{monitoring}[transport]\nmode = \"{mode}\"\n{line}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            key_path.display(),
            ca.cert.display(),
            node.cert.display(),
            node.key.display()
        )
    };
    let parse = |text: String, name: &str| -> Result<Config, ReplicationError> {
        let path = dir.join(name);
        std::fs::write(&path, &text).map_err(|e| fail("writing a config", e))?;
        Config::from_toml(&text, &path.display().to_string(), |_| None)
            .map_err(|e| fail("a generated config", e))
    };
    let local = parse(base(""), "local.toml")?;
    let apply = parse(
        base(&node_section(
            "apply",
            &format!("listen_address = \"127.0.0.1:{transport_port}\""),
            &format!("[monitoring]\nbind_address = \"127.0.0.1\"\nprometheus_port = {metrics_port}\nhealth_check_port = {health_port}\nmetrics_interval_seconds = 1\n"),
        )),
        "apply.toml",
    )?;
    let capture = parse(
        base(&node_section(
            "capture",
            &format!("apply_url = \"https://127.0.0.1:{transport_port}\""),
            "",
        )),
        "capture.toml",
    )?;
    Ok(Configs {
        local,
        capture: Arc::new(capture),
        apply: Arc::new(apply),
    })
}

/// Refresh a status line while the workload runs; `true` if interrupted.
async fn live_view(
    tel: &Arc<Telemetry>,
    stats: &Arc<LoadStats>,
    mut workload: tokio::task::JoinHandle<Result<(), ReplicationError>>,
    stop_load: &Arc<AtomicBool>,
    health_port: u16,
    stop_signal: impl std::future::Future<Output = ()>,
) -> bool {
    tokio::pin!(stop_signal);
    use std::io::IsTerminal;
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last = (Instant::now(), 0u64);
    // Without a terminal: the first line with data, then one every 5 s.
    let mut printed: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        // Set when the workload ended: whether it was interrupted.
        let mut ended = None;
        tokio::select! {
            r = &mut workload => {
                if let Ok(Err(e)) = r {
                    eprintln!("\ndemo: the workload stopped: {e}");
                }
                ended = Some(false);
            }
            _ = &mut stop_signal => {
                stop_load.store(true, Ordering::Relaxed);
                let _ = (&mut workload).await;
                ended = Some(true);
            }
            _ = tick.tick() => {}
        }
        let Some(t) = tel.tenants().into_iter().next() else {
            match ended {
                Some(interrupted) => return interrupted,
                None => continue,
            }
        };
        let events = t.m.events_total();
        let now = Instant::now();
        let rate = (events - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(0.001);
        last = (now, events);
        let q = t.lag_quantiles(&[0.5, 0.99]);
        let ms = |v: Option<f64>| {
            v.map(|s| format!("{:.0} ms", s * 1000.0))
                .unwrap_or_else(|| "-".into())
        };
        let wire = t.m.bytes_replicated.get();
        let plain = t.m.bytes.get();
        let ratio = if wire > 0 {
            plain as f64 / wire as f64
        } else {
            0.0
        };
        let health = health_status(health_port).await;
        let line = format!(
            "{:>4}s  all tenants wrote {:>7}  {TENANT} replicated {:>7}  {:>5.0}/s  lag p50 {:>6} p99 {:>6}  compression {:>3.1}x  wire {:>9}  /health {}",
            started.elapsed().as_secs(),
            stats.events.load(Ordering::Relaxed),
            events,
            rate,
            ms(q[0]),
            ms(q[1]),
            ratio,
            human_bytes(wire),
            health
        );
        if tty {
            eprint!("\r{line}\x1b[K");
            if ended.is_some() {
                eprintln!();
            }
        } else if ended.is_some() || printed.is_none_or(|at| at.elapsed() >= Duration::from_secs(5))
        {
            eprintln!("{line}");
            printed = Some(Instant::now());
        }
        if let Some(interrupted) = ended {
            return interrupted;
        }
    }
}

async fn health_status(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"GET /health HTTP/1.0\r\n\r\n").await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        String::from_utf8_lossy(&buf)
            .split_whitespace()
            .nth(1)
            .map(str::to_string)
    };
    tokio::time::timeout(Duration::from_secs(3), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| "-".into())
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

async fn digest(c: &Client, table: &str, tenant: &str) -> (i64, String) {
    load::tenant_digest(c, table, tenant)
        .await
        .unwrap_or((-1, String::new()))
}

async fn wait_equal(src: &Client, dst: &Client, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let mut equal = true;
        for t in TABLES {
            if digest(src, t, TENANT).await != digest(dst, t, TENANT).await {
                equal = false;
                break;
            }
        }
        if equal {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The consistency check and the summary; `true` when consistent.
async fn report(
    src: &Client,
    dst: &Client,
    tel: &Arc<Telemetry>,
) -> Result<bool, ReplicationError> {
    println!("\nconsistency of {TENANT} (rows, md5 of the rows in key order):");
    let mut consistent = true;
    for t in TABLES {
        let (a, b) = (digest(src, t, TENANT).await, digest(dst, t, TENANT).await);
        let same = a == b;
        consistent &= same;
        println!(
            "  {t:<9} source {:>7} {}  target {:>7} {}  {}",
            a.0,
            &a.1.get(..12).unwrap_or(""),
            b.0,
            &b.1.get(..12).unwrap_or(""),
            if same { "equal" } else { "DIFFERENT" }
        );
    }
    let mut foreign = 0i64;
    for t in TABLES {
        foreign += dst
            .query_one(
                &format!("SELECT count(*) FROM {t} WHERE tenant_id <> $1"),
                &[&TENANT],
            )
            .await
            .map(|r| r.get::<_, i64>(0))
            .map_err(|e| fail("counting other tenants' rows", e))?;
    }
    consistent &= foreign == 0;
    println!("  rows of other tenants on the target: {foreign}");
    if let Some(t) = tel.tenants().into_iter().next() {
        let q = t.lag_quantiles(&[0.5, 0.99]);
        let (wire, plain) = (t.m.bytes_replicated.get(), t.m.bytes.get());
        println!(
            "summary: {} changes of {TENANT} replicated in {} transactions; lag p50 {:.0} ms, p99 {:.0} ms; {} of row data sent as {} ({:.1}x smaller, encrypted)",
            t.m.events_total(),
            t.m.transactions.get(),
            q[0].unwrap_or(0.0) * 1000.0,
            q[1].unwrap_or(0.0) * 1000.0,
            human_bytes(plain),
            human_bytes(wire),
            if wire > 0 { plain as f64 / wire as f64 } else { 0.0 }
        );
    }
    println!(
        "result: {}",
        if consistent {
            "consistent"
        } else {
            "NOT consistent"
        }
    );
    Ok(consistent)
}
