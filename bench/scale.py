"""Scale benchmark: ``python -m bench scale``.

Does a chat:start miss stay fast as memory grows? This loads a realistic mix of tasks
into one project of a real bridge, per backend, and at each store size (1k, 10k, 100k
episodes by default; ``--sizes 1000,10000,100000,1000000`` adds 1M) pauses to measure:

- the ingest rate since the previous size (episodes/s stored in memory, pipelined over one
  WebSocket with a bounded window of requests in flight: the load ends once every
  episode is acknowledged and the bridge's outbox, where an acknowledged episode waits when
  memory is slow to take it, is empty);
- chat:start cache misses: distinct queries asked one at a time, each a real commit subject
  plus a word of its own so it never hits the cache; p50/p99 of the client's round trip
  and of the reply's ``elapsed_us``, and the share answered ``inject: null`` (the memory
  query did not finish within the bridge's miss budget);
- the disk use of the data dir, and the resident memory (VmRSS) of the bridge and of its
  valkey-server and FalkorDB children, read from /proc.

The load is incremental: one bridge keeps loading into the same store, so one run builds
every size. The store is kept (``--store-dir``) and reused by the next run: sizes it has
already passed are skipped, except the largest of them, which is measured on the store as
it is, so a rerun measures without reloading; loading resumes where it stopped.

**The workload** (``Workload``, pure and deterministic for a seed): the usable commits of
the histories in ``../shared/data/*.jsonl``, merged in time order, are the tasks of the
first cycle; later cycles repeat them with every path under ``pkgN/`` and the subject
naming the package, so there is no limit to the number of tasks. One task (session = its
id) is a ``chat:start`` with the subject, 1 to 6 ``file:write`` (the first ones from the
commit's own files, the rest drawn from the cycle's project tree with a Zipf popularity,
so a few files are hot), sometimes an ``error`` with a traceback naming one of the task's
files, and a ``completion`` with the subject and the commit body as the summary. An
episode is what memory stores: a file:write, an error or a completion (a chat:start stores
nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import logging
import os
import random
import re
import shutil
import sqlite3
import sys
import time
import uuid
from bisect import bisect_left
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from websockets.asyncio.client import ClientConnection, connect

from bench.process import DECODER, ENCODER, BenchError, Reply, RunningBridge, serve
from bench.recall import (
    DATA,
    REPO,
    Commit,
    load_history,
    machine,
    percentile,
    revision,
    run_loop,
    statsd_sink,
    usable,
)
from bridge.memory.recall import HORIZON_TASKS

log = logging.getLogger("bench.scale")

GENERATOR: Final = 1  # bump when the workload changes: a kept store of another one is refused
DEFAULT_SIZES: Final = (1_000, 10_000, 100_000)
BACKENDS: Final = ("sqlite", "graphiti")
PROJECT: Final = "scale"
PROBE_SESSION: Final = "scale-probe"
DEFAULT_OUT: Final = REPO / "docs"
DEFAULT_STORE: Final = REPO / "bench" / "results" / "scale-store"
META: Final = "scale-store.json"
# Messages in flight while loading.
WINDOW: Final = {"sqlite": 64, "graphiti": 64}
OUTBOX: Final = "outbox.sqlite3"  # the bridge's outbox in its data dir (bridge.config)
DRAIN_POLL: Final = 0.05  # seconds between two looks at the outbox

WRITES: Final = (1, 2, 3, 4, 5, 6)  # file:writes per task ...
WRITE_WEIGHTS: Final = (30, 25, 18, 12, 9, 6)  # ... and how often each count occurs
ZIPF_S: Final = 1.1  # popularity of the tree's file of rank r: 1 / r**ZIPF_S
ERROR_SHARE: Final = 0.2  # tasks that hit an error
NO_SUMMARY_SHARE: Final = 0.1  # completions without a summary (a client that cannot read it)
SUMMARY_CHARS: Final = 1_000
BASE_AT: Final = 1_600_000_000.0  # when the first task happened ...
TASK_SECONDS: Final = 60.0  # ... and the time between tasks
EXCEPTIONS: Final = (
    "TypeError",
    "ValueError",
    "KeyError",
    "AttributeError",
    "AssertionError",
    "RuntimeError",
    "ConnectionError",
    "TimeoutError",
)
SUBJECT_FORMS: Final = ("{s}", "{s} in {p}", "{p}: {s}", "{s} ({p})")
IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")


# -- the workload -------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One generated task: what the agent was asked, the files it wrote, an error it may
    have hit, and how it ended."""

    index: int
    id: str  # also the session of its messages
    query: str
    files: tuple[str, ...]
    error: str | None
    summary: str | None
    at: float

    @property
    def episodes(self) -> int:
        """How many episodes the task stores: its writes, its error, its completion."""
        return len(self.files) + (self.error is not None) + 1

    def messages(self, project: str = PROJECT) -> list[dict[str, Any]]:
        """The task's messages in the order a client sends them (without ``id``):
        chat:start, the file:writes, the error if any, the completion. Stored events carry
        an ``episode_id``, so sending a task again stores nothing twice."""
        base = {"project": project, "session": self.id}
        found: list[dict[str, Any]] = [{"type": "chat:start", "query": self.query, **base}]
        for n, path in enumerate(self.files):
            found.append(
                {
                    "type": "file:write",
                    "path": path,
                    "episode_id": f"{self.id}:w{n}",
                    "at": self.at + n + 1,
                    **base,
                }
            )
        end = self.at + len(self.files) + 2
        if self.error is not None:
            found.append(
                {
                    "type": "error",
                    "message": self.error,
                    "episode_id": f"{self.id}:e",
                    "at": end,
                    **base,
                }
            )
        found.append(
            {
                "type": "completion",
                "task": self.query,
                "summary": self.summary,
                "episode_id": f"{self.id}:done",
                "at": end + 1,
                **base,
            }
        )
        return found


