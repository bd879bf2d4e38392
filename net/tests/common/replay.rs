//! The replay loop shared by the fuzz-corpus tests of `net`, `replication` and `auth`: every
//! file of `fuzz/corpus/<target>` and `fuzz/regressions/<target>` through the target's harness.
#![allow(dead_code)]

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
/// non-empty (an empty directory would make the test pass without checking anything).
pub fn replay(target: &str, harness: fn(&[u8])) {
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
