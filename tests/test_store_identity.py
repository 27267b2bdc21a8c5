"""Which memory a cache belongs to (bridge.cache.store_identity), the warning for a private
Valkey in front of a shared graph, the cluster topology read from CLUSTER NODES, and what
/readyz answers."""

from __future__ import annotations

import logging
import socket
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest

from bridge.cache.contexts import ContextCache
from bridge.cache.following import Topology
from bridge.cache.store_identity import graph_identity, memory_identity, store_id
from bridge.cache.valkey import cluster_topology
from bridge.config import CacheConfig, Config, MemoryConfig
from bridge.metrics import Metrics
from bridge.runtime.app import open_cache
from bridge.runtime.embedded import EmbeddedValkey
from bridge.wire.health import ReadinessReport


def graph_at(url: str) -> MemoryConfig:
    """The graphiti backend on the shared graph at ``url``."""
    return MemoryConfig(backend="graphiti", graph_url=url)


def test_each_data_folder_is_a_store_of_its_own_and_keeps_its_id(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    first = memory_identity(Config(data_dir=one))
    assert first == memory_identity(Config(data_dir=one)), "the id changed between starts"
    assert first != memory_identity(Config(data_dir=two))
    assert first.startswith(f"sqlite:{one.resolve()}:")
    assert store_id(one) == (one / "store-id").read_text().strip()
    private_graph = memory_identity(Config(data_dir=one, memory=MemoryConfig(backend="graphiti")))
    assert private_graph != first and private_graph.startswith("graphiti:")


def test_a_shared_graph_is_named_without_its_credentials() -> None:
    assert graph_identity("falkor://:pw1@graph.internal:6380") == graph_identity(
        "falkordb://:other@GRAPH.internal:6380"
    )
    assert graph_identity("falkor://graph.internal") == "falkor://graph.internal:6379/"
    assert graph_identity("bolt://neo4j:pw@db:7687/memory") == "neo4j://db:7687/memory"
    assert graph_identity("neo4j+s://db") == "neo4j://db:7687/neo4j"
    assert graph_identity("falkor://db:1") != graph_identity("falkor://db:2")
    host = socket.gethostname()
    assert graph_identity("falkor://127.0.0.1:6379") == f"falkor://127.0.0.1@{host}:6379/"
    two_bridges = [
        Config(data_dir=Path(f"/nowhere/{i}"), memory=graph_at("falkor://g:1")) for i in range(2)
    ]
    assert memory_identity(two_bridges[0]) == memory_identity(two_bridges[1])


async def test_caches_of_different_memories_on_one_valkey_share_nothing(
    valkey: EmbeddedValkey,
) -> None:
    one = ContextCache.from_url(valkey.url, namespace="sqlite:/a:1", local_entries=0)
    same = ContextCache.from_url(valkey.url, namespace="sqlite:/a:1", local_entries=0)
    other = ContextCache.from_url(valkey.url, namespace="sqlite:/b:2", local_entries=0)
    try:
        lookup = await one.lookup("p", "q")
        assert await one.put("p", "q", "ctx", ["src/a.py"], lookup.epoch)
        assert (await same.lookup("p", "q")).hit
        assert not (await other.lookup("p", "q")).hit
        assert await other.invalidate_path("p", "src/a.py") == 0
        assert (await same.lookup("p", "q")).hit, "another memory's write dropped a context"
    finally:
        for cache in (one, same, other):
            await cache.close()


async def test_a_private_valkey_in_front_of_a_shared_graph_is_warned_about(
    tmp_path: Path, valkey: EmbeddedValkey, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics("127.0.0.1", 9)
    shared = Config(data_dir=tmp_path, memory=graph_at("falkor://g:6379"))
    with caplog.at_level(logging.WARNING, logger="bridge.runtime.app"):
        cache = await open_cache(shared, valkey.url, metrics)  # as if it were private
        await cache.close()
    assert "cannot see the other bridges' writes" in caplog.text
    caplog.clear()
    named = Config(
        data_dir=tmp_path,
        memory=graph_at("falkor://g:6379"),
        cache=CacheConfig(valkey_url=valkey.url),
    )
    with caplog.at_level(logging.WARNING, logger="bridge.runtime.app"):
        cache = await open_cache(named, valkey.url, metrics)
        await cache.close()
    assert "cannot see" not in caplog.text


def test_the_cluster_topology_leaves_out_failed_primaries_and_names_slots() -> None:
    view: dict[str, dict[str, Any]] = {
        "10.0.0.1:7000": {"flags": "myself,master", "slots": [["0", "5460"]], "migrations": []},
        "10.0.0.2:7001": {"flags": "master", "slots": [["5461", "16383"]], "migrations": []},
        "10.0.0.3:7002": {"flags": "master,fail", "slots": [], "migrations": []},
        "10.0.0.4:7003": {"flags": "slave", "slots": [], "migrations": []},
        "10.0.0.5:7004": {"flags": "master", "slots": [], "migrations": []},
        "10.0.0.6:7005": {"flags": "master,handshake", "slots": [], "migrations": []},
    }
    topology = cluster_topology(view)
    assert topology.primaries == {"10.0.0.1:7000", "10.0.0.2:7001", "10.0.0.5:7004"}
    moved = dict(view)
    moved["10.0.0.1:7000"] = {**view["10.0.0.1:7000"], "slots": [["0", "5459"]]}
    moved["10.0.0.2:7001"] = {**view["10.0.0.2:7001"], "slots": [["5460", "16383"]]}
    assert cluster_topology(moved).primaries == topology.primaries
    assert cluster_topology(moved) != topology, "a moved slot is a change of layout"
    assert cluster_topology(view) == topology
    assert Topology(frozenset({"a:1"})) == Topology(frozenset({"a:1"}))


def test_readyz_is_503_for_problems_and_200_with_what_is_degraded() -> None:
    assert ReadinessReport().status == HTTPStatus.OK
    assert ReadinessReport().body() == "ready\n"
    degraded = ReadinessReport(degraded=["cache: degraded (valkey: unreachable)"])
    assert degraded.status == HTTPStatus.OK
    assert degraded.body() == "ready\ncache: degraded (valkey: unreachable)\n"
    down = ReadinessReport(problems=["data dir: full"], degraded=["cache: degraded (x)"])
    assert (down.status, down.body()) == (HTTPStatus.SERVICE_UNAVAILABLE, "data dir: full")
