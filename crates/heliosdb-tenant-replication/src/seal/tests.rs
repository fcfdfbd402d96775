use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use proptest::prelude::*;

use super::*;

fn keys_with(ids: &[&str]) -> FileKeys {
    let dir = tempfile::tempdir().expect("dir");
    let t = dir.path().join("tenant-a");
    std::fs::create_dir(&t).expect("tenant dir");
    for (i, id) in ids.iter().enumerate() {
        write_key(&t.join(format!("{id}.key")), &format!("{:064x}", i + 1));
    }
    write_key(&t.join("2020-01-01.retired"), &"ab".repeat(32));
    FileKeys::from_dir(dir.path()).expect("keys")
}

fn write_key(path: &Path, hex: &str) {
    std::fs::write(path, format!("{hex}\n")).expect("write key");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400)).expect("chmod");
}

fn batch(seq: u64) -> BatchInfo<'static> {
    BatchInfo {
        tenant: "tenant-a",
        sequence: seq,
        first_lsn: Lsn(100),
        last_lsn: Lsn(200),
        events: 3,
    }
}

fn sample() -> Vec<u8> {
    // Replication-like text: compressible.
    (0..2000)
        .flat_map(|i| {
            format!(
                "INSERT orders tenant-a {i} status=paid amount={}.25 ",
                i * 7
            )
            .into_bytes()
        })
        .collect()
}

#[test]
fn every_algorithm_and_level_round_trips() {
    let keys = keys_with(&["2026-11-26"]);
    let plain = sample();
    let mut cases = vec![
        (Algorithm::None, 0),
        (Algorithm::Snappy, 0),
        (Algorithm::Lz4, 0),
    ];
    cases.extend((1..=22).map(|l| (Algorithm::Zstd, l)));
    cases.extend((0..=9).map(|l| (Algorithm::Gzip, l)));
    for (algorithm, level) in cases {
        let c = Compression {
            algorithm,
            level,
            min_size_bytes: 0,
            dictionary: None,
        };
        let sealed = seal(&batch(7), &plain, &c, &keys).expect("seal");
        let (h, back) = open(&sealed.bytes, "tenant-a", Some(6), &keys).expect("open");
        assert_eq!(back, plain, "{algorithm:?} {level}");
        assert_eq!(
            (h.sequence, h.events, h.first_lsn, h.last_lsn, h.algorithm),
            (7, 3, Lsn(100), Lsn(200), algorithm)
        );
        // gzip level 0 stores without compressing.
        if algorithm != Algorithm::None && !(algorithm == Algorithm::Gzip && level == 0) {
            assert!(
                sealed.ratio < 0.5,
                "{algorithm:?} {level}: ratio {}",
                sealed.ratio
            );
        }
    }
    // Below min_size_bytes nothing is compressed.
    let c = Compression {
        algorithm: Algorithm::Zstd,
        level: 3,
        min_size_bytes: 512,
        dictionary: None,
    };
    let sealed = seal(&batch(1), b"tiny", &c, &keys).expect("seal");
    assert_eq!(
        open(&sealed.bytes, "tenant-a", None, &keys)
            .expect("open")
            .0
            .algorithm,
        Algorithm::None
    );
}

#[test]
fn flipping_any_bit_is_refused() {
    let keys = keys_with(&["k1"]);
    let c = Compression {
        algorithm: Algorithm::Zstd,
        level: 3,
        min_size_bytes: 0,
        dictionary: None,
    };
    let sealed = seal(&batch(1), &sample()[..3000], &c, &keys).expect("seal");
    for i in 0..sealed.bytes.len() {
        for bit in [0x01u8, 0x80] {
            let mut bad = sealed.bytes.clone();
            bad[i] ^= bit;
            assert!(
                open(&bad, "tenant-a", None, &keys).is_err(),
                "byte {i} bit {bit:#x} accepted"
            );
        }
    }
}

#[test]
fn a_batch_cannot_change_tenant_sequence_or_key() {
    let keys = keys_with(&["k1"]);
    let c = Compression {
        algorithm: Algorithm::Lz4,
        level: 0,
        min_size_bytes: 0,
        dictionary: None,
    };
    let sealed = seal(&batch(5), b"rows of tenant a", &c, &keys).expect("seal");
    // Offered to another tenant's apply.
    assert!(matches!(
        open(&sealed.bytes, "tenant-b", None, &keys),
        Err(SealError::CrossTenant { .. })
    ));
    // Relabelled as tenant "tenant-b" (same length): the header is authenticated.
    let mut relabelled = sealed.bytes.clone();
    let at = relabelled
        .windows(8)
        .position(|w| w == b"tenant-a")
        .expect("tenant in header");
    relabelled[at + 7] = b'b';
    let mut keys_b = keys_with(&["k1"]);
    keys_b
        .active
        .insert("tenant-b".into(), keys_b.active["tenant-a"].clone());
    assert!(matches!(
        open(&relabelled, "tenant-b", None, &keys_b),
        Err(SealError::Authentication { .. })
    ));
    // Replayed or reordered.
    assert!(matches!(
        open(&sealed.bytes, "tenant-a", Some(5), &keys),
        Err(SealError::Replay { .. })
    ));
    assert!(matches!(
        open(&sealed.bytes, "tenant-a", Some(9), &keys),
        Err(SealError::Replay { .. })
    ));
    assert!(open(&sealed.bytes, "tenant-a", Some(4), &keys).is_ok());
    // A key the receiver does not have.
    let other = keys_with(&["k2"]);
    assert!(matches!(
        open(&sealed.bytes, "tenant-a", None, &other),
        Err(SealError::Key(KeyError::Unknown { .. }))
    ));
}

