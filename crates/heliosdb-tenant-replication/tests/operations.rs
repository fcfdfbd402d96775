//! What an operator meets: init, hand-made slots and publications, start-up
//! errors that say the fix, checkpoint files, and the command line.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_is_idempotent_and_picks_up_new_tables() {
    let env = Env::new(&format!(
        "{SCHEMA} CREATE TABLE settings(k text PRIMARY KEY, v text);"
    ))
    .await;
    let config = env.config();
    let first = env.init(&config);
    assert!(first.contains("publication 'tenant_123_pub' created for 3 table(s) WHERE (\"tenant_id\" = 'tenant-123')"), "{first}");
    assert!(
        first.contains("slot 'tenant_123_slot' created (pgoutput)"),
        "{first}"
    );
    assert!(
        first.contains("not replicated: public.settings (no tenant_id column)"),
        "{first}"
    );
    let second = env.init(&config);
    assert!(
        second.contains("publication 'tenant_123_pub' exists with all 3 table(s)"),
        "{second}"
    );
    assert!(second.contains("slot 'tenant_123_slot' exists"), "{second}");

    // A table added later is added by the next init.
    for c in [env.src().await, env.dst().await] {
        c.batch_execute("CREATE TABLE invoices(tenant_id text, id bigint, total numeric, PRIMARY KEY (tenant_id, id))")
            .await
            .expect("new table");
    }
    let third = env.init(&config);
    assert!(third.contains("added public.invoices"), "{third}");
    let filters: Vec<String> = env
        .src()
        .await
        .query(
            "SELECT rowfilter FROM pg_publication_tables WHERE pubname = 'tenant_123_pub'",
            &[],
        )
        .await
        .expect("filters")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(filters.len(), 4);
    assert!(
        filters
            .iter()
            .all(|f| f == "(tenant_id = 'tenant-123'::text)"),
        "{filters:?}"
    );
}

/// As §2.4 / §3.1 step 4 of the guide, with PostgreSQL's real row-filter syntax.
const HAND_MADE_SLOT_AND_PUBLICATION: &str =
    "SELECT pg_create_logical_replication_slot('tenant_123_slot', 'pgoutput');
     CREATE PUBLICATION tenant_123_pub FOR TABLE accounts WHERE (tenant_id = 'tenant-123'),
         orders WHERE (tenant_id = 'tenant-123'), events WHERE (tenant_id = 'tenant-123');";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_works_with_a_slot_and_publication_made_by_hand() {
    let env = Env::new(SCHEMA).await;
    env.src()
        .await
        .batch_execute(HAND_MADE_SLOT_AND_PUBLICATION)
        .await
        .expect("hand-made slot and publication");
    env.src()
        .await
        .batch_execute(
            "CREATE TABLE invoices(tenant_id text, id bigint, PRIMARY KEY (tenant_id, id))",
        )
        .await
        .expect("a table the publication leaves out");
    let daemon = env.start_daemon(&env.config());
    // The rows here are written once streaming runs (rows written before
    // are the next test's).
    wait_for_log(
        &daemon,
        "replication_start: streaming",
        Duration::from_secs(30),
    )
    .await;
    let src = env.src().await;
    src.batch_execute(
        "INSERT INTO accounts SELECT t, g, 'n', 'e', g, now() FROM generate_series(1, 20) g, (VALUES ('tenant-123'), ('tenant-9')) v(t)",
    )
    .await
    .expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    assert_eq!(foreign_rows(&env.dst().await).await, 0);
    assert_eq!(conflicts_logged(&env.dst().await).await, 0);
    let log = daemon.log();
    assert!(
        log.contains("table has a tenant_id column but is not in the publication")
            && log.contains("public.invoices"),
        "{log}"
    );
}

