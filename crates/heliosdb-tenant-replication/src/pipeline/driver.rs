//! The apply driver: one tenant's transactions, from any source, onto the
//! target.
//!
//! A [`Source`] hands over [`Delivery`]s: single events read in this process
//! (the capture queue of one process), or batches (a capture node's HTTPS
//! request; next, a message of a log between regions). The [`Driver`]
//! applies them with the [`Applier`] and the lanes of streamed
//! transactions, commits the target transaction where its [`CommitPolicy`]
//! says, records idle positions, and reports every target commit in one
//! place: metrics first, then [`Source::committed`], which lets the source
//! release what it holds (the slot, a batch's answer, a message). Adding a
//! source is implementing [`Source`]; the loop, the dispatch over
//! [`TxEvent`], acknowledgement and progress logging are here only.
//!
//! ```text
//!  Source::next ─► Delivery ─► Driver::deliver ─► Applier / Streams ─► target
//!       ▲                            │ commit (policy)
//!       └── committed(end_lsn) ◄─────┴─► telemetry
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::apply::schema::{SourceCatalog, SourceColumn};
use crate::apply::streams::Streams;
use crate::apply::{Applier, CommitPoint, Committed};
use crate::capture::TxEvent;
use crate::checkpoint::progress::{self, BatchMark};
use crate::error::{ReplicationError, Result};
use crate::lsn::Lsn;
use crate::shutdown::{stopped, Shutdown};
use crate::telemetry::TenantTelemetry;

/// How often, between source transactions, the driver looks after what is
/// not an event ([`Source::between_transactions`], a waiting idle position).
const TICK: Duration = Duration::from_secs(2);

/// How often a progress line is logged while events flow.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Where the target transaction commits.
#[derive(Debug, Clone, Copy)]
pub enum CommitPolicy {
    /// One process: after a source commit once the transaction holds
    /// `batch_size` events or is `timeout` old, or when the source has
    /// nothing more queued (except while a backlog is read: then full or
    /// late only). Idle positions are recorded at most once per
    /// [`progress::IDLE_RECORD_EVERY`].
    Size { batch_size: u64, timeout: Duration },
    /// Batches: where each batch ends between source transactions, with the
    /// batch's mark in the same transaction; never in between (the sender
    /// waits for the answer, so the batch size is the sender's choice).
    /// Idle positions are recorded as they arrive (the sender paces them).
    AtBatchEnd,
}

/// A batch of events that arrived together (decoded from the wire codec).
pub struct Batch {
    pub events: Vec<TxEvent>,
    /// Recorded with every commit the batch makes (a replayed batch is then
    /// refused even when only part of it committed).
    pub mark: Option<BatchMark>,
    /// Source definitions of the relations the batch describes.
    pub source_columns: Vec<(u32, Vec<SourceColumn>)>,
    /// Bytes it took on the wire (counted with its last commit).
    pub wire_bytes: u64,
}

/// What a source hands the driver.
pub enum Delivery {
    /// One event of a stream read in this process.
    Event(TxEvent),
    /// A batch, answered (by [`Source::delivered`]) once it is applied.
    Batch(Batch),
}

/// Where a tenant's transactions come from, and who learns what committed.
pub trait Source: Send {
    /// The next delivery; `None` when the source ended normally (an error
    /// when it ended where it must not).
    fn next(&mut self) -> impl Future<Output = Result<Option<Delivery>>> + Send;

    /// Deliveries waiting (the in-flight gauge; one process commits when
    /// none wait).
    fn queued(&self) -> usize;

    /// The target committed everything up to `end_lsn` (in order;
    /// `events`: committed so far in this driver): release what the source
    /// holds up to there.
    fn committed(&mut self, end_lsn: Lsn, events: u64) -> impl Future<Output = ()> + Send;

    /// The delivery in hand was applied; `last_end`: the end of its last
    /// target commit, if it made one.
    fn delivered(&mut self, last_end: Option<Lsn>) {
        let _ = last_end;
    }

