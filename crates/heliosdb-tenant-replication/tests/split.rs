//! Split deployment: a capture node and an apply node as two processes,
//! shipping sealed batches over TLS 1.3 with client certificates, on real
//! clusters.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

struct Split {
    capture: PathBuf,
    apply: PathBuf,
    port: u16,
}

/// Drop every line of `text` that starts with `prefix`.
fn without(text: &str, prefix: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with(prefix))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Certificates, a shared tenant key, and the two nodes' configurations
/// (the capture node knows only the source, the apply node only the target).
fn split_configs(env: &Env, batch_size: u32) -> Split {
    let dir = env.dir.path();
    let ca = pki::ca(dir, "ca");
    let apply_cert = pki::leaf(dir, &ca, "apply-node", &["DNS:localhost", "IP:127.0.0.1"]);
    let capture_cert = pki::leaf(dir, &ca, "capture-node", &["DNS:capture.test"]);
    let key = key_file(&dir.join("tenant.key"));
    let port = pgcluster::free_port().expect("port");
    // Each node gets its own monitoring ports (config_text picks free ones).
    let base = || {
        env.config_text("")
            .replace("batch_size = 1000", &format!("batch_size = {batch_size}"))
    };
    let transport = |mode: &str, pair: &pki::Pair, line: &str| {
        format!(
            "\n[encryption]\nkey_file = \"{}\"\n\n[transport]\nmode = \"{mode}\"\n{line}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nrequest_timeout_seconds = 30\n",
            key.display(),
            ca.cert.display(),
            pair.cert.display(),
            pair.key.display()
        )
    };
    let apply = without(&base(), "source_connection")
        + &transport(
            "apply",
            &apply_cert,
            &format!("listen_address = \"127.0.0.1:{port}\""),
        );
    let capture = without(&base(), "target_connection")
        + &transport(
            "capture",
            &capture_cert,
            &format!("apply_url = \"https://127.0.0.1:{port}\""),
        );
    Split {
        capture: env.write_config("capture.toml", &capture),
        apply: env.write_config("apply.toml", &apply),
        port,
    }
}

fn start(config: &Path, env: &Env, name: &str) -> Daemon {
    Daemon::start(config, &env.dir.path().join(format!("{name}.log")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capture_and_apply_nodes_over_mutual_tls_lose_and_double_nothing_across_kill_9() {
    let (env, _local) = Env::provisioned(SCHEMA).await;
    // Small batches: big transactions span several batches, and kills land
    // between the batches of one source transaction.
    let configs = split_configs(&env, 200);
    let src = env.src().await;
    src.batch_execute(
        "INSERT INTO accounts SELECT 'tenant-123', g, 'n' || g, 'e' || g || '@x', g, now() FROM generate_series(1, 3000) g;
         INSERT INTO accounts SELECT 'tenant-456', g, 'other', 'o@x', g, now() FROM generate_series(1, 500) g",
    )
    .await
    .expect("rows before start");

    let mut apply = start(&configs.apply, &env, "apply");
    let mut capture = start(&configs.capture, &env, "capture");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &capture).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(workload(env.source.superuser_url("app"), 7, stop.clone()));
    // One large transaction that spans many batches, committed while the
    // kills happen.
    let big = {
        let url = env.source.superuser_url("app");
        tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            c.batch_execute(
                "INSERT INTO events SELECT 'tenant-123', 100000 + g, 'bulk', repeat('x', 300), now() FROM generate_series(1, 20000) g",
            )
            .await
            .expect("big transaction");
        })
    };
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        if round % 2 == 0 {
            capture.kill9();
            capture = start(&configs.capture, &env, "capture");
        } else {
            apply.kill9();
            apply = start(&configs.apply, &env, "apply");
        }
    }
    big.await.expect("big");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let txns = writer.await.expect("writer");
    assert!(txns > 10, "the workload ran ({txns} transactions)");

    wait_tenant_equal(&env, &TABLES, Duration::from_secs(120), &capture).await;
    assert_tenant_equal(&env, &TABLES).await;
    let dst = env.dst().await;
    assert_eq!(
        foreign_rows(&dst).await,
        0,
        "another tenant's rows reached the target"
    );

    // The apply node stored the batch sequence with the data, and the slot
    // was acknowledged only up to what the target committed.
    let row = dst
        .query_one(
            "SELECT batch_sequence, end_lsn::text, seal_key_id, seal_key_batches FROM heliosdb_replication.progress WHERE tenant_id = $1",
            &[&TENANT],
        )
        .await
        .expect("progress");
    let (sequence, end_lsn): (i64, String) = (row.get(0), row.get(1));
    assert!(sequence > 10, "batch sequence {sequence}");
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("default"));
    assert!(row.get::<_, Option<i64>>(3).unwrap_or(0) > 0);
    let slot_ok: bool = src
        .query_one(
            "SELECT confirmed_flush_lsn <= $1::text::pg_lsn OR confirmed_flush_lsn <= pg_current_wal_lsn() FROM pg_replication_slots WHERE slot_name = 'tenant_123_slot'",
            &[&end_lsn],
        )
        .await
        .expect("slot")
        .get(0);
    assert!(slot_ok);

    let capture_log =
        std::fs::read_to_string(env.dir.path().join("capture.log")).unwrap_or_default();
    let apply_log = std::fs::read_to_string(env.dir.path().join("apply.log")).unwrap_or_default();
    for log in [&capture_log, &apply_log] {
        assert!(!log.contains("panicked"), "{log}");
        assert!(!log.contains(&env.source.superuser_url("app")));
    }
    // Every restart resumed through a new session.
    let sessions = apply_log.matches("capture node connected").count();
    assert!(
        sessions >= 3,
        "{sessions} sessions; apply log:\n{apply_log}"
    );
    assert!(
        capture_log.matches("batch applied").count() > 50,
        "capture log:\n{capture_log}"
    );

    let (status, _) = capture.terminate();
    assert!(status.success(), "capture exit {status:?}");
    let (status, _) = apply.terminate();
    assert!(status.success(), "apply exit {status:?}");
}

