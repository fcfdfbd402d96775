//! The plain body of a batch: the tenant's transaction events in commit
//! order, before sealing (and after opening).
//!
//! ```text
//! record := 'R' relation | 'B' begin | 'I' | 'U' | 'D' row | 'V' version | 'T' truncate | 'C' commit
//!         | 'X' streamed | 'c' stream_commit | 'A' stream_abort | 'K' keepalive
//! relation := id u32, namespace str, name str, replica_identity u8,
//!             ncols u16, (is_key u8, name str, type_oid u32, typmod i32)*,
//!             nsource u16, (name str, type str, has_missing u8, [missing str], has_default u8)*
//! begin    := final_lsn u64, commit_time i64, xid u32
//! 'I'      := relation u32, tuple          'D' := relation u32, tuple
//! 'U'      := relation u32, has_old u8, [tuple], tuple
//! version  := len u32, bytes (the source trigger's message, as sent)
//! truncate := flags u8 (1 cascade, 2 restart identity), n u16, relation u32 * n
//! commit   := commit_lsn u64, end_lsn u64, commit_time i64
//! streamed := top u32, xid u32, then one 'I' | 'U' | 'D' | 'T' | 'V' record (a change of
//!             in-progress transaction top, made by its (sub)transaction xid)
//! stream_commit := top u32, commit_lsn u64, end_lsn u64, commit_time i64
//! stream_abort  := top u32, xid u32
//! keepalive     := wal_end u64 (nothing of the tenant is pending before it: the apply node
//!                  records it as where streaming resumes, and answers it as committed)
//! tuple    := n u16, ('n' | 'u' | 't' len u32 bytes | 'b' len u32 bytes)*
//! str      := len u32, UTF-8 bytes
//! ```
//!
//! A relation record precedes the first row of that relation in a session
//! (and follows every definition change); it carries the source catalog's
//! view of the table, which an apply node needs to reconcile a schema change
//! without a source connection. The decoder reads bytes that were
//! authenticated by the envelope but are still checked like outside bytes:
//! it never panics and never allocates more than the input could describe.
//!
//! (~680 lines, of which ~190 are its tests: the encoder and decoder of one
//! format stay side by side.)

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::apply::schema::SourceColumn;
use crate::capture::pgoutput::{ColumnDesc, RelationDesc, Tuple, Value};
use crate::capture::{RowChange, RowOp, TxEvent};
use crate::lsn::Lsn;

/// A batch body that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("batch body: {0}")]
pub struct CodecError(pub String);

/// What a decoded batch holds.
#[derive(Debug, Default)]
pub struct Decoded {
    pub events: Vec<TxEvent>,
    /// Source definitions of the relations described in this batch.
    pub source_columns: Vec<(u32, Vec<SourceColumn>)>,
}

