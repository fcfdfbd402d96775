//! One connected session of a tenant's pipeline.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::driver::{CommitPolicy, Delivery, Driver, Source};
use super::hub::{HubFeed, HubHandle, QueueSpec, Resume};
use super::lanes::{lane_opener, LaneCatalog};
use super::{closed, Shutdown};
use crate::apply::streams::Streams;
use crate::apply::{Applier, ApplyIdentity};
use crate::capture::assemble::Assembler;
use crate::capture::catalog::SourceTable;
use crate::capture::stream::{PgwireSource, StreamSpec};
use crate::capture::{ChangeSource, TxEvent};
use crate::checkpoint::file::{CheckpointFile, FileState};
use crate::checkpoint::progress;
use crate::config::Config;
use crate::error::{ReplicationError, Result, Side};
use crate::lsn::Lsn;
use crate::pg;
use crate::provision::preflight;
use crate::snapshot::{self, CopyConfig, Snapshot};
use crate::telemetry::{State, TenantTelemetry};

/// Run a session until shutdown (`Ok`) or an error.
pub async fn run(
    config: &Config,
    hub: Option<&HubHandle>,
    mut shutdown: Shutdown,
    tel: &Arc<TenantTelemetry>,
) -> Result<()> {
    let t = &config.tenant;
    let app = format!("heliosdb-tenant-replication/{}", t.tenant_id);

    let source = pg::connect(t.source()?, &config.network, Side::Source, &app).await?;
    let report = preflight::check_source(&source, t).await?;
    let mut target = pg::connect(t.target()?, &config.network, Side::Target, &app).await?;
    crate::apply::tracking::ensure_schema(&target).await?;
    preflight::check_target(&target, t, &report.tables).await?;

    // Progress recorded from another source cluster is refused before
    // anything is copied or streamed.
    let system_id = preflight::system_id(&source).await?;
    let mut recorded = progress::load(&target, &t.tenant_id).await?;
    let spool = spool_dir(config);
    if let Some(p) = &recorded {
        p.check_source(&t.tenant_id, &system_id, &t.slot)?;
        // On a shared slot, the tenant's spool may hold what the slot has
        // released.
        let covered = match hub {
            Some(_) => super::spool::covered(p.end_lsn, &super::spool::spans_on_disk(&spool)),
            None => p.end_lsn,
        };
        progress::check_slot_covered(&t.tenant_id, &t.slot, covered, report.slot_confirmed)?;
    }
    if snapshot::wanted(&config.tenant, recorded.is_some()) {
        tel.set_state(State::Snapshotting);
        // The slot already exists (made by hand, or a copy was interrupted):
        // copy now, stream from the slot's position, replay converges.
        snapshot::initial_copy(
            &CopyConfig::of(config),
            &report.tables,
            Snapshot::Fresh,
            report.slot_confirmed,
            &system_id,
        )
        .await?;
        recorded = progress::load(&target, &t.tenant_id).await?;
    } else {
        let pending = snapshot::pending_resyncs(&target, &t.tenant_id).await?;
        if !pending.is_empty() {
            tel.set_state(State::Snapshotting);
            snapshot::resync_tables(
                &CopyConfig::of(config),
                &mut target,
                &report.tables,
                &pending,
            )
            .await?;
            recorded = progress::load(&target, &t.tenant_id).await?;
        }
    }
    // Local writes to the target are versioned from here on.
    let tracked = crate::apply::tracking::install_published(
        &source,
        &target,
        &t.publication,
        &t.tenant_id,
        &t.tenant_column,
        &config.conflict.node_id,
    )
    .await?;
    tracing::debug!(tables = tracked, node_id = %config.conflict.node_id, "version tracking installed on the target");
    let resume = recorded.as_ref().map(|p| (p.commit_lsn, p.end_lsn));
    let opened = open_feed(
        config,
        hub,
        resume,
        &system_id,
        report.slot_confirmed,
        &app,
        tel,
    )
    .await?;
    let resume_after = recorded.as_ref().map(|p| p.commit_lsn).unwrap_or(Lsn::ZERO);
    match opened.start_lsn {
        Some(start_lsn) => tracing::info!(
            tenant = %t.tenant_id, slot = %t.slot, publication = %t.publication,
            tables = report.tables.len(), %resume_after, %start_lsn,
            "replication_start: streaming"
        ),
        None => tracing::info!(
            tenant = %t.tenant_id, slot = %t.slot, publication = %t.publication,
            tables = report.tables.len(), shared_with = t.shared_with.len(), %resume_after,
            "replication_start: streaming from the shared slot"
        ),
    }
    let Opened {
        feed,
        capture,
        file,
        acked,
        ..
    } = opened;
    tel.set_state(State::Running);

    let identity = ApplyIdentity {
        tenant: t.tenant_id.clone(),
        tenant_column: t.tenant_column.clone(),
        slot: t.slot.clone(),
        source_system_id: system_id.clone(),
        conflict: config.conflict.clone(),
        lane: None,
    };
    let applier = Applier::new(
        target,
        crate::apply::schema::SourceCatalog::Live(source),
        t.schema_changes,
        identity.clone(),
        config.batch.batch_size,
    )
    .await?;
    let streams = Streams::new(lane_opener(
        Arc::new(config.clone()),
        identity,
        LaneCatalog::Source,
    ));
    let policy = CommitPolicy::Size {
        batch_size: config.batch.batch_size as u64,
        timeout: config.batch.batch_timeout,
    };
    let seen = recorded.as_ref().map(|p| p.end_lsn).unwrap_or(Lsn::ZERO);
    let mut driver = Driver::new(
        applier,
        streams,
        policy,
        tel.clone(),
        seen,
        acked.position(),
    )
    .paced(config.batch.max_events_per_sec)
    .commit_asynchronously()
    .await?;
    if let Some(p) = &recorded {
        driver.set_converge_until(p.converge_until);
    }

    let mut queue = CaptureQueue {
        config,
        tables: report.tables.clone(),
        rx: feed,
        acked,
        checkpoint: CheckpointWriter::new(
            file,
            system_id,
            config.batch.checkpoint_interval,
            tel.clone(),
        ),
        tel: tel.clone(),
    };
    match driver.run(&mut queue, &mut shutdown).await {
        Ok(()) => {
            // Shutdown: keep what ends on a source commit, drop the rest
            // (streamed transactions are sent again from their start).
            let finish = driver.finish(&mut queue).await;
            let acknowledged = queue.acked.position();
            queue
                .checkpoint
                .write_now(&t.tenant_id, &t.slot, acknowledged)
                .await;
            if let Some((capture, final_tx)) = capture {
                let _ = final_tx.send(acknowledged);
                let _ = tokio::time::timeout(Duration::from_secs(6), capture).await;
            }
            tracing::info!(tenant = %t.tenant_id, %acknowledged, "replication_stop: stopped");
            finish
        }
        Err(e) => {
            driver.abandon().await;
            let Some((capture, final_tx)) = capture else {
                return Err(e);
            };
            drop(final_tx);
            // A capture error explains an apply-side "queue closed".
            match tokio::time::timeout(Duration::from_secs(6), capture).await {
                Ok(Ok(Err(capture_err))) => Err(capture_err),
                _ => Err(e),
            }
        }
    }
}

