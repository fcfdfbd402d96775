//! `add-tenant`: a tenant appended to a node file, and the running node
//! told to take it (SIGHUP), watched until it streams.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::{EXIT_CONFIG, EXIT_OPERATOR, EXIT_UNREACHABLE};
use crate::config::Config;

/// The file `start` keeps its process id in, in the first tenant's
/// `checkpoint_dir` (`add-tenant` finds the node there).
pub(super) const PID_FILE: &str = "heliosdb-tenant-replication.pid";

/// Where `start` writes its pid for a node of `configs`.
pub(super) fn pid_file(configs: &[std::sync::Arc<Config>]) -> Option<PathBuf> {
    Some(configs.first()?.tenant.checkpoint_dir.join(PID_FILE))
}

/// What `add-tenant` was asked.
#[derive(Debug, clap::Args)]
pub struct AddTenantArgs {
    /// The tenant's id: its value in the tenant column.
    pub tenant_id: String,
    /// The tenant's target connection (a URL), when it is not the file's.
    /// It is visible to other users of this host while the command runs:
    /// prefer --target-connection-env.
    #[arg(long, conflicts_with = "target_connection_env")]
    pub target_connection: Option<String>,
    /// The environment variable holding the tenant's target connection.
    #[arg(long)]
    pub target_connection_env: Option<String>,
    /// Seconds to wait for the running node to report the tenant streaming
    /// (0: do not wait).
    #[arg(long, default_value_t = 300)]
    pub wait: u64,
}

/// Append the tenant to `file` (checked as a whole first; nothing is
/// written when the result is not valid), then reload the running node and
/// wait until the tenant streams.
pub(super) fn add_tenant(file: &Path, args: &AddTenantArgs) -> ExitCode {
    let fail = |message: String| {
        eprintln!("error: {message}");
        ExitCode::from(EXIT_CONFIG)
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => return fail(format!("{}: {e}", file.display())),
    };
    let before = match Config::load_node(file) {
        Ok(c) => c,
        Err(e) => return fail(format!("invalid configuration: {e}")),
    };
    if !text.contains("[[tenants]]") {
        return fail(format!(
            "{} describes one tenant; add-tenant adds an entry to a node file of several tenants ([[tenants]] entries, see docs/configuration.md)",
            file.display()
        ));
    }
    let id = args.tenant_id.trim();
    if id.is_empty() || id.chars().any(char::is_control) {
        return fail("the tenant id is empty or holds control characters".into());
    }
    if before.iter().any(|c| c.tenant.tenant_id == id) {
        return fail(format!("tenant '{id}' is in {} already", file.display()));
    }
    let target = match (&args.target_connection, &args.target_connection_env) {
        (Some(url), _) => Some(url.clone()),
        (None, Some(var)) => match std::env::var(var) {
            Ok(url) => Some(url),
            Err(_) => {
                return fail(format!(
                    "--target-connection-env {var}: the variable is not set"
                ))
            }
        },
        (None, None) => None,
    };
    let mut entry = format!(
        "\n[[tenants]]\n[tenants.replication]\ntenant_id = {}\n",
        toml::Value::String(id.to_string())
    );
    if let Some(url) = &target {
        entry.push_str(&format!(
            "target_connection = {}\n",
            toml::Value::String(url.clone())
        ));
    }
    let mut new_text = text.clone();
    if !new_text.ends_with('\n') {
        new_text.push('\n');
    }
    new_text.push_str(&entry);
    // Checked as a whole, from a file beside it (same permissions), then
    // moved over it.
    let tmp = file.with_extension("add-tenant.tmp");
    let written = crate::files::fresh(&tmp).and_then(|mut f| {
        f.write_all(new_text.as_bytes())?;
        f.sync_all()?;
        let mode = std::fs::metadata(file)?.permissions();
        std::fs::set_permissions(&tmp, mode)
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return fail(format!("{}: {e}", tmp.display()));
    }
    let after = match Config::node_from_toml(&new_text, &file.display().to_string(), |k| {
        std::env::var(k).ok()
    }) {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return fail(format!(
                "{} with tenant '{id}' added would not be valid, nothing was changed: {e}",
                file.display()
            ));
        }
    };
    if let Err(e) = std::fs::rename(&tmp, file) {
        let _ = std::fs::remove_file(&tmp);
        return fail(format!("{}: {e}", file.display()));
    }
    println!("tenant '{id}' added to {}", file.display());
    let Some(added) = after.into_iter().find(|c| c.tenant.tenant_id == id) else {
        return ExitCode::SUCCESS;
    };
    let configs: Vec<std::sync::Arc<Config>> = before.into_iter().map(Into::into).collect();
    let Some(pid) = pid_file(&configs).and_then(|p| running_node(&p)) else {
        println!(
            "no running node found (no live process in {}): the tenant starts with the node",
            pid_file(&configs).map_or_else(String::new, |p| p.display().to_string())
        );
        return ExitCode::SUCCESS;
    };
    if let Err(e) = rustix::process::kill_process(pid, rustix::process::Signal::HUP) {
        eprintln!("error: telling node {} to reload (SIGHUP): {e}; send it yourself (kill -HUP, systemctl reload)", pid.as_raw_nonzero());
        return ExitCode::from(EXIT_OPERATOR);
    }
    println!(
        "node {} reloads: it provisions '{id}' (publication, slot, copy of its rows) while the others stream",
        pid.as_raw_nonzero()
    );
    if args.wait == 0 || !added.monitoring.enabled {
        return ExitCode::SUCCESS;
    }
    wait_streaming(&added, id, Duration::from_secs(args.wait))
}

