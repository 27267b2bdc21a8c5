"""A bridge as a process of its own, and the replies the benchmarks read from it.

Nothing here imports the bridge package, so a benchmark can run the bridge of another
checkout (``source``) and compare.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec

LISTENING: Final = re.compile(rb"listening on (ws://[\d.]+:\d+)")
STARTUP_TIMEOUT: Final = 120.0  # a first FalkorDB start can take a while
_PR_SET_PDEATHSIG: Final = 1


class BenchError(Exception):
    """The benchmark cannot go on (a reply was wrong or a part failed to start)."""


class Reply(msgspec.Struct):
    """The fields of a reply the benchmarks look at (an echoed chat:start also fits)."""

    type: str
    id: int | str | None = None
    ok: bool = True
    queued: bool = False
    hit: bool = False
    inject: str | None = None
    elapsed_us: int = -1
    error: dict[str, Any] | None = None


ENCODER: Final = msgspec.msgpack.Encoder()
DECODER: Final = msgspec.msgpack.Decoder(Reply)


def die_with_parent() -> None:  # in the child, between fork and exec
    """Ask Linux to SIGTERM this process when its parent dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True)
class RunningBridge:
    """A bridge process that listens: its URL and pid."""

    url: str
    pid: int


@contextlib.asynccontextmanager
async def serve(
    args: Sequence[str],
    data_dir: Path,
    statsd_port: int,
    log_path: Path,
    *,
    source: Path | None = None,
    stop_within: float = 30.0,
) -> AsyncIterator[RunningBridge]:
    """``python -m bridge serve`` on a free loopback port with ``data_dir`` and ``args``
    until the block ends; its stderr appended to ``log_path``. ``source`` runs the bridge
    package of another checkout (its folder). Stopped with SIGTERM, SIGKILL past
    ``stop_within`` seconds, so stores close cleanly."""
    env = dict(os.environ)
    env.update({"DD_AGENT_HOST": "127.0.0.1", "DD_DOGSTATSD_PORT": str(statsd_port)})
    for name in ("BRIDGE_TOKEN", "BRIDGE_TOKEN_FILE", "OPENAI_API_KEY"):
        env.pop(name, None)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "bridge", "serve", "--port", "0", "--host", "127.0.0.1",
            "--data-dir", str(data_dir), "--log-level", "warning", *args]  # fmt: skip
    with log_path.open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=env,
            cwd=source,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
        try:
            assert process.stdout is not None
            async with asyncio.timeout(STARTUP_TIMEOUT):
                while not (match := LISTENING.search(line := await process.stdout.readline())):
                    if not line:
                        tail = (await asyncio.to_thread(log_path.read_bytes))[-2000:]
                        text = tail.decode(errors="replace")
                        raise BenchError(f"the bridge exited before listening: {text}")
            yield RunningBridge(match.group(1).decode(), process.pid)
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), stop_within)
                except TimeoutError:
                    process.kill()
                    await process.wait()
