"""Group commit: the items of concurrent writers sent to a store in batches.

A store that writes each episode on its own pays a round trip and a commit (for FalkorDB,
an fsync of its append-only file and work that grows with the graph) for each one.
:class:`GroupCommit` queues what concurrent writers hand it and sends it in batches: one
batch in flight at a time, the items queued meanwhile forming the next (up to
``max_batch``), so the busier the store, the more items share one commit. The SQLite
store's writer thread does the same with its queue.

A writer's call returns once the batch holding its item is committed. A batch that fails
as a whole is sent again one item at a time, so an item that cannot be written fails its
own writer only. A writer that stops waiting (cancelled) leaves its item in the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Final, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_BATCH: Final = 64


class GroupCommit(Generic[T, R]):
    """Items written through ``send``, which commits a batch and returns one result per
    item in order (or raises for the whole batch)."""

    def __init__(self, send: Callable[[list[T]], Awaitable[list[R]]], max_batch: int = MAX_BATCH):
        self._send = send
        self.max_batch = max_batch
        self.batches = 0  # batches committed (to observe the grouping)
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def write(self, item: T) -> R:
        """Commit ``item`` with the next batch; its result. Raises what sending it alone
        raised."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_retrieve)  # a writer that stopped waiting no longer asks
        self._queue.append((item, done))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run())
        return await asyncio.shield(done)

    async def _run(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                results = await self._send([item for item, _ in batch])
            except Exception as e:
                if len(batch) == 1:
                    _settle(batch[0][1], e)
                    continue
                for item, done in batch:  # one at a time: a bad item fails alone
                    try:
                        _settle(done, (await self._send([item]))[0])
                    except Exception as alone:
                        _settle(done, alone)
                self.batches += len(batch)
                continue
            self.batches += 1
            for (_, done), result in zip(batch, results, strict=True):
                _settle(done, result)

    async def close(self) -> None:
        """Wait until what was handed in is committed (or has failed)."""
        if self._worker is not None:
            with contextlib.suppress(Exception):
                await self._worker


def _settle(done: asyncio.Future[R], outcome: R | Exception) -> None:
    if done.done():
        return
    if isinstance(outcome, Exception):
        done.set_exception(outcome)
    else:
        done.set_result(outcome)


def _retrieve(done: asyncio.Future[R]) -> None:
    if not done.cancelled():
        done.exception()
