"""The outbox files: where acknowledged episodes wait while memory cannot take them.

No acknowledged episode is lost: ``bridge.memory.delivery`` appends an episode that memory did not
take in time to the outbox (a ``bridge.memory.durable.EpisodeQueue``, durable before the
acknowledgement and through SIGKILL) and delivers it later, in order.

Each process has an outbox file of its own: ``outbox.sqlite3`` for a bridge that runs
alone, ``outbox-<k>.sqlite3`` for worker k of ``serve --workers N``, so a restarted worker
takes over its own. Files no running process keeps are taken over at start
(``bridge.memory.queue_files``): their episodes move into this process's outbox.
"""

from __future__ import annotations

from pathlib import Path

from bridge.memory.queue_files import orphaned

OUTBOX = "outbox"  # the stem of the outbox files (see bridge.memory.queue_files)


def orphaned_outboxes(data_dir: Path, worker: int, workers: int) -> list[Path]:
    """The outbox files that worker ``worker`` of ``workers`` (0: a bridge alone) takes
    over (see ``bridge.memory.queue_files.orphaned``)."""
    return orphaned(data_dir, OUTBOX, worker, workers)
