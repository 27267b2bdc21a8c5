"""Moving episodes between backends as JSON lines: one msgspec-encoded Episode per line.

``export_jsonl`` writes a project's episodes oldest first; ``import_jsonl`` stores each line
through any backend in file order, so importing into a backend that already holds some of
them is harmless (``store`` is idempotent on the episode uuid).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO

import msgspec

from bridge.episode import Episode
from bridge.errors import BadRequest
from bridge.memory.base import MemoryBackend

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Episode).decode


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
    backend: MemoryBackend, src: Iterable[bytes], *, group_id: str | None = None
) -> int:
    """Store every episode read from ``src`` (lines of JSON; blank lines are skipped).

    ``group_id`` moves every episode into that project instead of its own. Returns the
    number of episodes stored. A line that is not an episode raises BadRequest naming its
    line number, after the lines before it were stored.
    """
    count = 0
    for number, line in enumerate(src, start=1):
        if not line.strip():
            continue
        try:
            episode = _decode(line)
        except msgspec.DecodeError as e:
            raise BadRequest(f"line {number}: {e}") from e
        if group_id is not None:
            episode = msgspec.structs.replace(episode, group_id=group_id)
        await backend.store(episode)
        count += 1
    return count
