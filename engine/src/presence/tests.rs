use super::*;
use crate::{ChannelSerial, ConnId, ShardId};
use proptest::prelude::*;

fn owner(n: u8) -> Subscriber {
    Subscriber { shard: ShardId(0), conn: ConnId(u64::from(n)), channel: ChannelSerial(1) }
}

#[derive(Debug, Clone)]
enum Op {
    Track { replica: usize, owner: u8, key: u8, meta: u8 },
    Untrack { replica: usize, owner: u8 },
}

fn ops(replicas: usize) -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![
            (0..replicas, 0u8..4, 0u8..3, 0u8..3).prop_map(|(replica, owner, key, meta)| Op::Track { replica, owner, key, meta }),
            (0..replicas, 0u8..4).prop_map(|(replica, owner)| Op::Untrack { replica, owner }),
        ],
        0..30,
    )
}

/// Runs ops on replicas (owners are partitioned per replica, as channels live on one node) and
/// returns the final states plus every delta produced, in order.
fn run(replicas: usize, ops: &[Op]) -> (Vec<PresenceState>, Vec<Delta>) {
    let mut states: Vec<_> = (0..replicas).map(|r| PresenceState::new(ReplicaId(r as u64))).collect();
    let mut deltas = Vec::new();
    for op in ops {
        let (delta, _) = match *op {
            Op::Track { replica, owner: o, key, meta } => states[replica].track(
                owner(o + 10 * replica as u8),
                Arc::from(format!("k{key}")),
                Bytes::from(format!("{{\"m\":{meta}}}")),
            ),
            Op::Untrack { replica, owner: o } => states[replica].untrack(owner(o + 10 * replica as u8)),
        };
        deltas.push(delta);
    }
    (states, deltas)
}

fn merged(a: &PresenceState, b: &PresenceState) -> PresenceState {
    let mut out = a.clone();
    out.merge(&b.as_delta());
    out
}

proptest! {
    #[test]
    fn merge_is_commutative_associative_idempotent(ops in ops(3)) {
        let (s, _) = run(3, &ops);
        prop_assert_eq!(merged(&s[0], &s[1]), merged(&s[1], &s[0]));
        prop_assert_eq!(merged(&merged(&s[0], &s[1]), &s[2]), merged(&s[0], &merged(&s[1], &s[2])));
        let twice = merged(&merged(&s[0], &s[1]), &s[1]);
        prop_assert_eq!(twice, merged(&s[0], &s[1]));
        prop_assert_eq!(merged(&s[0], &s[0]), s[0].clone());
    }

    #[test]
    fn deltas_equal_full_state_merge(ops in ops(3), order in any::<prop::sample::Index>()) {
        let (states, deltas) = run(3, &ops);
        let full = merged(&merged(&states[0], &states[1]), &states[2]);
        // Apply the deltas to a fresh replica in their order of creation...
        let mut by_delta = PresenceState::new(ReplicaId(9));
        for delta in &deltas {
            by_delta.merge(delta);
        }
        prop_assert_eq!(&by_delta, &full);
        // ...and rotated (any replica's deltas stay in order relative to each other because
        // each replica's deltas are applied as a contiguous suffix/prefix of the sequence only
        // when a single replica is involved; across replicas order is free).
        let per_replica: Vec<Vec<&Delta>> = (0..3).map(|r| {
            ops.iter().zip(&deltas).filter(|(op, _)| match op { Op::Track { replica, .. } | Op::Untrack { replica, .. } => *replica == r }).map(|(_, d)| d).collect()
        }).collect();
        let start = order.index(3);
        let mut interleaved = PresenceState::new(ReplicaId(8));
        for r in 0..3 {
            for delta in &per_replica[(start + r) % 3] {
                interleaved.merge(delta);
            }
        }
        prop_assert_eq!(interleaved, full);
    }

    #[test]
    fn replicas_converge_whatever_the_delivery_order(ops in ops(3), shuffle in proptest::collection::vec(any::<prop::sample::Index>(), 0..60)) {
        // Every delta reaches every replica, in a random order per receiver; duplicates too.
        let (mut states, deltas) = run(3, &ops);
        for (r, state) in states.iter_mut().enumerate() {
            let mut order: Vec<usize> = (0..deltas.len()).collect();
            for (i, pick) in shuffle.iter().enumerate() {
                if order.is_empty() { break; }
                let a = i % order.len();
                let b = pick.index(order.len());
                order.swap(a, b);
            }
            for &i in order.iter().chain(order.iter().take(r)) {
                state.merge(&deltas[i]);
            }
        }
        prop_assert_eq!(&states[0], &states[1]);
        prop_assert_eq!(&states[1], &states[2]);
    }

    #[test]
    fn the_diffs_of_a_replica_replay_its_state(ops in ops(1)) {
        // Applying each operation's diff (joins add, leaves remove) to an empty map gives the
        // state: what presence_diff subscribers see adds up to presence_state.
        let mut state = PresenceState::new(ReplicaId(0));
        let mut seen: BTreeMap<Dot, Element> = BTreeMap::new();
        for op in &ops {
            let (_, diff) = match *op {
                Op::Track { owner: o, key, meta, .. } => state.track(owner(o), Arc::from(format!("k{key}")), Bytes::from(vec![meta])),
                Op::Untrack { owner: o, .. } => state.untrack(owner(o)),
            };
            for (dot, _) in &diff.leaves { seen.remove(dot); }
            for (dot, element) in diff.joins { seen.insert(dot, element); }
        }
        let live: BTreeMap<Dot, Element> = state.elements().map(|(d, e)| (*d, e.clone())).collect();
        prop_assert_eq!(seen, live);
    }
}

