"""What every benchmark here shares: histograms, the machine line, the floor, the bridge.

Times are recorded in microseconds in HdrHistograms (1 µs .. 10 s, 3 significant digits).
A *series* is one measured kind of request; its ``run`` sends ``count`` requests with ids
``first .. first + count - 1`` and records each round trip, while ``measure`` accounts for
the wall and CPU time the batch took. The *floor* is a bare ``websockets`` echo server on
the same loop: what no WebSocket server on this machine can beat, so every bridge figure
is also given as a ratio to a floor measured in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import platform
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import msgspec
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from bench.process import BenchError as BenchError  # re-exported: one error for every part
from bench.process import Reply as Reply
from bridge.config import Config, MetricsConfig, ServerConfig, with_changes
from bridge.memory.base import MemoryBackend
from bridge.runtime.app import App

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
DEFAULT_OUT: Final = Path(__file__).resolve().parent / "results"

log = logging.getLogger("bench")


msgpack_encoder: Final = msgspec.msgpack.Encoder()
json_encoder: Final = msgspec.json.Encoder()
msgpack_decoder: Final = msgspec.msgpack.Decoder(Reply)
json_decoder: Final = msgspec.json.Decoder(Reply)

RoundTrip = Callable[[int], Awaitable[None]]
Check = Callable[[Reply, int], None]


# -- histograms and results ---------------------------------------------------------------


def new_histogram() -> HdrHistogram:
    """An empty histogram of microseconds, 1 µs .. 10 s, 3 significant digits."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT)


def record_ns(histogram: HdrHistogram, ns: int) -> None:
    """Record a duration given in nanoseconds, rounded to µs (at least 1 µs)."""
    histogram.record_value(min(max((ns + 500) // 1000, LOWEST_US), HIGHEST_US))


Runner = Callable[["Series", int, int, bool], Awaitable[None]]


@dataclass
class Series:
    """One measured series: how to run a batch of it, its histogram and time spent."""

    name: str
    run: Runner
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
        """Recorded round trips per second of measuring time."""
        return self.count / (self.elapsed_ns / 1e9) if self.elapsed_ns else 0.0

    @property
    def cpu_us(self) -> float:
        """CPU time of this process (all threads) per recorded round trip, in µs."""
        return self.cpu_ns / 1000 / self.count if self.count else 0.0


def closed_loop(trip: RoundTrip) -> Runner:
    """A runner that does one round trip at a time (send, wait for the reply, repeat)."""

    async def run(series: Series, first: int, count: int, record: bool) -> None:
        clock, histogram = time.perf_counter_ns, series.histogram
        for i in range(first, first + count):
            t0 = clock()
            await trip(i)
            if record:
                record_ns(histogram, clock() - t0)

    return run


def fmt_us(us: float) -> str:
    """A latency for a table cell: ``42 µs``, ``1.25 ms``, ``31.2 ms``, ``250 ms``."""
    if us < 1000:
        return f"{us:.0f} µs"
    ms = us / 1000
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 100:
        return f"{ms:.1f} ms"
    return f"{ms:,.0f} ms"


def fmt_ratio(x: float) -> str:
    """A multiple: ``1.38x`` below 10, ``412x`` above."""
    return f"{x:.2f}x" if x < 10 else f"{x:,.0f}x"


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
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "uvloop": uvloop_version,
        "websockets": metadata.version("websockets"),
        "platform": platform.platform(),
        "load_average": None if load is None else [round(x, 2) for x in load],
    }


def machine_line(m: dict[str, Any]) -> str:
    """The machine as one Markdown line."""
    loop = f"uvloop {m['uvloop']}" if m["uvloop"] else "asyncio (no uvloop)"
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['python']}, event loop: {loop}, websockets {m['websockets']}"
    )


# -- round trips --------------------------------------------------------------------------


def chat_start(i: int, query: str = QUERY) -> dict[str, Any]:
    """A chat:start message with id ``i`` (the hit benchmarks' query by default)."""
    return {"type": "chat:start", "id": i, "query": query, "project": PROJECT}


def round_trip(
    ws: ClientConnection,
    binary: bool,
    check: Check,
    message: Callable[[int], dict[str, Any]] = chat_start,
) -> RoundTrip:
    """One request and its reply over ``ws``: MessagePack binary or JSON text frames."""
    encode = msgpack_encoder.encode if binary else json_encoder.encode
    decode = msgpack_decoder.decode if binary else json_decoder.decode
    text = not binary

    async def trip(i: int) -> None:
        await ws.send(encode(message(i)), text=text)
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


