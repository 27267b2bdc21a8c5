"""Composition root: a Config becomes running parts, started and stopped in a fixed order.

Start: data folder, Valkey (embedded unless a URL is given), metrics, cache, memory, the
outbox (delivering what a previous run left), handlers, then the listener last. Stop, in
reverse: close the listener and connections (in-flight requests finish), wait for
background memory queries, give the outbox the deadline to drain, then close memory,
cache, the embedded Valkey and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from bridge.cache import ContextCache
from bridge.config import Config
from bridge.embedded import EmbeddedValkey
from bridge.handlers import Handlers
from bridge.memory.base import MemoryBackend
from bridge.memory.sqlite import SqliteMemory
from bridge.metrics import Metrics
from bridge.outbox import Delivery, Outbox
from bridge.server import Server

log = logging.getLogger(__name__)


class App:
    """The bridge's parts, wired together from one Config."""

    def __init__(self, config: Config, memory: MemoryBackend | None = None) -> None:
        self.config = config
        self.valkey: EmbeddedValkey | None = None
        self.metrics = Metrics(config.statsd_host, config.statsd_port)
        self.memory = memory or SqliteMemory(config.memory_path)
        self.cache: ContextCache | None = None
        self.server: Server | None = None
        self.handlers: Handlers | None = None
        self.delivery: Delivery | None = None

    async def start(self) -> None:
        """Start every part; the server listens once everything behind it is ready."""
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        valkey_url = config.valkey_url
        if valkey_url is None:
            self.valkey = EmbeddedValkey()
            await self.valkey.start()
            valkey_url = self.valkey.url
        self.cache = ContextCache.from_url(
            valkey_url,
            prefix=config.cache_prefix,
            ttl=config.cache_ttl,
            on_unavailable=self.metrics.cache_unavailable,
        )
        await self.cache.start()
        await self.memory.start()
        self.delivery = Delivery(
            self.memory, Outbox(config.outbox_path), store_timeout=config.store_timeout_ms / 1000
        )
        await self.delivery.start()
        self.handlers = Handlers(
            self.memory,
            self.cache,
            self.metrics,
            recall_limit=config.recall_limit,
            miss_budget=config.miss_budget_ms / 1000.0,
            delivery=self.delivery,
        )
        self.server = Server(config, self.handlers, self.metrics, self.readiness)
        await self.server.start()

    async def readiness(self) -> list[str]:
        """What keeps the bridge from serving fully right now (empty when ready)."""
        problems = []
        if self.cache is None or not await self.cache.ping():
            problems.append("valkey: unreachable (chat:start answers from memory, uncached)")
        try:
            await asyncio.wait_for(self.memory.recall("readyz", "ready", 1), 2.0)
        except Exception as e:
            problems.append(f"memory: {type(e).__name__}: {e}")
        return problems

    async def stop(self) -> None:
        """Stop every part in reverse order of start. Safe to call after a failed start."""
        deadline = self.config.shutdown_deadline
        if self.server is not None:
            await self.server.stop()
        if self.handlers is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.handlers.drain(), deadline)
        if self.delivery is not None:
            if not await self.delivery.flush(deadline):
                log.warning(
                    "%d episodes stay in the outbox for the next start",
                    self.delivery.outbox.pending,
                )
            await self.delivery.close()
        await self.memory.close()
        if self.cache is not None:
            await self.cache.close()
        if self.valkey is not None:
            await self.valkey.close()
        self.metrics.close()


async def serve(config: Config) -> None:
    """Run the bridge until SIGINT or SIGTERM."""
    app = App(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await app.start()
        assert app.server is not None
        valkey = config.valkey_url or "embedded valkey-server (private unix socket)"
        print(
            f"graphiti-bridge listening on ws://{config.host}:{app.server.port} "
            f"(valkey: {valkey}; memory: {config.memory_path})",
            flush=True,
        )
        await stopping.wait()
        log.info("shutting down")
    finally:
        await app.stop()
    print("graphiti-bridge stopped", file=sys.stderr, flush=True)
