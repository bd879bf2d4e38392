//! The cluster link (CONTRACT.md "Cluster"): this node's shards to the other nodes, over NATS.
//!
//! - [`subject`]: the NATS subjects, all under the cluster name.
//! - [`wire`]: what nodes send each other, as bytes (pure, fuzzed).
//! - [`link`]: the link thread (async-nats on a current-thread tokio runtime), bridged to the
//!   shards by bounded flume queues of [`engine::cluster`] messages; shards never see NATS types.
//! - [`pg`]: Postgres Changes across nodes (one leader per tenant database, subscriptions
//!   forwarded to it, its messages for other nodes' channels sent back to them).
//! - [`stats`]: counters and the node list for `/metrics`, `/api/status` and `/healthz`.
#![forbid(unsafe_code)]
#![deny(unreachable_pub)]
#![warn(missing_docs)]

pub mod subject;
pub mod wire;
#[doc(hidden)]
pub mod fuzzing;
pub mod link;
pub mod pg;
pub mod stats;

pub use link::{ClusterError, Link, LinkConfig};
pub use pg::{PgPort, PgRouter};
pub use stats::Stats;
