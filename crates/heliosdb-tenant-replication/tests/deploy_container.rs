//! The shipped container image (`deploy/container/Dockerfile`): no
//! container engine runs here, so what can be checked without one is:
//! `checkov` finds no failed check in it; its final stage runs as a
//! non-root user, exposes the daemon's ports and keeps state on a volume;
//! the daemon started with the image's entrypoint, command and environment
//! (the configuration found through `HELIOSDB_CONFIG`) serves `/health`,
//! the image's own HEALTHCHECK command says healthy while it runs and
//! unhealthy once it stopped, and SIGTERM (its STOPSIGNAL) ends it with
//! exit 0; the build context leaves out `target/` and `.git`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn top() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn dockerfile() -> String {
    std::fs::read_to_string(top().join("deploy/container/Dockerfile")).expect("Dockerfile")
}

/// The instructions of the final stage (continuation lines joined).
fn final_stage(text: &str) -> Vec<(String, String)> {
    let joined = text.replace("\\\n", " ");
    let mut stage = Vec::new();
    for line in joined.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (op, rest) = line.split_once(' ').unwrap_or((line, ""));
        if op == "FROM" {
            stage.clear();
        }
        stage.push((op.to_string(), rest.trim().to_string()));
    }
    stage
}

fn instruction<'a>(stage: &'a [(String, String)], op: &str) -> &'a str {
    let found: Vec<&(String, String)> = stage.iter().filter(|(o, _)| o == op).collect();
    assert_eq!(found.len(), 1, "{op} in the final stage: {found:?}");
    &found[0].1
}

/// A JSON exec-form list (`["a", "b"]`).
fn exec_form(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not an exec-form list ({e}): {s}"))
}

#[test]
fn checkov_finds_nothing_failed_in_the_dockerfile() {
    let out = Command::new("checkov")
        .args([
            "--skip-download",
            "--quiet",
            "--compact",
            "--output",
            "json",
            "-f",
        ])
        .arg(top().join("deploy/container/Dockerfile"))
        .output()
        .expect("checkov not found: pip install checkov (.ci/run installs it)");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "checkov's report ({e}):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let summary = &report["summary"];
    assert_eq!(summary["failed"], 0, "{report:#}");
    assert!(summary["passed"].as_u64().unwrap_or(0) > 10, "{report:#}");
}

#[test]
fn the_build_context_leaves_out_build_output_and_history() {
    let ignore = std::fs::read_to_string(top().join(".dockerignore")).expect(".dockerignore");
    let lines: Vec<&str> = ignore.lines().map(str::trim).collect();
    for must in ["target", ".git"] {
        assert!(lines.contains(&must), ".dockerignore lacks {must}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_as_the_image_starts_it_and_its_healthcheck_tells_the_truth() {
    let text = dockerfile();
    let stage = final_stage(&text);
    let user = instruction(&stage, "USER");
    assert!(
        !user.starts_with("0") && !user.starts_with("root"),
        "the image runs as {user}"
    );
    let exposed: Vec<&str> = instruction(&stage, "EXPOSE").split_whitespace().collect();
    for port in ["9090", "8080", "8443"] {
        assert!(exposed.contains(&port), "EXPOSE lacks {port}");
    }
    assert!(instruction(&stage, "VOLUME").contains("/var/lib/heliosdb"));
    assert_eq!(instruction(&stage, "STOPSIGNAL"), "SIGTERM");
    let entrypoint = exec_form(instruction(&stage, "ENTRYPOINT"));
    let cmd = exec_form(instruction(&stage, "CMD"));
    assert_eq!(entrypoint, ["/usr/local/bin/heliosdb-tenant-replication"]);
    // ENV KEY=VALUE pairs (one instruction, several pairs).
    let vars: Vec<(String, String)> = instruction(&stage, "ENV")
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("ENV KEY=VALUE");
            (k.to_string(), v.to_string())
        })
        .collect();
    let config_in_image = vars
        .iter()
        .find(|(k, _)| k == "HELIOSDB_CONFIG")
        .map(|(_, v)| v.clone())
        .expect("ENV HELIOSDB_CONFIG");
    assert_eq!(config_in_image, "/etc/heliosdb/replication.toml");
    let healthcheck = instruction(&stage, "HEALTHCHECK");
    let probe = exec_form(
        healthcheck
            .split_once("CMD ")
            .map(|(_, c)| c)
            .expect("HEALTHCHECK … CMD [...]"),
    );
    assert!(
        probe.iter().any(|a| a.contains("127.0.0.1/8080")),
        "{probe:?}"
    );

    // The daemon as the image starts it: its environment, the
    // configuration (mounted at HELIOSDB_CONFIG in the image) found
    // through that variable, the default monitoring ports of the image.
    let (env, config) = Env::provisioned(SCHEMA).await;
    let (_, health_port) = monitoring_ports(&config);
    let log = env.dir.path().join("daemon.log");
    let out = std::fs::File::create(&log).expect("log");
    let child = Command::new(BIN)
        .args(&cmd)
        .env_clear()
        .envs(vars.iter().map(|(k, v)| {
            let v = if k == "HELIOSDB_CONFIG" {
                config.display().to_string()
            } else {
                v.clone()
            };
            (k.clone(), v)
        }))
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .expect("start");
    let mut daemon = Daemon::adopt(child, &log);
    // The image's probe, pointed at this test's health port.
    let probe_here: Vec<String> = probe
        .iter()
        .map(|a| a.replace("127.0.0.1/8080", &format!("127.0.0.1/{health_port}")))
        .collect();
    let healthy = || {
        Command::new(&probe_here[0])
            .args(&probe_here[1..])
            .status()
            .expect("the HEALTHCHECK command")
            .success()
    };
    wait_until(
        Duration::from_secs(60),
        "the image's HEALTHCHECK passing",
        || async { healthy() },
    )
    .await;
    let src = env.src().await;
    src.batch_execute("INSERT INTO accounts SELECT 'tenant-123', g, 'n', 'e', 1, now() FROM generate_series(1, 20) g")
        .await
        .expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    // JSON log lines (ENV HELIOSDB_LOG_FORMAT=json).
    daemon.assert_json_log();
    let (status, _) = daemon.terminate();
    assert!(status.success(), "exit {status:?}:\n{}", daemon.log());
    assert!(!healthy(), "the HEALTHCHECK passes with the daemon stopped");
}
