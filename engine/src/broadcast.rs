//! The canonical form of a broadcast as it travels between shards.
//!
//! It is built once from the inbound frame (or REST call) and shared behind an `Arc`; the
//! receiving shards encode it once per wire format and write the same bytes to every
//! subscriber.

use std::sync::Arc;

use bytes::Bytes;

use crate::presence::Diff;
use crate::{ChannelSerial, ConnId, ShardId};

/// The channel a broadcast came from, so that `self: false` can skip it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    /// Shard of the sending connection.
    pub shard: ShardId,
    /// Sending connection.
    pub conn: ConnId,
    /// Sending channel (join) on that connection.
    pub channel: ChannelSerial,
    /// For a sampled message (delivery latency, `/metrics`): when the driver read the frame, µs
    /// on the driver's monotonic clock; 0 = not sampled. Opaque to the engine.
    pub read_at_micros: u64,
}

/// How the payload of a user broadcast is encoded (PROTOCOL.md §1.6.2 `encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadEncoding {
    /// Raw bytes: only V2 receivers can get it.
    Binary,
    /// UTF-8 JSON text.
    Json,
}

/// What is being broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BroadcastBody {
    /// A Phoenix `broadcast` event from a JSON frame: the payload is forwarded exactly as sent
    /// (PROTOCOL.md §3.3 first row).
    Json {
        /// The raw JSON of the frame's payload.
        payload: Bytes,
    },
    /// A user broadcast with its own event name: binary kind 3 in, kind 4 out to V2 receivers,
    /// `{"type":"broadcast","event":E,"payload":P}` to V1 receivers when the payload is JSON.
    User {
        /// The user event name (UTF-8, at most 255 bytes).
        event: Bytes,
        /// Payload encoding.
        encoding: PayloadEncoding,
        /// The payload bytes.
        payload: Bytes,
        /// Empty, or a JSON object (kept for database rows; ignored from clients).
        metadata: Bytes,
    },
    /// A `presence_diff` (PROTOCOL.md §4.4), sent to every subscriber of the topic.
    PresenceDiff(Arc<Diff>),
}

/// A broadcast on one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broadcast {
    /// The sending channel; `None` for REST and database sources.
    pub origin: Option<Origin>,
    /// The message.
    pub body: BroadcastBody,
}

impl Broadcast {
    /// Bytes of the user payload, the quantity the payload limit applies to (§3.5).
    pub fn payload_len(&self) -> usize {
        match &self.body {
            BroadcastBody::Json { payload } => payload.len(),
            BroadcastBody::User { payload, .. } => payload.len(),
            BroadcastBody::PresenceDiff(_) => 0,
        }
    }
}
