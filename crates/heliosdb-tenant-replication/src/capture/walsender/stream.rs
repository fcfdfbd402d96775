//! The WAL stream: the socket task that reads CopyData into a bounded
//! queue, answers keepalives and sends status updates whatever the caller
//! does, and paces its reads while a backlog is read.

use super::*;

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
    pub(super) rx: mpsc::Receiver<Result<WalMessage>>,
    pub(super) acked: Arc<AtomicU64>,
    pub(super) paced: Arc<AtomicBool>,
    pub(super) stop: Option<oneshot::Sender<()>>,
    pub(super) task: Option<tokio::task::JoinHandle<()>>,
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

/// What the socket task shares with its [`WalStream`].
pub(super) struct Shared {
    /// The LSN to report as flushed.
    pub(super) acked: Arc<AtomicU64>,
    /// Pace reads ([`WalStream::pace_reads`]).
    pub(super) paced: Arc<AtomicBool>,
}

/// The socket task: frames to the queue, status updates on time, a reply
/// to every keepalive that asks for one, even while the queue is full.
pub(super) async fn copy_both(
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
