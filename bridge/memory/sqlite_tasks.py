"""The task model in SQLite: how stored episodes become linked tasks, and how they are read.

Every episode belongs to a task (``metadata.task``; an episode without one, as written by
older releases, is a task of its own). Storing an episode updates its task: the query that
opened it, the files it wrote, the errors it hit, its outcome and summary. Two full-text
indexes are kept beside the tables: one document per task (its query, summary, errors and
the words of its paths) and one per file (the words of its path and of the last tasks that
touched it, rewritten under a new rowid at each write). Every function here runs on one
connection inside the caller's transaction.

A search reads only what lies within the recall horizon (``HORIZON_TASKS``): the index's
rowids grow with time (a task's is its id, a file's document gets a new one at each
write), so FTS5 reads just the tail of each word's list, and a miss costs the same however
much older memory there is. The join with the tables keeps one project's rows, whatever
characters its name holds.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from typing import Any, Final

from bridge.episode import Episode
from bridge.recall import (
    FILE_CANDIDATES,
    HORIZON_TASKS,
    TASK_CANDIDATES,
    WINDOW_TASKS,
    Candidates,
    RecentTask,
    TaskHit,
    search_words,
    words,
)

FILE_DOC_TASKS: Final = 32  # a file's document holds the queries of its last tasks
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
    at REAL NOT NULL
);
CREATE UNIQUE INDEX tasks_group_seq ON tasks (group_id, seq);
CREATE INDEX tasks_session ON tasks (group_id, session);
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
CREATE TABLE files (
    id INTEGER PRIMARY KEY,
    group_id TEXT NOT NULL,
    path TEXT NOT NULL,
    doc INTEGER NOT NULL UNIQUE,
    seq INTEGER NOT NULL,
    UNIQUE (group_id, path)
);
CREATE INDEX files_recent ON files (group_id, seq, doc);
CREATE VIRTUAL TABLE tasks_fts USING fts5(
    text, tokenize='porter unicode61 remove_diacritics 2'
);
CREATE VIRTUAL TABLE files_fts USING fts5(
    text, tokenize='porter unicode61 remove_diacritics 2'
);
"""

PATHS_OF_TASK: Final = "SELECT path FROM task_files WHERE task_id = ?"
LATEST: Final = "SELECT MAX(seq) FROM tasks WHERE group_id = ?"
OUTCOME: Final = {"success": "completed", "error": "failed", "note": "note"}


def _any_word(query: str) -> str | None:
    """The FTS5 query for any meaningful word of ``query``, each quoted (words() yields
    letters and digits only), or None when there is none."""
    found = search_words(query)
    return " OR ".join(f'"{w}"' for w in found) if found else None


# -- writes ---------------------------------------------------------------------------------


def link(conn: sqlite3.Connection, episode: Episode) -> None:
    """Fold a newly stored episode into its task and the indexes."""
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
        _add_file(conn, episode.group_id, task_id, seq, path)
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
    _index_task(conn, episode.group_id, task_id)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _add_file(conn: sqlite3.Connection, group_id: str, task_id: int, seq: int, path: str) -> None:
    """Link a file to its task and rewrite the file's document under a new rowid, so the
    full-text index holds files in the order they were last written."""
    added = conn.execute(
        "INSERT INTO task_files (task_id, group_id, path) VALUES (?, ?, ?) "
        "ON CONFLICT (task_id, path) DO NOTHING",
        (task_id, group_id, path),
    ).rowcount
    if not added:
        return
    queries = conn.execute(
        "SELECT t.query FROM task_files tf JOIN tasks t ON t.id = tf.task_id "
        "WHERE tf.group_id = ? AND tf.path = ? ORDER BY tf.task_id DESC LIMIT ?",
        (group_id, path, FILE_DOC_TASKS),
    ).fetchall()
    doc = [*words(path), *(w for (q,) in queries for w in words(q))]
    old = conn.execute("SELECT doc FROM files WHERE group_id = ? AND path = ?", (group_id, path))
    if (row := old.fetchone()) is not None:
        conn.execute("DELETE FROM files_fts WHERE rowid = ?", row)
    doc_id = conn.execute("INSERT INTO files_fts (text) VALUES (?)", (" ".join(doc),)).lastrowid
    conn.execute(
        "INSERT INTO files (group_id, path, doc, seq) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (group_id, path) DO UPDATE SET doc = excluded.doc, seq = excluded.seq",
        (group_id, path, doc_id, seq),
    )


