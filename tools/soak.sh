#!/usr/bin/env bash
# tools/soak.sh — a long run of powa-realtime under churn, sampled into a CSV with a plot and a
# verdict (issue 16). Loopback only.
#
#   bash tools/soak.sh [--conns N] [--duration-s S] [--churn-per-s R] [--database-url URL] ...
#
# Options (or the environment variables in brackets):
#   --conns N          connections held (members + churners)            [CONNS, 15000]
#   --duration-s S     length of the run                                  [DURATION_S, 1800]
#   --workers N        load generator processes                           [WORKERS, 4]
#   --churn-per-s R    connect/join/track/leave/close cycles per second   [CHURN, 200]
#   --hold-ms MS       how long a churner keeps its channel               [HOLD_MS, 5000]
#   --room-size N      members per room                                   [ROOM_SIZE, 50]
#   --publish-per-s R  member broadcasts per second (all rooms)           [PUBLISH, 300]
#   --sample-s S       sampling period of the CSV                         [SAMPLE_S, 10]
#   --mark-s S         the RSS reference point of the memory verdict      [MARK_S, 300]
#   --database-url URL Postgres Changes too (the server and the inserts use it)  [DATABASE_URL]
#   --pg-per-s R       rows inserted per second                           [PG_PER_S, 20]
#   --pg-subs N        members with a Postgres Changes binding            [PG_SUBS, 200]
#   --shards N         REALTIME_SHARDS of the server                      [SHARDS, 2]
#   --out DIR          where soak.csv, soak.png, summary.json and the logs go
#                                                     [OUT, target/soak/<date>]
#   --profile P        release (default) or debug build                   [SOAK_PROFILE]
#   --server-bin PATH  a prebuilt powa-realtime (skips its build)         [SOAK_SERVER_BIN]
#   --soak-bin PATH    a prebuilt powa-soak (skips its build)             [SOAK_BIN]
#
# It starts its own server on a free loopback port, runs `powa-soak run`, stops the server,
# draws soak.png with gnuplot (installed from Debian when missing and we are root) and prints
# the verdict line: memory flat (RSS at the end within 5 % of the RSS at --mark-s) and zero lost
# deliveries. Exit status: 0 when both pass, 2 when one fails, 1 on a set-up error.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

fail() { echo "tools/soak.sh: $*" >&2; exit 1; }

CONNS=${CONNS:-15000}
DURATION_S=${DURATION_S:-1800}
WORKERS=${WORKERS:-4}
CHURN=${CHURN:-200}
HOLD_MS=${HOLD_MS:-5000}
ROOM_SIZE=${ROOM_SIZE:-50}
PUBLISH=${PUBLISH:-300}
SAMPLE_S=${SAMPLE_S:-10}
MARK_S=${MARK_S:-300}
DATABASE_URL=${DATABASE_URL:-}
PG_PER_S=${PG_PER_S:-20}
PG_SUBS=${PG_SUBS:-200}
SHARDS=${SHARDS:-2}
OUT=${OUT:-target/soak/$(date -u +%Y%m%d-%H%M%S)}
SOAK_PROFILE=${SOAK_PROFILE:-release}
SOAK_SERVER_BIN=${SOAK_SERVER_BIN:-}
SOAK_BIN=${SOAK_BIN:-}

while [ $# -gt 0 ]; do
  case "$1" in
    --conns) CONNS=$2 ;;
    --duration-s) DURATION_S=$2 ;;
    --workers) WORKERS=$2 ;;
    --churn-per-s) CHURN=$2 ;;
    --hold-ms) HOLD_MS=$2 ;;
    --room-size) ROOM_SIZE=$2 ;;
    --publish-per-s) PUBLISH=$2 ;;
    --sample-s) SAMPLE_S=$2 ;;
    --mark-s) MARK_S=$2 ;;
    --database-url) DATABASE_URL=$2 ;;
    --pg-per-s) PG_PER_S=$2 ;;
    --pg-subs) PG_SUBS=$2 ;;
    --shards) SHARDS=$2 ;;
    --out) OUT=$2 ;;
    --profile) SOAK_PROFILE=$2 ;;
    --server-bin) SOAK_SERVER_BIN=$2 ;;
    --soak-bin) SOAK_BIN=$2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) fail "unknown option $1 (see --help)" ;;
  esac
  shift 2
done

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Binaries.
case "$SOAK_PROFILE" in
  release) PROFILE_FLAG=--release; PROFILE_DIR=release ;;
  debug) PROFILE_FLAG=; PROFILE_DIR=debug ;;
  *) fail "--profile is release or debug" ;;
esac
if [ -z "$SOAK_SERVER_BIN" ]; then
  cargo build -q $PROFILE_FLAG --bin powa-realtime
  SOAK_SERVER_BIN=$ROOT/target/$PROFILE_DIR/powa-realtime
fi
if [ -z "$SOAK_BIN" ]; then
  cargo build -q $PROFILE_FLAG -p powa-tools --bin powa-soak
  SOAK_BIN=$ROOT/target/$PROFILE_DIR/powa-soak
