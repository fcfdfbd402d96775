//! Errors of the replication pipeline, classified in one place. Shared
//! vocabulary: this module depends on no other module of the crate.
//!
//! Every error is one of three classes ([`ErrorClass`]): a passing outage is
//! retried with back-off; a problem only a person can fix stops the tenant
//! with a hint saying what to do; anything else is fatal. Messages never
//! contain passwords (connection strings are shown masked) or row values.

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// A passing condition (network, restart, lock): retry with back-off.
    Retry,
    /// Needs a person (configuration, privileges, schema): stop with a hint.
    OperatorAction,
    /// A bug or corrupt input: stop.
    Fatal,
}

/// An error of the replication pipeline.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// A statement or connection on the source or target failed.
    #[error("{side}: {context}: {message}{}", db_hint(*.side, .code.as_deref(), .message))]
    Database {
        side: Side,
        context: String,
        message: String,
        /// SQLSTATE, when the server sent one.
        code: Option<String>,
        class: ErrorClass,
    },
    /// The replication stream failed.
    #[error("source replication stream: {message}{}", stream_hint(.message))]
    Stream { message: String, class: ErrorClass },
    /// Shipping batches between a capture and an apply node failed.
    #[error("transport: {message}")]
    Transport { message: String, class: ErrorClass },
    /// A check found something a person has to fix.
    #[error("{message}\n  fix: {hint}")]
    Operator { message: String, hint: String },
    /// Bytes of the replication stream that are not valid pgoutput (the
    /// decoder's own error converts into this).
    #[error("source sent bytes that are not valid pgoutput: {0}")]
    Decode(String),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Broken internal invariant.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Checkpoint problems, with the file and the way out (the vocabulary of
/// the `checkpoint` module, defined here so errors depend on nothing above).
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint file {path} is corrupted ({reason}).\n  fix: the target database holds the real progress, so nothing is lost: remove the file (rm {path}) and restart; it is rewritten after the next commit")]
    Corrupted { path: String, reason: String },
    #[error("cannot write checkpoint file {path}: {reason}.\n  fix: make the directory writable by the daemon's user (e.g. chown heliosdb {dir}) or set [cdc] checkpoint_dir")]
    Write {
        path: String,
        dir: String,
        reason: String,
    },
    #[error("the target's progress for tenant '{tenant}' was written by another source ({what}).\n  fix: if the source really changed (restored or rebuilt), re-copy the tenant; to accept the new source as is, delete its progress row: DELETE FROM heliosdb_replication.progress WHERE tenant_id = '{tenant}'")]
    ForeignProgress { tenant: String, what: String },
}

impl CheckpointError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Write { .. } => ErrorClass::Retry,
            _ => ErrorClass::OperatorAction,
        }
    }
}

/// Which database an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

pub type Result<T, E = ReplicationError> = std::result::Result<T, E>;

impl ReplicationError {
    /// The one place errors are classified.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Database { class, .. }
            | Self::Stream { class, .. }
            | Self::Transport { class, .. } => *class,
            Self::Operator { .. } => ErrorClass::OperatorAction,
            Self::Checkpoint(e) => e.class(),
            Self::Decode(_) | Self::Internal(_) => ErrorClass::Fatal,
        }
    }

    /// The `error_type` label this error is counted under
    /// (`heliosdb_replication_errors_total`).
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Database {
                side: Side::Source, ..
            } => "source_database",
            Self::Database {
                side: Side::Target, ..
            } => "target_database",
            Self::Stream { .. } => "replication_stream",
            Self::Transport { .. } => "transport",
            Self::Operator { .. } => "operator_action",
            Self::Decode(_) => "decode",
            Self::Checkpoint(_) => "checkpoint",
            Self::Internal(_) => "internal",
        }
    }

    /// Every `error_type` label [`Self::error_type`] gives (each tenant's
    /// series exist at 0 from the start).
    pub const ERROR_TYPES: [&'static str; 8] = [
        "source_database",
        "target_database",
        "replication_stream",
        "transport",
        "operator_action",
        "decode",
        "checkpoint",
        "internal",
    ];

    pub fn operator(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Operator {
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// Wrap a tokio-postgres error with what we were doing.
    pub fn db(side: Side, context: impl Into<String>, e: tokio_postgres::Error) -> Self {
        let code = e.code().map(|c| c.code().to_string());
        let message = match e.as_db_error() {
            Some(db) => {
                let mut m = db.message().to_string();
                // Data errors carry row values in their detail ("Failing
                // row contains …"): tenant data stays out of logs.
                let data_error =
                    db.code().code().starts_with("22") || db.code().code().starts_with("23");
                if let Some(d) = db.detail().filter(|_| !data_error) {
                    m.push_str(&format!(" ({d})"));
                }
                if let Some(h) = db.hint() {
                    m.push_str(&format!("; hint: {h}"));
                }
                m
            }
            None => {
                // Walk the source chain: tokio-postgres hides the io cause.
                let mut m = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    m.push_str(&format!(": {s}"));
                    src = s.source();
                }
                m
            }
        };
        let class = match code.as_deref() {
            // A certificate that does not verify stays that way.
            None if message.contains("invalid peer certificate") => ErrorClass::OperatorAction,
            None => ErrorClass::Retry,
            Some(c) => classify_sqlstate(c),
        };
        Self::Database {
            side,
            context: context.into(),
            message,
            code,
            class,
        }
    }

    /// The SQLSTATE, if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Database { code, .. } => code.as_deref(),
            Self::Stream { message, .. } => sqlstate_in(message),
            _ => None,
        }
    }
}

