//! The tenant API (CONTRACT.md "Tenant API"): upstream's paths and JSON shapes, pure. The
//! caller (the control database's store, or the read-only file mode) runs the [`Operation`]
//! this module parses and renders the answer with the helpers here.
//!
//! Upstream's behaviour kept: a missing or bad bearer is 403 with an empty body; unknown ids
//! are 404 `{"message":"not found"}`; create/update take `{"tenant": {...}}` (201 with a
//! `location` header on create, 200 on update); `DELETE` is 204 even for a missing tenant; an
//! invalid body is 422 `{"errors": {"<field>": ["<message>"]}}`; responses are `{"data": ...}`
//! and never carry a secret or a database password.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use auth::{AuthError, KeyStore};

use crate::config::{ProcessLimits, TenantConfig, POSTGRES_EXTENSION};
use crate::directory::Registry;

/// A request, as the network side read it.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    /// `GET`, `POST`, `PUT`, `PATCH`, `DELETE`.
    pub method: String,
    /// The path (a query string is ignored).
    pub path: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// The `location` header of a 201.
    pub location: Option<String>,
    /// JSON, or empty.
    pub body: Vec<u8>,
}

impl ApiResponse {
    /// A JSON answer.
    pub fn json(status: u16, body: &Value) -> ApiResponse {
        ApiResponse { status, location: None, body: body.to_string().into_bytes() }
    }

    /// An answer without a body.
    pub fn empty(status: u16) -> ApiResponse {
        ApiResponse { status, location: None, body: Vec::new() }
    }

    /// 404 `{"message":"not found"}`.
    pub fn not_found() -> ApiResponse {
        ApiResponse::json(404, &json!({"message": "not found"}))
    }

    /// 422 naming each field.
    pub fn unprocessable(errors: &[(&str, String)]) -> ApiResponse {
        let mut by_field: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (field, message) in errors {
            by_field.entry(field).or_default().push(message);
        }
        ApiResponse::json(422, &json!({ "errors": by_field }))
    }

    /// 503 when the control database cannot answer.
    pub fn unavailable(why: &str) -> ApiResponse {
        ApiResponse::json(503, &json!({ "message": why }))
    }
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    /// `GET /api/tenants`.
    List,
    /// `POST /api/tenants` (create or update the body's `external_id`).
    Upsert {
        /// The tenant's id (the body's for a POST, the path's for PUT/PATCH).
        external_id: String,
        /// The fields sent, to lay over the stored tenant (if any).
        fields: Map<String, Value>,
    },
    /// `GET /api/tenants/{id}`.
    Get(String),
    /// `DELETE /api/tenants/{id}`.
    Delete(String),
    /// `POST /api/tenants/{id}/reload`: re-read the tenant and disconnect its sockets.
    Reload(String),
    /// `POST /api/tenants/{id}/shutdown`: disconnect its sockets.
    Shutdown(String),
    /// `GET /api/tenants/{id}/health`.
    Health(String),
}

impl Operation {
    /// Whether it changes tenants (refused in the read-only file mode).
    pub fn writes(&self) -> bool {
        matches!(self, Operation::Upsert { .. } | Operation::Delete(_) | Operation::Reload(_) | Operation::Shutdown(_))
    }
}

/// Whether `path` is the tenant API's.
pub fn is_api_path(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    let path = path.strip_prefix("/realtime/v1").unwrap_or(path);
    path == "/api/tenants" || path.starts_with("/api/tenants/")
}

/// Checks the bearer (a JWT signed with `API_JWT_SECRET`; `role` and `exp` are not required,
/// an `exp` in the past is refused). `false` → 403 with an empty body.
pub fn authorized(request: &ApiRequest, keys: &KeyStore, now: i64) -> bool {
    let Some(value) = request.authorization.as_deref() else { return false };
    let Some((scheme, token)) = value.trim().split_once(' ') else { return false };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    matches!(keys.verify(token.trim(), now), Ok(_) | Err(AuthError::MissingClaims))
}

