use std::time::Duration;

use super::*;

fn begin(lsn: u64) -> TxEvent {
    TxEvent::Begin {
        final_lsn: Lsn(lsn),
        commit_time_us: 0,
        xid: lsn as u32,
    }
}

fn change(tag: &str) -> TxEvent {
    TxEvent::Version(bytes::Bytes::from(tag.to_string()))
}

fn commit(lsn: u64) -> TxEvent {
    TxEvent::Commit {
        commit_lsn: Lsn(lsn),
        end_lsn: Lsn(lsn + 8),
        commit_time_us: 0,
    }
}

/// A transaction committing at `lsn` (ends at `lsn + 8`).
fn txn(lsn: u64) -> Vec<TxEvent> {
    vec![begin(lsn), change(&format!("t{lsn}")), commit(lsn)]
}

fn label(e: &TxEvent) -> String {
    match e {
        TxEvent::Begin { final_lsn, .. } => format!("B{}", final_lsn.0),
        TxEvent::Version(b) => String::from_utf8_lossy(b).into_owned(),
        TxEvent::Commit { commit_lsn, .. } => format!("C{}", commit_lsn.0),
        TxEvent::Streamed { top, event, .. } => format!("S{top}:{}", label(event)),
        TxEvent::StreamCommit { top, .. } => format!("SC{top}"),
        TxEvent::StreamAbort { top, xid } => format!("SA{top}/{xid}"),
        TxEvent::Keepalive { wal_end } => format!("K{}", wal_end.0),
        other => format!("{other:?}"),
    }
}

/// Everything that arrives within a moment.
async fn drain(rx: &mut mpsc::Receiver<TxEvent>) -> Vec<String> {
    let mut got = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        got.push(label(&e));
    }
    got
}

/// A parked queue (no session): every event goes to the spool.
fn parked(dir: &Path, max: u64) -> TenantQueue {
    let mut q = TenantQueue::open(dir.to_path_buf(), max, Lsn(0)).expect("open");
    q.respool_from(Lsn(0), Lsn(0)).ok().expect("respool");
    q
}

fn push_all(q: &mut TenantQueue, events: Vec<TxEvent>) {
    for e in events {
        assert!(q.try_push(e).is_ok(), "spooled");
    }
}

/// Events keep their order through the channel, the spool and back, and
/// once the feeder has caught up they go straight to the channel again.
#[tokio::test]
async fn events_keep_their_order_through_the_spool_and_back() {
    let dir = tempfile::tempdir().expect("dir");
    let spool = dir.path().join("t.spool");
    let (tx, mut rx) = mpsc::channel(2);
    let mut q = TenantQueue::open(spool.clone(), 1 << 20, Lsn(0)).expect("open");
    q.attach(tx, Lsn(0));
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
                    assert!(q.spill(e, false, HashSet::new()).is_ok());
                }
                Err(_) => panic!("refused"),
            }
        }
        while got.len() < ((round + 1) * 100) as usize {
            got.push(rx.recv().await.expect("event"));
        }
        // Caught up: the next event goes straight to the channel.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!q.spooling(), "the feeder caught up");
    }
    let expected: Vec<String> = (0..3u64)
        .flat_map(|r| (0..100).map(move |i| format!("K{}", r * 1000 + i)))
        .collect();
    assert_eq!(got.iter().map(label).collect::<Vec<_>>(), expected);
    assert!(spilled >= 3, "each round spilled");
}

/// What was synced survives a crash; what was not is cut off and comes
/// again from the slot; transactions the target has are skipped.
#[tokio::test]
async fn a_crash_keeps_what_was_synced_and_skips_what_the_target_has() {
    let dir = tempfile::tempdir().expect("dir");
    let spool = dir.path().join("t.spool");
    {
        let mut q = parked(&spool, 1 << 20);
        for lsn in [100, 200, 300] {
            push_all(&mut q, txn(lsn));
        }
        assert!(q.sync(Lsn(308), Lsn(0)).ok().expect("sync"));
        assert_eq!(q.spans(), vec![(Lsn(0), Lsn(308))]);
        // Written, never synced; then half a transaction.
        push_all(&mut q, txn(400));
        push_all(&mut q, vec![begin(500), change("t500")]);
        // A mark is only written between transactions.
        assert!(!q.sync(Lsn(408), Lsn(0)).ok().expect("sync"));
    } // "kill -9": nothing more is written

    // The target applied the first transaction.
    assert_eq!(
        covered(Lsn(108), &spans_on_disk(&spool)),
        Lsn(308),
        "the spool covers up to its last mark"
    );
    let mut q = TenantQueue::open(spool.clone(), 1 << 20, Lsn(108)).expect("reopen");
    assert_eq!(q.last_commit(), Lsn(300));
    let (tx, mut rx) = mpsc::channel(64);
    q.attach(tx, Lsn(100));
    assert_eq!(
        drain(&mut rx).await,
        ["B200", "t200", "C200", "B300", "t300", "C300"]
    );
    // New events follow what was read back.
    push_all(&mut q, txn(400));
    assert_eq!(drain(&mut rx).await, ["B400", "t400", "C400"]);

    // A spool its target does not reach is of no use: deleted.
    drop(q);
    let q = TenantQueue::open(spool.clone(), 1 << 20, Lsn(0)).expect("reopen");
    assert_eq!(q.spans(), vec![(Lsn(0), Lsn(308))], "from 0/0 it reaches");
    drop(q);
    std::fs::remove_dir_all(&spool).expect("rm");
    {
        let mut q = TenantQueue::open(spool.clone(), 1 << 20, Lsn(0)).expect("open");
        q.respool_from(Lsn(1000), Lsn(0)).ok().expect("respool");
        push_all(&mut q, txn(1100));
        q.sync(Lsn(1108), Lsn(0)).ok().expect("sync");
    }
    let q = TenantQueue::open(spool.clone(), 1 << 20, Lsn(500)).expect("reopen");
    assert!(q.spans().is_empty(), "starts at 1000, the target is at 500");
    assert_eq!(q.bytes(), 0);
}

