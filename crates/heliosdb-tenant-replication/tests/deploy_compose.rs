//! The shipped Compose stack (`deploy/compose/`): no container engine runs
//! here, so `docker-compose config` validates the file (every profile),
//! refuses to render without the passwords of `.env`, and what it renders is
//! checked (ports on 127.0.0.1 only, the source's `wal_level`, the daemon's
//! services read-only without capabilities, start order, every mounted file
//! present). The parts the containers would run are then run for real: the
//! stack's init SQL on two PostgreSQL clusters, its node file (`init`,
//! `start`, with the connections from the environment as the stack passes
//! them) replicating its three tenants while the daemon's `load` writes,
//! its Prometheus configuration through `promtool`, and the split profile
//! (its init, apply and capture files with the secrets `make-certs.sh`
//! writes) replicating its tenant over mutual TLS.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use pgcluster::Cluster;

fn stack() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/compose")
}

const PASSWORDS: &str =
    "SOURCE_DB_PASSWORD=s0urce5ecret\nTARGET_DB_PASSWORD=targ3tSecret\nGRAFANA_ADMIN_PASSWORD=gr4fana\n";

/// `docker-compose --env-file ENV ARGS config`: status, stdout, stderr.
fn compose_config(env: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("docker-compose")
        .current_dir(stack())
        .arg("--env-file")
        .arg(env)
        .args(args)
        .arg("config")
        .output()
        .expect(
            "docker-compose not found: .ci/run installs it (PyPI docker-compose 1.29, --no-deps)",
        );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn rendered(args: &[&str]) -> serde_yaml_ng::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = dir.path().join(".env");
    std::fs::write(&env, PASSWORDS).expect("env");
    let (ok, out, err) = compose_config(&env, args);
    assert!(ok, "docker-compose config {args:?}: {err}");
    serde_yaml_ng::from_str(&out).expect("YAML")
}

