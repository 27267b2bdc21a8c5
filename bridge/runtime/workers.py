"""``serve --workers N``: N processes serving one port, sharing what is embedded.

The parent process holds the data folder (``bridge.runtime.datadir``), starts what the workers
share (the private Valkey unless ``--valkey-url``; for ``--memory graphiti`` without
``--graph-url`` the private FalkorDB), creates or migrates the embedded store (so no
worker waits for another to do it), makes the store id, and reserves the port; then it
runs N worker processes (``graphiti-bridge worker K``). Each worker is a whole bridge
(``bridge.runtime.app.App``) started from the parent's resolved Config, URLs and passwords
included, which it finds in its environment (``bridge.config.worker_environment``), never
on its command line. The workers listen on the same host and port with SO_REUSEPORT, and
the kernel spreads connections over them; each has its own connections and limits, cache
copy, recall index and outbox file (``outbox-K.sqlite3``).

A worker that exits is started again after a backoff, with the policy of the embedded
servers (``bridge.runtime.embedded.ChildServer``), and takes over its outbox. SIGTERM or SIGINT to
the parent (handled in ``bridge.runtime.app.serve``) stops the workers: SIGTERM to each, a wait
for them all until the shutdown deadline (``--shutdown-deadline``; each worker's own is a
second shorter), SIGKILL for those left; then the embedded servers stop and the data
folder is let go, all within that one deadline. Should the parent die without stopping
them, the workers get SIGTERM from the kernel (PR_SET_PDEATHSIG), as the embedded servers
do.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time

from bridge.cache.store_identity import memory_identity
from bridge.config import Config, StartupError, environment, worker_environment
from bridge.runtime.datadir import DataDirLock
from bridge.runtime.embedded import ChildServer, _die_with_parent
from bridge.runtime.lifecycle import Lifecycle, close_within, start_falkor

log = logging.getLogger(__name__)

READY_TIMEOUT = 120.0  # seconds a worker may take to listen (a graph's indexes, a migration)
READY = b"ready"
PORT_ATTEMPTS = 5
WORKER_MARGIN = 1.0  # seconds of the parent's shutdown deadline a worker does not get


class WorkerProcess(ChildServer):
    """One worker: ``graphiti-bridge worker K`` with the resolved Config in its
    environment, reporting on a pipe once it listens (or why it cannot start)."""

    def __init__(self, config: Config, number: int) -> None:
        super().__init__("graphiti-bridge-worker-")
        self.config = config
        self.number = number
        self.name = f"worker {number}"

    async def start(self) -> None:
        """Start the worker and return once it listens; from then on it is started again
        whenever it exits without ``stop`` (raises RuntimeError saying why it did not)."""
        self._watch(await self._launch(READY_TIMEOUT))

    async def _launch(self, timeout: float = READY_TIMEOUT) -> subprocess.Popen[bytes]:
        ready, report = os.pipe()
        try:
            process = self._spawn_worker(report)
        finally:
            os.close(report)
        try:
            said = await _read_report(ready, timeout)
        finally:
            os.close(ready)
        if said == READY:
            return process
        if process.poll() is None:
            reason = said.decode(errors="replace") or f"it did not listen within {timeout} s"
            await self._terminate()
        else:
            self._process = None
            reason = said.decode(errors="replace") or f"it exited with {process.returncode}"
        raise RuntimeError(f"worker {self.number} did not start: {reason}")

    def _spawn_worker(self, report: int) -> subprocess.Popen[bytes]:
        """Start the process, tied to this one's life on Linux; it reports on ``report``."""
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "worker", str(self.number), str(report)],
            stdin=subprocess.DEVNULL,
            env={**environment(), **worker_environment(self.config, self.number)},
            pass_fds=(report,),
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        return self._process


async def _read_report(fd: int, timeout: float) -> bytes:
    """What a worker wrote on its report pipe before closing it (``ready``, or why it
    could not start); empty if it closed it saying nothing (it died) or said nothing in
    ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    data = b""
    closed = asyncio.Event()

    def readable() -> None:
        nonlocal data
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        data += chunk
        if not chunk or data.endswith(b"\n"):
            closed.set()

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(closed.wait(), timeout)
    except TimeoutError:
        return b""
    finally:
        loop.remove_reader(fd)
    return data.strip()


def reserve_port(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Check that nothing listens on ``host``:``port`` and hold it for the workers.

    The hold is a socket per address of ``host``, bound with SO_REUSEPORT and never
    listening: it takes no connection, lets the workers (SO_REUSEPORT too) bind beside it,
    and keeps the port ours while they restart. Port 0 becomes a free port, the same on
    every address. Raises OSError when the port is taken.
    """
    addresses = list(
        dict.fromkeys(
            (family, address[:2])
            for family, _, _, _, address in socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        )
    )
    for attempt in range(PORT_ATTEMPTS):
        chosen, held = port, []
        try:
            for family, (address, _) in addresses:
                with socket.socket(family, socket.SOCK_STREAM) as probe:  # refused if used
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind((address, chosen))
                    chosen = probe.getsockname()[1]
                held.append(_hold(family, str(address), chosen))
        except OSError:
            for hold in held:
                hold.close()
            if port or attempt == PORT_ATTEMPTS - 1:
                raise
            continue
        return held, chosen
    raise AssertionError("unreachable")


