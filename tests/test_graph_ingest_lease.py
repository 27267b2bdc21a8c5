"""The graphiti backend's ingestion when processes share a graph: a group is ingested by one
of them at a time, under its lease in Valkey. Two GraphitiMemory instances stand for two
processes (each its own queue file, driver and ingest workers) on one real FalkorDB and
one real valkey-server; the LLM and embedder are the loopback stand-in of
tests/openai_standin.py (this machine cannot reach a remote LLM API)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar, TypeVar

import pytest
import redis.asyncio as redis

from bridge.episode import Episode, new_episode
from bridge.memory.durable import EpisodeQueue
from bridge.memory.graphiti import GraphitiMemory
from bridge.memory.lease import Leases
from bridge.runtime.embedded import EmbeddedFalkorDB, EmbeddedValkey
from tests.openai_standin import OpenAIStandin, fact
from tests.waiting import eventually


class Watched(GraphitiMemory):
    """The real backend, counting how many extractions of all instances run at once."""

    running: ClassVar[int] = 0
    most: ClassVar[int] = 0

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.ingested: list[str] = []

    async def _ingest(self, episode: Episode) -> None:
        Watched.running += 1
        Watched.most = max(Watched.most, Watched.running)
        try:
            await super()._ingest(episode)
            self.ingested.append(episode.uuid)
        finally:
            Watched.running -= 1


@pytest.fixture
async def client(valkey: EmbeddedValkey) -> AsyncIterator[redis.Redis]:
    connection = redis.Redis.from_url(valkey.url)
    yield connection
    await connection.aclose()


M = TypeVar("M", bound=GraphitiMemory)


def process(
    falkordb: EmbeddedFalkorDB,
    standin: OpenAIStandin,
    folder: Path,
    number: int,
    leases: Leases,
    kind: type[M],
) -> M:
    """The graphiti backend of process ``number`` sharing ``folder``: its own queue file,
    the stand-in as LLM, the ingest ``leases`` in Valkey."""
    return kind(
        falkordb.url,
        state_dir=folder,
        llm=standin.settings(),
        queue_path=folder / f"graphiti-queue-{number}.sqlite3",
        leases=leases,
    )


def episode(body: str, at: float) -> Episode:
    return new_episode("proj", "note", body, "test", {}, reference_time=at)


async def ingested(*memories: GraphitiMemory) -> None:
    """Wait until no episode waits in any of ``memories``' queues."""
    await eventually(
        lambda: [m.pending() for m in memories],
        "every queued episode to be ingested (seen: episodes queued in each)",
        until=lambda pending: not any(pending),
        timeout=60,
    )


async def test_a_group_is_ingested_by_one_process_at_a_time(
    falkordb: EmbeddedFalkorDB, standin: OpenAIStandin, client: redis.Redis, tmp_path: Path
) -> None:
    standin.delay = 0.01  # every extraction takes a while: overlaps would show
    leases = Leases(lambda: client, "gb:ingest:test:", ttl=2.0)
    pair = [process(falkordb, standin, tmp_path, n, leases, Watched) for n in (1, 2)]
    for memory in pair:
        await memory.start()
    try:
        now = time.time()
        await asyncio.gather(
            *(
                pair[n % 2].store(episode(f"Error: KeyError in Module{n}.py at step_{n}", now + n))
                for n in range(8)
            )
        )
        await ingested(*pair)
        assert Watched.most == 1
        assert [len(m.ingested) for m in pair] == [4, 4]  # each its own queue
        recall = await pair[0].recall("proj", "KeyError Module3.py", 8)
        assert fact("KeyError", "Module3.py") in recall.facts
        assert await client.exists("gb:ingest:test:proj") == 0  # let go once idle
    finally:
        for memory in pair:
            await memory.close()


async def test_a_process_waits_for_the_holder_and_takes_over_when_it_stops(
    falkordb: EmbeddedFalkorDB, standin: OpenAIStandin, client: redis.Redis, tmp_path: Path
) -> None:
    leases = Leases(lambda: client, "gb:ingest:test:", ttl=2.0)
    first, second = (
        process(falkordb, standin, tmp_path, n, leases, GraphitiMemory) for n in (1, 2)
    )
    await first.start()
    await second.start()
    try:
        standin.pause()  # the first's extraction hangs while it holds the lease
        await first.store(episode("Error: TypeError in parser.ts", time.time()))
        await eventually(
            lambda: client.exists("gb:ingest:test:proj"), "the first to take the ingest lease"
        )
        await second.store(episode("Completed: migrate user_table to SchemaV2", time.time()))
        await first.close()  # stopped mid-extraction: its episode stays queued, lease let go
        standin.resume()
        await ingested(second)
        recall = await second.recall("proj", "user_table SchemaV2", 8)
        assert fact("user_table", "SchemaV2") in recall.facts
    finally:
        standin.resume()
        await second.close()
    again = process(falkordb, standin, tmp_path, 1, leases, GraphitiMemory)
    await again.start()
    try:
        assert again.pending("proj") == 1  # the first's episode, still in its file
        await ingested(again)
    finally:
        await again.close()


async def test_a_queue_file_no_process_keeps_is_taken_over(
    falkordb: EmbeddedFalkorDB, standin: OpenAIStandin, tmp_path: Path
) -> None:
    left = tmp_path / "graphiti-queue.sqlite3"  # a bridge alone ran here before
    queue = EpisodeQueue(left)
    await queue.open()
    await queue.append(episode("Error: KeyError in CacheLayer.py", time.time()))
    await queue.close()
    memory = GraphitiMemory(
        falkordb.url,
        state_dir=tmp_path,
        llm=standin.settings(),
        queue_path=tmp_path / "graphiti-queue-1.sqlite3",
        take_over=[left],
    )
    await memory.start()
    try:
        await ingested(memory)
        recall = await memory.recall("proj", "KeyError CacheLayer.py", 8)
        assert fact("KeyError", "CacheLayer.py") in recall.facts
    finally:
        await memory.close()
    assert not left.exists()
