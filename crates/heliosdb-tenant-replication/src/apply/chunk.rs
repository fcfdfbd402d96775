//! Writing a chunk of row changes: the optimistic path (statements sent
//! together, no read first; a table's new rows by COPY), the resolved path
//! when a stored version can decide a conflict, and key changes.

use super::resolve::rejected;
use super::*;

impl Applier {
    /// Write the chunk into the open transaction: coalesced, many rows per
    /// statement, after resolving conflicts. If that fails on a constraint
    /// that row-by-row order would satisfy (a unique value moving between
    /// rows, foreign keys), replay the chunk one change at a time in source
    /// order.
    pub(super) async fn flush(&mut self) -> Result<()> {
        self.flush_chunk(true).await
    }

    /// [`Self::flush`]; `release`: false leaves the chunk's savepoint to the
    /// COMMIT that follows (one round trip less).
    pub(super) async fn flush_chunk(&mut self, release: bool) -> Result<()> {
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
                let each = chunk.times.into_iter().zip(chunk.versions);
                for ((mapping, op), (time, version)) in chunk.ops.into_iter().zip(each) {
                    let mut one = Chunk::default();
                    one.push_versioned(mapping.clone(), op, time, version);
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
    pub(super) async fn apply_chunk(
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
    pub(super) async fn open_chunk(&mut self, plans: &[TablePlan], ask: bool) -> Result<bool> {
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
    pub(super) async fn apply_optimistic(&mut self, plans: &[TablePlan]) -> Result<bool> {
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
    pub(super) async fn run_queued(&self, queued: Vec<Queued<'_>>) -> Result<bool> {
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
    pub(super) async fn returned(
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

    /// Apply the plans. With `guard`, rows the resolver read as absent are
    /// inserted only if still absent; the ones a local writer inserted in
    /// between come back (as plans) to be decided again.
    pub(super) async fn apply_plans(
        &mut self,
        plans: &[TablePlan],
        guard: bool,
    ) -> Result<Vec<TablePlan>> {
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
                        again
                            .upsert_version
                            .push(p.upsert_version.get(i).cloned().flatten());
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
    pub(super) async fn copy_new(&mut self, m: &TableMapping, rows: &[&Tuple]) -> Result<bool> {
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
    pub(super) async fn copy_rows(&mut self, m: &TableMapping, rows: &[&Tuple]) -> Result<bool> {
        use futures_util::SinkExt;
        let cols: Vec<String> = (0..m.casts.len())
            .map(|i| quote_ident(m.column_name(i)))
            .collect();
        let binary = match m.binary.as_deref() {
            Some(encoders) => {
                let buf = copy_binary(encoders, rows);
                if buf.is_none() {
                    tracing::debug!(table = %m.display, "a value is not in the form its binary encoder takes: these rows go as text");
                }
                buf
            }
            None => None,
        };
        tracing::trace!(table = %m.display, rows = rows.len(), binary = binary.is_some(), "COPY");
        let (buf, format) = match binary {
            Some(buf) => (buf, " (FORMAT binary)"),
            None => (copy_text(rows)?, ""),
        };
        let sql = format!("COPY {} ({}) FROM STDIN{format}", m.target, cols.join(", "));
        let copied = async {
            let sink = self.client.copy_in::<_, bytes::Bytes>(sql.as_str()).await?;
            let mut sink = std::pin::pin!(sink);
            sink.send(buf).await?;
            sink.as_mut().finish().await
        }
        .await;
        match copied {
            Ok(_) => Ok(true),
            Err(e) if e.code().map(|c| c.code()) == Some("23505") => Ok(false),
            Err(e) => Err(target_err(&format!("applying changes to {}", m.display))(e)),
        }
    }

    pub(super) async fn run(
        &mut self,
        sql: String,
        cols: &[Vec<Option<&str>>],
        table: &str,
    ) -> Result<u64> {
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
    pub(super) async fn move_row(
        &mut self,
        m: &Arc<TableMapping>,
        old: &Tuple,
        new: &Tuple,
    ) -> Result<()> {
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

/// Below this many new rows a multi-row INSERT is as fast as COPY.
pub(super) const COPY_MIN_ROWS: usize = 64;

/// A statement of the optimistic apply, queued to go out with others.
pub(super) struct Queued<'a> {
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
pub(super) fn expectations(
    m: &TableMapping,
    rows: &[(&Tuple, &FirstOp)],
) -> Result<Vec<(Key, bool)>> {
    rows.iter()
        .map(|(row, first)| Ok((key_of(m, row)?, **first != FirstOp::Insert)))
        .collect()
}

/// The keys a statement returned as text (and the boolean after them, if
/// any).
pub(super) fn returned_keys(rows: &[tokio_postgres::Row], n: usize) -> HashMap<Key, bool> {
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
pub(super) type ColumnGroup<'a> = (Vec<usize>, Vec<(&'a Tuple, FirstOp)>);

/// A plan's partial updates grouped by the columns they carry (the rest
/// are unchanged large values), each with its first operation.
pub(super) fn column_groups(p: &TablePlan) -> Vec<ColumnGroup<'_>> {
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
pub(super) fn key_columns<'a>(m: &TableMapping, keys: &'a [Key]) -> Vec<Vec<Option<&'a str>>> {
    (0..m.key.len())
        .map(|k| {
            keys.iter()
                .map(|key| std::str::from_utf8(&key[k]).ok())
                .collect()
        })
        .collect()
}

/// Keep the items whose flag is set.
pub(super) fn retain<T>(v: &mut Vec<T>, keep: &[bool]) {
    let mut flags = keep.iter();
    v.retain(|_| *flags.next().unwrap_or(&true));
}

pub(super) fn text(v: &Value) -> Result<Option<&str>> {
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

/// Column-major text arrays of `rows`, for the columns `wanted`.
pub(super) fn columns<'a>(
    rows: &[&'a Tuple],
    wanted: &[usize],
) -> Result<Vec<Vec<Option<&'a str>>>> {
    wanted
        .iter()
        .map(|&i| rows.iter().map(|r| text(&r[i])).collect())
        .collect()
}

/// Rows in COPY's text format.
fn copy_text(rows: &[&Tuple]) -> Result<bytes::Bytes> {
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
    Ok(buf.freeze())
}

/// Rows in COPY's binary format (no byte of a value is scanned by the
/// target), or `None` when a value is not in the form its encoder takes
/// (the rows then go as text).
fn copy_binary(
    encoders: &[crate::apply::binary::Encoder],
    rows: &[&Tuple],
) -> Option<bytes::Bytes> {
    use bytes::BufMut;
    let size: usize = rows
        .iter()
        .flat_map(|r| r.iter())
        .map(|v| match v {
            Value::Text(b) => b.len() + 4,
            _ => 4,
        })
        .sum();
    let mut buf = bytes::BytesMut::with_capacity(size + rows.len() * 2 + 21);
    buf.put_slice(b"PGCOPY\n\xff\r\n\0");
    buf.put_i32(0); // flags
    buf.put_i32(0); // header extension
    let fields = i16::try_from(encoders.len()).ok()?;
    for row in rows {
        if row.len() != encoders.len() {
            return None;
        }
        buf.put_i16(fields);
        for (v, e) in row.iter().zip(encoders) {
            match v {
                Value::Null => buf.put_i32(-1),
                Value::Text(b) => e.field(b, &mut buf)?,
                Value::UnchangedToast | Value::Binary(_) => return None,
            }
        }
    }
    buf.put_i16(-1);
    Some(buf.freeze())
}
