//! Server configuration from the environment (CONTRACT.md "Environment").

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use auth::KeyStore;
use engine::Limits;
use net::server::ServerConfig;

/// `REALTIME_DRAIN_SECS` default (CONTRACT.md).
const DRAIN_SECS_DEFAULT: u64 = 10;

pub(crate) fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

pub(crate) fn number<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match var(name) {
        None => Ok(default),
        Some(raw) => raw.trim().parse().map_err(|_| anyhow::anyhow!("{name}={raw:?} is not a valid number")),
    }
}

/// `REALTIME_TLS_CERT` + `REALTIME_TLS_KEY`: both or neither; the files must load.
fn tls() -> Result<Option<std::sync::Arc<net::server::Tls>>> {
    match (var("REALTIME_TLS_CERT"), var("REALTIME_TLS_KEY")) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => {
            let tls = net::server::Tls::new(std::path::Path::new(cert.trim()), std::path::Path::new(key.trim()))?;
            Ok(Some(std::sync::Arc::new(tls)))
        }
        _ => bail!("REALTIME_TLS_CERT and REALTIME_TLS_KEY go together: set both (PEM files) or neither"),
    }
}

/// `REALTIME_TENANTS`: the tenants file that switches on multi-tenant mode.
pub(crate) fn tenants_file() -> Option<std::path::PathBuf> {
    var("REALTIME_TENANTS").map(|p| std::path::PathBuf::from(p.trim()))
}

/// Reads and checks a tenants file.
pub(crate) fn read_tenants(path: &std::path::Path) -> Result<Vec<tenants::TenantConfig>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading REALTIME_TENANTS file {}", path.display()))?;
    tenants::parse_file(&text).with_context(|| format!("REALTIME_TENANTS file {}", path.display()))
}

/// Builds the server configuration. Single-tenant mode (no tenants file) calls `secret` for
/// the HS256 secret (`JWT_SECRET`, or `dev`'s kept one).
pub(crate) fn server_config(secret: impl FnOnce() -> Result<Vec<u8>>) -> Result<ServerConfig> {
    let addr_text = var("REALTIME_ADDR").unwrap_or_else(|| "127.0.0.1:4000".into());
    let addr: SocketAddr = addr_text
        .to_socket_addrs()
        .with_context(|| format!("REALTIME_ADDR={addr_text:?} is not an address"))?
        .next()
        .with_context(|| format!("REALTIME_ADDR={addr_text:?} resolves to nothing"))?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let shards: usize = number("REALTIME_SHARDS", cores)?;
    if shards == 0 || shards > 256 {
        bail!("REALTIME_SHARDS must be in 1..=256");
    }
    if var("REALTIME_TENANTS").is_some() && var("REALTIME_CONTROL_DATABASE_URL").is_some() {
        bail!("REALTIME_TENANTS and REALTIME_CONTROL_DATABASE_URL are two sources of tenants: set one of them");
    }
    let defaults = Limits::default();
    let limits = Limits {
        concurrent_users_max: number("REALTIME_MAX_CONCURRENT_USERS", defaults.concurrent_users_max)?,
        events_per_second_max: number("REALTIME_MAX_EVENTS_PER_SECOND", defaults.events_per_second_max)?,
        joins_per_second_max: number("REALTIME_MAX_JOINS_PER_SECOND", defaults.joins_per_second_max)?,
        presence_events_per_second_max: number("REALTIME_MAX_PRESENCE_EVENTS_PER_SECOND", defaults.presence_events_per_second_max)?,
        channels_per_client_max: number("REALTIME_MAX_CHANNELS_PER_CLIENT", defaults.channels_per_client_max)?,
        payload_bytes_max: number("REALTIME_MAX_PAYLOAD_BYTES", defaults.payload_bytes_max)?,
        idle_timeout: Duration::from_secs(number("REALTIME_IDLE_TIMEOUT_SECS", defaults.idle_timeout.as_secs())?),
        join_error_delay: Duration::from_millis(number("REALTIME_JOIN_ERROR_DELAY_MS", defaults.join_error_delay.as_millis() as u64)?),
        connect_error_delay: Duration::from_millis(number("REALTIME_CONNECT_ERROR_DELAY_MS", defaults.connect_error_delay.as_millis() as u64)?),
        presence_coalesce: Duration::from_millis(number("REALTIME_PRESENCE_COALESCE_MS", defaults.presence_coalesce.as_millis() as u64)?),
    };
    limits.validate()?;
    let database_url = var("DATABASE_URL");
    let registry = match tenants_file() {
        // Filled from the control database by `control::start` before the server listens.
        None if var("REALTIME_CONTROL_DATABASE_URL").is_some() => tenants::Registry::multi(Vec::new(), tenants::ProcessLimits::of(&limits), shards)?,
        Some(path) => {
            let configs = read_tenants(&path)?;
            let count = configs.len();
            let registry = tenants::Registry::multi(configs, tenants::ProcessLimits::of(&limits), shards).with_context(|| format!("REALTIME_TENANTS file {}", path.display()))?;
            tracing::info!(tenants = count, file = %path.display(), "multi-tenant mode: the tenant comes from the Host header");
            registry
        }
        None => {
            let mut keys = KeyStore::new(secret()?);
            if let Some(path) = var("JWT_JWKS") {
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading JWT_JWKS file {path}"))?;
                keys = keys.with_jwks_json(&text).with_context(|| format!("JWT_JWKS file {path} is not a JWKS"))?;
            }
            tenants::Registry::single(keys, limits.clone(), database_url.clone(), shards)
        }
    };
    let panic_shard_for_tests = std::env::var("POWA_TEST_PANIC_SHARD").ok().and_then(|v| v.trim().parse().ok());
    let drain = Duration::from_secs(number("REALTIME_DRAIN_SECS", DRAIN_SECS_DEFAULT)?);
    Ok(ServerConfig {
        addr,
        shards,
        limits,
        tenants: std::sync::Arc::new(registry),
        postgres: None,
        drain,
        control: std::sync::Arc::new(net::server::Control::default()),
        metrics_hooks: Vec::new(),
        postgres_status: None,
        tenant_api: None,
        tls: tls()?,
        cluster: None,
        panic_shard_for_tests,
    })
}

/// The replication slot: `REALTIME_SLOT_NAME` (default `powa_realtime`),
/// `REALTIME_SLOT_MAX_RETAINED_MB` (default 1024) and `REALTIME_SLOT_MAX_AWAY_SECS` (default 600).
pub(crate) fn slot_config() -> Result<replication::reader::SlotConfig> {
    let defaults = replication::reader::SlotConfig::default();
    let name = var("REALTIME_SLOT_NAME").map(|n| n.trim().to_string()).unwrap_or(defaults.name);
    if name.is_empty() || name.len() > 63 || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
        bail!("REALTIME_SLOT_NAME={name:?}: use 1 to 63 characters of a-z, 0-9 and _");
    }
    let max_retained_mb: u64 = number("REALTIME_SLOT_MAX_RETAINED_MB", 1024)?;
    let max_away_secs: u64 = number("REALTIME_SLOT_MAX_AWAY_SECS", 600)?;
    Ok(replication::reader::SlotConfig { name, max_retained_bytes: max_retained_mb.saturating_mul(1024 * 1024), max_away: Duration::from_secs(max_away_secs), shared: false })
}
