//! The capture node (`[transport] mode = "capture"`): reads the tenant's
//! changes from the source slot and ships them, sealed, to the apply node.
//!
//! ```text
//! slot ─► capture task ─► [queue] ─► Shipper: Encoder ─► seal ─► POST ─► apply node
//!              ▲                                                    │ answered after commit
//!              └──────── acknowledged LSN ◄── committed end LSN ◄───┘
//! ```
//!
//! A session starts by asking the apply node where the target stands (its
//! progress and the next batch sequence); streaming resumes from there, as
//! in one process. Batches close at `[cdc] batch_size` events (a source
//! transaction larger than that spans several batches, applied into one
//! open target transaction), or at a source commit when nothing more is
//! queued or `batch_timeout_ms` passed; a full batch waits for the end of
//! its source transaction so the apply node can commit it. Up to
//! [`WINDOW`] batches are on the wire at once, each on its own connection:
//! the apply node opens the next while it applies one, and applies them in
//! sequence order; answers are settled in that order too.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::Client;

use super::session::{capture_loop, open_stream, stopped, Acknowledger, CheckpointWriter};
use super::{closed, Shutdown};
use crate::apply::batch::row_bytes;
use crate::apply::schema::describe_source_table;
use crate::apply::Committed;
use crate::capture::assemble::Assembler;
use crate::capture::pgoutput::RelationDesc;
use crate::capture::TxEvent;
use crate::checkpoint::progress;
use crate::config::Config;
use crate::error::{ReplicationError, Result, Side};
use crate::lsn::Lsn;
use crate::pg;
use crate::provision::preflight;
use crate::seal::{self, BatchInfo, Compression, FileKeys, KeyProvider};
use crate::telemetry::{State, TenantTelemetry};
use crate::transport::client::{host_name, ApplyClient};
use crate::transport::codec::Encoder;
use crate::transport::SessionRequest;

/// Batches on the wire at once.
const WINDOW: usize = 2;

/// What outlives sessions: keys (their batch counts), compression, the
/// connections to the apply node.
pub struct CaptureContext {
    keys: Arc<FileKeys>,
    compression: Compression,
    /// Idle connections (one per batch the window allows); a request on
    /// the wire owns the one it uses.
    clients: Vec<ApplyClient>,
}

impl CaptureContext {
    fn client(&mut self) -> Result<&mut ApplyClient> {
        self.clients.last_mut().ok_or_else(client_in_use)
    }

    /// Hand a connection to a request on the wire.
    fn take_client(&mut self) -> Result<ApplyClient> {
        self.clients.pop().ok_or_else(client_in_use)
    }

    /// One idle connection per batch the window allows (a request task
    /// that died took its connection with it).
    fn refill(&mut self, config: &Config) -> Result<()> {
        while self.clients.len() < WINDOW {
            self.clients.push(ApplyClient::new(
                &config.transport,
                config.network.connect_timeout,
            )?);
        }
        Ok(())
    }
}

fn client_in_use() -> ReplicationError {
    ReplicationError::Internal("the apply client is in use".into())
}

impl CaptureContext {
    /// Load keys, dictionary and TLS material; any problem stops start-up.
    pub fn new(config: &Config) -> Result<Self> {
        let path = config.seal.key_path.as_deref().ok_or_else(|| {
            ReplicationError::operator(
                "[encryption] key_file is not set",
                "set it to the tenant's key file or keys directory",
            )
        })?;
        let keys = FileKeys::load(&config.tenant.tenant_id, path).map_err(|e| {
            ReplicationError::operator(
                e.to_string(),
                "create the key with `openssl rand -hex 32 > FILE && chmod 600 FILE` and give the apply node the same key",
            )
        })?;
        let compression = config
            .seal
            .compression()
            .map_err(|e| ReplicationError::operator(e, "point it at a readable file"))?;
        let mut ctx = Self {
            keys: Arc::new(keys),
            compression,
            clients: Vec::new(),
        };
        ctx.refill(config)?;
        Ok(ctx)
    }
}

