"""End to end through a real socket: the in-process bridge, real Valkey, real clients."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import connect

from bridge.runtime.app import App
from bridge.runtime.embedded import EmbeddedValkey
from tests.conftest import StatsdCollector, ws_url
from tests.waiting import eventually
from tests.wire import ask, receive, send, websocat


async def test_websocat_types_a_chat_start_and_reads_the_context(app: App) -> None:
    async with connect(ws_url(app)) as ws:
        stored = await ask(ws, {"type": "error", "id": 1, "message": "websocat demo failure"})
        assert stored["ok"] is True
    (reply,) = await websocat(
        ws_url(app), '{"type":"chat:start","id":42,"query":"demo failure"}', replies=1
    )
    assert reply["type"] == "context"
    assert reply["id"] == 42
    assert reply["hit"] is False
    assert reply["inject"].startswith("[Memory Context] ")
    assert "Error: websocat demo failure" in reply["inject"]
    assert isinstance(reply["elapsed_us"], int)


async def test_msgpack_binary_frames_miss_then_hit(app: App) -> None:
    async with connect(ws_url(app)) as ws:
        await ask(ws, {"type": "file:write", "id": 1, "path": "src/parser.py"}, binary=True)
        query = {"type": "chat:start", "id": 2, "query": "bug in src/parser.py", "session": "s"}
        miss = await ask(ws, query, binary=True)
        hit = await ask(ws, query, binary=True)
    assert (miss["id"], miss["hit"]) == (2, False)
    assert "[1] src/parser.py" in miss["inject"]
    assert (hit["hit"], hit["inject"]) == (True, miss["inject"])


async def test_file_write_invalidates_through_the_socket(app: App) -> None:
    async with connect(ws_url(app)) as ws:
        await ask(ws, {"type": "file:write", "id": 0, "path": "lib/c.ts"})  # memory not empty
        q_a = {"type": "chat:start", "id": 1, "query": "status of lib/a.ts"}
        q_b = {"type": "chat:start", "id": 2, "query": "status of lib/b.ts"}
        for q in (q_a, q_b):
            assert (await ask(ws, q))["hit"] is False
            assert (await ask(ws, q))["hit"] is True
        # Pipelined: the chat:start is sent before the write's ack arrives.
        await send(ws, {"type": "file:write", "id": 3, "path": "lib/a.ts"})
        await send(ws, q_a)
        replies = [await receive(ws) for _ in range(2)]
        by_id = {r["id"]: r for r in replies}
        assert by_id[3]["ok"] is True
        assert by_id[1]["hit"] is False
        assert (await ask(ws, q_b))["hit"] is True


async def test_episodes_come_back_through_query_and_export(app: App) -> None:
    async with connect(ws_url(app, "/shop")) as ws:
        for i in range(5):
            ack = await ask(
                ws, {"type": "file:write", "id": i, "path": f"src/m{i}.py"}, binary=True
            )
            assert ack["ok"] is True
        await ask(ws, {"type": "error", "id": 10, "message": "checkout crashed"}, binary=True)
        await ask(
            ws, {"type": "completion", "id": 11, "task": "fix checkout", "tokens": 5}, binary=True
        )
        found = await ask(ws, {"type": "query", "id": 12, "query": "checkout"}, binary=True)
        assert found["type"] == "result"
        assert {e["body"] for e in found["episodes"]} == {
            "Error: checkout crashed",
            "Completed: fix checkout",
        }
        await send(ws, {"type": "export", "id": 13, "chunk_size": 2}, binary=True)
        chunks: list[Any] = []
        for _ in range(100):  # bounded: four chunks, then the end
            reply = await receive(ws)
            if reply["type"] == "export:end":
                break
            chunks.append(reply)
    assert reply == {"type": "export:end", "id": 13, "count": 7}
    assert [c["seq"] for c in chunks] == [0, 1, 2, 3]
    assert all(c["id"] == 13 and len(c["episodes"]) <= 2 for c in chunks)
    assert len({e["uuid"] for c in chunks for e in c["episodes"]}) == 7
    assert {e["group_id"] for c in chunks for e in c["episodes"]} == {"shop"}


async def test_projects_from_the_url_path_are_isolated(app: App) -> None:
    async with connect(ws_url(app, "/alpha")) as alpha, connect(ws_url(app, "/beta")) as beta:
        await ask(alpha, {"type": "error", "id": 1, "message": "alpha only secret"})
        mine = await ask(alpha, {"type": "chat:start", "id": 2, "query": "secret"})
        theirs = await ask(beta, {"type": "chat:start", "id": 3, "query": "secret"})
    assert "alpha only secret" in mine["inject"]
    assert theirs["inject"] is None


async def test_metrics_and_the_error_event_reach_dogstatsd(
    app: App, statsd: StatsdCollector
) -> None:
    async with connect(ws_url(app, "/m")) as ws:
        await ask(ws, {"type": "file:write", "id": 0, "path": "src/metrics.py"})
        await ask(ws, {"type": "chat:start", "id": 1, "query": "metrics please"})
        await ask(ws, {"type": "chat:start", "id": 2, "query": "metrics please"})
        await ask(ws, {"type": "completion", "id": 3, "task": "ship it", "tokens": 1234})
        await ask(ws, {"type": "error", "id": 4, "message": "disk full"})
    assert await statsd.wait_for(lambda line: line.startswith("opencode.memory.cache_miss:1|c"))
    assert await statsd.wait_for(lambda line: line.startswith("opencode.memory.cache_hit:1|c"))
    tokens = await statsd.wait_for(lambda line: line.startswith("opencode.tokens.used:"))
    assert tokens[0].startswith("opencode.tokens.used:1234|c|#project:m")
    events = await statsd.wait_for(lambda line: line.startswith("_e{"))
    assert events, "the OpenCode Error event was not sent"
    assert events[0].startswith("_e{14,9}:OpenCode Error|disk full|")
    assert "|t:error" in events[0]
    durations = await statsd.wait_for(
        lambda line: line.startswith("opencode.bridge.request.duration:")
    )
    assert any("|d|" in d and "event:chat:start" in d for d in durations)
    assert await statsd.wait_for(lambda line: line.startswith("opencode.bridge.connections:"))


BAD_FRAMES: list[tuple[str | bytes, str]] = [
    ("{not json", "invalid JSON"),
    ('{"type":"chat:start","id":1}', "missing required field `query`"),
    ('{"type":"chat:start","id":2,"query":7}', "$.query"),
    ('{"type":"warp","id":3}', "`type` must be one of"),
    ('{"type":"completion","id":4,"task":"t","tokens":"lots"}', "$.tokens"),
    ('{"type":"file:write","id":5,"path":"' + "p" * 5000 + '"}', "$.path"),
    (b"\xc1\xc1", "invalid MessagePack"),
    (msgspec.msgpack.encode({"type": "error", "id": 6}), "missing required field `message`"),
    (msgspec.msgpack.encode([1, 2, 3]), "Expected `object`"),
    ("x" * (2 << 20), "exceeds the limit"),
]


@pytest.mark.parametrize(("frame", "needle"), BAD_FRAMES, ids=range(len(BAD_FRAMES)))
async def test_bad_input_gets_a_clear_error_and_the_connection_goes_on(
    app: App, frame: str | bytes, needle: str
) -> None:
    async with connect(ws_url(app), max_size=None) as ws:
        await ws.send(frame)
        raw = await asyncio.wait_for(ws.recv(), 10)
        assert isinstance(raw, type(frame))
        reply = msgspec.msgpack.decode(raw) if isinstance(raw, bytes) else msgspec.json.decode(raw)
        assert reply["type"] == "ack"
        assert reply["ok"] is False
        assert reply["error"]["code"] == "bad_request"
        assert needle in reply["error"]["message"]
        pong = await ask(ws, {"type": "ping", "id": "after"}, binary=isinstance(frame, bytes))
        assert pong == {"type": "pong", "id": "after", "version": 1}


async def test_the_id_of_a_bad_message_is_echoed_when_readable(app: App) -> None:
    async with connect(ws_url(app)) as ws:
        reply = await ask(ws, {"type": "chat:start", "id": "abc"})
        assert (reply["id"], reply["ok"]) == ("abc", False)
        unreadable = await ask(ws, {"type": "chat:start", "id": {"nested": 1}})
        assert unreadable["id"] is None


async def test_valkey_outage_degrades_to_memory_and_hits_resume(
    app: App, valkey: EmbeddedValkey
) -> None:
    async with connect(ws_url(app)) as ws:
        await ask(ws, {"type": "error", "id": 1, "message": "outage canary"})
        first = {"type": "chat:start", "id": 2, "query": "canary before"}
        assert (await ask(ws, first))["hit"] is False
        assert (await ask(ws, first))["hit"] is True
        valkey.kill()
        during = await ask(ws, {"type": "chat:start", "id": 3, "query": "canary during"})
        assert during["hit"] is False
        assert "outage canary" in during["inject"]
        write = await ask(ws, {"type": "file:write", "id": 4, "path": "src/o.py"})
        assert write["ok"] is True, "episodes are still stored while the cache is down"
        await valkey.start()
        after = {"type": "chat:start", "id": 5, "query": "canary after"}
        reply = await eventually(  # the outage backoff is capped at 5 s
            lambda: ask(ws, after),
            "cache hits to resume after Valkey came back",
            until=lambda reply: reply["hit"],
            timeout=20,
        )
        assert "outage canary" in reply["inject"]


async def test_health_endpoint(app: App) -> None:
    assert app.server is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", app.server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.read(200), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
