//! The WebSocket decoder fed in chunk sizes taken from the input (`net::fuzzing::ws_decoder`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| net::fuzzing::ws_decoder(data));
