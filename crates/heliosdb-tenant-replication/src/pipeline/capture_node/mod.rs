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

use super::hub::HubHandle;
use super::session::{open_feed, spool_dir, CheckpointWriter, Opened};
use super::spool;
use super::Shutdown;
use crate::apply::Committed;
use crate::checkpoint::progress;
use crate::config::Config;
use crate::error::{ReplicationError, Result, Side};
use crate::lsn::Lsn;
use crate::pg;
use crate::provision::preflight;
use crate::seal::{Compression, FileKeys, KeyProvider};
use crate::telemetry::{State, TenantTelemetry};
use crate::transport::client::{host_name, ApplyClient};
use crate::transport::codec::Encoder;
use crate::transport::SessionRequest;

mod shipper;

use shipper::{Shipper, Stats, TableNames};

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
    hub: Option<&HubHandle>,
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
        // On a shared slot, the tenant's spool may hold what the slot has
        // released.
        let covered = match hub {
            Some(_) => spool::covered(Lsn(p.end_lsn), &spool::spans_on_disk(&spool_dir(config))),
            None => Lsn(p.end_lsn),
        };
        progress::check_slot_covered(&t.tenant_id, &t.slot, covered, report.slot_confirmed)?;
    }
    let resume = remote
        .progress
        .as_ref()
        .map(|p| (Lsn(p.commit_lsn), Lsn(p.end_lsn)));
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
    match opened.start_lsn {
        Some(start_lsn) => tracing::info!(
            tenant = %t.tenant_id, slot = %t.slot, apply_node = %ctx.client()?.endpoint(),
            %start_lsn, next_sequence = remote.next_sequence,
            "replication_start: streaming to the apply node"
        ),
        None => tracing::info!(
            tenant = %t.tenant_id, slot = %t.slot, apply_node = %ctx.client()?.endpoint(),
            shared_with = t.shared_with.len(), next_sequence = remote.next_sequence,
            "replication_start: streaming from the shared slot to the apply node"
        ),
    }
    let Opened {
        feed: rx,
        capture,
        file,
        acked,
        ..
    } = opened;
    tel.set_state(State::Running);

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
        acked,
        checkpoint: CheckpointWriter::new(
            file,
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
    let captured = match capture {
        Some((capture, final_tx)) => {
            let _ = final_tx.send(shipper.acked.position());
            Some(tokio::time::timeout(Duration::from_secs(6), capture).await)
        }
        None => None,
    };
    match outcome {
        Ok(()) => {
            tracing::info!(tenant = %t.tenant_id, acknowledged = %shipper.acked.position(), "replication_stop: stopped");
            Ok(())
        }
        // A capture error explains a "queue closed".
        Err(e) => match captured {
            Some(Ok(Ok(Err(capture_err)))) => Err(capture_err),
            _ => Err(e),
        },
    }
}
