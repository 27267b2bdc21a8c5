"""Recall on the graph: the recall index (``bridge.memory.index``) kept in step with the
task structure ``graph_tasks`` writes, on FalkorDB.

The graph is the durable truth; a chat's candidates come from a ``RecallIndexes`` beside
it, the same index (and so the same candidates) as the embedded store's, so a miss costs
no full-text search and no more as the graph grows.

- **Load.** A project's index is built on its first query from its last
  ``HORIZON_TASKS`` task nodes (each holds its query, summary, outcome, errors and files),
  read in one query together with the graph's count of changes: the index is then up to
  date with the graph to that change.
- **Writes of this process.** Each write statement returns the new state of the tasks it
  changed with the number of each change, and ``written`` applies them as soon as it
  commits.
- **Writes of other processes.** Another bridge may write to the same graph, so every
  query first catches up: one read of the counter and of the tasks changed since the
  change the index is up to date with (a range scan on ``Task.changed``), usually none.

Every task state carries the change that produced it, and a state is applied only when it
is newer than the one held, so reads and writes that finish in any order leave the newest
state. A project is up to date to change N once every change up to N was returned by
a read (every task changed since a change it was up to date with) or by a write of this
process (whose changes follow one another without a gap): reads and writes that overlap
leave no change to read twice. A graph whose counter is not the one the index was loaded
from (deleted and created again) is loaded again; so is a project the index let go of.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Final

from bridge.errors import MemoryUnavailable
from bridge.memory.graph_tasks import Run
from bridge.memory.index import RecallIndexes
from bridge.memory.recall import HORIZON_TASKS, Candidates, TaskHit

log = logging.getLogger(__name__)

ATTEMPTS: Final = 4  # loads and catch-ups before a query gives up (the index let go of it)
# A task as a list: change, then the TaskHit fields (the write statement returns the same).
TASK: Final = (
    "[t.changed, t.task, t.seq, t.query, t.task_summary, t.outcome, t.at, t.errors, t.paths]"
)
LOAD: Final = f"""MATCH (c:BridgeTasks) WHERE c.group_id = $group_id
OPTIONAL MATCH (t:Task) WHERE t.seq > c.tasks - $horizon AND t.group_id = $group_id
WITH c, t ORDER BY t.seq
RETURN c.uuid AS counter, c.changes AS changes, collect({TASK}) AS tasks"""
CHANGES: Final = f"""MATCH (c:BridgeTasks) WHERE c.group_id = $group_id
OPTIONAL MATCH (t:Task)
WHERE t.changed > $since AND t.seq > c.tasks - $horizon AND t.group_id = $group_id
WITH c, t ORDER BY t.seq
RETURN c.uuid AS counter, c.changes AS changes, collect({TASK}) AS tasks"""


@dataclass
class Synced:
    """How far a project's index is up to date with its graph."""

    counter: str | None  # the graph's BridgeTasks node (None: the graph had none)
    applied: int = 0  # every change up to this one is in the index
    versions: dict[str, tuple[int, int]] = field(default_factory=dict)  # uuid: change, seq
    ahead: dict[int, int] = field(default_factory=dict)  # changes first..last applied past it

    def through(self, last: int) -> None:
        """Every change up to ``last`` is in the index (a read returned them)."""
        self.applied = max(self.applied, last)
        self._advance()

    def span(self, first: int, last: int) -> None:
        """Changes ``first`` to ``last`` are in the index (a write returned them)."""
        self.ahead[first] = max(self.ahead.get(first, last), last)
        self._advance()

    def _advance(self) -> None:
        for first in sorted(self.ahead):
            if first > self.applied + 1:
                break
            self.applied = max(self.applied, self.ahead.pop(first))


def task_of(row: list[Any]) -> tuple[int, TaskHit]:
    """A task read as ``TASK`` lists it: the change that made this state, and the task."""
    changed, uuid, seq, query, summary, outcome, at, errors, files = row
    task = TaskHit(
        uuid=uuid,
        seq=int(seq),
        query=query or "",
        summary=summary or "",
        outcome=outcome or "unfinished",
        at=float(at or 0.0),
        files=list(files or ()),
        errors=list(errors or ()),
    )
    return int(changed or 0), task


@dataclass
class Rounds:
    """A group's catch-up read in flight, and the one its latecomers wait for."""

    current: asyncio.Task[None] | None = None
    next: asyncio.Task[None] | None = None


