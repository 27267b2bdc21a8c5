"""Property-based fuzzing of a live server: whatever a client sends, it gets a reply or a
clean close with a documented code, and the server keeps serving everyone else."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import os
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bridge.runtime.app import App
from bridge.runtime.embedded import EmbeddedValkey
from bridge.wire.protocol import MAX_COUNT, MAX_NAME, MAX_PATH, MAX_SECONDS, MAX_TEXT, Message
from tests.conftest import StatsdCollector, bridge_config, ws_url

TYPES = ["chat:start", "file:write", "error", "completion", "query", "export", "ping"]
FIELDS = ["id", "type", "query", "path", "message", "task", "tokens", "duration_ms",
          "project", "session", "limit", "chunk_size", "episode_id"]  # fmt: skip
# Close codes a client may see: 1007 invalid UTF-8 in a text frame, 1009 frame too big.
DOCUMENTED_CLOSE_CODES = {1007, 1009}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=30,
)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(TYPES) | st.text(max_size=12)},
    optional={f: json_values for f in FIELDS if f != "type"},
)


@pytest.fixture
async def steady(app: App) -> AsyncIterator[ClientConnection]:
    """A well-behaved client that stays connected through the whole fuzzing run."""
    async with connect(ws_url(app, "/steady")) as ws:
        yield ws


@st.composite
def frames(draw: st.DrawFn) -> str | bytes:
    """A frame a careless or hostile client might send."""
    kind = draw(st.sampled_from(["json", "msgpack", "truncated", "deep", "raw", "huge"]))
    value: Any = draw(messages | json_values)
    if kind == "json":
        return msgspec.json.encode(value).decode()
    if kind == "msgpack":
        return msgspec.msgpack.encode(value)
    if kind == "truncated":
        whole = msgspec.msgpack.encode(value)
        return whole[: draw(st.integers(0, max(0, len(whole) - 1)))]
    if kind == "deep":
        depth = draw(st.integers(100, 20_000))
        return '{"type":"ping","id":1,"x":' + "[" * depth + "]" * depth + "}"
    if kind == "huge":
        size = draw(st.sampled_from([70_000, 1_100_000]))
        return msgspec.json.encode({"type": "chat:start", "id": 2, "query": "q" * size}).decode()
    return draw(st.binary(max_size=200))


async def exchange(url: str, frame: str | bytes) -> None:
    """Send one frame on a fresh connection: expect a reply or a documented close."""
    async with connect(url, max_size=None) as ws:
        await ws.send(frame)
        try:
            reply = await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code in DOCUMENTED_CLOSE_CODES
            return
        decoded = (
            msgspec.json.decode(reply) if isinstance(reply, str) else msgspec.msgpack.decode(reply)
        )
        assert isinstance(decoded, dict) and decoded.get("type") in {
            "ack", "context", "result", "export:chunk", "export:end", "pong",
        }  # fmt: skip
        if decoded["type"] == "ack" and not decoded["ok"]:
            assert decoded["error"]["code"] in {"bad_request", "memory_unavailable"}
            assert decoded["error"]["message"]
        # The same connection still works after whatever it was sent.
        assert await ping(ws, isinstance(frame, bytes))


async def ping(ws: ClientConnection, binary: bool) -> bool:
    """True when a ping on ``ws`` gets its pong (other replies may come first)."""
    await ws.send(msgspec.msgpack.encode({"type": "ping", "id": "probe"}) if binary
                  else '{"type":"ping","id":"probe"}')  # fmt: skip
    for _ in range(50):  # bounded: an export may stream several chunks first
        raw = await asyncio.wait_for(ws.recv(), 10)
        reply = msgspec.msgpack.decode(raw) if isinstance(raw, bytes) else msgspec.json.decode(raw)
        if reply.get("type") == "pong" and reply.get("id") == "probe":
            return True
    return False


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frame=frames())
async def test_any_frame_gets_a_reply_or_a_documented_close(
    app: App, steady: ClientConnection, frame: str | bytes
) -> None:
    await exchange(ws_url(app), frame)
    assert await ping(steady, binary=True), "a well-behaved client stopped being served"


async def test_invalid_utf8_in_a_text_frame_closes_with_1007(app: App) -> None:
    async with connect(ws_url(app)) as ws:
        await ws.send(b'{"type":"ping","id":"\xff"}', text=True)
        try:
            await asyncio.wait_for(ws.recv(), 10)
            raise AssertionError("invalid UTF-8 in a text frame must close the connection")
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1007
    async with connect(ws_url(app)) as ws:
        assert await ping(ws, binary=False)


async def test_a_frame_past_the_hard_cap_closes_with_1009_and_others_go_on(app: App) -> None:
    """Raw socket: announce a 5 MiB frame and see the server close before reading it."""
    assert app.server is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", app.server.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    # FIN + binary, masked, 64-bit length of 5 MiB, mask key, then only a little payload.
    writer.write(b"\x82\xff" + struct.pack("!Q", 5 << 20) + b"\x00\x00\x00\x00" + b"x" * 100)
    await writer.drain()
    frame = await asyncio.wait_for(reader.readexactly(4), 5)
    writer.close()
    assert frame[0] == 0x88, "expected a close frame"
    assert struct.unpack("!H", frame[2:4])[0] == 1009
    async with connect(ws_url(app)) as ws:
        assert await ping(ws, binary=True)


# -- every field's extreme values, on two long-lived connections ---------------------------


class Raw:
    """A value written straight into a frame, for what the encoders will not produce:
    Infinity and NaN, integers past 64 bits, lone surrogates, invalid UTF-8, deep nesting,
    MessagePack's bin and ext types. ``means`` is what a server reads from it in a JSON and
    in a MessagePack frame, when that is a valid value."""

    def __init__(
        self, name: str, json: str, msgpack: bytes, means: tuple[Any, Any] = (None, None)
    ) -> None:
        self.name = name
        self.json = json
        self.msgpack = msgpack
        self.means = means

    def __repr__(self) -> str:
        return f"Raw({self.name})"


def _double(value: float) -> bytes:
    return b"\xcb" + struct.pack(">d", value)


INF = Raw("inf", "1e400", _double(math.inf))
NEG_INF = Raw("-inf", "-1e400", _double(-math.inf))
NAN = Raw("nan", "NaN", _double(math.nan))
HUGE_INT = Raw("10**30", str(10**30), b"\xcf" + b"\xff" * 8, (10**30, 2**64 - 1))
SURROGATE = Raw("lone surrogate", '"a\\ud800b"', b"\xa5a\xed\xa0\x80b")
SURROGATE_PAIR = Raw(
    "surrogate pair", '"\\ud83d\\ude00"', msgspec.msgpack.encode("😀"), ("😀",) * 2
)
BAD_UTF8 = Raw("invalid UTF-8", '"\\u0000"', b"\xa2\xff\xfe", ("\x00", None))
BIN = Raw("bin", '"bin"', b"\xc4\x03abc", ("bin", None))
EXT = Raw("timestamp ext", '"ext"', b"\xd6\xff\x00\x00\x00\x00", ("ext", None))


def deep(depth: int) -> Raw:
    """Arrays nested ``depth`` deep."""
    return Raw(f"nested {depth}", "[" * depth + "]" * depth, b"\x91" * depth + b"\x90")


DEEP = [deep(64), deep(1_000), deep(50_000)]
WRONG_TYPES: list[Any] = [None, True, 1.5, "", [], {"k": [1]}, DEEP[1], BIN]
# Characters of every UTF-8 length, NUL, controls, bidi overrides, BOM, noncharacters.
CHARS = ["a", "é", "€", "😀", "\x00", "\n", "\x7f", "\u202e", "\ufeff", "\ufffe", "\U0010ffff"]
MISSING = Raw("missing", "", b"")  # the field left out


def unique(values: list[Any]) -> list[Any]:
    """``values`` without repeats (1 and 1.0 and True are different values here)."""
    kept: dict[str, Any] = {}
    for value in values:
        kept.setdefault(repr(value), value)
    return list(kept.values())


def string_edges(limit: int) -> list[Any]:
    """Strings empty, of one character, at and just past ``limit`` characters (of one-,
    four-byte and NUL characters), one ending in a wide character, and odd code points."""
    lengths = [0, 1, limit, limit + 1]
    values: list[Any] = [c * n for c in ("a", "😀", "\x00") for n in lengths]
    values += ["a" * (limit - 1) + "€", "\n" * limit, "".join(CHARS)]
    return unique([*values, SURROGATE, SURROGATE_PAIR, BAD_UTF8])


def integer_edges(low: int, high: int) -> list[Any]:
    """Integers at and just past their bounds, the 64-bit extremes, floats and text."""
    edges = [low, low - 1, high, high + 1, 0, 2**63 - 1, -(2**63), 2**64 - 1, HUGE_INT]
    return unique([*edges, 1.0, 1.5, -0.0, INF, NEG_INF, NAN, "1"])


def float_edges(high: float) -> list[Any]:
    """Floats at and just past their bounds, tiny, huge and not finite, integers, text."""
    past = math.nextafter(high, math.inf)
    edges = [0.0, -0.0, 5e-324, -5e-324, -1.0, high, past, 1e308, 2**53, 2**64 - 1, HUGE_INT]
    return unique([*edges, INF, NEG_INF, NAN, "1.0"])


# Every field of every message type, and the type tag and an unknown field: the values
# each is fuzzed with, all sent by the sweep, and drawn from (with more) by hypothesis.
EDGES: dict[str, list[Any]] = {
    "type": ["", "PING", "ping\x00", "x" * 10_000, "chat:start ", 7, None, [], DEEP[0]],
    "id": integer_edges(-(2**63), 2**64 - 1) + string_edges(MAX_NAME),
    "project": string_edges(MAX_NAME),
    "session": string_edges(MAX_NAME),
    "episode_id": string_edges(MAX_NAME),
    "episode": string_edges(MAX_NAME),
    "text": string_edges(MAX_TEXT),
    "query": string_edges(MAX_TEXT),
    "message": string_edges(MAX_TEXT),
    "task": string_edges(MAX_TEXT),
    "summary": [*string_edges(MAX_TEXT), "s" * 200_000],
    "path": [*string_edges(MAX_PATH), "/" * MAX_PATH, "../" * 1365, "a\\b"],
    "limit": integer_edges(1, 100),
    "chunk_size": integer_edges(1, 1000),
    "tokens": integer_edges(0, MAX_COUNT),
    "duration_ms": float_edges(MAX_SECONDS * 1000),
    "at": [*float_edges(MAX_SECONDS), time.time() + 10**9],
    "zz-unknown": [*DEEP, SURROGATE, BAD_UTF8, EXT, "x" * 500_000],
}
SCHEMA = {m.__struct_config__.tag: m.__struct_fields__ for m in Message.__args__}
FINAL_REPLIES = {"ack", "context", "result", "pong", "export:end"}
MORE: dict[str, st.SearchStrategy[Any]] = {
    "query": st.text(max_size=200),
    "message": st.text(max_size=200),
    "task": st.text(max_size=200),
    "path": st.text(max_size=50),
    "duration_ms": st.floats(),
    "at": st.floats(),
    "id": st.integers(-(2**70), 2**70) | st.text(max_size=300),
}
EXTREMES = {
    field: st.sampled_from([*values, *WRONG_TYPES, MISSING]) | MORE.get(field, st.nothing())
    for field, values in EDGES.items()
}
CARRIER = {"file:write": "path", "error": "message", "completion": "task", "note": "text"}
# Forgets go to a project of their own: the run checks that nothing acknowledged is lost.
FORGETTING = "forgetting"


def marker(n: int) -> str:
    """A word of letters only, unique to example ``n``, for finding its episode again."""
    letters = "".join(chr(ord("a") + int(d)) for d in str(n))
    return f"zq{letters}"


def normal(kind: str, n: int) -> dict[str, Any]:
    """An ordinary, valid message of this kind, numbered ``n`` and carrying its marker."""
    word = marker(n)
    fields: dict[str, dict[str, Any]] = {
        "chat:start": {"query": f"what broke the parser {word}"},
        "file:write": {"path": f"src/{word}.py"},
        "error": {"message": f"TypeError {word} in parser"},
        "completion": {"task": f"fix {word}", "tokens": 12, "duration_ms": 3.5},
        "query": {"query": f"{word} parser", "limit": 5},
        "export": {"chunk_size": 50, "project": "few"},  # the final check exports them all
        "note": {"text": f"remember the parser {word}"},
        "forget": {"task": f"no such task {word}"},
    }
    return {"type": kind, "id": n, **fields.get(kind, {})}


def with_extremes(kind: str, n: int, values: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Message ``n`` of ``kind`` with ``values`` in place of its own (MISSING: left out),
    and its marker word if the field carrying it into the episode was left alone."""
    message = normal(kind, n)
    for field, value in values.items():
        if value is MISSING:
            message.pop(field, None)
        else:
            message[field] = value
    carrier = CARRIER.get(kind)
    return message, (marker(n) if carrier is not None and carrier not in values else None)


