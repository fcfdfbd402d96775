//! The apply node (`[transport] mode = "apply"`): receives sealed batches
//! from capture nodes over HTTPS and applies them to the target.
//!
//! One session per tenant at a time. A session is a task running the apply
//! [`Driver`] on its own target connection, fed the session's batches in
//! order; a new session ends the old one (it rolls back what is open and
//! lets go of the replication origin). Each batch is opened (tenant, key,
//! sequence checked) and decoded here, in turn, then handed to the session's
//! driver, which commits where the batch ends between source transactions
//! (with the tenant's progress and the batch's mark) and only then is the
//! batch answered. Decoding the next batch overlaps applying this one.
//!
//! (~640 lines: the session's lifecycle, the batches' turn-taking and the
//! driver task they feed change together; a batch's answer is the task's.)

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use hyper::StatusCode;
use rand::RngCore;
use tokio::sync::{mpsc, oneshot, watch, Mutex, MutexGuard, Notify};
use tokio::task::JoinHandle;

use super::driver::{Batch, CommitPolicy, Delivery, Driver, Source};
use super::lanes::{lane_opener, LaneCatalog};
use super::Shutdown;
use crate::apply::schema::SourceCatalog;
use crate::apply::streams::Streams;
use crate::apply::{Applier, ApplyIdentity};
use crate::checkpoint::progress::{self, BatchMark};
use crate::checkpoint::CheckpointError;
use crate::config::Config;
use crate::error::{ReplicationError, Result, Side};
use crate::lsn::Lsn;
use crate::pg;
use crate::seal::{self, FileKeys, KeyProvider, SealError};
use crate::telemetry::{State, TenantTelemetry};
use crate::transport::codec::Decoder;
use crate::transport::server::{BatchService, Refusal};
use crate::transport::{BatchResponse, RemoteProgress, SessionRequest, SessionResponse};

/// Serves the tenants registered with it, on one listener: each request
/// names its tenant (`/v1/tenants/{tenant}/…`), and each tenant has its own
/// configuration (target, key, conflict strategy), session and telemetry.
pub struct ApplyNode {
    request_timeout: std::time::Duration,
    tenants: std::sync::RwLock<HashMap<String, Arc<Tenant>>>,
}

struct Tenant {
    config: Arc<Config>,
    keys: Arc<dyn KeyProvider>,
    dictionary: Option<Arc<seal::Dictionary>>,
    state: Mutex<TenantState>,
    /// Woken after each batch: a batch that arrived before its predecessor
    /// (the capture node keeps two on the wire, on two connections) waits.
    progressed: Notify,
    tel: Arc<TenantTelemetry>,
}

#[derive(Default)]
struct TenantState {
    session: Option<Active>,
    /// Highest sequence seen by this process (applied or not).
    highest_seen: u64,
    /// Batches refused so far: a batch waiting for its predecessor stops
    /// waiting when one is (it may have been that predecessor).
    refusals: u64,
}

struct Active {
    id: String,
    capture_node: String,
    decoder: Decoder,
    last_sequence: u64,
    /// The sealing key of the last batch and its batch count.
    key: Option<(String, u64)>,
    /// The session's driver task: its inbox, its stop signal, its end.
    batches: mpsc::Sender<Shipment>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Active {
    /// End the session: the driver stops after the batch in hand, rolls
    /// back what is open and lets go of the replication origin; batches
    /// still queued are answered `session_unknown`.
    async fn end(self) {
        let _ = self.stop.send(true);
        drop(self.batches);
        let _ = self.task.await;
    }
}

/// A decoded batch on its way to the session's driver, and who waits for
/// the answer.
struct Shipment {
    sequence: u64,
    batch: Batch,
    answer: Answer,
}

/// Where a batch's answer goes: the end of its last commit, or a refusal.
type Answer = oneshot::Sender<Result<Option<Lsn>, Refusal>>;

/// A session's batches, as the driver's source: each is answered when the
/// driver has applied it (with the end of its last commit), or refused
/// with the error that ended the session.
struct Shipped {
    tenant: String,
    tel: Arc<TenantTelemetry>,
    rx: mpsc::Receiver<Shipment>,
    /// The batch in hand: its sequence and who waits for its answer.
    in_hand: Option<(u64, Answer)>,
}

impl Source for Shipped {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        Ok(self.rx.recv().await.map(|s| {
            self.in_hand = Some((s.sequence, s.answer));
            Delivery::Batch(s.batch)
        }))
    }

