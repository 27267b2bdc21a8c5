"""The embedded memory store: SQLite in WAL mode, with an in-memory recall index.

Writes go through one writer thread that commits in groups: every ``store`` queued while a
transaction commits joins the next one, so many episodes share one fsync. Each ``store``
returns only after its transaction committed (``synchronous=FULL``), so it is durable.
Reads run on a small pool of read-only connections, concurrently with writes (WAL).

Episodes are also folded into tasks (see ``sqlite_tasks``) in the transaction that stores
them, so the task model is exactly as durable as the episodes. ``chat:start`` recalls
from the recall index (``bridge.memory.index``): loaded from the task tables on a
project's first query (and for the most recent projects at start), and brought up to each
commit before the commit's episodes are acknowledged. Other processes may share the file
(``serve --workers N``): before a query the index catches up with their commits, see
``sqlite_changes``. ``query`` searches the episodes'
FTS5 index; user text never reaches FTS5 query syntax: recall extracts words and quotes
each one, so ``"``, ``NEAR``, ``*``, ``AND`` and the like are searched as plain words.

A store written by an older release is migrated in place when it is opened (``PRAGMA
user_version`` is the schema version).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import queue
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from bridge.background import Flights, cancel_and_wait
from bridge.episode import Episode
from bridge.errors import MemoryUnavailable
from bridge.memory import sqlite_changes, sqlite_tasks
from bridge.memory.base import PROJECTS_LISTED, Recall, Selector
from bridge.memory.index import RecallIndexes
from bridge.memory.recall import HORIZON_TASKS, Candidates, TaskHit
from bridge.memory.sqlite_changes import Follower

SCHEMA_VERSION = 4

log = logging.getLogger(__name__)

# The projects with the newest tasks, newest first (a task's id grows with time).
RECENT_PROJECTS = """SELECT group_id FROM tasks GROUP BY group_id ORDER BY MAX(id) DESC LIMIT ?"""
READERS = 3
WAL_SWITCH_S = 5.0  # seconds to keep trying to switch a store to WAL (its busy timeout)
MAX_QUERY_WORDS = 32
CANDIDATES_PER_RESULT = 4
RECENCY_WEIGHT = 0.3  # share of the final score given to recency; the rest is relevance
_STOPWORDS = (
    "a an and are as at be but by can do does for from has have how i if in into is it its "
    "me my no not of on or our so than that the their them then there these this to was we "
    "were what when where which who why will with you your"
)
STOPWORDS = frozenset(_STOPWORDS.split())
WORD = re.compile(r"\w+")

# ``id`` aliases the rowid so FTS5's external-content rowids survive VACUUM; ``uuid`` is the
# unique key that makes ``store`` idempotent.
EPISODE_SCHEMA = """
CREATE TABLE episodes (
    id INTEGER PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    group_id TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    source_description TEXT NOT NULL,
    reference_time REAL NOT NULL,
    metadata TEXT NOT NULL
);
CREATE INDEX episodes_group_time ON episodes (group_id, reference_time, id);
CREATE VIRTUAL TABLE episodes_fts USING fts5(
    name, body, content='episodes', content_rowid='id',
    tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER episodes_ai AFTER INSERT ON episodes BEGIN
    INSERT INTO episodes_fts(rowid, name, body) VALUES (new.id, new.name, new.body);
END;
CREATE TRIGGER episodes_ad AFTER DELETE ON episodes BEGIN
    INSERT INTO episodes_fts(episodes_fts, rowid, name, body)
    VALUES ('delete', old.id, old.name, old.body);
END;
"""
FIELDS = Episode.__struct_fields__  # the episodes columns after id, in the same order
COLUMNS = ", ".join(f"e.{field}" for field in FIELDS)
# Like INSERT OR IGNORE for a known uuid, but other constraint failures still raise.
INSERT = "INSERT INTO episodes VALUES (NULL, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (uuid) DO NOTHING"
SEARCH = f"""SELECT {COLUMNS}, bm25(episodes_fts) FROM episodes_fts
JOIN episodes e ON e.id = episodes_fts.rowid
WHERE episodes_fts MATCH ? AND e.group_id = ? ORDER BY bm25(episodes_fts) LIMIT ?"""
PAGE = f"""SELECT {COLUMNS}, e.id FROM episodes e
WHERE e.group_id = ? AND (e.reference_time, e.id) > (?, ?)
ORDER BY e.reference_time, e.id LIMIT ?"""

T = TypeVar("T")
Pending = tuple[Episode, tuple[Any, ...], asyncio.Future[bool]]


@dataclasses.dataclass(frozen=True)
class Forgetting:
    """A forget queued for the writer: it runs alone, in queue order with the stores."""

    group_id: str
    selector: Selector
    done: asyncio.Future[int]


Write = Pending | Forgetting

_encode = msgspec.json.Encoder().encode
_decode_metadata = msgspec.json.Decoder(dict[str, Any]).decode


def fts_query(text: str) -> str | None:
    """The FTS5 query for free text: its meaningful words, each quoted, joined with OR.

    None when no meaningful word is left (nothing can match).
    """
    words = [w for w in WORD.findall(text.lower()) if len(w) > 1 and w not in STOPWORDS]
    unique = list(dict.fromkeys(words))[:MAX_QUERY_WORDS]
    if not unique:
        return None
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in unique)


def _episode(row: tuple[Any, ...]) -> Episode:
    """An episode from a row starting with the COLUMNS."""
    fields = dict(zip(FIELDS[:-1], row, strict=False))
    return Episode(**fields, metadata=_decode_metadata(row[len(FIELDS) - 1]))


class SqliteMemory:
    """The embedded default MemoryBackend: one SQLite file per bridge, all groups in it."""

    name = "sqlite"

    def __init__(self, path: Path, *, half_life_days: float = 7.0, shared: bool = False) -> None:
        self.path = path
        # Other processes write to the same file (serve --workers): before a query, look
        # whether they committed since. A process alone (the data folder's lock keeps
        # others out) skips that look.
        self.shared = shared
        self.half_life_s = half_life_days * 86400.0
        self.transactions = 0  # write transactions committed (to observe group commit)
        self._queue: queue.Queue[Write | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._readers: concurrent.futures.ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._open = False
        self.index = RecallIndexes()
        self.follower = Follower(self.index)
        self._peek: sqlite3.Connection | None = None  # reads the counters on the event loop
        self._loads = Flights[str, None]()
        self._preload: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Create the file and schema if needed, start the writer thread and reader pool."""
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._writer = threading.Thread(
            target=self._write_loop, args=(ready,), name="sqlite-writer", daemon=True
        )
        self._writer.start()
        try:
            await asyncio.wrap_future(ready)
        except (OSError, sqlite3.Error) as e:
            raise MemoryUnavailable(f"cannot open {self.path}: {e}") from e
        try:
            self._peek = self._connect_read_only()
            self.follower.start(self._peek)
        except sqlite3.Error as e:
            self._queue.put(None)  # the writer thread ends
            raise MemoryUnavailable(f"cannot read {self.path}: {e}") from e
        self._readers = concurrent.futures.ThreadPoolExecutor(READERS, "sqlite-reader")
        self._open = True
        self._preload = asyncio.create_task(self._load_recent_projects(), name="recall-preload")

    async def _load_recent_projects(self) -> None:
        """Load the recall index of the most recently active projects, so the first chat
        after a start does not wait for it; the time it took is logged."""
        started = time.perf_counter()
        try:
            groups = await self._read(RECENT_PROJECTS, (self.index.projects,))
            for (group_id,) in groups:
                await self._load(group_id)
        except MemoryUnavailable as e:
            log.warning("recall index: preloading stopped: %s", e)
            return
        log.info(
            "recall index: %d projects loaded from the store in %.2f s",
            len(groups),
            time.perf_counter() - started,
        )

    async def close(self) -> None:
        """Commit every queued write, then stop the threads and close all connections."""
        if not self._open:
            return
        self._open = False
        await cancel_and_wait(self._preload)
        await self._loads.wait()
        self._queue.put(None)  # after every queued write: they drain first
        assert self._readers is not None and self._writer is not None
        await asyncio.to_thread(self._readers.shutdown)
        for conn in self._reader_conns:
            conn.close()
        if self._peek is not None:
            self._peek.close()
        await asyncio.to_thread(self._writer.join)  # the writer closes last: it checkpoints

    async def store(self, episode: Episode) -> bool:
        """Queue the episode for the next group commit; return once it is committed.

        True when it was stored, False when an episode with its uuid already was.
        """
        if not self._open:
            raise MemoryUnavailable("sqlite memory is not open")
        *fields, metadata = msgspec.structs.astuple(episode)
        try:
            row = (*fields, _encode(metadata).decode())
        except (msgspec.EncodeError, TypeError) as e:
            raise MemoryUnavailable(f"cannot encode metadata: {e}") from e
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put((episode, row, done))
        return await done

    async def forget(self, group_id: str, selector: Selector) -> int:
        """Forget what ``selector`` names (see ``sqlite_tasks.forget``) in one transaction on
        the writer thread; the project's recall index is dropped after the commit, before
        this returns, and (if it was loaded) loaded again at once, in the background."""
        if not self._open:
            raise MemoryUnavailable("sqlite memory is not open")
        loaded = self.index.wants(group_id)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.put(Forgetting(group_id, selector, done))
        forgotten = await done
        if loaded:
            self._start_load(group_id)  # the next chat need not wait for all of it
        return forgotten

    async def newest_tasks(
        self, group_id: str, limit: int, before_seq: int | None = None
    ) -> list[TaskHit]:
        """The project's tasks newest first, from the task tables."""
        return await self._run(
            lambda conn: sqlite_tasks.newest_tasks(conn, group_id, limit, before_seq)
        )

    async def projects(self) -> list[str]:
        """The projects holding tasks, most recently active first."""
        return [group_id for (group_id,) in await self._read(RECENT_PROJECTS, (PROJECTS_LISTED,))]

    async def recall(self, group_id: str, query: str, limit: int) -> Recall:
        """Episodes of ``group_id`` sharing any meaningful word with ``query``, best first.

        The best ``4 * limit`` by bm25 are re-ranked by relevance and recency together, so a
        fresh episode beats an equally relevant old one.
        """
        match = fts_query(query)
        if match is None or limit < 1:
            return Recall(episodes=[])
        rows = await self._read(SEARCH, (match, group_id, limit * CANDIDATES_PER_RESULT))
        if not rows:
            return Recall(episodes=[])
        best = max(-row[7] for row in rows) or 1.0  # bm25 is negative: lower is better
        now = time.time()

        def score(row: tuple[Any, ...]) -> float:
            age = max(0.0, now - row[5])
            recency = math.pow(0.5, age / self.half_life_s) if self.half_life_s > 0 else 0.0
            return (1 - RECENCY_WEIGHT) * float(-row[7] / best) + RECENCY_WEIGHT * recency

        rows.sort(key=score, reverse=True)
        return Recall(episodes=[_episode(row) for row in rows[:limit]])

    async def candidates(self, group_id: str, query: str) -> Candidates:
        """Past tasks and files of ``group_id`` matching ``query``, and its recent work,
        from the recall index (loaded from the store on the project's first query)."""
        if not self._open:
            raise MemoryUnavailable("sqlite memory is not open")
        if self.shared and self._behind():
            await self._run(self.follower.follow)
        while (found := self.index.candidates(group_id, query)) is None:
            await self._load(group_id)
        return found

    def _behind(self) -> bool:
        """Whether other processes committed since the index last caught up: one read of
        the counters, on the event loop (a few microseconds; a WAL reader never waits for
        the writer)."""
        assert self._peek is not None
        try:
            return self.follower.behind(sqlite_changes.read_counters(self._peek))
        except sqlite3.Error:
            return True  # the catch-up on a reader thread says what is wrong

    async def _load(self, group_id: str) -> None:
        """Load a project's last tasks into the recall index, once for concurrent callers
        (a caller that gives up does not stop the load for the others)."""
        await asyncio.shield(self._start_load(group_id))

    def _start_load(self, group_id: str) -> asyncio.Task[None]:
        """The project's load under way, started if there is none (its callers, if any
        are left, have its failure raised)."""
        return self._loads.join(group_id, lambda: self._read_project(group_id), name="recall-load")

    async def _read_project(self, group_id: str) -> None:
        self.index.begin_load(group_id)
        try:
            states = await self._run(
                lambda conn: sqlite_tasks.last_task_states(conn, group_id, HORIZON_TASKS)
            )
        except BaseException:
            self.index.abandon_load(group_id)
            raise
        tasks, changed = [s.task for s in states], [s.changed for s in states]
        # Once begun, finishing is the thread's: it ends the load even if this is cancelled.
        await asyncio.to_thread(self.index.finish_load, group_id, tasks, changed)

    async def export(self, group_id: str, batch: int) -> AsyncIterator[list[Episode]]:
        """Yield every episode of ``group_id`` by (reference_time, insertion), ``batch`` at a
        time, one keyset-paginated query per batch so memory use stays bounded."""
        after: tuple[float, int] = (-math.inf, 0)
        size = max(1, batch)
        while True:
            rows = await self._read(PAGE, (group_id, *after, size))
            if rows:
                yield [_episode(row) for row in rows]
            if len(rows) < size:
                return
            after = (rows[-1][5], rows[-1][7])

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run a query on a reader thread's connection, translating sqlite errors."""
        return await self._run(lambda conn: conn.execute(sql, params).fetchall())

    async def _run(self, read: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``read`` on a reader thread's connection, translating sqlite errors."""
        if not self._open or self._readers is None:
            raise MemoryUnavailable("sqlite memory is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._readers, lambda: read(self._reader()))
        except sqlite3.Error as e:
            raise MemoryUnavailable(f"sqlite read failed: {e}") from e

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect_read_only()
            self._local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    def _write_loop(self, ready: concurrent.futures.Future[None]) -> None:
        """The writer thread: open the database, then commit queued episodes in groups."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except BaseException as e:
            ready.set_exception(e)
            return
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            _use_wal(conn)
            conn.execute("PRAGMA synchronous = FULL")
            _migrate(conn)
            ready.set_result(None)
            while True:
                group = [self._queue.get()]
                with contextlib.suppress(queue.Empty):  # all queued meanwhile joins this commit
                    while group[-1] is not None:
                        group.append(self._queue.get_nowait())
                stores: list[Pending] = []
                for item in group:  # stores commit in groups, each forget alone, in order
                    if isinstance(item, Forgetting):
                        if stores:
                            self._commit(conn, stores)
                        stores = []
                        self._forget(conn, item)
                    elif item is not None:
                        stores.append(item)
                if stores:
                    self._commit(conn, stores)
                if group[-1] is None:  # close() was called: everything before it is committed
                    return
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e)
            raise
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, group: list[Pending]) -> None:
        """Insert a group of episodes in one transaction and resolve their futures.

        If the group fails, each episode is retried alone so one bad row fails only itself.
        """
        error: MemoryUnavailable | None = None
        stored: list[bool] = []
        changed: dict[int, str] = {}  # task id -> project
        change = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            for episode, row, _ in group:
                stored.append(conn.execute(INSERT, row).rowcount == 1)
                if stored[-1]:
                    changed[sqlite_tasks.link(conn, episode)] = episode.group_id
            if changed:
                change = sqlite_changes.bump(conn, "changes")
                sqlite_changes.mark(conn, list(changed), change)
            conn.execute("COMMIT")
            self.transactions += 1
        except Exception as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if len(group) > 1:
                for item in group:
                    self._commit(conn, [item])
                return
            error = MemoryUnavailable(f"sqlite write failed: {e}")
            error.__cause__ = e
        if changed:
            self.follower.committed(conn, change, changed)
        for (_, _, done), new in zip(group, stored or [False] * len(group), strict=True):
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                done.get_loop().call_soon_threadsafe(_settle, done, error or new)

    def _forget(self, conn: sqlite3.Connection, forgetting: Forgetting) -> None:
        """Run one forget in its own transaction, drop the project's recall index once it
        committed, and resolve its future."""
        outcome: BaseException | int
        kind, value = forgetting.selector.kind, forgetting.selector.value
        try:
            conn.execute("BEGIN IMMEDIATE")
            outcome = sqlite_tasks.forget(conn, forgetting.group_id, kind, value)
            number = sqlite_changes.bump(conn, "forgets")
            conn.execute("COMMIT")
            self.transactions += 1
        except Exception as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            outcome = MemoryUnavailable(f"sqlite forget failed: {e}")
            outcome.__cause__ = e
        else:
            self.follower.forgot(forgetting.group_id, number)
        done = forgetting.done
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            done.get_loop().call_soon_threadsafe(_settle, done, outcome)


def _settle(done: asyncio.Future[T], outcome: BaseException | T) -> None:
    if done.done():  # the storing task was cancelled
        return
    if isinstance(outcome, BaseException):
        done.set_exception(outcome)
    else:
        done.set_result(outcome)


def _use_wal(conn: sqlite3.Connection) -> None:
    """Put the store in WAL mode, which stays with the file. Switching needs the file to
    itself, and when two connections try at once SQLite refuses one at once (no busy
    wait, which could deadlock): it tries again until the switch, its own or the other's,
    is done, for as long as the busy timeout would have waited."""
    deadline = time.monotonic() + WAL_SWITCH_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def prepare(path: Path) -> None:
    """Create the store at ``path``, or migrate it, and close it again: a process that
    starts several others on one store does this first, so none of them waits for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        _use_wal(conn)
        _migrate(conn)
    finally:
        conn.close()


def _migrate(conn: sqlite3.Connection) -> None:
    """Create the schema, or bring an older one up to SCHEMA_VERSION, in one transaction.

    Version 1 held episodes only: version 2 adds the task model, and every stored episode
    is folded into it in insertion order (an episode of version 1 is a task of its own).
    Version 3 dropped version 2's full-text tables; version 4 numbers the store's changes
    (``sqlite_changes``): tasks stored before count as change 0.
    """
    conn.execute("BEGIN IMMEDIATE")  # two processes starting at once: the second waits
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            _execute_script(conn, EPISODE_SCHEMA)
        elif version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"schema version {version} is newer than this release's {SCHEMA_VERSION}"
            )
        if version < 2:
            _execute_script(conn, sqlite_tasks.TASK_SCHEMA)
            rows = conn.execute(f"SELECT {COLUMNS} FROM episodes e ORDER BY e.id")
            for row in rows.fetchall():
                sqlite_tasks.link(conn, _episode(row))
        else:
            if version < 3:
                for table in sqlite_tasks.DROPPED_IN_3:
                    conn.execute(f"DROP TABLE IF EXISTS {table}")
            if version < 4:
                sqlite_tasks.add_changed_column(conn)
        if version < 4:
            _execute_script(conn, sqlite_changes.COUNTERS_SCHEMA)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _execute_script(conn: sqlite3.Connection, script: str) -> None:
    """Run each statement of ``script`` inside the open transaction (``executescript``
    would commit it first)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            conn.execute(statement)
            statement = ""
