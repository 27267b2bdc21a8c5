"""Admission and limits against the real server: each limit hit, others keep being served."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from bridge.config import ConfigError, parse_serve, redact_url
from bridge.runtime.app import App
from bridge.runtime.embedded import EmbeddedValkey
from bridge.wire.limits import TokenBucket
from tests.clock import ManualClock
from tests.conftest import SlowMemory, StatsdCollector, bridge_config, ws_url
from tests.test_cli import bridge_process
from tests.waiting import eventually
from tests.wire import ask, receive, send

TOKEN = "s3cret-token-value"
Start = Callable[..., Awaitable[App]]


@pytest.fixture
async def start_app(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> AsyncIterator[Start]:
    """Start an in-process bridge with the given settings; all are stopped afterwards."""
    apps: list[App] = []

    async def start(memory: Any = None, **settings: Any) -> App:
        config = bridge_config(tmp_path / str(len(apps)), valkey, statsd.port, **settings)
        app = App(config, memory=memory)
        apps.append(app)
        await app.start()
        return app

    yield start
    for app in apps:
        await app.stop()


async def http_get(app: App, path: str) -> tuple[int, bytes]:
    """A plain HTTP/1.1 GET on the bridge's port: (status, body)."""
    assert app.server is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", app.server.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
                 .split(b":")[1])  # fmt: skip
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    writer.close()
    return int(head.split()[1]), body