    /// Applying failed with `e`; the driver stops after this.
    fn failed(&mut self, e: &ReplicationError) {
        let _ = e;
    }

    /// Called about every two seconds between source transactions (resync
    /// requests, checks of the target's definitions).
    fn between_transactions(
        &mut self,
        driver: &mut Driver,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = driver;
        async { Ok(()) }
    }
}

/// Applies a tenant's deliveries and reports what committed.
pub struct Driver {
    pub(super) applier: Applier,
    /// Streamed transactions in progress, each in its own target transaction.
    pub(super) streams: Streams,
    policy: CommitPolicy,
    tel: Arc<TenantTelemetry>,
    /// The latest source position seen (a commit's end or a keepalive).
    seen: Lsn,
    /// Inside a source transaction (between its Begin and Commit).
    in_source_txn: bool,
    /// What the source was told is committed.
    acknowledged: Lsn,
    /// A keepalive's position waiting to be recorded ([`CommitPolicy::Size`]).
    idle: progress::IdlePosition,
    /// The mark of the batch in hand.
    mark: Option<BatchMark>,
    /// Target commits not reported yet (a batch reports at its end).
    unreported: Vec<(CommitPoint, Committed)>,
    /// Wire bytes of batches whose commits are not reported yet.
    wire_unreported: u64,
    last_tick: Instant,
    last_log: Instant,
    events_at_log: u64,
    last_commit_time_us: Option<i64>,
    /// `[performance] max_throughput_events_per_sec`.
    pace: Option<Pace>,
    /// Commits not known flushed on the target (asynchronous commits).
    unflushed: Option<Unflushed>,
    last_flush_poll: Instant,
}

/// How often the target's flushed WAL position is read while commits wait
/// for it and nothing else commits.
const FLUSH_POLL: Duration = Duration::from_millis(50);

/// Target commits made with `synchronous_commit = off`, not yet known to
/// be flushed: the source hears of a commit only once the target's WAL is
/// flushed past it, so a target crash never loses what the source let go.
#[derive(Debug, Default)]
struct Unflushed {
    /// Committed since the target's insert position was last read.
    untagged: Vec<Lsn>,
    /// (target insert position read after the commit, source end LSN).
    tagged: std::collections::VecDeque<(Lsn, Lsn)>,
    flushed: Lsn,
}

impl Unflushed {
    /// The target's positions read after every commit in `untagged`.
    fn learned(&mut self, (insert, flush): (Lsn, Lsn)) {
        for end in self.untagged.drain(..) {
            self.tagged.push_back((insert, end));
        }
        self.flushed = self.flushed.max(flush);
    }

    /// The end of the last commit now flushed, if one was not before.
    fn release(&mut self) -> Option<Lsn> {
        let mut released = None;
        while let Some(&(at, end)) = self.tagged.front() {
            if at > self.flushed {
                break;
            }
            released = Some(end);
            self.tagged.pop_front();
        }
        released
    }

    fn is_empty(&self) -> bool {
        self.untagged.is_empty() && self.tagged.is_empty()
    }
}

/// At most `rate` row changes a second: a token bucket holding one
/// second's worth, so a burst after a quiet spell is not delayed.
struct Pace {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Pace {
    fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        Self {
            rate,
            tokens: rate,
            at: Instant::now(),
        }
    }

    /// Wait until one more change may be applied.
    async fn take(&mut self) {
        let now = Instant::now();
        let earned = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.rate);
        self.at = now;
        if self.tokens < 1.0 {
            let wait = (1.0 - self.tokens) / self.rate;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            self.tokens = 1.0;
            self.at = Instant::now();
        }
        self.tokens -= 1.0;
    }
}

