//! Tables PostgreSQL's own logical replication handles, replicated value
//! for value: PostgreSQL's subscription to the same row-filtered
//! publication runs beside the daemon and must end equal to it and to the
//! source.

mod common;

use std::time::Duration;

use common::*;

/// Types whose modifier matters, a primary key with INCLUDE columns, and a
/// replica identity on a unique index other than the primary key.
const SHAPES: &str = "
CREATE TABLE typed(tenant_id text, id int, c char(5), vc varchar(4), n numeric(6,2), b bit(4),
                   vb bit varying(3), ts timestamp(0), tz timestamptz(1), iv interval minute,
                   ca char(3)[], na numeric(4,1)[], PRIMARY KEY (tenant_id, id));
CREATE TABLE included(tenant_id text, id int, note text, PRIMARY KEY (tenant_id, id) INCLUDE (note));
CREATE TABLE by_email(tenant_id text NOT NULL, id int PRIMARY KEY, email text NOT NULL, name text);
CREATE UNIQUE INDEX by_email_key ON by_email (tenant_id, email);
ALTER TABLE by_email REPLICA IDENTITY USING INDEX by_email_key;
CREATE TABLE switched(tenant_id text, id int, code text NOT NULL, v int, PRIMARY KEY (tenant_id, id));
CREATE UNIQUE INDEX switched_code ON switched (tenant_id, code);
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modifiers_include_columns_and_identity_indexes_replicate_as_postgresql_does() {
    let env = Env::new(SHAPES).await;
    let config = env.config();
    let src = env.src().await;
    // Rows before init: the initial copy; the same values again from the stream.
    let typed_rows = |from: i32| {
        format!(
            "INSERT INTO typed SELECT t, g, 'ab', 'äöü', g * 1.005, B'1010', B'101', '2026-01-02 03:04:05.6'::timestamp,
                    '2026-01-02 03:04:05.66+00', interval '3 hours 4 minutes 5 seconds', ARRAY['x', 'äö'], ARRAY[1.25, 2.35]
               FROM generate_series({from}, {from} + 4) g, (VALUES ('tenant-123'), ('tenant-456')) v(t)"
        )
    };
    src.batch_execute(&typed_rows(1)).await.expect("typed rows");
    src.batch_execute(
        "INSERT INTO included VALUES ('tenant-123', 1, 'one'), ('tenant-456', 1, 'other');
         INSERT INTO by_email VALUES ('tenant-123', 1, 'a@x', 'a'), ('tenant-456', 2, 'b@x', 'b');
         INSERT INTO switched VALUES ('tenant-123', 1, 'c1', 1);",
    )
    .await
    .expect("rows before init");
    env.init(&config);
    pg_reference(&env, SHAPES).await;
    let daemon = env.start_daemon(&config);

    src.batch_execute(&typed_rows(100))
        .await
        .expect("typed rows");
    src.batch_execute(
        "UPDATE typed SET c = 'xyz', vc = 'ab', n = n + 0.004, ca = ARRAY['abc    ', 'z'] WHERE tenant_id = 'tenant-123' AND id IN (1, 100);
         INSERT INTO included SELECT 'tenant-123', g, 'n' || g FROM generate_series(2, 50) g;
         UPDATE included SET note = 'changed' WHERE tenant_id = 'tenant-123' AND id % 3 = 0;
         DELETE FROM included WHERE tenant_id = 'tenant-123' AND id % 5 = 0;
         INSERT INTO by_email SELECT 'tenant-123', g, 'u' || g || '@x', 'n' FROM generate_series(10, 40) g;
         UPDATE by_email SET name = 'renamed' WHERE tenant_id = 'tenant-123' AND id % 2 = 0;
         UPDATE by_email SET email = 'moved' || id || '@x' WHERE tenant_id = 'tenant-123' AND id % 7 = 0;
         DELETE FROM by_email WHERE tenant_id = 'tenant-123' AND id % 5 = 0;
         INSERT INTO switched SELECT 'tenant-123', g, 'c' || g, g FROM generate_series(2, 20) g;",
    )
    .await
    .expect("changes");
    // The identity moves to another unique index while rows stream.
    src.batch_execute(
        "ALTER TABLE switched REPLICA IDENTITY USING INDEX switched_code;
         UPDATE switched SET v = v + 100 WHERE tenant_id = 'tenant-123' AND id % 2 = 0;
         DELETE FROM switched WHERE tenant_id = 'tenant-123' AND id % 3 = 0;
         INSERT INTO switched VALUES ('tenant-123', 99, 'c99', 99);",
    )
    .await
    .expect("identity switch");

    wait_equal_to_reference(
        &env,
        &["typed", "included", "by_email", "switched"],
        &daemon,
    )
    .await;
    let dst = env.dst().await;
    let c: String = dst
        .query_one(
            "SELECT c || '|' || vc FROM typed WHERE tenant_id = 'tenant-123' AND id = 100",
            &[],
        )
        .await
        .expect("typed row")
        .get(0);
    assert_eq!(c, "xyz|ab", "char(5) and varchar(4) kept whole");
    assert!(!daemon.log().contains(" ERROR "), "{}", daemon.log());
}

