//! Fuzz harnesses, shared by the cargo-fuzz targets in `fuzz/` and by the stable test that
//! replays their corpora (`net/tests/fuzz_corpus.rs`), so CI checks every corpus file and every
//! past crash without nightly or fuzzing time. Each harness asserts the decoder's invariants;
//! a panic here is a finding.

use bytes::BytesMut;
use serde_json::value::RawValue;

use engine::Format;

use crate::frame::{self, Event, TextFrame};
use crate::ws::{WsDecoder, WsError, WsMessage, WS_MESSAGE_BYTES_MAX};

mod session;
pub use session::session;

/// Feeds `data` to a [`WsDecoder`] in chunks whose sizes come from the input itself, the way
/// reads deliver bytes. Byte 0 picks the message limit (a small one, to reach the size checks
/// often, or the real one); bytes 1–2 seed the chunk sizes; the rest is the stream.
///
/// Invariants: no panic; every message is within the limit; every text message is UTF-8; the
/// buffer never holds much more than the bytes fed (nothing reserved on a header's promise);
/// after an error the connection is over.
pub fn ws_decoder(data: &[u8]) {
    let [mode, seed_high, seed_low, stream @ ..] = data else {
        return;
    };
    let limit = if mode & 1 == 0 { 1 + usize::from(*mode) * 8 } else { WS_MESSAGE_BYTES_MAX };
    let mut decoder = WsDecoder::new(limit);
    let mut buf = BytesMut::new();
    let mut seed = u16::from_be_bytes([*seed_high, *seed_low]) | 1;
    let mut rest = stream;
    let mut fed = 0usize;
    while !rest.is_empty() {
        // xorshift16: chunk sizes of 1..=64 bytes.
        seed ^= seed << 7;
        seed ^= seed >> 9;
        seed ^= seed << 8;
        let take = (usize::from(seed) % 64 + 1).min(rest.len());
        buf.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        fed += take;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(message)) => check_message(&message, limit),
                Ok(None) => break,
                Err(error) => {
                    check_error(error);
                    return;
                }
            }
            assert!(buf.capacity() <= 4 * fed + 1024, "buffer grew to {} after {fed} bytes", buf.capacity());
        }
    }
}

fn check_message(message: &WsMessage, limit: usize) {
    match message {
        WsMessage::Text(bytes) => {
            assert!(bytes.len() <= limit, "text message of {} bytes over the limit {limit}", bytes.len());
            assert!(std::str::from_utf8(bytes).is_ok(), "text message that is not UTF-8");
        }
        WsMessage::Binary(bytes) => assert!(bytes.len() <= limit, "binary message of {} bytes over the limit {limit}", bytes.len()),
        WsMessage::Ping(bytes) => assert!(bytes.len() <= 125, "ping of {} bytes", bytes.len()),
        WsMessage::Pong | WsMessage::Close(_) => {}
    }
}

fn check_error(error: WsError) {
    // Every error has a close code the driver knows (the mapping is exhaustive at compile time).
    let _ = error.to_string();
}

/// Phoenix text frames (byte 0 picks V1 or V2, the rest is the frame). A frame that decodes is
/// encoded again and must decode to the same frame (round trip); no input may panic.
pub fn phoenix_text(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let format = if selector & 1 == 0 { Format::V1 } else { Format::V2 };
    let Ok(decoded) = frame::decode_text(format, bytes) else {
        return;
    };
    let encoded = frame::encode_message(format, decoded.join_ref, decoded.ref_, &decoded.topic, event_name(&decoded.event), decoded.payload.get().as_bytes());
    let again = frame::decode_text(format, server_frame_payload(&encoded)).expect("an encoded frame decodes");
    assert_same_frame(format, &decoded, &again);
}

