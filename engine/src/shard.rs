//! What one shard owns, as a plain value: the topics that hash to it, and the index of its own
//! connections' subscriptions.
//!
//! A broadcast travels: sender's shard → `Publish` → owner shard → one `Deliver` per shard that
//! has subscribers → that shard's local index → each subscriber's outbound queue. Every hop
//! goes through a FIFO queue, so messages from one origin reach every receiver in order.
//!
//! The owner keeps every subscriber as a [`Subscriber`] (shard, conn, channel) plus a count per
//! shard, so a publish costs one message per destination shard, not one per subscriber.
//! Each shard keeps a [`SubList`] per topic for the subscriptions of its own connections.

use std::collections::hash_map::Entry;
use std::sync::Arc;

use ahash::{AHashMap, AHashSet};

use bytes::Bytes;

use crate::cluster::{FromLink, ToLink};
use crate::presence::{Delta, Diff, Dot, Element, PresenceState, ReplicaId};
use crate::{Broadcast, BroadcastBody, ChannelSerial, ConnId, ShardId, TopicKey};

/// A snapshot of a topic's presence, sent with a join acknowledgement (`presence_state`).
pub type PresenceSnapshot = Arc<Vec<(Dot, Element)>>;

/// Wire format of a subscriber's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `vsn=1.0.0`: JSON objects.
    V1,
    /// `vsn=2.0.0`: JSON arrays and binary frames.
    V2,
}

/// One subscription as the topic owner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subscriber {
    /// Shard of the subscribing connection.
    pub shard: ShardId,
    /// The connection.
    pub conn: ConnId,
    /// The join on that connection.
    pub channel: ChannelSerial,
}

/// One subscription as the subscriber's own shard sees it: what it needs to write a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalSub {
    /// The connection.
    pub conn: ConnId,
    /// The join on that connection.
    pub channel: ChannelSerial,
    /// Its wire format.
    pub format: Format,
    /// Whether the connection joined with the `realtime:` prefix (frames echo its spelling).
    pub prefixed: bool,
    /// `config.broadcast.self`.
    pub receive_own: bool,
    /// Broadcast read granted (always for public channels; by policy for private ones).
    pub receive_broadcasts: bool,
    /// Presence read granted (always for public channels; by policy for private ones).
    pub receive_presence: bool,
}

/// Messages between shards. Payloads are shared (`Arc`/`Bytes`), so crossing a shard copies
/// pointers, not bytes.
#[derive(Debug, Clone)]
pub enum ShardMsg {
    /// To the owner: register a subscription.
    Join {
        /// Topic.
        topic: TopicKey,
        /// Who.
        subscriber: Subscriber,
        /// Whether the channel wants the presence state with the acknowledgement.
        presence: bool,
    },
    /// To the owner: the channel tracks `meta` under `key` (PROTOCOL.md §4.3).
    Track {
        /// Topic.
        topic: TopicKey,
        /// Who.
        subscriber: Subscriber,
        /// Presence key.
        key: Arc<str>,
        /// Normalised JSON object.
        meta: Bytes,
    },
    /// To the owner: the channel untracks.
    Untrack {
        /// Topic.
        topic: TopicKey,
        /// Who.
        subscriber: Subscriber,
    },
    /// To the owner: remove a subscription (and its presence).
    Leave {
        /// Topic.
        topic: TopicKey,
        /// Who.
        subscriber: Subscriber,
    },
    /// To the owner: fan this out.
    Publish {
        /// Topic.
        topic: TopicKey,
        /// The message.
        message: Arc<Broadcast>,
    },
    /// From the owner to a shard with subscribers: write this to your local subscribers.
    Deliver {
        /// Topic.
        topic: TopicKey,
        /// The message.
        message: Arc<Broadcast>,
    },
    /// From the owner to the subscriber's shard: the subscription is registered; everything
    /// published from now on reaches it.
    JoinAck {
        /// Topic.
        topic: TopicKey,
        /// Who.
        subscriber: Subscriber,
        /// The presence state at registration, when asked for.
        presence: Option<PresenceSnapshot>,
    },
}

