"""Postgres Changes with the official Python client (`realtime` on PyPI),
driven by tests/postgres_changes.rs.

Connects with AsyncRealtimeClient(url, token), listens on `--topic` with
channel.on_postgres_changes("INSERT", schema="public", table=<--table>) and
prints, one JSON object per line on stdout (flushed):

  {"event": "subscribed", "binding_id": N}      the join was answered ok
  {"event": "system", "payload": {...}}          a `system` ok message (the
                                                 subscription is live)
  {"event": "change", "binding_id": N, "payload": {...}}
                                                 the first INSERT the callback got
  {"event": "error", "message": "..."}           then exit status 2

After the first change it closes the socket and exits 0. Every wait is
bounded by `--timeout`.
"""

import argparse
import asyncio
import json
import sys

from realtime import AsyncRealtimeClient, RealtimeSubscribeStates


def emit(obj):
    print(json.dumps(obj, sort_keys=True), flush=True)


async def run(args) -> int:
    client = AsyncRealtimeClient(args.url, args.token, auto_reconnect=False)
    channel = client.channel(args.topic)
    changes: asyncio.Queue = asyncio.Queue()
    statuses = []

    def on_insert(payload):
        changes.put_nowait(payload)

    def on_system(payload):
        emit({"event": "system", "payload": payload.model_dump()})

    def on_status(status, err):
        statuses.append((status, err))
        # Printed from the callback itself, so it always precedes the `system` line.
        if status == RealtimeSubscribeStates.SUBSCRIBED:
            emit({"event": "subscribed", "binding_id": channel.postgres_changes_callbacks[0].id})
        else:
            emit({"event": "error", "message": f"subscribe reported {status} {err!r}"})

    channel.on_postgres_changes("INSERT", schema="public", table=args.table, callback=on_insert)
    channel.on_system(on_system)

    try:
        await asyncio.wait_for(channel.subscribe(on_status), args.timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout
        while not statuses and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if not statuses or statuses[-1][0] != RealtimeSubscribeStates.SUBSCRIBED:
            emit({"event": "error", "message": f"subscribe ended with {statuses!r}"})
            return 2
        binding_id = channel.postgres_changes_callbacks[0].id
        try:
            payload = await asyncio.wait_for(changes.get(), args.timeout)
        except asyncio.TimeoutError:
            emit({"event": "error", "message": f"no INSERT within {args.timeout} s"})
            return 2
        emit({"event": "change", "binding_id": binding_id, "payload": payload})
        return 0
    finally:
        try:
            await asyncio.wait_for(client.close(), 5)
        except Exception as err:  # closing is best effort
            print(f"close failed: {err!r}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="ws://host:port/realtime/v1")
    parser.add_argument("--token", required=True)
    parser.add_argument("--topic", required=True, help="sub-topic; the client adds realtime:")
    parser.add_argument("--table", default="todos")
    parser.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args()
    try:
        return asyncio.run(run(args))
    except Exception as err:
        emit({"event": "error", "message": f"{type(err).__name__}: {err}"})
        return 2


if __name__ == "__main__":
    sys.exit(main())
