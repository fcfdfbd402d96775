//! Many tenants in one process: a node file with `[[tenants]]` entries, each
//! with its own target database, slot and publication, on real clusters.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use tokio_postgres::Client;

/// Served tenants and the target database of each.
const SERVED: [(&str, &str); 3] = [("t-1", "app"), ("t-2", "app"), ("t-3", "app2")];

/// A node file for [`SERVED`]: the tenant's own keys move into its entry.
fn node_file(env: &Env) -> PathBuf {
    node_file_of(env, &SERVED, "")
}

/// A node file for `tenants` (id, target database); `extra` goes at the top.
fn node_file_of(env: &Env, tenants: &[(&str, &str)], extra: &str) -> PathBuf {
    let shared = env.node_file_top();
    let mut text = extra.to_string() + &shared;
    for &(tenant, db) in tenants {
        let name = tenant.replace('-', "_");
        text.push_str(&format!(
            "\n[[tenants]]\n[tenants.replication]\ntenant_id = \"{tenant}\"\ntarget_connection = \"{}\"\n[tenants.cdc]\nreplication_slot = \"{name}_slot\"\npublication_name = \"{name}_pub\"\n",
            env.target.superuser_url(db)
        ));
    }
    env.write_config("node.toml", &text)
}

/// Clusters with the schema, and a second target database `app2`.
async fn two_targets() -> Env {
    let env = Env::new(SCHEMA).await;
    env.target
        .create_database("app2")
        .await
        .expect("second target database");
    target_of(&env, "app2")
        .await
        .batch_execute(SCHEMA)
        .await
        .expect("schema");
    env
}

/// `tenant`'s rows of `tables` equal on the source and target database `db`.
async fn tenant_equal(env: &Env, tenant: &str, db: &str, tables: &[&str]) -> bool {
    let (src, dst) = (env.src().await, target_of(env, db).await);
    for table in tables {
        if tenant_digest(&src, table, tenant).await != tenant_digest(&dst, table, tenant).await {
            return false;
        }
    }
    true
}

async fn target_of(env: &Env, db: &str) -> Client {
    env.target.connect(db).await.expect("connect target")
}

/// Every served tenant's rows equal on its target.
async fn all_equal(env: &Env) -> bool {
    for (tenant, db) in SERVED {
        if !tenant_equal(env, tenant, db, &TABLES).await {
            return false;
        }
    }
    true
}

