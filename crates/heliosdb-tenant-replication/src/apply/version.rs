//! Row versions and how a conflict is decided.
//!
//! Every node keeps, per replicated row, the version of the row it holds in
//! `heliosdb_replication.row_version`: the node that wrote it, that write's
//! source commit time, a version vector (one counter per node), and whether
//! it is a delete (a tombstone). Local writes are stamped by a trigger the
//! daemon installs on the target's tables ([`tracking`](super::tracking));
//! the daemon's own writes store the version of the change it applied, in the
//! same transaction as the row.
//!
//! When a change arrives, its version is compared with the stored one:
//! * it **dominates** (or equals) the stored vector: the change was made
//!   knowing the target's row, no conflict;
//! * the stored vector dominates it: a **stale** change;
//! * neither: **concurrent**, a true conflict.
//!
//! [`decide`] then names the kind and the winner. Both regions compare the
//! same two versions, and every tie-break is on (commit time, node id), so
//! both pick the same winner and converge.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use crate::apply::batch::FirstOp;

use super::conflict::Kind;

/// A version vector: node id → number of writes made on that node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VClock(pub BTreeMap<String, u64>);

/// How two vectors relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    Equal,
    /// `self` has seen everything `other` has, and more.
    Dominates,
    /// `other` has seen everything `self` has, and more.
    DominatedBy,
    Concurrent,
}

impl VClock {
    pub fn get(&self, node: &str) -> u64 {
        self.0.get(node).copied().unwrap_or(0)
    }

    /// One more write on `node`.
    pub fn bump(&mut self, node: &str) {
        *self.0.entry(node.to_string()).or_insert(0) += 1;
    }

    /// Pointwise maximum: what both have seen.
    pub fn merge(&self, other: &VClock) -> VClock {
        let mut out = self.0.clone();
        for (n, &c) in &other.0 {
            let e = out.entry(n.clone()).or_insert(0);
            *e = (*e).max(c);
        }
        VClock(out)
    }

    pub fn compare(&self, other: &VClock) -> Causality {
        let (mut more, mut less) = (false, false);
        for n in self.0.keys().chain(other.0.keys()) {
            match self.get(n).cmp(&other.get(n)) {
                Ordering::Greater => more = true,
                Ordering::Less => less = true,
                Ordering::Equal => {}
            }
        }
        match (more, less) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Dominates,
            (false, true) => Causality::DominatedBy,
            (true, true) => Causality::Concurrent,
        }
    }

    /// `{"node": n, …}` (the form stored in `row_version.vclock`).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.0).unwrap_or_else(|_| "{}".into())
    }

    /// Parse the stored / shipped form; counters must be non-negative integers.
    pub fn from_json(text: &str) -> Option<VClock> {
        serde_json::from_str(text).ok().map(VClock)
    }
}

/// The version of one row write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// The node the write was made on.
    pub node: String,
    /// Its source commit time (µs since 2000-01-01, PostgreSQL's epoch).
    pub time_us: i64,
    pub vclock: VClock,
    /// A delete (the row is gone; the version is its tombstone).
    pub deleted: bool,
}

impl Version {
    /// Last-writer-wins order: later commit time, ties by node id.
    fn lww_key(&self) -> (i64, &str) {
        (self.time_us, self.node.as_str())
    }
}

pub use crate::config::Strategy;

/// Which side's state a conflict ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Winner {
    Source,
    Target,
}

impl Winner {
    pub fn name(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Target => "target",
        }
    }
}

/// What to do with one incoming row change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The conflict found, if any.
    pub kind: Option<Kind>,
    /// Apply the change (`Source`) or keep the target's row (`Target`).
    pub winner: Winner,
    /// The version to store for the row afterwards (`None`: leave it).
    pub store: Option<Version>,
}

/// The target's state of one row when a change arrives.
#[derive(Debug, Clone, Copy)]
pub struct TargetRow<'a> {
    pub present: bool,
    pub stored: Option<&'a Version>,
}

