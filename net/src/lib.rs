//! Everything that touches bytes on the wire: WebSocket framing, the Phoenix frame codec,
//! join payloads, HTTP, the per-connection session and the glommio drivers.
#![deny(unreachable_pub)]
#![warn(missing_docs)]

pub mod assets;
pub mod frame;
pub mod presence;
pub mod rest;
pub mod ws;
pub mod fanout;
pub mod join;
pub mod session;
pub mod http;
pub mod server;
#[doc(hidden)]
pub mod fuzzing;
