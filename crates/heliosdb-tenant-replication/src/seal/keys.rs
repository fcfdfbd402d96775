//! Tenant keys: AES-256 keys as written by `openssl rand -hex 32`.
//!
//! [`KeyProvider`] keeps room for a KMS (`[encryption] kms_key_arn`); the
//! file provider is the one built:
//!
//! * `key_file`: one key for the tenant (key id `default`).
//! * a keys directory: `<dir>/<tenant>/<key_id>.key`; batches are sealed with
//!   the greatest key id (name keys by date, e.g. `2026-11-26.key`), and every
//!   active key opens them, so old keys keep decrypting during a rotation. A
//!   key renamed to `<key_id>.retired` is refused.
//!
//! A key file readable by group or others, not 64 hex characters, or
//! unreadable stops start-up with the file named; the key itself is never
//! printed. Each key seals at most [`MAX_MESSAGES_PER_KEY`] batches (random
//! 96-bit nonces stay far from collision well below 2^32 messages).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use zeroize::Zeroizing;

/// Batches one key may seal before it must be rotated.
pub const MAX_MESSAGES_PER_KEY: u64 = 1 << 28;

/// Key problems (never containing key material).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {problem}")]
    File { path: String, problem: String },
    #[error("no key for tenant '{tenant}'{}", key_id.as_ref().map(|k| format!(" with key id '{k}'")).unwrap_or_default())]
    Unknown {
        tenant: String,
        key_id: Option<String>,
    },
    #[error("key '{key_id}' of tenant '{tenant}' is retired")]
    Retired { tenant: String, key_id: String },
    #[error("key '{key_id}' of tenant '{tenant}' sealed {MAX_MESSAGES_PER_KEY} batches: rotate it (add a newer key)")]
    Exhausted { tenant: String, key_id: String },
}

/// A tenant key; the bytes are wiped on drop and never printed.
pub struct TenantKey {
    pub id: String,
    bytes: Zeroizing<[u8; 32]>,
    pub(super) sealed: AtomicU64,
}

impl std::fmt::Debug for TenantKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TenantKey({}, ***)", self.id)
    }
}

impl TenantKey {
    pub fn new(id: impl Into<String>, bytes: [u8; 32]) -> Self {
        Self {
            id: id.into(),
            bytes: Zeroizing::new(bytes),
            sealed: AtomicU64::new(0),
        }
    }

    pub(super) fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Batches this key has sealed (as far as this process knows).
    pub fn sealed_count(&self) -> u64 {
        self.sealed.load(Ordering::Relaxed)
    }

    /// Raise the count to at least `n` (what the apply node recorded before
    /// a restart of this process).
    pub fn count_at_least(&self, n: u64) {
        self.sealed.fetch_max(n, Ordering::Relaxed);
    }

    /// Count one more sealed batch; refuse past the cap.
    pub(super) fn use_once(&self, tenant: &str) -> Result<(), KeyError> {
        if self.sealed.fetch_add(1, Ordering::Relaxed) >= MAX_MESSAGES_PER_KEY {
            return Err(KeyError::Exhausted {
                tenant: tenant.to_string(),
                key_id: self.id.clone(),
            });
        }
        Ok(())
    }
}

/// Where tenant keys come from.
pub trait KeyProvider: Send + Sync {
    /// The key new batches of `tenant` are sealed with.
    fn sealing_key(&self, tenant: &str) -> Result<Arc<TenantKey>, KeyError>;
    /// The key a batch names, if it may still open batches.
    fn opening_key(&self, tenant: &str, key_id: &str) -> Result<Arc<TenantKey>, KeyError>;
}

/// Keys read from files at start-up.
#[derive(Debug, Default)]
pub struct FileKeys {
    /// tenant → key id → key (active ones), in key id order.
    pub(super) active: BTreeMap<String, BTreeMap<String, Arc<TenantKey>>>,
    retired: BTreeMap<String, Vec<String>>,
}

