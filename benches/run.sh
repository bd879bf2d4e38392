#!/usr/bin/env bash
# The load suite of issue 6: builds the release binaries, installs the peers when missing,
# runs W1 (fan-out), W2 (rooms), W3 (join storm) and W7 (idle memory) against powa-realtime
# and the same-run baselines (powa-rawfanout = the raw batched-write limit, nginx + nchan =
# a C peer), alternating the systems round by round, records instruction counts (callgrind)
# and profiles (perf), and rewrites the load section of benches/RESULTS.md.
#
#   bash benches/run.sh            # the whole suite (~15–20 min on the 2-core VM)
#   ROUNDS=3 bash benches/run.sh   # more rounds per configuration (default 2)
#   QUICK=1 bash benches/run.sh    # smoke run: W1 N=1k only, 1 round, no profiles
#
# Everything targets loopback; every run is bounded (`timeout`, step counts). The server under
# test and each baseline get one core (powa-realtime with REALTIME_SHARDS=1 pins its shard
# itself; the baselines are pinned to the same core with taskset); the load generator gets the
# other core(s). Raw output: target/bench-load/ (results.jsonl, logs, profiles).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${BENCH_OUT:-$ROOT/target/bench-load}
ROUNDS=${ROUNDS:-2}
QUICK=${QUICK:-0}
SECRET=bench-secret-not-for-production
# The suite runs copies of the binaries (a concurrent `cargo build` cannot swap them mid-run).
BIN=$OUT/bin/powa-realtime
LOAD=$OUT/bin/powa-load
RAW=$OUT/bin/powa-rawfanout
NCHAN_CONF=$ROOT/benches/baselines/nchan/nginx.conf.in
SUITE_START=$(date +%s)

say() { printf '\n== %s\n' "$*" >&2; }
fail() { echo "benches/run.sh: $*" >&2; exit 1; }

mkdir -p "$OUT/logs"
RES=$OUT/results.jsonl
: >"$RES"
: >"$OUT/commands.txt"

# ---------------------------------------------------------------- tools and peers
command -v cargo >/dev/null || fail "cargo is missing"
command -v taskset >/dev/null || fail "taskset (util-linux) is missing"
command -v curl >/dev/null || fail "curl is missing"
apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >"$OUT/logs/apt.log" 2>&1 \
      || { apt-get update -qq >>"$OUT/logs/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>"$OUT/logs/apt.log" 2>&1; }
  fi
}
NCHAN_SO=/usr/lib/nginx/modules/ngx_nchan_module.so
if ! command -v nginx >/dev/null || [ ! -f "$NCHAN_SO" ]; then apt_install nginx-light libnginx-mod-nchan || true; fi
HAVE_NCHAN=0; command -v nginx >/dev/null && [ -f "$NCHAN_SO" ] && HAVE_NCHAN=1
command -v valgrind >/dev/null || apt_install valgrind || true
HAVE_PERF=0; perf stat -e cpu-clock true >/dev/null 2>&1 && HAVE_PERF=1

say "building release binaries"
cargo build --release --bin powa-realtime
cargo build --release -p powa-tools
mkdir -p "$OUT/bin"
for b in powa-realtime powa-load powa-rawfanout; do cp -f "$ROOT/target/release/$b" "$OUT/bin/$b"; done

TOKEN=$(JWT_SECRET=$SECRET "$BIN" token --role anon --exp 86400)