def history_paths(folder: Path = DATA) -> list[Path]:
    """The history files of a folder (``*.jsonl``), sorted by name."""
    return sorted(folder.glob("*.jsonl"))


def load_commits(paths: Sequence[Path]) -> list[Commit]:
    """The usable commits (``bench.recall.usable``) of the histories, merged in time order
    (commits without a time keep their place after the one before them)."""
    merged: list[tuple[float, int, int, Commit]] = []
    for h, path in enumerate(paths):
        last = 0.0
        for i, commit in enumerate(load_history(path)):
            last = commit.at if commit.at is not None else last
            if usable(commit):
                merged.append((last, h, i, commit))
    merged.sort(key=lambda item: item[:3])
    return [item[3] for item in merged]


def ranked_tree(commits: Sequence[Commit]) -> list[str]:
    """Every path the commits touch, most often touched first (ties by name): the project
    tree, in the order of its Zipf popularity."""
    counts = Counter(f for c in commits for f in c.files)
    return sorted(counts, key=lambda f: (-counts[f], f))


def zipf_cumulative(n: int, s: float = ZIPF_S) -> list[float]:
    """Cumulative weights of ranks 1..n with weight 1 / rank**s."""
    return list(itertools.accumulate(1.0 / (r**s) for r in range(1, n + 1)))


def cycle_prefix(cycle: int) -> str:
    """Where a cycle's copy of the project lives: ``""`` for the first, then ``pkgN/``."""
    return f"pkg{cycle}/" if cycle else ""


def traceback_text(rng: random.Random, path: str, subject: str) -> str:
    """An error message like a Python traceback's last lines, naming ``path``."""
    names = IDENTIFIER.findall(subject) or ["handler"]
    func = rng.choice(names).lower()
    exc = rng.choice(EXCEPTIONS)
    line = rng.randint(5, 900)
    return (
        f"{exc}: {subject[:120]}\n"
        "Traceback (most recent call last):\n"
        f'  File "{path}", line {line}, in {func}\n'
        f"    result = {func}(*args, **kwargs)\n"
        f"{exc}: unexpected value in {func}"
    )


