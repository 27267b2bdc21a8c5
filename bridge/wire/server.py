"""The WebSocket server: frames in, handler calls, frames out; and on the same port, the
plain HTTP answers (``/healthz``, ``/readyz``, the memory page of ``bridge.wire.web.page``).

This is the only module that imports websockets. Per connection, frames are read in order
and decoded; a chat:start the in-process cache can answer is answered at once, and every
other message runs as its own task, so a slow memory query never holds a cache hit up
behind it. At most ``max_inflight`` tasks run per connection; beyond that the server stops
reading the connection (backpressure) until one finishes.

Admission happens at the handshake: a shared bearer token (compared in constant time),
browser Origins, and a cap on connections; a refused handshake reads nothing else, and a
malformed one gets a 4xx naming what was wrong, never a 500. After it, a bad frame or a
message over the connection's rate gets an ok:false ack and the connection goes on.

Replies are written one at a time per connection, and only while less than the write
limit is waiting to go out: a client that reads slowly holds up its own replies (and, as
the server then stops reading it, its own requests) and nobody else's. Exports run one at
a time per connection, so chunks are produced as fast as the client reads them. A client
that reads nothing for ``send_deadline`` seconds while a reply waits is disconnected.
Besides the client, only a stuck reader, a keepalive ping left unanswered for 20 s, a
frame too large to read at all (close code 1009) or a shutdown (1001) ends a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import msgspec
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Origin

from bridge.config import Config
from bridge.deadline import CANCEL_WAIT, Deadline
from bridge.episode import Episode
from bridge.errors import BadRequest, RateLimited
from bridge.metrics import Metrics
from bridge.wire.handlers import Emit, Handlers, Session
from bridge.wire.health import ReadinessReport
from bridge.wire.limits import TokenBucket
from bridge.wire.protocol import Codec, Export, ExportChunk, Limits, Reply, encode, error_ack
from bridge.wire.web.page import MemoryPage, is_page_path

log = logging.getLogger(__name__)

# Frames above max_frame get a bad_request reply; the transport refuses (close 1009) only
# frames so large that reading them at all would be a risk.
HARD_FRAME_FACTOR = 4
# Bytes of replies a connection may have waiting in user space before the next one waits
# (websockets' write_limit; the kernel's socket buffer comes on top of it).
WRITE_LIMIT = 32 * 1024
# Frames read from a connection and not yet handled before the server stops reading it.
MAX_QUEUE = 4
# Seconds a reply may wait on a client that reads nothing before the connection is cut.
SEND_DEADLINE = 30.0
# An export chunk that encodes larger than this goes out as several smaller chunks.
EXPORT_FRAME_BYTES = 1 << 20
# Refused handshakes of one HTTP status are logged at most once per this many seconds; the
# line after a quiet spell says how many went unlogged.
REFUSAL_LOG_INTERVAL = 60.0

Readiness = Callable[[], Awaitable[ReadinessReport]]


class _RedactCredentials(logging.Filter):
    """Keep tokens out of websockets' debug logs of handshake headers."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (
            isinstance(args, tuple)
            and len(args) == 2
            and str(args[0]).lower() in ("authorization", "cookie")
        ):
            record.args = (args[0], "[redacted]")
        return True


_ws_log = logging.getLogger("bridge.websockets")
_ws_log.addFilter(_RedactCredentials())


