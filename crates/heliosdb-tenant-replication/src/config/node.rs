//! A node's file: one tenant (the guide's form, unchanged), or many as
//! `[[tenants]]` entries.
//!
//! ```toml
//! [replication]                 # what every tenant shares
//! source_connection = "postgresql://…"
//! tenant_column = "tenant_id"
//! [monitoring]                  # the node's: one /metrics, one /health
//! prometheus_port = 9090
//!
//! [[tenants]]
//! [tenants.replication]
//! tenant_id = "acme"
//! target_connection = "postgresql://…/acme"
//! [tenants.cdc]
//! replication_slot = "acme_slot"
//! publication_name = "acme_pub"
//! ```
//!
//! Each entry's sections are laid over the file's own, key by key, and the
//! result is checked as a one-tenant file would be. What belongs to the
//! node (monitoring, performance, network, transport, features) cannot be
//! set per tenant.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::{Config, ConfigError, Mode};

/// Sections a `[[tenants]]` entry may set.
const PER_TENANT: [&str; 7] = [
    "replication",
    "source",
    "target",
    "cdc",
    "encryption",
    "conflict",
    "compression",
];

impl Config {
    /// Every tenant of the node file at `path` (one for the guide's form).
    pub fn load_node(path: &Path) -> Result<Vec<Config>, ConfigError> {
        let (text, file) = super::read_file(path)?;
        Self::node_from_toml(&text, &file, |k| std::env::var(k).ok())
    }

