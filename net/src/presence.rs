//! Presence on the wire (PROTOCOL.md §4): parsing track/untrack frames, and rendering
//! `presence_state` and `presence_diff` payloads from the engine's presence elements.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Map, Value};

use engine::presence::{Diff, Dot, Element};

use crate::frame::write_json_str;

/// What a presence frame asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum PresenceRequest {
    /// No `event` key: nothing happens, the reply is ok.
    NoEvent,
    /// Track this payload (`None` when the frame had no payload: tracks `{}`).
    Track(Option<Value>),
    /// Untrack.
    Untrack,
    /// Any other event: error reply.
    Other,
}

/// Parses the payload of a `presence` frame: realtime-js sends
/// `{"type":"presence","event":"track","payload":{...}}`, Python the same without `type`. The
/// event is compared case-insensitively.
pub fn parse_presence(payload: &str) -> PresenceRequest {
    let Ok(Value::Object(mut object)) = auth::plain_json::from_str(payload) else {
        return PresenceRequest::NoEvent;
    };
    match object.get("event") {
        None => PresenceRequest::NoEvent,
        Some(Value::String(event)) if event.eq_ignore_ascii_case("track") => PresenceRequest::Track(object.remove("payload")),
        Some(Value::String(event)) if event.eq_ignore_ascii_case("untrack") => PresenceRequest::Untrack,
        Some(_) => PresenceRequest::Other,
    }
}

/// Parses the product docs' frame (event `presence_diff` from a client,
/// `{"action":"track","data":{...}}` / `{"action":"untrack"}`, PROTOCOL.md §0.4). `None` when
/// it is not that shape (the frame is then ignored like any unknown event).
pub fn parse_docs_presence(payload: &str) -> Option<PresenceRequest> {
    let Ok(Value::Object(mut object)) = auth::plain_json::from_str(payload) else {
        return None;
    };
    match object.get("action") {
        Some(Value::String(action)) if action.eq_ignore_ascii_case("track") => Some(PresenceRequest::Track(object.remove("data"))),
        Some(Value::String(action)) if action.eq_ignore_ascii_case("untrack") => Some(PresenceRequest::Untrack),
        _ => None,
    }
}

/// The tracked payload as stored: the object without `phx_ref`/`phx_ref_prev` (they are the
/// server's), serialised with sorted keys so that an identical re-track compares equal.
pub fn normalize_meta(mut object: Map<String, Value>) -> Bytes {
    object.remove("phx_ref");
    object.remove("phx_ref_prev");
    Bytes::from(serde_json::to_vec(&object).expect("a JSON map serialises"))
}

/// The opaque `phx_ref` of an element: its dot, base64url.
pub fn phx_ref(dot: Dot) -> String {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&dot.replica.0.to_be_bytes());
    bytes[8..].copy_from_slice(&dot.counter.to_be_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

fn write_meta(out: &mut Vec<u8>, dot: Dot, element: &Element) {
    out.extend_from_slice(b"{\"phx_ref\":");
    write_json_str(out, &phx_ref(dot));
    if let Some(prev) = element.prev {
        out.extend_from_slice(b",\"phx_ref_prev\":");
        write_json_str(out, &phx_ref(prev));
    }
    let meta = &element.meta[..];
    // `meta` is a JSON object: splice its fields after ours.
    let inner = meta.strip_prefix(b"{").and_then(|m| m.strip_suffix(b"}")).unwrap_or(b"");
    if !inner.iter().all(u8::is_ascii_whitespace) {
        out.push(b',');
        out.extend_from_slice(inner);
    }
    out.push(b'}');
}

/// `{"<key>":{"metas":[...]}, ...}`, keys in order of first appearance.
fn write_entries<'a>(out: &mut Vec<u8>, entries: impl Iterator<Item = (&'a Dot, &'a Element)>) {
    let mut groups: Vec<(&str, Vec<(Dot, &Element)>)> = Vec::new();
    for (dot, element) in entries {
        match groups.iter_mut().find(|(key, _)| *key == &*element.key) {
            Some((_, metas)) => metas.push((*dot, element)),
            None => groups.push((&element.key, vec![(*dot, element)])),
        }
    }
    out.push(b'{');
    for (i, (key, metas)) in groups.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_str(out, key);
        out.extend_from_slice(b":{\"metas\":[");
        for (j, (dot, element)) in metas.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            write_meta(out, *dot, element);
        }
        out.extend_from_slice(b"]}");
    }
    out.push(b'}');
}

