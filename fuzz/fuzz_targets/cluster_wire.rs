//! `cluster::fuzzing::cluster_wire`: see its documentation for the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cluster::fuzzing::cluster_wire(data));
