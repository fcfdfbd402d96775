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
use crate::telemetry::SpoolStatus;

use super::spool::{Pause, Push, TenantQueue};

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

/// What one registered tenant lets the slot release.
#[derive(Debug, Default, Clone)]
struct Hold {
    /// What its target committed (`None`: not known yet, the slot stays
    /// where it is).
    applied: Option<Lsn>,
    /// Its spool's segments: (valid from, synced to).
    spans: Vec<(Lsn, Lsn)>,
}

impl Hold {
    fn position(&self) -> Option<Lsn> {
        Some(super::spool::covered(self.applied?, &self.spans))
    }
}

/// The positions tenants let the slot release, shared with their pipelines.
#[derive(Default)]
struct Holds {
    by_tenant: Mutex<HashMap<String, Hold>>,
    moved: Notify,
}

impl Holds {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Hold>> {
        self.by_tenant.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the slot may release: the lowest position of every registered
    /// tenant, or nothing while one is unknown.
    fn minimum(&self) -> Option<Lsn> {
        let holds = self.lock();
        let mut min: Option<Lsn> = None;
        for h in holds.values() {
            let h = h.position()?;
            min = Some(min.map_or(h, |m| m.min(h)));
        }
        min
    }

    fn applied(&self, tenant: &str) -> Option<Lsn> {
        self.lock().get(tenant).and_then(|h| h.applied)
    }

    /// A tenant's spool changed: its spans, and its hold now.
    fn set_spans(&self, tenant: &str, spans: Vec<(Lsn, Lsn)>) -> Option<Lsn> {
        let mut holds = self.lock();
        let h = holds.get_mut(tenant)?;
        if h.spans != spans {
            h.spans = spans;
            drop(holds);
            self.moved.notify_one();
            return self.lock().get(tenant).and_then(Hold::position);
        }
        h.position()
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
            if h.applied.is_none_or(|h| lsn > h) {
                h.applied = Some(lsn);
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
    /// The spool's directory.
    pub spool: std::path::PathBuf,
    pub spool_max_bytes: u64,
    /// Where the hub shows the spool's size and state.
    pub status: Arc<SpoolStatus>,
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
    /// (each holds the slot until it attaches, or, when its spool on disk
    /// says how far its target had applied, until the stream starts: see
    /// [`Hub::park_absent`]).
    pub fn spawn(config: &Config, tenants: &[(String, QueueSpec)]) -> Result<Self> {
        let t = &config.tenant;
        let holds = Arc::new(Holds::default());
        holds
            .lock()
            .extend(tenants.iter().map(|(id, _)| (id.clone(), Hold::default())));
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
            restart: false,
            absent: tenants.iter().cloned().collect(),
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

/// Whether a route is given the stream's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RouteState {
    Live,
    /// Its spool reached its limit: paused at the next transaction
    /// boundary.
    PausePending,
    /// Not given events until the stream restarts (from its position).
    Restarting,
    /// Its spool is full: not given events until it drains to half.
    Paused,
}

/// A tenant's route.
struct Route {
    queue: TenantQueue,
    /// Why the current session's feed closed.
    reason: Reason,
    status: Arc<SpoolStatus>,
    state: RouteState,
    /// The last transaction it was given (or its target has).
    last_commit: Lsn,
    /// Where it has been given everything up to.
    position: Lsn,
    /// It was given the Begin of the open transaction.
    in_txn: bool,
    /// The source moved past transactions without its rows, up to here.
    idle: Option<Lsn>,
}

impl Route {
    fn receiving(&self) -> bool {
        matches!(self.state, RouteState::Live | RouteState::PausePending)
    }

    /// Its spool starts again at `reach`: it is given every transaction
    /// after it once the stream restarts (a paused route waits to resume).
    /// Whether the stream must restart.
    fn restart_from(&mut self, reach: Lsn) -> bool {
        self.position = reach;
        // Transactions that committed below `reach` are covered.
        self.last_commit = Lsn(reach.0.saturating_sub(1));
        self.in_txn = false;
        self.idle = None;
        if self.state == RouteState::Paused {
            return false;
        }
        self.state = RouteState::Restarting;
        true
    }
}

struct Hub {
    info: ConnInfo,
    spec: StreamSpec,
    column: String,
    holds: Arc<Holds>,
    routes: HashMap<String, Route>,
    system_id: Option<String>,
    acknowledged: Lsn,
    /// Restart the stream at the next boundary between transactions.
    restart: bool,
    /// Tenants registered at the start that have not attached yet, with
    /// their queue (see [`Hub::park_absent`]).
    absent: HashMap<String, QueueSpec>,
}

/// Why streaming stopped.
enum Ended {
    /// A tenant attached or resumed: start again from the slot.
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
                    Some(c) => self.command(c),
                    None => return,
                }
                continue;
            }
            if first {
                // Let the others attach before the stream starts (at the
                // start, and after the stream failed).
                first = false;
                let until = tokio::time::Instant::now() + ATTACH_GRACE;
                while self.attached() < self.holds.lock().len() {
                    match tokio::time::timeout_at(until, commands.recv()).await {
                        Ok(Some(Command::Stop { done })) => {
                            let _ = done.send(());
                            return;
                        }
                        Ok(Some(c)) => self.command(c),
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
                    // The stream may have ended inside a transaction its
                    // tenants have the start of: every session starts
                    // again, and until it attaches, its tenant's changes
                    // go to its spool from its last mark. Wait for them
                    // before streaming, as at the start.
                    first = true;
                    tracing::warn!(slot = %self.spec.slot, error = %e, "the shared slot's stream failed; its tenants reconnect");
                    let reason = Some((e.to_string(), e.class()));
                    let tenants: Vec<String> = self.routes.keys().cloned().collect();
                    for tenant in tenants {
                        if let Some(route) = self.routes.get(&tenant) {
                            *route.reason.lock().unwrap_or_else(|p| p.into_inner()) =
                                reason.clone();
                        }
                        self.detached(&tenant, true);
                    }
                }
            }
        }
    }