/// A tenant's queue from its shared slot's hub.
pub fn queue_spec(config: &Config, tel: &TenantTelemetry) -> QueueSpec {
    QueueSpec {
        buffer_events: config.batch.buffer_events,
        spool: spool_dir(config),
        spool_max_bytes: config.batch.spool_max_bytes,
        status: tel.spool.clone(),
    }
}

/// Where a session's changes come from, resumed after the target's
/// progress (`resume`: its commit and end positions).
pub(super) struct Opened {
    pub(super) feed: Feed,
    /// Its own slot's capture task, and where its last acknowledgement goes.
    pub(super) capture: Option<(tokio::task::JoinHandle<Result<()>>, oneshot::Sender<Lsn>)>,
    pub(super) file: CheckpointFile,
    pub(super) acked: Acknowledger,
    /// Where its own slot's stream starts (`None`: the hub's stream).
    pub(super) start_lsn: Option<Lsn>,
}

/// Open the tenant's feed: a stream of its own slot read by a capture task,
/// or, when the slot is shared, the hub's queue for it (the slot read once
/// for every tenant sharing it).
pub(super) async fn open_feed(
    config: &Config,
    hub: Option<&HubHandle>,
    resume: Option<(Lsn, Lsn)>,
    system_id: &str,
    slot_confirmed: Lsn,
    app: &str,
    tel: &Arc<TenantTelemetry>,
) -> Result<Opened> {
    let t = &config.tenant;
    let Some(hub) = hub else {
        let opened = open_stream(config, resume, system_id, slot_confirmed, app).await?;
        let (tx, rx) = mpsc::channel(config.batch.buffer_events);
        let (ack_tx, ack_rx) = watch::channel(opened.ack_lsn);
        let (final_tx, final_rx) = oneshot::channel();
        let assembler = Assembler::new(
            resume.map(|(commit, _)| commit).unwrap_or(Lsn::ZERO),
            &t.tenant_id,
        );
        let task = tokio::spawn(capture_loop(opened.stream, assembler, tx, ack_rx, final_rx));
        let acked = Acknowledger::new(
            Box::new(move |lsn| {
                let _ = ack_tx.send(lsn);
            }),
            opened.ack_lsn,
        );
        return Ok(Opened {
            feed: Feed::Own(rx),
            capture: Some((task, final_tx)),
            file: opened.file,
            acked,
            start_lsn: Some(opened.start_lsn),
        });
    };
    let file = checkpoint_file(config, resume, system_id)?;
    let resume = match resume {
        Some((commit_lsn, end_lsn)) => Resume {
            commit_lsn,
            end_lsn,
        },
        None => Resume {
            commit_lsn: Lsn::ZERO,
            end_lsn: t.start_lsn,
        },
    };
    let (feed, ack) = hub
        .attach(&t.tenant_id, resume, system_id, queue_spec(config, tel))
        .await?;
    let acked = Acknowledger::new(Box::new(move |lsn| ack.advance(lsn)), resume.end_lsn);
    Ok(Opened {
        feed: Feed::Hub(feed),
        capture: None,
        file,
        acked,
        start_lsn: None,
    })
}

