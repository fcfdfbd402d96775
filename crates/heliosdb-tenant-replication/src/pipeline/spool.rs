//! A tenant's queue from a shared slot's hub: a bounded channel, and past
//! it a file.
//!
//! ```text
//! hub ─► TenantQueue ──(room)──────────────────────► [channel] ─► tenant's driver
//!              └──(full for SPILL_AFTER)─► spool file ─► feeder ─┘
//! ```
//!
//! While a tenant keeps up, its transactions go straight into its channel.
//! When its channel stays full (its target is slower than the stream, or
//! stuck behind a lock), the hub does not wait for it: its events are
//! appended to `<checkpoint_dir>/<tenant>.spool` (the batch body format of
//! [`crate::transport::codec`], one record per event), and a feeder task
//! moves them into the channel in order as the tenant makes room. Once the
//! feeder has caught up, events go straight into the channel again.
//!
//! The spool only decouples: it is not durable progress. The slot is still
//! acknowledged at what the tenant's target committed, so after a crash the
//! spooled events come again from the slot. A spool that reaches
//! `[performance] spool_max_mb` pauses the tenant (the hub detaches it; the
//! slot holds for it) until it attaches again.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};

use crate::capture::TxEvent;
use crate::transport::codec::{Decoder, Encoder};

/// Why an event could not be queued.
pub(super) enum Push {
    /// The channel is full and nothing is spilled: the caller may wait for
    /// room, or [`TenantQueue::spill`].
    Full(TxEvent),
    /// The tenant's session has ended.
    Closed,
    /// The spool reached its limit, or could not be written (the reason).
    SpoolFull(String),
}

#[derive(Default)]
struct State {
    /// Events go to the file, and the feeder moves them to the channel.
    active: bool,
    /// Bumped each time spilling starts afresh (a new file).
    generation: u64,
    /// The file of this generation (the feeder reads it at offsets).
    file: Option<Arc<File>>,
    /// Bytes of whole records written in this generation.
    written: u64,
    /// The queue was dropped: the feeder stops.
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    more: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The hub's end of a tenant's queue.
pub(super) struct TenantQueue {
    tx: mpsc::Sender<TxEvent>,
    shared: Arc<Shared>,
    path: PathBuf,
    max_bytes: u64,
    /// The spool being written (the hub's handle and encoder).
    writer: Option<(Arc<File>, Encoder)>,
}

impl TenantQueue {
    /// A queue into `tx` that spills to `path`; its feeder runs on the
    /// current runtime.
    pub(super) fn new(tx: mpsc::Sender<TxEvent>, path: PathBuf, max_bytes: u64) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            more: Notify::new(),
        });
        tokio::spawn(feed(shared.clone(), tx.clone()));
        Self {
            tx,
            shared,
            path,
            max_bytes,
            writer: None,
        }
    }

    /// Queue `event` without waiting: into the channel while it has room
    /// and nothing is spilled, into the spool while spilling.
    pub(super) fn try_push(&mut self, event: TxEvent) -> Result<(), Push> {
        {
            let shared = self.shared.clone();
            let mut st = shared.lock();
            if st.active {
                // Checked and written under one lock: the feeder cannot
                // stop spilling in between.
                let result = self.append(&mut st, event);
                drop(st);
                self.shared.more.notify_one();
                return result;
            }
        }
        match self.tx.try_send(event) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(event)) => Err(Push::Full(event)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Push::Closed),
        }
    }

    /// Wait for room in the channel (the caller bounds the wait).
    pub(super) fn reserve(
        &self,
    ) -> impl std::future::Future<Output = Option<mpsc::OwnedPermit<TxEvent>>> {
        let tx = self.tx.clone();
        async move { tx.reserve_owned().await.ok() }
    }

    /// Start spilling with `event` (the channel stayed full).
    pub(super) fn spill(&mut self, event: TxEvent) -> Result<(), Push> {
        let shared = self.shared.clone();
        let mut st = shared.lock();
        if !st.active {
            let file = crate::files::fresh(&self.path)
                .map_err(|e| Push::SpoolFull(format!("spool file {}: {e}", self.path.display())))?;
            let file = Arc::new(file);
            st.active = true;
            st.generation += 1;
            st.file = Some(file.clone());
            st.written = 0;
            self.writer = Some((file, Encoder::new()));
        }
        let result = self.append(&mut st, event);
        drop(st);
        self.shared.more.notify_one();
        result
    }

    /// Append one record (`st`: the state, locked by the caller).
    fn append(&mut self, st: &mut State, event: TxEvent) -> Result<(), Push> {
        let Some((file, encoder)) = self.writer.as_mut() else {
            return Err(Push::SpoolFull("the spool file is not open".into()));
        };
        for relation in encoder.unsent_relations(&event) {
            encoder.relation(&relation, &[]);
        }
        encoder.event(&event);
        let body = encoder.finish();
        let at = st.written;
        if at + 4 + body.len() as u64 > self.max_bytes {
            return Err(Push::SpoolFull(format!(
                "its spool reached [performance] spool_max_mb ({} MB)",
                self.max_bytes >> 20
            )));
        }
        let written = file
            .write_all_at(&(body.len() as u32).to_be_bytes(), at)
            .and_then(|()| file.write_all_at(&body, at + 4));
        if let Err(e) = written {
            return Err(Push::SpoolFull(format!(
                "spool file {}: {e}",
                self.path.display()
            )));
        }
        st.written = at + 4 + body.len() as u64;
        Ok(())
    }
}

