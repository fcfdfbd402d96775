//! Test certificates made with the openssl CLI (a CA, and leaf
//! certificates it signs, usable as server and client certificates).
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn openssl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run openssl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl {}: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// A certificate and its private key (mode 0600).
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A self-signed CA (panics on failure: for tests).
pub fn ca(dir: &Path, name: &str) -> Pair {
    try_ca(dir, name).expect("making a test CA")
}

/// A certificate signed by `ca` (panics on failure: for tests).
pub fn leaf(dir: &Path, ca: &Pair, name: &str, sans: &[&str]) -> Pair {
    try_leaf(dir, ca, name, sans).expect("making a test certificate")
}

/// A self-signed CA.
pub fn try_ca(dir: &Path, name: &str) -> Result<Pair, String> {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key.to_str().ok_or("path is not UTF-8")?,
        "-out",
        cert.to_str().ok_or("path is not UTF-8")?,
        "-days",
        "2",
        "-subj",
        &format!("/CN={name}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ])?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", key.display()))?;
    Ok(Pair { cert, key })
}

/// A certificate signed by `ca` for `sans` (e.g. `DNS:localhost`,
/// `IP:127.0.0.1`), usable as server and client certificate.
pub fn try_leaf(dir: &Path, ca: &Pair, name: &str, sans: &[&str]) -> Result<Pair, String> {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let csr = dir.join(format!("{name}.csr"));
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        format!(
            "subjectAltName={}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n",
            sans.join(",")
        ),
    )
    .map_err(|e| format!("writing {}: {e}", ext.display()))?;
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key.to_str().ok_or("path is not UTF-8")?,
        "-out",
        csr.to_str().ok_or("path is not UTF-8")?,
        "-subj",
        &format!("/CN={name}"),
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        csr.to_str().ok_or("path is not UTF-8")?,
        "-CA",
        ca.cert.to_str().ok_or("path is not UTF-8")?,
        "-CAkey",
        ca.key.to_str().ok_or("path is not UTF-8")?,
        "-CAcreateserial",
        "-out",
        cert.to_str().ok_or("path is not UTF-8")?,
        "-days",
        "2",
        "-extfile",
        ext.to_str().ok_or("path is not UTF-8")?,
    ])?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", key.display()))?;
    Ok(Pair { cert, key })
}