    fn queued(&self) -> usize {
        self.rx.len()
    }

    /// The batch's answer carries it; the capture node acknowledges the
    /// slot there.
    async fn committed(&mut self, _end_lsn: Lsn, _events: u64) {}

    fn delivered(&mut self, last_end: Option<Lsn>) {
        if let Some((_, answer)) = self.in_hand.take() {
            let _ = answer.send(Ok(last_end));
        }
    }

    fn failed(&mut self, e: &ReplicationError) {
        self.tel.failed(e, true);
        let sequence = self.in_hand.as_ref().map(|(s, _)| *s);
        tracing::error!(tenant = %self.tenant, sequence, error = %e, "applying a batch failed; the session ends");
        if let Some((_, answer)) = self.in_hand.take() {
            let _ = answer.send(Err(Refusal::from_error(e)));
        }
    }
}

/// A tenant's keys, dictionary and telemetry, ready to be served.
fn tenant_entry(config: &Arc<Config>, tel: Arc<TenantTelemetry>) -> Result<Arc<Tenant>> {
    let t = &config.tenant;
    let key_path = config.seal.key_path.as_deref().ok_or_else(|| {
        ReplicationError::operator(
            "[encryption] key_file is not set",
            "set it to the tenant's key file or keys directory",
        )
    })?;
    let keys = FileKeys::load(&t.tenant_id, key_path)
        .map_err(|e| ReplicationError::operator(e.to_string(), key_hint()))?;
    let compression = config
        .seal
        .compression()
        .map_err(|e| ReplicationError::operator(e, "point it at a readable file"))?;
    Ok(Arc::new(Tenant {
        config: config.clone(),
        keys: Arc::new(keys),
        dictionary: compression.dictionary,
        state: Mutex::new(TenantState::default()),
        progressed: Notify::new(),
        tel,
    }))
}

/// The node's listener on `[transport] listen_address`.
fn bind(config: &Config) -> Result<std::net::TcpListener> {
    let addr = config.transport.listen_address.ok_or_else(|| {
        ReplicationError::operator(
            "[transport] listen_address is not set",
            "set listen_address = \"0.0.0.0:8443\"",
        )
    })?;
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| {
            ReplicationError::operator(
                format!("cannot listen on {addr}: {e}"),
                "choose a free [transport] listen_address, or stop what uses it",
            )
        })?;
    Ok(listener)
}

/// An apply node serving several tenants of one node file: its listener
/// runs on the runtime it was started from, tenants register and leave
/// while it serves (their pipelines' lifetimes).
pub struct SharedApplyNode {
    node: Arc<ApplyNode>,
    stop: watch::Sender<bool>,
    served: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl SharedApplyNode {
    /// Bind `[transport] listen_address` of `config` (the node's section,
    /// the same for every tenant) and serve, with no tenant yet.
    pub fn start(config: &Config) -> Result<Self> {
        let tls = crate::transport::tls::server_config(&config.transport)?;
        let listener = tokio::net::TcpListener::from_std(bind(config)?)
            .map_err(|e| ReplicationError::Internal(format!("the apply node's listener: {e}")))?;
        let node = Arc::new(ApplyNode {
            request_timeout: config.transport.request_timeout,
            tenants: std::sync::RwLock::new(HashMap::new()),
        });
        tracing::info!(
            listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            "apply node: waiting for capture nodes (TLS 1.3, client certificates required)"
        );
        let (stop, stopped) = watch::channel(false);
        let served = tokio::spawn(crate::transport::server::serve(
            listener,
            tls,
            node.clone(),
            stopped,
        ));
        Ok(Self {
            node,
            stop,
            served: std::sync::Mutex::new(Some(served)),
        })
    }

    /// Stop serving (after every tenant left).
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let served = self.served.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(served) = served {
            let _ = served.await;
        }
    }
}

