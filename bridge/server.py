"""The WebSocket server: frames in, handler calls, frames out.

This is the only module that imports websockets. Per connection, frames are read in order
and decoded; a chat:start the in-process cache can answer is answered at once, and every
other message runs as its own task, so a slow memory query never holds a cache hit up
behind it. At most ``max_inflight`` tasks run per connection; beyond that the server stops
reading the connection (backpressure) until one finishes.

Admission happens at the handshake: a shared bearer token (compared in constant time),
browser Origins, and a cap on connections; a refused handshake reads nothing else. After
it, a bad frame or a message over the connection's rate gets an ok:false ack and the
connection goes on. Only the client or a shutdown (close code 1001) ends a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Coroutine
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, urlsplit

from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Origin

from bridge.config import Config
from bridge.errors import BadRequest, RateLimited
from bridge.handlers import Emit, Handlers, Session
from bridge.limits import TokenBucket
from bridge.metrics import Metrics
from bridge.protocol import Codec, Limits, Reply, encode, error_ack

log = logging.getLogger(__name__)

# Frames above max_frame get a bad_request reply; the transport refuses (close 1009) only
# frames so large that reading them at all would be a risk.
HARD_FRAME_FACTOR = 4

Readiness = Callable[[], Awaitable[list[str]]]


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
        self.port = config.port
        self.codec = Codec(
            config.max_frame,
            Limits(text=config.max_text, path=config.max_path, name=config.max_name),
        )
        self.connections = 0
        self._server: WsServer | None = None
        self._inflight = 0  # handler tasks running, all connections
        self._idle = asyncio.Event()
        self._idle.set()
        self._token = f"Bearer {config.token}".encode() if config.token else None

    async def start(self) -> None:
        """Listen; once this returns, ``port`` is the bound port (even if 0 was asked)."""
        self._server = await serve(
            self._serve_connection,
            self.config.host,
            self.config.port,
            max_size=self.config.max_frame * HARD_FRAME_FACTOR,
            compression=None,
            origins=[None, *(Origin(o) for o in self.config.allowed_origins)],
            process_request=self._admit,
            ping_interval=20,
            ping_timeout=20,
            logger=_ws_log,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the shutdown deadline), then
        close every connection with 1001 (going away). Idempotent."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.server.close()  # no new connections from here on
        deadline = self.config.shutdown_deadline
        try:
            await asyncio.wait_for(self._idle.wait(), deadline)
        except TimeoutError:
            log.warning("%d requests still running after %.1f s", self._inflight, deadline)
        server.close(close_connections=True)
        try:
            await asyncio.wait_for(server.wait_closed(), deadline)
        except TimeoutError:
            log.warning("connections still open after %.1f s of shutdown", deadline)

    # -- handshake ------------------------------------------------------------------------

    async def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer health checks; refuse handshakes without the token or over the cap."""
        path = urlsplit(request.path).path
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            problems = await self.readiness()
            if problems:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "\n".join(problems))
            return connection.respond(HTTPStatus.OK, "ready\n")
        if self._token is not None and not self._authorized(request.headers):
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="graphiti-bridge"'
            self.metrics.error("unauthorized", "handshake")
            return response
        if self.connections >= self.config.max_connections:
            self.metrics.error("too_many_connections", "handshake")
            return connection.respond(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"too many connections (limit {self.config.max_connections})\n",
            )
        return None

    def _authorized(self, headers: Headers) -> bool:
        assert self._token is not None
        given = headers.get("Authorization", "").encode()
        return hmac.compare_digest(given, self._token)

    def project_from_path(self, path: str) -> str:
        """The project named by the connection URL's path, or the server default."""
        name = unquote(urlsplit(path).path).strip("/")
        return name if 0 < len(name) <= self.config.max_name else self.config.project

    # -- connection -----------------------------------------------------------------------

    async def _serve_connection(self, ws: ServerConnection) -> None:
        session = Session(self.project_from_path(ws.request.path if ws.request else "/"))
        inflight = asyncio.Semaphore(self.config.max_inflight)
        rate = TokenBucket(self.config.rate_limit, self.config.rate_burst)
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
                    await self._send(ws, error_ack(e.message_id, e), binary)
                    continue
                except Exception as e:  # a decoder bug must not cost the connection
                    log.exception("undecodable frame")
                    await self._send(ws, error_ack(None, e), binary)
                    continue
                if not rate.allow():
                    limited = RateLimited(
                        f"over {self.config.rate_limit:g} messages/s; "
                        f"retry in {rate.retry_after() * 1000:.0f} ms"
                    )
                    self.metrics.error(limited.code, "invalid")
                    await self._send(ws, error_ack(message.id, limited), binary)
                    continue
                if (reply := self.handlers.answer_now(message, session)) is not None:
                    await self._send(ws, reply, binary)
                    continue
                await inflight.acquire()
                emit = self._emitter(ws, binary)
                work = self.handlers.begin(message, session, emit)  # ordering settled here
                self._inflight += 1
                self._idle.clear()
                task = asyncio.create_task(self._respond(work, emit, inflight))
                running.add(task)
                task.add_done_callback(running.discard)
        except ConnectionClosed:
            pass
        finally:
            self.connections -= 1
            self.metrics.connections(self.connections)
            if running:  # stores already under way finish even if nobody hears the ack
                await asyncio.wait(running)

    def _emitter(self, ws: ServerConnection, binary: bool) -> Emit:
        async def emit(reply: Reply) -> None:
            await self._send(ws, reply, binary)

        return emit

    async def _respond(
        self, work: Coroutine[Any, Any, Reply], emit: Emit, inflight: asyncio.Semaphore
    ) -> None:
        try:
            await emit(await work)
        finally:
            inflight.release()
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    @staticmethod
    async def _send(ws: ServerConnection, reply: Reply, binary: bool) -> None:
        with contextlib.suppress(ConnectionClosed):  # the client left; nothing to tell it
            await ws.send(encode(reply, binary), text=not binary)