    /// Routes with a session attached.
    fn attached(&self) -> usize {
        self.routes
            .values()
            .filter(|r| r.queue.has_session() && !r.queue.session_ended())
            .count()
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Register { tenant, done } => {
                self.holds.lock().entry(tenant).or_default();
                let _ = done.send(());
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
                match self.attach(&tenant, resume, queue) {
                    Ok(feed) => {
                        let ack = HubAck {
                            tenant: tenant.clone(),
                            holds: self.holds.clone(),
                        };
                        tracing::info!(%tenant, slot = %self.spec.slot, resume_after = %resume.commit_lsn, "tenant attached to the shared slot");
                        let _ = done.send((feed, ack));
                    }
                    Err(e) => {
                        // The feed closes at once with the reason.
                        let (_, rx) = mpsc::channel(1);
                        let reason = Reason::default();
                        *reason.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some((e.to_string(), e.class()));
                        let ack = HubAck {
                            tenant,
                            holds: self.holds.clone(),
                        };
                        let _ = done.send((HubFeed { rx, reason }, ack));
                    }
                }
            }
            Command::Unregister { tenant, done } => {
                if let Some(route) = self.routes.remove(&tenant) {
                    route.queue.remove();
                    route.status.clear();
                }
                self.holds.lock().remove(&tenant);
                self.holds.moved.notify_one();
                let _ = done.send(());
            }
            Command::Stop { done } => {
                let _ = done.send(());
            }
        }
    }

    /// A session of `tenant` attaches: its feed. The spool left by its
    /// earlier sessions (or on disk, after a restart) goes first.
    fn attach(&mut self, tenant: &str, resume: Resume, spec: QueueSpec) -> Result<HubFeed> {
        self.absent.remove(tenant);
        {
            let mut holds = self.holds.lock();
            let h = holds.entry(tenant.to_string()).or_default();
            h.applied = Some(h.applied.map_or(resume.end_lsn, |a| a.max(resume.end_lsn)));
        }
        self.holds.moved.notify_one();
        if self
            .routes
            .get(tenant)
            .is_some_and(|r| r.queue.has_session())
        {
            // Its earlier session ended and the hub has not seen it yet.
            self.detached(tenant, false);
        }
        let (tx, rx) = mpsc::channel(spec.buffer_events.max(16));
        let reason = Reason::default();
        match self.routes.get_mut(tenant) {
            Some(route) => {
                // A route parked at start from the spool's own marks: its
                // target's real progress decides what the spool covers.
                if route.queue.spooling() && !route.queue.whole_from(resume.end_lsn) {
                    let reach = super::spool::covered(resume.end_lsn, &route.queue.spans());
                    self.respool(tenant, reach, resume.end_lsn)
                        .map_err(ReplicationError::Internal)?;
                }
                let route = self.routes.get_mut(tenant).expect("the route");
                route.queue.attach(tx, resume.commit_lsn);
                route.reason = reason.clone();
            }
            None => {
                let queue =
                    TenantQueue::open(spec.spool.clone(), spec.spool_max_bytes, resume.end_lsn)
                        .map_err(|e| {
                            ReplicationError::Internal(format!(
                                "tenant '{tenant}': its spool {}: {e}",
                                spec.spool.display()
                            ))
                        })?;
                let spans = queue.spans();
                let position = super::spool::covered(resume.end_lsn, &spans);
                if position > resume.end_lsn {
                    tracing::info!(%tenant, from = %resume.end_lsn, to = %position, "tenant: its spool holds the changes up to here; they are applied first");
                }
                let mut route = Route {
                    last_commit: resume.commit_lsn.max(queue.last_commit()),
                    queue,
                    reason: reason.clone(),
                    status: spec.status.clone(),
                    state: RouteState::Restarting,
                    position,
                    in_txn: false,
                    idle: None,
                };
                route.queue.attach(tx, resume.commit_lsn);
                self.holds.set_spans(tenant, spans);
                self.routes.insert(tenant.to_string(), route);
                // It receives every transaction after its position.
                self.restart = true;
            }
        }
        Ok(HubFeed { rx, reason })
    }