#[test]
fn rotation_seals_with_the_newest_key_and_old_keys_still_open() {
    let old = keys_with(&["2026-08-01"]);
    let c = Compression {
        algorithm: Algorithm::Snappy,
        level: 0,
        min_size_bytes: 0,
        dictionary: None,
    };
    let before = seal(&batch(1), b"sealed before the rotation", &c, &old).expect("seal");
    let rotated = keys_with(&["2026-08-01", "2026-11-01"]);
    let after = seal(&batch(2), b"sealed after", &c, &rotated).expect("seal");
    assert_eq!(
        open(&after.bytes, "tenant-a", None, &rotated)
            .expect("open")
            .0
            .key_id,
        "2026-11-01"
    );
    assert_eq!(
        open(&before.bytes, "tenant-a", None, &rotated)
            .expect("grace")
            .0
            .key_id,
        "2026-08-01"
    );
    // A retired key is refused.
    assert!(matches!(
        rotated.opening_key("tenant-a", "2020-01-01"),
        Err(KeyError::Retired { .. })
    ));
}

#[test]
fn key_files_readable_by_others_or_malformed_are_refused_without_echoing_them() {
    let dir = tempfile::tempdir().expect("dir");
    let p = dir.path().join("tenant-encryption-key.txt");
    let secret = "0123456789abcdef".repeat(4);
    std::fs::write(&p, &secret).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let e = FileKeys::from_key_file("t", &p)
        .expect_err("world readable")
        .to_string();
    assert!(
        e.contains("readable by others (mode 644)") && e.contains("chmod 400"),
        "{e}"
    );
    assert!(!e.contains(&secret));
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).expect("chmod");
    assert!(FileKeys::from_key_file("t", &p).is_ok());
    for bad in ["abcd", &"zz".repeat(32), &"ab".repeat(33)] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(&p, bad).expect("write");
        let e = FileKeys::from_key_file("t", &p).expect_err(bad).to_string();
        assert!(
            e.contains("64 hex characters") && e.contains("openssl rand -hex 32"),
            "{e}"
        );
        assert!(!e.contains(bad), "{e}");
    }
    let k = FileKeys::from_key_file("t", &p.with_extension("missing"))
        .expect_err("missing")
        .to_string();
    assert!(k.contains("missing"), "{k}");
}

#[test]
fn a_key_stops_sealing_at_its_message_cap() {
    let key = TenantKey::new("k", [7; 32]);
    key.sealed.store(
        keys::MAX_MESSAGES_PER_KEY,
        std::sync::atomic::Ordering::Relaxed,
    );
    assert!(matches!(key.use_once("t"), Err(KeyError::Exhausted { .. })));
}

static SHARED_KEYS: std::sync::LazyLock<FileKeys> = std::sync::LazyLock::new(|| keys_with(&["k1"]));

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = open(&data, "tenant-a", None, &*SHARED_KEYS);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_magic_never_panic(rest in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut data = b"HLSB\x01".to_vec();
        data.extend(rest);
        let _ = open(&data, "tenant-a", None, &*SHARED_KEYS);
    }
}

#[test]
fn reused_zstd_contexts_compress_like_fresh_ones_and_survive_bad_bodies() {
    use super::compress::{zstd_compress, zstd_decompress};
    let plain = sample();
    // The thread's context changes level and back.
    for level in [3, 19, 1, 3] {
        let reused = zstd_compress(&plain, level).expect("compress");
        let fresh = zstd::bulk::compress(&plain, level).expect("compress");
        assert_eq!(reused, fresh, "level {level}");
    }
    let good = zstd::bulk::compress(&plain, 3).expect("compress");
    assert!(zstd_decompress(&good[..good.len() / 2], plain.len()).is_err());
    assert!(zstd_decompress(b"not zstd at all", plain.len()).is_err());
    // The same context, after those failures.
    assert_eq!(
        zstd_decompress(&good, plain.len()).expect("decompress"),
        plain
    );
}
