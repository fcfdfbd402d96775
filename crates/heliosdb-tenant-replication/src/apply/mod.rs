//! Apply: source transactions into target transactions, exactly once.
//!
//! Rules this module enforces:
//! * A target transaction holds whole source transactions only. Several small
//!   source transactions may share one target transaction (batching); a
//!   source transaction larger than a batch streams into the open target
//!   transaction chunk by chunk instead of being held in memory.
//! * The same target transaction writes the tenant's progress (the last
//!   source commit it contains) to `heliosdb_replication.progress`, so data
//!   and progress commit or vanish together ([`crate::checkpoint`]).
//! * Idempotent: rows are upserted / deleted by primary key, so replaying a
//!   transaction the target already has (which the capture side prevents
//!   anyway) changes nothing.
//! * Tenant isolation: a row whose tenant column is not this tenant is never
//!   written, whatever the publication sends.
//! * Statements run with `session_replication_role = replica` when the role
//!   may set it (as PostgreSQL's own apply worker does): target triggers and
//!   foreign-key triggers do not fire for replicated rows.
//!
//! On any error the open target transaction is rolled back by the caller,
//! which reconnects and resumes from the target's progress.
//!
//! Files: this one takes rows in (`row`, `truncate`, table mappings and
//! schema changes); `transaction.rs` the target transaction and its progress
//! row; `chunk.rs` writing a chunk (optimistic statements, COPY, key
//! changes); `resolve.rs` conflicts against stored versions; `keyless.rs`
//! tables without a key. Around them: `batch/` (chunks), `catalog.rs`,
//! `sql.rs`, `schema.rs`, `conflict.rs`, `version.rs`, `tracking.rs`,
//! `streams.rs` (streamed transactions).

pub mod batch;
pub mod binary;
pub mod catalog;
mod chunk;
pub mod conflict;
mod keyless;
mod resolve;
pub mod schema;
pub mod sql;
pub mod streams;
pub mod tracking;
mod transaction;
pub mod version;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use crate::apply::batch::{
    has_unchanged, key_of, key_texts, row_bytes, Chunk, FirstOp, Key, TablePlan,
};
use crate::capture::pgoutput::{RelationDesc, Tuple, Value};
use crate::capture::{Announced, RowChange, RowOp};
use crate::checkpoint::progress;
use crate::error::{on_target as target_err, ErrorClass, ReplicationError, Result};
use crate::lsn::Lsn;
use crate::pg::quote_ident;
use catalog::TableMapping;
use conflict::{Conflict, Kind};
use version::{decide, TargetRow, VClock, Version, Winner};

/// A source commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitPoint {
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time_us: i64,
}

pub use crate::telemetry::Committed;

/// Counters for logs.
#[derive(Debug, Default, Clone)]
pub struct ApplyStats {
    pub events: u64,
    pub transactions: u64,
    pub foreign_rows_dropped: u64,
    pub updates_of_missing_rows: u64,
    /// Chunks applied without a prior read that met a conflict and were
    /// rolled back and resolved against the target instead.
    pub chunks_resolved_again: u64,
}

/// Who the applier writes for.
#[derive(Debug, Clone)]
pub struct ApplyIdentity {
    pub tenant: String,
    pub tenant_column: String,
    pub slot: String,
    pub source_system_id: String,
    pub conflict: crate::config::ConflictConfig,
    /// A streamed transaction's lane (its own replication origin: an origin
    /// is active in one session at a time).
    pub lane: Option<u32>,
}

