//! One decode for every tenant of a shared slot.
//!
//! ```text
//!                                              ┌─► [queue a] ─► tenant a's driver
//! slot ─► PgwireSource ─► Assembler ─► route ──┼─► [queue b] ─► tenant b's driver
//!  ▲      (one walsender)          by tenant   └─► [queue c] ─► tenant c's driver
//!  └── acknowledged: the minimum over every registered tenant's position
//! ```
//!
//! Tenants of one node that name the same slot of one source share it: one
//! publication whose row filter lists them, one walsender, one decode. The
//! hub splits each source transaction by the tenant column into one
//! transaction per tenant that has rows in it; the others learn (at most a
//! few times a second) that the source moved past it, so idle tenants never
//! pin WAL.
//!
//! Progress never skips:
//! * each tenant's applied position stays in its target, committed with its
//!   rows; the slot is acknowledged up to the minimum of every *registered*
//!   tenant's position, and a tenant registered but not attached yet (its
//!   session starting, its target down, its rows being copied) holds the
//!   slot where it was;
//! * each tenant skips the transactions its target has (commit LSN at or
//!   below what it was last given, as [`crate::capture::assemble`] does for
//!   a slot of its own);
//! * a tenant that attaches while the stream runs restarts it from the
//!   slot's position, so it receives every transaction after its own
//!   position, whole (streamed transactions from their start); the others
//!   skip what they were given already.
//!
//! A tenant whose session ends (its target down, a change refused) is
//! detached: the others go on, the slot holds for it until it attaches
//! again. A tenant whose queue stays full spills to its spool
//! ([`super::spool`]) instead of holding the others up, and is paused when
//! that fills.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};

use crate::capture::assemble::Assembler;
use crate::capture::pgoutput::{RelationDesc, Tuple, Value};
use crate::capture::stream::{PgwireSource, StreamSpec};
use crate::capture::{Announced, ChangeSource, RowChange, RowOp, TxEvent};
use crate::config::{Config, ConnInfo};
use crate::error::{ErrorClass, ReplicationError, Result};
use crate::lsn::Lsn;

use super::spool::{Push, TenantQueue};

/// How long a starting hub waits for every registered tenant to attach
/// before it streams for those that have (the others attach later, and
/// restart the stream when they do).
const ATTACH_GRACE: Duration = Duration::from_secs(3);

/// How long the hub waits for room in a tenant's queue before that
/// tenant spills to its spool (a tenant that is merely busy makes room
/// sooner; one whose target is stuck does not).
const SPILL_AFTER: Duration = Duration::from_secs(1);

/// How often tenants without rows in recent transactions learn where the
/// source is (their idle position, recorded on their target).
const IDLE_EVERY: Duration = Duration::from_millis(200);

/// The positions tenants let the slot release, shared with their pipelines.
#[derive(Default)]
struct Holds {
    /// `None`: registered, position not known yet (the slot stays where it is).
    by_tenant: Mutex<HashMap<String, Option<Lsn>>>,
    moved: Notify,
}

impl Holds {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<Lsn>>> {
        self.by_tenant.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the slot may release: the lowest position of every registered
    /// tenant, or nothing while one is unknown.
    fn minimum(&self) -> Option<Lsn> {
        let holds = self.lock();
        let mut min: Option<Lsn> = None;
        for h in holds.values() {
            let h = (*h)?;
            min = Some(min.map_or(h, |m| m.min(h)));
        }
        min
    }
}

/// A tenant's acknowledgements to the hub: its position only moves forward.
#[derive(Clone)]
pub struct HubAck {
    tenant: String,
    holds: Arc<Holds>,
}

impl HubAck {
    pub fn advance(&self, lsn: Lsn) {
        let mut holds = self.holds.lock();
        if let Some(h) = holds.get_mut(&self.tenant) {
            if h.is_none_or(|h| lsn > h) {
                *h = Some(lsn);
                drop(holds);
                self.holds.moved.notify_one();
            }
        }
    }
}

/// Why the hub closed a tenant's feed (its stream failed).
type Reason = Arc<Mutex<Option<(String, ErrorClass)>>>;

/// The transactions routed to one tenant.
pub struct HubFeed {
    rx: mpsc::Receiver<TxEvent>,
    reason: Reason,
}

impl HubFeed {
    pub async fn recv(&mut self) -> Result<Option<TxEvent>> {
        if let Some(event) = self.rx.recv().await {
            return Ok(Some(event));
        }
        let reason = self
            .reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match reason {
            Some((message, class)) => Err(ReplicationError::Stream { message, class }),
            None => Ok(None),
        }
    }