/// Decide one incoming change. `first` is what the source expected the
/// target to hold (an insert: no row; an update or delete: the row);
/// `incoming` is the version of the change's final state; `explicit` says
/// the source stamped that version itself (active-active) rather than it
/// being derived here (a one-way source that tracks nothing).
pub fn decide(
    strategy: Strategy,
    first: FirstOp,
    target: TargetRow<'_>,
    incoming: &Version,
    explicit: bool,
) -> Decision {
    let causality = target
        .stored
        .map(|s| incoming.vclock.compare(&s.vclock))
        .unwrap_or(Causality::Dominates);
    let causal = matches!(causality, Causality::Dominates | Causality::Equal);
    let presence = match (first, target.present) {
        (FirstOp::Insert, true) => Some(Kind::InsertExists),
        (FirstOp::Update, false) => Some(Kind::UpdateMissing),
        (FirstOp::Delete, false) => Some(Kind::DeleteMissing),
        _ => None,
    };
    let kind = if causal {
        presence
    } else {
        presence.or(Some(match first {
            FirstOp::Update => Kind::UpdateOriginDiffers,
            FirstOp::Delete => Kind::DeleteOriginDiffers,
            FirstOp::Insert => Kind::InsertDeleted,
        }))
    };
    let winner = match (kind, strategy) {
        (None, _) | (Some(_), Strategy::SourcePreferred) => Winner::Source,
        (Some(_), Strategy::TargetPreferred) => Winner::Target,
        (Some(_), Strategy::LastWriteWins) => lww(incoming, target.stored),
        (Some(_), Strategy::VectorClock) => match causality {
            Causality::DominatedBy => Winner::Target,
            Causality::Concurrent => lww(incoming, target.stored),
            // The change has seen the target's row; only the rows differ
            // (a replica written to before versions were kept).
            Causality::Dominates | Causality::Equal => Winner::Source,
        },
    };
    let merged = match target.stored {
        Some(s) => incoming.vclock.merge(&s.vclock),
        None => incoming.vclock.clone(),
    };
    let store = match winner {
        Winner::Source if explicit || kind.is_some() => Some(Version {
            vclock: merged,
            ..incoming.clone()
        }),
        Winner::Source => None,
        // The target's row stays, and now has seen the change too.
        Winner::Target => target.stored.map(|s| Version {
            vclock: merged,
            ..s.clone()
        }),
    };
    Decision {
        kind,
        winner,
        store,
    }
}

/// The later write wins; a target row without a version (written before
/// versions were kept) loses to any change.
fn lww(incoming: &Version, stored: Option<&Version>) -> Winner {
    match stored {
        Some(s) if s.lww_key() >= incoming.lww_key() => Winner::Target,
        _ => Winner::Source,
    }
}