/// One session of the capture node; ends on shutdown (`Ok`) or an error.
pub async fn run(
    config: &Config,
    ctx: &mut CaptureContext,
    shutdown: Shutdown,
    tel: &Arc<TenantTelemetry>,
) -> Result<()> {
    let t = &config.tenant;
    let app = format!("heliosdb-tenant-replication/{} capture", t.tenant_id);
    let source = pg::connect(t.source()?, &config.network, Side::Source, &app).await?;
    let report = preflight::check_source(&source, t).await?;
    let system_id = preflight::system_id(&source).await?;
    ctx.refill(config)?;

    let remote = ctx
        .client()?
        .session(
            &t.tenant_id,
            &SessionRequest {
                source_system_id: system_id.clone(),
                slot: t.slot.clone(),
                capture_node: host_name(),
            },
        )
        .await?;
    if remote.progress.is_none() && crate::snapshot::wanted(&config.tenant, false) {
        return Err(ReplicationError::operator(
            format!(
                "tenant '{}' has no progress on the target and [cdc] start_lsn = 0: its existing rows were never copied",
                t.tenant_id
            ),
            "provision it once from a host that reaches both databases (`heliosdb-tenant-replication --config <file naming source and target> init`), or set [cdc] start_lsn to stream without copying",
        ));
    }
    let sealing = ctx
        .keys
        .sealing_key(&t.tenant_id)
        .map_err(|e| ReplicationError::operator(e.to_string(), "add a key for the tenant"))?;
    if let Some((id, n)) = &remote.key_batches {
        if *id == sealing.id {
            sealing.count_at_least(*n);
        }
    }
    if let Some(p) = &remote.progress {
        progress::check_slot_covered(&t.tenant_id, &t.slot, Lsn(p.end_lsn), report.slot_confirmed)?;
    }
    let resume = remote
        .progress
        .as_ref()
        .map(|p| (Lsn(p.commit_lsn), Lsn(p.end_lsn)));
    let opened = open_stream(config, resume, &system_id, report.slot_confirmed, &app).await?;
    tracing::info!(
        tenant = %t.tenant_id, slot = %t.slot, apply_node = %ctx.client()?.endpoint(),
        start_lsn = %opened.start_lsn, next_sequence = remote.next_sequence,
        "replication_start: streaming to the apply node"
    );
    tel.set_state(State::Running);

    let (tx, rx) = mpsc::channel(config.batch.buffer_events);
    let (ack_tx, ack_rx) = watch::channel(opened.ack_lsn);
    let (final_tx, final_rx) = oneshot::channel();
    let assembler = Assembler::new(
        resume.map(|(commit, _)| commit).unwrap_or(Lsn::ZERO),
        &config.tenant.tenant_id,
    );
    let capture = tokio::spawn(capture_loop(opened.stream, assembler, tx, ack_rx, final_rx));

    let mut shipper = Shipper {
        config,
        ctx,
        source,
        session: remote.session,
        sequence: remote.next_sequence,
        enc: Encoder::new(),
        first_lsn: Lsn::ZERO,
        last_lsn: Lsn::ZERO,
        in_source_txn: false,
        reading_backlog: false,
        opened_at: None,
        remote_open: false,
        idle: progress::IdlePosition::default(),
        in_flight: VecDeque::new(),
        carried: Committed::default(),
        rx,
        acked: Acknowledger::new(ack_tx, opened.ack_lsn),
        checkpoint: CheckpointWriter::new(
            opened.file,
            system_id,
            config.batch.checkpoint_interval,
            tel.clone(),
        ),
        tel: tel.clone(),
        open_txn: Committed::default(),
        open_streams: Default::default(),
        done: Committed::default(),
        wire_uncommitted: 0,
        names: TableNames::default(),
        stats: Stats::default(),
        last_log: Instant::now(),
    };
    let mut shutdown = shutdown;
    let outcome = shipper.run(&mut shutdown).await;
    let outcome = match outcome {
        // Shutdown: ship what ends on a source commit.
        Ok(()) if !shipper.in_source_txn && !shipper.enc.is_empty() => match shipper.send().await {
            Ok(()) => shipper.settle().await,
            Err(e) => Err(e),
        },
        Ok(()) => shipper.settle().await,
        // Requests on the wire still own their connections: get them back
        // for the next session (their answers no longer matter).
        Err(e) => {
            shipper.recover().await;
            Err(e)
        }
    };
    shipper
        .checkpoint
        .write_now(&t.tenant_id, &t.slot, shipper.acked.position())
        .await;
    let _ = final_tx.send(shipper.acked.position());
    let captured = tokio::time::timeout(Duration::from_secs(6), capture).await;
    match outcome {
        Ok(()) => {
            tracing::info!(tenant = %t.tenant_id, acknowledged = %shipper.acked.position(), "replication_stop: stopped");
            Ok(())
        }
        // A capture error explains a "queue closed".
        Err(e) => match captured {
            Ok(Ok(Err(capture_err))) => Err(capture_err),
            _ => Err(e),
        },
    }
}

