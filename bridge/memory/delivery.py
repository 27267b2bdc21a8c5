"""Storing episodes into memory, through the outbox whenever memory cannot take them.

An episode is acknowledged only once it is durable somewhere. Normally that is the memory
backend itself. When the backend fails for a while (``RETRYABLE``: it is unavailable or
overloaded) or is slower than ``store_timeout``, the episode is appended to the outbox
instead (a ``bridge.memory.durable.EpisodeQueue``: it survives SIGKILL, see
``bridge.memory.outbox``) and acknowledged as queued; a background worker then delivers
the outbox to the backend in append order, retrying on a backoff schedule
(``bridge.retry``), and deletes each episode once stored. While anything waits in the
outbox, new episodes queue behind it, so delivery keeps their order. A refusal that trying
again cannot mend (a ``BadRequest``) is the client's answer, never queued.

``on_delivered`` runs after each late delivery, so the cache can drop contexts computed
while the episode was not yet in memory.

Delivery is at least once and the backends' stores are idempotent on the episode uuid, so
each episode is stored exactly once even when a timed-out store completes after all.

Every log line about a failure names the exception's type as well as its message: a
timeout's message is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Final

from redis.backoff import AbstractBackoff, ExponentialWithJitterBackoff

from bridge.background import cancel_all_and_wait
from bridge.episode import Episode
from bridge.errors import BridgeError, MemoryUnavailable, Overloaded, describe
from bridge.memory.base import MemoryBackend
from bridge.memory.durable import EpisodeQueue
from bridge.memory.queue_files import take_over
from bridge.retry import Retry

log = logging.getLogger(__name__)

# What makes an episode wait in the outbox rather than fail: memory is down, overloaded
# or slower than the store timeout; it may take the episode later.
RETRYABLE = (MemoryUnavailable, Overloaded, TimeoutError)
STORE_TIMEOUT: Final = 2.0  # seconds an episode waits for memory before the outbox


class Delivery:
    """Stores episodes into memory, through the outbox whenever memory cannot take them."""

    def __init__(
        self,
        memory: MemoryBackend,
        outbox: EpisodeQueue,
        *,
        store_timeout: float = STORE_TIMEOUT,
        backoff: AbstractBackoff | None = None,
    ) -> None:
        self.memory = memory
        self.outbox = outbox
        self.store_timeout = store_timeout
        self.retry = Retry(
            retry_on=RETRYABLE,
            backoff=backoff or ExponentialWithJitterBackoff(cap=10.0, base=0.1),
            logger=log,
        )
        self._worker: asyncio.Task[None] | None = None
        self.on_delivered: Callable[[Episode], Awaitable[None]] | None = None
        self._closing = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self, adopt: Sequence[Path] = ()) -> None:
        """Open the outbox, move into it the episodes of the outbox files in ``adopt``
        (see ``bridge.memory.outbox.orphaned_outboxes``), and deliver whatever a previous run
        left."""
        await self.outbox.open()
        for path in adopt:
            await take_over(path, self.outbox)
        if self.outbox.pending:
            log.warning("%d acknowledged episodes wait in the outbox", self.outbox.pending)
            self._kick()

    async def store(self, episode: Episode) -> bool:
        """Make an episode durable; True if it was queued in the outbox (not yet in memory).
        Raises what memory refused it with when trying again cannot help."""
        if not self.outbox.pending:
            try:
                await self._store(episode)
                return False
            except RETRYABLE as e:
                log.warning(
                    "memory did not take episode %s, queuing it: %s", episode.uuid, describe(e)
                )
        await self.outbox.append(episode)
        self._kick()
        return True

    async def _store(self, episode: Episode) -> None:
        await asyncio.wait_for(self.memory.store(episode), self.store_timeout)

    def _kick(self) -> None:
        if self._worker is None or self._worker.done():
            self._idle.clear()
            self._worker = asyncio.create_task(self._deliver(), name="outbox-delivery")

    async def _deliver(self) -> None:
        try:
            await self._deliver_all()
        except BridgeError as e:  # the outbox file failed, or memory refuses an episode
            log.error(
                "outbox delivery stopped (%d episodes stay in the outbox until the next "
                "episode or start): %s",
                self.outbox.pending,
                describe(e),
            )
        except Exception as e:  # a bug: say where, rather than lose it with the task
            log.error("outbox delivery stopped: %s", describe(e), exc_info=True)
        finally:
            self._idle.set()

    async def _deliver_all(self) -> None:
        """Deliver the outbox in order until it is empty or the delivery is closing."""
        closing = self._closing.is_set
        while not closing() and (batch := await self.outbox.head(64)):
            for episode in batch:
                what = f"outbox delivery of {episode.uuid}"
                try:
                    await self.retry.call(partial(self._store, episode), what, stop=closing)
                except RETRYABLE:
                    return  # closing: it stays in the outbox for the next start
                await self.outbox.remove(episode.uuid)
                if self.on_delivered is not None:
                    await self.on_delivered(episode)
        if not closing():
            log.info("outbox delivered; memory has every acknowledged episode")

    async def flush(self, deadline: float) -> bool:
        """Wait up to ``deadline`` s for the outbox to drain; True if it did."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), deadline)
        return self.outbox.pending == 0

    async def close(self) -> None:
        """Stop delivering (what is left stays on disk for the next start) and close."""
        self._closing.set()
        if self._worker is not None:
            # Bounded: a worker that loses its cancellation (inside wait_for on Python
            # 3.11) is cancelled again, and ends at its next check of _closing anyway.
            await cancel_all_and_wait([self._worker], self.store_timeout + 5.0)
        await self.outbox.close()