/// The version of a change from a source that stamps nothing (one-way):
/// written on `source_node` at `time_us`. It has seen the stored version
/// when the stored version came from that source; otherwise (the target
/// was written to locally since) it is concurrent with it.
pub fn derived(
    source_node: &str,
    time_us: i64,
    deleted: bool,
    stored: Option<&Version>,
) -> Version {
    let mut vclock = match stored {
        Some(s) if s.node == source_node => s.vclock.clone(),
        Some(s) => VClock(
            [(source_node.to_string(), s.vclock.get(source_node))]
                .into_iter()
                .collect(),
        ),
        None => VClock::default(),
    };
    vclock.bump(source_node);
    Version {
        node: source_node.to_string(),
        time_us,
        vclock,
        deleted,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::{prop_assert, prop_assert_eq, prop_oneof, proptest, Just};
    use proptest::strategy::Strategy as _;

    use super::*;

    fn vc(pairs: &[(&str, u64)]) -> VClock {
        VClock(pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect())
    }

    fn v(node: &str, time_us: i64, clock: &[(&str, u64)]) -> Version {
        Version {
            node: node.into(),
            time_us,
            vclock: vc(clock),
            deleted: false,
        }
    }

    fn clock() -> impl proptest::strategy::Strategy<Value = VClock> {
        proptest::collection::btree_map("[abc]", 0u64..4, 0..3).prop_map(VClock)
    }

    proptest! {
        #[test]
        fn merge_is_commutative_associative_idempotent(a in clock(), b in clock(), c in clock()) {
            prop_assert_eq!(a.merge(&b).compare(&b.merge(&a)), Causality::Equal);
            prop_assert_eq!(a.merge(&b).merge(&c).compare(&a.merge(&b.merge(&c))), Causality::Equal);
            prop_assert_eq!(a.merge(&a).compare(&a), Causality::Equal);
        }

        #[test]
        fn merge_dominates_or_equals_both(a in clock(), b in clock()) {
            let m = a.merge(&b);
            prop_assert!(matches!(m.compare(&a), Causality::Dominates | Causality::Equal));
            prop_assert!(matches!(m.compare(&b), Causality::Dominates | Causality::Equal));
        }

        #[test]
        fn comparison_is_antisymmetric(a in clock(), b in clock()) {
            let flipped = match a.compare(&b) {
                Causality::Dominates => Causality::DominatedBy,
                Causality::DominatedBy => Causality::Dominates,
                other => other,
            };
            prop_assert_eq!(b.compare(&a), flipped);
        }

        #[test]
        fn a_bump_dominates_what_it_saw(a in clock(), node in "[abc]") {
            let mut b = a.clone();
            b.bump(&node);
            prop_assert_eq!(b.compare(&a), Causality::Dominates);
        }

        #[test]
        fn writes_on_two_nodes_from_one_state_are_concurrent(a in clock()) {
            let (mut x, mut y) = (a.clone(), a.clone());
            x.bump("x");
            y.bump("y");
            prop_assert_eq!(x.compare(&y), Causality::Concurrent);
        }

        /// Two regions hold concurrent versions of a row and each receives
        /// the other's: both end with the same row and the same stored vector.
        #[test]
        fn both_regions_pick_the_same_winner(
            base in clock(),
            ta in 0i64..5, tb in 0i64..5,
            strategy in prop_oneof![Just(Strategy::LastWriteWins), Just(Strategy::VectorClock)],
        ) {
            let (mut ca, mut cb) = (base.clone(), base);
            ca.bump("a");
            cb.bump("b");
            let va = Version { node: "a".into(), time_us: ta, vclock: ca, deleted: false };
            let vb = Version { node: "b".into(), time_us: tb, vclock: cb, deleted: false };
            let present = TargetRow { present: true, stored: None };
            // On b: a's update meets b's row; on a: b's update meets a's row.
            let on_b = decide(strategy, FirstOp::Update, TargetRow { stored: Some(&vb), ..present }, &va, true);
            let on_a = decide(strategy, FirstOp::Update, TargetRow { stored: Some(&va), ..present }, &vb, true);
            prop_assert_eq!(on_b.kind, Some(Kind::UpdateOriginDiffers));
            prop_assert_eq!(on_a.kind, Some(Kind::UpdateOriginDiffers));
            let row_on_b = if on_b.winner == Winner::Source { &va.node } else { &vb.node };
            let row_on_a = if on_a.winner == Winner::Source { &vb.node } else { &va.node };
            prop_assert_eq!(row_on_a, row_on_b);
            let (sa, sb) = (on_a.store.expect("stored on a"), on_b.store.expect("stored on b"));
            prop_assert_eq!(&sa, &sb);
        }
    }

    #[test]
    fn each_strategy_picks_its_winner() {
        let stored = v("b", 20, &[("a", 1), ("b", 1)]);
        let concurrent = v("a", 10, &[("a", 2)]);
        let row = TargetRow {
            present: true,
            stored: Some(&stored),
        };
        let pick = |s| decide(s, FirstOp::Update, row, &concurrent, true);
        assert_eq!(pick(Strategy::SourcePreferred).winner, Winner::Source);
        assert_eq!(pick(Strategy::TargetPreferred).winner, Winner::Target);
        // Stored write is later (20 > 10).
        assert_eq!(pick(Strategy::LastWriteWins).winner, Winner::Target);
        assert_eq!(pick(Strategy::VectorClock).winner, Winner::Target);
        let d = pick(Strategy::VectorClock);
        assert_eq!(d.kind, Some(Kind::UpdateOriginDiffers));
        assert_eq!(
            d.store.expect("merged").vclock,
            vc(&[("a", 2), ("b", 1)]),
            "the kept row has now seen the change"
        );

        // A change that saw the stored row is no conflict, whatever its time.
        let after = v("a", 5, &[("a", 2), ("b", 1)]);
        let d = decide(Strategy::LastWriteWins, FirstOp::Update, row, &after, true);
        assert_eq!((d.kind, d.winner), (None, Winner::Source));

        // VectorClock drops a stale change (the stored row saw it).
        let stale = v("a", 99, &[("a", 1)]);
        let d = decide(Strategy::VectorClock, FirstOp::Update, row, &stale, true);
        assert_eq!(d.winner, Winner::Target);
        // LastWriteWins goes by time alone.
        let d = decide(Strategy::LastWriteWins, FirstOp::Update, row, &stale, true);
        assert_eq!(d.winner, Winner::Source);
    }

    #[test]
    fn one_way_versions_see_the_sources_own_writes_only() {
        let first = derived("src", 1, false, None);
        assert_eq!(first.vclock, vc(&[("src", 1)]));
        let ours = v("src", 1, &[("src", 3)]);
        assert_eq!(
            derived("src", 2, false, Some(&ours))
                .vclock
                .compare(&ours.vclock),
            Causality::Dominates
        );
        let local = v("dst", 5, &[("src", 3), ("dst", 1)]);
        let d = derived("src", 6, false, Some(&local));
        assert_eq!(d.vclock.compare(&local.vclock), Causality::Concurrent);
        let row = TargetRow {
            present: true,
            stored: Some(&local),
        };
        let decided = decide(Strategy::SourcePreferred, FirstOp::Delete, row, &d, false);
        assert_eq!(decided.kind, Some(Kind::DeleteOriginDiffers));
        assert_eq!(decided.winner, Winner::Source);
        // No stored version and no conflict: nothing to write.
        let plain = decide(
            Strategy::SourcePreferred,
            FirstOp::Update,
            TargetRow {
                present: true,
                stored: None,
            },
            &first,
            false,
        );
        assert_eq!(plain.store, None);
    }

    #[test]
    fn vclocks_round_trip_as_json() {
        let c = vc(&[("eu-west-1", 3), ("us-east-1", 12)]);
        assert_eq!(VClock::from_json(&c.to_json()), Some(c));
        assert_eq!(VClock::from_json("{\"a\": -1}"), None);
        assert_eq!(VClock::from_json("[1]"), None);
    }
}