# ---------------------------------------------------------------- process handling
STARTED=()          # every pid this script started (stopped on exit)
SERVER_PID=""       # main pid of the current system under test
SERVER_PIDS=""      # comma-separated pids whose CPU/RSS are measured
PORT=4400
cleanup() {
  for pid in "${STARTED[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

wait_port() { # port timeout_s
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

next_port() { PORT=$((PORT + 1)); }

start_powa() { # [extra env...]
  next_port
  env JWT_SECRET=$SECRET REALTIME_ADDR=127.0.0.1:$PORT REALTIME_SHARDS=1 RUST_LOG=warn "$@" \
    "$BIN" serve >>"$OUT/logs/powa.log" 2>&1 &
  SERVER_PID=$!; SERVER_PIDS=$SERVER_PID; STARTED+=("$SERVER_PID")
  wait_port "$PORT" 20 || fail "powa-realtime did not start (see $OUT/logs/powa.log)"
}

start_raw() {
  next_port
  taskset -c "$SERVER_CPU" "$RAW" --addr 127.0.0.1:$PORT --threads 1 >>"$OUT/logs/raw.log" 2>&1 &
  SERVER_PID=$!; SERVER_PIDS=$SERVER_PID; STARTED+=("$SERVER_PID")
  wait_port "$PORT" 20 || fail "powa-rawfanout did not start"
}

start_nchan() {
  next_port
  local dir=$OUT/nchan
  rm -rf "$dir"; mkdir -p "$dir"
  sed -e "s#@DIR@#$dir#g" -e "s#@PORT@#$PORT#g" -e "s#@WORKERS@#1#g" "$NCHAN_CONF" >"$dir/nginx.conf"
  taskset -c "$SERVER_CPU" nginx -c "$dir/nginx.conf" -p "$dir" >>"$OUT/logs/nchan.log" 2>&1 &
  SERVER_PID=$!; STARTED+=("$SERVER_PID")
  wait_port "$PORT" 20 || fail "nginx + nchan did not start (see $dir/error.log)"
  local workers
  workers=$(pgrep -P "$SERVER_PID" | paste -sd, -)
  SERVER_PIDS="$SERVER_PID${workers:+,$workers}"
}

start_system() { # powa|powa-bin|raw|nchan
  case $1 in
    powa | powa-bin) start_powa ;;
    raw) start_raw ;;
    nchan) start_nchan ;;
  esac
}

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill "$SERVER_PID" 2>/dev/null || true
  local i
  for ((i = 0; i < 100; i++)); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""; SERVER_PIDS=""
  sleep 0.3
}

proto_args() { # system → powa-load protocol options
  case $1 in
    powa | powa-perf | powa-cg) echo "--proto phoenix --vsn 2 --token $TOKEN" ;;
    powa-bin) echo "--proto phoenix --vsn 2 --binary --token $TOKEN" ;;
    raw | raw-cg) echo "--proto raw" ;;
    nchan) echo "--proto nchan" ;;
  esac
}

# load <timeout_s> <system> <round> <powa-load args...>
load() {
  local limit=$1 sys=$2 round=$3; shift 3
  local cmd=("$LOAD" "$@" --target 127.0.0.1:$PORT --server-pid "$SERVER_PIDS" --label "$sys" --round "$round" --json-out "$RES")
  # shellcheck disable=SC2046
  cmd+=($(proto_args "$sys"))
  echo "${cmd[*]}" | sed "s/$TOKEN/\$TOKEN/" >>"$OUT/commands.txt"
  timeout "$limit" taskset -c "$LOAD_CPUS" "${cmd[@]}" 2>&1 >/dev/null | tee -a "$OUT/logs/load.log" >&2 \
    || echo "  (run failed or timed out: $sys $*)" >&2
}

# ---------------------------------------------------------------- CPU layout
# powa-realtime places its shard itself (on the CPUs its affinity mask allows; older builds
# ignored the mask), so find where its one shard runs and give the load generator the rest.
start_powa
SERVER_CPU=""
for task in /proc/"$SERVER_PID"/task/*; do
  if grep -q '^shard' "$task/comm" 2>/dev/null; then
    SERVER_CPU=$(taskset -pc "$(basename "$task")" | sed 's/.*: *//')
    break
  fi
done
stop_server
NPROC=$(nproc --all)
[ -n "$SERVER_CPU" ] || SERVER_CPU=0
case $SERVER_CPU in *[,-]*) SERVER_CPU=${SERVER_CPU%%[,-]*} ;; esac
LOAD_CPUS=$(seq 0 $((NPROC - 1)) | grep -vx "$SERVER_CPU" | paste -sd, -)
[ -n "$LOAD_CPUS" ] || LOAD_CPUS=$SERVER_CPU
PINNING="Server under test on CPU $SERVER_CPU (powa-realtime REALTIME_SHARDS=1, powa-rawfanout --threads 1, nginx worker_processes 1); load generator (coordinator + worker processes) on CPU $LOAD_CPUS."
say "$PINNING"

# ---------------------------------------------------------------- W1 fan-out
w1() { # system subs payload round
  start_system "$1"
  load 300 "$1" "$4" fanout --subs "$2" --payload "$3" --start 25000 --step-ms 1500 --drain-ms 2000 --max-steps 12
  stop_server
}