/// `map_err` helper: a source error with what we were doing.
pub fn on_source(context: &str) -> impl FnOnce(tokio_postgres::Error) -> ReplicationError + '_ {
    move |e| ReplicationError::db(Side::Source, context, e)
}

/// `map_err` helper: a target error with what we were doing.
pub fn on_target(context: &str) -> impl FnOnce(tokio_postgres::Error) -> ReplicationError + '_ {
    move |e| ReplicationError::db(Side::Target, context, e)
}

/// What to do about common database errors.
fn db_hint(side: Side, code: Option<&str>, message: &str) -> String {
    let var = match side {
        Side::Source => "[replication] source_connection (or REPLICATION_SOURCE_CONNECTION)",
        Side::Target => "[replication] target_connection (or REPLICATION_TARGET_CONNECTION)",
    };
    let hint = match code {
        Some("28P01") | Some("28000") => {
            format!("check the user name and password in {var}, and pg_hba.conf on the {side}")
        }
        Some("3D000") => format!("check the database name in {var}"),
        Some("42501") => format!("grant the privilege named above to the {side} role"),
        None if message.contains("UnknownIssuer") => format!(
            "the {side}'s certificate is not signed by the CA in sslrootcert: point sslrootcert in {var} at the CA that signed the server certificate"
        ),
        None if message.contains("NotValidForName") || message.contains("not valid for name") => format!(
            "the {side}'s certificate does not name the host in {var}: connect by a name the certificate lists (sslmode=verify-full checks it), or use sslmode=verify-ca to check only the CA"
        ),
        None if message.contains("Connection refused")
            || message.contains("timed out")
            || message.contains("failed to lookup") =>
        {
            format!("check host and port in {var}; is the {side} PostgreSQL running and listening there (listen_addresses, firewall)?")
        }
        _ => return String::new(),
    };
    format!("\n  fix: {hint}")
}

/// What to do about the replication stream's errors that need a person.
fn stream_hint(message: &str) -> String {
    let hint = if message.contains("can no longer get changes from replication slot")
        || message.contains("has been invalidated")
    {
        "the slot was invalidated (it held more WAL than the source's max_slot_wal_keep_size allows): changes it had not delivered are gone; drop the slot (SELECT pg_drop_replication_slot('<slot>')), then run init --resync to copy the tenant again"
    } else if message.contains("replication slot") && message.contains("does not exist") {
        "run init: it creates the slot, and refuses (naming init --resync) when the target's rows came from a slot that is gone, since the changes made in between were never captured"
    } else {
        return String::new();
    };
    format!("\n  fix: {hint}")
}

/// `… (SQLSTATE 42704)` as the replication client formats server errors.
fn sqlstate_in(text: &str) -> Option<&str> {
    let at = text.find("SQLSTATE ")? + "SQLSTATE ".len();
    text.get(at..at + 5)
}

/// Classes of SQLSTATE that pass by themselves.
pub(crate) fn classify_sqlstate(code: &str) -> ErrorClass {
    match code {
        // connection exceptions, insufficient resources, operator intervention
        // (admin shutdown, crash shutdown, cannot connect now), system errors
        c if c.starts_with("08")
            || c.starts_with("53")
            || c.starts_with("57")
            || c.starts_with("58") =>
        {
            ErrorClass::Retry
        }
        // serialization failure, deadlock; object in use (slot active elsewhere)
        "40001" | "40P01" | "55006" => ErrorClass::Retry,
        // internal error from the server
        "XX000" => ErrorClass::Retry,
        _ => ErrorClass::OperatorAction,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_type_is_listed() {
        let samples = [
            ReplicationError::Stream {
                message: String::new(),
                class: ErrorClass::Retry,
            },
            ReplicationError::Transport {
                message: String::new(),
                class: ErrorClass::Retry,
            },
            ReplicationError::operator("", ""),
            ReplicationError::Internal(String::new()),
        ];
        for e in samples {
            assert!(ReplicationError::ERROR_TYPES.contains(&e.error_type()));
        }
    }

    #[test]
    fn a_lost_or_missing_slot_names_the_fix() {
        let lost = ReplicationError::Stream {
            message: "ERROR: can no longer get changes from replication slot \"s\" (SQLSTATE 55000); detail: This slot has been invalidated because it exceeded the maximum reserved size.".into(),
            class: ErrorClass::OperatorAction,
        };
        assert!(
            lost.to_string().contains("fix: the slot was invalidated"),
            "{lost}"
        );
        assert!(lost.to_string().contains("init --resync"), "{lost}");
        let gone = ReplicationError::Stream {
            message: "ERROR: replication slot \"s\" does not exist (SQLSTATE 42704)".into(),
            class: ErrorClass::OperatorAction,
        };
        assert!(gone.to_string().contains("fix: run init"), "{gone}");
    }

    #[test]
    fn sqlstates_are_classified() {
        assert_eq!(classify_sqlstate("08006"), ErrorClass::Retry);
        assert_eq!(classify_sqlstate("57P01"), ErrorClass::Retry);
        assert_eq!(classify_sqlstate("55006"), ErrorClass::Retry);
        assert_eq!(classify_sqlstate("42P01"), ErrorClass::OperatorAction);
        assert_eq!(classify_sqlstate("28P01"), ErrorClass::OperatorAction);
        assert_eq!(
            sqlstate_in("replication slot \"x\" does not exist (SQLSTATE 42704)"),
            Some("42704")
        );
    }
}