/// A streamed transaction open at the last mark is aborted when the spool
/// is read back (the slot sends it again from its start).
#[tokio::test]
async fn streamed_transactions_open_at_the_mark_are_aborted_on_reading_back() {
    let dir = tempfile::tempdir().expect("dir");
    let spool = dir.path().join("t.spool");
    {
        let mut q = parked(&spool, 1 << 20);
        push_all(
            &mut q,
            vec![
                TxEvent::Streamed {
                    top: 7,
                    xid: 7,
                    event: Box::new(change("chunk")),
                },
                begin(100),
                change("t100"),
                commit(100),
            ],
        );
        q.sync(Lsn(108), Lsn(0)).ok().expect("sync");
    }
    let mut q = TenantQueue::open(spool.clone(), 1 << 20, Lsn(0)).expect("reopen");
    let (tx, mut rx) = mpsc::channel(64);
    q.attach(tx, Lsn(0));
    assert_eq!(
        drain(&mut rx).await,
        ["S7:chunk", "B100", "t100", "C100", "SA7/7"]
    );
}

/// A segment begun inside a transaction the channel has the start of is
/// not counted until that transaction has ended in it.
#[tokio::test]
async fn a_segment_begun_inside_a_transaction_counts_from_its_end() {
    let dir = tempfile::tempdir().expect("dir");
    let spool = dir.path().join("t.spool");
    let (tx, _rx) = mpsc::channel(1);
    let mut q = TenantQueue::open(spool.clone(), 1 << 20, Lsn(0)).expect("open");
    q.attach(tx, Lsn(0));
    assert!(q.try_push(begin(100)).is_ok());
    let Err(Push::Full(e)) = q.try_push(change("t100")) else {
        panic!("the channel holds one event");
    };
    assert!(q.spill(e, true, HashSet::new()).is_ok());
    assert!(
        !q.sync(Lsn(50), Lsn(0)).ok().expect("sync"),
        "inside a transaction"
    );
    push_all(&mut q, vec![commit(100)]);
    assert!(q.sync(Lsn(108), Lsn(0)).ok().expect("sync"));
    assert_eq!(q.spans(), vec![(Lsn(108), Lsn(108))]);
    push_all(&mut q, txn(200));
    q.sync(Lsn(208), Lsn(0)).ok().expect("sync");
    assert_eq!(q.spans(), vec![(Lsn(108), Lsn(208))]);
    assert_eq!(covered(Lsn(50), &q.spans()), Lsn(50), "not reached");
    assert_eq!(covered(Lsn(108), &q.spans()), Lsn(208));
}

/// Damaged bytes cut the spool at the last mark before them; nothing
/// panics, and what the marks say is all that counts.
#[tokio::test]
async fn damaged_bytes_cut_the_spool_at_the_mark_before_them() {
    let dir = tempfile::tempdir().expect("dir");
    let spool = dir.path().join("t.spool");
    {
        let mut q = parked(&spool, 1 << 20);
        push_all(&mut q, txn(100));
        q.sync(Lsn(108), Lsn(0)).ok().expect("sync");
        push_all(&mut q, txn(200));
        q.sync(Lsn(208), Lsn(0)).ok().expect("sync");
    }
    let (_, path) = segments_on_disk(&spool).pop().expect("a segment");
    let mut bytes = std::fs::read(&path).expect("read");
    let len = bytes.len();
    // A byte inside the second transaction's records.
    bytes[len - 60] ^= 0xff;
    std::fs::write(&path, &bytes).expect("write");
    assert_eq!(covered(Lsn(0), &spans_on_disk(&spool)), Lsn(108));
    let mut q = TenantQueue::open(spool.clone(), 1 << 20, Lsn(0)).expect("reopen");
    let (tx, mut rx) = mpsc::channel(64);
    q.attach(tx, Lsn(0));
    assert_eq!(drain(&mut rx).await, ["B100", "t100", "C100"]);

    // Any garbage: opened without a panic, nothing counted.
    for garbage in [&b""[..], b"HTRSPL1\n", &[0xffu8; 300][..]] {
        std::fs::write(&path, garbage).expect("write");
        assert!(spans_on_disk(&spool).is_empty());
    }
}

