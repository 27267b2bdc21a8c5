"""Privacy end to end: a real bridge (real Valkey, the embedded store on disk) and the real
``import`` command. Whatever a client sends, no secret, private span or injected context
reaches memory: not through ``query``, not through ``export``, not in any file on disk,
not even as a search."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from websockets.asyncio.client import connect

from bridge.cache.contexts import ContextCache
from bridge.memory.base import Recall
from bridge.memory.recall import CONTEXT_FIRST_LINE, CONTEXT_HEADER, CONTEXT_LAST_LINE, Candidates
from bridge.memory.sqlite import SqliteMemory
from bridge.metrics import Metrics
from bridge.runtime.app import App
from bridge.runtime.embedded import EmbeddedValkey
from bridge.wire.handlers import Handlers, Session
from bridge.wire.protocol import ChatStart, Context, Query, QueryResult, Reply
from tests import wire
from tests.conftest import StatsdCollector, bridge_config, ws_url
from tests.test_backends_cli import run_cli, said
from tests.test_privacy import AWS_ID, BEARER, GITHUB_CLASSIC, OPENAI_PROJECT, SLACK_BOT, pem
from tests.wire import ask

KEY = pem("RSA PRIVATE KEY", 300)
KEY_LINE = KEY.splitlines()[1]
NEVER_STORED = [
    OPENAI_PROJECT, AWS_ID, BEARER, GITHUB_CLASSIC, SLACK_BOT, KEY_LINE, "hunter2",
    "jane@example.com", "ticket 4411", CONTEXT_HEADER, CONTEXT_LAST_LINE,
]  # fmt: skip


def files_holding(folder: Path, needles: list[str]) -> dict[str, list[str]]:
    """Every file under ``folder`` that holds one of ``needles``, read as raw bytes."""
    found: dict[str, list[str]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        held = [n for n in needles if n.encode() in data]
        if held:
            found[str(path.relative_to(folder))] = held
    return found


async def test_no_secret_private_span_or_injected_context_reaches_memory(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> None:
    bridge = App(bridge_config(tmp_path, valkey, statsd.port))
    await bridge.start()
    try:
        async with connect(ws_url(bridge, "/vault")) as ws:
            session = {"session": "s1"}
            first = {"type": "file:write", "id": 1, "path": "src/auth/login.py", **session}
            assert (await ask(ws, first))["ok"]
            recalled = await ask(ws, {"type": "chat:start", "id": 2, "query": "login", **session})
            inject = recalled["inject"]
            assert inject.startswith(CONTEXT_FIRST_LINE) and inject.endswith(CONTEXT_LAST_LINE)
            # The client sends the context back inside the next prompt, with a private span
            # and a key; the second time the context comes from the cache.
            prompt = (
                f"{inject}\nmake login retry <private>for jane@example.com</private>"
                f"with {OPENAI_PROJECT}"
            )
            for n in (3, 4):
                reply = await ask(ws, {"type": "chat:start", "id": n, "query": prompt, **session})
                assert reply["type"] == "context"
            assert reply["hit"] is True
            events: list[dict[str, Any]] = [
                {"type": "file:write", "id": 5, "path": f"config/{AWS_ID}.json"},
                {"type": "error", "id": 6, "message": f"deploy: DB_PASSWORD=hunter2 no\n{KEY}"},
                {
                    "type": "completion",
                    "id": 7,
                    "task": "rotate keys <private>ticket 4411</private>",
                    "summary": f"Done. Sent Authorization: Bearer {BEARER}, then {GITHUB_CLASSIC}.",
                },
                {"type": "error", "id": 8, "message": f"slack said invalid_auth for {SLACK_BOT}"},
            ]
            for event in events:
                ack = await ask(ws, {**event, **session})
                assert ack["ok"] and not ack.get("queued"), ack
            found = await ask(ws, {"type": "query", "id": 9, "query": "deploy rotate slack"})
            exported = await wire.exported(ws)
    finally:
        await bridge.stop()

    by_type = {(e["metadata"]["type"], e["body"]): e for e in exported}
    written = by_type["file_edit", "Modified: config/[redacted:aws-access-key-id].json"]
    assert written["name"] == "file:write config/[redacted:aws-access-key-id].json"
    assert written["metadata"]["path"] == "config/[redacted:aws-access-key-id].json"
    assert written["metadata"]["task_query"] == "make login retry with [redacted:openai-key]"
    assert ("error", "Error: deploy: DB_PASSWORD=[redacted:password] no\n"
            "[redacted:private-key]") in by_type  # fmt: skip
    assert ("error", "Error: slack said invalid_auth for [redacted:slack-token]") in by_type
    completed = by_type["success", "Completed: rotate keys "]
    assert completed["metadata"]["summary"] == (
        "Done. Sent Authorization: Bearer [redacted:bearer-token], then [redacted:github-token]."
    )
    assert by_type["file_edit", "Modified: src/auth/login.py"]["metadata"]["path"] == (
        "src/auth/login.py"
    ), "an ordinary path is kept as it is"
    # The episodes found (the reply's context is memory's own text, made to be injected).
    searched = msgspec.json.encode(found["episodes"]).decode()
    assert "[redacted:password]" in searched and "[redacted:slack-token]" in searched
    for needle in NEVER_STORED:
        assert needle not in searched
        assert needle not in msgspec.json.encode(exported).decode()
    assert files_holding(tmp_path / "data", NEVER_STORED) == {}
    # The Datadog event of an error leaves the machine: it carries the scrubbed text.
    events_sent = await statsd.wait_for(lambda line: "invalid_auth" in line)
    assert events_sent and all(SLACK_BOT not in line for line in statsd.lines)
    assert "[redacted:slack-token]" in events_sent[0]


async def test_import_scrubs_every_episode_it_reads(tmp_path: Path) -> None:
    lines = [
        {"body": f"Error: token={GITHUB_CLASSIC}", "metadata": {"type": "error"}},
        {
            "body": "Completed: ship it <private>ticket 4411</private>",
            "metadata": {"type": "success", "summary": f"used {OPENAI_PROJECT}"},
        },
        {
            "body": "Modified: src/app.py",
            "metadata": {"type": "file_edit", "path": "src/app.py", "task_query":
                         f"{CONTEXT_FIRST_LINE}\n- earlier task\n{CONTEXT_LAST_LINE}\nfix app"},
        },
    ]  # fmt: skip
    jsonl = b"".join(
        msgspec.json.encode(
            {"uuid": f"e{n}", "group_id": "shop", "name": "event", "source_description": "x",
             "reference_time": 1.0e9 + n, **line}
        ) + b"\n"
        for n, line in enumerate(lines)
    )  # fmt: skip
    data = tmp_path / "data"
    assert await said("import", "--data-dir", str(data), stdin=jsonl) == (
        "imported 3, skipped 0 already present"
    )
    out = await run_cli("export", "--data-dir", str(data), "--project", "shop")
    episodes = [msgspec.json.decode(line) for line in out.splitlines()]
    assert [(e["body"], e["metadata"]) for e in episodes] == [
        ("Error: token=[redacted:github-token]", {"type": "error"}),
        ("Completed: ship it ", {"type": "success", "summary": "used [redacted:openai-key]"}),
        ("Modified: src/app.py", {"type": "file_edit", "path": "src/app.py",
                                  "task_query": "fix app"}),
    ]  # fmt: skip
    assert files_holding(data, NEVER_STORED) == {}


class SearchedMemory(SqliteMemory):
    """The real embedded store, keeping the text of every search it is asked."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.searched: list[str] = []

    async def recall(self, group_id: str, query: str, limit: int) -> Recall:
        self.searched.append(query)
        return await super().recall(group_id, query, limit)

    async def candidates(self, group_id: str, query: str) -> Candidates:
        self.searched.append(query)
        return await super().candidates(group_id, query)


async def test_memory_is_searched_with_the_scrubbed_query(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> None:
    memory = SearchedMemory(tmp_path / "memory.sqlite3")
    await memory.start()
    cache = ContextCache.from_url(valkey.url, ttl=60)
    metrics = Metrics("127.0.0.1", statsd.port, buffered=False)
    handlers = Handlers(memory, cache, metrics)

    async def emit(reply: Reply) -> None:
        raise AssertionError(f"unexpected intermediate reply {reply}")

    asked = "why does deploy fail <private>for jane</private>with DB_PASSWORD=hunter2"
    try:
        session = Session("vault")
        chat = await handlers.begin(ChatStart(id=1, query=asked), session, emit)
        search = await handlers.begin(Query(id=2, query=asked), session, emit)
        assert isinstance(chat, Context) and isinstance(search, QueryResult)
        await handlers.drain()
    finally:
        await cache.close()
        await metrics.close()
        await memory.close()
    scrubbed = "why does deploy fail with DB_PASSWORD=[redacted:password]"
    # chat:start's candidates, then query's episodes and its context's candidates
    assert memory.searched == [scrubbed, scrubbed, scrubbed]
