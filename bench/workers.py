"""Throughput of ``serve --workers N``: ``python -m bench workers``, and the measurements
of the workers section of ``python -m bench`` (bench/sections/workers.py).

For N = 1, 2 and the number of cores here, the bridge runs as its own process tree
(``python -m bridge serve --workers N``, its private valkey-server, the embedded store
pre-filled with the suite's corpus) and client processes (one per core, each with its
share of the connections and its own event loop) load it over many connections, each a
closed loop, for a fixed time after a warm-up:

- hits: chat:starts of a working set of queries whose contexts are cached (served from
  each worker's in-process copy, once a first lookup filled it from Valkey);
- misses: chat:starts of queries never asked before (each one recalls from the worker's
  recall index of the store).

Reported per N: requests per second (all clients together) and the round-trip latency,
with every row's latency and throughput as ratios to the row of one worker (the single
process of ``serve`` without ``--workers``). The clients share the machine's cores with
the bridge, so the ratios say what more workers gain on this machine, clients included.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
from websockets.asyncio.client import ClientConnection, connect

from bench.common import (
    PROJECT,
    BenchError,
    Reply,
    fmt_ratio,
    msgpack_decoder,
    msgpack_encoder,
    new_histogram,
    record_ns,
    run_loop,
    statsd_sink,
)
from bench.harness import prefill
from bench.process import serve
from bench.workload import WORKING_SET, corpus, hot_query, miss_query
from bridge.memory.sqlite import SqliteMemory

KINDS: Final = ("hits", "misses")
IDS_PER_CLIENT: Final = 10_000_000  # client k numbers its requests from k times this


@dataclass(frozen=True)
class Load:
    """How hard and how long each worker count is loaded."""

    connections: int
    seconds: float
    warmup: float
    prefill: int


FULL_LOAD: Final = Load(connections=64, seconds=10.0, warmup=2.0, prefill=1000)
QUICK_LOAD: Final = Load(connections=16, seconds=2.0, warmup=0.5, prefill=200)


def worker_counts() -> list[int]:
    """1, 2 and the number of cores of this machine."""
    return sorted({1, 2, os.cpu_count() or 1})


@dataclass
class Measured:
    """One kind of request at one worker count: requests per second and latency."""

    workers: int
    kind: str
    requests: int
    seconds: float
    histogram: HdrHistogram

    @property
    def throughput(self) -> float:
        """Requests answered per second, all clients together."""
        return self.requests / self.seconds


# -- the client processes -------------------------------------------------------------------


def client_load(
    url: str, kind: str, client: int, connections: int, start_at: float, seconds: float
) -> tuple[int, bytes]:
    """In a client process: load ``url`` with ``connections`` closed loops of ``kind``
    from now until ``start_at + seconds`` (wall clock, shared by the processes), recording
    what is sent from ``start_at`` on; the requests recorded and their encoded histogram."""
    histogram, _ = run_loop(_load(url, kind, client, connections, start_at, seconds), True)
    return int(histogram.get_total_count()), histogram.encode()


async def _load(
    url: str, kind: str, client: int, connections: int, start_at: float, seconds: float
) -> HdrHistogram:
    histogram = new_histogram()
    async with contextlib.AsyncExitStack() as stack:
        sockets = [
            await stack.enter_async_context(connect(url, compression=None))
            for _ in range(connections)
        ]
        first = client * IDS_PER_CLIENT
        ids = iter(range(first, first + IDS_PER_CLIENT))
        await asyncio.gather(
            *(_closed_loop(ws, kind, ids, start_at, seconds, histogram) for ws in sockets)
        )
    return histogram


async def _closed_loop(
    ws: ClientConnection,
    kind: str,
    ids: Any,
    start_at: float,
    seconds: float,
    histogram: HdrHistogram,
) -> None:
    clock, wall = time.perf_counter_ns, time.time
    end = start_at + seconds
    while (sent_at := wall()) < end:
        i = next(ids)
        query = hot_query(i % WORKING_SET) if kind == "hits" else miss_query(i)
        t0 = clock()
        await ws.send(msgpack_encoder.encode({"type": "chat:start", "id": i, "query": query}))
        reply = msgpack_decoder.decode(await ws.recv(decode=False))
        took = clock() - t0
        _check(kind, reply, i)
        if sent_at >= start_at:
            record_ns(histogram, took)


def _check(kind: str, reply: Reply, i: int) -> None:
    if reply.type != "context" or reply.id != i:
        raise BenchError(f"chat:start {i} was answered with {reply!r}")
    if reply.hit != (kind == "hits"):
        raise BenchError(f"chat:start {i} of the {kind} series had hit={reply.hit}")


# -- one worker count ------------------------------------------------------------------------


async def seed_hits(url: str) -> None:
    """Cache the context of every query of the working set (a miss, then its fill)."""
    async with connect(url, compression=None) as ws:
        for k in range(WORKING_SET):
            for attempt in range(200):
                message = {"type": "chat:start", "id": attempt, "query": hot_query(k)}
                await ws.send(msgpack_encoder.encode(message))
                if msgpack_decoder.decode(await ws.recv(decode=False)).hit:
                    break
                await asyncio.sleep(0.005)
            else:
                raise BenchError(f"the context of {hot_query(k)!r} was never cached")


async def measure_workers(
    workers: int,
    data_dir: Path,
    load: Load,
    statsd_port: int,
    pool: concurrent.futures.ProcessPoolExecutor,
    clients: int,
) -> list[Measured]:
    """Start ``serve --workers N`` on ``data_dir`` and measure each kind of request."""
    args = ["--workers", str(workers), "--miss-budget-ms", "10000", "--rate-limit", "1e9",
            "--rate-burst", "1000000000", "--cache-ttl", "3600"]  # fmt: skip
    found = []
    log_path = data_dir.parent / f"bridge-{workers}-workers.log"
    async with serve(args, data_dir, statsd_port, log_path) as bridge:
        url = f"{bridge.url}/{PROJECT}"
        await seed_hits(url)
        loop = asyncio.get_running_loop()
        for kind in KINDS:
            start_at = time.time() + load.warmup + 1.0  # the clients connect meanwhile
            shares = [load.connections // clients + (k < load.connections % clients)
                      for k in range(clients)]  # fmt: skip
            done = await asyncio.gather(
                *(
                    loop.run_in_executor(pool, client_load, url, kind, k, n, start_at, load.seconds)
                    for k, n in enumerate(shares)
                    if n
                )
            )
            histogram = new_histogram()
            for _, encoded in done:
                histogram.add(HdrHistogram.decode(encoded))
            requests = sum(count for count, _ in done)
            found.append(Measured(workers, kind, requests, load.seconds, histogram))
    return found


async def measure_all(load: Load, statsd_port: int, counts: Sequence[int]) -> list[Measured]:
    """Every worker count on one pre-filled store, one after another."""
    clients = os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="bench-workers-") as folder,
        concurrent.futures.ProcessPoolExecutor(clients, mp_context=context) as pool,
    ):
        data_dir = Path(folder) / "data"
        memory = SqliteMemory(data_dir / "memory.sqlite3")
        await memory.start()
        try:
            await prefill(memory, corpus(load.prefill))
        finally:
            await memory.close()
        found = []
        for workers in counts:
            found += await measure_workers(workers, data_dir, load, statsd_port, pool, clients)
        return found


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench workers [--quick] [--workers 1,2,4]``: print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench workers", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    parser.add_argument("--workers", help="comma-separated worker counts (default: 1, 2, cores)")
    args = parser.parse_args(argv)
    counts = sorted({1, *(int(n) for n in args.workers.split(","))}) if args.workers else None
    load = QUICK_LOAD if args.quick else FULL_LOAD

    async def run_all() -> list[Measured]:
        with statsd_sink() as statsd_port:
            return await measure_all(load, statsd_port, counts or worker_counts())

    try:
        measured, _ = run_loop(run_all(), True)
    except BenchError as e:
        print(f"bench workers: {e}", file=sys.stderr)
        return 1
    one = {m.kind: m.throughput for m in measured if m.workers == 1}
    print("| workers | kind | requests/s | vs 1 worker | p50 | p99 |")
    print("|---:|---|---:|---:|---:|---:|")
    for m in sorted(measured, key=lambda m: (m.kind, m.workers)):
        p50, p99 = (m.histogram.get_value_at_percentile(p) / 1000 for p in (50, 99))
        print(
            f"| {m.workers} | {m.kind} | {m.throughput:,.0f} | "
            f"{fmt_ratio(m.throughput / one[m.kind])} | {p50:.2f} ms | {p99:.2f} ms |"
        )
    return 0
