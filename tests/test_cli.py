"""The server as users run it: ``python -m bridge serve`` in its own process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from websockets.asyncio.client import connect

from bridge.runtime.embedded import EmbeddedValkey
from tests.conftest import StatsdCollector
from tests.wire import ask

LISTENING = re.compile(rb"listening on (ws://[\d.]+:\d+)")


class BridgeProcess:
    """A running ``python -m bridge serve``, the URL it printed, and its log so far."""

    def __init__(self, process: asyncio.subprocess.Process, started_line: str) -> None:
        self.process = process
        self.started_line = started_line
        match = LISTENING.search(started_line.encode())
        assert match, f"no listening line; got {started_line!r}"
        self.url = match.group(1).decode()
        self.log: list[str] = []

    async def collect_log(self) -> None:
        """Read the server's stderr as it comes, so a full pipe never blocks it."""
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.log.append(line.decode(errors="replace").rstrip())


@asynccontextmanager
async def bridge_process(
    *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[BridgeProcess]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "serve", "--port", "0", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        bridge = BridgeProcess(process, line.decode(errors="replace"))
        reader = asyncio.create_task(bridge.collect_log())
        try:
            yield bridge
        finally:
            reader.cancel()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()


def children_of(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


async def test_serve_on_embedded_defaults_owns_its_valkey(
    tmp_path: Path, statsd: StatsdCollector
) -> None:
    data = tmp_path / "data"
    env = {"BRIDGE_DATA_DIR": str(data), "DD_DOGSTATSD_PORT": str(statsd.port)}
    async with bridge_process(env=env) as bridge:
        valkeys = children_of(bridge.process.pid)
        assert len(valkeys) == 1, "serve without --valkey-url starts one private valkey-server"
        assert "valkey-server" in Path(f"/proc/{valkeys[0]}/cmdline").read_text()
        async with connect(bridge.url) as ws:
            canary = {"type": "error", "id": 1, "message": "cli canary"}
            assert (await ask(ws, canary, binary=True))["ok"]
            reply = await ask(ws, {"type": "chat:start", "id": 2, "query": "canary"}, binary=True)
            assert "cli canary" in reply["inject"]
            again = await ask(ws, {"type": "chat:start", "id": 3, "query": "canary"}, binary=True)
            assert again["hit"]
        bridge.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(bridge.process.wait(), 20) == 0
    assert not Path(f"/proc/{valkeys[0]}").exists(), "the private valkey-server outlived the bridge"
    assert (data / "memory.sqlite3").exists()


async def test_two_bridges_on_one_valkey_with_stores_of_their_own_share_no_contexts(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> None:
    """Each embedded store is its own memory: a context cached for one is never the
    other's answer (bridges sharing a graph share contexts: tests/test_many_bridges.py)."""
    common = ["--valkey-url", valkey.url]
    env = {"DD_DOGSTATSD_PORT": str(statsd.port)}
    async with (
        bridge_process(*common, "--data-dir", str(tmp_path / "one"), env=env) as one,
        bridge_process(*common, "--data-dir", str(tmp_path / "two"), env=env) as two,
        connect(one.url) as ws_one,
        connect(two.url) as ws_two,
    ):
        remembered = {"type": "error", "id": 0, "message": "KeyError in src/shared.py"}
        assert (await ask(ws_one, remembered, binary=True))["ok"]  # an empty answer is never cached
        query = {"type": "chat:start", "id": 1, "query": "what about src/shared.py"}
        assert not (await ask(ws_one, query, binary=True))["hit"]
        assert (await ask(ws_one, query, binary=True))["hit"]
        other = await ask(ws_two, query, binary=True)
        assert not other["hit"], "the second bridge answered with the first store's context"
        assert "KeyError" not in (other.get("inject") or "")


async def test_flags_and_environment_are_validated(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "serve", "--cache-ttl", "0",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"--cache-ttl" in err and b"must be a positive integer" in err
