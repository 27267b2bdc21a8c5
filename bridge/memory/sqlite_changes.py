"""The embedded store's change counters, and how a process follows other processes' commits.

Several processes may share one store (``serve --workers N``), each with its own recall
index (``bridge.memory.index``), so each must see what the others commit. The store counts
its changes: the ``counters`` table holds ``changes`` (one per write transaction that
stored an episode) and ``forgets`` (one per forget), and every task a transaction touched
records that transaction's ``changes`` value in ``tasks.changed`` (indexed).

A :class:`Follower` knows up to which change and which forget its process's index holds
everything (``seen``):

- **This process's commits** are applied as they commit (:meth:`Follower.committed`, on
  the writer thread, before anyone hears of them). They move ``seen`` only when they
  follow it without a gap, that is when no other process's change lies in between.
- **Before a query** the backend compares the counters with ``seen``: one small SELECT,
  and with a single process they are always equal. When another process moved them,
  :meth:`Follower.follow` reads, in one snapshot, the counters and the tasks changed since
  ``seen`` and applies them to the projects loaded; a forget elsewhere (tasks may be gone)
  drops every project's index instead, to be loaded again from the store. So does a gap
  too large to read at once.

Every task state carries the change that produced it, and the index keeps a state only
when it is newer than the one it holds, so reads and writes finishing in any order leave
the newest.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import defaultdict
from typing import Final, NamedTuple

from bridge.memory import sqlite_tasks
from bridge.memory.index import RecallIndexes

log = logging.getLogger(__name__)

COUNTERS_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO counters VALUES ('changes', 0), ('forgets', 0);
"""
COUNTERS: Final = "SELECT name, value FROM counters WHERE name IN ('changes', 'forgets')"
BUMP: Final = "UPDATE counters SET value = value + 1 WHERE name = ? RETURNING value"
MARK: Final = "UPDATE tasks SET changed = ? WHERE id IN (SELECT value FROM json_each(?))"
# Tasks changed elsewhere read back at once; past this the indexes are loaded again.
CATCH_UP_LIMIT: Final = 2_000
ATTEMPTS: Final = 3  # catch-ups a query tries when this process's forgets keep overtaking


class Counters(NamedTuple):
    """Where the store's counters stand."""

    changes: int
    forgets: int


def read_counters(conn: sqlite3.Connection) -> Counters:
    """The store's counters, as ``conn`` sees them now."""
    values = dict(conn.execute(COUNTERS).fetchall())
    return Counters(values["changes"], values["forgets"])


def bump(conn: sqlite3.Connection, name: str) -> int:
    """Count one more change (``changes``) or forget (``forgets``) in the open write
    transaction; return the new value, the number of this one."""
    return int(conn.execute(BUMP, (name,)).fetchall()[0][0])


def mark(conn: sqlite3.Connection, task_ids: list[int], change: int) -> None:
    """Record in the open write transaction that ``change`` touched these tasks."""
    conn.execute(MARK, (change, "[" + ",".join(map(str, task_ids)) + "]"))


class Follower:
    """Keeps a process's recall indexes up to date with a store other processes share."""

    def __init__(self, index: RecallIndexes, limit: int = CATCH_UP_LIMIT) -> None:
        self.index = index
        self.limit = limit
        self.seen = Counters(0, 0)
        self.catch_ups = 0  # reads that found other processes' changes (to observe them)
        self._state = threading.Lock()  # the index and ``seen`` move together
        self._catching = threading.Lock()  # one catch-up at a time

    def start(self, conn: sqlite3.Connection) -> None:
        """Begin following at the store's current counters (nothing is loaded yet)."""
        self.seen = read_counters(conn)

    def behind(self, counters: Counters) -> bool:
        """True when the store's ``counters`` moved past what this index holds."""
        return counters != self.seen

    def committed(self, conn: sqlite3.Connection, change: int, tasks: dict[int, str]) -> None:
        """Apply this process's write transaction number ``change``, which touched
        ``tasks`` (task id: project), to the index; on the writer thread, after COMMIT.

        Projects are asked for after the commit: one that began loading before this
        question collects the change, one that begins after it reads a snapshot that holds
        the change already. A project whose change cannot be read is dropped from the
        index, to be loaded again from the store.
        """
        with self._state:
            wanted = [task_id for task_id, group_id in tasks.items() if self.index.wants(group_id)]
            if wanted:
                try:
                    self._apply(sqlite_tasks.task_states(conn, wanted))
                except sqlite3.Error:
                    log.exception("cannot read committed tasks back: their projects reload")
                    for group_id in set(tasks.values()):
                        self.index.discard(group_id)
            if self.seen.changes >= change - 1:
                self.seen = self.seen._replace(changes=max(self.seen.changes, change))

    def forgot(self, group_id: str, forget: int) -> None:
        """This process's forget number ``forget`` in ``group_id`` committed: drop the
        project's index (the next query loads it again)."""
        with self._state:
            self.index.discard(group_id)
            if self.seen.forgets == forget - 1:
                self.seen = self.seen._replace(forgets=forget)

    def follow(self, conn: sqlite3.Connection) -> None:
        """Bring the index up to the store's counters (on a reader thread): read what other
        processes committed since ``seen`` and apply it."""
        for _ in range(ATTEMPTS):
            if self._catch_up(conn):
                return

    def _catch_up(self, conn: sqlite3.Connection) -> bool:
        """One catch-up; False when a forget of this process overtook it (read again)."""
        with self._catching:
            since = self.seen
            conn.execute("BEGIN")  # the counters and the tasks from one snapshot
            try:
                now = read_counters(conn)
                states = []
                if now.changes != since.changes:
                    states = sqlite_tasks.states_changed_since(conn, since.changes, self.limit + 1)
            finally:
                conn.execute("COMMIT")
            with self._state:
                seen = self.seen
                if now.forgets < seen.forgets:
                    return False  # read before a forget of ours: it may hold what went
                if now.forgets > seen.forgets or len(states) > self.limit:
                    self.index.discard_all()
                    self.seen = Counters(max(seen.changes, now.changes), now.forgets)
                    return True
                if states:
                    self.catch_ups += 1
                    self._apply(states)
                self.seen = Counters(max(seen.changes, now.changes), seen.forgets)
                return True

    def _apply(self, states: list[sqlite_tasks.TaskState]) -> None:
        """Apply task states to the projects that are loaded or loading."""
        by_group: dict[str, list[sqlite_tasks.TaskState]] = defaultdict(list)
        for state in states:
            by_group[state.group_id].append(state)
        for group_id, group in by_group.items():
            if self.index.wants(group_id):
                self.index.apply(group_id, [s.task for s in group], [s.changed for s in group])
