//! WebSocket framing (RFC 6455), sans-IO: bytes in, messages out; messages in, bytes out.
//!
//! The server side only: client frames must be masked (§5.1), server frames are never masked.
//! Fragmented messages are reassembled up to [`WS_MESSAGE_BYTES_MAX`]; control frames may
//! interleave with fragments (§5.4). UTF-8 of text messages is *not* validated here, as
//! upstream runs with `validate_utf8: false`: an invalid text message fails JSON decoding and is
//! dropped like any other malformed frame (PROTOCOL.md §1.10).

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub use engine::limits::WS_MESSAGE_BYTES_MAX;

/// Opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// 0x0
    Continuation,
    /// 0x1
    Text,
    /// 0x2
    Binary,
    /// 0x8
    Close,
    /// 0x9
    Ping,
    /// 0xA
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A complete message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsMessage {
    /// A text message (not UTF-8 validated).
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping; the driver answers with a pong carrying the same bytes.
    Ping(Bytes),
    /// A pong (ignored).
    Pong,
    /// The client closes, with its code if it gave one.
    Close(Option<u16>),
}

/// Why the connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsError {
    /// A client frame without the mask bit.
    Unmasked,
    /// RSV bits set without a negotiated extension.
    ReservedBits,
    /// An opcode RFC 6455 does not define.
    UnknownOpcode,
    /// A control frame over 125 bytes or fragmented.
    BadControlFrame,
    /// A continuation without a started message, or a new message inside a fragmented one.
    BadFragmentation,
    /// A message over the size limit.
    TooBig,
}

impl std::fmt::Display for WsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            WsError::Unmasked => "client frame not masked",
            WsError::ReservedBits => "reserved bits set",
            WsError::UnknownOpcode => "unknown opcode",
            WsError::BadControlFrame => "control frame too long or fragmented",
            WsError::BadFragmentation => "bad fragmentation",
            WsError::TooBig => "message too big",
        };
        f.write_str(text)
    }
}

impl std::error::Error for WsError {}

/// Incremental decoder for one connection's inbound bytes.
#[derive(Debug)]
pub struct WsDecoder {
    message_bytes_max: usize,
    /// Opcode and collected payload of a fragmented message in progress.
    partial: Option<(OpCode, BytesMut)>,
}

impl WsDecoder {
    /// A decoder that refuses messages larger than `message_bytes_max`.
    pub fn new(message_bytes_max: usize) -> WsDecoder {
        WsDecoder { message_bytes_max, partial: None }
    }

    /// Decodes the next complete message from `buf`, consuming its bytes. `Ok(None)`: more
    /// bytes needed. The size limit is checked from the frame header, before the payload
    /// arrives, so an oversized frame never gets buffered.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<WsMessage>, WsError> {
        loop {
            let Some(header) = parse_header(buf)? else {
                return Ok(None);
            };
            let partial_len = self.partial.as_ref().map_or(0, |(_, p)| p.len());
            if !header.opcode.is_control() && partial_len as u64 + header.payload_len > self.message_bytes_max as u64 {
                return Err(WsError::TooBig);
            }
            let total = header.header_len + header.payload_len as usize;
            if buf.len() < total {
                buf.reserve(total - buf.len());
                return Ok(None);
            }
            buf.advance(header.header_len);
            let mut payload = buf.split_to(header.payload_len as usize);
            unmask(&mut payload, header.mask);
            if let Some(message) = self.assemble(header, payload)? {
                return Ok(Some(message));
            }
        }
    }

    fn assemble(&mut self, header: Header, payload: BytesMut) -> Result<Option<WsMessage>, WsError> {
        match header.opcode {
            OpCode::Ping => Ok(Some(WsMessage::Ping(payload.freeze()))),
            OpCode::Pong => Ok(Some(WsMessage::Pong)),
            OpCode::Close => {
                let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                Ok(Some(WsMessage::Close(code)))
            }
            OpCode::Text | OpCode::Binary => {
                if self.partial.is_some() {
                    return Err(WsError::BadFragmentation);
                }
                if header.fin {
                    return Ok(Some(message(header.opcode, payload.freeze())));
                }
                self.partial = Some((header.opcode, payload));
                Ok(None)
            }
            OpCode::Continuation => {
                let Some((opcode, mut collected)) = self.partial.take() else {
                    return Err(WsError::BadFragmentation);
                };
                collected.extend_from_slice(&payload);
                if header.fin {
                    return Ok(Some(message(opcode, collected.freeze())));
                }
                self.partial = Some((opcode, collected));
                Ok(None)
            }
        }
    }
}

