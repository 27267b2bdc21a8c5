"""The cluster section of ``python -m bench``: the cache on a Valkey Cluster against one
Valkey server, in the same run.

Both deployments run on this machine: one valkey-server on a loopback TCP port, and a
cluster of three primaries with a replica each (tests/valkey_deployments.py forms it with
CLUSTER ADDSLOTSRANGE and CLUSTER MEET). Three pairs of series, each pair interleaved in
rounds, each cluster row given as a ratio to its single-server row:

- hits: closed-loop chat:start hits over a WebSocket to a bridge (``bridge.runtime.app.App``) whose
  cache is that deployment; served from the in-process copy;
- Valkey reads: ``ContextCache.lookup`` with no in-process copy, one MGET to the primary
  of the project's slot;
- cross-bridge invalidation: two caches of one memory; the time from one starting
  ``invalidate_path`` until the other's in-process copy has dropped the context (the push
  from the primary that holds it), projects spread over every primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

from bench.common import (
    BenchError,
    Runner,
    Series,
    bridge_url,
    check_hit,
    closed_loop,
    fmt_ratio,
    fmt_us,
    new_histogram,
    record_ns,
    round_trip,
    run_rounds,
    seed,
    warm_up,
)
from bench.harness import Run, bridge, clients
from bench.registry import section
from bench.rows import Row
from bench.section import Section
from bridge.cache.contexts import ContextCache
from bridge.runtime.embedded import EmbeddedValkey
from tests.ports import free_port
from tests.valkey_deployments import ValkeyCluster

PROJECTS: Final = [f"bench-{i}" for i in range(12)]  # spread over the three primaries
NAMESPACE: Final = "bench:shared-memory"  # both caches of a pair serve one memory
DROP_WITHIN: Final = 5.0  # seconds an invalidation may take before the run fails


@contextlib.asynccontextmanager
async def deployments() -> AsyncIterator[dict[str, str]]:
    """One Valkey server and one Valkey Cluster, running; their URLs by name."""
    single = EmbeddedValkey(port=free_port())
    cluster = ValkeyCluster(primaries=3, replicas=1)
    try:
        await single.start()
        await cluster.start()
        yield {"single Valkey": single.url, "Valkey Cluster": cluster.url}
    finally:
        await cluster.close()
        await single.close()


async def open_cache(url: str, **settings: Any) -> ContextCache:
    """A cache as the bridge opens it, started (its copy following every primary)."""
    cache = await ContextCache.connect(url, namespace=NAMESPACE, ttl=3600, **settings)
    await cache.start(wait=10.0)
    if cache.local is not None and cache.local_problem() is not None:
        raise BenchError(f"{url}: {cache.local_problem()}")
    return cache


async def hit_series(run: Run, urls: dict[str, str]) -> list[Row]:
    """chat:start hits through a bridge on each deployment, interleaved."""
    p = run.params
    async with contextlib.AsyncExitStack() as stack:
        series = []
        for name, url in urls.items():
            app = await stack.enter_async_context(
                bridge(run, "bench-cluster-", cache={"valkey_url": url})
            )
            (ws,) = await stack.enter_async_context(clients(bridge_url(app), 1))
            await seed(ws)
            trip = round_trip(ws, True, check_hit(None))
            series.append(Series(f"hit, {name} (chat:start, local copy)", closed_loop(trip)))
        await warm_up(series, p.warmup)
        await run_rounds(series, p.hits // 2, p.rounds)
    return pair_rows(run, series)


async def read_series(run: Run, urls: dict[str, str]) -> list[Row]:
    """Lookups that read Valkey (no in-process copy), interleaved."""
    p = run.params
    caches = [await open_cache(url, local_entries=0) for url in urls.values()]
    try:
        series = []
        for (name, _), cache in zip(urls.items(), caches, strict=True):
            for project in PROJECTS:
                lookup = await cache.lookup(project, "what broke")
                if not await cache.put(project, "what broke", "ctx", [], lookup.epoch):
                    raise BenchError(f"{name}: a context could not be cached")
            series.append(Series(f"Valkey read, {name} (lookup, no local copy)", reads(cache)))
        await warm_up(series, p.warmup)
        await run_rounds(series, p.hits // 4, p.rounds)
    finally:
        for cache in caches:
            await cache.close()
    return pair_rows(run, series)


def reads(cache: ContextCache) -> Runner:
    """A runner of lookups that must hit, one project after another."""

    async def trip(i: int) -> None:
        if not (await cache.lookup(PROJECTS[i % len(PROJECTS)], "what broke")).hit:
            raise BenchError(f"lookup {i} missed")

    return closed_loop(trip)


async def invalidation_series(run: Run, urls: dict[str, str]) -> list[Row]:
    """Cross-bridge invalidation on each deployment, samples alternating between them."""
    count = max(20, run.params.writes // 2)
    pairs = []
    try:
        for url in urls.values():
            pairs.append((await open_cache(url), await open_cache(url, local_entries=0)))
        histograms = {name: new_histogram() for name in urls}
        for i in range(count):
            for name, (reader, writer) in zip(urls, pairs, strict=True):
                record_ns(histograms[name], await one_invalidation(reader, writer, i))
    finally:
        for reader, writer in pairs:
            await reader.close()
            await writer.close()
    single_name, cluster_name = urls
    single = run.row(f"cross-bridge invalidation, {single_name}", histograms[single_name])
    clustered = run.row(
        f"cross-bridge invalidation, {cluster_name}", histograms[cluster_name], floor=single
    )
    return [single, clustered]


async def one_invalidation(reader: ContextCache, writer: ContextCache, i: int) -> int:
    """Cache a context in ``reader``'s copy, drop it through ``writer``; nanoseconds from
    the drop's start until ``reader``'s copy no longer holds it."""
    project, query, path = PROJECTS[i % len(PROJECTS)], f"about {i}", f"src/bench/{i}.py"
    lookup = await reader.lookup(project, query)
    if not await reader.put(project, query, f"ctx {i}", [path], lookup.epoch):
        raise BenchError(f"context {i} could not be cached")
    deadline = time.monotonic() + DROP_WITHIN
    while reader.lookup_local(project, query) is None:  # our own SET's push may come first
        await reader.lookup(project, query)
        if time.monotonic() > deadline:
            raise BenchError(f"context {i} never reached the local copy")
        await asyncio.sleep(0.001)
    began = time.perf_counter_ns()
    if await writer.invalidate_path(project, path) != 1:
        raise BenchError(f"invalidation {i} dropped no context")
    while reader.lookup_local(project, query) is not None:
        if time.monotonic() > deadline:
            raise BenchError(f"invalidation {i} never reached the other cache's copy")
        await asyncio.sleep(0)
    return time.perf_counter_ns() - began


def pair_rows(run: Run, series: list[Series]) -> list[Row]:
    """The single-server row (against the run's floor) and the cluster row against it."""
    single = run.series_row(series[0])
    return [single, run.series_row(series[1], floor=single)]


@dataclass(kw_only=True)
class Cluster(Section):
    """Pairs of rows (one server, then the cluster against it) and the cluster's p50 and
    p99 over one server's, for hits, reads and invalidations."""

    hit_p50_cluster_over_single: float
    hit_p99_cluster_over_single: float
    read_p50_cluster_over_single: float
    read_p99_cluster_over_single: float
    invalidation_p50_cluster_over_single: float
    invalidation_p99_cluster_over_single: float


@section("cluster", order=60)
async def cluster(run: Run) -> Cluster:
    """Hits, Valkey reads and cross-bridge invalidation on a cluster, over one server."""
    rows: list[Row] = []
    async with deployments() as urls:
        for part in (hit_series, read_series, invalidation_series):
            rows += await part(run, urls)
    hit, read, invalidation = rows[1::2]
    notes = [
        f"{name}: median {fmt_us(single.p50_us)} on one server, "
        f"{fmt_us(clustered.p50_us)} on the cluster "
        f"({fmt_ratio(clustered.p50_over_floor)}; p99 {fmt_ratio(clustered.p99_over_floor)})."
        for name, single, clustered in zip(
            ("hit", "read", "invalidation"), rows[::2], rows[1::2], strict=True
        )
    ]
    return Cluster(
        title="Valkey Cluster against one Valkey server",
        intro="Three primaries with a replica each, and one valkey-server, both on loopback "
        "TCP. Each cluster row's ratio columns are to the single-server row above it (not to "
        "the echo floor): hits through a bridge's WebSocket (from its local copy), reads of "
        "Valkey with no local copy, and the time from one cache starting an invalidation "
        "until another cache's local copy has dropped the context.",
        rows=rows,
        notes=notes,
        hit_p50_cluster_over_single=hit.p50_over_floor,
        hit_p99_cluster_over_single=hit.p99_over_floor,
        read_p50_cluster_over_single=read.p50_over_floor,
        read_p99_cluster_over_single=read.p99_over_floor,
        invalidation_p50_cluster_over_single=invalidation.p50_over_floor,
        invalidation_p99_cluster_over_single=invalidation.p99_over_floor,
    )
