"""The series of ``python -m bench``, one coroutine per section.

Every section starts what it needs (a bridge with its own embedded valkey-server and a
temporary data dir, a FalkorDB, a Valkey for the original plugin) and stops it before the
next section starts, so sections do not disturb each other. Client and servers share one
process and one event loop (like ``bench.hits``): a ratio to the floor is the bridge's
own work, and a throughput is what one core serves while also running the client.

Rows are dicts from ``common.summary`` plus the floor they are compared with, the panel
of the plot they belong in, and the encoded HdrHistogram.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import redis.asyncio as redis
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
from websockets.asyncio.client import ClientConnection, connect

from bench.common import (
    PROJECT,
    BenchError,
    Reply,
    Runner,
    Series,
    add_ratios,
    bridge_config,
    bridge_url,
    chat_start,
    check_echo,
    check_hit,
    closed_loop,
    fmt_ratio,
    fmt_us,
    measure,
    new_histogram,
    record_ns,
    round_trip,
    run_rounds,
    running_bridge,
    seed,
    summary,
    until_hit,
    warm_up,
)
from bench.load import Mux, fan_out, pipelined
from bench.original import OriginalPlugin
from bench.workload import (
    WORKING_SET,
    corpus,
    hot_path,
    hot_query,
    install_memory_manager,
    miss_query,
)
from bridge.embedded import EmbeddedValkey
from bridge.episode import Episode
from bridge.memory.base import MemoryBackend, Recall
from bridge.memory.sqlite import SqliteMemory

FAST: Final = "fast"  # plot panel of sub-millisecond series
SLOW: Final = "slow"  # plot panel of series that reach memory
UNLIMITED: Final = {"rate_limit": 1e9, "rate_burst": 10**9}


@dataclass(frozen=True)
class Params:
    """How much of everything a run does."""

    warmup: int
    hits: int
    rounds: int
    window: int
    pipelined: int
    connections: int
    fan_out: int
    prefill: int
    misses: dict[str, int]
    writes: int
    mixed: int
    original: int
    hol_hits: int
    hol_delay_ms: float
    hol_in_flight: int
    hol_script_hits: int
    hol_script_in_flight: int
    idle_connections: int


FULL: Final = Params(
    warmup=1000,
    hits=20_000,
    rounds=4,
    window=64,
    pipelined=40_000,
    connections=50,
    fan_out=40_000,
    prefill=1000,
    misses={"sqlite": 2000, "graphiti": 500, "script": 100},
    writes=1000,
    mixed=5000,
    original=50,
    hol_hits=10_000,
    hol_delay_ms=50.0,
    hol_in_flight=8,
    hol_script_hits=1500,
    hol_script_in_flight=2,
    idle_connections=1000,
)
QUICK: Final = Params(
    warmup=200,
    hits=2000,
    rounds=2,
    window=64,
    pipelined=4000,
    connections=50,
    fan_out=4000,
    prefill=1000,
    misses={"sqlite": 200, "graphiti": 50, "script": 15},
    writes=100,
    mixed=600,
    original=10,
    hol_hits=1000,
    hol_delay_ms=50.0,
    hol_in_flight=8,
    hol_script_hits=300,
    hol_script_in_flight=2,
    idle_connections=1000,
)


@dataclass
class Section:
    """One section of the report: a title, rows, notes and figures that are not rows."""

    key: str
    title: str
    intro: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """What sections share: parameters, the floor, the DogStatsD sink, the histograms."""

    params: Params
    floor_url: str
    statsd_port: int
    histograms: dict[str, HdrHistogram] = field(default_factory=dict)
    floor: dict[str, Any] | None = None

    def row(
        self,
        name: str,
        histogram: HdrHistogram,
        *,
        throughput: float | None = None,
        cpu_us: float | None = None,
        floor: dict[str, Any] | None = None,
        panel: str = FAST,
        is_floor: bool = False,
    ) -> dict[str, Any]:
        """A report row for ``histogram``, with ratios to ``floor`` (default: the run's
        closed-loop floor; a floor row is its own reference)."""
        row = summary(name, histogram, throughput, cpu_us)
        reference = row if is_floor else floor or self.floor
        if reference is None:
            raise BenchError(f"{name}: no floor measured to compare with")
        add_ratios([row], reference)
        row["panel"] = panel
        row["hdr"] = histogram.encode().decode()
        self.histograms[name] = histogram
        return row

    def series_row(
        self,
        series: Series,
        *,
        floor: dict[str, Any] | None = None,
        panel: str = FAST,
        is_floor: bool = False,
    ) -> dict[str, Any]:
        """A report row for a measured series."""
        return self.row(
            series.name,
            series.histogram,
            throughput=series.throughput,
            cpu_us=series.cpu_us,
            floor=floor,
            panel=panel,
            is_floor=is_floor,
        )


@contextlib.asynccontextmanager
async def clients(url: str, count: int) -> AsyncIterator[list[ClientConnection]]:
    """``count`` WebSocket connections to ``url``, closed on the way out."""
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(connect(url, compression=None, max_queue=None))
            for _ in range(count)
        ]


@contextlib.asynccontextmanager
async def bridge(run: Run, prefix: str, **overrides: Any) -> AsyncIterator[Any]:
    """A bridge on a fresh data dir, no rate limit, settings ``overrides``; the App."""
    memory: MemoryBackend | None = overrides.pop("memory_backend", None)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        data_dir = Path(tmp) / "data"
        for key, make in list(overrides.items()):
            if callable(make):  # needs the data dir, e.g. a script or a slow backend
                overrides[key] = make(data_dir)
        if callable(memory):
            memory = memory(data_dir)
        config = bridge_config(data_dir, run.statsd_port, **{**UNLIMITED, **overrides})
        async with running_bridge(config, memory) as app:
            yield app


async def prefill(memory: MemoryBackend, episodes: list[Episode], at_once: int = 32) -> None:
    """Store ``episodes`` in ``memory`` directly, ``at_once`` at a time."""
    for start in range(0, len(episodes), at_once):
        await asyncio.gather(*(memory.store(e) for e in episodes[start : start + at_once]))


@dataclass
class MissCheck:
    """Checks that a reply is a miss (``hit: false``), counts the ones with a context and
    keeps the handler time the bridge reports (``elapsed_us``)."""

    found: int = 0
    seen: int = 0
    server_us: HdrHistogram = field(default_factory=new_histogram)

    def __call__(self, reply: Reply, i: int) -> None:
        if reply.type != "context" or reply.id != i:
            raise BenchError(f"bridge answered chat:start {i} with {reply!r}")
        if reply.hit:
            raise BenchError(f"the unique query of chat:start {i} was a cache hit")
        self.seen += 1
        self.found += reply.inject is not None
        self.server_us.record_value(max(1, reply.elapsed_us))

    @property
    def share(self) -> str:
        """The share of misses that came back with a memory context, in words."""
        return f"{self.found}/{self.seen} misses came back with a memory context"


def check_ack(reply: Reply, i: int) -> None:
    """A reply must be the ok ack of request ``i``, stored in memory (not the outbox)."""
    if reply.type != "ack" or reply.id != i or not reply.ok or reply.queued:
        raise BenchError(f"bridge answered request {i} with {reply!r}")


def miss_message(i: int) -> dict[str, Any]:
    """A chat:start no earlier request asked."""
    return chat_start(i, miss_query(i))


def write_message(i: int) -> dict[str, Any]:
    """A file:write of a file nobody asked about."""
    return {"type": "file:write", "id": i, "path": f"src/generated/file{i}.py", "project": PROJECT}


# -- 1-3: hits --------------------------------------------------------------------------


async def hits(run: Run) -> Section:
    """Cache hits: closed loop, ``window`` in flight, many connections; each with a floor."""
    p = run.params
    section = Section(
        "hits",
        "chat:start cache hits",
        f"Closed systems throughout (a request goes out only when an earlier one was "
        f"answered), so no coordinated-omission correction applies. Each bridge row is "
        f"measured interleaved with its floor in {p.rounds} rounds after {p.warmup} warm-up "
        f"requests, and its ratios are to that floor: the bare echo server under the same "
        f"load shape. Client and server share one core's event loop.",
    )
    async with contextlib.AsyncExitStack() as stack:
        app = await stack.enter_async_context(bridge(run, "bench-hits-"))
        url = bridge_url(app)
        floor_one, floor_pipe = await stack.enter_async_context(clients(run.floor_url, 2))
        hit_one, hit_pipe = await stack.enter_async_context(clients(url, 2))
        floor_many = await stack.enter_async_context(clients(run.floor_url, p.connections))
        hit_many = await stack.enter_async_context(clients(url, p.connections))
        await seed(hit_one)
        server_us = new_histogram()
        one = [
            Series(
                "floor: echo, closed loop, 1 connection",
                closed_loop(round_trip(floor_one, True, check_echo)),
            ),
            Series(
                "hit: closed loop, 1 connection",
                closed_loop(round_trip(hit_one, True, check_hit(server_us))),
            ),
        ]
        piped = [
            Series(
                f"floor: echo, {p.window} in flight, 1 connection",
                pipelined(floor_pipe, chat_start, check_echo, p.window),
            ),
            Series(
                f"hit: {p.window} in flight, 1 connection",
                pipelined(hit_pipe, chat_start, check_hit(None), p.window),
            ),
        ]
        many = [
            Series(
                f"floor: echo, {p.connections} connections x 1 in flight",
                fan_out([round_trip(ws, True, check_echo) for ws in floor_many]),
            ),
            Series(
                f"hit: {p.connections} connections x 1 in flight",
                fan_out([round_trip(ws, True, check_hit(None)) for ws in hit_many]),
            ),
        ]
        await warm_up(one + piped + many, p.warmup)
        server_us.reset()
        await run_rounds(one, p.hits, p.rounds)
        await run_rounds(piped, p.pipelined, p.rounds)
        await run_rounds(many, p.fan_out, p.rounds)
    for floor, measured in (one, piped, many):
        floor_row = run.series_row(floor, is_floor=True)
        if run.floor is None:
            run.floor = floor_row  # the closed-loop floor: the reference of later sections
        section.rows += [floor_row, run.series_row(measured, floor=floor_row)]
    hit, piped_hit, many_hit = section.rows[1], section.rows[3], section.rows[5]
    section.figures = {
        "hit_p50_over_floor": hit["p50_over_floor"],
        "hit_p99_over_floor": hit["p99_over_floor"],
        "window": p.window,
        "pipelined_rps": piped_hit["throughput_rps"],
        "connections": p.connections,
        "fan_out_rps": many_hit["throughput_rps"],
    }
    handler = summary("hit: handler time (elapsed_us)", server_us, None, None)
    section.notes.append(
        f"The bridge's own handler time for the closed-loop hits (`elapsed_us` in its "
        f"replies): p50 {handler['p50_us']} µs, p99 {handler['p99_us']} µs; the rest of a "
        "hit's round trip is WebSocket framing, the event loop and the kernel, which the "
        "floor pays too."
    )
    return section


# -- 4: misses per backend --------------------------------------------------------------


def memory_manager_for(episodes: list[Episode]) -> Any:
    """A factory installing memory_manager.py with ``episodes`` under a data dir."""

    def make(data_dir: Path) -> Path:
        return install_memory_manager(data_dir.parent / "graphiti", episodes)

    return make


async def misses(run: Run) -> Section:
    """chat:start misses on each backend, memory pre-filled, waiting for memory."""
    p = run.params
    section = Section(
        "misses",
        "chat:start misses per backend",
        f"Every query is new (so it misses the cache) and shares words with a corpus of "
        f"{p.prefill} episodes stored beforehand; the miss budget is 10 s, so every reply "
        f"waits for memory and carries what it found. Closed loop, one connection. A miss "
        f"is a Valkey lookup, the memory query, and storing the context in Valkey.",
    )
    episodes = corpus(p.prefill)
    settings: dict[str, dict[str, Any]] = {
        "sqlite": {},
        "graphiti": {"llm": "off"},
        "script": {
            "memory_script": memory_manager_for(episodes),
            "memory_script_python": sys.executable,
        },
    }
    labels = {
        "sqlite": "embedded SQLite, in-memory recall index",
        "graphiti": "graphiti-core on an embedded FalkorDB, no LLM",
        "script": "memory_manager.py, one process per query",
    }
    for backend, count in p.misses.items():
        overrides = {"memory": backend, "miss_budget_ms": 10_000.0, **settings[backend]}
        async with bridge(run, f"bench-miss-{backend}-", **overrides) as app:
            began = time.perf_counter()
            if backend != "script":  # the script's episodes were written with it
                await prefill(app.memory, episodes)
            filled = time.perf_counter() - began
            checker = MissCheck()
            async with clients(bridge_url(app), 1) as (ws,):
                series = Series(
                    f"miss: {backend} ({labels[backend]})",
                    closed_loop(round_trip(ws, True, checker, miss_message)),
                )
                await measure(series, max(3, min(50, count // 10)), record=False)
                checker.server_us.reset()
                await measure(series, count, timeout=60.0 + 0.5 * count)
        section.rows.append(run.series_row(series, panel=SLOW))
        section.figures[f"{backend}_p50_us"] = section.rows[-1]["p50_us"]
        section.figures[f"{backend}_p99_us"] = section.rows[-1]["p99_us"]
        how = "stored through the backend" if backend != "script" else "written as JSON lines"
        server = checker.server_us
        section.notes.append(
            f"{backend}: {p.prefill} episodes {how} in {filled:.1f} s; {checker.share}; "
            f"the bridge's own time per miss (`elapsed_us`): p50 "
            f"{fmt_us(server.get_value_at_percentile(50))}, p99 "
            f"{fmt_us(server.get_value_at_percentile(99))}."
        )
    section.notes.append(
        f"The script backend starts `{Path(sys.executable).name} memory_manager.py` (this "
        "venv's interpreter) for every query. The original plugin's section runs the same "
        "script with no bridge around it: the difference is the bridge's event loop "
        "stalling on each spawn (see the head-of-line section)."
    )
    return section


# -- 5: file:write acks and a mixed trace -----------------------------------------------


async def writes(run: Run) -> Section:
    """file:write acks, then a mixed trace of hits, misses and writes on one connection."""
    p = run.params
    section = Section(
        "writes",
        "file:write acks and a mixed trace (default backend: SQLite)",
        f"The bridge's default backend, pre-filled with {p.prefill} episodes. A file:write "
        "is acknowledged once its episode is committed (fsync) and the cached contexts "
        "naming the path are dropped. The mixed trace is a closed loop on one connection: "
        f"90% chat:starts over a working set of {WORKING_SET} queries (each names a file), "
        "5% chat:starts never asked before, 5% file:writes of working-set files, which drop "
        "the contexts that name them; the next ask of a dropped query misses and refills.",
    )
    async with bridge(run, "bench-writes-", miss_budget_ms=10_000.0) as app:
        await prefill(app.memory, corpus(p.prefill))
        async with clients(bridge_url(app), 2) as (ws, trace_ws):
            series = Series(
                "file:write ack (SQLite commit + invalidation)",
                closed_loop(round_trip(ws, True, check_ack, write_message)),
            )
            await measure(series, max(10, p.writes // 10), record=False)
            await measure(series, p.writes, timeout=60.0 + 0.1 * p.writes)
            section.rows.append(run.series_row(series, panel=SLOW))
            for k in range(WORKING_SET):
                await until_hit(ws, chat_start(0, hot_query(k)))
            kinds, counts = await mixed_trace(trace_ws, p.mixed)
    for name, histogram in kinds.items():
        if histogram.get_total_count():
            section.rows.append(run.row(name, histogram, panel=SLOW))
    section.notes.append(
        "Mixed trace: "
        + ", ".join(f"{n} {kind}" for kind, n in counts.items())
        + f" in {sum(counts.values())} requests."
    )
    return section


async def mixed_trace(
    ws: ClientConnection, count: int
) -> tuple[dict[str, HdrHistogram], dict[str, int]]:
    """Run the mixed trace; histograms by kind of request and outcome, and op counts."""
    rng = random.Random(20261124)
    kinds = {
        "mixed: chat:start, working set, hit": new_histogram(),
        "mixed: chat:start, working set, refill after a write": new_histogram(),
        "mixed: chat:start, new query (miss)": new_histogram(),
        "mixed: file:write of a working-set file": new_histogram(),
    }
    hit, refill, miss, write = kinds.values()
    counts = {"working-set chat:starts": 0, "new-query chat:starts": 0, "file:writes": 0}
    async with Mux(ws) as mux:
        for _ in range(count):
            i, draw, k = mux.new_id(), rng.random(), rng.randrange(WORKING_SET)
            if draw < 0.90:
                reply, ns = await mux.call(chat_start(i, hot_query(k)))
                if reply.type != "context":
                    raise BenchError(f"mixed trace: {reply!r}")
                record_ns(hit if reply.hit else refill, ns)
                counts["working-set chat:starts"] += 1
            elif draw < 0.95:
                reply, ns = await mux.call(miss_message(i))
                MissCheck()(reply, i)
                record_ns(miss, ns)
                counts["new-query chat:starts"] += 1
            else:
                message = {"type": "file:write", "id": i, "path": hot_path(k)}
                reply, ns = await mux.call(message | {"project": PROJECT})
                check_ack(reply, i)
                record_ns(write, ns)
                counts["file:writes"] += 1
    return kinds, counts


# -- 6: the original plugin's path ------------------------------------------------------


async def original(run: Run, sqlite_miss: dict[str, Any] | None) -> Section:
    """The seed design's subprocess-per-call path, with the same memory_manager.py."""
    p = run.params
    section = Section(
        "original",
        "The original plugin's path (seed design)",
        f"What the seed plugin did per event, reproduced with the same memory_manager.py and "
        f"{p.prefill} stored episodes: a chat:start miss is a Valkey GET, one `python3 "
        "memory_manager.py query <text>` subprocess (asyncio.create_subprocess_exec, as "
        "bun's `$`) and a SETEX; a file:write is one `memory_manager.py store` subprocess "
        "and a SCAN/DEL of `memory:*<path>*`. No WebSocket hop (the plugin ran in "
        "OpenCode's process), which favours this side. Closed loop.",
    )
    async with contextlib.AsyncExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-orig-")))
        valkey = EmbeddedValkey()
        stack.push_async_callback(valkey.close)
        await valkey.start()
        client = redis.Redis.from_url(valkey.url)
        stack.push_async_callback(client.aclose)
        script = install_memory_manager(folder / "graphiti", corpus(p.prefill))
        plugin = OriginalPlugin(script, sys.executable, client)

        async def query(i: int) -> None:
            misses = plugin.misses
            context = await plugin.chat_start(miss_query(i))
            if plugin.misses != misses + 1 or '"body"' not in context:
                raise BenchError(f"original plugin: query {i} did not miss or found nothing")

        async def store(i: int) -> None:
            await plugin.file_write(f"src/generated/file{i}.py")

        async def import_graphiti(i: int) -> None:
            await plugin.run_python("import graphiti_core")

        asks = Series("original: chat:start miss (subprocess query)", closed_loop(query))
        stores = Series("original: file:write (subprocess store)", closed_loop(store))
        graphiti = Series(
            "original, lower bound with Graphiti: `python3 -c 'import graphiti_core'`",
            closed_loop(import_graphiti),
        )
        timeout = 60.0 + 2.0 * p.original
        for series, count in ((asks, p.original), (stores, p.original), (graphiti, 5)):
            await measure(series, 2, record=False)
            await measure(series, count, timeout=timeout)
    asks_row = run.series_row(asks, panel=SLOW)
    section.rows += [asks_row, run.series_row(stores, panel=SLOW)]
    section.rows.append(run.series_row(graphiti, panel=SLOW))
    section.notes.append(
        "The seed's memory_manager.py was a Graphiti memory manager: one that imports "
        "graphiti-core (and then connects to its graph database) pays at least the last "
        "row on every call. The JSON-lines script above is a lower bound for the seed."
    )
    if sqlite_miss is not None:
        p50 = asks_row["p50_us"] / max(sqlite_miss["p50_us"], 1)
        p99 = asks_row["p99_us"] / max(sqlite_miss["p99_us"], 1)
        section.figures["over_sqlite_miss"] = {"p50": round(p50, 1), "p99": round(p99, 1)}
        heavy = section.rows[-1]["p50_us"] / max(sqlite_miss["p50_us"], 1)
        section.figures["graphiti_import_over_sqlite_miss_p50"] = round(heavy, 1)
        section.notes.append(
            f"Original chat:start miss over the bridge's SQLite miss (misses section): "
            f"{fmt_ratio(p50)} at p50, {fmt_ratio(p99)} at p99."
        )
    return section


