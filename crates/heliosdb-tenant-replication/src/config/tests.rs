use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

/// §10.1 of the deployment guide, verbatim.
const REFERENCE: &str = r#"
[replication]
tenant_id = "tenant-123"                     # Unique tenant identifier
source_connection = "postgresql://heliosdb_replication:s3cret-src@source:5432/production"
target_connection = "postgresql://heliosdb_writer:s3cret-dst@target:5432/replica"
[features]
enable_cdc = true                            # Change Data Capture
enable_compression = true                    # Data compression
enable_encryption = true                     # Data encryption
enable_monitoring = true                     # Prometheus metrics
enable_semantic_resolution = false           # AI-powered conflict resolution
enable_predictive_replication = false        # ML-based prioritization
[cdc]
replication_slot = "tenant_123_slot"         # PostgreSQL replication slot
publication_name = "tenant_123_pub"          # PostgreSQL publication
batch_size = 1000                            # Events per batch
checkpoint_interval = 1000                   # Events between checkpoints
wal_path = "/var/lib/heliosdb/wal"           # WAL storage path
start_lsn = 0                                # Starting LSN (0 = from beginning)
[compression]
algorithm = "zstd"                           # zstd, snappy, lz4, gzip
level = 3                                    # 1 (fast) to 22 (max compression)
min_size_bytes = 512                         # Don't compress events < 512 bytes
dictionary_path = "/var/lib/heliosdb/dict"   # Compression dictionary
[encryption]
algorithm = "aes256gcm"                      # AES-256-GCM (recommended)
key_file = "/etc/heliosdb/key.txt"           # Encryption key file
kms_key_arn = "arn:aws:kms:..."              # AWS KMS key (alternative)
key_rotation_days = 90                       # Rotate keys every 90 days
[conflict]
resolution_strategy = "VectorClock"          # LastWriteWins, SourcePreferred, TargetPreferred, VectorClock
log_conflicts = true                         # Log conflicts to file
conflict_log_path = "/var/log/heliosdb/conflicts.log"
[monitoring]
prometheus_port = 9090                       # Prometheus metrics port
health_check_port = 8080                     # Health check endpoint port
metrics_interval_seconds = 10                # Metrics collection interval
enable_audit_log = true                      # Enable audit logging
audit_log_path = "/var/log/heliosdb/audit.log"
[performance]
max_throughput_events_per_sec = 10000        # Target throughput
target_replication_lag_seconds = 5           # Target replication lag
buffer_size_events = 10000                   # Event buffer size
worker_threads = 4                           # Number of worker threads
batch_timeout_ms = 100                       # Batch collection timeout
[network]
tcp_keepalive_seconds = 30                   # TCP keepalive interval
connection_pool_size = 10                    # Database connection pool size
connect_timeout_seconds = 10                 # Connection timeout
read_timeout_seconds = 60                    # Read timeout
retry_max_attempts = 3                       # Max retry attempts
retry_backoff_ms = 1000                      # Retry backoff (exponential)
"#;

#[test]
fn every_key_of_the_reference_parses() {
    let c = Config::from_toml(REFERENCE, "replication.toml", no_env).expect("reference parses");
    assert_eq!(c.tenant.tenant_id, "tenant-123");
    assert_eq!(c.tenant.slot, "tenant_123_slot");
    assert_eq!(c.tenant.publication, "tenant_123_pub");
    assert_eq!(c.batch.batch_size, 1000);
    assert_eq!(c.batch.batch_timeout, Duration::from_millis(100));
    assert_eq!(c.worker_threads, 4);
    assert_eq!(c.network.retry_max_attempts, 3);
    assert_eq!(c.batch.max_events_per_sec, Some(10_000), "a cap per tenant");
    assert_eq!(c.tenant.source().expect("source").dbname, "production");
    // Features that are not built yet are reported, not ignored.
    for key in ["[compression]", "[encryption]", "[cdc] wal_path"] {
        assert!(
            c.notices.iter().any(|n| n.key == key),
            "no notice for {key}: {:?}",
            c.notices
        );
    }
    // Monitoring is in effect: the guide's ports and audit log.
    assert!(c.monitoring.enabled);
    assert_eq!(
        (c.monitoring.prometheus_port, c.monitoring.health_check_port),
        (9090, 8080)
    );
    assert_eq!(
        c.monitoring
            .audit_log
            .as_ref()
            .map(|(p, _)| p.display().to_string()),
        Some("/var/log/heliosdb/audit.log".to_string())
    );
    assert!(
        c.tenant.start_lsn.is_zero(),
        "0 = initial copy, then stream"
    );
    assert!(
        !c.notices.iter().any(|n| n.key.contains("start_lsn")),
        "start_lsn = 0 is in effect"
    );
}

