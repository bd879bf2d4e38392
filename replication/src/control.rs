//! The control database (`REALTIME_CONTROL_DATABASE_URL`): tenants stored in
//! `_realtime.tenants`, managed through the tenant API, and applied live.
//!
//! One thread with a current-thread tokio runtime owns one connection. It installs the
//! `_realtime` schema (versioned migrations in `_realtime.schema_migrations`, applied under an
//! advisory lock so that several nodes starting together apply each once), loads the tenants
//! into the [`Registry`], answers the tenant API's requests (queued on a bounded channel by the
//! shards), and re-reads the table every [`POLL`] so that a write made through any node is
//! live on every node within a second. Secrets are stored as given and never returned
//! (`tenants::api::render`).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_postgres::Client;

use auth::KeyStore;
use tenants::api::{self, ApiRequest, ApiResponse, Operation};
use tenants::{Registry, TenantConfig};

use crate::sql::{connect, error_text};

/// How often the table is re-read.
pub const POLL: Duration = Duration::from_secs(1);
/// Tenant API requests waiting for the control thread; beyond, callers get 503 at once.
pub const REQUESTS_MAX: usize = 256;

/// Migrations of the `_realtime` schema, in order; each runs once, in a transaction.
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    "CREATE TABLE _realtime.tenants (
        external_id text PRIMARY KEY CHECK (external_id <> ''),
        config jsonb NOT NULL,
        inserted_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )",
)];

/// Why the control database cannot be used.
#[derive(Debug)]
pub enum ControlError {
    /// Connecting or a statement failed (the database's message).
    Database(String),
    /// A stored tenant is not valid (someone wrote the table by hand).
    Tenants(String),
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlError::Database(why) => write!(f, "control database: {why}"),
            ControlError::Tenants(why) => write!(f, "control database: a stored tenant is invalid: {why}"),
        }
    }
}

impl std::error::Error for ControlError {}

/// A request and where its answer goes.
pub type Call = (ApiRequest, flume::Sender<ApiResponse>);

/// The running control thread.
#[derive(Debug, Clone)]
pub struct ControlHandle {
    /// Tenant API requests (bounded: [`REQUESTS_MAX`]).
    pub requests: flume::Sender<Call>,
}

/// Connects, migrates and loads the tenants (blocking, before the server listens), then keeps
/// answering the API and polling on its own thread. `api_keys` verifies the API's bearers.
pub fn start(url: String, registry: Arc<Registry>, api_keys: KeyStore) -> Result<ControlHandle, ControlError> {
    let (requests, incoming) = flume::bounded::<Call>(REQUESTS_MAX);
    let (ready, started) = flume::bounded::<Result<(), ControlError>>(1);
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = ready.send(Err(ControlError::Database(error.to_string())));
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                let client = match open(&url, &registry).await {
                    Ok(client) => client,
                    Err(error) => {
                        let _ = ready.send(Err(error));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                serve(url, client, registry, api_keys, incoming).await;
            });
        })
        .map_err(|e| ControlError::Database(e.to_string()))?;
    match started.recv() {
        Ok(result) => result.map(|()| ControlHandle { requests }),
        Err(_) => Err(ControlError::Database("the control thread ended".into())),
    }
}

/// Connects, migrates and loads the tenants into `registry`.
async fn open(url: &str, registry: &Registry) -> Result<Client, ControlError> {
    let mut client = connect(url).await.map_err(|e| ControlError::Database(error_text(&e)))?;
    migrate(&mut client).await.map_err(|e| ControlError::Database(error_text(&e)))?;
    reload(&client, registry).await?;
    Ok(client)
}

/// Applies the migrations not applied yet.
pub async fn migrate(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute("CREATE SCHEMA IF NOT EXISTS _realtime; CREATE TABLE IF NOT EXISTS _realtime.schema_migrations (version bigint PRIMARY KEY, inserted_at timestamptz NOT NULL DEFAULT now())")
        .await?;
    for (version, sql) in MIGRATIONS {
        let transaction = client.transaction().await?;
        transaction.execute("SELECT pg_advisory_xact_lock(hashtext('_realtime.schema_migrations'))", &[]).await?;
        let applied = !transaction.query("SELECT 1 FROM _realtime.schema_migrations WHERE version = $1", &[version]).await?.is_empty();
        if !applied {
            transaction.batch_execute(sql).await?;
            transaction.execute("INSERT INTO _realtime.schema_migrations (version) VALUES ($1)", &[version]).await?;
            tracing::info!(version, "control database migrated");
        }
        transaction.commit().await?;
    }
    Ok(())
}

/// Every stored tenant with its creation time, in external-id order.
async fn load_all(client: &Client) -> Result<Vec<(TenantConfig, String)>, ControlError> {
    let rows = client
        .query("SELECT config::text, to_char(inserted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM _realtime.tenants ORDER BY external_id", &[])
        .await
        .map_err(|e| ControlError::Database(error_text(&e)))?;
    let mut tenants = Vec::with_capacity(rows.len());
    for row in rows {
        let cell = |i: usize| row.try_get::<_, String>(i).map_err(|e| ControlError::Database(error_text(&e)));
        let config: TenantConfig = serde_json::from_str(&cell(0)?).map_err(|e| ControlError::Tenants(e.to_string()))?;
        tenants.push((config, cell(1)?));
    }
    Ok(tenants)
}