impl FileKeys {
    /// One key file for one tenant (`[encryption] key_file`).
    pub fn from_key_file(tenant: &str, path: &Path) -> Result<Self, KeyError> {
        let key = read_key_file(path)?;
        let mut keys = Self::default();
        keys.active
            .entry(tenant.to_string())
            .or_default()
            .insert("default".into(), Arc::new(TenantKey::new("default", key)));
        Ok(keys)
    }

    /// `[encryption] key_file`: a key file for `tenant`, or a keys directory.
    pub fn load(tenant: &str, path: &Path) -> Result<Self, KeyError> {
        let keys = if path.is_dir() {
            Self::from_dir(path)?
        } else {
            Self::from_key_file(tenant, path)?
        };
        keys.sealing_key(tenant)?;
        Ok(keys)
    }

    /// A keys directory: `<dir>/<tenant>/<key_id>.key` (and `.retired`).
    pub fn from_dir(dir: &Path) -> Result<Self, KeyError> {
        let err = |p: &Path, e: std::io::Error| KeyError::File {
            path: p.display().to_string(),
            problem: e.to_string(),
        };
        let mut keys = Self::default();
        for tenant_dir in std::fs::read_dir(dir).map_err(|e| err(dir, e))? {
            let tenant_dir = tenant_dir.map_err(|e| err(dir, e))?.path();
            if !tenant_dir.is_dir() {
                continue;
            }
            let tenant = tenant_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for f in std::fs::read_dir(&tenant_dir).map_err(|e| err(&tenant_dir, e))? {
                let path: PathBuf = f.map_err(|e| err(&tenant_dir, e))?.path();
                let (Some(stem), Some(ext)) = (path.file_stem(), path.extension()) else {
                    continue;
                };
                let id = stem.to_string_lossy().into_owned();
                match ext.to_string_lossy().as_ref() {
                    "key" => {
                        let key = read_key_file(&path)?;
                        keys.active
                            .entry(tenant.clone())
                            .or_default()
                            .insert(id.clone(), Arc::new(TenantKey::new(id, key)));
                    }
                    "retired" => keys.retired.entry(tenant.clone()).or_default().push(id),
                    _ => {}
                }
            }
        }
        Ok(keys)
    }
}

impl KeyProvider for FileKeys {
    fn sealing_key(&self, tenant: &str) -> Result<Arc<TenantKey>, KeyError> {
        self.active
            .get(tenant)
            .and_then(|k| k.values().next_back())
            .cloned()
            .ok_or_else(|| KeyError::Unknown {
                tenant: tenant.to_string(),
                key_id: None,
            })
    }

    fn opening_key(&self, tenant: &str, key_id: &str) -> Result<Arc<TenantKey>, KeyError> {
        if let Some(k) = self.active.get(tenant).and_then(|k| k.get(key_id)) {
            return Ok(k.clone());
        }
        if self
            .retired
            .get(tenant)
            .is_some_and(|r| r.iter().any(|id| id == key_id))
        {
            return Err(KeyError::Retired {
                tenant: tenant.to_string(),
                key_id: key_id.to_string(),
            });
        }
        Err(KeyError::Unknown {
            tenant: tenant.to_string(),
            key_id: Some(key_id.to_string()),
        })
    }
}

/// Read and check one key file.
pub fn read_key_file(path: &Path) -> Result<[u8; 32], KeyError> {
    let bad = |problem: String| KeyError::File {
        path: path.display().to_string(),
        problem,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !crate::files::private_enough(&meta) {
        return Err(bad(format!(
            "readable by others (mode {:o}); it must be {}: fix: chmod 400 {}",
            meta.mode() & 0o777,
            crate::files::PRIVATE_RULE,
            path.display()
        )));
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?);
    let hex = text.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(format!(
            "must hold 64 hex characters (a 256-bit key, as written by `openssl rand -hex 32`), found {} characters",
            hex.len()
        )));
    }
    let mut key = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).map_err(|_| bad("not hex".into()))?;
        key[i] = u8::from_str_radix(s, 16).map_err(|_| bad("not hex".into()))?;
    }
    Ok(key)
}
