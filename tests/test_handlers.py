"""Handlers driven directly (no socket) over a real SQLite store and a real Valkey."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.cache.contexts import ContextCache
from bridge.episode import Episode
from bridge.metrics import Metrics
from bridge.runtime.embedded import EmbeddedValkey
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
    Ping,
    Pong,
    Query,
    QueryResult,
    Reply,
)
from tests.conftest import SlowMemory, StatsdCollector


@pytest.fixture
async def memory(tmp_path: Path) -> AsyncIterator[SlowMemory]:
    store = SlowMemory(tmp_path / "memory.sqlite3", delay=0.0)
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def handlers(
    memory: SlowMemory, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> AsyncIterator[Handlers]:
    cache = ContextCache.from_url(valkey.url, ttl=60)
    metrics = Metrics("127.0.0.1", statsd.port, buffered=False)
    yield Handlers(memory, cache, metrics, miss_budget=0.2)
    await cache.close()
    await metrics.close()


async def run(handlers: Handlers, message: Message, session: Session | None = None) -> Reply:
    async def emit(reply: Reply) -> None:
        raise AssertionError(f"unexpected intermediate reply {reply}")

    return await handlers.begin(message, session or Session("proj"), emit)


async def chat(handlers: Handlers, query: str, session: Session | None = None) -> Context:
    reply = await run(handlers, ChatStart(id=1, query=query), session)
    assert isinstance(reply, Context)
    return reply


async def test_every_event_stores_its_episode_with_the_seed_metadata(handlers: Handlers) -> None:
    one = Session("proj")  # one connection, no chat:start: one task
    acks = [
        await run(handlers, FileWrite(id=1, path="src/a.py"), one),
        await run(handlers, ErrorEvent(id=2, message="TypeError in parser"), one),
        await run(
            handlers, Completion(id=3, task="refactor parser", duration_ms=1200, tokens=77), one
        ),
    ]
    assert all(isinstance(a, Ack) and a.ok and a.episode for a in acks)
    chunks: list[Reply] = []

    async def collect(reply: Reply) -> None:
        chunks.append(reply)

    end = await handlers.begin(Export(id=9), Session("proj"), collect)
    assert end == ExportEnd(id=9, count=3)
    episodes = [e for c in chunks if isinstance(c, ExportChunk) for e in c.episodes]
    by_body = {e.body: e for e in episodes}
    task = by_body["Modified: src/a.py"].metadata["task"]
    assert by_body["Modified: src/a.py"].metadata == {
        "type": "file_edit",
        "path": "src/a.py",
        "task": task,
    }
    assert by_body["Error: TypeError in parser"].metadata == {
        "type": "error",
        "severity": "high",
        "task": task,
    }
    assert by_body["Completed: refactor parser"].metadata == {
        "type": "success",
        "duration": 1200,
        "tokens": 77,
        "task": task,
    }
    assert {e.uuid for e in episodes} == {a.episode for a in acks if isinstance(a, Ack)}


async def test_chat_start_misses_then_hits_with_the_memory_context(handlers: Handlers) -> None:
    await run(handlers, ErrorEvent(id=1, message="database connection refused"))
    first = await chat(handlers, "why was the database connection refused?")
    assert not first.hit
    assert first.inject is not None
    assert first.inject.startswith("[Memory Context] ")
    assert "Error: database connection refused" in first.inject
    second = await chat(handlers, "why was the database connection refused?")
    assert second.hit
    assert second.inject == first.inject


async def test_an_empty_memory_means_null_inject_and_is_not_cached(handlers: Handlers) -> None:
    reply = await chat(handlers, "completely unrelated words")
    assert (reply.hit, reply.inject) == (False, None)
    again = await chat(handlers, "completely unrelated words")
    assert (again.hit, again.inject) == (False, None), "an empty answer was cached"


async def test_file_write_makes_the_next_chat_see_the_new_episode(handlers: Handlers) -> None:
    await run(handlers, FileWrite(id=1, path="src/other.py"))
    before = await chat(handlers, "what changed in src/auth.py")
    assert before.inject is not None and "src/auth.py" not in before.inject
    assert (await chat(handlers, "what changed in src/auth.py")).hit
    await run(handlers, FileWrite(id=2, path="src/auth.py"))
    after = await chat(handlers, "what changed in src/auth.py")
    assert not after.hit
    assert after.inject is not None and "[1] src/auth.py" in after.inject


async def test_read_your_writes_when_messages_run_concurrently(
    handlers: Handlers, memory: SlowMemory
) -> None:
    """A chat:start begun right after a file:write waits for its invalidation."""
    session = Session("proj")
    await run(handlers, ErrorEvent(id=0, message="ValueError in src/x.py"), session)
    await chat(handlers, "explain src/x.py", session)
    assert (await chat(handlers, "explain src/x.py", session)).hit

    async def drop(reply: Reply) -> None:
        return None

    write = handlers.begin(FileWrite(id=1, path="src/x.py"), session, drop)
    read = handlers.begin(ChatStart(id=2, query="explain src/x.py"), session, drop)
    # Run the read first: it must still not see the context the write invalidates.
    read_task = asyncio.ensure_future(read)
    await asyncio.sleep(0)
    write_reply, read_reply = await asyncio.gather(write, read_task)
    assert isinstance(write_reply, Ack) and write_reply.ok
    assert isinstance(read_reply, Context) and not read_reply.hit


async def test_concurrent_identical_misses_query_memory_once(
    handlers: Handlers, memory: SlowMemory
) -> None:
    memory.delay = 0.05
    replies = await asyncio.gather(*(chat(handlers, "single flight please") for _ in range(20)))
    assert memory.recalls == 1
    assert not any(r.hit for r in replies)


async def test_a_miss_past_its_budget_answers_empty_then_fills_the_cache(
    handlers: Handlers, memory: SlowMemory
) -> None:
    await run(handlers, ErrorEvent(id=1, message="slow disk warning"))
    memory.delay = 0.5  # above the 0.2 s budget
    late = await chat(handlers, "slow disk")  # nothing yet: the answer is still on its way
    assert (late.hit, late.inject) == (False, None)
    await handlers.drain()
    memory.delay = 0.0
    next_turn = await chat(handlers, "slow disk")
    assert next_turn.hit
    assert next_turn.inject is not None and "slow disk warning" in next_turn.inject


async def test_query_bypasses_the_cache_and_ping_pongs(handlers: Handlers) -> None:
    await run(handlers, FileWrite(id=1, path="docs/guide.md"))
    result = await run(handlers, Query(id=5, query="guide", limit=3))
    assert isinstance(result, QueryResult)
    assert [e.body for e in result.episodes] == ["Modified: docs/guide.md"]
    assert await run(handlers, Ping(id="p")) == Pong(id="p")


async def test_projects_never_see_each_others_memory(handlers: Handlers) -> None:
    await run(handlers, ErrorEvent(id=1, message="secret alpha failure"), Session("alpha"))
    assert (await chat(handlers, "alpha failure", Session("beta"))).inject is None
    own = await chat(handlers, "alpha failure", Session("alpha"))
    assert own.inject is not None and "secret alpha failure" in own.inject
    explicit = await run(handlers, Query(id=2, query="alpha", project="alpha"), Session("beta"))
    assert isinstance(explicit, QueryResult) and len(explicit.episodes) == 1


async def test_a_failing_store_is_an_error_ack_not_an_exception(
    handlers: Handlers, memory: SlowMemory
) -> None:
    await memory.close()
    reply = await run(handlers, ErrorEvent(id=4, message="after close"))
    assert isinstance(reply, Ack)
    assert not reply.ok
    assert reply.error is not None and reply.error.code == "memory_unavailable"


async def test_a_named_episode_is_stored_once_at_the_time_it_happened(handlers: Handlers) -> None:
    first = await run(handlers, ErrorEvent(id=1, message="m", episode_id="e-1", at=1_000_000.0))
    again = await run(handlers, ErrorEvent(id=2, message="m", episode_id="e-1", at=1_000_000.0))
    future = await run(handlers, ErrorEvent(id=3, message="later", at=9e12))
    assert isinstance(first, Ack) and isinstance(again, Ack) and isinstance(future, Ack)
    assert first.episode == again.episode
    chunks: list[Reply] = []

    async def collect(reply: Reply) -> None:
        chunks.append(reply)

    assert await handlers.begin(Export(id=9), Session("proj"), collect) == ExportEnd(id=9, count=2)
    stored = {e.uuid: e for c in chunks if isinstance(c, ExportChunk) for e in c.episodes}
    assert first.episode is not None and stored[first.episode].reference_time == 1_000_000.0
    assert future.episode is not None and stored[future.episode].reference_time <= time.time()


async def test_an_error_naming_a_file_drops_contexts_about_it(handlers: Handlers) -> None:
    """Not only writes: any new episode that names a file belongs in contexts about it."""
    await run(handlers, ErrorEvent(id=0, message="warning in lib/other.ts"))
    assert (await chat(handlers, "what is wrong with src/parser.ts")).inject is not None
    assert (await chat(handlers, "what is wrong with src/parser.ts")).hit
    assert (await chat(handlers, "and lib/other.ts")).inject is not None
    await run(handlers, ErrorEvent(id=1, message="SyntaxError in src/parser.ts line 3"))
    after = await chat(handlers, "what is wrong with src/parser.ts")
    assert not after.hit
    assert after.inject is not None and "SyntaxError in src/parser.ts" in after.inject
    assert (await chat(handlers, "and lib/other.ts")).hit


async def export_all(handlers: Handlers, project: str = "proj") -> list[Episode]:
    chunks: list[Reply] = []

    async def collect(reply: Reply) -> None:
        chunks.append(reply)

    await handlers.begin(Export(id=9), Session(project), collect)
    return [e for c in chunks if isinstance(c, ExportChunk) for e in c.episodes]


async def test_a_chat_opens_a_task_that_links_its_session_files_error_and_outcome(
    handlers: Handlers,
) -> None:
    """The work of one user turn: its query, then writes, an error and the completion."""
    conn = Session("proj")
    await run(handlers, ChatStart(id=1, query="make the parser strict", session="s1"), conn)
    await run(handlers, FileWrite(id=2, path="src/parser.py", session="s1"), conn)
    await run(handlers, ErrorEvent(id=3, message="TypeError in parser", session="s1"), conn)
    other = Session("proj")  # the same session on another connection is the same task
    await run(handlers, FileWrite(id=4, path="tests/test_parser.py", session="s1"), other)
    done = Completion(
        id=5, task="make the parser strict", summary="Parser now strict.", session="s1"
    )
    await run(handlers, done, conn)
    await run(handlers, ChatStart(id=6, query="unrelated next turn", session="s1"), conn)
    await run(handlers, FileWrite(id=7, path="docs/next.md", session="s1"), conn)

    episodes = await export_all(handlers)
    tasks = {e.metadata["task"] for e in episodes[:4]}
    assert len(tasks) == 1, "one turn's episodes share one task"
    assert episodes[-1].metadata["task"] not in tasks, "the next chat opened a new task"
    assert all(e.metadata["session"] == "s1" for e in episodes)
    assert all(e.metadata["task_query"] == "make the parser strict" for e in episodes[:4])
    assert episodes[3].metadata["summary"] == "Parser now strict."

    found = await handlers.memory.candidates("proj", "parser strict")
    task = next(t for t in found.tasks if t.uuid in tasks)
    assert task.query == "make the parser strict"
    assert task.files == ["src/parser.py", "tests/test_parser.py"]
    assert task.errors == ["TypeError in parser"]
    assert (task.outcome, task.summary) == ("completed", "Parser now strict.")

    context = await chat(handlers, "why is the parser strict", conn)
    assert context.inject is not None
    assert "[1] src/parser.py" in context.inject
    assert '"make the parser strict" → Parser now strict.' in context.inject
    assert "Error: TypeError in parser" in context.inject


async def test_a_summary_longer_than_the_text_limit_is_clipped(handlers: Handlers) -> None:
    handlers.max_text = 100
    await run(handlers, Completion(id=1, task="t", summary="x" * 500, session="s"))
    (stored,) = await export_all(handlers)
    assert stored.metadata["summary"] == "x" * 100


async def test_a_resent_episode_changes_its_task_once(handlers: Handlers) -> None:
    conn = Session("proj")
    await run(handlers, ChatStart(id=1, query="fix the cache", session="s"), conn)
    for _ in range(3):
        write = FileWrite(id=2, path="src/cache.py", session="s", episode_id="w1")
        await run(handlers, write, conn)
        await run(handlers, ErrorEvent(id=3, message="boom", session="s", episode_id="e1"), conn)
    (task,) = (await handlers.memory.candidates("proj", "cache")).tasks
    assert (task.files, task.errors) == (["src/cache.py"], ["boom"])