async def measure(
    series: Series, count: int, *, record: bool = True, timeout: float | None = None
) -> None:
    """``count`` requests of ``series``, recorded (with wall and CPU time) unless warming up.

    A lost reply must not hang the run: past ``timeout`` seconds (by default 30 s and
    10 ms a request) the batch fails with TimeoutError.
    """
    clock, cpu_clock = time.perf_counter_ns, time.process_time_ns
    first = series.next_id
    series.next_id += count
    async with asyncio.timeout(timeout or 30.0 + 0.01 * count):
        began, cpu_began = clock(), cpu_clock()
        await series.run(series, first, count, record)
        if record:
            series.elapsed_ns += clock() - began
            series.cpu_ns += cpu_clock() - cpu_began


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal counts."""
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


async def warm_up(series: list[Series], warmup: int) -> None:
    """``warmup`` unrecorded requests of every series."""
    for s in series:
        await measure(s, warmup, record=False)


async def run_rounds(series: list[Series], requests: int, rounds: int) -> None:
    """Measure the series interleaved, rotating their order each round."""
    for r, count in enumerate(split(requests, rounds)):
        order = series[r % len(series) :] + series[: r % len(series)]
        for s in order:
            gc.collect()
            await measure(s, count)


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


def bridge_config(data_dir: Path, statsd_port: int, **changes: Any) -> Config:
    """A Config for a bridge on a free loopback port with its own embedded valkey-server,
    with ``changes`` per section (``bridge.config.with_changes``)."""
    config = Config(
        data_dir=data_dir,
        server=ServerConfig(port=0),
        metrics=MetricsConfig(host="127.0.0.1", port=statsd_port),
    )
    return with_changes(config, **changes)


@contextlib.asynccontextmanager
async def running_bridge(config: Config, memory: MemoryBackend | None = None) -> AsyncIterator[App]:
    """The real bridge (``bridge.runtime.app.App``) for ``config``; stopped on the way out."""
    app = App(config, memory=memory)
    try:
        await app.start()
        yield app
    finally:
        await app.stop()


def bridge_url(app: App, project: str = PROJECT) -> str:
    """The WebSocket URL of a started bridge, for ``project``."""
    assert app.server is not None, "the bridge has not started"
    return f"ws://127.0.0.1:{app.server.port}/{project}"


async def request(
    ws: ClientConnection, message: dict[str, Any], timeout: float = 10.0
) -> dict[str, Any]:
    """Send one MessagePack message and return the decoded reply."""
    await ws.send(msgpack_encoder.encode(message))
    async with asyncio.timeout(timeout):
        reply: dict[str, Any] = msgspec.msgpack.decode(await ws.recv(decode=False))
    return reply


async def until_hit(
    ws: ClientConnection, message: dict[str, Any], timeout: float = 10.0, local: int = 3
) -> None:
    """Ask until ``message`` (a chat:start) has been a hit ``local`` times in a row.

    The first hit after a miss reads Valkey and copies the context into the bridge's
    in-process cache; the ones after it are served from that copy.
    """
    deadline = time.monotonic() + timeout
    streak = 0
    while streak < local:
        reply = await request(ws, message)
        streak = streak + 1 if reply.get("hit") else 0
        if streak == 0:
            if time.monotonic() > deadline:
                raise BenchError(f"{message['query']!r} was still a miss after {timeout} s")
            await asyncio.sleep(0.01)


async def seed(ws: ClientConnection, timeout: float = 10.0) -> None:
    """Store the episodes, then ask until the query is a cache hit (the first one misses)."""
    for n, text in enumerate(EPISODES):
        ack = await request(ws, {"type": "error", "id": f"e{n}", "message": text})
        if ack.get("type") != "ack" or not ack.get("ok"):
            raise BenchError(f"storing an episode failed: {ack!r}")
    first = await request(ws, chat_start(0))
    if first.get("hit"):
        raise BenchError("the first chat:start was already a hit: the data dir is not fresh")
    if not first.get("inject"):
        log.warning("the miss found no memory context; hits will serve an empty context")
    await until_hit(ws, chat_start(0), timeout)


# -- event loop ---------------------------------------------------------------------------


def run_loop(main: Coroutine[Any, Any, Any], use_uvloop: bool) -> tuple[Any, str | None]:
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
