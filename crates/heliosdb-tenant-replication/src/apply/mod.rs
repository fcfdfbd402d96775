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

pub mod batch;
pub mod catalog;
pub mod conflict;
pub mod schema;
pub mod sql;
pub mod streams;
pub mod tracking;
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

    /// A source transaction (committing at `final_lsn`, at `commit_time_us`)
    /// begins.
    pub async fn begin(&mut self, final_lsn: Lsn, commit_time_us: i64) -> Result<()> {
        self.txn_lsn = final_lsn;
        self.txn_time_us = commit_time_us;
        if !self.open {
            self.client
                .batch_execute("BEGIN")
                .await
                .map_err(target_err("BEGIN"))?;
            self.open = true;
            self.opened_at = Some(Instant::now());
        }
        Ok(())
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
        self.chunk.push_at(mapping, change.op, self.txn_time_us);
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

    /// The current source transaction committed on the source.
    pub fn source_commit(&mut self, point: CommitPoint) {
        self.pending.commit_times_us.push(point.commit_time_us);
        self.pending_commit = Some(point);
        self.stats.transactions += 1;
    }

    /// What the last commit contained (metrics), leaving it empty.
    pub fn take_committed(&mut self) -> Committed {
        std::mem::take(&mut self.committed)
    }

    /// Record a sealed batch with the next commit (apply node).
    pub fn mark_batch(&mut self, mark: progress::BatchMark) {
        self.pending_batch = Some(mark);
    }

    /// Commit the target transaction with its progress record. Returns the
    /// source commit it covers. Only call between source transactions.
    pub async fn commit(&mut self) -> Result<Option<CommitPoint>> {
        if !self.open {
            return Ok(None);
        }
        // COMMIT releases the chunk's savepoint.
        self.flush_chunk(false).await?;
        // Notes whose row never came (e.g. `INSERT … ON CONFLICT DO NOTHING`).
        self.announced.clear();
        self.record_conflicts().await?;
        if let Some(p) = self.pending_commit {
            let stmt = self.prepared(progress::UPSERT_SQL.to_string()).await?;
            let batch = self.pending_batch.take();
            let sequence = batch.as_ref().map(|b| b.sequence as i64);
            let key_id = batch.as_ref().map(|b| b.key_id.as_str());
            let key_batches = batch.as_ref().map(|b| b.key_batches as i64);
            let (commit_lsn, end_lsn) = (p.commit_lsn.to_string(), p.end_lsn.to_string());
            let params: [&(dyn ToSql + Sync); 9] = [
                &self.id.tenant,
                &self.id.slot,
                &self.id.source_system_id,
                &commit_lsn,
                &end_lsn,
                &p.commit_time_us,
                &sequence,
                &key_id,
                &key_batches,
            ];
            // Progress and COMMIT in one round trip. Should the progress
            // fail, the server ends the aborted transaction at the COMMIT
            // (answering ROLLBACK, not an error): the error is the progress'.
            let (progress, commit) = tokio::join!(
                self.client.execute(&stmt, &params),
                self.client.batch_execute("COMMIT")
            );
            progress.map_err(target_err("recording progress"))?;
            commit.map_err(target_err("COMMIT"))?;
        } else {
            self.client
                .batch_execute("COMMIT")
                .await
                .map_err(target_err("COMMIT"))?;
        }
        let mut done = std::mem::take(&mut self.pending);
        done.duration = self.opened_at.map(|t| t.elapsed()).unwrap_or_default();
        self.committed = done;
        self.open = false;
        self.opened_at = None;
        self.pending_events = 0;
        Ok(self.pending_commit.take())
    }

    /// A point the open transaction can return to (a source subtransaction
    /// starts): pending rows are written first, so none of them is undone
    /// by a rollback to it. Returns the conflicts found so far.
    pub async fn savepoint(&mut self, name: &str) -> Result<usize> {
        self.flush().await?;
        self.client
            .batch_execute(&format!("SAVEPOINT {}", crate::pg::quote_ident(name)))
            .await
            .map_err(target_err("SAVEPOINT"))?;
        Ok(self.pending.conflicts.len())
    }

    /// Undo everything since savepoint `name` (a source subtransaction
    /// rolled back), including its pending rows and the conflicts found
    /// after it (`conflicts` of them came before).
    pub async fn rollback_to(&mut self, name: &str, conflicts: usize) -> Result<()> {
        self.chunk = Chunk::default();
        self.chunk_lsn = None;
        self.announced.clear();
        // Triggers installed after the savepoint are gone with it.
        self.tracked.clear();
        self.pending.conflicts.truncate(conflicts);
        self.client
            .batch_execute(&format!(
                "ROLLBACK TO SAVEPOINT {}",
                crate::pg::quote_ident(name)
            ))
            .await
            .map_err(target_err("ROLLBACK TO SAVEPOINT"))
    }

    /// Abandon the open target transaction.
    pub async fn rollback(&mut self) {
        self.chunk = Chunk::default();
        self.pending_commit = None;
        self.pending_batch = None;
        self.pending = Committed::default();
        self.chunk_lsn = None;
        self.pending_events = 0;
        self.announced.clear();
        // Triggers installed in the abandoned transaction are gone with it.
        self.tracked.clear();
        if self.open {
            let _ = self.client.batch_execute("ROLLBACK").await;
            self.open = false;
            self.opened_at = None;
        }
    }

    /// Roll back, and let go of the session's replication origin now (not
    /// when the server notices the closed connection): a session that
    /// replaces this one takes it.
    pub async fn release(&mut self) {
        self.rollback().await;
        let _ = self
            .client
            .batch_execute("SELECT pg_replication_origin_session_reset()")
            .await;
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

    /// Write the chunk into the open transaction: coalesced, many rows per
    /// statement, after resolving conflicts. If that fails on a constraint
    /// that row-by-row order would satisfy (a unique value moving between
    /// rows, foreign keys), replay the chunk one change at a time in source
    /// order.
    async fn flush(&mut self) -> Result<()> {
        self.flush_chunk(true).await
    }

    /// [`Self::flush`]; `release`: false leaves the chunk's savepoint to the
    /// COMMIT that follows (one round trip less).
    async fn flush_chunk(&mut self, release: bool) -> Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.chunk);
        let detect = self
            .chunk_lsn
            .take()
            .is_some_and(|lsn| lsn > self.converge_until);
        let mut found = Vec::new();
        let mut plans = chunk.plan()?;
        if chunk.len() == 1 {
            return match self.resolve_and_apply(&mut plans, detect, &mut found).await {
                Err(e) if e.class() == ErrorClass::OperatorAction => {
                    Err(rejected(&chunk.ops[0], e))
                }
                Err(e) => Err(e),
                Ok(()) => {
                    self.pending.conflicts.extend(found);
                    Ok(())
                }
            };
        }
        // Where nothing can be decided against a stored version (none kept
        // for the chunk's tables, none announced), the chunk is applied
        // optimistically (see `apply_chunk`).
        let ask = detect && self.announced.is_empty();
        let versioned = self.open_chunk(&plans, ask).await?;
        let optimistic = ask && !versioned;
        match self
            .apply_chunk(&mut plans, detect, optimistic, &mut found)
            .await
        {
            Ok(()) => {}
            // A constraint the source's order would satisfy; passing errors
            // (deadlock, lost connection) go up and the session retries.
            Err(e @ ReplicationError::Database { .. })
                if e.class() == ErrorClass::OperatorAction =>
            {
                tracing::debug!(error = %e, "bulk apply failed; replaying the chunk row by row");
                found.clear();
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT heliosdb_chunk")
                    .await
                    .map_err(target_err("ROLLBACK TO SAVEPOINT"))?;
                for ((mapping, op), time) in chunk.ops.into_iter().zip(chunk.times) {
                    let mut one = Chunk::default();
                    one.push_at(mapping.clone(), op, time);
                    let mut plans = one.plan()?;
                    if let Err(e) = self.resolve_and_apply(&mut plans, detect, &mut found).await {
                        if e.class() != ErrorClass::OperatorAction {
                            return Err(e);
                        }
                        return Err(one
                            .ops
                            .first()
                            .map(|op| rejected(op, e))
                            .unwrap_or_else(|| ReplicationError::Internal("empty chunk".into())));
                    }
                }
            }
            Err(e) => return Err(e),
        }
        if release {
            self.client
                .batch_execute("RELEASE SAVEPOINT heliosdb_chunk")
                .await
                .map_err(target_err("RELEASE SAVEPOINT"))?;
        }
        self.pending.conflicts.extend(found);
        Ok(())
    }

    /// Apply a chunk inside its savepoint. `optimistic`: apply it straight
    /// away and check from what the statements return that every row was
    /// where the source had it; only a chunk with a conflict is rolled back
    /// and resolved against the target's rows.
    async fn apply_chunk(
        &mut self,
        plans: &mut [TablePlan],
        detect: bool,
        optimistic: bool,
        found: &mut Vec<Conflict>,
    ) -> Result<()> {
        if optimistic {
            if self.apply_optimistic(plans).await? {
                return Ok(());
            }
            self.stats.chunks_resolved_again += 1;
            tracing::debug!(
                "a row was not where the source had it; resolving the chunk against the target"
            );
            self.client
                .batch_execute("ROLLBACK TO SAVEPOINT heliosdb_chunk")
                .await
                .map_err(target_err("ROLLBACK TO SAVEPOINT"))?;
        }
        self.resolve_and_apply(plans, detect, found).await
    }

    /// Open the chunk's savepoint; with `ask`, also answer in the same
    /// round trip: do any of the plans' tables hold stored versions of the
    /// tenant's rows (local writes, earlier conflicts)? A table that does
    /// always will (tombstones stay), so only the others are asked again.
    async fn open_chunk(&mut self, plans: &[TablePlan], ask: bool) -> Result<bool> {
        let unknown: Vec<&str> = plans
            .iter()
            .map(|p| p.mapping.display.as_str())
            .filter(|t| !self.versioned.contains(*t))
            .collect();
        if !ask || unknown.len() < plans.len() {
            self.client
                .batch_execute("SAVEPOINT heliosdb_chunk")
                .await
                .map_err(target_err("SAVEPOINT"))?;
            return Ok(true);
        }
        let stmt = self.prepared(tracking::VERSIONED_SQL.to_string()).await?;
        let params: [&(dyn ToSql + Sync); 2] = [&self.id.tenant, &unknown];
        let (savepoint, rows) = tokio::join!(
            self.client.batch_execute("SAVEPOINT heliosdb_chunk"),
            self.client.query(&stmt, &params)
        );
        savepoint.map_err(target_err("SAVEPOINT"))?;
        let rows = rows.map_err(target_err("reading which tables hold row versions"))?;
        for r in &rows {
            self.versioned.insert(r.get(0));
        }
        Ok(!rows.is_empty())
    }

    /// Apply the plans without reading the target first. `Ok(false)`: a row
    /// was not where the source had it (present for an update or delete,
    /// absent for an insert): a conflict, to be resolved after a rollback.
    async fn apply_optimistic(&mut self, plans: &[TablePlan]) -> Result<bool> {
        let expects_row = |first: &FirstOp| *first != FirstOp::Insert;
        // Statements go out together (one round trip), in plan order, and
        // their answers are checked after; a COPY sends what is queued first.
        let mut queued: Vec<Queued<'_>> = Vec::new();
        for p in plans {
            let m = &p.mapping;
            if !p.deletes.is_empty() {
                let sql = format!("{}{}", sql::delete(m), sql::returning_keys(m));
                queued.push(Queued {
                    stmt: self.prepared(sql).await?,
                    cols: key_columns(m, &p.deletes),
                    mapping: m,
                    expect: p
                        .deletes
                        .iter()
                        .zip(&p.delete_first)
                        .map(|(key, first)| (key.clone(), expects_row(first)))
                        .collect(),
                    inserted: false,
                });
            }
            if !p.upserts.is_empty() {
                // Rows the source inserted (absent before the chunk), many
                // of them: COPY, whose unique violation on the primary key
                // is the conflict; the rest by an upsert that returns what
                // it found.
                let (new_rows, seen): (Vec<(&Tuple, &FirstOp)>, Vec<_>) = p
                    .upserts
                    .iter()
                    .zip(&p.upsert_first)
                    .partition(|(_, first)| !expects_row(first));
                let rest = if new_rows.len() >= COPY_MIN_ROWS {
                    if !self.run_queued(std::mem::take(&mut queued)).await? {
                        return Ok(false);
                    }
                    let rows: Vec<&Tuple> = new_rows.iter().map(|(row, _)| *row).collect();
                    if !self.copy_rows(m, &rows).await? {
                        return Ok(false);
                    }
                    seen
                } else {
                    new_rows.into_iter().chain(seen).collect()
                };
                if !rest.is_empty() {
                    let all: Vec<usize> = (0..m.casts.len()).collect();
                    let rows: Vec<&Tuple> = rest.iter().map(|(row, _)| *row).collect();
                    let sql = format!("{}{}, (x.xmax = 0)", sql::upsert(m), sql::returning_keys(m));
                    queued.push(Queued {
                        stmt: self.prepared(sql).await?,
                        cols: columns(&rows, &all)?,
                        mapping: m,
                        expect: expectations(m, &rest)?,
                        inserted: true,
                    });
                }
            }
            for (set, rows) in column_groups(p) {
                let mut wanted = m.key.clone();
                wanted.extend(&set);
                let sql = format!("{}{}", sql::update_columns(m, &set), sql::returning_keys(m));
                let tuples: Vec<&Tuple> = rows.iter().map(|(t, _)| *t).collect();
                let expect: Vec<(&Tuple, &FirstOp)> = rows.iter().map(|(t, f)| (*t, f)).collect();
                queued.push(Queued {
                    stmt: self.prepared(sql).await?,
                    cols: columns(&tuples, &wanted)?,
                    mapping: m,
                    expect: expectations(m, &expect)?,
                    inserted: false,
                });
            }
        }
        self.run_queued(queued).await
    }

    /// Send the statements together and check each answer: `false` when a
    /// row was not where the source had it. Should one fail, the ones after
    /// it fail too (the transaction is aborted): the first error is the one.
    async fn run_queued(&self, queued: Vec<Queued<'_>>) -> Result<bool> {
        let params: Vec<Vec<&(dyn ToSql + Sync)>> = queued
            .iter()
            .map(|q| q.cols.iter().map(|c| c as &(dyn ToSql + Sync)).collect())
            .collect();
        let answers = futures_util::future::join_all(
            queued
                .iter()
                .zip(&params)
                .map(|(q, p)| self.client.query(&q.stmt, p)),
        )
        .await;
        let mut agree = true;
        for (q, answer) in queued.iter().zip(answers) {
            let rows = answer.map_err(target_err(&format!(
                "applying changes to {}",
                q.mapping.display
            )))?;
            let found = returned_keys(&rows, q.mapping.key.len());
            agree &= q.expect.iter().all(|(key, had)| {
                // An upsert does not return an existing row that `DO
                // NOTHING` kept.
                let present = if q.inserted {
                    found.get(key) != Some(&true)
                } else {
                    found.contains_key(key)
                };
                present == *had
            });
        }
        Ok(agree)
    }

    /// Run a statement that returns key columns as text (and optionally one
    /// boolean after them): the keys it touched, with that boolean.
    async fn returned(
        &mut self,
        sql: String,
        cols: &[Vec<Option<&str>>],
        m: &TableMapping,
    ) -> Result<HashMap<Key, bool>> {
        let stmt = self.prepared(sql).await?;
        let params: Vec<&(dyn ToSql + Sync)> =
            cols.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let rows = self
            .client
            .query(&stmt, &params)
            .await
            .map_err(target_err(&format!("applying changes to {}", m.display)))?;
        Ok(returned_keys(&rows, m.key.len()))
    }

    async fn resolve_and_apply(
        &mut self,
        plans: &mut [TablePlan],
        detect: bool,
        found: &mut Vec<Conflict>,
    ) -> Result<()> {
        let mut retry = self
            .resolve_and_apply_once(plans, detect, found, true)
            .await?;
        // Rows read as absent that a local writer inserted meanwhile:
        // decide them again against what is there now.
        for round in 1..=3 {
            if retry.is_empty() {
                break;
            }
            tracing::debug!(
                rows = retry.iter().map(|p| p.upserts.len()).sum::<usize>(),
                "rows inserted concurrently on the target; resolving them again"
            );
            retry = self
                .resolve_and_apply_once(&mut retry, detect, found, round < 3)
                .await?;
        }
        Ok(())
    }

    /// One round: resolve, apply, store versions. Returns the rows read as
    /// absent whose insert met a row a local writer inserted in between
    /// (when `guard`; otherwise they overwrite it).
    async fn resolve_and_apply_once(
        &mut self,
        plans: &mut [TablePlan],
        detect: bool,
        found: &mut Vec<Conflict>,
        guard: bool,
    ) -> Result<Vec<TablePlan>> {
        let mut resolved = Vec::new();
        if detect {
            for p in plans.iter_mut() {
                let r = self.resolve(p).await?;
                resolved.push((p.mapping.display.clone(), r));
            }
        }
        let collided = self.apply_plans(plans, guard).await?;
        let mut again: HashSet<(String, Vec<String>)> = HashSet::new();
        for p in &collided {
            for row in &p.upserts {
                again.insert((
                    p.mapping.display.clone(),
                    key_texts(&key_of(&p.mapping, row)?),
                ));
            }
        }
        // After the rows, as the local-write trigger does (row, then its
        // version): the same lock order, so no deadlock with local writers.
        for (table, r) in resolved {
            let stores: Vec<(Vec<String>, Version)> = r
                .stores
                .into_iter()
                .filter(|(k, _)| again.is_empty() || !again.contains(&(table.clone(), k.clone())))
                .collect();
            if !stores.is_empty() {
                self.store_versions(&table, &stores).await?;
            }
            found.extend(
                r.conflicts
                    .into_iter()
                    .filter(|(k, _)| {
                        again.is_empty() || !again.contains(&(table.clone(), k.clone()))
                    })
                    .map(|(_, c)| c),
            );
        }
        Ok(collided)
    }

    /// Store row versions (keys as text, the version) of `table`.
    async fn store_versions(
        &mut self,
        table: &str,
        stores: &[(Vec<String>, Version)],
    ) -> Result<()> {
        let pks: Vec<String> = stores
            .iter()
            .map(|(k, _)| serde_json::to_string(k).unwrap_or_default())
            .collect();
        let nodes: Vec<&str> = stores.iter().map(|(_, v)| v.node.as_str()).collect();
        let times: Vec<i64> = stores.iter().map(|(_, v)| v.time_us).collect();
        let clocks: Vec<String> = stores.iter().map(|(_, v)| v.vclock.to_json()).collect();
        let deleted: Vec<bool> = stores.iter().map(|(_, v)| v.deleted).collect();
        let stmt = self.prepared(tracking::STORE_SQL.to_string()).await?;
        self.client
            .execute(
                &stmt,
                &[
                    &self.id.tenant,
                    &table,
                    &pks,
                    &nodes,
                    &times,
                    &clocks,
                    &deleted,
                ],
            )
            .await
            .map_err(target_err(&format!("storing row versions of {table}")))?;
        Ok(())
    }

    /// Decide each key of a table's plan against the target's row and its
    /// stored version: drop the changes the target wins, and return the
    /// conflicts (with row images) and the versions the rows will have.
    async fn resolve(&mut self, p: &mut TablePlan) -> Result<Resolved> {
        let m = p.mapping.clone();
        enum Slot {
            Upsert(usize),
            Partial(usize),
            Delete(usize),
        }
        let mut entries: Vec<(Key, FirstOp, Slot, i64)> = Vec::new();
        for (i, row) in p.upserts.iter().enumerate() {
            let (first, time) = (p.upsert_first[i], p.upsert_time[i]);
            entries.push((key_of(&m, row)?, first, Slot::Upsert(i), time));
        }
        for (i, row) in p.partial_updates.iter().enumerate() {
            let (first, time) = (p.partial_first[i], p.partial_time[i]);
            entries.push((key_of(&m, row)?, first, Slot::Partial(i), time));
        }
        for (i, key) in p.deletes.iter().enumerate() {
            let (first, time) = (p.delete_first[i], p.delete_time[i]);
            entries.push((key.clone(), first, Slot::Delete(i), time));
        }
        if entries.is_empty() {
            return Ok(Resolved::default());
        }
        let mut texts: Vec<Vec<String>> = entries.iter().map(|(k, ..)| key_texts(k)).collect();
        let key_cols: Vec<Vec<&str>> = (0..m.key.len())
            .map(|k| texts.iter().map(|t| t[k].as_str()).collect())
            .collect();
        let lock = !self.announced.is_empty();
        let stmt = self.prepared(tracking::lookup_sql(&m, lock)).await?;
        let mut params: Vec<&(dyn ToSql + Sync)> =
            vec![&self.id.tenant, &m.display, &self.commit_timestamps];
        params.extend(key_cols.iter().map(|c| c as &(dyn ToSql + Sync)));
        let rows = self
            .client
            .query(&stmt, &params)
            .await
            .map_err(target_err(&format!(
                "reading row versions of {}",
                m.display
            )))?;
        if rows.len() != entries.len() {
            return Err(ReplicationError::Internal(format!(
                "row version lookup of {} returned {} rows for {} keys",
                m.display,
                rows.len(),
                entries.len()
            )));
        }

        let strategy = self.id.conflict.strategy;
        let sensitive = self.id.conflict.sensitive_tables.contains(&m.display);
        let source_node = format!("source-{}", self.id.source_system_id);
        let (mut keep_upsert, mut keep_partial, mut keep_delete) = (
            vec![true; p.upserts.len()],
            vec![true; p.partial_updates.len()],
            vec![true; p.deletes.len()],
        );
        let mut stores: Vec<(usize, Version)> = Vec::new();
        let mut conflicted: Vec<(usize, Conflict)> = Vec::new();
        let mut conflicts: Vec<(Vec<String>, Conflict)> = Vec::new();
        let mut upsert_present = vec![false; p.upserts.len()];
        for (n, ((key, first, slot, time), row)) in entries.iter().zip(&rows).enumerate() {
            let present: bool = row.get(0);
            if let Slot::Upsert(i) = slot {
                upsert_present[*i] = present;
            }
            let stored = row.get::<_, Option<String>>(1).map(|node| Version {
                node,
                time_us: row.get(2),
                vclock: VClock::from_json(row.get::<_, &str>(3)).unwrap_or_default(),
                deleted: row.get(4),
            });
            let deletes = matches!(slot, Slot::Delete(_));
            // Kept until the target commit: a collided insert is decided again.
            let announced = if self.announced.is_empty() {
                None
            } else {
                self.announced
                    .get(&(m.display.clone(), texts[n].clone()))
                    .cloned()
            };
            let explicit = announced.is_some();
            let incoming = announced
                .unwrap_or_else(|| version::derived(&source_node, *time, deletes, stored.as_ref()));
            let target = TargetRow {
                present,
                stored: stored.as_ref(),
            };
            let mut d = decide(strategy, *first, target, &incoming, explicit);
            if let (Slot::Partial(_), false, Winner::Source) = (slot, present, d.winner) {
                // Its unchanged large values are unknown: the row stays missing.
                self.stats.updates_of_missing_rows += 1;
                d.winner = Winner::Target;
                d.store = None;
            }
            if d.winner == Winner::Target {
                match slot {
                    Slot::Upsert(i) => keep_upsert[*i] = false,
                    Slot::Partial(i) => keep_partial[*i] = false,
                    Slot::Delete(i) => keep_delete[*i] = false,
                }
            }
            if let Some(kind) = d.kind {
                let mut c = conflict::report(&m, key, kind, strategy, d.winner);
                if !sensitive {
                    c.source_row = match slot {
                        Slot::Upsert(i) => Some(conflict::image(&m, &p.upserts[*i])),
                        Slot::Partial(i) => Some(conflict::image(&m, &p.partial_updates[*i])),
                        Slot::Delete(_) => None,
                    };
                }
                if present && !sensitive {
                    conflicted.push((n, c));
                } else {
                    conflicts.push((texts[n].clone(), c));
                }
            }
            if let Some(v) = d.store {
                stores.push((n, v));
            }
        }

        // The target's images of conflicting rows, before they change.
        if !conflicted.is_empty() {
            let cols: Vec<Vec<&str>> = (0..m.key.len())
                .map(|k| {
                    conflicted
                        .iter()
                        .map(|(n, _)| texts[*n][k].as_str())
                        .collect()
                })
                .collect();
            let stmt = self.prepared(tracking::image_sql(&m)).await?;
            let params: Vec<&(dyn ToSql + Sync)> =
                cols.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
            let images = self
                .client
                .query(&stmt, &params)
                .await
                .map_err(target_err(&format!(
                    "reading conflicting rows of {}",
                    m.display
                )))?;
            for ((n, mut c), image) in conflicted.into_iter().zip(images) {
                c.target_row = image
                    .get::<_, Option<&str>>(0)
                    .and_then(|t| serde_json::from_str(t).ok());
                conflicts.push((texts[n].clone(), c));
            }
        }

        retain(&mut p.upserts, &keep_upsert);
        retain(&mut p.upsert_first, &keep_upsert);
        retain(&mut p.upsert_time, &keep_upsert);
        retain(&mut upsert_present, &keep_upsert);
        p.upsert_present = upsert_present;
        retain(&mut p.partial_updates, &keep_partial);
        retain(&mut p.partial_first, &keep_partial);
        retain(&mut p.partial_time, &keep_partial);
        retain(&mut p.deletes, &keep_delete);
        retain(&mut p.delete_first, &keep_delete);
        retain(&mut p.delete_time, &keep_delete);
        Ok(Resolved {
            stores: stores
                .into_iter()
                .map(|(n, v)| (std::mem::take(&mut texts[n]), v))
                .collect(),
            conflicts,
        })
    }

    /// Write the open transaction's conflicts to the target's conflict log.
    async fn record_conflicts(&mut self) -> Result<()> {
        if self.pending.conflicts.is_empty() {
            return Ok(());
        }
        let stmt = self.prepared(conflict::INSERT_SQL.to_string()).await?;
        let c = &self.pending.conflicts;
        let tables: Vec<&str> = c.iter().map(|c| c.table.as_str()).collect();
        let keys: Vec<String> = c.iter().map(|c| c.primary_key.to_string()).collect();
        let kinds: Vec<&str> = c.iter().map(|c| c.kind).collect();
        let strategies: Vec<&str> = c.iter().map(|c| c.strategy).collect();
        let winners: Vec<&str> = c.iter().map(|c| c.winner).collect();
        let source_rows: Vec<Option<String>> = c
            .iter()
            .map(|c| c.source_row.as_ref().map(|v| v.to_string()))
            .collect();
        let target_rows: Vec<Option<String>> = c
            .iter()
            .map(|c| c.target_row.as_ref().map(|v| v.to_string()))
            .collect();
        self.client
            .execute(
                &stmt,
                &[
                    &self.id.tenant,
                    &tables,
                    &keys,
                    &kinds,
                    &strategies,
                    &winners,
                    &source_rows,
                    &target_rows,
                ],
            )
            .await
            .map_err(target_err("recording conflicts"))?;
        Ok(())
    }

    /// Apply the plans. With `guard`, rows the resolver read as absent are
    /// inserted only if still absent; the ones a local writer inserted in
    /// between come back (as plans) to be decided again.
    async fn apply_plans(&mut self, plans: &[TablePlan], guard: bool) -> Result<Vec<TablePlan>> {
        let mut collided = Vec::new();
        for p in plans.iter().filter(|p| !p.deletes.is_empty()) {
            let m = &p.mapping;
            self.run(sql::delete(m), &key_columns(m, &p.deletes), &m.display)
                .await?;
        }
        for p in plans.iter().filter(|p| !p.upserts.is_empty()) {
            let m = &p.mapping;
            let all: Vec<usize> = (0..m.casts.len()).collect();
            let absent: Vec<usize> = if guard && p.upsert_present.len() == p.upserts.len() {
                (0..p.upserts.len())
                    .filter(|&i| !p.upsert_present[i])
                    .collect()
            } else {
                Vec::new()
            };
            if absent.is_empty() {
                let rows: Vec<&Tuple> = p.upserts.iter().collect();
                let cols = columns(&rows, &all)?;
                self.run(sql::upsert(m), &cols, &m.display).await?;
                continue;
            }
            let present: Vec<&Tuple> = (0..p.upserts.len())
                .filter(|&i| p.upsert_present[i])
                .map(|i| &p.upserts[i])
                .collect();
            if !present.is_empty() {
                let cols = columns(&present, &all)?;
                self.run(sql::upsert(m), &cols, &m.display).await?;
            }
            let fresh: Vec<&Tuple> = absent.iter().map(|&i| &p.upserts[i]).collect();
            if fresh.len() >= COPY_MIN_ROWS && self.copy_new(m, &fresh).await? {
                continue;
            }
            let cols = columns(&fresh, &all)?;
            let inserted = self.returned(sql::insert_new(m), &cols, m).await?;
            if inserted.len() < absent.len() {
                let mut again = TablePlan::new(m.clone());
                for &i in &absent {
                    if !inserted.contains_key(&key_of(m, &p.upserts[i])?) {
                        again.upserts.push(p.upserts[i].clone());
                        again.upsert_first.push(p.upsert_first[i]);
                        again.upsert_time.push(p.upsert_time[i]);
                    }
                }
                collided.push(again);
            }
        }
        for p in plans.iter().filter(|p| !p.partial_updates.is_empty()) {
            for (set, rows) in column_groups(p) {
                let mut wanted = p.mapping.key.clone();
                wanted.extend(&set);
                let tuples: Vec<&Tuple> = rows.into_iter().map(|(t, _)| t).collect();
                let cols = columns(&tuples, &wanted)?;
                let n = self
                    .run(
                        sql::update_columns(&p.mapping, &set),
                        &cols,
                        &p.mapping.display,
                    )
                    .await?;
                let missing = tuples.len() as u64 - n.min(tuples.len() as u64);
                if missing > 0 {
                    self.stats.updates_of_missing_rows += missing;
                    tracing::warn!(table = %p.mapping.display, rows = missing, "updates of rows that are missing on the target (their unchanged large values are unknown, so they cannot be inserted)");
                }
            }
        }
        Ok(collided)
    }

    /// Rows known absent, many of them: `COPY … FROM STDIN` (several times
    /// faster than `INSERT … ON CONFLICT` for wide rows), in a savepoint.
    /// `Ok(false)`: a row appeared meanwhile (unique violation), nothing was
    /// written; the caller inserts them one statement at a time instead.
    async fn copy_new(&mut self, m: &TableMapping, rows: &[&Tuple]) -> Result<bool> {
        self.client
            .batch_execute("SAVEPOINT heliosdb_copy")
            .await
            .map_err(target_err("SAVEPOINT"))?;
        let (end, copied) = if self.copy_rows(m, rows).await? {
            ("RELEASE SAVEPOINT heliosdb_copy", true)
        } else {
            ("ROLLBACK TO SAVEPOINT heliosdb_copy", false)
        };
        self.client
            .batch_execute(end)
            .await
            .map_err(target_err(end))?;
        Ok(copied)
    }

    /// `COPY … FROM STDIN` of full rows into the open transaction.
    /// `Ok(false)`: a row's primary key is already there (unique violation);
    /// the transaction must be rolled back to a savepoint.
    async fn copy_rows(&mut self, m: &TableMapping, rows: &[&Tuple]) -> Result<bool> {
        use futures_util::SinkExt;
        let mut buf = bytes::BytesMut::with_capacity(rows.len() * 256);
        for row in rows {
            for (i, v) in row.iter().enumerate() {
                if i > 0 {
                    buf.extend_from_slice(b"\t");
                }
                match v {
                    Value::Null => buf.extend_from_slice(b"\\N"),
                    Value::Text(b) => sql::copy_text(&mut buf, b),
                    Value::UnchangedToast | Value::Binary(_) => {
                        return Err(ReplicationError::Internal(
                            "a full row to insert carries an unchanged or binary value".into(),
                        ))
                    }
                }
            }
            buf.extend_from_slice(b"\n");
        }
        let cols: Vec<String> = (0..m.casts.len())
            .map(|i| quote_ident(m.column_name(i)))
            .collect();
        let sql = format!("COPY {} ({}) FROM STDIN", m.target, cols.join(", "));
        let copied = async {
            let sink = self.client.copy_in::<_, bytes::Bytes>(sql.as_str()).await?;
            let mut sink = std::pin::pin!(sink);
            sink.send(buf.freeze()).await?;
            sink.as_mut().finish().await
        }
        .await;
        match copied {
            Ok(_) => Ok(true),
            Err(e) if e.code().map(|c| c.code()) == Some("23505") => Ok(false),
            Err(e) => Err(target_err(&format!("applying changes to {}", m.display))(e)),
        }
    }

    /// A change of a table without a key (`REPLICA IDENTITY FULL`, no
    /// unique index on the target), applied as PostgreSQL's apply worker
    /// does: an insert, or the update or delete of one row equal to the old
    /// image. None found stops the tenant (PostgreSQL logs it and goes on).
    async fn apply_keyless(&mut self, m: &TableMapping, op: &RowOp) -> Result<()> {
        let (sql, params, what) = match op {
            RowOp::Insert { new } => {
                let values: Vec<Option<&str>> = new.iter().map(text).collect::<Result<_>>()?;
                (sql::insert_row(m), values, "insert")
            }
            RowOp::Update { old: Some(old), new } => {
                let set: Vec<usize> = (0..new.len())
                    .filter(|&i| !matches!(new[i], Value::UnchangedToast))
                    .collect();
                let mut values: Vec<Option<&str>> =
                    set.iter().map(|&i| text(&new[i])).collect::<Result<_>>()?;
                let (image, old_values) = old_image(old)?;
                values.extend(old_values);
                (sql::update_like(m, &set, &image), values, "update")
            }
            RowOp::Update { old: None, .. } => {
                return Err(ReplicationError::operator(
                    format!("an update of {} arrived without the old row, and the table has no key to find it by", m.display),
                    format!("ALTER TABLE {} REPLICA IDENTITY FULL on the source (or give it a primary key)", m.display),
                ))
            }
            RowOp::Delete { old } => {
                let (image, values) = old_image(old)?;
                (sql::delete_like(m, &image), values, "delete")
            }
        };
        let stmt = self.prepared(sql).await?;
        let params: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let n = self
            .client
            .execute(&stmt, &params)
            .await
            .map_err(target_err(&format!("applying changes to {}", m.display)))?;
        if n == 0 && what != "insert" {
            // PostgreSQL's apply worker logs this and goes on. The target
            // already differs from the source here, and with no key there is
            // no row version to resolve it by: stop rather than go on wrong.
            return Err(ReplicationError::operator(
                format!(
                    "an {what} of {} found no row equal to the source's old row on the target (the table has no key): the target's rows of it differ from the source's",
                    m.display
                ),
                format!(
                    "copy the table again: give it a primary key and run resync --table {}, or drop the slot and run init --resync",
                    m.display
                ),
            ));
        }
        Ok(())
    }

    async fn run(&mut self, sql: String, cols: &[Vec<Option<&str>>], table: &str) -> Result<u64> {
        let stmt = self.prepared(sql).await?;
        let params: Vec<&(dyn ToSql + Sync)> =
            cols.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        self.client
            .execute(&stmt, &params)
            .await
            .map_err(target_err(&format!("applying changes to {table}")))
    }

    /// An update that changed the primary key: update the row in place by
    /// its old key, so unchanged large values stay with it.
    async fn move_row(&mut self, m: &Arc<TableMapping>, old: &Tuple, new: &Tuple) -> Result<()> {
        let set: Vec<usize> = (0..new.len())
            .filter(|&i| !matches!(new[i], Value::UnchangedToast))
            .collect();
        let old_key = key_of(m, old)?;
        let mut values: Vec<Option<&str>> = old_key
            .iter()
            .map(|b| std::str::from_utf8(b).ok())
            .collect();
        for &i in &set {
            values.push(text(&new[i])?);
        }
        let stmt = self.prepared(sql::move_row(m, &set)).await?;
        let params: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let n = self
            .client
            .execute(&stmt, &params)
            .await
            .map_err(target_err(&format!(
                "moving a row of {} to a new key",
                m.display
            )))?;
        if n == 0 {
            let detect = self.txn_lsn > self.converge_until;
            if has_unchanged(new) {
                self.stats.updates_of_missing_rows += 1;
                tracing::warn!(table = %m.display, "a key-changing update of a row missing on the target; its unchanged large values are unknown");
                if detect {
                    self.pending.conflicts.push(conflict::report(
                        m,
                        &old_key,
                        Kind::UpdateMissing,
                        self.id.conflict.strategy,
                        Winner::Target,
                    ));
                }
            } else {
                let mut one = Chunk::default();
                one.push(m.clone(), RowOp::Insert { new: new.clone() });
                let plans = one.plan()?;
                self.apply_plans(&plans, false).await?;
                if detect {
                    self.pending.conflicts.push(conflict::report(
                        m,
                        &old_key,
                        Kind::UpdateMissing,
                        self.id.conflict.strategy,
                        Winner::Source,
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The target refused a change the source accepted: name the table and the
/// primary key (never the row's other values).
fn rejected((mapping, op): &(Arc<TableMapping>, RowOp), e: ReplicationError) -> ReplicationError {
    let t = match op {
        RowOp::Insert { new } | RowOp::Update { new, .. } => new,
        RowOp::Delete { old } => old,
    };
    let key = key_of(mapping, t)
        .map(|k| key_texts(&k).join(", "))
        .unwrap_or_default();
    ReplicationError::operator(
        format!(
            "target rejected a change to {} (primary key {key}): {e}",
            mapping.display
        ),
        "make the target table's constraints match the source's (the source accepted this change)",
    )
}

/// What resolving a table's plan found: versions to store and conflicts,
/// each with its key (as text).
#[derive(Default)]
struct Resolved {
    stores: Vec<(Vec<String>, Version)>,
    conflicts: Vec<(Vec<String>, Conflict)>,
}

/// Below this many new rows a multi-row INSERT is as fast as COPY.
const COPY_MIN_ROWS: usize = 64;

/// A statement of the optimistic apply, queued to go out with others.
struct Queued<'a> {
    stmt: Statement,
    /// Parameters: one text array per column.
    cols: Vec<Vec<Option<&'a str>>>,
    mapping: &'a TableMapping,
    /// Each key the statement writes, and whether the source had its row.
    expect: Vec<(Key, bool)>,
    /// The answer says which rows were inserted (`xmax = 0`), not only
    /// which were touched.
    inserted: bool,
}

/// The keys (and whether the source had each row) of rows and their first
/// operations.
fn expectations(m: &TableMapping, rows: &[(&Tuple, &FirstOp)]) -> Result<Vec<(Key, bool)>> {
    rows.iter()
        .map(|(row, first)| Ok((key_of(m, row)?, **first != FirstOp::Insert)))
        .collect()
}

/// The keys a statement returned as text (and the boolean after them, if
/// any).
fn returned_keys(rows: &[tokio_postgres::Row], n: usize) -> HashMap<Key, bool> {
    rows.iter()
        .map(|r| {
            let key = (0..n)
                .map(|k| bytes::Bytes::copy_from_slice(r.get::<_, &str>(k).as_bytes()))
                .collect();
            (key, r.len() > n && r.get::<_, bool>(n))
        })
        .collect()
}

/// Columns carried (source indices), and the rows that carry exactly them.
type ColumnGroup<'a> = (Vec<usize>, Vec<(&'a Tuple, FirstOp)>);

/// A plan's partial updates grouped by the columns they carry (the rest
/// are unchanged large values), each with its first operation.
fn column_groups(p: &TablePlan) -> Vec<ColumnGroup<'_>> {
    let mut groups: Vec<ColumnGroup<'_>> = Vec::new();
    for (t, first) in p.partial_updates.iter().zip(&p.partial_first) {
        let set: Vec<usize> = (0..t.len())
            .filter(|i| !p.mapping.key.contains(i) && !matches!(t[*i], Value::UnchangedToast))
            .collect();
        match groups.iter_mut().find(|(s, _)| *s == set) {
            Some((_, rows)) => rows.push((t, *first)),
            None => groups.push((set, vec![(t, *first)])),
        }
    }
    groups
}

/// Primary keys as one text column per key column (statement parameters).
fn key_columns<'a>(m: &TableMapping, keys: &'a [Key]) -> Vec<Vec<Option<&'a str>>> {
    (0..m.key.len())
        .map(|k| {
            keys.iter()
                .map(|key| std::str::from_utf8(&key[k]).ok())
                .collect()
        })
        .collect()
}

