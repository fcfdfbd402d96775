//! `[compression]` and `[encryption]`: how batches are sealed when they
//! cross the network, with their defaults and checks.

use std::path::PathBuf;

use super::model::RawConfig;
use super::{notice, Checker, ConfigError, Notice};
use super::{Mode, SealConfig};

pub(super) fn seal(
    c: &Checker<'_>,
    raw: &RawConfig,
    mode: Mode,
    notices: &mut Vec<Notice>,
) -> Result<SealConfig, ConfigError> {
    let f = &raw.features;
    let level = c.alias(
        ("[compression] level", raw.compression.level),
        (
            "[performance] compression_level",
            raw.performance.compression_level,
        ),
    )?;
    let min_size = c.alias(
        (
            "[compression] min_size_bytes",
            raw.compression.min_size_bytes,
        ),
        (
            "[performance] compression_min_size_bytes",
            raw.performance.compression_min_size_bytes,
        ),
    )?;
    let algorithm = raw.compression.algorithm.as_deref().unwrap_or("zstd");
    let level_range = match algorithm {
        "zstd" => Some((1, 22)),
        "gzip" => Some((0, 9)),
        "lz4" | "snappy" => None,
        other => {
            return Err(c.err(
                "[compression] algorithm",
                format!("'{other}' is not supported: allowed zstd, snappy, lz4, gzip"),
            ))
        }
    };
    if let (Some(l), Some((lo, hi))) = (level, level_range) {
        if l < lo || l > hi {
            return Err(c.err(
                "[compression] level",
                format!("{l} is out of range for {algorithm}: allowed {lo} to {hi}"),
            ));
        }
    }
    let compression_set = raw.compression.algorithm.is_some()
        || level.is_some()
        || min_size.is_some()
        || raw.compression.dictionary_path.is_some();
    if mode == Mode::Local && (f.enable_compression == Some(true) || compression_set) {
        notice(notices, "[compression]", "no effect with [transport] mode = \"local\": capture and apply run in this process, so no batch crosses a network; batches are compressed when a capture node ships them to an apply node");
    }
    let compression = if f.enable_compression == Some(false) {
        crate::seal::Algorithm::None
    } else {
        crate::seal::Algorithm::from_name(algorithm).unwrap_or(crate::seal::Algorithm::Zstd)
    };
    let default_level = if algorithm == "gzip" { 6 } else { 3 };
    let min_size_bytes = c.range(
        "[compression] min_size_bytes",
        min_size,
        512,
        0,
        crate::seal::MAX_PLAIN_LEN as u64,
    )? as usize;
    if raw.compression.dictionary_path.is_some() && algorithm != "zstd" {
        return Err(c.err(
            "[compression] dictionary_path",
            format!("dictionaries are used by zstd only (algorithm is {algorithm}); remove the key or choose zstd"),
        ));
    }
    if let Some(a) = raw.encryption.algorithm.as_deref() {
        if a != "aes256gcm" {
            return Err(c.err(
                "[encryption] algorithm",
                format!("'{a}' is not supported: allowed aes256gcm"),
            ));
        }
    }
    let e = &raw.encryption;
    if mode == Mode::Local
        && (f.enable_encryption == Some(true)
            || e.key_file.is_some()
            || e.kms_key_arn.is_some()
            || e.key_rotation_days.is_some())
    {
        notice(notices, "[encryption]", "no effect with [transport] mode = \"local\": no batch crosses a network (protect the PostgreSQL connections with sslmode=verify-full); batches are sealed with the tenant key when a capture node ships them to an apply node");
    }
    if mode != Mode::Local {
        if f.enable_encryption == Some(false) {
            return Err(c.err(
                "[features] enable_encryption",
                format!("false is not allowed with [transport] mode = \"{}\": every batch that crosses the network is sealed with the tenant's key", mode.name()),
            ));
        }
        if e.key_file.is_none() {
            return Err(c.err(
                "[encryption] key_file",
                format!("missing: [transport] mode = \"{}\" seals every batch with the tenant's key; create one with `openssl rand -hex 32 > /etc/heliosdb/key.txt && chmod 600 /etc/heliosdb/key.txt` and set key_file (or a keys directory <dir>/<tenant>/<key_id>.key)", mode.name()),
            ));
        }
        if e.kms_key_arn.is_some() {
            notice(
                notices,
                "[encryption] kms_key_arn",
                "not supported in this build: keys come from key_file",
            );
        }
        if e.key_rotation_days.is_some() {
            notice(notices, "[encryption] key_rotation_days", "not enforced: rotate by adding a newer <key_id>.key to the keys directory (batches are sealed with the greatest key id; older keys keep opening batches until renamed to .retired)");
        }
    }
    Ok(SealConfig {
        compression,
        level: level.map(|l| l as i32).unwrap_or(default_level),
        min_size_bytes,
        dictionary_path: raw.compression.dictionary_path.as_ref().map(PathBuf::from),
        key_path: raw.encryption.key_file.as_ref().map(PathBuf::from),
    })
}
