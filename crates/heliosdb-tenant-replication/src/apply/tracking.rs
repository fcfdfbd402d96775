//! Version tracking on a target, and tagging the daemon's own writes.
//!
//! * **Local writes.** For each replicated table the daemon installs two
//!   row triggers on the target (one pair per node, whichever tenants it
//!   replicates there: their ids are inlined in the trigger function). A `BEFORE` trigger announces
//!   the row's next version in the WAL (`pg_logical_emit_message`,
//!   transactional, prefix [`VERSION_PREFIX`]) right before the row change,
//!   so a daemon reading this database as its source ships the version with
//!   the change; an `AFTER` trigger stores that version in
//!   `heliosdb_replication.row_version` (a row that was not written, e.g.
//!   `INSERT … ON CONFLICT DO NOTHING`, stores nothing). The triggers skip
//!   the daemon's own writes: those run with `session_replication_role =
//!   replica` (ordinary triggers do not fire) or, for a role that may not
//!   set it, with `heliosdb.applying = on`.
//! * **Commit times.** A local write's version time is its transaction's
//!   commit timestamp (`track_commit_timestamp = on`), read from the
//!   `row_version` tuple's xmin, the same value the other region receives
//!   with the change. Without the setting, the write's transaction start time
//!   stands in (the daemon warns: LastWriteWins then compares start times).
//! * **Loops.** The applier's session is tagged with a replication origin
//!   (`heliosdb_<tenant>`); pgoutput sends an Origin message for such
//!   transactions (PostgreSQL 15 has no `origin = none` option), and the
//!   capture side drops transactions whose origin starts with `heliosdb_`.

use tokio_postgres::Client;

use super::catalog::TableMapping;
use super::sql::{key_aliases, key_match, text_arrays};
use crate::error::{on_target as target_err, ReplicationError, Result, Side};
use crate::pg::{quote_ident, quote_literal};

pub use crate::capture::{ORIGIN_PREFIX, VERSION_PREFIX};

/// The daemon's tables and functions for row versions (part of the schema
/// DDL, idempotent).
pub const VERSION_DDL: &str = "
CREATE TABLE IF NOT EXISTS heliosdb_replication.row_version (
    tenant_id  text NOT NULL,
    table_name text NOT NULL,
    pk         text[] NOT NULL,
    node       text NOT NULL,
    -- Source commit time, µs since 2000-01-01 (local writes: see local_write).
    time_us    bigint NOT NULL,
    vclock     jsonb NOT NULL,
    deleted    boolean NOT NULL DEFAULT false,
    -- Written by the local-write trigger: the time is the commit timestamp
    -- of this tuple's xmin (when track_commit_timestamp is on).
    local_write boolean NOT NULL DEFAULT false,
    PRIMARY KEY (tenant_id, table_name, pk)
);
-- The tenants whose local writes each table's trigger of a node tracks.
CREATE TABLE IF NOT EXISTS heliosdb_replication.tracked_tenant (
    table_name text NOT NULL,
    node       text NOT NULL,
    tenant_id  text NOT NULL,
    PRIMARY KEY (table_name, node, tenant_id)
);
CREATE OR REPLACE FUNCTION heliosdb_replication.next_vclock(p_tenant text, p_table text, p_pk text[], p_node text)
RETURNS jsonb LANGUAGE sql STABLE AS $f$
    SELECT COALESCE(v.vclock, '{}'::jsonb)
           || jsonb_build_object(p_node, COALESCE((v.vclock ->> p_node)::bigint, 0) + 1)
      FROM (SELECT 1) AS one
      LEFT JOIN heliosdb_replication.row_version v
        ON v.tenant_id = p_tenant AND v.table_name = p_table AND v.pk = p_pk
$f$;
CREATE OR REPLACE FUNCTION heliosdb_replication.announce_version(p_tenant text, p_table text, p_pk text[], p_node text, p_deleted boolean)
RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM pg_logical_emit_message(true, 'heliosdb_version', jsonb_build_object(
        'tenant', p_tenant, 'table', p_table, 'pk', to_jsonb(p_pk), 'node', p_node,
        'vclock', heliosdb_replication.next_vclock(p_tenant, p_table, p_pk, p_node),
        'deleted', p_deleted)::text);