async fn write(src: &Client, tenant: &str, from: i64, n: i64) {
    src.batch_execute(&format!(
        "INSERT INTO accounts SELECT '{tenant}', g, 'n' || g, 'e', g, now() FROM generate_series({from}, {}) g;
         INSERT INTO orders SELECT '{tenant}', g, g, 'new', g, '{{}}', now() FROM generate_series({from}, {}) g",
        from + n - 1,
        from + n - 1
    ))
    .await
    .expect("writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_of_one_file_replicate_side_by_side_and_one_that_stops_leaves_the_others_running() {
    let env = two_targets().await;
    let src = env.src().await;
    for (tenant, _) in SERVED {
        write(&src, tenant, 1, 200).await;
    }
    write(&src, "unserved", 1, 200).await;
    let node = node_file(&env);

    // check-config and init cover every tenant.
    let out = run(&node, &["check-config"]);
    let text = &out.stdout;
    assert!(out.status.success(), "{text}");
    for (tenant, _) in SERVED {
        assert!(
            text.contains(&format!("tenant_id = \"{tenant}\"")),
            "{text}"
        );
    }
    let init = env.init(&node);
    for (tenant, _) in SERVED {
        assert!(init.contains(&format!("== tenant {tenant}")), "{init}");
    }
    // A command for one tenant, or one that replaces rows, must name it.
    for args in [&["resync"][..], &["init", "--resync"][..]] {
        let out = run(&node, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stderr.contains("--tenant"), "{}", out.stderr);
    }
    let out = run(&node, &["--tenant", "nobody", "status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.contains("t-1, t-2, t-3"), "{}", out.stderr);

    let mut daemon = Daemon::start(&node, &env.dir.path().join("node.log"));
    wait_until(Duration::from_secs(60), "every tenant copied", || {
        all_equal(&env)
    })
    .await;
    for (tenant, _) in SERVED {
        write(&src, tenant, 1000, 100).await;
    }
    wait_until(Duration::from_secs(60), "every tenant streamed", || {
        all_equal(&env)
    })
    .await;
    // One walsender per tenant, one process; no unserved row anywhere.
    let walsenders: i64 = src
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name LIKE 'heliosdb-tenant-replication/%'",
            &[],
        )
        .await
        .expect("walsenders")
        .get(0);
    assert_eq!(walsenders, 3);
    for db in ["app", "app2"] {
        let dst = target_of(&env, db).await;
        for table in TABLES {
            let stray: i64 = dst
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {table} WHERE tenant_id NOT IN ('t-1', 't-2', 't-3')"
                    ),
                    &[],
                )
                .await
                .expect("count")
                .get(0);
            assert_eq!(stray, 0, "{table} in {db}");
        }
    }
    // /health lists every tenant and names the tenants of each database.
    let (_, health_port) = monitoring_ports(&node);
    let (code, body) = http_get(health_port, "/health").await.expect("health");
    assert_eq!(code, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).expect("json");
    let tenants: Vec<&str> = doc["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .filter_map(|t| t["tenant_id"].as_str())
        .collect();
    for (tenant, _) in SERVED {
        assert!(tenants.contains(&tenant), "{body}");
    }
    let targets: Vec<&serde_json::Value> = doc["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["name"] == "target_database")
        .collect();
    assert_eq!(targets.len(), 2, "{body}");

    // t-3's target drifts (a column dropped outside replication): t-3
    // stops with the fix; t-1 and t-2 go on in the same process.
    target_of(&env, "app2")
        .await
        .batch_execute("ALTER TABLE accounts DROP COLUMN email")
        .await
        .expect("drift");
    write(&src, "t-3", 5000, 10).await;
    wait_for_log(
        &daemon,
        "a tenant stopped; the others go on",
        Duration::from_secs(30),
    )
    .await;
    write(&src, "t-1", 5000, 50).await;
    write(&src, "t-2", 5000, 50).await;
    wait_until(Duration::from_secs(30), "t-1 and t-2 go on", || async {
        tenant_equal(&env, "t-1", "app", &["accounts"]).await
            && tenant_equal(&env, "t-2", "app", &["accounts"]).await
    })
    .await;
    assert!(daemon.exited().is_none(), "{}", daemon.log());
    let (code, body) = http_get(health_port, "/health").await.expect("health");
    assert_eq!(code, 503, "{body}");
    // The operator takes t-3 out of the file: the node is healthy again,
    // t-3's slot is gone, and its failure no longer sets the exit code.
    node_file_of(&env, &SERVED[..2], "");
    daemon.reload();
    wait_for_log(
        &daemon,
        "its rows and progress stay on the target",
        Duration::from_secs(30),
    )
    .await;
    let (code, body) = http_get(health_port, "/health").await.expect("health");
    assert_eq!(code, 200, "{body}");
    let t3_slot: i64 = src
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 't_3_slot'",
            &[],
        )
        .await
        .expect("slots")
        .get(0);
    assert_eq!(t3_slot, 0);
    let (status, _) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
}

/// SIGHUP while tenants stream: a tenant added to the file is provisioned
/// (its rows copied) and streams; a tenant removed stops, lets go of its
/// slot and leaves `/health` and `/metrics`; the others never stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_tenants_while_the_others_stream() {
    let env = two_targets().await;
    let src = env.src().await;
    for (tenant, _) in SERVED {
        write(&src, tenant, 1, 100).await;
    }
    let audit = env.dir.path().join("audit.log");
    let top = format!(
        "[monitoring]\nenable_audit_log = true\naudit_log_path = \"{}\"\n",
        audit.display()
    );
    // The [monitoring] keys of the shared part come after ours: move ours
    // into it by writing the file with the audit keys in that section.
    let with_audit = |tenants: &[(&str, &str)]| {
        let path = node_file_of(&env, tenants, "");
        let text =
            std::fs::read_to_string(&path)
                .expect("node file")
                .replacen("[monitoring]\n", &top, 1);
        std::fs::write(&path, text).expect("write");
        path
    };
    let node = with_audit(&SERVED[..2]);
    env.init(&node);
    let mut daemon = Daemon::start(&node, &env.dir.path().join("node.log"));
    let (metrics_port, health_port) = monitoring_ports(&node);
    let equal = |tenant: &'static str, db: &'static str| tenant_equal(&env, tenant, db, &TABLES);
    wait_until(Duration::from_secs(60), "t-1 and t-2 stream", || async {
        equal("t-1", "app").await && equal("t-2", "app").await
    })
    .await;

    // t-3 in, t-2 out; t-1 writes all along.
    std::fs::write(
        &node,
        std::fs::read_to_string(with_audit(&[SERVED[0], SERVED[2]])).expect("new file"),
    )
    .expect("rewrite");
    daemon.reload();
    write(&src, "t-1", 1000, 50).await;
    wait_for_log(&daemon, "tenant added: streaming", Duration::from_secs(60)).await;
    write(&src, "t-3", 1000, 50).await;
    write(&src, "t-1", 2000, 50).await;
    wait_until(Duration::from_secs(60), "t-1 and t-3 stream", || async {
        equal("t-1", "app").await && equal("t-3", "app2").await
    })
    .await;
    wait_for_log(
        &daemon,
        "its rows and progress stay on the target",
        Duration::from_secs(30),
    )
    .await;
    let slots: Vec<String> = src
        .query(
            "SELECT slot_name::text FROM pg_replication_slots ORDER BY 1",
            &[],
        )
        .await
        .expect("slots")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(slots, ["t_1_slot", "t_3_slot"], "{}", daemon.log());
    let (code, body) = http_get(health_port, "/health").await.expect("health");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"t-3\"") && !body.contains("\"t-2\""),
        "{body}"
    );
    let (_, metrics) = http_get(metrics_port, "/metrics").await.expect("metrics");
    assert!(metrics.contains("tenant_id=\"t-3\""), "{metrics}");
    assert!(!metrics.contains("tenant_id=\"t-2\""), "{metrics}");
    let log = std::fs::read_to_string(&audit).expect("audit log");
    assert!(
        log.contains("\"tenant_added\"") && log.contains("\"t-3\""),
        "{log}"
    );
    assert!(log.contains("\"tenant_removed\""), "{log}");
    // A file that does not parse changes nothing.
    std::fs::write(&node, "[replication\n").expect("broken file");
    daemon.reload();
    wait_for_log(
        &daemon,
        "was not reloaded, nothing changed",
        Duration::from_secs(10),
    )
    .await;
    write(&src, "t-3", 3000, 10).await;
    wait_until(Duration::from_secs(30), "t-3 goes on", || {
        equal("t-3", "app2")
    })
    .await;
    let (status, _) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
}