    pub fn len(&self) -> usize {
        self.rx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

/// A tenant's queue: events held in memory, and where (and how much) it
/// spills when it is slower than the stream.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub buffer_events: usize,
    pub spool: std::path::PathBuf,
    pub spool_max_bytes: u64,
}

/// Where a tenant's stream resumes: its target's progress.
#[derive(Debug, Clone, Copy)]
pub struct Resume {
    /// Transactions committed at or below it are the target's already.
    pub commit_lsn: Lsn,
    /// Where the tenant's stream may start (and what its hold is).
    pub end_lsn: Lsn,
}

enum Command {
    Register {
        tenant: String,
        done: oneshot::Sender<()>,
    },
    Attach {
        tenant: String,
        resume: Resume,
        system_id: String,
        queue: QueueSpec,
        done: oneshot::Sender<(HubFeed, HubAck)>,
    },
    Unregister {
        tenant: String,
        done: oneshot::Sender<()>,
    },
    Stop {
        done: oneshot::Sender<()>,
    },
}

/// A running hub; cheap to clone.
#[derive(Clone)]
pub struct HubHandle {
    tx: mpsc::UnboundedSender<Command>,
    /// The slot, for logs.
    pub slot: String,
}

impl HubHandle {
    /// Start a hub for the slot `config` names, with `tenants` registered
    /// (each holds the slot until it attaches).
    pub fn spawn(config: &Config, tenants: &[String]) -> Result<Self> {
        let t = &config.tenant;
        let holds = Arc::new(Holds::default());
        holds
            .lock()
            .extend(tenants.iter().map(|id| (id.clone(), None)));
        let (tx, rx) = mpsc::unbounded_channel();
        let hub = Hub {
            info: t.source()?.clone(),
            spec: StreamSpec {
                slot: t.slot.clone(),
                publication: t.publication.clone(),
                start_lsn: Lsn::ZERO,
                ack_lsn: Lsn::ZERO,
                buffer_events: config.batch.buffer_events,
                application_name: format!("heliosdb-tenant-replication/{}", t.slot),
            },
            column: t.tenant_column.clone(),
            holds,
            routes: HashMap::new(),
            system_id: None,
            acknowledged: Lsn::ZERO,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ReplicationError::Internal(format!("starting the hub's runtime: {e}")))?;
        std::thread::Builder::new()
            .name(format!("hub {}", t.slot))
            .spawn(move || runtime.block_on(hub.run(rx)))
            .map_err(|e| ReplicationError::Internal(format!("starting the hub's thread: {e}")))?;
        Ok(Self {
            tx,
            slot: t.slot.clone(),
        })
    }

    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (done, answer) = oneshot::channel();
        self.tx
            .send(command(done))
            .map_err(|_| super::closed("the shared slot's hub"))?;
        answer
            .await
            .map_err(|_| super::closed("the shared slot's hub"))
    }

    /// A tenant joins: the slot holds for it from now on (call before its
    /// rows are published and copied).
    pub async fn register(&self, tenant: &str) -> Result<()> {
        let tenant = tenant.to_string();
        self.ask(|done| Command::Register { tenant, done }).await
    }

    /// A tenant's session streams from `resume`: its feed and where it
    /// acknowledges.
    pub async fn attach(
        &self,
        tenant: &str,
        resume: Resume,
        system_id: &str,
        queue: QueueSpec,
    ) -> Result<(HubFeed, HubAck)> {
        let (tenant, system_id) = (tenant.to_string(), system_id.to_string());
        self.ask(|done| Command::Attach {
            tenant,
            resume,
            system_id,
            queue,
            done,
        })
        .await
    }

    /// A tenant leaves for good: it no longer holds the slot.
    pub async fn unregister(&self, tenant: &str) -> Result<()> {
        let tenant = tenant.to_string();
        self.ask(|done| Command::Unregister { tenant, done }).await
    }

