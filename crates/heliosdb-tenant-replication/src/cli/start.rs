//! `start`: every tenant's pipeline, the monitoring endpoints, signals.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::pipeline::hub::HubHandle;

/// Run every tenant's pipeline, each on a thread of its own, until
/// SIGTERM/SIGINT. A tenant that stops (an error a person must fix) stops
/// alone: the others go on, `/health` shows it; the process exits when
/// none is left, with the first stopped tenant's code. SIGHUP reads `file`
/// again: tenants added are provisioned (`init`: publication, slot, copy)
/// and started while the others stream; tenants removed are stopped, their
/// slot and publication dropped, their series and `/health` entry removed.
/// With `watch`, a change of the file's content does what SIGHUP does.
pub(super) async fn start(
    file: PathBuf,
    only: Option<String>,
    configs: Vec<Arc<Config>>,
    watch: bool,
) -> ExitCode {
    // Where `add-tenant` finds the node (removed when it exits; a stale one
    // is told from a live node by its process).
    let pid_file = super::tenants::pid_file(&configs);
    if let Some(path) = &pid_file {
        let pid = std::process::id().to_string();
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                crate::files::replace(path, &path.with_extension("pid.tmp"), pid.as_bytes())
            });
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), "the pid file was not written ({e}): add-tenant will not find this node; send SIGHUP yourself");
        }
    }
    let code = run_node(file, only, configs, watch).await;
    if let Some(path) = &pid_file {
        if std::fs::read_to_string(path).is_ok_and(|p| p.trim() == std::process::id().to_string()) {
            let _ = std::fs::remove_file(path);
        }
    }
    code
}

async fn run_node(
    file: PathBuf,
    only: Option<String>,
    configs: Vec<Arc<Config>>,
    watch: bool,
) -> ExitCode {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let served: crate::telemetry::NodeTenants = Arc::new(std::sync::RwLock::new(configs.clone()));
    let telemetry = match start_telemetry(&configs, &served, stop_rx).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            let _ = stop_tx.send(true);
            return exit_for(&e);
        }
    };
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    let (added_tx, mut added) =
        tokio::sync::mpsc::unbounded_channel::<(String, Option<Arc<Config>>)>();
    let mut node = Node {
        running: HashMap::new(),
        removing: HashMap::new(),
        restarting: HashMap::new(),
        stopping: false,
        adding: HashSet::new(),
        served,
        telemetry,
        done_tx,
        failed: Vec::new(),
        hubs: HashMap::new(),
        apply: None,
    };
    for config in configs {
        if let Err(e) = node.spawn(config) {
            eprintln!("error: {e}");
            node.stop_all();
            return exit_for(&e);
        }
    }
    let mut signals = Signals::new().unwrap_or_else(Signals::none);
    if watch {
        signals.watch(&file);
    }
    while !node.running.is_empty() || !node.adding.is_empty() {
        tokio::select! {
            ended = done.recv() => {
                let Some((tenant, result)) = ended else { break };
                node.ended(tenant, result);
            }
            ready = added.recv() => {
                let Some((tenant, provisioned)) = ready else { continue };
                node.adding.remove(&tenant);
                let Some(config) = provisioned else { continue };
                match node.spawn(config) {
                    Ok(()) => {
                        node.audit("tenant_added", &tenant);
                        tracing::info!(%tenant, "tenant added: streaming");
                    }
                    Err(e) => tracing::error!(%tenant, "tenant not added: {e}"),
                }
            }
            signal = signals.next() => match signal {
                Signal::Reload => node.reload(&file, only.as_deref(), &added_tx),
                Signal::Stop(name) => {
                    tracing::info!(signal = name, "shutting down: finishing the open transaction and writing checkpoints");
                    node.stop_all();
                    let _ = stop_tx.send(true);
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(9);
                    while !node.running.is_empty() {
                        match tokio::time::timeout_at(deadline, done.recv()).await {
                            Ok(Some((tenant, result))) => node.ended(tenant, result),
                            Ok(None) => break,
                            Err(_) => {
                                tracing::warn!("shutdown took too long; exiting (the target's progress is consistent, nothing is lost)");
                                return ExitCode::SUCCESS;
                            }
                        }
                    }
                    node.stop_hubs().await;
                    return node.code();
                }
            }
        }
    }
    node.stop_hubs().await;
    node.code()
}

