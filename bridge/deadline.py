"""One deadline shared by the steps of a shutdown.

Each step gets what is left of the deadline, not a deadline of its own, so a stuck step
shortens the ones after it instead of adding to the total. A step still running when the
deadline passes is cancelled. Steps that only let go of resources (close a connection,
stop a child process) get ``grace`` seconds even after the deadline, so that they at
least begin; the total overrun is bounded by the number of such steps times ``grace``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

GRACE = 0.25  # seconds a closing step gets once the deadline has passed


class Deadline:
    """``seconds`` on ``clock``, counted from ``start`` (a shutdown's owner makes its
    deadline up front, and starts it when the shutdown begins)."""

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._end: float | None = None
        self.cut: list[str] = []  # the steps cancelled at the deadline, in order

    def start(self) -> Deadline:
        """Start counting down (a second call changes nothing); the deadline itself."""
        if self._end is None:
            self._end = self._clock() + self.seconds
        return self

    @property
    def started(self) -> bool:
        """True once ``start`` ran."""
        return self._end is not None

    def remaining(self) -> float:
        """Seconds left: all of them before ``start``, 0 once the deadline has passed."""
        if self._end is None:
            return self.seconds
        return max(0.0, self._end - self._clock())

    @property
    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.remaining() == 0.0

    async def run(self, step: Awaitable[object], what: str, *, grace: float = 0.0) -> bool:
        """Await ``step`` for what is left of the deadline (at least ``grace`` seconds);
        past that, cancel it, log it as cut short and return False. Its exceptions are
        raised."""
        task = asyncio.ensure_future(step)
        try:
            done, _ = await asyncio.wait([task], timeout=max(self.remaining(), grace))
        except asyncio.CancelledError:  # whoever waits for the shutdown gave up on it
            task.cancel()
            raise
        if done:
            task.result()
            return True
        task.cancel()
        # A step that ignores its cancellation is not waited for beyond this.
        await asyncio.wait([task], timeout=GRACE)
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.debug("%s failed while cancelled: %r", what, task.exception())
        self.cut.append(what)
        log.warning("shutdown deadline (%.1f s) passed: %s cut short", self.seconds, what)
        return False
