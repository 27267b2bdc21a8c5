"""Readiness: what ``GET /readyz`` answers, and the check of the data folder.

An episode is acknowledged only once it is durable, in memory or in the outbox, both under
the data folder; a full disk turns every event into an error, and so does a memory that
cannot search. Those make the bridge unready: 503, one line per problem. A cache that does
not work (Valkey unreachable, a cluster down, a local copy that is not sure it follows
every primary) does not: the bridge still answers every message, from memory, so it stays
ready (200) and says ``cache: degraded`` with the reason on the lines after ``ready``. A
load balancer keeps sending it traffic; a person or a monitor reads the body.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Final

# Free space below this makes the bridge unready: an outbox write, a SQLite WAL checkpoint
# and the graphiti queue all need room before they can report a full disk themselves.
MIN_FREE_BYTES: Final = 16 << 20
_PROBE: Final = ".readyz-probe"
_PROBE_BYTES: Final = 4096


def data_dir_problem(path: Path, min_free: int = MIN_FREE_BYTES) -> str | None:
    """Why ``path`` cannot take writes right now (low space, or a write fails), or None.

    Blocking: call it from a thread.
    """
    try:
        free = shutil.disk_usage(path).free
    except OSError as e:
        return f"{path}: {e.strerror or e}"
    if free < min_free:
        return f"{path}: {free // 1024} KiB free, below {min_free // (1 << 20)} MiB"
    probe = path / _PROBE
    try:  # no fsync: a full disk refuses the write itself, and /readyz needs no token
        with probe.open("wb") as f:
            f.write(b"\0" * _PROBE_BYTES)
    except OSError as e:
        return f"{path}: cannot write ({e.strerror or e})"
    finally:
        probe.unlink(missing_ok=True)
    return None


@dataclass
class ReadinessReport:
    """What keeps the bridge from serving (``problems``) or from serving fully
    (``degraded``: each a line saying what works less well and why)."""

    problems: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)

    @property
    def status(self) -> HTTPStatus:
        """503 while anything keeps the bridge from serving, else 200."""
        return HTTPStatus.SERVICE_UNAVAILABLE if self.problems else HTTPStatus.OK

    def body(self) -> str:
        """The problems, one a line; or ``ready`` and then what is degraded, one a line."""
        if self.problems:
            return "\n".join(self.problems)
        return "".join(f"{line}\n" for line in ["ready", *self.degraded])
