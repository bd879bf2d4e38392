//! Deterministic simulation of several shards on one thread.
//!
//! Every (source, destination) pair has a FIFO queue, as the real SPSC mesh does; a proptest
//! strategy picks which queue moves next, so cross-shard messages are delayed and interleaved
//! in every way the real system allows. The checker asserts that each subscriber whose join
//! was acknowledged before a publish, and who stays joined, receives it exactly once, and that
//! messages from one origin arrive in the order they were sent.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::{BroadcastBody, Origin};

#[derive(Debug, Clone)]
enum Op {
    Join { conn: u8, topic: u8 },
    Leave { conn: u8, topic: u8 },
    Publish { conn: u8, topic: u8 },
    Step { queue: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6, 0u8..3).prop_map(|(conn, topic)| Op::Join { conn, topic }),
        (0u8..6, 0u8..3).prop_map(|(conn, topic)| Op::Leave { conn, topic }),
        (0u8..6, 0u8..3).prop_map(|(conn, topic)| Op::Publish { conn, topic }),
        any::<u8>().prop_map(|queue| Op::Step { queue }),
        any::<u8>().prop_map(|queue| Op::Step { queue }),
    ]
}

struct Sim {
    shards: Vec<ShardState>,
    queues: BTreeMap<(usize, usize), VecDeque<ShardMsg>>,
    /// Current serial of (conn, topic) when joined.
    joined: BTreeMap<(u8, u8), ChannelSerial>,
    acked: BTreeSet<(u8, u8, ChannelSerial)>,
    next_serial: u32,
    /// (publisher conn, topic, seq) → receivers that must get it (acked at publish time).
    expected: Vec<(u64, BTreeSet<(u8, ChannelSerial)>)>,
    received: BTreeMap<(u8, ChannelSerial), Vec<u64>>,
    left: BTreeSet<(u8, ChannelSerial)>,
    next_message: u64,
}

fn home(conn: u8, shards: usize) -> usize {
    usize::from(conn) % shards
}

fn topic_key(topic: u8) -> TopicKey {
    TopicKey::new(crate::TenantId(u32::from(topic % 2)), &format!("realtime:room-{topic}"), false)
}

impl Sim {
    fn new(shard_count: usize) -> Sim {
        Sim {
            shards: (0..shard_count).map(|i| ShardState::new(ShardId(i as u16), shard_count)).collect(),
            queues: BTreeMap::new(),
            joined: BTreeMap::new(),
            acked: BTreeSet::new(),
            next_serial: 1,
            expected: Vec::new(),
            received: BTreeMap::new(),
            left: BTreeSet::new(),
            next_message: 0,
        }
    }

    fn send(&mut self, from: usize, out: Vec<(ShardId, ShardMsg)>) {
        for (to, msg) in out {
            self.queues.entry((from, to.index())).or_default().push_back(msg);
        }
    }

    fn apply(&mut self, op: Op) {
        let n = self.shards.len();
        match op {
            Op::Join { conn, topic } => {
                if self.joined.contains_key(&(conn, topic)) {
                    return;
                }
                let serial = ChannelSerial(self.next_serial);
                self.next_serial += 1;
                self.joined.insert((conn, topic), serial);
                let sub = LocalSub { conn: ConnId(conn.into()), channel: serial, format: Format::V2, prefixed: true, receive_own: true, receive_broadcasts: true, receive_presence: true };
                let at = home(conn, n);
                let out = self.shards[at].local_join(topic_key(topic), sub, false);
                self.send(at, vec![out]);
            }
            Op::Leave { conn, topic } => {
                let Some(serial) = self.joined.remove(&(conn, topic)) else { return };
                self.left.insert((conn, serial));
                let at = home(conn, n);
                let out = self.shards[at].local_leave(&topic_key(topic), ConnId(conn.into()), serial);
                self.send(at, out.into_iter().collect());
            }
            Op::Publish { conn, topic } => {
                let Some(&serial) = self.joined.get(&(conn, topic)) else { return };
                let id = self.next_message;
                self.next_message += 1;
                let must: BTreeSet<_> = self
                    .acked
                    .iter()
                    .filter(|(c, t, s)| *t == topic && self.joined.get(&(*c, *t)) == Some(s))
                    .map(|(c, _, s)| (*c, *s))
                    .collect();
                self.expected.push((id, must));
                let at = home(conn, n);
                let message = Arc::new(Broadcast {
                    origin: Some(Origin { shard: ShardId(at as u16), conn: ConnId(conn.into()), channel: serial, read_at_micros: 0 }),
                    body: BroadcastBody::Json { payload: Bytes::from(id.to_le_bytes().to_vec()) },
                });
                let owner = self.shards[at].owner(&topic_key(topic));
                self.send(at, vec![(owner, ShardMsg::Publish { topic: topic_key(topic), message })]);
            }
            Op::Step { queue } => {
                let nonempty: Vec<_> = self.queues.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
                if nonempty.is_empty() {
                    return;
                }
                let key = nonempty[usize::from(queue) % nonempty.len()];
                self.step(key);
            }
        }
    }