SYSTEMS="powa raw"
[ "$HAVE_NCHAN" = 1 ] && SYSTEMS="powa raw nchan"
if [ "$QUICK" = 1 ]; then
  ROUNDS=1
  say "W1 (quick): N=1000, 100 B"
  for sys in $SYSTEMS; do w1 "$sys" 1000 100 1; done
else
  for round in $(seq 1 "$ROUNDS"); do
    say "W1 round $round: N=1000 and N=5000 at 100 B ($SYSTEMS; binary V2 at N=5000)"
    for sys in $SYSTEMS; do w1 "$sys" 1000 100 "$round"; done
    for sys in $SYSTEMS powa-bin; do w1 "$sys" 5000 100 "$round"; done
  done
  for round in $(seq 1 "$ROUNDS"); do
    say "W1 round $round: N=15000 at 100 B and N=5000 at 1 KB (powa raw)"
    for sys in powa raw; do w1 "$sys" 15000 100 "$round"; done
    for sys in powa raw; do w1 "$sys" 5000 1024 "$round"; done
  done

  # -------------------------------------------------------------- W2 rooms
  for round in $(seq 1 "$ROUNDS"); do
    say "W2 round $round: 6000 users"
    start_powa
    load 180 powa "$round" rooms --vus 6000 --duration-ms 10000
    stop_server
  done

  # -------------------------------------------------------------- W3 join storm, W7 idle memory
  CONN_SYSTEMS="powa raw"
  [ "$HAVE_NCHAN" = 1 ] && CONN_SYSTEMS="powa raw nchan"
  for round in $(seq 1 "$ROUNDS"); do
    say "W3 round $round: 15000 connections, as fast as possible"
    for sys in $CONN_SYSTEMS; do
      start_system "$sys"
      load 180 "$sys" "$round" storm --conns 15000 --concurrency 256
      stop_server
    done
    say "W7 round $round: 15000 idle joined connections"
    for sys in $CONN_SYSTEMS; do
      start_system "$sys"
      load 180 "$sys" "$round" idle --conns 15000 --concurrency 64 --settle-ms 3000 --hold-s 10
      stop_server
    done
  done

  # -------------------------------------------------------------- profiles
  if [ "$HAVE_PERF" = 1 ]; then
    say "perf: W1 N=5000 at 1.2 M deliveries/s offered"
    start_powa
    load 120 powa-perf 1 fanout --subs 5000 --rate 240 --count 2400 --drain-ms 5000 \
      --exec-before "perf record -q -e cpu-clock -F 1999 -g -p $SERVER_PID -o $OUT/perf-fanout.data -- sleep 5 >/dev/null 2>&1 &"
    sleep 1
    stop_server
    say "perf: W7 15000 idle connections with heartbeats"
    start_powa
    load 120 powa-perf 1 idle --conns 15000 --hold-s 8 \
      --exec-before "perf record -q -e cpu-clock -F 1999 -g -p $SERVER_PID -o $OUT/perf-idle.data -- sleep 6 >/dev/null 2>&1 &"
    stop_server
    for p in fanout idle; do
      if [ -f "$OUT/perf-$p.data" ]; then
        perf report -i "$OUT/perf-$p.data" --no-children --sort dso --stdio -g none 2>/dev/null >"$OUT/perf-$p.dso.txt" || true
        perf report -i "$OUT/perf-$p.data" --no-children --sort sym --stdio -g none --percent-limit 0.5 2>/dev/null >"$OUT/perf-$p.sym.txt" || true
      fi
    done
  fi

  # -------------------------------------------------------------- callgrind
  if command -v valgrind >/dev/null; then
    callgrind_run() { # system
      local sys=$1 out=$OUT/cg-$1.out
      rm -f "$out" "$out".*
      next_port
      if [ "$sys" = powa ]; then
        env JWT_SECRET=$SECRET REALTIME_ADDR=127.0.0.1:$PORT REALTIME_SHARDS=1 RUST_LOG=warn \
          valgrind --tool=callgrind --compress-strings=no --compress-pos=no --callgrind-out-file="$out" \
          "$BIN" serve >>"$OUT/logs/callgrind.log" 2>&1 &
      else
        valgrind --tool=callgrind --compress-strings=no --compress-pos=no --callgrind-out-file="$out" \
          "$RAW" --addr 127.0.0.1:$PORT --threads 1 >>"$OUT/logs/callgrind.log" 2>&1 &
      fi
      SERVER_PID=$!; SERVER_PIDS=$SERVER_PID; STARTED+=("$SERVER_PID")
      wait_port "$PORT" 60 || { echo "  valgrind $sys did not start" >&2; stop_server; return 0; }
      load 240 "$sys-cg" 1 fanout --subs 1000 --rate 20 --count 200 --drain-ms 60000 --concurrency 20 \
        --exec-before "callgrind_control -z $SERVER_PID >/dev/null" --exec-after "callgrind_control -d $SERVER_PID >/dev/null"
      stop_server
      [ -f "$out.1" ] && callgrind_annotate --threshold=100 "$out.1" >"$OUT/cg-$sys.txt" 2>/dev/null || true
    }
    say "callgrind: instructions per delivery (1 → 1000, 200 messages)"
    callgrind_run powa
    callgrind_run raw
  fi
