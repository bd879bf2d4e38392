//! Replays every fuzz corpus file and every past crash through its harness on the stable
//! toolchain, so CI checks them without nightly or fuzzing time (`fuzz/`, `tools/fuzz.sh`).

use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `harness` on every file of the target's corpus and regressions; both must exist and be
/// non-empty (an empty directory would make this test pass without checking anything).
fn replay(target: &str, harness: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut count = 0;
    for kind in ["corpus", "regressions"] {
        let dir = fuzz.join(kind).join(target);
        let files = files(&dir);
        assert!(!files.is_empty(), "{} is empty", dir.display());
        for path in files {
            let data = std::fs::read(&path).expect("read corpus file");
            let outcome = std::panic::catch_unwind(|| harness(&data));
            assert!(outcome.is_ok(), "{} panicked the {target} harness", path.display());
            count += 1;
        }
    }
    eprintln!("{target}: replayed {count} inputs");
}

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