    fn step(&mut self, (_from, to): (usize, usize)) {
        let msg = self.queues.get_mut(&(_from, to)).unwrap().pop_front().unwrap();
        let mut out = Vec::new();
        let effect = self.shards[to].handle(msg, &mut out);
        self.send(to, out);
        match effect {
            Some(LocalEffect::Deliver { topic, message }) => {
                let id = match &message.body {
                    BroadcastBody::Json { payload } => u64::from_le_bytes(payload[..].try_into().unwrap()),
                    _ => unreachable!("the routing sim only publishes JSON broadcasts"),
                };
                for sub in self.shards[to].local_subscribers(&topic) {
                    self.received.entry((sub.conn.0 as u8, sub.channel)).or_default().push(id);
                }
            }
            Some(LocalEffect::JoinAcked { topic, subscriber, .. }) => {
                let topic_index: u8 = topic.sub.trim_start_matches("room-").parse().unwrap();
                let conn = subscriber.conn.0 as u8;
                if self.joined.get(&(conn, topic_index)) == Some(&subscriber.channel) {
                    self.acked.insert((conn, topic_index, subscriber.channel));
                }
            }
            Some(LocalEffect::SchedulePresenceFlush { .. }) | None => {}
        }
    }

    fn drain(&mut self) {
        while let Some(key) = self.queues.iter().find(|(_, q)| !q.is_empty()).map(|(k, _)| *k) {
            self.step(key);
        }
    }

    fn check(&self) {
        for (id, must) in &self.expected {
            for receiver in must {
                if self.left.contains(receiver) {
                    continue;
                }
                let got = self.received.get(receiver).map(|v| v.iter().filter(|x| *x == id).count()).unwrap_or(0);
                assert_eq!(got, 1, "receiver {receiver:?} got message {id} {got} times");
            }
        }
        for (receiver, ids) in &self.received {
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), ids.len(), "{receiver:?} got a duplicate: {ids:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn broadcasts_reach_every_acked_subscriber_exactly_once(
        shard_count in 1usize..4,
        ops in proptest::collection::vec(op(), 0..200),
    ) {
        let mut sim = Sim::new(shard_count);
        for op in ops {
            sim.apply(op);
        }
        sim.drain();
        sim.check();
        // After everyone leaves, no shard keeps any topic state.
        let joined: Vec<_> = sim.joined.keys().copied().collect();
        for (conn, topic) in joined {
            sim.apply(Op::Leave { conn, topic });
        }
        sim.drain();
        for shard in &sim.shards {
            prop_assert_eq!(shard.owned_topics(), 0);
            prop_assert_eq!(shard.local_topics(), 0);
        }
    }

    #[test]
    fn one_origin_is_received_in_order(
        shard_count in 1usize..4,
        steps in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        // Conn 0 publishes 50 messages on topic 0; conns 1..6 are joined and acked first.
        let mut sim = Sim::new(shard_count);
        for conn in 0..6 {
            sim.apply(Op::Join { conn, topic: 0 });
        }
        sim.drain();
        let mut steps = steps.into_iter();
        for _ in 0..50 {
            sim.apply(Op::Publish { conn: 0, topic: 0 });
            for queue in steps.by_ref().take(8) {
                sim.apply(Op::Step { queue });
            }
        }
        sim.drain();
        sim.check();
        for conn in 0..6u8 {
            let serial = sim.joined[&(conn, 0)];
            let got = sim.received.get(&(conn, serial)).cloned().unwrap_or_default();
            prop_assert_eq!(got, (0..50).collect::<Vec<u64>>());
        }
    }
}

/// Presence across shards: members of one topic sit on different shards; joins, tracks,
/// untracks and connection closes interleave with arbitrary cross-shard delays (and, with
/// coalescing, arbitrary flush points). Every member's view — its `presence_state` snapshot
/// plus every diff delivered after it, applied idempotently by `phx_ref` as the clients do —
/// must equal the owner's state once the queues drain.
mod presence {
    use super::*;
    use crate::presence::{Dot, Element};
    use crate::PresenceCoalescing;

    #[derive(Debug, Clone)]
    enum POp {
        Join { conn: u8 },
        Track { conn: u8, meta: u8 },
        Untrack { conn: u8 },
        Close { conn: u8 },
        Step { queue: u8 },
        Flush,
    }

