"""The whole benchmark suite: ``python -m bench [--quick] [--out DIR] [--only A,B]``.

``python -m bench recall --help``: the recall benchmark instead (bench/recall.py).
``python -m bench scale --help``: recall latency as memory grows (bench/scale.py).
``python -m bench workers --help``: throughput per worker count (bench/workers.py).

Runs, in one process tree, every section of the suite (see bench/README.md; one module
each under bench/sections/) against the real bridge, and writes ``latest.md`` (Markdown
tables), ``latest.json`` (every figure and each series' HdrHistogram) and ``latency.png``
(latency CDFs) under ``--out`` (default ``bench/results/``). Prints the Markdown. Targets
are reported, never asserted: the exit code is 0 unless a part failed to start or a reply
was wrong (1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, cast

from bench.common import DEFAULT_OUT, BenchError, machine, run_loop
from bench.params import FULL, QUICK
from bench.registry import Entry, sections
from bench.report import Report, write
from bench.suite import progress, suite

COMMANDS: Final = {  # python -m bench NAME ...: the module whose main(argv) runs it
    "recall": "bench.recall",
    "scale": "bench.scale",
    "workers": "bench.workers",
}
NOISY: Final = ("graphiti_core", "neo4j", "falkordb", "httpx", "openai", "websockets")


def parse_args(argv: Sequence[str] | None, known: list[Entry]) -> argparse.Namespace:
    """The command line; ``args.chosen`` the sections to run, in run order."""
    keys = [e.key for e in known]
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        epilog="sections:\n" + "\n".join(f"  {e.key:<14}{e.summary}" for e in known),
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for results")
    parser.add_argument(
        "--only",
        default=",".join(keys),
        help=f"comma-separated sections to run (default: all of {', '.join(keys)})",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="use the asyncio loop")
    args = parser.parse_args(argv)
    wanted = {s.strip() for s in args.only.split(",") if s.strip()}
    if wanted - set(keys) or not wanted:
        parser.error(f"--only takes some of {', '.join(keys)}; got {args.only!r}")
    args.chosen = [e for e in known if e.key in wanted]
    return args


def command(name: str) -> Callable[[Sequence[str]], int]:
    """The ``main`` of subcommand ``name`` (imported only when it runs)."""
    module = importlib.import_module(COMMANDS[name])
    return cast(Callable[[Sequence[str]], int], module.main)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the suite, write the results, print the Markdown; or run the
    subcommand named first (``recall``, ``scale``, ``workers``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in COMMANDS:
        return command(argv[0])(argv[1:])
    args = parse_args(argv, sections())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    params = QUICK if args.quick else FULL
    started = dt.datetime.now(dt.UTC)
    began = time.perf_counter()
    m = machine(None)  # load average before the run; the loop is filled in below
    try:
        run, uvloop_version = run_loop(suite(params, args.quick, args.chosen), not args.no_uvloop)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    m["uvloop"] = uvloop_version
    report = Report(
        machine=m,
        quick=args.quick,
        params=params,
        started=f"{started:%Y-%m-%d %H:%M} UTC",
        duration_s=round(time.perf_counter() - began, 1),
        sections=run.done,
    )
    text, wrote = write(args.out, report, run.histograms)
    print(text)
    progress(f"bench: wrote {', '.join(map(str, wrote))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
