//! What nodes send each other over NATS, as bytes. Pure; every input decodes to a value or a
//! [`WireError`], never a panic, and nothing is allocated on a length's promise beyond the bytes
//! actually present (the `cluster_wire` fuzz target checks both, and the round trip).
//!
//! Layout: a version byte (1), a kind byte, then the kind's fields. Integers are big-endian;
//! strings and byte strings are a `u32` length then the bytes (`u16` for event names).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use engine::broadcast::PayloadEncoding;
use engine::presence::{CausalContext, Delta, Dot, Element, ReplicaId};
use engine::{BroadcastBody, ChannelSerial, ConnId, ShardId, Subscriber};

const VERSION: u8 = 1;

/// The largest dot counter accepted from another node.
const COUNTER_MAX: u64 = 1 << 62;

/// One message between nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wire {
    /// A broadcast on the topic its subject names.
    Broadcast {
        /// Private channel.
        private: bool,
        /// The sub-topic (checked against the subscription's: subjects are hashes).
        sub: Arc<str>,
        /// The message (never a presence diff).
        body: BroadcastBody,
    },
    /// A presence change of the sending node on the topic its subject names.
    Presence {
        /// Private channel.
        private: bool,
        /// The sub-topic.
        sub: Arc<str>,
        /// The change.
        delta: Delta,
    },
    /// "Send me your presence of this topic" (on the sync subject, with a reply subject).
    SyncRequest {
        /// The tenant's external id (`""` in single-tenant mode).
        tenant: String,
        /// Private channel.
        private: bool,
        /// The sub-topic.
        sub: Arc<str>,
    },
    /// The answer: the sender's own presence of that topic.
    Snapshot {
        /// Its elements and dots.
        delta: Delta,
    },
    /// A node is alive, with its tenants' counts (for the cluster-wide limits).
    Heartbeat {
        /// Its incarnation (random per process start).
        incarnation: u32,
        /// Its name (`REALTIME_NODE_ID`).
        node: String,
        /// Its tenants with anything to count (the others count zero).
        counts: Vec<TenantCounts>,
        /// The tenants whose database stream it leads (external ids).
        leads: Vec<String>,
    },
    /// A follower's Postgres Changes subscription change, to the tenant database's leader.
    PgCommand {
        /// The tenant's external id.
        tenant: String,
        /// The sending node's incarnation.
        from: u32,
        /// What changes.
        command: PgCommand,
    },
    /// The leader's messages for channels of the receiving node, in the core's order.
    PgOut {
        /// (the channel's shard on the receiving node, the message).
        items: Vec<(u16, PgOutItem)>,
    },
    /// A node stops (drain): its presences leave at once.
    Bye {
        /// Its incarnation.
        incarnation: u32,
    },
}

/// One tenant's counts on one node (its shards' sums).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantCounts {
    /// The tenant's external id.
    pub tenant: String,
    /// Connected users, then the window sums of events, joins, database events, presence
    /// events and REST requests ([`COUNTS`] values, in that order).
    pub values: [u64; COUNTS],
}

/// A subscription change forwarded to the leader (keys as the sending node has them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgCommand {
    /// Subscribe, or replace the channel's subscription.
    Subscribe {
        /// Shard, connection and join of the channel on the sending node.
        shard: u16,
        /// See `shard`.
        conn: u64,
        /// See `shard`.
        channel: u32,
        /// The channel token's role.
        role: String,
        /// Its claims as JSON.
        claims: String,
        /// The bindings as the client sent them.
        bindings: Vec<String>,
    },
    /// The channel left.
    Unsubscribe {
        /// See [`PgCommand::Subscribe`].
        shard: u16,
        /// See `shard`.
        conn: u64,
        /// See `shard`.
        channel: u32,
    },
}

/// What the leader's core sends a follower's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutItem {
    /// A `system` push.
    System {
        /// Connection.
        conn: u64,
        /// Join.
        channel: u32,
        /// `true`: status `ok`, else `error`.
        ok: bool,
        /// The message.
        message: String,
    },
    /// A change for several channels of one shard.
    Change {
        /// Its place in the database's commit order (see `engine::changes::ChangeDelivery`).
        position: (u64, u32),
        /// The V1 payload.
        payload_v1: Bytes,
        /// The V2 payload.
        payload_v2: Bytes,
        /// (connection, join) of each channel.
        targets: Vec<(u64, u32)>,
    },
}

/// Values per [`TenantCounts`].
pub const COUNTS: usize = 6;