#[test]
fn step_five_of_the_quick_start_parses() {
    let text = r#"
[replication]
tenant_id = "tenant-123"
source_connection = "postgresql://heliosdb_replication:secure_password_123@localhost:5432/postgres?sslmode=require"
target_connection = "postgresql://heliosdb_writer:secure_password_456@localhost:5433/replica?sslmode=require"
[features]
enable_cdc = true
enable_compression = true
enable_encryption = true
enable_monitoring = true
[cdc]
replication_slot = "tenant_123_slot"
publication_name = "tenant_123_replication"
batch_size = 1000
checkpoint_interval = 1000
wal_path = "/var/lib/heliosdb/wal"
[compression]
algorithm = "zstd"
level = 3 # 1 (fast) to 22 (max compression)
[encryption]
algorithm = "aes256gcm"
key_file = "/etc/heliosdb/tenant-encryption-key.txt"
[monitoring]
prometheus_port = 9090
health_check_port = 8080
metrics_interval_seconds = 10
[performance]
max_throughput_events_per_sec = 10000
target_replication_lag_seconds = 5
buffer_size_events = 10000
worker_threads = 4
"#;
    let c = Config::from_toml(text, "f.toml", no_env).expect("parses");
    assert_eq!(c.tenant.target().expect("target").port, 5433);
    assert_eq!(c.tenant.source().expect("source").sslmode, SslMode::Require);
    assert_eq!(
        c.tenant.checkpoint_dir,
        PathBuf::from(DEFAULT_CHECKPOINT_DIR)
    );
}

#[test]
fn section_8_2_performance_keys_are_accepted_as_aliases() {
    let text = r#"
[replication]
tenant_id = "t1"
[source]
connection = "postgresql://u@a:5432/db?sslmode=verify-full&sslrootcert=/etc/heliosdb/ca-cert.pem&sslcert=/etc/heliosdb/client-cert.pem&sslkey=/etc/heliosdb/client-key.pem"
[target]
connection = "postgresql://u@b:5432/db?sslmode=verify-full&sslrootcert=/etc/heliosdb/ca-cert.pem"
[performance]
max_throughput_events_per_sec = 15000
buffer_size_events = 20000
worker_threads = 16
batch_size = 2000
batch_timeout_ms = 50
checkpoint_interval = 5000
checkpoint_async = true
compression_level = 3
compression_min_size_bytes = 512
tcp_keepalive_seconds = 30
connection_pool_size = 10
connect_timeout_seconds = 10
read_timeout_seconds = 60
"#;
    let c = Config::from_toml(text, "f.toml", no_env).expect("parses");
    assert_eq!(c.batch.batch_size, 2000);
    assert_eq!(c.batch.checkpoint_interval, 5000);
    assert_eq!(
        c.tenant.source().expect("source").sslmode,
        SslMode::VerifyFull
    );
    assert_eq!(c.tenant.slot, "t1_slot");

    let clash = text.replace("[performance]", "[cdc]\nbatch_size = 10\n[performance]");
    let e = Config::from_toml(&clash, "f.toml", no_env).expect_err("contradiction");
    assert!(e.to_string().contains("[performance] batch_size"), "{e}");
}

#[test]
fn unknown_keys_name_the_file_key_and_the_allowed_ones() {
    let text = REFERENCE.replace("batch_size = 1000", "batch_sise = 1000");
    let e = Config::from_toml(&text, "/etc/heliosdb/replication.toml", no_env).expect_err("typo");
    let msg = e.to_string();
    assert!(
        msg.starts_with("/etc/heliosdb/replication.toml: [cdc] batch_sise:"),
        "{msg}"
    );
    assert!(msg.contains("batch_size"), "lists what is allowed: {msg}");
    assert!(msg.contains("line"), "{msg}");
}

