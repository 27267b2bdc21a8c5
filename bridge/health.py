"""Readiness checks that belong to no single part: can the data folder take writes?

An episode is acknowledged only once it is durable, in memory or in the outbox, both under
the data folder; a full disk turns every event into an error. Readiness says so first.
"""

from __future__ import annotations

import shutil
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
