//! A tenant's queue from a shared slot's hub: a bounded channel, and past
//! it a durable spool on disk.
//!
//! ```text
//! hub ─► TenantQueue ──(room)──────────────────────────────► [channel] ─► tenant's driver
//!              └──(full for SPILL_AFTER, or no session)─► spool ─► feeder ─┘
//!                                                           │
//!                                                (synced marks: the slot may pass them)
//! ```
//!
//! While a tenant keeps up, its transactions go straight into its channel.
//! When its channel stays full (its target slower than the stream, stuck
//! behind a lock) or its session has ended (its target down), the hub
//! appends its events to its spool, `<checkpoint_dir>/<tenant>.spool/`, and
//! a feeder moves them into the channel in order as the tenant makes room.
//! Once the feeder has caught up, events go straight into the channel again.
//!
//! # Durability
//!
//! The spool is a sequence of segment files (`<seq>.seg`). Each holds
//! records framed with a CRC: event records (the batch body format of
//! [`crate::transport::codec`]) and *marks*. The hub writes a mark at most
//! a few times a second, between the tenant's transactions, and syncs the
//! file: a mark at position P says "every transaction of this tenant that
//! ended at or below P, and after this segment's start, is in this file".
//! A segment's start (its *valid-from* position V) is its first mark
//! written with no transaction open from before the segment (one the
//! channel had the beginning of).
//!
//! The tenant's hold on the slot ([`covered`]) is then its applied
//! position, extended through each segment whose V it reaches: the slot
//! moves past a tenant whose target is down while its spool takes the
//! changes. After a crash, or when the tenant attaches again, segments are
//! read back from the first one its progress reaches: a torn tail after the
//! last mark is cut off, streamed transactions open at that mark are
//! aborted (the slot sends them again from their start), and transactions
//! the target has are skipped. A segment whose every transaction the target
//! has (its last mark at or below the applied position) is deleted.
//!
//! A spool that reaches `[performance] spool_max_mb` pauses the tenant at
//! its next transaction boundary: the hub stops routing to it (the slot
//! then holds at its last mark) until the feeder has drained the spool to
//! half, then restarts the stream from the slot for it.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};

use crate::capture::TxEvent;
use crate::lsn::Lsn;
use crate::transport::codec::{Decoder, Encoder};

const MAGIC: &[u8; 8] = b"HTRSPL2\n";
/// Magic and sequence number.
const HEADER: u64 = 16;
const EVENTS: u8 = b'E';
const MARK: u8 = b'P';
/// Bytes of a record around its payload: kind, length, CRC.
const FRAME: u64 = 9;

/// Why an event could not be queued.
pub(super) enum Push {
    /// The channel is full and nothing is spilled: the caller may wait for
    /// room, or [`TenantQueue::spill`].
    Full(TxEvent),
    /// The tenant's session has ended and nothing is being spooled.
    Closed,
    /// The spool could not be written (the reason).
    Failed(String),
}

/// What [`TenantQueue::pause`] did.
pub(super) enum Pause {
    /// A transaction is open: call again after it.
    NotYet,
    /// The feeder caught up meanwhile: nothing to pause.
    Drained,
    /// Paused after a mark; these streamed transactions were aborted at
    /// the tenant.
    Paused(Vec<u32>),
}

/// A sync mark.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mark {
    position: Lsn,
    last_commit: Lsn,
    /// What the tenant's target had applied (flushed) when the mark was
    /// written, as far as the hub knew: a lower bound of its progress.
    applied: Lsn,
    /// No transaction begun before this segment is open here: the
    /// segment is whole from this position on.
    clean: bool,
    /// Streamed transactions open at this mark.
    streams: Vec<u32>,
}

impl Mark {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(29 + 4 * self.streams.len());
        b.extend_from_slice(&self.position.0.to_be_bytes());
        b.extend_from_slice(&self.last_commit.0.to_be_bytes());
        b.extend_from_slice(&self.applied.0.to_be_bytes());
        b.push(self.clean as u8);
        b.extend_from_slice(&(self.streams.len() as u32).to_be_bytes());
        for s in &self.streams {
            b.extend_from_slice(&s.to_be_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let u64_at = |i: usize| Some(u64::from_be_bytes(b.get(i..i + 8)?.try_into().ok()?));
        let u32_at = |i: usize| Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?));
        let n = u32_at(25)? as usize;
        if b.len() != 29 + 4 * n {
            return None;
        }
        Some(Self {
            position: Lsn(u64_at(0)?),
            last_commit: Lsn(u64_at(8)?),
            applied: Lsn(u64_at(16)?),
            clean: *b.get(24)? == 1,
            streams: (0..n).map(|i| u32_at(29 + 4 * i)).collect::<Option<_>>()?,
        })
    }
}

