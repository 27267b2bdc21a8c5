"""A small ``memory_manager.py`` as the original plugin deployed it: one process per call.

Episodes live as JSON lines in ``memory.jsonl`` beside this file. It follows the argument
contract of ``bridge/memory/script.py`` (what the bridge's script backend sends) and also
accepts the original plugin's bare positional form (``store <content> <metadata-json>``,
``query <text>``): options left out mean "no group filter" and "a fresh uuid".

    store  <content> <metadata-json> [--group=G --uuid=U --name=N
           --source-description=D --reference-time=T]
    query  <text> [--group=G --limit=N]
    export [--group=G]

``query`` ranks the episodes sharing the most words (of three or more letters) with the
text, newest first among equals, and prints ``{"episodes": [...], "facts": []}``. Only the
standard library is used, so any ``python3`` can run it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

FILE = Path(__file__).resolve().parent / "memory.jsonl"
WORD = re.compile(r"\w+")


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="memory_manager.py")
    commands = parser.add_subparsers(dest="command", required=True)
    store = commands.add_parser("store")
    store.add_argument("content")
    store.add_argument("metadata", nargs="?", default="{}")
    store.add_argument("--group", default="")
    store.add_argument("--uuid", default=None)
    store.add_argument("--name", default="episode")
    store.add_argument("--source-description", default="memory_manager.py")
    store.add_argument("--reference-time", type=float, default=None)
    query = commands.add_parser("query")
    query.add_argument("text")
    query.add_argument("--group", default=None)
    query.add_argument("--limit", type=int, default=10)
    export = commands.add_parser("export")
    export.add_argument("--group", default=None)
    return parser.parse_args(argv)


def episodes() -> list[dict[str, Any]]:
    """Every stored episode, oldest line first."""
    if not FILE.exists():
        return []
    return [json.loads(line) for line in FILE.read_text().splitlines() if line]


def words(text: str) -> set[str]:
    """The lower-cased words of three or more characters in ``text``."""
    return {w for w in WORD.findall(text.lower()) if len(w) > 2}


def store(args: argparse.Namespace) -> None:
    """Append one episode (fsynced); a uuid already stored is a no-op."""
    if args.uuid is not None and any(e["uuid"] == args.uuid for e in episodes()):
        return
    episode = {
        "uuid": args.uuid or uuid.uuid4().hex,
        "group_id": args.group,
        "name": args.name,
        "body": args.content,
        "source_description": args.source_description,
        "reference_time": time.time() if args.reference_time is None else args.reference_time,
        "metadata": json.loads(args.metadata),
    }
    with FILE.open("a") as f:
        f.write(json.dumps(episode) + "\n")
        f.flush()
        os.fsync(f.fileno())


def query(args: argparse.Namespace) -> None:
    """Print the best ``limit`` episodes for the text as JSON."""
    wanted = words(args.text)
    scored = []
    for e in episodes():
        if args.group is not None and e["group_id"] != args.group:
            continue
        shared = len(wanted & words(e["body"]))
        if shared:
            scored.append((shared, e["reference_time"], e))
    scored.sort(key=lambda s: (-s[0], -s[1]))
    print(json.dumps({"episodes": [e for _, _, e in scored[: args.limit]], "facts": []}))


def export(args: argparse.Namespace) -> None:
    """Print every episode (of the group, if given) as a JSON line, oldest first."""
    for e in sorted(episodes(), key=lambda e: e["reference_time"]):
        if args.group is None or e["group_id"] == args.group:
            print(json.dumps(e))


def main(argv: list[str]) -> int:
    """Run one command; exit 0 once done."""
    args = parse(argv)
    {"store": store, "query": query, "export": export}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
