"""file:write acks, then a mixed trace of hits, misses and writes on one connection."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
from websockets.asyncio.client import ClientConnection

from bench.checks import MissCheck, check_ack, miss_message, write_message
from bench.common import (
    PROJECT,
    BenchError,
    Series,
    bridge_url,
    chat_start,
    closed_loop,
    measure,
    new_histogram,
    record_ns,
    round_trip,
    until_hit,
)
from bench.harness import Run, bridge, clients, prefill
from bench.load import Mux
from bench.registry import section
from bench.rows import SLOW
from bench.section import Section
from bench.workload import WORKING_SET, corpus, hot_path, hot_query


@dataclass(kw_only=True)
class Writes(Section):
    """The ack row, a row per kind of request of the mixed trace, and how many of each
    kind the trace sent."""

    mixed_counts: dict[str, int]


@section("writes", order=30)
async def writes(run: Run) -> Writes:
    """file:write acks, then a mixed trace of hits, misses and writes on one connection."""
    p = run.params
    rows = []
    async with bridge(run, "bench-writes-", recall={"miss_budget_ms": 10_000.0}) as app:
        await prefill(app.memory, corpus(p.prefill))
        async with clients(bridge_url(app), 2) as (ws, trace_ws):
            series = Series(
                "file:write ack (SQLite commit + invalidation)",
                closed_loop(round_trip(ws, True, check_ack, write_message)),
            )
            await measure(series, max(10, p.writes // 10), record=False)
            await measure(series, p.writes, timeout=60.0 + 0.1 * p.writes)
            rows.append(run.series_row(series, panel=SLOW))
            for k in range(WORKING_SET):
                await until_hit(ws, chat_start(0, hot_query(k)))
            kinds, counts = await mixed_trace(trace_ws, p.mixed)
    for name, histogram in kinds.items():
        if histogram.get_total_count():
            rows.append(run.row(name, histogram, panel=SLOW))
    return Writes(
        title="file:write acks and a mixed trace (default backend: SQLite)",
        intro=f"The bridge's default backend, pre-filled with {p.prefill} episodes. A "
        "file:write is acknowledged once its episode is committed (fsync) and the cached "
        "contexts naming the path are dropped. The mixed trace is a closed loop on one "
        f"connection: 90% chat:starts over a working set of {WORKING_SET} queries (each "
        "names a file), 5% chat:starts never asked before, 5% file:writes of working-set "
        "files, which drop the contexts that name them; the next ask of a dropped query "
        "misses and refills.",
        rows=rows,
        notes=[
            "Mixed trace: "
            + ", ".join(f"{n} {kind}" for kind, n in counts.items())
            + f" in {sum(counts.values())} requests."
        ],
        mixed_counts=counts,
    )


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