class GraphRecall:
    """The recall indexes of one backend's graphs, each kept up to date with its graph."""

    def __init__(self, index: RecallIndexes | None = None, horizon: int = HORIZON_TASKS) -> None:
        self.index = index or RecallIndexes(horizon=horizon)
        self.horizon = horizon
        self.reads = 0  # catch-up reads that found changes (to observe them)
        self._synced: dict[str, Synced] = {}
        self._loads: dict[str, asyncio.Future[None]] = {}
        self._rounds: dict[str, Rounds] = {}  # catch-up reads per group

    async def candidates(self, run: Run, group: str, query: str) -> Candidates:
        """Past tasks and files of ``group`` matching ``query``, and its recent work, from
        the index, once it holds every change the graph has."""
        for _ in range(ATTEMPTS):
            synced = self._synced.get(group)
            if synced is None or not self.index.wants(group):
                await self._load(run, group)  # then catch up: a load others waited for
                continue  # may have read the graph before their writes
            await self._round(run, group)
            if self._synced.get(group) is not synced:
                continue  # loaded again meanwhile: catch up with that
            if (found := self.index.candidates(group, query)) is not None:
                return found
        raise MemoryUnavailable(f"the recall index of {group} was let go of while loading")

    def written(self, group: str, counter: str, rows: list[list[Any]]) -> None:
        """Apply what one write statement of this process returned: the graph's counter
        and the tasks it changed (as ``TASK`` lists them, by change)."""
        synced = self._synced.get(group)
        if synced is None or not rows or not self.index.wants(group):
            return  # loading, or not loaded: the next read catches up from the graph
        if counter != synced.counter:
            self.forget(group)  # a graph the index was not loaded from
            return
        try:
            self._fold(group, synced, rows)
        except Exception:  # the graph has the writes: the next query loads them from it
            log.exception("cannot apply written tasks of %s: its index is loaded again", group)
            self.forget(group)
            return
        changes = [int(row[0]) for row in rows]
        if changes == list(range(changes[0], changes[0] + len(changes))):
            synced.span(changes[0], changes[-1])

    def forget(self, group: str) -> None:
        """Drop a project's index: its next query loads it from the graph."""
        self._synced.pop(group, None)
        self.index.discard(group)

    async def _round(self, run: Run, group: str) -> None:
        """Catch up once for all the callers that came while the last read was out.

        One catch-up read per group at a time: a caller that comes while one is out waits
        for it and then shares the next one with everyone who came meanwhile; each read
        starts after its callers came, so it sees every write acknowledged before them.
        A round is a task of its own, so a caller that stops waiting does not stop it.
        """
        rounds = self._rounds.setdefault(group, Rounds())
        if rounds.next is None:
            rounds.next = asyncio.create_task(self._next_round(rounds, run, group))
            rounds.next.add_done_callback(_retrieve)
        await asyncio.shield(rounds.next)

    async def _next_round(self, rounds: Rounds, run: Run, group: str) -> None:
        if rounds.current is not None:
            await asyncio.wait([rounds.current])
        rounds.current, rounds.next = rounds.next, None
        try:
            if (synced := self._synced.get(group)) is not None:
                await self._catch_up(run, group, synced)
        finally:
            rounds.current = None

    async def _catch_up(self, run: Run, group: str, synced: Synced) -> None:
        rows = await run(CHANGES, group_id=group, since=synced.applied, horizon=self.horizon)
        if self._synced.get(group) is not synced:
            return  # loaded again meanwhile
        counter = rows[0]["counter"] if rows else None
        if counter != synced.counter:
            self.forget(group)
            return
        if not rows:
            return
        if changed := [task for task in rows[0]["tasks"] if task[1] is not None]:
            self.reads += 1
            try:
                self._fold(group, synced, changed)
            except Exception as e:
                self.forget(group)
                raise MemoryUnavailable(f"cannot apply the changes of {group}: {e}") from e
        synced.through(int(rows[0]["changes"]))

    def _fold(self, group: str, synced: Synced, rows: list[list[Any]]) -> None:
        """Apply the task states newer than those held."""
        fresh = []
        for row in rows:
            changed, task = task_of(row)
            known = synced.versions.get(task.uuid)
            if known is not None and known[0] >= changed:
                continue
            synced.versions[task.uuid] = (changed, task.seq)
            fresh.append(task)
        if fresh:
            self.index.apply(group, fresh)
        if len(synced.versions) > 2 * self.horizon:  # forget the versions past the horizon
            oldest = max(seq for _, seq in synced.versions.values()) - self.horizon
            synced.versions = {u: v for u, v in synced.versions.items() if v[1] > oldest}

    async def _load(self, run: Run, group: str) -> None:
        """Load a project's last tasks into the index, once for concurrent callers."""
        if (loading := self._loads.get(group)) is not None:
            return await asyncio.shield(loading)
        loading = asyncio.get_running_loop().create_future()
        loading.add_done_callback(_retrieve)
        self._loads[group] = loading
        self._synced.pop(group, None)
        self.index.begin_load(group)
        try:
            rows = await run(LOAD, group_id=group, horizon=self.horizon)
            synced = Synced(rows[0]["counter"] if rows else None)
            tasks = []
            for row in rows[0]["tasks"] if rows else ():
                if row[1] is not None:  # none: an optional match that found no task
                    changed, task = task_of(row)
                    synced.versions[task.uuid] = (changed, task.seq)
                    tasks.append(task)
            synced.applied = int(rows[0]["changes"]) if rows else 0
            await asyncio.to_thread(self.index.finish_load, group, tasks)
            self._synced[group] = synced
            for other in [g for g in self._synced if not self.index.wants(g)]:
                del self._synced[other]  # projects the index let go of (least recently used)
        except BaseException as e:
            self.index.abandon_load(group)
            loading.set_exception(e)
            raise
        else:
            loading.set_result(None)
        finally:
            del self._loads[group]


def _retrieve(done: asyncio.Future[None]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        done.exception()
