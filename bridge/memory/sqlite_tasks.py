"""The task model in SQLite: how stored episodes become linked tasks, and how they are read.

Every episode belongs to a task (``metadata.task``; an episode without one, as written by
older releases, is a task of its own). Storing an episode updates its task: the query that
opened it, the files it wrote, the errors it hit, its outcome and summary. Every function
here runs on one connection inside the caller's transaction.

The tables are the durable truth; searching them is the recall index's job
(:mod:`bridge.memory.index`), which is loaded from :func:`last_task_states` and kept
current with :func:`task_states` after each commit, and with :func:`states_changed_since`
after other processes' commits. Each task records the store's change that last touched it
(``changed``, see :mod:`bridge.memory.sqlite_changes`).

Forgetting (:func:`forget`) deletes episodes and then rebuilds each task they belonged to
from the episodes it has left, folded in again in the order they were stored, so a task
is exactly what its remaining episodes make it; a task left with none is removed.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Final, Literal, NamedTuple

import msgspec

from bridge.episode import Episode
from bridge.memory.recall import TaskHit

ForgetKind = Literal["episode", "path", "session", "task"]

MAX_ERRORS: Final = 8  # errors kept per task
MAX_TASK_TEXT: Final = 2000  # characters of a query or summary kept in the index

TASK_SCHEMA: Final = """
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    group_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    session TEXT NOT NULL DEFAULT '',
    query TEXT NOT NULL DEFAULT '',
    summary TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL DEFAULT 'unfinished',
    at REAL NOT NULL,
    changed INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX tasks_group_seq ON tasks (group_id, seq);
CREATE INDEX tasks_session ON tasks (group_id, session);
CREATE INDEX tasks_changed ON tasks (changed);
CREATE TABLE task_files (
    id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL REFERENCES tasks (id),
    group_id TEXT NOT NULL,
    path TEXT NOT NULL,
    UNIQUE (task_id, path)
);
CREATE INDEX task_files_path ON task_files (group_id, path, task_id);
CREATE TABLE task_errors (
    id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL REFERENCES tasks (id),
    text TEXT NOT NULL
);
CREATE INDEX task_errors_task ON task_errors (task_id);
"""
# Version 2 kept full-text indexes of tasks and files in the store; the recall index in
# memory replaced them.
DROPPED_IN_3: Final = ("tasks_fts", "files_fts", "files")


def add_changed_column(conn: sqlite3.Connection) -> None:
    """Version 4 numbers the store's changes, so processes sharing it follow each other's:
    add ``tasks.changed`` (0 for the tasks there are) and its index, unless there."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
    if "changed" not in columns:
        conn.execute("ALTER TABLE tasks ADD COLUMN changed INTEGER NOT NULL DEFAULT 0")
    conn.execute("CREATE INDEX IF NOT EXISTS tasks_changed ON tasks (changed)")


OUTCOME: Final = {"success": "completed", "error": "failed", "note": "note"}


# -- writes ---------------------------------------------------------------------------------


def link(conn: sqlite3.Connection, episode: Episode) -> int:
    """Fold a newly stored episode into its task; return the task's id."""
    meta = episode.metadata
    task_uuid = _text(meta.get("task")) or episode.uuid
    row = conn.execute("SELECT id, seq FROM tasks WHERE uuid = ?", (task_uuid,)).fetchone()
    if row is None:
        seq = conn.execute(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM tasks WHERE group_id = ?", (episode.group_id,)
        ).fetchone()[0]
        task_id = conn.execute(
            "INSERT INTO tasks (uuid, group_id, seq, session, at) VALUES (?, ?, ?, ?, ?)",
            (task_uuid, episode.group_id, seq, _text(meta.get("session")), episode.reference_time),
        ).lastrowid
    else:
        task_id, seq = row
        conn.execute(
            "UPDATE tasks SET at = MAX(at, ?) WHERE id = ?", (episode.reference_time, task_id)
        )
    assert task_id is not None
    query = _text(meta.get("task_query"))[:MAX_TASK_TEXT]
    if query:
        conn.execute("UPDATE tasks SET query = ? WHERE id = ? AND query = ''", (query, task_id))
    kind = _text(meta.get("type"))
    if kind == "file_edit" and (path := _text(meta.get("path"))):
        conn.execute(
            "INSERT INTO task_files (task_id, group_id, path) VALUES (?, ?, ?) "
            "ON CONFLICT (task_id, path) DO NOTHING",
            (task_id, episode.group_id, path),
        )
    elif kind == "error":
        _add_error(conn, task_id, episode.body.removeprefix("Error: "))
    elif kind in ("success", "note"):
        text = _text(meta.get("summary")) or (
            "" if kind == "success" else episode.body.removeprefix("Note: ")
        )
        asked = episode.body.removeprefix("Completed: ")
        conn.execute(
            "UPDATE tasks SET outcome = ?, summary = ?, query = CASE WHEN query = '' "
            "THEN ? ELSE query END WHERE id = ?",
            (OUTCOME[kind], text[:MAX_TASK_TEXT], asked[:MAX_TASK_TEXT], task_id),
        )
    return int(task_id)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _add_error(conn: sqlite3.Connection, task_id: int, text: str) -> None:
    count = conn.execute("SELECT COUNT(*) FROM task_errors WHERE task_id = ?", (task_id,))
    if count.fetchone()[0] < MAX_ERRORS:
        conn.execute(
            "INSERT INTO task_errors (task_id, text) VALUES (?, ?)", (task_id, text[:MAX_TASK_TEXT])
        )
    conn.execute(
        "UPDATE tasks SET outcome = 'failed' WHERE id = ? AND outcome = 'unfinished'", (task_id,)
    )


