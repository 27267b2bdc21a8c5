"""Projects whose names hold punctuation, spaces or non-ASCII letters, on both backends.

A project name reaches each store differently: the embedded store keeps it as a column and
scopes its full-text index with a token derived from it; the graphiti backend maps it to a
Graphiti group id and a FalkorDB graph. ``my-app`` once recalled nothing on the graphiti
backend (Graphiti's full-text group filter never matches a group id with ``-``), so every
name here must find its own task and only its own, through chat:start and through query.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.cache.contexts import ContextCache
from bridge.memory.base import MemoryBackend
from bridge.memory.graphiti import GraphitiMemory
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
    FileWrite,
    Message,
    Query,
    QueryResult,
    Reply,
)
from tests.conftest import StatsdCollector

NAMES = ("my-app", "v1.2", "my project", "projet-été")
NEIGHBOURS = {  # names another store might confuse with each, and a plain one
    "my-app": ("my_app", "my", "app"),
    "v1.2": ("v1-2", "v12", "v1"),
    "my project": ("my-project", "my_project", "project"),
    "projet-été": ("projet-ete", "projet", "été"),
}


@pytest.fixture(params=["sqlite", "graphiti"])
async def memory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MemoryBackend]:
    """Each backend on its embedded store: SQLite in a file, graphiti on a real FalkorDB."""
    if request.param == "sqlite":
        store: MemoryBackend = SqliteMemory(tmp_path / "memory.sqlite3")
        await store.start()
        yield store
        await store.close()
        return
    server = EmbeddedFalkorDB()
    await server.start()
    try:
        store = GraphitiMemory(server.url, state_dir=tmp_path / "state")
        await store.start()
        yield store
        await store.close()
    finally:
        await server.close()


@pytest.fixture
async def handlers(
    memory: MemoryBackend, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> AsyncIterator[Handlers]:
    cache = ContextCache.from_url(valkey.url, ttl=60)
    metrics = Metrics("127.0.0.1", statsd.port, buffered=False)
    yield Handlers(memory, cache, metrics, miss_budget=10.0)
    await cache.close()
    await metrics.close()


async def send(handlers: Handlers, message: Message, project: str) -> Reply:
    async def emit(reply: Reply) -> None:
        raise AssertionError(f"unexpected intermediate reply {reply}")

    return await handlers.begin(message, Session(project), emit)


async def chat(handlers: Handlers, query: str, project: str, session: str) -> str | None:
    reply = await send(handlers, ChatStart(id=1, query=query, session=session), project)
    assert isinstance(reply, Context)
    return reply.inject


async def one_task(handlers: Handlers, project: str) -> None:
    """A turn: the chat that opens the task, a file it writes, an error, its completion."""
    assert await chat(handlers, "fix the flaky checkout test", project, "first") is None
    for message in (
        FileWrite(id=2, path="tests/test_checkout.py", session="first"),
        ErrorEvent(id=3, message="AssertionError in checkout total", session="first"),
        Completion(id=4, task="fix the flaky checkout test", summary="rounded", session="first"),
    ):
        reply = await send(handlers, message, project)
        assert isinstance(reply, Ack) and reply.ok and not reply.queued


@pytest.mark.parametrize("name", NAMES)
async def test_a_project_finds_its_own_task_and_no_other_project_sees_it(
    handlers: Handlers, name: str
) -> None:
    await one_task(handlers, name)
    inject = await chat(handlers, "checkout test is flaky again", name, "second")
    assert inject is not None
    assert "Files likely involved: [1] tests/test_checkout.py" in inject
    assert '"fix the flaky checkout test" → rounded' in inject
    assert "Error: AssertionError in checkout total" in inject
    found = await send(handlers, Query(id=5, query="checkout flaky"), name)
    assert isinstance(found, QueryResult) and len(found.episodes) == 3
    assert {e.group_id for e in found.episodes} == {name}
    for other in NEIGHBOURS[name]:
        assert await chat(handlers, "checkout test is flaky again", other, "third") is None
        nothing = await send(handlers, Query(id=6, query="checkout flaky"), other)
        assert nothing == QueryResult(id=6, episodes=[])


async def test_projects_with_odd_names_keep_their_tasks_apart(handlers: Handlers) -> None:
    for name in NAMES:
        await one_task(handlers, name)
    for name in NAMES:
        found = await handlers.memory.candidates(name, "checkout flaky")
        assert found.latest_seq == 1 and [t.files for t in found.tasks] == [
            ["tests/test_checkout.py"]
        ]