def _add_error(conn: sqlite3.Connection, task_id: int, text: str) -> None:
    count = conn.execute("SELECT COUNT(*) FROM task_errors WHERE task_id = ?", (task_id,))
    if count.fetchone()[0] < MAX_ERRORS:
        conn.execute(
            "INSERT INTO task_errors (task_id, text) VALUES (?, ?)", (task_id, text[:MAX_TASK_TEXT])
        )
    conn.execute(
        "UPDATE tasks SET outcome = 'failed' WHERE id = ? AND outcome = 'unfinished'", (task_id,)
    )


def _index_task(conn: sqlite3.Connection, group_id: str, task_id: int) -> None:
    """Rewrite the task's document: its query, summary, errors and the words of its paths."""
    query, summary = conn.execute(
        "SELECT query, summary FROM tasks WHERE id = ?", (task_id,)
    ).fetchone()
    texts = [query, summary]
    texts.extend(
        e for (e,) in conn.execute("SELECT text FROM task_errors WHERE task_id = ?", (task_id,))
    )
    texts.extend(
        p for (p,) in conn.execute("SELECT path FROM task_files WHERE task_id = ?", (task_id,))
    )
    doc = " ".join(w for t in texts for w in words(t))
    conn.execute("DELETE FROM tasks_fts WHERE rowid = ?", (task_id,))
    conn.execute("INSERT INTO tasks_fts (rowid, text) VALUES (?, ?)", (task_id, doc))


# -- reads ----------------------------------------------------------------------------------

# Tasks are searched from the first task within the horizon on (task ids grow with time),
# so FTS5 reads only that part of each word's list; the join keeps the project's own.
TASKS_MATCHING: Final = """SELECT t.id, t.uuid, t.seq, t.query, t.summary, t.outcome, t.at,
-bm25(tasks_fts) FROM tasks_fts JOIN tasks t ON t.id = tasks_fts.rowid
WHERE tasks_fts MATCH ? AND tasks_fts.rowid >= ? AND t.group_id = ?
ORDER BY bm25(tasks_fts) LIMIT ?"""
HORIZON: Final = "SELECT id FROM tasks WHERE group_id = ? AND seq > ? ORDER BY seq LIMIT 1"
# Files are searched among those written within the horizon (their documents' rowids grow
# with each write); the join keeps the project's own.
FILES_MATCHING: Final = """SELECT f.path, -bm25(files_fts) FROM files_fts
JOIN files f ON f.doc = files_fts.rowid WHERE files_fts MATCH ? AND files_fts.rowid >= ?
AND f.group_id = ? ORDER BY bm25(files_fts) LIMIT ?"""
FILES_HORIZON: Final = (
    "SELECT doc FROM files WHERE group_id = ? AND seq > ? ORDER BY seq, doc LIMIT 1"
)
RECENT: Final = """SELECT t.seq, tf.path FROM tasks t JOIN task_files tf ON tf.task_id = t.id
WHERE t.group_id = ? AND t.seq > ? ORDER BY tf.id"""


def candidates(conn: sqlite3.Connection, group_id: str, query: str) -> Candidates:
    """Past tasks and files matching ``query`` in ``group_id``, and its recent work."""
    latest = conn.execute("SELECT MAX(seq) FROM tasks WHERE group_id = ?", (group_id,)).fetchone()[
        0
    ]
    if latest is None:
        return Candidates()
    recent: dict[int, list[str]] = defaultdict(list)
    for seq, path in conn.execute(RECENT, (group_id, latest - WINDOW_TASKS)):
        recent[seq].append(path)
    any_word = _any_word(query)
    tasks: list[TaskHit] = []
    files: dict[str, float] = {}
    if any_word is not None:
        first = conn.execute(HORIZON, (group_id, latest - HORIZON_TASKS)).fetchone()[0]
        found = (any_word, first, group_id, TASK_CANDIDATES)
        tasks = _task_hits(conn, conn.execute(TASKS_MATCHING, found).fetchall())
        horizon = (group_id, latest - HORIZON_TASKS)
        first_file = (conn.execute(FILES_HORIZON, horizon).fetchone() or (0,))[0]
        found_files = (any_word, first_file, group_id, FILE_CANDIDATES)
        files = dict(conn.execute(FILES_MATCHING, found_files).fetchall())
    return Candidates(
        tasks=tasks,
        files=files,
        recent=[RecentTask(seq, paths) for seq, paths in recent.items()],
        latest_seq=latest,
    )


def _task_hits(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[TaskHit]:
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
        TaskHit(
            uuid=uuid,
            seq=seq,
            query=query,
            summary=summary,
            outcome=outcome,
            at=at,
            files=files[task_id],
            errors=errors[task_id],
            relevance=relevance,
        )
        for task_id, uuid, seq, query, summary, outcome, at, relevance in rows
    ]