fn strs(v: &serde_yaml_ng::Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .map(|x| x.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_refuses_to_render_without_the_passwords_of_its_env_file() {
    // The example as shipped has empty passwords: nothing defaults.
    let (ok, _, err) = compose_config(&stack().join(".env.example"), &[]);
    assert!(!ok, "rendered with the example's empty passwords");
    assert!(err.contains("SOURCE_DB_PASSWORD in .env"), "{err}");
    // And the file itself holds no password.
    let file = std::fs::read_to_string(stack().join("docker-compose.yml")).expect("file");
    for line in file.lines().filter(|l| l.contains("PASSWORD:")) {
        assert!(line.contains("${"), "a literal password: {line}");
    }
}

#[test]
fn compose_config_validates_every_profile_and_what_it_renders() {
    let all = rendered(&["--profile", "split", "--profile", "load"]);
    let services = all["services"].as_mapping().expect("services");
    let names: Vec<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for want in [
        "source-db",
        "target-db",
        "replication-init",
        "replication",
        "load",
        "split-init",
        "capture",
        "apply",
        "prometheus",
        "grafana",
    ] {
        assert!(names.contains(&want), "no service {want}: {names:?}");
    }
    for (name, s) in services {
        let name = name.as_str().expect("name");
        for port in strs(&s["ports"]) {
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port} beyond this host"
            );
        }
        for volume in strs(&s["volumes"]) {
            let host = volume.split(':').next().unwrap_or_default();
            if host.starts_with('/') && !host.ends_with("/secrets") {
                assert!(
                    Path::new(host).exists(),
                    "{name} mounts {host}, which is not shipped"
                );
            }
        }
        if s["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("heliosdb-tenant-replication:"))
        {
            assert_eq!(
                s["read_only"].as_bool(),
                Some(true),
                "{name}: read-only root"
            );
            assert_eq!(strs(&s["cap_drop"]), ["ALL"], "{name}: capabilities");
            assert_eq!(
                s["build"]["dockerfile"].as_str(),
                Some("deploy/container/Dockerfile")
            );
        }
    }
    assert!(strs(&services["source-db"]["command"]).contains(&"wal_level=logical".to_string()));
    // Started in order: databases healthy, then init, which must succeed.
    assert_eq!(
        services["replication-init"]["depends_on"]["source-db"]["condition"].as_str(),
        Some("service_healthy")
    );
    assert_eq!(
        services["replication"]["depends_on"]["replication-init"]["condition"].as_str(),
        Some("service_completed_successfully")
    );
    let env = &services["replication"]["environment"];
    assert_eq!(
        env["REPLICATION_SOURCE_CONNECTION"].as_str(),
        Some("postgresql://heliosdb:s0urce5ecret@source-db:5432/source")
    );
    // Prometheus loads the shipped rules; Grafana the shipped dashboards.
    assert!(strs(&services["prometheus"]["volumes"])
        .iter()
        .any(|v| v.contains("deploy/prometheus/rules:/etc/prometheus/rules")));
    assert!(strs(&services["grafana"]["volumes"])
        .iter()
        .any(|v| v.contains("deploy/grafana/dashboards:/etc/grafana/dashboards")));

    // `up` without a profile starts the one-process stack only.
    for (name, profile) in [
        ("load", "load"),
        ("split-init", "split"),
        ("capture", "split"),
        ("apply", "split"),
    ] {
        assert_eq!(strs(&services[name]["profiles"]), [profile], "{name}");
    }
    for name in [
        "source-db",
        "target-db",
        "replication-init",
        "replication",
        "prometheus",
        "grafana",
    ] {
        assert!(
            services[name]["profiles"].is_null(),
            "{name} is in a profile"
        );
    }
    rendered(&[]);
}

#[test]
fn the_stacks_prometheus_configuration_passes_promtool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = stack().join("../prometheus/rules");
    let text = std::fs::read_to_string(stack().join("prometheus.yml"))
        .expect("prometheus.yml")
        .replace("/etc/prometheus/rules", rules.to_str().expect("utf-8"));
    let file = dir.path().join("prometheus.yml");
    std::fs::write(&file, text).expect("write");
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(&file)
        .output()
        .expect("promtool (Debian's prometheus package)");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("SUCCESS") && said.contains("rules found"),
        "{said}"
    );
}

/// The stack's node file with its container paths mapped under `dir` and
/// its ports on free loopback ports.
fn node_file(dir: &Path, name: &str) -> (PathBuf, u16) {
    let health = pgcluster::free_port().expect("port");
    let text = std::fs::read_to_string(stack().join(name))
        .expect("node file")
        .replace(
            "/var/lib/heliosdb",
            dir.join("state").to_str().expect("utf-8"),
        )
        .replace(
            "/etc/heliosdb/secrets",
            dir.join("secrets").to_str().expect("utf-8"),
        )
        .replace("\"0.0.0.0\"", "\"127.0.0.1\"")
        .replace(
            "prometheus_port = 9090",
            &format!(
                "prometheus_port = {}",
                pgcluster::free_port().expect("port")
            ),
        )
        .replace(
            "health_check_port = 8080",
            &format!("health_check_port = {health}"),
        );
    let path = dir.join(name.replace('/', "-"));
    std::fs::write(&path, text).expect("write");
    (path, health)
}

/// The `load` service's command, shorter.
fn compose_load_args() -> Vec<String> {
    let file = std::fs::read_to_string(stack().join("docker-compose.yml")).expect("file");
    let line = file
        .lines()
        .find(|l| l.contains("command: [\"load\""))
        .expect("the load service's command");
    let list = &line[line.find('[').expect("[")..];
    let mut args: Vec<String> = serde_json::from_str(list).expect("a JSON list");
    let duration = args
        .iter()
        .position(|a| a == "--duration")
        .expect("--duration");
    args[duration + 1] = "4".into();
    let rate = args.iter().position(|a| a == "--rate").expect("--rate");
    args[rate + 1] = "400".into();
    args
}

