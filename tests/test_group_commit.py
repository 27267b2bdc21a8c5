"""Group commit (bridge/memory/group_commit.py): batching, order, failures, cancellation.

The store here is a list the batches are appended to: GroupCommit is plain scheduling
logic over any coroutine that commits a batch (the graph backend's real batches are
tested against FalkorDB in tests/test_memory_graphiti.py).
"""

from __future__ import annotations

import asyncio

import pytest

from bridge.errors import MemoryUnavailable
from bridge.memory.group_commit import GroupCommit


class Store:
    """Commits batches of strings into ``committed``; each batch waits for ``gate``; an
    item ``"bad"`` fails the batch holding it."""

    def __init__(self) -> None:
        self.committed: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def send(self, items: list[str]) -> list[str]:
        await self.gate.wait()
        if "bad" in items:
            raise MemoryUnavailable("cannot store 'bad'")
        self.committed.append(list(items))
        return [item.upper() for item in items]


async def test_writes_queued_while_a_batch_is_out_form_the_next_one() -> None:
    store = Store()
    commit = GroupCommit(store.send)
    store.gate.clear()
    first = asyncio.create_task(commit.write("a"))
    await asyncio.sleep(0)  # the first batch is out, waiting
    rest = [asyncio.create_task(commit.write(x)) for x in "bcdefgh"]
    await asyncio.sleep(0)
    store.gate.set()
    assert await first == "A"
    assert await asyncio.gather(*rest) == list("BCDEFGH")
    assert store.committed == [["a"], list("bcdefgh")]
    assert commit.batches == 2


async def test_a_batch_holds_at_most_max_batch_items_in_order() -> None:
    store = Store()
    commit = GroupCommit(store.send, max_batch=3)
    store.gate.clear()
    writes = [asyncio.create_task(commit.write(str(n))) for n in range(8)]
    await asyncio.sleep(0)
    store.gate.set()
    assert await asyncio.gather(*writes) == [str(n) for n in range(8)]
    assert store.committed == [["0", "1", "2"], ["3", "4", "5"], ["6", "7"]]


async def test_a_failed_batch_is_sent_again_one_item_at_a_time() -> None:
    store = Store()
    commit = GroupCommit(store.send)
    store.gate.clear()
    writes = [asyncio.create_task(commit.write(x)) for x in ("a", "bad", "c")]
    await asyncio.sleep(0)
    store.gate.set()
    results = await asyncio.gather(*writes, return_exceptions=True)
    assert results[0] == "A" and results[2] == "C"
    assert isinstance(results[1], MemoryUnavailable) and "'bad'" in str(results[1])
    assert store.committed == [["a"], ["c"]]
    assert await commit.write("d") == "D"  # the writer goes on


async def test_a_writer_that_stops_waiting_leaves_its_item_in_the_batch() -> None:
    store = Store()
    commit = GroupCommit(store.send)
    store.gate.clear()
    gone = asyncio.create_task(commit.write("a"))
    kept = asyncio.create_task(commit.write("b"))
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    store.gate.set()
    assert await kept == "B"
    assert store.committed == [["a", "b"]]
    await commit.close()


async def test_close_waits_for_what_was_handed_in() -> None:
    store = Store()
    commit = GroupCommit(store.send)
    store.gate.clear()
    writes = [asyncio.create_task(commit.write(x)) for x in "xyz"]
    await asyncio.sleep(0)
    closing = asyncio.create_task(commit.close())
    await asyncio.sleep(0)
    assert not closing.done()
    store.gate.set()
    await closing
    assert store.committed == [list("xyz")]
    assert [w.result() for w in writes] == list("XYZ")
