//! Fuzz harnesses, shared by the cargo-fuzz targets in `fuzz/` and by the stable test that
//! replays their corpora (`net/tests/fuzz_corpus.rs`), so CI checks every corpus file and every
//! past crash without nightly or fuzzing time. Each harness asserts the decoder's invariants;
//! a panic here is a finding.

use bytes::BytesMut;

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