/// Run one tenant of an apply node until shutdown: registered with the
/// node's shared listener when there is one, otherwise on a listener of
/// its own.
pub async fn run(
    config: Arc<Config>,
    shared: Option<Arc<SharedApplyNode>>,
    mut shutdown: Shutdown,
    tel: Arc<TenantTelemetry>,
) -> Result<()> {
    let tenant = config.tenant.tenant_id.clone();
    let entry = tenant_entry(&config, tel.clone())?;
    // `start` shares one listener among its apply tenants; a caller
    // without one (the demo, the bench) gets a listener of this tenant's own.
    let own = match &shared {
        Some(_) => None,
        None => Some(SharedApplyNode::start(&config)?),
    };
    let Some(node) = shared.as_deref().or(own.as_ref()).map(|n| n.node.clone()) else {
        return Err(ReplicationError::Internal(
            "no apply node to serve on".into(),
        ));
    };
    node.tenants
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(tenant.clone(), entry.clone());
    tel.set_state(State::WaitingForCapture);
    let _ = shutdown.wait_for(|s| *s).await;
    node.tenants
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&tenant);
    let mut state = entry.state.lock().await;
    if let Some(active) = state.session.take() {
        // Batches commit when they end between source transactions;
        // what is open here is an unfinished source transaction.
        let (capture_node, last_sequence) = (active.capture_node.clone(), active.last_sequence);
        active.end().await;
        tracing::info!(%tenant, %capture_node, last_sequence, "replication_stop: apply node stopped");
    }
    drop(state);
    if let Some(own) = own {
        own.stop().await;
    }
    Ok(())
}

fn key_hint() -> &'static str {
    "the apply node needs the same tenant key as the capture node: [encryption] key_file (openssl rand -hex 32, mode 600) or a keys directory <dir>/<tenant>/<key_id>.key"
}

impl ApplyNode {
    /// A connection that never became a TLS 1.3 session with a trusted
    /// client certificate (plaintext, no certificate, another CA).
    pub fn refused_connection(&self, peer: &str, reason: &str) {
        tracing::warn!(%peer, %reason, error_type = "transport_tls", "refused a connection");
        for t in self.served() {
            t.tel.refused("transport_tls", reason);
        }
    }

