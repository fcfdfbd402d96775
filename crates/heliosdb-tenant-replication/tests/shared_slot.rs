//! Many tenants from one decode: tenants of a node file that name one slot
//! share it (one publication listing them, one walsender), and each
//! tenant's rows are routed to its own target, on real clusters.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::prometheus::Prometheus;
use common::*;
use tokio_postgres::Client;

/// Tenant `i` of `n` and its target database (half in `app`, half in `app2`).
fn tenants(n: usize) -> Vec<(String, &'static str)> {
    (0..n)
        .map(|i| (format!("s-{i:02}"), if i % 2 == 0 { "app" } else { "app2" }))
        .collect()
}

/// A node file whose tenants inherit one slot and publication from the
/// file's `[cdc]`; `extra` goes at the top.
fn shared_node_file(env: &Env, tenants: &[(String, &str)], extra: &str) -> PathBuf {
    let urls: Vec<(String, String)> = tenants
        .iter()
        .map(|(t, db)| (t.clone(), env.target.superuser_url(db)))
        .collect();
    node_file_with_targets(env, &urls, extra)
}

/// [`shared_node_file`] with each tenant's target connection given.
fn node_file_with_targets(env: &Env, tenants: &[(String, String)], extra: &str) -> PathBuf {
    let shared = env.node_file_top().replace(
        "[cdc]\n",
        "[cdc]\nreplication_slot = \"node_slot\"\npublication_name = \"node_pub\"\n",
    );
    let mut text = extra.to_string() + &shared;
    for (tenant, url) in tenants {
        text.push_str(&format!(
            "\n[[tenants]]\n[tenants.replication]\ntenant_id = \"{tenant}\"\ntarget_connection = \"{url}\"\n"
        ));
    }
    env.write_config("node.toml", &text)
}

/// Clusters with the schema, a second target database `app2`, and room on
/// the target for every tenant's replication origin.
async fn two_targets() -> Env {
    let mut env = Env::new(SCHEMA).await;
    env.target
        .reconfigure(&[("max_replication_slots", "64")])
        .expect("target settings");
    env.target.create_database("app2").await.expect("app2");
    env.target
        .connect("app2")
        .await
        .expect("connect app2")
        .batch_execute(SCHEMA)
        .await
        .expect("schema");
    env
}

/// Every tenant's rows equal on its target; the first that differs.
async fn first_unequal(env: &Env, tenants: &[(String, &str)]) -> Option<String> {
    let src = env.src().await;
    let mut targets = std::collections::HashMap::new();
    for db in ["app", "app2"] {
        targets.insert(db, env.target.connect(db).await.expect("target"));
    }
    for (tenant, db) in tenants {
        for table in TABLES {
            let (a, b) = (
                tenant_digest(&src, table, tenant).await,
                tenant_digest(&targets[db], table, tenant).await,
            );
            if a != b {
                return Some(format!("{tenant} {table}: source {a:?}, target {b:?}"));
            }
        }
    }
    None
}

/// Rows on target database `db` of tenants not served there.
async fn strangers(env: &Env, db: &str, served: &[String]) -> i64 {
    let c = env.target.connect(db).await.expect("target");
    let mut n = 0;
    for table in TABLES {
        n += c
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE tenant_id <> ALL($1)"),
                &[&served],
            )
            .await
            .expect("count")
            .get::<_, i64>(0);
    }
    n
}

/// Walsenders serving the node's slot.
async fn walsenders(src: &Client) -> i64 {
    src.query_one(
        "SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = 'node_slot'",
        &[],
    )
    .await
    .expect("walsenders")
    .get(0)
}

