"""The WebSocket server: frames in, handler calls, frames out.

This is the only module that imports websockets. Per connection, frames are read in order,
decoded, and each message is handed to the handlers as its own task, so a slow memory query
never holds a cache hit up behind it; at most ``max_inflight`` run at once, after which the
server stops reading that connection (backpressure) until one finishes.

A bad frame gets an ok:false ack and the connection goes on. Only the client or a shutdown
(close code 1001, going away) ends a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, urlsplit

from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bridge.errors import BadRequest
from bridge.handlers import Emit, Handlers, Session
from bridge.metrics import Metrics
from bridge.protocol import MAX_NAME, Reply, decode, encode, error_ack

log = logging.getLogger(__name__)

# Frames above max_frame get a bad_request reply; the transport refuses (close 1009) only
# frames so large that reading them at all would be a risk.
HARD_FRAME_FACTOR = 4


class Server:
    """A WebSocket endpoint for the bridge protocol, with explicit start and stop."""

    def __init__(
        self,
        handlers: Handlers,
        metrics: Metrics,
        *,
        host: str,
        port: int,
        default_project: str,
        max_frame: int,
        max_inflight: int,
    ) -> None:
        self.handlers = handlers
        self.metrics = metrics
        self.host = host
        self.port = port
        self.default_project = default_project
        self.max_frame = max_frame
        self.max_inflight = max_inflight
        self.connections = 0
        self._server: WsServer | None = None

    async def start(self) -> None:
        """Listen; once this returns, ``port`` is the bound port (even if 0 was asked)."""
        self._server = await serve(
            self._serve_connection,
            self.host,
            self.port,
            max_size=self.max_frame * HARD_FRAME_FACTOR,
            compression=None,
            process_request=self._http_request,
            ping_interval=20,
            ping_timeout=20,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self, deadline: float = 10.0) -> None:
        """Stop listening, close connections with 1001 and wait for in-flight requests."""
        if self._server is None:
            return
        self._server.close(close_connections=True)
        try:
            await asyncio.wait_for(self._server.wait_closed(), deadline)
        except TimeoutError:
            log.warning("connections still busy after %.1f s of shutdown", deadline)
        self._server = None

    def _http_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer plain HTTP health checks on the WebSocket port."""
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        return None

    def project_from_path(self, path: str) -> str:
        """The project named by the connection URL's path, or the server default."""
        name = unquote(urlsplit(path).path).strip("/")
        return name if 0 < len(name) <= MAX_NAME else self.default_project

    async def _serve_connection(self, ws: ServerConnection) -> None:
        session = Session(self.project_from_path(ws.request.path if ws.request else "/"))
        inflight = asyncio.Semaphore(self.max_inflight)
        running: set[asyncio.Task[None]] = set()
        self.connections += 1
        self.metrics.connections(self.connections)
        try:
            async for frame in ws:
                binary = not isinstance(frame, str)
                try:
                    message = decode(frame, self.max_frame)
                except BadRequest as e:
                    self.metrics.error(e.code, "invalid")
                    await self._send(ws, error_ack(e.message_id, e), binary)
                    continue
                if (reply := self.handlers.answer_now(message, session)) is not None:
                    await self._send(ws, reply, binary)
                    continue
                await inflight.acquire()
                emit = self._emitter(ws, binary)
                work = self.handlers.begin(message, session, emit)  # ordering settled here
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

    @staticmethod
    async def _respond(
        work: Coroutine[Any, Any, Reply], emit: Emit, inflight: asyncio.Semaphore
    ) -> None:
        try:
            await emit(await work)
        finally:
            inflight.release()

    @staticmethod
    async def _send(ws: ServerConnection, reply: Reply, binary: bool) -> None:
        with contextlib.suppress(ConnectionClosed):  # the client left; nothing to tell it
            await ws.send(encode(reply, binary), text=not binary)
