//! The shipper: a capture session's events into sealed batches, up to
//! [`WINDOW`] on the wire, answers settled in order, the slot acknowledged
//! at what the apply node committed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_postgres::Client;

use super::super::session::{stopped, Acknowledger, CheckpointWriter};
use super::super::{closed, Shutdown};
use super::*;
use crate::apply::batch::row_bytes;
use crate::apply::schema::describe_source_table;
use crate::apply::Committed;
use crate::capture::pgoutput::RelationDesc;
use crate::capture::TxEvent;
use crate::checkpoint::progress;
use crate::config::Config;
use crate::error::{ReplicationError, Result};
use crate::lsn::Lsn;
use crate::seal::{self, BatchInfo};
use crate::telemetry::TenantTelemetry;
use crate::transport::client::ApplyClient;
use crate::transport::codec::Encoder;

#[derive(Default)]
pub(super) struct Stats {
    pub(super) events: u64,
    pub(super) batches: u64,
    pub(super) plain_bytes: u64,
    pub(super) wire_bytes: u64,
    pub(super) events_at_log: u64,
}

/// A batch sent and not answered yet.
pub(super) struct InFlight {
    request: tokio::task::JoinHandle<(ApplyClient, Result<crate::transport::BatchResponse>)>,
    /// Fires when the request has its answer.
    answered: tokio::sync::oneshot::Receiver<()>,
    sequence: u64,
    events: u32,
    plain: usize,
    wire: u64,
    ratio: f64,
    sent_at: Instant,
    /// The batch ends inside a source transaction.
    open: bool,
    /// Complete transactions shipped up to this batch, not yet confirmed.
    done: Committed,
}

/// Count a row change or truncate into `txn` (metrics of shipped work).
fn count_change(txn: &mut Committed, names: &mut TableNames, event: &TxEvent) {
    match event {
        TxEvent::Row(change) => {
            txn.count(names.of(&change.relation), 1);
            txn.bytes += row_bytes(&change.op);
        }
        TxEvent::Truncate { relations, .. } => {
            for rel in relations {
                txn.count(names.of(rel), 1);
            }
        }
        _ => {}
    }
}

pub(super) struct Shipper<'a> {
    pub(super) config: &'a Config,
    pub(super) tel: Arc<TenantTelemetry>,
    /// Events of the source transaction being shipped (for metrics).
    pub(super) open_txn: Committed,
    /// Events of streamed transactions being shipped, by transaction id.
    pub(super) open_streams: std::collections::HashMap<u32, Committed>,
    /// Shipped, complete transactions not yet confirmed committed.
    pub(super) done: Committed,
    /// Envelope bytes sent since the last confirmed commit.
    pub(super) wire_uncommitted: u64,
    pub(super) names: TableNames,
    pub(super) ctx: &'a mut CaptureContext,
    /// For the source catalog's view of relations the apply node needs.
    pub(super) source: Client,
    pub(super) session: String,
    /// Sequence of the next batch.
    pub(super) sequence: u64,
    pub(super) enc: Encoder,
    pub(super) first_lsn: Lsn,
    pub(super) last_lsn: Lsn,
    pub(super) in_source_txn: bool,
    /// The last source commit read is older than [`super::BACKLOG_AGE_US`]: a backlog
    /// is being read, and batches fill up instead of going at each commit.
    pub(super) reading_backlog: bool,
    /// When the batch being built got its first record.
    pub(super) opened_at: Option<Instant>,
    /// The apply node holds part of a source transaction uncommitted.
    pub(super) remote_open: bool,
    /// Batches on the wire, oldest first: the next one is sealed while they
    /// are applied.
    pub(super) in_flight: VecDeque<InFlight>,
    /// Transactions of answered batches the apply node has not committed yet.
    pub(super) carried: Committed,
    pub(super) rx: crate::pipeline::session::Feed,
    pub(super) acked: Acknowledger,
    pub(super) checkpoint: CheckpointWriter,
    pub(super) stats: Stats,
    pub(super) last_log: Instant,
    /// A keepalive's position waiting to be shipped for the apply node to
    /// record.
    pub(super) idle: progress::IdlePosition,
}

