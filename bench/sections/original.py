"""The seed design's subprocess-per-call path (``bench.original``), with the same
memory_manager.py the script backend runs, against the bridge's SQLite miss."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as redis

from bench.common import BenchError, Series, closed_loop, fmt_ratio, measure
from bench.harness import Run
from bench.original import OriginalPlugin
from bench.registry import section
from bench.rows import SLOW
from bench.section import Section, Target
from bench.sections.misses import Misses
from bench.workload import corpus, install_memory_manager, miss_query
from bridge.runtime.embedded import EmbeddedValkey


@dataclass(frozen=True)
class Over:
    """A latency as a multiple of another's, at p50 and p99."""

    p50: float
    p99: float


@dataclass(kw_only=True)
class Original(Section):
    """The original path's rows; when the misses section ran first, its chat:start miss
    over the bridge's SQLite miss, and the graphiti-core import's p50 over that miss."""

    over_sqlite_miss: Over | None = None
    graphiti_import_over_sqlite_miss_p50: float | None = None

    def targets(self) -> list[Target]:
        """The original path at least 100x slower than a SQLite miss."""
        over, heavy = self.over_sqlite_miss, self.graphiti_import_over_sqlite_miss_p50
        if over is None or heavy is None:
            return []
        return [
            Target(
                "original plugin's miss >= 100x the bridge's SQLite miss (p50 / p99)",
                f"{fmt_ratio(over.p50)} / {fmt_ratio(over.p99)}",
                over.p50 >= 100 and over.p99 >= 100,
            ),
            Target(
                "same, if the seed's script imported graphiti-core (p50 of the import alone)",
                fmt_ratio(heavy),
                heavy >= 100,
            ),
        ]


@section("original", order=40)
async def original(run: Run) -> Original:
    """The seed design's subprocess-per-call path, with the same memory_manager.py."""
    p = run.params
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
    asks_row, graphiti_row = run.series_row(asks, panel=SLOW), run.series_row(graphiti, panel=SLOW)
    result = Original(
        title="The original plugin's path (seed design)",
        intro=f"What the seed plugin did per event, reproduced with the same "
        f"memory_manager.py and {p.prefill} stored episodes: a chat:start miss is a Valkey "
        "GET, one `python3 memory_manager.py query <text>` subprocess "
        "(asyncio.create_subprocess_exec, as bun's `$`) and a SETEX; a file:write is one "
        "`memory_manager.py store` subprocess and a SCAN/DEL of `memory:*<path>*`. No "
        "WebSocket hop (the plugin ran in OpenCode's process), which favours this side. "
        "Closed loop.",
        rows=[asks_row, run.series_row(stores, panel=SLOW), graphiti_row],
        notes=[
            "The seed's memory_manager.py was a Graphiti memory manager: one that imports "
            "graphiti-core (and then connects to its graph database) pays at least the last "
            "row on every call. The JSON-lines script above is a lower bound for the seed."
        ],
    )
    misses = run.earlier("misses", Misses)
    if misses is not None and "sqlite" in misses.p50_us:
        p50 = asks_row.p50_us / max(misses.p50_us["sqlite"], 1)
        p99 = asks_row.p99_us / max(misses.p99_us["sqlite"], 1)
        result.over_sqlite_miss = Over(round(p50, 1), round(p99, 1))
        heavy = graphiti_row.p50_us / max(misses.p50_us["sqlite"], 1)
        result.graphiti_import_over_sqlite_miss_p50 = round(heavy, 1)
        result.notes.append(
            f"Original chat:start miss over the bridge's SQLite miss (misses section): "
            f"{fmt_ratio(p50)} at p50, {fmt_ratio(p99)} at p99."
        )
    return result
