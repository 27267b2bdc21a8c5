"""The in-process context copy (L1) and the Valkey invalidation stream that keeps it honest."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest

from bridge.cache.contexts import ContextCache, Lookup
from bridge.cache.tracking import LocalContexts, is_missing
from bridge.runtime.embedded import EmbeddedValkey
from tests.waiting import eventually


@pytest.fixture
async def cache(valkey: EmbeddedValkey) -> AsyncIterator[ContextCache]:
    c = ContextCache.from_url(valkey.url, ttl=60)
    await c.start()
    assert c.local is not None and c.local.live, "the invalidation stream did not come up"
    yield c
    await c.close()


async def fill(cache: ContextCache, project: str, query: str, paths: list[str]) -> None:
    """Cache a context, then read it until the local copy holds it."""
    lookup = await cache.lookup(project, query)
    assert await cache.put(project, query, f"ctx {query}", paths, lookup.epoch)
    await copied(cache, project, query)


async def copied(cache: ContextCache, project: str, query: str) -> None:
    """Read a cached context until the local copy holds it.

    Valkey broadcasts our own SET back, which may evict a copy made before it arrived, so
    the copy is settled only once a read after that broadcast has been made.
    """

    async def local_copy() -> tuple[Lookup | None, str | None]:
        assert (await cache.lookup(project, query)).hit
        return cache.lookup_local(project, query), cache.local_problem()

    await eventually(
        local_copy,
        f"the local copy to take {project}/{query} (seen: copy, why it is off)",
        until=lambda seen: seen[0] is not None,
    )


async def evicted(cache: ContextCache, project: str, query: str, by: str) -> None:
    """Wait until the local copy no longer holds a context: ``by`` says what evicts it."""
    await eventually(
        lambda: cache.lookup_local(project, query) is None,
        f"{by} to evict {project}/{query} from the local copy",
    )


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
        await evicted(cache, "p", "about src/a.py", by="the other process's invalidation")
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
        await eventually(
            lambda: short.lookup_local("p", "short lived") is None,
            "the expiry in Valkey to reach the local copy",
            timeout=5.0,
        )
        await fill(short, "p", "flushed", [])
        await short._client.flushall()
        await evicted(short, "p", "flushed", by="the flush of Valkey")
    finally:
        await short.close()


async def test_losing_the_stream_turns_the_copy_off_until_valkey_is_back(
    cache: ContextCache, valkey: EmbeddedValkey
) -> None:
    await fill(cache, "p", "survivor", [])
    local = cache.local
    assert local is not None
    valkey.kill()
    await eventually(lambda: not local.live, "the local copy to go off with the stream")
    assert len(local) == 0
    assert cache.lookup_local("p", "survivor") is None
    await valkey.start()
    await eventually(lambda: local.live, "the local copy to come back with Valkey", timeout=10.0)


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