/// Without the slot's exported snapshot the first copy reads a newer one,
/// and the transactions committed in between are copied and then replayed:
/// the replay is expected to meet its own rows, not logged as conflicts.
/// With asynchronous commits (as on many sources) the commit records of such
/// transactions may not be written out yet when the copy starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_committed_asynchronously_before_the_first_copy_are_replayed_without_conflicts() {
    let mut env = Env::new(SCHEMA).await;
    // Asynchronous commits reach the WAL files at the WAL writer's next round.
    env.source
        .reconfigure(&[("synchronous_commit", "off"), ("wal_writer_delay", "'10s'")])
        .expect("reconfigure the source");
    let src = env.src().await;
    src.batch_execute(HAND_MADE_SLOT_AND_PUBLICATION)
        .await
        .expect("hand-made slot and publication");
    let before: String = src
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("WAL position")
        .get(0);
    src.batch_execute(
        "INSERT INTO accounts SELECT t, g, 'n', 'e', g, now() FROM generate_series(1, 20) g,
             (VALUES ('tenant-123'), ('tenant-9')) v(t)",
    )
    .await
    .expect("rows");
    let unwritten: bool = src
        .query_one(
            "SELECT pg_current_wal_lsn() < pg_current_wal_insert_lsn()",
            &[],
        )
        .await
        .expect("WAL positions")
        .get(0);
    assert!(
        unwritten,
        "the inserts' commit record is already written out: the test would prove nothing"
    );
    let daemon = env.start_daemon(&env.config());
    // The copy is done (it has the rows), then the commit record is flushed
    // and the stream replays the inserts.
    wait_for_log(
        &daemon,
        "replication_start: streaming",
        Duration::from_secs(30),
    )
    .await;
    src.batch_execute(
        "SET synchronous_commit = on;
         INSERT INTO accounts VALUES ('tenant-9', 1000, 'n', 'e', 0, now())",
    )
    .await
    .expect("a synchronous commit");
    let dst = env.dst().await;
    wait_until(Duration::from_secs(30), "the inserts' replay", || async {
        dst.query_one(
            "SELECT end_lsn > $1::text::pg_lsn FROM heliosdb_replication.progress",
            &[&before],
        )
        .await
        .expect("progress")
        .get(0)
    })
    .await;
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    assert_eq!(foreign_rows(&dst).await, 0);
    assert_eq!(conflicts_logged(&dst).await, 0, "{}", daemon.log());
}

