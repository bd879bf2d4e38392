//! The Phoenix channel frame codec (PROTOCOL.md §1.5, §1.6), sans-IO.
//!
//! Decoding validates the whole frame with serde_json but borrows the payload as a
//! [`RawValue`], so a broadcast's payload bytes are forwarded exactly as the client sent them
//! with no re-serialisation (measured faster than simd-json for this job: see
//! `benches/RESULTS.md`). `join_ref` and `ref` are kept as raw JSON too, so replies echo them
//! byte for byte.
//!
//! Encoding produces complete WebSocket frames ([`Bytes`]) ready to be written, so a fan-out
//! encodes once per wire format and shares the bytes.

use std::borrow::Cow;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use engine::broadcast::PayloadEncoding;
use engine::{Broadcast, BroadcastBody, Format};

use crate::ws::{encode_header, OpCode};

/// The Phoenix events the server understands; anything else is [`Event::Other`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// `phx_join`
    Join,
    /// `phx_leave`
    Leave,
    /// `heartbeat` (on topic `phoenix`)
    Heartbeat,
    /// `broadcast`
    Broadcast,
    /// `presence`
    Presence,
    /// `presence_diff` sent by a client: the product docs' presence frame (PROTOCOL.md §0.4).
    PresenceDiff,
    /// `access_token`
    AccessToken,
    /// Anything else.
    Other(Cow<'a, str>),
}

impl<'a> Event<'a> {
    fn parse(name: Cow<'a, str>) -> Event<'a> {
        match &*name {
            "phx_join" => Event::Join,
            "phx_leave" => Event::Leave,
            "heartbeat" => Event::Heartbeat,
            "broadcast" => Event::Broadcast,
            "presence" => Event::Presence,
            "presence_diff" => Event::PresenceDiff,
            "access_token" => Event::AccessToken,
            _ => Event::Other(name),
        }
    }
}

/// A `join_ref` or `ref` as received, to be echoed verbatim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ref<'a> {
    /// Raw JSON text (a string literal with its quotes, `null`, or whatever the client sent).
    Json(&'a str),
    /// An unquoted string (from a binary frame), quoted on output.
    Text(&'a str),
}

impl Ref<'static> {
    /// JSON `null`.
    pub const NULL: Ref<'static> = Ref::Json("null");
}

impl<'a> Ref<'a> {
    /// Writes this ref as JSON.
    pub fn write(self, out: &mut Vec<u8>) {
        match self {
            Ref::Json(raw) => out.extend_from_slice(raw.as_bytes()),
            Ref::Text(text) => write_json_str(out, text),
        }
    }

    /// This ref as owned JSON text.
    pub fn to_json(self) -> Bytes {
        let mut out = Vec::new();
        self.write(&mut out);
        Bytes::from(out)
    }
}

/// A decoded JSON frame (V1 object or V2 array).
#[derive(Debug)]
pub struct TextFrame<'a> {
    /// `join_ref` (raw JSON; `null` when absent).
    pub join_ref: Ref<'a>,
    /// `ref` (raw JSON).
    pub ref_: Ref<'a>,
    /// The topic as the client spelled it.
    pub topic: Cow<'a, str>,
    /// The event.
    pub event: Event<'a>,
    /// The payload, unparsed.
    pub payload: &'a RawValue,
}

/// A V2 binary user broadcast push (kind 3, PROTOCOL.md §1.6.2).
#[derive(Debug, PartialEq, Eq)]
pub struct UserBroadcastFrame<'a> {
    /// `join_ref`.
    pub join_ref: &'a str,
    /// `ref`.
    pub ref_: &'a str,
    /// Topic.
    pub topic: &'a str,
    /// User event name.
    pub event: &'a str,
    /// Metadata (ignored).
    pub metadata: &'a [u8],
    /// Payload encoding.
    pub encoding: PayloadEncoding,
    /// Payload bytes.
    pub payload: &'a [u8],
}

/// Why a frame was dropped (PROTOCOL.md §1.10: malformed frames are dropped silently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Not JSON, or JSON of the wrong shape.
    Malformed,
    /// A binary frame kind the server does not accept from clients.
    UnknownKind(u8),
    /// A binary frame shorter than its header says, or with non-UTF-8 strings.
    Truncated,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Malformed => write!(f, "malformed frame"),
            FrameError::UnknownKind(kind) => write!(f, "unknown binary frame kind {kind}"),
            FrameError::Truncated => write!(f, "truncated binary frame"),
        }
    }
}

