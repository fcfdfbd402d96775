//! The shipped Terraform (`deploy/terraform`): `terraform fmt -check`
//! passes and `checkov` finds no failed check in it (each skip with its
//! reason inline). The AWS module needs the AWS provider, which cannot be
//! downloaded here, so `terraform validate` of it is the user's step
//! (docs/deployment.md). The generic module (`modules/node-config`) needs
//! no provider: it is initialised, validated and applied for real, and what
//! it renders is checked: the node file passes the daemon's `check-config`
//! (one tenant or many, local or split), the cloud-init document carries
//! that file and the shipped systemd unit unchanged, its shell steps pass
//! `shellcheck`, and its variables refuse bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_yaml_ng::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// `terraform ARGS` in `dir`: success, and what it printed.
fn terraform(dir: &Path, args: &[&str]) -> (bool, String) {
    let rc = dir.join(".terraformrc");
    if !rc.exists() {
        std::fs::write(&rc, "").expect("terraformrc");
    }
    let out = Command::new("terraform")
        .current_dir(dir)
        .args(args)
        .env("TF_CLI_CONFIG_FILE", &rc)
        .env("TF_IN_AUTOMATION", "1")
        .env("CHECKPOINT_DISABLE", "1")
        .output()
        .expect("terraform not found (it is on these machines)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn terraform_fmt_finds_nothing_to_change() {
    let (ok, out) = terraform(
        &std::env::temp_dir(),
        &[
            "fmt",
            "-check",
            "-recursive",
            "-diff",
            deploy().join("terraform").to_str().expect("utf-8"),
        ],
    );
    assert!(ok, "terraform fmt -check:\n{out}");
}

#[test]
fn checkov_finds_nothing_failed_in_the_terraform() {
    let out = Command::new("checkov")
        .args([
            "--skip-download",
            "--quiet",
            "--compact",
            "--framework",
            "terraform",
            "--output",
            "json",
            "-d",
        ])
        .arg(deploy().join("terraform"))
        .env("TF_CLI_CONFIG_FILE", "/dev/null")
        .output()
        .expect("checkov not found: .ci/run installs it");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "checkov's report ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let summary = &report["summary"];
    assert_eq!(summary["failed"], 0, "{report:#}");
    assert!(summary["passed"].as_u64().unwrap_or(0) > 50, "{report:#}");
    for s in report["results"]["skipped_checks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let why = s["check_result"]["suppress_comment"]
            .as_str()
            .unwrap_or_default();
        assert!(why.len() > 20, "a skip without a reason: {s:#}");
    }
}

/// A root module using `node-config` with `body` as its arguments, applied:
/// its outputs `config_toml` and `cloud_init`.
fn apply_node_config(dir: &Path, body: &str) -> Result<(String, String), String> {
    // The module reads the unit beside it (../../../systemd): the whole
    // deploy directory is linked in, as a git source would bring it.
    std::os::unix::fs::symlink(deploy(), dir.join("deploy")).expect("symlink");
    let root = dir.join("root");
    std::fs::create_dir_all(&root).expect("root");
    std::fs::write(
        root.join("main.tf"),
        format!(
            "module \"node\" {{\n  source = \"../deploy/terraform/modules/node-config\"\n{body}\n}}\n\
             output \"config_toml\" {{\n  value = module.node.config_toml\n}}\n\
             output \"cloud_init\" {{\n  value     = module.node.cloud_init\n  sensitive = true\n}}\n"
        ),
    )
    .expect("main.tf");
    for args in [
        &["init", "-input=false", "-no-color"][..],
        &["validate", "-no-color"],
        &["apply", "-auto-approve", "-input=false", "-no-color"],
    ] {
        let (ok, out) = terraform(&root, args);
        if !ok {
            return Err(format!("terraform {args:?}:\n{out}"));
        }
    }
    let output = |name: &str| {
        let (ok, out) = terraform(&root, &["output", "-raw", "-no-color", name]);
        assert!(ok, "{out}");
        out
    };
    Ok((output("config_toml"), output("cloud_init")))
}

const RELEASE: &str = r#"
  binary_url          = "https://artifacts.example.com/heliosdb-tenant-replication"
  binary_sha256       = "4f1a0c7d2a7b9e3c5d6e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
  environment_command = "cat /run/secrets/heliosdb.env"
"#;

/// `check-config` of `toml` with the connections from the environment
/// and, for a split node, its key and TLS files made under `dir`.
fn check_config(dir: &Path, toml: &str, env: &[&str]) -> String {
    let keys = dir.join("keys");
    let tls = dir.join("tls");
    std::fs::create_dir_all(&keys).expect("keys");
    std::fs::create_dir_all(&tls).expect("tls");
    std::fs::write(keys.join("tenant.key"), format!("{}\n", "cd".repeat(32))).expect("key");
    let ca = pki::ca(&tls, "ca");
    // ca.pem, node.pem, node.key: the names the module's TLS paths use.
    pki::leaf(&tls, &ca, "node", &["DNS:localhost"]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        keys.join("tenant.key"),
        std::fs::Permissions::from_mode(0o400),
    )
    .expect("chmod");
    let text = toml
        .replace("/etc/heliosdb/keys", keys.to_str().expect("utf-8"))
        .replace("/etc/heliosdb/tls", tls.to_str().expect("utf-8"))
        .replace(
            "/var/lib/heliosdb",
            dir.join("state").to_str().expect("utf-8"),
        );
    let file = dir.join("replication.toml");
    std::fs::write(&file, text).expect("write");
    let mut c = Command::new(BIN);
    c.arg("--config").arg(&file).arg("check-config").env_clear();
    for var in env {
        let host = if var.contains("SOURCE") {
            "source-db"
        } else {
            "target-db"
        };
        c.env(
            var,
            format!("postgresql://heliosdb@{host}.internal:5432/app"),
        );
    }
    let out = c.output().expect("check-config");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}\n{toml}");
    assert!(said.contains("every key is in effect"), "{said}");
    said
}