/// Builds one batch body. Remembers which relation definitions the apply
/// side has seen in this session.
#[derive(Default)]
pub struct Encoder {
    buf: BytesMut,
    sent: HashMap<u32, Arc<RelationDesc>>,
    events: u32,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Events (row changes and truncates) in the current body.
    pub fn events(&self) -> u32 {
        self.events
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Relations whose definition the apply side has not seen yet.
    pub fn unsent_relations(&self, event: &TxEvent) -> Vec<Arc<RelationDesc>> {
        let fresh = |r: &Arc<RelationDesc>| {
            !self
                .sent
                .get(&r.id)
                .is_some_and(|seen| Arc::ptr_eq(seen, r))
        };
        match event {
            TxEvent::Streamed { event, .. } => self.unsent_relations(event),
            TxEvent::Row(c) if fresh(&c.relation) => vec![c.relation.clone()],
            TxEvent::Truncate { relations, .. } => {
                relations.iter().filter(|r| fresh(r)).cloned().collect()
            }
            _ => Vec::new(),
        }
    }

    /// Describe a relation (with the source catalog's columns) before rows
    /// that use it.
    pub fn relation(&mut self, rel: &Arc<RelationDesc>, source: &[SourceColumn]) {
        let b = &mut self.buf;
        b.put_u8(b'R');
        b.put_u32(rel.id);
        put_str(b, &rel.namespace);
        put_str(b, &rel.name);
        b.put_u8(rel.replica_identity);
        b.put_u16(rel.columns.len() as u16);
        for c in &rel.columns {
            b.put_u8(c.is_key as u8);
            put_str(b, &c.name);
            b.put_u32(c.type_oid);
            b.put_i32(c.type_modifier);
        }
        b.put_u16(source.len() as u16);
        for c in source {
            put_str(b, &c.name);
            put_str(b, &c.type_name);
            match &c.missing_value {
                Some(v) => {
                    b.put_u8(1);
                    put_str(b, v);
                }
                None => b.put_u8(0),
            }
            b.put_u8(c.has_default as u8);
        }
        self.sent.insert(rel.id, rel.clone());
    }

    /// Append one event (its relations must have been described).
    pub fn event(&mut self, ev: &TxEvent) {
        let b = &mut self.buf;
        match ev {
            TxEvent::Begin {
                final_lsn,
                commit_time_us,
                xid,
            } => {
                b.put_u8(b'B');
                b.put_u64(final_lsn.0);
                b.put_i64(*commit_time_us);
                b.put_u32(*xid);
            }
            TxEvent::Row(RowChange { relation, op }) => {
                self.events += 1;
                match op {
                    RowOp::Insert { new } => {
                        b.put_u8(b'I');
                        b.put_u32(relation.id);
                        put_tuple(b, new);
                    }
                    RowOp::Update { old, new } => {
                        b.put_u8(b'U');
                        b.put_u32(relation.id);
                        match old {
                            Some(o) => {
                                b.put_u8(1);
                                put_tuple(b, o);
                            }
                            None => b.put_u8(0),
                        }
                        put_tuple(b, new);
                    }
                    RowOp::Delete { old } => {
                        b.put_u8(b'D');
                        b.put_u32(relation.id);
                        put_tuple(b, old);
                    }
                }
            }
            TxEvent::Truncate {
                relations,
                cascade,
                restart_identity,
            } => {
                self.events += 1;
                b.put_u8(b'T');
                b.put_u8(*cascade as u8 | (*restart_identity as u8) << 1);
                b.put_u16(relations.len() as u16);
                for r in relations {
                    b.put_u32(r.id);
                }
            }
            TxEvent::Commit {
                commit_lsn,
                end_lsn,
                commit_time_us,
            } => {
                b.put_u8(b'C');
                b.put_u64(commit_lsn.0);
                b.put_u64(end_lsn.0);
                b.put_i64(*commit_time_us);
            }
            TxEvent::Version(content) => {
                b.put_u8(b'V');
                b.put_u32(content.len() as u32);
                b.put_slice(content);
            }
            TxEvent::Streamed { top, xid, event } => {
                b.put_u8(b'X');
                b.put_u32(*top);
                b.put_u32(*xid);
                self.event(event);
            }
            TxEvent::StreamCommit {
                top,
                commit_lsn,
                end_lsn,
                commit_time_us,
            } => {
                b.put_u8(b'c');
                b.put_u32(*top);
                b.put_u64(commit_lsn.0);
                b.put_u64(end_lsn.0);
                b.put_i64(*commit_time_us);
            }
            TxEvent::StreamAbort { top, xid } => {
                b.put_u8(b'A');
                b.put_u32(*top);
                b.put_u32(*xid);
            }
            TxEvent::Keepalive { wal_end } => {
                b.put_u8(b'K');
                b.put_u64(wal_end.0);
            }
        }
    }

    /// Take the body built so far; relation knowledge stays.
    pub fn finish(&mut self) -> Bytes {
        self.events = 0;
        self.buf.split().freeze()
    }
}

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_u32(s.len() as u32);
    b.put_slice(s.as_bytes());
}

fn put_tuple(b: &mut BytesMut, t: &Tuple) {
    b.put_u16(t.len() as u16);
    for v in t {
        match v {
            Value::Null => b.put_u8(b'n'),
            Value::UnchangedToast => b.put_u8(b'u'),
            Value::Text(x) => {
                b.put_u8(b't');
                b.put_u32(x.len() as u32);
                b.put_slice(x);
            }
            Value::Binary(x) => {
                b.put_u8(b'b');
                b.put_u32(x.len() as u32);
                b.put_slice(x);
            }
        }
    }
}