END
$f$;
CREATE OR REPLACE FUNCTION heliosdb_replication.record_version(p_tenant text, p_table text, p_pk text[], p_node text, p_deleted boolean)
RETURNS void LANGUAGE sql AS $f$
    INSERT INTO heliosdb_replication.row_version AS v
           (tenant_id, table_name, pk, node, time_us, vclock, deleted, local_write)
    VALUES (p_tenant, p_table, p_pk, p_node,
            (extract(epoch FROM now() - timestamptz '2000-01-01 00:00:00+00') * 1000000)::bigint,
            heliosdb_replication.next_vclock(p_tenant, p_table, p_pk, p_node), p_deleted, true)
    ON CONFLICT (tenant_id, table_name, pk) DO UPDATE SET
           node = EXCLUDED.node, time_us = EXCLUDED.time_us, vclock = EXCLUDED.vclock,
           deleted = EXCLUDED.deleted, local_write = true
$f$;
";

/// A target table as the triggers need it.
pub struct Tracked<'a> {
    /// `schema.table`.
    pub display: &'a str,
    /// `"schema"."table"`.
    pub target: &'a str,
    pub tenant_column: &'a str,
    /// Primary key columns in key order.
    pub key: Vec<&'a str>,
}

impl<'a> From<&'a TableMapping> for Tracked<'a> {
    fn from(m: &'a TableMapping) -> Self {
        Self {
            display: &m.display,
            target: &m.target,
            tenant_column: m.column_name(m.tenant),
            key: m.key.iter().map(|&i| m.column_name(i)).collect(),
        }
    }
}

/// The trigger function of one table and node: its key columns and the
/// tenants it tracks inlined (a local write of another tenant's row is not
/// tracked, as before any tenant was replicated here).
pub fn function_sql(m: &Tracked<'_>, node: &str, tenants: &[String]) -> String {
    let tenant_col = quote_ident(m.tenant_column);
    let key = |rec: &str| {
        let parts: Vec<String> = m
            .key
            .iter()
            .map(|c| format!("{rec}.{}::text", quote_ident(c)))
            .collect();
        format!("ARRAY[{}]", parts.join(", "))
    };
    let table = quote_literal(m.display);
    let tenants = format!(
        "ARRAY[{}]::text[]",
        tenants
            .iter()
            .map(|t| quote_literal(t))
            .collect::<Vec<_>>()
            .join(", ")
    );
    format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $f$
DECLARE
    old_pk text[];
    new_pk text[];
    old_t text;
    new_t text;
BEGIN
    IF current_setting('heliosdb.applying', true) = 'on' THEN
        IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
        RETURN NEW;
    END IF;
    IF TG_OP <> 'INSERT' AND OLD.{tenant_col}::text = ANY ({tenants}) THEN
        old_t := OLD.{tenant_col}::text; old_pk := {old};
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.{tenant_col}::text = ANY ({tenants}) THEN
        new_t := NEW.{tenant_col}::text; new_pk := {new};
    END IF;
    IF TG_WHEN = 'BEFORE' THEN
        IF new_pk IS NOT NULL THEN
            PERFORM heliosdb_replication.announce_version(new_t, {table}, new_pk, TG_ARGV[0], false);
        ELSIF old_pk IS NOT NULL THEN
            PERFORM heliosdb_replication.announce_version(old_t, {table}, old_pk, TG_ARGV[0], true);
        END IF;
        IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
        RETURN NEW;
    END IF;
    IF old_pk IS NOT NULL AND (old_t, old_pk) IS DISTINCT FROM (new_t, new_pk) THEN
        PERFORM heliosdb_replication.record_version(old_t, {table}, old_pk, TG_ARGV[0], true);
    END IF;
    IF new_pk IS NOT NULL THEN
        PERFORM heliosdb_replication.record_version(new_t, {table}, new_pk, TG_ARGV[0], false);
    END IF;
    RETURN NULL;
END
$f$;",
        function = function_name(m, node),
        old = key("OLD"),
        new = key("NEW"),
    )
}

/// The trigger function of a table and node.
fn function_name(m: &Tracked<'_>, node: &str) -> String {
    format!(
        "heliosdb_replication.{}",
        quote_ident(&format!(
            "track_{}",
            short_hash(&format!("{}/{node}", m.display))
        ))
    )
}