impl Shipper<'_> {
    pub(super) async fn run(&mut self, shutdown: &mut Shutdown) -> Result<()> {
        let timeout = self.config.batch.batch_timeout;
        loop {
            let deadline = self
                .opened_at
                .filter(|_| !self.in_source_txn)
                .map(|at| tokio::time::Instant::from_std(at + timeout));
            let idle_due = tokio::time::Instant::from_std(self.idle.due_at());
            let idle_ready = self.idle.is_pending() && !self.busy();
            let flight = self.in_flight.front_mut();
            let answered = async move {
                match flight {
                    Some(f) => {
                        let _ = (&mut f.answered).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let event = tokio::select! {
                biased;
                _ = stopped(shutdown) => return Ok(()),
                _ = answered => {
                    self.settle_oldest().await?;
                    // What gathered while the window was full goes now.
                    if !self.in_source_txn && !self.enc.is_empty() && !self.reading_backlog {
                        self.send().await?;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    self.send().await?;
                    continue;
                }
                ev = self.rx.recv() => ev?.ok_or_else(|| closed("the capture queue"))?,
                _ = tokio::time::sleep_until(idle_due), if idle_ready => {
                    self.ship_idle().await?;
                    continue;
                }
            };
            self.handle(event).await?;
            self.log_progress();
        }
    }

    async fn handle(&mut self, event: TxEvent) -> Result<()> {
        let batch_size = self.config.batch.batch_size as u32;
        match &event {
            TxEvent::Keepalive { wal_end } => {
                if !self.enc.is_empty() && !self.in_source_txn {
                    self.send().await?;
                }
                self.settle().await?;
                // Nothing of this tenant is in flight: the slot may move on,
                // once the apply node has recorded the position.
                if self.enc.is_empty() && !self.remote_open {
                    self.idle.seen(*wal_end);
                    self.ship_idle().await?;
                    self.tel.caught_up();
                }
                return Ok(());
            }
            TxEvent::Begin { final_lsn, .. } => {
                self.in_source_txn = true;
                self.tel.behind();
                if self.enc.is_empty() {
                    self.first_lsn = *final_lsn;
                }
            }
            TxEvent::Commit {
                end_lsn,
                commit_time_us,
                ..
            } => {
                self.in_source_txn = false;
                self.reading_backlog = crate::pipeline::is_backlog(*commit_time_us);
                self.last_lsn = *end_lsn;
                self.done.absorb(std::mem::take(&mut self.open_txn));
                self.done.commit_times_us.push(*commit_time_us);
            }
            TxEvent::Row(_) | TxEvent::Truncate { .. } => {
                count_change(&mut self.open_txn, &mut self.names, &event)
            }
            TxEvent::Version(_) => {}
            TxEvent::Streamed { top, event, .. } => {
                self.tel.behind();
                let txn = self.open_streams.entry(*top).or_default();
                count_change(txn, &mut self.names, event);
            }
            TxEvent::StreamCommit {
                top,
                end_lsn,
                commit_time_us,
                ..
            } => {
                self.reading_backlog = crate::pipeline::is_backlog(*commit_time_us);
                self.last_lsn = *end_lsn;
                self.done
                    .absorb(self.open_streams.remove(top).unwrap_or_default());
                self.done.commit_times_us.push(*commit_time_us);
            }
            TxEvent::StreamAbort { top, xid } => {
                if top == xid {
                    self.open_streams.remove(top);
                }
            }
        }
        for rel in self.enc.unsent_relations(&event) {
            let columns = describe_source_table(&self.source, (&rel.namespace, &rel.name)).await?;
            self.enc.relation(&rel, &columns);
        }
        self.enc.event(&event);
        self.opened_at.get_or_insert_with(Instant::now);
        self.tel
            .m
            .in_flight
            .set(self.rx.len() as i64 + i64::from(self.enc.events()));
        // A full batch waits for the end of the source transaction it is in,
        // so the apply node can commit it (cutting right before a Commit,
        // batch after batch, would keep one target transaction open for a
        // whole backlog); a transaction larger than a batch spans batches.
        let events = self.enc.events();
        let full = events >= batch_size && (!self.in_source_txn || events >= 2 * batch_size);
        // With the window full, complete transactions gather into a larger
        // batch until an answer makes room (fewer, larger target commits
        // when the apply node is the slower side). Reading a backlog, they
        // gather until the batch is full or `batch_timeout_ms` passed: the
        // queue runs empty whenever the walsender is the slower side, and
        // a batch per commit would then cost a seal, a request and a target
        // commit for a few rows.
        let boundary = matches!(event, TxEvent::Commit { .. } | TxEvent::StreamCommit { .. })
            && self.in_flight.len() < WINDOW
            && ((self.rx.len() == 0 && !self.reading_backlog)
                || self
                    .opened_at
                    .is_some_and(|t| t.elapsed() >= self.config.batch.batch_timeout));
        if full || boundary {
            self.send().await?;
        }
        Ok(())
    }

    /// Seal the batch and put it on the wire; with the window full, the
    /// oldest batch's answer is awaited first (sealing this batch overlapped
    /// applying that one).
    pub(super) async fn send(&mut self) -> Result<()> {
        if self.enc.is_empty() {
            return Ok(());
        }
        let t = &self.config.tenant;
        let events = self.enc.events();
        let body = self.enc.finish();
        let info = BatchInfo {
            tenant: &t.tenant_id,
            sequence: self.sequence,
            first_lsn: self.first_lsn,
            last_lsn: self.last_lsn,
            events,
        };
        let sealed = seal::seal(&info, &body, &self.ctx.compression, self.ctx.keys.as_ref())
            .map_err(|e| {
                ReplicationError::operator(
                    format!("sealing a batch: {e}"),
                    "add a newer key for the tenant (keys directory) and give it to the apply node too",
                )
            })?;
        while self.in_flight.len() >= WINDOW {
            self.settle_oldest().await?;
        }
        let mut client = self.ctx.take_client()?;
        let (tenant, session) = (t.tenant_id.clone(), self.session.clone());
        let wire = sealed.bytes.len() as u64;
        let envelope = Bytes::from(sealed.bytes);
        let (tx, answered) = tokio::sync::oneshot::channel();
        let request = tokio::spawn(async move {
            let answer = client.batch(&tenant, &session, envelope).await;
            let _ = tx.send(());
            (client, answer)
        });
        self.in_flight.push_back(InFlight {
            request,
            answered,
            sequence: self.sequence,
            events,
            plain: body.len(),
            wire,
            ratio: sealed.ratio,
            sent_at: Instant::now(),
            open: self.in_source_txn,
            done: std::mem::take(&mut self.done),
        });
        self.sequence += 1;
        self.opened_at = None;
        self.first_lsn = self.last_lsn;
        Ok(())
    }

    /// Something of the tenant is being built, is on the wire, or is open
    /// on the apply node.
    fn busy(&self) -> bool {
        !self.enc.is_empty() || self.in_source_txn || self.remote_open || !self.in_flight.is_empty()
    }

    /// Ship the pending idle position in a batch of its own, between
    /// transactions with nothing else on the wire; the apply node records it
    /// and answers it as committed, and the slot is acknowledged there.
    async fn ship_idle(&mut self) -> Result<()> {
        if self.busy() {
            return Ok(());
        }
        let Some(lsn) = self.idle.take_due(self.acked.position()) else {
            return Ok(());
        };
        self.first_lsn = lsn;
        self.last_lsn = lsn;
        self.enc.event(&TxEvent::Keepalive { wal_end: lsn });
        self.send().await?;
        self.settle().await
    }

    /// Wait for every batch on the wire to be answered.
    pub(super) async fn settle(&mut self) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    /// After an error: wait for the requests still on the wire, ignoring
    /// their answers, to get their connections back.
    pub(super) async fn recover(&mut self) {
        while let Some(f) = self.in_flight.pop_front() {
            if let Ok((client, _)) = f.request.await {
                self.ctx.clients.push(client);
            }
        }
    }

    /// Wait for the oldest batch on the wire to be answered, and
    /// acknowledge what the apply node committed.
    async fn settle_oldest(&mut self) -> Result<()> {
        let Some(f) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let (client, answer) = f
            .request
            .await
            .map_err(|e| ReplicationError::Internal(format!("batch request task: {e}")))?;
        self.ctx.clients.push(client);
        let answer = answer?;
        if answer.sequence != f.sequence {
            return Err(ReplicationError::Internal(format!(
                "the apply node answered batch {} for batch {}",
                answer.sequence, f.sequence
            )));
        }
        let t = &self.config.tenant;
        self.tel.m.compression_ratio.set(f.ratio);
        self.remote_open = f.open;
        self.stats.events += f.events as u64;
        self.stats.batches += 1;
        self.stats.plain_bytes += f.plain as u64;
        self.stats.wire_bytes += f.wire;
        tracing::debug!(
            sequence = answer.sequence, events = f.events, plain = f.plain, wire = f.wire, ratio = f.ratio,
            committed = ?answer.committed_end_lsn, "batch applied"
        );
        self.wire_uncommitted += f.wire;
        match answer.committed_end_lsn {
            Some(end) => {
                let end = Lsn(end);
                let mut done = std::mem::take(&mut self.carried);
                done.absorb(f.done);
                done.duration = f.sent_at.elapsed();
                self.tel.committed(&done, end, Some(self.wire_uncommitted));
                self.wire_uncommitted = 0;
                self.acknowledge(end);
                self.checkpoint
                    .after_commit(&t.tenant_id, &t.slot, self.stats.events, end)
                    .await;
            }
            // Still open on the apply node: its transactions commit with a
            // later batch.
            None => self.carried.absorb(f.done),
        }
        Ok(())
    }

    fn acknowledge(&mut self, lsn: Lsn) {
        self.acked.advance(lsn);
    }

    fn log_progress(&mut self) {
        let elapsed = self.last_log.elapsed();
        if elapsed < Duration::from_secs(10) {
            return;
        }
        let s = &self.stats;
        let rate = (s.events - s.events_at_log) as f64 / elapsed.as_secs_f64();
        let ratio = if s.wire_bytes == 0 {
            0.0
        } else {
            s.plain_bytes as f64 / s.wire_bytes as f64
        };
        tracing::info!(
            events = s.events, batches = s.batches, events_per_sec = rate as u64,
            acknowledged = %self.acked.position(), wire_bytes = s.wire_bytes,
            compression_ratio = format!("{ratio:.2}"), "progress"
        );
        self.last_log = Instant::now();
        self.stats.events_at_log = self.stats.events;
    }
}

/// `schema.table` of each relation, formatted once per definition rather
/// than once per row.
#[derive(Default)]
pub(super) struct TableNames(std::collections::HashMap<u32, (Arc<RelationDesc>, String)>);

impl TableNames {
    fn of(&mut self, rel: &Arc<RelationDesc>) -> &str {
        let entry = self
            .0
            .entry(rel.id)
            .or_insert_with(|| (rel.clone(), String::new()));
        if entry.1.is_empty() || !Arc::ptr_eq(&entry.0, rel) {
            *entry = (rel.clone(), format!("{}.{}", rel.namespace, rel.name));
        }
        &entry.1
    }
}