/// The pid in `path`, if that process is this program.
fn running_node(path: &Path) -> Option<rustix::process::Pid> {
    let text = std::fs::read_to_string(path).ok()?;
    let raw: i32 = text.trim().parse().ok()?;
    let pid = rustix::process::Pid::from_raw(raw)?;
    let cmdline = std::fs::read(format!("/proc/{raw}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains("heliosdb-tenant-replication")
        .then_some(pid)
}

/// Watch the node's `/health` until `tenant` streams; a spinner names its
/// state meanwhile.
fn wait_streaming(config: &Config, tenant: &str, wait: Duration) -> ExitCode {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    let port = config.monitoring.health_check_port;
    let deadline = Instant::now() + wait;
    let mut last = String::from("not listed yet");
    loop {
        let state = health_state(port, tenant);
        if let Some(s) = &state {
            last = s.clone();
        }
        bar.set_message(format!("tenant '{tenant}': {last}"));
        match state.as_deref() {
            Some("running") => {
                bar.finish_with_message(format!("tenant '{tenant}': streaming"));
                return ExitCode::SUCCESS;
            }
            Some("stopped") => {
                bar.finish_with_message(format!("tenant '{tenant}': stopped"));
                eprintln!("error: the node stopped tenant '{tenant}': its log says why (journalctl -u heliosdb-tenant-replication); fix it and send SIGHUP again");
                return ExitCode::from(EXIT_OPERATOR);
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            bar.finish_with_message(format!("tenant '{tenant}': {last}"));
            eprintln!("error: tenant '{tenant}' was not streaming after {} s (state: {last}); the node goes on trying: see its log and /health", wait.as_secs());
            return ExitCode::from(EXIT_UNREACHABLE);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `tenant`'s state in the node's `/health` on this host.
fn health_state(port: u16, tenant: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], port).into(),
        Duration::from_secs(2),
    )
    .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let body = answer.split_once("\r\n\r\n")?.1;
    let doc: serde_json::Value = serde_json::from_str(body).ok()?;
    doc["tenants"]
        .as_array()?
        .iter()
        .find(|t| t["tenant_id"] == tenant)
        .and_then(|t| t["state"].as_str().map(str::to_string))
}
