"""The script backend running a real memory_manager.py, written here, as a real process.

The script keeps episodes as JSON lines in a file next to itself and follows the argument
contract of bridge/memory/script.py. Nothing is faked: every call starts the script.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.cache.contexts import ContextCache
from bridge.episode import Episode, new_episode
from bridge.errors import BadRequest, MemoryUnavailable
from bridge.memory.script import ScriptMemory
from bridge.metrics import Metrics
from bridge.runtime.embedded import EmbeddedValkey
from bridge.wire.handlers import Handlers, Session
from bridge.wire.protocol import Ack, ChatStart, Completion, Context, ErrorEvent, FileWrite, Message
from tests.conftest import StatsdCollector

MEMORY_MANAGER = textwrap.dedent(
    '''
    """A small memory_manager.py: episodes as JSON lines in memory.jsonl beside it."""
    import argparse, json, os, re, sys, time
    from pathlib import Path

    HERE = Path(__file__).parent
    FILE = HERE / "memory.jsonl"
    (HERE / "calls").mkdir(exist_ok=True)
    (HERE / "calls" / f"{os.getpid()}.start").write_text(str(time.monotonic()))

    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    store = commands.add_parser("store")
    store.add_argument("content")
    store.add_argument("metadata")
    for option in ("--group", "--uuid", "--name", "--source-description"):
        store.add_argument(option, default="")
    store.add_argument("--reference-time", type=float, default=0.0)
    query = commands.add_parser("query")
    query.add_argument("text")
    query.add_argument("--group", default="")
    query.add_argument("--limit", type=int, default=10)
    export = commands.add_parser("export")
    export.add_argument("--group", default="")
    args = parser.parse_args()

    def episodes():
        if not FILE.exists():
            return []
        return [json.loads(line) for line in FILE.read_text().splitlines() if line]

    def words(text):
        return {w for w in re.findall(r"\\w+", text.lower()) if len(w) > 2}

    if args.command == "store":
        if args.content == "fail":
            print("disk on fire", file=sys.stderr)
            sys.exit(3)
        if not any(e["uuid"] == args.uuid for e in episodes()):
            episode = {
                "uuid": args.uuid, "group_id": args.group, "name": args.name,
                "body": args.content, "source_description": args.source_description,
                "reference_time": args.reference_time, "metadata": json.loads(args.metadata),
            }
            with FILE.open("a") as f:
                f.write(json.dumps(episode) + "\\n")
                f.flush()
                os.fsync(f.fileno())
    elif args.command == "query":
        if args.text == "hang":
            (HERE / "hung.pid").write_text(str(os.getpid()))
            time.sleep(60)
        if args.text.startswith("slow"):
            time.sleep(0.3)
        found = [e for e in episodes() if e["group_id"] == args.group
                 and words(e["body"]) & words(args.text)]
        found.sort(key=lambda e: -e["reference_time"])
        facts = ["the script was asked"] if found else []
        print(json.dumps({"episodes": found[:args.limit], "facts": facts}))
    else:
        for e in sorted(episodes(), key=lambda e: e["reference_time"]):
            if e["group_id"] == args.group:
                print(json.dumps(e))
    (HERE / "calls" / f"{os.getpid()}.end").write_text(str(time.monotonic()))
    '''
)

PLAIN_TEXT_MANAGER = textwrap.dedent(
    """
    import sys
    if sys.argv[1] == "query":
        print("Relevant: the build broke after bumping webpack")
    """
)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "graphiti" / "memory_manager.py"
    path.parent.mkdir()
    path.write_text(MEMORY_MANAGER)
    return path


@pytest.fixture
async def memory(script: Path) -> AsyncIterator[ScriptMemory]:
    store = ScriptMemory(script, timeout=10.0, concurrency=4)
    await store.start()
    yield store
    await store.close()


def episode(body: str, group: str = "proj", **metadata: object) -> Episode:
    return new_episode(group, "note", body, "test", dict(metadata))


async def test_events_through_the_handlers_reach_the_script_and_the_context(
    memory: ScriptMemory, valkey: EmbeddedValkey, statsd: StatsdCollector
) -> None:
    cache = ContextCache.from_url(valkey.url, ttl=60)
    metrics = Metrics("127.0.0.1", statsd.port, buffered=False)
    handlers = Handlers(memory, cache, metrics, miss_budget=10.0)

    async def run(message: Message) -> object:
        async def emit(reply: object) -> None:
            raise AssertionError(reply)

        return await handlers.begin(message, Session("proj"), emit)

    try:
        for message in (
            FileWrite(id=1, path="src/parser.ts"),
            ErrorEvent(id=2, message="parser crashed on empty input"),
            Completion(id=3, task="rewrite the parser", tokens=10),
        ):
            reply = await run(message)
            assert isinstance(reply, Ack) and reply.ok, reply
        context = await run(ChatStart(id=4, query="what happened to the parser?"))
    finally:
        await cache.close()
        await metrics.close()
    assert isinstance(context, Context) and context.inject is not None
    lines = context.inject.splitlines()
    assert lines[0].startswith("[Memory Context] ")
    assert lines[1] == "Files likely involved: [1] src/parser.ts"
    assert lines[3] == "- Fact: the script was asked"
    assert "src/parser.ts" in context.inject
    assert "Error: parser crashed on empty input" in context.inject
    assert "→ Completed: rewrite the parser" in context.inject


async def test_shell_syntax_in_values_arrives_as_plain_data(
    memory: ScriptMemory, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    hostile = {
        "subshell": f"$(touch {marker})",
        "backticks": f"`touch {marker}`",
        "chain": f"; touch {marker}; rm -rf {tmp_path}",
        "pipe": f"| touch {marker} &",
        "quotes": '\'"\\\' "$HOME" ${PATH}',
        "newline": f"a\ntouch {marker}\n",
        "option": "--group=other",
    }
    stored = episode(f"Error: $(touch {marker}) `id`; rm -rf / --uuid=x", **hostile)
    await memory.store(stored)
    exported = [e async for batch in memory.export("proj", 10) for e in batch]
    assert exported == [stored]
    assert not marker.exists()
    recall = await memory.recall("proj", f"touch {marker}", 5)
    assert recall.episodes == [stored]
    assert (await memory.recall("other", "touch", 5)).empty


async def test_store_is_idempotent_and_export_batches_in_time_order(memory: ScriptMemory) -> None:
    episodes = [
        new_episode("proj", "n", f"event {i}", "t", {"i": i}, reference_time=1000.0 - i)
        for i in range(5)
    ]
    await asyncio.gather(*(memory.store(e) for e in episodes))
    await memory.store(episodes[0])
    batches = [b async for b in memory.export("proj", 2)]
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [e for b in batches for e in b] == sorted(episodes, key=lambda e: e.reference_time)


async def test_a_failing_script_is_memory_unavailable_with_its_stderr(
    memory: ScriptMemory,
) -> None:
    with pytest.raises(MemoryUnavailable, match="store exited with 3: disk on fire"):
        await memory.store(episode("fail"))


async def test_a_hung_script_is_killed_at_the_timeout(script: Path) -> None:
    memory = ScriptMemory(script, timeout=1.0)
    await memory.start()
    with pytest.raises(MemoryUnavailable, match=r"query timed out after 1\.0 s"):
        async with asyncio.timeout(30):  # the script sleeps 60 s: this fires if not killed
            await memory.recall("proj", "hang", 5)
    pid = int((script.parent / "hung.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    await memory.close()


async def test_no_more_than_concurrency_scripts_run_at_once(script: Path) -> None:
    memory = ScriptMemory(script, concurrency=2)
    await memory.start()
    await asyncio.gather(*(memory.recall("proj", f"slow {i}", 5) for i in range(6)))
    await memory.close()
    calls = script.parent / "calls"
    spans = [
        (float((calls / f"{pid}.start").read_text()), float((calls / f"{pid}.end").read_text()))
        for pid in {p.stem for p in calls.iterdir()}
    ]
    assert len(spans) == 6
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most <= 2


async def test_plain_text_from_a_seed_style_script_is_one_episode(tmp_path: Path) -> None:
    path = tmp_path / "memory_manager.py"
    path.write_text(PLAIN_TEXT_MANAGER)
    memory = ScriptMemory(path, python=sys.executable, options=False)
    await memory.start()
    recall = await memory.recall("proj", "why did the build break", 8)
    await memory.store(episode("Modified: webpack.config.js"))  # prints nothing, exits 0
    await memory.close()
    assert [e.body for e in recall.episodes] == ["Relevant: the build broke after bumping webpack"]
    assert recall.episodes[0].group_id == "proj"


async def test_refusals_before_any_process_runs(tmp_path: Path, script: Path) -> None:
    with pytest.raises(MemoryUnavailable, match="is not a file"):
        await ScriptMemory(tmp_path / "missing.py").start()
    memory = ScriptMemory(script)
    with pytest.raises(BadRequest, match="NUL"):
        await memory.store(episode("nul \0 byte"))
    assert (await memory.recall("proj", "   ", 5)).empty
    assert not (script.parent / "calls").exists()
