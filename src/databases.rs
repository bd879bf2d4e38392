//! How the shards find a tenant's Postgres Changes core (`net::server::Databases`).

use net::server::{Databases, DbHandle};

/// Single-tenant mode: the one core started at boot, whatever the tenant.
#[derive(Debug)]
pub(crate) struct Single(pub(crate) DbHandle);

impl Databases for Single {
    fn handle(&self, _tenant: engine::TenantId, _url: &str) -> DbHandle {
        self.0.clone()
    }
}
