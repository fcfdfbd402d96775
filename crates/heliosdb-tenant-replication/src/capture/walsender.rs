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

mod socket;

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
use socket::{Parkable, Registered};

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

/// A connection before START_REPLICATION: simple queries only.
pub struct Session {
    io: Box<dyn Io>,
    buf: BytesMut,
}

impl Session {
    /// Connect as a replication connection to `info`'s database.
    pub async fn connect(info: &ConnInfo, application_name: &str) -> Result<Self> {
        let timeout = Duration::from_secs(info.connect_timeout_seconds.unwrap_or(30).max(1));
        match tokio::time::timeout(timeout, Self::connect_now(info, application_name)).await {
            Ok(r) => r,
            Err(_) => Err(stream_err(
                format!(
                    "connecting to {}:{} timed out after {timeout:?}",
                    info.host, info.port
                ),
                ErrorClass::Retry,
            )),
        }
    }

    async fn connect_now(info: &ConnInfo, application_name: &str) -> Result<Self> {
        let io: Box<dyn Io> = if info.host.starts_with('/') {
            // A Unix-domain socket directory, as libpq: no TLS over it.
            let path = format!("{}/.s.PGSQL.{}", info.host, info.port);
            Box::new(Parkable::new(
                tokio::net::UnixStream::connect(&path).await.map_err(|e| {
                    stream_err(format!("connecting to {path}: {e}"), ErrorClass::Retry)
                })?,
            ))
        } else {
            Self::tcp(info).await?
        };
        Self::start(io, info, application_name).await
    }

    async fn tcp(info: &ConnInfo) -> Result<Box<dyn Io>> {
        let tcp = TcpStream::connect((info.host.as_str(), info.port))
            .await
            .map_err(|e| {
                stream_err(
                    format!("connecting to {}:{}: {e}", info.host, info.port),
                    ErrorClass::Retry,
                )
            })?;
        let _ = tcp.set_nodelay(true);
        negotiate_tls(tcp, info).await
    }

    async fn start(io: Box<dyn Io>, info: &ConnInfo, application_name: &str) -> Result<Self> {
        let mut session = Session {
            io,
            buf: BytesMut::with_capacity(READ_ROOM),
        };
        let mut out = BytesMut::new();
        let params = [
            ("user", info.user.as_str()),
            ("database", info.dbname.as_str()),
            ("replication", "database"),
            ("application_name", application_name),
            ("client_encoding", "UTF8"),
            (
                "options",
                "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3",
            ),
        ];
        frontend::startup_message(params.iter().copied(), &mut out)
            .map_err(|e| protocol(format!("startup message: {e}")))?;
        session.send(&out).await?;
        session.authenticate(info).await?;
        // ParameterStatus, BackendKeyData, notices … until ReadyForQuery.
        loop {
            let (tag, body) = session.read().await?;
            match tag {
                b'Z' => return Ok(session),
                b'E' => return Err(server_error(&body)),
                b'S' | b'K' | b'N' => {}
                other => return Err(protocol(format!("message '{}' at startup", other as char))),
            }
        }
    }