/// One record, framed: kind, length, payload, CRC of all three.
fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(payload.len() + FRAME as usize);
    b.push(kind);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_be_bytes());
    b
}

/// Read the record at `offset` (`None`: none there, torn or corrupt).
fn read_record(file: &File, offset: u64, end: u64) -> Option<(u8, Vec<u8>)> {
    if offset + FRAME > end {
        return None;
    }
    let mut head = [0u8; 5];
    file.read_exact_at(&mut head, offset).ok()?;
    let len = u32::from_be_bytes(head[1..5].try_into().ok()?) as u64;
    if offset + FRAME + len > end {
        return None;
    }
    let mut rest = vec![0u8; len as usize + 4];
    file.read_exact_at(&mut rest, offset + 5).ok()?;
    let (payload, crc) = rest.split_at(len as usize);
    let mut h = crc32fast::Hasher::new();
    h.update(&head);
    h.update(payload);
    if h.finalize().to_be_bytes() != crc {
        return None;
    }
    rest.truncate(len as usize);
    Some((head[0], rest))
}

/// A segment file as the hub and the feeder know it.
struct Segment {
    seq: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Bytes of whole records.
    written: u64,
    /// Its first clean mark's position (`None`: none yet).
    valid_from: Option<Lsn>,
    /// The last mark, and the offset right after it.
    mark: Option<(Mark, u64)>,
}

impl Segment {
    fn path_of(dir: &Path, seq: u64) -> PathBuf {
        dir.join(format!("{seq:016x}.seg"))
    }

    fn create(dir: &Path, seq: u64) -> std::io::Result<Self> {
        let path = Self::path_of(dir, seq);
        let file = crate::files::fresh(&path)?;
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&seq.to_be_bytes());
        file.write_all_at(&header, 0)?;
        Ok(Self::empty(path, seq, file))
    }

    /// A segment of `file` with nothing read from it yet.
    fn empty(path: PathBuf, seq: u64, file: File) -> Self {
        Self {
            seq,
            path,
            file: Arc::new(file),
            written: HEADER,
            valid_from: None,
            mark: None,
        }
    }

    /// Open a segment left on disk: its records up to the first torn or
    /// corrupt one, its marks.
    fn open(path: PathBuf, seq: u64) -> std::io::Result<Self> {
        let file = crate::files::existing(&path)?;
        let end = file.metadata()?.len();
        let mut header = [0u8; HEADER as usize];
        let ok = end >= HEADER
            && file.read_exact_at(&mut header, 0).is_ok()
            && &header[..8] == MAGIC
            && header[8..] == seq.to_be_bytes();
        let mut seg = Self::empty(path, seq, file);
        if !ok {
            return Ok(seg);
        }
        let mut at = HEADER;
        while let Some((kind, payload)) = read_record(&seg.file, at, end) {
            at += FRAME + payload.len() as u64;
            if kind == MARK {
                let Some(mark) = Mark::decode(&payload) else {
                    break;
                };
                if mark.clean && seg.valid_from.is_none() {
                    seg.valid_from = Some(mark.position);
                }
                seg.mark = Some((mark, at));
            }
        }
        seg.written = at;
        Ok(seg)
    }

    /// The segment as far as its last mark: a torn or unsynced tail cut
    /// off, streamed transactions open at the mark aborted (the slot
    /// sends them again from their start).
    fn cut_at_mark(&mut self) -> std::io::Result<()> {
        let Some((mark, at)) = self.mark.clone() else {
            return Ok(());
        };
        if at == self.written && mark.streams.is_empty() {
            return Ok(());
        }
        self.file.set_len(at)?;
        self.written = at;
        if !mark.streams.is_empty() {
            let mut encoder = Encoder::new();
            for &top in &mark.streams {
                encoder.event(&TxEvent::StreamAbort { top, xid: top });
            }
            let body = encoder.finish();
            let after = Mark {
                streams: Vec::new(),
                ..mark
            };
            self.write(&frame(EVENTS, &body))?;
            self.write(&frame(MARK, &after.encode()))?;
            self.mark = Some((after, self.written));
        }
        self.file.sync_data()
    }

    fn write(&mut self, record: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(record, self.written)?;
        self.written += record.len() as u64;
        Ok(())
    }

    /// Its span for the hold: (valid from, last mark).
    fn span(&self) -> Option<(Lsn, Lsn)> {
        Some((self.valid_from?, self.mark.as_ref()?.0.position))
    }
}