#[derive(Default)]
struct Stats {
    events: u64,
    batches: u64,
    plain_bytes: u64,
    wire_bytes: u64,
    events_at_log: u64,
}

/// A batch sent and not answered yet.
struct InFlight {
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

struct Shipper<'a> {
    config: &'a Config,
    tel: Arc<TenantTelemetry>,
    /// Events of the source transaction being shipped (for metrics).
    open_txn: Committed,
    /// Events of streamed transactions being shipped, by transaction id.
    open_streams: std::collections::HashMap<u32, Committed>,
    /// Shipped, complete transactions not yet confirmed committed.
    done: Committed,
    /// Envelope bytes sent since the last confirmed commit.
    wire_uncommitted: u64,
    names: TableNames,
    ctx: &'a mut CaptureContext,
    /// For the source catalog's view of relations the apply node needs.
    source: Client,
    session: String,
    /// Sequence of the next batch.
    sequence: u64,
    enc: Encoder,
    first_lsn: Lsn,
    last_lsn: Lsn,
    in_source_txn: bool,
    /// The last source commit read is older than [`super::BACKLOG_AGE_US`]: a backlog
    /// is being read, and batches fill up instead of going at each commit.
    reading_backlog: bool,
    /// When the batch being built got its first record.
    opened_at: Option<Instant>,
    /// The apply node holds part of a source transaction uncommitted.
    remote_open: bool,
    /// Batches on the wire, oldest first: the next one is sealed while they
    /// are applied.
    in_flight: VecDeque<InFlight>,
    /// Transactions of answered batches the apply node has not committed yet.
    carried: Committed,
    rx: mpsc::Receiver<TxEvent>,
    acked: Acknowledger,
    checkpoint: CheckpointWriter,
    stats: Stats,
    last_log: Instant,
    /// A keepalive's position waiting to be shipped for the apply node to
    /// record.
    idle: progress::IdlePosition,
}

impl Shipper<'_> {
    async fn run(&mut self, shutdown: &mut Shutdown) -> Result<()> {
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
                ev = self.rx.recv() => ev.ok_or_else(|| closed("the capture queue"))?,
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
                self.reading_backlog = super::is_backlog(*commit_time_us);
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
                self.reading_backlog = super::is_backlog(*commit_time_us);
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
            && ((self.rx.is_empty() && !self.reading_backlog)
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
    async fn send(&mut self) -> Result<()> {
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
    async fn settle(&mut self) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    /// After an error: wait for the requests still on the wire, ignoring
    /// their answers, to get their connections back.
    async fn recover(&mut self) {
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
struct TableNames(std::collections::HashMap<u32, (Arc<RelationDesc>, String)>);

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
