//! Fuzz harnesses, shared by the cargo-fuzz targets in `fuzz/` and by the stable test that
//! replays their corpora (`net/tests/fuzz_corpus.rs`), so CI checks every corpus file and every
//! past crash without nightly or fuzzing time. Each harness asserts the decoder's invariants;
//! a panic here is a finding.

use bytes::BytesMut;
use serde_json::value::RawValue;

use engine::Format;

use crate::frame::{self, Event, TextFrame};
use crate::ws::{WsDecoder, WsError, WsMessage, WS_MESSAGE_BYTES_MAX};

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
            assert!(serde_json::from_slice::<serde_json::Value>(&meta).is_ok(), "normalised meta is not JSON");
        }
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
}