/// Applies one tenant's changes through one target connection.
pub struct Applier {
    client: Client,
    /// The source's catalog, read when a table definition changes.
    source: schema::SourceCatalog,
    schema_changes: schema::SchemaChanges,
    id: ApplyIdentity,
    batch_size: usize,
    mappings: HashMap<u32, Arc<TableMapping>>,
    statements: HashMap<String, Statement>,
    chunk: Chunk,
    open: bool,
    opened_at: Option<Instant>,
    /// Events in the open target transaction.
    pending_events: u64,
    /// The last source commit inside the open target transaction.
    pending_commit: Option<CommitPoint>,
    /// The last sealed batch inside the open target transaction (apply node).
    pending_batch: Option<progress::BatchMark>,
    /// What the open target transaction holds, for metrics.
    pending: Committed,
    /// What the last commit held (taken by [`Applier::take_committed`]).
    committed: Committed,
    /// Conflict detection is off for source transactions up to here.
    converge_until: Lsn,
    /// Commit LSN of the source transaction being applied.
    txn_lsn: Lsn,
    /// The earliest source transaction with a change in the chunk.
    chunk_lsn: Option<Lsn>,
    /// Commit time of the source transaction being applied.
    txn_time_us: i64,
    /// Versions the source announced for rows still to come, by table and key.
    announced: HashMap<(String, Vec<String>), Version>,
    /// Tables whose local-write triggers this session installed (or may not).
    tracked: HashSet<String>,
    /// Tables known to hold stored row versions of the tenant.
    versioned: HashSet<String>,
    /// Install local-write triggers on first sight of a table (not in lanes).
    track_tables: bool,
    /// Does the target record commit timestamps (local write times)?
    commit_timestamps: bool,
    /// Commits do not wait for the target's WAL flush; each reports the
    /// target's WAL positions right after it ([`Applier::take_wal`]).
    asynchronous: bool,
    /// The target's (insert, flush) WAL positions read after the last commit.
    wal: Option<(Lsn, Lsn)>,
    pub stats: ApplyStats,
}

impl Applier {
    pub async fn new(
        client: Client,
        source: schema::SourceCatalog,
        schema_changes: schema::SchemaChanges,
        id: ApplyIdentity,
        batch_size: usize,
    ) -> Result<Self> {
        if !crate::pg::replica_role(&client)
            .await
            .map_err(target_err("setting session_replication_role"))?
        {
            tracing::info!(
                "the target role may not set session_replication_role; target triggers and foreign keys will fire for replicated rows"
            );
        }
        if !tracking::tag_session(&client, &id.tenant, id.lane).await? {
            tracing::warn!(
                "the target role may not use replication origins: changes this daemon applies cannot be told apart from local writes, so do not replicate this target back to the source (active-active); GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), pg_replication_origin_session_setup(text) TO <daemon role>, or run as a superuser"
            );
        }
        let commit_timestamps = tracking::commit_timestamps(&client).await?;
        if !commit_timestamps
            && matches!(
                id.conflict.strategy,
                version::Strategy::LastWriteWins | version::Strategy::VectorClock
            )
        {
            // Local writes would be dated by their transaction's start, not
            // its commit: two regions would pick different winners.
            return Err(ReplicationError::operator(
                format!(
                    "target: track_commit_timestamp is off, and [conflict] resolution_strategy = \"{}\" compares commit times: regions would resolve the same conflict differently and diverge",
                    id.conflict.strategy.name()
                ),
                "ALTER SYSTEM SET track_commit_timestamp = on on the target, and restart it (or choose SourcePreferred or TargetPreferred)",
            ));
        }
        Ok(Self {
            client,
            source,
            schema_changes,
            id,
            batch_size,
            mappings: HashMap::new(),
            statements: HashMap::new(),
            chunk: Chunk::default(),
            open: false,
            opened_at: None,
            pending_events: 0,
            pending_commit: None,
            pending_batch: None,
            pending: Committed::default(),
            committed: Committed::default(),
            converge_until: Lsn::ZERO,
            txn_lsn: Lsn::ZERO,
            chunk_lsn: None,
            txn_time_us: 0,
            asynchronous: false,
            wal: None,
            announced: HashMap::new(),
            tracked: HashSet::new(),
            versioned: HashSet::new(),
            track_tables: true,
            commit_timestamps,
            stats: ApplyStats::default(),
        })
    }