# -- forgetting -----------------------------------------------------------------------------

# The task an episode belongs to, as ``link`` reads it: its ``task`` if that is a non-empty
# string, else the episode itself.
EPISODE_TASK: Final = """CASE WHEN json_type(e.metadata, '$.task') = 'text'
AND json_extract(e.metadata, '$.task') <> '' THEN json_extract(e.metadata, '$.task')
ELSE e.uuid END"""
DOOMED: Final[dict[str, str]] = {
    "episode": "e.uuid = :value",
    "path": "json_extract(e.metadata, '$.type') = 'file_edit' "
    "AND json_extract(e.metadata, '$.path') = :value",
    # the episodes a session sent, and every episode of the tasks it opened
    "session": f"""(json_extract(e.metadata, '$.session') = :value OR {EPISODE_TASK} IN
(SELECT uuid FROM tasks WHERE group_id = :group AND session = :value))""",
    "task": f"{EPISODE_TASK} = :value",
}
EPISODE_COLUMNS: Final = (
    "e.uuid, e.group_id, e.name, e.body, e.source_description, e.reference_time, e.metadata"
)

_encode = msgspec.json.Encoder().encode
_decode_metadata = msgspec.json.Decoder(dict[str, Any]).decode


def forget(conn: sqlite3.Connection, group_id: str, kind: ForgetKind, value: str) -> int:
    """Delete the episodes of ``group_id`` that ``kind`` and ``value`` select, rebuild the
    tasks they belonged to, and return how many episodes were deleted."""
    doomed = conn.execute(
        f"SELECT e.id, {EPISODE_TASK} FROM episodes e WHERE e.group_id = :group AND {DOOMED[kind]}",
        {"group": group_id, "value": value},
    ).fetchall()
    tasks = {task for _, task in doomed}
    if kind == "session":
        sessions = conn.execute(
            "SELECT uuid FROM tasks WHERE group_id = ? AND session = ?", (group_id, value)
        )
        tasks.update(uuid for (uuid,) in sessions)
    elif kind == "task":
        tasks.add(value)
    ids = [episode_id for episode_id, _ in doomed]
    for chunk in range(0, len(ids), 500):
        part = ids[chunk : chunk + 500]
        conn.execute(f"DELETE FROM episodes WHERE id IN ({', '.join('?' * len(part))})", part)
    if kind == "path":  # links of the file whatever their episodes said
        conn.execute("DELETE FROM task_files WHERE group_id = ? AND path = ?", (group_id, value))
    rebuild(conn, group_id, tasks)
    return len(ids)


def rebuild(conn: sqlite3.Connection, group_id: str, task_uuids: Iterable[str]) -> None:
    """Make each task of ``group_id`` again what its stored episodes make it, keeping its
    ordinal and session; remove those that have no episode left."""
    wanted = sorted(set(task_uuids))
    if not wanted:
        return
    found = conn.execute(
        "SELECT id, uuid FROM tasks WHERE group_id = ? AND uuid IN "
        "(SELECT value FROM json_each(?))",
        (group_id, _json_list(wanted)),
    ).fetchall()
    for task_id, _ in found:
        conn.execute("DELETE FROM task_files WHERE task_id = ?", (task_id,))
        conn.execute("DELETE FROM task_errors WHERE task_id = ?", (task_id,))
        conn.execute(
            "UPDATE tasks SET query = '', summary = '', outcome = 'unfinished', at = 0 "
            "WHERE id = ?",
            (task_id,),
        )
    rows = conn.execute(
        f"SELECT {EPISODE_COLUMNS} FROM episodes e WHERE e.group_id = ? AND {EPISODE_TASK} IN "
        "(SELECT value FROM json_each(?)) ORDER BY e.id",
        (group_id, _json_list(wanted)),
    ).fetchall()
    kept = set()
    for row in rows:
        kept.add(link(conn, _stored_episode(row)))
    for task_id, _ in found:
        if task_id not in kept:
            conn.execute("DELETE FROM tasks WHERE id = ?", (task_id,))


