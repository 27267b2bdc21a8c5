"""Throughput with more worker processes: ``serve --workers N`` for N = 1, 2 and the cores
here, measured by ``bench.workers``, each row against one worker's of the same kind."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from bench.common import fmt_ratio
from bench.harness import Run
from bench.registry import section
from bench.rows import SLOW, Row
from bench.section import Section
from bench.workers import FULL_LOAD, KINDS, QUICK_LOAD, Measured, measure_all, worker_counts
from bench.workload import WORKING_SET


@dataclass(kw_only=True)
class Workers(Section):
    """A row per kind and worker count, and requests per second by worker count."""

    hits_rps: dict[int, float]
    misses_rps: dict[int, float]


def rows_and_notes(run: Run, measured: list[Measured]) -> tuple[list[Row], list[str]]:
    """Report rows (latency ratios to one worker's row of the same kind) and notes (the
    throughput ratios)."""
    rows, notes = [], []
    for kind in KINDS:
        of_kind = [m for m in measured if m.kind == kind]
        one = next(m for m in of_kind if m.workers == 1)
        reference: Row | None = None
        for m in of_kind:
            name = f"{kind}, {m.workers} worker{'s' if m.workers > 1 else ''}"
            row = run.row(
                name,
                m.histogram,
                throughput=m.throughput,
                floor=reference,
                panel=SLOW,
                is_floor=reference is None,  # one worker: the others' reference
            )
            reference = reference or row
            gain = round(m.throughput / one.throughput, 2)
            rows.append(dataclasses.replace(row, throughput_over_one_worker=gain))
        gains = ", ".join(
            f"{m.workers} workers {fmt_ratio(m.throughput / one.throughput)}"
            for m in of_kind
            if m.workers > 1
        )
        notes.append(f"{kind}: {one.throughput:,.0f}/s with 1 worker; {gains} of that")
    return rows, notes


@section("workers", order=70)
async def workers(run: Run) -> Workers:
    """Hits and misses per second with 1, 2 and N worker processes."""
    load = QUICK_LOAD if run.quick else FULL_LOAD
    counts = worker_counts()
    measured = await measure_all(load, run.statsd_port, counts)
    rows, notes = rows_and_notes(run, measured)
    rps = {kind: {m.workers: round(m.throughput, 1) for m in measured if m.kind == kind}
           for kind in KINDS}  # fmt: skip
    return Workers(
        title="Throughput with more worker processes (serve --workers N)",
        intro=f"`python -m bridge serve --workers N` for N = {', '.join(map(str, counts))} as "
        f"its own process tree, the store pre-filled with {load.prefill:,} episodes; "
        f"{load.connections} connections spread over {os.cpu_count()} client processes, "
        f"each connection a closed loop, measured for {load.seconds:g} s after "
        f"{load.warmup:g} s of warm-up. Hits are cached contexts of {WORKING_SET} queries; "
        "misses are queries never asked before. `vs floor` is to one worker of the same "
        "kind; the clients share this machine's cores with the bridge.",
        rows=rows,
        notes=notes,
        hits_rps=rps["hits"],
        misses_rps=rps["misses"],
    )
