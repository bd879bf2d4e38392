//! REST broadcast (PROTOCOL.md §8), sans-IO: a parsed request in, broadcasts and a response out.
//!
//! Topics in REST are sub-topics (`room-1`), so a REST message reaches clients joined as
//! `room-1` and as `realtime:room-1`. Private messages need the sender's `INSERT` policy on
//! `realtime.messages`; without a project database only `service_role` (which bypasses RLS) can
//! send them: other roles' private batch messages are dropped, as a denied topic is (§8.2).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use auth::{Claims, KeyStore};
use engine::broadcast::PayloadEncoding;
use engine::client_error::RestError;
use engine::{Broadcast, BroadcastBody, TopicKey};

use crate::http::{self, Head};

/// A broadcast to send.
#[derive(Debug)]
pub struct Outgoing {
    /// Topic key.
    pub topic: TopicKey,
    /// The message.
    pub message: Arc<Broadcast>,
}

/// The outcome of a REST call.
#[derive(Debug)]
pub struct RestResult {
    /// The HTTP response (replaced by [`private_response`] for a single private message).
    pub response: Bytes,
    /// Broadcasts to publish.
    pub outgoing: Vec<Outgoing>,
    /// Private messages that need the caller's write permission per topic first.
    pub private_checks: Option<PrivateChecks>,
}

/// Private messages waiting for `INSERT` policy checks (one per topic).
#[derive(Debug)]
pub struct PrivateChecks {
    /// The caller's claims.
    pub claims: Claims,
    /// The messages.
    pub messages: Vec<Outgoing>,
    /// From the single-message endpoint (a denial is a 403, not a silent drop).
    pub single: bool,
}

/// The single endpoint's answer once its write check is known (PROTOCOL.md §8.3).
pub fn private_response(granted: bool, error: Option<&str>) -> Bytes {
    match (granted, error) {
        (_, Some(_)) => message(422, RestError::RlsPolicyError.text()),
        (true, None) => response(202, b""),
        (false, None) => message(403, RestError::Unauthorized.text()),
    }
}

/// The REST routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestRoute {
    /// `POST /api/broadcast`.
    Batch,
    /// `POST /api/broadcast/{topic}/events/{event}`.
    Single {
        /// URL-decoded sub-topic.
        topic: String,
        /// URL-decoded event.
        event: String,
    },
}

/// Matches both spellings of the REST paths.
pub fn route(path: &str) -> Option<RestRoute> {
    let path = path.strip_prefix("/realtime/v1").unwrap_or(path).trim_end_matches('/');
    if path == "/api/broadcast" {
        return Some(RestRoute::Batch);
    }
    let rest = path.strip_prefix("/api/broadcast/")?;
    let (topic, event) = rest.split_once("/events/")?;
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8().ok().map(|c| c.into_owned());
    let (topic, event) = (decode(topic)?, decode(event)?);
    if topic.is_empty() || event.is_empty() || event.contains('/') {
        return None;
    }
    Some(RestRoute::Single { topic, event })
}

/// CORS headers on every REST response (PROTOCOL.md §8.1).
pub const CORS_HEADERS: &str = "Access-Control-Allow-Origin: *\r\nAccess-Control-Allow-Methods: POST, OPTIONS\r\nAccess-Control-Allow-Headers: authorization, apikey, content-type, x-client-info\r\nAccess-Control-Max-Age: 86400\r\n";

/// A response with the CORS headers.
pub fn response(status: u16, body: &[u8]) -> Bytes {
    let content_type = if body.is_empty() { "text/plain" } else { "application/json" };
    http::response_with_headers(status, content_type, CORS_HEADERS, body)
}

/// The answer to any REST call while the server drains: 503.
pub fn draining() -> Bytes {
    message(503, engine::client_error::DRAINING)
}

/// Adds upstream's rate headers (PROTOCOL.md §8.1) to a complete response: `x-rate-rolling`
/// (the average), `x-rate-limit` and `x-rate-limit-remaining`.
pub fn with_rate_headers(response: Bytes, rolling: u64, limit: u32) -> Bytes {
    let Some(end) = response.windows(2).position(|w| w == b"\r\n") else { return response };
    let remaining = u64::from(limit).saturating_sub(rolling);
    let headers = format!("x-rate-rolling: {rolling}\r\nx-rate-limit: {limit}\r\nx-rate-limit-remaining: {remaining}\r\n");
    let mut out = Vec::with_capacity(response.len() + headers.len());
    out.extend_from_slice(&response[..end + 2]);
    out.extend_from_slice(headers.as_bytes());
    out.extend_from_slice(&response[end + 2..]);
    Bytes::from(out)
}

/// A refusal before the handler (unknown or suspended tenant, rate limit), with CORS headers.
pub fn refusal(status: u16, error: engine::client_error::RestError) -> Bytes {
    message(status, error.text())
}

