//! [`ChangeSource`] over our own replication connection
//! ([`super::walsender`]): the logical replication protocol with `pgoutput`.
//!
//! The socket task answers the walsender's keepalives and sends status
//! updates even while apply is busy, and it reports exactly the LSN we give
//! it through [`ChangeSource::acknowledge`], never the received position.
//! Raw pgoutput bytes are decoded by our own [`pgoutput`] decoder.

use std::time::Duration;

use super::pgoutput;
use super::walsender::{Session, StreamSettings, WalMessage, WalStream};
use super::{ChangeSource, SourceEvent};
use crate::config::ConnInfo;
use crate::error::{ReplicationError, Result};
use crate::lsn::Lsn;
use crate::pg::{quote_ident, quote_literal};

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

/// pgoutput's options: protocol 2 with streaming (a transaction larger than
/// the source's `logical_decoding_work_mem` arrives while it runs, not after
/// its commit), the tenant's publication, logical messages (row versions
/// travel in them, see apply::tracking).
fn pgoutput_options(publication: &str) -> String {
    format!(
        "proto_version '2', streaming 'on', publication_names {}, messages 'true'",
        quote_literal(&quote_ident(publication))
    )
}

/// A started replication stream.
pub struct PgwireSource {
    stream: WalStream,
    /// Inside a stream block (between StreamStart and StreamStop), changes
    /// carry their transaction id.
    in_block: bool,
    /// The source cluster's system identifier (IDENTIFY_SYSTEM).
    pub system_id: String,
}

impl PgwireSource {
    /// Connect, identify the system, and start streaming.
    pub async fn start(info: &ConnInfo, spec: &StreamSpec) -> Result<Self> {
        let mut session = Session::connect(info, &spec.application_name).await?;
        let rows = session.simple_query("IDENTIFY_SYSTEM").await?;
        let system_id = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .ok_or_else(|| {
                ReplicationError::Internal("IDENTIFY_SYSTEM returned no system identifier".into())
            })?;
        let stream = session
            .start_replication(
                &spec.slot,
                spec.start_lsn,
                &pgoutput_options(&spec.publication),
                StreamSettings {
                    ack: spec.ack_lsn,
                    buffer: spec.buffer_events.clamp(64, 65_536),
                    status_interval: Duration::from_secs(1),
                },
            )
            .await?;
        Ok(Self {
            stream,
            in_block: false,
            system_id,
        })
    }

    /// Pace reads while a backlog is read ([`WalStream::pace_reads`]).
    pub fn pace_reads(&self, on: bool) {
        self.stream.pace_reads(on);
    }
}

impl ChangeSource for PgwireSource {
    async fn recv(&mut self) -> Result<Option<SourceEvent>> {
        Ok(match self.stream.recv().await? {
            None => None,
            Some(WalMessage::Keepalive { wal_end }) => Some(SourceEvent::Keepalive { wal_end }),
            Some(WalMessage::XLogData { data, .. }) => {
                let streamed = self.in_block
                    && data
                        .first()
                        .is_some_and(|t| pgoutput::carries_xid_in_stream(*t));
                if streamed {
                    let (xid, message) = pgoutput::decode_streamed(&data)?;
                    Some(SourceEvent::Streamed { xid, message })
                } else {
                    let message = pgoutput::decode(&data)?;
                    match message {
                        pgoutput::Message::StreamStart { .. } => self.in_block = true,
                        pgoutput::Message::StreamStop => self.in_block = false,
                        _ => {}
                    }
                    Some(SourceEvent::Message(message))
                }
            }
        })
    }

    fn acknowledge(&self, lsn: Lsn) {
        self.stream.acknowledge(lsn);
    }

    async fn close(&mut self) {
        self.stream.close().await;
        tracing::debug!("replication stream closed");
    }
}

/// A slot just created on a replication connection that exported its
/// snapshot. The snapshot stays valid while this value lives (the
/// connection must stay idle); drop it once the copy is done.
pub struct SlotSnapshot {
    _session: Session,
    /// Where streaming continues: changes committed after the snapshot.
    pub consistent_point: Lsn,
    pub snapshot_name: String,
}

impl SlotSnapshot {
    /// `CREATE_REPLICATION_SLOT … LOGICAL pgoutput (SNAPSHOT 'export')`.
    pub async fn create(info: &ConnInfo, slot: &str) -> Result<Self> {
        let mut session = Session::connect(info, "heliosdb-tenant-replication init").await?;
        let rows = session
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')",
                quote_ident(slot)
            ))
            .await?;
        let row = rows.first().ok_or_else(|| {
            ReplicationError::Internal("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        let text = |i: usize| -> Result<String> {
            row.get(i).cloned().flatten().ok_or_else(|| {
                ReplicationError::Internal(format!("CREATE_REPLICATION_SLOT: column {i} missing"))
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