impl Driver {
    /// `seen`/`acknowledged`: where the target's progress stands and what
    /// the source may already release.
    pub fn new(
        applier: Applier,
        streams: Streams,
        policy: CommitPolicy,
        tel: Arc<TenantTelemetry>,
        seen: Lsn,
        acknowledged: Lsn,
    ) -> Self {
        Self {
            applier,
            streams,
            policy,
            tel,
            seen,
            in_source_txn: false,
            acknowledged,
            idle: progress::IdlePosition::default(),
            mark: None,
            unreported: Vec::new(),
            wire_unreported: 0,
            last_tick: Instant::now(),
            last_log: Instant::now(),
            events_at_log: 0,
            last_commit_time_us: None,
            pace: None,
            unflushed: None,
            last_flush_poll: Instant::now(),
        }
    }

    /// Commit on the target without waiting for its WAL flush, and tell
    /// the source about commits once flushed (one process: the source
    /// then re-sends what a target crash lost). An apply node commits
    /// synchronously: its answer to the capture node is the release.
    pub async fn commit_asynchronously(mut self) -> Result<Self> {
        self.applier.commit_asynchronously().await?;
        self.unflushed = Some(Unflushed::default());
        Ok(self)
    }

    /// A target commit: reported with the next [`Self::report`], told to
    /// the source once flushed.
    fn committed_point(&mut self, point: CommitPoint, committed: Committed) {
        if let Some(u) = &mut self.unflushed {
            u.untagged.push(point.end_lsn);
        }
        self.unreported.push((point, committed));
    }

    /// Commits wait for the target's flush, and nothing else will read it.
    fn waiting_for_flush(&self) -> bool {
        self.unflushed.as_ref().is_some_and(|u| !u.is_empty()) && !self.applier.is_open()
    }

    /// Read where the target's WAL stands now (between transactions).
    async fn poll_flush<S: Source>(&mut self, source: &mut S) -> Result<()> {
        self.last_flush_poll = Instant::now();
        let wal = self.applier.target_wal().await?;
        if let Some(u) = &mut self.unflushed {
            u.learned(wal);
        }
        self.report(source).await;
        Ok(())
    }

    /// Apply at most `rate` row changes a second (none: as fast as the
    /// target takes them). The source waits meanwhile (back-pressure).
    pub fn paced(mut self, rate: Option<u64>) -> Self {
        self.pace = rate.map(Pace::new);
        self
    }

    async fn take_pace(&mut self) {
        if let Some(p) = &mut self.pace {
            p.take().await;
        }
    }

    /// Apply what `source` delivers until shutdown or the source ends
    /// (`Ok`), or an error (the source is told first). Nothing is rolled
    /// back here: [`Driver::finish`] or [`Driver::abandon`] decides.
    pub async fn run<S: Source>(&mut self, source: &mut S, shutdown: &mut Shutdown) -> Result<()> {
        let result = self.run_until_stopped(source, shutdown).await;
        if let Err(e) = &result {
            source.failed(e);
        }
        result
    }

    async fn run_until_stopped<S: Source>(
        &mut self,
        source: &mut S,
        shutdown: &mut Shutdown,
    ) -> Result<()> {
        enum Step {
            Stop,
            Deadline,
            Tick,
            Flush,
            Delivery(Result<Option<Delivery>>),
        }
        loop {
            let deadline = self.commit_deadline();
            let tick = tokio::time::Instant::from_std(self.last_tick + TICK);
            let flush = self.waiting_for_flush();
            // A deadline, not a sleep made afresh each round: deliveries
            // (keepalives) coming more often must not starve it.
            let poll_at = tokio::time::Instant::from_std(self.last_flush_poll + FLUSH_POLL);
            let step = tokio::select! {
                biased;
                _ = stopped(shutdown) => Step::Stop,
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => Step::Deadline,
                d = source.next() => Step::Delivery(d),
                _ = tokio::time::sleep_until(poll_at), if flush => Step::Flush,
                _ = tokio::time::sleep_until(tick), if !self.in_source_txn => Step::Tick,
            };
            match step {
                Step::Stop => return Ok(()),
                Step::Flush => self.poll_flush(source).await?,
                Step::Deadline => {
                    self.commit_main().await?;
                    self.report(source).await;
                }
                Step::Tick => self.tick(source).await?,
                Step::Delivery(d) => {
                    let Some(delivery) = d? else {
                        return Ok(());
                    };
                    self.deliver(delivery, source).await?;
                    self.tel
                        .m
                        .in_flight
                        .set((source.queued() as u64 + self.applier.pending_events()) as i64);
                    self.log_progress();
                    if !self.in_source_txn && self.last_tick.elapsed() >= TICK {
                        self.tick(source).await?;
                    }
                }
            }
        }
    }