    /// `tenant`'s session ended. What it was given through its channel
    /// may not be applied: unless its spool has taken everything since a
    /// position its target reached (then the spool goes on taking its
    /// changes, and the slot moves on), its spool starts again from what
    /// is covered and the stream restarts for it from there. `failed`: the
    /// stream itself ended (the spool may have half a transaction).
    fn detached(&mut self, tenant: &str, failed: bool) {
        let applied = self.holds.applied(tenant).unwrap_or(Lsn::ZERO);
        let Some(route) = self.routes.get_mut(tenant) else {
            return;
        };
        route.queue.detach();
        let spans = route.queue.spans();
        let reach = super::spool::covered(applied, &spans);
        let whole = route.queue.spooling() && route.receiving() && route.queue.whole_from(applied);
        if whole && !failed {
            tracing::info!(%tenant, slot = %self.spec.slot, "tenant detached from the shared slot; its changes go to its spool");
            return;
        }
        if let Err(why) = self.respool(tenant, reach, applied) {
            // Nothing more is spooled: the slot holds for it from here.
            tracing::error!(%tenant, slot = %self.spec.slot, "tenant's spool could not be written ({why}); the slot holds for it");
            if let Some(route) = self.routes.remove(tenant) {
                route.status.clear();
            }
            return;
        }
        tracing::info!(%tenant, slot = %self.spec.slot, from = %reach, "tenant detached from the shared slot; its changes go to its spool from here");
    }

    /// `tenant`'s spool starts again at `reach` (what `applied` and the
    /// spool cover): the stream restarts for it from there, and its hold
    /// is its spool's spans now.
    fn respool(
        &mut self,
        tenant: &str,
        reach: Lsn,
        applied: Lsn,
    ) -> std::result::Result<(), String> {
        let Some(route) = self.routes.get_mut(tenant) else {
            return Ok(());
        };
        route
            .queue
            .respool_from(reach, applied)
            .map_err(|e| match e {
                Push::Failed(why) => why,
                _ => "the spool could not be written".into(),
            })?;
        self.restart |= route.restart_from(reach);
        let spans = route.queue.spans();
        self.holds.set_spans(tenant, spans);
        Ok(())
    }

