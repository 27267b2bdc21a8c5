"""Datadog metrics and events, sent over DogStatsD (UDP) by the datadog package's client.

Every metric name the bridge emits is defined here. Sending never blocks a handler for long
and never raises: a missing agent just means the datagrams go nowhere, and anything else
that goes wrong while counting is logged at debug level and dropped, so a metric can never
cost a request its reply.

An event must fit in one DogStatsD datagram (the client refuses events of 8 KB or more, and
the agent reads 8 KB at a time), so event titles and texts are clipped to fit, on a
character boundary, with a marker where they were cut.

The client buffers and aggregates, and is flushed from the event loop every
``flush_interval`` seconds rather than by a thread of its own: no thread contends with the
loop, and none has to be stopped (as the datadog package does before every fork) when the
bridge starts a subprocess. Cache hits, the one thing counted thousands of times a second,
are tallied in plain integers and handed to the client at each flush.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Concatenate, Final, ParamSpec, TypeVar

from datadog.dogstatsd.base import DogStatsd

from bridge.background import cancel_and_wait

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

OPENCODE_ERROR: Final = "OpenCode Error"  # title of the event sent for every error message
MAX_EVENT_BYTES: Final = 8 * 1024 - 1  # a whole event datagram, in UTF-8 bytes
MAX_EVENT_TITLE: Final = 100  # characters: Datadog shows no more of an event title
MAX_EVENT_TEXT: Final = 4_000  # characters: Datadog keeps no more of an event text
# Room for what the client may add to an event datagram besides title, text, alert type and
# tags: a container id and a cardinality field.
EVENT_RESERVE: Final = 128
CLIP_MARKER: Final = "\u2026"  # "…", ends a clipped title or text

P = ParamSpec("P")
S = TypeVar("S")


def event_size(text: str) -> int:
    """Bytes ``text`` takes in an event datagram: UTF-8, with each newline escaped as
    ``\\n`` (two bytes), as the client sends it."""
    return len(text.encode("utf-8")) + text.count("\n")


def clip_event_text(text: str, max_bytes: int, max_chars: int | None = None) -> str:
    """``text`` made fit in ``max_bytes`` of an event datagram (see ``event_size``) and in
    ``max_chars`` characters: cut on a character boundary and ended with ``CLIP_MARKER``
    when too long. Lone surrogates, which UTF-8 cannot carry, become U+FFFD first."""
    if not text.isascii():
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    chars = len(text) if max_chars is None else max(0, max_chars)
    if len(text) <= chars and event_size(text) <= max_bytes:
        return text
    room = max_bytes - event_size(CLIP_MARKER)
    if room < 0 or chars < len(CLIP_MARKER):
        return ""
    cut = text[: chars - len(CLIP_MARKER)]
    if event_size(cut) > room:
        # Cut the bytes as sent, where each newline takes two, then drop a partial
        # character or half a newline left at the end.
        doubled = cut.replace("\n", "\n\n").encode("utf-8")[:room].decode("utf-8", "ignore")
        if (len(doubled) - len(doubled.rstrip("\n"))) % 2:
            doubled = doubled[:-1]
        cut = doubled.replace("\n\n", "\n")
    return cut + CLIP_MARKER


def _never_raises(method: Callable[Concatenate[S, P], None]) -> Callable[Concatenate[S, P], None]:
    """Log at debug level and drop whatever a metrics call raises."""

    @functools.wraps(method)
    def guarded(self: S, /, *args: P.args, **kwargs: P.kwargs) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception as e:
            log.debug("metrics %s dropped: %s: %s", method.__name__, type(e).__name__, e)

    return guarded


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
            constant_tags=list(tags or []),
            disable_buffering=not buffered,
            disable_aggregation=not buffered,
            flush_interval=0,  # no flush thread: ``start`` flushes from the loop
            disable_telemetry=True,
            origin_detection_enabled=False,
        )
        self.buffered = buffered
        self.tags = list(tags or [])
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

    @_never_raises
    def flush(self) -> None:
        """Send everything counted so far."""
        hits, self._hits = self._hits, {}
        durations, self._hit_durations = self._hit_durations, []
        for project, count in hits.items():
            self._statsd.increment(CACHE_HIT, count, tags=[f"project:{project}"])
        for seconds in durations:
            self._distribution("chat:start", seconds)
        if self.buffered:
            self._statsd.flush_aggregated_metrics()
            self._statsd.flush_buffered_metrics()

    def cache_hit(self, project: str, seconds: float | None = None) -> None:
        """A chat:start answered from the cache and, on the hot path, how long it took
        (elsewhere the request's duration is recorded with every other request's).

        Not wrapped like the others: it only counts (a third of a microsecond a hit less),
        and the one call here that sends, ``flush``, never raises."""
        self._hits[project] = self._hits.get(project, 0) + 1
        if seconds is not None and len(self._hit_durations) < MAX_PENDING_DURATIONS:
            self._hit_durations.append(seconds)
        if not self.buffered:
            self.flush()

    @_never_raises
    def cache_miss(self, project: str) -> None:
        """A chat:start that had to ask memory."""
        self._statsd.increment(CACHE_MISS, tags=[f"project:{project}"])

    @_never_raises
    def tokens_used(self, tokens: int, project: str) -> None:
        """Tokens spent by a completed task."""
        self._statsd.increment(TOKENS_USED, tokens, tags=[f"project:{project}"])

    @_never_raises
    def episode_stored(self, kind: str) -> None:
        """An episode was made durable."""
        self._statsd.increment(EPISODES_STORED, tags=[f"kind:{kind}"])

    @_never_raises
    def request_duration(self, event_type: str, seconds: float) -> None:
        """How long one message took, from decoded to reply ready (milliseconds)."""
        self._distribution(event_type, seconds)

    def _distribution(self, event_type: str, seconds: float) -> None:
        self._statsd.distribution(REQUEST_DURATION, seconds * 1000.0, tags=[f"event:{event_type}"])

    @_never_raises
    def connections(self, count: int) -> None:
        """Open WebSocket connections right now."""
        self._statsd.gauge(CONNECTIONS, count)

    @_never_raises
    def error(self, code: str, event_type: str) -> None:
        """A request answered with ok:false."""
        self._statsd.increment(ERRORS, tags=[f"code:{code}", f"event:{event_type}"])

    @_never_raises
    def cache_unavailable(self) -> None:
        """A cache operation failed because Valkey could not be reached."""
        self._statsd.increment(CACHE_UNAVAILABLE)

    @_never_raises
    def opencode_error(self, message: str, project: str) -> None:
        """The original design's Datadog event for an OpenCode error, its text clipped so
        that the event fits in one datagram."""
        tags = [f"project:{project}"]
        # Raw tags are at least as long as the client's normalised ones (it only replaces
        # characters with "_"), and the lengths in the header take at most four digits.
        header = event_size(f"_e{{{MAX_EVENT_BYTES},{MAX_EVENT_BYTES}}}:|")
        footer = event_size("|t:error|#" + ",".join(tags + self.tags))
        title = clip_event_text(OPENCODE_ERROR, MAX_EVENT_BYTES, MAX_EVENT_TITLE)
        room = MAX_EVENT_BYTES - header - footer - EVENT_RESERVE - event_size(title)
        text = clip_event_text(message, room, MAX_EVENT_TEXT)
        self._statsd.event(title, text, alert_type="error", tags=tags)

    async def close(self) -> None:
        """Stop flushing, send what is left, and close the socket."""
        flusher, self._flusher = self._flusher, None
        await cancel_and_wait(flusher)
        self.flush()
        try:
            self._statsd.close_socket()
        except Exception as e:
            log.debug("metrics socket not closed: %s: %s", type(e).__name__, e)