/// The target commits without waiting for its WAL flush (as PostgreSQL's
/// apply worker does): the source is told about a commit only once the
/// target has flushed it, so a target crash that loses the last commits
/// loses nothing: the slot sends them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_crash_loses_no_change_the_source_let_go() {
    let mut env = Env::new(SCHEMA).await;
    // The target's WAL writer writes out asynchronous commits every 10 s.
    env.target
        .reconfigure(&[("wal_writer_delay", "'10s'")])
        .expect("reconfigure the target");
    let config = env.config();
    env.init(&config);
    let daemon = env.start_daemon(&config);
    let src = env.src().await;
    wait_for_log(
        &daemon,
        "replication_start: streaming",
        Duration::from_secs(30),
    )
    .await;
    src.batch_execute(
        "INSERT INTO accounts SELECT 'tenant-123', g, 'n', 'e', g, now() FROM generate_series(1, 50) g",
    )
    .await
    .expect("rows");
    let after: String = src
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("WAL position")
        .get(0);
    let dst = env.dst().await;
    async fn count(c: &tokio_postgres::Client) -> i64 {
        c.query_one(
            "SELECT count(*) FROM accounts WHERE id BETWEEN 1 AND 50",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(-1)
    }
    wait_until(
        Duration::from_secs(30),
        "the rows applied on the target",
        || async { count(&dst).await == 50 },
    )
    .await;
    // Applied and visible, not flushed: the slot has not passed them.
    let unflushed: bool = dst
        .query_one(
            "SELECT pg_current_wal_flush_lsn() < pg_current_wal_insert_lsn()",
            &[],
        )
        .await
        .expect("target WAL")
        .get(0);
    assert!(
        unflushed,
        "the target flushed already: the test would prove nothing"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let confirmed_below: bool = src
        .query_one(
            "SELECT confirmed_flush_lsn < $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'tenant_123_slot'",
            &[&after],
        )
        .await
        .expect("slot")
        .get(0);
    assert!(
        confirmed_below,
        "the slot passed commits the target had not flushed"
    );

    // The target's host fails: the commits are gone with its WAL buffers.
    drop(dst);
    env.target.crash().expect("crash the target");
    env.target.start_again().expect("start the target");
    let dst = env.dst().await;
    assert!(
        count(&dst).await < 50,
        "the crash lost the unflushed commits"
    );
    // The slot sends them again.
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &daemon).await;
    assert_eq!(count(&dst).await, 50);
    assert_eq!(conflicts_logged(&dst).await, 0, "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_stops_with_the_fix_for_each_common_mistake() {
    let env = Env::new(SCHEMA).await;
    let config = env.config();
    let src = env.src().await;

    // No slot yet.
    assert_fails(
        &config,
        &["start"],
        3,
        &["replication slot 'tenant_123_slot' does not exist", "init"],
    );
    src.batch_execute("SELECT pg_create_logical_replication_slot('tenant_123_slot', 'pgoutput')")
        .await
        .expect("slot");
    // No publication.
    assert_fails(
        &config,
        &["start"],
        3,
        &[
            "publication 'tenant_123_pub' does not exist",
            "CREATE PUBLICATION",
        ],
    );
    // A publication without the tenant filter would ship every tenant's rows.
    src.batch_execute("CREATE PUBLICATION tenant_123_pub FOR TABLE accounts")
        .await
        .expect("pub");
    assert_fails(
        &config,
        &["start"],
        3,
        &["sends every tenant's rows of public.accounts", "WHERE"],
    );
    src.batch_execute("DROP PUBLICATION tenant_123_pub")
        .await
        .expect("drop pub");

    // A table without a primary key, and one whose key leaves out the tenant column:
    // init refuses before creating anything.
    src.batch_execute(
        "CREATE TABLE nopk(tenant_id text, v int);
         CREATE TABLE badident(id bigint PRIMARY KEY, tenant_id text);",
    )
    .await
    .expect("bad tables");
    let all = assert_fails(
        &config,
        &["init"],
        3,
        &[
            "table public.nopk has no primary key",
            "column tenant_id is not part of the replica identity (id)",
            "REPLICA IDENTITY FULL",
        ],
    );
    assert!(all.contains("nothing was created"), "{all}");
    let pubs: i64 = src
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(pubs, 0);
    src.batch_execute("DROP TABLE nopk, badident")
        .await
        .expect("drop");

    // A target table missing.
    env.dst()
        .await
        .batch_execute("DROP TABLE events")
        .await
        .expect("drop target table");
    assert_fails(
        &config,
        &["init"],
        3,
        &[
            "target table public.events does not exist",
            "pg_dump --schema-only",
        ],
    );
    assert_fails(
        &config,
        &["start"],
        3,
        &["target table public.events does not exist"],
    );
    env.dst().await.batch_execute("CREATE TABLE events(tenant_id text, id bigint, kind text, created_at timestamptz, PRIMARY KEY (tenant_id, id))")
        .await
        .expect("target table without a column");
    // Under schema_changes = "halt" a missing column stops start-up; under
    // the default "apply" it is added when the stream reaches the table.
    let halt = env.write_config(
        "halt.toml",
        &env.config_text("").replace(
            "checkpoint_dir =",
            "schema_changes = \"halt\"\ncheckpoint_dir =",
        ),
    );
    assert_fails(
        &halt,
        &["start"],
        3,
        &["target table public.events lacks column(s) body"],
    );

    // A role without REPLICATION; its password never shows.
    src.batch_execute("CREATE ROLE app_ro LOGIN PASSWORD 'Sup3r-Secret-pw'; GRANT SELECT ON ALL TABLES IN SCHEMA public TO app_ro")
        .await
        .expect("role");
    let text = env.config_text("").replace(
        &env.source.superuser_url("app"),
        &env.source.url("app_ro", Some("Sup3r-Secret-pw"), "app"),
    );
    let ro = env.write_config("ro.toml", &text);
    let all = assert_fails(
        &ro,
        &["start"],
        3,
        &[
            "role 'app_ro' lacks the REPLICATION attribute",
            "ALTER ROLE \"app_ro\" WITH REPLICATION",
        ],
    );
    assert!(!all.contains("Sup3r-Secret-pw"), "password leaked:\n{all}");
    let checked = run(&ro, &["check-config"]);
    assert!(checked.status.success());
    assert!(
        checked.stdout.contains("app_ro:***@127.0.0.1"),
        "{}",
        checked.stdout
    );
    assert!(!checked.stdout.contains("Sup3r-Secret-pw"));
    // A wrong password: named, not shown.
    let wrong = env.write_config(
        "wrong.toml",
        &text.replace("Sup3r-Secret-pw", "Wr0ng-pw-XYZ"),
    );
    let all = assert_fails(&wrong, &["init"], 3, &["password authentication failed"]);
    assert!(!all.contains("Wr0ng-pw-XYZ"), "password leaked:\n{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_reported_with_the_fix() {
    let mut env = Env::new(SCHEMA).await;
    env.source
        .reconfigure(&[("wal_level", "replica")])
        .expect("restart with wal_level=replica");
    let config = env.config();
    assert_fails(
        &config,
        &["init"],
        3,
        &["wal_level is 'replica'", "wal_level = logical", "restart"],
    );
    assert_fails(&config, &["start"], 3, &["wal_level is 'replica'"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_source_is_retried_not_a_silent_exit() {
    let env = Env::new(SCHEMA).await;
    let port = pgcluster::free_port().expect("port");
    let text = env.config_text("").replace(
        &format!("127.0.0.1:{}", env.source.port()),
        &format!("127.0.0.1:{port}"),
    );
    let config = env.write_config("down.toml", &text);
    assert_fails(
        &config,
        &["init"],
        4,
        &["source", "connecting to postgresql://postgres@127.0.0.1"],
    );
    let mut daemon = env.start_daemon(&config);
    wait_until(Duration::from_secs(20), "repeated retries", || {
        let log = daemon.log();
        async move { log.matches("retrying").count() >= 3 }
    })
    .await;
    assert!(daemon.exited().is_none(), "exited:\n{}", daemon.log());
    assert!(
        daemon.log().contains("Connection refused"),
        "{}",
        daemon.log()
    );
    let (status, took) = daemon.terminate();
    assert!(
        status.success() && took < Duration::from_secs(10),
        "{status:?} {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_files_corrupted_or_from_elsewhere_are_handled() {
    let (env, config) = Env::provisioned(SCHEMA).await;
    std::fs::create_dir_all(env.checkpoint_dir()).expect("dir");
    let path = env.checkpoint_dir().join("tenant-123.checkpoint");

    // Corrupted: a clear error naming the file and the recovery; nothing applied.
    std::fs::write(&path, "{\"tenant_id\":\"tenant-123\",\"lsn\":12").expect("write");
    let all = assert_fails(
        &config,
        &["start"],
        3,
        &["checkpoint file", "is corrupted", "rm "],
    );
    assert!(all.contains(&path.display().to_string()), "{all}");

    // From another source cluster (the guide's own example): ignored, then overwritten.
    std::fs::write(
        &path,
        r#"{"tenant_id":"tenant-123","lsn":987654321,"timestamp":"2025-11-02T14:30:00Z"}"#,
    )
    .expect("write");
    let mut daemon = env.start_daemon(&config);
    env.src()
        .await
        .batch_execute("INSERT INTO events SELECT 'tenant-123', g, 'k', 'b', now() FROM generate_series(1, 10) g")
        .await
        .expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    assert!(
        daemon
            .log()
            .contains("ignoring a checkpoint file that belongs to another source or slot"),
        "{}",
        daemon.log()
    );
    let (status, _) = daemon.terminate();
    assert!(status.success());
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    assert_ne!(rec["lsn"], 987654321u64);
    assert!(rec["source_system_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
}

#[test]
fn command_line_basics() {
    let out = std::process::Command::new(BIN)
        .arg("--version")
        .output()
        .expect("run");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("heliosdb-tenant-replication {}", env!("CARGO_PKG_VERSION"))
    );
    for args in [
        vec!["--help"],
        vec!["start", "--help"],
        vec!["init", "--help"],
        vec!["check-config", "--help"],
    ] {
        let out = std::process::Command::new(BIN)
            .args(&args)
            .output()
            .expect("run");
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
    let out = std::process::Command::new(BIN)
        .arg("bogus")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));

    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("nope.toml");
    let out = run(&missing, &["start"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr.contains("nope.toml") && out.stderr.contains("cannot read"),
        "{}",
        out.stderr
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[replication]\ntenant_id = \"t\"\nsource_connection = \"postgresql://u:pw@a/db\"\ntarget_connection = \"postgresql://u:pw@b/db\"\n[cdc]\nbatch_sise = 5\n").expect("write");
    let out = run(&bad, &["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr.contains("[cdc] batch_sise") && out.stderr.contains("batch_size"),
        "{}",
        out.stderr
    );

    // Environment overrides (§3.3) and masking.
    let ok = dir.path().join("ok.toml");
    std::fs::write(
        &ok,
        "[replication]\ntenant_id = \"t\"\n[features]\nenable_encryption = true\n",
    )
    .expect("write");
    let out = std::process::Command::new(BIN)
        .args(["--config", ok.to_str().expect("utf8"), "check-config"])
        .env(
            "REPLICATION_SOURCE_CONNECTION",
            "postgresql://src:EnvSecret1@source-db:5432/source",
        )
        .env(
            "REPLICATION_TARGET_CONNECTION",
            "postgresql://dst:EnvSecret2@target-db:5432/target",
        )
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("src:***@source-db:5432/source"), "{stdout}");
    assert!(!stdout.contains("EnvSecret"), "{stdout}");
    assert!(
        stdout.contains("[encryption]: no effect with [transport] mode = \"local\""),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_from_another_source_cluster_is_refused() {
    let (env, config) = Env::provisioned(SCHEMA).await;
    let mut daemon = env.start_daemon(&config);
    env.src()
        .await
        .batch_execute("INSERT INTO events SELECT 'tenant-123', g, 'k', 'b', now() FROM generate_series(1, 10) g")
        .await
        .expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(30), &daemon).await;
    assert!(daemon.terminate().0.success());
    // As if the target had been fed from another (restored, rebuilt) source.
    env.dst()
        .await
        .batch_execute("UPDATE heliosdb_replication.progress SET source_system_id = '1234567890'")
        .await
        .expect("tamper");
    assert_fails(
        &config,
        &["start"],
        3,
        &[
            "was written by another source (source system 1234567890",
            "DELETE FROM heliosdb_replication.progress",
        ],
    );
}

/// The runbook's scenario 2 (docs/runbook.md): the target is restored from
/// an older backup. Its progress rows go back with it, behind what the
/// slot was confirmed to; the changes in between are gone from the slot.
/// `start` refuses the tenant (exit 3, `init --resync` named) instead of
/// resuming across the gap, and `init --resync` makes it equal again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_restored_from_an_older_backup_is_refused_then_resynced() {
    let (mut env, config) = Env::provisioned(SCHEMA).await;
    let src = env.src().await;
    let insert = |from: i64, to: i64| {
        format!("INSERT INTO orders SELECT 'tenant-123', g, 1, 'new', g, '{{}}', now() FROM generate_series({from}, {to}) g")
    };
    src.batch_execute(&insert(1, 100)).await.expect("rows");
    let mut daemon = env.start_daemon(&config);
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &daemon).await;
    assert_eq!(daemon.terminate().0.code(), Some(0));

    // The backup: a copy of the stopped target's data directory.
    let backup = env.dir.path().join("target-backup");
    env.target.stop().expect("stop target");
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        let ok = std::process::Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .expect("cp");
        assert!(ok.success());
    };
    copy(env.target.data_dir(), &backup);
    env.target.start_again().expect("start target");

    // Replication goes on past the backup; the slot is confirmed past it.
    let mut daemon = env.start_daemon(&config);
    src.batch_execute(&insert(101, 200)).await.expect("rows");
    src.batch_execute("UPDATE orders SET status = 'paid' WHERE id <= 50")
        .await
        .expect("update");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &daemon).await;
    assert_eq!(daemon.terminate().0.code(), Some(0));

    // The target is restored from the backup.
    env.target.stop().expect("stop target");
    let data = env.target.data_dir().to_path_buf();
    std::fs::remove_dir_all(&data).expect("remove data directory");
    copy(&backup, &data);
    env.target.start_again().expect("start the restored target");
    assert_eq!(tenant_count(&env.dst().await, "orders", TENANT).await, 100);

    assert_fails(&config, &["start"], 3, &["init --resync"]);
    let out = env.init_with(&config, &["--resync"]);
    assert!(out.contains("deleted, to be copied again"), "{out}");
    let daemon = env.start_daemon(&config);
    src.batch_execute(&insert(201, 210)).await.expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &daemon).await;
    assert_eq!(tenant_count(&env.dst().await, "orders", TENANT).await, 210);
}