class Workload:
    """The tasks of a scale run, each a pure function of (commits, seed, index)."""

    def __init__(self, commits: Sequence[Commit], seed: int = 0, zipf_s: float = ZIPF_S) -> None:
        if not commits:
            raise ValueError("the workload needs at least one usable commit")
        self.commits = list(commits)
        self.seed = seed
        self.tree = ranked_tree(self.commits)
        self.cumulative = zipf_cumulative(len(self.tree), zipf_s)

    def zipf_path(self, rng: random.Random) -> str:
        """One path of the tree, drawn with Zipf popularity (rank 1 the most likely)."""
        x = rng.random() * self.cumulative[-1]
        return self.tree[min(bisect_left(self.cumulative, x), len(self.tree) - 1)]

    def task(self, index: int) -> Task:
        """Task ``index`` (0-based): commit ``index mod n`` of cycle ``index div n``."""
        cycle, k = divmod(index, len(self.commits))
        commit = self.commits[k]
        rng = random.Random(f"scale/{self.seed}/{index}")
        prefix = cycle_prefix(cycle)
        count = rng.choices(WRITES, WRITE_WEIGHTS)[0]
        own = list(commit.files[: max(1, count // 2)])
        chosen = dict.fromkeys(own)
        for _ in range(8 * count):
            if len(chosen) >= count:
                break
            chosen.setdefault(self.zipf_path(rng), None)
        files = tuple(prefix + f for f in chosen)
        subject = commit.subject.strip()
        if cycle:
            subject = rng.choice(SUBJECT_FORMS).format(s=subject, p=prefix.rstrip("/"))
        error = (
            traceback_text(rng, rng.choice(files), subject) if rng.random() < ERROR_SHARE else None
        )
        body = commit.body.strip()
        summary = None if rng.random() < NO_SUMMARY_SHARE else (body or subject)[:SUMMARY_CHARS]
        return Task(
            index=index,
            id=f"t{index:07d}",
            query=subject,
            files=files,
            error=error,
            summary=summary,
            at=BASE_AT + index * TASK_SECONDS,
        )

    def tasks(self, start: int = 0) -> Iterator[Task]:
        """Tasks ``start``, ``start + 1``, … without end."""
        return (self.task(i) for i in itertools.count(start))

    def miss_queries(self, count: int, tasks_loaded: int, salt: str) -> list[str]:
        """``count`` distinct chat:start queries for a store of ``tasks_loaded`` tasks: the
        subjects of loaded tasks drawn at random, each followed by a word of its own
        (``salt`` and its number), so none is ever a cache hit."""
        rng = random.Random(f"scale-miss/{self.seed}/{tasks_loaded}")
        n = max(1, tasks_loaded)
        return [f"{self.task(rng.randrange(n)).query} zq{salt}n{j}" for j in range(count)]


# -- percentiles --------------------------------------------------------------------------


def ms(us: float | None) -> float | None:
    """Microseconds as milliseconds rounded to 0.01, or None."""
    return None if us is None else round(us / 1000, 2)


def latency_figures(prefix: str, values_us: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 and max of ``values_us`` in ms, keyed ``{prefix}_p50_ms`` etc."""
    return {
        f"{prefix}_p50_ms": ms(percentile(values_us, 50)),
        f"{prefix}_p99_ms": ms(percentile(values_us, 99)),
        f"{prefix}_max_ms": ms(max(values_us) if values_us else None),
    }


# -- the bridge as its own process, keeping its data dir ----------------------------------


BRIDGE_ARGS: Final = ["--rate-limit", "1000000", "--rate-burst", "1000000"]  # one loader


@contextlib.asynccontextmanager
async def running_bridge(
    backend: str, data_dir: Path, statsd_port: int, log_path: Path
) -> AsyncIterator[RunningBridge]:
    """A bridge (``bench.process.serve``) on ``data_dir`` with its rate limits lifted (one
    connection loads the whole store), stopped within 60 s so the store closes cleanly."""
    args = ["--memory", backend, *BRIDGE_ARGS]
    if backend == "graphiti":
        args += ["--llm", "off"]
    async with serve(args, data_dir, statsd_port, log_path, stop_within=60.0) as bridge:
        yield bridge


def rss_mb(pid: int) -> float | None:
    """A process's VmRSS in MB (None when it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def children(pid: int) -> list[int]:
    """Every descendant of a process, from /proc/PID/task/*/children."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    found += [int(child), *children(int(child))]
    return found


def memory_figures(pid: int) -> dict[str, float | None]:
    """VmRSS in MB of the bridge, its valkey-server and its FalkorDB (a redis-server
    loading the FalkorDB module), each None when absent."""
    figures: dict[str, float | None] = {
        "bridge_rss_mb": rss_mb(pid),
        "valkey_rss_mb": None,
        "falkordb_rss_mb": None,
    }
    for child in children(pid):
        with contextlib.suppress(OSError):
            comm = Path(f"/proc/{child}/comm").read_text().strip()
            key = {"valkey-server": "valkey_rss_mb", "redis-server": "falkordb_rss_mb"}.get(comm)
            if key is not None:
                figures[key] = (figures[key] or 0.0) + (rss_mb(child) or 0.0)
    return figures


def disk_mb(folder: Path) -> float:
    """The disk space the files under ``folder`` take (allocated blocks), in MB."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return round(total / 1e6, 1)


# -- the client ---------------------------------------------------------------------------


MAX_RETRIES: Final = 100_000  # retryable errors tolerated in one load
RETRY_DELAY: Final = 0.05  # seconds before an event is sent again


def retryable(reply: Reply) -> bool:
    """True when ``reply`` is an error the client should try again (``retryable``)."""
    return not reply.ok and bool(reply.error and reply.error.get("retryable"))


EXPECT: Final = {"chat:start": "context", "file:write": "ack", "error": "ack", "completion": "ack"}


@dataclass
class Loaded:
    """What a load added: tasks, episodes, seconds, acks saying the episode was queued,
    events sent again after a retryable error, and chat:starts answered with one (not
    sent again: a chat:start stores nothing, and a second one would open another task)."""

    tasks: int = 0
    episodes: int = 0
    seconds: float = 0.0
    queued: int = 0
    retries: int = 0
    failed_chats: int = 0
    drain_seconds: float = 0.0  # waiting for the outbox to empty, after the last ack


class Client:
    """One WebSocket to the bridge, MessagePack, replies matched by id."""

    def __init__(self, ws: ClientConnection, timeout: float) -> None:
        self.ws = ws
        self.timeout = timeout
        self.next_id = 0

    def check(self, reply: Reply, sent: dict[str, Any]) -> None:
        """Raise BenchError unless ``reply`` is the right answer to ``sent``."""
        if reply.type != EXPECT[sent["type"]] or not reply.ok:
            raise BenchError(f"{sent['type']} {sent['id']} was answered with {reply!r}")

    async def load(self, tasks: Iterator[Task], episodes: int, window: int) -> Loaded:
        """Send tasks from ``tasks`` until ``episodes`` more episodes are stored, at most
        ``window`` messages unanswered at a time; return once every one is answered."""
        loaded = Loaded()
        pending: dict[int, dict[str, Any]] = {}
        resends: set[asyncio.Task[None]] = set()
        room = asyncio.Semaphore(window)
        sending_done = asyncio.Event()
        began = time.perf_counter()

        async def read() -> None:
            try:
                while pending or not sending_done.is_set():
                    async with asyncio.timeout(self.timeout):
                        data = await self.ws.recv(decode=False)
                    reply = DECODER.decode(data)
                    sent = pending.pop(reply.id, None) if isinstance(reply.id, int) else None
                    if sent is None:
                        raise BenchError(f"a reply to nothing sent: {reply!r}")
                    if retryable(reply) and sent["type"] == "chat:start":
                        loaded.failed_chats += 1
                        room.release()
                        continue
                    if retryable(reply) and loaded.retries < MAX_RETRIES:
                        loaded.retries += 1  # its place in the window stays taken
                        self.next_id += 1
                        again = {**sent, "id": self.next_id}
                        pending[self.next_id] = again
                        resend = asyncio.create_task(self.send_later(again, RETRY_DELAY))
                        resends.add(resend)
                        resend.add_done_callback(resends.discard)
                        continue
                    self.check(reply, sent)
                    loaded.queued += reply.queued
                    room.release()
            except BaseException:
                for _ in range(window + 1):  # wake the sender, which then sees the failure
                    room.release()
                raise

        reader = asyncio.create_task(read())
        try:
            while loaded.episodes < episodes:
                task = next(tasks)
                for message in task.messages():
                    await room.acquire()
                    if reader.done():
                        await reader  # raises what went wrong
                    self.next_id += 1
                    message["id"] = self.next_id
                    pending[self.next_id] = message
                    await self.ws.send(ENCODER.encode(message))
                loaded.tasks += 1
                loaded.episodes += task.episodes
            sending_done.set()
            if not pending:
                reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        finally:
            for resend in list(resends):
                resend.cancel()
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
        loaded.seconds = time.perf_counter() - began
        return loaded

    async def send_later(self, message: dict[str, Any], delay: float) -> None:
        """Send ``message`` after ``delay`` seconds."""
        await asyncio.sleep(delay)
        await self.ws.send(ENCODER.encode(message))

    async def miss(self, query: str) -> tuple[Reply, int]:
        """One chat:start, waited for: its reply and the round trip in µs."""
        self.next_id += 1
        message = {"type": "chat:start", "id": self.next_id, "query": query,
                   "project": PROJECT, "session": PROBE_SESSION}  # fmt: skip
        began = time.perf_counter_ns()
        await self.ws.send(ENCODER.encode(message))
        async with asyncio.timeout(self.timeout):
            data = await self.ws.recv(decode=False)
        took = (time.perf_counter_ns() - began) // 1000
        reply = DECODER.decode(data)
        if reply.id != self.next_id:
            raise BenchError(f"chat:start {self.next_id} was answered with {reply!r}")
        self.check(reply, message)
        return reply, took


async def probe_misses(client: Client, queries: Sequence[str], warmup: int) -> dict[str, Any]:
    """Ask ``queries`` one at a time (the first ``warmup`` not counted): latency figures of
    the misses, the share answered with no context, and how many were cache hits."""
    rtt: list[float] = []
    server: list[float] = []
    empty = hits = 0
    for n, query in enumerate(queries):
        reply, took = await client.miss(query)
        if n < warmup:
            continue
        hits += reply.hit
        if not reply.hit:
            rtt.append(took)
            server.append(reply.elapsed_us)
            empty += reply.inject is None
    return {
        "misses": len(rtt),
        **latency_figures("miss_rtt", rtt),
        **latency_figures("miss_server", server),
        "empty_misses": empty,
        "empty_share": round(empty / len(rtt), 4) if rtt else None,
        "cache_hits": hits,
    }


def outbox_pending(data_dir: Path) -> int:
    """Episodes waiting in the bridge's outbox (acknowledged, not yet in memory), read from
    its file in ``data_dir`` (0 when there is none)."""
    path = data_dir / OUTBOX
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        return int(conn.execute("SELECT count(*) FROM queue").fetchone()[0])
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):  # created, not yet set up
            return 0
        raise
    finally:
        conn.close()


async def drain(data_dir: Path, timeout: float) -> float:
    """Wait until the bridge's outbox is empty; the seconds it took. BenchError past
    ``timeout`` seconds (memory is not taking what the bridge acknowledged)."""
    began = time.perf_counter()
    deadline = began + timeout
    while (left := await asyncio.to_thread(outbox_pending, data_dir)) > 0:
        if time.perf_counter() > deadline:
            raise BenchError(
                f"{left:,} acknowledged episodes still in the outbox after {timeout} s"
            )
        await asyncio.sleep(DRAIN_POLL)
    return time.perf_counter() - began


# -- the kept store -----------------------------------------------------------------------


@dataclass
class StoreState:
    """What a kept store holds: written beside its data dir after every size."""

    backend: str
    seed: int
    generator: int = GENERATOR
    tasks: int = 0
    episodes: int = 0
    load_seconds: float = 0.0


def read_state(store: Path, backend: str, seed: int) -> StoreState:
    """The state of the store at ``store`` (a fresh one when there is none); BenchError
    when it was built by another backend, seed or workload."""
    path = store / META
    if not path.is_file():
        if (store / "data").exists():
            raise BenchError(f"{store} has data but no {META}: remove it or use --fresh")
        return StoreState(backend, seed)
    state = StoreState(**json.loads(path.read_text()))
    if (state.backend, state.seed, state.generator) != (backend, seed, GENERATOR):
        raise BenchError(
            f"{store} was built for backend {state.backend}, seed {state.seed}, generator "
            f"{state.generator}; this run wants {backend}, {seed}, {GENERATOR}: use --fresh"
        )
    return state


def write_state(store: Path, state: StoreState) -> None:
    """Save the store's state (atomically)."""
    tmp = store / (META + ".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1) + "\n")
    tmp.replace(store / META)


def plan(sizes: Sequence[int], held: int) -> tuple[list[int], list[int]]:
    """Which sizes a store holding ``held`` episodes can be measured at (ascending; the
    largest size it has already reached is measured on the store as it is), and which it
    has passed (skipped)."""
    ordered = sorted(set(sizes))
    reached = [s for s in ordered if s <= held]
    skipped = reached[:-1]
    return ordered[len(skipped) :], skipped


# -- a run --------------------------------------------------------------------------------


@dataclass
class Settings:
    """One run's parameters."""

    sizes: list[int]
    seed: int = 0
    misses: int = 200
    warmup: int = 5
    window: int | None = None  # None: WINDOW of the backend
    timeout: float = 120.0
    drain_timeout: float = 3600.0  # for the outbox to empty after a load
    histories: list[Path] = field(default_factory=history_paths)


def progress(text: str) -> None:
    """A line on stderr, so stdout stays the report."""
    print(text, file=sys.stderr, flush=True)


async def run_backend(
    backend: str,
    settings: Settings,
    store: Path,
    workload: Workload,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Load ``workload`` into the kept store of ``backend`` and measure at every size: one
    row per size measured (sizes the store has passed give a row with ``skipped``), each
    also handed to ``on_row`` as soon as it is measured."""
    await asyncio.to_thread(store.mkdir, parents=True, exist_ok=True)
    state = read_state(store, backend, settings.seed)
    measured, skipped = plan(settings.sizes, state.episodes)
    rows: list[dict[str, Any]] = [
        {
            "backend": backend,
            "size": s,
            "skipped": f"the store already holds {state.episodes:,} episodes",
        }
        for s in skipped
    ]
    salt = uuid.uuid4().hex[:8]
    with statsd_sink() as statsd_port:
        async with (
            running_bridge(backend, store / "data", statsd_port, store / "bridge.log") as bridge,
            connect(
                f"{bridge.url}/{PROJECT}", compression=None, max_size=None, open_timeout=30
            ) as ws,
        ):
            client = Client(ws, settings.timeout)
            tasks = workload.tasks(state.tasks)
            for size in measured:
                added = Loaded()
                if state.episodes < size:
                    progress(f"scale: {backend}: loading {state.episodes:,} -> {size:,} ...")
                    window = settings.window or WINDOW[backend]
                    added = await client.load(tasks, size - state.episodes, window)
                    added.drain_seconds = await drain(store / "data", settings.drain_timeout)
                    added.seconds += added.drain_seconds
                    state.tasks += added.tasks
                    state.episodes += added.episodes
                    state.load_seconds = round(state.load_seconds + added.seconds, 1)
                    write_state(store, state)
                queries = workload.miss_queries(
                    settings.misses + settings.warmup, state.tasks, f"{salt}s{size}"
                )
                began = time.perf_counter()
                probe = await probe_misses(client, queries, settings.warmup)
                row: dict[str, Any] = {
                    "backend": backend,
                    "size": size,
                    "episodes": state.episodes,
                    "tasks": state.tasks,
                    "loaded_episodes": added.episodes,
                    "load_s": round(added.seconds, 1),
                    "ingest_eps": round(added.episodes / added.seconds, 1)
                    if added.episodes and added.seconds
                    else None,
                    "queued_acks": added.queued,
                    "drain_s": round(added.drain_seconds, 1),
                    "retried_events": added.retries,
                    "failed_chat_starts": added.failed_chats,
                    "window": settings.window or WINDOW[backend],
                    **probe,
                    "probe_s": round(time.perf_counter() - began, 1),
                    "disk_mb": disk_mb(store / "data"),
                    **memory_figures(bridge.pid),
                    "measured": f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
                    "load_avg": round(os.getloadavg()[0], 1),
                }
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                progress(
                    f"scale: {backend} {state.episodes:,} episodes: "
                    f"{fmt(row['ingest_eps'], ',.0f')} ep/s, miss p50/p99 "
                    f"{fmt(row['miss_rtt_p50_ms'], '.2f')}/{fmt(row['miss_rtt_p99_ms'], '.2f')}"
                    f" ms, empty {row['empty_misses']}, disk {row['disk_mb']} MB, "
                    f"bridge {row['bridge_rss_mb']} MB"
                )
        if measured:  # the store of the last size, opened again by a new bridge
            queries = workload.miss_queries(RESTART_MISSES, state.tasks, f"{salt}restart")
            restart = await measure_restart(backend, store, statsd_port, queries, settings)
            rows[-1].update(restart)
            progress(
                f"scale: {backend} restarted on {state.episodes:,} episodes: listening in "
                f"{restart['restart_listen_s']} s, first miss {restart['restart_first_miss_ms']}"
                f" ms, memory answering {restart['restart_context_s']} s after the start"
            )
    return rows


RESTART_MISSES: Final = 600  # distinct misses asked, at most, until one has a context


async def measure_restart(
    backend: str, store: Path, statsd_port: int, queries: Sequence[str], settings: Settings
) -> dict[str, Any]:
    """Start a new bridge on the kept store, as after a crash or a deploy (the recall index
    is memory's derived state, rebuilt from the store at start), and ask misses one at a
    time from the moment it listens until one is answered with a context (``queries``, at
    most): how long it took to listen, the first miss's round trip, and how long after the
    start memory answered."""
    began = time.perf_counter()
    async with running_bridge(backend, store / "data", statsd_port, store / "bridge.log") as b:
        listening = time.perf_counter() - began
        async with connect(f"{b.url}/{PROJECT}", compression=None, open_timeout=30) as ws:
            client = Client(ws, settings.timeout)
            first: int | None = None
            answered: float | None = None
            for query in queries:
                reply, took = await client.miss(query)
                first = took if first is None else first
                if reply.inject is not None:
                    answered = time.perf_counter() - began
                    break
    return {
        "restart_listen_s": round(listening, 2),
        "restart_first_miss_ms": ms(first) if first is not None else None,
        "restart_context_s": round(answered, 2) if answered is not None else None,
    }


# -- report -------------------------------------------------------------------------------


def fmt(x: float | None, spec: str) -> str:
    """A table cell: ``x`` formatted, or ``-``."""
    return "-" if x is None else format(x, spec)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The measured rows as a Markdown table, by backend then size."""
    lines = [
        "| backend | episodes | tasks | ingest ep/s | miss p50 / p99 ms | server p50 / p99 ms "
        "| empty misses | disk MB | bridge RSS MB | valkey RSS MB | FalkorDB RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["backend"], r["size"])):
        if r.get("skipped"):
            continue
        lines.append(
            f"| {r['backend']} | {r['episodes']:,} | {r['tasks']:,} "
            f"| {fmt(r['ingest_eps'], ',.0f')} "
            f"| {fmt(r['miss_rtt_p50_ms'], '.2f')} / {fmt(r['miss_rtt_p99_ms'], '.2f')} "
            f"| {fmt(r['miss_server_p50_ms'], '.2f')} / {fmt(r['miss_server_p99_ms'], '.2f')} "
            f"| {r['empty_misses']} of {r['misses']} | {fmt(r['disk_mb'], ',.1f')} "
            f"| {fmt(r['bridge_rss_mb'], ',.0f')} | {fmt(r['valkey_rss_mb'], ',.0f')} "
            f"| {fmt(r['falkordb_rss_mb'], ',.0f')} |"
        )
    return "\n".join(lines)


METHOD_TEXT: Final = """\
# Recall latency as memory grows

Does a chat:start cache miss stay fast as memory grows? `python -m bench scale`
(bench/scale.py; method in bench/README.md) loads a realistic mix of tasks into one
project of a real bridge (`python -m bridge serve` as its own process with its own
valkey-server; graphiti: `--memory graphiti --llm off` on its own FalkorDB) and, at each
store size, measures chat:start misses, disk and memory.

- **Workload.** Tasks built from the real histories in `../shared/data/*.jsonl`
  ({histories}): the usable commits in time order, repeated in cycles whose paths live
  under `pkgN/` and whose subjects name the package. Per task (session = task id): a
  `chat:start` with the subject, 1 to 6 `file:write` (the first from the commit's own
  files, the rest drawn from the project tree with Zipf popularity, s = {zipf}), an `error`
  with a traceback naming one of its files in {error:.0%} of tasks, and a `completion` with
  the subject and the commit body as the summary ({nosummary:.0%} without). An episode is a
  stored event: file:write, error or completion. Seed {seed}.
- **Ingest.** One WebSocket, MessagePack, at most {window} messages unanswered, every
  reply checked (an event answered with a retryable error is sent again after 50 ms; a
  chat:start is not); the rate is episodes stored per second since the previous size: the
  load ends once every episode is acknowledged and the bridge's outbox (where an
  acknowledged episode waits when memory does not take it within 2 s) is empty, so every
  episode is in memory when misses are measured. It includes the tasks' own chat:starts,
  each a cache miss that reads memory. The bridge's per-connection rate limit is lifted
  for the load.
- **Misses.** At each size the load pauses and {misses} distinct chat:starts are asked one
  at a time (after {warmup} not counted), each a loaded task's subject plus a word of its
  own so the cache never answers: client round trip and the reply's `elapsed_us`
  (server). *Empty misses* are those answered `inject: null`: memory did not answer
  within the bridge's miss budget (250 ms by default).
- **Disk** is the allocated size of the data dir (SQLite and WAL; for graphiti also
  FalkorDB's append-only file); **RSS** is VmRSS from /proc of the bridge process and of
  its valkey-server and FalkorDB children.
- Both backends recall from an index in memory of the last {horizon:,} tasks of a project
  (`HORIZON_TASKS` in bridge/memory/recall.py), loaded from the store on the project's first
  query: 1k episodes (about 270 tasks) are inside that horizon, 10k (about 2,600 tasks)
  already past it, so a larger store adds no work to a miss.
- **Restart.** After the last size, the bridge is stopped and a new one started on the
  same store, as after a crash or a deploy: the recall index is derived state, rebuilt from
  the store at start (the most recent projects in the background, any other on its first
  query). Misses are asked one at a time from the moment it listens until one has a
  context; the runs below say how long it took to listen, the first miss's round trip and
  when memory answered.
- The machine is shared: each run says the load average (1 minute) when it was measured.
"""


def window_text() -> str:
    """The default window of each backend, in words."""
    if len(set(WINDOW.values())) == 1:
        return str(WINDOW["sqlite"])
    return " or ".join(f"{n} ({backend})" for backend, n in WINDOW.items())


def markdown(results: dict[str, Any]) -> str:
    """The report: the method, the command, the table, the runs."""
    p = results["params"]
    rows = results["rows"]
    parts = [
        METHOD_TEXT.format(
            histories=", ".join(Path(h).name for h in p["histories"]),
            zipf=ZIPF_S,
            horizon=HORIZON_TASKS,
            error=ERROR_SHARE,
            nosummary=NO_SUMMARY_SHARE,
            seed=p["seed"],
            window=p["window"] or window_text(),
            misses=p["misses"],
            warmup=p["warmup"],
        ),
        "Reproduce (each backend keeps its store under `bench/results/scale-store/`; a "
        "rerun measures it without reloading, `--fresh` rebuilds it):",
        "",
        *(f"    {c}" for c in results["commands"]),
        "",
        f"Machine: {results['machine']['line']}.",
        "",
        table(rows),
        "",
    ]
    runs = [
        f"- {r['backend']} {r['episodes']:,} episodes: measured {r['measured']}"
        + (f" (load average {r['load_avg']})" if r.get("load_avg") is not None else "")
        + ", "
        f"{r['loaded_episodes']:,} episodes loaded in {r['load_s']:,} s, probe {r['probe_s']} s"
        + (f", {r['queued_acks']:,} acks queued in the outbox" if r.get("queued_acks") else "")
        + (f", outbox emptied in {r['drain_s']} s" if r.get("drain_s") else "")
        + (f", window {r['window']}" if r.get("window") else "")
        + (
            f", {r['retried_events']:,} events sent again after a retryable error"
            if r.get("retried_events")
            else ""
        )
        + (
            f", {r['failed_chat_starts']:,} load chat:starts answered with a retryable error"
            if r.get("failed_chat_starts")
            else ""
        )
        + (
            f"; then a new bridge on the same store listened in {r['restart_listen_s']} s, its"
            f" first miss took {fmt(r['restart_first_miss_ms'], '.2f')} ms, and memory"
            f" answered with a context {fmt(r['restart_context_s'], '.2f')} s after the start"
            if "restart_listen_s" in r
            else ""
        )
        for r in sorted(rows, key=lambda r: (r["backend"], r["size"]))
        if not r.get("skipped")
    ]
    parts += ["Runs:", "", *runs]
    notes = results.get("notes") or []
    if notes:
        parts += ["", "Notes:", "", *(f"- {n}" for n in notes)]
    return "\n".join(parts) + "\n"


def plot(path: Path, rows: Sequence[dict[str, Any]]) -> bool:
    """Miss p50 (solid) and p99 (dashed) against episodes, log x, one colour per backend.
    False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    measured = [r for r in rows if not r.get("skipped")]
    for n, backend in enumerate(sorted({r["backend"] for r in measured})):
        mine = sorted((r for r in measured if r["backend"] == backend), key=lambda r: r["size"])
        xs = [r["episodes"] for r in mine]
        colour = f"C{n}"
        for key, style in (("p50", "-"), ("p99", "--")):
            ys = [r[f"miss_rtt_{key}_ms"] for r in mine]
            ax.plot(xs, ys, style, marker="o", color=colour, label=f"{backend} miss {key}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("episodes in the project's memory")
    ax.set_ylabel("chat:start miss round trip (ms)")
    ax.set_title("chat:start cache miss latency against store size")
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def merge_rows(
    before: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The rows of an earlier results file updated with this run's: a measured row
    replaces the earlier one of its (backend, size); a skipped size keeps the earlier."""
    by_key = {(r["backend"], r["size"]): r for r in before if not r.get("skipped")}
    for r in new:
        if not r.get("skipped") or (r["backend"], r["size"]) not in by_key:
            by_key[(r["backend"], r["size"])] = r
    return [by_key[k] for k in sorted(by_key)]


def parse_sizes(text: str) -> list[int]:
    """``1000,10k,1M`` as [1000, 10000, 1000000]."""
    found: list[int] = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        if not part:
            continue
        scale = {"k": 1_000, "m": 1_000_000}.get(part[-1], 1)
        number = part[:-1] if scale != 1 else part
        value = int(float(number) * scale)
        if value < 1:
            raise ValueError(f"a size must be at least 1, not {part!r}")
        found.append(value)
    if not found:
        raise ValueError("no sizes")
    return sorted(set(found))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backend", choices=[*BACKENDS, "all"], default="sqlite")
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, DEFAULT_SIZES)),
        help="store sizes in episodes to measure at (default 1000,10000,100000; 10k and 1M work)",
    )
    parser.add_argument(
        "--max-size",
        type=int,
        default=100_000,
        help="graphiti only: skip its sizes above this (default 100000; its ingest is slower)",
    )
    parser.add_argument(
        "--store-dir",
        type=Path,
        help="the kept store (default bench/results/scale-store/BACKEND; with --backend all, "
        "DIR/BACKEND)",
    )
    parser.add_argument("--fresh", action="store_true", help="delete the kept store first")
    parser.add_argument("--misses", type=int, default=200, help="misses measured per size")
    parser.add_argument("--warmup", type=int, default=5, help="misses asked first, not counted")
    parser.add_argument(
        "--window",
        type=int,
        help=f"messages in flight when loading (default {window_text()})",
    )
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument(
        "--history", nargs="+", type=Path, help="history files (default ../shared/data/*.jsonl)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder for scale.md/.json/.png (docs/)"
    )
    parser.add_argument("--no-uvloop", action="store_true", help="run the client on asyncio")
    args = parser.parse_args(argv)
    try:
        args.size_list = parse_sizes(args.sizes)
    except ValueError as e:
        parser.error(f"--sizes: {e}")
    if args.misses < 1 or (args.window is not None and args.window < 1) or args.warmup < 0:
        parser.error("--misses and --window must be at least 1, --warmup at least 0")
    return args


def store_for(args: argparse.Namespace, backend: str) -> Path:
    """The kept store folder of a backend."""
    given: Path | None = args.store_dir
    if given is None:
        return DEFAULT_STORE / backend
    return given / backend if args.backend == "all" else given


def command_line(argv: Sequence[str]) -> str:
    """How this run was started, for the report."""
    return " ".join([".venv/bin/python -m bench scale", *argv])


@dataclass
class Report:
    """The results files of a run, rewritten after every measured size so that a run
    stopped part way keeps what it measured."""

    out: Path
    command: str
    settings: Settings
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    began: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.before = json.loads((self.out / "scale.json").read_text())

    def add(self, row: dict[str, Any]) -> None:
        """A row measured: keep it and rewrite the files."""
        self.rows.append(row)
        self.write()

    def results(self) -> dict[str, Any]:
        """Everything measured so far, merged with the earlier results file."""
        m = machine()
        client = "asyncio"
        with contextlib.suppress(RuntimeError):
            client = type(asyncio.get_running_loop()).__module__.split(".")[0]
        m["line"] = f"{m['cpu']}, {m['cores']} cores, {m['python']}, {client or 'asyncio'} client"
        s = self.settings
        b = self.before
        return {
            "updated": f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
            "commands": list(dict.fromkeys([*b.get("commands", []), self.command])),
            "machine": m,
            "bridge_revision": revision(REPO),
            "params": {
                "seed": s.seed,
                "misses": s.misses,
                "warmup": s.warmup,
                "window": s.window,
                "generator": GENERATOR,
                "zipf_s": ZIPF_S,
                "histories": [str(h) for h in s.histories],
            },
            "backend_seconds": {**b.get("backend_seconds", {}), **self.seconds},
            "notes": list(dict.fromkeys([*b.get("notes", []), *self.notes])),
            "rows": merge_rows(b.get("rows", []), self.rows),
            "duration_s": round(time.perf_counter() - self.began, 1),
        }

    def write(self) -> str:
        """Write scale.md, scale.json and scale.png; the Markdown."""
        results = self.results()
        text = markdown(results)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "scale.md").write_text(text, encoding="utf-8")
        (self.out / "scale.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        plot(self.out / "scale.png", results["rows"])
        return text


async def run(
    backends: Sequence[str], stores: dict[str, Path], max_size: int, report: Report
) -> str:
    """Each backend in turn, every row into ``report``; the final Markdown."""
    settings = report.settings
    workload = Workload(load_commits(settings.histories), settings.seed)
    for backend in backends:
        mine = settings
        if backend == "graphiti" and any(s > max_size for s in settings.sizes):
            kept = [s for s in settings.sizes if s <= max_size]
            report.notes.append(
                f"graphiti: sizes above --max-size {max_size:,} skipped: "
                + ", ".join(f"{s:,}" for s in settings.sizes if s > max_size)
            )
            if not kept:
                continue
            mine = Settings(**{**asdict(settings), "sizes": kept})
        if mine.window is None:
            mine = Settings(**{**asdict(mine), "window": WINDOW[backend]})
        began = time.perf_counter()
        found = await run_backend(backend, mine, stores[backend], workload, report.add)
        report.rows += [r for r in found if r.get("skipped")]
        report.seconds[backend] = round(time.perf_counter() - began, 1)
        progress(f"scale: {backend} took {report.seconds[backend]} s")
    return report.write()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: load, measure, print the Markdown, write scale.md/.json/.png (after
    every measured size, so a run stopped part way keeps what it measured)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.ERROR)
    backends = list(BACKENDS) if args.backend == "all" else [args.backend]
    stores = {b: store_for(args, b) for b in backends}
    if args.fresh:
        for store in stores.values():
            shutil.rmtree(store, ignore_errors=True)
    settings = Settings(
        sizes=args.size_list,
        seed=args.seed,
        misses=args.misses,
        warmup=args.warmup,
        window=args.window,
        histories=list(args.history) if args.history else history_paths(),
    )
    if not settings.histories:
        print("bench scale: no history files", file=sys.stderr)
        return 1
    report = Report(args.out, command_line(argv), settings)
    try:
        text, _ = run_loop(run(backends, stores, args.max_size, report), not args.no_uvloop)
    except BenchError as e:
        print(f"bench scale: {e}", file=sys.stderr)
        return 1
    print(text)
    progress(f"scale: wrote scale.md, scale.json and scale.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