def _hold(family: socket.AddressFamily, address: str, port: int) -> socket.socket:
    """A socket bound to ``address``:``port`` with SO_REUSEPORT, never listening. Without
    SO_REUSEADDR it also keeps off another bridge's check of the port (its probe); when
    connections of an earlier run still linger (TIME_WAIT), it needs SO_REUSEADDR too."""
    for reuse_address in (False, True):
        hold = socket.socket(family, socket.SOCK_STREAM)
        try:
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse_address))
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            hold.bind((address, port))
        except OSError:
            hold.close()
            if reuse_address:
                raise
            continue
        return hold
    raise AssertionError("unreachable")


class Workers(Lifecycle):
    """The parent of ``serve --workers N``: what the workers share, and the workers. Like
    ``bridge.runtime.app.App``, an async context manager (or ``start`` and ``stop``); it
    starts the shared parts, then every worker, and is started once all of them listen.
    ``stop`` stops the workers (SIGTERM; SIGKILL at the shutdown deadline), then the
    shared parts, all within the one deadline."""

    kind = "the parent of --workers"

    def __init__(self, config: Config) -> None:
        super().__init__(config.server.shutdown_deadline)
        self.config = config
        self.port = config.server.port
        self.data_dir = DataDirLock(config.data_dir)
        self.workers: list[WorkerProcess] = []

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        config, server = self.config, self.config.server
        stack.enter_context(self.data_dir)
        valkey_url = await self._valkey_url(stack, config.cache.valkey_url)
        graph_url = config.memory.graph_url
        if config.memory.backend == "graphiti" and graph_url is None:
            graph_url = self._own_falkor(stack, await start_falkor(config.data_dir))
        if config.memory.backend == "sqlite":
            await asyncio.to_thread(_prepare_store, config)
        try:
            await asyncio.to_thread(memory_identity, config)  # the store id, made once here
            held, self.port = reserve_port(server.host, server.port)
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise StartupError(f"cannot listen on {server.host}:{server.port}: {reason}") from e
        for hold in held:
            stack.callback(hold.close)
        shared = dataclasses.replace(
            config,
            server=dataclasses.replace(
                server, port=self.port, shutdown_deadline=worker_deadline(server.shutdown_deadline)
            ),
            cache=dataclasses.replace(config.cache, valkey_url=valkey_url),
            memory=dataclasses.replace(config.memory, graph_url=graph_url),
        )
        self.workers = [WorkerProcess(shared, n) for n in range(1, server.workers + 1)]
        stack.push_async_callback(self._stop_workers)
        started = await asyncio.gather(
            *(worker.start() for worker in self.workers), return_exceptions=True
        )
        for outcome in started:
            if isinstance(outcome, RuntimeError):
                raise StartupError(str(outcome)) from outcome
            if isinstance(outcome, BaseException):
                raise outcome

    @property
    def pids(self) -> list[int | None]:
        """The process id of each worker (None while it is being started again)."""
        return [worker.pid for worker in self.workers]

    async def _stop_workers(self) -> None:
        began = time.monotonic()
        remaining = self.deadline.remaining()
        await asyncio.gather(*(close_within(worker, remaining) for worker in self.workers))
        log.info("workers stopped in %.1f s", time.monotonic() - began)


def worker_deadline(deadline: float) -> float:
    """The shutdown deadline a worker gets: shorter than its parent's, so that it is done
    before the parent's SIGKILL at its own deadline."""
    return max(deadline - WORKER_MARGIN, deadline / 2)


def _prepare_store(config: Config) -> None:
    from bridge.memory.sqlite import prepare

    try:
        prepare(config.memory_path)
    except Exception as e:
        raise StartupError(f"the sqlite memory cannot start: {e}") from e


class Report:
    """A worker's end of its report pipe: it says once, ``ready`` or why the worker cannot
    start, and closes."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def ready(self) -> None:
        """This worker listens."""
        self._say(READY)

    def failed(self, reason: str) -> None:
        """This worker cannot start, for ``reason`` (one line is sent)."""
        self._say(" ".join(reason.split()).encode())

    def _say(self, line: bytes) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
            os.write(fd, line + b"\n")
        os.close(fd)
