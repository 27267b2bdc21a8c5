"""Latency of chat:start cache hits, as absolute times and as ratios to a floor.

Run as ``python -m bench.hits [--requests N] [--rounds R] [--out DIR] [--no-uvloop]``.

Every series is a closed loop over one WebSocket connection on 127.0.0.1: send one
request, wait for its reply, record the round trip with ``time.perf_counter_ns`` in an
HdrHistogram (1 µs .. 10 s, 3 significant digits), repeat. The series are:

* ``floor``: a bare ``websockets`` echo server, echoing the MessagePack chat:start frames
  the bridge series send. What no WebSocket server on this machine can beat.
* ``bridge msgpack``: the real bridge (``bridge.app.App``, embedded valkey-server), one
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
import gc
import json
import logging
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import msgspec
import redis.asyncio as redis
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from bridge.app import App
from bridge.cache import ContextCache
from bridge.config import Config

PROJECT: Final = "bench"
QUERY: Final = "why does the parser raise TypeError on empty tokens"
EPISODES: Final = (
    "TypeError: parser.tokens is undefined when the input is empty",
    "parser raised TypeError on empty tokens list in src/parser.py",
    "tokens: expected list, got None (src/lexer.py)",
    "ValueError in config loader: missing field 'port'",
)
LOWEST_US: Final = 1
HIGHEST_US: Final = 10_000_000
SIGNIFICANT: Final = 3
PERCENTILES: Final = (50.0, 90.0, 99.0, 99.9)
DEFAULT_OUT: Final = Path(__file__).resolve().parent / "results"

log = logging.getLogger("bench.hits")


class BenchError(Exception):
    """The benchmark cannot go on (a reply was wrong or a part failed to start)."""


class Reply(msgspec.Struct):
    """The fields of a reply the client looks at (an echoed chat:start also fits)."""

    type: str
    id: int | str | None = None
    hit: bool = False
    elapsed_us: int = -1


_msgpack_encoder: Final = msgspec.msgpack.Encoder()
_json_encoder: Final = msgspec.json.Encoder()
_msgpack_decoder: Final = msgspec.msgpack.Decoder(Reply)
_json_decoder: Final = msgspec.json.Decoder(Reply)

RoundTrip = Callable[[int], Awaitable[None]]
Check = Callable[[Reply, int], None]


# -- histograms and results ---------------------------------------------------------------


def new_histogram() -> HdrHistogram:
    """An empty histogram of microseconds, 1 µs .. 10 s, 3 significant digits."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT)


@dataclass
class Series:
    """One measured series: its round trip, histogram and time spent measuring."""

    name: str
    trip: RoundTrip
    histogram: HdrHistogram = field(default_factory=new_histogram)
    elapsed_ns: int = 0
    cpu_ns: int = 0
    next_id: int = 1

    @property
    def count(self) -> int:
        """Round trips recorded so far."""
        return int(self.histogram.get_total_count())

    @property
    def throughput(self) -> float:
        """Recorded round trips per second of measuring time (closed loop, one connection)."""
        return self.count / (self.elapsed_ns / 1e9) if self.elapsed_ns else 0.0

    @property
    def cpu_us(self) -> float:
        """CPU time of this process (all threads) per recorded round trip, in µs."""
        return self.cpu_ns / 1000 / self.count if self.count else 0.0


def summary(
    name: str, histogram: HdrHistogram, throughput: float | None, cpu_us: float | None
) -> dict[str, Any]:
    """The raw figures of one histogram, in microseconds."""
    row: dict[str, Any] = {
        "series": name,
        "n": int(histogram.get_total_count()),
        "min_us": int(histogram.get_min_value()),
        "mean_us": round(float(histogram.get_mean_value()), 1),
        "stddev_us": round(float(histogram.get_stddev()), 1),
        "max_us": int(histogram.get_max_value()),
        "throughput_rps": None if throughput is None else round(throughput, 1),
        "cpu_us_per_request": None if cpu_us is None else round(cpu_us, 1),
    }
    for p in PERCENTILES:
        row[f"p{p:g}_us"] = int(histogram.get_value_at_percentile(p))
    return row