/// Where a provisioned tenant (or `None`: provisioning failed) is handed
/// back to the node's loop.
type Added = tokio::sync::mpsc::UnboundedSender<(String, Option<Arc<Config>>)>;

/// The tenants a running node serves.
struct Node {
    /// Tenants whose pipeline runs, with their stop signal.
    running: HashMap<String, (Arc<Config>, tokio::sync::watch::Sender<bool>)>,
    /// Tenants being stopped because a reload removed them.
    removing: HashMap<String, Arc<Config>>,
    /// Tenants being stopped to start again with changed settings.
    restarting: HashMap<String, Arc<Config>>,
    /// SIGTERM/SIGINT: every tenant is stopping, none starts again.
    stopping: bool,
    /// Tenants being provisioned before they start.
    adding: HashSet<String>,
    served: crate::telemetry::NodeTenants,
    telemetry: Arc<crate::telemetry::Telemetry>,
    done_tx: tokio::sync::mpsc::UnboundedSender<(String, crate::error::Result<()>)>,
    /// Tenants that stopped with an error, and the exit code each means
    /// (the process exits with the first one's).
    failed: Vec<(String, ExitCode)>,
    /// The hub of each shared slot, by source and slot.
    hubs: HashMap<(String, String), HubHandle>,
    /// An apply node's listener, which its tenants share.
    apply: Option<Arc<crate::pipeline::apply_node::SharedApplyNode>>,
}

impl Node {
    /// The hub of `config`'s shared slot (started with its tenants
    /// registered), or `None` for a tenant with a slot of its own.
    fn hub(&mut self, config: &Config) -> crate::error::Result<Option<HubHandle>> {
        if !config.tenant.is_shared() {
            return Ok(None);
        }
        let key = config.tenant.slot_key();
        if let Some(hub) = self.hubs.get(&key) {
            return Ok(Some(hub.clone()));
        }
        // Registered: the tenants of this slot the node serves (not every
        // tenant of the file: `--tenant` may narrow it, and one never
        // started would hold the slot for good).
        let specs: Vec<(String, crate::pipeline::hub::QueueSpec)> = self
            .sharing(&key)
            .into_iter()
            .filter_map(|id| {
                let c = crate::telemetry::server::read(&self.served)
                    .iter()
                    .find(|c| c.tenant.tenant_id == id)
                    .cloned()?;
                let tel = self.telemetry.tenant(&id);
                Some((id, crate::pipeline::queue_spec(&c, &tel)))
            })
            .collect();
        let hub = HubHandle::spawn(config, &specs)?;
        self.hubs.insert(key, hub.clone());
        Ok(Some(hub))
    }

    /// An apply node's listener, shared by its tenants (bound for the first).
    fn apply_node(
        &mut self,
        config: &Config,
    ) -> crate::error::Result<Option<Arc<crate::pipeline::apply_node::SharedApplyNode>>> {
        if config.transport.mode != crate::config::Mode::Apply {
            return Ok(None);
        }
        if self.apply.is_none() {
            self.apply = Some(Arc::new(
                crate::pipeline::apply_node::SharedApplyNode::start(config)?,
            ));
        }
        Ok(self.apply.clone())
    }

    /// The served tenants that share the slot `key`.
    fn sharing(&self, key: &(String, String)) -> Vec<String> {
        crate::telemetry::server::read(&self.served)
            .iter()
            .filter(|c| c.tenant.is_shared() && c.tenant.slot_key() == *key)
            .map(|c| c.tenant.tenant_id.clone())
            .collect()
    }

