"""The in-process context copy (L1) and the Valkey invalidation stream that keeps it honest."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable

import pytest

from bridge.cache import ContextCache
from bridge.embedded import EmbeddedValkey
from bridge.tracking import LocalContexts, is_missing


@pytest.fixture
async def cache(valkey: EmbeddedValkey) -> AsyncIterator[ContextCache]:
    c = ContextCache.from_url(valkey.url, ttl=60)
    await c.start()
    assert c.local is not None and c.local.live, "the invalidation stream did not come up"
    yield c
    await c.close()


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` (bounded) until it holds."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


async def fill(cache: ContextCache, project: str, query: str, paths: list[str]) -> None:
    """Cache a context, then read it until the local copy holds it.

    Valkey broadcasts our own SET back, which may evict a copy made before it arrived, so
    the copy is settled only once a read after that broadcast has been made.
    """
    lookup = await cache.lookup(project, query)
    assert await cache.put(project, query, f"ctx {query}", paths, lookup.epoch)
    for _ in range(500):  # bounded
        assert (await cache.lookup(project, query)).hit
        if cache.lookup_local(project, query) is not None:
            return
        await asyncio.sleep(0.01)
    pytest.fail("the local copy never took the context")


async def test_a_valkey_hit_is_copied_in_and_then_served_without_io(
    cache: ContextCache, valkey: EmbeddedValkey
) -> None:
    await fill(cache, "p", "local please", [])
    assert valkey.pid is not None
    os.kill(valkey.pid, signal.SIGSTOP)  # no I/O can succeed now
    try:
        local = cache.lookup_local("p", "local please")
        served = await asyncio.wait_for(cache.lookup("p", "local please"), 1.0)
    finally:
        os.kill(valkey.pid, signal.SIGCONT)
    assert served.hit and served.inject == "ctx local please"
    assert local is not None and local.hit and local.inject == "ctx local please"


async def test_another_process_invalidation_reaches_the_local_copy(
    cache: ContextCache, valkey: EmbeddedValkey
) -> None:
    other = ContextCache.from_url(valkey.url, ttl=60, local_entries=0)
    try:
        await fill(cache, "p", "about src/a.py", ["src/a.py"])
        await fill(cache, "p", "about src/b.py", ["src/b.py"])
        assert cache.lookup_local("p", "about src/a.py") is not None
        await other.invalidate_path("p", "src/a.py")
        assert await eventually(lambda: cache.lookup_local("p", "about src/a.py") is None)
        assert not (await cache.lookup("p", "about src/a.py")).hit
        assert (await cache.lookup("p", "about src/b.py")).hit
    finally:
        await other.close()


async def test_own_invalidation_evicts_the_local_copy_at_once(cache: ContextCache) -> None:
    await fill(cache, "p", "mine src/x.py", ["src/x.py"])
    await cache.invalidate_path("p", "src/x.py")
    assert cache.lookup_local("p", "mine src/x.py") is None  # no waiting for the stream


async def test_expiry_and_flush_in_valkey_reach_the_local_copy(valkey: EmbeddedValkey) -> None:
    short = ContextCache.from_url(valkey.url, ttl=1)
    await short.start()
    try:
        await fill(short, "p", "short lived", [])
        assert await eventually(lambda: short.lookup_local("p", "short lived") is None, 5.0)
        await fill(short, "p", "flushed", [])
        await short._client.flushall()
        assert await eventually(lambda: short.lookup_local("p", "flushed") is None)
    finally:
        await short.close()


async def test_losing_the_stream_turns_the_copy_off_until_valkey_is_back(
    cache: ContextCache, valkey: EmbeddedValkey
) -> None:
    await fill(cache, "p", "survivor", [])
    assert cache.local is not None
    valkey.kill()
    assert await eventually(lambda: not cache.local.live)  # type: ignore[union-attr]
    assert len(cache.local) == 0
    assert cache.lookup_local("p", "survivor") is None
    await valkey.start()
    assert await eventually(lambda: cache.local.live, 10.0)  # type: ignore[union-attr]


def test_a_value_read_across_an_invalidation_is_not_kept() -> None:
    contexts = LocalContexts(max_entries=10)
    contexts.live = True
    generation = contexts.generation
    contexts.invalidate([b"k"])  # arrives while the read was in flight
    contexts.put("k", "stale", generation)
    assert is_missing(contexts.get("k"))
    contexts.put("k", "fresh", contexts.generation)
    assert contexts.get("k") == "fresh"


def test_the_copy_is_bounded_and_evicts_the_least_recently_used() -> None:
    contexts = LocalContexts(max_entries=3)
    contexts.live = True
    for key in "abc":
        contexts.put(key, key, contexts.generation)
    assert contexts.get("a") == "a"  # a is now the most recent
    contexts.put("d", "d", contexts.generation)
    assert is_missing(contexts.get("b"))
    assert [contexts.get(k) for k in "acd"] == ["a", "c", "d"]
    assert len(contexts) == 3


def test_nothing_is_served_while_not_live() -> None:
    contexts = LocalContexts()
    contexts.live = True
    contexts.put("k", None, contexts.generation)
    assert contexts.get("k") is None  # cached "memory had nothing"
    contexts.suspend()
    assert is_missing(contexts.get("k"))


def test_the_copy_is_bounded_in_bytes_too() -> None:
    contexts = LocalContexts(max_entries=10_000, max_bytes=1 << 20)
    contexts.live = True
    for i in range(100):
        contexts.put(f"k{i}", f"{i} " + "x" * 50_000, contexts.generation)
    assert contexts.bytes <= 1 << 20
    assert len(contexts) < 25
    assert contexts.get("k99") is not None and is_missing(contexts.get("k0"))
    contexts.put("huge", "x" * (1 << 20), contexts.generation)  # left to Valkey
    assert is_missing(contexts.get("huge"))
    contexts.invalidate([b"k99"])
    contexts.invalidate(None)
    assert contexts.bytes == 0
