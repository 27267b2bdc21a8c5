"""Stopping background tasks (bridge/background.py), with tasks that behave as libraries
do: one that takes a cancellation for its own and carries on, as anyio's cancel scopes
under httpx can, and one that will not stop at all."""

from __future__ import annotations

import asyncio

import pytest

from bridge.background import CANCEL_EVERY_S, cancel_all_and_wait, cancel_and_wait


async def swallows_one_cancellation(swallowed: list[int]) -> None:
    """Waits; the first cancellation is caught and turned into another wait."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        swallowed.append(1)
    await asyncio.sleep(3600)


async def stops_only_when_let(let: asyncio.Event) -> None:
    """Takes every cancellation for its own until ``let`` is set."""
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if let.is_set():
                raise


async def test_a_task_that_swallows_a_cancellation_is_cancelled_again() -> None:
    swallowed: list[int] = []
    task = asyncio.create_task(swallows_one_cancellation(swallowed))
    await asyncio.sleep(0)
    stuck = await cancel_all_and_wait([task], timeout=10 * CANCEL_EVERY_S)
    assert stuck == set() and task.cancelled() and swallowed == [1]


async def test_a_task_that_never_stops_is_given_up_after_the_timeout() -> None:
    let = asyncio.Event()
    task = asyncio.create_task(stops_only_when_let(let))
    await asyncio.sleep(0)
    stuck = await cancel_all_and_wait([task], timeout=2 * CANCEL_EVERY_S)
    assert stuck == {task} and not task.done()
    let.set()
    assert await cancel_all_and_wait(stuck, timeout=10 * CANCEL_EVERY_S) == set()
    assert task.cancelled()


async def test_cancel_and_wait_raises_what_the_task_raised_and_not_its_cancellation() -> None:
    async def fails() -> None:
        raise ValueError("broken")

    failed = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="broken"):
        await cancel_and_wait(failed)
    cancelled = asyncio.create_task(asyncio.sleep(3600))
    await cancel_and_wait(cancelled, timeout=5)
    assert cancelled.cancelled()
    await cancel_and_wait(None)
