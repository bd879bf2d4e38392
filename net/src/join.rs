//! The join payload (PROTOCOL.md §2.1–2.3), parsed leniently: a field that cannot be parsed is
//! treated as absent and never fails the join by itself (§2.2). Joins are rare next to
//! broadcasts, so this uses `serde_json::Value` for clarity.

use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Which token a channel uses (§2.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelToken {
    /// The connection's own token (no channel token, or an `sb_` API key).
    Connection,
    /// A token from the join payload, to be verified.
    Given(String),
}

/// Replay parameters as sent; checked at join (§3.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRequest {
    /// `since` in Unix ms, when it was an integer.
    pub since: Option<i64>,
    /// `limit`, when it was an integer.
    pub limit: Option<i64>,
    /// Whether the parameters were well-formed.
    pub valid: bool,
}

/// A parsed join payload.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinRequest {
    /// Whether the payload had a `config` key (the ok reply always echoes `postgres_changes`).
    pub has_config: bool,
    /// `config.broadcast.self`.
    pub broadcast_self: bool,
    /// `config.broadcast.ack`.
    pub broadcast_ack: bool,
    /// `config.broadcast.replay`.
    pub replay: Option<ReplayRequest>,
    /// `config.broadcast.replication_ready`.
    pub replication_ready: bool,
    /// `config.presence.enabled`.
    pub presence_enabled: bool,
    /// `config.presence.key` as a string; `None` → generate one.
    pub presence_key: Option<String>,
    /// `config.private`.
    pub private: bool,
    /// `config.postgres_changes`, null items dropped, each binding exactly as sent.
    pub postgres_changes: Vec<Map<String, Value>>,
    /// The channel token.
    pub token: ChannelToken,
}

/// The join payload is not a JSON object: upstream answers `Unknown Error on Channel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinPayloadNotObject;

/// Parses a join payload.
pub fn parse_join(payload: &RawValue) -> Result<JoinRequest, JoinPayloadNotObject> {
    let Ok(Value::Object(payload)) = auth::plain_json::from_str(payload.get()) else {
        return Err(JoinPayloadNotObject);
    };
    let config = payload.get("config");
    let has_config = config.is_some();
    let config = config.and_then(Value::as_object);
    let section = |name: &str| config.and_then(|c| c.get(name)).and_then(Value::as_object);
    let broadcast = section("broadcast");
    let presence = section("presence");
    let flag = |object: Option<&Map<String, Value>>, key: &str| {
        object.and_then(|o| o.get(key)).and_then(coerce_bool).unwrap_or(false)
    };
    Ok(JoinRequest {
        has_config,
        broadcast_self: flag(broadcast, "self"),
        broadcast_ack: flag(broadcast, "ack"),
        replay: broadcast.and_then(|b| b.get("replay")).and_then(parse_replay),
        replication_ready: flag(broadcast, "replication_ready"),
        presence_enabled: presence_enabled(presence),
        presence_key: presence.and_then(|p| p.get("key")).and_then(presence_key),
        private: config.and_then(|c| c.get("private")).and_then(coerce_bool).unwrap_or(false),
        postgres_changes: config
            .and_then(|c| c.get("postgres_changes"))
            .and_then(Value::as_array)
            .map(|bindings| bindings.iter().filter_map(|b| b.as_object().cloned()).collect())
            .unwrap_or_default(),
        token: channel_token(&payload),
    })
}

/// `config.presence.enabled`; when the key is absent (raw sockets: the product docs' Recipe 2
/// joins with `{presence: {key}}` only) a non-empty `key` enables presence, so the recipe's
/// initial `presence_state` arrives. The official clients always send `enabled`, so this never
/// changes what they get (README, "Deviations").
fn presence_enabled(presence: Option<&Map<String, Value>>) -> bool {
    let Some(presence) = presence else { return false };
    match presence.get("enabled") {
        Some(value) => coerce_bool(value).unwrap_or(false),
        None => presence.get("key").and_then(presence_key).is_some(),
    }
}

