//! Deterministic simulation of several *nodes* (one shard each, in cluster mode) and the
//! cluster link between them, on one thread.
//!
//! The simulated NATS keeps one FIFO queue per (sender, receiver) pair, as a NATS connection
//! preserves one publisher's order, and delivers a message only to nodes subscribed to the
//! topic when it was published. A proptest strategy interleaves joins, tracks, untracks,
//! leaves, deliveries, sync answers (computed when the answering node handles the request),
//! node deaths and partitions that heal (each side declares the other gone, then re-syncs and
//! republishes, as the link does on a node's return). After everything in flight is
//! delivered, every live node with a subscriber must show exactly the union of the live nodes'
//! own presence elements, and every join must have been acknowledged.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::cluster::{FromLink, ToLink};

const NODES: usize = 3;
const CONNS: u8 = 3;

#[derive(Debug, Clone)]
enum Op {
    Join { node: u8, conn: u8 },
    Leave { node: u8, conn: u8 },
    Track { node: u8, conn: u8, meta: u8 },
    Untrack { node: u8, conn: u8 },
    Step { queue: u8 },
    Kill { node: u8 },
    Partition { node: u8 },
    Heal,
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0u8..NODES as u8;
    prop_oneof![
        3 => (node.clone(), 0u8..CONNS).prop_map(|(node, conn)| Op::Join { node, conn }),
        1 => (node.clone(), 0u8..CONNS).prop_map(|(node, conn)| Op::Leave { node, conn }),
        3 => (node.clone(), 0u8..CONNS, any::<u8>()).prop_map(|(node, conn, meta)| Op::Track { node, conn, meta: meta % 4 }),
        1 => (node.clone(), 0u8..CONNS).prop_map(|(node, conn)| Op::Untrack { node, conn }),
        8 => any::<u8>().prop_map(|queue| Op::Step { queue }),
        1 => node.clone().prop_map(|node| Op::Kill { node }),
        1 => node.prop_map(|node| Op::Partition { node }),
        1 => Just(Op::Heal),
    ]
}

fn topic() -> TopicKey {
    TopicKey::new(crate::TenantId(0), "realtime:lobby", false)
}

fn incarnation(node: usize) -> u32 {
    node as u32 + 1
}

/// What travels between simulated links.
#[derive(Debug, Clone)]
enum Net {
    Presence(Delta),
    /// A sync request from node `from` (its request id).
    SyncRequest { request: u64 },
    /// An answer to request `request`.
    Snapshot { request: u64, delta: Delta },
}

struct Node {
    state: ShardState,
    alive: bool,
    /// The link's subscription (made at `Interest on`, dropped at `off`).
    subscribed: bool,
    /// Interest waiting for its sync: generation, answers still expected, answers so far.
    syncing: Option<(u64, u64, BTreeSet<usize>, Vec<Delta>)>,
    /// Channels joined (conn → serial), and those acknowledged.
    joined: BTreeMap<u8, ChannelSerial>,
    acked: BTreeSet<(u8, ChannelSerial)>,
    /// Snapshot requests from other nodes waiting for this shard's answer: request → asker.
    answering: BTreeMap<u64, usize>,
}

struct Sim {
    nodes: Vec<Node>,
    queues: BTreeMap<(usize, usize), VecDeque<Net>>,
    /// Which nodes each node can reach (partitions).
    cut: BTreeSet<usize>,
    next_serial: u32,
    next_request: u64,
    requests: BTreeMap<u64, usize>,
}

impl Sim {
    fn new() -> Sim {
        let nodes = (0..NODES)
            .map(|i| Node {
                state: ShardState::new(ShardId(0), 1).with_cluster(incarnation(i)),
                alive: true,
                subscribed: false,
                syncing: None,
                joined: BTreeMap::new(),
                acked: BTreeSet::new(),
                answering: BTreeMap::new(),
            })
            .collect();
        Sim { nodes, queues: BTreeMap::new(), cut: BTreeSet::new(), next_serial: 1, next_request: 1, requests: BTreeMap::new() }
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        a != b && self.nodes[a].alive && self.nodes[b].alive && !self.cut.contains(&a) && !self.cut.contains(&b)
    }

    /// Runs a shard call and everything it causes on its own node.
    fn on_node(&mut self, node: usize, first: Vec<(ShardId, ShardMsg)>, effects: Vec<LocalEffect>) {
        let mut local: VecDeque<ShardMsg> = first.into_iter().map(|(_, m)| m).collect();
        let mut effects = effects;
        loop {
            for effect in effects.drain(..) {
                if let LocalEffect::JoinAcked { subscriber, .. } = effect {
                    self.nodes[node].acked.insert((subscriber.conn.0 as u8, subscriber.channel));
                }
            }
            let Some(msg) = local.pop_front() else { break };
            let mut out = Vec::new();
            if let Some(effect) = self.nodes[node].state.handle(msg, &mut out) {
                effects.push(effect);
            }
            local.extend(out.into_iter().map(|(_, m)| m));
        }
        self.link_out(node);
    }

