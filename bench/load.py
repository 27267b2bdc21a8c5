"""Load shapes beyond one request at a time: pipelined, many connections, multiplexed.

All of them are closed systems: a new request goes out only when an earlier one has been
answered, so the offered load adapts to the server and no coordinated-omission correction
applies; latency under load is reported together with the throughput it was measured at.

* ``pipelined``: one connection keeps ``window`` requests outstanding; every reply
  (matched by id, in whatever order it comes) lets the next request go.
* ``fan_out``: several connections, each a closed loop of one request at a time, all at
  once; the throughput is the aggregate.
* ``Mux``: one connection shared by several concurrent callers, replies matched by id by
  one reader task; used where different kinds of requests share a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from bench.common import (
    BenchError,
    Check,
    Reply,
    RoundTrip,
    Runner,
    Series,
    json_decoder,
    json_encoder,
    msgpack_decoder,
    msgpack_encoder,
    record_ns,
    split,
)

Message = Callable[[int], dict[str, Any]]


def pipelined(
    ws: ClientConnection, message: Message, check: Check, window: int, *, binary: bool = True
) -> Runner:
    """A runner keeping ``window`` requests outstanding on one connection."""
    encode = msgpack_encoder.encode if binary else json_encoder.encode
    decode = msgpack_decoder.decode if binary else json_decoder.decode
    text = not binary

    async def run(series: Series, first: int, count: int, record: bool) -> None:
        clock, histogram = time.perf_counter_ns, series.histogram
        sent: dict[int | str | None, int] = {}
        following, end = first, first + count
        while following < end and len(sent) < window:
            sent[following] = clock()
            await ws.send(encode(message(following)), text=text)
            following += 1
        while sent:
            frame = await ws.recv(decode=False)
            now = clock()
            reply = decode(frame)
            began = sent.pop(reply.id, None)
            if began is None or not isinstance(reply.id, int):
                raise BenchError(f"a reply to no outstanding request: {reply!r}")
            check(reply, reply.id)
            if record:
                record_ns(histogram, now - began)
            if following < end:
                sent[following] = clock()
                await ws.send(encode(message(following)), text=text)
                following += 1

    return run


def fan_out(trips: Sequence[RoundTrip]) -> Runner:
    """A runner running one closed loop per round trip (per connection), all at once."""

    async def run(series: Series, first: int, count: int, record: bool) -> None:
        clock, histogram = time.perf_counter_ns, series.histogram

        async def loop(trip: RoundTrip, start: int, n: int) -> None:
            for i in range(start, start + n):
                t0 = clock()
                await trip(i)
                if record:
                    record_ns(histogram, clock() - t0)

        starts, parts = first, split(count, len(trips))
        async with asyncio.TaskGroup() as group:
            for trip, n in zip(trips, parts, strict=True):
                group.create_task(loop(trip, starts, n))
                starts += n

    return run


class Mux:
    """One connection shared by concurrent callers; one reader matches replies by id.

    ``call`` returns the reply and its round trip in ns, taken when the reader got the
    frame (so a caller that is slow to wake does not lengthen it).
    """

    def __init__(self, ws: ClientConnection, *, binary: bool = True) -> None:
        self.ws = ws
        self.binary = binary
        self._encode = msgpack_encoder.encode if binary else json_encoder.encode
        self._decode = msgpack_decoder.decode if binary else json_decoder.decode
        self._waiting: dict[int | str | None, asyncio.Future[tuple[Reply, int]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.next_id = 1

    async def __aenter__(self) -> Mux:
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    @property
    def outstanding(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._waiting)

    def new_id(self) -> int:
        """A fresh request id on this connection."""
        self.next_id += 1
        return self.next_id

    async def _read(self) -> None:
        clock = time.perf_counter_ns
        failure: BaseException = BenchError("the connection closed with requests outstanding")
        try:
            while True:  # until the connection closes (ConnectionClosed)
                frame = await self.ws.recv(decode=False)  # bytes, for either decoder
                now = clock()
                reply = self._decode(frame)
                waiter = self._waiting.pop(reply.id, None)
                if waiter is None:
                    raise BenchError(f"a reply to no outstanding request: {reply!r}")
                if not waiter.done():
                    waiter.set_result((reply, now))
        except ConnectionClosed:
            pass
        except BenchError as e:
            failure = e
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(failure)

    async def call(self, message: dict[str, Any], timeout: float = 30.0) -> tuple[Reply, int]:
        """Send ``message`` (its ``id`` must be unique) and wait for its reply."""
        waiter: asyncio.Future[tuple[Reply, int]] = asyncio.get_running_loop().create_future()
        self._waiting[message["id"]] = waiter
        began = time.perf_counter_ns()
        await self.ws.send(self._encode(message), text=not self.binary)
        async with asyncio.timeout(timeout):
            reply, answered = await waiter
        return reply, answered - began