/// What a tenant's spool lets the slot release: `applied`, extended
/// through every segment whose start it reaches.
pub fn covered(applied: Lsn, spans: &[(Lsn, Lsn)]) -> Lsn {
    let mut at = applied;
    for &(from, to) in spans {
        if from > at {
            break;
        }
        at = at.max(to);
    }
    at
}

/// The segments of a spool directory, in order (read only: for the
/// start-up check of what the slot can still deliver).
pub fn spans_on_disk(dir: &Path) -> Vec<(Lsn, Lsn)> {
    segments_on_disk(dir)
        .into_iter()
        .filter_map(|(seq, path)| Segment::open(path, seq).ok()?.span())
        .collect()
}

fn segments_on_disk(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name();
            let seq = name.to_str()?.strip_suffix(".seg")?;
            Some((u64::from_str_radix(seq, 16).ok()?, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The writer's view of the segment being written: which transactions
/// are open in it.
struct Writing {
    encoder: Encoder,
    in_txn: bool,
    streams: HashSet<u32>,
    /// Open when the segment began (the channel has their beginning):
    /// until they end, the segment is not whole.
    inherited_txn: bool,
    inherited_streams: HashSet<u32>,
    /// Events written since the last mark.
    dirty: bool,
}

impl Writing {
    fn new(inherited_txn: bool, inherited_streams: HashSet<u32>) -> Self {
        Self {
            encoder: Encoder::new(),
            in_txn: inherited_txn,
            streams: inherited_streams.clone(),
            inherited_txn,
            inherited_streams,
            dirty: false,
        }
    }

    fn saw(&mut self, event: &TxEvent) {
        match event {
            TxEvent::Begin { .. } => self.in_txn = true,
            TxEvent::Commit { .. } => {
                self.in_txn = false;
                self.inherited_txn = false;
            }
            TxEvent::Streamed { top, .. } => {
                self.streams.insert(*top);
            }
            TxEvent::StreamCommit { top, .. } => {
                self.streams.remove(top);
                self.inherited_streams.remove(top);
            }
            TxEvent::StreamAbort { top, xid } if top == xid => {
                self.streams.remove(top);
                self.inherited_streams.remove(top);
            }
            _ => {}
        }
    }

    fn clean(&self) -> bool {
        !self.inherited_txn && self.inherited_streams.is_empty()
    }
}

#[derive(Default)]
struct State {
    /// New events go to the spool, and the feeder moves them on.
    active: bool,
    segments: VecDeque<Segment>,
    /// Bumped when the feeder is replaced (a session attached or left).
    feeder: u64,
    /// A spooled record could not be read back.
    failed: Option<String>,
    /// The queue is gone: its feeder stops.
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

/// Where a new feeder starts and what it skips.
#[derive(Clone, Copy)]
enum Feed {
    /// Goes on from the channel: everything, in order.
    Continue,
    /// A session attached: from the first segment, skipping what its
    /// target has (transactions committed at or below this position).
    Resume(Lsn),
}

/// The hub's end of a tenant's queue (it outlives the tenant's sessions).
pub(super) struct TenantQueue {
    dir: PathBuf,
    max_bytes: u64,
    shared: Arc<Shared>,
    tx: Option<mpsc::Sender<TxEvent>>,
    writing: Option<Writing>,
    next_seq: u64,
    /// The last transaction written to the spool.
    last_commit: Lsn,
}

impl TenantQueue {
    /// The queue of the spool in `dir`, as left on disk: segments the
    /// target's `applied` position does not reach are deleted, the others
    /// cut at their last mark. No session yet.
    pub(super) fn open(dir: PathBuf, max_bytes: u64, applied: Lsn) -> std::io::Result<Self> {
        Self::open_with(dir, max_bytes, Some(applied))
    }

    /// The spool in `dir` of a tenant whose target could not be asked
    /// (it has not attached since the node started): every segment is
    /// kept (its real progress may reach more than the marks say), each
    /// cut at its last mark. Returns the queue and the highest applied
    /// position its marks recorded (`None`: no spool, nothing known).
    pub(super) fn open_absent(
        dir: PathBuf,
        max_bytes: u64,
    ) -> std::io::Result<Option<(Self, Lsn)>> {
        let applied = segments_on_disk(&dir)
            .into_iter()
            .filter_map(|(seq, path)| Segment::open(path, seq).ok()?.mark.map(|(m, _)| m.applied))
            .max();
        let Some(applied) = applied.filter(|a| !a.is_zero()) else {
            return Ok(None);
        };
        Ok(Some((Self::open_with(dir, max_bytes, None)?, applied)))
    }

    /// `applied`: delete the segments it does not reach; `None`: keep all.
    fn open_with(dir: PathBuf, max_bytes: u64, applied: Option<Lsn>) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut segments = VecDeque::new();
        let mut reach = applied.unwrap_or(Lsn::ZERO);
        let mut last_commit = Lsn::ZERO;
        let mut next_seq = 1;
        for (seq, path) in segments_on_disk(&dir) {
            next_seq = seq + 1;
            let seg = Segment::open(path.clone(), seq)?;
            let keep = match (seg.span(), applied) {
                (Some((from, to)), Some(applied)) => from <= reach && to > applied,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if !keep {
                std::fs::remove_file(&path)?;
                continue;
            }
            let mut seg = seg;
            seg.cut_at_mark()?;
            if let Some((mark, _)) = &seg.mark {
                reach = reach.max(mark.position);
                last_commit = last_commit.max(mark.last_commit);
            }
            segments.push_back(seg);
        }
        // Everything read back is synced: new events are appended after it.
        let active = !segments.is_empty();
        let queue = Self {
            dir,
            max_bytes,
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    active,
                    segments,
                    ..State::default()
                }),
                more: Notify::new(),
            }),
            tx: None,
            writing: active.then(|| Writing::new(false, HashSet::new())),
            next_seq,
            last_commit,
        };
        Ok(queue)
    }

    /// Every segment has its span and `applied` reaches each in turn: the
    /// spool holds everything after `applied` that is not applied.
    pub(super) fn whole_from(&self, applied: Lsn) -> bool {
        let spans = self.spans();
        spans.len() == self.segments()
            && spans
                .iter()
                .try_fold(applied, |at, &(from, to)| {
                    (from <= at).then_some(at.max(to))
                })
                .is_some()
    }

    /// A session attached with its channel: spooled transactions after
    /// `applied_commit` go to it first.
    pub(super) fn attach(&mut self, tx: mpsc::Sender<TxEvent>, applied_commit: Lsn) {
        self.tx = Some(tx.clone());
        let generation = {
            let mut st = self.shared.lock();
            st.feeder += 1;
            st.feeder
        };
        let start = self.shared.lock().segments.front().map(|s| s.seq);
        tokio::spawn(feed(
            self.shared.clone(),
            tx,
            generation,
            Feed::Resume(applied_commit),
            start.unwrap_or(0),
        ));
    }

    /// A session is attached (its channel may have closed since).
    pub(super) fn has_session(&self) -> bool {
        self.tx.is_some()
    }

    /// The attached session's channel has closed.
    pub(super) fn session_ended(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.is_closed())
    }

    /// Segment files.
    pub(super) fn segments(&self) -> usize {
        self.shared.lock().segments.len()
    }

    /// Forget the ended session: its feeder stops.
    pub(super) fn detach(&mut self) {
        self.tx = None;
        self.shared.lock().feeder += 1;
        self.shared.more.notify_one();
    }

    /// Events go to the spool.
    pub(super) fn spooling(&self) -> bool {
        self.shared.lock().active
    }

    /// Queue `event` without waiting: into the spool while spooling, else
    /// into the channel while it has room.
    pub(super) fn try_push(&mut self, event: TxEvent) -> Result<(), Push> {
        {
            let shared = self.shared.clone();
            let mut st = shared.lock();
            if st.active {
                // Checked and written under one lock: the feeder cannot
                // stop spooling in between.
                let result = self.append(&mut st, &event);
                drop(st);
                self.shared.more.notify_one();
                return result;
            }
        }
        self.writing = None;
        let Some(tx) = &self.tx else {
            return Err(Push::Closed);
        };
        match tx.try_send(event) {
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
        async move { tx?.reserve_owned().await.ok() }
    }

    /// Start spooling with `event` (the channel stayed full): a new
    /// segment; `in_txn` and `streams` are what the channel has the
    /// beginning of.
    pub(super) fn spill(
        &mut self,
        event: TxEvent,
        in_txn: bool,
        streams: HashSet<u32>,
    ) -> Result<(), Push> {
        let shared = self.shared.clone();
        let mut st = shared.lock();
        if !st.active {
            self.begin_segment(&mut st, in_txn, streams)
                .map_err(|e| self.failed(e))?;
            st.active = true;
            // The feeder goes on from the channel into the new segment.
            if let Some(tx) = &self.tx {
                st.feeder += 1;
                let seq = st.segments.back().map_or(0, |s| s.seq);
                tokio::spawn(feed(
                    self.shared.clone(),
                    tx.clone(),
                    st.feeder,
                    Feed::Continue,
                    seq,
                ));
            }
        }
        let result = self.append(&mut st, &event);
        drop(st);
        self.shared.more.notify_one();
        result
    }

    /// The session ended with changes in its channel that may not have
    /// been applied: keep the spool's segments `reach` reaches, and spool
    /// from `reach` on (the caller restarts the stream from there).
    pub(super) fn respool_from(&mut self, reach: Lsn, applied: Lsn) -> Result<(), Push> {
        let shared = self.shared.clone();
        let mut st = shared.lock();
        let mut keep = VecDeque::new();
        // Transactions cut off here come again from the stream.
        self.last_commit = Lsn::ZERO;
        for mut seg in std::mem::take(&mut st.segments) {
            match seg.span() {
                Some((from, _)) if from <= reach => {
                    seg.cut_at_mark().map_err(|e| self.failed(e))?;
                    if let Some((mark, _)) = &seg.mark {
                        self.last_commit = self.last_commit.max(mark.last_commit);
                    }
                    keep.push_back(seg);
                }
                _ => {
                    let _ = std::fs::remove_file(&seg.path);
                }
            }
        }
        st.segments = keep;
        self.begin_segment(&mut st, false, HashSet::new())
            .map_err(|e| self.failed(e))?;
        st.active = true;
        // Whole from its start: the stream restarts at `reach`.
        self.mark(&mut st, reach, applied, true)
            .map_err(|e| self.failed(e))?;
        Ok(())
    }

    fn begin_segment(
        &mut self,
        st: &mut State,
        in_txn: bool,
        streams: HashSet<u32>,
    ) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let seg = Segment::create(&self.dir, self.next_seq)?;
        self.next_seq += 1;
        st.segments.push_back(seg);
        self.writing = Some(Writing::new(in_txn, streams));
        Ok(())
    }

    fn failed(&self, e: std::io::Error) -> Push {
        Push::Failed(format!("spool {}: {e}", self.dir.display()))
    }

    /// Append one record (`st`: the state, locked by the caller).
    fn append(&mut self, st: &mut State, event: &TxEvent) -> Result<(), Push> {
        let (Some(w), Some(seg)) = (self.writing.as_mut(), st.segments.back_mut()) else {
            return Err(Push::Failed("the spool is not open for writing".into()));
        };
        for relation in w.encoder.unsent_relations(event) {
            w.encoder.relation(&relation, &[]);
        }
        w.encoder.event(event);
        let body = w.encoder.finish();
        w.saw(event);
        w.dirty = true;
        if let TxEvent::Commit { commit_lsn, .. } | TxEvent::StreamCommit { commit_lsn, .. } = event
        {
            self.last_commit = self.last_commit.max(*commit_lsn);
        }
        let record = frame(EVENTS, &body);
        if let Err(e) = seg.write(&record) {
            let dir = self.dir.display();
            return Err(Push::Failed(format!("spool {dir}: {e}")));
        }
        Ok(())
    }

    /// Between the tenant's transactions, make what is spooled durable up
    /// to `position` (the stream's position for this tenant): write a
    /// mark and sync. Rolls to a new segment when this one is large.
    /// Returns whether a mark was written.
    pub(super) fn sync(&mut self, position: Lsn, applied: Lsn) -> Result<bool, Push> {
        let shared = self.shared.clone();
        let mut st = shared.lock();
        if !st.active {
            self.writing = None;
            return Ok(false);
        }
        let Some(w) = &self.writing else {
            return Ok(false);
        };
        let marked = st
            .segments
            .back()
            .and_then(|s| s.mark.as_ref())
            .map(|(m, _)| m.position);
        if w.in_txn || (!w.dirty && marked.is_some_and(|m| m >= position)) {
            return Ok(false);
        }
        let clean = w.clean();
        self.mark(&mut st, position, applied, clean)
            .map_err(|e| self.failed(e))?;
        // Roll over at a clean boundary, so segments can be deleted as
        // the tenant applies them.
        let roll = (self.max_bytes / 8).max(64 << 10);
        let w = self.writing.as_ref().expect("writing");
        if w.streams.is_empty() && st.segments.back().is_some_and(|s| s.written >= roll) {
            self.begin_segment(&mut st, false, HashSet::new())
                .map_err(|e| self.failed(e))?;
            self.mark(&mut st, position, applied, true)
                .map_err(|e| self.failed(e))?;
        }
        Ok(true)
    }

    fn mark(
        &mut self,
        st: &mut State,
        position: Lsn,
        applied: Lsn,
        clean: bool,
    ) -> std::io::Result<()> {
        let (Some(w), Some(seg)) = (self.writing.as_mut(), st.segments.back_mut()) else {
            return Ok(());
        };
        let mut streams: Vec<u32> = w.streams.iter().copied().collect();
        streams.sort_unstable();
        let mark = Mark {
            position,
            last_commit: self.last_commit,
            applied,
            clean,
            streams,
        };
        seg.write(&frame(MARK, &mark.encode()))?;
        seg.file.sync_data()?;
        if clean && seg.valid_from.is_none() {
            seg.valid_from = Some(position);
        }
        seg.mark = Some((mark, seg.written));
        w.dirty = false;
        Ok(())
    }

    /// Stop writing at a transaction boundary (the spool is full):
    /// streamed transactions open here are aborted at the tenant (the slot
    /// sends them again from their start), and a mark at `position` is
    /// synced.
    pub(super) fn pause(&mut self, position: Lsn, applied: Lsn) -> Result<Pause, Push> {
        if !self.spooling() {
            return Ok(Pause::Drained);
        }
        let Some(w) = self.writing.as_ref() else {
            return Ok(Pause::Drained);
        };
        if w.in_txn {
            return Ok(Pause::NotYet);
        }
        let mut aborted: Vec<u32> = w.streams.iter().copied().collect();
        aborted.sort_unstable();
        for &top in &aborted {
            self.try_push(TxEvent::StreamAbort { top, xid: top })?;
        }
        // The tenant records that it has everything up to here (other
        // tenants' transactions moved the position): once applied, its
        // spool can go and it resumes.
        self.try_push(TxEvent::Keepalive { wal_end: position })?;
        self.sync(position, applied)?;
        Ok(Pause::Paused(aborted))
    }

    /// Delete the segments the tenant has applied (`applied` at or past
    /// their last mark), except the one being written.
    pub(super) fn release(&mut self, applied: Lsn) {
        let mut st = self.shared.lock();
        let writing = st.active && self.writing.is_some();
        while st.segments.len() > usize::from(writing) {
            let Some(seg) = st.segments.front() else {
                break;
            };
            if seg.mark.as_ref().is_none_or(|(m, _)| m.position > applied) {
                break;
            }
            let _ = std::fs::remove_file(&seg.path);
            st.segments.pop_front();
        }
        if st.segments.is_empty() && !st.active {
            self.writing = None;
        }
    }

    /// Each segment's (valid from, last mark), in order, up to the first
    /// without them.
    pub(super) fn spans(&self) -> Vec<(Lsn, Lsn)> {
        self.shared
            .lock()
            .segments
            .iter()
            .map_while(Segment::span)
            .collect()
    }

    /// Bytes on disk.
    pub(super) fn bytes(&self) -> u64 {
        self.shared.lock().segments.iter().map(|s| s.written).sum()
    }

    pub(super) fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The last transaction in the spool.
    pub(super) fn last_commit(&self) -> Lsn {
        self.last_commit
    }

    /// Why the feeder stopped, if it failed.
    pub(super) fn failure(&self) -> Option<String> {
        self.shared.lock().failed.clone()
    }

    /// The tenant left the node: its spool goes.
    pub(super) fn remove(self) {
        let dir = self.dir.clone();
        drop(self);
        let _ = std::fs::remove_dir_all(dir);
    }
}

