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

use crate::{Broadcast, ChannelSerial, ConnId, ShardId, TopicKey};

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
    },
    /// To the owner: remove a subscription.
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
    },
}

impl ShardMsg {
    /// Whether dropping this message (when a peer's queue overflows) only loses a delivery,
    /// never corrupts state. Only broadcasts may be dropped.
    pub fn is_droppable(&self) -> bool {
        matches!(self, ShardMsg::Publish { .. } | ShardMsg::Deliver { .. })
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
    },
}

/// A topic this shard owns.
#[derive(Debug, Default)]
struct OwnedTopic {
    subscribers: AHashSet<Subscriber>,
    /// Subscribers per shard, indexed by `ShardId`.
    per_shard: Vec<u32>,
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

/// All topic state of one shard.
#[derive(Debug)]
pub struct ShardState {
    id: ShardId,
    shards: usize,
    owned: AHashMap<TopicKey, OwnedTopic>,
    local: AHashMap<TopicKey, SubList>,
}

impl ShardState {
    /// A shard `id` of `shards`.
    pub fn new(id: ShardId, shards: usize) -> ShardState {
        assert!(id.index() < shards);
        ShardState { id, shards, owned: AHashMap::new(), local: AHashMap::new() }
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
    pub fn local_join(&mut self, topic: TopicKey, sub: LocalSub) -> (ShardId, ShardMsg) {
        self.local.entry(topic.clone()).or_default().insert(sub);
        let subscriber = Subscriber { shard: self.id, conn: sub.conn, channel: sub.channel };
        (self.owner(&topic), ShardMsg::Join { topic, subscriber })
    }

    /// A local channel leaves `topic` (leave, duplicate join, close): it stops receiving at
    /// once; the owner is told. Returns `None` when the channel was not subscribed.
    pub fn local_leave(
        &mut self,
        topic: &TopicKey,
        conn: ConnId,
        channel: ChannelSerial,
    ) -> Option<(ShardId, ShardMsg)> {
        let list = self.local.get_mut(topic)?;
        if !list.remove(conn, channel) {
            return None;
        }
        if list.is_empty() {
            self.local.remove(topic);
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

    /// Number of topics with local subscribers.
    pub fn local_topics(&self) -> usize {
        self.local.len()
    }

    /// Handles one message addressed to this shard. Messages to other shards (and to itself)
    /// are pushed on `out`; what must happen on local connections is returned.
    pub fn handle(&mut self, msg: ShardMsg, out: &mut Vec<(ShardId, ShardMsg)>) -> Option<LocalEffect> {
        match msg {
            ShardMsg::Join { topic, subscriber } => {
                assert_eq!(self.owner(&topic), self.id, "join routed to a shard that does not own the topic");
                let owned = self.owned.entry(topic.clone()).or_insert_with(|| OwnedTopic {
                    subscribers: AHashSet::new(),
                    per_shard: vec![0; self.shards],
                });
                if owned.subscribers.insert(subscriber) {
                    owned.per_shard[subscriber.shard.index()] += 1;
                }
                out.push((subscriber.shard, ShardMsg::JoinAck { topic, subscriber }));
                None
            }
            ShardMsg::Leave { topic, subscriber } => {
                assert_eq!(self.owner(&topic), self.id, "leave routed to a shard that does not own the topic");
                if let Some(owned) = self.owned.get_mut(&topic) {
                    if owned.subscribers.remove(&subscriber) {
                        owned.per_shard[subscriber.shard.index()] -= 1;
                    }
                    if owned.subscribers.is_empty() {
                        self.owned.remove(&topic);
                    }
                }
                None
            }
            ShardMsg::Publish { topic, message } => {
                assert_eq!(self.owner(&topic), self.id, "publish routed to a shard that does not own the topic");
                if let Some(owned) = self.owned.get(&topic) {
                    for (index, &count) in owned.per_shard.iter().enumerate() {
                        if count > 0 {
                            let deliver = ShardMsg::Deliver { topic: topic.clone(), message: Arc::clone(&message) };
                            out.push((ShardId(index as u16), deliver));
                        }
                    }
                }
                None
            }
            ShardMsg::Deliver { topic, message } => Some(LocalEffect::Deliver { topic, message }),
            ShardMsg::JoinAck { topic, subscriber } => {
                assert_eq!(subscriber.shard, self.id, "join ack routed to the wrong shard");
                Some(LocalEffect::JoinAcked { topic, subscriber })
            }
        }
    }
}

#[cfg(test)]
mod tests;