    fn served(&self) -> Vec<Arc<Tenant>> {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn tenant(&self, tenant: &str) -> Result<Arc<Tenant>, Refusal> {
        let found = self
            .tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .cloned();
        found.ok_or_else(|| {
            tracing::warn!(%tenant, error_type = "unknown_tenant", "refused a request for a tenant this node does not serve");
            // Counted on the tenants this node serves (never a label chosen by the caller).
            for t in self.served() {
                t.tel.refused("unknown_tenant", "a request for a tenant this node does not serve");
            }
            Refusal::new(
                StatusCode::FORBIDDEN,
                "unknown_tenant",
                format!("tenant '{tenant}' is not served by this apply node"),
            )
        })
    }

    /// `[transport] request_timeout_seconds`.
    pub fn request_timeout(&self) -> std::time::Duration {
        self.request_timeout
    }

    /// Start a session: connect the target, read the tenant's progress.
    pub async fn open_session(
        &self,
        tenant: &str,
        req: SessionRequest,
    ) -> Result<SessionResponse, Refusal> {
        let entry = self.tenant(tenant)?;
        // Checked before the current session is touched: a refused request
        // (a wrong source, a client probing) leaves it streaming.
        let (target, progress) = match self.check_session(&entry, tenant, &req).await {
            Ok(accepted) => accepted,
            Err(e) => {
                let streaming = entry.state.lock().await.session.is_some();
                if streaming {
                    tracing::warn!(%tenant, capture_node = %req.capture_node, error = %e, "refused a session; the current one goes on");
                } else {
                    entry.tel.failed(&e, true);
                }
                return Err(match e {
                    // The recorded source's identity stays on this side.
                    ReplicationError::Checkpoint(CheckpointError::ForeignProgress { .. }) => {
                        Refusal::new(
                            StatusCode::FORBIDDEN,
                            "foreign_source",
                            format!("the target's progress for tenant '{tenant}' was recorded from another source cluster than this capture node's"),
                        )
                    }
                    other => Refusal::from_error(&other),
                });
            }
        };
        let mut state = entry.state.lock().await;
        // The replaced session holds the tenant's replication origin, which
        // the new one takes.
        if let Some(old) = state.session.take() {
            tracing::info!(%tenant, old = %old.capture_node, new = %req.capture_node, "a new session replaces the previous one");
            old.end().await;
        }
        let active = self
            .activate(&entry, tenant, &req, target, progress.as_ref())
            .await
            .map_err(|e| {
                entry.tel.failed(&e, true);
                Refusal::from_error(&e)
            })?;
        let applied = progress.as_ref().map(|p| p.batch_sequence).unwrap_or(0);
        let last = applied.max(state.highest_seen);
        let response = SessionResponse {
            session: active.id.clone(),
            progress: progress.as_ref().map(|p| RemoteProgress {
                commit_lsn: p.commit_lsn.0,
                end_lsn: p.end_lsn.0,
                slot_name: p.slot_name.clone(),
            }),
            next_sequence: last + 1,
            key_batches: progress.and_then(|p| p.seal_key),
        };
        tracing::info!(
            %tenant, capture_node = %req.capture_node, session = %active.id,
            next_sequence = last + 1, "replication_start: capture node connected"
        );
        state.session = Some(Active {
            last_sequence: last,
            key: response.key_batches.clone(),
            ..active
        });
        entry.tel.set_state(State::Running);
        entry.tel.caught_up();
        // Batches of the replaced session stop waiting for their turn.
        entry.progressed.notify_waiters();
        Ok(response)
    }

    /// Connect the target and check the session may stream there (its
    /// source is the one the target's progress came from).
    async fn check_session(
        &self,
        entry: &Tenant,
        tenant: &str,
        req: &SessionRequest,
    ) -> Result<(tokio_postgres::Client, Option<progress::Progress>)> {
        let t = &entry.config.tenant;
        let app = format!("heliosdb-tenant-replication/{tenant} apply");
        let target = pg::connect(t.target()?, &entry.config.network, Side::Target, &app).await?;
        crate::apply::tracking::ensure_schema(&target).await?;
        let recorded = progress::load(&target, tenant).await?;
        if let Some(p) = &recorded {
            p.check_source(tenant, &req.source_system_id, &req.slot)?;
        }
        if !crate::snapshot::pending_resyncs(&target, tenant)
            .await?
            .is_empty()
        {
            tracing::warn!(%tenant, "a resync is requested, but an apply node has no source connection: run `resync` and `start` with a configuration that names both databases (mode = \"local\") to perform it");
        }
        Ok((target, recorded))
    }

    /// The session's driver on the checked connection (it takes the
    /// tenant's replication origin), running in a task of its own.
    async fn activate(
        &self,
        entry: &Tenant,
        tenant: &str,
        req: &SessionRequest,
        target: tokio_postgres::Client,
        recorded: Option<&progress::Progress>,
    ) -> Result<Active> {
        let config = &entry.config;
        let tel = entry.tel.clone();
        let t = &config.tenant;
        let identity = ApplyIdentity {
            tenant: tenant.to_string(),
            tenant_column: t.tenant_column.clone(),
            slot: req.slot.clone(),
            source_system_id: req.source_system_id.clone(),
            conflict: config.conflict.clone(),
            lane: None,
        };
        let applier = Applier::new(
            target,
            SourceCatalog::Shipped(HashMap::new()),
            t.schema_changes,
            identity.clone(),
            config.batch.batch_size,
        )
        .await?;
        let streams = Streams::new(lane_opener(config.clone(), identity, LaneCatalog::Shipped));
        let end = recorded.map(|p| p.end_lsn).unwrap_or_default();
        let mut driver = Driver::new(
            applier,
            streams,
            CommitPolicy::AtBatchEnd,
            tel.clone(),
            end,
            end,
        )
        .paced(config.batch.max_events_per_sec);
        if let Some(p) = recorded {
            driver.set_converge_until(p.converge_until);
        }
        // The capture node keeps two batches on the wire.
        let (batches, rx) = mpsc::channel(2);
        let (stop, mut stopped) = watch::channel(false);
        let mut source = Shipped {
            tenant: tenant.to_string(),
            tel,
            rx,
            in_hand: None,
        };
        let task = tokio::spawn(async move {
            match driver.run(&mut source, &mut stopped).await {
                Ok(()) => {
                    let _ = driver.finish(&mut source).await;
                }
                Err(_) => driver.abandon().await,
            }
            driver.release().await;
        });
        let mut id = [0u8; 16];
        rand::rng().fill_bytes(&mut id);
        Ok(Active {
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            capture_node: req.capture_node.clone(),
            decoder: Decoder::new(),
            last_sequence: 0,
            key: None,
            batches,
            stop,
            task,
        })
    }

    /// Open, decode and apply one batch; answer after the target committed.
    pub async fn apply_batch(
        &self,
        tenant: &str,
        session: &str,
        envelope: Bytes,
    ) -> Result<BatchResponse, Refusal> {
        let entry = self.tenant(tenant)?;
        let answer = self.apply_in_turn(&entry, tenant, session, envelope).await;
        if answer.is_err() {
            entry.state.lock().await.refusals += 1;
        }
        entry.progressed.notify_waiters();
        answer
    }

    async fn apply_in_turn(
        &self,
        entry: &Tenant,
        tenant: &str,
        session: &str,
        envelope: Bytes,
    ) -> Result<BatchResponse, Refusal> {
        let tel = &entry.tel;
        // Authenticated and decompressed before the batch's turn: this
        // overlaps applying the batch before it.
        let (header, plain) = seal::open_with(
            &envelope,
            tenant,
            None,
            entry.keys.as_ref(),
            entry.dictionary.as_deref(),
        )
        .map_err(|e| {
            tel.refused(e.error_type(), &e.to_string());
            refuse_envelope(tenant, &e)
        })?;
        let mut guard = self.turn(entry, session, header.sequence).await?;
        let state = &mut *guard;
        let Some(active) = state.session.as_mut().filter(|a| a.id == session) else {
            return Err(session_unknown());
        };
        if header.sequence <= active.last_sequence {
            let e = SealError::Replay {
                tenant: tenant.to_string(),
                sequence: header.sequence,
                last: active.last_sequence,
            };
            tel.refused(e.error_type(), &e.to_string());
            return Err(refuse_envelope(tenant, &e));
        }
        if header.sequence > active.last_sequence + 1 {
            tracing::warn!(%tenant, sequence = header.sequence, expected = active.last_sequence + 1, "a batch arrived but the one before it did not; the capture node starts a new session");
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "batch_out_of_order",
                format!(
                    "batch {} arrived, batch {} did not: start a new session",
                    header.sequence,
                    active.last_sequence + 1
                ),
            )
            .retry());
        }
        tel.behind();
        state.highest_seen = state.highest_seen.max(header.sequence);
        let decoded = match active.decoder.decode(Bytes::from(plain)) {
            Ok(d) => d,
            Err(e) => {
                tel.refused("envelope_invalid", &e.to_string());
                tracing::error!(%tenant, sequence = header.sequence, error = %e, error_type = "envelope_invalid", "refused a batch");
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "envelope_invalid",
                    e.to_string(),
                ));
            }
        };
        active.last_sequence = header.sequence;
        let (key_id, key_batches) = match active.key.take() {
            Some((id, n)) if id == header.key_id => (id, n + 1),
            _ => (header.key_id.clone(), 1),
        };
        active.key = Some((key_id.clone(), key_batches));
        let wire = envelope.len() as u64;
        tel.m
            .compression_ratio
            .set(wire as f64 / f64::from(header.plain_len.max(1)));
        let (answer, answered) = oneshot::channel();
        let shipment = Shipment {
            sequence: header.sequence,
            batch: Batch {
                events: decoded.events,
                // Recorded with every commit this batch makes: a replay of
                // it is refused even when only part of it was committed.
                mark: Some(BatchMark {
                    sequence: header.sequence,
                    key_id,
                    key_batches,
                }),
                source_columns: decoded.source_columns,
                wire_bytes: wire,
            },
            answer,
        };
        if active.batches.send(shipment).await.is_err() {
            // The session's driver ended (an error the batch before it met).
            if let Some(a) = state.session.take() {
                a.end().await;
            }
            return Err(session_unknown());
        }
        drop(guard);
        // The next batch's turn has come (it needs this one handed over,
        // not applied).
        entry.progressed.notify_waiters();
        match answered.await {
            Ok(Ok(last_end)) => Ok(BatchResponse {
                sequence: header.sequence,
                committed_end_lsn: last_end.map(|l| l.0),
            }),
            Ok(Err(refusal)) => {
                // The session ends with the error.
                let mut state = entry.state.lock().await;
                if let Some(a) = state.session.take_if(|a| a.id == session) {
                    a.end().await;
                }
                Err(refusal)
            }
            // The session ended before this batch was applied.
            Err(_) => Err(session_unknown()),
        }
    }

    /// The tenant's state, once `sequence` is the session's next batch (or
    /// the request timeout passed, or the session is gone).
    async fn turn<'a>(
        &self,
        entry: &'a Tenant,
        session: &str,
        sequence: u64,
    ) -> Result<MutexGuard<'a, TenantState>, Refusal> {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let mut refusals = None;
        loop {
            // Registered before looking, so no wake-up between is missed.
            let progressed = entry.progressed.notified();
            let guard = entry.state.lock().await;
            let early = match guard.session.as_ref().filter(|a| a.id == session) {
                None => return Err(session_unknown()),
                Some(a) => sequence > a.last_sequence + 1,
            };
            let refused = *refusals.get_or_insert(guard.refusals) != guard.refusals;
            if !early || refused || tokio::time::Instant::now() >= deadline {
                return Ok(guard);
            }
            tracing::debug!(
                "batch {sequence} waits for batch {}",
                guard
                    .session
                    .as_ref()
                    .map(|a| a.last_sequence + 1)
                    .unwrap_or_default()
            );
            drop(guard);
            let _ = tokio::time::timeout_at(deadline, progressed).await;
        }
    }
}

