"""The embedded SQLite memory store, on real database files (no mocks)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.episode import Episode, new_episode
from bridge.errors import MemoryUnavailable
from bridge.memory.recall import WINDOW_TASKS
from bridge.memory.sqlite import SCHEMA_VERSION, SqliteMemory, fts_query

DAY = 86400.0


def episode(
    body: str,
    *,
    group: str = "proj",
    name: str = "note",
    uuid: str | None = None,
    at: float | None = None,
    metadata: dict[str, Any] | None = None,
) -> Episode:
    return new_episode(
        group, name, body, "test", metadata or {}, episode_id=uuid, reference_time=at
    )


@pytest.fixture
async def memory(tmp_path: Path) -> AsyncIterator[SqliteMemory]:
    store = SqliteMemory(tmp_path / "data" / "memory.sqlite3")
    await store.start()
    yield store
    await store.close()


async def export_all(memory: SqliteMemory, group: str, batch: int = 100) -> list[list[Episode]]:
    return [chunk async for chunk in memory.export(group, batch)]


async def bodies(
    memory: SqliteMemory, query: str, limit: int = 10, group: str = "proj"
) -> list[str]:
    return [e.body for e in (await memory.recall(group, query, limit)).episodes]


async def test_store_then_recall_returns_the_episode(memory: SqliteMemory) -> None:
    stored = episode("Refactored the payment retry logic", name="refactor")
    await memory.store(stored)
    recall = await memory.recall("proj", "payment retry", 5)
    assert recall.episodes == [stored]
    assert recall.facts == []


async def test_any_shared_word_is_enough_to_match(memory: SqliteMemory) -> None:
    await memory.store(episode("The database migration added an index"))
    await memory.store(episode("Unrelated note about lunch"))
    found = await bodies(memory, "why is the frontend build slow after the migration yesterday")
    assert found == ["The database migration added an index"]


async def test_no_shared_word_and_stopword_only_queries_find_nothing(memory: SqliteMemory) -> None:
    await memory.store(episode("The cache is warmed at startup"))
    assert await bodies(memory, "kubernetes helm chart") == []
    assert await bodies(memory, "the is at") == []  # only stopwords: no search at all
    assert await bodies(memory, "") == []
    assert await bodies(memory, "cache", limit=0) == []


async def test_words_in_file_paths_match(memory: SqliteMemory) -> None:
    await memory.store(episode("Modified: src/auth/login.py"))
    assert await bodies(memory, "fix login.py") == ["Modified: src/auth/login.py"]
    assert await bodies(memory, "login") == ["Modified: src/auth/login.py"]
    assert await bodies(memory, "what changed in auth") == ["Modified: src/auth/login.py"]


async def test_porter_stemming_and_diacritics(memory: SqliteMemory) -> None:
    await memory.store(episode("Caching the résumé renderer"))
    assert await bodies(memory, "cached") == ["Caching the résumé renderer"]
    assert await bodies(memory, "resume") == ["Caching the résumé renderer"]


async def test_more_relevant_episode_ranks_first(memory: SqliteMemory) -> None:
    now = time.time()
    for i in range(20):  # background documents so the query words are rare (bm25 idf > 0)
        await memory.store(episode(f"filler episode number {i} about gardening", at=now))
    await memory.store(episode("login page colours tweaked", at=now))
    await memory.store(episode("login token refresh failed in auth middleware", at=now))
    found = await bodies(memory, "auth token refresh login")
    assert found == [
        "login token refresh failed in auth middleware",
        "login page colours tweaked",
    ]


async def test_more_recent_episode_ranks_first_when_equally_relevant(
    memory: SqliteMemory,
) -> None:
    now = time.time()
    await memory.store(episode("deploy script updated", uuid="new", at=now - 60))
    await memory.store(episode("deploy script updated", uuid="old", at=now - 30 * DAY))
    await memory.store(episode("deploy script updated", uuid="mid", at=now - 3 * DAY))
    recall = await memory.recall("proj", "deploy", 10)
    assert [e.uuid for e in recall.episodes] == ["new", "mid", "old"]


async def test_limit_caps_results(memory: SqliteMemory) -> None:
    for i in range(12):
        await memory.store(episode(f"logging change {i}"))
    assert len(await bodies(memory, "logging", limit=5)) == 5


NASTY_QUERIES = [
    'login" OR "x',
    '"login',
    "NEAR(login auth, 2)",
    "login*",
    "body:login",
    "name:login",
    "(login",
    "login)",
    "-login",
    "login AND",
    "OR login NOT",
    "^login",
    "login + auth",
    "{name body}: login",
    "login\x00",
    "'login'",
]


@pytest.mark.parametrize("query", NASTY_QUERIES)
async def test_fts_syntax_in_queries_is_plain_text(memory: SqliteMemory, query: str) -> None:
    await memory.store(episode("login handler rewritten"))
    assert await bodies(memory, query) == ["login handler rewritten"]


async def test_operator_words_are_searched_as_words(memory: SqliteMemory) -> None:
    await memory.store(episode("moved the NEAR cache into the edge node"))
    assert await bodies(memory, "NEAR") == ["moved the NEAR cache into the edge node"]
    assert fts_query('say "hi" NEAR me') == '"say" OR "hi" OR "near"'


def test_fts_query_quotes_dedupes_and_caps() -> None:
    assert fts_query("Login LOGIN login a I") == '"login"'
    query = fts_query(" ".join(f"word{i}" for i in range(100)))
    assert query is not None and query.count(" OR ") == 31
    assert fts_query("!!! ??? ...") is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text())
def test_fts_query_is_always_valid_fts5(text: str) -> None:
    query = fts_query(text)
    if query is None:
        return
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize='porter unicode61')")
    conn.execute("INSERT INTO t VALUES ('anything')")
    conn.execute("SELECT * FROM t WHERE t MATCH ?", (query,)).fetchall()  # must not raise
    conn.close()


def test_recall_never_raises_on_arbitrary_text(tmp_path: Path) -> None:
    with asyncio.Runner() as runner:
        memory = SqliteMemory(tmp_path / "memory.sqlite3")
        runner.run(memory.start())
        target = episode("login handler rewritten")
        runner.run(memory.store(target))
        runner.run(memory.store(episode('a tale of two cities, NEAR "quotes" (and) *stars*')))

        @settings(max_examples=300, deadline=None)
        @given(text=st.text())
        def check(text: str) -> None:
            recall = runner.run(memory.recall("proj", text, 5))
            assert all(e.group_id == "proj" for e in recall.episodes)
            # A real word placed first is always honoured, whatever follows it.
            recall = runner.run(memory.recall("proj", "login " + text, 5))
            assert target in recall.episodes

        try:
            check()
        finally:
            runner.run(memory.close())


async def test_groups_are_isolated(memory: SqliteMemory) -> None:
    a = episode("secret roadmap for project alpha", group="A")
    b = episode("secret roadmap for project beta", group="B")
    await memory.store(a)
    await memory.store(b)
    assert (await memory.recall("A", "secret roadmap project beta", 10)).episodes == [a]
    assert (await memory.recall("B", "secret roadmap project alpha", 10)).episodes == [b]
    assert (await memory.recall("C", "secret roadmap", 10)).episodes == []
    assert await export_all(memory, "A") == [[a]]
    assert await export_all(memory, "B") == [[b]]


async def test_store_is_idempotent_on_uuid(memory: SqliteMemory, tmp_path: Path) -> None:
    first = episode("flaky test quarantined", uuid="same")
    await memory.store(first)
    await memory.store(first)
    await asyncio.gather(*(memory.store(first) for _ in range(5)))
    assert await export_all(memory, "proj") == [[first]]
    assert (await memory.recall("proj", "flaky quarantined", 10)).episodes == [first]
    with sqlite3.connect(tmp_path / "data" / "memory.sqlite3") as conn:
        # The FTS index agrees exactly with the content table (no duplicate rows).
        conn.execute("INSERT INTO episodes_fts(episodes_fts) VALUES ('integrity-check')")
        hits = conn.execute("SELECT count(*) FROM episodes_fts WHERE episodes_fts MATCH 'flaky'")
        assert hits.fetchone()[0] == 1


async def test_export_is_complete_and_ordered_across_batches(memory: SqliteMemory) -> None:
    # Three episodes share each reference time, so batch boundaries fall inside ties.
    times = [1_700_000_000.0 + i // 3 for i in range(250)]
    random.Random(7).shuffle(times)
    stored = []
    for i, at in enumerate(times):
        stored.append(episode(f"episode {i}", uuid=f"u{i:03d}", at=at))
        await memory.store(stored[-1])
    await memory.store(episode("someone else's", group="other"))

    chunks = await export_all(memory, "proj", batch=100)
    assert [len(c) for c in chunks] == [100, 100, 50]
    exported = [e for chunk in chunks for e in chunk]
    # Reference time first, then insertion order among equal times.
    assert exported == sorted(stored, key=lambda e: e.reference_time)  # sort is stable
    assert len({e.uuid for e in exported}) == 250


async def test_export_exact_multiple_and_empty_group(memory: SqliteMemory) -> None:
    for i in range(20):
        await memory.store(episode(f"e{i}", at=float(i)))
    assert [len(c) for c in await export_all(memory, "proj", batch=10)] == [10, 10]
    assert await export_all(memory, "nobody", batch=10) == []


async def test_episode_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    stored = episode("remember the WAL checkpoint bug", metadata={"path": "src/db.py"})
    first = SqliteMemory(path)
    await first.start()
    await first.store(stored)
    await first.close()
    await first.close()  # idempotent

    second = SqliteMemory(path)
    await second.start()
    try:
        assert (await second.recall("proj", "checkpoint", 5)).episodes == [stored]
        assert await export_all(second, "proj") == [[stored]]
    finally:
        await second.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_concurrent_stores_are_group_committed(memory: SqliteMemory) -> None:
    stored = [episode(f"concurrent write {i}", uuid=f"c{i:03d}", at=float(i)) for i in range(200)]
    before = memory.transactions
    await asyncio.gather(*(memory.store(e) for e in stored))
    assert memory.transactions - before < 200
    exported = [e for chunk in await export_all(memory, "proj", batch=64) for e in chunk]
    assert exported == stored


async def test_reads_run_while_writes_are_in_flight(memory: SqliteMemory) -> None:
    await memory.store(episode("baseline search target"))
    writes = [memory.store(episode(f"background write {i}")) for i in range(100)]
    reads = [memory.recall("proj", "baseline target", 5) for _ in range(20)]
    _, recalls = await asyncio.gather(asyncio.gather(*writes), asyncio.gather(*reads))
    assert len(recalls) == 20
    assert all(r.episodes[0].body == "baseline search target" for r in recalls)


async def test_metadata_round_trips(memory: SqliteMemory) -> None:
    metadata: dict[str, Any] = {
        "path": "src/app.py",
        "tools": ["edit", "bash"],
        "nested": {"lines": [1, 2, 3], "ok": True, "none": None, "ratio": 0.5},
        "unicode": "naïve ✓",
    }
    stored = episode("metadata carrier", metadata=metadata)
    await memory.store(stored)
    (exported,) = (await export_all(memory, "proj"))[0]
    assert exported.metadata == metadata
    assert (await memory.recall("proj", "carrier", 1)).episodes[0].metadata == metadata


async def test_closed_or_unopenable_store_raises_memory_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(MemoryUnavailable):
        await SqliteMemory(blocker / "memory.sqlite3").start()

    memory = SqliteMemory(tmp_path / "memory.sqlite3")
    await memory.start()
    await memory.close()
    with pytest.raises(MemoryUnavailable):
        await memory.store(episode("too late"))
    with pytest.raises(MemoryUnavailable):
        await memory.recall("proj", "late", 5)


async def test_close_drains_pending_writes(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    memory = SqliteMemory(path)
    await memory.start()
    stores = [asyncio.ensure_future(memory.store(episode(f"pending {i}"))) for i in range(50)]
    await asyncio.sleep(0)  # every store is queued
    await memory.close()
    await asyncio.gather(*stores)  # all committed, none failed
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM episodes").fetchone()[0] == 50


async def test_a_failing_write_fails_alone_as_memory_unavailable(memory: SqliteMemory) -> None:
    good = [episode(f"good write {i}", uuid=f"g{i}", at=float(i)) for i in range(10)]
    bad = episode("bad write", at=float("nan"))  # SQLite stores NaN as NULL: NOT NULL fails
    results = await asyncio.gather(
        *(memory.store(e) for e in good[:5]),
        memory.store(bad),
        *(memory.store(e) for e in good[5:]),
        return_exceptions=True,
    )
    assert [r for r in results if r is not True] == [results[5]]
    assert isinstance(results[5], MemoryUnavailable)
    assert isinstance(results[5].__cause__, sqlite3.IntegrityError)
    assert await export_all(memory, "proj") == [good]


async def test_a_store_of_schema_1_is_migrated_in_place_and_still_recalled(tmp_path: Path) -> None:
    """Schema 1 held the episodes table alone; opening it adds the task model."""
    from bridge.memory.sqlite import EPISODE_SCHEMA, INSERT, _execute_script

    path = tmp_path / "memory.sqlite3"
    old = [
        episode("Modified: src/legacy.py", metadata={"type": "file_edit", "path": "src/legacy.py"}),
        episode("Error: legacy importer crashed", metadata={"type": "error"}),
    ]
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute("BEGIN")
        _execute_script(conn, EPISODE_SCHEMA)
        for e in old:
            conn.execute(INSERT, (*msgspec.structs.astuple(e)[:-1], json.dumps(e.metadata)))
        conn.execute("PRAGMA user_version = 1")
        conn.execute("COMMIT")
    store = SqliteMemory(path)
    await store.start()
    try:
        found = await store.candidates("proj", "legacy importer")
        assert {t.uuid for t in found.tasks} == {e.uuid for e in old}  # each its own task
        assert any(t.errors == ["legacy importer crashed"] for t in found.tasks)
        assert "src/legacy.py" in found.files
        assert await export_all(store, "proj") == [old]
        await store.store(
            episode("Modified: src/new.py", metadata={"type": "file_edit", "path": "src/new.py"})
        )
        assert [r.files for r in (await store.candidates("proj", "new")).recent][-1] == [
            "src/new.py"
        ]
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4


async def test_a_store_of_schema_2_drops_its_full_text_tables_and_is_still_recalled(
    tmp_path: Path,
) -> None:
    """Schema 2 kept full-text indexes of tasks and files in the store; the recall index
    in memory replaced them: opening such a store drops them and recalls as before."""
    path = tmp_path / "memory.sqlite3"
    store = SqliteMemory(path)
    await store.start()
    try:
        meta = {"type": "file_edit", "path": "src/cache.py", "task": "t1", "task_query": "cache"}
        await store.store(episode("Modified: src/cache.py", metadata=meta))
    finally:
        await store.close()
    with sqlite3.connect(path, isolation_level=None) as conn:  # as release 2 left it
        conn.execute("CREATE VIRTUAL TABLE tasks_fts USING fts5(text)")
        conn.execute("CREATE VIRTUAL TABLE files_fts USING fts5(text)")
        conn.execute("CREATE TABLE files (id INTEGER PRIMARY KEY, doc INTEGER)")
        conn.execute("PRAGMA user_version = 2")
    store = SqliteMemory(path)
    await store.start()
    try:
        found = await store.candidates("proj", "cache")
        assert [t.files for t in found.tasks] == [["src/cache.py"]]
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        assert not tables & {"tasks_fts", "files_fts", "files"}
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4


async def test_a_write_is_recalled_at_once_once_the_project_is_loaded(tmp_path: Path) -> None:
    """The recall index is brought up to each commit before the store returns."""
    store = SqliteMemory(tmp_path / "memory.sqlite3")
    await store.start()
    try:
        assert (await store.candidates("proj", "anything")).empty  # loads the empty project
        for n in range(5):
            meta = {
                "type": "file_edit",
                "path": f"src/m{n}.py",
                "task": f"t{n}",
                "task_query": f"topic{n}",
            }
            await store.store(episode(f"Modified: src/m{n}.py", metadata=meta))
            found = await store.candidates("proj", f"topic{n}")
            assert [t.files for t in found.tasks] == [[f"src/m{n}.py"]]
            assert found.latest_seq == n + 1
    finally:
        await store.close()


async def test_the_most_recent_projects_are_loaded_into_the_recall_index_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a restart the first chat of a recently active project finds its index ready."""
    path = tmp_path / "memory.sqlite3"
    store = SqliteMemory(path)
    await store.start()
    try:
        for project in ("old", "recent"):
            meta = {"type": "file_edit", "path": "a.py", "task": f"t-{project}", "task_query": "x"}
            await store.store(episode("Modified: a.py", metadata=meta, group=project))
    finally:
        await store.close()
    store = SqliteMemory(path)
    store.index.projects = 1  # room for one project: the one with the newest task
    caplog.set_level(logging.INFO, logger="bridge.memory.sqlite")
    await store.start()
    try:
        await asyncio.wait_for(store._preload, 30)  # type: ignore[arg-type]
        assert store.index.wants("recent") and not store.index.wants("old")
        assert "recall index: 1 projects loaded from the store in" in caplog.text
    finally:
        await store.close()