#[test]
fn bad_values_are_refused_with_what_is_allowed() {
    let cases = [
        (
            "batch_size = 1000",
            "batch_size = 0",
            "[cdc] batch_size",
            "1 to 100000",
        ),
        (
            "level = 3 ",
            "level = 23 ",
            "[compression] level",
            "1 to 22",
        ),
        (
            "algorithm = \"zstd\"",
            "algorithm = \"brotli\"",
            "[compression] algorithm",
            "zstd, snappy, lz4, gzip",
        ),
        (
            "\"VectorClock\"",
            "\"Newest\"",
            "[conflict] resolution_strategy",
            "LastWriteWins",
        ),
        (
            "replication_slot = \"tenant_123_slot\"",
            "replication_slot = \"Tenant-Slot\"",
            "[cdc] replication_slot",
            "a-z 0-9 _",
        ),
        (
            "worker_threads = 4",
            "worker_threads = -1",
            "[performance] worker_threads",
            "u64",
        ),
        (
            "start_lsn = 0",
            "start_lsn = \"zz\"",
            "[cdc] start_lsn",
            "16/B374D848",
        ),
        (
            "retry_backoff_ms = 1000",
            "retry_backoff_ms = 1",
            "[network] retry_backoff_ms",
            "10 to 600000",
        ),
    ];
    for (from, to, key, allowed) in cases {
        assert!(REFERENCE.contains(from), "fixture has {from}");
        let text = REFERENCE.replace(from, to);
        let e = Config::from_toml(&text, "f.toml", no_env).expect_err(to);
        let msg = e.to_string();
        assert!(msg.contains(key), "{to}: {msg}");
        assert!(msg.contains(allowed), "{to}: {msg}");
    }
}

#[test]
fn environment_overrides_connections() {
    let env = |k: &str| match k {
        "REPLICATION_SOURCE_CONNECTION" => {
            Some("postgresql://envuser:pw@envhost:6000/src".to_string())
        }
        "REPLICATION_TARGET_CONNECTION" => {
            Some("postgresql://envuser:pw@envhost:6001/dst".to_string())
        }
        _ => None,
    };
    let c = Config::from_toml(REFERENCE, "f.toml", env).expect("parses");
    assert_eq!(
        (
            c.tenant.source().expect("source").host.as_str(),
            c.tenant.source().expect("source").port
        ),
        ("envhost", 6000)
    );
    assert_eq!(c.tenant.target().expect("target").port, 6001);

    let minimal = "[replication]\ntenant_id = \"a\"\n";
    let c = Config::from_toml(minimal, "f.toml", env)
        .expect("connections from the environment suffice");
    assert_eq!(c.tenant.target().expect("target").dbname, "dst");
    let e = Config::from_toml(minimal, "f.toml", no_env).expect_err("missing");
    assert!(
        e.to_string().contains("REPLICATION_SOURCE_CONNECTION"),
        "{e}"
    );
}

#[test]
fn effective_config_masks_passwords() {
    let c = Config::from_toml(REFERENCE, "f.toml", no_env).expect("parses");
    let shown = format!("{}\n{:?}", c.render_masked(), c);
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(
        shown.contains("heliosdb_replication:***@source:5432/production"),
        "{shown}"
    );
}

#[test]
fn bad_connection_errors_do_not_echo_the_password() {
    let text = REFERENCE.replace("@target:5432/replica", "@target:notaport/replica");
    let e = Config::from_toml(&text, "f.toml", no_env).expect_err("bad port");
    assert!(!e.to_string().contains("s3cret"), "{e}");
    assert!(
        e.to_string().contains("[replication] target_connection"),
        "{e}"
    );
}

#[test]
fn same_database_on_both_sides_is_refused() {
    let text = REFERENCE.replace("@target:5432/replica", "@source:5432/production");
    let e = Config::from_toml(&text, "f.toml", no_env).expect_err("same db");
    assert!(e.to_string().contains("same database"), "{e}");
}

