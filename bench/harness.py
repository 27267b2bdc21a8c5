"""What the sections of ``python -m bench`` share: the ``Run``, a bridge, clients, prefill.

Every section starts what it needs (a bridge with its own embedded valkey-server and a
temporary data dir, a FalkorDB, a Valkey for the original plugin) and stops it before the
next section starts, so sections do not disturb each other. Client and servers share one
process and one event loop (like ``bench.hits``): a ratio to the floor is the bridge's
own work, and a throughput is what one core serves while also running the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
from websockets.asyncio.client import ClientConnection, connect

from bench.common import BenchError, Series, bridge_config, running_bridge
from bench.params import Params
from bench.rows import FAST, Panel, Row, row_of
from bench.section import Section
from bridge.config import with_changes
from bridge.episode import Episode
from bridge.memory.base import MemoryBackend
from bridge.runtime.app import App

UNLIMITED: Final = {"rate_limit": 1e9, "rate_burst": 10**9}  # the limits section
S = TypeVar("S", bound=Section)


@dataclass
class Run:
    """What sections share: parameters, the floor, the DogStatsD sink, the histograms of
    the rows, and the sections done so far (by key, in run order)."""

    params: Params
    quick: bool
    floor_url: str
    statsd_port: int
    histograms: dict[str, HdrHistogram] = field(default_factory=dict)
    floor: Row | None = None
    done: dict[str, Section] = field(default_factory=dict)

    def row(
        self,
        name: str,
        histogram: HdrHistogram,
        *,
        throughput: float | None = None,
        cpu_us: float | None = None,
        floor: Row | None = None,
        panel: Panel = FAST,
        is_floor: bool = False,
    ) -> Row:
        """A report row for ``histogram``, with ratios to ``floor`` (default: the run's
        closed-loop floor; a floor row is its own reference); its histogram kept for the
        plot."""
        reference = None if is_floor else floor or self.floor
        if reference is None and not is_floor:
            raise BenchError(f"{name}: no floor measured to compare with")
        self.histograms[name] = histogram
        return row_of(
            name,
            histogram,
            throughput=throughput,
            cpu_us=cpu_us,
            floor=reference,
            panel=panel,
            keep_histogram=True,
        )

    def series_row(
        self,
        series: Series,
        *,
        floor: Row | None = None,
        panel: Panel = FAST,
        is_floor: bool = False,
    ) -> Row:
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

    def earlier(self, key: str, kind: type[S]) -> S | None:
        """The result of section ``key`` if it ran before this one in this run."""
        found = self.done.get(key)
        return found if isinstance(found, kind) else None


@contextlib.asynccontextmanager
async def clients(url: str, count: int) -> AsyncIterator[list[ClientConnection]]:
    """``count`` WebSocket connections to ``url``, closed on the way out."""
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(connect(url, compression=None, max_queue=None))
            for _ in range(count)
        ]


@contextlib.asynccontextmanager
async def bridge(
    run: Run,
    prefix: str,
    *,
    memory_backend: Callable[[Path], MemoryBackend] | None = None,
    **overrides: Any,
) -> AsyncIterator[App]:
    """A bridge on a fresh data dir, no rate limit, settings ``overrides`` per Config
    section (a callable value is called with the data dir, e.g. to install a script
    there); the App."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        data_dir = Path(tmp) / "data"
        settings = for_data_dir(overrides, data_dir)
        memory = None if memory_backend is None else memory_backend(data_dir)
        config = bridge_config(data_dir, run.statsd_port, limits=UNLIMITED)
        async with running_bridge(with_changes(config, **settings), memory) as app:
            yield app


def for_data_dir(settings: Mapping[str, Any], data_dir: Path) -> dict[str, Any]:
    """``settings`` with every callable value, in any section, called with ``data_dir``."""
    return {
        name: for_data_dir(value, data_dir)
        if isinstance(value, Mapping)
        else value(data_dir)
        if callable(value)
        else value
        for name, value in settings.items()
    }


async def prefill(memory: MemoryBackend, episodes: list[Episode], at_once: int = 32) -> None:
    """Store ``episodes`` in ``memory`` directly, ``at_once`` at a time."""
    for start in range(0, len(episodes), at_once):
        await asyncio.gather(*(memory.store(e) for e in episodes[start : start + at_once]))