fi
[ -x "$SOAK_SERVER_BIN" ] || fail "no server binary at $SOAK_SERVER_BIN"
[ -x "$SOAK_BIN" ] || fail "no powa-soak binary at $SOAK_BIN"

# Descriptors: the server holds every connection; each worker its share.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
PER_WORKER=$(( CONNS / WORKERS + 100 ))
[ "$NOFILE" = unlimited ] || [ "$NOFILE" -gt $(( CONNS + 100 )) ] || fail "the file limit ($NOFILE) is below --conns + 100: lower --conns or raise ulimit -n"
[ "$NOFILE" = unlimited ] || [ "$NOFILE" -gt "$PER_WORKER" ] || fail "the file limit ($NOFILE) is below one worker's share ($PER_WORKER): add --workers"

# A free loopback port.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null) \
  || PORT=$(( 20000 + RANDOM % 20000 ))
SECRET=soak-secret-$(date +%s)-0123456789abcdefghijklmnopqrstuvwxyz
TOKEN=$(JWT_SECRET=$SECRET "$SOAK_SERVER_BIN" token --role anon --exp $(( DURATION_S + 3600 )))

SERVER_ENV=(JWT_SECRET="$SECRET" REALTIME_ADDR="127.0.0.1:$PORT" REALTIME_SHARDS="$SHARDS" RUST_LOG="${RUST_LOG:-warn}" REALTIME_DRAIN_SECS=5)
[ -n "$DATABASE_URL" ] && SERVER_ENV+=(DATABASE_URL="$DATABASE_URL")
env "${SERVER_ENV[@]}" "$SOAK_SERVER_BIN" serve >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
stop_server() {
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
}
trap stop_server EXIT
for _ in $(seq 1 200); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
  kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited at start (see $OUT/server.log)"
  sleep 0.1
done

echo "tools/soak.sh: server pid $SERVER_PID on 127.0.0.1:$PORT; $CONNS connections for ${DURATION_S}s; output in $OUT"
SOAK_ARGS=(run --target "127.0.0.1:$PORT" --token "$TOKEN" --server-pid "$SERVER_PID"
  --conns "$CONNS" --workers "$WORKERS" --duration-s "$DURATION_S" --sample-s "$SAMPLE_S" --mark-s "$MARK_S"
  --churn-per-s "$CHURN" --hold-ms "$HOLD_MS" --room-size "$ROOM_SIZE" --publish-per-s "$PUBLISH"
  --csv "$OUT/soak.csv" --summary "$OUT/summary.json")
[ -n "$DATABASE_URL" ] && SOAK_ARGS+=(--pg-url "$DATABASE_URL" --pg-per-s "$PG_PER_S" --pg-subs "$PG_SUBS")
set +e
"$SOAK_BIN" "${SOAK_ARGS[@]}" 2> >(tee "$OUT/soak.log" >&2) | tee "$OUT/verdict.txt"
STATUS=${PIPESTATUS[0]}
set -e
kill -0 "$SERVER_PID" 2>/dev/null || { echo "tools/soak.sh: the server died during the run (see $OUT/server.log)" >&2; STATUS=2; }
stop_server

# The plot.
if ! command -v gnuplot >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "tools/soak.sh: installing gnuplot (Debian package gnuplot-nox)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gnuplot-nox >/dev/null) || true
fi
if command -v gnuplot >/dev/null; then
  gnuplot <<EOF || echo "tools/soak.sh: gnuplot failed; the CSV is in $OUT/soak.csv" >&2
set datafile separator ','
set terminal pngcairo size 1200,900 noenhanced
set output '$OUT/soak.png'
set multiplot layout 3,1 title 'powa-realtime soak: $CONNS connections, churn $CHURN/s, ${DURATION_S}s'
set key outside right
set grid
set xlabel 't (s)'
set ylabel 'RSS (MiB)'
set y2label 'count'
set y2tics
set ytics nomirror
plot '$OUT/soak.csv' using 1:(\$2/1024) skip 1 with lines lw 2 title 'RSS MiB', '' using 1:3 skip 1 axes x1y2 with lines title 'fds', '' using 1:5 skip 1 axes x1y2 with lines title 'open conns'
unset y2label
unset y2tics
set ylabel '% of a core'
plot '$OUT/soak.csv' using 1:4 skip 1 with lines title 'server CPU %'
set ylabel 'deliveries/s'
set y2label 'churn/s, lost'
set y2tics
plot '$OUT/soak.csv' using 1:13 skip 1 with lines lw 2 title 'deliveries/s', '' using 1:11 skip 1 axes x1y2 with lines title 'churn cycles/s', '' using 1:(\$14+\$18) skip 1 axes x1y2 with lines title 'lost (total)'
unset multiplot
EOF
else
  echo "tools/soak.sh: gnuplot is missing (Debian package gnuplot-nox); no plot" >&2
fi
echo "tools/soak.sh: $OUT/soak.csv, $OUT/summary.json$( [ -f "$OUT/soak.png" ] && echo ", $OUT/soak.png")"
exit "$STATUS"
