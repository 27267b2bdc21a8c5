"""The suite of ``python -m bench``: the chosen sections run in order, in one process
tree and on one event loop, beside a bare echo server (the floor) and a DogStatsD sink."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from bench.common import (
    Series,
    check_echo,
    closed_loop,
    echo_server,
    measure,
    round_trip,
    statsd_sink,
)
from bench.harness import Run, clients
from bench.params import Params
from bench.registry import Entry


def progress(text: str) -> None:
    """A line on stderr, so stdout stays the report."""
    print(text, file=sys.stderr, flush=True)


async def floor_only(run: Run) -> None:
    """Measure the closed-loop floor alone (when no chosen section measures it itself)."""
    p = run.params
    async with clients(run.floor_url, 1) as (ws,):
        trip = round_trip(ws, True, check_echo)
        floor = Series("floor: echo, closed loop, 1 connection", closed_loop(trip))
        await measure(floor, p.warmup, record=False)
        await measure(floor, p.hits)
    run.floor = run.series_row(floor, is_floor=True)


async def suite(params: Params, quick: bool, chosen: Sequence[Entry]) -> Run:
    """Run the ``chosen`` sections in order; the run, holding their results by key and
    the histograms of their rows."""
    with statsd_sink() as statsd_port:
        async with echo_server() as floor_url:
            run = Run(params, quick, floor_url, statsd_port)
            if not any(entry.measures_floor for entry in chosen):
                await floor_only(run)
            for entry in chosen:
                began = time.perf_counter()
                progress(f"bench: {entry.key} ...")
                run.done[entry.key] = await entry.run(run)
                progress(f"bench: {entry.key} took {time.perf_counter() - began:.1f} s")
    return run
