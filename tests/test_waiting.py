"""The tests' own waiting helpers (tests/waiting.py): what they return, and what their
failures say."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.waiting import eventually, steady


async def test_eventually_returns_the_first_value_that_holds() -> None:
    counter = itertools.count()
    assert await eventually(lambda: next(counter), "a count of 3", until=lambda n: n >= 3) == 3


async def test_eventually_awaits_an_async_probe() -> None:
    replies = iter(["busy", "busy", "ready"])

    async def probe() -> str:
        return next(replies)

    assert await eventually(probe, "ready", until=lambda r: r == "ready", every=0) == "ready"


async def test_a_condition_that_never_holds_fails_naming_it_and_the_last_value() -> None:
    with pytest.raises(AssertionError, match=r"waited 0.1 s for the queue to drain; last seen: 4"):
        await eventually(lambda: 4, "the queue to drain", until=lambda n: n == 0, timeout=0.1)


async def test_ignored_exceptions_count_as_not_yet_and_are_reported() -> None:
    async def refused() -> int:
        raise ConnectionRefusedError("nobody listens")

    with pytest.raises(AssertionError, match=r"last seen: ConnectionRefusedError\('nobody"):
        await eventually(refused, "a listener", ignoring=(ConnectionRefusedError,), timeout=0.1)
    with pytest.raises(ConnectionRefusedError):  # any other kind ends the wait at once
        await eventually(refused, "a listener", timeout=10)


async def test_a_probe_that_hangs_is_cut_off_at_the_deadline() -> None:
    async def hangs() -> bool:
        await asyncio.Event().wait()
        return True

    with pytest.raises(AssertionError, match="the probe never returned"):
        await eventually(hangs, "an answer", timeout=0.1)


async def test_steady_returns_the_value_once_it_stops_moving() -> None:
    readings = iter([1, 5, 9, 9, 9, 9])
    assert await steady(lambda: next(readings), "the count", readings=3, every=0) == 9


async def test_a_value_that_keeps_moving_is_never_steady() -> None:
    counter = itertools.count()
    with pytest.raises(AssertionError, match="the count to stay the same for 3 readings"):
        await steady(lambda: next(counter), "the count", readings=3, every=0, timeout=0.1)
