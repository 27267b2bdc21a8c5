"""The sections of ``python -m bench``, registered where they are written.

A section is one coroutine function taking the ``Run`` and returning its typed result (a
``bench.section.Section``), in a module of its own under ``bench/sections/``, decorated
with ``@section("key", order=N)``. The command line, the suite and the report read this
registry, so a new section is one new module.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from bench.harness import Run
from bench.section import Section

SectionRun = Callable[[Run], Awaitable[Section]]
F = TypeVar("F", bound=SectionRun)
PACKAGE: Final = "bench.sections"


@dataclass(frozen=True)
class Entry:
    """A registered section: its key, its place in the run, and how to run it."""

    key: str
    order: int
    run: SectionRun
    measures_floor: bool
    summary: str


_entries: dict[str, Entry] = {}


def section(key: str, *, order: int, measures_floor: bool = False) -> Callable[[F], F]:
    """Register the decorated coroutine function as section ``key``, run (and reported)
    in ascending ``order``; ``measures_floor`` when it measures the run's closed-loop
    floor itself (otherwise the suite measures it first)."""

    def register(run: F) -> F:
        taken = _entries.get(key)
        if taken is not None and taken.run is not run:
            raise ValueError(f"two sections are registered as {key!r}")
        clash = [e.key for e in _entries.values() if e.order == order and e.key != key]
        if clash:
            raise ValueError(f"sections {key!r} and {clash[0]!r} both have order {order}")
        doc = inspect.getdoc(run) or key
        _entries[key] = Entry(key, order, run, measures_floor, doc.splitlines()[0])
        return run

    return register


def sections() -> list[Entry]:
    """Every section, in run order (importing the modules of ``bench.sections``)."""
    package = importlib.import_module(PACKAGE)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{PACKAGE}.{module.name}")
    return sorted(_entries.values(), key=lambda e: e.order)


def keys() -> list[str]:
    """The keys of every section, in run order."""
    return [e.key for e in sections()]
