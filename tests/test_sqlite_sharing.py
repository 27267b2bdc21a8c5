"""One embedded store shared by several processes (``serve --workers N``): each has its own
recall index and follows the others' commits through the store's change counters. Two
SqliteMemory instances on one real database file stand for two processes (each has its
own connections, writer thread and index, exactly as a process has)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bridge.episode import Episode, new_episode
from bridge.memory import sqlite_tasks
from bridge.memory.base import Selector
from bridge.memory.index import ProjectIndex
from bridge.memory.recall import TaskHit
from bridge.memory.sqlite import (
    EPISODE_SCHEMA,
    INSERT,
    SCHEMA_VERSION,
    SqliteMemory,
    _execute_script,
    prepare,
)
from bridge.memory.sqlite_changes import Counters, read_counters

# The task tables as schema version 3 wrote them (no change numbers, no counters).
TASK_SCHEMA_3 = """
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY, uuid TEXT NOT NULL UNIQUE, group_id TEXT NOT NULL,
    seq INTEGER NOT NULL, session TEXT NOT NULL DEFAULT '', query TEXT NOT NULL DEFAULT '',
    summary TEXT NOT NULL DEFAULT '', outcome TEXT NOT NULL DEFAULT 'unfinished',
    at REAL NOT NULL
);
CREATE UNIQUE INDEX tasks_group_seq ON tasks (group_id, seq);
CREATE INDEX tasks_session ON tasks (group_id, session);
CREATE TABLE task_files (
    id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL REFERENCES tasks (id),
    group_id TEXT NOT NULL, path TEXT NOT NULL, UNIQUE (task_id, path)
);
CREATE INDEX task_files_path ON task_files (group_id, path, task_id);
CREATE TABLE task_errors (
    id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL REFERENCES tasks (id), text TEXT NOT NULL
);
CREATE INDEX task_errors_task ON task_errors (task_id);
"""


def write(path: str, task: str, query: str, group: str = "proj") -> Episode:
    """A file:write episode of ``task``, which was opened by ``query``."""
    meta = {"type": "file_edit", "path": path, "task": task, "task_query": query}
    return new_episode(group, "file_edit", f"Modified: {path}", "test", meta)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[SqliteMemory, SqliteMemory]]:
    """Two stores on one file, as two worker processes have them."""
    path = tmp_path / "memory.sqlite3"
    first, second = SqliteMemory(path, shared=True), SqliteMemory(path, shared=True)
    await first.start()
    await second.start()
    yield first, second
    await first.close()
    await second.close()


async def files_for(memory: SqliteMemory, query: str, group: str = "proj") -> set[str]:
    return set((await memory.candidates(group, query)).files)


async def test_a_write_through_one_is_recalled_by_the_other_at_once(
    pair: tuple[SqliteMemory, SqliteMemory],
) -> None:
    first, second = pair
    await first.store(write("src/billing.py", "t1", "fix the invoice rounding"))
    # the second loads the project now, then only follows the first's commits
    assert await files_for(second, "invoice rounding") == {"src/billing.py"}
    for n in range(5):
        await first.store(write(f"src/billing_{n}.py", f"t{n + 2}", f"invoice step {n}"))
        assert f"src/billing_{n}.py" in await files_for(second, f"invoice step {n}")
    assert second.follower.catch_ups == 6  # the first write, read before the load, too
    # a task both wrote to: the newest state is the one recalled, on either side
    await second.store(write("src/tax.py", "t1", "fix the invoice rounding"))
    await first.store(write("src/vat.py", "t1", "fix the invoice rounding"))
    for memory in pair:
        found = await memory.candidates("proj", "invoice rounding")
        task = next(t for t in found.tasks if t.uuid == "t1")
        assert task.files == ["src/billing.py", "src/tax.py", "src/vat.py"]


async def test_a_process_alone_never_reads_its_own_commits_back(tmp_path: Path) -> None:
    """Its commits are applied as they commit and follow one another without a gap, so
    the check before each query finds nothing to read."""
    memory = SqliteMemory(tmp_path / "memory.sqlite3", shared=True)
    await memory.start()
    try:
        for n in range(20):
            await memory.store(write(f"src/m{n}.py", f"t{n}", f"module {n}"))
            assert f"src/m{n}.py" in await files_for(memory, f"module {n}")
        assert memory.follower.catch_ups == 0
        assert memory.follower.seen == Counters(changes=20, forgets=0)
    finally:
        await memory.close()


async def test_commits_interleaved_with_another_process_are_all_recalled(
    pair: tuple[SqliteMemory, SqliteMemory],
) -> None:
    """A process's own commit that follows another process's does not move its watermark
    past the other one: the next query reads it."""
    first, second = pair
    for memory in pair:
        assert await files_for(memory, "anything") == set()  # both loaded, empty
    for n in range(12):  # one commit each, taking turns
        await pair[n % 2].store(write(f"lib/p{n}.py", f"task{n}", f"parser part {n}"))
    await asyncio.gather(  # and at once
        *(
            pair[n % 2].store(write(f"lib/q{n}.py", f"job{n}", f"parser part {n}"))
            for n in range(12)
        )
    )
    expected = {f"lib/{x}{n}.py" for n in range(12) for x in "pq"}
    for memory in pair:
        found = await memory.candidates("proj", "parser part")
        assert {p for t in found.tasks for p in t.files} == expected
    assert first.follower.seen.changes >= 14
    with contextlib.closing(sqlite3.connect(first.path)) as conn:
        assert first.follower.seen == second.follower.seen == read_counters(conn)


async def test_a_forget_through_one_is_honoured_by_the_other(
    pair: tuple[SqliteMemory, SqliteMemory],
) -> None:
    first, second = pair
    await first.store(write("config/secrets.yml", "t1", "rotate the deploy secrets"))
    await first.store(write("deploy/ship.sh", "t2", "speed up the deploy"))
    await second.store(write("other/file.py", "t3", "deploy elsewhere", group="other"))
    assert await files_for(second, "deploy") == {"config/secrets.yml", "deploy/ship.sh"}
    assert await files_for(second, "deploy", "other") == {"other/file.py"}
    assert await first.forget("proj", Selector("path", "config/secrets.yml")) == 1
    assert await files_for(second, "deploy secrets") == {"deploy/ship.sh"}
    assert await files_for(second, "deploy", "other") == {"other/file.py"}
    assert await second.forget("proj", Selector("task", "t2")) == 1
    assert await files_for(first, "deploy") == set()
    assert first.follower.seen == second.follower.seen == Counters(changes=3, forgets=2)


async def test_a_gap_too_large_to_read_reloads_the_projects(
    pair: tuple[SqliteMemory, SqliteMemory],
) -> None:
    first, second = pair
    second.follower.limit = 3
    assert await files_for(second, "routing") == set()
    for n in range(5):
        await first.store(write(f"web/route{n}.py", f"r{n}", f"routing table {n}"))
    assert len(await files_for(second, "routing table")) == 5
    assert second.follower.catch_ups == 0  # loaded again rather than read back


def test_an_older_state_of_a_task_never_replaces_a_newer_one() -> None:
    index = ProjectIndex()
    newer = TaskHit(uuid="t", seq=1, query="fix login", files=["a.py", "b.py"])
    older = TaskHit(uuid="t", seq=1, query="fix login", files=["a.py"])
    index.put(newer, changed=7)
    index.put(older, changed=5)
    index.put(older, changed=7)
    assert index.candidates("login").tasks[0].files == ["a.py", "b.py"]
    index.put(older, changed=8)
    assert index.candidates("login").tasks[0].files == ["a.py"]


async def test_a_store_of_schema_3_is_migrated_to_4_in_place(tmp_path: Path) -> None:
    """Version 4 adds the change counters and each task's change: what version 3 stored
    counts as change 0, and is recalled as before."""
    path = tmp_path / "memory.sqlite3"
    old = [write("src/legacy.py", "t1", "port the legacy importer")]
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute("BEGIN")
        _execute_script(conn, EPISODE_SCHEMA)
        _execute_script(conn, TASK_SCHEMA_3)
        for e in old:
            conn.execute(INSERT, (*msgspec.structs.astuple(e)[:-1], json.dumps(e.metadata)))
            sqlite_tasks.link(conn, e)
        conn.execute("PRAGMA user_version = 3")
        conn.execute("COMMIT")
    first, second = SqliteMemory(path, shared=True), SqliteMemory(path, shared=True)
    await asyncio.gather(first.start(), second.start())  # both at once: one migrates
    try:
        assert await files_for(first, "legacy importer") == {"src/legacy.py"}
        await second.store(write("src/new.py", "t2", "port the new importer"))
        assert await files_for(first, "importer") == {"src/legacy.py", "src/new.py"}
    finally:
        await first.close()
        await second.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert read_counters(conn) == Counters(changes=1, forgets=0)
        changed: list[Any] = conn.execute("SELECT uuid, changed FROM tasks ORDER BY id").fetchall()
        assert changed == [("t1", 0), ("t2", 1)]
        indexes = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        assert "tasks_changed" in indexes


def test_processes_opening_an_old_store_at_once_all_switch_it_to_wal(tmp_path: Path) -> None:
    """Switching a store to WAL needs it to itself: of connections that try at once, SQLite
    refuses all but one without waiting. Each tries again until the switch is done, so
    none fails (before, about 6 in 100 of these runs had one fail: database is locked)."""
    for run in range(60):
        path = tmp_path / f"{run}.sqlite3"
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE kept (x)")  # a store in SQLite's default journal mode
        assert prepared_at_once(path, 3) == []
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def prepared_at_once(path: Path, count: int) -> list[BaseException]:
    """``prepare(path)`` in ``count`` threads at once: what each raised."""
    failures: list[BaseException] = []

    def open_store() -> None:
        try:
            prepare(path)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return failures
