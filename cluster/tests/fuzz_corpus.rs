//! Replays the `cluster_wire` fuzz corpus and its guard inputs on the stable toolchain.

#[path = "../../net/tests/common/replay.rs"]
mod support_replay;

#[test]
fn cluster_wire_corpus_and_regressions() {
    support_replay::replay("cluster_wire", powa_cluster::fuzzing::cluster_wire);
}
