"""Command line: ``graphiti-bridge serve [flags]`` (also ``python -m bridge serve``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from bridge import __version__
from bridge.config import ConfigError, add_serve_arguments, config_from_args, environment


def build_parser() -> argparse.ArgumentParser:
    """The ``graphiti-bridge`` argument parser, defaults taken from the environment."""
    parser = argparse.ArgumentParser(
        prog="graphiti-bridge", description="Memory bridge between OpenCode and Graphiti."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the WebSocket server")
    add_serve_arguments(serve, environment())
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            config = config_from_args(args)
        except ConfigError as e:
            raise SystemExit(f"graphiti-bridge: {e}") from None
        logging.basicConfig(
            level=config.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        from bridge.app import serve

        with contextlib.suppress(KeyboardInterrupt):
            _run(serve(config))


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (it is a dependency except on Windows)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


if __name__ == "__main__":
    main()