    /// The tenant this applier writes for.
    pub fn tenant(&self) -> &str {
        &self.id.tenant
    }

    /// The target connection (no transaction of ours may be open to use it).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The target connection, mutable (for transactions outside apply).
    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// The source catalog (an apply node adds what the capture node ships).
    pub fn source_catalog_mut(&mut self) -> &mut schema::SourceCatalog {
        &mut self.source
    }

    /// Is a target transaction open (holding applied, uncommitted changes)?
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// When the open target transaction began.
    pub fn opened_at(&self) -> Option<Instant> {
        self.opened_at
    }

    /// Events in the open target transaction.
    pub fn pending_events(&self) -> u64 {
        self.pending_events
    }

    /// Does the open target transaction end on a source commit?
    pub fn has_pending_commit(&self) -> bool {
        self.pending_commit.is_some()
    }

    /// Check (and cache) the target table of a relation before its rows
    /// come; a changed definition is reconciled first (see [`schema`]).
    /// Called inside the open target transaction.
    pub async fn mapping(&mut self, relation: &Arc<RelationDesc>) -> Result<Arc<TableMapping>> {
        let previous = match self.mappings.get(&relation.id) {
            Some(m) if Arc::ptr_eq(&m.relation, relation) => return Ok(m.clone()),
            Some(m) => Some(m.relation.clone()),
            None => None,
        };
        // What the source says the table is now (type oids and modifiers),
        // for diagnosing a schema change that was not applied.
        tracing::debug!(
            table = %format!("{}.{}", relation.namespace, relation.name),
            columns = ?relation
                .columns
                .iter()
                .map(|c| (c.name.as_str(), c.type_oid, c.type_modifier))
                .collect::<Vec<_>>(),
            "relation"
        );
        // Rows queued under the old definition go first.
        self.flush().await?;
        let done = schema::reconcile(
            &self.client,
            &self.id.tenant,
            &self.source,
            relation,
            previous.as_deref(),
            self.schema_changes,
        )
        .await?;
        if !done.actions.is_empty() {
            self.statements.clear();
        }
        if done.needs_resync {
            let name = format!("{}.{}", relation.namespace, relation.name);
            tracing::warn!(table = %name, "existing rows' values of an added column are unknown (volatile default): the table will be copied again");
            crate::snapshot::request_resync(&self.client, &self.id.tenant, Some(&name)).await?;
        }
        let m = Arc::new(
            TableMapping::resolve(&self.client, relation.clone(), &self.id.tenant_column).await?,
        );
        // Not from a lane: its transaction stays open until the source
        // commits, and another lane recording the same table would wait for
        // it while the loop waits for that lane.
        if self.id.lane.is_none() {
            schema::record_definition(&self.client, &self.id.tenant, relation).await?;
        }
        // Versions are kept by key: a table without one has none.
        if self.track_tables && !m.key.is_empty() && self.tracked.insert(m.display.clone()) {
            self.track(&m).await?;
        }
        self.mappings.insert(relation.id, m.clone());
        Ok(m)
    }

    /// Stop when a replicated table was changed on the target outside
    /// replication (see [`schema::check_drift`]). Cheap: one catalog query
    /// unless something changed.
    pub async fn check_definitions(&mut self) -> Result<()> {
        let drifted = schema::drifted_tables(&self.client, &self.id.tenant).await?;
        for (namespace, name) in drifted {
            let mapped = self
                .mappings
                .values()
                .find(|m| m.relation.namespace == namespace && m.relation.name == name)
                .cloned();
            let src = match (mapped, &self.source) {
                (Some(m), source) => schema::source_columns(source, &m.relation).await?,
                (None, schema::SourceCatalog::Live(client)) => {
                    schema::describe_source_table(client, (&namespace, &name)).await?
                }
                // An apply node knows a table's source definition once its
                // changes come; it checks then.
                (None, schema::SourceCatalog::Shipped(_)) => continue,
            };
            schema::check_drift(&self.client, &self.id.tenant, (&namespace, &name), &src).await?;
        }
        Ok(())
    }

