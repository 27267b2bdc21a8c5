"""Datadog metrics and events, sent over DogStatsD (UDP) by the datadog package's client.

Every metric name the bridge emits is defined here. Sending never blocks a handler for long
and never raises: a missing agent just means the datagrams go nowhere.

The client buffers and aggregates, and is flushed from the event loop every
``flush_interval`` seconds rather than by a thread of its own: no thread contends with the
loop, and none has to be stopped (as the datadog package does before every fork) when the
bridge starts a subprocess. Cache hits, the one thing counted thousands of times a second,
are tallied in plain integers and handed to the client at each flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from datadog.dogstatsd.base import DogStatsd

log = logging.getLogger(__name__)

CACHE_HIT: Final = "opencode.memory.cache_hit"
CACHE_MISS: Final = "opencode.memory.cache_miss"
TOKENS_USED: Final = "opencode.tokens.used"
REQUEST_DURATION: Final = "opencode.bridge.request.duration"
CONNECTIONS: Final = "opencode.bridge.connections"
ERRORS: Final = "opencode.bridge.errors"
CACHE_UNAVAILABLE: Final = "opencode.bridge.cache.unavailable"
EPISODES_STORED: Final = "opencode.bridge.episodes.stored"
MAX_PENDING_DURATIONS: Final = 100_000  # hit durations kept between two flushes


class Metrics:
    """The bridge's metrics, one method per thing worth counting."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tags: list[str] | None = None,
        buffered: bool = True,
        flush_interval: float = 0.2,
    ) -> None:
        self._statsd = DogStatsd(
            host=host,
            port=port,
            constant_tags=tags or [],
            disable_buffering=not buffered,
            disable_aggregation=not buffered,
            flush_interval=0,  # no flush thread: ``start`` flushes from the loop
            disable_telemetry=True,
            origin_detection_enabled=False,
        )
        self.buffered = buffered
        self.flush_interval = flush_interval
        self._hits: dict[str, int] = {}
        self._hit_durations: list[float] = []
        self._flusher: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Flush every ``flush_interval`` seconds from the running event loop."""
        if self.buffered and self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_forever(), name="metrics-flush")

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            self.flush()

    def flush(self) -> None:
        """Send everything counted so far."""
        hits, self._hits = self._hits, {}
        durations, self._hit_durations = self._hit_durations, []
        for project, count in hits.items():
            self._statsd.increment(CACHE_HIT, count, tags=[f"project:{project}"])
        for seconds in durations:
            self._distribution("chat:start", seconds)
        if self.buffered:
            try:
                self._statsd.flush_aggregated_metrics()
                self._statsd.flush_buffered_metrics()
            except OSError as e:  # pragma: no cover - nothing to do but say so
                log.warning("could not send metrics: %s", e)

    def cache_hit(self, project: str, seconds: float | None = None) -> None:
        """A chat:start answered from the cache and, on the hot path, how long it took
        (elsewhere the request's duration is recorded with every other request's)."""
        self._hits[project] = self._hits.get(project, 0) + 1
        if seconds is not None and len(self._hit_durations) < MAX_PENDING_DURATIONS:
            self._hit_durations.append(seconds)
        if not self.buffered:
            self.flush()

    def cache_miss(self, project: str) -> None:
        """A chat:start that had to ask memory."""
        self._statsd.increment(CACHE_MISS, tags=[f"project:{project}"])

    def tokens_used(self, tokens: int, project: str) -> None:
        """Tokens spent by a completed task."""
        self._statsd.increment(TOKENS_USED, tokens, tags=[f"project:{project}"])

    def episode_stored(self, kind: str) -> None:
        """An episode was made durable."""
        self._statsd.increment(EPISODES_STORED, tags=[f"kind:{kind}"])

    def request_duration(self, event_type: str, seconds: float) -> None:
        """How long one message took, from decoded to reply ready (milliseconds)."""
        self._distribution(event_type, seconds)

    def _distribution(self, event_type: str, seconds: float) -> None:
        self._statsd.distribution(REQUEST_DURATION, seconds * 1000.0, tags=[f"event:{event_type}"])

    def connections(self, count: int) -> None:
        """Open WebSocket connections right now."""
        self._statsd.gauge(CONNECTIONS, count)

    def error(self, code: str, event_type: str) -> None:
        """A request answered with ok:false."""
        self._statsd.increment(ERRORS, tags=[f"code:{code}", f"event:{event_type}"])

    def cache_unavailable(self) -> None:
        """A cache operation failed because Valkey could not be reached."""
        self._statsd.increment(CACHE_UNAVAILABLE)

    def opencode_error(self, message: str, project: str) -> None:
        """The original design's Datadog event for an OpenCode error."""
        self._statsd.event(
            "OpenCode Error", message, alert_type="error", tags=[f"project:{project}"]
        )

    async def close(self) -> None:
        """Stop flushing, send what is left, and close the socket."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        self.flush()
        try:
            self._statsd.close_socket()
        except OSError as e:  # pragma: no cover - nothing to do but say so
            log.warning("could not close the metrics socket: %s", e)