impl Drop for TenantQueue {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.more.notify_one();
    }
}

/// What a resuming feeder skips: transactions the target has.
struct Skip {
    /// Transactions committed at or below it are the target's.
    given: Lsn,
    /// Inside a regular transaction being given (`Some(true)`) or skipped.
    txn: Option<bool>,
    /// Streamed transactions some of whose changes were given.
    streams: HashSet<u32>,
}

impl Skip {
    /// The event to give for `event`, if any.
    fn filter(&mut self, event: TxEvent) -> Option<TxEvent> {
        match &event {
            TxEvent::Begin { final_lsn, .. } => {
                let give = *final_lsn > self.given;
                self.txn = Some(give);
                give.then_some(event)
            }
            TxEvent::Commit { commit_lsn, .. } => {
                let give = self.txn.take() == Some(true);
                if give {
                    self.given = self.given.max(*commit_lsn);
                }
                give.then_some(event)
            }
            TxEvent::Row(_) | TxEvent::Version(_) | TxEvent::Truncate { .. } => {
                (self.txn == Some(true)).then_some(event)
            }
            TxEvent::Streamed { top, .. } => {
                self.streams.insert(*top);
                Some(event)
            }
            TxEvent::StreamCommit {
                top, commit_lsn, ..
            } => {
                let top = *top;
                let opened = self.streams.remove(&top);
                if *commit_lsn <= self.given {
                    opened.then_some(TxEvent::StreamAbort { top, xid: top })
                } else {
                    self.given = *commit_lsn;
                    Some(event)
                }
            }
            TxEvent::StreamAbort { top, xid } => {
                let opened = self.streams.contains(top);
                if top == xid {
                    self.streams.remove(top);
                }
                opened.then_some(event)
            }
            TxEvent::Keepalive { .. } => self.txn.is_none().then_some(event),
        }
    }
}