impl std::error::Error for FrameError {}

#[derive(Deserialize)]
struct V1Frame<'a> {
    #[serde(borrow)]
    topic: Cow<'a, str>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(borrow, rename = "ref", default, deserialize_with = "present")]
    ref_: Option<&'a RawValue>,
    #[serde(borrow, default)]
    join_ref: Option<&'a RawValue>,
}

/// Distinguishes a key that is present (even `null`) from an absent one.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

struct V2Frame<'a> {
    join_ref: &'a RawValue,
    ref_: &'a RawValue,
    topic: Cow<'a, str>,
    event: Cow<'a, str>,
    payload: &'a RawValue,
}

impl<'de: 'a, 'a> Deserialize<'de> for V2Frame<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ArrayVisitor;
        impl<'de> Visitor<'de> for ArrayVisitor {
            type Value = V2Frame<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("[join_ref, ref, topic, event, payload, ...]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<V2Frame<'de>, A::Error> {
                let missing = || de::Error::custom("fewer than five elements");
                let join_ref = seq.next_element()?.ok_or_else(missing)?;
                let ref_ = seq.next_element()?.ok_or_else(missing)?;
                let topic: BorrowedCow<'de> = seq.next_element()?.ok_or_else(missing)?;
                let event: BorrowedCow<'de> = seq.next_element()?.ok_or_else(missing)?;
                let payload = seq.next_element()?.ok_or_else(missing)?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(V2Frame { join_ref, ref_, topic: topic.0, event: event.0, payload })
            }
        }
        deserializer.deserialize_seq(ArrayVisitor)
    }
}

/// `Cow<str>` that borrows when the string has no escapes.
struct BorrowedCow<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for BorrowedCow<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wrap<'a>(#[serde(borrow)] Cow<'a, str>);
        Wrap::deserialize(deserializer).map(|w| BorrowedCow(w.0))
    }
}

fn ref_of(raw: &RawValue) -> Result<Ref<'_>, FrameError> {
    let text = raw.get();
    // Refs are strings or null; anything else (objects, arrays) is a malformed frame.
    match text.as_bytes().first() {
        Some(b'"') | Some(b'n') | Some(b'-') | Some(b'0'..=b'9') => Ok(Ref::Json(text)),
        _ => Err(FrameError::Malformed),
    }
}

/// Decodes a text frame in the connection's format.
pub fn decode_text(format: Format, bytes: &[u8]) -> Result<TextFrame<'_>, FrameError> {
    match format {
        Format::V1 => {
            let frame: V1Frame<'_> = serde_json::from_slice(bytes).map_err(|_| FrameError::Malformed)?;
            let ref_ = frame.ref_.ok_or(FrameError::Malformed)?;
            Ok(TextFrame {
                join_ref: frame.join_ref.map(ref_of).transpose()?.unwrap_or(Ref::NULL),
                ref_: ref_of(ref_)?,
                topic: frame.topic,
                event: Event::parse(frame.event),
                payload: frame.payload,
            })
        }
        Format::V2 => {
            let frame: V2Frame<'_> = serde_json::from_slice(bytes).map_err(|_| FrameError::Malformed)?;
            Ok(TextFrame {
                join_ref: ref_of(frame.join_ref)?,
                ref_: ref_of(frame.ref_)?,
                topic: frame.topic,
                event: Event::parse(frame.event),
                payload: frame.payload,
            })
        }
    }
}

/// Binary frame kinds (PROTOCOL.md §1.6.2).
const KIND_USER_BROADCAST_PUSH: u8 = 3;
const KIND_USER_BROADCAST: u8 = 4;

