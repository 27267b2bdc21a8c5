"""Moving episodes between backends as JSON lines: one msgspec-encoded Episode per line.

``export_jsonl`` writes a project's episodes oldest first; ``import_jsonl`` stores each line
through any backend in file order, so importing into a backend that already holds some of
them is harmless (``store`` is idempotent on the episode uuid, and says when it was).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

import msgspec

from bridge.episode import Episode
from bridge.errors import BadRequest, BridgeError
from bridge.memory.base import MemoryBackend
from bridge.memory.privacy import scrub_episode

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Episode).decode


@dataclass
class Imported:
    """What an import did so far: episodes newly stored, and those already present."""

    stored: int = 0
    skipped: int = 0

    def __str__(self) -> str:
        return f"imported {self.stored}, skipped {self.skipped} already present"


class ImportStopped(BadRequest):
    """A line could not be read or stored; the lines before it were. The message says
    which line and what the import had done up to it."""

    def __init__(self, line: int, reason: str, done: Imported) -> None:
        super().__init__(
            f"line {line} {reason}; the import stopped there, after the lines before it: {done}"
        )
        self.line = line
        self.done = done


async def export_jsonl(
    backend: MemoryBackend, group_id: str, out: BinaryIO, *, batch: int = 500
) -> int:
    """Write every episode of ``group_id`` to ``out``, one JSON line each; return the count."""
    count = 0
    async for episodes in backend.export(group_id, batch):
        out.write(b"".join(_encode(episode) + b"\n" for episode in episodes))
        count += len(episodes)
    return count


async def import_jsonl(
    backend: MemoryBackend,
    src: Iterable[bytes],
    *,
    group_id: str | None = None,
    done: Imported | None = None,
) -> int:
    """Store every episode read from ``src`` (lines of JSON; blank lines are skipped).

    Each episode keeps its own project, unless ``group_id`` moves every one into that
    project. Each is scrubbed first, like a client's event (bridge/memory/privacy.py). An episode
    whose uuid the backend already holds is counted as skipped, not stored; ``done`` (if
    given) keeps both counts as the import runs. Returns the number of episodes newly
    stored. A line that is not an episode, or that the backend refuses, raises
    ImportStopped naming its line number, after the lines before it were stored.
    """
    done = Imported() if done is None else done
    for number, line in enumerate(src, start=1):
        if not line.strip():
            continue
        try:
            episode = scrub_episode(_decode(line))
        except msgspec.DecodeError as e:
            raise ImportStopped(number, f"is not an episode ({e})", done) from e
        if group_id is not None:
            episode = msgspec.structs.replace(episode, group_id=group_id)
        try:
            stored = await backend.store(episode)
        except BridgeError as e:
            raise ImportStopped(number, f"could not be stored ({e})", done) from e
        if stored is False:
            done.skipped += 1
        else:
            done.stored += 1
    return done.stored