/// Where a tenant sharing a slot spools what it has not applied yet:
/// `<checkpoint_dir>/<tenant>.spool/` (a plain file of that name, left by
/// a version whose spool was not durable, is removed).
pub(super) fn spool_dir(config: &Config) -> std::path::PathBuf {
    let t = &config.tenant;
    let dir = t.checkpoint_dir.join(format!("{}.spool", t.tenant_id));
    if std::fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
        let _ = std::fs::remove_file(&dir);
    }
    dir
}

/// The replication stream of a session and its checkpoint file.
pub(super) struct OpenedStream {
    pub stream: PgwireSource,
    pub file: CheckpointFile,
    /// What the slot may be acknowledged up to before anything is applied.
    pub ack_lsn: Lsn,
    /// Where streaming starts (for the log).
    pub start_lsn: Lsn,
}

/// Start streaming after `resume` (the target's last applied commit and its
/// end), or from `[cdc] start_lsn` / the slot when there is none; check the
/// stream reaches the same source and look at the checkpoint file.
async fn open_stream(
    config: &Config,
    resume: Option<(Lsn, Lsn)>,
    system_id: &str,
    slot_confirmed: Lsn,
    app: &str,
) -> Result<OpenedStream> {
    let t = &config.tenant;
    let (start_lsn, ack_lsn) = match resume {
        Some((_, end)) => (end, end),
        None => (t.start_lsn, Lsn::ZERO),
    };
    let spec = StreamSpec {
        slot: t.slot.clone(),
        publication: t.publication.clone(),
        start_lsn,
        ack_lsn,
        buffer_events: config.batch.buffer_events,
        application_name: app.to_string(),
    };
    let mut stream = PgwireSource::start(t.source()?, &spec).await?;
    if stream.system_id != system_id {
        stream.close().await;
        return Err(ReplicationError::Internal(format!(
            "the replication connection reached source system {}, the SQL connection {system_id}",
            stream.system_id
        )));
    }
    let file = match checkpoint_file(config, resume, system_id) {
        Ok(f) => f,
        Err(e) => {
            stream.close().await;
            return Err(e);
        }
    };
    Ok(OpenedStream {
        stream,
        file,
        ack_lsn,
        start_lsn: if start_lsn.is_zero() {
            slot_confirmed
        } else {
            start_lsn
        },
    })
}

