//! What the binary plugs into the shards: how they find a tenant's Postgres Changes core
//! (`net::server::Databases`) and who answers the tenant API (`net::server::TenantApi`).

use std::sync::Arc;

use net::server::{Databases, DbHandle, TenantApi};
use tenants::api::{ApiRequest, ApiResponse};

/// Single-tenant mode: the one core started at boot, whatever the tenant.
#[derive(Debug)]
pub(crate) struct Single(pub(crate) DbHandle);

impl Databases for Single {
    fn handle(&self, _tenant: engine::TenantId, _url: &str) -> DbHandle {
        self.0.clone()
    }
}

/// Multi-tenant mode: each tenant's core runs in the fleet (started on first need, stopped when
/// idle); the tenant's external id and payload limit come from the live directory.
#[derive(Debug)]
pub(crate) struct Fleet {
    pub(crate) fleet: replication::fleet::Fleet,
    pub(crate) registry: Arc<tenants::Registry>,
}

impl Databases for Fleet {
    fn handle(&self, tenant: engine::TenantId, url: &str) -> DbHandle {
        let directory = self.registry.load();
        let (external_id, payload_bytes_max) = match directory.get(tenant) {
            Some(t) => (t.external_id.to_string(), t.limits.payload_bytes_max),
            None => (format!("tenant-{}", tenant.0), engine::Limits::default().payload_bytes_max),
        };
        let (commands, healthy) = self.fleet.handle(tenant, &external_id, url, payload_bytes_max);
        DbHandle { commands, healthy }
    }

    /// A removed tenant's stream stops now (slot dropped), not after the idle stop.
    fn directory_changed(&self, directory: &tenants::Directory) {
        for stats in self.fleet.stats() {
            if directory.get(stats.tenant).is_none() {
                tracing::info!(tenant = %stats.external_id, "tenant removed: stopping its replication stream");
                self.fleet.retire(stats.tenant);
            }
        }
    }
}

/// The tenant API over a tenants file: read-only (writes answer 405).
#[derive(Debug)]
pub(crate) struct FileApi {
    pub(crate) registry: Arc<tenants::Registry>,
    pub(crate) keys: auth::KeyStore,
}

impl TenantApi for FileApi {
    fn call(&self, request: ApiRequest) -> flume::Receiver<ApiResponse> {
        let (reply, answer) = flume::bounded(1);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let response = if tenants::api::authorized(&request, &self.keys, now) {
            tenants::api::ReadOnly { registry: &self.registry }.answer(&request)
        } else {
            ApiResponse::empty(403)
        };
        let _ = reply.send(response);
        answer
    }
}

/// The tenant API over the control database: requests go to its thread (bounded queue; a full
/// queue answers 503 at once).
#[derive(Debug)]
pub(crate) struct ControlApi(pub(crate) replication::control::ControlHandle);

impl TenantApi for ControlApi {
    fn call(&self, request: ApiRequest) -> flume::Receiver<ApiResponse> {
        let (reply, answer) = flume::bounded(1);
        if let Err(flume::TrySendError::Full((_, reply)) | flume::TrySendError::Disconnected((_, reply))) = self.0.requests.try_send((request, reply)) {
            let _ = reply.send(ApiResponse::unavailable("the tenant store is busy"));
        }
        answer
    }
}