/// Parses a request into an operation, or the answer that refuses it (404 for unknown paths
/// and methods, 422 for a body that is not `{"tenant": {...}}`).
pub fn parse(request: &ApiRequest) -> Result<Operation, ApiResponse> {
    let path = request.path.split('?').next().unwrap_or(&request.path);
    let path = path.strip_prefix("/realtime/v1").unwrap_or(path);
    let rest = path.strip_prefix("/api/tenants").ok_or_else(ApiResponse::not_found)?;
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let method = request.method.as_str();
    let id = |i: usize| percent_decode(parts[i]);
    match (method, parts.len()) {
        ("GET", 0) => Ok(Operation::List),
        ("POST", 0) => {
            let fields = tenant_fields(&request.body)?;
            let external_id = match fields.get("external_id") {
                Some(Value::String(id)) => id.clone(),
                _ => return Err(ApiResponse::unprocessable(&[("external_id", "can't be blank".into())])),
            };
            Ok(Operation::Upsert { external_id, fields })
        }
        ("GET", 1) => Ok(Operation::Get(id(0))),
        ("PUT" | "PATCH", 1) => {
            let mut fields = tenant_fields(&request.body)?;
            fields.insert("external_id".into(), Value::String(id(0)));
            Ok(Operation::Upsert { external_id: id(0), fields })
        }
        ("DELETE", 1) => Ok(Operation::Delete(id(0))),
        ("POST", 2) if parts[1] == "reload" => Ok(Operation::Reload(id(0))),
        ("POST", 2) if parts[1] == "shutdown" => Ok(Operation::Shutdown(id(0))),
        ("GET", 2) if parts[1] == "health" => Ok(Operation::Health(id(0))),
        _ => Err(ApiResponse::not_found()),
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `tenant` object of a body.
fn tenant_fields(body: &[u8]) -> Result<Map<String, Value>, ApiResponse> {
    match auth::plain_json::from_slice(body) {
        Ok(Value::Object(mut object)) => match object.remove("tenant") {
            Some(Value::Object(fields)) => Ok(fields),
            _ => Err(ApiResponse::unprocessable(&[("tenant", "can't be blank".into())])),
        },
        _ => Err(ApiResponse::unprocessable(&[("tenant", "can't be blank".into())])),
    }
}

/// The tenant an upsert leads to: `fields` laid over `existing` (a field sent as `null`
/// clears it), type-checked field by field and validated. `Err` is the 422.
pub fn merge(existing: Option<&TenantConfig>, fields: &Map<String, Value>) -> Result<TenantConfig, ApiResponse> {
    let mut errors: Vec<(&str, String)> = Vec::new();
    let mut merged = match existing {
        Some(config) => match serde_json::to_value(config) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        },
        None => Map::new(),
    };
    for (key, value) in fields {
        // `jwt_jwks` and extension settings are read as `serde_json::Value`s, whose reader
        // parses a string under the raw-value key again (no recursion limit across strings):
        // such a field is refused before it reaches that reader.
        if auth::plain_json::holds_raw_value_key(value) {
            errors.push((known_field(key), "is invalid".to_string()));
            continue;
        }
        // Each field alone must have the right type (so the 422 can name it).
        let alone = json!({ key.as_str(): value });
        if serde_json::from_value::<TenantConfig>(alone).is_err() {
            errors.push((known_field(key), "is invalid".to_string()));
            continue;
        }
        if value.is_null() {
            merged.remove(key);
        } else {
            merged.insert(key.clone(), value.clone());
        }
    }
    if !errors.is_empty() {
        return Err(ApiResponse::unprocessable(&errors));
    }
    let config: TenantConfig = serde_json::from_value(Value::Object(merged)).map_err(|e| ApiResponse::unprocessable(&[("tenant", e.to_string())]))?;
    let problems = config.field_errors();
    if !problems.is_empty() {
        return Err(ApiResponse::unprocessable(&problems));
    }
    Ok(config)
}

/// A field name for an error: a known field by its name, anything else as `tenant`.
fn known_field(key: &str) -> &'static str {
    crate::config::FILE_FIELDS.iter().find(|f| **f == key).copied().unwrap_or("tenant")
}

/// A tenant as the API shows it: effective limits, flags, the database without its password;
/// never `jwt_secret`, `jwt_jwks` or a database password.
pub fn render(config: &TenantConfig, process: &ProcessLimits, inserted_at: Option<&str>) -> Value {
    let limits = config.limits(process);
    let extensions: Vec<Value> = config
        .extensions
        .iter()
        .map(|e| {
            let mut settings = e.settings.clone();
            settings.remove("db_password");
            json!({"type": e.kind, "settings": settings})
        })
        .collect();
    json!({
        "id": config.external_id,
        "external_id": config.external_id,
        "name": config.name.clone().unwrap_or_else(|| config.external_id.clone()),
        "max_concurrent_users": limits.concurrent_users_max,
        "max_events_per_second": limits.events_per_second_max,
        "max_joins_per_second": limits.joins_per_second_max,
        "max_channels_per_client": limits.channels_per_client_max,
        "max_presence_events_per_second": limits.presence_events_per_second_max,
        "max_payload_size_in_kb": limits.payload_bytes_max / 1000,
        "private_only": config.private_only.unwrap_or(false),
        "suspend": config.suspend.unwrap_or(false),
        "presence_enabled": config.presence_enabled.unwrap_or(false),
        "database_url": config.database_url.as_deref().map(redact_password),
        "extensions": extensions,
        "inserted_at": inserted_at,
    })
}