    /// Send the last acknowledgement and close the stream (after the
    /// tenants' pipelines have ended).
    pub async fn stop(&self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(6),
            self.ask(|done| Command::Stop { done }),
        )
        .await;
    }
}

/// A tenant's route.
struct Route {
    queue: TenantQueue,
    reason: Reason,
    /// The last transaction it was given (or its target has).
    last_commit: Lsn,
    /// Where it has been given everything up to.
    position: Lsn,
    /// It was given the Begin of the open transaction.
    in_txn: bool,
    /// The source moved past transactions without its rows, up to here.
    idle: Option<Lsn>,
}

struct Hub {
    info: ConnInfo,
    spec: StreamSpec,
    column: String,
    holds: Arc<Holds>,
    routes: HashMap<String, Route>,
    system_id: Option<String>,
    acknowledged: Lsn,
}

/// Why streaming stopped.
enum Ended {
    /// A tenant attached: start again from the slot.
    Restart,
    /// Stop asked: acknowledged and closed.
    Stop(oneshot::Sender<()>),
    /// The command channel closed.
    Gone,
    Failed(ReplicationError),
}

impl Hub {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut first = true;
        loop {
            if self.routes.is_empty() {
                match commands.recv().await {
                    Some(Command::Stop { done }) => {
                        let _ = done.send(());
                        return;
                    }
                    Some(c) => {
                        self.command(c);
                    }
                    None => return,
                }
                continue;
            }
            if first {
                // Let the others attach before the stream starts (at the
                // start, and after the stream failed).
                first = false;
                let until = tokio::time::Instant::now() + ATTACH_GRACE;
                while self.routes.len() < self.holds.lock().len() {
                    match tokio::time::timeout_at(until, commands.recv()).await {
                        Ok(Some(Command::Stop { done })) => {
                            let _ = done.send(());
                            return;
                        }
                        Ok(Some(c)) => {
                            self.command(c);
                        }
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
            }
            match self.stream(&mut commands).await {
                Ended::Restart => {}
                Ended::Stop(done) => {
                    let _ = done.send(());
                    return;
                }
                Ended::Gone => return,
                Ended::Failed(e) => {
                    // Its tenants attach again one by one: wait for them
                    // before streaming, as at the start.
                    first = true;
                    tracing::warn!(slot = %self.spec.slot, error = %e, "the shared slot's stream failed; its tenants reconnect");
                    let reason = Some((e.to_string(), e.class()));
                    for (_, route) in self.routes.drain() {
                        *route.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.clone();
                    }
                }
            }
        }
    }

    /// Handle a command; `true` when the stream must start again (a tenant
    /// attached while it ran).
    fn command(&mut self, command: Command) -> bool {
        match command {
            Command::Register { tenant, done } => {
                self.holds.lock().entry(tenant).or_insert(None);
                let _ = done.send(());
                false
            }
            Command::Attach {
                tenant,
                resume,
                system_id,
                queue,
                done,
            } => {
                if self.system_id.is_none() {
                    self.system_id = Some(system_id);
                }
                let (tx, rx) = mpsc::channel(queue.buffer_events.max(16));
                let reason = Reason::default();
                let feed = HubFeed {
                    rx,
                    reason: reason.clone(),
                };
                {
                    let mut holds = self.holds.lock();
                    let h = holds.entry(tenant.clone()).or_insert(None);
                    *h = Some(h.map_or(resume.end_lsn, |h| h.max(resume.end_lsn)));
                }
                self.holds.moved.notify_one();
                let ack = HubAck {
                    tenant: tenant.clone(),
                    holds: self.holds.clone(),
                };
                tracing::info!(%tenant, slot = %self.spec.slot, resume_after = %resume.commit_lsn, "tenant attached to the shared slot");
                self.routes.insert(
                    tenant,
                    Route {
                        queue: TenantQueue::new(tx, queue.spool, queue.spool_max_bytes),
                        reason,
                        last_commit: resume.commit_lsn,
                        position: resume.end_lsn,
                        in_txn: false,
                        idle: None,
                    },
                );
                let _ = done.send((feed, ack));
                true
            }
            Command::Unregister { tenant, done } => {
                self.routes.remove(&tenant);
                self.holds.lock().remove(&tenant);
                self.holds.moved.notify_one();
                let _ = done.send(());
                false
            }
            Command::Stop { done } => {
                let _ = done.send(());
                false
            }
        }
    }

    /// Stream for the attached tenants until a tenant attaches, stop, or an
    /// error.
    async fn stream(&mut self, commands: &mut mpsc::UnboundedReceiver<Command>) -> Ended {
        let start = self
            .routes
            .values()
            .map(|r| r.position)
            .min()
            .unwrap_or(Lsn::ZERO);
        let spec = StreamSpec {
            start_lsn: start,
            ack_lsn: self.acknowledged,
            ..self.spec.clone()
        };
        let mut source = match PgwireSource::start(&self.info, &spec).await {
            Ok(s) => s,
            Err(e) => return Ended::Failed(e),
        };
        if self
            .system_id
            .as_ref()
            .is_some_and(|id| *id != source.system_id)
        {
            source.close().await;
            return Ended::Failed(ReplicationError::Internal(format!(
                "the shared slot's replication connection reached source system {}, the tenants' SQL connections another",
                source.system_id
            )));
        }
        tracing::info!(slot = %self.spec.slot, tenants = self.routes.len(), %start, "shared slot: streaming");
        let mut router = Router {
            column: self.column.clone(),
            assembler: Assembler::for_every_tenant(),
            begin: None,
            final_lsn: Lsn::ZERO,
            streams: HashMap::new(),
        };
        let mut idle_tick = tokio::time::interval(IDLE_EVERY);
        let ended = loop {
            let holds = self.holds.clone();
            // Tenants attach and leave between transactions only: a
            // restart in the middle of one would give its start twice.
            let between = router.begin.is_none();
            let next = tokio::select! {
                biased;
                c = commands.recv(), if between => match c {
                    Some(Command::Stop { done }) => break Ended::Stop(done),
                    Some(c) => {
                        // A tenant attached (restart for it), or the last
                        // one left (wait for one).
                        if self.command(c) || self.routes.is_empty() {
                            break Ended::Restart;
                        }
                        continue;
                    }
                    None => break Ended::Gone,
                },
                _ = holds.moved.notified() => {
                    self.acknowledge(&source);
                    continue;
                }
                _ = idle_tick.tick() => {
                    self.send_idle();
                    continue;
                }
                ev = source.recv() => ev,
            };
            let event = match next {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    break Ended::Failed(ReplicationError::Stream {
                        message: "the source ended the replication stream".into(),
                        class: ErrorClass::Retry,
                    })
                }
                Err(e) => break Ended::Failed(e),
            };
            let mut item = match router.assembler.push(event) {
                Ok(item) => item,
                Err(e) => break Ended::Failed(e),
            };
            while let Some(event) = item {
                if let TxEvent::Commit { commit_time_us, .. }
                | TxEvent::StreamCommit { commit_time_us, .. } = &event
                {
                    source.pace_reads(super::is_backlog(*commit_time_us));
                }
                for (tenant, event) in router.route(event, &mut self.routes) {
                    self.send(&source, &tenant, event).await;
                }
                item = router.assembler.take_held();
            }
            if self.routes.is_empty() {
                break Ended::Restart;
            }
        };
        if matches!(ended, Ended::Restart) {
            // Streamed transactions still open are sent again from their
            // start: their tenants drop what they have of them.
            for (top, tenants) in std::mem::take(&mut router.streams) {
                for tenant in tenants {
                    self.send(&source, &tenant, TxEvent::StreamAbort { top, xid: top })
                        .await;
                }
            }
        }
        self.acknowledge(&source);
        source.close().await;
        ended
    }

