"""Head-of-line blocking: hit latency alone and with slow misses in flight on the same
connection, first behind a slowed memory, then behind the script backend."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from bench.checks import MissCheck, miss_message
from bench.common import (
    Runner,
    Series,
    bridge_url,
    chat_start,
    check_hit,
    fmt_ratio,
    fmt_us,
    new_histogram,
    record_ns,
    run_rounds,
    seed,
    warm_up,
)
from bench.harness import Run, bridge, clients
from bench.load import Mux
from bench.registry import section
from bench.rows import SLOW, Row
from bench.section import Section, Target
from bench.workload import corpus, memory_manager_for
from bridge.memory.base import MemoryBackend, Recall
from bridge.memory.sqlite import SqliteMemory


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


@dataclass(frozen=True)
class Crowding:
    """Hits beside misses against hits alone, in one experiment."""

    p50_with_over_alone: float
    p99_with_over_alone: float
    max_alone_us: int
    max_with_us: int
    misses_in_flight_mean: float
    misses_in_flight_min: int | None

    @classmethod
    def of(cls, alone: Row, crowded: Row, crowd: Crowd) -> Crowding:
        """The comparison of the ``crowded`` hits with the hits ``alone``."""
        return cls(
            p50_with_over_alone=round(crowded.p50_us / max(alone.p50_us, 1), 2),
            p99_with_over_alone=round(crowded.p99_us / max(alone.p99_us, 1), 2),
            max_alone_us=alone.max_us,
            max_with_us=crowded.max_us,
            misses_in_flight_mean=round(crowd.mean, 2),
            misses_in_flight_min=crowd.least,
        )

    def note(self, name: str) -> str:
        """The comparison in words."""
        return (
            f"{name}: misses outstanding when a hit was sent: "
            f"{self.misses_in_flight_mean:.1f} on average, never fewer than "
            f"{self.misses_in_flight_min}. Hits beside misses over hits alone: "
            f"{fmt_ratio(self.p50_with_over_alone)} at p50, "
            f"{fmt_ratio(self.p99_with_over_alone)} at p99; slowest hit "
            f"{fmt_us(self.max_with_us)} beside misses, {fmt_us(self.max_alone_us)} alone."
        )


@dataclass(kw_only=True)
class HeadOfLine(Section):
    """Hits alone, beside misses, and those misses, for a slowed memory and the script
    backend; the delay of the slowed memory's recalls."""

    delay_us: int
    slow_memory: Crowding
    script: Crowding

    def figures(self) -> dict[str, Any]:
        """The slowed memory's comparison, its delay, and the script backend's under
        ``script``."""
        return asdict(self.slow_memory) | {"delay_us": self.delay_us, "script": asdict(self.script)}

    def targets(self) -> list[Target]:
        """No hit slower than the delay of a miss, for either experiment."""
        found = []
        for label, f in (
            ("no hit waits for a slow miss (slowest hit < the {delay} delay); hit p50 / p99 "
             "with misses in flight over alone", self.slow_memory),
            ("same, script backend as deployed (slowest hit < {delay})", self.script),
        ):  # fmt: skip
            found.append(
                Target(
                    label.format(delay=fmt_us(self.delay_us)),
                    f"slowest {fmt_us(f.max_with_us)}; {fmt_ratio(f.p50_with_over_alone)} / "
                    f"{fmt_ratio(f.p99_with_over_alone)}",
                    f.max_with_us < self.delay_us,
                )
            )
        return found


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


async def crowded_hits(
    run: Run, label: str, in_flight: int, hits: int, **overrides: Any
) -> tuple[list[Row], Crowding]:
    """Hits alone and beside ``in_flight`` misses on one connection of a bridge set up
    with ``overrides``, interleaved in rounds: the rows (alone, beside misses, the
    misses) and their comparison."""
    p = run.params
    miss_us = new_histogram()
    crowd = Crowd()
    async with (
        bridge(run, "bench-hol-", recall={"miss_budget_ms": 10_000.0}, **overrides) as app,
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
    rows = [
        run.series_row(alone),
        run.series_row(crowded),
        run.row(f"{label} miss, next to the hits", miss_us, panel=SLOW),
    ]
    return rows, Crowding.of(rows[0], rows[1], crowd)


@section("head_of_line", order=50)
async def head_of_line(run: Run) -> HeadOfLine:
    """Hit latency alone and with slow misses in flight on the same connection."""
    p = run.params
    delay = p.hol_delay_ms / 1000

    def slow(data_dir: Path) -> MemoryBackend:
        return SlowSqliteMemory(data_dir / "memory.sqlite3", delay)

    sleepy_rows, sleepy = await crowded_hits(
        run, "slow-memory", p.hol_in_flight, p.hol_hits, memory_backend=slow
    )
    script_rows, script = await crowded_hits(
        run,
        "script-backend",
        p.hol_script_in_flight,
        p.hol_script_hits,
        memory={
            "backend": "script",
            "script": {"path": memory_manager_for(corpus(p.prefill)), "python": sys.executable},
        },
    )
    return HeadOfLine(
        title="Head-of-line blocking: hits next to slow misses",
        intro=f"On one connection, closed-loop hits run alone, then while misses are kept "
        f"outstanding on the same connection (each finished miss is replaced at once), in "
        f"{p.rounds} interleaved rounds; replies are matched by id. First with a memory "
        f"{p.hol_delay_ms:g} ms slower per recall (SQLite behind a sleep, "
        f"{p.hol_in_flight} misses in flight), then with the script backend as deployed "
        f"(memory_manager.py started per miss, {p.hol_script_in_flight} in flight). Hits "
        "should not wait for misses: the same latency with or without.",
        rows=sleepy_rows + script_rows,
        notes=[sleepy.note("slow memory"), script.note("script backend")],
        delay_us=int(p.hol_delay_ms * 1000),
        slow_memory=sleepy,
        script=script,
    )