def sweep() -> list[tuple[dict[str, Any], str | None, bool]]:
    """Every edge value of every field, plus its wrong types and its absence, in every
    message type that has the field, in both encodings. A chat:start is sent twice: the
    second may be answered from the cache."""
    cases = []
    n = 10**10  # apart from the numbers hypothesis draws
    for kind in sorted(SCHEMA, key=lambda kind: kind == "chat:start"):  # after episodes
        for field in [*SCHEMA[kind], "type", "zz-unknown"]:
            for value in [*EDGES[field], *WRONG_TYPES, MISSING]:
                for binary in (False, True):
                    n += 1
                    case = (*with_extremes(kind, n, {field: value}), binary)
                    cases += [case, case] if kind == "chat:start" else [case]
    return cases


@st.composite
def extreme_messages(draw: st.DrawFn) -> tuple[dict[str, Any], str | None]:
    """A message with one to three fields at extreme values (or missing), and its marker
    word if the field that carries it into the episode is untouched."""
    n = draw(st.integers(0, 10**9))
    kind = draw(st.sampled_from(sorted(SCHEMA)))
    fields = st.sampled_from([*SCHEMA[kind], "type", "zz-unknown"])
    chosen = draw(st.lists(fields, min_size=1, max_size=3, unique=True))
    return with_extremes(kind, n, {field: draw(EXTREMES[field]) for field in chosen})