    /// When the open target transaction must commit without another event
    /// ([`CommitPolicy::Size`]: `timeout` after it opened).
    fn commit_deadline(&self) -> Option<tokio::time::Instant> {
        let CommitPolicy::Size { timeout, .. } = self.policy else {
            return None;
        };
        self.applier
            .opened_at()
            .filter(|_| self.applier.has_pending_commit() && !self.in_source_txn)
            .map(|at| tokio::time::Instant::from_std(at + timeout))
    }

    /// Apply one delivery, then report its commits.
    async fn deliver<S: Source>(&mut self, delivery: Delivery, source: &mut S) -> Result<()> {
        match delivery {
            Delivery::Event(event) => {
                self.handle(event, source.queued()).await?;
                self.report(source).await;
            }
            Delivery::Batch(batch) => {
                if !batch.source_columns.is_empty() {
                    self.streams.ship(&batch.source_columns);
                    if let SourceCatalog::Shipped(map) = self.applier.source_catalog_mut() {
                        map.extend(batch.source_columns);
                    }
                }
                self.mark = batch.mark;
                self.wire_unreported += batch.wire_bytes;
                let queued = source.queued();
                for event in batch.events {
                    self.handle(event, queued).await?;
                }
                // The batch ends: commit there, or let the transaction that
                // goes on carry the mark (its commit records it).
                if !self.in_source_txn {
                    self.commit_main().await?;
                } else if let Some(m) = &self.mark {
                    self.applier.mark_batch(m.clone());
                }
                let last_end = self.unreported.last().map(|(p, _)| p.end_lsn);
                self.report(source).await;
                source.delivered(last_end);
            }
        }
        Ok(())
    }

