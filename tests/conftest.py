"""Fixtures that start real servers on loopback (free ports) and always stop them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from bridge.config import CacheConfig, Config, MetricsConfig, ServerConfig, with_changes
from bridge.memory.base import Recall
from bridge.memory.recall import Candidates
from bridge.memory.sqlite import SqliteMemory
from bridge.runtime.embedded import EmbeddedFalkorDB, EmbeddedValkey, sweep_stale_dirs
from tests.openai_standin import OpenAIStandin
from tests.ports import free_port
from tests.valkey_deployments import ValkeyCluster, ValkeySentinel
from tests.waiting import eventually

if TYPE_CHECKING:
    from bridge.runtime.app import App


class SlowMemory(SqliteMemory):
    """The real embedded store, made slow on purpose, counting its searches."""

    def __init__(self, path: Path, delay: float) -> None:
        super().__init__(path)
        self.delay = delay
        self.recalls = 0
        self.running = 0
        self.most_running = 0

    async def recall(self, group_id: str, query: str, limit: int) -> Recall:
        async with self._slowly():
            return await super().recall(group_id, query, limit)

    async def candidates(self, group_id: str, query: str) -> Candidates:
        async with self._slowly():
            return await super().candidates(group_id, query)

    @contextlib.asynccontextmanager
    async def _slowly(self) -> AsyncIterator[None]:
        self.recalls += 1
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.delay)
            yield
        finally:
            self.running -= 1


class StatsdCollector:
    """A real UDP socket on loopback that collects DogStatsD datagrams."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        self.lines: list[str] = []

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return
            self.lines.extend(line for line in data.decode().split("\n") if line)

    async def wait_for(self, predicate: Callable[[str], bool], timeout: float = 5.0) -> list[str]:
        """Lines matching ``predicate``, waiting (bounded) until at least one arrives."""

        def matching() -> list[str]:
            self._drain()
            return [line for line in self.lines if predicate(line)]

        return await eventually(matching, "a DogStatsD line the test looks for", timeout=timeout)

    def close(self) -> None:
        self.sock.close()


HUNG_REPORT_MARGIN_S = 20.0  # before pytest-timeout stops a test, its tasks are printed


@pytest.fixture(autouse=True)
async def hung_tasks_reported(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """A test still running shortly before pytest-timeout stops it prints the stack of
    every asyncio task on its loop to stderr: the timeout's own report shows threads only,
    and an await that hangs is visible only there."""
    timeout = float(request.config.getini("timeout") or 0)
    if timeout <= HUNG_REPORT_MARGIN_S:
        yield
        return
    loop = asyncio.get_running_loop()
    report = loop.call_later(timeout - HUNG_REPORT_MARGIN_S, _print_tasks, request.node.nodeid)
    try:
        yield
    finally:
        report.cancel()


def _print_tasks(test: str) -> None:
    tasks = asyncio.all_tasks()
    print(f"--- {test}: still running; its {len(tasks)} asyncio tasks ---", file=sys.stderr)
    for task in tasks:
        print(f"{task.get_name()}:", file=sys.stderr)
        awaiting: object = task.get_coro()
        while awaiting is not None:  # the chain of awaits down to the one that waits
            frame = next(
                (
                    getattr(awaiting, a)
                    for a in ("cr_frame", "gi_frame", "ag_frame")
                    if getattr(awaiting, a, None) is not None
                ),
                None,
            )
            if frame is not None:
                print(
                    f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}",
                    file=sys.stderr,
                )
            awaiting = next(
                (
                    getattr(awaiting, a)
                    for a in ("cr_await", "gi_yieldfrom", "ag_await")
                    if getattr(awaiting, a, None) is not None
                ),
                None,
            )


@pytest.fixture(scope="session", autouse=True)
def no_stale_private_dirs() -> Iterator[None]:
    """Tests kill bridges with SIGKILL on purpose: remove the private server folders they
    leave in the temp directory (only those whose owner process is gone)."""
    yield
    sweep_stale_dirs()


@pytest.fixture
def statsd() -> AsyncIterator[StatsdCollector]:  # type: ignore[misc]
    collector = StatsdCollector()
    yield collector
    collector.close()


@pytest.fixture
async def valkey() -> AsyncIterator[EmbeddedValkey]:
    """A real valkey-server on a free loopback port (killable and restartable)."""
    server = EmbeddedValkey(port=free_port())
    await server.start()
    yield server
    await server.close()


def bridge_config(
    tmp_path: Path, valkey: EmbeddedValkey, statsd_port: int, **changes: Any
) -> Config:
    """A Config for an in-process bridge on a free port, with ``changes`` per section
    (``bridge.config.with_changes``: e.g. ``limits={"max_inflight": 2}``)."""
    config = Config(
        data_dir=tmp_path / "data",
        server=ServerConfig(host="127.0.0.1", port=0),
        cache=CacheConfig(valkey_url=valkey.url),
        metrics=MetricsConfig(host="127.0.0.1", port=statsd_port),
    )
    return with_changes(config, **changes)


@pytest.fixture
async def app(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> AsyncIterator[App]:
    """A running bridge on a free loopback port, over the real Valkey fixture."""
    from bridge.runtime.app import App

    async with App(bridge_config(tmp_path, valkey, statsd.port)) as bridge:
        yield bridge


def ws_url(app: App, path: str = "/") -> str:
    """The WebSocket URL of a running in-process bridge."""
    assert app.server is not None
    return f"ws://127.0.0.1:{app.server.port}{path}"


@pytest.fixture
async def valkey_cluster() -> AsyncIterator[ValkeyCluster]:
    """A real Valkey Cluster on loopback: three primaries, each with a replica (free ports;
    see tests/valkey_deployments.py)."""
    cluster = ValkeyCluster(primaries=3, replicas=1)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.close()


@pytest.fixture
async def valkey_sentinel() -> AsyncIterator[ValkeySentinel]:
    """A real primary, its replica and a Sentinel watching them, on loopback."""
    deployment = ValkeySentinel()
    try:
        await deployment.start()
        yield deployment
    finally:
        await deployment.close()


@pytest.fixture
async def falkordb() -> AsyncIterator[EmbeddedFalkorDB]:
    """A real FalkorDB on a free loopback port, stopped after the test."""
    server = EmbeddedFalkorDB()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def standin() -> Iterator[OpenAIStandin]:
    """The stand-in OpenAI-compatible server (see tests/openai_standin.py)."""
    server = OpenAIStandin(dim=64)
    server.start()
    yield server
    server.stop()