async def test_the_token_is_required_and_compared_exactly(
    start_app: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    app = await start_app(server={"token": TOKEN})
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(app), additional_headers=headers):
                pass
        assert refused.value.response.status_code == 401
        assert refused.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    async with connect(ws_url(app), additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        assert (await ask(ws, {"type": "ping", "id": 1}))["type"] == "pong"
    assert (await http_get(app, "/healthz"))[0] == 200, "health checks need no token"
    server_side = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    assert any("Authorization" in r.getMessage() for r in server_side), "headers were logged"
    assert not any(TOKEN in r.getMessage() for r in server_side)


async def raw_handshake(app: App, *headers: tuple[str, str], path: str = "/") -> bytes:
    """A WebSocket opening handshake with exactly these extra headers (repeats kept): the
    server's whole answer (it closes the connection after refusing)."""
    assert app.server is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", app.server.port)
    lines = [
        f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket",
        "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13", *(f"{name}: {value}" for name, value in headers),
    ]  # fmt: skip
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    if not head.startswith(b"HTTP/1.1 101"):
        head += await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return head


async def test_two_authorization_headers_get_400_and_no_traceback(
    start_app: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = await start_app(server={"token": TOKEN})
    auth = ("Authorization", f"Bearer {TOKEN}")
    for _ in range(3):
        answer = await raw_handshake(app, auth, auth)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert answer.endswith(b"more than one Authorization header\n")
    assert not [r for r in caplog.records if r.exc_info], "a refused handshake logged a traceback"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert (await raw_handshake(app, auth)).startswith(b"HTTP/1.1 101")


async def test_the_bearer_scheme_is_case_insensitive(start_app: Start) -> None:
    app = await start_app(server={"token": TOKEN})
    for scheme in ["bearer", "BEARER", "BeArEr"]:
        headers = {"Authorization": f"{scheme} {TOKEN}"}
        async with connect(ws_url(app), additional_headers=headers) as ws:
            assert (await ask(ws, {"type": "ping", "id": scheme}))["type"] == "pong"
    for wrong in [f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer{TOKEN}", f"bearer {TOKEN[:-1]}"]:
        answer = await raw_handshake(app, ("Authorization", wrong))
        assert answer.startswith(b"HTTP/1.1 401 "), (wrong, answer)


async def test_an_unparsable_request_path_gets_400_and_no_traceback(
    start_app: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = await start_app()
    for path in ["//[", "http://[::1", "/x?[", "//]/"]:
        answer = await raw_handshake(app, path=path)
        assert not answer.startswith(b"HTTP/1.1 500"), (path, answer)
        assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 101")), (path, answer)
    assert not [r for r in caplog.records if r.exc_info]


def test_listening_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="without a token"):
        parse_serve(["--host", "0.0.0.0"], {})
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = parse_serve(["--host", "0.0.0.0", "--token-file", str(token_file)], {})
    assert config.server.token == TOKEN
    assert TOKEN not in repr(config)
    assert parse_serve([], {"BRIDGE_HOST": "::", "BRIDGE_TOKEN": TOKEN}).server.token == TOKEN
    with pytest.raises(ConfigError, match="token file"):
        parse_serve(["--token-file", str(tmp_path / "missing")], {})


async def test_browser_origins_are_refused_unless_allowed(start_app: Start) -> None:
    app = await start_app(server={"allowed_origins": ("https://good.example",)})
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(app), origin=Origin("https://evil.example")):
            pass
    assert refused.value.response.status_code == 403
    async with connect(ws_url(app), origin=Origin("https://good.example")) as ws:
        assert (await ask(ws, {"type": "ping", "id": 1}))["type"] == "pong"


async def test_the_connection_cap_refuses_new_ones_and_serves_the_rest(start_app: Start) -> None:
    app = await start_app(limits={"max_connections": 2})
    async with connect(ws_url(app)) as one, connect(ws_url(app)) as two:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(app)):
                pass
        assert refused.value.response.status_code == 503
        assert b"too many connections (limit 2)" in refused.value.response.body
        assert (await ask(one, {"type": "ping", "id": 1}))["type"] == "pong"
        assert (await ask(two, {"type": "ping", "id": 2}))["type"] == "pong"
    await eventually(  # the server notices the closes
        lambda: app.server is not None and app.server.connections == 0,
        "the server to count its closed connections out",
    )
    async with connect(ws_url(app)) as three:
        assert (await ask(three, {"type": "ping", "id": 3}))["type"] == "pong"


async def test_the_rate_limit_answers_rate_limited_and_the_connection_goes_on(
    start_app: Start,
) -> None:
    app = await start_app(limits={"rate_limit": 2.0, "rate_burst": 5})
    async with connect(ws_url(app)) as ws, connect(ws_url(app)) as other:
        for i in range(30):
            await send(ws, {"type": "ping", "id": i})
        replies = [await receive(ws) for _ in range(30)]
        limited = [r for r in replies if r["type"] == "ack"]
        # 5 from the burst, plus at most a few refilled however slowly the 30 went out.
        assert 20 <= len(limited) <= 25
        assert all(r["error"]["code"] == "rate_limited" for r in limited)
        assert all(r["error"]["retryable"] is True for r in limited)
        assert all("retry in" in r["error"]["message"] for r in limited)
        assert {r["id"] for r in replies} == set(range(30)), "every message got its reply"
        assert (await ask(other, {"type": "ping", "id": "o"}))["type"] == "pong"
        later = await eventually(  # one token back at 2 per second
            lambda: ask(ws, {"type": "ping", "id": "later"}),
            "a token back for the limited connection",
            until=lambda reply: reply["type"] == "pong",
        )
        assert later["type"] == "pong"


def test_a_token_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    clock = ManualClock()
    bucket = TokenBucket(rate=2.0, burst=5, clock=clock)
    assert [bucket.allow() for _ in range(6)] == [True] * 5 + [False]
    assert bucket.retry_after() == pytest.approx(0.5)
    clock.advance(0.25)  # half a token
    assert not bucket.allow()
    assert bucket.retry_after() == pytest.approx(0.25)
    clock.advance(0.25)
    assert bucket.allow()
    assert not bucket.allow()
    clock.advance(3600)  # a long quiet spell refills the burst, no more
    assert [bucket.allow() for _ in range(6)] == [True] * 5 + [False]


async def test_field_limits_are_settings(start_app: Start) -> None:
    app = await start_app(limits={"max_text": 10, "max_path": 8, "max_name": 5})
    async with connect(ws_url(app)) as ws:
        long_query = await ask(ws, {"type": "chat:start", "id": 1, "query": "x" * 11})
        assert long_query["error"]["code"] == "bad_request"
        assert "<= 10 - at `$.query`" in long_query["error"]["message"]
        long_path = await ask(ws, {"type": "file:write", "id": 2, "path": "src/abc.py"})
        assert "<= 8 - at `$.path`" in long_path["error"]["message"]
        long_project = await ask(ws, {"type": "ping", "id": 3, "project": "toolong"})
        assert "$.project" in long_project["error"]["message"]
        assert (await ask(ws, {"type": "chat:start", "id": 4, "query": "ok"}))["type"] == "context"


async def test_in_flight_requests_per_connection_are_bounded(
    start_app: Start, tmp_path: Path
) -> None:
    """Beyond max_inflight the server stops reading; everything is still answered."""
    memory = SlowMemory(tmp_path / "slow.sqlite3", delay=0.1)
    app = await start_app(memory=memory, limits={"max_inflight": 2})
    async with connect(ws_url(app)) as ws:
        for i in range(8):
            await send(ws, {"type": "query", "id": i, "query": f"q{i}"})
        replies = [await receive(ws) for _ in range(8)]
    assert sorted(r["id"] for r in replies) == list(range(8))
    assert all(r["type"] == "result" for r in replies)
    assert memory.most_running == 2


async def test_readyz_reports_valkey_down_and_up_again(
    start_app: Start, valkey: EmbeddedValkey
) -> None:
    """The bridge serves from memory without Valkey: still ready, the cache degraded."""
    app = await start_app()
    assert await http_get(app, "/readyz") == (200, b"ready\n")
    valkey.kill()
    status, body = await http_get(app, "/readyz")
    assert status == 200 and body.startswith(b"ready\n")
    assert b"cache: degraded (valkey: unreachable" in body
    await valkey.start()
    await eventually(  # the invalidation stream reconnects within its backoff
        lambda: http_get(app, "/readyz"),
        "/readyz to say ready once Valkey is back",
        until=lambda answer: answer == (200, b"ready\n"),
    )
    assert await http_get(app, "/readyz") == (200, b"ready\n")


def test_urls_are_logged_without_their_password() -> None:
    assert redact_url("redis://:s3cret@h:6380/0") == "redis://:***@h:6380/0"
    assert redact_url("bolt://neo4j:pw@db:7687") == "bolt://neo4j:***@db:7687"
    assert redact_url("unix:///run/valkey.sock") == "unix:///run/valkey.sock"


async def test_the_start_up_line_and_log_never_show_a_password(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> None:
    """A Valkey URL with a password (this Valkey wants none, so AUTH fails: logged)."""
    url = valkey.url.replace("redis://", "redis://:topsecret-pw@")
    args = ["--data-dir", str(tmp_path), "--valkey-url", url, "--log-level", "debug"]
    async with bridge_process(*args, env={"DD_DOGSTATSD_PORT": str(statsd.port)}) as bridge:
        async with connect(bridge.url) as ws:
            reply = await ask(ws, {"type": "chat:start", "id": 1, "query": "anything"})
            assert reply["type"] == "context"
        started = bridge.started_line
        log = "\n".join(bridge.log)
    assert ":***@" in started
    assert "topsecret-pw" not in started
    assert "topsecret-pw" not in log
