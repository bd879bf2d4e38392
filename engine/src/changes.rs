//! The messages between sessions (in `net`) and the Postgres Changes core (in `replication`):
//! [`Command`] one way, [`PgOut`] the other, with the channel keys and authorization types they
//! carry. They live here so that neither side depends on the other; the binary wires the
//! queues. Plain values: bindings travel as JSON text, answers to a waiting REST caller as a
//! callback.

use std::sync::Arc;

use bytes::Bytes;

use crate::{ChannelSerial, ConnId, ShardId};

/// Capacity of each shard's inbox from the core (batches of deliveries).
pub const SHARD_INBOX_MAX: usize = 4096;
/// Capacity of the sessions → core command queue.
pub const COMMANDS_MAX: usize = 65_536;

/// Cluster mode: channel keys whose shard id is at least this belong to another node (the
/// leader's cluster link maps each (node, shard) to one such id); the core's deliveries to them
/// go to the link instead of a local shard.
pub const REMOTE_SHARD_BASE: u16 = 0x8000;

/// What a policy check asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckKind {
    /// SELECT policies: broadcast and presence read.
    Read,
    /// INSERT policies: broadcast and presence write.
    Write,
}

/// Who asks, about which topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AuthzRequest {
    /// Role claim.
    pub role: String,
    /// All claims, as JSON.
    pub claims_json: String,
    /// The `sub` claim, if any.
    pub sub: Option<String>,
    /// The sub-topic (`realtime.topic()`).
    pub topic: String,
    /// Read or write.
    pub kind: CheckKind,
}

/// The answer: per extension, granted or not; `error` when the check could not run (a policy
/// raising an error, the database down), which counts as a denial with a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzResult {
    /// `extension = 'broadcast'`.
    pub broadcast: bool,
    /// `extension = 'presence'`.
    pub presence: bool,
    /// Why the check failed, when it did.
    pub error: Option<String>,
}

impl AuthzResult {
    /// A check that could not run: a denial with its reason.
    pub fn failed(message: String) -> AuthzResult {
        AuthzResult { broadcast: false, presence: false, error: Some(message) }
    }
}

/// The answer path of a REST caller waiting for a policy check: called once, from the core's
/// thread (the caller passes a closure that hands the result to its own bounded queue).
pub struct CallerReply(Box<dyn FnOnce(AuthzResult) + Send>);

impl CallerReply {
    /// Wraps the callback.
    pub fn new(reply: impl FnOnce(AuthzResult) + Send + 'static) -> CallerReply {
        CallerReply(Box::new(reply))
    }

    /// Delivers the answer.
    pub fn send(self, result: AuthzResult) {
        (self.0)(result)
    }
}

impl std::fmt::Debug for CallerReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallerReply")
    }
}

/// The id of a binding: a stable non-zero 31-bit hash (FNV-1a folded to 31 bits) of its
/// canonical JSON text (keys sorted), so two identical bindings on one channel get the same id
/// (PROTOCOL.md §2.6). The session computes it for the join reply, the core for deliveries.
pub fn binding_id(canonical_json: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &byte in canonical_json {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    match hash & 0x7fff_ffff {
        0 => 1,
        id => id,
    }
}

/// A channel, as the core addresses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelKey {
    /// Shard of the connection.
    pub shard: ShardId,
    /// Connection.
    pub conn: ConnId,
    /// Join.
    pub channel: ChannelSerial,
}

/// A channel's Postgres Changes subscription.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The channel.
    pub key: ChannelKey,
    /// The channel token's `role`.
    pub role: String,
    /// The channel token's claims, as JSON (for `request.jwt.claims`).
    pub claims_json: String,
    /// Bindings as the client sent them, in order, each as its JSON object text (what
    /// [`binding_id`] hashes).
    pub bindings: Vec<String>,
}

/// Where an authorization answer goes.
#[derive(Debug)]
pub enum AuthzReply {
    /// To a channel, through its shard's inbox.
    Channel(ChannelKey),
    /// To a waiting caller (REST).
    Caller(CallerReply),
}

/// From sessions to the core.
#[derive(Debug)]
pub enum Command {
    /// Subscribe (or re-subscribe with new claims: the old subscription is replaced).
    Subscribe(Subscription),
    /// The channel left or its connection closed.
    Unsubscribe(ChannelKey),
    /// Stored broadcasts for a private channel's replay (PROTOCOL.md §3.6).
    Replay {
        /// The channel.
        key: ChannelKey,
        /// Sub-topic.
        topic: String,
        /// Unix ms.
        since_ms: i64,
        /// 1..=25.
        limit: i64,
    },
    /// A private-channel policy check.
    Authorize {
        /// What to check.
        request: AuthzRequest,
        /// Where the answer goes.
        reply: AuthzReply,
    },
}

/// From the core to a shard.
#[derive(Debug, Clone)]
pub enum PgOut {
    /// A `system` push for one channel.
    System {
        /// Connection.
        conn: ConnId,
        /// Join.
        channel: ChannelSerial,
        /// `ok` or `error`.
        status: &'static str,
        /// Message.
        message: String,
    },
    /// A change for several channels (same payload).
    Change(Arc<ChangeDelivery>),
    /// The answer to a channel's policy check.
    Authorized {
        /// Connection.
        conn: ConnId,
        /// Join.
        channel: ChannelSerial,
        /// Read or write.
        kind: CheckKind,
        /// The answer.
        result: AuthzResult,
    },
    /// The stored messages a channel asked to replay, oldest first, or why they could not be read.
    Replayed {
        /// Connection.
        conn: ConnId,
        /// Join.
        channel: ChannelSerial,
        /// The messages.
        result: Result<Vec<ReplayedMessage>, String>,
    },
    /// A broadcast from the database (`realtime.send`, PROTOCOL.md §3.4), sent to the shard
    /// that owns its topic, which fans it out like any broadcast.
    Publish {
        /// Topic.
        topic: crate::TopicKey,
        /// The message (a user broadcast with metadata `{"id": …}`).
        message: Arc<crate::Broadcast>,
    },
}

/// A stored broadcast for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayedMessage {
    /// Row id.
    pub id: String,
    /// Event.
    pub event: String,
    /// JSON payload text, or
    pub payload: Option<String>,
    /// the binary payload.
    pub binary: Option<Vec<u8>>,
}

/// One payload and the channels that get it.
#[derive(Debug)]
pub struct ChangeDelivery {
    /// `{"ids":[…],"data":{…}}` for V1 sockets (with `eventType`/`new`/`old`, PROTOCOL.md §0.4).
    pub payload_v1: Bytes,
    /// `{"ids":[…],"data":{…}}` for V2 sockets.
    pub payload_v2: Bytes,
    /// Channels on this shard.
    pub targets: Vec<(ConnId, ChannelSerial)>,
    /// Where the change is in the database's commit order: (end LSN of its transaction's
    /// commit, its index in the transaction). The same on every node that streams the
    /// database, so a channel skips what it already got when a new leader resumes from the
    /// shared slot's confirmed position (cluster mode). `(0, 0)`: unknown (not checked).
    pub position: (u64, u32),
}