/// Bytes that are not a message of this version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than its fields say.
    Truncated,
    /// An unknown version or kind byte, or an invalid field.
    Invalid(&'static str),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Truncated => f.write_str("truncated cluster message"),
            WireError::Invalid(what) => write!(f, "invalid cluster message: {what}"),
        }
    }
}

impl std::error::Error for WireError {}

const KIND_BROADCAST: u8 = 1;
const KIND_PRESENCE: u8 = 2;
const KIND_SYNC_REQUEST: u8 = 3;
const KIND_SNAPSHOT: u8 = 4;
const KIND_HEARTBEAT: u8 = 5;
const KIND_BYE: u8 = 6;
const KIND_PG_COMMAND: u8 = 7;
const KIND_PG_OUT: u8 = 8;

/// Encodes a message.
pub fn encode(wire: &Wire) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    out.put_u8(VERSION);
    match wire {
        Wire::Broadcast { private, sub, body } => {
            out.put_u8(KIND_BROADCAST);
            out.put_u8(u8::from(*private));
            put_bytes(&mut out, sub.as_bytes());
            match body {
                BroadcastBody::Json { payload } => {
                    out.put_u8(0);
                    put_bytes(&mut out, payload);
                }
                BroadcastBody::User { event, encoding, payload, metadata } => {
                    out.put_u8(1);
                    let event = &event[..event.len().min(usize::from(u16::MAX))];
                    out.put_u16(event.len() as u16);
                    out.put_slice(event);
                    out.put_u8(match encoding {
                        PayloadEncoding::Binary => 0,
                        PayloadEncoding::Json => 1,
                    });
                    put_bytes(&mut out, payload);
                    put_bytes(&mut out, metadata);
                }
                // Presence travels as deltas (`Wire::Presence`), never as rendered diffs.
                BroadcastBody::PresenceDiff(_) => out.put_u8(2),
            }
        }
        Wire::Presence { private, sub, delta } => {
            out.put_u8(KIND_PRESENCE);
            out.put_u8(u8::from(*private));
            put_bytes(&mut out, sub.as_bytes());
            put_delta(&mut out, delta);
        }
        Wire::SyncRequest { tenant, private, sub } => {
            out.put_u8(KIND_SYNC_REQUEST);
            put_bytes(&mut out, tenant.as_bytes());
            out.put_u8(u8::from(*private));
            put_bytes(&mut out, sub.as_bytes());
        }
        Wire::Snapshot { delta } => {
            out.put_u8(KIND_SNAPSHOT);
            put_delta(&mut out, delta);
        }
        Wire::Heartbeat { incarnation, node, counts, leads } => {
            out.put_u8(KIND_HEARTBEAT);
            out.put_u32(*incarnation);
            put_bytes(&mut out, node.as_bytes());
            out.put_u32(counts.len() as u32);
            for entry in counts {
                put_bytes(&mut out, entry.tenant.as_bytes());
                for value in entry.values {
                    out.put_u64(value);
                }
            }
            out.put_u32(leads.len() as u32);
            for tenant in leads {
                put_bytes(&mut out, tenant.as_bytes());
            }
        }
        Wire::PgCommand { tenant, from, command } => {
            out.put_u8(KIND_PG_COMMAND);
            put_bytes(&mut out, tenant.as_bytes());
            out.put_u32(*from);
            match command {
                PgCommand::Subscribe { shard, conn, channel, role, claims, bindings } => {
                    out.put_u8(1);
                    out.put_u16(*shard);
                    out.put_u64(*conn);
                    out.put_u32(*channel);
                    put_bytes(&mut out, role.as_bytes());
                    put_bytes(&mut out, claims.as_bytes());
                    out.put_u32(bindings.len() as u32);
                    for binding in bindings {
                        put_bytes(&mut out, binding.as_bytes());
                    }
                }
                PgCommand::Unsubscribe { shard, conn, channel } => {
                    out.put_u8(2);
                    out.put_u16(*shard);
                    out.put_u64(*conn);
                    out.put_u32(*channel);
                }
            }
        }
        Wire::PgOut { items } => {
            out.put_u8(KIND_PG_OUT);
            out.put_u32(items.len() as u32);
            for (shard, item) in items {
                out.put_u16(*shard);
                match item {
                    PgOutItem::System { conn, channel, ok, message } => {
                        out.put_u8(1);
                        out.put_u64(*conn);
                        out.put_u32(*channel);
                        out.put_u8(u8::from(*ok));
                        put_bytes(&mut out, message.as_bytes());
                    }
                    PgOutItem::Change { position, payload_v1, payload_v2, targets } => {
                        out.put_u8(2);
                        out.put_u64(position.0);
                        out.put_u32(position.1);
                        put_bytes(&mut out, payload_v1);
                        put_bytes(&mut out, payload_v2);
                        out.put_u32(targets.len() as u32);
                        for (conn, channel) in targets {
                            out.put_u64(*conn);
                            out.put_u32(*channel);
                        }
                    }
                }
            }
        }
        Wire::Bye { incarnation } => {
            out.put_u8(KIND_BYE);
            out.put_u32(*incarnation);
        }
    }
    out.freeze()
}