impl ShardMsg {
    /// Whether dropping this message (when a peer's queue overflows) only loses a delivery,
    /// never corrupts state. Only broadcasts may be dropped; presence diffs never are (a lost
    /// diff would leave a client's view wrong until it rejoins).
    pub fn is_droppable(&self) -> bool {
        match self {
            ShardMsg::Publish { .. } => true,
            ShardMsg::Deliver { message, .. } => !matches!(message.body, BroadcastBody::PresenceDiff(_)),
            _ => false,
        }
    }
}

/// What the driver must do locally after [`ShardState::handle`].
#[derive(Debug)]
pub enum LocalEffect {
    /// Write `message` to the local subscribers of `topic`.
    Deliver {
        /// Topic.
        topic: TopicKey,
        /// The message.
        message: Arc<Broadcast>,
    },
    /// Tell connection `subscriber.conn` that its join of `topic` is registered.
    JoinAcked {
        /// Topic.
        topic: TopicKey,
        /// Who.
        subscriber: Subscriber,
        /// The presence state, when asked for.
        presence: Option<PresenceSnapshot>,
    },
    /// A presence diff for `topic` started its coalescing window: call
    /// [`ShardState::flush_presence`] when the window ends.
    SchedulePresenceFlush {
        /// Topic.
        topic: TopicKey,
    },
}

/// Whether the cluster link subscribed a topic for this node (cluster mode only).
#[derive(Debug, Default)]
enum Interest {
    /// Not asked for (no local subscriber, or single-node mode).
    #[default]
    Off,
    /// Asked for with this generation; these joins wait for the confirmation before their ack.
    Waiting(u64, Vec<(Subscriber, bool)>),
    /// Confirmed: joins are acknowledged at once.
    On,
}

/// A topic this shard owns.
#[derive(Debug, Default)]
struct OwnedTopic {
    subscribers: AHashSet<Subscriber>,
    interest: Interest,
    /// Subscribers per shard, indexed by `ShardId`.
    per_shard: Vec<u32>,
    /// Created on the first track.
    presence: Option<PresenceState>,
    /// Changes waiting for the end of the coalescing window.
    pending_diff: Option<Diff>,
}

impl OwnedTopic {
    fn new(shards: usize) -> OwnedTopic {
        OwnedTopic { subscribers: AHashSet::new(), interest: Interest::Off, per_shard: vec![0; shards], presence: None, pending_diff: None }
    }

    /// The presence members have been told about: the state without the changes still waiting
    /// in the coalescing window. A join gets this as `presence_state`, then the pending diff
    /// with everyone else, so its view never holds an element whose leave it will not get.
    fn sent_view(&self) -> Vec<(Dot, Element)> {
        let Some(state) = &self.presence else { return Vec::new() };
        let mut view: Vec<(Dot, Element)> = state.elements().map(|(d, e)| (*d, e.clone())).collect();
        if let Some(pending) = &self.pending_diff {
            let unsent: AHashSet<Dot> = pending.joins.iter().map(|(dot, _)| *dot).collect();
            view.retain(|(dot, _)| !unsent.contains(dot));
            view.extend(pending.leaves.iter().cloned());
        }
        view
    }

    fn is_idle(&self) -> bool {
        self.subscribers.is_empty() && self.presence.as_ref().is_none_or(PresenceState::is_empty) && self.pending_diff.is_none()
    }
}

/// Presence diff coalescing (beyond upstream): with `Window`, diffs of one topic are merged until
/// the driver calls [`ShardState::flush_presence`]; with `Immediate` every change is sent at
/// once, as upstream does for local changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceCoalescing {
    /// Send each change at once.
    Immediate,
    /// Merge changes over a window the driver times.
    Window,
}

/// The subscriptions of local connections to one topic. Removal is O(1) (swap-remove plus a
/// position map), so a topic with 15k local subscribers stays cheap to leave.
#[derive(Debug, Default)]
pub struct SubList {
    subs: Vec<LocalSub>,
    position: AHashMap<(ConnId, ChannelSerial), usize>,
}

