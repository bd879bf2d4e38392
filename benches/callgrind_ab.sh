#!/usr/bin/env bash
# Instructions per delivery under callgrind for one release build (1 → 1,000, 200 messages).
# Usage: bash benches/callgrind_ab.sh BIN_DIR LABEL PORT  (run it for the before and the after build)
# callgrind Ir per delivery for a release dir $1, label $2, port $3
set -u
BIN=$1/powa-realtime; LOAD=${LOAD:-$1/powa-load}; OUT=/tmp/cg-$2.out
SECRET=bench-secret-not-for-production
TOKEN=$(JWT_SECRET=$SECRET $BIN token --role anon --exp 86400)
rm -f $OUT $OUT.*
env JWT_SECRET=$SECRET REALTIME_ADDR=127.0.0.1:$3 REALTIME_SHARDS=1 RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file=$OUT $BIN serve >/tmp/cg-$2.log 2>&1 &
PID=$!
for i in $(seq 1 300); do (exec 3<>/dev/tcp/127.0.0.1/$3) 2>/dev/null && break; sleep 0.2; done
timeout 300 $LOAD fanout --subs 1000 --rate 20 --count 200 --drain-ms 60000 --concurrency 20 --target 127.0.0.1:$3 --proto phoenix --vsn 2 --token "$TOKEN" \
  --exec-before "callgrind_control -z $PID >/dev/null" --exec-after "callgrind_control -d $PID >/dev/null" > /tmp/cg-$2.load 2>&1
kill $PID; wait $PID 2>/dev/null
f=$(ls $OUT.* 2>/dev/null | head -1)
echo "$2: $(grep -h '^summary:\|^totals:' $f | head -1)"