/// Decodes a V2 binary frame. Only kind 3 is accepted: kind 0 pushes would need a kind-2
/// answer that realtime-js cannot decode, and no official client sends them.
pub fn decode_binary(bytes: &[u8]) -> Result<UserBroadcastFrame<'_>, FrameError> {
    let (&kind, rest) = bytes.split_first().ok_or(FrameError::Truncated)?;
    if kind != KIND_USER_BROADCAST_PUSH {
        return Err(FrameError::UnknownKind(kind));
    }
    if rest.len() < 6 {
        return Err(FrameError::Truncated);
    }
    let lens = [rest[0], rest[1], rest[2], rest[3], rest[4]].map(usize::from);
    let encoding = if rest[5] == 0 { PayloadEncoding::Binary } else { PayloadEncoding::Json };
    let mut body = &rest[6..];
    let mut take = |len: usize| -> Result<&[u8], FrameError> {
        if body.len() < len {
            return Err(FrameError::Truncated);
        }
        let (head, tail) = body.split_at(len);
        body = tail;
        Ok(head)
    };
    let join_ref = text(take(lens[0])?)?;
    let ref_ = text(take(lens[1])?)?;
    let topic = text(take(lens[2])?)?;
    let event = text(take(lens[3])?)?;
    let metadata = take(lens[4])?;
    let payload = body;
    Ok(UserBroadcastFrame { join_ref, ref_, topic, event, metadata, encoding, payload })
}

fn text(bytes: &[u8]) -> Result<&str, FrameError> {
    std::str::from_utf8(bytes).map_err(|_| FrameError::Truncated)
}

/// Writes `text` as a JSON string literal.
pub fn write_json_str(out: &mut Vec<u8>, text: &str) {
    let needs_escape = text.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\');
    if needs_escape {
        serde_json::to_writer(&mut *out, text).expect("writing to a Vec cannot fail");
    } else {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    }
}

fn text_frame(json: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(json.len() + 10);
    encode_header(OpCode::Text, json.len(), &mut out);
    out.put_slice(json);
    out.freeze()
}

/// Builds a message `(join_ref, ref, topic, event, payload)` in `format` and frames it.
pub fn encode_message(format: Format, join_ref: Ref<'_>, ref_: Ref<'_>, topic: &str, event: &str, payload: &[u8]) -> Bytes {
    let mut json = Vec::with_capacity(payload.len() + topic.len() + event.len() + 48);
    match format {
        Format::V1 => {
            json.extend_from_slice(b"{\"topic\":");
            write_json_str(&mut json, topic);
            json.extend_from_slice(b",\"event\":");
            write_json_str(&mut json, event);
            json.extend_from_slice(b",\"payload\":");
            json.extend_from_slice(payload);
            json.extend_from_slice(b",\"ref\":");
            ref_.write(&mut json);
            json.push(b'}');
        }
        Format::V2 => {
            json.push(b'[');
            join_ref.write(&mut json);
            json.push(b',');
            ref_.write(&mut json);
            json.push(b',');
            write_json_str(&mut json, topic);
            json.push(b',');
            write_json_str(&mut json, event);
            json.push(b',');
            json.extend_from_slice(payload);
            json.push(b']');
        }
    }
    text_frame(&json)
}

/// A `phx_reply` with `{"status": status, "response": response}` (response is raw JSON).
pub fn encode_reply(format: Format, join_ref: Ref<'_>, ref_: Ref<'_>, topic: &str, status: &str, response: &[u8]) -> Bytes {
    let mut payload = Vec::with_capacity(response.len() + 32);
    payload.extend_from_slice(b"{\"status\":");
    write_json_str(&mut payload, status);
    payload.extend_from_slice(b",\"response\":");
    payload.extend_from_slice(response);
    payload.push(b'}');
    encode_message(format, join_ref, ref_, topic, "phx_reply", &payload)
}

/// A join error reply: `{"status":"error","response":{"reason": reason}}`.
pub fn encode_error_reason(format: Format, join_ref: Ref<'_>, ref_: Ref<'_>, topic: &str, reason: &str) -> Bytes {
    let mut response = Vec::with_capacity(reason.len() + 16);
    response.extend_from_slice(b"{\"reason\":");
    write_json_str(&mut response, reason);
    response.push(b'}');
    encode_reply(format, join_ref, ref_, topic, "error", &response)
}

/// A channel push (`presence_state`, `system`, ...): carries the channel's join_ref and a null
/// ref (PROTOCOL.md §1.6.1).
pub fn encode_push(format: Format, join_ref: Ref<'_>, topic: &str, event: &str, payload: &[u8]) -> Bytes {
    encode_message(format, join_ref, Ref::NULL, topic, event, payload)
}

