//! The live set of tenants: an immutable [`Directory`] snapshot behind an `ArcSwap`, replaced
//! whole on reload. Readers (every upgrade, REST call and shard tick) load the current snapshot
//! without a lock; writers (SIGHUP, the tenant API) build a new one and swap it in.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ahash::AHashMap;
use arc_swap::ArcSwap;

use auth::KeyStore;
use engine::{Limits, TenantId};

use crate::config::{ProcessLimits, TenantConfig};
use crate::counters::TenantCounters;
use crate::TenantError;

/// A tenant as the server runs it: resolved keys and limits, plus its shared counters.
#[derive(Debug)]
pub struct Tenant {
    /// The process's number for this tenant (stable across reloads).
    pub id: TenantId,
    /// The Host header's first label (single-tenant mode: empty).
    pub external_id: Arc<str>,
    /// Verifies the tenant's tokens.
    pub keys: KeyStore,
    /// The tenant's limits (per-process parts from the environment).
    pub limits: Limits,
    /// Only private channels may be joined.
    pub private_only: bool,
    /// Realtime is switched off for the tenant.
    pub suspend: bool,
    /// Every channel gets presence.
    pub presence_enabled: bool,
    /// The tenant's database, when it has one.
    pub database_url: Option<String>,
    /// Bumped when a field whose change disconnects the tenant changed (keys, `private_only`,
    /// `suspend`): a socket that joined under another epoch is disconnected.
    pub epoch: u64,
    /// Counters shared by every shard (rates, users, metrics).
    pub counters: Arc<TenantCounters>,
    /// The configuration it was built from (the tenant API renders it, without secrets).
    pub config: TenantConfig,
}

impl Tenant {
    /// A label for logs and metrics (`-` in single-tenant mode).
    pub fn label(&self) -> &str {
        if self.external_id.is_empty() {
            "-"
        } else {
            &self.external_id
        }
    }
}

/// One snapshot of every tenant.
#[derive(Debug, Default)]
pub struct Directory {
    /// Increases with every swap.
    pub version: u64,
    /// Single-tenant mode: every Host maps to this tenant.
    single: Option<Arc<Tenant>>,
    by_external_id: AHashMap<Arc<str>, Arc<Tenant>>,
    by_id: AHashMap<TenantId, Arc<Tenant>>,
}

impl Directory {
    /// Whether tenants come from a file or a control database (Host decides the tenant).
    pub fn multi_tenant(&self) -> bool {
        self.single.is_none()
    }

    /// The tenant a request's `Host` header names (PROTOCOL.md §1.2).
    pub fn resolve(&self, host: Option<&str>) -> Option<&Arc<Tenant>> {
        if let Some(single) = &self.single {
            return Some(single);
        }
        self.by_external_id.get(external_id_of(host?).as_str())
    }

    /// A tenant by number (a shard re-reading its connections' tenants after a swap).
    pub fn get(&self, id: TenantId) -> Option<&Arc<Tenant>> {
        self.by_id.get(&id)
    }

    /// A tenant by external id.
    pub fn by_external_id(&self, external_id: &str) -> Option<&Arc<Tenant>> {
        self.by_external_id.get(external_id)
    }

    /// Every tenant, in external-id order.
    pub fn tenants(&self) -> Vec<&Arc<Tenant>> {
        let mut all: Vec<&Arc<Tenant>> = self.by_id.values().collect();
        all.sort_by(|a, b| a.external_id.cmp(&b.external_id));
        all
    }

    /// Number of tenants.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are none (multi-tenant mode with an empty file).
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// The tenant id a Host header names: the hostname without port, up to the first `.`,
/// lower-cased (PROTOCOL.md §1.2).
pub fn external_id_of(host: &str) -> String {
    let host = host.trim();
    let hostname = if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal: `[::1]:4000`.
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(name, _)| name)
    };
    let label = hostname.split('.').next().unwrap_or(hostname);
    label.to_ascii_lowercase()
}

/// How many distinct unknown hosts `/api/status` remembers.
pub const UNKNOWN_HOSTS_MAX: usize = 32;

