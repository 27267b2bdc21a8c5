"""No acknowledged episode is lost: the durable outbox between the handlers and memory.

An episode is acknowledged only once it is durable somewhere. Normally that is the memory
backend itself. When the backend fails or is slower than ``store_timeout``, the episode is
appended to the outbox instead (SQLite, WAL, ``synchronous=FULL``: it survives SIGKILL)
and acknowledged as queued; a background worker then delivers the outbox to the backend in
append order, retrying on a backoff schedule, and deletes each episode once stored. While
anything waits in the outbox, new episodes queue behind it, so delivery keeps their order.

``on_delivered`` runs after each late delivery, so the cache can drop contexts computed
while the episode was not yet in memory.

Delivery is at least once and the backends' stores are idempotent on the episode uuid, so
each episode is stored exactly once even when a timed-out store completes after all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import msgspec
from redis.backoff import AbstractBackoff, ExponentialWithJitterBackoff

from bridge.episode import Episode
from bridge.errors import BridgeError, MemoryUnavailable
from bridge.memory.base import MemoryBackend

log = logging.getLogger(__name__)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, episode BLOB NOT NULL)
"""
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Episode).decode


class Outbox:
    """An append-only, durable queue of episodes on one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending = 0
        self._db: sqlite3.Connection | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="outbox")

    async def _run(self, fn: object, *args: object) -> object:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, fn, *args)  # type: ignore[arg-type]

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute(_SCHEMA)
        self.pending = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        self._db = db

    async def open(self) -> None:
        """Open (or create) the outbox file; ``pending`` tells what a crash left in it."""
        await self._run(self._open)

    def _append(self, blob: bytes) -> None:
        assert self._db is not None
        self._db.execute("INSERT INTO outbox (episode) VALUES (?)", (blob,))
        self.pending += 1

    async def append(self, episode: Episode) -> None:
        """Add an episode at the tail; durable when this returns."""
        try:
            await self._run(self._append, _encode(episode))
        except sqlite3.Error as e:
            raise MemoryUnavailable(f"cannot queue the episode in the outbox: {e}") from e

    def _head(self, limit: int) -> list[tuple[int, Episode]]:
        assert self._db is not None
        rows = self._db.execute("SELECT seq, episode FROM outbox ORDER BY seq LIMIT ?", (limit,))
        return [(seq, _decode(blob)) for seq, blob in rows]

    async def head(self, limit: int) -> list[tuple[int, Episode]]:
        """The oldest ``limit`` episodes with their sequence numbers."""
        return await self._run(self._head, limit)  # type: ignore[return-value]

    def _remove(self, seq: int) -> None:
        assert self._db is not None
        self.pending -= self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount

    async def remove(self, seq: int) -> None:
        """Forget a delivered episode."""
        await self._run(self._remove, seq)

    async def close(self) -> None:
        """Close the file. Idempotent."""
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._thread.shutdown(wait=True)


class Delivery:
    """Stores episodes into memory, through the outbox whenever memory cannot take them."""

    def __init__(
        self,
        memory: MemoryBackend,
        outbox: Outbox,
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
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        """Open the outbox and deliver whatever a previous run left in it."""
        await self.outbox.open()
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
                log.warning("memory did not take episode %s, queuing it: %s", episode.uuid, e)
        await self.outbox.append(episode)
        self._kick()
        return True

    def _kick(self) -> None:
        if self._worker is None or self._worker.done():
            self._idle.clear()
            self._worker = asyncio.create_task(self._deliver(), name="outbox-delivery")

    async def _deliver(self) -> None:
        failures = 0
        try:
            while batch := await self.outbox.head(64):
                for seq, episode in batch:
                    while True:
                        try:
                            await asyncio.wait_for(self.memory.store(episode), self.store_timeout)
                            break
                        except (BridgeError, TimeoutError) as e:
                            failures += 1
                            delay = self._backoff.compute(failures)
                            log.debug("outbox delivery failed (%s); retry in %.2f s", e, delay)
                            await asyncio.sleep(delay)
                    failures = 0
                    await self.outbox.remove(seq)
                    if self.on_delivered is not None:
                        await self.on_delivered(episode)
            log.info("outbox delivered; memory has every acknowledged episode")
        finally:
            self._idle.set()

    async def flush(self, deadline: float) -> bool:
        """Wait up to ``deadline`` s for the outbox to drain; True if it did."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), deadline)
        return self.outbox.pending == 0

    async def close(self) -> None:
        """Stop delivering (what is left stays on disk for the next start) and close."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        await self.outbox.close()