/// `true`/`false`, or the strings `"true"`/`"false"` in any case (§2.2).
fn coerce_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

fn presence_key(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn parse_replay(value: &Value) -> Option<ReplayRequest> {
    let object = value.as_object()?;
    let since = object.get("since").and_then(Value::as_i64);
    let limit = object.get("limit").and_then(Value::as_i64);
    let limit_ok = object.get("limit").is_none_or(|l| l.is_i64() || l.is_null());
    Some(ReplayRequest { since, limit, valid: since.is_some() && limit_ok })
}

/// PROTOCOL.md §2.3.
fn channel_token(payload: &Map<String, Value>) -> ChannelToken {
    let string = |key: &str| payload.get(key).and_then(Value::as_str);
    let first = string("access_token").or_else(|| string("user_token"));
    if first.is_some_and(|t| t.starts_with("sb_")) {
        return ChannelToken::Connection;
    }
    match string("user_token").or_else(|| string("access_token")) {
        Some(token) => ChannelToken::Given(token.to_string()),
        None => ChannelToken::Connection,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> JoinRequest {
        let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
        parse_join(&raw).unwrap()
    }

    #[test]
    fn realtime_js_join() {
        let join = parse(r#"{"config":{"broadcast":{"ack":true,"self":false},"presence":{"key":"","enabled":true},"postgres_changes":[],"private":false},"access_token":"tok","version":"realtime-js/2.119.1"}"#);
        assert!(join.has_config && join.broadcast_ack && !join.broadcast_self && join.presence_enabled);
        assert_eq!(join.presence_key, None);
        assert_eq!(join.token, ChannelToken::Given("tok".into()));
    }

    #[test]
    fn lenient_fields() {
        let join = parse(r#"{"config":{"broadcast":{"ack":"yes","self":"TRUE"},"presence":{"key":123},"postgres_changes":[null,{"event":"*"}],"private":"False"}}"#);
        assert!(!join.broadcast_ack);
        assert!(join.broadcast_self);
        assert_eq!(join.presence_key.as_deref(), Some("123"));
        assert_eq!(join.postgres_changes.len(), 1);
        assert!(!join.private);
        assert_eq!(join.token, ChannelToken::Connection);
        assert!(parse(r#"{"config":{"presence":{"key":"u1"}}}"#).presence_enabled, "docs' Recipe 2 join");
        assert!(!parse(r#"{"config":{"presence":{"key":"u1","enabled":false}}}"#).presence_enabled);
        assert!(!parse(r#"{"config":{"presence":{"key":""}}}"#).presence_enabled);
        let join = parse(r#"{"config":["x"]}"#);
        assert!(join.has_config && !join.broadcast_self);
        let join = parse(r#"{"config":{"broadcast":null,"postgres_changes":null}}"#);
        assert!(join.postgres_changes.is_empty());
        let raw: Box<RawValue> = serde_json::from_str("[1]").unwrap();
        assert_eq!(parse_join(&raw), Err(JoinPayloadNotObject));
    }

    #[test]
    fn token_choice() {
        assert_eq!(parse(r#"{"access_token":"sb_publishable_x"}"#).token, ChannelToken::Connection);
        assert_eq!(parse(r#"{"access_token":"a","user_token":"u"}"#).token, ChannelToken::Given("u".into()));
        assert_eq!(parse(r#"{"access_token":null,"user_token":"sb_x"}"#).token, ChannelToken::Connection);
        assert_eq!(parse(r#"{"access_token":""}"#).token, ChannelToken::Given(String::new()));
        assert_eq!(parse(r#"{}"#).token, ChannelToken::Connection);
    }

    #[test]
    fn replay_parameters() {
        let join = parse(r#"{"config":{"broadcast":{"replay":{"since":1724000000000,"limit":10}}}}"#);
        assert_eq!(join.replay, Some(ReplayRequest { since: Some(1724000000000), limit: Some(10), valid: true }));
        let join = parse(r#"{"config":{"broadcast":{"replay":{"limit":"x"}}}}"#);
        assert!(!join.replay.unwrap().valid);
    }
}