    /// After the tenants' pipelines ended: each hub's last acknowledgement.
    async fn stop_hubs(&mut self) {
        if let Some(apply) = self.apply.take() {
            apply.stop().await;
        }
        for (_, hub) in self.hubs.drain() {
            hub.stop().await;
        }
    }

    fn spawn(&mut self, config: Arc<Config>) -> crate::error::Result<()> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let shared = crate::pipeline::NodeShared {
            hub: self.hub(&config)?,
            apply: self.apply_node(&config)?,
        };
        let pipeline = crate::pipeline::spawn_tenant_of(
            config.clone(),
            shared,
            stopped,
            self.telemetry.clone(),
        )?;
        let tenant = config.tenant.tenant_id.clone();
        let done_tx = self.done_tx.clone();
        let id = tenant.clone();
        tokio::spawn(async move {
            let _ = done_tx.send((id, pipeline.await));
        });
        let mut served = self.served.write().unwrap_or_else(|p| p.into_inner());
        // Restarted with new settings: served with them, in its place.
        match served.iter_mut().find(|c| c.tenant.tenant_id == tenant) {
            Some(c) => *c = config.clone(),
            None => served.push(config.clone()),
        }
        drop(served);
        // Started again (a reload after it stopped): its failure is over.
        self.failed.retain(|(t, _)| *t != tenant);
        self.running.insert(tenant, (config, stop));
        Ok(())
    }

    /// The first failed tenant's exit code (one removed since does not count).
    fn code(&self) -> ExitCode {
        self.failed
            .first()
            .map(|(_, code)| *code)
            .unwrap_or(ExitCode::SUCCESS)
    }

    fn stop_all(&mut self) {
        self.stopping = true;
        for (_, stop) in self.running.values() {
            let _ = stop.send(true);
        }
    }

    fn audit(&self, event: &str, tenant: &str) {
        if let Some(audit) = &self.telemetry.audit {
            audit.record(event, tenant, serde_json::json!({}));
        }
    }

    /// A tenant the node no longer serves (its pipeline has ended): out of
    /// `/health` and `/metrics`, audited, and its slot and publication
    /// dropped in the background.
    fn forget(&mut self, config: Arc<Config>) {
        let tenant = config.tenant.tenant_id.clone();
        self.served
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|c| c.tenant.tenant_id != tenant);
        self.telemetry.remove_tenant(&tenant);
        self.failed.retain(|(t, _)| *t != tenant);
        self.audit("tenant_removed", &tenant);
        let key = config.tenant.slot_key();
        let hub = self.hubs.get(&key).cloned();
        // The tenants still reading its shared slot.
        let remaining = self.sharing(&key);
        if hub.is_some() && remaining.is_empty() {
            self.hubs.remove(&key);
        }
        if config.transport.mode == crate::config::Mode::Apply {
            // An apply node reads no slot; the tenant's capture node, or a
            // one-process file, lets go of it.
            tracing::info!(%tenant, "tenant removed from the apply node; its rows and progress stay on the target");
            return;
        }
        tokio::spawn(async move {
            if let Some(hub) = hub {
                if let Err(e) = hub.unregister(&tenant).await {
                    tracing::error!(%tenant, "tenant removed, but the shared slot's hub did not answer: {e}");
                }
                if !remaining.is_empty() {
                    match crate::provision::publish_for(&config, &remaining).await {
                        Ok(done) => {
                            tracing::info!(%tenant, slot = %hub.slot, "tenant removed from the shared slot ({done}); its rows and progress stay on the target")
                        }
                        Err(e) => {
                            tracing::error!(%tenant, "tenant removed from the shared slot, but its publication still lists it (its rows are decoded and dropped): {e}; run init for another tenant of the slot to set it")
                        }
                    }
                    return;
                }
                hub.stop().await;
            }
            match crate::provision::release(&config).await {
                Ok(dropped) => tracing::info!(
                    %tenant, dropped = %dropped.join(", "),
                    "tenant removed; its rows and progress stay on the target"
                ),
                Err(e) => tracing::error!(
                    %tenant, slot = %config.tenant.slot,
                    "tenant removed, but its slot could not be dropped and keeps WAL on the source: {e}; drop it with SELECT pg_drop_replication_slot('{}')",
                    config.tenant.slot
                ),
            }
        });
    }

    /// A tenant's pipeline ended: removed by a reload (let go of its slot),
    /// or stopped by an error (the others go on).
    fn ended(&mut self, tenant: String, result: crate::error::Result<()>) {
        self.running.remove(&tenant);
        // Removed by a later reload, or the node is stopping: not started
        // again with its new settings.
        let restart = self
            .restarting
            .remove(&tenant)
            .filter(|_| !self.stopping && !self.removing.contains_key(&tenant));
        if let Some(config) = restart {
            if let Err(e) = &result {
                tracing::warn!(%tenant, "stopped to take its new settings, with an error: {e}");
            }
            match self.spawn(config) {
                Ok(()) => {
                    self.audit("tenant_restarted", &tenant);
                    tracing::info!(%tenant, "tenant restarted with its new settings");
                }
                Err(e) => {
                    tracing::error!(%tenant, "tenant not restarted with its new settings: {e}");
                    self.failed.push((tenant, exit_for(&e)));
                }
            }
            return;
        }
        if let Some(config) = self.removing.remove(&tenant) {
            self.forget(config);
            return;
        }
        if let Err(e) = result {
            tracing::error!(%tenant, "replication_stop: {e}");
            self.failed.push((tenant, exit_for(&e)));
        }
        if !self.running.is_empty() {
            tracing::warn!(
                running = self.running.len(),
                "a tenant stopped; the others go on"
            );
        }
    }

    /// SIGHUP: read the file again; add and remove tenants. An invalid file
    /// changes nothing (and says why).
    fn reload(&mut self, file: &Path, only: Option<&str>, added: &Added) {
        let mut configs = match Config::load_node(file) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("SIGHUP: the configuration was not reloaded, nothing changed: {e}");
                return;
            }
        };
        if let Some(id) = only {
            configs.retain(|c| c.tenant.tenant_id == id);
        }
        let wanted: HashSet<String> = configs.iter().map(|c| c.tenant.tenant_id.clone()).collect();
        let mut changed = 0;
        let gone: Vec<(String, Arc<Config>)> = self
            .running
            .iter()
            .filter(|(t, _)| !wanted.contains(*t) && !self.removing.contains_key(*t))
            .map(|(t, (config, stop))| {
                let _ = stop.send(true);
                (t.clone(), config.clone())
            })
            .collect();
        for (tenant, config) in gone {
            tracing::info!(%tenant, "SIGHUP: tenant removed from the configuration: stopping it");
            self.removing.insert(tenant, config);
            changed += 1;
        }
        // Tenants that had stopped already (an error) and are gone from the
        // file: nothing to stop, the rest as for the others.
        let stopped: Vec<Arc<Config>> = crate::telemetry::server::read(&self.served)
            .into_iter()
            .filter(|c| {
                let t = &c.tenant.tenant_id;
                !wanted.contains(t)
                    && !self.running.contains_key(t)
                    && !self.removing.contains_key(t)
            })
            .collect();
        for config in stopped {
            tracing::info!(tenant = %config.tenant.tenant_id, "SIGHUP: stopped tenant removed from the configuration");
            self.forget(config);
            changed += 1;
        }
        for config in configs {
            let tenant = config.tenant.tenant_id.clone();
            if let Some((running, stop)) = self.running.get(&tenant) {
                let changed_sections = sections_changed(running, &config);
                if changed_sections.is_empty() || self.restarting.contains_key(&tenant) {
                    continue;
                }
                let node_wide: Vec<&String> = changed_sections
                    .iter()
                    .filter(|s| NODE_SECTIONS.contains(&s.as_str()))
                    .collect();
                let structural = running.tenant.slot_key() != config.tenant.slot_key()
                    || running.tenant.publication != config.tenant.publication
                    || running.tenant.tenant_column != config.tenant.tenant_column;
                if !node_wide.is_empty() || structural {
                    tracing::warn!(%tenant, sections = ?node_wide, "SIGHUP: settings changed that take effect when the node restarts (the node's sections, or the tenant's slot, publication or tenant column)");
                    continue;
                }
                // Its own settings (target, conflict strategy, key, batch
                // size, …): the tenant stops where it stands and starts
                // again with them; its progress is in its target.
                tracing::info!(%tenant, sections = ?changed_sections, "SIGHUP: this tenant's settings changed: restarting it with them while the others stream");
                let _ = stop.send(true);
                self.restarting.insert(tenant, Arc::new(config));
                changed += 1;
                continue;
            }
            if !self.adding.insert(tenant.clone()) {
                continue;
            }
            changed += 1;
            // A slot read alone by a running tenant cannot be shared
            // without restarting that tenant on a hub.
            let key = config.tenant.slot_key();
            let local = config.transport.mode == crate::config::Mode::Local;
            let alone = self.running.values().find(|(c, _)| {
                local && c.tenant.slot_key() == key && !self.hubs.contains_key(&key)
            });
            if let Some((c, _)) = alone {
                tracing::error!(%tenant, slot = %config.tenant.slot, "SIGHUP: tenant not added: tenant '{}' reads this slot alone; restart the node to share the slot, or give the new tenant its own replication_slot", c.tenant.tenant_id);
                self.adding.remove(&tenant);
                continue;
            }
            let hub = match self.hub(&config) {
                Ok(hub) => hub,
                Err(e) => {
                    tracing::error!(%tenant, "SIGHUP: tenant not added: {e}");
                    self.adding.remove(&tenant);
                    continue;
                }
            };
            let (config, added) = (Arc::new(config), added.clone());
            if !local {
                // A capture or apply node's tenant is provisioned once where
                // both databases are reachable (`init` with a one-process
                // file), as at the first start.
                tracing::info!(%tenant, "SIGHUP: tenant added to the configuration: starting it while the others stream");
                let _ = added.send((tenant, Some(config)));
                continue;
            }
            tracing::info!(%tenant, "SIGHUP: tenant added to the configuration: provisioning it (publication, slot, copy of its rows) while the others stream");
            tokio::spawn(async move {
                // A shared slot holds for the tenant before its rows are
                // published and copied: nothing after the copy is released
                // before it has applied it.
                if let Some(hub) = &hub {
                    if let Err(e) = hub.register(&tenant).await {
                        tracing::error!(%tenant, "tenant not added: {e}");
                        let _ = added.send((tenant, None));
                        return;
                    }
                }
                let ready = match crate::provision::init(&config, true, false).await {
                    Ok(_) => Some(config),
                    Err(e) => {
                        tracing::error!(%tenant, "tenant not added (fix it and send SIGHUP again): {e}");
                        if let Some(hub) = &hub {
                            let _ = hub.unregister(&tenant).await;
                        }
                        None
                    }
                };
                let _ = added.send((tenant, ready));
            });
        }
        if changed == 0 {
            tracing::info!("SIGHUP: configuration read again; no tenant added or removed");
        }
    }
}

