"""Latency of chat:start cache hits, as absolute times and as ratios to a floor.

Run as ``python -m bench.hits [--requests N] [--rounds R] [--out DIR] [--no-uvloop]``.

Every series is a closed loop over one WebSocket connection on 127.0.0.1: send one
request, wait for its reply, record the round trip with ``time.perf_counter_ns`` in an
HdrHistogram (1 µs .. 10 s, 3 significant digits), repeat. The series are:

* ``floor``: a bare ``websockets`` echo server, echoing the MessagePack chat:start frames
  the bridge series send. What no WebSocket server on this machine can beat.
* ``bridge msgpack``: the real bridge (``bridge.runtime.app.App``, embedded valkey-server), one
  chat:start per round trip as a binary MessagePack frame; every reply must be a hit.
* ``bridge json``: the same as JSON text frames.

The client does the same work in every series (encode a message with a fresh id, send,
receive, decode, check the id), and everything runs in one process on one event loop, so
the difference to the floor is the bridge's own work. Because absolute times drift on a
shared machine, the series run interleaved in rounds and every figure is also given as a
ratio to the floor of the same run.

Component rows help explain the difference: the handler's own ``elapsed_us`` as the
bridge reports it (cache lookup included), the bridge's ``ContextCache.lookup`` on its own,
and a bare Valkey ``MGET`` of the same keys over the same unix socket, once through redis-py
with default options and once as raw bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from websockets.asyncio.client import ClientConnection, connect

from bench.common import (
    DEFAULT_OUT,
    PROJECT,
    QUERY,
    BenchError,
    RoundTrip,
    Series,
    bridge_config,
    bridge_url,
    check_echo,
    check_hit,
    closed_loop,
    echo_server,
    machine,
    machine_line,
    new_histogram,
    round_trip,
    run_loop,
    run_rounds,
    running_bridge,
    seed,
    statsd_sink,
    warm_up,
)
from bench.rows import Row, markdown_table, row_of, series_row
from bridge.cache.contexts import ContextCache

log = logging.getLogger("bench.hits")


# -- component round trips ----------------------------------------------------------------


def valkey_trip(client: redis.Redis, keys: Sequence[str]) -> RoundTrip:
    """One bare ``MGET`` of the keys a cache lookup reads."""

    async def trip(i: int) -> None:
        found = await client.mget(*keys)
        if found[0] is None:
            raise BenchError("the cached context disappeared from Valkey during the run")

    return trip


def resp_command(*words: str) -> bytes:
    """One command in the Redis serialization protocol."""
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


async def raw_valkey_trip(
    stack: contextlib.AsyncExitStack, socket_path: Path, keys: Sequence[str]
) -> RoundTrip:
    """One ``MGET`` written and read as raw bytes: Valkey and the kernel, no client library."""
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    stack.callback(writer.close)
    command = resp_command("MGET", *keys)
    writer.write(command)
    expected = await reader.read(1 << 16)  # small enough to come back in one read
    if not expected.startswith(b"*2\r\n$") or expected.startswith(b"*2\r\n$-1"):
        raise BenchError(f"raw MGET of the cached context returned {expected[:80]!r}")

    async def trip(i: int) -> None:
        writer.write(command)
        if await reader.readexactly(len(expected)) != expected:
            raise BenchError("the raw MGET reply changed during the run")

    return trip


def lookup_trip(cache: ContextCache) -> RoundTrip:
    """One ``ContextCache.lookup``, on a cache client configured as the bridge's is."""

    async def trip(i: int) -> None:
        if not (await cache.lookup(PROJECT, QUERY)).hit:
            raise BenchError("ContextCache.lookup missed: the cached context disappeared")

    return trip


