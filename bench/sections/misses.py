"""chat:start misses on each memory backend, memory pre-filled, waiting for memory."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench.checks import MissCheck, miss_message
from bench.common import Series, bridge_url, closed_loop, fmt_us, measure, round_trip
from bench.harness import Run, bridge, clients, prefill
from bench.registry import section
from bench.rows import SLOW
from bench.section import Section, Target
from bench.workload import corpus, memory_manager_for
from bridge.episode import Episode

LABELS: Final = {
    "sqlite": "embedded SQLite, in-memory recall index",
    "graphiti": "graphiti-core on an embedded FalkorDB, no LLM",
    "script": "memory_manager.py, one process per query",
}


@dataclass(kw_only=True)
class Misses(Section):
    """One miss row per backend, and each backend's p50 and p99 in µs."""

    p50_us: dict[str, int]
    p99_us: dict[str, int]

    def figures(self) -> dict[str, Any]:
        """``<backend>_p50_us`` and ``<backend>_p99_us`` of every backend measured."""
        found: dict[str, Any] = {}
        for backend, p50 in self.p50_us.items():
            found[f"{backend}_p50_us"] = p50
            found[f"{backend}_p99_us"] = self.p99_us[backend]
        return found

    def targets(self) -> list[Target]:
        """SQLite misses under 2 ms at p99."""
        p99 = self.p99_us.get("sqlite")
        if p99 is None:
            return []
        return [Target("SQLite miss p99 < 2 ms", fmt_us(p99), p99 < 2000)]


def settings(backend: str, episodes: list[Episode]) -> dict[str, Any]:
    """The bridge settings of a backend beyond ``memory`` (the script is installed with
    ``episodes`` already stored)."""
    if backend == "graphiti":
        return {"llm": {"mode": "off"}}
    if backend == "script":
        return {"script": {"path": memory_manager_for(episodes), "python": sys.executable}}
    return {}


@section("misses", order=20)
async def misses(run: Run) -> Misses:
    """chat:start misses on each backend, memory pre-filled, waiting for memory."""
    p = run.params
    episodes = corpus(p.prefill)
    result = Misses(
        title="chat:start misses per backend",
        intro=f"Every query is new (so it misses the cache) and shares words with a corpus "
        f"of {p.prefill} episodes stored beforehand; the miss budget is 10 s, so every reply "
        f"waits for memory and carries what it found. Closed loop, one connection. A miss "
        f"is a Valkey lookup, the memory query, and storing the context in Valkey.",
        p50_us={},
        p99_us={},
    )
    for backend, count in p.misses.items():
        memory = {"backend": backend, **settings(backend, episodes)}
        recall = {"miss_budget_ms": 10_000.0}
        async with bridge(run, f"bench-miss-{backend}-", memory=memory, recall=recall) as app:
            began = time.perf_counter()
            if backend != "script":  # the script's episodes were written with it
                await prefill(app.memory, episodes)
            filled = time.perf_counter() - began
            checker = MissCheck()
            async with clients(bridge_url(app), 1) as (ws,):
                series = Series(
                    f"miss: {backend} ({LABELS[backend]})",
                    closed_loop(round_trip(ws, True, checker, miss_message)),
                )
                await measure(series, max(3, min(50, count // 10)), record=False)
                checker.server_us.reset()
                await measure(series, count, timeout=60.0 + 0.5 * count)
        row = run.series_row(series, panel=SLOW)
        result.rows.append(row)
        result.p50_us[backend], result.p99_us[backend] = row.p50_us, row.p99_us
        how = "stored through the backend" if backend != "script" else "written as JSON lines"
        server = checker.server_us
        result.notes.append(
            f"{backend}: {p.prefill} episodes {how} in {filled:.1f} s; {checker.share}; "
            f"the bridge's own time per miss (`elapsed_us`): p50 "
            f"{fmt_us(server.get_value_at_percentile(50))}, p99 "
            f"{fmt_us(server.get_value_at_percentile(99))}."
        )
    result.notes.append(
        f"The script backend starts `{Path(sys.executable).name} memory_manager.py` (this "
        "venv's interpreter) for every query. The original plugin's section runs the same "
        "script with no bridge around it: the difference is the bridge's event loop "
        "stalling on each spawn (see the head-of-line section)."
    )
    return result
