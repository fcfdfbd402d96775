use super::*;
use proptest::prelude::*;

/// Builds messages the way the walsender writes them.
#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn tag(t: u8) -> Self {
        W(vec![t])
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i16(mut self, v: i16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn cstr(mut self, s: &str) -> Self {
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        self
    }
    fn text(self, s: &str) -> Self {
        let mut w = self.u8(b't').i32(s.len() as i32);
        w.0.extend_from_slice(s.as_bytes());
        w
    }
    fn bytes(self) -> Bytes {
        Bytes::from(self.0)
    }
}

fn relation() -> Bytes {
    W::tag(b'R')
        .u32(16384)
        .cstr("public")
        .cstr("orders")
        .u8(b'd')
        .i16(3)
        .u8(1)
        .cstr("tenant_id")
        .u32(25)
        .i32(-1)
        .u8(1)
        .cstr("id")
        .u32(20)
        .i32(-1)
        .u8(0)
        .cstr("payload")
        .u32(3802)
        .i32(-1)
        .bytes()
}

#[test]
fn decodes_every_message_kind() {
    let m = decode(&W::tag(b'B').u64(0x16_B374_D848).u64(1000).u32(77).bytes()).expect("begin");
    assert_eq!(
        m,
        Message::Begin {
            final_lsn: Lsn(0x16_B374_D848),
            commit_time_us: 1000,
            xid: 77
        }
    );

    let m = decode(&W::tag(b'C').u8(0).u64(10).u64(20).u64(30).bytes()).expect("commit");
    assert_eq!(
        m,
        Message::Commit {
            flags: 0,
            commit_lsn: Lsn(10),
            end_lsn: Lsn(20),
            commit_time_us: 30
        }
    );

    let m = decode(&W::tag(b'O').u64(5).cstr("eu-west-1").bytes()).expect("origin");
    assert_eq!(
        m,
        Message::Origin {
            commit_lsn: Lsn(5),
            name: "eu-west-1".into()
        }
    );

    let Message::Relation(r) = decode(&relation()).expect("relation") else {
        panic!("not a relation")
    };
    assert_eq!(
        (
            r.id,
            r.namespace.as_str(),
            r.name.as_str(),
            r.replica_identity
        ),
        (16384, "public", "orders", b'd')
    );
    assert_eq!(r.columns.len(), 3);
    assert!(r.columns[0].is_key && r.columns[1].is_key && !r.columns[2].is_key);
    assert_eq!(r.columns[2].type_oid, 3802);

    let m = decode(&W::tag(b'Y').u32(99).cstr("public").cstr("mood").bytes()).expect("type");
    assert_eq!(
        m,
        Message::Type {
            id: 99,
            namespace: "public".into(),
            name: "mood".into()
        }
    );

    let ins = W::tag(b'I')
        .u32(16384)
        .u8(b'N')
        .i16(3)
        .text("t1")
        .text("1")
        .u8(b'n')
        .bytes();
    assert_eq!(
        decode(&ins).expect("insert"),
        Message::Insert {
            relation_id: 16384,
            new: vec![
                Value::Text(Bytes::from("t1")),
                Value::Text(Bytes::from("1")),
                Value::Null
            ]
        }
    );

    let upd = W::tag(b'U')
        .u32(1)
        .u8(b'K')
        .i16(2)
        .text("t1")
        .text("1")
        .u8(b'N')
        .i16(3)
        .text("t1")
        .text("2")
        .u8(b'u')
        .bytes();
    let Message::Update { old, new, .. } = decode(&upd).expect("update") else {
        panic!("not an update")
    };
    assert_eq!(old.map(|(k, t)| (k, t.len())), Some((OldImage::Key, 2)));
    assert_eq!(new[2], Value::UnchangedToast);

    let upd_plain = W::tag(b'U').u32(1).u8(b'N').i16(1).text("x").bytes();
    assert!(matches!(
        decode(&upd_plain),
        Ok(Message::Update { old: None, .. })
    ));

    let del = W::tag(b'D').u32(1).u8(b'O').i16(1).text("x").bytes();
    assert!(matches!(
        decode(&del),
        Ok(Message::Delete {
            old_image: OldImage::Full,
            ..
        })
    ));

    let tr = W::tag(b'T').u32(2).u8(3).u32(10).u32(11).bytes();
    assert_eq!(
        decode(&tr).expect("truncate"),
        Message::Truncate {
            cascade: true,
            restart_identity: true,
            relation_ids: vec![10, 11]
        }
    );

    let msg = W::tag(b'M').u8(1).u64(42).cstr("heliosdb").i32(3).bytes();
    let mut msg = msg.to_vec();
    msg.extend_from_slice(b"abc");
    assert_eq!(
        decode(&Bytes::from(msg)).expect("message"),
        Message::LogicalMessage {
            transactional: true,
            lsn: Lsn(42),
            prefix: "heliosdb".into(),
            content: Bytes::from("abc")
        }
    );
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let samples = [
        relation(),
        W::tag(b'I')
            .u32(16384)
            .u8(b'N')
            .i16(3)
            .text("t1")
            .text("1")
            .u8(b'n')
            .bytes(),
        W::tag(b'U')
            .u32(1)
            .u8(b'O')
            .i16(1)
            .text("a")
            .u8(b'N')
            .i16(1)
            .text("b")
            .bytes(),
        W::tag(b'T').u32(2).u8(0).u32(10).u32(11).bytes(),
        W::tag(b'C').u8(0).u64(10).u64(20).u64(30).bytes(),
    ];
    for s in samples {
        for cut in 0..s.len() {
            assert!(
                decode(&s.slice(..cut)).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
        let mut longer = s.to_vec();
        longer.push(0);
        assert!(matches!(
            decode(&Bytes::from(longer)),
            Err(DecodeError::Trailing { .. })
        ));
    }
}

#[test]
fn hostile_lengths_do_not_allocate_or_panic() {
    // A value claiming 2 GiB, a negative length, a huge column count.
    let big = W::tag(b'I')
        .u32(1)
        .u8(b'N')
        .i16(1)
        .u8(b't')
        .i32(i32::MAX)
        .bytes();
    assert!(matches!(decode(&big), Err(DecodeError::Truncated { .. })));
    let neg = W::tag(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(-5).bytes();
    assert!(matches!(decode(&neg), Err(DecodeError::Invalid { .. })));
    let many = W::tag(b'I').u32(1).u8(b'N').i16(i16::MAX).bytes();
    assert!(decode(&many).is_err());
    let neg_cols = W::tag(b'R')
        .u32(1)
        .cstr("a")
        .cstr("b")
        .u8(b'd')
        .i16(-1)
        .bytes();
    assert!(matches!(
        decode(&neg_cols),
        Err(DecodeError::Invalid { .. })
    ));
    let many_rels = W::tag(b'T').u32(u32::MAX).u8(0).bytes();
    assert!(decode(&many_rels).is_err());
    assert!(matches!(
        decode(&Bytes::from_static(b"Q")),
        Err(DecodeError::UnknownTag('Q', b'Q'))
    ));
    assert!(matches!(
        decode(&Bytes::from_static(b"S")),
        Err(DecodeError::Truncated { .. })
    ));
    assert_eq!(decode(&Bytes::new()), Err(DecodeError::Empty));
    let bad_utf8 = Bytes::from(vec![b'O', 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xfe, 0]);
    assert!(matches!(
        decode(&bad_utf8),
        Err(DecodeError::NotUtf8 { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&Bytes::from(data));
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_tag_never_panic(
        tag in prop::sample::select(b"BCORYIUDTM".to_vec()),
        rest in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut data = vec![tag];
        data.extend(rest);
        let _ = decode(&Bytes::from(data));
    }

    #[test]
    fn text_values_round_trip(values in proptest::collection::vec(proptest::option::of(".{0,40}"), 0..20)) {
        let mut w = W::tag(b'I').u32(7).u8(b'N').i16(values.len() as i16);
        for v in &values {
            w = match v { Some(s) => w.text(s), None => w.u8(b'n') };
        }
        let Ok(Message::Insert { new, .. }) = decode(&w.bytes()) else { panic!("decode failed") };
        let back: Vec<Option<String>> = new.into_iter().map(|v| match v {
            Value::Text(b) => Some(String::from_utf8(b.to_vec()).expect("utf8")),
            _ => None,
        }).collect();
        prop_assert_eq!(back, values);
    }
}

#[test]
fn decodes_proto_2_stream_messages() {
    assert_eq!(
        decode(&W::tag(b'S').u32(900).u8(1).bytes()).expect("stream start"),
        Message::StreamStart {
            xid: 900,
            first_segment: true
        }
    );
    assert_eq!(
        decode(&W::tag(b'E').bytes()).expect("stream stop"),
        Message::StreamStop
    );
    assert_eq!(
        decode(&W::tag(b'c').u32(900).u8(0).u64(10).u64(20).u64(30).bytes())
            .expect("stream commit"),
        Message::StreamCommit {
            xid: 900,
            flags: 0,
            commit_lsn: Lsn(10),
            end_lsn: Lsn(20),
            commit_time_us: 30
        }
    );
    assert_eq!(
        decode(&W::tag(b'A').u32(900).u32(901).bytes()).expect("stream abort"),
        Message::StreamAbort {
            xid: 900,
            subxid: 901
        }
    );
    // Inside a block, a change carries its (sub)transaction id first.
    let insert = W::tag(b'I')
        .u32(901)
        .u32(16384)
        .u8(b'N')
        .i16(1)
        .text("1")
        .bytes();
    let (xid, m) = decode_streamed(&insert).expect("streamed insert");
    assert_eq!(xid, 901);
    assert!(matches!(m, Message::Insert { relation_id: 16384, ref new } if new.len() == 1));
    // Transaction control never comes with an id.
    assert!(matches!(
        decode_streamed(&W::tag(b'B').u64(1).u64(2).u32(3).bytes()),
        Err(DecodeError::NotInStream('B'))
    ));
    for n in 0..insert.len() {
        assert!(decode_streamed(&insert.slice(..n)).is_err());
    }
}

proptest! {
    #[test]
    fn arbitrary_streamed_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_streamed(&Bytes::from(data));
    }
}