#[test]
fn no_part_of_a_secret_in_any_config_error() {
    // Through the environment override.
    let env = |k: &str| {
        (k == "REPLICATION_SOURCE_CONNECTION").then(|| "postgresql://canary:Secret/app".to_string())
    };
    let e = Config::from_toml(REFERENCE, "f.toml", env).expect_err("bad override");
    assert!(!e.to_string().contains("Secret"), "{e}");
    assert!(
        e.to_string().contains("REPLICATION_SOURCE_CONNECTION"),
        "{e}"
    );
    // A connection string given to a key of another type.
    let text = REFERENCE.replace(
        "prometheus_port = 9090",
        "prometheus_port = \"postgresql://u:pw-canary@x\"",
    );
    assert_ne!(text, REFERENCE);
    let e = Config::from_toml(&text, "f.toml", no_env).expect_err("wrong type");
    assert!(!e.to_string().contains("pw-canary"), "{e}");
    assert!(e.to_string().contains("prometheus_port"), "{e}");
}

/// A node file: shared sections at the top, one `[[tenants]]` entry each.
const NODE: &str = r#"
[replication]
source_connection = "postgresql://rep:pw@source:5432/production"
[monitoring]
prometheus_port = 9090

[[tenants]]
[tenants.replication]
tenant_id = "acme"
target_connection = "postgresql://w:pw@eu:5432/acme"
[tenants.cdc]
replication_slot = "acme_slot"
publication_name = "acme_pub"
[tenants.conflict]
resolution_strategy = "TargetPreferred"

[[tenants]]
[tenants.replication]
tenant_id = "globex"
target_connection = "postgresql://w:pw@us:5432/globex"
[tenants.cdc]
replication_slot = "globex_slot"
publication_name = "globex_pub"
"#;

#[test]
fn a_node_file_gives_each_tenant_the_shared_sections_and_its_own() {
    let all = Config::node_from_toml(NODE, "node.toml", no_env).expect("valid");
    assert_eq!(all.len(), 2);
    let (acme, globex) = (&all[0], &all[1]);
    assert_eq!(acme.tenant.tenant_id, "acme");
    assert_eq!(acme.tenant.slot, "acme_slot");
    assert_eq!(globex.tenant.publication, "globex_pub");
    assert_eq!(acme.tenant.target().expect("target").host, "eu");
    assert_eq!(globex.tenant.target().expect("target").host, "us");
    // Shared: the source and the node's monitoring.
    assert_eq!(acme.tenant.source().expect("source").host, "source");
    assert_eq!(globex.monitoring.prometheus_port, 9090);
    // Per tenant: its conflict strategy.
    assert_eq!(acme.conflict.strategy, Strategy::TargetPreferred);
    assert_ne!(globex.conflict.strategy, Strategy::TargetPreferred);
    // The guide's one-tenant form is one tenant.
    assert_eq!(
        Config::node_from_toml(REFERENCE, "r.toml", no_env)
            .expect("valid")
            .len(),
        1
    );
}

