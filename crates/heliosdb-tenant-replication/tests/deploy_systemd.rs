//! The shipped systemd unit (`deploy/systemd/`): `systemd-analyze verify`
//! accepts it, and the daemon started exactly as its `ExecStart` says (same
//! arguments, the environment of its `Environment=` and `EnvironmentFile=`
//! only, its working directory, as an unprivileged user, its paths under a
//! temporary root) replicates with connections from the environment file
//! alone, writes nothing outside the unit's state directory, survives the
//! unit's `ExecReload`, and stops cleanly on SIGTERM within
//! `TimeoutStopSec`. No systemd runs here, so the sandboxing directives
//! themselves are not exercised; `verify` checks their syntax.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/systemd/heliosdb-replication.service")
}

/// The unit's `[Service]` settings (a key set twice keeps every value).
fn service_settings(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut in_service = false;
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if !in_service || line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').expect("key=value");
        out.entry(k.to_string()).or_default().push(v.to_string());
    }
    out
}

fn one<'a>(s: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    let v = s
        .get(key)
        .unwrap_or_else(|| panic!("the unit sets no {key}"));
    assert_eq!(v.len(), 1, "{key} set more than once");
    &v[0]
}

/// `KEY=VALUE` lines as systemd reads an environment file (comments,
/// blank lines, optional double quotes).
fn environment_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=VALUE");
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect()
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let unit = std::fs::read_to_string(unit_path()).expect("the unit");
    let dir = tempfile::tempdir().expect("tempdir");
    // `verify` checks that ExecStart's binary exists: point it at the built one.
    let path = dir.path().join("heliosdb-replication.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/heliosdb-tenant-replication", BIN),
    )
    .expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze not found: apt-get install systemd");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );
    let s = service_settings(&unit);
    // What the deployment guide's hardening asks for, and the exit codes
    // that restarting cannot fix.
    for (key, want) in [
        ("NoNewPrivileges", "true"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "true"),
        ("PrivateTmp", "true"),
        ("CapabilityBoundingSet", ""),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "2 3 5"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ] {
        assert_eq!(one(&s, key), want, "{key}");
    }
    assert!(one(&s, "User") != "root");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_as_the_unit_starts_it_reloads_and_stops_on_sigterm() {
    let unit = std::fs::read_to_string(unit_path()).expect("the unit");
    let s = service_settings(&unit);
    let env = Env::new(SCHEMA).await;

    // The unit's paths under a temporary root.
    let root = env.dir.path().join("root");
    let etc = root.join("etc/heliosdb");
    let state = root.join("var/lib/heliosdb");
    let logs = root.join("var/log/heliosdb");
    let map = |p: &str| -> String {
        if p == "/usr/local/bin/heliosdb-tenant-replication" {
            return BIN.to_string();
        }
        for (from, to) in [
            ("/etc/heliosdb", &etc),
            ("/var/lib/heliosdb", &state),
            ("/var/log/heliosdb", &logs),
        ] {
            if let Some(rest) = p.strip_prefix(from) {
                return format!("{}{rest}", to.display());
            }
        }
        p.to_string()
    };
    for d in [&etc, &state, &logs] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    // The user the daemon runs as: the clusters' own (`postgres`) when the
    // tests run as root; the unit's `heliosdb` need not exist here.
    let user = env.source.runs_as_postgres().then(|| {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(env.source.data_dir()).expect("data dir");
        (owner.uid(), owner.gid())
    });
    // The configuration is read-only for the daemon's user; the state and
    // log directories are its own (StateDirectory=, LogsDirectory=).
    for d in [
        env.dir.path(),
        root.as_path(),
        &root.join("etc"),
        &etc,
        &root.join("var"),
        &root.join("var/lib"),
        &root.join("var/log"),
    ] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    if let Some((uid, gid)) = user {
        for d in [&state, &logs] {
            std::os::unix::fs::chown(d, Some(uid), Some(gid)).expect("chown");
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        }
    }

    // No connection in the TOML file: they come from the environment file.
    let checkpoints = state.join("checkpoints");
    let toml: String = env
        .config_text("")
        .lines()
        .filter(|l| !l.starts_with("source_connection") && !l.starts_with("target_connection"))
        .map(|l| {
            if l.starts_with("checkpoint_dir") {
                format!("checkpoint_dir = \"{}\"\n", checkpoints.display())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let config_file = map("/etc/heliosdb/replication.toml");
    std::fs::write(&config_file, &toml).expect("config");
    let env_file = map(one(&s, "EnvironmentFile").trim_start_matches('-'));
    std::fs::write(
        &env_file,
        format!(
            "# written by the test\nREPLICATION_SOURCE_CONNECTION={}\nREPLICATION_TARGET_CONNECTION=\"{}\"\n",
            env.source.superuser_url("app"),
            env.target.superuser_url("app")
        ),
    )
    .expect("env file");
    for f in [&config_file, &env_file] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }

    // systemd's environment: Environment= and the file, nothing inherited.
    let mut vars: Vec<(String, String)> = vec![(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    )];
    for e in s.get("Environment").into_iter().flatten() {
        let (k, v) = e.split_once('=').expect("Environment=KEY=VALUE");
        vars.push((k.into(), v.into()));
    }
    vars.extend(environment_file(
        &std::fs::read_to_string(&env_file).expect("env file"),
    ));
    let exec: Vec<String> = one(&s, "ExecStart").split_whitespace().map(map).collect();
    let workdir = map(one(&s, "WorkingDirectory"));
    let command = |args: &[String], log: &Path| {
        let out = std::fs::File::create(log).expect("log");
        let mut c = Command::new(&args[0]);
        c.args(&args[1..])
            .env_clear()
            .envs(vars.iter().cloned())
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out);
        if let Some((uid, gid)) = user {
            c.uid(uid).gid(gid);
        }
        c
    };

    // `init` once, as the operator would with the same file and environment.
    let mut init_args = exec.clone();
    *init_args.last_mut().expect("a command") = "init".into();
    assert_eq!(exec.last().map(String::as_str), Some("start"));
    let init_log = env.dir.path().join("init.log");
    let status = command(&init_args, &init_log).status().expect("init");
    assert!(
        status.success(),
        "init: {}",
        std::fs::read_to_string(&init_log).unwrap_or_default()
    );

    let log = env.dir.path().join("daemon.log");
    let child = command(&exec, &log).spawn().expect("start");
    let mut daemon = Daemon::adopt(child, &log);
    if let Some((uid, _)) = user {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).expect("status");
        let real = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .expect("Uid");
        assert_eq!(
            real,
            uid.to_string(),
            "the daemon does not run as the unprivileged user"
        );
    }
    let (_, health_port) = monitoring_ports(Path::new(&config_file));
    wait_until(Duration::from_secs(60), "/health 200", || async {
        matches!(http_get(health_port, "/health").await, Some((200, _)))
    })
    .await;
    let src = env.src().await;
    src.batch_execute("INSERT INTO accounts SELECT 'tenant-123', g, 'n', 'e', 1, now() FROM generate_series(1, 50) g")
        .await
        .expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;

    // ExecReload, as systemd runs it.
    let reload = one(&s, "ExecReload").replace("$MAINPID", &daemon.pid().to_string());
    let args: Vec<&str> = reload.split_whitespace().collect();
    let sent = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("ExecReload");
    assert!(sent.success());
    src.batch_execute("INSERT INTO accounts SELECT 'tenant-123', g, 'after reload', 'e', 1, now() FROM generate_series(51, 60) g")
        .await
        .expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    assert!(
        daemon.exited().is_none(),
        "the reload stopped the daemon:\n{}",
        daemon.log()
    );
    assert!(!daemon.log().contains("not reloaded"), "{}", daemon.log());
    // Environment=HELIOSDB_LOG_FORMAT=json: one JSON object per line.
    daemon.assert_json_log();

    // Its pid file and checkpoints are in the state directory; it wrote
    // nothing in the configuration directory.
    let pid_file = checkpoints.join("heliosdb-tenant-replication.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).expect("pid file").trim(),
        daemon.pid().to_string()
    );
    let mut in_etc: Vec<String> = std::fs::read_dir(&etc)
        .expect("etc")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    in_etc.sort();
    assert_eq!(in_etc, ["heliosdb-replication.env", "replication.toml"]);

    // SIGTERM (KillSignal) within TimeoutStopSec, exit 0: not restarted.
    assert_eq!(one(&s, "KillSignal"), "SIGTERM");
    let limit: u64 = one(&s, "TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .expect("seconds");
    let (status, took) = daemon.terminate();
    assert!(status.success(), "exit {status:?}:\n{}", daemon.log());
    assert!(took < Duration::from_secs(limit), "stopping took {took:?}");
    assert!(!pid_file.exists(), "the pid file outlived the daemon");
    assert!(
        std::fs::read_dir(&checkpoints)
            .expect("checkpoints")
            .count()
            > 0,
        "no checkpoint written"
    );
}