fn message(status: u16, text: &str) -> Bytes {
    response(status, json!({ "message": text }).to_string().as_bytes())
}

/// Verifies the caller: `Authorization: Bearer` first, then the `apikey` header.
pub(crate) fn authorize(head: &Head, keys: &KeyStore, now: i64) -> Option<Claims> {
    let bearer = head.header("authorization").and_then(|value| {
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    let token = bearer.or_else(|| head.header("apikey"))?;
    keys.verify(&auth::clean_token(token), now).ok()
}

fn is_uuid(text: &str) -> bool {
    uuid::Uuid::parse_str(text).is_ok()
}

/// Handles a REST broadcast call. With a `database`, private messages of callers subject to
/// RLS are returned in `private_checks`; without one they cannot be checked and are refused.
/// What a REST call needs of the tenant the Host named (every message it produces is
/// addressed in that tenant).
#[derive(Debug, Clone, Copy)]
pub struct RestTenant<'a> {
    /// The tenant.
    pub id: engine::TenantId,
    /// Its keys.
    pub keys: &'a KeyStore,
    /// Its payload limit.
    pub payload_bytes_max: usize,
    /// Whether it has a database (private messages need one).
    pub database: bool,
}

/// Handles a REST broadcast call for `tenant`.
pub fn handle(tenant: RestTenant<'_>, route: &RestRoute, head: &Head, body: &[u8], now: i64) -> RestResult {
    let RestTenant { id: tenant, keys, payload_bytes_max, database } = tenant;
    let refuse = |response| RestResult { response, outgoing: Vec::new(), private_checks: None };
    let Some(claims) = authorize(head, keys, now) else {
        return refuse(message(401, RestError::Unauthorized.text()));
    };
    let bypasses_rls = claims.role == "service_role";
    let mut result = match route {
        RestRoute::Batch => batch(tenant, body, bypasses_rls, database, payload_bytes_max),
        RestRoute::Single { topic, event } => {
            let private = head.query_param("private") == Some("true");
            single(tenant, topic, event, head.header("content-type"), body, private, bypasses_rls, database, payload_bytes_max)
        }
    };
    if let Some(checks) = &mut result.private_checks {
        checks.claims = claims;
    }
    result
}

fn placeholder_claims() -> Claims {
    Claims { role: String::new(), exp: 0, sub: None, json: std::sync::Arc::from("{}") }
}

fn batch(tenant: engine::TenantId, body: &[u8], bypasses_rls: bool, database: bool, payload_bytes_max: usize) -> RestResult {
    let invalid = |errors: Value| RestResult { response: response(422, json!({ "errors": errors }).to_string().as_bytes()), outgoing: Vec::new(), private_checks: None };
    let parsed: Value = match auth::plain_json::from_slice(body) {
        Ok(value) => value,
        Err(_) => return invalid(json!({"messages": [RestError::Blank.text()]})),
    };
    let messages = match parsed.get("messages") {
        None | Some(Value::Null) => return invalid(json!({"messages": [RestError::Blank.text()]})),
        Some(Value::Array(messages)) => messages,
        Some(_) => return invalid(json!({"messages": [RestError::Invalid.text()]})),
    };
    let mut errors = Vec::with_capacity(messages.len());
    let mut any_error = false;
    for message in messages {
        let report = validate(message, payload_bytes_max);
        any_error |= !report.is_empty();
        errors.push(Value::Object(report));
    }
    if any_error {
        return invalid(json!({ "messages": errors }));
    }
    let mut outgoing = Vec::with_capacity(messages.len());
    let mut pending = Vec::new();
    for message in messages {
        let private = message.get("private").and_then(Value::as_bool).unwrap_or(false);
        if private && !bypasses_rls && !database {
            continue; // no write policy can be checked without the database: dropped (§8.2)
        }
        let topic = message["topic"].as_str().expect("validated");
        let mut payload = json!({"type": "broadcast", "event": message["event"], "payload": message["payload"]});
        if let Some(id) = message.get("id").and_then(Value::as_str) {
            payload["meta"] = json!({ "id": id });
        }
        let payload = Bytes::from(serde_json::to_vec(&payload).expect("JSON value serialises"));
        let item = Outgoing { topic: TopicKey::new_sub(tenant, topic, private), message: Arc::new(Broadcast { origin: None, body: BroadcastBody::Json { payload } }) };
        if private && !bypasses_rls {
            pending.push(item);
        } else {
            outgoing.push(item);
        }
    }
    let private_checks = (!pending.is_empty()).then(|| PrivateChecks { claims: placeholder_claims(), messages: pending, single: false });
    RestResult { response: response(202, b""), outgoing, private_checks }
}

/// Per-message errors of §8.2 (`{}` when valid).
fn validate(message: &Value, payload_bytes_max: usize) -> Map<String, Value> {
    let mut errors = Map::new();
    let blank = || json!([RestError::Blank.text()]);
    let invalid = || json!([RestError::Invalid.text()]);
    let Some(object) = message.as_object() else {
        errors.insert("topic".into(), blank());
        return errors;
    };
    for field in ["topic", "event"] {
        match object.get(field) {
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(Value::String(_)) | None | Some(Value::Null) => {
                errors.insert(field.into(), blank());
            }
            Some(_) => {
                errors.insert(field.into(), invalid());
            }
        }
    }
    match object.get("payload") {
        None | Some(Value::Null) => {
            errors.insert("payload".into(), blank());
        }
        Some(payload @ Value::Object(_)) => {
            let size = serde_json::to_vec(payload).map(|v| v.len()).unwrap_or(usize::MAX);
            if size > payload_bytes_max {
                errors.insert("payload".into(), json!([RestError::PayloadTooLarge.text()]));
            }
        }
        Some(_) => {
            errors.insert("payload".into(), invalid());
        }
    }
    if !matches!(object.get("private"), None | Some(Value::Null) | Some(Value::Bool(_))) {
        errors.insert("private".into(), invalid());
    }
    match object.get("id") {
        None | Some(Value::Null) => {}
        Some(Value::String(id)) if is_uuid(id) => {}
        Some(_) => {
            errors.insert("id".into(), invalid());
        }
    }
    errors
}

#[allow(clippy::too_many_arguments)]
fn single(tenant: engine::TenantId, topic: &str, event: &str, content_type: Option<&str>, body: &[u8], private: bool, bypasses_rls: bool, database: bool, payload_bytes_max: usize) -> RestResult {
    let refuse = |response| RestResult { response, outgoing: Vec::new(), private_checks: None };
    let media = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    let (encoding, payload) = match media.as_deref() {
        None | Some("") | Some("application/json") => {
            if body.iter().all(u8::is_ascii_whitespace) {
                return refuse(response(422, field_error("payload", RestError::Blank).as_bytes()));
            }
            let value: Value = match auth::plain_json::from_slice(body) {
                Ok(value) => value,
                Err(_) => return refuse(response(422, field_error("payload", RestError::Invalid).as_bytes())),
            };
            let value = if value.is_object() { value } else { json!({ "_json": value }) };
            (PayloadEncoding::Json, Bytes::from(serde_json::to_vec(&value).expect("JSON value serialises")))
        }
        Some("application/octet-stream") => (PayloadEncoding::Binary, Bytes::copy_from_slice(body)),
        Some(_) => {
            return refuse(response(
                415,
                json!({"error": RestError::UnsupportedMediaType.text()}).to_string().as_bytes(),
            ))
        }
    };
    if payload.len() > payload_bytes_max {
        return refuse(response(422, field_error("payload", RestError::PayloadTooLarge).as_bytes()));
    }
    if private && !bypasses_rls && !database {
        return refuse(message(422, RestError::TenantDatabaseUnavailable.text()));
    }
    let event = Bytes::copy_from_slice(event.as_bytes());
    let message = Broadcast { origin: None, body: BroadcastBody::User { event, encoding, payload, metadata: Bytes::new() } };
    let item = Outgoing { topic: TopicKey::new_sub(tenant, topic, private), message: Arc::new(message) };
    if private && !bypasses_rls {
        let checks = PrivateChecks { claims: placeholder_claims(), messages: vec![item], single: true };
        return RestResult { response: response(202, b""), outgoing: Vec::new(), private_checks: Some(checks) };
    }
    RestResult { response: response(202, b""), outgoing: vec![item], private_checks: None }
}

/// A 422 body with one field error: `{"errors":{"<field>":["<text>"]}}`.
fn field_error(field: &str, error: RestError) -> String {
    json!({"errors": {field: [error.text()]}}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"s";
    const NOW: i64 = 1_800_000_000;

    fn head(headers: &[(&str, &str)], query: Option<&str>) -> Head {
        Head {
            method: "POST".into(),
            path: "/api/broadcast".into(),
            query: query.map(str::to_string),
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            len: 0,
        }
    }

    fn key(role: &str) -> String {
        auth::sign_hs256(SECRET, json!({"role": role, "exp": NOW + 60}).as_object().unwrap())
    }

    fn status(result: &RestResult) -> (u16, String) {
        let text = String::from_utf8_lossy(&result.response).into_owned();
        let status = text[9..12].parse().unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    }

    fn call(route: RestRoute, headers: &[(&str, &str)], body: &str) -> RestResult {
        handle(RestTenant { id: engine::TenantId::SINGLE, keys: &KeyStore::new(SECRET.to_vec()), payload_bytes_max: 1000, database: false }, &route, &head(headers, None), body.as_bytes(), NOW)
    }

    #[test]
    fn routes_both_spellings() {
        assert_eq!(route("/api/broadcast"), Some(RestRoute::Batch));
        assert_eq!(route("/realtime/v1/api/broadcast"), Some(RestRoute::Batch));
        assert_eq!(
            route("/realtime/v1/api/broadcast/chat%3Aroom/events/new%20msg"),
            Some(RestRoute::Single { topic: "chat:room".into(), event: "new msg".into() })
        );
        assert_eq!(route("/api/broadcastx"), None);
    }

    #[test]
    fn rate_headers_follow_the_status_line() {
        let response = with_rate_headers(message(429, "Too many requests"), 12, 10);
        let text = String::from_utf8(response.to_vec()).unwrap();
        assert!(text.starts_with("HTTP/1.1 429 Too Many Requests\r\nx-rate-rolling: 12\r\nx-rate-limit: 10\r\nx-rate-limit-remaining: 0\r\n"), "{text}");
        assert!(text.ends_with("{\"message\":\"Too many requests\"}"));
    }

    #[test]
    fn batch_auth_and_validation() {
        let service = format!("Bearer {}", key("service_role"));
        assert_eq!(status(&call(RestRoute::Batch, &[], "{}")).0, 401);
        assert_eq!(status(&call(RestRoute::Batch, &[("authorization", "Bearer nope")], "{}")), (401, r#"{"message":"Unauthorized"}"#.into()));
        assert_eq!(status(&call(RestRoute::Batch, &[("authorization", &service)], "{}")), (422, r#"{"errors":{"messages":["can't be blank"]}}"#.into()));
        let body = r#"{"messages":[{"payload":{}},{"topic":"t","event":"e","payload":[1]},{"topic":"t","event":"e","payload":{}}]}"#;
        let (code, text) = status(&call(RestRoute::Batch, &[("authorization", &service)], body));
        assert_eq!(code, 422);
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value, json!({"errors":{"messages":[{"topic":["can't be blank"],"event":["can't be blank"]},{"payload":["is invalid"]},{}]}}));
        let big = format!(r#"{{"messages":[{{"topic":"t","event":"e","payload":{{"x":"{}"}}}}]}}"#, "a".repeat(2000));
        assert!(status(&call(RestRoute::Batch, &[("authorization", &service)], &big)).1.contains("Payload size exceeds tenant limit"));
    }

    #[test]
    fn batch_sends_public_and_service_private() {
        let body = r#"{"messages":[{"topic":"chat:room-42","event":"a","payload":{"x":1}},{"topic":"secret","event":"b","payload":{},"private":true,"id":"0b6f3c1e-6a1d-4b8f-9d61-3f0b3b0e8a11"}]}"#;
        let anon = call(RestRoute::Batch, &[("apikey", &key("anon"))], body);
        assert_eq!(status(&anon).0, 202);
        assert_eq!(anon.outgoing.len(), 1, "anon's private message is dropped without a policy check");
        assert_eq!(&*anon.outgoing[0].topic.sub, "chat:room-42");
        let service = call(RestRoute::Batch, &[("authorization", &format!("bearer {}", key("service_role")))], body);
        assert_eq!(service.outgoing.len(), 2);
        assert!(service.outgoing[1].topic.private);
        let BroadcastBody::Json { payload } = &service.outgoing[1].message.body else { panic!() };
        let value: Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(value, json!({"type":"broadcast","event":"b","payload":{},"meta":{"id":"0b6f3c1e-6a1d-4b8f-9d61-3f0b3b0e8a11"}}));
    }

    #[test]
    fn single_message_content_types() {
        let auth = format!("Bearer {}", key("anon"));
        let route = RestRoute::Single { topic: "room".into(), event: "e".into() };
        let ok = call(route.clone(), &[("authorization", &auth), ("content-type", "application/json")], r#"{"a":1}"#);
        assert_eq!(status(&ok).0, 202);
        let bin = call(route.clone(), &[("authorization", &auth), ("content-type", "application/octet-stream")], "\u{1}\u{2}");
        let BroadcastBody::User { encoding, .. } = &bin.outgoing[0].message.body else { panic!() };
        assert_eq!(*encoding, PayloadEncoding::Binary);
        assert_eq!(status(&call(route.clone(), &[("authorization", &auth), ("content-type", "text/plain")], "x")).0, 415);
        assert_eq!(status(&call(route.clone(), &[("authorization", &auth)], "")).1, r#"{"errors":{"payload":["can't be blank"]}}"#);
        let no_type = call(route, &[("authorization", &auth)], r#"{"a":2}"#);
        assert_eq!(no_type.outgoing.len(), 1, "a body without Content-Type is parsed as JSON (§0.4)");
    }
}
