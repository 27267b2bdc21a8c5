"""``graphiti-bridge serve --workers N`` as users run it: a parent process, its private
valkey-server and N worker processes sharing one port (SO_REUSEPORT) and one embedded
store, all real processes on loopback. Which worker serves a connection is read from
/proc (the worker process holding the server end of the socket)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from bridge.config import ConfigError, parse_serve
from bridge.runtime.workers import reserve_port
from tests import wire
from tests.test_cli import BridgeProcess, bridge_process, children_of
from tests.test_startup import refused
from tests.waiting import eventually
from tests.wire import exported

# Each message gets an id of its own, and its reply must carry it.
ask = functools.partial(wire.ask, fresh_id=True, timeout=30.0)


@pytest.fixture
async def bridge(tmp_path: Path) -> AsyncIterator[BridgeProcess]:
    """``serve --workers 2`` on a free port, its own private Valkey and data folder."""
    async with bridge_process("--workers", "2", "--data-dir", str(tmp_path / "data")) as b:
        yield b


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def workers_of(parent: int) -> dict[int, int]:
    """The running workers of a parent: worker number -> pid."""
    found = {}
    for pid in children_of(parent):
        argv = command_line(pid)
        if "worker" in argv:
            found[int(argv[argv.index("worker") + 1])] = pid
    return found


def port_of(bridge: BridgeProcess) -> int:
    return int(bridge.url.rsplit(":", 1)[1])


def serving_pid(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """The process among ``pids`` holding the server end of the loopback connection from
    ``client_port`` (read from /proc/net/tcp and each process's descriptors)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(f.split(":")[1], 16) for f in fields[1:3])
        if (local, remote) == (server_port, client_port):
            inode = fields[9]
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == f"socket:[{inode}]":
                        return pid
    return None


async def one_per_worker(bridge: BridgeProcess, path: str) -> dict[int, ClientConnection]:
    """WebSocket connections to ``path`` until one is served by each worker (pid ->
    connection); the others are closed."""
    workers = list(workers_of(bridge.process.pid).values())
    found: dict[int, ClientConnection] = {}
    for _ in range(64):
        ws = await connect(bridge.url + path)
        pid = serving_pid(port_of(bridge), ws.local_address[1], workers)
        if pid is not None and pid not in found:
            found[pid] = ws
        else:
            await ws.close()
        if len(found) == len(workers):
            return found
    raise AssertionError(f"connections did not reach every worker: {sorted(found)}")


async def healthz(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return response.decode().split("\r\n\r\n", 1)[1]


async def test_two_workers_answer_on_one_port_and_share_the_connections(
    bridge: BridgeProcess,
) -> None:
    workers = workers_of(bridge.process.pid)
    assert sorted(workers) == [1, 2]
    assert "(2 workers; cache: a private valkey-server" in bridge.started_line
    seen: set[str] = set()
    for _ in range(200):
        seen.add(await healthz(port_of(bridge)))
        if len(seen) == 2:
            break
    assert seen == {f"ok (worker {n}, pid {pid})\n" for n, pid in workers.items()}


async def test_a_write_through_one_worker_is_recalled_and_a_forget_honoured_on_another(
    bridge: BridgeProcess,
) -> None:
    connections = await one_per_worker(bridge, "/shop")
    try:
        (first, ws_a), (second, ws_b) = connections.items()
        assert first != second
        opened = await ask(ws_a, {"type": "chat:start", "query": "fix the invoice rounding"})
        assert opened["type"] == "context"
        ack = await ask(ws_a, {"type": "file:write", "path": "src/billing/rounding.py"})
        assert ack["ok"] and not ack.get("queued"), ack
        reply = await ask(ws_b, {"type": "chat:start", "query": "invoice rounding is off again"})
        assert "src/billing/rounding.py" in (reply["inject"] or ""), reply
        # and back: a write through the second is in the first's recall at once
        ack = await ask(ws_b, {"type": "file:write", "path": "src/billing/tax.py"})
        assert ack["ok"], ack
        reply = await ask(ws_a, {"type": "chat:start", "query": "invoice tax rounding"})
        assert "src/billing/tax.py" in (reply["inject"] or ""), reply
        # a forget through one worker is honoured by the other at once
        ack = await ask(ws_b, {"type": "forget", "path": "src/billing/rounding.py"})
        assert ack["ok"] and ack["forgotten"] == 1, ack
        reply = await ask(ws_a, {"type": "chat:start", "query": "invoice tax rounding"})
        assert "src/billing/tax.py" in (reply["inject"] or ""), reply
        assert "rounding.py" not in reply["inject"], reply
    finally:
        for ws in connections.values():
            await ws.close()


async def keep_writing(url: str, name: str, acked: list[str], until: asyncio.Event) -> None:
    """Send errors one at a time, reconnecting whenever the connection drops (resending
    the unacknowledged one under the same episode_id), until ``until`` is set."""
    for n in range(10_000):
        if until.is_set():
            return
        message = {"type": "error", "message": f"{name} failure {n}", "episode_id": f"{name}-{n}"}

        async def write(message: dict[str, str] = message) -> str:
            async with connect(url) as ws:
                ack = await ask(ws, message)
                assert ack["ok"], ack
                return str(ack["episode"])

        episode = await eventually(
            write,
            f"{name}: a worker to take {message}",
            ignoring=(WebSocketException, OSError),  # its worker was killed: again
            every=0.05,
            timeout=30,
        )
        acked.append(episode)


async def test_a_killed_worker_is_started_again_and_nothing_acknowledged_is_lost(
    bridge: BridgeProcess,
) -> None:
    before = workers_of(bridge.process.pid)
    acked: list[str] = []
    until = asyncio.Event()
    writers = [
        asyncio.create_task(keep_writing(bridge.url + "/ops", f"client{n}", acked, until))
        for n in range(4)
    ]
    try:
        await eventually(lambda: len(acked) >= 40, "40 acknowledged writes", timeout=30)
        os.kill(before[1], signal.SIGKILL)
        await eventually(
            lambda: any("worker 1 restarted" in line for line in bridge.log) and len(acked) >= 120,
            "worker 1 restarted and 120 acknowledged writes",
            timeout=30,
        )
        until.set()
        await asyncio.gather(*writers)
    finally:
        until.set()
        for task in writers:
            task.cancel()
    now = workers_of(bridge.process.pid)
    assert now[2] == before[2] and now[1] != before[1]
    assert any("worker 1 restarted" in line for line in bridge.log)
    async with connect(bridge.url + "/ops") as ws:
        stored = {e["uuid"] for e in await exported(ws)}
    assert set(acked) <= stored
    assert len(set(acked)) >= 120


async def test_sigterm_to_the_parent_ends_every_process_within_10_s(tmp_path: Path) -> None:
    async with bridge_process("--workers", "2", "--data-dir", str(tmp_path / "data")) as bridge:
        async with connect(bridge.url + "/x") as ws:
            assert (await ask(ws, {"type": "error", "message": "before the stop"}))["ok"]
        parent = bridge.process.pid
        family = children_of(parent)
        assert len(family) == 3  # two workers and the private valkey-server
        assert any("valkey-server" in " ".join(command_line(pid)) for pid in family)
        bridge.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(bridge.process.wait(), 10) == 0
    left = await eventually(  # reaped by init once their parent is gone
        lambda: [pid for pid in family if Path(f"/proc/{pid}").exists() and not zombie(pid)],
        "every child of the stopped parent to be gone (seen: those left)",
        until=lambda left: not left,
    )
    assert left == []


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def test_a_port_in_use_stops_the_parent_before_any_worker(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = await refused(
            "serve", "--workers", "2", "--port", str(port), "--data-dir", str(tmp_path / "d")
        )
    assert line == f"graphiti-bridge: cannot listen on 127.0.0.1:{port}: Address already in use"


async def test_a_worker_that_cannot_start_stops_the_bridge_saying_why(tmp_path: Path) -> None:
    script = tmp_path / "memory_manager.py"
    line = await refused(
        "serve", "--workers", "2", "--port", "0", "--data-dir", str(tmp_path / "d"),
        "--memory", "script", "--memory-script", str(script),
    )  # fmt: skip
    assert line == (
        "graphiti-bridge: worker 1 did not start: the script memory cannot start: "
        f"memory script {script} is not a file"
    )


def test_workers_is_checked_like_every_setting() -> None:
    assert parse_serve([], {}).server.workers == 1
    assert parse_serve([], {"BRIDGE_WORKERS": "4"}).server.workers == 4
    assert parse_serve(["--workers", "3"], {"BRIDGE_WORKERS": "4"}).server.workers == 3
    with pytest.raises(ConfigError, match="BRIDGE_WORKERS: must be a positive integer, got '0'"):
        parse_serve([], {"BRIDGE_WORKERS": "0"})
    with pytest.raises(ConfigError, match="--workers 1000 is more than 256"):
        parse_serve(["--workers", "1000"], {})


async def test_the_parents_hold_on_the_port_lets_only_its_workers_bind() -> None:
    """The parent holds the port (bound, not listening) before any worker starts: a worker
    binds beside it with SO_REUSEPORT, another bridge's check and a plain listener are
    refused, and a connection reaches the worker only."""
    held, port = reserve_port("127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            reserve_port("127.0.0.1", port)
        with pytest.raises(OSError):
            await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
        served = asyncio.Event()

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            served.set()
            writer.close()

        worker = await asyncio.start_server(answer, "127.0.0.1", port, reuse_port=True)
        async with worker:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.wait_for(served.wait(), 10)
            writer.close()
    finally:
        for sock in held:
            sock.close()