    /// Dispatch one event (`queued`: deliveries waiting behind it).
    async fn handle(&mut self, event: TxEvent, queued: usize) -> Result<()> {
        match event {
            TxEvent::Begin {
                final_lsn,
                commit_time_us,
                ..
            } => {
                if let CommitPolicy::Size { timeout, .. } = self.policy {
                    if self.applier.has_pending_commit()
                        && self
                            .applier
                            .opened_at()
                            .is_some_and(|t| t.elapsed() >= timeout)
                    {
                        self.commit_main().await?;
                    }
                }
                self.in_source_txn = true;
                self.tel.behind();
                self.applier.begin(final_lsn, commit_time_us).await?;
            }
            TxEvent::Row(change) => {
                self.take_pace().await;
                self.applier.row(change).await?
            }
            TxEvent::Version(note) => self.applier.version(&note),
            TxEvent::Truncate { relations, .. } => {
                self.take_pace().await;
                self.applier.truncate(&relations).await?
            }
            TxEvent::Commit {
                commit_lsn,
                end_lsn,
                commit_time_us,
            } => {
                self.in_source_txn = false;
                self.seen = self.seen.max(end_lsn);
                self.last_commit_time_us = Some(commit_time_us);
                self.applier.source_commit(CommitPoint {
                    commit_lsn,
                    end_lsn,
                    commit_time_us,
                });
                if let CommitPolicy::Size {
                    batch_size,
                    timeout,
                } = self.policy
                {
                    let full = self.applier.pending_events() >= batch_size;
                    let late = self
                        .applier
                        .opened_at()
                        .is_some_and(|t| t.elapsed() >= timeout);
                    // Nothing more queued: commit now rather than wait,
                    // unless a backlog is being read (the queue then runs
                    // empty whenever the walsender is the slower side; the
                    // transaction stays open until full or late).
                    if full || late || (queued == 0 && !super::is_backlog(commit_time_us)) {
                        self.commit_main().await?;
                    }
                }
            }
            TxEvent::Streamed { top, xid, event } => {
                // The main transaction may hold locks the lane would wait for.
                self.commit_main().await?;
                self.tel.behind();
                self.take_pace().await;
                self.streams
                    .apply(&mut self.applier, top, xid, *event, self.seen)
                    .await?;
            }
            TxEvent::StreamCommit {
                top,
                commit_lsn,
                end_lsn,
                commit_time_us,
            } => {
                // Commit order: what committed before it on the source first.
                self.commit_main().await?;
                self.seen = self.seen.max(end_lsn);
                self.last_commit_time_us = Some(commit_time_us);
                let point = CommitPoint {
                    commit_lsn,
                    end_lsn,
                    commit_time_us,
                };
                if let Some((point, committed)) =
                    self.streams.commit(top, point, self.mark.clone()).await?
                {
                    self.committed_point(point, committed);
                }
            }
            TxEvent::StreamAbort { top, xid } => self.streams.abort(top, xid).await?,
            TxEvent::Keepalive { wal_end } => {
                // Every transaction that committed before `wal_end` is
                // committed on the target (or was another tenant's): the
                // source may release it, once the target has recorded it. A
                // streamed transaction still open is sent again from its
                // start after a reconnect (the slot keeps restart_lsn before
                // it), so an open lane does not hold this.
                self.commit_main().await?;
                self.seen = self.seen.max(wal_end);
                self.idle.seen(wal_end);
                self.record_idle().await?;
                self.tel.caught_up();
            }
        }
        Ok(())
    }

    /// Commit the main target transaction if one is open (between source
    /// transactions only), with the batch's mark.
    async fn commit_main(&mut self) -> Result<()> {
        if !self.applier.is_open() {
            return Ok(());
        }
        if self.in_source_txn {
            return Err(ReplicationError::Internal(
                "a commit was asked for inside a source transaction".into(),
            ));
        }
        if let Some(m) = &self.mark {
            self.applier.mark_batch(m.clone());
        }
        if let Some(point) = self.applier.commit().await? {
            let committed = self.applier.take_committed();
            self.committed_point(point, committed);
        }
        if let (Some(u), Some(wal)) = (&mut self.unflushed, self.applier.take_wal()) {
            u.learned(wal);
        }
        Ok(())
    }

    /// Commit the open target transaction now if it ends on a source commit
    /// (resync, shutdown), and report it.
    pub async fn commit<S: Source>(&mut self, source: &mut S) -> Result<()> {
        self.commit_main().await?;
        self.report(source).await;
        Ok(())
    }

    /// Record the pending idle position on the target, as a commit that
    /// releases the source up to there: [`CommitPolicy::AtBatchEnd`] at
    /// once, with the batch's mark; [`CommitPolicy::Size`] at most once per
    /// [`progress::IDLE_RECORD_EVERY`] (the tick records what waited).
    /// Never inside an open target transaction.
    async fn record_idle(&mut self) -> Result<()> {
        if self.applier.is_open() || self.in_source_txn {
            return Ok(());
        }
        let due = match self.policy {
            CommitPolicy::AtBatchEnd => self.idle.take_now(),
            CommitPolicy::Size { .. } => self.idle.take_due(self.acknowledged),
        };
        let Some(lsn) = due else {
            return Ok(());
        };
        let tenant = self.applier.tenant().to_string();
        progress::record_idle(self.applier.client(), &tenant, lsn, self.mark.as_ref()).await?;
        let point = CommitPoint {
            commit_lsn: lsn,
            end_lsn: lsn,
            commit_time_us: 0,
        };
        self.committed_point(point, Committed::default());
        Ok(())
    }