    fn pop() -> impl Strategy<Value = POp> {
        prop_oneof![
            (0u8..6).prop_map(|conn| POp::Join { conn }),
            (0u8..6, 0u8..3).prop_map(|(conn, meta)| POp::Track { conn, meta }),
            (0u8..6).prop_map(|conn| POp::Untrack { conn }),
            (0u8..6).prop_map(|conn| POp::Close { conn }),
            any::<u8>().prop_map(|queue| POp::Step { queue }),
            any::<u8>().prop_map(|queue| POp::Step { queue }),
            Just(POp::Flush),
        ]
    }

    struct PSim {
        shards: Vec<ShardState>,
        queues: BTreeMap<(usize, usize), VecDeque<ShardMsg>>,
        joined: BTreeMap<u8, ChannelSerial>,
        next_serial: u32,
        /// Per (conn, serial): the view built from snapshot + diffs, and whether the snapshot came.
        views: BTreeMap<(u8, ChannelSerial), (bool, BTreeMap<Dot, Element>)>,
        flushes: Vec<(usize, TopicKey)>,
    }

    fn topic() -> TopicKey {
        TopicKey::new(crate::TenantId::SINGLE, "realtime:doc", false)
    }

    impl PSim {
        fn new(n: usize, coalescing: PresenceCoalescing) -> PSim {
            PSim {
                shards: (0..n).map(|i| ShardState::new(ShardId(i as u16), n).with_coalescing(coalescing)).collect(),
                queues: BTreeMap::new(),
                joined: BTreeMap::new(),
                next_serial: 1,
                views: BTreeMap::new(),
                flushes: Vec::new(),
            }
        }

        fn send(&mut self, from: usize, out: Vec<(ShardId, ShardMsg)>) {
            for (to, msg) in out {
                self.queues.entry((from, to.index())).or_default().push_back(msg);
            }
        }

        fn subscriber(&self, conn: u8) -> Option<Subscriber> {
            let n = self.shards.len();
            self.joined.get(&conn).map(|&channel| Subscriber { shard: ShardId(home(conn, n) as u16), conn: ConnId(conn.into()), channel })
        }

        fn apply(&mut self, op: POp) {
            let n = self.shards.len();
            match op {
                POp::Join { conn } => {
                    if self.joined.contains_key(&conn) {
                        return;
                    }
                    let serial = ChannelSerial(self.next_serial);
                    self.next_serial += 1;
                    self.joined.insert(conn, serial);
                    self.views.insert((conn, serial), (false, BTreeMap::new()));
                    let sub = LocalSub { conn: ConnId(conn.into()), channel: serial, format: Format::V2, prefixed: true, receive_own: false, receive_broadcasts: true, receive_presence: true };
                    let at = home(conn, n);
                    let out = self.shards[at].local_join(topic(), sub, true);
                    self.send(at, vec![out]);
                }
                POp::Track { conn, meta } => {
                    let Some(subscriber) = self.subscriber(conn) else { return };
                    let at = home(conn, n);
                    let msg = ShardMsg::Track { topic: topic(), subscriber, key: Arc::from(format!("user-{}", conn % 3)), meta: Bytes::from(vec![meta]) };
                    let owner = self.shards[at].owner(&topic());
                    self.send(at, vec![(owner, msg)]);
                }
                POp::Untrack { conn } => {
                    let Some(subscriber) = self.subscriber(conn) else { return };
                    let at = home(conn, n);
                    let owner = self.shards[at].owner(&topic());
                    self.send(at, vec![(owner, ShardMsg::Untrack { topic: topic(), subscriber })]);
                }
                POp::Close { conn } => {
                    let Some(serial) = self.joined.remove(&conn) else { return };
                    self.views.remove(&(conn, serial));
                    let at = home(conn, n);
                    let out = self.shards[at].local_leave(&topic(), ConnId(conn.into()), serial);
                    self.send(at, out.into_iter().collect());
                }
                POp::Step { queue } => {
                    let nonempty: Vec<_> = self.queues.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
                    if !nonempty.is_empty() {
                        self.step(nonempty[usize::from(queue) % nonempty.len()]);
                    }
                }
                POp::Flush => {
                    if !self.flushes.is_empty() {
                        let (at, topic) = self.flushes.remove(0);
                        let mut out = Vec::new();
                        self.shards[at].flush_presence(&topic, &mut out);
                        self.send(at, out);
                    }
                }
            }
        }

