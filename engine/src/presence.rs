//! Presence state of one topic: a delta-state observed-remove map, as a plain value.
//!
//! Each tracked meta is an element identified by a unique [`Dot`] (replica, counter); its
//! `phx_ref` is derived from the dot. The state is the set of live elements plus a *causal
//! context*: every dot this replica has ever seen, alive or removed. Merging two states keeps an
//! element when both have it, or when one has it and the other has never seen its dot; an
//! element one side has and the other has seen but dropped was removed. This is the classic
//! causal-context OR-set; merge is commutative, associative and idempotent, and every
//! operation returns the *delta* (a small state) plus the joins and leaves it caused, so a later
//! multi-node version can ship deltas between nodes without redesign (PROTOCOL.md §4.1:
//! "the union of all entries across the cluster").
//!
//! No IO, no clock, no JSON: metas are opaque bytes (the JSON object the client tracked,
//! normalised by the codec); the shard that owns the topic wraps this value.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;

use crate::Subscriber;

/// A replica of a topic's presence: one instance of a topic's state on its owner shard. The high
/// 32 bits name the node (its incarnation; 0 in single-node mode), the low 32 bits the instance
/// on that node, so dots stay unique across nodes and across a topic's state being dropped and
/// created again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaId(pub u64);

impl ReplicaId {
    /// A replica of node `node`, instance `instance`.
    pub fn of(node: u32, instance: u32) -> ReplicaId {
        ReplicaId((u64::from(node) << 32) | u64::from(instance))
    }

    /// The node (incarnation) that created this replica.
    pub fn node(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// The unique id of one tracked meta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dot {
    /// Replica that created the element.
    pub replica: ReplicaId,
    /// Its counter at creation (starts at 1).
    pub counter: u64,
}

/// One tracked meta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// Presence key (`config.presence.key` or a generated one).
    pub key: Arc<str>,
    /// The tracked payload: a JSON object, normalised (no `phx_ref`/`phx_ref_prev` fields).
    pub meta: Bytes,
    /// The channel that tracked it.
    pub owner: Subscriber,
    /// The element this one replaced (its `phx_ref` becomes `phx_ref_prev`).
    pub prev: Option<Dot>,
}

/// Every dot a replica has seen: a contiguous prefix per replica plus the stragglers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CausalContext {
    prefix: BTreeMap<ReplicaId, u64>,
    cloud: BTreeSet<Dot>,
}

impl CausalContext {
    /// Whether `dot` has been seen.
    pub fn contains(&self, dot: Dot) -> bool {
        self.prefix.get(&dot.replica).is_some_and(|&max| dot.counter <= max) || self.cloud.contains(&dot)
    }

    /// Records `dot` as seen, compacting contiguous dots into the prefix.
    pub fn insert(&mut self, dot: Dot) {
        if self.contains(dot) {
            return;
        }
        let max = self.prefix.entry(dot.replica).or_insert(0);
        if dot.counter == *max + 1 {
            *max += 1;
            while self.cloud.remove(&Dot { replica: dot.replica, counter: *max + 1 }) {
                *max += 1;
            }
        } else {
            self.cloud.insert(dot);
        }
    }

    /// Adds every dot of `other`.
    pub fn union(&mut self, other: &CausalContext) {
        for (&replica, &max) in &other.prefix {
            let mine = self.prefix.entry(replica).or_insert(0);
            if max > *mine {
                *mine = max;
            }
            let mine = *mine;
            self.cloud.retain(|d| !(d.replica == replica && d.counter <= mine));
            while self.cloud.remove(&Dot { replica, counter: *self.prefix.get(&replica).expect("inserted") + 1 }) {
                *self.prefix.get_mut(&replica).expect("inserted") += 1;
            }
        }
        for &dot in &other.cloud {
            self.insert(dot);
        }
    }

    /// Forgets every dot of node `node`'s replicas (the node was declared dead: if it comes
    /// back, its elements are added again by the next merge of its state).
    pub fn forget_node(&mut self, node: u32) {
        self.prefix.retain(|replica, _| replica.node() != node);
        self.cloud.retain(|dot| dot.replica.node() != node);
    }