/// Decodes batch bodies of one session (relations persist across batches).
#[derive(Default)]
pub struct Decoder {
    relations: HashMap<u32, Arc<RelationDesc>>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn decode(&mut self, body: Bytes) -> Result<Decoded, CodecError> {
        let mut r = Reader(body);
        let mut out = Decoded::default();
        // The (top, xid) of a streamed record whose change comes next.
        let mut wrap: Option<(u32, u32)> = None;
        while r.0.has_remaining() {
            let tag = r.u8("record tag")?;
            if wrap.is_some() && !matches!(tag, b'I' | b'U' | b'D' | b'T' | b'V') {
                return Err(CodecError(format!(
                    "a streamed record wraps record tag 0x{tag:02x}, not a change"
                )));
            }
            match tag {
                b'X' => {
                    wrap = Some((r.u32("streamed top xid")?, r.u32("streamed xid")?));
                    continue;
                }
                b'c' => out.events.push(TxEvent::StreamCommit {
                    top: r.u32("stream commit xid")?,
                    commit_lsn: Lsn(r.u64("commit lsn")?),
                    end_lsn: Lsn(r.u64("end lsn")?),
                    commit_time_us: r.u64("commit time")? as i64,
                }),
                b'A' => out.events.push(TxEvent::StreamAbort {
                    top: r.u32("stream abort xid")?,
                    xid: r.u32("stream abort subxid")?,
                }),
                b'K' => out.events.push(TxEvent::Keepalive {
                    wal_end: Lsn(r.u64("keepalive lsn")?),
                }),
                b'R' => {
                    let (rel, source) = r.relation()?;
                    out.source_columns.push((rel.id, source));
                    self.relations.insert(rel.id, Arc::new(rel));
                }
                b'B' => out.events.push(TxEvent::Begin {
                    final_lsn: Lsn(r.u64("begin lsn")?),
                    commit_time_us: r.u64("begin time")? as i64,
                    xid: r.u32("xid")?,
                }),
                b'I' => {
                    let relation = self.relation(r.u32("relation")?)?;
                    let new = r.tuple()?;
                    out.events.push(TxEvent::Row(RowChange {
                        relation,
                        op: RowOp::Insert { new },
                    }));
                }
                b'U' => {
                    let relation = self.relation(r.u32("relation")?)?;
                    let old = match r.u8("old flag")? {
                        0 => None,
                        1 => Some(r.tuple()?),
                        f => return Err(CodecError(format!("invalid old-image flag {f}"))),
                    };
                    let new = r.tuple()?;
                    out.events.push(TxEvent::Row(RowChange {
                        relation,
                        op: RowOp::Update { old, new },
                    }));
                }
                b'D' => {
                    let relation = self.relation(r.u32("relation")?)?;
                    let old = r.tuple()?;
                    out.events.push(TxEvent::Row(RowChange {
                        relation,
                        op: RowOp::Delete { old },
                    }));
                }
                b'T' => {
                    let flags = r.u8("truncate flags")?;
                    let n = r.u16("truncate count")? as usize;
                    r.need(n * 4, "truncate relations")?;
                    let mut relations = Vec::with_capacity(n);
                    for _ in 0..n {
                        relations.push(self.relation(r.u32("relation")?)?);
                    }
                    out.events.push(TxEvent::Truncate {
                        relations,
                        cascade: flags & 1 != 0,
                        restart_identity: flags & 2 != 0,
                    });
                }
                b'V' => out.events.push(TxEvent::Version(r.bytes("version")?)),
                b'C' => out.events.push(TxEvent::Commit {
                    commit_lsn: Lsn(r.u64("commit lsn")?),
                    end_lsn: Lsn(r.u64("end lsn")?),
                    commit_time_us: r.u64("commit time")? as i64,
                }),
                other => return Err(CodecError(format!("unknown record tag 0x{other:02x}"))),
            }
            if let Some((top, xid)) = wrap.take() {
                // The change just decoded (each of those tags pushes one).
                if let Some(event) = out.events.pop() {
                    out.events.push(TxEvent::Streamed {
                        top,
                        xid,
                        event: Box::new(event),
                    });
                }
            }
        }
        if wrap.is_some() {
            return Err(CodecError("a streamed record without its change".into()));
        }
        Ok(out)
    }

    fn relation(&self, id: u32) -> Result<Arc<RelationDesc>, CodecError> {
        self.relations
            .get(&id)
            .cloned()
            .ok_or_else(|| CodecError(format!("row of relation {id}, which was not described")))
    }
}

struct Reader(Bytes);

impl Reader {
    fn need(&self, n: usize, what: &str) -> Result<(), CodecError> {
        if self.0.remaining() < n {
            return Err(CodecError(format!("truncated while reading {what}")));
        }
        Ok(())
    }

