//! Bytes the load tool sends and the cheap parsing of what it receives.
//!
//! Every published payload carries fixed-width decimal fields behind a marker, so a receiver
//! finds them with one substring search (usually at the offset it found last time) and never
//! parses JSON:
//!
//! `{"bt":"<20 digits: CLOCK_MONOTONIC ns>","bs":"<10: sequence>","bp":"<6: publisher>","bk":"<3: step>","x":"<padding>"}`

use bytes::BytesMut;
use net::ws::{encode_client_frame, OpCode};

pub const MARKER: &[u8] = b"\"bt\":\"";
const T_AT: usize = 6;
const T_LEN: usize = 20;
const S_AT: usize = 34;
const S_LEN: usize = 10;
const P_AT: usize = 52;
const P_LEN: usize = 6;
const K_AT: usize = 66;
const K_LEN: usize = 3;
/// Bytes from the marker to the end of the step field.
const FIELDS_LEN: usize = K_AT + K_LEN;
/// Smallest payload: the fields with empty padding.
pub const PAYLOAD_MIN: usize = 1 + 76 + 2;

/// Which server the tool talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// Supabase Realtime / Phoenix channels. `v2`: serializer 2.0.0; `binary`: publish kind-3
    /// frames (V2 only).
    Phoenix { v2: bool, binary: bool },
    /// The raw fan-out baseline (`powa-rawfanout`): no channels, the publisher's text is what
    /// every subscriber receives.
    Raw,
    /// nginx + nchan: WebSocket subscribers and a WebSocket publisher on one channel id.
    Nchan,
}

impl Proto {
    pub fn parse(name: &str, vsn: &str, binary: bool) -> Result<Proto, String> {
        match name {
            "phoenix" | "powa" => {
                let v2 = match vsn {
                    "2" | "2.0.0" => true,
                    "1" | "1.0.0" => false,
                    other => return Err(format!("unknown --vsn {other} (1 or 2)")),
                };
                if binary && !v2 {
                    return Err("--binary needs --vsn 2".into());
                }
                Ok(Proto::Phoenix { v2, binary })
            }
            "raw" => Ok(Proto::Raw),
            "nchan" => Ok(Proto::Nchan),
            other => Err(format!("unknown --proto {other} (phoenix, raw, nchan)")),
        }
    }

    pub fn name(self) -> String {
        match self {
            Proto::Phoenix { v2: true, binary: true } => "phoenix-v2-binary".into(),
            Proto::Phoenix { v2: true, binary: false } => "phoenix-v2".into(),
            Proto::Phoenix { v2: false, .. } => "phoenix-v1".into(),
            Proto::Raw => "raw".into(),
            Proto::Nchan => "nchan".into(),
        }
    }

    pub fn is_phoenix(self) -> bool {
        matches!(self, Proto::Phoenix { .. })
    }

    /// Request path for a subscriber or the publisher.
    pub fn path(self, token: &str, publisher: bool) -> String {
        match self {
            Proto::Phoenix { v2, .. } => {
                format!("/realtime/v1/websocket?apikey={token}&vsn={}", if v2 { "2.0.0" } else { "1.0.0" })
            }
            Proto::Raw => if publisher { "/pub" } else { "/sub" }.to_string(),
            Proto::Nchan => if publisher { "/pub?id=bench" } else { "/sub?id=bench" }.to_string(),
        }
    }
}

