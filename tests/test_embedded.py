"""The private valkey-server and FalkorDB: capped, supervised, and cleaned up after;
readiness that covers them and the data folder."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from websockets.asyncio.client import connect

from bridge.config import Config, LlmConfig, MemoryConfig, MetricsConfig, ServerConfig
from bridge.runtime.app import App
from bridge.runtime.embedded import VALKEY_MAXMEMORY, EmbeddedFalkorDB, EmbeddedValkey
from bridge.wire.health import MIN_FREE_BYTES, data_dir_problem
from tests.conftest import StatsdCollector, bridge_config, ws_url
from tests.test_limits import http_get
from tests.waiting import eventually
from tests.wire import ask


async def test_the_private_valkey_is_capped_and_never_evicts(valkey: EmbeddedValkey) -> None:
    client = redis.Redis.from_url(valkey.url)
    try:
        settings = await client.config_get("maxmemory*")
    finally:
        await client.aclose()
    assert VALKEY_MAXMEMORY == "256mb"
    assert settings["maxmemory"] == str(256 << 20)
    assert settings["maxmemory-policy"] == "noeviction"


@pytest.fixture
async def private_app(tmp_path: Path, statsd: StatsdCollector) -> AsyncIterator[App]:
    """A bridge with its own private valkey-server, as ``serve`` runs by default."""
    async with App(
        Config(
            data_dir=tmp_path / "data",
            server=ServerConfig(port=0),
            metrics=MetricsConfig(host="127.0.0.1", port=statsd.port),
        )
    ) as app:
        yield app


async def test_a_killed_private_valkey_comes_back_and_hits_resume(private_app: App) -> None:
    app = private_app
    assert app.valkey is not None and app.valkey.pid is not None
    query = {"type": "chat:start", "id": 2, "query": "what about src/phoenix.py"}
    async with connect(ws_url(app)) as ws:
        await ask(ws, {"type": "error", "id": 1, "message": "phoenix failed in src/phoenix.py"})
        assert not (await ask(ws, query))["hit"]
        assert (await ask(ws, query))["hit"]
        first = app.valkey.pid
        os.kill(first, signal.SIGKILL)
        await eventually(  # restart backoff starts at 0.1 s
            lambda: http_get(app, "/readyz"),
            "/readyz to come back",
            until=lambda answer: answer == (200, b"ready\n"),
            timeout=20,
        )
        assert app.valkey.pid not in (None, first)
        assert app.valkey.restarts == 1
        reply = await eventually(  # the cache's outage backoff is capped at 5 s
            lambda: ask(ws, query),
            "chat:start hits to resume on the restarted valkey-server",
            until=lambda reply: reply["hit"],
            timeout=20,
        )
        assert "phoenix failed" in reply["inject"]


async def test_kill_on_purpose_is_not_restarted(valkey: EmbeddedValkey) -> None:
    (supervisor,) = [t for t in asyncio.all_tasks() if t.get_name() == f"{valkey.name}-watch"]
    valkey.kill()
    # Only its supervisor restarts a server: once that has ended, nothing can.
    await eventually(supervisor.done, "the supervisor of the killed valkey-server to end")
    assert supervisor.cancelled()
    assert valkey.pid is None and valkey.restarts == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> AsyncIterator[Path]:  # type: ignore[misc]
    """A 32 MiB tmpfs of its own, so the test can fill it; unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"cannot mount a tmpfs: {done.stderr.strip()}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full."""
    filler = disk / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    return filler