    /// The dots of `replica` only.
    pub fn only(&self, replica: ReplicaId) -> CausalContext {
        let mut context = CausalContext::default();
        if let Some(&max) = self.prefix.get(&replica) {
            context.prefix.insert(replica, max);
        }
        context.cloud = self.cloud.iter().filter(|dot| dot.replica == replica).copied().collect();
        context
    }

    /// The contiguous prefix per replica and the stragglers (for encoding).
    pub fn parts(&self) -> (impl Iterator<Item = (ReplicaId, u64)> + '_, impl Iterator<Item = Dot> + '_) {
        (self.prefix.iter().map(|(r, m)| (*r, *m)), self.cloud.iter().copied())
    }

    /// Builds a context from its parts (decoding); any input gives a valid context.
    pub fn from_parts(prefix: impl IntoIterator<Item = (ReplicaId, u64)>, cloud: impl IntoIterator<Item = Dot>) -> CausalContext {
        let mut context = CausalContext::default();
        for (replica, max) in prefix {
            let mut one = CausalContext::default();
            one.prefix.insert(replica, max);
            context.union(&one);
        }
        for dot in cloud {
            context.insert(dot);
        }
        context
    }

    /// Highest counter of `replica` seen contiguously.
    fn max(&self, replica: ReplicaId) -> u64 {
        self.prefix.get(&replica).copied().unwrap_or(0)
    }
}

/// A state fragment to merge elsewhere (what an operation changed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Elements added.
    pub elements: BTreeMap<Dot, Element>,
    /// Dots covered (added and removed).
    pub context: CausalContext,
}

/// What an operation or merge changed, for `presence_diff`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// Elements that appeared.
    pub joins: Vec<(Dot, Element)>,
    /// Elements that disappeared.
    pub leaves: Vec<(Dot, Element)>,
}

impl Diff {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }

    /// Appends a later diff, cancelling elements that joined and left within the window (the
    /// receivers never saw them).
    pub fn coalesce(&mut self, later: Diff) {
        for (dot, element) in later.leaves {
            if let Some(index) = self.joins.iter().position(|(d, _)| *d == dot) {
                self.joins.swap_remove(index);
            } else {
                self.leaves.push((dot, element));
            }
        }
        self.joins.extend(later.joins);
    }
}

/// The presence state of one topic on one replica.
#[derive(Debug, Clone)]
pub struct PresenceState {
    replica: ReplicaId,
    elements: BTreeMap<Dot, Element>,
    context: CausalContext,
    /// Derived index: the live element of each channel (a channel tracks at most one).
    by_owner: BTreeMap<Subscriber, Dot>,
}

impl PresenceState {
    /// An empty state on `replica`.
    pub fn new(replica: ReplicaId) -> PresenceState {
        PresenceState { replica, elements: BTreeMap::new(), context: CausalContext::default(), by_owner: BTreeMap::new() }
    }

    /// Live elements in dot order.
    pub fn elements(&self) -> impl Iterator<Item = (&Dot, &Element)> {
        self.elements.iter()
    }

    /// Number of live elements.
    pub fn len(&self) -> usize {
        self.elements.len()
    }

    /// No live element.
    pub fn is_empty(&self) -> bool {
        self.elements.is_empty()
    }

    /// The causal context.
    pub fn context(&self) -> &CausalContext {
        &self.context
    }

    /// The whole state as a delta (for full-state merges).
    pub fn as_delta(&self) -> Delta {
        Delta { elements: self.elements.clone(), context: self.context.clone() }
    }

    /// `owner` tracks `meta` under `key`. Replaces the channel's previous meta (the new one
    /// carries `prev`); tracking an identical meta under the same key changes nothing.
    pub fn track(&mut self, owner: Subscriber, key: Arc<str>, meta: Bytes) -> (Delta, Diff) {
        let mut delta = Delta::default();
        let mut diff = Diff::default();
        let prev = self.by_owner.get(&owner).copied();
        if let Some(prev_dot) = prev {
            let old = &self.elements[&prev_dot];
            if old.key == key && old.meta == meta {
                return (delta, diff);
            }
            let old = self.remove(prev_dot);
            delta.context.insert(prev_dot);
            diff.leaves.push((prev_dot, old));
        }
        let dot = Dot { replica: self.replica, counter: self.context.max(self.replica) + 1 };
        let element = Element { key, meta, owner, prev };
        self.context.insert(dot);
        self.by_owner.insert(owner, dot);
        self.elements.insert(dot, element.clone());
        delta.context.insert(dot);
        delta.elements.insert(dot, element.clone());
        diff.joins.push((dot, element));
        (delta, diff)
    }