impl Drop for TenantQueue {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.more.notify_one();
        if self.writer.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Move spilled events into the channel, in order, as the tenant makes
/// room; stop spilling once caught up.
async fn feed(shared: Arc<Shared>, tx: mpsc::Sender<TxEvent>) {
    let mut generation = 0;
    let mut offset = 0u64;
    let mut decoder = Decoder::new();
    loop {
        let notified = shared.more.notified();
        let next = {
            let mut st = shared.lock();
            if st.closed {
                return;
            }
            if !st.active {
                None
            } else {
                if st.generation != generation {
                    generation = st.generation;
                    offset = 0;
                    decoder = Decoder::new();
                }
                if offset == st.written {
                    // Caught up: events go straight to the channel again,
                    // and the file gives its space back.
                    st.active = false;
                    if let Some(file) = st.file.take() {
                        let _ = file.set_len(0);
                    }
                    None
                } else {
                    Some((st.file.clone(), st.written))
                }
            }
        };
        let Some((file, written)) = next else {
            notified.await;
            continue;
        };
        let Some(file) = file else { return };
        while offset < written {
            let mut len = [0u8; 4];
            if file.read_exact_at(&mut len, offset).is_err() {
                return;
            }
            let len = u32::from_be_bytes(len) as u64;
            let mut body = vec![0u8; len as usize];
            if file.read_exact_at(&mut body, offset + 4).is_err() {
                return;
            }
            offset += 4 + len;
            let Ok(decoded) = decoder.decode(body.into()) else {
                tracing::error!(
                    "a spool record could not be read back; the tenant restarts from the slot"
                );
                return;
            };
            for event in decoded.events {
                let Ok(permit) = tx.reserve().await else {
                    return;
                };
                permit.send(event);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    fn position(e: &TxEvent) -> u64 {
        match e {
            TxEvent::Keepalive { wal_end } => wal_end.0,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Events keep their order through the channel, the spool and back;
    /// a full spool is refused; the file is removed with the queue.
    #[tokio::test]
    async fn events_keep_their_order_through_the_spool_and_back() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("t.spool");
        let (tx, mut rx) = mpsc::channel(2);
        let mut q = TenantQueue::new(tx, path.clone(), 1 << 20);
        let mut spilled = 0;
        let mut got = Vec::new();
        for round in 0..3u64 {
            for i in 0..100u64 {
                let e = TxEvent::Keepalive {
                    wal_end: Lsn(round * 1000 + i),
                };
                match q.try_push(e) {
                    Ok(()) => {}
                    Err(Push::Full(e)) => {
                        spilled += 1;
                        assert!(q.spill(e).is_ok());
                    }
                    Err(_) => panic!("refused"),
                }
            }
            // The consumer drains everything: the spool empties and events
            // go straight to the channel again.
            while got.len() < ((round + 1) * 100) as usize {
                got.push(position(&rx.recv().await.expect("event")));
            }
            assert_eq!(std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0), 0);
        }
        let expected: Vec<u64> = (0..3u64)
            .flat_map(|r| (0..100).map(move |i| r * 1000 + i))
            .collect();
        assert_eq!(got, expected);
        assert!(spilled >= 3, "each round spilled");

        let (tx, _rx) = mpsc::channel(1);
        let mut q = TenantQueue::new(tx, path.clone(), 64);
        let mut refused = false;
        for i in 0..100 {
            let e = TxEvent::Keepalive { wal_end: Lsn(i) };
            match q.try_push(e) {
                Ok(()) => {}
                Err(Push::Full(e)) => {
                    if let Err(Push::SpoolFull(why)) = q.spill(e) {
                        assert!(why.contains("spool_max_mb"), "{why}");
                        refused = true;
                        break;
                    }
                }
                Err(Push::SpoolFull(why)) => {
                    assert!(why.contains("spool_max_mb"), "{why}");
                    refused = true;
                    break;
                }
                Err(Push::Closed) => panic!("closed"),
            }
        }
        assert!(refused, "a 64-byte spool fills");
        drop(q);
        assert!(!path.exists(), "the spool goes with its queue");
    }
}
