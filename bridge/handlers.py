"""One handler per client message, over the memory, cache and metrics interfaces.

Nothing here touches a socket: ``Handlers.begin`` takes a decoded message and returns the
coroutine that produces its reply, so tests can drive every event without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from bridge.cache import ContextCache, normalise_query
from bridge.episode import Episode, episode_uuid, new_episode
from bridge.errors import BridgeError, CacheUnavailable, MemoryUnavailable
from bridge.memory.base import MemoryBackend, Selector
from bridge.metrics import Metrics
from bridge.outbox import Delivery
from bridge.paths import paths_in
from bridge.privacy import scrub, scrub_episode
from bridge.protocol import (
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
from bridge.recall import DEFAULT_BUDGET, TASKS_SHOWN, Ranked, TaskHit, context, rank
from bridge.tasks import TaskTracker

log = logging.getLogger(__name__)

Emit = Callable[[Reply], Awaitable[None]]
_FlightKey = tuple[str, str, bytes | None, int]
MAX_MENTIONS = 16  # paths in one error or task whose cached contexts are dropped
FILL_DELAY_S = 0.001  # a cache fill waits at most this long for the miss's reply to go out


def _episode(group_id: str, **fields: Any) -> Episode:
    """The episode of a client's event, as memory may keep it: every episode is built here,
    so none holds a private span, an injected context or a secret (bridge/privacy.py)."""
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
    """The per-event logic of the bridge."""

    def __init__(
        self,
        memory: MemoryBackend,
        cache: ContextCache,
        metrics: Metrics,
        *,
        recall_limit: int = TASKS_SHOWN,
        miss_budget: float = 0.25,
        delivery: Delivery | None = None,
        context_chars: int = DEFAULT_BUDGET,
        max_text: int = 65_536,
    ) -> None:
        self.memory = memory
        self.delivery = delivery
        self.cache = cache
        self.metrics = metrics
        self.recall_limit = recall_limit
        self.miss_budget = miss_budget
        self.context_chars = context_chars
        self.max_text = max_text
        self.tasks = TaskTracker()
        self._flights: dict[_FlightKey, asyncio.Task[str | None]] = {}
        self._stored = 0  # episodes this process stored (or queued), for flight keys
        self._fills: dict[tuple[str, str], asyncio.Task[None]] = {}
        # Resolved once an asker has the answer a fill caches (see ``_fill``).
        self._answered: dict[tuple[str, str], asyncio.Future[None]] = {}

    def answer_now(self, message: Message, session: Session) -> Reply | None:
        """The reply to a chat:start the in-process cache can answer at once, else None.

        This is the hit path: no I/O, no task. It is taken only when no file:write of the
        connection is still invalidating, so read-your-writes holds.
        """
        if not isinstance(message, ChatStart) or session.has_open_gates():
            return None
        started = time.perf_counter_ns()
        project = message.project or session.project
        lookup = self.cache.lookup_local(project, message.query)
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
            case ErrorEvent():
                work = self._error(message, session)
            case Completion():
                work = self._completion(message, session)
            case Query():
                work = self._query(message, session)
            case Export():
                work = self._export(message, session, emit)
            case Ping():
                work = self._ping(message)
            case Note():
                work = self._note(message, session)
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

    # -- chat:start -----------------------------------------------------------------------

    async def _chat_start(
        self, message: ChatStart, session: Session, gates: tuple[asyncio.Future[None], ...]
    ) -> Context:
        started = time.perf_counter_ns()
        if gates:
            await asyncio.wait(gates)
        project = session.project_of(message)
        asked = (project, normalise_query(message.query))
        if fill := self._fills.get(asked):
            await asyncio.wait([fill])  # the answer to the same question is being cached
        try:
            lookup = await self.cache.lookup(project, message.query)
        except CacheUnavailable:
            lookup = None
        if lookup is not None and lookup.hit:
            self.metrics.cache_hit(project)
            return Context(
                id=message.id,
                hit=True,
                inject=lookup.inject,
                elapsed_us=(time.perf_counter_ns() - started) // 1000,
            )
        self.metrics.cache_miss(project)
        flight = self._flight(asked, message.query, lookup.epoch if lookup else None)
        # asyncio.wait never cancels what it waits for: past the budget the flight goes on
        # and fills the cache for the next turn (one future less than wait_for on a shield).
        await asyncio.wait([flight], timeout=self.miss_budget)
        inject = flight.result() if flight.done() else None
        if (answered := self._answered.get(asked)) is not None and not answered.done():
            answered.set_result(None)  # the fill may go: this reply is sent in this same step
        return Context(
            id=message.id,
            hit=False,
            inject=inject,
            elapsed_us=(time.perf_counter_ns() - started) // 1000,
        )

    def _flight(
        self, asked: tuple[str, str], query: str, epoch: bytes | None
    ) -> asyncio.Task[str | None]:
        """The one memory query in progress for this (project, normalised query) and epoch."""
        # A flight started before an episode was stored must not answer a request that came
        # after it: the key includes the cache epoch and, for when the cache is down (no
        # epoch), this process's count of stored episodes.
        key = (*asked, epoch, self._stored)
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.create_task(self._recall_and_fill(asked, query, epoch))
            self._flights[key] = flight
            flight.add_done_callback(lambda task: self._flight_done(key, task))
        return flight

    def _flight_done(self, key: _FlightKey, task: asyncio.Task[str | None]) -> None:
        self._flights.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            log.warning("memory query failed: %r", task.exception())

    async def _recall_and_fill(
        self, asked: tuple[str, str], query: str, epoch: bytes | None
    ) -> str | None:
        project = asked[0]
        inject = await self._context_for(project, scrub(query))
        # An empty answer is not cached: the next episode may be the one it lacked, and an
        # empty recall is cheap. The answer need not wait for the cache to take it.
        if epoch is not None and inject is not None:
            answered = asyncio.get_running_loop().create_future()
            fill = asyncio.create_task(self._fill(project, query, inject, epoch, answered))
            self._fills[asked] = fill
            self._answered[asked] = answered
            fill.add_done_callback(lambda done: self._fill_done(asked, done))
        return inject

    def _fill_done(self, key: tuple[str, str], fill: asyncio.Task[None]) -> None:
        if self._fills.get(key) is fill:
            del self._fills[key]
            self._answered.pop(key, None)

    async def _fill(
        self, project: str, query: str, inject: str, epoch: bytes, answered: asyncio.Future[None]
    ) -> None:
        # The fill was made in the flight, before the asker even had the answer: let the
        # reply go out first rather than put the context's tags and a round trip to Valkey
        # ahead of it. The asker resolves ``answered`` in the step that sends its reply, so
        # the fill starts just after the send, while the client reads the reply; if nobody
        # asks any more (the asker gave up at its budget) it waits FILL_DELAY_S at most.
        # Identical questions meanwhile wait for the fill (see above).
        await asyncio.wait([answered], timeout=FILL_DELAY_S)
        tags = paths_in(query) | paths_in(inject)
        with contextlib.suppress(CacheUnavailable):  # counted by the cache
            await self.cache.put(project, query, inject, tags, epoch)

    async def drain(self) -> None:
        """Wait for background work: memory queries past their budget, cache fills."""
        if self._flights:
            await asyncio.wait(list(self._flights.values()))
        if self._fills:
            await asyncio.wait(list(self._fills.values()))

    # -- episodes -------------------------------------------------------------------------

    async def _file_write(
        self, message: FileWrite, session: Session, gate: asyncio.Future[None]
    ) -> Ack:
        project = session.project_of(message)
        try:
            await self._invalidate(project, message.path)
        finally:
            session.close_gate(gate)
        episode = _episode(
            project,
            name=f"file:write {message.path}",
            body=f"Modified: {message.path}",
            source_description="OpenCode file write",
            metadata={"type": "file_edit", "path": message.path, **self._links(message, session)},
            episode_id=self._episode_id(project, message),
            reference_time=_happened(message),
        )
        queued = await self._store(episode, "file_edit")
        # Again after the store: a miss that read memory between the two would otherwise
        # cache a context without this episode.
        await self._invalidate(project, message.path)
        return Ack(id=message.id, ok=True, episode=episode.uuid, queued=queued)

    async def _store(self, episode: Episode, kind: str) -> bool:
        """Make an episode durable; True if it waits in the outbox rather than in memory."""
        if self.delivery is not None:
            queued = await self.delivery.store(episode)
        else:
            await self.memory.store(episode)
            queued = False
        self.metrics.episode_stored(kind)
        self._stored += 1
        return queued

    async def episode_delivered(self, episode: Episode) -> None:
        """An outbox episode reached memory late: contexts cached meanwhile lack it."""
        await self._invalidate_mentions(episode.group_id, episode.body)

    async def _invalidate_mentions(self, project: str, text: str) -> None:
        """Drop contexts naming a file the text names: the new episode belongs in them."""
        for path in sorted(paths_in(text))[:MAX_MENTIONS]:
            await self._invalidate(project, path)

    def _links(
        self, message: FileWrite | ErrorEvent | Completion, session: Session
    ) -> dict[str, Any]:
        """The task links of an episode: its task, the task's query, the client's session."""
        project = session.project_of(message)
        return self.tasks.metadata(project, session.session_of(message), message.session)

    @staticmethod
    def _episode_id(project: str, message: EpisodeMessage) -> str | None:
        return episode_uuid(project, message.episode_id) if message.episode_id else None

    async def _invalidate(self, project: str, path: str) -> None:
        with contextlib.suppress(CacheUnavailable):  # kept and replayed by the cache
            await self.cache.invalidate_path(project, path)

    async def _error(self, message: ErrorEvent, session: Session) -> Ack:
        project = session.project_of(message)
        episode = _episode(
            project,
            name="error",
            body=f"Error: {message.message}",
            source_description="OpenCode error",
            metadata={"type": "error", "severity": "high", **self._links(message, session)},
            episode_id=self._episode_id(project, message),
            reference_time=_happened(message),
        )
        queued = await self._store(episode, "error")
        # Only once it is stored, and only as stored: the event leaves the machine.
        self.metrics.opencode_error(episode.body.removeprefix("Error: "), project)
        await self._invalidate_mentions(project, message.message)
        return Ack(id=message.id, ok=True, episode=episode.uuid, queued=queued)

    async def _completion(self, message: Completion, session: Session) -> Ack:
        project = session.project_of(message)
        episode = _episode(
            project,
            name="completion",
            body=f"Completed: {message.task}",
            source_description="OpenCode task completion",
            metadata={
                "type": "success",
                "duration": message.duration_ms,
                "tokens": message.tokens,
                **({"summary": message.summary[: self.max_text]} if message.summary else {}),
                **self._links(message, session),
            },
            episode_id=self._episode_id(project, message),
            reference_time=_happened(message),
        )
        queued = await self._store(episode, "success")
        await self._invalidate_mentions(project, message.task)
        if message.tokens:
            self.metrics.tokens_used(message.tokens, project)
        return Ack(id=message.id, ok=True, episode=episode.uuid, queued=queued)

    async def _note(self, message: Note, session: Session) -> Ack:
        project = session.project_of(message)
        links = {"session": message.session} if message.session is not None else {}
        episode = _episode(
            project,
            name="note",
            body=f"Note: {message.text}",
            source_description="OpenCode note",
            # a task of its own: a note neither ends nor is ended by the session's turn
            metadata={"type": "note", **links},
            episode_id=self._episode_id(project, message),
            reference_time=_happened(message),
        )
        queued = await self._store(episode, "note")
        # Saved on purpose, so the next chat recalls it: every cached context goes.
        await self._invalidate_project(project)
        return Ack(id=message.id, ok=True, episode=episode.uuid, queued=queued)

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
        self._stored += 1  # memory changed: a flight begun before must not answer after
        await self._invalidate_project(project)
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

    async def _invalidate_project(self, project: str) -> None:
        with contextlib.suppress(CacheUnavailable):  # kept and replayed by the cache
            await self.cache.invalidate_project(project)

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
        inject = await self._context_for(project, query)
        return QueryResult(id=message.id, episodes=recall.episodes, context=inject)

    async def _context_for(self, project: str, scrubbed: str) -> str | None:
        """The memory context for a query, as a chat:start injects it. Memory is searched
        with the scrubbed query: a backend may send it on (an embedding API, a script's
        arguments), and it then matches the scrubbed episodes."""
        found = await self.memory.candidates(project, scrubbed)
        return context(found, self.context_chars, tasks=self.recall_limit)

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