/// Decodes a message. `input` is shared: payloads are slices of it, not copies.
pub fn decode(input: &Bytes) -> Result<Wire, WireError> {
    let mut r = Reader { input, at: 0 };
    if r.u8()? != VERSION {
        return Err(WireError::Invalid("version"));
    }
    let wire = match r.u8()? {
        KIND_BROADCAST => {
            let private = r.flag()?;
            let sub = r.string()?;
            let body = match r.u8()? {
                0 => BroadcastBody::Json { payload: r.bytes()? },
                1 => {
                    let len = usize::from(r.u16()?);
                    let event = r.take(len)?;
                    let encoding = match r.u8()? {
                        0 => PayloadEncoding::Binary,
                        1 => PayloadEncoding::Json,
                        _ => return Err(WireError::Invalid("payload encoding")),
                    };
                    BroadcastBody::User { event, encoding, payload: r.bytes()?, metadata: r.bytes()? }
                }
                _ => return Err(WireError::Invalid("broadcast body")),
            };
            Wire::Broadcast { private, sub: Arc::from(sub), body }
        }
        KIND_PRESENCE => {
            let private = r.flag()?;
            let sub = r.string()?;
            Wire::Presence { private, sub: Arc::from(sub), delta: r.delta()? }
        }
        KIND_SYNC_REQUEST => {
            let tenant = r.string()?;
            let private = r.flag()?;
            let sub = r.string()?;
            Wire::SyncRequest { tenant, private, sub: Arc::from(sub) }
        }
        KIND_SNAPSHOT => Wire::Snapshot { delta: r.delta()? },
        KIND_HEARTBEAT => {
            let incarnation = r.u32()?;
            let node = r.string()?;
            let mut counts = Vec::new();
            for _ in 0..r.count(4 + 8 * COUNTS)? {
                let tenant = r.string()?;
                let mut values = [0u64; COUNTS];
                for value in &mut values {
                    *value = r.u64()?;
                }
                counts.push(TenantCounts { tenant, values });
            }
            let mut leads = Vec::new();
            for _ in 0..r.count(4)? {
                leads.push(r.string()?);
            }
            Wire::Heartbeat { incarnation, node, counts, leads }
        }
        KIND_PG_COMMAND => {
            let tenant = r.string()?;
            let from = r.u32()?;
            let command = match r.u8()? {
                1 => {
                    let (shard, conn, channel) = (r.u16()?, r.u64()?, r.u32()?);
                    let role = r.string()?;
                    let claims = r.string()?;
                    let mut bindings = Vec::new();
                    for _ in 0..r.count(4)? {
                        bindings.push(r.string()?);
                    }
                    PgCommand::Subscribe { shard, conn, channel, role, claims, bindings }
                }
                2 => PgCommand::Unsubscribe { shard: r.u16()?, conn: r.u64()?, channel: r.u32()? },
                _ => return Err(WireError::Invalid("pg command")),
            };
            Wire::PgCommand { tenant, from, command }
        }
        KIND_PG_OUT => {
            let mut items = Vec::new();
            for _ in 0..r.count(2 + 1)? {
                let shard = r.u16()?;
                let item = match r.u8()? {
                    1 => PgOutItem::System { conn: r.u64()?, channel: r.u32()?, ok: r.flag()?, message: r.string()? },
                    2 => {
                        let position = (r.u64()?, r.u32()?);
                        let payload_v1 = r.bytes()?;
                        let payload_v2 = r.bytes()?;
                        let mut targets = Vec::new();
                        for _ in 0..r.count(12)? {
                            targets.push((r.u64()?, r.u32()?));
                        }
                        PgOutItem::Change { position, payload_v1, payload_v2, targets }
                    }
                    _ => return Err(WireError::Invalid("pg out")),
                };
                items.push((shard, item));
            }
            Wire::PgOut { items }
        }
        KIND_BYE => Wire::Bye { incarnation: r.u32()? },
        _ => return Err(WireError::Invalid("kind")),
    };
    if r.at != input.len() {
        return Err(WireError::Invalid("trailing bytes"));
    }
    Ok(wire)
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(bytes.len() as u32);
    out.put_slice(bytes);
}