/// Move spooled events into the channel, in order, as the tenant makes
/// room; stop spooling once caught up.
async fn feed(
    shared: Arc<Shared>,
    tx: mpsc::Sender<TxEvent>,
    generation: u64,
    mode: Feed,
    first_seq: u64,
) {
    let mut seq = first_seq;
    let mut offset = HEADER;
    let mut decoder = Decoder::new();
    let mut skip = match mode {
        Feed::Continue => None,
        Feed::Resume(given) => Some(Skip {
            given,
            txn: None,
            streams: HashSet::new(),
        }),
    };
    loop {
        let notified = shared.more.notified();
        let next = {
            let mut st = shared.lock();
            if st.closed || st.feeder != generation {
                return;
            }
            // The segment being read, or the next one (deleted ones were
            // applied).
            match st.segments.iter().position(|s| s.seq >= seq) {
                None => {
                    // Caught up (what it had not read was applied and
                    // deleted): events go straight to the channel.
                    st.active = false;
                    None
                }
                Some(i) => {
                    let seg = &st.segments[i];
                    if seg.seq != seq {
                        seq = seg.seq;
                        offset = HEADER;
                        decoder = Decoder::new();
                    }
                    if offset < seg.written {
                        Some((seg.file.clone(), seg.written))
                    } else if i + 1 < st.segments.len() {
                        // On to the next segment, from its start.
                        seq = st.segments[i + 1].seq;
                        offset = HEADER;
                        decoder = Decoder::new();
                        continue;
                    } else {
                        // Caught up: events go straight to the channel.
                        st.active = false;
                        None
                    }
                }
            }
        };
        let Some((file, written)) = next else {
            notified.await;
            continue;
        };
        while offset < written {
            let Some((kind, payload)) = read_record(&file, offset, written) else {
                shared.lock().failed = Some(format!(
                    "a spool record (segment {seq:016x}, offset {offset}) could not be read back"
                ));
                return;
            };
            offset += FRAME + payload.len() as u64;
            if kind != EVENTS {
                continue;
            }
            let decoded = match decoder.decode(payload.into()) {
                Ok(d) => d,
                Err(e) => {
                    shared.lock().failed =
                        Some(format!("a spool record (segment {seq:016x}): {e}"));
                    return;
                }
            };
            for event in decoded.events {
                let event = match &mut skip {
                    Some(skip) => match skip.filter(event) {
                        Some(e) => e,
                        None => continue,
                    },
                    None => event,
                };
                let Ok(permit) = tx.reserve().await else {
                    return;
                };
                permit.send(event);
            }
        }
    }
}

#[cfg(test)]
mod tests;