    /// `owner` stops tracking (untrack, leave, disconnect). No-op when it tracks nothing.
    pub fn untrack(&mut self, owner: Subscriber) -> (Delta, Diff) {
        let mut delta = Delta::default();
        let mut diff = Diff::default();
        if let Some(dot) = self.by_owner.get(&owner).copied() {
            let element = self.remove(dot);
            delta.context.insert(dot);
            diff.leaves.push((dot, element));
        }
        (delta, diff)
    }

    fn remove(&mut self, dot: Dot) -> Element {
        let element = self.elements.remove(&dot).expect("indexed element exists");
        if self.by_owner.get(&element.owner) == Some(&dot) {
            self.by_owner.remove(&element.owner);
        }
        element
    }

    /// Merges a delta (or a whole state via [`PresenceState::as_delta`]); returns what changed.
    pub fn merge(&mut self, delta: &Delta) -> Diff {
        let mut diff = Diff::default();
        let removed: Vec<Dot> = self
            .elements
            .keys()
            .filter(|dot| delta.context.contains(**dot) && !delta.elements.contains_key(dot))
            .copied()
            .collect();
        for dot in removed {
            let element = self.remove(dot);
            diff.leaves.push((dot, element));
        }
        for (dot, element) in &delta.elements {
            if !self.elements.contains_key(dot) && !self.context.contains(*dot) {
                // Only this replica's own elements are indexed by channel: another node's
                // channel ids mean nothing here and could equal a local one.
                if dot.replica == self.replica {
                    self.by_owner.insert(element.owner, *dot);
                }
                self.elements.insert(*dot, element.clone());
                diff.joins.push((*dot, element.clone()));
            }
        }
        self.context.union(&delta.context);
        diff
    }
}

impl Delta {
    /// The delta without anything of the nodes `gone` says are gone (their elements and dots).
    pub fn without_nodes(&self, gone: impl Fn(u32) -> bool) -> Delta {
        if !self.elements.keys().any(|dot| gone(dot.replica.node())) && !self.context.prefix.keys().any(|r| gone(r.node())) && !self.context.cloud.iter().any(|d| gone(d.replica.node())) {
            return self.clone();
        }
        let elements = self.elements.iter().filter(|(dot, _)| !gone(dot.replica.node())).map(|(d, e)| (*d, e.clone())).collect();
        let mut context = self.context.clone();
        context.prefix.retain(|replica, _| !gone(replica.node()));
        context.cloud.retain(|dot| !gone(dot.replica.node()));
        Delta { elements, context }
    }
}

impl PresenceState {
    /// This replica's own elements with its own dots: what it answers another node's sync
    /// request with (the other nodes' elements are theirs to send).
    pub fn own_delta(&self) -> Delta {
        let elements = self.elements.iter().filter(|(dot, _)| dot.replica == self.replica).map(|(d, e)| (*d, e.clone())).collect();
        Delta { elements, context: self.context.only(self.replica) }
    }

    /// Node `node` is gone: its elements leave and its dots are forgotten.
    pub fn forget_node(&mut self, node: u32) -> Diff {
        let gone: Vec<Dot> = self.elements.keys().filter(|dot| dot.replica.node() == node).copied().collect();
        let mut diff = Diff::default();
        for dot in gone {
            let element = self.remove(dot);
            diff.leaves.push((dot, element));
        }
        self.context.forget_node(node);
        diff
    }

    /// Whether every live element is another replica's (no local channel tracks anything).
    pub fn only_remote(&self) -> bool {
        self.by_owner.is_empty()
    }
}

impl PartialEq for PresenceState {
    /// Replica-independent equality: same live elements and same causal context.
    fn eq(&self, other: &PresenceState) -> bool {
        self.elements == other.elements && self.context == other.context
    }
}

#[cfg(test)]
mod tests;
