"""Following the invalidations of every Valkey primary, on one server, a Sentinel-watched
primary or a Valkey Cluster, so the in-process copy of contexts (bridge.cache.tracking) stays
honest.

The copy is served only while this module is sure it hears every primary that may hold a
context: one InvalidationListener per primary that ``discover`` named last, each up.
``discover`` is asked every ``interval`` seconds, and at once when a stream is lost or the
cache's client has learnt of a primary that is not followed (a MOVED to a new node). A new
set of primaries, or a change in which slots each one serves (a resharding, a fail-over),
empties the copy; listeners of new primaries start, those of primaries gone stop, and the
copy serves again once every one is up. A single server needs no discovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from bridge.background import cancel_and_wait
from bridge.cache.tracking import STOP_TIMEOUT, InvalidationListener, LocalContexts

log = logging.getLogger(__name__)

DISCOVER_TIMEOUT: Final = 2.0


@dataclass(frozen=True)
class Topology:
    """The primaries to follow (``host:port`` or ``unix:<path>``), and whatever else about
    the deployment must empty the copy when it changes (which slots each primary serves,
    slot migrations under way)."""

    primaries: frozenset[str]
    layout: Hashable = ()


Discover = Callable[[], Awaitable[Topology]]


def connection_of(address: str, credentials: dict[str, Any]) -> dict[str, Any]:
    """The listener's connection settings for ``address``: its host and port (or socket
    path) with the deployment's credentials."""
    if address.startswith("unix:"):
        return {**credentials, "path": address.removeprefix("unix:")}
    host, _, port = address.rpartition(":")
    return {**credentials, "host": host.strip("[]"), "port": int(port)}


class Follower:
    """Keeps one invalidation listener per Valkey primary and says when the copy may serve."""

    def __init__(
        self,
        contexts: LocalContexts,
        prefix: str,
        credentials: dict[str, Any],
        topology: Topology | Discover,
        *,
        interval: float = 1.0,
    ) -> None:
        self.contexts = contexts
        self._prefix = prefix
        self._credentials = credentials
        self._source = topology  # fixed, or how to discover it
        self.interval = interval
        self.topology: Topology | None = None
        self.discover_error: str | None = None
        self.changes = 0  # topology changes applied after the first
        self._listeners: dict[str, InvalidationListener] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()  # set while the copy may serve

    def start(self) -> None:
        """Follow the fixed topology, or start discovering it in the background."""
        source = self._source
        work = self._apply(source) if isinstance(source, Topology) else self._watch(source)
        self._task = asyncio.create_task(work, name="valkey-follow")

    async def stop(self) -> None:
        """Stop discovering and every listener; the copy stops serving."""
        task, self._task = self._task, None
        await cancel_and_wait(task, STOP_TIMEOUT)
        listeners, self._listeners = list(self._listeners.values()), {}
        await asyncio.gather(*(listener.stop() for listener in listeners))
        self.contexts.suspend()
        self.connected.clear()

    def refresh(self) -> None:
        """Ask ``discover`` again now rather than at the next interval."""
        self._wake.set()

    def follows(self, primaries: Iterable[str]) -> bool:
        """True when the copy serves and every one of ``primaries`` is followed."""
        return self.contexts.live and all(p in self._listeners for p in primaries)

    def problem(self) -> str | None:
        """Why the copy is not being served, or None when it is."""
        if self.contexts.live:
            return None
        if self.topology is None:
            why = f" ({self.discover_error})" if self.discover_error else ""
            return f"local copy off: the Valkey primaries are not known yet{why}"
        down = [
            f"{address}" + (f" ({listener.error})" if listener.error else "")
            for address, listener in sorted(self._listeners.items())
            if not listener.up
        ]
        total = len(self.topology.primaries)
        if down:
            return (
                f"local copy off: no invalidation stream from {', '.join(down)} "
                f"({total - len(down)} of {total} primaries followed)"
            )
        return f"local copy off: catching up with a change of the {total} Valkey primaries"

    async def _watch(self, discover: Discover) -> None:
        while True:
            self._wake.clear()
            try:
                topology = await asyncio.wait_for(discover(), DISCOVER_TIMEOUT)
            except Exception as e:  # any failure: keep what is known, try again later
                why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if self.discover_error is None:
                    log.warning("cannot read the Valkey topology: %s", why)
                self.discover_error = why
            else:
                self.discover_error = None
                await self._apply(topology)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    async def _apply(self, topology: Topology) -> None:
        if topology == self.topology:
            return
        if self.topology is not None:
            self.changes += 1
            log.warning(
                "Valkey topology changed (primaries %s): local cache emptied, following again",
                ", ".join(sorted(topology.primaries)) or "none",
            )
        self.topology = topology
        self.contexts.invalidate(None)  # copies made under the old layout are not trusted
        self._update()
        gone = [a for a in self._listeners if a not in topology.primaries]
        stopping = [self._listeners.pop(a) for a in gone]
        for address in sorted(topology.primaries - self._listeners.keys()):
            listener = InvalidationListener(
                self.contexts,
                connection_of(address, self._credentials),
                self._prefix,
                on_change=self._listener_changed,
            )
            self._listeners[address] = listener
            listener.start()
        await asyncio.gather(*(listener.stop() for listener in stopping))
        self._update()

    def _listener_changed(self) -> None:
        self._update()
        if not self.contexts.live and not isinstance(self._source, Topology):
            self.refresh()  # a lost stream may be a primary that failed over

    def _update(self) -> None:
        topology = self.topology
        live = (
            topology is not None
            and bool(topology.primaries)
            and self._listeners.keys() == topology.primaries
            and all(listener.up for listener in self._listeners.values())
        )
        if live and not self.contexts.live:
            self.contexts.invalidate(None)
        self.contexts.live = live
        if live:
            self.connected.set()
        else:
            self.connected.clear()