/// V2 binary frames (kind 3). A frame that decodes, re-encoded, decodes to the same fields.
pub fn phoenix_binary(data: &[u8]) {
    let Ok(decoded) = frame::decode_binary(data) else {
        return;
    };
    assert!(decoded.topic.len() <= 255 && decoded.event.len() <= 255, "a decoded field longer than its length byte allows");
    if !decoded.metadata.is_empty() {
        return; // the client-side encoder writes no metadata
    }
    let json = decoded.encoding == engine::broadcast::PayloadEncoding::Json;
    let bytes = frame::encode_user_broadcast_push(decoded.join_ref, decoded.ref_, decoded.topic, decoded.event, json, decoded.payload);
    let again = frame::decode_binary(&bytes).expect("an encoded frame decodes");
    assert_eq!((again.join_ref, again.ref_, again.topic, again.event), (decoded.join_ref, decoded.ref_, decoded.topic, decoded.event));
    assert_eq!(again.encoding, decoded.encoding);
    assert_eq!(again.payload, decoded.payload);
}

/// HTTP request heads: parsing, routing and the upgrade checks.
pub fn http_head(data: &[u8]) {
    let Ok(Some(head)) = crate::http::parse_head(data) else {
        return;
    };
    assert!(head.len <= data.len(), "the head is longer than the input");
    let _ = crate::http::route(&head);
    let _ = crate::http::negotiate_vsn(head.query_param("vsn"));
    if let Ok(upgrade) = crate::http::check_upgrade(&head) {
        let _ = crate::http::switching_protocols(&upgrade.key);
    }
}

/// Join payloads (`phx_join`'s payload, any JSON).
pub fn join_payload(data: &[u8]) {
    let Ok(raw) = serde_json::from_slice::<&RawValue>(data) else {
        return;
    };
    let _ = crate::join::parse_join(raw);
}

/// Presence frames' payloads (both client forms and the product docs' form). A tracked object
/// is normalised to JSON that parses again.
pub fn presence_payload(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for request in [Some(crate::presence::parse_presence(text)), crate::presence::parse_docs_presence(text)].into_iter().flatten() {
        if let crate::presence::PresenceRequest::Track(Some(serde_json::Value::Object(object))) = request {
            let meta = crate::presence::normalize_meta(object);
            assert!(auth::plain_json::from_slice(&meta).is_ok(), "normalised meta is not JSON");
        }
    }
}

