//! Channel identity and topic → shard routing.
//!
//! A channel is identified by its sub-topic and its kind (public or private): `realtime:room`
//! and `room` are the same channel (PROTOCOL.md §0.4, §1.7), while private and public channels
//! of one name are different topics (§1.7).

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use crate::{ShardId, TenantId};

/// The prefix the official clients put in front of every channel name.
pub const PREFIX: &str = "realtime:";

/// Fixed seeds, so that every shard (and every restart) agrees on topic ownership.
const SEEDS: [u64; 4] = [0x5eed_0f70_091c, 0x0dd_ba11, 0xfeed_face, 0xc0ff_ee00];

/// The key a topic is stored and routed under.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicKey {
    /// The project the channel belongs to.
    pub tenant: TenantId,
    /// Private channels are gated by `realtime.messages` policies and never meet public ones.
    pub private: bool,
    /// The sub-topic: the joined topic without a leading `realtime:`.
    pub sub: Arc<str>,
}

/// The sub-topic of a joined topic: `realtime:x` → `x`, `x` → `x`.
pub fn sub_topic(topic: &str) -> &str {
    topic.strip_prefix(PREFIX).unwrap_or(topic)
}

impl TopicKey {
    /// Builds the key of a topic as a client spelled it.
    pub fn new(tenant: TenantId, topic: &str, private: bool) -> TopicKey {
        TopicKey { tenant, private, sub: Arc::from(sub_topic(topic)) }
    }

    /// Builds the key of a sub-topic given as is (REST and database broadcasts address
    /// sub-topics: `realtime:x` there means the channel `realtime:realtime:x`, PROTOCOL.md §8.1).
    pub fn new_sub(tenant: TenantId, sub: &str, private: bool) -> TopicKey {
        TopicKey { tenant, private, sub: Arc::from(sub) }
    }

    /// The shard that owns this topic: `hash(tenant, kind, sub-topic) % shards`.
    pub fn owner(&self, shards: usize) -> ShardId {
        assert!(shards > 0 && shards <= usize::from(u16::MAX));
        let state = ahash::RandomState::with_seeds(SEEDS[0], SEEDS[1], SEEDS[2], SEEDS[3]);
        let mut hasher = state.build_hasher();
        self.tenant.0.hash(&mut hasher);
        self.private.hash(&mut hasher);
        self.sub.hash(&mut hasher);
        ShardId((hasher.finish() % shards as u64) as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixed_and_bare_topics_are_one_channel() {
        let t = TenantId::SINGLE;
        assert_eq!(TopicKey::new(t, "realtime:chat:room-42", false), TopicKey::new(t, "chat:room-42", false));
        assert_ne!(TopicKey::new(t, "room", false), TopicKey::new(t, "room", true));
        assert_ne!(TopicKey::new(t, "room", false), TopicKey::new(TenantId(1), "room", false), "tenants never share a topic");
        assert_eq!(sub_topic("realtime:"), "");
        assert_eq!(sub_topic("realtime:realtime:x"), "realtime:x");
    }

    #[test]
    fn ownership_is_stable_and_spread() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            let key = TopicKey::new(TenantId::SINGLE, &format!("room-{i}"), false);
            assert_eq!(key.owner(4), key.owner(4));
            counts[key.owner(4).index()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
