"""The composition root's lifecycle (bridge.runtime.app.App): an async context manager that
starts its parts in order and closes them in reverse, also when a part cannot start.
Real parts throughout: a private valkey-server, the embedded store, a real socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from bridge.config import Config, MetricsConfig, ServerConfig, StartupError
from bridge.runtime.app import App
from bridge.runtime.datadir import DataDirLock
from tests.conftest import StatsdCollector
from tests.test_cli import children_of
from tests.wire import ask


def private_valkeys() -> list[int]:
    """The valkey-server processes this test process started and has not stopped."""
    found = []
    for pid in children_of(os.getpid()):
        try:
            if "valkey-server" in Path(f"/proc/{pid}/cmdline").read_text():
                found.append(pid)
        except OSError:  # gone meanwhile
            continue
    return found


def own_config(tmp_path: Path, statsd: StatsdCollector, port: int = 0) -> Config:
    """A bridge on a loopback port (0: a free one) with its own private Valkey."""
    return Config(
        data_dir=tmp_path / "data",
        server=ServerConfig(host="127.0.0.1", port=port),
        metrics=MetricsConfig(host="127.0.0.1", port=statsd.port),
    )


async def test_an_app_serves_inside_its_block_and_has_closed_everything_after_it(
    tmp_path: Path, statsd: StatsdCollector
) -> None:
    config = own_config(tmp_path, statsd)
    before = set(private_valkeys())
    async with App(config) as app:
        url = f"ws://127.0.0.1:{app.server.port}/p"
        async with connect(url) as ws:
            assert (await ask(ws, {"type": "ping", "id": 1}, binary=True))["type"] == "pong"
        assert app.valkey is not None and app.valkey.pid in private_valkeys()
        with pytest.raises(StartupError, match="another bridge"):
            DataDirLock(config.data_dir).acquire()  # held while it runs
    assert set(private_valkeys()) == before, "the private Valkey outlived its App"
    with DataDirLock(config.data_dir):  # let go
        pass
    with pytest.raises(RuntimeError, match="not running"):
        _ = app.server
    with pytest.raises(RuntimeError, match="starts once"):
        await app.start()


async def test_a_part_that_cannot_start_stops_every_part_started_before_it(
    tmp_path: Path, statsd: StatsdCollector
) -> None:
    """The listener starts last: a port in use fails the start after the private Valkey,
    the cache, memory and the outbox are up, and each of them is closed again."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = own_config(tmp_path, statsd, port=taken.getsockname()[1])
        before = set(private_valkeys())
        app = App(config)
        with pytest.raises(StartupError, match=r"cannot listen on 127\.0\.0\.1:"):
            async with app:
                raise AssertionError("the block must not run when the start failed")
    assert app.valkey is not None, "the failure came after the private Valkey started"
    assert set(private_valkeys()) == before, "the private Valkey outlived the failed start"
    with DataDirLock(config.data_dir):  # let go
        pass
    await app.stop()  # nothing left to stop: a second stop is harmless
