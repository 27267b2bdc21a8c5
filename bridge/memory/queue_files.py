"""Which process keeps which durable queue file of a data folder, and taking files over.

A bridge keeps acknowledged episodes that memory has not taken yet in queue files
(``bridge.memory.durable.EpisodeQueue``) under its data folder: the outbox, and graphiti's
ingest queue. A bridge alone keeps ``<stem>.sqlite3``; worker K of ``serve --workers N``
keeps ``<stem>-<K>.sqlite3``, so a worker started again finds its own. A file that no
process of the current run keeps (left by a run with more workers, or by a bridge alone
before a run with workers, or the other way round) is taken over at start by exactly
one process (:func:`orphaned`), which moves its episodes into its own file.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from bridge.memory.durable import EpisodeQueue

log = logging.getLogger(__name__)


def queue_path(data_dir: Path, stem: str, worker: int) -> Path:
    """The queue file ``stem`` of worker ``worker`` (0: a bridge alone)."""
    return data_dir / (f"{stem}-{worker}.sqlite3" if worker else f"{stem}.sqlite3")


def orphaned(data_dir: Path, stem: str, worker: int, workers: int) -> list[Path]:
    """The ``stem`` queue files in ``data_dir`` that worker ``worker`` of ``workers`` (0:
    a bridge alone) takes over, each by exactly one process: a bridge alone takes every
    worker's; worker 1 takes the lone bridge's, and worker K those of workers past
    ``workers`` whose number is K modulo ``workers``."""
    numbered = re.compile(re.escape(stem) + r"-([1-9][0-9]*)\.sqlite3")
    found = []
    for path in sorted(data_dir.glob(f"{stem}*.sqlite3")):
        if path.name == f"{stem}.sqlite3":
            if worker == 1:
                found.append(path)
        elif (match := numbered.fullmatch(path.name)) is not None:
            number = int(match.group(1))
            if worker == 0 or (number > workers and (number - 1) % workers == worker - 1):
                found.append(path)
    return found


async def take_over(path: Path, queue: EpisodeQueue) -> int:
    """Move every episode of the queue file at ``path`` into ``queue`` (open), in order,
    then remove the file; how many moved. Each is appended, durably, before it is removed
    there, so a crash meanwhile loses none, and appending is idempotent, so the next start
    finishes the move."""
    other = EpisodeQueue(path)
    await other.open()
    moved = 0
    try:
        while batch := await other.head(256):
            for episode in batch:
                await queue.append(episode)
            for episode in batch:
                await other.remove(episode.uuid)
            moved += len(batch)
    finally:
        await other.close()
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    if moved:
        log.warning("took over %d acknowledged episodes from %s", moved, path.name)
    return moved
