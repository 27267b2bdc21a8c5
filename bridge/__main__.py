"""Command line: ``graphiti-bridge serve|export|import [flags]`` (also ``python -m bridge``).

``export`` and ``import`` move a project's episodes between backends as JSON Lines, e.g.
from the embedded store to Graphiti::

    graphiti-bridge export --project shop > shop.jsonl
    graphiti-bridge import --memory graphiti shop.jsonl

They hold the data folder like a server does, so they refuse to run while a server uses
the same ``--data-dir``. ``worker`` is not for users: ``serve --workers N`` runs it,
once per worker (see ``bridge.runtime.workers``). Whatever keeps a command from starting
or finishing (a bad flag or environment value, a port in use, a busy data folder, an
unreadable file) is one line on stderr, ``graphiti-bridge: <what was wrong>``, and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Coroutine, Iterator, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from bridge import __version__
from bridge.config import (
    Config,
    StartupError,
    add_serve_arguments,
    config_from_args,
    environment,
    worker_config,
)

if TYPE_CHECKING:
    from bridge.runtime.workers import Report

IMPORT_PROJECT_HELP = (
    "move every episode into this project (default: each keeps the project it was exported from)"
)


def build_parser() -> argparse.ArgumentParser:
    """The ``graphiti-bridge`` argument parser, defaults taken from the environment."""
    env = environment()
    parser = argparse.ArgumentParser(
        prog="graphiti-bridge", description="Memory bridge between OpenCode and Graphiti."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,export,import}")
    add_serve_arguments(commands.add_parser("serve", help="run the WebSocket server"), env)
    export = commands.add_parser("export", help="write a project's episodes as JSON Lines")
    export.add_argument("--out", default="-", help="file to write (default: standard output)")
    add_serve_arguments(export, env)
    load = commands.add_parser("import", help="store episodes from JSON Lines")
    load.add_argument("file", nargs="?", default="-", help="file to read (default: stdin)")
    add_serve_arguments(load, env, project_help=IMPORT_PROJECT_HELP)
    worker = commands.add_parser("worker")  # run by serve --workers N, not listed
    worker.add_argument("number", type=int, help="which worker this is (1..N)")
    worker.add_argument("report_fd", type=int, help="pipe to the parent: ready, or why not")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the console script: run a command, or exit 2 saying why it cannot."""
    args = build_parser().parse_args(argv)
    try:
        _command(args)
    except StartupError as e:
        print(f"graphiti-bridge: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _command(args: argparse.Namespace) -> None:
    """Run the parsed command (raises StartupError when it cannot start or finish)."""
    if args.command == "worker":
        from bridge.runtime.workers import Report

        _worker(args.number, Report(args.report_fd))
        return
    move_to: str | None = args.project if args.command == "import" else None
    config = config_from_args(args)
    _configure_logging(config)
    from bridge.runtime import app

    if args.command == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            _run(app.serve(config))
    elif args.command == "export":
        count = _run(app.export_project(config, config.project, lambda: _stream(args.out, "wb")))
        print(f"exported {count} episodes of {config.project}", file=sys.stderr)
    else:
        with _stream(args.file, "rb") as src:
            done = _run(app.import_project(config, move_to, src))
        where = f"into {move_to}: " if move_to is not None else ""
        print(f"{where}{done}", file=sys.stderr)


def _worker(number: int, report: Report) -> None:
    """Run one worker of ``serve --workers N`` with the Config its parent put in its
    environment; whatever keeps it from starting is also reported to the parent."""
    try:
        config = worker_config(environment())
        if config.server.worker != number:
            given = config.server.worker
            raise StartupError(f"worker {number} was given the configuration of {given}")
        _configure_logging(config)
        from bridge.runtime import app

        with contextlib.suppress(KeyboardInterrupt):
            _run(app.serve(config, ready=report.ready))
    except StartupError as e:
        report.failed(str(e))
        raise


def _configure_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Third-party chatter (and one line per WebSocket opened or closed) only when debugging.
    if config.server.log_level != "debug":
        for noisy in ("graphiti_core", "httpx", "openai", "neo4j", "bridge.websockets"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # Without a Datadog agent every flush is refused (ICMP): the metrics just go nowhere.
        logging.getLogger("datadog.dogstatsd").setLevel(logging.ERROR)


@contextlib.contextmanager
def _stream(path: str, mode: str) -> Iterator[BinaryIO]:
    """The file at ``path``, or standard input/output for ``-``."""
    if path == "-":
        yield sys.stdout.buffer if "w" in mode else sys.stdin.buffer
        return
    try:
        file = open(path, mode)  # noqa: SIM115 (closed below, after the command ran)
    except OSError as e:
        verb = "write" if "w" in mode else "read"
        raise StartupError(f"cannot {verb} {path}: {e.strerror}") from e
    with file:
        yield cast(BinaryIO, file)


def _run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop where it is installed (it is a dependency except on Windows)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


if __name__ == "__main__":
    main()
