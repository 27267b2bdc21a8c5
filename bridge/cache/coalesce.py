"""Group commit for asyncio: requests that arrive while one is running share the next.

Many concurrent callers each asking for the same kind of work (here: invalidate the cached
contexts naming a path) need not each make a round trip. :class:`Coalescer` runs at most
one batch per key at a time; requests that arrive meanwhile join the next batch, which
starts when the running one ends. Every request is served by a batch that started after
it was made, so a caller that waits for its request sees exactly what a call of its own
would have given it (read-your-writes holds), and all callers of one batch share its
result or its exception.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T", bound=Hashable)
R = TypeVar("R")


class _Batch(Generic[T, R]):
    def __init__(self) -> None:
        self.items: set[T] = set()
        self.done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        # A batch whose callers were all cancelled must not log "never retrieved".
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())


class Coalescer(Generic[K, T, R]):
    """Runs ``flush(key, items)`` for batches of items submitted under the same key."""

    def __init__(self, flush: Callable[[K, set[T]], Awaitable[R]]) -> None:
        self._flush = flush
        self._next: dict[K, _Batch[T, R]] = {}  # not started yet: open to new items
        self._running: dict[K, asyncio.Task[None]] = {}

    async def submit(self, key: K, item: T) -> R:
        """Add ``item`` to the next batch of ``key`` and wait for that batch's result."""
        batch = self._next.get(key)
        if batch is None:
            batch = self._next[key] = _Batch()
            asyncio.get_running_loop().create_task(self._run(key, batch))
        batch.items.add(item)
        return await asyncio.shield(batch.done)

    async def _run(self, key: K, batch: _Batch[T, R]) -> None:
        previous = self._running.get(key)
        this = asyncio.current_task()
        assert this is not None
        self._running[key] = this
        try:
            if previous is not None:
                with contextlib.suppress(BaseException):
                    await previous
            del self._next[key]  # from here on, new items wait for the next batch
            try:
                result = await self._flush(key, batch.items)
            except asyncio.CancelledError:
                batch.done.cancel()
                raise
            except Exception as e:
                batch.done.set_exception(e)
            else:
                batch.done.set_result(result)
        finally:
            if self._running.get(key) is this:
                del self._running[key]

    async def drain(self) -> None:
        """Wait for every batch submitted so far."""
        while self._running:
            await asyncio.wait(list(self._running.values()))