fn session_unknown() -> Refusal {
    Refusal::new(
        StatusCode::CONFLICT,
        "session_unknown",
        "the session is unknown or was replaced (apply node restarted?): start a new one",
    )
    .retry()
}

fn refuse_envelope(tenant: &str, e: &SealError) -> Refusal {
    let error_type = e.error_type();
    tracing::error!(%tenant, error = %e, error_type, "refused a batch; nothing of it was applied");
    let (status, hint) = match e {
        SealError::Replay { .. } => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "run exactly one capture node per tenant; a replayed batch is never applied twice",
        ),
        SealError::CrossTenant { .. } => (
            StatusCode::BAD_REQUEST,
            "a capture node must ship each tenant's batches to that tenant's endpoint",
        ),
        SealError::Key(_) | SealError::Authentication { .. } => {
            (StatusCode::BAD_REQUEST, key_hint())
        }
        _ => (
            StatusCode::BAD_REQUEST,
            "run the same version on both nodes and check [compression] dictionary_path",
        ),
    };
    let mut r = Refusal::new(status, error_type, e.to_string());
    r.body.hint = Some(hint.into());
    r
}

impl BatchService for ApplyNode {
    fn open_session(
        &self,
        tenant: &str,
        req: SessionRequest,
    ) -> impl std::future::Future<Output = Result<SessionResponse, Refusal>> + Send {
        ApplyNode::open_session(self, tenant, req)
    }

    fn apply_batch(
        &self,
        tenant: &str,
        session: &str,
        envelope: Bytes,
    ) -> impl std::future::Future<Output = Result<BatchResponse, Refusal>> + Send {
        ApplyNode::apply_batch(self, tenant, session, envelope)
    }

    fn refused_connection(&self, peer: &str, reason: &str) {
        ApplyNode::refused_connection(self, peer, reason)
    }

    fn request_timeout(&self) -> std::time::Duration {
        ApplyNode::request_timeout(self)
    }
}
