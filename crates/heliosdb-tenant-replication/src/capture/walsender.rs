//! A replication connection to the source's walsender, spoken by us.
//!
//! ```text
//! connect (TCP, SSLRequest + rustls per sslmode) ─► startup (replication=database)
//!   ─► auth (trust, password, md5, SCRAM-SHA-256) ─► simple queries
//!   ─► START_REPLICATION ─► CopyBoth: socket task ─► bounded queue ─► caller
//! ```
//!
//! Why our own: the published clients either request `proto_version '1'`
//! only or answer keepalives only while the caller reads (see
//! `docs/decisions/2026-11-26-replication-client.md`). Here the socket task
//! sends a status update every `status_interval` whatever the caller does,
//! answers a keepalive that asks for a reply at once, and reports exactly
//! the LSN the caller acknowledged (never the received position). While the
//! caller reads a backlog it paces the reads ([`WalStream::pace_reads`]),
//! the socket out of the poller between them ([`socket`]).
//!
//! Outside bytes: every frame is length-checked before it is read; a
//! malformed one ends the stream with an error, never a panic.
//!
//! Files: `session.rs` (connect, TLS, authenticate, simple queries,
//! `START_REPLICATION`), `frame.rs` (frames and the messages in them),
//! `stream.rs` (the socket task and the queue), `socket.rs` (a socket out of
//! the poller while reads are paced); this file the shared errors.

mod frame;
mod session;
mod socket;
mod stream;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::config::{ConnInfo, SslMode};
use crate::error::{ErrorClass, ReplicationError, Result};
use crate::lsn::Lsn;
use frame::*;
use socket::{Parkable, Registered};
use stream::*;

pub use session::Session;
pub use stream::{StreamSettings, WalMessage, WalStream};

/// Largest frame accepted (PostgreSQL's own limit for a row is 1 GB).
const MAX_FRAME: usize = 1 << 30;
/// Room kept free in the socket buffer for one read.
const READ_ROOM: usize = 64 * 1024;
/// While reading a backlog, a read smaller than this is followed by a
/// pause of [`PACE`] before the next one.
const PACE_BELOW: usize = 32 * 1024;
/// How long a paced reader lets the walsender's messages gather: the
/// walsender writes each message on its own, and a reader faster than it
/// would otherwise wake up (epoll, recv, an ACK) for every one or two.
const PACE: Duration = Duration::from_millis(2);

trait Io: AsyncRead + AsyncWrite + Unpin + Send {
    /// Leave the runtime's poller until the next read or write.
    fn park(&mut self) -> std::io::Result<()>;
}

impl<S: Registered> Io for Parkable<S> {
    fn park(&mut self) -> std::io::Result<()> {
        Parkable::park(self)
    }
}

impl<S: Registered> Io for tokio_rustls::client::TlsStream<Parkable<S>> {
    fn park(&mut self) -> std::io::Result<()> {
        self.get_mut().0.park()
    }
}

fn stream_err(message: impl Into<String>, class: ErrorClass) -> ReplicationError {
    ReplicationError::Stream {
        message: message.into(),
        class,
    }
}

fn io_err(doing: &str) -> impl FnOnce(std::io::Error) -> ReplicationError + '_ {
    move |e| stream_err(format!("{doing}: {e}"), ErrorClass::Retry)
}

fn protocol(what: impl std::fmt::Display) -> ReplicationError {
    stream_err(
        format!("unexpected reply from the walsender: {what}"),
        ErrorClass::Fatal,
    )
}

/// A frontend message that could not be built (a NUL inside a string).
fn unencodable(e: std::io::Error) -> ReplicationError {
    protocol(e)
}

