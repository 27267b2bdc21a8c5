"""The retry policy of the background loops (bridge.retry), with a sleep that records the
waits instead of waiting."""

from __future__ import annotations

import logging

import pytest
from redis.backoff import ExponentialBackoff

from bridge.errors import BadRequest, MemoryUnavailable
from bridge.retry import Retry

log = logging.getLogger("tests.retry")


class Flaky:
    """An attempt that fails with the given errors, one per call, then returns ``done``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


class Waits:
    """A sleep that only records how long it was asked to wait."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


def policy(waits: Waits, attempts: int | None = None) -> Retry:
    return Retry(
        retry_on=(MemoryUnavailable, TimeoutError),
        backoff=ExponentialBackoff(cap=1.0, base=0.1),  # no jitter: the waits are known
        logger=log,
        attempts=attempts,
        sleep=waits,
    )


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == log.name]


async def test_retryable_failures_are_retried_on_the_backoff_until_it_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=log.name)
    waits = Waits()
    attempt = Flaky(*(MemoryUnavailable("down") for _ in range(5)), TimeoutError())
    assert await policy(waits).call(attempt, "storing x") == "done"
    assert attempt.calls == 7
    assert waits.seconds == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]  # doubling, capped
    assert lines(caplog) == [
        (logging.WARNING, "storing x failed: MemoryUnavailable: down"),  # once per outage
        *[(logging.DEBUG, "storing x failed: MemoryUnavailable: down")] * 4,
        (logging.DEBUG, "storing x failed: TimeoutError"),  # a blank message names its type
        (logging.INFO, "storing x works again after 6 failed tries"),
    ]


async def test_a_failure_not_worth_retrying_is_raised_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=log.name)
    waits = Waits()
    attempt = Flaky(MemoryUnavailable("down"), BadRequest("NUL in the text"))
    with pytest.raises(BadRequest, match="NUL"):
        await policy(waits).call(attempt, "storing x")
    assert attempt.calls == 2 and waits.seconds == [0.2]


async def test_a_bounded_policy_gives_up_after_its_attempts_with_the_last_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=log.name)
    waits = Waits()
    attempt = Flaky(*(MemoryUnavailable(f"try {i}") for i in range(1, 10)))
    with pytest.raises(MemoryUnavailable, match="try 3"):
        await policy(waits, attempts=3).call(attempt, "extracting x")
    assert attempt.calls == 3 and waits.seconds == [0.2, 0.4]
    assert lines(caplog)[-1] == (
        logging.WARNING,
        "extracting x failed 3 times, giving up: MemoryUnavailable: try 3",
    )


async def test_stop_ends_the_tries_after_a_failure_with_that_failure() -> None:
    waits = Waits()
    stopping = False
    attempt = Flaky(*(MemoryUnavailable("down") for _ in range(9)))

    async def then_stop(seconds: float) -> None:
        nonlocal stopping
        await waits(seconds)
        stopping = len(waits.seconds) == 2

    retry = policy(waits)
    retry.sleep = then_stop
    with pytest.raises(MemoryUnavailable):
        await retry.call(attempt, "delivering x", stop=lambda: stopping)
    assert attempt.calls == 3


async def test_a_long_running_loop_logs_each_outage_once_and_names_its_last_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A connection kept up (the invalidation stream) counts its own failures: each outage
    is one warning, however many reconnections fail during it."""
    caplog.set_level(logging.INFO, logger=log.name)
    tries = policy(Waits()).tries("stream from a")
    tries.succeeded()  # up at the first try: nothing to say
    for outage in ("reset", "refused"):
        for _ in range(3):
            assert tries.failed(ConnectionResetError(outage)) is not None
        assert tries.error == f"ConnectionResetError: {outage}"
        tries.succeeded()
        assert tries.error is None
    assert lines(caplog) == [
        (logging.WARNING, "stream from a failed: ConnectionResetError: reset"),
        (logging.INFO, "stream from a works again after 3 failed tries"),
        (logging.WARNING, "stream from a failed: ConnectionResetError: refused"),
        (logging.INFO, "stream from a works again after 3 failed tries"),
    ]


def test_a_policy_of_no_attempts_is_refused() -> None:
    with pytest.raises(ValueError, match="attempts must be at least 1, got 0"):
        policy(Waits(), attempts=0)
