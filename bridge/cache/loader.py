"""The memory context a new chat injects, loaded through the context cache.

``ContextLoader.load`` answers from the cache when it can; on a miss it asks memory once
for all concurrent identical questions (single flight), waits for the answer at most the
miss budget, and caches the answer once the asker's reply is on its way, so a slow memory
still fills the cache for the next turn. Nothing here knows of connections or messages:
it takes a project and a query and gives the context, and the cache and memory changes
that make contexts stale are reported to it (``invalidate_*``, ``memory_changed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import KW_ONLY, dataclass, field
from typing import Final, TypedDict

from bridge.background import Flights
from bridge.cache.contexts import ContextCache, Lookup, normalise_query
from bridge.cache.paths import paths_in
from bridge.errors import CacheUnavailable
from bridge.memory.base import MemoryBackend
from bridge.memory.privacy import scrub
from bridge.memory.recall import DEFAULT_BUDGET, TASKS_SHOWN, context
from bridge.metrics import Metrics

log = logging.getLogger(__name__)

_Asked = tuple[str, str]  # (project, normalised query): one question, however it is typed
_FlightKey = tuple[str, str, bytes | None, int]
MISS_BUDGET: Final = 0.25  # seconds a chat:start waits for memory on a cache miss
FILL_DELAY_S = 0.001  # a cache fill waits at most this long for the miss's reply to go out


def _flight_done(key: _FlightKey, flight: asyncio.Task[str | None]) -> None:
    if not flight.cancelled() and flight.exception() is not None:
        log.warning("memory query failed: %r", flight.exception())


class LoaderOptions(TypedDict, total=False):
    """What may be said of a ContextLoader besides its parts, for those that make one; what
    is not said keeps the loader's default."""

    miss_budget: float
    recall_limit: int
    context_chars: int


@dataclass(eq=False)
class ContextLoader:
    """The context to inject for a project's query: cached, else from memory."""

    memory: MemoryBackend
    cache: ContextCache
    metrics: Metrics
    _: KW_ONLY
    miss_budget: float = MISS_BUDGET
    recall_limit: int = TASKS_SHOWN
    context_chars: int = DEFAULT_BUDGET
    _flights: Flights[_FlightKey, str | None] = field(init=False)
    _changes: int = field(init=False, default=0)  # memory changes here, for flight keys
    _fills: Flights[_Asked, None] = field(init=False)
    # Resolved once an asker has the answer a fill caches (see ``_fill``).
    _answered: dict[_Asked, asyncio.Future[None]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._flights = Flights(_flight_done)
        self._fills = Flights(self._fill_done)

    def cached(self, project: str, query: str) -> Lookup | None:
        """The context from the in-process copy of the cache, or None (no I/O, no task)."""
        return self.cache.lookup_local(project, query)

    async def load(self, project: str, query: str) -> Lookup:
        """The context to inject for ``query`` in ``project``, and whether it was cached.

        A miss counts as one, asks memory (sharing a question already on its way) and waits
        at most the miss budget: past it the answer is None, and the memory query goes on
        to fill the cache. The caller's reply must go out in the step this returns in: the
        fill of this answer starts just after it. Memory's failure is raised.
        """
        asked = (project, normalise_query(query))
        if fill := self._fills.get(asked):
            await asyncio.wait([fill])  # the answer to the same question is being cached
        try:
            lookup = await self.cache.lookup(project, query)
        except CacheUnavailable:
            lookup = None
        if lookup is not None and lookup.hit:
            self.metrics.cache_hit(project)
            return lookup
        self.metrics.cache_miss(project)
        epoch = lookup.epoch if lookup else None
        flight = self._flight(asked, query, epoch)
        # asyncio.wait never cancels what it waits for: past the budget the flight goes on
        # and fills the cache for the next turn (one future less than wait_for on a shield).
        await asyncio.wait([flight], timeout=self.miss_budget)
        inject = flight.result() if flight.done() else None
        if (answered := self._answered.get(asked)) is not None and not answered.done():
            answered.set_result(None)  # the fill may go: the reply is sent in this same step
        return Lookup(hit=False, inject=inject, epoch=epoch or b"")

    async def uncached(self, project: str, scrubbed: str) -> str | None:
        """The memory context for a query, as a miss renders it, neither cached nor read
        from the cache. Memory is searched with the scrubbed query: a backend may send it
        on (an embedding API, a script's arguments), and it then matches the scrubbed
        episodes."""
        found = await self.memory.candidates(project, scrubbed)
        return context(found, self.context_chars, tasks=self.recall_limit)

    def memory_changed(self) -> None:
        """Memory took or lost episodes: a query begun before must not answer after."""
        self._changes += 1

    async def invalidate_path(self, project: str, path: str) -> None:
        """Drop the project's cached contexts that name ``path``."""
        with contextlib.suppress(CacheUnavailable):  # kept and replayed by the cache
            await self.cache.invalidate_path(project, path)

    async def invalidate_paths(self, project: str, paths: Iterable[str]) -> None:
        """Drop the project's cached contexts that name any of ``paths``, one by one."""
        for path in paths:
            await self.invalidate_path(project, path)

    async def invalidate_project(self, project: str) -> None:
        """Drop every cached context of the project."""
        with contextlib.suppress(CacheUnavailable):  # kept and replayed by the cache
            await self.cache.invalidate_project(project)

    async def drain(self) -> None:
        """Wait for background work: memory queries past their budget, cache fills."""
        await self._flights.wait()
        await self._fills.wait()

    # -- a miss ---------------------------------------------------------------------------

    def _flight(self, asked: _Asked, query: str, epoch: bytes | None) -> asyncio.Task[str | None]:
        """The one memory query in progress for this (project, normalised query) and epoch."""
        # A flight started before an episode was stored must not answer a request that came
        # after it: the key includes the cache epoch and, for when the cache is down (no
        # epoch), this process's count of memory changes.
        key = (*asked, epoch, self._changes)
        return self._flights.join(key, lambda: self._recall_and_fill(asked, query, epoch))

    async def _recall_and_fill(self, asked: _Asked, query: str, epoch: bytes | None) -> str | None:
        project = asked[0]
        inject = await self.uncached(project, scrub(query))
        # An empty answer is not cached: the next episode may be the one it lacked, and an
        # empty recall is cheap. The answer need not wait for the cache to take it.
        if epoch is not None and inject is not None:
            answered = asyncio.get_running_loop().create_future()
            self._answered[asked] = answered
            self._fills.start(asked, self._fill(project, query, inject, epoch, answered))
        return inject

    def _fill_done(self, asked: _Asked, fill: asyncio.Task[None]) -> None:
        self._answered.pop(asked, None)

    async def _fill(
        self, project: str, query: str, inject: str, epoch: bytes, answered: asyncio.Future[None]
    ) -> None:
        # The fill was made in the flight, before the asker even had the answer: let the
        # reply go out first rather than put the context's tags and a round trip to Valkey
        # ahead of it. The asker resolves ``answered`` in the step that sends its reply, so
        # the fill starts just after the send, while the client reads the reply; if nobody
        # asks any more (the asker gave up at its budget) it waits FILL_DELAY_S at most.
        # Identical questions meanwhile wait for the fill (see ``load``).
        await asyncio.wait([answered], timeout=FILL_DELAY_S)
        tags = paths_in(query) | paths_in(inject)
        with contextlib.suppress(CacheUnavailable):  # counted by the cache
            await self.cache.put(project, query, inject, tags, epoch)
