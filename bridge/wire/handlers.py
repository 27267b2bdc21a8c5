"""One handler per client message, over the memory, cache and metrics interfaces.

Nothing here touches a socket: ``Handlers.begin`` takes a decoded message and returns the
coroutine that produces its reply, so tests can drive every event without a server.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Unpack

from bridge.cache.contexts import ContextCache
from bridge.cache.loader import ContextLoader, LoaderOptions
from bridge.episode import Episode, episode_uuid, new_episode
from bridge.errors import BridgeError, MemoryUnavailable
from bridge.memory.base import MemoryBackend, Selector
from bridge.memory.delivery import Delivery
from bridge.memory.privacy import scrub, scrub_episode
from bridge.memory.recall import Ranked, TaskHit, rank
from bridge.metrics import Metrics
from bridge.wire.events import EpisodeEvent, describe, mentioned
from bridge.wire.protocol import (
    MAX_TEXT,
    Ack,
    ChatStart,
    Completion,
    Context,
    EpisodeMessage,
    ErrorEvent,
    Export,
    ExportChunk,
    ExportEnd,
    FileWrite,
    Forget,
    Message,
    Note,
    Ping,
    Pong,
    Query,
    QueryResult,
    Reply,
    error_ack,
)
from bridge.wire.tasks import TaskTracker

log = logging.getLogger(__name__)

Emit = Callable[[Reply], Awaitable[None]]


def _episode(group_id: str, **fields: Any) -> Episode:
    """The episode of a client's event, as memory may keep it: every episode is built here,
    so none holds a private span, an injected context or a secret (bridge/memory/privacy.py)."""
    return scrub_episode(new_episode(group_id, **fields))


def _happened(message: EpisodeMessage) -> float:
    """When the event happened: the client's ``at``, never later than now."""
    now = time.time()
    return now if message.at is None else min(message.at, now)


class Session:
    """What the handlers keep per connection: the default project and write ordering.

    A file:write opens a gate that closes once its cache invalidation is done; a chat:start
    waits for the gates open when it arrived, so it never reads a context the write made
    stale (read-your-writes on one connection, even though messages run concurrently).
    """

    def __init__(self, project: str) -> None:
        self.project = project
        self.anonymous = f"connection:{uuid.uuid4().hex}"  # for messages without a session
        self._gates: set[asyncio.Future[None]] = set()

    def project_of(self, message: Message) -> str:
        """The project a message is about: its own field, else the connection's."""
        return message.project or self.project

    def session_of(self, message: Message) -> str:
        """The session a message belongs to: its own, else this connection's."""
        return message.session or self.anonymous

    def open_gate(self) -> asyncio.Future[None]:
        """A gate later chat:starts wait on; close it with ``close_gate``."""
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._gates.add(gate)
        return gate

    def close_gate(self, gate: asyncio.Future[None]) -> None:
        """Let chat:starts waiting on this gate go on."""
        self._gates.discard(gate)
        if not gate.done():
            gate.set_result(None)

    def has_open_gates(self) -> bool:
        """True while a file:write of this connection is still invalidating."""
        return bool(self._gates)

    def open_gates(self) -> tuple[asyncio.Future[None], ...]:
        """The gates open right now."""
        return tuple(self._gates)


