"""Composition root: a Config becomes running parts, started and stopped in a fixed order.

Start (``App.start``, or entering ``async with App(config)``): the data folder (held
exclusively: see bridge.runtime.datadir), metrics, Valkey (a private one unless a URL is given),
the cache, memory (and the private FalkorDB it may need), the outbox (delivering what a
previous run left), the handlers, then the listener last. Each part entered is closed
in reverse order by ``App.stop``, all of them within one shutdown deadline
(``bridge.deadline``): stop accepting, let requests in flight finish and close the
connections, wait for background memory queries, let the outbox drain, then close
memory, the private FalkorDB, the cache, the private Valkey and metrics, and let the
data folder go. What keeps the bridge from starting is a StartupError saying what.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO, Generic, TypeVar, cast

from bridge.cache.contexts import ContextCache
from bridge.cache.store_identity import (
    cache_blind_to_other_writers,
    graph_identity,
    memory_identity,
)
from bridge.cache.valkey import ValkeyUrlError
from bridge.config import Config, ConfigError, StartupError, redact_url
from bridge.errors import MemoryUnavailable
from bridge.memory.base import MemoryBackend
from bridge.memory.delivery import Delivery
from bridge.memory.durable import EpisodeQueue
from bridge.memory.graph_settings import LlmSettings
from bridge.memory.jsonl import Imported, ImportStopped, export_jsonl, import_jsonl
from bridge.memory.lease import Leases
from bridge.memory.outbox import orphaned_outboxes
from bridge.memory.queue_files import orphaned, queue_path
from bridge.memory.script import ScriptMemory
from bridge.memory.sqlite import SqliteMemory
from bridge.metrics import Metrics
from bridge.runtime.datadir import DataDirLock
from bridge.runtime.embedded import EmbeddedFalkorDB
from bridge.runtime.lifecycle import Lifecycle, start_falkor
from bridge.runtime.workers import Workers
from bridge.wire.handlers import Handlers
from bridge.wire.health import ReadinessReport, data_dir_problem
from bridge.wire.server import Server

log = logging.getLogger(__name__)

T = TypeVar("T")

GRAPHITI_QUEUE = "graphiti-queue"  # the stem of graphiti's ingest queue files


async def open_memory(
    config: Config, leases: Leases | None = None
) -> tuple[MemoryBackend, EmbeddedFalkorDB | None]:
    """The configured memory backend (not started yet), and the private FalkorDB it needs
    (started) when the graphiti backend has no --graph-url. ``leases``: where the graphiti
    backend takes its ingest leases, when other processes share its graph."""
    settings, server = config.memory, config.server
    if settings.backend == "sqlite":
        return SqliteMemory(config.memory_path, shared=server.workers > 1), None
    if settings.backend == "script":
        script = ScriptMemory(
            settings.script.path,
            python=settings.script.python,
            timeout=settings.script.timeout,
            concurrency=settings.script.concurrency,
        )
        return script, None
    try:
        from bridge.memory.graphiti import GraphitiMemory
    except ImportError as e:
        raise ConfigError(
            f"the graphiti backend needs its extra: pip install 'graphiti-bridge[graphiti]' ({e})"
        ) from e
    falkor = None
    graph_url = settings.graph_url
    if graph_url is None:
        falkor = await start_falkor(config.data_dir)
        graph_url = falkor.url
    llm = None
    if settings.llm.enabled:
        llm = LlmSettings(
            api_key=settings.llm.api_key or "",
            base_url=settings.llm.base_url,
            model=settings.llm.model,
            small_model=settings.llm.small_model,
            embedding_model=settings.llm.embedding_model,
            embedding_dim=settings.llm.embedding_dim,
        )
    memory = GraphitiMemory(
        graph_url,
        state_dir=config.data_dir,
        llm=llm,
        queue_size=settings.graphiti_queue_size,
        queue_path=queue_path(config.data_dir, GRAPHITI_QUEUE, server.worker),
        take_over=orphaned(config.data_dir, GRAPHITI_QUEUE, server.worker, server.workers),
        leases=leases,
    )
    return memory, falkor


def ingest_leases(config: Config, cache: ContextCache) -> Leases | None:
    """The leases that let one process at a time ingest a group of the graph, when other
    processes may share it: a --graph-url and a --valkey-url (the workers of one parent
    get both)."""
    graph_url = config.memory.graph_url
    if config.memory.backend != "graphiti" or graph_url is None or config.cache.valkey_url is None:
        return None
    prefix = f"{config.cache.prefix}ingest:{graph_identity(graph_url)}:"
    return Leases(lambda: cache.valkey.client, prefix)


@dataclass(frozen=True)
class Parts:
    """What a started App runs, each part ready."""

    cache: ContextCache
    memory: MemoryBackend
    delivery: Delivery
    handlers: Handlers
    server: Server


class RunningPart(Generic[T]):
    """An App's attribute that is one of its running parts, by the same name (RuntimeError
    before ``start`` and after ``stop``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, app: App, owner: type | None = None) -> T:
        return cast(T, getattr(app.parts, self.name))


