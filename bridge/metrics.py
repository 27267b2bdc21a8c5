"""Datadog metrics and events, sent over DogStatsD (UDP) by the datadog package's client.

Every metric name the bridge emits is defined here. Sending never blocks a handler for long
and never raises: a missing agent just means the datagrams go nowhere.
"""

from __future__ import annotations

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


class Metrics:
    """The bridge's metrics, one method per thing worth counting."""

    def __init__(
        self, host: str, port: int, *, tags: list[str] | None = None, buffered: bool = True
    ) -> None:
        self._statsd = DogStatsd(
            host=host,
            port=port,
            constant_tags=tags or [],
            disable_buffering=not buffered,
            # Counters and gauges are summed in memory and sent once per flush: a cache hit
            # costs a dict update, not a formatted datagram.
            disable_aggregation=not buffered,
            flush_interval=0.2,
            disable_telemetry=True,
            origin_detection_enabled=False,
        )

    def cache_hit(self, project: str) -> None:
        """A chat:start answered from the cache."""
        self._statsd.increment(CACHE_HIT, tags=[f"project:{project}"])

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

    def close(self) -> None:
        """Flush buffered metrics and close the socket."""
        try:
            self._statsd.flush()
            self._statsd.close_socket()
        except OSError as e:  # pragma: no cover - nothing to do but say so
            log.warning("could not flush metrics: %s", e)