/// The `presence_state` payload.
pub fn render_state(elements: &[(Dot, Element)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 * elements.len() + 2);
    write_entries(&mut out, elements.iter().map(|(d, e)| (d, e)));
    out
}

/// The `presence_diff` payload `{"joins":{...},"leaves":{...}}`.
pub fn render_diff(diff: &Diff) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 * (diff.joins.len() + diff.leaves.len()) + 24);
    out.extend_from_slice(b"{\"joins\":");
    write_entries(&mut out, diff.joins.iter().map(|(d, e)| (d, e)));
    out.extend_from_slice(b",\"leaves\":");
    write_entries(&mut out, diff.leaves.iter().map(|(d, e)| (d, e)));
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::presence::ReplicaId;
    use engine::{ChannelSerial, ConnId, ShardId, Subscriber};
    use serde_json::json;
    use std::sync::Arc;

    fn element(key: &str, meta: &str, prev: Option<Dot>) -> Element {
        Element {
            key: Arc::from(key),
            meta: Bytes::from(meta.to_string()),
            owner: Subscriber { shard: ShardId(0), conn: ConnId(1), channel: ChannelSerial(1) },
            prev,
        }
    }

    fn dot(counter: u64) -> Dot {
        Dot { replica: ReplicaId(0), counter }
    }

    #[test]
    fn parses_all_client_forms() {
        assert_eq!(parse_presence(r#"{"type":"presence","event":"track","payload":{"a":1}}"#), PresenceRequest::Track(Some(json!({"a":1}))));
        assert_eq!(parse_presence(r#"{"event":"TRACK"}"#), PresenceRequest::Track(None));
        assert_eq!(parse_presence(r#"{"event":"untrack","payload":{}}"#), PresenceRequest::Untrack);
        assert_eq!(parse_presence(r#"{"event":"dance"}"#), PresenceRequest::Other);
        assert_eq!(parse_presence(r#"{"type":"presence"}"#), PresenceRequest::NoEvent);
        assert_eq!(parse_docs_presence(r#"{"action":"track","data":{"user_id":"u"}}"#), Some(PresenceRequest::Track(Some(json!({"user_id":"u"})))));
        assert_eq!(parse_docs_presence(r#"{"action":"untrack"}"#), Some(PresenceRequest::Untrack));
        assert_eq!(parse_docs_presence(r#"{"joins":{}}"#), None);
    }

    #[test]
    fn renders_state_and_diff() {
        let a = element("u-42", r#"{"name":"Ann"}"#, None);
        let b = element("u-42", "{}", Some(dot(1)));
        let state = render_state(&[(dot(1), a.clone()), (dot(2), b.clone())]);
        let value: Value = serde_json::from_slice(&state).unwrap();
        assert_eq!(
            value,
            json!({"u-42": {"metas": [{"phx_ref": phx_ref(dot(1)), "name": "Ann"}, {"phx_ref": phx_ref(dot(2)), "phx_ref_prev": phx_ref(dot(1))}]}})
        );
        let diff = Diff { joins: vec![(dot(2), b)], leaves: vec![(dot(1), a)] };
        let value: Value = serde_json::from_slice(&render_diff(&diff)).unwrap();
        assert_eq!(value["joins"]["u-42"]["metas"][0]["phx_ref_prev"], json!(phx_ref(dot(1))));
        assert_eq!(value["leaves"]["u-42"]["metas"][0]["name"], json!("Ann"));
        assert_eq!(serde_json::from_slice::<Value>(&render_diff(&Diff::default())).unwrap(), json!({"joins": {}, "leaves": {}}));
    }

    #[test]
    fn normalisation_drops_server_fields_and_sorts() {
        let meta = normalize_meta(json!({"z": 1, "phx_ref": "x", "a": 2, "phx_ref_prev": "y"}).as_object().unwrap().clone());
        assert_eq!(&meta[..], br#"{"a":2,"z":1}"#);
    }
}