/// A Host that named no tenant (diagnostics for the classic self-host failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownHost {
    /// The Host header as received (cut to 255 bytes); empty when absent.
    pub host: String,
    /// The tenant id derived from it.
    pub derived: String,
    /// Requests refused for it.
    pub count: u64,
    /// Unix seconds of the last one.
    pub last_seen: i64,
}

/// The live tenants of the process.
#[derive(Debug)]
pub struct Registry {
    current: ArcSwap<Directory>,
    shards: usize,
    process: ProcessLimits,
    /// Numbers and counters by external id, kept across reloads (and after a tenant is removed,
    /// so a tenant that comes back keeps its number).
    ids: Mutex<HashMap<String, (TenantId, Arc<TenantCounters>)>>,
    version: AtomicU64,
    unknown: Mutex<BTreeMap<String, UnknownHost>>,
    /// Unix second of the last "unknown host" log line (one per second at most).
    unknown_logged: AtomicU64,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reload {
    /// Tenants added.
    pub added: Vec<String>,
    /// Tenants removed (their sockets are disconnected).
    pub removed: Vec<String>,
    /// Tenants whose keys, `private_only` or `suspend` changed (their sockets are disconnected).
    pub disconnected: Vec<String>,
    /// Tenants whose other fields changed (applied live).
    pub updated: Vec<String>,
}

impl Registry {
    /// Single-tenant mode: one tenant that every Host maps to.
    pub fn single(keys: KeyStore, limits: Limits, database_url: Option<String>, shards: usize) -> Registry {
        let registry = Registry::empty(shards, ProcessLimits::of(&limits));
        let counters = Arc::new(TenantCounters::new(shards));
        let tenant = Arc::new(Tenant {
            id: TenantId::SINGLE,
            external_id: Arc::from(""),
            keys,
            limits,
            private_only: false,
            suspend: false,
            presence_enabled: false,
            database_url,
            epoch: 0,
            counters,
            config: TenantConfig::default(),
        });
        let mut directory = Directory { version: 1, single: Some(Arc::clone(&tenant)), ..Directory::default() };
        directory.by_id.insert(tenant.id, tenant);
        registry.current.store(Arc::new(directory));
        registry.version.store(1, Ordering::Relaxed);
        registry
    }

    /// Single-tenant mode: sets the one tenant's database (`dev` learns it after start-up).
    pub fn set_single_database(&self, database_url: Option<String>) {
        let old = self.load();
        let Some(single) = &old.single else { return };
        let tenant = Arc::new(Tenant {
            id: single.id,
            external_id: Arc::clone(&single.external_id),
            keys: single.keys.clone(),
            limits: single.limits.clone(),
            private_only: single.private_only,
            suspend: single.suspend,
            presence_enabled: single.presence_enabled,
            database_url,
            epoch: single.epoch,
            counters: Arc::clone(&single.counters),
            config: single.config.clone(),
        });
        let version = self.version.load(Ordering::Acquire) + 1;
        let mut directory = Directory { version, single: Some(Arc::clone(&tenant)), ..Directory::default() };
        directory.by_id.insert(tenant.id, tenant);
        self.current.store(Arc::new(directory));
        self.version.store(version, Ordering::Release);
    }

    /// Multi-tenant mode with `tenants` (already validated or not: they are validated here).
    pub fn multi(tenants: Vec<TenantConfig>, process: ProcessLimits, shards: usize) -> Result<Registry, TenantError> {
        let registry = Registry::empty(shards, process);
        registry.replace(tenants)?;
        Ok(registry)
    }

    fn empty(shards: usize, process: ProcessLimits) -> Registry {
        Registry {
            current: ArcSwap::from_pointee(Directory::default()),
            shards,
            process,
            ids: Mutex::new(HashMap::new()),
            version: AtomicU64::new(0),
            unknown: Mutex::new(BTreeMap::new()),
            unknown_logged: AtomicU64::new(0),
        }
    }