pub fn upgrade_request(path: &str, host: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: cG93YS1sb2FkLWNsaWVudA==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// A masked client frame. The mask key is zero (any key is valid for a server), so the bytes
/// of a template can be patched in place.
pub fn client_frame(opcode: OpCode, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(body.len() + 14);
    encode_client_frame(opcode, true, body, [0; 4], &mut out);
    out.to_vec()
}

fn escape(text: &str) -> String {
    serde_json::to_string(text).expect("string encodes")
}

pub fn join_frame(proto: Proto, topic: &str, index: usize, self_: bool) -> Vec<u8> {
    let config = format!("{{\"config\":{{\"broadcast\":{{\"self\":{self_}}},\"presence\":{{\"enabled\":false}}}}}}");
    let topic = escape(topic);
    let body = match proto {
        Proto::Phoenix { v2: true, .. } => format!("[\"j{index}\",\"j{index}\",{topic},\"phx_join\",{config}]"),
        _ => format!("{{\"topic\":{topic},\"event\":\"phx_join\",\"payload\":{config},\"ref\":\"j{index}\",\"join_ref\":\"j{index}\"}}"),
    };
    client_frame(OpCode::Text, body.as_bytes())
}

pub fn heartbeat_frame(proto: Proto, n: u64) -> Option<Vec<u8>> {
    let body = match proto {
        Proto::Phoenix { v2: true, .. } => format!("[null,\"h{n}\",\"phoenix\",\"heartbeat\",{{}}]"),
        Proto::Phoenix { v2: false, .. } => format!("{{\"topic\":\"phoenix\",\"event\":\"heartbeat\",\"payload\":{{}},\"ref\":\"h{n}\"}}"),
        _ => return None,
    };
    Some(client_frame(OpCode::Text, body.as_bytes()))
}

/// The user payload of `size` bytes (at least [`PAYLOAD_MIN`]) with zeroed fields.
pub fn user_payload(size: usize, publisher: u32) -> Vec<u8> {
    let size = size.max(PAYLOAD_MIN);
    let mut text = format!(
        "{{\"bt\":\"{:020}\",\"bs\":\"{:010}\",\"bp\":\"{:06}\",\"bk\":\"{:03}\",\"x\":\"",
        0, 0, publisher, 0
    );
    while text.len() + 2 < size {
        text.push('x');
    }
    text.push_str("\"}");
    text.into_bytes()
}

/// A publish frame ready to send, with where its fields sit.
#[derive(Clone)]
pub struct PublishTemplate {
    pub frame: Vec<u8>,
    marker_at: usize,
}

impl PublishTemplate {
    pub fn new(proto: Proto, topic: &str, join_index: usize, payload: &[u8]) -> PublishTemplate {
        let frame = match proto {
            Proto::Phoenix { v2: true, binary: true } => {
                let body = net::frame::encode_user_broadcast_push(&format!("j{join_index}"), "0", topic, "b", true, payload);
                client_frame(OpCode::Binary, &body)
            }
            Proto::Phoenix { v2: true, binary: false } => {
                let mut body = format!("[\"j{join_index}\",null,{},\"broadcast\",{{\"type\":\"broadcast\",\"event\":\"b\",\"payload\":", escape(topic)).into_bytes();
                body.extend_from_slice(payload);
                body.extend_from_slice(b"}]");
                client_frame(OpCode::Text, &body)
            }
            Proto::Phoenix { v2: false, .. } => {
                let mut body = format!("{{\"topic\":{},\"event\":\"broadcast\",\"payload\":{{\"type\":\"broadcast\",\"event\":\"b\",\"payload\":", escape(topic)).into_bytes();
                body.extend_from_slice(payload);
                body.extend_from_slice(format!("}},\"ref\":null,\"join_ref\":\"j{join_index}\"}}").as_bytes());
                client_frame(OpCode::Text, &body)
            }
            Proto::Raw | Proto::Nchan => {
                // Exactly the frame a V2 receiver gets from powa-realtime for the same publish.
                let mut body = b"[null,null,\"realtime:bench\",\"broadcast\",{\"type\":\"broadcast\",\"event\":\"b\",\"payload\":".to_vec();
                body.extend_from_slice(payload);
                body.extend_from_slice(b"}]");
                client_frame(OpCode::Text, &body)
            }
        };
        let marker_at = find(&frame, MARKER, 0).expect("template holds the marker");
        PublishTemplate { frame, marker_at }
    }

    /// Writes time, sequence and step into the frame.
    #[inline]
    pub fn stamp(&mut self, time_ns: u64, seq: u64, step: u64) {
        let at = self.marker_at;
        put_digits(&mut self.frame[at + T_AT..at + T_AT + T_LEN], time_ns);
        put_digits(&mut self.frame[at + S_AT..at + S_AT + S_LEN], seq);
        put_digits(&mut self.frame[at + K_AT..at + K_AT + K_LEN], step);
    }
}

#[inline]
fn put_digits(out: &mut [u8], mut value: u64) {
    for byte in out.iter_mut().rev() {
        *byte = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

#[inline]
fn get_digits(bytes: &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for &b in bytes {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        value = value * 10 + u64::from(d);
    }
    Some(value)
}

/// First occurrence of `needle` in `hay` at or after `from`.
#[inline]
pub fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let first = needle[0];
    let mut i = from;
    while i + needle.len() <= hay.len() {
        match hay[i..hay.len() - needle.len() + 1].iter().position(|&b| b == first) {
            None => return None,
            Some(p) => {
                let at = i + p;
                if &hay[at..at + needle.len()] == needle {
                    return Some(at);
                }
                i = at + 1;
            }
        }
    }
    None
}

/// Fields of a received publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub time_ns: u64,
    pub seq: u64,
    pub publisher: u32,
    pub step: u32,
    /// Where the marker was (a hint for the next frame of this connection).
    pub at: usize,
}

/// Finds and parses the fields; tries `hint` first.
#[inline]
pub fn parse_stamp(payload: &[u8], hint: usize) -> Option<Stamp> {
    let at = if payload.len() >= hint + FIELDS_LEN && &payload[hint..hint + MARKER.len()] == MARKER {
        hint
    } else {
        find(payload, MARKER, 0)?
    };
    if payload.len() < at + FIELDS_LEN {
        return None;
    }
    Some(Stamp {
        time_ns: get_digits(&payload[at + T_AT..at + T_AT + T_LEN])?,
        seq: get_digits(&payload[at + S_AT..at + S_AT + S_LEN])?,
        publisher: get_digits(&payload[at + P_AT..at + P_AT + P_LEN])? as u32,
        step: get_digits(&payload[at + K_AT..at + K_AT + K_LEN])? as u32,
        at,
    })
}

/// One server frame at the start of `buf`: (opcode, payload range, total length), or None when
/// incomplete. Server frames are unmasked; a masked one is skipped correctly anyway.
#[inline]
pub fn server_frame(buf: &[u8]) -> Option<(u8, usize, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut header) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            (u64::from_be_bytes(buf[2..10].try_into().ok()?) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if masked {
        header += 4;
    }
    if buf.len() < header + len {
        return None;
    }
    Some((opcode, header, header + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_exact_size_and_layout() {
        let p = user_payload(100, 42);
        assert_eq!(p.len(), 100);
        let text = std::str::from_utf8(&p).unwrap();
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["bp"], "000042");
        let stamp = parse_stamp(&p, 0).unwrap();
        assert_eq!(stamp.publisher, 42);
    }

    #[test]
    fn stamped_templates_parse_for_every_proto() {
        let protos = [
            Proto::Phoenix { v2: true, binary: true },
            Proto::Phoenix { v2: true, binary: false },
            Proto::Phoenix { v2: false, binary: false },
            Proto::Raw,
            Proto::Nchan,
        ];
        for proto in protos {
            let mut t = PublishTemplate::new(proto, "realtime:bench", 1, &user_payload(100, 7));
            t.stamp(123_456_789_012, 99, 5);
            let (_, start, end) = server_frame(&t.frame).unwrap();
            assert_eq!(end, t.frame.len());
            let stamp = parse_stamp(&t.frame[start..end], 3).unwrap();
            assert_eq!((stamp.time_ns, stamp.seq, stamp.publisher, stamp.step), (123_456_789_012, 99, 7, 5));
        }
    }

    #[test]
    fn find_works_at_edges() {
        assert_eq!(find(b"abc", b"abc", 0), Some(0));
        assert_eq!(find(b"xxabc", b"abc", 0), Some(2));
        assert_eq!(find(b"xxab", b"abc", 0), None);
        assert_eq!(find(b"aabcabc", b"abc", 2), Some(4));
    }
}