    /// Tenants registered at the start that did not attach within the
    /// grace (their target down since before the node started) would hold
    /// the slot where it is for every tenant. One whose spool is on disk
    /// is parked from it instead: its marks record how far its target had
    /// applied (a lower bound of its progress), and its changes go on into
    /// the spool, so the slot moves on. When it attaches, its real progress
    /// decides what the spool covers.
    fn park_absent(&mut self) {
        let absent: Vec<(String, QueueSpec)> = self
            .absent
            .drain()
            .filter(|(t, _)| !self.routes.contains_key(t) && self.holds.lock().contains_key(t))
            .collect();
        for (tenant, spec) in absent {
            let opened = TenantQueue::open_absent(spec.spool.clone(), spec.spool_max_bytes);
            let (queue, applied) = match opened {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(%tenant, spool = %spec.spool.display(), "the spool of a tenant that has not attached could not be read ({e}); the slot holds for it");
                    continue;
                }
            };
            let spans = queue.spans();
            let position = super::spool::covered(applied, &spans);
            {
                let mut holds = self.holds.lock();
                let h = holds.entry(tenant.clone()).or_default();
                h.applied = Some(h.applied.map_or(applied, |a| a.max(applied)));
            }
            tracing::info!(%tenant, slot = %self.spec.slot, from = %position, "tenant has not attached (its target?): its changes go on into its spool, and the slot moves on");
            let route = Route {
                last_commit: queue.last_commit().max(Lsn(position.0.saturating_sub(1))),
                queue,
                reason: Reason::default(),
                status: spec.status.clone(),
                state: RouteState::Live,
                position,
                in_txn: false,
                idle: None,
            };
            self.holds.set_spans(&tenant, spans);
            self.routes.insert(tenant, route);
        }
    }

    /// Stream for the attached tenants until a tenant attaches, stop, or an
    /// error.
    async fn stream(&mut self, commands: &mut mpsc::UnboundedReceiver<Command>) -> Ended {
        self.park_absent();
        self.restart = false;
        for route in self.routes.values_mut() {
            if route.state == RouteState::Restarting {
                route.state = RouteState::Live;
            }
        }
        let start = self
            .routes
            .values()
            .filter(|r| r.receiving())
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
            if between && (self.restart || !self.routes.values().any(Route::receiving)) {
                break Ended::Restart;
            }
            let next = tokio::select! {
                biased;
                c = commands.recv(), if between => match c {
                    Some(Command::Stop { done }) => break Ended::Stop(done),
                    Some(c) => {
                        self.command(c);
                        continue;
                    }
                    None => break Ended::Gone,
                },
                _ = holds.moved.notified() => {
                    self.acknowledge(&source);
                    continue;
                }
                _ = idle_tick.tick() => {
                    self.maintain(&mut router);
                    self.send_idle();
                    self.acknowledge(&source);
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
                    self.send(&source, &tenant, event, &router.streams).await;
                }
                item = router.assembler.take_held();
            }
        };
        if matches!(ended, Ended::Restart) {
            // Streamed transactions still open are sent again from their
            // start: their tenants drop what they have of them.
            let none = HashMap::new();
            for (top, tenants) in std::mem::take(&mut router.streams) {
                for tenant in tenants {
                    self.send(
                        &source,
                        &tenant,
                        TxEvent::StreamAbort { top, xid: top },
                        &none,
                    )
                    .await;
                }
            }
            // What was spooled up to here is durable before the slot is
            // told (the restart may re-read from the slot).
            self.maintain(&mut router);
        }
        self.acknowledge(&source);
        source.close().await;
        ended
    }

    /// Tell the walsender what every registered tenant has let go of.
    fn acknowledge(&mut self, source: &PgwireSource) {
        acknowledge(&self.holds, &mut self.acknowledged, source);
    }

    /// A few times a second: notice ended sessions, make spools durable
    /// (the slot may then move past them), delete what tenants applied,
    /// pause a tenant whose spool is full and resume one drained to half.
    fn maintain(&mut self, router: &mut Router) {
        let tenants: Vec<String> = self.routes.keys().cloned().collect();
        for tenant in tenants {
            let Some(route) = self.routes.get_mut(&tenant) else {
                continue;
            };
            if let Some(why) = route.queue.failure() {
                tracing::error!(%tenant, slot = %self.spec.slot, "tenant stopped: {why}");
                *route.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some((
                    format!("{why}: the tenant's spool is damaged; copy the tenant again (init --resync) if the slot has moved past it"),
                    ErrorClass::OperatorAction,
                ));
                if let Some(route) = self.routes.remove(&tenant) {
                    route.status.clear();
                }
                continue;
            }
            if route.queue.session_ended() {
                self.detached(&tenant, false);
            }
            let Some(route) = self.routes.get_mut(&tenant) else {
                continue;
            };
            let applied = self.holds.applied(&tenant).unwrap_or(Lsn::ZERO);
            if route.receiving() {
                if let Err(Push::Failed(why)) = route.queue.sync(route.position, applied) {
                    tracing::error!(%tenant, slot = %self.spec.slot, "tenant's spool could not be synced ({why}); it starts again from the slot");
                    *route.reason.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((why, ErrorClass::Retry));
                    if let Some(route) = self.routes.remove(&tenant) {
                        route.status.clear();
                    }
                    continue;
                }
            }
            route.queue.release(applied);
            let bytes = route.queue.bytes();
            let max = route.queue.max_bytes();
            if route.state == RouteState::Live && route.queue.spooling() && bytes >= max {
                route.state = RouteState::PausePending;
            }
            if route.state == RouteState::PausePending {
                match route.queue.pause(route.position, applied) {
                    Ok(Pause::NotYet) => {}
                    Ok(Pause::Drained) => route.state = RouteState::Live,
                    Ok(Pause::Paused(aborted)) => {
                        route.state = RouteState::Paused;
                        for top in aborted {
                            if let Some(given) = router.streams.get_mut(&top) {
                                given.remove(&tenant);
                            }
                        }
                        let why = format!(
                            "its spool reached [performance] spool_max_mb ({} MB)",
                            max >> 20
                        );
                        tracing::warn!(%tenant, slot = %self.spec.slot, at = %route.position, "tenant paused: {why}; the slot holds for it from here, and it resumes when its spool has drained to half");
                        route.status.set_paused(Some(why));
                    }
                    Err(e) => {
                        let why = match e {
                            Push::Failed(why) => why,
                            _ => "the spool could not be written".into(),
                        };
                        tracing::error!(%tenant, slot = %self.spec.slot, "tenant's spool: {why}; it starts again from the slot");
                        *route.reason.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some((why, ErrorClass::Retry));
                        if let Some(route) = self.routes.remove(&tenant) {
                            route.status.clear();
                        }
                        continue;
                    }
                }
            } else if route.state == RouteState::Paused && bytes <= max / 2 {
                tracing::info!(%tenant, slot = %self.spec.slot, from = %route.position, "tenant resumes: its spool drained to half; the stream restarts from the slot for it");
                route.last_commit = route.last_commit.max(route.queue.last_commit());
                route.state = RouteState::Restarting;
                route.status.set_paused(None);
                self.restart = true;
            }
            let Some(route) = self.routes.get(&tenant) else {
                continue;
            };
            let spans = route.queue.spans();
            let held = self.holds.set_spans(&tenant, spans);
            route.status.update(bytes, held.unwrap_or(Lsn::ZERO));
        }
    }

    /// Tenants that had no rows lately learn where the source is.
    fn send_idle(&mut self) {
        for route in self.routes.values_mut() {
            if let Some(wal_end) = route.idle {
                if route.in_txn || !route.receiving() {
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
    /// up; one whose session ended has its changes spooled.
    async fn send(
        &mut self,
        source: &PgwireSource,
        tenant: &str,
        event: TxEvent,
        streams: &HashMap<u32, HashSet<String>>,
    ) {
        let outcome = {
            let Hub {
                routes,
                holds,
                acknowledged,
                spec,
                ..
            } = &mut *self;
            let Some(route) = routes.get_mut(tenant) else {
                return;
            };
            if !route.receiving() {
                return;
            }
            match route.queue.try_push(event) {
                Ok(()) => return,
                Err(Push::Full(event)) => {
                    // Room comes soon when the tenant is just busy (a
                    // backlog read by every tenant): wait for it,
                    // acknowledging meanwhile.
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
                    match room {
                        Some(Some(permit)) => {
                            permit.send(event);
                            return;
                        }
                        Some(None) => Err(Push::Closed),
                        None => {
                            tracing::warn!(%tenant, slot = %spec.slot, "tenant slower than the shared stream: its changes go to its spool until it catches up");
                            // What its channel has the beginning of.
                            let open: HashSet<u32> = streams
                                .iter()
                                .filter(|(_, given)| given.contains(tenant))
                                .map(|(top, _)| *top)
                                .collect();
                            route.queue.spill(event, route.in_txn, open)
                        }
                    }
                }
                Err(e) => Err(e),
            }
        };
        match outcome {
            Ok(()) => {}
            Err(Push::Closed) | Err(Push::Full(_)) => self.detached(tenant, false),
            Err(Push::Failed(why)) => {
                tracing::error!(%tenant, slot = %self.spec.slot, "tenant's spool could not be written ({why}); it starts again from the slot, which holds for it");
                if let Some(route) = self.routes.remove(tenant) {
                    *route.reason.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((why, ErrorClass::Retry));
                    route.status.clear();
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
                for r in routes.values_mut().filter(|r| r.receiving()) {
                    r.in_txn = false;
                }
            }
            TxEvent::Commit {
                commit_lsn,
                end_lsn,
                ..
            } => {
                for (tenant, r) in routes.iter_mut().filter(|(_, r)| r.receiving()) {
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
                for r in routes.values_mut().filter(|r| r.receiving()) {
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
                for (tenant, r) in routes.iter_mut().filter(|(_, r)| r.receiving()) {
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
                    if routes.get(&tenant).is_some_and(Route::receiving) {
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
        let attached =
            |t: Option<String>| t.filter(|t| routes.get(t).is_some_and(Route::receiving));
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
                .iter()
                .filter(|(_, r)| r.receiving())
                .map(|(t, _)| (t.clone(), truncate.clone()))
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