def encode_frame(message: dict[str, Any], binary: bool) -> str | bytes:
    """The frame for ``message``, with every Raw value written in place."""
    raws: dict[str, Raw] = {}

    def stand_in(value: Any) -> Any:
        if isinstance(value, Raw):
            key = f"\ue000{len(raws)}\ue001"
            raws[key] = value
            return key
        return value

    with_keys = {k: stand_in(v) for k, v in message.items()}
    if binary:
        data = msgspec.msgpack.encode(with_keys)
        for key, raw in raws.items():
            data = data.replace(msgspec.msgpack.encode(key), raw.msgpack, 1)
        return data
    text = msgspec.json.encode(with_keys).decode()
    for key, raw in raws.items():
        text = text.replace(f'"{key}"', raw.json, 1)
    return text


def clamp_int(value: Any) -> Any:
    """An integer brought into MessagePack's range; any other value as it is."""
    if isinstance(value, int) and not isinstance(value, bool):
        return min(max(value, -(2**63)), 2**64 - 1)
    return value


class ExtremesRun:
    """Two long-lived connections (JSON and MessagePack) and what they were acknowledged."""

    DEFAULT_PROJECT = "extremes"

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: dict[bool, ClientConnection] = {}
        self.acked: dict[str, set[str]] = {}  # project -> episode uuids
        self.findable: list[tuple[str, str, str]] = []  # (project, marker, uuid)
        self.frames = 0

    async def __aenter__(self) -> ExtremesRun:
        for binary in (False, True):
            self.ws[binary] = await connect(self.url, max_size=None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ws in self.ws.values():
            await ws.close()

    async def receive(self, binary: bool) -> Any:
        raw = await asyncio.wait_for(self.ws[binary].recv(), 30)
        assert isinstance(raw, bytes) == binary, "a reply in the other encoding"
        decoded = (
            msgspec.msgpack.decode(raw) if isinstance(raw, bytes) else msgspec.json.decode(raw)
        )
        assert isinstance(decoded, dict), decoded
        return decoded

    async def request(self, message: dict[str, Any] | str | bytes, binary: bool) -> list[Any]:
        """Send one frame; its replies up to its final one, then check with a ping that no
        other reply follows. Every reply is checked: never ``internal``."""
        ws = self.ws[binary]
        if isinstance(message, dict):
            message = encode_frame(message, binary)
        await ws.send(message)
        replies = [await self.receive(binary)]
        for _ in range(100_000):  # bounded: an export sends its chunks, then its end
            if replies[-1]["type"] in FINAL_REPLIES:
                break
            assert replies[-1]["type"] == "export:chunk", replies[-1]
            replies.append(await self.receive(binary))
        self.frames += 1
        for reply in replies:
            if reply["type"] == "ack" and not reply["ok"]:
                assert reply["error"]["code"] == "bad_request", reply
                assert reply["error"]["message"]
        probe = f"probe-{self.frames}"
        await ws.send(encode_frame({"type": "ping", "id": probe}, binary))
        assert await self.receive(binary) == {
            "type": "pong", "id": probe, "version": 1,
        }, "a second reply to one frame, or none"  # fmt: skip
        return replies

    async def send(self, message: dict[str, Any], word: str | None, binary: bool) -> None:
        """One fuzzed message: exactly one reply (an export: its chunks, then its end)."""
        if binary:  # MessagePack integers stop at 64 bits: the nearest one instead
            message = {k: clamp_int(v) for k, v in message.items()}
        if message.get("type") == "forget":
            message = {**message, "project": FORGETTING}
        replies = await self.request(message, binary)
        final = replies[-1]
        sent = {k: v.means[binary] if isinstance(v, Raw) else v for k, v in message.items()}
        if not (final["type"] == "ack" and not final["ok"]):
            assert all(r["id"] == sent.get("id") for r in replies), (sent.get("id"), replies)
        if final["type"] == "export:end":
            chunks = replies[:-1]
            assert [c["seq"] for c in chunks] == list(range(len(chunks)))
            assert final["count"] == sum(len(c["episodes"]) for c in chunks)
        if final["type"] == "ack" and final["ok"] and "forgotten" in final:
            assert sent.get("project") == FORGETTING, "a forget outside its own project"
        elif final["type"] == "ack" and final["ok"]:
            project = sent.get("project") or self.DEFAULT_PROJECT
            assert isinstance(project, str)
            uuids = self.acked.setdefault(project, set())
            if word is not None and final["episode"] not in uuids:  # else stored before
                self.findable.append((project, word, final["episode"]))
            uuids.add(final["episode"])

    async def export(self, project: str, binary: bool) -> list[Any]:
        message = {"type": "export", "id": "final", "project": project, "chunk_size": 1000}
        replies = await self.request(message, binary)
        assert replies[-1]["type"] == "export:end", replies[-1]
        return [e for chunk in replies[:-1] for e in chunk["episodes"]]

    async def query(self, project: str, text: str, binary: bool) -> list[Any]:
        message = {"type": "query", "id": "q", "project": project, "query": text, "limit": 100}
        (reply,) = await self.request(message, binary)
        assert reply["type"] == "result" and reply["id"] == "q", reply
        return list(reply["episodes"])


def test_every_field_of_the_schema_has_extreme_values() -> None:
    """A field added to the protocol is fuzzed too, once it is given its extreme values."""
    fields = {f for names in SCHEMA.values() for f in names}
    assert fields <= set(EDGES), f"no extreme values for {fields - set(EDGES)}"


def run_examples(loop: asyncio.AbstractEventLoop, run: ExtremesRun) -> None:
    """Hypothesis drives the examples from this thread; each is sent on the test's loop."""

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(drawn=extreme_messages(), binary=st.booleans())
    def one(drawn: tuple[dict[str, Any], str | None], binary: bool) -> None:
        message, word = drawn
        asyncio.run_coroutine_threadsafe(run.send(message, word, binary), loop).result(120)

    one()


@pytest.fixture
async def unhurried_app(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> AsyncIterator[App]:
    """A bridge whose rate limit a fast machine running the sweep cannot reach: the sweep
    fuzzes values, not rates."""
    async with App(
        bridge_config(
            tmp_path, valkey, statsd.port, limits={"rate_limit": 1e6, "rate_burst": 10**6}
        )
    ) as bridge:
        yield bridge


async def test_every_fields_extremes_get_one_reply_and_lose_nothing(
    unhurried_app: App, caplog: pytest.LogCaptureFixture
) -> None:
    """Every message type, with each field at, just past and far past its limits (huge and
    non-finite numbers, longest strings, deepest nesting, wrong types, NUL and surrogates),
    in JSON text frames and MessagePack binary frames on two long-lived connections: each
    frame gets exactly one reply (an export: chunks, then an end), never ``internal``; the
    connections stay open; the server logs no traceback; and afterwards query and export,
    in both encodings, still return every acknowledged episode."""
    caplog.set_level(logging.WARNING)
    url = ws_url(unhurried_app, f"/{ExtremesRun.DEFAULT_PROJECT}")
    async with ExtremesRun(url) as run:
        for message, word, binary in sweep():
            await run.send(message, word, binary)
        await asyncio.to_thread(run_examples, asyncio.get_running_loop(), run)
        assert run.acked, "no example was acknowledged"
        for binary in (False, True):
            for project, uuids in run.acked.items():
                exported = await run.export(project, binary)
                assert sorted(e["uuid"] for e in exported) == sorted(uuids), project
                by_uuid = {e["uuid"]: e for e in exported}
                for e in await run.query(project, "error completed modified parser", binary):
                    assert by_uuid.get(e["uuid"]) == e, "query returned an unknown episode"
            for project, word, uuid in run.findable:
                found = await run.query(project, word, binary)
                assert uuid in [e["uuid"] for e in found], (project, word)
        assert all(not ws.close_code for ws in run.ws.values()), "a connection was closed"
    troubles = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not troubles, [f"{r.name}: {r.getMessage()}" for r in troubles]