impl SubList {
    /// The subscriptions, in no particular order.
    pub fn as_slice(&self) -> &[LocalSub] {
        &self.subs
    }

    fn insert(&mut self, sub: LocalSub) {
        match self.position.entry((sub.conn, sub.channel)) {
            Entry::Occupied(entry) => self.subs[*entry.get()] = sub,
            Entry::Vacant(entry) => {
                entry.insert(self.subs.len());
                self.subs.push(sub);
            }
        }
    }

    fn remove(&mut self, conn: ConnId, channel: ChannelSerial) -> bool {
        let Some(index) = self.position.remove(&(conn, channel)) else {
            return false;
        };
        self.subs.swap_remove(index);
        if let Some(moved) = self.subs.get(index) {
            self.position.insert((moved.conn, moved.channel), index);
        }
        true
    }

    fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }
}

/// One `Deliver` per shard that has subscribers of the topic.
fn fan_out(topic: &TopicKey, owned: &OwnedTopic, message: Arc<Broadcast>, out: &mut Vec<(ShardId, ShardMsg)>) {
    for (index, &count) in owned.per_shard.iter().enumerate() {
        if count > 0 {
            out.push((ShardId(index as u16), ShardMsg::Deliver { topic: topic.clone(), message: Arc::clone(&message) }));
        }
    }
}

fn presence_message(diff: Diff) -> Arc<Broadcast> {
    Arc::new(Broadcast { origin: None, body: BroadcastBody::PresenceDiff(Arc::new(diff)) })
}

/// What [`ShardState::summary`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSummary {
    /// Topics this shard owns.
    pub owned_topics: usize,
    /// Acknowledged subscriptions of this shard's connections (joined channels).
    pub local_channels: usize,
    /// Presence elements of the topics this shard owns.
    pub presence_members: usize,
    /// Owned topics with the most subscribers (all shards'), most first.
    pub top_topics: Vec<(TopicKey, usize)>,
}

/// All topic state of one shard.
#[derive(Debug)]
pub struct ShardState {
    id: ShardId,
    shards: usize,
    coalescing: PresenceCoalescing,
    /// Cluster mode: this node's incarnation (the high half of its presence replicas' ids).
    cluster: Option<u32>,
    /// What the cluster link must do, in order (the driver drains it after each call).
    cluster_out: Vec<ToLink>,
    /// Nodes declared gone (bounded, oldest forgotten first): what still arrives from them is
    /// ignored until they are back.
    gone_nodes: std::collections::VecDeque<u32>,
    /// Presence state instances created so far (unique replica ids), and interest generations.
    next_instance: u32,
    next_generation: u64,
    owned: AHashMap<TopicKey, OwnedTopic>,
    local: AHashMap<TopicKey, SubList>,
    /// Local joins the owner has not acknowledged yet. They enter `local` only with the
    /// `JoinAck`, which the owner sends before any `Deliver` that includes them (same FIFO), so
    /// a channel never receives a broadcast or presence diff before its join reply.
    pending: AHashMap<(TopicKey, ConnId, ChannelSerial), LocalSub>,
}

impl ShardState {
    /// A shard `id` of `shards`.
    pub fn new(id: ShardId, shards: usize) -> ShardState {
        assert!(id.index() < shards);
        ShardState {
            id,
            shards,
            coalescing: PresenceCoalescing::Immediate,
            cluster: None,
            cluster_out: Vec::new(),
            gone_nodes: std::collections::VecDeque::new(),
            next_instance: 0,
            next_generation: 0,
            owned: AHashMap::new(),
            local: AHashMap::new(),
            pending: AHashMap::new(),
        }
    }

    /// Sets presence diff coalescing.
    pub fn with_coalescing(mut self, coalescing: PresenceCoalescing) -> ShardState {
        self.coalescing = coalescing;
        self
    }