class Handlers:
    """The per-event logic of the bridge: decode, ask the context loader or memory, reply.
    ``loading`` goes to the context loader (``miss_budget``, ``recall_limit``,
    ``context_chars``)."""

    def __init__(
        self,
        memory: MemoryBackend,
        cache: ContextCache,
        metrics: Metrics,
        *,
        delivery: Delivery | None = None,
        max_text: int = MAX_TEXT,
        **loading: Unpack[LoaderOptions],
    ) -> None:
        self.memory = memory
        self.delivery = delivery
        self.metrics = metrics
        self.max_text = max_text
        self.tasks = TaskTracker()
        self.loader = ContextLoader(memory, cache, metrics, **loading)

    def answer_now(self, message: Message, session: Session) -> Reply | None:
        """The reply to a chat:start the in-process cache can answer at once, else None.

        This is the hit path: no I/O, no task. It is taken only when no file:write of the
        connection is still invalidating, so read-your-writes holds.
        """
        if not isinstance(message, ChatStart) or session.has_open_gates():
            return None
        started = time.perf_counter_ns()
        project = message.project or session.project
        lookup = self.loader.cached(project, message.query)
        if lookup is None:
            return None
        self.tasks.open(project, session.session_of(message), message.query)
        elapsed = time.perf_counter_ns() - started
        self.metrics.cache_hit(project, elapsed / 1e9)
        return Context(id=message.id, hit=True, inject=lookup.inject, elapsed_us=elapsed // 1000)

    def begin(self, message: Message, session: Session, emit: Emit) -> Coroutine[Any, Any, Reply]:
        """Start handling ``message``: returns the coroutine that yields its final reply.

        Ordering against later messages of the connection is settled here, synchronously,
        before the caller schedules the coroutine. ``emit`` sends intermediate replies
        (export chunks). The coroutine never raises BridgeError: failures become ok:false.
        """
        work: Awaitable[Reply]
        match message:
            case ChatStart():
                self.tasks.open(
                    session.project_of(message), session.session_of(message), message.query
                )
                work = self._chat_start(message, session, session.open_gates())
            case FileWrite():
                work = self._file_write(message, session, session.open_gate())
            case ErrorEvent() | Completion() | Note():
                work = self._record(message, session)
            case Query():
                work = self._query(message, session)
            case Export():
                work = self._export(message, session, emit)
            case Ping():
                work = self._ping(message)
            case Forget():
                work = self._forget(message, session, session.open_gate())
        return self._guarded(message, work)

    async def _guarded(self, message: Message, work: Awaitable[Reply]) -> Reply:
        kind = message.__struct_config__.tag
        started = time.perf_counter()
        try:
            return await work
        except BridgeError as e:
            self.metrics.error(e.code, str(kind))
            log.warning("%s %r failed: %s", kind, message.id, e)
            return error_ack(message.id, e)
        except Exception as e:
            self.metrics.error("internal", str(kind))
            log.exception("%s %r failed unexpectedly", kind, message.id)
            return error_ack(message.id, e)
        finally:
            self.metrics.request_duration(str(kind), time.perf_counter() - started)

    async def _chat_start(
        self, message: ChatStart, session: Session, gates: tuple[asyncio.Future[None], ...]
    ) -> Context:
        started = time.perf_counter_ns()
        if gates:
            await asyncio.wait(gates)
        loaded = await self.loader.load(session.project_of(message), message.query)
        # Sent in the step ``load`` returned in: a fill of the answer waits for that.
        return Context(
            id=message.id,
            hit=loaded.hit,
            inject=loaded.inject,
            elapsed_us=(time.perf_counter_ns() - started) // 1000,
        )

    async def drain(self) -> None:
        """Wait for background work: memory queries past their budget, cache fills."""
        await self.loader.drain()

    # -- episodes -------------------------------------------------------------------------

    async def _file_write(
        self, message: FileWrite, session: Session, gate: asyncio.Future[None]
    ) -> Ack:
        try:
            await self.loader.invalidate_path(session.project_of(message), message.path)
        finally:
            session.close_gate(gate)
        # Again once stored (see ``describe``): a miss that read memory between the two
        # would otherwise cache a context without this episode.
        return await self._record(message, session)

    async def _record(self, message: EpisodeEvent, session: Session) -> Ack:
        """The path of every episode event: store its episode, count it, drop the cached
        contexts it makes stale, acknowledge."""
        project = session.project_of(message)
        event = describe(message, self.max_text)
        kind = event.kind
        if kind.task:
            links = self.tasks.metadata(project, session.session_of(message), message.session)
        else:
            links = {"session": message.session} if message.session is not None else {}
        episode = _episode(
            project,
            name=event.name,
            body=kind.prefix + event.text,
            source_description=kind.source,
            metadata={"type": kind.type, **event.fields, **links},
            episode_id=episode_uuid(project, message.episode_id) if message.episode_id else None,
            reference_time=_happened(message),
        )
        queued = await self._store(episode, kind.type)
        if kind.alert:  # only once it is stored, and only as stored: it leaves the machine
            self.metrics.opencode_error(episode.body.removeprefix(kind.prefix), project)
        if event.tokens:
            self.metrics.tokens_used(event.tokens, project)
        if event.stale is None:
            await self.loader.invalidate_project(project)
        else:
            await self.loader.invalidate_paths(project, event.stale)
        return Ack(id=message.id, ok=True, episode=episode.uuid, queued=queued)

    async def _store(self, episode: Episode, kind: str) -> bool:
        """Make an episode durable; True if it waits in the outbox rather than in memory."""
        if self.delivery is not None:
            queued = await self.delivery.store(episode)
        else:
            await self.memory.store(episode)
            queued = False
        self.metrics.episode_stored(kind)
        self.loader.memory_changed()
        return queued

    async def episode_delivered(self, episode: Episode) -> None:
        """An outbox episode reached memory late: contexts cached meanwhile lack it."""
        await self.loader.invalidate_paths(episode.group_id, mentioned(episode.body))

    # -- forget ---------------------------------------------------------------------------

    async def _forget(self, message: Forget, session: Session, gate: asyncio.Future[None]) -> Ack:
        kind, value = message.selector
        try:
            forgotten = await self.forget(session.project_of(message), Selector(kind, value))
        finally:
            session.close_gate(gate)  # a later chat:start of the connection waited for it
        return Ack(id=message.id, ok=True, forgotten=forgotten)

    async def forget(self, project: str, selector: Selector) -> int:
        """Forget what ``selector`` names in ``project``; return how many episodes went.

        Once this returns, no recall, query, export or cached context of any bridge on the
        same Valkey holds them. Episodes still waiting in the outbox are delivered first
        (up to the store timeout), so none comes back after its forget.
        """
        await self._outbox_delivered()
        # A session or task forgotten while open: its next events start afresh.
        if selector.kind == "session":
            self.tasks.drop(project, session=selector.value)
        elif selector.kind == "task":
            self.tasks.drop(project, task=selector.value)
        forgotten = await self.memory.forget(project, selector)
        self.loader.memory_changed()
        await self.loader.invalidate_project(project)
        return forgotten

    async def _outbox_delivered(self) -> None:
        if self.delivery is None or not self.delivery.outbox.pending:
            return
        if not await self.delivery.flush(self.delivery.store_timeout):
            waiting = self.delivery.outbox.pending
            raise MemoryUnavailable(
                f"{waiting} acknowledged episodes still wait in the outbox for memory; "
                "forget once they are delivered"
            )

    # -- reads ----------------------------------------------------------------------------

    async def search(self, project: str, query: str) -> Ranked:
        """Files and past tasks for ``query``, ranked as a chat:start's context ranks them."""
        return rank(await self.memory.candidates(project, scrub(query)))

    async def list_tasks(self, project: str, limit: int, before_seq: int | None) -> list[TaskHit]:
        """The project's tasks, newest first (a page of ``limit``, older than ``before_seq``)."""
        return await self.memory.newest_tasks(project, limit, before_seq)

    async def projects(self) -> list[str]:
        """The projects memory holds, most recently active first."""
        return await self.memory.projects()

    async def _query(self, message: Query, session: Session) -> QueryResult:
        project = session.project_of(message)
        query = scrub(message.query)
        recall = await self.memory.recall(project, query, message.limit)
        # Rendered as a chat:start miss renders it, but neither cached nor opening a task.
        inject = await self.loader.uncached(project, query)
        return QueryResult(id=message.id, episodes=recall.episodes, context=inject)

    async def _export(self, message: Export, session: Session, emit: Emit) -> ExportEnd:
        count = 0
        seq = 0
        async for batch in self.memory.export(session.project_of(message), message.chunk_size):
            await emit(ExportChunk(id=message.id, seq=seq, episodes=batch))
            count += len(batch)
            seq += 1
        return ExportEnd(id=message.id, count=count)

    async def _ping(self, message: Ping) -> Pong:
        return Pong(id=message.id)