/// `[performance] max_throughput_events_per_sec` caps each tenant: a
/// backlog of one tenant drains at that rate, another tenant's rows are
/// not held behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_throughput_cap_holds_per_tenant() {
    let env = two_targets().await;
    let node = node_file_of(&env, &SERVED, "");
    let text = std::fs::read_to_string(&node).expect("node file").replacen(
        "[performance]\n",
        "[performance]\nmax_throughput_events_per_sec = 200\n",
        1,
    );
    std::fs::write(&node, text).expect("write");
    env.init(&node);
    let daemon = Daemon::start(&node, &env.dir.path().join("node.log"));
    wait_until(Duration::from_secs(30), "streaming", || all_equal(&env)).await;
    let src = env.src().await;
    // 800 row changes of t-1 (400 accounts, 400 orders), 20 of t-3.
    let started = std::time::Instant::now();
    write(&src, "t-1", 1, 400).await;
    write(&src, "t-3", 1, 10).await;
    let equal =
        |tenant: &'static str, db: &'static str| tenant_equal(&env, tenant, db, &["orders"]);
    wait_until(
        Duration::from_secs(30),
        "t-3 is not held behind t-1",
        || equal("t-3", "app2"),
    )
    .await;
    let t3 = started.elapsed();
    wait_until(Duration::from_secs(30), "t-1 drained", || all_equal(&env)).await;
    let t1 = started.elapsed();
    // 800 changes at 200/s with one second's burst: at least 3 s.
    assert!(
        t1 >= Duration::from_millis(2800),
        "t-1 took {t1:?}: the cap did not hold\n{}",
        daemon.log()
    );
    assert!(t3 < t1, "t-3 ({t3:?}) waited for t-1 ({t1:?})");
}

