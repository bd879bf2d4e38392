//! The sans-IO core of powa-realtime.
//!
//! This crate holds what every shard owns and the messages shards exchange, as plain values:
//! no sockets, no clock, no JSON, no locks. Payloads are opaque [`bytes::Bytes`]; only the
//! frame codec in `net` knows the wire format. Drivers (glommio tasks in `net`) feed it input
//! and carry out what it returns.
//!
//! - [`topic`]: the channel identity (sub-topic + public/private) and which shard owns it.
//! - [`shard`]: a shard's topic registry (topics it owns) and its local subscriber index.
//! - [`broadcast`]: the canonical form of a message travelling between shards.
//! - [`changes`]: the messages between sessions and the Postgres Changes core.
//! - [`cluster`]: the messages between owner shards and the cluster link (NATS).
//! - [`limits`]: every bound, with PROTOCOL.md's defaults.
//! - [`client_error`]: every client-visible string, in one place.
//! - [`histogram`]: fixed-bucket latency histograms for `/metrics` (relaxed atomics).
#![forbid(unsafe_code)]
#![deny(unreachable_pub)]
#![warn(missing_docs)]

pub mod broadcast;
pub mod changes;
pub mod cluster;
pub mod client_error;
pub mod histogram;
pub mod ids;
pub mod limits;
pub mod presence;
pub mod rate;
pub mod shard;
pub mod topic;

pub use broadcast::{Broadcast, BroadcastBody, Origin};
pub use ids::{ChannelSerial, ConnId, ShardId, TenantId};
pub use limits::Limits;
pub use shard::{Format, LocalSub, PresenceCoalescing, ShardMsg, ShardState, Subscriber};
pub use topic::TopicKey;
