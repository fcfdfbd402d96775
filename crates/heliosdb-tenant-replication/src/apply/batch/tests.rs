use super::*;
use crate::capture::pgoutput::{ColumnDesc, RelationDesc};

fn mapping() -> Arc<TableMapping> {
    let col = |name: &str, is_key| ColumnDesc {
        is_key,
        name: name.into(),
        type_oid: 25,
        type_modifier: -1,
    };
    Arc::new(TableMapping {
        relation: Arc::new(RelationDesc {
            id: 1,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns: vec![
                col("tenant_id", true),
                col("id", true),
                col("a", false),
                col("big", false),
            ],
        }),
        target: "\"public\".\"t\"".into(),
        own_rows: "ONLY \"public\".\"t\"".into(),
        display: "public.t".into(),
        casts: vec!["text".into(), "bigint".into(), "text".into(), "text".into()],
        binary: None,
        key: vec![0, 1],
        tenant: 0,
    })
}

fn t(s: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn row(id: &str, a: &str, big: Value) -> Tuple {
    vec![t("x"), t(id), t(a), big]
}

#[test]
fn last_change_per_key_wins_and_deletes_are_kept() {
    let m = mapping();
    let mut c = Chunk::default();
    c.push(
        m.clone(),
        RowOp::Insert {
            new: row("1", "v1", t("B")),
        },
    );
    c.push(
        m.clone(),
        RowOp::Update {
            old: None,
            new: row("1", "v2", t("B")),
        },
    );
    c.push(
        m.clone(),
        RowOp::Insert {
            new: row("2", "v1", t("B")),
        },
    );
    c.push(
        m.clone(),
        RowOp::Delete {
            old: row("2", "v1", t("B")),
        },
    );
    c.push(
        m.clone(),
        RowOp::Delete {
            old: row("3", "", Value::Null),
        },
    );
    c.push(
        m.clone(),
        RowOp::Insert {
            new: row("3", "again", t("B")),
        },
    );
    let plans = c.plan().expect("plan");
    assert_eq!(plans.len(), 1);
    let p = &plans[0];
    assert_eq!(
        p.upserts,
        vec![row("1", "v2", t("B")), row("3", "again", t("B"))]
    );
    assert_eq!(p.deletes, vec![vec![Bytes::from("x"), Bytes::from("2")]]);
    assert!(p.partial_updates.is_empty());
}

#[test]
fn unchanged_toast_merges_with_a_known_row_or_stays_partial() {
    let m = mapping();
    let mut c = Chunk::default();
    c.push(
        m.clone(),
        RowOp::Insert {
            new: row("1", "v1", t("BIG")),
        },
    );
    c.push(
        m.clone(),
        RowOp::Update {
            old: None,
            new: row("1", "v2", Value::UnchangedToast),
        },
    );
    c.push(
        m.clone(),
        RowOp::Update {
            old: None,
            new: row("2", "v2", Value::UnchangedToast),
        },
    );
    c.push(
        m.clone(),
        RowOp::Update {
            old: None,
            new: row("2", "v3", Value::UnchangedToast),
        },
    );
    let p = &c.plan().expect("plan")[0];
    assert_eq!(
        p.upserts,
        vec![row("1", "v2", t("BIG"))],
        "merged with the inserted value"
    );
    assert_eq!(
        p.partial_updates,
        vec![row("2", "v3", Value::UnchangedToast)]
    );
}

#[test]
fn a_missing_key_value_is_an_operator_error() {
    let m = mapping();
    let mut c = Chunk::default();
    c.push(
        m,
        RowOp::Delete {
            old: vec![t("x"), Value::Null, Value::Null, Value::Null],
        },
    );
    let e = c.plan().expect_err("no key");
    assert!(e.to_string().contains("primary key column id"), "{e}");
}

/// Each change keeps the version announced with it: a plan of one change
/// (the row-by-row replay) carries that change's version, not a later
/// one's; a coalesced key carries its last change's.
#[test]
fn each_change_keeps_its_own_announced_version() {
    use crate::apply::version::{VClock, Version};
    let m = mapping();
    let v = |n: u64| Version {
        node: "region-b".into(),
        time_us: n as i64,
        vclock: VClock([("region-b".to_string(), n)].into_iter().collect()),
        deleted: false,
    };
    let mut c = Chunk::default();
    c.push_versioned(
        m.clone(),
        RowOp::Insert {
            new: row("1", "first", t("B")),
        },
        1,
        Some(v(1)),
    );
    c.push_versioned(
        m.clone(),
        RowOp::Update {
            old: None,
            new: row("1", "second", t("B")),
        },
        2,
        Some(v(2)),
    );
    let coalesced = c.plan().expect("plan");
    assert_eq!(coalesced[0].upsert_version, vec![Some(v(2))]);
    assert_eq!(coalesced[0].upsert_first, vec![FirstOp::Insert]);

    // Replayed alone, the first change carries its own version.
    let mut first = Chunk::default();
    first.push_versioned(
        m.clone(),
        c.ops[0].1.clone(),
        c.times[0],
        c.versions[0].clone(),
    );
    assert_eq!(
        first.plan().expect("plan")[0].upsert_version,
        vec![Some(v(1))]
    );
}
