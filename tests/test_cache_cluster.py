"""The context cache on a real Valkey Cluster: three primaries with a replica each, formed
on loopback for every test (tests/valkey_deployments.py): hits on every primary,
invalidation across bridges and into the in-process copy, a killed primary reported and
recovered from through its replica's fail-over, and a resharded slot followed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.backoff import ConstantBackoff
from redis.crc import key_slot
from websockets.asyncio.client import connect

from bridge.cache.contexts import ContextCache
from bridge.config import CacheConfig, Config, MetricsConfig, ServerConfig
from bridge.errors import CacheUnavailable
from bridge.runtime.app import App
from tests.conftest import StatsdCollector, ws_url
from tests.test_limits import http_get
from tests.test_tracking import copied, evicted
from tests.valkey_deployments import ValkeyCluster
from tests.waiting import eventually
from tests.wire import ask

PROJECTS = [f"project-{i}" for i in range(24)]


async def open_cache(cluster: ValkeyCluster, **settings: Any) -> ContextCache:
    """A cache as the bridge opens it (the kind of Valkey asked, not configured)."""
    cache = await ContextCache.connect(
        cluster.url, ttl=60, outage_backoff=ConstantBackoff(0.05), **settings
    )
    await cache.start(wait=10)
    return cache


@pytest.fixture
async def cache(valkey_cluster: ValkeyCluster) -> AsyncIterator[ContextCache]:
    c = await open_cache(valkey_cluster)
    assert c.valkey.kind == "cluster"
    assert c.local_problem() is None, "the local copy does not follow every primary"
    yield c
    await c.close()


def slot_of(cache: ContextCache, project: str) -> int:
    return key_slot(cache.epoch_key(project).encode())


async def cached(cache: ContextCache, project: str, query: str, paths: list[str]) -> None:
    """Cache a context, then read it until the local copy holds it (see test_tracking)."""
    lookup = await cache.lookup(project, query)
    assert not lookup.hit
    assert await cache.put(project, query, f"ctx {query}", paths, lookup.epoch)
    await copied(cache, project, query)


async def test_a_cluster_is_recognised_and_every_primary_serves_hits(
    cache: ContextCache, valkey_cluster: ValkeyCluster
) -> None:
    owners = {(await valkey_cluster.node_of_slot(slot_of(cache, p))).port for p in PROJECTS}
    assert len(owners) == 3, "the projects do not spread over the three primaries"
    for project in PROJECTS:
        keys = [
            cache.epoch_key(project),
            cache.context_key(project, "q"),
            cache.project_key(project),
            cache.tag_key(project, "src/a.py"),
        ]
        assert len({key_slot(k.encode()) for k in keys}) == 1, "a project's keys span slots"
        await cached(cache, project, "how does login work", ["src/login.py"])
    for project in PROJECTS:
        found = await cache.lookup(project, "  How does LOGIN work ")
        assert (found.hit, found.inject) == (True, "ctx how does login work")
    assert await cache.problem() is None


async def test_invalidation_reaches_another_bridge_and_its_local_copy(
    cache: ContextCache, valkey_cluster: ValkeyCluster
) -> None:
    other = await open_cache(valkey_cluster)
    try:
        for project in PROJECTS:
            await cached(cache, project, "about a", ["src/a.py"])
            await cached(cache, project, "about b", ["src/b.py"])
            assert (await other.lookup(project, "about a")).hit, "the other bridge missed"
        for project in PROJECTS:
            assert await other.invalidate_path(project, "/repo/src/a.py") == 1
            assert other.lookup_local(project, "about a") is None  # its own copy at once
        for project in PROJECTS:
            await evicted(cache, project, "about a", by="the other bridge's invalidation")
            assert not (await cache.lookup(project, "about a")).hit
            assert cache.lookup_local(project, "about b") is not None, "a kept copy was lost"
            assert (await cache.lookup(project, "about b")).hit
    finally:
        await other.close()


async def test_a_write_to_a_context_on_any_primary_evicts_the_local_copy(
    cache: ContextCache,
) -> None:
    for project in PROJECTS:
        await cached(cache, project, "to be rewritten", [])
    writer = cache.valkey.client
    for project in PROJECTS:
        await writer.set(cache.context_key(project, "to be rewritten"), "rewritten")
    for project in PROJECTS:
        await evicted(cache, project, "to be rewritten", by="the write to the context")
        assert (await cache.lookup(project, "to be rewritten")).inject == "rewritten"


async def test_bridges_on_different_memories_share_no_contexts(
    valkey_cluster: ValkeyCluster,
) -> None:
    one = await open_cache(valkey_cluster, namespace="sqlite:/srv/one:1")
    two = await open_cache(valkey_cluster, namespace="sqlite:/srv/two:2")
    try:
        await cached(one, "shop", "same question", [])
        assert not (await two.lookup("shop", "same question")).hit
    finally:
        await one.close()
        await two.close()


async def test_a_client_that_ignores_the_cluster_reports_moved_as_degraded(
    valkey_cluster: ValkeyCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """from_url asks nothing: its plain client gets MOVED for slots of other primaries.
    Every such refusal is a cache failure, logged and reported, never silence."""
    plain = ContextCache.from_url(valkey_cluster.url, local_entries=0)
    try:
        refused = []
        for project in PROJECTS:
            try:
                await plain.lookup(project, "q")
            except CacheUnavailable as e:
                refused.append(str(e))
        assert refused and all("MOVED" in r for r in refused), refused
        assert "MOVED" in (await plain.problem() or "")
        assert "Valkey refused an operation (MOVED" in caplog.text
    finally:
        await plain.close()


async def test_a_cluster_that_answers_only_after_start_is_found(tmp_path: Path) -> None:
    """The first nodes do not answer yet: the cache keeps asking what Valkey is."""
    cluster = ValkeyCluster(primaries=3, replicas=0)
    try:
        cache = await ContextCache.connect(cluster.url, ttl=60, timeout=0.2)
        await cache.start(wait=0.1)
        try:
            assert cache.valkey.kind == "server"
            await cluster.start()
            await eventually(
                lambda: cache.valkey.kind == "cluster", "the cluster to be found", timeout=20
            )
            await eventually(
                lambda: cache.local_problem(),
                "the local copy to follow every primary",
                until=lambda problem: problem is None,
                timeout=20,
            )
            for project in PROJECTS:
                lookup = await cache.lookup(project, "q")
                assert await cache.put(project, "q", "ctx", [], lookup.epoch)
                await copied(cache, project, "q")
        finally:
            await cache.close()
    finally:
        await cluster.close()


async def test_a_resharded_slot_is_followed(
    cache: ContextCache, valkey_cluster: ValkeyCluster
) -> None:
    other = await open_cache(valkey_cluster)
    try:
        project = PROJECTS[0]
        await cached(cache, project, "about a", ["src/a.py"])
        await cached(cache, project, "about b", ["src/b.py"])
        slot = slot_of(cache, project)
        source = await valkey_cluster.node_of_slot(slot)
        target = next(n for n in await valkey_cluster.primary_nodes() if n is not source)
        changes = cache.follower.changes if cache.follower else 0  # layout changes seen
        assert await valkey_cluster.move_slot(slot, target) >= 4  # contexts, tags, set of all

        assert (await cache.lookup(project, "about a")).hit, "MOVED was not followed"
        assert (await valkey_cluster.node_of_slot(slot)) is target
        follower = cache.follower
        assert follower is not None
        await eventually(lambda: follower.changes > changes, "the layout change to be seen")
        await eventually(
            lambda: cache.local_problem(),
            "the local copy to follow every primary",
            until=lambda problem: problem is None,
        )
        await copied(cache, project, "about a")
        await copied(cache, project, "about b")
        assert await other.invalidate_path(project, "src/a.py") == 1  # on the new owner
        await evicted(cache, project, "about a", by="the invalidation on the new owner")
        assert not (await cache.lookup(project, "about a")).hit
        assert (await cache.lookup(project, "about b")).hit
    finally:
        await other.close()


@pytest.fixture
async def cluster_app(
    valkey_cluster: ValkeyCluster, tmp_path: Path, statsd: StatsdCollector
) -> AsyncIterator[App]:
    config = Config(
        data_dir=tmp_path / "data",
        server=ServerConfig(host="127.0.0.1", port=0),
        cache=CacheConfig(valkey_url=valkey_cluster.url),
        metrics=MetricsConfig(host="127.0.0.1", port=statsd.port),
    )
    async with App(config) as app:
        yield app


@pytest.mark.slow
async def test_a_killed_primary_is_reported_and_its_replica_takes_over(
    cluster_app: App, valkey_cluster: ValkeyCluster
) -> None:
    """Recovery is by fail-over: each primary has a replica, which the cluster promotes
    (the killed node stays down)."""
    app = cluster_app
    cache = app.cache
    assert cache is not None
    await eventually(
        cache.local_problem,
        "the local copy to follow every primary",
        until=lambda problem: problem is None,
    )
    assert await http_get(app, "/readyz") == (200, b"ready\n")
    text = "what broke in parser.ts"
    query = {"type": "chat:start", "id": 2, "query": text}
    async with connect(ws_url(app, "/shop")) as ws:
        remembered = {"type": "error", "id": 1, "message": "TypeError in parser.ts"}
        assert (await ask(ws, remembered))["ok"]
        assert not (await ask(ws, query))["hit"]
        assert (await ask(ws, query))["hit"]

        victim = await valkey_cluster.node_of_slot(slot_of(cache, "shop"))
        elsewhere = PROJECTS[0]
        for project in PROJECTS:  # a project served by another primary
            if await valkey_cluster.node_of_slot(slot_of(cache, project)) is not victim:
                elsewhere = project
                break
        await cached(cache, elsewhere, "on a primary that stays", [])
        victim.kill()
        local = cache.local
        assert local is not None
        await eventually(lambda: not local.live, "the local copy to go off with a primary")
        assert cache.lookup_local(elsewhere, "on a primary that stays") is None, (
            "the local copy served while it did not follow every primary"
        )
        status, body = await http_get(app, "/readyz")
        assert status == 200 and body.startswith(b"ready\n"), body
        assert b"cache: degraded (valkey: cluster primary " + victim.address.encode() in body
        assert b"local copy off: no invalidation stream from " + victim.address.encode() in body
        answered = await ask(ws, query)  # from memory while the cluster fails over
        assert answered["type"] == "context" and "TypeError in parser.ts" in answered["inject"]

        await valkey_cluster.wait_for_failover(victim, slot_of(cache, "shop"))

        async def ready_after_a_query() -> tuple[int, bytes]:
            await ask(ws, query)
            return await http_get(app, "/readyz")

        await eventually(  # the client and the follower find the new primary
            ready_after_a_query,
            "/readyz to say ready after the fail-over",
            until=lambda answer: answer == (200, b"ready\n"),
            timeout=20,
        )
        assert await http_get(app, "/readyz") == (200, b"ready\n")
        assert (await ask(ws, query))["hit"]
        assert cache.lookup_local("shop", text) is not None
        # The copy follows the new primary: a change made there reaches it.
        await cache.valkey.client.delete(cache.context_key("shop", text))
        await evicted(cache, "shop", text, by="the change on the new primary")
        assert not (await ask(ws, query))["hit"]