/// The cloud-init document: the files it writes, and its shell steps.
fn cloud_init(text: &str) -> (Vec<(String, String)>, Vec<String>) {
    assert!(text.starts_with("#cloud-config\n"), "{text}");
    let doc: Value = serde_yaml_ng::from_str(text).expect("cloud-init YAML");
    let files = doc["write_files"]
        .as_sequence()
        .expect("write_files")
        .iter()
        .map(|f| {
            (
                f["path"].as_str().expect("path").to_string(),
                f["content"].as_str().expect("content").to_string(),
            )
        })
        .collect();
    let scripts = doc["runcmd"]
        .as_sequence()
        .expect("runcmd")
        .iter()
        .filter_map(|c| {
            let c = c.as_sequence()?;
            (c[0].as_str() == Some("bash")).then(|| c[2].as_str().expect("script").to_string())
        })
        .collect();
    (files, scripts)
}

#[test]
fn the_generic_module_renders_a_node_the_daemon_takes_and_the_machine_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (toml, init) = apply_node_config(
        dir.path(),
        &format!(
            r#"
  tenants = [
    {{ tenant_id = "acme" }},
    {{ tenant_id = "globex", sections = {{ conflict = {{ resolution_strategy = "LastWriteWins" }} }} }},
  ]
  settings = {{
    cdc         = {{ replication_slot = "region_eu_slot", publication_name = "region_eu_pub", batch_size = 2000 }}
    performance = {{ batch_timeout_ms = 100, spool_max_mb = 2048 }}
    monitoring  = {{ enable_audit_log = true }}
  }}
{RELEASE}"#
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Integers stay integers (a map of values would make them strings).
    assert!(
        toml.contains("batch_size = 2000\n") && toml.contains("prometheus_port = 9090\n"),
        "{toml}"
    );
    let said = check_config(
        dir.path(),
        &toml,
        &[
            "REPLICATION_SOURCE_CONNECTION",
            "REPLICATION_TARGET_CONNECTION",
        ],
    );
    assert_eq!(said.matches(": valid").count(), 2, "two tenants: {said}");

    let (files, scripts) = cloud_init(&init);
    let file = |path: &str| {
        files
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, c)| c.clone())
            .unwrap_or_else(|| panic!("cloud-init writes no {path}"))
    };
    assert_eq!(file("/etc/heliosdb/replication.toml"), toml);
    let unit = std::fs::read_to_string(deploy().join("systemd/heliosdb-replication.service"))
        .expect("unit");
    assert_eq!(
        file("/etc/systemd/system/heliosdb-replication.service"),
        unit
    );
    let all = scripts.join("\n");
    assert!(
        all.contains("sha256sum -c -"),
        "the download is checked: {all}"
    );
    assert!(all.contains("cat /run/secrets/heliosdb.env"), "{all}");
    assert!(
        all.contains(" init"),
        "a local node is provisioned before it starts: {all}"
    );
    for script in &scripts {
        let out = Command::new("shellcheck")
            // SC1091: the sourced environment file exists on the machine only.
            .args(["-s", "bash", "-e", "SC1091", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin
                    .take()
                    .expect("stdin")
                    .write_all(script.as_bytes())?;
                c.wait_with_output()
            })
            .expect("shellcheck");
        assert!(
            out.status.success(),
            "{script}\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn the_generic_module_renders_a_capture_node_of_one_tenant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (toml, init) = apply_node_config(
        dir.path(),
        &format!(
            r#"
  mode      = "capture"
  apply_url = "https://apply-eu.internal:8443"
  tenants   = [{{ tenant_id = "tenant-123", sections = {{ cdc = {{ replication_slot = "tenant_123_slot", publication_name = "tenant_123_pub" }} }} }}]
{RELEASE}"#
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        toml.contains("mode = \"capture\"") && !toml.contains("[[tenants]]"),
        "{toml}"
    );
    check_config(dir.path(), &toml, &["REPLICATION_SOURCE_CONNECTION"]);
    let (_, scripts) = cloud_init(&init);
    assert!(
        !scripts.join("\n").contains(" init"),
        "a capture node is provisioned elsewhere"
    );
}

#[test]
fn the_generic_modules_variables_refuse_bad_input() {
    for (body, needle) in [
        ("tenants = []", "at least one tenant"),
        ("tenants = [{ tenant_id = \"a b\" }]", "A tenant_id is 1 to 128"),
        ("tenants = [{ tenant_id = \"a\" }, { tenant_id = \"a\" }]", "Tenant ids must differ"),
        (
            "tenants = [{ tenant_id = \"a\", sections = { monitoring = { prometheus_port = 1 } } }]",
            "the other sections are the node's",
        ),
        ("tenants = [{ tenant_id = \"a\" }]\n  mode = \"both\"", "mode must be local, capture or apply"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = apply_node_config(dir.path(), &format!("{body}\n{RELEASE}")).expect_err(body);
        assert!(e.contains(needle), "{body}: {e}");
    }
}