# -- 7: head-of-line blocking -----------------------------------------------------------


class SlowSqliteMemory(SqliteMemory):
    """The embedded store with every recall made ``delay`` seconds slower."""

    def __init__(self, path: Path, delay: float) -> None:
        super().__init__(path)
        self.delay = delay

    async def recall(self, group_id: str, query: str, limit: int) -> Recall:
        """Wait ``delay``, then recall as the embedded store does."""
        await asyncio.sleep(self.delay)
        return await super().recall(group_id, query, limit)


@dataclass
class Crowd:
    """How many slow misses were outstanding when each hit was sent."""

    samples: int = 0
    total: int = 0
    least: int | None = None

    def add(self, outstanding: int) -> None:
        """Note one hit's view of the misses in flight."""
        self.samples += 1
        self.total += outstanding
        self.least = outstanding if self.least is None else min(self.least, outstanding)

    @property
    def mean(self) -> float:
        """Misses in flight per hit, on average."""
        return self.total / self.samples if self.samples else 0.0


def mux_hits(mux: Mux, crowd: Crowd | None = None) -> Runner:
    """Closed-loop hits over a shared connection, noting the requests outstanding."""
    check = check_hit(None)

    async def run(series: Series, first: int, count: int, record: bool) -> None:
        for _ in range(count):
            i = mux.new_id()
            if crowd is not None and record:
                crowd.add(mux.outstanding)
            reply, ns = await mux.call(chat_start(i))
            check(reply, i)
            if record:
                record_ns(series.histogram, ns)

    return run