class App(Lifecycle):
    """The bridge's parts, wired together from one Config: ``async with App(config) as app``
    runs them (``start`` and ``stop`` do the same in two calls). The server listens once
    everything behind it is ready; a part that cannot start stops the start (StartupError
    saying why)."""

    kind = "an App"
    server = RunningPart[Server]()  # the WebSocket server
    cache = RunningPart[ContextCache]()  # the context cache
    memory = RunningPart[MemoryBackend]()  # the memory backend
    handlers = RunningPart[Handlers]()  # the message handlers
    delivery = RunningPart[Delivery]()  # the delivery of episodes to memory, by the outbox

    def __init__(self, config: Config, memory: MemoryBackend | None = None) -> None:
        super().__init__(config.server.shutdown_deadline)
        self.config = config
        self.data_dir = DataDirLock(config.data_dir)
        number = config.server.worker
        worker = [f"worker:{number}"] if number else None  # gauges per worker
        self.metrics = Metrics(config.metrics.host, config.metrics.port, tags=worker)
        self._given_memory = memory
        self._parts: Parts | None = None

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        config, worker = self.config, self.config.server.worker
        if not worker:  # a worker's parent holds the data folder for all of them
            stack.enter_context(self.data_dir)
        self.metrics.start()
        stack.push_async_callback(self._close, "flushing metrics", self.metrics.close)
        valkey_url = await self._valkey_url(stack, config.cache.valkey_url)
        cache = await open_cache(config, valkey_url, self.metrics)
        stack.push_async_callback(self._close, "closing the cache", cache.close)
        memory = self._given_memory
        if memory is None:
            memory, falkor = await open_memory(config, ingest_leases(config, cache))
            if falkor is not None:
                self._own_falkor(stack, falkor)
        await start_memory(memory)
        stack.push_async_callback(self._close, f"closing the {memory.name} memory", memory.close)
        delivery = Delivery(
            memory,
            EpisodeQueue(config.outbox_path),
            store_timeout=config.memory.store_timeout_ms / 1000,
        )
        handlers = Handlers(
            memory,
            cache,
            self.metrics,
            recall_limit=config.recall.limit,
            miss_budget=config.recall.miss_budget_ms / 1000.0,
            delivery=delivery,
            context_chars=config.recall.context_chars,
            max_text=config.limits.max_text,
        )
        delivery.on_delivered = handlers.episode_delivered
        await delivery.start(orphaned_outboxes(config.data_dir, worker, config.server.workers))
        stack.push_async_callback(self._flush_outbox, delivery)
        stack.push_async_callback(self._drain, handlers)
        server = Server(config, handlers, self.metrics, self.readiness)
        self._parts = Parts(cache, memory, delivery, handlers, server)
        try:
            await server.start()
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)
            where = f"{config.server.host}:{config.server.port}"
            raise StartupError(f"cannot listen on {where}: {reason}") from e
        stack.push_async_callback(self._stop_server, server)

    @property
    def parts(self) -> Parts:
        """The running parts (RuntimeError before ``start`` and after ``stop``)."""
        if self._parts is None:
            raise RuntimeError("the bridge is not running: use `async with App(config)`")
        return self._parts

    async def readiness(self) -> ReadinessReport:
        """What keeps the bridge from serving right now, and what from serving fully (the
        cache: every message is still answered without it, so it only degrades)."""
        report = ReadinessReport()
        parts = self._parts
        if parts is None:
            report.problems.append("bridge: not running")
            return report
        valkey = await parts.cache.problem()
        if valkey is not None:
            report.degraded.append(
                f"cache: degraded (valkey: {valkey}; chat:start answers from memory, uncached)"
            )
        if (local := parts.cache.local_problem()) is not None:
            report.degraded.append(f"cache: degraded ({local}; hits are read from Valkey)")
        disk = await asyncio.to_thread(data_dir_problem, self.config.data_dir)
        if disk is not None:
            report.problems.append(f"data dir: {disk}")
        try:
            await asyncio.wait_for(parts.memory.recall("readyz", "ready", 1), 2.0)
        except Exception as e:
            report.problems.append(f"memory: {type(e).__name__}: {e}")
        return report

    async def stop(self) -> None:
        """Stop every part in reverse order of start, all within one shutdown deadline
        (``--shutdown-deadline``): stop accepting, let requests in flight finish and close
        the connections, wait for background memory queries, let the outbox drain, then
        close memory, cache, the private servers and metrics, and let the data folder go.
        A step still running at the deadline is cancelled (``bridge.deadline``); whatever
        the outbox holds then is delivered by the next start. Safe to call after a failed
        start, and more than once."""
        try:
            await super().stop()
        finally:
            self._parts = None

    async def _stop_server(self, server: Server) -> None:
        await server.stop(self.deadline)

    async def _drain(self, handlers: Handlers) -> None:
        await self.deadline.run(handlers.drain(), "background memory queries")

    async def _flush_outbox(self, delivery: Delivery) -> None:
        deadline = self.deadline
        if not await delivery.flush(deadline.remaining()):
            log.warning(
                "%d episodes stay in the outbox for the next start", delivery.outbox.pending
            )
        await deadline.run(delivery.close(), "closing the outbox", closing=True)

    async def _close(self, what: str, close: Callable[[], Awaitable[None]]) -> None:
        await self.deadline.run(close(), what, closing=True)


