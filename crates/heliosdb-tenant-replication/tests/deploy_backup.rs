//! The shipped backup script (`deploy/backup/heliosdb-backup.sh`, guide
//! §5.1): checkpoints and keys round-trip through a local directory; a
//! restore refuses while the node runs and before replacing a different
//! key; after a lost checkpoint directory and key, the restored ones resume
//! replication with nothing lost or doubled.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/backup/heliosdb-backup.sh")
}

fn backup_tool(args: &[&str]) -> Output {
    Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .expect("bash")
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn checkpoints(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("checkpoint dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "checkpoint"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("read"))
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_and_keys_round_trip_and_a_restored_node_loses_nothing() {
    let env = Env::new(SCHEMA).await;
    let key = key_file(&env.dir.path().join("tenant.key"));
    let text = env.config_text(&format!(
        "\n[encryption]\nkey_file = \"{}\"\n",
        key.display()
    ));
    let config = env.write_config("replication.toml", &text);
    let cfg = config.to_str().expect("utf-8");
    env.init(&config);
    let mut daemon = env.start_daemon(&config);
    let src = env.src().await;
    src.batch_execute("INSERT INTO accounts SELECT 'tenant-123', g, 'n', 'e', 1, now() FROM generate_series(1, 1100) g")
        .await
        .expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    // More than `checkpoint_interval` (1,000) events: a checkpoint is on disk.
    let dir = env.checkpoint_dir();
    wait_until(Duration::from_secs(30), "a checkpoint file", || {
        let dir = dir.clone();
        async move { !checkpoints(&dir).is_empty() }
    })
    .await;

    // Backed up while the node runs (checkpoint files are replaced
    // atomically), then the node stops.
    let backups = env.dir.path().join("backups");
    let out = backup_tool(&[
        "backup",
        "--config",
        cfg,
        "--to",
        backups.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", said(&out));
    let archives: Vec<PathBuf> = std::fs::read_dir(&backups)
        .expect("backups")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(archives.len(), 1, "{archives:?}");
    let archive = archives[0].to_str().expect("utf-8").to_string();
    let saved = checkpoints(&env.checkpoint_dir());
    assert!(!saved.is_empty(), "no checkpoint to back up");
    let key_bytes = std::fs::read(&key).expect("key");

    // A restore refuses while the node runs.
    let out = backup_tool(&["restore", "--config", cfg, "--from", &archive]);
    assert_eq!(out.status.code(), Some(3), "{}", said(&out));
    assert!(said(&out).contains("stop it first"), "{}", said(&out));
    let (status, _) = daemon.terminate();
    assert!(status.success());

    // The node's disk is lost: checkpoints and key gone; the source goes on.
    std::fs::remove_dir_all(env.checkpoint_dir()).expect("rm checkpoints");
    std::fs::remove_file(&key).expect("rm key");
    src.batch_execute("INSERT INTO accounts SELECT 'tenant-123', g, 'while down', 'e', 2, now() FROM generate_series(1101, 1150) g;
                       UPDATE accounts SET balance = 7 WHERE tenant_id = 'tenant-123' AND id <= 10;
                       DELETE FROM accounts WHERE tenant_id = 'tenant-123' AND id BETWEEN 11 AND 15")
        .await
        .expect("changes while down");

    let out = backup_tool(&["restore", "--config", cfg, "--from", &archive]);
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(std::fs::read(&key).expect("restored key"), key_bytes);
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "restored key mode {mode:o}");
    // What was backed up is what comes back (the node wrote a later
    // checkpoint at its stop; the backup's is the one restored).
    assert_eq!(checkpoints(&env.checkpoint_dir()), saved);

    // A different key at the key's place is never replaced silently.
    std::fs::write(&key, "0".repeat(64)).expect("other key");
    let out = backup_tool(&["restore", "--config", cfg, "--from", &archive]);
    assert_eq!(out.status.code(), Some(3), "{}", said(&out));
    assert!(said(&out).contains("--force"), "{}", said(&out));
    let out = backup_tool(&["restore", "--config", cfg, "--from", &archive, "--force"]);
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(std::fs::read(&key).expect("key"), key_bytes);

    // Restarted from the restored checkpoint: the changes made while it
    // was down arrive, nothing is doubled.
    let daemon = env.start_daemon(&config);
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &daemon).await;
    assert_eq!(
        tenant_count(&env.dst().await, "accounts", TENANT).await,
        1145
    );

    // Bad usage names the fix.
    let out = backup_tool(&["backup", "--config", cfg]);
    assert_eq!(out.status.code(), Some(2));
    assert!(said(&out).contains("--to"), "{}", said(&out));
}

/// Every shipped shell script (`deploy/`, `scripts/`), and CI's own,
/// passes shellcheck (Debian's `shellcheck` package).
#[test]
fn shipped_scripts_pass_shellcheck() {
    let top = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut scripts = vec![top.join(".ci/run")];
    let mut dirs = vec![top.join("deploy"), top.join("scripts")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("deploy") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "sh") {
                scripts.push(p);
            }
        }
    }
    assert!(scripts.len() >= 3, "{scripts:?}");
    let out = Command::new("shellcheck")
        .args(&scripts)
        .output()
        .expect("shellcheck not found: apt-get install shellcheck");
    assert!(out.status.success(), "shellcheck:\n{}", said(&out));
}