class Server:
    """A WebSocket endpoint for the bridge protocol, with explicit start and stop."""

    def __init__(
        self, config: Config, handlers: Handlers, metrics: Metrics, readiness: Readiness
    ) -> None:
        self.config = config
        self.handlers = handlers
        self.metrics = metrics
        self.readiness = readiness
        self.port = config.server.port
        bounds = config.limits
        limits = Limits(text=bounds.max_text, path=bounds.max_path, name=bounds.max_name)
        self.codec = Codec(bounds.max_frame, limits)
        self.connections = 0
        self._server: WsServer | None = None
        self._inflight = 0  # requests running or waiting to (exports), all connections
        self._idle = asyncio.Event()
        self._idle.set()
        token = config.server.token
        self._token = _digest(token.encode()) if token else None
        self.page = MemoryPage(
            handlers,
            default_project=config.project,
            limits=limits,
            authorized=self._authorized if self._token is not None else None,
            loopback=config.server.loopback_only,
        )
        self.send_deadline = SEND_DEADLINE
        number = config.server.worker
        worker = f" (worker {number}, pid {os.getpid()})" if number else ""
        self._alive = f"ok{worker}\n"  # /healthz: which worker answered, when there are several
        self.refusal_log_interval = REFUSAL_LOG_INTERVAL
        self._refusals: dict[int, tuple[float, int]] = {}  # status: (last logged, unlogged)

    async def start(self) -> None:
        """Listen; once this returns, ``port`` is the bound port (even if 0 was asked)."""
        self._server = await serve(
            self._serve_connection,
            self.config.server.host,
            self.config.server.port,
            max_size=self.config.limits.max_frame * HARD_FRAME_FACTOR,
            compression=None,
            origins=[None, *(Origin(o) for o in self.config.server.allowed_origins)],
            process_request=self._admit,
            ping_interval=20,
            ping_timeout=20,
            write_limit=WRITE_LIMIT,
            max_queue=MAX_QUEUE,
            logger=_ws_log,
            # The workers of ``serve --workers N`` share the port; the kernel spreads
            # connections over them.
            reuse_port=self.config.server.workers > 1,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self, deadline: Deadline | None = None) -> None:
        """Stop accepting, let in-flight requests finish, then close every connection with
        1001 (going away); past ``deadline`` (by default one of ``--shutdown-deadline``
        from now) what still runs is cancelled, unanswered. Idempotent."""
        if self._server is None:
            return
        deadline = (deadline or Deadline(self.config.server.shutdown_deadline)).start()
        server, self._server = self._server, None
        server.server.close()  # no new connections from here on
        if not self._idle.is_set():
            try:
                await asyncio.wait_for(self._idle.wait(), deadline.remaining())
            except TimeoutError:
                log.warning("%d requests still running at the shutdown deadline", self._inflight)
        server.close(close_connections=True)
        if not await deadline.run(server.wait_closed(), "closing connections", closing=True):
            handlers = list(server.handler_tasks)
            for handler in handlers:  # each cancels its requests still running
                handler.cancel()
            if handlers:
                await asyncio.wait(handlers, timeout=CANCEL_WAIT)

    # -- handshake ------------------------------------------------------------------------

    async def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer health checks; refuse malformed handshakes, a missing or wrong token, and
        connections over the cap, each with its own status and reason."""
        target = _split(request.path)
        if target is None:
            return self._refuse(connection, HTTPStatus.BAD_REQUEST, "malformed request path")
        if target.path == "/healthz":
            return connection.respond(HTTPStatus.OK, self._alive)
        if target.path == "/readyz":
            readiness = await self.readiness()
            return connection.respond(readiness.status, readiness.body())
        # A WebSocket to a project named "memory" is still one; the page checks the token
        # of its own API calls.
        if is_page_path(target.path) and "Upgrade" not in request.headers:
            return await self._serve_page(request, target)
        if self._token is not None:
            given = request.headers.get_all("Authorization")
            if len(given) > 1:
                return self._refuse(
                    connection, HTTPStatus.BAD_REQUEST, "more than one Authorization header"
                )
            if not self._authorized(given[0] if given else ""):
                response = self._refuse(
                    connection, HTTPStatus.UNAUTHORIZED, "missing or wrong token", "unauthorized"
                )
                response.headers["WWW-Authenticate"] = 'Bearer realm="graphiti-bridge"'
                return response
        if self.connections >= self.config.limits.max_connections:
            return self._refuse(
                connection,
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"too many connections (limit {self.config.limits.max_connections})",
                "too_many_connections",
            )
        return None

    async def _serve_page(self, request: Request, target: SplitResult) -> Response:
        """The memory page's answer to a plain HTTP request (see bridge/wire/web/page.py)."""
        reply = await self.page.handle(
            request.method, target.path, target.query, request.headers.get_all
        )
        headers = Headers(
            [
                ("Date", formatdate(usegmt=True)),
                ("Connection", "close"),
                ("Content-Length", str(len(reply.body))),
                ("Content-Type", reply.content_type),
                *reply.headers.items(),
            ]
        )
        return Response(reply.status, HTTPStatus(reply.status).phrase, headers, reply.body)

    def _refuse(
        self,
        connection: ServerConnection,
        status: HTTPStatus,
        reason: str,
        code: str = "bad_request",
    ) -> Response:
        self.metrics.error(code, "handshake")
        self._log_refusal(connection, status, reason)
        return connection.respond(status, reason + "\n")

    def _log_refusal(self, connection: ServerConnection, status: HTTPStatus, reason: str) -> None:
        """One line per refused handshake, at most one per status and interval: the client's
        address, the status and the reason, never a header (so never a token)."""
        now = time.monotonic()
        last = self._refusals.get(status)
        if last is not None and now - last[0] < self.refusal_log_interval:
            self._refusals[status] = (last[0], last[1] + 1)
            return
        unlogged = last[1] if last is not None else 0
        self._refusals[status] = (now, 0)
        peer = connection.remote_address[0] if connection.remote_address else "?"
        more = f" ({unlogged} more since the last such line)" if unlogged else ""
        log.warning("refused a handshake from %s: HTTP %d, %s%s", peer, status, reason, more)

    def _authorized(self, credentials: str) -> bool:
        """``Bearer <token>``, the scheme in any case (RFC 7235); the token in constant time."""
        assert self._token is not None
        scheme, _, token = credentials.strip().partition(" ")
        # Headers arrive decoded as ISO-8859-1: encoding back gives the bytes sent. Both
        # sides are hashed first, so not even the token's length shows in the timing.
        given = _digest(token.strip().encode("latin-1", "replace"))
        return hmac.compare_digest(given, self._token) and scheme.lower() == "bearer"

    def project_from_path(self, path: str) -> str:
        """The project named by the connection URL's path, or the server default."""
        target = _split(path)
        name = unquote(target.path).strip("/") if target is not None else ""
        return name if 0 < len(name) <= self.config.limits.max_name else self.config.project

    # -- connection -----------------------------------------------------------------------

    async def _serve_connection(self, ws: ServerConnection) -> None:
        session = Session(self.project_from_path(ws.request.path if ws.request else "/"))
        inflight = asyncio.Semaphore(self.config.limits.max_inflight)
        out = _Outgoing(ws, self.send_deadline, self.metrics)
        exports: deque[tuple[Export, bool]] = deque()  # run one at a time, in order
        exporting: asyncio.Task[None] | None = None
        rate = TokenBucket(self.config.limits.rate_limit, self.config.limits.rate_burst)
        running: set[asyncio.Task[None]] = set()
        self.connections += 1
        self.metrics.connections(self.connections)
        try:
            async for frame in ws:
                binary = not isinstance(frame, str)
                try:
                    message = self.codec.decode(frame)
                except BadRequest as e:
                    self.metrics.error(e.code, "invalid")
                    await out.send(error_ack(e.message_id, e), binary)
                    continue
                except Exception as e:  # a decoder bug must not cost the connection
                    log.exception("undecodable frame")
                    await out.send(error_ack(None, e), binary)
                    continue
                if not rate.allow():
                    limited = RateLimited(
                        f"over {self.config.limits.rate_limit:g} messages/s; "
                        f"retry in {rate.retry_after() * 1000:.0f} ms"
                    )
                    self.metrics.error(limited.code, "invalid")
                    await out.send(error_ack(message.id, limited), binary)
                    continue
                if (reply := self.handlers.answer_now(message, session)) is not None:
                    await out.send(reply, binary)
                    continue
                await inflight.acquire()
                self._started()
                if isinstance(message, Export):
                    exports.append((message, binary))
                    if exporting is None or exporting.done():
                        exporting = asyncio.create_task(
                            self._run_exports(exports, session, out, inflight)
                        )
                    continue
                emit = out.emitter(binary)
                work = self.handlers.begin(message, session, emit)  # ordering settled here
                task = asyncio.create_task(self._respond(work, emit, inflight))
                running.add(task)
                task.add_done_callback(running.discard)
        except ConnectionClosed:
            pass
        finally:
            self.connections -= 1
            self.metrics.connections(self.connections)
            for _ in exports:  # exports nobody will read are not started
                self._finished(inflight)
            exports.clear()
            if exporting is not None:  # nor finished: they only read
                exporting.cancel()
                running.add(exporting)
            if running:  # stores already under way finish even if nobody hears the ack
                try:
                    await asyncio.wait(running)
                except asyncio.CancelledError:  # unless the shutdown deadline has passed
                    for task in running:
                        task.cancel()
                    raise

    async def _run_exports(
        self,
        queue: deque[tuple[Export, bool]],
        session: Session,
        out: _Outgoing,
        inflight: asyncio.Semaphore,
    ) -> None:
        """Run a connection's exports one after the other: each produces its chunks only as
        fast as the client reads them, and holds at most one chunk at a time."""
        while queue:
            message, binary = queue.popleft()
            emit = out.chunking_emitter(binary)
            await self._respond(self.handlers.begin(message, session, emit), emit, inflight)

    async def _respond(
        self, work: Coroutine[Any, Any, Reply], emit: Emit, inflight: asyncio.Semaphore
    ) -> None:
        try:
            await emit(await work)
        finally:
            self._finished(inflight)

    def _started(self) -> None:
        self._inflight += 1
        self._idle.clear()

    def _finished(self, inflight: asyncio.Semaphore) -> None:
        inflight.release()
        self._inflight -= 1
        if not self._inflight:
            self._idle.set()

    def outgoing_bytes(self) -> int:
        """Bytes of replies waiting in this process to be written, all connections."""
        if self._server is None:
            return 0
        return sum(c.transport.get_write_buffer_size() for c in self._server.connections)


