"""Property-based fuzzing of the opening handshake against a live server: whatever request
line and headers a client sends, it gets a 4xx, 503, a health answer or a WebSocket (or,
for bytes that are not HTTP, a closed connection): never a 500, never a traceback in the
log, and the server goes on serving."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.typing import Origin

from bridge.runtime.app import App
from bridge.runtime.embedded import EmbeddedValkey
from tests.conftest import StatsdCollector, bridge_config, ws_url

TOKEN = "fuzz-token"
ORIGIN = "https://good.example"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="

METHODS = ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "CONNECT", "TRACE", "get", "G ET"]
PATHS = ["/", "/healthz", "/readyz", "/shop", "/%ff%00", "//[", "http://[::1", "//]/",
         "*", "/a?b=[", "/#frag", "http://host/x", "/" + "p" * 300, "/readyz?x",
         "/healthz/"]  # fmt: skip
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/1.1x", "HTTP/9.9", ""]
NAMES = ["Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
         "Authorization", "Origin", "Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions",
         "Content-Length", "Transfer-Encoding", "Cookie", "X-Anything"]  # fmt: skip
VALUES = ["websocket", "Upgrade", "upgrade, keep-alive", KEY, "short", "13", "8", "",
          f"Bearer {TOKEN}", f"bearer {TOKEN}", f"Bearer  {TOKEN} ", "Bearer", "Basic eA==",
          ORIGIN, "null", "https://evil.example", "permessage-deflate; x=", "chunked", "0",
          "5", "-1", "1" * 40, "\xe9t\xe9", "a\tb"]  # fmt: skip
# Visible ASCII and Latin-1, no CR or LF (which would end the header instead).
header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60
)
path_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """An HTTP request a careless or hostile client might open a WebSocket with."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))  # not HTTP at all
    # Mostly a valid request line, so most requests reach the server's own checks.
    method = draw(st.sampled_from(["GET"] * 8 + METHODS) | st.text("GETPOSX", max_size=8))
    path = draw(st.sampled_from(PATHS) | path_text.map(lambda p: "/" + p))
    version = draw(st.sampled_from(["HTTP/1.1"] * 8 + VERSIONS))
    headers: list[tuple[str, str]] = []
    if draw(st.integers(0, 3)):  # a well-formed upgrade to start from, mostly
        headers += [("Host", "127.0.0.1"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13")]  # fmt: skip
        if draw(st.integers(0, 2)):
            headers.append(("Authorization", f"Bearer {TOKEN}"))
    extra = st.tuples(
        st.sampled_from(NAMES) | st.text("abcXYZ-_", min_size=1, max_size=12),
        st.sampled_from(VALUES) | header_text,
    )
    headers += draw(st.lists(extra, max_size=4))
    headers = draw(st.permutations(headers))
    if draw(st.integers(0, 19)) == 0:
        headers += [("X-Many", "x")] * draw(st.sampled_from([120, 200]))  # over the count
    if draw(st.integers(0, 19)) == 0:
        headers.append(("X-Long", "y" * draw(st.sampled_from([8000, 9000]))))  # line limit
    lines = [f"{method} {path} {version}".rstrip(), *(f"{n}: {v}" for n, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@pytest.fixture
async def guarded(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> AsyncIterator[App]:
    """A bridge with a token and an allowed origin, so every admission branch runs."""
    config = bridge_config(
        tmp_path,
        valkey,
        statsd.port,
        server={"token": TOKEN, "allowed_origins": (ORIGIN,)},
        limits={"max_connections": 50},
    )
    async with App(config) as app:
        yield app


async def exchange(port: int, request: bytes) -> bytes:
    """Send a request, say nothing more, and read the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        if not request.endswith(b"\r\n\r\n"):
            writer.write_eof()  # a request cut short is answered at once, not at a timeout
        answer = b""
        while len(answer) < 1 << 16 and not answer.startswith(b"HTTP/1.1 101"):
            data = await asyncio.wait_for(reader.read(1 << 16), 15)
            if not data:
                break
            answer += data
        return answer
    finally:
        writer.transport.abort()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
async def test_no_handshake_gets_a_500_or_a_traceback(
    guarded: App, caplog: pytest.LogCaptureFixture, request: bytes
) -> None:
    caplog.set_level(logging.INFO)
    assert guarded.server is not None
    seen = len(caplog.records)
    answer = await exchange(guarded.server.port, request)
    if answer:
        assert answer.startswith(b"HTTP/1.1 "), answer[:200]
        status = int(answer.split(maxsplit=2)[1])
        assert status in {101, 200, 400, 401, 403, 405, 413, 414, 426, 431, 503, 505}, answer
    logged = caplog.records[seen:]
    assert not [r for r in logged if r.exc_info], [r.getMessage() for r in logged]
    assert not [r for r in logged if r.levelno >= logging.ERROR], [r.getMessage() for r in logged]
    health = await exchange(guarded.server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert health.startswith(b"HTTP/1.1 200"), "the server stopped answering"


async def test_after_the_fuzzing_a_client_is_served(guarded: App) -> None:
    """The checks above hold in every example; this is the plain path they must not break."""
    headers = {"Authorization": f"bearer {TOKEN}"}
    async with connect(
        ws_url(guarded, "/shop"), additional_headers=headers, origin=Origin(ORIGIN)
    ) as ws:
        await ws.send('{"type":"ping","id":1}')
        assert '"pong"' in str(await asyncio.wait_for(ws.recv(), 10))