def fold(episodes: Iterable[Episode]) -> TaskHit | None:
    """The task ``episodes`` (one task's, in the order they were stored) make, folded as
    :func:`link` folds them, on a connection of its own in memory; None for none. Other
    backends rebuild a task with it, so every backend's task is the same fold."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(TASK_SCHEMA)
        task_id = None
        for episode in episodes:
            task_id = link(conn, episode)
        if task_id is None:
            return None
        ((_, _, task),) = task_states(conn, [task_id])
        return task
    finally:
        conn.close()


def _json_list(values: list[str]) -> str:
    return _encode(values).decode()


def _stored_episode(row: tuple[Any, ...]) -> Episode:
    *fields, metadata = row
    names = [f for f in Episode.__struct_fields__ if f != "metadata"]
    return Episode(**dict(zip(names, fields, strict=True)), metadata=_decode_metadata(metadata))


# -- reads ----------------------------------------------------------------------------------

MAX_SEQ: Final = 2**63 - 1
TASK_COLUMNS: Final = (
    "t.id, t.group_id, t.changed, t.uuid, t.seq, t.query, t.summary, t.outcome, t.at"
)


class TaskState(NamedTuple):
    """A task as stored, with its project and the store's change that made this state."""

    group_id: str
    changed: int
    task: TaskHit


def last_task_states(conn: sqlite3.Connection, group_id: str, count: int) -> list[TaskState]:
    """The last ``count`` tasks of ``group_id``, oldest first, with their files and errors."""
    rows = conn.execute(
        f"SELECT {TASK_COLUMNS} FROM tasks t WHERE t.group_id = ? ORDER BY t.seq DESC LIMIT ?",
        (group_id, count),
    ).fetchall()
    return _records(conn, rows[::-1])


def states_changed_since(conn: sqlite3.Connection, change: int, limit: int) -> list[TaskState]:
    """Up to ``limit`` tasks of any project whose last change is after ``change``, in the
    order of their changes."""
    rows = conn.execute(
        f"SELECT {TASK_COLUMNS} FROM tasks t WHERE t.changed > ? ORDER BY t.changed LIMIT ?",
        (change, limit),
    ).fetchall()
    return _records(conn, rows)


def newest_tasks(
    conn: sqlite3.Connection, group_id: str, limit: int, before_seq: int | None = None
) -> list[TaskHit]:
    """Up to ``limit`` tasks of ``group_id`` newest first, older than ``before_seq`` if
    given, with their files and errors."""
    rows = conn.execute(
        f"SELECT {TASK_COLUMNS} FROM tasks t WHERE t.group_id = ? AND t.seq < ? "
        "ORDER BY t.seq DESC LIMIT ?",
        (group_id, MAX_SEQ if before_seq is None else before_seq, limit),
    ).fetchall()
    return [state.task for state in _records(conn, rows)]


def task_states(conn: sqlite3.Connection, task_ids: Iterable[int]) -> list[TaskState]:
    """The current state of each task, with its project, in the order given."""
    ids = list(dict.fromkeys(task_ids))
    marks = ", ".join("?" * len(ids))
    rows = conn.execute(f"SELECT {TASK_COLUMNS} FROM tasks t WHERE t.id IN ({marks})", ids)
    by_id = {row[0]: row for row in rows}
    return _records(conn, [by_id[i] for i in ids if i in by_id])


def _records(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[TaskState]:
    if not rows:
        return []
    ids = [row[0] for row in rows]
    marks = ", ".join("?" * len(ids))
    files: dict[int, list[str]] = defaultdict(list)
    errors: dict[int, list[str]] = defaultdict(list)
    for task_id, path in conn.execute(
        f"SELECT task_id, path FROM task_files WHERE task_id IN ({marks}) ORDER BY id", ids
    ):
        files[task_id].append(path)
    for task_id, text in conn.execute(
        f"SELECT task_id, text FROM task_errors WHERE task_id IN ({marks}) ORDER BY id", ids
    ):
        errors[task_id].append(text)
    return [
        TaskState(
            group_id,
            changed,
            TaskHit(
                uuid=uuid,
                seq=seq,
                query=query,
                summary=summary,
                outcome=outcome,
                at=at,
                files=files[task_id],
                errors=errors[task_id],
            ),
        )
        for task_id, group_id, changed, uuid, seq, query, summary, outcome, at in rows
    ]
