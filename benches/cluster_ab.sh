#!/usr/bin/env bash
# Issue 15 cross-node W1, in one session: the single-node W1 and the same load across two
# cluster nodes, alternated round by round on the same pinning. Loopback only; every run bounded.
#
#   bash benches/cluster_ab.sh BIN_DIR OUT_DIR [ROUNDS]
#
# Single node: the server (1 shard) on CPU 0, the load generator on CPU 1.
# Cluster:     node 2 (1 shard, every subscriber) on CPU 0; node 1 (1 shard, the publisher),
#              nats-server and the load generator on CPU 1 (a 2-core machine has no third core).
# RATES=D1,D2,… replaces the ladder search by fixed deliveries/s steps (the same offered load
# for both systems); NS="5000" picks the subscriber counts (default "1000 5000").
# NODE1_CPU=0 puts node 1 on CPU 0 beside node 2 instead (the load generator then shares its core
# only with nats-server, as in the single-node runs).
# BIN_DIR holds release builds of powa-realtime and powa-load; nats-server is on PATH.
# Results: OUT_DIR/results.jsonl (powa-load's JSON lines, labels single/cluster),
# OUT_DIR/nats.txt (NATS messages per broadcast from node 1's /metrics), OUT_DIR/load.log.
set -uo pipefail
BIN=$1 OUT=$2 ROUNDS=${3:-2}
SECRET=bench-secret-not-for-production
mkdir -p "$OUT"
RES=$OUT/results.jsonl
TOKEN=$(JWT_SECRET=$SECRET "$BIN/powa-realtime" token --role anon --exp 86400)
PIDS=()

wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 did not open" >&2; }

node() { # cpu port name [nats url]
  local cpu=$1 port=$2 name=$3 nats=${4:-}
  env JWT_SECRET=$SECRET REALTIME_ADDR=127.0.0.1:$port REALTIME_SHARDS=1 RUST_LOG=warn ${nats:+REALTIME_NATS_URL=$nats REALTIME_NODE_ID=$name} \
    taskset -c "$cpu" "$BIN/powa-realtime" serve >>"$OUT/server.log" 2>&1 &
  PIDS+=($!)
  wait_port "$port"
}

stop_all() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  done
  PIDS=(); sleep 0.5
}

metric() { # port name
  curl -s "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { print $2 }'
}

W1=(fanout --payload 100 --start 25000 --step-ms 1500 --drain-ms 2000 --max-steps 12)
if [ -n "${RATES:-}" ]; then W1=(fanout --payload 100 --step-ms 2000 --drain-ms 2000 --rates "$RATES"); fi
port=4800
for round in $(seq 1 "$ROUNDS"); do
  for n in ${NS:-1000 5000}; do
    port=$((port + 10))
    node 0 $port single
    echo "== single N=$n round $round" | tee -a "$OUT/load.log" >&2
    timeout 240 taskset -c 1 "$BIN/powa-load" "${W1[@]}" --subs $n --target 127.0.0.1:$port --server-pid "${PIDS[0]}" \
      --label single --round "$round" --json-out "$RES" --proto phoenix --vsn 2 --token "$TOKEN" 2>&1 >/dev/null | tee -a "$OUT/load.log" >&2
    stop_all

    port=$((port + 10))
    natsdir=$(mktemp -d)
    printf 'listen: 127.0.0.1:%s\nmax_payload: 8MB\njetstream { store_dir: "%s" }\n' $((port + 5)) "$natsdir" > "$natsdir/nats.conf"
    taskset -c 1 nats-server -c "$natsdir/nats.conf" >>"$OUT/nats.log" 2>&1 &
    NATS=$!
    wait_port $((port + 5))
    node "${NODE1_CPU:-1}" $((port + 1)) node1 nats://127.0.0.1:$((port + 5))
    node 0 $((port + 2)) node2 nats://127.0.0.1:$((port + 5))
    sleep 2
    out0=$(metric $((port + 1)) realtime_cluster_messages_out_total)
    echo "== cluster N=$n round $round" | tee -a "$OUT/load.log" >&2
    timeout 240 taskset -c 1 "$BIN/powa-load" "${W1[@]}" --subs $n --target 127.0.0.1:$((port + 2)) --publish-target 127.0.0.1:$((port + 1)) \
      --server-pid "${PIDS[0]},${PIDS[1]}" --label cluster --round "$round" --json-out "$RES" --proto phoenix --vsn 2 --token "$TOKEN" 2>&1 >/dev/null | tee -a "$OUT/load.log" >&2
    out1=$(metric $((port + 1)) realtime_cluster_messages_out_total)
    sent=$(metric $((port + 1)) realtime_broadcasts_received_total)
    echo "N=$n round=$round broadcasts=$sent nats_messages_out=$((out1 - out0)) per_broadcast=$(awk -v a=$((out1 - out0)) -v b="$sent" 'BEGIN { if (b > 0) printf "%.4f", a / b }')" | tee -a "$OUT/nats.txt"
    stop_all
    kill $NATS 2>/dev/null; wait $NATS 2>/dev/null; rm -rf "$natsdir"
  done
done