async def test_readyz_says_when_the_data_dir_is_full(
    small_disk: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> None:
    app = App(bridge_config(small_disk, valkey, statsd.port))
    await app.start()
    try:
        assert await http_get(app, "/readyz") == (200, b"ready\n")
        filler = fill(small_disk)
        status, body = await http_get(app, "/readyz")
        assert status == 503
        assert f"below {MIN_FREE_BYTES >> 20} MiB".encode() in body
        assert body.startswith(b"data dir: ")
        assert data_dir_problem(small_disk, min_free=0) == (
            f"{small_disk}: cannot write (No space left on device)"
        ), "the write probe must fail on a full disk whatever the threshold"
        filler.unlink()
        assert await http_get(app, "/readyz") == (200, b"ready\n")
    finally:
        await app.stop()


OWNER = """
import asyncio, sys
from bridge.runtime.embedded import EmbeddedValkey

async def main():
    valkey = EmbeddedValkey()
    await valkey.start()
    print(valkey.dir, valkey.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_a_killed_owner_leaves_a_folder_the_next_start_removes(
    valkey: EmbeddedValkey, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A temp folder of this test's own, so that no server started by a test running in
    # parallel sweeps the stale folder before this test looks at it (short: it holds a
    # unix socket path).
    tmp_path = Path(tempfile.mkdtemp(prefix="gb-sweep-", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", OWNER, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert owner.stdout is not None
    try:
        line = await asyncio.wait_for(owner.stdout.readline(), 30)
    finally:
        owner.kill()
        await owner.wait()
    folder, child = Path(line.split()[0].decode()), int(line.split()[1])
    assert folder.parent == tmp_path
    await eventually(  # the child gets SIGTERM when its owner dies
        lambda: not Path(f"/proc/{child}").exists(), f"the owner's child {child} to exit"
    )
    assert folder.is_dir(), "the owner was killed: nothing could remove its folder"
    fresh = EmbeddedValkey()  # any start of a private server sweeps stale folders
    try:
        assert not folder.exists(), "a folder whose owner is gone was kept"
        assert valkey.dir.is_dir() and fresh.dir.is_dir(), "a live owner's folder was removed"
    finally:
        await fresh.close()
        shutil.rmtree(tmp_path, ignore_errors=True)


async def test_a_killed_private_falkordb_comes_back_with_its_graph(
    tmp_path: Path, statsd: StatsdCollector
) -> None:
    """The graphiti backend's private FalkorDB is supervised too: SIGKILLed, it is started
    again on its port with its password and its append-only file, and the same bridge
    stores and recalls again, with what it held before."""
    config = Config(
        data_dir=tmp_path / "data",
        server=ServerConfig(port=0),
        memory=MemoryConfig(backend="graphiti", llm=LlmConfig(mode="off")),
        metrics=MetricsConfig(host="127.0.0.1", port=statsd.port),
    )
    app = App(config)
    await app.start()
    try:
        assert app.falkor is not None and app.falkor.pid is not None
        async with connect(ws_url(app, "/graph")) as ws:
            before = {"type": "error", "id": 1, "message": "KeyError in src/ledger.py"}
            assert (await ask(ws, before))["ok"]
            first = app.falkor.pid
            os.kill(first, signal.SIGKILL)
            await eventually(  # the supervisor restarts it within a few seconds
                lambda: (
                    app.falkor is not None
                    and app.falkor.restarts == 1
                    and app.falkor.pid not in (None, first)
                ),
                "the private FalkorDB to be restarted",
                timeout=20,
            )
            assert app.falkor.restarts == 1 and app.falkor.pid != first
            after = {"type": "error", "id": 2, "message": "ValueError in src/ledger.py"}
            stored = await eventually(  # the graph driver reconnects on its next call
                lambda: ask(ws, after),
                "an episode stored in the restarted FalkorDB, not queued",
                until=lambda ack: ack["ok"] and not ack.get("queued"),
                every=0.1,
            )
            assert stored is not None and stored["ok"], stored
            found = await ask(ws, {"type": "query", "id": 3, "query": "ledger", "limit": 10})
            bodies = {e["body"] for e in found["episodes"]}
            assert {
                "Error: KeyError in src/ledger.py",
                "Error: ValueError in src/ledger.py",
            } <= bodies
    finally:
        await app.stop()


async def test_a_stopped_private_falkordb_leaves_one_snapshot_to_load(tmp_path: Path) -> None:
    """Stopping compacts the kept graph: what the append-only file held as queries is one
    snapshot afterwards, so the next start loads it without replaying any query (FalkorDB
    4.16 has crashed replaying them), and the graph is whole."""
    folder = tmp_path / "graph"
    falkor = EmbeddedFalkorDB(data_dir=folder)
    await falkor.start()
    try:
        await create_tasks(falkor, 20)
        written = sum(f.stat().st_size for f in (folder / "appendonlydir").glob("*.incr.aof"))
        assert written > 0  # the queries, as the server appended them
    finally:
        await falkor.close()
    incr = list((folder / "appendonlydir").glob("*.incr.aof"))
    assert incr and all(f.stat().st_size == 0 for f in incr)
    again = EmbeddedFalkorDB(data_dir=folder)
    await again.start()
    try:
        assert await graph_query(again, "MATCH (t:Task) RETURN count(t)") == [[20]]
    finally:
        await again.close()


async def graph_query(falkor: EmbeddedFalkorDB, query: str) -> Any:
    """The rows ``query`` finds in graph ``g`` of ``falkor``."""
    client = redis.Redis(host=falkor.host, port=falkor.port, password=falkor.password)
    try:
        reply = await client.execute_command("GRAPH.QUERY", "g", query)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()
    return reply[1] if len(reply) > 2 else []


async def create_tasks(falkor: EmbeddedFalkorDB, count: int) -> None:
    """Create ``count`` Task nodes in graph ``g``, one query each."""
    for n in range(count):
        await graph_query(falkor, f"CREATE (:Task {{n: {n}}})")


class CrashesOnce(EmbeddedFalkorDB):
    """A private FalkorDB whose first server is sent SIGSEGV as soon as it is spawned: the
    crash FalkorDB 4.16 had replaying a 100,000-episode graph's queries at start, which
    needs such a store to reproduce."""

    crashed = False

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        process = super()._spawn(argv)
        if not self.crashed:
            self.crashed = True
            process.send_signal(signal.SIGSEGV)
        return process


async def test_a_graph_falkordb_crashes_loading_is_replayed_as_a_client(tmp_path: Path) -> None:
    """When the server crashes loading the kept graph, a second one loads the snapshot
    alone and is sent the queries written since, as a client; it writes them all as one
    snapshot, which replaces the old file (kept beside it), and the graph is whole."""
    folder = tmp_path / "graph"
    first = EmbeddedFalkorDB(data_dir=folder)
    await first.start()
    try:
        await create_tasks(first, 50)
    finally:
        first.kill()  # SIGKILL: the queries stay in the append-only file, not compacted
        await first.close()
    again = CrashesOnce(data_dir=folder)
    await again.start()
    try:
        assert again.crashed and again.restarts == 0
        query = "MATCH (t:Task) RETURN count(DISTINCT t.n), max(t.n)"
        assert await graph_query(again, query) == [[50, 49]]
    finally:
        await again.close()
    [aside] = folder.glob("appendonlydir.not-replayed-*")
    assert sum(f.stat().st_size for f in aside.glob("*.incr.aof")) > 0  # the old queries
    assert (folder / "appendonlydir" / "appendonly.aof.manifest").exists()
