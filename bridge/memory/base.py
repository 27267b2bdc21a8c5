"""The MemoryBackend interface and the context text built from what a backend recalls.

The interface mirrors graphiti-core: episodes live in a ``group_id`` (the OpenCode project),
are added one at a time with a reference time, and are recalled by a text search scoped to
one group. A backend may also return ``facts`` (Graphiti's extracted edges); the embedded
store returns episodes only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol

import msgspec

from bridge.episode import Episode
from bridge.errors import BadRequest
from bridge.memory.recall import Candidates, TaskHit

PROJECTS_LISTED = 1000  # projects a store lists, most recently active first


class Selector(msgspec.Struct, frozen=True):
    """What to forget in a project: one episode (by uuid), every episode and link of a
    file (by path, as written), every task of a client's session, or one task (by uuid)."""

    kind: Literal["episode", "path", "session", "task"]
    value: str


class Unsupported(BadRequest):
    """A request this backend cannot serve (forgetting, listing its tasks): the message
    names the backend and what it cannot do."""


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

    async def store(self, episode: Episode) -> bool:
        """Store one episode; when this returns, the episode is durable.

        Storing an episode whose ``uuid`` is already stored is a no-op (idempotent).
        Returns True when the episode was newly stored, False when its ``uuid`` was
        already stored (a backend that cannot tell returns True).
        Raises MemoryUnavailable if the store fails.
        """
        ...

    async def recall(self, group_id: str, query: str, limit: int) -> Recall:
        """Return up to ``limit`` episodes of ``group_id`` relevant to ``query``, best first.

        An episode is relevant when it shares any meaningful word with the query.
        Raises MemoryUnavailable if the search fails.
        """
        ...

    async def candidates(self, group_id: str, query: str) -> Candidates:
        """Past tasks and files of ``group_id`` that may matter for ``query`` (see
        bridge.memory.recall), and the project's recent work. Raises MemoryUnavailable."""
        ...

    def export(self, group_id: str, batch: int) -> AsyncIterator[list[Episode]]:
        """Yield every episode of ``group_id`` in reference-time order, ``batch`` at a time."""
        ...

    async def forget(self, group_id: str, selector: Selector) -> int:
        """Forget what ``selector`` names in ``group_id``; return how many episodes went.

        When this returns, no later ``recall``, ``candidates``, ``export`` or ``newest_tasks``
        holds them: tasks lose the files, errors and outcomes those episodes gave them,
        and a task left with nothing is removed. Raises Unsupported when the backend
        cannot, MemoryUnavailable when it fails (the same forget again finishes it).
        """
        ...

    async def newest_tasks(
        self, group_id: str, limit: int, before_seq: int | None = None
    ) -> list[TaskHit]:
        """Up to ``limit`` tasks of ``group_id``, newest first, each with its files and
        errors; only those older than ``before_seq`` when it is given (the next page).
        Raises Unsupported when the backend cannot list them."""
        ...

    async def projects(self) -> list[str]:
        """The projects memory holds, most recently active first (at most PROJECTS_LISTED)."""
        ...


def candidates_from_recall(recall: Recall) -> Candidates:
    """Candidates for a backend that only finds episodes and facts: each fact, then each
    episode, is a task of its own, ranked in the order given (best first)."""
    count = len(recall.facts) + len(recall.episodes)
    tasks = [
        TaskHit(uuid=f"fact:{n}", seq=count - n, summary=fact, outcome="fact", relevance=count - n)
        for n, fact in enumerate(recall.facts)
    ]
    for n, episode in enumerate(recall.episodes, start=len(recall.facts)):
        meta = episode.metadata
        path = meta.get("path")
        kind = meta.get("type")
        tasks.append(
            TaskHit(
                uuid=episode.uuid,
                seq=count - n,
                query=str(meta.get("task_query") or ""),
                summary=episode.body if kind not in ("file_edit", "error") else "",
                outcome={"success": "completed", "error": "failed"}.get(str(kind), "unfinished"),
                at=episode.reference_time,
                files=[path] if isinstance(path, str) and path else [],
                errors=[episode.body.removeprefix("Error: ")] if kind == "error" else [],
                relevance=float(count - n),
            )
        )
    return Candidates(tasks=tasks, latest_seq=count)