/// `phx_close` (or `phx_error`): `ref` = join_ref (PROTOCOL.md §1.9).
pub fn encode_close(format: Format, join_ref: Ref<'_>, topic: &str, event: &str) -> Bytes {
    encode_message(format, join_ref, join_ref, topic, event, b"{}")
}

/// A `system` push `{"extension","status","message","channel"}`.
pub fn encode_system(format: Format, join_ref: Ref<'_>, topic: &str, extension: &str, status: &str, message: &str) -> Bytes {
    let mut payload = Vec::with_capacity(message.len() + topic.len() + 64);
    payload.extend_from_slice(b"{\"extension\":");
    write_json_str(&mut payload, extension);
    payload.extend_from_slice(b",\"status\":");
    write_json_str(&mut payload, status);
    payload.extend_from_slice(b",\"message\":");
    write_json_str(&mut payload, message);
    payload.extend_from_slice(b",\"channel\":");
    write_json_str(&mut payload, engine::topic::sub_topic(topic));
    payload.push(b'}');
    encode_push(format, join_ref, topic, "system", &payload)
}

/// Encodes a broadcast for one wire format and topic spelling, or `None` when this receiver
/// cannot get it (a binary payload for V1; a topic over 255 bytes for a kind-4 frame).
pub fn encode_broadcast(format: Format, topic: &str, message: &Broadcast) -> Option<Bytes> {
    match (&message.body, format) {
        (BroadcastBody::Json { payload }, format) => {
            Some(encode_message(format, Ref::NULL, Ref::NULL, topic, "broadcast", payload))
        }
        (BroadcastBody::User { event, encoding, payload, metadata }, Format::V2) => {
            if topic.len() > 255 || event.len() > 255 || metadata.len() > 255 {
                return None;
            }
            let len = 5 + topic.len() + event.len() + metadata.len() + payload.len();
            let mut out = BytesMut::with_capacity(len + 10);
            encode_header(OpCode::Binary, len, &mut out);
            out.put_u8(KIND_USER_BROADCAST);
            out.put_u8(topic.len() as u8);
            out.put_u8(event.len() as u8);
            out.put_u8(metadata.len() as u8);
            out.put_u8(match encoding {
                PayloadEncoding::Binary => 0,
                PayloadEncoding::Json => 1,
            });
            out.put_slice(topic.as_bytes());
            out.put_slice(event);
            out.put_slice(metadata);
            out.put_slice(payload);
            Some(out.freeze())
        }
        (BroadcastBody::PresenceDiff(diff), format) => {
            let payload = crate::presence::render_diff(diff);
            Some(encode_message(format, Ref::NULL, Ref::NULL, topic, "presence_diff", &payload))
        }
        (BroadcastBody::User { encoding: PayloadEncoding::Binary, .. }, Format::V1) => None,
        (BroadcastBody::User { event, payload, metadata, .. }, Format::V1) => {
            let event = std::str::from_utf8(event).ok()?;
            let mut json = Vec::with_capacity(payload.len() + event.len() + 64);
            json.extend_from_slice(b"{\"type\":\"broadcast\",\"event\":");
            write_json_str(&mut json, event);
            json.extend_from_slice(b",\"payload\":");
            json.extend_from_slice(payload);
            if !metadata.is_empty() {
                json.extend_from_slice(b",\"meta\":");
                json.extend_from_slice(metadata);
            }
            json.push(b'}');
            Some(encode_message(Format::V1, Ref::NULL, Ref::NULL, topic, "broadcast", &json))
        }
    }
}

/// Client-side builder of a kind-3 frame (tests, benches, the load tool).
pub fn encode_user_broadcast_push(join_ref: &str, ref_: &str, topic: &str, event: &str, json: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(7 + join_ref.len() + ref_.len() + topic.len() + event.len() + payload.len());
    out.push(KIND_USER_BROADCAST_PUSH);
    for field in [join_ref, ref_, topic, event] {
        assert!(field.len() <= 255);
        out.push(field.len() as u8);
    }
    out.push(0);
    out.push(u8::from(json));
    for field in [join_ref, ref_, topic, event] {
        out.extend_from_slice(field.as_bytes());
    }
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests;
