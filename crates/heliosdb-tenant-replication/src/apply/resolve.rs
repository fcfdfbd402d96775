//! Conflicts: a chunk the optimistic path found diverging is resolved
//! against the target's rows and stored versions, and the conflicts are
//! recorded (see [`super::conflict`]).

use super::chunk::*;
use super::*;

impl Applier {
    pub(super) async fn resolve_and_apply(
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
    pub(super) async fn resolve_and_apply_once(
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
    pub(super) async fn store_versions(
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
    pub(super) async fn resolve(&mut self, p: &mut TablePlan) -> Result<Resolved> {
        let m = p.mapping.clone();
        enum Slot {
            Upsert(usize),
            Partial(usize),
            Delete(usize),
        }
        // Each key with its first change, its slot, and the time and
        // announced version of its last change.
        let announced_of = |v: &[Option<Version>], i: usize| v.get(i).cloned().flatten();
        let mut entries: Vec<(Key, FirstOp, Slot, i64, Option<Version>)> = Vec::new();
        for (i, row) in p.upserts.iter().enumerate() {
            let (first, time) = (p.upsert_first[i], p.upsert_time[i]);
            let v = announced_of(&p.upsert_version, i);
            entries.push((key_of(&m, row)?, first, Slot::Upsert(i), time, v));
        }
        for (i, row) in p.partial_updates.iter().enumerate() {
            let (first, time) = (p.partial_first[i], p.partial_time[i]);
            let v = announced_of(&p.partial_version, i);
            entries.push((key_of(&m, row)?, first, Slot::Partial(i), time, v));
        }
        for (i, key) in p.deletes.iter().enumerate() {
            let (first, time) = (p.delete_first[i], p.delete_time[i]);
            let v = announced_of(&p.delete_version, i);
            entries.push((key.clone(), first, Slot::Delete(i), time, v));
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
        for (n, ((key, first, slot, time, announced), row)) in entries.iter().zip(&rows).enumerate()
        {
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
            // The version announced with the change (taken when it arrived:
            // replayed row by row, each change keeps its own); else what
            // was announced for the key in this target transaction.
            let announced = announced.clone().or_else(|| {
                (!self.announced.is_empty())
                    .then(|| {
                        self.announced
                            .get(&(m.display.clone(), texts[n].clone()))
                            .cloned()
                    })
                    .flatten()
            });
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
        for (versions, keep) in [
            (&mut p.upsert_version, &keep_upsert),
            (&mut p.partial_version, &keep_partial),
            (&mut p.delete_version, &keep_delete),
        ] {
            if versions.len() == keep.len() {
                retain(versions, keep);
            }
        }
        Ok(Resolved {
            stores: stores
                .into_iter()
                .map(|(n, v)| (std::mem::take(&mut texts[n]), v))
                .collect(),
            conflicts,
        })
    }

    /// Write the open transaction's conflicts to the target's conflict log.
    pub(super) async fn record_conflicts(&mut self) -> Result<()> {
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
}

/// The target refused a change the source accepted: name the table and the
/// primary key (never the row's other values).
pub(super) fn rejected(
    (mapping, op): &(Arc<TableMapping>, RowOp),
    e: ReplicationError,
) -> ReplicationError {
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
pub(super) struct Resolved {
    stores: Vec<(Vec<String>, Version)>,
    conflicts: Vec<(Vec<String>, Conflict)>,
}
