"""What the bridge and the parent of its workers share: started once, in order, and
stopped in reverse within one shutdown deadline, with the private servers they own.

``Lifecycle`` is an async context manager (or ``start`` and ``stop``): its ``_start``
enters each part on an exit stack, and ``stop`` closes them in reverse, each step given
what is left of the deadline (``bridge.deadline``). A start that fails part way stops
what did start.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from typing import Self

from bridge.config import StartupError
from bridge.deadline import Deadline
from bridge.runtime.embedded import ChildServer, EmbeddedFalkorDB, EmbeddedValkey


async def close_within(child: ChildServer, seconds: float) -> None:
    """Stop a worker or a private server (SIGTERM, then SIGKILL after ``seconds``; at
    once when none are left) and remove its private folder."""
    await child.stop(seconds)
    await asyncio.to_thread(shutil.rmtree, child.dir, ignore_errors=True)


async def start_falkor(data_dir: Path) -> EmbeddedFalkorDB:
    """A private FalkorDB keeping its graph in ``data_dir``/falkordb, started (StartupError
    when it cannot)."""
    falkor = EmbeddedFalkorDB(data_dir=data_dir / "falkordb")
    try:
        await falkor.start()
    except (RuntimeError, OSError) as e:
        raise StartupError(f"the private FalkorDB did not start: {e}") from e
    return falkor


class Lifecycle:
    """Parts started once, in order, and stopped in reverse within ``shutdown_deadline``
    seconds; ``kind`` names what is started, for the error a second start gets."""

    kind = "a lifecycle"

    def __init__(self, shutdown_deadline: float) -> None:
        self.valkey: EmbeddedValkey | None = None  # the private one, without --valkey-url
        self.falkor: EmbeddedFalkorDB | None = None  # the private one, for graphiti
        self._stack: contextlib.AsyncExitStack | None = None
        self.deadline = Deadline(shutdown_deadline)  # the shutdown's, from stop

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every part; what did start is stopped again when a part cannot."""
        if self._stack is not None or self.deadline.started:
            raise RuntimeError(f"{self.kind} starts once")
        self._stack = contextlib.AsyncExitStack()
        try:
            await self._start(self._stack)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        """Enter every part on ``stack``, in order."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Close the parts in reverse order of start, within the shutdown deadline. Safe to
        call after a failed start, and more than once."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        self.deadline.start()
        await stack.aclose()

    async def _valkey_url(self, stack: contextlib.AsyncExitStack, url: str | None) -> str:
        """``url``, or without one the URL of a private valkey-server, started here and
        stopped with the rest."""
        if url is not None:
            return url
        self.valkey = EmbeddedValkey()
        await self.valkey.start()
        stack.push_async_callback(self._close_child, self.valkey)
        return self.valkey.url

    def _own_falkor(self, stack: contextlib.AsyncExitStack, falkor: EmbeddedFalkorDB) -> str:
        """Keep a started private FalkorDB, stopped with the rest; its URL."""
        self.falkor = falkor
        stack.push_async_callback(self._close_child, falkor)
        return falkor.url

    async def _close_child(self, child: ChildServer) -> None:
        await close_within(child, self.deadline.closing_remaining())