/// `postgres://user:secret@host/db` → `postgres://user@host/db`.
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let Some((userinfo, host)) = rest.rsplit_once('@') else { return url.to_string() };
    let user = userinfo.split(':').next().unwrap_or("");
    format!("{scheme}://{user}@{host}")
}

/// The read-only API of the file mode: reads from the live directory; writes are 405.
#[derive(Debug)]
pub struct ReadOnly<'a> {
    /// The live tenants.
    pub registry: &'a Registry,
}

impl ReadOnly<'_> {
    /// Answers one (authorized) request.
    pub fn answer(&self, request: &ApiRequest) -> ApiResponse {
        let operation = match parse(request) {
            Ok(operation) => operation,
            Err(response) => return response,
        };
        if operation.writes() {
            return ApiResponse::json(405, &json!({"message": "the tenants come from REALTIME_TENANTS: edit the file and send SIGHUP"}));
        }
        let directory = self.registry.load();
        let process = self.registry.process_limits();
        match operation {
            Operation::List => {
                let all: Vec<Value> = directory.tenants().iter().map(|t| render(&t.config, process, None)).collect();
                ApiResponse::json(200, &json!({ "data": all }))
            }
            Operation::Get(id) => match directory.by_external_id(&id) {
                Some(tenant) => ApiResponse::json(200, &json!({ "data": render(&tenant.config, process, None) })),
                None => ApiResponse::not_found(),
            },
            Operation::Health(id) => match directory.by_external_id(&id) {
                Some(tenant) => ApiResponse::json(200, &json!({ "data": health(tenant) })),
                None => ApiResponse::not_found(),
            },
            _ => ApiResponse::not_found(),
        }
    }
}

/// `GET …/health`'s data: whether the tenant serves, and its live counts.
pub fn health(tenant: &crate::Tenant) -> Value {
    json!({
        "healthy": !tenant.suspend,
        "connected_sockets": tenant.counters.connections(),
        "connected_users": tenant.counters.users(),
        "database": tenant.database_url.is_some(),
    })
}

