//! A tenant's configuration as written in the tenants file or sent to the tenant API
//! (CONTRACT.md "Tenants file", "Tenant API"): upstream's field names.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use engine::limits::WS_MESSAGE_BYTES_MAX;
use engine::Limits;

use crate::TenantError;

/// Upstream's defaults for a new tenant (PROTOCOL.md §9.1).
pub mod defaults {
    /// Connections with at least one joined channel.
    pub const MAX_CONCURRENT_USERS: u32 = 200;
    /// Events per second (rolling average).
    pub const MAX_EVENTS_PER_SECOND: u32 = 100;
    /// Joins per second (rolling average).
    pub const MAX_JOINS_PER_SECOND: u32 = 100;
    /// Joined channels per connection.
    pub const MAX_CHANNELS_PER_CLIENT: u32 = 100;
    /// Presence events per second.
    pub const MAX_PRESENCE_EVENTS_PER_SECOND: u32 = 1000;
    /// Payload size, KB (1 KB = 1000 bytes).
    pub const MAX_PAYLOAD_SIZE_IN_KB: u32 = 3000;
}

/// Longest external id (a DNS label).
pub const EXTERNAL_ID_BYTES_MAX: usize = 63;

/// The fields a tenants file entry may have (anything else is refused: a misspelt limit would
/// otherwise be silently ignored).
pub(crate) const FILE_FIELDS: &[&str] = &[
    "external_id",
    "name",
    "jwt_secret",
    "jwt_jwks",
    "database_url",
    "extensions",
    "max_concurrent_users",
    "max_events_per_second",
    "max_joins_per_second",
    "max_channels_per_client",
    "max_presence_events_per_second",
    "max_payload_size_in_kb",
    "private_only",
    "suspend",
    "presence_enabled",
];

/// One tenant as configured. Every limit is optional: omitted means upstream's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TenantConfig {
    /// The Host header's first label that selects this tenant.
    #[serde(default)]
    pub external_id: String,
    /// A display name (upstream's `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// HS256 secret of the tenant's tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<String>,
    /// The tenant's JWKS: a path to a JSON file (tenants file) or the JWKS object itself (API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_jwks: Option<serde_json::Value>,
    /// The tenant's database (Postgres Changes, private channels, database broadcasts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Upstream's way of giving the database: an extension of type `postgres_cdc_rls`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extensions: Vec<Extension>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub max_concurrent_users: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub max_events_per_second: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub max_joins_per_second: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub max_channels_per_client: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub max_presence_events_per_second: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub max_payload_size_in_kb: Option<u32>,
    /// Only private channels may be joined (`PrivateOnly` join error otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_only: Option<bool>,
    /// Realtime is switched off for the tenant (upgrades 403, REST 403).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// Every channel gets presence, whatever its join asked (PROTOCOL.md §2.4 step 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_enabled: Option<bool>,
}

/// Upstream's tenant extension; only `postgres_cdc_rls` is understood.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Extension {
    /// `postgres_cdc_rls`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `db_host`, `db_port`, `db_name`, `db_user`, `db_password`, `ssl_enforced`, ...
    #[serde(default)]
    pub settings: serde_json::Map<String, serde_json::Value>,
}

/// The extension type that carries a tenant's database.
pub const POSTGRES_EXTENSION: &str = "postgres_cdc_rls";

impl Extension {
    /// The database URL the settings describe.
    pub fn database_url(&self) -> Result<String, TenantError> {
        let text = |key: &str| -> Option<String> {
            match self.settings.get(key)? {
                serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
        };
        let missing = |key: &str| TenantError::Invalid(format!("extension {POSTGRES_EXTENSION}: settings.{key} is required"));
        let host = text("db_host").ok_or_else(|| missing("db_host"))?;
        let name = text("db_name").ok_or_else(|| missing("db_name"))?;
        let user = text("db_user").ok_or_else(|| missing("db_user"))?;
        let password = text("db_password").unwrap_or_default();
        let port = text("db_port").unwrap_or_else(|| "5432".into());
        if port.parse::<u16>().is_err() {
            return Err(TenantError::Invalid(format!("extension {POSTGRES_EXTENSION}: settings.db_port {port:?} is not a port")));
        }
        let ssl = matches!(self.settings.get("ssl_enforced"), Some(serde_json::Value::Bool(true)));
        let mut url = format!("postgres://{}:{}@{}:{}/{}", encode(&user), encode(&password), host, port, encode(&name));
        if ssl {
            url.push_str("?sslmode=require");
        }
        Ok(url)
    }
}

/// Percent-encodes what may not appear as is in a URL's user, password or path.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The parts of the limits that are per process, not per tenant.
#[derive(Debug, Clone)]
pub struct ProcessLimits {
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Delay before a join error reply.
    pub join_error_delay: Duration,
    /// Delay before a failed upgrade's response.
    pub connect_error_delay: Duration,
    /// Presence coalescing window.
    pub presence_coalesce: Duration,
}

impl ProcessLimits {
    /// Takes the per-process parts of `limits`.
    pub fn of(limits: &Limits) -> ProcessLimits {
        ProcessLimits {
            idle_timeout: limits.idle_timeout,
            join_error_delay: limits.join_error_delay,
            connect_error_delay: limits.connect_error_delay,
            presence_coalesce: limits.presence_coalesce,
        }
    }
}

impl TenantConfig {
    /// Checks the fields; the first problem names its field.
    pub fn validate(&self) -> Result<(), TenantError> {
        match self.field_errors().into_iter().next() {
            None => Ok(()),
            Some(("external_id", why)) => Err(TenantError::Invalid(format!("external_id {:?}: {why}", self.external_id))),
            Some((field, why)) => Err(TenantError::Invalid(format!("tenant {:?}: {field} {why}", self.external_id))),
        }
    }