    async fn authenticate(&mut self, info: &ConnInfo) -> Result<()> {
        let password = || {
            info.password.as_ref().map(|p| p.expose().as_bytes()).ok_or_else(|| {
                stream_err(
                    format!(
                        "the source asks a password for user '{}' and the connection string has none",
                        info.user
                    ),
                    ErrorClass::OperatorAction,
                )
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = self.read().await?;
            match tag {
                b'E' => return Err(server_error(&body)),
                b'R' => {}
                other => {
                    return Err(protocol(format!(
                        "message '{}' during authentication",
                        other as char
                    )))
                }
            }
            let mut b = body;
            if b.remaining() < 4 {
                return Err(protocol("short authentication request"));
            }
            let mut out = BytesMut::new();
            match b.get_i32() {
                0 => return Ok(()),
                3 => {
                    frontend::password_message(password()?, &mut out)
                        .map_err(unencodable)?;
                }
                5 => {
                    if b.remaining() < 4 {
                        return Err(protocol("md5 request without salt"));
                    }
                    let salt = [b[0], b[1], b[2], b[3]];
                    let hashed = postgres_protocol::authentication::md5_hash(
                        info.user.as_bytes(),
                        password()?,
                        salt,
                    );
                    frontend::password_message(hashed.as_bytes(), &mut out)
                        .map_err(unencodable)?;
                }
                10 => {
                    let offered: Vec<&[u8]> = b.chunk().split(|&c| c == 0).collect();
                    if !offered.contains(&SCRAM_SHA_256.as_bytes()) {
                        return Err(stream_err(
                            "the source offers no SASL mechanism this client speaks (SCRAM-SHA-256)",
                            ErrorClass::OperatorAction,
                        ));
                    }
                    // Channel binding is not offered: TLS, when on, already
                    // authenticates the server by certificate.
                    let s = ScramSha256::new(password()?, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)
                        .map_err(unencodable)?;
                    scram = Some(s);
                }
                11 => {
                    let s = scram.as_mut().ok_or_else(|| protocol("SASL continue without a start"))?;
                    s.update(b.chunk()).map_err(|e| {
                        stream_err(format!("SCRAM: {e}"), ErrorClass::OperatorAction)
                    })?;
                    frontend::sasl_response(s.message(), &mut out)
                        .map_err(unencodable)?;
                }
                12 => {
                    let s = scram.as_mut().ok_or_else(|| protocol("SASL final without a start"))?;
                    s.finish(b.chunk()).map_err(|e| {
                        stream_err(
                            format!("SCRAM: the server's proof does not verify: {e}"),
                            ErrorClass::OperatorAction,
                        )
                    })?;
                    continue;
                }
                other => {
                    return Err(stream_err(
                        format!("the source asks for an authentication method this client does not speak (code {other}); use scram-sha-256, md5, password or trust in pg_hba.conf"),
                        ErrorClass::OperatorAction,
                    ))
                }
            }
            self.send(&out).await?;
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.io
            .write_all(bytes)
            .await
            .map_err(io_err("writing to the walsender"))?;
        self.io
            .flush()
            .await
            .map_err(io_err("writing to the walsender"))
    }

    /// The next whole frame: its tag and body.
    async fn read(&mut self) -> Result<(u8, Bytes)> {
        loop {
            if let Some(frame) = take_frame(&mut self.buf)? {
                return Ok(frame);
            }
            let n = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(io_err("reading from the walsender"))?;
            if n == 0 {
                return Err(stream_err(
                    "the walsender closed the connection",
                    ErrorClass::Retry,
                ));
            }
        }
    }

    /// Run one replication command; its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(unencodable)?;
        self.send(&out).await?;
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            let (tag, body) = self.read().await?;
            match tag {
                b'D' => rows.push(data_row(body)?),
                b'E' => failed = Some(server_error(&body)),
                b'Z' => {
                    return match failed {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                b'T' | b'C' | b'I' | b'N' | b'S' => {}
                other => {
                    return Err(protocol(format!(
                        "message '{}' answering a query",
                        other as char
                    )))
                }
            }
        }
    }

    /// `START_REPLICATION … LOGICAL` with `options` (already quoted); the
    /// stream's socket task starts reporting `ack` as flushed.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &str,
        stream: StreamSettings,
    ) -> Result<WalStream> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({options})",
            crate::pg::quote_ident(slot)
        );
        let mut out = BytesMut::new();
        frontend::query(&sql, &mut out).map_err(unencodable)?;
        self.send(&out).await?;
        loop {
            let (tag, body) = self.read().await?;
            match tag {
                b'W' => break,
                b'E' => return Err(server_error(&body)),
                b'N' | b'S' => {}
                other => {
                    return Err(protocol(format!(
                        "message '{}' after START_REPLICATION",
                        other as char
                    )))
                }
            }
        }
        let acked = Arc::new(AtomicU64::new(stream.ack.0));
        let paced = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(stream.buffer.max(1));
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(copy_both(
            self,
            tx,
            Shared {
                acked: acked.clone(),
                paced: paced.clone(),
            },
            stream.status_interval,
            stop_rx,
        ));
        Ok(WalStream {
            rx,
            acked,
            paced,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }
}

/// SSLRequest and the TLS handshake as `sslmode` says (libpq's meanings).
async fn negotiate_tls(mut tcp: TcpStream, info: &ConnInfo) -> Result<Box<dyn Io>> {
    if info.sslmode == SslMode::Disable {
        return Ok(Box::new(Parkable::new(tcp)));
    }
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    tcp.write_all(&out)
        .await
        .map_err(io_err("asking the source for TLS"))?;
    let answer = tcp
        .read_u8()
        .await
        .map_err(io_err("asking the source for TLS"))?;
    let required = !matches!(info.sslmode, SslMode::Allow | SslMode::Prefer);
    match answer {
        b'S' => {}
        b'N' if !required => return Ok(Box::new(Parkable::new(tcp))),
        b'N' => {
            return Err(stream_err(
                format!(
                    "the source does not accept TLS and sslmode={} requires it: turn ssl on in the source's postgresql.conf",
                    info.sslmode.as_str()
                ),
                ErrorClass::OperatorAction,
            ))
        }
        other => return Err(protocol(format!("answer '{}' to SSLRequest", other as char))),
    }
    let config = crate::pg::tls::client_config(info)
        .map_err(|e| stream_err(e, ErrorClass::OperatorAction))?;
    let name = match info.host.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(info.host.clone()).map_err(|e| {
            stream_err(
                format!("host '{}' is not a valid TLS server name: {e}", info.host),
                ErrorClass::OperatorAction,
            )
        })?,
    };
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, Parkable::new(tcp))
        .await
        .map_err(|e| {
            let class = if e.kind() == std::io::ErrorKind::InvalidData {
                ErrorClass::OperatorAction
            } else {
                ErrorClass::Retry
            };
            stream_err(format!("TLS with the source: {e}"), class)
        })?;
    Ok(Box::new(tls))
}