fn put_dot(out: &mut BytesMut, dot: Dot) {
    out.put_u64(dot.replica.0);
    out.put_u64(dot.counter);
}

fn put_delta(out: &mut BytesMut, delta: &Delta) {
    out.put_u32(delta.elements.len() as u32);
    for (dot, element) in &delta.elements {
        put_dot(out, *dot);
        put_bytes(out, element.key.as_bytes());
        put_bytes(out, &element.meta);
        out.put_u16(element.owner.shard.0);
        out.put_u64(element.owner.conn.0);
        out.put_u32(element.owner.channel.0);
        match element.prev {
            Some(prev) => {
                out.put_u8(1);
                put_dot(out, prev);
            }
            None => out.put_u8(0),
        }
    }
    let (prefix, cloud) = delta.context.parts();
    let prefix: Vec<(ReplicaId, u64)> = prefix.collect();
    let cloud: Vec<Dot> = cloud.collect();
    out.put_u32(prefix.len() as u32);
    for (replica, max) in prefix {
        out.put_u64(replica.0);
        out.put_u64(max);
    }
    out.put_u32(cloud.len() as u32);
    for dot in cloud {
        put_dot(out, dot);
    }
}

struct Reader<'a> {
    input: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, len: usize) -> Result<Bytes, WireError> {
        let end = self.at.checked_add(len).filter(|end| *end <= self.input.len()).ok_or(WireError::Truncated)?;
        let bytes = self.input.slice(self.at..end);
        self.at = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let bytes = self.take(N)?;
        let mut array = [0u8; N];
        array.copy_from_slice(&bytes);
        Ok(array)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn flag(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Invalid("flag")),
        }
    }

    fn bytes(&mut self) -> Result<Bytes, WireError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, WireError> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::Invalid("UTF-8"))
    }

    fn dot(&mut self) -> Result<Dot, WireError> {
        let dot = Dot { replica: ReplicaId(self.u64()?), counter: self.counter()? };
        // Counters start at 1: a dot 0 is not one a replica made (and inserting it would leave
        // a context that encodes differently from how it decoded; found by the fuzzer).
        if dot.counter == 0 {
            return Err(WireError::Invalid("dot counter 0"));
        }
        Ok(dot)
    }

    /// A dot counter or a context's maximum: real ones are far below 2^62 (one per track), and
    /// the context's arithmetic (`max + 1`) must never overflow.
    fn counter(&mut self) -> Result<u64, WireError> {
        let counter = self.u64()?;
        if counter > COUNTER_MAX {
            return Err(WireError::Invalid("counter"));
        }
        Ok(counter)
    }

    /// A count of items each at least `min` bytes long: refused when the rest cannot hold them,
    /// so a hostile count allocates nothing.
    fn count(&mut self, min: usize) -> Result<usize, WireError> {
        let count = self.u32()? as usize;
        if count.saturating_mul(min) > self.input.len() - self.at {
            return Err(WireError::Truncated);
        }
        Ok(count)
    }

    fn delta(&mut self) -> Result<Delta, WireError> {
        let mut elements = BTreeMap::new();
        for _ in 0..self.count(16 + 4 + 4 + 2 + 8 + 4 + 1)? {
            let dot = self.dot()?;
            let key: Arc<str> = Arc::from(self.string()?);
            let meta = self.bytes()?;
            let owner = Subscriber { shard: ShardId(self.u16()?), conn: ConnId(self.u64()?), channel: ChannelSerial(self.u32()?) };
            let prev = if self.flag()? { Some(self.dot()?) } else { None };
            elements.insert(dot, Element { key, meta, owner, prev });
        }
        let mut prefix = Vec::new();
        for _ in 0..self.count(16)? {
            prefix.push((ReplicaId(self.u64()?), self.counter()?));
        }
        let mut cloud = Vec::new();
        for _ in 0..self.count(16)? {
            cloud.push(self.dot()?);
        }
        let context = CausalContext::from_parts(prefix, cloud);
        // Every element's dot is in the context (the CRDT's invariant); a message that says
        // otherwise is not from a node of ours.
        if elements.keys().any(|dot| !context.contains(*dot)) {
            return Err(WireError::Invalid("element outside its context"));
        }
        Ok(Delta { elements, context })
    }
}

#[cfg(test)]
mod tests;
