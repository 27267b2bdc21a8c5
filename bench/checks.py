"""Requests the suite's sections send beyond a hit, and the checks of their replies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from bench.common import PROJECT, BenchError, Reply, chat_start, new_histogram
from bench.workload import miss_query


@dataclass
class MissCheck:
    """Checks that a reply is a miss (``hit: false``), counts the ones with a context and
    keeps the handler time the bridge reports (``elapsed_us``)."""

    found: int = 0
    seen: int = 0
    server_us: HdrHistogram = field(default_factory=new_histogram)

    def __call__(self, reply: Reply, i: int) -> None:
        if reply.type != "context" or reply.id != i:
            raise BenchError(f"bridge answered chat:start {i} with {reply!r}")
        if reply.hit:
            raise BenchError(f"the unique query of chat:start {i} was a cache hit")
        self.seen += 1
        self.found += reply.inject is not None
        self.server_us.record_value(max(1, reply.elapsed_us))

    @property
    def share(self) -> str:
        """The share of misses that came back with a memory context, in words."""
        return f"{self.found}/{self.seen} misses came back with a memory context"


def check_ack(reply: Reply, i: int) -> None:
    """A reply must be the ok ack of request ``i``, stored in memory (not the outbox)."""
    if reply.type != "ack" or reply.id != i or not reply.ok or reply.queued:
        raise BenchError(f"bridge answered request {i} with {reply!r}")


def miss_message(i: int) -> dict[str, Any]:
    """A chat:start no earlier request asked."""
    return chat_start(i, miss_query(i))


def write_message(i: int) -> dict[str, Any]:
    """A file:write of a file nobody asked about."""
    return {"type": "file:write", "id": i, "path": f"src/generated/file{i}.py", "project": PROJECT}
