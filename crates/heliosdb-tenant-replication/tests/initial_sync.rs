//! Initial copy of a tenant that already has rows, on real clusters: exact
//! under concurrent writes, resumable after `kill -9`, and `resync`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

/// 1,000,000 rows of tenant-123 over three tables, and as many of tenant-456.
const PRELOAD: &str = "
INSERT INTO accounts SELECT t, g, 'name ' || g, 'u' || g || '@example.com', g * 1.5, now()
  FROM generate_series(1, 100000) g, (VALUES ('tenant-123'), ('tenant-456')) v(t);
INSERT INTO orders SELECT t, g, g % 100000, 'new', g * 10.25, jsonb_build_object('n', g, 'tags', jsonb_build_array('a', 'b')), now()
  FROM generate_series(1, 400000) g, (VALUES ('tenant-123'), ('tenant-456')) v(t);
INSERT INTO events SELECT t, g, 'click', md5(g::text) || md5(t || g::text), now()
  FROM generate_series(1, 500000) g, (VALUES ('tenant-123'), ('tenant-456')) v(t);
";

/// Inserts past the preloaded ids, updates and deletes of preloaded rows,
/// for both tenants, until `stop`.
async fn writer(url: String, seed: u64, stop: Arc<AtomicBool>) -> u64 {
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut next_id = 1_000_000 + seed as i64 * 100_000;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let tenant = if rng.random_bool(0.7) {
            "tenant-123"
        } else {
            "tenant-456"
        };
        let id: i64 = rng.random_range(1..400_000);
        let sql = match rng.random_range(0..4) {
            0 => {
                next_id += 10;
                format!("INSERT INTO orders SELECT '{tenant}', g, 1, 'live', 1, '{{}}', now() FROM generate_series({next_id}, {next_id} + 9) g")
            }
            1 => format!("UPDATE orders SET status = 'updated', amount = amount + 1 WHERE tenant_id = '{tenant}' AND id BETWEEN {id} AND {id} + 20"),
            2 => format!("DELETE FROM events WHERE tenant_id = '{tenant}' AND id BETWEEN {id} AND {id} + 5"),
            _ => format!("UPDATE accounts SET balance = balance * 2 WHERE tenant_id = '{tenant}' AND id = {}", id % 100_000),
        };
        if c.batch_execute(&sql).await.is_ok() {
            n += 1;
        }
        // A steady trickle: correctness under concurrent writes, not load.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_million_row_tenant_is_copied_exactly_while_writes_go_on() {
    let env = Env::new(SCHEMA).await;
    env.src()
        .await
        .batch_execute(PRELOAD)
        .await
        .expect("preload");
    let config = env.config();
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(writer(env.source.superuser_url("app"), 1, stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // init makes the slot, exports its snapshot and copies under it.
    let out = env.init(&config);
    assert!(out.contains("exporting its snapshot for the copy"), "{out}");
    assert!(out.contains("initial copy done"), "{out}");
    let daemon = env.start_daemon(&config);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(load.await.expect("writer") > 0);
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(120), &daemon).await;
    let dst = env.dst().await;
    assert_eq!(foreign_rows(&dst).await, 0);
    let (accounts, _) = tenant_digest(&dst, "accounts", TENANT).await;
    assert_eq!(accounts, 100_000);
    let status = run(&config, &["status"]);
    assert!(
        status.stdout.contains("state:         streaming"),
        "{}",
        status.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_the_copy_resumes_without_copying_finished_ranges_again() {
    let env = Env::new(SCHEMA).await;
    env.src()
        .await
        .batch_execute(PRELOAD)
        .await
        .expect("preload");
    // One worker, so ranges finish one after another.
    let config = env.write_config(
        "replication.toml",
        &env.config_text("")
            .replace("worker_threads = 2", "worker_threads = 1"),
    );
    let out = run(&config, &["init", "--no-copy"]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(writer(env.source.superuser_url("app"), 2, stop.clone()));

    let mut daemon = env.start_daemon(&config);
    let dst = env.dst().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let (done, total) = loop {
        let row = dst
            .query_opt("SELECT count(*) FILTER (WHERE done), count(*) FROM heliosdb_replication.copy_state", &[])
            .await
            .ok()
            .flatten();
        if let Some(r) = row {
            let (done, total): (i64, i64) = (r.get(0), r.get(1));
            if done >= 1 && done < total {
                daemon.kill9();
                break (done, total);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no moment with some ranges done:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(total >= 3, "the plan has several ranges ({total})");
    let status = run(&config, &["status"]);
    assert!(
        status.stdout.contains("state:         snapshotting"),
        "{}",
        status.stdout
    );

    let daemon = env.start_daemon(&config);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("writer");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(180), &daemon).await;
    let log = daemon.log();
    let resumed = log
        .lines()
        .find(|l| l.contains("resuming an interrupted initial copy"))
        .unwrap_or_else(|| panic!("no resume line:\n{log}"));
    assert!(
        resumed.contains(&format!("done={done}"))
            || resumed.contains(&format!("done={}", done + 1)),
        "{resumed}"
    );
    assert_eq!(foreign_rows(&dst).await, 0);
    let left: i64 = dst
        .query_one("SELECT count(*) FROM heliosdb_replication.copy_state", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "the plan is removed once the copy is done");
    // The resumed copy converged by replay: that is not a conflict.
    assert_eq!(conflicts_logged(&dst).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_repairs_a_damaged_target_while_streaming() {
    let (env, config) = Env::provisioned(SCHEMA).await;
    let daemon = env.start_daemon(&config);
    let src = env.src().await;
    src.batch_execute(
        "INSERT INTO orders SELECT t, g, 1, 'new', g, '{}', now() FROM generate_series(1, 3000) g, (VALUES ('tenant-123'), ('tenant-456')) v(t);
         INSERT INTO events SELECT 'tenant-123', g, 'k', 'b', now() FROM generate_series(1, 1000) g;",
    )
    .await
    .expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;

    // Someone writes to the replica directly.
    let dst = env.dst().await;
    dst.batch_execute(
        "DELETE FROM orders WHERE id % 10 = 0; UPDATE orders SET status = 'tampered' WHERE id % 7 = 0;
         INSERT INTO orders VALUES ('tenant-123', 999999, 0, 'stray', 0, '{}', now());
         DELETE FROM events WHERE id < 100;",
    )
    .await
    .expect("damage");
    let out = run(&config, &["resync", "--table", "orders"]);
    assert!(
        out.status.success() && out.stdout.contains("requested"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    wait_until(Duration::from_secs(30), "orders to be repaired", || async {
        let (s, d) = (env.src().await, env.dst().await);
        tenant_digest(&s, "orders", TENANT).await == tenant_digest(&d, "orders", TENANT).await
    })
    .await;
    // Writes go on during and after; then the whole tenant.
    src.batch_execute("UPDATE orders SET status = 'after' WHERE id < 50")
        .await
        .expect("update");
    assert!(run(&config, &["resync"]).status.success());
    // The request disappears in the transaction that completes it.
    wait_until(
        Duration::from_secs(30),
        "the resync request to be fulfilled",
        || async {
            let n: i64 = env
                .dst()
                .await
                .query_one(
                    "SELECT count(*) FROM heliosdb_replication.resync_requests",
                    &[],
                )
                .await
                .expect("count")
                .get(0);
            n == 0
        },
    )
    .await;
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    assert_eq!(foreign_rows(&dst).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_target_rows_without_progress_are_not_copied_over_silently() {
    let env = Env::new(SCHEMA).await;
    let src = env.src().await;
    src.batch_execute("INSERT INTO accounts SELECT 'tenant-123', g, 'n', 'e', 1, now() FROM generate_series(1, 500) g")
        .await
        .expect("source rows");
    env.dst()
        .await
        .batch_execute("INSERT INTO accounts SELECT 'tenant-123', g, 'old', 'e', 0, now() FROM generate_series(1, 10) g")
        .await
        .expect("stale target rows");
    let config = env.config();
    let out = run(&config, &["init"]);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(out.status.code(), Some(3), "{all}");
    assert!(
        all.contains("already holds rows of tenant 'tenant-123'") && all.contains("resync"),
        "{all}"
    );
    assert!(run(&config, &["resync"]).status.success());
    let daemon = env.start_daemon(&config);
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
}