/// Keep the items whose flag is set.
fn retain<T>(v: &mut Vec<T>, keep: &[bool]) {
    let mut flags = keep.iter();
    v.retain(|_| *flags.next().unwrap_or(&true));
}

fn text(v: &Value) -> Result<Option<&str>> {
    match v {
        Value::Null => Ok(None),
        Value::Text(b) => std::str::from_utf8(b).map(Some).map_err(|_| {
            ReplicationError::Internal("source sent a value that is not UTF-8".into())
        }),
        Value::UnchangedToast => Err(ReplicationError::Internal(
            "unchanged TOAST value in a full row".into(),
        )),
        Value::Binary(_) => Err(ReplicationError::Internal(
            "binary value without the binary option".into(),
        )),
    }
}

/// An old row image to find a row of a table without a key by: per column,
/// compared to a value (`Some(true)`), NULL (`Some(false)`), or not sent
/// (`None`); and the values compared, in column order.
type OldImage<'a> = (Vec<Option<bool>>, Vec<Option<&'a str>>);

fn old_image(t: &Tuple) -> Result<OldImage<'_>> {
    let mut image = Vec::with_capacity(t.len());
    let mut values = Vec::new();
    for v in t {
        match v {
            Value::UnchangedToast => image.push(None),
            other => {
                let text = text(other)?;
                image.push(Some(text.is_some()));
                values.extend(text.map(Some));
            }
        }
    }
    Ok((image, values))
}

/// Column-major text arrays of `rows`, for the columns `wanted`.
fn columns<'a>(rows: &[&'a Tuple], wanted: &[usize]) -> Result<Vec<Vec<Option<&'a str>>>> {
    wanted
        .iter()
        .map(|&i| rows.iter().map(|r| text(&r[i])).collect())
        .collect()
}