        fn step(&mut self, (from, to): (usize, usize)) {
            let msg = self.queues.get_mut(&(from, to)).unwrap().pop_front().unwrap();
            let mut out = Vec::new();
            let effect = self.shards[to].handle(msg, &mut out);
            self.send(to, out);
            match effect {
                Some(LocalEffect::JoinAcked { subscriber, presence, .. }) => {
                    let key = (subscriber.conn.0 as u8, subscriber.channel);
                    if let Some(view) = self.views.get_mut(&key) {
                        view.0 = true;
                        for (dot, element) in presence.expect("joined with presence").iter() {
                            view.1.insert(*dot, element.clone());
                        }
                    }
                }
                Some(LocalEffect::Deliver { topic, message }) => {
                    let BroadcastBody::PresenceDiff(diff) = &message.body else { unreachable!() };
                    for sub in self.shards[to].local_subscribers(&topic) {
                        let Some(view) = self.views.get_mut(&(sub.conn.0 as u8, sub.channel)) else { continue };
                        assert!(view.0, "a diff arrived before the join's presence_state");
                        for (dot, _) in &diff.leaves {
                            view.1.remove(dot);
                        }
                        for (dot, element) in &diff.joins {
                            view.1.insert(*dot, element.clone());
                        }
                    }
                }
                Some(LocalEffect::SchedulePresenceFlush { topic }) => self.flushes.push((to, topic)),
                None => {}
            }
        }

        fn drain(&mut self) {
            loop {
                if let Some(key) = self.queues.iter().find(|(_, q)| !q.is_empty()).map(|(k, _)| *k) {
                    self.step(key);
                } else if !self.flushes.is_empty() {
                    self.apply(POp::Flush);
                } else {
                    break;
                }
            }
        }

        fn check(&self) {
            let owner = self.shards[0].owner(&topic()).index();
            let truth: BTreeMap<Dot, Element> = self.shards[owner].presence_of(&topic()).into_iter().collect();
            // Only live channels' elements remain.
            for element in truth.values() {
                assert_eq!(self.joined.get(&(element.owner.conn.0 as u8)), Some(&element.owner.channel), "a closed channel's presence survived");
            }
            for ((conn, serial), (acked, view)) in &self.views {
                assert!(acked, "member {conn}/{serial:?} never got presence_state");
                assert_eq!(view, &truth, "member {conn} diverged");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn members_on_any_shard_converge(
            shard_count in 1usize..4,
            window in any::<bool>(),
            ops in proptest::collection::vec(pop(), 0..150),
        ) {
            let coalescing = if window { PresenceCoalescing::Window } else { PresenceCoalescing::Immediate };
            let mut sim = PSim::new(shard_count, coalescing);
            for op in ops {
                sim.apply(op);
            }
            sim.drain();
            sim.check();
            // Everyone closes: no state is left anywhere.
            let conns: Vec<u8> = sim.joined.keys().copied().collect();
            for conn in conns {
                sim.apply(POp::Close { conn });
            }
            sim.drain();
            for shard in &sim.shards {
                prop_assert_eq!(shard.owned_topics(), 0);
                prop_assert_eq!(shard.local_topics(), 0);
            }
        }
    }
}

/// Joins `subscribers` connections to `topic` on a one-shard state, delivering every message.
fn join_all(state: &mut ShardState, topic: &str, subscribers: u32, first_conn: u32) {
    for conn in first_conn..first_conn + subscribers {
        let sub = LocalSub { conn: ConnId(conn.into()), channel: ChannelSerial(1), format: Format::V1, prefixed: true, receive_own: true, receive_broadcasts: true, receive_presence: true };
        let mut queue = vec![state.local_join(TopicKey::new(crate::TenantId::SINGLE, topic, false), sub, false)];
        while let Some((_, msg)) = queue.pop() {
            let mut out = Vec::new();
            state.handle(msg, &mut out);
            queue.extend(out);
        }
    }
}

#[test]
fn summary_keeps_the_busiest_topics_and_counts_channels() {
    let mut state = ShardState::new(ShardId(0), 1);
    join_all(&mut state, "realtime:quiet", 1, 0);
    join_all(&mut state, "realtime:busy", 5, 100);
    join_all(&mut state, "realtime:b-middle", 3, 200);
    join_all(&mut state, "realtime:a-middle", 3, 300);
    let summary = state.summary(3);
    assert_eq!(summary.owned_topics, 4);
    assert_eq!(summary.local_channels, 12);
    assert_eq!(summary.presence_members, 0);
    let top: Vec<(&str, usize)> = summary.top_topics.iter().map(|(topic, n)| (&*topic.sub, *n)).collect();
    assert_eq!(top, vec![("busy", 5), ("a-middle", 3), ("b-middle", 3)]);
    assert!(state.summary(0).top_topics.is_empty());
}
