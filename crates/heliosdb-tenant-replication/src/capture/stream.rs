//! [`ChangeSource`] over `pgwire-replication`: the logical replication
//! protocol with `pgoutput`, proto_version 1.
//!
//! The client runs the socket in a background task that answers the
//! walsender's keepalives even while apply is busy (measured: it survived a
//! 12 s apply stall with `wal_sender_timeout = 5s`), and it reports exactly the
//! LSN we give it through [`ChangeSource::acknowledge`], never the received
//! position. Raw pgoutput bytes are decoded by our own [`pgoutput`] decoder.

use std::time::{Duration, Instant};

use pgwire_replication::{
    FeedbackObserver, ReplicationClient, ReplicationConfig, ReplicationEvent,
};

use super::pgoutput::{self, Message};
use super::{ChangeSource, SourceEvent};
use crate::config::ConnInfo;
use crate::error::{ReplicationError, Result};
use crate::lsn::Lsn;
use crate::pg::replication_tls;

/// What to stream.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub slot: String,
    pub publication: String,
    /// Where to start: transactions committed before it are not sent.
    /// `Lsn::ZERO` means the slot's confirmed position.
    pub start_lsn: Lsn,
    /// What to report as flushed until apply acknowledges more.
    pub ack_lsn: Lsn,
    /// Events buffered between the socket task and us.
    pub buffer_events: usize,
    pub application_name: String,
}

/// The connection part of a replication session's settings.
fn session_config(info: &ConnInfo, slot: &str, publication: &str) -> ReplicationConfig {
    let password = info
        .password
        .as_ref()
        .map(|p| p.expose().to_string())
        .unwrap_or_default();
    let mut cfg = ReplicationConfig::new(
        info.host.clone(),
        info.user.clone(),
        password,
        info.dbname.clone(),
        slot.to_string(),
        publication,
    );
    cfg.port = info.port;
    cfg.tls = replication_tls(info);
    cfg
}

/// A started replication stream.
pub struct PgwireSource {
    client: ReplicationClient,
    /// The source cluster's system identifier (IDENTIFY_SYSTEM).
    pub system_id: String,
}

impl PgwireSource {
    /// Connect, identify the system, and start streaming.
    pub async fn start(info: &ConnInfo, spec: &StreamSpec) -> Result<Self> {
        let publication = format!("\"{}\"", spec.publication.replace('"', "\"\""));
        let mut cfg = session_config(info, &spec.slot, &publication);
        cfg.start_lsn = spec.start_lsn.into();
        cfg.ack_lsn = Some(spec.ack_lsn.into());
        cfg.status_interval = Duration::from_secs(1);
        cfg.idle_wakeup_interval = Duration::from_secs(5);
        cfg.buffer_events = spec.buffer_events.clamp(64, 65_536);
        cfg.application_name = Some(spec.application_name.clone());
        cfg.options =
            Some("-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3".into());
        // Needed for `feedback_pending_since`, which tells us on shutdown that
        // the last acknowledgement went out.
        cfg.feedback_observer = Some(FeedbackObserver::new(|_| {}));

        let mut client = ReplicationClient::connect_gated(cfg)
            .await
            .map_err(ReplicationError::stream)?;
        let ident = client
            .identify_system()
            .await
            .map_err(ReplicationError::stream)?;
        client.start().await.map_err(ReplicationError::stream)?;
        client
            .wait_started()
            .await
            .map_err(ReplicationError::stream)?;
        Ok(Self {
            client,
            system_id: ident.system_id,
        })
    }
}

impl ChangeSource for PgwireSource {
    async fn recv(&mut self) -> Result<Option<SourceEvent>> {
        loop {
            let Some(ev) = self.client.recv().await.map_err(ReplicationError::stream)? else {
                return Ok(None);
            };
            let out = match ev {
                ReplicationEvent::KeepAlive { wal_end, .. } => SourceEvent::Keepalive {
                    wal_end: wal_end.into(),
                },
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => SourceEvent::Message(Message::Begin {
                    final_lsn: final_lsn.into(),
                    commit_time_us: commit_time_micros,
                    xid,
                }),
                ReplicationEvent::Commit {
                    lsn,
                    end_lsn,
                    commit_time_micros,
                } => SourceEvent::Message(Message::Commit {
                    flags: 0,
                    commit_lsn: lsn.into(),
                    end_lsn: end_lsn.into(),
                    commit_time_us: commit_time_micros,
                }),
                ReplicationEvent::XLogData { data, .. } => {
                    SourceEvent::Message(pgoutput::decode(&data)?)
                }
                // The client decodes logical messages itself (row versions
                // travel in them, see apply::tracking).
                ReplicationEvent::Message {
                    transactional,
                    lsn,
                    prefix,
                    content,
                } => SourceEvent::Message(Message::LogicalMessage {
                    transactional,
                    lsn: lsn.into(),
                    prefix,
                    content,
                }),
                ReplicationEvent::StoppedAt { .. } => continue,
            };
            return Ok(Some(out));
        }
    }

    fn acknowledge(&self, lsn: Lsn) {
        self.client.update_applied_lsn(lsn.into());
    }

    async fn close(&mut self) {
        // The worker sends a raised position within its status interval
        // (1 s); wait for that so the slot reflects the final commit.
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.client.feedback_pending_since().is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), self.client.shutdown()).await;
        tracing::debug!("replication stream closed");
    }
}

/// A slot just created on a replication connection that exported its
/// snapshot. The snapshot stays valid while this value lives (the
/// connection must stay idle); drop it once the copy is done.
pub struct SlotSnapshot {
    _session: ReplicationClient,
    /// Where streaming continues: changes committed after the snapshot.
    pub consistent_point: Lsn,
    pub snapshot_name: String,
}

impl SlotSnapshot {
    /// `CREATE_REPLICATION_SLOT … LOGICAL pgoutput (SNAPSHOT 'export')`.
    pub async fn create(info: &ConnInfo, slot: &str) -> Result<Self> {
        let mut cfg = session_config(info, slot, "unused");
        cfg.application_name = Some("heliosdb-tenant-replication init".into());
        let mut session = ReplicationClient::connect_gated(cfg)
            .await
            .map_err(ReplicationError::stream)?;
        let rows = session
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT \"{slot}\" LOGICAL pgoutput (SNAPSHOT 'export')"
            ))
            .await
            .map_err(ReplicationError::stream)?;
        let row = rows.first().ok_or_else(|| {
            ReplicationError::Internal("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        let text = |i: usize| -> Result<String> {
            row.get(i)
                .and_then(|v| v.as_ref())
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .ok_or_else(|| {
                    ReplicationError::Internal(format!(
                        "CREATE_REPLICATION_SLOT: column {i} missing"
                    ))
                })
        };
        let consistent_point = text(1)?
            .parse()
            .map_err(|e: crate::lsn::ParseLsnError| ReplicationError::Internal(e.to_string()))?;
        Ok(Self {
            _session: session,
            consistent_point,
            snapshot_name: text(2)?,
        })
    }
}