/// A child table (copied first: its name sorts first) referencing a parent
/// that takes longer to copy.
const LINKED: &str = "
CREATE TABLE b_parent(tenant_id text, id int, body text, PRIMARY KEY (tenant_id, id));
CREATE TABLE a_child(tenant_id text, id int, parent int, PRIMARY KEY (tenant_id, id),
                     FOREIGN KEY (tenant_id, parent) REFERENCES b_parent ON DELETE CASCADE);
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_linked_by_a_foreign_key_copy_and_stream_in_any_order() {
    let env = Env::new(LINKED).await;
    let config = env.config();
    let src = env.src().await;
    src.batch_execute(
        "INSERT INTO b_parent SELECT t, g, repeat('p', 500) FROM generate_series(1, 20000) g,
                (VALUES ('tenant-123'), ('tenant-456')) v(t);
         INSERT INTO a_child SELECT t, g, g FROM generate_series(1, 2000) g,
                (VALUES ('tenant-123'), ('tenant-456')) v(t);",
    )
    .await
    .expect("rows before init");
    env.init(&config);
    pg_reference(&env, LINKED).await;
    let daemon = env.start_daemon(&config);
    // Streamed: parents and children in one transaction, deletes that cascade.
    src.batch_execute(
        "BEGIN;
         INSERT INTO b_parent SELECT 'tenant-123', 30000 + g, 'new' FROM generate_series(1, 50) g;
         INSERT INTO a_child SELECT 'tenant-123', 100000 + g, 30000 + g FROM generate_series(1, 50) g;
         COMMIT;
         DELETE FROM b_parent WHERE tenant_id = 'tenant-123' AND id <= 100;",
    )
    .await
    .expect("changes");
    wait_equal_to_reference(&env, &["b_parent", "a_child"], &daemon).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_moved_into_the_tenant_with_an_unchanged_large_value_arrives_whole() {
    const DOCS: &str = "CREATE TABLE docs(tenant_id text, id int, title text, body text,
                                          PRIMARY KEY (tenant_id, id));";
    let (env, config) = Env::provisioned(DOCS).await;
    let daemon = env.start_daemon(&config);
    let src = env.src().await;
    // A value stored out of line (TOAST): 6,400 incompressible characters.
    src.batch_execute(
        "INSERT INTO docs SELECT t, 1, 'doc', (SELECT string_agg(md5(g::text || t), '') FROM generate_series(1, 200) g)
           FROM (VALUES ('tenant-123'), ('tenant-456')) v(t);
         INSERT INTO docs VALUES ('tenant-456', 2, 'other', 'small');",
    )
    .await
    .expect("rows");
    wait_tenant_equal(&env, &["docs"], Duration::from_secs(30), &daemon).await;
    // Moved into the tenant; the large value is not changed, so not sent.
    src.batch_execute(
        "UPDATE docs SET tenant_id = 'tenant-123', id = 10, title = 'moved' WHERE tenant_id = 'tenant-456' AND id = 1",
    )
    .await
    .expect("move");
    wait_tenant_equal(&env, &["docs"], Duration::from_secs(30), &daemon).await;
    let body: Option<String> = env
        .dst()
        .await
        .query_one(
            "SELECT body FROM docs WHERE tenant_id = 'tenant-123' AND id = 10",
            &[],
        )
        .await
        .expect("moved row")
        .get(0);
    assert_eq!(body.map(|b| b.len()), Some(6400));
    assert!(
        daemon.log().contains("the table is copied again"),
        "{}",
        daemon.log()
    );
    assert_eq!(foreign_rows_of(&env.dst().await, "docs").await, 0);
}

