"""The whole benchmark suite: ``python -m bench [--quick] [--out DIR]``.

``python -m bench recall --help``: the recall benchmark instead (bench/recall.py).
``python -m bench scale --help``: recall latency as memory grows (bench/scale.py).
``python -m bench workers --help``: throughput per worker count (bench/workers.py).

Runs, in one process tree, every series of the suite (see bench/README.md) against the
real bridge, and writes ``latest.md`` (Markdown tables), ``latest.json`` (every figure and
each series' HdrHistogram) and ``latency.png`` (latency CDFs) under ``--out`` (default
``bench/results/``). Prints the Markdown. Targets are reported, never asserted: the exit
code is 0 unless a part failed to start or a reply was wrong (1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

from bench.cluster import cluster
from bench.common import (
    DEFAULT_OUT,
    BenchError,
    Series,
    check_echo,
    closed_loop,
    echo_server,
    machine,
    measure,
    round_trip,
    run_loop,
    statsd_sink,
)
from bench.report import markdown, plot, targets, write_json
from bench.rss import idle_memory
from bench.suite import (
    FULL,
    QUICK,
    Params,
    Run,
    Section,
    clients,
    head_of_line,
    hits,
    misses,
    original,
    writes,
)
from bench.workers import workers

SECTIONS: Final = (
    "hits", "misses", "writes", "original", "head_of_line", "cluster", "workers", "rss"
)  # fmt: skip
NOISY: Final = ("graphiti_core", "neo4j", "falkordb", "httpx", "openai", "websockets")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for results")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {', '.join(SECTIONS)})",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="use the asyncio loop")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown or not args.sections:
        parser.error(f"--only takes some of {', '.join(SECTIONS)}; got {args.only!r}")
    return args


def progress(text: str) -> None:
    """A line on stderr, so stdout stays the report."""
    print(text, file=sys.stderr, flush=True)


async def floor_only(run: Run) -> None:
    """Measure the closed-loop floor alone (when the hits section, which does, is skipped)."""
    p = run.params
    async with clients(run.floor_url, 1) as (ws,):
        trip = round_trip(ws, True, check_echo)
        floor = Series("floor: echo, closed loop, 1 connection", closed_loop(trip))
        await measure(floor, p.warmup, record=False)
        await measure(floor, p.hits)
    run.floor = run.series_row(floor, is_floor=True)


def rss_section(figures: dict[str, Any]) -> Section:
    """The idle-connection memory figures as a report section."""
    return Section(
        "rss",
        f"Server memory with {figures['connections']:,} idle connections",
        "The bridge as its own process (`python -m bridge serve --port 0 --data-dir TMP "
        "--max-connections 2000`, embedded valkey-server); the bench process opens the "
        "connections, each answers one ping, then the server's VmRSS is read from "
        "/proc/<pid>/status. Its valkey-server child is listed separately.",
        figures=figures,
    )


async def suite(params: Params, chosen: list[str]) -> tuple[list[Section], dict[str, Any]]:
    """Run the chosen sections in order; the sections and the histograms of their rows."""
    done: list[Section] = []
    with statsd_sink() as statsd_port:
        async with echo_server() as floor_url:
            run = Run(params, floor_url, statsd_port)
            if "hits" not in chosen:
                await floor_only(run)
            steps: list[tuple[str, Callable[[], Awaitable[Section]]]] = [
                ("hits", lambda: hits(run)),
                ("misses", lambda: misses(run)),
                ("writes", lambda: writes(run)),
                ("original", lambda: original(run, sqlite_miss(done))),
                ("head_of_line", lambda: head_of_line(run)),
                ("cluster", lambda: cluster(run)),
                ("workers", lambda: workers(run)),
            ]
            for key, step in steps:
                if key in chosen:
                    began = time.perf_counter()
                    progress(f"bench: {key} ...")
                    done.append(await step())
                    progress(f"bench: {key} took {time.perf_counter() - began:.1f} s")
        if "rss" in chosen:
            began = time.perf_counter()
            progress("bench: rss ...")
            done.append(rss_section(await idle_memory(params.idle_connections, statsd_port)))
            progress(f"bench: rss took {time.perf_counter() - began:.1f} s")
    return done, run.histograms


def sqlite_miss(done: list[Section]) -> dict[str, Any] | None:
    """The SQLite miss row of the misses section, if it ran."""
    for section in done:
        for row in section.rows:
            if row["series"].startswith("miss: sqlite"):
                return row
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the suite, write the results, print the Markdown.

    ``python -m bench recall …`` runs the recall benchmark instead (bench/recall.py),
    ``python -m bench scale …`` the scale benchmark (bench/scale.py).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["recall"]:
        from bench.recall import main as recall_main

        return recall_main(argv[1:])
    if argv[:1] == ["scale"]:
        from bench.scale import main as scale_main

        return scale_main(argv[1:])
    if argv[:1] == ["workers"]:
        from bench.workers import main as workers_main

        return workers_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    params = QUICK if args.quick else FULL
    started = dt.datetime.now(dt.UTC)
    began = time.perf_counter()
    m = machine(None)  # load average before the run; the loop is filled in below
    try:
        (sections, histograms), uvloop_version = run_loop(
            suite(params, args.sections), not args.no_uvloop
        )
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    m["uvloop"] = uvloop_version
    by_key = {s.key: s for s in sections}
    results: dict[str, Any] = {
        "machine": m,
        "quick": args.quick,
        "params": asdict(params),
        "started": f"{started:%Y-%m-%d %H:%M} UTC",
        "duration_s": round(time.perf_counter() - began, 1),
        "targets": targets(by_key),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(results, sections)
    (args.out / "latest.md").write_text(text)
    write_json(args.out / "latest.json", results, sections)
    plotted = plot(args.out / "latency.png", sections, histograms)
    print(text)
    wrote = ["latest.md", "latest.json"] + (["latency.png"] if plotted else [])
    progress(f"bench: wrote {', '.join(str(args.out / w) for w in wrote)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