fn message(opcode: OpCode, payload: Bytes) -> WsMessage {
    match opcode {
        OpCode::Text => WsMessage::Text(payload),
        _ => WsMessage::Binary(payload),
    }
}

#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    opcode: OpCode,
    mask: [u8; 4],
    payload_len: u64,
    header_len: usize,
}

fn parse_header(buf: &[u8]) -> Result<Option<Header>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    if buf[0] & 0x70 != 0 {
        return Err(WsError::ReservedBits);
    }
    let opcode = OpCode::from_bits(buf[0] & 0x0F).ok_or(WsError::UnknownOpcode)?;
    if buf[1] & 0x80 == 0 {
        return Err(WsError::Unmasked);
    }
    let (payload_len, mut header_len) = match buf[1] & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            (u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")), 10)
        }
        len => (u64::from(len), 2),
    };
    if opcode.is_control() && (!fin || payload_len > 125) {
        return Err(WsError::BadControlFrame);
    }
    if buf.len() < header_len + 4 {
        return Ok(None);
    }
    let mask = buf[header_len..header_len + 4].try_into().expect("4 bytes");
    header_len += 4;
    Ok(Some(Header { fin, opcode, mask, payload_len, header_len }))
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let value = u32::from_ne_bytes(chunk.try_into().expect("4 bytes")) ^ word;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i];
    }
}