    /// Tell the walsender what every registered tenant has let go of.
    fn acknowledge(&mut self, source: &PgwireSource) {
        acknowledge(&self.holds, &mut self.acknowledged, source);
    }

    /// Tenants that had no rows lately learn where the source is.
    fn send_idle(&mut self) {
        for route in self.routes.values_mut() {
            if let Some(wal_end) = route.idle {
                if route.in_txn {
                    continue;
                }
                if route.queue.try_push(TxEvent::Keepalive { wal_end }).is_ok() {
                    route.idle = None;
                }
            }
        }
    }

    /// Give `tenant` one event. A tenant whose queue stays full for
    /// [`SPILL_AFTER`] spills to its spool instead of holding the others
    /// up; one whose spool is full is paused; one whose session ended is
    /// detached. Paused and detached tenants keep holding the slot.
    async fn send(&mut self, source: &PgwireSource, tenant: &str, event: TxEvent) {
        let Hub {
            routes,
            holds,
            acknowledged,
            spec,
            ..
        } = self;
        let Some(route) = routes.get_mut(tenant) else {
            return;
        };
        let outcome = match route.queue.try_push(event) {
            Ok(()) => return,
            Err(Push::Full(event)) => {
                // Room comes soon when the tenant is just busy (a backlog
                // read by every tenant): wait for it, acknowledging meanwhile.
                let deadline = tokio::time::Instant::now() + SPILL_AFTER;
                let mut reserve = std::pin::pin!(route.queue.reserve());
                let room = loop {
                    tokio::select! {
                        biased;
                        _ = holds.moved.notified() => acknowledge(holds, acknowledged, source),
                        permit = &mut reserve => break Some(permit),
                        _ = tokio::time::sleep_until(deadline) => break None,
                    }
                };
                let closed = match room {
                    Some(Some(permit)) => {
                        permit.send(event);
                        return;
                    }
                    Some(None) => true,
                    None => false,
                };
                if closed {
                    Err(Push::Closed)
                } else {
                    tracing::warn!(%tenant, slot = %spec.slot, "tenant slower than the shared stream: its changes go to its spool until it catches up");
                    route.queue.spill(event)
                }
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {}
            Err(Push::Closed) | Err(Push::Full(_)) => {
                tracing::info!(%tenant, slot = %spec.slot, "tenant detached from the shared slot; the slot holds for it");
                routes.remove(tenant);
            }
            Err(Push::SpoolFull(why)) => {
                tracing::warn!(%tenant, slot = %spec.slot, "tenant paused: {why}; the slot holds for it, and it resumes from there");
                if let Some(route) = routes.remove(tenant) {
                    *route.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some((
                        format!("paused: {why} (the tenant fell behind the shared slot; it resumes from the slot)"),
                        ErrorClass::Retry,
                    ));
                }
            }
        }
    }
}

/// Tell the walsender what every registered tenant has let go of.
fn acknowledge(holds: &Holds, acknowledged: &mut Lsn, source: &PgwireSource) {
    if let Some(min) = holds.minimum() {
        if min > *acknowledged {
            *acknowledged = min;
            source.acknowledge(min);
        }
    }
}

/// Splits the source's transactions by tenant.
struct Router {
    column: String,
    assembler: Assembler,
    /// The open transaction's Begin, given to a tenant with its first row.
    begin: Option<TxEvent>,
    final_lsn: Lsn,
    /// Streamed transactions: the tenants given changes of each.
    streams: HashMap<u32, HashSet<String>>,
}

impl Router {
    /// The events `event` makes, with the tenant each goes to.
    fn route(
        &mut self,
        event: TxEvent,
        routes: &mut HashMap<String, Route>,
    ) -> Vec<(String, TxEvent)> {
        let mut out = Vec::new();
        match event {
            TxEvent::Begin { final_lsn, .. } => {
                self.final_lsn = final_lsn;
                self.begin = Some(event);
                for r in routes.values_mut() {
                    r.in_txn = false;
                }
            }
            TxEvent::Commit {
                commit_lsn,
                end_lsn,
                ..
            } => {
                for (tenant, r) in routes.iter_mut() {
                    if std::mem::take(&mut r.in_txn) {
                        r.last_commit = commit_lsn;
                        r.idle = None;
                        out.push((tenant.clone(), event.clone()));
                    } else {
                        r.idle = Some(end_lsn);
                    }
                    r.position = r.position.max(end_lsn);
                }
                self.begin = None;
            }
            TxEvent::Keepalive { wal_end } => {
                for r in routes.values_mut() {
                    r.idle = Some(r.idle.map_or(wal_end, |l| l.max(wal_end)));
                }
            }
            TxEvent::StreamCommit {
                top,
                commit_lsn,
                end_lsn,
                ..
            } => {
                let given = self.streams.remove(&top).unwrap_or_default();
                for (tenant, r) in routes.iter_mut() {
                    if given.contains(tenant) {
                        if commit_lsn <= r.last_commit {
                            // Its target has it (a restarted stream).
                            out.push((tenant.clone(), TxEvent::StreamAbort { top, xid: top }));
                        } else {
                            r.last_commit = commit_lsn;
                            r.idle = None;
                            out.push((tenant.clone(), event.clone()));
                        }
                    } else if !r.in_txn {
                        r.idle = Some(end_lsn);
                    }
                    r.position = r.position.max(end_lsn);
                }
            }
            TxEvent::StreamAbort { top, xid } => {
                let given = if xid == top {
                    self.streams.remove(&top).unwrap_or_default()
                } else {
                    self.streams.get(&top).cloned().unwrap_or_default()
                };
                for tenant in given {
                    if routes.contains_key(&tenant) {
                        out.push((tenant, TxEvent::StreamAbort { top, xid }));
                    }
                }
            }
            TxEvent::Streamed { top, xid, event } => {
                for (tenant, inner) in self.split(*event, routes) {
                    self.streams.entry(top).or_default().insert(tenant.clone());
                    out.push((
                        tenant,
                        TxEvent::Streamed {
                            top,
                            xid,
                            event: Box::new(inner),
                        },
                    ));
                }
            }
            change => {
                for (tenant, change) in self.split(change, routes) {
                    let Some(r) = routes.get_mut(&tenant) else {
                        continue;
                    };
                    if self.final_lsn <= r.last_commit {
                        continue; // its target has this transaction
                    }
                    if !r.in_txn {
                        if let Some(begin) = &self.begin {
                            r.in_txn = true;
                            out.push((tenant.clone(), begin.clone()));
                        }
                    }
                    out.push((tenant, change));
                }
            }
        }
        out
    }