def with_slow_misses(mux: Mux, hits: Runner, in_flight: int, misses: HdrHistogram) -> Runner:
    """``hits``, while ``in_flight`` slow misses stay outstanding on the same connection."""
    checker = MissCheck()

    async def run(series: Series, first: int, count: int, record: bool) -> None:
        done = asyncio.Event()

        async def keep_one_in_flight() -> None:
            while not done.is_set():
                i = mux.new_id()
                reply, ns = await mux.call(miss_message(i))
                checker(reply, i)
                if record:
                    record_ns(misses, ns)

        workers = [asyncio.create_task(keep_one_in_flight()) for _ in range(in_flight)]
        try:
            await asyncio.sleep(0)  # the misses go out first
            await hits(series, first, count, record)
        finally:
            done.set()
            await asyncio.gather(*workers)

    return run


@dataclass
class Crowded:
    """One head-of-line experiment: hits alone, hits beside misses, and those misses."""

    alone: dict[str, Any]
    crowded: dict[str, Any]
    misses: dict[str, Any]
    crowd: Crowd

    def figures(self) -> dict[str, Any]:
        """The comparison of hits beside misses with hits alone."""
        return {
            "p50_with_over_alone": round(self.crowded["p50_us"] / max(self.alone["p50_us"], 1), 2),
            "p99_with_over_alone": round(self.crowded["p99_us"] / max(self.alone["p99_us"], 1), 2),
            "max_alone_us": self.alone["max_us"],
            "max_with_us": self.crowded["max_us"],
            "misses_in_flight_mean": round(self.crowd.mean, 2),
            "misses_in_flight_min": self.crowd.least,
        }