    /// A lane of a streamed transaction installs no triggers: that would
    /// lock the table against every writer until the lane commits. The
    /// main applier installs them first ([`Self::ensure_tracked`]).
    pub fn without_tracking(&mut self) {
        self.track_tables = false;
    }

    /// Install the local-write triggers of `relation`'s table now, in a
    /// transaction of their own. `Ok(false)`: not now (a target transaction
    /// is open); ask again later.
    pub async fn ensure_tracked(&mut self, relation: &RelationDesc) -> Result<bool> {
        if self.open {
            return Ok(false);
        }
        let display = format!("{}.{}", relation.namespace, relation.name);
        if !self.track_tables || self.tracked.contains(&display) {
            return Ok(true);
        }
        let id = &self.id;
        match tracking::install_table(
            &self.client,
            &relation.namespace,
            &relation.name,
            &id.tenant,
            &id.tenant_column,
            &id.conflict.node_id,
        )
        .await
        {
            Ok(_) => {}
            Err(e) if e.class() == ErrorClass::OperatorAction => {
                tracing::warn!(error = %e, "local writes to this table are not tracked");
            }
            Err(e) => return Err(e),
        }
        self.tracked.insert(display);
        Ok(true)
    }

    /// Install the local-write triggers of a table (see [`tracking`]); a
    /// role that may not create triggers replicates without them.
    async fn track(&mut self, m: &TableMapping) -> Result<()> {
        self.client
            .batch_execute("SAVEPOINT heliosdb_track")
            .await
            .map_err(target_err("SAVEPOINT"))?;
        match tracking::install(
            &self.client,
            &m.into(),
            &self.id.tenant,
            &self.id.conflict.node_id,
        )
        .await
        {
            Ok(()) => self
                .client
                .batch_execute("RELEASE SAVEPOINT heliosdb_track")
                .await
                .map_err(target_err("RELEASE SAVEPOINT")),
            Err(e) if e.class() == ErrorClass::OperatorAction => {
                tracing::warn!(error = %e, "local writes to this table are not tracked: changes made directly on the target are seen only when a row is missing or already there");
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT heliosdb_track")
                    .await
                    .map_err(target_err("ROLLBACK TO SAVEPOINT"))
            }
            Err(e) => Err(e),
        }
    }

    /// A source's version trigger announced the version of a row change
    /// that follows in this transaction.
    pub fn version(&mut self, note: &[u8]) {
        let Some(a) = Announced::parse(note).filter(|a| a.tenant == self.id.tenant) else {
            tracing::debug!("ignored a version note that is not this tenant's");
            return;
        };
        self.announced.insert(
            (a.table, a.pk),
            Version {
                node: a.node,
                time_us: self.txn_time_us,
                vclock: VClock(a.vclock),
                deleted: a.deleted,
            },
        );
    }

    /// Source transactions up to `lsn` may replay over a copy: no conflicts.
    pub fn set_converge_until(&mut self, lsn: Lsn) {
        self.converge_until = self.converge_until.max(lsn);
    }

