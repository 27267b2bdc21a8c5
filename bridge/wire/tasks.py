"""Which task an event belongs to: the work of one user turn in one session.

A ``chat:start`` opens a task for its (project, session); every later ``file:write``,
``error`` and ``completion`` of that session belongs to it, until the next ``chat:start``.
The tracker only remembers the open task of each recent session (a bounded LRU map):
nothing is written when a task opens, so a chat that changes nothing leaves no trace. The
task's query, scrubbed (bridge/memory/privacy.py), travels in the metadata of each of its
episodes, and the store builds the task from them.

An event of a session the tracker does not know (a bridge restarted mid-task, or a
client that sends no chat:start) belongs to a task named after the session alone.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from typing import Any, Final

import msgspec

from bridge.memory.privacy import scrub

MAX_SESSIONS: Final = 10_000
MAX_QUERY: Final = 1000  # characters of the opening query carried by each episode


class TaskRef(msgspec.Struct, frozen=True):
    """The open task of a session: its id and the query that opened it."""

    uuid: str
    query: str = ""


class _Opened:
    """A task opened by a chat:start; it gets its id when its first event needs one, so
    opening one (on every chat, cache hits included) costs no more than a dict entry."""

    __slots__ = ("query", "ref")

    def __init__(self, query: str) -> None:
        self.query = query
        self.ref: TaskRef | None = None

    def task(self) -> TaskRef:
        if self.ref is None:
            # Scrubbed before it is clipped, so no clip can cut a secret or a context in two.
            self.ref = TaskRef(uuid.uuid4().hex, scrub(self.query)[:MAX_QUERY])
        return self.ref


class TaskTracker:
    """The open task of each (project, session), most recently used kept."""

    def __init__(self, capacity: int = MAX_SESSIONS) -> None:
        self.capacity = capacity
        self._open: OrderedDict[tuple[str, str], _Opened] = OrderedDict()

    def open(self, project: str, session: str, query: str) -> None:
        """A chat:start: the session's next events belong to a new task."""
        key = (project, session)
        self._open[key] = _Opened(query)
        self._open.move_to_end(key)
        if len(self._open) > self.capacity:
            self._open.popitem(last=False)

    def current(self, project: str, session: str) -> TaskRef:
        """The task an event of this session belongs to."""
        opened = self._open.get((project, session))
        if opened is None:
            name = f"graphiti-bridge:task:{project}:{session}"
            return TaskRef(uuid.uuid5(uuid.NAMESPACE_URL, name).hex)
        return opened.task()

    def metadata(self, project: str, session: str, client_session: str | None) -> dict[str, Any]:
        """The task links an episode of this session carries in its metadata."""
        ref = self.current(project, session)
        links: dict[str, Any] = {"task": ref.uuid}
        if ref.query:
            links["task_query"] = ref.query
        if client_session is not None:
            links["session"] = client_session
        return links

    def drop(self, project: str, *, session: str | None = None, task: str | None = None) -> None:
        """Forget the open task of a session, or the session whose open task is ``task``:
        memory forgot it, so later events must not link to it (nor carry its query)."""
        if session is not None:
            self._open.pop((project, session), None)
        if task is not None:
            for key, opened in list(self._open.items()):
                if key[0] == project and opened.ref is not None and opened.ref.uuid == task:
                    del self._open[key]

    def __len__(self) -> int:
        return len(self._open)
