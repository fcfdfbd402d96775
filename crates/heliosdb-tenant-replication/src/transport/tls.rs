//! TLS between capture and apply nodes: TLS 1.3 only, certificates on both
//! sides (the apply node accepts only client certificates its CA signed).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};

use crate::config::TransportConfig;
use crate::error::ReplicationError;
use crate::pg::tls::{load_certs, load_key, load_roots, provider};

fn files(t: &TransportConfig) -> Result<(&Path, &Path, &Path), ReplicationError> {
    match (&t.ca_file, &t.cert_file, &t.key_file) {
        (Some(ca), Some(cert), Some(key)) => Ok((ca, cert, key)),
        _ => Err(ReplicationError::operator(
            "[transport] ca_file, cert_file and key_file are required to split capture and apply",
            "set all three (PEM files)",
        )),
    }
}

fn tls_error(what: String) -> ReplicationError {
    ReplicationError::operator(
        format!("transport TLS: {what}"),
        "check [transport] ca_file, cert_file and key_file (PEM; the key readable by this user only)",
    )
}

/// A private key file must be private ([`crate::files::private_enough`]).
fn check_key_mode(path: &Path) -> Result<(), ReplicationError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| tls_error(format!("cannot read {}: {e}", path.display())))?;
    if !crate::files::private_enough(&meta) {
        return Err(ReplicationError::operator(
            format!(
                "transport TLS: key file {} is readable by group or others (mode {:o}); it must be {}",
                path.display(),
                meta.mode() & 0o777,
                crate::files::PRIVATE_RULE
            ),
            format!("chmod 600 {}", path.display()),
        ));
    }
    Ok(())
}

/// The apply node's server configuration.
pub fn server_config(t: &TransportConfig) -> Result<Arc<ServerConfig>, ReplicationError> {
    let (ca, cert, key) = files(t)?;
    check_key_mode(key)?;
    let roots = Arc::new(load_roots(ca).map_err(tls_error)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| tls_error(format!("client CA {}: {e}", ca.display())))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            load_certs(cert).map_err(tls_error)?,
            load_key(key).map_err(tls_error)?,
        )
        .map_err(|e| tls_error(format!("{}: {e}", cert.display())))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The capture node's client configuration.
pub fn client_config(t: &TransportConfig) -> Result<Arc<ClientConfig>, ReplicationError> {
    let (ca, cert, key) = files(t)?;
    check_key_mode(key)?;
    let roots = load_roots(ca).map_err(tls_error)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            load_certs(cert).map_err(tls_error)?,
            load_key(key).map_err(tls_error)?,
        )
        .map_err(|e| tls_error(format!("{}: {e}", cert.display())))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
