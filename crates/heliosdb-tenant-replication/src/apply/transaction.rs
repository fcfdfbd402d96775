//! The target transaction and the progress in it: begin, savepoints for
//! subtransactions, commit with the progress row, rollback.

use super::*;

use tokio_postgres::SimpleQueryMessage;

/// The (insert, flush) positions of a `SELECT pg_current_wal_insert_lsn(),
/// pg_current_wal_flush_lsn()` answer.
fn wal_positions(answer: &[SimpleQueryMessage]) -> Result<(Lsn, Lsn)> {
    let row = answer.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    });
    let at = |i: usize| {
        row.and_then(|r| r.get(i))
            .and_then(|v| v.parse::<Lsn>().ok())
    };
    match (at(0), at(1)) {
        (Some(insert), Some(flush)) => Ok((insert, flush)),
        _ => Err(ReplicationError::Internal(
            "the target did not answer its WAL positions after COMMIT".into(),
        )),
    }
}

impl Applier {
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
                self.client.simple_query(self.commit_sql())
            );
            progress.map_err(target_err("recording progress"))?;
            self.committed_wal(commit)?;
        } else {
            let commit = self.client.simple_query(self.commit_sql()).await;
            self.committed_wal(commit)?;
        }
        let mut done = std::mem::take(&mut self.pending);
        done.duration = self.opened_at.map(|t| t.elapsed()).unwrap_or_default();
        self.committed = done;
        self.open = false;
        self.opened_at = None;
        self.pending_events = 0;
        Ok(self.pending_commit.take())
    }

    /// Commit without waiting for the target's WAL flush (as PostgreSQL's
    /// own apply worker does): the caller then tells the source about a
    /// commit only once [`Applier::take_wal`] / [`Applier::target_wal`]
    /// show the target's WAL flushed past it.
    pub async fn commit_asynchronously(&mut self) -> Result<()> {
        self.client
            .batch_execute("SET synchronous_commit = off")
            .await
            .map_err(target_err("SET synchronous_commit = off"))?;
        self.asynchronous = true;
        Ok(())
    }

    fn commit_sql(&self) -> &'static str {
        if self.asynchronous {
            // Read right after the commit: its WAL record ends at or before
            // the insert position.
            "COMMIT; SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text"
        } else {
            "COMMIT"
        }
    }

    fn committed_wal(
        &mut self,
        answer: std::result::Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>,
    ) -> Result<()> {
        let answer = answer.map_err(target_err("COMMIT"))?;
        if self.asynchronous {
            self.wal = Some(wal_positions(&answer)?);
        }
        Ok(())
    }

    /// The target's (insert, flush) WAL positions read after the last
    /// commit, once.
    pub fn take_wal(&mut self) -> Option<(Lsn, Lsn)> {
        self.wal.take()
    }

    /// The target's (insert, flush) WAL positions now (between target
    /// transactions): every commit made before this call ends at or
    /// before the insert position.
    pub async fn target_wal(&mut self) -> Result<(Lsn, Lsn)> {
        let answer = self
            .client
            .simple_query(
                "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text",
            )
            .await
            .map_err(target_err("reading the target's WAL positions"))?;
        wal_positions(&answer)
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
}