/// Split one frame off `buf` if it holds a whole one.
fn take_frame(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if !(4..=MAX_FRAME).contains(&len) {
        return Err(protocol(format!("frame length {len}")));
    }
    if buf.len() < 1 + len {
        buf.reserve(1 + len - buf.len());
        return Ok(None);
    }
    let tag = buf[0];
    let mut frame = buf.split_to(1 + len);
    frame.advance(5);
    Ok(Some((tag, frame.freeze())))
}

fn data_row(mut body: Bytes) -> Result<Vec<Option<String>>> {
    if body.remaining() < 2 {
        return Err(protocol("short DataRow"));
    }
    let n = body.get_i16();
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if body.remaining() < 4 {
            return Err(protocol("short DataRow"));
        }
        let len = body.get_i32();
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = len as usize;
        if body.remaining() < len {
            return Err(protocol("short DataRow"));
        }
        row.push(Some(
            String::from_utf8_lossy(&body.split_to(len)).into_owned(),
        ));
    }
    Ok(row)
}

/// How the socket task runs.
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    /// Reported as written/flushed/applied until the caller acknowledges more.
    pub ack: Lsn,
    /// Frames queued between the socket task and the caller.
    pub buffer: usize,
    /// Status updates at least this often, whatever the caller does.
    pub status_interval: Duration,
}

/// What the walsender sends while streaming.
#[derive(Debug)]
pub enum WalMessage {
    /// One pgoutput message.
    XLogData { wal_start: Lsn, data: Bytes },
    /// A heartbeat: how far the server has sent.
    Keepalive { wal_end: Lsn },
}

