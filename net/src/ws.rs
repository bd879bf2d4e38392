//! WebSocket framing (RFC 6455), sans-IO: bytes in, messages out; messages in, bytes out.
//!
//! The server side only: client frames must be masked (§5.1), server frames are never masked.
//! Fragmented messages are reassembled up to [`WS_MESSAGE_BYTES_MAX`]; control frames may
//! interleave with fragments (§5.4). A complete text message must be valid UTF-8 (RFC 6455 §8.1): one
//! that is not is a [`WsError::InvalidUtf8`], closed with 1007.
//!
//! Every length here comes from a client, so none is trusted: a declared payload length is
//! compared with the limit before any arithmetic or conversion, the running total of a
//! fragmented message is compared with what is still allowed (a subtraction that cannot
//! underflow), and the buffer grows only as bytes arrive, never on a header's promise.

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
    /// A text message (valid UTF-8).
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
    /// A text message that is not valid UTF-8.
    InvalidUtf8,
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
            WsError::InvalidUtf8 => "text message is not valid UTF-8",
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
    /// arrives, so an oversized frame never gets buffered; and nothing is reserved for a
    /// declared length: the caller's reads grow the buffer as bytes really arrive.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<WsMessage>, WsError> {
        loop {
            let Some(header) = parse_header(buf)? else {
                return Ok(None);
            };
            let payload_len = self.checked_payload_len(&header)?;
            // Both terms are bounded (header ≤ 14 bytes, payload ≤ the limit): no overflow.
            if buf.len() < header.header_len + payload_len {
                return Ok(None);
            }
            buf.advance(header.header_len);
            let mut payload = buf.split_to(payload_len);
            unmask(&mut payload, header.mask);
            if let Some(message) = self.assemble(header, payload)? {
                return Ok(Some(message));
            }
        }
    }

    /// The frame's payload length, once it is known to fit: control frames are ≤ 125 bytes
    /// (checked by `parse_header`); a data frame may bring the message to the limit, no further.
    fn checked_payload_len(&self, header: &Header) -> Result<usize, WsError> {
        if header.opcode.is_control() {
            return Ok(header.payload_len as usize);
        }
        let collected = self.partial.as_ref().map_or(0, |(_, p)| p.len());
        // `collected` never exceeds the limit (every fragment was checked here before it was
        // kept), so the subtraction cannot underflow.
        let allowed = self.message_bytes_max - collected;
        match usize::try_from(header.payload_len) {
            Ok(len) if len <= allowed => Ok(len),
            _ => Err(WsError::TooBig),
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
                    return message(header.opcode, payload.freeze()).map(Some);
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
                    return message(opcode, collected.freeze()).map(Some);
                }
                self.partial = Some((opcode, collected));
                Ok(None)
            }
        }
    }
}

