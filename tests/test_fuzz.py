"""Property-based fuzzing of a live server: whatever a client sends, it gets a reply or a
clean close with a documented code, and the server keeps serving everyone else."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bridge.app import App
from tests.conftest import ws_url

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
        decoded = (msgspec.json.decode if isinstance(reply, str) else msgspec.msgpack.decode)(reply)
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
        reply = (msgspec.msgpack.decode if isinstance(raw, bytes) else msgspec.json.decode)(raw)
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
