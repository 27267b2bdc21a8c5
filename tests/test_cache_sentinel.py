"""The context cache behind Sentinel: ``redis+sentinel://`` URLs, and a real primary,
replica and Sentinel (valkey-server --sentinel) on loopback, failed over on purpose."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.backoff import ConstantBackoff

from bridge.cache.contexts import ContextCache
from bridge.cache.following import Topology
from bridge.cache.valkey import SentinelUrl, ValkeyUrlError, parse_sentinel_url
from bridge.config import CacheConfig, Config, MetricsConfig, ServerConfig, StartupError
from bridge.runtime.app import App
from tests.conftest import StatsdCollector
from tests.test_cache_cluster import cached
from tests.test_limits import http_get
from tests.test_tracking import copied, evicted
from tests.valkey_deployments import ValkeySentinel
from tests.waiting import eventually


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database() -> None:
    assert parse_sentinel_url(
        "redis+sentinel://app:s3cret@10.0.0.1:26379,[::1]:26380,sentinel-c/cache/2"
        "?sentinel_password=other"
    ) == SentinelUrl(
        sentinels=(("10.0.0.1", 26379), ("::1", 26380), ("sentinel-c", 26379)),
        service="cache",
        db=2,
        username="app",
        password="s3cret",
        sentinel_password="other",
    )
    plain = parse_sentinel_url("rediss+sentinel://:pw@h:1/mymaster")
    assert (plain.password, plain.username, plain.db, plain.tls) == ("pw", None, 0, True)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h:26379", "path is /service_name"),
        ("redis+sentinel://h:26379/a/b/c", "path is /service_name"),
        ("redis+sentinel:///mymaster", "names no Sentinel"),
        ("redis+sentinel://h:port/mymaster", "bad Sentinel address 'h:port'"),
        ("redis+sentinel://h:70000/mymaster", "bad Sentinel address"),
        ("redis+sentinel://h/mymaster/zero", "database in a Sentinel URL is a number"),
        ("redis+sentinel://h/mymaster?timeout=1", "unknown Sentinel URL option 'timeout'"),
    ],
)
def test_a_bad_sentinel_url_is_refused_naming_the_part(url: str, says: str) -> None:
    with pytest.raises(ValkeyUrlError, match=says.replace("(", r"\(")):
        parse_sentinel_url(url)


async def test_a_bridge_with_a_bad_valkey_url_does_not_start(
    tmp_path: Path, statsd: StatsdCollector
) -> None:
    config = Config(
        data_dir=tmp_path,
        server=ServerConfig(port=0),
        cache=CacheConfig(valkey_url="redis+sentinel://h:26379"),
        metrics=MetricsConfig(port=statsd.port),
    )
    app = App(config)
    try:
        with pytest.raises(StartupError, match=r"--valkey-url: .*path is /service_name"):
            await app.start()
    finally:
        await app.stop()


@pytest.fixture
async def cache(valkey_sentinel: ValkeySentinel) -> AsyncIterator[ContextCache]:
    c = await ContextCache.connect(
        valkey_sentinel.url, ttl=60, outage_backoff=ConstantBackoff(0.05)
    )
    await c.start(wait=10)
    assert c.valkey.kind == "sentinel"
    assert c.local_problem() is None
    yield c
    await c.close()


async def test_hits_and_invalidations_through_sentinel(
    cache: ContextCache, valkey_sentinel: ValkeySentinel
) -> None:
    other = await ContextCache.connect(valkey_sentinel.url, ttl=60, local_entries=0)
    try:
        await cached(cache, "p", "about a", ["src/a.py"])
        await cached(cache, "p", "about b", ["src/b.py"])
        assert (await other.lookup("p", "about a")).hit
        assert await other.invalidate_path("p", "src/a.py") == 1
        await evicted(cache, "p", "about a", by="the other bridge's invalidation")
        assert not (await cache.lookup("p", "about a")).hit
        assert cache.lookup_local("p", "about b") is not None
    finally:
        await other.close()


async def test_after_a_fail_over_the_cache_and_its_local_copy_follow_the_new_primary(
    cache: ContextCache, valkey_sentinel: ValkeySentinel
) -> None:
    other = await ContextCache.connect(valkey_sentinel.url, ttl=60, local_entries=0)
    try:
        await cached(cache, "p", "before", ["src/a.py"])
        old = await valkey_sentinel.current_primary()
        new = await valkey_sentinel.fail_over()
        assert new != old
        follower = cache.follower
        assert follower is not None
        follows_new = Topology(frozenset({f"127.0.0.1:{new}"}))
        await eventually(
            lambda: follower.topology == follows_new, "the new primary to be followed", timeout=10
        )
        await eventually(
            cache.local_problem,
            "the local copy to follow the new primary",
            until=lambda problem: problem is None,
            timeout=10,
        )
        await copied(cache, "p", "before")
        dropped = await other.invalidate_path("p", "src/a.py")  # on the new primary
        assert dropped == 1
        await evicted(cache, "p", "before", by="the invalidation on the new primary")
        assert not (await cache.lookup("p", "before")).hit
        assert await cache.problem() is None
    finally:
        await other.close()


async def test_a_bridge_on_sentinel_is_ready(
    valkey_sentinel: ValkeySentinel, tmp_path: Path, statsd: StatsdCollector
) -> None:
    config = Config(
        data_dir=tmp_path,
        server=ServerConfig(port=0),
        cache=CacheConfig(valkey_url=valkey_sentinel.url),
        metrics=MetricsConfig(port=statsd.port),
    )
    app = App(config)
    await app.start()
    try:
        assert app.cache is not None and app.cache.valkey.kind == "sentinel"
        await eventually(
            app.cache.local_problem,
            "the local copy to follow the primary",
            until=lambda problem: problem is None,
        )
        assert await http_get(app, "/readyz") == (200, b"ready\n")
    finally:
        await app.stop()
