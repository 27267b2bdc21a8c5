"""The data folder, and the lock that lets one bridge process at a time use it.

Everything a bridge keeps on disk lives under ``--data-dir``: the embedded store, the
outbox, graphiti's queue and the private FalkorDB. Two processes using them at once would
interleave their writes (and race to create the tables on a first start), so ``serve``,
``export`` and ``import`` hold an exclusive ``flock`` on ``bridge.lock`` inside the folder
for as long as they run. The kernel drops the lock when the process ends, however it
ends, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from bridge.config import StartupError

LOCK_NAME = "bridge.lock"


class DataDirBusy(StartupError):
    """Another process holds the data folder's lock."""


class DataDirLock:
    """An exclusive hold on a data folder (created if missing), as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Create the folder if needed and take its lock, or raise StartupError saying why
        not (DataDirBusy when another bridge holds it). Never waits."""
        if self._fd is not None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except FileExistsError as e:
            raise StartupError(f"the data folder {self.path} exists and is not a folder") from e
        except OSError as e:
            raise StartupError(f"cannot use the data folder {self.path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise DataDirBusy(
                f"another bridge{pid} holds the data folder {self.path}; stop it first or "
                "give this one another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Let the folder go. Idempotent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.ftruncate(fd, 0)
            os.close(fd)  # closing the only descriptor drops the flock

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