/// The two triggers of a node on a table (BEFORE triggers fire in name
/// order: ours last, after any that may change or skip the row).
fn trigger_names(node: &str) -> [String; 2] {
    let h = short_hash(node);
    [format!("zz_heliosdb_n{h}_b"), format!("zz_heliosdb_n{h}_a")]
}

/// The advisory lock (transaction scope) taken while the daemon's schema or
/// version tracking is installed on a target database.
const INSTALL_LOCK: i64 = 0x0068_656c_696f_7301;

/// Install (or extend to `tenant`) the local-write triggers of one table:
/// one pair per table and node, whichever tenants they track. A tenant is
/// added by replacing the function, which takes no lock on the table; the
/// triggers are created once (a lock on the table, waited for at most 2 s:
/// another tenant's open apply transaction must not queue every writer of
/// the table behind this one).
pub async fn install(client: &Client, m: &Tracked<'_>, tenant: &str, node: &str) -> Result<()> {
    let function = function_name(m, node);
    let [before, after] = trigger_names(node);
    let old = format!("zz_heliosdb_{}", short_hash(tenant));
    let step = |e: tokio_postgres::Error| {
        if e.code().map(|c| c.code()) == Some("42501") {
            ReplicationError::operator(
                format!(
                    "target: the role may not create triggers on {} (permission denied)",
                    m.display
                ),
                format!(
                    "run the daemon as the table's owner, or: GRANT TRIGGER ON {} TO <daemon role>",
                    m.display
                ),
            )
        } else {
            ReplicationError::db(
                Side::Target,
                format!("installing version tracking on {}", m.display),
                e,
            )
        }
    };
    // Tenants applying to one database share the function: one at a time
    // (else "tuple concurrently updated"), until this transaction ends.
    client
        .execute(
            "SELECT pg_advisory_xact_lock($1), set_config('lock_timeout', '2s', true)",
            &[&INSTALL_LOCK],
        )
        .await
        .map_err(step)?;
    client
        .execute(
            "INSERT INTO heliosdb_replication.tracked_tenant (table_name, node, tenant_id)
             VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&m.display, &node, &tenant],
        )
        .await
        .map_err(step)?;
    let tenants: Vec<String> = client
        .query(
            "SELECT tenant_id FROM heliosdb_replication.tracked_tenant
              WHERE table_name = $1 AND node = $2 ORDER BY 1",
            &[&m.display, &node],
        )
        .await
        .map_err(step)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    client
        .batch_execute(&function_sql(m, node, &tenants))
        .await
        .map_err(step)?;
    let names = [
        before.clone(),
        after.clone(),
        format!("{old}_b"),
        format!("{old}_a"),
    ];
    let present: Vec<String> = client
        .query(
            "SELECT tgname::text FROM pg_trigger
              WHERE tgrelid = $1::text::regclass AND tgname::text = ANY ($2)",
            &[&m.target, &names.as_slice()],
        )
        .await
        .map_err(step)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut ddl = String::new();
    for (name, when) in [(&before, "BEFORE"), (&after, "AFTER")] {
        if !present.contains(name) {
            ddl.push_str(&format!(
                "CREATE TRIGGER {} {when} INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION {function}({});",
                quote_ident(name),
                m.target,
                quote_literal(node)
            ));
        }
    }
    // A tenant's own triggers, from versions before triggers were shared.
    for name in &names[2..] {
        if present.contains(name) {
            ddl.push_str(&format!(
                "DROP TRIGGER {} ON {};",
                quote_ident(name),
                m.target
            ));
        }
    }
    if !ddl.is_empty() {
        client.batch_execute(&ddl).await.map_err(step)?;
    }
    client
        .execute(
            "SELECT set_config('lock_timeout', (SELECT reset_val FROM pg_settings WHERE name = 'lock_timeout'), true)",
            &[],
        )
        .await
        .map_err(step)?;
    Ok(())
}