/// A tenant stopped by an error it needs a person for is fixed and
/// started again by a reload, while the others stream: the operator
/// restores the target, asks that tenant's resync (`--tenant`), sends
/// SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_tenant_is_fixed_and_started_again_by_a_reload() {
    let env = two_targets().await;
    let served = [SERVED[0], SERVED[2]];
    let src = env.src().await;
    for (tenant, _) in served {
        write(&src, tenant, 1, 100).await;
    }
    let node = node_file_of(&env, &served, "");
    env.init(&node);
    let mut daemon = Daemon::start(&node, &env.dir.path().join("node.log"));
    let (_, health_port) = monitoring_ports(&node);
    wait_until(Duration::from_secs(60), "both stream", || async {
        tenant_equal(&env, "t-1", "app", &TABLES).await
            && tenant_equal(&env, "t-3", "app2", &TABLES).await
    })
    .await;
    let app2 = target_of(&env, "app2").await;
    app2.batch_execute("ALTER TABLE accounts DROP COLUMN email")
        .await
        .expect("drift");
    write(&src, "t-3", 500, 10).await;
    wait_for_log(
        &daemon,
        "a tenant stopped; the others go on",
        Duration::from_secs(30),
    )
    .await;

    // The fix: the column back, the tenant's table copied again.
    app2.batch_execute("ALTER TABLE accounts ADD COLUMN email text")
        .await
        .expect("restore");
    let out = run(&node, &["--tenant", "t-3", "resync", "--table", "accounts"]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    daemon.reload();
    write(&src, "t-1", 500, 10).await;
    // The restored column is now the table's last: compare by name.
    wait_until(Duration::from_secs(60), "t-3 is back and equal", || async {
        let src = env.src().await;
        source_columns_rows_of(&src, &src, "accounts", "t-3").await
            == source_columns_rows_of(&src, &target_of(&env, "app2").await, "accounts", "t-3").await
            && tenant_equal(&env, "t-3", "app2", &["orders", "events"]).await
            && tenant_equal(&env, "t-1", "app", &TABLES).await
    })
    .await;
    let (code, body) = http_get(health_port, "/health").await.expect("health");
    assert_eq!(code, 200, "{body}");
    let (status, _) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
}

