"""No acknowledged episode is lost: the outbox through backend outages and SIGKILL."""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.backoff import ExponentialWithJitterBackoff
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bridge.episode import Episode, new_episode
from bridge.errors import MemoryUnavailable
from bridge.memory.delivery import Delivery
from bridge.memory.durable import EpisodeQueue
from bridge.memory.sqlite import SqliteMemory
from bridge.runtime.app import App
from bridge.runtime.embedded import EmbeddedValkey
from tests import wire
from tests.conftest import StatsdCollector, bridge_config, ws_url
from tests.test_cli import bridge_process
from tests.waiting import eventually
from tests.wire import ask


class SwitchableMemory(SqliteMemory):
    """The real embedded store, with a switch that makes it fail or stall."""

    down = False
    stall = 0.0

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.landings: list[asyncio.Future[bool]] = []

    async def store(self, episode: Episode) -> bool:
        if self.down:
            raise MemoryUnavailable("switched off for the test")
        landing = asyncio.ensure_future(super().store(episode))  # lands even if we give up
        self.landings.append(landing)
        if self.stall:
            await asyncio.sleep(self.stall)
        return await landing


@pytest.fixture
async def memory(tmp_path: Path) -> AsyncIterator[SwitchableMemory]:
    store = SwitchableMemory(tmp_path / "memory.sqlite3")
    await store.start()
    yield store
    await store.close()


async def exported(memory: SqliteMemory, group: str = "g") -> list[Episode]:
    return [e for batch in [b async for b in memory.export(group, 1000)] for e in batch]


def episode(i: int) -> Episode:
    return new_episode("g", f"e{i}", f"Error: number {i}", "test", {"i": i}, reference_time=i)


async def test_a_down_backend_queues_acks_and_delivers_in_order_once_up(
    memory: SwitchableMemory, tmp_path: Path
) -> None:
    delivery = Delivery(memory, EpisodeQueue(tmp_path / "outbox.sqlite3"), store_timeout=1.0)
    await delivery.start()
    try:
        assert await delivery.store(episode(0)) is False  # straight into memory
        memory.down = True
        assert all([await delivery.store(episode(i)) for i in range(1, 6)])
        memory.down = False
        # Still queued behind the outbox, to keep the order:
        assert await delivery.store(episode(6)) is True
        assert await delivery.flush(60.0)
    finally:
        await delivery.close()
    stored = await exported(memory)
    assert [e.metadata["i"] for e in stored] == list(range(7))


async def test_a_slow_store_is_queued_and_still_stored_exactly_once(
    memory: SwitchableMemory, tmp_path: Path
) -> None:
    delivery = Delivery(memory, EpisodeQueue(tmp_path / "outbox.sqlite3"), store_timeout=0.05)
    await delivery.start()
    try:
        memory.stall = 0.2
        slow = episode(1)
        assert await delivery.store(slow) is True
        memory.stall = 0.0
        delivery.store_timeout = 30.0  # the delivery attempt must not time out on a slow disk
        assert await delivery.flush(60.0)
        await asyncio.gather(*memory.landings)  # the timed-out store landed as well
        assert len(memory.landings) == 2
    finally:
        await delivery.close()
    assert [e.uuid for e in await exported(memory)] == [slow.uuid]


async def outbox_lines(
    caplog: pytest.LogCaptureFixture, needle: str, level: int = logging.DEBUG
) -> list[str]:
    """Messages of ``bridge.memory.delivery`` log records containing ``needle``, waiting (bounded)
    until at least one is there."""
    return await eventually(  # delivery retries on a backoff of at most 10 s
        lambda: [
            r.getMessage()
            for r in caplog.records
            if r.name == "bridge.memory.delivery"
            and r.levelno == level
            and needle in r.getMessage()
        ],
        f"a bridge.memory.delivery log line with {needle!r}",
        timeout=60,
        every=0.05,
    )


