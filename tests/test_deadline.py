"""The shutdown's one deadline (bridge.deadline), on a clock that moves only when the test
says so."""

from __future__ import annotations

import asyncio

import pytest

from bridge.deadline import GRACE, Deadline
from tests.clock import ManualClock


async def test_steps_share_one_deadline_and_a_step_past_it_is_cancelled() -> None:
    clock = ManualClock()
    deadline = Deadline(8.0, clock=clock)
    clock.advance(60.0)  # made up front, counting only once the shutdown begins
    assert deadline.remaining() == 8.0 and not deadline.started
    assert deadline.start() is deadline
    assert await deadline.run(asyncio.sleep(0), "a quick step")
    clock.advance(5.0)
    assert deadline.remaining() == 3.0  # what the first steps left, not 8 s again
    clock.advance(3.0)
    assert deadline.expired
    stuck = asyncio.get_running_loop().create_future()
    assert not await deadline.run(stuck, "a stuck step")
    assert stuck.cancelled()
    assert deadline.cut == ["a stuck step"]


async def test_closing_steps_share_a_grace_past_the_deadline() -> None:
    """Closing a connection or stopping a child process still begins after the deadline,
    but all such steps together end by the deadline plus GRACE."""
    clock = ManualClock()
    deadline = Deadline(8.0, clock=clock).start()
    clock.advance(8.0)
    assert deadline.remaining() == 0.0 and deadline.closing_remaining() == GRACE
    assert await deadline.run(asyncio.sleep(0), "closing the cache", closing=True)
    clock.advance(GRACE)
    assert deadline.closing_remaining() == 0.0
    stuck = asyncio.get_running_loop().create_future()
    assert not await deadline.run(stuck, "closing memory", closing=True)
    assert deadline.cut == ["closing memory"]


async def test_a_step_that_fails_raises_its_own_error() -> None:
    async def broken() -> None:
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        await Deadline(8.0, clock=ManualClock()).run(broken(), "a broken step")


async def test_a_shutdown_given_up_on_cancels_the_step_it_waits_for() -> None:
    stuck = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(Deadline(8.0, clock=ManualClock()).run(stuck, "a step"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert stuck.cancelled()