/// Re-reads the table and swaps the registry when it differs.
async fn reload(client: &Client, registry: &Registry) -> Result<(), ControlError> {
    let stored: Vec<TenantConfig> = load_all(client).await?.into_iter().map(|(c, _)| c).collect();
    if stored != registry.configs() {
        let reload = registry.replace(stored).map_err(|e| ControlError::Tenants(e.to_string()))?;
        tracing::info!(added = ?reload.added, removed = ?reload.removed, disconnected = ?reload.disconnected, updated = ?reload.updated, "tenants changed in the control database");
    }
    Ok(())
}

/// Answers requests and polls until the process ends.
async fn serve(url: String, client: Client, registry: Arc<Registry>, api_keys: KeyStore, incoming: flume::Receiver<Call>) {
    let mut client = Some(client);
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            call = incoming.recv_async() => {
                let Ok((request, reply)) = call else { return };
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = reconnect(&url).await;
                }
                let response = match &client {
                    Some(c) => answer(c, &registry, &api_keys, &request).await,
                    None => ApiResponse::unavailable("the control database is unreachable"),
                };
                let _ = reply.try_send(response);
            }
            _ = poll.tick() => {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = reconnect(&url).await;
                }
                if let Some(c) = &client {
                    if let Err(error) = reload(c, &registry).await {
                        tracing::warn!(%error, "control database poll failed; the tenants stay as they are");
                    }
                }
            }
        }
    }
}

async fn reconnect(url: &str) -> Option<Client> {
    match connect(url).await {
        Ok(client) => Some(client),
        Err(error) => {
            tracing::warn!(error = %error_text(&error), "control database unreachable; retrying");
            None
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Answers one request.
async fn answer(client: &Client, registry: &Registry, api_keys: &KeyStore, request: &ApiRequest) -> ApiResponse {
    if !api::authorized(request, api_keys, now()) {
        return ApiResponse::empty(403);
    }
    let operation = match api::parse(request) {
        Ok(operation) => operation,
        Err(response) => return response,
    };
    match run(client, registry, operation).await {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(%error, "tenant API request failed");
            ApiResponse::unavailable(&error.to_string())
        }
    }
}

async fn run(client: &Client, registry: &Registry, operation: Operation) -> Result<ApiResponse, ControlError> {
    let process = registry.process_limits().clone();
    let db = |e: tokio_postgres::Error| ControlError::Database(error_text(&e));
    Ok(match operation {
        Operation::List => {
            let all: Vec<serde_json::Value> = load_all(client).await?.iter().map(|(c, at)| api::render(c, &process, Some(at))).collect();
            ApiResponse::json(200, &json!({ "data": all }))
        }
        Operation::Get(id) => match load_all(client).await?.into_iter().find(|(c, _)| c.external_id == id) {
            Some((config, at)) => ApiResponse::json(200, &json!({ "data": api::render(&config, &process, Some(&at)) })),
            None => ApiResponse::not_found(),
        },
        Operation::Upsert { external_id, fields } => {
            let existing = client
                .query_opt("SELECT config::text FROM _realtime.tenants WHERE external_id = $1", &[&external_id])
                .await
                .map_err(db)?
                .and_then(|row| serde_json::from_str::<TenantConfig>(&row.try_get::<_, String>(0).ok()?).ok());
            let config = match api::merge(existing.as_ref(), &fields) {
                Ok(config) => config,
                Err(response) => return Ok(response),
            };
            let text = serde_json::to_string(&config).map_err(|e| ControlError::Tenants(e.to_string()))?;
            let row = client
                .query_one(
                    "INSERT INTO _realtime.tenants (external_id, config) VALUES ($1, $2::text::jsonb) \
                     ON CONFLICT (external_id) DO UPDATE SET config = EXCLUDED.config, updated_at = now() \
                     RETURNING (xmax = 0), to_char(inserted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
                    &[&config.external_id, &text],
                )
                .await
                .map_err(db)?;
            let created: bool = row.try_get(0).map_err(db)?;
            let inserted_at: String = row.try_get(1).map_err(db)?;
            reload(client, registry).await?;
            let body = json!({ "data": api::render(&config, &process, Some(&inserted_at)) });
            if created {
                ApiResponse { status: 201, location: Some(format!("/api/tenants/{}", config.external_id)), body: body.to_string().into_bytes() }
            } else {
                ApiResponse::json(200, &body)
            }
        }
        Operation::Delete(id) => {
            client.execute("DELETE FROM _realtime.tenants WHERE external_id = $1", &[&id]).await.map_err(db)?;
            reload(client, registry).await?;
            ApiResponse::empty(204)
        }
        Operation::Reload(id) | Operation::Shutdown(id) => {
            reload(client, registry).await?;
            if registry.disconnect(&id) {
                ApiResponse::empty(204)
            } else {
                ApiResponse::not_found()
            }
        }
        Operation::Health(id) => match registry.load().by_external_id(&id) {
            Some(tenant) => ApiResponse::json(200, &json!({ "data": api::health(tenant) })),
            None => ApiResponse::not_found(),
        },
    })
}