/// Whether a tenant's extension names a database (for `render`'s users).
pub fn has_postgres_extension(config: &TenantConfig) -> bool {
    config.extensions.iter().any(|e| e.kind == POSTGRES_EXTENSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, body: Value) -> ApiRequest {
        ApiRequest { method: method.into(), path: path.into(), authorization: None, body: body.to_string().into_bytes() }
    }

    #[test]
    fn parses_upstreams_paths() {
        assert_eq!(parse(&request("GET", "/api/tenants", json!(null))), Ok(Operation::List));
        assert_eq!(parse(&request("GET", "/api/tenants/acme?x=1", json!(null))), Ok(Operation::Get("acme".into())));
        assert_eq!(parse(&request("DELETE", "/api/tenants/acme", json!(null))), Ok(Operation::Delete("acme".into())));
        assert_eq!(parse(&request("POST", "/api/tenants/acme/reload", json!(null))), Ok(Operation::Reload("acme".into())));
        assert_eq!(parse(&request("GET", "/api/tenants/acme/health", json!(null))), Ok(Operation::Health("acme".into())));
        let put = parse(&request("PATCH", "/api/tenants/acme", json!({"tenant": {"max_events_per_second": 5}}))).unwrap();
        let Operation::Upsert { external_id, fields } = put else { panic!() };
        assert_eq!(external_id, "acme");
        assert_eq!(fields["external_id"], "acme");
        assert_eq!(parse(&request("GET", "/api/tenants/a/b/c", json!(null))), Err(ApiResponse::not_found()));
        let no_tenant = parse(&request("POST", "/api/tenants", json!({"x": 1}))).unwrap_err();
        assert_eq!((no_tenant.status, String::from_utf8(no_tenant.body).unwrap()), (422, r#"{"errors":{"tenant":["can't be blank"]}}"#.into()));
        let no_id = parse(&request("POST", "/api/tenants", json!({"tenant": {"jwt_secret": "s"}}))).unwrap_err();
        assert_eq!(no_id.status, 422);
        assert!(String::from_utf8(no_id.body).unwrap().contains("external_id"));
        assert!(is_api_path("/api/tenants") && is_api_path("/api/tenants/x/health") && !is_api_path("/api/tenantsx"));
    }

    #[test]
    fn bearer_must_be_signed_with_the_api_secret() {
        let keys = KeyStore::new(b"api-secret".to_vec());
        let mut claims = Map::new();
        claims.insert("iss".into(), "ops".into());
        let good = auth::sign_hs256(b"api-secret", &claims);
        let bad = auth::sign_hs256(b"other", &claims);
        let with = |auth: Option<String>| ApiRequest { method: "GET".into(), path: "/api/tenants".into(), authorization: auth, body: vec![] };
        assert!(authorized(&with(Some(format!("Bearer {good}"))), &keys, 0));
        assert!(authorized(&with(Some(format!("bearer {good}"))), &keys, 0));
        assert!(!authorized(&with(Some(format!("Bearer {bad}"))), &keys, 0));
        assert!(!authorized(&with(Some(good.clone())), &keys, 0));
        assert!(!authorized(&with(None), &keys, 0));
        claims.insert("exp".into(), 10.into());
        let expired = auth::sign_hs256(b"api-secret", &claims);
        assert!(!authorized(&with(Some(format!("Bearer {expired}"))), &keys, 100));
    }

    #[test]
    fn merges_and_names_invalid_fields() {
        let existing = TenantConfig { external_id: "acme".into(), jwt_secret: Some("s".into()), max_events_per_second: Some(5), ..TenantConfig::default() };
        let mut fields = Map::new();
        fields.insert("max_joins_per_second".into(), json!(7));
        fields.insert("max_events_per_second".into(), Value::Null);
        let merged = merge(Some(&existing), &fields).unwrap();
        assert_eq!((merged.max_joins_per_second, merged.max_events_per_second, merged.jwt_secret.as_deref()), (Some(7), None, Some("s")));
        let mut bad = Map::new();
        bad.insert("max_concurrent_users".into(), json!("many"));
        bad.insert("suspend".into(), json!(3));
        let response = merge(Some(&existing), &bad).unwrap_err();
        assert_eq!(response.status, 422);
        let body: Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(body, json!({"errors": {"max_concurrent_users": ["is invalid"], "suspend": ["is invalid"]}}));
        let mut no_key = Map::new();
        no_key.insert("external_id".into(), json!("new"));
        let body: Value = serde_json::from_slice(&merge(None, &no_key).unwrap_err().body).unwrap();
        assert_eq!(body["errors"]["jwt_secret"], json!(["or jwt_jwks is required"]));
    }

    /// Issue 16's dependency review: `jwt_jwks` and extension settings are `serde_json::Value`
    /// fields, whose reader parses a string under the raw-value key again with a fresh
    /// recursion limit; strings nested in strings overflowed the stack of the thread serving
    /// the tenant API (on the old code this test aborts the test process).
    #[test]
    fn a_field_nesting_raw_values_is_invalid_on_a_small_stack() {
        let nested = auth::plain_json::nested_raw_values(14);
        let body = format!(r#"{{"external_id":"acme","jwt_secret":"s","jwt_jwks":{{"keys":[{nested}]}},"extensions":[{{"type":"postgres_cdc_rls","settings":{nested}}}]}}"#);
        let outcome = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let Ok(Value::Object(fields)) = auth::plain_json::from_str(&body) else { panic!("the body is JSON") };
                let response = merge(None, &fields).unwrap_err();
                (response.status, serde_json::from_slice::<Value>(&response.body).unwrap())
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(outcome, (422, json!({"errors": {"jwt_jwks": ["is invalid"], "extensions": ["is invalid"]}})));
    }

    #[test]
    fn renders_without_secrets() {
        let mut settings = Map::new();
        for (k, v) in [("db_host", "h"), ("db_name", "d"), ("db_user", "u"), ("db_password", "pw")] {
            settings.insert(k.into(), v.into());
        }
        let config = TenantConfig {
            external_id: "acme".into(),
            jwt_secret: Some("top-secret".into()),
            database_url: Some("postgres://realtime:hunter2@db:5432/postgres".into()),
            extensions: vec![crate::config::Extension { kind: POSTGRES_EXTENSION.into(), settings }],
            max_events_per_second: Some(9),
            ..TenantConfig::default()
        };
        let shown = render(&config, &ProcessLimits::of(&engine::Limits::default()), Some("2026-12-02T00:00:00Z")).to_string();
        assert!(!shown.contains("top-secret") && !shown.contains("hunter2") && !shown.contains("pw\""), "{shown}");
        assert!(shown.contains("\"max_events_per_second\":9") && shown.contains("postgres://realtime@db:5432/postgres"), "{shown}");
        assert!(has_postgres_extension(&config));
    }
}