/// What a signal asks of the node.
enum Signal {
    Stop(&'static str),
    Reload,
}

/// SIGTERM, SIGINT (stop) and SIGHUP (reload; systemd's ExecReload).
struct Signals {
    unix: Option<(Unix, Unix, Unix)>,
    watched: Option<Watched>,
}

type Unix = tokio::signal::unix::Signal;

/// The configuration file, looked at every few seconds (`--watch-config`).
struct Watched {
    path: PathBuf,
    every: tokio::time::Interval,
    /// Its content when last read (None: unreadable then).
    seen: Option<Vec<u8>>,
}

impl Signals {
    fn new() -> Option<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Some(Self {
            unix: Some((
                signal(SignalKind::terminate()).ok()?,
                signal(SignalKind::interrupt()).ok()?,
                signal(SignalKind::hangup()).ok()?,
            )),
            watched: None,
        })
    }

    /// Without signal handlers the node runs until its tenants end.
    fn none() -> Self {
        Self {
            unix: None,
            watched: None,
        }
    }

    /// Also report a change of `path`'s content as a reload. Its content is
    /// compared, not its time: a Kubernetes ConfigMap volume swaps a
    /// symbolic link, and a file rewritten with the same text is no change.
    fn watch(&mut self, path: &Path) {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.watched = Some(Watched {
            path: path.to_path_buf(),
            every,
            seen: std::fs::read(path).ok(),
        });
    }