/// The tenant's checkpoint file, looked at: one of another source or slot,
/// or ahead of the target's progress, is named in the log (the target's
/// progress is the truth).
fn checkpoint_file(
    config: &Config,
    resume: Option<(Lsn, Lsn)>,
    system_id: &str,
) -> Result<CheckpointFile> {
    let t = &config.tenant;
    let file = CheckpointFile::new(&t.checkpoint_dir, &t.tenant_id);
    match file.inspect(&t.tenant_id, system_id, &t.slot)? {
        FileState::Foreign { reason } => tracing::warn!(
            path = %file.path().display(), %reason,
            "ignoring a checkpoint file that belongs to another source or slot; it will be overwritten"
        ),
        FileState::Valid(rec) if resume.is_none_or(|(_, end)| Lsn(rec.lsn) > end) => {
            tracing::warn!(
                path = %file.path().display(), file_lsn = %Lsn(rec.lsn),
                "the checkpoint file is ahead of the target's progress (was the target restored?); the target's progress is the truth"
            )
        }
        _ => {}
    }
    Ok(file)
}

/// Reads the stream into the queue; acknowledges what apply committed.
async fn capture_loop(
    mut source: PgwireSource,
    mut assembler: Assembler,
    tx: mpsc::Sender<TxEvent>,
    mut ack: watch::Receiver<Lsn>,
    mut final_ack: oneshot::Receiver<Lsn>,
) -> Result<()> {
    let result = loop {
        let item = if let Some(held) = assembler.take_held() {
            held
        } else {
            let next = tokio::select! {
                biased;
                f = &mut final_ack => {
                    if let Ok(lsn) = f {
                        source.acknowledge(lsn);
                    }
                    break Ok(());
                }
                changed = ack.changed() => {
                    if changed.is_ok() {
                        source.acknowledge(*ack.borrow_and_update());
                    }
                    continue;
                }
                ev = source.recv() => ev,
            };
            let event = match next {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    break Err(ReplicationError::Stream {
                        message: "the source ended the replication stream".into(),
                        class: crate::error::ErrorClass::Retry,
                    })
                }
                Err(e) => break Err(e),
            };
            match assembler.push(event) {
                Ok(Some(item)) => item,
                Ok(None) => continue,
                Err(e) => break Err(e),
            }
        };
        if let TxEvent::Commit { commit_time_us, .. }
        | TxEvent::StreamCommit { commit_time_us, .. } = &item
        {
            source.pace_reads(super::is_backlog(*commit_time_us));
        }
        // While the queue is full, keep acknowledging (back-pressure must not
        // hold the slot back) and keep listening for the end.
        let mut send = pin!(tx.send(item));
        let stop = loop {
            tokio::select! {
                biased;
                f = &mut final_ack => {
                    if let Ok(lsn) = f {
                        source.acknowledge(lsn);
                    }
                    break true;
                }
                changed = ack.changed() => {
                    if changed.is_ok() {
                        source.acknowledge(*ack.borrow_and_update());
                    }
                }
                sent = &mut send => break sent.is_err(),
            }
        };
        if stop {
            break Ok(());
        }
    };
    source.close().await;
    result
}

pub(super) use crate::shutdown::stopped;

/// What apply has let the slot release: only ever moves forward, and is
/// sent to the capture task (which tells the walsender).
pub(super) struct Acknowledger {
    position: Lsn,
    send: Box<dyn Fn(Lsn) + Send>,
}

impl Acknowledger {
    /// `send` tells the capture side (the tenant's capture task, or the
    /// hub of a shared slot).
    pub(super) fn new(send: Box<dyn Fn(Lsn) + Send>, start: Lsn) -> Self {
        Self {
            position: start,
            send,
        }
    }

    pub(super) fn advance(&mut self, lsn: Lsn) {
        if lsn > self.position {
            self.position = lsn;
            (self.send)(lsn);
        }
    }

    pub(super) fn position(&self) -> Lsn {
        self.position
    }
}

pub(super) struct CheckpointWriter {
    tel: Arc<TenantTelemetry>,
    file: CheckpointFile,
    system_id: String,
    interval: u64,
    events_at_last: u64,
    written: Option<Lsn>,
}

impl CheckpointWriter {
    pub(super) fn new(
        file: CheckpointFile,
        system_id: String,
        interval: u64,
        tel: Arc<TenantTelemetry>,
    ) -> Self {
        Self {
            tel,
            file,
            system_id,
            interval,
            events_at_last: 0,
            written: None,
        }
    }