    fn u8(&mut self, what: &str) -> Result<u8, CodecError> {
        self.need(1, what)?;
        Ok(self.0.get_u8())
    }

    fn u16(&mut self, what: &str) -> Result<u16, CodecError> {
        self.need(2, what)?;
        Ok(self.0.get_u16())
    }

    fn u32(&mut self, what: &str) -> Result<u32, CodecError> {
        self.need(4, what)?;
        Ok(self.0.get_u32())
    }

    fn u64(&mut self, what: &str) -> Result<u64, CodecError> {
        self.need(8, what)?;
        Ok(self.0.get_u64())
    }

    fn bytes(&mut self, what: &str) -> Result<Bytes, CodecError> {
        let n = self.u32(what)? as usize;
        self.need(n, what)?;
        Ok(self.0.split_to(n))
    }

    fn str(&mut self, what: &str) -> Result<String, CodecError> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| CodecError(format!("{what} is not UTF-8")))
    }

    fn tuple(&mut self) -> Result<Tuple, CodecError> {
        let n = self.u16("column count")? as usize;
        // Each value takes at least one byte.
        self.need(n, "row values")?;
        let mut t = Vec::with_capacity(n);
        for _ in 0..n {
            t.push(match self.u8("value kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => Value::Text(self.bytes("text value")?),
                b'b' => Value::Binary(self.bytes("binary value")?),
                k => return Err(CodecError(format!("invalid value kind 0x{k:02x}"))),
            });
        }
        Ok(t)
    }

    fn relation(&mut self) -> Result<(RelationDesc, Vec<SourceColumn>), CodecError> {
        let id = self.u32("relation id")?;
        let namespace = self.str("schema name")?;
        let name = self.str("table name")?;
        let replica_identity = self.u8("replica identity")?;
        let n = self.u16("column count")? as usize;
        self.need(n * 13, "columns")?;
        let mut columns = Vec::with_capacity(n);
        for _ in 0..n {
            columns.push(ColumnDesc {
                is_key: self.u8("key flag")? != 0,
                name: self.str("column name")?,
                type_oid: self.u32("type oid")?,
                type_modifier: self.u32("type modifier")? as i32,
            });
        }
        let ns = self.u16("source column count")? as usize;
        self.need(ns * 10, "source columns")?;
        let mut source = Vec::with_capacity(ns);
        for _ in 0..ns {
            let name = self.str("source column name")?;
            let type_name = self.str("source column type")?;
            let missing_value = match self.u8("missing flag")? {
                0 => None,
                _ => Some(self.str("missing value")?),
            };
            let has_default = self.u8("default flag")? != 0;
            source.push(SourceColumn {
                name,
                type_name,
                missing_value,
                has_default,
            });
        }
        Ok((
            RelationDesc {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            },
            source,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rel(id: u32) -> Arc<RelationDesc> {
        Arc::new(RelationDesc {
            id,
            namespace: "public".into(),
            name: format!("t{id}"),
            replica_identity: b'd',
            columns: vec![
                ColumnDesc {
                    is_key: true,
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                },
                ColumnDesc {
                    is_key: false,
                    name: "v".into(),
                    type_oid: 25,
                    type_modifier: -1,
                },
            ],
        })
    }

    fn encode(enc: &mut Encoder, events: &[TxEvent]) -> Bytes {
        for ev in events {
            for r in enc.unsent_relations(ev) {
                let src = vec![SourceColumn {
                    name: "v".into(),
                    type_name: "text".into(),
                    missing_value: Some("x".into()),
                    has_default: true,
                }];
                enc.relation(&r, &src);
            }
            enc.event(ev);
        }
        enc.finish()
    }

    fn same(a: &TxEvent, b: &TxEvent) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    #[test]
    fn every_event_kind_round_trips_and_relations_are_sent_once_per_session() {
        let r1 = rel(1);
        let text = |s: &str| Value::Text(Bytes::copy_from_slice(s.as_bytes()));
        let events = vec![
            TxEvent::Begin {
                final_lsn: Lsn(100),
                commit_time_us: -5,
                xid: 7,
            },
            TxEvent::Version(Bytes::from_static(b"{\"tenant\":\"t\"}")),
            TxEvent::Row(RowChange {
                relation: r1.clone(),
                op: RowOp::Insert {
                    new: vec![text("1"), Value::Null],
                },
            }),
            TxEvent::Row(RowChange {
                relation: r1.clone(),
                op: RowOp::Update {
                    old: Some(vec![text("1"), Value::Null]),
                    new: vec![text("2"), Value::UnchangedToast],
                },
            }),
            TxEvent::Row(RowChange {
                relation: r1.clone(),
                op: RowOp::Delete {
                    old: vec![text("2"), Value::Binary(Bytes::from_static(b"\0\xff"))],
                },
            }),
            TxEvent::Truncate {
                relations: vec![r1.clone(), rel(2)],
                cascade: true,
                restart_identity: false,
            },
            TxEvent::Commit {
                commit_lsn: Lsn(100),
                end_lsn: Lsn(130),
                commit_time_us: 99,
            },
        ];
        let mut enc = Encoder::new();
        let body = encode(&mut enc, &events);
        let mut dec = Decoder::new();
        let got = dec.decode(body).expect("decodes");
        assert_eq!(got.events.len(), events.len());
        for (a, b) in got.events.iter().zip(&events) {
            assert!(same(a, b), "{a:?} != {b:?}");
        }
        assert_eq!(got.source_columns.len(), 2);
        assert_eq!(
            got.source_columns[0].1[0].missing_value.as_deref(),
            Some("x")
        );
        // The next batch of the same session does not describe r1 again.
        let second = encode(&mut enc, &events[2..3]);
        assert_eq!(second[0], b'I');
        assert!(dec.decode(second).is_ok());
        // A new session (decoder) must be told: a row of an unknown relation is an error.
        let mut fresh = Decoder::new();
        assert!(fresh.decode(encode(&mut enc, &events[2..3])).is_err());
    }

    #[test]
    fn streamed_events_round_trip_and_a_dangling_wrapper_is_an_error() {
        let r1 = rel(1);
        let row = TxEvent::Row(RowChange {
            relation: r1,
            op: RowOp::Insert {
                new: vec![Value::Text(Bytes::from_static(b"1")), Value::Null],
            },
        });
        let events = vec![
            TxEvent::Streamed {
                top: 9,
                xid: 11,
                event: Box::new(row),
            },
            TxEvent::Streamed {
                top: 9,
                xid: 9,
                event: Box::new(TxEvent::Version(Bytes::from_static(b"{}"))),
            },
            TxEvent::StreamAbort { top: 9, xid: 11 },
            TxEvent::StreamCommit {
                top: 9,
                commit_lsn: Lsn(500),
                end_lsn: Lsn(530),
                commit_time_us: 7,
            },
            TxEvent::Keepalive { wal_end: Lsn(600) },
        ];
        let mut enc = Encoder::new();
        let body = encode(&mut enc, &events);
        let got = Decoder::new().decode(body.clone()).expect("decodes");
        assert_eq!(got.events.len(), events.len());
        for (a, b) in got.events.iter().zip(&events) {
            assert!(same(a, b), "{a:?} != {b:?}");
        }
        // A wrapper must be followed by a change, not a commit or nothing.
        for bad in [
            &b"X\0\0\0\x09\0\0\0\x09"[..],
            b"X\0\0\0\x09\0\0\0\x09A\0\0\0\x01\0\0\0\x01",
        ] {
            assert!(Decoder::new().decode(Bytes::copy_from_slice(bad)).is_err());
        }
        // Every truncation is an error, never a panic.
        for n in 0..body.len() {
            let _ = Decoder::new().decode(body.slice(..n));
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Decoder::new().decode(Bytes::from(data));
        }

        #[test]
        fn every_truncation_of_a_valid_body_is_an_error(cut in 0usize..200) {
            let r1 = rel(1);
            let mut enc = Encoder::new();
            let body = encode(&mut enc, &[TxEvent::Row(RowChange {
                relation: r1.clone(),
                op: RowOp::Insert { new: vec![Value::Text(Bytes::from_static(b"42")), Value::Null] },
            })]);
            // Record boundaries: empty, after the relation record.
            let mut rel_only = Encoder::new();
            rel_only.relation(&r1, &[SourceColumn {
                name: "v".into(),
                type_name: "text".into(),
                missing_value: Some("x".into()),
                has_default: true,
            }]);
            let boundary = rel_only.finish().len();
            let cut = cut % body.len();
            prop_assert!(Decoder::new().decode(body.slice(..cut)).is_err() || cut == 0 || cut == boundary);
        }
    }
}