    async fn next(&mut self) -> Signal {
        let changed = async {
            let Some(w) = &mut self.watched else {
                return std::future::pending().await;
            };
            loop {
                w.every.tick().await;
                let now = std::fs::read(&w.path).ok();
                // An unreadable moment (a volume being updated) is no change.
                if now.is_some() && now != w.seen {
                    w.seen = now;
                    tracing::info!(file = %w.path.display(), "the configuration file changed: reading it again");
                    return Signal::Reload;
                }
            }
        };
        let Some((term, int, hup)) = &mut self.unix else {
            return changed.await;
        };
        tokio::select! {
            _ = term.recv() => Signal::Stop("SIGTERM"),
            _ = int.recv() => Signal::Stop("SIGINT"),
            _ = hup.recv() => Signal::Reload,
            signal = changed => signal,
        }
    }
}

/// The audit log (if enabled) and the monitoring endpoints (unless
/// `[features] enable_monitoring = false`).
pub(super) async fn start_telemetry(
    configs: &[Arc<Config>],
    served: &crate::telemetry::NodeTenants,
    shutdown: crate::pipeline::Shutdown,
) -> Result<Arc<crate::telemetry::Telemetry>, ReplicationError> {
    // The node's sections are every tenant's.
    let config = &configs[0];
    let audit = match &config.monitoring.audit_log {
        Some((path, events)) => {
            let t = &config.tenant;
            let user = t
                .target
                .as_ref()
                .or(t.source.as_ref())
                .map(|c| c.user.clone())
                .unwrap_or_default();
            let source_ip = t
                .source
                .as_ref()
                .map(|c| c.host.clone())
                .unwrap_or_default();
            let log = crate::telemetry::audit::AuditLog::open(path, events, &user, &source_ip)
                .map_err(|e| {
                    ReplicationError::operator(
                        format!("audit log {}: {e}", path.display()),
                        "make [monitoring] audit_log_path writable by this user (its directory is created if missing)",
                    )
                })?;
            Some(Arc::new(log))
        }
        None => None,
    };
    let conflicts = match &config.monitoring.conflict_log {
        Some(path) => Some(Arc::new(
            crate::telemetry::audit::ConflictLog::open(path).map_err(|e| {
                ReplicationError::operator(
                    format!("conflict log {}: {e}", path.display()),
                    "make [conflict] conflict_log_path writable by this user",
                )
            })?,
        )),
        None => None,
    };
    let telemetry = crate::telemetry::Telemetry::new(audit, conflicts);
    if config.monitoring.enabled {
        crate::telemetry::server::start(served.clone(), telemetry.clone(), shutdown).await?;
    }
    Ok(telemetry)
}

/// The node's sections: the same for every tenant of a file, read by the
/// node's listeners and runtime at start.
const NODE_SECTIONS: [&str; 5] = [
    "monitoring",
    "performance",
    "network",
    "transport",
    "features",
];

/// The sections (of the effective configuration) in which `a` and `b` differ.
fn sections_changed(a: &Config, b: &Config) -> Vec<String> {
    let parse = |c: &Config| toml::from_str::<toml::Table>(&c.render_masked()).unwrap_or_default();
    let (a, b) = (parse(a), parse(b));
    let mut names: Vec<String> = a.keys().chain(b.keys()).cloned().collect();
    names.sort();
    names.dedup();
    names.retain(|n| a.get(n) != b.get(n));
    names
}
