"""The in-process copy of cached contexts (L1), kept honest by Valkey itself.

A dedicated connection per Valkey primary asks for server-assisted client-side caching in
broadcast mode (``CLIENT TRACKING ON REDIRECT <self> BCAST PREFIX <prefix>ctx:``) and
subscribes to ``__redis__:invalidate``: from then on that primary pushes the name of every
context key that any client changes, deletes or lets expire on it. Which primaries there
are, and whether every one of them is heard, is ``bridge.cache.following``'s business: entries
are served from memory only while it is sure; when it is not, the copy is emptied and
bypassed until it is again.

A value read from Valkey is copied in only if no invalidation arrived while it was being
read (``generation`` did not move), so a late reader can never resurrect a dropped key.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import hiredis
from redis.backoff import ExponentialWithJitterBackoff

from bridge.background import cancel_and_wait
from bridge.errors import describe
from bridge.retry import Retry

log = logging.getLogger(__name__)

INVALIDATE_CHANNEL: Final = b"__redis__:invalidate"
_MISSING: Final = object()
STOP_TIMEOUT: Final = 2.0  # seconds a stopped stream (or discovery) gets to end


class StreamRefused(Exception):
    """Valkey answered a command of the invalidation stream with an error (loading, a
    fail-over under way, a password changed): it may take it later."""


# What ends or refuses an invalidation stream and is worth connecting again for: the
# connection fails, closes, goes silent or garbles, or the server refuses a command.
STREAM_FAILURES = (OSError, EOFError, TimeoutError, hiredis.ProtocolError, StreamRefused)


class LocalContexts:
    """A least-recently-used map from context key to context text, bounded in entries and
    in bytes (a context larger than a sixteenth of the bytes is left to Valkey)."""

    def __init__(
        self, max_entries: int = 10_000, max_age: float = 300.0, max_bytes: int = 64 << 20
    ) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.bytes = 0
        self.generation = 0
        self.live = False
        self._entries: OrderedDict[str, tuple[str | None, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any:
        """The context for ``key`` (None = memory had nothing), or ``_MISSING``."""
        if not self.live:
            return _MISSING
        entry = self._entries.get(key)
        if entry is None:
            return _MISSING
        inject, expires = entry
        if expires < time.monotonic():
            self._drop(key)
            return _MISSING
        self._entries.move_to_end(key)
        return inject

    def put(self, key: str, inject: str | None, generation: int) -> None:
        """Keep a value read from Valkey when no invalidation arrived since ``generation``."""
        if not self.live or generation != self.generation:
            return
        size = _size(key, inject)
        if size > self.max_bytes // 16:
            return
        self._drop(key)
        self._entries[key] = (inject, time.monotonic() + self.max_age)
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= _size(key, entry[0])

    def invalidate(self, keys: list[bytes] | list[str] | None) -> None:
        """Drop the given keys, or everything when ``keys`` is None (a flush)."""
        self.generation += 1
        if keys is None:
            self._entries.clear()
            self.bytes = 0
            return
        for key in keys:
            self._drop(key.decode() if isinstance(key, bytes) else key)

    def suspend(self) -> None:
        """Stop serving and forget everything: invalidations can no longer be trusted."""
        self.live = False
        self.invalidate(None)


def _size(key: str, inject: str | None) -> int:
    return sys.getsizeof(key) + sys.getsizeof(inject)


def is_missing(value: object) -> bool:
    """True when ``LocalContexts.get`` found nothing."""
    return value is _MISSING


class InvalidationListener:
    """Keeps the tracking connection to one Valkey server up and feeds its invalidations to
    a LocalContexts. ``on_change`` runs whenever the stream comes up or is lost (``up``
    says which); the copy is emptied at both moments, as anything in it may have missed an
    invalidation."""

    def __init__(
        self,
        contexts: LocalContexts,
        connection: dict[str, Any],
        prefix: str,
        *,
        on_change: Callable[[], None],
        retry: Retry | None = None,
        ping_interval: float = 5.0,
    ) -> None:
        self.contexts = contexts
        self._connection = connection
        self._prefix = prefix
        self._on_change = on_change
        retry = retry or Retry(
            retry_on=STREAM_FAILURES,
            backoff=ExponentialWithJitterBackoff(cap=2.0, base=0.05),
            logger=log,
        )
        self._tries = retry.tries(f"Valkey invalidation stream from {self.address}")
        self._ping_interval = ping_interval
        self._task: asyncio.Task[None] | None = None
        self.up = False
        self.connected = asyncio.Event()

    @property
    def error(self) -> str | None:
        """Why the stream is down, once it has failed; None while it works."""
        return self._tries.error

    @property
    def address(self) -> str:
        """The server this listener follows, for logs and health."""
        c = self._connection
        return f"unix:{c['path']}" if c.get("path") else f"{c.get('host')}:{c.get('port')}"

    def start(self) -> None:
        """Run the listener in the background until ``stop``."""
        self._task = asyncio.create_task(self._run(), name=f"invalidations {self.address}")

    async def stop(self) -> None:
        """Close the connection (the caller decides what the copy does next)."""
        task, self._task = self._task, None
        await cancel_and_wait(task, STOP_TIMEOUT)
        self.up = False
        self.connected.clear()

    async def _run(self) -> None:
        """Listen, and connect again after each failure worth it (``STREAM_FAILURES``) on
        the backoff; anything else is a bug: logged, and the stream stays down."""
        while True:
            try:
                await self._listen()
            except STREAM_FAILURES as e:
                wait = self._tries.failed(e)
            except Exception as e:
                log.exception("Valkey invalidation stream from %s stopped", self.address)
                self._tries.error = describe(e)
                self._down()
                return
            self._down()
            await self._tries.policy.sleep(wait or 0.0)

    def _down(self) -> None:
        """The stream is lost: everything in the copy may have missed an invalidation."""
        if self.up:
            self.up = False
            self.contexts.invalidate(None)
            self.connected.clear()
            self._on_change()

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        c = self._connection
        if c.get("path"):
            return await asyncio.open_unix_connection(c["path"])
        return await asyncio.open_connection(c.get("host", "localhost"), c.get("port", 6379))

    async def _listen(self) -> None:
        reader, writer = await asyncio.wait_for(self._open(), 2.0)
        parser = hiredis.Reader()

        async def call(*args: str | int) -> Any:
            writer.write(_command(*args))
            while (reply := parser.gets()) is False:
                data = await asyncio.wait_for(reader.read(65536), 2.0)
                if not data:
                    raise EOFError("connection closed")
                parser.feed(data)
            if isinstance(reply, hiredis.ReplyError):
                raise StreamRefused(str(reply))
            return reply

        try:
            if self._connection.get("password"):
                user = self._connection.get("username")
                await call("AUTH", *([user] if user else []), self._connection["password"])
            client_id = await call("CLIENT", "ID")
            await call("CLIENT", "TRACKING", "ON", "REDIRECT", client_id,
                       "BCAST", "PREFIX", f"{self._prefix}ctx:")  # fmt: skip
            await call("SUBSCRIBE", INVALIDATE_CHANNEL.decode())
            self.contexts.invalidate(None)  # anything older may have missed an invalidation
            self.up = True
            self._tries.succeeded()
            self.connected.set()
            self._on_change()
            await self._pump(reader, writer, parser)
        finally:
            writer.transport.abort()  # never wait on a peer that may be frozen

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, parser: hiredis.Reader
    ) -> None:
        awaiting_pong = False
        while True:
            try:
                data = await asyncio.wait_for(reader.read(65536), self._ping_interval)
            except TimeoutError:
                if awaiting_pong:
                    raise TimeoutError("no answer to PING on the invalidation stream") from None
                writer.write(_command("PING"))
                awaiting_pong = True
                continue
            if not data:
                raise EOFError("connection closed")
            parser.feed(data)
            while (message := parser.gets()) is not False:
                if isinstance(message, list) and message[:2] == [b"message", INVALIDATE_CHANNEL]:
                    self.contexts.invalidate(message[2])
                awaiting_pong = False


def _command(*args: str | int) -> bytes:
    """One RESP command."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)