class _Outgoing:
    """A connection's replies, written one at a time under the write limit.

    Small replies to a client that keeps up are written at once. Otherwise the writer
    waits for websockets' drain, watching the buffer: if it does not shrink for
    ``deadline`` seconds the client has stopped reading, and the connection is cut.
    """

    def __init__(self, ws: ServerConnection, deadline: float, metrics: Metrics) -> None:
        self._ws = ws
        self._deadline = deadline
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self._low = ws.transport.get_write_buffer_limits()[0]

    def emitter(self, binary: bool) -> Emit:
        """An ``Emit`` for handlers: sends each reply in the connection's encoding."""

        async def emit(reply: Reply) -> None:
            await self.send(reply, binary)

        return emit

    def chunking_emitter(self, binary: bool) -> Emit:
        """An ``Emit`` for one export: a chunk larger than EXPORT_FRAME_BYTES goes out as
        several smaller ones, numbered on so that ``seq`` stays consecutive."""
        seq = 0

        async def emit(reply: Reply) -> None:
            nonlocal seq
            if not isinstance(reply, ExportChunk):
                await self.send(reply, binary)
                return
            for part in _parts(reply.episodes, binary):
                await self.send(ExportChunk(id=reply.id, seq=seq, episodes=part), binary)
                seq += 1

        return emit

    async def send(self, reply: Reply, binary: bool) -> None:
        """Write one reply; returns once it is written (or the client is gone)."""
        data = encode(reply, binary)
        async with self._lock:
            transport = self._ws.transport
            if transport.is_closing():
                return
            if transport.get_write_buffer_size() + len(data) <= self._low:
                with contextlib.suppress(ConnectionClosed):  # nothing to tell a client gone
                    await self._ws.send(data, text=not binary)
                return
            await self._send_watched(data, binary)

    async def _send_watched(self, data: bytes, binary: bool) -> None:
        sending = asyncio.ensure_future(self._ws.send(data, text=not binary))
        transport = self._ws.transport
        loop = asyncio.get_running_loop()
        waiting, moved = transport.get_write_buffer_size(), loop.time()
        try:
            while not sending.done():
                await asyncio.wait([sending], timeout=min(1.0, self._deadline / 4))
                if sending.done():
                    break
                size = transport.get_write_buffer_size()
                if size < waiting:
                    waiting, moved = size, loop.time()
                elif loop.time() - moved >= self._deadline:
                    log.warning(
                        "closing a connection that read nothing for %.0f s (%d bytes waiting)",
                        self._deadline,
                        size,
                    )
                    self._metrics.error("slow_reader", "send")
                    transport.abort()
                    await asyncio.wait([sending])
            with contextlib.suppress(ConnectionClosed):
                sending.result()
        finally:
            sending.cancel()


def _parts(episodes: list[Episode], binary: bool) -> list[list[Episode]]:
    """Episodes in runs whose encoding stays under EXPORT_FRAME_BYTES (one at least)."""
    encoder = msgspec.msgpack.encode if binary else msgspec.json.encode
    parts: list[list[Episode]] = [[]]
    size = 0
    for episode in episodes:
        length = len(encoder(episode))
        if parts[-1] and size + length > EXPORT_FRAME_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(episode)
        size += length
    return parts


def _split(path: str) -> SplitResult | None:
    """The request target split into parts, or None when it cannot be parsed."""
    try:
        return urlsplit(path)
    except ValueError:  # e.g. an unclosed "[" taken for an IPv6 address
        return None


def _digest(token: bytes) -> bytes:
    digest: bytes = hashlib.sha256(token).digest()
    return digest
