"""What the delivery queues in the outbox and what it hands back (bridge.memory.delivery): only
failures memory may get over wait in the outbox; a refusal is the client's answer.

Memory is the script backend running a real memory_manager.py (tests/test_memory_script)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.episode import new_episode
from bridge.errors import BadRequest
from bridge.memory.delivery import Delivery
from bridge.memory.durable import EpisodeQueue
from bridge.memory.script import ScriptMemory
from tests.test_memory_script import MEMORY_MANAGER


async def test_an_episode_memory_refuses_outright_is_refused_and_never_blocks_the_outbox(
    tmp_path: Path,
) -> None:
    script = tmp_path / "memory_manager.py"
    script.write_text(MEMORY_MANAGER)
    memory = ScriptMemory(script, timeout=10.0)
    await memory.start()
    delivery = Delivery(memory, EpisodeQueue(tmp_path / "outbox.sqlite3"), store_timeout=10.0)
    await delivery.start()
    try:
        refused = new_episode("proj", "note", "a NUL \0 in the text", "test", {})
        with pytest.raises(BadRequest, match="NUL"):
            await delivery.store(refused)
        assert delivery.outbox.pending == 0, "a refused episode was queued"
        fine = new_episode("proj", "note", "the build is green again", "test", {})
        assert await delivery.store(fine) is False  # straight into memory, nothing ahead
    finally:
        await delivery.close()
        await memory.close()
    assert await recalled(script, "green") == [fine.uuid]


async def recalled(script: Path, query: str) -> list[str]:
    """The uuids of the episodes the script's memory recalls for ``query``."""
    memory = ScriptMemory(script, timeout=10.0)
    await memory.start()
    try:
        return [e.uuid for e in (await memory.recall("proj", query, 5)).episodes]
    finally:
        await memory.close()
