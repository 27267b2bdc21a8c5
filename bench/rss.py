"""Resident memory of a bridge server process holding many idle connections.

The bridge runs as its own process (``python -m bridge serve --port 0``, the way it is
deployed), with its own embedded valkey-server. The bench process opens the connections
(each answers one ping, so the server has registered it), then reads the server's
``VmRSS`` from ``/proc/<pid>/status`` before and after. The valkey-server child is
reported separately. The server is stopped with SIGTERM at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from websockets.asyncio.client import ClientConnection, connect

from bench.common import BenchError, request
from bench.process import RunningBridge, serve

BATCH: Final = 50  # connections opened at once


@dataclass(frozen=True)
class IdleMemory:
    """The server's memory before and with ``connections`` idle connections, in kB."""

    connections: int
    open_seconds: float
    rss_before_kb: int
    rss_after_kb: int
    hwm_kb: int
    per_connection_kb: float
    children_rss_kb: dict[str, int]
    nofile_limit: int


def status_kb(pid: int, field: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {field} in /proc/{pid}/status")


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux 3.5+)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text()
            found += [int(c) for c in text.split()]
    return found


def command_name(pid: int) -> str:
    """The short command name of ``pid``."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def raise_open_files(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to at least ``needed`` if the hard limit
    allows (children inherit it); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


@contextlib.asynccontextmanager
async def bridge_process(
    data_dir: Path, statsd_port: int, max_connections: int
) -> AsyncIterator[RunningBridge]:
    """A bridge (``bench.process.serve``) that admits ``max_connections``."""
    args = ["--max-connections", str(max_connections)]
    log = data_dir.parent / "server.log"
    async with serve(args, data_dir, statsd_port, log, stop_within=20.0) as bridge:
        yield bridge


async def open_idle(url: str, count: int) -> tuple[list[ClientConnection], float]:
    """``count`` connections that each answered one ping; and the seconds it took."""
    began = time.perf_counter()
    opened: list[ClientConnection] = []

    async def one(n: int) -> ClientConnection:
        ws = await connect(url, compression=None, ping_interval=None, open_timeout=30)
        reply = await request(ws, {"type": "ping", "id": n}, timeout=30.0)
        if reply.get("type") != "pong":
            raise BenchError(f"connection {n} answered a ping with {reply!r}")
        return ws

    try:
        for start in range(0, count, BATCH):
            batch = range(start, min(count, start + BATCH))
            results = await asyncio.gather(*(one(n) for n in batch), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise BenchError(f"opening idle connections failed: {result!r}")
                opened.append(result)
    except BaseException:
        await close_all(opened)
        raise
    return opened, time.perf_counter() - began


async def close_all(connections: list[ClientConnection]) -> None:
    """Close connections, ``BATCH`` at a time, none waiting more than 5 s."""
    for start in range(0, len(connections), BATCH):
        batch = connections[start : start + BATCH]
        await asyncio.gather(*(ws.close() for ws in batch), return_exceptions=True)


async def idle_memory(count: int, statsd_port: int) -> IdleMemory:
    """The server's RSS before and with ``count`` idle connections, and its peak."""
    limit = raise_open_files(count + 256)
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        data_dir = Path(tmp) / "data"
        async with bridge_process(data_dir, statsd_port, max(2000, count + 10)) as bridge:
            pid, url = bridge.pid, bridge.url
            await asyncio.sleep(0.5)  # let start-up work settle
            before = status_kb(pid, "VmRSS")
            connections, seconds = await open_idle(url + "/bench", count)
            try:
                await asyncio.sleep(1.0)
                after = status_kb(pid, "VmRSS")
                peak = status_kb(pid, "VmHWM")
                helpers = {f"{command_name(c)} ({c})": status_kb(c, "VmRSS") for c in children(pid)}
            finally:
                await close_all(connections)
    return IdleMemory(
        connections=count,
        open_seconds=round(seconds, 2),
        rss_before_kb=before,
        rss_after_kb=after,
        hwm_kb=peak,
        per_connection_kb=round((after - before) / count, 1),
        children_rss_kb=helpers,
        nofile_limit=limit,
    )
