//! Encode-once delivery of a broadcast to one shard's local subscribers.
//!
//! A message is encoded at most once per (wire format, topic spelling) on each shard (four
//! variants at most) and the same [`Bytes`] handle is queued on every subscriber; nothing is
//! serialised per subscriber (PROTOCOL.md §3.3, last paragraph).

use bytes::Bytes;

use engine::topic::PREFIX;
use engine::{Broadcast, ConnId, Format, LocalSub, ShardId, TopicKey};

use crate::frame;

/// Lazily encoded variants of one message.
#[derive(Debug)]
pub struct EncodeCache<'m> {
    message: &'m Broadcast,
    sub_topic: &'m str,
    /// Index: format (V1 = 0, V2 = 1) × 2 + prefixed. `Some(None)`: this variant cannot be
    /// delivered (binary payload to V1).
    slots: [Option<Option<Bytes>>; 4],
}

impl<'m> EncodeCache<'m> {
    /// A cache for `message` on `topic`.
    pub fn new(topic: &'m TopicKey, message: &'m Broadcast) -> EncodeCache<'m> {
        EncodeCache { message, sub_topic: &topic.sub, slots: [None, None, None, None] }
    }

    /// The frame for a receiver of `format` that joined with (`prefixed`) or without the
    /// `realtime:` prefix.
    pub fn get(&mut self, format: Format, prefixed: bool) -> Option<&Bytes> {
        let index = match format {
            Format::V1 => 0,
            Format::V2 => 2,
        } + usize::from(prefixed);
        let message = self.message;
        let sub_topic = self.sub_topic;
        self.slots[index]
            .get_or_insert_with(|| {
                if prefixed {
                    let topic = format!("{PREFIX}{sub_topic}");
                    frame::encode_broadcast(format, &topic, message)
                } else {
                    frame::encode_broadcast(format, sub_topic, message)
                }
            })
            .as_ref()
    }
}

/// Writes `message` to every local subscriber of `topic` on `shard` through `write` (which
/// returns whether it delivered), skipping the sender's own channel unless it asked for `self`.
/// Returns the number of deliveries.
pub fn deliver(
    shard: ShardId,
    subscribers: &[LocalSub],
    topic: &TopicKey,
    message: &Broadcast,
    mut write: impl FnMut(ConnId, engine::ChannelSerial, &Bytes) -> bool,
) -> usize {
    let mut cache = EncodeCache::new(topic, message);
    let mut delivered = 0;
    let is_presence = matches!(message.body, engine::BroadcastBody::PresenceDiff(_));
    for sub in subscribers {
        let readable = if is_presence { sub.receive_presence } else { sub.receive_broadcasts };
        if !readable {
            continue;
        }
        if !sub.receive_own {
            if let Some(origin) = message.origin {
                if origin.shard == shard && origin.conn == sub.conn && origin.channel == sub.channel {
                    continue;
                }
            }
        }
        if let Some(bytes) = cache.get(sub.format, sub.prefixed) {
            if write(sub.conn, sub.channel, bytes) {
                delivered += 1;
            }
        }
    }
    delivered
}