/// Install the local-write triggers on every table of the tenant's
/// publication that the target has (at start, so local writes are tracked
/// before the first replicated change of a table arrives).
pub async fn install_published(
    source: &Client,
    target: &Client,
    publication: &str,
    tenant: &str,
    tenant_column: &str,
    node: &str,
) -> Result<usize> {
    let tables = source
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables
              WHERE pubname = $1 ORDER BY 1, 2",
            &[&publication],
        )
        .await
        .map_err(|e| ReplicationError::db(Side::Source, "listing the publication's tables", e))?;
    let mut n = 0;
    for t in tables {
        let (schema, name): (String, String) = (t.get(0), t.get(1));
        match install_table(target, &schema, &name, tenant, tenant_column, node).await {
            Ok(installed) => n += usize::from(installed),
            Err(e) if e.class() == crate::error::ErrorClass::OperatorAction => {
                tracing::warn!(error = %e, "local writes to this table are not tracked");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Install the local-write triggers of one target table, reading its key
/// from the target. `Ok(false)`: no such table or no primary key (apply
/// names the problem when the table's rows come).
pub async fn install_table(
    target: &Client,
    schema: &str,
    name: &str,
    tenant: &str,
    tenant_column: &str,
    node: &str,
) -> Result<bool> {
    let key: Vec<String> = target
        .query(
            "SELECT a.attname::text
               FROM pg_index i
               JOIN pg_class c ON c.oid = i.indrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               CROSS JOIN generate_series(0, i.indnkeyatts - 1) k
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[k]
              WHERE i.indisprimary AND n.nspname = $1 AND c.relname = $2
              ORDER BY k",
            &[&schema, &name],
        )
        .await
        .map_err(target_err("reading a table's primary key"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if key.is_empty() {
        return Ok(false);
    }
    let display = format!("{schema}.{name}");
    let target_name = crate::pg::qualified(schema, name);
    let m = Tracked {
        display: &display,
        target: &target_name,
        tenant_column,
        key: key.iter().map(String::as_str).collect(),
    };
    // In a transaction of its own: the install's lock lasts until it ends.
    target
        .batch_execute("BEGIN")
        .await
        .map_err(target_err("BEGIN"))?;
    if let Err(e) = install(target, &m, tenant, node).await {
        let _ = target.batch_execute("ROLLBACK").await;
        return Err(e);
    }
    target
        .batch_execute("COMMIT")
        .await
        .map_err(target_err("COMMIT"))?;
    Ok(true)
}

/// Tag this session's writes with the tenant's replication origin, so a
/// daemon reading this database drops them. `Ok(false)`: the role may not
/// (then the daemon's writes look like local writes to a reverse stream).
pub async fn tag_session(client: &Client, tenant: &str, lane: Option<u32>) -> Result<bool> {
    let origin = match lane {
        None => origin_name(tenant),
        Some(k) => format!("{}/stream{k}", origin_name(tenant)),
    };
    let r = client
        .execute(
            "SELECT pg_replication_origin_create($1) WHERE NOT EXISTS
                 (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
            &[&origin],
        )
        .await;
    let r = match r {
        Ok(_) => client
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    };
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.code().map(|c| c.code()) == Some("42501") => Ok(false),
        // configuration_limit_exceeded: no free replication origin state.
        Err(e) if e.code().map(|c| c.code()) == Some("53400") => Err(ReplicationError::operator(
            "target: no free replication origin state: every tenant applying to this cluster holds one (and one more while a large transaction streams)",
            "raise max_replication_slots on the target cluster (restart needed) to at least twice the number of tenants applying to it",
        )),
        Err(e) => Err(target_err(
            "tagging the apply session with its replication origin",
        )(e)),
    }
}

/// The replication origin of a tenant's apply session.
pub fn origin_name(tenant: &str) -> String {
    format!("{ORIGIN_PREFIX}{tenant}")
}

/// Is `track_commit_timestamp` on (so local writes have commit times)?
pub async fn commit_timestamps(client: &Client) -> Result<bool> {
    let row = client
        .query_one(
            "SELECT current_setting('track_commit_timestamp') = 'on'",
            &[],
        )
        .await
        .map_err(target_err("reading track_commit_timestamp"))?;
    Ok(row.get(0))
}

/// Stored versions and presence of a batch of keys of one table.
/// Parameters: `$1` tenant, `$2` table name, `$3` whether commit timestamps
/// are on, then one `text[]` per key column. Returns, per key in order:
/// present, node, time_us, vclock, deleted.
///
/// With `lock`, the target row and then its version are locked, the order
/// the local-write trigger takes them in, so no local write slips in between
/// this read and the apply (a deadlock, if any, is retried like any other).
/// Used when the source announces versions (active-active), where a lost
/// local write would make the regions diverge; a one-way stream skips the
/// locks (writing lock marks into every applied row costs ~15% on wide rows)
/// and at worst reports a later change of such a row as a conflict.
pub fn lookup_sql(m: &TableMapping, lock: bool) -> String {
    let pk: Vec<String> = (0..m.key.len()).map(|k| format!("k.k{k}")).collect();
    let lock = if lock { "FOR UPDATE" } else { "" };
    format!(
        "SELECT EXISTS (SELECT 1 FROM {target} x WHERE {matches} {lock}),
                v.node,
                CASE WHEN v.local_write AND $3 THEN
                     COALESCE((extract(epoch FROM pg_xact_commit_timestamp(v.xmin)
                               - timestamptz '2000-01-01 00:00:00+00') * 1000000)::bigint, v.time_us)
                     ELSE v.time_us END,
                v.vclock::text,
                v.deleted
           FROM unnest({params}) WITH ORDINALITY AS k({aliases}, ord)
           LEFT JOIN LATERAL (
                SELECT r.node, r.local_write, r.xmin, r.time_us, r.vclock, r.deleted
                  FROM heliosdb_replication.row_version r
                 WHERE r.tenant_id = $1 AND r.table_name = $2 AND r.pk = ARRAY[{pk}]
                   {lock}) v ON true
          ORDER BY k.ord",
        target = m.own_rows,
        matches = key_match(m, "x", "k"),
        params = text_arrays(4, m.key.len()),
        aliases = key_aliases(m.key.len()),
        pk = pk.join(", "),
    )
}

/// Which of the tables (`$2`, display names) hold stored versions of the
/// tenant's (`$1`) rows.
pub const VERSIONED_SQL: &str = "
SELECT t FROM unnest($2::text[]) AS t
 WHERE EXISTS (SELECT 1 FROM heliosdb_replication.row_version r
                WHERE r.tenant_id = $1 AND r.table_name = t)";

/// Store versions (inside the apply transaction). Parameters: tenant, table,
/// then arrays of pk (JSON text arrays), node, time_us, vclock, deleted.
pub const STORE_SQL: &str = "
INSERT INTO heliosdb_replication.row_version AS v
       (tenant_id, table_name, pk, node, time_us, vclock, deleted, local_write)
SELECT $1, $2, ARRAY(SELECT jsonb_array_elements_text(p::jsonb)), n, t, c::jsonb, d, false
  FROM unnest($3::text[], $4::text[], $5::bigint[], $6::text[], $7::bool[]) AS s(p, n, t, c, d)
ON CONFLICT (tenant_id, table_name, pk) DO UPDATE SET
       node = EXCLUDED.node, time_us = EXCLUDED.time_us, vclock = EXCLUDED.vclock,
       deleted = EXCLUDED.deleted, local_write = false";

/// Target rows as JSON (the conflict log's target image). Parameters: one
/// `text[]` per key column.
pub fn image_sql(m: &TableMapping) -> String {
    format!(
        "SELECT (SELECT to_jsonb(x)::text FROM {} x WHERE {})
           FROM unnest({}) WITH ORDINALITY AS k({}, ord) ORDER BY k.ord",
        m.own_rows,
        key_match(m, "x", "k"),
        text_arrays(1, m.key.len()),
        key_aliases(m.key.len()),
    )
}

/// A stable short name for identifiers (FNV-1a, 64 bits, hex).
fn short_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Create the daemon's schema on the target where missing: progress and
/// copy state (`checkpoint::progress::SCHEMA_DDL`) and row versions
/// ([`VERSION_DDL`]).
pub async fn ensure_schema(target: &Client) -> Result<()> {
    // Tenants applying to one database start together: one at a time.
    let batch = format!(
        "BEGIN; SELECT pg_advisory_xact_lock({INSTALL_LOCK}); SET LOCAL client_min_messages = warning; {} {} COMMIT;",
        crate::checkpoint::progress::SCHEMA_DDL,
        VERSION_DDL
    );
    target.batch_execute(&batch).await.map_err(|e| {
        if e.code().map(|c| c.code()) == Some("42501") {
            ReplicationError::operator(
                "target: the role cannot create the schema heliosdb_replication (permission denied)",
                "run `heliosdb-tenant-replication --config … init` as a role that may, or: CREATE SCHEMA heliosdb_replication AUTHORIZATION <writer role>",
            )
        } else {
            ReplicationError::db(Side::Target, "creating the heliosdb_replication schema", e)
        }
    })
}