/// Partitioned tables and an inheritance tree on the source.
const TREES_SOURCE: &str = "
CREATE TABLE measures(tenant_id text, id int, region text, v numeric,
                      PRIMARY KEY (tenant_id, id, region)) PARTITION BY LIST (region);
CREATE TABLE measures_eu PARTITION OF measures FOR VALUES IN ('eu');
CREATE TABLE measures_us PARTITION OF measures FOR VALUES IN ('us');
CREATE TABLE logs(tenant_id text, id int, at date, line text, PRIMARY KEY (tenant_id, id, at))
    PARTITION BY RANGE (at);
CREATE TABLE logs_2025 PARTITION OF logs FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE logs_2026 PARTITION OF logs FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE base(tenant_id text, id int, note text, PRIMARY KEY (tenant_id, id));
CREATE TABLE derived(extra text, PRIMARY KEY (tenant_id, id)) INHERITS (base);
";

/// The target: `measures` partitioned another way, `logs` not at all.
const TREES_TARGET: &str = "
CREATE TABLE measures(tenant_id text, id int, region text, v numeric,
                      PRIMARY KEY (tenant_id, id, region)) PARTITION BY HASH (id);
CREATE TABLE measures_h0 PARTITION OF measures FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE measures_h1 PARTITION OF measures FOR VALUES WITH (MODULUS 2, REMAINDER 1);
CREATE TABLE logs(tenant_id text, id int, at date, line text, PRIMARY KEY (tenant_id, id, at));
CREATE TABLE base(tenant_id text, id int, note text, PRIMARY KEY (tenant_id, id));
CREATE TABLE derived(extra text, PRIMARY KEY (tenant_id, id)) INHERITS (base);
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_and_inheritance_replicate_as_postgresql_does() {
    let env = Env::with_schemas(TREES_SOURCE, TREES_TARGET).await;
    let config = env.config();
    let src = env.src().await;
    src.batch_execute(
        "INSERT INTO measures SELECT t, g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, g
           FROM generate_series(1, 50) g, (VALUES ('tenant-123'), ('tenant-456')) v(t);
         INSERT INTO logs SELECT t, g, date '2025-12-20' + g, 'l' || g
           FROM generate_series(1, 30) g, (VALUES ('tenant-123'), ('tenant-456')) v(t);
         INSERT INTO base SELECT t, g, 'base' FROM generate_series(1, 10) g, (VALUES ('tenant-123'), ('tenant-456')) v(t);
         INSERT INTO derived SELECT t, g, 'derived', 'x' FROM generate_series(5, 15) g, (VALUES ('tenant-123'), ('tenant-456')) v(t);",
    )
    .await
    .expect("rows before init");
    let out = env.init(&config);
    assert!(
        out.contains("a partition: replicated through its partitioned table"),
        "{out}"
    );
    pg_reference(&env, TREES_TARGET).await;
    let daemon = env.start_daemon(&config);
    src.batch_execute(
        "INSERT INTO measures SELECT 'tenant-123', g, 'eu', g FROM generate_series(100, 120) g;
         UPDATE measures SET region = 'eu', v = v + 1000 WHERE tenant_id = 'tenant-123' AND region = 'us' AND id <= 9;
         UPDATE measures SET v = -v WHERE tenant_id = 'tenant-123' AND id BETWEEN 20 AND 30;
         DELETE FROM measures WHERE tenant_id = 'tenant-123' AND id BETWEEN 40 AND 45;
         UPDATE logs SET at = at + 30, line = 'moved' WHERE tenant_id = 'tenant-123' AND id <= 5;
         DELETE FROM logs WHERE tenant_id = 'tenant-123' AND id > 25;
         UPDATE derived SET note = 'changed', extra = 'y' WHERE tenant_id = 'tenant-123' AND id <= 7;
         DELETE FROM ONLY base WHERE tenant_id = 'tenant-123' AND id BETWEEN 5 AND 8;
         UPDATE ONLY base SET note = 'only base' WHERE tenant_id = 'tenant-123' AND id = 9;
         INSERT INTO derived VALUES ('tenant-123', 1, 'same key as a base row', 'z');",
    )
    .await
    .expect("changes");
    wait_equal_to_reference(&env, &["measures", "logs", "base", "derived"], &daemon).await;
    // The inheritance parent's own rows, and the child's, separately.
    let dst = env.dst().await;
    assert_eq!(
        tenant_rows(&dst, "ONLY base").await,
        tenant_rows(&src, "ONLY base").await
    );
    assert_eq!(foreign_rows_of(&dst, "measures").await, 0);
    assert_eq!(foreign_rows_of(&dst, "base").await, 0);
}