mod crafted {
    //! Batches made by hand, as an attacker or a broken node would send them.
    use std::sync::Arc;

    use bytes::Bytes;
    use heliosdb_tenant_replication::capture::pgoutput::{ColumnDesc, RelationDesc, Value};
    use heliosdb_tenant_replication::capture::{RowChange, RowOp, TxEvent};
    use heliosdb_tenant_replication::lsn::Lsn;
    use heliosdb_tenant_replication::seal::{self, Algorithm, BatchInfo, Compression, KeyProvider};
    use heliosdb_tenant_replication::transport::codec::Encoder;

    fn accounts() -> Arc<RelationDesc> {
        let col = |name: &str, oid: u32, key: bool| ColumnDesc {
            is_key: key,
            name: name.into(),
            type_oid: oid,
            type_modifier: -1,
        };
        Arc::new(RelationDesc {
            id: 1,
            namespace: "public".into(),
            name: "accounts".into(),
            replica_identity: b'd',
            columns: vec![
                col("tenant_id", 25, true),
                col("id", 20, true),
                col("name", 25, false),
                col("email", 25, false),
                col("balance", 1700, false),
                col("updated_at", 1184, false),
            ],
        })
    }

    /// One source transaction inserting account `id` of `tenant`.
    pub fn batch(
        tenant: &str,
        id: i64,
        sequence: u64,
        lsn: u64,
        keys: &dyn KeyProvider,
    ) -> Vec<u8> {
        let t = |s: String| Value::Text(Bytes::from(s));
        let mut enc = Encoder::new();
        let rel = accounts();
        enc.relation(&rel, &[]);
        for ev in [
            TxEvent::Begin {
                final_lsn: Lsn(lsn),
                commit_time_us: 0,
                xid: 1,
            },
            TxEvent::Row(RowChange {
                relation: rel.clone(),
                op: RowOp::Insert {
                    new: vec![
                        t(tenant.into()),
                        t(id.to_string()),
                        t("crafted".into()),
                        Value::Null,
                        t("1".into()),
                        Value::Null,
                    ],
                },
            }),
            TxEvent::Commit {
                commit_lsn: Lsn(lsn),
                end_lsn: Lsn(lsn + 8),
                commit_time_us: 0,
            },
        ] {
            enc.event(&ev);
        }
        let body = enc.finish();
        let info = BatchInfo {
            tenant,
            sequence,
            first_lsn: Lsn(lsn),
            last_lsn: Lsn(lsn + 8),
            events: 1,
        };
        let c = Compression {
            algorithm: Algorithm::Zstd,
            level: 3,
            min_size_bytes: 0,
            dictionary: None,
        };
        seal::seal(&info, &body, &c, keys).expect("seal").bytes
    }
}

