//! Transport: sealed batches from a capture node to an apply node.
//!
//! ```text
//! capture node                                      apply node
//! TxEvents ─► codec::Encoder ─► seal ─► POST ══TLS 1.3══► open ─► codec::Decoder ─► Applier ─► target
//!    ▲                                          (mutual certificates)                 │ commit (data +
//!    └────── slot acknowledged ◄──────────── committed end LSN ◄──────────────────────┘  progress + sequence)
//! ```
//!
//! HTTP/1.1 over TLS 1.3 only, both sides presenting certificates
//! (`[transport] ca_file`, `cert_file`, `key_file`):
//!
//! * `POST /v1/tenants/{tenant}/sessions` (JSON [`SessionRequest`]) starts a
//!   session: the apply node drops any earlier session of the tenant (its
//!   target connection, and with it any uncommitted transaction), reads the
//!   tenant's progress, and answers [`SessionResponse`]: where the capture
//!   node must resume and the next batch sequence it must use.
//! * `POST /v1/tenants/{tenant}/batches` (header `heliosdb-session`, body: a
//!   sealed envelope) applies one batch and answers [`BatchResponse`] only
//!   after the target committed; the capture node acknowledges the slot only
//!   up to the `committed_end_lsn` it names. A batch that ends inside a
//!   source transaction is applied into the open target transaction and
//!   answered with nothing newly committed.
//! * Refusals are JSON [`ErrorBody`] with a status: 400 bad envelope or body,
//!   403 tenant not served here, 409 session unknown or superseded (start a
//!   new one), 422 replayed or reordered batch, 500 the target failed
//!   (`class` says whether to retry).
//!
//! Sequences: every batch of a tenant has a sequence greater than every
//! earlier one; the apply node stores the last applied one in the target
//! transaction that applied it, so replays are refused after restarts too.

pub mod client;
pub mod codec;
pub mod dictionary;
pub mod server;
pub mod tls;

use serde::{Deserialize, Serialize};

use crate::error::{ErrorClass, ReplicationError};

/// Header that names the session a batch belongs to.
pub const SESSION_HEADER: &str = "heliosdb-session";

/// Largest request body the apply node reads (a sealed batch).
pub const MAX_BODY: usize = crate::seal::MAX_PLAIN_LEN + (1 << 20);

/// The capture node opens a session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRequest {
    /// `pg_control_system().system_identifier` of the source.
    pub source_system_id: String,
    pub slot: String,
    /// Who is capturing (host name), for the apply node's logs.
    pub capture_node: String,
}

/// The tenant's progress on the target, as the apply node read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteProgress {
    pub commit_lsn: u64,
    pub end_lsn: u64,
    pub slot_name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionResponse {
    pub session: String,
    pub progress: Option<RemoteProgress>,
    /// The sequence of the next batch (greater than any applied or seen).
    pub next_sequence: u64,
    /// The sealing key of the last applied batch and how many batches it
    /// has sealed, so the per-key cap survives capture-node restarts.
    pub key_batches: Option<(String, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchResponse {
    pub sequence: u64,
    /// End LSN of the last source transaction now committed on the target,
    /// if this batch committed one.
    pub committed_end_lsn: Option<u64>,
}

/// A refusal or failure, as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub hint: Option<String>,
    /// `retry`, `operator` or `fatal`.
    pub class: String,
    /// The `error_type` it is counted under.
    pub error_type: String,
}

pub(crate) fn class_name(c: ErrorClass) -> &'static str {
    match c {
        ErrorClass::Retry => "retry",
        ErrorClass::OperatorAction => "operator",
        ErrorClass::Fatal => "fatal",
    }
}

pub(crate) fn class_of(name: &str) -> ErrorClass {
    match name {
        "retry" => ErrorClass::Retry,
        "operator" => ErrorClass::OperatorAction,
        _ => ErrorClass::Fatal,
    }
}

/// A transport error of the given class.
pub(crate) fn error(class: ErrorClass, message: impl Into<String>) -> ReplicationError {
    ReplicationError::Transport {
        message: message.into(),
        class,
    }
}
