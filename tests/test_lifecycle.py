"""Graceful shutdown of a real bridge process: SIGTERM lets in-flight requests finish,
closes connections with 1001 (going away), flushes metrics and stops its Valkey."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import textwrap
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import StatsdCollector
from tests.test_cli import bridge_process, children_of
from tests.waiting import eventually
from tests.wire import ask, receive, send

SLOW_SCRIPT = textwrap.dedent(
    """
    import json, pathlib, sys, time
    command = sys.argv[1]
    if command == "query":
        pathlib.Path(sys.argv[0]).with_name("query-running").touch()
        time.sleep(1.0)
        print(json.dumps({"episodes": [{"body": "slow but complete", "uuid": "u1"}]}))
    elif command == "export":
        pass
    """
)


async def query_running(script: Path) -> None:
    """Wait until the memory script beside ``script`` has started its slow query."""
    running = script.with_name("query-running")
    await eventually(running.exists, f"the memory script to start the query ({running})")


async def test_sigterm_finishes_in_flight_requests_then_closes_with_1001(
    tmp_path: Path, statsd: StatsdCollector
) -> None:
    script = tmp_path / "memory_manager.py"
    script.write_text(SLOW_SCRIPT)
    args = [
        "--data-dir", str(tmp_path / "data"),
        "--memory", "script", "--memory-script", str(script),
        "--miss-budget-ms", "5000",
    ]  # fmt: skip
    env = {"DD_DOGSTATSD_PORT": str(statsd.port)}
    async with bridge_process(*args, env=env) as bridge:
        (valkey,) = children_of(bridge.process.pid)
        async with connect(bridge.url) as ws:
            await send(ws, {"type": "query", "id": 1, "query": "slow"}, binary=True)
            await query_running(script)
            bridge.process.send_signal(signal.SIGTERM)
            reply = await receive(ws)
            assert reply["id"] == 1 and reply["type"] == "result"
            assert reply["episodes"][0]["body"] == "slow but complete"
            try:
                await asyncio.wait_for(ws.recv(), 10)
                raise AssertionError("the server should have closed the connection")
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1001
        assert await asyncio.wait_for(bridge.process.wait(), 20) == 0
    assert not Path(f"/proc/{valkey}").exists(), "the private Valkey outlived the bridge"
    durations = await statsd.wait_for(lambda line: "event:query" in line)
    assert durations, "the in-flight request's metric was not flushed at shutdown"


async def test_a_new_connection_during_shutdown_is_refused(
    tmp_path: Path, statsd: StatsdCollector
) -> None:
    script = tmp_path / "memory_manager.py"
    script.write_text(SLOW_SCRIPT)
    args = ["--data-dir", str(tmp_path / "data"), "--memory", "script",
            "--memory-script", str(script)]  # fmt: skip
    async with bridge_process(*args, env={"DD_DOGSTATSD_PORT": str(statsd.port)}) as bridge:
        async with connect(bridge.url) as ws:
            await send(ws, {"type": "query", "id": 1, "query": "slow"}, binary=True)
            await query_running(script)
            bridge.process.send_signal(signal.SIGTERM)
            await eventually(  # logged as the listener closes, in the same step
                lambda: any(line.endswith(" shutting down") for line in bridge.log),
                "the bridge to log that it is shutting down",
            )
            with pytest.raises(ConnectionRefusedError):
                async with connect(bridge.url, open_timeout=2):
                    pass
            assert (await receive(ws))["id"] == 1
        assert await asyncio.wait_for(bridge.process.wait(), 20) == 0


async def test_sigterm_delivers_the_outbox_before_exiting(
    tmp_path: Path, statsd: StatsdCollector
) -> None:
    """Episodes queued while memory was locked are in memory, and the outbox is empty, by
    the time the process exits on SIGTERM (not only at the next start)."""
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--store-timeout-ms", "100", "--project", "p"]
    async with bridge_process(*args, env={"DD_DOGSTATSD_PORT": str(statsd.port)}) as bridge:
        async with connect(bridge.url) as ws:
            await ask(ws, {"type": "ping", "id": 0}, binary=True)
            lock = sqlite3.connect(data / "memory.sqlite3", isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")
            try:
                for i in range(1, 6):
                    ack = await ask(
                        ws, {"type": "error", "id": i, "message": f"queued {i}"}, binary=True
                    )
                    assert ack["queued"], ack
            finally:
                lock.execute("ROLLBACK")
                lock.close()
        bridge.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(bridge.process.wait(), 30) == 0
    with contextlib.closing(sqlite3.connect(data / "memory.sqlite3")) as memory:
        stored = memory.execute("SELECT count(*) FROM episodes WHERE body LIKE 'Error: queued %'")
        assert stored.fetchone()[0] == 5
    with contextlib.closing(sqlite3.connect(data / "outbox.sqlite3")) as outbox:
        assert outbox.execute("SELECT count(*) FROM queue").fetchone()[0] == 0