/// A started stream. Dropping it stops the socket task (no final status);
/// [`WalStream::close`] sends the last acknowledgement first.
pub struct WalStream {
    rx: mpsc::Receiver<Result<WalMessage>>,
    acked: Arc<AtomicU64>,
    paced: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl WalStream {
    /// The next message; `Ok(None)` once the server ended the stream.
    pub async fn recv(&mut self) -> Result<Option<WalMessage>> {
        match self.rx.recv().await {
            Some(Ok(m)) => Ok(Some(m)),
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }

    /// Report `lsn` as flushed from the next status update on (never lower
    /// than what was reported before).
    pub fn acknowledge(&self, lsn: Lsn) {
        self.acked.fetch_max(lsn.0, Ordering::AcqRel);
    }

    /// Whether the socket task paces its reads (see [`PACE`]): on while the
    /// caller reads a backlog, where a few milliseconds do not matter and
    /// fewer, larger reads save CPU that the walsender's host needs.
    pub fn pace_reads(&self, on: bool) {
        self.paced.store(on, Ordering::Relaxed);
    }

    /// Send a final status update and end the stream (CopyDone), waiting a
    /// few seconds at most.
    pub async fn close(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
    }
}

impl Drop for WalStream {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// `r`: written, flushed and applied up to `lsn`.
fn status_update(lsn: u64, reply: bool) -> BytesMut {
    let now_us = crate::clock::pg_now_us();
    let mut body = BytesMut::with_capacity(34);
    body.put_u8(b'r');
    body.put_u64(lsn);
    body.put_u64(lsn);
    body.put_u64(lsn);
    body.put_i64(now_us);
    body.put_u8(u8::from(reply));
    let mut out = BytesMut::with_capacity(40);
    out.put_u8(b'd');
    out.put_u32(4 + body.len() as u32);
    out.extend_from_slice(&body);
    out
}

/// One CopyData frame of the walsender as a message; `Ok(None)` for frames
/// that carry nothing for the caller.
fn copy_data(mut body: Bytes) -> Result<(Option<WalMessage>, bool)> {
    let Some(&kind) = body.first() else {
        return Err(protocol("empty CopyData"));
    };
    body.advance(1);
    match kind {
        b'w' => {
            if body.remaining() < 24 {
                return Err(protocol("short XLogData header"));
            }
            let wal_start = Lsn(body.get_u64());
            let _wal_end = body.get_u64();
            let _sent_at = body.get_i64();
            Ok((
                Some(WalMessage::XLogData {
                    wal_start,
                    data: body,
                }),
                false,
            ))
        }
        b'k' => {
            if body.remaining() < 17 {
                return Err(protocol("short keepalive"));
            }
            let wal_end = Lsn(body.get_u64());
            let _sent_at = body.get_i64();
            let reply = body.get_u8() != 0;
            Ok((Some(WalMessage::Keepalive { wal_end }), reply))
        }
        other => Err(protocol(format!("CopyData of kind '{}'", other as char))),
    }
}

/// What the socket task shares with its [`WalStream`].
struct Shared {
    /// The LSN to report as flushed.
    acked: Arc<AtomicU64>,
    /// Pace reads ([`WalStream::pace_reads`]).
    paced: Arc<AtomicBool>,
}

/// The socket task: frames to the queue, status updates on time, a reply
/// to every keepalive that asks for one, even while the queue is full.
async fn copy_both(
    mut s: Session,
    tx: mpsc::Sender<Result<WalMessage>>,
    shared: Shared,
    interval: Duration,
    mut stop: oneshot::Receiver<()>,
) {
    let Shared { acked, paced } = shared;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Option<WalMessage> = None;
    // No read before this instant (a paced reader after a small read).
    let mut hold: Option<tokio::time::Instant> = None;
    let result: Result<()> = async {
        loop {
            // Whole frames already read go to the queue without waiting
            // while it has room (the common case: no select per message).
            if let Some(m) = pending.take() {
                match tx.try_send(Ok(m)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(Ok(m))) => pending = Some(m),
                    Err(_) => return Ok(()),
                }
            }
            if pending.is_none() {
                if let Some((tag, body)) = take_frame(&mut s.buf)? {
                    match tag {
                        b'd' => {
                            let (msg, reply) = copy_data(body)?;
                            if reply {
                                s.send(&status_update(acked.load(Ordering::Acquire), false))
                                    .await?;
                            }
                            pending = msg;
                        }
                        b'E' => return Err(server_error(&body)),
                        // The server ended the stream (CopyDone, then the
                        // command's completion).
                        b'c' | b'C' | b'Z' => return Ok(()),
                        b'N' | b'S' => {}
                        other => return Err(protocol(format!("message '{}' while streaming", other as char))),
                    }
                    continue;
                }
            }
            // Frames split off share the buffer, so its spare room shrinks
            // as they are taken; keep room for a large read.
            if s.buf.capacity() - s.buf.len() < READ_ROOM / 2 {
                s.buf.reserve(READ_ROOM);
            }
            tokio::select! {
                biased;
                _ = &mut stop => {
                    s.send(&status_update(acked.load(Ordering::Acquire), false)).await?;
                    let mut out = BytesMut::new();
                    frontend::copy_done(&mut out);
                    s.send(&out).await?;
                    // The server answers with its own CopyDone and the end
                    // of the command; wait for them briefly, then go.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        loop {
                            match s.read().await {
                                Ok((b'Z', _)) | Err(_) => break,
                                Ok(_) => {}
                            }
                        }
                    })
                    .await;
                    let mut out = BytesMut::new();
                    frontend::terminate(&mut out);
                    let _ = s.send(&out).await;
                    return Ok(());
                }
                _ = ticker.tick() => {
                    s.send(&status_update(acked.load(Ordering::Acquire), false)).await?;
                }
                permit = tx.reserve(), if pending.is_some() => {
                    let Ok(permit) = permit else { return Ok(()) };
                    if let Some(m) = pending.take() {
                        permit.send(Ok(m));
                    }
                }
                _ = async { if let Some(at) = hold { tokio::time::sleep_until(at).await } }, if hold.is_some() => {
                    hold = None;
                }
                n = s.io.read_buf(&mut s.buf), if pending.is_none() && hold.is_none() => {
                    match n {
                        Ok(0) => return Err(stream_err("the walsender closed the connection", ErrorClass::Retry)),
                        Ok(n) if n < PACE_BELOW && paced.load(Ordering::Relaxed) => {
                            hold = Some(tokio::time::Instant::now() + PACE);
                            s.io.park().map_err(io_err("pausing reads from the walsender"))?;
                        }
                        Ok(_) => {}
                        Err(e) => return Err(io_err("reading from the walsender")(e)),
                    }
                }
            }
        }
    }
    .await;
    if let Err(e) = result {
        let _ = tx.send(Err(e)).await;
    }
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