/// An ErrorResponse as `SEVERITY: message (SQLSTATE xxxxx)`, with its
/// detail and hint, classified by SQLSTATE.
fn server_error(mut body: &[u8]) -> ReplicationError {
    let (mut severity, mut code, mut message) = (String::new(), None, String::new());
    let (mut detail, mut hint) = (None, None);
    while let Some((&kind, rest)) = body.split_first() {
        if kind == 0 {
            break;
        }
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let text = String::from_utf8_lossy(&rest[..end]).into_owned();
        match kind {
            b'V' => severity = text,
            b'S' if severity.is_empty() => severity = text,
            b'C' => code = Some(text),
            b'M' => message = text,
            b'D' => detail = Some(text),
            b'H' => hint = Some(text),
            _ => {}
        }
        body = rest.get(end + 1..).unwrap_or_default();
    }
    let mut text = format!("{severity}: {message}");
    if let Some(c) = &code {
        text.push_str(&format!(" (SQLSTATE {c})"));
    }
    if let Some(d) = detail {
        text.push_str(&format!("; detail: {d}"));
    }
    if let Some(h) = hint {
        text.push_str(&format!("; hint: {h}"));
    }
    let class = code
        .as_deref()
        .map(crate::error::classify_sqlstate)
        .unwrap_or(ErrorClass::Retry);
    stream_err(text, class)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_split_only_when_whole() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[b'Z', 0, 0, 0, 5]);
        assert!(take_frame(&mut buf).expect("ok").is_none());
        buf.extend_from_slice(b"I");
        let (tag, body) = take_frame(&mut buf).expect("ok").expect("frame");
        assert_eq!((tag, &body[..]), (b'Z', &b"I"[..]));
        assert!(buf.is_empty());
    }

    #[test]
    fn impossible_lengths_are_errors() {
        for len in [0u32, 3, (MAX_FRAME + 1) as u32, u32::MAX] {
            let mut buf = BytesMut::new();
            buf.put_u8(b'd');
            buf.put_u32(len);
            assert!(take_frame(&mut buf).is_err(), "length {len}");
        }
    }

    #[test]
    fn error_responses_keep_code_detail_and_hint() {
        let body =
            b"SERROR\0VERROR\0C42704\0Mreplication slot \"x\" does not exist\0Hcreate it\0\0";
        let e = server_error(body);
        let text = e.to_string();
        assert!(
            text.contains("ERROR: replication slot \"x\" does not exist (SQLSTATE 42704)"),
            "{text}"
        );
        assert!(text.contains("hint: create it"), "{text}");
        assert_eq!(e.code(), Some("42704"));
        assert_eq!(e.class(), ErrorClass::OperatorAction);
        // Truncated input does not panic.
        for n in 0..body.len() {
            let _ = server_error(&body[..n]);
        }
    }

    #[test]
    fn copy_data_kinds() {
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(0x16_0000_0028);
        k.put_i64(0);
        k.put_u8(1);
        let (m, reply) = copy_data(k.freeze()).expect("keepalive");
        assert!(reply);
        assert!(
            matches!(m, Some(WalMessage::Keepalive { wal_end }) if wal_end == Lsn(0x16_0000_0028))
        );
        let mut w = BytesMut::new();
        w.put_u8(b'w');
        w.put_u64(7);
        w.put_u64(9);
        w.put_i64(0);
        w.extend_from_slice(b"B...");
        let (m, reply) = copy_data(w.freeze()).expect("xlogdata");
        assert!(!reply);
        assert!(
            matches!(m, Some(WalMessage::XLogData { wal_start, ref data }) if wal_start == Lsn(7) && &data[..] == b"B...")
        );
        for bad in [&b""[..], b"w123", b"k1", b"x"] {
            assert!(copy_data(Bytes::copy_from_slice(bad)).is_err());
        }
    }

    #[test]
    fn status_update_layout() {
        let s = status_update(0x1_0000_0002, true);
        assert_eq!(s[0], b'd');
        assert_eq!(
            u32::from_be_bytes([s[1], s[2], s[3], s[4]]) as usize,
            s.len() - 1
        );
        assert_eq!(s[5], b'r');
        assert_eq!(&s[6..14], &0x1_0000_0002u64.to_be_bytes());
        assert_eq!(*s.last().expect("byte"), 1);
    }
}
