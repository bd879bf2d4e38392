//! JWT verification and signing for powa-realtime.
//!
//! Pure: nothing here reads the clock or touches the network. The caller passes `now` (Unix
//! seconds) and the key material; the verifier answers with the claims or a typed
//! [`AuthError`] whose variants map one to one onto the failure rows of PROTOCOL.md §6.1.
//!
//! Order of checks (PROTOCOL.md §6.1): clean the token, decode header and claims, pick the key
//! from `alg`/`kid`, verify the signature, then `exp`, then the required `role` + `exp`.
//! Leeway is **zero**: upstream compares `exp` with the current second and so do we, so a token
//! is valid strictly before its `exp`.
#![forbid(unsafe_code)]
#![deny(unreachable_pub)]
#![warn(missing_docs)]

mod error;
pub mod plain_json;
mod verify;
#[doc(hidden)]
pub mod fuzzing;

pub use error::AuthError;
pub use verify::{clean_token, sign_hs256, Claims, KeyStore};
