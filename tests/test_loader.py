"""The context loader over a real Valkey and the real embedded store, without a socket.

Memory is held back by a gate the test opens, not by a delay, so whether an answer came
within the miss budget never depends on how fast this machine is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.cache.contexts import ContextCache
from bridge.cache.loader import ContextLoader
from bridge.episode import new_episode
from bridge.memory.recall import Candidates
from bridge.metrics import Metrics
from bridge.runtime.embedded import EmbeddedValkey
from tests.conftest import SlowMemory, StatsdCollector

PROJECT = "proj"


class GatedMemory(SlowMemory):
    """The real embedded store, counting its searches, whose searches wait for ``gate``."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, delay=0.0)
        self.gate = asyncio.Event()
        self.gate.set()

    async def candidates(self, group_id: str, query: str) -> Candidates:
        await self.gate.wait()
        return await super().candidates(group_id, query)


@pytest.fixture
async def memory(tmp_path: Path) -> AsyncIterator[GatedMemory]:
    store = GatedMemory(tmp_path / "memory.sqlite3")
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def cache(valkey: EmbeddedValkey) -> AsyncIterator[ContextCache]:
    cache = ContextCache.from_url(valkey.url, ttl=60)
    await cache.start()
    yield cache
    await cache.close()


@pytest.fixture
async def loader(
    memory: GatedMemory, cache: ContextCache, statsd: StatsdCollector
) -> AsyncIterator[ContextLoader]:
    metrics = Metrics("127.0.0.1", statsd.port, buffered=False)
    loader = ContextLoader(memory, cache, metrics, miss_budget=10.0)
    yield loader
    memory.gate.set()
    await loader.drain()
    await metrics.close()


async def remember(memory: GatedMemory, body: str) -> None:
    """Store one episode of the project in the real store."""
    await memory.store(new_episode(PROJECT, "error", body, "test", {"type": "error"}))


async def test_a_miss_answers_from_memory_and_the_same_question_then_hits(
    loader: ContextLoader, memory: GatedMemory
) -> None:
    await remember(memory, "Error: database connection refused")
    first = await loader.load(PROJECT, "why was the database connection refused?")
    assert not first.hit
    assert first.inject is not None and "Error: database connection refused" in first.inject
    # Typed differently, the same question: it waits for the fill under way, then hits.
    again = await loader.load(PROJECT, "  WHY was the database Connection refused? ")
    assert (again.hit, again.inject) == (True, first.inject)
    assert memory.recalls == 1


async def test_concurrent_misses_for_one_question_make_one_memory_call(
    loader: ContextLoader, memory: GatedMemory
) -> None:
    await remember(memory, "Error: TypeError in the parser")
    memory.gate.clear()
    loader.miss_budget = 0.0  # both give up at once: the gate holds their flight open
    asked = ["what broke in the parser?", "What broke in the  PARSER?"]
    replies = await asyncio.gather(*(loader.load(PROJECT, q) for q in asked))
    assert [(r.hit, r.inject) for r in replies] == [(False, None), (False, None)]
    memory.gate.set()
    await loader.drain()
    assert memory.recalls == 1, "each miss asked memory on its own"


async def test_a_slow_memory_answers_nothing_within_the_budget_and_the_fill_still_lands(
    loader: ContextLoader, memory: GatedMemory, cache: ContextCache
) -> None:
    await remember(memory, "Error: slow disk warning on src/disk.py")
    memory.gate.clear()  # memory answers only after the miss gave up
    loader.miss_budget = 0.01
    late = await loader.load(PROJECT, "slow disk")
    assert (late.hit, late.inject) == (False, None)
    assert memory.recalls == 0  # still held at the gate: no answer could have come
    memory.gate.set()
    await loader.drain()
    found = await cache.lookup(PROJECT, "slow disk")
    assert found.hit and found.inject is not None and "slow disk warning" in found.inject
    next_turn = await loader.load(PROJECT, "slow disk")
    assert (next_turn.hit, next_turn.inject) == (True, found.inject)
    assert memory.recalls == 1


async def test_an_invalidation_makes_the_next_load_read_memory_again(
    loader: ContextLoader, memory: GatedMemory
) -> None:
    await remember(memory, "Error: ImportError in src/other.py")
    asked = "what changed in src/auth.py"
    before = await loader.load(PROJECT, asked)
    assert before.inject is not None and "src/auth.py" not in before.inject
    assert (await loader.load(PROJECT, asked)).hit
    await remember(memory, "Error: KeyError in src/auth.py")
    loader.memory_changed()
    await loader.invalidate_paths(PROJECT, ["/repo/src/auth.py"])  # a suffix names it
    assert loader.cached(PROJECT, asked) is None
    after = await loader.load(PROJECT, asked)
    assert not after.hit
    assert after.inject is not None and "KeyError in src/auth.py" in after.inject
    assert memory.recalls == 2


async def test_a_question_asked_after_a_change_never_shares_a_query_begun_before(
    loader: ContextLoader, memory: GatedMemory
) -> None:
    await remember(memory, "Error: ValueError in src/x.py")
    memory.gate.clear()
    loader.miss_budget = 0.0
    asked = "explain src/x.py"
    assert (await loader.load(PROJECT, asked)).inject is None  # its query waits at the gate
    await remember(memory, "Error: OverflowError in src/x.py")
    loader.memory_changed()
    await loader.invalidate_paths(PROJECT, ["src/x.py"])
    assert (await loader.load(PROJECT, asked)).inject is None
    memory.gate.set()
    await loader.drain()
    assert memory.recalls == 2, "the question after the change joined the query before it"
    cached = await loader.load(PROJECT, asked)
    assert cached.hit and cached.inject is not None and "OverflowError" in cached.inject


async def test_invalidating_the_project_drops_every_context(
    loader: ContextLoader, memory: GatedMemory
) -> None:
    await remember(memory, "Error: timeout in src/a.py and src/b.py")
    for asked in ("timeout in src/a.py", "timeout in src/b.py"):
        await loader.load(PROJECT, asked)
        assert (await loader.load(PROJECT, asked)).hit
    await loader.invalidate_project(PROJECT)
    assert loader.cached(PROJECT, "timeout in src/a.py") is None
    assert not (await loader.load(PROJECT, "timeout in src/b.py")).hit


async def test_an_empty_answer_is_not_cached_and_a_query_renders_uncached(
    loader: ContextLoader, memory: GatedMemory
) -> None:
    assert (await loader.load(PROJECT, "nothing like it")).inject is None
    assert not (await loader.load(PROJECT, "nothing like it")).hit
    await remember(memory, "Error: flaky checkout test")
    rendered = await loader.uncached(PROJECT, "flaky checkout")
    assert rendered is not None and "flaky checkout test" in rendered
    assert loader.cached(PROJECT, "flaky checkout") is None
