"""The data the suite works on: a deterministic episode corpus and the queries it asks.

The corpus looks like what OpenCode sends over a working day: file edits under
``src/<component>/mod<k>.py``, errors and completed tasks, one a minute, oldest first.
Miss queries start with a unique token (``q0000042 ...``) so that no two share a cache key,
not even under the original plugin's key of the query's first 24 characters; the rest of
each query shares words with the corpus, so memory always has something to return.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import msgspec

from bench.common import PROJECT
from bridge.episode import Episode, new_episode

COMPONENTS: Final = (
    "parser",
    "lexer",
    "auth",
    "login",
    "session",
    "cache",
    "router",
    "config",
    "database",
    "migration",
    "scheduler",
    "upload",
    "billing",
    "search",
    "render",
)
FAILURES: Final = (
    "TypeError",
    "ValueError",
    "KeyError",
    "timeout",
    "deadlock",
    "null pointer",
    "race condition",
    "memory leak",
)
WORKING_SET: Final = 50  # distinct hot queries and files
MEMORY_MANAGER: Final = Path(__file__).resolve().parent / "memory_manager.py"


def hot_path(k: int) -> str:
    """The ``k``-th file of the working set."""
    return f"src/{COMPONENTS[k % len(COMPONENTS)]}/mod{k % WORKING_SET}.py"


def corpus(count: int, project: str = PROJECT, now: float | None = None) -> list[Episode]:
    """``count`` episodes of ``project``, one a minute up to ``now``, oldest first."""
    now = time.time() if now is None else now
    episodes = []
    for i in range(count):
        part = COMPONENTS[(i * 7) % len(COMPONENTS)]
        failure = FAILURES[(i * 5) % len(FAILURES)]
        path = hot_path(i)
        when = now - (count - i) * 60.0
        metadata: dict[str, object]
        if i % 3 == 0:
            body, name = f"Modified: {path}", f"file:write {path}"
            kind, metadata = "OpenCode file write", {"type": "file_edit", "path": path}
        elif i % 3 == 1:
            body, name = f"Error: {failure} in {part} handling request {i}", "error"
            kind, metadata = "OpenCode error", {"type": "error", "severity": "high"}
        else:
            body, name = f"Completed: fix the {failure} in {part} ({path})", "completion"
            kind = "OpenCode task completion"
            metadata = {"type": "success", "duration": 1000.0 + i, "tokens": 100 + i}
        episodes.append(
            new_episode(
                project, name, body, kind, metadata, episode_id=f"{i:032x}", reference_time=when
            )
        )
    return episodes


def miss_query(i: int) -> str:
    """A query no earlier request asked (unique from its first characters on)."""
    part = COMPONENTS[(i * 3) % len(COMPONENTS)]
    failure = FAILURES[i % len(FAILURES)]
    return f"q{i:07d} why does the {part} fail with {failure} again"


def hot_query(k: int) -> str:
    """The ``k``-th query of the working set; it names the file ``hot_path(k)``."""
    return f"what changed in {hot_path(k)} and why did it break"


def install_memory_manager(folder: Path, episodes: list[Episode]) -> Path:
    """Put ``memory_manager.py`` in ``folder`` with ``episodes`` already stored; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "memory_manager.py"
    shutil.copyfile(MEMORY_MANAGER, script)
    encode = msgspec.json.Encoder().encode
    with (folder / "memory.jsonl").open("wb") as f:
        for episode in episodes:
            f.write(encode(episode) + b"\n")
    return script


def memory_manager_for(episodes: list[Episode]) -> Callable[[Path], Path]:
    """A factory installing ``memory_manager.py`` with ``episodes`` beside a bridge's data
    dir (for the ``memory_script`` setting of ``bench.harness.bridge``)."""

    def make(data_dir: Path) -> Path:
        return install_memory_manager(data_dir.parent / "graphiti", episodes)

    return make