fn message(opcode: OpCode, payload: Bytes) -> Result<WsMessage, WsError> {
    match opcode {
        OpCode::Text if std::str::from_utf8(&payload).is_err() => Err(WsError::InvalidUtf8),
        OpCode::Text => Ok(WsMessage::Text(payload)),
        _ => Ok(WsMessage::Binary(payload)),
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

    /// The issue-9 reproducer: a 1-byte non-final text fragment, then a continuation whose
    /// header declares 2^64 - 1 bytes. The size check used to wrap around and `split_to` panicked.
    const CONTINUATION_OF_U64_MAX: &str = "0181112233446980ffffffffffffffffff01020304";

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
    }

    /// A data frame header (masked, zero mask) declaring `len` bytes with the 64-bit form.
    fn header_declaring(opcode: u8, fin: bool, len: u64) -> BytesMut {
        let mut out = BytesMut::new();
        out.put_u8(if fin { 0x80 } else { 0 } | opcode);
        out.put_u8(0x80 | 127);
        out.put_u64(len);
        out.put_slice(&[0; 4]);
        out
    }

    #[test]
    fn continuation_declaring_u64_max_is_too_big() {
        let bytes = hex(CONTINUATION_OF_U64_MAX);
        assert_eq!(bytes.len(), 21);
        assert_eq!(decode_all(&mut WsDecoder::new(WS_MESSAGE_BYTES_MAX), &bytes), Err(WsError::TooBig));
    }

    #[test]
    fn huge_declared_lengths_are_too_big_at_every_boundary() {
        let max = WS_MESSAGE_BYTES_MAX as u64;
        for len in [u64::MAX, 1 << 63, (1 << 63) - 1, 1 << 32, max + 1] {
            for opcode in [0x1, 0x2] {
                let mut decoder = WsDecoder::new(WS_MESSAGE_BYTES_MAX);
                let mut buf = header_declaring(opcode, true, len);
                assert_eq!(decoder.decode(&mut buf), Err(WsError::TooBig), "len {len}");
            }
            // The same length on a continuation of a started message.
            let mut decoder = WsDecoder::new(WS_MESSAGE_BYTES_MAX);
            let mut buf = BytesMut::new();
            encode_client_frame(OpCode::Binary, false, b"x", [0; 4], &mut buf);
            buf.extend_from_slice(&header_declaring(0x0, true, len));
            assert_eq!(decoder.decode(&mut buf), Err(WsError::TooBig), "continuation len {len}");
        }
    }

    #[test]
    fn a_header_promise_reserves_nothing() {
        for len in [WS_MESSAGE_BYTES_MAX as u64 - 1, WS_MESSAGE_BYTES_MAX as u64] {
            let mut decoder = WsDecoder::new(WS_MESSAGE_BYTES_MAX);
            let mut buf = header_declaring(0x2, true, len);
            let capacity = buf.capacity();
            assert_eq!(decoder.decode(&mut buf), Ok(None), "len {len} is allowed, waits for bytes");
            assert_eq!(buf.capacity(), capacity, "nothing reserved for the declared payload");
        }
    }

    #[test]
    fn messages_at_the_limit_pass_and_one_byte_more_does_not() {
        let limit = 1000;
        for (len, ok) in [(limit - 1, true), (limit, true), (limit + 1, false)] {
            let mut out = BytesMut::new();
            encode_client_frame(OpCode::Binary, true, &vec![7; len], [1, 2, 3, 4], &mut out);
            let got = decode_all(&mut WsDecoder::new(limit), &out);
            if ok {
                assert_eq!(got.unwrap(), vec![WsMessage::Binary(Bytes::from(vec![7; len]))]);
            } else {
                assert_eq!(got, Err(WsError::TooBig));
            }
        }
    }

    #[test]
    fn fragments_may_sum_to_the_limit_but_not_past_it() {
        let limit = 1000;
        for (last, ok) in [(399, true), (400, true), (401, false)] {
            let mut out = BytesMut::new();
            encode_client_frame(OpCode::Text, false, &[b'a'; 300], [0; 4], &mut out);
            encode_client_frame(OpCode::Continuation, false, &[b'b'; 300], [0; 4], &mut out);
            encode_client_frame(OpCode::Continuation, true, &vec![b'c'; last], [0; 4], &mut out);
            let got = decode_all(&mut WsDecoder::new(limit), &out);
            assert_eq!(got.is_ok(), ok, "fragments 300 + 300 + {last}");
        }
    }

    #[test]
    fn many_one_byte_fragments_reassemble() {
        let mut out = BytesMut::new();
        encode_client_frame(OpCode::Text, false, b"a", [0; 4], &mut out);
        for _ in 0..9_998 {
            encode_client_frame(OpCode::Continuation, false, b"a", [9; 4], &mut out);
        }
        encode_client_frame(OpCode::Continuation, true, b"a", [0; 4], &mut out);
        let got = decode_all(&mut WsDecoder::new(WS_MESSAGE_BYTES_MAX), &out).unwrap();
        assert_eq!(got, vec![WsMessage::Text(Bytes::from(vec![b'a'; 10_000]))]);
    }

    #[test]
    fn invalid_utf8_text_is_refused() {
        let mut out = BytesMut::new();
        encode_client_frame(OpCode::Text, true, &[b'{', 0xff, b'}'], [1, 2, 3, 4], &mut out);
        assert_eq!(decode_all(&mut WsDecoder::new(100), &out), Err(WsError::InvalidUtf8));
        // Across fragments: checked on the whole message, so a character split between two
        // fragments is fine and a truncated one is not.
        let euro = "€".as_bytes();
        let mut out = BytesMut::new();
        encode_client_frame(OpCode::Text, false, &euro[..1], [0; 4], &mut out);
        encode_client_frame(OpCode::Continuation, true, &euro[1..], [0; 4], &mut out);
        assert_eq!(decode_all(&mut WsDecoder::new(100), &out).unwrap(), vec![WsMessage::Text(Bytes::from_static(euro))]);
        let mut out = BytesMut::new();
        encode_client_frame(OpCode::Text, false, b"ok", [0; 4], &mut out);
        encode_client_frame(OpCode::Continuation, true, &euro[..2], [0; 4], &mut out);
        assert_eq!(decode_all(&mut WsDecoder::new(100), &out), Err(WsError::InvalidUtf8));
        // Binary messages carry any bytes.
        let mut out = BytesMut::new();
        encode_client_frame(OpCode::Binary, true, &[0xff], [0; 4], &mut out);
        assert_eq!(decode_all(&mut WsDecoder::new(100), &out).unwrap(), vec![WsMessage::Binary(Bytes::from_static(&[0xff]))]);
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
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..64) {
            // Fed in chunks, as reads deliver them.
            let mut decoder = WsDecoder::new(1000);
            let mut buf = BytesMut::new();
            'feed: for piece in bytes.chunks(chunk) {
                buf.extend_from_slice(piece);
                loop {
                    match decoder.decode(&mut buf) {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
            }
        }
    }
}
