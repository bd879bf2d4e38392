//! `net::fuzzing::rest_body`: see its documentation for the input layout and the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| net::fuzzing::rest_body(data));
