//! Replays every fuzz corpus file and every past crash through its harness on the stable
//! toolchain, so CI checks them without nightly or fuzzing time (`fuzz/`, `tools/fuzz.sh`).

#[path = "common/replay.rs"]
mod support_replay;

use support_replay::replay;

#[test]
fn ws_decoder_corpus_and_regressions() {
    replay("ws_decoder", powa_net::fuzzing::ws_decoder);
}

#[test]
fn phoenix_text_corpus_and_regressions() {
    replay("phoenix_text", powa_net::fuzzing::phoenix_text);
}

#[test]
fn phoenix_binary_corpus_and_regressions() {
    replay("phoenix_binary", powa_net::fuzzing::phoenix_binary);
}

#[test]
fn http_head_corpus_and_regressions() {
    replay("http_head", powa_net::fuzzing::http_head);
}

#[test]
fn join_payload_corpus_and_regressions() {
    replay("join_payload", powa_net::fuzzing::join_payload);
}

#[test]
fn presence_payload_corpus_and_regressions() {
    replay("presence_payload", powa_net::fuzzing::presence_payload);
}

#[test]
fn rest_body_corpus_and_regressions() {
    replay("rest_body", powa_net::fuzzing::rest_body);
}

#[test]
fn session_corpus_and_regressions() {
    replay("session", powa_net::fuzzing::session);
}
