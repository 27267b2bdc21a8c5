"""``query``'s ``context``: the memory context a chat:start would get, without its task.

The handlers over a real SQLite store and a real Valkey, and the real server process with
the real websocat binary typing the query the way docs/protocol.md shows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from bridge.cache.contexts import ContextCache
from bridge.episode import Episode
from bridge.memory.sqlite import SqliteMemory
from bridge.metrics import Metrics
from bridge.runtime.embedded import EmbeddedValkey
from bridge.wire.handlers import Handlers, Session
from bridge.wire.protocol import (
    Ack,
    ChatStart,
    Completion,
    Context,
    Export,
    ExportChunk,
    FileWrite,
    Message,
    Query,
    QueryResult,
    Reply,
)
from tests.conftest import StatsdCollector
from tests.test_cli import bridge_process
from tests.wire import receive, websocat


@pytest.fixture
async def handlers(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> AsyncIterator[Handlers]:
    memory = SqliteMemory(tmp_path / "memory.sqlite3")
    await memory.start()
    cache = ContextCache.from_url(valkey.url, ttl=60)
    metrics = Metrics("127.0.0.1", statsd.port, buffered=False)
    yield Handlers(memory, cache, metrics, miss_budget=5.0)
    await cache.close()
    await metrics.close()
    await memory.close()


async def run(handlers: Handlers, message: Message, session: Session) -> Reply:
    async def emit(reply: Reply) -> None:
        raise AssertionError(f"unexpected intermediate reply {reply}")

    return await handlers.begin(message, session, emit)


async def exported(handlers: Handlers, session: Session) -> list[Episode]:
    chunks: list[Reply] = []

    async def collect(reply: Reply) -> None:
        chunks.append(reply)

    await handlers.begin(Export(id="x"), session, collect)
    return [e for c in chunks if isinstance(c, ExportChunk) for e in c.episodes]


async def remember_a_task(handlers: Handlers, session: Session) -> None:
    """One finished task: a prompt, two files, its completion."""
    assert isinstance(
        await run(handlers, ChatStart(id=1, query="prime the coolant pump", session="s1"), session),
        Context,
    )
    for path in ("src/pump/prime.py", "tests/test_prime.py"):
        ack = await run(handlers, FileWrite(id=2, path=path, session="s1"), session)
        assert isinstance(ack, Ack) and ack.ok
    done = Completion(
        id=3, task="prime the coolant pump", summary="Priming now waits for pressure.", session="s1"
    )
    assert isinstance(await run(handlers, done, session), Ack)


async def test_query_context_is_what_a_chat_start_of_the_same_query_gets(
    handlers: Handlers,
) -> None:
    session = Session("plant")
    await remember_a_task(handlers, session)
    asked = "how is the coolant pump primed?"
    found = await run(handlers, Query(id=4, query=asked, limit=3), session)
    assert isinstance(found, QueryResult)
    assert found.episodes, "query still returns the episodes"
    assert found.context is not None
    assert found.context.startswith("[Memory Context] ")
    assert "src/pump/prime.py" in found.context
    assert '"prime the coolant pump"' in found.context
    chat = await run(handlers, ChatStart(id=5, query=asked, session="s2"), session)
    assert isinstance(chat, Context) and not chat.hit, "the query cached nothing"
    assert chat.inject == found.context


async def test_query_opens_no_task_and_an_empty_project_has_no_context(
    handlers: Handlers,
) -> None:
    session = Session("plant")
    nothing = await run(handlers, Query(id=1, query="coolant pump"), session)
    assert nothing == QueryResult(id=1, episodes=[], context=None)
    # A query of session s3 opens no task: the file it writes next has no task query.
    await run(handlers, Query(id=2, query="coolant pump", session="s3"), session)
    await run(handlers, FileWrite(id=3, path="src/valve.py", session="s3"), session)
    (episode,) = await exported(handlers, session)
    assert "task_query" not in episode.metadata, episode.metadata


async def test_websocat_types_a_query_and_reads_episodes_and_context(tmp_path: Path) -> None:
    async with bridge_process("--data-dir", str(tmp_path / "data")) as bridge:
        async with connect(f"{bridge.url}/plant") as ws:
            await ws.send('{"type":"error","id":1,"message":"TypeError in pump.ts"}')
            assert (await receive(ws))["ok"] is True
        lines = await websocat(
            f"{bridge.url}/plant",
            '{"type":"query","id":7,"query":"pump.ts","limit":3}',
            '{"type":"query","id":8,"query":"nothing like it","limit":3}',
            replies=2,
        )
    replies = {reply["id"]: reply for reply in lines}
    found = replies[7]
    assert found["type"] == "result"
    assert [e["body"] for e in found["episodes"]] == ["Error: TypeError in pump.ts"]
    assert found["context"].startswith("[Memory Context] ")
    assert "Error: TypeError in pump.ts" in found["context"]
    assert found["context"].endswith("[/Memory Context]")
    # Words that match nothing: no episodes; the context is null or names recent work only.
    assert replies[8]["type"] == "result" and replies[8]["episodes"] == []
    assert replies[8]["context"] is None or replies[8]["context"].startswith("[Memory Context] ")
