//! The Postgres side of powa-realtime.
//!
//! - `pgoutput`, `stream`, `value`: pure decoding of the logical replication stream and of
//!   column values into JSON (no IO).
//! - `cluster`: create, start and stop a local PostgreSQL cluster (`dev` and tests).
//! - `install`: the idempotent, versioned install of the `realtime` schema objects.
#![deny(unreachable_pub)]
#![warn(missing_docs)]
pub mod error;
pub mod filter;
pub mod binding;
pub mod pgconn;
pub mod cluster;
pub mod install;
pub mod pgoutput;
pub mod stream;
pub mod value;
pub mod start;
pub mod fleet;
pub mod reader;
pub mod sql;
pub mod changes;
pub mod control;
pub mod policy;
pub mod tls;
#[doc(hidden)]
pub mod fuzzing;
