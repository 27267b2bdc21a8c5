"""One shutdown deadline for every step: a real bridge process whose memory is stuck still
exits on SIGTERM within the 10 s a container runtime grants before SIGKILL, and every
episode it acknowledged is kept in its outbox and delivered by the next start.

Memory is stuck for real: another connection holds an exclusive transaction on the
embedded store for the whole shutdown, so each write waits on SQLite's lock (in a thread,
which nothing can cancel); or the graph database is frozen with SIGSTOP, so each call to
it waits on a socket that never answers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from tests.conftest import StatsdCollector
from tests.test_cli import BridgeProcess, bridge_process, children_of
from tests.waiting import eventually
from tests.wire import ask, exported, send

GRANTED = 10.0  # seconds between SIGTERM and SIGKILL under docker stop or Kubernetes


async def exits_in_time(bridge: BridgeProcess) -> None:
    """SIGTERM ``bridge``; it must exit with status 0 within GRANTED seconds."""
    bridge.process.send_signal(signal.SIGTERM)
    try:
        status = await asyncio.wait_for(bridge.process.wait(), GRANTED)
    except TimeoutError:
        raise AssertionError(
            f"still running {GRANTED:.0f} s after SIGTERM:\n" + "\n".join(bridge.log)
        ) from None
    assert status == 0


def stored(path: Path, table: str, uuids: list[str]) -> set[str]:
    """Which of ``uuids`` the SQLite file at ``path`` holds in ``table``."""
    marks = ",".join("?" * len(uuids))
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute(f"SELECT uuid FROM {table} WHERE uuid IN ({marks})", uuids)
        return {uuid for (uuid,) in rows}


@pytest.mark.slow
async def test_sigterm_with_memory_stuck_exits_in_time_and_keeps_every_acknowledged_episode(
    tmp_path: Path, statsd: StatsdCollector
) -> None:
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--store-timeout-ms", "100", "--project", "p"]
    env = {"DD_DOGSTATSD_PORT": str(statsd.port)}
    acked: list[str] = []
    with contextlib.ExitStack() as holding:
        async with bridge_process(*args, env=env) as bridge:
            async with connect(bridge.url) as ws:
                assert (await ask(ws, {"type": "ping", "id": 0}, binary=True))["type"] == "pong"
                lock = sqlite3.connect(data / "memory.sqlite3", isolation_level=None)
                holding.callback(lock.close)  # the transaction ends with its connection
                lock.execute("BEGIN EXCLUSIVE")  # from here on, every write to memory waits
                for i in range(1, 6):
                    message = {"type": "error", "id": i, "message": f"stuck {i}"}
                    ack = await ask(ws, message, binary=True)
                    assert ack["ok"] and ack["queued"], ack
                    acked.append(ack["episode"])
            await exits_in_time(bridge)
        # Memory never took them (it was locked throughout); the outbox has every one.
        assert stored(data / "outbox.sqlite3", "queue", acked) == set(acked)
    async with bridge_process(*args, env=env) as bridge:
        await eventually(  # the outbox is delivered as soon as the bridge starts
            lambda: stored(data / "memory.sqlite3", "episodes", acked) == set(acked),
            "the outbox to be delivered to memory at the next start",
            timeout=30,
        )
        assert stored(data / "memory.sqlite3", "episodes", acked) == set(acked)
        bridge.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(bridge.process.wait(), GRANTED) == 0
    assert stored(data / "outbox.sqlite3", "queue", acked) == set()


@pytest.mark.slow
async def test_sigterm_with_the_graph_frozen_exits_in_time_and_keeps_every_acknowledged_episode(
    tmp_path: Path, statsd: StatsdCollector
) -> None:
    """The graphiti backend on its private FalkorDB, frozen with SIGSTOP: a query waits on
    it in flight and the outbox's delivery waits on it too when SIGTERM comes."""
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--memory", "graphiti", "--llm", "off",
            "--store-timeout-ms", "100", "--project", "p"]  # fmt: skip
    env = {"DD_DOGSTATSD_PORT": str(statsd.port)}
    acked: list[str] = []
    async with bridge_process(*args, env=env) as bridge:
        (falkordb,) = [
            pid
            for pid in children_of(bridge.process.pid)
            if "falkordb" in Path(f"/proc/{pid}/cmdline").read_text()
        ]
        async with connect(bridge.url) as ws:
            assert (await ask(ws, {"type": "ping", "id": 0}, binary=True))["type"] == "pong"
            os.kill(falkordb, signal.SIGSTOP)
            try:
                for i in range(1, 4):
                    message = {"type": "error", "id": i, "message": f"frozen {i}"}
                    ack = await ask(ws, message, binary=True)
                    assert ack["ok"] and ack["queued"], ack
                    acked.append(ack["episode"])
                await send(ws, {"type": "query", "id": 4, "query": "frozen"}, binary=True)
                # Read in order: the pong says the query was read, and is waiting on the graph.
                assert (await ask(ws, {"type": "ping", "id": 5}, binary=True))["id"] == 5
                await exits_in_time(bridge)
            finally:
                with contextlib.suppress(ProcessLookupError):  # gone with the bridge
                    os.kill(falkordb, signal.SIGCONT)
    assert stored(data / "outbox.sqlite3", "queue", acked) == set(acked)
    async with bridge_process(*args, env=env) as bridge, connect(bridge.url) as ws:

        async def in_memory() -> set[str]:
            return {e["uuid"] for e in await exported(ws)}

        await eventually(  # the outbox is delivered as soon as the bridge starts
            in_memory,
            "the outbox to be delivered to the graph at the next start",
            until=lambda uuids: set(acked) <= uuids,
            timeout=30,
        )
        await exits_in_time(bridge)
    assert stored(data / "outbox.sqlite3", "queue", acked) == set()