/// `start --watch-config`: the file changed as Kubernetes changes a
/// ConfigMap volume (a symbolic link swapped to a new directory) adds a
/// tenant while the other streams, with no signal sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_file_changed_like_a_config_map_adds_a_tenant_without_a_signal() {
    let env = two_targets().await;
    let src = env.src().await;
    for (tenant, _) in SERVED {
        write(&src, tenant, 1, 100).await;
    }
    // <dir>/volume/node.toml -> ..data/node.toml, ..data -> ..v1
    let volume = env.dir.path().join("volume");
    let version = |n: u32, tenants: &[(&str, &str)]| {
        let text = std::fs::read_to_string(node_file_of(&env, tenants, "")).expect("file");
        let dir = volume.join(format!("..v{n}"));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("node.toml"), text).expect("write");
        let link = volume.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..v{n}"), &link).expect("symlink");
        std::fs::rename(&link, volume.join("..data")).expect("swap");
    };
    version(1, &SERVED[..1]);
    let node = volume.join("node.toml");
    std::os::unix::fs::symlink("..data/node.toml", &node).expect("symlink");
    env.init(&node);
    let log = env.dir.path().join("node.log");
    let out = std::fs::File::create(&log).expect("log");
    let child = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&node)
        .args(["start", "--watch-config"])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().expect("clone"))
        .stderr(out)
        .spawn()
        .expect("start");
    let mut daemon = Daemon::adopt(child, &log);
    wait_until(Duration::from_secs(60), "t-1 streams", || {
        tenant_equal(&env, "t-1", "app", &TABLES)
    })
    .await;

    version(2, &SERVED[..2]);
    wait_for_log(
        &daemon,
        "the configuration file changed",
        Duration::from_secs(30),
    )
    .await;
    wait_for_log(&daemon, "tenant added: streaming", Duration::from_secs(60)).await;
    write(&src, "t-1", 1000, 50).await;
    write(&src, "t-2", 1000, 50).await;
    wait_until(Duration::from_secs(60), "t-1 and t-2 stream", || async {
        tenant_equal(&env, "t-1", "app", &TABLES).await
            && tenant_equal(&env, "t-2", "app", &TABLES).await
    })
    .await;
    assert_eq!(
        daemon
            .log()
            .matches("the configuration file changed")
            .count(),
        1
    );
    let (status, _) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
}

/// A reload that changes a running tenant's own settings restarts that
/// tenant with them while the others stream; a change of the node's own
/// sections is named as needing a node restart, and restarts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_restarts_a_tenant_whose_settings_changed_and_only_that_one() {
    let env = two_targets().await;
    let src = env.src().await;
    for (tenant, _) in SERVED {
        write(&src, tenant, 1, 100).await;
    }
    let node = node_file(&env);
    env.init(&node);
    let mut daemon = Daemon::start(&node, &env.dir.path().join("node.log"));
    let (metrics_port, _) = monitoring_ports(&node);
    wait_until(Duration::from_secs(60), "all tenants stream", || {
        all_equal(&env)
    })
    .await;

    // t-2 takes another conflict strategy: a section of its entry, before
    // its [tenants.cdc].
    let text = std::fs::read_to_string(&node).expect("file");
    let at = text.find("tenant_id = \"t-2\"").expect("t-2");
    let cdc = at + text[at..].find("[tenants.cdc]").expect("cdc");
    let changed = format!(
        "{}[tenants.conflict]\nresolution_strategy = \"LastWriteWins\"\n{}",
        &text[..cdc],
        &text[cdc..]
    );
    std::fs::write(&node, &changed).expect("rewrite");
    daemon.reload();
    wait_for_log(
        &daemon,
        "tenant restarted with its new settings",
        Duration::from_secs(30),
    )
    .await;
    let log = daemon.log();
    assert_eq!(
        log.matches("tenant restarted with its new settings")
            .count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("restarting it with them") && log.contains("t-2"),
        "{log}"
    );
    write(&src, "t-1", 1000, 50).await;
    write(&src, "t-2", 1000, 50).await;
    wait_until(Duration::from_secs(60), "all tenants stream", || {
        all_equal(&env)
    })
    .await;
    let (_, metrics) = http_get(metrics_port, "/metrics").await.expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("tenant_id=\"t-2\"") && l.contains("strategy=\"LastWriteWins\"")),
        "{metrics}"
    );

    // A node section: named, nothing restarted.
    std::fs::write(
        &node,
        changed.replace("batch_timeout_ms = 50", "batch_timeout_ms = 70"),
    )
    .expect("rewrite");
    daemon.reload();
    wait_for_log(
        &daemon,
        "take effect when the node restarts",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        daemon
            .log()
            .matches("tenant restarted with its new settings")
            .count(),
        1
    );
    let (status, _) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
}
