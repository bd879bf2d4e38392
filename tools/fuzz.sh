#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ on the nightly toolchain.
#
#   bash tools/fuzz.sh                 every target, 60 s each
#   bash tools/fuzz.sh ws_decoder 600  one target for 10 minutes
#
# New inputs go to fuzz/work-corpus/<target> (not committed; copy the interesting ones to
# fuzz/corpus/<target>); crashes to fuzz/artifacts/<target>. A crash becomes a regression:
# copy it to fuzz/regressions/<target>/ (replayed by net/tests/fuzz_corpus.rs on stable) and fix.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${1:-all}
seconds=${2:-60}

rustup toolchain list | grep -q '^nightly' || { echo "tools/fuzz.sh: the nightly toolchain is required (rustup toolchain install nightly)" >&2; exit 1; }
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "tools/fuzz.sh: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

targets=$(cd fuzz && cargo +nightly fuzz list)
[ "$target" = all ] || targets=$target
for t in $targets; do
  mkdir -p "fuzz/work-corpus/$t" "fuzz/corpus/$t"
  echo "== $t for ${seconds}s"
  (cd fuzz && cargo +nightly fuzz run "$t" "work-corpus/$t" "corpus/$t" -- \
      -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=2048)
done
