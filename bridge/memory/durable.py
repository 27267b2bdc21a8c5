"""A durable, ordered queue of episodes on one SQLite file.

Both the bridge's outbox and the graphiti backend's ingest queue are this: episodes that
were acknowledged and must survive SIGKILL until something has taken them. An append is
fsynced (WAL, ``synchronous=FULL``) before it returns; an episode whose uuid is already
queued is not queued twice. All SQLite work runs on one thread of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec

from bridge.episode import Episode
from bridge.errors import MemoryUnavailable, describe

T = TypeVar("T")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL UNIQUE,
    episode BLOB NOT NULL
)
"""
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Episode).decode


class EpisodeQueue:
    """Episodes in the order they were appended, kept on disk until removed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending = 0
        self._db: sqlite3.Connection | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="queue")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        except (sqlite3.Error, RuntimeError) as e:  # RuntimeError: the queue was closed
            raise MemoryUnavailable(f"episode queue {self.path.name}: {describe(e)}") from e

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute(_SCHEMA)
        self.pending = db.execute("SELECT count(*) FROM queue").fetchone()[0]
        self._db = db

    async def open(self) -> None:
        """Open (or create) the file; ``pending`` tells what a previous run left in it."""
        await self._run(self._open)

    def _append(self, uuid: str, blob: bytes) -> None:
        assert self._db is not None
        self.pending += self._db.execute(
            "INSERT INTO queue (uuid, episode) VALUES (?, ?) ON CONFLICT (uuid) DO NOTHING",
            (uuid, blob),
        ).rowcount

    async def append(self, episode: Episode) -> None:
        """Add an episode at the tail (unless its uuid is queued); durable on return."""
        await self._run(self._append, episode.uuid, _encode(episode))

    def _head(self, limit: int) -> list[Episode]:
        assert self._db is not None
        rows = self._db.execute("SELECT episode FROM queue ORDER BY seq LIMIT ?", (limit,))
        return [_decode(blob) for (blob,) in rows]

    async def head(self, limit: int = 1_000_000) -> list[Episode]:
        """The oldest ``limit`` episodes, oldest first."""
        return await self._run(self._head, limit)

    def _remove(self, uuid: str) -> None:
        assert self._db is not None
        self.pending -= self._db.execute("DELETE FROM queue WHERE uuid = ?", (uuid,)).rowcount

    async def remove(self, uuid: str) -> None:
        """Forget an episode once it has been taken."""
        await self._run(self._remove, uuid)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def close(self) -> None:
        """Close the file. Idempotent."""
        if self._db is not None:
            await self._run(self._close)
        self._thread.shutdown(wait=True)
