//! Shared helpers of the end-to-end tests: two real clusters, the real
//! daemon binary, and comparisons of the tenant's rows on both sides.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgcluster::Cluster;
use tokio_postgres::Client;

pub mod prometheus;

pub const BIN: &str = env!("CARGO_BIN_EXE_heliosdb-tenant-replication");
pub const TENANT: &str = "tenant-123";

/// The multi-tenant schema the tests use (created on both sides).
pub const SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE accounts(tenant_id text, id bigint, name text, email text, balance numeric,
                      updated_at timestamptz, PRIMARY KEY (tenant_id, id));
CREATE TABLE orders(tenant_id text, id bigint, account_id bigint, status text, amount numeric,
                    payload jsonb, created_at timestamptz, PRIMARY KEY (tenant_id, id));
CREATE TABLE events(tenant_id text, id bigint, kind text, body text, created_at timestamptz,
                    PRIMARY KEY (tenant_id, id));
";

pub const TABLES: [&str; 3] = ["accounts", "orders", "events"];

/// A source and a target cluster with database `app` and a schema.
pub struct Env {
    pub source: Cluster,
    pub target: Cluster,
    pub dir: tempfile::TempDir,
}

impl Env {
    pub async fn new(schema: &str) -> Env {
        let source = Cluster::start().expect("source cluster");
        let target = Cluster::start().expect("target cluster");
        for c in [&source, &target] {
            c.create_database("app").await.expect("create db");
            c.connect("app")
                .await
                .expect("connect")
                .batch_execute(schema)
                .await
                .expect("schema");
        }
        Env {
            source,
            target,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// Clusters with another schema on each side (a target partitioned
    /// differently, columns in another order, …).
    pub async fn with_schemas(source: &str, target: &str) -> Env {
        let env = Env::new("").await;
        env.src()
            .await
            .batch_execute(source)
            .await
            .expect("source schema");
        env.dst()
            .await
            .batch_execute(target)
            .await
            .expect("target schema");
        env
    }

    pub async fn src(&self) -> Client {
        self.source.connect("app").await.expect("connect source")
    }

    pub async fn dst(&self) -> Client {
        self.target.connect("app").await.expect("connect target")
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.dir.path().join("checkpoints")
    }

    /// A config for the tenant; `extra` is appended (later sections may add keys).
    pub fn config_text(&self, extra: &str) -> String {
        format!(
            r#"[replication]
tenant_id = "{TENANT}"
source_connection = "{}"
target_connection = "{}"

[cdc]
replication_slot = "tenant_123_slot"
publication_name = "tenant_123_pub"
batch_size = 1000
checkpoint_interval = 1000
checkpoint_dir = "{}"

[performance]
batch_timeout_ms = 50
worker_threads = 2

[network]
retry_backoff_ms = 200
connect_timeout_seconds = 5

[monitoring]
bind_address = "127.0.0.1"
prometheus_port = {}
health_check_port = {}
metrics_interval_seconds = 1
{extra}
"#,
            self.source.superuser_url("app"),
            self.target.superuser_url("app"),
            self.checkpoint_dir().display(),
            pgcluster::free_port().expect("port"),
            pgcluster::free_port().expect("port"),
        )
    }

    /// The top of a node file: [`Self::config_text`] without the keys a
    /// `[[tenants]]` entry sets (tenant id, target, slot, publication).
    pub fn node_file_top(&self) -> String {
        self.config_text("")
            .lines()
            .filter(|l| {
                ![
                    "tenant_id",
                    "target_connection",
                    "replication_slot",
                    "publication_name",
                ]
                .iter()
                .any(|k| l.starts_with(k))
            })
            .map(|l| format!("{l}\n"))
            .collect()
    }

    pub fn write_config(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write config");
        p
    }

    pub fn config(&self) -> PathBuf {
        self.write_config("replication.toml", &self.config_text(""))
    }

    /// Clusters with `schema`, a config, and `init` done.
    pub async fn provisioned(schema: &str) -> (Env, PathBuf) {
        let env = Env::new(schema).await;
        let config = env.config();
        env.init(&config);
        (env, config)
    }

    /// Start the daemon with `config`, logging to `daemon.log` in the test's directory.
    pub fn start_daemon(&self, config: &Path) -> Daemon {
        Daemon::start(config, &self.dir.path().join("daemon.log"))
    }

    /// `init` must succeed.
    pub fn init(&self, config: &Path) -> String {
        self.init_with(config, &[])
    }

    /// `init` with `args` must succeed; its output.
    pub fn init_with(&self, config: &Path, args: &[&str]) -> String {
        let mut all = vec!["init"];
        all.extend_from_slice(args);
        let out = run(config, &all);
        assert!(
            out.status.success(),
            "init failed: {}{}",
            out.stdout,
            out.stderr
        );
        out.stdout
    }
}

pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Run a one-shot command of the binary.
pub fn run(config: &Path, args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("run binary");
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The daemon running `start`.
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path, log: &Path) -> Daemon {
        Self::start_logging(config, log, "info,heliosdb_tenant_replication=debug")
    }

    /// Start with `RUST_LOG=rust_log`.
    pub fn start_logging(config: &Path, log: &Path, rust_log: &str) -> Daemon {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .arg("start")
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone"))
            .stderr(file)
            .spawn()
            .expect("spawn daemon");
        Daemon {
            child,
            log: log.to_path_buf(),
        }
    }

    /// A daemon started some other way (its output already going to `log`).
    pub fn adopt(child: Child, log: &Path) -> Daemon {
        Daemon {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log is one JSON object per line (`HELIOSDB_LOG_FORMAT=json`),
    /// and not empty.
    pub fn assert_json_log(&self) {
        let log = self.log();
        assert!(!log.trim().is_empty(), "the daemon logged nothing");
        for l in log.lines() {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        }
    }

    /// SIGHUP: the node reads its file again.
    pub fn reload(&self) {
        let sent = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(sent.success());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and the exit status with how long it took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let started = Instant::now();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return (st, started.elapsed());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit after SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The daemon stops by itself for an operator's action (exit code 3)
    /// and its log names each of `needles`; the log.
    pub fn assert_stops_with(&mut self, needles: &[&str]) -> String {
        assert_eq!(
            self.wait_exit(Duration::from_secs(30)),
            Some(3),
            "{}",
            self.log()
        );
        let log = self.log();
        for n in needles {
            assert!(log.contains(n), "expected {n:?} in the daemon log:\n{log}");
        }
        log
    }

    /// Wait for the daemon to exit by itself; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.exited() {
                return st.code();
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.kill9();
        }
        // A failed test shows what the daemon said last (CI keeps only
        // the output).
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().filter(|l| !l.contains(" DEBUG ")).collect();
            let tail = &lines[lines.len().saturating_sub(150)..];
            eprintln!("--- the daemon's log, last lines ---\n{}", tail.join("\n"));
        }
    }
}

/// Poll `check` until it is true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Row count and a hash of the tenant's rows of `table`, ordered by key.
/// `(t.*)`: the whole row, also in tables with a column named `t`.
pub async fn tenant_digest(c: &Client, table: &str, tenant: &str) -> (i64, String) {
    let row = c
        .query_one(
            &format!("SELECT count(*), coalesce(md5(string_agg((t.*)::text, '|' ORDER BY t.id)), '') FROM {table} t WHERE tenant_id = $1"),
            &[&tenant],
        )
        .await
        .expect("digest");
    (row.get(0), row.get(1))
}

/// The tenant's rows are equal on both sides, table by table.
pub async fn assert_tenant_equal(env: &Env, tables: &[&str]) {
    let (s, d) = (env.src().await, env.dst().await);
    for t in tables {
        let a = tenant_digest(&s, t, TENANT).await;
        let b = tenant_digest(&d, t, TENANT).await;
        assert_eq!(a, b, "table {t}: source and target differ for {TENANT}");
    }
}

/// Row count of the tenant's rows of `table` (cheap; compared before digests).
pub async fn tenant_count(c: &Client, table: &str, tenant: &str) -> i64 {
    c.query_one(
        &format!("SELECT count(*) FROM {table} WHERE tenant_id = $1"),
        &[&tenant],
    )
    .await
    .expect("count")
    .get(0)
}

/// Wait until the tenant's rows are equal on both sides.
pub async fn wait_tenant_equal(env: &Env, tables: &[&str], timeout: Duration, daemon: &Daemon) {
    let (s, d) = (env.src().await, env.dst().await);
    let deadline = Instant::now() + timeout;
    loop {
        let mut equal = true;
        for t in tables {
            if tenant_count(&s, t, TENANT).await != tenant_count(&d, t, TENANT).await {
                equal = false;
                break;
            }
        }
        if equal {
            for t in tables {
                if tenant_digest(&s, t, TENANT).await != tenant_digest(&d, t, TENANT).await {
                    equal = false;
                    break;
                }
            }
        }
        if equal {
            return;
        }
        if Instant::now() > deadline {
            for t in tables {
                eprintln!(
                    "{t}: source {:?} target {:?}",
                    tenant_digest(&s, t, TENANT).await,
                    tenant_digest(&d, t, TENANT).await
                );
            }
            panic!(
                "source and target still differ after {timeout:?}; daemon log:\n{}",
                daemon.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rows of tenants other than ours on the target (must stay 0).
pub async fn foreign_rows(c: &Client) -> i64 {
    let mut n = 0;
    for t in TABLES {
        let row = c
            .query_one(
                &format!("SELECT count(*) FROM {t} WHERE tenant_id IS DISTINCT FROM $1"),
                &[&TENANT],
            )
            .await
            .expect("count");
        n += row.get::<_, i64>(0);
    }
    n
}

#[allow(unused_imports)]
pub use pgcluster::pki;

/// A tenant key file as `openssl rand -hex 32` writes it (mode 0600).
pub fn key_file(path: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let out = Command::new("openssl")
        .args(["rand", "-hex", "32"])
        .output()
        .expect("openssl rand");
    assert!(out.status.success());
    std::fs::write(path, &out.stdout).expect("write key");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path.to_path_buf()
}

/// Random small transactions for three tenants until `stop`.
pub async fn workload(env_url: String, seed: u64, stop: Arc<AtomicBool>) -> u64 {
    let (client, conn) = tokio_postgres::connect(&env_url, tokio_postgres::NoTls)
        .await
        .expect("workload connect");
    tokio::spawn(conn);
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tenants = ["tenant-123", "tenant-123", "tenant-456", "tenant-789"];
    let mut txns = 0;
    while !stop.load(Ordering::Relaxed) {
        let tenant = tenants[rng.random_range(0..tenants.len())];
        let base: i64 = rng.random_range(0..2000);
        let n: i64 = rng.random_range(1..40);
        let sql = match rng.random_range(0..10) {
            0..=4 => format!(
                "INSERT INTO orders SELECT '{tenant}', g, g % 97, 'new', g * 1.01, jsonb_build_object('g', g), now()
                   FROM generate_series({base}, {base} + {n}) g ON CONFLICT DO NOTHING"
            ),
            5..=7 => format!(
                "UPDATE orders SET status = 'paid', amount = amount + 1, payload = payload || jsonb_build_object('u', {base})
                   WHERE tenant_id = '{tenant}' AND id BETWEEN {base} AND {base} + {n}"
            ),
            8 => format!("DELETE FROM orders WHERE tenant_id = '{tenant}' AND id BETWEEN {base} AND {base} + {n} / 4"),
            _ => format!(
                "INSERT INTO events SELECT '{tenant}', g, 'k', md5(g::text), now() FROM generate_series({base}, {base} + {n}) g
                   ON CONFLICT (tenant_id, id) DO UPDATE SET kind = 'again'"
            ),
        };
        if client
            .batch_execute(&format!("BEGIN; {sql}; COMMIT;"))
            .await
            .is_ok()
        {
            txns += 1;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..4))).await;
    }
    txns
}

/// `GET path` on 127.0.0.1:`port`: status code and body (None when nothing listens).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// The `[monitoring]` ports of a config file written by [`Env::config_text`].
pub fn monitoring_ports(config: &Path) -> (u16, u16) {
    let text = std::fs::read_to_string(config).expect("config");
    let port = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_start_matches('=').trim().parse().ok())
            .expect("port in config")
    };
    (port("prometheus_port"), port("health_check_port"))
}

/// The value of the series `name{labels}` in a Prometheus text exposition
/// (labels given as `k="v"` pairs in any order).
pub fn metric_value(exposition: &str, name: &str, labels: &[&str]) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        (n == name && labels.iter().all(|lab| rest.contains(lab)))
            .then(|| value.parse().ok())
            .flatten()
    })
}

