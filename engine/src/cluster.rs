//! The messages between a topic's owner shard and the cluster link (CONTRACT.md "Cluster").
//!
//! The link is a thread outside the shards that speaks NATS; the shards never see its types.
//! An owner shard tells it which topics have local subscribers ([`ToLink::Interest`]), what to
//! send to other nodes (broadcasts published here, this node's presence deltas), and answers its
//! requests for this node's presence of a topic. The link hands back what other nodes sent and
//! confirms interest once NATS has the subscription ([`FromLink::Synced`]), which is what lets
//! the owner hold a join's `ok` until a broadcast sent anywhere afterwards is sure to arrive.

use std::sync::Arc;

use crate::presence::Delta;
use crate::{Broadcast, TopicKey};

/// From an owner shard to the cluster link.
#[derive(Debug, Clone)]
pub enum ToLink {
    /// `topic` gained its first local subscriber (`on`) or lost its last. `generation` comes back
    /// with the [`FromLink::Synced`] that confirms an `on`, so a late confirmation of an earlier
    /// interest is never taken for the current one.
    Interest {
        /// Topic.
        topic: TopicKey,
        /// Subscribe (true) or unsubscribe (false).
        on: bool,
        /// The owner's number for this interest.
        generation: u64,
    },
    /// A broadcast published on this node: send it to the other nodes with subscribers.
    Publish {
        /// Topic.
        topic: TopicKey,
        /// The message (never a presence diff).
        message: Arc<Broadcast>,
    },
    /// This node's presence of `topic` changed (a track, untrack or leave here).
    Presence {
        /// Topic.
        topic: TopicKey,
        /// The change as a CRDT delta.
        delta: Arc<Delta>,
    },
    /// The answer to [`FromLink::SnapshotRequest`]: this node's own presence of the topic
    /// (empty when it has none).
    Snapshot {
        /// The request it answers.
        request: u64,
        /// This node's own elements and dots.
        delta: Delta,
    },
}

/// From the cluster link to an owner shard.
#[derive(Debug, Clone)]
pub enum FromLink {
    /// The subscription for `topic` is in place on NATS (or NATS is unreachable and the topic is
    /// served locally until it is back), with the other nodes' presence of the topic.
    Synced {
        /// Topic.
        topic: TopicKey,
        /// The [`ToLink::Interest`] generation this confirms; `None` for a re-sync (after a
        /// reconnect or a node's return), which only merges.
        generation: Option<u64>,
        /// Each answering node's own presence of the topic.
        states: Vec<Delta>,
    },
    /// A broadcast another node published.
    Remote {
        /// Topic.
        topic: TopicKey,
        /// The message.
        message: Arc<Broadcast>,
    },
    /// Another node's presence of `topic` changed.
    Presence {
        /// Topic.
        topic: TopicKey,
        /// The change.
        delta: Delta,
    },
    /// Another node asks for this node's presence of `topic`: answer with [`ToLink::Snapshot`].
    SnapshotRequest {
        /// Topic.
        topic: TopicKey,
        /// Echoed in the answer.
        request: u64,
    },
    /// Send this node's own presence of every topic with interest again (NATS came back: what
    /// was published while it was away is lost).
    Republish,
    /// Node (incarnation) `node` is gone: its presences leave everywhere, and whatever still
    /// arrives from it (a delta that was in flight, a stale snapshot) is ignored until
    /// [`FromLink::NodeBack`].
    NodeGone {
        /// The node's incarnation, the high half of its replicas' ids.
        node: u32,
    },
    /// A node declared gone speaks again (a partition healed): its presences are accepted
    /// again (the re-sync that follows brings them back).
    NodeBack {
        /// The node's incarnation.
        node: u32,
    },
}

impl FromLink {
    /// Whether dropping this message when a shard's inbox is full only loses a delivery (a
    /// broadcast); everything else changes state and is never dropped.
    pub fn is_droppable(&self) -> bool {
        matches!(self, FromLink::Remote { .. })
    }
}