/// A mixed workload over `tenants` plus unserved ones, until `stop`:
/// inserts, updates, deletes, rows moved between tenants, and a
/// transaction large enough to be streamed while it runs now and then.
async fn workload(src: Client, tenants: Vec<String>, stop: Arc<AtomicBool>) -> u64 {
    let mut round: i64 = 0;
    let all: Vec<String> = tenants
        .iter()
        .cloned()
        .chain(["unserved-a".to_string(), "unserved-b".to_string()])
        .collect();
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let t = &all[round as usize % all.len()];
        let u = &all[(round as usize * 7 + 3) % all.len()];
        let base = round * 10;
        let sql = format!(
            "BEGIN;
             INSERT INTO accounts SELECT '{t}', g, 'n' || g, 'e', g, now() FROM generate_series({base}, {base} + 9) g;
             INSERT INTO orders SELECT '{u}', g, g, 'new', g, '{{\"r\": {round}}}', now() FROM generate_series({base}, {base} + 4) g;
             UPDATE accounts SET balance = balance + 1, name = 'u{round}' WHERE tenant_id = '{u}' AND id % 3 = {round} % 3;
             DELETE FROM orders WHERE tenant_id = '{t}' AND id % 11 = {round} % 11;
             UPDATE accounts SET tenant_id = '{u}', id = id + 1000000 WHERE tenant_id = '{t}' AND id = {base} + 1;
             COMMIT;"
        );
        src.batch_execute(&sql).await.expect("workload");
        if round % 40 == 0 {
            // Larger than logical_decoding_work_mem: streamed while it runs.
            src.batch_execute(&format!(
                "INSERT INTO events SELECT tn, {round} * 100000 + g, 'big', repeat('x', 200), now()
                   FROM generate_series(1, 3000) g, (SELECT DISTINCT x FROM (VALUES ('{t}'), ('{u}'), ('unserved-a')) v(x)) v(tn)"
            ))
            .await
            .expect("large transaction");
        }
    }
    round as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_tenants_share_one_slot_through_kill_9_under_load() {
    let env = two_targets().await;
    let admin = env.source.connect("postgres").await.expect("connect");
    for sql in [
        "ALTER SYSTEM SET logical_decoding_work_mem = '64kB'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.expect("work mem");
    }
    let served = tenants(20);
    let ids: Vec<String> = served.iter().map(|(t, _)| t.clone()).collect();
    let src = env.src().await;
    for (i, id) in ids
        .iter()
        .chain(["unserved-a".to_string()].iter())
        .enumerate()
    {
        src.batch_execute(&format!(
            "INSERT INTO accounts SELECT '{id}', -g, 'before', 'e', {i}, now() FROM generate_series(1, 50) g"
        ))
        .await
        .expect("rows before init");
    }
    let node = shared_node_file(&env, &served, "");
    let init = env.init(&node);
    assert!(init.contains("shared by 20 tenants"), "{init}");
    let slots: i64 = src
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 1, "one slot for twenty tenants");

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(workload(env.src().await, ids.clone(), stop.clone()));
    let mut daemon = env.start_daemon(&node);
    for round in 0..3 {
        // Under load, the node streams (one walsender), then dies.
        let applied = |n: i64| {
            let env = &env;
            async move {
                let c = env.target.connect("app").await.expect("target");
                c.query_one("SELECT count(*) FROM accounts WHERE name LIKE 'u%'", &[])
                    .await
                    .expect("count")
                    .get::<_, i64>(0)
                    > n
            }
        };
        let before = env
            .target
            .connect("app")
            .await
            .expect("target")
            .query_one("SELECT count(*) FROM accounts WHERE name LIKE 'u%'", &[])
            .await
            .expect("count")
            .get::<_, i64>(0);
        wait_until(
            Duration::from_secs(60),
            "changes applied under load",
            || applied(before + 20),
        )
        .await;
        assert_eq!(
            walsenders(&src).await,
            1,
            "round {round}: one walsender for the node"
        );
        daemon.kill9();
        daemon = env.start_daemon(&node);
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = load.await.expect("workload");
    assert!(rounds > 30, "the workload ran ({rounds} rounds)");

    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        match first_unequal(&env, &served).await {
            None => break,
            Some(d) => assert!(
                std::time::Instant::now() < deadline,
                "{d}\n{}",
                daemon.log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let app: Vec<String> = served
        .iter()
        .filter(|(_, db)| *db == "app")
        .map(|(t, _)| t.clone())
        .collect();
    let app2: Vec<String> = served
        .iter()
        .filter(|(_, db)| *db == "app2")
        .map(|(t, _)| t.clone())
        .collect();
    assert_eq!(
        strangers(&env, "app", &app).await,
        0,
        "only app's tenants in app"
    );
    assert_eq!(
        strangers(&env, "app2", &app2).await,
        0,
        "only app2's tenants in app2"
    );
    assert_eq!(walsenders(&src).await, 1);
    // Idle tenants do not pin WAL: the slot reaches the end of the WAL.
    wait_until(
        Duration::from_secs(30),
        "the slot confirms the end of the WAL",
        || slot_at_wal_end(&src),
    )
    .await;
    assert!(!daemon.log().contains(" ERROR "), "{}", daemon.log());
}

/// Rows of `tenant` in every table, from `from` on.
async fn rows(src: &Client, tenant: &str, from: i64, n: i64) {
    src.batch_execute(&format!(
        "INSERT INTO accounts SELECT '{tenant}', g, 'n' || g, 'e', g, now() FROM generate_series({from}, {to}) g;
         INSERT INTO orders SELECT '{tenant}', g, g, 'new', g, '{{}}', now() FROM generate_series({from}, {to}) g;
         INSERT INTO events SELECT '{tenant}', g, 'k', repeat('x', 100), now() FROM generate_series({from}, {to}) g",
        to = from + n - 1
    ))
    .await
    .expect("rows");
}

/// `tenant`'s rows equal on the source and on `target`.
async fn equal_on(src: &Client, target: &Client, tenant: &str) -> bool {
    for table in TABLES {
        if tenant_digest(src, table, tenant).await != tenant_digest(target, table, tenant).await {
            return false;
        }
    }
    true
}

/// The shared slot confirms the end of the source's WAL (within 1 MB).
async fn slot_at_wal_end(src: &Client) -> bool {
    src.query_one(
        "SELECT confirmed_flush_lsn >= pg_current_wal_insert_lsn() - 1024 * 1024 FROM pg_replication_slots WHERE slot_name = 'node_slot'",
        &[],
    )
    .await
    .expect("slot")
    .get(0)
}

async fn slot_confirmed(src: &Client) -> i64 {
    src.query_one(
        "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = 'node_slot'",
        &[],
    )
    .await
    .expect("slot")
    .get(0)
}

/// Counts of the lag histogram's buckets for `tenant`: (upper bound, count).
fn lag_buckets(metrics: &str, tenant: &str) -> Vec<(f64, f64)> {
    let label = format!("tenant_id=\"{tenant}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("heliosdb_replication_lag_seconds_bucket{") && l.contains(&label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// The bucket bound under which 99% of the transactions applied between
/// two scrapes lie.
fn lag_p99(before: &[(f64, f64)], after: &[(f64, f64)]) -> f64 {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| {
            let was = before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
            (le, n - was)
        })
        .collect();
    let total = delta.iter().map(|d| d.1).fold(0.0, f64::max);
    assert!(total > 0.0, "transactions were applied");
    delta
        .iter()
        .find(|d| d.1 >= 0.99 * total)
        .map_or(f64::INFINITY, |d| d.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_whose_target_is_down_spools_while_the_slot_moves_on() {
    let env = two_targets().await;
    // Tenant "down" replicates into a cluster of its own, stopped below.
    let mut own = pgcluster::Cluster::start().expect("third cluster");
    own.create_database("app").await.expect("db");
    own.connect("app")
        .await
        .expect("connect")
        .batch_execute(SCHEMA)
        .await
        .expect("schema");
    let tenants = vec![
        ("s-a".to_string(), env.target.superuser_url("app")),
        ("s-b".to_string(), env.target.superuser_url("app2")),
        ("down".to_string(), own.superuser_url("app")),
    ];
    let node = node_file_with_targets(&env, &tenants, "");
    let src = env.src().await;
    for (t, _) in &tenants {
        rows(&src, t, 1, 100).await;
    }
    env.init(&node);
    let mut daemon = env.start_daemon(&node);
    let (a, b) = (
        env.target.connect("app").await.expect("app"),
        env.target.connect("app2").await.expect("app2"),
    );
    let x = own.connect("app").await.expect("own");
    // Rows written after the start arrive: every tenant streams.
    for (t, _) in &tenants {
        rows(&src, t, 200, 10).await;
    }
    wait_until(
        Duration::from_secs(60),
        "every tenant copied and streaming",
        || async {
            equal_on(&src, &a, "s-a").await
                && equal_on(&src, &b, "s-b").await
                && equal_on(&src, &x, "down").await
        },
    )
    .await;
    let (metrics_port, health_port) = monitoring_ports(&node);

    // "down"'s target stops for 60 s while every tenant writes.
    drop(x);
    own.stop().expect("stop the tenant's target");
    let held_at = slot_confirmed(&src).await;
    let (_, before) = http_get(metrics_port, "/metrics").await.expect("metrics");
    let started = std::time::Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(60) {
        for (t, _) in &tenants {
            rows(&src, t, 1000 + round * 20, 20).await;
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_until(
        Duration::from_secs(30),
        "the other tenants applied everything",
        || async { equal_on(&src, &a, "s-a").await && equal_on(&src, &b, "s-b").await },
    )
    .await;
    let (_, after) = http_get(metrics_port, "/metrics").await.expect("metrics");
    for t in ["s-a", "s-b"] {
        let p99 = lag_p99(&lag_buckets(&before, t), &lag_buckets(&after, t));
        assert!(
            p99 <= 1.0,
            "{t}: lag p99 within {p99} s while another tenant's target was down"
        );
    }
    // The slot moved on: "down"'s changes are in its spool, synced.
    let moved = slot_confirmed(&src).await;
    assert!(
        moved > held_at + 1024 * 1024,
        "the slot moved on past the tenant whose target is down ({held_at} -> {moved})"
    );
    let spooled = metric_value(
        &after,
        "heliosdb_tenant_spool_bytes",
        &["tenant_id=\"down\""],
    );
    assert!(spooled > Some(100_000.0), "down's spool: {spooled:?}");
    let held = metric_value(
        &after,
        "heliosdb_tenant_wal_held_bytes",
        &["tenant_id=\"down\""],
    );
    assert!(held < Some(1024.0 * 1024.0), "down holds {held:?} of WAL");
    let (status, body) = http_get(health_port, "/health").await.expect("health");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"spool_bytes\""), "{body}");

    // kill -9 while the spool holds changes the slot no longer has.
    daemon.kill9();
    for (t, _) in &tenants {
        rows(&src, t, 100_000, 20).await;
    }
    daemon = env.start_daemon(&node);
    wait_until(
        Duration::from_secs(60),
        "the others apply after the restart",
        || async { equal_on(&src, &a, "s-a").await && equal_on(&src, &b, "s-b").await },
    )
    .await;
    // "down" cannot attach (its target is still down): it is parked from
    // its spool, and the slot goes on moving for the others.
    wait_for_log(&daemon, "tenant has not attached", Duration::from_secs(10)).await;
    let restarted_at = slot_confirmed(&src).await;
    for round in 0..30 {
        for (t, _) in &tenants {
            rows(&src, t, 200_000 + round * 100, 100).await;
        }
    }
    wait_until(
        Duration::from_secs(60),
        "the slot moves on after the restart while down's target is still down",
        || async { slot_confirmed(&src).await > restarted_at + 1024 * 1024 },
    )
    .await;

    // Back: it applies its spool, then the slot, equal; the slot moves on.
    own.start_again().expect("start the tenant's target");
    let x = own.connect("app").await.expect("own");
    wait_until(Duration::from_secs(90), "the tenant caught up", || async {
        equal_on(&src, &x, "down").await
    })
    .await;
    assert!(equal_on(&src, &a, "s-a").await && equal_on(&src, &b, "s-b").await);
    for db in [&a, &b, &x] {
        assert_eq!(
            db.query_one(
                "SELECT count(*) FROM accounts WHERE tenant_id NOT IN ('s-a', 's-b', 'down')",
                &[]
            )
            .await
            .expect("count")
            .get::<_, i64>(0),
            0
        );
    }
    wait_until(
        Duration::from_secs(30),
        "the slot reaches the end of the WAL",
        || slot_at_wal_end(&src),
    )
    .await;
    wait_until(Duration::from_secs(30), "the spool emptied", || async {
        let (_, m) = http_get(metrics_port, "/metrics").await.unwrap_or_default();
        metric_value(&m, "heliosdb_tenant_spool_bytes", &["tenant_id=\"down\""]) == Some(0.0)
    })
    .await;
    // The only errors: "down" could not reach its target.
    let log = daemon.log();
    let unexpected: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") && !l.contains("still failing after"))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:#?}");
    drop(daemon);
}

/// The tenants the shared publication's row filter lists (its text).
async fn published_filter(src: &Client) -> String {
    src.query_one(
        "SELECT rowfilter FROM pg_publication_tables WHERE pubname = 'node_pub' AND tablename = 'accounts'",
        &[],
    )
    .await
    .expect("publication")
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_join_and_leave_a_shared_slot_while_the_others_stream() {
    let env = two_targets().await;
    let src = env.src().await;
    let all = vec![
        ("s-a".to_string(), "app"),
        ("s-b".to_string(), "app2"),
        ("s-c".to_string(), "app2"),
    ];
    for (t, _) in &all {
        rows(&src, t, 1, 200).await;
    }
    let node = shared_node_file(&env, &all[..2], "");
    env.init(&node);
    let daemon = env.start_daemon(&node);
    let (a, b) = (
        env.target.connect("app").await.expect("app"),
        env.target.connect("app2").await.expect("app2"),
    );
    wait_until(
        Duration::from_secs(60),
        "the first two tenants streaming",
        || async { equal_on(&src, &a, "s-a").await && equal_on(&src, &b, "s-b").await },
    )
    .await;
    assert!(!published_filter(&src).await.contains("s-c"));

    // Writes go on for every tenant while s-c joins.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (src, stop) = (env.src().await, stop.clone());
        tokio::spawn(async move {
            let mut from = 10_000;
            while !stop.load(Ordering::Relaxed) {
                for t in ["s-a", "s-b", "s-c"] {
                    rows(&src, t, from, 20).await;
                }
                from += 20;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Joined with the command: the file gets the entry, the node reloads,
    // the command returns once s-c streams.
    let url = env.target.superuser_url("app2");
    let added = {
        let node = node.clone();
        tokio::task::spawn_blocking(move || {
            run(
                &node,
                &[
                    "add-tenant",
                    "s-c",
                    "--target-connection",
                    &url,
                    "--wait",
                    "120",
                ],
            )
        })
        .await
        .expect("add-tenant")
    };
    assert_eq!(
        added.status.code(),
        Some(0),
        "{}{}",
        added.stdout,
        added.stderr
    );
    assert!(added.stdout.contains("reloads"), "{}", added.stdout);
    let text = std::fs::read_to_string(&node).expect("node file");
    assert!(text.contains("tenant_id = \"s-c\""), "{text}");
    assert_fails(
        &node,
        &["add-tenant", "s-c"],
        2,
        &["tenant 's-c' is in", "already"],
    );
    assert_fails(
        &env.config(),
        &["add-tenant", "s-d"],
        2,
        &["describes one tenant", "[[tenants]]"],
    );
    wait_until(
        Duration::from_secs(60),
        "s-c copied and streaming",
        || async {
            published_filter(&src).await.contains("s-c")
                && b.query_one(
                    "SELECT count(*) >= 200 FROM accounts WHERE tenant_id = 's-c'",
                    &[],
                )
                .await
                .expect("count")
                .get::<_, bool>(0)
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    wait_until(
        Duration::from_secs(60),
        "all three equal after the join",
        || async {
            equal_on(&src, &a, "s-a").await
                && equal_on(&src, &b, "s-b").await
                && equal_on(&src, &b, "s-c").await
        },
    )
    .await;

    // s-b leaves: the filter no longer lists it, the slot stays for the others.
    shared_node_file(&env, &[all[0].clone(), all[2].clone()], "");
    daemon.reload();
    wait_until(
        Duration::from_secs(30),
        "s-b out of the publication",
        || async { !published_filter(&src).await.contains("s-b") },
    )
    .await;
    rows(&src, "s-b", 50_000, 10).await;
    rows(&src, "s-a", 50_000, 10).await;
    rows(&src, "s-c", 50_000, 10).await;
    wait_until(
        Duration::from_secs(60),
        "the remaining tenants go on",
        || async { equal_on(&src, &a, "s-a").await && equal_on(&src, &b, "s-c").await },
    )
    .await;
    let late: i64 = b
        .query_one(
            "SELECT count(*) FROM accounts WHERE tenant_id = 's-b' AND id >= 50000",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(late, 0, "a removed tenant's later rows are not applied");
    let slots: i64 = src
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'node_slot'",
            &[],
        )
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 1, "the shared slot stays for the others");
    assert_eq!(walsenders(&src).await, 1);
    let log = daemon.log();
    assert!(!log.contains(" ERROR "), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tenant_spills_and_then_pauses_while_the_others_go_on() {
    let env = two_targets().await;
    env.target.create_database("slow").await.expect("db");
    let slow = env.target.connect("slow").await.expect("slow");
    slow.batch_execute(SCHEMA).await.expect("schema");
    let tenants = vec![
        ("s-a".to_string(), env.target.superuser_url("app")),
        ("s-b".to_string(), env.target.superuser_url("app2")),
        ("slow".to_string(), env.target.superuser_url("slow")),
    ];
    let node = node_file_with_targets(&env, &tenants, "");
    // Small queues and a 1 MB spool, so both fill within the test.
    let text = std::fs::read_to_string(&node).expect("node file").replace(
        "[performance]\n",
        "[performance]\nbuffer_size_events = 50\nspool_max_mb = 1\n",
    );
    std::fs::write(&node, text).expect("node file");
    let src = env.src().await;
    env.init(&node);
    let daemon = env.start_daemon(&node);
    let (metrics_port, health_port) = monitoring_ports(&node);
    let prometheus = Prometheus::start(
        &env.dir.path().join("prometheus"),
        metrics_port,
        &[
            (
                "expr: heliosdb_tenant_wal_held_bytes > 1024 * 1024 * 1024\n        for: 10m",
                "expr: heliosdb_tenant_wal_held_bytes > 256 * 1024\n        for: 2s",
            ),
            (
                "expr: heliosdb_tenant_paused == 1\n        for: 5m",
                "expr: heliosdb_tenant_paused == 1\n        for: 2s",
            ),
        ],
    );
    let (a, b) = (
        env.target.connect("app").await.expect("app"),
        env.target.connect("app2").await.expect("app2"),
    );
    for (t, _) in &tenants {
        rows(&src, t, 1, 10).await;
    }
    wait_until(
        Duration::from_secs(60),
        "every tenant streaming",
        || async {
            equal_on(&src, &a, "s-a").await
                && equal_on(&src, &b, "s-b").await
                && equal_on(&src, &slow, "slow").await
        },
    )
    .await;

    // The slow tenant's target is stuck behind a lock: its apply waits.
    let mut locker = env.target.connect("slow").await.expect("slow");
    let lock = locker.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    for round in 0..10 {
        rows(&src, "slow", 1000 + round * 200, 200).await;
        rows(&src, "s-a", 1000 + round * 200, 200).await;
        rows(&src, "s-b", 1000 + round * 200, 200).await;
    }
    wait_until(
        Duration::from_secs(60),
        "the other tenants applied everything",
        || async { equal_on(&src, &a, "s-a").await && equal_on(&src, &b, "s-b").await },
    )
    .await;
    wait_for_log(
        &daemon,
        "its changes go to its spool",
        Duration::from_secs(10),
    )
    .await;
    // More than the spool holds: the slow tenant is paused, the others go on.
    for round in 10..30 {
        rows(&src, "slow", 1000 + round * 200, 200).await;
        rows(&src, "s-a", 1000 + round * 200, 200).await;
    }
    wait_for_log(&daemon, "tenant paused", Duration::from_secs(30)).await;
    wait_until(
        Duration::from_secs(60),
        "s-a applied everything while slow is paused",
        || async { equal_on(&src, &a, "s-a").await },
    )
    .await;
    // Paused: unhealthy, the slot holds for it, both alerts fire for it
    // alone in a real Prometheus.
    let (status, body) = http_get(health_port, "/health").await.expect("health");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("spool_max_mb"), "{body}");
    let held_at = slot_confirmed(&src).await;
    for round in 30..40 {
        rows(&src, "s-a", 1000 + round * 200, 200).await;
    }
    wait_until(
        Duration::from_secs(60),
        "s-a applied what it wrote while slow is paused",
        || async { equal_on(&src, &a, "s-a").await },
    )
    .await;
    wait_until(
        Duration::from_secs(60),
        "TenantPaused and TenantHoldsWAL fire for the paused tenant",
        || async {
            let alerts = prometheus.get("/api/v1/alerts").await["data"]["alerts"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let firing = |name: &str| {
                alerts.iter().any(|a| {
                    a["labels"]["alertname"] == name
                        && a["labels"]["tenant_id"] == "slow"
                        && a["state"] == "firing"
                })
            };
            firing("TenantPaused") && firing("TenantHoldsWAL")
        },
    )
    .await;
    let alerts = prometheus.get("/api/v1/alerts").await.to_string();
    assert!(
        !alerts.contains("\"s-a\"") && !alerts.contains("\"s-b\""),
        "{alerts}"
    );
    assert!(
        slot_confirmed(&src).await <= held_at + 64 * 1024,
        "the slot stays where the paused tenant's spool ends"
    );
    // Rows written while it is paused come from the slot when it resumes.
    rows(&src, "slow", 100_000, 50).await;

    // Unstuck: it catches up from its spool and from the slot, equal.
    lock.rollback().await.expect("unlock");
    wait_until(
        Duration::from_secs(90),
        "the slow tenant caught up",
        || async { equal_on(&src, &slow, "slow").await },
    )
    .await;
    wait_for_log(&daemon, "tenant resumes", Duration::from_secs(5)).await;
    assert!(equal_on(&src, &a, "s-a").await && equal_on(&src, &b, "s-b").await);
    wait_until(
        Duration::from_secs(30),
        "the slot released what the slow tenant held",
        || slot_at_wal_end(&src),
    )
    .await;
    assert_eq!(walsenders(&src).await, 1);
}

/// A tenant of a shared slot whose own settings change on reload restarts
/// alone: it leaves the slot's stream and joins it again where its target
/// stands, the others stream on, nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_slot_tenant_restarted_by_a_reload_loses_and_doubles_nothing() {
    let env = two_targets().await;
    let src = env.src().await;
    let served = tenants(3);
    for (t, _) in &served {
        rows(&src, t, 1, 200).await;
    }
    let node = shared_node_file(&env, &served, "");
    env.init(&node);
    let mut daemon = Daemon::start(&node, &env.dir.path().join("node.log"));
    wait_until(Duration::from_secs(60), "all equal", || async {
        first_unequal(&env, &served).await.is_none()
    })
    .await;
    // s-01 gets a conflict strategy of its own while all three write.
    let text = std::fs::read_to_string(&node).expect("file");
    let at = text.find("tenant_id = \"s-01\"\n").expect("s-01");
    // After its entry's [tenants.replication] keys (tenant id, target).
    let end = at + text[at..].find("target_connection").expect("target");
    let end = end + text[end..].find('\n').expect("line") + 1;
    let changed = format!(
        "{}[tenants.conflict]\nresolution_strategy = \"TargetPreferred\"\n{}",
        &text[..end],
        &text[end..]
    );
    assert_ne!(text, changed);
    let writer = {
        let src = env.src().await;
        let served = served.clone();
        tokio::spawn(async move {
            for round in 0..20 {
                for (t, _) in &served {
                    rows(&src, t, 1000 + round * 50, 50).await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    std::fs::write(&node, changed).expect("rewrite");
    daemon.reload();
    wait_for_log(
        &daemon,
        "tenant restarted with its new settings",
        Duration::from_secs(30),
    )
    .await;
    writer.await.expect("writer");
    wait_until(
        Duration::from_secs(60),
        "all equal after the restart",
        || async { first_unequal(&env, &served).await.is_none() },
    )
    .await;
    assert_eq!(walsenders(&src).await, 1, "{}", daemon.log());
    let (status, _) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
}