fi

# ---------------------------------------------------------------- W5, W3 public/private, W6
# The database workloads have their own drivers (they start a throwaway PostgreSQL 15); their
# tables replace the section between the `drivers` markers of RESULTS.md.
if [ "${QUICK:-0}" != 1 ]; then
  say "W5 Postgres Changes (1, 100, 1000 subscribers; RLS and not)"
  cargo build --release -q -p powa-benches --bin pgchanges_load --bin storm_load
  timeout 600 "$ROOT/target/release/pgchanges_load" 1 100 1000 >"$OUT/w5.md" || fail "pgchanges_load failed"
  say "W3 public/private join storms and W6 REST ingest"
  timeout 600 "$ROOT/target/release/storm_load" 5000 >"$OUT/storm.md" || fail "storm_load failed"
  python3 - "$ROOT/benches/RESULTS.md" "$OUT/w5.md" "$OUT/storm.md" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" <<'PY'
import sys, datetime
path, w5, storm, commit = sys.argv[1:5]
text = open(path).read()
begin, end = "<!-- drivers:begin -->", "<!-- drivers:end -->"
section = (f"{begin}\n## Database workloads, last `benches/run.sh` ({datetime.datetime.utcnow():%Y-%m-%dT%H:%MZ}, commit {commit})\n\n"
           "W5 (`target/release/pgchanges_load 1 100 1000`): 200-row transaction, K subscribers with distinct claims.\n\n"
           + open(w5).read() + "\nW3/W6 (`target/release/storm_load 5000`):\n\n" + open(storm).read() + end)
if begin in text:
    text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
open(path, "w").write(text)
PY
fi

# ---------------------------------------------------------------- report
SUITE_END=$(date +%s)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain 2>/dev/null | grep -v '^??' || true)" ] && COMMIT="$COMMIT + uncommitted changes"
VERSIONS=""
if [ "$HAVE_NCHAN" = 1 ]; then
  VERSIONS="$(nginx -v 2>&1 | sed 's/.*version: //'), nchan $(dpkg-query -W -f='${Version}' libnginx-mod-nchan 2>/dev/null || echo '?')"
fi
REPORT=("$LOAD" report --results "$RES" --out "$ROOT/benches/RESULTS.md"
  --commit "$COMMIT" --date "$(date -u +%Y-%m-%dT%H:%MZ)" --command "bash benches/run.sh"
  --pinning "$PINNING" --duration "$(((SUITE_END - SUITE_START) / 60)) min")
[ -n "$VERSIONS" ] && REPORT+=(--versions "$VERSIONS")
[ -s "$OUT/cg-powa.txt" ] && REPORT+=(--callgrind-powa "$OUT/cg-powa.txt")
[ -s "$OUT/cg-raw.txt" ] && REPORT+=(--callgrind-raw "$OUT/cg-raw.txt")
[ -s "$OUT/perf-fanout.sym.txt" ] && REPORT+=(--perf-fanout "$OUT/perf-fanout")
[ -s "$OUT/perf-idle.sym.txt" ] && REPORT+=(--perf-idle "$OUT/perf-idle")
"${REPORT[@]}"
say "done in $(((SUITE_END - SUITE_START) / 60)) min; results in benches/RESULTS.md, raw data in $OUT"