    /// [`Config::load_node`] of TOML text; `env` supplies overrides.
    pub fn node_from_toml(
        text: &str,
        file: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<Config>, ConfigError> {
        let fail = |key: &str, message: String| ConfigError {
            file: file.to_string(),
            key: key.to_string(),
            message,
        };
        // Parse errors are reported as for one tenant, with their line.
        let Ok(mut base) = toml::from_str::<toml::Table>(text) else {
            return Ok(vec![Self::from_toml(text, file, &env)?]);
        };
        let Some(entries) = base.remove("tenants") else {
            return Ok(vec![Self::from_toml(text, file, &env)?]);
        };
        let toml::Value::Array(entries) = entries else {
            return Err(fail(
                "tenants",
                "must be a list of [[tenants]] entries".into(),
            ));
        };
        if entries.is_empty() {
            return Err(fail(
                "tenants",
                "lists no tenant: add a [[tenants]] entry".into(),
            ));
        }
        // The variable overrides the target the tenants share (the file's
        // own `[replication] target_connection`); it would silently replace
        // a target an entry names for itself, so that is refused.
        if env("REPLICATION_TARGET_CONNECTION").is_some() {
            if let Some(i) = entries.iter().position(names_own_target) {
                return Err(fail(
                    &format!("tenants[{i}]"),
                    "names a target of its own, and REPLICATION_TARGET_CONNECTION would replace it: the variable overrides only the target the tenants share (set at the top of the file); unset it, or move the entry's target_connection to the top of the file if every tenant uses it".into(),
                ));
            }
        }
        let mut configs = Vec::with_capacity(entries.len());
        for (i, entry) in entries.into_iter().enumerate() {
            let key = format!("tenants[{i}]");
            let toml::Value::Table(entry) = entry else {
                return Err(fail(&key, "must be a table of sections".into()));
            };
            let mut merged = base.clone();
            for (section, value) in entry {
                if !PER_TENANT.contains(&section.as_str()) {
                    return Err(fail(
                        &format!("{key}.{section}"),
                        format!(
                            "a tenant may set [{}]; [{section}] is the node's: set it once at the top of the file",
                            PER_TENANT.join("], [")
                        ),
                    ));
                }
                let toml::Value::Table(over) = value else {
                    return Err(fail(
                        &format!("{key}.{section}"),
                        "must be a section ([tenants.<section>])".into(),
                    ));
                };
                match merged.get_mut(&section) {
                    Some(toml::Value::Table(own)) => own.extend(over),
                    _ => {
                        merged.insert(section, toml::Value::Table(over));
                    }
                }
            }
            let text = toml::to_string(&merged)
                .map_err(|e| fail(&key, format!("cannot be combined with the file: {e}")))?;
            // A line number would count lines of the combined text.
            let config =
                Self::from_toml(&text, &format!("{file} ({key})"), &env).map_err(|mut e| {
                    if let Some(at) = e.message.rfind(" (line ") {
                        e.message.truncate(at);
                    }
                    e
                })?;
            configs.push(config);
        }
        check_node(&mut configs, file)?;
        Ok(configs)
    }
}

/// What must differ between the tenants of one node, and which tenants
/// share a slot: tenants naming the same slot of the same source are
/// decoded once, so they must also name the same publication and tenant
/// column.
fn check_node(configs: &mut [Config], file: &str) -> Result<(), ConfigError> {
    let fail = |key: &str, message: String| ConfigError {
        file: file.to_string(),
        key: key.to_string(),
        message,
    };
    let mut ids = HashSet::new();
    // (source, slot) → the first tenant reading it.
    let mut slots: HashMap<(String, String), usize> = HashMap::new();
    let mut groups: HashMap<(String, String), Vec<String>> = HashMap::new();
    for (i, c) in configs.iter().enumerate() {
        let t = &c.tenant;
        if !ids.insert(t.tenant_id.clone()) {
            return Err(fail(
                &format!("tenants[{i}].replication.tenant_id"),
                format!("tenant '{}' is listed twice", t.tenant_id),
            ));
        }
        // An apply node reads no slot: its tenants' slots are their capture
        // nodes' business.
        if c.transport.mode == Mode::Apply {
            continue;
        }
        let key = t.slot_key();
        if let Some(&first) = slots.get(&key) {
            let f = &configs[first].tenant;
            if f.publication != t.publication {
                return Err(fail(
                    &format!("tenants[{i}].cdc.publication_name"),
                    format!(
                        "tenants '{}' and '{}' share slot '{}' (decoded once for both), so they share its publication too: give them the same publication_name ('{}'), or each its own replication_slot",
                        f.tenant_id, t.tenant_id, t.slot, f.publication
                    ),
                ));
            }
            if f.tenant_column != t.tenant_column {
                return Err(fail(
                    &format!("tenants[{i}].cdc.tenant_column"),
                    format!(
                        "tenants '{}' and '{}' share slot '{}', and rows are routed to them by one tenant column: give them the same tenant_column ('{}'), or each its own replication_slot",
                        f.tenant_id, t.tenant_id, t.slot, f.tenant_column
                    ),
                ));
            }
        } else {
            slots.insert(key.clone(), i);
            // A publication is one slot's: two slots on one publication
            // would rewrite each other's row filter.
            if let Some(((_, other), _)) = slots.iter().find(|((s, slot), &j)| {
                *s == key.0 && *slot != t.slot && configs[j].tenant.publication == t.publication
            }) {
                return Err(fail(
                    &format!("tenants[{i}].cdc.publication_name"),
                    format!(
                        "publication '{}' is read through slot '{other}' too: tenants that share a publication share its slot; give this tenant the same replication_slot, or its own publication_name",
                        t.publication
                    ),
                ));
            }
        }
        groups.entry(key).or_default().push(t.tenant_id.clone());
    }
    for c in configs.iter_mut() {
        let t = &mut c.tenant;
        let Some(group) = groups.get(&t.slot_key()) else {
            continue;
        };
        if group.len() > 1 {
            let mut ids = group.clone();
            ids.sort();
            t.shared_with = ids;
        }
    }
    Ok(())
}

/// Whether a `[[tenants]]` entry sets its own target connection.
fn names_own_target(entry: &toml::Value) -> bool {
    let set = |section: &str, key: &str| entry.get(section).and_then(|t| t.get(key)).is_some();
    set("replication", "target_connection") || set("target", "connection")
}