# -- the run ------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Start the floor and the bridge, measure every series, stop everything."""
    server_us = new_histogram()
    async with contextlib.AsyncExitStack() as stack:
        floor_url = await stack.enter_async_context(echo_server())
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-hits-")))
        statsd_port = stack.enter_context(statsd_sink())
        app = await stack.enter_async_context(running_bridge(bridge_config(data_dir, statsd_port)))
        assert app.valkey is not None and app.cache is not None

        async def client(url: str) -> ClientConnection:
            return await stack.enter_async_context(connect(url, compression=None))

        floor_ws, msgpack_ws, json_ws = (
            await client(floor_url),
            await client(bridge_url(app)),
            await client(bridge_url(app)),
        )
        await seed(msgpack_ws)
        valkey = redis.Redis.from_url(app.valkey.url)
        stack.push_async_callback(valkey.aclose)
        keys = [app.cache.context_key(PROJECT, QUERY), app.cache.epoch_key(PROJECT)]
        cache = ContextCache.from_url(
            app.valkey.url, prefix=app.config.cache.prefix, namespace=app.cache.namespace
        )
        stack.push_async_callback(cache.close)

        raw = await raw_valkey_trip(stack, app.valkey.socket_path, keys)
        trips: list[tuple[str, RoundTrip]] = [
            ("floor (echo, msgpack)", round_trip(floor_ws, True, check_echo)),
            ("bridge hit, msgpack", round_trip(msgpack_ws, True, check_hit(server_us))),
            ("bridge hit, json", round_trip(json_ws, False, check_hit(None))),
            ("ContextCache.lookup (bridge's client)", lookup_trip(cache)),
            ("valkey MGET, redis-py defaults", valkey_trip(valkey, keys)),
            ("valkey MGET, raw RESP", raw),
        ]
        series = [Series(name, closed_loop(trip)) for name, trip in trips]
        await warm_up(series, args.warmup)
        server_us.reset()  # the handler's own times, without the warm-up's
        await run_rounds(series, args.requests, args.rounds)

    floor = series_row(series[0])
    rows = [floor] + [series_row(s, floor) for s in series[1:3]]
    handler = row_of("handler elapsed_us (server-reported, msgpack)", server_us, floor=floor)
    components = [handler] + [series_row(s, floor) for s in series[3:]]
    return {"series": rows, "components": components}


def report(results: dict[str, Any], out: Path) -> str:
    """Write hits.md and hits.json under ``out``; return the Markdown."""
    m, p = results["machine"], results["params"]
    text = "\n\n".join(
        [
            "# chat:start cache hits: round-trip latency",
            machine_line(m),
            f"Closed loop, one connection per series, {p['requests']} requests per series in "
            f"{p['rounds']} interleaved rounds after {p['warmup']} warm-up requests; "
            f"run took {results['duration_s']:.1f} s.",
            markdown_table(results["series"]),
            "Components (not round trips over the bridge; ratios still to the floor):",
            markdown_table(results["components"]),
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "hits.md").write_text(text + "\n")
    (out / "hits.json").write_text(json.dumps(results, indent=2, default=row_json) + "\n")
    return text


def row_json(value: object) -> dict[str, Any]:
    """``json.dumps``' fallback: a row as the JSON holds it."""
    if isinstance(value, Row):
        return value.to_json()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.hits", description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000, help="measured per series")
    parser.add_argument("--warmup", type=int, default=500, help="unrecorded, per series")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for results")
    parser.add_argument("--no-uvloop", action="store_true", help="use the asyncio loop")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1 or args.warmup < 0 or args.rounds > args.requests:
        parser.error("need requests >= rounds >= 1 and warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the benchmark, print the table, return the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        results, uvloop_version = run_loop(bench(args), not args.no_uvloop)
    except BenchError as e:
        print(f"bench.hits: {e}", file=sys.stderr)
        return 1
    results["machine"] = machine(uvloop_version)
    results["params"] = {"requests": args.requests, "rounds": args.rounds, "warmup": args.warmup}
    results["duration_s"] = round(time.perf_counter() - started, 2)
    print(report(results, args.out))
    print(f"\nwrote {args.out / 'hits.md'} and {args.out / 'hits.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