    /// Metrics for each unreported commit, then the source learns it.
    async fn report<S: Source>(&mut self, source: &mut S) {
        if !self.unreported.is_empty() {
            let last = self.unreported.len() - 1;
            let wire = std::mem::take(&mut self.wire_unreported);
            for (i, (point, committed)) in
                std::mem::take(&mut self.unreported).into_iter().enumerate()
            {
                // A batch's bytes count with its last commit.
                let wire = (i == last && wire > 0).then_some(wire);
                self.tel.committed(&committed, point.end_lsn, wire);
                if self.unflushed.is_none() {
                    self.acknowledged = self.acknowledged.max(point.end_lsn);
                    source
                        .committed(point.end_lsn, self.applier.stats.events)
                        .await;
                }
            }
        }
        if let Some(end) = self.unflushed.as_mut().and_then(Unflushed::release) {
            self.acknowledged = self.acknowledged.max(end);
            source.committed(end, self.applier.stats.events).await;
        }
        if source.queued() == 0 {
            self.tel.caught_up();
        }
    }

    /// Between source transactions: the idle position that waited, then the
    /// source's own work.
    async fn tick<S: Source>(&mut self, source: &mut S) -> Result<()> {
        self.last_tick = Instant::now();
        self.record_idle().await?;
        self.report(source).await;
        source.between_transactions(self).await
    }

    /// A resync replaced rows up to `lsn`: replay converges until there.
    pub fn set_converge_until(&mut self, lsn: Lsn) {
        self.applier.set_converge_until(lsn);
        self.streams.set_converge_until(lsn);
    }

    /// Stop cleanly: open lanes are dropped (streamed transactions are sent
    /// again from their start); the main transaction commits if it ends on
    /// a source commit, else rolls back.
    pub async fn finish<S: Source>(&mut self, source: &mut S) -> Result<()> {
        self.streams.rollback_all().await;
        let result = if self.applier.is_open() && !self.in_source_txn {
            self.commit(source).await
        } else {
            self.applier.rollback().await;
            Ok(())
        };
        // Asynchronous commits: release what the target flushes within a
        // second (the WAL writer flushes every `wal_writer_delay`, 200 ms
        // by default); the rest comes again from the source at the next
        // start, and the target's progress skips it.
        let until = Instant::now() + Duration::from_secs(1);
        while result.is_ok() && self.waiting_for_flush() && Instant::now() < until {
            if self.poll_flush(source).await.is_err() {
                break;
            }
            if self.waiting_for_flush() {
                tokio::time::sleep(FLUSH_POLL).await;
            }
        }
        result
    }

    /// After an error: roll back everything open.
    pub async fn abandon(&mut self) {
        self.applier.rollback().await;
        self.streams.rollback_all().await;
    }

    /// Roll back and let go of the tenant's replication origin now (a
    /// session that replaces this one takes it).
    pub async fn release(&mut self) {
        self.streams.rollback_all().await;
        self.applier.release().await;
    }

    fn log_progress(&mut self) {
        let elapsed = self.last_log.elapsed();
        if elapsed < LOG_EVERY {
            return;
        }
        let s = &self.applier.stats;
        let rate = (s.events - self.events_at_log) as f64 / elapsed.as_secs_f64();
        let lag_ms = self
            .last_commit_time_us
            .map(|us| chrono::Utc::now().timestamp_micros() - (us + crate::clock::PG_EPOCH_US))
            .map(|us| us / 1000);
        tracing::info!(
            events = s.events, transactions = s.transactions, events_per_sec = rate as u64,
            acknowledged = %self.acknowledged, lag_ms, foreign_rows_dropped = s.foreign_rows_dropped,
            "progress"
        );
        self.last_log = Instant::now();
        self.events_at_log = s.events;
    }
}
