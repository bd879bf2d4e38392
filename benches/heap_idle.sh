#!/usr/bin/env bash
# Heap of an idle joined connection, by allocation site (heaptrack, Debian package `heaptrack`).
#
#   bash benches/heap_idle.sh BIN_DIR OUT_PREFIX [CONNS]
#
# Starts BIN_DIR/powa-realtime (one shard, port 4802) under heaptrack, holds CONNS (5,000) idle
# joined connections with BIN_DIR/powa-load, and kills the server (-9) during the hold, so what
# heaptrack reports as "leaked" is exactly what was live: printed per connection by site.
# Loopback only; bounded by `timeout`.
set -u
B=$1 OUT=$2 N=${3:-5000}
SECRET=bench-secret-not-for-production
TOKEN=$(JWT_SECRET=$SECRET $B/powa-realtime token --role anon --exp 86400)
rm -f $OUT.zst
env JWT_SECRET=$SECRET REALTIME_ADDR=127.0.0.1:4802 REALTIME_SHARDS=1 RUST_LOG=warn heaptrack -o $OUT $B/powa-realtime serve > $OUT.log 2>&1 &
sleep 3
timeout 120 $B/powa-load idle --conns $N --concurrency 64 --settle-ms 3000 --hold-s 30 --target 127.0.0.1:4802 --proto phoenix --vsn 2 --token "$TOKEN" > $OUT.load 2>&1 &
sleep 20
pkill -9 -f "$B/powa-realtime serve"
sleep 3
heaptrack_print -f $OUT.zst -F $OUT.stacks --flamegraph-cost-type leaked >/dev/null 2>&1
python3 - "$OUT.stacks" "$N" <<'PY'
import collections,re,sys
agg=collections.Counter(); tot=0; N=int(sys.argv[2])
def short(f): return re.sub(r'::h[0-9a-f]{16}$','',f)[-80:]
for line in open(sys.argv[1]):
    stack,_,n=line.rstrip().rpartition(' ')
    n=int(n); tot+=n
    frames=stack.split(';')
    idx=None
    for i in range(len(frames)-1,-1,-1):
        if any(x in frames[i] for x in ('net::','engine::','powa','auth::')): idx=i;break
    key=' > '.join(short(f) for f in frames[idx:idx+3]) if idx is not None else short(frames[-1])
    agg[key]+=n
print(f"live heap at kill: {tot} B = {tot/N:.1f} B/conn (requested sizes)")
for k,v in agg.most_common(22): print(f"{v/N:7.1f}  {k}")
PY
