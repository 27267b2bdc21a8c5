"""One outbox file per process: a bridge alone, or each of ``serve --workers N``. The files
no running process owns are taken over at start, each by exactly one process, and what
they hold is delivered (real SQLite files, the real embedded store)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.config import Config, ServerConfig
from bridge.episode import Episode, new_episode
from bridge.memory.delivery import Delivery
from bridge.memory.durable import EpisodeQueue
from bridge.memory.outbox import orphaned_outboxes
from bridge.memory.sqlite import SqliteMemory


def episode(i: int) -> Episode:
    return new_episode("g", f"e{i}", f"Error: number {i}", "test", {"i": i}, reference_time=i)


@pytest.fixture
async def memory(tmp_path: Path) -> AsyncIterator[SqliteMemory]:
    store = SqliteMemory(tmp_path / "memory.sqlite3")
    await store.start()
    yield store
    await store.close()


def test_each_worker_has_its_own_outbox_file(tmp_path: Path) -> None:
    assert Config(data_dir=tmp_path).outbox_path == tmp_path / "outbox.sqlite3"
    worker = Config(data_dir=tmp_path, server=ServerConfig(workers=3, worker=2))
    assert worker.outbox_path == tmp_path / "outbox-2.sqlite3"


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_every_file_no_process_owns_is_taken_over_by_exactly_one(
    tmp_path: Path, workers: int
) -> None:
    names = ["outbox.sqlite3", *(f"outbox-{n}.sqlite3" for n in range(1, 8))]
    for name in [*names, "outbox-x.sqlite3", "outbox-0.sqlite3"]:
        (tmp_path / name).touch()
    alone = orphaned_outboxes(tmp_path, 0, 1)
    assert {p.name for p in alone} == set(names[1:])
    owned = {f"outbox-{n}.sqlite3" for n in range(1, workers + 1)}
    taken = [p.name for k in range(1, workers + 1) for p in orphaned_outboxes(tmp_path, k, workers)]
    assert sorted(taken) == sorted(set(names) - owned)  # each once, none of a live worker
    assert "outbox.sqlite3" in [p.name for p in orphaned_outboxes(tmp_path, 1, workers)]


async def test_a_taken_over_outbox_is_delivered_and_removed(
    memory: SqliteMemory, tmp_path: Path
) -> None:
    left = tmp_path / "outbox-3.sqlite3"
    episodes = [episode(i) for i in range(10)]
    queue = EpisodeQueue(left)
    await queue.open()
    for e in episodes[:5]:
        await queue.append(e)
    await queue.close()
    own = EpisodeQueue(tmp_path / "outbox-1.sqlite3")
    await own.open()
    await own.append(episodes[9])
    await own.append(episodes[2])  # in the other file too: stored once
    await own.close()
    delivery = Delivery(memory, EpisodeQueue(tmp_path / "outbox-1.sqlite3"))
    await delivery.start(adopt=orphaned_outboxes(tmp_path, 1, 2))
    try:
        assert await delivery.flush(60.0)
    finally:
        await delivery.close()
    stored = [e for batch in [b async for b in memory.export("g", 100)] for e in batch]
    assert sorted(e.metadata["i"] for e in stored) == [0, 1, 2, 3, 4, 9]
    assert not left.exists()
    assert sorted(p.name for p in tmp_path.glob("outbox*.sqlite3")) == ["outbox-1.sqlite3"]