/// REST broadcast bodies (PROTOCOL.md §8). Byte 0 picks the call: bit 0 the caller's role
/// (`service_role` or `authenticated`), bits 1–2 the endpoint (batch; single public; single
/// private; single with an undecodable topic), bit 3 the content type (JSON or binary), bit 4
/// whether a database is configured, bit 5 a small payload limit; the rest is the body.
///
/// Invariants: no panic; the status is one §8 documents; only a 202 publishes or asks for
/// policy checks; every non-empty response body is JSON; nothing private is published for a
/// caller subject to RLS; JSON broadcasts are valid JSON; topics are those of the request.
pub fn rest_body(data: &[u8]) {
    use std::sync::OnceLock;
    const SECRET: &[u8] = b"fuzz-secret-0123456789-abcdefghijklmnopqrstuvwxyz";
    const NOW: i64 = 1_700_000_000;
    static KEYS: OnceLock<(auth::KeyStore, String, String)> = OnceLock::new();
    let (keys, service, user) = KEYS.get_or_init(|| {
        let sign = |role: &str| auth::sign_hs256(SECRET, serde_json::json!({"role": role, "exp": NOW + 3600, "sub": "u"}).as_object().expect("an object"));
        (auth::KeyStore::new(SECRET.to_vec()), sign("service_role"), sign("authenticated"))
    });
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let service_role = selector & 1 == 0;
    let token = if service_role { service } else { user };
    let (path, query) = match (selector >> 1) & 3 {
        0 => ("/api/broadcast", None),
        1 => ("/api/broadcast/room-1/events/ev", None),
        2 => ("/realtime/v1/api/broadcast/room-1/events/ev", Some("private=true".to_string())),
        _ => ("/api/broadcast/%FF%FE/events/ev", None),
    };
    let content_type = if selector & 8 == 0 { "application/json" } else { "application/octet-stream" };
    let database = selector & 16 != 0;
    let payload_bytes_max = if selector & 32 == 0 { 3_000_000 } else { 64 };
    let Some(route) = crate::rest::route(path) else {
        return; // the undecodable topic is refused by routing (a 404 upstream of the REST code)
    };
    let head = crate::http::Head {
        method: "POST".into(),
        path: path.into(),
        query,
        headers: vec![("authorization".into(), format!("Bearer {token}")), ("content-type".into(), content_type.into())],
        len: 0,
    };
    let tenant = crate::rest::RestTenant { id: engine::TenantId::SINGLE, keys, payload_bytes_max, database };
    let result = crate::rest::handle(tenant, &route, &head, body, NOW);
    let text = String::from_utf8_lossy(&result.response);
    let status: u16 = text.get(9..12).and_then(|s| s.parse().ok()).expect("a status line");
    assert!([202, 401, 403, 413, 415, 422].contains(&status), "undocumented status {status}");
    let response_body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    if !response_body.is_empty() {
        assert!(serde_json::from_str::<serde_json::Value>(response_body).is_ok(), "response body is not JSON: {response_body}");
    }
    if status != 202 {
        assert!(result.outgoing.is_empty() && result.private_checks.is_none(), "a refused call publishes nothing");
        return;
    }
    for out in &result.outgoing {
        assert!(service_role || !out.topic.private, "a private message published without a policy check");
        if let engine::BroadcastBody::Json { payload } = &out.message.body {
            assert!(serde_json::from_slice::<serde_json::Value>(payload).is_ok(), "a JSON broadcast that is not JSON");
        }
        if !matches!(route, crate::rest::RestRoute::Batch) {
            assert_eq!(&*out.topic.sub, "room-1");
        }
    }
    if let Some(checks) = &result.private_checks {
        assert!(database && !service_role, "policy checks only for callers subject to RLS, with a database");
        assert!(checks.messages.iter().all(|m| m.topic.private));
    }
}

fn event_name<'a>(event: &'a Event<'_>) -> &'a str {
    match event {
        Event::Join => "phx_join",
        Event::Leave => "phx_leave",
        Event::Heartbeat => "heartbeat",
        Event::Broadcast => "broadcast",
        Event::Presence => "presence",
        Event::PresenceDiff => "presence_diff",
        Event::AccessToken => "access_token",
        Event::Other(name) => name,
    }
}

fn assert_same_frame(format: Format, a: &TextFrame<'_>, b: &TextFrame<'_>) {
    // V1 server messages carry no `join_ref` (as upstream's V1 serializer).
    if format == Format::V2 {
        assert_eq!(a.join_ref, b.join_ref);
    }
    assert_eq!(a.ref_, b.ref_);
    assert_eq!(a.topic, b.topic);
    assert_eq!(event_name(&a.event), event_name(&b.event));
    assert_eq!(a.payload.get(), b.payload.get());
}

/// The payload of a server frame (unmasked, final; the encoders' output).
fn server_frame_payload(frame: &[u8]) -> &[u8] {
    match frame[1] & 0x7F {
        126 => &frame[4..],
        127 => &frame[10..],
        _ => &frame[2..],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_9_reproducer_is_an_error_not_a_panic() {
        let mut data = vec![1, 0, 1];
        data.extend_from_slice(&[
            0x01, 0x81, 0x11, 0x22, 0x33, 0x44, 0x69, 0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            0x02, 0x03, 0x04,
        ]);
        ws_decoder(&data);
    }

    /// A few thousand pseudo-random inputs through the session and REST harnesses on stable
    /// (the fuzzers go much further; this keeps the harnesses themselves honest).
    #[test]
    fn random_inputs_keep_the_session_and_rest_invariants() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3_000 {
            let len = (next() % 64) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            session(&data);
            rest_body(&data);
        }
    }
}