WRITER = """
import asyncio, sys, uuid
from pathlib import Path
from bridge.episode import new_episode
from bridge.memory.sqlite import SqliteMemory

async def main() -> None:
    store = SqliteMemory(Path(sys.argv[1]))
    await store.start()
    n = 0
    while True:  # until killed
        task = {"task": uuid.uuid4().hex, "task_query": f"task {n} about module{n % 7}"}
        episodes = [
            new_episode("proj", "w", f"Modified: src/m{(n + k) % 9}.py", "t",
                        {"type": "file_edit", "path": f"src/m{(n + k) % 9}.py", **task})
            for k in range(3)
        ] + [new_episode("proj", "c", f"Completed: task {n}", "t", {"type": "success", **task})]
        await asyncio.gather(*(store.store(e) for e in episodes))
        print(n, flush=True)
        n += 1

asyncio.run(main())
"""


async def test_a_killed_writer_leaves_tasks_and_indexes_consistent(tmp_path: Path) -> None:
    """The task tables and the episodes' full-text index are written in the episode's
    transaction: after a SIGKILL at any moment they agree with the episodes, FTS5 finds no
    fault, and the recall index, rebuilt from the store, holds every committed task."""
    path = tmp_path / "memory.sqlite3"
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(path), stdout=asyncio.subprocess.PIPE
    )
    assert writer.stdout is not None
    for _ in range(200):  # let it commit a good number of tasks, then kill it mid-stream
        await asyncio.wait_for(writer.stdout.readline(), 30)
    writer.kill()
    await writer.wait()

    store = SqliteMemory(path)
    await store.start()
    try:
        found = await store.candidates("proj", "module3")
        assert found.tasks and all(len(t.files) == 3 for t in found.tasks)
        recent = {r.seq: r.files for r in found.recent}
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO episodes_fts(episodes_fts) VALUES ('integrity-check')")
        tasks = conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
        assert tasks >= 200
        stored = conn.execute("SELECT seq, id FROM tasks ORDER BY seq").fetchall()
        files_of = "SELECT path FROM task_files WHERE task_id = ? ORDER BY id"
        assert recent == {
            seq: [p for (p,) in conn.execute(files_of, (task_id,))]
            for seq, task_id in stored[-WINDOW_TASKS:]
        }
        linked = conn.execute("SELECT COUNT(*) FROM task_files").fetchone()[0]
        written = "SELECT COUNT(*) FROM episodes WHERE json_extract(metadata, '$.type') = ?"
        assert linked == conn.execute(written, ("file_edit",)).fetchone()[0]
        done = conn.execute("SELECT COUNT(*) FROM tasks WHERE outcome = 'completed'").fetchone()[0]
        assert done == conn.execute(written, ("success",)).fetchone()[0]


async def test_an_export_imported_elsewhere_rebuilds_the_same_tasks(tmp_path: Path) -> None:
    from bridge.memory.jsonl import export_jsonl, import_jsonl

    first = SqliteMemory(tmp_path / "a.sqlite3")
    second = SqliteMemory(tmp_path / "b.sqlite3")
    await first.start()
    await second.start()
    try:
        for n in range(12):
            task = {"task": f"t{n}", "task_query": f"fix the parser case {n}"}
            for path in (f"src/p{n % 3}.py", "tests/test_parser.py"):
                meta = {"type": "file_edit", "path": path, **task}
                await first.store(episode(f"Modified: {path}", metadata=meta, at=1e9 + n))
            await first.store(episode("Error: boom", metadata={"type": "error", **task}))
        out = io.BytesIO()
        await export_jsonl(first, "proj", out)
        await import_jsonl(second, out.getvalue().splitlines())
        before = await first.candidates("proj", "parser case")
        after = await second.candidates("proj", "parser case")
        assert after == before
    finally:
        await first.close()
        await second.close()