    /// Every problem, as (field, message) (the tenant API's 422 names the fields).
    pub fn field_errors(&self) -> Vec<(&'static str, String)> {
        let mut errors = Vec::new();
        let id = &self.external_id;
        if id.is_empty() {
            errors.push(("external_id", "can't be blank".to_string()));
        } else if id.len() > EXTERNAL_ID_BYTES_MAX || !id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') {
            errors.push(("external_id", format!("use 1 to {EXTERNAL_ID_BYTES_MAX} characters of a-z, 0-9, - and _ (the Host header's first label)")));
        }
        match (&self.jwt_secret, &self.jwt_jwks) {
            (None, None) => errors.push(("jwt_secret", "or jwt_jwks is required".to_string())),
            (Some(secret), _) if secret.is_empty() => errors.push(("jwt_secret", "is empty".to_string())),
            _ => {}
        }
        if self.max_channels_per_client == Some(0) {
            errors.push(("max_channels_per_client", "must be at least 1".to_string()));
        }
        if let Some(kb) = self.max_payload_size_in_kb {
            if kb == 0 || kb as usize * 1000 > WS_MESSAGE_BYTES_MAX {
                errors.push(("max_payload_size_in_kb", format!("must be in 1..={}", WS_MESSAGE_BYTES_MAX / 1000)));
            }
        }
        if let Some(url) = &self.database_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                errors.push(("database_url", "must be a postgres:// URL".to_string()));
            }
        }
        for extension in &self.extensions {
            if extension.kind == POSTGRES_EXTENSION {
                if let Err(TenantError::Invalid(why)) = extension.database_url() {
                    errors.push(("extensions", why));
                }
            }
        }
        errors
    }

    /// The database URL: `database_url`, else a `postgres_cdc_rls` extension's settings.
    pub fn database(&self) -> Option<String> {
        if let Some(url) = self.database_url.as_deref().filter(|u| !u.trim().is_empty()) {
            return Some(url.trim().to_string());
        }
        self.extensions.iter().find(|e| e.kind == POSTGRES_EXTENSION).and_then(|e| e.database_url().ok())
    }

    /// This tenant's limits: its own values, upstream's defaults for the rest.
    pub fn limits(&self, process: &ProcessLimits) -> Limits {
        Limits {
            concurrent_users_max: self.max_concurrent_users.unwrap_or(defaults::MAX_CONCURRENT_USERS),
            events_per_second_max: self.max_events_per_second.unwrap_or(defaults::MAX_EVENTS_PER_SECOND),
            joins_per_second_max: self.max_joins_per_second.unwrap_or(defaults::MAX_JOINS_PER_SECOND),
            presence_events_per_second_max: self.max_presence_events_per_second.unwrap_or(defaults::MAX_PRESENCE_EVENTS_PER_SECOND),
            channels_per_client_max: self.max_channels_per_client.unwrap_or(defaults::MAX_CHANNELS_PER_CLIENT),
            payload_bytes_max: self.max_payload_size_in_kb.unwrap_or(defaults::MAX_PAYLOAD_SIZE_IN_KB) as usize * 1000,
            idle_timeout: process.idle_timeout,
            join_error_delay: process.join_error_delay,
            connect_error_delay: process.connect_error_delay,
            presence_coalesce: process.presence_coalesce,
        }
    }

    /// The fields whose change disconnects the tenant's sockets (PROTOCOL.md §1.11): the keys,
    /// `private_only` and `suspend`. Limits and the database are not among them.
    pub(crate) fn disconnect_fields(&self) -> (Option<&str>, Option<&serde_json::Value>, bool, bool) {
        (self.jwt_secret.as_deref(), self.jwt_jwks.as_ref(), self.private_only.unwrap_or(false), self.suspend.unwrap_or(false))
    }
}

/// The tenants file's shape: `[[tenant]]` tables.
#[derive(Debug, Deserialize)]
struct TenantsFile {
    #[serde(default)]
    tenant: Vec<toml::Table>,
}