/// Writes an unmasked, final server frame header for a payload of `len` bytes.
pub fn encode_header(opcode: OpCode, len: usize, out: &mut BytesMut) {
    out.put_u8(0x80 | opcode.bits());
    if len < 126 {
        out.put_u8(len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.put_u8(126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
}

/// A complete server frame.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    encode_header(opcode, payload.len(), &mut out);
    out.extend_from_slice(payload);
    out.freeze()
}

/// A close frame with `code` and `reason` (at most 123 bytes).
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    assert!(reason.len() <= 123, "close reason too long");
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    encode_frame(OpCode::Close, &payload)
}

/// Client-side encoding (masked), for tests and the load tool.
pub fn encode_client_frame(opcode: OpCode, fin: bool, payload: &[u8], mask: [u8; 4], out: &mut BytesMut) {
    out.put_u8(if fin { 0x80 } else { 0 } | opcode.bits());
    let len = payload.len();
    if len < 126 {
        out.put_u8(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.put_u8(0x80 | 126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(0x80 | 127);
        out.put_u64(len as u64);
    }
    out.put_slice(&mask);
    let start = out.len();
    out.put_slice(payload);
    unmask(&mut out[start..], mask);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(decoder: &mut WsDecoder, bytes: &[u8]) -> Result<Vec<WsMessage>, WsError> {
        let mut buf = BytesMut::from(bytes);
        let mut messages = Vec::new();
        while let Some(message) = decoder.decode(&mut buf)? {
            messages.push(message);
        }
        Ok(messages)
    }

    #[test]
    fn decodes_masked_text() {
        let mut out = BytesMut::new();
        encode_client_frame(OpCode::Text, true, b"hello", [1, 2, 3, 4], &mut out);
        let messages = decode_all(&mut WsDecoder::new(100), &out).unwrap();
        assert_eq!(messages, vec![WsMessage::Text(Bytes::from_static(b"hello"))]);
    }

    #[test]
    fn refuses_unmasked_frames() {
        let frame = encode_frame(OpCode::Text, b"hi");
        assert_eq!(decode_all(&mut WsDecoder::new(100), &frame), Err(WsError::Unmasked));
    }

    #[test]
    fn refuses_oversized_frames_from_the_header() {
        let mut out = BytesMut::new();
        out.put_u8(0x81);
        out.put_u8(0x80 | 127);
        out.put_u64(10_000_000);
        out.put_slice(&[0, 0, 0, 0]);
        assert_eq!(decode_all(&mut WsDecoder::new(WS_MESSAGE_BYTES_MAX), &out), Err(WsError::TooBig));
    }

    #[test]
    fn reassembles_fragments_around_a_ping() {
        let mut out = BytesMut::new();
        encode_client_frame(OpCode::Text, false, b"hel", [9, 8, 7, 6], &mut out);
        encode_client_frame(OpCode::Ping, true, b"p", [1, 1, 1, 1], &mut out);
        encode_client_frame(OpCode::Continuation, true, b"lo", [5, 5, 5, 5], &mut out);
        let messages = decode_all(&mut WsDecoder::new(100), &out).unwrap();
        assert_eq!(
            messages,
            vec![WsMessage::Ping(Bytes::from_static(b"p")), WsMessage::Text(Bytes::from_static(b"hello"))]
        );
    }

    #[test]
    fn fragments_count_toward_the_limit() {
        let mut out = BytesMut::new();
        encode_client_frame(OpCode::Binary, false, &[0; 60], [0; 4], &mut out);
        encode_client_frame(OpCode::Continuation, true, &[0; 60], [0; 4], &mut out);
        assert_eq!(decode_all(&mut WsDecoder::new(100), &out), Err(WsError::TooBig));
    }

    #[test]
    fn rejects_bad_fragmentation_and_control_frames() {
        let mut out = BytesMut::new();
        encode_client_frame(OpCode::Continuation, true, b"x", [0; 4], &mut out);
        assert_eq!(decode_all(&mut WsDecoder::new(100), &out), Err(WsError::BadFragmentation));
        let mut out = BytesMut::new();
        encode_client_frame(OpCode::Ping, false, b"x", [0; 4], &mut out);
        assert_eq!(decode_all(&mut WsDecoder::new(100), &out), Err(WsError::BadControlFrame));
    }

    #[test]
    fn close_code_is_read() {
        let mut out = BytesMut::new();
        encode_client_frame(OpCode::Close, true, &[0x03, 0xE8], [3; 4], &mut out);
        assert_eq!(decode_all(&mut WsDecoder::new(100), &out).unwrap(), vec![WsMessage::Close(Some(1000))]);
    }

    proptest! {
        #[test]
        fn round_trip(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..70_000), 1..4), mask in any::<[u8; 4]>(), split in any::<prop::sample::Index>()) {
            let mut out = BytesMut::new();
            for payload in &payloads {
                encode_client_frame(OpCode::Binary, true, payload, mask, &mut out);
            }
            // Feed in two pieces to exercise partial input.
            let at = split.index(out.len() + 1);
            let mut decoder = WsDecoder::new(WS_MESSAGE_BYTES_MAX);
            let mut buf = BytesMut::from(&out[..at]);
            let mut got = Vec::new();
            while let Some(m) = decoder.decode(&mut buf).unwrap() { got.push(m); }
            buf.extend_from_slice(&out[at..]);
            while let Some(m) = decoder.decode(&mut buf).unwrap() { got.push(m); }
            let want: Vec<_> = payloads.iter().map(|p| WsMessage::Binary(Bytes::copy_from_slice(p))).collect();
            prop_assert_eq!(got, want);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut decoder = WsDecoder::new(1000);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decoder.decode(&mut buf) {}
        }
    }
}