    /// Cluster mode, as node incarnation `node` (non-zero): joins wait for the cluster link's
    /// subscription, broadcasts and presence changes made here are handed to it.
    pub fn with_cluster(mut self, node: u32) -> ShardState {
        self.cluster = Some(node);
        self
    }

    /// What the cluster link must do since the last call, in order.
    pub fn take_cluster_out(&mut self) -> Vec<ToLink> {
        std::mem::take(&mut self.cluster_out)
    }

    /// A replica id for a new presence state instance: unique on this node and, in cluster
    /// mode, across nodes.
    fn new_replica(&mut self) -> ReplicaId {
        let instance = self.next_instance;
        self.next_instance = self.next_instance.wrapping_add(1);
        let shards = self.shards as u32;
        let local = instance.wrapping_mul(shards).wrapping_add(u32::from(self.id.0));
        ReplicaId::of(self.cluster.unwrap_or(0), local)
    }

    /// Creates the presence state of an owned topic if it has none.
    fn ensure_presence(&mut self, topic: &TopicKey) {
        if self.owned.get(topic).is_some_and(|o| o.presence.is_none()) {
            let replica = self.new_replica();
            if let Some(owned) = self.owned.get_mut(topic) {
                owned.presence = Some(PresenceState::new(replica));
            }
        }
    }

