#!/usr/bin/env bash
# Issue 12 before/after in one session: two builds of powa-realtime (A = before, B = after)
# and the raw baseline, alternated run by run on the same pinning (server on CPU 0, load on
# CPU 1). Loopback only; every run bounded by `timeout`.
#
#   bash benches/conn_ab.sh BIN_DIR_A BIN_DIR_B OUT_DIR [w7|w1|w3|multi ...]
#   C=BIN_DIR_C bash benches/conn_ab.sh …   # a third build, run after B each time
#   SETTLE_MS=30000 bash benches/conn_ab.sh …  # W7: measure idle CPU in the steady state (after
#                                              # every connection's first heartbeat; default 3000)
#
# Each BIN_DIR holds powa-realtime, powa-load and powa-rawfanout (release builds). Results:
# OUT_DIR/results.jsonl (powa-load's JSON lines, labels A, B, raw, B-2shards), OUT_DIR/load.log.
set -uo pipefail
A=$1 B=$2 OUT=$3; shift 3
C=${C:-}
SYSTEMS="A B${C:+ C}"
bin_of() { case $1 in A) echo "$A" ;; C) echo "$C" ;; *) echo "$B" ;; esac; }
WHAT=${*:-w7 w1 w3 multi}
SETTLE_MS=${SETTLE_MS:-3000}
SECRET=bench-secret-not-for-production
LOAD=$B/powa-load
mkdir -p "$OUT"
RES=$OUT/results.jsonl
TOKEN=$(JWT_SECRET=$SECRET "$A/powa-realtime" token --role anon --exp 86400)
PORT=4700
PID=""

start() { # label bin_dir shards
  PORT=$((PORT + 1))
  if [ "$1" = raw ]; then
    taskset -c 0 "$2/powa-rawfanout" --addr 127.0.0.1:$PORT --threads 1 >>"$OUT/server.log" 2>&1 &
  elif [ "$3" = 1 ]; then
    env JWT_SECRET=$SECRET REALTIME_ADDR=127.0.0.1:$PORT REALTIME_SHARDS=1 RUST_LOG=warn taskset -c 0 "$2/powa-realtime" serve >>"$OUT/server.log" 2>&1 &
  else
    env JWT_SECRET=$SECRET REALTIME_ADDR=127.0.0.1:$PORT REALTIME_SHARDS="$3" RUST_LOG=warn "$2/powa-realtime" serve >>"$OUT/server.log" 2>&1 &
  fi
  PID=$!
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0; sleep 0.1; done
  echo "server $1 did not start" >&2
}

stop() {
  kill "$PID" 2>/dev/null
  for _ in $(seq 1 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; sleep 0.5
}

load() { # label round load_cpus args...
  local label=$1 round=$2 cpus=$3; shift 3
  local proto=(--proto phoenix --vsn 2 --token "$TOKEN")
  case $label in raw*) proto=(--proto raw) ;; esac
  echo "== $label round $round: $*" | tee -a "$OUT/load.log" >&2
  timeout 240 taskset -c "$cpus" "$LOAD" "$@" --target 127.0.0.1:$PORT --server-pid "$PID" --label "$label" --round "$round" --json-out "$RES" "${proto[@]}" 2>&1 >/dev/null | tee -a "$OUT/load.log" >&2
}

run() { # label bin shards round cpus args...
  start "$1" "$2" "$3"; local l=$1 r=$4 c=$5; shift 5; load "$l" "$r" "$c" "$@"; stop
}

for what in $WHAT; do
  case $what in
    w7)
      for n in 2000 5000 10000 15000; do
        for sys in $SYSTEMS; do
          run "$sys" "$(bin_of $sys)" 1 1 1 idle --conns $n --concurrency 64 --settle-ms $SETTLE_MS --hold-s 20
        done
      done
      run raw "$B" 1 1 1 idle --conns 15000 --concurrency 64 --settle-ms $SETTLE_MS --hold-s 20
      ;;
    w1)
      for n in 1000 5000; do
        for sys in $SYSTEMS raw; do
          run "$sys" "$(bin_of $sys)" 1 1 1 fanout --subs $n --payload 100 --start 25000 --step-ms 1500 --drain-ms 2000 --max-steps 12
        done
      done
      ;;
    w3)
      for sys in $SYSTEMS raw $SYSTEMS raw; do
        run "$sys" "$(bin_of $sys)" 1 1 1 storm --conns 15000 --concurrency 256
      done
      ;;
    multi)
      # Two shards share both cores with the load generator: reported as a ratio to one shard
      # in the same layout (server unpinned, load unpinned).
      for shards in 1 2; do
        run "B-${shards}shard" "$B" "$shards" 1 0,1 fanout --subs 1000 --payload 100 --start 25000 --step-ms 1500 --drain-ms 2000 --max-steps 12
        run "B-${shards}shard" "$B" "$shards" 1 0,1 idle --conns 15000 --concurrency 64 --settle-ms $SETTLE_MS --hold-s 20
      done
      ;;
  esac
done