async def crowded_hits(
    run: Run, label: str, in_flight: int, hits: int, **overrides: Any
) -> Crowded:
    """Hits alone and beside ``in_flight`` misses on one connection of a bridge set up
    with ``overrides``, interleaved in rounds."""
    p = run.params
    miss_us = new_histogram()
    crowd = Crowd()
    async with (
        bridge(run, "bench-hol-", miss_budget_ms=10_000.0, **overrides) as app,
        clients(bridge_url(app), 1) as (ws,),
    ):
        await seed(ws)
        async with Mux(ws) as mux:
            alone = Series(f"hit, alone ({label})", mux_hits(mux))
            crowded = Series(
                f"hit, {in_flight} {label} misses in flight on the same connection",
                with_slow_misses(mux, mux_hits(mux, crowd), in_flight, miss_us),
            )
            await warm_up([alone, crowded], min(p.warmup, hits // 4))
            miss_us.reset()
            await run_rounds([alone, crowded], hits, p.rounds)
    return Crowded(
        run.series_row(alone),
        run.series_row(crowded),
        run.row(f"{label} miss, next to the hits", miss_us, panel=SLOW),
        crowd,
    )


async def head_of_line(run: Run) -> Section:
    """Hit latency alone and with slow misses in flight on the same connection."""
    p = run.params
    delay = p.hol_delay_ms / 1000
    section = Section(
        "head_of_line",
        "Head-of-line blocking: hits next to slow misses",
        f"On one connection, closed-loop hits run alone, then while misses are kept "
        f"outstanding on the same connection (each finished miss is replaced at once), in "
        f"{p.rounds} interleaved rounds; replies are matched by id. First with a memory "
        f"{p.hol_delay_ms:g} ms slower per recall (SQLite behind a sleep, "
        f"{p.hol_in_flight} misses in flight), then with the script backend as deployed "
        f"(memory_manager.py started per miss, {p.hol_script_in_flight} in flight). Hits "
        "should not wait for misses: the same latency with or without.",
    )

    def slow(data_dir: Path) -> MemoryBackend:
        return SlowSqliteMemory(data_dir / "memory.sqlite3", delay)

    sleepy = await crowded_hits(
        run, "slow-memory", p.hol_in_flight, p.hol_hits, memory_backend=slow
    )
    script = await crowded_hits(
        run,
        "script-backend",
        p.hol_script_in_flight,
        p.hol_script_hits,
        memory="script",
        memory_script=memory_manager_for(corpus(p.prefill)),
        memory_script_python=sys.executable,
    )
    for part in (sleepy, script):
        section.rows += [part.alone, part.crowded, part.misses]
    section.figures = sleepy.figures() | {"delay_us": int(p.hol_delay_ms * 1000)}
    section.figures["script"] = script.figures()
    for name, f in (("slow memory", section.figures), ("script backend", script.figures())):
        section.notes.append(
            f"{name}: misses outstanding when a hit was sent: "
            f"{f['misses_in_flight_mean']:.1f} on average, never fewer than "
            f"{f['misses_in_flight_min']}. Hits beside misses over hits alone: "
            f"{fmt_ratio(f['p50_with_over_alone'])} at p50, "
            f"{fmt_ratio(f['p99_with_over_alone'])} at p99; slowest hit "
            f"{fmt_us(f['max_with_us'])} beside misses, {fmt_us(f['max_alone_us'])} alone."
        )
    return section
