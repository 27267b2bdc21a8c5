"""One deadline shared by the steps of a shutdown.

Each step gets what is left of the deadline, not a deadline of its own, so a stuck step
shortens the ones after it instead of adding to the total. A step still running when the
deadline passes is cancelled. Steps that only let go of resources (close connections, a
database client, stop a child process) may go on for ``GRACE`` seconds past it, all of
them together, so that each at least begins: the whole shutdown ends by the deadline
plus ``GRACE`` (plus, for each closing step, the moment a step that does not wait needs,
and the moment a cancelled step takes to unwind).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from bridge.background import cancel_all_and_wait

log = logging.getLogger(__name__)

GRACE = 0.5  # seconds past the deadline that the closing steps share
# Seconds a closing step gets however late it comes: enough for one that does not wait
# (flush a UDP buffer, close sockets) to finish, too little to add up.
CLOSING_FLOOR = 0.02
CANCEL_WAIT = 0.1  # seconds a cancelled step is given to unwind before it is left behind


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
        return self._left(0.0)

    def closing_remaining(self) -> float:
        """Seconds left to a closing step: to the deadline plus ``GRACE``."""
        return self._left(GRACE)

    @property
    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.remaining() == 0.0

    def _left(self, extra: float) -> float:
        if self._end is None:
            return self.seconds + extra
        return max(0.0, self._end + extra - self._clock())

    async def run(self, step: Awaitable[object], what: str, *, closing: bool = False) -> bool:
        """Await ``step`` for what is left of the deadline (``closing``: of the deadline
        plus ``GRACE``, and at least ``CLOSING_FLOOR``); past that, cancel it, log it as
        cut short and return False. Its exceptions are raised."""
        task = asyncio.ensure_future(step)
        left = max(self.closing_remaining(), CLOSING_FLOOR) if closing else self.remaining()
        try:
            done, _ = await asyncio.wait([task], timeout=left)
        except asyncio.CancelledError:  # whoever waits for the shutdown gave up on it
            task.cancel()
            raise
        if done:
            task.result()
            return True
        await cancel_all_and_wait([task], CANCEL_WAIT)  # one that ignores it is left
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.debug("%s failed while cancelled: %r", what, task.exception())
        self.cut.append(what)
        log.warning("shutdown deadline (%.1f s) passed: %s cut short", self.seconds, what)
        return False
