//! Tenants (projects) of powa-realtime: their configuration (the tenants file and the tenant
//! API's JSON, CONTRACT.md), resolution from the `Host` header (PROTOCOL.md §1.2) and the live
//! directory the shards read without locks.
//!
//! Pure apart from reading a JWKS file named by a tenant: no sockets, no database. The network
//! side (`net`) resolves tenants through [`Registry`]; the binary loads the file and reloads it
//! on SIGHUP; the control database (tenant API) swaps snapshots in the same way.

#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod counters;
pub mod directory;

pub use config::{parse_file, Extension, ProcessLimits, TenantConfig};
pub use counters::{ShardSlot, TenantCounters};
pub use directory::{external_id_of, Directory, Registry, Reload, Tenant, UnknownHost};

/// Why a tenant configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantError {
    /// A field is missing or wrong; the text names it.
    Invalid(String),
    /// Tenants cannot be replaced in single-tenant mode.
    SingleTenant,
}

impl std::fmt::Display for TenantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TenantError::Invalid(why) => f.write_str(why),
            TenantError::SingleTenant => f.write_str("the server runs in single-tenant mode"),
        }
    }
}

impl std::error::Error for TenantError {}