#[test]
fn a_node_file_refuses_what_would_mix_tenants_up() {
    let fails = |text: &str| {
        Config::node_from_toml(text, "node.toml", no_env)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let twice = NODE.replace("\"globex\"", "\"acme\"");
    assert!(fails(&twice).contains("listed twice"), "{}", fails(&twice));
    let shared_slot = NODE.replace("globex_slot", "acme_slot");
    assert!(
        fails(&shared_slot).contains("share its publication too"),
        "{}",
        fails(&shared_slot)
    );
    let shared_publication = NODE.replace("globex_pub", "acme_pub");
    assert!(
        fails(&shared_publication).contains("share its slot"),
        "{}",
        fails(&shared_publication)
    );
    let node_section = NODE.replace(
        "[tenants.conflict]",
        "[tenants.monitoring]\nprometheus_port = 1\n[tenants.conflict]",
    );
    assert!(
        fails(&node_section).contains("is the node's"),
        "{}",
        fails(&node_section)
    );
    let typo = NODE.replace(
        "publication_name = \"globex_pub\"",
        "publication_nam = \"globex_pub\"",
    );
    let e = fails(&typo);
    assert!(
        e.contains("tenants[1]") && e.contains("publication_nam"),
        "{e}"
    );
    // Secrets stay out of the errors.
    for e in [
        fails(&twice),
        fails(&shared_slot),
        fails(&shared_publication),
        fails(&typo),
    ] {
        assert!(!e.contains("pw@"), "{e}");
    }
}

#[test]
fn tenants_naming_one_slot_share_it() {
    // The file's [cdc] slot and publication, inherited by every entry.
    let shared = NODE
        .replace("replication_slot = \"acme_slot\"\n", "")
        .replace("replication_slot = \"globex_slot\"\n", "")
        .replace("publication_name = \"acme_pub\"\n", "")
        .replace("publication_name = \"globex_pub\"\n", "")
        .replace("[monitoring]", "[cdc]\nreplication_slot = \"node_slot\"\npublication_name = \"node_pub\"\n[monitoring]");
    let all = Config::node_from_toml(&shared, "node.toml", no_env).expect("valid");
    for c in &all {
        assert_eq!(c.tenant.slot, "node_slot");
        assert_eq!(c.tenant.shared_with, ["acme", "globex"]);
        assert!(c.tenant.is_shared());
    }
    // Own slots: nothing shared.
    let own = Config::node_from_toml(NODE, "node.toml", no_env).expect("valid");
    assert!(own.iter().all(|c| !c.tenant.is_shared()));
    // One tenant column per shared slot.
    let at = shared
        .rfind("[tenants.cdc]\n")
        .expect("globex's cdc section")
        + "[tenants.cdc]\n".len();
    let columns = format!(
        "{}tenant_column = \"org_id\"\n{}",
        &shared[..at],
        &shared[at..]
    );
    let e = Config::node_from_toml(&columns, "node.toml", no_env).expect_err("refused");
    assert!(e.to_string().contains("one tenant column"), "{e}");
}

#[test]
fn the_target_override_replaces_only_the_target_tenants_share() {
    let env = |k: &str| {
        (k == "REPLICATION_TARGET_CONNECTION").then(|| "postgresql://w:pw@x/db".to_string())
    };
    // An entry naming its own target would be silently redirected: refused.
    let e = Config::node_from_toml(NODE, "node.toml", env).expect_err("refused");
    assert!(e.to_string().contains("tenants[0]"), "{e}");
    assert!(e.to_string().contains("target of its own"), "{e}");
    assert!(!e.to_string().contains("pw@"), "{e}");
    // Tenants sharing the file's target: the variable replaces it for all
    // (how a container or a Kubernetes Secret keeps the password out of
    // the file).
    let shared = NODE
        .replace(
            "target_connection = \"postgresql://w:pw@eu:5432/acme\"\n",
            "",
        )
        .replace(
            "target_connection = \"postgresql://w:pw@us:5432/globex\"\n",
            "",
        )
        .replacen(
            "[monitoring]",
            "target_connection = \"postgresql://w@placeholder/db\"\n[monitoring]",
            1,
        );
    let all = Config::node_from_toml(&shared, "node.toml", env).expect("valid");
    assert_eq!(all.len(), 2);
    for c in &all {
        assert_eq!(c.tenant.target().expect("target").host, "x");
    }
}

#[test]
fn capture_and_apply_nodes_serve_several_tenants_a_capture_node_shares_a_slot() {
    let split = |mode: &str, line: &str| {
        NODE.replacen(
            "[monitoring]",
            &format!("[encryption]\nkey_file = \"/k\"\n[transport]\nmode = \"{mode}\"\n{line}\nca_file = \"/c\"\ncert_file = \"/c\"\nkey_file = \"/k\"\n[monitoring]"),
            1,
        )
    };
    let capture = split("capture", "apply_url = \"https://apply:8443\"")
        .replace(
            "target_connection = \"postgresql://w:pw@eu:5432/acme\"\n",
            "",
        )
        .replace(
            "target_connection = \"postgresql://w:pw@us:5432/globex\"\n",
            "",
        );
    let all = Config::node_from_toml(&capture, "node.toml", no_env).expect("valid");
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|c| !c.tenant.is_shared()));
    // One slot for both: decoded once on the capture node too.
    let shared = capture
        .replace("globex_slot", "acme_slot")
        .replace("globex_pub", "acme_pub");
    let all = Config::node_from_toml(&shared, "node.toml", no_env).expect("valid");
    assert!(all.iter().all(|c| c.tenant.is_shared()));
    // An apply node reads no slot: a slot named at the top is no sharing.
    let apply = split("apply", "listen_address = \"0.0.0.0:8443\"")
        .replace(
            "source_connection = \"postgresql://rep:pw@source:5432/production\"\n",
            "",
        )
        .replace("globex_slot", "acme_slot")
        .replace("globex_pub", "acme_pub");
    let all = Config::node_from_toml(&apply, "node.toml", no_env).expect("valid");
    assert!(all.iter().all(|c| !c.tenant.is_shared()));
}