/// Conflicts recorded on the target (`heliosdb_replication.heliosdb_conflict_log`).
pub async fn conflicts_logged(c: &Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM heliosdb_replication.heliosdb_conflict_log",
        &[],
    )
    .await
    .expect("conflict log table")
    .get(0)
}

/// Make the source stream every transaction larger than 64 kB while it
/// runs (pgoutput proto 2), instead of after its commit.
pub async fn stream_large_transactions(env: &Env) {
    let c = env.src().await;
    for q in [
        "ALTER SYSTEM SET logical_decoding_work_mem = '64kB'",
        "SELECT pg_reload_conf()",
    ] {
        c.simple_query(q).await.expect("logical_decoding_work_mem");
    }
}

/// Transactions the slot streamed before their commit (and how many bytes).
pub async fn streamed_txns(env: &Env, slot: &str) -> i64 {
    env.src()
        .await
        .query_one(
            "SELECT coalesce(max(stream_txns), 0) FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("pg_stat_replication_slots")
        .get(0)
}

/// The first part of a large source transaction with subtransactions, left
/// open on `c`: 20,000 rows of the tenant and 1,000 of another tenant, a
/// rolled-back savepoint of 5,000 rows, a released one that updates rows
/// 1-1,000, and a nested pair rolled back (updates of 1,001-2,000, deletes
/// of 2,001-3,000).
pub async fn open_large_transaction(c: &Client) {
    c.batch_execute(
        "BEGIN;
         INSERT INTO events SELECT 'tenant-123', g, 'big', repeat('x', 200), now() FROM generate_series(1, 20000) g;
         INSERT INTO events SELECT 'tenant-456', g, 'big', 'other', now() FROM generate_series(1, 1000) g;
         SAVEPOINT a;
         INSERT INTO events SELECT 'tenant-123', 100000 + g, 'gone', repeat('y', 200), now() FROM generate_series(1, 5000) g;
         ROLLBACK TO SAVEPOINT a;
         SAVEPOINT b;
         UPDATE events SET kind = 'kept' WHERE tenant_id = 'tenant-123' AND id <= 1000;
         RELEASE SAVEPOINT b;
         SAVEPOINT c;
         UPDATE events SET kind = 'undone' WHERE tenant_id = 'tenant-123' AND id BETWEEN 1001 AND 2000;
         SAVEPOINT d;
         DELETE FROM events WHERE tenant_id = 'tenant-123' AND id BETWEEN 2001 AND 3000;
         ROLLBACK TO SAVEPOINT c;",
    )
    .await
    .expect("large transaction, first part");
}

/// Open a transaction large enough to be streamed (8,000 tenant rows with
/// ids above 300000) that the caller then rolls back whole.
pub async fn open_doomed_transaction(c: &Client) {
    c.batch_execute(
        "BEGIN;
         INSERT INTO events SELECT 'tenant-123', 300000 + g, 'aborted', repeat('w', 200), now() FROM generate_series(1, 8000) g;",
    )
    .await
    .expect("the transaction to roll back");
}

/// The rest of [`open_large_transaction`] and its commit.
pub async fn finish_large_transaction(c: &Client) {
    c.batch_execute(
        "INSERT INTO events SELECT 'tenant-123', 200000 + g, 'after', repeat('z', 200), now() FROM generate_series(1, 3000) g;
         COMMIT",
    )
    .await
    .expect("large transaction, commit");
}

/// What the target must hold after the large transaction: exactly its
/// surviving changes.
pub async fn assert_large_transaction_outcome(env: &Env) {
    let dst = env.dst().await;
    let one = |sql: &'static str| {
        let dst = &dst;
        async move {
            dst.query_one(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .get::<_, i64>(0)
        }
    };
    assert_eq!(
        one("SELECT count(*) FROM events WHERE tenant_id = 'tenant-123'").await,
        23_000
    );
    assert_eq!(
        one("SELECT count(*) FROM events WHERE id BETWEEN 100001 AND 105000").await,
        0,
        "rows of a rolled-back savepoint arrived"
    );
    assert_eq!(
        one("SELECT count(*) FROM events WHERE kind = 'kept'").await,
        1_000,
        "a released savepoint's updates are missing"
    );
    assert_eq!(
        one("SELECT count(*) FROM events WHERE kind = 'undone'").await,
        0,
        "a rolled-back savepoint's updates arrived"
    );
    assert_eq!(
        one("SELECT count(*) FROM events WHERE id BETWEEN 2001 AND 3000").await,
        1_000,
        "a rolled-back savepoint's deletes arrived"
    );
    assert_eq!(
        one("SELECT count(*) FROM events WHERE tenant_id <> 'tenant-123'").await,
        0,
        "another tenant's rows arrived"
    );
}

/// Wait until the daemon's log contains `needle` (panics with the log).
pub async fn wait_for_log(daemon: &Daemon, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !daemon.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for '{needle}' in the daemon log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` source transactions of one `accounts` row each (ids from `first`),
/// each followed by one of another tenant's with 200 rows (the walsender
/// decodes and filters those, so it is the slower side, as in a real
/// multi-tenant backlog), then a wait until the last of them is more than
/// a second old by the source's clock: to a daemon that reads them
/// afterwards they are a backlog.
pub async fn make_backlog(c: &Client, first: i64, n: i64) {
    c.batch_execute(&format!(
        "DO $$ BEGIN
           FOR g IN {first}..{last} LOOP
             INSERT INTO accounts VALUES ('{TENANT}', g, 'backlog', 'b@x', g, now());
             COMMIT;
             INSERT INTO events SELECT 'tenant-456', g * 1000 + i, 'noise', repeat('n', 100), now()
               FROM generate_series(1, 200) i;
             COMMIT;
           END LOOP;
         END $$",
        last = first + n - 1
    ))
    .await
    .expect("backlog");
    wait_until(Duration::from_secs(10), "the backlog to age", || async {
        c.query_one(
            "SELECT clock_timestamp() - max(updated_at) > interval '1200 ms'
               FROM accounts WHERE tenant_id = $1 AND name = 'backlog'",
            &[&TENANT],
        )
        .await
        .expect("age")
        .get::<_, bool>(0)
    })
    .await;
}

/// PostgreSQL's own logical replication beside the daemon, as the reference:
/// database `pgref` on the target cluster with `schema`, subscribed to the
/// daemon's row-filtered publication (its own slot, initial copy included).
pub async fn pg_reference(env: &Env, schema: &str) {
    env.target
        .create_database("pgref")
        .await
        .expect("create pgref");
    let c = env.target.connect("pgref").await.expect("connect pgref");
    c.batch_execute(schema).await.expect("pgref schema");
    c.batch_execute(&format!(
        "CREATE SUBSCRIPTION pgref CONNECTION '{}' PUBLICATION tenant_123_pub WITH (slot_name = 'pgref_slot')",
        env.source.superuser_url("app")
    ))
    .await
    .expect("create subscription");
}

/// The tenant's rows of `table` as text, ordered by the whole row.
pub async fn tenant_rows(c: &Client, table: &str) -> Vec<String> {
    c.query(
        &format!("SELECT (t.*)::text FROM {table} t WHERE tenant_id = $1 ORDER BY (t.*)::text"),
        &[&TENANT],
    )
    .await
    .unwrap_or_else(|e| panic!("rows of {table}: {e}"))
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The tenant's rows of `table`: the source's columns (by name, so a
/// target with another column order or columns of its own compares too),
/// as text, ordered.
pub async fn source_columns_rows(source: &Client, c: &Client, table: &str) -> Vec<String> {
    source_columns_rows_of(source, c, table, TENANT).await
}

/// [`source_columns_rows`] of another tenant.
pub async fn source_columns_rows_of(
    source: &Client,
    c: &Client,
    table: &str,
    tenant: &str,
) -> Vec<String> {
    let cols: Vec<String> = source
        .query(
            "SELECT quote_ident(attname) FROM pg_attribute
              WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&table],
        )
        .await
        .unwrap_or_else(|e| panic!("columns of {table}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect();
    c.query(
        &format!(
            "SELECT ROW({})::text FROM {table} t WHERE tenant_id = $1 ORDER BY 1",
            cols.iter()
                .map(|c| format!("t.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        &[&tenant],
    )
    .await
    .unwrap_or_else(|e| panic!("rows of {table}: {e}"))
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Wait until the daemon's target and PostgreSQL's subscriber (see
/// [`pg_reference`]) both hold exactly the source's tenant rows of `tables`.
pub async fn wait_equal_to_reference(env: &Env, tables: &[&str], daemon: &Daemon) {
    let (s, d) = (env.src().await, env.dst().await);
    let r = env.target.connect("pgref").await.expect("connect pgref");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut differ = None;
        for t in tables {
            let (a, b, c) = (
                source_columns_rows(&s, &s, t).await,
                source_columns_rows(&s, &d, t).await,
                source_columns_rows(&s, &r, t).await,
            );
            if a != b || a != c {
                differ = Some((t, a, b, c));
                break;
            }
        }
        let Some((t, a, b, c)) = differ else { return };
        assert!(
            Instant::now() < deadline,
            "table {t}: source {a:?}\n daemon {b:?}\n PostgreSQL {c:?}\ndaemon log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A one-shot command must exit with `code` and say each of `needles`; its
/// output.
pub fn assert_fails(config: &Path, args: &[&str], code: i32, needles: &[&str]) -> String {
    let out = run(config, args);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {all}");
    for n in needles {
        assert!(all.contains(n), "{args:?}: expected {n:?} in:\n{all}");
    }
    all
}

/// Rows of `table` that are not the tenant's.
pub async fn foreign_rows_of(c: &Client, table: &str) -> i64 {
    c.query_one(
        &format!("SELECT count(*) FROM {table} WHERE tenant_id <> $1"),
        &[&TENANT],
    )
    .await
    .expect("count")
    .get(0)
}

/// Another tenant writes 20,000 rows (nothing of ours); the source's WAL
/// position after them.
pub async fn other_tenant_writes(src: &Client) -> String {
    src.batch_execute("INSERT INTO events SELECT 'tenant-456', g, 'k', 'b', now() FROM generate_series(1, 20000) g")
        .await
        .expect("other tenant writes");
    src.query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0)
}

/// Wait until the tenant's slot is confirmed at `lsn` or beyond.
pub async fn wait_slot_confirmed(src: &Client, lsn: &str) {
    wait_until(Duration::from_secs(30), "the slot's confirmed_flush_lsn to pass the other tenant's writes", || async {
        src.query_one(
            "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'tenant_123_slot'",
            &[&lsn],
        )
        .await
        .expect("slot")
        .get::<_, bool>(0)
    })
    .await;
}
