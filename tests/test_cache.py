"""The context cache against a real valkey-server."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest
from redis.backoff import ConstantBackoff

from bridge.cache import ContextCache, normalise_query
from bridge.embedded import EmbeddedValkey
from bridge.errors import CacheUnavailable


@pytest.fixture
async def cache(valkey: EmbeddedValkey) -> AsyncIterator[ContextCache]:
    c = ContextCache.from_url(valkey.url, ttl=60, outage_backoff=ConstantBackoff(0.05))
    yield c
    await c.close()


async def cached(cache: ContextCache, project: str, query: str, paths: list[str]) -> None:
    lookup = await cache.lookup(project, query)
    assert not lookup.hit
    assert await cache.put(project, query, f"[Memory Context]\n- {query}", paths, lookup.epoch)


async def test_miss_then_hit(cache: ContextCache) -> None:
    first = await cache.lookup("p", "how does login work")
    assert (first.hit, first.inject) == (False, None)
    assert await cache.put("p", "how does login work", "ctx", ["src/login.py"], first.epoch)
    second = await cache.lookup("p", "  How does   LOGIN work ")
    assert (second.hit, second.inject) == (True, "ctx")


async def test_negative_result_is_cached_as_a_hit_with_nothing_to_inject(
    cache: ContextCache,
) -> None:
    lookup = await cache.lookup("p", "nothing known")
    assert await cache.put("p", "nothing known", None, [], lookup.epoch)
    again = await cache.lookup("p", "nothing known")
    assert (again.hit, again.inject) == (True, None)


async def test_queries_sharing_a_long_prefix_do_not_collide(cache: ContextCache) -> None:
    prefix = "explain the authentication flow in "  # far more than 24 characters
    await cached(cache, "p", prefix + "the web app", [])
    other = await cache.lookup("p", prefix + "the mobile app")
    assert not other.hit
    assert cache.context_key("p", prefix + "a") != cache.context_key("p", prefix + "b")


async def test_projects_do_not_share_contexts(cache: ContextCache) -> None:
    await cached(cache, "alpha", "same question", [])
    assert not (await cache.lookup("beta", "same question")).hit


async def test_invalidate_drops_only_contexts_tagged_with_the_path(cache: ContextCache) -> None:
    await cached(cache, "p", "q about a", ["src/a.py"])
    await cached(cache, "p", "q about a and b", ["src/a.py", "src/b.py"])
    await cached(cache, "p", "q about b", ["src/b.py"])
    await cached(cache, "p", "q about nothing", [])
    await cached(cache, "p", "q about lib a", ["lib/a.py"])
    await cached(cache, "other", "q about a", ["src/a.py"])

    assert await cache.invalidate_path("p", "src/a.py") == 2

    assert not (await cache.lookup("p", "q about a")).hit
    assert not (await cache.lookup("p", "q about a and b")).hit
    assert (await cache.lookup("p", "q about b")).hit
    assert (await cache.lookup("p", "q about nothing")).hit
    assert (await cache.lookup("p", "q about lib a")).hit
    assert (await cache.lookup("other", "q about a")).hit


async def test_a_base_name_or_relative_tag_is_dropped_by_an_absolute_write(
    cache: ContextCache,
) -> None:
    await cached(cache, "p", "bare name", ["a.py"])
    await cached(cache, "p", "relative", ["src/a.py"])
    await cached(cache, "p", "elsewhere", ["lib/a.py"])
    assert await cache.invalidate_path("p", "/home/me/repo/src/a.py") == 2
    assert (await cache.lookup("p", "elsewhere")).hit


async def test_a_fill_that_raced_an_invalidation_is_not_cached(cache: ContextCache) -> None:
    lookup = await cache.lookup("p", "racy")
    await cache.invalidate_path("p", "src/a.py")
    assert not await cache.put("p", "racy", "stale", ["src/a.py"], lookup.epoch)
    assert not (await cache.lookup("p", "racy")).hit


async def test_two_caches_on_one_valkey_see_each_others_invalidations(
    valkey: EmbeddedValkey, cache: ContextCache
) -> None:
    other = ContextCache.from_url(valkey.url, ttl=60)
    try:
        await cached(cache, "p", "shared", ["src/a.py"])
        assert (await other.lookup("p", "shared")).hit
        await other.invalidate_path("p", "src/a.py")
        assert not (await cache.lookup("p", "shared")).hit
    finally:
        await other.close()


async def test_ttl_is_set_on_contexts_and_tags(valkey: EmbeddedValkey) -> None:
    short = ContextCache.from_url(valkey.url, ttl=7, prefix="ttl:")
    try:
        await cached(short, "p", "q", ["src/a.py"])
        client = short._client
        assert 0 < await client.ttl(short.context_key("p", "q")) <= 7
        assert 0 < await client.ttl(short.tag_key("p", "src/a.py")) <= 7
    finally:
        await short.close()


async def test_outage_fails_fast_and_recovers_by_itself(
    valkey: EmbeddedValkey, cache: ContextCache
) -> None:
    await cached(cache, "p", "before", [])
    valkey.kill()
    with pytest.raises(CacheUnavailable):
        await cache.lookup("p", "before")
    assert cache.outage.down_since is not None
    with pytest.raises(CacheUnavailable, match="backoff"):
        await cache.lookup("p", "before")  # refused without touching the network
    await valkey.start()
    for _ in range(100):  # bounded: the backoff is 50 ms
        try:
            lookup = await cache.lookup("p", "after")
            break
        except CacheUnavailable:
            await asyncio.sleep(0.02)
    else:
        pytest.fail("cache did not come back after Valkey restarted")
    assert cache.outage.down_since is None
    assert not lookup.hit
    assert await cache.put("p", "after", "ctx", [], lookup.epoch)
    assert (await cache.lookup("p", "after")).hit


async def test_invalidations_missed_during_an_outage_are_replayed(
    valkey: EmbeddedValkey, cache: ContextCache
) -> None:
    """Valkey is frozen (SIGSTOP), not restarted, so its data survives the outage."""
    await cached(cache, "p", "tagged", ["src/a.py"])
    await cached(cache, "p", "untagged", [])
    assert valkey.pid is not None
    os.kill(valkey.pid, signal.SIGSTOP)
    try:
        with pytest.raises(CacheUnavailable):
            await cache.invalidate_path("p", "src/a.py")
    finally:
        os.kill(valkey.pid, signal.SIGCONT)
    await asyncio.sleep(0.1)  # past the 50 ms backoff
    assert not (await cache.lookup("p", "tagged")).hit
    assert (await cache.lookup("p", "untagged")).hit


def test_normalise_query() -> None:
    assert normalise_query("  Fix\tTHE  bug\n") == "fix the bug"
    assert normalise_query("ﬁle") == normalise_query("file")  # NFKC ligature