def add_ratios(rows: list[dict[str, Any]], floor: dict[str, Any]) -> None:
    """Give every row its p50 and p99 as multiples of the floor's."""
    for row in rows:
        row["p50_over_floor"] = round(row["p50_us"] / max(floor["p50_us"], 1), 2)
        row["p99_over_floor"] = round(row["p99_us"] / max(floor["p99_us"], 1), 2)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    header = (
        "| series | n | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs "
        "| p50/floor | p99/floor | req/s | CPU µs/req |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        rps = "-" if r["throughput_rps"] is None else f"{r['throughput_rps']:,.0f}"
        cpu = "-" if r["cpu_us_per_request"] is None else f"{r['cpu_us_per_request']:.0f}"
        lines.append(
            f"| {r['series']} | {r['n']} | {r['p50_us']} | {r['p90_us']} | {r['p99_us']} "
            f"| {r['p99.9_us']} | {r['max_us']} | {r['p50_over_floor']:.2f} "
            f"| {r['p99_over_floor']:.2f} | {rps} | {cpu} |"
        )
    return "\n".join(lines)


# -- machine ------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or the platform's idea of it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine(uvloop_version: str | None) -> dict[str, Any]:
    """What the run ran on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "uvloop": uvloop_version,
        "websockets": metadata.version("websockets"),
        "platform": platform.platform(),
    }


def machine_line(m: dict[str, Any]) -> str:
    """The machine as one Markdown line."""
    loop = f"uvloop {m['uvloop']}" if m["uvloop"] else "asyncio (no uvloop)"
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['python']}, event loop: {loop}, websockets {m['websockets']}"
    )


# -- round trips --------------------------------------------------------------------------


def chat_start(i: int) -> dict[str, Any]:
    """The chat:start message every series sends, with id ``i``."""
    return {"type": "chat:start", "id": i, "query": QUERY, "project": PROJECT}


def round_trip(ws: ClientConnection, binary: bool, check: Check) -> RoundTrip:
    """One request and its reply over ``ws``: MessagePack binary or JSON text frames."""
    encode = _msgpack_encoder.encode if binary else _json_encoder.encode
    decode = _msgpack_decoder.decode if binary else _json_decoder.decode
    text = not binary

    async def trip(i: int) -> None:
        await ws.send(encode(chat_start(i)), text=text)
        check(decode(await ws.recv(decode=False)), i)

    return trip


def check_echo(reply: Reply, i: int) -> None:
    """The floor's reply must be our own chat:start."""
    if reply.type != "chat:start" or reply.id != i:
        raise BenchError(f"echo server answered request {i} with {reply!r}")


def check_hit(server_us: HdrHistogram | None) -> Check:
    """A bridge reply must be the context for request ``i``, from the cache."""

    def check(reply: Reply, i: int) -> None:
        if reply.type != "context" or reply.id != i:
            raise BenchError(f"bridge answered chat:start {i} with {reply!r}")
        if not reply.hit:
            raise BenchError(
                f"chat:start {i} was a cache miss (hit=false): the cached context was "
                "dropped or expired during the run, so the hit series is not valid"
            )
        if server_us is not None:
            server_us.record_value(max(reply.elapsed_us, LOWEST_US))

    return check


async def measure(series: Series, count: int, *, record: bool = True) -> None:
    """``count`` closed-loop round trips of ``series``, recorded unless warming up."""
    clock, cpu_clock = time.perf_counter_ns, time.process_time_ns
    trip, histogram = series.trip, series.histogram
    first = series.next_id
    series.next_id += count
    async with asyncio.timeout(30.0 + 0.01 * count):  # a lost reply must not hang the run
        began, cpu_began = clock(), cpu_clock()
        for i in range(first, first + count):
            t0 = clock()
            await trip(i)
            if record:
                histogram.record_value(max((clock() - t0 + 500) // 1000, LOWEST_US))
        if record:
            series.elapsed_ns += clock() - began
            series.cpu_ns += cpu_clock() - cpu_began


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


# -- servers ------------------------------------------------------------------------------


async def echo(ws: ServerConnection) -> None:
    """Send every frame back as it came (binary stays binary)."""
    with contextlib.suppress(ConnectionClosed):  # an aborted run closes with 1011
        async for frame in ws:
            await ws.send(frame)


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[str]:
    """A bare websockets echo server on 127.0.0.1; yields its URL."""
    server: WsServer = await serve(echo, "127.0.0.1", 0, compression=None)
    try:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/"
    finally:
        server.close()
        await server.wait_closed()


@contextlib.contextmanager
def statsd_sink() -> Iterator[int]:
    """A bound UDP socket nobody reads, so DogStatsD datagrams go somewhere harmless."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        yield sink.getsockname()[1]


@contextlib.asynccontextmanager
async def running_bridge(data_dir: Path, statsd_port: int) -> AsyncIterator[App]:
    """The real bridge with its own embedded valkey-server; stopped on the way out."""
    app = App(
        Config(
            port=0,
            data_dir=data_dir,
            valkey_url=None,
            statsd_host="127.0.0.1",
            statsd_port=statsd_port,
        )
    )
    try:
        await app.start()
        yield app
    finally:
        await app.stop()


async def request(ws: ClientConnection, message: dict[str, Any]) -> dict[str, Any]:
    """Send one MessagePack message and return the decoded reply."""
    await ws.send(_msgpack_encoder.encode(message))
    async with asyncio.timeout(10.0):
        reply: dict[str, Any] = msgspec.msgpack.decode(await ws.recv(decode=False))
    return reply


async def seed(ws: ClientConnection, timeout: float = 10.0) -> None:
    """Store the episodes, then ask until the query is a cache hit (the first one misses)."""
    for n, text in enumerate(EPISODES):
        ack = await request(ws, {"type": "error", "id": f"e{n}", "message": text})
        if ack.get("type") != "ack" or not ack.get("ok"):
            raise BenchError(f"storing an episode failed: {ack!r}")
    deadline = time.monotonic() + timeout
    first = await request(ws, chat_start(0))
    if first.get("hit"):
        raise BenchError("the first chat:start was already a hit: the data dir is not fresh")
    if not first.get("inject"):
        log.warning("the miss found no memory context; hits will serve an empty context")
    while not (await request(ws, chat_start(0))).get("hit"):
        if time.monotonic() > deadline:
            raise BenchError(f"chat:start was still a miss {timeout} s after the first one")
        await asyncio.sleep(0.05)


# -- the run ------------------------------------------------------------------------------


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal counts."""
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


async def warm_up(series: list[Series], warmup: int) -> None:
    """``warmup`` unrecorded round trips of every series."""
    for s in series:
        await measure(s, warmup, record=False)


async def run_rounds(series: list[Series], requests: int, rounds: int) -> None:
    """Measure the series interleaved, rotating their order each round."""
    for r, count in enumerate(split(requests, rounds)):
        order = series[r % len(series) :] + series[: r % len(series)]
        for s in order:
            gc.collect()
            await measure(s, count)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Start the floor and the bridge, measure every series, stop everything."""
    server_us = new_histogram()
    async with contextlib.AsyncExitStack() as stack:
        floor_url = await stack.enter_async_context(echo_server())
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-hits-")))
        statsd_port = stack.enter_context(statsd_sink())
        app = await stack.enter_async_context(running_bridge(data_dir, statsd_port))
        assert app.server is not None and app.valkey is not None and app.cache is not None
        bridge_url = f"ws://127.0.0.1:{app.server.port}/{PROJECT}"

        async def client(url: str) -> ClientConnection:
            return await stack.enter_async_context(connect(url, compression=None))

        floor_ws, msgpack_ws, json_ws = (
            await client(floor_url),
            await client(bridge_url),
            await client(bridge_url),
        )
        await seed(msgpack_ws)
        valkey = redis.Redis.from_url(app.valkey.url)
        stack.push_async_callback(valkey.aclose)
        keys = [app.cache.context_key(PROJECT, QUERY), app.cache.epoch_key(PROJECT)]
        cache = ContextCache.from_url(app.valkey.url, prefix=app.config.cache_prefix)
        stack.push_async_callback(cache.close)

        series = [
            Series("floor (echo, msgpack)", round_trip(floor_ws, True, check_echo)),
            Series("bridge hit, msgpack", round_trip(msgpack_ws, True, check_hit(server_us))),
            Series("bridge hit, json", round_trip(json_ws, False, check_hit(None))),
            Series("ContextCache.lookup (bridge's client)", lookup_trip(cache)),
            Series("valkey MGET, redis-py defaults", valkey_trip(valkey, keys)),
            Series(
                "valkey MGET, raw RESP", await raw_valkey_trip(stack, app.valkey.socket_path, keys)
            ),
        ]
        await warm_up(series, args.warmup)
        server_us.reset()  # the handler's own times, without the warm-up's
        await run_rounds(series, args.requests, args.rounds)

    rows = [summary(s.name, s.histogram, s.throughput, s.cpu_us) for s in series[:3]]
    handler = summary("handler elapsed_us (server-reported, msgpack)", server_us, None, None)
    components = [handler] + [
        summary(s.name, s.histogram, s.throughput, s.cpu_us) for s in series[3:]
    ]
    add_ratios(rows + components, rows[0])
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
    (out / "hits.json").write_text(json.dumps(results, indent=2) + "\n")
    return text


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


def run_loop(main: Coroutine[Any, Any, dict[str, Any]], use_uvloop: bool) -> tuple[Any, str | None]:
    """Run ``main`` on uvloop when asked and importable; return its result and uvloop's version."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main), metadata.version("uvloop")
    return asyncio.run(main), None


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
