"""Clients that read slowly or not at all hold up only themselves, and cost bounded bytes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import connect

from bridge.episode import new_episode
from bridge.runtime.app import App
from bridge.runtime.embedded import EmbeddedValkey
from bridge.wire.server import EXPORT_FRAME_BYTES, WRITE_LIMIT
from tests.conftest import StatsdCollector, bridge_config, ws_url
from tests.raw_client import StuckClient
from tests.waiting import eventually, steady
from tests.wire import receive

Start = Callable[..., Awaitable[App]]
BODY = "x" * 6000  # 200 of these: about 1.2 MB per export


@pytest.fixture
async def start_app(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> AsyncIterator[Start]:
    """Start an in-process bridge holding 200 large episodes in project "big"."""
    apps: list[App] = []

    async def start(**settings: Any) -> App:
        app = App(bridge_config(tmp_path / str(len(apps)), valkey, statsd.port, **settings))
        apps.append(app)
        await app.start()
        await asyncio.gather(
            *(
                app.memory.store(new_episode("big", f"e{i}", f"{i} {BODY}", "seed", {}))
                for i in range(200)
            )
        )
        return app

    yield start
    for app in apps:
        await app.stop()


async def test_exports_to_clients_that_read_nothing_keep_few_bytes_buffered(
    start_app: Start,
) -> None:
    app = await start_app()
    assert app.server is not None
    stuck = [await StuckClient.connect(app.server.port, "/big") for _ in range(6)]
    try:
        for client in stuck:
            for i in range(20):
                await client.send({"type": "export", "id": i, "chunk_size": 100})
        buffered = await steady(
            app.server.outgoing_bytes, "the bytes buffered for the stuck clients", every=0.05
        )
        # Per connection: under the write limit, plus the one chunk being written.
        chunk = 100 * (len(BODY) + 400)
        assert buffered <= len(stuck) * (WRITE_LIMIT + chunk), buffered
        async with connect(ws_url(app, "/big")) as ws:  # everyone else is served as usual
            await ws.send('{"type":"ping","id":"other"}')
            assert (await receive(ws))["type"] == "pong"
            await ws.send('{"type":"export","id":"mine","chunk_size":1000}')
            for _ in range(10):  # bounded: a couple of chunks, then the end
                reply = await receive(ws)
                if reply["type"] == "export:end":
                    break
            assert reply == {"type": "export:end", "id": "mine", "count": 200}
    finally:
        for client in stuck:
            client.close()


async def test_a_large_export_chunk_is_split_and_numbered_on(start_app: Start) -> None:
    app = await start_app()
    async with connect(ws_url(app, "/big"), max_size=None) as ws:
        await ws.send('{"type":"export","id":1,"chunk_size":1000}')
        chunks: list[Any] = []
        for _ in range(1000):  # bounded: 200 episodes, then the end
            raw = await asyncio.wait_for(ws.recv(), 10)
            reply = msgspec.json.decode(raw)
            if reply["type"] == "export:end":
                break
            assert len(raw) <= EXPORT_FRAME_BYTES
            chunks.append(reply)
    assert reply["count"] == 200
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert len(chunks) > 1
    assert sum(len(c["episodes"]) for c in chunks) == 200


async def test_a_client_that_stops_reading_is_cut_off_after_the_deadline(
    start_app: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    app = await start_app()
    assert app.server is not None
    app.server.send_deadline = 1.0
    client = await StuckClient.connect(app.server.port, "/big")
    try:
        for i in range(20):
            await client.send({"type": "export", "id": i, "chunk_size": 100})
        server = app.server
        await eventually(  # the deadline is one second of no progress
            lambda: server.connections == 0, "the stuck connection to be cut off", timeout=15
        )
        assert app.server.connections == 0, "the stuck connection is still open"
        assert app.server.outgoing_bytes() == 0
        assert any("read nothing" in r.getMessage() for r in caplog.records)
    finally:
        client.close()
    async with connect(ws_url(app)) as ws:
        await ws.send('{"type":"ping","id":"after"}')
        assert (await receive(ws))["type"] == "pong"
