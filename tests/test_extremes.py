"""Extreme values through a live server: long error messages are stored whatever their
Datadog event can carry, and counts or times no codec can carry back are refused."""

from __future__ import annotations

import math
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from bridge.metrics import MAX_EVENT_BYTES
from bridge.runtime.app import App
from bridge.wire.protocol import MAX_COUNT, MAX_SECONDS
from tests.conftest import StatsdCollector, ws_url
from tests.wire import ask, receive, send


@pytest.fixture(params=[False, True], ids=["json", "msgpack"])
def binary(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def export(ws: ClientConnection, binary: bool) -> list[dict[str, Any]]:
    """Every episode of the connection's project, through the export stream."""
    await send(ws, {"type": "export", "id": "export", "chunk_size": 7}, binary=binary)
    episodes: list[dict[str, Any]] = []
    for seq in range(10_000):  # bounded
        reply = await receive(ws)
        if reply["type"] == "export:end":
            assert reply["count"] == len(episodes)
            return episodes
        assert reply["type"] == "export:chunk" and reply["seq"] == seq
        episodes.extend(reply["episodes"])
    raise AssertionError("export never ended")


# -- long error messages ------------------------------------------------------------------

LONG_ERRORS = {
    "ascii": ("quetzalcoatl overflow in parser.ts " * 2000)[:60_000],
    "multibyte": ("ошибка 💥 разбора ✓ " * 4000)[:60_000],
    "newlines": ("zanzibar\n" * 7000)[:60_000],
}
QUERY_WORD = {"ascii": "quetzalcoatl", "multibyte": "ошибка", "newlines": "zanzibar"}


@pytest.mark.parametrize("kind", list(LONG_ERRORS))
async def test_a_long_error_is_stored_and_its_event_fits_a_datagram(
    app: App, statsd: StatsdCollector, binary: bool, kind: str
) -> None:
    message = LONG_ERRORS[kind]
    assert len(message) == 60_000
    async with connect(ws_url(app, f"/long-{kind}"), max_size=None) as ws:
        ack = await ask(ws, {"type": "error", "id": 1, "message": message}, binary=binary)
        assert ack["ok"] is True and ack["id"] == 1, ack
        assert isinstance(ack["episode"], str) and ack["episode"]
        found = await ask(ws, {"type": "query", "id": 2, "query": QUERY_WORD[kind]}, binary=binary)
        assert found["type"] == "result" and found["id"] == 2
        assert [e["uuid"] for e in found["episodes"]] == [ack["episode"]]
        assert found["episodes"][0]["body"] == f"Error: {message}"  # stored whole
    events = await statsd.wait_for(lambda line: line.startswith("_e{") and f"long-{kind}" in line)
    assert len(events) == 1
    assert len(events[0].encode()) <= MAX_EVENT_BYTES
    assert events[0].split("|")[1].endswith("\u2026")  # the text was clipped, and says so


# -- counts and times no codec can carry back ---------------------------------------------

COMPLETION = {"type": "completion", "task": "bounded task"}
JSON_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"tokens": 10**30}, "$.tokens"),
    ({"tokens": MAX_COUNT + 1}, "$.tokens"),
    ({"tokens": -1}, "$.tokens"),
    ({"tokens": 1.5}, "$.tokens"),
    ({"duration_ms": 10**30}, "$.duration_ms"),
    ({"duration_ms": 1e300}, "$.duration_ms"),
    ({"duration_ms": -0.5}, "$.duration_ms"),
    ({"at": 10**30}, "$.at"),
    ({"at": MAX_SECONDS * 2}, "$.at"),
    ({"at": -1}, "$.at"),
]
# JSON has no Infinity or NaN: these are the texts a careless encoder writes for them.
JSON_TEXT_REFUSED = [
    ('"duration_ms": 1e400', "$.duration_ms"),
    ('"duration_ms": -1e400', "$.duration_ms"),
    ('"at": 1e400', "$.at"),
    ('"tokens": 1e400', "$.tokens"),
]
MSGPACK_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"tokens": 2**64 - 1}, "$.tokens"),
    ({"tokens": MAX_COUNT + 1}, "$.tokens"),
    ({"tokens": -(2**63)}, "$.tokens"),
    ({"tokens": math.inf}, "$.tokens"),
    ({"tokens": math.nan}, "$.tokens"),
    ({"duration_ms": math.inf}, "$.duration_ms"),
    ({"duration_ms": -math.inf}, "$.duration_ms"),
    ({"duration_ms": math.nan}, "$.duration_ms"),
    ({"duration_ms": 1e30}, "$.duration_ms"),
    ({"duration_ms": 2**64 - 1}, "$.duration_ms"),
    ({"at": math.inf}, "$.at"),
    ({"at": math.nan}, "$.at"),
    ({"at": 1e30}, "$.at"),
]


async def test_unbounded_counts_and_times_are_refused_naming_the_field(app: App) -> None:
    cases: list[tuple[dict[str, Any] | str, bool, str]] = [
        ({**COMPLETION, **fields}, False, field) for fields, field in JSON_REFUSED
    ]
    cases += [({**COMPLETION, **fields}, True, field) for fields, field in MSGPACK_REFUSED]
    cases += [
        ('{"type": "completion", "task": "bounded task", ' + text + "}", False, field)
        for text, field in JSON_TEXT_REFUSED
    ]
    # the same bounds on every message that carries ``at``
    for kind, extra in [("error", {"message": "m"}), ("file:write", {"path": "a.py"})]:
        cases.append(({"type": kind, **extra, "at": 10**30}, False, "$.at"))
        cases.append(({"type": kind, **extra, "at": math.inf}, True, "$.at"))
    async with connect(ws_url(app, "/bounds")) as ws:
        for n, (message, is_binary, field) in enumerate(cases):
            if isinstance(message, dict):
                message = {**message, "id": n}
            else:
                message = message.replace("{", f'{{"id": {n}, ', 1)
            ack = await ask(ws, message, binary=is_binary)
            assert ack["type"] == "ack" and ack["ok"] is False, (message, ack)
            assert ack["id"] == n
            assert ack["error"]["code"] == "bad_request", ack
            assert field in ack["error"]["message"], ack
        for is_binary in (False, True):
            assert await export(ws, is_binary) == [], "nothing refused was stored"


async def test_counts_and_times_at_their_bounds_survive_every_codec(app: App) -> None:
    """The largest accepted values, sent as JSON, come back through MessagePack query and
    export (which once got no reply at all) and through JSON."""
    at_bounds = {
        **COMPLETION,
        "id": 1,
        "tokens": MAX_COUNT,
        "duration_ms": MAX_SECONDS * 1000,
        "at": 1.0,
    }
    async with connect(ws_url(app, "/at-bounds")) as ws:
        ack = await ask(ws, at_bounds)
        assert ack["ok"] is True, ack
        late = {**COMPLETION, "id": 2, "at": MAX_SECONDS, "tokens": 0, "duration_ms": 0}
        assert (await ask(ws, late, binary=True))["ok"] is True
        for is_binary in (False, True):
            found = await ask(
                ws, {"type": "query", "id": 3, "query": "bounded task"}, binary=is_binary
            )
            assert found["type"] == "result" and len(found["episodes"]) == 2, found
            stored = await export(ws, is_binary)
            assert len(stored) == 2
            first = stored[0]
            assert first["uuid"] == ack["episode"]
            assert first["metadata"]["tokens"] == MAX_COUNT
            assert first["metadata"]["duration"] == MAX_SECONDS * 1000
            assert first["reference_time"] == 1.0
