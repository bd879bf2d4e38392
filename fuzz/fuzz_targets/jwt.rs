//! `auth::fuzzing::jwt`: see its documentation for the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| auth::fuzzing::jwt(data));