/// No primary key, REPLICA IDENTITY FULL: rows may repeat.
const KEYLESS: &str = "
CREATE TABLE readings(tenant_id text, sensor text, v numeric, payload json, at timestamptz);
ALTER TABLE readings REPLICA IDENTITY FULL;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_key_replicates_with_full_identity_as_postgresql_does() {
    let env = Env::new(KEYLESS).await;
    let config = env.config();
    let src = env.src().await;
    let rows = "INSERT INTO readings SELECT t, 's' || (g % 3), g % 2, json_build_object('g', g % 2), '2026-01-01'::timestamptz
                  FROM generate_series(1, 12) g, (VALUES ('tenant-123'), ('tenant-456')) v(t)";
    src.batch_execute(rows).await.expect("rows before init");
    env.init(&config);
    pg_reference(&env, KEYLESS).await;
    let mut daemon = env.start_daemon(&config);
    src.batch_execute(rows).await.expect("the same rows again");
    src.batch_execute(
        "INSERT INTO readings VALUES ('tenant-123', NULL, NULL, NULL, NULL), ('tenant-123', NULL, NULL, NULL, NULL);
         -- one of several equal rows
         UPDATE readings SET v = 99 WHERE ctid = (SELECT ctid FROM readings WHERE tenant_id = 'tenant-123' AND sensor = 's1' LIMIT 1);
         DELETE FROM readings WHERE ctid = (SELECT ctid FROM readings WHERE tenant_id = 'tenant-123' AND sensor = 's2' LIMIT 1);
         UPDATE readings SET sensor = 'was null' WHERE ctid = (SELECT ctid FROM readings WHERE tenant_id = 'tenant-123' AND sensor IS NULL LIMIT 1);
         UPDATE readings SET payload = '{\"changed\": true}' WHERE tenant_id = 'tenant-123' AND sensor = 's0' AND v = 1;",
    )
    .await
    .expect("changes");
    wait_equal_to_reference(&env, &["readings"], &daemon).await;
    assert!(
        !daemon.log().contains("no row equal to the old image"),
        "{}",
        daemon.log()
    );

    // A copy the stream replays over would double rows without a key: refused.
    let out = run(&config, &["resync", "--table", "readings"]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    daemon.assert_stops_with(&["table public.readings has no key", "init --resync"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_without_a_key_missing_on_the_target_stops_the_tenant() {
    let (env, config) = Env::provisioned(KEYLESS).await;
    let mut daemon = env.start_daemon(&config);
    let src = env.src().await;
    src.batch_execute("INSERT INTO readings VALUES ('tenant-123', 'a', 1, '{}', now())")
        .await
        .expect("row");
    let (s, d) = (env.src().await, env.dst().await);
    wait_until(Duration::from_secs(30), "the row to arrive", || async {
        tenant_rows(&s, "readings").await == tenant_rows(&d, "readings").await
    })
    .await;
    env.dst()
        .await
        .batch_execute("DELETE FROM readings")
        .await
        .expect("lost on the target");
    src.batch_execute("UPDATE readings SET v = 2")
        .await
        .expect("update");
    daemon.assert_stops_with(&["found no row equal to the source's old row"]);
}

/// Many types (ranges, arrays, enums, domains, composites, network and
/// text-search types), and a target whose columns come in another order,
/// with a column of its own.
const TYPES_SOURCE: &str = "
CREATE TYPE color AS ENUM ('red', 'green', 'blue');
CREATE DOMAIN short_code AS varchar(5) CHECK (VALUE ~ '^[a-z]+$');
CREATE TYPE pair AS (a int, b text);
CREATE TABLE kinds(tenant_id text, id int, r int4range, tr tstzrange, c color, cs color[], d short_code,
                   p pair, ip inet, mac macaddr, u uuid, b bytea, j jsonb, tv tsvector, m money,
                   f float8, ff real[], bits varbit, t time(2), PRIMARY KEY (tenant_id, id));
";
const TYPES_TARGET: &str = "
CREATE TYPE color AS ENUM ('red', 'green', 'blue');
CREATE DOMAIN short_code AS varchar(5) CHECK (VALUE ~ '^[a-z]+$');
CREATE TYPE pair AS (a int, b text);
CREATE TABLE kinds(local_note text DEFAULT 'target only', t time(2), bits varbit, ff real[], f float8,
                   m money, tv tsvector, j jsonb, b bytea, u uuid, mac macaddr, ip inet, p pair,
                   d short_code, cs color[], c color, tr tstzrange, r int4range, id int, tenant_id text,
                   PRIMARY KEY (tenant_id, id));
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_types_into_a_target_with_another_column_order_as_postgresql_does() {
    let env = Env::with_schemas(TYPES_SOURCE, TYPES_TARGET).await;
    let config = env.config();
    let src = env.src().await;
    let rows = |from: i32| {
        format!(
            "INSERT INTO kinds SELECT t, g, int4range(g, g + 10), tstzrange('2026-01-01', '2026-02-01 12:00:00.123456+02'),
                    'green', ARRAY['red', 'blue']::color[], 'abc', ROW(g, 'x,\"y\"')::pair, '10.0.0.1/24', '08:00:2b:01:02:03',
                    md5(g::text)::uuid, decode('00ff10', 'hex'), jsonb_build_object('k', g, 'n', NULL), to_tsvector('english', 'the quick foxes'),
                    12.34, 1.0 / 3, ARRAY[0.1, 1e-30]::real[], B'10101', '12:34:56.789'
               FROM generate_series({from}, {from} + 9) g, (VALUES ('tenant-123'), ('tenant-456')) v(t)"
        )
    };
    src.batch_execute(&rows(1)).await.expect("rows before init");
    env.init(&config);
    pg_reference(&env, TYPES_TARGET).await;
    let daemon = env.start_daemon(&config);
    src.batch_execute(&rows(100)).await.expect("rows");
    src.batch_execute(
        "UPDATE kinds SET r = 'empty', c = 'blue', p = ROW(NULL, NULL), j = '[1, 2.50, \"x\"]', f = 'NaN', ff = '{-Infinity}'
          WHERE tenant_id = 'tenant-123' AND id % 3 = 0;
         DELETE FROM kinds WHERE tenant_id = 'tenant-123' AND id % 5 = 0;",
    )
    .await
    .expect("changes");
    wait_equal_to_reference(&env, &["kinds"], &daemon).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_moving_into_and_out_of_the_tenant_and_truncate_replicate_as_postgresql_does() {
    let (env, config) = Env::provisioned(SCHEMA).await;
    pg_reference(&env, SCHEMA).await;
    let daemon = env.start_daemon(&config);
    let src = env.src().await;
    src.batch_execute(
        "INSERT INTO accounts SELECT t, g, 'n' || g, 'e', g, now() FROM generate_series(1, 40) g,
                (VALUES ('tenant-123'), ('tenant-456')) v(t);
         INSERT INTO orders SELECT 'tenant-123', g, g, 'new', g, '{}', now() FROM generate_series(1, 20) g;
         -- out of the tenant (a delete for it), into it (an insert), within it with a new key
         UPDATE accounts SET tenant_id = 'tenant-456', id = id + 1000 WHERE tenant_id = 'tenant-123' AND id <= 5;
         UPDATE accounts SET tenant_id = 'tenant-123', id = id + 2000 WHERE tenant_id = 'tenant-456' AND id BETWEEN 10 AND 14;
         UPDATE accounts SET id = id + 3000, name = 'moved' WHERE tenant_id = 'tenant-123' AND id BETWEEN 20 AND 22;
         -- in and out within one transaction
         BEGIN;
         UPDATE accounts SET tenant_id = 'tenant-123', id = 4030 WHERE tenant_id = 'tenant-456' AND id = 30;
         UPDATE accounts SET name = 'visited' WHERE tenant_id = 'tenant-123' AND id = 4030;
         UPDATE accounts SET tenant_id = 'tenant-456' WHERE tenant_id = 'tenant-123' AND id = 4030;
         COMMIT;
         TRUNCATE orders;
         INSERT INTO orders VALUES ('tenant-123', 1, 1, 'after truncate', 1, '{}', now());",
    )
    .await
    .expect("changes");
    wait_equal_to_reference(&env, &["accounts", "orders"], &daemon).await;
    assert_eq!(foreign_rows(&env.dst().await).await, 0);
}

/// The source computes `doubled`, which pgoutput never sends; the target
/// computes its own (another expression) and has columns the source lacks,
/// filled by their defaults.
const GENERATED_SOURCE: &str = "
CREATE TABLE gen(tenant_id text, id int, a int, doubled int GENERATED ALWAYS AS (a * 2) STORED,
                 PRIMARY KEY (tenant_id, id));
";
const GENERATED_TARGET: &str = "
CREATE TABLE gen(tenant_id text, id int, a int, doubled int GENERATED ALWAYS AS (a * 22) STORED,
                 extra text DEFAULT 'target default', counted int GENERATED ALWAYS AS (id + 1000) STORED,
                 PRIMARY KEY (tenant_id, id));
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_columns_and_target_only_columns_as_postgresql_does() {
    let env = Env::with_schemas(GENERATED_SOURCE, GENERATED_TARGET).await;
    let config = env.config();
    let src = env.src().await;
    let rows = |from: i32| {
        format!(
            "INSERT INTO gen(tenant_id, id, a) SELECT t, g, g FROM generate_series({from}, {from} + 9) g,
                    (VALUES ('tenant-123'), ('tenant-456')) v(t)"
        )
    };
    src.batch_execute(&rows(1)).await.expect("rows before init");
    env.init(&config);
    pg_reference(&env, GENERATED_TARGET).await;
    let daemon = env.start_daemon(&config);
    src.batch_execute(&rows(100)).await.expect("rows");
    src.batch_execute(
        "UPDATE gen SET a = a + 7 WHERE tenant_id = 'tenant-123' AND id % 3 = 0;
         DELETE FROM gen WHERE tenant_id = 'tenant-123' AND id % 4 = 0;",
    )
    .await
    .expect("changes");

    // Every target column, the target's own included, equal to PostgreSQL's
    // subscriber; the replicated ones equal to the source.
    let (d, r) = (
        env.dst().await,
        env.target.connect("pgref").await.expect("pgref"),
    );
    let all =
        "SELECT id, a, doubled, extra, counted FROM gen WHERE tenant_id = 'tenant-123' ORDER BY id";
    let text = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
        rows.iter()
            .map(|r| {
                let v: (i32, i32, i32, String, i32) =
                    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
                format!("{v:?}")
            })
            .collect()
    };
    let source: Vec<(i32, i32)> = src
        .query(
            "SELECT id, a FROM gen WHERE tenant_id = 'tenant-123' ORDER BY id",
            &[],
        )
        .await
        .expect("source rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected: Vec<String> = source
        .iter()
        .map(|&(id, a)| {
            format!(
                "{:?}",
                (id, a, a * 22, "target default".to_string(), id + 1000)
            )
        })
        .collect();
    let (d, r, expected) = (&d, &r, &expected);
    wait_until(
        Duration::from_secs(60),
        "target and PostgreSQL's subscriber hold the source's rows",
        move || async move {
            text(d.query(all, &[]).await.expect("target rows")) == *expected
                && text(r.query(all, &[]).await.expect("reference rows")) == *expected
        },
    )
    .await;
    assert_eq!(foreign_rows_of(d, "gen").await, 0);
    assert!(!daemon.log().contains(" ERROR "), "{}", daemon.log());
}
