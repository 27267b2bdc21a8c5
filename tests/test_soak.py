"""Soak: many connections under a mixed load while Valkey and the graph database behind the
graphiti backend are killed and restarted on a schedule. Bounded in time; loopback only.

Afterwards: every acknowledged episode is in memory exactly once; no context was served
that a file:write acknowledged before the request had made stale; server memory is flat.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bridge.runtime.embedded import EmbeddedFalkorDB, EmbeddedValkey
from tests.conftest import StatsdCollector
from tests.ports import free_port
from tests.test_cli import bridge_process
from tests.waiting import eventually
from tests.wire import exported, receive, send

pytestmark = pytest.mark.slow

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]  # fmt: skip
RECALL_LIMIT = 6
LOAD_SECONDS = 24.0
CONNECTIONS = 8


@dataclass
class Ledger:
    """What the clients saw: acknowledged episodes and every context served."""

    acked: list[str] = field(default_factory=list)
    # path -> times at which a write of it was acknowledged as stored in memory
    stored_writes: dict[str, list[float]] = field(default_factory=dict)
    contexts: list[tuple[str, float, str | None, bool]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


def path_of(word: str) -> str:
    """A path whose words no other path shares, so recall ranking cannot hide its writes
    behind other files' (the property under test is freshness, not ranking)."""
    return f"{word}/{word}"


async def client(url: str, ledger: Ledger, seed: int, stop_at: float) -> None:
    """One connection's closed-loop mixed load; reconnects if the connection drops."""
    rng = random.Random(seed)
    n = 0
    while time.monotonic() < stop_at:
        try:
            async with connect(url) as ws:
                while time.monotonic() < stop_at:
                    n += 1
                    await one_request(ws, ledger, rng, f"{seed}-{n}")
        except (ConnectionClosed, OSError):
            await asyncio.sleep(0.1)


async def one_request(ws: ClientConnection, ledger: Ledger, rng: random.Random, rid: str) -> None:
    word = rng.choice(WORDS)
    roll = rng.random()
    if roll < 0.7:
        message: dict[str, Any] = {"type": "chat:start", "query": f"news about {path_of(word)}"}
    elif roll < 0.9:
        message = {"type": "file:write", "path": path_of(word), "episode_id": rid}
    else:
        message = {"type": "error", "message": f"soak failure {rid}", "episode_id": rid}
    message["id"] = rid
    sent = time.monotonic()
    await send(ws, message, binary=True)
    reply = await receive(ws, timeout=30)
    assert reply["id"] == rid
    if reply["type"] == "context":
        ledger.contexts.append((word, sent, reply["inject"], reply["hit"]))
    elif reply["ok"]:
        ledger.acked.append(reply["episode"])
        if message["type"] == "file:write" and not reply.get("queued"):
            ledger.stored_writes.setdefault(word, []).append(time.monotonic())
    else:
        code = reply["error"]["code"]
        ledger.errors[code] = ledger.errors.get(code, 0) + 1


async def chaos(valkey: EmbeddedValkey, graph: EmbeddedFalkorDB, start: float) -> list[str]:
    """Kill and restart Valkey and the graph database on a fixed schedule."""
    schedule = [(4, "kill valkey"), (7, "start valkey"), (10, "kill graph"),
                (14, "start graph"), (17, "kill valkey"), (19, "start valkey")]  # fmt: skip
    done = []
    for at, action in schedule:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        verb, target = action.split()
        server = valkey if target == "valkey" else graph
        if verb == "kill":
            server.kill()
        else:
            await server.start()
        done.append(action)
    return done


def rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


async def export_uuids(url: str) -> list[str]:
    async with connect(url) as ws:
        return [e["uuid"] for e in await exported(ws, binary=True)]


async def test_soak_with_valkey_and_graph_restarts(tmp_path: Path, statsd: StatsdCollector) -> None:
    valkey = EmbeddedValkey(port=free_port())
    graph = EmbeddedFalkorDB(data_dir=tmp_path / "falkordb", port=free_port())
    await valkey.start()
    await graph.start()
    env = {"DD_DOGSTATSD_PORT": str(statsd.port), "BRIDGE_GRAPH_URL": graph.url}
    args = ["--data-dir", str(tmp_path / "data"), "--valkey-url", valkey.url,
            "--memory", "graphiti", "--llm", "off", "--store-timeout-ms", "300",
            "--recall-limit", str(RECALL_LIMIT), "--project", "soak"]  # fmt: skip
    ledger = Ledger()
    try:
        async with bridge_process(*args, env=env) as bridge:
            start = time.monotonic()
            stop_at = start + LOAD_SECONDS
            clients = [client(bridge.url, ledger, seed, stop_at) for seed in range(CONNECTIONS)]
            warm: list[int] = []

            async def sample_rss() -> None:
                await asyncio.sleep(3)
                warm.append(rss_kb(bridge.process.pid))

            schedule = asyncio.create_task(chaos(valkey, graph, start))
            await asyncio.gather(sample_rss(), schedule, *clients)
            assert len(schedule.result()) == 6
            uuids = await eventually(  # the outbox drains once the graph is back
                lambda: export_uuids(bridge.url),
                "every acknowledged episode to be in the graph (seen: the uuids exported)",
                until=lambda uuids: len(uuids) >= len(ledger.acked),
                timeout=60,
                every=0.2,
            )
            end_rss = rss_kb(bridge.process.pid)
            server_log = bridge.log
    finally:
        await valkey.close()
        await graph.close()

    log = "\n".join(server_log)
    assert "Traceback" not in log, log[log.find("Traceback") - 300 :][:4000]
    assert len(ledger.acked) > 100, f"too little load got through: {ledger.errors}"
    assert set(ledger.errors) <= {"memory_unavailable"}, ledger.errors
    assert len(uuids) == len(set(uuids)), "an episode was stored twice"
    assert sorted(uuids) == sorted(ledger.acked), "an acknowledged episode is missing"

    served = [c for c in ledger.contexts if c[2] is not None]
    assert len(served) > 50 and any(hit for *_, hit in served)
    for word, sent, inject, hit in served:
        written_before = sum(1 for t in ledger.stored_writes.get(word, []) if t < sent)
        assert not written_before or path_of(word) in (inject or ""), (
            f"stale context for {word} (hit={hit}): {path_of(word)} not named, "
            f"{written_before} writes acknowledged before the request:\n{inject}"
        )
    assert end_rss < warm[0] * 1.5 + 20_000, f"RSS grew from {warm[0]} kB to {end_rss} kB"
