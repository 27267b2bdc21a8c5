"""Refused handshakes are logged by a real server: one line per HTTP status and interval,
with the client's address, the status and the reason, and never the token."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from bridge.runtime.app import App
from bridge.runtime.embedded import EmbeddedValkey
from tests.conftest import StatsdCollector, bridge_config, ws_url

TOKEN = "s3cret-token-value"
WRONG = "n0t-the-t0ken-value"


@pytest.fixture
async def guarded(
    tmp_path: Path, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> AsyncIterator[App]:
    """A bridge that wants TOKEN, on a free loopback port; stopped afterwards."""
    async with App(bridge_config(tmp_path, valkey, statsd.port, server={"token": TOKEN})) as app:
        yield app


async def refused(app: App, headers: dict[str, str]) -> int:
    """Try a handshake that the bridge refuses; its HTTP status."""
    with pytest.raises(InvalidStatus) as error:
        async with connect(ws_url(app), additional_headers=headers):
            pass
    return error.value.response.status_code


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "bridge.wire.server" and r.getMessage().startswith("refused a handshake")
    ]


async def test_refused_handshakes_are_logged_once_per_interval_without_the_token(
    guarded: App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert guarded.server is not None
    guarded.server.refusal_log_interval = 3600.0  # every refusal below falls in one interval

    for _ in range(5):
        assert await refused(guarded, {"Authorization": f"Bearer {WRONG}"}) == 401
    assert await refused(guarded, {}) == 401
    two = {"Authorization": f"Bearer {WRONG}"}
    with pytest.raises(InvalidStatus) as error:
        async with connect(ws_url(guarded), additional_headers=[*two.items(), *two.items()]):
            pass
    assert error.value.response.status_code == 400

    lines = refusal_lines(caplog)
    assert lines == [
        "refused a handshake from 127.0.0.1: HTTP 401, missing or wrong token",
        "refused a handshake from 127.0.0.1: HTTP 400, more than one Authorization header",
    ]

    # The interval over, the next refusal is logged with the count of those held back.
    guarded.server.refusal_log_interval = 0.0
    assert await refused(guarded, {"Authorization": f"Bearer {WRONG}"}) == 401
    assert refusal_lines(caplog)[-1] == (
        "refused a handshake from 127.0.0.1: HTTP 401, missing or wrong token "
        "(5 more since the last such line)"
    )
    # A handshake with the token is let in and logs no refusal.
    async with connect(ws_url(guarded), additional_headers={"Authorization": f"Bearer {TOKEN}"}):
        pass
    assert len(refusal_lines(caplog)) == 3

    # No server-side record, of any logger and level, holds either token (the test's own
    # client logs the headers it sends).
    for record in caplog.records:
        if record.name.startswith("websockets.client"):
            continue
        text = record.getMessage() + str(record.args)
        assert TOKEN not in text and WRONG not in text, text
