"""Metrics: events clipped to one DogStatsD datagram, and no metrics call ever raises.

Datagrams are caught on a real UDP socket on loopback."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator

import pytest

from bridge.metrics import (
    CLIP_MARKER,
    MAX_EVENT_BYTES,
    MAX_EVENT_TEXT,
    OPENCODE_ERROR,
    Metrics,
    clip_event_text,
    event_size,
)

EVENT = re.compile(rb"^_e\{(\d+),(\d+)\}:")


class Datagrams:
    """A real UDP socket on loopback that keeps whole datagrams, as bytes."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5.0)
        self.port = int(self.sock.getsockname()[1])

    def receive(self) -> bytes:
        """The next datagram (waits at most 5 s)."""
        return self.sock.recv(65_535)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def datagrams() -> Iterator[Datagrams]:
    receiver = Datagrams()
    yield receiver
    receiver.close()


def parse_event(packet: bytes) -> tuple[str, str, bytes]:
    """Title, text and the rest of one event datagram, checking the header's byte counts."""
    header = EVENT.match(packet)
    assert header is not None, packet[:80]
    title_len, text_len = int(header[1]), int(header[2])
    body = packet[header.end() :]
    title, rest = body[:title_len], body[title_len:]
    assert rest[:1] == b"|"
    text, tail = rest[1 : 1 + text_len], rest[1 + text_len :]
    assert tail[:1] in (b"|", b"\n", b""), tail[:20]
    return title.decode(), text.decode(), tail


# -- clipping ---------------------------------------------------------------------------


def test_text_that_fits_is_kept_as_it_is() -> None:
    assert clip_event_text("short", 100) == "short"
    exact = "x" * 50
    assert clip_event_text(exact, 50) == exact
    assert clip_event_text(exact, 50, 50) == exact


def test_text_one_byte_too_long_is_cut_and_marked() -> None:
    clipped = clip_event_text("x" * 51, 50)
    assert clipped.endswith(CLIP_MARKER)
    assert event_size(clipped) <= 50
    assert clipped == "x" * (50 - len(CLIP_MARKER.encode())) + CLIP_MARKER


def test_character_limit_counts_the_marker() -> None:
    clipped = clip_event_text("y" * 10, 1000, 5)
    assert clipped == "yyyy" + CLIP_MARKER


@pytest.mark.parametrize("char", ["é", "€", "😀", "\u0000"])
@pytest.mark.parametrize("budget", [1, 2, 3, 4, 5, 6, 7, 100, 8191])
def test_multibyte_text_is_cut_on_a_character_boundary(char: str, budget: int) -> None:
    text = "a" + char * 60_000
    clipped = clip_event_text(text, budget)
    assert event_size(clipped) <= budget
    clipped.encode("utf-8")  # whole characters only
    if clipped:
        assert clipped.endswith(CLIP_MARKER)
        assert text.startswith(clipped.removesuffix(CLIP_MARKER))
    else:
        assert budget < len(CLIP_MARKER.encode())


def test_newlines_count_twice_because_the_client_escapes_them() -> None:
    text = "\n" * 100
    clipped = clip_event_text(text, 21)
    assert event_size(clipped) <= 21
    assert clipped == "\n" * 9 + CLIP_MARKER  # 18 bytes of escapes and a 3-byte marker


def test_lone_surrogates_become_replacement_characters() -> None:
    assert clip_event_text("a\ud800b", 100) == "a\ufffdb"
    assert clip_event_text("\ud83d\ude00", 100) == "😀"  # a pair is one character
    assert clip_event_text("\udfff" * 10_000, 30).encode("utf-8")


def test_a_budget_below_the_marker_leaves_nothing() -> None:
    assert clip_event_text("long text", 2) == ""
    assert clip_event_text("long text", -5) == ""
    assert clip_event_text("long text", 100, 0) == ""


# -- events on the wire -----------------------------------------------------------------


@pytest.mark.parametrize("buffered", [False, True], ids=["direct", "buffered"])
@pytest.mark.parametrize(
    "message",
    [
        "x" * 60_000,
        "€" * 60_000,
        "😀" * 60_000,
        "line\n" * 12_000,
        "a\ud800" * 30_000,
        "short and sweet",
    ],
    ids=["ascii", "3-byte", "4-byte", "newlines", "surrogates", "short"],
)
def test_an_error_event_of_any_length_fits_one_datagram(
    datagrams: Datagrams, message: str, buffered: bool
) -> None:
    project = "проект" * 42  # a long multi-byte tag as well
    metrics = Metrics("127.0.0.1", datagrams.port, tags=["env:test"], buffered=buffered)
    metrics.opencode_error(message, project)
    metrics.flush()
    packet = datagrams.receive()
    event = packet.split(b"\n")[0] if buffered else packet.rstrip(b"\n")
    assert len(event) <= MAX_EVENT_BYTES
    title, text, tail = parse_event(event)
    assert title == OPENCODE_ERROR
    assert b"|t:error" in tail and f"project:{project}".encode() in tail and b"env:test" in tail
    sent = clip_event_text(message, MAX_EVENT_BYTES)
    if message == "short and sweet":
        assert text == message
    else:
        assert text.endswith(CLIP_MARKER)
        kept = text.removesuffix(CLIP_MARKER).replace("\\n", "\n")
        assert len(kept) + len(CLIP_MARKER) <= MAX_EVENT_TEXT
        assert sent.startswith(kept) and len(kept) > 1000


def test_an_event_that_cannot_fit_is_dropped_without_raising(
    datagrams: Datagrams, caplog: pytest.LogCaptureFixture
) -> None:
    """Constant tags alone over 8 KB: the client refuses the event; the call still returns,
    the refusal is logged at debug level, and the metrics after it are still sent."""
    caplog.set_level(logging.DEBUG, logger="bridge.metrics")
    metrics = Metrics("127.0.0.1", datagrams.port, tags=["t:" + "x" * 9000], buffered=False)
    metrics.opencode_error("boom", "p")
    dropped = [r for r in caplog.records if r.name == "bridge.metrics"]
    assert dropped and all(r.levelno == logging.DEBUG for r in dropped)
    assert "opencode_error dropped: ValueError" in dropped[0].getMessage()
    metrics.episode_stored("error")
    assert datagrams.receive().startswith(b"opencode.bridge.episodes.stored:1|c")


async def test_close_flushes_and_closing_twice_is_harmless(datagrams: Datagrams) -> None:
    metrics = Metrics("127.0.0.1", datagrams.port)
    metrics.start()
    metrics.cache_miss("p")
    await metrics.close()
    assert b"opencode.memory.cache_miss:1|c|#project:p" in datagrams.receive()
    await metrics.close()
