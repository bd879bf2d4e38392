//! The fuzz harness of the cluster's wire format (hidden from docs), shared by the cargo-fuzz
//! target `cluster_wire` and the stable test that replays its corpus (`cluster/tests/fuzz_corpus.rs`).

use bytes::Bytes;

use crate::wire;

/// Any bytes: decoding never panics, and what decodes encodes back to bytes that decode to the
/// same message.
pub fn cluster_wire(data: &[u8]) {
    let input = Bytes::copy_from_slice(data);
    if let Ok(message) = wire::decode(&input) {
        let again = wire::decode(&wire::encode(&message));
        assert_eq!(again.as_ref(), Ok(&message), "encode → decode is not the identity");
    }
}
