"""One retry policy for the bridge's background loops: the outbox's delivery to memory,
the reconnection of a Valkey invalidation stream, graphiti's ingestion of queued episodes.

A ``Retry`` is configuration: which failures are worth another try (anything else is a
bug or a refusal that trying again cannot mend, and goes up at once), how long to wait
between tries (a redis-py backoff strategy, e.g. exponential with jitter), and how many
tries at most (None: until it works, or until the caller stops it). Each run of tries is
a ``Tries``, which knows the current outage: its first failure is logged as a warning,
the ones after it at debug level, and its end as one line saying how many tries failed.

The sleep between tries is a parameter, so the policy can be tested without waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.backoff import AbstractBackoff

from bridge.errors import describe

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


class Retry:
    """What to retry, how long to wait between tries, and how many tries at most."""

    def __init__(
        self,
        *,
        retry_on: tuple[type[BaseException], ...],
        backoff: AbstractBackoff,
        logger: logging.Logger,
        attempts: int | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if attempts is not None and attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.retry_on = retry_on
        self.backoff = backoff
        self.attempts = attempts
        self.logger = logger
        self.sleep = sleep

    def tries(self, what: str) -> Tries:
        """A fresh run of tries at ``what`` (named so in the log lines)."""
        return Tries(self, what)

    async def call(
        self,
        attempt: Callable[[], Awaitable[T]],
        what: str,
        *,
        stop: Callable[[], bool] | None = None,
    ) -> T:
        """Await ``attempt()`` until it returns, waiting on the backoff after each failure
        that ``retry_on`` names. The last failure is raised when it is not retryable, when
        ``attempts`` tries have failed, or when ``stop()`` is true after a failure."""
        tries = self.tries(what)
        while True:
            try:
                result = await attempt()
            except self.retry_on as e:
                wait = tries.failed(e)
                if wait is None or (stop is not None and stop()):
                    raise
                await self.sleep(wait)
                continue
            tries.succeeded()
            return result


class Tries:
    """The failures of one thing since it last worked, and the log lines of that outage."""

    def __init__(self, policy: Retry, what: str) -> None:
        self.policy = policy
        self.what = what
        self.failures = 0
        self.error: str | None = None  # the last failure, while the outage lasts

    def failed(self, error: BaseException) -> float | None:
        """Count a failure; the seconds to wait before the next try, or None when the
        policy's attempts are used up."""
        self.failures += 1
        self.error = describe(error)
        attempts = self.policy.attempts
        level = logging.WARNING if self.failures == 1 else logging.DEBUG
        if attempts is not None and self.failures >= attempts:
            self.policy.logger.warning(
                "%s failed %d times, giving up: %s", self.what, self.failures, self.error
            )
            return None
        self.policy.logger.log(level, "%s failed: %s", self.what, self.error)
        if self.failures == 1:
            self.policy.backoff.reset()  # type: ignore[no-untyped-call]
        return self.policy.backoff.compute(self.failures)

    def succeeded(self) -> None:
        """It works (again): the outage, if there was one, is over."""
        if self.failures:
            self.policy.logger.info(
                "%s works again after %d failed tries", self.what, self.failures
            )
        self.failures = 0
        self.error = None
