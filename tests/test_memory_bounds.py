"""Memory stays bounded under hostile load, measured on ``python -m bridge serve`` and its
private valkey-server: clients that export and never read, huge exports, and queries that
name thousands of paths, all at once. The limits asserted here are the ones README states
under "Resource limits"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import StatsdCollector
from tests.raw_client import StuckClient
from tests.test_cli import bridge_process, children_of
from tests.waiting import eventually, steady
from tests.wire import Message, receive, send

# README, "Resource limits": what this load may cost.
BRIDGE_RSS_LIMIT = 200 << 20
VALKEY_USED_LIMIT = 32 << 20

EPISODES = 300
BODY = "lorem ipsum " * 420  # 1.5 MB of episodes: every export is about 1.6 MB of JSON
STUCK_CLIENTS = 20
EXPORTS_EACH = 20
PATH_HEAVY_QUERIES = 40
PATHS_PER_QUERY = 5000


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def valkey_socket(bridge_pid: int) -> str:
    """The unix socket of the bridge's private valkey-server, in its working directory."""
    (child,) = children_of(bridge_pid)
    return str(Path(f"/proc/{child}/cwd").resolve() / "valkey.sock")


async def pipelined(ws: ClientConnection, messages: list[Message]) -> list[Any]:
    """Send every message, then read one reply per message."""
    for message in messages:
        await send(ws, message)
    return [await receive(ws, timeout=60) for _ in messages]


async def highest_once_calm(measure: Callable[[], int], what: str) -> int:
    """The largest of ``measure()`` once ten readings in a row, 0.1 s apart, have not
    gone above it."""
    readings = [measure()]

    def recent() -> list[int]:
        readings.append(measure())
        return readings[-11:]

    await eventually(
        recent,
        f"{what} to stop growing",
        until=lambda last: len(readings) > 10 and max(last[1:]) <= max(readings[:-10]),
        every=0.1,
        timeout=60,
    )
    return max(readings)


async def test_slow_readers_huge_exports_and_path_heavy_queries_stay_bounded(
    tmp_path: Path, statsd: StatsdCollector
) -> None:
    env = {"DD_DOGSTATSD_PORT": str(statsd.port)}
    async with bridge_process("--data-dir", str(tmp_path / "data"), env=env) as bridge:
        pid = bridge.process.pid
        port = int(bridge.url.rsplit(":", 1)[1])
        valkey = redis.Redis(unix_socket_path=valkey_socket(pid))
        stuck: list[StuckClient] = []
        try:
            async with connect(bridge.url + "/big", max_size=None) as ws:
                acks = await pipelined(
                    ws,
                    [
                        {"type": "error", "id": i, "message": f"deploy failure number{i} {BODY}"}
                        for i in range(EPISODES)
                    ],
                )
                assert all(a["ok"] for a in acks)
            for _ in range(STUCK_CLIENTS):
                client = await StuckClient.connect(port, "/big")
                stuck.append(client)
                for i in range(EXPORTS_EACH):
                    await client.send({"type": "export", "id": i, "chunk_size": 1000})
            async with connect(bridge.url + "/big") as ws:
                heavy: list[Message] = [
                    {
                        "type": "chat:start",
                        "id": q,
                        "query": f"deploy failure number{q} in "
                        + " ".join(f"d{q}/f{i}.py" for i in range(PATHS_PER_QUERY)),
                    }
                    for q in range(PATH_HEAVY_QUERIES)
                ]
                ordinary: list[Message] = [
                    {"type": "chat:start", "id": f"o{q}", "query": f"what about failure number{q}"}
                    for q in range(200)
                ]
                replies = await pipelined(ws, heavy + ordinary)
                assert all(r["type"] == "context" for r in replies)
                await eventually(  # memory queries past their budget fill later
                    lambda: pipelined(ws, [ordinary[-1]]),
                    "ordinary contexts to be cached",
                    until=lambda again: again[0]["hit"],
                    timeout=30,
                    every=0.1,
                )
                bridge_rss = await highest_once_calm(lambda: rss(pid), "the bridge's RSS")
                await steady(valkey.dbsize, "Valkey's key count")  # the heavy queries' fills
                used = int((await valkey.info("memory"))["used_memory"])
                assert not (await pipelined(ws, [heavy[0]]))[0]["hit"]
                # Everyone else is still served while all of that waits.
                assert (await pipelined(ws, [{"type": "ping", "id": "p"}]))[0] == {
                    "type": "pong",
                    "id": "p",
                    "version": 1,
                }
            assert bridge_rss <= BRIDGE_RSS_LIMIT, f"bridge RSS {bridge_rss >> 20} MiB"
            assert used <= VALKEY_USED_LIMIT, f"valkey used_memory {used >> 20} MiB"
        finally:
            for client in stuck:
                client.close()
            await valkey.aclose()