    /// Write when `interval` events have been committed since the last write.
    pub(super) async fn after_commit(&mut self, tenant: &str, slot: &str, events: u64, lsn: Lsn) {
        if events.saturating_sub(self.events_at_last) >= self.interval {
            self.events_at_last = events;
            self.write_now(tenant, slot, lsn).await;
        }
    }

    pub(super) async fn write_now(&mut self, tenant: &str, slot: &str, lsn: Lsn) {
        if lsn.is_zero() || self.written == Some(lsn) {
            return;
        }
        let (file, tenant_s, sys, slot_s) = (
            self.file.clone(),
            tenant.to_string(),
            self.system_id.clone(),
            slot.to_string(),
        );
        let result =
            tokio::task::spawn_blocking(move || file.write(&tenant_s, lsn, &sys, &slot_s)).await;
        match result {
            Ok(Ok(())) => {
                self.written = Some(lsn);
                self.tel.checkpoint_written(lsn);
                tracing::debug!(%lsn, "checkpoint_created");
            }
            Ok(Err(e)) => {
                self.tel.checkpoint_failed();
                tracing::error!(error = %e, "checkpoint file not written (replication goes on: the target holds the progress)")
            }
            Err(e) => {
                self.tel.checkpoint_failed();
                tracing::error!(error = %e, "checkpoint writer failed")
            }
        }
    }
}

/// Where a tenant's transactions come from in one process.
pub(super) enum Feed {
    /// Its own slot's capture task.
    Own(mpsc::Receiver<TxEvent>),
    /// The hub of a slot shared with other tenants.
    Hub(HubFeed),
}

impl Feed {
    /// The next event (`None`: the capture task or hub ended).
    pub(super) async fn recv(&mut self) -> Result<Option<TxEvent>> {
        match self {
            Feed::Own(rx) => Ok(rx.recv().await),
            Feed::Hub(feed) => feed.recv().await,
        }
    }

    pub(super) fn len(&self) -> usize {
        match self {
            Feed::Own(rx) => rx.len(),
            Feed::Hub(feed) => feed.len(),
        }
    }
}

/// The capture queue of one process as the driver's source: the slot is
/// acknowledged (and the checkpoint file written) as the target commits;
/// between transactions, requested resyncs run and the target's table
/// definitions are checked.
struct CaptureQueue<'a> {
    config: &'a Config,
    tel: Arc<TenantTelemetry>,
    tables: Vec<SourceTable>,
    rx: Feed,
    acked: Acknowledger,
    checkpoint: CheckpointWriter,
}

impl Source for CaptureQueue<'_> {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        let next = self.rx.recv().await?;
        match next {
            Some(event) => Ok(Some(Delivery::Event(event))),
            // The capture task ended (its error, if any, is reported).
            None => Err(closed("the capture queue")),
        }
    }

    fn queued(&self) -> usize {
        self.rx.len()
    }

    async fn committed(&mut self, end_lsn: Lsn, events: u64) {
        self.acked.advance(end_lsn);
        let t = &self.config.tenant;
        self.checkpoint
            .after_commit(&t.tenant_id, &t.slot, events, end_lsn)
            .await;
    }

    /// Perform resync requests (`resync` command); without one, check the
    /// target's table definitions (a table changed outside replication
    /// stops the tenant within seconds, not at the next restart).
    async fn between_transactions(&mut self, driver: &mut Driver) -> Result<()> {
        // Not while a streamed transaction is half applied.
        if !driver.streams.is_empty() {
            return Ok(());
        }
        let tenant = &self.config.tenant.tenant_id;
        let pending = snapshot::pending_resyncs(driver.applier.client(), tenant).await?;
        if pending.is_empty() {
            return driver.applier.check_definitions().await;
        }
        driver.commit(self).await?;
        self.tel.set_state(State::Snapshotting);
        tracing::info!(%tenant, state = "snapshotting", "resync requested: copying again while the stream waits");
        let (_, converge_until) = snapshot::resync_tables(
            &CopyConfig::of(self.config),
            driver.applier.client_mut(),
            &self.tables,
            &pending,
        )
        .await?;
        driver.set_converge_until(converge_until);
        tracing::info!(%tenant, state = "streaming", "resync done");
        self.tel.set_state(State::Running);
        Ok(())
    }
}
