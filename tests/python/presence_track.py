"""Presence with the official Python client (`realtime` on PyPI), driven by
tests/presence_clients.rs.

Connects with AsyncRealtimeClient(url, token), joins `--topic` with presence
enabled under `--key`, tracks {"name": <--name>} and prints, one JSON object
per line on stdout (flushed):

  {"event": "subscribed"}                        the join was answered ok
  {"event": "sync"|"join"|"leave", ...}          every presence callback
  {"event": "state", "state": {...}}             once every `--expect-key` is in
                                                 channel.presence_state()
  {"event": "error", "message": "..."}           then exit status 2

After "state" it keeps the channel open until stdin reaches end of file (or
`--timeout` seconds pass), then closes the socket and exits 0. Every wait is
bounded by `--timeout`.
"""

import argparse
import asyncio
import json
import sys
import threading

from realtime import AsyncRealtimeClient, RealtimeSubscribeStates


def emit(obj):
    print(json.dumps(obj, sort_keys=True), flush=True)


async def run(args) -> int:
    client = AsyncRealtimeClient(args.url, args.token, auto_reconnect=False)
    channel = client.channel(
        args.topic,
        {
            "config": {
                "broadcast": {"ack": False, "self": False},
                "presence": {"key": args.key, "enabled": True},
                "private": False,
            }
        },
    )
    expected = set(args.expect_key)
    all_present = asyncio.Event()

    def check():
        if expected.issubset(channel.presence_state().keys()):
            all_present.set()

    def on_sync():
        emit({"event": "sync", "state": channel.presence_state()})
        check()

    def on_join(key, current, new):
        emit({"event": "join", "key": key, "current": current, "new": new})

    def on_leave(key, current, left):
        emit({"event": "leave", "key": key, "current": current, "left": left})

    # Registering presence callbacks before subscribing makes the join carry
    # presence.enabled = true.
    channel.on_presence_sync(on_sync)
    channel.on_presence_join(on_join)
    channel.on_presence_leave(on_leave)

    statuses = []

    def on_status(status, err):
        statuses.append((status, err))

    try:
        await asyncio.wait_for(channel.subscribe(on_status), args.timeout)
        if not statuses or statuses[-1][0] != RealtimeSubscribeStates.SUBSCRIBED:
            emit({"event": "error", "message": f"subscribe ended with {statuses!r}"})
            return 2
        emit({"event": "subscribed"})

        await channel.track({"name": args.name})

        try:
            await asyncio.wait_for(all_present.wait(), args.timeout)
        except asyncio.TimeoutError:
            emit(
                {
                    "event": "error",
                    "message": f"keys {sorted(expected)} not all seen within {args.timeout} s",
                    "state": channel.presence_state(),
                }
            )
            return 2
        emit({"event": "state", "state": channel.presence_state()})

        # Stay a member until the test closes our stdin.
        # (A daemon thread, so a timeout does not leave asyncio waiting for it.)
        loop = asyncio.get_running_loop()
        stdin_closed = asyncio.Event()

        def wait_for_eof():
            sys.stdin.read()
            loop.call_soon_threadsafe(stdin_closed.set)

        threading.Thread(target=wait_for_eof, daemon=True).start()
        try:
            await asyncio.wait_for(stdin_closed.wait(), args.timeout)
        except asyncio.TimeoutError:
            pass
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
    parser.add_argument("--key", required=True, help="presence key")
    parser.add_argument("--name", default="py", help="value tracked as {'name': NAME}")
    parser.add_argument("--expect-key", action="append", default=[], help="key to wait for")
    parser.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args()
    try:
        return asyncio.run(run(args))
    except Exception as err:
        emit({"event": "error", "message": f"{type(err).__name__}: {err}"})
        return 2


if __name__ == "__main__":
    sys.exit(main())