/// The binary as the stack's containers run it: connections only from the
/// environment, as `docker-compose.yml` builds them.
fn contained(config: &Path, source: &Cluster, target: &Cluster) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--config")
        .arg(config)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env(
            "REPLICATION_SOURCE_CONNECTION",
            source.superuser_url("source"),
        )
        .env(
            "REPLICATION_TARGET_CONNECTION",
            target.superuser_url("target"),
        );
    c
}

/// `init` as the stack's `replication-init` service runs it; must succeed.
fn init_contained(config: &Path, source: &Cluster, target: &Cluster) {
    let out = contained(config, source, target)
        .arg("init")
        .output()
        .expect("init");
    assert!(
        out.status.success(),
        "init: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `start` as the stack's node services run it, logging to `log`.
fn start_contained(config: &Path, source: &Cluster, target: &Cluster, log: &Path) -> Daemon {
    let out = std::fs::File::create(log).expect("log");
    let child = contained(config, source, target)
        .arg("start")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone"))
        .stderr(out)
        .spawn()
        .expect("start");
    Daemon::adopt(child, log)
}

/// The stack's two databases on real clusters, as the postgres image's
/// entrypoint makes them: `init/schema.sql` on both, `init/seed.sql` on the
/// source.
async fn stack_databases() -> (Cluster, Cluster) {
    let source = Cluster::start().expect("source");
    let target = Cluster::start().expect("target");
    for (cluster, db, files) in [
        (&source, "source", &["init/schema.sql", "init/seed.sql"][..]),
        (&target, "target", &["init/schema.sql"]),
    ] {
        cluster.create_database(db).await.expect("db");
        let c = cluster.connect(db).await.expect("connect");
        for file in files {
            let text = std::fs::read_to_string(stack().join(file)).expect("sql");
            c.batch_execute(&text).await.expect(file);
        }
    }
    (source, target)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stacks_sql_and_node_file_replicate_three_tenants_from_one_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (source, target) = stack_databases().await;
    let (config, health) = node_file(dir.path(), "replication.toml");

    init_contained(&config, &source, &target);
    let mut node = start_contained(&config, &source, &target, &dir.path().join("node.log"));
    wait_until(Duration::from_secs(60), "/health 200", || async {
        http_get(health, "/health")
            .await
            .is_some_and(|(s, _)| s == 200)
    })
    .await;

    // The stack's `load` service: five tenants written, three replicated.
    let load = contained(&config, &source, &target)
        .args(compose_load_args())
        .output()
        .expect("load");
    assert!(
        load.status.success(),
        "load: {}{}",
        String::from_utf8_lossy(&load.stdout),
        String::from_utf8_lossy(&load.stderr)
    );
    let (src, dst) = (
        source.connect("source").await.expect("source"),
        target.connect("target").await.expect("target"),
    );
    for tenant in ["tenant-1", "tenant-2", "tenant-3"] {
        for table in ["accounts", "orders", "events"] {
            let want = tenant_digest(&src, table, tenant).await;
            wait_until(
                Duration::from_secs(60),
                "tenant equal on the target",
                || async { tenant_digest(&dst, table, tenant).await == want },
            )
            .await;
        }
    }
    for tenant in ["tenant-4", "tenant-5"] {
        assert!(tenant_count(&src, "orders", tenant).await > 0);
        assert_eq!(
            tenant_count(&dst, "orders", tenant).await,
            0,
            "{tenant} leaked"
        );
    }
    let walsenders: i64 = src
        .query_one("SELECT count(*) FROM pg_stat_replication", &[])
        .await
        .expect("walsenders")
        .get(0);
    assert_eq!(walsenders, 1, "one walsender for the three tenants");
    let (status, _) = node.terminate();
    assert!(status.success(), "{}", node.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_split_profile_replicates_with_the_secrets_make_certs_writes() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: make-certs.sh chowns the keys to the containers' uid (root only; CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets");
    let me = rustix::process::geteuid().as_raw().to_string();
    let made = Command::new("bash")
        .arg(stack().join("make-certs.sh"))
        .arg(&secrets)
        .arg(&me)
        .output()
        .expect("make-certs.sh");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    // Run again: refuses to overwrite.
    let again = Command::new("bash")
        .arg(stack().join("make-certs.sh"))
        .arg(&secrets)
        .output()
        .expect("make-certs.sh");
    assert_eq!(again.status.code(), Some(3));
    for (name, var) in [
        ("split/capture.toml", "REPLICATION_SOURCE_CONNECTION"),
        ("split/apply.toml", "REPLICATION_TARGET_CONNECTION"),
    ] {
        let (config, _) = node_file(dir.path(), name);
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .arg("check-config")
            .env_clear()
            .env(var, "postgresql://heliosdb:pw@db.internal:5432/db")
            .output()
            .expect("check-config");
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {said}");
        assert!(!said.contains(":pw@"), "{name}: password printed: {said}");
    }
    // The profile run for real: `split-init`, then the apply node and the
    // capture node with the made certificates and key (the apply node's
    // name is `localhost` here instead of `apply`).
    let (source, target) = stack_databases().await;
    let (init, _) = node_file(dir.path(), "split/init.toml");
    init_contained(&init, &source, &target);
    let transport = pgcluster::free_port().expect("port");
    let (apply, apply_health) = node_file(dir.path(), "split/apply.toml");
    let text = std::fs::read_to_string(&apply)
        .expect("apply")
        .replace("0.0.0.0:8443", &format!("127.0.0.1:{transport}"))
        .replace("/state", "/apply-state");
    std::fs::write(&apply, text).expect("apply");
    let (capture, capture_health) = node_file(dir.path(), "split/capture.toml");
    let text = std::fs::read_to_string(&capture).expect("capture").replace(
        "https://apply:8443",
        &format!("https://localhost:{transport}"),
    );
    std::fs::write(&capture, text).expect("capture");
    let mut nodes = Vec::new();
    for (name, config) in [("apply", &apply), ("capture", &capture)] {
        let log = dir.path().join(format!("{name}.log"));
        nodes.push(start_contained(config, &source, &target, &log));
    }
    for port in [apply_health, capture_health] {
        wait_until(Duration::from_secs(60), "/health 200", || async {
            http_get(port, "/health")
                .await
                .is_some_and(|(s, _)| s == 200)
        })
        .await;
    }
    let src = source.connect("source").await.expect("source");
    src.batch_execute(
        "INSERT INTO events SELECT 'tenant-4', g, 'split', md5(g::text), now() FROM generate_series(1, 300) g;
         UPDATE orders SET status = 'paid' WHERE tenant_id = 'tenant-4' AND id <= 50;
         DELETE FROM accounts WHERE tenant_id = 'tenant-4' AND id > 90",
    )
    .await
    .expect("changes");
    let dst = target.connect("target").await.expect("target");
    for table in ["accounts", "orders", "events"] {
        let want = tenant_digest(&src, table, "tenant-4").await;
        wait_until(
            Duration::from_secs(60),
            "tenant-4 equal on the target",
            || async { tenant_digest(&dst, table, "tenant-4").await == want },
        )
        .await;
    }
    assert_eq!(tenant_count(&dst, "orders", "tenant-1").await, 0);
    for mut node in nodes.into_iter().rev() {
        let (status, _) = node.terminate();
        assert!(status.success(), "{}", node.log());
    }

    // check-config opens what the node will open: a key others may read is
    // refused before any start, naming the file.
    use std::os::unix::fs::PermissionsExt;
    let key = secrets.join("capture.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (config, _) = node_file(dir.path(), "split/capture.toml");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("check-config")
        .env(
            "REPLICATION_SOURCE_CONNECTION",
            "postgresql://heliosdb:pw@db.internal:5432/db",
        )
        .output()
        .expect("check-config");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("capture.key") && said.contains("mode 644"),
        "{said}"
    );
}
