//! `[transport]`: the split deployment's nodes, their certificates and
//! addresses, with their defaults and checks.

use std::path::PathBuf;
use std::time::Duration;

use super::model::RawConfig;
use super::{notice, Checker, ConfigError, Notice};
use super::{Mode, TransportConfig};

pub(super) fn transport(
    c: &Checker<'_>,
    raw: &RawConfig,
    mode: Mode,
    notices: &mut Vec<Notice>,
) -> Result<TransportConfig, ConfigError> {
    let tr = &raw.transport;
    let path_of = |key: &str,
                   v: &Option<String>,
                   needed: bool|
     -> Result<Option<PathBuf>, ConfigError> {
        match v {
            Some(p) if p.is_empty() => Err(c.err(key, "must not be empty")),
            Some(p) => Ok(Some(PathBuf::from(p))),
            None if needed => Err(c.err(
                key,
                format!("missing: [transport] mode = \"{}\" uses TLS 1.3 with certificates on both sides; set ca_file, cert_file and key_file (PEM)", mode.name()),
            )),
            None => Ok(None),
        }
    };
    let split = mode != Mode::Local;
    let ca_file = path_of("[transport] ca_file", &tr.ca_file, split)?;
    let cert_file = path_of("[transport] cert_file", &tr.cert_file, split)?;
    let tls_key_file = path_of("[transport] key_file", &tr.key_file, split)?;
    let apply_url = match (&tr.apply_url, mode) {
        (Some(u), _) if !u.starts_with("https://") => {
            return Err(c.err(
                "[transport] apply_url",
                format!("'{u}' must start with https:// (batches never travel in plaintext)"),
            ))
        }
        (None, Mode::Capture) => {
            return Err(c.err(
                "[transport] apply_url",
                "missing: the capture node ships batches to the apply node at this URL, e.g. apply_url = \"https://apply-eu.internal:8443\"",
            ))
        }
        (u, _) => u.clone(),
    };
    let listen_address = match (&tr.listen_address, mode) {
        (Some(a), _) => Some(a.parse::<std::net::SocketAddr>().map_err(|_| {
            c.err(
                "[transport] listen_address",
                format!("'{a}' is not an address:port, e.g. 0.0.0.0:8443"),
            )
        })?),
        (None, Mode::Apply) => {
            return Err(c.err(
                "[transport] listen_address",
                "missing: the apply node listens for capture nodes here, e.g. listen_address = \"0.0.0.0:8443\"",
            ))
        }
        (None, _) => None,
    };
    let request_timeout = c.range(
        "[transport] request_timeout_seconds",
        tr.request_timeout_seconds,
        60,
        1,
        3600,
    )?;
    if mode == Mode::Local
        && (tr.apply_url.is_some()
            || tr.listen_address.is_some()
            || tr.ca_file.is_some()
            || tr.cert_file.is_some()
            || tr.key_file.is_some())
    {
        notice(notices,
            "[transport]",
            "no effect with mode = \"local\" (set mode = \"capture\" or \"apply\" to split the nodes)",
        );
    }
    Ok(TransportConfig {
        mode,
        apply_url,
        listen_address,
        ca_file,
        cert_file,
        key_file: tls_key_file,
        request_timeout: Duration::from_secs(request_timeout),
    })
}
