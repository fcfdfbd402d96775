//! Files the daemon writes (checkpoint files, trained dictionaries, the
//! audit and conflict logs), often as root in a shared directory: never
//! through a symbolic link someone planted there.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `O_NOFOLLOW`: opening a symbolic link fails (`ELOOP`).
pub(crate) fn no_follow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// Replace `path` with `bytes` atomically (mode 0600): a temporary file
/// `tmp` beside it, created exclusively (a stale one is unlinked first, a
/// link never followed), written, synced, renamed over `path`, and the
/// directory synced.
pub fn replace(path: &Path, tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    match std::fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(no_follow())
            .open(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(tmp, path)?;
        match path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) => File::open(dir)?.sync_all(),
            None => Ok(()),
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Open `path` for appending (created with mode 0600 if missing), refusing
/// a symbolic link.
pub fn append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(no_follow())
        .open(path)
}

/// Open an existing `path` for reading and writing, refusing a symbolic
/// link.
pub fn existing(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(no_follow())
        .open(path)
}

/// Create `path` afresh (mode 0600) for reading and writing: a file left
/// there is unlinked first, a link never followed.
pub fn fresh(path: &Path) -> std::io::Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(no_follow())
        .open(path)
}

/// Whether a secret file (an encryption key, a TLS private key) is private
/// enough to use, by the rule PostgreSQL applies to its own server key: no
/// access at all for group or others, or, for a file owned by root, read
/// access for the group at most (0640). The second form is how Kubernetes
/// mounts a Secret into a pod that sets `fsGroup` (root, the pod's group,
/// 0440) and how a root-owned key is shared with a service's group.
pub fn private_enough(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode() & 0o777;
    if meta.uid() == 0 {
        mode & 0o037 == 0
    } else {
        mode & 0o077 == 0
    }
}

/// What [`private_enough`] asks for, for an error message.
pub const PRIVATE_RULE: &str =
    "readable by its owner only (chmod 400), or owned by root and readable by its group at most (chmod 440)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_follow_postgresqls_rule_for_its_key() {
        use std::os::unix::fs::{chown, PermissionsExt};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, b"k").expect("write");
        let private = |mode: u32| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            private_enough(&std::fs::metadata(&path).expect("stat"))
        };
        assert!(private(0o400) && private(0o600));
        assert!(!private(0o604) && !private(0o660) && !private(0o644));
        let root = rustix::process::geteuid().is_root();
        // Group-readable: only for a file root owns (a Kubernetes Secret
        // mounted with fsGroup: root, the pod's group, 0440).
        assert_eq!(private(0o440), root);
        assert_eq!(private(0o640), root);
        if root {
            chown(&path, Some(65534), None).expect("chown");
            assert!(!private(0o440), "someone else's group-readable file");
            assert!(private(0o400));
        }
    }

    #[test]
    fn a_planted_link_is_never_written_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").expect("write");
        let path = dir.path().join("t.checkpoint");
        let tmp = dir.path().join("t.checkpoint.tmp");
        std::os::unix::fs::symlink(&victim, &tmp).expect("symlink");
        replace(&path, &tmp, b"{}\n").expect("replace");
        assert_eq!(std::fs::read(&victim).expect("read"), b"precious");
        assert_eq!(std::fs::read(&path).expect("read"), b"{}\n");
        assert!(!tmp.exists());

        let log = dir.path().join("audit.log");
        std::os::unix::fs::symlink(&victim, &log).expect("symlink");
        let err = append(&log).expect_err("a link is refused");
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::LOOP.raw_os_error())
        );
        assert_eq!(std::fs::read(&victim).expect("read"), b"precious");
    }
}