    /// What the node's shard handed its link.
    fn link_out(&mut self, node: usize) {
        for message in self.nodes[node].state.take_cluster_out() {
            match message {
                ToLink::Interest { on: true, generation, .. } => {
                    self.nodes[node].subscribed = true;
                    // Subscribe, then ask every node it can reach (a dead or cut-off node never
                    // answers: the link's deadline ends the wait with what came).
                    let request = self.next_request;
                    self.next_request += 1;
                    self.requests.insert(request, node);
                    let others: BTreeSet<usize> = (0..NODES).filter(|o| self.reachable(node, *o)).collect();
                    for other in &others {
                        self.queues.entry((node, *other)).or_default().push_back(Net::SyncRequest { request });
                    }
                    self.nodes[node].syncing = Some((generation, request, others, Vec::new()));
                    self.finish_sync_if_done(node);
                }
                ToLink::Interest { on: false, .. } => {
                    self.nodes[node].subscribed = false;
                    self.nodes[node].syncing = None;
                }
                ToLink::Presence { delta, .. } => {
                    for other in 0..NODES {
                        if self.reachable(node, other) && self.nodes[other].subscribed {
                            self.queues.entry((node, other)).or_default().push_back(Net::Presence((*delta).clone()));
                        }
                    }
                }
                ToLink::Snapshot { request, delta } => {
                    if let Some(asker) = self.nodes[node].answering.remove(&request) {
                        if self.reachable(node, asker) {
                            self.queues.entry((node, asker)).or_default().push_back(Net::Snapshot { request, delta });
                        }
                    }
                }
                ToLink::Publish { .. } => {}
            }
        }
    }

    fn finish_sync_if_done(&mut self, node: usize) {
        let done = matches!(&self.nodes[node].syncing, Some((_, _, waiting, _)) if waiting.is_empty());
        if done {
            let (generation, _, _, states) = self.nodes[node].syncing.take().expect("checked");
            self.from_link(node, FromLink::Synced { topic: topic(), generation: Some(generation), states });
        }
    }

    fn from_link(&mut self, node: usize, message: FromLink) {
        let mut out = Vec::new();
        let effects = self.nodes[node].state.cluster_in(message, &mut out);
        self.on_node(node, out, effects);
    }

    fn deliver(&mut self, from: usize, to: usize, message: Net) {
        // A message a node sent before it died is still delivered (it was in flight, and the
        // link hands a node's messages and its death over separate paths); a cut drops what
        // crosses it.
        if !self.nodes[to].alive || self.cut.contains(&from) || self.cut.contains(&to) {
            return;
        }
        match message {
            Net::Presence(delta) => {
                if self.nodes[to].subscribed {
                    self.from_link(to, FromLink::Presence { topic: topic(), delta });
                }
            }
            Net::SyncRequest { request } => {
                self.nodes[to].answering.insert(request, from);
                self.from_link(to, FromLink::SnapshotRequest { topic: topic(), request });
            }
            Net::Snapshot { request, delta } => {
                if self.requests.get(&request) != Some(&to) {
                    return;
                }
                if let Some((_, current, waiting, states)) = &mut self.nodes[to].syncing {
                    if *current == request && waiting.remove(&from) {
                        states.push(delta);
                    }
                }
                self.finish_sync_if_done(to);
            }
        }
    }

    fn step(&mut self, pick: usize) -> bool {
        let ready: Vec<(usize, usize)> = self.queues.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
        if ready.is_empty() {
            return false;
        }
        let (from, to) = ready[pick % ready.len()];
        let message = self.queues.get_mut(&(from, to)).and_then(VecDeque::pop_front).expect("non-empty");
        self.deliver(from, to, message);
        true
    }