    /// One row change of the current source transaction.
    pub async fn row(&mut self, change: RowChange) -> Result<()> {
        let mapping = self.mapping(&change.relation).await?;
        let image = match &change.op {
            RowOp::Insert { new } | RowOp::Update { new, .. } => new,
            RowOp::Delete { old } => old,
        };
        if !self.is_tenant_row(&mapping, image) {
            self.stats.foreign_rows_dropped += 1;
            tracing::warn!(
                table = %mapping.display,
                "dropped a row of another tenant: the publication's row filter let it through; check it filters on the tenant column"
            );
            return Ok(());
        }
        if let RowOp::Insert { new } = &change.op {
            if let Some(i) = new.iter().position(|v| matches!(v, Value::UnchangedToast)) {
                return self.unknown_large_value(&mapping, new, i).await;
            }
        }
        self.stats.events += 1;
        self.pending_events += 1;
        self.pending.bytes += row_bytes(&change.op);
        self.pending.count(&mapping.display, 1);
        if mapping.key.is_empty() {
            // No key to batch, coalesce or version by: the row goes now,
            // after what is queued.
            self.flush().await?;
            return self.apply_keyless(&mapping, &change.op).await;
        }
        if let RowOp::Update {
            old: Some(old),
            new,
        } = &change.op
        {
            if key_of(&mapping, old)? != key_of(&mapping, new)? {
                self.flush().await?;
                return self.move_row(&mapping, old, new).await;
            }
        }
        self.chunk_lsn.get_or_insert(self.txn_lsn);
        // The version announced just before this change is its own; take
        // it now, before a later change of the same row announces another.
        let version = if self.announced.is_empty() {
            None
        } else {
            let key = key_texts(&key_of(&mapping, image)?);
            self.announced.get(&(mapping.display.clone(), key)).cloned()
        };
        self.chunk
            .push_versioned(mapping, change.op, self.txn_time_us, version);
        if self.chunk.len() >= self.batch_size {
            self.flush().await?;
        }
        Ok(())
    }

    /// A row that an UPDATE of its tenant column moved into the tenant
    /// arrives as an insert, and a large value it did not change comes
    /// without its value (PostgreSQL's own subscriber stores NULL). With a
    /// source connection the table is copied again (the resync runs between
    /// transactions, the row comes with it); an apply node stops with the
    /// row and the fix.
    async fn unknown_large_value(
        &mut self,
        m: &TableMapping,
        row: &Tuple,
        column: usize,
    ) -> Result<()> {
        let key: Vec<String> = key_of(m, row)?
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        let key = if key.is_empty() {
            "none: the table has no key".to_string()
        } else {
            key.join(", ")
        };
        let what = format!(
            "a row of {} (key {}) moved into the tenant by an UPDATE of {} arrived without its unchanged large value {}",
            m.display,
            key,
            self.id.tenant_column,
            m.column_name(column)
        );
        if matches!(self.source, schema::SourceCatalog::Shipped(_)) {
            return Err(ReplicationError::operator(
                what,
                format!("copy the table again: `resync --table {}` and `start` with a configuration that names both databases (mode = \"local\")", m.display),
            ));
        }
        crate::snapshot::request_resync(&self.client, &self.id.tenant, Some(&m.display)).await?;
        tracing::warn!(table = %m.display, "{what}: the table is copied again");
        Ok(())
    }

    fn is_tenant_row(&self, m: &TableMapping, t: &Tuple) -> bool {
        matches!(t.get(m.tenant), Some(Value::Text(b)) if b.as_ref() == self.id.tenant.as_bytes())
    }

    /// A TRUNCATE: the tenant's rows of those tables go (never other
    /// tenants' rows on a shared target).
    pub async fn truncate(&mut self, relations: &[Arc<RelationDesc>]) -> Result<()> {
        self.flush().await?;
        for rel in relations {
            let m = self.mapping(rel).await?;
            let stmt = self.prepared(sql::delete_tenant(&m)).await?;
            self.client
                .execute(&stmt, &[&self.id.tenant])
                .await
                .map_err(target_err(&format!(
                    "truncating the tenant's rows of {}",
                    m.display
                )))?;
            self.stats.events += 1;
            self.pending_events += 1;
            self.pending.count(&m.display, 1);
        }
        Ok(())
    }

    async fn prepared(&mut self, sql: String) -> Result<Statement> {
        if let Some(s) = self.statements.get(&sql) {
            return Ok(s.clone());
        }
        let stmt = self
            .client
            .prepare(&sql)
            .await
            .map_err(target_err("preparing an apply statement"))?;
        self.statements.insert(sql, stmt.clone());
        Ok(stmt)
    }
}
