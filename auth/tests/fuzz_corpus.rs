//! Replays every corpus file and past crash of the `jwt` fuzz target on stable.

#[path = "../../net/tests/common/replay.rs"]
mod support_replay;

#[test]
fn jwt_corpus_and_regressions() {
    support_replay::replay("jwt", powa_auth::fuzzing::jwt);
}
