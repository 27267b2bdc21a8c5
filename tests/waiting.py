"""Waiting in tests for a condition, never for a stretch of time: poll it, within a
deadline, and on failure say what was awaited and what was seen last."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

_NOTHING: object = object()


@overload
async def eventually(
    probe: Callable[[], Awaitable[T]],
    what: str,
    *,
    until: Callable[[T], object] = bool,
    timeout: float = 10.0,
    every: float = 0.02,
    ignoring: tuple[type[Exception], ...] = (),
) -> T: ...


@overload
async def eventually(
    probe: Callable[[], T],
    what: str,
    *,
    until: Callable[[T], object] = bool,
    timeout: float = 10.0,
    every: float = 0.02,
    ignoring: tuple[type[Exception], ...] = (),
) -> T: ...


async def eventually(
    probe: Callable[[], object],
    what: str,
    *,
    until: Callable[[Any], object] = bool,
    timeout: float = 10.0,
    every: float = 0.02,
    ignoring: tuple[type[Exception], ...] = (),
) -> object:
    """The first value of ``probe`` (a function or an async function, called every
    ``every`` seconds) for which ``until`` holds (by default: the value is truthy).

    An exception of a kind in ``ignoring`` counts as a value that does not hold. After
    ``timeout`` seconds, a probe still running included, the test fails with an
    AssertionError naming ``what`` it waited for and the last value (or exception) seen.
    """
    last: object = _NOTHING
    try:
        async with asyncio.timeout(timeout) as deadline:
            while True:
                try:
                    value = probe()
                    if inspect.isawaitable(value):
                        value = await value
                except ignoring as e:
                    last = e
                else:
                    if until(value):
                        return value
                    last = value
                await asyncio.sleep(every)
    except TimeoutError:
        if not deadline.expired():
            raise
        seen = "nothing: the probe never returned" if last is _NOTHING else repr(last)
        raise AssertionError(f"waited {timeout:g} s for {what}; last seen: {seen}") from None


@overload
async def steady(
    measure: Callable[[], Awaitable[T]],
    what: str,
    *,
    readings: int = 10,
    every: float = 0.1,
    timeout: float = 30.0,
) -> T: ...


@overload
async def steady(
    measure: Callable[[], T],
    what: str,
    *,
    readings: int = 10,
    every: float = 0.1,
    timeout: float = 30.0,
) -> T: ...


async def steady(
    measure: Callable[[], object],
    what: str,
    *,
    readings: int = 10,
    every: float = 0.1,
    timeout: float = 30.0,
) -> object:
    """The value of ``measure`` (a function or an async function) once ``readings``
    readings in a row, ``every`` seconds apart, were the same: for a quantity that moves
    while work goes on and stops when it is done. Fails as ``eventually`` does."""
    recent: list[object] = []

    async def probe() -> list[object]:
        value = measure()
        if inspect.isawaitable(value):
            value = await value
        recent.append(value)
        del recent[:-readings]
        return list(recent)

    last = await eventually(
        probe,
        f"{what} to stay the same for {readings} readings {every:g} s apart",
        until=lambda seen: len(seen) == readings and seen.count(seen[0]) == readings,
        every=every,
        timeout=timeout,
    )
    return last[-1]
