"""The MemoryBackend interface and the context text built from what a backend recalls.

The interface mirrors graphiti-core: episodes live in a ``group_id`` (the OpenCode project),
are added one at a time with a reference time, and are recalled by a text search scoped to
one group. A backend may also return ``facts`` (Graphiti's extracted edges); the embedded
store returns episodes only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Protocol

import msgspec

from bridge.episode import Episode

CONTEXT_HEADER = "[Memory Context]"


class Recall(msgspec.Struct, frozen=True):
    """What memory holds about a query: episodes best first, and any extracted facts."""

    episodes: list[Episode]
    facts: list[str] = []

    @property
    def empty(self) -> bool:
        """True when memory has nothing relevant."""
        return not self.episodes and not self.facts


class MemoryBackend(Protocol):
    """Where episodes are stored and searched. Implementations must be safe to call
    concurrently from one event loop."""

    name: str

    async def start(self) -> None:
        """Open files, connections or processes. Called once before any other method."""

    async def close(self) -> None:
        """Release everything ``start`` acquired. Idempotent."""

    async def store(self, episode: Episode) -> None:
        """Store one episode; when this returns, the episode is durable.

        Storing an episode whose ``uuid`` is already stored is a no-op (idempotent).
        Raises MemoryUnavailable if the store fails.
        """

    async def recall(self, group_id: str, query: str, limit: int) -> Recall:
        """Return up to ``limit`` episodes of ``group_id`` relevant to ``query``, best first.

        An episode is relevant when it shares any meaningful word with the query.
        Raises MemoryUnavailable if the search fails.
        """
        ...

    def export(self, group_id: str, batch: int) -> AsyncIterator[list[Episode]]:
        """Yield every episode of ``group_id`` in reference-time order, ``batch`` at a time."""
        ...


def format_context(recall: Recall) -> str | None:
    """The system text to inject for a recall, or None when memory has nothing relevant.

    The format follows the original plugin design: a ``[Memory Context]`` header, then one
    line per fact and per episode, newest knowledge first as ranked by the backend.
    """
    if recall.empty:
        return None
    lines = [CONTEXT_HEADER]
    lines.extend(f"- {fact}" for fact in recall.facts)
    for episode in recall.episodes:
        when = dt.datetime.fromtimestamp(episode.reference_time, dt.UTC)
        lines.append(f"- {episode.body} ({when:%Y-%m-%d %H:%M} UTC)")
    return "\n".join(lines)


def context_paths(recall: Recall) -> list[str]:
    """File paths the recalled episodes are about (their ``metadata.path``)."""
    paths: list[str] = []
    for episode in recall.episodes:
        path = episode.metadata.get("path")
        if isinstance(path, str) and path:
            paths.append(path)
    return paths