async def open_cache(config: Config, url: str, metrics: Metrics) -> ContextCache:
    """The context cache on ``url`` (one server, Sentinel or cluster: asked, not
    configured), started, its keys in the namespace of the configured memory."""
    try:
        namespace = memory_identity(config)
    except OSError as e:
        raise StartupError(f"cannot keep the store id in {config.data_dir}: {e}") from e
    if cache_blind_to_other_writers(config):
        log.warning(
            "graphiti on a shared graph with a private Valkey: this bridge's cache cannot "
            "see the other bridges' writes, so it may serve a context they made stale for "
            "up to --cache-ttl (%d s); give every bridge of this graph the same --valkey-url",
            config.cache.ttl,
        )
    try:
        cache = await ContextCache.connect(
            url,
            prefix=config.cache.prefix,
            ttl=config.cache.ttl,
            on_unavailable=metrics.cache_unavailable,
            # Every request in flight may need Valkey at once; more wait for a connection.
            pool_size=max(64, config.limits.max_inflight),
            namespace=namespace,
        )
    except ValkeyUrlError as e:
        raise ConfigError(f"--valkey-url: {e}") from e
    await cache.start()
    return cache


async def start_memory(memory: MemoryBackend) -> None:
    """Start a memory backend; one that cannot start stops the command (StartupError)."""
    try:
        await memory.start()
    except MemoryUnavailable as e:
        raise StartupError(f"the {memory.name} memory cannot start: {e}") from e


