"""The script memory backend: the original plugin's ``memory_manager.py``, one process a call.

The original plugin ran ``python3 memory_manager.py store|query ...`` through a shell; this
backend runs the same script with an argument list (never a shell: no value is ever parsed
as shell syntax), a timeout (the process group is killed past it) and at most
``concurrency`` processes at once, so users of the original plugin can keep their script.

The argument contract (``options=False`` sends only the original positional arguments)::

    store  <body> <metadata-json> --group=G --uuid=U --name=N --source-description=D
           --reference-time=T            (T: seconds since the epoch, UTC)
    query  <text> --group=G --limit=N
    export --group=G

Options come last and in ``--name=value`` form, so with argparse they override anything a
value might look like. ``<metadata-json>`` is the episode's metadata as a JSON object.

What the script must do:

- ``store`` exits 0 once the episode is durable; its output is ignored. Storing a uuid
  twice should be a no-op (the bridge never retries on its own).
- ``query`` prints JSON: ``{"episodes": [...], "facts": [...]}`` or a list of episodes,
  best first. An episode is an object with the fields of bridge.episode.Episode; missing
  fields get defaults (``content`` is read as ``body``; no ``reference_time`` means the
  time of the query). Output that is not JSON, like the original script's plain text, is
  taken as one episode whose body is that text; empty output means nothing relevant.
- ``export`` prints one episode per line (JSON), oldest first.

A non-zero exit, a timeout or output that cannot be read is MemoryUnavailable, with the
tail of the script's stderr in the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import KW_ONLY, InitVar, dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec

from bridge.episode import Episode
from bridge.errors import BadRequest, MemoryUnavailable
from bridge.memory.base import Recall, Selector, Unsupported, candidates_from_recall
from bridge.memory.recall import Candidates, TaskHit

STDERR_TAIL = 2000  # characters of stderr quoted in an error
LINE_LIMIT = 16 * 1024 * 1024  # longest export line read
DEFAULT_SOURCE = "memory_manager.py"
CALL_TIMEOUT: Final = 10.0  # seconds per run of the script
CONCURRENCY: Final = 4  # runs at once

_encode = msgspec.json.Encoder().encode
T = TypeVar("T")


def _text(value: Any, default: str) -> str:
    return value if isinstance(value, str) else default


def lenient_episode(value: Any, group_id: str, now: float) -> Episode | None:
    """An episode from what a script printed for one (see the module docstring), or None."""
    item: dict[str, Any] = value if isinstance(value, dict) else {}
    body = value if isinstance(value, str) else _text(item.get("body", item.get("content")), "")
    if not body.strip():
        return None
    when = item.get("reference_time")
    metadata = item.get("metadata")
    digest = hashlib.sha256(f"{group_id}\0{body}".encode()).hexdigest()[:32]
    return Episode(
        uuid=_text(item.get("uuid"), digest),
        group_id=group_id,
        name=_text(item.get("name"), "script"),
        body=body,
        source_description=_text(item.get("source_description"), DEFAULT_SOURCE),
        reference_time=float(when) if isinstance(when, int | float) else now,
        metadata=metadata if isinstance(metadata, dict) else {},
    )


def parse_query_output(out: bytes, group_id: str, limit: int) -> Recall:
    """The Recall a ``query`` printed: JSON episodes and facts, or plain text as one episode."""
    text = out.decode(errors="replace").strip()
    if not text:
        return Recall(episodes=[])
    try:
        value: Any = msgspec.json.decode(text)
    except msgspec.DecodeError:
        value = text
    facts: list[str] = []
    items: Any = [value]
    if isinstance(value, list):
        items = value
    elif isinstance(value, dict) and ("episodes" in value or "facts" in value):
        items = value.get("episodes") or []
        for fact in value.get("facts") or []:
            fact = fact.get("fact") if isinstance(fact, dict) else fact
            if isinstance(fact, str) and fact.strip():
                facts.append(fact)
    now = time.time()
    episodes = [e for e in (lenient_episode(i, group_id, now) for i in items) if e is not None]
    return Recall(episodes=episodes[:limit], facts=facts[:limit])


@dataclass(eq=False)
class ScriptMemory:
    """A MemoryBackend that runs an existing memory script for every call: at most
    ``concurrency`` at once, each for at most ``timeout`` seconds."""

    name: str = field(default="script", init=False)

    script: Path
    _: KW_ONLY
    python: str = sys.executable
    timeout: float = CALL_TIMEOUT
    concurrency: InitVar[int] = CONCURRENCY
    options: bool = True
    _slots: asyncio.Semaphore = field(init=False)
    _running: set[asyncio.subprocess.Process] = field(init=False, default_factory=set)

    def __post_init__(self, concurrency: int) -> None:
        self._slots = asyncio.Semaphore(max(1, concurrency))

    async def start(self) -> None:
        """Check that the script exists (it is run afresh for every call)."""
        if not self.script.is_file():
            raise MemoryUnavailable(f"memory script {self.script} is not a file")

    async def close(self) -> None:
        """Kill scripts still running. Idempotent."""
        for process in list(self._running):
            await _reap(process)

    async def store(self, episode: Episode) -> bool:
        """Run ``store``; the episode is durable once the script exits 0. Returns True: the
        script's contract cannot tell a new episode from one it already held."""
        try:
            metadata = _encode(episode.metadata).decode()
        except (msgspec.EncodeError, TypeError) as e:
            raise MemoryUnavailable(f"cannot encode metadata: {e}") from e
        await self._run(
            ["store", episode.body, metadata],
            group=episode.group_id,
            uuid=episode.uuid,
            name=episode.name,
            source_description=episode.source_description,
            reference_time=repr(episode.reference_time),
        )
        return True

    async def recall(self, group_id: str, query: str, limit: int) -> Recall:
        """Run ``query`` and read what it printed (see the module docstring)."""
        if limit < 1 or not query.strip():
            return Recall(episodes=[])
        out = await self._run(["query", query], group=group_id, limit=str(limit))
        return parse_query_output(out, group_id, limit)

    async def candidates(self, group_id: str, query: str) -> Candidates:
        """The recalled facts and episodes as candidates, each a task of its own."""
        return candidates_from_recall(await self.recall(group_id, query, 20))

    async def export(self, group_id: str, batch: int) -> AsyncIterator[list[Episode]]:
        """Run ``export`` and yield the episodes it prints, ``batch`` at a time, as they come.

        ``timeout`` bounds the wait for each line, not the whole export.
        """
        async with self._slots:
            process = await self._spawn(self._argv(["export"], {"group": group_id}))
            assert process.stdout is not None and process.stderr is not None
            stderr = asyncio.create_task(_tail(process.stderr))
            now = time.time()
            episodes: list[Episode] = []
            try:
                while line := await self._within(process.stdout.readline(), process, "export"):
                    if not line.strip():
                        continue
                    try:
                        value = msgspec.json.decode(line)
                    except msgspec.DecodeError as e:
                        raise MemoryUnavailable(f"export printed a non-JSON line: {e}") from e
                    episode = lenient_episode(value, group_id, now)
                    if episode is not None:
                        episodes.append(episode)
                    if len(episodes) >= max(1, batch):
                        yield episodes
                        episodes = []
                if episodes:
                    yield episodes
                await self._within(process.wait(), process, "export")
                self._check(process, "export", await stderr)
            finally:
                await _reap(process)
                stderr.cancel()
                self._running.discard(process)

    async def forget(self, group_id: str, selector: Selector) -> int:
        """Refused: the script's contract has no command to forget with."""
        raise Unsupported(
            f"the script memory backend cannot forget: {self.script.name} has only "
            "store, query and export"
        )

    async def newest_tasks(
        self, group_id: str, limit: int, before_seq: int | None = None
    ) -> list[TaskHit]:
        """Refused: the script keeps episodes only, no tasks to list."""
        raise Unsupported(
            f"the script memory backend cannot list tasks: {self.script.name} keeps no tasks"
        )

    async def projects(self) -> list[str]:
        """Refused: the script's contract cannot list the projects it holds."""
        raise Unsupported(
            f"the script memory backend cannot list projects: {self.script.name} has no "
            "such command"
        )

    async def _run(self, args: list[str], **options: str) -> bytes:
        """Run the script with ``args`` (and options) and return its stdout."""
        async with self._slots:
            process = await self._spawn(self._argv(args, options))
            try:
                out, err = await self._within(process.communicate(), process, args[0])
            finally:
                await _reap(process)
                self._running.discard(process)
        self._check(process, args[0], err)
        return out

    def _argv(self, args: list[str], options: dict[str, str]) -> list[str]:
        if not self.options:
            options = {}
        flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
        argv = [self.python, str(self.script), *args, *flags]
        if any("\0" in arg for arg in argv):
            raise BadRequest("the script memory cannot pass text containing NUL characters")
        return argv

    async def _spawn(self, argv: list[str]) -> asyncio.subprocess.Process:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group, killed as a whole
                limit=LINE_LIMIT,
            )
        except OSError as e:
            raise MemoryUnavailable(f"cannot run {self.script}: {e}") from e
        self._running.add(process)
        return process

    async def _within(
        self, work: Awaitable[T], process: asyncio.subprocess.Process, what: str
    ) -> T:
        """Await ``work`` of the script; past ``timeout``, kill the script."""
        try:
            return await asyncio.wait_for(work, self.timeout)
        except TimeoutError:
            _kill(process)
            raise MemoryUnavailable(
                f"{self.script.name} {what} timed out after {self.timeout} s"
            ) from None

    def _check(self, process: asyncio.subprocess.Process, what: str, stderr: bytes) -> None:
        if process.returncode != 0:
            tail = stderr.decode(errors="replace")[-STDERR_TAIL:].strip()
            raise MemoryUnavailable(
                f"{self.script.name} {what} exited with {process.returncode}: {tail}"
            )


async def _tail(stream: asyncio.StreamReader) -> bytes:
    """Read a stream to its end, keeping only its last STDERR_TAIL bytes."""
    kept = b""
    while chunk := await stream.read(65536):
        kept = (kept + chunk)[-STDERR_TAIL:]
    return kept


async def _reap(process: asyncio.subprocess.Process) -> None:
    """Kill the script if it still runs, and wait for it."""
    _kill(process)
    await process.wait()


def _kill(process: asyncio.subprocess.Process) -> None:
    """SIGKILL the script's process group if it is still running."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