async def test_every_outbox_failure_is_logged_with_its_exception_type(
    memory: SwitchableMemory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A timeout's message is empty: the log names the exception type, so the reason is
    never blank, for the store that queued the episode and for each failed delivery."""
    caplog.set_level(logging.DEBUG, logger="bridge.memory.delivery")
    backoff = ExponentialWithJitterBackoff(cap=0.05, base=0.01)
    delivery = Delivery(
        memory, EpisodeQueue(tmp_path / "outbox.sqlite3"), store_timeout=0.05, backoff=backoff
    )
    await delivery.start()
    try:
        memory.stall = 0.3  # slower than the store timeout, for the store and its deliveries
        slow = episode(1)
        assert await delivery.store(slow) is True
        queued = await outbox_lines(caplog, slow.uuid, logging.WARNING)
        assert queued == [f"memory did not take episode {slow.uuid}, queuing it: TimeoutError"]
        retried = await outbox_lines(caplog, f"outbox delivery of {slow.uuid} failed: ")
        assert retried[0].endswith("failed: TimeoutError")
        memory.stall = 0.0
        memory.down = True
        refused = await outbox_lines(caplog, "MemoryUnavailable")
        assert refused[0] == (
            f"outbox delivery of {slow.uuid} failed: MemoryUnavailable: switched off for the test"
        )
        memory.down = False
        delivery.store_timeout = 30.0  # the delivery attempt must not time out on a slow disk
        assert await delivery.flush(60.0)
        await asyncio.gather(*memory.landings)
    finally:
        await delivery.close()
    blank = [r.getMessage() for r in caplog.records if r.getMessage().rstrip().endswith(":")]
    assert blank == [], "a log line with an empty reason"
    assert [e.uuid for e in await exported(memory)] == [slow.uuid]


async def test_a_closed_queue_says_why_it_failed(tmp_path: Path) -> None:
    queue = EpisodeQueue(tmp_path / "q.sqlite3")
    await queue.open()
    await queue.close()
    with pytest.raises(MemoryUnavailable, match=r"^episode queue q\.sqlite3: RuntimeError: "):
        await queue.append(episode(0))


async def test_the_outbox_survives_a_restart(memory: SwitchableMemory, tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    first = Delivery(memory, EpisodeQueue(path), store_timeout=1.0)
    await first.start()
    memory.down = True
    for i in range(3):
        assert await first.store(episode(i))
    await first.close()  # stops with everything still queued
    memory.down = False
    second = Delivery(memory, EpisodeQueue(path), store_timeout=1.0)
    await second.start()
    try:
        assert await second.flush(60.0)
    finally:
        await second.close()
    assert [e.metadata["i"] for e in await exported(memory)] == [0, 1, 2]


async def test_sigkill_with_memory_locked_loses_no_acknowledged_episode(
    tmp_path: Path, statsd: StatsdCollector
) -> None:
    """Another process holds the memory database locked, so the bridge cannot store; it
    acknowledges from its outbox, is killed with SIGKILL, and a new bridge delivers all."""
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--store-timeout-ms", "100", "--project", "p"]
    env = {"DD_DOGSTATSD_PORT": str(statsd.port)}
    acked: list[str] = []
    async with bridge_process(*args, env=env) as bridge, connect(bridge.url) as ws:
        first = await ask(ws, {"type": "error", "id": 0, "message": "before the lock"}, binary=True)
        assert first["ok"] and not first.get("queued")
        acked.append(first["episode"])
        lock = sqlite3.connect(data / "memory.sqlite3", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            for i in range(1, 11):
                ack = await ask(
                    ws, {"type": "error", "id": i, "message": f"locked {i}"}, binary=True
                )
                assert ack["ok"] and ack["queued"], ack
                acked.append(ack["episode"])
            bridge.process.send_signal(signal.SIGKILL)
            await asyncio.wait_for(bridge.process.wait(), 10)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
    async with bridge_process(*args, env=env) as bridge, connect(bridge.url) as ws:
        episodes = await eventually(  # delivery starts at start-up
            lambda: wire.exported(ws, binary=True),
            "the outbox to be delivered (seen: the episodes exported)",
            until=lambda episodes: len(episodes) >= len(acked),
            every=0.05,
        )
        uuids = [e["uuid"] for e in episodes]
    assert sorted(uuids) == sorted(acked), "every acknowledged episode exactly once"


async def test_a_late_delivery_drops_contexts_cached_without_it(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> None:
    """While memory refuses a file:write, a chat:start caches a context without it; when the
    outbox delivers the episode, that context is dropped, so the next turn sees the write.
    (Empty contexts are not cached, so memory holds an earlier episode about the file.)"""
    memory = SwitchableMemory(tmp_path / "m.sqlite3")
    app = App(
        bridge_config(tmp_path, valkey, statsd.port, memory={"store_timeout_ms": 50}), memory=memory
    )
    await app.start()
    try:
        async with connect(ws_url(app)) as ws:
            error = {"type": "error", "id": 0, "message": "ImportError in src/late.py"}
            earlier = await ask(ws, error, binary=True)
            assert earlier["ok"] and not earlier.get("queued")
            memory.down = True
            ack = await ask(ws, {"type": "file:write", "id": 1, "path": "src/late.py"}, binary=True)
            assert ack["ok"] and ack["queued"]
            query = {"type": "chat:start", "id": 2, "query": "what about src/late.py"}
            assert "ImportError" in (await ask(ws, query, binary=True))["inject"]
            assert (await ask(ws, query, binary=True))["hit"]  # cached while memory lacks the write
            memory.down = False
            assert app.delivery is not None and await app.delivery.flush(10.0)
            found = await ask(ws, {"type": "query", "id": 3, "query": "src/late.py"}, binary=True)
            assert ack["episode"] in [e["uuid"] for e in found["episodes"]]
            after = await ask(ws, query, binary=True)
            assert not after["hit"], "the context cached without the write was dropped"
            assert "ImportError" in after["inject"]
    finally:
        await app.stop()


async def test_sigkill_under_load_loses_no_acknowledged_episode(
    tmp_path: Path, statsd: StatsdCollector
) -> None:
    """Four connections store episodes as fast as they are acknowledged; the bridge is
    killed with SIGKILL in the middle; the next bridge on the same data has every one."""
    args = ["--data-dir", str(tmp_path / "data"), "--project", "p"]
    env = {"DD_DOGSTATSD_PORT": str(statsd.port)}
    acked: list[str] = []
    enough = asyncio.Event()

    async def writer(url: str, n: int) -> None:
        try:
            async with connect(url) as ws:
                for i in range(100_000):  # bounded; the kill ends it much sooner
                    message = {"type": "file:write", "id": i, "path": f"w{n}/f{i}.py"}
                    ack = await ask(ws, message, binary=True)
                    assert ack["ok"], ack
                    acked.append(ack["episode"])
                    if len(acked) >= 300:
                        enough.set()
        except (ConnectionClosed, OSError):
            return

    async with bridge_process(*args, env=env) as bridge:
        writers = [asyncio.create_task(writer(bridge.url, n)) for n in range(4)]
        await asyncio.wait_for(enough.wait(), 60)
        bridge.process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(bridge.process.wait(), 10)
        await asyncio.wait_for(asyncio.gather(*writers), 10)
    async with bridge_process(*args, env=env) as bridge, connect(bridge.url) as ws:
        uuids = [e["uuid"] for e in await wire.exported(ws, binary=True)]
    assert set(acked) <= set(uuids), f"{len(set(acked) - set(uuids))} acknowledged episodes lost"
    assert len(uuids) == len(set(uuids))


async def test_the_queue_keeps_order_and_one_copy_of_each_episode(tmp_path: Path) -> None:
    queue = EpisodeQueue(tmp_path / "q.sqlite3")
    await queue.open()
    episodes = [episode(i) for i in range(5)]
    for e in [*episodes, episodes[1], episodes[3]]:
        await queue.append(e)
    assert queue.pending == 5
    assert [e.uuid for e in await queue.head(3)] == [e.uuid for e in episodes[:3]]
    await queue.remove(episodes[0].uuid)
    await queue.close()
    reopened = EpisodeQueue(tmp_path / "q.sqlite3")
    await reopened.open()
    try:
        assert reopened.pending == 4
        assert [e.uuid for e in await reopened.head()] == [e.uuid for e in episodes[1:]]
    finally:
        await reopened.close()