    /// The current snapshot (no lock: an atomic load and a reference count).
    pub fn load(&self) -> Arc<Directory> {
        self.current.load_full()
    }

    /// The current snapshot's version (shards compare it every tick).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The per-process limits (idle timeout, delays) every tenant shares.
    pub fn process_limits(&self) -> &ProcessLimits {
        &self.process
    }

    /// Replaces every tenant (multi-tenant mode). On error nothing changes.
    pub fn replace(&self, configs: Vec<TenantConfig>) -> Result<Reload, TenantError> {
        let old = self.load();
        if !old.is_empty() && !old.multi_tenant() {
            return Err(TenantError::SingleTenant);
        }
        let mut seen = std::collections::HashSet::new();
        for config in &configs {
            config.validate()?;
            if !seen.insert(config.external_id.clone()) {
                return Err(TenantError::Invalid(format!("external_id {:?} appears twice", config.external_id)));
            }
        }
        let mut built: Vec<Arc<Tenant>> = Vec::with_capacity(configs.len());
        let mut reload = Reload::default();
        {
            let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
            for config in configs {
                let keys = keys_of(&config)?;
                let next = TenantId(u32::try_from(ids.len() + 1).map_err(|_| TenantError::Invalid("too many tenants".into()))?);
                let (id, counters) = ids.entry(config.external_id.clone()).or_insert_with(|| (next, Arc::new(TenantCounters::new(self.shards)))).clone();
                let previous = old.by_external_id(&config.external_id);
                let epoch = match previous {
                    None => {
                        reload.added.push(config.external_id.clone());
                        0
                    }
                    Some(previous) if previous.config.disconnect_fields() != config.disconnect_fields() => {
                        reload.disconnected.push(config.external_id.clone());
                        previous.epoch + 1
                    }
                    Some(previous) => {
                        if previous.config != config {
                            reload.updated.push(config.external_id.clone());
                        }
                        previous.epoch
                    }
                };
                built.push(Arc::new(Tenant {
                    id,
                    external_id: Arc::from(config.external_id.as_str()),
                    keys,
                    limits: config.limits(&self.process),
                    private_only: config.private_only.unwrap_or(false),
                    suspend: config.suspend.unwrap_or(false),
                    presence_enabled: config.presence_enabled.unwrap_or(false),
                    database_url: config.database(),
                    epoch,
                    counters,
                    config,
                }));
            }
        }
        for tenant in old.tenants() {
            if !built.iter().any(|t| t.id == tenant.id) {
                reload.removed.push(tenant.external_id.to_string());
            }
        }
        let version = self.version.load(Ordering::Acquire) + 1;
        let mut directory = Directory { version, ..Directory::default() };
        for tenant in built {
            directory.by_external_id.insert(Arc::clone(&tenant.external_id), Arc::clone(&tenant));
            directory.by_id.insert(tenant.id, tenant);
        }
        self.current.store(Arc::new(directory));
        self.version.store(version, Ordering::Release);
        Ok(reload)
    }

    /// Disconnects every socket of a tenant (the tenant API's reload and shutdown): the tenant
    /// gets a new epoch, which every shard applies at once. `false` if there is no such tenant.
    pub fn disconnect(&self, external_id: &str) -> bool {
        let old = self.load();
        let Some(current) = old.by_external_id(external_id) else { return false };
        let bumped = Arc::new(Tenant {
            id: current.id,
            external_id: Arc::clone(&current.external_id),
            keys: current.keys.clone(),
            limits: current.limits.clone(),
            private_only: current.private_only,
            suspend: current.suspend,
            presence_enabled: current.presence_enabled,
            database_url: current.database_url.clone(),
            epoch: current.epoch + 1,
            counters: Arc::clone(&current.counters),
            config: current.config.clone(),
        });
        let version = self.version.load(Ordering::Acquire) + 1;
        let mut directory = Directory { version, single: old.single.clone(), ..Directory::default() };
        for tenant in old.by_id.values() {
            let tenant = if tenant.id == bumped.id { Arc::clone(&bumped) } else { Arc::clone(tenant) };
            if !tenant.external_id.is_empty() {
                directory.by_external_id.insert(Arc::clone(&tenant.external_id), Arc::clone(&tenant));
            }
            directory.by_id.insert(tenant.id, tenant);
        }
        self.current.store(Arc::new(directory));
        self.version.store(version, Ordering::Release);
        true
    }