    /// This shard's id.
    pub fn id(&self) -> ShardId {
        self.id
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The owner of `topic`.
    pub fn owner(&self, topic: &TopicKey) -> ShardId {
        topic.owner(self.shards)
    }

    /// A local connection joins `topic`: index it here and tell the owner. The driver sends the
    /// join reply when the owner's `JoinAck` comes back.
    pub fn local_join(&mut self, topic: TopicKey, sub: LocalSub, presence: bool) -> (ShardId, ShardMsg) {
        self.pending.insert((topic.clone(), sub.conn, sub.channel), sub);
        let subscriber = Subscriber { shard: self.id, conn: sub.conn, channel: sub.channel };
        (self.owner(&topic), ShardMsg::Join { topic, subscriber, presence })
    }

    /// A local channel leaves `topic` (leave, duplicate join, close): it stops receiving at
    /// once; the owner is told. Returns `None` when the channel was not subscribed.
    pub fn local_leave(
        &mut self,
        topic: &TopicKey,
        conn: ConnId,
        channel: ChannelSerial,
    ) -> Option<(ShardId, ShardMsg)> {
        if self.pending.remove(&(topic.clone(), conn, channel)).is_none() {
            let list = self.local.get_mut(topic)?;
            if !list.remove(conn, channel) {
                return None;
            }
            if list.is_empty() {
                self.local.remove(topic);
            }
        }
        let subscriber = Subscriber { shard: self.id, conn, channel };
        Some((self.owner(topic), ShardMsg::Leave { topic: topic.clone(), subscriber }))
    }

    /// The local subscriptions of `topic`.
    pub fn local_subscribers(&self, topic: &TopicKey) -> &[LocalSub] {
        self.local.get(topic).map(SubList::as_slice).unwrap_or(&[])
    }

    /// Number of topics this shard owns (for metrics and tests).
    pub fn owned_topics(&self) -> usize {
        self.owned.len()
    }

    /// Presence members (tracked elements) over the topics this shard owns (for metrics).
    pub fn presence_members(&self) -> usize {
        self.owned.values().filter_map(|topic| topic.presence.as_ref()).map(PresenceState::len).sum()
    }

    /// Number of topics with local subscribers (acknowledged or pending).
    pub fn local_topics(&self) -> usize {
        self.local.len() + self.pending.len()
    }

    /// A summary of this shard's topics for the status page: one walk over the owned topics
    /// (the driver calls it every few seconds, never per request), keeping the `top` topics
    /// with the most subscribers (ties broken by name, so the answer is deterministic).
    pub fn summary(&self, top: usize) -> ShardSummary {
        let mut summary = ShardSummary {
            owned_topics: self.owned.len(),
            local_channels: self.local.values().map(|list| list.subs.len()).sum(),
            presence_members: 0,
            top_topics: Vec::with_capacity(top + 1),
        };
        for (topic, owned) in &self.owned {
            summary.presence_members += owned.presence.as_ref().map_or(0, PresenceState::len);
            let subscribers = owned.subscribers.len();
            if top == 0 || subscribers == 0 {
                continue;
            }
            let worse = |entry: &(TopicKey, usize)| (std::cmp::Reverse(entry.1), entry.0.sub.clone());
            let candidate = (topic.clone(), subscribers);
            if summary.top_topics.len() == top && worse(&candidate) >= worse(summary.top_topics.last().expect("top > 0 and full")) {
                continue;
            }
            let at = summary.top_topics.partition_point(|entry| worse(entry) < worse(&candidate));
            summary.top_topics.insert(at, candidate);
            summary.top_topics.truncate(top);
        }
        summary
    }

    /// Handles one message addressed to this shard. Messages to other shards (and to itself)
    /// are pushed on `out`; what must happen on local connections is returned.
    pub fn handle(&mut self, msg: ShardMsg, out: &mut Vec<(ShardId, ShardMsg)>) -> Option<LocalEffect> {
        match msg {
            ShardMsg::Join { topic, subscriber, presence } => {
                assert_eq!(self.owner(&topic), self.id, "join routed to a shard that does not own the topic");
                let shards = self.shards;
                let owned = self.owned.entry(topic.clone()).or_insert_with(|| OwnedTopic::new(shards));
                if owned.subscribers.insert(subscriber) {
                    owned.per_shard[subscriber.shard.index()] += 1;
                }
                if self.cluster.is_some() {
                    match &mut owned.interest {
                        Interest::On => {}
                        Interest::Waiting(_, held) => {
                            held.push((subscriber, presence));
                            return None;
                        }
                        Interest::Off => {
                            self.next_generation += 1;
                            let generation = self.next_generation;
                            owned.interest = Interest::Waiting(generation, vec![(subscriber, presence)]);
                            self.cluster_out.push(ToLink::Interest { topic, on: true, generation });
                            return None;
                        }
                    }
                }
                let presence = presence.then(|| Arc::new(owned.sent_view()));
                out.push((subscriber.shard, ShardMsg::JoinAck { topic, subscriber, presence }));
                None
            }
            ShardMsg::Leave { topic, subscriber } => {
                assert_eq!(self.owner(&topic), self.id, "leave routed to a shard that does not own the topic");
                let owned = self.owned.get_mut(&topic)?;
                if owned.subscribers.remove(&subscriber) {
                    owned.per_shard[subscriber.shard.index()] -= 1;
                }
                if let Interest::Waiting(_, held) = &mut owned.interest {
                    held.retain(|(s, _)| *s != subscriber);
                }
                let (delta, diff) = owned.presence.as_mut().map(|p| p.untrack(subscriber)).unwrap_or_default();
                self.share_presence(&topic, delta);
                self.presence_changed(&topic, diff, out)
            }
            ShardMsg::Track { topic, subscriber, key, meta } => {
                assert_eq!(self.owner(&topic), self.id, "track routed to a shard that does not own the topic");
                // A track from a channel whose leave already arrived is stale: drop it.
                if !self.owned.get(&topic)?.subscribers.contains(&subscriber) {
                    return None;
                }
                self.ensure_presence(&topic);
                let presence = self.owned.get_mut(&topic)?.presence.as_mut()?;
                let (delta, diff) = presence.track(subscriber, key, meta);
                self.share_presence(&topic, delta);
                self.presence_changed(&topic, diff, out)
            }
            ShardMsg::Untrack { topic, subscriber } => {
                assert_eq!(self.owner(&topic), self.id, "untrack routed to a shard that does not own the topic");
                let owned = self.owned.get_mut(&topic)?;
                let (delta, diff) = owned.presence.as_mut().map(|p| p.untrack(subscriber)).unwrap_or_default();
                self.share_presence(&topic, delta);
                self.presence_changed(&topic, diff, out)
            }
            ShardMsg::Publish { topic, message } => {
                assert_eq!(self.owner(&topic), self.id, "publish routed to a shard that does not own the topic");
                // Single-node mode hands `message` to the fan-out as it is (no extra reference).
                let for_link = self.cluster.is_some().then(|| Arc::clone(&message));
                if let Some(owned) = self.owned.get(&topic) {
                    fan_out(&topic, owned, message, out);
                }
                if let Some(message) = for_link {
                    self.cluster_out.push(ToLink::Publish { topic, message });
                }
                None
            }
            ShardMsg::Deliver { topic, message } => Some(LocalEffect::Deliver { topic, message }),
            ShardMsg::JoinAck { topic, subscriber, presence } => {
                assert_eq!(subscriber.shard, self.id, "join ack routed to the wrong shard");
                // Absent when the channel left before the ack: its Leave is already on its way.
                let sub = self.pending.remove(&(topic.clone(), subscriber.conn, subscriber.channel))?;
                self.local.entry(topic.clone()).or_default().insert(sub);
                Some(LocalEffect::JoinAcked { topic, subscriber, presence })
            }
        }
    }

    /// Cluster mode: hands this node's presence change of `topic` to the link.
    fn share_presence(&mut self, topic: &TopicKey, delta: Delta) {
        if self.cluster.is_some() && !(delta.elements.is_empty() && delta.context == Default::default()) {
            self.cluster_out.push(ToLink::Presence { topic: topic.clone(), delta: Arc::new(delta) });
        }
    }

    /// Sends a presence change now, or holds it for the coalescing window.
    fn presence_changed(&mut self, topic: &TopicKey, diff: Diff, out: &mut Vec<(ShardId, ShardMsg)>) -> Option<LocalEffect> {
        let owned = self.owned.get_mut(topic).expect("caller found the topic");
        if self.cluster.is_some() && owned.subscribers.is_empty() {
            // The last local subscriber left: stop receiving the topic from other nodes and
            // forget their presence (nobody here to show it to; a new join syncs again).
            if !matches!(owned.interest, Interest::Off) {
                owned.interest = Interest::Off;
                self.next_generation += 1;
                self.cluster_out.push(ToLink::Interest { topic: topic.clone(), on: false, generation: self.next_generation });
            }
            if owned.presence.as_ref().is_none_or(PresenceState::only_remote) {
                owned.presence = None;
                owned.pending_diff = None;
            }
        }
        let mut effect = None;
        if !diff.is_empty() {
            match self.coalescing {
                PresenceCoalescing::Immediate => {
                    let message = presence_message(diff);
                    fan_out(topic, owned, message, out);
                }
                PresenceCoalescing::Window => match &mut owned.pending_diff {
                    Some(pending) => pending.coalesce(diff),
                    None => {
                        owned.pending_diff = Some(diff);
                        effect = Some(LocalEffect::SchedulePresenceFlush { topic: topic.clone() });
                    }
                },
            }
        }
        if owned.is_idle() {
            self.owned.remove(topic);
        }
        effect
    }

    /// The coalescing window of `topic` ended: send what accumulated.
    pub fn flush_presence(&mut self, topic: &TopicKey, out: &mut Vec<(ShardId, ShardMsg)>) {
        let Some(owned) = self.owned.get_mut(topic) else { return };
        if let Some(diff) = owned.pending_diff.take() {
            if !diff.is_empty() {
                fan_out(topic, owned, presence_message(diff), out);
            }
        }
        if owned.is_idle() {
            self.owned.remove(topic);
        }
    }

    /// Handles what the cluster link sends this shard (cluster mode).
    pub fn cluster_in(&mut self, msg: FromLink, out: &mut Vec<(ShardId, ShardMsg)>) -> Vec<LocalEffect> {
        let mut effects = Vec::new();
        match msg {
            FromLink::Remote { topic, message } => {
                if let Some(owned) = self.owned.get(&topic) {
                    fan_out(&topic, owned, message, out);
                }
            }
            FromLink::Synced { topic, generation, states } => {
                let Some(owned) = self.owned.get_mut(&topic) else { return effects };
                let held = match (&mut owned.interest, generation) {
                    (Interest::Waiting(waiting, held), Some(generation)) if *waiting == generation => {
                        let held = std::mem::take(held);
                        owned.interest = Interest::On;
                        held
                    }
                    // A re-sync merges into a topic that is still wanted.
                    (Interest::On | Interest::Waiting(..), None) => Vec::new(),
                    // A confirmation of an interest withdrawn or asked again since.
                    _ => return effects,
                };
                let mut diff = Diff::default();
                if states.iter().any(|s| !s.elements.is_empty()) || owned.presence.is_some() {
                    self.ensure_presence(&topic);
                    let presence = self.owned.get_mut(&topic).and_then(|o| o.presence.as_mut()).expect("ensured above");
                    for state in &states {
                        diff.coalesce(presence.merge(&state.without_nodes(|n| self.gone_nodes.contains(&n))));
                    }
                }
                // Members already joined see the other nodes' presence as a diff; the joins
                // held until now get it in their `presence_state`.
                effects.extend(self.presence_changed(&topic, diff, out));
                if let Some(owned) = self.owned.get(&topic) {
                    for (subscriber, presence) in held {
                        let presence = presence.then(|| Arc::new(owned.sent_view()));
                        out.push((subscriber.shard, ShardMsg::JoinAck { topic: topic.clone(), subscriber, presence }));
                    }
                }
            }
            FromLink::Presence { topic, delta } => {
                let Some(owned) = self.owned.get(&topic) else { return effects };
                if matches!(owned.interest, Interest::Off) {
                    return effects;
                }
                let delta = delta.without_nodes(|n| self.gone_nodes.contains(&n));
                self.ensure_presence(&topic);
                let presence = self.owned.get_mut(&topic).and_then(|o| o.presence.as_mut()).expect("ensured above");
                let diff = presence.merge(&delta);
                effects.extend(self.presence_changed(&topic, diff, out));
            }
            FromLink::SnapshotRequest { topic, request } => {
                let delta = self.owned.get(&topic).and_then(|o| o.presence.as_ref()).map(PresenceState::own_delta).unwrap_or_default();
                self.cluster_out.push(ToLink::Snapshot { request, delta });
            }
            FromLink::Republish => {
                let mut shares = Vec::new();
                for (topic, owned) in &self.owned {
                    if let (Interest::On, Some(presence)) = (&owned.interest, &owned.presence) {
                        shares.push(ToLink::Presence { topic: topic.clone(), delta: Arc::new(presence.own_delta()) });
                    }
                }
                self.cluster_out.extend(shares);
            }
            FromLink::NodeBack { node } => self.gone_nodes.retain(|n| *n != node),
            FromLink::NodeGone { node } => {
                if !self.gone_nodes.contains(&node) {
                    if self.gone_nodes.len() >= crate::limits::GONE_NODES_REMEMBERED_MAX {
                        self.gone_nodes.pop_front();
                    }
                    self.gone_nodes.push_back(node);
                }
                let topics: Vec<TopicKey> = self.owned.iter().filter(|(_, o)| o.presence.is_some()).map(|(t, _)| t.clone()).collect();
                for topic in topics {
                    let owned = self.owned.get_mut(&topic).expect("listed above");
                    let diff = owned.presence.as_mut().map(|p| p.forget_node(node)).unwrap_or_default();
                    effects.extend(self.presence_changed(&topic, diff, out));
                }
            }
        }
        effects
    }

    /// Live presence elements of a topic this shard owns (tests, metrics).
    pub fn presence_of(&self, topic: &TopicKey) -> Vec<(Dot, Element)> {
        self.owned
            .get(topic)
            .and_then(|o| o.presence.as_ref())
            .map(|p| p.elements().map(|(d, e)| (*d, e.clone())).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod cluster_tests;
