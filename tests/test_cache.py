"""The context cache against a real valkey-server."""

from __future__ import annotations

import asyncio
import os
import signal
import tracemalloc
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from redis.backoff import ConstantBackoff

from bridge.cache.contexts import (
    DIGEST_MEMO_BYTES,
    MAX_TAGS,
    ContextCache,
    DigestMemo,
    normalise_query,
)
from bridge.errors import CacheUnavailable
from bridge.runtime.app import App
from bridge.runtime.embedded import EmbeddedValkey
from tests.clock import ManualClock
from tests.waiting import eventually


@pytest.fixture
def clock() -> ManualClock:
    """The cache's clock: its outage backoff passes only when a test moves it on."""
    return ManualClock()


@pytest.fixture
async def cache(valkey: EmbeddedValkey, clock: ManualClock) -> AsyncIterator[ContextCache]:
    c = ContextCache.from_url(valkey.url, ttl=60, outage_backoff=ConstantBackoff(0.05), clock=clock)
    yield c
    await c.close()


async def cached(cache: ContextCache, project: str, query: str, paths: list[str]) -> None:
    lookup = await cache.lookup(project, query)
    assert not lookup.hit
    assert await cache.put(project, query, f"[Memory Context]\n- {query}", paths, lookup.epoch)


async def blocked_clients(valkey: EmbeddedValkey) -> int:
    """How many clients of ``valkey`` wait in a blocking command (from CLIENT LIST)."""
    admin = redis.Redis.from_url(valkey.url)
    try:
        return sum(1 for client in await admin.client_list() if client["cmd"] == "blpop")
    finally:
        await admin.aclose()


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
    valkey: EmbeddedValkey, cache: ContextCache, clock: ManualClock
) -> None:
    await cached(cache, "p", "before", [])
    valkey.kill()
    with pytest.raises(CacheUnavailable):
        await cache.lookup("p", "before")
    down_since = cache.outage.down_since
    assert down_since is not None
    with pytest.raises(CacheUnavailable, match="backoff"):
        await cache.lookup("p", "before")  # refused without touching the network
    await valkey.start()
    clock.advance(0.05)  # the backoff has passed: the next lookup tries Valkey again
    lookup = await cache.lookup("p", "after")
    assert cache.outage.down_since is None
    assert not lookup.hit
    assert await cache.put("p", "after", "ctx", [], lookup.epoch)
    assert (await cache.lookup("p", "after")).hit


async def test_invalidations_missed_during_an_outage_are_replayed(
    valkey: EmbeddedValkey, cache: ContextCache, clock: ManualClock
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
    clock.advance(0.1)  # past the 50 ms backoff
    assert not (await cache.lookup("p", "tagged")).hit
    assert (await cache.lookup("p", "untagged")).hit


def test_normalise_query() -> None:
    assert normalise_query("  Fix\tTHE  bug\n") == "fix the bug"
    assert normalise_query("ﬁle") == normalise_query("file")  # NFKC ligature


async def test_a_context_naming_too_many_paths_is_not_cached(cache: ContextCache) -> None:
    keys_before = await cache._client.dbsize()
    paths = [f"src/module_{i}.py" for i in range(5000)]
    lookup = await cache.lookup("p", "path heavy")
    assert not await cache.put("p", "path heavy", "ctx", paths, lookup.epoch)
    assert await cache._client.dbsize() == keys_before, "tag sets were written anyway"
    assert not (await cache.lookup("p", "path heavy")).hit
    await cached(cache, "p", "just enough", paths[:MAX_TAGS])


async def test_a_full_valkey_refuses_new_contexts_but_still_invalidates(
    valkey: EmbeddedValkey, cache: ContextCache
) -> None:
    await cached(cache, "p", "about a", ["src/a.py"])
    await cached(cache, "p", "about b", ["src/b.py"])
    admin = redis.Redis.from_url(valkey.url)
    await admin.config_set("maxmemory", "1")  # full from now on
    try:
        assert (await cache.lookup("p", "about a")).hit, "reads go on"
        lookup = await cache.lookup("p", "new question")
        with pytest.raises(CacheUnavailable, match="full"):
            await cache.put("p", "new question", "ctx", ["src/c.py"], lookup.epoch)
        assert cache.outage.down_since is None, "a full Valkey is not an outage"
        assert await admin.exists(cache.tag_key("p", "src/c.py")) == 0, "half a store"
        assert await cache.invalidate_path("p", "src/a.py") == 1
        assert not (await cache.lookup("p", "about a")).hit, "a stale context was served"
        assert (await cache.lookup("p", "about b")).hit
    finally:
        await admin.config_set("maxmemory", "0")
        await admin.aclose()


async def test_more_lookups_at_once_than_pooled_connections_all_succeed(app: App) -> None:
    """The bridge's pool follows --max-inflight (256): 300 concurrent misses wait for a
    connection instead of reporting Valkey unreachable."""
    assert app.cache is not None
    app.cache.timeout = 10.0  # a loaded machine may take a while to open 256 connections
    results = await asyncio.gather(
        *(app.cache.lookup("p", f"concurrent {i}") for i in range(300)), return_exceptions=True
    )
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert app.cache.outage.down_since is None


async def test_an_exhausted_pool_is_reported_as_busy_not_unreachable(
    valkey: EmbeddedValkey,
) -> None:
    small = ContextCache.from_url(valkey.url, pool_size=3, timeout=0.3, local_entries=0)
    try:
        # Three commands that hold their connections for a second, outside the cache's own
        # operations: the pool is empty when the lookup asks.
        blocked = [asyncio.ensure_future(small._client.blpop([f"nothing{i}"], 1)) for i in range(3)]
        await eventually(
            lambda: blocked_clients(valkey),
            "three clients blocked in BLPOP",
            until=lambda n: n == 3,
        )
        with pytest.raises(CacheUnavailable, match="busy"):
            await small.lookup("p", "q")
        assert small.outage.down_since is None
        assert await small.problem() is not None
        await asyncio.gather(*blocked)
        assert not (await small.lookup("p", "q")).hit
        # Valkey answers again; the recent failure is still reported (FAILING_FOR seconds).
        assert "busy" in (await small.problem() or ""), "a recent failure went unreported"
    finally:
        await small.close()


def test_query_digests_stay_within_their_byte_budget() -> None:
    memo = DigestMemo(max_bytes=1 << 20)
    long_queries = [f"{i} " + "é" * 60_000 for i in range(200)]
    digests = {memo.digest("p", q) for q in long_queries}
    assert len(digests) == 200
    assert memo.bytes <= 1 << 20
    assert memo.digest("p", long_queries[-1]) == memo.digest("p", long_queries[-1] + " ")


def test_the_shared_digest_memo_keeps_long_queries_bounded(cache: ContextCache) -> None:
    """What the bridge's key function retains for 200 long queries, measured."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200):
            cache.context_key("p", f"{i} " + "x" * 60_000)
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retained <= DIGEST_MEMO_BYTES + (1 << 20), retained
