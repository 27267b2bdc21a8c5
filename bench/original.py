"""The original plugin's memory path (the seed design), reproduced to compare against.

The seed's TypeScript plugin ran inside OpenCode and, per event, did what
``OriginalPlugin`` does here, with the same ``memory_manager.py`` the bridge's script
backend runs:

* ``chat:start``: ``GET memory:{base64(query)[:32]}`` from Valkey; on a miss, run
  ``python3 memory_manager.py query <text>`` (bun's ``$``, here
  ``asyncio.create_subprocess_exec``: no shell either way), then ``SETEX`` the output for
  300 s.
* ``file:write``: run ``python3 memory_manager.py store 'Modified: <path>' <metadata>``,
  then ``SCAN`` for ``memory:*<path>*`` and ``DEL`` what matched (the seed's invalidation,
  which never matches a base64 key, kept as it was).

There is no WebSocket: the plugin called these from OpenCode's own process, so the
comparison with the bridge's round trips (which include a WebSocket hop) favours this side.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Final

import redis.asyncio as redis

from bench.common import BenchError

TTL: Final = 300
TIMEOUT: Final = 30.0


class OriginalPlugin:
    """The seed plugin's handlers, one subprocess per memory call."""

    def __init__(self, script: Path, python: str, valkey: redis.Redis) -> None:
        self.script = script
        self.python = python
        self.valkey = valkey
        self.misses = 0

    @staticmethod
    def cache_key(query: str) -> str:
        """The seed's cache key: ``memory:`` and the first 32 characters of base64(query)."""
        return "memory:" + base64.b64encode(query.encode()).decode()[:32]

    async def run(self, *args: str) -> bytes:
        """``python3 memory_manager.py <args>``; its stdout (BenchError if it failed)."""
        return await self._spawn(str(self.script), *args)

    async def run_python(self, code: str) -> bytes:
        """``python3 -c <code>`` (to time what a heavier script would import)."""
        return await self._spawn("-c", code)

    async def _spawn(self, *args: str) -> bytes:
        process = await asyncio.create_subprocess_exec(
            self.python,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise BenchError(f"python3 {' '.join(args)[:80]} timed out") from None
        if process.returncode != 0:
            raise BenchError(f"python3 {' '.join(args)[:80]} failed: {err.decode()[-500:]}")
        return out

    async def chat_start(self, query: str) -> str:
        """The context to inject for ``query``: from Valkey, else from the script."""
        key = self.cache_key(query)
        cached = await self.valkey.get(key)
        if cached is not None:
            return cached if isinstance(cached, str) else cached.decode()
        self.misses += 1
        context = (await self.run("query", query)).decode().strip()
        await self.valkey.setex(key, TTL, context)
        return f"[Memory Context]{context}"

    async def file_write(self, path: str) -> None:
        """Store ``Modified: <path>`` through the script, then drop matching cache keys."""
        metadata = json.dumps({"type": "file_edit", "path": path})
        await self.run("store", f"Modified: {path}", metadata)
        async for key in self.valkey.scan_iter(match=f"memory:*{path}*"):
            await self.valkey.delete(key)