    /// A change (row, truncate, version note) as the tenants it belongs
    /// to see it: a row moved from one tenant to another is a delete for
    /// the one and an insert for the other, as a row filter makes it.
    fn split(&self, change: TxEvent, routes: &HashMap<String, Route>) -> Vec<(String, TxEvent)> {
        let attached = |t: Option<String>| t.filter(|t| routes.contains_key(t));
        match change {
            TxEvent::Row(RowChange { relation, op }) => {
                let at = relation.columns.iter().position(|c| c.name == self.column);
                let tenant_of = |tuple: &Tuple| at.and_then(|i| tenant_value(tuple.get(i)?));
                match op {
                    RowOp::Insert { new } => attached(tenant_of(&new))
                        .map(|t| vec![(t, row(&relation, RowOp::Insert { new }))])
                        .unwrap_or_default(),
                    RowOp::Delete { old } => attached(tenant_of(&old))
                        .map(|t| vec![(t, row(&relation, RowOp::Delete { old }))])
                        .unwrap_or_default(),
                    RowOp::Update { old, new } => {
                        let to = tenant_of(&new);
                        let from = old.as_ref().and_then(tenant_of).or_else(|| to.clone());
                        if from == to {
                            return attached(to)
                                .map(|t| vec![(t, row(&relation, RowOp::Update { old, new }))])
                                .unwrap_or_default();
                        }
                        let mut out = Vec::new();
                        if let (Some(f), Some(old)) = (attached(from), old) {
                            out.push((f, row(&relation, RowOp::Delete { old })));
                        }
                        if let Some(t) = attached(to) {
                            out.push((t, row(&relation, RowOp::Insert { new })));
                        }
                        out
                    }
                }
            }
            TxEvent::Version(note) => Announced::parse(&note)
                .and_then(|a| attached(Some(a.tenant)))
                .map(|t| vec![(t, TxEvent::Version(note))])
                .unwrap_or_default(),
            // Every tenant's rows of the tables go.
            truncate @ TxEvent::Truncate { .. } => routes
                .keys()
                .map(|t| (t.clone(), truncate.clone()))
                .collect(),
            _ => Vec::new(),
        }
    }
}

fn row(relation: &Arc<RelationDesc>, op: RowOp) -> TxEvent {
    TxEvent::Row(RowChange {
        relation: relation.clone(),
        op,
    })
}

/// The tenant a tuple's tenant column names (its text form).
fn tenant_value(value: &Value) -> Option<String> {
    match value {
        Value::Text(b) => std::str::from_utf8(b).ok().map(str::to_string),
        _ => None,
    }
}
