//! Replays every corpus file and past crash of the replication fuzz targets on stable.

#[path = "../../net/tests/common/replay.rs"]
mod support_replay;

use support_replay::replay;

#[test]
fn pgoutput_corpus_and_regressions() {
    replay("pgoutput", powa_replication::fuzzing::pgoutput);
}

#[test]
fn replication_stream_corpus_and_regressions() {
    replay("replication_stream", powa_replication::fuzzing::replication_stream);
}

#[test]
fn value_json_corpus_and_regressions() {
    replay("value_json", powa_replication::fuzzing::value_json);
}

#[test]
fn filter_corpus_and_regressions() {
    replay("filter", powa_replication::fuzzing::filter);
}
