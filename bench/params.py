"""How much of everything a run of ``python -m bench`` does: the full and quick counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class Params:
    """How much of everything a run does (a section with counts of its own keeps them
    beside it and picks by ``Run.quick``)."""

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