/// Parses a tenants file (TOML, CONTRACT.md): every entry validated, external ids unique,
/// unknown fields refused by name.
pub fn parse_file(text: &str) -> Result<Vec<TenantConfig>, TenantError> {
    let file: TenantsFile = toml::from_str(text).map_err(|e| TenantError::Invalid(format!("not a tenants file: {}", e.message())))?;
    let mut tenants: Vec<TenantConfig> = Vec::with_capacity(file.tenant.len());
    for (index, table) in file.tenant.into_iter().enumerate() {
        if let Some(unknown) = table.keys().find(|k| !FILE_FIELDS.contains(&k.as_str())) {
            return Err(TenantError::Invalid(format!("[[tenant]] #{}: unknown field {unknown:?}", index + 1)));
        }
        let tenant: TenantConfig = table.try_into().map_err(|e: toml::de::Error| TenantError::Invalid(format!("[[tenant]] #{}: {}", index + 1, e.message())))?;
        tenant.validate()?;
        if tenants.iter().any(|t| t.external_id == tenant.external_id) {
            return Err(TenantError::Invalid(format!("external_id {:?} appears twice", tenant.external_id)));
        }
        tenants.push(tenant);
    }
    Ok(tenants)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[tenant]]
external_id = "acme"
jwt_secret = "acme-secret"
database_url = "postgres://realtime:pw@db-acme:5432/postgres"
max_concurrent_users = 10
max_payload_size_in_kb = 100
private_only = true

[[tenant]]
external_id = "globex"
jwt_secret = "globex-secret"
"#;

    #[test]
    fn parses_the_contract_example_with_defaults_for_omitted_limits() {
        let tenants = parse_file(FILE).unwrap();
        assert_eq!(tenants.len(), 2);
        let process = ProcessLimits::of(&Limits::default());
        let acme = tenants[0].limits(&process);
        assert_eq!(acme.concurrent_users_max, 10);
        assert_eq!(acme.payload_bytes_max, 100_000);
        assert_eq!(acme.events_per_second_max, defaults::MAX_EVENTS_PER_SECOND);
        assert_eq!(tenants[0].private_only, Some(true));
        assert_eq!(tenants[0].database().as_deref(), Some("postgres://realtime:pw@db-acme:5432/postgres"));
        let globex = tenants[1].limits(&process);
        assert_eq!(globex.concurrent_users_max, 200);
        assert_eq!(globex.joins_per_second_max, 100);
        assert_eq!(globex.presence_events_per_second_max, 1000);
        assert_eq!(globex.channels_per_client_max, 100);
        assert_eq!(globex.payload_bytes_max, 3_000_000);
        assert_eq!(tenants[1].database(), None);
    }

    #[test]
    fn refuses_bad_files_naming_the_problem() {
        let error = |text: &str| parse_file(text).unwrap_err().to_string();
        assert!(error("[[tenant]]\nexternal_id = \"a\"\njwt_secret = \"s\"\nmax_concurent_users = 3\n").contains("max_concurent_users"));
        assert!(error("[[tenant]]\nexternal_id = \"a\"\n").contains("jwt_secret"));
        assert!(error("[[tenant]]\nexternal_id = \"A.b\"\njwt_secret = \"s\"\n").contains("external_id"));
        assert!(error("[[tenant]]\nexternal_id = \"a\"\njwt_secret = \"s\"\n[[tenant]]\nexternal_id = \"a\"\njwt_secret = \"t\"\n").contains("twice"));
        assert!(error("[[tenant]]\nexternal_id = \"a\"\njwt_secret = \"s\"\nmax_payload_size_in_kb = 6000\n").contains("max_payload_size_in_kb"));
        assert!(error("[[tenant]]\nexternal_id = \"a\"\njwt_secret = \"s\"\nmax_concurrent_users = \"many\"\n").contains("#1"));
        assert!(error("not toml [").contains("not a tenants file"));
        assert_eq!(parse_file("").unwrap(), vec![]);
    }

    #[test]
    fn the_database_may_come_from_upstreams_extension() {
        let mut settings = serde_json::Map::new();
        for (k, v) in [("db_host", "db.local"), ("db_name", "postgres"), ("db_user", "supa user"), ("db_password", "p@ss:/")] {
            settings.insert(k.into(), v.into());
        }
        settings.insert("db_port".into(), 6543.into());
        settings.insert("ssl_enforced".into(), true.into());
        let tenant = TenantConfig {
            external_id: "t".into(),
            jwt_secret: Some("s".into()),
            extensions: vec![Extension { kind: POSTGRES_EXTENSION.into(), settings }],
            ..TenantConfig::default()
        };
        tenant.validate().unwrap();
        assert_eq!(tenant.database().as_deref(), Some("postgres://supa%20user:p%40ss%3A%2F@db.local:6543/postgres?sslmode=require"));
    }
}
