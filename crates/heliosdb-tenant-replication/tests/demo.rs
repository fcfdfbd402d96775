//! `demo` and `load` as a newcomer runs them.

mod common;

use std::process::Command;

use common::*;

#[test]
fn demo_replicates_a_live_workload_through_sealed_batches_and_checks_consistency() {
    let (metrics, health) = (
        pgcluster::free_port().expect("port"),
        pgcluster::free_port().expect("port"),
    );
    let out = Command::new(BIN)
        .args([
            "demo",
            "--duration",
            "4",
            "--rate",
            "600",
            "--tenants",
            "3",
            "--metrics-port",
            &metrics.to_string(),
            "--health-port",
            &health.to_string(),
        ])
        .output()
        .expect("run demo");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("result: consistent"), "{stdout}\n{stderr}");
    assert_eq!(stdout.matches(" equal").count(), 3, "{stdout}");
    assert!(
        stdout.contains("rows of other tenants on the target: 0"),
        "{stdout}"
    );
    assert!(stderr.contains("TLS 1.3 (zstd, AES-256-GCM)"), "{stderr}");
    assert!(stderr.contains("/health 200"), "{stderr}");
    // Sealed: the summary reports real compression of the replicated rows.
    let ratio: f64 = stdout
        .split("x smaller")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(ratio > 1.5, "compression {ratio}: {stdout}");
    // Torn down: nothing listens any more.
    assert!(std::net::TcpStream::connect(("127.0.0.1", health)).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_is_reproducible_from_its_seed_and_mixes_inserts_updates_and_deletes() {
    let cluster = pgcluster::Cluster::start().expect("cluster");
    for db in ["a", "b", "c"] {
        cluster.create_database(db).await.expect("db");
    }
    let run_load = |db: &str, seed: &str| {
        let out = Command::new(BIN)
            .args([
                "load",
                "--source",
                &cluster.superuser_url(db),
                "--create-schema",
                "--rate",
                "0",
                "--clients",
                "2",
                "--tenants",
                "3",
                "--txn-size",
                "10",
                "--transactions",
                "60",
                "--seed",
                seed,
            ])
            .output()
            .expect("run load");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("in 120 transactions"), "{stdout}");
        stdout
    };
    run_load("a", "7");
    run_load("b", "7");
    run_load("c", "8");
    // Timestamps differ between runs; everything else is the seed's.
    let digest = |db: &'static str| {
        let cluster = &cluster;
        async move {
            let c = cluster.connect(db).await.expect("connect");
            let mut out = Vec::new();
            for (t, cols) in [
                ("accounts", "tenant_id, id, name, email, balance"),
                (
                    "orders",
                    "tenant_id, id, account_id, status, amount, payload",
                ),
                ("events", "tenant_id, id, kind, body"),
            ] {
                let row = c
                    .query_one(
                        &format!("SELECT count(*), md5(string_agg(({cols})::text, '|' ORDER BY tenant_id, id)) FROM {t}"),
                        &[],
                    )
                    .await
                    .expect("digest");
                out.push((row.get::<_, i64>(0), row.get::<_, Option<String>>(1)));
            }
            out
        }
    };
    let (a, b, c) = (digest("a").await, digest("b").await, digest("c").await);
    assert_eq!(a, b, "the same seed gave different rows");
    assert_ne!(a, c, "another seed gave the same rows");
    assert!(a.iter().all(|(n, _)| *n > 0), "{a:?}");
    // Updates and deletes happened: some rows carry updates, fewer rows than inserts.
    let db = cluster.connect("a").await.expect("connect");
    let updated: i64 = db
        .query_one("SELECT count(*) FROM events WHERE kind = 'seen'", &[])
        .await
        .expect("count")
        .get(0);
    let tenants: i64 = db
        .query_one("SELECT count(DISTINCT tenant_id) FROM orders", &[])
        .await
        .expect("count")
        .get(0);
    assert!(updated > 0, "no updates");
    assert_eq!(tenants, 3);
    // Rows of about 500 bytes on average across tables.
    let avg: f64 = db
        .query_one("SELECT avg(pg_column_size(o.*))::float8 FROM orders o", &[])
        .await
        .expect("size")
        .get(0);
    assert!(
        (300.0..900.0).contains(&avg),
        "orders rows average {avg} bytes"
    );
}

#[test]
fn ctrl_c_stops_the_demo_and_tears_the_clusters_down() {
    use std::io::{BufRead, BufReader};
    let health = pgcluster::free_port().expect("port");
    let mut child = Command::new(BIN)
        .args([
            "demo",
            "--duration",
            "120",
            "--rate",
            "300",
            "--health-port",
        ])
        .arg(health.to_string())
        .args([
            "--metrics-port",
            &pgcluster::free_port().expect("port").to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn demo");
    let stderr = child.stderr.take().expect("stderr");
    let pid = child.id();
    // Wait for replication to run, then Ctrl-C.
    let reader = std::thread::spawn(move || {
        let mut seen = String::new();
        let mut signalled = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !signalled && line.contains("/health 200") {
                let _ = Command::new("kill")
                    .args(["-INT", &pid.to_string()])
                    .status();
                signalled = true;
            }
            seen.push_str(&line);
            seen.push('\n');
        }
        (signalled, seen)
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not stop after Ctrl-C");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let (signalled, seen) = reader.join().expect("reader");
    assert!(signalled, "the demo never reported a healthy node:\n{seen}");
    assert!(status.success(), "exit {status:?}:\n{seen}");
    assert!(seen.contains("interrupted"), "{seen}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", health)).is_err());
    // The clusters of that process are gone.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("tmp")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("heliosdb-pgtest-{pid}-"))
        })
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}
