"""Background asyncio tasks: one at a time per key (``Flights``), and stopping them
(``cancel_and_wait``, ``cancel_all_and_wait``).

``Flights`` is the single flight of the chat:start loader (one memory query for all
identical questions) and of the sqlite backend's project loads, and it keeps the loader's
cache fills; each part's close stops its background task with ``cancel_and_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine, Hashable, Iterable
from typing import Any, Final, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
CANCEL_EVERY_S: Final = 0.25  # how often a task being stopped is cancelled again


class Flights(Generic[K, T]):
    """Background tasks by key, each forgotten once it is done: ``join`` gives the one
    running for a key, started if there is none (single flight), ``start`` a new one in
    its place. ``ended(key, task)`` is told of each task that ends while it is still the
    one of its key. No task's exception is left unretrieved: whoever awaits it gets it."""

    def __init__(self, ended: Callable[[K, asyncio.Task[T]], None] | None = None) -> None:
        self._tasks: dict[K, asyncio.Task[T]] = {}
        self._ended = ended

    def get(self, key: K) -> asyncio.Task[T] | None:
        """The task running for ``key``, if any."""
        return self._tasks.get(key)

    def join(
        self, key: K, start: Callable[[], Coroutine[Any, Any, T]], *, name: str | None = None
    ) -> asyncio.Task[T]:
        """The task running for ``key``; if there is none, one running ``start()``."""
        task = self._tasks.get(key)
        return task if task is not None else self.start(key, start(), name=name)

    def start(
        self, key: K, work: Coroutine[Any, Any, T], *, name: str | None = None
    ) -> asyncio.Task[T]:
        """A task running ``work``, now the one of ``key`` (one before it runs on)."""
        task = asyncio.create_task(work, name=name)
        self._tasks[key] = task
        task.add_done_callback(functools.partial(self._done, key))
        return task

    async def wait(self) -> None:
        """Wait until every task running now has ended."""
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    def _done(self, key: K, task: asyncio.Task[T]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: asyncio would log it as never retrieved
        if self._tasks.get(key) is task:
            del self._tasks[key]
            if self._ended is not None:
                self._ended(key, task)


async def cancel_and_wait(task: asyncio.Task[Any] | None, timeout: float | None = None) -> None:
    """Cancel a background task (if any) and wait until it has ended, at most ``timeout``
    seconds when given; its other exceptions are raised."""
    if task is None:
        return
    await cancel_all_and_wait([task], timeout)
    if task.done() and not task.cancelled():
        with contextlib.suppress(TimeoutError):
            task.result()


async def cancel_all_and_wait(
    tasks: Iterable[asyncio.Task[Any]], timeout: float | None = None
) -> set[asyncio.Task[Any]]:
    """Cancel tasks and wait until they have ended, at most ``timeout`` seconds when
    given; the tasks still running then.

    A task is cancelled again every ``CANCEL_EVERY_S`` until it ends: a library may take
    one cancellation for its own (anyio's cancel scopes, under httpx, can turn it into a
    timeout of theirs and retry), and a task cancelled once would then run on. No ended
    task's exception is left unretrieved.
    """
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while pending:
        wait = CANCEL_EVERY_S if deadline is None else min(CANCEL_EVERY_S, deadline - loop.time())
        if wait <= 0:
            break
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=wait)
        for task in done:
            if not task.cancelled():
                task.exception()
    return pending
