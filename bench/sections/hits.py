"""chat:start cache hits: closed loop, many in flight, many connections, each beside the
floor under the same load shape."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from bench.common import (
    Series,
    bridge_url,
    chat_start,
    check_echo,
    check_hit,
    closed_loop,
    fmt_ratio,
    new_histogram,
    round_trip,
    run_rounds,
    seed,
    warm_up,
)
from bench.harness import Run, bridge, clients
from bench.load import fan_out, pipelined
from bench.registry import section
from bench.rows import row_of
from bench.section import Section, Target


@dataclass(kw_only=True)
class Hits(Section):
    """The hit rows against their floors, and the figures the targets read."""

    hit_p50_over_floor: float
    hit_p99_over_floor: float
    window: int
    pipelined_rps: float
    connections: int
    fan_out_rps: float

    def targets(self) -> list[Target]:
        """Hits near the floor, and the pipelined throughput."""
        p50, p99 = self.hit_p50_over_floor, self.hit_p99_over_floor
        return [
            Target("hit p50 <= 1.3x floor p50 (closed loop)", fmt_ratio(p50), p50 <= 1.3),
            Target("hit p99 <= 1.5x floor p99 (closed loop)", fmt_ratio(p99), p99 <= 1.5),
            Target(
                f">= 20,000 hits/s with {self.window} in flight on one connection",
                f"{self.pipelined_rps:,.0f}/s",
                self.pipelined_rps >= 20_000,
            ),
        ]


@section("hits", order=10, measures_floor=True)
async def hits(run: Run) -> Hits:
    """Cache hits: closed loop, many in flight, many connections; each beside a floor."""
    p = run.params
    async with contextlib.AsyncExitStack() as stack:
        app = await stack.enter_async_context(bridge(run, "bench-hits-"))
        url = bridge_url(app)
        floor_one, floor_pipe = await stack.enter_async_context(clients(run.floor_url, 2))
        hit_one, hit_pipe = await stack.enter_async_context(clients(url, 2))
        floor_many = await stack.enter_async_context(clients(run.floor_url, p.connections))
        hit_many = await stack.enter_async_context(clients(url, p.connections))
        await seed(hit_one)
        server_us = new_histogram()
        one = [
            Series(
                "floor: echo, closed loop, 1 connection",
                closed_loop(round_trip(floor_one, True, check_echo)),
            ),
            Series(
                "hit: closed loop, 1 connection",
                closed_loop(round_trip(hit_one, True, check_hit(server_us))),
            ),
        ]
        piped = [
            Series(
                f"floor: echo, {p.window} in flight, 1 connection",
                pipelined(floor_pipe, chat_start, check_echo, p.window),
            ),
            Series(
                f"hit: {p.window} in flight, 1 connection",
                pipelined(hit_pipe, chat_start, check_hit(None), p.window),
            ),
        ]
        many = [
            Series(
                f"floor: echo, {p.connections} connections x 1 in flight",
                fan_out([round_trip(ws, True, check_echo) for ws in floor_many]),
            ),
            Series(
                f"hit: {p.connections} connections x 1 in flight",
                fan_out([round_trip(ws, True, check_hit(None)) for ws in hit_many]),
            ),
        ]
        await warm_up(one + piped + many, p.warmup)
        server_us.reset()
        await run_rounds(one, p.hits, p.rounds)
        await run_rounds(piped, p.pipelined, p.rounds)
        await run_rounds(many, p.fan_out, p.rounds)
    rows = []
    for floor, measured in (one, piped, many):
        floor_row = run.series_row(floor, is_floor=True)
        if run.floor is None:
            run.floor = floor_row  # the closed-loop floor: the reference of later sections
        rows += [floor_row, run.series_row(measured, floor=floor_row)]
    hit, piped_hit, many_hit = rows[1], rows[3], rows[5]
    handler = row_of("hit: handler time (elapsed_us)", server_us)
    return Hits(
        title="chat:start cache hits",
        intro=f"Closed systems throughout (a request goes out only when an earlier one was "
        f"answered), so no coordinated-omission correction applies. Each bridge row is "
        f"measured interleaved with its floor in {p.rounds} rounds after {p.warmup} warm-up "
        f"requests, and its ratios are to that floor: the bare echo server under the same "
        f"load shape. Client and server share one core's event loop.",
        rows=rows,
        notes=[
            f"The bridge's own handler time for the closed-loop hits (`elapsed_us` in its "
            f"replies): p50 {handler.p50_us} µs, p99 {handler.p99_us} µs; the rest of a "
            "hit's round trip is WebSocket framing, the event loop and the kernel, which the "
            "floor pays too."
        ],
        hit_p50_over_floor=hit.p50_over_floor,
        hit_p99_over_floor=hit.p99_over_floor,
        window=p.window,
        pipelined_rps=piped_hit.throughput_rps or 0.0,
        connections=p.connections,
        fan_out_rps=many_hit.throughput_rps or 0.0,
    )
