"""No acknowledged episode is lost: the durable outbox between the handlers and memory.

An episode is acknowledged only once it is durable somewhere. Normally that is the memory
backend itself. When the backend fails or is slower than ``store_timeout``, the episode is
appended to the outbox instead (a ``bridge.durable.EpisodeQueue``: it survives SIGKILL)
and acknowledged as queued; a background worker then delivers the outbox to the backend in
append order, retrying on a backoff schedule, and deletes each episode once stored. While
anything waits in the outbox, new episodes queue behind it, so delivery keeps their order.

``on_delivered`` runs after each late delivery, so the cache can drop contexts computed
while the episode was not yet in memory.

Delivery is at least once and the backends' stores are idempotent on the episode uuid, so
each episode is stored exactly once even when a timed-out store completes after all.

Each process has an outbox file of its own: ``outbox.sqlite3`` for a bridge that runs
alone, ``outbox-<k>.sqlite3`` for worker k of ``serve --workers N``, so a restarted worker
takes over its own. Files no running process keeps are taken over at start
(``bridge.queue_files``): their episodes move into this process's outbox.

Every log line about a failure names the exception's type as well as its message: a
timeout's message is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from redis.backoff import AbstractBackoff, ExponentialWithJitterBackoff

from bridge.durable import EpisodeQueue, describe
from bridge.episode import Episode
from bridge.errors import BridgeError
from bridge.memory.base import MemoryBackend
from bridge.queue_files import orphaned, take_over

log = logging.getLogger(__name__)

OUTBOX = "outbox"  # the stem of the outbox files (see bridge.queue_files)


def orphaned_outboxes(data_dir: Path, worker: int, workers: int) -> list[Path]:
    """The outbox files that worker ``worker`` of ``workers`` (0: a bridge alone) takes
    over (see ``bridge.queue_files.orphaned``)."""
    return orphaned(data_dir, OUTBOX, worker, workers)


class Delivery:
    """Stores episodes into memory, through the outbox whenever memory cannot take them."""

    def __init__(
        self,
        memory: MemoryBackend,
        outbox: EpisodeQueue,
        *,
        store_timeout: float = 2.0,
        backoff: AbstractBackoff | None = None,
    ) -> None:
        self.memory = memory
        self.outbox = outbox
        self.store_timeout = store_timeout
        self._backoff = backoff or ExponentialWithJitterBackoff(cap=10.0, base=0.1)
        self._worker: asyncio.Task[None] | None = None
        self.on_delivered: Callable[[Episode], Awaitable[None]] | None = None
        self._closing = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self, adopt: Sequence[Path] = ()) -> None:
        """Open the outbox, move into it the episodes of the outbox files in ``adopt``
        (see ``orphaned_outboxes``), and deliver whatever a previous run left."""
        await self.outbox.open()
        for path in adopt:
            await take_over(path, self.outbox)
        if self.outbox.pending:
            log.warning("%d acknowledged episodes wait in the outbox", self.outbox.pending)
            self._kick()

    async def store(self, episode: Episode) -> bool:
        """Make an episode durable; True if it was queued in the outbox (not yet in memory)."""
        if not self.outbox.pending:
            try:
                await asyncio.wait_for(self.memory.store(episode), self.store_timeout)
                return False
            except (BridgeError, TimeoutError) as e:
                log.warning(
                    "memory did not take episode %s, queuing it: %s", episode.uuid, describe(e)
                )
        await self.outbox.append(episode)
        self._kick()
        return True

    def _kick(self) -> None:
        if self._worker is None or self._worker.done():
            self._idle.clear()
            self._worker = asyncio.create_task(self._deliver(), name="outbox-delivery")

    async def _deliver(self) -> None:
        try:
            await self._deliver_all()
        except BridgeError as e:  # the outbox file failed; the next store starts over
            log.warning("outbox delivery stopped: %s", describe(e))
        except Exception as e:  # a bug: say where, rather than lose it with the task
            log.warning("outbox delivery stopped: %s", describe(e), exc_info=True)
        finally:
            self._idle.set()

    async def _deliver_all(self) -> None:
        """Deliver the outbox in order until it is empty or the delivery is closing."""
        failures = 0
        while not self._closing.is_set() and (batch := await self.outbox.head(64)):
            for episode in batch:
                while not await self._deliver_one(episode):
                    if self._closing.is_set():
                        return
                    failures += 1
                    await asyncio.sleep(self._backoff.compute(failures))
                failures = 0
                await self.outbox.remove(episode.uuid)
                if self.on_delivered is not None:
                    await self.on_delivered(episode)
        if not self._closing.is_set():
            log.info("outbox delivered; memory has every acknowledged episode")

    async def _deliver_one(self, episode: Episode) -> bool:
        """One attempt to store an outbox episode in memory."""
        try:
            await asyncio.wait_for(self.memory.store(episode), self.store_timeout)
        except (BridgeError, TimeoutError) as e:
            log.debug("outbox delivery of %s failed: %s", episode.uuid, describe(e))
            return False
        return True

    async def flush(self, deadline: float) -> bool:
        """Wait up to ``deadline`` s for the outbox to drain; True if it did."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), deadline)
        return self.outbox.pending == 0

    async def close(self) -> None:
        """Stop delivering (what is left stays on disk for the next start) and close."""
        self._closing.set()
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
            # Bounded: a cancellation lost inside wait_for (Python 3.11) still ends the
            # worker at its next check of _closing.
            await asyncio.wait([self._worker], timeout=self.store_timeout + 5.0)
        await self.outbox.close()