    /// A node stops answering (`Kill`) or is cut off (`Partition`): every side declares the
    /// nodes it no longer hears gone, and waits for no answer from them.
    fn lose(&mut self, lost: usize) {
        for node in 0..NODES {
            for other in 0..NODES {
                if node != other && self.nodes[node].alive && !self.reachable(node, other) {
                    if let Some((_, _, waiting, _)) = &mut self.nodes[node].syncing {
                        waiting.remove(&other);
                    }
                    self.from_link(node, FromLink::NodeGone { node: incarnation(other) });
                    self.finish_sync_if_done(node);
                }
            }
        }
        let _ = lost;
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Join { node, conn } => {
                let node = usize::from(node);
                if !self.nodes[node].alive || self.nodes[node].joined.contains_key(&conn) {
                    return;
                }
                let serial = ChannelSerial(self.next_serial);
                self.next_serial += 1;
                self.nodes[node].joined.insert(conn, serial);
                let sub = LocalSub {
                    conn: ConnId(u64::from(conn)),
                    channel: serial,
                    format: Format::V1,
                    prefixed: true,
                    receive_own: true,
                    receive_broadcasts: true,
                    receive_presence: true,
                };
                let first = self.nodes[node].state.local_join(topic(), sub, true);
                self.on_node(node, vec![first], Vec::new());
            }
            Op::Leave { node, conn } => {
                let node = usize::from(node);
                let Some(serial) = self.nodes[node].joined.remove(&conn) else { return };
                if let Some(first) = self.nodes[node].state.local_leave(&topic(), ConnId(u64::from(conn)), serial) {
                    self.on_node(node, vec![first], Vec::new());
                }
            }
            Op::Track { node, conn, meta } => {
                let node = usize::from(node);
                let Some(&serial) = self.nodes[node].joined.get(&conn) else { return };
                let subscriber = Subscriber { shard: ShardId(0), conn: ConnId(u64::from(conn)), channel: serial };
                let msg = ShardMsg::Track { topic: topic(), subscriber, key: format!("n{node}c{conn}").into(), meta: Bytes::from(format!("{{\"m\":{meta}}}")) };
                self.on_node(node, vec![(ShardId(0), msg)], Vec::new());
            }
            Op::Untrack { node, conn } => {
                let node = usize::from(node);
                let Some(&serial) = self.nodes[node].joined.get(&conn) else { return };
                let subscriber = Subscriber { shard: ShardId(0), conn: ConnId(u64::from(conn)), channel: serial };
                self.on_node(node, vec![(ShardId(0), ShardMsg::Untrack { topic: topic(), subscriber })], Vec::new());
            }
            Op::Step { queue } => {
                self.step(usize::from(queue));
            }
            Op::Kill { node } => {
                let node = usize::from(node);
                // Keep at least one node alive; a dead node stays dead (its clients are gone).
                if self.nodes.iter().filter(|n| n.alive).count() > 1 && self.nodes[node].alive {
                    self.nodes[node].alive = false;
                    self.cut.remove(&node);
                    self.lose(node);
                }
            }
            Op::Partition { node } => {
                let node = usize::from(node);
                if self.cut.is_empty() && self.nodes[node].alive {
                    self.cut.insert(node);
                    self.lose(node);
                }
            }
            Op::Heal => self.heal(),
        }
    }

    /// The partition heals: every node hears the others again; each re-syncs its topic and
    /// republishes its own presence (what the link does when a node it declared gone returns).
    fn heal(&mut self) {
        if self.cut.is_empty() {
            return;
        }
        let returned: Vec<usize> = self.cut.iter().copied().collect();
        self.cut.clear();
        for node in 0..NODES {
            if !self.nodes[node].alive {
                continue;
            }
            // Each side hears the other again: it is accepted back.
            for other in 0..NODES {
                if other != node && self.nodes[other].alive && (returned.contains(&other) || returned.contains(&node)) {
                    self.from_link(node, FromLink::NodeBack { node: incarnation(other) });
                }
            }
        }
        for node in 0..NODES {
            if self.nodes[node].alive {
                self.from_link(node, FromLink::Republish);
            }
        }
        for node in 0..NODES {
            if self.nodes[node].alive && self.nodes[node].subscribed {
                // A re-sync: answers gathered now, merged without a generation.
                let mut states = Vec::new();
                for other in 0..NODES {
                    if self.reachable(node, other) {
                        let request = self.next_request;
                        self.next_request += 1;
                        self.nodes[other].answering.insert(request, usize::MAX);
                        let mut out = Vec::new();
                        let effects = self.nodes[other].state.cluster_in(FromLink::SnapshotRequest { topic: topic(), request }, &mut out);
                        assert!(out.is_empty() && effects.is_empty());
                        for message in self.nodes[other].state.take_cluster_out() {
                            match message {
                                ToLink::Snapshot { delta, .. } => states.push(delta),
                                other_message => panic!("unexpected {other_message:?}"),
                            }
                        }
                        self.nodes[other].answering.remove(&request);
                    }
                }
                self.from_link(node, FromLink::Synced { topic: topic(), generation: None, states });
            }
        }
    }

    fn quiesce(&mut self) {
        self.heal();
        let mut guard = 0;
        while self.step(0) {
            guard += 1;
            assert!(guard < 1_000_000, "the network never went quiet");
        }
    }

    fn check(&self) {
        // The truth: each live node's own elements.
        let mut truth = BTreeSet::new();
        for (index, node) in self.nodes.iter().enumerate() {
            if node.alive {
                for (dot, element) in node.state.presence_of(&topic()) {
                    if dot.replica.node() == incarnation(index) {
                        truth.insert((dot, element.key.to_string(), element.meta.clone()));
                    }
                }
            }
        }
        for (index, node) in self.nodes.iter().enumerate() {
            if !node.alive || node.joined.is_empty() {
                continue;
            }
            let view: BTreeSet<_> = node.state.presence_of(&topic()).into_iter().map(|(dot, e)| (dot, e.key.to_string(), e.meta.clone())).collect();
            assert_eq!(view, truth, "node {index}'s view differs from the live nodes' elements");
            for (conn, serial) in &node.joined {
                assert!(node.acked.contains(&(*conn, *serial)), "node {index}: join of conn {conn} never acknowledged");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Every interleaving of joins, presence changes, deliveries, deaths and healed partitions
    /// converges to the same view on every live node, and every join is answered.
    #[test]
    fn presence_converges_across_nodes(ops in proptest::collection::vec(op(), 0..160)) {
        let mut sim = Sim::new();
        for op in ops {
            sim.apply(op);
        }
        sim.quiesce();
        sim.check();
    }
}