fn keys_dir(root: &Path, files: &[(&str, &str)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    for (name, hex) in files {
        let dir = root.join(TENANT);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let p = dir.join(name);
        std::fs::write(&p, hex).expect("key");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    root.to_path_buf()
}

async fn account_ids(env: &Env) -> Vec<i64> {
    env.dst()
        .await
        .query(
            "SELECT id FROM accounts WHERE tenant_id = $1 ORDER BY id",
            &[&TENANT],
        )
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apply_node_refuses_plaintext_foreign_certificates_tampering_replays_other_tenants_and_retired_keys(
) {
    use heliosdb_tenant_replication::config::{Mode, TransportConfig};
    use heliosdb_tenant_replication::seal::FileKeys;
    use heliosdb_tenant_replication::transport::client::ApplyClient;
    use heliosdb_tenant_replication::transport::SessionRequest;

    let (env, _local) = Env::provisioned(SCHEMA).await;
    let split = split_configs(&env, 1000);
    let dir = env.dir.path();
    // The apply node's keys: "a-old" retired, "b-new" current.
    let (old_hex, new_hex) = ("11".repeat(32), "22".repeat(32));
    let apply_keys = keys_dir(
        &dir.join("apply-keys"),
        &[("a-old.retired", &old_hex), ("b-new.key", &new_hex)],
    );
    let apply_text = std::fs::read_to_string(&split.apply).expect("apply config");
    let apply_text = apply_text.replace(
        &format!("key_file = \"{}\"", dir.join("tenant.key").display()),
        &format!("key_file = \"{}\"", apply_keys.display()),
    );
    // How long a batch waits for the one before it.
    let apply_text = apply_text.replace(
        "request_timeout_seconds = 30",
        "request_timeout_seconds = 3",
    );
    let audit_path = dir.join("audit.log");
    let apply_text = apply_text.replace(
        "[monitoring]\n",
        &format!(
            "[monitoring]\nenable_audit_log = true\naudit_log_path = \"{}\"\n",
            audit_path.display()
        ),
    );
    let apply_config = env.write_config("apply.toml", &apply_text);
    let (metrics_port, _) = monitoring_ports(&apply_config);
    let mut apply = start(&apply_config, &env, "apply");

    let client_for = |cert: &pki::Pair, ca: &Path| {
        ApplyClient::new(
            &TransportConfig {
                mode: Mode::Capture,
                apply_url: Some(format!("https://127.0.0.1:{}", split.port)),
                listen_address: None,
                ca_file: Some(ca.to_path_buf()),
                cert_file: Some(cert.cert.clone()),
                key_file: Some(cert.key.clone()),
                request_timeout: Duration::from_secs(20),
            },
            Duration::from_secs(5),
        )
        .expect("client")
    };
    let good_cert = pki::Pair {
        cert: dir.join("capture-node.pem"),
        key: dir.join("capture-node.key"),
    };
    let mut client = client_for(&good_cert, &dir.join("ca.pem"));
    let request = SessionRequest {
        source_system_id: {
            let row = env
                .src()
                .await
                .query_one(
                    "SELECT system_identifier::text FROM pg_control_system()",
                    &[],
                )
                .await
                .expect("system id");
            row.get(0)
        },
        slot: "tenant_123_slot".into(),
        capture_node: "test".into(),
    };
    // Wait for the node to listen.
    let mut session = None;
    for _ in 0..200 {
        match client.session(TENANT, &request).await {
            Ok(s) => {
                session = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let session = session.unwrap_or_else(|| panic!("no session:\n{}", apply.log()));
    let mut seq = session.next_sequence;

    // Sessions for another source are refused without naming either
    // source's identity, and leave the current session streaming (the
    // batches below are sent in it).
    let foreign = SessionRequest {
        source_system_id: "7000000000000000001".into(),
        ..request.clone()
    };
    for _ in 0..3 {
        let e = client
            .session(TENANT, &foreign)
            .await
            .expect_err("a session for another source")
            .to_string();
        assert!(e.contains("another source cluster"), "{e}");
        assert!(
            !e.contains(&request.source_system_id) && !e.contains(&foreign.source_system_id),
            "{e}"
        );
    }

    // Plaintext HTTP gets no HTTP answer.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", split.port))
            .await
            .expect("connect");
        tcp.write_all(b"POST /v1/tenants/tenant-123/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            .await
            .expect("write");
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
        assert!(
            !buf.starts_with(b"HTTP/"),
            "plaintext was answered: {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
    // A client certificate from another CA is refused during the handshake.
    let rogue_ca = pki::ca(dir, "rogue-ca");
    let rogue = pki::leaf(dir, &rogue_ca, "rogue-node", &["DNS:rogue.test"]);
    let err = client_for(&rogue, &dir.join("ca.pem"))
        .session(TENANT, &request)
        .await
        .expect_err("rogue certificate accepted");
    assert!(
        err.to_string().contains("TLS") || err.to_string().contains("transport"),
        "{err}"
    );
    // Memory stays bounded whatever a client of the CA sends: a body over
    // the limit, or without a length, is refused unread; bodies beyond the
    // budget for all of them wait, then are refused; a stalled body times out.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tls = heliosdb_tenant_replication::transport::tls::client_config(&TransportConfig {
            mode: Mode::Capture,
            apply_url: None,
            listen_address: None,
            ca_file: Some(dir.join("ca.pem")),
            cert_file: Some(good_cert.cert.clone()),
            key_file: Some(good_cert.key.clone()),
            request_timeout: Duration::from_secs(20),
        })
        .expect("tls");
        let open = |head: String| {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", split.port))
                    .await
                    .expect("connect");
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
                let mut s = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await
                    .expect("handshake");
                s.write_all(head.as_bytes()).await.expect("head");
                s
            }
        };
        let answer = |mut s: tokio_rustls::client::TlsStream<tokio::net::TcpStream>| async move {
            let mut buf = vec![0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf))
                .await
                .expect("an answer in time")
                .unwrap_or(0);
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        let head = |len: Option<u64>| {
            format!(
                "POST /v1/tenants/{TENANT}/batches HTTP/1.1\r\nHost: localhost\r\nx-heliosdb-session: x\r\n{}\r\n",
                len.map(|n| format!("Content-Length: {n}\r\n")).unwrap_or_default()
            )
        };
        let too_large = answer(open(head(Some(1 << 30))).await).await;
        assert!(too_large.starts_with("HTTP/1.1 413"), "{too_large}");
        let no_length = answer(open(head(None)).await).await;
        assert!(no_length.starts_with("HTTP/1.1 411"), "{no_length}");
        // Two bodies of 200 MB fill the budget (two of the largest batch);
        // a third waits a second for room, then is refused; each sends 1 MB
        // and stalls, until the request timeout (3 s here).
        let mut stalled = Vec::new();
        for _ in 0..3 {
            let mut s = open(head(Some(200 << 20))).await;
            s.write_all(&vec![b'x'; 1 << 20])
                .await
                .expect("part of a body");
            stalled.push(s);
        }
        let answers = futures_util::future::join_all(stalled.into_iter().map(answer)).await;
        assert_eq!(
            answers
                .iter()
                .filter(|a| a.starts_with("HTTP/1.1 503"))
                .count(),
            1,
            "{answers:?}"
        );
        assert_eq!(
            answers
                .iter()
                .filter(|a| a.starts_with("HTTP/1.1 408"))
                .count(),
            2,
            "{answers:?}"
        );
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", apply.pid())).expect("status");
        let rss_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        assert!(rss_kb < 200_000, "apply node peak RSS {rss_kb} kB");
    }

    // The capture node refuses an apply node whose certificate another CA signed.
    let err = client_for(&good_cert, &rogue_ca.cert)
        .session(TENANT, &request)
        .await
        .expect_err("apply node with a foreign certificate accepted");
    assert!(err.to_string().contains("certificate"), "{err}");

    let current = FileKeys::from_dir(&keys_dir(
        &dir.join("capture-keys"),
        &[("b-new.key", &new_hex)],
    ))
    .expect("keys");
    let lsn = 0x100_0000_0000;
    // A good batch applies.
    let ok = client
        .batch(
            TENANT,
            &session.session,
            crafted::batch(TENANT, 1, seq, lsn, &current).into(),
        )
        .await
        .expect("good batch");
    assert_eq!(ok.committed_end_lsn, Some(lsn + 8));
    assert_eq!(account_ids(&env).await, vec![1]);

    // Replay: a batch with a sequence already applied.
    let err = client
        .batch(
            TENANT,
            &session.session,
            crafted::batch(TENANT, 2, seq, lsn + 100, &current).into(),
        )
        .await
        .expect_err("replay accepted");
    assert!(err.to_string().contains("replayed"), "{err}");
    seq += 1;
    // One flipped bit in the body.
    let mut tampered = crafted::batch(TENANT, 3, seq, lsn + 200, &current);
    let last = tampered.len() - 20;
    tampered[last] ^= 0x04;
    let err = client
        .batch(TENANT, &session.session, tampered.into())
        .await
        .expect_err("tampered batch accepted");
    assert!(err.to_string().contains("authentication"), "{err}");
    // Another tenant's batch offered as this tenant's.
    let other_dir = dir.join("other-keys");
    std::fs::create_dir_all(other_dir.join("tenant-456")).expect("mkdir");
    let other_key = other_dir.join("tenant-456").join("b-new.key");
    std::fs::write(&other_key, &new_hex).expect("key");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&other_key, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    let other = FileKeys::from_dir(&other_dir).expect("keys");
    let err = client
        .batch(
            TENANT,
            &session.session,
            crafted::batch("tenant-456", 4, seq, lsn + 300, &other).into(),
        )
        .await
        .expect_err("cross-tenant batch accepted");
    assert!(err.to_string().contains("tenant-456"), "{err}");
    // A batch sealed with the retired key.
    let retired = FileKeys::from_dir(&keys_dir(&dir.join("old-keys"), &[("a-old.key", &old_hex)]))
        .expect("keys");
    let err = client
        .batch(
            TENANT,
            &session.session,
            crafted::batch(TENANT, 5, seq, lsn + 400, &retired).into(),
        )
        .await
        .expect_err("retired key accepted");
    assert!(err.to_string().contains("retired"), "{err}");
    // A tenant this node does not serve.
    let err = client
        .session("tenant-999", &request)
        .await
        .expect_err("unknown tenant accepted");
    assert!(err.to_string().contains("not served"), "{err}");
    // Nothing of the refused batches was applied; the session still works.
    assert_eq!(account_ids(&env).await, vec![1]);
    client
        .batch(
            TENANT,
            &session.session,
            crafted::batch(TENANT, 6, seq, lsn + 500, &current).into(),
        )
        .await
        .expect("good batch after refusals");
    assert_eq!(account_ids(&env).await, vec![1, 6]);

    // Every refusal is counted by type, and recorded in the audit log.
    let (status, metrics) = http_get(metrics_port, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    for (error_type, at_least) in [
        ("envelope_replay", 1.0),
        ("envelope_authentication", 1.0),
        ("envelope_cross_tenant", 1.0),
        ("key", 1.0),
        ("unknown_tenant", 1.0),
        ("transport_tls", 2.0),
    ] {
        let n = metric_value(
            &metrics,
            "heliosdb_replication_errors_total",
            &[
                "tenant_id=\"tenant-123\"",
                &format!("error_type=\"{error_type}\""),
            ],
        )
        .unwrap_or(0.0);
        assert!(n >= at_least, "{error_type}: {n}\n{metrics}");
    }
    assert!(
        metric_value(
            &metrics,
            "heliosdb_replication_events_total",
            &["table=\"public.accounts\""]
        ) == Some(2.0),
        "{metrics}"
    );
    let audit = std::fs::read_to_string(&audit_path).expect("audit log");
    assert!(
        audit.contains("\"event_type\":\"error\"") && audit.contains("envelope_replay"),
        "{audit}"
    );

    // After a kill -9 of the apply node, the applied sequence is still known.
    apply.kill9();
    let mut apply = start(&apply_config, &env, "apply");
    let mut again = None;
    for _ in 0..200 {
        match client.session(TENANT, &request).await {
            Ok(s) => {
                again = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let again = again.unwrap_or_else(|| panic!("no session after restart:\n{}", apply.log()));
    assert_eq!(again.next_sequence, seq + 1);
    assert_eq!(again.progress.as_ref().map(|p| p.end_lsn), Some(lsn + 508));
    let err = client
        .batch(
            TENANT,
            &again.session,
            crafted::batch(TENANT, 7, seq, lsn + 600, &current).into(),
        )
        .await
        .expect_err("replay after restart accepted");
    assert!(err.to_string().contains("replayed"), "{err}");
    assert_eq!(account_ids(&env).await, vec![1, 6]);

    // Two batches on the wire on two connections, the later one first: it
    // waits for its predecessor, and both apply in sequence order.
    let mut second = client_for(&good_cert, &dir.join("ca.pem"));
    let later = {
        let (session, batch) = (
            again.session.clone(),
            crafted::batch(TENANT, 9, seq + 2, lsn + 800, &current),
        );
        tokio::spawn(async move { second.batch(TENANT, &session, batch.into()).await })
    };
    wait_until(Duration::from_secs(10), "the later batch waits", || async {
        apply
            .log()
            .contains(&format!("batch {} waits for batch {}", seq + 2, seq + 1))
    })
    .await;
    assert!(!later.is_finished(), "the later batch was answered first");
    let earlier = client
        .batch(
            TENANT,
            &again.session,
            crafted::batch(TENANT, 8, seq + 1, lsn + 700, &current).into(),
        )
        .await
        .expect("earlier batch");
    assert_eq!(earlier.committed_end_lsn, Some(lsn + 708));
    let later = later.await.expect("task").expect("later batch");
    assert_eq!(later.committed_end_lsn, Some(lsn + 808));
    assert_eq!(account_ids(&env).await, vec![1, 6, 8, 9]);
    // A batch whose predecessor never comes is refused once the wait ends
    // (the capture node then starts a new session); nothing of it applies.
    let err = client
        .batch(
            TENANT,
            &again.session,
            crafted::batch(TENANT, 11, seq + 4, lsn + 1000, &current).into(),
        )
        .await
        .expect_err("a batch after a gap was applied");
    assert!(err.to_string().contains("did not"), "{err}");
    assert_eq!(account_ids(&env).await, vec![1, 6, 8, 9]);

    let log = apply.log() + &std::fs::read_to_string(dir.join("apply.log")).unwrap_or_default();
    for word in [
        "envelope_replay",
        "envelope_authentication",
        "envelope_cross_tenant",
        "key",
        "unknown_tenant",
        "transport_tls",
    ] {
        assert!(log.contains(word), "{word} not logged:\n{log}");
    }
    assert!(
        !log.contains(&new_hex) && !log.contains(&old_hex),
        "a key reached the log"
    );
    let (status, _) = apply.terminate();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trained_dictionary_compresses_small_batches_on_both_nodes_and_a_missing_one_is_named() {
    let (env, local) = Env::provisioned(SCHEMA).await;
    let src = env.src().await;
    src.batch_execute(
        "INSERT INTO orders SELECT 'tenant-123', g, g % 50, 'paid', g * 1.5, jsonb_build_object('sku', 'SKU-' || (g % 300), 'qty', g % 7), now() FROM generate_series(1, 3000) g",
    )
    .await
    .expect("rows");
    let dict = env.dir.path().join("tenant.dict");
    let out = run(
        &local,
        &["train-dictionary", "--out", dict.to_str().expect("utf8")],
    );
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("dictionary_path"), "{}", out.stdout);
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&dict).expect("dictionary written");
        assert_eq!(
            meta.mode() & 0o077,
            0,
            "the dictionary holds tenant data: mode 600"
        );
        assert!(meta.len() > 1000);
    }

    let split = split_configs(&env, 1000);
    let with_dict = |p: &Path| {
        let text = std::fs::read_to_string(p).expect("config")
            + &format!("\n[compression]\nalgorithm = \"zstd\"\nlevel = 3\nmin_size_bytes = 0\ndictionary_path = \"{}\"\n", dict.display());
        std::fs::write(p, text).expect("write");
    };
    with_dict(&split.capture);
    let plain_apply = std::fs::read_to_string(&split.apply).expect("config");
    with_dict(&split.apply);
    let mut apply = start(&split.apply, &env, "apply");
    let capture = start(&split.capture, &env, "capture");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &capture).await;
    for i in 0..20 {
        src.batch_execute(&format!(
            "UPDATE orders SET status = 'shipped-{i}' WHERE tenant_id = 'tenant-123' AND id % 20 = {i}"
        ))
        .await
        .expect("update");
    }
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &capture).await;

    // An apply node without the dictionary names what is missing.
    apply.kill9();
    std::fs::write(&split.apply, plain_apply).expect("write");
    let _apply = start(&split.apply, &env, "apply-plain");
    src.batch_execute(
        "UPDATE orders SET status = 'late' WHERE tenant_id = 'tenant-123' AND id < 10",
    )
    .await
    .expect("update");
    let log = env.dir.path().join("capture.log");
    wait_until(
        Duration::from_secs(60),
        "the capture node to report the missing dictionary",
        || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("set [compression] dictionary_path")
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_transactions_cross_the_split_and_survive_kill_9_of_either_node() {
    let (env, _local) = Env::provisioned(SCHEMA).await;
    stream_large_transactions(&env).await;
    let configs = split_configs(&env, 500);
    let mut apply = start(&configs.apply, &env, "apply");
    let mut capture = start(&configs.capture, &env, "capture");
    let lane = "a streamed transaction opens its own target transaction";

    // Applied on the apply node while it runs; then the apply node dies.
    let t1 = env.src().await;
    open_large_transaction(&t1).await;
    wait_for_log(&apply, lane, Duration::from_secs(30)).await;
    apply.kill9();
    apply = start(&configs.apply, &env, "apply");
    // Small transactions commit around it; then the capture node dies.
    let small = env.src().await;
    small
        .batch_execute(
            "INSERT INTO accounts SELECT 'tenant-123', g, 'n', 'e', g, now() FROM generate_series(1, 50) g",
        )
        .await
        .expect("small transactions");
    wait_tenant_equal(&env, &["accounts"], Duration::from_secs(60), &capture).await;
    capture.kill9();
    capture = start(&configs.capture, &env, "capture");
    let t2 = env.src().await;
    open_doomed_transaction(&t2).await;
    t2.batch_execute("ROLLBACK").await.expect("T2 rollback");
    finish_large_transaction(&t1).await;

    wait_tenant_equal(&env, &TABLES, Duration::from_secs(90), &capture).await;
    assert_large_transaction_outcome(&env).await;
    assert!(
        streamed_txns(&env, "tenant_123_slot").await >= 1,
        "the source did not stream the large transaction"
    );
    drop(apply); // both nodes stop when dropped
}

/// A backlog reaches the apply node in few full batches (each a seal, a
/// request and a target commit), not one per source commit whenever the
/// capture node's queue runs empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_crosses_the_split_in_few_full_batches() {
    let (env, _local) = Env::provisioned(SCHEMA).await;
    let configs = split_configs(&env, 1000);
    let src = env.src().await;
    make_backlog(&src, 1, 400).await;
    let _apply = start(&configs.apply, &env, "apply");
    let capture = start(&configs.capture, &env, "capture");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &capture).await;
    let batches: i64 = env
        .dst()
        .await
        .query_one(
            "SELECT batch_sequence FROM heliosdb_replication.progress WHERE tenant_id = $1",
            &[&TENANT],
        )
        .await
        .expect("progress")
        .get(0);
    assert!(
        (1..=10).contains(&batches),
        "400 source transactions went in {batches} batches\n{}",
        capture.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tenant_moves_the_slot_through_the_apply_node_and_a_restart_finds_no_gap() {
    let (env, _local) = Env::provisioned(SCHEMA).await;
    let configs = split_configs(&env, 1000);
    let _apply = start(&configs.apply, &env, "apply");
    let mut capture = start(&configs.capture, &env, "capture");
    let src = env.src().await;
    // Only another tenant writes: the slot moves, and the target records
    // where before it is acknowledged there.
    let after = other_tenant_writes(&src).await;
    let dst = env.dst().await;
    wait_slot_confirmed(&src, &after).await;
    let covered: bool = dst
        .query_one(
            "SELECT p.end_lsn >= $1::text::pg_lsn FROM heliosdb_replication.progress p WHERE tenant_id = $2",
            &[&after, &TENANT],
        )
        .await
        .expect("progress")
        .get(0);
    assert!(covered, "the slot passed what the target recorded");
    // A restart of the capture node resumes (no gap), and the tenant's rows flow.
    capture.kill9();
    let capture = start(&configs.capture, &env, "capture-again");
    src.batch_execute("INSERT INTO accounts VALUES ('tenant-123', 1, 'after idle', 'e', 1, now())")
        .await
        .expect("row");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &capture).await;
    assert!(
        !capture.log().contains("never replicated"),
        "{}",
        capture.log()
    );
}

/// An `apply_url` that names a plain-HTTP port (here the capture node's own
/// health port, the mistake a port collision or a copied config makes)
/// is named as such, not as a corrupt message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_url_that_is_not_an_apply_node_is_named() {
    let (env, _local) = Env::provisioned(SCHEMA).await;
    let configs = split_configs(&env, 1000);
    let (_, health) = monitoring_ports(&configs.capture);
    let text = std::fs::read_to_string(&configs.capture)
        .expect("capture config")
        .replace(
            &format!("127.0.0.1:{}", configs.port),
            &format!("127.0.0.1:{health}"),
        );
    let capture = start(
        &env.write_config("capture-wrong.toml", &text),
        &env,
        "capture",
    );
    wait_for_log(
        &capture,
        "the server does not speak TLS",
        Duration::from_secs(20),
    )
    .await;
    assert!(
        capture.log().contains("not a monitoring port"),
        "{}",
        capture.log()
    );
}

/// Node files of several tenants on both sides (#20): a capture node file
/// lists two tenants, each with its own slot and key; an apply node file
/// lists the same two on one listener, each with its own key. Both tenants
/// replicate, an apply node killed with `kill -9` loses and doubles
/// nothing for either, each node's `/health` shows both, and a third
/// tenant's rows reach neither node's target. A tenant the apply node does
/// not list is refused; added to its file by a reload it streams, removed
/// by another it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capture_and_apply_nodes_serve_several_tenants_each_with_its_own_key() {
    let env = Env::new(SCHEMA).await;
    let dir = env.dir.path();
    let ca = pki::ca(dir, "ca");
    let apply_cert = pki::leaf(dir, &ca, "apply-node", &["DNS:localhost", "IP:127.0.0.1"]);
    let capture_cert = pki::leaf(dir, &ca, "capture-node", &["DNS:capture.test"]);
    let keys: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|k| key_file(&dir.join(format!("tenant-{k}.key"))))
        .collect();
    let tenants = [
        ("tenant-123", "tenant_123", &keys[0]),
        ("tenant-456", "tenant_456", &keys[1]),
    ];
    let port = pgcluster::free_port().expect("port");
    let entries = |with_slot: bool, only: Option<&str>| -> String {
        tenants
            .iter()
            .filter(|(id, _, _)| only.is_none_or(|o| o == *id))
            .map(|(id, slot, key)| {
                let cdc = if with_slot {
                    format!("[tenants.cdc]\nreplication_slot = \"{slot}_slot\"\npublication_name = \"{slot}_pub\"\n")
                } else {
                    String::new()
                };
                format!(
                    "\n[[tenants]]\n[tenants.replication]\ntenant_id = \"{id}\"\n{cdc}[tenants.encryption]\nkey_file = \"{}\"\n",
                    key.display()
                )
            })
            .collect()
    };
    let transport = |mode: &str, pair: &pki::Pair, line: &str| {
        format!(
            "\n[transport]\nmode = \"{mode}\"\n{line}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            ca.cert.display(),
            pair.cert.display(),
            pair.key.display()
        )
    };
    // Provisioned from a one-process file of the same tenants.
    let local = env.node_file_top().replace(
        "[replication]\n",
        &format!(
            "[replication]\ntarget_connection = \"{}\"\n",
            env.target.superuser_url("app")
        ),
    ) + &entries(true, None)
        .replace(
            &format!(
                "[tenants.encryption]\nkey_file = \"{}\"\n",
                keys[0].display()
            ),
            "",
        )
        .replace(
            &format!(
                "[tenants.encryption]\nkey_file = \"{}\"\n",
                keys[1].display()
            ),
            "",
        );
    let local = env.write_config("local.toml", &local);
    env.init(&local);

    let capture = env.node_file_top()
        + &transport(
            "capture",
            &capture_cert,
            &format!("apply_url = \"https://127.0.0.1:{port}\""),
        )
        + &entries(true, None);
    let capture = env.write_config("capture.toml", &capture);
    let apply_top = without(&env.node_file_top(), "source_connection").replace(
        "[replication]\n",
        &format!(
            "[replication]\ntarget_connection = \"{}\"\n",
            env.target.superuser_url("app")
        ),
    ) + &transport(
        "apply",
        &apply_cert,
        &format!("listen_address = \"127.0.0.1:{port}\""),
    );
    // The apply node starts with tenant-123 only.
    let apply = env.write_config(
        "apply.toml",
        &(apply_top.clone() + &entries(false, Some("tenant-123"))),
    );

    let src = env.src().await;
    src.batch_execute(
        "INSERT INTO accounts SELECT 'tenant-123', g, 'a', 'a@x', g, now() FROM generate_series(1, 400) g;
         INSERT INTO accounts SELECT 'tenant-456', g, 'b', 'b@x', g, now() FROM generate_series(1, 300) g;
         INSERT INTO accounts SELECT 'tenant-789', g, 'c', 'c@x', g, now() FROM generate_series(1, 200) g",
    )
    .await
    .expect("rows");
    let mut apply_node = start(&apply, &env, "apply");
    let capture_node = start(&capture, &env, "capture");
    let dst = env.dst().await;
    // tenant-456 is not served yet: its capture node is refused and the
    // tenant stops alone (a person adds it to the apply node).
    wait_for_log(
        &capture_node,
        "is not served by this apply node",
        Duration::from_secs(60),
    )
    .await;
    wait_until(Duration::from_secs(60), "tenant-123 equal", || async {
        let mut all = true;
        for table in TABLES {
            all &= tenant_digest(&src, table, "tenant-123").await
                == tenant_digest(&dst, table, "tenant-123").await;
        }
        all
    })
    .await;
    assert_eq!(tenant_count(&dst, "accounts", "tenant-456").await, 0);
    // Added to the apply node by a reload; the capture node's stopped
    // tenant starts again with its reload.
    std::fs::write(&apply, apply_top.clone() + &entries(false, None)).expect("apply file");
    apply_node.reload();
    wait_for_log(
        &apply_node,
        "tenant added: streaming",
        Duration::from_secs(30),
    )
    .await;
    capture_node.reload();
    let equal = |tenant: &'static str| {
        let (src, dst) = (&src, &dst);
        async move {
            for table in TABLES {
                if tenant_digest(src, table, tenant).await
                    != tenant_digest(dst, table, tenant).await
                {
                    return false;
                }
            }
            true
        }
    };
    wait_until(Duration::from_secs(60), "both tenants equal", || async {
        equal("tenant-123").await && equal("tenant-456").await
    })
    .await;

    // kill -9 of the apply node while both write.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(workload(env.source.superuser_url("app"), 11, stop.clone()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    apply_node.kill9();
    apply_node = start(&apply, &env, "apply");
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(writer.await.expect("writer") > 5);
    wait_until(
        Duration::from_secs(90),
        "both tenants equal after kill -9",
        || async { equal("tenant-123").await && equal("tenant-456").await },
    )
    .await;
    assert_eq!(
        tenant_count(&dst, "accounts", "tenant-789").await,
        0,
        "an unserved tenant's rows"
    );

    for config in [&apply, &capture] {
        let (_, health) = monitoring_ports(config);
        let (_, body) = http_get(health, "/health").await.expect("health");
        assert!(
            body.contains("\"tenant-123\"") && body.contains("\"tenant-456\""),
            "{body}"
        );
    }
    // Removed from the apply node: it stops serving the tenant and leaves
    // the slot to the capture side.
    std::fs::write(&apply, apply_top + &entries(false, Some("tenant-456"))).expect("apply file");
    apply_node.reload();
    wait_for_log(
        &apply_node,
        "tenant removed from the apply node",
        Duration::from_secs(30),
    )
    .await;
    assert!(
        !apply_node.log().contains("could not be dropped"),
        "{}",
        apply_node.log()
    );
    for mut node in [capture_node, apply_node] {
        let (status, _) = node.terminate();
        assert!(status.success(), "{}", node.log());
    }
}

/// A capture node whose tenants share one slot (#20): the source decodes
/// once (one walsender) for both, the capture node routes each change to
/// its tenant's shipper and key, the apply node applies both; `kill -9` of
/// the capture node loses and doubles nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_capture_node_reads_one_shared_slot_for_its_tenants() {
    let env = Env::new(SCHEMA).await;
    let dir = env.dir.path();
    let ca = pki::ca(dir, "ca");
    let apply_cert = pki::leaf(dir, &ca, "apply-node", &["DNS:localhost", "IP:127.0.0.1"]);
    let capture_cert = pki::leaf(dir, &ca, "capture-node", &["DNS:capture.test"]);
    let port = pgcluster::free_port().expect("port");
    let tenants = ["tenant-123", "tenant-456"];
    let keys: Vec<PathBuf> = tenants
        .iter()
        .map(|t| key_file(&dir.join(format!("{t}.key"))))
        .collect();
    let shared = |top: String| {
        top.replace(
            "[cdc]\n",
            "[cdc]\nreplication_slot = \"node_slot\"\npublication_name = \"node_pub\"\n",
        )
    };
    let entries = |with_keys: bool| -> String {
        tenants
            .iter()
            .zip(&keys)
            .map(|(t, k)| {
                let key = if with_keys {
                    format!("[tenants.encryption]\nkey_file = \"{}\"\n", k.display())
                } else {
                    String::new()
                };
                format!("\n[[tenants]]\n[tenants.replication]\ntenant_id = \"{t}\"\n{key}")
            })
            .collect()
    };
    let transport = |mode: &str, pair: &pki::Pair, line: &str| {
        format!(
            "\n[transport]\nmode = \"{mode}\"\n{line}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            ca.cert.display(),
            pair.cert.display(),
            pair.key.display()
        )
    };
    let with_target = |top: String| {
        top.replace(
            "[replication]\n",
            &format!(
                "[replication]\ntarget_connection = \"{}\"\n",
                env.target.superuser_url("app")
            ),
        )
    };
    let local = env.write_config(
        "local.toml",
        &(with_target(shared(env.node_file_top())) + &entries(false)),
    );
    env.init(&local);
    let capture = env.write_config(
        "capture.toml",
        &(shared(env.node_file_top())
            + &transport(
                "capture",
                &capture_cert,
                &format!("apply_url = \"https://127.0.0.1:{port}\""),
            )
            + &entries(true)),
    );
    let apply = env.write_config(
        "apply.toml",
        &(with_target(without(&env.node_file_top(), "source_connection"))
            + &transport(
                "apply",
                &apply_cert,
                &format!("listen_address = \"127.0.0.1:{port}\""),
            )
            + &entries(true)),
    );
    let src = env.src().await;
    let dst = env.dst().await;
    let both_equal = || async {
        for t in tenants {
            for table in TABLES {
                if tenant_digest(&src, table, t).await != tenant_digest(&dst, table, t).await {
                    return false;
                }
            }
        }
        true
    };
    let apply_node = start(&apply, &env, "apply");
    let mut capture_node = start(&capture, &env, "capture");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(workload(env.source.superuser_url("app"), 5, stop.clone()));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let senders: i64 = src
        .query_one("SELECT count(*) FROM pg_stat_replication", &[])
        .await
        .expect("walsenders")
        .get(0);
    assert_eq!(
        senders,
        1,
        "one decode for both tenants: {}",
        capture_node.log()
    );
    capture_node.kill9();
    capture_node = start(&capture, &env, "capture");
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(writer.await.expect("writer") > 5);
    wait_until(Duration::from_secs(90), "both tenants equal", both_equal).await;
    // The workload's third tenant is served by no node: none of its rows.
    for table in TABLES {
        assert_eq!(tenant_count(&dst, table, "tenant-789").await, 0, "{table}");
    }
    assert!(
        capture_node
            .log()
            .contains("streaming from the shared slot to the apply node"),
        "{}",
        capture_node.log()
    );
    for mut node in [capture_node, apply_node] {
        let (status, _) = node.terminate();
        assert!(status.success(), "{}", node.log());
    }
}