@contextlib.asynccontextmanager
async def _memory_alone(config: Config) -> AsyncIterator[MemoryBackend]:
    """The configured backend, started, with the data folder held (for export and import)."""
    with DataDirLock(config.data_dir):
        memory, falkor = await open_memory(config)
        try:
            await start_memory(memory)
            yield memory
        finally:
            await memory.close()
            if falkor is not None:
                await falkor.close()


async def export_project(
    config: Config, project: str, open_out: Callable[[], AbstractContextManager[BinaryIO]]
) -> int:
    """Write every episode of ``project`` in the configured backend as JSON Lines, to what
    ``open_out`` opens once the data folder is held (a refused export truncates nothing)."""
    async with _memory_alone(config) as memory:
        with open_out() as out:
            return await export_jsonl(memory, project, out)


async def import_project(config: Config, project: str | None, lines: Iterable[bytes]) -> Imported:
    """Store JSON Lines episodes into the configured backend. Each keeps its own project
    unless ``project`` is given; a bad line stops the import (StartupError saying where)."""
    async with _memory_alone(config) as memory:
        done = Imported()
        try:
            await import_jsonl(memory, lines, group_id=project, done=done)
        except ImportStopped as e:
            raise StartupError(str(e)) from e
        return done


async def serve(config: Config, ready: Callable[[], None] | None = None) -> None:
    """Run the bridge until SIGINT or SIGTERM: this process alone, the parent of
    ``--workers N`` (``bridge.runtime.workers``), or one of its workers, which calls ``ready``
    once it listens instead of printing where.

    The signals are handled here and nowhere else: they only set an event, and the
    shutdown runs within its one deadline. A step cut short at the deadline may leave a
    thread behind in a memory call nothing can cancel (SQLite waiting for a lock), which
    the interpreter would wait for at exit: the process then exits at once instead, what
    was acknowledged being on disk in the outbox."""
    server = config.server
    bridge = Workers(config) if server.workers > 1 and not server.worker else App(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    async with bridge:
        settle_heap()
        if ready is not None:
            ready()
            log.info("worker %d of %d (pid %d) serving", server.worker, server.workers, os.getpid())
        else:
            print(f"graphiti-bridge listening on {_listening(config, bridge)}", flush=True)
        await stopping.wait()
        log.info("shutting down")
    if ready is None:
        print("graphiti-bridge stopped", file=sys.stderr, flush=True)
    if bridge.deadline.cut:
        log.warning("exiting without waiting for %s", ", ".join(bridge.deadline.cut))
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)


def settle_heap() -> int:
    """Collect once, then freeze what is left: what starting made (modules, the parts) lives
    as long as the process, and a full collection need not walk it again. Returns how many
    objects were frozen.

    Every full (generation 2) collection walks each tracked object and stalls the event
    loop while it does: graphiti-core and its dependencies alone leave some 140,000 (about
    80 ms). With the embedded store at 100,000 episodes, a full collection while ingesting
    stalled the loop 64-89 ms with what starting made, 19-32 ms without it.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _listening(config: Config, app: App | Workers) -> str:
    """Where the bridge listens and what stands behind it, for the start-up line."""
    url = config.cache.valkey_url
    valkey = redact_url(url) if url else "a private valkey-server"
    if isinstance(app, App):
        port, workers = app.server.port, ""
        if app.cache.valkey.kind != "server":
            valkey += f", {app.cache.valkey.label}"
    else:
        port, workers = app.port, f"{config.server.workers} workers; "
    memory = config.describe_memory()
    return f"ws://{config.server.host}:{port} ({workers}cache: {valkey}; memory: {memory})"