/// Segments roll over and go once applied; a full spool pauses at a
/// transaction boundary with its open streams aborted.
#[tokio::test]
async fn applied_segments_go_and_a_full_spool_pauses_at_a_boundary() {
    let dir = tempfile::tempdir().expect("dir");
    let spool = dir.path().join("t.spool");
    let max = 1 << 20;
    // Three segments of 4 kB transactions (each segment 1/8 of the limit).
    let fill = |q: &mut TenantQueue| {
        let big = "x".repeat(4000);
        let mut lsn = 100;
        while q.segments() < 3 {
            push_all(q, vec![begin(lsn), change(&big), commit(lsn)]);
            q.sync(Lsn(lsn + 8), Lsn(0)).ok().expect("sync");
            lsn += 100;
        }
        lsn
    };
    // A session reads every segment, in order.
    let mut q = parked(&dir.path().join("read.spool"), max);
    let end = fill(&mut q);
    let (tx, mut rx) = mpsc::channel(4096);
    q.attach(tx, Lsn(0));
    let got = drain(&mut rx).await;
    let commits: Vec<String> = got.iter().filter(|l| l.starts_with('C')).cloned().collect();
    let expected: Vec<String> = (1..end / 100).map(|i| format!("C{}", i * 100)).collect();
    assert_eq!(commits, expected);
    assert_eq!(got.len(), 3 * expected.len());

    let mut q = parked(&spool, max);
    let lsn = fill(&mut q);
    let spans = q.spans();
    assert_eq!(spans.len(), 3);
    assert_eq!(
        spans[1].0, spans[0].1,
        "each segment starts where the last ended"
    );
    let before = q.bytes();
    q.release(spans[0].1);
    assert_eq!(q.segments(), 2, "the applied segment went");
    assert!(q.bytes() < before);

    push_all(
        &mut q,
        vec![
            TxEvent::Streamed {
                top: 9,
                xid: 9,
                event: Box::new(change("chunk")),
            },
            begin(lsn),
        ],
    );
    assert!(matches!(q.pause(Lsn(lsn), Lsn(0)), Ok(Pause::NotYet)));
    push_all(&mut q, vec![commit(lsn)]);
    match q.pause(Lsn(lsn + 8), Lsn(0)) {
        Ok(Pause::Paused(aborted)) => assert_eq!(aborted, vec![9]),
        _ => panic!("paused"),
    }
    assert_eq!(q.spans().last().map(|s| s.1), Some(Lsn(lsn + 8)));
    q.remove();
    assert!(!spool.exists(), "a tenant that leaves takes its spool");
}

/// A tenant whose target cannot be asked (down since the node started):
/// its spool's marks say how far its target had applied, and every
/// segment is kept; its real progress then decides what the spool covers.
#[tokio::test]
async fn an_absent_tenant_is_known_from_its_marks_and_loses_no_segment() {
    let dir = tempfile::tempdir().expect("dir");
    let spool = dir.path().join("t.spool");
    assert!(TenantQueue::open_absent(spool.clone(), 1 << 20)
        .expect("open")
        .is_none());
    {
        let mut q = TenantQueue::open(spool.clone(), 1 << 20, Lsn(0)).expect("open");
        q.respool_from(Lsn(100), Lsn(100)).ok().expect("respool");
        push_all(&mut q, txn(200));
        q.sync(Lsn(208), Lsn(150)).ok().expect("sync");
        // A second segment that starts above what the first reaches.
        q.respool_from(Lsn(400), Lsn(160)).ok().expect("respool");
    }
    let (q, applied) = TenantQueue::open_absent(spool.clone(), 1 << 20)
        .expect("open")
        .expect("a spool");
    assert_eq!(
        applied,
        Lsn(160),
        "the highest applied position a mark recorded"
    );
    assert_eq!(
        q.segments(),
        2,
        "nothing deleted without the target's progress"
    );
    assert!(!q.whole_from(Lsn(160)), "400 is not reached from 208");
    assert!(q.whole_from(Lsn(400)));
    assert_eq!(covered(Lsn(160), &q.spans()), Lsn(208));
}
