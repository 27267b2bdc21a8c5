"""Group commit for asyncio (bridge/cache/coalesce.py): plain asyncio, no server."""

from __future__ import annotations

import asyncio

import pytest

from bridge.cache.coalesce import Coalescer


class Recorder:
    """A flush that records its batches and can be held open, or made to fail."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, set[int]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None
        self.started = asyncio.Event()

    async def flush(self, key: str, items: set[int]) -> int:
        self.batches.append((key, set(items)))
        self.started.set()
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return len(items)


async def test_requests_made_while_a_batch_runs_share_the_next_one() -> None:
    recorder = Recorder()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.flush)
    recorder.gate.clear()
    first = asyncio.create_task(coalescer.submit("p", 0))
    await recorder.started.wait()  # the first batch runs, held at the gate
    rest = [asyncio.create_task(coalescer.submit("p", n)) for n in range(1, 6)]
    await asyncio.sleep(0)
    assert recorder.batches == [("p", {0})]  # the others wait for the next batch
    recorder.gate.set()
    assert await first == 1
    assert await asyncio.gather(*rest) == [5] * 5
    assert recorder.batches == [("p", {0}), ("p", {1, 2, 3, 4, 5})]


async def test_every_request_is_served_by_a_batch_that_started_after_it() -> None:
    """Read-your-writes: a batch that was already on its way does not answer for an item
    submitted after it started."""
    recorder = Recorder()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.flush)
    recorder.gate.clear()
    early = asyncio.create_task(coalescer.submit("p", 1))
    await recorder.started.wait()
    late = asyncio.create_task(coalescer.submit("p", 1))  # the same item, once more
    await asyncio.sleep(0)
    recorder.gate.set()
    await asyncio.gather(early, late)
    assert recorder.batches == [("p", {1}), ("p", {1})]


async def test_keys_run_independently() -> None:
    recorder = Recorder()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.flush)
    results = await asyncio.gather(coalescer.submit("a", 1), coalescer.submit("b", 2))
    assert list(results) == [1, 1]
    assert sorted(recorder.batches) == [("a", {1}), ("b", {2})]


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_runs() -> None:
    recorder = Recorder()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.flush)
    recorder.fail = RuntimeError("valkey went away")
    calls = [coalescer.submit("p", n) for n in range(3)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    recorder.fail = None
    assert await coalescer.submit("p", 9) == 1


async def test_a_cancelled_caller_does_not_cancel_the_batch_of_the_others() -> None:
    recorder = Recorder()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.flush)
    recorder.gate.clear()
    leaving = asyncio.create_task(coalescer.submit("p", 1))
    staying = asyncio.create_task(coalescer.submit("p", 2))
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    recorder.gate.set()
    assert await staying == 2
    await coalescer.drain()
    assert recorder.batches == [("p", {1, 2})]