#[test]
fn track_replace_and_identical_retrack() {
    let mut state = PresenceState::new(ReplicaId(1));
    let (_, diff) = state.track(owner(1), Arc::from("u-42"), Bytes::from_static(b"{\"name\":\"Ann\"}"));
    assert_eq!(diff.joins.len(), 1);
    let first = diff.joins[0].0;
    let (delta, diff) = state.track(owner(1), Arc::from("u-42"), Bytes::from_static(b"{\"name\":\"Ann\"}"));
    assert!(diff.is_empty() && delta.elements.is_empty(), "identical re-track sends nothing");
    let (_, diff) = state.track(owner(1), Arc::from("u-42"), Bytes::from_static(b"{\"name\":\"Bob\"}"));
    assert_eq!(diff.leaves[0].0, first);
    assert_eq!(diff.joins[0].1.prev, Some(first));
    // Two tabs, same key: two metas under one key.
    state.track(owner(2), Arc::from("u-42"), Bytes::from_static(b"{}"));
    assert_eq!(state.elements().filter(|(_, e)| &*e.key == "u-42").count(), 2);
    let (_, diff) = state.untrack(owner(1));
    assert_eq!(diff.leaves.len(), 1);
    assert_eq!(state.len(), 1);
    let (_, diff) = state.untrack(owner(1));
    assert!(diff.is_empty());
}

#[test]
fn coalescing_cancels_join_then_leave() {
    let mut state = PresenceState::new(ReplicaId(1));
    let (_, mut pending) = state.track(owner(1), Arc::from("a"), Bytes::from_static(b"{}"));
    let (_, d2) = state.track(owner(2), Arc::from("b"), Bytes::from_static(b"{}"));
    pending.coalesce(d2);
    let (_, d3) = state.untrack(owner(1));
    pending.coalesce(d3);
    assert_eq!(pending.joins.len(), 1);
    assert!(pending.leaves.is_empty());
    assert_eq!(&*pending.joins[0].1.key, "b");
}

#[test]
fn context_stays_compact_on_one_replica() {
    let mut state = PresenceState::new(ReplicaId(1));
    for i in 0..1000u64 {
        state.track(owner((i % 7) as u8), Arc::from("k"), Bytes::from(i.to_le_bytes().to_vec()));
    }
    assert!(state.context().cloud.is_empty());
    assert_eq!(state.context().max(ReplicaId(1)), 1000);
}