    /// The configurations of every tenant (multi-tenant mode), in external-id order.
    pub fn configs(&self) -> Vec<TenantConfig> {
        self.load().tenants().into_iter().map(|t| t.config.clone()).collect()
    }

    /// Records a Host that named no tenant: kept for `/api/status` (bounded: the least recently
    /// seen entry makes room) and logged at most once a second with what was derived.
    pub fn note_unknown_host(&self, host: Option<&str>, now_secs: i64) {
        let host_text: String = host.unwrap_or("").chars().take(255).collect();
        let derived = host.map(external_id_of).unwrap_or_default();
        let last = self.unknown_logged.load(Ordering::Relaxed);
        if u64::try_from(now_secs).is_ok_and(|now| now > last) && self.unknown_logged.compare_exchange(last, now_secs as u64, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            tracing::warn!(host = %host_text, derived = %derived, "request for an unknown tenant: the Host header's first label names no tenant (a proxy rewriting Host, or a wrong subdomain?)");
        }
        let mut unknown = self.unknown.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = unknown.get_mut(&host_text) {
            entry.count += 1;
            entry.last_seen = now_secs;
            return;
        }
        if unknown.len() >= UNKNOWN_HOSTS_MAX {
            if let Some(oldest) = unknown.values().min_by_key(|e| e.last_seen).map(|e| e.host.clone()) {
                unknown.remove(&oldest);
            }
        }
        unknown.insert(host_text.clone(), UnknownHost { host: host_text, derived, count: 1, last_seen: now_secs });
    }

    /// The unknown hosts seen, most recent first.
    pub fn unknown_hosts(&self) -> Vec<UnknownHost> {
        let unknown = self.unknown.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<UnknownHost> = unknown.values().cloned().collect();
        all.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then_with(|| b.count.cmp(&a.count)));
        all
    }
}

