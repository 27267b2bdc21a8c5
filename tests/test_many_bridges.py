"""Many bridges as deployed: ``graphiti-bridge serve`` processes sharing one Valkey Cluster
(three primaries with a replica each) and one FalkorDB graph (graphiti without an LLM),
each with a data folder of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from bridge.runtime.embedded import EmbeddedFalkorDB
from tests.conftest import StatsdCollector
from tests.test_cli import bridge_process
from tests.valkey_deployments import ValkeyCluster
from tests.waiting import eventually
from tests.wire import ask


async def until_miss(ws: ClientConnection, query: dict[str, Any]) -> dict[str, Any]:
    """Ask ``query`` until it misses (bounded); the last reply."""
    reply: dict[str, Any] = await eventually(
        lambda: ask(ws, query, binary=True),
        "the cached context to be dropped",
        until=lambda reply: not reply["hit"],
    )
    return reply


async def test_bridges_on_a_cluster_and_one_graph_share_contexts_and_invalidations(
    tmp_path: Path,
    valkey_cluster: ValkeyCluster,
    falkordb: EmbeddedFalkorDB,
    statsd: StatsdCollector,
) -> None:
    common = ["--valkey-url", valkey_cluster.url, "--memory", "graphiti",
              "--graph-url", falkordb.url, "--llm", "off"]  # fmt: skip
    env = {"DD_DOGSTATSD_PORT": str(statsd.port)}
    async with (
        bridge_process(*common, "--data-dir", str(tmp_path / "one"), env=env) as one,
        bridge_process(*common, "--data-dir", str(tmp_path / "two"), env=env) as two,
        connect(one.url + "/shop") as ws_one,
        connect(two.url + "/shop") as ws_two,
    ):
        assert "a Valkey Cluster" in one.started_line, one.started_line
        remembered = {"type": "error", "id": 0, "message": "KeyError in src/shared.py"}
        assert (await ask(ws_one, remembered, binary=True))["ok"]
        query = {"type": "chat:start", "id": 1, "query": "what about src/shared.py"}
        first = await ask(ws_one, query, binary=True)
        assert not first["hit"] and "KeyError" in first["inject"]
        assert (await ask(ws_one, query, binary=True))["hit"]
        shared = await ask(ws_two, query, binary=True)
        assert shared["hit"], "the second bridge missed the first bridge's fill of one graph"
        assert shared["inject"] == first["inject"]

        ack = await ask(
            ws_two, {"type": "file:write", "id": 2, "path": "src/shared.py"}, binary=True
        )
        assert ack["ok"]
        fresh = await until_miss(ws_one, query)  # the push reaches bridge one's local copy
        assert "KeyError" in fresh["inject"]
        await eventually(  # a fill that raced the write's delivery is refused
            lambda: ask(ws_one, query, binary=True),
            "bridge one's refill to be cached",
            until=lambda reply: reply["hit"],
        )
        assert (await ask(ws_two, query, binary=True))["hit"], "bridge one's refill is not shared"
