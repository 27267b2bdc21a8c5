"""A clock that moves only when a test says so, for objects that take an injected clock."""

from __future__ import annotations


class ManualClock:
    """Seconds, as ``time.monotonic`` gives them, standing still until ``advance``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the time on by ``seconds``."""
        self.now += seconds