/// The key store of a tenant: its HS secret and/or its JWKS (inline, or a file path).
fn keys_of(config: &TenantConfig) -> Result<KeyStore, TenantError> {
    let id = &config.external_id;
    let keys = KeyStore::new(config.jwt_secret.clone().unwrap_or_default().into_bytes());
    let jwks_text = match &config.jwt_jwks {
        None => return Ok(keys),
        Some(serde_json::Value::String(path)) => {
            std::fs::read_to_string(path).map_err(|e| TenantError::Invalid(format!("tenant {id:?}: jwt_jwks file {path}: {e}")))?
        }
        Some(value @ serde_json::Value::Object(_)) => value.to_string(),
        Some(_) => return Err(TenantError::Invalid(format!("tenant {id:?}: jwt_jwks must be a file path or a JWKS object"))),
    };
    keys.with_jwks_json(&jwks_text).map_err(|e| TenantError::Invalid(format!("tenant {id:?}: jwt_jwks is not a JWKS: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str, secret: &str) -> TenantConfig {
        TenantConfig { external_id: id.into(), jwt_secret: Some(secret.into()), ..TenantConfig::default() }
    }

    fn registry(tenants: Vec<TenantConfig>) -> Registry {
        Registry::multi(tenants, ProcessLimits::of(&Limits::default()), 2).unwrap()
    }

    #[test]
    fn the_first_label_of_the_hostname_names_the_tenant() {
        assert_eq!(external_id_of("abc.supabase.co"), "abc");
        assert_eq!(external_id_of("abc.supabase.co:443"), "abc");
        assert_eq!(external_id_of("realtime-dev.supabase-realtime"), "realtime-dev");
        assert_eq!(external_id_of("localhost"), "localhost");
        assert_eq!(external_id_of("localhost:4000"), "localhost");
        assert_eq!(external_id_of("ACME.Example.com"), "acme");
        assert_eq!(external_id_of("[::1]:4000"), "::1");
        assert_eq!(external_id_of(""), "");
    }

    #[test]
    fn resolves_by_host_in_multi_tenant_mode_and_everything_in_single_tenant_mode() {
        let multi = registry(vec![tenant("acme", "a"), tenant("globex", "g")]);
        let directory = multi.load();
        assert_eq!(&*directory.resolve(Some("acme.localhost:4000")).unwrap().external_id, "acme");
        assert_eq!(&*directory.resolve(Some("globex.localhost")).unwrap().external_id, "globex");
        assert!(directory.resolve(Some("initech.localhost")).is_none());
        assert!(directory.resolve(None).is_none());
        let single = Registry::single(KeyStore::new(b"s".to_vec()), Limits::default(), None, 2);
        let directory = single.load();
        assert_eq!(directory.resolve(Some("anything.example")).unwrap().id, TenantId::SINGLE);
        assert_eq!(directory.resolve(None).unwrap().id, TenantId::SINGLE);
        assert!(!directory.multi_tenant());
    }

    #[test]
    fn reloads_keep_numbers_and_classify_changes() {
        let registry = registry(vec![tenant("acme", "a"), tenant("globex", "g"), tenant("initech", "i")]);
        let before = registry.load();
        let acme_id = before.by_external_id("acme").unwrap().id;
        let mut acme = tenant("acme", "a");
        acme.max_concurrent_users = Some(5);
        let reload = registry.replace(vec![acme, tenant("globex", "rotated"), tenant("hooli", "h")]).unwrap();
        assert_eq!(reload.updated, vec!["acme"]);
        assert_eq!(reload.disconnected, vec!["globex"]);
        assert_eq!(reload.added, vec!["hooli"]);
        assert_eq!(reload.removed, vec!["initech"]);
        let after = registry.load();
        assert!(after.version > before.version);
        let acme = after.by_external_id("acme").unwrap();
        assert_eq!(acme.id, acme_id, "a tenant keeps its number");
        assert_eq!(acme.limits.concurrent_users_max, 5);
        assert_eq!(acme.epoch, before.by_external_id("acme").unwrap().epoch, "a limit change does not disconnect");
        assert!(Arc::ptr_eq(&acme.counters, &before.by_external_id("acme").unwrap().counters), "counters survive a reload");
        assert_eq!(after.by_external_id("globex").unwrap().epoch, 1);
        // A broken reload changes nothing.
        assert!(registry.replace(vec![tenant("x", "")]).is_err());
        assert_eq!(registry.load().version, after.version);
        // The API's reload disconnects without changing anything else.
        let epoch = registry.load().by_external_id("acme").unwrap().epoch;
        assert!(registry.disconnect("acme"));
        assert_eq!(registry.load().by_external_id("acme").unwrap().epoch, epoch + 1);
        assert!(!registry.disconnect("nobody"));
        // A tenant that comes back keeps its old number.
        registry.replace(vec![tenant("initech", "i")]).unwrap();
        assert_eq!(registry.load().by_external_id("initech").unwrap().id, before.by_external_id("initech").unwrap().id);
    }

    #[test]
    fn unknown_hosts_are_counted_and_bounded() {
        let registry = registry(vec![tenant("acme", "a")]);
        registry.note_unknown_host(Some("wrong.example.com"), 10);
        registry.note_unknown_host(Some("wrong.example.com"), 11);
        registry.note_unknown_host(None, 12);
        let seen = registry.unknown_hosts();
        assert_eq!(seen[0], UnknownHost { host: String::new(), derived: String::new(), count: 1, last_seen: 12 });
        assert_eq!(seen[1], UnknownHost { host: "wrong.example.com".into(), derived: "wrong".into(), count: 2, last_seen: 11 });
        for i in 0..100 {
            registry.note_unknown_host(Some(&format!("h{i}.example")), 100 + i);
        }
        let seen = registry.unknown_hosts();
        assert_eq!(seen.len(), UNKNOWN_HOSTS_MAX);
        assert_eq!(seen[0].host, "h99.example");
    }
}
